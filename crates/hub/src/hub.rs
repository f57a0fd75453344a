//! The Hugging Face hub's local cache, the one transformers, huggingface_hub and llama.cpp
//! share: where it is (`HF_HUB_CACHE`, `HF_HOME`, `~/.cache/huggingface/hub`), how a repo id
//! and revision map to a snapshot folder (`models--org--name/refs/<rev>` →
//! `snapshots/<commit>/`, whose files are symlinks into `blobs/`), and which files of a repo
//! make a model: a GGUF quant with the mmproj beside it, or a safetensors checkpoint.
//! Downloading into this layout is `download.rs`.

use crate::HubError;
use gemma3_formats::MAX_TEXT_BYTES;
use std::path::{Component, Path, PathBuf};

/// The public hub, unless `HF_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The branch a repo id without `@revision` means.
pub const DEFAULT_REVISION: &str = "main";
/// The quants a GGUF repo is opened at when the name gives none, in order of preference
/// (llama.cpp's `-hf` picks the same).
const DEFAULT_QUANTS: [&str; 2] = ["Q4_K_M", "Q8_0"];
/// GGUF files in a repo that are not a language model.
const NOT_A_MODEL: [&str; 2] = ["mmproj", "imatrix"];
/// The file name part that marks a vision projector GGUF.
const MMPROJ: &str = "mmproj";
const GGUF_EXT: &str = ".gguf";
/// Top-level files of a safetensors repo that a model needs or may use.
const CHECKPOINT_FILES: [&str; 10] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
];
pub const GENERATION_CONFIG: &str = "generation_config.json";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const SAFETENSORS_EXT: &str = ".safetensors";
/// Prefixes that name the hub explicitly (`hf.co/org/name`, as Ollama and others write it).
const HUB_PREFIXES: [&str; 4] = [
    "https://huggingface.co/",
    "huggingface.co/",
    "hf.co/",
    "hf://",
];

/// Where the cache is and how to reach the hub; read from the environment as
/// huggingface_hub reads it, or set by the caller (tests point it at a local server).
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// The hub cache (`.../huggingface/hub`), holding `models--org--name` folders.
    pub cache: PathBuf,
    /// `https://huggingface.co`, or `HF_ENDPOINT`.
    pub endpoint: String,
    /// An access token: `HF_TOKEN`, else the token file (`HF_TOKEN_PATH`, `$HF_HOME/token`).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE=1`: use the cache only.
    pub offline: bool,
}

impl HubConfig {
    pub fn from_env() -> HubConfig {
        let home = hf_home();
        let cache = env_path("HF_HUB_CACHE")
            .or_else(|| env_path("HUGGINGFACE_HUB_CACHE"))
            .unwrap_or_else(|| home.join("hub"));
        let endpoint = env_str("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token_file = env_path("HF_TOKEN_PATH").unwrap_or_else(|| home.join("token"));
        let token = env_str("HF_TOKEN")
            .or_else(|| env_str("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| std::fs::read_to_string(token_file).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let offline = env_str("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v));
        HubConfig {
            cache,
            endpoint,
            token,
            offline,
        }
    }

    /// `models--org--name` under the cache.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache.join(repo_folder(repo))
    }

    /// The model's page, where a gated model's license is accepted.
    pub fn repo_page(&self, repo: &str) -> String {
        format!("{}/{repo}", self.endpoint)
    }
}

