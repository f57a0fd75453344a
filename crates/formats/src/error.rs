use std::path::PathBuf;

/// Everything that can be wrong with a model file. Messages name the file, tensor or field.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot read {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: not a GGUF file (magic bytes are {magic:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, magic: [u8; 4] },
    #[error("{path}: GGUF version {version} is not supported (versions 2 and 3 are)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: file is truncated: {what} needs bytes up to offset {needed}, but the file has {len}")]
    Truncated {
        path: PathBuf,
        what: String,
        needed: u64,
        len: u64,
    },
    #[error("{path}: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("tensor {name}: {what}")]
    Tensor { name: String, what: String },
    #[error("{}: larger than the limit of {}", path.display(), crate::text::show_bytes(*limit))]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, FormatError>;
