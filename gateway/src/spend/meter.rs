//! The meter of one request: its caller's tokens per minute
//! (`gateway/src/edge/ratelimit/`) and budgets, reserved at admission and
//! settled when the request ends, and its ledger row.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::{
    BudgetConfig, Compiled, Spend,
    ledger::Row,
    metrics,
    price::{self, Tokens},
    store::{Check, Outcome},
    window::Window,
};
use crate::{
    ApiError,
    edge::{Caller, ratelimit::Reservation as TokenReservation},
    turn::{Charge, Reserved, ports::Admit, ports::Used},
};

/// Redis key prefix of budget counters.
const PREFIX: &str = "moltbot:spend:v1";

/// Budget `b`'s part in a reservation over window `w`: its counter keys
/// (oldest first), its soft-limit mark, its bounds in nano-USD. The
/// window's kind, period and zone are part of every key, so a budget whose
/// window changes starts afresh instead of summing foreign counters.
pub fn check(b: &BudgetConfig, compiled: &Compiled, w: &Window) -> Check {
    let tag = match b.period {
        Some(p) => format!("rolling{}s", p.as_secs()),
        None => format!("{}@{}", b.window.as_str(), compiled.config.time_zone).to_lowercase(),
    };
    let prefix = format!("{PREFIX}:{}:{tag}", b.name());
    let max = price::nano(b.max_usd);
    Check {
        counters: w
            .buckets
            .iter()
            .map(|start| format!("{prefix}:{start}"))
            .collect(),
        soft_key: format!("{prefix}:soft:{}", w.buckets.last().copied().unwrap_or(0)),
        max,
        soft: b.soft_limit.map(|s| (max as f64 * s) as i64),
        ttl_s: w.ttl_s,
    }
}

/// Unix seconds as RFC 3339 in `tz`.
pub fn rfc3339(unix_s: i64, tz: &jiff::tz::TimeZone) -> String {
    jiff::Timestamp::from_second(unix_s)
        .map(|t| {
            t.to_zoned(tz.clone())
                .strftime("%Y-%m-%dT%H:%M:%S%:z")
                .to_string()
        })
        .unwrap_or_else(|_| unix_s.to_string())
}

/// `local`, or the provider of a `provider/model` name.
pub fn provider_of(model: &str) -> &str {
    model.split_once('/').map_or("local", |(p, _)| p)
}

/// One request's meter: built per request by the handler from the caller
/// ([`Spend::meter`]).
#[derive(Debug, Clone)]
pub struct Meter {
    spend: Arc<Spend>,
    caller: Caller,
    endpoint: &'static str,
}

impl Spend {
    /// The meter of a request of `caller` on `endpoint`
    /// (`chat.completions`, `responses`, `embeddings`).
    pub fn meter(self: &Arc<Self>, caller: &Caller, endpoint: &'static str) -> Meter {
        Meter {
            spend: self.clone(),
            caller: caller.clone(),
            endpoint,
        }
    }
}

