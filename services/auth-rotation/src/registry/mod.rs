//! The live state of providers, credentials and endpoints: which credential a
//! lease gets, how outcomes move breakers and credential states, and the
//! stream of state changes. The store holds what must survive a restart
//! (providers, ciphertext, invalid/revoked states); cool-downs, breakers and
//! OAuth2 access tokens live here.

pub mod breaker;
pub mod health;
pub mod url;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use moltbot_proto::auth::v1::{
    BreakerState, CredentialSlot, CredentialState, CredentialStatus, EndpointStatus, Lease,
    Outcome, ProviderKind, ProviderStatus, ReportOutcomeResponse, WatchProviderHealthResponse,
};
use rand::Rng;
use tokio::sync::broadcast;

use crate::{
    AuthError,
    crypto::{MasterKey, Secret},
    store::{CredentialRow, ProviderRow, Store},
};
use breaker::{Breaker, Cooldown};

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

/// An OAuth2 client-credentials grant and its current access token.
#[derive(Debug, Clone)]
pub struct OAuth {
    /// Token endpoint.
    pub token_url: String,
    /// Client id.
    pub client_id: String,
    /// Scopes, space-separated.
    pub scopes: String,
    /// Current access token and its expiry.
    pub token: Option<(Secret, SystemTime)>,
}

/// One credential's live state.
#[derive(Debug, Clone)]
pub struct Cred {
    /// Id.
    pub id: String,
    /// Slot.
    pub slot: CredentialSlot,
    /// Active, invalid or revoked (cooling is `cooling_until`).
    pub state: CredentialState,
    /// End of a 429 cool-down.
    pub cooling_until: Option<(Instant, SystemTime)>,
    /// Its breaker.
    pub breaker: Breaker,
    /// The key, or the OAuth2 client secret.
    pub secret: Secret,
    /// OAuth2 grant, for the OAuth2 slot.
    pub oauth: Option<OAuth>,
}

impl Cred {
    fn effective_state(&self, now: Instant) -> CredentialState {
        match (self.state, self.cooling_until) {
            (CredentialState::Active, Some((until, _))) if now < until => CredentialState::Cooling,
            (s, _) => s,
        }
    }
}

/// One provider's live state.
#[derive(Debug, Clone)]
pub struct ProviderState {
    /// Its stored configuration.
    pub row: ProviderRow,
    /// Result of the last health check (true before the first).
    pub healthy: bool,
    /// Time of the last health check.
    pub last_checked: Option<SystemTime>,
    /// What the last health check found (empty before the first).
    pub health_detail: String,
    /// Credentials, by slot.
    pub creds: Vec<Cred>,
    /// Per-model endpoint breakers.
    pub endpoints: BTreeMap<String, Breaker>,
}

struct LeaseInfo {
    provider: String,
    model: String,
    credential_id: String,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    providers: BTreeMap<String, ProviderState>,
    leases: HashMap<String, LeaseInfo>,
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
}

