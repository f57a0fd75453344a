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
