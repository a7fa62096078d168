//! The durable store of collections, documents and chunks (with their
//! vectors): SQLite (embedded default, one file) or PostgreSQL (sqlx, its own
//! schema), with the same SQL and the same behaviour. Every write is one
//! transaction; a document's chunks are replaced atomically.

use moltbot_sql::{OpenError, Pool, on_pool};
use sqlx::Row;

use crate::RetrievalError;

/// Appends one row to the change log inside the transaction `$tx` of a
/// write ([`changes`]): on PostgreSQL after taking the change-log lock, held
/// until commit, so rows commit in `seq` order whichever replica wrote them.
macro_rules! log_change {
    ($tx:expr, $postgres:expr, $collection:expr, $kind:expr, $removed:expr, $added:expr) => {{
        if $postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(changes::LOCK)
                .execute(&mut *$tx)
                .await?;
        }
        sqlx::query_scalar::<_, i64>(
            "INSERT INTO changes (collection, kind, removed, added, at_ms) VALUES ($1, $2, $3, $4, $5) RETURNING seq",
        )
        .bind($collection)
        .bind($kind)
        .bind(changes::keys_json($removed))
        .bind(changes::keys_json($added))
        .bind(crate::state::now_ms())
        .fetch_one(&mut *$tx)
        .await?
    }};
}

pub mod changes;

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Default PostgreSQL schema of the retrieval tables.
pub const PG_SCHEMA: &str = "moltbot_retrieval";

/// A collection row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionRow {
    /// Name.
    pub name: String,
    /// Vector dimension.
    pub dimension: u32,
    /// Chunk size, tokens.
    pub chunk_tokens: u32,
    /// Chunk overlap, tokens.
    pub overlap_tokens: u32,
    /// Creation, ms since the Unix epoch.
    pub created_at_ms: i64,
}

/// A chunk to write.
#[derive(Debug, Clone)]
pub struct NewChunk {
    /// Position in its document, from 0.
    pub ordinal: u32,
    /// Passage text.
    pub text: String,
    /// Embedding, `dimension` f32 values.
    pub vector: Vec<f32>,
}

/// A stored chunk.
#[derive(Debug, Clone)]
pub struct ChunkRow {
    /// Index key (never reused).
    pub key: u64,
    /// Document id.
    pub document_id: String,
    /// Position in the document.
    pub ordinal: u32,
    /// Passage text.
    pub text: String,
    /// The document's metadata as a JSON object of strings.
    pub metadata: String,
    /// Embedding; `None` when not asked for.
    pub vector: Option<Vec<f32>>,
}

/// What an upsert replaced.
#[derive(Debug, Clone, Default)]
pub struct Replaced {
    /// Keys of the document's previous chunks (now deleted).
    pub old_keys: Vec<u64>,
    /// Keys of its new chunks, in ordinal order.
    pub new_keys: Vec<u64>,
    /// The write's change-log position (`changes.seq`).
    pub seq: i64,
}

