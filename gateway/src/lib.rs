//! `moltbot-gateway`: the HTTP edge of the mesh.
//!
//! Serves the OpenAI-compatible API (`POST /v1/chat/completions`,
//! `POST /v1/responses`, `POST /v1/embeddings`, `GET /v1/models`) plus
//! `/healthz` (process alive), `/readyz` (required upstreams SERVING) and
//! `/metrics`. Every request gets an OpenTelemetry server span (joining the
//! caller's `traceparent` when there is one) that parents the gRPC client
//! spans of its upstream calls.
//!
//! The layers, each importing only those below it (docs/architecture.md,
//! "Inside the gateway"):
//!
//! - [`http`]: routes, middleware and the handlers that format answers;
//! - [`adapters`]: wire formats validated into a neutral turn request;
//! - [`edge`]: API keys, tenants, rate limits, admission;
//! - [`turn`]: the turn engine, its ports and its call policy;
//! - [`cache`]: the response cache the turn engine looks answers up in;
//! - [`rollout`]: live rollouts splitting a route's sessions between its
//!   models and a canary;
//! - [`upstream`]: the gRPC clients implementing the ports;
//! - [`routing`], [`openai`]: configuration and wire types;
//! - [`reload`]: the configuration file reloaded in place (on change and
//!   SIGHUP).
//!
//! [`serve`] is the composition root (`compose.rs`).

pub mod adapters;
pub mod cache;
mod compose;
mod config;
pub mod edge;
mod error;
pub mod http;
pub mod openai;
pub mod reload;
pub mod rollout;
pub mod routing;
pub mod spend;
pub mod turn;
pub mod upstream;

pub use compose::serve;
pub use config::Args;
pub use error::{ApiError, GatewayError};
pub use upstream::{Upstream, UpstreamHealth, Upstreams};
