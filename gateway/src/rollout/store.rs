//! Where rollouts live: [`RedisStore`], shared by every gateway replica
//! and surviving their restarts, or [`MemoryStore`] for one gateway
//! without Redis (`moltbot up`).
//!
//! Redis layout (prefix `moltbot:rollout:v1:`):
//! - `routes`: a set of the routes with a rollout;
//! - `route:{route}`: a hash, `state` (the [`Rollout`] as JSON) and
//!   `revision`; writes are compare-and-set on the revision (a Lua script),
//!   so a transition is applied by one replica only;
//! - `window:{id}:{step}:{variant}`: a hash of counters, `ok`, `fail` and
//!   `b{k}` per latency bucket (`gateway/src/rollout/window.rs`), kept
//!   [`KEEP`];
//! - `sticky:{id}:{session}`: the variant a session started on, kept
//!   [`KEEP`] (`session` is a SHA-256 of tenant and session id).

use std::{collections::HashMap, sync::Mutex, time::Duration};

use futures::future::BoxFuture;

use super::{
    plan::{Rollout, Variant},
    window::{self, Window},
};
use crate::upstream::redis::Redis;

/// How long windows and sticky assignments are kept: longer than any
/// sensible rollout.
pub const KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// Most time one rollout command may take in Redis (a session's variant
/// is read on the turn's path: past it, the session is served stable).
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

const PREFIX: &str = "moltbot:rollout:v1:";

/// A rollout store. Every method errors with the store's failure as text.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Every route's rollout.
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<Rollout>, String>>;
    /// Writes `next` if the route's stored revision is `expected` (0: no
    /// rollout stored). `Ok(false)` when another writer came first.
    fn replace<'a>(
        &'a self,
        expected: u64,
        next: &'a Rollout,
    ) -> BoxFuture<'a, Result<bool, String>>;
    /// Counts one turn of `variant` at `step` of rollout `id`.
    fn record<'a>(
        &'a self,
        id: &'a str,
        step: usize,
        variant: Variant,
        ok: bool,
        ttft: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// The counts of `variant` at `step` of rollout `id`.
    fn window<'a>(
        &'a self,
        id: &'a str,
        step: usize,
        variant: Variant,
    ) -> BoxFuture<'a, Result<Window, String>>;
    /// The variant `session` is on in rollout `id`: the one stored, else
    /// `proposed`, stored now.
    fn sticky<'a>(
        &'a self,
        id: &'a str,
        session: &'a str,
        proposed: Variant,
    ) -> BoxFuture<'a, Result<Variant, String>>;
}

/// Rollouts of one gateway process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    rollouts: Mutex<HashMap<String, Rollout>>,
    windows: Mutex<HashMap<(String, usize, Variant), Window>>,
    sticky: Mutex<HashMap<(String, String), Variant>>,
}

/// Sticky assignments a [`MemoryStore`] keeps; past it the oldest
/// rollouts' are dropped first (a dropped session goes by its draw again,
/// or to stable when it has history).
const MEMORY_STICKY_MAX: usize = 1_000_000;

fn poisoned<T>(_: T) -> String {
    "a rollout store lock was poisoned".to_owned()
}

impl Store for MemoryStore {
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<Rollout>, String>> {
        let all = self
            .rollouts
            .lock()
            .map(|m| m.values().cloned().collect())
            .map_err(poisoned);
        Box::pin(async move { all })
    }

    fn replace<'a>(
        &'a self,
        expected: u64,
        next: &'a Rollout,
    ) -> BoxFuture<'a, Result<bool, String>> {
        let done = self.rollouts.lock().map_err(poisoned).map(|mut m| {
            let current = m.get(&next.route).map_or(0, |r| r.revision);
            if current != expected {
                return false;
            }
            m.insert(next.route.clone(), next.clone());
            true
        });
        Box::pin(async move { done })
    }

    fn record<'a>(
        &'a self,
        id: &'a str,
        step: usize,
        variant: Variant,
        ok: bool,
        ttft: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), String>> {
        let done = self.windows.lock().map_err(poisoned).map(|mut m| {
            m.entry((id.to_owned(), step, variant))
                .or_default()
                .add(ok, ttft);
        });
        Box::pin(async move { done })
    }

    fn window<'a>(
        &'a self,
        id: &'a str,
        step: usize,
        variant: Variant,
    ) -> BoxFuture<'a, Result<Window, String>> {
        let w = self.windows.lock().map_err(poisoned).map(|m| {
            m.get(&(id.to_owned(), step, variant))
                .cloned()
                .unwrap_or_default()
        });
        Box::pin(async move { w })
    }

    fn sticky<'a>(
        &'a self,
        id: &'a str,
        session: &'a str,
        proposed: Variant,
    ) -> BoxFuture<'a, Result<Variant, String>> {
        let v = self.sticky.lock().map_err(poisoned).map(|mut m| {
            if m.len() >= MEMORY_STICKY_MAX {
                m.clear();
            }
            *m.entry((id.to_owned(), session.to_owned()))
                .or_insert(proposed)
        });
        Box::pin(async move { v })
    }
}

