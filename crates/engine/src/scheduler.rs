//! Continuous batching. One engine thread owns the running sequences: between forward
//! passes it admits queued requests (up to `parallel` sequences, within the KV budget),
//! then runs one pass over all of them (decode rows of the running ones, a prompt chunk of
//! the newly admitted), and sends each its new text. A request whose client went away is
//! cancelled and its slot freed. Finished sequences leave their KV cache in a prefix cache
//! (LRU within a byte budget), so a request that starts with an earlier one's tokens (the
//! next turn of a chat) computes only its new tokens.
//!
//! Every front end that serves many callers at once (the HTTP server, the Python module's
//! threads) submits [`Job`]s here and reads [`Event`]s back; what it counts goes to an
//! [`Observer`] (the server's Prometheus metrics).

use crate::{Batch, GenerateOptions, Model, SeqImages, Sequence, StopReason, TokenLogprob, Update};
use gemma3_model::{KvCache, MAX_BATCH};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// What the scheduler reports as it works (a front end's metrics); every method does
/// nothing by default.
pub trait Observer: Send + Sync {
    /// A sequence started, with `prompt` tokens of which `cached` came from the prefix cache.
    fn admitted(&self, _prompt: usize, _cached: usize) {}
    /// A sequence produced `n` tokens; `first` is its time to first token (seconds) when
    /// these are its first, `gap` the time since its previous tokens otherwise.
    fn generated(&self, _n: usize, _first: Option<f64>, _gap: Option<f64>) {}
    /// A sequence ended after `secs`, having drafted and accepted these many guesses.
    fn finished(&self, _secs: f64, _drafted: usize, _accepted: usize) {}
    /// After each pass: queue and batch sizes, KV bytes held and the budget.
    fn load(&self, _waiting: usize, _running: usize, _kv_bytes: usize, _kv_budget: usize) {}
    /// Bytes held by the prefix cache.
    fn prefix_cache(&self, _bytes: usize) {}
}

/// An observer that counts nothing.
pub struct Unobserved;
impl Observer for Unobserved {}

/// How the scheduler runs.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Sequences generated at once.
    pub parallel: usize,
    /// Requests (choices) that may wait for a slot; beyond that new ones get 503.
    pub max_queue: usize,
    /// Context of each sequence, in tokens (the model's trained length when None).
    pub context: Option<usize>,
    /// Prompt tokens per forward pass.
    pub prefill_chunk: usize,
    /// Bytes of KV cache the running sequences may hold at most (counted at their worst
    /// case, prompt plus max new tokens).
    pub kv_budget: usize,
    /// Bytes of KV cache kept for prefix reuse after sequences finish.
    pub prefix_cache_budget: usize,
}

/// Sequences generated at once unless a front end says otherwise.
pub const DEFAULT_PARALLEL: usize = 16;
/// Choices that may wait for a slot by default.
pub const DEFAULT_MAX_QUEUE: usize = 256;
/// Prompt tokens per forward pass by default: a new prompt delays running sequences by at
/// most one such chunk per step.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;
/// Bytes of finished sequences' KV cache kept for prefix reuse by default.
pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 1 << 30;
/// The KV budget where the available memory cannot be read.
const FALLBACK_KV_BUDGET: usize = 8 << 30;

impl SchedulerConfig {
    /// The default KV budget: half the memory available now.
    pub fn default_kv_budget() -> usize {
        crate::generate::available_memory().map_or(FALLBACK_KV_BUDGET, |m| m / 2)
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            parallel: DEFAULT_PARALLEL,
            max_queue: DEFAULT_MAX_QUEUE,
            context: None,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            kv_budget: Self::default_kv_budget(),
            prefix_cache_budget: DEFAULT_PREFIX_CACHE_BYTES,
        }
    }
}

