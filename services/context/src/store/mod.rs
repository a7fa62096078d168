//! Session stores: the behaviour every backend shares, behind one trait.
//!
//! Semantics (the behavioural test suite checks them on every backend):
//! appends to one session are atomic and ordered; a retried append with a seen
//! idempotency key writes nothing; the oldest turns past `max_turns` are
//! trimmed; every append or read slides the TTL; an expired session is gone.

mod memory;
mod redis;

use std::time::Duration;

pub use self::{memory::MemoryStore, redis::RedisStore};
use crate::{
    ContextError,
    session::{SessionKey, SessionMeta, StoredTurn},
};

/// Limits every store enforces.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Turns kept per session; older ones are trimmed.
    pub max_turns: usize,
    /// TTL of a session without a per-session override.
    pub default_ttl: Duration,
}

/// What an append did.
#[derive(Debug, Clone)]
pub struct AppendOutcome {
    /// The session after the append.
    pub meta: SessionMeta,
    /// True when the idempotency key had been seen and nothing was written.
    pub duplicate: bool,
}

/// What a read returns.
#[derive(Debug, Clone)]
pub struct History {
    /// Every kept turn, oldest first.
    pub turns: Vec<StoredTurn>,
    /// The session after the read.
    pub meta: SessionMeta,
    /// True when the session had been lost from the primary store and was
    /// restored from the PostgreSQL archive by this read.
    pub restored: bool,
}

/// One page of a tenant's sessions.
#[derive(Debug, Clone)]
pub struct SessionPage {
    /// Sessions, ordered by id.
    pub sessions: Vec<SessionMeta>,
    /// Id to continue after; `None` on the last page.
    pub next_after: Option<String>,
}

/// A session store. Errors: [`ContextError::NotFound`] for an unknown session,
/// [`ContextError::StoreUnavailable`] when the backend cannot be reached.
#[tonic::async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Appends `turns` in order, creating the session; `ttl` overrides the
    /// session's TTL from now on.
    async fn append(
        &self,
        key: &SessionKey,
        turns: Vec<StoredTurn>,
        idempotency_key: Option<String>,
        ttl: Option<Duration>,
    ) -> Result<AppendOutcome, ContextError>;

    /// Every kept turn, oldest first, and the session's metadata; slides the TTL.
    async fn history(&self, key: &SessionKey) -> Result<History, ContextError>;

    /// Replaces the session's turns (oldest first) and metadata, creating it
    /// if needed and keeping its idempotency keys: how the archive puts back a
    /// session lost from this store. Slides the TTL to `ttl` from now.
    async fn restore(
        &self,
        key: &SessionKey,
        turns: Vec<StoredTurn>,
        created_at_ms: i64,
        ttl: Duration,
    ) -> Result<SessionMeta, ContextError>;

    /// Removes every turn but keeps the session; returns how many were removed.
    async fn reset(&self, key: &SessionKey) -> Result<u64, ContextError>;

    /// Deletes the session; returns how many turns it had.
    async fn delete(&self, key: &SessionKey) -> Result<u64, ContextError>;

    /// A page of the tenant's live sessions with ids after `after`.
    async fn list(
        &self,
        tenant: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<SessionPage, ContextError>;

    /// The session's metadata, without sliding its TTL.
    async fn get(&self, key: &SessionKey) -> Result<SessionMeta, ContextError>;

    /// Checks that the backend answers (readiness).
    async fn ping(&self) -> Result<(), ContextError>;
}
