//! Shared by the engine's and the CLI's tests of model names: fake Hugging Face caches and
//! Ollama stores built from the fixtures (files linked, not copied), an mmproj GGUF made
//! from the tiny VLM's vision tower, and a mock Hugging Face hub on 127.0.0.1 that serves
//! the hub's file routes as huggingface.co does (HEAD metadata, LFS redirects, Range
//! requests, gated repos).

#![allow(dead_code)]

use gemma3_formats::gguf::GgufWriter;
use gemma3_formats::{DType, HfDirectory, MetaValue};
use sha2::{Digest, Sha256};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

pub fn quantize_fixture(file: &str) -> PathBuf {
    shared().join("fixtures/quantize").join(file)
}

/// The real Gemma 3 270M Q4_K_M (fetched by scripts/fetch-model.sh).
pub fn real_model() -> PathBuf {
    gemma3_hub::cached_default_model()
        .filter(|p| p.exists())
        .expect("the real model is missing: run scripts/fetch-model.sh")
}

/// A fresh, empty temporary folder for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gemma3-models-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A made-up hex id of `len` digits, different for each input.
pub fn fake_hex(seed: &str, len: usize) -> String {
    let mut s = String::new();
    let mut i = 0u64;
    while s.len() < len {
        let mut h = DefaultHasher::new();
        (seed, i).hash(&mut h);
        s.push_str(&format!("{:016x}", h.finish()));
        i += 1;
    }
    s.truncate(len);
    s
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) {
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, link).unwrap();
}

/// Adds a snapshot of `repo` at `commit` to a hub cache, as huggingface_hub lays it out:
/// each file a relative link into `blobs/`, whose blob links to the fixture file; `refs`
/// name the commit.
pub fn add_to_cache(
    cache: &Path,
    repo: &str,
    commit: &str,
    refs: &[&str],
    files: &[(&str, &Path)],
) {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    for (name, source) in files {
        let blob = fake_hex(&format!("{}", source.display()), 64);
        let blob_path = dir.join("blobs").join(&blob);
        if !blob_path.exists() {
            symlink(&std::fs::canonicalize(source).unwrap(), &blob_path);
        }
        let depth = name.split('/').count() + 1;
        let target: PathBuf = std::iter::repeat_n("..", depth)
            .chain(["blobs", blob.as_str()])
            .collect();
        symlink(&target, &dir.join("snapshots").join(commit).join(name));
    }
    for r in refs {
        let p = dir.join("refs").join(r);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, commit).unwrap();
    }
}

/// A layer of a fake Ollama model.
pub enum Layer<'a> {
    /// A blob linking to a file.
    File(&'a str, &'a Path),
    /// A blob with this text.
    Text(&'a str, &'a str),
}

pub const OLLAMA_MODEL: &str = "application/vnd.ollama.image.model";
pub const OLLAMA_PROJECTOR: &str = "application/vnd.ollama.image.projector";
pub const OLLAMA_TEMPLATE: &str = "application/vnd.ollama.image.template";
pub const OLLAMA_PARAMS: &str = "application/vnd.ollama.image.params";
pub const OLLAMA_SYSTEM: &str = "application/vnd.ollama.image.system";
pub const OLLAMA_LICENSE: &str = "application/vnd.ollama.image.license";

/// Adds a model to a fake Ollama store: `manifests/<host>/<namespace>/<model>/<tag>` (given
/// as that path) listing the layers, and each layer as `blobs/sha256-<hex>`.
pub fn add_to_ollama(root: &Path, manifest_path: &str, layers: &[Layer]) {
    let mut entries = Vec::new();
    for l in layers {
        let (media, hex, size) = match l {
            Layer::File(media, source) => {
                let hex = fake_hex(&format!("{}", source.display()), 64);
                let blob = root.join("blobs").join(format!("sha256-{hex}"));
                if !blob.exists() {
                    symlink(&std::fs::canonicalize(source).unwrap(), &blob);
                }
                (*media, hex, std::fs::metadata(source).unwrap().len())
            }
            Layer::Text(media, text) => {
                let hex = sha256_hex(text.as_bytes());
                let blob = root.join("blobs").join(format!("sha256-{hex}"));
                std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
                std::fs::write(&blob, text).unwrap();
                (*media, hex, text.len() as u64)
            }
        };
        entries.push(serde_json::json!({
            "mediaType": media, "digest": format!("sha256:{hex}"), "size": size
        }));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": format!("sha256:{}", fake_hex("config", 64)),
            "size": 0
        },
        "layers": entries,
    });
    let p = root.join("manifests").join(manifest_path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, manifest.to_string()).unwrap();
}

