//! Outlier ejection in the spirit of Envoy's outlier detection
//! (`consecutive_gateway_failure`, `base_ejection_time` growing with each
//! ejection, `max_ejection_percent`): an endpoint whose calls keep failing at
//! the transport (connection refused or reset, or UNAVAILABLE before any
//! response) is taken out of the balancer's ready set for a while, then
//! let back in on probation, where one more failure ejects it again for
//! twice as long. The last endpoint not ejected is never ejected: a
//! balancer with every endpoint out would only queue.
//!
//! [`Detector`] is the pure state machine (tested with explicit instants);
//! [`Outlier`] is the tower middleware around one endpoint's channel that
//! feeds it: while ejected, its `poll_ready` stays pending, which is what
//! tower's p2c balancer reads as "not ready".

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::{Instant, Sleep};
use tower::Service;

/// When to eject and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Consecutive failed calls that eject an endpoint (Envoy's
    /// `consecutive_gateway_failure`, default 5 there; 3 here, since a
    /// mesh call that fails at the transport fails fast).
    pub consecutive_failures: u32,
    /// First ejection; the n-th in a row lasts `base × 2^(n-1)`.
    pub base_ejection: Duration,
    /// Longest ejection (Envoy's `max_ejection_time`, 300 s).
    pub max_ejection: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(300),
        }
    }
}

/// Endpoint counts shared by the endpoints of one upstream, so that the last
/// endpoint standing is not ejected.
#[derive(Debug, Default)]
pub struct Pool {
    /// The upstream, as metrics label it (the first host of its URL list).
    pub upstream: String,
    /// Endpoints the balancer holds now.
    pub endpoints: AtomicUsize,
    /// Of those, ejected now.
    pub ejected: AtomicUsize,
}

impl Pool {
    /// Takes one ejection slot when another endpoint would remain; false
    /// when this is the last endpoint not ejected.
    fn try_eject(&self) -> bool {
        let total = self.endpoints.load(Ordering::SeqCst);
        self.ejected
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |e| {
                (e + 1 < total).then_some(e + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        let _ = self
            .ejected
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |e| e.checked_sub(1));
    }
}

/// One endpoint's failure history.
#[derive(Debug, Clone, Default)]
pub struct Detector {
    failures: u32,
    ejections: u32,
    until: Option<Instant>,
}

impl Detector {
    /// A call succeeded: the run of failures ends, and so does the
    /// doubling of ejection times.
    pub fn success(&mut self) {
        self.failures = 0;
        self.ejections = 0;
    }

    /// A call failed at `now`. Returns the end of a new ejection when this
    /// failure completes the run and `consent` (asked only then: the pool's
    /// "another endpoint remains") agrees. Right after an ejection
    /// (probation), and for a `refused` connection (nothing listens there),
    /// one failure is enough.
    pub fn failure(
        &mut self,
        policy: &Policy,
        now: Instant,
        refused: bool,
        consent: impl FnOnce() -> bool,
    ) -> Option<Instant> {
        if self.until.is_some() {
            return None;
        }
        self.failures += 1;
        let threshold = if self.ejections > 0 || refused {
            1
        } else {
            policy.consecutive_failures.max(1)
        };
        if self.failures < threshold || !consent() {
            return None;
        }
        self.failures = 0;
        self.ejections += 1;
        let factor = 1u32 << (self.ejections - 1).min(16);
        let length = policy
            .base_ejection
            .saturating_mul(factor)
            .min(policy.max_ejection);
        let until = now + length;
        self.until = Some(until);
        Some(until)
    }

    /// The end of the current ejection, if one runs at `now`; an ejection
    /// that has ended is cleared (the endpoint is on probation) and `None`
    /// returned with `ended = true`.
    pub fn poll(&mut self, now: Instant) -> (Option<Instant>, bool) {
        match self.until {
            Some(until) if now < until => (Some(until), false),
            Some(_) => {
                self.until = None;
                (None, true)
            }
            None => (None, false),
        }
    }

