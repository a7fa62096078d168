//! What replicas of auth-rotation share through the store (migration
//! 0002): leases, so that a report reaches whichever replica takes it, and
//! the event log of outcomes and configuration changes that every replica
//! applies (crate::registry::follow). These rows go through the store's
//! ephemeral pool: their commits do not wait for the disk.

use moltbot_sql::on_pool;
use sqlx::Row;

use super::{Store, now_ms};
use crate::AuthError;

/// PostgreSQL advisory-lock key serialising event rows across replicas
/// (`pg_advisory_xact_lock`), so that they commit in `seq` order; an
/// arbitrary constant ("mbar" in ASCII).
const LOCK: i64 = 0x6d62_6172;

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// Random id handed to the caller.
    pub id: String,
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Credential leased.
    pub credential_id: String,
    /// Expiry, ms since the epoch.
    pub expires_at_ms: i64,
}

/// `kind` of an event: a reported outcome.
pub const OUTCOME: &str = "outcome";
/// `kind` of an event: a provider or credential changed in the store.
pub const CONFIG: &str = "config";

/// One row of the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    /// Position in commit order.
    pub seq: i64,
    /// Replica that wrote it (and has applied it already).
    pub origin: String,
    /// [`OUTCOME`] or [`CONFIG`].
    pub kind: String,
    /// Provider.
    pub provider: String,
    /// Model (outcomes).
    pub model: String,
    /// Credential (outcomes).
    pub credential_id: String,
    /// `Outcome` as its proto number (outcomes).
    pub outcome: i32,
    /// `Retry-After` of the outcome, ms.
    pub retry_after_ms: u64,
    /// When it happened, ms since the epoch.
    pub at_ms: i64,
}

impl Store {
    fn is_postgres(&self) -> bool {
        matches!(self.shared, moltbot_sql::Pool::Postgres(_))
    }

    /// Stores a lease.
    pub async fn insert_lease(&self, l: &LeaseRow) -> Result<(), AuthError> {
        on_pool!(&self.shared, pool => {
            sqlx::query(
                "INSERT INTO leases (id, provider, model, credential_id, expires_at_ms) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&l.id)
            .bind(&l.provider)
            .bind(&l.model)
            .bind(&l.credential_id)
            .bind(l.expires_at_ms)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Removes and returns the lease `id` if it exists and has not expired:
    /// of two replicas taking the same report, one gets it.
    pub async fn take_lease(&self, id: &str) -> Result<Option<LeaseRow>, AuthError> {
        on_pool!(&self.shared, pool => {
            let row = sqlx::query(
                "DELETE FROM leases WHERE id = $1 \
                 RETURNING id, provider, model, credential_id, expires_at_ms",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?;
            let Some(r) = row else { return Ok(None) };
            let lease = LeaseRow {
                id: r.try_get("id")?,
                provider: r.try_get("provider")?,
                model: r.try_get("model")?,
                credential_id: r.try_get("credential_id")?,
                expires_at_ms: r.try_get("expires_at_ms")?,
            };
            Ok((lease.expires_at_ms > now_ms()).then_some(lease))
        })
    }

    /// Appends an event (its `seq` is assigned here; `at_ms` is now).
    pub async fn append_event(&self, e: &EventRow) -> Result<(), AuthError> {
        let postgres = self.is_postgres();
        on_pool!(&self.shared, pool => {
            let mut tx = pool.begin().await?;
            if postgres {
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(LOCK)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(
                "INSERT INTO events (origin, kind, provider, model, credential_id, outcome, retry_after_ms, at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&e.origin)
            .bind(&e.kind)
            .bind(&e.provider)
            .bind(&e.model)
            .bind(&e.credential_id)
            .bind(i64::from(e.outcome))
            .bind(e.retry_after_ms as i64)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// The newest event's `seq` (0 for none).
    pub async fn last_event(&self) -> Result<i64, AuthError> {
        on_pool!(&self.shared, pool => {
            let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM events")
                .fetch_one(pool)
                .await?;
            Ok(row.try_get::<i64, _>("seq")?)
        })
    }

    /// Up to 500 events after `seq`, oldest first.
    pub async fn events_after(&self, seq: i64) -> Result<Vec<EventRow>, AuthError> {
        on_pool!(&self.shared, pool => {
            let rows = sqlx::query(
                "SELECT seq, origin, kind, provider, model, credential_id, outcome, retry_after_ms, at_ms \
                 FROM events WHERE seq > $1 ORDER BY seq LIMIT 500",
            )
            .bind(seq)
            .fetch_all(pool)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                out.push(EventRow {
                    seq: r.try_get("seq")?,
                    origin: r.try_get("origin")?,
                    kind: r.try_get("kind")?,
                    provider: r.try_get("provider")?,
                    model: r.try_get("model")?,
                    credential_id: r.try_get("credential_id")?,
                    outcome: r.try_get::<i64, _>("outcome")? as i32,
                    retry_after_ms: r.try_get::<i64, _>("retry_after_ms")?.max(0) as u64,
                    at_ms: r.try_get("at_ms")?,
                });
            }
            Ok(out)
        })
    }

    /// Deletes expired leases and events older than `before_ms`.
    pub async fn prune_shared(&self, before_ms: i64) -> Result<(), AuthError> {
        on_pool!(&self.shared, pool => {
            sqlx::query("DELETE FROM leases WHERE expires_at_ms < $1")
                .bind(now_ms())
                .execute(pool)
                .await?;
            sqlx::query("DELETE FROM events WHERE at_ms < $1")
                .bind(before_ms)
                .execute(pool)
                .await?;
        });
        Ok(())
    }
}
