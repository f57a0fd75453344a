//! Times decode attention's two few-row products on a q8_0 cache, on one core: per
//! 256-key block, scores = Q·Kᵀ (keys transposed, `Q8Cols`) then acc += S·V (`Q8Rows`), 4
//! query rows (270M's group), head dim 256, with the `Warm` hints attention passes; then
//! each product alone. Prints the best of 7 runs, in µs per block.
//!
//! `few_rows_time [BLOCKS] [f16]`: 600 blocks (the default) come from memory; 8 stay in
//! the second-level cache. With `f16`, an f16 cache instead of q8_0.
use gemma3_kernels::gemm::{gemm_few_rows, RowsB, Warm};
use std::time::Instant;

fn main() {
    let (hd, nk, rows) = (256usize, 256usize, 4usize);
    let blocks: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let mut x = 1u32;
    let mut rnd = || {
        x = x.wrapping_mul(1664525).wrapping_add(1013904223);
        (x >> 24) as u8
    };
    let kq: Vec<u8> = (0..blocks * hd * nk).map(|_| rnd()).collect();
    let ks: Vec<u8> = (0..blocks * hd / 32 * nk)
        .flat_map(|_| half::f16::from_f32(0.01).to_le_bytes())
        .collect();
    let vrow = hd / 32 * 34;
    let mut v: Vec<u8> = (0..blocks * nk * vrow).map(|_| rnd()).collect();
    for blk in v.chunks_mut(34) {
        blk[..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
    }
    let q: Vec<f32> = (0..rows * hd).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut s = vec![0f32; rows * nk];
    let mut acc = vec![0f32; rows * hd];
    // f16 keys and values: any bytes with the exponent bits tamed.
    let f16 = std::env::args().nth(2).as_deref() == Some("f16");
    let halves = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                half::f16::from_f32(((i * 7919) % 255) as f32 / 255.0 - 0.5).to_le_bytes()
            })
            .collect()
    };
    let (kh, vh) = if f16 {
        (halves(blocks * hd * nk), halves(blocks * nk * hd))
    } else {
        (vec![], vec![])
    };
    let kb = |b: usize| {
        if f16 {
            RowsB::F16(&kh[2 * b * hd * nk..2 * (b + 1) * hd * nk])
        } else {
            RowsB::Q8Cols {
                q: &kq[b * hd * nk..(b + 1) * hd * nk],
                scales: &ks[b * hd / 32 * nk * 2..(b + 1) * hd / 32 * nk * 2],
            }
        }
    };
    let vb = |b: usize| {
        if f16 {
            RowsB::F16(&vh[2 * b * nk * hd..2 * (b + 1) * nk * hd])
        } else {
            RowsB::Q8Rows(&v[b * nk * vrow..(b + 1) * nk * vrow])
        }
    };
    // Scores of block `b`, then its values weighed by them (as attention calls them).
    let qk = |b: usize, s: &mut [f32], warm: Warm<'_>| {
        gemm_few_rows(rows, hd, nk, &q, hd, kb(b), nk, s, nk, false, warm)
    };
    let pv = |b: usize, s: &[f32], acc: &mut [f32], warm: Warm<'_>| {
        gemm_few_rows(rows, nk, hd, s, nk, vb(b), hd, acc, hd, true, warm)
    };
    // The best of 7 runs of `f` over every block, in µs per block.
    let time = |f: &mut dyn FnMut(usize)| {
        (0..7)
            .map(|_| {
                let t = Instant::now();
                (0..blocks).for_each(&mut *f);
                t.elapsed().as_secs_f64() / blocks as f64 * 1e6
            })
            .fold(f64::MAX, f64::min)
    };
    let none = || Warm::NONE.b_warm(true);
    let both = time(&mut |b| {
        qk(b, &mut s, Warm::of(vb(b)).b_warm(b > 0));
        let next = if b + 1 < blocks {
            Warm::of(kb(b + 1))
        } else {
            Warm::NONE
        };
        pv(b, &s, &mut acc, next.b_warm(true));
    });
    let k_alone = time(&mut |b| qk(b, &mut s, none()));
    let v_alone = time(&mut |b| pv(b, &s, &mut acc, none()));
    println!(
        "{both:.2} µs per block (K alone {k_alone:.2}, V alone {v_alone:.2}; checksum {})",
        acc.iter().sum::<f32>()
    );
}
