//! Authorisation of admin RPCs (credential writes, model reloads): the
//! caller sends `authorization: Bearer <admin token>`, compared with the
//! configured token in constant time so its bytes cannot be found by timing.

use tonic::Request;

/// Why an admin call is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminDenied {
    /// No `authorization: Bearer …` header (gRPC UNAUTHENTICATED).
    MissingToken,
    /// A token that does not match (gRPC PERMISSION_DENIED).
    WrongToken,
}

/// Why [`authorise`] refuses an admin RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The service has a token and the call's bearer token is missing or
    /// wrong.
    Bearer(AdminDenied),
    /// The service has no admin token and the caller is not on loopback
    /// (gRPC PERMISSION_DENIED).
    NotLoopback,
}

/// The check of an admin RPC: admitted on the operator's certificate
/// (mutual TLS), else on `authorization: Bearer <token>` when the service
/// has a `token`, else — no token configured — from a loopback caller
/// only. Errors with [`Refused`].
pub fn authorise<T>(request: &Request<T>, token: Option<&str>) -> Result<(), Refused> {
    if from_operator(request) {
        return Ok(());
    }
    match token {
        Some(expected) => check_bearer(request, expected).map_err(Refused::Bearer),
        None if from_loopback(request) => Ok(()),
        None => Err(Refused::NotLoopback),
    }
}

/// The admin token as configured, with an empty value (`MOLTBOT_ADMIN_TOKEN=`,
/// as compose files write an unset variable) read as no token: an empty
/// token would admit anyone sending `Bearer ` with nothing after it.
pub fn configured(token: Option<String>) -> Option<String> {
    token.filter(|t| !t.trim().is_empty())
}

/// Whether `request` carries `expected` as its bearer token. Errors with
/// [`AdminDenied::MissingToken`] or [`AdminDenied::WrongToken`].
pub fn check_bearer<T>(request: &Request<T>, expected: &str) -> Result<(), AdminDenied> {
    check_authorization(
        request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        expected,
    )
}

/// Whether an `authorization` header value is `Bearer <expected>`. Errors
/// with [`AdminDenied::MissingToken`] (no header, or not a bearer token) or
/// [`AdminDenied::WrongToken`].
pub fn check_authorization(authorization: Option<&str>, expected: &str) -> Result<(), AdminDenied> {
    let given = authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(AdminDenied::MissingToken)?;
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(AdminDenied::WrongToken)
    }
}

/// Byte equality whose time depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the authorisation layer admitted `request` on the operator
/// certificate (mutual TLS): admin handlers then need no bearer token.
pub fn from_operator<T>(request: &Request<T>) -> bool {
    request
        .extensions()
        .get::<super::authz::Caller>()
        .is_some_and(|c| {
            c.0 == super::authz::Identity::Principal(super::authz::Principal::Operator)
        })
}

/// Whether `request` came over a loopback socket (false when unknown).
pub fn from_loopback<T>(request: &Request<T>) -> bool {
    request.remote_addr().is_some_and(|a| a.ip().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked() {
        let mut r = Request::new(());
        assert_eq!(check_bearer(&r, "s3cret"), Err(AdminDenied::MissingToken));
        r.metadata_mut()
            .insert("authorization", "Bearer s3cre7".parse().unwrap());
        assert_eq!(check_bearer(&r, "s3cret"), Err(AdminDenied::WrongToken));
        r.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        assert_eq!(check_bearer(&r, "s3cret"), Ok(()));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!from_loopback(&r));
        assert_eq!(configured(Some(" ".into())), None);
        assert_eq!(configured(Some("t".into())), Some("t".into()));
    }
}
