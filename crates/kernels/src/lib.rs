//! CPU math for gemma3: matrix products over every stored weight type, attention, RMSNorm,
//! RoPE, GELU and softmax. Hot loops are compiled several times for different instruction
//! sets and picked at run time (see [`simd`]); every path is checked against the scalar
//! reference dequantization in `gemma3_formats::quant`. Nothing here knows what Gemma is.

pub mod attention;
pub mod dot;
pub mod gemm;
pub mod matmul;
#[cfg(target_arch = "aarch64")]
mod neon;
pub mod ops;
pub mod packed;
pub mod qdot;
pub mod simd;
pub mod vmath;

pub use matmul::{matmul, matmul_multi, matmul_weights, Linear, Precision, Weights};
