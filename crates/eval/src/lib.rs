//! Measuring a model: benchmark tasks scored by log-likelihood as lm-evaluation-harness
//! scores them (HellaSwag, PIQA, ARC, BoolQ, WinoGrande, LAMBADA), and perplexity as
//! llama.cpp's `llama-perplexity` computes it.
//!
//! It runs models only through the engine's public API (an opened `Model`, its tokenizer
//! and decoder); it knows nothing of where models come from, of servers or of any front
//! end, and never prints (results and progress go to callbacks).

pub mod eval;
pub mod perplexity;

pub use eval::{EvalOptions, Item, ItemResult, Task};
pub use perplexity::{perplexity, PerplexityResult};

/// What can go wrong measuring a model.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Engine(#[from] gemma3_engine::EngineError),
    #[error(transparent)]
    Model(#[from] gemma3_model::ModelError),
    #[error(transparent)]
    Format(#[from] gemma3_formats::FormatError),
    /// Data, options or a request that cannot be scored (named in the message).
    #[error("{0}")]
    Input(String),
}
