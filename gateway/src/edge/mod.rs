//! Edge protection: client API keys (stored as SHA-256 hashes, compared in
//! constant time), tenants, per-key rate limits and concurrency caps, the
//! anonymous-on-loopback rule, and admission control ([`admission`]).

pub mod admission;
pub mod metrics;
pub mod operator;
pub mod ratelimit;

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use axum::{
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
};
use sha2::{Digest, Sha256};

use crate::{ApiError, GatewayError, routing::GatewayConfig};
use ratelimit::RateLimiter;

/// Who is calling, put in the request's extensions by [`authenticate`].
#[derive(Debug, Clone)]
pub struct Caller {
    /// Key name, or `anonymous`.
    pub name: Arc<str>,
    /// The tenant whose sessions this caller reads and writes: the key's
    /// `tenant` (default its name); anonymous loopback callers share the
    /// gateway's `MOLTBOT_TENANT` (default `local`).
    pub tenant: Arc<str>,
    /// The caller's limits.
    pub limiter: Arc<RateLimiter>,
    /// Permits for the caller's concurrent requests.
    pub concurrency: Arc<tokio::sync::Semaphore>,
}

fn concurrency(limits: &crate::routing::config::Limits) -> Arc<tokio::sync::Semaphore> {
    let n = limits
        .max_concurrent_requests
        .unwrap_or(crate::routing::config::DEFAULT_MAX_CONCURRENT);
    Arc::new(tokio::sync::Semaphore::new(n as usize))
}

/// The configured keys.
#[derive(Debug)]
pub struct KeyRing {
    by_hash: HashMap<[u8; 32], Caller>,
    anonymous: Option<Caller>,
    /// Each caller's limits as configured, by key hash (`None`: anonymous),
    /// so that [`KeyRing::rebuild`] can tell an unchanged key.
    limits: HashMap<Option<[u8; 32]>, crate::routing::config::Limits>,
}

