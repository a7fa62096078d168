//! Prometheus metrics of the client-side balancers, in the process registry
//! ([`crate::metrics::registry`]).

use std::sync::LazyLock;

use prometheus::{IntCounterVec, IntGaugeVec, Opts};

#[allow(clippy::expect_used)] // static, valid names: construction cannot fail
static EJECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        Opts::new(
            "grpc_client_outlier_ejections_total",
            "Endpoints ejected by outlier detection, by upstream",
        ),
        &["upstream"],
    )
    .expect("valid metric");
    let _ = crate::metrics::registry().register(Box::new(c.clone()));
    c
});

#[allow(clippy::expect_used)] // static, valid names: construction cannot fail
static ENDPOINTS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let g = IntGaugeVec::new(
        Opts::new(
            "grpc_client_endpoints",
            "Endpoints a client balances over (resolved addresses), by upstream",
        ),
        &["upstream"],
    )
    .expect("valid metric");
    let _ = crate::metrics::registry().register(Box::new(g.clone()));
    g
});

/// Counts one ejection from `upstream`'s endpoints.
pub fn ejected(upstream: &str) {
    EJECTIONS.with_label_values(&[upstream]).inc();
}

/// Sets how many endpoints `upstream` resolves to now.
pub fn endpoints(upstream: &str, n: usize) {
    ENDPOINTS.with_label_values(&[upstream]).set(n as i64);
}
