//! Gemma 3's eyes: the SigLIP vision tower and the multimodal projector (fixtures README,
//! items 10-11), turning one normalized `3 × S × S` image into `mm_tokens_per_image` rows
//! that replace the image soft tokens in the text model's input.
//!
//! Tower: a patch embedding (a stride-`P` convolution, done as a matrix product over
//! flattened patches), a learned position embedding, pre-LN encoder layers (biased q/k/v/out,
//! bidirectional attention scaled by `head_dim^-0.5`, `fc2(gelu_tanh(fc1(x)))`), and a final
//! LayerNorm. Projector: `k × k` average pooling over the patch grid, Gemma RMSNorm `(1 + w)`,
//! then `x · W` with `W` stored `[vision hidden, text hidden]`.
//!
//! Weights come from a Hugging Face checkpoint (`vision_tower.vision_model.*` as on the hub,
//! or transformers 5's `vision_tower.{embeddings,encoder,post_layernorm}.*`) or from
//! llama.cpp's mmproj GGUF (`v.*`, `mm.*`). The large products run on the blocked
//! [`gemm`](gemma3_kernels::gemm), straight from the stored weights of any type.

use crate::config::{
    gguf_float, gguf_int, json_float, json_int, not_positive, out_of_range, MAX_HEADS, MAX_HIDDEN,
    MAX_LAYERS,
};
use crate::ModelError;
use gemma3_formats::{GgufFile, HfDirectory, TensorData};
use gemma3_kernels::bf16mm::{self, PackedB16};
use gemma3_kernels::gemm::{gemm, gemm_into, BOperand, MatMut, MatRef, PackedA};
use gemma3_kernels::{ops, vmath, Precision, Weights};
use rayon::prelude::*;
use serde_json::Value;
use std::cell::RefCell;
use std::sync::OnceLock;

