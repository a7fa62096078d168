//! The turn engine's Prometheus metrics (registered in the process registry
//! served at `/metrics`).

use std::sync::LazyLock;

use moltbot_runtime::metrics;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

pub(crate) fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    let _ = metrics::registry().register(Box::new(c.clone()));
    c
}

/// `moltbot_gateway_turns_total{route, outcome}`: chat turns by outcome (`ok`,
/// `error`, `cancelled`).
#[allow(clippy::expect_used)] // static, valid names: construction cannot fail
pub static TURNS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_turns_total",
                "Chat turns by route and outcome",
            ),
            &["route", "outcome"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_degraded_turns_total{enrichment}`: turns answered without
/// an enrichment (`understanding`, `retrieval`) or whose context write failed.
#[allow(clippy::expect_used)]
pub static DEGRADED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_degraded_turns_total",
                "Turns answered without an enrichment, by enrichment",
            ),
            &["enrichment"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_tokens_total{route, direction}`: prompt (`in`) and
/// completion (`out`) tokens.
#[allow(clippy::expect_used)]
pub static TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_tokens_total",
                "Tokens in and out, by route",
            ),
            &["route", "direction"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_attempts_total{model, outcome}`: generation attempts.
#[allow(clippy::expect_used)]
pub static ATTEMPTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_generation_attempts_total",
                "Generation attempts by model and outcome",
            ),
            &["model", "outcome"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_time_to_first_token_seconds{route}`: from the request's
/// arrival to the first generated token.
#[allow(clippy::expect_used)]
pub static TTFT: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "moltbot_gateway_time_to_first_token_seconds",
                "Time from request arrival to the first token, in seconds",
            )
            .buckets(metrics::LATENCY_BUCKETS_SECONDS.to_vec()),
            &["route"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_turn_duration_seconds{route}`: whole turns, request to
/// last byte.
#[allow(clippy::expect_used)]
pub static TURN_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "moltbot_gateway_turn_duration_seconds",
                "Chat turn duration by route, in seconds",
            )
            .buckets(metrics::LATENCY_BUCKETS_SECONDS.to_vec()),
            &["route"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_upstream_attempts_total{upstream, call, outcome}`: every
/// attempt of every upstream call a turn makes (`context`/`history`,
/// `generation`/`count_tokens`, …), by outcome (`ok` or the gRPC code in
/// snake case), counted by the call policy (`gateway/src/turn/policy.rs`).
#[allow(clippy::expect_used)]
pub static UPSTREAM_ATTEMPTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_upstream_attempts_total",
                "Upstream call attempts by upstream, call and outcome",
            ),
            &["upstream", "call", "outcome"],
        )
        .expect("valid metric"),
    )
});