fn env_str(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

fn env_path(key: &str) -> Option<PathBuf> {
    env_str(key).map(PathBuf::from)
}

/// huggingface_hub's reading of a boolean variable.
fn is_true(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(p) = env_path("HF_HOME") {
        return p;
    }
    if let Some(p) = env_path("XDG_CACHE_HOME") {
        return p.join("huggingface");
    }
    home_dir().join(".cache").join("huggingface")
}

/// The user's home directory (`.` when there is none, so paths stay relative rather than
/// pointing at `/`).
pub fn home_dir() -> PathBuf {
    std::env::home_dir().unwrap_or_else(|| PathBuf::from("."))
}

/// `org/name` → `models--org--name`.
pub fn repo_folder(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// `models--org--name` → `org/name`.
fn folder_repo(folder: &str) -> Option<String> {
    let rest = folder.strip_prefix("models--")?;
    let (org, name) = rest.split_once("--")?;
    let repo = format!("{org}/{name}");
    is_repo_id(&repo).then_some(repo)
}

/// A model on the hub as a user names it: `org/name[@revision][:tag]`, where the tag is a
/// quant (`Q4_K_M`) or a file name of a GGUF repo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoRef {
    pub repo: String,
    pub revision: String,
    pub tag: Option<String>,
}

impl RepoRef {
    /// Reads `org/name[@revision][:tag]` (optionally after `hf.co/`); `None` when the text
    /// is not shaped like a repo id.
    pub fn parse(s: &str) -> Option<RepoRef> {
        let s = HUB_PREFIXES
            .iter()
            .find_map(|p| s.strip_prefix(p))
            .unwrap_or(s);
        let (rest, tag) = match s.rsplit_once(':') {
            Some((r, t)) if !t.is_empty() && !t.contains('/') => (r, Some(t.to_string())),
            Some(_) => return None,
            None => (s, None),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, v)) if is_revision(v) => (r, v.to_string()),
            Some(_) => return None,
            None => (rest, DEFAULT_REVISION.to_string()),
        };
        if tag.as_deref().is_some_and(|t| !is_file_name(t)) {
            return None;
        }
        is_repo_id(repo).then(|| RepoRef {
            repo: repo.to_string(),
            revision,
            tag,
        })
    }

    /// Whether the name says the hub explicitly (`hf.co/...`).
    pub fn is_explicit(s: &str) -> bool {
        HUB_PREFIXES.iter().any(|p| s.starts_with(p))
    }

    /// `org/name[@rev][:tag]`, as the user would write it back.
    pub fn display(&self) -> String {
        let mut s = self.repo.clone();
        if self.revision != DEFAULT_REVISION {
            s.push('@');
            s.push_str(&self.revision);
        }
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        s
    }
}

/// The hub's rule for repo ids: `org/name`, each of letters, digits, `_`, `-`, `.`, not
/// starting or ending with `-`/`.`, without `--` or `..`.
pub fn is_repo_id(s: &str) -> bool {
    let Some((org, name)) = s.split_once('/') else {
        return false;
    };
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    part_ok(org) && part_ok(name)
}

/// A branch, tag or commit: no path tricks, nothing a URL or file name would misread.
fn is_revision(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.' | b'/'))
        && relative_path_is_safe(s)
}

fn is_file_name(s: &str) -> bool {
    !s.is_empty() && !s.contains(['\\', '\0']) && relative_path_is_safe(s)
}

/// A path from a repo listing or a ref name: relative, and only plain components, so it
/// stays inside the folder it is joined to.
pub fn relative_path_is_safe(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\\')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// A full commit hash (40 hex digits).
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|c| c.is_ascii_hexdigit())
}

/// A blob name: a git object id (40 hex) or an LFS sha256 (64 hex).
pub fn is_blob_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|c| c.is_ascii_hexdigit())
}

/// A revision of a repo present in the cache.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub repo: String,
    /// What was asked for (a branch, tag or commit).
    pub revision: String,
    pub commit: String,
    /// `models--org--name/snapshots/<commit>`.
    pub dir: PathBuf,
}

impl Snapshot {
    /// The snapshot's files (relative, `/`-separated, sorted), skipping links whose blob is
    /// gone.
    pub fn files(&self) -> Vec<String> {
        let mut out = Vec::new();
        list_files(&self.dir, "", &mut out);
        out.sort();
        out
    }
}

fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = format!("{prefix}{name}");
        let path = e.path();
        // `is_dir`/`is_file` follow symlinks: a broken link is neither.
        if path.is_dir() {
            list_files(&path, &format!("{rel}/"), out);
        } else if path.is_file() {
            out.push(rel);
        }
    }
}

/// The snapshot that `revision` of `repo` names in the cache: a commit's folder, or the
/// commit a ref file (`refs/main`) points at.
pub fn find_snapshot(cfg: &HubConfig, repo: &str, revision: &str) -> Option<Snapshot> {
    let repo_dir = cfg.repo_dir(repo);
    let snapshots = repo_dir.join("snapshots");
    let commit = if is_commit(revision) && snapshots.join(revision).is_dir() {
        revision.to_string()
    } else {
        let r = std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?;
        let r = r.trim().to_string();
        if !is_commit(&r) {
            return None;
        }
        r
    };
    let dir = snapshots.join(&commit);
    dir.is_dir().then(|| Snapshot {
        repo: repo.to_string(),
        revision: revision.to_string(),
        commit,
        dir,
    })
}

