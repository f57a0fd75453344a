//! Downloading a model from the Hugging Face hub into the shared cache layout, as
//! huggingface_hub writes it, so transformers and llama.cpp find the same files: the file
//! list from `/api/models/{repo}/revision/{rev}`, each file's blob id, size and commit from
//! a HEAD of `/{repo}/resolve/{commit}/{file}` (`X-Linked-Etag`/`ETag`, `X-Linked-Size`,
//! `X-Repo-Commit`), the bytes into `blobs/<id>.incomplete` (resumed with a Range request
//! after an interruption), checked for size and, for LFS files whose id is their sha256,
//! hashed; then `snapshots/<commit>/<file>` links to the blob and `refs/<rev>` names the
//! commit. Progress goes to a callback; nothing here prints.

use crate::hub::{
    choose_files, index_shards, is_blob_id, is_commit, relative_path_is_safe, HubConfig,
    ModelFiles, RepoRef, Snapshot,
};
use crate::HubError;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a download reports, for a progress bar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownloadEvent<'a> {
    /// A file begins, or resumes with `done` of its `total` bytes already on disk.
    Start {
        file: &'a str,
        total: u64,
        done: u64,
    },
    /// `done` bytes of the file are on disk.
    Progress { file: &'a str, done: u64 },
    /// The file is complete and checked.
    Finish { file: &'a str },
}

/// A progress callback.
pub type ProgressFn = dyn Fn(DownloadEvent<'_>) + Send + Sync;

/// Largest JSON answer read from the hub's API (a repo listing is far smaller).
const API_BODY_LIMIT: u64 = 32 << 20;
/// Bytes read and written at a time, and between progress reports.
const CHUNK: usize = 1 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection may stay silent before the download is given up (and can resume).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Relative redirects (a renamed repo) followed when asking for a file's metadata.
const MAX_RELATIVE_REDIRECTS: usize = 5;
const USER_AGENT: &str = concat!("gemma3/", env!("CARGO_PKG_VERSION"));
const INCOMPLETE: &str = ".incomplete";
/// Characters kept as they are in a URL path segment (others are percent-encoded).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A client for one hub.
pub struct Downloader<'a> {
    cfg: &'a HubConfig,
    agent: ureq::Agent,
    progress: Option<&'a ProgressFn>,
}

/// What a HEAD of a file says.
struct FileMeta {
    blob: String,
    size: u64,
}

impl<'a> Downloader<'a> {
    pub fn new(cfg: &'a HubConfig, progress: Option<&'a ProgressFn>) -> Downloader<'a> {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(USER_AGENT)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(READ_TIMEOUT))
            .build()
            .new_agent();
        Downloader {
            cfg,
            agent,
            progress,
        }
    }

    /// Downloads the files of `r` that make its model (blobs already in the cache are not
    /// fetched again) and returns the snapshot they are in.
    pub fn fetch(&self, r: &RepoRef) -> Result<(Snapshot, ModelFiles), HubError> {
        if self.cfg.offline {
            return Err(HubError::Offline {
                what: r.display(),
                cache: self.cfg.cache.clone(),
                note: String::new(),
            });
        }
        let (commit, listing) = self.revision_info(r)?;
        let chosen = choose_files(&r.repo, &listing, r.tag.as_deref())?;
        let dir = self.cfg.repo_dir(&r.repo).join("snapshots").join(&commit);
        for f in chosen.all() {
            self.fetch_file(&r.repo, &commit, &f)?;
            if crate::hub::is_index(&f) {
                for shard in index_shards(&dir.join(&f))? {
                    if !listing.contains(&shard) {
                        return Err(HubError::Load(format!(
                            "{}: the index names {shard}, which the repo does not have",
                            r.repo
                        )));
                    }
                    self.fetch_file(&r.repo, &commit, &shard)?;
                }
            }
        }
        if r.revision != commit {
            let ref_file = self.cfg.repo_dir(&r.repo).join("refs").join(&r.revision);
            write_atomic(&ref_file, commit.as_bytes())?;
        }
        let snapshot = Snapshot {
            repo: r.repo.clone(),
            revision: r.revision.clone(),
            commit,
            dir,
        };
        Ok((snapshot, chosen))
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.cfg.endpoint)
    }

    fn get(&self, url: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let req = self.agent.get(url);
        match &self.cfg.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    fn head(&self, url: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let req = self.agent.head(url);
        match &self.cfg.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    fn unreachable(&self, url: &str, e: ureq::Error) -> HubError {
        HubError::Download(format!(
            "{url}: {e} (is {} reachable? HF_HUB_OFFLINE=1 uses only the local cache)",
            self.cfg.endpoint
        ))
    }

    /// The commit `r.revision` is at, and the repo's file list there.
    fn revision_info(&self, r: &RepoRef) -> Result<(String, Vec<String>), HubError> {
        let url = self.url(&format!(
            "api/models/{}/revision/{}",
            r.repo,
            utf8_percent_encode(&r.revision, SEGMENT)
        ));
        let mut resp = self
            .get(&url)
            .call()
            .map_err(|e| self.unreachable(&url, e))?;
        if !resp.status().is_success() {
            return Err(self.status_error(r, None, &url, &resp));
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(API_BODY_LIMIT)
            .read_to_vec()
            .map_err(|e| HubError::Download(format!("{url}: {e}")))?;
        #[derive(serde::Deserialize)]
        struct Sibling {
            rfilename: String,
        }
        #[derive(serde::Deserialize)]
        struct Info {
            sha: String,
            #[serde(default)]
            siblings: Vec<Sibling>,
        }
        let info: Info = serde_json::from_slice(&body).map_err(|e| {
            HubError::Download(format!("{url}: not the hub's answer (invalid JSON: {e})"))
        })?;
        if !is_commit(&info.sha) {
            return Err(HubError::Download(format!(
                "{url}: the hub named commit {:?}, not a 40-digit hash",
                info.sha
            )));
        }
        let files = info
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .filter(|f| relative_path_is_safe(f))
            .collect();
        Ok((info.sha, files))
    }

    /// Blob id and size of a file, from the hub's headers (relative redirects, as for a
    /// renamed repo, are followed; a redirect to the file store is not).
    fn file_meta(&self, r: &RepoRef, file: &str, url: &str) -> Result<FileMeta, HubError> {
        let mut url = url.to_string();
        for _ in 0..=MAX_RELATIVE_REDIRECTS {
            let resp = self
                .head(&url)
                .config()
                .max_redirects(0)
                .build()
                .call()
                .map_err(|e| self.unreachable(&url, e))?;
            let status = resp.status();
            let location = header(&resp, "location");
            if status.is_redirection() {
                if let Some(loc) = location.filter(|l| l.starts_with('/')) {
                    url = self.url(loc.trim_start_matches('/'));
                    continue;
                }
            } else if !status.is_success() {
                return Err(self.status_error(r, Some(file), &url, &resp));
            }
            let etag = header(&resp, "x-linked-etag")
                .or_else(|| header(&resp, "etag"))
                .unwrap_or_default();
            let blob = etag.trim_start_matches("W/").trim_matches('"').to_string();
            let size = header(&resp, "x-linked-size")
                .or_else(|| header(&resp, "content-length"))
                .and_then(|s| s.parse().ok());
            return match (is_blob_id(&blob), size) {
                (true, Some(size)) => Ok(FileMeta {
                    blob: blob.to_ascii_lowercase(),
                    size,
                }),
                _ => Err(HubError::Download(format!(
                    "{url}: the hub sent no usable ETag and size for {file} (ETag {etag:?})"
                ))),
            };
        }
        Err(HubError::Download(format!(
            "{url}: more than {MAX_RELATIVE_REDIRECTS} redirects"
        )))
    }

    /// One file of the repo at `commit` into the cache; returns its snapshot path.
    fn fetch_file(&self, repo: &str, commit: &str, file: &str) -> Result<PathBuf, HubError> {
        let r = RepoRef {
            repo: repo.to_string(),
            revision: commit.to_string(),
            tag: None,
        };
        let encoded: Vec<String> = file
            .split('/')
            .map(|s| utf8_percent_encode(s, SEGMENT).to_string())
            .collect();
        let url = self.url(&format!("{repo}/resolve/{commit}/{}", encoded.join("/")));
        let meta = self.file_meta(&r, file, &url)?;
        let repo_dir = self.cfg.repo_dir(repo);
        let blob = repo_dir.join("blobs").join(&meta.blob);
        let pointer = repo_dir.join("snapshots").join(commit).join(file);
        let lock_dir = self
            .cfg
            .cache
            .join(".locks")
            .join(crate::hub::repo_folder(repo));
        std::fs::create_dir_all(&lock_dir).map_err(|e| io_error(&lock_dir, e))?;
        let lock_path = lock_dir.join(format!("{}.lock", meta.blob));
        let lock = File::create(&lock_path).map_err(|e| io_error(&lock_path, e))?;
        // Another process (ours, or huggingface_hub's filelock, which also uses flock)
        // downloading the same blob finishes first.
        lock.lock().map_err(|e| io_error(&lock_path, e))?;
        let have = std::fs::metadata(&blob).map(|m| m.len()).ok();
        if have != Some(meta.size) {
            self.download_blob(&r, file, &url, &blob, &meta)?;
        }
        link(&blob, &pointer)?;
        drop(lock);
        Ok(pointer)
    }

    /// The file's bytes into `<blob>.incomplete`, resumed where an earlier attempt stopped,
    /// checked, then renamed to the blob.
    fn download_blob(
        &self,
        r: &RepoRef,
        file: &str,
        url: &str,
        blob: &Path,
        meta: &FileMeta,
    ) -> Result<(), HubError> {
        let part = PathBuf::from(format!("{}{INCOMPLETE}", blob.display()));
        if let Some(parent) = part.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
        }
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(|e| io_error(&part, e))?;
        let mut done = out.metadata().map_err(|e| io_error(&part, e))?.len();
        if done > meta.size {
            out.set_len(0).map_err(|e| io_error(&part, e))?;
            done = 0;
        }
        if let Some(p) = self.progress {
            p(DownloadEvent::Start {
                file,
                total: meta.size,
                done,
            });
        }
        if done < meta.size {
            let mut req = self.get(url);
            if done > 0 {
                req = req.header("Range", format!("bytes={done}-"));
            }
            let resp = req.call().map_err(|e| self.unreachable(url, e))?;
            match resp.status().as_u16() {
                206 if done > 0 => {
                    let range = header(&resp, "content-range").unwrap_or_default();
                    if !range.starts_with(&format!("bytes {done}-")) {
                        return Err(HubError::Download(format!(
                            "{url}: asked to resume at byte {done}, the server sent range {range:?}"
                        )));
                    }
                }
                200 => {
                    // The server ignored the range: start over.
                    out.set_len(0).map_err(|e| io_error(&part, e))?;
                    done = 0;
                }
                _ => return Err(self.status_error(r, Some(file), url, &resp)),
            }
            let mut body = resp.into_body().into_reader();
            done = self.copy(file, url, &mut body, &mut out, &part, done, meta.size)?;
        }
        out.flush().map_err(|e| io_error(&part, e))?;
        drop(out);
        if done != meta.size {
            return Err(HubError::Download(format!(
                "{url}: the connection ended after {done} of {} bytes; run the same command again to resume",
                meta.size
            )));
        }
        if meta.blob.len() == 64 {
            let got = sha256_file(&part)?;
            if got != meta.blob {
                let _ = std::fs::remove_file(&part);
                return Err(HubError::Download(format!(
                    "{file} of {} is corrupt: its sha256 is {got}, the hub says {}; the partial file was deleted, run again to download it afresh",
                    r.repo, meta.blob
                )));
            }
        }
        std::fs::rename(&part, blob).map_err(|e| io_error(blob, e))?;
        if let Some(p) = self.progress {
            p(DownloadEvent::Finish { file });
        }
        Ok(())
    }

    /// Appends the body to `out` until it ends or the file is complete; returns the bytes
    /// now on disk.
    fn copy(
        &self,
        file: &str,
        url: &str,
        body: &mut impl Read,
        out: &mut File,
        part: &Path,
        mut done: u64,
        total: u64,
    ) -> Result<u64, HubError> {
        let mut buf = vec![0u8; CHUNK];
        while done < total {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n.min((total - done) as usize),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(HubError::Download(format!(
                        "{url}: {e} after {done} of {total} bytes; run the same command again to resume"
                    )))
                }
            };
            out.write_all(&buf[..n]).map_err(|e| io_error(part, e))?;
            done += n as u64;
            if let Some(p) = self.progress {
                p(DownloadEvent::Progress { file, done });
            }
        }
        Ok(done)
    }

    /// The error for a refused request: gated or private repos, missing repos, revisions
    /// and files, or anything else the hub answered.
    fn status_error(
        &self,
        r: &RepoRef,
        file: Option<&str>,
        url: &str,
        resp: &ureq::http::Response<ureq::Body>,
    ) -> HubError {
        let status = resp.status().as_u16();
        let code = header(resp, "x-error-code").unwrap_or_default();
        let endpoint = &self.cfg.endpoint;
        let repo = &r.repo;
        match (status, code) {
            (401 | 403 | 404, "RepoNotFound") => HubError::NotFound(format!(
                "{repo} was not found on {endpoint} (HTTP {status}; a private repo also needs HF_TOKEN)"
            )),
            (401 | 403, _) => HubError::Gated {
                repo: repo.clone(),
                status,
                page: self.cfg.repo_page(repo),
                hint: match self.cfg.token {
                    Some(_) => "check that the token in use (HF_TOKEN or the saved token file) belongs to that account; access to gated models can take a while to be granted".to_string(),
                    None => format!("set HF_TOKEN to an access token of that account ({endpoint}/settings/tokens), or save one with `hf auth login`"),
                },
            },
            (404, "RevisionNotFound") => HubError::NotFound(format!(
                "{repo} has no revision {:?} on {endpoint}",
                r.revision
            )),
            (404, "EntryNotFound") => HubError::NotFound(format!(
                "{repo} has no file {:?} at {}",
                file.unwrap_or(""),
                r.revision
            )),
            (404, _) => HubError::NotFound(format!("{repo} was not found on {endpoint} (HTTP 404 for {url})")),
            _ => HubError::Download(format!(
                "{url}: HTTP {status}{}",
                header(resp, "x-error-message")
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )),
        }
    }
}

