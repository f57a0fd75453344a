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
        let int = |k: &str| json_int(v, k);
        let req = |k: &str| -> Result<usize, ModelError> {
            int(k)?.ok_or_else(|| ModelError::Config(format!("config.json: missing integer {k:?}")))
        };
        let opt_f = |k: &str| json_float(v, k);
        let hidden_size = req("hidden_size")?;
        let num_heads = req("num_attention_heads")?;
        let num_layers = in_range("layer count", req("num_hidden_layers")?, MAX_LAYERS)?;
        let head_dim = int("head_dim")?.unwrap_or(hidden_size / num_heads.max(1));
        // RoPE: transformers 5 nests per layer type; the hub uses flat legacy keys.
        let (mut rope_theta, mut rope_local_theta, mut factor) = (1_000_000.0, 10_000.0, 1.0);
        if let Some(rp) = v.get("rope_parameters").filter(|x| x.is_object()) {
            if let Some(full) = rp.get("full_attention") {
                rope_theta = json_float(full, "rope_theta")?.unwrap_or(rope_theta);
                factor = linear_factor(full)?;
            }
            if let Some(sl) = rp.get("sliding_attention") {
                rope_local_theta = json_float(sl, "rope_theta")?.unwrap_or(rope_local_theta);
            }
            if rp.get("full_attention").is_none() {
                // A single flat rope_parameters applies to full layers.
                rope_theta = json_float(rp, "rope_theta")?.unwrap_or(rope_theta);
                factor = linear_factor(rp)?;
            }
        } else {
            rope_theta = opt_f("rope_theta")?.unwrap_or(rope_theta);
            rope_local_theta = opt_f("rope_local_base_freq")?.unwrap_or(rope_local_theta);
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
                let pattern = match int("sliding_window_pattern")? {
                    Some(p) => p,
                    None => int("_sliding_window_pattern")?.unwrap_or(DEFAULT_PATTERN),
                };
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
                .map(|x| token_id(x, "eos_token_id"))
                .collect::<Result<_, _>>()?,
            Some(Value::Null) | None => vec![1],
            Some(x) => vec![token_id(x, "eos_token_id")?],
        };
        let cfg = TextConfig {
            vocab_size: int("vocab_size")?.unwrap_or(262_208),
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads: int("num_key_value_heads")?.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: opt_f("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_local_theta,
            rope_linear_factor: factor,
            sliding_window: int("sliding_window")?.unwrap_or(4096),
            layer_kinds,
            query_pre_attn_scalar: opt_f("query_pre_attn_scalar")?.unwrap_or(head_dim as f64),
            max_position_embeddings: int("max_position_embeddings")?.unwrap_or(131_072),
            final_logit_softcapping: opt_f("final_logit_softcapping")?.map(|x| x as f32),
            attn_logit_softcapping: opt_f("attn_logit_softcapping")?.map(|x| x as f32),
            bos_token_id: match v.get("bos_token_id") {
                Some(Value::Null) | None => 2,
                Some(x) => token_id(x, "bos_token_id")?,
            },
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
        let int = |k: &str| gguf_int(g, &format!("gemma3.{k}"));
        let float = |k: &str| gguf_float(g, &format!("gemma3.{k}"));
        let req = |k: &str| -> Result<usize, ModelError> {
            int(k)?.ok_or_else(|| {
                ModelError::Config(format!("{}: missing gemma3.{k}", g.path.display()))
            })
        };
        let hidden_size = req("embedding_length")?;
        let num_heads = req("attention.head_count")?;
        let num_layers = in_range("layer count", req("block_count")?, MAX_LAYERS)?;
        let head_dim = int("attention.key_length")?.unwrap_or(hidden_size / num_heads.max(1));
        let num_kv_heads = int("attention.head_count_kv")?.unwrap_or(num_heads);
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
        let query_pre_attn_scalar = match float("attention.query_pre_attn_scalar")? {
            Some(s) => s,
            None if size == "27B" => (hidden_size / num_heads) as f64,
            None => head_dim as f64,
        };
        // 4B and larger use linear RoPE scaling 8 on global layers; the converter writes it
        // as rope.scaling.*, but older files omit it.
        let rope_linear_factor = match (
            g.get_str("gemma3.rope.scaling.type"),
            float("rope.scaling.factor")?,
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
        let pattern = int("attention.sliding_window_pattern")?.unwrap_or(DEFAULT_PATTERN);
        let token = |k: &str, default: u32| -> Result<u32, ModelError> {
            match gguf_int(g, k)? {
                None => Ok(default),
                Some(t) => u32::try_from(t).map_err(|_| {
                    ModelError::Config(format!("{}: {k} {t} is not a token id", g.path.display()))
                }),
            }
        };
        let eos = token("tokenizer.ggml.eos_token_id", 1)?;
        let cfg = TextConfig {
            vocab_size,
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6) as f32,
            rope_theta: float("rope.freq_base")?.unwrap_or(1_000_000.0),
            rope_local_theta: float("rope.freq_base_swa")?.unwrap_or(10_000.0),
            rope_linear_factor,
            sliding_window: int("attention.sliding_window")?.unwrap_or(
                if size == "270M" || size == "1B" {
                    512
                } else {
                    1024
                },
            ),
            layer_kinds: Self::pattern_kinds(num_layers, pattern),
            query_pre_attn_scalar,
            max_position_embeddings: int("context_length")?.unwrap_or(131_072),
            final_logit_softcapping: float("final_logit_softcapping")?.map(|x| x as f32),
            attn_logit_softcapping: float("attn_logit_softcapping")?.map(|x| x as f32),
            bos_token_id: token("tokenizer.ggml.bos_token_id", 2)?,
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

    /// Every size positive and within what a Gemma-like model can have (so that no
    /// buffer is sized by a lying file), every scale finite and positive, token ids in the
    /// vocabulary. Errors name the field and its value.
    fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        for (name, value, max) in [
            ("hidden size", self.hidden_size, MAX_HIDDEN),
            ("attention heads", self.num_heads, MAX_HEADS),
            ("key/value heads", self.num_kv_heads, MAX_HEADS),
            ("head dimension", self.head_dim, MAX_HEAD_DIM),
            ("vocabulary size", self.vocab_size, MAX_VOCAB),
            ("layer count", self.num_layers, MAX_LAYERS),
            ("MLP size", self.intermediate_size, MAX_HIDDEN * 16),
            ("sliding window", self.sliding_window, MAX_CONTEXT),
            ("context length", self.max_position_embeddings, MAX_CONTEXT),
        ] {
            in_range(name, value, max)?;
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
        let positive = |name: &str, x: f64| match not_positive(name, x) {
            None => Ok(()),
            Some(m) => bad(m),
        };
        positive("the RMS norm epsilon", f64::from(self.rms_norm_eps))?;
        positive("the RoPE base (global layers)", self.rope_theta)?;
        positive("the RoPE base (sliding layers)", self.rope_local_theta)?;
        positive("the RoPE linear scaling factor", self.rope_linear_factor)?;
        positive("query_pre_attn_scalar", self.query_pre_attn_scalar)?;
        if let Some(c) = self.final_logit_softcapping {
            positive("the final logit softcapping", f64::from(c))?;
        }
        if let Some(c) = self.attn_logit_softcapping {
            positive("the attention logit softcapping", f64::from(c))?;
        }
        for (name, id) in std::iter::once(("bos_token_id", self.bos_token_id))
            .chain(self.eos_token_ids.iter().map(|&e| ("eos_token_id", e)))
        {
            if id as usize >= self.vocab_size {
                return bad(format!(
                    "{name} {id} is outside the vocabulary of {}",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }
}

/// `value` when it is 1 to `max`, else an error naming it. The layer count is checked
/// this way before the per-layer list is built from it.
pub(crate) fn in_range(name: &str, value: usize, max: usize) -> Result<usize, ModelError> {
    match out_of_range(name, value, max) {
        Some(m) => Err(ModelError::Config(m)),
        None => Ok(value),
    }
}

/// Why `value` is not a size from 1 to `max`, if it is not.
pub(crate) fn out_of_range(name: &str, value: usize, max: usize) -> Option<String> {
    (value == 0 || value > max).then(|| format!("{name} {value} is out of range (1 to {max})"))
}

/// Why `x` is not a positive finite number, if it is not.
pub(crate) fn not_positive(name: &str, x: f64) -> Option<String> {
    (!(x.is_finite() && x > 0.0))
        .then(|| format!("{name} is {x}; it must be a positive finite number"))
}

/// Layers per global layer when a file does not say (5 sliding : 1 global).
const DEFAULT_PATTERN: usize = 6;

/// Bounds on sizes a config may claim: far above Gemma 3 27B (hidden 5376, 62 layers, 32
/// heads of 128, 262K vocabulary, 128K context), far below what would exhaust memory
/// before a tensor is even looked at.
pub(crate) const MAX_HIDDEN: usize = 1 << 16;
pub(crate) const MAX_HEADS: usize = 1 << 10;
const MAX_HEAD_DIM: usize = 1 << 12;
const MAX_VOCAB: usize = 1 << 22;
pub(crate) const MAX_LAYERS: usize = 1 << 10;
const MAX_CONTEXT: usize = 1 << 24;

/// An integer field of config.json: None when absent or null, an error naming the field
/// when it holds anything but a non-negative integer.
pub(crate) fn json_int(v: &Value, k: &str) -> Result<Option<usize>, ModelError> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                ModelError::Config(format!(
                    "config.json: {k} is {}, not a non-negative integer",
                    short_json(x)
                ))
            }),
    }
}

/// A number field of config.json: None when absent or null, an error naming the field
/// when it holds anything but a number.
pub(crate) fn json_float(v: &Value, k: &str) -> Result<Option<f64>, ModelError> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or_else(|| {
            ModelError::Config(format!(
                "config.json: {k} is {}, not a number",
                short_json(x)
            ))
        }),
    }
}

