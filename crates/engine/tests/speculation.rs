//! Speculative decoding by prompt lookup or by a draft model never changes the output: on
//! the real Gemma 3 270M, greedy and seeded (temperature 1) generations with lookup, and
//! drafted by the same model quantized to Q4_0 at load (other weights, so some guesses are
//! refused), equal those without,
//! token for token and in their ends, over plain, repetitive and window-wrapping prompts,
//! with stop strings, token limits, penalties, log-probabilities and a JSON schema; and a
//! batch of speculating sequences equals their solo plain runs. The repetitive prompts must
//! accept guesses (and the draft model refuse some), so the check is not vacuous.

use gemma3_engine::{
    Batch, Draft, DraftParams, GenerateOptions, Generation, Grammar, Lookup, Model, OpenOptions,
    SamplingParams, Sequence,
};
use gemma3_model::{FileType, KvCache};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

mod common;
use common::open_real_model;

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(open_real_model)
}

/// A text that repeats itself (prompt lookup's best case).
fn repetitive(i: usize) -> String {
    let line =
        format!("Item {i}: the quick brown fox jumps over the lazy dog near the river bank.\n");
    format!("Copy the list exactly.\n{}{}", line.repeat(6), &line[..20])
}

/// A prompt long enough that prompt + generation wraps the 512-token sliding window.
fn long_document() -> String {
    let mut s = String::from("Here is a long log file. Repeat its last lines.\n");
    for i in 0..25 {
        s.push_str(&format!(
            "2026-12-04 12:{:02}:00 INFO worker {} finished job {} in 3 seconds\n",
            i % 60,
            i % 4,
            1000 + i
        ));
    }
    s.push_str("2026-12-04 13:00:00 INFO worker");
    s
}

fn prompts() -> Vec<String> {
    let mut p: Vec<String> = vec![
        "Once upon a time".into(),
        "The capital of France is".into(),
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\ndef fibonacci(n):".into(),
        "one two three four five one two three four five one two three".into(),
        "<html><body><ul><li>a</li><li>b</li><li>c</li><li>".into(),
        long_document(),
    ];
    p.extend((0..4).map(repetitive));
    p
}

/// The real model quantized to Q4_0 at load, drafting for the Q4_K_M file.
fn draft() -> &'static Draft {
    static D: OnceLock<Draft> = OnceLock::new();
    D.get_or_init(|| {
        let path = gemma3_hub::cached_default_model().expect("the real model");
        let opts = OpenOptions {
            quantize: Some(FileType::Q4_0),
            offline: true,
            ..Default::default()
        };
        let d = Model::open_with(Some(path.to_str().unwrap()), &opts).unwrap();
        // Guessing every step: a draft as large as its target never pays, so the
        // adaptive length would rarely guess.
        let params = DraftParams {
            adaptive: false,
            max_draft: 6,
            ..Default::default()
        };
        Draft::new(model(), Arc::new(d), params).unwrap()
    })
}

/// The plain (not speculating) generation of a case, computed once for all the tests that
/// compare against it: the lock is held while it is computed, so concurrent tests wait for
/// it instead of repeating it.
fn plain(p: &str, o: &GenerateOptions) -> Generation {
    static PLAIN: OnceLock<Mutex<HashMap<String, Generation>>> = OnceLock::new();
    let mut done = PLAIN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    done.entry(format!("{p:?} {o:?}"))
        .or_insert_with(|| model().generate(p, o, |_| true).unwrap())
        .clone()
}

fn with_draft(o: &GenerateOptions) -> GenerateOptions {
    GenerateOptions {
        draft: Some(draft().clone()),
        ..o.clone()
    }
}

fn with_lookup(o: &GenerateOptions) -> GenerateOptions {
    GenerateOptions {
        lookup: Some(Lookup::default()),
        ..o.clone()
    }
}

fn cases() -> Vec<(String, GenerateOptions)> {
    let mut out = vec![];
    for (i, p) in prompts().into_iter().enumerate() {
        for seeded in [false, true] {
            let sampling = match seeded {
                false => SamplingParams::greedy(),
                true => SamplingParams {
                    temperature: 1.0,
                    seed: 7 + i as u64,
                    ..SamplingParams::gemma_default(7 + i as u64)
                },
            };
            out.push((
                p.clone(),
                GenerateOptions {
                    max_new_tokens: 48 + 5 * i,
                    sampling,
                    ..Default::default()
                },
            ));
        }
    }
    out
}

