//! Client-side load balancing for every gRPC client of the mesh (gateway →
//! each service, generation → auth-rotation), built from tower's balance
//! and discovery machinery:
//!
//! - [`target`]: the upstream URL, or a comma-separated list of URLs; each
//!   host is resolved to all its addresses (a Kubernetes headless Service
//!   resolves to its ready pods), again every `MOLTBOT_RESOLVE_INTERVAL_MS`
//!   ([`discover`]).
//! - One lazily connecting HTTP/2 channel per address, wrapped in outlier
//!   ejection ([`outlier`]) and a count of calls in flight until their
//!   response body ends ([`load`]).
//! - A power-of-two-choices balancer ([`affinity`], tower's `p2c` with
//!   session affinity added) picks, of two random ready endpoints, the one
//!   with fewer calls in flight (Mitzenmacher, "The Power of Two Choices in
//!   Randomized Load Balancing", 2001) — or, for a call carrying
//!   [`AFFINITY_HEADER`], the ready endpoint that key hashes to — behind a
//!   `tower::buffer::Buffer` so that the channel is cheap to clone.
//!
//! Servers close connections at a maximum age (`grpc::server`), which does
//! not matter here (each address has its own connection) but spreads
//! clients that connect through a ClusterIP Service.

pub mod affinity;
mod discover;
mod load;
mod metrics;
pub mod outlier;
pub mod target;

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use tonic::{body::Body, transport::Endpoint};
use tower::{
    BoxError, Service, ServiceExt, buffer::Buffer, load::PendingRequests, util::BoxService,
};

pub use self::affinity::AFFINITY_HEADER;

use crate::RuntimeError;

/// Time allowed to open a TCP connection to one endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Calls that may wait in one channel's queue for a ready endpoint.
const QUEUE: usize = 1024;

/// Balancing settings shared by every client of the process.
#[derive(Debug, Clone, clap::Args)]
pub struct BalanceArgs {
    /// Milliseconds between DNS re-resolutions of each upstream's names
    /// (new pods of a headless Service join within this time).
    #[arg(long, env = "MOLTBOT_RESOLVE_INTERVAL_MS", default_value_t = 5_000)]
    pub resolve_interval_ms: u64,
    /// Consecutive failed calls (transport error, or UNAVAILABLE before any
    /// response) that eject an endpoint from its balancer.
    #[arg(long, env = "MOLTBOT_OUTLIER_FAILURES", default_value_t = 3)]
    pub outlier_failures: u32,
    /// First ejection in milliseconds; each further ejection in a row
    /// doubles it, up to 300 s.
    #[arg(long, env = "MOLTBOT_OUTLIER_EJECTION_MS", default_value_t = 5_000)]
    pub outlier_ejection_ms: u64,
}

impl Default for BalanceArgs {
    fn default() -> Self {
        Self {
            resolve_interval_ms: 5_000,
            outlier_failures: 3,
            outlier_ejection_ms: 5_000,
        }
    }
}

impl BalanceArgs {
    /// Checks the values. Errors with [`RuntimeError::Config`] naming the
    /// variable that is out of range.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        if self.resolve_interval_ms < 100 {
            return Err(RuntimeError::Config(
                "MOLTBOT_RESOLVE_INTERVAL_MS must be at least 100".to_owned(),
            ));
        }
        if self.outlier_failures == 0 {
            return Err(RuntimeError::Config(
                "MOLTBOT_OUTLIER_FAILURES must be at least 1".to_owned(),
            ));
        }
        Ok(())
    }

    fn policy(&self) -> outlier::Policy {
        outlier::Policy {
            consecutive_failures: self.outlier_failures,
            base_ejection: Duration::from_millis(self.outlier_ejection_ms),
            ..outlier::Policy::default()
        }
    }
}

static SETTINGS: OnceLock<BalanceArgs> = OnceLock::new();

/// Sets this process's balancing settings. Call once at start-up, before
/// opening channels; later calls are ignored. Errors as
/// [`BalanceArgs::validate`].
pub fn install(args: &BalanceArgs) -> Result<(), RuntimeError> {
    args.validate()?;
    let _ = SETTINGS.set(args.clone());
    Ok(())
}

type Request = http::Request<Body>;
type Response = http::Response<Body>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A balanced channel to every endpoint of one upstream; pass it to any
/// generated client (usually through `client::TracedChannel`). Clones
/// share the balancer. Calls wait for a ready endpoint (their deadline
/// bounds the wait); when the upstream resolved to no address at all, they
/// fail at once with UNAVAILABLE naming the resolver's error.
#[derive(Clone)]
pub struct MeshChannel {
    buffer: Option<Buffer<Request, BoxFuture<Result<Response, BoxError>>>>,
    resolution: Arc<discover::Watch>,
    name: Arc<str>,
    refuse: bool,
}