impl Meter {
    /// Admits a request: see [`Charge::reserve`].
    pub async fn admit(&self, admit: Admit<'_>) -> Result<Reservation, ApiError> {
        let compiled = self.spend.config.get();
        let budgets: Vec<&BudgetConfig> = compiled
            .budgets_for(&self.caller.name, &self.caller.tenant)
            .collect();
        if !budgets.is_empty()
            && admit.refuse_unpriced
            && let Some(model) = admit.chain.iter().find(|m| compiled.price(m).is_none())
        {
            return Err(ApiError::Unpriced {
                route: admit.route.to_owned(),
                model: model.clone(),
            });
        }
        let share = if admit.cache_hit {
            compiled.config.cache_hit_price
        } else {
            1.0
        };
        // The dearest model of the chain answering with the whole budget.
        let worst = admit
            .chain
            .iter()
            .filter_map(|m| compiled.price(m))
            .map(|p| {
                price::cost(
                    p,
                    Tokens {
                        input: admit.prompt_tokens,
                        cached: 0,
                        output: admit.completion_budget,
                    },
                )
            })
            .max()
            .unwrap_or(0);
        let amount = (worst as f64 * share).ceil() as i64;
        let tokens = if admit.cache_hit {
            None
        } else {
            Some(
                self.caller
                    .limiter
                    .reserve(admit.prompt_tokens, admit.completion_budget)
                    .await?,
            )
        };
        let mut held = Vec::new();
        if !budgets.is_empty() {
            let now = jiff::Timestamp::now();
            let mut windows = Vec::with_capacity(budgets.len());
            let mut checks = Vec::with_capacity(budgets.len());
            for b in &budgets {
                let w = super::window::at(b.window, b.period, &compiled.tz, now)
                    .map_err(ApiError::InvalidRequest)?;
                checks.push(check(b, &compiled, &w));
                windows.push(w);
            }
            match self.spend.store.reserve(&checks, amount).await {
                Ok(Outcome::Held { crossed_soft }) => {
                    for (i, spent) in crossed_soft {
                        if let Some(b) = budgets.get(i) {
                            self.spend.soft_limit_crossed(b, price::usd(spent));
                        }
                    }
                    held = checks
                        .into_iter()
                        .filter_map(|c| c.counters.last().cloned())
                        .collect();
                }
                Ok(Outcome::Refused {
                    index,
                    spent,
                    oldest,
                }) => {
                    let (Some(b), Some(w)) = (budgets.get(index), windows.get(index)) else {
                        return Err(ApiError::InvalidRequest(
                            "budget index out of range".to_owned(),
                        ));
                    };
                    let name = b.name();
                    let scope = if b.key.is_some() { "key" } else { "tenant" };
                    metrics::REFUSALS.with_label_values(&[scope]).inc();
                    tracing::info!(budget = %name, spent_nano_usd = spent, needed_nano_usd = amount, "request refused by a budget");
                    let resets_s = w.released_at(oldest);
                    return Err(ApiError::BudgetExceeded {
                        budget: name,
                        window: b.window.as_str().to_owned(),
                        max_usd: b.max_usd,
                        spent_usd: price::usd(spent),
                        needed_usd: price::usd(amount),
                        resets_at: rfc3339(resets_s, &compiled.tz),
                        retry_after: std::time::Duration::from_secs(
                            (resets_s - now.as_second()).max(1) as u64,
                        ),
                    });
                }
                Err(e) => {
                    metrics::STORE_ERRORS.with_label_values(&["reserve"]).inc();
                    tracing::warn!(error = %e, "budget store unreachable; request refused");
                    return Err(ApiError::Upstream {
                        service: "budget store",
                        status: tonic::Status::unavailable(format!(
                            "the budget store failed ({e}); a request under a budget is never admitted unchecked"
                        )),
                    });
                }
            }
        }
        Ok(Reservation {
            spend: self.spend.clone(),
            compiled,
            tokens,
            held,
            amount,
            share,
            meta: Meta {
                request_id: admit.request_id.to_owned(),
                endpoint: self.endpoint,
                tenant: self.caller.tenant.to_string(),
                api_key: self.caller.name.to_string(),
                route: admit.route.to_owned(),
            },
            model: admit.chain.first().cloned(),
            started: admit.cache_hit,
            prompt_tokens: admit.prompt_tokens,
            completion_seen: 0,
            cache_hit: admit.cache_hit,
            settled: false,
        })
    }
}

impl Charge for Meter {
    fn reserve<'a>(
        &'a self,
        admit: Admit<'a>,
    ) -> BoxFuture<'a, Result<Box<dyn Reserved>, ApiError>> {
        Box::pin(async move {
            let r = self.admit(admit).await?;
            Ok(Box::new(r) as Box<dyn Reserved>)
        })
    }
}

#[derive(Debug)]
struct Meta {
    request_id: String,
    endpoint: &'static str,
    tenant: String,
    api_key: String,
    route: String,
}

/// What one request holds; settles on [`Reservation::settle`] or, dropped
/// unsettled, charges what was seen (the prompt and the completion tokens
/// streamed, when the generation had started; nothing otherwise).
#[derive(Debug)]
pub struct Reservation {
    spend: Arc<Spend>,
    /// Prices as admitted: a reload mid-turn does not reprice it.
    compiled: Arc<Compiled>,
    tokens: Option<TokenReservation>,
    /// The current counter of each budget reserved on.
    held: Vec<String>,
    /// Nano-USD reserved on each.
    amount: i64,
    /// Share of the price charged (the cache-hit price on a hit).
    share: f64,
    meta: Meta,
    model: Option<String>,
    started: bool,
    prompt_tokens: u32,
    completion_seen: u32,
    cache_hit: bool,
    settled: bool,
}

