//! Ollama's model store, read only: `manifests/<host>/<namespace>/<model>/<tag>` (a JSON
//! manifest listing layers by media type) and `blobs/sha256-<hex>`. A Gemma 3 model is a
//! GGUF model layer, a projector layer when its vision tower is a separate llama.cpp
//! mmproj file, a Go template (not Jinja: its text is kept as it is), a parameters layer
//! (JSON: stop, temperature, top_k, top_p, num_ctx, …), and system and license texts.
//!
//! Newer Ollama builds write Gemma 3 as one GGUF holding the vision tower too (`v.*` and
//! `mm.*` tensors under Ollama's own names, `gemma3.vision.*` keys); that layout is
//! recognised but its tower is not loaded.

use crate::hub::home_dir;
use crate::HubError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_HOST: &str = "registry.ollama.ai";
pub const DEFAULT_NAMESPACE: &str = "library";
pub const DEFAULT_TAG: &str = "latest";
const MEDIA_MODEL: &str = "application/vnd.ollama.image.model";
const MEDIA_PROJECTOR: &str = "application/vnd.ollama.image.projector";
const MEDIA_TEMPLATE: &str = "application/vnd.ollama.image.template";
const MEDIA_PARAMS: &str = "application/vnd.ollama.image.params";
const MEDIA_SYSTEM: &str = "application/vnd.ollama.image.system";
const MEDIA_LICENSE: &str = "application/vnd.ollama.image.license";
const MEDIA_ADAPTER: &str = "application/vnd.ollama.image.adapter";
/// Longest manifest read (real ones are about a kilobyte).
const MANIFEST_LIMIT: u64 = 1 << 20;
/// Longest template, system, license or parameters text read.
const TEXT_LIMIT: u64 = 16 << 20;
/// Ollama's limit on each part of a name.
const MAX_PART: usize = 80;
const DIGEST_PREFIX: &str = "sha256:";

/// The store: `OLLAMA_MODELS`, else `~/.ollama/models`.
pub fn store_root() -> PathBuf {
    match std::env::var_os("OLLAMA_MODELS").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => home_dir().join(".ollama").join("models"),
    }
}

/// A model name as Ollama reads it: `[host/][namespace/]model[:tag]`, with
/// `registry.ollama.ai`, `library` and `latest` filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OllamaName {
    pub host: String,
    pub namespace: String,
    pub model: String,
    pub tag: String,
}

