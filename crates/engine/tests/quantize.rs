//! `gemma3 quantize`'s library side against llama.cpp's files in
//! ../shared/fixtures/quantize: llama-quantize's output for ten types (tensor types and
//! bytes, and here the whole file), the converter's f32 file from the Hugging Face
//! directory, and quantization at load giving the logits of the written file.

use gemma3_convert::quantize::{write_gguf, Plan, Progress};
use gemma3_convert::ConvertError;
use gemma3_engine::{Model, OpenOptions};
use gemma3_formats::{GgufFile, MetaValue};
use gemma3_model::FileType;
use gemma3_model::{KvCache, Logits, Precision, Workspace};
use std::path::{Path, PathBuf};

mod common;
use common::shared;

fn fixture(name: &str) -> PathBuf {
    shared().join("fixtures/quantize").join(name)
}

/// The quantized types (every file type but F32, F16 and BF16), each with a fixture file.
fn quantized_types() -> impl Iterator<Item = FileType> {
    FileType::ALL
        .into_iter()
        .filter(|t| !matches!(t, FileType::F32 | FileType::F16 | FileType::BF16))
}

fn plan_bytes(input: &Path, t: FileType) -> Vec<u8> {
    let plan = Plan::for_model(input, t).unwrap();
    let mut out = Vec::new();
    plan.write(&mut out, &mut |_| true).unwrap();
    out
}

/// Metadata as key → value, leaving out `skip`.
fn meta(g: &GgufFile, skip: &[&str]) -> Vec<(String, MetaValue)> {
    g.metadata_order
        .iter()
        .filter(|k| !skip.contains(&k.as_str()))
        .map(|k| (k.clone(), g.metadata[k].clone()))
        .collect()
}

