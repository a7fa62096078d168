//! Shared by the context service's integration tests: the service served
//! in-process over a real socket on an ephemeral port, as production serves it
//! (`moltbot-runtime`'s server, health gated on the store).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // test code

use std::{sync::Arc, time::Duration};

use moltbot_context::{service::RequestLimits, store::SessionStore};
use moltbot_proto::context::v1::context_service_client::ContextServiceClient;
use moltbot_runtime::grpc::LocalServer;
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
    server: LocalServer,
}

impl Harness {
    /// Serves `store` on `127.0.0.1:0` and connects a client.
    pub async fn start(store: Arc<dyn SessionStore>) -> Self {
        let server = LocalServer::start(
            moltbot_context::grpc_service(store.clone(), REQUEST_LIMITS),
            moltbot_context::store_ready(store),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        Self {
            client: ContextServiceClient::new(server.channel().await.unwrap()),
            server,
        }
    }

    /// Stops the server and surfaces its error or panic.
    pub async fn shutdown(self) {
        self.server
            .shutdown()
            .await
            .expect("server failed or panicked");
    }
}

/// The PostgreSQL of the archive tests (`DATABASE_URL`, default the
/// machine's `test` database).
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}
