//! gemma3's Python front end: the native module `gemma3._gemma3` under the `gemma3`
//! package (whose Python code gives the public API: `Model`, `pipeline`, asyncio forms).
//!
//! It only translates. A model opens as the CLI opens one; generation goes through
//! `gemma3_openai`'s service, exactly as the HTTP server's requests do, so every Python
//! thread's requests are batched together by the engine's scheduler and the replies are
//! the dicts the server returns. Every wait releases the GIL and looks for Ctrl-C between
//! events; no Rust panic crosses into Python (each entry point turns one into
//! `gemma3.Error`). It must not know HTTP, and it prints nothing.

use gemma3_engine::scheduler::{SchedulerConfig, Unobserved};
use gemma3_engine::{EngineError, Image, Model, OpenOptions};
use gemma3_model::ImageInputs;
use gemma3_openai::api::{ChatRequest, CompletionRequest, MessageIn};
use gemma3_openai::{ApiError, Chunks, Reply, Service, ServiceConfig};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::Duration;

create_exception!(
    _gemma3,
    Error,
    PyException,
    "Every error gemma3 raises; the message is the engine's."
);
create_exception!(
    _gemma3,
    ModelNotFoundError,
    Error,
    "The model name or path cannot be found, downloaded or read."
);
create_exception!(
    _gemma3,
    BadRequestError,
    Error,
    "A request the engine refuses: a bad argument, schema, image or message."
);
create_exception!(
    _gemma3,
    ContextOverflowError,
    BadRequestError,
    "The prompt and the new tokens asked for do not fit the context."
);
create_exception!(
    _gemma3,
    UnavailableError,
    Error,
    "The engine is busy (its queue is full) or shutting down; retry later."
);
create_exception!(
    _gemma3,
    GenerationError,
    Error,
    "Generation failed after it started."
);

/// How long a wait runs with the GIL released before it looks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

fn api_error(e: ApiError) -> PyErr {
    let msg = e.to_string();
    match e {
        ApiError::ContextOverflow { .. } => ContextOverflowError::new_err(msg),
        ApiError::BadRequest { .. } | ApiError::TooLarge { .. } => BadRequestError::new_err(msg),
        ApiError::Unavailable(_) => UnavailableError::new_err(msg),
        ApiError::NotFound(_) => ModelNotFoundError::new_err(msg),
        _ => GenerationError::new_err(msg),
    }
}

fn engine_error(e: EngineError) -> PyErr {
    match e {
        EngineError::Hub(_) => ModelNotFoundError::new_err(e.to_string()),
        EngineError::Load(_)
        | EngineError::Format(_)
        | EngineError::Convert(_)
        | EngineError::DraftIncompatible(_) => Error::new_err(e.to_string()),
        other => api_error(other.into()),
    }
}

/// Runs `f`, turning a panic into `gemma3.Error` (a bug, reported, never a crash).
fn shielded<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("unknown");
        Err(Error::new_err(format!("internal error in gemma3: {what}")))
    })
}

