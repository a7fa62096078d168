//! `moltbot-context`: conversation memory — ordered turns per session with a
//! sliding TTL, namespaced by tenant.
//!
//! Backends ([`store`]): Redis (`REDIS_URL`; production) and in-memory (the
//! embedded default of `moltbot up`), optionally behind the PostgreSQL
//! [`archive`] (`DATABASE_URL`), which keeps every acknowledged turn and
//! restores sessions the primary store lost. The gRPC layer ([`service`])
//! validates requests and applies token budgets; health is SERVING once the
//! stores answer.

pub mod archive;
mod error;
pub mod service;
pub mod session;
pub mod store;

use std::{sync::Arc, time::Duration};

use clap::Parser;
use moltbot_proto::context::v1::context_service_server::ContextServiceServer;
use moltbot_runtime::{
    RuntimeError,
    config::{ServerArgs, TelemetryArgs},
    grpc::{self, GrpcService},
    ports,
};

use archive::{ArchivedStore, PgArchive};
pub use error::ContextError;
use service::{ContextApi, RequestLimits};
use store::{MemoryStore, RedisStore, SessionStore, StoreLimits};

/// Which backend keeps the sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Process memory; lost on restart.
    Memory,
    /// Redis at `REDIS_URL`.
    Redis,
}

/// Command-line flags and environment of `moltbot-context`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "moltbot-context",
    version,
    about = "MoltBot conversation memory"
)]
pub struct Args {
    /// Listen addresses and shutdown.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Logging and tracing.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Session store [default: redis when REDIS_URL is set, else memory].
    #[arg(long, env = "MOLTBOT_CONTEXT_STORE", value_enum)]
    pub store: Option<Backend>,
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Sliding session TTL, in seconds.
    #[arg(long, env = "MOLTBOT_SESSION_TTL_S", default_value_t = 1800)]
    pub session_ttl_s: u64,
    /// Turns kept per session (oldest trimmed).
    #[arg(long, env = "MOLTBOT_MAX_TURNS", default_value_t = 128)]
    pub max_turns: usize,
    /// Largest turn, in bytes.
    #[arg(long, env = "MOLTBOT_MAX_TURN_BYTES", default_value_t = 64 * 1024)]
    pub max_turn_bytes: usize,
    /// Deadline of each store call, in milliseconds.
    #[arg(long, env = "MOLTBOT_STORE_TIMEOUT_MS", default_value_t = 1000)]
    pub store_timeout_ms: u64,
    /// PostgreSQL URL of the durable archive, e.g.
    /// `postgres://postgres@127.0.0.1:5432/moltbot`; unset = no archive.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// PostgreSQL schema holding the archive's tables and migration ledger.
    #[arg(
        long,
        env = "MOLTBOT_CONTEXT_ARCHIVE_SCHEMA",
        default_value = "moltbot_context"
    )]
    pub archive_schema: String,
}

impl Args {
    /// The store limits these flags describe.
    pub fn store_limits(&self) -> StoreLimits {
        StoreLimits {
            max_turns: self.max_turns,
            default_ttl: Duration::from_secs(self.session_ttl_s),
        }
    }

    /// The request limits these flags describe.
    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            max_turn_bytes: self.max_turn_bytes,
            max_turns_per_append: 64,
            max_ttl: Duration::from_secs(30 * 24 * 3600),
        }
    }

    /// Builds the configured store, behind the archive when `DATABASE_URL` is
    /// set. Errors with [`RuntimeError::Config`] for zero limits, `--store
    /// redis` without a URL, a malformed URL or archive schema name.
    pub fn build_store(&self) -> Result<Arc<dyn SessionStore>, RuntimeError> {
        if self.max_turns == 0 || self.session_ttl_s == 0 || self.max_turn_bytes == 0 {
            return Err(RuntimeError::Config(
                "MOLTBOT_MAX_TURNS, MOLTBOT_SESSION_TTL_S and MOLTBOT_MAX_TURN_BYTES must be at least 1".into(),
            ));
        }
        let timeout = Duration::from_millis(self.store_timeout_ms.max(1));
        let primary = self.build_primary(timeout)?;
        match self.database_url.as_deref().filter(|u| !u.is_empty()) {
            None => Ok(primary),
            Some(url) => {
                let archive = PgArchive::new(url, &self.archive_schema, timeout)
                    .map_err(|e| RuntimeError::Config(e.to_string()))?;
                Ok(Arc::new(ArchivedStore::new(
                    primary,
                    archive,
                    self.store_limits(),
                )))
            }
        }
    }

    fn build_primary(&self, timeout: Duration) -> Result<Arc<dyn SessionStore>, RuntimeError> {
        let url = self.redis_url.as_deref().filter(|u| !u.is_empty());
        let backend = self.store.unwrap_or(if url.is_some() {
            Backend::Redis
        } else {
            Backend::Memory
        });
        self.server.require_shared_store(
            backend == Backend::Memory,
            "the in-memory session store",
            "REDIS_URL",
        )?;
        match backend {
            Backend::Memory => Ok(Arc::new(MemoryStore::new(self.store_limits()))),
            Backend::Redis => {
                let url = url.ok_or_else(|| {
                    RuntimeError::Config(
                        "MOLTBOT_CONTEXT_STORE=redis needs REDIS_URL, e.g. redis://127.0.0.1:6379"
                            .into(),
                    )
                })?;
                let store = RedisStore::new(url, self.store_limits(), timeout)
                    .map_err(|e| RuntimeError::Config(e.to_string()))?;
                Ok(Arc::new(store))
            }
        }
    }
}

/// The gRPC service over `store`.
pub fn grpc_service(store: Arc<dyn SessionStore>, limits: RequestLimits) -> GrpcService {
    GrpcService::new(ContextServiceServer::new(ContextApi::new(store, limits)))
}

/// Resolves once `store` answers, retrying every 500 ms (health stays
/// NOT_SERVING until then).
pub async fn store_ready(store: Arc<dyn SessionStore>) -> Result<(), RuntimeError> {
    let mut warned = false;
    loop {
        match store.ping().await {
            Ok(()) => return Ok(()),
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "session store not reachable yet; retrying");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Serves until SIGTERM/SIGINT. Errors with [`RuntimeError`] for bad flags, an
/// address in use, or a server failure.
pub async fn serve(args: Args) -> Result<(), RuntimeError> {
    let store = args.build_store()?;
    let service = grpc_service(store.clone(), args.request_limits());
    grpc::serve(&ports::CONTEXT, &args.server, service, store_ready(store)).await
}
