//! The turn engine's ports ([`crate::turn::ports`]) over the mesh's gRPC
//! services: one typed client per upstream, each call one attempt with the
//! time it is given sent as its gRPC deadline. Retries, backoff and the
//! enforcement of deadlines are the call policy's (`gateway/src/turn/policy.rs`).

use std::time::Duration;

use futures::{StreamExt, future::BoxFuture};
use moltbot_proto::{
    context::v1::{self as ctx, context_service_client::ContextServiceClient},
    generation::v1::{
        CountTokensRequest, CountTokensResponse, GenerateRequest, ListModelsRequest, ModelInfo,
        generation_service_client::GenerationServiceClient,
    },
    retrieval::v1::{
        SearchRequest, VersionsRequest, retrieval_service_client::RetrievalServiceClient,
        search_request,
    },
    understanding::v1::{
        ClassifyRequest, EmbedRequest, EmbedResponse,
        understanding_service_client::UnderstandingServiceClient,
    },
};
use moltbot_runtime::grpc::client::TracedChannel;

use crate::{
    routing::config::RetrievalConfig,
    turn::{
        IntentInfo, Source,
        ports::{Broke, Call, Events, Generation, Retrieval, Sessions, Understanding},
    },
};

fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// The context service.
#[derive(Debug, Clone)]
pub struct Context(pub TracedChannel);

impl Sessions for Context {
    fn history<'a>(
        &'a self,
        tenant: &'a str,
        session: &'a str,
        max_turns: u32,
        timeout: Duration,
    ) -> Call<'a, Vec<ctx::Turn>> {
        let mut client = ContextServiceClient::new(self.0.clone());
        let message = ctx::GetHistoryRequest {
            tenant: tenant.to_owned(),
            session_id: session.to_owned(),
            max_turns,
            max_tokens: 0,
        };
        Box::pin(async move {
            Ok(client
                .get_history(request(message, timeout))
                .await?
                .into_inner()
                .turns)
        })
    }

    fn append<'a>(
        &'a self,
        tenant: &'a str,
        session: &'a str,
        turns: &'a [ctx::Turn],
        key: &'a str,
        timeout: Duration,
    ) -> Call<'a, ()> {
        let mut client = ContextServiceClient::new(self.0.clone());
        let message = ctx::AppendTurnsRequest {
            tenant: tenant.to_owned(),
            session_id: session.to_owned(),
            turns: turns.to_vec(),
            idempotency_key: key.to_owned(),
            ttl_seconds: None,
        };
        Box::pin(async move {
            client.append_turns(request(message, timeout)).await?;
            Ok(())
        })
    }
}

/// The understanding service.
#[derive(Debug, Clone)]
pub struct UnderstandingClient(pub TracedChannel);

impl UnderstandingClient {
    /// Embeds `texts` (at most the service's batch size) in one attempt.
    pub fn embed(
        &self,
        texts: Vec<String>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<EmbedResponse, tonic::Status>> {
        let mut client = UnderstandingServiceClient::new(self.0.clone());
        Box::pin(async move {
            Ok(client
                .embed(request(EmbedRequest { texts }, timeout))
                .await?
                .into_inner())
        })
    }
}

impl Understanding for UnderstandingClient {
    fn classify<'a>(&'a self, text: &'a str, timeout: Duration) -> Call<'a, IntentInfo> {
        let mut client = UnderstandingServiceClient::new(self.0.clone());
        let message = ClassifyRequest {
            text: text.to_owned(),
            top_k: 0,
        };
        Box::pin(async move {
            let c = client
                .classify(request(message, timeout))
                .await?
                .into_inner()
                .classification
                .ok_or_else(|| {
                    tonic::Status::internal("understanding answered without a classification")
                })?;
            let domain = c.domain.unwrap_or_default();
            let intent = c.intent.unwrap_or_default();
            Ok(IntentInfo {
                domain: domain.name,
                name: intent.name,
                confidence: intent.confidence,
                out_of_scope: c.out_of_scope,
            })
        })
    }
}

/// The retrieval service.
#[derive(Debug, Clone)]
pub struct RetrievalClient(pub TracedChannel);

impl Retrieval for RetrievalClient {
    fn search<'a>(
        &'a self,
        config: &'a RetrievalConfig,
        text: &'a str,
        timeout: Duration,
    ) -> Call<'a, Vec<Source>> {
        let mut client = RetrievalServiceClient::new(self.0.clone());
        let message = SearchRequest {
            collection: config.collection.clone(),
            query: Some(search_request::Query::Text(text.to_owned())),
            top_k: config.top_k,
            filter: Default::default(),
            min_score: config.min_score,
            exact: false,
        };
        Box::pin(async move {
            let hits = client
                .search(request(message, timeout))
                .await?
                .into_inner()
                .hits;
            Ok(hits
                .into_iter()
                .map(|h| Source {
                    id: format!("{}:{}", config.collection, h.chunk_id),
                    score: h.score,
                    text: h.text,
                })
                .collect())
        })
    }

    fn versions<'a>(
        &'a self,
        collections: &'a [String],
        timeout: Duration,
    ) -> Call<'a, std::collections::HashMap<String, u64>> {
        let mut client = RetrievalServiceClient::new(self.0.clone());
        let message = VersionsRequest {
            collections: collections.to_vec(),
        };
        Box::pin(async move {
            Ok(client
                .versions(request(message, timeout))
                .await?
                .into_inner()
                .versions)
        })
    }
}

/// The generation service.
#[derive(Debug, Clone)]
pub struct GenerationClient(pub TracedChannel);

impl Generation for GenerationClient {
    fn count_tokens(
        &self,
        message: CountTokensRequest,
        timeout: Duration,
    ) -> Call<'_, CountTokensResponse> {
        let mut client = GenerationServiceClient::new(self.0.clone());
        Box::pin(async move {
            Ok(client
                .count_tokens(request(message, timeout))
                .await?
                .into_inner())
        })
    }

    fn generate<'a>(
        &'a self,
        message: GenerateRequest,
        affinity: Option<&'a str>,
        timeout: Duration,
    ) -> Call<'a, Events> {
        let mut client = GenerationServiceClient::new(self.0.clone());
        let mut req = request(message, timeout);
        if let Some(key) = affinity.and_then(|k| k.parse().ok()) {
            req.metadata_mut()
                .insert(moltbot_runtime::grpc::balance::AFFINITY_HEADER, key);
        }
        Box::pin(async move {
            let stream = client.generate(req).await?.into_inner();
            let events: Events = stream
                .map(|item| {
                    item.map_err(|status| Broke {
                        // A status that carries a source came from the
                        // transport (the replica's connection broke), not
                        // from the service.
                        transport: std::error::Error::source(&status).is_some(),
                        status,
                    })
                })
                .boxed();
            Ok(events)
        })
    }

    fn list_models(&self, timeout: Duration) -> Call<'_, Vec<ModelInfo>> {
        let mut client = GenerationServiceClient::new(self.0.clone());
        Box::pin(async move {
            Ok(client
                .list_models(request(ListModelsRequest {}, timeout))
                .await?
                .into_inner()
                .models)
        })
    }
}