/// How long a credential cools after a 429: the provider's `Retry-After`
/// (already in milliseconds; 0 when it sent none) capped at
/// `max_retry_after`, else `default_retry_after`.
pub fn cooling_for(retry_after_ms: u64, settings: &Settings) -> Duration {
    if retry_after_ms == 0 {
        settings.default_retry_after
    } else {
        Duration::from_millis(retry_after_ms).min(settings.max_retry_after)
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The status of `p` as clients see it (no secrets).
pub fn status_of(p: &ProviderState, now: Instant) -> ProviderStatus {
    ProviderStatus {
        name: p.row.name.clone(),
        kind: p.row.kind,
        base_url: p.row.base_url.clone(),
        models: p.row.models.clone(),
        healthy: p.healthy,
        last_checked_at: p.last_checked.map(timestamp),
        credentials: p.creds.iter().map(|c| cred_status(c, now)).collect(),
        endpoints: p
            .endpoints
            .iter()
            .map(|(model, b)| EndpointStatus {
                model: model.clone(),
                breaker: b.state(now) as i32,
                consecutive_failures: b.failures(),
            })
            .collect(),
        health_check_interval_seconds: p.row.health_interval_s,
        health_detail: p.health_detail.clone(),
    }
}

fn cred_status(c: &Cred, now: Instant) -> CredentialStatus {
    let state = c.effective_state(now);
    CredentialStatus {
        credential_id: c.id.clone(),
        slot: c.slot as i32,
        state: state as i32,
        breaker: c.breaker.state(now) as i32,
        consecutive_failures: c.breaker.failures(),
        cooling_until: match (state, c.cooling_until) {
            (CredentialState::Cooling, Some((_, wall))) => Some(timestamp(wall)),
            _ => None,
        },
        token_expires_at: c
            .oauth
            .as_ref()
            .and_then(|o| o.token.as_ref())
            .map(|(_, at)| timestamp(*at)),
    }
}

/// What a lease needs from an OAuth2 credential whose token must be fetched.
struct TokenFetch {
    provider: String,
    credential_id: String,
    token_url: String,
    client_id: String,
    client_secret: Secret,
    scopes: String,
}

impl Registry {
    /// Loads providers and credentials from `store`, decrypting secrets with
    /// `key`. Errors with [`AuthError::Crypto`] when a secret does not decrypt
    /// (wrong master key).
    pub async fn load(store: Store, key: MasterKey, settings: Settings) -> Result<Self, AuthError> {
        let mut inner = Inner::default();
        for row in store.providers().await? {
            let endpoints = row
                .models
                .iter()
                .map(|m| (m.clone(), Breaker::default()))
                .collect();
            inner.providers.insert(
                row.name.clone(),
                ProviderState {
                    row,
                    healthy: true,
                    last_checked: None,
                    health_detail: String::new(),
                    creds: Vec::new(),
                    endpoints,
                },
            );
        }
        for c in store.credentials().await? {
            let secret = key.open(&c.id, &c.secret)?;
            if let Some(p) = inner.providers.get_mut(&c.provider) {
                p.creds.push(cred_from(&c, secret));
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
        })
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
                .or_insert_with(|| ProviderState {
                    row: row.clone(),
                    healthy: true,
                    last_checked: None,
                    health_detail: String::new(),
                    creds: Vec::new(),
                    endpoints: BTreeMap::new(),
                });
            p.row = row.clone();
            p.endpoints.retain(|m, _| row.models.contains(m));
            for m in &row.models {
                p.endpoints.entry(m.clone()).or_default();
            }
            status_of(p, now)
        };
        self.emit(status.clone(), "provider configured");
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
            p.creds.push(cred_from(&row, secret));
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
            inner.leases.retain(|_, l| l.expires > now);
            let p = inner.providers.get_mut(provider).ok_or_else(|| {
                AuthError::NotFound(format!("provider `{provider}` does not exist"))
            })?;
            if !p.row.models.iter().any(|m| m == model) {
                return Err(AuthError::NotFound(format!(
                    "provider `{provider}` does not serve model `{model}`"
                )));
            }
            if !p.healthy {
                return Err(AuthError::Unavailable {
                    message: format!("provider `{provider}` failed its last health check"),
                });
            }
            let endpoint = p.endpoints.entry(model.to_owned()).or_default();
            if let Err(wait) = endpoint.check(now) {
                return Err(AuthError::Unavailable {
                    message: format!(
                        "endpoint {provider}/{model}: breaker open; retry after {} ms",
                        wait.as_millis().max(1)
                    ),
                });
            }
            let mut soonest: Option<Duration> = None;
            let mut pick = None;
            for (i, c) in p.creds.iter().enumerate() {
                let wait = match c.effective_state(now) {
                    CredentialState::Active => c.breaker.check(now).err(),
                    CredentialState::Cooling => c.cooling_until.map(|(u, _)| u - now),
                    _ => continue,
                };
                match wait {
                    None => {
                        pick = Some(i);
                        break;
                    }
                    Some(w) => soonest = Some(soonest.map_or(w, |s: Duration| s.min(w))),
                }
            }
            let Some(i) = pick else {
                return Err(AuthError::Unavailable {
                    message: match soonest {
                        Some(w) => format!(
                            "no usable credential for `{provider}`; retry after {} ms",
                            w.as_millis().max(1)
                        ),
                        None => format!(
                            "no usable credential for `{provider}`: every one is invalid or revoked; rotate one"
                        ),
                    },
                });
            };
            if let Some(e) = p.endpoints.get_mut(model) {
                e.admit(now);
            }
            let c = &mut p.creds[i];
            c.breaker.admit(now);
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
            (ProviderKind::Anthropic, false) => ("x-api-key", secret.expose().to_owned()),
            _ => ("authorization", format!("Bearer {}", secret.expose())),
        };
        let lease_id = {
            let bytes: [u8; 16] = rand::rng().random();
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        let expires = now + self.settings.lease_ttl;
        lock(&self.inner).leases.insert(
            lease_id.clone(),
            LeaseInfo {
                provider: provider.to_owned(),
                model: model.to_owned(),
                credential_id: credential_id.clone(),
                expires,
            },
        );
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

    /// Fetches an OAuth2 access token (RFC 6749 §4.4) and caches it.
    async fn fetch_token(&self, f: TokenFetch) -> Result<Secret, AuthError> {
        let mut form = vec![
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", f.client_id.clone()),
            ("client_secret", f.client_secret.expose().to_owned()),
        ];
        if !f.scopes.is_empty() {
            form.push(("scope", f.scopes.clone()));
        }
        let body = ::url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
            .finish();
        let response = self
            .http
            .post(&f.token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| AuthError::Unavailable {
                message: format!(
                    "token endpoint of `{}` unreachable: {}",
                    f.provider,
                    moltbot_runtime::tls::explain(&e)
                ),
            })?;
        let status = response.status();
        if !status.is_success() {
            if status.as_u16() == 401 || status.as_u16() == 400 {
                let _ = self
                    .set_state(
                        &f.provider,
                        &f.credential_id,
                        CredentialState::Invalid,
                        "token request rejected",
                    )
                    .await;
            }
            return Err(AuthError::Unavailable {
                message: format!("token endpoint of `{}` answered HTTP {status}", f.provider),
            });
        }
        let json: serde_json::Value =
            response.json().await.map_err(|_| AuthError::Unavailable {
                message: format!(
                    "token endpoint of `{}` sent an unreadable answer",
                    f.provider
                ),
            })?;
        let token = json["access_token"]
            .as_str()
            .ok_or_else(|| AuthError::Unavailable {
                message: format!("token endpoint of `{}` sent no access_token", f.provider),
            })?;
        let expires_in = json["expires_in"].as_u64().unwrap_or(3600);
        let secret = Secret::new(token);
        let expires = SystemTime::now() + Duration::from_secs(expires_in);
        let mut inner = lock(&self.inner);
        if let Some(c) = inner
            .providers
            .get_mut(&f.provider)
            .and_then(|p| p.creds.iter_mut().find(|c| c.id == f.credential_id))
            && let Some(o) = c.oauth.as_mut()
        {
            o.token = Some((secret.clone(), expires));
        }
        tracing::info!(provider = %f.provider, credential_id = %f.credential_id, expires_in, "OAuth2 token refreshed");
        Ok(secret)
    }

    /// OAuth2 credentials whose token expires within the refresh margin (or
    /// has none yet), for the background refresher.
    pub async fn refresh_tokens(&self) {
        let due: Vec<TokenFetch> = {
            let inner = lock(&self.inner);
            let soon = SystemTime::now() + self.settings.token_refresh_margin;
            inner
                .providers
                .values()
                .flat_map(|p| {
                    p.creds.iter().filter_map(move |c| {
                        let o = c.oauth.as_ref()?;
                        if c.state != CredentialState::Active {
                            return None;
                        }
                        let fresh = o.token.as_ref().is_some_and(|(_, exp)| *exp > soon);
                        (!fresh).then(|| TokenFetch {
                            provider: p.row.name.clone(),
                            credential_id: c.id.clone(),
                            token_url: o.token_url.clone(),
                            client_id: o.client_id.clone(),
                            client_secret: c.secret.clone(),
                            scopes: o.scopes.clone(),
                        })
                    })
                })
                .collect()
        };
        for f in due {
            if let Err(e) = self.fetch_token(f).await {
                tracing::warn!(error = %e, "OAuth2 token refresh failed");
            }
        }
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
        let now = Instant::now();
        let mut persist_invalid = None;
        let (response, changed) = {
            let mut inner = lock(&self.inner);
            let lease = inner
                .leases
                .remove(lease_id)
                .filter(|l| l.expires > now)
                .ok_or_else(|| {
                    AuthError::NotFound(format!(
                        "lease `{lease_id}` is unknown, reported or expired"
                    ))
                })?;
            let p = inner.providers.get_mut(&lease.provider).ok_or_else(|| {
                AuthError::NotFound(format!("provider `{}` is gone", lease.provider))
            })?;
            let before = status_of(p, now);
            let cooldown = self.settings.cooldown;
            let endpoint = p.endpoints.entry(lease.model.clone()).or_default();
            match outcome {
                Outcome::Ok => endpoint.success(),
                Outcome::ServerError | Outcome::Timeout | Outcome::ConnectionError => {
                    endpoint.failure(now, cooldown)
                }
                Outcome::RateLimited
                | Outcome::AuthFailed
                | Outcome::ClientError
                | Outcome::Unspecified => endpoint.neutral(),
            }
            let endpoint_state = endpoint.state(now);
            let c = p
                .creds
                .iter_mut()
                .find(|c| c.id == lease.credential_id)
                .ok_or_else(|| {
                    AuthError::NotFound(format!("credential `{}` is gone", lease.credential_id))
                })?;
            match outcome {
                Outcome::Ok => c.breaker.success(),
                Outcome::ServerError | Outcome::Timeout | Outcome::ConnectionError => {
                    c.breaker.failure(now, cooldown)
                }
                Outcome::RateLimited => {
                    c.breaker.neutral();
                    let wait = cooling_for(retry_after_ms, &self.settings);
                    c.cooling_until = Some((now + wait, SystemTime::now() + wait));
                }
                Outcome::ClientError => c.breaker.neutral(),
                Outcome::AuthFailed => {
                    c.breaker.neutral();
                    if c.state == CredentialState::Active {
                        c.state = CredentialState::Invalid;
                        persist_invalid = Some(c.id.clone());
                    }
                }
                Outcome::Unspecified => {}
            }
            let response = ReportOutcomeResponse {
                credential_state: c.effective_state(now) as i32,
                credential_breaker: c.breaker.state(now) as i32,
                endpoint_breaker: endpoint_state as i32,
            };
            let after = status_of(p, now);
            tracing::info!(
                provider = %lease.provider,
                model = %lease.model,
                credential_id = %lease.credential_id,
                outcome = ?outcome,
                http_status,
                "outcome reported"
            );
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

/// `primary`, `secondary` or `oauth2`.
pub fn slot_name(slot: CredentialSlot) -> &'static str {
    match slot {
        CredentialSlot::Primary => "primary",
        CredentialSlot::Secondary => "secondary",
        CredentialSlot::Oauth2 => "oauth2",
        CredentialSlot::Unspecified => "unspecified",
    }
}

fn cred_from(row: &CredentialRow, secret: Secret) -> Cred {
    let oauth = match (&row.token_url, &row.client_id) {
        (Some(token_url), Some(client_id)) => Some(OAuth {
            token_url: token_url.clone(),
            client_id: client_id.clone(),
            scopes: row.scopes.clone().unwrap_or_default(),
            token: None,
        }),
        _ => None,
    };
    Cred {
        id: row.id.clone(),
        slot: CredentialSlot::try_from(row.slot).unwrap_or(CredentialSlot::Primary),
        state: CredentialState::try_from(row.state).unwrap_or(CredentialState::Active),
        cooling_until: None,
        breaker: Breaker::default(),
        secret,
        oauth,
    }
}
