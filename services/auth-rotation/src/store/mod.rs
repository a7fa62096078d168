//! The durable store of providers and credentials: SQLite (embedded default)
//! or PostgreSQL (sqlx, schema `moltbot_auth`), same SQL on both. Secrets are
//! stored only as AES-256-GCM ciphertext ([`crate::crypto`]).

use moltbot_sql::{OpenError, Pool, on_pool};
use sqlx::Row;

use crate::AuthError;

pub mod shared;

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Default PostgreSQL schema of the auth tables.
pub const PG_SCHEMA: &str = "moltbot_auth";

/// A provider row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderRow {
    /// Name.
    pub name: String,
    /// `ProviderKind` as its proto number.
    pub kind: i32,
    /// Validated base URL.
    pub base_url: String,
    /// Models served.
    pub models: Vec<String>,
    /// Health-check interval, seconds.
    pub health_interval_s: u32,
}

/// A credential row; `secret` is ciphertext.
#[derive(Debug, Clone)]
pub struct CredentialRow {
    /// Id (`<provider>-<slot>`).
    pub id: String,
    /// Provider name.
    pub provider: String,
    /// `CredentialSlot` as its proto number.
    pub slot: i32,
    /// AES-256-GCM ciphertext of the key or client secret.
    pub secret: Vec<u8>,
    /// `CredentialState` as its proto number (active, invalid, revoked;
    /// cooling is not persisted).
    pub state: i32,
    /// OAuth2 token endpoint.
    pub token_url: Option<String>,
    /// OAuth2 client id.
    pub client_id: Option<String>,
    /// OAuth2 scopes, space-separated.
    pub scopes: Option<String>,
}

/// The store.
pub struct Store {
    /// Providers and credentials: durable commits.
    pool: Pool,
    /// Leases and the event log ([`shared`]): commits that do not wait for
    /// the disk ([`moltbot_sql::ephemeral`]). Three of them per proxied
    /// request (lease, report, outcome event): with durable commits they
    /// were most of a remote turn's CPU and the store's throughput limit.
    shared: Pool,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn open_error(e: OpenError) -> AuthError {
    match e {
        OpenError::Config(m) => AuthError::Config(m),
        OpenError::Unavailable(m) => AuthError::StoreUnavailable(m),
        OpenError::Migration(m) => AuthError::Store(format!("migration failed: {m}")),
    }
}

impl Store {
    /// Opens (creating) the SQLite file at `path` and migrates it.
    pub async fn sqlite(path: &std::path::Path) -> Result<Self, AuthError> {
        let pool = moltbot_sql::open_sqlite(path, 1, &SQLITE_MIGRATOR)
            .await
            .map_err(open_error)?;
        let shared = moltbot_sql::ephemeral(&pool, 1).await.map_err(open_error)?;
        Ok(Self { pool, shared })
    }

    /// Connects to PostgreSQL, creates [`PG_SCHEMA`] and migrates it.
    pub async fn postgres(url: &str, schema: &str) -> Result<Self, AuthError> {
        let pool = moltbot_sql::open_postgres(url, schema, 8, &PG_MIGRATOR)
            .await
            .map_err(open_error)?;
        let shared = moltbot_sql::ephemeral(&pool, 8).await.map_err(open_error)?;
        Ok(Self { pool, shared })
    }

    /// Inserts or updates a provider.
    pub async fn upsert_provider(&self, p: &ProviderRow) -> Result<(), AuthError> {
        let models = serde_json::to_string(&p.models).unwrap_or_else(|_| "[]".into());
        on_pool!(&self.pool, pool => {
            sqlx::query(
                "INSERT INTO providers (name, kind, base_url, models, health_interval_s) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, base_url = excluded.base_url, \
                 models = excluded.models, health_interval_s = excluded.health_interval_s",
            )
            .bind(&p.name)
            .bind(i64::from(p.kind))
            .bind(&p.base_url)
            .bind(models)
            .bind(i64::from(p.health_interval_s))
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Every provider.
    pub async fn providers(&self) -> Result<Vec<ProviderRow>, AuthError> {
        on_pool!(&self.pool, pool => {
            let rows = sqlx::query("SELECT name, kind, base_url, models, health_interval_s FROM providers ORDER BY name")
                .fetch_all(pool)
                .await?;
            let mut out = Vec::new();
            for r in &rows {
                let models: String = r.try_get("models")?;
                out.push(ProviderRow {
                    name: r.try_get("name")?,
                    kind: r.try_get::<i64, _>("kind")? as i32,
                    base_url: r.try_get("base_url")?,
                    models: serde_json::from_str(&models).unwrap_or_default(),
                    health_interval_s: r.try_get::<i64, _>("health_interval_s")? as u32,
                });
            }
            Ok(out)
        })
    }

    /// Inserts or replaces the credential in its (provider, slot).
    pub async fn put_credential(&self, c: &CredentialRow) -> Result<(), AuthError> {
        on_pool!(&self.pool, pool => {
            sqlx::query(
                "INSERT INTO credentials (id, provider, slot, secret, state, token_url, client_id, scopes, updated_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (provider, slot) DO UPDATE SET id = excluded.id, secret = excluded.secret, \
                 state = excluded.state, token_url = excluded.token_url, client_id = excluded.client_id, \
                 scopes = excluded.scopes, updated_at_ms = excluded.updated_at_ms",
            )
            .bind(&c.id)
            .bind(&c.provider)
            .bind(i64::from(c.slot))
            .bind(&c.secret)
            .bind(i64::from(c.state))
            .bind(&c.token_url)
            .bind(&c.client_id)
            .bind(&c.scopes)
            .bind(now_ms())
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Persists a credential's state (active, invalid, revoked).
    pub async fn set_state(&self, id: &str, state: i32) -> Result<(), AuthError> {
        on_pool!(&self.pool, pool => {
            sqlx::query("UPDATE credentials SET state = $1, updated_at_ms = $2 WHERE id = $3")
                .bind(i64::from(state))
                .bind(now_ms())
                .bind(id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Every credential.
    pub async fn credentials(&self) -> Result<Vec<CredentialRow>, AuthError> {
        on_pool!(&self.pool, pool => {
            let rows = sqlx::query(
                "SELECT id, provider, slot, secret, state, token_url, client_id, scopes FROM credentials ORDER BY provider, slot",
            )
            .fetch_all(pool)
            .await?;
            let mut out = Vec::new();
            for r in &rows {
                out.push(CredentialRow {
                    id: r.try_get("id")?,
                    provider: r.try_get("provider")?,
                    slot: r.try_get::<i64, _>("slot")? as i32,
                    secret: r.try_get("secret")?,
                    state: r.try_get::<i64, _>("state")? as i32,
                    token_url: r.try_get("token_url")?,
                    client_id: r.try_get("client_id")?,
                    scopes: r.try_get("scopes")?,
                });
            }
            Ok(out)
        })
    }

    /// The raw ciphertext of a credential (for tests proving it is not
    /// plaintext).
    pub async fn raw_secret(&self, id: &str) -> Result<Option<Vec<u8>>, AuthError> {
        on_pool!(&self.pool, pool => {
            let row = sqlx::query("SELECT secret FROM credentials WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?;
            Ok(match row { Some(r) => Some(r.try_get("secret")?), None => None })
        })
    }
}
