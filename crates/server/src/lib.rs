//! gemma3's OpenAI-compatible HTTP server: `/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, `/tokenize`, `/detokenize`, `/health` and `/metrics`, on axum and tokio.
//! Generation requests go to `gemma3_openai`'s service, whose replies it sends as JSON or
//! server-sent events; the engine's scheduler runs every active sequence in shared forward
//! passes on its own thread (continuous batching), so the engine's work never blocks the
//! async runtime. The server listens before the model is loaded (`/health`
//! answers 503 until it is; `/live` 200 throughout). SIGTERM or Ctrl-C drains: new
//! generation requests get 503 with Retry-After and `/health` 503, those in flight finish
//! (up to the shutdown timeout, after which they end with an error event), then the process
//! exits 0; a second signal ends everything at once. Every response names its replica in
//! `X-Replica-Id`, and `/metrics` carries vLLM's metric names for fleet tools.

pub mod error;
pub mod metrics;
mod routes;

use gemma3_engine::scheduler::SchedulerConfig;
use gemma3_engine::{Draft, Model, SamplingParams};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long a shutdown waits for open streams and connections before exiting anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Default largest request body: room for a few images as data URLs.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 << 20;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// The name `/v1/models` reports (requests may name any model; there is one); the
    /// model file's name when None.
    pub model_name: Option<String>,
    /// Bearer token every `/v1` route (and `/tokenize`, `/detokenize`) requires.
    pub api_key: Option<String>,
    /// Fetch `http(s)` image URLs (data: URLs are always read).
    pub allow_image_urls: bool,
    /// The most pixels an image may have (checked from its header before decoding).
    pub max_image_pixels: u64,
    pub max_body_bytes: usize,
    /// Sampling for fields a request leaves out; the model's defaults (its
    /// generation_config, Ollama parameters, or Gemma's published settings) when None.
    pub default_sampling: Option<SamplingParams>,
    pub scheduler: SchedulerConfig,
    /// How long a drain (the first SIGTERM or Ctrl-C) lets running and queued requests
    /// finish before ending them with an error.
    pub shutdown_timeout: Duration,
    /// This replica's name in `X-Replica-Id` (a fleet's balancer logs and tests read it).
    pub replica_id: String,
    /// Speculative decoding by prompt lookup for every request that does not opt out
    /// (None: off).
    pub lookup: Option<gemma3_engine::Lookup>,
}

/// The default drain time, as Kubernetes' default grace period leaves room for.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// This machine's host name (Kubernetes' pod name), for the default replica id.
pub fn host_name() -> String {
    let from_env = ["HOSTNAME", "COMPUTERNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()));
    from_env
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gemma3".into())
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {err}")]
    Bind { addr: String, err: std::io::Error },
    #[error("loading the model failed: {0}")]
    Load(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the server until SIGTERM or Ctrl-C. `load` opens the model and, for speculative
/// decoding, a draft model checked against it (on a blocking thread, while the server
/// already answers `/health` with 503); `on_listening` is told the address once bound
/// (port 0 picks a free one).
pub fn run(
    config: ServerConfig,
    load: impl FnOnce() -> Result<(Model, Option<Draft>), String> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gemma3-http")
        .build()?;
    rt.block_on(serve(config, load, on_listening))
}

async fn serve(
    config: ServerConfig,
    load: impl FnOnce() -> Result<(Model, Option<Draft>), String> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|err| ServerError::Bind {
            addr: addr.clone(),
            err,
        })?;
    let local = listener.local_addr()?;
    on_listening(local);
    tracing::info!("listening on http://{local}");
    let config_timeout = config.shutdown_timeout;
    let state = Arc::new(routes::AppState::new(config));
    let app = routes::router(state.clone());

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(None::<String>);
    // Load the model beside the server; a failure stops it.
    {
        let state = state.clone();
        let stop_tx = stop_tx.clone();
        tokio::task::spawn_blocking(move || {
            let t0 = std::time::Instant::now();
            match load().and_then(|(model, draft)| state.set_ready(model, draft)) {
                Ok(()) => {
                    tracing::info!("model loaded in {:.1} s", t0.elapsed().as_secs_f64());
                }
                Err(e) => {
                    tracing::error!("{e}");
                    let _ = stop_tx.send(Some(e));
                }
            }
        });
    }
    // SIGTERM / Ctrl-C: drain, then stop; a second signal stops at once.
    {
        let stop_tx = stop_tx.clone();
        let state = state.clone();
        let timeout = config_timeout;
        tokio::spawn(async move {
            shutdown_signal().await;
            drain(&state, timeout).await;
            let _ = stop_tx.send(Some(String::new()));
        });
    }
    let shutdown = {
        let state = state.clone();
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|v| v.is_some()).await;
            state.shutdown();
        }
    };
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown);
    let deadline = async {
        let _ = stop_rx.wait_for(|v| v.is_some()).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        r = server => r?,
        _ = deadline => tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}: exiting"),
    }
    let reason = stop_tx.borrow().clone();
    state.join_scheduler();
    match reason {
        Some(e) if !e.is_empty() => Err(ServerError::Load(e)),
        _ => Ok(()),
    }
}

/// How often a drain looks whether the last request has ended.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Stops admitting work and waits until what was admitted has been answered, the timeout
/// passes, or a second signal comes.
async fn drain(state: &routes::AppState, timeout: Duration) {
    state.start_draining();
    let t0 = std::time::Instant::now();
    tracing::info!(
        "draining: {} requests in flight; up to {:.0} s (a second signal stops at once)",
        state.inflight(),
        timeout.as_secs_f64()
    );
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let second = shutdown_signal();
    tokio::pin!(second);
    loop {
        if state.inflight() == 0 {
            tracing::info!("drained in {:.1} s", t0.elapsed().as_secs_f64());
            return;
        }
        tokio::select! {
            _ = &mut second => {
                tracing::warn!("second signal: ending {} requests now", state.inflight());
                return;
            }
            _ = &mut deadline => {
                tracing::warn!(
                    "{} requests still running after the shutdown timeout: ending them",
                    state.inflight()
                );
                return;
            }
            _ = tokio::time::sleep(DRAIN_POLL) => {}
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = ctrl_c => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
    // Windows: Ctrl-C, Ctrl-Break, the console closing, or the system shutting down. A
    // handler that cannot be installed never fires.
    #[cfg(windows)]
    {
        use tokio::signal::windows::{ctrl_break, ctrl_close, ctrl_shutdown};
        macro_rules! fired {
            ($signal:expr) => {
                async {
                    match $signal {
                        Ok(mut s) => {
                            s.recv().await;
                        }
                        Err(_) => std::future::pending::<()>().await,
                    }
                }
            };
        }
        tokio::select! {
            _ = ctrl_c => {}
            _ = fired!(ctrl_break()) => {}
            _ = fired!(ctrl_close()) => {}
            _ = fired!(ctrl_shutdown()) => {}
        }
    }
    #[cfg(not(any(unix, windows)))]
    {
        let _ = ctrl_c.await;
    }
}
