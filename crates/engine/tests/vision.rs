//! Images end to end against transformers (../shared/fixtures): pixel values as
//! Gemma3Processor makes them (PIL bilinear resize included), pan & scan crops and prompt
//! text, prompt assembly and greedy generation on the tiny VLM, and clear errors for bad
//! inputs.
//!
//! The tiny fixtures ship no tokenizer, so the tests give them a synthetic one: every id is
//! an added token named `<tN>`, except `\n\n` (108) and the image tokens (510-512).

use gemma3_engine::image::{expand_image_markers, full_image_sequence};
use gemma3_engine::{GenerateOptions, Image, Model, PanAndScan};
use gemma3_model::{ImageInputs, KvCache, Logits, Precision, Workspace};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;
use common::shared;

fn vlm() -> PathBuf {
    shared().join("fixtures/tiny-vlm")
}

/// Every tensor of an expected.safetensors as f32.
fn expected() -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(vlm().join("expected.safetensors")).unwrap();
    let (n, rest) = bytes.split_at(8);
    let n = u64::from_le_bytes(n.try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&rest[..n]).unwrap();
    let data = &rest[n..];
    let mut out = HashMap::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        let off = &info["data_offsets"];
        let d = &data[off[0].as_u64().unwrap() as usize..off[1].as_u64().unwrap() as usize];
        let vals: Vec<f32> = match info["dtype"].as_str().unwrap() {
            "F32" => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            "I64" => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            _ => continue,
        };
        out.insert(name.clone(), vals);
    }
    out
}

fn ids(v: &[f32]) -> Vec<u32> {
    v.iter().map(|&x| x as u32).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A tokenizer.json naming every id of a `vocab`-sized model.
fn write_tokenizer(dir: &Path, vocab: usize) {
    let name = |i: usize| match i {
        0 => "<pad>".to_string(),
        1 => "<eos>".to_string(),
        2 => "<bos>".to_string(),
        108 => "\n\n".to_string(),
        510 => "<start_of_image>".to_string(),
        511 => "<end_of_image>".to_string(),
        512 => "<image_soft_token>".to_string(),
        _ => format!("<t{i}>"),
    };
    let v: serde_json::Map<String, serde_json::Value> =
        (0..vocab).map(|i| (name(i), i.into())).collect();
    let added: Vec<serde_json::Value> = (0..vocab)
        .map(|i| {
            serde_json::json!({
                "id": i, "content": name(i),
                "special": !matches!(i, 108 | 510 | 511 | 512),
            })
        })
        .collect();
    let tj = serde_json::json!({
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "model": { "type": "BPE", "vocab": v, "merges": [] },
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": true, "bos_token": "<bos>", "eos_token": "<eos>"}"#,
    )
    .unwrap();
}

/// A fixture directory copied to a temp dir with a synthetic tokenizer (and `weights` as
/// model.safetensors).
fn with_tokenizer(fixture: &Path, weights: &str, vocab: usize, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gemma3-vision-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture.join("config.json"), dir.join("config.json")).unwrap();
    std::fs::copy(fixture.join(weights), dir.join("model.safetensors")).unwrap();
    write_tokenizer(&dir, vocab);
    dir
}

fn tiny_vlm(tag: &str, weights: &str) -> Model {
    let dir = with_tokenizer(&vlm(), weights, 600, tag);
    let mut m = Model::open(&dir).unwrap();
    m.set_precision(Precision::Exact);
    let _ = std::fs::remove_dir_all(&dir);
    m
}

/// The prompt of the fixture's input_ids, written with one image marker.
const PROMPT: &str =
    "<t223><t109><t178><t286><t64><start_of_image><t201><t328><t20><t311><t364><t436><t45><t62>";

#[test]
fn pixel_values_match_the_processor() {
    let exp = expected();
    let img = Image::open(vlm().join("image.png")).unwrap();
    assert_eq!((img.width(), img.height()), (56, 56));
    let px = img.pixel_values(56, [0.5; 3], [0.5; 3]);
    let d = max_abs_diff(&px, &exp["pixel_values"]);
    assert!(d < 1e-6, "pixel_values: {d}");

    // 90x71 → 56x56 through PIL's bilinear filter: the same bytes, so the same values.
    let img = Image::open(vlm().join("image_90x71.png")).unwrap();
    assert_eq!((img.width(), img.height()), (90, 71));
    let px = img.pixel_values(56, [0.5; 3], [0.5; 3]);
    let d = max_abs_diff(&px, &exp["pixel_values_90x71"]);
    assert!(
        d < 1e-6,
        "pixel_values_90x71: {d} (one uint8 step is {})",
        1.0 / 127.5
    );
}

#[test]
fn pan_and_scan_matches_the_processor() {
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(shared().join("fixtures/pan_and_scan.json")).unwrap(),
    )
    .unwrap();
    let p = &v["params"];
    let ps = PanAndScan::default();
    assert_eq!(
        ps.min_crop_size as u64,
        p["pan_and_scan_min_crop_size"].as_u64().unwrap()
    );
    assert_eq!(
        ps.max_num_crops as u64,
        p["pan_and_scan_max_num_crops"].as_u64().unwrap()
    );
    assert_eq!(
        ps.min_ratio_to_activate,
        p["pan_and_scan_min_ratio_to_activate"].as_f64().unwrap()
    );
    let text = p["text"].as_str().unwrap();
    let seq = full_image_sequence(p["image_seq_length"].as_u64().unwrap() as usize);
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for c in cases {
        let (w, h) = (
            c["width"].as_u64().unwrap() as usize,
            c["height"].as_u64().unwrap() as usize,
        );
        let boxes = ps.crop_boxes(w, h);
        let want: Vec<[usize; 4]> = serde_json::from_value(c["crop_boxes"].clone()).unwrap();
        assert_eq!(boxes, want, "{w}x{h}");
        assert_eq!(boxes.len() as u64, c["num_crops"].as_u64().unwrap());
        let prompt = expand_image_markers(text, &[boxes.len()], &seq).unwrap();
        assert_eq!(prompt, c["prompt_text"].as_str().unwrap(), "{w}x{h}");
    }
    // The README's edge cases: a narrow last crop, and crops too small to make.
    assert_eq!(
        ps.crop_boxes(1001, 300),
        vec![[0, 0, 334, 300], [334, 0, 668, 300], [668, 0, 1001, 300]]
    );
    assert_eq!(
        ps.crop_boxes(511, 256),
        vec![[0, 0, 256, 256], [256, 0, 511, 256]]
    );
    assert!(ps.crop_boxes(300, 200).is_empty());
}

