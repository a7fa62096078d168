//! gRPC plumbing shared by every service: the server with health, reflection,
//! per-RPC spans and metrics and graceful shutdown ([`serve`]), traced
//! client channels ([`client`]), admin-RPC authorisation ([`admin`]) and
//! in-process servers on ephemeral ports for tests and benchmarks
//! ([`LocalServer`]), client-side load balancing over every endpoint of
//! an upstream ([`balance`]), TLS on the mesh's hops ([`tls`]), the authorisation
//! of every call by the caller's certificate ([`authz`]) and the dev CA
//! that issues those certificates on one machine ([`pki`]).

pub mod admin;
pub mod authz;
pub mod balance;
pub mod client;
mod health;
mod local;
mod observe;
pub mod pki;
mod server;
mod status;
pub mod tls;

pub use local::LocalServer;
pub use observe::{Observe, ObserveLayer, ObservedBody};
pub use server::{GrpcService, ServiceSpec, serve, serve_with_listener};
pub use status::code_name;

/// Splits a gRPC request path `/pkg.Service/Method` into (service, method);
/// anything else gives `("unknown", path)`.
pub(crate) fn rpc_name(path: &str) -> (String, String) {
    let trimmed = path.trim_start_matches('/');
    match trimmed.split_once('/') {
        Some((service, method)) if !service.is_empty() && !method.is_empty() => {
            (service.to_owned(), method.to_owned())
        }
        _ => ("unknown".to_owned(), trimmed.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rpc_names_split() {
        assert_eq!(
            super::rpc_name("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health".into(), "Check".into())
        );
        assert_eq!(super::rpc_name("/x"), ("unknown".into(), "x".into()));
    }
}
