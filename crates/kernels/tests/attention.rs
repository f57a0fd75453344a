//! Attention against a plain f64 softmax per query row, with a ring cache that wraps inside
//! the key range, rows with different (sliding, causal, bidirectional) key ranges, several
//! key blocks and parts, and soft-capping; and decode's parts-then-fold equal to the tile
//! bit for bit.

use gemma3_kernels::attention::{
    attend_part, attend_rows, fold_part, key_parts, normalize, KvView,
};

mod common;
use common::Lcg;

fn reference(
    q: &[f32],
    kv: &KvView<'_>,
    keys: std::ops::Range<usize>,
    scale: f32,
    softcap: Option<f32>,
) -> Vec<f64> {
    let hd = kv.head_dim;
    let at = |p: usize| (p % kv.capacity) * kv.stride + kv.offset;
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
    // (head_dim, ring capacity, stride, offset, soft-cap): rings short enough to wrap
    // inside key ranges that cross several key parts (1024) and blocks (128).
    for &(hd, capacity, stride, offset, softcap) in &[
        (64usize, 2500usize, 128usize, 64usize, None),
        (32, 1300, 32, 0, Some(50.0f32)),
    ] {
        let k: Vec<f32> = (0..capacity * stride).map(|_| rng.f() * 2.0).collect();
        let v: Vec<f32> = (0..capacity * stride).map(|_| rng.f()).collect();
        let kv = KvView {
            k: &k,
            v: &v,
            capacity,
            stride,
            offset,
            head_dim: hd,
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
        let mut out = vec![f32::NAN; keys.len() * hd];
        attend_rows(&q, &keys, &kv, scale, softcap, &mut out);
        for (r, range) in keys.iter().enumerate() {
            let want = reference(&q[r * hd..(r + 1) * hd], &kv, range.clone(), scale, softcap);
            for i in 0..hd {
                let got = out[r * hd + i] as f64;
                assert!(
                    (got - want[i]).abs() < 1e-5,
                    "row {r} dim {i}: {got} vs {}",
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
                        scale,
                        softcap,
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
