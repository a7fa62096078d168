//! The tower layer that applies [`super::decide`] to every call before
//! tonic routes it: a refused call never reaches a handler, and an admitted
//! one carries its [`Caller`] in the request extensions.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use super::{Bearer, Identity, decide, identity};
use crate::grpc::admin::{AdminDenied, check_authorization};

/// The identity an admitted call was made with (request extension; read
/// it with `request.extensions().get::<Caller>()`).
#[derive(Debug, Clone)]
pub struct Caller(pub Identity);

/// Layer producing [`Authz`].
#[derive(Debug, Clone, Default)]
pub struct AuthzLayer {
    enforce: bool,
    admin_token: Option<Arc<str>>,
}

impl AuthzLayer {
    /// Enforcing the table (mutual TLS is on) with `admin_token` accepted
    /// for operator rules.
    pub fn enforcing(admin_token: Option<Arc<str>>) -> Self {
        Self {
            enforce: true,
            admin_token,
        }
    }

    /// Letting every call through: no caller can be identified (no client
    /// CA). The server logs this at start-up.
    pub fn off() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            config: self.clone(),
        }
    }
}

/// Service checking each call against the authorisation table.
#[derive(Debug, Clone)]
pub struct Authz<S> {
    inner: S,
    config: AuthzLayer,
}

fn bearer<B>(req: &http::Request<B>, admin_token: Option<&str>) -> Bearer {
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // Without an admin token of its own the service accepts none: any
    // bearer token it is sent is wrong.
    match check_authorization(header, admin_token.unwrap_or_default()) {
        Err(AdminDenied::MissingToken) => Bearer::Absent,
        Ok(()) if admin_token.is_some() => Bearer::Admin,
        _ => Bearer::Wrong,
    }
}

impl<S, B, ResBody> Service<http::Request<B>> for Authz<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if !self.config.enforce {
            return Either::Right(self.inner.call(req));
        }
        let identity = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .map(|chain| identity::from_chain(&chain))
            .unwrap_or(Identity::Anonymous);
        let bearer = bearer(&req, self.config.admin_token.as_deref());
        match decide(req.uri().path(), &identity, bearer) {
            Ok(()) => {
                req.extensions_mut().insert(Caller(identity));
                Either::Right(self.inner.call(req))
            }
            Err(refusal) => {
                tracing::info!(
                    rpc = req.uri().path(),
                    caller = %identity,
                    ?refusal,
                    "call refused by the authorisation table"
                );
                Either::Left(ready(Ok(tonic::Status::from(refusal).into_http())))
            }
        }
    }
}
