//! The one upstream call policy of a turn (docs/architecture.md,
//! "Reliability semantics"):
//!
//! - **one budget**: the turn's deadline ([`Budget`]) is handed down to every
//!   call; an attempt gets what is left (capped per stage), sent as its gRPC
//!   deadline and enforced here, once;
//! - **one table** of what a status code means ([`disposition`]): retry the
//!   same upstream, move to the route's next candidate model, or fail;
//! - **one walk** over the route's candidates ([`walk`]), used for token
//!   counting and for generation alike;
//! - **per-call metrics**: every attempt is counted by upstream, call and
//!   outcome (`moltbot_gateway_upstream_attempts_total`).
//!
//! A retried attempt goes through the balanced channel again, which picks an
//! endpoint afresh and ejects one that keeps failing
//! (`services/runtime/src/grpc/balance/`), so a replica killed mid-call
//! costs a retry, not the turn.

use std::{future::Future, time::Duration};

use rand::SeedableRng;
use tokio::time::Instant;

use super::{metrics, report::Attempt};
use crate::routing::{self, config::RetryPolicy};

/// Attempts of an idempotent single-upstream call, the first included.
pub const ATTEMPTS: u32 = 3;

/// The turn's deadline, shared by every stage.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    deadline: Instant,
}

impl Budget {
    /// A budget ending `timeout` from now.
    pub fn new(timeout: Duration) -> Self {
        Self {
            deadline: Instant::now() + timeout,
        }
    }

    /// When the turn must be done.
    pub fn deadline(self) -> Instant {
        self.deadline
    }

    /// Time left, zero once past.
    pub fn left(self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn spent(self) -> bool {
        Instant::now() >= self.deadline
    }

    /// This budget, ending no later than `cap` from now (a stage's own
    /// limit, such as the enrichment timeout).
    pub fn capped(self, cap: Duration) -> Self {
        Self {
            deadline: self.deadline.min(Instant::now() + cap),
        }
    }
}

/// What a failed attempt means for the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Try the same upstream again (after backoff): it may not have reached
    /// a working replica, or the replica was busy.
    Retry,
    /// This model cannot serve the request; the route's next candidate may.
    OtherCandidate,
    /// The request itself is wrong; nobody will do better.
    Fail,
}

/// The one table of status codes. RESOURCE_EXHAUSTED (every key of a remote
/// model rate limited, or a full queue) moves to the next candidate at once
/// when there is one (`more`): a turn never sleeps on a busy model while
/// another could answer; as the last candidate it is retried.
pub fn disposition(code: tonic::Code, more: bool) -> Disposition {
    use tonic::Code;
    match code {
        Code::ResourceExhausted if more => Disposition::OtherCandidate,
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::DataLoss
        | Code::Cancelled => Disposition::Retry,
        Code::NotFound | Code::Unimplemented | Code::Unauthenticated | Code::PermissionDenied => {
            Disposition::OtherCandidate
        }
        Code::Ok
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::AlreadyExists => Disposition::Fail,
    }
}

/// Snake-case name of a gRPC code (`deadline_exceeded`), as reported in
/// `moltbot.attempts` and the metrics' `outcome` label.
pub fn outcome_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Runs one attempt within `left`, the single place where a deadline is
/// enforced, and counts it under `upstream`/`call`.
async fn attempt<T, Fut>(
    upstream: &'static str,
    call: &'static str,
    left: Duration,
    fut: Fut,
) -> Result<T, tonic::Status>
where
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let result = match tokio::time::timeout(left, fut).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "{upstream}: no answer within {} ms",
            left.as_millis()
        ))),
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(status) => outcome_name(status.code()),
    };
    metrics::UPSTREAM_ATTEMPTS
        .with_label_values(&[upstream, call, outcome])
        .inc();
    result
}

/// Backoff of idempotent single-upstream calls before attempt `n + 1`:
/// 10 ms, then 20 ms (short: the next attempt goes to another replica).
fn call_backoff(n: u32) -> Duration {
    Duration::from_millis(10 * u64::from(n))
}

/// Runs an idempotent call to one upstream until it succeeds, fails with a
/// status the table does not retry, has been tried [`ATTEMPTS`] times, or
/// `budget` runs out. `op` gets the time left for its attempt.
///
/// Errors: the last attempt's status; DEADLINE_EXCEEDED naming `upstream`
/// when the budget ran out during an attempt.
pub async fn call<T, F, Fut>(
    upstream: &'static str,
    name: &'static str,
    budget: Budget,
    mut op: F,
) -> Result<T, tonic::Status>
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut n = 1;
    loop {
        let left = budget.left();
        match attempt(upstream, name, left, op(left)).await {
            Err(status)
                if disposition(status.code(), false) == Disposition::Retry
                    && status.code() != tonic::Code::DeadlineExceeded
                    && n < ATTEMPTS
                    && call_backoff(n) < budget.left() =>
            {
                tracing::info!(upstream, call = name, attempt = n, code = ?status.code(), error = %status.message(), "transient failure; retrying");
                tokio::time::sleep(call_backoff(n)).await;
                n += 1;
            }
            result => return result,
        }
    }
}

