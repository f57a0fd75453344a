//! The matrix product on every weight type and every code path this CPU runs, against a
//! plain f64 product of the reference dequantization, on random data and odd shapes.

use gemma3_formats::{quant, DType, TensorData};
use gemma3_kernels::packed::PackedMatrix;
use gemma3_kernels::simd::{set_level, set_vnni, Level};
use gemma3_kernels::{matmul, matmul_weights, ops, Linear, Precision};
use std::sync::Arc;

mod common;
use common::Lcg;

/// Offsets of f16 scale fields in a block, which must hold finite values.
fn scale_fields(t: DType) -> &'static [usize] {
    match t {
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => &[0],
        DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
        DType::Q6_K => &[208],
        _ => &[],
    }
}

fn random_tensor(t: DType, rows: usize, cols: usize, rng: &mut Lcg) -> TensorData {
    let n = rows * cols;
    let bytes: Vec<u8> = match t {
        DType::F32 => (0..n).flat_map(|_| rng.f().to_le_bytes()).collect(),
        DType::F16 => (0..n)
            .flat_map(|_| half::f16::from_f32(rng.f()).to_le_bytes())
            .collect(),
        DType::BF16 => (0..n)
            .flat_map(|_| half::bf16::from_f32(rng.f()).to_le_bytes())
            .collect(),
        _ => {
            let nb = n / t.block_elems();
            let mut b: Vec<u8> = (0..nb * t.block_bytes())
                .map(|_| rng.next() as u8)
                .collect();
            for blk in b.chunks_exact_mut(t.block_bytes()) {
                for &off in scale_fields(t) {
                    let s = 0.01 + rng.f().abs() * 0.05;
                    blk[off..off + 2].copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
                }
            }
            b
        }
    };
    let len = bytes.len();
    TensorData::new("w".into(), t, vec![rows, cols], Arc::new(bytes), 0..len).unwrap()
}

/// ggml's Q8_K quantization (per 256: the largest-magnitude value maps to -127, rounding
/// ties to even as its `nearest_int`), then back to f32.
fn q8k_round_trip(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for b in x.chunks(256) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in b {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            out.extend(std::iter::repeat_n(0.0, b.len()));
            continue;
        }
        let iscale = -127.0 / max;
        for &v in b {
            let q = (iscale * v).round_ties_even().min(127.0);
            out.push(q * (1.0 / iscale));
        }
    }
    out
}

/// ggml's Q8_0 activations as its x86 vector code makes them (scale = amax/127 rounded to
/// f16 for the product, values rounded ties-to-even), then back to f32.
fn q8_0_round_trip(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for b in x.chunks(32) {
        let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d16 = half::f16::from_f32(d).to_f32();
        out.extend(b.iter().map(|v| (v * id).round_ties_even() * d16));
    }
    out
}

fn check(t: DType, rows: usize, cols: usize, n: usize, precision: Precision, rng: &mut Lcg) {
    let w = random_tensor(t, rows, cols, rng);
    let x: Vec<f32> = (0..n * cols).map(|_| rng.f()).collect();
    let mut wf = vec![0f32; rows * cols];
    quant::dequantize(t, w.bytes(), &mut wf);
    // The integer path multiplies by 8-bit activations: its reference is the f64 product
    // with the activations quantized and dequantized as ggml does.
    let k_quant = matches!(t, DType::Q4_K | DType::Q5_K | DType::Q6_K);
    let xr: Vec<f32> = if precision == Precision::Fast && k_quant {
        q8k_round_trip(&x)
    } else if precision == Precision::Fast && t.is_quantized() {
        q8_0_round_trip(&x)
    } else {
        x.clone()
    };
    // The packed copy (AVX-512 VNNI only) goes through the same checks.
    let linear =
        (precision == Precision::Fast && PackedMatrix::supports(t)).then(|| Linear::new(w.clone()));
    for packed in [None, linear.as_ref()] {
        check_product(&w, packed, &x, &xr, &wf, rows, cols, n, precision);
    }
    if linear.is_none() && precision == Precision::Fast && PackedMatrix::supports(t) {
        panic!("{t}: supported but not packed");
    }
}

