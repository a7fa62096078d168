//! The OpenTelemetry tracer provider and its OTLP/gRPC exporter (TLS for an
//! `https://` endpoint).

use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{SdkTracerProvider, span_processor_with_async_runtime::BatchSpanProcessor},
};

use crate::RuntimeError;

/// Builds the tracer provider. With an endpoint, spans go through a batch
/// processor driven by the Tokio runtime: the SDK's default thread-based
/// processor cannot drive tonic's exporter, which needs a Tokio reactor
/// (opentelemetry-rust issue #2673). Without one, spans still get ids (for log
/// correlation and propagation) but are not exported.
pub(super) fn provider(
    endpoint: Option<&str>,
    service_name: &str,
) -> Result<SdkTracerProvider, RuntimeError> {
    let resource = Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = endpoint.filter(|e| !e.is_empty()) {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint);
        if endpoint.starts_with("https://") {
            // Hosted collectors: the platform's roots plus SSL_CERT_FILE /
            // SSL_CERT_DIR (the same trust as the provider client, tls/).
            let mut tls = tonic::transport::ClientTlsConfig::new().with_enabled_roots();
            for bundle in crate::tls::extra_roots().map_err(RuntimeError::Telemetry)? {
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(bundle));
            }
            exporter = exporter.with_tls_config(tls);
        }
        let exporter = exporter
            .build()
            .map_err(|e| RuntimeError::Telemetry(format!("OTLP exporter: {e}")))?;
        let processor =
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
        builder = builder.with_span_processor(processor);
    }
    Ok(builder.build())
}
