//! Binding Gemma 3 text weights by name, from GGUF (`blk.N.*`) or Hugging Face
//! (`model.layers.N.*`, or `language_model.model.*` in multimodal checkpoints).

use crate::{ModelError, TextConfig};
use gemma3_formats::{GgufFile, HfDirectory, TensorData};
use gemma3_kernels::Linear;

/// Where weights come from; `norm_offset` is added to RMSNorm weights (Hugging Face stores
/// `w` and the model uses `1 + w`; GGUF already stores `1 + w`).
pub enum WeightSource<'a> {
    Gguf(&'a GgufFile),
    Hf(&'a HfDirectory),
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
        })
    }
    fn has(&self, name: &str) -> bool {
        match self {
            WeightSource::Gguf(g) => g.tensor_info(name).is_some(),
            WeightSource::Hf(h) => h.tensors.contains_key(name),
        }
    }

    /// The prefix of text-decoder tensors in a Hugging Face checkpoint.
    fn hf_prefix(&self) -> Result<&'static str, ModelError> {
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
        let (embed_name, final_norm_name, head_name, layer_name): (
            String,
            String,
            &str,
            Box<dyn Fn(usize, &str) -> String>,
        ) = match src {
            WeightSource::Gguf(_) => (
                "token_embd.weight".into(),
                "output_norm.weight".into(),
                "output.weight",
                Box::new(|i, n| {
                    let g = match n {
                        "attn_norm" => "attn_norm",
                        "q" => "attn_q",
                        "k" => "attn_k",
                        "v" => "attn_v",
                        "o" => "attn_output",
                        "q_norm" => "attn_q_norm",
                        "k_norm" => "attn_k_norm",
                        "post_attn_norm" => "post_attention_norm",
                        "pre_ffn_norm" => "ffn_norm",
                        "post_ffn_norm" => "post_ffw_norm",
                        "gate" => "ffn_gate",
                        "up" => "ffn_up",
                        "down" => "ffn_down",
                        _ => unreachable!(),
                    };
                    format!("blk.{i}.{g}.weight")
                }),
            ),
            WeightSource::Hf(_) => {
                let p = src.hf_prefix()?;
                (
                    format!("{p}embed_tokens.weight"),
                    format!("{p}norm.weight"),
                    "lm_head.weight",
                    Box::new(move |i, n| {
                        let g = match n {
                            "attn_norm" => "input_layernorm",
                            "q" => "self_attn.q_proj",
                            "k" => "self_attn.k_proj",
                            "v" => "self_attn.v_proj",
                            "o" => "self_attn.o_proj",
                            "q_norm" => "self_attn.q_norm",
                            "k_norm" => "self_attn.k_norm",
                            "post_attn_norm" => "post_attention_layernorm",
                            "pre_ffn_norm" => "pre_feedforward_layernorm",
                            "post_ffn_norm" => "post_feedforward_layernorm",
                            "gate" => "mlp.gate_proj",
                            "up" => "mlp.up_proj",
                            "down" => "mlp.down_proj",
                            _ => unreachable!(),
                        };
                        format!("{p}layers.{i}.{g}.weight")
                    }),
                )
            }
        };
        let embed = src.matrix(&embed_name, cfg.vocab_size, h)?;
        let lm_head = Linear::new(if src.has(head_name) {
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
        Ok(TextWeights {
            embed,
            lm_head,
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
