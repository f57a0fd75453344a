//! Prometheus metrics (`GET /metrics`): requests by endpoint and status, prompt and
//! generated tokens, queue depth, active sequences, KV cache bytes, time to first token and
//! inter-token latency; and the same facts under vLLM's names (`vllm:num_requests_waiting`,
//! `vllm:kv_cache_usage_perc`, ...), labelled with `model_name`, which fleet tools (HPA and
//! KEDA rules, the Gateway API inference extension's endpoint picker) read unchanged.

use gemma3_engine::scheduler::Observer;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model_name: String,
}

/// Time-to-first-token buckets: 1 ms .. ~65 s.
fn ttft_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Request latency buckets: 10 ms .. ~20 min.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 17))
}

/// vLLM's metrics, by model name.
struct Fleet {
    waiting: Family<ModelLabel, Gauge>,
    running: Family<ModelLabel, Gauge>,
    kv_usage: Family<ModelLabel, Gauge<f64, AtomicU64>>,
    prompt_tokens: Family<ModelLabel, Counter>,
    generation_tokens: Family<ModelLabel, Counter>,
    draft_tokens: Family<ModelLabel, Counter>,
    accepted_tokens: Family<ModelLabel, Counter>,
    ttft: Family<ModelLabel, Histogram, fn() -> Histogram>,
    e2e: Family<ModelLabel, Histogram, fn() -> Histogram>,
}

/// One model's series of the vLLM metrics (made once the model's name is known).
#[derive(Clone)]
struct FleetSeries {
    waiting: Gauge,
    running: Gauge,
    kv_usage: Gauge<f64, AtomicU64>,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    draft_tokens: Counter,
    accepted_tokens: Counter,
    ttft: Histogram,
    e2e: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub prompt_tokens: Counter,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub queue_depth: Gauge,
    pub active_sequences: Gauge,
    pub kv_cache_bytes: Gauge,
    pub prefix_cache_bytes: Gauge,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    fleet: Fleet,
    series: OnceLock<FleetSeries>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        let fleet = Fleet {
            waiting: Family::default(),
            running: Family::default(),
            kv_usage: Family::default(),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            draft_tokens: Family::default(),
            accepted_tokens: Family::default(),
            ttft: Family::new_with_constructor(ttft_buckets),
            e2e: Family::new_with_constructor(latency_buckets),
        };
        root.register(
            "vllm:num_requests_waiting",
            "Requests waiting for a slot",
            fleet.waiting.clone(),
        );
        root.register(
            "vllm:num_requests_running",
            "Requests being generated",
            fleet.running.clone(),
        );
        root.register(
            "vllm:kv_cache_usage_perc",
            "Fraction of the KV cache budget in use (1 = full)",
            fleet.kv_usage.clone(),
        );
        root.register(
            "vllm:prompt_tokens",
            "Prompt tokens of admitted requests",
            fleet.prompt_tokens.clone(),
        );
        root.register(
            "vllm:generation_tokens",
            "Generated tokens",
            fleet.generation_tokens.clone(),
        );
        root.register(
            "vllm:spec_decode_num_draft_tokens",
            "Tokens guessed by speculative decoding",
            fleet.draft_tokens.clone(),
        );
        root.register(
            "vllm:spec_decode_num_accepted_tokens",
            "Guessed tokens the model accepted",
            fleet.accepted_tokens.clone(),
        );
        root.register(
            "vllm:time_to_first_token_seconds",
            "Time from a request's arrival to its first token",
            fleet.ttft.clone(),
        );
        root.register(
            "vllm:e2e_request_latency_seconds",
            "Time from a request's arrival to its end",
            fleet.e2e.clone(),
        );
        let registry = root.sub_registry_with_prefix("gemma3");
        let m = Metrics {
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            cached_prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            queue_depth: Gauge::default(),
            active_sequences: Gauge::default(),
            kv_cache_bytes: Gauge::default(),
            prefix_cache_bytes: Gauge::default(),
            // 1 ms .. ~65 s
            time_to_first_token: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            // 0.5 ms .. ~8 s
            inter_token_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            registry: Registry::default(),
            fleet,
            series: OnceLock::new(),
        };
        registry.register(
            "requests",
            "HTTP requests by endpoint and status",
            m.requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of admitted requests",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "cached_prompt_tokens",
            "Prompt tokens reused from the prefix cache",
            m.cached_prompt_tokens.clone(),
        );
        registry.register(
            "generated_tokens",
            "Generated tokens",
            m.generated_tokens.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for a slot",
            m.queue_depth.clone(),
        );
        registry.register(
            "active_sequences",
            "Sequences being generated",
            m.active_sequences.clone(),
        );
        registry.register(
            "kv_cache_bytes",
            "Bytes of KV cache held by active sequences",
            m.kv_cache_bytes.clone(),
        );
        registry.register(
            "prefix_cache_bytes",
            "Bytes of KV cache kept for prefix reuse",
            m.prefix_cache_bytes.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Time between consecutive generated tokens of a sequence",
            m.inter_token_latency.clone(),
        );
        Metrics {
            registry: root,
            ..m
        }
    }

    /// Names the model the vLLM metrics are labelled with (once; later calls are ignored).
    pub fn set_model_name(&self, name: &str) {
        let l = ModelLabel {
            model_name: name.to_string(),
        };
        let f = &self.fleet;
        let _ = self.series.set(FleetSeries {
            waiting: f.waiting.get_or_create(&l).clone(),
            running: f.running.get_or_create(&l).clone(),
            kv_usage: f.kv_usage.get_or_create(&l).clone(),
            prompt_tokens: f.prompt_tokens.get_or_create(&l).clone(),
            generation_tokens: f.generation_tokens.get_or_create(&l).clone(),
            draft_tokens: f.draft_tokens.get_or_create(&l).clone(),
            accepted_tokens: f.accepted_tokens.get_or_create(&l).clone(),
            ttft: f.ttft.get_or_create(&l).clone(),
            e2e: f.e2e.get_or_create(&l).clone(),
        });
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_string(),
                status,
            })
            .inc();
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// The scheduler reports into these metrics.
impl Observer for Metrics {
    /// A request was admitted with `prompt` tokens, `cached` of them from the prefix cache.
    fn admitted(&self, prompt: usize, cached: usize) {
        self.prompt_tokens.inc_by(prompt as u64);
        self.cached_prompt_tokens.inc_by(cached as u64);
        if let Some(s) = self.series.get() {
            s.prompt_tokens.inc_by(prompt as u64);
        }
    }