/// The model, its service (scheduler thread) and the runtime that drives the service's
/// futures from Python's threads.
struct Inner {
    service: Service,
    rt: tokio::runtime::Runtime,
    scheduler: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.service.shutdown();
        let handle = self
            .scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// Sizes rayon's global pool once per process (the first model's `threads`).
fn start_pool(threads: Option<usize>) -> PyResult<()> {
    let Some(t) = threads else { return Ok(()) };
    if t == 0 {
        return Err(BadRequestError::new_err("threads must be at least 1"));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t = t.min(cores);
    if rayon::ThreadPoolBuilder::new()
        .num_threads(t)
        .build_global()
        .is_err()
        && rayon::current_num_threads() != t
    {
        return Err(BadRequestError::new_err(format!(
            "this process already computes on {} threads (set when its first model opened); threads={t} cannot change that",
            rayon::current_num_threads()
        )));
    }
    Ok(())
}

/// What opening a model takes, as `gemma3.Model`'s keyword arguments give it.
struct Open {
    model: Option<String>,
    mmproj: Option<String>,
    ctx_size: Option<usize>,
    cache_type: Option<String>,
    quantize: Option<String>,
    exact: bool,
    chat_template: Option<String>,
    parallel: usize,
    max_queue: usize,
    speculative: bool,
    draft: Option<String>,
}

fn open_model(o: &Open) -> Result<Model, PyErr> {
    let quantize = o
        .quantize
        .as_deref()
        .map(str::parse::<gemma3_model::FileType>)
        .transpose()
        .map_err(|e| BadRequestError::new_err(format!("quantize: {e}")))?;
    let opts = OpenOptions {
        mmproj: o.mmproj.clone().map(Into::into),
        quantize,
        ..Default::default()
    };
    let mut model = Model::open_with(o.model.as_deref(), &opts).map_err(engine_error)?;
    if o.exact {
        model.set_precision(gemma3_model::Precision::Exact);
    }
    if let Some(t) = &o.cache_type {
        let ty = gemma3_model::KvTypes::parse_type(t)
            .map_err(|e| BadRequestError::new_err(format!("cache_type: {e}")))?;
        model
            .set_cache_types(gemma3_model::KvTypes { k: ty, v: ty })
            .map_err(engine_error)?;
    }
    if let Some(source) = &o.chat_template {
        model.set_chat_template(source).map_err(engine_error)?;
    }
    Ok(model)
}

/// The draft model `name` (any form `model` takes), checked against `target`.
fn open_draft(target: &Model, name: &str) -> Result<gemma3_engine::Draft, PyErr> {
    let named = |e: EngineError| {
        let msg = format!("the draft model {name}: {e}");
        match e {
            EngineError::Hub(_) => ModelNotFoundError::new_err(msg),
            EngineError::DraftIncompatible(_) => BadRequestError::new_err(msg),
            _ => Error::new_err(msg),
        }
    };
    gemma3_engine::Draft::open(target, name, &OpenOptions::default(), Default::default())
        .map_err(named)
}

/// The engine behind one `gemma3.Model`.
#[pyclass(frozen, module = "gemma3._gemma3")]
struct Engine {
    inner: Arc<Inner>,
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (model=None, *, mmproj=None, ctx_size=None, threads=None, cache_type=None, quantize=None, exact=false, chat_template=None, parallel=gemma3_engine::scheduler::DEFAULT_PARALLEL, max_queue=gemma3_engine::scheduler::DEFAULT_MAX_QUEUE, speculative=true, draft=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: Option<String>,
        mmproj: Option<String>,
        ctx_size: Option<usize>,
        threads: Option<usize>,
        cache_type: Option<String>,
        quantize: Option<String>,
        exact: bool,
        chat_template: Option<String>,
        parallel: usize,
        max_queue: usize,
        speculative: bool,
        draft: Option<String>,
    ) -> PyResult<Engine> {
        shielded(|| {
            start_pool(threads)?;
            if parallel == 0 {
                return Err(BadRequestError::new_err("parallel must be at least 1"));
            }
            let o = Open {
                model,
                mmproj,
                ctx_size,
                cache_type,
                quantize,
                exact,
                chat_template,
                parallel,
                max_queue,
                speculative,
                draft,
            };
            py.detach(|| start(&o)).map(|inner| Engine {
                inner: Arc::new(inner),
            })
        })
    }

    /// Token ids of `text`.
    #[pyo3(signature = (text, add_bos=true, special=true))]
    fn tokenize(&self, text: &str, add_bos: bool, special: bool) -> PyResult<Vec<u32>> {
        shielded(|| Ok(self.model().encode_prompt(text, Some(add_bos), special)))
    }

    /// The text of token ids (special tokens written out unless `skip_special`).
    #[pyo3(signature = (ids, skip_special=false))]
    fn detokenize(&self, ids: Vec<u32>, skip_special: bool) -> PyResult<String> {
        shielded(|| {
            let m = self.model();
            let vocab = m.tokenizer.vocab_size();
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(BadRequestError::new_err(format!(
                    "token id {bad} is outside the vocabulary (size {vocab})"
                )));
            }
            Ok(m.tokenizer.decode(&ids, skip_special))
        })
    }

    /// Every position's logits (positions × vocabulary, float32) for token ids, or for a
    /// text prompt with images at its markers.
    #[pyo3(signature = (ids=None, prompt=None, images=Vec::new()))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        ids: Option<Vec<u32>>,
        prompt: Option<String>,
        images: Vec<Vec<u8>>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let rows = shielded(|| py.detach(|| self.all_logits(ids, prompt, &images)))?;
        Ok(rows.into_pyarray(py))
    }

