//! `moltbot-retrieval`: knowledge-base ingestion and approximate
//! nearest-neighbour search.
//!
//! Documents are cut into token-sized chunks ([`chunk`]), embedded in-process
//! with the shared MiniLM encoder (`moltbot-encoder`, batched), written to the
//! [`store`] (SQLite by default, PostgreSQL with `DATABASE_URL`) and then to
//! the collection's in-process HNSW [`index`], which is snapshotted to disk so
//! a restart neither re-embeds nor rebuilds. Every write is also logged in
//! the store's change log, which each replica's [`follow`]er applies to its
//! own index, so replicas converge. Serves
//! `moltbot.retrieval.v1.RetrievalService` with gRPC health and reflection.

pub mod chunk;
mod error;
pub mod follow;
pub mod index;
mod service;
pub mod state;
pub mod store;

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use clap::Parser;
use moltbot_encoder::{BatchConfig, Batcher, Encoder, Precision};
use moltbot_proto::retrieval::v1::retrieval_service_server::RetrievalServiceServer;
use moltbot_runtime::{
    RuntimeError,
    config::{ServerArgs, TelemetryArgs},
    grpc::{self, GrpcService},
    ports,
};

pub use error::RetrievalError;
pub use service::RetrievalApi;

/// Which store backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// One SQLite file under the data directory.
    Sqlite,
    /// PostgreSQL at `DATABASE_URL`.
    Postgres,
}

/// Command-line flags and environment of `moltbot-retrieval`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "moltbot-retrieval",
    version,
    about = "Knowledge-base ingestion and approximate nearest-neighbour search."
)]
pub struct Args {
    /// Listen addresses and shutdown.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Logging and tracing.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Admin token (`authorization: Bearer <token>`) accepted for the
    /// knowledge writes under mutual TLS, besides the operator certificate
    /// (docs/security.md).
    #[arg(long, env = "MOLTBOT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Directory of prepared models (the encoder is `all-minilm-l6-v2` in it).
    #[arg(long, env = "MOLTBOT_MODELS_DIR", default_value = "var/models")]
    pub models_dir: PathBuf,
    /// The encoder directory [default: <models-dir>/all-minilm-l6-v2].
    #[arg(long, env = "MOLTBOT_ENCODER_DIR")]
    pub encoder_dir: Option<PathBuf>,
    /// Data directory: the SQLite file and the index snapshots.
    #[arg(long, env = "MOLTBOT_DATA_DIR", default_value = "var/data")]
    pub data_dir: PathBuf,
    /// Store [default: postgres when DATABASE_URL is set, else sqlite].
    #[arg(long, env = "MOLTBOT_RETRIEVAL_STORE", value_enum)]
    pub store: Option<Backend>,
    /// PostgreSQL URL, e.g. `postgres://postgres@127.0.0.1:5432/moltbot`.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// PostgreSQL schema of the retrieval tables.
    #[arg(long, env = "MOLTBOT_RETRIEVAL_PG_SCHEMA", default_value = store::PG_SCHEMA)]
    pub pg_schema: String,
    /// HNSW `M` (neighbours per node).
    #[arg(long, env = "MOLTBOT_HNSW_M", default_value_t = 16)]
    pub hnsw_m: usize,
    /// HNSW `efConstruction`.
    #[arg(long, env = "MOLTBOT_HNSW_EF_CONSTRUCTION", default_value_t = 128)]
    pub ef_construction: usize,
    /// HNSW `efSearch` (raised to `top_k` when smaller).
    #[arg(long, env = "MOLTBOT_HNSW_EF_SEARCH", default_value_t = 64)]
    pub ef_search: usize,
    /// How the HNSW graph stores vectors: f32 (exact distances), f16, bf16,
    /// or i8 (a quarter of the memory).
    #[arg(
        long,
        env = "MOLTBOT_HNSW_QUANTIZATION",
        value_enum,
        default_value = "f32"
    )]
    pub hnsw_quantization: index::Quantization,
    /// With a quantized graph: candidates per wanted hit, re-ranked exactly.
    #[arg(long, env = "MOLTBOT_HNSW_RERANK", default_value_t = 4)]
    pub hnsw_rerank: usize,
    /// Collections with at most this many chunks are searched exactly.
    #[arg(long, env = "MOLTBOT_EXACT_BELOW", default_value_t = 256)]
    pub exact_below: usize,
    /// Milliseconds between reads of the change log, by which this
    /// replica's index applies writes made through other replicas
    /// (a document upserted through one replica is found through every
    /// other within about this time).
    #[arg(long, env = "MOLTBOT_FOLLOW_INTERVAL_MS", default_value_t = 500)]
    pub follow_interval_ms: u64,
    /// Seconds between index snapshots of changed collections.
    #[arg(long, env = "MOLTBOT_SNAPSHOT_INTERVAL_S", default_value_t = 30)]
    pub snapshot_interval_s: u64,
    /// Arithmetic of the encoder: `auto` (bf16 mixed precision where the
    /// CPU multiplies bf16 natively, else f32), `f32` or `bf16`.
    #[arg(
        long,
        env = "MOLTBOT_ENCODER_PRECISION",
        default_value = "auto",
        value_parser = Precision::parse_cpu
    )]
    pub precision: Precision,
    /// Intra-op CPU threads of libtorch; 0 = every core but one (left to
    /// the gRPC runtime).
    #[arg(long, env = "MOLTBOT_THREADS", default_value_t = 0)]
    pub threads: usize,
}

