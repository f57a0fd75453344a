//! tokenizer.json (and tokenizer_config.json) text: the parse into a tokenizer, then a
//! short encode/decode with whatever tokenizer results. The input is tokenizer.json, or
//! tokenizer.json and tokenizer_config.json separated by a NUL byte.
#![no_main]

use gemma3_text::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let (json, config) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Ok(json) = std::str::from_utf8(json) else {
        return;
    };
    let config = match config.map(std::str::from_utf8) {
        Some(Err(_)) => return,
        Some(Ok(c)) => Some(c),
        None => None,
    };
    let Ok(tok) = Tokenizer::from_tokenizer_json_str(json, config, Path::new("tokenizer.json"))
    else {
        return;
    };
    for text in ["Hello world", " a  b\n\tc <bos>é🦀", ""] {
        let ids = tok.encode(text, true, true);
        let _ = tok.decode(&ids, false);
        let _ = tok.decode(&ids, true);
    }
    let all: Vec<u32> = (0..tok.vocab_size() as u32).take(1 << 12).collect();
    let _ = tok.decode(&all, false);
});
