//! Which type each Gemma 3 tensor gets in a quantized file: llama.cpp's file types ("Q4_K_M"
//! …) and the per-tensor rules of its quantizer (`llama_tensor_get_type`) as they apply to
//! Gemma 3, learned from how llama-quantize behaves. These rules are knowledge about GGUF
//! tensor names and layer counts, so they live beside the weight names.
//!
//! - Only weight matrices are quantized: 1-D tensors and `*_norm.weight` stay as they are.
//! - The output projection (for Gemma 3, the tied `token_embd.weight`) gets Q6_K, or Q8_0 when
//!   its rows are not whole blocks of the file's base type.
//! - Q4_K_M / Q5_K_M raise `attn_v` and `ffn_down` to Q6_K in the layers `use_more_bits`
//!   picks (the first and last eighth, and every third in between); Q4_K_S raises the first
//!   four layers' `attn_v` and the first eighth's `ffn_down` to Q5_K.
//! - A K-quant needs rows of 256 values: otherwise Q4_K falls back to Q5_0, Q5_K to Q5_1,
//!   Q6_K to Q8_0 (and those to F16 if even 32 does not divide the row).

use crate::ModelError;
use gemma3_formats::DType;
use std::fmt;
use std::str::FromStr;

/// A llama.cpp file type: the base type of a file plus its mix rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q6_K,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
}

