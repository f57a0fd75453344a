//! Writes a Gemma 3 Hugging Face checkpoint with random bf16 weights, for benchmarking
//! `gemma3 quantize` and `--quantize` at real sizes without downloading a model:
//!
//! ```sh
//! cargo run --release -p gemma3-engine --example random_checkpoint -- OUT_DIR [4b|1b|270m] [vision]
//! ```
//!
//! With `vision`, a multimodal checkpoint (Gemma3ForConditionalGeneration, hub key layout)
//! with a full-size SigLIP So400m tower and projector, as the 4B-27B models have: for timing
//! images end to end (`gemma3 quantize --mmproj` writes the tower as llama.cpp's mmproj).
//!
//! The shapes are those of Gemma 3's text models; weights are N(0, 0.02)-like with a few
//! large outlier columns, norms small, as in real checkpoints. Safetensors shards of at most
//! 4 GB with an index, a config.json and a synthetic tokenizer.json (262144 pieces, so the
//! embedding's padding rows are dropped as the converter does). Written as it is generated:
//! memory stays small whatever the size.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

struct Shape {
    hidden: usize,
    layers: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    window: usize,
    rope_factor: Option<f64>,
}

fn shape(name: &str) -> Option<Shape> {
    let s = match name {
        "4b" => Shape {
            hidden: 2560,
            layers: 34,
            ffn: 10240,
            heads: 8,
            kv_heads: 4,
            head_dim: 256,
            vocab: 262_208,
            window: 1024,
            rope_factor: Some(8.0),
        },
        "1b" => Shape {
            hidden: 1152,
            layers: 26,
            ffn: 6912,
            heads: 4,
            kv_heads: 1,
            head_dim: 256,
            vocab: 262_144,
            window: 512,
            rope_factor: None,
        },
        "270m" => Shape {
            hidden: 640,
            layers: 18,
            ffn: 2048,
            heads: 4,
            kv_heads: 1,
            head_dim: 256,
            vocab: 262_144,
            window: 512,
            rope_factor: None,
        },
        _ => return None,
    };
    Some(s)
}

/// Pieces the synthetic tokenizer names (Gemma 3's vocabulary size).
const TOKENIZER_PIECES: usize = 262_144;
/// The image markers' ids, as in Gemma 3's tokenizer.
const BOI: usize = 255_999;
const EOI: usize = 256_000;
/// Largest shard, in bytes.
const SHARD_BYTES: usize = 4 << 30;

/// SplitMix64: a fast, seedable generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Roughly normal (sum of four uniforms), unit variance.
    fn normal(&mut self) -> f32 {
        let r = self.next();
        let s: f32 = (0..4)
            .map(|k| ((r >> (16 * k)) & 0xffff) as f32 / 65535.0)
            .sum();
        (s - 2.0) * 1.732
    }
}

struct Tensor {
    name: String,
    shape: Vec<usize>,
    /// Standard deviation; RMS norms are centred on 0 with a small spread.
    std: f32,
    /// Centre (1 for the vision tower's LayerNorm weights, else 0).
    mean: f32,
}