#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    /// Side of the square input image, in pixels.
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub layer_norm_eps: f32,
    /// Rows each image contributes to the text model (a square number).
    pub mm_tokens_per_image: usize,
    /// The text model's hidden size (the projector's output width).
    pub text_hidden_size: usize,
    /// `<image_soft_token>`, `<start_of_image>`, `<end_of_image>`.
    pub image_token_index: u32,
    pub boi_token_index: u32,
    pub eoi_token_index: u32,
    /// Per-channel normalization: `(x/255 - mean) / std`.
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for VisionConfig {
    /// Gemma 3 4B/12B/27B: SigLIP So400m at 896 pixels, 256 tokens per image.
    fn default() -> Self {
        VisionConfig {
            image_size: 896,
            patch_size: 14,
            num_channels: 3,
            hidden_size: 1152,
            intermediate_size: 4304,
            num_layers: 27,
            num_heads: 16,
            layer_norm_eps: 1e-6,
            mm_tokens_per_image: 256,
            text_hidden_size: 2560,
            image_token_index: 262_144,
            boi_token_index: 255_999,
            eoi_token_index: 256_000,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }
}

impl VisionConfig {
    /// Patches per side of the grid.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn num_patches(&self) -> usize {
        self.patches_per_side().pow(2)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Side of the average-pooling window: `patches_per_side / sqrt(mm_tokens_per_image)`.
    pub fn pool_kernel(&self) -> usize {
        self.patches_per_side() / self.tokens_per_side().max(1)
    }

    fn tokens_per_side(&self) -> usize {
        (self.mm_tokens_per_image as f64).sqrt().round() as usize
    }

    /// Values in one input image (`channels × size × size`).
    pub fn pixel_values_len(&self) -> usize {
        self.num_channels * self.image_size * self.image_size
    }

    /// The vision part of a Gemma 3 config.json, or `None` when it has no `vision_config`.
    pub fn from_hf_json(v: &Value) -> Result<Option<Self>, ModelError> {
        let Some(vc) = v.get("vision_config").filter(|x| x.is_object()) else {
            return Ok(None);
        };
        let d = VisionConfig::default();
        let u = |obj: &Value, k: &str, def: usize| -> Result<usize, ModelError> {
            Ok(json_int(obj, k)?.unwrap_or(def))
        };
        let id = |k: &str, def: u32| u(v, k, def as usize).map(|x| x as u32);
        let text = v.get("text_config").unwrap_or(v);
        if let Some(act) = vc.get("hidden_act").and_then(Value::as_str) {
            if !matches!(act, "gelu_pytorch_tanh" | "gelu_tanh") {
                return Err(ModelError::Config(format!(
                    "config.json: vision hidden_act {act:?} is not supported (gelu_pytorch_tanh)"
                )));
            }
        }
        let cfg = VisionConfig {
            image_size: u(vc, "image_size", d.image_size)?,
            patch_size: u(vc, "patch_size", d.patch_size)?,
            num_channels: u(vc, "num_channels", d.num_channels)?,
            hidden_size: u(vc, "hidden_size", d.hidden_size)?,
            intermediate_size: u(vc, "intermediate_size", d.intermediate_size)?,
            num_layers: u(vc, "num_hidden_layers", d.num_layers)?,
            num_heads: u(vc, "num_attention_heads", d.num_heads)?,
            layer_norm_eps: json_float(vc, "layer_norm_eps")?
                .map_or(d.layer_norm_eps, |x| x as f32),
            mm_tokens_per_image: u(v, "mm_tokens_per_image", d.mm_tokens_per_image)?,
            text_hidden_size: u(text, "hidden_size", d.text_hidden_size)?,
            image_token_index: id("image_token_index", d.image_token_index)?,
            boi_token_index: id("boi_token_index", d.boi_token_index)?,
            eoi_token_index: id("eoi_token_index", d.eoi_token_index)?,
            image_mean: d.image_mean,
            image_std: d.image_std,
        };
        cfg.validate()?;
        Ok(Some(cfg))
    }

    /// Reads llama.cpp's `clip.*` metadata of a Gemma 3 mmproj GGUF. The token ids are not
    /// stored there; they keep Gemma 3's (the engine checks them against the tokenizer).
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let path = g.path.display();
        if g.get_bool("clip.has_vision_encoder") == Some(false) {
            return Err(ModelError::Config(format!(
                "{path}: this mmproj file has no vision encoder"
            )));
        }
        let proj = g
            .get_str("clip.vision.projector_type")
            .or_else(|| g.get_str("clip.projector_type"));
        if proj != Some("gemma3") {
            return Err(ModelError::Config(format!(
                "{path}: projector type {proj:?} is not supported; a Gemma 3 mmproj has \"gemma3\""
            )));
        }
        let req = |k: &str| -> Result<usize, ModelError> {
            gguf_int(g, &format!("clip.vision.{k}"))?
                .ok_or_else(|| ModelError::Config(format!("{path}: missing clip.vision.{k}")))
        };
        let d = VisionConfig::default();
        let image_size = req("image_size")?;
        let patch_size = req("patch_size")?;
        // Pooling window; llama.cpp writes it only when it is not Gemma 3's 4.
        let kernel = gguf_int(g, "clip.vision.projector.scale_factor")?
            .unwrap_or(4)
            .max(1);
        let side = (image_size / patch_size.max(1)) / kernel;
        let text_hidden_size = match req("projection_dim") {
            Ok(x) => x,
            Err(e) => match g.tensor_info("mm.input_projection.weight") {
                Some(t) => t.dims.first().copied().unwrap_or(0) as usize,
                None => return Err(e),
            },
        };
        let triple = |k: &str, def: [f32; 3]| -> [f32; 3] {
            let a = g.get(k).and_then(|v| v.as_array());
            match a {
                Some(a) if a.len() == 3 => {
                    let mut out = def;
                    for (o, v) in out.iter_mut().zip(a) {
                        *o = v.as_f64().map_or(*o, |x| x as f32);
                    }
                    out
                }
                _ => def,
            }
        };
        let cfg = VisionConfig {
            image_size,
            patch_size,
            num_channels: 3,
            hidden_size: req("embedding_length")?,
            intermediate_size: req("feed_forward_length")?,
            num_layers: req("block_count")?,
            num_heads: req("attention.head_count")?,
            layer_norm_eps: gguf_float(g, "clip.vision.attention.layer_norm_epsilon")?
                .map_or(d.layer_norm_eps, |x| x as f32),
            mm_tokens_per_image: side * side,
            text_hidden_size,
            image_mean: triple("clip.vision.image_mean", d.image_mean),
            image_std: triple("clip.vision.image_std", d.image_std),
            ..d
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(format!("vision: {m}")));
        for (name, value, max) in [
            ("image size", self.image_size, MAX_IMAGE_SIZE),
            ("patch size", self.patch_size, MAX_IMAGE_SIZE),
            ("hidden size", self.hidden_size, MAX_HIDDEN),
            ("MLP size", self.intermediate_size, MAX_HIDDEN * 16),
            ("layer count", self.num_layers, MAX_LAYERS),
            ("attention heads", self.num_heads, MAX_HEADS),
            (
                "tokens per image",
                self.mm_tokens_per_image,
                MAX_IMAGE_SIZE * MAX_IMAGE_SIZE,
            ),
            ("text hidden size", self.text_hidden_size, MAX_HIDDEN),
        ] {
            if let Some(m) = out_of_range(name, value, max) {
                return bad(m);
            }
        }
        if let Some(m) = not_positive("the layer norm epsilon", f64::from(self.layer_norm_eps)) {
            return bad(m);
        }
        if self.num_channels != 3 {
            return bad(format!(
                "{} channels (RGB images have 3)",
                self.num_channels
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "image size {} is not a multiple of the patch size {}",
                self.image_size, self.patch_size
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden size {} does not split into {} heads",
                self.hidden_size, self.num_heads
            ));
        }
        let t = self.tokens_per_side();
        let g = self.patches_per_side();
        if t * t != self.mm_tokens_per_image || !g.is_multiple_of(t) {
            return bad(format!(
                "{} tokens per image do not pool a {g}x{g} patch grid evenly",
                self.mm_tokens_per_image
            ));
        }
        if self
            .image_mean
            .iter()
            .chain(&self.image_std)
            .any(|x| !x.is_finite())
            || self.image_std.contains(&0.0)
        {
            return bad(format!(
                "image mean {:?} / std {:?}: each must be finite, and std nonzero",
                self.image_mean, self.image_std
            ));
        }
        Ok(())
    }
}