impl FileType {
    pub const ALL: [FileType; 13] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q8_0,
        FileType::Q4_0,
        FileType::Q4_1,
        FileType::Q5_0,
        FileType::Q5_1,
        FileType::Q6_K,
        FileType::Q4_K_S,
        FileType::Q4_K_M,
        FileType::Q5_K_S,
        FileType::Q5_K_M,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "F32",
            FileType::F16 => "F16",
            FileType::BF16 => "BF16",
            FileType::Q8_0 => "Q8_0",
            FileType::Q4_0 => "Q4_0",
            FileType::Q4_1 => "Q4_1",
            FileType::Q5_0 => "Q5_0",
            FileType::Q5_1 => "Q5_1",
            FileType::Q6_K => "Q6_K",
            FileType::Q4_K_S => "Q4_K_S",
            FileType::Q4_K_M => "Q4_K_M",
            FileType::Q5_K_S => "Q5_K_S",
            FileType::Q5_K_M => "Q5_K_M",
        }
    }

    /// llama.cpp's `llama_ftype` number, stored as `general.file_type`.
    pub fn ggml_ftype(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q4_K_S => 14,
            FileType::Q4_K_M => 15,
            FileType::Q5_K_S => 16,
            FileType::Q5_K_M => 17,
            FileType::Q6_K => 18,
            FileType::BF16 => 32,
        }
    }

    /// The type most tensors get.
    pub fn base_type(self) -> DType {
        match self {
            FileType::F32 => DType::F32,
            FileType::F16 => DType::F16,
            FileType::BF16 => DType::BF16,
            FileType::Q8_0 => DType::Q8_0,
            FileType::Q4_0 => DType::Q4_0,
            FileType::Q4_1 => DType::Q4_1,
            FileType::Q5_0 => DType::Q5_0,
            FileType::Q5_1 => DType::Q5_1,
            FileType::Q6_K => DType::Q6_K,
            FileType::Q4_K_S | FileType::Q4_K_M => DType::Q4_K,
            FileType::Q5_K_S | FileType::Q5_K_M => DType::Q5_K,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.base_type().is_quantized()
    }
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FileType {
    type Err = ModelError;
    /// Case-insensitive: `q4_k_m`, `Q4_K_M`.
    fn from_str(s: &str) -> Result<Self, ModelError> {
        FileType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let names: Vec<&str> = FileType::ALL.iter().map(|t| t.name()).collect();
                ModelError::Config(format!(
                    "unknown quantization type {s:?}; choose one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// What the rules need to know about the model.
#[derive(Clone, Copy, Debug)]
pub struct ModelShape {
    pub num_layers: usize,
    /// Whether a separate `output.weight` exists (Gemma 3 ties it to the embedding).
    pub has_output: bool,
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third
/// layer in between.
fn use_more_bits(layer: usize, n: usize) -> bool {
    let (l, n) = (layer as i64, n as i64);
    l < n / 8 || l >= 7 * n / 8 || (l - n / 8) % 3 == 2
}

/// The layer number of a `blk.N.*` name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Whether a tensor is quantized at all (llama-quantize keeps the others as they are).
pub fn is_quantizable(name: &str, shape: &[usize]) -> bool {
    name.ends_with("weight")
        && shape.len() >= 2
        && !name.contains("_norm.weight")
        && !name.contains(".position_embd.")
}

/// The type tensor `name` (GGUF name, `shape` outermost first) gets in a file of type
/// `ftype`, or `None` when it is kept as stored. An error when no type fits its rows.
pub fn tensor_type(
    ftype: FileType,
    name: &str,
    shape: &[usize],
    model: ModelShape,
) -> Result<Option<DType>, ModelError> {
    if !is_quantizable(name, shape) {
        return Ok(None);
    }
    let base = ftype.base_type();
    if !ftype.is_quantized() {
        return Ok(Some(base));
    }
    let cols = *shape.last().unwrap_or(&1);
    let fits = |t: DType| cols.is_multiple_of(t.block_elems());
    let is_output = name == "output.weight" || (!model.has_output && name == "token_embd.weight");
    let layer = layer_of(name);
    let n = model.num_layers;
    let mut t = base;
    if is_output {
        if !fits(base) {
            t = DType::Q8_0;
        } else if base != DType::Q8_0 {
            t = DType::Q6_K;
        }
    } else if name.contains("attn_v.weight") {
        let i = layer.unwrap_or(0);
        if matches!(ftype, FileType::Q4_K_M | FileType::Q5_K_M) && use_more_bits(i, n) {
            t = DType::Q6_K;
        } else if ftype == FileType::Q4_K_S && i < 4 {
            t = DType::Q5_K;
        }
    } else if name.contains("ffn_down") {
        let i = layer.unwrap_or(0);
        if matches!(ftype, FileType::Q4_K_M | FileType::Q5_K_M) && use_more_bits(i, n) {
            t = DType::Q6_K;
        } else if ftype == FileType::Q4_K_S && i < n / 8 {
            t = DType::Q5_K;
        }
    }
    if !fits(t) {
        t = match t {
            DType::Q4_K => DType::Q5_0,
            DType::Q5_K => DType::Q5_1,
            DType::Q6_K => DType::Q8_0,
            other => {
                return Err(ModelError::Weights(format!(
                    "{name}: rows of {cols} values cannot be stored as {other} (blocks of {})",
                    other.block_elems()
                )))
            }
        };
        if !fits(t) {
            t = DType::F16;
        }
    }
    Ok(Some(t))
}

/// llama-quantize's tensor order: tensors outside the blocks first, then block by block
/// (numerically), by name within each.
pub fn quantize_order(a: &str, b: &str) -> std::cmp::Ordering {
    let la = layer_of(a).map_or(-1, |l| l as i64);
    let lb = layer_of(b).map_or(-1, |l| l as i64);
    la.cmp(&lb).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real Gemma 3 270M Q4_K_M file (640-wide rows, 18 layers) has these types.
    #[test]
    fn gemma3_270m_q4_k_m_types() {
        let m = ModelShape {
            num_layers: 18,
            has_output: false,
        };
        let ty =
            |name: &str, shape: &[usize]| tensor_type(FileType::Q4_K_M, name, shape, m).unwrap();
        assert_eq!(ty("token_embd.weight", &[262144, 640]), Some(DType::Q8_0));
        assert_eq!(ty("blk.0.attn_q.weight", &[1024, 640]), Some(DType::Q5_0));
        assert_eq!(
            ty("blk.0.attn_output.weight", &[640, 1024]),
            Some(DType::Q4_K)
        );
        assert_eq!(ty("blk.0.ffn_down.weight", &[640, 2048]), Some(DType::Q6_K));
        assert_eq!(ty("blk.2.ffn_down.weight", &[640, 2048]), Some(DType::Q4_K));
        assert_eq!(ty("blk.0.attn_v.weight", &[256, 640]), Some(DType::Q8_0));
        assert_eq!(ty("blk.3.attn_v.weight", &[256, 640]), Some(DType::Q5_0));
        assert_eq!(ty("blk.0.attn_norm.weight", &[640]), None);
        let more: Vec<usize> = (0..18).filter(|&i| use_more_bits(i, 18)).collect();
        assert_eq!(more, [0, 1, 4, 7, 10, 13, 15, 16, 17]);
    }

    #[test]
    fn names_parse_case_insensitively() {
        assert_eq!("q4_k_m".parse::<FileType>().unwrap(), FileType::Q4_K_M);
        let e = "Q3_K".parse::<FileType>().unwrap_err().to_string();
        assert!(e.contains("Q4_K_M"), "{e}");
    }
}
