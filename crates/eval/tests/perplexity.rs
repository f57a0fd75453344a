//! Perplexity on the real Gemma 3 270M Q4_K_M against llama.cpp's `llama-perplexity`
//! (../shared/reference/llamacpp), with each KV cache type.

use gemma3_engine::Model;
use gemma3_eval::{perplexity, PerplexityResult};
use std::sync::OnceLock;

#[path = "../../engine/tests/common/mod.rs"]
mod common;
use common::{open_real_model, shared};

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(open_real_model)
}

fn gpl_text() -> String {
    std::fs::read_to_string(shared().join("reference/gpl-3.txt")).unwrap()
}

/// The perplexity of the GPL text in 512-token chunks with the default (f16) cache, which
/// both tests need: computed once.
fn default_cache_perplexity() -> &'static PerplexityResult {
    static P: OnceLock<PerplexityResult> = OnceLock::new();
    P.get_or_init(|| {
        let m = model();
        assert_eq!(
            m.text.kv_types(),
            gemma3_model::KvTypes::F16,
            "the default cache"
        );
        let tokens = m.tokenizer.encode(&gpl_text(), true, false);
        assert_eq!(tokens.len(), 7563, "llama.cpp counts 7563 tokens with BOS");
        perplexity(m, &tokens, 512, |_, _, _| {}).unwrap()
    })
}

#[test]
fn perplexity_matches_llamacpp() {
    let r = default_cache_perplexity();
    assert_eq!(r.chunks, 14);
    assert_eq!(r.scored_tokens, 3570);
    let rel = (r.ppl - 13.8920).abs() / 13.8920;
    eprintln!(
        "perplexity {:.4} (llama.cpp 13.8920), {:.2}% apart",
        r.ppl,
        rel * 100.0
    );
    assert!(
        rel < 0.01,
        "perplexity {} is {:.2}% from 13.892",
        r.ppl,
        rel * 100.0
    );
}

#[test]
fn perplexity_with_each_cache_type_stays_close_to_f32() {
    // The default f16 cache within 0.1% of an f32 one (in the fast precision keys and values
    // are f16 values anyway, so they agree exactly), q8_0 within 0.5%.
    use gemma3_model::KvTypes;
    let mut m = open_real_model();
    let tokens = m.tokenizer.encode(&gpl_text(), true, false);
    let ppl = |t: gemma3_formats::DType, m: &mut Model| {
        m.set_cache_types(KvTypes { k: t, v: t }).unwrap();
        perplexity(m, &tokens, 512, |_, _, _| {}).unwrap().ppl
    };
    let f32_ppl = ppl(gemma3_formats::DType::F32, &mut m);
    let f16_ppl = default_cache_perplexity().ppl;
    let q8_ppl = ppl(gemma3_formats::DType::Q8_0, &mut m);
    let rel = |x: f64| (x - f32_ppl).abs() / f32_ppl;
    eprintln!("perplexity f32 {f32_ppl:.4}, f16 {f16_ppl:.4}, q8_0 {q8_ppl:.4}");
    assert!(rel(f16_ppl) < 0.001, "f16 {f16_ppl} vs f32 {f32_ppl}");
    assert!(rel(q8_ppl) < 0.005, "q8_0 {q8_ppl} vs f32 {f32_ppl}");
    assert!(q8_ppl != f32_ppl, "q8_0 changed nothing: is the type used?");
}
