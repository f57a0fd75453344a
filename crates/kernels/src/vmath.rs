//! Vectorised `exp` and what is built on it: softmax and tanh-approximated GELU for the
//! vision tower, where libm's scalar calls would cost as much as the matrix products
//! (16 heads × 4096² scores per layer), and attention's per-block scores. Accurate to a
//! few ulp, far inside what an f32 model can tell apart.

use crate::dispatch;

/// Cephes' `expf`: `2^n · e^r` with `|r| <= ln2/2` and a degree-6 polynomial, about 1 ulp.
/// Branch-free so that loops over it vectorise; inputs below -87.3 give 0, above 88.3 are
/// clamped (2^n must stay a finite float).
#[inline(always)]
pub(crate) fn exp_body<const FMA: bool>(x: f32) -> f32 {
    use crate::ops::fmadd;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.3, 88.3);
    let n = fmadd::<FMA>(xc, LOG2E, 0.5).floor();
    let r = fmadd::<FMA>(n, -C2, fmadd::<FMA>(n, -C1, xc));
    let mut y = 1.987_569_2e-4;
    y = fmadd::<FMA>(y, r, 1.398_199_9e-3);
    y = fmadd::<FMA>(y, r, 8.333_452e-3);
    y = fmadd::<FMA>(y, r, 4.166_579_6e-2);
    y = fmadd::<FMA>(y, r, 1.666_666_5e-1);
    y = fmadd::<FMA>(y, r, 0.5);
    y = fmadd::<FMA>(y, r * r, r) + 1.0;
    // 2^n without a float-to-int conversion (Rust's saturating `as` does not vectorise
    // well): n is a whole number in [-126, 127], so in n + 2^23 + 127 the low mantissa
    // bits are the biased exponent.
    let scale = f32::from_bits(((n + 8_388_735.0).to_bits() & 0xff) << 23);
    if x < -87.3 {
        0.0
    } else {
        y * scale
    }
}

/// Lanes of the reductions here: a fixed order, and one that vectorises.
const LANES: usize = 16;

/// The largest of `x` (`-inf` for none), in [`LANES`] lanes (the same in any order).
#[inline(always)]
fn lanes_max(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            m[l] = m[l].max(c[l]);
        }
    }
    let rest = chunks.remainder().iter();
    m.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

#[inline(always)]
fn softmax_body<const FMA: bool>(x: &mut [f32], scale: f32) {
    // softmax(scale·x), scale > 0.
    // Max and sum in 16 lanes (a fixed order, and one that vectorises).
    let max = lanes_max(x) * scale;
    let mut s = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_body::<FMA>(crate::ops::fmadd::<FMA>(c[l], scale, -max));
            s[l] += c[l];
        }
    }
    for (l, v) in chunks.into_remainder().iter_mut().enumerate() {
        *v = exp_body::<FMA>(crate::ops::fmadd::<FMA>(*v, scale, -max));
        s[l] += *v;
    }
    let inv = 1.0 / s.iter().sum::<f32>();
    for v in x.iter_mut() {
        *v *= inv;
    }
}
dispatch!(pub fn softmax_scaled(x: &mut [f32], scale: f32) => softmax_body);

/// `gelu(x)` with the tanh approximation, as `x · sigmoid(2u)`, `u = √(2/π)(x + 0.044715x³)`
/// (the same function as `0.5x(1 + tanh u)`).
#[inline(always)]
fn gelu_body<const FMA: bool>(x: &mut [f32]) {
    const C: f32 = 0.797_884_6;
    for v in x.iter_mut() {
        let u = C * (*v + 0.044715 * *v * *v * *v);
        *v /= 1.0 + exp_body::<FMA>(-2.0 * u);
    }
}
dispatch!(pub fn gelu_tanh_inplace(x: &mut [f32]) => gelu_body);

#[inline(always)]
fn exp_slice_body<const FMA: bool>(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = exp_body::<FMA>(*v);
    }
}
dispatch!(pub fn exp_inplace(x: &mut [f32]) => exp_slice_body);

/// Attention's raw scores in place: `x·scale`, then `c·tanh(x/c)` with a soft-cap `c`;
/// returns their maximum (`-inf` for none). The maximum is the same in any order.
#[inline(always)]
fn scores_max_body<const FMA: bool>(x: &mut [f32], scale: f32, softcap: Option<f32>) -> f32 {
    for v in x.iter_mut() {
        *v *= scale;
    }
    if let Some(c) = softcap {
        for v in x.iter_mut() {
            *v = c * (*v / c).tanh();
        }
    }
    lanes_max(x)
}
dispatch!(pub fn scores_max(x: &mut [f32], scale: f32, softcap: Option<f32>) -> f32 => scores_max_body);

/// `x` becomes `exp(x - max)`; returns its sum, added up in [`LANES`] running sums and then
/// those in order (the same order on every level and for every caller).
#[inline(always)]
fn exp_sum_body<const FMA: bool>(x: &mut [f32], max: f32) -> f32 {
    let mut s = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_body::<FMA>(c[l] - max);
            s[l] += c[l];
        }
    }
    for (l, v) in chunks.into_remainder().iter_mut().enumerate() {
        *v = exp_body::<FMA>(*v - max);
        s[l] += *v;
    }
    s.iter().sum()
}
dispatch!(pub fn exp_sum(x: &mut [f32], max: f32) -> f32 => exp_sum_body);

#[inline(always)]
fn softmax_columns_body<const FMA: bool>(
    x: &mut [f32],
    cols: usize,
    scale: f32,
    inv_sums: &mut [f32],
) {
    let inv_sums = &mut inv_sums[..cols];
    let max = inv_sums;
    max.fill(f32::NEG_INFINITY);
    for row in x.chunks_exact(cols) {
        for (m, v) in max.iter_mut().zip(row) {
            // `max`, not `if v > m { v } else { m }`: LLVM reads the latter as a store only
            // where v is larger and vectorises it into masked stores, several times slower.
            // (Equal results: neither takes a NaN over a number, and m starts at -inf.)
            *m = m.max(*v);
        }
    }
    // exp(scale·x - scale·max), column sums kept in a second row-sized buffer.
    let neg: Vec<f32> = max.iter().map(|m| -m * scale).collect();
    let mut sums = vec![0f32; cols];
    for row in x.chunks_exact_mut(cols) {
        for ((v, s), nm) in row.iter_mut().zip(sums.iter_mut()).zip(&neg) {
            *v = exp_body::<FMA>(crate::ops::fmadd::<FMA>(*v, scale, *nm));
            *s += *v;
        }
    }
    for (m, s) in max.iter_mut().zip(&sums) {
        *m = 1.0 / s;
    }
}
dispatch!(pub fn softmax_columns_raw(x: &mut [f32], cols: usize, scale: f32, inv_sums: &mut [f32]) => softmax_columns_body);

/// Softmax down each column of a row-major `rows × cols` matrix, of `scale · x` (scale > 0),
/// left unnormalized: `x` becomes `exp(scale·(x - column max))` and `inv_sums[j]` the
/// reciprocal of column `j`'s sum (the caller scales whatever it computes from `x`).
pub fn softmax_columns(x: &mut [f32], cols: usize, scale: f32, inv_sums: &mut [f32]) {
    assert!(cols > 0 && x.len().is_multiple_of(cols) && inv_sums.len() >= cols);
    softmax_columns_raw(x, cols, scale, inv_sums)
}
