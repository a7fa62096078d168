//! `moltbot-understanding`: intent classification (domain, intent,
//! confidence, out-of-scope) and sentence embeddings on the shared MiniLM
//! encoder (`moltbot-encoder`).
//!
//! - [`service`]: the gRPC layer — Embed and Classify go through the
//!   encoder's dynamic batcher; ReloadModel swaps the intent head without
//!   dropping traffic;
//! - [`head`]: the trained intent/domain head and its out-of-scope rule.
//!
//! Until a head is trained, health is NOT_SERVING and Classify answers
//! FAILED_PRECONDITION naming the train command; Embed works from the start.
//! A head that appears in the head directory later (`moltbot up` trains it
//! in the background) is loaded without a restart.

pub mod dataset;
mod error;
pub mod eval;
pub mod head;
pub mod service;
pub mod train;

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use moltbot_encoder::{BatchConfig, Batcher, Encoder, Precision};
use moltbot_proto::understanding::v1::understanding_service_server::UnderstandingServiceServer;
use moltbot_runtime::{
    RuntimeError,
    config::{ServerArgs, TelemetryArgs},
    grpc::{self, GrpcService},
    ports,
};

pub use error::UnderstandingError;
use service::{Classifier, Limits, UnderstandingApi};

/// Command-line flags and environment of `moltbot-understanding`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "moltbot-understanding",
    version,
    about = "Intent classification (domain, intent, confidence, out-of-scope) and sentence embeddings on a MiniLM encoder."
)]
pub struct Args {
    /// Listen addresses and shutdown.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Logging and tracing.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Directory holding the prepared models (`make models`).
    #[arg(long, env = "MOLTBOT_MODELS_DIR", default_value = "var/models")]
    pub models_dir: PathBuf,
    /// The sentence encoder; default `<models-dir>/all-minilm-l6-v2`.
    #[arg(long, env = "MOLTBOT_ENCODER_DIR")]
    pub encoder_dir: Option<PathBuf>,
    /// The trained intent head; default `<models-dir>/intent-head`.
    #[arg(long, env = "MOLTBOT_INTENT_HEAD_DIR")]
    pub head_dir: Option<PathBuf>,
    /// Most texts in one encoder forward pass.
    #[arg(long, env = "MOLTBOT_MAX_BATCH", default_value_t = 32)]
    pub max_batch: usize,
    /// Longest a text waits for others to share its forward pass, in ms,
    /// when the previous pass served several requests (a lone caller never
    /// waits). 0 (default) batches greedily: whatever queued while the
    /// previous pass ran goes together.
    #[arg(long, env = "MOLTBOT_MAX_WAIT_MS", default_value_t = 0)]
    pub max_wait_ms: u64,
    /// Most texts in one ClassifyBatch or Embed call.
    #[arg(long, env = "MOLTBOT_MAX_TEXTS", default_value_t = 256)]
    pub max_texts: usize,
    /// Token required (`authorization: Bearer …`) on ReloadModel; unset:
    /// ReloadModel is served to loopback callers only.
    #[arg(long, env = "MOLTBOT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Arithmetic of the encoders: `auto` (bf16 mixed precision where the
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
        encoder_dir(&self.models_dir, self.encoder_dir.as_deref())
    }

    /// The head directory.
    pub fn head_dir(&self) -> PathBuf {
        self.head_dir
            .clone()
            .unwrap_or_else(|| self.models_dir.join("intent-head"))
    }
}

/// The base sentence encoder's directory: `explicit` when given (a
/// `--encoder-dir` flag), else `<models_dir>/all-minilm-l6-v2`, where
/// `make models` puts it. The service, `train` and `eval` all resolve it
/// here.
pub fn encoder_dir(models_dir: &std::path::Path, explicit: Option<&std::path::Path>) -> PathBuf {
    explicit.map_or_else(|| models_dir.join("all-minilm-l6-v2"), PathBuf::from)
}

/// Serves until SIGTERM/SIGINT: loads the encoder (and the head, when one is
/// trained), then serves. Errors with [`RuntimeError`] for bad flags, a
/// missing encoder, an address in use, or a server failure.
pub async fn serve(args: Args) -> Result<(), RuntimeError> {
    if args.max_batch == 0 || args.max_texts == 0 {
        return Err(RuntimeError::Config(
            "MOLTBOT_MAX_BATCH and MOLTBOT_MAX_TEXTS must be at least 1".into(),
        ));
    }
    tch::set_num_threads(moltbot_encoder::serving_threads(args.threads) as i32);
    let precision = args.precision;
    let encoder = Encoder::load_with(&args.encoder_dir(), tch::Device::Cpu, precision)
        .map_err(|e| RuntimeError::NotReady(e.to_string()))?;
    tracing::info!(%precision, "encoder loaded");
    let batch = BatchConfig {
        max_batch: args.max_batch,
        max_wait: Duration::from_millis(args.max_wait_ms),
        queue_capacity: 1024,
    };
    let batcher =
        Batcher::start(encoder, batch).map_err(|e| RuntimeError::NotReady(e.to_string()))?;
    let classifier = match Classifier::load(&args.head_dir(), &batcher, batch) {
        Ok(c) => Some(c),
        Err(UnderstandingError::NoHead(dir)) => {
            tracing::warn!(%dir, "no trained intent head: Classify answers FAILED_PRECONDITION until one is trained");
            None
        }
        Err(e) => return Err(RuntimeError::NotReady(e.to_string())),
    };
    let api = UnderstandingApi::new(
        batcher,
        classifier,
        args.head_dir(),
        Limits {
            max_texts: args.max_texts,
            max_text_bytes: 16 * 1024,
        },
        batch,
    )
    .with_admin_token(args.admin_token.clone());
    // Health turns SERVING once a head is served: at once when one was
    // loaded above, else when one appears in the head directory (trained in
    // the background by `moltbot up`) or arrives through ReloadModel.
    let waiting = api.clone();
    let ready = async move {
        waiting.wait_for_head(Duration::from_secs(2)).await;
        Ok(())
    };
    let service = GrpcService::new(UnderstandingServiceServer::new(api))
        .with_admin_token(args.admin_token.clone());
    grpc::serve(&ports::UNDERSTANDING, &args.server, service, ready).await
}