/// Why a walk over the candidates ended without a result.
#[derive(Debug)]
pub enum WalkError {
    /// A candidate answered with a status that fails the request itself
    /// (INVALID_ARGUMENT and the like).
    Fail(tonic::Status),
    /// Every candidate failed, or the budget ran out (`deadline`).
    Exhausted {
        /// True when the budget ran out before a candidate answered.
        deadline: bool,
    },
}

/// Tries `chain` in order under `retry` until `op` succeeds for one model,
/// recording every attempt in `attempts` and in the metrics under
/// `upstream`/`name`. Each model gets up to `retry.max_attempts` tries with
/// jittered exponential backoff ([`routing::backoff`]); what follows a
/// failure is [`disposition`]'s. No attempt starts that its backoff would
/// push past the budget.
///
/// Returns the model that answered and its result.
pub async fn walk<T, F, Fut>(
    upstream: &'static str,
    name: &'static str,
    chain: &[String],
    retry: &RetryPolicy,
    budget: Budget,
    attempts: &mut Vec<Attempt>,
    mut op: F,
) -> Result<(String, T), WalkError>
where
    F: FnMut(&str, Duration) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut rng = rand::rngs::StdRng::from_os_rng();
    'models: for (index, model) in chain.iter().enumerate() {
        let more = index + 1 < chain.len();
        for n in 1..=retry.max_attempts.max(1) {
            let wait = routing::backoff(retry, n, &mut rng);
            if wait >= budget.left() || budget.spent() {
                return Err(WalkError::Exhausted { deadline: true });
            }
            tokio::time::sleep(wait).await;
            let began = Instant::now();
            let left = budget.left();
            let result = attempt(upstream, name, left, op(model, left)).await;
            let latency_ms = began.elapsed().as_millis() as u64;
            match result {
                Ok(value) => {
                    attempts.push(Attempt {
                        model: model.clone(),
                        outcome: "ok".to_owned(),
                        latency_ms,
                        error: None,
                    });
                    return Ok((model.clone(), value));
                }
                Err(status) => {
                    let outcome = outcome_name(status.code());
                    tracing::warn!(model = %model, call = name, attempt = n, %outcome, error = %status.message(), "attempt failed");
                    attempts.push(Attempt {
                        model: model.clone(),
                        outcome: outcome.to_owned(),
                        latency_ms,
                        error: Some(status.message().to_owned()),
                    });
                    match disposition(status.code(), more) {
                        Disposition::Retry => {}
                        Disposition::OtherCandidate => continue 'models,
                        Disposition::Fail => return Err(WalkError::Fail(status)),
                    }
                    if budget.spent() {
                        return Err(WalkError::Exhausted { deadline: true });
                    }
                }
            }
        }
    }
    Err(WalkError::Exhausted { deadline: false })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn one_table_for_every_call() {
        use tonic::Code;
        assert_eq!(outcome_name(Code::DeadlineExceeded), "deadline_exceeded");
        assert_eq!(
            disposition(Code::NotFound, true),
            Disposition::OtherCandidate
        );
        assert_eq!(disposition(Code::InvalidArgument, true), Disposition::Fail);
        // A rate-limited model: the next one at once, a retry only when
        // nothing follows it.
        assert_eq!(
            disposition(Code::ResourceExhausted, true),
            Disposition::OtherCandidate
        );
        assert_eq!(
            disposition(Code::ResourceExhausted, false),
            Disposition::Retry
        );
        assert_eq!(disposition(Code::Unavailable, true), Disposition::Retry);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_and_others_are_not() {
        let budget = Budget::new(Duration::from_secs(1));
        let mut n = 0;
        let r = call("context", "test", budget, |_| {
            n += 1;
            let result = if n < 3 {
                Err(tonic::Status::unavailable("refused"))
            } else {
                Ok(n)
            };
            async move { result }
        })
        .await;
        assert_eq!(r.unwrap(), 3);

        let mut n = 0;
        let r: Result<(), _> = call("context", "test", budget, |_| {
            n += 1;
            async { Err(tonic::Status::invalid_argument("bad")) }
        })
        .await;
        assert_eq!(
            (r.unwrap_err().code(), n),
            (tonic::Code::InvalidArgument, 1)
        );

        let mut n = 0;
        let r: Result<(), _> = call("context", "test", budget, |_| {
            n += 1;
            async { Err(tonic::Status::unavailable("down")) }
        })
        .await;
        assert_eq!(
            (r.unwrap_err().code(), n),
            (tonic::Code::Unavailable, ATTEMPTS)
        );

        // No time left: one attempt only.
        let mut n = 0;
        let r: Result<(), _> = call("context", "test", Budget::new(Duration::ZERO), |_| {
            n += 1;
            async { Err(tonic::Status::unavailable("down")) }
        })
        .await;
        assert_eq!((r.unwrap_err().code(), n), (tonic::Code::Unavailable, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_past_the_budget_is_cut_there() {
        let budget = Budget::new(Duration::from_millis(300));
        let began = Instant::now();
        let r: Result<(), _> = call("understanding", "classify", budget, |_| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(())
        })
        .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::DeadlineExceeded);
        assert_eq!(began.elapsed(), Duration::from_millis(300));
    }
}
