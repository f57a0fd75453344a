//! aarch64 helpers the NEON kernels share: half-precision conversions (`fcvtl`/`fcvtn`,
//! part of every aarch64 NEON, written as instructions because Rust's `f16` vector types
//! are not stable yet).

use std::arch::aarch64::*;

/// Four f16 values (bits) to f32, exactly.
///
/// # Safety
/// None beyond running on aarch64 (a register-only instruction).
#[inline(always)]
pub unsafe fn f16x4_to_f32(h: uint16x4_t) -> float32x4_t {
    let f: float32x4_t;
    // SAFETY: converts registers only; touches no memory.
    std::arch::asm!(
        "fcvtl {f:v}.4s, {h:v}.4h",
        f = lateout(vreg) f,
        h = in(vreg) h,
        options(pure, nomem, nostack)
    );
    f
}

/// Four f32 values to f16 bits, rounded to nearest even (as `half` does).
///
/// # Safety
/// As [`f16x4_to_f32`].
#[inline(always)]
pub unsafe fn f32x4_to_f16(f: float32x4_t) -> uint16x4_t {
    let h: uint16x4_t;
    // SAFETY: converts registers only; touches no memory.
    std::arch::asm!(
        "fcvtn {h:v}.4h, {f:v}.4s",
        h = lateout(vreg) h,
        f = in(vreg) f,
        options(pure, nomem, nostack)
    );
    h
}

/// Four little-endian f16 values at `p` to f32.
///
/// # Safety
/// `p` must point to 8 readable bytes.
#[inline(always)]
pub unsafe fn load_f16x4(p: *const u8) -> float32x4_t {
    f16x4_to_f32(vreinterpret_u16_u8(vld1_u8(p)))
}

/// Four little-endian bf16 values at `p` to f32.
///
/// # Safety
/// `p` must point to 8 readable bytes.
#[inline(always)]
pub unsafe fn load_bf16x4(p: *const u8) -> float32x4_t {
    vreinterpretq_f32_u32(vshll_n_u16::<16>(vreinterpret_u16_u8(vld1_u8(p))))
}

/// The sum of 16 lanes held as two AVX2 vectors would be (`v[0]`, `v[1]`: the first
/// vector's lanes 0-3 and 4-7; `v[2]`, `v[3]`: the second's), added in the order the AVX2
/// kernels reduce them: the two vectors lane by lane, the high half onto the low, lanes 2-3
/// onto 0-1, then lane 1 onto 0. So NEON gives x86's bits.
///
/// # Safety
/// None beyond running on aarch64 (register-only instructions).
#[inline(always)]
pub unsafe fn sum_as_avx2(v: &[float32x4_t; 4]) -> f32 {
    let s = vaddq_f32(vaddq_f32(v[0], v[2]), vaddq_f32(v[1], v[3]));
    let h = vadd_f32(vget_low_f32(s), vget_high_f32(s));
    vget_lane_f32::<0>(h) + vget_lane_f32::<1>(h)
}
