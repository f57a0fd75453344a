//! KV cache types against the f32 cache: the same prompt and greedy steps with keys and
//! values stored as f16, bf16 and q8_0 give logits within each type's rounding of the f32
//! cache's, on the tiny-text fixture (head_dim 16: q8_0 cannot hold its rows and says so)
//! and on the quantize fixture's model (head_dim 64). In exact precision the f32 cache
//! still matches transformers.

mod common;
use common::*;
use gemma3_formats::{DType, HfDirectory};
use gemma3_model::{KvTypes, Logits, TextModel, Workspace};

/// Logits of the prompt's last position and of `steps` greedy steps after it.
fn run(model: &TextModel, ids: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(128, 16);
    let mut ws = Workspace::new(&model.cfg, 16);
    greedy_logits(model, ids, steps, &mut cache, &mut ws)
}

/// Largest logit difference of `ty` against the f32 cache (the same tokens fed: the f32
/// run's greedy choices), and the largest logit.
fn against_f32(model: &mut TextModel, ids: &[u32], steps: usize, ty: DType) -> (f32, f32) {
    model.kv_types = Some(KvTypes::F32);
    let want = run(model, ids, steps);
    // Feed the f32 run's tokens, so both see the same sequence.
    let mut fed = ids.to_vec();
    fed.extend(want[..steps].iter().map(|l| argmax(l) as u32));
    model.kv_types = Some(KvTypes { k: ty, v: ty });
    let mut cache = model.new_cache(128, 16);
    let mut ws = Workspace::new(&model.cfg, 16);
    let rows: Vec<usize> = (ids.len() - 1..fed.len()).collect();
    let mut got = vec![];
    model
        .forward(
            &fed,
            &mut cache,
            &mut ws,
            Logits::Rows(&rows),
            &mut |_, l| got.push(l.to_vec()),
        )
        .unwrap();
    let mut worst = 0f32;
    let mut largest = 0f32;
    for (a, b) in want.iter().zip(&got) {
        worst = worst.max(max_abs_diff(a, b));
        largest = largest.max(a.iter().fold(0f32, |m, v| m.max(v.abs())));
    }
    (worst, largest)
}

fn exact(dir: std::path::PathBuf) -> TextModel {
    let mut m = TextModel::from_hf(&HfDirectory::open(dir).unwrap()).unwrap();
    m.precision = gemma3_model::Precision::Exact;
    m
}

/// Bound on the logit error of a cache type, relative to the largest logit: f16 keeps 11
/// significant bits, bf16 8, q8_0 about 7 per block.
fn tolerance(ty: DType) -> f32 {
    match ty {
        DType::F16 => 2e-3,
        DType::BF16 => 1.5e-2,
        DType::Q8_0 => 2.5e-2,
        _ => 0.0,
    }
}

#[test]
fn tiny_text_cache_types_stay_within_their_rounding() {
    let mut model = exact(shared().join("fixtures/tiny-text"));
    let exp = load_expected(&shared().join("fixtures/tiny-text/expected.safetensors"));
    let ids: Vec<u32> = exp["input_ids"].1.iter().map(|&v| v as u32).collect();
    // The f32 cache is the fixture's numerics.
    model.kv_types = Some(KvTypes::F32);
    let steps = run(&model, &ids, 4);
    let vocab = model.cfg.vocab_size;
    let d = max_abs_diff(&steps[0], &exp["logits"].1[(ids.len() - 1) * vocab..]);
    assert!(d < 1e-4, "f32 cache vs transformers: {d}");
    for ty in [DType::F16, DType::BF16] {
        let (worst, largest) = against_f32(&mut model, &ids, 8, ty);
        eprintln!("tiny-text {ty}: max logit diff {worst:.2e} of {largest:.1}");
        assert!(worst > 0.0, "{ty} changed nothing: is the type used?");
        assert!(
            worst < tolerance(ty) * largest,
            "{ty}: {worst} vs largest logit {largest}"
        );
    }
    let e = KvTypes {
        k: DType::Q8_0,
        v: DType::Q8_0,
    }
    .check(&model.cfg)
    .unwrap_err();
    assert!(e.to_string().contains("cannot hold rows of 16"), "{e}");
}

#[test]
fn every_cache_type_on_a_head_dim_64_model() {
    let mut model = exact(shared().join("fixtures/quantize/hf"));
    assert_eq!(model.cfg.head_dim, 64);
    let ids: Vec<u32> = (0..40u32).map(|i| 2 + (i * 7919) % 500).collect();
    for ty in [DType::F16, DType::BF16, DType::Q8_0] {
        let (worst, largest) = against_f32(&mut model, &ids, 8, ty);
        eprintln!("head_dim 64 {ty}: max logit diff {worst:.2e} of {largest:.1}");
        assert!(worst > 0.0, "{ty} changed nothing: is the type used?");
        assert!(
            worst < tolerance(ty) * largest,
            "{ty}: {worst} vs largest logit {largest}"
        );
    }
    // Mixed: q8_0 keys, f16 values.
    model.kv_types = Some(KvTypes {
        k: DType::Q8_0,
        v: DType::F16,
    });
    assert_eq!(run(&model, &ids, 2).len(), 3);
}
