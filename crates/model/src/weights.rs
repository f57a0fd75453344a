//! Binding Gemma 3 text weights by name, from GGUF (`blk.N.*`) or Hugging Face
//! (`model.layers.N.*`, or `language_model.model.*` in multimodal checkpoints).

use crate::{ModelError, TextConfig};
use gemma3_formats::{GgufFile, HfDirectory, TensorData};
use gemma3_kernels::Linear;
use std::collections::BTreeMap;

/// Where weights come from; `norm_offset` is added to RMSNorm weights (Hugging Face stores
/// `w` and the model uses `1 + w`; GGUF already stores `1 + w`).
pub enum WeightSource<'a> {
    Gguf(&'a GgufFile),
    Hf(&'a HfDirectory),
    /// Tensors under GGUF names and conventions, held in memory (a checkpoint converted or
    /// quantized at load).
    Tensors(&'a BTreeMap<String, TensorData>),
}

/// The decoder's per-layer tensors: role, GGUF name (`blk.N.<name>.weight`), Hugging Face
/// name (`<prefix>layers.N.<name>.weight`).
pub const LAYER_TENSORS: [(&str, &str, &str); 13] = [
    ("attn_norm", "attn_norm", "input_layernorm"),
    ("q", "attn_q", "self_attn.q_proj"),
    ("k", "attn_k", "self_attn.k_proj"),
    ("v", "attn_v", "self_attn.v_proj"),
    ("o", "attn_output", "self_attn.o_proj"),
    ("q_norm", "attn_q_norm", "self_attn.q_norm"),
    ("k_norm", "attn_k_norm", "self_attn.k_norm"),
    (
        "post_attn_norm",
        "post_attention_norm",
        "post_attention_layernorm",
    ),
    ("pre_ffn_norm", "ffn_norm", "pre_feedforward_layernorm"),
    (
        "post_ffn_norm",
        "post_ffw_norm",
        "post_feedforward_layernorm",
    ),
    ("gate", "ffn_gate", "mlp.gate_proj"),
    ("up", "ffn_up", "mlp.up_proj"),
    ("down", "ffn_down", "mlp.down_proj"),
];

/// Tensors outside the layers.
#[derive(Clone, Copy)]
pub enum GlobalTensor {
    Embed,
    FinalNorm,
    /// A separate output projection (Gemma 3 ties it to the embedding).
    Output,
}

impl GlobalTensor {
    pub fn gguf(self) -> &'static str {
        match self {
            GlobalTensor::Embed => "token_embd.weight",
            GlobalTensor::FinalNorm => "output_norm.weight",
            GlobalTensor::Output => "output.weight",
        }
    }
}

/// How a source names its tensors: GGUF names, or Hugging Face names under a prefix.
pub struct TensorNames {
    hf_prefix: Option<&'static str>,
}

impl TensorNames {
    pub fn global(&self, t: GlobalTensor) -> String {
        match (self.hf_prefix, t) {
            (None, t) => t.gguf().to_string(),
            (Some(p), GlobalTensor::Embed) => format!("{p}embed_tokens.weight"),
            (Some(p), GlobalTensor::FinalNorm) => format!("{p}norm.weight"),
            (Some(_), GlobalTensor::Output) => "lm_head.weight".to_string(),
        }
    }

    /// The name of layer `i`'s tensor `role` (see [`LAYER_TENSORS`]).
    pub fn layer(&self, i: usize, role: &str) -> String {
        let (_, gguf, hf) = LAYER_TENSORS
            .iter()
            .find(|(r, _, _)| *r == role)
            .expect("a role listed in LAYER_TENSORS");
        match self.hf_prefix {
            None => format!("blk.{i}.{gguf}.weight"),
            Some(p) => format!("{p}layers.{i}.{hf}.weight"),
        }
    }
}

/// Whether a GGUF text tensor is an RMSNorm weight (stored as `1 + w` in GGUF).
pub fn is_norm(gguf_name: &str) -> bool {
    gguf_name.ends_with("norm.weight")
}

pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
    pub post_attn_norm: Vec<f32>,
    pub pre_ffn_norm: Vec<f32>,
    pub post_ffn_norm: Vec<f32>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

pub struct TextWeights {
    pub embed: TensorData,
    /// The output projection: the embedding itself unless a separate one is stored.
    pub lm_head: Linear,
    /// `lm_head` is the embedding: its rows are read from the packed copy, if any.
    pub tied: bool,
    /// `sqrt(hidden)`, rounded to the embedding's dtype as transformers does.
    pub embed_scale: f32,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Vec<f32>,
}

impl WeightSource<'_> {
    fn get(&self, name: &str) -> Result<TensorData, ModelError> {
        Ok(match self {
            WeightSource::Gguf(g) => g.tensor(name)?,
            WeightSource::Hf(h) => h.tensor(name)?,
            WeightSource::Tensors(m) => m
                .get(name)
                .cloned()
                .ok_or_else(|| ModelError::Weights(format!("tensor {name} is missing")))?,
        })
    }
    fn has(&self, name: &str) -> bool {
        match self {
            WeightSource::Gguf(g) => g.tensor_info(name).is_some(),
            WeightSource::Hf(h) => h.tensors.contains_key(name),
            WeightSource::Tensors(m) => m.contains_key(name),
        }
    }

    /// How this source names the decoder's tensors.
    pub fn names(&self) -> Result<TensorNames, ModelError> {
        Ok(TensorNames {
            hf_prefix: match self {
                WeightSource::Hf(_) => Some(self.hf_prefix()?),
                _ => None,
            },
        })
    }

    /// The prefix of text-decoder tensors in a Hugging Face checkpoint.
    pub fn hf_prefix(&self) -> Result<&'static str, ModelError> {
        for p in ["model.", "language_model.model.", "model.language_model."] {
            if self.has(&format!("{p}embed_tokens.weight")) {
                return Ok(p);
            }
        }
        Err(ModelError::Weights(
            "no embed_tokens.weight under model., language_model.model. or model.language_model."
                .into(),
        ))
    }

    fn norm(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let t = self.get(name)?;
        t.expect_shape(&[len])?;
        let mut v = t.to_f32();
        if matches!(self, WeightSource::Hf(_)) {
            v.iter_mut().for_each(|x| *x += 1.0);
        }
        Ok(v)
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<TensorData, ModelError> {
        let t = self.get(name)?;
        t.expect_shape(&[rows, cols])?;
        Ok(t)
    }
}

