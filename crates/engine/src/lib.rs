//! Running a model: opening it (composing the hub, the model, the text crate and, for
//! `--quantize`, the converter), sequences and batched steps, the generation loop,
//! sampling, images into soft tokens, the defaults a model comes with, and the
//! [`scheduler`] that batches many callers' sequences together. This is the
//! library API:
//!
//! ```no_run
//! use gemma3_engine::{Model, GenerateOptions};
//! let model = Model::open_or_default(None)?;
//! let out = model.generate("The capital of France is", &GenerateOptions::default(), |piece| {
//!     print!("{piece}");
//!     true // keep going
//! })?;
//! println!("\n{} tokens at {:.1} tokens/s", out.tokens.len(), out.decode_tokens_per_s());
//! # Ok::<(), gemma3_engine::EngineError>(())
//! ```
//!
//! It knows nothing of HTTP, command lines or Python, and never prints: front ends (cli,
//! server, python) translate to and from it. What a name means, tokenizing, templates and
//! writing GGUF files live in the crates below (hub, text, convert); scoring benchmarks in
//! the eval crate above.

/// The README's library example, compiled as a doc test so that it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeExample;

pub mod chat;
pub mod constraint;
pub mod defaults;
pub mod draft;
pub mod draft_model;
pub mod generate;
pub mod image;
pub mod load;
pub mod multimodal;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod tools;

pub use constraint::Grammar;
pub use defaults::{SamplingDefaults, SamplingSource};
pub use draft::Lookup;
pub use draft_model::{Draft, DraftParams};
pub use generate::Generator;
pub use image::{Image, PanAndScan};
pub use load::{Model, ModelSource, OpenOptions};
pub use multimodal::{ImageTokens, ImageViews, PromptInputs};
pub use request::{GenerateOptions, Generation, StopReason};
pub use sampling::{Sampler, SamplingParams};
pub use sequence::{Batch, SeqImages, Sequence, TokenLogprob, Update};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] gemma3_model::ModelError),
    #[error(transparent)]
    Format(#[from] gemma3_formats::FormatError),
    #[error(transparent)]
    Tokenizer(#[from] gemma3_text::TokenizerError),
    /// A template that does not compile or rejects a conversation, a side file.
    #[error(transparent)]
    Text(#[from] gemma3_text::TextError),
    /// A model name that cannot be found, downloaded or read.
    #[error(transparent)]
    Hub(#[from] gemma3_hub::HubError),
    /// Quantizing at load (`--quantize`) failed.
    #[error(transparent)]
    Convert(#[from] gemma3_convert::ConvertError),
    /// A grammar or JSON schema that cannot constrain the output (named, with the reason).
    #[error("{0}")]
    Grammar(String),
    #[error("{0}")]
    Load(String),
    /// A draft model whose tokens are not the target's (named, with the first difference).
    #[error("{0}")]
    DraftIncompatible(String),
    #[error("{0}")]
    Input(String),
    /// An image that cannot be read or decoded.
    #[error("{0}")]
    BadImage(String),
    #[error("the prompt has {prompt} tokens and up to {max_new} new tokens were asked for: {} in all, more than the context of {context} tokens (the model allows up to {model_max}; raise the context size or ask for fewer new tokens)", prompt + max_new)]
    ContextOverflow {
        prompt: usize,
        max_new: usize,
        context: usize,
        model_max: usize,
    },
}
