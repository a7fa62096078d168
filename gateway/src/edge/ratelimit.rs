//! Token-bucket rate limits per API key: requests per minute and tokens per
//! minute (prompt + completion), both refilled continuously.

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

    /// Charges the tokens a finished turn used.
    pub fn charge_tokens(&self, tokens: u32) {
        if let Some(bucket) = &self.tokens {
            let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
            b.refill(Instant::now());
            b.level -= f64::from(tokens);
        }
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
        let l = RateLimiter::new(&Limits {
            requests_per_minute: None,
            tokens_per_minute: Some(600),
        });
        l.admit().unwrap();
        l.charge_tokens(900); // 300 over: 30 s at 10 tokens/s before the next
        match l.admit() {
            Err(ApiError::RateLimited { retry_after, limit }) => {
                assert_eq!(limit, "tokens per minute");
                assert!(retry_after > Duration::from_secs(29), "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
    }
}