/// llama.cpp's mmproj GGUF with the tiny VLM's SigLIP tower (56x56 images, 4 tokens per
/// image) and a made-up projection to `text_hidden` (the model it is attached to).
pub fn write_mmproj(out: &Path, text_hidden: usize) {
    let src = HfDirectory::open(shared().join("fixtures/tiny-vlm")).unwrap();
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("clip".into()))
        .meta("clip.projector_type", MetaValue::String("gemma3".into()))
        .meta("clip.has_vision_encoder", MetaValue::Bool(true));
    for (k, v) in [
        ("image_size", 56),
        ("patch_size", 14),
        ("embedding_length", 32),
        ("feed_forward_length", 64),
        ("block_count", 2),
        ("attention.head_count", 2),
        ("projection_dim", text_hidden as u32),
        ("projector.scale_factor", 2),
    ] {
        w.meta(&format!("clip.vision.{k}"), MetaValue::U32(v));
    }
    let mut names: Vec<(String, String)> = [
        ("embeddings.patch_embedding.weight", "v.patch_embd.weight"),
        ("embeddings.patch_embedding.bias", "v.patch_embd.bias"),
        (
            "embeddings.position_embedding.weight",
            "v.position_embd.weight",
        ),
        ("post_layernorm.weight", "v.post_ln.weight"),
        ("post_layernorm.bias", "v.post_ln.bias"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
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
    let proj: Vec<u8> = (0..32 * text_hidden)
        .flat_map(|i| (((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.2).to_le_bytes())
        .collect();
    w.tensor(
        "mm.input_projection.weight",
        &[32, text_hidden],
        DType::F32,
        proj,
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

/// A copy of a text GGUF with a vision tensor added under Ollama's own names
/// (`v.patch_embedding.weight`), as Ollama's newer Gemma 3 files carry their tower.
pub fn write_gguf_with_embedded_vision(src: &Path, out: &Path) {
    let g = gemma3_formats::GgufFile::open(src).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &g.metadata {
        w.meta(k, v.clone());
    }
    for t in &g.tensors {
        let data = g.tensor(&t.name).unwrap();
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        w.tensor(&t.name, &shape, t.dtype, data.bytes().to_vec());
    }
    w.tensor("v.patch_embedding.weight", &[2, 2], DType::F32, vec![0; 16]);
    std::fs::write(out, w.to_bytes()).unwrap();
}

/// A repo the mock hub serves.
#[derive(Clone)]
pub struct MockRepo {
    pub repo: String,
    pub commit: String,
    pub files: Vec<(String, Vec<u8>)>,
    /// A gated repo: only requests with `Authorization: Bearer <token>` get through.
    pub token: Option<String>,
}

impl MockRepo {
    pub fn new(repo: &str, files: &[(&str, &Path)]) -> MockRepo {
        MockRepo {
            repo: repo.into(),
            commit: fake_hex(repo, 40),
            files: files
                .iter()
                .map(|(n, p)| (n.to_string(), std::fs::read(p).unwrap()))
                .collect(),
            token: None,
        }
    }
}

/// A request the mock hub saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub url: String,
    pub range: Option<String>,
    pub auth: Option<String>,
}

/// The mock hub: a thread answering on 127.0.0.1 until dropped.
pub struct MockHub {
    pub url: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Files the hub stores in LFS (served by redirect, named by sha256).
fn is_lfs(name: &str) -> bool {
    name.ends_with(".gguf") || name.ends_with(".safetensors")
}

impl MockHub {
    pub fn start(repos: Vec<MockRepo>) -> MockHub {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let url = format!("http://127.0.0.1:{port}");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, u, log) = (server.clone(), url.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            for req in s.incoming_requests() {
                let header = |name: &'static str| {
                    req.headers()
                        .iter()
                        .find(|h| h.field.equiv(name))
                        .map(|h| h.value.as_str().to_string())
                };
                log.lock().unwrap().push(Seen {
                    method: req.method().as_str().to_string(),
                    url: req.url().to_string(),
                    range: header("Range"),
                    auth: header("Authorization"),
                });
                let resp = answer(
                    &repos,
                    &u,
                    req.url(),
                    header("Range"),
                    header("Authorization"),
                );
                let _ = req.respond(resp);
            }
        });
        MockHub {
            url,
            seen,
            server,
            thread: Some(thread),
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Resp = tiny_http::Response<std::io::Cursor<Vec<u8>>>;

fn with(mut r: Resp, headers: &[(&str, &str)]) -> Resp {
    for (k, v) in headers {
        r = r.with_header(tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap());
    }
    r
}

fn error(status: u16, code: &str) -> Resp {
    with(
        tiny_http::Response::from_data(format!("{{\"error\": \"{code}\"}}").into_bytes())
            .with_status_code(status),
        &[("X-Error-Code", code), ("X-Error-Message", code)],
    )
}

fn answer(
    repos: &[MockRepo],
    base: &str,
    url: &str,
    range: Option<String>,
    auth: Option<String>,
) -> Resp {
    let url = url.split('?').next().unwrap_or("");
    if let Some(sha) = url.strip_prefix("/cdn/") {
        let Some((_, data)) = repos
            .iter()
            .flat_map(|r| r.files.iter())
            .find(|(_, d)| sha256_hex(d) == sha)
        else {
            return error(404, "EntryNotFound");
        };
        return serve_range(data, range);
    }
    let (api, path) = match url.strip_prefix("/api/models/") {
        Some(p) => (true, p),
        None => (false, url.trim_start_matches('/')),
    };
    let Some(repo) = repos.iter().find(|r| {
        path.strip_prefix(r.repo.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
    }) else {
        return error(401, "RepoNotFound");
    };
    if let Some(t) = &repo.token {
        if auth.as_deref() != Some(format!("Bearer {t}").as_str()) {
            return error(401, "GatedRepo");
        }
    }
    let rest = &path[repo.repo.len() + 1..];
    if api {
        let Some(rev) = rest.strip_prefix("revision/") else {
            return error(404, "EntryNotFound");
        };
        if rev != "main" && rev != repo.commit {
            return error(404, "RevisionNotFound");
        }
        let siblings: Vec<_> = repo
            .files
            .iter()
            .map(|(n, _)| serde_json::json!({ "rfilename": n }))
            .collect();
        let body = serde_json::json!({ "id": repo.repo, "sha": repo.commit, "siblings": siblings });
        return tiny_http::Response::from_data(body.to_string().into_bytes());
    }
    let Some(rest) = rest.strip_prefix("resolve/") else {
        return error(404, "EntryNotFound");
    };
    let Some((rev, file)) = rest.split_once('/') else {
        return error(404, "EntryNotFound");
    };
    if rev != "main" && rev != repo.commit {
        return error(404, "RevisionNotFound");
    }
    let Some((name, data)) = repo.files.iter().find(|(n, _)| n == file) else {
        return error(404, "EntryNotFound");
    };
    let commit = repo.commit.as_str();
    if is_lfs(name) {
        let sha = sha256_hex(data);
        let len = data.len().to_string();
        let pointer = format!("\"{}\"", fake_hex(&sha, 40));
        with(
            tiny_http::Response::from_data(Vec::new()).with_status_code(302),
            &[
                ("Location", &format!("{base}/cdn/{sha}")),
                ("X-Linked-Etag", &format!("\"{sha}\"")),
                ("X-Linked-Size", &len),
                ("X-Repo-Commit", commit),
                ("ETag", &pointer),
            ],
        )
    } else {
        let etag = format!("\"{}\"", fake_hex(&sha256_hex(data), 40));
        with(
            tiny_http::Response::from_data(data.clone()),
            &[("ETag", &etag), ("X-Repo-Commit", commit)],
        )
    }
}

/// The bytes, or the part a `Range: bytes=N-` asks for (206).
fn serve_range(data: &[u8], range: Option<String>) -> Resp {
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    match start {
        Some(s) if s < data.len() => with(
            tiny_http::Response::from_data(data[s..].to_vec()).with_status_code(206),
            &[(
                "Content-Range",
                &format!("bytes {s}-{}/{}", data.len() - 1, data.len()),
            )],
        ),
        Some(_) => tiny_http::Response::from_data(Vec::new()).with_status_code(416),
        None => tiny_http::Response::from_data(data.to_vec()),
    }
}

/// Reads a whole file.
pub fn read(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v
}
