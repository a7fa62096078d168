//! The in-memory store: the embedded default of `moltbot up`. One mutex over
//! an ordered map; expiry is checked on every access (and swept on listing).

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Mutex,
    time::Duration,
};

use super::{AppendOutcome, History, SessionPage, SessionStore, StoreLimits};
use crate::{
    ContextError,
    session::{SessionKey, SessionMeta, StoredTurn, now_ms},
};

/// Idempotency keys remembered per session.
const IDEMPOTENCY_KEYS_KEPT: usize = 1000;

struct Session {
    turns: VecDeque<StoredTurn>,
    created_at_ms: i64,
    last_active_ms: i64,
    ttl_s: u32,
    idempotency_keys: VecDeque<String>,
}

impl Session {
    fn expired(&self, now: i64) -> bool {
        now >= self.last_active_ms + i64::from(self.ttl_s) * 1000
    }

    fn meta(&self, key: &SessionKey, now: i64) -> SessionMeta {
        let expires = self.last_active_ms + i64::from(self.ttl_s) * 1000;
        SessionMeta {
            key: key.clone(),
            created_at_ms: self.created_at_ms,
            last_active_ms: self.last_active_ms,
            turn_count: self.turns.len() as u64,
            ttl_s: self.ttl_s,
            ttl_remaining_s: ((expires - now).max(0) / 1000) as u32,
        }
    }
}

/// Sessions in this process's memory; lost on restart.
pub struct MemoryStore {
    limits: StoreLimits,
    sessions: Mutex<BTreeMap<SessionKey, Session>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            limits,
            sessions: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SessionKey, Session>> {
        // A panic while holding the lock cannot leave a session half-written:
        // every mutation below is a sequence of infallible in-memory steps.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live session under `key`, removing it if it expired.
    fn live<'a>(
        map: &'a mut BTreeMap<SessionKey, Session>,
        key: &SessionKey,
        now: i64,
    ) -> Option<&'a mut Session> {
        if map.get(key).is_some_and(|s| s.expired(now)) {
            map.remove(key);
        }
        map.get_mut(key)
    }
}

fn ttl_secs(d: Duration) -> u32 {
    d.as_secs().clamp(1, u64::from(u32::MAX)) as u32
}

#[tonic::async_trait]
impl SessionStore for MemoryStore {
    async fn append(
        &self,
        key: &SessionKey,
        turns: Vec<StoredTurn>,
        idempotency_key: Option<String>,
        ttl: Option<Duration>,
    ) -> Result<AppendOutcome, ContextError> {
        let now = now_ms();
        let mut map = self.lock();
        if Self::live(&mut map, key, now).is_none() {
            map.insert(
                key.clone(),
                Session {
                    turns: VecDeque::new(),
                    created_at_ms: now,
                    last_active_ms: now,
                    ttl_s: ttl_secs(self.limits.default_ttl),
                    idempotency_keys: VecDeque::new(),
                },
            );
        }
        let session = map.get_mut(key).ok_or(ContextError::NotFound)?;
        let duplicate = idempotency_key
            .as_ref()
            .is_some_and(|k| session.idempotency_keys.contains(k));
        if !duplicate {
            if let Some(k) = idempotency_key {
                session.idempotency_keys.push_back(k);
                if session.idempotency_keys.len() > IDEMPOTENCY_KEYS_KEPT {
                    session.idempotency_keys.pop_front();
                }
            }
            session.turns.extend(turns);
            while session.turns.len() > self.limits.max_turns {
                session.turns.pop_front();
            }
        }
        if let Some(ttl) = ttl {
            session.ttl_s = ttl_secs(ttl);
        }
        session.last_active_ms = now;
        Ok(AppendOutcome {
            meta: session.meta(key, now),
            duplicate,
        })
    }

    async fn history(&self, key: &SessionKey) -> Result<History, ContextError> {
        let now = now_ms();
        let mut map = self.lock();
        let session = Self::live(&mut map, key, now).ok_or(ContextError::NotFound)?;
        session.last_active_ms = now;
        Ok(History {
            turns: session.turns.iter().cloned().collect(),
            meta: session.meta(key, now),
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
        let now = now_ms();
        let mut map = self.lock();
        let idempotency_keys = Self::live(&mut map, key, now)
            .map(|s| std::mem::take(&mut s.idempotency_keys))
            .unwrap_or_default();
        let skip = turns.len().saturating_sub(self.limits.max_turns);
        let session = Session {
            turns: turns.into_iter().skip(skip).collect(),
            created_at_ms,
            last_active_ms: now,
            ttl_s: ttl_secs(ttl),
            idempotency_keys,
        };
        let meta = session.meta(key, now);
        map.insert(key.clone(), session);
        Ok(meta)
    }

    async fn reset(&self, key: &SessionKey) -> Result<u64, ContextError> {
        let now = now_ms();
        let mut map = self.lock();
        let session = Self::live(&mut map, key, now).ok_or(ContextError::NotFound)?;
        let removed = session.turns.len() as u64;
        session.turns.clear();
        session.last_active_ms = now;
        Ok(removed)
    }

    async fn delete(&self, key: &SessionKey) -> Result<u64, ContextError> {
        let now = now_ms();
        let mut map = self.lock();
        Self::live(&mut map, key, now).ok_or(ContextError::NotFound)?;
        Ok(map.remove(key).map(|s| s.turns.len() as u64).unwrap_or(0))
    }

    async fn list(
        &self,
        tenant: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<SessionPage, ContextError> {
        let now = now_ms();
        let mut map = self.lock();
        map.retain(|_, s| !s.expired(now));
        let mut sessions: Vec<SessionMeta> = map
            .iter()
            .filter(|(k, _)| k.tenant == tenant && after.is_none_or(|a| k.session_id.as_str() > a))
            .take(page_size + 1)
            .map(|(k, s)| s.meta(k, now))
            .collect();
        let next_after = if sessions.len() > page_size {
            sessions.truncate(page_size);
            sessions.last().map(|m| m.key.session_id.clone())
        } else {
            None
        };
        Ok(SessionPage {
            sessions,
            next_after,
        })
    }

    async fn get(&self, key: &SessionKey) -> Result<SessionMeta, ContextError> {
        let now = now_ms();
        let mut map = self.lock();
        Ok(Self::live(&mut map, key, now)
            .ok_or(ContextError::NotFound)?
            .meta(key, now))
    }

    async fn ping(&self) -> Result<(), ContextError> {
        Ok(())
    }
}
