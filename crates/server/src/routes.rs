//! The HTTP routes: request bodies in, jobs to the scheduler, responses (JSON or
//! server-sent events) out.

use crate::api::{self, ChatRequest, CompletionRequest, Defaults, Prompts};
use crate::error::ApiError;
use crate::images::ImageSource;
use crate::metrics::Metrics;
use crate::scheduler::{Event, Job, Scheduler, SubmitError, Summary};
use crate::toolcalls;
use crate::ServerConfig;
use axum::body::Bytes;
use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use gemma3_engine::tools::{CallParser, CallSyntax, Tools};
use gemma3_engine::{Grammar, Image, Model, SamplingParams, SeqImages, StopReason, TokenLogprob};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// The model and its scheduler, once loaded.
pub struct Ready {
    pub model: Arc<Model>,
    pub scheduler: Scheduler,
    /// The name `/v1/models` reports.
    pub name: String,
    /// Each sequence's context.
    pub context: usize,
    /// Sampling for fields a request leaves out.
    pub sampling: SamplingParams,
}

pub struct AppState {
    pub config: ServerConfig,
    /// Set on the first SIGTERM: no new generation requests, `/health` 503.
    draining: AtomicBool,
    /// Generation requests whose response (or stream) has not ended yet.
    inflight: Arc<AtomicUsize>,
    /// Sent back in `X-Replica-Id`.
    replica: HeaderValue,
    ready: OnceLock<Ready>,
    scheduler_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub metrics: Arc<Metrics>,
    images: ImageSource,
    next_id: AtomicU64,
    started: u64,
}

impl AppState {
    pub fn new(config: ServerConfig) -> Self {
        let replica = HeaderValue::from_str(&config.replica_id)
            .unwrap_or_else(|_| HeaderValue::from_static("gemma3"));
        AppState {
            draining: AtomicBool::new(false),
            inflight: Arc::new(AtomicUsize::new(0)),
            replica,
            images: ImageSource::new(config.allow_image_urls, config.max_image_pixels),
            config,
            ready: OnceLock::new(),
            scheduler_thread: Mutex::new(None),
            metrics: Arc::new(Metrics::new()),
            next_id: AtomicU64::new(1),
            started: unix_now(),
        }
    }

    /// Starts serving `model`: resolves the context and name, starts the scheduler.
    pub fn set_ready(&self, mut model: Model) -> Result<(), String> {
        let max = model.text.cfg.max_position_embeddings;
        let context = match self.config.scheduler.context {
            Some(0) => return Err("the context size must be at least 1 token".into()),
            Some(c) if c > max => {
                return Err(format!(
                    "the context size {c} is beyond the model's trained context of {max} tokens"
                ))
            }
            Some(c) => c,
            None => max,
        };
        let name = self.config.model_name.clone().unwrap_or_else(|| {
            model
                .source
                .path()
                .file_stem()
                .map_or_else(|| "gemma3".into(), |s| s.to_string_lossy().into_owned())
        });
        // Messages to clients name the model by its alias, never the server's paths.
        model.set_name(name.clone());
        self.metrics.set_model_name(&name);
        let sampling = match &self.config.default_sampling {
            Some(s) => s.clone(),
            None => model.default_sampling(0).map_err(|e| e.to_string())?.params,
        };
        let model = Arc::new(model);
        // The grammar engine's token trie (about a second for Gemma's 262K tokens) is built
        // beside the serving, so the first constrained request does not wait for it.
        {
            let model = model.clone();
            std::thread::spawn(move || {
                if let Err(e) = model.constraints() {
                    tracing::warn!("constrained decoding is unavailable: {e}");
                }
            });
        }
        let mut config = self.config.scheduler.clone();
        config.context = Some(context);
        let (scheduler, thread) = Scheduler::start(model.clone(), config, self.metrics.clone());
        *self
            .scheduler_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(thread);
        let _ = self.ready.set(Ready {
            model,
            scheduler,
            name,
            context,
            sampling,
        });
        Ok(())
    }