/// The files of a repo that make the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelFiles {
    /// A GGUF language model, the mmproj beside it (llama.cpp's vision tower file), and the
    /// repo's generation_config.json when it has one.
    Gguf {
        model: String,
        mmproj: Option<String>,
        extra: Vec<String>,
    },
    /// A transformers checkpoint: config, tokenizer and weights at the top of the repo. With
    /// a sharded index, the shards are added once the index is read.
    Safetensors { files: Vec<String> },
}

impl ModelFiles {
    /// Every file to have locally, the model file (or config) first.
    pub fn all(&self) -> Vec<String> {
        match self {
            ModelFiles::Gguf {
                model,
                mmproj,
                extra,
            } => std::iter::once(model.clone())
                .chain(mmproj.clone())
                .chain(extra.iter().cloned())
                .collect(),
            ModelFiles::Safetensors { files } => files.clone(),
        }
    }
}

/// Which files of a repo (its listing) are the model, as llama.cpp's `-hf` chooses for GGUF
/// repos: the tag as a file name, else the GGUF whose name has the tag (`…-Q4_K_M.gguf`),
/// else Q4_K_M, Q8_0 or the first GGUF; the mmproj in the same folder with the closest
/// precision. A repo without GGUF files is a safetensors checkpoint.
pub fn choose_files(
    repo: &str,
    files: &[String],
    tag: Option<&str>,
) -> Result<ModelFiles, HubError> {
    let ggufs: Vec<&String> = files.iter().filter(|f| is_gguf(f)).collect();
    if ggufs.is_empty() {
        if let Some(t) = tag {
            return Err(HubError::Load(format!(
                "{repo} has no GGUF files, so \":{t}\" names nothing in it (a safetensors repo takes no tag)"
            )));
        }
        return checkpoint_files(repo, files);
    }
    let model = pick_model(&ggufs, tag).ok_or_else(|| {
        let list: Vec<&str> = ggufs.iter().map(|s| s.as_str()).collect();
        HubError::Load(format!(
            "{repo} has no GGUF model file matching {:?}; its GGUF files: {}",
            tag.unwrap_or(""),
            list.join(", ")
        ))
    })?;
    if let Some((_, n)) = split_part(model) {
        return Err(HubError::Load(format!(
            "{repo}: {model} is part of a GGUF split into {n} files, which this engine cannot load yet (merge it with llama-gguf-split --merge)"
        )));
    }
    let mmproj = pick_mmproj(&ggufs, model);
    let extra = files
        .iter()
        .filter(|f| *f == GENERATION_CONFIG)
        .cloned()
        .collect();
    Ok(ModelFiles::Gguf {
        model: model.clone(),
        mmproj: mmproj.cloned(),
        extra,
    })
}

fn is_gguf(f: &str) -> bool {
    f.to_ascii_lowercase().ends_with(GGUF_EXT)
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn folder(path: &str) -> &str {
    path.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
}

fn is_model_gguf(path: &str) -> bool {
    let name = file_name(path).to_ascii_lowercase();
    is_gguf(&name) && !NOT_A_MODEL.iter().any(|w| name.contains(w))
}

fn pick_model<'a>(ggufs: &[&'a String], tag: Option<&str>) -> Option<&'a String> {
    let first_part = |f: &&&String| split_part(f).is_none_or(|(i, _)| i == 1);
    if let Some(t) = tag.filter(|t| is_gguf(t)) {
        return ggufs
            .iter()
            .find(|f| f.eq_ignore_ascii_case(t) || file_name(f).eq_ignore_ascii_case(t))
            .copied();
    }
    let tags: Vec<&str> = match tag {
        Some(t) => vec![t],
        None => DEFAULT_QUANTS.to_vec(),
    };
    for t in tags {
        if let Some(f) = ggufs
            .iter()
            .filter(|f| is_model_gguf(f))
            .filter(first_part)
            .find(|f| has_tag(f, t))
        {
            return Some(f);
        }
    }
    if tag.is_some() {
        return None;
    }
    ggufs
        .iter()
        .filter(|f| is_model_gguf(f))
        .find(first_part)
        .copied()
}

/// Whether a file name carries the quant tag, followed by `.` or `-`
/// (`gemma-3-4b-it-Q4_K_M.gguf`, `…-Q4_K_M-00001-of-00002.gguf`).
fn has_tag(path: &str, tag: &str) -> bool {
    let (p, t) = (path.to_ascii_lowercase(), tag.to_ascii_lowercase());
    p.match_indices(&t)
        .any(|(i, _)| matches!(p.as_bytes().get(i + t.len()), Some(b'.' | b'-')))
}

