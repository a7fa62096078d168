//! Replica convergence: every `MOLTBOT_FOLLOW_INTERVAL_MS` the follower
//! reads the store's event log after the last event it applied and applies
//! the events other replicas wrote (its own are applied already):
//!
//! - an outcome goes through the same [`super::outcome::apply`] as a report
//!   taken here, at the time it happened, so every replica's breakers and
//!   cool-downs open and close together: a provider found down through one
//!   replica is down for all within one interval;
//! - a configuration change (provider, credential, revocation) reloads that
//!   provider from the store, keeping the breakers and cool-downs of
//!   credentials whose key did not change.
//!
//! Health checks are not shared: each replica probes every provider itself.

use std::{
    sync::{Arc, Weak},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use moltbot_proto::auth::v1::Outcome;

use super::{Cred, ProviderState, Registry, lock, status_of};
use crate::{
    AuthError,
    store::{
        now_ms,
        shared::{CONFIG, EventRow, OUTCOME},
    },
};

/// Events older than this are pruned from the log (ms).
const KEEP_MS: i64 = 3_600_000;

/// Starts following from `cursor` (the event position read before the
/// registry was loaded). The task ends when the registry is dropped.
pub fn spawn(registry: &Arc<Registry>, cursor: i64, interval: Duration) {
    tokio::spawn(run(Arc::downgrade(registry), cursor, interval));
}

async fn run(registry: Weak<Registry>, mut cursor: i64, interval: Duration) {
    let mut rounds: u64 = 0;
    loop {
        tokio::time::sleep(interval).await;
        let Some(registry) = registry.upgrade() else {
            return;
        };
        match catch_up(&registry, cursor).await {
            Ok(next) => cursor = next,
            Err(e) => tracing::warn!(error = %e, cursor, "cannot read the event log; retrying"),
        }
        rounds += 1;
        if rounds.is_multiple_of(240)
            && let Err(e) = registry.store.prune_shared(now_ms() - KEEP_MS).await
        {
            tracing::warn!(error = %e, "cannot prune leases and events");
        }
    }
}

/// Applies every other replica's event after `cursor`; returns the new
/// position.
pub async fn catch_up(registry: &Registry, mut cursor: i64) -> Result<i64, AuthError> {
    loop {
        let events = registry.store.events_after(cursor).await?;
        let Some(last) = events.last().map(|e| e.seq) else {
            return Ok(cursor);
        };
        for event in events.iter().filter(|e| e.origin != registry.origin) {
            match event.kind.as_str() {
                OUTCOME => registry.apply_outcome(event),
                CONFIG => registry.reload_provider(&event.provider).await?,
                other => {
                    tracing::warn!(kind = other, seq = event.seq, "unknown event kind; skipped")
                }
            }
        }
        cursor = last;
        if events.len() < 500 {
            return Ok(cursor);
        }
    }
}

impl Registry {
    /// Applies an outcome another replica took, at the time it happened.
    fn apply_outcome(&self, e: &EventRow) {
        let Ok(outcome) = Outcome::try_from(e.outcome) else {
            return;
        };
        let wall = UNIX_EPOCH + Duration::from_millis(e.at_ms.max(0) as u64);
        let age = SystemTime::now().duration_since(wall).unwrap_or_default();
        let now = Instant::now();
        let at = now.checked_sub(age).unwrap_or(now);
        let changed = {
            let mut inner = lock(&self.inner);
            let Some(p) = inner.providers.get_mut(&e.provider) else {
                return;
            };
            let before = status_of(p, now);
            if let Err(err) = super::outcome::apply(
                p,
                &e.model,
                &e.credential_id,
                outcome,
                e.retry_after_ms,
                (at, wall),
                &self.settings,
            ) {
                tracing::warn!(error = %err, seq = e.seq, "cannot apply another replica's outcome");
                return;
            }
            let after = status_of(p, now);
            (before != after).then_some(after)
        };
        if let Some(status) = changed {
            self.emit(
                status,
                format!("outcome {outcome:?} reported to another replica"),
            );
        }
    }

    /// Reloads `name` from the store: its row and credentials; breakers and
    /// cool-downs survive for credentials whose key is unchanged.
    async fn reload_provider(&self, name: &str) -> Result<(), AuthError> {
        let row = self
            .store
            .providers()
            .await?
            .into_iter()
            .find(|p| p.name == name);
        let mut fresh = Vec::new();
        for c in self.store.credentials().await? {
            if c.provider == name {
                let secret = self.key.open(&c.id, &c.secret)?;
                fresh.push(Cred::from_row(&c, secret)?);
            }
        }
        let now = Instant::now();
        let status = {
            let mut inner = lock(&self.inner);
            let Some(row) = row else {
                inner.providers.remove(name);
                return Ok(());
            };
            let p = inner
                .providers
                .entry(name.to_owned())
                .or_insert_with(|| ProviderState::new(row.clone()));
            p.row = row.clone();
            p.endpoints.retain(|m, _| row.models.contains(m));
            for m in &row.models {
                p.endpoints.entry(m.clone()).or_default();
            }
            for cred in &mut fresh {
                if let Some(old) = p
                    .creds
                    .iter()
                    .find(|o| o.id == cred.id && o.secret.expose() == cred.secret.expose())
                {
                    cred.breaker = old.breaker.clone();
                    cred.cooling_until = old.cooling_until;
                    if let (Some(new), Some(old)) = (&mut cred.oauth, &old.oauth) {
                        new.token.clone_from(&old.token);
                    }
                }
            }
            fresh.sort_by_key(|c| c.slot as i32);
            p.creds = fresh;
            status_of(p, now)
        };
        tracing::info!(provider = name, "followed a configuration change");
        self.emit(status, "configuration changed through another replica");
        Ok(())
    }
}
