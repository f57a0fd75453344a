//! Encode and decode on arbitrary input with real tokenizers, loaded once: the SentencePiece
//! vocabulary of a GGUF (the quantize fixture's, or `GEMMA3_FUZZ_GGUF`) and the BPE
//! tokenizer.json of the same fixture. The first input byte picks the tokenizer and the
//! mode; the rest is text (encode) or token ids (decode).
//!
//! Invariants checked (they are the tokenizer's documented behaviour, tested on the real
//! vocabulary in crates/engine/tests/tokenizer.rs):
//! - every id `encode` returns is in the vocabulary, BOS first when asked for;
//! - `decode(encode(s), keep specials) == s` for text without `▁` (decoding turns it into a
//!   space, as SentencePiece does) when no id is an unknown, unused or undefined token
//!   (those render as nothing or as `<unk>`) and the tokenizer adds no space prefix. A space
//!   must have `▁` in the vocabulary: otherwise its escape falls back to the three bytes of
//!   `▁`, which decode to `▁` (as in llama.cpp; the small fixture vocabularies lack it);
//! - streaming decode (`StreamDecoder`) gives exactly `decode(ids, skip specials)`.
#![no_main]

use gemma3_formats::GgufFile;
use gemma3_text::tokenizer::{StreamDecoder, TokenType, Tokenizer};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

const SPACE_ESCAPE: char = '\u{2581}';

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/quantize")
        .join(rel)
}

fn tokenizers() -> &'static [Tokenizer; 2] {
    static TOKENIZERS: OnceLock<[Tokenizer; 2]> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let gguf = std::env::var_os("GEMMA3_FUZZ_GGUF")
            .map(PathBuf::from)
            .unwrap_or_else(|| fixture("model-Q8_0.gguf"));
        let g = GgufFile::open(&gguf).unwrap_or_else(|e| panic!("fuzz setup: {e}"));
        let spm = Tokenizer::from_gguf(&g).unwrap_or_else(|e| panic!("fuzz setup: {e}"));
        let bpe = Tokenizer::from_tokenizer_json(&fixture("hf"))
            .unwrap_or_else(|e| panic!("fuzz setup: {e}"));
        [spm, bpe]
    })
}

fn check_encode(tok: &Tokenizer, text: &str, add_bos: bool, parse_special: bool) {
    let ids = tok.encode(text, add_bos, parse_special);
    let n = tok.vocab_size() as u32;
    assert!(ids.iter().all(|&id| id < n), "id outside the vocabulary");
    if add_bos {
        assert_eq!(ids.first(), Some(&tok.bos_id()));
    }
    let body = if add_bos { &ids[1..] } else { &ids[..] };
    let lossless = !tok.add_space_prefix()
        && !text.contains(SPACE_ESCAPE)
        && (tok.token_to_id(&SPACE_ESCAPE.to_string()).is_some() || !text.contains(' '))
        && body.iter().all(|&id| {
            !matches!(
                tok.token_type(id),
                Some(TokenType::Unknown | TokenType::Unused | TokenType::Undefined) | None
            )
        });
    if lossless {
        assert_eq!(tok.decode(body, false), text, "ids {body:?}");
    }
    check_stream(tok, &ids);
}

fn check_stream(tok: &Tokenizer, ids: &[u32]) {
    let mut stream = StreamDecoder::new();
    let mut streamed: String = ids.iter().map(|&id| stream.push(tok, id)).collect();
    streamed.push_str(&stream.flush());
    if !tok.add_space_prefix() {
        assert_eq!(streamed, tok.decode(ids, true), "ids {ids:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tok = &tokenizers()[(mode & 1) as usize];
    if mode & 2 == 0 {
        let text = String::from_utf8_lossy(rest);
        check_encode(tok, &text, mode & 4 != 0, mode & 8 != 0);
    } else {
        // Ids a little past the vocabulary too: decoding must ignore those.
        let span = tok.vocab_size() as u32 + 16;
        let ids: Vec<u32> = rest
            .chunks(2)
            .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
            .map(|x| if mode & 4 != 0 { x } else { x % span })
            .collect();
        let _ = tok.decode(&ids, mode & 8 != 0);
        check_stream(tok, &ids);
    }
});
