//! Integer dot products for quantized weights, as ggml does them: activations are quantized
//! once per row to 8 bits (blocks of 32 with an f16-rounded scale, like Q8_0), weights are
//! unpacked to unsigned bytes with an affine map per 16 values (`w = a·u + b`), and the
//! inner loop multiplies u8 by i8 in integers (AVX-512 VNNI `vpdpbusd`, AVX2 16-bit madd,
//! NEON widening multiplies in AVX2's order, or portable code). Per 16-value group `g`:
//!
//! `Σ w·x ≈ dx(g) · (a(g) · Σ u·q + b(g) · Σ q)`
//!
//! so the offsets and minimums of every type reduce to the per-group activation sums. One
//! unpacked layout serves every block type; only `unpack_row` knows the bit layouts.
//!
//! This is the path for every CPU and type; on AVX-512 VNNI the common GGUF types are
//! repacked at load instead ([`crate::packed`]), which is several times faster.

use crate::simd::level;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use crate::simd::Level;
use gemma3_formats::quant::{f16_at, k_scale_min};
use gemma3_formats::DType;

/// Activations of `n` rows quantized to 8 bits.
#[derive(Default)]
pub struct QuantActs {
    pub cols: usize,
    pub q: Vec<i8>,
    /// The block scale, repeated for each 16-value group.
    pub dg: Vec<f32>,
    /// Per 16-value group: block scale × Σq (what the weights' `b` terms multiply).
    pub ds: Vec<f32>,
    /// Per 16-value group: Σq, exactly (the packed kernels' K-quant offsets).
    pub isum16: Vec<i32>,
    /// Per 32-value block: block scale × Σq (the packed kernels' Q4_0/Q5_0/Q8_0 offsets).
    pub sdx32: Vec<f32>,
    /// Per 64 values, with Q8_K blocking: the two 32-value sums Σq as a pair of i16 (low
    /// half first), what Q4_K's per-sub-block minimums multiply.
    pub pair32: Vec<i32>,
}

impl QuantActs {
    /// Quantizes `n` rows of `cols` values with `block`'s scale granularity (`cols` a
    /// multiple of its size). Buffers only grow.
    pub fn quantize_as(&mut self, x: &[f32], n: usize, cols: usize, block: ActBlock) {
        use rayon::prelude::*;
        assert_eq!(cols % block.size(), 0);
        self.cols = cols;
        self.q.resize(n * cols, 0);
        self.dg.resize(n * cols / 16, 0.0);
        self.ds.resize(n * cols / 16, 0.0);
        self.isum16.resize(n * cols / 16, 0);
        self.sdx32.resize(n * cols / 32, 0.0);
        // Pair sums are only read with Q8_K blocking; a row keeps at least one slot.
        let pw = (cols / 64).max(1);
        self.pair32.resize(n * pw, 0);
        // One row: its blocks, then the integer sums the kernels use for offsets.
        type Row<'a> = (
            (
                (((&'a [f32], &'a mut [i8]), &'a mut [f32]), &'a mut [f32]),
                (&'a mut [i32], &'a mut [f32]),
            ),
            &'a mut [i32],
        );
        let row = |(((((x, q), dg), ds), (isum, sdx)), pair): Row<'_>| {
            match block {
                ActBlock::Q8_0 => quantize_dispatch(x, q, dg, ds, isum),
                ActBlock::Q8K => quantize_k_dispatch(x, q, dg, ds, isum),
            }
            for (b, s) in sdx.iter_mut().enumerate() {
                *s = dg[2 * b] * (isum[2 * b] + isum[2 * b + 1]) as f32;
            }
            for (p, s) in pair.iter_mut().zip(isum.chunks_exact(4)) {
                let (a, b) = ((s[0] + s[1]) as i16 as u16, (s[2] + s[3]) as i16 as u16);
                *p = (a as u32 | (b as u32) << 16) as i32;
            }
        };
        let g = cols / 16;
        // A prompt's rows are quantized in parallel (the matrix product waits for them); a
        // few rows stay one piece on this thread.
        let min_rows = if n >= 16 { 1 } else { n.max(1) };
        x[..n * cols]
            .par_chunks(cols)
            .zip(self.q.par_chunks_mut(cols))
            .zip(self.dg.par_chunks_mut(g))
            .zip(self.ds.par_chunks_mut(g))
            .zip(
                self.isum16
                    .par_chunks_mut(g)
                    .zip(self.sdx32.par_chunks_mut(cols / 32)),
            )
            .zip(self.pair32.par_chunks_mut(pw))
            .with_min_len(min_rows)
            .for_each(row);
    }

    pub fn row(&self, i: usize) -> (&[i8], &[f32], &[f32]) {
        let c = self.cols;
        let g = c / 16;
        (
            &self.q[i * c..(i + 1) * c],
            &self.dg[i * g..(i + 1) * g],
            &self.ds[i * g..(i + 1) * g],
        )
    }
}

