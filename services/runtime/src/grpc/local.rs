//! A service served in-process on ephemeral loopback ports, for integration
//! tests and benchmarks: the production server ([`serve_with_listener`]:
//! health, reflection, per-RPC metrics, graceful drain) on `127.0.0.1:0`,
//! channels to it, and a shutdown that surfaces the server's error or panic
//! (as linkerd2-proxy's test servers do).

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};

use super::{GrpcService, serve_with_listener};
use crate::RuntimeError;

/// A running in-process server. Dropping it stops the server too (its stop
/// signal goes with it), without waiting; [`LocalServer::shutdown`] waits
/// and reports how the server ended.
pub struct LocalServer {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), RuntimeError>>,
}

impl LocalServer {
    /// Serves `service` on `127.0.0.1:0` (metrics on another ephemeral
    /// port); health turns SERVING once `ready` resolves `Ok`. On shutdown
    /// in-flight calls get `grace` to finish. Errors with
    /// [`RuntimeError::Io`] when a port cannot be bound.
    pub async fn start(
        service: GrpcService,
        ready: impl Future<Output = Result<(), RuntimeError>> + Send + 'static,
        grace: Duration,
    ) -> Result<Self, RuntimeError> {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = grpc.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_with_listener(
            grpc,
            metrics,
            service,
            ready,
            async {
                // A send or a drop of the sender: either way, stop.
                let _ = stopped.await;
            },
            grace,
        ));
        Ok(Self { addr, stop, task })
    }

    /// The bound gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A new HTTP/2 connection to the server, with `TCP_NODELAY` as the
    /// gateway's channels have. Errors with [`RuntimeError::Transport`].
    pub async fn channel(&self) -> Result<Channel, RuntimeError> {
        Ok(Endpoint::try_from(format!("http://{}", self.addr))?
            .tcp_nodelay(true)
            .connect()
            .await?)
    }

    /// Stops the server (health NOT_SERVING, `grace` to drain) and returns
    /// how it ended: its own error, or [`RuntimeError::Task`] when it
    /// panicked.
    pub async fn shutdown(self) -> Result<(), RuntimeError> {
        let _ = self.stop.send(());
        self.task.await?
    }
}
