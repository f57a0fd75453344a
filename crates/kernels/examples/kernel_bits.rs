//! Prints a hash of the exact output bits of the matrix products on every code path this
//! CPU runs: `item<TAB>path<TAB>hash`. `scripts/test-aarch64.sh` runs it natively (x86-64)
//! and under qemu (aarch64) and checks that where the x86 paths agree with each other to
//! the bit, the NEON ones give those bits too.
//!
//! Inputs are fixed (a seeded generator), so the hashes depend only on the kernels.
//!
//! `kernel_bits decode TYPE` instead runs one decode product (one input, 256 × 4096
//! weights of TYPE) at the current level, for counting the tile's instructions under
//! valgrind or qemu (`scripts/tile-instructions.sh`).

use gemma3_formats::{DType, TensorData};
use gemma3_kernels::gemm::{gemm_few_rows, RowsB, Warm};
use gemma3_kernels::simd::{self, Level};
use gemma3_kernels::{matmul_weights, Linear, Precision};
use std::sync::Arc;

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn f(&mut self) -> f32 {
        (self.next() as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }
}

fn fnv(values: &[f32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// Random blocks with small finite f16 scales (where the type has them).
fn tensor(t: DType, rows: usize, cols: usize, rng: &mut Lcg) -> TensorData {
    let n = rows * cols;
    let bytes: Vec<u8> = match t {
        DType::F32 => (0..n).flat_map(|_| rng.f().to_le_bytes()).collect(),
        DType::F16 => (0..n)
            .flat_map(|_| half::f16::from_f32(rng.f()).to_le_bytes())
            .collect(),
        _ => {
            let mut b: Vec<u8> = (0..n / t.block_elems() * t.block_bytes())
                .map(|_| rng.next() as u8)
                .collect();
            let scales: &[usize] = match t {
                DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => &[0],
                DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
                DType::Q6_K => &[208],
                _ => &[],
            };
            for blk in b.chunks_exact_mut(t.block_bytes()) {
                for &off in scales {
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

/// One decode product on 256 × 4096 weights of `name`; prints the packed bytes.
fn decode_once(name: &str) {
    let t = DType::ALL
        .into_iter()
        .find(|t| t.to_string() == name)
        .unwrap_or_else(|| panic!("unknown type {name}"));
    let (rows, cols) = (256, 4096);
    let mut rng = Lcg(42);
    let w = Linear::new(tensor(t, rows, cols, &mut rng));
    let x: Vec<f32> = (0..cols).map(|_| rng.f()).collect();
    let mut out = vec![0f32; rows];
    matmul_weights(w.weights(), &x, 1, &mut out, Precision::Fast);
    let bytes = w.packed.as_ref().map_or(0, |p| p.bytes());
    let file_bytes = rows * t.row_bytes(cols).unwrap_or(0);
    println!(
        "{t} {rows}x{cols}: {file_bytes} weight bytes, {bytes} packed bytes, {}",
        gemma3_kernels::describe()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "decode" {
        return decode_once(&args[2]);
    }
    let mut paths = vec![];
    for l in simd::levels() {
        simd::set_level(l);
        paths.push((l, false));
        if l != Level::Portable && simd::set_vnni(true) {
            paths.push((l, true));
        }
    }
    let types: Vec<DType> = gemma3_kernels::packed::PACKED_TYPES
        .into_iter()
        .chain([DType::Q4_1, DType::Q5_1, DType::F16, DType::F32])
        .collect();
    let (rows, cols) = (70, 768);
    for (level, dot) in paths {
        simd::set_level(level);
        simd::set_vnni(dot);
        let path = format!("{}{}", level.name(), if dot { "+dot" } else { "" });
        for &t in &types {
            let mut rng = Lcg(42);
            let w = Linear::new(tensor(t, rows, cols, &mut rng));
            for n in [1usize, 5] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f()).collect();
                let mut out = vec![0f32; n * rows];
                matmul_weights(w.weights(), &x, n, &mut out, Precision::Fast);
                println!("matmul {t} n={n}\t{path}\t{:016x}", fnv(&out));
            }
        }
        // Attention's few-rows product over f32 and f16 keys.
        let mut rng = Lcg(7);
        let (m, k, n) = (3, 256, 67);
        let a: Vec<f32> = (0..m * k).map(|_| rng.f()).collect();
        let b32: Vec<f32> = (0..k * n).map(|_| rng.f()).collect();
        let b16: Vec<u8> = b32
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        for (name, b) in [("f32", RowsB::F32(&b32)), ("f16", RowsB::F16(&b16))] {
            let mut c = vec![0f32; m * n];
            gemm_few_rows(m, k, n, &a, k, b, n, &mut c, n, false, Warm::NONE);
            println!("gemm_few_rows {name}\t{path}\t{:016x}", fnv(&c));
        }
    }
}
