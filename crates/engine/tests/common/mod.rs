//! Shared by the engine's and the eval crate's tests: where `../shared` is, and the real model.

#![allow(dead_code)]

use gemma3_engine::Model;
use std::path::PathBuf;

pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

/// The default 270M model, opened fresh (fetched by `scripts/fetch-model.sh`).
pub fn open_real_model() -> Model {
    let p = gemma3_hub::cached_default_model().unwrap_or_else(|| {
        panic!("the real model is missing: run scripts/fetch-model.sh (or set GEMMA3_MODEL)")
    });
    Model::open(&p)
        .unwrap_or_else(|e| panic!("opening {}: {e} (run scripts/fetch-model.sh)", p.display()))
}

/// Runs `cases` (prompt, options) together in one batch until every sequence ends: each
/// with a cache of `ctx` positions, prompts advancing `prefill` tokens a pass beside the
/// others' decodes.
pub fn run_batched<P: AsRef<str>>(
    m: &Model,
    cases: &[(P, gemma3_engine::GenerateOptions)],
    ctx: usize,
    prefill: usize,
) -> Vec<gemma3_engine::Sequence> {
    let mut seqs: Vec<gemma3_engine::Sequence> = cases
        .iter()
        .map(|(p, o)| {
            let ids = m.encode_prompt(p.as_ref(), None, true);
            let cache = gemma3_model::KvCache::new(&m.text.cfg, ctx, gemma3_model::MAX_BATCH);
            gemma3_engine::Sequence::new(m, ids, None, o, cache, vec![]).unwrap()
        })
        .collect();
    let mut batch = gemma3_engine::Batch::new(m, prefill);
    loop {
        let mut live: Vec<&mut gemma3_engine::Sequence> =
            seqs.iter_mut().filter(|s| !s.is_finished()).collect();
        if live.is_empty() {
            return seqs;
        }
        batch.step(m, &mut live).unwrap();
    }
}
