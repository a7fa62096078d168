//! The registry's live state — providers, their credentials and endpoint
//! breakers — and how clients see it (statuses without secrets). A stored
//! row becomes live state only when every field is valid: a corrupt row is
//! an error, never an active credential.

use std::{
    collections::BTreeMap,
    time::{Instant, SystemTime},
};

use moltbot_proto::auth::v1::{
    CredentialSlot, CredentialState, CredentialStatus, EndpointStatus, ProviderStatus,
};

use super::breaker::Breaker;
use crate::{
    AuthError,
    crypto::Secret,
    store::{CredentialRow, ProviderRow},
};

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
    /// Active, invalid or revoked as stored; cooling while a 429's
    /// cool-down lasts.
    pub fn effective_state(&self, now: Instant) -> CredentialState {
        match (self.state, self.cooling_until) {
            (CredentialState::Active, Some((until, _))) if now < until => CredentialState::Cooling,
            (s, _) => s,
        }
    }
}

impl Cred {
    /// Live state from a stored row and its decrypted `secret`. Errors with
    /// [`AuthError::Store`] when the row's slot or state is not a known
    /// value (a corrupt or hand-edited row), naming the row.
    pub fn from_row(row: &CredentialRow, secret: Secret) -> Result<Self, AuthError> {
        let corrupt = |what: String| {
            AuthError::Store(format!(
                "credential row `{}` has an invalid {what}; rotate or revoke it",
                row.id
            ))
        };
        let slot = CredentialSlot::try_from(row.slot)
            .ok()
            .filter(|s| *s != CredentialSlot::Unspecified)
            .ok_or_else(|| corrupt(format!("slot ({})", row.slot)))?;
        let state = CredentialState::try_from(row.state)
            .ok()
            .filter(|s| {
                matches!(
                    s,
                    CredentialState::Active | CredentialState::Invalid | CredentialState::Revoked
                )
            })
            .ok_or_else(|| corrupt(format!("state ({})", row.state)))?;
        let oauth = match (&row.token_url, &row.client_id) {
            (Some(token_url), Some(client_id)) => Some(OAuth {
                token_url: token_url.clone(),
                client_id: client_id.clone(),
                scopes: row.scopes.clone().unwrap_or_default(),
                token: None,
            }),
            (None, None) => None,
            _ => {
                return Err(corrupt(
                    "OAuth2 grant (a token URL without a client id, or the reverse)".into(),
                ));
            }
        };
        Ok(Self {
            id: row.id.clone(),
            slot,
            state,
            cooling_until: None,
            breaker: Breaker::default(),
            secret,
            oauth,
        })
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

impl ProviderState {
    /// A provider just loaded or configured: healthy until checked, no
    /// credentials yet, a closed breaker per model.
    pub fn new(row: ProviderRow) -> Self {
        let endpoints = row
            .models
            .iter()
            .map(|m| (m.clone(), Breaker::default()))
            .collect();
        Self {
            row,
            healthy: true,
            last_checked: None,
            health_detail: String::new(),
            creds: Vec::new(),
            endpoints,
        }
    }
}

/// A wall-clock time as a protobuf timestamp.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
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

/// The status of one credential as clients see it (no secret).
pub fn cred_status(c: &Cred, now: Instant) -> CredentialStatus {
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

/// `primary`, `secondary` or `oauth2`.
pub fn slot_name(slot: CredentialSlot) -> &'static str {
    match slot {
        CredentialSlot::Primary => "primary",
        CredentialSlot::Secondary => "secondary",
        CredentialSlot::Oauth2 => "oauth2",
        CredentialSlot::Unspecified => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(slot: i32, state: i32) -> CredentialRow {
        CredentialRow {
            id: "p-primary".into(),
            provider: "p".into(),
            slot,
            secret: Vec::new(),
            state,
            token_url: None,
            client_id: None,
            scopes: None,
        }
    }

    #[test]
    fn a_corrupt_row_is_an_error_not_an_active_credential() {
        let ok = Cred::from_row(
            &row(
                CredentialSlot::Secondary as i32,
                CredentialState::Invalid as i32,
            ),
            Secret::new("k"),
        );
        assert!(matches!(
            ok,
            Ok(Cred {
                state: CredentialState::Invalid,
                ..
            })
        ));
        for (slot, state) in [
            (99, 1),
            (0, 1),
            (1, 42),
            (1, CredentialState::Cooling as i32),
        ] {
            let e = Cred::from_row(&row(slot, state), Secret::new("k"));
            assert!(
                matches!(&e, Err(AuthError::Store(m)) if m.contains("p-primary")),
                "slot {slot} state {state}: {e:?}"
            );
        }
        let mut half_oauth = row(3, 1);
        half_oauth.token_url = Some("https://idp.example/token".into());
        assert!(Cred::from_row(&half_oauth, Secret::new("k")).is_err());
    }
}
