//! `moltbot-test-slow`: a server built on `moltbot-runtime` exactly like the
//! real services, serving the test-only `SlowService` whose one RPC sleeps.
//! The graceful-shutdown test sends it SIGTERM while a call is in flight.

use std::time::Duration;

use clap::Parser;
use moltbot_e2e::slow::slow_service_server::{SlowService, SlowServiceServer};
use moltbot_runtime::{
    config::{ServerArgs, TelemetryArgs},
    grpc::{self, GrpcService, ServiceSpec},
};

#[derive(Debug, Clone, Parser)]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

struct Slow;

#[tonic::async_trait]
impl SlowService for Slow {
    async fn sleep(
        &self,
        request: tonic::Request<prost_types::Duration>,
    ) -> Result<tonic::Response<prost_types::Duration>, tonic::Status> {
        let d = request.into_inner();
        let millis = u64::try_from(d.seconds).unwrap_or(0) * 1000
            + u64::try_from(d.nanos).unwrap_or(0) / 1_000_000;
        tokio::time::sleep(Duration::from_millis(millis)).await;
        Ok(tonic::Response::new(d))
    }
}

const SPEC: ServiceSpec = ServiceSpec {
    binary: "moltbot-test-slow",
    grpc_addr: moltbot_runtime::ports::CONTEXT.grpc_addr,
    metrics_addr: moltbot_runtime::ports::CONTEXT.metrics_addr,
};

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let telemetry = args.telemetry.clone();
    moltbot_runtime::run_main(SPEC.binary, &telemetry, async move {
        grpc::serve(
            &SPEC,
            &args.server,
            GrpcService::new(SlowServiceServer::new(Slow)),
            async { Ok(()) },
        )
        .await
    })
}
