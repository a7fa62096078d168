//! The balancer behind every mesh channel: power-of-two-choices over the
//! ready endpoints, as `tower::balance::p2c::Balance` (whose structure this
//! follows, on the same `tower::ready_cache::ReadyCache`), plus **session
//! affinity**: a call carrying an [`AFFINITY_HEADER`] goes to the ready
//! endpoint with the highest rendezvous score for that key (Thaler & Ravishankar,
//! "Using Name-Based Mappings to Increase Hit Rates", 1998), so the turns of
//! one conversation reach the generation replica that holds its prefix cache.
//!
//! Affinity is a preference, never a requirement: an ejected or not-ready
//! endpoint is not in the ready set, so its keys fall to their next-highest
//! endpoint, and only those keys move when endpoints come and go.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    pin::Pin,
    task::{Context, Poll, ready},
};

use futures::TryFutureExt;
use tower::{
    BoxError, Service,
    discover::{Change, Discover},
    load::Load,
    ready_cache::ReadyCache,
    util::rng::{HasherRng, Rng},
};

/// Request header whose value keys session affinity (any opaque string; the
/// gateway sends a digest of tenant and session).
pub const AFFINITY_HEADER: &str = "x-moltbot-affinity";

/// The rendezvous score of `endpoint` for `key`: SipHash-1-3 with fixed
/// keys, so every replica of a client ranks endpoints the same way.
pub fn score<K: Hash>(endpoint: &K, key: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    endpoint.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

/// Power of two choices with session affinity over a [`Discover`] stream.
pub struct AffinityBalance<D: Discover>
where
    D::Key: Hash,
{
    discover: D,
    services: ReadyCache<D::Key, D::Service, http::Request<tonic::body::Body>>,
    ready_index: Option<usize>,
    rng: HasherRng,
}

impl<D> AffinityBalance<D>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone,
    D::Error: Into<BoxError>,
    D::Service: Service<http::Request<tonic::body::Body>> + Load,
    <D::Service as Load>::Metric: PartialOrd,
    <D::Service as Service<http::Request<tonic::body::Body>>>::Error: Into<BoxError>,
{
    /// A balancer over `discover`'s endpoints.
    pub fn new(discover: D) -> Self {
        Self {
            discover,
            services: ReadyCache::default(),
            ready_index: None,
            rng: HasherRng::default(),
        }
    }

    fn update_from_discover(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            match ready!(Pin::new(&mut self.discover).poll_discover(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(e.into())),
                Some(Ok(Change::Remove(key))) => {
                    self.services.evict(&key);
                }
                Some(Ok(Change::Insert(key, svc))) => {
                    self.services.push(key, svc);
                }
            }
        }
    }

    fn promote_pending(&mut self, cx: &mut Context<'_>) {
        loop {
            match self.services.poll_pending(cx) {
                Poll::Ready(Ok(())) | Poll::Pending => break,
                Poll::Ready(Err(error)) => {
                    tracing::debug!(%error, "dropping failed endpoint");
                }
            }
        }
    }

    fn load(&self, index: usize) -> Option<<D::Service as Load>::Metric> {
        self.services.get_ready_index(index).map(|(_, s)| s.load())
    }

    fn p2c_index(&mut self) -> Option<usize> {
        match self.services.ready_len() {
            0 => None,
            1 => Some(0),
            len => {
                let len = len as u64;
                let a = self.rng.next_range(0..len);
                let mut b = self.rng.next_range(0..len - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (a as usize, b as usize);
                Some(if self.load(a) <= self.load(b) { a } else { b })
            }
        }
    }

    /// The ready endpoint with the highest score for `key`.
    fn affinity_index(&self, key: &[u8]) -> Option<usize> {
        (0..self.services.ready_len()).max_by_key(|&i| {
            self.services
                .get_ready_index(i)
                .map_or(0, |(k, _)| score(k, key))
        })
    }
}

impl<D> Service<http::Request<tonic::body::Body>> for AffinityBalance<D>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone,
    D::Error: Into<BoxError>,
    D::Service: Service<http::Request<tonic::body::Body>> + Load,
    <D::Service as Load>::Metric: PartialOrd,
    <D::Service as Service<http::Request<tonic::body::Body>>>::Error: Into<BoxError>,
{
    type Response = <D::Service as Service<http::Request<tonic::body::Body>>>::Response;
    type Error = BoxError;
    type Future = futures::future::MapErr<
        <D::Service as Service<http::Request<tonic::body::Body>>>::Future,
        fn(<D::Service as Service<http::Request<tonic::body::Body>>>::Error) -> BoxError,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if let Poll::Ready(Err(e)) = self.update_from_discover(cx) {
            return Poll::Ready(Err(e));
        }
        self.promote_pending(cx);
        loop {
            if let Some(index) = self.ready_index.take()
                && let Ok(true) = self.services.check_ready_index(cx, index)
            {
                self.ready_index = Some(index);
                return Poll::Ready(Ok(()));
            }
            self.ready_index = self.p2c_index();
            if self.ready_index.is_none() {
                return Poll::Pending;
            }
        }
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        // Every member of the ready set was polled ready; the p2c choice was
        // re-checked just now. An affinity key overrides it.
        let index = request
            .headers()
            .get(AFFINITY_HEADER)
            .and_then(|key| self.affinity_index(key.as_bytes()))
            .or(self.ready_index.take())
            .unwrap_or(0);
        self.ready_index = None;
        self.services
            .call_ready_index(index, request)
            .map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::score;

    #[test]
    fn rendezvous_moves_only_the_keys_of_a_removed_endpoint() {
        let endpoints = ["10.0.0.1:50052", "10.0.0.2:50052", "10.0.0.3:50052"];
        fn pick(set: &[&'static str], key: &str) -> &'static str {
            set.iter()
                .copied()
                .max_by_key(|e| score(e, key.as_bytes()))
                .unwrap_or_default()
        }
        let keys: Vec<String> = (0..300).map(|i| format!("session-{i}")).collect();
        let mut per = [0; 3];
        for k in &keys {
            let e = pick(&endpoints, k);
            per[endpoints.iter().position(|x| *x == e).unwrap_or(0)] += 1;
            // Stable: the same key always picks the same endpoint.
            assert_eq!(pick(&endpoints, k), e);
            // Removing another endpoint never moves this key.
            for gone in endpoints.iter().filter(|g| **g != e) {
                let rest: Vec<&str> = endpoints.iter().copied().filter(|x| x != gone).collect();
                assert_eq!(pick(&rest, k), e);
            }
        }
        // Spread: each endpoint gets a fair share of 300 keys.
        assert!(per.iter().all(|&n| n > 60), "{per:?}");
    }
}