/// A GGUF file name without its extension (the name itself when it is not a GGUF).
fn gguf_stem(name: &str) -> &str {
    match is_gguf(name) {
        // The extension is ASCII, so this cuts at a character boundary.
        true => &name[..name.len() - GGUF_EXT.len()],
        false => name,
    }
}

/// `(index, count)` of a split GGUF (`name-00001-of-00003.gguf`).
fn split_part(path: &str) -> Option<(u32, u32)> {
    let (rest, count) = gguf_stem(path).rsplit_once("-of-")?;
    let (_, index) = rest.rsplit_once('-')?;
    let num = |s: &str| match s.len() == 5 && s.bytes().all(|c| c.is_ascii_digit()) {
        true => s.parse::<u32>().ok(),
        false => None,
    };
    let (i, n) = (num(index)?, num(count)?);
    (n > 1).then_some((i, n))
}

/// The bits of a file's quant tag (`Q4_K_M` → 4, `F16` → 16), 0 when it has none.
fn quant_bits(path: &str) -> u32 {
    let tag = gguf_stem(file_name(path))
        .rsplit(['-', '.'])
        .next()
        .unwrap_or("");
    let digits: String = tag
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().unwrap_or(0)
}

/// The mmproj GGUF in the model's folder whose precision is closest to the model's.
fn pick_mmproj<'a>(ggufs: &[&'a String], model: &str) -> Option<&'a String> {
    let bits = quant_bits(model) as i64;
    ggufs
        .iter()
        .filter(|f| file_name(f).to_ascii_lowercase().contains(MMPROJ))
        .filter(|f| folder(f) == folder(model))
        .min_by_key(|f| (quant_bits(f) as i64 - bits).abs())
        .copied()
}

fn checkpoint_files(repo: &str, files: &[String]) -> Result<ModelFiles, HubError> {
    let has = |name: &str| files.iter().any(|f| f == name);
    if !has("config.json") {
        return Err(HubError::Load(format!(
            "{repo} has neither GGUF files nor a config.json: it is not a model this engine can open"
        )));
    }
    let mut out: Vec<String> = CHECKPOINT_FILES
        .iter()
        .filter(|f| has(f))
        .map(|f| f.to_string())
        .collect();
    if has(SAFETENSORS_INDEX) {
        out.push(SAFETENSORS_INDEX.to_string());
    } else if has("model.safetensors") {
        out.push("model.safetensors".to_string());
    } else {
        return Err(HubError::Load(format!(
            "{repo} has no model.safetensors or {SAFETENSORS_INDEX} (other weight formats are not supported)"
        )));
    }
    Ok(ModelFiles::Safetensors { files: out })
}

/// The shards a safetensors index lists (checked to be plain file names).
pub fn index_shards(index: &Path) -> Result<Vec<String>, HubError> {
    let text = gemma3_formats::read_text(index, MAX_TEXT_BYTES)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| HubError::Load(format!("{}: invalid JSON: {e}", index.display())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| HubError::Load(format!("{}: no \"weight_map\"", index.display())))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str())
        .map(str::to_string)
        .collect();
    shards.sort();
    shards.dedup();
    if let Some(bad) = shards
        .iter()
        .find(|s| !relative_path_is_safe(s) || s.contains('/') || !s.ends_with(SAFETENSORS_EXT))
    {
        return Err(HubError::Load(format!(
            "{}: shard {bad:?} is not a safetensors file beside the index",
            index.display()
        )));
    }
    Ok(shards)
}

/// Whether every file the model needs is in the snapshot (with a sharded checkpoint, every
/// shard its index lists).
pub fn snapshot_has(snapshot: &Snapshot, files: &ModelFiles) -> bool {
    let all = files.all();
    if !all.iter().all(|f| snapshot.dir.join(f).is_file()) {
        return false;
    }
    if all.iter().any(|f| f == SAFETENSORS_INDEX) {
        return match index_shards(&snapshot.dir.join(SAFETENSORS_INDEX)) {
            Ok(shards) => shards.iter().all(|s| snapshot.dir.join(s).is_file()),
            Err(_) => false,
        };
    }
    true
}

/// Whether a choice made from a snapshot's files stands without asking the hub: a tag or a
/// checkpoint names its files, but an untagged GGUF repo means llama.cpp's first choice
/// (Q4_K_M), which a snapshot holding other quants only may lack.
pub fn cached_choice_is_final(tag: Option<&str>, files: &ModelFiles) -> bool {
    match files {
        ModelFiles::Gguf { model, .. } if tag.is_none() => has_tag(model, DEFAULT_QUANTS[0]),
        _ => true,
    }
}