/// The largest image side (pixels) a vision config may claim (Gemma 3's is 896).
const MAX_IMAGE_SIZE: usize = 1 << 13;

/// The tower's and the projector's name prefixes in a Hugging Face checkpoint (the hub's
/// `vision_tower.vision_model.*` or transformers 5's `vision_tower.*`, either under `model.`).
pub fn hf_prefixes(dir: &HfDirectory) -> Result<(&'static str, &'static str), ModelError> {
    let tower = [
        "vision_tower.vision_model.",
        "vision_tower.",
        "model.vision_tower.vision_model.",
        "model.vision_tower.",
    ]
    .into_iter()
    .find(|p| {
        dir.tensors
            .contains_key(&format!("{p}embeddings.patch_embedding.weight"))
    })
    .ok_or_else(|| {
        ModelError::Weights(format!(
            "{}: config.json has a vision_config but no vision_tower.*embeddings.patch_embedding.weight",
            dir.dir.display()
        ))
    })?;
    let projector = ["multi_modal_projector.", "model.multi_modal_projector."]
        .into_iter()
        .find(|p| {
            dir.tensors
                .contains_key(&format!("{p}mm_input_projection_weight"))
        })
        .unwrap_or("multi_modal_projector.");
    Ok((tower, projector))
}

/// Per-layer tensors of the tower: Hugging Face name under `encoder.layers.N.`, mmproj name
/// under `v.blk.N.`.
pub const LAYER_TENSORS: [(&str, &str); 16] = [
    ("layer_norm1.weight", "ln1.weight"),
    ("layer_norm1.bias", "ln1.bias"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.out_proj.weight", "attn_out.weight"),
    ("self_attn.out_proj.bias", "attn_out.bias"),
    ("layer_norm2.weight", "ln2.weight"),
    ("layer_norm2.bias", "ln2.bias"),
    ("mlp.fc1.weight", "ffn_up.weight"),
    ("mlp.fc1.bias", "ffn_up.bias"),
    ("mlp.fc2.weight", "ffn_down.weight"),
    ("mlp.fc2.bias", "ffn_down.bias"),
];

/// Tensors outside the layers: Hugging Face name (under the tower prefix, or the projector
/// prefix when it starts with `mm:`), mmproj name.
pub const GLOBAL_TENSORS: [(&str, &str); 7] = [
    ("embeddings.patch_embedding.weight", "v.patch_embd.weight"),
    ("embeddings.patch_embedding.bias", "v.patch_embd.bias"),
    (
        "embeddings.position_embedding.weight",
        "v.position_embd.weight",
    ),
    ("post_layernorm.weight", "v.post_ln.weight"),
    ("post_layernorm.bias", "v.post_ln.bias"),
    (
        "mm:mm_input_projection_weight",
        "mm.input_projection.weight",
    ),
    ("mm:mm_soft_emb_norm.weight", "mm.soft_emb_norm.weight"),
];

/// The mmproj name of a layer tensor given by its Hugging Face name.
fn mmproj_layer_name(hf: &str) -> &'static str {
    LAYER_TENSORS
        .iter()
        .find(|(h, _)| *h == hf)
        .map(|(_, g)| *g)
        .expect("a name listed in LAYER_TENSORS")
}

/// The projector norm: stored zero-centred by Hugging Face, as `1 + w` in an mmproj file.
pub const SOFT_NORM_MMPROJ: &str = "mm.soft_emb_norm.weight";

