//! Where models come from: what a model name means (a path, a Hugging Face repo id in the
//! hub cache or downloaded into it, an Ollama name, or nothing for the default model), the
//! files it stands for (the model, an mmproj beside it, Ollama's template and parameters
//! layers), and the sampling a model's files suggest.
//!
//! It returns paths and facts; it opens no model, knows nothing of weights, tokenizers or
//! running a model, and never prints (download progress goes to a callback).

pub mod default_model;
pub mod defaults;
pub mod download;
pub mod hub;
pub mod ollama;
pub mod resolve;

pub use default_model::{cached_default_model, default_model_path, DEFAULT_MODEL_PACKAGE};
pub use defaults::SuggestedSampling;
pub use download::{DownloadEvent, ProgressFn};
pub use hub::HubConfig;
pub use resolve::{resolve, Locations, ResolveOptions, Resolved, SourceKind};

/// What can go wrong finding a model.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Format(#[from] gemma3_formats::FormatError),
    /// A path, cache entry or store file that cannot be used (named in the message).
    #[error("{0}")]
    Load(String),
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
}
