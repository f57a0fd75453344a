//! The tiny random Gemma 3 vision-language model against transformers' float32 outputs
//! (../shared/fixtures/tiny-vlm): the SigLIP tower, the projector, the image-conditioned
//! logits and greedy generation with the KV cache; the hub key layout; the same weights as
//! a llama.cpp-style mmproj GGUF.

mod common;
use common::*;
use gemma3_formats::gguf::GgufWriter;
use gemma3_formats::{DType, GgufFile, HfDirectory, MetaValue};
use gemma3_model::{
    attention_mask, ImageInputs, KvCache, Logits, Precision, TextModel, VisionTower, Workspace,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn fixture() -> PathBuf {
    shared().join("fixtures/tiny-vlm")
}

fn expected() -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    load_expected(&fixture().join("expected.safetensors"))
}

fn ids(v: &[f32]) -> Vec<u32> {
    v.iter().map(|&x| x as u32).collect()
}

/// A directory holding the fixture's config and the hub-layout weights as model.safetensors.
fn hub_layout_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gemma3-tiny-vlm-hub-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    std::fs::copy(
        fixture().join("model.hub-layout.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    dir
}

/// The tower in f32 throughout: what the fixture's float32 outputs are compared with.
fn exact(mut tower: VisionTower) -> VisionTower {
    tower.precision = Precision::Exact;
    tower
}

fn check_vision(tower: &VisionTower, exp: &HashMap<String, (Vec<usize>, Vec<f32>)>) {
    let pixels = &exp["pixel_values"].1;
    let hidden = tower.hidden_states(pixels).unwrap();
    let d = max_abs_diff(&hidden, &exp["vision_last_hidden_state"].1);
    eprintln!("vision_last_hidden_state: max abs diff {d:e}");
    assert!(d < TOL, "vision_last_hidden_state: max abs diff {d}");
    let feats = tower.project(&hidden);
    let d = max_abs_diff(&feats, &exp["image_features"].1);
    eprintln!("image_features: max abs diff {d:e}");
    assert!(d < TOL, "image_features: max abs diff {d}");
    assert_eq!(tower.encode(pixels).unwrap(), feats);
}

#[test]
fn vision_tower_and_projector_match_transformers() {
    let exp = expected();
    let dir = HfDirectory::open(fixture()).unwrap();
    let tower = exact(VisionTower::from_hf(&dir).unwrap().expect("a vision tower"));
    let c = &tower.cfg;
    assert_eq!(
        (
            c.image_size,
            c.patch_size,
            c.hidden_size,
            c.num_layers,
            c.num_heads
        ),
        (56, 14, 32, 2, 2)
    );
    assert_eq!(
        (c.mm_tokens_per_image, c.pool_kernel(), c.text_hidden_size),
        (4, 2, 64)
    );
    assert_eq!(
        (c.image_token_index, c.boi_token_index, c.eoi_token_index),
        (512, 510, 511)
    );
    check_vision(&tower, &exp);
}

#[test]
fn hub_key_layout_loads_the_same_model() {
    let exp = expected();
    let dir = hub_layout_dir();
    let hub = HfDirectory::open(&dir).unwrap();
    let tower = exact(VisionTower::from_hf(&hub).unwrap().expect("a vision tower"));
    check_vision(&tower, &exp);
    let text = TextModel::from_hf(&hub).unwrap();
    assert_eq!(text.cfg.vocab_size, 600);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The default (fast) tower multiplies in bf16 where the CPU has a bf16 unit: its features
/// stay within bf16 rounding of transformers' float32 ones on every unit this CPU runs.
#[test]
fn fast_tower_stays_within_bf16_rounding() {
    use gemma3_kernels::bf16mm::{self, Unit};
    let exp = expected();
    let dir = HfDirectory::open(fixture()).unwrap();
    let pixels = &exp["pixel_values"].1;
    let want = &exp["image_features"].1;
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let best = bf16mm::unit();
    for u in [Unit::Amx, Unit::Avx512Bf16, Unit::None] {
        if bf16mm::set_unit(u) != u {
            continue;
        }
        // A fresh tower: the bf16 copies are packed on first use.
        let tower = VisionTower::from_hf(&dir).unwrap().unwrap();
        assert_eq!(tower.precision, Precision::Fast);
        let got = tower.encode(pixels).unwrap();
        let rel = max_abs_diff(&got, want) / scale;
        eprintln!("{}: image_features max diff / max |x| = {rel:e}", u.name());
        let tol = if u == Unit::None { 1e-5 } else { 1e-2 };
        assert!(rel < tol, "{}: relative diff {rel}", u.name());
        if u == Unit::None {
            assert_eq!(got, exact(tower).encode(pixels).unwrap());
        }
    }
    bf16mm::set_unit(best);
}

/// Prompt logits with the image block attended both ways, then 8 greedy tokens with the
/// KV cache (decode steps are plain causal).
#[test]
fn image_conditioned_logits_and_generation_match_transformers() {
    let exp = expected();
    let dir = HfDirectory::open(fixture()).unwrap();
    let tower = exact(VisionTower::from_hf(&dir).unwrap().unwrap());
    let mut text = TextModel::from_hf(&dir).unwrap();
    text.precision = Precision::Exact;
    let input = ids(&exp["input_ids"].1);
    let image_token = tower.cfg.image_token_index;
    let types: Vec<u32> = input.iter().map(|&t| (t == image_token) as u32).collect();
    assert_eq!(types, ids(&exp["token_type_ids"].1));

    // The masks the forward pass uses are transformers' (1 = may attend).
    for (key, window) in [
        ("mask_full", None),
        ("mask_sliding", Some(text.cfg.sliding_window)),
    ] {
        let got: Vec<f32> = attention_mask(&input, Some(image_token), window)
            .into_iter()
            .flatten()
            .map(|b| b as u8 as f32)
            .collect();
        assert_eq!(got, exp[key].1, "{key}");
    }

    let embeds = tower.encode(&exp["pixel_values"].1).unwrap();
    let images = ImageInputs {
        image_token,
        embeds: &embeds,
    };
    let vocab = text.cfg.vocab_size;
    let mut cache = KvCache::new(&text.cfg, 64, 64);
    let mut ws = Workspace::new(&text.cfg, 64);
    let mut logits = vec![0f32; input.len() * vocab];
    text.forward_with(
        &input,
        Some(images),
        &mut cache,
        &mut ws,
        Logits::All,
        &mut |r, l| logits[r * vocab..(r + 1) * vocab].copy_from_slice(l),
        None,
    )
    .unwrap();
    let d = max_abs_diff(&logits, &exp["logits"].1);
    eprintln!("prompt logits: max abs diff {d:e}");
    assert!(d < TOL, "prompt logits: max abs diff {d}");

    let want = ids(&exp["generated_ids"].1);
    let steps = &exp["gen_step_logits"].1;
    let mut next = argmax(&logits[(input.len() - 1) * vocab..]) as u32;
    let mut got = vec![next];
    let mut step = logits[(input.len() - 1) * vocab..].to_vec();
    for i in 1..want.len() {
        text.forward(&[next], &mut cache, &mut ws, Logits::Last, &mut |_, l| {
            step.copy_from_slice(l)
        })
        .unwrap();
        let d = max_abs_diff(&step, &steps[i * vocab..(i + 1) * vocab]);
        assert!(d < TOL, "generation step {i}: max abs diff {d}");
        next = argmax(&step) as u32;
        got.push(next);
    }
    assert_eq!(got, want);
}

/// The fixture's weights written under llama.cpp's mmproj names and metadata (the
/// projector norm stored as `1 + w`, the projection as stored), loaded back.
#[test]
fn mmproj_gguf_gives_the_same_features() {
    let exp = expected();
    let dir = HfDirectory::open(fixture()).unwrap();
    let path = std::env::temp_dir().join(format!("gemma3-tiny-mmproj-{}.gguf", std::process::id()));
    write_mmproj(&dir, &path);
    let g = GgufFile::open(&path).unwrap();
    let tower = exact(VisionTower::from_gguf(&g).unwrap());
    assert_eq!(tower.cfg.mm_tokens_per_image, 4);
    check_vision(&tower, &exp);
    let _ = std::fs::remove_file(&path);
}

fn write_mmproj(dir: &HfDirectory, out: &Path) {
    let mut w = GgufWriter::new();
    let u32m = |x: u32| MetaValue::U32(x);
    w.meta("general.architecture", MetaValue::String("clip".into()))
        .meta("clip.projector_type", MetaValue::String("gemma3".into()))
        .meta("clip.has_vision_encoder", MetaValue::Bool(true))
        .meta("clip.vision.image_size", u32m(56))
        .meta("clip.vision.patch_size", u32m(14))
        .meta("clip.vision.embedding_length", u32m(32))
        .meta("clip.vision.feed_forward_length", u32m(64))
        .meta("clip.vision.block_count", u32m(2))
        .meta("clip.vision.attention.head_count", u32m(2))
        .meta(
            "clip.vision.attention.layer_norm_epsilon",
            MetaValue::F32(1e-6),
        )
        .meta("clip.vision.projection_dim", u32m(64))
        .meta("clip.vision.projector.scale_factor", u32m(2))
        .meta(
            "clip.vision.image_mean",
            MetaValue::Array(vec![MetaValue::F32(0.5); 3]),
        );
    let mut names: Vec<(String, String)> = vec![
        ("embeddings.patch_embedding.weight", "v.patch_embd.weight"),
        ("embeddings.patch_embedding.bias", "v.patch_embd.bias"),
        (
            "embeddings.position_embedding.weight",
            "v.position_embd.weight",
        ),
        ("post_layernorm.weight", "v.post_ln.weight"),
        ("post_layernorm.bias", "v.post_ln.bias"),
    ]
    .into_iter()
    .map(|(a, b)| (format!("vision_tower.{a}"), b.to_string()))
    .collect();
    for i in 0..2 {
        for (hf, gg) in [
            ("layer_norm1", "ln1"),
            ("layer_norm2", "ln2"),
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.out_proj", "attn_out"),
            ("mlp.fc1", "ffn_up"),
            ("mlp.fc2", "ffn_down"),
        ] {
            for s in ["weight", "bias"] {
                names.push((
                    format!("vision_tower.encoder.layers.{i}.{hf}.{s}"),
                    format!("v.blk.{i}.{gg}.{s}"),
                ));
            }
        }
    }
    names.push((
        "multi_modal_projector.mm_input_projection_weight".into(),
        "mm.input_projection.weight".into(),
    ));
    for (hf, gg) in names {
        let t = dir.tensor(&hf).unwrap();
        w.tensor(&gg, &t.shape, DType::F32, t.bytes().to_vec());
    }
    let norm = dir
        .tensor("multi_modal_projector.mm_soft_emb_norm.weight")
        .unwrap();
    let plus_one: Vec<u8> = norm
        .to_f32()
        .iter()
        .flat_map(|v| (v + 1.0).to_le_bytes())
        .collect();
    w.tensor("mm.soft_emb_norm.weight", &norm.shape, DType::F32, plus_one);
    std::fs::write(out, w.to_bytes()).unwrap();
}

#[test]
fn bad_pixel_input_is_an_error() {
    let dir = HfDirectory::open(fixture()).unwrap();
    let tower = VisionTower::from_hf(&dir).unwrap().unwrap();
    let e = tower.encode(&[0.0; 10]).unwrap_err();
    assert!(e.to_string().contains("3x56x56"), "{e}");
    // A text-only checkpoint has no tower.
    let text_only = HfDirectory::open(shared().join("fixtures/tiny-text")).unwrap();
    assert!(VisionTower::from_hf(&text_only).unwrap().is_none());
}
