//! The blocked matrix product on every code path this CPU runs, against an f64 product, on
//! shapes that cross every blocking edge; strided (transposed) operands and outputs; stored
//! weights of every type as B. Also the vectorised exp, softmax and GELU against libm.

use gemma3_formats::{quant, DType};
use gemma3_kernels::gemm::{
    gemm, gemm_few_rows, gemm_into, BOperand, MatMut, MatRef, PackedA, PackedB, RowsB, Warm,
};
use gemma3_kernels::simd::{set_level, Level};
use gemma3_kernels::{ops, vmath, Weights};

mod common;
use common::Lcg;

/// The SIMD level is global: tests that change it hold this lock so none sees another's
/// level change midway (a packed operand would then meet a kernel of another width).
static LEVEL_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    LEVEL_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The level detection picks (what the other tests run at).
fn best() -> Level {
    *levels().last().unwrap()
}

fn levels() -> Vec<Level> {
    gemma3_kernels::simd::levels()
}

/// Every level, every shape: C starts non-zero to check accumulation.
#[test]
fn gemm_matches_f64_on_all_paths() {
    let _level = exclusive();
    let mut rng = Lcg(7);
    let shapes = [
        (1, 1, 1),
        (5, 7, 3),
        (13, 33, 17),
        (97, 65, 300),
        (200, 40, 513),
        (31, 4100, 9),
    ];
    for level in levels() {
        set_level(level);
        for &(m, n, k) in &shapes {
            for parallel in [false, true] {
                // A transposed in memory, B row-major, C column-major: every stride path.
                let a_t = rng.vec(k * m); // A(i, p) = a_t[p*m + i]
                let b = rng.vec(k * n);
                let c0 = rng.vec(m * n);
                let mut c = c0.clone(); // C(i, j) = c[j*m + i]
                gemm(
                    MatRef::new(&a_t, m, k, 1, m),
                    BOperand::F32(MatRef::row_major(&b, k, n)),
                    MatMut::new(&mut c, m, n, 1, m),
                    parallel,
                );
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = c0[j * m + i] as f64
                            + (0..k)
                                .map(|p| a_t[p * m + i] as f64 * b[p * n + j] as f64)
                                .sum::<f64>();
                        let got = c[j * m + i] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{level:?} {m}x{n}x{k} par={parallel} ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
    set_level(best());
}

/// q8_0 with one f16 scale per 32 values and the byte times the scale as the value (the
/// scale a power of two over 127, so every product is exact): `(values, quants)`.
fn q8_quant(x: f32) -> i8 {
    (x * 127.0).round().clamp(-127.0, 127.0) as i8
}
const Q8_SCALE: f32 = 1.0 / 128.0;

/// `b` (k × ldb) as keys lie in the cache: quantized down each column in blocks of 32
/// rows, quants row-major then the scales (block row, column); a block's scale varies
/// with its column so that a scale mix-up shows.
fn q8_cols(b: &[f32], k: usize, ldb: usize) -> (Vec<f32>, Vec<u8>) {
    let scale = |p: usize, j: usize| Q8_SCALE * (1 + (p / 32 + j) % 3) as f32;
    let q: Vec<i8> = b.iter().map(|&x| q8_quant(x)).collect();
    let vals = (0..k * ldb)
        .map(|i| q[i] as f32 * scale(i / ldb, i % ldb))
        .collect();
    let mut bytes: Vec<u8> = q.iter().map(|&v| v as u8).collect();
    for bp in 0..k.div_ceil(32) {
        for j in 0..ldb {
            bytes.extend(half::f16::from_f32(scale(bp * 32, j)).to_le_bytes());
        }
    }
    (vals, bytes)
}

/// `b` (k × ldb) as values lie in the cache: each row in q8_0 blocks of 32 (a scale,
/// then 32 bytes), the scale varying with row and block.
fn q8_rows(b: &[f32], k: usize, ldb: usize) -> (Vec<f32>, Vec<u8>) {
    let mut vals = vec![0f32; k * ldb];
    let mut bytes = vec![];
    for p in 0..k {
        for blk in 0..ldb / 32 {
            let d = Q8_SCALE * (1 + (p + blk) % 3) as f32;
            bytes.extend(half::f16::from_f32(d).to_le_bytes());
            for j in blk * 32..(blk + 1) * 32 {
                let q = q8_quant(b[p * ldb + j]);
                vals[p * ldb + j] = q as f32 * d;
                bytes.push(q as u8);
            }
        }
    }
    (vals, bytes)
}

/// The few-row product on B in its stored type (f32, f16, bf16, q8_0 keys and values as
/// the cache lays them out, read in place with a row stride) equals gemm on B converted to f32, bit for bit, on every level: the decode path
/// of attention relies on it.
#[test]
fn few_rows_equal_gemm_bit_for_bit() {
    let _level = exclusive();
    let mut rng = Lcg(11);
    for level in levels() {
        set_level(level);
        for &(m, k, n) in &[
            (1usize, 7usize, 5usize),
            (2, 256, 256),
            (3, 33, 100),
            (4, 256, 77),
            (4, 5, 32),
        ] {
            for ty in ["f32", "f16", "bf16", "q8cols", "q8rows"] {
                // q8_0 rows hold whole blocks. The others get a stride past `n` for odd `k`
                // and none for even `k` (B then ends at its last element, as attention's
                // blocks do).
                let ldb = if ty == "q8rows" {
                    n.next_multiple_of(32) + 32
                } else {
                    n + k % 2 * 9
                };
                let b32: Vec<f32> = rng.vec(k * ldb);
                // The values the type holds, and its bytes.
                let (vals, bytes): (Vec<f32>, Vec<u8>) = match ty {
                    "f16" => {
                        let h: Vec<half::f16> =
                            b32.iter().map(|&v| half::f16::from_f32(v)).collect();
                        (
                            h.iter().map(|v| v.to_f32()).collect(),
                            h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        )
                    }
                    "bf16" => {
                        let h: Vec<half::bf16> =
                            b32.iter().map(|&v| half::bf16::from_f32(v)).collect();
                        (
                            h.iter().map(|v| v.to_f32()).collect(),
                            h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        )
                    }
                    "q8cols" => q8_cols(&b32, k, ldb),
                    "q8rows" => q8_rows(&b32, k, ldb),
                    _ => (b32.clone(), vec![]),
                };
                // `q8cols` bytes: the quants (k × ldb), then the f16 scales.
                let b = match ty {
                    "f16" => RowsB::F16(&bytes),
                    "bf16" => RowsB::BF16(&bytes),
                    "q8cols" => {
                        let (q, scales) = bytes.split_at(k * ldb);
                        RowsB::Q8Cols { q, scales }
                    }
                    "q8rows" => RowsB::Q8Rows(&bytes),
                    _ => RowsB::F32(&vals),
                };
                let a = rng.vec(m * k);
                let c0 = rng.vec(m * n);
                for accumulate in [false, true] {
                    let mut want = c0.clone();
                    let (av, bv) = (
                        MatRef::row_major(&a, m, k),
                        MatRef::new(&vals, k, n, ldb, 1),
                    );
                    let cv = MatMut::row_major(&mut want, m, n);
                    if accumulate {
                        gemm(av, BOperand::F32(bv), cv, false);
                    } else {
                        gemm_into(av, BOperand::F32(bv), cv, false);
                    }
                    let mut got = c0.clone();
                    // Asking for bytes ahead changes no result: half the cases ask for B's own.
                    let warm = if accumulate { Warm::of(b) } else { Warm::NONE };
                    gemm_few_rows(m, k, n, &a, k, b, ldb, &mut got, n, accumulate, warm);
                    assert!(
                        got == want,
                        "{level:?} {ty} {m}x{k}x{n} accumulate {accumulate}"
                    );
                }
            }
        }
    }
}

/// Operands packed once give the same products as views, across blocking edges (k past
/// one packing depth, m past one row block, n past one panel).
#[test]
fn packed_operands_match_views() {
    let _level = exclusive();
    let mut rng = Lcg(9);
    for level in levels() {
        set_level(level);
        for &(m, n, k) in &[(7, 5, 3), (100, 70, 300), (13, 40, 600)] {
            let a = rng.vec(m * k);
            let b = rng.vec(k * n);
            let av = MatRef::row_major(&a, m, k);
            // B given transposed in memory, as keys are.
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let bv = BOperand::F32(MatRef::new(&bt, k, n, 1, k));
            let mut want = vec![0f32; m * n];
            gemm(av, bv, MatMut::row_major(&mut want, m, n), false);
            // gemm_into ignores what C held.
            let mut set = vec![f32::NAN; m * n];
            gemm_into(av, bv, MatMut::row_major(&mut set, m, n), true);
            for (g, w) in set.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{level:?} gemm_into: {g} vs {w}"
                );
            }
            let pa = PackedA::new(av);
            let pb = PackedB::new(bv);
            for (ai, bi) in [(true, false), (false, true), (true, true)] {
                let mut got = vec![0f32; m * n];
                let c = MatMut::row_major(&mut got, m, n);
                match (ai, bi) {
                    (true, false) => gemm(&pa, bv, c, true),
                    (false, true) => gemm(av, BOperand::Packed(&pb), c, false),
                    _ => gemm(&pa, BOperand::Packed(&pb), c, true),
                }
                // Other tests switch the SIMD level meanwhile: equal up to rounding.
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{level:?} {m}x{n}x{k} packed a={ai} b={bi}: {g} vs {w}"
                    );
                }
            }
        }
    }
    set_level(best());
}

