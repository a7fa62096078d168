//! `moltbot-sql`: what the services with a relational store share — an
//! embedded SQLite file (WAL, durable at commit) or PostgreSQL in the
//! service's own schema, migrated at start-up, behind one [`Pool`] whose
//! variants run the same SQL text ([`on_pool!`]: both engines read `$N`
//! parameters).

use std::{path::Path, str::FromStr, time::Duration};

use sqlx::{
    PgPool, SqlitePool,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

/// A pool of either engine.
#[derive(Debug, Clone)]
pub enum Pool {
    /// An embedded SQLite file.
    Sqlite(SqlitePool),
    /// A PostgreSQL server.
    Postgres(PgPool),
}

impl Pool {
    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// Runs the same code on whichever pool `$pool` (a `&Pool`) holds, with the
/// concrete pool bound to `$p`.
#[macro_export]
macro_rules! on_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            $crate::Pool::Sqlite($p) => $body,
            $crate::Pool::Postgres($p) => $body,
        }
    };
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL or path is wrong; the message says what to use.
    #[error("{0}")]
    Config(String),
    /// The database cannot be reached or opened.
    #[error("{0}")]
    Unavailable(String),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migration(String),
}

/// Opens (creating) the SQLite file at `path` in WAL mode with synchronous
/// FULL (a committed transaction survives power loss), foreign keys on and a
/// 10 s busy timeout, then runs `migrator`.
pub async fn open_sqlite(
    path: &Path,
    max_connections: u32,
    migrator: &Migrator,
) -> Result<Pool, OpenError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| OpenError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
    }
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(max_connections)
        .connect_with(options)
        .await
        .map_err(|e| OpenError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    migrator
        .run(&pool)
        .await
        .map_err(|e| OpenError::Migration(e.to_string()))?;
    Ok(Pool::Sqlite(pool))
}

/// Connects to PostgreSQL at `url` with `search_path` set to `schema`,
/// creates the schema (under an advisory lock, so replicas starting together
/// do not race) and runs `migrator` in it.
pub async fn open_postgres(
    url: &str,
    schema: &str,
    max_connections: u32,
    migrator: &Migrator,
) -> Result<Pool, OpenError> {
    let valid = !schema.is_empty()
        && schema.len() <= 63
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(OpenError::Config(format!(
            "PostgreSQL schema {schema:?} must match [a-z_][a-z0-9_]{{0,62}}"
        )));
    }
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| {
            OpenError::Config(format!(
                "DATABASE_URL is not a PostgreSQL URL ({e}); use e.g. postgres://postgres@127.0.0.1:5432/moltbot"
            ))
        })?
        .options([("search_path", schema)]);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(|e| OpenError::Unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
    let unavailable = |e: sqlx::Error| OpenError::Unavailable(format!("PostgreSQL: {e}"));
    let mut tx = pool.begin().await.map_err(unavailable)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("moltbot.schema.{schema}"))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    tx.commit().await.map_err(unavailable)?;
    migrator
        .run(&pool)
        .await
        .map_err(|e| OpenError::Migration(e.to_string()))?;
    Ok(Pool::Postgres(pool))
}

/// A second pool on the same database for ephemeral coordination rows
/// (leases, event logs): rows whose loss in a crash costs a retry, not
/// data. Commits on it do not wait for the disk: SQLite in WAL mode with
/// `synchronous = NORMAL` (the WAL is synced at checkpoints only; the
/// database stays consistent), PostgreSQL with `synchronous_commit = off`
/// (a crash may lose the last few hundred milliseconds of such commits,
/// never corrupts: PostgreSQL manual, "Asynchronous Commit"). Durable rows
/// (configuration, secrets) stay on the original pool, which keeps
/// `synchronous = FULL` / synchronous commits.
///
/// Errors with [`OpenError::Unavailable`] when the connection fails.
pub async fn ephemeral(pool: &Pool, max_connections: u32) -> Result<Pool, OpenError> {
    match pool {
        Pool::Sqlite(p) => {
            let options = (*p.connect_options())
                .clone()
                .synchronous(SqliteSynchronous::Normal);
            SqlitePoolOptions::new()
                .max_connections(max_connections)
                .connect_with(options)
                .await
                .map(Pool::Sqlite)
                .map_err(|e| OpenError::Unavailable(format!("cannot open SQLite: {e}")))
        }
        Pool::Postgres(p) => {
            let options = (*p.connect_options())
                .clone()
                .options([("synchronous_commit", "off")]);
            PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await
                .map(Pool::Postgres)
                .map_err(|e| OpenError::Unavailable(format!("cannot connect to PostgreSQL: {e}")))
        }
    }
}

/// Whether a sqlx error means the store is unreachable (as opposed to a
/// statement that failed).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
    )
}
