//! The reference quantizers against llama-quantize's output (../shared/fixtures/quantize):
//! each tensor of `model-<TYPE>.gguf`, quantized here from `model-F32.gguf` to the type
//! llama.cpp chose for it, must have the same bytes.

use gemma3_formats::quantize::quantize;
use gemma3_formats::{DType, GgufFile};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/quantize")
        .join(name)
}

const FILES: [&str; 10] = [
    "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
];

#[test]
fn every_block_type_matches_llama_quantize() {
    let src = GgufFile::open(fixture("model-F32.gguf")).unwrap();
    let mut seen = std::collections::HashSet::new();
    for f in FILES {
        let q = GgufFile::open(fixture(&format!("model-{f}.gguf"))).unwrap();
        for info in &q.tensors {
            let want = q.tensor_from_info(info).unwrap();
            let from = src.tensor(&info.name).unwrap();
            assert_eq!(want.shape, from.shape, "{f} {}", info.name);
            let got = quantize(want.dtype, &from.to_f32());
            if got != want.bytes() {
                let bb = want.dtype.block_bytes();
                let first = got
                    .chunks(bb)
                    .zip(want.bytes().chunks(bb))
                    .position(|(a, b)| a != b)
                    .unwrap();
                panic!(
                    "{f}: {} ({}) differs from block {first}: ours {:?} theirs {:?}",
                    info.name,
                    want.dtype,
                    &got[first * bb..(first + 1) * bb],
                    &want.bytes()[first * bb..(first + 1) * bb]
                );
            }
            seen.insert(want.dtype);
        }
    }
    // Every type the fixture has, block types and the f32 copies alike.
    for t in [
        DType::F32,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
    ] {
        assert!(seen.contains(&t), "{t} not covered");
    }
}

/// All-zero blocks take ggml's early exits (zero scales, no division by zero).
#[test]
fn zero_blocks_dequantize_to_zero() {
    let zeros = vec![0f32; 512];
    for t in DType::ALL {
        let q = quantize(t, &zeros);
        let mut back = vec![1f32; 512];
        gemma3_formats::quant::dequantize(t, &q, &mut back);
        assert!(back.iter().all(|&v| v == 0.0), "{t}");
    }
}