/// How activations are blocked for 8-bit quantization: ggml pairs 32-value weight types
/// with Q8_0 activations (a scale per 32) and K-quants with Q8_K (a scale per 256).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActBlock {
    Q8_0,
    Q8K,
}

impl ActBlock {
    pub fn size(self) -> usize {
        match self {
            ActBlock::Q8_0 => 32,
            ActBlock::Q8K => 256,
        }
    }
    /// The activation blocking ggml uses with weights of `dtype`.
    pub fn for_weights(dtype: DType) -> ActBlock {
        match dtype {
            DType::Q4_K | DType::Q5_K | DType::Q6_K => ActBlock::Q8K,
            _ => ActBlock::Q8_0,
        }
    }
}

/// Rounds to the nearest integer, ties to even, as ggml's `nearest_int` (and its vector
/// `round` with nearest mode): adding 1.5·2²³ leaves the integer in the low mantissa bits.
/// Valid for |x| < 2²², far more than the ±127.5 of 8-bit activations; vectorises.
#[inline(always)]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The largest magnitude in `x` (whose length is a multiple of 16), NaNs ignored. Kept in
/// 16 lanes, then folded: a maximum does not depend on the order it is taken in, and one
/// running value would make every comparison wait for the one before.
#[inline(always)]
fn abs_max(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    for c in x.chunks_exact(16) {
        for (m, v) in lanes.iter_mut().zip(c) {
            if v.abs() > *m {
                *m = v.abs();
            }
        }
    }
    lanes.iter().fold(0f32, |m, &v| if v > m { v } else { m })
}

crate::dispatch!(fn quantize_k_dispatch(x: &[f32], q: &mut [i8], dg: &mut [f32], ds: &mut [f32], isum: &mut [i32]) => quantize_k_body);

/// Q8_K as ggml makes it: the value of largest magnitude maps to -127, the scale is kept in
/// f32, and other values are clamped to 127.
#[inline(always)]
fn quantize_k_body<const FMA: bool>(
    x: &[f32],
    q: &mut [i8],
    dg: &mut [f32],
    ds: &mut [f32],
    isum: &mut [i32],
) {
    // A closure is a function of its own, built for the base level unless it is inlined
    // into the level's code (a 10240-value row took 9.5 us that way, 7 us inlined).
    quantize_blocks::<256>(
        x,
        q,
        dg,
        ds,
        isum,
        #[inline(always)]
        |xb, qb| {
            let amax = abs_max(xb);
            if amax == 0.0 {
                qb.fill(0);
                return 0.0;
            }
            let iscale = -127.0 / first_of_magnitude(xb, amax);
            for (qv, xv) in qb.iter_mut().zip(xb) {
                *qv = nearest_int(iscale * xv).min(127) as i8;
            }
            1.0 / iscale
        },
    )
}

/// `x` quantized in blocks of `B` values by `block` (which writes a block's bytes and
/// returns its scale); per 16 values, the scale (`dg`), Σq (`isum`) and their product
/// (`ds`).
#[inline(always)]
fn quantize_blocks<const B: usize>(
    x: &[f32],
    q: &mut [i8],
    dg: &mut [f32],
    ds: &mut [f32],
    isum: &mut [i32],
    block: impl Fn(&[f32], &mut [i8]) -> f32,
) {
    for ((((xb, qb), db), sb), ib) in x
        .chunks_exact(B)
        .zip(q.chunks_exact_mut(B))
        .zip(dg.chunks_exact_mut(B / 16))
        .zip(ds.chunks_exact_mut(B / 16))
        .zip(isum.chunks_exact_mut(B / 16))
    {
        let d = block(xb, qb);
        db.fill(d);
        for (i, g) in ib.iter_mut().zip(qb.chunks_exact(16)) {
            *i = g.iter().map(|&v| v as i32).sum();
        }
        for (s, &i) in sb.iter_mut().zip(ib.iter()) {
            *s = d * i as f32;
        }
    }
}

