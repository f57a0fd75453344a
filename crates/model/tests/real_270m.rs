//! The real Gemma 3 270M (Q4_K_M GGUF) against transformers run in float32 on the same
//! weights (../shared/reference/transformers_270m.json).

mod common;
use common::*;
use gemma3_formats::GgufFile;
use gemma3_model::{KvCache, Logits, TextModel, Workspace};

#[test]
fn top10_and_greedy_match_transformers() {
    let g = GgufFile::open(real_model_path()).unwrap();
    let model = TextModel::from_gguf(&g).unwrap();
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