/// `x · Wᵀ` with W stored in every weight type, including k that is not a multiple of the
/// packing depth.
#[test]
fn gemm_with_stored_weights() {
    let _level = exclusive();
    let mut rng = Lcg(11);
    let (m, n, k) = (37, 21, 768);
    let x = rng.vec(m * k);
    for level in levels() {
        set_level(level);
        for t in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::Q8_0,
            DType::Q4_0,
            DType::Q6_K,
        ] {
            let w = rng.vec(n * k);
            let bytes: Vec<u8> = match t {
                DType::F32 => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::F16 => w
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                DType::BF16 => w
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                _ => random_blocks(t, n * k, &mut rng),
            };
            let mut wf = vec![0f32; n * k];
            quant::dequantize(t, &bytes, &mut wf);
            let mut c = vec![0f32; m * n];
            gemm(
                MatRef::row_major(&x, m, k),
                BOperand::WeightsT(Weights {
                    dtype: t,
                    rows: n,
                    cols: k,
                    bytes: &bytes,
                    packed: None,
                }),
                MatMut::row_major(&mut c, m, n),
                true,
            );
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|p| x[i * k + p] as f64 * wf[j * k + p] as f64)
                        .sum();
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                        "{level:?} {t}: ({i},{j}) {got} vs {want}"
                    );
                }
            }
        }
    }
    set_level(best());
}