#[test]
fn prompt_markers_expand_like_the_processor() {
    let seq = "[IMG]";
    // Missing markers go in front; more markers than images is an error.
    assert_eq!(
        expand_image_markers("", &[0, 0], seq).unwrap(),
        "[IMG] [IMG]"
    );
    assert_eq!(expand_image_markers("Hi", &[0], seq).unwrap(), "[IMG] Hi");
    assert_eq!(
        expand_image_markers("a<start_of_image>b", &[0, 0], seq).unwrap(),
        "[IMG] a[IMG]b"
    );
    let e = expand_image_markers("<start_of_image><start_of_image>", &[0], seq).unwrap_err();
    assert!(e.to_string().contains("2 <start_of_image> markers"), "{e}");
}

/// Text prompt + image → the fixture's ids, and 8 greedy tokens as transformers made them
/// (with the KV cache), in both key layouts.
#[test]
fn tiny_vlm_generates_like_transformers() {
    let exp = expected();
    for (tag, weights) in [
        ("t5", "model.safetensors"),
        ("hub", "model.hub-layout.safetensors"),
    ] {
        let m = tiny_vlm(tag, weights);
        let img = Image::open(vlm().join("image.png")).unwrap();
        let views = m.image_views(std::slice::from_ref(&img), None).unwrap();
        let prompt_ids = m.image_prompt_ids(PROMPT, &views, None, true).unwrap();
        assert_eq!(prompt_ids, ids(&exp["input_ids"]), "{tag}");

        let opts = GenerateOptions {
            max_new_tokens: 8,
            ignore_eos: true,
            images: vec![img],
            ..Default::default()
        };
        let g = m.generate(PROMPT, &opts, |_| true).unwrap();
        assert_eq!(g.prompt_tokens, 22);
        assert_eq!(g.tokens, ids(&exp["generated_ids"]), "{tag}");
    }
}

