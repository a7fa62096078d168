//! The change log: one row per committed write (table `changes`, migration
//! 0002), read by every replica's follower (crate::follow) to bring its
//! in-process index up to the store. Writers add their row inside the
//! write's own transaction (`log_change!` in the parent module).

use sqlx::Row;

use super::{ChunkRow, CollectionRow, SELECT_CHUNKS, Store, chunk_from, collection_from};
use crate::RetrievalError;
use moltbot_sql::on_pool;

/// PostgreSQL advisory-lock key serialising change-log rows across writers
/// (`pg_advisory_xact_lock`); an arbitrary constant ("mbrt" in ASCII).
pub const LOCK: i64 = 0x6d62_7274;

/// `kind` of a document write: chunk keys removed and added.
pub const CHUNKS: &str = "chunks";
/// `kind` of a new collection.
pub const COLLECTION_CREATED: &str = "collection_created";
/// `kind` of a deleted collection.
pub const COLLECTION_DELETED: &str = "collection_deleted";

/// Chunk keys as the JSON array stored in `removed` / `added`.
pub fn keys_json(keys: &[u64]) -> String {
    serde_json::to_string(keys).unwrap_or_else(|_| "[]".to_owned())
}

/// One row of the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Position in commit order.
    pub seq: i64,
    /// The collection written.
    pub collection: String,
    /// [`CHUNKS`], [`COLLECTION_CREATED`] or [`COLLECTION_DELETED`].
    pub kind: String,
    /// Chunk keys removed.
    pub removed: Vec<u64>,
    /// Chunk keys added.
    pub added: Vec<u64>,
}

fn keys(json: &str) -> Vec<u64> {
    serde_json::from_str(json).unwrap_or_default()
}

impl Store {
    /// The newest change's `seq` (0 for none): a replica that loads its
    /// index now follows from here.
    pub async fn last_change(&self) -> Result<i64, RetrievalError> {
        on_pool!(&self.pool, p => {
            let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM changes")
                .fetch_one(p)
                .await?;
            Ok(row.try_get::<i64, _>("seq")?)
        })
    }

    /// Up to `limit` changes after `seq`, oldest first.
    pub async fn changes_after(&self, seq: i64, limit: i64) -> Result<Vec<Change>, RetrievalError> {
        let sql = "SELECT seq, collection, kind, removed, added FROM changes \
                   WHERE seq > $1 ORDER BY seq LIMIT $2";
        on_pool!(&self.pool, p => {
            let rows = sqlx::query(sql).bind(seq).bind(limit).fetch_all(p).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                out.push(Change {
                    seq: r.try_get("seq")?,
                    collection: r.try_get("collection")?,
                    kind: r.try_get("kind")?,
                    removed: keys(&r.try_get::<String, _>("removed")?),
                    added: keys(&r.try_get::<String, _>("added")?),
                });
            }
            Ok(out)
        })
    }

    /// The chunks of `collection` among `keys` that still exist, with their
    /// vectors (a later write may have removed some).
    pub async fn chunks_with_keys(
        &self,
        collection: &str,
        keys: &[u64],
    ) -> Result<Vec<ChunkRow>, RetrievalError> {
        let (Some(&low), Some(&high)) = (keys.iter().min(), keys.iter().max()) else {
            return Ok(Vec::new());
        };
        let sql = format!(
            "{SELECT_CHUNKS}, c.vector \
             FROM chunks c JOIN documents d ON d.collection = c.collection AND d.id = c.document_id \
             WHERE c.collection = $1 AND c.key >= $2 AND c.key <= $3 ORDER BY c.key"
        );
        let wanted: std::collections::HashSet<u64> = keys.iter().copied().collect();
        on_pool!(&self.pool, p => {
            let rows = sqlx::query(&sql)
                .bind(collection)
                .bind(low as i64)
                .bind(high as i64)
                .fetch_all(p)
                .await?;
            let mut out = Vec::new();
            for r in &rows {
                let key = r.try_get::<i64, _>("key")? as u64;
                if wanted.contains(&key) {
                    out.push(chunk_from(r, true)?);
                }
            }
            Ok(out)
        })
    }

    /// The collection `name`, if it exists.
    pub async fn collection_row(
        &self,
        name: &str,
    ) -> Result<Option<CollectionRow>, RetrievalError> {
        let sql = "SELECT name, dimension, chunk_tokens, overlap_tokens, created_at_ms \
                   FROM collections WHERE name = $1";
        on_pool!(&self.pool, p => {
            let row = sqlx::query(sql).bind(name).fetch_optional(p).await?;
            Ok(row.map(|r| collection_from(&r)).transpose()?)
        })
    }

    /// Deletes changes older than `before_ms` (ms since the epoch); returns
    /// how many. A replica further behind than that reloads at its next
    /// start anyway.
    pub async fn prune_changes(&self, before_ms: i64) -> Result<u64, RetrievalError> {
        on_pool!(&self.pool, p => {
            Ok(sqlx::query("DELETE FROM changes WHERE at_ms < $1")
                .bind(before_ms)
                .execute(p)
                .await?
                .rows_affected())
        })
    }
}
