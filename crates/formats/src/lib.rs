//! Reading model files: GGUF (metadata, tensor infos, memory-mapped data), safetensors and
//! Hugging Face directories, and the block layouts of ggml's quantized types with their
//! reference dequantization and quantization. Nothing here knows what Gemma is.

pub mod dtype;
pub mod error;
pub mod gguf;
pub mod hf;
pub mod quant;
pub mod quantize;
pub mod spill;
pub mod tensor;
pub mod text;

pub use dtype::DType;
pub use error::{FormatError, Result};
pub use gguf::{GgufFile, MetaValue};
pub use hf::HfDirectory;
pub use tensor::{Backing, Storage, TensorData};
pub use text::{read_bytes, read_text, read_text_from, MAX_TEXT_BYTES};
