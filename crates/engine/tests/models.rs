//! Model names: a fake Hugging Face cache (snapshots, blobs, refs) and a fake Ollama store
//! built from the fixtures resolve to the right files, with the mmproj / projector beside
//! them and the sampling defaults users expect; the mock hub on 127.0.0.1 downloads into the
//! cache layout, resumes a partial file, rejects a corrupt one, and gives clear errors for a
//! gated repo and offline mode. (The logits these give are compared with the direct path in
//! the CLI's tests.)

mod model_stores;
use gemma3_engine::{Model, OpenOptions, SamplingParams, SamplingSource};
use gemma3_hub::download::DownloadEvent;
use gemma3_hub::hub::HubConfig;
use gemma3_hub::resolve::{list_models, pull, resolve, ResolveOptions, Vision};
use gemma3_hub::{HubError, Locations, SourceKind};
use model_stores::*;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn locations(root: &Path, endpoint: &str) -> Locations {
    Locations {
        hub: HubConfig {
            cache: root.join("hub"),
            endpoint: endpoint.to_string(),
            token: None,
            offline: false,
        },
        ollama: root.join("ollama"),
    }
}

fn resolve_in(loc: &Locations, name: &str) -> Result<gemma3_hub::Resolved, HubError> {
    resolve(
        Some(name),
        &ResolveOptions {
            locations: loc,
            download: true,
            progress: None,
        },
    )
}

