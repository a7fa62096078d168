//! `moltbot-auth-rotation`: remote-provider credentials with rotation, health
//! checks and circuit breakers.
//!
//! Providers and credentials live in the [`store`] (SQLite by default,
//! PostgreSQL with `DATABASE_URL`), secrets encrypted with AES-256-GCM under
//! `MOLTBOT_MASTER_KEY` ([`crypto`]). The [`registry`] leases credentials,
//! applies reported outcomes to per-credential and per-endpoint breakers,
//! cools rate-limited keys, invalidates rejected ones, health-checks
//! providers and refreshes OAuth2 tokens. Serves
//! `moltbot.auth.v1.AuthRotationService` with gRPC health and reflection.

pub mod crypto;
mod error;
pub mod registry;
mod service;
pub mod store;

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Parser;
use moltbot_proto::auth::v1::auth_rotation_service_server::AuthRotationServiceServer;
use moltbot_runtime::{
    RuntimeError,
    config::{ServerArgs, TelemetryArgs},
    grpc::{self, GrpcService},
    ports,
};

pub use error::AuthError;
pub use service::AuthApi;

/// Which store backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// One SQLite file under the data directory.
    Sqlite,
    /// PostgreSQL at `DATABASE_URL`.
    Postgres,
}

/// Command-line flags and environment of `moltbot-auth-rotation`.
#[derive(Clone, Parser)]
#[command(
    name = "moltbot-auth-rotation",
    version,
    about = "Remote-provider credentials with rotation, health checks and circuit breakers."
)]
pub struct Args {
    /// Listen addresses and shutdown.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Logging and tracing.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// 32-byte key encrypting secrets at rest, base64 or hex
    /// (`openssl rand -base64 32`). Required.
    #[arg(long, env = "MOLTBOT_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,
    /// Token of the admin RPCs (`authorization: Bearer <token>`); unset
    /// disables them.
    #[arg(long, env = "MOLTBOT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Data directory of the SQLite store.
    #[arg(long, env = "MOLTBOT_DATA_DIR", default_value = "var/data")]
    pub data_dir: PathBuf,
    /// Store [default: postgres when DATABASE_URL is set, else sqlite].
    #[arg(long, env = "MOLTBOT_AUTH_STORE", value_enum)]
    pub store: Option<Backend>,
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// PostgreSQL schema of the auth tables.
    #[arg(long, env = "MOLTBOT_AUTH_PG_SCHEMA", default_value = store::PG_SCHEMA)]
    pub pg_schema: String,
    /// First breaker cool-down, in milliseconds (doubles on each re-opening).
    #[arg(long, env = "MOLTBOT_BREAKER_COOLDOWN_MS", default_value_t = 5_000)]
    pub breaker_cooldown_ms: u64,
    /// Longest breaker cool-down, in milliseconds.
    #[arg(
        long,
        env = "MOLTBOT_BREAKER_MAX_COOLDOWN_MS",
        default_value_t = 300_000
    )]
    pub breaker_max_cooldown_ms: u64,
    /// Life of a credential lease, in seconds.
    #[arg(long, env = "MOLTBOT_LEASE_TTL_S", default_value_t = 600)]
    pub lease_ttl_s: u64,
    /// Cool-down of a credential after a 429 without `Retry-After`, in
    /// seconds.
    #[arg(long, env = "MOLTBOT_DEFAULT_RETRY_AFTER_S", default_value_t = 60)]
    pub default_retry_after_s: u64,
    /// Longest cool-down a provider's `Retry-After` may impose, in seconds.
    #[arg(long, env = "MOLTBOT_MAX_RETRY_AFTER_S", default_value_t = 600)]
    pub max_retry_after_s: u64,
    /// Granularity of the health-check scheduler, in milliseconds.
    #[arg(long, env = "MOLTBOT_HEALTH_TICK_MS", default_value_t = 250)]
    pub health_tick_ms: u64,
    /// Milliseconds between reads of the shared event log, by which this
    /// replica applies outcomes and configuration changes other replicas
    /// took (breakers agree within about this time).
    #[arg(long, env = "MOLTBOT_FOLLOW_INTERVAL_MS", default_value_t = 250)]
    pub follow_interval_ms: u64,
    /// Hosts a provider's base URL may reach over plain `http` besides
    /// loopback: in-cluster engines (vLLM, llm-d, KServe, a llama.cpp
    /// server), comma-separated; a name (`vllm`) or, with a leading dot,
    /// every name under a domain (`.svc.cluster.local`). Empty: loopback
    /// only.
    #[arg(long, env = "MOLTBOT_PLAIN_HTTP_HOSTS", value_delimiter = ',')]
    pub plain_http_hosts: Vec<String>,
}