    /// `n` tokens were generated; `first` is the time to the first token when these are
    /// a request's first, `gap` the time since its previous token otherwise.
    fn generated(&self, n: usize, first: Option<f64>, gap: Option<f64>) {
        self.generated_tokens.inc_by(n as u64);
        if let Some(t) = first {
            self.time_to_first_token.observe(t);
        }
        if let Some(t) = gap {
            self.inter_token_latency.observe(t);
        }
        if let Some(s) = self.series.get() {
            s.generation_tokens.inc_by(n as u64);
            if let Some(t) = first {
                s.ttft.observe(t);
            }
        }
    }

    /// A request ended `secs` after it arrived, with `drafted` tokens guessed by
    /// speculative decoding and `accepted` of them kept.
    fn finished(&self, secs: f64, drafted: usize, accepted: usize) {
        if let Some(s) = self.series.get() {
            s.e2e.observe(secs);
            s.draft_tokens.inc_by(drafted as u64);
            s.accepted_tokens.inc_by(accepted as u64);
        }
    }

    /// The scheduler's load after a pass.
    fn load(&self, waiting: usize, running: usize, kv_bytes: usize, kv_budget: usize) {
        self.queue_depth.set(waiting as i64);
        self.active_sequences.set(running as i64);
        self.kv_cache_bytes.set(kv_bytes as i64);
        if let Some(s) = self.series.get() {
            s.waiting.set(waiting as i64);
            s.running.set(running as i64);
            s.kv_usage.set(kv_bytes as f64 / kv_budget.max(1) as f64);
        }
    }

    fn prefix_cache(&self, bytes: usize) {
        self.prefix_cache_bytes.set(bytes as i64);
    }
}
