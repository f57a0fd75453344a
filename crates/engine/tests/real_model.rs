//! The real Gemma 3 270M Q4_K_M against llama.cpp (../shared/reference/llamacpp): teacher-
//! forced argmax agreement and greedy generation (perplexity: the eval crate's tests).

use gemma3_engine::{GenerateOptions, Model};
use gemma3_model::{KvCache, Logits, Workspace};
use std::sync::OnceLock;

mod common;
use common::{open_real_model, shared};

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(open_real_model)
}

/// The model multiplying in f32, as transformers does.
fn exact_model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let mut m = open_real_model();
        m.set_precision(gemma3_model::Precision::Exact);
        m
    })
}

fn greedy_cases() -> Vec<serde_json::Value> {
    std::fs::read_to_string(shared().join("reference/llamacpp/greedy.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn teacher_forced_argmax_matches_llamacpp() {
    let m = model();
    let mut ws = Workspace::new(&m.text.cfg, 128);
    let (mut agree, mut total) = (0, 0);
    for case in greedy_cases() {
        let prompt = ids(&case["prompt_token_ids"]);
        let out = ids(&case["output_token_ids"]);
        let mut seq = prompt.clone();
        seq.extend(&out);
        let mut cache = KvCache::new(&m.text.cfg, seq.len(), 128);
        let rows: Vec<usize> = (prompt.len() - 1..seq.len() - 1).collect();
        let mut case_agree = 0;
        m.text
            .forward(
                &seq,
                &mut cache,
                &mut ws,
                Logits::Rows(&rows),
                &mut |r, l| {
                    let next = gemma3_engine::sampling::argmax(l);
                    if next == seq[r + 1] {
                        case_agree += 1;
                    }
                },
            )
            .unwrap();
        eprintln!(
            "{:?}: {case_agree}/{} positions agree",
            case["prompt"],
            out.len()
        );
        agree += case_agree;
        total += out.len();
    }
    let frac = agree as f64 / total as f64;
    assert!(frac >= 0.95, "argmax agreement {agree}/{total} = {frac:.3}");
}

/// llama.cpp's greedy tokens are not reproducible where two tokens are nearly tied: its
/// 8-bit activations, f16 cache and repacked kernels round differently from ours. So: most
/// prompts must match exactly for 16 tokens, and every divergence must be a near-tie —
/// in our own logits on llama.cpp's prefix, its token is within 0.15 of our top-1.
#[test]
fn first_16_greedy_tokens_match_llamacpp() {
    let m = model();
    let mut exact = 0;
    let cases = greedy_cases();
    let mut ws = Workspace::new(&m.text.cfg, 64);
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        // Our tokenizer gives llama.cpp's prompt ids.
        let prompt_ids = ids(&case["prompt_token_ids"]);
        assert_eq!(
            m.encode_prompt(prompt, None, true),
            prompt_ids,
            "{prompt:?}"
        );
        let opts = GenerateOptions {
            max_new_tokens: 16,
            ..Default::default()
        };
        let g = m.generate(prompt, &opts, |_| true).unwrap();
        let want = &ids(&case["output_token_ids"])[..16];
        if g.tokens == want {
            exact += 1;
            continue;
        }
        let step = g
            .tokens
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(g.tokens.len());
        let mut prefix = prompt_ids.clone();
        prefix.extend(&want[..step]);
        let mut cache = KvCache::new(&m.text.cfg, prefix.len(), 64);
        let mut logits = vec![];
        m.text
            .forward(&prefix, &mut cache, &mut ws, Logits::Last, &mut |_, l| {
                logits = l.to_vec()
            })
            .unwrap();
        let top = logits[gemma3_engine::sampling::argmax(&logits) as usize];
        let gap = top - logits[want[step] as usize];
        eprintln!("{prompt:?}: diverges from llama.cpp at step {step}, a near-tie of {gap:.4}");
        assert!(
            gap < 0.15,
            "{prompt:?}: step {step}: llama.cpp's token is {gap} below our top-1"
        );
    }
    assert!(
        exact >= 3,
        "{exact} of {} prompts have identical first 16 tokens",
        cases.len()
    );
}

#[test]
fn greedy_text_streams_and_matches_transformers() {
    // transformers' 32-token continuation of "The capital of France is" (float32).
    let m = exact_model();
    let mut streamed = String::new();
    let opts = GenerateOptions {
        max_new_tokens: 32,
        ..Default::default()
    };
    let g = m
        .generate("The capital of France is", &opts, |p| {
            streamed.push_str(p);
            true
        })
        .unwrap();
    assert_eq!(streamed, g.text);
    assert_eq!(
        g.text,
        " the capital of the country of France. It is the largest city in France and the second largest city in Europe. It is located in the middle of the country"
    );
}

#[test]
fn stop_strings_and_seeded_sampling() {
    let m = model();
    let opts = GenerateOptions {
        max_new_tokens: 40,
        stop_strings: vec!["France.".into()],
        ..Default::default()
    };
    let g = m
        .generate("The capital of France is", &opts, |_| true)
        .unwrap();
    assert_eq!(g.text, " the capital of the country of ");
    assert_eq!(g.stop, gemma3_engine::StopReason::StopString);

    let sampled = |seed| {
        let opts = GenerateOptions {
            max_new_tokens: 12,
            sampling: gemma3_engine::SamplingParams::gemma_default(seed),
            ..Default::default()
        };
        m.generate("Once upon a time", &opts, |_| true)
            .unwrap()
            .tokens
    };
    assert_eq!(sampled(1), sampled(1));
    assert_ne!(sampled(1), sampled(2));
}

#[test]
fn prompt_longer_than_context_is_an_error() {
    let m = model();
    let opts = GenerateOptions {
        context: Some(8),
        ..Default::default()
    };
    let e = m
        .generate(
            "one two three four five six seven eight nine ten",
            &opts,
            |_| true,
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("more than the context of 8 tokens"), "{msg}");
    assert!(msg.contains("the prompt has 11 tokens"), "{msg}");
}

#[test]
fn a_shared_prefix_is_reused_and_gives_the_same_tokens() {
    let m = model();
    let opts = GenerateOptions {
        max_new_tokens: 8,
        ..Default::default()
    };
    let mut g = gemma3_engine::Generator::new(m, 256);
    let first = m.encode_prompt("The capital of France is", None, true);
    let a = g.generate_ids(&first, &opts, |_| true).unwrap();
    assert_eq!(a.reused_tokens, 0);
    // The same prompt again: all but its last token come from the cache.
    let b = g.generate_ids(&first, &opts, |_| true).unwrap();
    assert_eq!(b.reused_tokens, first.len() - 1);
    assert_eq!(a.tokens, b.tokens);
    // A continuation of the first exchange reuses prompt + generated tokens.
    let mut longer = first.clone();
    longer.extend(&a.tokens);
    longer.extend(m.encode_prompt(" Its population is", Some(false), true));
    let c = g.generate_ids(&longer, &opts, |_| true).unwrap();
    assert!(
        c.reused_tokens >= first.len() + a.tokens.len() - 1,
        "reused {}",
        c.reused_tokens
    );
    let fresh = gemma3_engine::Generator::new(m, 256)
        .generate_ids(&longer, &opts, |_| true)
        .unwrap()
        .tokens;
    assert_eq!(c.tokens, fresh);
}

#[test]
fn sequences_batched_together_give_their_solo_tokens() {
    // Greedy and seeded sampling, stop strings and prompts of different lengths: each
    // sequence stepped among the others gives exactly what it gives alone.
    use gemma3_engine::SamplingParams;
    let m = model();
    let cases: Vec<(&str, GenerateOptions)> = vec![
        (
            "The capital of France is",
            GenerateOptions {
                max_new_tokens: 12,
                ..Default::default()
            },
        ),
        (
            "Once upon a time, in a land far away, there lived a king who had three daughters. The eldest",
            GenerateOptions {
                max_new_tokens: 20,
                sampling: SamplingParams::gemma_default(7),
                ..Default::default()
            },
        ),
        (
            "def fibonacci(n):",
            GenerateOptions {
                max_new_tokens: 16,
                stop_strings: vec!["return".into()],
                ..Default::default()
            },
        ),
        (
            "1, 2, 3, 4,",
            GenerateOptions {
                max_new_tokens: 9,
                sampling: SamplingParams::gemma_default(11),
                logprobs: Some(3),
                ..Default::default()
            },
        ),
    ];
    let solo: Vec<_> = cases
        .iter()
        .map(|(p, o)| m.generate(p, o, |_| true).unwrap())
        .collect();
    // A small prefill budget, so prompts advance in chunks beside the others' decodes.
    let seqs = common::run_batched(m, &cases, 256, 7);
    for (i, (s, want)) in seqs.iter().zip(&solo).enumerate() {
        let g = s.generation();
        assert_eq!(g.tokens, want.tokens, "case {i}");
        assert_eq!(g.text, want.text, "case {i}");
        assert_eq!(g.stop, want.stop, "case {i}");
    }
    let lp = seqs[3].logprobs();
    assert_eq!(lp.len(), seqs[3].generation().tokens.len());
    for l in lp {
        assert_eq!(l.top.len(), 3);
        assert!(l.logprob <= 0.0 && l.top[0].1 >= l.logprob);
    }
}

#[test]
fn keys_and_values_stay_within_f16_range() {
    // An f16 cache holds what an f32 one holds only if no key or value exceeds f16's
    // largest finite value (65504): measured in f32 over the first 1024 tokens of the GPL
    // text, every layer. (Gemma 3 270M: |k| stays under ~100, |v| under ~150.)
    let m = exact_model();
    let text = std::fs::read_to_string(shared().join("reference/gpl-3.txt")).unwrap();
    let ids = m.tokenizer.encode(&text, true, false);
    let ids = &ids[..1024];
    let mut cache = KvCache::new(&m.text.cfg, ids.len(), 512);
    let mut ws = Workspace::new(&m.text.cfg, 512);
    // The residual stream, for comparison (it is kept in f32 everywhere).
    let mut residual = 0f32;
    let mut trace = |s: gemma3_model::Stage, x: &[f32]| {
        if matches!(s, gemma3_model::Stage::Layer(_)) {
            residual = x.iter().fold(residual, |a, v| a.max(v.abs()));
        }
    };
    m.text
        .forward_traced(
            ids,
            &mut cache,
            &mut ws,
            Logits::None,
            &mut |_, _| {},
            Some(&mut trace),
        )
        .unwrap();
    let (mut k, mut v) = (0f32, 0f32);
    for (lk, lv) in cache.max_abs() {
        k = k.max(lk);
        v = v.max(lv);
    }
    eprintln!("max |k| {k:.1}, max |v| {v:.1}, max |residual| {residual:.1}");
    assert!(
        k < 65504.0 / 16.0 && v < 65504.0 / 16.0,
        "max |k| {k}, |v| {v}"
    );
}

#[test]
fn a_20k_token_prompt_at_32k_context_decodes_alike_with_f16_and_f32() {
    // A 20K-token prompt (the GPL text, repeated) at a 32K context: it fits, and the
    // first 32 greedy tokens with the f16 cache equal those with the f32 cache.
    use gemma3_model::KvTypes;
    let text = std::fs::read_to_string(shared().join("reference/gpl-3.txt")).unwrap();
    let mut m = open_real_model();
    let mut ids = m.tokenizer.encode(&text, true, false);
    let once = ids[1..].to_vec();
    while ids.len() < 20_000 {
        ids.extend_from_slice(&once);
    }
    ids.truncate(20_000);
    let opts = GenerateOptions {
        max_new_tokens: 32,
        ignore_eos: true,
        context: Some(32_768),
        ..Default::default()
    };
    let run = |t: gemma3_formats::DType, m: &mut Model| {
        m.set_cache_types(KvTypes { k: t, v: t }).unwrap();
        gemma3_engine::Generator::new(m, 32_768)
            .generate_ids(&ids, &opts, |_| true)
            .unwrap()
    };
    let a = run(gemma3_formats::DType::F16, &mut m);
    let b = run(gemma3_formats::DType::F32, &mut m);
    assert_eq!(a.prompt_tokens, 20_000);
    assert_eq!(a.tokens.len(), 32);
    assert_eq!(a.tokens, b.tokens, "f16 and f32 caches decode differently");
}
