//! The gateway's HTTP surface: routes, shared state and middleware.

mod admin;
mod chat;
mod embeddings;
mod health;
mod models;
mod observe;
mod responses;
mod rollouts;
pub mod serve;
mod spend;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, rejection::BytesRejection},
    http::StatusCode,
    response::{
        IntoResponse,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use tower::ServiceBuilder;

use crate::{
    ApiError, Upstreams, edge,
    turn::{self, Engine},
};

/// State shared by every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The gRPC upstreams.
    pub upstreams: Arc<Upstreams>,
    /// The turn engine.
    pub engine: Arc<Engine>,
    /// Client keys and their limits.
    /// The API keys in force (swapped by a configuration reload).
    pub keys: Arc<crate::reload::Live<edge::KeyRing>>,
    /// Deadline of each upstream health check behind `/readyz`.
    pub readiness_timeout: Duration,
    /// Global in-flight limit and body-read deadline.
    pub admission: Arc<edge::admission::Admission>,
    /// A stream whose client reads nothing for this long is dropped.
    pub sse_write_idle: Duration,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Set on SIGTERM: `/readyz` answers 503 `draining` from then on.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// The required upstreams `/readyz` last found missing (comma-joined;
    /// empty when ready), so each change is logged once.
    pub last_readiness: Arc<std::sync::Mutex<Option<String>>>,
    /// Prices, budgets and the spend ledger.
    pub spend: Arc<crate::spend::Spend>,
    /// The operator token of `/admin/…` (`MOLTBOT_ADMIN_TOKEN`); `None`:
    /// admin endpoints answer 403.
    pub admin_token: Option<Arc<str>>,
}

pub use embeddings::EMBEDDING_MODEL;

/// A header's value as text, when it is present and text.
fn header_str(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The client's deadline for the whole request (`x-request-timeout-ms`);
/// the turn engine bounds it by the configured request timeout.
fn request_timeout(headers: &axum::http::HeaderMap) -> Option<Duration> {
    header_str(headers, "x-request-timeout-ms")
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
}

/// The request's `Cache-Control` for the response cache. Errors with 400
/// for a malformed `max-age`.
fn cache_control(headers: &axum::http::HeaderMap) -> Result<crate::cache::CacheControl, ApiError> {
    match header_str(headers, "cache-control") {
        Some(v) => crate::cache::CacheControl::parse(&v),
        None => Ok(Default::default()),
    }
}

/// How the response cache took part in a started turn.
fn cache_status(turn: &turn::Turn) -> crate::cache::Status {
    turn.prepared()
        .ext
        .cache
        .map_or(crate::cache::Status::Bypass, |c| c.status)
}

/// `response` with `x-moltbot-cache: hit | semantic-hit | miss | bypass`.
fn with_cache_header(
    mut response: axum::response::Response,
    status: crate::cache::Status,
) -> axum::response::Response {
    response.headers_mut().insert(
        "x-moltbot-cache",
        axum::http::HeaderValue::from_static(status.as_str()),
    );
    response
}

/// Parses a JSON body. Errors: 413 over the limit, 400 for bad JSON or a
/// body that does not fit the endpoint (the message names the field).
fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::InvalidJson(rejection.body_text())
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(e.to_string()))
}

/// Sends one SSE event into a stream's bounded channel, waiting at most
/// `write_idle` for room. Errors with [`turn::Gone`] when the client went
/// away (the channel closed) or stopped reading (still full after
/// `write_idle`).
async fn send_event(
    tx: &tokio::sync::mpsc::Sender<Result<Event, std::convert::Infallible>>,
    event: Event,
    write_idle: Duration,
) -> Result<(), turn::Gone> {
    use tokio::sync::mpsc::error::SendTimeoutError;
    match tx.send_timeout(Ok(event), write_idle).await {
        Ok(()) => Ok(()),
        Err(SendTimeoutError::Timeout(_)) => Err(turn::Gone("client stopped reading")),
        Err(SendTimeoutError::Closed(_)) => Err(turn::Gone("client went away")),
    }
}

/// The SSE response reading `rx`, with a keep-alive comment every 15 s so
/// proxies do not cut a stream that waits on a long first token.
fn sse_response(
    rx: tokio::sync::mpsc::Receiver<Result<Event, std::convert::Infallible>>,
) -> axum::response::Response {
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

async fn not_found() -> axum::response::Response {
    let err = ApiError::InvalidRequest(
        "no such endpoint; the API is POST /v1/chat/completions, POST /v1/responses, POST /v1/embeddings and GET /v1/models".to_owned(),
    );
    (
        axum::http::StatusCode::NOT_FOUND,
        axum::Json(err.envelope()),
    )
        .into_response()
}

/// The gateway's router with its middleware.
pub fn router(state: AppState) -> Router {
    // The API needs a caller: authentication and the request rate limit run
    // before the handler (and after the span and metrics layers below, so a
    // 401/429 is traced and counted like any answer).
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/models", get(models::list_models))
        .route_layer(axum::middleware::from_fn_with_state(
            state.keys.clone(),
            edge::authenticate,
        ))
        // Before authentication: shedding must be the cheapest answer, and
        // the body is read (within its deadline) once, here.
        .route_layer(axum::middleware::from_fn_with_state(
            state.admission.clone(),
            edge::admission::admit,
        ))
        // Bodies over the limit are refused while being read (413), before
        // any JSON parsing.
        .layer(DefaultBodyLimit::max(state.max_body_bytes));
    // The operator's endpoints: their own credential (the admin token), no
    // API key and no per-key limits.
    let admin = Router::new()
        .route("/admin/cache/purge", post(admin::purge_cache))
        .route("/admin/rollouts", get(rollouts::list).post(rollouts::start))
        .route("/admin/rollouts/{route}", get(rollouts::show))
        .route("/admin/rollouts/{route}/{action}", post(rollouts::act))
        .route("/admin/spend", get(spend::report))
        .route("/admin/budgets", get(spend::budgets))
        .route_layer(axum::middleware::from_fn_with_state(
            state.admin_token.clone(),
            edge::operator::require_operator,
        ));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(moltbot_runtime::metrics::handler))
        .merge(api)
        .merge(admin)
        .fallback(not_found)
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