/// Every (Hugging Face name, mmproj name) pair of a tower with `num_layers` layers, with
/// the checkpoint's prefixes applied.
pub fn mmproj_names(tower: &str, projector: &str, num_layers: usize) -> Vec<(String, String)> {
    let resolve = |hf: &str| match hf.strip_prefix("mm:") {
        Some(rest) => format!("{projector}{rest}"),
        None => format!("{tower}{hf}"),
    };
    let mut out: Vec<(String, String)> = GLOBAL_TENSORS
        .iter()
        .map(|(h, g)| (resolve(h), g.to_string()))
        .collect();
    for i in 0..num_layers {
        for (h, g) in LAYER_TENSORS {
            out.push((
                format!("{tower}encoder.layers.{i}.{h}"),
                format!("v.blk.{i}.{g}"),
            ));
        }
    }
    out
}

/// One encoder layer.
pub struct VisionLayer {
    pub ln1_w: Vec<f32>,
    pub ln1_b: Vec<f32>,
    pub q: TensorData,
    pub q_b: Vec<f32>,
    pub k: TensorData,
    pub k_b: Vec<f32>,
    pub v: TensorData,
    pub v_b: Vec<f32>,
    pub o: TensorData,
    pub o_b: Vec<f32>,
    pub ln2_w: Vec<f32>,
    pub ln2_b: Vec<f32>,
    pub fc1: TensorData,
    pub fc1_b: Vec<f32>,
    pub fc2: TensorData,
    pub fc2_b: Vec<f32>,
}

pub struct VisionWeights {
    /// The patch convolution as a matrix `[hidden, channels·P·P]` (f32).
    pub patch: TensorData,
    pub patch_b: Vec<f32>,
    /// `[num_patches, hidden]`.
    pub position: Vec<f32>,
    pub layers: Vec<VisionLayer>,
    pub post_ln_w: Vec<f32>,
    pub post_ln_b: Vec<f32>,
    /// The projector's RMSNorm weight, already `1 + w`.
    pub soft_norm: Vec<f32>,
    /// The projection, transposed once at load to `[text hidden, vision hidden]` (f32).
    pub projection: TensorData,
}

/// Where the vision weights are read, and under which names.
enum Src<'a> {
    Hf {
        dir: &'a HfDirectory,
        tower: &'static str,
        projector: &'static str,
    },
    Gguf(&'a GgufFile),
}

impl Src<'_> {
    fn get(&self, name: &str) -> Result<TensorData, ModelError> {
        Ok(match self {
            Src::Hf { dir, .. } => dir.tensor(name)?,
            Src::Gguf(g) => g.tensor(name)?,
        })
    }

    /// The file's name for a tensor, given by its Hugging Face suffix (under the tower or
    /// projector prefix) and its GGUF name.
    fn name(&self, hf: &str, gguf: &str) -> String {
        match self {
            Src::Hf {
                tower, projector, ..
            } => {
                if let Some(rest) = hf.strip_prefix("mm:") {
                    format!("{projector}{rest}")
                } else {
                    format!("{tower}{hf}")
                }
            }
            Src::Gguf(_) => gguf.to_string(),
        }
    }

    fn matrix(
        &self,
        hf: &str,
        gguf: &str,
        rows: usize,
        cols: usize,
    ) -> Result<TensorData, ModelError> {
        let t = self.get(&self.name(hf, gguf))?;
        t.expect_shape(&[rows, cols])?;
        Ok(t)
    }

    fn vector(&self, hf: &str, gguf: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let t = self.get(&self.name(hf, gguf))?;
        t.expect_shape(&[len])?;
        Ok(t.to_f32())
    }
}

