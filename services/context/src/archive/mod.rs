//! The durable archive: a [`SessionStore`] that writes every appended turn to
//! PostgreSQL (`DATABASE_URL`) before the append is acknowledged, in front of
//! the primary store (Redis or memory) that serves reads.
//!
//! Protocol, per session: a mutation locks the session's archive row for its
//! whole transaction, writes the archive, applies the same change to the
//! primary store, and commits only when both succeeded. Appends to one session
//! are therefore serialised in the same order in both stores, and an error
//! from either leaves the archive unchanged (a retry with the same
//! idempotency key is recognised by whichever store saw the first attempt).
//!
//! A session the primary store has lost (Redis flushed, evicted or failed
//! over) but the archive holds alive is restored — its newest `max_turns`
//! turns — on the next read, or on the next append, which notices that the
//! primary holds fewer turns than the archive. Listing serves the primary
//! store only.

mod pg;

use std::{sync::Arc, time::Duration};

pub use self::pg::PgArchive;
use crate::{
    ContextError,
    session::{SessionKey, SessionMeta, StoredTurn, now_ms},
    store::{AppendOutcome, History, SessionPage, SessionStore, StoreLimits},
};

/// A primary store with every append also archived in PostgreSQL.
pub struct ArchivedStore {
    primary: Arc<dyn SessionStore>,
    archive: PgArchive,
    limits: StoreLimits,
}

fn secs(d: Duration) -> u32 {
    d.as_secs().clamp(1, u64::from(u32::MAX)) as u32
}

impl ArchivedStore {
    /// Archives `primary`'s sessions in `archive`; `limits` must be the
    /// primary's own.
    pub fn new(primary: Arc<dyn SessionStore>, archive: PgArchive, limits: StoreLimits) -> Self {
        Self {
            primary,
            archive,
            limits,
        }
    }

    /// Restores a session the primary store does not have, if the archive
    /// holds it alive. Errors with [`ContextError::NotFound`] otherwise.
    async fn restore(&self, key: &SessionKey) -> Result<History, ContextError> {
        let mut tx = self.archive.begin().await?;
        let now = now_ms();
        let row = match pg::find_for_update(&mut tx, key).await? {
            Some(row) if row.alive(now) => row,
            Some(_) => {
                // Expired in the archive too: forget it for good.
                pg::delete(&mut tx, key).await?;
                tx.commit().await?;
                return Err(ContextError::NotFound);
            }
            None => return Err(ContextError::NotFound),
        };
        // Another call may have restored it while this one waited for the lock.
        match self.primary.history(key).await {
            Err(ContextError::NotFound) => {}
            other => return other,
        }
        let turns = pg::recent_turns(&mut tx, key, self.limits.max_turns).await?;
        let meta = self
            .primary
            .restore(
                key,
                turns.clone(),
                row.created_at_ms,
                Duration::from_secs(u64::from(row.ttl_s)),
            )
            .await?;
        pg::slide(&mut tx, key, meta.last_active_ms, row.ttl_s).await?;
        tx.commit().await?;
        tracing::info!(session = %moltbot_runtime::telemetry::redact::session_id(&key.tenant, &key.session_id), tenant = %key.tenant, turns = turns.len(), "session restored from the archive");
        Ok(History {
            turns,
            meta,
            restored: true,
        })
    }
}

