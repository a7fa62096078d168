//! `moltbot-generation`: token generation from a local Llama/Qwen2-family
//! model on libtorch (CPU or CUDA), with a paged KV cache, prefix caching,
//! chunked prefill and continuous batching,
//! behind `moltbot.generation.v1.GenerationService`.
//!
//! - [`model`]: the decoder forward pass in tch;
//! - [`text`]: tokenizer, chat template, incremental detokenization, stops;
//! - [`sampling`]: greedy, temperature, top-k, top-p, repetition penalty;
//! - [`kv`]: the paged KV cache: block pool, block manager, prefix cache;
//! - [`engine`]: the continuous-batching scheduler, one per model;
//! - [`backend`]: the [`backend::Backend`] trait the service serves;
//! - [`hotload`]: models loaded and unloaded while serving;
//! - [`service`]: the gRPC layer.

pub mod backend;
pub mod device;
pub mod engine;
mod error;
pub mod hotload;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod remote;
pub mod sampling;
pub mod service;
pub mod text;

use std::{path::PathBuf, sync::Arc};

use clap::Parser;
use moltbot_proto::generation::v1::generation_service_server::GenerationServiceServer;
use moltbot_runtime::{
    RuntimeError,
    config::{ServerArgs, TelemetryArgs},
    grpc::{self, GrpcService},
    ports,
};

pub use error::GenerationError;

use backend::Backend;
use device::{DeviceSpec, DtypeSpec};
use engine::EngineConfig;
use service::{GenerationApi, Models};

/// Name of the default model directory under `MOLTBOT_MODELS_DIR`.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

/// Command-line flags and environment of `moltbot-generation`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "moltbot-generation",
    version,
    about = "Token generation from a local Llama/Qwen2-family model on libtorch, or a remote provider."
)]
pub struct Args {
    /// Listen addresses and shutdown.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Logging and tracing.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Directory holding the prepared models (`moltbot models prepare`).
    #[arg(long, env = "MOLTBOT_MODELS_DIR", default_value = "var/models")]
    pub models_dir: PathBuf,
    /// Hugging Face model directories to serve, comma-separated; each is
    /// served under its directory name. Default: `<models-dir>/qwen2.5-coder-0.5b-instruct`.
    #[arg(long, env = "MOLTBOT_MODEL_DIRS", value_delimiter = ',')]
    pub model_dirs: Vec<PathBuf>,
    /// `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "MOLTBOT_DEVICE", default_value = "auto")]
    pub device: DeviceSpec,
    /// `auto` (bf16 on CUDA, int4 on CPU: the fastest of each), `f32`,
    /// `bf16`, `f16` (CUDA), `int8` or `int4` (weight-only, CPU).
    #[arg(long, env = "MOLTBOT_DTYPE", default_value = "auto")]
    pub dtype: DtypeSpec,
    /// Intra-op CPU threads of libtorch; 0 = every core.
    #[arg(long, env = "MOLTBOT_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Most sequences in one decode step.
    #[arg(long, env = "MOLTBOT_MAX_BATCH_SIZE", default_value_t = 16)]
    pub max_batch_size: usize,
    /// Most KV-cache tokens (prompt + max_tokens of each running sequence).
    #[arg(long, env = "MOLTBOT_MAX_BATCH_TOKENS", default_value_t = 65_536)]
    pub max_batch_tokens: usize,
    /// Memory of each local model's paged KV cache in MiB: the running
    /// sequences' keys and values plus the prefix cache, which evicts least
    /// recently used blocks when it is full. Committed as it fills.
    #[arg(long, env = "MOLTBOT_KV_CACHE_MB", default_value_t = 1024)]
    pub kv_cache_mb: usize,
    /// Tokens per KV-cache block (the unit of allocation and of prefix reuse).
    #[arg(long, env = "MOLTBOT_KV_BLOCK_SIZE", default_value_t = kv::DEFAULT_BLOCK_SIZE)]
    pub kv_block_size: usize,
    /// Most prompt tokens prefilled per scheduler step: a long prompt is
    /// prefilled in chunks between the running streams' decode steps.
    #[arg(long, env = "MOLTBOT_PREFILL_CHUNK", default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Reuse the KV cache of prompt prefixes seen before (previous turns,
    /// shared system prompts); `false` recomputes every prompt.
    #[arg(long, env = "MOLTBOT_PREFIX_CACHING", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_caching: bool,
    /// Most requests waiting per model before RESOURCE_EXHAUSTED.
    #[arg(long, env = "MOLTBOT_QUEUE_CAPACITY", default_value_t = 256)]
    pub queue_capacity: usize,
    /// Completion tokens when a request sets no max_tokens.
    #[arg(long, env = "MOLTBOT_DEFAULT_MAX_TOKENS", default_value_t = 512)]
    pub default_max_tokens: usize,
    /// Auth-rotation service, which leases the credentials of remote models
    /// (`<provider>/<model>`).
    #[arg(
        long,
        env = "MOLTBOT_AUTH_URL",
        default_value = "http://127.0.0.1:50055"
    )]
    pub auth_url: String,
    /// Longest wait for a remote provider's first token, in milliseconds.
    #[arg(long, env = "MOLTBOT_REMOTE_TTFT_TIMEOUT_MS", default_value_t = 30_000)]
    pub remote_ttft_timeout_ms: u64,
    /// Longest gap between a remote stream's events, in milliseconds.
    #[arg(long, env = "MOLTBOT_REMOTE_IDLE_TIMEOUT_MS", default_value_t = 30_000)]
    pub remote_idle_timeout_ms: u64,
    /// Credentials tried per remote request when they answer 401/403/429.
    #[arg(long, env = "MOLTBOT_REMOTE_MAX_CREDENTIALS", default_value_t = 3)]
    pub remote_max_credentials: usize,
    /// Token required (`authorization: Bearer …`) on LoadModel and
    /// UnloadModel; unset: they are served to loopback callers only.
    #[arg(long, env = "MOLTBOT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

