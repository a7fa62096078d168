//! The response cache's exact tier (issue 38): answers kept under a digest
//! of everything that decides them ([`key`]), in a bounded in-process LRU
//! (weighed in bytes, [`Settings::memory_bytes`]) in front of Redis, which
//! every gateway replica shares. Without Redis (`moltbot up` with no
//! `REDIS_URL`) the memory tier serves alone.
//!
//! The turn engine looks an entry up before any enrichment and replays a
//! hit through its one drain, so a hit is formatted, written to the
//! session and metered exactly as a generated answer
//! (`gateway/src/turn/mod.rs`, stage 1b). What it stores: answers that
//! ended normally (`stop`, `length`) without function calls, never after
//! an error, a cancellation or a client that went away (`run.rs`).
//!
//! Faults never fail a turn: a Redis error or timeout falls back to the
//! memory tier (counted in `moltbot_gateway_cache_redis_fallbacks_total`,
//! and Redis is left alone for [`crate::upstream::redis::PAUSE_AFTER_FAILURE`]),
//! and an entry that does not decode is a miss and is deleted.

pub mod control;
pub mod entry;
pub mod key;
mod metrics;

use std::{sync::Arc, time::Duration};

use moka::{Expiry, future::Cache};
use redis::AsyncCommands;

pub use control::CacheControl;
pub use entry::Entry;
pub use key::Key;

use crate::{GatewayError, upstream::redis::Redis};

/// Settings of [`ResponseCache::new`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Bound of the memory tier, in bytes of entries.
    pub memory_bytes: u64,
    /// The shared tier; `None`: memory only.
    pub redis_url: Option<String>,
    /// Most time one Redis command may take before the memory tier answers
    /// alone.
    pub redis_timeout: Duration,
}

/// How a turn met the cache: the `x-moltbot-cache` header and
/// `moltbot.cache.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Answered from the exact tier.
    Hit,
    /// Answered from the semantic tier.
    SemanticHit,
    /// Looked up, not found: generated (and stored if it ends normally).
    Miss,
    /// Not looked up: the route has no cache, the request is not
    /// cacheable (sampling too warm, log probabilities) or the client said
    /// `no-cache`.
    Bypass,
}

impl Status {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::SemanticHit => "semantic-hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }
}

/// `moltbot.cache`: how the cache took part in the answer.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CacheInfo {
    /// Hit, semantic hit, miss or bypass.
    pub status: Status,
    /// Age of the answer served, in seconds (hits only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_s: Option<f64>,
    /// Cosine similarity of the two questions (semantic hits only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
}

impl CacheInfo {
    /// A turn the cache did not answer.
    pub fn of(status: Status) -> Self {
        Self {
            status,
            age_s: None,
            similarity: None,
        }
    }
}

/// An entry in the memory tier with the time it may live.
#[derive(Debug)]
struct Held {
    entry: Arc<Entry>,
    ttl: Duration,
}

/// Each entry lives for its route's TTL from when it was stored.
struct PerEntryTtl;

impl Expiry<String, Arc<Held>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<Held>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// What [`ResponseCache::purge`] removes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PurgeScope {
    /// Only this tenant's entries.
    pub tenant: Option<String>,
    /// Only this route's entries.
    pub route: Option<String>,
}

impl PurgeScope {
    fn selector(&self) -> key::Selector {
        key::Selector::new(self.tenant.as_deref(), self.route.as_deref())
    }
}

/// The memory tier: at most `bytes` of entries by [`Entry::weight`], the
/// least recently used evicted first (moka's TinyLFU admission with LRU
/// eviction), each entry expiring after its own TTL.
fn memory_tier(bytes: u64) -> Cache<String, Arc<Held>> {
    Cache::builder()
        .max_capacity(bytes)
        .weigher(|_k: &String, v: &Arc<Held>| v.entry.weight())
        .expire_after(PerEntryTtl)
        .support_invalidation_closures()
        .eviction_listener(|_k, v: Arc<Held>, cause| {
            if cause == moka::notification::RemovalCause::Size {
                metrics::EVICTIONS.inc();
            }
            metrics::MEMORY_BYTES.sub(i64::from(v.entry.weight()));
        })
        .build()
}

