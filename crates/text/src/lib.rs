//! Text in and out of a Gemma 3 model: the tokenizer (SentencePiece from GGUF metadata, BPE
//! from `tokenizer.json`, streaming UTF-8 decode) and chat templates (the model's own Jinja
//! template or Gemma 3's built in).
//!
//! It knows the formats' metadata (a GGUF's `tokenizer.*` keys, a Hugging Face directory's
//! side files) and nothing of the model's weights, of running a model, of where models come
//! from, or of any front end.

pub mod chat;
pub mod tokenizer;

pub use chat::{ChatContent, ChatMessage, ChatPart, ChatTemplate, TemplateOrigin};
pub use tokenizer::{StreamDecoder, TokenType, Tokenizer, TokenizerError};

/// What can go wrong with text: a tokenizer that cannot be built, a template that does not
/// compile or rejects a conversation, a side file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Format(#[from] gemma3_formats::FormatError),
    /// A conversation or template the caller gave that cannot be rendered.
    #[error("{0}")]
    Input(String),
    /// A model's side file (e.g. `tokenizer_config.json`) that cannot be read.
    #[error("{0}")]
    Load(String),
}