/// Every tensor's name, type, shape and bytes.
fn tensors(g: &GgufFile) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let mut v: Vec<_> = g
        .tensors
        .iter()
        .map(|i| {
            let t = g.tensor_from_info(i).unwrap();
            (
                i.name.clone(),
                t.dtype.to_string(),
                t.shape.clone(),
                t.bytes().to_vec(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// From the f32 GGUF, every type gives llama-quantize's file byte for byte (metadata,
/// tensor order, types and data); from the Hugging Face directory, the same tensors and
/// metadata (the model's name aside: the converter takes it from the command line).
#[test]
fn quantize_gives_llama_quantize_files() {
    for t in quantized_types() {
        let want_path = fixture(&format!("model-{t}.gguf"));
        let want = std::fs::read(&want_path).unwrap();
        let got = plan_bytes(&fixture("model-F32.gguf"), t);
        assert!(
            got == want,
            "{t}: output differs from llama-quantize's file"
        );

        let from_hf = GgufFile::from_bytes("hf.gguf", plan_bytes(&fixture("hf"), t)).unwrap();
        let want = GgufFile::open(&want_path).unwrap();
        assert!(
            tensors(&from_hf) == tensors(&want),
            "{t} from hf/: tensors differ"
        );
        let skip = ["general.name"];
        assert_eq!(meta(&from_hf, &skip), meta(&want, &skip), "{t} from hf/");
    }
}

/// The converter's view of hf/: the f32 file tensor for tensor, metadata key for key.
#[test]
fn hf_converts_to_the_f32_file() {
    let got = GgufFile::from_bytes("f32.gguf", plan_bytes(&fixture("hf"), FileType::F32)).unwrap();
    let want = GgufFile::open(fixture("model-F32.gguf")).unwrap();
    let names = |g: &GgufFile| g.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got), names(&want), "tensor order");
    assert!(tensors(&got) == tensors(&want), "tensor data");
    let skip = ["general.name"];
    assert_eq!(meta(&got, &skip), meta(&want, &skip));
    assert_eq!(got.get_str("general.name"), Some("hf"));
}

/// Requantizing: a quantized file read back gives the same types (a tensor already of its
/// target type is copied; the others are dequantized first and counted).
#[test]
fn requantizing_copies_tensors_already_in_their_type() {
    let plan = Plan::for_model(&fixture("model-Q4_K_M.gguf"), FileType::Q4_K_M).unwrap();
    assert_eq!(plan.requantized_count(), 0);
    let mut out = Vec::new();
    plan.write(&mut out, &mut |_| true).unwrap();
    assert!(out == std::fs::read(fixture("model-Q4_K_M.gguf")).unwrap());
    let plan = Plan::for_model(&fixture("model-Q8_0.gguf"), FileType::Q4_0).unwrap();
    assert_eq!(plan.requantized_count(), 43);
}

fn logits(m: &Model, ids: &[u32]) -> Vec<f32> {
    let cfg = &m.text.cfg;
    let vocab = cfg.vocab_size;
    let mut cache = KvCache::new(cfg, 64, 64);
    let mut ws = Workspace::new(cfg, 64);
    let mut out = vec![0f32; ids.len() * vocab];
    m.text
        .forward(ids, &mut cache, &mut ws, Logits::All, &mut |r, l| {
            out[r * vocab..(r + 1) * vocab].copy_from_slice(l)
        })
        .unwrap();
    out
}

/// `--quantize` at load gives exactly the logits of loading the written file, in both
/// precisions, from the Hugging Face directory and from the f32 GGUF.
#[test]
fn quantizing_at_load_equals_the_written_file() {
    let ids = [2u32, 494, 495, 496, 497, 498, 499, 500, 107, 510, 3, 511];
    for t in [FileType::Q4_K_M, FileType::Q8_0] {
        let opts = OpenOptions {
            quantize: Some(t),
            offline: true,
            ..Default::default()
        };
        for src in ["hf", "model-F32.gguf"] {
            let path = fixture(src);
            let mut m = Model::open_with(Some(path.to_str().unwrap()), &opts).unwrap();
            let mut f = Model::open(fixture(&format!("model-{t}.gguf"))).unwrap();
            for p in [Precision::Fast, Precision::Exact] {
                m.set_precision(p);
                f.set_precision(p);
                let (a, b) = (logits(&m, &ids), logits(&f, &ids));
                assert!(a == b, "{t} from {src}, {p:?}: logits differ");
            }
        }
    }
}

/// A run stopped part way (the progress callback says stop) leaves no output file and no
/// temporary file; an existing output is refused unless overwriting is asked for.
#[test]
fn interrupted_runs_leave_nothing_and_outputs_are_not_clobbered() {
    let dir = std::env::temp_dir().join(format!("gemma3-quant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.gguf");
    let plan = Plan::for_model(&fixture("model-F32.gguf"), FileType::Q4_0).unwrap();
    let mut calls = 0;
    let e = write_gguf(&plan, &out, false, &mut |p: &Progress| {
        calls += 1;
        p.index < 10
    })
    .unwrap_err();
    assert!(matches!(e, ConvertError::Cancelled), "{e}");
    assert!(calls > 10);
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    let s = write_gguf(&plan, &out, false, &mut |_| true).unwrap();
    assert_eq!(s.tensors, 80);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(fixture("model-Q4_0.gguf")).unwrap()
    );
    let e = write_gguf(&plan, &out, false, &mut |_| true).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    write_gguf(&plan, &out, true, &mut |_| true).unwrap();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let msg = |r: Result<Plan, ConvertError>| r.err().unwrap().to_string();
    let e = msg(Plan::for_model(
        Path::new("/nonexistent/model"),
        FileType::Q8_0,
    ));
    assert!(e.contains("/nonexistent/model does not exist"), "{e}");
    // A truncated GGUF.
    let dir = std::env::temp_dir().join(format!("gemma3-quant-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = std::fs::read(fixture("model-F32.gguf")).unwrap();
    std::fs::write(dir.join("short.gguf"), &bytes[..bytes.len() / 2]).unwrap();
    let e = msg(Plan::for_model(&dir.join("short.gguf"), FileType::Q8_0));
    assert!(e.contains("truncated"), "{e}");
    let e = "Q3_K_L".parse::<FileType>().unwrap_err().to_string();
    assert!(e.contains("unknown quantization type"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The real Gemma 3 270M Q4_K_M file (640-wide rows, so K-quants fall back and the tied
/// embedding is Q8_0): the rules give every tensor the type llama-quantize gave it.
#[test]
fn rules_give_the_real_270m_files_types() {
    let path = gemma3_hub::cached_default_model()
        .expect("the real model is missing: run scripts/fetch-model.sh");
    let g = GgufFile::open(&path).unwrap();
    let plan = Plan::for_gguf(&g, FileType::Q4_K_M).unwrap();
    assert_eq!(plan.tensors.len(), g.tensors.len());
    for t in &plan.tensors {
        let stored = g.tensor_info(&t.name).unwrap().dtype;
        assert_eq!(t.target, stored, "{}", t.name);
    }
    assert_eq!(plan.requantized_count(), 0);
}
