//! The Redis store (`REDIS_URL`). Each mutation is one Lua script, so an
//! append, its trim, the TTL slide and the tenant index update happen in one
//! atomic round trip: a half-applied append cannot exist.
//!
//! Keys, with the tenant as hash tag so a tenant's keys share a cluster slot:
//! `moltbot:ctx:{<tenant>}:s:<session>:turns` (list of JSON turns),
//! `…:meta` (hash: created_ms, last_active_ms, ttl_s), `…:idem` (zset of
//! idempotency keys, newest 1000), and `moltbot:ctx:{<tenant>}:index` (zset of
//! session ids, pruned lazily when listing finds an expired one).
//!
//! One multiplexed [`ConnectionManager`] serves every call and reconnects on
//! its own after Redis restarts; every call has a deadline and answers
//! [`ContextError::StoreUnavailable`] past it instead of hanging.

use std::{future::Future, sync::LazyLock, time::Duration};

use redis::{Script, aio::ConnectionManager};
use tokio::sync::OnceCell;

use super::{AppendOutcome, History, SessionPage, SessionStore, StoreLimits};
use crate::{
    ContextError,
    session::{SessionKey, SessionMeta, StoredTurn, now_ms},
};

static APPEND: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("append.lua")));
static HISTORY: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("history.lua")));
static META: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("meta.lua")));
static REMOVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("remove.lua")));
static RESTORE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("restore.lua")));

/// Sessions in Redis.
pub struct RedisStore {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    limits: StoreLimits,
    timeout: Duration,
}

struct Keys {
    turns: String,
    meta: String,
    idem: String,
    index: String,
}

fn keys(key: &SessionKey) -> Keys {
    let base = format!("moltbot:ctx:{{{}}}:s:{}", key.tenant, key.session_id);
    Keys {
        turns: format!("{base}:turns"),
        meta: format!("{base}:meta"),
        idem: format!("{base}:idem"),
        index: index_key(&key.tenant),
    }
}

fn index_key(tenant: &str) -> String {
    format!("moltbot:ctx:{{{tenant}}}:index")
}

