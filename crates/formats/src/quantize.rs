//! Reference quantization into ggml's block types, written from ggml's reference quantizers
//! (the ones llama-quantize uses without an importance matrix). They are deterministic, so
//! the same f32 input gives the same bytes as llama.cpp: the arithmetic is kept in the same
//! order, in f32, with ggml's rounding (`nearest_int`, round-half-away `roundf`, truncating
//! casts, round-to-nearest-even f16).

use crate::DType;
use half::{bf16, f16};

/// Values per K-quant super-block.
const QK_K: usize = 256;
/// Below this absolute maximum a group counts as all zero (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Quantizes `src` (whole blocks of `dtype`, rows already laid end to end) into `dst`, which
/// must hold exactly `dtype.row_bytes(src.len())` bytes. F32, F16 and BF16 are conversions.
/// Panics on length mismatches: callers size buffers from the validated shape.
pub fn quantize_into(dtype: DType, src: &[f32], dst: &mut [u8]) {
    let be = dtype.block_elems();
    let bb = dtype.block_bytes();
    assert_eq!(src.len() % be, 0, "{dtype}: input is not whole blocks");
    assert_eq!(dst.len(), src.len() / be * bb, "{dtype}: output size");
    let mut blocks = |f: fn(&[f32], &mut [u8])| {
        for (x, y) in src.chunks_exact(be).zip(dst.chunks_exact_mut(bb)) {
            f(x, y);
        }
    };
    match dtype {
        DType::F32 => {
            for (x, y) in src.iter().zip(dst.chunks_exact_mut(4)) {
                y.copy_from_slice(&x.to_le_bytes());
            }
        }
        DType::F16 => halves::<f16>(src, dst),
        DType::BF16 => halves::<bf16>(src, dst),
        DType::Q4_0 => blocks(q4_0),
        DType::Q4_1 => blocks(q4_1),
        DType::Q5_0 => blocks(q5_0),
        DType::Q5_1 => blocks(q5_1),
        DType::Q8_0 => blocks(q8_0),
        DType::Q4_K => blocks(q4_k),
        DType::Q5_K => blocks(q5_k),
        DType::Q6_K => blocks(q6_k),
    }
}

/// `src` rounded to a 16-bit float type (nearest even), little-endian into `dst`: a chunk at
/// a time through `half`'s slice conversion (the CPU's conversion instructions where it
/// finds them), not a call and a feature check per value.
fn halves<H: Copy + Default>(src: &[f32], dst: &mut [u8])
where
    [H]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    const CHUNK: usize = 64;
    let mut h = [H::default(); CHUNK];
    for (x, y) in src.chunks(CHUNK).zip(dst.chunks_mut(2 * CHUNK)) {
        let h = &mut h[..x.len()];
        h.convert_from_f32_slice(x);
        for (v, b) in h.reinterpret_cast().iter().zip(y.chunks_exact_mut(2)) {
            b.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// [`quantize_into`] a new buffer.
pub fn quantize(dtype: DType, src: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; src.len() / dtype.block_elems() * dtype.block_bytes()];
    quantize_into(dtype, src, &mut out);
    out
}

/// ggml's `nearest_int`: adding 1.5·2^23 rounds to an integer in the mantissa (ties to even).
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

fn put_f16(y: &mut [u8], at: usize, v: f32) {
    y[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// f32 → f16 → f32, as ggml reads back a scale it has just stored.
fn through_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// The value of largest magnitude (the first one on ties), and that magnitude.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((f32::MAX, -f32::MAX), |(lo, hi), &v| {
        (if v < lo { v } else { lo }, if v > hi { v } else { hi })
    })
}

/// Q4_0: `d = max / -8`, values `min(15, trunc(x/d + 8.5))`.
fn q4_0(x: &[f32], y: &mut [u8]) {
    let (max, _) = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    for j in 0..16 {
        let a = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let b = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        y[2 + j] = a | (b << 4);
    }
}

/// Q4_1: `d = (max - min) / 15`, `m = min`, values `min(15, trunc((x - min)/d + 0.5))`.
fn q4_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    for j in 0..16 {
        let a = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let b = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        y[4 + j] = a | (b << 4);
    }
}

/// Q5_0: `d = max / -16`, 5-bit values with the fifth bits gathered in a u32.
fn q5_0(x: &[f32], y: &mut [u8]) {
    let (max, _) = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let a = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let b = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        y[6 + j] = (a & 0x0f) | ((b & 0x0f) << 4);
        qh |= (((a & 0x10) >> 4) as u32) << j;
        qh |= (((b & 0x10) >> 4) as u32) << (j + 16);
    }
    y[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// Q5_1: `d = (max - min) / 31`, `m = min`, 5-bit values.
fn q5_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    let mut qh = 0u32;
    for j in 0..16 {
        let a = ((x[j] - min) * id + 0.5) as u8;
        let b = ((x[j + 16] - min) * id + 0.5) as u8;
        y[8 + j] = (a & 0x0f) | ((b & 0x0f) << 4);
        qh |= (((a & 0x10) >> 4) as u32) << j;
        qh |= (((b & 0x10) >> 4) as u32) << (j + 16);
    }
    y[4..8].copy_from_slice(&qh.to_le_bytes());
}