/// One choice of a request.
pub struct Job {
    pub prompt: Vec<u32>,
    pub images: Option<SeqImages>,
    pub opts: GenerateOptions,
    /// Index of the choice in its request's response.
    pub choice: usize,
    pub events: UnboundedSender<Event>,
    /// When the request arrived (for the time to first token).
    pub arrived: Instant,
}

/// What a request's handler receives about one of its choices.
pub enum Event {
    Update { choice: usize, update: Update },
    Done { choice: usize, summary: Summary },
    Failed { choice: usize, message: String },
}

/// A finished choice.
#[derive(Clone, Debug)]
pub struct Summary {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub stop: StopReason,
    pub ttft: Option<f64>,
    pub decode_secs: f64,
    pub prompt_logprobs: Vec<TokenLogprob>,
}

enum Msg {
    Submit(Vec<Job>),
    Shutdown,
}

/// The handlers' side: submits jobs, reads queue depth.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Msg>,
    queued: Arc<AtomicUsize>,
    pub config: SchedulerConfig,
    /// Each sequence's context (resolved).
    pub context: usize,
}

/// Why a job was not queued.
#[derive(Debug)]
pub enum SubmitError {
    QueueFull,
    Stopped,
    /// One sequence would need more KV cache than the whole budget.
    TooLarge {
        needed: usize,
        budget: usize,
    },
}

impl Scheduler {
    /// Starts the engine thread for `model`.
    pub fn start(
        model: Arc<Model>,
        config: SchedulerConfig,
        observer: Arc<dyn Observer>,
    ) -> (Scheduler, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let context = config
            .context
            .unwrap_or(model.text.cfg.max_position_embeddings);
        let engine = Engine {
            context,
            batch: Batch::new(&model, config.prefill_chunk),
            prefix: PrefixCache::new(config.prefix_cache_budget),
            model,
            config: config.clone(),
            rx,
            queued: queued.clone(),
            observer,
            waiting: VecDeque::new(),
            running: Vec::new(),
        };
        let handle = std::thread::Builder::new()
            .name("gemma3-scheduler".into())
            .spawn(move || engine.run())
            .expect("spawning the scheduler thread");
        (
            Scheduler {
                tx,
                queued,
                config,
                context,
            },
            handle,
        )
    }

    /// Bytes of KV cache a sequence of `tokens` positions holds at most.
    pub fn kv_bytes(&self, model: &Model, tokens: usize) -> usize {
        model
            .text
            .new_cache(self.context, MAX_BATCH)
            .bytes_at(tokens)
    }