/// The two tiers.
pub struct ResponseCache {
    memory: Cache<String, Arc<Held>>,
    redis: Option<Redis>,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("memory_entries", &self.memory.entry_count())
            .field("redis", &self.redis.is_some())
            .finish()
    }
}

impl ResponseCache {
    /// Both tiers (memory only without a Redis URL). Errors with
    /// [`GatewayError::Config`] for a malformed Redis URL.
    pub fn new(settings: &Settings) -> Result<Self, GatewayError> {
        let redis = settings
            .redis_url
            .as_deref()
            .map(|url| Redis::new(url, settings.redis_timeout))
            .transpose()?;
        metrics::register_all();
        Ok(Self {
            memory: memory_tier(settings.memory_bytes),
            redis,
        })
    }

    /// A memory-only cache of `bytes` (the turn engine's tests).
    pub fn in_memory(bytes: u64) -> Self {
        Self {
            memory: memory_tier(bytes),
            redis: None,
        }
    }

    /// The entry under `key` younger than `max_age` (any age when `None`):
    /// from memory, else from Redis (then kept in memory for what is left
    /// of `ttl`). `None` for a miss, an entry too old, one that does not
    /// decode (deleted) or a Redis that failed (counted).
    pub async fn get(
        &self,
        key: &Key,
        ttl: Duration,
        max_age: Option<Duration>,
    ) -> Option<Arc<Entry>> {
        let storage = key.storage_key();
        let fresh = |e: &Entry| max_age.is_none_or(|m| e.age() <= m);
        if let Some(held) = self.memory.get(&storage).await {
            metrics::LOOKUPS.with_label_values(&["memory", "hit"]).inc();
            return fresh(&held.entry).then(|| held.entry.clone());
        }
        metrics::LOOKUPS
            .with_label_values(&["memory", "miss"])
            .inc();
        let redis = self.redis.as_ref()?;
        let read = redis
            .run(|mut c| {
                let storage = storage.clone();
                async move { c.get::<_, Option<Vec<u8>>>(storage).await }
            })
            .await;
        let bytes = match read {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                metrics::LOOKUPS.with_label_values(&["redis", "miss"]).inc();
                return None;
            }
            Err(error) => {
                metrics::LOOKUPS
                    .with_label_values(&["redis", "error"])
                    .inc();
                metrics::REDIS_FALLBACKS.inc();
                tracing::debug!(%error, "response cache: Redis read failed; memory tier only");
                return None;
            }
        };
        let Some(entry) = Entry::decode(&bytes) else {
            metrics::LOOKUPS
                .with_label_values(&["redis", "corrupt"])
                .inc();
            tracing::warn!(key = %storage, "response cache: undecodable entry deleted");
            let _ = redis
                .run(|mut c| async move { c.del::<_, ()>(storage).await })
                .await;
            return None;
        };
        metrics::LOOKUPS.with_label_values(&["redis", "hit"]).inc();
        let entry = Arc::new(entry);
        let left = ttl.saturating_sub(entry.age());
        if !left.is_zero() {
            self.hold(storage, entry.clone(), left).await;
        }
        fresh(&entry).then_some(entry)
    }

    async fn hold(&self, storage: String, entry: Arc<Entry>, ttl: Duration) {
        metrics::MEMORY_BYTES.add(i64::from(entry.weight()));
        self.memory
            .insert(storage, Arc::new(Held { entry, ttl }))
            .await;
    }

    /// Stores `entry` under `key` for `ttl`, in memory at once and in Redis
    /// in the background (the answer is not held up by the write).
    pub async fn put(self: &Arc<Self>, key: &Key, entry: Entry, ttl: Duration) {
        let storage = key.storage_key();
        let entry = Arc::new(entry);
        if self.redis.is_some() {
            let this = self.clone();
            let (storage, bytes) = (storage.clone(), entry.encode());
            let seconds = ttl.as_secs().max(1);
            tokio::spawn(async move {
                if let Some(redis) = &this.redis {
                    let written =
                        redis
                            .run(|mut c| async move {
                                c.set_ex::<_, _, ()>(storage, bytes, seconds).await
                            })
                            .await;
                    if let Err(error) = written {
                        metrics::REDIS_FALLBACKS.inc();
                        tracing::debug!(%error, "response cache: Redis write failed; memory tier only");
                    }
                }
            });
        }
        metrics::STORES.inc();
        self.hold(storage, entry, ttl).await;
    }

    /// Removes every entry of `scope` from both tiers; returns how many
    /// Redis held (memory entries are dropped without a count). Errors with
    /// the Redis error as text (the memory tier is purged regardless).
    pub async fn purge(&self, scope: &PurgeScope) -> Result<u64, String> {
        let selector = scope.selector();
        let pattern = selector.pattern();
        self.forget(selector)?;
        let Some(redis) = &self.redis else {
            return Ok(0);
        };

        // One SCAN page per command, each within the Redis timeout.
        let mut removed = 0u64;
        let mut cursor: u64 = 0;
        loop {
            let pattern = pattern.clone();
            let (next, n) = redis
                .run(|mut c| async move {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(500)
                        .query_async(&mut c)
                        .await?;
                    let n = if keys.is_empty() {
                        0
                    } else {
                        c.del::<_, u64>(keys).await?
                    };
                    Ok((next, n))
                })
                .await?;
            removed += n;
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // Then every replica drops the scope from its memory tier (after
        // the deletes: none can read a purged entry back from Redis).
        let message = serde_json::to_string(scope).unwrap_or_default();
        redis
            .run(|mut c| async move { c.publish::<_, _, ()>(PURGE_CHANNEL, message).await })
            .await?;
        Ok(removed)
    }
}