/// Whether a file list is a sharded checkpoint's index.
pub fn is_index(file: &str) -> bool {
    file == SAFETENSORS_INDEX
}

/// A model in the cache, for `gemma3 list`.
#[derive(Clone, Debug)]
pub struct CachedModel {
    /// How `--model` names it (`org/name`, `org/name:Q4_K_M`, `org/name@v1`).
    pub name: String,
    pub path: PathBuf,
    pub gguf: bool,
    /// Bytes of the model's files (each blob counted once).
    pub size: u64,
    /// The mmproj found beside a GGUF model, or whether a checkpoint's config has a
    /// `vision_config`.
    pub mmproj: Option<PathBuf>,
    pub checkpoint_vision: bool,
}

/// Every model in the cache: for each repo and ref (`refs/main`, `refs/v1`, …), each GGUF
/// model file (named by its quant tag) or the checkpoint.
pub fn list_cached(cfg: &HubConfig) -> Vec<CachedModel> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&cfg.cache) else {
        return out;
    };
    let mut repos: Vec<String> = entries
        .flatten()
        .filter_map(|e| folder_repo(&e.file_name().to_string_lossy()))
        .collect();
    repos.sort();
    for repo in repos {
        let mut refs = Vec::new();
        list_files(&cfg.repo_dir(&repo).join("refs"), "", &mut refs);
        refs.sort_by_key(|r| (r != DEFAULT_REVISION, r.clone()));
        for rev in refs {
            if let Some(s) = find_snapshot(cfg, &repo, &rev) {
                list_snapshot(&s, &mut out);
            }
        }
    }
    out
}

fn list_snapshot(s: &Snapshot, out: &mut Vec<CachedModel>) {
    let files = s.files();
    let base = RepoRef {
        repo: s.repo.clone(),
        revision: s.revision.clone(),
        tag: None,
    };
    let size = |f: &str| std::fs::metadata(s.dir.join(f)).map_or(0, |m| m.len());
    let ggufs: Vec<&String> = files.iter().filter(|f| is_gguf(f)).collect();
    for f in ggufs.iter().filter(|f| is_model_gguf(f)) {
        if split_part(f).is_some() {
            continue;
        }
        let tag = tag_of(f);
        let chosen = choose_files(&s.repo, &files, tag.as_deref()).ok();
        if !matches!(&chosen, Some(ModelFiles::Gguf { model, .. }) if model == *f) {
            continue; // another file answers to this tag; name it by file instead
        }
        let mmproj = pick_mmproj(&ggufs, f).map(|m| s.dir.join(m));
        out.push(CachedModel {
            name: RepoRef {
                tag,
                ..base.clone()
            }
            .display(),
            path: s.dir.join(f),
            gguf: true,
            size: size(f),
            mmproj,
            checkpoint_vision: false,
        });
    }
    if ggufs.is_empty() {
        if let Ok(chosen) = checkpoint_files(&s.repo, &files) {
            let mut all = chosen.all();
            if let Ok(shards) = index_shards(&s.dir.join(SAFETENSORS_INDEX)) {
                all.extend(shards);
            }
            let vision = gemma3_formats::read_text(&s.dir.join("config.json"), MAX_TEXT_BYTES)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .is_some_and(|c| c.get("vision_config").is_some());
            out.push(CachedModel {
                name: base.display(),
                path: s.dir.clone(),
                gguf: false,
                size: all.iter().map(|f| size(f)).sum(),
                mmproj: None,
                checkpoint_vision: vision,
            });
        }
    }
}