impl std::fmt::Debug for MeshChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshChannel")
            .field("upstream", &self.name)
            .finish_non_exhaustive()
    }
}

impl MeshChannel {
    /// A channel that fails every call with UNAVAILABLE: `reason`.
    pub fn unreachable(reason: &str) -> Self {
        let resolution = discover::Resolution {
            done: true,
            error: Some(reason.to_owned()),
            addresses: 0,
        };
        Self {
            buffer: None,
            resolution: Arc::new(discover::Watch {
                state: Mutex::new(resolution),
                changed: tokio::sync::Notify::new(),
            }),
            name: Arc::from(reason),
            refuse: false,
        }
    }

    /// Why calls fail at once, when they do.
    fn refusal(&self) -> Option<String> {
        if self.buffer.is_none() {
            return Some(self.name.to_string());
        }
        self.resolution.refusal(&self.name)
    }
}

impl Service<Request> for MeshChannel {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.refusal().is_some() {
            self.refuse = true;
            return Poll::Ready(Ok(()));
        }
        self.refuse = false;
        match &mut self.buffer {
            Some(buffer) => buffer.poll_ready(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match (&mut self.buffer, self.refuse) {
            (Some(buffer), false) => {
                // A call queued before the first resolution must not wait
                // forever for an upstream that turns out to have no address.
                let call = buffer.call(request);
                let (watch, name) = (self.resolution.clone(), self.name.clone());
                Box::pin(async move {
                    tokio::select! {
                        result = call => result,
                        reason = watch.no_address(&name) => Err(tonic::Status::unavailable(reason).into()),
                    }
                })
            }
            _ => {
                let reason = self.refusal().unwrap_or_else(|| self.name.to_string());
                Box::pin(async move { Err(tonic::Status::unavailable(reason).into()) })
            }
        }
    }
}

/// Opens a balanced channel to `spec`: an `http(s)://host:port` URL or a
/// comma-separated list of them (all one scheme). `https://` endpoints are
/// dialled with this process's client TLS ([`super::tls`]), verified
/// against the host as written. Needs a Tokio runtime (the discovery task
/// and the balancer's worker are spawned on it). Errors with
/// [`RuntimeError::Config`] for an invalid URL list.
pub fn channel(spec: &str) -> Result<MeshChannel, RuntimeError> {
    let targets = target::parse(spec)?;
    let settings = SETTINGS.get().cloned().unwrap_or_default();
    let name: Arc<str> = Arc::from(
        targets
            .first()
            .map(|t| format!("{}:{}", t.host, t.port))
            .unwrap_or_default(),
    );
    let pool = Arc::new(outlier::Pool {
        upstream: name.to_string(),
        ..outlier::Pool::default()
    });
    let policy = settings.policy();
    let resolution = Arc::new(discover::Watch::default());
    let changes = discover::spawn(
        targets,
        Duration::from_millis(settings.resolve_interval_ms),
        resolution.clone(),
        move |addr, target| match endpoint(addr, target) {
            Ok(channel) => Some(PendingRequests::new(
                outlier::Outlier::new(channel, policy, pool.clone(), addr.to_string()),
                load::UntilBodyEnds,
            )),
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot open a channel to endpoint");
                None
            }
        },
    );
    let balance = affinity::AffinityBalance::new(changes).map_err(|e: BoxError| e);
    let buffer = Buffer::new(BoxService::new(balance), QUEUE);
    Ok(MeshChannel {
        buffer: Some(buffer),
        resolution,
        name,
        refuse: false,
    })
}

/// One lazily connecting channel to `addr`, speaking to `target`'s host.
fn endpoint(
    addr: std::net::SocketAddr,
    target: &target::Target,
) -> Result<tonic::transport::Channel, RuntimeError> {
    let origin: http::Uri = target
        .origin()
        .replacen("https://", "http://", 1)
        .parse()
        .map_err(|e| RuntimeError::Config(format!("{}: {e}", target.origin())))?;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .origin(origin)
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    Ok(if target.tls {
        endpoint.connect_with_connector_lazy(super::tls::TlsConnector::pinned(
            target.host.clone(),
            addr,
        ))
    } else {
        endpoint.connect_lazy()
    })
}
