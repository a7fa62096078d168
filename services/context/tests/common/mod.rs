//! Shared by the context service's integration tests: the service served
//! in-process over a real socket on an ephemeral port, as production serves it
//! (`moltbot-runtime`'s server, health gated on the store).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // test code

use std::{sync::Arc, time::Duration};

use moltbot_context::{service::RequestLimits, store::SessionStore};
use moltbot_proto::context::v1::context_service_client::ContextServiceClient;
use tonic::transport::Channel;

/// Request limits of the tests: the service defaults, with a 1-day TTL cap.
pub const REQUEST_LIMITS: RequestLimits = RequestLimits {
    max_turn_bytes: 64 * 1024,
    max_turns_per_append: 64,
    max_ttl: Duration::from_secs(86_400),
};

/// A running in-process context service and a client connected to it.
pub struct Harness {
    pub client: ContextServiceClient<Channel>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), moltbot_runtime::RuntimeError>>,
}

impl Harness {
    /// Serves `store` on `127.0.0.1:0` and connects a client.
    pub async fn start(store: Arc<dyn SessionStore>) -> Self {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(moltbot_runtime::grpc::serve_with_listener(
            grpc,
            metrics,
            moltbot_context::grpc_service(store.clone(), REQUEST_LIMITS),
            moltbot_context::store_ready(store),
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(5),
        ));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            client: ContextServiceClient::new(channel),
            stop,
            server,
        }
    }

    /// Stops the server and surfaces its error or panic.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        self.server
            .await
            .expect("server task panicked")
            .expect("server failed");
    }
}

/// The PostgreSQL of the archive tests (`DATABASE_URL`, default the
/// machine's `test` database).
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}
