//! Scaled dot-product attention over a range of cached keys, with the softmax in f32. The
//! query heads that share a kv head are taken together, so each key and value is read once
//! for all of them, where it lies in the cache (a ring for sliding layers): no copies per
//! head. Keys go in blocks whose scores are one small matrix product, under an online
//! softmax, so no score row outgrows a block.

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

/// Keys per block: a block's scores for a tile of rows are one small matrix product.
const KEY_BLOCK: usize = 256;

/// Keys per part (whole blocks). Parts and blocks start at multiples of their size in
/// position space, so a row meets the same blocks in the same order whichever tile or step
/// computes it: prefill and decode give identical results, and decode may compute the
/// parts of a long range in parallel and fold them afterwards.
pub const KEY_PART: usize = 1024;

/// The parts `keys` touches, as absolute position ranges clipped to `keys`.
pub fn key_parts(keys: std::ops::Range<usize>) -> impl Iterator<Item = std::ops::Range<usize>> {
    let n = keys.end.div_ceil(KEY_PART) - keys.start / KEY_PART;
    (0..n).map(move |i| key_part(&keys, i))
}

/// Part `i` (counted from the first) of those [`key_parts`] yields.
pub fn key_part(keys: &std::ops::Range<usize>, i: usize) -> std::ops::Range<usize> {
    let p = keys.start / KEY_PART + i;
    (p * KEY_PART).max(keys.start)..((p + 1) * KEY_PART).min(keys.end)
}

/// Per-thread buffers of [`attend_rows`], grown once: one part's state and the running
/// maxima and sums. (The score tile of [`attend_part`] is `SCORES`.)
#[derive(Default)]
struct Scratch {
    part_acc: Vec<f32>,
    part_max: Vec<f32>,
    part_sum: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// The softmax state of `rows` query rows over the keys of one part (`part`, inside one
/// [`KEY_PART`]-aligned part), left unnormalised for [`fold_part`]: per row the largest
/// score `max`, `sum = Σ exp(score - max)` and `acc = Σ exp(score - max)·V`. Row `r` sees the
/// keys `keys[r] ∩ part`. `q` and `acc` are row-major `rows × head_dim`. A row with no key in
/// the part gets `max = -inf`, `sum = 0`, `acc = 0`.
#[allow(clippy::too_many_arguments)]
pub fn attend_part(
    q: &[f32],
    keys: &[std::ops::Range<usize>],
    kv: &KvView<'_>,
    scale: f32,
    softcap: Option<f32>,
    part: std::ops::Range<usize>,
    acc: &mut [f32],
    max: &mut [f32],
    sum: &mut [f32],
) {
    use crate::gemm::{gemm, gemm_into, BOperand, MatMut, MatRef};
    let hd = kv.head_dim;
    let rows = keys.len();
    assert!(q.len() >= rows * hd && acc.len() >= rows * hd && max.len() >= rows);
    acc[..rows * hd].fill(0.0);
    max[..rows].fill(f32::NEG_INFINITY);
    sum[..rows].fill(0.0);
    let qv = MatRef::row_major(&q[..rows * hd], rows, hd);
    SCORES.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < rows * KEY_BLOCK {
            s.resize(rows * KEY_BLOCK, 0.0);
        }
        let mut k0 = part.start;
        while k0 < part.end {
            // Blocks end at multiples of KEY_BLOCK and never cross the ring's wrap, so their
            // keys are evenly strided.
            let wrap = (k0 / kv.capacity + 1) * kv.capacity;
            let k1 = ((k0 / KEY_BLOCK + 1) * KEY_BLOCK).min(part.end).min(wrap);
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
    });
}

/// Folds a part's state (`acc_p`, `max_p`, `sum_p`) into a running one, row by row; the
/// same arithmetic wherever the parts were computed. Start from `acc = 0`, `max = -inf`,
/// `sum = 0` and fold the parts in position order.
pub fn fold_part(
    acc: &mut [f32],
    max: &mut [f32],
    sum: &mut [f32],
    acc_p: &[f32],
    max_p: &[f32],
    sum_p: &[f32],
    hd: usize,
) {
    for r in 0..max_p.len() {
        if max_p[r] == f32::NEG_INFINITY {
            continue;
        }
        let m = max[r].max(max_p[r]);
        let (a, b) = ((max[r] - m).exp(), (max_p[r] - m).exp());
        sum[r] = sum[r] * a + sum_p[r] * b;
        for (x, y) in acc[r * hd..(r + 1) * hd]
            .iter_mut()
            .zip(&acc_p[r * hd..(r + 1) * hd])
        {
            *x = *x * a + y * b;
        }
        max[r] = m;
    }
}

/// Attention of query rows that share one key/value head (the query heads of a group, for
/// one or many positions): `out[r] = softmax(q[r]·K[keys[r]]ᵀ · scale) · V[keys[r]]`, scores
/// capped with `c·tanh(s/c)` when `softcap` is set. Parts are computed and folded in order
/// ([`attend_part`], [`fold_part`]), so a key is read once per tile of rows and no score
/// row is longer than a block, however long the context.
pub fn attend_rows(
    q: &[f32],
    keys: &[std::ops::Range<usize>],
    kv: &KvView<'_>,
    scale: f32,
    softcap: Option<f32>,
    out: &mut [f32],
) {
    let hd = kv.head_dim;
    let rows = keys.len();
    let lo = keys.iter().map(|r| r.start).min().unwrap_or(0);
    let hi = keys.iter().map(|r| r.end).max().unwrap_or(0);
    let out = &mut out[..rows * hd];
    out.fill(0.0);
    SCRATCH.with(|t| {
        let t = &mut *t.borrow_mut();
        t.part_acc.resize(rows * hd, 0.0);
        t.part_max.resize(rows, 0.0);
        t.part_sum.resize(rows, 0.0);
        t.max.clear();
        t.max.resize(rows, f32::NEG_INFINITY);
        t.sum.clear();
        t.sum.resize(rows, 0.0);
        for part in key_parts(lo..hi) {
            attend_part(
                q,
                keys,
                kv,
                scale,
                softcap,
                part,
                &mut t.part_acc,
                &mut t.part_max,
                &mut t.part_sum,
            );
            fold_part(
                out,
                &mut t.max,
                &mut t.sum,
                &t.part_acc,
                &t.part_max[..rows],
                &t.part_sum,
                hd,
            );
        }
        normalize(out, &t.sum, hd);
    });
}

/// Divides each row of a folded state by its sum: the attention output.
pub fn normalize(acc: &mut [f32], sum: &[f32], hd: usize) {
    for (row, s) in acc.chunks_mut(hd).zip(sum) {
        let inv = 1.0 / s;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}