impl VisionWeights {
    fn load(src: &Src<'_>, cfg: &VisionConfig) -> Result<Self, ModelError> {
        let (d, f, c, p) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_channels,
            cfg.patch_size,
        );
        let patch =
            src.get(&src.name("embeddings.patch_embedding.weight", "v.patch_embd.weight"))?;
        patch.expect_shape(&[d, c, p, p])?;
        let patch = TensorData::from_f32(&patch.name, vec![d, c * p * p], &patch.to_f32())?;
        let position = src.get(&src.name(
            "embeddings.position_embedding.weight",
            "v.position_embd.weight",
        ))?;
        position.expect_shape(&[cfg.num_patches(), d])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let hf = |s: &str| format!("encoder.layers.{i}.{s}");
            let gg = |s: &str| format!("v.blk.{i}.{s}");
            let mat = |h: &str, r, c| src.matrix(&hf(h), &gg(mmproj_layer_name(h)), r, c);
            let vec = |h: &str, n| src.vector(&hf(h), &gg(mmproj_layer_name(h)), n);
            layers.push(VisionLayer {
                ln1_w: vec("layer_norm1.weight", d)?,
                ln1_b: vec("layer_norm1.bias", d)?,
                q: mat("self_attn.q_proj.weight", d, d)?,
                q_b: vec("self_attn.q_proj.bias", d)?,
                k: mat("self_attn.k_proj.weight", d, d)?,
                k_b: vec("self_attn.k_proj.bias", d)?,
                v: mat("self_attn.v_proj.weight", d, d)?,
                v_b: vec("self_attn.v_proj.bias", d)?,
                o: mat("self_attn.out_proj.weight", d, d)?,
                o_b: vec("self_attn.out_proj.bias", d)?,
                ln2_w: vec("layer_norm2.weight", d)?,
                ln2_b: vec("layer_norm2.bias", d)?,
                fc1: mat("mlp.fc1.weight", f, d)?,
                fc1_b: vec("mlp.fc1.bias", f)?,
                fc2: mat("mlp.fc2.weight", d, f)?,
                fc2_b: vec("mlp.fc2.bias", d)?,
            });
        }
        // Hugging Face stores the projector norm zero-centred; llama.cpp's converter adds 1.
        let mut soft_norm =
            src.vector("mm:mm_soft_emb_norm.weight", "mm.soft_emb_norm.weight", d)?;
        if matches!(src, Src::Hf { .. }) {
            soft_norm.iter_mut().for_each(|w| *w += 1.0);
        }
        // Stored [Dv, Dt] and used as `x · W` (README item 11): transpose once so that the
        // product takes it like every other `[out, in]` weight.
        let dt = cfg.text_hidden_size;
        let proj = src.matrix(
            "mm:mm_input_projection_weight",
            "mm.input_projection.weight",
            d,
            dt,
        )?;
        let w = proj.to_f32();
        let mut wt = vec![0f32; d * dt];
        for i in 0..d {
            for j in 0..dt {
                wt[j * d + i] = w[i * dt + j];
            }
        }
        Ok(VisionWeights {
            patch,
            patch_b: src.vector("embeddings.patch_embedding.bias", "v.patch_embd.bias", d)?,
            position: position.to_f32(),
            layers,
            post_ln_w: src.vector("post_layernorm.weight", "v.post_ln.weight", d)?,
            post_ln_b: src.vector("post_layernorm.bias", "v.post_ln.bias", d)?,
            soft_norm,
            projection: TensorData::from_f32(&proj.name, vec![dt, d], &wt)?,
        })
    }
}

/// The vision tower and projector, ready to encode images.
pub struct VisionTower {
    pub cfg: VisionConfig,
    pub weights: VisionWeights,
    /// `Fast` multiplies on bf16-rounded operands where the CPU has a bf16 unit (as the
    /// model runs in bf16; see `gemma3_kernels::bf16mm`); `Exact` (and CPUs without one)
    /// in f32, as transformers' float32 reference.
    pub precision: Precision,
    /// Each layer's matrices packed for the bf16 unit, made at the first fast image.
    b16: OnceLock<Vec<LayerB16>>,
}

/// One layer's matrices as bf16 products read them.
struct LayerB16 {
    q: PackedB16,
    k: PackedB16,
    v: PackedB16,
    o: PackedB16,
    fc1: PackedB16,
    fc2: PackedB16,
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Queries per attention task: a multiple of the AVX-512 kernel's 12 rows and 32 columns,
/// so that scores (`QB × patches`) stay in L2.
const QB: usize = 96;

impl VisionTower {
    pub fn new(cfg: VisionConfig, weights: VisionWeights) -> Self {
        VisionTower {
            cfg,
            weights,
            precision: Precision::default(),
            b16: OnceLock::new(),
        }
    }

    /// The layers packed for bf16 products, when this tower's precision and CPU use them.
    fn layers_b16(&self) -> Option<&[LayerB16]> {
        if self.precision != Precision::Fast || !bf16mm::available() {
            return None;
        }
        let pack = |t: &TensorData| PackedB16::of_weights(Weights::of(t));
        let layers = self.b16.get_or_init(|| {
            self.weights
                .layers
                .iter()
                .map(|l| LayerB16 {
                    q: pack(&l.q),
                    k: pack(&l.k),
                    v: pack(&l.v),
                    o: pack(&l.o),
                    fc1: pack(&l.fc1),
                    fc2: pack(&l.fc2),
                })
                .collect()
        });
        Some(layers)
    }

