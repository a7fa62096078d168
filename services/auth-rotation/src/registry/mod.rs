//! The registry: providers, credentials and endpoints, and the stream of
//! their state changes. The store holds what must survive a restart
//! (providers, ciphertext, invalid/revoked states) and what replicas share:
//! leases (any replica takes any report) and the event log of outcomes and
//! configuration changes, which [`follow`] applies to every other replica's
//! breakers, cool-downs and credentials. Breakers, cool-downs and OAuth2
//! access tokens live here. By concern:
//!
//! - [`state`]: the live state and its client-facing statuses;
//! - [`select`]: which credential a lease gets (pure);
//! - [`outcome`]: what a reported outcome changes (pure);
//! - [`breaker`]: the circuit breaker;
//! - `oauth`: OAuth2 token fetches and refreshes;
//! - [`health`]: the periodic health checks;
//! - [`follow`]: the other replicas' events.
//!
//! This module owns the lock, the leases, persistence and events.

pub mod breaker;
pub mod follow;
pub mod health;
mod oauth;
pub mod outcome;
pub mod select;
pub mod state;
pub mod url;

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use moltbot_proto::auth::v1::{
    BreakerState, CredentialSlot, CredentialState, CredentialStatus, Lease, Outcome, ProviderKind,
    ProviderStatus, ReportOutcomeResponse, WatchProviderHealthResponse,
};
use rand::Rng;
use tokio::sync::broadcast;

use crate::{
    AuthError,
    crypto::{MasterKey, Secret},
    store::{
        CredentialRow, ProviderRow, Store,
        shared::{self, EventRow, LeaseRow},
    },
};

/// 16 random bytes in hex: lease ids and replica ids.
fn random_id() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
use breaker::Cooldown;
use oauth::TokenFetch;
pub use state::{Cred, OAuth, ProviderState, cred_status, slot_name, status_of, timestamp};

/// Settings of the registry.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Breaker cool-downs.
    pub cooldown: Cooldown,
    /// Life of a lease.
    pub lease_ttl: Duration,
    /// Cool-down of a 429 without `Retry-After`.
    pub default_retry_after: Duration,
    /// Longest cool-down a `Retry-After` may ask for.
    pub max_retry_after: Duration,
    /// Refresh OAuth2 tokens this long before they expire.
    pub token_refresh_margin: Duration,
}

#[derive(Default)]
struct Inner {
    providers: BTreeMap<String, ProviderState>,
}

/// The registry.
pub struct Registry {
    inner: Mutex<Inner>,
    /// The durable store.
    pub store: Store,
    key: MasterKey,
    events: broadcast::Sender<WatchProviderHealthResponse>,
    /// Settings.
    pub settings: Settings,
    http: reqwest::Client,
    /// This replica's id in the event log (random per process).
    origin: String,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// Loads providers and credentials from `store`, decrypting secrets with
    /// `key`. Errors with [`AuthError::Crypto`] when a secret does not decrypt
    /// (wrong master key).
    pub async fn load(store: Store, key: MasterKey, settings: Settings) -> Result<Self, AuthError> {
        let mut inner = Inner::default();
        for row in store.providers().await? {
            inner
                .providers
                .insert(row.name.clone(), ProviderState::new(row));
        }
        for c in store.credentials().await? {
            let secret = key.open(&c.id, &c.secret)?;
            if let Some(p) = inner.providers.get_mut(&c.provider) {
                p.creds.push(Cred::from_row(&c, secret)?);
            }
        }
        let (events, _) = broadcast::channel(1024);
        Ok(Self {
            inner: Mutex::new(inner),
            store,
            key,
            events,
            settings,
            http: moltbot_runtime::tls::ProviderClient {
                timeout: Some(Duration::from_secs(10)),
                pool_per_host: 4,
            }
            .build()
            .map_err(AuthError::Config)?,
            origin: random_id(),
        })
    }

    /// Logs a change to `provider`'s configuration for the other replicas.
    async fn announce_config(&self, provider: &str) {
        let event = EventRow {
            seq: 0,
            origin: self.origin.clone(),
            kind: shared::CONFIG.to_owned(),
            provider: provider.to_owned(),
            model: String::new(),
            credential_id: String::new(),
            outcome: 0,
            retry_after_ms: 0,
            at_ms: 0,
        };
        if let Err(e) = self.store.append_event(&event).await {
            tracing::warn!(provider, error = %e, "cannot log a configuration change for other replicas");
        }
    }

