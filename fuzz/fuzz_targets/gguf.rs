//! GGUF bytes: the header parse, every tensor's data view, dequantization of the small
//! ones, and what the layers above read from the metadata (text and vision configs, the
//! tokenizer). Any input may be rejected; none may panic, hang or allocate without bound.
#![no_main]

use gemma3_formats::GgufFile;
use gemma3_model::{TextConfig, VisionConfig};
use gemma3_text::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

/// Tensors up to this many values are dequantized (the rest only get their data view).
const MAX_DEQUANT_VALUES: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    for (key, value) in &g.metadata {
        let _ = (key.len(), value.summary());
    }
    for info in &g.tensors {
        let Ok(t) = g.tensor_from_info(info) else {
            continue;
        };
        assert_eq!(t.bytes().len() as u64, info.size, "{}", info.name);
        if t.numel() <= MAX_DEQUANT_VALUES {
            let values = t.to_f32();
            assert_eq!(values.len(), t.numel());
            if t.rows() > 0 {
                let _ = t.row(t.rows() - 1);
            }
        }
    }
    let _ = TextConfig::from_gguf(&g);
    let _ = VisionConfig::from_gguf(&g);
    if let Ok(tok) = Tokenizer::from_gguf(&g) {
        let ids = tok.encode("Hello <start_of_turn>world\n", true, true);
        let _ = tok.decode(&ids, false);
    }
});
