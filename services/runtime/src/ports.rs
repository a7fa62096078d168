//! The pinned service identities and default addresses (docs/architecture.md, "Pinned
//! names"). The CLI's `up`, the gateway's upstream defaults and the deploy
//! files all follow this table.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::grpc::ServiceSpec;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

const fn spec(binary: &'static str, grpc: u16, metrics: u16) -> ServiceSpec {
    ServiceSpec {
        binary,
        grpc_addr: SocketAddr::new(LOCALHOST, grpc),
        metrics_addr: SocketAddr::new(LOCALHOST, metrics),
    }
}

/// `moltbot.understanding.v1.UnderstandingService`.
pub const UNDERSTANDING: ServiceSpec = spec("moltbot-understanding", 50051, 9101);
/// `moltbot.generation.v1.GenerationService`.
pub const GENERATION: ServiceSpec = spec("moltbot-generation", 50052, 9102);
/// `moltbot.retrieval.v1.RetrievalService`.
pub const RETRIEVAL: ServiceSpec = spec("moltbot-retrieval", 50053, 9103);
/// `moltbot.context.v1.ContextService`.
pub const CONTEXT: ServiceSpec = spec("moltbot-context", 50054, 9104);
/// `moltbot.auth.v1.AuthRotationService`.
pub const AUTH_ROTATION: ServiceSpec = spec("moltbot-auth-rotation", 50055, 9105);
/// Every gRPC service, in start order for `moltbot up`.
pub const ALL: [ServiceSpec; 5] = [CONTEXT, AUTH_ROTATION, UNDERSTANDING, RETRIEVAL, GENERATION];

/// The gateway's HTTP address (`/metrics` is on the same port).
pub const GATEWAY_HTTP: SocketAddr = SocketAddr::new(LOCALHOST, 8080);
