//! `gemma3 quantize INPUT OUTPUT TYPE`: llama-quantize's argument order, for a Hugging Face
//! checkpoint or a GGUF file; `--mmproj OUT` also writes the vision tower as llama.cpp's
//! mmproj file.

use anyhow::{bail, Context, Result};
use clap::Args;
use gemma3_convert::quantize::{mmproj_plan, write_gguf, Plan, Progress, QuantizeSummary};
use gemma3_formats::HfDirectory;
use gemma3_model::FileType;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct QuantizeArgs {
    /// A Hugging Face model directory (safetensors in f32/bf16/f16) or a GGUF file (a
    /// quantized one is dequantized and quantized again)
    pub input: PathBuf,
    /// The GGUF file to write (through a temporary file renamed at the end)
    pub output: PathBuf,
    /// F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q6_K, or the mixes Q4_K_S, Q4_K_M,
    /// Q5_K_S, Q5_K_M (case-insensitive)
    #[arg(value_parser = crate::parse_file_type)]
    pub file_type: FileType,
    /// Overwrite OUTPUT (and the --mmproj file) if they exist
    #[arg(long)]
    pub force: bool,
    /// Also write the vision tower of a multimodal checkpoint as llama.cpp's mmproj GGUF
    /// (f16) to this file
    #[arg(long, value_name = "OUT")]
    pub mmproj: Option<PathBuf>,
    /// Worker threads [default: one per core]
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// No progress bar
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    crate::start_pool(a.threads)?;
    for out in std::iter::once(&a.output).chain(a.mmproj.as_ref()) {
        if out.exists() && !a.force {
            bail!(
                "{} already exists (use --force to overwrite it)",
                out.display()
            );
        }
    }
    if a.mmproj.as_deref() == Some(a.output.as_path()) {
        bail!("--mmproj must name a different file than OUTPUT");
    }
    if a.mmproj.is_some() && !a.input.is_dir() {
        bail!("--mmproj needs a Hugging Face checkpoint as INPUT (the vision tower is not in a GGUF text model)");
    }
    let plan = Plan::for_model(&a.input, a.file_type)
        .with_context(|| format!("planning {} as {}", a.input.display(), a.file_type))?;
    let requant = plan.requantized_count();
    if requant > 0 {
        eprintln!(
            "note: {requant} tensors are already quantized; they are dequantized and quantized again (llama-quantize --allow-requantize), which loses precision"
        );
    }
    let what = format!("{} -> {}", a.input.display(), a.file_type);
    let s = write_with_progress(&plan, &a.output, a.force, a.quiet, &what)?;
    report(&a.output, &s)?;
    if let Some(out) = &a.mmproj {
        let hf = HfDirectory::open(&a.input)?;
        let plan = mmproj_plan(&hf)?;
        let s = write_with_progress(&plan, out, a.force, a.quiet, "vision tower -> F16")?;
        report(out, &s)?;
    }
    Ok(())
}

fn write_with_progress(
    plan: &Plan,
    out: &Path,
    force: bool,
    quiet: bool,
    what: &str,
) -> Result<QuantizeSummary> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(plan.input_bytes())
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta} {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    let t0 = Instant::now();
    let s = write_gguf(plan, out, force, &mut |p: &Progress| {
        bar.set_position(p.done_bytes);
        bar.set_message(format!(
            "[{}/{}] {} {}",
            p.index + 1,
            p.count,
            p.tensor,
            p.dtype
        ));
        true
    })
    .with_context(|| format!("writing {}", out.display()))?;
    bar.finish_and_clear();
    if !quiet {
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "{what}: {} tensors in {secs:.1} s ({:.0} MB/s of input)",
            s.tensors,
            plan.input_bytes() as f64 / 1e6 / secs.max(1e-9)
        );
    }
    Ok(s)
}

fn report(out: &Path, s: &QuantizeSummary) -> Result<()> {
    let types: Vec<String> = s.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    outln!(
        "wrote {} ({:.1} MB of tensor data; {})",
        out.display(),
        s.output_bytes as f64 / 1e6,
        types.join(", ")
    )?;
    Ok(())
}