impl RedisStore {
    /// A store for `url` (e.g. `redis://127.0.0.1:6379/0`); connects on first
    /// use. `timeout` bounds every call. Errors with
    /// [`ContextError::InvalidArgument`] for a malformed URL.
    pub fn new(url: &str, limits: StoreLimits, timeout: Duration) -> Result<Self, ContextError> {
        let client = redis::Client::open(url).map_err(|e| {
            ContextError::InvalidArgument(format!(
                "REDIS_URL is not a Redis URL ({e}); use e.g. redis://127.0.0.1:6379"
            ))
        })?;
        Ok(Self {
            client,
            connection: OnceCell::new(),
            limits,
            timeout,
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, ContextError> {
        // The config is built only on first use; every later call just clones
        // the multiplexed connection.
        self.connection
            .get_or_try_init(|| {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_with_config(self.client.clone(), config)
            })
            .await
            .cloned()
            .map_err(ContextError::from)
    }

    /// Runs `op` on a connection within the deadline.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, ContextError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, redis::RedisError>>,
    {
        let attempt = async {
            let connection = self.connection().await?;
            op(connection).await.map_err(ContextError::from)
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(ContextError::StoreUnavailable(format!(
                    "no answer from Redis within {} ms",
                    self.timeout.as_millis()
                )))
            })
    }

    async fn meta(&self, key: &SessionKey) -> Result<Option<SessionMeta>, ContextError> {
        let k = keys(key);
        let raw: Option<(i64, i64, u32, u64, i64)> = self
            .call(|mut c| async move { META.key(&k.turns).key(&k.meta).invoke_async(&mut c).await })
            .await?;
        Ok(raw.map(
            |(created_at_ms, last_active_ms, ttl_s, turn_count, pttl)| SessionMeta {
                key: key.clone(),
                created_at_ms,
                last_active_ms,
                turn_count,
                ttl_s,
                ttl_remaining_s: (pttl.max(0) / 1000) as u32,
            },
        ))
    }
}

fn decode(raw: &str) -> Result<StoredTurn, ContextError> {
    serde_json::from_str(raw).map_err(|e| ContextError::Corrupt(e.to_string()))
}

#[tonic::async_trait]
impl SessionStore for RedisStore {
    async fn append(
        &self,
        key: &SessionKey,
        turns: Vec<StoredTurn>,
        idempotency_key: Option<String>,
        ttl: Option<Duration>,
    ) -> Result<AppendOutcome, ContextError> {
        let encoded = turns
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ContextError::Corrupt(e.to_string()))?;
        let k = keys(key);
        let now = now_ms();
        let ttl_override = ttl.map(|d| d.as_secs().max(1)).unwrap_or(0);
        let default_ttl = self.limits.default_ttl.as_secs().max(1);
        let max_turns = self.limits.max_turns;
        let idem = idempotency_key.unwrap_or_default();
        let session_id = key.session_id.clone();
        let (dup, turn_count, created_at_ms, ttl_s): (i64, u64, i64, u32) = self
            .call(|mut c| async move {
                APPEND
                    .key(&k.turns)
                    .key(&k.meta)
                    .key(&k.idem)
                    .key(&k.index)
                    .arg(now)
                    .arg(ttl_override)
                    .arg(default_ttl)
                    .arg(max_turns)
                    .arg(idem)
                    .arg(session_id)
                    .arg(encoded)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(AppendOutcome {
            meta: SessionMeta {
                key: key.clone(),
                created_at_ms,
                last_active_ms: now,
                turn_count,
                ttl_s,
                ttl_remaining_s: ttl_s,
            },
            duplicate: dup == 1,
        })
    }

    async fn history(&self, key: &SessionKey) -> Result<History, ContextError> {
        let k = keys(key);
        let now = now_ms();
        let raw: Option<(i64, u32, Vec<String>)> = self
            .call(|mut c| async move {
                HISTORY
                    .key(&k.turns)
                    .key(&k.meta)
                    .key(&k.idem)
                    .arg(now)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let (created_at_ms, ttl_s, raw_turns) = raw.ok_or(ContextError::NotFound)?;
        let turns = raw_turns
            .iter()
            .map(|t| decode(t))
            .collect::<Result<Vec<_>, _>>()?;
        let meta = SessionMeta {
            key: key.clone(),
            created_at_ms,
            last_active_ms: now,
            turn_count: turns.len() as u64,
            ttl_s,
            ttl_remaining_s: ttl_s,
        };
        Ok(History {
            turns,
            meta,
            restored: false,
        })
    }

    async fn restore(
        &self,
        key: &SessionKey,
        turns: Vec<StoredTurn>,
        created_at_ms: i64,
        ttl: Duration,
    ) -> Result<SessionMeta, ContextError> {
        let skip = turns.len().saturating_sub(self.limits.max_turns);
        let encoded = turns
            .iter()
            .skip(skip)
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ContextError::Corrupt(e.to_string()))?;
        let k = keys(key);
        let now = now_ms();
        let ttl_s = ttl.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
        let session_id = key.session_id.clone();
        let turn_count: u64 = self
            .call(|mut c| async move {
                RESTORE
                    .key(&k.turns)
                    .key(&k.meta)
                    .key(&k.idem)
                    .key(&k.index)
                    .arg(now)
                    .arg(created_at_ms)
                    .arg(ttl_s)
                    .arg(session_id)
                    .arg(encoded)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(SessionMeta {
            key: key.clone(),
            created_at_ms,
            last_active_ms: now,
            turn_count,
            ttl_s,
            ttl_remaining_s: ttl_s,
        })
    }

    async fn reset(&self, key: &SessionKey) -> Result<u64, ContextError> {
        remove(self, key, "reset").await
    }

    async fn delete(&self, key: &SessionKey) -> Result<u64, ContextError> {
        remove(self, key, "delete").await
    }

    async fn list(
        &self,
        tenant: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<SessionPage, ContextError> {
        let index = index_key(tenant);
        let mut sessions = Vec::with_capacity(page_size);
        let mut cursor = after.map(str::to_owned);
        // Expired sessions are pruned from the index as they are met, so a
        // page may need more than one scan to fill.
        loop {
            let start = cursor
                .as_ref()
                .map(|c| format!("({c}"))
                .unwrap_or_else(|| "-".into());
            let want = page_size + 1 - sessions.len();
            let index_for_call = index.clone();
            let ids: Vec<String> = self
                .call(|mut c| async move {
                    redis::cmd("ZRANGEBYLEX")
                        .arg(&index_for_call)
                        .arg(start)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(want)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            let exhausted = ids.len() < want;
            for id in ids {
                cursor = Some(id.clone());
                let key = SessionKey {
                    tenant: tenant.to_owned(),
                    session_id: id.clone(),
                };
                match self.meta(&key).await? {
                    Some(meta) => sessions.push(meta),
                    None => {
                        let index_for_call = index.clone();
                        self.call(|mut c| async move {
                            redis::cmd("ZREM")
                                .arg(&index_for_call)
                                .arg(&id)
                                .query_async::<()>(&mut c)
                                .await
                        })
                        .await?;
                    }
                }
            }
            if sessions.len() > page_size {
                sessions.truncate(page_size);
                let next_after = sessions.last().map(|m| m.key.session_id.clone());
                return Ok(SessionPage {
                    sessions,
                    next_after,
                });
            }
            if exhausted {
                return Ok(SessionPage {
                    sessions,
                    next_after: None,
                });
            }
        }
    }

    async fn get(&self, key: &SessionKey) -> Result<SessionMeta, ContextError> {
        self.meta(key).await?.ok_or(ContextError::NotFound)
    }

    async fn ping(&self) -> Result<(), ContextError> {
        self.call(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(|_| ())
    }
}

async fn remove(
    store: &RedisStore,
    key: &SessionKey,
    mode: &'static str,
) -> Result<u64, ContextError> {
    let k = keys(key);
    let session_id = key.session_id.clone();
    let now = now_ms();
    let n: i64 = store
        .call(|mut c| async move {
            REMOVE
                .key(&k.turns)
                .key(&k.meta)
                .key(&k.idem)
                .key(&k.index)
                .arg(mode)
                .arg(session_id)
                .arg(now)
                .invoke_async(&mut c)
                .await
        })
        .await?;
    u64::try_from(n).map_err(|_| ContextError::NotFound)
}
