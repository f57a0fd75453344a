//! Everything around the forward pass: tokenizer, sampling, the generation loop,
//! perplexity, and model loading. This is the library API:
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

pub mod eval;
pub mod generate;
pub mod image;
pub mod load;
pub mod multimodal;
pub mod perplexity;
pub mod quantize;
pub mod sampling;
pub mod tokenizer;

pub use gemma3_model::FileType;
pub use generate::{GenerateOptions, Generation, Generator, StopReason};
pub use image::{Image, PanAndScan};
pub use load::{Model, ModelSource, OpenOptions};
pub use multimodal::{ImageTokens, ImageViews};
pub use sampling::{Sampler, SamplingParams};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] gemma3_model::ModelError),
    #[error(transparent)]
    Format(#[from] gemma3_formats::FormatError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error("{0}")]
    Load(String),
    #[error("{0}")]
    Input(String),
    #[error("cancelled")]
    Cancelled,
}