    fn ready(&self) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or_else(|| {
            ApiError::Unavailable("the model is still loading; try again shortly".into())
        })
    }

    /// Stops admitting generation requests (503 with Retry-After; `/health` 503) while
    /// those already in flight go on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Generation requests still being answered (streams included).
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Ends every sequence (each stream gets its finish) and stops taking work.
    pub fn shutdown(&self) {
        if let Some(r) = self.ready.get() {
            r.scheduler.shutdown();
        }
    }

    pub fn join_scheduler(&self) {
        let handle = self
            .scheduler_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    fn request_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:x}",
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A seed for a request that gives none: different per request.
    fn fresh_seed(&self) -> u64 {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ self.next_id.fetch_add(1, Ordering::Relaxed).rotate_left(32)
    }
}

type St = Arc<AppState>;

pub fn router(state: St) -> Router {
    let generation = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), admit_work));
    let v1 = Router::new()
        .merge(generation)
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), name_replica))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.config.max_body_bytes,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(state)
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("the request handler failed".into()).into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
}

/// `Authorization: Bearer <key>` on the routes it guards, when the server has a key.
async fn require_key(
    State(st): State<St>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(key) = &st.config.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.trim().as_bytes(), key.as_bytes()) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Generation requests: refused while draining (503 + Retry-After, before any work, so a
/// balancer may send them elsewhere); otherwise counted until their response (or stream)
/// has ended, so that a drain knows when it is done.
async fn admit_work(State(st): State<St>, req: Request, next: Next) -> Response {
    if st.is_draining() {
        return ApiError::Unavailable(
            "this server is shutting down and takes no new requests; retry (another replica)"
                .into(),
        )
        .into_response();
    }
    let guard = Inflight::new(st.inflight.clone());
    let r = next.run(req).await;
    let streamed = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streamed {
        return r;
    }
    // The stream outlives the handler: the count drops when its body is done or dropped.
    let (parts, body) = r.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _ = &guard;
        chunk
    });
    Response::from_parts(parts, axum::body::Body::from_stream(body))
}

/// One generation request in flight.
struct Inflight(Arc<AtomicUsize>);

impl Inflight {
    fn new(n: Arc<AtomicUsize>) -> Inflight {
        n.fetch_add(1, Ordering::SeqCst);
        Inflight(n)
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `X-Replica-Id` on every response: which replica of a fleet answered.
async fn name_replica(State(st): State<St>, req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    r.headers_mut().insert(REPLICA_HEADER, st.replica.clone());
    r
}

/// The header naming the replica that answered.
pub const REPLICA_HEADER: &str = "x-replica-id";

/// Counts every response by route and status.
async fn count_requests(State(st): State<St>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let r = next.run(req).await;
    st.metrics.request(&endpoint, r.status().as_u16());
    r
}

/// A JSON body whose errors are OpenAI-shaped: 413 over the size limit, 400 when malformed.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<St> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &St) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, st).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge {
                    limit: st.config.max_body_bytes,
                }
            } else {
                ApiError::bad(format!("cannot read the request body: {e}"))
            }
        })?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            ApiError::bad(format!(
                "the request body is not valid JSON for this endpoint: {e}"
            ))
        })
    }
}

/// Readiness: 200 while serving, 503 while loading or draining.
async fn health(State(st): State<St>) -> Response {
    let status = match st.ready() {
        Ok(_) if st.is_draining() => "draining",
        Ok(_) => return Json(json!({"status": "ok"})).into_response(),
        Err(_) => "loading",
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": status})),
    )
        .into_response()
}

/// Liveness: 200 while the process answers at all (loading and draining included).
async fn live() -> Json<Value> {
    Json(json!({"status": "alive"}))
}

async fn metrics(State(st): State<St>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

async fn models(State(st): State<St>) -> Result<Json<Value>, ApiError> {
    let r = st.ready()?;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": r.name,
            "object": "model",
            "created": st.started,
            "owned_by": "gemma3",
            "max_model_len": r.context,
            "vision": r.model.vision.is_some(),
        }]
    })))
}

#[derive(serde::Deserialize)]
struct TokenizeRequest {
    #[serde(alias = "prompt")]
    content: Option<String>,
    messages: Option<Vec<api::MessageIn>>,
    #[serde(default = "yes")]
    add_special: bool,
    #[serde(default = "yes")]
    add_generation_prompt: bool,
    #[serde(default)]
    with_pieces: bool,
}

fn yes() -> bool {
    true
}