#[allow(clippy::too_many_arguments)]
fn check_product(
    w: &TensorData,
    packed: Option<&Linear>,
    x: &[f32],
    xr: &[f32],
    wf: &[f32],
    rows: usize,
    cols: usize,
    n: usize,
    precision: Precision,
) {
    let t = w.dtype;
    let run = |x: &[f32], n: usize, out: &mut [f32]| match packed {
        Some(l) => {
            assert!(l.packed.is_some());
            matmul_weights(l.weights(), x, n, out, precision)
        }
        None => matmul(w, x, n, out, precision),
    };
    let label = if packed.is_some() { "packed" } else { "stored" };
    let mut out = vec![f32::NAN; n * rows];
    run(x, n, &mut out);
    for i in 0..n {
        for r in 0..rows {
            let want: f64 = (0..cols)
                .map(|k| wf[r * cols + k] as f64 * xr[i * cols + k] as f64)
                .sum();
            let scale: f64 = (0..cols)
                .map(|k| (wf[r * cols + k] as f64 * xr[i * cols + k] as f64).abs())
                .sum();
            let got = out[i * rows + r] as f64;
            assert!(
                (got - want).abs() <= 1e-5 * scale + 1e-6,
                "{t} {label} {precision:?} {:?} vnni {} {rows}x{cols} n={n}: out[{i}][{r}] = {got}, want {want}",
                gemma3_kernels::simd::level(),
                gemma3_kernels::simd::has_vnni()
                    || gemma3_kernels::simd::has_avx_vnni()
                    || gemma3_kernels::simd::has_dotprod()
            );
        }
    }
    // A row's result does not depend on the batch it is in.
    let mut single = vec![0f32; rows];
    for i in [0, n - 1] {
        run(&x[i * cols..], 1, &mut single);
        assert_eq!(
            &single[..],
            &out[i * rows..(i + 1) * rows],
            "{t} {label}: batch changed a row's result"
        );
    }
}

#[test]
fn every_type_every_path_odd_shapes() {
    // Each level this CPU has, with and without its 8-bit dot-product instructions (AVX-512
    // VNNI / AVX-VNNI / Arm's sdot): the packed kernels then use AVX2's 16-bit
    // multiply-adds or NEON's widening multiplies, the unpacked ones their AVX2 kernel.
    let mut paths = vec![(Level::Portable, false)];
    for l in gemma3_kernels::simd::levels() {
        if l != Level::Portable && set_level(l) == l {
            paths.push((l, false));
            if set_vnni(true) {
                paths.push((l, true));
            }
        }
    }
    let mut rng = Lcg(12345);
    for &(level, vnni) in &paths {
        assert_eq!(set_level(level), level);
        set_vnni(vnni);
        check_f16_ops(level);
        for t in DType::ALL {
            let be = t.block_elems().max(1);
            // Row lengths: one block, several, and not a multiple of 16 or 32 for floats.
            let cols_list: Vec<usize> = if be == 1 {
                vec![1, 7, 33, 100, 257]
            } else {
                vec![be, 3 * be, 5 * be]
            };
            for &cols in &cols_list {
                // Rows: below, across and past 16-row groups (and 4-group decode tiles);
                // inputs: single, tails, and full 8-input tiles plus a remainder.
                for &(rows, n) in &[
                    (1usize, 1usize),
                    (5, 3),
                    (13, 1),
                    (37, 9),
                    (70, 1),
                    (33, 19),
                ] {
                    for p in [Precision::Fast, Precision::Exact] {
                        check(t, rows, cols, n, p, &mut rng);
                    }
                }
            }
        }
    }
    set_vnni(true);
    set_level(*gemma3_kernels::simd::levels().last().unwrap());
}

#[test]
fn dot_and_norms() {
    let mut rng = Lcg(7);
    for n in [1usize, 15, 16, 17, 640, 1001] {
        let a: Vec<f32> = (0..n).map(|_| rng.f()).collect();
        let b: Vec<f32> = (0..n).map(|_| rng.f()).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((ops::dot(&a, &b) as f64 - want).abs() < 1e-4);
        let w: Vec<f32> = (0..n).map(|_| 1.0 + rng.f()).collect();
        let mut y = vec![0f32; n];
        ops::rms_norm(&a, &w, 1e-6, &mut y);
        let rms = ((a.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64) + 1e-6).sqrt();
        for i in 0..n {
            assert!((y[i] as f64 - a[i] as f64 / rms * w[i] as f64).abs() < 1e-4);
        }
    }
    let mut s = vec![1.0f32, 2.0, 3.0];
    ops::softmax(&mut s);
    assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6 && s[2] > s[1]);
    assert!((ops::gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
}

/// f16 rounding and the f16 GELU table against `half`, at the current level. (Called from
/// the test that walks the levels: the level is global, so tests must not race on it.)
fn check_f16_ops(level: Level) {
    let mut rng = Lcg(31);
    let n = 16 * 9 + 5;
    let x: Vec<f32> = (0..n).map(|_| rng.f() * 8.0).collect();
    let up: Vec<f32> = (0..n).map(|_| rng.f()).collect();
    let want_round: Vec<f32> = x.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
    let want_gelu: Vec<f32> = x
        .iter()
        .zip(&up)
        .map(|(g, u)| {
            let g16 = half::f16::from_f32(*g).to_f32();
            half::f16::from_f32(ops::gelu_tanh(g16)).to_f32() * u
        })
        .collect();
    let mut r = x.clone();
    ops::round_to_f16(&mut r);
    assert_eq!(r, want_round, "{level:?}");
    let mut g = x.clone();
    ops::gelu_gate_f16(&mut g, &up);
    assert_eq!(g, want_gelu, "{level:?}");
}