/// The quant tag of a GGUF file name (`gemma-3-4b-it-Q4_K_M.gguf` → `Q4_K_M`), or the file
/// name itself when it has none.
fn tag_of(path: &str) -> Option<String> {
    let name = file_name(path);
    let stem = gguf_stem(name);
    let tag = stem.rsplit(['-', '.']).next().unwrap_or("");
    let quant_like = tag.bytes().any(|c| c.is_ascii_digit())
        && tag.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
    Some(if quant_like && tag.len() < stem.len() {
        tag.to_ascii_uppercase()
    } else {
        name.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn repo_refs_parse() {
        let r = RepoRef::parse("ggml-org/gemma-3-4b-it-GGUF:Q4_K_M").unwrap();
        assert_eq!(
            (r.repo.as_str(), r.revision.as_str(), r.tag.as_deref()),
            ("ggml-org/gemma-3-4b-it-GGUF", "main", Some("Q4_K_M"))
        );
        let r = RepoRef::parse("google/gemma-3-4b-it@v1.0").unwrap();
        assert_eq!((r.revision.as_str(), r.tag), ("v1.0", None));
        let r = RepoRef::parse("hf.co/org/x@refs/pr/1:model.gguf").unwrap();
        assert_eq!(r.revision, "refs/pr/1");
        assert_eq!(r.tag.as_deref(), Some("model.gguf"));
        assert_eq!(r.display(), "org/x@refs/pr/1:model.gguf");
        for bad in [
            "gemma3",
            "gemma3:4b",
            "a/b/c",
            "../x",
            "org/..",
            "org/a--b",
            "org/x@../../etc",
            "org/x:",
            "org/x:../y",
            "/abs/path.gguf",
        ] {
            assert_eq!(RepoRef::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn gguf_repos_choose_like_llama_cpp() {
        let files = names(&[
            "README.md",
            "gemma-3-4b-it-Q4_K_M.gguf",
            "gemma-3-4b-it-Q8_0.gguf",
            "gemma-3-4b-it-f16.gguf",
            "mmproj-model-f16.gguf",
            "mmproj-model-Q8_0.gguf",
        ]);
        let pick = |tag| match choose_files("o/r", &files, tag).unwrap() {
            ModelFiles::Gguf { model, mmproj, .. } => (model, mmproj.unwrap()),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            pick(None),
            (
                "gemma-3-4b-it-Q4_K_M.gguf".into(),
                "mmproj-model-Q8_0.gguf".into()
            )
        );
        assert_eq!(pick(Some("q8_0")).0, "gemma-3-4b-it-Q8_0.gguf");
        assert_eq!(
            pick(Some("F16")),
            (
                "gemma-3-4b-it-f16.gguf".into(),
                "mmproj-model-f16.gguf".into()
            )
        );
        assert_eq!(
            pick(Some("gemma-3-4b-it-f16.gguf")).0,
            "gemma-3-4b-it-f16.gguf"
        );
        let e = choose_files("o/r", &files, Some("Q2_K")).unwrap_err();
        assert!(e.to_string().contains("gemma-3-4b-it-Q8_0.gguf"), "{e}");
        // Without the preferred quants, the first model file (never an mmproj).
        let files = names(&["mmproj-a.gguf", "x-Q6_K.gguf"]);
        assert!(matches!(
            choose_files("o/r", &files, None).unwrap(),
            ModelFiles::Gguf { model, .. } if model == "x-Q6_K.gguf"
        ));
        let split = names(&[
            "m-Q4_K_M-00001-of-00002.gguf",
            "m-Q4_K_M-00002-of-00002.gguf",
        ]);
        let e = choose_files("o/r", &split, None).unwrap_err();
        assert!(e.to_string().contains("split"), "{e}");
    }

    #[test]
    fn checkpoints_take_config_tokenizer_and_weights() {
        let files = names(&[
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "pytorch_model.bin",
            "README.md",
        ]);
        assert_eq!(
            choose_files("o/r", &files, None).unwrap().all(),
            names(&[
                "config.json",
                "generation_config.json",
                "tokenizer.json",
                "model.safetensors"
            ])
        );
        let e =
            choose_files("o/r", &names(&["config.json", "pytorch_model.bin"]), None).unwrap_err();
        assert!(e.to_string().contains("model.safetensors"), "{e}");
        let e = choose_files("o/r", &names(&["README.md"]), None).unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
    }

    #[test]
    fn tags_and_splits() {
        assert_eq!(
            tag_of("a/gemma-3-4b-it-Q4_K_M.gguf").as_deref(),
            Some("Q4_K_M")
        );
        assert_eq!(tag_of("model.gguf").as_deref(), Some("model.gguf"));
        assert_eq!(quant_bits("mmproj-model-f16.gguf"), 16);
        assert_eq!(quant_bits("x-Q4_K_M.gguf"), 4);
        assert_eq!(split_part("m-Q4-00002-of-00003.gguf"), Some((2, 3)));
        assert_eq!(split_part("m-Q4.gguf"), None);
        assert!(has_tag("x-Q4_K_M.gguf", "q4_k_m"));
        assert!(!has_tag("x-Q4_K_M.gguf", "Q4_K"));
    }
}