impl Args {
    /// The encoder directory.
    pub fn encoder_dir(&self) -> PathBuf {
        self.encoder_dir
            .clone()
            .unwrap_or_else(|| self.models_dir.join("all-minilm-l6-v2"))
    }

    fn backend(&self) -> Backend {
        self.store.unwrap_or(if self.database_url.is_some() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        })
    }
}

/// Opens the store, loads the encoder and every collection's index. Errors
/// with [`RuntimeError::Config`] / [`RuntimeError::NotReady`] saying what to
/// fix.
pub async fn load(args: &Args) -> Result<Arc<state::State>, RuntimeError> {
    if args.hnsw_m < 2 || args.ef_construction == 0 || args.ef_search == 0 {
        return Err(RuntimeError::Config(
            "MOLTBOT_HNSW_M must be ≥ 2 and the ef values ≥ 1".into(),
        ));
    }
    tch::set_num_threads(moltbot_encoder::serving_threads(args.threads) as i32);
    let backend = args.backend();
    args.server.require_shared_store(
        backend == Backend::Sqlite,
        "the SQLite knowledge store",
        "DATABASE_URL",
    )?;
    let store = match backend {
        Backend::Sqlite => store::Store::sqlite(&args.data_dir.join("retrieval.db")).await,
        Backend::Postgres => {
            let url = args.database_url.as_deref().ok_or_else(|| {
                RuntimeError::Config(
                    "MOLTBOT_RETRIEVAL_STORE=postgres needs DATABASE_URL, e.g. postgres://postgres@127.0.0.1:5432/moltbot".into(),
                )
            })?;
            store::Store::postgres(url, &args.pg_schema).await
        }
    }
    .map_err(|e| RuntimeError::NotReady(e.to_string()))?;
    let encoder_dir = args.encoder_dir();
    let encoder = Encoder::load_with(&encoder_dir, tch::Device::Cpu, args.precision)
        .map_err(|e| RuntimeError::NotReady(e.to_string()))?;
    let tokenizer = chunk::load_tokenizer(&encoder_dir.join("tokenizer.json"))
        .map_err(|e| RuntimeError::NotReady(e.to_string()))?;
    let batcher = Batcher::start(
        encoder,
        BatchConfig {
            max_batch: 32,
            max_wait: Duration::ZERO,
            queue_capacity: 1024,
        },
    )
    .map_err(|e| RuntimeError::NotReady(e.to_string()))?;
    let state = Arc::new(state::State {
        store,
        collections: RwLock::new(Default::default()),
        batcher,
        tokenizer,
        params: index::HnswParams {
            m: args.hnsw_m,
            ef_construction: args.ef_construction,
            ef_search: args.ef_search,
            quantization: args.hnsw_quantization,
            rerank: args.hnsw_rerank.max(1),
        },
        snapshot_dir: args
            .data_dir
            .join(format!("retrieval-index-{}", state_backend_name(backend))),
        exact_below: args.exact_below,
    });
    let cursor = state
        .load_collections()
        .await
        .map_err(|e| RuntimeError::NotReady(e.to_string()))?;
    follow::spawn(
        &state,
        cursor,
        Duration::from_millis(args.follow_interval_ms.max(10)),
    );
    Ok(state)
}

fn state_backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    }
}

/// The gRPC service (with its server name for health) over a loaded state.
pub fn grpc_service(state: Arc<state::State>) -> GrpcService {
    GrpcService::new(RetrievalServiceServer::new(RetrievalApi::new(state)))
}

/// Serves until SIGTERM/SIGINT, snapshotting changed indexes every
/// `snapshot_interval_s` and once more after the last request. Errors with
/// [`RuntimeError`] for bad flags, an unreachable store, a missing encoder or
/// an address in use.
pub async fn serve(args: Args) -> Result<(), RuntimeError> {
    let state = load(&args).await?;
    let snapshots = {
        let state = state.clone();
        let every = Duration::from_secs(args.snapshot_interval_s.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let s = state.clone();
                let _ = tokio::task::spawn_blocking(move || s.snapshot_dirty()).await;
            }
        })
    };
    let service = grpc_service(state.clone()).with_admin_token(args.admin_token.clone());
    let result = grpc::serve(&ports::RETRIEVAL, &args.server, service, async { Ok(()) }).await;
    snapshots.abort();
    let s = state.clone();
    let _ = tokio::task::spawn_blocking(move || s.snapshot_dirty()).await;
    result
}