/// Random blocks with finite f16 scales (the first two bytes of Q8_0/Q4_0 blocks, the last
/// two of Q6_K's).
fn random_blocks(t: DType, n: usize, rng: &mut Lcg) -> Vec<u8> {
    let (be, bb) = (t.block_elems(), t.block_bytes());
    let mut out = Vec::with_capacity(n / be * bb);
    for _ in 0..n / be {
        let mut b: Vec<u8> = (0..bb).map(|_| (rng.f() * 127.0) as i8 as u8).collect();
        let at = if t == DType::Q6_K { bb - 2 } else { 0 };
        b[at..at + 2]
            .copy_from_slice(&half::f16::from_f32(0.01 + rng.f().abs() * 0.05).to_le_bytes());
        out.extend(b);
    }
    out
}

#[test]
fn vector_math_matches_libm() {
    let _level = exclusive();
    let mut rng = Lcg(3);
    for level in levels() {
        set_level(level);
        let mut xs: Vec<f32> = (0..2000).map(|i| -100.0 + i as f32 * 0.1).collect();
        xs.extend(rng.vec(100));
        let mut e = xs.clone();
        vmath::exp_inplace(&mut e);
        for (x, y) in xs.iter().zip(&e) {
            let want = (*x as f64).exp();
            if *x < -87.3 {
                assert!(*y < 1e-37, "{level:?} exp({x}) = {y}");
            } else if *x <= 88.3 {
                assert!(
                    ((*y as f64) - want).abs() <= 4e-7 * want,
                    "{level:?} exp({x}) = {y}, want {want}"
                );
            }
        }
        let mut g = xs.clone();
        vmath::gelu_tanh_inplace(&mut g);
        for (x, y) in xs.iter().zip(&g) {
            let want = ops::gelu_tanh(*x);
            assert!(
                (y - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{level:?} gelu({x}) = {y}, want {want}"
            );
        }
        // Column softmax of a 37 x 10 matrix against the row softmax of its transpose.
        let (r, c) = (37, 10);
        let x = rng.vec(r * c);
        let mut got = x.clone();
        let mut inv = vec![0f32; c];
        vmath::softmax_columns(&mut got, c, 2.5, &mut inv);
        for j in 0..c {
            let mut col: Vec<f32> = (0..r).map(|i| x[i * c + j] * 2.5).collect();
            ops::softmax(&mut col);
            for i in 0..r {
                let g = got[i * c + j] * inv[j];
                assert!(
                    (g - col[i]).abs() < 1e-7,
                    "{level:?} column softmax {g} vs {}",
                    col[i]
                );
            }
        }
        let mut s = rng.vec(1000);
        let scale = 3.0;
        let mut want: Vec<f32> = s.iter().map(|v| v * scale).collect();
        ops::softmax(&mut want);
        vmath::softmax_scaled(&mut s, scale);
        for (a, b) in s.iter().zip(&want) {
            assert!((a - b).abs() < 1e-7, "{level:?} softmax {a} vs {b}");
        }
    }
    set_level(best());
}

/// Throughput at SigLIP So400m shapes: `cargo test --release -p gemma3-kernels --test gemm
/// -- --ignored --nocapture`.
#[test]
#[ignore]
fn gemm_speed() {
    let _level = exclusive();
    let mut rng = Lcg(5);
    for (m, n, k) in [(4096, 1152, 1152), (4096, 4304, 1152), (4096, 1152, 4304)] {
        let x = rng.vec(m * k);
        let w = rng.vec(n * k);
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut c = vec![0f32; m * n];
        let run = |c: &mut [f32]| {
            gemm(
                MatRef::row_major(&x, m, k),
                BOperand::WeightsT(Weights {
                    dtype: DType::F32,
                    rows: n,
                    cols: k,
                    bytes: &bytes,
                    packed: None,
                }),
                MatMut::row_major(c, m, n),
                true,
            )
        };
        run(&mut c);
        let t = std::time::Instant::now();
        let reps = 3;
        for _ in 0..reps {
            run(&mut c);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{m}x{n}x{k}: {:.1} ms, {:.1} GFLOP/s",
            s * 1e3,
            2.0 * (m * n * k) as f64 / s / 1e9
        );
    }
}

/// Cost per element of the column softmax and of exp: `cargo test --release -p
/// gemma3-kernels --test gemm vmath_speed -- --ignored --nocapture`.
#[test]
#[ignore]
fn vmath_speed() {
    let _level = exclusive();
    let mut rng = Lcg(5);
    let mut x = rng.vec(4096 * 96);
    let mut inv = vec![0f32; 96];
    let t = std::time::Instant::now();
    for _ in 0..20 {
        vmath::softmax_columns(&mut x, 96, 0.1, &mut inv);
    }
    let e = t.elapsed().as_secs_f64() / (20.0 * x.len() as f64);
    println!("softmax_columns: {:.3} ns/element", e * 1e9);
    let t = std::time::Instant::now();
    for _ in 0..20 {
        vmath::exp_inplace(&mut x);
        x.iter_mut().for_each(|v| *v = -*v);
    }
    let e = t.elapsed().as_secs_f64() / (20.0 * x.len() as f64);
    println!("exp: {:.3} ns/element", e * 1e9);
}
