//! The edge's Prometheus metrics (registered in the process registry served
//! at `/metrics`).

use std::sync::LazyLock;

use prometheus::IntCounter;

use crate::turn::metrics::register;

/// `moltbot_gateway_shed_requests_total`: requests answered 503 because
/// the gateway was at its in-flight limit (`MOLTBOT_MAX_IN_FLIGHT`).
#[allow(clippy::expect_used)]
pub static SHED: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "moltbot_gateway_shed_requests_total",
            "Requests shed at the in-flight limit",
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_rate_limit_store_errors_total`: rate-limit checks that
/// could not reach the shared buckets in Redis and used this gateway's
/// own buckets instead.
#[allow(clippy::expect_used)]
pub static RATE_LIMIT_STORE_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "moltbot_gateway_rate_limit_store_errors_total",
            "Rate-limit checks that fell back to process-local buckets",
        )
        .expect("valid metric"),
    )
});

/// Registers the edge's counters at start-up, so that they are exported at 0
/// before their first event: a counter that appears only at its first
/// increment has no earlier sample, and `rate()` — what the alerts on it
/// compute (deploy/prometheus/alerts.yml) — misses that first event.
pub fn register_all() {
    LazyLock::force(&SHED);
    LazyLock::force(&RATE_LIMIT_STORE_ERRORS);
}
