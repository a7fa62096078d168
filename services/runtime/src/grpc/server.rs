//! The gRPC server every service runs: its own service plus `grpc.health.v1`
//! and reflection (v1 and v1alpha), behind the observe layer, with health
//! NOT_SERVING until ready and again while draining, and graceful shutdown.

use std::{convert::Infallible, future::Future, net::SocketAddr, time::Duration};

use tonic::{server::NamedService, service::Routes, transport::Server};
use tonic_health::ServingStatus;
use tower::ServiceBuilder;

use super::{ObserveLayer, authz::AuthzLayer};
use crate::{RuntimeError, config::ServerArgs, metrics, shutdown};

/// Concurrent streams per HTTP/2 connection, and concurrent calls per
/// connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// Deadline of any call, streams included (the longest generation the
/// gateway allows is 120 s; a caller's own `grpc-timeout` is shorter).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Connections are closed (gracefully, after GOAWAY) at this age, so that
/// long-lived clients reconnect and spread over new replicas.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);

/// A service's identity and default addresses (docs/architecture.md, "Pinned names").
#[derive(Debug, Clone, Copy)]
pub struct ServiceSpec {
    /// Binary and default `service.name`, e.g. `moltbot-context`.
    pub binary: &'static str,
    /// Default gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// Default metrics listen address.
    pub metrics_addr: SocketAddr,
}

/// A generated tonic server plus its full gRPC name, ready to be served.
pub struct GrpcService {
    name: &'static str,
    routes: Routes,
    admin_token: Option<std::sync::Arc<str>>,
}

impl GrpcService {
    /// Wraps a generated server, e.g. `ContextServiceServer::new(svc)`.
    pub fn new<S>(service: S) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Self {
            name: S::NAME,
            routes: Routes::new(service),
            admin_token: None,
        }
    }

    /// Accepts `authorization: Bearer <token>` for the operator rules of
    /// the authorisation table (docs/security.md) besides the operator
    /// certificate. An empty token counts as none.
    pub fn with_admin_token(mut self, token: Option<String>) -> Self {
        self.admin_token = super::admin::configured(token).map(std::sync::Arc::from);
        self
    }

    /// Full gRPC name, e.g. `moltbot.context.v1.ContextService`.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Binds the addresses of `args` (defaults from `spec`) and runs [`serve_with_listener`]
/// until SIGTERM or SIGINT.
pub async fn serve(
    spec: &ServiceSpec,
    args: &ServerArgs,
    service: GrpcService,
    ready: impl Future<Output = Result<(), RuntimeError>>,
) -> Result<(), RuntimeError> {
    args.validate()?;
    let grpc_addr = args.grpc_addr.unwrap_or(spec.grpc_addr);
    let grpc = tokio::net::TcpListener::bind(grpc_addr)
        .await
        .map_err(|source| RuntimeError::Bind {
            addr: grpc_addr,
            source,
        })?;
    let metrics_listener = metrics::bind(args.metrics_addr.unwrap_or(spec.metrics_addr)).await?;
    let tls = super::tls::ServerTls::from_args(&args.tls)?;
    let mutual = tls.as_ref().is_some_and(|t| t.mutual());
    if !mutual && !grpc_addr.ip().is_loopback() && !args.insecure_plaintext {
        return Err(RuntimeError::Config(format!(
            "{grpc_addr} is reachable from other hosts but no caller can be authenticated: set MOLTBOT_TLS_CERT, MOLTBOT_TLS_KEY and MOLTBOT_TLS_CA (mutual TLS, docs/security.md), bind to 127.0.0.1, or set MOLTBOT_INSECURE_PLAINTEXT=true if the network itself is trusted"
        )));
    }
    let health_listener = match tls.as_ref().and_then(|t| t.health_addr) {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RuntimeError::Bind { addr, source })?,
        ),
        None => None,
    };
    serve_inner(
        Listeners {
            grpc,
            metrics: metrics_listener,
            tls,
            health: health_listener,
            drain_delay: args.drain_delay(),
        },
        service,
        ready,
        shutdown::signal(),
        args.shutdown_grace(),
    )
    .await
}

/// The sockets a server runs on.
struct Listeners {
    grpc: tokio::net::TcpListener,
    metrics: tokio::net::TcpListener,
    /// TLS on `grpc` (mutual when a client CA is configured).
    tls: Option<super::tls::ServerTls>,
    /// Plaintext `grpc.health.v1.Health` only, beside a TLS `grpc`.
    health: Option<tokio::net::TcpListener>,
    /// How long to keep serving, NOT_SERVING, before the listener closes.
    drain_delay: Duration,
}

/// Serves `service` with health and reflection on `grpc`, and `/metrics` on
/// `metrics_listener`, until `stop` resolves.
///
/// Health is NOT_SERVING (overall `""` and the service's own name) until
/// `ready` resolves `Ok`, then SERVING. When `stop` resolves, health turns
/// NOT_SERVING, the server stops accepting, and in-flight calls get `grace` to
/// finish; calls still running after that are dropped. Logs `listening` with
/// the bound `grpc_addr` and `metrics_addr` (port 0 resolved).
///
/// Errors: [`RuntimeError::NotReady`] (via `ready`), [`RuntimeError::Transport`]
/// when the server fails, [`RuntimeError::Reflection`] for a bad descriptor set.
pub async fn serve_with_listener(
    grpc: tokio::net::TcpListener,
    metrics_listener: tokio::net::TcpListener,
    service: GrpcService,
    ready: impl Future<Output = Result<(), RuntimeError>>,
    stop: impl Future<Output = ()>,
    grace: Duration,
) -> Result<(), RuntimeError> {
    serve_inner(
        Listeners {
            grpc,
            metrics: metrics_listener,
            tls: None,
            health: None,
            drain_delay: Duration::ZERO,
        },
        service,
        ready,
        stop,
        grace,
    )
    .await
}

