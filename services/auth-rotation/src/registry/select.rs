//! Which credential serves a call: a pure function of one provider's live
//! state and the time, so its rules are unit-tested without a clock, a
//! store or a network.
//!
//! The rules (docs/architecture.md, "Reliability semantics"): a provider
//! that failed its last health check serves nothing; the model's endpoint
//! breaker must let the call through; credentials are tried in slot order
//! (primary, secondary, OAuth2), skipping invalid, revoked, cooling and
//! open-breaker ones — so once the primary recovers it takes traffic
//! again. The call is admitted through both breakers (in half-open state it
//! becomes the probe).

use std::time::{Duration, Instant};

use moltbot_proto::auth::v1::CredentialState;

use super::state::ProviderState;
use crate::AuthError;

/// Picks the credential of `p` for `model` at `now` and admits the call;
/// returns its index in `p.creds`.
///
/// Errors: [`AuthError::NotFound`] when `p` does not serve `model`;
/// [`AuthError::Unavailable`] when the provider is unhealthy, the endpoint's
/// breaker is open (or its probe is out), or every credential is invalid,
/// revoked, cooling or behind an open breaker — the message gives the
/// soonest retry-after in milliseconds.
pub fn select(p: &mut ProviderState, model: &str, now: Instant) -> Result<usize, AuthError> {
    let provider = p.row.name.clone();
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
    p.creds[i].breaker.admit(now);
    Ok(i)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::{Duration, Instant, SystemTime};

    use moltbot_proto::auth::v1::{BreakerState, CredentialSlot, CredentialState};

    use super::*;
    use crate::{
        crypto::Secret,
        registry::{
            breaker::{Breaker, Cooldown, FAILURE_THRESHOLD},
            state::Cred,
        },
        store::ProviderRow,
    };

    pub const COOLDOWN: Cooldown = Cooldown {
        base: Duration::from_secs(5),
        max: Duration::from_secs(60),
    };

    /// A provider `p` serving `m` with a primary and a secondary key.
    pub fn provider() -> ProviderState {
        let mut p = ProviderState::new(ProviderRow {
            name: "p".into(),
            kind: 1,
            base_url: "https://p.example/v1".into(),
            models: vec!["m".into()],
            health_interval_s: 30,
        });
        for (id, slot) in [
            ("p-primary", CredentialSlot::Primary),
            ("p-secondary", CredentialSlot::Secondary),
        ] {
            p.creds.push(Cred {
                id: id.into(),
                slot,
                state: CredentialState::Active,
                cooling_until: None,
                breaker: Breaker::default(),
                secret: Secret::new(format!("sk-{id}")),
                oauth: None,
            });
        }
        p
    }

    fn open(b: &mut Breaker, now: Instant) {
        for _ in 0..FAILURE_THRESHOLD {
            b.failure(now, COOLDOWN);
        }
    }

    #[test]
    fn the_primary_serves_first() {
        let mut p = provider();
        assert_eq!(select(&mut p, "m", Instant::now()).unwrap(), 0);
    }

    #[test]
    fn a_cooling_primary_hands_over_to_the_secondary_until_it_has_cooled() {
        let t0 = Instant::now();
        let mut p = provider();
        p.creds[0].cooling_until = Some((t0 + Duration::from_secs(30), SystemTime::now()));
        assert_eq!(select(&mut p, "m", t0).unwrap(), 1);
        // Both cooling: the error says when to come back.
        p.creds[1].cooling_until = Some((t0 + Duration::from_secs(20), SystemTime::now()));
        let e = select(&mut p, "m", t0).unwrap_err().to_string();
        assert!(e.contains("retry after 20000 ms"), "{e}");
        // The primary has cooled: it serves again.
        assert_eq!(
            select(&mut p, "m", t0 + Duration::from_secs(31)).unwrap(),
            0
        );
    }

    #[test]
    fn traffic_returns_to_the_primary_once_its_probe_succeeds() {
        let t0 = Instant::now();
        let mut p = provider();
        open(&mut p.creds[0].breaker, t0);
        assert_eq!(select(&mut p, "m", t0).unwrap(), 1, "secondary while open");
        // After the cool-down the primary is half-open: the next call is its
        // probe, and the call after it goes to the secondary meanwhile.
        let t1 = t0 + COOLDOWN.base;
        assert_eq!(p.creds[0].breaker.state(t1), BreakerState::HalfOpen);
        assert_eq!(select(&mut p, "m", t1).unwrap(), 0, "the probe");
        assert_eq!(select(&mut p, "m", t1).unwrap(), 1, "one probe at a time");
        p.creds[0].breaker.success();
        assert_eq!(select(&mut p, "m", t1).unwrap(), 0, "back on the primary");
    }

    #[test]
    fn invalid_and_revoked_keys_are_never_leased() {
        let mut p = provider();
        p.creds[0].state = CredentialState::Invalid;
        p.creds[1].state = CredentialState::Revoked;
        let e = select(&mut p, "m", Instant::now()).unwrap_err().to_string();
        assert!(e.contains("invalid or revoked; rotate one"), "{e}");
    }

    #[test]
    fn an_open_endpoint_breaker_or_a_failed_health_check_refuses_every_key() {
        let t0 = Instant::now();
        let mut p = provider();
        open(p.endpoints.get_mut("m").unwrap(), t0);
        let e = select(&mut p, "m", t0).unwrap_err().to_string();
        assert!(e.contains("breaker open; retry after 5000 ms"), "{e}");
        let mut p = provider();
        p.healthy = false;
        assert!(matches!(
            select(&mut p, "m", t0),
            Err(AuthError::Unavailable { .. })
        ));
        assert!(matches!(
            select(&mut provider(), "other", t0),
            Err(AuthError::NotFound(_))
        ));
    }
}
