//! The gateway's HTTP server: hyper-util's HTTP/1.1 + HTTP/2 connection
//! builder over the axum router, with the connection-level bounds that
//! `axum::serve` does not expose (OWASP API4):
//!
//! - HTTP/1.1: a request's headers must arrive within the header-read
//!   timeout; the same timer runs while a keep-alive connection waits for
//!   its next request, so it is also the idle timeout (hyper starts it
//!   whenever it begins reading a request head: `proto/h1/conn.rs`).
//! - HTTP/2: at most [`MAX_H2_STREAMS`] concurrent streams per connection,
//!   and a keep-alive PING that closes connections whose peer is gone.
//! - At most `max_connections` open connections; beyond that new ones are
//!   closed at once.
//!
//! Body-read deadlines and request admission are per request
//! ([`crate::edge::admission`]).

use std::{future::Future, sync::Arc, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto::Builder, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};

/// Concurrent HTTP/2 streams per connection.
pub const MAX_H2_STREAMS: u32 = 128;

/// Connection-level bounds.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Time to receive a request's headers, and the keep-alive idle time.
    pub header_read_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `stop` resolves, then stops accepting
/// and waits for open connections to finish their requests (the caller
/// bounds that wait). Errors only when accepting fails for good.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = limits.max_connections, "connection limit reached; closing a new connection");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection closed with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
