//! Gemma 3 itself: configuration, weight binding by name (GGUF and Hugging Face layouts),
//! the text decoder and its KV cache, and the SigLIP vision tower with its projector. Entry
//! points: [`TextModel::forward`] (and `forward_with` for image rows), [`VisionTower::encode`].

pub mod cache;
pub mod config;
pub mod quantize;
pub mod text;
pub mod vision;
pub mod weights;

pub use cache::{KvCache, KvTypes, MAX_BATCH};
pub use config::{LayerKind, TextConfig};
pub use gemma3_kernels::Precision;
pub use quantize::FileType;
pub use text::{
    attention_mask, chunk_end, key_range, ImageInputs, Logits, OnLogits, OnStage, SeqChunk, Stage,
    TextModel, Workspace,
};
pub use vision::{VisionConfig, VisionTower};
pub use weights::{TextWeights, WeightSource};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Format(#[from] gemma3_formats::FormatError),
    #[error("config: {0}")]
    Config(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("input: {0}")]
    Input(String),
    #[error("{needed} tokens do not fit the context of {context} tokens")]
    ContextOverflow { needed: usize, context: usize },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfVocab { id: u32, vocab: usize },
}