    /// The vision part of a Hugging Face checkpoint, or `None` when config.json has no
    /// `vision_config` (a text-only model).
    pub fn from_hf(dir: &HfDirectory) -> Result<Option<Self>, ModelError> {
        let Some(cfg) = VisionConfig::from_hf_json(&dir.config)? else {
            return Ok(None);
        };
        let (tower, projector) = hf_prefixes(dir)?;
        let src = Src::Hf {
            dir,
            tower,
            projector,
        };
        let weights = VisionWeights::load(&src, &cfg)?;
        Ok(Some(VisionTower::new(cfg, weights)))
    }

    /// llama.cpp's mmproj GGUF for Gemma 3.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let cfg = VisionConfig::from_gguf(g)?;
        let weights = VisionWeights::load(&Src::Gguf(g), &cfg)?;
        Ok(VisionTower::new(cfg, weights))
    }

    /// Weight bytes (for `info`).
    pub fn bytes(&self) -> usize {
        let w = &self.weights;
        let mut n = w.patch.bytes().len() + w.projection.bytes().len() + 4 * w.position.len();
        for l in &w.layers {
            n += [&l.q, &l.k, &l.v, &l.o, &l.fc1, &l.fc2]
                .iter()
                .map(|t| t.bytes().len())
                .sum::<usize>();
        }
        n
    }

    /// Parameters in the tower and projector.
    pub fn num_params(&self) -> usize {
        let (d, f) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let per_layer = 4 * (d * d + d) + 2 * d * f + f + d + 4 * d;
        let w = &self.weights;
        w.patch.numel()
            + d
            + w.position.len()
            + self.cfg.num_layers * per_layer
            + 2 * d
            + d
            + w.projection.numel()
    }

