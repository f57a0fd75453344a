//! The OpenAI-compatible service over one model: a request (chat or completion) checked,
//! its prompt built, its choices queued on the engine's scheduler, and a [`Pending`] reply
//! whose events become the response or its stream chunks. The HTTP server and the Python
//! module both answer through this one piece of code.

use crate::api::{self, ChatRequest, CompletionRequest, Defaults, Prompts};
use crate::error::ApiError;
use crate::images::ImageSource;
use crate::reply::{Kind, Meta, Pending};
use gemma3_engine::scheduler::{Event, Job, Observer, Scheduler, SchedulerConfig, SubmitError};
use gemma3_engine::tools::Tools;
use gemma3_engine::{Draft, Grammar, Image, Lookup, Model, PromptInputs, SamplingParams};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// How a service answers.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// The name responses report (the model file's name when None).
    pub model_name: Option<String>,
    /// Sampling for fields a request leaves out; the model's defaults when None.
    pub default_sampling: Option<SamplingParams>,
    pub scheduler: SchedulerConfig,
    /// Speculative decoding by prompt lookup for every request that does not opt out.
    pub lookup: Option<Lookup>,
    /// Speculative decoding with this draft model (instead of prompt lookup) for every
    /// request that does not opt out.
    pub draft: Option<Draft>,
    /// Fetch `http(s)` image URLs (data: URLs are always read).
    pub allow_image_urls: bool,
    /// The most pixels an image may have (checked from its header before decoding).
    pub max_image_pixels: u64,
}

/// A model being served: its scheduler, name, context and defaults.
pub struct Service {
    pub model: Arc<Model>,
    pub scheduler: Scheduler,
    /// The name responses report.
    pub name: String,
    /// Each sequence's context.
    pub context: usize,
    /// Sampling for fields a request leaves out.
    pub sampling: SamplingParams,
    lookup: Option<Lookup>,
    draft: Option<Draft>,
    images: ImageSource,
    next_id: AtomicU64,
}

