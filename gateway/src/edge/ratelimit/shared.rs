//! Rate-limit buckets in Redis, shared by every gateway replica: one Lua
//! script (buckets.lua) checks and changes all buckets of a call
//! atomically, refilling by Redis's clock, over the gateway's one Redis
//! connection (`gateway/src/upstream/redis.rs`).

use std::{sync::LazyLock, time::Duration};

use redis::Script;

use crate::{GatewayError, upstream::redis::Redis};

static BUCKETS: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("buckets.lua")));

/// How long one Redis round trip may take before the check falls back to
/// the process-local buckets, in ms.
const TIMEOUT: Duration = Duration::from_millis(500);

/// One bucket change: `take` units (negative: give back) from the bucket at
/// `key` holding `capacity` per minute, if it holds at least `need`.
#[derive(Debug, Clone)]
pub struct Change {
    /// Redis key of the bucket.
    pub key: String,
    /// Units per minute (also the most the bucket holds).
    pub capacity: u32,
    /// Units taken.
    pub take: f64,
    /// Level required first (0: none).
    pub need: f64,
}

/// The shared buckets at one Redis.
#[derive(Debug)]
pub struct SharedBuckets {
    redis: Redis,
}

impl SharedBuckets {
    /// Buckets at `url` (`redis://…`, or `rediss://…` for TLS); connects on
    /// first use. Errors with [`GatewayError::Config`] for a malformed URL.
    pub fn new(url: &str) -> Result<Self, GatewayError> {
        Ok(Self {
            redis: Redis::new(url, TIMEOUT)?,
        })
    }

    /// Applies every change or none. `Ok(None)`: applied; `Ok(Some((i,
    /// wait)))`: change `i` found its bucket too low, retry after `wait`.
    /// Errors with the Redis error (or a timeout) as text.
    pub async fn apply(&self, changes: &[Change]) -> Result<Option<(usize, Duration)>, String> {
        let (applied, index, wait) = self
            .redis
            .run(|mut connection| async move {
                let mut invocation = BUCKETS.prepare_invoke();
                for c in changes {
                    invocation
                        .key(&c.key)
                        .arg(c.capacity)
                        .arg(c.take)
                        .arg(c.need);
                }
                invocation
                    .invoke_async::<(i64, i64, String)>(&mut connection)
                    .await
            })
            .await?;
        if applied == 1 {
            return Ok(None);
        }
        let index = usize::try_from(index - 1).unwrap_or(0);
        let seconds: f64 = wait.parse().unwrap_or(1.0);
        Ok(Some((index, Duration::from_secs_f64(seconds.max(0.0)))))
    }
}
