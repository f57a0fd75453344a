//! Prometheus metrics (`GET /metrics`): requests by endpoint and status, prompt and
//! generated tokens, queue depth, active sequences, KV cache bytes, time to first token and
//! inter-token latency.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gemma3");
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
        Metrics { registry, ..m }
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
