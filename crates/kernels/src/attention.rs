//! Scaled dot-product attention of one query head over a contiguous range of cached keys,
//! with the softmax in f32. Keys and values are read where they lie in the cache (a ring
//! for sliding layers), so grouped-query heads share K/V without copies.

use crate::dispatch;
use crate::ops::{axpy_body, dot_body};

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

// `attend(q, kv, lo, hi, scale, softcap, scores, out)`:
// `out = softmax(q·K[lo..hi]ᵀ * scale) · V[lo..hi]`, `scores` holding `hi - lo` floats;
// scores are capped with `c·tanh(s/c)` when `softcap` is set. Compiled once per instruction
// set as a whole, so the per-key dot products are inlined.
dispatch!(pub fn attend(q: &[f32], kv: &KvView<'_>, lo: usize, hi: usize, scale: f32, softcap: Option<f32>, scores: &mut [f32], out: &mut [f32]) => attend_body);

#[inline(always)]
fn attend_body<const FMA: bool>(
    q: &[f32],
    kv: &KvView<'_>,
    lo: usize,
    hi: usize,
    scale: f32,
    softcap: Option<f32>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = kv.head_dim;
    let scores = &mut scores[..hi - lo];
    let mut max = f32::NEG_INFINITY;
    for (s, p) in scores.iter_mut().zip(lo..hi) {
        let o = kv.at(p);
        *s = dot_body::<FMA>(q, &kv.k[o..o + hd]) * scale;
        if let Some(c) = softcap {
            *s = c * (*s / c).tanh();
        }
        max = max.max(*s);
    }
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    out[..hd].fill(0.0);
    for (s, p) in scores.iter().zip(lo..hi) {
        let o = kv.at(p);
        axpy_body::<FMA>(*s * inv, &kv.v[o..o + hd], &mut out[..hd]);
    }
}
