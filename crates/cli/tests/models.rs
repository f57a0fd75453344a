//! `--model NAME` end to end: the real 270M model behind a Hugging Face repo id (fake hub
//! cache) and an Ollama name (fake store) gives exactly the direct path's logits, text only
//! and with an image through the mmproj beside it / the projector layer; `pull`, `list`,
//! gated repos and offline mode against the mock hub on 127.0.0.1; sampling defaults from
//! generation_config.json, Ollama's parameters or Gemma's settings, and `--greedy`.

#[path = "../../engine/tests/model_stores/mod.rs"]
mod model_stores;
use model_stores::*;
use std::path::Path;
use std::process::{Command, Output};

/// Variables that choose models, cleared so the machine's own settings do not leak in.
const MODEL_ENV: [&str; 10] = [
    "GEMMA3_MODEL",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HF_TOKEN_PATH",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_OFFLINE",
    "OLLAMA_MODELS",
];

fn gemma3(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gemma3"));
    for k in MODEL_ENV {
        c.env_remove(k);
    }
    c.args(args).envs(env.iter().copied()).output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A hub cache and an Ollama store in `root` holding the real 270M model, each with an
/// mmproj made for its width.
fn stores_with_real_model(root: &Path) -> Vec<(String, String)> {
    let real = real_model();
    let mmproj = root.join("mmproj-gemma-3-270m-f16.gguf");
    write_mmproj(&mmproj, 640);
    add_to_cache(
        &root.join("hub"),
        "ggml-org/gemma-3-270m-GGUF",
        &fake_hex("270m", 40),
        &["main"],
        &[
            ("gemma-3-270m-Q4_K_M.gguf", &real),
            ("mmproj-gemma-3-270m-f16.gguf", &mmproj),
        ],
    );
    add_to_ollama(
        &root.join("ollama"),
        "registry.ollama.ai/library/gemma3/270m",
        &[
            Layer::File(OLLAMA_MODEL, &real),
            Layer::File(OLLAMA_PROJECTOR, &mmproj),
            Layer::Text(
                OLLAMA_TEMPLATE,
                "<start_of_turn>user\n{{ .Prompt }}<end_of_turn>\n<start_of_turn>model\n",
            ),
            Layer::Text(
                OLLAMA_PARAMS,
                r#"{"stop": ["<end_of_turn>"], "temperature": 1, "top_k": 64, "top_p": 0.95}"#,
            ),
        ],
    );
    vec![
        (
            "HF_HUB_CACHE".into(),
            root.join("hub").display().to_string(),
        ),
        (
            "OLLAMA_MODELS".into(),
            root.join("ollama").display().to_string(),
        ),
        // Nothing is downloaded: any request would fail.
        ("HF_ENDPOINT".into(), "http://127.0.0.1:9".into()),
    ]
}

#[test]
fn repo_ids_and_ollama_names_give_the_direct_logits() {
    let root = temp_dir("cli-real");
    let env_owned = stores_with_real_model(&root);
    let env: Vec<(&str, &str)> = env_owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let real = real_model();
    let real = real.to_str().unwrap();
    let mmproj = root.join("mmproj-gemma-3-270m-f16.gguf");
    let mmproj = mmproj.to_str().unwrap();

    let logits = |model: &str| {
        ok(&gemma3(
            &[
                "logits",
                "--model",
                model,
                "--ids",
                "2,818,5279",
                "--top-k",
                "0",
            ],
            &env,
        ))
    };
    let direct = logits(real);
    assert_eq!(direct.matches("],[").count() + 3, 3 * 262_144); // every logit of 3 positions
    for name in [
        "ggml-org/gemma-3-270m-GGUF",
        "ggml-org/gemma-3-270m-GGUF:Q4_K_M",
        "gemma3:270m",
        "registry.ollama.ai/library/gemma3:270m",
    ] {
        assert!(
            logits(name) == direct,
            "{name} gives other logits than {real}"
        );
    }

    // With an image: the mmproj beside the GGUF in the repo, and Ollama's projector layer,
    // are the vision tower the direct path is given with --mmproj.
    let image = shared().join("fixtures/tiny-vlm/image.png");
    let image = image.to_str().unwrap();
    let with_image = |extra: &[&str]| {
        let mut a = vec![
            "logits",
            "--prompt",
            "<start_of_image>Describe this image.",
            "--image",
            image,
            "--top-k",
            "20",
        ];
        a.extend_from_slice(extra);
        gemma3(&a, &env)
    };
    let direct = ok(&with_image(&["--model", real, "--mmproj", mmproj]));
    let text_only = with_image(&["--model", real]);
    assert!(
        !text_only.status.success(),
        "an image needs the vision tower"
    );
    for name in ["ggml-org/gemma-3-270m-GGUF", "gemma3:270m"] {
        assert!(
            ok(&with_image(&["--model", name])) == direct,
            "{name} with an image"
        );
    }

    // info and --verbose say what was picked, and Ollama's template and parameters.
    let info = ok(&gemma3(&["info", "--model", "gemma3:270m"], &env));
    for want in [
        "source:         gemma3:270m from the Ollama store",
        "template:       Ollama Go template",
        "\"stop\":[\"<end_of_turn>\"]",
        "sampling:       temperature 1, top-k 64, top-p 0.95",
        "vision:         SigLIP",
    ] {
        assert!(info.contains(want), "info lacks {want:?}:\n{info}");
    }
    let info = ok(&gemma3(
        &["info", "--model", "ggml-org/gemma-3-270m-GGUF"],
        &env,
    ));
    assert!(
        info.contains("from the Hugging Face cache (revision main, commit"),
        "{info}"
    );
    assert!(
        info.contains("(from Gemma 3's published settings)"),
        "{info}"
    );
    let o = gemma3(
        &[
            "generate",
            "--verbose",
            "-n",
            "2",
            "--model",
            "gemma3:270m",
            "Hi",
        ],
        &env,
    );
    ok(&o);
    assert!(stderr(&o).contains("sampling: temperature 1, top-k 64, top-p 0.95, min-p 0, seed 42 (defaults from Ollama parameters"), "{}", stderr(&o));

    // `list` shows both, with their vision files.
    let list: serde_json::Value =
        serde_json::from_str(&ok(&gemma3(&["list", "--json"], &env))).unwrap();
    let find = |name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {list}"))
            .clone()
    };
    let hf = find("ggml-org/gemma-3-270m-GGUF:Q4_K_M");
    assert_eq!(
        (hf["source"].as_str(), hf["vision"].as_str()),
        (Some("Hugging Face cache"), Some("yes (mmproj)"))
    );
    let ol = find("gemma3:270m");
    assert_eq!(ol["source"], "Ollama store");
    assert!(ol["size"].as_u64().unwrap() > std::fs::metadata(real).unwrap().len());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn pull_list_gated_and_offline() {
    let root = temp_dir("cli-pull");
    let q8 = quantize_fixture("model-Q8_0.gguf");
    let tiny = MockRepo::new(
        "org/tiny-GGUF",
        &[
            ("tiny-Q4_K_M.gguf", &quantize_fixture("model-Q4_K_M.gguf")),
            ("tiny-Q8_0.gguf", &q8),
        ],
    );
    let mut gated = tiny.clone();
    gated.repo = "google/gated-GGUF".into();
    gated.token = Some("hf_secret".into());
    let hub = MockHub::start(vec![tiny, gated]);
    let cache = root.join("hub");
    let home = root.join("hf-home");
    let env = [
        ("HF_ENDPOINT", hub.url.as_str()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ("HF_HOME", home.to_str().unwrap()),
        ("OLLAMA_MODELS", root.to_str().unwrap()),
    ];
    let o = gemma3(&["pull", "org/tiny-GGUF:Q8_0"], &env);
    let path = ok(&o).trim().to_string();
    let want = format!("snapshots/{}/tiny-Q8_0.gguf", fake_hex("org/tiny-GGUF", 40));
    assert!(path.ends_with(&want), "{path}");
    assert_eq!(read(Path::new(&path)), read(&q8));
    assert!(
        stderr(&o).contains("downloading tiny-Q8_0.gguf"),
        "{}",
        stderr(&o)
    );

    // The downloaded model gives the fixture's logits, offline.
    let offline: Vec<(&str, &str)> = env
        .iter()
        .copied()
        .chain([("HF_HUB_OFFLINE", "1")])
        .collect();
    let logits = |model: &str| {
        ok(&gemma3(
            &[
                "logits", "--model", model, "--ids", "2,10,20", "--top-k", "0",
            ],
            &offline,
        ))
    };
    assert!(logits("org/tiny-GGUF:Q8_0") == logits(q8.to_str().unwrap()));
    let list = ok(&gemma3(&["list"], &offline));
    assert!(
        list.contains("org/tiny-GGUF:Q8_0") && list.contains("Hugging Face cache"),
        "{list}"
    );

    // Offline, what is not cached is a clear error naming it.
    let o = gemma3(&["pull", "org/other-GGUF"], &offline);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("org/other-GGUF") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    let o = gemma3(&["generate", "--model", "org/other-GGUF", "hi"], &offline);
    assert!(
        stderr(&o).contains("org/other-GGUF") && !stderr(&o).contains("panicked"),
        "{}",
        stderr(&o)
    );

    // A gated repo: the license message without a token; with HF_TOKEN it downloads.
    let o = gemma3(&["pull", "google/gated-GGUF"], &env);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    for want in [
        "google/gated-GGUF is gated",
        "accept its license",
        "HF_TOKEN",
    ] {
        assert!(e.contains(want), "{want:?} not in {e}");
    }
    let with_token: Vec<(&str, &str)> = env
        .iter()
        .copied()
        .chain([("HF_TOKEN", "hf_secret")])
        .collect();
    assert!(ok(&gemma3(&["pull", "google/gated-GGUF"], &with_token)).contains("tiny-Q4_K_M.gguf"));
    // The token file in HF_HOME works as well (the blob is cached now, so only metadata is
    // asked for, with the token).
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("token"), "hf_secret\n").unwrap();
    ok(&gemma3(&["pull", "google/gated-GGUF"], &env));
    drop(hub);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn sampling_defaults_follow_the_model_and_greedy_is_deterministic() {
    let root = temp_dir("cli-defaults");
    let hf = shared().join("fixtures/quantize/hf");
    let with_gen = root.join("with-gen");
    let plain = root.join("plain");
    for dir in [&with_gen, &plain] {
        std::fs::create_dir_all(dir).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            std::os::unix::fs::symlink(hf.join(f), dir.join(f)).unwrap();
        }
    }
    std::fs::write(
        with_gen.join("generation_config.json"),
        r#"{"do_sample": true, "temperature": 0.7, "top_k": 20, "top_p": 0.8}"#,
    )
    .unwrap();
    let verbose = |dir: &Path, extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--verbose",
            "-n",
            "2",
            "--model",
            dir.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        a.push("hello");
        let o = gemma3(&a, &[]);
        ok(&o);
        stderr(&o)
    };
    let e = verbose(&with_gen, &[]);
    assert!(
        e.contains("sampling: temperature 0.7, top-k 20, top-p 0.8"),
        "{e}"
    );
    assert!(e.contains("with-gen/generation_config.json"), "{e}");
    let e = verbose(&plain, &[]);
    assert!(
        e.contains("sampling: temperature 1, top-k 64, top-p 0.95")
            && e.contains("Gemma 3's published settings"),
        "{e}"
    );
    // A flag replaces only its own setting.
    let e = verbose(&with_gen, &["--temperature", "0.5"]);
    assert!(
        e.contains("sampling: temperature 0.5, top-k 20, top-p 0.8"),
        "{e}"
    );
    assert!(verbose(&with_gen, &["--greedy"]).contains("sampling: greedy"));

    // On the real model: the default is Gemma's sampling (the same tokens as asking for it),
    // and --greedy does not depend on the seed.
    let real = real_model();
    let gen = |extra: &[&str]| {
        let mut a = vec!["generate", "-n", "12", "--model", real.to_str().unwrap()];
        a.extend_from_slice(extra);
        a.push("Once upon a time");
        ok(&gemma3(&a, &[]))
    };
    assert_eq!(
        gen(&[]),
        gen(&[
            "--temperature",
            "1",
            "--top-k",
            "64",
            "--top-p",
            "0.95",
            "--seed",
            "42"
        ])
    );
    let greedy = gen(&["--greedy", "--seed", "1"]);
    assert_eq!(greedy, gen(&["--greedy", "--seed", "2"]));
    assert_eq!(greedy, gen(&["--temperature", "0"]));
    let o = gemma3(&["generate", "--greedy", "--temperature", "1", "hi"], &[]);
    assert!(
        !o.status.success() && stderr(&o).contains("--greedy"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&root);
}
