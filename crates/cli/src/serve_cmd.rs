//! `gemma3 serve`: the OpenAI-compatible server (see the `gemma3_server` crate).

use anyhow::{bail, Result};
use clap::Args;
use gemma3_engine::scheduler::{self, SchedulerConfig};
use gemma3_engine::Model;
use gemma3_model::MAX_BATCH;
use gemma3_server::ServerConfig;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: crate::ModelArgs,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences generated at once (continuous batching)
    #[arg(long, default_value_t = scheduler::DEFAULT_PARALLEL)]
    pub parallel: usize,
    /// Context of each sequence in tokens [default: the model's trained length]
    #[arg(short = 'c', long)]
    pub ctx_size: Option<usize>,
    /// Require `Authorization: Bearer KEY` on the /v1 routes
    #[arg(long, env = "GEMMA3_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests (choices) that may wait for a slot; more get 503 with Retry-After
    #[arg(long, default_value_t = scheduler::DEFAULT_MAX_QUEUE)]
    pub max_queue: usize,
    /// Fetch http(s) image URLs in chat requests (data: URLs are always accepted)
    #[arg(long)]
    pub allow_image_urls: bool,
    #[command(flatten)]
    pub image_limit: crate::ImageLimitArgs,
    /// Largest request body in MiB
    #[arg(long, default_value_t = 64)]
    pub max_body_mb: usize,
    /// Prompt tokens per forward pass: a new prompt delays running streams by at most one
    /// such chunk per step
    #[arg(long, default_value_t = scheduler::DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// KV cache the running sequences may use, in MiB [default: half the available memory]
    #[arg(long)]
    pub kv_budget_mb: Option<usize>,
    /// KV cache kept for reusing finished requests' prefixes, in MiB
    #[arg(long, default_value_t = scheduler::DEFAULT_PREFIX_CACHE_BYTES >> 20)]
    pub prompt_cache_mb: usize,
    /// The model name /v1/models reports [default: the model file's name]
    #[arg(long)]
    pub alias: Option<String>,
    /// Seconds a drain (SIGTERM or Ctrl-C) lets running and queued requests finish before
    /// ending them with an error; a second signal ends them at once
    #[arg(long, default_value_t = gemma3_server::DEFAULT_SHUTDOWN_TIMEOUT.as_secs())]
    pub shutdown_timeout: u64,
    /// This replica's name, sent back in the X-Replica-Id header [default: the host name]
    #[arg(long)]
    pub replica_id: Option<String>,
    #[command(flatten)]
    pub spec: crate::SpecArgs,
}

pub fn run(a: ServeArgs) -> Result<()> {
    crate::init_logging();
    crate::start_pool(a.model.threads)?;
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    if a.ctx_size == Some(0) {
        bail!("--ctx-size must be at least 1");
    }
    let kv_budget = match a.kv_budget_mb {
        Some(mb) => mb << 20,
        None => SchedulerConfig::default_kv_budget(),
    };
    let config = ServerConfig {
        host: a.host.clone(),
        port: a.port,
        model_name: a.alias.clone(),
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        allow_image_urls: a.allow_image_urls,
        max_image_pixels: a.image_limit.max_image_pixels,
        max_body_bytes: a.max_body_mb.max(1) << 20,
        default_sampling: None,
        scheduler: SchedulerConfig {
            parallel: a.parallel,
            max_queue: a.max_queue,
            context: a.ctx_size,
            prefill_chunk: a.prefill_chunk.clamp(1, MAX_BATCH),
            kv_budget,
            prefix_cache_budget: a.prompt_cache_mb << 20,
        },
        shutdown_timeout: std::time::Duration::from_secs(a.shutdown_timeout),
        replica_id: a
            .replica_id
            .clone()
            .unwrap_or_else(gemma3_server::host_name),
        lookup: a.spec.lookup(),
    };
    // The server listens (answering /health with 503) while the model loads.
    let model_args = a.model.clone();
    let spec = a.spec.clone();
    let load = move || -> Result<(Model, Option<gemma3_engine::Draft>), String> {
        let model = crate::open_model(&model_args).map_err(|e| format!("{e:#}"))?;
        let draft = spec.draft(&model).map_err(|e| format!("{e:#}"))?;
        Ok((model, draft))
    };
    gemma3_server::run(config, load, |addr| {
        eprintln!("gemma3 serve: listening on http://{addr}");
    })?;
    Ok(())
}
