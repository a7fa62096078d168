//! The gateway's flags and environment (names pinned in docs/architecture.md, "Pinned names").

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use moltbot_runtime::config::TelemetryArgs;

/// Command-line flags and environment of `moltbot-gateway`.
#[derive(Debug, Clone, Parser)]
#[command(name = "moltbot-gateway", version, about = "MoltBot's HTTP edge")]
pub struct Args {
    /// HTTP listen address (API, health and `/metrics`). Port 0 picks a free port.
    #[arg(long, env = "MOLTBOT_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Client TLS for `https://` upstream URLs: the mesh CA and this
    /// gateway's certificate (mutual TLS).
    #[command(flatten)]
    pub tls: moltbot_runtime::grpc::tls::TlsArgs,
    /// Load balancing over every endpoint of each upstream: a URL, or
    /// several separated by commas, each host resolved to all its addresses.
    #[command(flatten)]
    pub balance: moltbot_runtime::grpc::balance::BalanceArgs,
    /// Understanding service (optional enrichment).
    #[arg(
        long,
        env = "MOLTBOT_UNDERSTANDING_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub understanding_url: String,
    /// Generation service (required).
    #[arg(
        long,
        env = "MOLTBOT_GENERATION_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub generation_url: String,
    /// Retrieval service (optional enrichment).
    #[arg(
        long,
        env = "MOLTBOT_RETRIEVAL_URL",
        default_value = "http://127.0.0.1:50053"
    )]
    pub retrieval_url: String,
    /// Context service (required).
    #[arg(
        long,
        env = "MOLTBOT_CONTEXT_URL",
        default_value = "http://127.0.0.1:50054"
    )]
    pub context_url: String,
    /// Auth-rotation service (used by generation's remote providers).
    #[arg(
        long,
        env = "MOLTBOT_AUTH_URL",
        default_value = "http://127.0.0.1:50055"
    )]
    pub auth_url: String,
    /// Routing and API-key configuration (YAML). Unset: the embedded default,
    /// one `default` route to the local model with the `docs` collection and
    /// anonymous access on loopback. The file is reloaded in place when its
    /// content changes and on SIGHUP (gateway/src/reload/mod.rs); check a
    /// file before applying it with `moltbot config check FILE`.
    #[arg(long, env = "MOLTBOT_GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// How often the configuration file is checked for changes, in
    /// milliseconds.
    #[arg(long, env = "MOLTBOT_CONFIG_POLL_MS", default_value_t = 2_000)]
    pub config_poll_ms: u64,
    /// Redis holding the API keys' rate-limit buckets, shared by every
    /// gateway replica (`redis://…`, `rediss://…` for TLS). Unset: each
    /// gateway keeps its own buckets (one gateway only).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// This gateway runs as one of several replicas (the chart sets it):
    /// start-up is refused without REDIS_URL, since per-process buckets
    /// would give each key its limit once per replica.
    #[arg(
        long,
        env = "MOLTBOT_REPLICATED",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub replicated: bool,
    /// Bound of the response cache's in-process tier, in bytes of entries
    /// (least recently used evicted first). Redis (`REDIS_URL`), when set,
    /// is the shared tier behind it.
    #[arg(long, env = "MOLTBOT_CACHE_MEMORY_BYTES", default_value_t = 64 << 20)]
    pub cache_memory_bytes: u64,
    /// Most time one response-cache Redis command may take before the
    /// memory tier answers alone, in milliseconds.
    #[arg(long, env = "MOLTBOT_CACHE_REDIS_TIMEOUT_MS", default_value_t = 100)]
    pub cache_redis_timeout_ms: u64,
    /// How often each gateway judges the active rollouts and reads their
    /// state, in milliseconds (rollouts live in Redis with `REDIS_URL`,
    /// else in this process).
    #[arg(long, env = "MOLTBOT_ROLLOUT_TICK_MS", default_value_t = 1_000)]
    pub rollout_tick_ms: u64,
    /// Where the spend ledger is written (`gateway/src/spend/ledger.rs`):
    /// `postgres` (DATABASE_URL), `sqlite` (a file in MOLTBOT_DATA_DIR) or
    /// `off` [default: postgres when DATABASE_URL is set, else sqlite].
    /// Budgets are enforced either way (in Redis, or this process).
    #[arg(long, env = "MOLTBOT_SPEND_LEDGER", value_enum)]
    pub spend_ledger: Option<LedgerBackend>,
    /// PostgreSQL URL of the spend ledger.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// PostgreSQL schema of the spend ledger.
    #[arg(long, env = "MOLTBOT_SPEND_PG_SCHEMA", default_value = crate::spend::ledger::PG_SCHEMA)]
    pub spend_pg_schema: String,
    /// Directory of the SQLite spend ledger (`spend.db`).
    #[arg(long, env = "MOLTBOT_DATA_DIR", default_value = "var/data")]
    pub data_dir: PathBuf,
    /// Ledger rows kept in memory while the database is unreachable; past
    /// it the oldest are dropped and counted.
    #[arg(long, env = "MOLTBOT_SPEND_BUFFER_ROWS", default_value_t = 100_000)]
    pub spend_buffer_rows: usize,
    /// Operator token of the gateway's admin endpoints (`POST
    /// /admin/cache/purge`), sent as `Authorization: Bearer`. Unset: the
    /// admin endpoints answer 403.
    #[arg(long, env = "MOLTBOT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Deadline of a whole chat turn when the client gives none
    /// (`x-request-timeout-ms` header), in milliseconds.
    #[arg(long, env = "MOLTBOT_REQUEST_TIMEOUT_MS", default_value_t = 120_000)]
    pub request_timeout_ms: u64,
    /// Deadline of each enrichment (understanding, retrieval) and of the
    /// context load, in milliseconds; bounded by the turn's deadline.
    #[arg(long, env = "MOLTBOT_ENRICHMENT_TIMEOUT_MS", default_value_t = 2_000)]
    pub enrichment_timeout_ms: u64,
    /// Largest accepted request body, in bytes (413 above it).
    #[arg(long, env = "MOLTBOT_MAX_BODY_BYTES", default_value_t = 1_048_576)]
    pub max_body_bytes: usize,
    /// Tenant of anonymous callers (loopback only); every API key has its
    /// own tenant (`api_keys[].tenant`, default the key's name).
    #[arg(long, env = "MOLTBOT_TENANT", default_value = "local")]
    pub tenant: String,
    /// Deadline of each upstream health check behind `/readyz`, in milliseconds.
    #[arg(long, env = "MOLTBOT_READINESS_TIMEOUT_MS", default_value_t = 1_000)]
    pub readiness_timeout_ms: u64,
    /// Grace period for in-flight requests after SIGTERM, in milliseconds.
    #[arg(long, env = "MOLTBOT_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// After SIGTERM: milliseconds to keep serving with health NOT_SERVING
    /// (the gateway: `/readyz` 503) before the listener closes, so load
    /// balancers and Kubernetes endpoints stop sending new requests first.
    /// 0 (the local default) closes at once; the chart sets it.
    #[arg(long, env = "MOLTBOT_DRAIN_DELAY_MS", default_value_t = 0)]
    pub drain_delay_ms: u64,
    /// Time for a client to send a request's headers, in milliseconds; also
    /// how long an idle HTTP/1.1 keep-alive connection is kept.
    #[arg(long, env = "MOLTBOT_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// Time for a client to send the whole request body, in milliseconds
    /// (408 after it).
    #[arg(long, env = "MOLTBOT_HTTP_BODY_TIMEOUT_MS", default_value_t = 30_000)]
    pub body_timeout_ms: u64,
    /// A streamed answer whose client reads nothing for this long, in
    /// milliseconds, is dropped and its generation cancelled.
    #[arg(long, env = "MOLTBOT_SSE_WRITE_IDLE_MS", default_value_t = 30_000)]
    pub sse_write_idle_ms: u64,
    /// Requests in flight at most (streams count until they end); more are
    /// shed at once with 503 and `Retry-After: 1`.
    #[arg(long, env = "MOLTBOT_MAX_IN_FLIGHT", default_value_t = 512)]
    pub max_in_flight: usize,
    /// Open client connections at most; more are closed on accept.
    #[arg(long, env = "MOLTBOT_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Logging and tracing.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Where the spend ledger is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LedgerBackend {
    /// PostgreSQL at `DATABASE_URL`.
    Postgres,
    /// `spend.db` in the data directory.
    Sqlite,
    /// No ledger (budgets are still enforced).
    Off,
}

impl Args {
    /// The readiness deadline as a [`Duration`].
    pub fn readiness_timeout(&self) -> Duration {
        Duration::from_millis(self.readiness_timeout_ms)
    }

    /// The shutdown grace period as a [`Duration`].
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}