impl Service {
    /// Starts serving `model`: resolves the context and name, starts the scheduler thread
    /// (returned, to be joined after [`shutdown`](Self::shutdown)).
    pub fn start(
        mut model: Model,
        config: ServiceConfig,
        observer: Arc<dyn Observer>,
    ) -> Result<(Service, std::thread::JoinHandle<()>), String> {
        let max = model.text.cfg.max_position_embeddings;
        let context = match config.scheduler.context {
            Some(0) => return Err("the context size must be at least 1 token".into()),
            Some(c) if c > max => {
                return Err(format!(
                    "the context size {c} is beyond the model's trained context of {max} tokens"
                ))
            }
            Some(c) => c,
            None => max,
        };
        let name = config.model_name.clone().unwrap_or_else(|| {
            model
                .source
                .path()
                .file_stem()
                .map_or_else(|| "gemma3".into(), |s| s.to_string_lossy().into_owned())
        });
        // Messages to clients name the model by its alias, never the host's paths.
        model.set_name(name.clone());
        let sampling = match &config.default_sampling {
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
        let mut sched = config.scheduler.clone();
        sched.context = Some(context);
        let (scheduler, thread) = Scheduler::start(model.clone(), sched, observer);
        let service = Service {
            model,
            scheduler,
            name,
            context,
            sampling,
            lookup: config.lookup,
            draft: config.draft,
            images: ImageSource::new(config.allow_image_urls, config.max_image_pixels),
            next_id: AtomicU64::new(1),
        };
        Ok((service, thread))
    }

    /// Ends every sequence (each reply gets its last event) and stops taking work.
    pub fn shutdown(&self) {
        self.scheduler.shutdown();
    }

    fn request_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:x}",
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// What the service's configuration brings to a request, with a seed for a request
    /// that gives none (different per request).
    fn defaults(&self) -> Defaults<'_> {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Defaults {
            sampling: &self.sampling,
            lookup: self.lookup.as_ref(),
            draft: self.draft.as_ref(),
            seed: t ^ self.next_id.fetch_add(1, Ordering::Relaxed).rotate_left(32),
        }
    }

    fn pending(&self, meta: Meta, rx: UnboundedReceiver<Event>, stream: bool) -> Pending {
        Pending::new(self.model.clone(), meta, rx, stream)
    }

    /// Starts a chat completion: the request checked, its prompt rendered and images
    /// encoded, its choices queued. A bad request is an error before anything is queued.
    pub async fn chat(&self, req: ChatRequest) -> Result<Pending, ApiError> {
        let r = self;
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
        self.check_constraint(constraint.as_ref()).await?;
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
            let bytes = self.images.fetch(url).await?;
            imgs.push(self.images.decode(bytes, i).await?);
        }
        let model = r.model.clone();
        let messages = conv.messages;
        let asked = p.max_tokens()?;
        let fits = (asked.unwrap_or(1), r.context);
        let prompt = tokio::task::spawn_blocking(move || {
            chat_prompt(&model, &messages, &imgs, tools.as_ref(), fits)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("building the prompt stopped: {e}")))??;
        let (ids, seq_images) = (prompt.ids, prompt.images);
        let max_new = max_new_tokens(asked, ids.len(), r.context, false)?;
        let defaults = self.defaults();
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
        self.submit(jobs)?;
        let meta = Meta {
            id: self.request_id("chatcmpl"),
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
        Ok(self.pending(meta, rx, p.stream))
    }

    /// Starts a (legacy) completion.
    pub async fn completions(&self, req: CompletionRequest) -> Result<Pending, ApiError> {
        self.completions_with_images(req, Vec::new()).await
    }

    /// [`completions`](Self::completions) with images shown at a text prompt's
    /// `<start_of_image>` markers (added in front when missing): the library's `generate`.
    pub async fn completions_with_images(
        &self,
        req: CompletionRequest,
        images: Vec<Image>,
    ) -> Result<Pending, ApiError> {
        let r = self;
        let p = &req.params;
        if p.tools()?.is_some_and(|t| t.active()) {
            return Err(ApiError::bad_param(
                "tools",
                "tools are for /v1/chat/completions",
            ));
        }
        let constraint = p.constraint()?;
        self.check_constraint(constraint.as_ref()).await?;
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
        let mut seq_images = None;
        let prompts: Vec<(Vec<u32>, String)> = match api::prompts(&req.prompt)? {
            Prompts::Texts(t) if !images.is_empty() => {
                let [text] = <[String; 1]>::try_from(t).map_err(|_| {
                    ApiError::bad_param("prompt", "images go with a single text prompt")
                })?;
                let model = r.model.clone();
                let fits = (p.max_tokens()?.unwrap_or(1).max(1), r.context);
                let t = text.clone();
                let prompt = tokio::task::spawn_blocking(move || {
                    model.prompt_inputs(&t, &images, None, None, true, Some(fits))
                })
                .await
                .map_err(|e| ApiError::Internal(format!("building the prompt stopped: {e}")))??;
                seq_images = prompt.images;
                vec![(prompt.ids, text)]
            }
            Prompts::Ids(_) if !images.is_empty() => {
                return Err(ApiError::bad_param(
                    "prompt",
                    "images go with a text prompt, not token ids",
                ))
            }
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
        let defaults = self.defaults();
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
                    images: seq_images.clone(),
                    opts,
                    choice: pi * n + c,
                    events: tx.clone(),
                    arrived,
                });
            }
        }
        drop(tx);
        let choices = jobs.len();
        self.submit(jobs)?;
        let meta = Meta {
            id: self.request_id("cmpl"),
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
        Ok(self.pending(meta, rx, p.stream))
    }

    /// Compiles a request's grammar before it is queued (on a blocking thread: the scheduler's
    /// sequences then take copies of the compiled grammar, never compiling on its thread): one
    /// that cannot be compiled is a 400 naming the reason, never an unconstrained answer.
    async fn check_constraint(&self, g: Option<&Grammar>) -> Result<(), ApiError> {
        let Some(g) = g.cloned() else {
            return Ok(());
        };
        let model = self.model.clone();
        tokio::task::spawn_blocking(move || {
            model.constraints()?.matcher(&g)?;
            Ok::<(), gemma3_engine::EngineError>(())
        })
        .await
        .map_err(|e| ApiError::Internal(format!("compiling the grammar stopped: {e}")))??;
        Ok(())
    }

    fn submit(&self, jobs: Vec<Job>) -> Result<(), ApiError> {
        let r = self;
        r.scheduler.submit(&r.model, jobs).map_err(|e| match e {
            SubmitError::QueueFull => ApiError::Unavailable(format!(
                "busy: {} requests are already waiting; retry later",
                r.scheduler.config.max_queue
            )),
            SubmitError::Stopped => ApiError::Unavailable("shutting down: no new requests are taken".into()),
            SubmitError::TooLarge { needed, budget } => ApiError::bad(format!(
                "this request needs up to {:.1} MB of KV cache, more than the server's budget of {:.1} MB; ask for fewer tokens",
                needed as f64 / 1e6,
                budget as f64 / 1e6
            )),
        })
    }
}

/// The new-token limit of a request: as asked (checked against the context), else what
/// the context leaves (at most [`crate::api::MAX_NEW_TOKENS`]).
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
        Some(n) if prompt + n > context => Err(ApiError::ContextOverflow {
            param: Some("max_tokens"),
            message: format!(
                "the prompt has {prompt} tokens and max_tokens is {n}: {} in all, more than the context of {context} tokens",
                prompt + n
            ),
        }),
        Some(n) => Ok(n),
        None if prompt >= context => Err(ApiError::ContextOverflow {
            param: Some("messages"),
            message: format!("the prompt has {prompt} tokens, which leaves no room in the context of {context} tokens"),
        }),
        None => Ok((context - prompt).min(crate::api::MAX_NEW_TOKENS)),
    }
}

/// A chat request's prompt ids and image rows: the template rendered, images encoded once.
/// `fits` = (new tokens, context) is checked before the images are encoded.
pub fn chat_prompt(
    model: &Model,
    messages: &[gemma3_text::chat::ChatMessage],
    images: &[Image],
    tools: Option<&Tools>,
    fits: (usize, usize),
) -> Result<PromptInputs, ApiError> {
    let text = match tools {
        Some(t) => model.tools_prompt(messages, t, true)?,
        None => model.chat_prompt(messages, true)?,
    };
    if images.is_empty() {
        return Ok(PromptInputs {
            ids: model.encode_chat(&text),
            images: None,
            image_secs: 0.0,
        });
    }
    let bos = !model.starts_with_bos(&text) && model.tokenizer.add_bos();
    Ok(model.prompt_inputs(&text, images, None, Some(bos), true, Some(fits))?)
}

/// Seconds since the Unix epoch (a response's `created`).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