    /// The HTTP client of health checks and token requests. No redirects (a
    /// redirect could point at an internal host), and names are resolved
    /// through [`moltbot_runtime::egress::GuardedResolver`] (so a name cannot
    /// rebind to one either).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Subscribes to state changes.
    pub fn subscribe(&self) -> broadcast::Receiver<WatchProviderHealthResponse> {
        self.events.subscribe()
    }

    fn emit(&self, status: ProviderStatus, reason: impl Into<String>) {
        let _ = self.events.send(WatchProviderHealthResponse {
            provider: Some(status),
            changed_at: Some(timestamp(SystemTime::now())),
            reason: reason.into(),
        });
    }

    /// Every provider's status, by name.
    pub fn list(&self) -> Vec<ProviderStatus> {
        let now = Instant::now();
        lock(&self.inner)
            .providers
            .values()
            .map(|p| status_of(p, now))
            .collect()
    }

    /// What the health checker needs of every provider: name, base URL and
    /// check interval in seconds (no credentials, no breaker state).
    pub fn probe_targets(&self) -> Vec<(String, String, u32)> {
        lock(&self.inner)
            .providers
            .values()
            .map(|p| {
                (
                    p.row.name.clone(),
                    p.row.base_url.clone(),
                    p.row.health_interval_s,
                )
            })
            .collect()
    }

    /// Creates or updates a provider (URL validated by the caller).
    pub async fn upsert_provider(&self, row: ProviderRow) -> Result<ProviderStatus, AuthError> {
        self.store.upsert_provider(&row).await?;
        let now = Instant::now();
        let status = {
            let mut inner = lock(&self.inner);
            let p = inner
                .providers
                .entry(row.name.clone())
                .or_insert_with(|| ProviderState::new(row.clone()));
            p.row = row.clone();
            p.endpoints.retain(|m, _| row.models.contains(m));
            for m in &row.models {
                p.endpoints.entry(m.clone()).or_default();
            }
            status_of(p, now)
        };
        self.emit(status.clone(), "provider configured");
        self.announce_config(&row.name).await;
        Ok(status)
    }

    /// Stores (encrypted) and activates a credential in its slot.
    pub async fn put_credential(
        &self,
        provider: &str,
        slot: CredentialSlot,
        secret: Secret,
        oauth: Option<OAuth>,
    ) -> Result<CredentialStatus, AuthError> {
        if !lock(&self.inner).providers.contains_key(provider) {
            return Err(AuthError::NotFound(format!(
                "provider `{provider}` does not exist"
            )));
        }
        let id = format!("{provider}-{}", slot_name(slot));
        let row = CredentialRow {
            id: id.clone(),
            provider: provider.to_owned(),
            slot: slot as i32,
            secret: self.key.seal(&id, &secret)?,
            state: CredentialState::Active as i32,
            token_url: oauth.as_ref().map(|o| o.token_url.clone()),
            client_id: oauth.as_ref().map(|o| o.client_id.clone()),
            scopes: oauth.as_ref().map(|o| o.scopes.clone()),
        };
        self.store.put_credential(&row).await?;
        let now = Instant::now();
        let (status, pstatus) = {
            let mut inner = lock(&self.inner);
            let p = inner.providers.get_mut(provider).ok_or_else(|| {
                AuthError::NotFound(format!("provider `{provider}` does not exist"))
            })?;
            p.creds.retain(|c| c.slot != slot);
            p.creds.push(Cred::from_row(&row, secret)?);
            p.creds.sort_by_key(|c| c.slot as i32);
            let c = p
                .creds
                .iter()
                .find(|c| c.slot == slot)
                .map(|c| cred_status(c, now));
            (c, status_of(p, now))
        };
        tracing::info!(provider, credential_id = %id, "credential stored");
        self.emit(pstatus, format!("credential {id} set"));
        self.announce_config(provider).await;
        status.ok_or(AuthError::NotFound(id))
    }

    /// Credential statuses of a provider.
    pub fn credentials(&self, provider: &str) -> Vec<CredentialStatus> {
        let now = Instant::now();
        lock(&self.inner)
            .providers
            .get(provider)
            .map(|p| p.creds.iter().map(|c| cred_status(c, now)).collect())
            .unwrap_or_default()
    }

    /// The OAuth2 grant of a slot, for rotation of its client secret.
    pub fn oauth_of(&self, provider: &str, slot: CredentialSlot) -> Option<OAuth> {
        lock(&self.inner)
            .providers
            .get(provider)?
            .creds
            .iter()
            .find(|c| c.slot == slot)?
            .oauth
            .clone()
            .map(|mut o| {
                o.token = None;
                o
            })
    }