/// Little-endian f32 bytes of a vector.
pub fn vector_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The vector of little-endian f32 `bytes`.
pub fn vector_from(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The store.
pub struct Store {
    pool: Pool,
    /// SQLite has one writer: writes queue here instead of failing with
    /// SQLITE_BUSY when a deferred transaction cannot upgrade its lock.
    write_lock: tokio::sync::Mutex<()>,
}

fn collection_from<R: Row>(row: &R) -> Result<CollectionRow, sqlx::Error>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    Ok(CollectionRow {
        name: row.try_get("name")?,
        dimension: row.try_get::<i64, _>("dimension")? as u32,
        chunk_tokens: row.try_get::<i64, _>("chunk_tokens")? as u32,
        overlap_tokens: row.try_get::<i64, _>("overlap_tokens")? as u32,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

fn chunk_from<R: Row>(row: &R, with_vector: bool) -> Result<ChunkRow, sqlx::Error>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    Ok(ChunkRow {
        key: row.try_get::<i64, _>("key")? as u64,
        document_id: row.try_get("document_id")?,
        ordinal: row.try_get::<i64, _>("ordinal")? as u32,
        text: row.try_get("text")?,
        metadata: row.try_get("metadata")?,
        vector: if with_vector {
            Some(vector_from(&row.try_get::<Vec<u8>, _>("vector")?))
        } else {
            None
        },
    })
}

const SELECT_CHUNKS: &str = "SELECT c.key, c.document_id, c.ordinal, c.text, d.metadata";

fn open_error(e: OpenError) -> RetrievalError {
    match e {
        OpenError::Config(m) => RetrievalError::InvalidArgument(m),
        OpenError::Unavailable(m) => RetrievalError::StoreUnavailable(m),
        OpenError::Migration(m) => RetrievalError::Store(format!("migration failed: {m}")),
    }
}

impl Store {
    /// Opens (creating if needed) the SQLite file at `path` (WAL, durable
    /// at commit) and migrates it. Errors with
    /// [`RetrievalError::StoreUnavailable`] when the file cannot be opened.
    pub async fn sqlite(path: &std::path::Path) -> Result<Self, RetrievalError> {
        let pool = moltbot_sql::open_sqlite(path, 8, &SQLITE_MIGRATOR)
            .await
            .map_err(open_error)?;
        Ok(Self {
            pool,
            write_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Connects to PostgreSQL, creates the [`PG_SCHEMA`] schema and migrates
    /// it. Errors with [`RetrievalError::InvalidArgument`] for a bad URL and
    /// [`RetrievalError::StoreUnavailable`] when it cannot connect.
    pub async fn postgres(url: &str, schema: &str) -> Result<Self, RetrievalError> {
        let pool = moltbot_sql::open_postgres(url, schema, 16, &PG_MIGRATOR)
            .await
            .map_err(open_error)?;
        Ok(Self {
            pool,
            write_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        self.pool.backend()
    }

    fn is_postgres(&self) -> bool {
        matches!(self.pool, Pool::Postgres(_))
    }

    async fn write_guard(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.pool {
            Pool::Sqlite(_) => Some(self.write_lock.lock().await),
            Pool::Postgres(_) => None,
        }
    }

    /// Creates a collection; returns the change-log position of the write.
    /// Errors with [`RetrievalError::CollectionExists`].
    pub async fn create_collection(&self, c: &CollectionRow) -> Result<i64, RetrievalError> {
        let _guard = self.write_guard().await;
        let postgres = self.is_postgres();
        on_pool!(&self.pool, p => {
            let mut tx = p.begin().await?;
            let inserted = sqlx::query(
                "INSERT INTO collections (name, dimension, chunk_tokens, overlap_tokens, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
            )
            .bind(&c.name)
            .bind(i64::from(c.dimension))
            .bind(i64::from(c.chunk_tokens))
            .bind(i64::from(c.overlap_tokens))
            .bind(c.created_at_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                return Err(RetrievalError::CollectionExists(c.name.clone()));
            }
            let seq = log_change!(tx, postgres, &c.name, changes::COLLECTION_CREATED, &[], &[]);
            tx.commit().await?;
            Ok(seq)
        })
    }

    /// Every collection, by name.
    pub async fn collections(&self) -> Result<Vec<CollectionRow>, RetrievalError> {
        let sql = "SELECT name, dimension, chunk_tokens, overlap_tokens, created_at_ms FROM collections ORDER BY name";
        on_pool!(&self.pool, p => {
            let rows = sqlx::query(sql).fetch_all(p).await?;
            rows.iter().map(|r| collection_from(r).map_err(RetrievalError::from)).collect()
        })
    }

    /// Deletes a collection with its documents and chunks; returns the number
    /// of chunks removed. Errors with [`RetrievalError::CollectionNotFound`].
    pub async fn delete_collection(&self, name: &str) -> Result<u64, RetrievalError> {
        let _guard = self.write_guard().await;
        let postgres = self.is_postgres();
        on_pool!(&self.pool, p => {
            let mut tx = p.begin().await?;
            let chunks = sqlx::query("DELETE FROM chunks WHERE collection = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query("DELETE FROM documents WHERE collection = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            let gone = sqlx::query("DELETE FROM collections WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if gone == 0 {
                return Err(RetrievalError::CollectionNotFound(name.to_owned()));
            }
            let _ = log_change!(tx, postgres, name, changes::COLLECTION_DELETED, &[], &[]);
            tx.commit().await?;
            Ok(chunks)
        })
    }

    /// Inserts or replaces one document and its chunks in one transaction.
    /// Errors with [`RetrievalError::CollectionNotFound`].
    pub async fn upsert_document(
        &self,
        collection: &str,
        document_id: &str,
        metadata_json: &str,
        chunks: &[NewChunk],
    ) -> Result<Replaced, RetrievalError> {
        let _guard = self.write_guard().await;
        let postgres = self.is_postgres();
        on_pool!(&self.pool, p => {
            let mut tx = p.begin().await?;
            let exists = sqlx::query("SELECT 1 AS one FROM collections WHERE name = $1")
                .bind(collection)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(RetrievalError::CollectionNotFound(collection.to_owned()));
            }
            // The document row first: it locks the document against a
            // concurrent upsert of the same id (PostgreSQL).
            sqlx::query(
                "INSERT INTO documents (collection, id, metadata) VALUES ($1, $2, $3) \
                 ON CONFLICT (collection, id) DO UPDATE SET metadata = excluded.metadata",
            )
            .bind(collection)
            .bind(document_id)
            .bind(metadata_json)
            .execute(&mut *tx)
            .await?;
            let old = sqlx::query("DELETE FROM chunks WHERE collection = $1 AND document_id = $2 RETURNING key")
                .bind(collection)
                .bind(document_id)
                .fetch_all(&mut *tx)
                .await?;
            let mut replaced = Replaced::default();
            for r in &old {
                replaced.old_keys.push(r.try_get::<i64, _>("key")? as u64);
            }
            for c in chunks {
                let row = sqlx::query(
                    "INSERT INTO chunks (collection, document_id, ordinal, text, vector) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING key",
                )
                .bind(collection)
                .bind(document_id)
                .bind(i64::from(c.ordinal))
                .bind(&c.text)
                .bind(vector_bytes(&c.vector))
                .fetch_one(&mut *tx)
                .await?;
                replaced.new_keys.push(row.try_get::<i64, _>("key")? as u64);
            }
            replaced.seq = log_change!(tx, postgres, collection, changes::CHUNKS, &replaced.old_keys, &replaced.new_keys);
            tx.commit().await?;
            Ok(replaced)
        })
    }

    /// Deletes documents and their chunks; returns the documents deleted,
    /// the chunk keys removed and the change-log position of the write. Unknown ids are ignored. Errors with
    /// [`RetrievalError::CollectionNotFound`].
    pub async fn delete_documents(
        &self,
        collection: &str,
        ids: &[String],
    ) -> Result<(u32, Vec<u64>, i64), RetrievalError> {
        let _guard = self.write_guard().await;
        let postgres = self.is_postgres();
        on_pool!(&self.pool, p => {
            let mut tx = p.begin().await?;
            let exists = sqlx::query("SELECT 1 AS one FROM collections WHERE name = $1")
                .bind(collection)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(RetrievalError::CollectionNotFound(collection.to_owned()));
            }
            let mut docs = 0u32;
            let mut keys = Vec::new();
            for id in ids {
                let rows = sqlx::query("DELETE FROM chunks WHERE collection = $1 AND document_id = $2 RETURNING key")
                    .bind(collection)
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
                for r in &rows {
                    keys.push(r.try_get::<i64, _>("key")? as u64);
                }
                docs += sqlx::query("DELETE FROM documents WHERE collection = $1 AND id = $2")
                    .bind(collection)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected() as u32;
            }
            let seq = log_change!(tx, postgres, collection, changes::CHUNKS, &keys, &[]);
            tx.commit().await?;
            Ok((docs, keys, seq))
        })
    }

    /// Every chunk of a collection (text and metadata); vectors only for keys
    /// ≥ `vectors_from` (what the index snapshot lacks), `None` for none.
    pub async fn chunks(
        &self,
        collection: &str,
        vectors_from: Option<u64>,
    ) -> Result<Vec<ChunkRow>, RetrievalError> {
        let from = vectors_from.map_or(i64::MAX, |k| k as i64);
        let sql = format!(
            "{SELECT_CHUNKS}, CASE WHEN c.key >= $2 THEN c.vector ELSE NULL END AS vector \
             FROM chunks c JOIN documents d ON d.collection = c.collection AND d.id = c.document_id \
             WHERE c.collection = $1 ORDER BY c.key"
        );
        on_pool!(&self.pool, p => {
            let rows = sqlx::query(&sql).bind(collection).bind(from).fetch_all(p).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let key = r.try_get::<i64, _>("key")? as u64;
                out.push(chunk_from(r, vectors_from.is_some_and(|f| key >= f))?);
            }
            Ok(out)
        })
    }

    /// Number of documents in a collection.
    pub async fn document_count(&self, collection: &str) -> Result<u64, RetrievalError> {
        on_pool!(&self.pool, p => {
            let row = sqlx::query("SELECT COUNT(*) AS n FROM documents WHERE collection = $1")
                .bind(collection)
                .fetch_one(p)
                .await?;
            Ok(row.try_get::<i64, _>("n")? as u64)
        })
    }
}
