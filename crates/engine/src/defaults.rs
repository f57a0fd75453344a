//! The sampling a model's users expect when they ask for nothing: its
//! `generation_config.json` read as transformers reads it (a Hugging Face directory, or the
//! Hugging Face repo a GGUF came from), else Ollama's parameters layer read as Ollama reads
//! it, else Gemma 3's published settings (temperature 1, top-k 64, top-p 0.95).

use crate::hub::GENERATION_CONFIG;
use crate::load::{Model, ModelSource};
use crate::ollama::OllamaParams;
use crate::{EngineError, SamplingParams};
use std::path::{Path, PathBuf};

/// transformers' GenerationConfig defaults for keys a generation_config.json leaves out.
const HF_TEMPERATURE: f32 = 1.0;
const HF_TOP_K: usize = 50;
const HF_TOP_P: f32 = 1.0;
/// Ollama's defaults (api.DefaultOptions) for keys a parameters layer leaves out.
const OLLAMA_TEMPERATURE: f32 = 0.8;
const OLLAMA_TOP_K: i64 = 40;
const OLLAMA_TOP_P: f32 = 0.9;

/// Where the defaults came from.
#[derive(Clone, Debug, PartialEq)]
pub enum SamplingSource {
    GenerationConfig(PathBuf),
    /// Ollama's parameters layer (of the manifest at this path).
    OllamaParams(PathBuf),
    /// Gemma 3's published settings.
    Gemma,
}

impl std::fmt::Display for SamplingSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SamplingSource::GenerationConfig(p) => write!(f, "{}", p.display()),
            SamplingSource::OllamaParams(p) => {
                write!(f, "Ollama parameters of {}", p.display())
            }
            SamplingSource::Gemma => f.write_str("Gemma 3's published settings"),
        }
    }
}

/// A model's default sampling and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingDefaults {
    pub params: SamplingParams,
    pub source: SamplingSource,
}

impl Model {
    /// The sampling this model's users expect by default, with `seed`.
    pub fn default_sampling(&self, seed: u64) -> Result<SamplingDefaults, EngineError> {
        if let Some(path) = self.generation_config() {
            let text = gemma3_formats::read_text(&path, gemma3_formats::MAX_TEXT_BYTES)?;
            return Ok(SamplingDefaults {
                params: from_generation_config(&text, seed)
                    .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?,
                source: SamplingSource::GenerationConfig(path),
            });
        }
        if let Some(o) = self.origin.as_ref().and_then(|r| r.ollama.as_ref()) {
            if let Some(p) = &o.params {
                return Ok(SamplingDefaults {
                    params: from_ollama(p, seed).map_err(|e| {
                        EngineError::Load(format!(
                            "the parameters layer of {} ({}): {e}",
                            o.name,
                            o.manifest.display()
                        ))
                    })?,
                    source: SamplingSource::OllamaParams(o.manifest.clone()),
                });
            }
        }
        Ok(SamplingDefaults {
            params: SamplingParams::gemma_default(seed),
            source: SamplingSource::Gemma,
        })
    }

    /// The Ollama parameters layer of a model found in Ollama's store.
    fn ollama_params(&self) -> Option<&crate::ollama::OllamaParams> {
        self.origin.as_ref()?.ollama.as_ref()?.params.as_ref()
    }

    /// The context the model's own parameters ask for (Ollama's `num_ctx`), if any.
    pub fn default_context(&self) -> Option<usize> {
        self.ollama_params()?
            .num_ctx
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
    }

    /// The new-token limit the model's own parameters set (Ollama's `num_predict`), if
    /// any: `Some(usize::MAX)` for -1 and -2 (until the context is full).
    pub fn default_max_tokens(&self) -> Option<usize> {
        match self.ollama_params()?.num_predict? {
            n if n < 0 => Some(usize::MAX),
            n => usize::try_from(n).ok(),
        }
    }

    /// The generation_config.json of a Hugging Face directory, or of the Hugging Face repo
    /// snapshot a GGUF was found in.
    fn generation_config(&self) -> Option<PathBuf> {
        let dir: &Path = match (&self.source, &self.origin) {
            (ModelSource::Hf(h), _) => &h.dir,
            (_, Some(r)) => &r.snapshot.as_ref()?.dir,
            _ => return None,
        };
        Some(dir.join(GENERATION_CONFIG)).filter(|p| p.is_file())
    }
}