/// The first value of `x` (a multiple of 16 long) whose magnitude is `amax`, which one is:
/// 16 values compared at once, then the one chunk that has it searched.
#[inline(always)]
fn first_of_magnitude(x: &[f32], amax: f32) -> f32 {
    x.chunks_exact(16)
        .find(|c| c.iter().fold(false, |hit, v| hit | (v.abs() == amax)))
        .and_then(|c| c.iter().copied().find(|v| v.abs() == amax))
        .unwrap_or(0.0)
}

crate::dispatch!(fn quantize_dispatch(x: &[f32], q: &mut [i8], dg: &mut [f32], ds: &mut [f32], isum: &mut [i32]) => quantize_body);

/// Q8_0 as ggml makes it: a scale per 32 values, rounded to f16.
#[inline(always)]
fn quantize_body<const FMA: bool>(
    x: &[f32],
    q: &mut [i8],
    dg: &mut [f32],
    ds: &mut [f32],
    isum: &mut [i32],
) {
    quantize_blocks::<32>(
        x,
        q,
        dg,
        ds,
        isum,
        #[inline(always)]
        |xb, qb| {
            let scale = abs_max(xb) / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            for (qv, xv) in qb.iter_mut().zip(xb) {
                *qv = nearest_int(xv * inv) as i8;
            }
            // ggml stores the block scale as f16; the dot product uses that rounded value.
            half::f16::from_f32(scale).to_f32()
        },
    )
}

/// Whether `dtype` goes through the integer path.
pub fn supports(dtype: DType) -> bool {
    dtype.is_quantized()
}

/// Unpacks one weight row: `u` gets one byte per value, `a`/`b` one affine map per 16
/// values, such that value `k` is `a[k/16] * u[k] + b[k/16]`.
#[inline(always)]
pub fn unpack_row(dtype: DType, bytes: &[u8], u: &mut [u8], a: &mut [f32], b: &mut [f32]) {
    let be = dtype.block_elems();
    let bb = dtype.block_bytes();
    let nb = bytes.len() / bb;
    let g = be / 16;
    // Plain loops (not iterator adapters) so everything inlines into the caller's
    // instruction-set wrapper.
    for k in 0..nb {
        let blk = &bytes[k * bb..(k + 1) * bb];
        let u = &mut u[k * be..(k + 1) * be];
        let (a, b) = (&mut a[k * g..(k + 1) * g], &mut b[k * g..(k + 1) * g]);
        match dtype {
            DType::Q8_0 => unpack_q8_0(blk.try_into().unwrap(), u.try_into().unwrap(), a, b),
            DType::Q4_0 => unpack_q4_01::<false>(blk, u.try_into().unwrap(), a, b),
            DType::Q4_1 => unpack_q4_01::<true>(blk, u.try_into().unwrap(), a, b),
            DType::Q5_0 => unpack_q5_01::<false>(blk, u.try_into().unwrap(), a, b),
            DType::Q5_1 => unpack_q5_01::<true>(blk, u.try_into().unwrap(), a, b),
            DType::Q4_K => unpack_qk::<false>(blk, u.try_into().unwrap(), a, b),
            DType::Q5_K => unpack_qk::<true>(blk, u.try_into().unwrap(), a, b),
            DType::Q6_K => unpack_q6_k(blk.try_into().unwrap(), u.try_into().unwrap(), a, b),
            DType::F32 | DType::F16 | DType::BF16 => unreachable!("float weights use the f32 path"),
        }
    }
}

#[inline(always)]
fn unpack_q8_0(blk: &[u8; 34], u: &mut [u8; 32], a: &mut [f32], b: &mut [f32]) {
    let d = f16_at(blk, 0);
    for j in 0..32 {
        u[j] = blk[2 + j] ^ 0x80; // i8 + 128
    }
    a.fill(d);
    b.fill(-128.0 * d);
}

