//! The gateway's HTTP surface: routes, shared state and middleware.

mod health;
mod observe;

use std::{sync::Arc, time::Duration};

use axum::{Router, routing::get};
use tower::ServiceBuilder;

use crate::Upstreams;

/// State shared by every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The gRPC upstreams.
    pub upstreams: Arc<Upstreams>,
    /// Deadline of each upstream health check behind `/readyz`.
    pub readiness_timeout: Duration,
}

/// The gateway's router with its middleware.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(moltbot_runtime::metrics::handler))
        .layer(
            ServiceBuilder::new()
                // Outermost: the span must exist before anything else runs so
                // upstream calls and logs join the request's trace.
                .layer(axum::middleware::from_fn(observe::trace))
                // Inside the span: duration is measured per matched route.
                .layer(axum::middleware::from_fn(observe::metrics)),
        )
        .with_state(state)
}
