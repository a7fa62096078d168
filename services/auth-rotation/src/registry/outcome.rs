//! What the outcome of a leased call does to a provider's live state: a
//! pure function of the state, the outcome and the time, unit-tested
//! without a clock, a store or a network.
//!
//! The rules (docs/architecture.md, "Reliability semantics"):
//!
//! | outcome | endpoint breaker | credential |
//! |---|---|---|
//! | ok | success (closes) | breaker success |
//! | 5xx, timeout, connection error | failure | breaker failure |
//! | 429 | probe released | cools for `Retry-After` (capped; default when absent) |
//! | 401/403 | probe released | invalid until rotated |
//! | 400/404/413/422 (the client's error) | probe released | unchanged |

use std::time::{Duration, Instant, SystemTime};

use moltbot_proto::auth::v1::{CredentialState, Outcome, ReportOutcomeResponse};

use super::{Settings, state::ProviderState};
use crate::AuthError;

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

/// What applying an outcome changed.
#[derive(Debug)]
pub struct Applied {
    /// The states after it, as ReportOutcome answers them.
    pub response: ReportOutcomeResponse,
    /// The credential just marked invalid (to persist), if any.
    pub invalidated: Option<String>,
}

/// Applies `outcome` of a call by `credential_id` to `model` of `p` at `now`
/// (`wall` is the same instant on the wall clock, for the cool-down shown to
/// clients).
///
/// Errors: [`AuthError::InvalidArgument`] for an unspecified outcome;
/// [`AuthError::NotFound`] when the credential is gone.
pub fn apply(
    p: &mut ProviderState,
    model: &str,
    credential_id: &str,
    outcome: Outcome,
    retry_after_ms: u64,
    (now, wall): (Instant, SystemTime),
    settings: &Settings,
) -> Result<Applied, AuthError> {
    if outcome == Outcome::Unspecified {
        return Err(AuthError::InvalidArgument("outcome is unspecified".into()));
    }
    let cooldown = settings.cooldown;
    let endpoint = p.endpoints.entry(model.to_owned()).or_default();
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
        .find(|c| c.id == credential_id)
        .ok_or_else(|| AuthError::NotFound(format!("credential `{credential_id}` is gone")))?;
    let mut invalidated = None;
    match outcome {
        Outcome::Ok => c.breaker.success(),
        Outcome::ServerError | Outcome::Timeout | Outcome::ConnectionError => {
            c.breaker.failure(now, cooldown)
        }
        Outcome::RateLimited => {
            c.breaker.neutral();
            let wait = cooling_for(retry_after_ms, settings);
            c.cooling_until = Some((now + wait, wall + wait));
        }
        Outcome::AuthFailed => {
            c.breaker.neutral();
            if c.state == CredentialState::Active {
                c.state = CredentialState::Invalid;
                invalidated = Some(c.id.clone());
            }
        }
        Outcome::ClientError => c.breaker.neutral(),
        Outcome::Unspecified => {}
    }
    Ok(Applied {
        response: ReportOutcomeResponse {
            credential_state: c.effective_state(now) as i32,
            credential_breaker: c.breaker.state(now) as i32,
            endpoint_breaker: endpoint_state as i32,
        },
        invalidated,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::{Duration, Instant, SystemTime};

    use moltbot_proto::auth::v1::{BreakerState, CredentialState, Outcome};

    use super::*;
    use crate::registry::select::{
        select,
        tests::{COOLDOWN, provider},
    };

    fn settings() -> Settings {
        Settings {
            cooldown: COOLDOWN,
            lease_ttl: Duration::from_secs(600),
            default_retry_after: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(600),
            token_refresh_margin: Duration::from_secs(60),
        }
    }

    fn report(
        p: &mut ProviderState,
        outcome: Outcome,
        retry_after_ms: u64,
        now: Instant,
    ) -> Applied {
        apply(
            p,
            "m",
            "p-primary",
            outcome,
            retry_after_ms,
            (now, SystemTime::now()),
            &settings(),
        )
        .unwrap()
    }

    #[test]
    fn a_client_error_counts_nowhere() {
        let t = Instant::now();
        let mut p = provider();
        for _ in 0..5 {
            select(&mut p, "m", t).unwrap();
            let a = report(&mut p, Outcome::ClientError, 0, t);
            assert_eq!(a.response.credential_state, CredentialState::Active as i32);
            assert_eq!(a.response.credential_breaker, BreakerState::Closed as i32);
            assert_eq!(a.response.endpoint_breaker, BreakerState::Closed as i32);
        }
        assert_eq!(p.creds[0].breaker.failures(), 0);
        assert_eq!(select(&mut p, "m", t).unwrap(), 0, "the same key serves on");
    }

    #[test]
    fn three_server_errors_open_both_breakers() {
        let t = Instant::now();
        let mut p = provider();
        let mut last = None;
        for _ in 0..3 {
            last = Some(report(&mut p, Outcome::ServerError, 0, t));
        }
        let a = last.unwrap();
        assert_eq!(a.response.credential_breaker, BreakerState::Open as i32);
        assert_eq!(a.response.endpoint_breaker, BreakerState::Open as i32);
    }

    #[test]
    fn a_429_cools_for_retry_after_capped_or_the_default() {
        let t = Instant::now();
        let mut p = provider();
        report(&mut p, Outcome::RateLimited, 30_000, t);
        let until = p.creds[0].cooling_until.unwrap().0;
        assert_eq!(until - t, Duration::from_secs(30));
        assert_eq!(p.creds[0].breaker.failures(), 0, "not a breaker failure");
        // A provider asking for a day gets the cap; none asked: the default.
        report(&mut p, Outcome::RateLimited, 86_400_000, t);
        assert_eq!(
            p.creds[0].cooling_until.unwrap().0 - t,
            Duration::from_secs(600)
        );
        report(&mut p, Outcome::RateLimited, 0, t);
        assert_eq!(
            p.creds[0].cooling_until.unwrap().0 - t,
            Duration::from_secs(60)
        );
        // Meanwhile the secondary serves; afterwards the primary again.
        assert_eq!(select(&mut p, "m", t).unwrap(), 1);
        assert_eq!(select(&mut p, "m", t + Duration::from_secs(61)).unwrap(), 0);
    }

    #[test]
    fn a_401_invalidates_once_and_asks_to_persist_it() {
        let t = Instant::now();
        let mut p = provider();
        let a = report(&mut p, Outcome::AuthFailed, 0, t);
        assert_eq!(a.invalidated.as_deref(), Some("p-primary"));
        assert_eq!(a.response.credential_state, CredentialState::Invalid as i32);
        assert!(
            report(&mut p, Outcome::AuthFailed, 0, t)
                .invalidated
                .is_none()
        );
        assert_eq!(select(&mut p, "m", t).unwrap(), 1);
    }

    #[test]
    fn a_rate_limited_probe_frees_the_slot_and_a_good_one_closes() {
        let t0 = Instant::now();
        let mut p = provider();
        for _ in 0..3 {
            report(&mut p, Outcome::ServerError, 0, t0);
        }
        let t1 = t0 + COOLDOWN.base;
        // The endpoint is half-open: the first call is its probe. It comes
        // back 429, which says nothing about the endpoint: the next call may
        // probe again, and its success closes everything.
        assert_eq!(select(&mut p, "m", t1).unwrap(), 0);
        report(&mut p, Outcome::RateLimited, 1, t1);
        let t2 = t1 + Duration::from_millis(5);
        let i = select(&mut p, "m", t2).unwrap();
        let id = p.creds[i].id.clone();
        let a = apply(
            &mut p,
            "m",
            &id,
            Outcome::Ok,
            0,
            (t2, SystemTime::now()),
            &settings(),
        )
        .unwrap();
        assert_eq!(a.response.endpoint_breaker, BreakerState::Closed as i32);
    }

    #[test]
    fn unspecified_outcomes_and_unknown_credentials_are_errors() {
        let mut p = provider();
        let now = (Instant::now(), SystemTime::now());
        assert!(matches!(
            apply(
                &mut p,
                "m",
                "p-primary",
                Outcome::Unspecified,
                0,
                now,
                &settings()
            ),
            Err(AuthError::InvalidArgument(_))
        ));
        assert!(matches!(
            apply(&mut p, "m", "gone", Outcome::Ok, 0, now, &settings()),
            Err(AuthError::NotFound(_))
        ));
    }
}