async fn tokenize(
    State(st): State<St>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    let r = st.ready()?;
    let m = &r.model;
    let ids = match (&req.content, &req.messages) {
        (Some(text), None) => {
            m.encode_prompt(text, Some(req.add_special && m.tokenizer.add_bos()), true)
        }
        (None, Some(msgs)) => {
            let conv = api::conversation(msgs)?;
            let text = m.chat_prompt(&conv.messages, req.add_generation_prompt)?;
            m.encode_chat(&text)
        }
        _ => {
            return Err(ApiError::bad(
                "give either \"content\" (or \"prompt\") text or \"messages\"",
            ))
        }
    };
    let mut out = json!({
        "tokens": ids,
        "count": ids.len(),
        "max_model_len": r.context,
    });
    if req.with_pieces {
        out["pieces"] = ids
            .iter()
            .map(|&i| Value::from(m.tokenizer.id_to_piece(i).unwrap_or("")))
            .collect();
    }
    Ok(Json(out))
}

#[derive(serde::Deserialize)]
struct DetokenizeRequest {
    tokens: Vec<u32>,
}

async fn detokenize(
    State(st): State<St>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    let r = st.ready()?;
    let vocab = r.model.tokenizer.vocab_size();
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad_param(
            "tokens",
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        ));
    }
    let text = r.model.tokenizer.decode(&req.tokens, false);
    Ok(Json(json!({ "content": text, "prompt": text })))
}

/// The new-token limit of a request: as asked (checked against the context), else what
/// the context leaves (at most [`api::MAX_NEW_TOKENS`]).
fn max_new_tokens(
    asked: Option<usize>,
    prompt: usize,
    context: usize,
    allow_zero: bool,
) -> Result<usize, ApiError> {
    match asked {
        Some(0) if !allow_zero => Err(ApiError::bad_param(
            "max_tokens",
            "max_tokens must be at least 1",
        )),
        Some(n) if prompt + n > context => Err(ApiError::bad_param(
            "max_tokens",
            format!(
                "the prompt has {prompt} tokens and max_tokens is {n}: {} in all, more than the context of {context} tokens",
                prompt + n
            ),
        )),
        Some(n) => Ok(n),
        None if prompt >= context => Err(ApiError::bad_param(
            "messages",
            format!("the prompt has {prompt} tokens, which leaves no room in the context of {context} tokens"),
        )),
        None => Ok((context - prompt).min(api::MAX_NEW_TOKENS)),
    }
}

/// A chat request's prompt ids and image rows: the template rendered, images encoded once.
fn chat_prompt(
    model: &Model,
    messages: &[gemma3_text::chat::ChatMessage],
    images: Vec<Image>,
    tools: Option<&Tools>,
) -> Result<(Vec<u32>, Option<SeqImages>), ApiError> {
    let text = match tools {
        Some(t) => model.tools_prompt(messages, t, true)?,
        None => model.chat_prompt(messages, true)?,
    };
    if images.is_empty() {
        return Ok((model.encode_chat(&text), None));
    }
    let views = model.image_views(&images, None)?;
    let bos = !model.starts_with_bos(&text) && model.tokenizer.add_bos();
    let ids = model.image_prompt_ids(&text, &views, Some(bos), true)?;
    let embeds = model.encode_image_views(&ids, &views)?;
    let image_token = model.image_tokens()?.soft;
    Ok((
        ids,
        Some(SeqImages {
            image_token,
            embeds,
        }),
    ))
}

