//! Token-bucket rate limits per API key: requests per minute and tokens per
//! minute (prompt + completion), both refilled continuously.
//!
//! Tokens are reserved at admission ([`RateLimiter::reserve`]: the prompt's
//! tokens plus the completion budget), so eight concurrent turns on a small
//! key cannot all pass a check that only looks at the level, and settled
//! when the turn ends ([`Reservation`]): the unused part is given back; a
//! cancelled or failed turn is charged what it used.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{ApiError, routing::config::Limits};

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

/// The limits of one caller.
#[derive(Debug)]
pub struct RateLimiter {
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
}

impl RateLimiter {
    /// Buckets for `limits`; an unset limit is unlimited.
    pub fn new(limits: &Limits) -> Self {
        Self {
            requests: limits
                .requests_per_minute
                .map(|n| Mutex::new(Bucket::new(n))),
            tokens: limits.tokens_per_minute.map(|n| Mutex::new(Bucket::new(n))),
        }
    }

    /// Admits one request: takes one request unit and checks that the token
    /// bucket is not spent. Errors with [`ApiError::RateLimited`] and the time
    /// to wait.
    pub fn admit(&self) -> Result<(), ApiError> {
        let now = Instant::now();
        if let Some(tokens) = &self.tokens {
            let mut b = tokens.lock().unwrap_or_else(|p| p.into_inner());
            b.refill(now);
            if b.level < 1.0 {
                return Err(ApiError::RateLimited {
                    limit: "tokens per minute",
                    retry_after: b.wait_for(1.0),
                });
            }
        }
        if let Some(requests) = &self.requests {
            let mut b = requests.lock().unwrap_or_else(|p| p.into_inner());
            b.refill(now);
            if b.level < 1.0 {
                return Err(ApiError::RateLimited {
                    limit: "requests per minute",
                    retry_after: b.wait_for(1.0),
                });
            }
            b.level -= 1.0;
        }
        Ok(())
    }

    /// Reserves `prompt + completion` tokens for one turn. Errors with
    /// [`ApiError::RateLimited`] (`tokens per minute`) and the time until
    /// that many are available; with no token limit the reservation is
    /// free. A reservation larger than the whole per-minute capacity is
    /// admitted when the bucket is full (it then runs the level negative),
    /// so a key can always make progress.
    pub fn reserve(
        self: &std::sync::Arc<Self>,
        prompt: u32,
        completion: u32,
    ) -> Result<Reservation, ApiError> {
        let total = prompt.saturating_add(completion);
        if let Some(tokens) = &self.tokens {
            let mut b = tokens.lock().unwrap_or_else(|p| p.into_inner());
            b.refill(Instant::now());
            let need = f64::from(total).min(b.capacity);
            if b.level < need {
                return Err(ApiError::RateLimited {
                    limit: "tokens per minute",
                    retry_after: b.wait_for(need),
                });
            }
            b.level -= f64::from(total);
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
    limiter: std::sync::Arc<RateLimiter>,
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

    fn apply(&mut self, used: u32) {
        if self.settled {
            return;
        }
        self.settled = true;
        if let Some(bucket) = &self.limiter.tokens {
            let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
            b.refill(Instant::now());
            b.level += f64::from(self.reserved) - f64::from(used);
            b.level = b.level.min(b.capacity);
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

    #[test]
    fn requests_per_minute_then_retry_after() {
        let l = RateLimiter::new(&Limits {
            requests_per_minute: Some(2),
            tokens_per_minute: None,
            ..Default::default()
        });
        l.admit().unwrap();
        l.admit().unwrap();
        match l.admit() {
            Err(ApiError::RateLimited { retry_after, limit }) => {
                assert_eq!(limit, "requests per minute");
                // One request per 30 s refills.
                assert!(retry_after > Duration::from_secs(25), "{retry_after:?}");
                assert!(retry_after <= Duration::from_secs(30), "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tokens_per_minute_blocks_after_a_large_turn() {
        let l = std::sync::Arc::new(RateLimiter::new(&Limits {
            requests_per_minute: None,
            tokens_per_minute: Some(600),
            ..Default::default()
        }));
        l.admit().unwrap();
        // A turn that used more than it reserved: 300 over, 30 s at 10
        // tokens/s before the next.
        l.reserve(10, 10).unwrap().settle(900);
        match l.admit() {
            Err(ApiError::RateLimited { retry_after, limit }) => {
                assert_eq!(limit, "tokens per minute");
                assert!(retry_after > Duration::from_secs(29), "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    fn level(l: &RateLimiter) -> f64 {
        l.tokens.as_ref().unwrap().lock().unwrap().level
    }

    #[test]
    fn reservations_hold_tokens_until_settled() {
        let l = std::sync::Arc::new(RateLimiter::new(&Limits {
            requests_per_minute: None,
            tokens_per_minute: Some(600),
            ..Default::default()
        }));
        let a = l.reserve(50, 200).unwrap();
        let b = l.reserve(50, 200).unwrap();
        // 100 left: a third turn of 250 waits for 150 more (15 s at 10/s).
        match l.reserve(50, 200) {
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
        assert!(l.reserve(0, 5000).is_err());
    }
}