fn decode_hex(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

impl KeyRing {
    /// Builds the ring. Anonymous access is allowed only when the config
    /// allows it and `http_addr` is a loopback address; a non-loopback gateway
    /// with no keys is refused with [`GatewayError::Config`] saying what to add.
    ///
    /// With `shared`, each caller's rate-limit buckets live in Redis
    /// ([`ratelimit::shared`]) under the key's name, shared by every gateway.
    pub fn new(
        config: &GatewayConfig,
        http_addr: SocketAddr,
        anonymous_tenant: &str,
        shared: Option<Arc<ratelimit::shared::SharedBuckets>>,
    ) -> Result<Self, GatewayError> {
        Self::build(config, http_addr, anonymous_tenant, shared, None)
    }

    /// The ring of a reloaded `config` ([`crate::reload`]): as
    /// [`KeyRing::new`], except that a caller whose key hash, tenant and
    /// limits are unchanged keeps this ring's rate-limit buckets and
    /// concurrency permits (a reload neither refills nor empties them).
    /// Errors as [`KeyRing::new`].
    pub fn rebuild(
        &self,
        config: &GatewayConfig,
        http_addr: SocketAddr,
        anonymous_tenant: &str,
        shared: Option<Arc<ratelimit::shared::SharedBuckets>>,
    ) -> Result<Self, GatewayError> {
        Self::build(config, http_addr, anonymous_tenant, shared, Some(self))
    }

    /// The previous ring's caller under `hash` when it is unchanged.
    fn kept(
        previous: Option<&Self>,
        hash: Option<[u8; 32]>,
        tenant: &str,
        limits: &crate::routing::config::Limits,
    ) -> Option<Caller> {
        let previous = previous?;
        let caller = match hash {
            Some(h) => previous.by_hash.get(&h)?,
            None => previous.anonymous.as_ref()?,
        };
        (previous.limits.get(&hash) == Some(limits) && &*caller.tenant == tenant)
            .then(|| caller.clone())
    }

    fn build(
        config: &GatewayConfig,
        http_addr: SocketAddr,
        anonymous_tenant: &str,
        shared: Option<Arc<ratelimit::shared::SharedBuckets>>,
        previous: Option<&Self>,
    ) -> Result<Self, GatewayError> {
        let limiter = |limits: &crate::routing::config::Limits, name: &str| {
            Arc::new(match &shared {
                Some(buckets) => RateLimiter::shared(limits, name, buckets.clone()),
                None => RateLimiter::new(limits),
            })
        };
        let mut by_hash = HashMap::new();
        let mut limits = HashMap::new();
        for k in &config.api_keys {
            let hash = decode_hex(&k.sha256).ok_or_else(|| {
                GatewayError::Config(moltbot_runtime::RuntimeError::Config(format!(
                    "api key `{}`: sha256 is not 64 hex digits",
                    k.name
                )))
            })?;
            let tenant = k.tenant.as_deref().unwrap_or(k.name.as_str());
            let caller = match Self::kept(previous, Some(hash), tenant, &k.limits) {
                Some(kept) => Caller {
                    name: Arc::from(k.name.as_str()),
                    ..kept
                },
                None => Caller {
                    name: Arc::from(k.name.as_str()),
                    tenant: Arc::from(tenant),
                    limiter: limiter(&k.limits, &k.name),
                    concurrency: concurrency(&k.limits),
                },
            };
            by_hash.insert(hash, caller);
            limits.insert(Some(hash), k.limits);
        }
        let loopback = http_addr.ip().is_loopback();
        let anonymous = (config.allow_anonymous && loopback).then(|| {
            limits.insert(None, config.anonymous_limits);
            Self::kept(previous, None, anonymous_tenant, &config.anonymous_limits).unwrap_or_else(
                || Caller {
                    name: Arc::from("anonymous"),
                    tenant: Arc::from(anonymous_tenant),
                    limiter: limiter(&config.anonymous_limits, "anonymous"),
                    concurrency: concurrency(&config.anonymous_limits),
                },
            )
        });
        if anonymous.is_none() && by_hash.is_empty() {
            return Err(GatewayError::Config(moltbot_runtime::RuntimeError::Config(
                format!(
                    "the gateway listens on {http_addr}, which is not loopback, and no api_keys are configured: \
                 add api_keys to MOLTBOT_GATEWAY_CONFIG (sha256 of each key) or bind MOLTBOT_HTTP_ADDR to 127.0.0.1"
                ),
            )));
        }
        Ok(Self {
            by_hash,
            anonymous,
            limits,
        })
    }

    /// The caller of a request with this `Authorization` header value.
    ///
    /// Errors with [`ApiError::Unauthorized`] for a key that is not configured
    /// (when keys are configured at all) or a missing key when anonymous access
    /// is off. With no keys configured, any presented key is ignored (SDKs
    /// always send one).
    pub fn identify(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let bearer = authorization.and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .map(str::trim)
        });
        match (bearer, &self.anonymous) {
            (Some(key), anonymous) if !key.is_empty() => {
                if self.by_hash.is_empty()
                    && let Some(anon) = anonymous
                {
                    return Ok(anon.clone());
                }
                let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
                // Constant-time comparison against every stored hash, so the
                // time taken does not tell which prefix matched.
                let mut found = None;
                for (stored, caller) in &self.by_hash {
                    if moltbot_runtime::grpc::admin::constant_time_eq(stored, &hash) {
                        found = Some(caller.clone());
                    }
                }
                found.ok_or(ApiError::Unauthorized("invalid API key"))
            }
            (_, Some(anon)) => Ok(anon.clone()),
            (_, None) => Err(ApiError::Unauthorized(
                "missing API key: send Authorization: Bearer <key>",
            )),
        }
    }
}

