//! Attention against a plain f64 softmax per query row, with a ring cache that wraps inside
//! the key range, rows with different (sliding, causal, bidirectional) key ranges, several
//! key blocks and parts, and soft-capping; and decode's parts-then-fold equal to the tile
//! bit for bit.

use gemma3_formats::DType;
use gemma3_kernels::attention::{
    attend_batch, attend_part, attend_rows, fold_part, key_parts, kv_row_bytes, new_page,
    normalize, store_key, store_row, store_value, AttnScratch, Heads, KvView, Page, Scores,
    KV_TYPES, PAGE,
};

mod common;
use common::Lcg;

/// A ring cache as flat position-major rows (`capacity × stride`, kv head `h` at
/// `h · head_dim`) holding the values the cache type keeps, and the same as typed pages.
struct Ring {
    k: Vec<f32>,
    v: Vec<f32>,
    capacity: usize,
    stride: usize,
    head_dim: usize,
    ty: DType,
    k_pages: Vec<Page>,
    v_pages: Vec<Page>,
}

impl Ring {
    fn new(rng: &mut Lcg, capacity: usize, stride: usize, head_dim: usize) -> Ring {
        Self::typed(rng, capacity, stride, head_dim, DType::F32)
    }

    fn typed(rng: &mut Lcg, capacity: usize, stride: usize, head_dim: usize, ty: DType) -> Ring {
        let mut k: Vec<f32> = (0..capacity * stride).map(|_| rng.f() * 2.0).collect();
        let mut v: Vec<f32> = (0..capacity * stride).map(|_| rng.f()).collect();
        let heads = stride / head_dim;
        let rb = kv_row_bytes(ty, head_dim).unwrap();
        // Store every row, and keep in the flat copy what the type gives back.
        type Store = fn(DType, &[f32], &mut Page, usize, usize, usize);
        let paged = |flat: &mut [f32], store: Store| -> Vec<Page> {
            (0..capacity / PAGE)
                .map(|p| {
                    let mut page = new_page(heads * PAGE, rb);
                    for h in 0..heads {
                        for r in 0..PAGE {
                            let src = (p * PAGE + r) * stride + h * head_dim;
                            let row = &mut flat[src..src + head_dim];
                            store(ty, row, &mut page, h, r, rb);
                            // What the type keeps of the row.
                            let mut one = new_page(1, rb);
                            store_row(ty, row, &mut one, 0, rb);
                            let bytes: Vec<u8> = one.iter().flat_map(|w| w.to_le_bytes()).collect();
                            gemma3_formats::quant::dequantize(ty, &bytes[..rb], row);
                        }
                    }
                    page
                })
                .collect()
        };
        let (k_pages, v_pages) = (paged(&mut k, store_key), paged(&mut v, store_value));
        Ring {
            k,
            v,
            capacity,
            stride,
            head_dim,
            ty,
            k_pages,
            v_pages,
        }
    }

    fn view(&self, head: usize) -> KvView<'_> {
        KvView {
            k: &self.k_pages,
            v: &self.v_pages,
            k_type: self.ty,
            v_type: self.ty,
            capacity: self.capacity,
            head,
            head_dim: self.head_dim,
        }
    }
}

fn reference(
    q: &[f32],
    ring: &Ring,
    head: usize,
    keys: std::ops::Range<usize>,
    scale: f32,
    softcap: Option<f32>,
) -> Vec<f64> {
    let hd = ring.head_dim;
    let kv = ring;
    let at = |p: usize| (p % ring.capacity) * ring.stride + head * hd;
    let s: Vec<f64> = keys
        .clone()
        .map(|p| {
            let d: f64 = (0..hd)
                .map(|i| q[i] as f64 * kv.k[at(p) + i] as f64)
                .sum::<f64>()
                * scale as f64;
            softcap.map_or(d, |c| c as f64 * (d / c as f64).tanh())
        })
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
    let sum: f64 = e.iter().sum();
    (0..hd)
        .map(|i| {
            keys.clone()
                .zip(&e)
                .map(|(p, w)| w * kv.v[at(p) + i] as f64)
                .sum::<f64>()
                / sum
        })
        .collect()
}