/// Ids given as they are (`logits --ids`): the run of soft tokens takes the image; the
/// logits match transformers'.
#[test]
fn ids_with_an_image_give_transformers_logits() {
    let exp = expected();
    let m = tiny_vlm("ids", "model.safetensors");
    let input = ids(&exp["input_ids"]);
    let img = Image::open(vlm().join("image.png")).unwrap();
    let views = m.image_views(&[img], None).unwrap();
    let logits = image_logits(&m, &input, &views);
    let d = max_abs_diff(&logits, &exp["logits"]);
    assert!(d < 1e-4, "logits: {d}");

    // Runs that do not match the images are refused.
    let e = m.encode_image_views(&input[..10], &views).unwrap_err();
    assert!(e.to_string().contains("each image takes exactly 4"), "{e}");
    let two = m
        .image_views(
            &vec![Image::open(vlm().join("image.png")).unwrap(); 2],
            None,
        )
        .unwrap();
    let e = m.encode_image_views(&input, &two).unwrap_err();
    assert!(e.to_string().contains("1 run(s) of image tokens"), "{e}");
}

/// Logits of every position of `input`, its run of soft tokens taking the image.
fn image_logits(m: &Model, input: &[u32], views: &gemma3_engine::ImageViews) -> Vec<f32> {
    let embeds = m.encode_image_views(input, views).unwrap();
    let cfg = &m.text.cfg;
    let vocab = cfg.vocab_size;
    let mut cache = KvCache::new(cfg, 64, 64);
    let mut ws = Workspace::new(cfg, 64);
    let mut logits = vec![0f32; input.len() * vocab];
    let inputs = ImageInputs {
        image_token: m.image_tokens().unwrap().soft,
        embeds: &embeds,
    };
    m.text
        .forward_with(
            input,
            Some(inputs),
            &mut cache,
            &mut ws,
            Logits::All,
            &mut |r, l| logits[r * vocab..(r + 1) * vocab].copy_from_slice(l),
            None,
        )
        .unwrap();
    logits
}

/// `gemma3 quantize --mmproj`'s writer: the tiny VLM's tower as llama.cpp's mmproj file
/// (matrices f16; embeddings and 1-D tensors f32), attached to the same checkpoint in place
/// of its own tower, gives the checkpoint's image-conditioned logits within f16 rounding.
#[test]
fn written_mmproj_gives_the_checkpoints_logits() {
    use gemma3_convert::quantize::{mmproj_plan, write_gguf};
    use gemma3_formats::{DType, GgufFile, HfDirectory};
    let dir = with_tokenizer(&vlm(), "model.hub-layout.safetensors", 600, "mmproj-write");
    let out = dir.join("mmproj-f16.gguf");
    let plan = mmproj_plan(&HfDirectory::open(&dir).unwrap()).unwrap();
    write_gguf(&plan, &out, false, &mut |_| true).unwrap();
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.tensors.len(), 7 + 2 * 16);
    for t in &g.tensors {
        let want = if t.dims.len() < 2 || t.name.contains("_embd.") {
            DType::F32
        } else {
            DType::F16
        };
        assert_eq!(t.dtype, want, "{}", t.name);
    }
    assert_eq!(g.get_str("clip.projector_type"), Some("gemma3"));

    let exp = expected();
    let input = ids(&exp["input_ids"]);
    let img = Image::open(vlm().join("image.png")).unwrap();
    let mut own = Model::open(&dir).unwrap();
    own.set_precision(Precision::Exact);
    let views = own.image_views(std::slice::from_ref(&img), None).unwrap();
    let want = image_logits(&own, &input, &views);
    let mut m = Model::open(&dir).unwrap();
    m.set_precision(Precision::Exact);
    m.load_mmproj(&out).unwrap();
    let got = image_logits(&m, &input, &views);
    let d = max_abs_diff(&got, &want);
    // f16 keeps 11 significant bits: weights move by up to 2^-12 of themselves.
    assert!(
        d > 0.0 && d < F16_LOGIT_TOL,
        "mmproj logits: max abs diff {d}"
    );
    assert!(max_abs_diff(&got, &exp["logits"]) < F16_LOGIT_TOL);
    let _ = std::fs::remove_dir_all(&dir);
}

/// How far f16 vision weights may move the tiny VLM's logits (values up to about 18; the
/// written file moves them by 5.5e-3).
const F16_LOGIT_TOL: f32 = 1.5e-2;

