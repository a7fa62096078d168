//! Logging and tracing: one `tracing` subscriber with a JSON (or text) log
//! layer and an OpenTelemetry layer, plus W3C trace-context propagation.

mod json;
mod otel;
pub mod propagation;
pub mod redact;

use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::{
    RuntimeError,
    config::{LogFormat, TelemetryArgs},
};

pub use json::JsonLogLayer;

/// Keeps the tracer provider alive; [`TelemetryGuard::shutdown`] flushes spans
/// still buffered. Dropping it without calling `shutdown` loses them.
#[must_use = "call shutdown() before exit so buffered spans are exported"]
pub struct TelemetryGuard {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl TelemetryGuard {
    /// Flushes and stops the span exporter. Runs the blocking flush on a
    /// blocking thread so the async exporter can make progress.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("telemetry: span exporter shutdown failed: {e}"),
            Err(e) => eprintln!("telemetry: span exporter shutdown task failed: {e}"),
        }
    }
}

/// Installs the global subscriber: env-filtered logs to stdout (JSON by
/// default) and the OpenTelemetry layer (spans exported over OTLP/gRPC when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set). Also installs the W3C trace-context
/// propagator. Must run inside a Tokio runtime.
///
/// `default_service_name` is used when `OTEL_SERVICE_NAME` is unset.
/// Errors with [`RuntimeError::Config`] for a bad filter or endpoint and
/// [`RuntimeError::Telemetry`] when a subscriber is already installed.
pub fn init(
    args: &TelemetryArgs,
    default_service_name: &str,
) -> Result<TelemetryGuard, RuntimeError> {
    args.validate()?;
    let filter = EnvFilter::try_new(&args.log_filter).map_err(|e| {
        RuntimeError::Config(format!(
            "RUST_LOG={:?} is not a valid filter ({e}); use e.g. info or info,moltbot_context=debug",
            args.log_filter
        ))
    })?;
    let service_name = args
        .service_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default_service_name.to_owned());
    let provider = otel::provider(args.otlp_endpoint.as_deref(), &service_name)?;
    crate::metrics::register_build_info(&service_name);
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    use opentelemetry::trace::TracerProvider as _;
    // INFO and above only: MoltBot's spans are info spans, and an
    // unfiltered layer enables every callsite of the process — h2's,
    // hyper's and tonic's trace events included — which then cost their
    // formatting and a span event each, on every request (profiled with
    // `moltbot-mesh-bench`, BENCHMARKS.md "Gateway overhead").
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("moltbot"))
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let log_layer = match args.log_format {
        LogFormat::Json => JsonLogLayer::new(std::io::stdout).boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().boxed(),
    };
    tracing_subscriber::registry()
        .with(otel_layer)
        .with(log_layer.with_filter(filter))
        .try_init()
        .map_err(|e| RuntimeError::Telemetry(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}
