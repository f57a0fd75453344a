//! The tiny random Gemma 3 text model against transformers' float32 outputs
//! (../shared/fixtures/tiny-text): hidden states, logits, cached and uncached generation.

mod common;
use common::*;
use gemma3_formats::HfDirectory;
use gemma3_model::text::Stage;
use gemma3_model::{KvCache, Logits, TextModel, Workspace};

const TOL: f32 = 1e-4;

/// The fixture was made by transformers in float32: compare with f32 numerics throughout.
fn exact(mut m: TextModel) -> TextModel {
    m.precision = gemma3_model::Precision::Exact;
    m
}

fn check_model(model: &TextModel, max_batch: usize) {
    let exp = load_expected(&shared().join("fixtures/tiny-text/expected.safetensors"));
    let ids: Vec<u32> = exp["input_ids"].1.iter().map(|&v| v as u32).collect();
    let cfg = &model.cfg;
    let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let mut cache = KvCache::new(cfg, 64, max_batch);
    let mut ws = Workspace::new(cfg, max_batch);

    // Prompt: every stage's hidden states and every position's logits.
    let mut stages: std::collections::HashMap<String, Vec<f32>> = Default::default();
    let mut logits = vec![0f32; ids.len() * vocab];
    let mut trace = |s: Stage, x: &[f32]| {
        let key = match s {
            Stage::Embedding => "embeddings".to_string(),
            Stage::Layer(i) => format!("layer_out.{i}"),
            Stage::FinalNorm => "final_norm".to_string(),
        };
        stages.entry(key).or_default().extend_from_slice(x);
    };
    model
        .forward_traced(
            &ids,
            &mut cache,
            &mut ws,
            Logits::All,
            &mut |r, l| logits[r * vocab..(r + 1) * vocab].copy_from_slice(l),
            Some(&mut trace),
        )
        .unwrap();
    for (name, got) in &stages {
        let d = max_abs_diff(got, &exp[name.as_str()].1);
        assert!(d < TOL, "{name}: max abs diff {d}");
        assert_eq!(got.len(), ids.len() * h);
    }
    assert_eq!(stages.len(), 2 + cfg.num_layers);
    let d = max_abs_diff(&logits, &exp["logits"].1);
    eprintln!("batch {max_batch}: prompt logits max abs diff {d:.2e}");
    assert!(d < TOL, "prompt logits: max abs diff {d}");

    // Greedy generation with the cache: ids exact, each step's logits close.
    let want: Vec<u32> = exp["generated_ids"].1.iter().map(|&v| v as u32).collect();
    let step_exp = &exp["gen_step_logits"].1;
    let mut next = argmax(&logits[(ids.len() - 1) * vocab..]) as u32;
    let mut got = vec![];
    for step in 0..want.len() {
        got.push(next);
        if step + 1 == want.len() {
            break;
        }
        let mut step_logits = vec![];
        model
            .forward(&[next], &mut cache, &mut ws, Logits::Last, &mut |_, l| {
                step_logits = l.to_vec()
            })
            .unwrap();
        let d = max_abs_diff(
            &step_logits,
            &step_exp[(step + 1) * vocab..(step + 2) * vocab],
        );
        assert!(d < TOL, "generation step {}: max abs diff {d}", step + 1);
        next = argmax(&step_logits) as u32;
    }
    assert_eq!(got, want, "generated ids");

    // One pass without a cache over prompt + generated ids.
    let full: Vec<u32> = exp["full_ids"].1.iter().map(|&v| v as u32).collect();
    let mut cache = KvCache::new(cfg, 64, max_batch);
    let mut full_logits = vec![0f32; full.len() * vocab];
    model
        .forward(&full, &mut cache, &mut ws, Logits::All, &mut |r, l| {
            full_logits[r * vocab..(r + 1) * vocab].copy_from_slice(l)
        })
        .unwrap();
    let d = max_abs_diff(&full_logits, &exp["full_logits"].1);
    eprintln!("batch {max_batch}: full_logits max abs diff {d:.2e}");
    assert!(d < TOL, "full_logits: max abs diff {d}");
}

fn tiny_dir() -> std::path::PathBuf {
    shared().join("fixtures/tiny-text")
}

#[test]
fn tiny_text_matches_transformers() {
    let dir = HfDirectory::open(tiny_dir()).unwrap();
    let model = exact(TextModel::from_hf(&dir).unwrap());
    // Whole prompt in one batch, and in chunks smaller than the sliding window (8), which
    // exercises the ring cache across chunk boundaries.
    check_model(&model, 64);
    check_model(&model, 3);
    check_model(&model, 1);
}

#[test]
fn legacy_config_gives_same_model() {
    let tmp = std::env::temp_dir().join(format!("gemma3-legacy-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(
        tiny_dir().join("config.legacy.json"),
        tmp.join("config.json"),
    )
    .unwrap();
    std::fs::copy(
        tiny_dir().join("model.safetensors"),
        tmp.join("model.safetensors"),
    )
    .unwrap();
    let legacy = exact(TextModel::from_hf(&HfDirectory::open(&tmp).unwrap()).unwrap());
    let modern = TextModel::from_hf(&HfDirectory::open(tiny_dir()).unwrap()).unwrap();
    assert_eq!(legacy.cfg, modern.cfg);
    check_model(&legacy, 16);
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn context_overflow_and_bad_ids_are_errors() {
    let model = TextModel::from_hf(&HfDirectory::open(tiny_dir()).unwrap()).unwrap();
    let mut cache = KvCache::new(&model.cfg, 4, 4);
    let mut ws = Workspace::new(&model.cfg, 4);
    let e = model
        .forward(
            &[2, 3, 4, 5, 6],
            &mut cache,
            &mut ws,
            Logits::Last,
            &mut |_, _| {},
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("5 tokens do not fit the context of 4 tokens"),
        "{e}"
    );
    let e = model
        .forward(
            &[2, 9999],
            &mut cache,
            &mut ws,
            Logits::Last,
            &mut |_, _| {},
        )
        .unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
}
