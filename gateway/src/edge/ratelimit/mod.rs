//! Token-bucket rate limits per API key: requests per minute and tokens per
//! minute (prompt + completion), both refilled continuously.
//!
//! Where the buckets live: with `REDIS_URL` in Redis ([`shared`]), so every
//! gateway replica draws from the same buckets and a key gets its limit once,
//! not once per replica; without it in this process (the single-node
//! default; a replicated gateway refuses to start without Redis). While
//! Redis is unreachable a check uses this process's buckets (at most N× the
//! limit over N gateways for that time, rather than refusing every request:
//! Envoy's global rate limiting fails open the same way) and counts
//! `moltbot_gateway_rate_limit_store_errors_total`.
//!
//! Tokens are reserved at admission ([`RateLimiter::reserve`]: the prompt's
//! tokens plus the completion budget), so eight concurrent turns on a small
//! key cannot all pass a check that only looks at the level, and settled
//! when the turn ends ([`Reservation`]): the unused part is given back; a
//! cancelled or failed turn is charged what it used.

pub mod shared;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{ApiError, routing::config::Limits};
use shared::{Change, SharedBuckets};

/// One bucket of `capacity` units refilled at `capacity` per minute. Its level
/// may go negative when a turn used more tokens than were left; callers then
/// wait until it is positive again.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn new(per_minute: u32) -> Self {
        Self {
            capacity: f64::from(per_minute),
            level: f64::from(per_minute),
            updated: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let per_second = self.capacity / 60.0;
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * per_second).min(self.capacity);
        self.updated = now;
    }

    /// Time until the level reaches `need`.
    fn wait_for(&self, need: f64) -> Duration {
        let per_second = self.capacity / 60.0;
        Duration::from_secs_f64(((need - self.level) / per_second).max(0.0))
    }
}

/// Which bucket of a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Requests,
    Tokens,
}

impl Kind {
    fn limit(self) -> &'static str {
        match self {
            Kind::Requests => "requests per minute",
            Kind::Tokens => "tokens per minute",
        }
    }
}

/// One change to one bucket: take `take` units (negative: give back) if
/// the bucket holds `need` first (0: no check).
#[derive(Debug, Clone, Copy)]
struct Op {
    kind: Kind,
    take: f64,
    need: f64,
}

/// The limits of one caller.
#[derive(Debug)]
pub struct RateLimiter {
    /// Redis key prefix of this caller's buckets.
    key: String,
    requests: Option<(u32, Mutex<Bucket>)>,
    tokens: Option<(u32, Mutex<Bucket>)>,
    shared: Option<Arc<SharedBuckets>>,
}

impl RateLimiter {
    /// Process-local buckets for `limits`; an unset limit is unlimited.
    pub fn new(limits: &Limits) -> Self {
        Self {
            key: String::new(),
            requests: limits
                .requests_per_minute
                .map(|n| (n, Mutex::new(Bucket::new(n)))),
            tokens: limits
                .tokens_per_minute
                .map(|n| (n, Mutex::new(Bucket::new(n)))),
            shared: None,
        }
    }

    /// Buckets for `limits` shared in Redis under the name `caller` (the API
    /// key's name: gateways with the same key names share its buckets).
    pub fn shared(limits: &Limits, caller: &str, buckets: Arc<SharedBuckets>) -> Self {
        Self {
            // The hash tag keeps a caller's buckets on one Redis Cluster slot,
            // as one script must.
            key: format!("moltbot:ratelimit:{{{caller}}}"),
            shared: Some(buckets),
            ..Self::new(limits)
        }
    }

    fn bucket(&self, kind: Kind) -> Option<&(u32, Mutex<Bucket>)> {
        match kind {
            Kind::Requests => self.requests.as_ref(),
            Kind::Tokens => self.tokens.as_ref(),
        }
    }