impl Reservation {
    /// Charges `used` tokens of `model` instead of the reservation.
    pub fn settle_used(mut self, used: Used) {
        if let Some(t) = self.tokens.take() {
            t.settle(used.total());
        }
        let outcome = if self.cache_hit { "cache_hit" } else { "ok" };
        self.finish(
            Tokens {
                input: used.prompt_tokens,
                cached: used.cached_tokens,
                output: used.completion_tokens,
            },
            outcome,
        );
    }

    fn finish(&mut self, tokens: Tokens, outcome: &'static str) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let model = self.model.clone().unwrap_or_default();
        let price = self.compiled.price(&model);
        let cost = price.map_or(0, |p| {
            (price::cost(p, tokens) as f64 * self.share).ceil() as i64
        });
        let delta = cost - self.amount;
        if !self.held.is_empty() && delta != 0 {
            let spend = self.spend.clone();
            let held = std::mem::take(&mut self.held);
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    if let Err(e) = spend.store.adjust(&held, delta).await {
                        metrics::STORE_ERRORS.with_label_values(&["settle"]).inc();
                        tracing::warn!(error = %e, delta, "budget settlement lost; the reservation stays counted");
                    }
                });
            }
        }
        let (tenant, route) = (self.meta.tenant.as_str(), self.meta.route.as_str());
        if price.is_none() {
            metrics::UNPRICED.with_label_values(&[model.as_str()]).inc();
        }
        metrics::SPEND_USD
            .with_label_values(&[tenant, model.as_str(), route])
            .inc_by(price::usd(cost));
        for (kind, n) in [
            ("input", tokens.input),
            ("cached", tokens.cached),
            ("output", tokens.output),
        ] {
            metrics::SPEND_TOKENS
                .with_label_values(&[tenant, model.as_str(), route, kind])
                .inc_by(u64::from(n));
        }
        if let Some(ledger) = &self.spend.ledger {
            ledger.push(Row {
                row_id: self.meta.request_id.clone(),
                at_ms: jiff::Timestamp::now().as_millisecond(),
                request_id: self.meta.request_id.clone(),
                endpoint: self.meta.endpoint,
                tenant: self.meta.tenant.clone(),
                api_key: self.meta.api_key.clone(),
                route: self.meta.route.clone(),
                provider: provider_of(&model).to_owned(),
                model,
                tokens,
                cost,
                priced: price.is_some(),
                outcome,
            });
        }
    }
}

impl Reserved for Reservation {
    fn started(&mut self, model: &str) {
        self.started = true;
        if self.model.as_deref() != Some(model) {
            self.model = Some(model.to_owned());
        }
    }

    fn saw_completion(&mut self, n: u32) {
        self.completion_seen = self.completion_seen.saturating_add(n);
        if let Some(t) = self.tokens.as_mut() {
            t.saw_completion(n);
        }
    }