/// Rollouts in Redis, shared by every replica.
#[derive(Debug)]
pub struct RedisStore {
    redis: std::sync::Arc<Redis>,
    replace: redis::Script,
    sticky: redis::Script,
}

impl RedisStore {
    /// A store on `redis`.
    pub fn new(redis: std::sync::Arc<Redis>) -> Self {
        Self {
            redis,
            // KEYS: route hash, routes set. ARGV: expected revision, state
            // JSON, new revision, route name.
            replace: redis::Script::new(
                r"local rev = redis.call('HGET', KEYS[1], 'revision')
if (rev or '0') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'revision', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return 1",
            ),
            // KEYS: sticky key. ARGV: proposed variant, TTL seconds.
            sticky: redis::Script::new(
                r"local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]",
            ),
        }
    }
}

fn window_key(id: &str, step: usize, variant: Variant) -> String {
    format!("{PREFIX}window:{id}:{step}:{}", variant.as_str())
}

impl Store for RedisStore {
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<Rollout>, String>> {
        Box::pin(async move {
            let routes: Vec<String> = self
                .redis
                .run(|mut c| async move {
                    redis::cmd("SMEMBERS")
                        .arg(format!("{PREFIX}routes"))
                        .query_async(&mut c)
                        .await
                })
                .await?;
            if routes.is_empty() {
                return Ok(Vec::new());
            }
            let states: Vec<Option<String>> = self
                .redis
                .run(|mut c| async move {
                    let mut pipe = redis::pipe();
                    for r in &routes {
                        pipe.cmd("HGET")
                            .arg(format!("{PREFIX}route:{r}"))
                            .arg("state");
                    }
                    pipe.query_async(&mut c).await
                })
                .await?;
            let mut out = Vec::new();
            for state in states.into_iter().flatten() {
                match serde_json::from_str::<Rollout>(&state) {
                    Ok(r) => out.push(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "a stored rollout does not decode; ignored")
                    }
                }
            }
            Ok(out)
        })
    }

    fn replace<'a>(
        &'a self,
        expected: u64,
        next: &'a Rollout,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let json = serde_json::to_string(next).map_err(|e| e.to_string())?;
            let script = self.replace.clone();
            let written: i64 = self
                .redis
                .run(|mut c| async move {
                    script
                        .key(format!("{PREFIX}route:{}", next.route))
                        .key(format!("{PREFIX}routes"))
                        .arg(expected.to_string())
                        .arg(json)
                        .arg(next.revision.to_string())
                        .arg(&next.route)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(written == 1)
        })
    }

    fn record<'a>(
        &'a self,
        id: &'a str,
        step: usize,
        variant: Variant,
        ok: bool,
        ttft: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let key = window_key(id, step, variant);
            self.redis
                .run(|mut c| async move {
                    let mut pipe = redis::pipe();
                    pipe.cmd("HINCRBY")
                        .arg(&key)
                        .arg(if ok { "ok" } else { "fail" })
                        .arg(1)
                        .ignore();
                    if let (true, Some(t)) = (ok, ttft) {
                        pipe.cmd("HINCRBY")
                            .arg(&key)
                            .arg(format!("b{}", window::bucket(t)))
                            .arg(1)
                            .ignore();
                    }
                    pipe.cmd("EXPIRE").arg(&key).arg(KEEP.as_secs()).ignore();
                    pipe.query_async::<()>(&mut c).await
                })
                .await
        })
    }

    fn window<'a>(
        &'a self,
        id: &'a str,
        step: usize,
        variant: Variant,
    ) -> BoxFuture<'a, Result<Window, String>> {
        Box::pin(async move {
            let key = window_key(id, step, variant);
            let fields: HashMap<String, u64> =
                self.redis
                    .run(|mut c| async move {
                        redis::cmd("HGETALL").arg(&key).query_async(&mut c).await
                    })
                    .await?;
            let mut w = Window::default();
            for (field, count) in fields {
                match field.as_str() {
                    "ok" => w.ok = count,
                    "fail" => w.fail = count,
                    b => {
                        if let Some(k) = b.strip_prefix('b').and_then(|k| k.parse::<usize>().ok())
                            && k < window::BUCKETS
                        {
                            w.add_latency(k, count);
                        }
                    }
                }
            }
            Ok(w)
        })
    }

    fn sticky<'a>(
        &'a self,
        id: &'a str,
        session: &'a str,
        proposed: Variant,
    ) -> BoxFuture<'a, Result<Variant, String>> {
        Box::pin(async move {
            let script = self.sticky.clone();
            let stored: String = self
                .redis
                .run(|mut c| async move {
                    script
                        .key(format!("{PREFIX}sticky:{id}:{session}"))
                        .arg(proposed.as_str())
                        .arg(KEEP.as_secs())
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(if stored == Variant::Canary.as_str() {
                Variant::Canary
            } else {
                Variant::Stable
            })
        })
    }
}