/// Every case, with stops, penalties, log-probabilities, a token limit of 3 and a JSON
/// schema on some.
fn all_cases() -> Vec<(String, GenerateOptions)> {
    let mut all = cases();
    // Stops, penalties and log-probabilities on some.
    all[0].1.stop_strings = vec![".".into()];
    all[3].1.sampling.repetition_penalty = 1.3;
    all[7].1.logprobs = Some(3);
    all[8].1.max_new_tokens = 3;
    all.push((
        repetitive(9),
        GenerateOptions {
            max_new_tokens: 40,
            constraint: Some(Grammar::JsonSchema(json!({"type": "object", "properties": {
                "items": {"type": "array", "items": {"type": "string", "maxLength": 80}, "maxItems": 3}},
                "required": ["items"]}))),
            ..Default::default()
        },
    ));
    assert!(all.len() >= 20);
    all
}

/// Each case generated plainly and speculating (`spec` sets how): the same tokens, text and
/// end. Returns the guesses drafted and accepted.
fn same_as_plain(spec: fn(&GenerateOptions) -> GenerateOptions) -> (usize, usize) {
    let m = model();
    let (mut drafted, mut accepted) = (0, 0);
    for (i, (p, o)) in all_cases().iter().enumerate() {
        let plain = plain(p, o);
        let spec = m.generate(p, &spec(o), |_| true).unwrap();
        assert_eq!(spec.tokens, plain.tokens, "case {i}: {p:?}");
        assert_eq!(spec.text, plain.text, "case {i}");
        assert_eq!(spec.stop, plain.stop, "case {i}");
        if o.logprobs.is_some() {
            assert!(spec.tokens.len() > 3);
        }
        drafted += spec.drafted;
        accepted += spec.accepted;
    }
    eprintln!("drafted {drafted}, accepted {accepted}");
    (drafted, accepted)
}

#[test]
fn lookup_gives_the_same_tokens_greedy_and_seeded() {
    let (drafted, accepted) = same_as_plain(with_lookup);
    assert!(
        accepted > 100,
        "lookup accepted only {accepted} of {drafted} guesses"
    );
}

#[test]
fn a_draft_model_gives_the_same_tokens_greedy_and_seeded() {
    let (drafted, accepted) = same_as_plain(with_draft);
    assert!(
        accepted > 200 && accepted < drafted,
        "the draft had {accepted} of {drafted} guesses accepted: both some and not all must be"
    );
}

#[test]
fn logprobs_are_the_same_with_lookup() {
    let m = model();
    let o = GenerateOptions {
        max_new_tokens: 30,
        logprobs: Some(2),
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    let ids = m.encode_prompt(&repetitive(1), None, true);
    let run = |o: &GenerateOptions| {
        let cache = KvCache::new(&m.text.cfg, 512, gemma3_model::MAX_BATCH);
        let mut s = Sequence::new(m, ids.clone(), None, o, cache, vec![]).unwrap();
        let mut b = Batch::new(m, 64);
        while !s.is_finished() {
            b.step(m, &mut [&mut s]).unwrap();
        }
        (
            s.generation().tokens.clone(),
            s.logprobs().to_vec(),
            s.generation().accepted,
        )
    };
    let (t0, l0, _) = run(&o);
    let (t1, l1, accepted) = run(&with_lookup(&o));
    assert_eq!(t0, t1);
    assert_eq!(l0, l1);
    assert!(accepted > 0);
}

#[test]
fn speculating_sequences_batched_together_give_their_solo_plain_tokens() {
    let m = model();
    let all = cases();
    let solo: Vec<_> = all.iter().map(|(p, o)| plain(p, o)).collect();
    // Half the sequences by prompt lookup, half by the draft model, some plain: the draft
    // passes run all drafting sequences together beside the others.
    let speculating: Vec<_> = all
        .iter()
        .enumerate()
        .map(|(i, (p, o))| {
            let o = match i % 3 {
                0 => with_lookup(o),
                1 => with_draft(o),
                _ => o.clone(),
            };
            (p, o)
        })
        .collect();
    let seqs = common::run_batched(m, &speculating, 2048, 96);
    let (mut by_lookup, mut by_draft) = (0, 0);
    for (i, (s, want)) in seqs.iter().zip(&solo).enumerate() {
        assert_eq!(s.generation().tokens, want.tokens, "case {i}");
        assert_eq!(s.generation().stop, want.stop, "case {i}");
        match i % 3 {
            0 => by_lookup += s.generation().accepted,
            1 => by_draft += s.generation().accepted,
            _ => assert_eq!(s.generation().drafted, 0),
        }
    }
    assert!(
        by_lookup > 20 && by_draft > 50,
        "accepted {by_lookup} by lookup, {by_draft} by the draft"
    );
}
