//! Quick per-type matmul timing: `cargo run --release -p gemma3-kernels --example kbench`.
use gemma3_formats::{DType, TensorData};
use gemma3_kernels::{matmul, Precision};
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let (rows, cols) = (2048usize, 1024usize);
    for t in [
        DType::Q8_0,
        DType::Q5_0,
        DType::Q4_K,
        DType::Q6_K,
        DType::Q4_0,
        DType::F32,
    ] {
        let nb = rows * cols / t.block_elems();
        let mut bytes: Vec<u8> = (0..nb * t.block_bytes())
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        if t.is_quantized() {
            for b in bytes.chunks_exact_mut(t.block_bytes()) {
                let off = if t == DType::Q6_K { 208 } else { 0 };
                b[off..off + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                if matches!(t, DType::Q4_K | DType::Q5_K) {
                    b[2..4].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                }
            }
        } else {
            bytes = (0..rows * cols)
                .flat_map(|i| ((i % 13) as f32 * 0.01).to_le_bytes())
                .collect();
        }
        let len = bytes.len();
        let w = TensorData::new("w".into(), t, vec![rows, cols], Arc::new(bytes), 0..len).unwrap();
        for n in [1usize, 64] {
            let x: Vec<f32> = (0..n * cols).map(|i| (i % 17) as f32 * 0.1 - 0.8).collect();
            let mut out = vec![0f32; n * rows];
            for p in [Precision::Fast, Precision::Exact] {
                let reps = if n == 1 { 200 } else { 10 };
                matmul(&w, &x, n, &mut out, p);
                let t0 = Instant::now();
                for _ in 0..reps {
                    matmul(&w, &x, n, &mut out, p);
                }
                let s = t0.elapsed().as_secs_f64() / reps as f64;
                println!(
                    "{t:>5} {rows}x{cols} n={n:<3} {p:?}: {:8.1} us  {:6.1} GB/s weights  {:6.1} GFLOP/s",
                    s * 1e6,
                    len as f64 / s / 1e9,
                    2.0 * (rows * cols * n) as f64 / s / 1e9
                );
            }
        }
    }
}
