//! `moltbot-generation`: token generation from a local Llama/Qwen2-family model on libtorch, or a remote provider.
//!
//! The service serves `moltbot.generation.v1.GenerationService` with gRPC health and
//! reflection through `moltbot-runtime`. RPCs not implemented yet answer
//! `UNIMPLEMENTED` (the generated default stubs), never a made-up result.

use clap::Parser;
use moltbot_proto::generation::v1::generation_service_server::{
    GenerationService, GenerationServiceServer,
};
use moltbot_runtime::{
    RuntimeError,
    config::{ServerArgs, TelemetryArgs},
    grpc::{self, GrpcService},
    ports,
};

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
}

/// The `GenerationService` implementation.
#[derive(Debug, Clone, Default)]
pub struct Service;

#[tonic::async_trait]
impl GenerationService for Service {}

/// Serves until SIGTERM/SIGINT. Errors with [`RuntimeError`] when an address
/// cannot be bound or the server fails.
pub async fn serve(args: Args) -> Result<(), RuntimeError> {
    let service = GrpcService::new(GenerationServiceServer::new(Service));
    grpc::serve(&ports::GENERATION, &args.server, service, async { Ok(()) }).await
}