/// The Redis channel a purge is announced on, so that every replica drops
/// the purged entries from its memory tier ([`ResponseCache::follow_purges`]).
pub const PURGE_CHANNEL: &str = "moltbot:cache:v1:purge";

impl ResponseCache {
    /// Drops the entries `selector` selects from this process's memory
    /// tier. Errors when the tier cannot take the predicate (moka's closure
    /// registry full).
    fn forget(&self, selector: key::Selector) -> Result<(), String> {
        self.memory
            .invalidate_entries_if(move |k: &String, _| selector.matches(k))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// With Redis: a task that follows [`PURGE_CHANNEL`] and applies every
    /// purge announced there (by this replica or another) to this memory
    /// tier, resubscribing after a lost connection. Without Redis: nothing.
    pub fn follow_purges(self: &Arc<Self>) {
        if self.redis.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(this) = weak.upgrade() else { return };
                let Some(redis) = &this.redis else { return };
                let client = redis.client().clone();
                drop(this);
                match subscribe(&client).await {
                    Ok(mut pubsub) => {
                        let mut messages = pubsub.on_message();
                        while let Some(msg) = futures::StreamExt::next(&mut messages).await {
                            let Some(this) = weak.upgrade() else { return };
                            let scope = msg
                                .get_payload::<String>()
                                .ok()
                                .and_then(|p| serde_json::from_str::<PurgeScope>(&p).ok());
                            match scope {
                                Some(scope) => {
                                    if let Err(error) = this.forget(scope.selector()) {
                                        tracing::warn!(%error, "response cache: purge not applied to memory");
                                    }
                                }
                                None => tracing::warn!(
                                    "response cache: unreadable purge message ignored"
                                ),
                            }
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, "response cache: cannot follow purges; retrying");
                    }
                }
                tokio::time::sleep(crate::upstream::redis::PAUSE_AFTER_FAILURE).await;
            }
        });
    }
}

async fn subscribe(client: &redis::Client) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(PURGE_CHANNEL).await?;
    Ok(pubsub)
}

/// Counts tokens a hit served without generating them
/// (`moltbot_gateway_cache_served_tokens_total`).
pub fn served_tokens(tokens: u32) {
    metrics::SERVED_TOKENS.inc_by(u64::from(tokens));
}

/// Counts a turn's cache result and, for a hit, how long it took to find.
pub fn record(status: Status, took: Option<Duration>) {
    metrics::RESULTS.with_label_values(&[status.as_str()]).inc();
    if let Some(took) = took {
        metrics::HIT_SECONDS.observe(took.as_secs_f64());
    }
}