#[tonic::async_trait]
impl SessionStore for ArchivedStore {
    async fn append(
        &self,
        key: &SessionKey,
        turns: Vec<StoredTurn>,
        idempotency_key: Option<String>,
        ttl: Option<Duration>,
    ) -> Result<AppendOutcome, ContextError> {
        let mut tx = self.archive.begin().await?;
        let now = now_ms();
        let row = pg::lock_for_append(&mut tx, key, now, secs(self.limits.default_ttl)).await?;
        let ttl_s = ttl.map(secs).unwrap_or(row.ttl_s);
        let first_attempt = match &idempotency_key {
            Some(k) => pg::record_idempotency_key(&mut tx, key, k, now).await?,
            None => true,
        };
        let added = if first_attempt {
            pg::insert_turns(&mut tx, key, row.next_seq, &turns).await?;
            turns.len()
        } else {
            0
        };
        let archived = pg::finish_append(&mut tx, key, now, ttl_s, added).await?;
        let mut outcome = self
            .primary
            .append(
                key,
                turns,
                idempotency_key,
                Some(Duration::from_secs(u64::from(ttl_s))),
            )
            .await?;
        let expected = archived.min(self.limits.max_turns as u64);
        if outcome.meta.turn_count < expected {
            // The primary lost the session since the last append: put the
            // archived tail (which includes this append) back.
            let tail = pg::recent_turns(&mut tx, key, self.limits.max_turns).await?;
            outcome.meta = self
                .primary
                .restore(
                    key,
                    tail,
                    row.created_at_ms,
                    Duration::from_secs(u64::from(ttl_s)),
                )
                .await?;
            tracing::info!(session = %moltbot_runtime::telemetry::redact::session_id(&key.tenant, &key.session_id), tenant = %key.tenant, "session restored from the archive on append");
        }
        tx.commit().await?;
        outcome.duplicate |= !first_attempt;
        Ok(outcome)
    }

    async fn history(&self, key: &SessionKey) -> Result<History, ContextError> {
        match self.primary.history(key).await {
            Ok(history) => {
                // The read slid the TTL in the primary; slide the archive's
                // copy off the request path so reads cost no PostgreSQL trip.
                let archive = self.archive.clone();
                let key = key.clone();
                let (at, ttl_s) = (history.meta.last_active_ms, history.meta.ttl_s);
                tokio::spawn(async move {
                    if let Err(e) = archive.touch(&key, at, ttl_s).await {
                        tracing::debug!(error = %e, "archive TTL slide failed");
                    }
                });
                Ok(history)
            }
            Err(ContextError::NotFound) => self.restore(key).await,
            Err(e) => Err(e),
        }
    }

    async fn restore(
        &self,
        key: &SessionKey,
        turns: Vec<StoredTurn>,
        created_at_ms: i64,
        ttl: Duration,
    ) -> Result<SessionMeta, ContextError> {
        // Restoring is the primary's operation; the archive already has them.
        self.primary.restore(key, turns, created_at_ms, ttl).await
    }

    async fn reset(&self, key: &SessionKey) -> Result<u64, ContextError> {
        let mut tx = self.archive.begin().await?;
        let now = now_ms();
        let Some(row) = pg::find_for_update(&mut tx, key)
            .await?
            .filter(|r| r.alive(now))
        else {
            drop(tx);
            return self.primary.reset(key).await;
        };
        pg::clear_turns(&mut tx, key).await?;
        pg::slide(&mut tx, key, now, row.ttl_s).await?;
        let removed = match self.primary.reset(key).await {
            Ok(n) => n,
            Err(ContextError::NotFound) => {
                // Lost from the primary: the session lives on, empty.
                let ttl = Duration::from_secs(u64::from(row.ttl_s));
                self.primary
                    .restore(key, Vec::new(), row.created_at_ms, ttl)
                    .await?;
                row.turn_count.min(self.limits.max_turns as u64)
            }
            Err(e) => return Err(e),
        };
        tx.commit().await?;
        Ok(removed)
    }

    async fn delete(&self, key: &SessionKey) -> Result<u64, ContextError> {
        let mut tx = self.archive.begin().await?;
        let now = now_ms();
        let row = pg::delete(&mut tx, key).await?;
        let removed = match (self.primary.delete(key).await, row) {
            (Ok(n), _) => Ok(n),
            (Err(ContextError::NotFound), Some(row)) if row.alive(now) => {
                Ok(row.turn_count.min(self.limits.max_turns as u64))
            }
            (Err(ContextError::NotFound), _) => Err(ContextError::NotFound),
            (Err(e), _) => return Err(e),
        };
        tx.commit().await?;
        removed
    }

    async fn list(
        &self,
        tenant: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<SessionPage, ContextError> {
        self.primary.list(tenant, page_size, after).await
    }

    async fn get(&self, key: &SessionKey) -> Result<SessionMeta, ContextError> {
        match self.primary.get(key).await {
            Err(ContextError::NotFound) => self.restore(key).await.map(|h| h.meta),
            other => other,
        }
    }

    async fn ping(&self) -> Result<(), ContextError> {
        self.primary.ping().await?;
        self.archive.ping().await
    }
}
