//! `moltbot-gateway`: the HTTP edge of the mesh.
//!
//! Serves `/healthz` (process alive), `/readyz` (required upstreams SERVING)
//! and `/metrics`; the chat API arrives with its own issue. Every request gets
//! an OpenTelemetry server span (joining the caller's `traceparent` when there
//! is one) that parents the gRPC client spans of its upstream calls.

mod config;
mod error;
pub mod http;
mod upstreams;

use std::sync::Arc;

pub use config::Args;
pub use error::GatewayError;
pub use upstreams::{Upstream, UpstreamHealth, Upstreams};

/// Serves until SIGTERM/SIGINT, then lets in-flight requests finish within the
/// grace period. Logs `listening` with the bound `http_addr`.
///
/// Errors: [`GatewayError::Config`] for invalid flags, [`GatewayError::Bind`]
/// when the address is taken, [`GatewayError::Io`] when serving fails.
pub async fn serve(args: Args) -> Result<(), GatewayError> {
    let upstreams = Arc::new(Upstreams::connect(&args)?);
    let state = http::AppState {
        upstreams,
        readiness_timeout: args.readiness_timeout(),
    };
    let app = http::router(state);
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .map_err(|source| GatewayError::Bind {
            addr: args.http_addr,
            source,
        })?;
    let http_addr = listener.local_addr()?;
    tracing::info!(%http_addr, "listening");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    tokio::select! {
        _ = moltbot_runtime::shutdown::signal() => {}
        r = &mut server => return Ok(r.map_err(|e| GatewayError::Io(std::io::Error::other(e)))??),
    }
    tracing::info!(grace_ms = args.shutdown_grace_ms, "draining");
    let _ = stop_tx.send(());
    match tokio::time::timeout(args.shutdown_grace(), &mut server).await {
        Ok(joined) => joined.map_err(|e| GatewayError::Io(std::io::Error::other(e)))??,
        Err(_) => {
            tracing::warn!("grace period elapsed with requests in flight; dropping them");
            server.abort();
        }
    }
    tracing::info!("stopped");
    Ok(())
}