async fn chat(
    State(st): State<St>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let r = st.ready()?;
    let p = &req.params;
    let tools = p.tools()?;
    let mut constraint = p.constraint()?;
    let syntax = r.model.call_syntax();
    let calling = tools.as_ref().filter(|t| t.active());
    if let Some(t) = calling {
        if constraint.is_some() {
            return Err(ApiError::bad(
                "response_format, grammar and regex cannot be combined with tools the model may call (tool_choice \"none\" allows them)",
            ));
        }
        constraint = t.grammar(syntax, &r.model)?;
    }
    let calls = calling.map(|_| syntax);
    check_constraint(r, constraint.as_ref()).await?;
    // Earlier calls and results in the history are written out even without tools.
    let history_has_tools = req
        .messages
        .iter()
        .any(|m| m.role == "tool" || m.tool_calls.as_ref().is_some_and(|c| !c.is_null()));
    let tools = match (tools, history_has_tools) {
        (Some(t), _) => Some(t),
        (None, true) => Some(Tools {
            tools: vec![],
            choice: gemma3_engine::tools::ToolChoice::None,
            parallel: false,
        }),
        (None, false) => None,
    };
    let n = p.n()?;
    let top = match req.logprobs {
        true => Some(api::check_top_logprobs(
            req.top_logprobs.unwrap_or(0),
            "top_logprobs",
        )?),
        false => None,
    };
    let conv = api::conversation(&req.messages)?;
    if !conv.image_urls.is_empty() {
        r.model.vision_tower()?;
    }
    let mut imgs = Vec::with_capacity(conv.image_urls.len());
    for (i, url) in conv.image_urls.iter().enumerate() {
        let bytes = st.images.fetch(url).await?;
        imgs.push(st.images.decode(bytes, i).await?);
    }
    let model = r.model.clone();
    let messages = conv.messages;
    let (ids, seq_images) =
        tokio::task::spawn_blocking(move || chat_prompt(&model, &messages, imgs, tools.as_ref()))
            .await
            .map_err(|e| ApiError::Internal(format!("building the prompt stopped: {e}")))??;
    let max_new = max_new_tokens(p.max_tokens()?, ids.len(), r.context, false)?;
    let defaults = Defaults {
        sampling: &r.sampling,
        lookup: st.config.lookup.as_ref(),
        seed: st.fresh_seed(),
    };
    let (tx, rx) = unbounded_channel();
    let arrived = Instant::now();
    let mut jobs = Vec::with_capacity(n);
    for c in 0..n {
        let mut opts = p.options(&defaults, max_new, top, c)?;
        opts.constraint = constraint.clone();
        jobs.push(Job {
            prompt: ids.clone(),
            images: seq_images.clone(),
            opts,
            choice: c,
            events: tx.clone(),
            arrived,
        });
    }
    drop(tx);
    submit(r, jobs)?;
    let meta = Meta {
        id: st.request_id("chatcmpl"),
        created: unix_now(),
        model: req.model.clone().unwrap_or_else(|| r.name.clone()),
        kind: Kind::Chat,
        choices: n,
        calls,
        prompts: vec![(ids, String::new())],
        echo: false,
        include_usage: p.stream_options.as_ref().is_some_and(|o| o.include_usage),
        arrived,
    };
    Ok(respond(st.clone(), meta, rx, p.stream).await)
}

async fn completions(
    State(st): State<St>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let r = st.ready()?;
    let p = &req.params;
    if p.tools()?.is_some_and(|t| t.active()) {
        return Err(ApiError::bad_param(
            "tools",
            "tools are for /v1/chat/completions",
        ));
    }
    let constraint = p.constraint()?;
    check_constraint(r, constraint.as_ref()).await?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_param(
            "suffix",
            "suffix (insertion) is not supported",
        ));
    }
    let n = p.n()?;
    if req.best_of.is_some_and(|b| b != n) {
        return Err(ApiError::bad_param(
            "best_of",
            "best_of other than n is not supported",
        ));
    }
    let top = req
        .logprobs
        .map(|k| api::check_top_logprobs(k, "logprobs"))
        .transpose()?;
    let prompts: Vec<(Vec<u32>, String)> = match api::prompts(&req.prompt)? {
        Prompts::Texts(t) => t
            .into_iter()
            .map(|s| (r.model.encode_prompt(&s, None, true), s))
            .collect(),
        Prompts::Ids(ids) => ids
            .into_iter()
            .map(|ids| {
                let text = r.model.tokenizer.decode(&ids, true);
                (ids, text)
            })
            .collect(),
    };
    if prompts.len() * n > api::MAX_CHOICES {
        return Err(ApiError::bad_param(
            "n",
            format!(
                "prompts × n is {}; at most {} choices per request",
                prompts.len() * n,
                api::MAX_CHOICES
            ),
        ));
    }
    let vocab = r.model.text.cfg.vocab_size;
    let ctx = r.context;
    let asked = p.max_tokens()?;
    let defaults = Defaults {
        sampling: &r.sampling,
        lookup: st.config.lookup.as_ref(),
        seed: st.fresh_seed(),
    };
    let (tx, rx) = unbounded_channel();
    let arrived = Instant::now();
    let mut jobs = Vec::new();
    for (pi, (ids, _)) in prompts.iter().enumerate() {
        if ids.is_empty() {
            return Err(ApiError::bad_param("prompt", "a prompt has no tokens"));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::bad_param(
                "prompt",
                format!("token id {bad} is outside the vocabulary (size {vocab})"),
            ));
        }
        // With max_tokens 0 (scoring the prompt), one token is still run and dropped.
        let max_new = max_new_tokens(asked, ids.len(), ctx, true)?;
        for c in 0..n {
            let mut opts = p.options(&defaults, max_new.max(1), top, c)?;
            opts.prompt_logprobs = req.echo && top.is_some();
            opts.constraint = constraint.clone();
            if max_new == 0 {
                opts.max_new_tokens = 0;
            }
            jobs.push(Job {
                prompt: ids.clone(),
                images: None,
                opts,
                choice: pi * n + c,
                events: tx.clone(),
                arrived,
            });
        }
    }
    drop(tx);
    let choices = jobs.len();
    submit(r, jobs)?;
    let meta = Meta {
        id: st.request_id("cmpl"),
        created: unix_now(),
        model: req.model.clone().unwrap_or_else(|| r.name.clone()),
        kind: Kind::Completion { n },
        choices,
        calls: None,
        prompts,
        echo: req.echo,
        include_usage: p.stream_options.as_ref().is_some_and(|o| o.include_usage),
        arrived,
    };
    Ok(respond(st.clone(), meta, rx, p.stream).await)
}

