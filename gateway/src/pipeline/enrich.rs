//! The enrichments of a turn: intent from understanding and passages from
//! retrieval. Each runs under its own deadline; a failure or a timeout is
//! returned as `Err(reason)` so the turn goes on degraded instead of failing.

use std::time::Duration;

use moltbot_proto::{
    retrieval::v1::{
        SearchRequest, retrieval_service_client::RetrievalServiceClient, search_request,
    },
    understanding::v1::{
        ClassifyRequest, understanding_service_client::UnderstandingServiceClient,
    },
};
use moltbot_runtime::grpc::client::TracedChannel;

use crate::{
    openai::{IntentInfo, Source},
    routing::config::RetrievalConfig,
};

/// Runs `call` within `timeout` (sent as the gRPC deadline of each attempt
/// too), retrying a transient failure on another replica
/// ([`super::retry::idempotent`]), turning a timeout and a status into a
/// short reason.
async fn bounded<T, F, Fut>(timeout: Duration, mut call: F) -> Result<T, String>
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let attempts = super::retry::idempotent(deadline, &mut call);
    match tokio::time::timeout(timeout, attempts).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// Classifies `text`. Errors with a reason when understanding fails, has no
/// trained model, or misses `timeout`.
pub async fn classify(
    channel: TracedChannel,
    text: &str,
    timeout: Duration,
) -> Result<IntentInfo, String> {
    let response = bounded(timeout, |left| {
        let mut request = tonic::Request::new(ClassifyRequest {
            text: text.to_owned(),
            top_k: 0,
        });
        request.set_timeout(left);
        let mut client = UnderstandingServiceClient::new(channel.clone());
        async move { client.classify(request).await }
    })
    .await?;
    let c = response
        .classification
        .ok_or_else(|| "understanding answered without a classification".to_owned())?;
    let domain = c.domain.unwrap_or_default();
    let intent = c.intent.unwrap_or_default();
    Ok(IntentInfo {
        domain: domain.name,
        name: intent.name,
        confidence: intent.confidence,
        out_of_scope: c.out_of_scope,
    })
}

/// Searches `config.collection` for `text`. Errors with a reason when
/// retrieval fails, the collection does not exist, or `timeout` passes.
pub async fn retrieve(
    channel: TracedChannel,
    config: &RetrievalConfig,
    text: &str,
    timeout: Duration,
) -> Result<Vec<Source>, String> {
    let response = bounded(timeout, |left| {
        let mut request = tonic::Request::new(SearchRequest {
            collection: config.collection.clone(),
            query: Some(search_request::Query::Text(text.to_owned())),
            top_k: config.top_k,
            filter: Default::default(),
            min_score: config.min_score,
            exact: false,
        });
        request.set_timeout(left);
        let mut client = RetrievalServiceClient::new(channel.clone());
        async move { client.search(request).await }
    })
    .await?;
    Ok(response
        .hits
        .into_iter()
        .map(|h| Source {
            id: format!("{}:{}", config.collection, h.chunk_id),
            score: h.score,
            text: h.text,
        })
        .collect())
}