#[inline(always)]
fn unpack_q4_01<const MIN: bool>(blk: &[u8], u: &mut [u8; 32], a: &mut [f32], b: &mut [f32]) {
    let d = f16_at(blk, 0);
    let off = if MIN { 4 } else { 2 };
    let qs: &[u8; 16] = blk[off..off + 16].try_into().unwrap();
    for j in 0..16 {
        u[j] = qs[j] & 0x0f;
        u[j + 16] = qs[j] >> 4;
    }
    a.fill(d);
    b.fill(if MIN { f16_at(blk, 2) } else { -8.0 * d });
}

#[inline(always)]
fn unpack_q5_01<const MIN: bool>(blk: &[u8], u: &mut [u8; 32], a: &mut [f32], b: &mut [f32]) {
    let d = f16_at(blk, 0);
    let off = if MIN { 4 } else { 2 };
    let qh = u32::from_le_bytes(blk[off..off + 4].try_into().unwrap());
    let qs: &[u8; 16] = blk[off + 4..off + 20].try_into().unwrap();
    // Shifts by the lane index, written over 32 lanes so they vectorise.
    let mut high = [0u8; 32];
    for (j, h) in high.iter_mut().enumerate() {
        *h = (((qh >> j) & 1) << 4) as u8;
    }
    for j in 0..16 {
        u[j] = (qs[j] & 0x0f) | high[j];
        u[j + 16] = (qs[j] >> 4) | high[j + 16];
    }
    a.fill(d);
    b.fill(if MIN { f16_at(blk, 2) } else { -16.0 * d });
}

/// Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins.
#[inline(always)]
fn unpack_qk<const FIVE: bool>(blk: &[u8], u: &mut [u8; 256], a: &mut [f32], b: &mut [f32]) {
    let d = f16_at(blk, 0);
    let dmin = f16_at(blk, 2);
    let scales: &[u8; 12] = blk[4..16].try_into().unwrap();
    let qs: &[u8; 128] = if FIVE {
        blk[48..176].try_into().unwrap()
    } else {
        blk[16..144].try_into().unwrap()
    };
    for c in 0..4 {
        for l in 0..32 {
            u[64 * c + l] = qs[32 * c + l] & 0x0f;
            u[64 * c + 32 + l] = qs[32 * c + l] >> 4;
        }
    }
    if FIVE {
        let qh: &[u8; 32] = blk[16..48].try_into().unwrap();
        for s in 0..8 {
            for l in 0..32 {
                u[32 * s + l] |= ((qh[l] >> s) & 1) << 4;
            }
        }
    }
    for s in 0..8 {
        let (sc, m) = k_scale_min(s, scales);
        a[2 * s] = d * sc as f32;
        a[2 * s + 1] = d * sc as f32;
        b[2 * s] = -dmin * m as f32;
        b[2 * s + 1] = -dmin * m as f32;
    }
}