    /// Queues a request's choices, or says why not (all or none are queued).
    pub fn submit(&self, model: &Model, jobs: Vec<Job>) -> Result<(), SubmitError> {
        for j in &jobs {
            let needed = self.kv_bytes(model, j.prompt.len() + j.opts.max_new_tokens);
            if needed > self.config.kv_budget {
                return Err(SubmitError::TooLarge {
                    needed,
                    budget: self.config.kv_budget,
                });
            }
        }
        let n = jobs.len();
        let prev = self.queued.fetch_add(n, Ordering::SeqCst);
        if prev + n > self.config.max_queue {
            self.queued.fetch_sub(n, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        self.tx.send(Msg::Submit(jobs)).map_err(|_| {
            self.queued.fetch_sub(n, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }

    /// Ends every sequence (each stream gets its last event) and stops the thread.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Msg::Shutdown);
    }
}

struct Running {
    seq: Sequence,
    choice: usize,
    events: UnboundedSender<Event>,
    arrived: Instant,
    /// KV bytes reserved for its worst case.
    reserved: usize,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

struct Engine {
    model: Arc<Model>,
    context: usize,
    config: SchedulerConfig,
    rx: mpsc::Receiver<Msg>,
    queued: Arc<AtomicUsize>,
    observer: Arc<dyn Observer>,
    batch: Batch,
    prefix: PrefixCache,
    waiting: VecDeque<Job>,
    running: Vec<Running>,
}

impl Engine {
    fn run(mut self) {
        loop {
            // Idle: block for work. Busy: take what arrived since the last pass.
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(m) => {
                        if !self.handle(m) {
                            return self.stop();
                        }
                    }
                    Err(_) => return self.stop(),
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(m) => {
                        if !self.handle(m) {
                            return self.stop();
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return self.stop(),
                }
            }
            self.admit();
            self.step();
            self.publish();
        }
    }

    /// False on shutdown.
    fn handle(&mut self, m: Msg) -> bool {
        match m {
            Msg::Submit(jobs) => {
                self.waiting.extend(jobs);
                true
            }
            Msg::Shutdown => false,
        }
    }

    /// An empty cache for one sequence (allocates nothing until used).
    fn new_cache(&self) -> KvCache {
        self.model.text.new_cache(self.context, MAX_BATCH)
    }

    fn reserved(&self) -> usize {
        self.running.iter().map(|r| r.reserved).sum()
    }

    /// Moves queued jobs into free slots while their worst-case KV fits the budget.
    fn admit(&mut self) {
        // Jobs whose client already left never start.
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.events.is_closed());
        self.dequeued(before - self.waiting.len());
        while self.running.len() < self.config.parallel {
            let Some(job) = self.waiting.front() else {
                break;
            };
            let worst = job.prompt.len() + job.opts.max_new_tokens;
            let reserve = self.new_cache().bytes_at(worst);
            if !self.running.is_empty() && self.reserved() + reserve > self.config.kv_budget {
                break;
            }
            let job = self.waiting.pop_front().expect("front exists");
            self.dequeued(1);
            let (cache, cached) = self
                .prefix
                .take(&job.prompt)
                .unwrap_or_else(|| (self.new_cache(), Vec::new()));
            match Sequence::new(
                &self.model,
                job.prompt,
                job.images,
                &job.opts,
                cache,
                cached,
            ) {
                Ok(seq) => {
                    let g = seq.generation();
                    self.observer.admitted(g.prompt_tokens, g.reused_tokens);
                    self.running.push(Running {
                        seq,
                        choice: job.choice,
                        events: job.events,
                        arrived: job.arrived,
                        reserved: reserve,
                        first_token: None,
                        last_token: None,
                    });
                }
                Err(e) => {
                    let _ = job.events.send(Event::Failed {
                        choice: job.choice,
                        message: e.to_string(),
                    });
                }
            }
        }
    }

    fn dequeued(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::SeqCst);
    }

    /// One forward pass over every running sequence.
    fn step(&mut self) {
        for r in &mut self.running {
            if r.events.is_closed() {
                r.seq.cancel();
            }
        }
        let mut seqs: Vec<&mut Sequence> = self
            .running
            .iter_mut()
            .filter(|r| !r.seq.is_finished())
            .map(|r| &mut r.seq)
            .collect();
        if seqs.is_empty() {
            return;
        }
        if let Err(e) = self.batch.step(&self.model, &mut seqs) {
            // A pass that fails fails for every sequence in it: end them with the error
            // (inputs were checked on admission, so this is not expected).
            tracing::error!("forward pass failed: {e}");
            for r in &mut self.running {
                if !r.seq.is_finished() {
                    let _ = r.events.send(Event::Failed {
                        choice: r.choice,
                        message: format!("generation failed: {e}"),
                    });
                    r.seq.cancel();
                }
            }
        }
    }

    /// Sends each sequence its news; retires the finished ones.
    fn publish(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.running.len() {
            let r = &mut self.running[i];
            let u = r.seq.take_update();
            if !u.tokens.is_empty() {
                let (first, gap) = match r.last_token {
                    None => {
                        r.first_token = Some(now);
                        (Some((now - r.arrived).as_secs_f64()), None)
                    }
                    Some(t) => (None, Some((now - t).as_secs_f64())),
                };
                self.observer.generated(u.tokens.len(), first, gap);
                r.last_token = Some(now);
            }
            let finished = u.finished;
            if !u.text.is_empty() || !u.tokens.is_empty() || finished.is_some() {
                let _ = r.events.send(Event::Update {
                    choice: r.choice,
                    update: u,
                });
            }
            if let Some(stop) = finished {
                let r = self.running.swap_remove(i);
                let g = r.seq.generation();
                self.observer
                    .finished((now - r.arrived).as_secs_f64(), g.drafted, g.accepted);
                if let Some(message) = g.error.clone() {
                    // Ended by a failure (the output constraint's): an error, not a reply.
                    let _ = r.events.send(Event::Failed {
                        choice: r.choice,
                        message,
                    });
                    continue;
                }
                let summary = Summary {
                    prompt_tokens: g.prompt_tokens,
                    cached_tokens: g.reused_tokens,
                    completion_tokens: g.tokens.len(),
                    stop,
                    ttft: r.first_token.map(|t| (t - r.arrived).as_secs_f64()),
                    decode_secs: g.decode_secs,
                    prompt_logprobs: r.seq.prompt_logprobs().to_vec(),
                };
                let _ = r.events.send(Event::Done {
                    choice: r.choice,
                    summary,
                });
                let (cache, tokens) = r.seq.into_cache();
                self.prefix.put(tokens, cache);
                continue;
            }
            i += 1;
        }
        let kv_bytes = self.running.iter().map(|r| r.seq.cache_bytes()).sum();
        self.observer.load(
            self.waiting.len(),
            self.running.len(),
            kv_bytes,
            self.config.kv_budget,
        );
        self.observer.prefix_cache(self.prefix.bytes());
    }

    /// Shutdown: every running and waiting choice ends now.
    fn stop(mut self) {
        // What was generated goes out; then each unfinished choice ends with an error.
        self.publish();
        for r in self.running.drain(..) {
            let _ = r.events.send(Event::Failed {
                choice: r.choice,
                message: "the engine shut down before this request finished".into(),
            });
        }
        for j in self.waiting.drain(..) {
            let _ = j.events.send(Event::Failed {
                choice: j.choice,
                message: "the engine is shutting down".into(),
            });
        }
        self.observer.load(0, 0, 0, self.config.kv_budget);
    }
}

/// Finished sequences' caches, by the tokens they hold, least recently used first out.
struct PrefixCache {
    entries: Vec<(Vec<u32>, KvCache)>,
    budget: usize,
}

/// A cached prefix is worth taking only if it shares more than this many tokens (BOS and a
/// template's opening are shared by everything).
const MIN_SHARED_PREFIX: usize = 4;

impl PrefixCache {
    fn new(budget: usize) -> Self {
        PrefixCache {
            entries: Vec::new(),
            budget,
        }
    }

    fn bytes(&self) -> usize {
        self.entries.iter().map(|(_, c)| c.bytes()).sum()
    }

    /// The cache sharing the longest prefix with `prompt`, taken out.
    fn take(&mut self, prompt: &[u32]) -> Option<(KvCache, Vec<u32>)> {
        let (best, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (t, _))| (i, t.iter().zip(prompt).take_while(|(a, b)| a == b).count()))
            .max_by_key(|&(i, n)| (n, i))?;
        if shared <= MIN_SHARED_PREFIX {
            return None;
        }
        let (tokens, cache) = self.entries.remove(best);
        Some((cache, tokens))
    }

    /// Keeps a finished sequence's cache, most recent last; the oldest go when over budget.
    fn put(&mut self, tokens: Vec<u32>, cache: KvCache) {
        if tokens.len() <= MIN_SHARED_PREFIX || cache.bytes() > self.budget {
            return;
        }
        self.entries.push((tokens, cache));
        while self.bytes() > self.budget && !self.entries.is_empty() {
            self.entries.remove(0);
        }
    }
}
