//! The archive's PostgreSQL side: the lazily connected pool, the schema and
//! its migrations (`services/context/migrations`), and one function per
//! statement. Every function that changes a session takes the connection of a
//! transaction that already holds the session row's lock.

use std::{str::FromStr, time::Duration};

use sqlx::{
    PgConnection, PgPool, Postgres, Row, Transaction,
    postgres::{PgConnectOptions, PgPoolOptions, PgRow},
};
use tokio::sync::OnceCell;

use crate::{
    ContextError,
    session::{SessionKey, StoredTurn},
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Most pooled connections to the archive.
const MAX_CONNECTIONS: u32 = 16;

/// A session row of the archive.
#[derive(Debug, Clone, Copy)]
pub struct SessionRow {
    /// First append, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Sliding TTL, seconds.
    pub ttl_s: u32,
    /// The session is dead once now ≥ this, ms since the Unix epoch.
    pub expires_at_ms: i64,
    /// Turns archived since the last reset.
    pub turn_count: u64,
    /// Sequence number of the next turn.
    pub next_seq: i64,
}

impl SessionRow {
    /// Whether the session is still alive at `now_ms`.
    pub fn alive(&self, now_ms: i64) -> bool {
        now_ms < self.expires_at_ms
    }

    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            created_at_ms: row.try_get("created_at_ms")?,
            ttl_s: u32::try_from(row.try_get::<i32, _>("ttl_s")?).unwrap_or(1),
            expires_at_ms: row.try_get("expires_at_ms")?,
            turn_count: u64::try_from(row.try_get::<i64, _>("turn_count")?).unwrap_or(0),
            next_seq: row.try_get("next_seq")?,
        })
    }
}

/// The archive database: a pool whose connections use the service's own
/// schema (`search_path`), migrated on first use.
#[derive(Clone)]
pub struct PgArchive {
    pool: PgPool,
    schema: String,
    ready: std::sync::Arc<OnceCell<()>>,
}