/// Compiles a request's grammar before it is queued (on a blocking thread: the scheduler's
/// sequences then take copies of the compiled grammar, never compiling on its thread): one
/// that cannot be compiled is a 400 naming the reason, never an unconstrained answer.
async fn check_constraint(r: &Ready, g: Option<&Grammar>) -> Result<(), ApiError> {
    let Some(g) = g.cloned() else {
        return Ok(());
    };
    let model = r.model.clone();
    tokio::task::spawn_blocking(move || {
        model.constraints()?.matcher(&g)?;
        Ok::<(), gemma3_engine::EngineError>(())
    })
    .await
    .map_err(|e| ApiError::Internal(format!("compiling the grammar stopped: {e}")))??;
    Ok(())
}

fn submit(r: &Ready, jobs: Vec<Job>) -> Result<(), ApiError> {
    r.scheduler.submit(&r.model, jobs).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::Unavailable(format!(
            "the server is busy: {} requests are already waiting; retry later",
            r.scheduler.config.max_queue
        )),
        SubmitError::Stopped => ApiError::Unavailable("the server is shutting down".into()),
        SubmitError::TooLarge { needed, budget } => ApiError::bad(format!(
            "this request needs up to {:.1} MB of KV cache, more than the server's budget of {:.1} MB; ask for fewer tokens",
            needed as f64 / 1e6,
            budget as f64 / 1e6
        )),
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    /// `n` choices per prompt.
    Completion {
        n: usize,
    },
}

/// What a response needs besides the events.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    choices: usize,
    /// The syntax of the model's tool calls, when the request lets it call any.
    calls: Option<CallSyntax>,
    /// Per prompt (one for chat): its ids and its text, for echo.
    prompts: Vec<(Vec<u32>, String)>,
    echo: bool,
    include_usage: bool,
    arrived: Instant,
}

/// One choice as it accumulates.
#[derive(Default)]
struct ChoiceState {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    summary: Option<Summary>,
    failed: Option<String>,
    started: bool,
    /// Splits a streamed reply into content and tool calls.
    parser: Option<CallParser>,
}

fn finish_reason(s: StopReason) -> &'static str {
    match s {
        StopReason::EndOfSequence | StopReason::StopString => "stop",
        StopReason::MaxTokens | StopReason::Context => "length",
        StopReason::Cancelled | StopReason::Aborted => "abort",
    }
}

async fn respond(st: St, meta: Meta, rx: UnboundedReceiver<Event>, stream: bool) -> Response {
    if stream {
        stream_response(st, meta, rx).into_response()
    } else {
        collect_response(st, meta, rx).await
    }
}

