//! `gemma3 list` (the models on this machine: the default model, the Hugging Face cache,
//! Ollama's store) and `gemma3 pull NAME` (download a Hugging Face repo into the cache
//! without running it), and the download progress bars every command shows.

use anyhow::Result;
use clap::Args;
use gemma3_engine::OpenOptions;
use gemma3_hub::resolve::{list_models, pull, ResolveOptions, Vision};
use gemma3_hub::{DownloadEvent, Locations, ProgressFn};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Args)]
pub struct ListArgs {
    /// Print a JSON array instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct PullArgs {
    /// A Hugging Face repo id: org/name[@revision][:quant or file], e.g.
    /// ggml-org/gemma-3-4b-it-GGUF:Q4_K_M or google/gemma-3-270m
    pub name: String,
}

/// Library options for opening a model from the CLI: the mmproj flag, and progress bars
/// for downloads.
pub(crate) fn open_options(mmproj: Option<PathBuf>) -> OpenOptions {
    OpenOptions {
        mmproj,
        progress: Some(progress_bars()),
        ..Default::default()
    }
}

/// One bar per file on a terminal; a line per file otherwise.
fn progress_bars() -> Arc<ProgressFn> {
    let bars: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    let tty = std::io::stderr().is_terminal();
    Arc::new(move |e: DownloadEvent<'_>| {
        let Ok(mut bars) = bars.lock() else { return };
        match e {
            DownloadEvent::Start { file, total, done } => {
                if !tty {
                    let resumed = match done {
                        0 => String::new(),
                        d => format!(", resuming at {}", human(d)),
                    };
                    eprintln!("downloading {file} ({}{resumed})", human(total));
                    return;
                }
                let bar = ProgressBar::new(total).with_message(file.to_string());
                bar.set_style(
                    ProgressStyle::with_template(
                        "{msg:40!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_position(done);
                bars.insert(file.to_string(), bar);
            }
            DownloadEvent::Progress { file, done } => {
                if let Some(b) = bars.get(file) {
                    b.set_position(done);
                }
            }
            DownloadEvent::Finish { file } => {
                if let Some(b) = bars.remove(file) {
                    b.finish();
                }
            }
        }
    })
}

/// Bytes as people read them.
fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1_000_000 => format!("{:.0} kB", b / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

pub fn list(a: ListArgs) -> Result<()> {
    let loc = Locations::from_env();
    let models = list_models(&loc);
    if a.json {
        let rows: Vec<serde_json::Value> = models
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.name,
                    "source": m.kind.to_string(),
                    "path": m.path,
                    "format": m.format,
                    "size": m.size,
                    "vision": m.vision.to_string(),
                    "mmproj": match &m.vision { Vision::Mmproj(p) => Some(p), _ => None },
                    "problem": m.problem,
                })
            })
            .collect();
        outln!("{}", serde_json::Value::Array(rows))?;
        return Ok(());
    }
    if models.is_empty() {
        outln!(
            "No models found (the default model is fetched on first use; Hugging Face cache: {}; Ollama store: {}).",
            loc.hub.cache.display(),
            loc.ollama.display()
        )?;
        return Ok(());
    }
    let width = models
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    outln!(
        "{:<width$}  {:<22}  {:<11}  {:>9}  VISION",
        "NAME",
        "SOURCE",
        "FORMAT",
        "SIZE"
    )?;
    for m in &models {
        let vision = match &m.problem {
            Some(p) => format!("unusable: {p}"),
            None => m.vision.to_string(),
        };
        outln!(
            "{:<width$}  {:<22}  {:<11}  {:>9}  {vision}",
            m.name,
            m.kind.to_string(),
            m.format,
            human(m.size)
        )?;
    }
    Ok(())
}

pub fn run_pull(a: PullArgs) -> Result<()> {
    let loc = Locations::from_env();
    let progress = progress_bars();
    let r = pull(
        &a.name,
        &ResolveOptions {
            locations: &loc,
            download: true,
            progress: Some(progress.as_ref()),
        },
    )?;
    eprintln!("{}", r.describe());
    outln!("{}", r.path.display())?;
    if let Some(p) = &r.mmproj {
        outln!("{}", p.display())?;
    }
    Ok(())
}