    /// Applies every op or none; `Err` names the bucket too low and the wait.
    async fn apply(&self, ops: &[Op]) -> Result<(), (Kind, Duration)> {
        let ops: Vec<Op> = ops
            .iter()
            .copied()
            .filter(|op| self.bucket(op.kind).is_some())
            .collect();
        if ops.is_empty() {
            return Ok(());
        }
        if let Some(shared) = &self.shared {
            let changes: Vec<Change> = ops
                .iter()
                .filter_map(|op| {
                    let (capacity, _) = self.bucket(op.kind)?;
                    Some(Change {
                        key: match op.kind {
                            Kind::Requests => format!("{}:requests", self.key),
                            Kind::Tokens => format!("{}:tokens", self.key),
                        },
                        capacity: *capacity,
                        take: op.take,
                        need: op.need,
                    })
                })
                .collect();
            match shared.apply(&changes).await {
                Ok(None) => return Ok(()),
                Ok(Some((i, wait))) => {
                    return Err((ops.get(i).map_or(Kind::Requests, |op| op.kind), wait));
                }
                Err(e) => {
                    crate::edge::metrics::RATE_LIMIT_STORE_ERRORS.inc();
                    tracing::warn!(error = %e, "shared rate-limit buckets unreachable; using this gateway's own");
                }
            }
        }
        self.apply_local(&ops)
    }

    fn apply_local(&self, ops: &[Op]) -> Result<(), (Kind, Duration)> {
        let now = Instant::now();
        // Lock in a fixed order (requests, then tokens) for every caller.
        let mut held = Vec::new();
        for kind in [Kind::Requests, Kind::Tokens] {
            if let Some((_, bucket)) = self.bucket(kind)
                && ops.iter().any(|op| op.kind == kind)
            {
                let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
                b.refill(now);
                held.push((kind, b));
            }
        }
        for op in ops {
            if let Some((_, b)) = held.iter().find(|(k, _)| *k == op.kind)
                && op.need > 0.0
                && b.level < op.need
            {
                return Err((op.kind, b.wait_for(op.need)));
            }
        }
        for op in ops {
            if let Some((_, b)) = held.iter_mut().find(|(k, _)| *k == op.kind) {
                b.level = (b.level - op.take).min(b.capacity);
            }
        }
        Ok(())
    }

    /// Admits one request: takes one request unit and checks that the token
    /// bucket is not spent. Errors with [`ApiError::RateLimited`] and the time
    /// to wait.
    pub async fn admit(&self) -> Result<(), ApiError> {
        let ops = [
            Op {
                kind: Kind::Tokens,
                take: 0.0,
                need: 1.0,
            },
            Op {
                kind: Kind::Requests,
                take: 1.0,
                need: 1.0,
            },
        ];
        self.apply(&ops)
            .await
            .map_err(|(kind, retry_after)| ApiError::RateLimited {
                limit: kind.limit(),
                retry_after,
            })
    }

    /// Reserves `prompt + completion` tokens for one turn. Errors with
    /// [`ApiError::RateLimited`] (`tokens per minute`) and the time until
    /// that many are available; with no token limit the reservation is
    /// free. A reservation larger than the whole per-minute capacity is
    /// admitted when the bucket is full (it then runs the level negative),
    /// so a key can always make progress.
    pub async fn reserve(
        self: &Arc<Self>,
        prompt: u32,
        completion: u32,
    ) -> Result<Reservation, ApiError> {
        let total = prompt.saturating_add(completion);
        if let Some((capacity, _)) = &self.tokens {
            let op = Op {
                kind: Kind::Tokens,
                take: f64::from(total),
                need: f64::from(total.min(*capacity)),
            };
            self.apply(&[op])
                .await
                .map_err(|(kind, retry_after)| ApiError::RateLimited {
                    limit: kind.limit(),
                    retry_after,
                })?;
        }
        Ok(Reservation {
            limiter: self.clone(),
            reserved: total,
            prompt,
            completion_seen: 0,
            settled: false,
        })
    }
}

