//! `moltbot-retrieval`: knowledge-base ingestion and approximate nearest-neighbour search.
//!
//! The service serves `moltbot.retrieval.v1.RetrievalService` with gRPC health and
//! reflection through `moltbot-runtime`. RPCs not implemented yet answer
//! `UNIMPLEMENTED` (the generated default stubs), never a made-up result.

use clap::Parser;
use moltbot_proto::retrieval::v1::retrieval_service_server::{
    RetrievalService, RetrievalServiceServer,
};
use moltbot_runtime::{
    RuntimeError,
    config::{ServerArgs, TelemetryArgs},
    grpc::{self, GrpcService},
    ports,
};

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
}

/// The `RetrievalService` implementation.
#[derive(Debug, Clone, Default)]
pub struct Service;

#[tonic::async_trait]
impl RetrievalService for Service {}

/// Serves until SIGTERM/SIGINT. Errors with [`RuntimeError`] when an address
/// cannot be bound or the server fails.
pub async fn serve(args: Args) -> Result<(), RuntimeError> {
    let service = GrpcService::new(RetrievalServiceServer::new(Service));
    grpc::serve(&ports::RETRIEVAL, &args.server, service, async { Ok(()) }).await
}