/// Q8_0: `d = amax / 127`, values `roundf(x/d)` (halves away from zero).
fn q8_0(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    for j in 0..32 {
        y[2 + j] = (x[j] * id).round() as i8 as u8;
    }
}

// The K-quants' scale searches run on every sub-block of a super-block side by side: lane
// `k` of each `[_; N]` array belongs to sub-block `k` and goes through exactly the scalar
// algorithm's operations in the same order (no reassociation, no fused multiply-add), so
// the result is bit-identical to ggml's; the compiler turns the lane loops into vector
// instructions. Data is transposed so that `x[i][k]` is value `i` of sub-block `k`.

/// Sub-blocks of Q4_K and Q5_K (32 values each).
const AFFINE_SUBS: usize = QK_K / 32;
/// Sub-blocks of Q6_K (16 values each).
const SYMMETRIC_SUBS: usize = QK_K / 16;

fn transpose<const M: usize, const N: usize>(x: &[f32]) -> [[f32; N]; M] {
    let mut t = [[0f32; N]; M];
    for k in 0..N {
        for i in 0..M {
            t[i][k] = x[M * k + i];
        }
    }
    t
}

/// ggml's `make_qkx2_quants` on `N` sub-blocks of `M` values at once: per sub-block an
/// affine fit `x ≈ scale·L - min` with `L` in `0..=nmax`, trying `nstep + 1` scales around
/// the range and keeping the weighted least-squares best. Returns `(scale, min)` per lane
/// (min as a positive offset) and fills `l`.
fn make_qkx2_quants<const M: usize, const N: usize>(
    nmax: i32,
    x: &[[f32; N]; M],
    w: &[[f32; N]; M],
    l: &mut [[i32; N]; M],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> ([f32; N], [f32; N]) {
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = [0f32; N];
    for k in 0..N {
        sum_x[k] = sum_w[k] * x[0][k];
    }
    for i in 1..M {
        for k in 0..N {
            let v = x[i][k];
            min[k] = if v < min[k] { v } else { min[k] };
            max[k] = if v > max[k] { v } else { max[k] };
            sum_w[k] += w[i][k];
            sum_x[k] += w[i][k] * v;
        }
    }
    let mut iscale = [0f32; N];
    let mut scale = [0f32; N];
    for k in 0..N {
        min[k] = if min[k] > 0.0 { 0.0 } else { min[k] };
        iscale[k] = nmax as f32 / (max[k] - min[k]);
        scale[k] = 1.0 / iscale[k];
    }
    let min_clipped = min;
    let mut best = [0f32; N];
    for i in 0..M {
        for k in 0..N {
            let q = nearest_int(iscale[k] * (x[i][k] - min[k])).clamp(0, nmax);
            l[i][k] = q;
            let diff = scale[k] * q as f32 + min[k] - x[i][k];
            best[k] += w[i][k] * (diff * diff);
        }
    }
    let mut aux = [[0i32; N]; M];
    for is in 0..=nstep {
        let top = rmin + rdelta * is as f32 + nmax as f32;
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; N], [0f32; N], [0f32; N]);
        // The range uses the current `min`, which a better fit may have changed.
        for k in 0..N {
            iscale[k] = top / (max[k] - min[k]);
        }
        for i in 0..M {
            for k in 0..N {
                let q = nearest_int(iscale[k] * (x[i][k] - min[k])).clamp(0, nmax);
                aux[i][k] = q;
                let lf = q as f32;
                sum_l[k] += w[i][k] * lf;
                sum_l2[k] += w[i][k] * lf * lf;
                sum_xl[k] += w[i][k] * lf * x[i][k];
            }
        }
        let (mut this_scale, mut this_min, mut det) = ([0f32; N], [0f32; N], [0f32; N]);
        for k in 0..N {
            det[k] = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k];
            let s = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / det[k];
            let m = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / det[k];
            let clip = m > 0.0;
            this_min[k] = if clip { 0.0 } else { m };
            this_scale[k] = if clip { sum_xl[k] / sum_l2[k] } else { s };
        }
        let mut err = [0f32; N];
        for i in 0..M {
            for k in 0..N {
                let diff = this_scale[k] * aux[i][k] as f32 + this_min[k] - x[i][k];
                err[k] += w[i][k] * (diff * diff);
            }
        }
        let mut take = [false; N];
        for k in 0..N {
            take[k] = det[k] > 0.0 && err[k] < best[k];
            best[k] = if take[k] { err[k] } else { best[k] };
            scale[k] = if take[k] { this_scale[k] } else { scale[k] };
            min[k] = if take[k] { this_min[k] } else { min[k] };
        }
        for i in 0..M {
            for k in 0..N {
                l[i][k] = if take[k] { aux[i][k] } else { l[i][k] };
            }
        }
    }
    // A constant sub-block (ggml returns before any search): all levels 0, scale 0.
    for k in 0..N {
        if max[k] == min_clipped[k] {
            scale[k] = 0.0;
            min[k] = min_clipped[k];
            for row in l.iter_mut() {
                row[k] = 0;
            }
        }
    }
    let mut the_min = [0f32; N];
    for k in 0..N {
        the_min[k] = -min[k];
    }
    (scale, the_min)
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and no importance weights (weights `x²`), on
/// `N` sub-blocks of `M` values at once: a symmetric fit `x ≈ scale·(L - nmax)`, searching
/// 18 scales around `-nmax / max`. Fills `l` with values in `0..2·nmax`.
fn make_qx_quants<const M: usize, const N: usize>(
    nmax: i32,
    x: &[[f32; N]; M],
    l: &mut [[i32; N]; M],
) -> [f32; N] {
    let (mut max, mut amax) = ([0f32; N], [0f32; N]);
    for i in 0..M {
        for k in 0..N {
            let ax = x[i][k].abs();
            let bigger = ax > amax[k];
            amax[k] = if bigger { ax } else { amax[k] };
            max[k] = if bigger { x[i][k] } else { max[k] };
        }
    }
    let mut iscale = [0f32; N];
    let (mut sumlx, mut suml2) = ([0f32; N], [0f32; N]);
    for k in 0..N {
        iscale[k] = -(nmax as f32) / max[k];
    }
    for i in 0..M {
        for k in 0..N {
            let v = x[i][k];
            let q = nearest_int(iscale[k] * v).clamp(-nmax, nmax - 1);
            l[i][k] = q + nmax;
            let w = v * v;
            sumlx[k] += w * v * q as f32;
            suml2[k] += w * q as f32 * q as f32;
        }
    }
    let (mut scale, mut best) = ([0f32; N], [0f32; N]);
    for k in 0..N {
        scale[k] = if suml2[k] != 0.0 {
            sumlx[k] / suml2[k]
        } else {
            0.0
        };
        best[k] = scale[k] * sumlx[k];
    }
    let mut aux = [[0i32; N]; M];
    for is in (-9..=9).filter(|&is| is != 0) {
        for k in 0..N {
            iscale[k] = -(nmax as f32 + 0.1 * is as f32) / max[k];
            sumlx[k] = 0.0;
            suml2[k] = 0.0;
        }
        for i in 0..M {
            for k in 0..N {
                let v = x[i][k];
                let q = nearest_int(iscale[k] * v).clamp(-nmax, nmax - 1);
                aux[i][k] = q + nmax;
                let w = v * v;
                sumlx[k] += w * v * q as f32;
                suml2[k] += w * q as f32 * q as f32;
            }
        }
        let mut take = [false; N];
        for k in 0..N {
            take[k] = suml2[k] > 0.0 && sumlx[k] * sumlx[k] > best[k] * suml2[k];
            scale[k] = if take[k] {
                sumlx[k] / suml2[k]
            } else {
                scale[k]
            };
            best[k] = if take[k] {
                scale[k] * sumlx[k]
            } else {
                best[k]
            };
        }
        for i in 0..M {
            for k in 0..N {
                l[i][k] = if take[k] { aux[i][k] } else { l[i][k] };
            }
        }
    }
    // An all-zero sub-block (ggml returns before any search).
    for k in 0..N {
        if amax[k] < GROUP_MAX_EPS {
            scale[k] = 0.0;
            for row in l.iter_mut() {
                row[k] = 0;
            }
        }
    }
    scale
}

