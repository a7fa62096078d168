//! Flags and environment variables shared by every service (names pinned in
//! docs/architecture.md). Each flag also reads its environment variable; defaults work on
//! one machine.

use std::{net::SocketAddr, time::Duration};

use clap::Args;

use crate::RuntimeError;

/// Where a gRPC service listens and how it shuts down.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// gRPC listen address [default: the service's port in docs/architecture.md]. Port 0
    /// picks a free port (logged as `grpc_addr`).
    #[arg(long, env = "MOLTBOT_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Prometheus `/metrics` listen address [default: the service's metrics
    /// port in docs/architecture.md]. Port 0 picks a free port.
    #[arg(long, env = "MOLTBOT_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Grace period for in-flight calls after SIGTERM, in milliseconds.
    #[arg(long, env = "MOLTBOT_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// After SIGTERM: milliseconds to keep serving with health NOT_SERVING
    /// (the gateway: `/readyz` 503) before the listener closes, so load
    /// balancers and Kubernetes endpoints stop sending new requests first.
    /// 0 (the local default) closes at once; the chart sets it.
    #[arg(long, env = "MOLTBOT_DRAIN_DELAY_MS", default_value_t = 0)]
    pub drain_delay_ms: u64,
    /// Serve on a non-loopback address without mutual TLS, so that nobody
    /// is authenticated (docs/security.md): only for a network that is
    /// itself trusted. Without it such a start-up is refused.
    #[arg(
        long,
        env = "MOLTBOT_INSECURE_PLAINTEXT",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub insecure_plaintext: bool,
    /// This service runs as one of several replicas (the chart sets it when
    /// `replicas > 1` or autoscaling is on): a process-local store (memory,
    /// SQLite) would give each replica its own data, so start-up is refused
    /// without the shared store.
    #[arg(
        long,
        env = "MOLTBOT_REPLICATED",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub replicated: bool,
    /// TLS of the gRPC listener and of this component's own gRPC clients.
    #[command(flatten)]
    pub tls: crate::grpc::tls::TlsArgs,
    /// Load balancing of this component's own gRPC clients.
    #[command(flatten)]
    pub balance: crate::grpc::balance::BalanceArgs,
}

impl ServerArgs {
    /// The grace period as a [`Duration`].
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// The drain delay as a [`Duration`].
    pub fn drain_delay(&self) -> Duration {
        Duration::from_millis(self.drain_delay_ms)
    }

    /// Refuses a process-local `store` (e.g. `the in-memory session store`)
    /// when this service is replicated. Errors with [`RuntimeError::Config`]
    /// naming `setting`, the variable that selects the shared store.
    pub fn require_shared_store(
        &self,
        local: bool,
        store: &str,
        setting: &str,
    ) -> Result<(), RuntimeError> {
        if self.replicated && local {
            return Err(RuntimeError::Config(format!(
                "MOLTBOT_REPLICATED=true but {store} is local to this process, so replicas would not share it: set {setting}"
            )));
        }
        Ok(())
    }

    /// Checks the values together. Errors with [`RuntimeError::Config`] when both
    /// addresses name the same non-zero port.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        if let (Some(grpc), Some(metrics)) = (self.grpc_addr, self.metrics_addr)
            && grpc.port() != 0
            && grpc == metrics
        {
            return Err(RuntimeError::Config(format!(
                "MOLTBOT_GRPC_ADDR and MOLTBOT_METRICS_ADDR are both {grpc}; give the metrics endpoint its own port"
            )));
        }
        Ok(())
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object a line (production, log shippers).
    Json,
    /// Human-readable lines (a terminal).
    Text,
}

/// Logging and tracing settings.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// OTLP/gRPC collector endpoint, e.g. `http://127.0.0.1:4317`. Unset: spans
    /// are not exported (trace ids still appear in logs and propagate).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` resource attribute of exported spans.
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub service_name: Option<String>,
    /// Log format.
    #[arg(long, env = "MOLTBOT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax, e.g. `info,moltbot_context=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
}