#[inline(always)]
fn unpack_q6_k(blk: &[u8; 210], u: &mut [u8; 256], a: &mut [f32], b: &mut [f32]) {
    let d = f16_at(blk, 208);
    for h in 0..2 {
        let ql: &[u8; 64] = blk[64 * h..64 * h + 64].try_into().unwrap();
        let qh: &[u8; 32] = blk[128 + 32 * h..128 + 32 * h + 32].try_into().unwrap();
        for l in 0..32 {
            u[128 * h + l] = (ql[l] & 0x0f) | ((qh[l] & 3) << 4);
            u[128 * h + l + 32] = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4);
            u[128 * h + l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            u[128 * h + l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    // Scale i covers values 16i..16i+16, in the order the values were laid out.
    for g in 0..16 {
        let s = d * (blk[192 + g] as i8) as f32;
        a[g] = s;
        b[g] = -32.0 * s;
    }
}

/// `Σ_g a[g]·dg[g]·Σ u·q + b[g]·ds[g]` over one row (`g` = 16-value group).
pub type QDot = fn(&[u8], &[f32], &[f32], &[i8], &[f32], &[f32]) -> f32;

/// The best integer dot product for this CPU.
pub fn qdot_fn() -> QDot {
    match level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 if crate::simd::has_vnni() => {
            |u, a, b, q, d, s| unsafe { vnni::qdot(u, a, b, q, d, s) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Avx2 => |u, a, b, q, d, s| unsafe { avx2::qdot(u, a, b, q, d, s) },
        // SAFETY: NEON is part of every aarch64 CPU.
        #[cfg(target_arch = "aarch64")]
        Level::Neon => |u, a, b, q, d, s| unsafe { neon::qdot(u, a, b, q, d, s) },
        _ => qdot_portable,
    }
}

/// Checks that a row's operands agree (`u`, `q`: the values; `a`, `b`, `dg`, `ds`: one per
/// 16-value group) for the vector versions, which index unchecked; the values and groups.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
fn check_shapes(
    u: &[u8],
    a: &[f32],
    b: &[f32],
    q: &[i8],
    dg: &[f32],
    ds: &[f32],
) -> (usize, usize) {
    let n = u.len();
    let groups = n / 16;
    assert!(
        q.len() >= n
            && a.len() >= groups
            && b.len() >= groups
            && dg.len() >= groups
            && ds.len() >= groups
    );
    (n, groups)
}

pub fn qdot_portable(u: &[u8], a: &[f32], b: &[f32], q: &[i8], dg: &[f32], ds: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (g, (ug, qg)) in u.chunks_exact(16).zip(q.chunks_exact(16)).enumerate() {
        let isum: i32 = ug.iter().zip(qg).map(|(&x, &y)| x as i32 * y as i32).sum();
        acc += a[g] * dg[g] * isum as f32 + b[g] * ds[g];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512 F/BW/VNNI required; `u`, `q` hold `cols` values (a multiple of 32), `a`, `b`,
    /// `s16` cols/16 and `dx` cols/32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn qdot(u: &[u8], a: &[f32], b: &[f32], q: &[i8], dg: &[f32], ds: &[f32]) -> f32 {
        let (n, groups) = super::check_shapes(u, a, b, q, dg, ds);
        // Lane j of a 64-byte step holds bytes 4j..4j+3: group j/4 of that step.
        let idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        let mut acc = _mm512_setzero_ps();
        let mut k = 0;
        while k + 64 <= n {
            let uv = _mm512_loadu_si512(u.as_ptr().add(k) as *const _);
            let qv = _mm512_loadu_si512(q.as_ptr().add(k) as *const _);
            let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), uv, qv);
            let g = k / 16;
            let s4 = _mm_mul_ps(
                _mm_loadu_ps(a.as_ptr().add(g)),
                _mm_loadu_ps(dg.as_ptr().add(g)),
            );
            let sv = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s4));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sv, acc);
            k += 64;
        }
        if k < n {
            // 32 values left: two groups.
            let m: __mmask64 = (1u64 << 32) - 1;
            let uv = _mm512_maskz_loadu_epi8(m, u.as_ptr().add(k) as *const i8);
            let qv = _mm512_maskz_loadu_epi8(m, q.as_ptr().add(k));
            let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), uv, qv);
            let g = k / 16;
            let s4 = _mm_set_ps(0.0, 0.0, a[g + 1] * dg[g + 1], a[g] * dg[g]);
            let sv = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s4));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sv, acc);
        }
        // The offsets and minimums: Σ b·ds over the groups.
        let mut g = 0;
        while g + 16 <= groups {
            acc = _mm512_fmadd_ps(
                _mm512_loadu_ps(b.as_ptr().add(g)),
                _mm512_loadu_ps(ds.as_ptr().add(g)),
                acc,
            );
            g += 16;
        }
        if g < groups {
            let m: __mmask16 = ((1u32 << (groups - g)) - 1) as u16;
            acc = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(m, b.as_ptr().add(g)),
                _mm512_maskz_loadu_ps(m, ds.as_ptr().add(g)),
                acc,
            );
        }
        _mm512_reduce_add_ps(acc)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA required; shapes as for the VNNI version.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn qdot(u: &[u8], a: &[f32], b: &[f32], q: &[i8], dg: &[f32], ds: &[f32]) -> f32 {
        let (n, groups) = super::check_shapes(u, a, b, q, dg, ds);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut k = 0;
        while k + 32 <= n {
            let g = k / 16;
            let u0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(u.as_ptr().add(k) as *const _));
            let q0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.as_ptr().add(k) as *const _));
            let u1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(u.as_ptr().add(k + 16) as *const _));
            let q1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.as_ptr().add(k + 16) as *const _));
            let p0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(u0, q0));
            let p1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(u1, q1));
            acc0 = _mm256_fmadd_ps(
                p0,
                _mm256_set1_ps(*a.get_unchecked(g) * *dg.get_unchecked(g)),
                acc0,
            );
            acc1 = _mm256_fmadd_ps(
                p1,
                _mm256_set1_ps(*a.get_unchecked(g + 1) * *dg.get_unchecked(g + 1)),
                acc1,
            );
            k += 32;
        }
        let mut g = 0;
        while g + 8 <= groups {
            acc0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(b.as_ptr().add(g)),
                _mm256_loadu_ps(ds.as_ptr().add(g)),
                acc0,
            );
            g += 8;
        }
        let mut tail = 0f32;
        while g < groups {
            tail += b[g] * ds[g];
            g += 1;
        }
        let s = _mm256_add_ps(acc0, acc1);
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s) + tail
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    /// Pairwise products of 8 weight bytes and 8 activations: lane `l` is
    /// `u[2l]·q[2l] + u[2l+1]·q[2l+1]`, exactly (AVX2's `madd`).
    #[inline(always)]
    unsafe fn madd8(u: uint8x8_t, q: int8x8_t) -> float32x4_t {
        // u ≤ 255 fits a signed 16-bit lane.
        let u = vreinterpretq_s16_u16(vmovl_u8(u));
        let q = vmovl_s8(q);
        let lo = vmull_s16(vget_low_s16(u), vget_low_s16(q));
        let hi = vmull_s16(vget_high_s16(u), vget_high_s16(q));
        vcvtq_f32_s32(vpaddq_s32(lo, hi))
    }

    /// The AVX2 version's sums in its order, so both give the same bits: two 8-lane
    /// accumulators (here four 4-lane halves), the groups' offsets fused into the first,
    /// the leftover groups summed one by one, and the same reduction tree.
    ///
    /// # Safety
    /// Shapes as for the x86 versions (NEON is part of every aarch64 CPU).
    pub unsafe fn qdot(u: &[u8], a: &[f32], b: &[f32], q: &[i8], dg: &[f32], ds: &[f32]) -> f32 {
        let (n, groups) = super::check_shapes(u, a, b, q, dg, ds);
        let zero = vdupq_n_f32(0.0);
        // acc[0], acc[1]: AVX2's acc0 lanes 0-3 and 4-7; acc[2], acc[3]: acc1's.
        let mut acc = [zero; 4];
        let mut k = 0;
        while k + 32 <= n {
            let g = k / 16;
            for (h, pair) in acc.chunks_exact_mut(2).enumerate() {
                let at = k + 16 * h;
                let uv = vld1q_u8(u.as_ptr().add(at));
                let qv = vld1q_s8(q.as_ptr().add(at));
                let s = vdupq_n_f32(*a.get_unchecked(g + h) * *dg.get_unchecked(g + h));
                let p0 = madd8(vget_low_u8(uv), vget_low_s8(qv));
                let p1 = madd8(vget_high_u8(uv), vget_high_s8(qv));
                pair[0] = vfmaq_f32(pair[0], p0, s);
                pair[1] = vfmaq_f32(pair[1], p1, s);
            }
            k += 32;
        }
        let mut g = 0;
        while g + 8 <= groups {
            for v in 0..2 {
                let bv = vld1q_f32(b.as_ptr().add(g + 4 * v));
                let sv = vld1q_f32(ds.as_ptr().add(g + 4 * v));
                acc[v] = vfmaq_f32(acc[v], bv, sv);
            }
            g += 8;
        }
        let mut tail = 0f32;
        while g < groups {
            tail += b[g] * ds[g];
            g += 1;
        }
        crate::neon::sum_as_avx2(&acc) + tail
    }
}
