//! Endpoint discovery: a task that resolves an upstream's names now and
//! every `interval`, and tells the balancer which addresses appeared
//! (`Change::Insert`, a new lazily-connecting channel) and which went
//! (`Change::Remove`). A failed or empty resolution keeps the last good set
//! (as gRPC's and Envoy's DNS resolvers do): a DNS hiccup must not empty a
//! healthy pool. The task ends when the balancer is dropped.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::mpsc;
use tower::discover::Change;

use super::target::{self, Target};

/// What the discovery task has found so far, for callers deciding whether
/// to wait for endpoints or fail at once.
#[derive(Debug, Default)]
pub struct Resolution {
    /// Whether a resolution has completed (successfully or not).
    pub done: bool,
    /// The last resolver error, while no address is known.
    pub error: Option<String>,
    /// Addresses now in the balancer.
    pub addresses: usize,
}

/// [`Resolution`] and a signal of its changes, shared by the discovery
/// task and the channel.
#[derive(Debug, Default)]
pub struct Watch {
    /// The latest resolution.
    pub state: Mutex<Resolution>,
    /// Notified after each resolution.
    pub changed: tokio::sync::Notify,
}

impl Watch {
    /// Why calls to `name` fail at once: a resolution completed and the
    /// upstream has no address.
    pub fn refusal(&self, name: &str) -> Option<String> {
        let state = self.state.lock().ok()?;
        (state.done && state.addresses == 0).then(|| {
            format!(
                "{name} resolves to no address: {}",
                state.error.as_deref().unwrap_or("empty answer")
            )
        })
    }

    /// Completes (with [`Watch::refusal`]'s reason) once `name` is known to
    /// have no address; a call waiting for an endpoint races this.
    pub async fn no_address(&self, name: &str) -> String {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(reason) = self.refusal(name) {
                return reason;
            }
            notified.await;
        }
    }
}

/// The stream the balancer reads.
pub type Changes<S> =
    tokio_stream::wrappers::ReceiverStream<Result<Change<SocketAddr, S>, Infallible>>;

/// Starts discovery of `targets`, making each endpoint's service with
/// `make`. Needs a Tokio runtime.
pub fn spawn<S, F>(
    targets: Vec<Target>,
    interval: Duration,
    state: Arc<Watch>,
    make: F,
) -> Changes<S>
where
    S: Send + 'static,
    F: Fn(SocketAddr, &Target) -> Option<S> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run(targets, interval, state, make, tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn run<S, F>(
    targets: Vec<Target>,
    interval: Duration,
    state: Arc<Watch>,
    make: F,
    tx: mpsc::Sender<Result<Change<SocketAddr, S>, Infallible>>,
) where
    F: Fn(SocketAddr, &Target) -> Option<S>,
{
    let name = targets.first().map(|t| t.host.clone()).unwrap_or_default();
    let mut current: BTreeMap<SocketAddr, Target> = BTreeMap::new();
    loop {
        let resolved = target::resolve(&targets).await;
        let error = match resolved {
            Ok(found) => {
                let gone: Vec<SocketAddr> = current
                    .keys()
                    .filter(|a| !found.contains_key(a))
                    .copied()
                    .collect();
                for addr in gone {
                    current.remove(&addr);
                    tracing::info!(upstream = %name, %addr, "endpoint removed");
                    if tx.send(Ok(Change::Remove(addr))).await.is_err() {
                        return;
                    }
                }
                for (addr, target) in found {
                    if current.contains_key(&addr) {
                        continue;
                    }
                    let Some(service) = make(addr, &target) else {
                        continue;
                    };
                    tracing::info!(upstream = %name, %addr, "endpoint added");
                    if tx.send(Ok(Change::Insert(addr, service))).await.is_err() {
                        return;
                    }
                    current.insert(addr, target);
                }
                None
            }
            Err(e) => {
                if current.is_empty() {
                    tracing::warn!(upstream = %name, error = %e, "upstream does not resolve");
                }
                Some(e)
            }
        };
        super::metrics::endpoints(&name, current.len());
        if let Ok(mut s) = state.state.lock() {
            s.done = true;
            s.addresses = current.len();
            s.error = if current.is_empty() { error } else { None };
        }
        state.changed.notify_waiters();
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = tx.closed() => return,
        }
    }
}
