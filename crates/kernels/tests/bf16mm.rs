//! bf16 products on every unit this CPU runs (AMX, AVX-512 BF16) against an f64 product of
//! the same bf16-rounded operands: shapes that cross every tile and task edge, strided A
//! and C, B from a view and from stored weights of several types, accumulation.

use gemma3_formats::DType;
use gemma3_kernels::bf16mm::{self, set_unit, to_bf16, PackedB16, Unit};
use gemma3_kernels::gemm::{MatMut, MatRef};
use gemma3_kernels::Weights;

mod common;
use common::Lcg;

fn bf(x: f32) -> f64 {
    f32::from_bits((to_bf16(x) as u32) << 16) as f64
}

/// The units this CPU runs, best first (each forced in turn).
fn units() -> Vec<Unit> {
    let mut out = Vec::new();
    for u in [Unit::Amx, Unit::Avx512Bf16] {
        let got = set_unit(u);
        if got == u {
            out.push(u);
        }
    }
    if out.is_empty() {
        eprintln!(
            "SKIPPED: this CPU has neither AMX-BF16 nor AVX-512 BF16; bf16mm is not used here"
        );
    }
    out
}

#[test]
fn rounding_is_to_nearest_even() {
    assert_eq!(to_bf16(1.0), 0x3f80);
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even (1.0).
    assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
    assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
    assert_eq!(to_bf16(-2.5), 0xc020);
    assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
    assert!(f32::from_bits((to_bf16(f32::NAN) as u32) << 16).is_nan());
}

#[test]
fn products_match_f64_on_every_unit() {
    let mut rng = Lcg(11);
    let shapes = [
        (1, 1, 1),
        (5, 7, 3),
        (33, 17, 40),
        (130, 300, 70),
        (257, 40, 1153),
        (64, 520, 96),
    ];
    for u in units() {
        set_unit(u);
        for &(m, n, k) in &shapes {
            for (parallel, accumulate) in [(false, true), (true, false), (true, true)] {
                // A transposed in memory; B row-major; C column-major.
                let a_t = rng.vec(k * m); // A(i, p) = a_t[p*m + i]
                let b = rng.vec(k * n);
                let c0 = rng.vec(m * n);
                let mut c = c0.clone(); // C(i, j) = c[j*m + i]
                let pb = PackedB16::of_view(MatRef::row_major(&b, k, n));
                bf16mm::gemm(
                    MatRef::new(&a_t, m, k, 1, m),
                    &pb,
                    MatMut::new(&mut c, m, n, 1, m),
                    accumulate,
                    parallel,
                );
                for i in 0..m {
                    for j in 0..n {
                        let mut want = if accumulate {
                            c0[j * m + i] as f64
                        } else {
                            0.0
                        };
                        let mut mag = want.abs();
                        for p in 0..k {
                            let t = bf(a_t[p * m + i]) * bf(b[p * n + j]);
                            want += t;
                            mag += t.abs();
                        }
                        let got = c[j * m + i] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * mag + 1e-6,
                            "{u:?} {m}x{n}x{k} parallel {parallel} at ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
    set_unit(Unit::Amx);
}

/// Stored weights as B = Wᵀ (a linear layer): bf16, f16 and f32 rows.
#[test]
fn weights_pack_as_their_transpose() {
    let mut rng = Lcg(5);
    let (m, rows, cols) = (45, 70, 100);
    let w = rng.vec(rows * cols);
    let x = rng.vec(m * cols);
    for u in units() {
        set_unit(u);
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let bytes: Vec<u8> = match dtype {
                DType::BF16 => w
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                DType::F16 => w
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                _ => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            let stored: Vec<f32> = match dtype {
                DType::BF16 => w
                    .iter()
                    .map(|v| half::bf16::from_f32(*v).to_f32())
                    .collect(),
                DType::F16 => w.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect(),
                _ => w.clone(),
            };
            let pb = PackedB16::of_weights(Weights {
                dtype,
                rows,
                cols,
                bytes: &bytes,
                packed: None,
            });
            assert_eq!((pb.k(), pb.n()), (cols, rows));
            let mut out = vec![0f32; m * rows];
            bf16mm::gemm(
                MatRef::row_major(&x, m, cols),
                &pb,
                MatMut::row_major(&mut out, m, rows),
                false,
                true,
            );
            for i in 0..m {
                for j in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|p| bf(x[i * cols + p]) * bf(stored[j * cols + p]))
                        .sum();
                    let got = out[i * rows + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * cols as f64,
                        "{u:?} {dtype:?} at ({i},{j}): {got} vs {want}"
                    );
                }
            }
        }
    }
    set_unit(Unit::Amx);
}
