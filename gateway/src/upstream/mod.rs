//! The gateway's gRPC upstreams: their channels, their health (`/readyz`)
//! and the typed clients that implement the turn engine's ports ([`grpc`]);
//! and its one way to Redis ([`redis`]).

pub mod grpc;
pub mod redis;

use std::time::Duration;

use moltbot_runtime::{
    config::parse_upstream_url,
    grpc::client::{self, TracedChannel},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{Args, GatewayError};

/// One upstream service.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Short name, e.g. `context`; used in `/readyz` and `degraded`.
    pub name: &'static str,
    /// Full gRPC service name checked with `grpc.health.v1.Health/Check`.
    pub service: &'static str,
    /// Whether a chat turn needs it (context, generation) or only uses it as an
    /// enrichment.
    pub required: bool,
    /// Traced, lazily connecting channel.
    pub channel: TracedChannel,
}

/// Health of one upstream as `/readyz` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamHealth {
    /// Short name.
    pub name: &'static str,
    /// Whether readiness depends on it.
    pub required: bool,
    /// `SERVING`, `NOT_SERVING`, `UNKNOWN`, `SERVICE_UNKNOWN` or
    /// `UNREACHABLE`.
    pub status: &'static str,
    /// Why it is not serving, when known (transport error, deadline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl UpstreamHealth {
    /// True when the upstream reported SERVING.
    pub fn serving(&self) -> bool {
        self.status == "SERVING"
    }
}

/// The five upstreams of the mesh.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// Every upstream, required ones first, for health checks.
    pub all: Vec<Upstream>,
    /// The context service.
    pub context: grpc::Context,
    /// The generation service.
    pub generation: grpc::GenerationClient,
    /// The understanding service.
    pub understanding: grpc::UnderstandingClient,
    /// The retrieval service.
    pub retrieval: grpc::RetrievalClient,
}

impl Upstreams {
    /// Validates the URLs in `args` and opens lazy channels. Errors with
    /// [`GatewayError::Config`] naming the variable whose URL is invalid.
    pub fn connect(args: &Args) -> Result<Self, GatewayError> {
        let spec: [(&'static str, &'static str, &'static str, bool, &str); 5] = [
            (
                "context",
                "moltbot.context.v1.ContextService",
                "MOLTBOT_CONTEXT_URL",
                true,
                &args.context_url,
            ),
            (
                "generation",
                "moltbot.generation.v1.GenerationService",
                "MOLTBOT_GENERATION_URL",
                true,
                &args.generation_url,
            ),
            (
                "understanding",
                "moltbot.understanding.v1.UnderstandingService",
                "MOLTBOT_UNDERSTANDING_URL",
                false,
                &args.understanding_url,
            ),
            (
                "retrieval",
                "moltbot.retrieval.v1.RetrievalService",
                "MOLTBOT_RETRIEVAL_URL",
                false,
                &args.retrieval_url,
            ),
            (
                "auth-rotation",
                "moltbot.auth.v1.AuthRotationService",
                "MOLTBOT_AUTH_URL",
                false,
                &args.auth_url,
            ),
        ];
        let mut all = Vec::with_capacity(spec.len());
        for (name, service, var, required, url) in spec {
            let url = parse_upstream_url(var, url)?;
            all.push(Upstream {
                name,
                service,
                required,
                channel: client::channel(&url)?,
            });
        }
        let [context, generation, understanding, retrieval] =
            [0, 1, 2, 3].map(|i| all[i].channel.clone());
        Ok(Self {
            context: grpc::Context(context),
            generation: grpc::GenerationClient(generation),
            understanding: grpc::UnderstandingClient(understanding),
            retrieval: grpc::RetrievalClient(retrieval),
            all,
        })
    }

    /// The turn engine's ports over these upstreams.
    pub fn ports(&self) -> crate::turn::Ports {
        crate::turn::Ports {
            sessions: std::sync::Arc::new(self.context.clone()),
            understanding: std::sync::Arc::new(self.understanding.clone()),
            retrieval: std::sync::Arc::new(self.retrieval.clone()),
            generation: std::sync::Arc::new(self.generation.clone()),
        }
    }

    /// Checks every upstream concurrently, each within `timeout`.
    pub async fn health(&self, timeout: Duration) -> Vec<UpstreamHealth> {
        futures::future::join_all(self.all.iter().map(|u| u.health(timeout))).await
    }
}

impl Upstream {
    /// Asks the upstream's `grpc.health.v1.Health/Check` for its own service
    /// name, within `timeout` (sent as the gRPC deadline too).
    pub async fn health(&self, timeout: Duration) -> UpstreamHealth {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: self.service.to_owned(),
        });
        request.set_timeout(timeout);
        let mut client = HealthClient::new(self.channel.clone());
        let (status, error) = match tokio::time::timeout(timeout, client.check(request)).await {
            Ok(Ok(response)) => (status_name(response.into_inner().status()), None),
            Ok(Err(status)) => ("UNREACHABLE", Some(status.message().to_owned())),
            Err(_) => (
                "UNREACHABLE",
                Some(format!("no answer within {} ms", timeout.as_millis())),
            ),
        };
        UpstreamHealth {
            name: self.name,
            required: self.required,
            status,
            error,
        }
    }
}

fn status_name(status: ServingStatus) -> &'static str {
    match status {
        ServingStatus::Unknown => "UNKNOWN",
        ServingStatus::Serving => "SERVING",
        ServingStatus::NotServing => "NOT_SERVING",
        ServingStatus::ServiceUnknown => "SERVICE_UNKNOWN",
    }
}
