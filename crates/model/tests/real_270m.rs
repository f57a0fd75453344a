//! The real Gemma 3 270M (Q4_K_M GGUF) against transformers run in float32 on the same
//! weights (../shared/reference/transformers_270m.json).

mod common;
use common::*;
use gemma3_formats::GgufFile;
use gemma3_model::{KvCache, Logits, TextModel, Workspace};

#[test]
fn top10_and_greedy_match_transformers() {
    let g = GgufFile::open(real_model_path()).unwrap();
    let mut model = TextModel::from_gguf(&g).unwrap();
    // transformers multiplies the dequantized weights in f32.
    model.precision = gemma3_kernels::Precision::Exact;
    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(shared().join("reference/transformers_270m.json")).unwrap(),
    )
    .unwrap();
    let mut ws = Workspace::new(&model.cfg, 64);
    for p in reference["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = p["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let mut cache = KvCache::new(&model.cfg, 256, 64);
        let mut logits = vec![];
        model
            .forward(&ids, &mut cache, &mut ws, Logits::Last, &mut |_, l| {
                logits = l.to_vec()
            })
            .unwrap();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let top = &p["top10_next_token"];
        for (k, e) in top.as_array().unwrap().iter().enumerate() {
            let id = e["id"].as_u64().unwrap() as usize;
            let want = e["logit"].as_f64().unwrap() as f32;
            assert_eq!(order[k], id, "{}: rank {k}", p["prompt"]);
            assert!(
                (logits[id] - want).abs() < 5e-3,
                "{}: id {id} logit {} vs {want}",
                p["prompt"],
                logits[id]
            );
        }
        // Greedy with the cache, up to the first step whose reference margin is below 0.02.
        let greedy: Vec<u32> = p["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let margins: Vec<f64> = p["greedy_step_top1_margin"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let safe = margins
            .iter()
            .position(|&m| m < 0.02)
            .unwrap_or(margins.len());
        let mut next = argmax(&logits) as u32;
        for step in 0..safe {
            assert_eq!(next, greedy[step], "{}: greedy step {step}", p["prompt"]);
            model
                .forward(&[next], &mut cache, &mut ws, Logits::Last, &mut |_, l| {
                    next = argmax(l) as u32
                })
                .unwrap();
        }
    }
}

#[test]
fn fast_precision_stays_close_to_transformers() {
    // llama.cpp's numerics (8-bit activations, f16 K/V and GELU) move logits by a few
    // tenths; llama.cpp itself is up to 0.2 from transformers in log-probability here.
    // Which activations round up or down shifts with any change in float summation order,
    // so two correct integer kernels land differently inside that noise: measured up to
    // 0.55 (packed kernels) and 0.45 (unpacked), both within 0.2 of llama.cpp's
    // log-probabilities; the tight checks against llama.cpp are in the engine's tests.
    let g = GgufFile::open(real_model_path()).unwrap();
    let model = TextModel::from_gguf(&g).unwrap();
    assert_eq!(model.precision, gemma3_kernels::Precision::Fast);
    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(shared().join("reference/transformers_270m.json")).unwrap(),
    )
    .unwrap();
    let mut ws = Workspace::new(&model.cfg, 16);
    for p in reference["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = p["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let mut cache = KvCache::new(&model.cfg, 64, 16);
        let mut logits = vec![];
        model
            .forward(&ids, &mut cache, &mut ws, Logits::Last, &mut |_, l| {
                logits = l.to_vec()
            })
            .unwrap();
        let top = p["top10_next_token"].as_array().unwrap();
        assert_eq!(argmax(&logits), top[0]["id"].as_u64().unwrap() as usize);
        for e in top {
            let id = e["id"].as_u64().unwrap() as usize;
            let d = (logits[id] - e["logit"].as_f64().unwrap() as f32).abs();
            assert!(d < 0.75, "{}: id {id} differs by {d}", p["prompt"]);
        }
    }
}