    /// Revokes a credential: it is never leased again until rotated.
    pub async fn revoke(
        &self,
        provider: &str,
        credential_id: &str,
    ) -> Result<CredentialStatus, AuthError> {
        self.set_state(
            provider,
            credential_id,
            CredentialState::Revoked,
            "credential revoked",
        )
        .await
    }

    async fn set_state(
        &self,
        provider: &str,
        credential_id: &str,
        state: CredentialState,
        reason: &str,
    ) -> Result<CredentialStatus, AuthError> {
        let now = Instant::now();
        let (status, pstatus) = {
            let mut inner = lock(&self.inner);
            let p = inner.providers.get_mut(provider).ok_or_else(|| {
                AuthError::NotFound(format!("provider `{provider}` does not exist"))
            })?;
            let c = p
                .creds
                .iter_mut()
                .find(|c| c.id == credential_id)
                .ok_or_else(|| {
                    AuthError::NotFound(format!("credential `{credential_id}` does not exist"))
                })?;
            c.state = state;
            (cred_status(c, now), status_of(p, now))
        };
        self.store.set_state(credential_id, state as i32).await?;
        tracing::warn!(provider, credential_id, state = ?state, reason, "credential state changed");
        self.emit(pstatus, format!("{reason}: {credential_id}"));
        self.announce_config(provider).await;
        Ok(status)
    }

    /// Leases a usable credential for `provider` and `model`.
    ///
    /// Errors: [`AuthError::NotFound`] for an unknown provider or model;
    /// [`AuthError::Unavailable`] when the provider is unhealthy, the model's
    /// endpoint breaker is open, or every credential is invalid, revoked,
    /// cooling or behind an open breaker (the message gives the retry-after).
    pub async fn acquire(&self, provider: &str, model: &str) -> Result<Lease, AuthError> {
        let now = Instant::now();
        let chosen = {
            let mut inner = lock(&self.inner);
            let p = inner.providers.get_mut(provider).ok_or_else(|| {
                AuthError::NotFound(format!("provider `{provider}` does not exist"))
            })?;
            let i = select::select(p, model, now)?;
            let c = &p.creds[i];
            let kind = ProviderKind::try_from(p.row.kind).unwrap_or(ProviderKind::Openai);
            let base_url = p.row.base_url.clone();
            let fetch = match &c.oauth {
                Some(o) => match &o.token {
                    Some((token, exp))
                        if *exp > SystemTime::now() + self.settings.token_refresh_margin =>
                    {
                        Ok(token.clone())
                    }
                    _ => Err(TokenFetch {
                        provider: provider.to_owned(),
                        credential_id: c.id.clone(),
                        token_url: o.token_url.clone(),
                        client_id: o.client_id.clone(),
                        client_secret: c.secret.clone(),
                        scopes: o.scopes.clone(),
                    }),
                },
                None => Ok(c.secret.clone()),
            };
            (c.id.clone(), c.oauth.is_some(), kind, base_url, fetch)
        };
        let (credential_id, oauth, kind, base_url, fetch) = chosen;
        let secret = match fetch {
            Ok(s) => s,
            Err(f) => self.fetch_token(f).await?,
        };
        let (name, value) = match (kind, oauth) {
            // A provider registered without a credential (NoAuth).
            _ if secret.expose().is_empty() => ("", String::new()),
            (ProviderKind::Anthropic, false) => ("x-api-key", secret.expose().to_owned()),
            _ => ("authorization", format!("Bearer {}", secret.expose())),
        };
        let lease_id = random_id();
        // In the store, so that whichever replica the report reaches can
        // take it.
        self.store
            .insert_lease(&LeaseRow {
                id: lease_id.clone(),
                provider: provider.to_owned(),
                model: model.to_owned(),
                credential_id: credential_id.clone(),
                expires_at_ms: crate::store::now_ms() + self.settings.lease_ttl.as_millis() as i64,
            })
            .await?;
        tracing::debug!(provider, model, credential_id = %credential_id, "lease granted");
        Ok(Lease {
            lease_id,
            provider: provider.to_owned(),
            model: model.to_owned(),
            kind: kind as i32,
            base_url,
            auth_header_name: name.to_owned(),
            auth_header_value: value,
            expires_at: Some(timestamp(SystemTime::now() + self.settings.lease_ttl)),
            credential_id,
        })
    }