    /// `messages` (JSON, OpenAI's shape) in the model's chat template.
    #[pyo3(signature = (messages_json, add_generation_prompt=true))]
    fn apply_chat_template(
        &self,
        messages_json: &str,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        shielded(|| {
            let messages: Vec<MessageIn> = serde_json::from_str(messages_json)
                .map_err(|e| BadRequestError::new_err(format!("messages: {e}")))?;
            let conv = gemma3_openai::api::conversation(&messages).map_err(api_error)?;
            self.model()
                .chat_prompt(&conv.messages, add_generation_prompt)
                .map_err(engine_error)
        })
    }

    /// What the model is (JSON): `gemma3 info`'s facts.
    fn info(&self) -> PyResult<String> {
        shielded(|| Ok(self.model().summary(self.inner.service.context).to_string()))
    }

    /// Queues a request (`kind` "chat" or "completion", the body as JSON, images as
    /// encoded bytes for a completion's text prompt) and returns its reply handle.
    #[pyo3(signature = (kind, request_json, images=Vec::new()))]
    fn submit(
        &self,
        py: Python<'_>,
        kind: &str,
        request_json: &str,
        images: Vec<Vec<u8>>,
    ) -> PyResult<Handle> {
        shielded(|| {
            let inner = &self.inner;
            let bad = |e: serde_json::Error| BadRequestError::new_err(format!("the request: {e}"));
            let pending = match kind {
                "chat" => {
                    let req: ChatRequest = serde_json::from_str(request_json).map_err(bad)?;
                    py.detach(|| inner.rt.block_on(inner.service.chat(req)))
                }
                "completion" => {
                    let req: CompletionRequest = serde_json::from_str(request_json).map_err(bad)?;
                    let images = decode_images(&images)?;
                    py.detach(|| {
                        inner
                            .rt
                            .block_on(inner.service.completions_with_images(req, images))
                    })
                }
                other => {
                    return Err(BadRequestError::new_err(format!(
                        "unknown request kind {other:?}"
                    )))
                }
            }
            .map_err(api_error)?;
            let reading = match pending.stream() {
                true => Reading::Chunks(pending.chunks()),
                false => Reading::Reply(pending.reply()),
            };
            Ok(Handle {
                inner: self.inner.clone(),
                reading: Mutex::new(Some(reading)),
            })
        })
    }

    /// The context of each sequence, in tokens.
    #[getter]
    fn context(&self) -> usize {
        self.inner.service.context
    }

    /// The name replies report.
    #[getter]
    fn name(&self) -> String {
        self.inner.service.name.clone()
    }
}