/// Middleware of the `/v1` routes: identifies the caller, applies its request
/// rate limit and concurrency cap (429 beyond either; the permit is held
/// until the response body ends), and stores the [`Caller`] in the
/// request's extensions.
pub async fn authenticate(
    State(keys): State<Arc<crate::reload::Live<KeyRing>>>,
    mut request: Request,
    next: Next,
) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // The ring in force now; a reload during the request does not change
    // the caller it identified.
    let caller = match keys.get().identify(authorization) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = caller.limiter.admit().await {
        tracing::info!(caller = %caller.name, "rate limited");
        return e.into_response();
    }
    let Ok(permit) = caller.concurrency.clone().try_acquire_owned() else {
        tracing::info!(caller = %caller.name, "too many concurrent requests");
        return ApiError::RateLimited {
            limit: "concurrent requests",
            retry_after: std::time::Duration::from_secs(1),
        }
        .into_response();
    };
    request.extensions_mut().insert(caller);
    admission::hold(next.run(request).await, permit)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(keys: &str) -> GatewayConfig {
        serde_yaml_ng::from_str(&format!(
            "routes: [{{ name: x, candidates: [{{model: a}}] }}]\n{keys}"
        ))
        .unwrap()
    }

    #[test]
    fn keys_are_checked_by_hash() {
        // sha256("test")
        let c = config(
            "api_keys: [{name: app, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08}]",
        );
        let ring = KeyRing::new(&c, "127.0.0.1:0".parse().unwrap(), "local", None).unwrap();
        assert_eq!(&*ring.identify(Some("Bearer test")).unwrap().name, "app");
        // A key without a tenant is its own tenant; anonymous is `local`.
        assert_eq!(&*ring.identify(Some("Bearer test")).unwrap().tenant, "app");
        assert_eq!(&*ring.identify(None).unwrap().tenant, "local");
        assert!(ring.identify(Some("Bearer wrong")).is_err());
        assert_eq!(&*ring.identify(None).unwrap().name, "anonymous");

        let public = KeyRing::new(&c, "0.0.0.0:8080".parse().unwrap(), "local", None).unwrap();
        assert!(public.identify(None).is_err());
        assert!(public.identify(Some("Bearer test")).is_ok());
    }

    #[test]
    fn no_keys_off_loopback_refuses_to_start() {
        let c = config("");
        let err = KeyRing::new(&c, "0.0.0.0:8080".parse().unwrap(), "local", None).unwrap_err();
        assert!(err.to_string().contains("api_keys"), "{err}");
        let ring = KeyRing::new(&c, "127.0.0.1:8080".parse().unwrap(), "local", None).unwrap();
        // SDKs always send a key; with none configured it is ignored.
        assert!(ring.identify(Some("Bearer sk-anything")).is_ok());
    }

    #[tokio::test]
    async fn concurrent_requests_per_key_are_capped_until_the_body_ends() {
        use tower::ServiceExt;
        // sha256("test")
        let c = config(
            "api_keys: [{name: app, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08, max_concurrent_requests: 1}]",
        );
        let ring = Arc::new(crate::reload::Live::new(
            KeyRing::new(&c, "127.0.0.1:0".parse().unwrap(), "local", None).unwrap(),
        ));
        let app = axum::Router::new()
            .route("/x", axum::routing::get(|| async { "ok" }))
            .route_layer(axum::middleware::from_fn_with_state(ring, authenticate));
        let request = || {
            axum::http::Request::builder()
                .uri("/x")
                .header("authorization", "Bearer test")
                .body(axum::body::Body::empty())
                .unwrap()
        };
        // The first response's body is not sent yet: its permit is held.
        let first = app.clone().oneshot(request()).await.unwrap();
        assert_eq!(first.status(), 200);
        let second = app.clone().oneshot(request()).await.unwrap();
        assert_eq!(second.status(), 429);
        drop(first);
        let third = app.clone().oneshot(request()).await.unwrap();
        assert_eq!(third.status(), 200);
    }

    #[tokio::test]
    async fn a_rebuild_keeps_the_state_of_unchanged_keys_only() {
        // sha256("test") and sha256("other")
        let test = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let other = "d9298a10d1b0735837dc4bd85dac641b0f3cef27a47e5d53a54f2f3f5b2fcffa";
        let addr = "127.0.0.1:0".parse().unwrap();
        let before = config(&format!(
            "api_keys: [{{name: a, tenant: t, sha256: {test}, max_concurrent_requests: 1}}, {{name: b, sha256: {other}, max_concurrent_requests: 1}}]"
        ));
        let ring = KeyRing::new(&before, addr, "local", None).unwrap();
        let held_a = ring
            .identify(Some("Bearer test"))
            .unwrap()
            .concurrency
            .try_acquire_owned()
            .unwrap();
        let held_b = ring
            .identify(Some("Bearer other"))
            .unwrap()
            .concurrency
            .try_acquire_owned()
            .unwrap();
        // `a` unchanged (renamed only; same tenant and limits), `b` gets
        // another limit.
        let after = config(&format!(
            "api_keys: [{{name: a2, tenant: t, sha256: {test}, max_concurrent_requests: 1}}, {{name: b, sha256: {other}, max_concurrent_requests: 2}}]"
        ));
        let next = ring.rebuild(&after, addr, "local", None).unwrap();
        let a = next.identify(Some("Bearer test")).unwrap();
        assert_eq!(&*a.name, "a2");
        assert!(
            a.concurrency.try_acquire_owned().is_err(),
            "a's permit is still held"
        );
        let b = next.identify(Some("Bearer other")).unwrap();
        assert_eq!(b.concurrency.available_permits(), 2, "b starts afresh");
        drop((held_a, held_b));
        // A key removed by the reload is refused.
        let fewer = config(&format!("api_keys: [{{name: b, sha256: {other}}}]"));
        let last = next.rebuild(&fewer, addr, "local", None).unwrap();
        assert!(last.identify(Some("Bearer test")).is_err());
    }
}