impl TextWeights {
    pub fn load(src: &WeightSource<'_>, cfg: &TextConfig) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let qd = cfg.num_heads * cfg.head_dim;
        let kvd = cfg.num_kv_heads * cfg.head_dim;
        let ff = cfg.intermediate_size;
        let hd = cfg.head_dim;
        let names = src.names()?;
        let (embed_name, final_norm_name, head_name) = (
            names.global(GlobalTensor::Embed),
            names.global(GlobalTensor::FinalNorm),
            names.global(GlobalTensor::Output),
        );
        let head_name = head_name.as_str();
        let layer_name = |i: usize, role: &str| names.layer(i, role);
        let embed = src.matrix(&embed_name, cfg.vocab_size, h)?;
        let tied = !src.has(head_name);
        let lm_head = Linear::new(if !tied {
            src.matrix(head_name, cfg.vocab_size, h)?
        } else {
            embed.clone()
        });
        let embed_scale = round_to_dtype(
            (h as f32).sqrt(),
            embed.dtype,
            matches!(src, WeightSource::Hf(_)),
        );
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let n = |s: &str| layer_name(i, s);
            layers.push(LayerWeights {
                attn_norm: src.norm(&n("attn_norm"), h)?,
                q: Linear::new(src.matrix(&n("q"), qd, h)?),
                k: Linear::new(src.matrix(&n("k"), kvd, h)?),
                v: Linear::new(src.matrix(&n("v"), kvd, h)?),
                o: Linear::new(src.matrix(&n("o"), h, qd)?),
                q_norm: src.norm(&n("q_norm"), hd)?,
                k_norm: src.norm(&n("k_norm"), hd)?,
                post_attn_norm: src.norm(&n("post_attn_norm"), h)?,
                pre_ffn_norm: src.norm(&n("pre_ffn_norm"), h)?,
                post_ffn_norm: src.norm(&n("post_ffn_norm"), h)?,
                gate: Linear::new(src.matrix(&n("gate"), ff, h)?),
                up: Linear::new(src.matrix(&n("up"), ff, h)?),
                down: Linear::new(src.matrix(&n("down"), h, ff)?),
            });
        }
        // A file with more layers than its config names would run silently truncated.
        if src.has(&layer_name(cfg.num_layers, "attn_norm")) {
            return Err(ModelError::Config(format!(
                "the file holds weights of a layer {} but its config says {} layers",
                cfg.num_layers + 1,
                cfg.num_layers
            )));
        }
        Ok(TextWeights {
            embed,
            lm_head,
            tied,
            embed_scale,
            layers,
            final_norm: src.norm(&final_norm_name, h)?,
        })
    }

    /// Bytes of the repacked copies (see `gemma3_kernels::packed`).
    pub fn packed_bytes(&self) -> usize {
        let mut n = self.lm_head.packed.as_ref().map_or(0, |p| p.bytes());
        for l in &self.layers {
            for t in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                n += t.packed.as_ref().map_or(0, |p| p.bytes());
            }
        }
        n
    }

    /// Bytes of weight data (for `info` and memory estimates).
    pub fn bytes(&self) -> usize {
        let mut n = self.embed.bytes().len();
        let head = &self.lm_head.tensor;
        if !std::ptr::eq(self.embed.bytes().as_ptr(), head.bytes().as_ptr()) {
            n += head.bytes().len();
        }
        for l in &self.layers {
            for t in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                n += t.tensor.bytes().len();
            }
        }
        n
    }
}

/// transformers multiplies by `sqrt(hidden)` cast to the weight dtype (bf16 turns 25.298
/// into 25.25). A GGUF is run in f32 by both llama.cpp and transformers, so no rounding.
fn round_to_dtype(x: f32, dtype: gemma3_formats::DType, hf: bool) -> f32 {
    use gemma3_formats::DType;
    if !hf {
        return x;
    }
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}
