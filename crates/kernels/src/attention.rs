//! Scaled dot-product attention of one query head over a contiguous range of cached keys,
//! with the softmax in f32. Keys and values are read where they lie in the cache (a ring
//! for sliding layers), so grouped-query heads share K/V without copies.

use crate::dispatch;
use crate::ops::{axpy_body, dot_body};
use crate::vmath::exp_body;

/// Where key/value position `p` lives: `base + (p % capacity) * stride`.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// Slots in the ring (positions wrap modulo this).
    pub capacity: usize,
    /// Floats between consecutive positions.
    pub stride: usize,
    /// Offset of this kv head inside a position's row.
    pub offset: usize,
    pub head_dim: usize,
}

impl KvView<'_> {
    #[inline]
    fn at(&self, p: usize) -> usize {
        (p % self.capacity) * self.stride + self.offset
    }
}

/// `out = softmax(q·K[lo..hi]ᵀ · scale) · V[lo..hi]` for one query row; `scores` holds at
/// least `hi - lo` floats. Scores are capped with `c·tanh(s/c)` when `softcap` is set.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    kv: &KvView<'_>,
    lo: usize,
    hi: usize,
    scale: f32,
    softcap: Option<f32>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (mut max, mut sum) = ([0f32], [0f32]);
    let hd = kv.head_dim;
    attend_partial(
        q,
        1,
        kv,
        lo,
        hi,
        scale,
        softcap,
        scores,
        &mut out[..hd],
        &mut max,
        &mut sum,
    );
    let inv = 1.0 / sum[0];
    out[..hd].iter_mut().for_each(|v| *v *= inv);
}

// `attend_partial(q, rows, kv, lo, hi, scale, softcap, scores, acc, max, sum)`: the query
// rows `q` (`rows × head_dim`, the heads sharing this kv head) over keys `lo..hi`, each key
// and value read once for all rows. Leaves the softmax unnormalised, as a state that
// [`merge_partials`] can combine across key ranges: per row the largest score `max`, the
// sum of `exp(score - max)` and `acc = Σ exp(score - max)·V`. `scores` holds at least
// `rows × (hi - lo)` floats. Compiled once per instruction set as a whole.
dispatch!(pub fn attend_partial(q: &[f32], rows: usize, kv: &KvView<'_>, lo: usize, hi: usize, scale: f32, softcap: Option<f32>, scores: &mut [f32], acc: &mut [f32], max: &mut [f32], sum: &mut [f32]) => attend_partial_body);

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_partial_body<const FMA: bool>(
    q: &[f32],
    rows: usize,
    kv: &KvView<'_>,
    lo: usize,
    hi: usize,
    scale: f32,
    softcap: Option<f32>,
    scores: &mut [f32],
    acc: &mut [f32],
    max: &mut [f32],
    sum: &mut [f32],
) {
    let hd = kv.head_dim;
    let len = hi - lo;
    let scores = &mut scores[..rows * len];
    for (j, p) in (lo..hi).enumerate() {
        let o = kv.at(p);
        let k = &kv.k[o..o + hd];
        for r in 0..rows {
            let mut s = dot_body::<FMA>(&q[r * hd..(r + 1) * hd], k) * scale;
            if let Some(c) = softcap {
                s = c * (s / c).tanh();
            }
            scores[r * len + j] = s;
        }
    }
    for r in 0..rows {
        let row = &mut scores[r * len..(r + 1) * len];
        let m = row
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        let mut s = 0.0;
        for v in row.iter_mut() {
            *v = exp_body::<FMA>(*v - m);
            s += *v;
        }
        max[r] = m;
        sum[r] = s;
    }
    acc[..rows * hd].fill(0.0);
    for (j, p) in (lo..hi).enumerate() {
        let o = kv.at(p);
        let v = &kv.v[o..o + hd];
        for r in 0..rows {
            axpy_body::<FMA>(scores[r * len + j], v, &mut acc[r * hd..(r + 1) * hd]);
        }
    }
}

/// Combines [`attend_partial`] states over disjoint key ranges into row `row`'s normalised
/// output `out`. Part `c` keeps its `rows` rows at `acc[(c·rows + r)·hd..]`,
/// `max[c·rows + r]`, `sum[c·rows + r]`.
#[allow(clippy::too_many_arguments)]
pub fn merge_partials(
    acc: &[f32],
    max: &[f32],
    sum: &[f32],
    parts: usize,
    rows: usize,
    hd: usize,
    row: usize,
    out: &mut [f32],
) {
    let m = (0..parts)
        .map(|c| max[c * rows + row])
        .fold(f32::NEG_INFINITY, f32::max);
    let out = &mut out[..hd];
    out.fill(0.0);
    let mut total = 0.0;
    for c in 0..parts {
        // A part whose keys were all far below the maximum adds nothing.
        let w = (max[c * rows + row] - m).exp();
        if w == 0.0 {
            continue;
        }
        total += w * sum[c * rows + row];
        let a = &acc[(c * rows + row) * hd..(c * rows + row + 1) * hd];
        out.iter_mut().zip(a).for_each(|(o, a)| *o += w * a);
    }
    let inv = 1.0 / total;
    out.iter_mut().for_each(|v| *v *= inv);
}

/// Keys per block of [`attend_rows`]: the score tile is `rows × KEY_BLOCK`.
const KEY_BLOCK: usize = 128;

thread_local! {
    /// Score tile, running output, row maxima and sums of [`attend_rows`]; grown once.
    static TILE: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new(), Vec::new())) };
}