/// Tokens held for one turn. [`Reservation::settle`] charges what the
/// turn used and gives the rest back; dropped unsettled (the client went
/// away, generation failed) it charges the prompt plus the completion
/// tokens seen so far ([`Reservation::saw_completion`]).
#[derive(Debug)]
pub struct Reservation {
    limiter: Arc<RateLimiter>,
    reserved: u32,
    prompt: u32,
    completion_seen: u32,
    settled: bool,
}

impl Reservation {
    /// Counts `n` completion tokens produced (streamed deltas).
    pub fn saw_completion(&mut self, n: u32) {
        self.completion_seen = self.completion_seen.saturating_add(n);
    }

    /// Charges `used` tokens instead of the reservation.
    pub fn settle(mut self, used: u32) {
        self.apply(used);
    }

    /// Gives back `reserved - used` (takes more when the turn used more).
    /// Shared buckets are updated by a spawned task: settling happens where
    /// nothing may wait (a drop).
    fn apply(&mut self, used: u32) {
        if self.settled || self.limiter.tokens.is_none() {
            return;
        }
        self.settled = true;
        let op = Op {
            kind: Kind::Tokens,
            take: f64::from(used) - f64::from(self.reserved),
            need: 0.0,
        };
        let limiter = self.limiter.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if limiter.shared.is_some() => {
                handle.spawn(async move {
                    let _ = limiter.apply(&[op]).await;
                });
            }
            _ => {
                let _ = limiter.apply_local(&[op]);
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let used = self.prompt.saturating_add(self.completion_seen);
        self.apply(used);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[tokio::test]
    async fn requests_per_minute_then_retry_after() {
        let l = RateLimiter::new(&Limits {
            requests_per_minute: Some(2),
            tokens_per_minute: None,
            ..Default::default()
        });
        l.admit().await.unwrap();
        l.admit().await.unwrap();
        match l.admit().await {
            Err(ApiError::RateLimited { retry_after, limit }) => {
                assert_eq!(limit, "requests per minute");
                // One request per 30 s refills.
                assert!(retry_after > Duration::from_secs(25), "{retry_after:?}");
                assert!(retry_after <= Duration::from_secs(30), "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn tokens_per_minute_blocks_after_a_large_turn() {
        let l = std::sync::Arc::new(RateLimiter::new(&Limits {
            requests_per_minute: None,
            tokens_per_minute: Some(600),
            ..Default::default()
        }));
        l.admit().await.unwrap();
        // A turn that used more than it reserved: 300 over, 30 s at 10
        // tokens/s before the next.
        l.reserve(10, 10).await.unwrap().settle(900);
        match l.admit().await {
            Err(ApiError::RateLimited { retry_after, limit }) => {
                assert_eq!(limit, "tokens per minute");
                assert!(retry_after > Duration::from_secs(29), "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    fn level(l: &RateLimiter) -> f64 {
        l.tokens.as_ref().unwrap().1.lock().unwrap().level
    }

    #[tokio::test]
    async fn reservations_hold_tokens_until_settled() {
        let l = std::sync::Arc::new(RateLimiter::new(&Limits {
            requests_per_minute: None,
            tokens_per_minute: Some(600),
            ..Default::default()
        }));
        let a = l.reserve(50, 200).await.unwrap();
        let b = l.reserve(50, 200).await.unwrap();
        // 100 left: a third turn of 250 waits for 150 more (15 s at 10/s).
        match l.reserve(50, 200).await {
            Err(ApiError::RateLimited { retry_after, limit }) => {
                assert_eq!(limit, "tokens per minute");
                assert!(retry_after > Duration::from_secs(14), "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
        a.settle(60); // used 60 of 250: 190 back
        assert!((level(&l) - 290.0).abs() < 1.0, "{}", level(&l));
        let mut b = b;
        b.saw_completion(10);
        drop(b); // cancelled: prompt 50 + 10 seen charged, 190 back
        assert!((level(&l) - 480.0).abs() < 1.0, "{}", level(&l));
        // Larger than the capacity: admitted on a full bucket only.
        assert!(l.reserve(0, 5000).await.is_err());
    }
}
