//! The `spend:` section of the gateway configuration: model prices and
//! budgets (reloaded with the rest of the file, `gateway/src/reload/`).
//!
//! ```yaml
//! spend:
//!   time_zone: Europe/Berlin        # calendar windows (default UTC)
//!   soft_limit_webhook: https://hooks.example.com/moltbot   # optional
//!   cache_hit_price: 0.0            # share of the price a cache hit costs
//!   prices:                         # USD per million tokens
//!     # OpenAI's list prices, https://openai.com/api/pricing
//!     openai/gpt-4o-mini: { input: 0.15, cached_input: 0.075, output: 0.60 }
//!     # hardware cost of the local model, or leave it out: unpriced
//!     qwen2.5-coder-0.5b-instruct: { input: 0.01, output: 0.02 }
//!   budgets:
//!     - { key: app, max_usd: 5, window: daily, soft_limit: 0.8 }
//!     - { tenant: acme, max_usd: 100, window: monthly }
//!     - { key: batch, max_usd: 20, window: rolling, period: 24h }
//! ```

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

/// The whole `spend:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpendConfig {
    /// Prices per model name (`provider/model` for a remote provider, the
    /// bare name for a local model, `text-embedding-…` for embeddings).
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    /// Budgets per API key and per tenant.
    #[serde(default)]
    pub budgets: Vec<BudgetConfig>,
    /// IANA time zone of the calendar windows (`daily`, `weekly`,
    /// `monthly`), default `UTC`.
    #[serde(default = "utc")]
    pub time_zone: String,
    /// URL that receives a JSON `POST` when a budget crosses its soft
    /// limit (once per budget and window).
    #[serde(default)]
    pub soft_limit_webhook: Option<String>,
    /// The share of the model's price an answer from the response cache
    /// costs, in [0, 1] (default 0: hits are free).
    #[serde(default)]
    pub cache_hit_price: f64,
}

fn utc() -> String {
    "UTC".to_owned()
}

impl Default for SpendConfig {
    fn default() -> Self {
        Self {
            prices: BTreeMap::new(),
            budgets: Vec::new(),
            time_zone: utc(),
            soft_limit_webhook: None,
            cache_hit_price: 0.0,
        }
    }
}

/// A model's price, in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Prompt tokens.
    pub input: f64,
    /// Prompt tokens the provider served from its prompt cache (OpenAI's
    /// `cached_tokens`); default the input price.
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Completion tokens.
    pub output: f64,
}

/// How a budget's window is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// From midnight to midnight in the configured time zone.
    Daily,
    /// From Monday 00:00 to the next Monday 00:00 (ISO 8601 weeks).
    Weekly,
    /// From the first of the month 00:00 to the first of the next.
    Monthly,
    /// The last `period`, sliding (in 60 counters of `period / 60`; at
    /// least 10 s).
    Rolling,
}

impl WindowKind {
    /// `daily`, `weekly`, `monthly` or `rolling`, as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Daily => "daily",
            Self::Weekly => "weekly",
            Self::Monthly => "monthly",
            Self::Rolling => "rolling",
        }
    }
}

/// One budget, on an API key or on a tenant (exactly one of the two).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// The API key's `name` (or `anonymous`).
    #[serde(default)]
    pub key: Option<String>,
    /// The tenant (every key of it, together).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Most spend per window, in USD.
    pub max_usd: f64,
    /// How the window is cut.
    pub window: WindowKind,
    /// Length of a `rolling` window (`24h`, `7d`); only with `rolling`.
    #[serde(default, with = "humantime_opt")]
    pub period: Option<Duration>,
    /// Share of `max_usd` at which a soft-limit event is raised, in (0, 1).
    #[serde(default)]
    pub soft_limit: Option<f64>,
}

mod humantime_opt {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::time::Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| {
            t.parse::<jiff::Span>()
                .ok()
                .and_then(|s| {
                    s.to_duration(jiff::SpanRelativeTo::days_are_24_hours())
                        .ok()
                })
                .and_then(|d| std::time::Duration::try_from(d).ok())
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "period `{t}` is not a duration (e.g. 24h, 7d, 30m)"
                    ))
                })
        })
        .transpose()
    }
}

impl BudgetConfig {
    /// `key:NAME` or `tenant:NAME`: how errors, metrics and events name
    /// the budget.
    pub fn name(&self) -> String {
        match (&self.key, &self.tenant) {
            (Some(k), _) => format!("key:{k}"),
            (None, Some(t)) => format!("tenant:{t}"),
            (None, None) => "unnamed".to_owned(),
        }
    }
}