#[test]
fn bad_images_are_clear_errors() {
    let e = Image::open("/nonexistent/picture.png").unwrap_err();
    assert!(
        e.to_string()
            .contains("cannot read image /nonexistent/picture.png"),
        "{e}"
    );

    let dir = std::env::temp_dir().join(format!("gemma3-vision-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A PNG signature followed by garbage, and a truncated real PNG.
    let mut bad = b"\x89PNG\r\n\x1a\n".to_vec();
    bad.extend_from_slice(&[0x13; 64]);
    std::fs::write(dir.join("corrupt.png"), &bad).unwrap();
    let e = Image::open(dir.join("corrupt.png")).unwrap_err();
    assert!(e.to_string().contains("corrupt.png: cannot decode"), "{e}");
    let real = std::fs::read(vlm().join("image.png")).unwrap();
    std::fs::write(dir.join("short.png"), &real[..real.len() / 2]).unwrap();
    let e = Image::open(dir.join("short.png")).unwrap_err();
    assert!(e.to_string().contains("short.png"), "{e}");
    // A 100000x100000 PNG header over a few bytes of data: refused from the header, before
    // any pixel is allocated.
    let mut huge = b"\x89PNG\r\n\x1a\n".to_vec();
    let ihdr = [
        &100_000u32.to_be_bytes()[..],
        &100_000u32.to_be_bytes(),
        &[8, 2, 0, 0, 0],
    ]
    .concat();
    huge.extend_from_slice(&(ihdr.len() as u32).to_be_bytes());
    let crc_input = [&b"IHDR"[..], &ihdr].concat();
    huge.extend_from_slice(&crc_input);
    huge.extend_from_slice(&crc32fast::hash(&crc_input).to_be_bytes());
    let idat = [&b"IDAT"[..], &[0x78, 0x9c, 0x03, 0x00]].concat();
    huge.extend_from_slice(&4u32.to_be_bytes());
    huge.extend_from_slice(&idat);
    huge.extend_from_slice(&crc32fast::hash(&idat).to_be_bytes());
    huge.extend_from_slice(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xae, 0x42, 0x60, 0x82]);
    let e = Image::decode(&huge).unwrap_err();
    assert!(e.contains("100000x100000") && e.contains("limit"), "{e}");
    // The limit is the caller's: one pixel fewer than the real image refuses it.
    let img = Image::decode(&real).unwrap();
    let px = (img.width() * img.height()) as u64;
    assert!(Image::decode_limited(&real, px).is_ok());
    let e = Image::decode_limited(&real, px - 1).unwrap_err();
    assert!(e.contains("megapixels"), "{e}");
    std::fs::write(dir.join("text.png"), "not an image").unwrap();
    let e = Image::open(dir.join("text.png")).unwrap_err();
    assert!(e.to_string().contains("not a PNG, JPEG"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn too_many_images_for_the_context_is_an_error() {
    let m = tiny_vlm("ctx", "model.safetensors");
    let img = Image::open(vlm().join("image.png")).unwrap();
    // 8 tokens per image against a 1024-position model: 130 images cannot fit.
    let opts = GenerateOptions {
        max_new_tokens: 4,
        images: vec![img.clone(); 130],
        ..Default::default()
    };
    let e = m.generate("<t5>", &opts, |_| true).unwrap_err();
    assert!(
        e.to_string().contains("more than the context of 1024"),
        "{e}"
    );
    // And an explicit context that is too small.
    let opts = GenerateOptions {
        context: Some(12),
        images: vec![img.clone(); 2],
        ..Default::default()
    };
    let e = m.generate("<t5>", &opts, |_| true).unwrap_err();
    assert!(e.to_string().contains("more than the context of 12"), "{e}");
    // More markers than images.
    let opts = GenerateOptions {
        images: vec![img],
        ..Default::default()
    };
    let e = m
        .generate("<start_of_image><start_of_image>", &opts, |_| true)
        .unwrap_err();
    assert!(e.to_string().contains("but 1 image(s) were given"), "{e}");
}

#[test]
fn an_image_for_a_text_only_model_is_an_error() {
    let dir = with_tokenizer(
        &shared().join("fixtures/tiny-text"),
        "model.safetensors",
        512,
        "text",
    );
    let m = Model::open(&dir).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(m.vision.is_none());
    let opts = GenerateOptions {
        images: vec![Image::open(vlm().join("image.png")).unwrap()],
        ..Default::default()
    };
    let e = m.generate("<t5>", &opts, |_| true).unwrap_err();
    assert!(
        e.to_string()
            .contains("text-only model and cannot take images"),
        "{e}"
    );
    // Text-only generation is unchanged.
    let g = m
        .generate(
            "<t5><t6>",
            &GenerateOptions {
                max_new_tokens: 3,
                ignore_eos: true,
                ..Default::default()
            },
            |_| true,
        )
        .unwrap();
    assert_eq!(g.tokens.len(), 3);
}

/// Resizes of a synthetic pattern against Pillow 13.0's `resize(BILINEAR)` (FNV-1a hashes
/// of its output bytes): shrinking, growing, mixed, and both pass orders (Pillow runs the
/// vertical pass first when the height shrinks by more than twice the width's change).
#[test]
fn resize_matches_pillow() {
    let fnv = |b: &[u8]| {
        b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
            (h ^ x as u64).wrapping_mul(0x100000001b3)
        })
    };
    for (w, h, ow, oh, want) in [
        (20, 90, 12, 12, 0xfab77970ed3ffdfeu64),
        (90, 20, 12, 12, 0xb844fa1b2954bc9d),
        (37, 53, 64, 29, 0x05d8f026b1a8b909),
        (40, 100, 30, 40, 0x63ca5031f4b41253),
        (300, 120, 56, 56, 0xa2434a480582b158),
    ] {
        let rgb: Vec<u8> = (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| (0..3).map(move |c| (x, y, c))))
            .map(|(x, y, c)| ((x * 7 + y * 13 + c * 50 + (x * y) % 11) % 256) as u8)
            .collect();
        let out = Image::from_rgb(w, h, rgb).unwrap().resize_bilinear(ow, oh);
        assert_eq!((out.width(), out.height()), (ow, oh));
        assert_eq!(fnv(out.rgb()), want, "{w}x{h} -> {ow}x{oh}");
    }
}

/// llama.cpp's split: a text model plus an mmproj GGUF. The tiny VLM's vision weights are
/// written under mmproj names and attached to the tiny text model (same hidden size); its
/// GGUF-style vocabulary has no `<image_soft_token>`, so the soft tokens take Gemma 3's id
/// past the vocabulary, as with a real GGUF.
#[test]
fn mmproj_attaches_to_a_text_model() {
    let dir = with_tokenizer(
        &shared().join("fixtures/tiny-text"),
        "model.safetensors",
        512,
        "mmproj",
    );
    let mut m = Model::open(&dir).unwrap();
    let mmproj = dir.join("mmproj.gguf");
    write_mmproj(&mmproj);
    let e = m.load_mmproj(&dir.join("missing.gguf")).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    m.load_mmproj(&mmproj).unwrap();
    assert_eq!(m.mmproj.as_deref(), Some(mmproj.as_path()));
    let t = m.image_tokens().unwrap();
    assert_eq!((t.boi, t.eoi, t.soft), (510, 511, 262_144));
    let opts = GenerateOptions {
        max_new_tokens: 3,
        ignore_eos: true,
        images: vec![Image::open(vlm().join("image.png")).unwrap()],
        ..Default::default()
    };
    let g = m.generate("<t5>", &opts, |_| true).unwrap();
    // <bos> \n\n <boi> 4 soft <eoi> \n\n <t5> (the synthetic vocabulary has no " ").
    assert_eq!(g.prompt_tokens, 10);
    assert_eq!(g.tokens.len(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

fn write_mmproj(out: &Path) {
    use gemma3_formats::gguf::GgufWriter;
    use gemma3_formats::{DType, HfDirectory, MetaValue};
    let src = HfDirectory::open(vlm()).unwrap();
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("clip".into()))
        .meta("clip.projector_type", MetaValue::String("gemma3".into()));
    for (k, v) in [
        ("image_size", 56),
        ("patch_size", 14),
        ("embedding_length", 32),
        ("feed_forward_length", 64),
        ("block_count", 2),
        ("attention.head_count", 2),
        ("projection_dim", 64),
        ("projector.scale_factor", 2),
    ] {
        w.meta(&format!("clip.vision.{k}"), MetaValue::U32(v));
    }
    let mut names = vec![
        (
            "embeddings.patch_embedding.weight".to_string(),
            "v.patch_embd.weight".to_string(),
        ),
        (
            "embeddings.patch_embedding.bias".into(),
            "v.patch_embd.bias".into(),
        ),
        (
            "embeddings.position_embedding.weight".into(),
            "v.position_embd.weight".into(),
        ),
        ("post_layernorm.weight".into(), "v.post_ln.weight".into()),
        ("post_layernorm.bias".into(), "v.post_ln.bias".into()),
    ];
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
                    format!("encoder.layers.{i}.{hf}.{s}"),
                    format!("v.blk.{i}.{gg}.{s}"),
                ));
            }
        }
    }
    for (hf, gg) in names {
        let t = src.tensor(&format!("vision_tower.{hf}")).unwrap();
        w.tensor(&gg, &t.shape, DType::F32, t.bytes().to_vec());
    }
    let p = src
        .tensor("multi_modal_projector.mm_input_projection_weight")
        .unwrap();
    w.tensor(
        "mm.input_projection.weight",
        &p.shape,
        DType::F32,
        p.bytes().to_vec(),
    );
    let n = src
        .tensor("multi_modal_projector.mm_soft_emb_norm.weight")
        .unwrap();
    let plus_one: Vec<u8> = n
        .to_f32()
        .iter()
        .flat_map(|v| (v + 1.0).to_le_bytes())
        .collect();
    w.tensor("mm.soft_emb_norm.weight", &n.shape, DType::F32, plus_one);
    std::fs::write(out, w.to_bytes()).unwrap();
}