    /// The weight types of the encoder's matrices, for `info`.
    pub fn weight_types(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .weights
            .layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.fc1, &l.fc2])
            .map(|t| t.dtype.to_string())
            .collect();
        t.sort();
        t.dedup();
        t
    }

    /// Image → `mm_tokens_per_image × text_hidden_size` rows for the text model.
    pub fn encode(&self, pixels: &[f32]) -> Result<Vec<f32>, ModelError> {
        let h = self.hidden_states(pixels)?;
        Ok(self.project(&h))
    }

    /// The tower's output (`last_hidden_state`): `num_patches × hidden_size`.
    /// `pixels` is one normalized image, channels first (`3 × S × S`).
    pub fn hidden_states(&self, pixels: &[f32]) -> Result<Vec<f32>, ModelError> {
        let cfg = &self.cfg;
        if pixels.len() != cfg.pixel_values_len() {
            return Err(ModelError::Input(format!(
                "an image for this vision tower has {} values (3x{s}x{s}), not {}",
                cfg.pixel_values_len(),
                pixels.len(),
                s = cfg.image_size
            )));
        }
        let w = &self.weights;
        let (n, d, f) = (cfg.num_patches(), cfg.hidden_size, cfg.intermediate_size);
        let eps = cfg.layer_norm_eps;

        // Patch embedding: each patch flattened as (channel, row, column), like the
        // convolution's weight; patches in row-major order (README item 10).
        let patches = self.patches(pixels);
        let cpp = cfg.num_channels * cfg.patch_size * cfg.patch_size;
        let mut x = vec![0f32; n * d];
        for (r, row) in x.chunks_exact_mut(d).enumerate() {
            for ((o, b), p) in row.iter_mut().zip(&w.patch_b).zip(&w.position[r * d..]) {
                *o = b + p;
            }
        }
        gemm(
            MatRef::row_major(&patches, n, cpp),
            weights_t(&w.patch),
            MatMut::row_major(&mut x, n, d),
            true,
        );
        drop(patches);

        let mut xn = vec![0f32; n * d];
        let mut q = vec![0f32; n * d];
        let mut k = vec![0f32; n * d];
        let mut v = vec![0f32; n * d];
        let mut attn = vec![0f32; n * d];
        let mut mid = vec![0f32; n * f];
        let b16 = self.layers_b16();
        for (i, l) in w.layers.iter().enumerate() {
            let p = b16.map(|b| &b[i]);
            // x += out_proj(attention(LN1(x))): the product accumulates onto x.
            layer_norm_rows(&x, &l.ln1_w, &l.ln1_b, eps, &mut xn);
            for (t, wt, b, pb) in [
                (&mut q, &l.q, &l.q_b, p.map(|p| &p.q)),
                (&mut k, &l.k, &l.k_b, p.map(|p| &p.k)),
                (&mut v, &l.v, &l.v_b, p.map(|p| &p.v)),
            ] {
                fill_rows(t, b);
                linear(&xn, n, wt, pb, t);
            }
            if p.is_some() {
                self.attention_b16(&q, &k, &v, &mut attn);
            } else {
                self.attention(&q, &k, &v, &mut attn);
            }
            add_rows(&mut x, &l.o_b);
            linear(&attn, n, &l.o, p.map(|p| &p.o), &mut x);
            // x += fc2(gelu(fc1(LN2(x)))).
            layer_norm_rows(&x, &l.ln2_w, &l.ln2_b, eps, &mut xn);
            fill_rows(&mut mid, &l.fc1_b);
            linear(&xn, n, &l.fc1, p.map(|p| &p.fc1), &mut mid);
            mid.par_chunks_mut(f * 16)
                .for_each(vmath::gelu_tanh_inplace);
            add_rows(&mut x, &l.fc2_b);
            linear(&mid, n, &l.fc2, p.map(|p| &p.fc2), &mut x);
        }
        layer_norm_rows(&x, &w.post_ln_w, &w.post_ln_b, eps, &mut xn);
        Ok(xn)
    }

    /// The projector: average-pool the patch grid, RMSNorm, project to the text width.
    pub fn project(&self, hidden: &[f32]) -> Vec<f32> {
        let cfg = &self.cfg;
        let (d, dt) = (cfg.hidden_size, cfg.text_hidden_size);
        let g = cfg.patches_per_side();
        let kp = cfg.pool_kernel();
        let t = g / kp;
        assert_eq!(hidden.len(), g * g * d, "project: not num_patches x hidden");
        let mut pooled = vec![0f32; t * t * d];
        let inv = 1.0 / (kp * kp) as f32;
        for ty in 0..t {
            for tx in 0..t {
                let out = &mut pooled[(ty * t + tx) * d..(ty * t + tx + 1) * d];
                for ky in 0..kp {
                    for kx in 0..kp {
                        let p = (ty * kp + ky) * g + tx * kp + kx;
                        for (o, h) in out.iter_mut().zip(&hidden[p * d..(p + 1) * d]) {
                            *o += h;
                        }
                    }
                }
                out.iter_mut().for_each(|v| *v *= inv);
            }
        }
        for row in pooled.chunks_exact_mut(d) {
            ops::rms_norm_inplace(row, &self.weights.soft_norm, cfg.layer_norm_eps);
        }
        let mut out = vec![0f32; t * t * dt];
        linear(&pooled, t * t, &self.weights.projection, None, &mut out);
        out
    }

    /// Flattened patches, `num_patches × (channels · P · P)`.
    fn patches(&self, pixels: &[f32]) -> Vec<f32> {
        let cfg = &self.cfg;
        let (s, p, g, c) = (
            cfg.image_size,
            cfg.patch_size,
            cfg.patches_per_side(),
            cfg.num_channels,
        );
        let cpp = c * p * p;
        let mut out = vec![0f32; g * g * cpp];
        for (idx, patch) in out.chunks_exact_mut(cpp).enumerate() {
            let (py, px) = (idx / g, idx % g);
            for ch in 0..c {
                for ky in 0..p {
                    let src = ch * s * s + (py * p + ky) * s + px * p;
                    let dst = ch * p * p + ky * p;
                    patch[dst..dst + p].copy_from_slice(&pixels[src..src + p]);
                }
            }
        }
        out
    }

    /// Bidirectional multi-head attention over all patches, computed transposed so that
    /// the large matrices are never transposed: per head, keys `K` and values `Vᵀ` are
    /// packed once; per block of queries, `Sᵀ = K·Qᵀ` (keys × queries), a softmax down each
    /// column, `Oᵀ = Vᵀ·Sᵀ` (head dim × queries), and `O`, scaled by each column's `1/sum`,
    /// goes into the head's columns of `out`.
    fn attention(&self, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) {
        let cfg = &self.cfg;
        let (n, d, nh) = (cfg.num_patches(), cfg.hidden_size, cfg.num_heads);
        let hd = d / nh;
        let scale = 1.0 / (hd as f32).sqrt();
        let (keys, values): (Vec<PackedA>, Vec<PackedA>) = (0..nh)
            .into_par_iter()
            .map(|h| {
                (
                    PackedA::new(MatRef::new(&k[h * hd..], n, hd, d, 1)),
                    PackedA::new(MatRef::new(&v[h * hd..], hd, n, 1, d)),
                )
            })
            .unzip();
        out.par_chunks_mut(QB * d)
            .enumerate()
            .for_each(|(b, chunk)| {
                let q0 = b * QB;
                let qb = chunk.len() / d;
                SCORES.with(|s| {
                    let mut s = s.borrow_mut();
                    s.resize(n * qb + hd * qb + qb, 0.0);
                    let (st, rest) = s.split_at_mut(n * qb);
                    let (ot, inv) = rest.split_at_mut(hd * qb);
                    for h in 0..nh {
                        gemm_into(
                            &keys[h],
                            BOperand::F32(MatRef::new(&q[q0 * d + h * hd..], hd, qb, 1, d)),
                            MatMut::row_major(st, n, qb),
                            false,
                        );
                        vmath::softmax_columns(st, qb, scale, inv);
                        gemm_into(
                            &values[h],
                            BOperand::F32(MatRef::row_major(st, n, qb)),
                            MatMut::row_major(ot, hd, qb),
                            false,
                        );
                        for (j, (row, f)) in chunk.chunks_exact_mut(d).zip(inv.iter()).enumerate() {
                            for (i, o) in row[h * hd..(h + 1) * hd].iter_mut().enumerate() {
                                *o = ot[i * qb + j] * f;
                            }
                        }
                    }
                });
            });
    }

    /// [`Self::attention`] on bf16 operands: per head, `Kᵀ` and `V` packed once; per block
    /// of queries, scores `S = Q·Kᵀ` (queries × keys), a softmax along each row, and
    /// `O = S·V` straight into the head's columns of `out`.
    fn attention_b16(&self, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) {
        let cfg = &self.cfg;
        let (n, d, nh) = (cfg.num_patches(), cfg.hidden_size, cfg.num_heads);
        let hd = d / nh;
        let scale = 1.0 / (hd as f32).sqrt();
        let (keys_t, values): (Vec<PackedB16>, Vec<PackedB16>) = (0..nh)
            .into_par_iter()
            .map(|h| {
                (
                    PackedB16::of_view(MatRef::new(&k[h * hd..], hd, n, 1, d)),
                    PackedB16::of_view(MatRef::new(&v[h * hd..], n, hd, d, 1)),
                )
            })
            .unzip();
        out.par_chunks_mut(QB * d)
            .enumerate()
            .for_each(|(b, chunk)| {
                let q0 = b * QB;
                let qb = chunk.len() / d;
                SCORES.with(|s| {
                    let mut s = s.borrow_mut();
                    s.resize(qb * n, 0.0);
                    let s = &mut s[..qb * n];
                    for h in 0..nh {
                        bf16mm::gemm(
                            MatRef::new(&q[q0 * d + h * hd..], qb, hd, d, 1),
                            &keys_t[h],
                            MatMut::row_major(s, qb, n),
                            false,
                            false,
                        );
                        s.chunks_exact_mut(n)
                            .for_each(|row| vmath::softmax_scaled(row, scale));
                        bf16mm::gemm(
                            MatRef::row_major(s, qb, n),
                            &values[h],
                            MatMut::new(&mut chunk[h * hd..], qb, hd, d, 1),
                            false,
                            false,
                        );
                    }
                });
            });
    }
}

