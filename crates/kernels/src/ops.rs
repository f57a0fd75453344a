//! Element-wise and row-wise float ops: dot, RMSNorm, RoPE, GELU, softmax.

use crate::dispatch;

#[inline(always)]
pub(crate) fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Dot product with 16 independent partial sums, so it vectorises without reordering
/// floats. The summation order is fixed by the length alone, so a row gives the same
/// result whatever batch it is in.
#[inline(always)]
pub(crate) fn dot_body<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..16 {
            acc[l] = fmadd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] = fmadd::<FMA>(*x, *y, acc[l]);
    }
    // Pairwise tree: fixed order.
    let mut w = 8;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

dispatch!(pub fn dot(a: &[f32], b: &[f32]) -> f32 => dot_body);

#[inline(always)]
pub(crate) fn axpy_body<const FMA: bool>(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = fmadd::<FMA>(alpha, *xi, *yi);
    }
}
dispatch!(pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) => axpy_body);

/// `y = x / rms(x) * w` where `w` already holds Gemma's `1 + weight`. Computed in f32.
#[inline(always)]
fn rms_norm_body<const FMA: bool>(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let ss = dot_body::<FMA>(x, x);
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((yi, xi), wi) in y.iter_mut().zip(x).zip(w) {
        *yi = *xi * inv * *wi;
    }
}
dispatch!(pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) => rms_norm_body);

/// RMSNorm in place.
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let ss = dot(x, x);
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for (xi, wi) in x.iter_mut().zip(w) {
        *xi = *xi * inv * *wi;
    }
}

/// RMSNorm of each `w.len()`-sized chunk of `x` (per-head q/k norms), in place.
pub fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(w.len()) {
        rms_norm_inplace(row, w, eps);
    }
}

/// `gelu(x)` with the tanh approximation (PyTorch `approximate="tanh"`).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

/// `gate[i] = gelu_tanh(gate[i]) * up[i]`, the gated MLP's middle step.
pub fn gelu_gate(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh(*g) * *u;
    }
}

/// `gate[i] = gelu_tanh(gate[i]) * up[i]` with GELU read from a table over every f16
/// value, as ggml does on CPU: the input and the GELU are rounded to f16. Faster than
/// `tanh`, and it reproduces llama.cpp's numerics.
pub fn gelu_gate_f16(gate: &mut [f32], up: &[f32]) {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| {
                let x = gemma3_formats::quant::f16_bits_to_f32(bits);
                half::f16::from_f32(gelu_tanh(x)).to_f32()
            })
            .collect()
    });
    let n = gate.len().min(up.len());
    // Written only where a vector path exists.
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(unused_mut)
    )]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() == crate::simd::Level::Avx512 {
        // SAFETY: the level says AVX-512 F is there; the table covers every u16.
        done = unsafe { f16x::gelu_gate(table, &mut gate[..n], &up[..n]) };
    }
    #[cfg(target_arch = "aarch64")]
    if crate::simd::level() == crate::simd::Level::Neon {
        // SAFETY: NEON is part of every aarch64 CPU; the table covers every u16.
        done = unsafe { f16_neon::gelu_gate(table, &mut gate[..n], &up[..n]) };
    }
    for (g, u) in gate[done..n].iter_mut().zip(&up[done..n]) {
        *g = table[half::f16::from_f32(*g).to_bits() as usize] * *u;
    }
}

/// Rounds every value to the nearest f16 (what an f16 KV cache stores).
pub fn round_to_f16(x: &mut [f32]) {
    // Written only where a vector path exists.
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(unused_mut)
    )]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() == crate::simd::Level::Avx512 {
        // SAFETY: the level says AVX-512 F is there.
        done = unsafe { f16x::round(x) };
    }
    #[cfg(target_arch = "aarch64")]
    if crate::simd::level() == crate::simd::Level::Neon {
        // SAFETY: NEON is part of every aarch64 CPU.
        done = unsafe { f16_neon::round(x) };
    }
    for v in &mut x[done..] {
        *v = half::f16::from_f32(*v).to_f32();
    }
}

