//! A Hugging Face directory's files as bytes: a safetensors file (header and tensor views),
//! config.json (as the model layer reads it: text and vision configs) and the shard index.
//! The input goes to all three parsers, so one corpus grows inputs for each.
#![no_main]

use gemma3_formats::hf::{parse_config, safetensors_from_backing, shard_names};
use gemma3_model::{TextConfig, VisionConfig};
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::Arc;

/// Tensors up to this many values are converted to f32.
const MAX_CONVERT_VALUES: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    if let Ok(tensors) =
        safetensors_from_backing(Path::new("fuzz.safetensors"), Arc::new(data.to_vec()))
    {
        for t in &tensors {
            if t.numel() <= MAX_CONVERT_VALUES {
                assert_eq!(t.to_f32().len(), t.numel(), "{}", t.name);
            }
        }
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = parse_config(text, Path::new("config.json")) {
        let _ = TextConfig::from_hf_json(&config);
        let _ = VisionConfig::from_hf_json(&config);
    }
    if let Ok(shards) = shard_names(text, Path::new("model.safetensors.index.json")) {
        for s in shards {
            assert!(!s.contains('/') && !s.starts_with('.'), "{s:?}");
        }
    }
});
