//! Retries of idempotent unary calls (history reads, the session write with
//! its idempotency key, classification, search) when a replica failed at
//! the transport: the balanced channel (services/runtime/src/grpc/balance/)
//! sends the next attempt to an endpoint picked afresh, and ejects one that
//! keeps failing, so a replica killed mid-call costs a retry, not the turn.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

/// Attempts per call, the first included.
pub const ATTEMPTS: u32 = 3;

/// Whether `code` says the call may not have reached a working replica:
/// UNAVAILABLE (refused, reset, draining), CANCELLED (the connection went
/// away mid-call) and UNKNOWN (tonic's code for a broken HTTP/2 stream).
pub fn transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
    )
}

/// Runs `call` until it succeeds, fails with a non-transient status, has
/// been tried [`ATTEMPTS`] times, or `deadline` passes; waits 10 ms, then
/// 20 ms, between attempts. Each attempt is handed the time left until
/// `deadline` (its gRPC deadline). `call` must be idempotent.
pub async fn idempotent<T, F, Fut>(deadline: Instant, mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut attempt = 1;
    loop {
        match call(deadline.saturating_duration_since(Instant::now())).await {
            Err(status)
                if transient(status.code())
                    && attempt < ATTEMPTS
                    && Instant::now() + backoff(attempt) < deadline =>
            {
                tracing::info!(attempt, code = ?status.code(), error = %status.message(), "transient failure; retrying on another endpoint");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(10 * u64::from(attempt))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_and_others_are_not() {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut n = 0;
        let r = idempotent(deadline, |_| {
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
        let r: Result<(), _> = idempotent(deadline, |_| {
            n += 1;
            async { Err(tonic::Status::invalid_argument("bad")) }
        })
        .await;
        assert_eq!(
            (r.unwrap_err().code(), n),
            (tonic::Code::InvalidArgument, 1)
        );

        let mut n = 0;
        let r: Result<(), _> = idempotent(deadline, |_| {
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
        let r: Result<(), _> = idempotent(Instant::now(), |_| {
            n += 1;
            async { Err(tonic::Status::unavailable("down")) }
        })
        .await;
        assert_eq!((r.unwrap_err().code(), n), (tonic::Code::Unavailable, 1));
    }
}