impl TelemetryArgs {
    /// Checks the OTLP endpoint. Errors with [`RuntimeError::Config`] when it is
    /// not an `http://` or `https://` URL.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        if let Some(endpoint) = self.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
            let url = url::Url::parse(endpoint).map_err(|e| {
                RuntimeError::Config(format!(
                    "OTEL_EXPORTER_OTLP_ENDPOINT={endpoint:?} is not a URL ({e}); use e.g. http://127.0.0.1:4317"
                ))
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(RuntimeError::Config(format!(
                    "OTEL_EXPORTER_OTLP_ENDPOINT={endpoint:?} must start with http:// or https://"
                )));
            }
        }
        Ok(())
    }
}

/// Parses and checks an upstream gRPC URL such as `http://127.0.0.1:50054`,
/// or several separated by commas (endpoints to balance over,
/// `grpc::balance`); returns them without trailing slashes.
///
/// `name` is the environment variable, quoted in the error. Errors with
/// [`RuntimeError::Config`] when a URL does not parse, is not http(s), has
/// no host, or the list mixes http and https.
pub fn parse_upstream_url(name: &str, value: &str) -> Result<String, RuntimeError> {
    let mut urls = Vec::new();
    for part in value.split(',').map(str::trim) {
        let url = url::Url::parse(part).map_err(|e| {
            RuntimeError::Config(format!(
                "{name}={value:?}: {part:?} is not a URL ({e}); use e.g. http://127.0.0.1:50054, or several URLs separated by commas"
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(RuntimeError::Config(format!(
                "{name}={value:?}: {part:?} must be an http:// or https:// URL with a host"
            )));
        }
        urls.push(part.trim_end_matches('/').to_owned());
    }
    let joined = urls.join(",");
    crate::grpc::balance::target::parse(&joined)
        .map_err(|e| RuntimeError::Config(format!("{name}={value:?}: {e}")))?;
    Ok(joined)
}

/// Whether `name` is a valid resource name (collection, provider):
/// `[a-z0-9_-]{1,64}`, safe in URLs, file names and metric labels.
pub fn is_resource_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_are_checked() {
        assert_eq!(
            parse_upstream_url("X", "http://127.0.0.1:1/").unwrap(),
            "http://127.0.0.1:1"
        );
        let err = parse_upstream_url("MOLTBOT_CONTEXT_URL", "127.0.0.1:50054").unwrap_err();
        assert!(err.to_string().contains("MOLTBOT_CONTEXT_URL"), "{err}");
        assert!(parse_upstream_url("X", "ftp://h:1").is_err());
        // A list of endpoints to balance over; one scheme for all.
        assert_eq!(
            parse_upstream_url("X", "http://a:1/, http://b:2").unwrap(),
            "http://a:1,http://b:2"
        );
        assert!(parse_upstream_url("X", "http://a:1,https://b:2").is_err());
        assert!(parse_upstream_url("X", "http://a:1,b:2").is_err());
    }

    #[test]
    fn otlp_endpoint_must_be_http() {
        let mut args = TelemetryArgs {
            otlp_endpoint: Some("grpc://x:4317".into()),
            service_name: None,
            log_format: LogFormat::Json,
            log_filter: "info".into(),
        };
        assert!(args.validate().is_err());
        args.otlp_endpoint = Some("http://127.0.0.1:4317".into());
        assert!(args.validate().is_ok());
    }

    #[test]
    fn replicated_services_refuse_local_stores() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            server: ServerArgs,
        }
        let mut args = <Cli as clap::Parser>::parse_from(["x"]).server;
        assert!(
            args.require_shared_store(true, "memory", "REDIS_URL")
                .is_ok()
        );
        args.replicated = true;
        let err = args
            .require_shared_store(true, "the in-memory session store", "REDIS_URL")
            .unwrap_err();
        assert!(err.to_string().contains("set REDIS_URL"), "{err}");
        assert!(
            args.require_shared_store(false, "redis", "REDIS_URL")
                .is_ok()
        );
    }

    #[test]
    fn same_port_for_grpc_and_metrics_is_rejected() {
        let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let args = ServerArgs {
            grpc_addr: Some(addr),
            metrics_addr: Some(addr),
            shutdown_grace_ms: 1,
            drain_delay_ms: 0,
            insecure_plaintext: false,
            replicated: false,
            tls: Default::default(),
            balance: Default::default(),
        };
        assert!(
            args.validate()
                .unwrap_err()
                .to_string()
                .contains("own port")
        );
    }
}