/// Shortest rolling window: ten seconds (ten one-second counters).
pub const MIN_ROLLING_PERIOD: Duration = Duration::from_secs(10);

impl SpendConfig {
    /// Checks what serde cannot. `keys` are the configured API key names.
    /// Errors with a message saying what to fix.
    pub fn validate(&self, keys: &[&str]) -> Result<(), String> {
        jiff::tz::TimeZone::get(&self.time_zone).map_err(|e| {
            format!(
                "spend.time_zone `{}` is not an IANA time zone (e.g. UTC, Europe/Berlin): {e}",
                self.time_zone
            )
        })?;
        if !(0.0..=1.0).contains(&self.cache_hit_price) {
            return Err("spend.cache_hit_price must be in [0, 1]".to_owned());
        }
        if let Some(url) = &self.soft_limit_webhook
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(format!(
                "spend.soft_limit_webhook `{url}` must be an http:// or https:// URL"
            ));
        }
        for (model, p) in &self.prices {
            let all = [Some(p.input), p.cached_input, Some(p.output)];
            if all.into_iter().flatten().any(|v| !v.is_finite() || v < 0.0) {
                return Err(format!(
                    "spend.prices `{model}`: prices must be non-negative numbers (USD per million tokens)"
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for b in &self.budgets {
            let name = b.name();
            match (&b.key, &b.tenant) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(format!(
                        "spend.budgets: each budget names exactly one of `key` or `tenant` ({name})"
                    ));
                }
                (Some(k), None) if k != "anonymous" && !keys.contains(&k.as_str()) => {
                    return Err(format!(
                        "spend.budgets {name}: no API key is named `{k}` (api_keys[].name)"
                    ));
                }
                _ => {}
            }
            if !seen.insert(name.clone()) {
                return Err(format!("spend.budgets {name} is listed twice; keep one"));
            }
            if !b.max_usd.is_finite() || b.max_usd <= 0.0 {
                return Err(format!("spend.budgets {name}: max_usd must be > 0"));
            }
            match (b.window, b.period) {
                (WindowKind::Rolling, None) => {
                    return Err(format!(
                        "spend.budgets {name}: a rolling window needs `period` (e.g. 24h)"
                    ));
                }
                (WindowKind::Rolling, Some(p)) if p < MIN_ROLLING_PERIOD => {
                    return Err(format!("spend.budgets {name}: period must be at least 1m"));
                }
                (WindowKind::Daily | WindowKind::Weekly | WindowKind::Monthly, Some(_)) => {
                    return Err(format!(
                        "spend.budgets {name}: `period` applies to rolling windows only"
                    ));
                }
                _ => {}
            }
            if let Some(s) = b.soft_limit
                && !(s > 0.0 && s < 1.0)
            {
                return Err(format!(
                    "spend.budgets {name}: soft_limit must be in (0, 1), e.g. 0.8"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(yaml: &str) -> SpendConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn parses_prices_and_budgets_and_rejects_mistakes() {
        let c = parse(
            "prices: { a/m: { input: 0.15, cached_input: 0.075, output: 0.6 } }\nbudgets:\n  - { key: app, max_usd: 5, window: daily, soft_limit: 0.8 }\n  - { tenant: acme, max_usd: 50, window: rolling, period: 24h }\n",
        );
        c.validate(&["app"]).unwrap();
        assert_eq!(c.budgets[1].period, Some(Duration::from_secs(86_400)));
        assert_eq!(c.budgets[0].name(), "key:app");
        let err = |yaml: &str| parse(yaml).validate(&["app"]).unwrap_err();
        assert!(err("budgets: [{ key: nobody, max_usd: 1, window: daily }]").contains("nobody"));
        assert!(
            err("budgets: [{ key: app, tenant: t, max_usd: 1, window: daily }]")
                .contains("exactly one")
        );
        assert!(err("budgets: [{ key: app, max_usd: 0, window: daily }]").contains("max_usd"));
        assert!(err("budgets: [{ key: app, max_usd: 1, window: rolling }]").contains("period"));
        assert!(
            err("budgets: [{ key: app, max_usd: 1, window: daily, period: 1h }]")
                .contains("rolling")
        );
        assert!(
            err("budgets: [{ key: app, max_usd: 1, window: daily, soft_limit: 1.5 }]")
                .contains("soft_limit")
        );
        assert!(err("time_zone: Mars/Olympus").contains("time zone"));
        assert!(err("prices: { m: { input: -1, output: 0 } }").contains("non-negative"));
        assert!(
            serde_yaml_ng::from_str::<SpendConfig>(
                "budgets: [{ key: a, max_usd: 1, window: hourly }]"
            )
            .is_err()
        );
    }
}
