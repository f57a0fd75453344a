//! The HTTP routes: request bodies in, the OpenAI service's replies (JSON or server-sent
//! events) out; authentication, the drain, replica names and request counts around them.

use crate::error::{ApiError, HttpError};
use crate::metrics::Metrics;
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
use gemma3_engine::{Draft, Model};
use gemma3_openai::api::{self, ChatRequest, CompletionRequest};
use gemma3_openai::service::unix_now;
use gemma3_openai::{Pending, Service, ServiceConfig};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub struct AppState {
    pub config: ServerConfig,
    /// Set on the first SIGTERM: no new generation requests, `/health` 503.
    draining: AtomicBool,
    /// Generation requests whose response (or stream) has not ended yet.
    inflight: Arc<AtomicUsize>,
    /// Sent back in `X-Replica-Id`.
    replica: HeaderValue,
    ready: OnceLock<Service>,
    scheduler_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub metrics: Arc<Metrics>,
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
            config,
            ready: OnceLock::new(),
            scheduler_thread: Mutex::new(None),
            metrics: Arc::new(Metrics::new()),
            started: unix_now(),
        }
    }

    /// Starts serving `model`, drafting with `draft` (the service resolves the context and
    /// name and starts the scheduler).
    pub fn set_ready(&self, model: Model, draft: Option<Draft>) -> Result<(), String> {
        let c = &self.config;
        let config = ServiceConfig {
            model_name: c.model_name.clone(),
            default_sampling: c.default_sampling.clone(),
            scheduler: c.scheduler.clone(),
            lookup: c.lookup.clone(),
            draft,
            allow_image_urls: c.allow_image_urls,
            max_image_pixels: c.max_image_pixels,
        };
        let (service, thread) = Service::start(model, config, self.metrics.clone())?;
        self.metrics.set_model_name(&service.name);
        *self
            .scheduler_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(thread);
        let _ = self.ready.set(service);
        Ok(())
    }

    fn ready(&self) -> Result<&Service, ApiError> {
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
            r.shutdown();
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
    HttpError(ApiError::Internal("the request handler failed".into())).into_response()
}

async fn not_found(req: Request) -> HttpError {
    HttpError(ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    )))
}

async fn method_not_allowed(req: Request) -> HttpError {
    HttpError(ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.uri().path()
    )))
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
            return HttpError(ApiError::Unauthorized).into_response();
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
        return HttpError(ApiError::Unavailable(
            "this server is shutting down and takes no new requests; retry (another replica)"
                .into(),
        ))
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
    type Rejection = HttpError;

    async fn from_request(req: Request, st: &St) -> Result<Self, HttpError> {
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
            HttpError(ApiError::bad(format!(
                "the request body is not valid JSON for this endpoint: {e}"
            )))
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

async fn models(State(st): State<St>) -> Result<Json<Value>, HttpError> {
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
) -> Result<Json<Value>, HttpError> {
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
            )
            .into())
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
) -> Result<Json<Value>, HttpError> {
    let r = st.ready()?;
    let vocab = r.model.tokenizer.vocab_size();
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad_param(
            "tokens",
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        )
        .into());
    }
    let text = r.model.tokenizer.decode(&req.tokens, false);
    Ok(Json(json!({ "content": text, "prompt": text })))
}

/// A chat completion: OpenAI's `/v1/chat/completions`.
async fn chat(
    State(st): State<St>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, HttpError> {
    let pending = st.ready()?.chat(req).await?;
    Ok(respond(pending).await)
}

/// A completion: OpenAI's (legacy) `/v1/completions`.
async fn completions(
    State(st): State<St>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, HttpError> {
    let pending = st.ready()?.completions(req).await?;
    Ok(respond(pending).await)
}

/// The reply as JSON, or as server-sent events ending with `[DONE]`.
async fn respond(pending: Pending) -> Response {
    if !pending.stream() {
        return match pending.reply().collect().await {
            Ok(v) => Json(v).into_response(),
            Err(e) => HttpError(e).into_response(),
        };
    }
    let chunks = pending.chunks();
    let stream = futures_util::stream::unfold(Some(chunks), |state| async move {
        let mut chunks = state?;
        match chunks.next().await {
            Some(v) => Some((Ok(SseEvent::default().data(v.to_string())), Some(chunks))),
            None => Some((Ok(SseEvent::default().data("[DONE]")), None)),
        }
    });
    Sse::<_>::new(stream.map(|e: Result<SseEvent, Infallible>| e))
        .keep_alive(KeepAlive::default())
        .into_response()
}
