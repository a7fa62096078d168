//! The process's Prometheus registry, the per-RPC server metrics and the
//! `/metrics` endpoint.
//!
//! RPC metric names follow go-grpc-prometheus, which Grafana dashboards for
//! gRPC expect: `grpc_server_handled_total` and `grpc_server_handling_seconds`,
//! labelled `grpc_service`, `grpc_method`, `grpc_code`.

use std::{
    net::SocketAddr,
    sync::{LazyLock, OnceLock},
};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds, 0.5 ms to 60 s: spans sub-millisecond context
/// calls up to long generations.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

/// The process-wide registry that `/metrics` serves. Services register their
/// own metrics here.
pub fn registry() -> &'static Registry {
    &REGISTRY
}

/// Counters and histograms of the RPCs a server handles.
#[derive(Clone)]
pub struct RpcMetrics {
    /// Completed RPCs by service, method and status code.
    pub handled: IntCounterVec,
    /// RPC duration in seconds (until the last response byte) by service,
    /// method and status code.
    pub handling_seconds: HistogramVec,
}

static SERVER_RPC: OnceLock<RpcMetrics> = OnceLock::new();

/// The server RPC metrics, registered in [`registry`] on first use.
#[allow(clippy::expect_used)] // static, valid names: construction cannot fail (tested below)
pub fn server_rpc() -> &'static RpcMetrics {
    SERVER_RPC.get_or_init(|| {
        let labels = &["grpc_service", "grpc_method", "grpc_code"];
        let handled = IntCounterVec::new(
            Opts::new("grpc_server_handled_total", "RPCs completed on the server"),
            labels,
        )
        .expect("valid metric");
        let handling_seconds = HistogramVec::new(
            HistogramOpts::new(
                "grpc_server_handling_seconds",
                "RPC duration on the server, in seconds",
            )
            .buckets(LATENCY_BUCKETS_SECONDS.to_vec()),
            labels,
        )
        .expect("valid metric");
        // Registration fails only on a duplicate name, which the OnceLock rules out.
        let _ = registry().register(Box::new(handled.clone()));
        let _ = registry().register(Box::new(handling_seconds.clone()));
        RpcMetrics {
            handled,
            handling_seconds,
        }
    })
}

/// Registers `moltbot_build_info{service, version} 1` (the Prometheus
/// build-info convention: join on it to label any series with the
/// version; `moltbot status` reads the version from it) and
/// `moltbot_process_start_time_seconds` (Unix seconds; uptime is `time() -
/// it`). Called once per process by [`crate::telemetry::init`]; a second
/// call is a no-op.
pub fn register_build_info(service: &str) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let info = prometheus::IntGaugeVec::new(
            Opts::new(
                "moltbot_build_info",
                "Always 1; labelled with the component and its version",
            ),
            &["service", "version"],
        );
        let started = prometheus::Gauge::new(
            "moltbot_process_start_time_seconds",
            "When this process started, in Unix seconds",
        );
        if let (Ok(info), Ok(started)) = (info, started) {
            info.with_label_values(&[service, env!("CARGO_PKG_VERSION")])
                .set(1);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            started.set(now);
            let _ = registry().register(Box::new(info));
            let _ = registry().register(Box::new(started));
        }
    });
}

/// Renders [`registry`] in the Prometheus text format: (content type, body).
pub fn render() -> (String, String) {
    let encoder = TextEncoder::new();
    let mut buf = Vec::new();
    if let Err(e) = encoder.encode(&registry().gather(), &mut buf) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    (
        encoder.format_type().to_owned(),
        String::from_utf8_lossy(&buf).into_owned(),
    )
}

/// An axum handler for `GET /metrics`.
pub async fn handler() -> impl axum::response::IntoResponse {
    let (content_type, body) = render();
    ([(http::header::CONTENT_TYPE, content_type)], body)
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route("/metrics", axum::routing::get(handler));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the metrics address, with an error that names the address.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, crate::RuntimeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| crate::RuntimeError::Bind { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_metrics_render() {
        let m = server_rpc();
        m.handled.with_label_values(&["a.v1.S", "M", "OK"]).inc();
        m.handling_seconds
            .with_label_values(&["a.v1.S", "M", "OK"])
            .observe(0.002);
        let (ct, body) = render();
        assert!(ct.starts_with("text/plain"));
        assert!(body.contains(r#"grpc_server_handled_total{grpc_code="OK",grpc_method="M",grpc_service="a.v1.S"} 1"#), "{body}");
        assert!(body.contains("grpc_server_handling_seconds_bucket"));
    }
}
