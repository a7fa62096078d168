//! Traced gRPC client channels: every outgoing RPC gets a client span (a child
//! of the caller's current span) whose W3C trace context is injected into the
//! request metadata, so the callee's server span joins the same trace.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tonic::transport::{Channel, Endpoint};
use tower::Service;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{rpc_name, status};
use crate::{RuntimeError, telemetry::propagation};

pub use super::balance::CONNECT_TIMEOUT;
use super::balance::MeshChannel;

/// A balanced channel ([`super::balance`]) whose RPCs are traced; pass it
/// to any generated client.
pub type TracedChannel = ClientTrace<MeshChannel>;

/// Opens a traced channel balancing over every address of `url` (e.g.
/// `http://127.0.0.1:50054`; `https://…` for TLS with this process's client
/// certificate, [`super::tls`]; or several such URLs separated by commas).
/// Connections are made on the first calls and re-made after an endpoint
/// restarts. Needs a Tokio runtime. Errors with [`RuntimeError::Config`]
/// for an invalid URL list.
pub fn channel(url: &str) -> Result<TracedChannel, RuntimeError> {
    Ok(ClientTrace {
        inner: super::balance::channel(url)?,
    })
}

/// A traced channel that fails every call with UNAVAILABLE: `reason`.
pub fn unreachable(reason: &str) -> TracedChannel {
    ClientTrace {
        inner: MeshChannel::unreachable(reason),
    }
}

/// Connects to `url` now (for tools that should fail at once when the
/// service is down), TLS as in [`channel`]. Errors with
/// [`RuntimeError::Config`] for an invalid URL and
/// [`RuntimeError::Transport`] when the connection fails.
pub async fn connect(url: &str) -> Result<Channel, RuntimeError> {
    let (endpoint, tls) = endpoint(url)?;
    Ok(match tls {
        Some(connector) => endpoint.connect_with_connector(connector).await?,
        None => endpoint.connect().await?,
    })
}

/// The endpoint for `url`, and the TLS connector when it is `https://`.
fn endpoint(url: &str) -> Result<(Endpoint, Option<super::tls::TlsConnector>), RuntimeError> {
    let parsed = url::Url::parse(url)
        .map_err(|e| RuntimeError::Config(format!("{url:?} is not a URL: {e}")))?;
    let tls = parsed.scheme() == "https";
    // tonic is handed http://: the TLS is done by our connector, which
    // reloads the certificate files for each new connection.
    let plain = if tls {
        format!("http://{}", url.trim_start_matches("https://"))
    } else {
        url.to_owned()
    };
    let endpoint = Endpoint::from_shared(plain)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let connector = if tls {
        Some(super::tls::TlsConnector::new(&parsed)?)
    } else {
        None
    };
    Ok((endpoint, connector))
}

/// Service adding a client span and trace-context propagation to each RPC.
#[derive(Debug, Clone)]
pub struct ClientTrace<S> {
    inner: S,
}

impl<S> ClientTrace<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ClientTrace<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let (service, method) = rpc_name(req.uri().path());
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = %format!("{service}/{method}"),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        propagation::inject(&span.context(), req.headers_mut());
        // The service polled ready is the one that must take the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let record_span = span.clone();
        Box::pin(
            async move {
                let result = inner.call(req).await;
                if let Ok(response) = &result
                    && let Some(code) = status::from_headers(response.headers())
                {
                    record_span.record("rpc.grpc.status_code", code as i32);
                }
                result
            }
            .instrument(span),
        )
    }
}