fn open_in(loc: &Locations, name: &str) -> Model {
    Model::open_with(
        Some(name),
        &OpenOptions {
            locations: Some(loc.clone()),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";

/// A GGUF repo with two quants and an mmproj at `main`, and only Q8_0 at the `v1` tag; a
/// safetensors repo with a generation_config.json and one without.
fn fake_cache(root: &Path) -> PathBuf {
    let cache = root.join("hub");
    let mmproj = root.join("mmproj-model-f16.gguf");
    write_mmproj(&mmproj, 256);
    let (q4, q8) = (
        quantize_fixture("model-Q4_K_M.gguf"),
        quantize_fixture("model-Q8_0.gguf"),
    );
    add_to_cache(
        &cache,
        "org/tiny-GGUF",
        C1,
        &["main"],
        &[
            ("tiny-Q4_K_M.gguf", &q4),
            ("tiny-Q8_0.gguf", &q8),
            ("mmproj-model-f16.gguf", &mmproj),
        ],
    );
    add_to_cache(
        &cache,
        "org/tiny-GGUF",
        C2,
        &["v1"],
        &[("tiny-Q8_0.gguf", &q8)],
    );
    let hf = shared().join("fixtures/quantize/hf");
    let gen = root.join("generation_config.json");
    std::fs::write(
        &gen,
        r#"{"do_sample": true, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "bos_token_id": 2}"#,
    )
    .unwrap();
    let files = |with_gen: bool| {
        let mut v: Vec<(String, PathBuf)> = [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        .iter()
        .map(|f| (f.to_string(), hf.join(f)))
        .collect();
        if with_gen {
            v.push(("generation_config.json".into(), gen.clone()));
        }
        v
    };
    for (repo, with_gen) in [("org/tiny-hf", true), ("org/tiny-hf-plain", false)] {
        let f = files(with_gen);
        let refs: Vec<(&str, &Path)> = f.iter().map(|(n, p)| (n.as_str(), p.as_path())).collect();
        add_to_cache(&cache, repo, C1, &["main"], &refs);
    }
    cache
}

#[test]
fn hf_cache_resolves_repo_ids_revisions_and_quants() {
    let root = temp_dir("hf-cache");
    let cache = fake_cache(&root);
    // Nothing may be downloaded: the endpoint does not exist.
    let loc = locations(&root, "http://127.0.0.1:9");
    let snap = |c: &str| cache.join("models--org--tiny-GGUF/snapshots").join(c);
    let r = resolve_in(&loc, "org/tiny-GGUF").unwrap();
    assert_eq!(r.kind, SourceKind::HfCache);
    assert_eq!(r.path, snap(C1).join("tiny-Q4_K_M.gguf"));
    assert_eq!(r.mmproj, Some(snap(C1).join("mmproj-model-f16.gguf")));
    assert_eq!(r.snapshot.as_ref().unwrap().commit, C1);
    assert!(
        r.describe().contains("Hugging Face cache"),
        "{}",
        r.describe()
    );
    let r = resolve_in(&loc, "org/tiny-GGUF:q8_0").unwrap();
    assert_eq!(r.path, snap(C1).join("tiny-Q8_0.gguf"));
    let r = resolve_in(&loc, "hf.co/org/tiny-GGUF:tiny-Q8_0.gguf").unwrap();
    assert_eq!(r.path, snap(C1).join("tiny-Q8_0.gguf"));
    // A tag ref and a commit hash name the other snapshot, which has only Q8_0 and no
    // mmproj. Untagged, the hub would be asked whether the repo has a Q4_K_M (it cannot be
    // reached); offline, the cache's Q8_0 is the answer.
    let mut offline = loc.clone();
    offline.hub.offline = true;
    let e = resolve_in(&loc, "org/tiny-GGUF@v1").unwrap_err();
    assert!(e.to_string().contains("127.0.0.1:9"), "{e}");
    for (l, name) in [
        (&loc, "org/tiny-GGUF@v1:Q8_0"),
        (&offline, "org/tiny-GGUF@v1"),
        (&offline, &format!("org/tiny-GGUF@{C2}")),
    ] {
        let r = resolve_in(l, name).unwrap();
        assert_eq!(r.path, snap(C2).join("tiny-Q8_0.gguf"), "{name}");
        assert_eq!(r.mmproj, None);
    }
    // The files are the fixture's: the model loads with the mmproj attached.
    let m = open_in(&loc, "org/tiny-GGUF");
    assert_eq!(m.text.cfg.hidden_size, 256);
    assert_eq!(
        m.mmproj.as_deref(),
        Some(snap(C1).join("mmproj-model-f16.gguf").as_path())
    );
    assert!(m.vision.is_some());
    // A GGUF repo without generation_config.json: Gemma's published settings.
    let d = m.default_sampling(5).unwrap();
    assert_eq!(
        (d.params, d.source),
        (SamplingParams::gemma_default(5), SamplingSource::Gemma)
    );

    // A safetensors checkpoint: the snapshot folder, with its generation_config.json.
    let r = resolve_in(&loc, "org/tiny-hf").unwrap();
    assert_eq!(
        r.path,
        cache.join("models--org--tiny-hf/snapshots").join(C1)
    );
    let m = open_in(&loc, "org/tiny-hf");
    let d = m.default_sampling(5).unwrap();
    assert_eq!(
        (
            d.params.temperature,
            d.params.top_k,
            d.params.top_p,
            d.params.seed
        ),
        (0.7, 20, 0.8, 5)
    );
    assert!(
        matches!(d.source, SamplingSource::GenerationConfig(p) if p.ends_with("generation_config.json"))
    );
    let m = open_in(&loc, "org/tiny-hf-plain");
    assert_eq!(
        m.default_sampling(9).unwrap().params,
        SamplingParams::gemma_default(9)
    );

    // What is not there: a tag no file has (the cache is incomplete, so the hub would be
    // asked, and it cannot be reached), an unknown revision, offline mode.
    let e = resolve_in(&loc, "org/tiny-GGUF:Q2_K").unwrap_err();
    assert!(e.to_string().contains("127.0.0.1:9"), "{e}");
    let e = resolve_in(&offline, "org/tiny-GGUF:Q2_K").unwrap_err();
    assert!(matches!(e, HubError::Offline { .. }), "{e}");
    assert!(e.to_string().contains("tiny-Q8_0.gguf"), "{e}");
    let e = resolve_in(&offline, "org/tiny-GGUF@v2").unwrap_err();
    assert!(matches!(e, HubError::Offline { .. }), "{e}");
    assert!(e.to_string().contains("org/tiny-GGUF@v2"), "{e}");

    // `list` shows each quant by name, with the mmproj and the checkpoints.
    let listed = list_models(&loc);
    let names: Vec<&str> = listed.iter().map(|m| m.name.as_str()).collect();
    for want in [
        "org/tiny-GGUF:Q4_K_M",
        "org/tiny-GGUF:Q8_0",
        "org/tiny-GGUF@v1:Q8_0",
        "org/tiny-hf",
        "org/tiny-hf-plain",
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    let q4 = listed
        .iter()
        .find(|m| m.name == "org/tiny-GGUF:Q4_K_M")
        .unwrap();
    assert!(matches!(&q4.vision, Vision::Mmproj(_)));
    assert_eq!(
        q4.size,
        std::fs::metadata(quantize_fixture("model-Q4_K_M.gguf"))
            .unwrap()
            .len()
    );
    let hf = listed.iter().find(|m| m.name == "org/tiny-hf").unwrap();
    assert_eq!((hf.format, &hf.vision), ("safetensors", &Vision::None));
    let _ = std::fs::remove_dir_all(&root);
}

fn fake_ollama(root: &Path) -> PathBuf {
    let store = root.join("ollama");
    let mmproj = root.join("projector.gguf");
    write_mmproj(&mmproj, 256);
    let q4 = quantize_fixture("model-Q4_K_M.gguf");
    let template = "{{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}";
    let params = r#"{"stop": ["<end_of_turn>"], "temperature": 1, "top_k": 64, "top_p": 0.95, "num_ctx": 300, "num_predict": 7}"#;
    add_to_ollama(
        &store,
        "registry.ollama.ai/library/tiny/latest",
        &[
            Layer::File(OLLAMA_MODEL, &q4),
            Layer::File(OLLAMA_PROJECTOR, &mmproj),
            Layer::Text(OLLAMA_TEMPLATE, template),
            Layer::Text(OLLAMA_PARAMS, params),
            Layer::Text(OLLAMA_SYSTEM, "Be brief."),
            Layer::Text(OLLAMA_LICENSE, "Gemma Terms of Use"),
        ],
    );
    let q8 = quantize_fixture("model-Q8_0.gguf");
    add_to_ollama(
        &store,
        "registry.ollama.ai/someone/tiny/v2",
        &[Layer::File(OLLAMA_MODEL, &q8)],
    );
    store
}

#[test]
fn ollama_store_resolves_names_with_projector_template_and_params() {
    let root = temp_dir("ollama");
    let store = fake_ollama(&root);
    let loc = locations(&root, "http://127.0.0.1:9");
    let manifest = store.join("manifests/registry.ollama.ai/library/tiny/latest");
    for name in [
        "tiny",
        "tiny:latest",
        "library/tiny",
        "library/tiny:latest",
        "registry.ollama.ai/library/tiny:latest",
    ] {
        let r = resolve_in(&loc, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.kind, SourceKind::Ollama, "{name}");
        let o = r.ollama.as_ref().unwrap();
        assert_eq!(o.manifest, manifest, "{name}");
        assert_eq!(o.name, "tiny:latest");
        assert_eq!(r.mmproj.as_ref(), o.projector.as_ref());
        assert!(r.path.starts_with(store.join("blobs")));
    }
    let r = resolve_in(&loc, "someone/tiny:v2").unwrap();
    let o = r.ollama.unwrap();
    assert_eq!(
        (o.name.as_str(), o.projector.is_none()),
        ("someone/tiny:v2", true)
    );

    // The template stays Go template text; the parameters are parsed.
    let m = open_in(&loc, "tiny");
    let o = m.origin.as_ref().unwrap().ollama.as_ref().unwrap();
    assert_eq!(
        o.template.as_deref(),
        Some("{{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}")
    );
    assert_eq!(o.system.as_deref(), Some("Be brief."));
    assert_eq!(o.license.as_deref(), Some("Gemma Terms of Use"));
    let p = o.params.as_ref().unwrap();
    assert_eq!(
        (p.stop.clone(), p.num_ctx),
        (vec!["<end_of_turn>".to_string()], Some(300))
    );
    // num_ctx and num_predict are the model's defaults (the file says 2048).
    assert_eq!(m.context(None).unwrap(), 300);
    assert_eq!(m.context(Some(1000)).unwrap(), 1000);
    assert_eq!(m.default_max_tokens(), Some(7));
    // The projector layer is the vision tower.
    assert!(m.vision.is_some());
    assert_eq!(m.mmproj.as_ref(), o.projector.as_ref());
    let d = m.default_sampling(1).unwrap();
    assert_eq!(
        (d.params.temperature, d.params.top_k, d.params.top_p),
        (1.0, 64, 0.95)
    );
    assert_eq!(d.source, SamplingSource::OllamaParams(manifest.clone()));

    // Unknown names say where they were looked for.
    let e = resolve_in(&loc, "gemma3:4b").unwrap_err();
    assert!(matches!(e, HubError::NotFound(_)), "{e}");
    assert!(
        e.to_string()
            .contains("manifests/registry.ollama.ai/library/gemma3/4b"),
        "{e}"
    );

    // A damaged store: a missing blob, a truncated blob, a manifest that is not JSON.
    let broken = |path: &str, layers: &[Layer]| add_to_ollama(&store, path, layers);
    let short = root.join("short.gguf");
    std::fs::write(&short, b"GGUF").unwrap();
    broken(
        "registry.ollama.ai/library/short/latest",
        &[Layer::File(OLLAMA_MODEL, &short)],
    );
    let blob = std::fs::read_dir(store.join("blobs"))
        .unwrap()
        .flatten()
        .find(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t == std::fs::canonicalize(&short).unwrap())
        })
        .unwrap()
        .path();
    std::fs::remove_file(&blob).unwrap();
    let e = resolve_in(&loc, "short").unwrap_err();
    assert!(
        e.to_string().contains("missing") && e.to_string().contains("ollama pull"),
        "{e}"
    );
    std::fs::write(&blob, b"GG").unwrap();
    let e = resolve_in(&loc, "short").unwrap_err();
    assert!(
        e.to_string().contains("has 2 bytes, the manifest says 4"),
        "{e}"
    );
    let bad = store.join("manifests/registry.ollama.ai/library/junk/latest");
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    std::fs::write(&bad, "not json").unwrap();
    let e = resolve_in(&loc, "junk").unwrap_err();
    assert!(e.to_string().contains("not an Ollama manifest"), "{e}");

    // Ollama's own layout with the tower inside the model file: listed as such, and
    // opened as a text model.
    let embedded = root.join("embedded.gguf");
    write_gguf_with_embedded_vision(&quantize_fixture("model-Q8_0.gguf"), &embedded);
    add_to_ollama(
        &store,
        "registry.ollama.ai/library/embedded/latest",
        &[Layer::File(OLLAMA_MODEL, &embedded)],
    );
    let m = open_in(&loc, "embedded");
    assert!(m.vision.is_none());
    assert_eq!(m.text.cfg.hidden_size, 256);

    // `list` shows them, the broken ones with their problem.
    let listed = list_models(&loc);
    let tiny = listed.iter().find(|m| m.name == "tiny:latest").unwrap();
    assert!(matches!(tiny.vision, Vision::Mmproj(_)));
    assert!(listed
        .iter()
        .any(|m| m.name == "someone/tiny:v2" && m.vision == Vision::None));
    assert!(listed
        .iter()
        .any(|m| m.name == "junk:latest" && m.problem.is_some()));
    assert!(listed
        .iter()
        .any(|m| m.name == "embedded:latest" && m.vision == Vision::EmbeddedUnsupported));
    let _ = std::fs::remove_dir_all(&root);
}

fn tiny_repo() -> MockRepo {
    MockRepo::new(
        "org/tiny-GGUF",
        &[
            ("README.md", &shared().join("fixtures/quantize/README.md")),
            ("tiny-Q4_K_M.gguf", &quantize_fixture("model-Q4_K_M.gguf")),
            ("tiny-Q8_0.gguf", &quantize_fixture("model-Q8_0.gguf")),
        ],
    )
}

#[test]
fn downloads_into_the_cache_layout_and_resumes() {
    let root = temp_dir("download");
    let hub = MockHub::start(vec![tiny_repo()]);
    let loc = locations(&root, &hub.url);
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let progress = move |e: DownloadEvent<'_>| {
        log.lock().unwrap().push(match e {
            DownloadEvent::Start { file, total, done } => format!("start {file} {total} {done}"),
            DownloadEvent::Progress { .. } => "progress".to_string(),
            DownloadEvent::Finish { file } => format!("finish {file}"),
        })
    };
    let opts = ResolveOptions {
        locations: &loc,
        download: true,
        progress: Some(&progress),
    };
    let r = resolve(Some("org/tiny-GGUF:Q8_0"), &opts).unwrap();
    assert_eq!(r.kind, SourceKind::HfDownload);
    let want = read(&quantize_fixture("model-Q8_0.gguf"));
    let sha = sha256_hex(&want);
    let repo_dir = loc.hub.cache.join("models--org--tiny-GGUF");
    let commit = fake_hex("org/tiny-GGUF", 40);
    // huggingface_hub's layout: the blob named by its sha256, a relative link in the
    // snapshot, refs/main naming the commit.
    assert_eq!(read(&repo_dir.join("blobs").join(&sha)), want);
    let link = repo_dir
        .join("snapshots")
        .join(&commit)
        .join("tiny-Q8_0.gguf");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("../../blobs").join(&sha)
    );
    assert_eq!(r.path, link);
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        commit
    );
    // Only the chosen quant was fetched.
    assert!(!repo_dir
        .join("snapshots")
        .join(&commit)
        .join("tiny-Q4_K_M.gguf")
        .exists());
    let ev = events.lock().unwrap().clone();
    assert_eq!(
        ev.first().unwrap(),
        &format!("start tiny-Q8_0.gguf {} 0", want.len())
    );
    assert_eq!(ev.last().unwrap(), "finish tiny-Q8_0.gguf");
    // Found in the cache now, without asking the hub.
    let before = hub.seen().len();
    let again = resolve(Some("org/tiny-GGUF:Q8_0"), &opts).unwrap();
    assert_eq!(
        (again.kind, hub.seen().len()),
        (SourceKind::HfCache, before)
    );

    // An interrupted download of the other quant: its first 1,000,000 bytes are there.
    let q4 = read(&quantize_fixture("model-Q4_K_M.gguf"));
    let q4_sha = sha256_hex(&q4);
    let part = repo_dir.join("blobs").join(format!("{q4_sha}.incomplete"));
    std::fs::write(&part, &q4[..1_000_000]).unwrap();
    events.lock().unwrap().clear();
    let r = resolve(Some("org/tiny-GGUF"), &opts).unwrap();
    assert_eq!(read(&r.path), q4);
    assert!(!part.exists());
    // The range asked of the file store, after the hub's redirect.
    let ranges: Vec<(String, String)> = hub
        .seen()
        .iter()
        .filter(|s| s.url.starts_with("/cdn/"))
        .map(|s| (s.method.clone(), s.range.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        ranges.last().unwrap(),
        &("GET".to_string(), "bytes=1000000-".to_string())
    );
    assert_eq!(
        events.lock().unwrap().first().unwrap(),
        &format!("start tiny-Q4_K_M.gguf {} 1000000", q4.len())
    );

    // A corrupt partial file fails the sha256 check and is deleted; the next try works.
    std::fs::remove_file(repo_dir.join("blobs").join(&q4_sha)).unwrap();
    let mut bad = q4[..1_000_000].to_vec();
    bad[100] ^= 1;
    std::fs::write(&part, &bad).unwrap();
    let e = pull("org/tiny-GGUF", &opts).unwrap_err();
    assert!(matches!(e, HubError::Download(_)), "{e}");
    assert!(
        e.to_string().contains("sha256") && e.to_string().contains(&q4_sha),
        "{e}"
    );
    assert!(!part.exists());
    assert_eq!(read(&pull("org/tiny-GGUF", &opts).unwrap().path), q4);
    drop(hub);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn gated_missing_and_offline_are_clear_errors() {
    let root = temp_dir("gated");
    let mut gated = tiny_repo();
    gated.repo = "google/gated-GGUF".into();
    gated.token = Some("hf_secret".into());
    let hub = MockHub::start(vec![gated]);
    let mut loc = locations(&root, &hub.url);
    let e = resolve_in(&loc, "google/gated-GGUF").unwrap_err();
    assert!(matches!(e, HubError::Gated { status: 401, .. }), "{e}");
    let msg = e.to_string();
    for want in [
        "google/gated-GGUF",
        "accept its license",
        &format!("{}/google/gated-GGUF", hub.url),
        "HF_TOKEN",
    ] {
        assert!(msg.contains(want), "{want:?} not in {msg}");
    }
    // With the token the same request goes through, and the token was sent.
    loc.hub.token = Some("hf_secret".into());
    let r = resolve_in(&loc, "google/gated-GGUF").unwrap();
    assert!(r.path.ends_with("tiny-Q4_K_M.gguf"));
    assert!(hub
        .seen()
        .iter()
        .any(|s| s.auth.as_deref() == Some("Bearer hf_secret")));
    // A repo the hub does not have, and one that also is no Ollama model.
    let e = resolve_in(&loc, "nobody/nothing").unwrap_err();
    assert!(matches!(e, HubError::NotFound(_)), "{e}");
    assert!(
        e.to_string().contains("nobody/nothing was not found"),
        "{e}"
    );
    assert!(e.to_string().contains("Ollama store"), "{e}");
    // Offline: never a request, and an error naming the repo.
    let before = hub.seen().len();
    loc.hub.offline = true;
    let e = resolve_in(&loc, "google/other-GGUF:Q8_0").unwrap_err();
    assert!(matches!(e, HubError::Offline { .. }), "{e}");
    assert!(e.to_string().contains("google/other-GGUF:Q8_0"), "{e}");
    assert!(e.to_string().contains("HF_HUB_OFFLINE"), "{e}");
    // ...while what was downloaded still resolves from the cache.
    assert_eq!(
        resolve_in(&loc, "google/gated-GGUF").unwrap().kind,
        SourceKind::HfCache
    );
    assert_eq!(hub.seen().len(), before);
    drop(hub);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn paths_and_bad_names() {
    let root = temp_dir("paths");
    let loc = locations(&root, "http://127.0.0.1:9");
    let q4 = quantize_fixture("model-Q4_K_M.gguf");
    let r = resolve_in(&loc, q4.to_str().unwrap()).unwrap();
    assert_eq!((r.kind, r.path), (SourceKind::Path, q4));
    for name in [
        "/nonexistent.gguf",
        "./x.gguf",
        "model.gguf",
        "a/b/c/d",
        "bad name",
    ] {
        let e = resolve_in(&loc, name).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{name}: {e}");
    }
    let _ = std::fs::remove_dir_all(&root);
}