impl OllamaName {
    pub fn parse(s: &str) -> Option<OllamaName> {
        let s = s
            .strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"))
            .unwrap_or(s);
        let last_slash = s.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match s[last_slash..].rsplit_once(':') {
            Some((m, t)) => (&s[..last_slash + m.len()], t),
            None => (s, DEFAULT_TAG),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (host, namespace, model) = match parts.as_slice() {
            [m] => (DEFAULT_HOST, DEFAULT_NAMESPACE, *m),
            [n, m] => (DEFAULT_HOST, *n, *m),
            [h, n, m] => (*h, *n, *m),
            _ => return None,
        };
        let ok = |p: &str, dots: bool| {
            !p.is_empty()
                && p.len() <= MAX_PART
                && p.bytes().all(|c| {
                    c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || (dots && c == b'.')
                })
                && !p.starts_with(['.', '-'])
        };
        let host_ok = !host.is_empty()
            && !host.starts_with('.')
            && host.len() <= 350
            && host
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_' | b':'));
        (host_ok && ok(namespace, false) && ok(model, true) && ok(tag, true)).then(|| OllamaName {
            host: host.to_string(),
            namespace: namespace.to_string(),
            model: model.to_string(),
            tag: tag.to_string(),
        })
    }

    /// `manifests/<host>/<namespace>/<model>/<tag>` under the store.
    pub fn manifest_path(&self, root: &Path) -> PathBuf {
        root.join("manifests")
            .join(&self.host)
            .join(&self.namespace)
            .join(&self.model)
            .join(&self.tag)
    }

    /// The shortest form Ollama shows (`gemma3:4b`, `user/model:tag`, `host/ns/model:tag`).
    pub fn display(&self) -> String {
        let mut s = String::new();
        if !self.host.eq_ignore_ascii_case(DEFAULT_HOST) {
            s.push_str(&self.host);
            s.push('/');
        }
        if !s.is_empty() || !self.namespace.eq_ignore_ascii_case(DEFAULT_NAMESPACE) {
            s.push_str(&self.namespace);
            s.push('/');
        }
        s.push_str(&self.model);
        s.push(':');
        s.push_str(&self.tag);
        s
    }

    /// The manifest of this name in the store, matching case as Ollama does (names are
    /// case-insensitive; older versions wrote folders in the case the user typed).
    pub fn find_manifest(&self, root: &Path) -> Option<PathBuf> {
        let exact = self.manifest_path(root);
        if exact.is_file() {
            return Some(exact);
        }
        let mut dir = root.join("manifests");
        for part in [&self.host, &self.namespace, &self.model, &self.tag] {
            let found = std::fs::read_dir(&dir)
                .ok()?
                .flatten()
                .find(|e| e.file_name().to_string_lossy().eq_ignore_ascii_case(part))?;
            dir = found.path();
        }
        dir.is_file().then_some(dir)
    }
}

/// Ollama's parameters layer. Absent values are Ollama's defaults (`Model::default_sampling`
/// fills them in); other keys are kept as they are.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
pub struct OllamaParams {
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub num_ctx: Option<u64>,
    pub num_predict: Option<i64>,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// A model in the store, with its layers read.
#[derive(Clone, Debug)]
pub struct OllamaModel {
    /// The name in Ollama's shortest form.
    pub name: String,
    pub manifest: PathBuf,
    /// The GGUF model blob.
    pub model: PathBuf,
    /// The projector blob (a llama.cpp mmproj GGUF) when the vision tower is separate.
    pub projector: Option<PathBuf>,
    /// The Go template's text.
    pub template: Option<String>,
    pub system: Option<String>,
    pub params: Option<OllamaParams>,
    pub license: Option<String>,
    /// All layers' bytes.
    pub size: u64,
}

#[derive(serde::Deserialize)]
struct Manifest {
    #[serde(default)]
    layers: Vec<Layer>,
}

#[derive(serde::Deserialize)]
struct Layer {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
}

impl OllamaModel {
    /// Reads a manifest and checks that its blobs are present and whole.
    pub fn open(root: &Path, name: &OllamaName, manifest: &Path) -> Result<Self, HubError> {
        let bad = |what: String| HubError::Load(format!("{}: {what}", manifest.display()));
        let text = gemma3_formats::read_text(manifest, MANIFEST_LIMIT)?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not an Ollama manifest ({e})")))?;
        let mut out = OllamaModel {
            name: name.display(),
            manifest: manifest.to_path_buf(),
            model: PathBuf::new(),
            projector: None,
            template: None,
            system: None,
            params: None,
            license: None,
            size: m.layers.iter().map(|l| l.size).sum(),
        };
        let mut model = None;
        for l in &m.layers {
            let blob = || blob_path(root, manifest, l);
            match l.media_type.as_str() {
                MEDIA_MODEL if model.is_none() => model = Some(blob()?),
                MEDIA_MODEL => {
                    return Err(bad(
                        "more than one model layer (a model split over several files is not supported)".into(),
                    ))
                }
                MEDIA_PROJECTOR if out.projector.is_none() => out.projector = Some(blob()?),
                MEDIA_PROJECTOR => return Err(bad("more than one projector layer".into())),
                MEDIA_ADAPTER => {
                    return Err(bad(
                        "a LoRA adapter layer, which this engine cannot apply (the model would answer without it)".into(),
                    ))
                }
                MEDIA_TEMPLATE => out.template = Some(gemma3_formats::read_text(&blob()?, TEXT_LIMIT)?),
                MEDIA_SYSTEM => out.system = Some(gemma3_formats::read_text(&blob()?, TEXT_LIMIT)?),
                MEDIA_LICENSE => out.license = Some(gemma3_formats::read_text(&blob()?, TEXT_LIMIT)?),
                MEDIA_PARAMS => {
                    let p = blob()?;
                    let text = gemma3_formats::read_text(&p, TEXT_LIMIT)?;
                    out.params = Some(serde_json::from_str(&text).map_err(|e| {
                        HubError::Load(format!(
                            "{}: the parameters layer of {} is not valid ({e})",
                            p.display(),
                            out.name
                        ))
                    })?);
                }
                _ => {} // messages, config and layers of other tools
            }
        }
        out.model = model.ok_or_else(|| bad("no model layer".into()))?;
        Ok(out)
    }
}

/// `blobs/sha256-<hex>` of a layer, checked to exist with the manifest's size.
fn blob_path(root: &Path, manifest: &Path, l: &Layer) -> Result<PathBuf, HubError> {
    let hex = l
        .digest
        .strip_prefix(DIGEST_PREFIX)
        .filter(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| {
            HubError::Load(format!(
                "{}: layer digest {:?} is not sha256:<64 hex digits>",
                manifest.display(),
                l.digest
            ))
        })?;
    let p = root.join("blobs").join(format!("sha256-{hex}"));
    let len = std::fs::metadata(&p).map(|m| m.len()).map_err(|_| {
        HubError::Load(format!(
            "{}: blob {} ({}) is missing; pull the model again with `ollama pull`",
            manifest.display(),
            l.digest,
            p.display()
        ))
    })?;
    if l.size != 0 && len != l.size {
        return Err(HubError::Load(format!(
            "{}: blob {} has {len} bytes, the manifest says {} (an interrupted pull?)",
            manifest.display(),
            p.display(),
            l.size
        )));
    }
    Ok(p)
}

/// Every model in the store (`manifests/<host>/<namespace>/<model>/<tag>`), with its
/// manifest read; unreadable ones are returned as errors so `list` can show them.
pub fn list(root: &Path) -> Vec<Result<OllamaModel, (String, HubError)>> {
    let mut out = Vec::new();
    let dirs = |p: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let name_of = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    for host in dirs(&root.join("manifests")) {
        for ns in dirs(&host) {
            for model in dirs(&ns) {
                for tag in dirs(&model).into_iter().filter(|t| t.is_file()) {
                    let parts = [&host, &ns, &model, &tag].map(|p| name_of(p).unwrap_or_default());
                    let name = OllamaName {
                        host: parts[0].clone(),
                        namespace: parts[1].clone(),
                        model: parts[2].clone(),
                        tag: parts[3].clone(),
                    };
                    out.push(OllamaModel::open(root, &name, &tag).map_err(|e| (name.display(), e)));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fill_ollamas_defaults() {
        let n = OllamaName::parse("gemma3").unwrap();
        assert_eq!(
            (
                n.host.as_str(),
                n.namespace.as_str(),
                n.model.as_str(),
                n.tag.as_str()
            ),
            ("registry.ollama.ai", "library", "gemma3", "latest")
        );
        assert_eq!(n.display(), "gemma3:latest");
        let n = OllamaName::parse("library/gemma3:27b-it-qat").unwrap();
        assert_eq!((n.model.as_str(), n.tag.as_str()), ("gemma3", "27b-it-qat"));
        let n = OllamaName::parse("registry.ollama.ai/library/gemma3:4b").unwrap();
        assert_eq!(n.display(), "gemma3:4b");
        let n = OllamaName::parse("user/model:tag").unwrap();
        assert_eq!(n.display(), "user/model:tag");
        let n = OllamaName::parse("hf.co/org/repo:Q4_K_M").unwrap();
        assert_eq!(n.host, "hf.co");
        assert_eq!(
            n.manifest_path(Path::new("/s")),
            Path::new("/s/manifests/hf.co/org/repo/Q4_K_M")
        );
        for bad in [
            "",
            "a/b/c/d",
            "../x",
            "../ns/x",
            "x:../y",
            "name with space",
            "ns.dot/m",
            ":tag",
        ] {
            assert_eq!(OllamaName::parse(bad), None, "{bad}");
        }
    }
}