async fn collect_response(st: St, meta: Meta, mut rx: UnboundedReceiver<Event>) -> Response {
    let mut choices: Vec<ChoiceState> = (0..meta.choices).map(|_| ChoiceState::default()).collect();
    let mut open = meta.choices;
    while open > 0 {
        let Some(ev) = rx.recv().await else { break };
        match ev {
            Event::Update { choice, update } => {
                let c = &mut choices[choice];
                c.text.push_str(&update.text);
                c.tokens.extend(update.tokens);
                c.logprobs.extend(update.logprobs);
            }
            Event::Done { choice, summary } => {
                choices[choice].summary = Some(summary);
                open -= 1;
            }
            Event::Failed { choice, message } => {
                choices[choice].failed = Some(message);
                open -= 1;
            }
        }
    }
    if let Some(msg) = choices.iter().find_map(|c| c.failed.clone()) {
        log_request(&meta, &choices, 500);
        return ApiError::Internal(msg).into_response();
    }
    let tok = st.ready.get().map(|r| r.model.clone());
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let reason = c.summary.as_ref().map(|s| finish_reason(s.stop));
            match meta.kind {
                Kind::Chat => {
                    let (message, reason) = match meta.calls {
                        Some(syntax) => {
                            let (m, made) = toolcalls::message(syntax, &c.text, &meta.id, i);
                            (m, reason.map(|r| toolcalls::finish_reason(r, made)))
                        }
                        None => (json!({"role": "assistant", "content": c.text}), reason),
                    };
                    json!({
                        "index": i,
                        "message": message,
                        "logprobs": tok.as_ref().filter(|_| !c.logprobs.is_empty()).map(|m| json!({"content": chat_logprobs(m, &c.logprobs)})),
                        "finish_reason": reason,
                    })
                }
                Kind::Completion { n } => {
                    let (text, lp) = completion_text(tok.as_deref(), &meta, i / n, c);
                    json!({"index": i, "text": text, "logprobs": lp, "finish_reason": reason})
                }
            }
        })
        .collect();
    log_request(&meta, &choices, 200);
    let object = match meta.kind {
        Kind::Chat => "chat.completion",
        Kind::Completion { .. } => "text_completion",
    };
    Json(json!({
        "id": meta.id,
        "object": object,
        "created": meta.created,
        "model": meta.model,
        "choices": out,
        "usage": usage(&choices, meta.per_prompt()),
    }))
    .into_response()
}

