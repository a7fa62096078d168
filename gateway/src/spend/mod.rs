//! Spend control: model prices, per-key and per-tenant budgets that hold
//! under concurrency, a spend ledger and its reports.
//!
//! - **Prices** (`config.rs`, the `spend:` section of the gateway
//!   configuration, reloaded with it) in USD per million tokens; costs are
//!   computed in nano-USD (`price.rs`).
//! - **Budgets** are enforced at admission: every turn (and embeddings
//!   request) reserves its worst-case cost — the counted prompt plus
//!   `max_tokens`, at the dearest model it may be answered by — on every
//!   budget of its key and tenant at once, in the budget store (`store.rs`:
//!   Redis across replicas, else memory), and settles to the real cost when
//!   it ends, cancelled and failed turns included (`meter.rs`). A request
//!   that does not fit is refused 429 naming the budget, what is left and
//!   when the window resets (`window.rs`: calendar windows in the
//!   configured time zone, or rolling). The proposal in LiteLLM #26672
//!   (reserve at admission, settle after) is the design.
//! - **Ledger** (`ledger.rs`): one row per request that reached a model,
//!   batched to PostgreSQL or SQLite off the turn's path; `GET
//!   /admin/spend` and `moltbot spend` report from it.
//! - **Soft limits** raise one event per budget and window: a log line,
//!   `moltbot_gateway_budget_soft_limit_events_total` and an optional
//!   webhook.

pub mod config;
pub mod ledger;
pub mod meter;
pub mod metrics;
pub mod price;
pub mod store;
pub mod window;

use std::sync::Arc;

use serde::Serialize;

pub use config::{BudgetConfig, Price, SpendConfig};
pub use ledger::Ledger;
pub use meter::Meter;

use crate::reload::Live;

/// A validated `spend:` section with its time zone resolved.
#[derive(Debug)]
pub struct Compiled {
    /// The section as configured.
    pub config: SpendConfig,
    /// `config.time_zone`.
    pub tz: jiff::tz::TimeZone,
}

impl Compiled {
    /// Resolves `config` (already validated). Errors when the time zone is
    /// unknown.
    pub fn new(config: SpendConfig) -> Result<Self, String> {
        let tz = jiff::tz::TimeZone::get(&config.time_zone)
            .map_err(|e| format!("spend.time_zone `{}`: {e}", config.time_zone))?;
        Ok(Self { config, tz })
    }

    /// The price of `model`, if it has one.
    pub fn price(&self, model: &str) -> Option<&Price> {
        self.config.prices.get(model)
    }

    /// The budgets applying to API key `key` of tenant `tenant`.
    pub fn budgets_for<'a>(
        &'a self,
        key: &'a str,
        tenant: &'a str,
    ) -> impl Iterator<Item = &'a BudgetConfig> + 'a {
        self.config
            .budgets
            .iter()
            .filter(move |b| b.key.as_deref() == Some(key) || b.tenant.as_deref() == Some(tenant))
    }
}

/// Spend control of one gateway.
#[derive(Debug)]
pub struct Spend {
    config: Live<Compiled>,
    store: Arc<dyn store::BudgetStore>,
    ledger: Option<Arc<Ledger>>,
    webhook: reqwest::Client,
}

/// A budget's state now (`GET /admin/budgets`).
#[derive(Debug, Clone, Serialize)]
pub struct BudgetStatus {
    /// `key:NAME` or `tenant:NAME`.
    pub budget: String,
    /// `daily`, `weekly`, `monthly` or `rolling`.
    pub window: config::WindowKind,
    /// Most spend per window, USD.
    pub max_usd: f64,
    /// Spent or reserved in the current window, USD.
    pub spent_usd: f64,
    /// When the window resets (calendar) or its oldest spend leaves it
    /// (rolling), RFC 3339 in the configured zone.
    pub resets_at: String,
}

impl Spend {
    /// Spend control over `store`, writing to `ledger` (none: no ledger
    /// rows, budgets still enforced). Errors when `config`'s time zone is
    /// unknown.
    pub fn new(
        config: SpendConfig,
        store: Arc<dyn store::BudgetStore>,
        ledger: Option<Arc<Ledger>>,
    ) -> Result<Self, String> {
        Ok(Self {
            config: Live::new(Compiled::new(config)?),
            store,
            ledger,
            webhook: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
        })
    }

    /// Replaces prices and budgets (a configuration reload, with a section
    /// resolved by [`Compiled::new`]); turns already admitted settle at the
    /// prices they were admitted with.
    pub fn set_compiled(&self, compiled: Compiled) {
        self.config.set(compiled);
    }

    /// The ledger, if one is written.
    pub fn ledger(&self) -> Option<&Arc<Ledger>> {
        self.ledger.as_ref()
    }

    /// Every configured budget's current window. Errors when the budget
    /// store cannot be read.
    pub async fn status(&self) -> Result<Vec<BudgetStatus>, String> {
        let compiled = self.config.get();
        let now = jiff::Timestamp::now();
        let mut out = Vec::new();
        for b in &compiled.config.budgets {
            let w = window::at(b.window, b.period, &compiled.tz, now)?;
            let spent = self
                .store
                .spent(&meter::check(b, &compiled, &w).counters)
                .await?;
            out.push(BudgetStatus {
                budget: b.name(),
                window: b.window,
                max_usd: b.max_usd,
                spent_usd: price::usd(spent),
                resets_at: meter::rfc3339(w.released_at(0), &compiled.tz),
            });
        }
        Ok(out)
    }

    /// Raises the soft-limit event of `budget`, whose window now holds
    /// `spent_usd` (spent and reserved, this request's reservation
    /// included): a log line, the metric and the webhook (spawned; its
    /// failure is logged).
    fn soft_limit_crossed(&self, budget: &BudgetConfig, spent_usd: f64) {
        let name = budget.name();
        metrics::SOFT_LIMIT
            .with_label_values(&[name.as_str()])
            .inc();
        tracing::warn!(budget = %name, max_usd = budget.max_usd, spent_usd, soft_limit = budget.soft_limit, "budget soft limit crossed");
        let compiled = self.config.get();
        if let Some(url) = compiled.config.soft_limit_webhook.clone() {
            let body = serde_json::json!({
                "event": "budget.soft_limit",
                "budget": name,
                "max_usd": budget.max_usd,
                "soft_limit": budget.soft_limit,
                "spent_usd": spent_usd,
            });
            let client = self.webhook.clone();
            tokio::spawn(async move {
                match client.post(&url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => tracing::warn!(
                        status = r.status().as_u16(),
                        "soft-limit webhook refused the event"
                    ),
                    Err(e) => tracing::warn!(error = %e, "soft-limit webhook unreachable"),
                }
            });
        }
    }
}
