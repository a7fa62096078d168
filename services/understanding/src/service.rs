//! `moltbot.understanding.v1.UnderstandingService`: request validation, the
//! dynamic batcher for embeddings, and the intent head (swapped atomically by
//! ReloadModel: calls in flight keep the head they started with).

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
};

use moltbot_encoder::{Batcher, Embedded};
use moltbot_proto::understanding::v1::{
    self as pb, understanding_service_server::UnderstandingService,
};
use tonic::{Request, Response, Status};

use crate::{UnderstandingError, head::IntentHead};

/// Request limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most texts in one ClassifyBatch or Embed call.
    pub max_texts: usize,
    /// Longest text in bytes.
    pub max_text_bytes: usize,
}

/// The gRPC service.
#[derive(Clone)]
pub struct UnderstandingApi {
    batcher: Batcher,
    head: Arc<RwLock<Option<Arc<IntentHead>>>>,
    head_dir: PathBuf,
    limits: Limits,
}

impl UnderstandingApi {
    /// A service embedding through `batcher`, classifying with the head in
    /// `head_dir` once one is loaded.
    pub fn new(
        batcher: Batcher,
        head: Option<IntentHead>,
        head_dir: PathBuf,
        limits: Limits,
    ) -> Self {
        Self {
            batcher,
            head: Arc::new(RwLock::new(head.map(Arc::new))),
            head_dir,
            limits,
        }
    }

    fn validate(&self, texts: &[String]) -> Result<(), UnderstandingError> {
        if texts.is_empty() || texts.len() > self.limits.max_texts {
            return Err(UnderstandingError::InvalidArgument(format!(
                "texts must hold 1 to {} entries, got {}",
                self.limits.max_texts,
                texts.len()
            )));
        }
        for (i, t) in texts.iter().enumerate() {
            if t.trim().is_empty() {
                return Err(UnderstandingError::InvalidArgument(format!(
                    "text {i} is empty"
                )));
            }
            if t.len() > self.limits.max_text_bytes {
                return Err(UnderstandingError::InvalidArgument(format!(
                    "text {i} is {} bytes; the limit is {}",
                    t.len(),
                    self.limits.max_text_bytes
                )));
            }
        }
        Ok(())
    }

    fn current_head(&self) -> Result<Arc<IntentHead>, UnderstandingError> {
        self.head
            .read()
            .map_err(|_| UnderstandingError::BadHead("head lock poisoned".into()))?
            .clone()
            .ok_or_else(|| UnderstandingError::NoHead(self.head_dir.display().to_string()))
    }

    async fn classify_texts(
        &self,
        texts: Vec<String>,
        top_k: u32,
    ) -> Result<Vec<pb::Classification>, UnderstandingError> {
        self.validate(&texts)?;
        let head = self.current_head()?;
        let embedded = self.batcher.embed(texts).await?;
        let k = if top_k == 0 { 5 } else { top_k.min(50) } as usize;
        embedded
            .iter()
            .map(|e| head.classify(e, k))
            .collect::<Result<Vec<_>, _>>()
    }
}

fn to_proto(e: Embedded) -> pb::Embedding {
    pb::Embedding {
        input_tokens: e.tokens as u32,
        truncated: e.truncated,
        values: e.vector,
    }
}

#[tonic::async_trait]
impl UnderstandingService for UnderstandingApi {
    async fn classify(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let r = request.into_inner();
        let mut out = self.classify_texts(vec![r.text], r.top_k).await?;
        Ok(Response::new(pb::ClassifyResponse {
            classification: out.pop(),
        }))
    }

    async fn classify_batch(
        &self,
        request: Request<pb::ClassifyBatchRequest>,
    ) -> Result<Response<pb::ClassifyBatchResponse>, Status> {
        let r = request.into_inner();
        let classifications = self.classify_texts(r.texts, r.top_k).await?;
        Ok(Response::new(pb::ClassifyBatchResponse { classifications }))
    }

    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let texts = request.into_inner().texts;
        self.validate(&texts)?;
        let embedded = self
            .batcher
            .embed(texts)
            .await
            .map_err(UnderstandingError::from)?;
        Ok(Response::new(pb::EmbedResponse {
            embeddings: embedded.into_iter().map(to_proto).collect(),
            dimension: self.batcher.dimension() as u32,
            model_id: self.batcher.model_id().to_owned(),
        }))
    }

    async fn reload_model(
        &self,
        request: Request<pb::ReloadModelRequest>,
    ) -> Result<Response<pb::ReloadModelResponse>, Status> {
        let r = request.into_inner();
        let dir = if r.model_dir.is_empty() {
            self.head_dir.clone()
        } else {
            PathBuf::from(r.model_dir)
        };
        let dimension = self.batcher.dimension();
        let head = tokio::task::spawn_blocking(move || IntentHead::load(&dir, dimension))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let model_id = head.model_id().to_owned();
        let previous = self
            .head
            .write()
            .map_err(|_| Status::internal("head lock poisoned"))?
            .replace(Arc::new(head));
        Ok(Response::new(pb::ReloadModelResponse {
            model_id,
            previous_model_id: previous
                .map(|h| h.model_id().to_owned())
                .unwrap_or_default(),
        }))
    }
}