impl PgArchive {
    /// A lazily connected archive at `url` in `schema`; `timeout` bounds pool
    /// waits and every statement (`statement_timeout`). Errors with
    /// [`ContextError::InvalidArgument`] for a malformed URL or schema name.
    pub fn new(url: &str, schema: &str, timeout: Duration) -> Result<Self, ContextError> {
        let valid_schema = !schema.is_empty()
            && schema.len() <= 63
            && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid_schema {
            return Err(ContextError::InvalidArgument(format!(
                "archive schema {schema:?} must match [a-z_][a-z0-9_]{{0,62}}"
            )));
        }
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| {
                ContextError::InvalidArgument(format!(
                    "DATABASE_URL is not a PostgreSQL URL ({e}); use e.g. postgres://postgres@127.0.0.1:5432/moltbot"
                ))
            })?
            .options([
                ("search_path", schema.to_owned()),
                ("statement_timeout", format!("{}", timeout.as_millis().max(1))),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(timeout)
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            schema: schema.to_owned(),
            ready: std::sync::Arc::new(OnceCell::new()),
        })
    }

    /// Creates the schema and runs the migrations, once per process. Errors
    /// with [`ContextError::StoreUnavailable`] while PostgreSQL cannot be
    /// reached and [`ContextError::Archive`] when a migration fails.
    pub async fn ready(&self) -> Result<(), ContextError> {
        self.ready
            .get_or_try_init(|| async {
                let mut tx = self.pool.begin().await?;
                // Replicas starting together would race on CREATE SCHEMA.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext('moltbot.context.schema'))")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", self.schema))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                MIGRATOR.run(&self.pool).await.map_err(|e| match e {
                    sqlx::migrate::MigrateError::Execute(e) => ContextError::from(e),
                    other => ContextError::Archive(format!("migration failed: {other}")),
                })
            })
            .await
            .map(|_| ())
    }

    /// Checks that the archive answers.
    pub async fn ping(&self) -> Result<(), ContextError> {
        self.ready().await?;
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Starts a transaction (migrating first if needed).
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, ContextError> {
        self.ready().await?;
        Ok(self.pool.begin().await?)
    }

    /// Slides a live session's TTL to `ttl_s` from `now_ms`, outside any
    /// transaction (reads do this in the background).
    pub async fn touch(
        &self,
        key: &SessionKey,
        now_ms: i64,
        ttl_s: u32,
    ) -> Result<(), ContextError> {
        sqlx::query(
            "UPDATE sessions SET last_active_ms = $3, expires_at_ms = $3 + $4::bigint * 1000 \
             WHERE tenant = $1 AND session_id = $2 AND expires_at_ms > $3",
        )
        .bind(&key.tenant)
        .bind(&key.session_id)
        .bind(now_ms)
        .bind(i64::from(ttl_s))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Locks the session row for an append, creating it if absent. An expired
/// session is started over: its turns and idempotency keys are dropped, as
/// Redis would have dropped them.
pub async fn lock_for_append(
    tx: &mut PgConnection,
    key: &SessionKey,
    now_ms: i64,
    default_ttl_s: u32,
) -> Result<SessionRow, ContextError> {
    // The no-op DO UPDATE makes an existing row's lock part of the upsert.
    let row = sqlx::query(
        "INSERT INTO sessions (tenant, session_id, created_at_ms, last_active_ms, ttl_s, expires_at_ms) \
         VALUES ($1, $2, $3, $3, $4, $3 + $4::bigint * 1000) \
         ON CONFLICT (tenant, session_id) DO UPDATE SET tenant = EXCLUDED.tenant \
         RETURNING created_at_ms, ttl_s, expires_at_ms, turn_count, next_seq",
    )
    .bind(&key.tenant)
    .bind(&key.session_id)
    .bind(now_ms)
    .bind(default_ttl_s as i32)
    .fetch_one(&mut *tx)
    .await?;
    let row = SessionRow::from_row(&row)?;
    if row.alive(now_ms) {
        return Ok(row);
    }
    clear_turns(tx, key).await?;
    sqlx::query("DELETE FROM appends WHERE tenant = $1 AND session_id = $2")
        .bind(&key.tenant)
        .bind(&key.session_id)
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query(
        "UPDATE sessions SET created_at_ms = $3, last_active_ms = $3, ttl_s = $4, \
         expires_at_ms = $3 + $4::bigint * 1000 WHERE tenant = $1 AND session_id = $2 \
         RETURNING created_at_ms, ttl_s, expires_at_ms, turn_count, next_seq",
    )
    .bind(&key.tenant)
    .bind(&key.session_id)
    .bind(now_ms)
    .bind(default_ttl_s as i32)
    .fetch_one(&mut *tx)
    .await?;
    Ok(SessionRow::from_row(&row)?)
}

/// Locks and returns the session row, if there is one.
pub async fn find_for_update(
    tx: &mut PgConnection,
    key: &SessionKey,
) -> Result<Option<SessionRow>, ContextError> {
    let row = sqlx::query(
        "SELECT created_at_ms, ttl_s, expires_at_ms, turn_count, next_seq FROM sessions \
         WHERE tenant = $1 AND session_id = $2 FOR UPDATE",
    )
    .bind(&key.tenant)
    .bind(&key.session_id)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(row.as_ref().map(SessionRow::from_row).transpose()?)
}

/// Records an idempotency key; false when it had been recorded before (the
/// append is a retry and writes nothing).
pub async fn record_idempotency_key(
    tx: &mut PgConnection,
    key: &SessionKey,
    idempotency_key: &str,
    now_ms: i64,
) -> Result<bool, ContextError> {
    let done = sqlx::query(
        "INSERT INTO appends (tenant, session_id, idempotency_key, created_at_ms) \
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(&key.tenant)
    .bind(&key.session_id)
    .bind(idempotency_key)
    .bind(now_ms)
    .execute(&mut *tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Inserts `turns` with sequence numbers from `first_seq`, in one statement.
pub async fn insert_turns(
    tx: &mut PgConnection,
    key: &SessionKey,
    first_seq: i64,
    turns: &[StoredTurn],
) -> Result<(), ContextError> {
    let seqs: Vec<i64> = (first_seq..).take(turns.len()).collect();
    let roles: Vec<i16> = turns
        .iter()
        .map(|t| i16::try_from(t.role).unwrap_or(0))
        .collect();
    let contents: Vec<&str> = turns.iter().map(|t| t.content.as_str()).collect();
    let tokens: Vec<i32> = turns
        .iter()
        .map(|t| i32::try_from(t.token_count).unwrap_or(i32::MAX))
        .collect();
    let created: Vec<i64> = turns.iter().map(|t| t.created_at_ms).collect();
    sqlx::query(
        "INSERT INTO turns (tenant, session_id, seq, role, content, token_count, created_at_ms) \
         SELECT $1, $2, s, r, c, t, ts \
         FROM UNNEST($3::bigint[], $4::smallint[], $5::text[], $6::int[], $7::bigint[]) AS u(s, r, c, t, ts)",
    )
    .bind(&key.tenant)
    .bind(&key.session_id)
    .bind(seqs)
    .bind(roles)
    .bind(contents)
    .bind(tokens)
    .bind(created)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Ends an append: slides the TTL and counts `added` turns. Returns the
/// session's archived turn count.
pub async fn finish_append(
    tx: &mut PgConnection,
    key: &SessionKey,
    now_ms: i64,
    ttl_s: u32,
    added: usize,
) -> Result<u64, ContextError> {
    let count: i64 = sqlx::query_scalar(
        "UPDATE sessions SET last_active_ms = $3, ttl_s = $4, expires_at_ms = $3 + $4::bigint * 1000, \
         turn_count = turn_count + $5, next_seq = next_seq + $5 \
         WHERE tenant = $1 AND session_id = $2 RETURNING turn_count",
    )
    .bind(&key.tenant)
    .bind(&key.session_id)
    .bind(now_ms)
    .bind(i32::try_from(ttl_s).unwrap_or(i32::MAX))
    .bind(added as i64)
    .fetch_one(&mut *tx)
    .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// The newest `limit` turns, oldest first.
pub async fn recent_turns(
    tx: &mut PgConnection,
    key: &SessionKey,
    limit: usize,
) -> Result<Vec<StoredTurn>, ContextError> {
    let rows = sqlx::query(
        "SELECT role, content, token_count, created_at_ms FROM turns \
         WHERE tenant = $1 AND session_id = $2 ORDER BY seq DESC LIMIT $3",
    )
    .bind(&key.tenant)
    .bind(&key.session_id)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(&mut *tx)
    .await?;
    let mut turns = rows
        .iter()
        .map(|r| {
            Ok(StoredTurn {
                role: i32::from(r.try_get::<i16, _>("role")?),
                content: r.try_get("content")?,
                token_count: u32::try_from(r.try_get::<i32, _>("token_count")?).unwrap_or(0),
                created_at_ms: r.try_get("created_at_ms")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    turns.reverse();
    Ok(turns)
}

/// Drops every archived turn of the session (reset) and zeroes its count.
pub async fn clear_turns(tx: &mut PgConnection, key: &SessionKey) -> Result<(), ContextError> {
    sqlx::query("DELETE FROM turns WHERE tenant = $1 AND session_id = $2")
        .bind(&key.tenant)
        .bind(&key.session_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE sessions SET turn_count = 0 WHERE tenant = $1 AND session_id = $2")
        .bind(&key.tenant)
        .bind(&key.session_id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Slides the TTL inside a transaction (after a restore or reset).
pub async fn slide(
    tx: &mut PgConnection,
    key: &SessionKey,
    now_ms: i64,
    ttl_s: u32,
) -> Result<(), ContextError> {
    sqlx::query(
        "UPDATE sessions SET last_active_ms = $3, expires_at_ms = $3 + $4::bigint * 1000 \
         WHERE tenant = $1 AND session_id = $2",
    )
    .bind(&key.tenant)
    .bind(&key.session_id)
    .bind(now_ms)
    .bind(i64::from(ttl_s))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Deletes the session with its turns and keys; returns its row if it had one.
pub async fn delete(
    tx: &mut PgConnection,
    key: &SessionKey,
) -> Result<Option<SessionRow>, ContextError> {
    let row = sqlx::query(
        "DELETE FROM sessions WHERE tenant = $1 AND session_id = $2 \
         RETURNING created_at_ms, ttl_s, expires_at_ms, turn_count, next_seq",
    )
    .bind(&key.tenant)
    .bind(&key.session_id)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(row.as_ref().map(SessionRow::from_row).transpose()?)
}