impl std::fmt::Debug for Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Args")
            .field("server", &self.server)
            .field("data_dir", &self.data_dir)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Opens the store and loads the registry. Errors with
/// [`RuntimeError::Config`] when the master key is missing or invalid (the
/// message says how to make one) or the store cannot be opened.
pub async fn load(args: &Args) -> Result<Arc<registry::Registry>, RuntimeError> {
    let key_text = args.master_key.as_deref().ok_or_else(|| {
        RuntimeError::Config(format!(
            "MOLTBOT_MASTER_KEY is not set; {}",
            crypto::HOW_TO_MAKE_A_KEY
        ))
    })?;
    let key =
        crypto::MasterKey::parse(key_text).map_err(|e| RuntimeError::Config(e.to_string()))?;
    let backend = args.store.unwrap_or(if args.database_url.is_some() {
        Backend::Postgres
    } else {
        Backend::Sqlite
    });
    args.server.require_shared_store(
        backend == Backend::Sqlite,
        "the SQLite credential store",
        "DATABASE_URL",
    )?;
    let store = match backend {
        Backend::Sqlite => store::Store::sqlite(&args.data_dir.join("auth.db")).await,
        Backend::Postgres => {
            let url = args.database_url.as_deref().ok_or_else(|| {
                RuntimeError::Config("MOLTBOT_AUTH_STORE=postgres needs DATABASE_URL".into())
            })?;
            store::Store::postgres(url, &args.pg_schema).await
        }
    }
    .map_err(|e| RuntimeError::NotReady(e.to_string()))?;
    let settings = registry::Settings {
        cooldown: registry::breaker::Cooldown {
            base: Duration::from_millis(args.breaker_cooldown_ms.max(1)),
            max: Duration::from_millis(args.breaker_max_cooldown_ms.max(args.breaker_cooldown_ms)),
        },
        lease_ttl: Duration::from_secs(args.lease_ttl_s.max(1)),
        default_retry_after: Duration::from_secs(args.default_retry_after_s),
        max_retry_after: Duration::from_secs(args.max_retry_after_s.max(1)),
        token_refresh_margin: Duration::from_secs(60),
    };
    // Events after this position are applied by the follower: read before
    // the load, so nothing falls between the two.
    let cursor = store
        .last_event()
        .await
        .map_err(|e| RuntimeError::NotReady(e.to_string()))?;
    let registry = Arc::new(
        registry::Registry::load(store, key, settings)
            .await
            .map_err(|e| RuntimeError::Config(e.to_string()))?,
    );
    registry::follow::spawn(
        &registry,
        cursor,
        Duration::from_millis(args.follow_interval_ms.max(10)),
    );
    Ok(registry)
}

/// The gRPC service over a loaded registry; provider URLs may be plain
/// `http` on loopback and on `plain_http_hosts`.
pub fn grpc_service(
    registry: Arc<registry::Registry>,
    admin_token: Option<String>,
    plain_http_hosts: Vec<String>,
) -> GrpcService {
    GrpcService::new(AuthRotationServiceServer::new(AuthApi::new(
        registry,
        moltbot_runtime::grpc::admin::configured(admin_token.clone()).map(crypto::Secret::new),
        plain_http_hosts,
    )))
    .with_admin_token(admin_token)
}

/// Serves until SIGTERM/SIGINT, health-checking providers in the background.
/// Errors with [`RuntimeError`] for a missing master key, an unreachable
/// store, or an address in use.
pub async fn serve(args: Args) -> Result<(), RuntimeError> {
    let registry = load(&args).await?;
    let checker = tokio::spawn(registry::health::run(
        registry.clone(),
        Duration::from_millis(args.health_tick_ms.max(10)),
    ));
    let service = grpc_service(
        registry,
        args.admin_token.clone(),
        args.plain_http_hosts.clone(),
    );
    let result = grpc::serve(&ports::AUTH_ROTATION, &args.server, service, async {
        Ok(())
    })
    .await;
    checker.abort();
    result
}
