//! GGUF files built by hand: every metadata type, tensor data, and malformed files that
//! must give errors naming the problem (never a panic or a huge allocation).

use gemma3_formats::gguf::{GgufWriter, MetaValue};
use gemma3_formats::{DType, GgufFile, HfDirectory};

fn sample() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("gemma3".into()))
        .meta("u8", MetaValue::U8(7))
        .meta("i8", MetaValue::I8(-7))
        .meta("u16", MetaValue::U16(700))
        .meta("i16", MetaValue::I16(-700))
        .meta("u32", MetaValue::U32(70000))
        .meta("i32", MetaValue::I32(-70000))
        .meta("u64", MetaValue::U64(1 << 40))
        .meta("i64", MetaValue::I64(-(1 << 40)))
        .meta("f32", MetaValue::F32(1.5))
        .meta("f64", MetaValue::F64(-2.5))
        .meta("bool", MetaValue::Bool(true))
        .meta(
            "nested",
            MetaValue::Array(vec![
                MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(2)]),
                MetaValue::Array(vec![MetaValue::I32(3)]),
            ]),
        )
        .meta(
            "strings",
            MetaValue::Array(vec![
                MetaValue::String("a".into()),
                MetaValue::String("ü".into()),
            ]),
        );
    let vals: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
    w.tensor(
        "m",
        &[3, 4],
        DType::F32,
        vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
    );
    let mut q8 = half::f16::from_f32(1.0).to_le_bytes().to_vec();
    q8.extend((0..32).map(|i| i as u8));
    w.tensor("q", &[1, 32], DType::Q8_0, q8);
    w
}

#[test]
fn round_trip_every_value_type() {
    let g = GgufFile::from_bytes("sample.gguf", sample().to_bytes()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.get_u64("u8"), Some(7));
    assert_eq!(g.get("i8").unwrap().as_i64(), Some(-7));
    assert_eq!(g.get_u64("u16"), Some(700));
    assert_eq!(g.get("i16").unwrap().as_i64(), Some(-700));
    assert_eq!(g.get_u64("u32"), Some(70000));
    assert_eq!(g.get("i32").unwrap().as_i64(), Some(-70000));
    assert_eq!(g.get_u64("u64"), Some(1 << 40));
    assert_eq!(g.get("i64").unwrap().as_i64(), Some(-(1 << 40)));
    assert_eq!(g.get_f64("f32"), Some(1.5));
    assert_eq!(g.get_f64("f64"), Some(-2.5));
    assert_eq!(g.get_bool("bool"), Some(true));
    let nested = g.get("nested").unwrap().as_array().unwrap();
    assert_eq!(nested[0].as_array().unwrap()[1].as_i64(), Some(2));
    assert_eq!(
        g.get("strings").unwrap().as_array().unwrap()[1].as_str(),
        Some("ü")
    );
    let m = g.tensor("m").unwrap();
    assert_eq!(m.shape, vec![3, 4]);
    assert_eq!(m.to_f32()[5], 2.5);
    assert_eq!(m.row(2).len(), 16);
    let q = g.tensor("q").unwrap();
    assert_eq!(q.to_f32()[31], 31.0);
    assert!(g
        .tensor("missing")
        .unwrap_err()
        .to_string()
        .contains("missing"));
}

