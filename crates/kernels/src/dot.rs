//! f32 dot products of R weight rows against one input row, the inner loop of every float
//! matrix product. Explicit AVX-512, AVX2 and NEON code (LLVM does not keep R×lanes accumulators
//! in registers on its own) and a portable version. Each path sums a row in a fixed order
//! that depends only on the row length, so `R = 1` and `R = 4` give identical results and a
//! row's output never depends on its neighbours.

use crate::simd::level;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use crate::simd::Level;

/// `R` dot products sharing `x`; every row must be at least `x.len()` long.
pub type DotRows<const R: usize> = fn(&[&[f32]; R], &[f32]) -> [f32; R];

/// The best implementation for this CPU.
pub fn dot_rows<const R: usize>() -> DotRows<R> {
    match level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => |rows, x| unsafe { avx512::dot_rows(rows, x) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => |rows, x| unsafe { avx2::dot_rows(rows, x) },
        // SAFETY: NEON is part of every aarch64 CPU.
        #[cfg(target_arch = "aarch64")]
        Level::Neon => |rows, x| unsafe { neon::dot_rows(rows, x) },
        _ => portable_dot_rows,
    }
}

pub fn portable_dot_rows<const R: usize>(rows: &[&[f32]; R], x: &[f32]) -> [f32; R] {
    const L: usize = 8;
    let n = x.len();
    let mut acc = [[0f32; L]; R];
    let full = n / L * L;
    let mut k = 0;
    while k < full {
        for r in 0..R {
            let w = &rows[r][k..k + L];
            for l in 0..L {
                acc[r][l] += w[l] * x[k + l];
            }
        }
        k += L;
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let mut tail = 0f32;
        for kk in full..n {
            tail += rows[r][kk] * x[kk];
        }
        let a = &acc[r];
        out[r] = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])) + tail;
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX-512F; rows must hold `x.len()` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_rows<const R: usize>(rows: &[&[f32]; R], x: &[f32]) -> [f32; R] {
        let n = x.len();
        for r in rows {
            assert!(r.len() >= n);
        }
        let xp = x.as_ptr();
        let mut a0 = [_mm512_setzero_ps(); R];
        let mut a1 = [_mm512_setzero_ps(); R];
        let mut k = 0;
        while k + 32 <= n {
            let x0 = _mm512_loadu_ps(xp.add(k));
            let x1 = _mm512_loadu_ps(xp.add(k + 16));
            for r in 0..R {
                let p = rows[r].as_ptr().add(k);
                a0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(p), x0, a0[r]);
                a1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(p.add(16)), x1, a1[r]);
            }
            k += 32;
        }
        if k < n {
            let rem = n - k;
            let m0: __mmask16 = if rem >= 16 {
                0xffff
            } else {
                ((1u32 << rem) - 1) as u16
            };
            let m1: __mmask16 = if rem > 16 {
                ((1u32 << (rem - 16)) - 1) as u16
            } else {
                0
            };
            let x0 = _mm512_maskz_loadu_ps(m0, xp.add(k));
            let x1 = _mm512_maskz_loadu_ps(m1, xp.add(k + 16));
            for r in 0..R {
                let p = rows[r].as_ptr().add(k);
                a0[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m0, p), x0, a0[r]);
                a1[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m1, p.add(16)), x1, a1[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA; rows must hold `x.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows<const R: usize>(rows: &[&[f32]; R], x: &[f32]) -> [f32; R] {
        let n = x.len();
        for r in rows {
            assert!(r.len() >= n);
        }
        let xp = x.as_ptr();
        let mut a0 = [_mm256_setzero_ps(); R];
        let mut a1 = [_mm256_setzero_ps(); R];
        let mut k = 0;
        while k + 16 <= n {
            let x0 = _mm256_loadu_ps(xp.add(k));
            let x1 = _mm256_loadu_ps(xp.add(k + 8));
            for r in 0..R {
                let p = rows[r].as_ptr().add(k);
                a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(p), x0, a0[r]);
                a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(8)), x1, a1[r]);
            }
            k += 16;
        }
        let mut out = [0f32; R];
        for r in 0..R {
            let mut tail = 0f32;
            for kk in k..n {
                tail += rows[r][kk] * x[kk];
            }
            out[r] = hsum(_mm256_add_ps(a0[r], a1[r])) + tail;
        }
        out
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    /// Four accumulators of 4 lanes per row, fused multiply-adds, summed at the end in the
    /// AVX2 path's order.
    ///
    /// # Safety
    /// Rows must hold `x.len()` values.
    pub unsafe fn dot_rows<const R: usize>(rows: &[&[f32]; R], x: &[f32]) -> [f32; R] {
        let n = x.len();
        for r in rows {
            assert!(r.len() >= n);
        }
        let xp = x.as_ptr();
        let mut acc = [[vdupq_n_f32(0.0); 4]; R];
        let mut k = 0;
        while k + 16 <= n {
            let xv: [float32x4_t; 4] = std::array::from_fn(|v| vld1q_f32(xp.add(k + 4 * v)));
            for r in 0..R {
                let p = rows[r].as_ptr().add(k);
                for v in 0..4 {
                    acc[r][v] = vfmaq_f32(acc[r][v], vld1q_f32(p.add(4 * v)), xv[v]);
                }
            }
            k += 16;
        }
        let mut out = [0f32; R];
        for r in 0..R {
            let mut tail = 0f32;
            for kk in k..n {
                tail += rows[r][kk] * x[kk];
            }
            // Lane j of acc[r][v] holds the products at k ≡ 4v + j (mod 16), as lane
            // 4v + j of AVX2's two 8-lane accumulators does.
            out[r] = crate::neon::sum_as_avx2(&acc[r]) + tail;
        }
        out
    }
}