async fn serve_inner(
    listeners: Listeners,
    service: GrpcService,
    ready: impl Future<Output = Result<(), RuntimeError>>,
    stop: impl Future<Output = ()>,
    grace: Duration,
) -> Result<(), RuntimeError> {
    let Listeners {
        grpc,
        metrics: metrics_listener,
        tls,
        health: health_listener,
        drain_delay,
    } = listeners;
    let name = service.name;
    let health = tonic_health::server::HealthReporter::new();
    let (draining_tx, draining_rx) = tokio::sync::watch::channel(false);
    let health_service = tonic_health::pb::health_server::HealthServer::new(
        super::health::DrainingHealth::new(health.clone(), draining_rx),
    );
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(name, ServingStatus::NotServing)
        .await;

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(moltbot_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // List only our public services, not reflection itself.
            .with_service_name(name)
            .with_service_name("grpc.health.v1.Health")
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let routes = service
        .routes
        .add_service(health_service.clone())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let grpc_addr = grpc.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;
    let health_addr = health_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?
        .map(|a| a.to_string());
    tracing::info!(
        service = name,
        %grpc_addr,
        %metrics_addr,
        tls = tls.is_some(),
        health_addr,
        "listening"
    );

    let authz = if tls.as_ref().is_some_and(|t| t.mutual()) {
        AuthzLayer::enforcing(service.admin_token.clone())
    } else {
        tracing::warn!(
            service = name,
            "no mutual TLS: callers are not authenticated and the authorisation table is not enforced (docs/security.md)"
        );
        AuthzLayer::off()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let layers = ServiceBuilder::new()
        // Outermost: the span and metrics must cover everything below,
        // including refusals and tonic's own UNIMPLEMENTED answers.
        .layer(ObserveLayer)
        // Before routing: a refused call never reaches a handler, and an
        // admitted one carries its `Caller` to it.
        .layer(authz);
    let shutdown = async {
        let _ = stop_rx.await;
    };
    // Bounds on what one peer can hold open (OWASP API4): streams per
    // HTTP/2 connection, a deadline on every call (a caller's shorter
    // `grpc-timeout` wins), keep-alive pings that close dead peers, and an
    // upper bound on how long a connection lives so clients re-balance.
    let builder = Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .concurrency_limit_per_connection(MAX_CONCURRENT_STREAMS as usize)
        .timeout(REQUEST_TIMEOUT)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_connection_age(MAX_CONNECTION_AGE)
        .layer(layers)
        .add_routes(routes);
    let server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match tls {
        Some(tls) => Box::pin(
            builder.serve_with_incoming_shutdown(std::sync::Arc::new(tls).incoming(grpc), shutdown),
        ),
        None => Box::pin(builder.serve_with_incoming_shutdown(
            // TCP_NODELAY: replies are small frames; with Nagle's
            // algorithm they wait on the peer's delayed ACK (up to 40 ms
            // at p99).
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            shutdown,
        )),
    };
    // The plaintext health listener (kubelet probes) stops with the server.
    let (health_stop_tx, health_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let health_task = health_listener.map(|listener| {
        tokio::spawn(
            Server::builder()
                .add_service(health_service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = health_stop_rx.await;
                    },
                ),
        )
    });
    let mut server = tokio::spawn(server);
    let (metrics_stop_tx, metrics_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = tokio::spawn(metrics::serve(metrics_listener, async {
        let _ = metrics_stop_rx.await;
    }));

    tokio::pin!(stop);
    let stopped_early = tokio::select! {
        r = ready => {
            r?;
            health.set_service_status("", ServingStatus::Serving).await;
            health.set_service_status(name, ServingStatus::Serving).await;
            tracing::info!(service = name, "serving");
            false
        }
        _ = &mut stop => true,
        r = &mut server => {
            // The server ended on its own: an accept error.
            r??;
            return Ok(());
        }
    };
    if !stopped_early {
        tokio::select! {
            _ = &mut stop => {}
            r = &mut server => {
                r??;
                return Ok(());
            }
        }
    }

    // Drain: tell health watchers and load balancers first, then stop accepting.
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(name, ServingStatus::NotServing)
        .await;
    tracing::info!(
        service = name,
        grace_ms = grace.as_millis() as u64,
        "draining"
    );
    // Health watchers got NOT_SERVING above; end their streams so they do not
    // hold the drain open.
    let _ = draining_tx.send(true);
    // Keep accepting while load balancers and endpoints learn of the drain;
    // new calls in this window are still served.
    if !drain_delay.is_zero() {
        tracing::info!(
            service = name,
            drain_delay_ms = drain_delay.as_millis() as u64,
            "serving through the drain delay"
        );
        tokio::time::sleep(drain_delay).await;
    }
    let _ = stop_tx.send(());
    let result = match tokio::time::timeout(grace, &mut server).await {
        Ok(joined) => joined?.map_err(RuntimeError::from),
        Err(_) => {
            tracing::warn!(
                service = name,
                "grace period elapsed with calls in flight; dropping them"
            );
            server.abort();
            Ok(())
        }
    };
    let _ = metrics_stop_tx.send(());
    let _ = metrics_task.await;
    let _ = health_stop_tx.send(());
    if let Some(task) = health_task {
        let _ = task.await;
    }
    tracing::info!(service = name, "stopped");
    result
}
