//! `moltbot-runtime`: what every MoltBot service binary shares.
//!
//! - [`config`]: flags and environment variables pinned in docs/architecture.md, validated
//!   at start-up with messages that say what to fix;
//! - [`telemetry`]: JSON logs (one object a line), OpenTelemetry tracing over
//!   OTLP, and W3C trace-context propagation;
//! - [`grpc`]: the server (health, reflection, per-RPC spans and metrics,
//!   graceful shutdown) and traced client channels;
//! - [`metrics`]: the process's Prometheus registry and `/metrics` endpoint;
//! - [`ports`]: the pinned service names and default addresses;
//! - [`shutdown`]: SIGTERM/SIGINT handling;
//! - [`egress`] and [`tls`]: the provider-facing HTTP client (rustls, extra
//!   CAs, guarded DNS) and the words for a failed handshake.

pub mod config;
pub mod egress;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod ports;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

use std::{future::Future, process::ExitCode};

pub use error::RuntimeError;

/// Runs a service binary's `main`: builds the multi-threaded Tokio runtime,
/// installs telemetry (service name `default_service_name` unless
/// `OTEL_SERVICE_NAME` says otherwise), runs `serve`, flushes spans, and maps
/// the outcome to the exit code (0, or 1 with the error on stderr and in the
/// log).
pub fn run_main<E, F>(
    default_service_name: &str,
    telemetry: &config::TelemetryArgs,
    serve: F,
) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let guard = match telemetry::init(telemetry, default_service_name) {
            Ok(guard) => guard,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let result = serve.await;
        let code = match &result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "exiting");
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
        guard.shutdown().await;
        code
    })
}
