//! Gemma 3 text-decoder configuration, from a Hugging Face config.json (transformers 5's
//! `rope_parameters`/`layer_types`, or the hub's legacy keys) or from GGUF `gemma3.*`
//! metadata with the defaults a GGUF leaves out.

use crate::ModelError;
use gemma3_formats::GgufFile;
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Attends to the last `sliding_window` positions, RoPE base `rope_local_theta`.
    Sliding,
    /// Attends to every earlier position, RoPE base `rope_theta` with linear scaling.
    Full,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    /// RoPE base of full-attention layers.
    pub rope_theta: f64,
    /// RoPE base of sliding layers.
    pub rope_local_theta: f64,
    /// Linear RoPE factor of full-attention layers (1 = none).
    pub rope_linear_factor: f64,
    pub sliding_window: usize,
    pub layer_kinds: Vec<LayerKind>,
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: f64,
    pub max_position_embeddings: usize,
    pub final_logit_softcapping: Option<f32>,
    pub attn_logit_softcapping: Option<f32>,
    pub bos_token_id: u32,
    pub eos_token_ids: Vec<u32>,
}

/// Sizes by layer count, for defaults a GGUF may omit.
fn size_label(num_layers: usize) -> &'static str {
    match num_layers {
        18 => "270M",
        26 => "1B",
        34 => "4B",
        48 => "12B",
        62 => "27B",
        _ => "unknown",
    }
}

impl TextConfig {
    /// The pattern rule: layer `i` is full when `(i + 1) % pattern == 0`.
    pub fn pattern_kinds(num_layers: usize, pattern: usize) -> Vec<LayerKind> {
        (0..num_layers)
            .map(|i| {
                if pattern > 0 && (i + 1) % pattern == 0 {
                    LayerKind::Full
                } else {
                    LayerKind::Sliding
                }
            })
            .collect()
    }

    pub fn attn_scale(&self) -> f32 {
        (1.0 / self.query_pre_attn_scalar.sqrt()) as f32
    }