#[test]
fn tiled_attention_matches_a_plain_softmax() {
    let mut rng = Lcg(99);
    // (head_dim, ring capacity, stride, kv head, soft-cap): rings short enough to wrap
    // inside key ranges that cross several key parts (1024) and blocks (256).
    for (&(hd, capacity, stride, head, softcap), ty) in [
        (64usize, 2560usize, 128usize, 1usize, None),
        (32, 1280, 32, 0, Some(50.0f32)),
    ]
    .iter()
    .flat_map(|c| KV_TYPES.iter().map(move |t| (c, *t)))
    {
        let ring = Ring::typed(&mut rng, capacity, stride, hd, ty);
        let kv = ring.view(head);
        let scores = Scores {
            scale: 0.0,
            softcap,
        };
        // Positions past the capacity wrap around the ring.
        let base = 2 * capacity + 37;
        let keys: Vec<std::ops::Range<usize>> = vec![
            base..base + 1,
            base - 1250..base + 5,
            base + 3..base + 290,
            base - 100..base - 99,
            base - 1030..base + 140,
        ];
        let q: Vec<f32> = (0..keys.len() * hd).map(|_| rng.f()).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let scores = Scores { scale, ..scores };
        let mut out = vec![f32::NAN; keys.len() * hd];
        attend_rows(&q, &keys, &kv, scores, &mut out);
        for (r, range) in keys.iter().enumerate() {
            let want = reference(
                &q[r * hd..(r + 1) * hd],
                &ring,
                head,
                range.clone(),
                scale,
                softcap,
            );
            for i in 0..hd {
                let got = out[r * hd + i] as f64;
                assert!(
                    (got - want[i]).abs() < 1e-5,
                    "{ty} row {r} dim {i}: {got} vs {}",
                    want[i]
                );
            }
            // Decode's way: this row alone, its parts computed separately (in any order)
            // and folded in position order: the same bits as the tile of all rows.
            let parts: Vec<_> = key_parts(range.clone()).collect();
            let mut states: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = parts
                .iter()
                .rev()
                .map(|part| {
                    let (mut acc, mut max, mut sum) =
                        (vec![0f32; hd], vec![0f32; 1], vec![0f32; 1]);
                    let row = &q[r * hd..(r + 1) * hd];
                    let ks = std::slice::from_ref(range);
                    attend_part(
                        row,
                        ks,
                        &kv,
                        scores,
                        part.clone(),
                        &mut acc,
                        &mut max,
                        &mut sum,
                    );
                    (acc, max, sum)
                })
                .collect();
            states.reverse();
            let (mut acc, mut max, mut sum) = (vec![0f32; hd], vec![f32::NEG_INFINITY], vec![0f32]);
            for (a, m, s) in &states {
                fold_part(&mut acc, &mut max, &mut sum, a, m, s, hd);
            }
            normalize(&mut acc, &sum, hd);
            assert_eq!(
                &acc[..],
                &out[r * hd..(r + 1) * hd],
                "row {r}: parts differ from the tile"
            );
        }
    }
}

/// A batch of three sequences, each with its own cache: a prompt chunk (tiled), a decode
/// row with a long key range (parts in parallel), and a short chunk. Every row and head
/// equals that row computed alone, bit for bit, and a plain softmax.
#[test]
fn batch_rows_equal_their_solo_results() {
    let mut rng = Lcg(7);
    let heads = Heads {
        q: 4,
        kv: 2,
        dim: 32,
    };
    let (hd, qd, group) = (heads.dim, heads.q * heads.dim, heads.group());
    let stride = heads.kv * hd;
    let rings = [
        Ring::new(&mut rng, 1024, stride, hd),
        Ring::new(&mut rng, 3072, stride, hd),
        Ring::new(&mut rng, 512, stride, hd),
    ];
    // Segment 0: 12 prompt rows at 900.. (causal); 1: one row at 2900 seeing 0..=2900;
    // 2: three rows at 700.. with a sliding window of 300.
    let mut keys = vec![];
    let mut segments = vec![];
    let mut add = |n: usize,
                   rows: &mut Vec<std::ops::Range<usize>>,
                   f: &dyn Fn(usize) -> std::ops::Range<usize>| {
        let start = rows.len();
        for t in 0..n {
            rows.push(f(t));
        }
        segments.push(start..rows.len());
    };
    add(12, &mut keys, &|t| 0..900 + t + 1);
    add(1, &mut keys, &|_| 0..2901);
    add(3, &mut keys, &|t| (700 + t + 1 - 300)..700 + t + 1);
    let q = rng.vec(keys.len() * qd);
    let scores = Scores {
        scale: 0.17,
        softcap: None,
    };
    let mut out = vec![f32::NAN; keys.len() * qd];
    let mut scratch = AttnScratch::new(heads, 1, 64);
    let kv = |s: usize, h: usize| rings[s].view(h);
    attend_batch(
        &q,
        &keys,
        &segments,
        &kv,
        heads,
        scores,
        &mut out,
        &mut scratch,
    );
    for (s, rows) in segments.iter().enumerate() {
        for r in rows.clone() {
            for h in 0..heads.q {
                let kvh = h / group;
                let qh = &q[r * qd + h * hd..r * qd + (h + 1) * hd];
                let mut solo = vec![0f32; hd];
                attend_rows(
                    qh,
                    std::slice::from_ref(&keys[r]),
                    &rings[s].view(kvh),
                    scores,
                    &mut solo,
                );
                let got = &out[r * qd + h * hd..r * qd + (h + 1) * hd];
                assert_eq!(got, &solo[..], "segment {s} row {r} head {h}");
                let want = reference(qh, &rings[s], kvh, keys[r].clone(), scores.scale, None);
                for i in 0..hd {
                    assert!(
                        (got[i] as f64 - want[i]).abs() < 1e-5,
                        "row {r} head {h} dim {i}"
                    );
                }
            }
        }
    }
}
