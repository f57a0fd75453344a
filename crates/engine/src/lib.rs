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

pub mod chat;
pub mod defaults;
pub mod download;
pub mod eval;
pub mod generate;
pub mod hub;
pub mod image;
pub mod load;
pub mod multimodal;
pub mod ollama;
pub mod perplexity;
pub mod quantize;
pub mod resolve;
pub mod sampling;
pub mod sequence;
pub mod tokenizer;

pub use defaults::{SamplingDefaults, SamplingSource};
pub use download::{DownloadEvent, ProgressFn};
pub use gemma3_model::FileType;
pub use generate::{GenerateOptions, Generation, Generator, StopReason};
pub use image::{Image, PanAndScan};
pub use load::{Model, ModelSource, OpenOptions};
pub use multimodal::{ImageTokens, ImageViews};
pub use resolve::{Locations, Resolved, SourceKind};
pub use sampling::{Sampler, SamplingParams};
pub use sequence::{Batch, SeqImages, Sequence, TokenLogprob, Update};

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
    /// A model name that is not a file, not in a local store, and not on the hub.
    #[error("{0}")]
    NotFound(String),
    /// The hub refused a gated or private repo (HTTP 401/403).
    #[error("{repo} is gated or private (HTTP {status}): accept its license on {page} while logged in to Hugging Face, then {hint}")]
    Gated {
        repo: String,
        status: u16,
        page: String,
        hint: String,
    },
    /// A download was needed but `HF_HUB_OFFLINE` forbids it.
    #[error("{what} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set, so it cannot be downloaded{note}", cache.display())]
    Offline {
        what: String,
        cache: std::path::PathBuf,
        /// Where else it was looked for ("" or "; nor ...").
        note: String,
    },
    /// A download that failed (network, server, or a file that does not check out).
    #[error("{0}")]
    Download(String),
    #[error("cancelled")]
    Cancelled,
}