/// Attention of many query rows that share one key/value head (the query heads of a
/// group, for a run of positions): `out[r] = softmax(q[r]·K[keys[r]]ᵀ · scale) · V[keys[r]]`,
/// with `q` and `out` row-major `rows × head_dim`. Keys are taken in blocks of
/// [`KEY_BLOCK`]: each block's scores for every row are one small matrix product, so a key
/// is read once for all rows; a running (online) softmax rescales what is already summed
/// when a later block raises a row's maximum, so no score row longer than a block exists
/// however long the context.
pub fn attend_rows(
    q: &[f32],
    keys: &[std::ops::Range<usize>],
    kv: &KvView<'_>,
    scale: f32,
    softcap: Option<f32>,
    out: &mut [f32],
) {
    use crate::gemm::{gemm, gemm_into, BOperand, MatMut, MatRef};
    let hd = kv.head_dim;
    let rows = keys.len();
    assert!(q.len() >= rows * hd && out.len() >= rows * hd);
    let lo = keys.iter().map(|r| r.start).min().unwrap_or(0);
    let hi = keys.iter().map(|r| r.end).max().unwrap_or(0);
    TILE.with(|t| {
        let mut t = t.borrow_mut();
        let (s, acc, max, sum) = &mut *t;
        s.resize(rows * KEY_BLOCK, 0.0);
        acc.resize(rows * hd, 0.0);
        max.resize(rows, 0.0);
        sum.resize(rows, 0.0);
        acc[..rows * hd].fill(0.0);
        max[..rows].fill(f32::NEG_INFINITY);
        sum[..rows].fill(0.0);
        let qv = MatRef::row_major(&q[..rows * hd], rows, hd);
        let mut k0 = lo;
        while k0 < hi {
            // A block never crosses the ring's wrap, so its keys are evenly strided.
            let wrap = (k0 / kv.capacity + 1) * kv.capacity;
            let k1 = (k0 + KEY_BLOCK).min(hi).min(wrap);
            let nk = k1 - k0;
            let at = kv.at(k0);
            let span = (nk - 1) * kv.stride + hd;
            let kt = MatRef::new(&kv.k[at..at + span], hd, nk, 1, kv.stride);
            let vb = MatRef::new(&kv.v[at..at + span], nk, hd, kv.stride, 1);
            let s = &mut s[..rows * nk];
            gemm_into(qv, BOperand::F32(kt), MatMut::row_major(s, rows, nk), false);
            for (r, range) in keys.iter().enumerate() {
                let row = &mut s[r * nk..(r + 1) * nk];
                let (a, b) = (range.start.clamp(k0, k1) - k0, range.end.clamp(k0, k1) - k0);
                if a >= b {
                    row.fill(0.0);
                    continue;
                }
                row[..a].fill(0.0);
                row[b..].fill(0.0);
                let live = &mut row[a..b];
                let mut m = f32::NEG_INFINITY;
                for v in live.iter_mut() {
                    *v *= scale;
                    if let Some(c) = softcap {
                        *v = c * (*v / c).tanh();
                    }
                    m = m.max(*v);
                }
                let m_new = max[r].max(m);
                if m_new > max[r] {
                    // Earlier blocks were summed against a smaller maximum.
                    let c = (max[r] - m_new).exp();
                    sum[r] *= c;
                    acc[r * hd..(r + 1) * hd].iter_mut().for_each(|v| *v *= c);
                    max[r] = m_new;
                }
                live.iter_mut().for_each(|v| *v -= m_new);
                crate::vmath::exp_inplace(live);
                sum[r] += live.iter().sum::<f32>();
            }
            gemm(
                MatRef::row_major(s, rows, nk),
                BOperand::F32(vb),
                MatMut::row_major(&mut acc[..rows * hd], rows, hd),
                false,
            );
            k0 = k1;
        }
        for r in 0..rows {
            let inv = 1.0 / sum[r];
            for (o, a) in out[r * hd..(r + 1) * hd]
                .iter_mut()
                .zip(&acc[r * hd..(r + 1) * hd])
            {
                *o = a * inv;
            }
        }
    });
}