fn weights_t(t: &TensorData) -> BOperand<'_> {
    BOperand::WeightsT(Weights::of(t))
}

/// `out[n × rows(w)] += x[n × cols(w)] · wᵀ`, parallel: on bf16 operands when `w` is
/// given packed for them, else in f32.
fn linear(x: &[f32], n: usize, w: &TensorData, b16: Option<&PackedB16>, out: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    let a = MatRef::row_major(&x[..n * cols], n, cols);
    let c = MatMut::row_major(&mut out[..n * rows], n, rows);
    match b16 {
        Some(b) => bf16mm::gemm(a, b, c, true, true),
        None => gemm(a, weights_t(w), c, true),
    }
}

/// Every row of `x` set to `b`.
fn fill_rows(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        row.copy_from_slice(b);
    }
}

/// `b` added to every row of `x`.
fn add_rows(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        for (v, bi) in row.iter_mut().zip(b) {
            *v += bi;
        }
    }
}

/// LayerNorm of every row (biased variance, as torch), in parallel.
fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(64)
        .for_each(|(o, r)| {
            let mean = lane_sum(r, |v| v) / d as f32;
            let var = lane_sum(r, |v| (v - mean) * (v - mean)) / d as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((o, v), (wi, bi)) in o.iter_mut().zip(r).zip(w.iter().zip(b)) {
                *o = (v - mean) * inv * wi + bi;
            }
        });
}

/// `Σ f(x)` in 16 interleaved partial sums (vectorises, and rounds less than one chain).
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for l in 0..16 {
            acc[l] += f(c[l]);
        }
    }
    for (l, v) in chunks.remainder().iter().enumerate() {
        acc[l] += f(*v);
    }
    acc.iter().sum()
}