/// A token id of config.json (`bos_token_id`, each `eos_token_id`).
fn token_id(x: &Value, k: &str) -> Result<u32, ModelError> {
    x.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            ModelError::Config(format!(
                "config.json: {k} is {}, not a token id",
                short_json(x)
            ))
        })
}

/// A JSON value for an error message, cut short.
fn short_json(x: &Value) -> String {
    let s = x.to_string();
    match s.char_indices().nth(SHOWN_CHARS) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// How much of an unexpected value an error message shows.
const SHOWN_CHARS: usize = 40;

/// An integer GGUF metadata value: None when absent, an error naming the key and what it
/// holds otherwise.
pub(crate) fn gguf_int(g: &GgufFile, key: &str) -> Result<Option<usize>, ModelError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                ModelError::Config(format!(
                    "{}: {key} is {}, not a non-negative integer",
                    g.path.display(),
                    v.describe()
                ))
            }),
    }
}

/// A numeric GGUF metadata value: None when absent, an error naming the key otherwise.
pub(crate) fn gguf_float(g: &GgufFile, key: &str) -> Result<Option<f64>, ModelError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| {
            ModelError::Config(format!(
                "{}: {key} is {}, not a number",
                g.path.display(),
                v.describe()
            ))
        }),
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
        "linear" => Ok(json_float(rp, "factor")?.unwrap_or(1.0)),
        other => Err(ModelError::Config(format!(
            "rope type {other:?} is not supported (Gemma 3 uses default and linear)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma3_formats::gguf::GgufWriter;
    use gemma3_formats::MetaValue;

    fn tiny_config() -> Value {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/fixtures/tiny-text/config.json"
        );
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    /// The error `from_hf_json` gives with `key` set to `value` (in `text_config` when the
    /// config has one).
    fn json_error(key: &str, value: Value) -> String {
        let mut v = tiny_config();
        let t = match v.get_mut("text_config") {
            Some(t) => t,
            None => &mut v,
        };
        t[key] = value;
        TextConfig::from_hf_json(&v).unwrap_err().to_string()
    }

    #[test]
    fn the_tiny_config_reads() {
        TextConfig::from_hf_json(&tiny_config()).unwrap();
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named_not_defaulted() {
        let e = json_error("vocab_size", "lots".into());
        assert!(e.contains("vocab_size") && e.contains("\"lots\""), "{e}");
        let e = json_error("rms_norm_eps", "tiny".into());
        assert!(
            e.contains("rms_norm_eps") && e.contains("not a number"),
            "{e}"
        );
        let e = json_error("bos_token_id", (-1).into());
        assert!(e.contains("bos_token_id") && e.contains("-1"), "{e}");
        let e = json_error("hidden_size", Value::from(vec!["a"; 100]));
        assert!(
            e.contains("hidden_size") && e.len() < 200,
            "the value is cut short: {e}"
        );
    }

    #[test]
    fn scales_must_be_positive_and_sizes_in_range() {
        let e = json_error("rms_norm_eps", 0.into());
        assert!(e.contains("epsilon is 0"), "{e}");
        let rope =
            serde_json::json!({"full_attention": {"rope_type": "default", "rope_theta": -10000.0}});
        let e = json_error("rope_parameters", rope);
        assert!(e.contains("RoPE base") && e.contains("-10000"), "{e}");
        let e = json_error("query_pre_attn_scalar", 0.into());
        assert!(e.contains("query_pre_attn_scalar is 0"), "{e}");
        // Checked before anything is sized by it (the fuzzer's 11-trillion-layer config).
        let e = json_error("num_hidden_layers", 11_111_111_111_116u64.into());
        assert!(
            e.contains("11111111111116") && e.contains("out of range"),
            "{e}"
        );
        let e = json_error("num_hidden_layers", 1_000_000_000u64.into());
        assert!(e.contains("1000000000") && !e.contains("TextConfig"), "{e}");
        let e = json_error("vocab_size", 2.into());
        assert!(
            e.contains("bos_token_id 2 is outside the vocabulary of 2"),
            "{e}"
        );
    }

    /// A GGUF header of a small Gemma 3 with `key` set to `value`.
    fn gguf_error(key: &str, value: MetaValue) -> String {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", MetaValue::String("gemma3".into()))
            .meta("gemma3.embedding_length", MetaValue::U32(64))
            .meta("gemma3.attention.head_count", MetaValue::U32(4))
            .meta("gemma3.attention.head_count_kv", MetaValue::U32(1))
            .meta("gemma3.attention.key_length", MetaValue::U32(16))
            .meta("gemma3.block_count", MetaValue::U32(2))
            .meta("gemma3.feed_forward_length", MetaValue::U32(128))
            .meta("gemma3.context_length", MetaValue::U32(1024))
            .meta(
                "gemma3.attention.layer_norm_rms_epsilon",
                MetaValue::F32(1e-6),
            )
            .set_meta(key, value)
            .tensor(
                "token_embd.weight",
                &[256, 64],
                gemma3_formats::DType::F32,
                vec![0; 256 * 64 * 4],
            );
        let g = GgufFile::from_bytes("m.gguf", w.to_bytes()).unwrap();
        TextConfig::from_gguf(&g)
            .map(|_| String::new())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn gguf_metadata_is_checked() {
        assert_eq!(
            gguf_error("general.name", MetaValue::String("x".into())),
            ""
        );
        let e = gguf_error(
            "gemma3.attention.layer_norm_rms_epsilon",
            MetaValue::F32(f32::NAN),
        );
        assert!(e.contains("epsilon is NaN"), "{e}");
        let e = gguf_error("gemma3.rope.freq_base", MetaValue::F32(f32::INFINITY));
        assert!(e.contains("RoPE base") && e.contains("inf"), "{e}");
        let e = gguf_error("gemma3.context_length", MetaValue::F32(1024.0));
        assert!(
            e.contains("gemma3.context_length") && e.contains("not a non-negative integer"),
            "{e}"
        );
        let e = gguf_error("gemma3.block_count", MetaValue::String("two".into()));
        assert!(
            e.contains("gemma3.block_count is the string \"two\""),
            "{e}"
        );
        let e = gguf_error("tokenizer.ggml.bos_token_id", MetaValue::U32(5000));
        assert!(e.contains("bos_token_id 5000"), "{e}");
    }
}