    fn settle(self: Box<Self>, used: Used) {
        self.settle_used(used);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // A generation that started is billed for what it read and wrote;
        // one that never started (every attempt refused) for nothing.
        let (tokens, outcome) = if self.started {
            (
                Tokens {
                    input: self.prompt_tokens,
                    cached: 0,
                    output: self.completion_seen,
                },
                "cancelled",
            )
        } else {
            (Tokens::default(), "failed")
        };
        self.finish(tokens, outcome);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{
        edge::ratelimit::RateLimiter,
        routing::config::Limits,
        spend::{SpendConfig, store::MemoryStore},
    };

    fn caller(name: &str, tenant: &str) -> Caller {
        Caller {
            name: Arc::from(name),
            tenant: Arc::from(tenant),
            limiter: Arc::new(RateLimiter::new(&Limits::default())),
            concurrency: Arc::new(tokio::sync::Semaphore::new(64)),
        }
    }

    /// $1 per million input and output tokens: 1,000 nano-USD a token.
    fn spend(budgets: &str) -> Arc<Spend> {
        let config: SpendConfig = serde_yaml_ng::from_str(&format!(
            "prices: {{ p/m: {{ input: 1, output: 1 }}, p/dear: {{ input: 2, output: 2 }} }}\n{budgets}"
        ))
        .unwrap();
        config.validate(&["app", "other"]).unwrap();
        Arc::new(Spend::new(config, Arc::new(MemoryStore::default()), None).unwrap())
    }

    fn admit<'a>(chain: &'a [String], prompt: u32, budget: u32) -> Admit<'a> {
        Admit {
            request_id: "chatcmpl-test",
            route: "default",
            chain,
            prompt_tokens: prompt,
            completion_budget: budget,
            refuse_unpriced: false,
            cache_hit: false,
        }
    }

    #[tokio::test]
    async fn concurrent_turns_never_overrun_a_budget() {
        // Worst case 100 + 100 tokens at $1/M = $0.0002; the budget holds 5.
        let spend = spend("budgets: [{ key: app, max_usd: 0.001, window: daily }]");
        let meter = spend.meter(&caller("app", "acme"), "chat.completions");
        let chain = vec!["p/m".to_owned()];
        let tries = (0..50).map(|_| meter.admit(admit(&chain, 100, 100)));
        let results = futures::future::join_all(tries).await;
        let admitted: Vec<_> = results.into_iter().filter_map(Result::ok).collect();
        assert_eq!(admitted.len(), 5);
        // Each used 100 + 20 of its 200 tokens: 80 each comes back…
        for r in admitted {
            r.settle_used(Used {
                prompt_tokens: 100,
                cached_tokens: 0,
                completion_tokens: 20,
            });
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let status = spend.status().await.unwrap();
        assert!(
            (status[0].spent_usd - 5.0 * 120e-6).abs() < 1e-12,
            "{status:?}"
        );
        // …so two more fit ($0.0006 + 2 × $0.0002 = the budget), and the
        // one after them is refused naming the budget.
        let more = meter.admit(admit(&chain, 100, 100)).await.unwrap();
        let last = meter.admit(admit(&chain, 100, 100)).await.unwrap();
        match meter.admit(admit(&chain, 100, 100)).await {
            Err(ApiError::BudgetExceeded { budget, .. }) => assert_eq!(budget, "key:app"),
            other => panic!("expected a budget refusal, got {other:?}"),
        }
        drop((more, last));
    }

    #[tokio::test]
    async fn the_dearest_model_is_reserved_and_drops_charge_what_was_seen() {
        let spend = spend("budgets: [{ tenant: acme, max_usd: 1, window: monthly }]");
        let meter = spend.meter(&caller("other", "acme"), "responses");
        let chain = vec!["p/m".to_owned(), "p/dear".to_owned()];
        let mut r = meter.admit(admit(&chain, 1_000, 1_000)).await.unwrap();
        assert_eq!(r.amount, 2 * 2_000 * 1_000, "reserved at p/dear's price");
        // Started on p/m, cancelled after 10 tokens: the prompt and those
        // 10 at p/m's price.
        Reserved::started(&mut r, "p/m");
        Reserved::saw_completion(&mut r, 10);
        drop(r);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let spent = spend.status().await.unwrap()[0].spent_usd;
        assert!((spent - 1_010e-6).abs() < 1e-12, "{spent}");
        // A turn that never started is charged nothing.
        drop(meter.admit(admit(&chain, 1_000, 1_000)).await.unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let after = spend.status().await.unwrap()[0].spent_usd;
        assert!((after - spent).abs() < 1e-12, "{after}");
    }

    #[tokio::test]
    async fn a_route_can_refuse_unpriced_models_under_a_budget() {
        let spend = spend("budgets: [{ key: app, max_usd: 1, window: daily }]");
        let chain = vec!["p/m".to_owned(), "local-model".to_owned()];
        let refusing = Admit {
            refuse_unpriced: true,
            ..admit(&chain, 10, 10)
        };
        let with_budget = spend.meter(&caller("app", "t"), "chat.completions");
        assert!(matches!(
            with_budget.admit(refusing).await,
            Err(ApiError::Unpriced { model, .. }) if model == "local-model"
        ));
        // Without a budget nothing is refused.
        let free = spend.meter(&caller("other", "t"), "chat.completions");
        assert!(free.admit(refusing).await.is_ok());
    }
}
