//! The generation service's Prometheus metrics, labelled by model: time to
//! first token, tokens in and out, batch size, queue depth, active sequences,
//! finished requests by reason, the paged KV cache's blocks and the prefix
//! cache's hits (hit rate = `generation_prefix_cache_hit_tokens_total` /
//! `generation_prefix_cache_lookup_tokens_total`).

use std::sync::OnceLock;

use moltbot_runtime::metrics::{LATENCY_BUCKETS_SECONDS, registry};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts};

/// Every generation metric.
#[derive(Clone)]
pub struct Metrics {
    /// Seconds from request receipt to the first token, by model.
    pub time_to_first_token: HistogramVec,
    /// Tokens processed, by model and kind (`prompt` or `completion`).
    pub tokens: IntCounterVec,
    /// Sequences per decode step, by model.
    pub batch_size: HistogramVec,
    /// Seconds per decode step, by model.
    pub step_seconds: HistogramVec,
    /// Requests waiting for a batch slot, by model.
    pub queue_depth: IntGaugeVec,
    /// Sequences in the running batch, by model.
    pub active_sequences: IntGaugeVec,
    /// The batch's capacity in sequences (`max_batch_size`), by model: the
    /// denominator of the "concurrent sessions over 80 % of capacity" alert
    /// (deploy/prometheus/alerts.yml).
    pub max_sequences: IntGaugeVec,
    /// Finished requests by model and reason (`stop`, `length`,
    /// `cancelled`, `error`).
    pub requests: IntCounterVec,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub prefix_cache_hit_tokens: IntCounterVec,
    /// Prompt tokens looked up in the prefix cache (every admitted prompt).
    pub prefix_cache_lookup_tokens: IntCounterVec,
    /// KV-cache blocks by model and state (`used`, `cached`, `free`).
    pub kv_cache_blocks: IntGaugeVec,
    /// Seconds per prefill chunk, by model.
    pub prefill_chunk_seconds: HistogramVec,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The metrics, registered in the process registry on first use.
#[allow(clippy::expect_used)] // static, valid names: construction cannot fail
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(|| {
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["model"])
                .expect("valid metric")
        };
        let m = Metrics {
            time_to_first_token: hist(
                "generation_time_to_first_token_seconds",
                "Seconds from request receipt to the first generated token",
                LATENCY_BUCKETS_SECONDS.to_vec(),
            ),
            tokens: IntCounterVec::new(
                Opts::new("generation_tokens_total", "Tokens processed, by kind"),
                &["model", "kind"],
            )
            .expect("valid metric"),
            batch_size: hist(
                "generation_batch_size",
                "Sequences advanced by one decode step",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
            ),
            step_seconds: hist(
                "generation_step_seconds",
                "Seconds per batched decode step",
                LATENCY_BUCKETS_SECONDS.to_vec(),
            ),
            queue_depth: IntGaugeVec::new(
                Opts::new(
                    "generation_queue_depth",
                    "Requests waiting for a batch slot",
                ),
                &["model"],
            )
            .expect("valid metric"),
            active_sequences: IntGaugeVec::new(
                Opts::new(
                    "generation_active_sequences",
                    "Sequences in the running batch",
                ),
                &["model"],
            )
            .expect("valid metric"),
            requests: IntCounterVec::new(
                Opts::new("generation_requests_total", "Finished requests, by reason"),
                &["model", "reason"],
            )
            .expect("valid metric"),
            prefix_cache_hit_tokens: IntCounterVec::new(
                Opts::new(
                    "generation_prefix_cache_hit_tokens_total",
                    "Prompt tokens served from the prefix cache instead of prefill",
                ),
                &["model"],
            )
            .expect("valid metric"),
            prefix_cache_lookup_tokens: IntCounterVec::new(
                Opts::new(
                    "generation_prefix_cache_lookup_tokens_total",
                    "Prompt tokens looked up in the prefix cache",
                ),
                &["model"],
            )
            .expect("valid metric"),
            max_sequences: IntGaugeVec::new(
                Opts::new(
                    "generation_max_sequences",
                    "Most sequences the running batch holds (max_batch_size)",
                ),
                &["model"],
            )
            .expect("valid metric"),
            kv_cache_blocks: IntGaugeVec::new(
                Opts::new(
                    "generation_kv_cache_blocks",
                    "KV-cache blocks by state: used (held by sequences), cached (reusable prefixes), free",
                ),
                &["model", "state"],
            )
            .expect("valid metric"),
            prefill_chunk_seconds: hist(
                "generation_prefill_chunk_seconds",
                "Seconds per prefill chunk",
                LATENCY_BUCKETS_SECONDS.to_vec(),
            ),
        };
        let r = registry();
        let _ = r.register(Box::new(m.time_to_first_token.clone()));
        let _ = r.register(Box::new(m.tokens.clone()));
        let _ = r.register(Box::new(m.batch_size.clone()));
        let _ = r.register(Box::new(m.step_seconds.clone()));
        let _ = r.register(Box::new(m.queue_depth.clone()));
        let _ = r.register(Box::new(m.active_sequences.clone()));
        let _ = r.register(Box::new(m.max_sequences.clone()));
        let _ = r.register(Box::new(m.requests.clone()));
        let _ = r.register(Box::new(m.prefix_cache_hit_tokens.clone()));
        let _ = r.register(Box::new(m.prefix_cache_lookup_tokens.clone()));
        let _ = r.register(Box::new(m.kv_cache_blocks.clone()));
        let _ = r.register(Box::new(m.prefill_chunk_seconds.clone()));
        m
    })
}