/// Speculative decoding with an image in the prompt: the same tokens as plain decoding,
/// greedy and seeded, and transformers' 8 greedy tokens still; image placeholders are never
/// guessed (the guesses are checked without image rows).
#[test]
fn prompt_lookup_with_an_image_changes_no_token() {
    let exp = expected();
    let m = tiny_vlm("lookup", "model.safetensors");
    let img = Image::open(vlm().join("image.png")).unwrap();
    let mut drafted = 0;
    for (n, sampling) in [
        (8, gemma3_engine::SamplingParams::greedy()),
        (64, gemma3_engine::SamplingParams::greedy()),
        (
            64,
            gemma3_engine::SamplingParams {
                temperature: 1.0,
                seed: 5,
                ..Default::default()
            },
        ),
    ] {
        let plain = GenerateOptions {
            max_new_tokens: n,
            ignore_eos: true,
            images: vec![img.clone()],
            sampling,
            ..Default::default()
        };
        let spec = GenerateOptions {
            lookup: Some(gemma3_engine::Lookup::default()),
            ..plain.clone()
        };
        let a = m.generate(PROMPT, &plain, |_| true).unwrap();
        let b = m.generate(PROMPT, &spec, |_| true).unwrap();
        assert_eq!(a.tokens, b.tokens, "{n} tokens");
        if n == 8 && plain.sampling.temperature == 0.0 {
            assert_eq!(b.tokens, ids(&exp["generated_ids"]));
        }
        drafted += b.drafted;
    }
    assert!(drafted > 0, "nothing was guessed: the check did not run");
}

