//! `grpc.health.v1.Health` that lets graceful shutdown finish.
//!
//! tonic-health's `Watch` streams never end on their own, so one open watcher
//! would hold a draining server open for the whole grace period. This wrapper
//! delegates to tonic-health and ends every `Watch` stream once draining
//! starts, after the NOT_SERVING update already queued has been delivered.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::{
    pb::{HealthCheckRequest, HealthCheckResponse, health_server::Health},
    server::{HealthReporter, HealthService},
};

/// Health service whose watch streams end when the drain flag is raised.
pub struct DrainingHealth {
    inner: HealthService,
    draining: watch::Receiver<bool>,
}

impl DrainingHealth {
    /// Serves the statuses set through `reporter`; watch streams end once
    /// `draining` turns true.
    pub fn new(reporter: HealthReporter, draining: watch::Receiver<bool>) -> Self {
        Self {
            inner: HealthService::from_health_reporter(reporter),
            draining,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let inner = self.inner.watch(request).await?.into_inner();
        let draining = self.draining.clone();
        let stream = futures::stream::unfold(
            (Box::pin(inner), draining),
            |(mut inner, mut draining)| async move {
                let item = tokio::select! {
                    // Updates first: the NOT_SERVING sent at drain reaches the watcher.
                    biased;
                    item = inner.next() => item,
                    _ = draining.wait_for(|d| *d) => None,
                };
                item.map(|item| (item, (inner, draining)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}
