//! The sampling a model's users expect when they ask for nothing: what its files suggest
//! (`generation_config.json` as transformers reads it, or Ollama's parameters layer as
//! Ollama reads it; see `gemma3_hub::defaults`), else Gemma 3's published settings
//! (temperature 1, top-k 64, top-p 0.95); and the context and token limit Ollama's
//! parameters set.

use crate::load::{Model, ModelSource};
use crate::{EngineError, SamplingParams};
use gemma3_hub::defaults::{self, SuggestedSampling};
use gemma3_hub::ollama::OllamaParams;
use std::path::{Path, PathBuf};

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

/// The sampler's settings for what a model's files suggest, with `seed` (checked).
pub fn suggested(s: &SuggestedSampling, seed: u64) -> Result<SamplingParams, String> {
    let p = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        penalty_last_n: s
            .penalty_last_n
            .unwrap_or(SamplingParams::greedy().penalty_last_n),
        seed,
    };
    p.validate()?;
    Ok(p)
}

impl Model {
    /// The sampling this model's users expect by default, with `seed`.
    pub fn default_sampling(&self, seed: u64) -> Result<SamplingDefaults, EngineError> {
        if let Some(path) = self.generation_config() {
            let text = gemma3_formats::read_text(&path, gemma3_formats::MAX_TEXT_BYTES)?;
            return Ok(SamplingDefaults {
                params: defaults::from_generation_config(&text)
                    .and_then(|s| suggested(&s, seed))
                    .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?,
                source: SamplingSource::GenerationConfig(path),
            });
        }
        if let Some(o) = self.origin.as_ref().and_then(|r| r.ollama.as_ref()) {
            if let Some(p) = &o.params {
                return Ok(SamplingDefaults {
                    params: suggested(&defaults::from_ollama(p), seed).map_err(|e| {
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
    fn ollama_params(&self) -> Option<&OllamaParams> {
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
        defaults::generation_config(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_become_checked_settings() {
        let s =
            defaults::from_generation_config(r#"{"do_sample": true, "top_k": 64, "top_p": 0.95}"#)
                .unwrap();
        let p = suggested(&s, 7).unwrap();
        assert_eq!(
            (p.temperature, p.top_k, p.top_p, p.seed),
            (1.0, 64, 0.95, 7)
        );
        let g = suggested(&defaults::from_generation_config("{}").unwrap(), 7).unwrap();
        assert_eq!((g.temperature, g.penalty_last_n), (0.0, usize::MAX));
        let o = suggested(&defaults::from_ollama(&OllamaParams::default()), 3).unwrap();
        assert_eq!(o.penalty_last_n, SamplingParams::greedy().penalty_last_n);
        let bad = defaults::from_generation_config(r#"{"do_sample": true, "top_p": 0}"#).unwrap();
        let e = suggested(&bad, 7).unwrap_err();
        assert!(e.contains("top_p"), "{e}");
    }
}
