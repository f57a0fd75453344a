//! Writing GGUF files as llama.cpp's tools do: a Hugging Face checkpoint converted as
//! `convert_hf_to_gguf.py` writes Gemma 3, any model quantized as `llama-quantize` does, and
//! the mmproj file of a multimodal checkpoint's vision tower. The same plan quantizes a
//! checkpoint in memory when a model is opened with `--quantize`.
//!
//! It knows file formats, Gemma 3's tensor names and llama-quantize's rules (from the model
//! crate) and the tokenizer's metadata (from the text crate); it runs no model, finds no
//! model by name, and never prints (progress goes to a callback).

pub mod quantize;

pub use quantize::{mmproj_plan, write_atomically, write_gguf, Plan, Progress, QuantizeSummary};

/// What can go wrong converting or quantizing.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Model(#[from] gemma3_model::ModelError),
    #[error(transparent)]
    Format(#[from] gemma3_formats::FormatError),
    #[error(transparent)]
    Text(#[from] gemma3_text::TextError),
    #[error(transparent)]
    Tokenizer(#[from] gemma3_text::TokenizerError),
    /// An input that cannot be converted, or an output that cannot be written.
    #[error("{0}")]
    Load(String),
    /// The progress callback asked to stop.
    #[error("cancelled")]
    Cancelled,
}