    /// Applies the outcome of a leased call.
    ///
    /// Errors: [`AuthError::InvalidArgument`] for an unspecified outcome;
    /// [`AuthError::NotFound`] for an unknown, already reported or expired
    /// lease.
    pub async fn report(
        &self,
        lease_id: &str,
        outcome: Outcome,
        http_status: u32,
        retry_after_ms: u64,
    ) -> Result<ReportOutcomeResponse, AuthError> {
        if outcome == Outcome::Unspecified {
            return Err(AuthError::InvalidArgument("outcome is unspecified".into()));
        }
        let lease = self.store.take_lease(lease_id).await?.ok_or_else(|| {
            AuthError::NotFound(format!(
                "lease `{lease_id}` is unknown, reported or expired"
            ))
        })?;
        let now = Instant::now();
        let persist_invalid;
        let (response, changed) = {
            let mut inner = lock(&self.inner);
            let p = inner.providers.get_mut(&lease.provider).ok_or_else(|| {
                AuthError::NotFound(format!("provider `{}` is gone", lease.provider))
            })?;
            let before = status_of(p, now);
            let applied = outcome::apply(
                p,
                &lease.model,
                &lease.credential_id,
                outcome,
                retry_after_ms,
                (now, SystemTime::now()),
                &self.settings,
            )?;
            persist_invalid = applied.invalidated;
            let response = applied.response;
            let after = status_of(p, now);
            // Per request: a success is routine (debug); anything else
            // changes what the next lease gets, and is logged.
            if outcome == Outcome::Ok {
                tracing::debug!(
                    provider = %lease.provider,
                    model = %lease.model,
                    credential_id = %lease.credential_id,
                    http_status,
                    "outcome reported"
                );
            } else {
                tracing::info!(
                    provider = %lease.provider,
                    model = %lease.model,
                    credential_id = %lease.credential_id,
                    outcome = ?outcome,
                    http_status,
                    "outcome reported"
                );
            }
            (response, (before != after).then_some(after))
        };
        if let Some(id) = persist_invalid {
            self.store
                .set_state(&id, CredentialState::Invalid as i32)
                .await?;
        }
        if let Some(status) = changed {
            self.emit(status, format!("outcome {outcome:?} (HTTP {http_status})"));
        }
        let event = EventRow {
            seq: 0,
            origin: self.origin.clone(),
            kind: shared::OUTCOME.to_owned(),
            provider: lease.provider.clone(),
            model: lease.model.clone(),
            credential_id: lease.credential_id.clone(),
            outcome: outcome as i32,
            retry_after_ms,
            at_ms: 0,
        };
        if let Err(e) = self.store.append_event(&event).await {
            tracing::warn!(error = %e, "cannot log an outcome for other replicas");
        }
        Ok(response)
    }

    /// Records a health-check result; emits a change when health flips (or
    /// on the first check).
    pub fn record_health(&self, provider: &str, healthy: bool, reason: String) {
        let now = Instant::now();
        let changed = {
            let mut inner = lock(&self.inner);
            let Some(p) = inner.providers.get_mut(provider) else {
                return;
            };
            let first = p.last_checked.is_none();
            let flipped = p.healthy != healthy;
            p.healthy = healthy;
            p.last_checked = Some(SystemTime::now());
            p.health_detail.clone_from(&reason);
            (first || flipped).then(|| status_of(p, now))
        };
        if let Some(status) = changed {
            if healthy {
                tracing::info!(provider, %reason, "provider healthy");
            } else {
                tracing::warn!(provider, %reason, "provider unhealthy");
            }
            self.emit(status, reason);
        }
    }

    /// The header a health check of `provider` authenticates with: from the
    /// first active API-key credential, none otherwise.
    pub fn probe_auth(&self, provider: &str) -> Option<(&'static str, String)> {
        let inner = lock(&self.inner);
        let p = inner.providers.get(provider)?;
        let kind = ProviderKind::try_from(p.row.kind).unwrap_or(ProviderKind::Openai);
        let c = p
            .creds
            .iter()
            .find(|c| c.state == CredentialState::Active && c.oauth.is_none())?;
        if c.secret.expose().is_empty() {
            return None;
        }
        Some(match kind {
            ProviderKind::Anthropic => ("x-api-key", c.secret.expose().to_owned()),
            _ => ("authorization", format!("Bearer {}", c.secret.expose())),
        })
    }

    /// Whether a breaker is open anywhere (for metrics).
    pub fn breaker_states(&self) -> Vec<(String, String, BreakerState)> {
        let now = Instant::now();
        let inner = lock(&self.inner);
        inner
            .providers
            .values()
            .flat_map(|p| {
                p.creds
                    .iter()
                    .map(move |c| (p.row.name.clone(), c.id.clone(), c.breaker.state(now)))
            })
            .collect()
    }
}