    /// Whether an ejection is running (or has ended and not been polled).
    pub fn ejected(&self) -> bool {
        self.until.is_some()
    }
}

/// Middleware feeding one endpoint's calls into a [`Detector`].
pub struct Outlier<S> {
    inner: S,
    state: Arc<Mutex<Detector>>,
    policy: Policy,
    pool: Arc<Pool>,
    sleep: Option<Pin<Box<Sleep>>>,
    label: Arc<str>,
}

impl<S> Outlier<S> {
    /// Wraps `inner`, the endpoint named `label` in logs, counting in `pool`.
    pub fn new(inner: S, policy: Policy, pool: Arc<Pool>, label: impl Into<Arc<str>>) -> Self {
        pool.endpoints.fetch_add(1, Ordering::SeqCst);
        Self {
            inner,
            state: Arc::default(),
            policy,
            pool,
            sleep: None,
            label: label.into(),
        }
    }
}

impl<S> Drop for Outlier<S> {
    fn drop(&mut self) {
        self.pool.endpoints.fetch_sub(1, Ordering::SeqCst);
        if self.state.lock().map(|s| s.ejected()).unwrap_or(false) {
            self.pool.release();
        }
    }
}

/// Whether a response says the endpoint could not serve: a trailers-only
/// UNAVAILABLE (a server shutting down, or a proxy that found nothing).
fn unavailable<B>(response: &http::Response<B>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"14")
}

/// Whether `error` (or an error it wraps) is a refused TCP connection.
fn connection_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        current = e.source();
    }
    false
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, Req, B> Service<Req> for Outlier<S>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: std::error::Error + 'static,
    B: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            let (until, ended) = match self.state.lock() {
                Ok(mut state) => state.poll(Instant::now()),
                Err(_) => (None, false),
            };
            if ended {
                self.pool.release();
                tracing::info!(endpoint = %self.label, "outlier ejection ended; endpoint on probation");
            }
            let Some(until) = until else {
                self.sleep = None;
                break;
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if sleep.deadline() != until {
                sleep.as_mut().reset(until);
            }
            match sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => continue,
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let future = self.inner.call(req);
        let (state, policy, pool, label) = (
            self.state.clone(),
            self.policy,
            self.pool.clone(),
            self.label.clone(),
        );
        Box::pin(async move {
            let result = future.await;
            let (failed, refused) = match &result {
                Ok(response) => (unavailable(response), false),
                Err(e) => (true, connection_refused(e)),
            };
            if let Ok(mut state) = state.lock() {
                if !failed {
                    state.success();
                } else if let Some(until) =
                    state.failure(&policy, Instant::now(), refused, || pool.try_eject())
                {
                    let ms = until.saturating_duration_since(Instant::now()).as_millis() as u64;
                    tracing::warn!(endpoint = %label, ejected_ms = ms, "endpoint ejected after failed calls");
                    super::metrics::ejected(&pool.upstream);
                }
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ejects_after_the_run_and_doubles_on_probation() {
        let policy = Policy::default();
        let mut d = Detector::default();
        let t0 = Instant::now();
        assert_eq!(d.failure(&policy, t0, false, || true), None);
        d.success();
        assert_eq!(d.failure(&policy, t0, false, || true), None);
        assert_eq!(d.failure(&policy, t0, false, || true), None);
        let until = d.failure(&policy, t0, false, || true);
        assert_eq!(until, Some(t0 + Duration::from_secs(5)));
        assert_eq!(d.poll(t0 + Duration::from_secs(4)), (until, false));
        // Failures while ejected (calls already under way) change nothing.
        assert_eq!(d.failure(&policy, t0, false, || true), None);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(d.poll(t1), (None, true));
        // Probation: one failure ejects again, for twice as long.
        assert_eq!(
            d.failure(&policy, t1, false, || true),
            Some(t1 + Duration::from_secs(10))
        );
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(d.poll(t2), (None, true));
        d.success();
        assert_eq!(d.failure(&policy, t2, false, || true), None);
        // A refused connection ejects at once.
        let mut fresh = Detector::default();
        assert!(fresh.failure(&policy, t2, true, || true).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_is_capped_and_consent_is_required() {
        let policy = Policy {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(100),
            max_ejection: Duration::from_secs(300),
        };
        let mut d = Detector::default();
        let mut now = Instant::now();
        assert_eq!(d.failure(&policy, now, false, || false), None);
        for want in [100, 200, 300, 300] {
            let until = d.failure(&policy, now, false, || true);
            assert_eq!(until, Some(now + Duration::from_secs(want)));
            now += Duration::from_secs(want);
            assert_eq!(d.poll(now), (None, true));
        }
    }

    #[test]
    fn the_last_endpoint_is_never_ejected() {
        let pool = Pool::default();
        pool.endpoints.store(3, Ordering::SeqCst);
        assert!(pool.try_eject());
        assert!(pool.try_eject());
        assert!(!pool.try_eject());
        pool.release();
        assert!(pool.try_eject());
    }
}
