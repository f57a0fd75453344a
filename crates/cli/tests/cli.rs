//! The `gemma3` binary end to end on the real model: the `logits` JSON contract that
//! acceptance checks read, tokenize, generate (argument and stdin), info, and clear errors.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn gemma3(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gemma3"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn shared() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

#[test]
fn logits_contract_matches_transformers_top10() {
    let o = gemma3(&[
        "logits",
        "--ids",
        "2,818,5279,529,7001,563",
        "--top-k",
        "10",
    ]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["ids"], serde_json::json!([2, 818, 5279, 529, 7001, 563]));
    let pos = v["positions"].as_array().unwrap();
    assert_eq!(pos.len(), 6);
    for p in pos {
        let top = p["top"].as_array().unwrap();
        assert_eq!(top.len(), 10);
        for w in top.windows(2) {
            assert!(
                w[0][1].as_f64().unwrap() >= w[1][1].as_f64().unwrap(),
                "not descending"
            );
        }
    }
    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(shared().join("reference/transformers_270m.json")).unwrap(),
    )
    .unwrap();
    let want: Vec<u64> = reference["prompts"][0]["top10_next_token"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    let got: Vec<u64> = pos[5]["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0].as_u64().unwrap())
        .collect();
    assert_eq!(got, want);
    // --prompt gives the same ids and logits.
    let o2 = gemma3(&["logits", "--prompt", "The capital of France is"]);
    let v2: serde_json::Value = serde_json::from_str(&stdout(&o2)).unwrap();
    assert_eq!(v2, v);
}

#[test]
fn logits_whole_vocabulary() {
    let o = gemma3(&["logits", "--ids", "2", "--top-k", "0"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["positions"][0]["top"].as_array().unwrap().len(), 262144);
}

#[test]
fn tokenize_json() {
    let o = gemma3(&["tokenize", "--json", "Hello world"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["ids"], serde_json::json!([2, 9259, 1902]));
    assert_eq!(v["pieces"], serde_json::json!(["<bos>", "Hello", "▁world"]));
}

#[test]
fn generate_from_argument_and_stdin() {
    // Greedy, to compare with a fixed text (the default samples, as Gemma is meant to).
    let o = gemma3(&[
        "generate",
        "--greedy",
        "-n",
        "8",
        "The capital of France is",
    ]);
    assert_eq!(stdout(&o), " the capital of the country of France.\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gemma3"))
        .args(["generate", "--greedy", "-n", "8"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"The capital of France is")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(stdout(&o), " the capital of the country of France.\n");
}

#[test]
fn info_describes_the_model() {
    let s = stdout(&gemma3(&["info"]));
    for want in [
        "GGUF v3",
        "270M",
        "18 (15 sliding, window 512; 3 full)",
        "Q4_K",
        "Q8_0",
        "262144",
    ] {
        assert!(s.contains(want), "info lacks {want:?}:\n{s}");
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let o = gemma3(&["generate", "--model", "/nonexistent.gguf", "hi"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("/nonexistent.gguf") && e.contains("does not exist"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");

    // A truncated copy of the real model.
    let dir = std::env::temp_dir().join(format!("gemma3-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let real = gemma3_hub::cached_default_model().expect("run scripts/fetch-model.sh");
    let bytes = std::fs::read(&real).unwrap();
    let cut = dir.join("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = gemma3(&["info", "--model", cut.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("truncated"), "{e}");
    // Not a GGUF at all.
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"hello, this is not a model").unwrap();
    let o = gemma3(&["info", "--model", junk.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a GGUF file"));
    std::fs::remove_dir_all(&dir).ok();

    // Out-of-vocabulary ids and bad sampling values.
    let o = gemma3(&["logits", "--ids", "2,999999"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("outside the vocabulary"));
    let o = gemma3(&["generate", "--top-p", "0", "hi"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("top_p"));
}

#[test]
fn chat_answers_each_line_and_exits_at_end_of_input() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gemma3"))
        .args(["chat", "-n", "6"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello\n\nHow are you?\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    // Two messages (the empty line is skipped); replies may span lines themselves.
    let out = stdout(&o);
    assert!(out.lines().count() >= 2, "{out:?}");
}

#[test]
fn generate_wraps_instruction_tuned_prompts_in_their_template() {
    // The quantize fixture's model (Gemma's first 512 pieces, <start_of_turn> among them)
    // with a chat template of its own is "instruction-tuned": generate wraps the prompt
    // unless --raw. The wrapped prompt is the template's tokens around the raw one.
    let src = shared().join("fixtures/quantize/hf");
    let dir = std::env::temp_dir().join(format!("gemma3-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content | trim }}<end_of_turn>\n{% endfor %}{{ '<start_of_turn>model\\n' }}",
    )
    .unwrap();
    let d = dir.to_str().unwrap();
    let prompt_tokens = |extra: &[&str]| -> usize {
        let mut args = vec!["generate", "--model", d, "--greedy", "-n", "1", "--verbose"];
        args.extend_from_slice(extra);
        args.push("hello");
        let o = gemma3(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        let line = err.lines().find(|l| l.starts_with("prompt: ")).unwrap();
        line["prompt: ".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let count = |text: &str, extra: &[&str]| -> usize {
        let mut args = vec!["tokenize", "--model", d, "--json"];
        args.extend_from_slice(extra);
        args.push(text);
        let v: serde_json::Value = serde_json::from_str(&stdout(&gemma3(&args))).unwrap();
        v["ids"].as_array().unwrap().len()
    };
    let raw = prompt_tokens(&["--raw"]);
    assert_eq!(raw, count("hello", &[]));
    let wrapped = prompt_tokens(&[]);
    let rendered = "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n";
    assert_eq!(
        wrapped,
        count(rendered, &["--no-bos"]),
        "raw {raw}, wrapped {wrapped}"
    );
    assert_eq!(prompt_tokens(&["--chat"]), wrapped);
    assert!(prompt_tokens(&["--system", "Be brief."]) > wrapped);
    // A base model (no template) is not wrapped, and --system then asks for --chat.
    let o = gemma3(&["generate", "--system", "x", "-n", "1", "hi"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--system needs the chat template"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn context_and_cache_type_errors_name_the_values() {
    let err = |args: &[&str]| -> String {
        let o = gemma3(args);
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{e}");
        e
    };
    let e = err(&["generate", "-c", "0", "hi"]);
    assert!(e.contains("at least 1 token"), "{e}");
    let e = err(&["generate", "-c", "40000", "hi"]);
    assert!(
        e.contains("40000") && e.contains("trained context of 32768"),
        "{e}"
    );
    let e = err(&["generate", "--cache-type", "q4_0", "hi"]);
    assert!(e.contains("unknown cache type \"q4_0\""), "{e}");
    let e = err(&[
        "generate",
        "-c",
        "8",
        "-n",
        "4",
        "one two three four five six seven eight",
    ]);
    assert!(e.contains("more than the context of 8 tokens"), "{e}");
    let e = err(&["perplexity", "-c", "0", "Cargo.toml"]);
    assert!(e.contains("too small"), "{e}");
    let e = err(&["perplexity", "-c", "40000", "Cargo.toml"]);
    assert!(e.contains("trained context of 32768"), "{e}");
    let e = err(&["info", "-c", "40000"]);
    assert!(e.contains("40000"), "{e}");
    // --truncate left keeps the prompt's end instead.
    let o = gemma3(&[
        "generate",
        "-c",
        "8",
        "-n",
        "4",
        "--truncate",
        "left",
        "--greedy",
        "--verbose",
        "one two three four five six seven eight",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("prompt: 4 tokens"), "{e}");
    // info sizes the cache for a context, for every type.
    let out = stdout(&gemma3(&["info", "-c", "32768"]));
    for t in ["f32", "f16", "bf16", "q8_0"] {
        assert!(out.contains(&format!("  {t} ")), "{out}");
    }
    assert!(out.contains("116.4 MB at 32768"), "f16 at 32K: {out}");
}