/// transformers' reading: `do_sample` false or absent is greedy (repetition penalty still
/// applies, over the whole sequence); otherwise temperature, top-k and top-p with
/// GenerationConfig's defaults for missing keys.
pub fn from_generation_config(text: &str, seed: u64) -> Result<SamplingParams, String> {
    #[derive(serde::Deserialize)]
    struct GenerationConfig {
        do_sample: Option<bool>,
        temperature: Option<f32>,
        top_k: Option<usize>,
        top_p: Option<f32>,
        min_p: Option<f32>,
        repetition_penalty: Option<f32>,
    }
    let g: GenerationConfig =
        serde_json::from_str(text).map_err(|e| format!("not a valid generation config ({e})"))?;
    let repetition_penalty = g.repetition_penalty.unwrap_or(1.0);
    let base = SamplingParams {
        repetition_penalty,
        // transformers penalises every earlier token, prompt included.
        penalty_last_n: usize::MAX,
        seed,
        ..SamplingParams::greedy()
    };
    let temperature = g.temperature.unwrap_or(HF_TEMPERATURE);
    let p = match g.do_sample.unwrap_or(false) && temperature > 0.0 {
        false => base,
        true => SamplingParams {
            temperature,
            top_k: g.top_k.unwrap_or(HF_TOP_K),
            top_p: g.top_p.unwrap_or(HF_TOP_P),
            min_p: g.min_p.unwrap_or(0.0),
            ..base
        },
    };
    p.validate()?;
    Ok(p)
}

/// Ollama's reading: its defaults for missing sampling keys; penalties only when the layer
/// sets them (the sampler of Ollama's own engine, which runs Gemma 3, applies none).
pub fn from_ollama(o: &OllamaParams, seed: u64) -> Result<SamplingParams, String> {
    let penalty_last_n = match o.repeat_last_n {
        Some(n) if n < 0 => usize::MAX,
        Some(n) => n as usize,
        None => SamplingParams::greedy().penalty_last_n,
    };
    let p = SamplingParams {
        temperature: o.temperature.unwrap_or(OLLAMA_TEMPERATURE).max(0.0),
        top_k: o.top_k.unwrap_or(OLLAMA_TOP_K).max(0) as usize,
        top_p: o
            .top_p
            .unwrap_or(OLLAMA_TOP_P)
            .clamp(f32::MIN_POSITIVE, 1.0),
        min_p: o.min_p.unwrap_or(0.0).clamp(0.0, 1.0),
        repetition_penalty: o.repeat_penalty.unwrap_or(1.0),
        presence_penalty: o.presence_penalty.unwrap_or(0.0),
        frequency_penalty: o.frequency_penalty.unwrap_or(0.0),
        penalty_last_n,
        seed,
    };
    p.validate()?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_config_as_transformers_reads_it() {
        // Gemma 3's own file.
        let p = from_generation_config(
            r#"{"cache_implementation": "hybrid", "do_sample": true, "top_k": 64, "top_p": 0.95, "bos_token_id": 2}"#,
            7,
        )
        .unwrap();
        assert_eq!(
            (p.temperature, p.top_k, p.top_p, p.seed),
            (1.0, 64, 0.95, 7)
        );
        // No do_sample: greedy, as transformers decodes.
        let p = from_generation_config(r#"{"bos_token_id": 2, "temperature": 0.7}"#, 7).unwrap();
        assert_eq!(p.temperature, 0.0);
        // Sampling with transformers' defaults for what is missing.
        let p = from_generation_config(r#"{"do_sample": true, "temperature": 0.6}"#, 7).unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.6, 50, 1.0));
        assert!(from_generation_config("{", 7).is_err());
        let e = from_generation_config(r#"{"do_sample": true, "top_p": 0}"#, 7).unwrap_err();
        assert!(e.contains("top_p"), "{e}");
    }

    #[test]
    fn ollama_params_as_ollama_reads_them() {
        let o: OllamaParams = serde_json::from_str(
            r#"{"stop": ["<end_of_turn>"], "temperature": 1, "top_k": 64, "top_p": 0.95}"#,
        )
        .unwrap();
        let p = from_ollama(&o, 3).unwrap();
        assert_eq!(
            (p.temperature, p.top_k, p.top_p, p.repetition_penalty),
            (1.0, 64, 0.95, 1.0)
        );
        assert_eq!(o.stop, vec!["<end_of_turn>".to_string()]);
        let p = from_ollama(&OllamaParams::default(), 3).unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.8, 40, 0.9));
    }
}