/// A draft model with an image in the prompt: the draft (a second copy of the text model,
/// which sees the image's placeholders as padding) guesses, the target checks with the
/// image rows; the tokens are plain decoding's, greedy and seeded.
#[test]
fn a_draft_model_with_an_image_changes_no_token() {
    let m = tiny_vlm("draft-target", "model.safetensors");
    let d = tiny_vlm("draft-draft", "model.safetensors");
    let draft = gemma3_engine::Draft::new(
        &m,
        std::sync::Arc::new(d),
        gemma3_engine::DraftParams {
            p_min: 0.0,
            adaptive: false,
            ..Default::default()
        },
    )
    .unwrap();
    let img = Image::open(vlm().join("image.png")).unwrap();
    let mut drafted = 0;
    for sampling in [
        gemma3_engine::SamplingParams::greedy(),
        gemma3_engine::SamplingParams {
            temperature: 1.0,
            seed: 5,
            ..Default::default()
        },
    ] {
        let plain = GenerateOptions {
            max_new_tokens: 48,
            ignore_eos: true,
            images: vec![img.clone()],
            sampling,
            ..Default::default()
        };
        let spec = GenerateOptions {
            draft: Some(draft.clone()),
            ..plain.clone()
        };
        let a = m.generate(PROMPT, &plain, |_| true).unwrap();
        let b = m.generate(PROMPT, &spec, |_| true).unwrap();
        assert_eq!(a.tokens, b.tokens);
        drafted += b.drafted;
    }
    assert!(drafted > 0, "nothing was guessed: the check did not run");
}

/// A draft model of another vocabulary is refused, naming both models and the difference.
#[test]
fn a_draft_of_another_vocabulary_is_refused() {
    let m = tiny_vlm("draft-bad", "model.safetensors");
    let real = common::open_real_model();
    let e = gemma3_engine::Draft::new(&m, std::sync::Arc::new(real), Default::default())
        .expect_err("an incompatible draft must be refused");
    assert!(matches!(
        e,
        gemma3_engine::EngineError::DraftIncompatible(_)
    ));
    let msg = e.to_string();
    assert!(
        msg.contains("cannot draft for") && msg.contains("vocabulary"),
        "{msg}"
    );
}
