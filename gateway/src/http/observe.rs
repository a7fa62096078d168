//! HTTP middleware: one OpenTelemetry server span per request, and request
//! duration metrics per matched route.

use std::{sync::LazyLock, time::Instant};

use axum::{
    extract::{MatchedPath, Request},
    middleware::Next,
    response::Response,
};
use moltbot_runtime::{metrics, telemetry::propagation};
use prometheus::{HistogramOpts, HistogramVec};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

fn route_of(request: &Request) -> String {
    request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned())
}

/// Wraps the request in a server span named `METHOD /route` (OpenTelemetry
/// HTTP semantic conventions), parented on the caller's `traceparent`.
pub async fn trace(request: Request, next: Next) -> Response {
    let route = route_of(&request);
    let method = request.method().as_str().to_owned();
    let span = tracing::info_span!(
        "http.server",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    let _ = span.set_parent(propagation::extract(request.headers()));
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}

#[allow(clippy::expect_used)] // static, valid names: construction cannot fail
static DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    let h = HistogramVec::new(
        HistogramOpts::new(
            "http_server_request_duration_seconds",
            "HTTP request duration at the gateway, in seconds",
        )
        .buckets(metrics::LATENCY_BUCKETS_SECONDS.to_vec()),
        &["method", "route", "status"],
    )
    .expect("valid metric");
    let _ = metrics::registry().register(Box::new(h.clone()));
    h
});

/// Observes the request's duration, labelled by method, matched route and
/// status code.
pub async fn metrics(request: Request, next: Next) -> Response {
    let route = route_of(&request);
    let method = request.method().as_str().to_owned();
    let start = Instant::now();
    let response = next.run(request).await;
    DURATION
        .with_label_values(&[method.as_str(), route.as_str(), response.status().as_str()])
        .observe(start.elapsed().as_secs_f64());
    response
}