/// f16 conversions 16 at a time (`vcvtps2ph` rounds to nearest even, as `half` does).
/// Each returns how many leading values it handled (whole vectors); the caller does the rest.
#[cfg(target_arch = "x86_64")]
mod f16x {
    use std::arch::x86_64::*;
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn round(x: &mut [f32]) -> usize {
        let n = x.len() / 16 * 16;
        for i in (0..n).step_by(16) {
            let p = x.as_mut_ptr().add(i);
            let h = _mm512_cvtps_ph::<NEAREST>(_mm512_loadu_ps(p));
            _mm512_storeu_ps(p, _mm512_cvtph_ps(h));
        }
        n
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_gate(table: &[f32], gate: &mut [f32], up: &[f32]) -> usize {
        assert!(table.len() > u16::MAX as usize && up.len() >= gate.len());
        let n = gate.len() / 16 * 16;
        for i in (0..n).step_by(16) {
            let p = gate.as_mut_ptr().add(i);
            let bits = _mm512_cvtepu16_epi32(_mm512_cvtps_ph::<NEAREST>(_mm512_loadu_ps(p)));
            let g = _mm512_i32gather_ps::<4>(bits, table.as_ptr());
            _mm512_storeu_ps(p, _mm512_mul_ps(g, _mm512_loadu_ps(up.as_ptr().add(i))));
        }
        n
    }
}

/// f16 conversions 4 at a time with NEON's `fcvtn` (nearest even) and `fcvtl`; the GELU
/// table is read one value at a time (NEON has no gather). Each returns how many leading
/// values it handled.
#[cfg(target_arch = "aarch64")]
mod f16_neon {
    use crate::neon::{f16x4_to_f32, f32x4_to_f16};
    use std::arch::aarch64::*;

    pub unsafe fn round(x: &mut [f32]) -> usize {
        let n = x.len() / 4 * 4;
        for i in (0..n).step_by(4) {
            let p = x.as_mut_ptr().add(i);
            vst1q_f32(p, f16x4_to_f32(f32x4_to_f16(vld1q_f32(p))));
        }
        n
    }

    pub unsafe fn gelu_gate(table: &[f32], gate: &mut [f32], up: &[f32]) -> usize {
        assert!(table.len() > u16::MAX as usize && up.len() >= gate.len());
        let n = gate.len() / 4 * 4;
        let mut bits = [0u16; 4];
        for i in (0..n).step_by(4) {
            let p = gate.as_mut_ptr().add(i);
            vst1_u16(bits.as_mut_ptr(), f32x4_to_f16(vld1q_f32(p)));
            let g: [f32; 4] = bits.map(|b| *table.get_unchecked(b as usize));
            vst1q_f32(
                p,
                vmulq_f32(vld1q_f32(g.as_ptr()), vld1q_f32(up.as_ptr().add(i))),
            );
        }
        n
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Inverse frequencies `1 / theta^(2i/d) / factor` for NeoX-style RoPE over `head_dim`.
pub fn rope_inv_freq(head_dim: usize, theta: f64, linear_factor: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            // Computed in f32 as transformers does (`torch.arange(...).float() / dim`).
            let exponent = (2 * i) as f32 / head_dim as f32;
            let inv = 1.0f32 / (theta as f32).powf(exponent);
            inv / linear_factor as f32
        })
        .collect()
}

/// Applies NeoX RoPE (dim `i` pairs with `i + d/2`) to every head in `x` at position `pos`.
/// `cos_sin` holds `[cos(pos*f_0..f_{d/2}), sin(...)]` for this position.
pub fn rope_neox(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (a[i], b[i]);
            a[i] = x0 * cos[i] - x1 * sin[i];
            b[i] = x1 * cos[i] + x0 * sin[i];
        }
    }
}

/// cos and sin of `pos * inv_freq` into `cos`/`sin` (len head_dim/2). The angle is formed
/// in f32 like transformers (`inv_freq.float() @ position_ids.float()`).
pub fn rope_cos_sin(pos: usize, inv_freq: &[f32], cos: &mut [f32], sin: &mut [f32]) {
    for i in 0..inv_freq.len() {
        let a = pos as f32 * inv_freq[i];
        cos[i] = a.cos();
        sin[i] = a.sin();
    }
}
