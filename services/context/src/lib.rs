//! `moltbot-context`: conversation memory: ordered turns per session with a sliding TTL, namespaced by tenant.
//!
//! The service serves `moltbot.context.v1.ContextService` with gRPC health and
//! reflection through `moltbot-runtime`. RPCs not implemented yet answer
//! `UNIMPLEMENTED` (the generated default stubs), never a made-up result.

use clap::Parser;
use moltbot_proto::context::v1::context_service_server::{ContextService, ContextServiceServer};
use moltbot_runtime::{
    RuntimeError,
    config::{ServerArgs, TelemetryArgs},
    grpc::{self, GrpcService},
    ports,
};

/// Command-line flags and environment of `moltbot-context`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "moltbot-context",
    version,
    about = "Conversation memory: ordered turns per session with a sliding TTL, namespaced by tenant."
)]
pub struct Args {
    /// Listen addresses and shutdown.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Logging and tracing.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// The `ContextService` implementation.
#[derive(Debug, Clone, Default)]
pub struct Service;

#[tonic::async_trait]
impl ContextService for Service {}

/// Serves until SIGTERM/SIGINT. Errors with [`RuntimeError`] when an address
/// cannot be bound or the server fails.
pub async fn serve(args: Args) -> Result<(), RuntimeError> {
    let service = GrpcService::new(ContextServiceServer::new(Service));
    grpc::serve(&ports::CONTEXT, &args.server, service, async { Ok(()) }).await
}
