//! Background work: a health check of every provider at its interval (`GET
//! <base_url>/models`, the listing endpoint of OpenAI-compatible APIs and of
//! Anthropic's), and OAuth2 token refresh before expiry.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use moltbot_proto::auth::v1::BreakerState;
use prometheus::{IntGaugeVec, Opts};

use super::Registry;

/// `moltbot_auth_breaker_state{provider, credential}`: 0 closed, 1 half-open,
/// 2 open; refreshed every scheduler tick.
#[allow(clippy::expect_used)] // static, valid names: construction cannot fail
static BREAKER_STATE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let g = IntGaugeVec::new(
        Opts::new(
            "moltbot_auth_breaker_state",
            "Circuit-breaker state per credential: 0 closed, 1 half-open, 2 open",
        ),
        &["provider", "credential"],
    )
    .expect("valid metric");
    let _ = moltbot_runtime::metrics::registry().register(Box::new(g.clone()));
    g
});

/// Deadline of one health check.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes one provider; `Ok` when it answered 2xx.
async fn probe(registry: &Registry, name: &str, base_url: &str) -> Result<(), String> {
    let mut request = registry
        .http()
        .get(format!("{base_url}/models"))
        .timeout(PROBE_TIMEOUT);
    if let Some((header, value)) = registry.probe_auth(name) {
        request = request.header(header, value);
    }
    match request.send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("health check failed: HTTP {}", r.status().as_u16())),
        Err(e) if e.is_timeout() => Err(format!(
            "health check failed: no answer within {} s",
            PROBE_TIMEOUT.as_secs()
        )),
        Err(e) => Err(format!(
            "health check failed: {}",
            moltbot_runtime::tls::explain(&e)
        )),
    }
}

/// Runs forever: checks each provider when its interval has passed (the first
/// check right away), and refreshes OAuth2 tokens every second tick.
pub async fn run(registry: Arc<Registry>, tick: Duration) {
    let mut next_due: HashMap<String, Instant> = HashMap::new();
    let mut ticks = 0u64;
    loop {
        let now = Instant::now();
        let due: Vec<(String, String, u32)> = registry
            .probe_targets()
            .into_iter()
            .filter(|(name, _, _)| next_due.get(name).is_none_or(|t| *t <= now))
            .collect();
        let checks = due.iter().map(|(name, url, _)| {
            let registry = registry.clone();
            async move {
                let result = probe(&registry, name, url).await;
                (name.clone(), result)
            }
        });
        for (name, result) in futures::future::join_all(checks).await {
            match result {
                Ok(()) => registry.record_health(&name, true, "health check ok".into()),
                Err(reason) => registry.record_health(&name, false, reason),
            }
        }
        for (name, _, interval) in due {
            next_due.insert(name, now + Duration::from_secs(u64::from(interval.max(1))));
        }
        for (provider, credential, state) in registry.breaker_states() {
            let value = match state {
                BreakerState::Closed | BreakerState::Unspecified => 0,
                BreakerState::HalfOpen => 1,
                BreakerState::Open => 2,
            };
            BREAKER_STATE
                .with_label_values(&[provider.as_str(), credential.as_str()])
                .set(value);
        }
        ticks += 1;
        if ticks.is_multiple_of(2) {
            registry.refresh_tokens().await;
        }
        tokio::time::sleep(tick).await;
    }
}
