//! `gemma3 quantize` and `--quantize` end to end on ../shared/fixtures/quantize: the file
//! llama-quantize writes, logits at load equal to the written file's, the error cases, and
//! an interrupted run leaving no output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gemma3(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gemma3"))
        .args(args)
        .output()
        .unwrap()
}

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/quantize")
        .join(name)
        .display()
        .to_string()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn err(o: &Output) -> String {
    assert!(!o.status.success(), "should have failed");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gemma3-cli-quant-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn quantize_writes_llama_quantize_file_and_refuses_to_clobber() {
    let dir = temp_dir("write");
    let out = dir.join("out.gguf");
    let out_s = out.to_str().unwrap();
    let s = ok(&gemma3(&[
        "quantize",
        &fixture("model-F32.gguf"),
        out_s,
        "q4_k_m",
        "--quiet",
    ]));
    assert!(s.contains("38 Q4_K, 5 Q6_K"), "{s}");
    assert!(std::fs::read(&out).unwrap() == std::fs::read(fixture("model-Q4_K_M.gguf")).unwrap());
    let e = err(&gemma3(&["quantize", &fixture("hf"), out_s, "Q8_0", "-q"]));
    assert!(e.contains("already exists (use --force"), "{e}");
    ok(&gemma3(&[
        "quantize",
        &fixture("hf"),
        out_s,
        "Q8_0",
        "-q",
        "--force",
    ]));
    let e = err(&gemma3(&[
        "quantize",
        &fixture("hf"),
        out_s,
        "Q3_K_M",
        "--force",
    ]));
    assert!(
        e.contains("unknown quantization type") && e.contains("Q5_K_S"),
        "{e}"
    );
    let e = err(&gemma3(&[
        "quantize",
        "/nonexistent/dir",
        out_s,
        "Q8_0",
        "--force",
    ]));
    assert!(e.contains("/nonexistent/dir does not exist"), "{e}");
    // Only the output is in the directory: no temporary files left behind.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `logits` on hf/ with `--quantize Q4_K_M` prints exactly what it prints for
/// llama-quantize's Q4_K_M file, with f32 and with 8-bit activations.
#[test]
fn quantize_at_load_prints_the_files_logits() {
    let ids = "2,494,495,496,497,498,499,107,510,3";
    for extra in [&[][..], &["--fast"][..]] {
        let run = |model: &str, q: &[&str]| {
            let mut args = vec!["logits", "-m", model, "--ids", ids, "--top-k", "0"];
            args.extend_from_slice(q);
            args.extend_from_slice(extra);
            ok(&gemma3(&args))
        };
        let want = run(&fixture("model-Q4_K_M.gguf"), &[]);
        assert_eq!(run(&fixture("hf"), &["--quantize", "Q4_K_M"]), want);
        assert_eq!(
            run(&fixture("model-F32.gguf"), &["--quantize", "q4_k_m"]),
            want
        );
        assert_ne!(
            run(&fixture("hf"), &[]),
            want,
            "quantizing changes the logits"
        );
    }
}

/// Killed while writing: the output name never appears (data goes to a temporary file
/// that is renamed only at the end).
#[test]
fn interrupted_quantize_leaves_no_output() {
    let dir = temp_dir("kill");
    let out = dir.join("killed.gguf");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gemma3"))
        .args([
            "quantize",
            &fixture("hf"),
            out.to_str().unwrap(),
            "Q4_K_M",
            "-q",
        ])
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let temp_seen = loop {
        if tmp_files(&dir) > 0 {
            break true;
        }
        if child.try_wait().unwrap().is_some() || started.elapsed().as_secs() > 30 {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    };
    assert!(
        temp_seen,
        "the run ended before its temporary file was seen"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists(), "a killed run left {}", out.display());
    let _ = std::fs::remove_dir_all(&dir);
}

fn tmp_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        })
        .count()
}