fn header<'r>(resp: &'r ureq::http::Response<ureq::Body>, name: &str) -> Option<&'r str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

fn io_error(path: &Path, e: std::io::Error) -> HubError {
    HubError::Download(format!("{}: {e}", path.display()))
}

/// The lowercase hex sha256 of a file.
fn sha256_file(path: &Path) -> Result<String, HubError> {
    let mut f = File::open(path).map_err(|e| io_error(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(path, e)),
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a small file through a temporary name, so readers never see half of it.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HubError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    }
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::write(&tmp, bytes).map_err(|e| io_error(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error(path, e))
}

/// `snapshots/<commit>/<file>` → the blob, as a relative link (`../../blobs/<id>`, one more
/// `..` per folder in the file's path), as huggingface_hub makes it.
fn link(blob: &Path, pointer: &Path) -> Result<(), HubError> {
    let parent = pointer
        .parent()
        .ok_or_else(|| HubError::Download(format!("{}: no parent", pointer.display())))?;
    std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    // pointer = <repo>/snapshots/<commit>/<file...>; count the folders up to <repo>.
    let repo_dir = blob
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| HubError::Download(format!("{}: not in a cache", blob.display())))?;
    let depth = pointer
        .strip_prefix(repo_dir)
        .map(|p| p.components().count() - 1)
        .unwrap_or(2);
    let mut target = PathBuf::new();
    for _ in 0..depth {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob.file_name().unwrap_or_default());
    if std::fs::symlink_metadata(pointer).is_ok() {
        std::fs::remove_file(pointer).map_err(|e| io_error(pointer, e))?;
    }
    make_link(&target, blob, pointer)
}

#[cfg(unix)]
fn make_link(target: &Path, _blob: &Path, pointer: &Path) -> Result<(), HubError> {
    std::os::unix::fs::symlink(target, pointer).map_err(|e| io_error(pointer, e))
}

/// Without symlinks the file is copied, as huggingface_hub does where links are not allowed.
#[cfg(not(unix))]
fn make_link(_target: &Path, blob: &Path, pointer: &Path) -> Result<(), HubError> {
    std::fs::copy(blob, pointer)
        .map(|_| ())
        .map_err(|e| io_error(pointer, e))
}