/// Gemma 3's SigLIP So400m tower (4B-27B) and the projector to `text_hidden`.
fn vision_tensors(text_hidden: usize) -> Vec<Tensor> {
    const D: usize = 1152;
    const FFN: usize = 4304;
    const LAYERS: usize = 27;
    const PATCHES: usize = (896 / 14) * (896 / 14);
    let mut v = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, std: f32, mean: f32| {
        v.push(Tensor {
            name,
            shape,
            std,
            mean,
        })
    };
    let m = "vision_tower.vision_model.";
    add(
        format!("{m}embeddings.patch_embedding.weight"),
        vec![D, 3, 14, 14],
        0.02,
        0.0,
    );
    add(
        format!("{m}embeddings.patch_embedding.bias"),
        vec![D],
        0.01,
        0.0,
    );
    add(
        format!("{m}embeddings.position_embedding.weight"),
        vec![PATCHES, D],
        0.02,
        0.0,
    );
    for i in 0..LAYERS {
        let p = format!("{m}encoder.layers.{i}.");
        for (n, rows, cols) in [
            ("self_attn.q_proj", D, D),
            ("self_attn.k_proj", D, D),
            ("self_attn.v_proj", D, D),
            ("self_attn.out_proj", D, D),
            ("mlp.fc1", FFN, D),
            ("mlp.fc2", D, FFN),
        ] {
            add(format!("{p}{n}.weight"), vec![rows, cols], 0.02, 0.0);
            add(format!("{p}{n}.bias"), vec![rows], 0.01, 0.0);
        }
        for n in ["layer_norm1", "layer_norm2"] {
            add(format!("{p}{n}.weight"), vec![D], 0.1, 1.0);
            add(format!("{p}{n}.bias"), vec![D], 0.01, 0.0);
        }
    }
    add(format!("{m}post_layernorm.weight"), vec![D], 0.1, 1.0);
    add(format!("{m}post_layernorm.bias"), vec![D], 0.01, 0.0);
    let p = "multi_modal_projector.";
    add(
        format!("{p}mm_input_projection_weight"),
        vec![D, text_hidden],
        0.02,
        0.0,
    );
    add(format!("{p}mm_soft_emb_norm.weight"), vec![D], 0.1, 0.0);
    v
}

fn tensors(s: &Shape) -> Vec<Tensor> {
    let mut v = vec![Tensor {
        name: "model.embed_tokens.weight".into(),
        shape: vec![s.vocab, s.hidden],
        std: 0.02,
        mean: 0.0,
    }];
    let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    for i in 0..s.layers {
        let p = format!("model.layers.{i}.");
        let mut add = |n: &str, shape: Vec<usize>, std: f32| {
            v.push(Tensor {
                name: format!("{p}{n}.weight"),
                shape,
                std,
                mean: 0.0,
            })
        };
        add("self_attn.q_proj", vec![q, s.hidden], 0.02);
        add("self_attn.k_proj", vec![kv, s.hidden], 0.02);
        add("self_attn.v_proj", vec![kv, s.hidden], 0.02);
        add("self_attn.o_proj", vec![s.hidden, q], 0.02);
        add("self_attn.q_norm", vec![s.head_dim], 0.1);
        add("self_attn.k_norm", vec![s.head_dim], 0.1);
        add("mlp.gate_proj", vec![s.ffn, s.hidden], 0.02);
        add("mlp.up_proj", vec![s.ffn, s.hidden], 0.02);
        add("mlp.down_proj", vec![s.hidden, s.ffn], 0.02);
        for n in [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ] {
            add(n, vec![s.hidden], 0.1);
        }
    }
    v.push(Tensor {
        name: "model.norm.weight".into(),
        shape: vec![s.hidden],
        std: 0.1,
        mean: 0.0,
    });
    v
}

fn bytes_of(t: &Tensor) -> usize {
    t.shape.iter().product::<usize>() * 2
}

/// Writes one shard: the safetensors header, then each tensor's bf16 values.
fn write_shard(path: &Path, list: &[&Tensor], rng: &mut Rng) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in list {
        let n = bytes_of(t);
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": t.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut f = BufWriter::with_capacity(1 << 22, File::create(path)?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    let mut row = Vec::new();
    for t in list {
        let cols = *t.shape.last().unwrap();
        let rows = t.shape.iter().product::<usize>() / cols;
        // A few columns carry outliers, as trained weights do.
        let outlier = |c: usize| c % 97 == 13;
        for _ in 0..rows {
            row.clear();
            for c in 0..cols {
                let scale = if outlier(c) { t.std * 8.0 } else { t.std };
                let x = t.mean + rng.normal() * scale;
                row.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes());
            }
            f.write_all(&row)?;
        }
    }
    f.flush()
}

