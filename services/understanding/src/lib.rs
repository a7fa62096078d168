//! `moltbot-understanding`: intent classification (domain, intent, confidence, out-of-scope) and sentence embeddings on a MiniLM encoder.
//!
//! The service serves `moltbot.understanding.v1.UnderstandingService` with gRPC health and
//! reflection through `moltbot-runtime`. RPCs not implemented yet answer
//! `UNIMPLEMENTED` (the generated default stubs), never a made-up result.

use clap::Parser;
use moltbot_proto::understanding::v1::understanding_service_server::{
    UnderstandingService, UnderstandingServiceServer,
};
use moltbot_runtime::{
    RuntimeError,
    config::{ServerArgs, TelemetryArgs},
    grpc::{self, GrpcService},
    ports,
};

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
}

/// The `UnderstandingService` implementation.
#[derive(Debug, Clone, Default)]
pub struct Service;

#[tonic::async_trait]
impl UnderstandingService for Service {}

/// Serves until SIGTERM/SIGINT. Errors with [`RuntimeError`] when an address
/// cannot be bound or the server fails.
pub async fn serve(args: Args) -> Result<(), RuntimeError> {
    let service = GrpcService::new(UnderstandingServiceServer::new(Service));
    grpc::serve(&ports::UNDERSTANDING, &args.server, service, async {
        Ok(())
    })
    .await
}