impl Args {
    /// The model directories to serve.
    pub fn model_dirs(&self) -> Vec<PathBuf> {
        if self.model_dirs.is_empty() {
            vec![self.models_dir.join(DEFAULT_MODEL)]
        } else {
            self.model_dirs.clone()
        }
    }

    /// The scheduler limits. Errors with [`RuntimeError::Config`] for zeros.
    pub fn engine_config(&self) -> Result<EngineConfig, RuntimeError> {
        if self.max_batch_size == 0
            || self.max_batch_tokens == 0
            || self.queue_capacity == 0
            || self.default_max_tokens == 0
            || self.kv_cache_mb == 0
            || self.kv_block_size == 0
            || self.prefill_chunk == 0
        {
            return Err(RuntimeError::Config(
                "MOLTBOT_MAX_BATCH_SIZE, MOLTBOT_MAX_BATCH_TOKENS, MOLTBOT_QUEUE_CAPACITY, MOLTBOT_DEFAULT_MAX_TOKENS, MOLTBOT_KV_CACHE_MB, MOLTBOT_KV_BLOCK_SIZE and MOLTBOT_PREFILL_CHUNK must be at least 1".into(),
            ));
        }
        Ok(EngineConfig {
            max_batch_size: self.max_batch_size,
            max_batch_tokens: self.max_batch_tokens,
            queue_capacity: self.queue_capacity,
            kv_cache_bytes: self.kv_cache_mb << 20,
            block_size: self.kv_block_size,
            prefill_chunk: self.prefill_chunk,
            prefix_caching: self.prefix_caching,
        })
    }

    /// How this service loads a model: the device, precision and scheduler
    /// limits of its flags. Errors with [`RuntimeError::Config`] for a
    /// device or dtype this machine lacks, or zero limits.
    pub fn loader(&self) -> Result<hotload::Loader, RuntimeError> {
        let device = self.device.resolve().map_err(RuntimeError::Config)?;
        Ok(hotload::Loader {
            models_dir: self.models_dir.clone(),
            device,
            precision: self.dtype.resolve(device).map_err(RuntimeError::Config)?,
            engine: self.engine_config()?,
            default_max_tokens: self.default_max_tokens,
            threads: self.threads,
        })
    }

    /// Loads every model (blocking). Errors as [`Args::loader`], and with
    /// [`RuntimeError::NotReady`] for a model that does not load, saying
    /// how to prepare it.
    pub fn load_models(&self) -> Result<Models, RuntimeError> {
        let loader = self.loader()?;
        let mut models = Models::new();
        for dir in self.model_dirs() {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            let backend = loader
                .load(&dir, &name)
                .map_err(|e| RuntimeError::NotReady(e.to_string()))?;
            let backend: Arc<dyn Backend> = Arc::new(backend);
            models.insert(backend.card().name, backend);
        }
        Ok(models)
    }
}

/// Serves until SIGTERM/SIGINT: binds first (health NOT_SERVING), loads the
/// models, then turns SERVING. Errors with [`RuntimeError`] for bad flags, a
/// model that cannot load, an address in use, or a server failure.
pub async fn serve(args: Args) -> Result<(), RuntimeError> {
    args.engine_config()?;
    let server = args.server.clone();
    moltbot_runtime::grpc::tls::install_client(&args.server.tls)?;
    moltbot_runtime::grpc::balance::install(&args.server.balance)?;
    let auth = moltbot_runtime::config::parse_upstream_url("MOLTBOT_AUTH_URL", &args.auth_url)?;
    let remote = service::RemoteConfig {
        auth: moltbot_runtime::grpc::client::channel(&auth)?,
        // rustls with the platform's roots plus SSL_CERT_FILE/SSL_CERT_DIR;
        // provider names re-checked at every resolution (DNS rebinding).
        http: moltbot_runtime::tls::ProviderClient {
            timeout: None,
            pool_per_host: 32,
        }
        .build()
        .map_err(RuntimeError::Config)?,
        settings: remote::RemoteSettings {
            ttft_timeout: std::time::Duration::from_millis(args.remote_ttft_timeout_ms.max(1)),
            idle_timeout: std::time::Duration::from_millis(args.remote_idle_timeout_ms.max(1)),
            max_credentials: args.remote_max_credentials.max(1),
        },
    };
    let api =
        GenerationApi::with_remote(remote).with_loader(args.loader()?, args.admin_token.clone());
    let service = GrpcService::new(GenerationServiceServer::new(api.clone()))
        .with_admin_token(args.admin_token.clone());
    let ready = async move {
        // A thread of its own that ends with the loading, not a tokio
        // blocking thread (those linger idle for 10 s): its OpenMP pool goes
        // with it, leaving each engine's scheduler the only pool
        // (engine/mod.rs, "One OpenMP pool").
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("load-models".into())
            .spawn(move || {
                let _ = tx.send(args.load_models());
            })
            .map_err(|e| RuntimeError::NotReady(format!("cannot start the loading thread: {e}")))?;
        let models = rx
            .await
            .map_err(|_| RuntimeError::NotReady("model loading panicked".into()))??;
        api.install(models);
        Ok(())
    };
    grpc::serve(&ports::GENERATION, &server, service, ready).await
}