/// The scale and min searches of Q4_K and Q5_K (`nmax` 15 or 31, with their search
/// ranges): per 32-value sub-block an affine fit, then both quantized to 6 bits against
/// their maxima and packed as [`crate::quant::k_scale_min`] reads them. Returns the
/// final levels in `l` (requantized with the stored scales).
fn k_affine_block(x: &[f32], y: &mut [u8], l: &mut [u8; QK_K], nmax: i32, rmin: f32, nstep: i32) {
    const N: usize = AFFINE_SUBS;
    let xt: [[f32; N]; 32] = transpose(x);
    let mut sum_x2 = [0f32; N];
    for row in &xt {
        for k in 0..N {
            sum_x2[k] += row[k] * row[k];
        }
    }
    let mut av_x = [0f32; N];
    for k in 0..N {
        av_x[k] = (sum_x2[k] / 32.0).sqrt();
    }
    let mut wt = [[0f32; N]; 32];
    for (w, row) in wt.iter_mut().zip(&xt) {
        for k in 0..N {
            w[k] = av_x[k] + row[k].abs();
        }
    }
    let mut lt = [[0i32; N]; 32];
    let (scales, mins) = make_qkx2_quants(nmax, &xt, &wt, &mut lt, rmin, 0.1, nstep);
    for (i, row) in lt.iter().enumerate() {
        for k in 0..N {
            l[32 * k + i] = row[k] as u8;
        }
    }
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for k in 0..N {
        if scales[k] > max_scale {
            max_scale = scales[k];
        }
        if mins[k] > max_min {
            max_min = mins[k];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut y[4..16];
    sc.fill(0);
    for j in 0..N {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(y, 0, max_scale / 63.0);
    put_f16(y, 2, max_min / 63.0);
    let d_all = through_f16(max_scale / 63.0);
    let dmin_all = through_f16(max_min / 63.0);
    for j in 0..N {
        let (s, m) = crate::quant::k_scale_min(j, &y[4..16]);
        let d = d_all * s as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for i in 0..32 {
            let q = nearest_int((x[32 * j + i] + dm) / d).clamp(0, nmax);
            l[32 * j + i] = q as u8;
        }
    }
}

/// Q4_K: 8 sub-blocks of 32 with 6-bit scales and mins; 4-bit levels, each 32-byte run of
/// `qs` holding two sub-blocks (low nibbles, then high).
fn q4_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    k_affine_block(x, y, &mut l, 15, -1.0, 20);
    let qs = &mut y[16..144];
    for (c, q) in qs.chunks_exact_mut(32).enumerate() {
        for i in 0..32 {
            q[i] = l[64 * c + i] | (l[64 * c + i + 32] << 4);
        }
    }
}

/// Q5_K: as Q4_K with 5-bit levels; the fifth bits go to `qh`, two bits per 64 values.
fn q5_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    k_affine_block(x, y, &mut l, 31, -0.5, 15);
    let (head, qs) = y.split_at_mut(48);
    let qh = &mut head[16..48];
    qh.fill(0);
    for c in 0..4 {
        let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
        for i in 0..32 {
            let mut a = l[64 * c + i];
            let mut b = l[64 * c + i + 32];
            if a > 15 {
                a -= 16;
                qh[i] |= m1;
            }
            if b > 15 {
                b -= 16;
                qh[i] |= m2;
            }
            qs[32 * c + i] = a | (b << 4);
        }
    }
}

/// Q6_K: 16 sub-blocks of 16 with signed 8-bit scales against one f16 `d`; 6-bit levels
/// split into low nibbles (`ql`) and 2-bit highs (`qh`).
fn q6_k(x: &[f32], y: &mut [u8]) {
    const N: usize = SYMMETRIC_SUBS;
    let xt: [[f32; N]; 16] = transpose(x);
    let mut lt = [[0i32; N]; 16];
    let scales = make_qx_quants(32, &xt, &mut lt);
    let mut l = [0u8; QK_K];
    for (i, row) in lt.iter().enumerate() {
        for k in 0..N {
            l[16 * k + i] = row[k] as u8;
        }
    }
    let (mut max_scale, mut max_abs) = (0f32, 0f32);
    for &s in &scales {
        if s.abs() > max_abs {
            max_abs = s.abs();
            max_scale = s;
        }
    }
    if max_abs < GROUP_MAX_EPS {
        y.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(y, 208, 1.0 / iscale);
    let d_all = through_f16(1.0 / iscale);
    for ib in 0..QK_K / 16 {
        y[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    for j in 0..QK_K / 16 {
        let d = d_all * (y[192 + j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        for i in 0..16 {
            let q = nearest_int(x[16 * j + i] / d).clamp(-32, 31);
            l[16 * j + i] = (q + 32) as u8;
        }
    }
    let (ql, rest) = y.split_at_mut(128);
    let qh = &mut rest[..64];
    for h in 0..2 {
        let (ql, qh, l) = (
            &mut ql[64 * h..64 * h + 64],
            &mut qh[32 * h..32 * h + 32],
            &l[128 * h..128 * h + 128],
        );
        for i in 0..32 {
            ql[i] = (l[i] & 0x0f) | ((l[i + 64] & 0x0f) << 4);
            ql[i + 32] = (l[i + 32] & 0x0f) | ((l[i + 96] & 0x0f) << 4);
            qh[i] = (l[i] >> 4)
                | ((l[i + 32] >> 4) << 2)
                | ((l[i + 64] >> 4) << 4)
                | ((l[i + 96] >> 4) << 6);
        }
    }
}
