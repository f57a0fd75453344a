//! The sampling a model comes with, read as each tool that wrote it reads it: a
//! `generation_config.json` as transformers reads it, an Ollama parameters layer as Ollama
//! reads it. Facts only: the engine turns them into its sampler's settings and fills in
//! Gemma 3's published settings when a model brings none.

use crate::hub::GENERATION_CONFIG;
use crate::ollama::OllamaParams;
use std::path::{Path, PathBuf};

/// transformers' GenerationConfig defaults for keys a generation_config.json leaves out.
const HF_TEMPERATURE: f32 = 1.0;
const HF_TOP_K: usize = 50;
const HF_TOP_P: f32 = 1.0;
/// Ollama's defaults (api.DefaultOptions) for keys a parameters layer leaves out.
const OLLAMA_TEMPERATURE: f32 = 0.8;
const OLLAMA_TOP_K: i64 = 40;
const OLLAMA_TOP_P: f32 = 0.9;

/// The sampling a model's files ask for. `temperature` 0 is greedy; `top_k` 0, `top_p`
/// 1, `min_p` 0 and penalties 1/0/0 are off; `penalty_last_n` `None` leaves the window
/// to the sampler's default.
#[derive(Clone, Debug, PartialEq)]
pub struct SuggestedSampling {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub penalty_last_n: Option<usize>,
}

impl SuggestedSampling {
    /// Greedy, no penalties.
    const GREEDY: SuggestedSampling = SuggestedSampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.0,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        penalty_last_n: None,
    };
}

/// The generation_config.json in a Hugging Face directory (or repo snapshot), if any.
pub fn generation_config(dir: &Path) -> Option<PathBuf> {
    Some(dir.join(GENERATION_CONFIG)).filter(|p| p.is_file())
}

/// transformers' reading: `do_sample` false or absent is greedy (repetition penalty still
/// applies, over the whole sequence); otherwise temperature, top-k and top-p with
/// GenerationConfig's defaults for missing keys.
pub fn from_generation_config(text: &str) -> Result<SuggestedSampling, String> {
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
    let base = SuggestedSampling {
        repetition_penalty: g.repetition_penalty.unwrap_or(1.0),
        // transformers penalises every earlier token, prompt included.
        penalty_last_n: Some(usize::MAX),
        ..SuggestedSampling::GREEDY
    };
    let temperature = g.temperature.unwrap_or(HF_TEMPERATURE);
    Ok(match g.do_sample.unwrap_or(false) && temperature > 0.0 {
        false => base,
        true => SuggestedSampling {
            temperature,
            top_k: g.top_k.unwrap_or(HF_TOP_K),
            top_p: g.top_p.unwrap_or(HF_TOP_P),
            min_p: g.min_p.unwrap_or(0.0),
            ..base
        },
    })
}

/// Ollama's reading: its defaults for missing sampling keys; penalties only when the layer
/// sets them (the sampler of Ollama's own engine, which runs Gemma 3, applies none).
pub fn from_ollama(o: &OllamaParams) -> SuggestedSampling {
    let penalty_last_n = o
        .repeat_last_n
        .map(|n| if n < 0 { usize::MAX } else { n as usize });
    SuggestedSampling {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_config_as_transformers_reads_it() {
        // Gemma 3's own file.
        let p = from_generation_config(
            r#"{"cache_implementation": "hybrid", "do_sample": true, "top_k": 64, "top_p": 0.95, "bos_token_id": 2}"#,
        )
        .unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p), (1.0, 64, 0.95));
        // No do_sample: greedy, as transformers decodes.
        let p = from_generation_config(r#"{"bos_token_id": 2, "temperature": 0.7}"#).unwrap();
        assert_eq!(p.temperature, 0.0);
        // Sampling with transformers' defaults for what is missing.
        let p = from_generation_config(r#"{"do_sample": true, "temperature": 0.6}"#).unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.6, 50, 1.0));
        assert!(from_generation_config("{").is_err());
    }

    #[test]
    fn ollama_params_as_ollama_reads_them() {
        let o: OllamaParams = serde_json::from_str(
            r#"{"stop": ["<end_of_turn>"], "temperature": 1, "top_k": 64, "top_p": 0.95}"#,
        )
        .unwrap();
        let p = from_ollama(&o);
        assert_eq!(
            (p.temperature, p.top_k, p.top_p, p.repetition_penalty),
            (1.0, 64, 0.95, 1.0)
        );
        assert_eq!(o.stop, vec!["<end_of_turn>".to_string()]);
        let p = from_ollama(&OllamaParams::default());
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.8, 40, 0.9));
    }
}
