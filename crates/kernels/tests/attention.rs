//! Tiled attention (`attend_rows`) against a plain f64 softmax per query row, with a ring
//! cache that wraps inside the key range, rows with different (sliding, causal,
//! bidirectional) key ranges, several key blocks and soft-capping.

use gemma3_kernels::attention::{attend, attend_partial, attend_rows, merge_partials, KvView};

struct Lcg(u64);
impl Lcg {
    fn f(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

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
    for &(hd, capacity, stride, offset, softcap) in &[
        (64usize, 700usize, 128usize, 64usize, None),
        (32, 300, 32, 0, Some(50.0f32)),
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
        let base = capacity + 37;
        let keys: Vec<std::ops::Range<usize>> = vec![
            base..base + 1,
            base - 250..base + 5,
            base + 3..base + 290,
            base - 100..base - 99,
            base - 130..base + 140,
        ];
        let q: Vec<f32> = (0..keys.len() * hd).map(|_| rng.f()).collect();
        let mut out = vec![f32::NAN; keys.len() * hd];
        let scale = 1.0 / (hd as f32).sqrt();
        attend_rows(&q, &keys, &kv, scale, softcap, &mut out);
        let mut scores = vec![0f32; 400];
        for (r, range) in keys.iter().enumerate() {
            let want = reference(&q[r * hd..(r + 1) * hd], &kv, range.clone(), scale, softcap);
            let mut one = vec![0f32; hd];
            attend(
                &q[r * hd..(r + 1) * hd],
                &kv,
                range.start,
                range.end,
                scale,
                softcap,
                &mut scores,
                &mut one,
            );
            for i in 0..hd {
                let (got, single) = (out[r * hd + i] as f64, one[i] as f64);
                assert!(
                    (got - want[i]).abs() < 1e-5,
                    "row {r} dim {i}: {got} vs {}",
                    want[i]
                );
                assert!(
                    (single - want[i]).abs() < 1e-5,
                    "attend row {r} dim {i}: {single} vs {}",
                    want[i]
                );
            }
        }
        // Decode's way: three query rows sharing one key range, split into parts (one
        // of them crossing the ring's wrap) and merged.
        let range = base - 300..base + 45;
        let rows = 3;
        let q3 = &q[..rows * hd];
        let cuts = [range.start, range.start + 7, base - 2, base + 1, range.end];
        let parts = cuts.len() - 1;
        let (mut acc, mut max, mut sum) = (
            vec![0f32; parts * rows * hd],
            vec![0f32; parts * rows],
            vec![0f32; parts * rows],
        );
        let mut scores = vec![0f32; rows * 400];
        for c in 0..parts {
            attend_partial(
                q3,
                rows,
                &kv,
                cuts[c],
                cuts[c + 1],
                scale,
                softcap,
                &mut scores,
                &mut acc[c * rows * hd..(c + 1) * rows * hd],
                &mut max[c * rows..(c + 1) * rows],
                &mut sum[c * rows..(c + 1) * rows],
            );
        }
        for r in 0..rows {
            let mut got = vec![0f32; hd];
            merge_partials(&acc, &max, &sum, parts, rows, hd, r, &mut got);
            let want = reference(
                &q3[r * hd..(r + 1) * hd],
                &kv,
                range.clone(),
                scale,
                softcap,
            );
            for i in 0..hd {
                assert!(
                    (got[i] as f64 - want[i]).abs() < 1e-5,
                    "merged row {r} dim {i}"
                );
            }
        }
    }
}