fn err_of(bytes: Vec<u8>) -> String {
    match GgufFile::from_bytes("bad.gguf", bytes) {
        Ok(_) => panic!("a malformed file was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_magic_and_version() {
    let mut b = sample().to_bytes();
    b[0] = b'X';
    assert!(err_of(b).contains("not a GGUF file"));
    let mut b = sample().to_bytes();
    b[4] = 1;
    assert!(err_of(b).contains("version 1"));
    assert!(err_of(vec![]).contains("truncated"));
}

#[test]
fn every_truncation_is_an_error() {
    let full = sample().to_bytes();
    // Bytes after the last tensor's data are only alignment padding.
    let g = GgufFile::from_bytes("sample.gguf", full.clone()).unwrap();
    let end = g.tensors.iter().map(|t| t.offset + t.size).max().unwrap() as usize;
    for len in 0..end {
        let e = err_of(full[..len].to_vec());
        assert!(
            e.contains("truncated") || e.contains("runs past") || e.contains("more than"),
            "length {len}: {e}"
        );
    }
}

#[test]
fn lying_counts_and_sizes() {
    // Tensor count of 2^60: refused before allocating anything.
    let mut b = sample().to_bytes();
    b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(err_of(b).contains("more than"));
    // Metadata count too large.
    let mut b = sample().to_bytes();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(err_of(b).contains("more than"));
    // A string length far past the end.
    let mut b = sample().to_bytes();
    b[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert!(err_of(b).contains("truncated"));
    // An array claiming 2^40 elements.
    let mut w = GgufWriter::new();
    w.meta("arr", MetaValue::Array(vec![MetaValue::U32(1)]));
    let mut b = w.to_bytes();
    let pos = b.windows(8).position(|x| x == 1u64.to_le_bytes()).unwrap();
    // the first u64 == 1 after the header counts is the array length
    let pos = b[24..]
        .windows(8)
        .position(|x| x == 1u64.to_le_bytes())
        .map(|p| p + 24)
        .unwrap_or(pos);
    b[pos..pos + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = err_of(b);
    assert!(e.contains("truncated") || e.contains("array"), "{e}");
}

#[test]
fn tensor_dimensions_past_the_end() {
    let mut w = GgufWriter::new();
    w.tensor("big", &[1000, 1000], DType::F32, vec![0u8; 16]);
    let e = err_of(w.to_bytes());
    assert!(
        e.contains("big") && (e.contains("truncated") || e.contains("larger")),
        "{e}"
    );
    // Row length not a multiple of the block size.
    let mut w = GgufWriter::new();
    w.tensor("odd", &[1, 33], DType::Q8_0, vec![0u8; 34]);
    let e = err_of(w.to_bytes());
    assert!(e.contains("odd") && e.contains("multiple"), "{e}");
    // Unsupported type id.
    let mut b = sample().to_bytes();
    let name_pos = b
        .windows(1 + 8)
        .position(|x| x == [1u8, 0, 0, 0, 0, 0, 0, 0, b'q'])
        .unwrap();
    // after name "q": n_dims u32, two dims u64, then the type u32
    let ty = name_pos + 9 + 4 + 16;
    b[ty..ty + 4].copy_from_slice(&10u32.to_le_bytes());
    let e = err_of(b);
    assert!(e.contains("Q2_K") && e.contains("not support"), "{e}");
}

#[test]
fn file_errors_name_the_file() {
    let e = GgufFile::open("/nonexistent/model.gguf")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
}

#[test]
fn malformed_safetensors() {
    let dir = std::env::temp_dir().join(format!("gemma3-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    // Header length larger than the file.
    let mut b = (1u64 << 40).to_le_bytes().to_vec();
    b.extend(b"{}");
    std::fs::write(dir.join("model.safetensors"), &b).unwrap();
    let e = HfDirectory::open(&dir).err().unwrap().to_string();
    assert!(e.contains("safetensors"), "{e}");
    // A tensor whose offsets run past the data.
    let header = br#"{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header);
    b.extend([0u8; 16]);
    std::fs::write(dir.join("model.safetensors"), &b).unwrap();
    let e = HfDirectory::open(&dir).err().unwrap().to_string();
    assert!(e.contains("safetensors"), "{e}");
    // Bad JSON config.
    std::fs::write(dir.join("config.json"), "{not json").unwrap();
    let e = HfDirectory::open(&dir).err().unwrap().to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Declared tensors streamed in pieces of any size give the in-memory file; writing more
/// or less than the header declared is an error.
#[test]
fn streamed_tensors_equal_the_in_memory_file() {
    let full = sample().to_bytes();
    let mut w = sample();
    let m: Vec<u8> = (0..12)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    let mut q8 = half::f16::from_f32(1.0).to_le_bytes().to_vec();
    q8.extend((0..32).map(|i| i as u8));
    let mut plain = GgufWriter::new();
    plain.meta("general.architecture", MetaValue::String("gemma3".into()));
    plain.tensor_info("m", &[3, 4], DType::F32);
    plain.tensor_info("q", &[1, 32], DType::Q8_0);
    let mut s = plain.start(Vec::new()).unwrap();
    for piece in m.chunks(5).chain(q8.chunks(7)) {
        s.write_data(piece).unwrap();
    }
    let streamed = s.finish().unwrap();
    let g = GgufFile::from_bytes("s.gguf", streamed).unwrap();
    assert_eq!(g.tensor("m").unwrap().bytes(), &m[..]);
    assert_eq!(g.tensor("q").unwrap().bytes(), &q8[..]);
    assert_eq!(g.metadata_order, ["general.architecture"]);
    // set_meta moves a key to the end, as ggml's gguf_set_* does.
    w.set_meta("u8", MetaValue::U8(8));
    let g = GgufFile::from_bytes("w.gguf", w.to_bytes()).unwrap();
    assert_eq!(g.metadata_order.last().map(String::as_str), Some("u8"));
    assert_eq!(full.len(), w.to_bytes().len());

    let mut s = plain.start(Vec::new()).unwrap();
    s.write_data(&m).unwrap();
    let e = s.finish().unwrap_err();
    assert!(e.to_string().contains("tensor q"), "{e}");
    let mut s = plain.start(Vec::new()).unwrap();
    let e = s
        .write_data(&vec![0u8; m.len() + q8.len() + 1])
        .unwrap_err();
    assert!(e.to_string().contains("more tensor data"), "{e}");
}
