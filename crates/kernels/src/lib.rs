//! CPU math for gemma3: matrix products over every stored weight type, attention, RMSNorm,
//! RoPE, GELU and softmax. Hot loops are compiled several times for different instruction
//! sets and picked at run time (see [`simd`]); every path is checked against the scalar
//! reference dequantization in `gemma3_formats::quant`. Nothing here knows what Gemma is.

pub mod attention;
pub mod bf16mm;
pub mod dot;
pub mod gemm;
pub mod matmul;
#[cfg(target_arch = "aarch64")]
mod neon;
pub mod ops;
pub mod packed;
pub mod qdot;
pub mod simd;
pub mod team;
pub mod vmath;

pub use matmul::{matmul, matmul_multi, matmul_weights, Linear, Precision, Weights};

/// The kernels in use, in words: the level and, where the quantized weights are repacked,
/// the instructions of those kernels (for `info`, `bench` and logs). Lives here, above both
/// [`simd`] and [`packed`], so neither module needs the other's view of the machine.
pub fn describe() -> String {
    let level = simd::level().name();
    let base = match packed::kernels_name() {
        Some(isa) => format!("{isa} (level {level})"),
        None => format!("level {level}"),
    };
    match bf16mm::unit() {
        bf16mm::Unit::None => base,
        u => format!("{base}, bf16 products on {}", u.name()),
    }
}
