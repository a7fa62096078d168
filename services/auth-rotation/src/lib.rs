//! `moltbot-auth-rotation`: remote-provider credentials with rotation, health checks and circuit breakers.
//!
//! The service serves `moltbot.auth.v1.AuthRotationService` with gRPC health and
//! reflection through `moltbot-runtime`. RPCs not implemented yet answer
//! `UNIMPLEMENTED` (the generated default stubs), never a made-up result.

use clap::Parser;
use moltbot_proto::auth::v1::auth_rotation_service_server::{
    AuthRotationService, AuthRotationServiceServer,
};
use moltbot_runtime::{
    RuntimeError,
    config::{ServerArgs, TelemetryArgs},
    grpc::{self, GrpcService},
    ports,
};

/// Command-line flags and environment of `moltbot-auth-rotation`.
#[derive(Debug, Clone, Parser)]
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
}

/// The `AuthRotationService` implementation.
#[derive(Debug, Clone, Default)]
pub struct Service;

#[tonic::async_trait]
impl AuthRotationService for Service {}

/// Serves until SIGTERM/SIGINT. Errors with [`RuntimeError`] when an address
/// cannot be bound or the server fails.
pub async fn serve(args: Args) -> Result<(), RuntimeError> {
    let service = GrpcService::new(AuthRotationServiceServer::new(Service));
    grpc::serve(&ports::AUTH_ROTATION, &args.server, service, async {
        Ok(())
    })
    .await
}