fn start(o: &Open) -> PyResult<Inner> {
    let model = open_model(o)?;
    let context = model.context(o.ctx_size).map_err(engine_error)?;
    let config = ServiceConfig {
        model_name: None,
        default_sampling: None,
        scheduler: SchedulerConfig {
            parallel: o.parallel,
            max_queue: o.max_queue,
            context: Some(context),
            ..Default::default()
        },
        lookup: (o.speculative && o.draft.is_none()).then(gemma3_engine::Lookup::default),
        draft: match (&o.draft, o.speculative) {
            (Some(name), true) => Some(open_draft(&model, name)?),
            _ => None,
        },
        allow_image_urls: true,
        max_image_pixels: gemma3_engine::image::DEFAULT_MAX_IMAGE_PIXELS,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gemma3-py")
        .enable_all()
        .build()
        .map_err(|e| Error::new_err(format!("starting the runtime: {e}")))?;
    let (service, thread) = {
        let _guard = rt.enter();
        Service::start(model, config, Arc::new(Unobserved)).map_err(Error::new_err)?
    };
    Ok(Inner {
        service,
        rt,
        scheduler: Mutex::new(Some(thread)),
    })
}

fn decode_images(images: &[Vec<u8>]) -> PyResult<Vec<Image>> {
    images
        .iter()
        .enumerate()
        .map(|(i, b)| {
            Image::decode_limited(b, gemma3_engine::image::DEFAULT_MAX_IMAGE_PIXELS)
                .map_err(|e| BadRequestError::new_err(format!("image {}: {e}", i + 1)))
        })
        .collect()
}

impl Engine {
    fn model(&self) -> &Model {
        &self.inner.service.model
    }

    fn all_logits(
        &self,
        ids: Option<Vec<u32>>,
        prompt: Option<String>,
        images: &[Vec<u8>],
    ) -> PyResult<Array2<f32>> {
        let m = self.model();
        let images = decode_images(images)?;
        let p = match (ids, prompt) {
            (Some(ids), None) if images.is_empty() => gemma3_engine::PromptInputs {
                ids,
                images: None,
                image_secs: 0.0,
            },
            (None, Some(text)) => m
                .prompt_inputs(&text, &images, None, None, true, None)
                .map_err(engine_error)?,
            _ => {
                return Err(BadRequestError::new_err(
                    "give token ids, or a text prompt (with any images)",
                ))
            }
        };
        let vocab = m.text.cfg.vocab_size;
        let mut out = vec![0f32; p.ids.len() * vocab];
        let inputs = p.images.as_ref().map(|im| ImageInputs {
            image_token: im.image_token,
            embeds: &im.embeds,
        });
        m.logits(&p.ids, inputs, &mut |row, l| {
            out[row * vocab..(row + 1) * vocab].copy_from_slice(l);
        })
        .map_err(engine_error)?;
        Array2::from_shape_vec((p.ids.len(), vocab), out)
            .map_err(|e| Error::new_err(format!("logits: {e}")))
    }
}

enum Reading {
    Chunks(Chunks),
    Reply(Reply),
}

/// One request's reply: stream chunks one by one, or the whole response.
#[pyclass(module = "gemma3._gemma3")]
struct Handle {
    inner: Arc<Inner>,
    reading: Mutex<Option<Reading>>,
}

#[pymethods]
impl Handle {
    /// The next stream chunk (JSON), or None after the last.
    fn next_chunk(&self, py: Python<'_>) -> PyResult<Option<String>> {
        shielded(|| loop {
            let polled = py.detach(|| {
                let mut guard = self.reading.lock().unwrap_or_else(|e| e.into_inner());
                let Some(Reading::Chunks(chunks)) = guard.as_mut() else {
                    return Ok(None);
                };
                let rt = &self.inner.rt;
                match rt.block_on(async { tokio::time::timeout(SIGNAL_POLL, chunks.next()).await })
                {
                    Ok(Some(v)) => Ok(Some(v.to_string())),
                    Ok(None) => {
                        *guard = None;
                        Ok(None)
                    }
                    Err(_) => Err(()),
                }
            });
            match polled {
                Ok(v) => return Ok(v),
                Err(()) => self.check_signals(py)?,
            }
        })
    }

    /// The whole response (JSON), once every choice has ended.
    fn result(&self, py: Python<'_>) -> PyResult<String> {
        shielded(|| loop {
            let done = py.detach(|| {
                let mut guard = self.reading.lock().unwrap_or_else(|e| e.into_inner());
                let Some(Reading::Reply(reply)) = guard.as_mut() else {
                    return Some(Err(Error::new_err("this reply was already read")));
                };
                match self
                    .inner
                    .rt
                    .block_on(async { tokio::time::timeout(SIGNAL_POLL, reply.recv()).await })
                {
                    Ok(true) | Err(_) => None,
                    Ok(false) => {
                        let Some(Reading::Reply(reply)) = guard.take() else {
                            unreachable!("checked above");
                        };
                        Some(reply.finish().map(|v| v.to_string()).map_err(api_error))
                    }
                }
            });
            match done {
                Some(r) => return r,
                None => self.check_signals(py)?,
            }
        })
    }

    /// Stops the request: its sequence ends at the next step and frees its slot.
    fn cancel(&self) {
        self.reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

impl Handle {
    /// Ctrl-C (or any signal handler that raises) cancels the request and raises.
    fn check_signals(&self, py: Python<'_>) -> PyResult<()> {
        py.check_signals().inspect_err(|_| self.cancel())
    }
}

#[pymodule]
fn _gemma3(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Engine>()?;
    m.add_class::<Handle>()?;
    m.add("Error", py.get_type::<Error>())?;
    m.add("ModelNotFoundError", py.get_type::<ModelNotFoundError>())?;
    m.add("BadRequestError", py.get_type::<BadRequestError>())?;
    m.add(
        "ContextOverflowError",
        py.get_type::<ContextOverflowError>(),
    )?;
    m.add("UnavailableError", py.get_type::<UnavailableError>())?;
    m.add("GenerationError", py.get_type::<GenerationError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
