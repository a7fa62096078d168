//! The response cache's Prometheus metrics, registered at start (a counter
//! born at its first increment is invisible to `rate()`).

use std::sync::LazyLock;

use moltbot_runtime::metrics::LATENCY_BUCKETS_SECONDS;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

use crate::turn::metrics::register;

/// `moltbot_gateway_cache_lookups_total{tier, result}`: lookups per tier
/// (`memory`, `redis`) by result (`hit`, `miss`, `error`, `corrupt`).
#[allow(clippy::expect_used)] // static, valid names: construction cannot fail
pub static LOOKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_cache_lookups_total",
                "Response cache lookups by tier and result",
            ),
            &["tier", "result"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_cache_results_total{status}`: turns by cache status
/// (`hit`, `semantic-hit`, `miss`, `bypass`): the hit rate's numerator and
/// denominator.
#[allow(clippy::expect_used)]
pub static RESULTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_cache_results_total",
                "Chat turns by response cache status",
            ),
            &["status"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_cache_hit_seconds`: from the request's arrival to a hit
/// ready to replay.
#[allow(clippy::expect_used)]
pub static HIT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register(
        Histogram::with_opts(
            HistogramOpts::new(
                "moltbot_gateway_cache_hit_seconds",
                "Time from request arrival to a response cache hit, in seconds",
            )
            .buckets(LATENCY_BUCKETS_SECONDS.to_vec()),
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_cache_stores_total`: answers stored.
#[allow(clippy::expect_used)]
pub static STORES: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "moltbot_gateway_cache_stores_total",
            "Answers stored in the response cache",
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_cache_memory_bytes`: bytes of entries in the memory
/// tier (by the entries' weights).
#[allow(clippy::expect_used)]
pub static MEMORY_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new(
            "moltbot_gateway_cache_memory_bytes",
            "Bytes of entries held in the response cache's memory tier",
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_cache_evictions_total`: memory entries evicted for
/// room (not expired ones).
#[allow(clippy::expect_used)]
pub static EVICTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "moltbot_gateway_cache_evictions_total",
            "Response cache memory entries evicted to stay within the byte bound",
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_cache_redis_fallbacks_total`: reads and writes that
/// Redis failed, served by the memory tier alone.
#[allow(clippy::expect_used)]
pub static REDIS_FALLBACKS: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "moltbot_gateway_cache_redis_fallbacks_total",
            "Response cache operations that fell back to the memory tier because Redis failed",
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_cache_served_tokens_total`: prompt and completion
/// tokens answered from the cache (not charged to the caller's tokens per
/// minute).
#[allow(clippy::expect_used)]
pub static SERVED_TOKENS: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "moltbot_gateway_cache_served_tokens_total",
            "Tokens answered from the response cache instead of generated",
        )
        .expect("valid metric"),
    )
});

/// Registers every cache metric now, with the label values an operator
/// queries, so each exists from the start.
pub fn register_all() {
    for status in ["hit", "semantic-hit", "miss", "bypass"] {
        let _ = RESULTS.with_label_values(&[status]);
    }
    for (tier, result) in [
        ("memory", "hit"),
        ("memory", "miss"),
        ("redis", "hit"),
        ("redis", "miss"),
        ("redis", "error"),
    ] {
        let _ = LOOKUPS.with_label_values(&[tier, result]);
    }
    LazyLock::force(&HIT_SECONDS);
    LazyLock::force(&STORES);
    LazyLock::force(&MEMORY_BYTES);
    LazyLock::force(&EVICTIONS);
    LazyLock::force(&REDIS_FALLBACKS);
    LazyLock::force(&SERVED_TOKENS);
}