    pub fn size_label(&self) -> &'static str {
        size_label(self.num_layers)
    }

    /// Reads config.json. For a multimodal config the text part is `text_config`.
    pub fn from_hf_json(v: &Value) -> Result<Self, ModelError> {
        let top = v;
        let v = v.get("text_config").unwrap_or(v);
        let mt = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("gemma3_text");
        if !matches!(mt, "gemma3_text" | "gemma3") {
            return Err(ModelError::Config(format!(
                "model_type {mt:?} is not supported: this engine runs Gemma 3 (gemma3, gemma3_text)"
            )));
        }
        let req = |k: &str| -> Result<usize, ModelError> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| ModelError::Config(format!("config.json: missing integer {k:?}")))
        };
        let opt_f = |k: &str| v.get(k).and_then(Value::as_f64);
        let hidden_size = req("hidden_size")?;
        let num_heads = req("num_attention_heads")?;
        let num_layers = req("num_hidden_layers")?;
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_heads.max(1));
        // RoPE: transformers 5 nests per layer type; the hub uses flat legacy keys.
        let (mut rope_theta, mut rope_local_theta, mut factor) = (1_000_000.0, 10_000.0, 1.0);
        if let Some(rp) = v.get("rope_parameters").filter(|x| x.is_object()) {
            if let Some(full) = rp.get("full_attention") {
                rope_theta = full
                    .get("rope_theta")
                    .and_then(Value::as_f64)
                    .unwrap_or(rope_theta);
                factor = linear_factor(full)?;
            }
            if let Some(sl) = rp.get("sliding_attention") {
                rope_local_theta = sl
                    .get("rope_theta")
                    .and_then(Value::as_f64)
                    .unwrap_or(rope_local_theta);
            }
            if rp.get("full_attention").is_none() {
                // A single flat rope_parameters applies to full layers.
                rope_theta = rp
                    .get("rope_theta")
                    .and_then(Value::as_f64)
                    .unwrap_or(rope_theta);
                factor = linear_factor(rp)?;
            }
        } else {
            rope_theta = opt_f("rope_theta").unwrap_or(rope_theta);
            rope_local_theta = opt_f("rope_local_base_freq").unwrap_or(rope_local_theta);
            if let Some(rs) = v.get("rope_scaling").filter(|x| x.is_object()) {
                factor = linear_factor(rs)?;
            }
        }
        let layer_kinds = match v.get("layer_types").and_then(Value::as_array) {
            Some(list) => list
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(LayerKind::Sliding),
                    Some("full_attention") => Ok(LayerKind::Full),
                    other => Err(ModelError::Config(format!(
                        "config.json: unknown layer type {other:?}"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => {
                let pattern = v
                    .get("sliding_window_pattern")
                    .or_else(|| v.get("_sliding_window_pattern"))
                    .and_then(Value::as_u64)
                    .unwrap_or(6) as usize;
                Self::pattern_kinds(num_layers, pattern)
            }
        };
        if layer_kinds.len() != num_layers {
            return Err(ModelError::Config(format!(
                "config.json: {} layer_types for {num_layers} layers",
                layer_kinds.len()
            )));
        }
        let eos_token_ids = match top.get("eos_token_id").or_else(|| v.get("eos_token_id")) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect(),
            Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            None => vec![1],
        };
        let cfg = TextConfig {
            vocab_size: req("vocab_size").unwrap_or(262_208),
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads: req("num_key_value_heads").unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: opt_f("rms_norm_eps").unwrap_or(1e-6) as f32,
            rope_theta,
            rope_local_theta,
            rope_linear_factor: factor,
            sliding_window: req("sliding_window").unwrap_or(4096),
            layer_kinds,
            query_pre_attn_scalar: opt_f("query_pre_attn_scalar").unwrap_or(head_dim as f64),
            max_position_embeddings: req("max_position_embeddings").unwrap_or(131_072),
            final_logit_softcapping: opt_f("final_logit_softcapping").map(|x| x as f32),
            attn_logit_softcapping: opt_f("attn_logit_softcapping").map(|x| x as f32),
            bos_token_id: v.get("bos_token_id").and_then(Value::as_u64).unwrap_or(2) as u32,
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `gemma3.*` GGUF metadata, filling in what llama.cpp's converter leaves out.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let arch = g.get_str("general.architecture").unwrap_or("(none)");
        if arch != "gemma3" {
            return Err(ModelError::Config(format!(
                "{}: architecture {arch:?} is not supported; this engine runs Gemma 3 (general.architecture = \"gemma3\")",
                g.path.display()
            )));
        }
        let req = |k: &str| -> Result<usize, ModelError> {
            g.get_u64(&format!("gemma3.{k}"))
                .map(|x| x as usize)
                .ok_or_else(|| {
                    ModelError::Config(format!("{}: missing gemma3.{k}", g.path.display()))
                })
        };
        let hidden_size = req("embedding_length")?;
        let num_heads = req("attention.head_count")?;
        let num_layers = req("block_count")?;
        let head_dim = req("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        let num_kv_heads = req("attention.head_count_kv").unwrap_or(num_heads);
        let vocab_size = match g.tensor_info("token_embd.weight") {
            Some(t) => t.dims.get(1).copied().unwrap_or(0) as usize,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .unwrap_or(0),
        };
        let size = size_label(num_layers);
        // llama.cpp: 27B scales by hidden/heads (= query_pre_attn_scalar 168), others by head_dim.
        let query_pre_attn_scalar = match g.get_f64("gemma3.attention.query_pre_attn_scalar") {
            Some(s) => s,
            None if size == "27B" => (hidden_size / num_heads) as f64,
            None => head_dim as f64,
        };
        // 4B and larger use linear RoPE scaling 8 on global layers; the converter writes it
        // as rope.scaling.*, but older files omit it.
        let rope_linear_factor = match (
            g.get_str("gemma3.rope.scaling.type"),
            g.get_f64("gemma3.rope.scaling.factor"),
        ) {
            (Some("linear"), Some(f)) | (None, Some(f)) => f,
            (Some("none"), _) => 1.0,
            (Some(other), _) => {
                return Err(ModelError::Config(format!(
                    "gemma3.rope.scaling.type {other:?} is not supported (linear only)"
                )))
            }
            (None, None) if matches!(size, "4B" | "12B" | "27B") => 8.0,
            _ => 1.0,
        };
        let pattern = g
            .get_u64("gemma3.attention.sliding_window_pattern")
            .unwrap_or(6) as usize;
        let eos = g.get_u64("tokenizer.ggml.eos_token_id").unwrap_or(1) as u32;
        let cfg = TextConfig {
            vocab_size,
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: g
                .get_f64("gemma3.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-6) as f32,
            rope_theta: g.get_f64("gemma3.rope.freq_base").unwrap_or(1_000_000.0),
            rope_local_theta: g.get_f64("gemma3.rope.freq_base_swa").unwrap_or(10_000.0),
            rope_linear_factor,
            sliding_window: req("attention.sliding_window").unwrap_or(
                if size == "270M" || size == "1B" {
                    512
                } else {
                    1024
                },
            ),
            layer_kinds: Self::pattern_kinds(num_layers, pattern),
            query_pre_attn_scalar,
            max_position_embeddings: req("context_length").unwrap_or(131_072),
            final_logit_softcapping: g
                .get_f64("gemma3.final_logit_softcapping")
                .map(|x| x as f32),
            attn_logit_softcapping: g.get_f64("gemma3.attn_logit_softcapping").map(|x| x as f32),
            bos_token_id: g.get_u64("tokenizer.ggml.bos_token_id").unwrap_or(2) as u32,
            // <end_of_turn> (106) ends a chat turn as well as <eos>.
            eos_token_ids: if eos == 106 {
                vec![1, 106]
            } else {
                vec![eos, 106]
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.hidden_size == 0
            || self.num_heads == 0
            || self.num_kv_heads == 0
            || self.head_dim == 0
        {
            return bad(format!("zero-sized dimension in {self:?}"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} attention heads cannot be grouped over {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.sliding_window == 0 {
            return bad("sliding_window is 0".into());
        }
        if self.vocab_size == 0 || self.num_layers == 0 || self.intermediate_size == 0 {
            return bad("vocabulary, layer count and MLP size must be positive".into());
        }
        Ok(())
    }
}

fn linear_factor(rp: &Value) -> Result<f64, ModelError> {
    let ty = rp
        .get("rope_type")
        .or_else(|| rp.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match ty {
        "default" => Ok(1.0),
        "linear" => Ok(rp.get("factor").and_then(Value::as_f64).unwrap_or(1.0)),
        other => Err(ModelError::Config(format!(
            "rope type {other:?} is not supported (Gemma 3 uses default and linear)"
        ))),
    }
}
