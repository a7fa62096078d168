//! Spend's Prometheus metrics. Label values are bounded by the
//! configuration: tenants, models and routes it names, budgets it lists.

use std::sync::LazyLock;

use prometheus::{CounterVec, IntCounterVec, IntGauge, Opts};

use crate::turn::metrics::register;

/// `moltbot_gateway_spend_usd_total{tenant, model, route}`: cost charged,
/// in USD.
#[allow(clippy::expect_used)] // static, valid names: construction cannot fail
pub static SPEND_USD: LazyLock<CounterVec> = LazyLock::new(|| {
    register(
        CounterVec::new(
            Opts::new(
                "moltbot_gateway_spend_usd_total",
                "Cost charged in USD, by tenant, model and route",
            ),
            &["tenant", "model", "route"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_spend_tokens_total{tenant, model, route, kind}`:
/// tokens charged, `input` (cached included), `cached` or `output`.
#[allow(clippy::expect_used)]
pub static SPEND_TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_spend_tokens_total",
                "Tokens charged, by tenant, model, route and kind (input, cached, output)",
            ),
            &["tenant", "model", "route", "kind"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_unpriced_requests_total{model}`: requests to a model
/// without a price (charged nothing).
#[allow(clippy::expect_used)]
pub static UNPRICED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_unpriced_requests_total",
                "Requests to a model without a configured price, by model",
            ),
            &["model"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_budget_refusals_total{scope}`: requests refused 429
/// because they did not fit a budget of a `key` or a `tenant` (the 429 and
/// the log line name the budget).
#[allow(clippy::expect_used)]
pub static REFUSALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_budget_refusals_total",
                "Requests refused because they did not fit a budget, by scope (key, tenant)",
            ),
            &["scope"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_budget_soft_limit_events_total{budget}`: soft limits
/// crossed (once per budget and window, across replicas).
#[allow(clippy::expect_used)]
pub static SOFT_LIMIT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_budget_soft_limit_events_total",
                "Budgets whose soft limit was crossed, once per window, by budget",
            ),
            &["budget"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_budget_store_errors_total`: budget store (Redis)
/// failures; each refused the request with 503.
#[allow(clippy::expect_used)]
pub static STORE_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_budget_store_errors_total",
                "Budget store failures, by operation (reserve, settle)",
            ),
            &["operation"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_spend_ledger_rows_total{outcome}`: ledger rows
/// `written`, or `dropped` because the buffer was full.
#[allow(clippy::expect_used)]
pub static LEDGER_ROWS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_spend_ledger_rows_total",
                "Spend ledger rows by outcome (written, dropped)",
            ),
            &["outcome"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_spend_ledger_buffered_rows`: rows waiting to be
/// written.
#[allow(clippy::expect_used)]
pub static LEDGER_BUFFERED: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new(
            "moltbot_gateway_spend_ledger_buffered_rows",
            "Spend ledger rows waiting to be written",
        )
        .expect("valid metric"),
    )
});

/// Registers every spend metric (so `/metrics` lists them from the start).
pub fn register_all() {
    LazyLock::force(&SPEND_USD);
    LazyLock::force(&SPEND_TOKENS);
    LazyLock::force(&UNPRICED);
    LazyLock::force(&REFUSALS);
    LazyLock::force(&SOFT_LIMIT);
    LazyLock::force(&STORE_ERRORS);
    LazyLock::force(&LEDGER_ROWS);
    LazyLock::force(&LEDGER_BUFFERED);
    for outcome in ["written", "dropped"] {
        LEDGER_ROWS.with_label_values(&[outcome]);
    }
    for scope in ["key", "tenant"] {
        REFUSALS.with_label_values(&[scope]);
    }
}