fn write_tokenizer(dir: &Path) -> std::io::Result<()> {
    let name = |i: usize| -> String {
        match i {
            0 => "<pad>".into(),
            1 => "<eos>".into(),
            2 => "<bos>".into(),
            3 => "<unk>".into(),
            4..=259 => format!("<0x{:02X}>", i - 4),
            BOI => "<start_of_image>".into(),
            EOI => "<end_of_image>".into(),
            _ => format!("t{i}"),
        }
    };
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..TOKENIZER_PIECES).map(|i| (name(i), i.into())).collect();
    let added: Vec<serde_json::Value> = [0, 1, 2, 3, BOI, EOI]
        .into_iter()
        .map(|i| serde_json::json!({"id": i, "content": name(i), "special": true}))
        .collect();
    let tj = serde_json::json!({
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        "pre_tokenizer": null,
        "model": {"type": "BPE", "vocab": vocab, "merges": [], "byte_fallback": true, "unk_token": "<unk>"},
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string())?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": true, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}"#,
    )
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(out), size) = (args.get(1), args.get(2).map_or("4b", String::as_str)) else {
        eprintln!("usage: random_checkpoint OUT_DIR [4b|1b|270m] [vision]");
        std::process::exit(2);
    };
    let Some(s) = shape(size) else {
        eprintln!("unknown size {size:?} (4b, 1b, 270m)");
        std::process::exit(2);
    };
    let vision = match args.get(3).map(String::as_str) {
        None => false,
        Some("vision") => true,
        Some(other) => {
            eprintln!("unknown option {other:?} (vision)");
            std::process::exit(2);
        }
    };
    let dir = Path::new(out);
    std::fs::create_dir_all(dir)?;
    let text_config = serde_json::json!({
        "model_type": "gemma3_text",
        "torch_dtype": "bfloat16",
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "query_pre_attn_scalar": s.head_dim,
        "sliding_window": s.window,
        "sliding_window_pattern": 6,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": s.rope_factor.map(|f| serde_json::json!({"rope_type": "linear", "factor": f})),
        "tie_word_embeddings": true,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    });
    let config = if vision {
        serde_json::json!({
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "torch_dtype": "bfloat16",
            "text_config": text_config,
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_hidden_layers": 27,
                "num_attention_heads": 16,
                "num_channels": 3,
                "image_size": 896,
                "patch_size": 14,
                "layer_norm_eps": 1e-6,
                "hidden_act": "gelu_pytorch_tanh",
                "vision_use_head": false,
            },
            "mm_tokens_per_image": 256,
            "image_token_index": 262_144,
            "boi_token_index": BOI,
            "eoi_token_index": EOI,
            "tie_word_embeddings": true,
        })
    } else {
        let mut c = text_config;
        c["architectures"] = serde_json::json!(["Gemma3ForCausalLM"]);
        c
    };
    std::fs::write(dir.join("config.json"), config.to_string())?;
    write_tokenizer(dir)?;
    let mut all = tensors(&s);
    if vision {
        for t in &mut all {
            t.name = format!("language_model.{}", t.name);
        }
        all.extend(vision_tensors(s.hidden));
    }
    let mut shards: Vec<Vec<&Tensor>> = vec![vec![]];
    let mut used = 0;
    for t in &all {
        if used + bytes_of(t) > SHARD_BYTES && !shards.last().unwrap().is_empty() {
            shards.push(vec![]);
            used = 0;
        }
        used += bytes_of(t);
        shards.last_mut().unwrap().push(t);
    }
    let mut rng = Rng(20_261_129);
    let mut map = serde_json::Map::new();
    let n = shards.len();
    for (i, list) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        eprintln!("writing {file} ({} tensors)", list.len());
        write_shard(&dir.join(&file), list, &mut rng)?;
        for t in list {
            map.insert(t.name.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    let total: usize = all.iter().map(bytes_of).sum();
    eprintln!(
        "{}: {} tensors, {:.2} GB of bf16",
        dir.display(),
        all.len(),
        total as f64 / 1e9
    );
    Ok(())
}