/// Token counts; choices of one prompt (`per_prompt` of them) count its tokens once.
fn usage(choices: &[ChoiceState], per_prompt: usize) -> Value {
    let mut prompt = 0;
    let mut cached = 0;
    let mut completion = 0;
    for group in choices.chunks(per_prompt.max(1)) {
        let done: Vec<&Summary> = group.iter().filter_map(|c| c.summary.as_ref()).collect();
        prompt += done.iter().map(|s| s.prompt_tokens).max().unwrap_or(0);
        cached += done.iter().map(|s| s.cached_tokens).max().unwrap_or(0);
        completion += done.iter().map(|s| s.completion_tokens).sum::<usize>();
    }
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// A token as text and bytes, as it appears in generated text (control tokens, such as
/// `<bos>`, appear as nothing).
fn token_text(m: &Model, id: u32) -> (String, Vec<u8>) {
    if m.tokenizer.is_control(id) {
        return (String::new(), vec![]);
    }
    let bytes = m.tokenizer.piece_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// Chat logprobs: per token its text, bytes, log-probability and alternatives.
fn chat_logprobs(m: &Model, lps: &[TokenLogprob]) -> Vec<Value> {
    lps.iter()
        .map(|lp| {
            let (t, b) = token_text(m, lp.id);
            json!({
                "token": t,
                "logprob": lp.logprob,
                "bytes": b,
                "top_logprobs": lp.top.iter().map(|&(id, l)| {
                    let (t, b) = token_text(m, id);
                    json!({"token": t, "logprob": l, "bytes": b})
                }).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// Legacy completion logprobs: parallel lists of tokens, their log-probabilities, the
/// alternatives (as token → logprob maps) and each token's character offset in the text.
fn legacy_logprobs(m: &Model, entries: &[(u32, Option<&TokenLogprob>)], offset0: usize) -> Value {
    let mut tokens = vec![];
    let mut lps = vec![];
    let mut tops = vec![];
    let mut offsets = vec![];
    let mut offset = offset0;
    for (id, lp) in entries {
        let (t, _) = token_text(m, *id);
        offsets.push(offset);
        offset += t.chars().count();
        tokens.push(Value::from(t));
        lps.push(lp.map_or(Value::Null, |l| Value::from(l.logprob)));
        tops.push(lp.map_or(Value::Null, |l| {
            let mut o = serde_json::Map::new();
            for &(id, v) in &l.top {
                o.insert(token_text(m, id).0, Value::from(v));
            }
            Value::Object(o)
        }));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// A completion choice's text (after its prompt's, with echo) and legacy logprobs.
fn completion_text(
    m: Option<&Model>,
    meta: &Meta,
    prompt: usize,
    c: &ChoiceState,
) -> (String, Value) {
    let (ids, prompt_text) = &meta.prompts[prompt];
    let mut text = String::new();
    if meta.echo {
        text.push_str(prompt_text);
    }
    text.push_str(&c.text);
    let prompt_lps = c
        .summary
        .as_ref()
        .map_or(&[][..], |s| &s.prompt_logprobs[..]);
    let Some(m) = m.filter(|_| !c.logprobs.is_empty() || !prompt_lps.is_empty()) else {
        return (text, Value::Null);
    };
    let mut entries: Vec<(u32, Option<&TokenLogprob>)> = vec![];
    if meta.echo {
        // The first prompt token has no log-probability (nothing comes before it).
        entries.extend(
            ids.iter()
                .enumerate()
                .map(|(i, &id)| (id, i.checked_sub(1).and_then(|j| prompt_lps.get(j)))),
        );
    }
    entries.extend(c.logprobs.iter().map(|l| (l.id, Some(l))));
    (text, legacy_logprobs(m, &entries, 0))
}

fn log_request(meta: &Meta, choices: &[ChoiceState], status: u16) {
    let prompt: usize = choices
        .iter()
        .filter_map(|c| c.summary.as_ref())
        .map(|s| s.prompt_tokens)
        .max()
        .unwrap_or(0);
    let generated: usize = choices.iter().map(|c| c.tokens.len()).sum();
    let ttft = choices
        .iter()
        .filter_map(|c| c.summary.as_ref().and_then(|s| s.ttft))
        .fold(f64::NAN, f64::min);
    let decode = choices
        .iter()
        .filter_map(|c| c.summary.as_ref())
        .map(|s| s.decode_secs)
        .fold(0.0, f64::max);
    let tps = if decode > 0.0 {
        generated.saturating_sub(choices.len()) as f64 / decode
    } else {
        0.0
    };
    tracing::info!(
        id = %meta.id,
        status,
        prompt_tokens = prompt,
        generated_tokens = generated,
        ttft_ms = (ttft * 1000.0).round(),
        tokens_per_s = (tps * 10.0).round() / 10.0,
        total_ms = meta.arrived.elapsed().as_millis() as u64,
        "request"
    );
}

fn stream_response(
    st: St,
    meta: Meta,
    rx: UnboundedReceiver<Event>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let choices: Vec<ChoiceState> = (0..meta.choices).map(|_| ChoiceState::default()).collect();
    let state = StreamState {
        st,
        meta,
        rx,
        choices,
        open: 0,
        done: false,
        queue: std::collections::VecDeque::new(),
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(ev) = s.queue.pop_front() {
                return Some((Ok(ev), s));
            }
            if s.done {
                return None;
            }
            s.pump().await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

struct StreamState {
    st: St,
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    choices: Vec<ChoiceState>,
    /// Choices finished so far.
    open: usize,
    done: bool,
    queue: std::collections::VecDeque<SseEvent>,
}

impl Meta {
    /// Choices per prompt.
    fn per_prompt(&self) -> usize {
        match self.kind {
            Kind::Chat => self.choices,
            Kind::Completion { n } => n,
        }
    }
}

impl StreamState {
    /// A stream chunk's envelope around `choices`.
    fn envelope(&self, choices: Value) -> Value {
        let object = match self.meta.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion { .. } => "text_completion",
        };
        json!({
            "id": self.meta.id,
            "object": object,
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": choices,
        })
    }

    fn chunk(&self, choice: Value) -> SseEvent {
        SseEvent::default().data(self.envelope(json!([choice])).to_string())
    }

    /// Waits for the next event and queues what it means for the client.
    async fn pump(&mut self) {
        let model = self.st.ready.get().map(|r| r.model.clone());
        let Some(ev) = self.rx.recv().await else {
            self.finish();
            return;
        };
        match ev {
            Event::Update { choice, update } => {
                if self.meta.kind == Kind::Chat && !self.choices[choice].started {
                    self.choices[choice].started = true;
                    let c = json!({"index": choice, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                    self.queue.push_back(self.chunk(c));
                }
                let lp = match (&model, update.logprobs.is_empty()) {
                    (Some(m), false) => match self.meta.kind {
                        Kind::Chat => json!({"content": chat_logprobs(m, &update.logprobs)}),
                        Kind::Completion { .. } => {
                            let e: Vec<_> =
                                update.logprobs.iter().map(|l| (l.id, Some(l))).collect();
                            let off = self.choices[choice].text.chars().count();
                            legacy_logprobs(m, &e, off)
                        }
                    },
                    _ => Value::Null,
                };
                if let (Some(syntax), Kind::Chat) = (self.meta.calls, self.meta.kind) {
                    let parser = self.choices[choice]
                        .parser
                        .get_or_insert_with(|| CallParser::new(syntax));
                    let events = parser.push(&update.text);
                    self.call_deltas(choice, events, lp);
                } else if !update.text.is_empty() || !lp.is_null() {
                    let c = match self.meta.kind {
                        Kind::Chat => {
                            json!({"index": choice, "delta": {"content": update.text}, "logprobs": lp, "finish_reason": null})
                        }
                        Kind::Completion { .. } => {
                            json!({"index": choice, "text": update.text, "logprobs": lp, "finish_reason": null})
                        }
                    };
                    self.queue.push_back(self.chunk(c));
                }
                let c = &mut self.choices[choice];
                c.text.push_str(&update.text);
                c.tokens.extend(update.tokens);
                c.logprobs.extend(update.logprobs);
            }
            Event::Done { choice, summary } => {
                let mut reason = finish_reason(summary.stop);
                if let Some(mut parser) = self.choices[choice].parser.take() {
                    let events = parser.finish();
                    self.call_deltas(choice, events, Value::Null);
                    reason = toolcalls::finish_reason(reason, !parser.calls().is_empty());
                }
                let c = match self.meta.kind {
                    Kind::Chat => {
                        json!({"index": choice, "delta": {}, "logprobs": null, "finish_reason": reason})
                    }
                    Kind::Completion { .. } => {
                        json!({"index": choice, "text": "", "logprobs": null, "finish_reason": reason})
                    }
                };
                self.queue.push_back(self.chunk(c));
                self.choices[choice].summary = Some(summary);
                self.open += 1;
            }
            Event::Failed { choice, message } => {
                // The choice ends with a finish reason, then the error.
                let c = match self.meta.kind {
                    Kind::Chat => {
                        json!({"index": choice, "delta": {}, "logprobs": null, "finish_reason": "abort"})
                    }
                    Kind::Completion { .. } => {
                        json!({"index": choice, "text": "", "logprobs": null, "finish_reason": "abort"})
                    }
                };
                self.queue.push_back(self.chunk(c));
                let e = ApiError::Internal(message.clone()).body();
                self.queue
                    .push_back(SseEvent::default().data(e.to_string()));
                self.choices[choice].failed = Some(message);
                self.open += 1;
            }
        }
        if self.open == self.meta.choices {
            self.finish();
        }
    }

    /// Queues a chat delta per call event (content, a call's start, a piece of its
    /// arguments); log-probabilities ride on the first, or on an empty delta.
    fn call_deltas(
        &mut self,
        choice: usize,
        events: Vec<gemma3_engine::tools::CallEvent>,
        lp: Value,
    ) {
        let mut lp = Some(lp).filter(|l| !l.is_null());
        let deltas = toolcalls::deltas(events, &self.meta.id, choice);
        if deltas.is_empty() {
            if let Some(l) = lp.take() {
                let c = json!({"index": choice, "delta": {}, "logprobs": l, "finish_reason": null});
                self.queue.push_back(self.chunk(c));
            }
            return;
        }
        for d in deltas {
            let c =
                json!({"index": choice, "delta": d, "logprobs": lp.take(), "finish_reason": null});
            self.queue.push_back(self.chunk(c));
        }
    }

    fn finish(&mut self) {
        if self.done {
            return;
        }
        if self.meta.include_usage {
            let mut v = self.envelope(json!([]));
            v["usage"] = usage(&self.choices, self.meta.per_prompt());
            self.queue
                .push_back(SseEvent::default().data(v.to_string()));
        }
        self.queue.push_back(SseEvent::default().data("[DONE]"));
        let status = if self.choices.iter().any(|c| c.failed.is_some()) {
            500
        } else {
            200
        };
        log_request(&self.meta, &self.choices, status);
        self.done = true;
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
