//! `/healthz` (the process is alive) and `/readyz` (every required upstream
//! reports SERVING).

use axum::{Json, extract::State, http::StatusCode, response::IntoResponse};
use serde_json::json;

use super::AppState;

/// `GET /healthz`: 200 while the process serves HTTP.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 when every required upstream (context, generation)
/// answers SERVING to `grpc.health.v1.Health/Check`, else 503. The body lists
/// every upstream's status, optional ones included. After SIGTERM it is 503
/// `draining` while the gateway still serves through its drain delay.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining", "upstreams": []})),
        );
    }
    let upstreams = state.upstreams.health(state.readiness_timeout).await;
    let ready = upstreams.iter().filter(|u| u.required).all(|u| u.serving());
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let missing: Vec<&str> = upstreams
        .iter()
        .filter(|u| u.required && !u.serving())
        .map(|u| u.name)
        .collect();
    // Logged once per change of state, not once per poll: a loader polls
    // every half second while generation loads.
    let state_now = missing.join(",");
    let changed = state
        .last_readiness
        .lock()
        .map(|mut last| last.replace(state_now.clone()).as_deref() != Some(state_now.as_str()))
        .unwrap_or(true);
    if changed {
        if ready {
            tracing::info!("ready");
        } else {
            tracing::warn!(?missing, "not ready");
        }
    }
    let status = if ready { "ready" } else { "not_ready" };
    (
        code,
        Json(json!({"status": status, "upstreams": upstreams})),
    )
}
