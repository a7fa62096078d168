//! `moltbot.understanding.v1.UnderstandingService`: request validation, the
//! dynamic batcher for embeddings, and the intent head (swapped atomically by
//! ReloadModel: calls in flight keep the head they started with). ReloadModel
//! is an admin RPC: bearer `MOLTBOT_ADMIN_TOKEN`, or loopback callers when no
//! token is set.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
};

use moltbot_encoder::{BatchConfig, Batcher, Embedded, Encoder};
use moltbot_proto::understanding::v1::{
    self as pb, understanding_service_server::UnderstandingService,
};
use moltbot_runtime::grpc::admin;
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

/// A trained head and the batcher of the encoder it was trained with (the
/// service's base encoder, or the head's own fine-tuned one), plus the base
/// encoder's batcher when the head's out-of-scope rule has the cascade.
pub struct Classifier {
    head: IntentHead,
    batcher: Batcher,
    base: Option<Batcher>,
}

impl Classifier {
    /// Loads the head in `dir`; starts a batcher for its fine-tuned encoder
    /// (on `base`'s device and precision) when it has one, else classifies
    /// through `base`. Blocking. Errors
    /// with [`UnderstandingError::NoHead`] or [`UnderstandingError::BadHead`].
    pub fn load(
        dir: &std::path::Path,
        base: &Batcher,
        config: BatchConfig,
    ) -> Result<Self, UnderstandingError> {
        let head = IntentHead::load(dir, base.dimension())?;
        let batcher = match head.encoder_dir() {
            Some(encoder_dir) => {
                let encoder = Encoder::load_with(&encoder_dir, base.device(), base.precision())
                    .map_err(|e| UnderstandingError::BadHead(e.to_string()))?;
                Batcher::start(encoder, config)?
            }
            None => base.clone(),
        };
        let base = head.has_cascade().then(|| base.clone());
        Ok(Self {
            head,
            batcher,
            base,
        })
    }

    /// The head's identifier.
    pub fn model_id(&self) -> &str {
        self.head.model_id()
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct UnderstandingApi {
    batcher: Batcher,
    classifier: Arc<RwLock<Option<Arc<Classifier>>>>,
    head_dir: PathBuf,
    limits: Limits,
    batch: BatchConfig,
    admin_token: Option<Arc<str>>,
}

impl UnderstandingApi {
    /// A service embedding through `batcher`, classifying with `classifier`
    /// (from `head_dir`) once one is loaded.
    pub fn new(
        batcher: Batcher,
        classifier: Option<Classifier>,
        head_dir: PathBuf,
        limits: Limits,
        batch: BatchConfig,
    ) -> Self {
        Self {
            batcher,
            classifier: Arc::new(RwLock::new(classifier.map(Arc::new))),
            head_dir,
            limits,
            batch,
            admin_token: None,
        }
    }

    /// Requires `authorization: Bearer <token>` on ReloadModel. Without a
    /// token ReloadModel is served to loopback callers only.
    pub fn with_admin_token(mut self, token: Option<String>) -> Self {
        self.admin_token = admin::configured(token).map(Arc::from);
        self
    }

    /// Authorises an admin RPC. Errors with
    /// [`UnderstandingError::Unauthenticated`] or
    /// [`UnderstandingError::PermissionDenied`].
    fn admin<T>(&self, request: &Request<T>) -> Result<(), UnderstandingError> {
        admin::authorise(request, self.admin_token.as_deref()).map_err(|d| match d {
            admin::Refused::Bearer(admin::AdminDenied::MissingToken) => {
                UnderstandingError::Unauthenticated(
                    "ReloadModel needs `authorization: Bearer <MOLTBOT_ADMIN_TOKEN>`".into(),
                )
            }
            admin::Refused::Bearer(admin::AdminDenied::WrongToken) => {
                UnderstandingError::PermissionDenied("wrong admin token".into())
            }
            admin::Refused::NotLoopback => UnderstandingError::PermissionDenied(
                "ReloadModel from another host needs MOLTBOT_ADMIN_TOKEN set on the service and sent as `authorization: Bearer <token>`".into(),
            ),
        })
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

    /// Resolves once a head is being served: at once when one was loaded at
    /// start, else when `<head_dir>/metrics.json` appears (the trainer
    /// writes the head to a temporary directory and renames it into place,
    /// so a head seen there is complete) and loads, or when ReloadModel
    /// installs one. Polls every `poll`. Until then the server's health is
    /// NOT_SERVING and Classify answers FAILED_PRECONDITION with the reason;
    /// a head that fails to load is logged and tried again.
    pub async fn wait_for_head(&self, poll: std::time::Duration) {
        let mut announced = false;
        loop {
            if self.current().is_ok() {
                return;
            }
            if !announced {
                tracing::warn!(
                    dir = %self.head_dir.display(),
                    "no intent head yet: NOT_SERVING until one appears there (`moltbot up` trains it in the background; or run `moltbot-understanding train --out DIR`); Embed works meanwhile"
                );
                announced = true;
            }
            if self.head_dir.join("metrics.json").exists() {
                let (dir, base, config) = (self.head_dir.clone(), self.batcher.clone(), self.batch);
                match tokio::task::spawn_blocking(move || Classifier::load(&dir, &base, config))
                    .await
                {
                    Ok(Ok(classifier)) => {
                        tracing::info!(model_id = classifier.model_id(), "intent head loaded");
                        if let Ok(mut slot) = self.classifier.write() {
                            slot.get_or_insert_with(|| Arc::new(classifier));
                        }
                        continue;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "intent head did not load; trying again")
                    }
                    Err(e) => tracing::warn!(error = %e, "intent head loader failed; trying again"),
                }
            }
            tokio::time::sleep(poll).await;
        }
    }

    fn current(&self) -> Result<Arc<Classifier>, UnderstandingError> {
        self.classifier
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
        let classifier = self.current()?;
        let k = if top_k == 0 { 5 } else { top_k.min(50) } as usize;
        // With the cascade, the texts are kept for a second pass.
        let cascade = classifier.base.as_ref().map(|b| (b, texts.clone()));
        let embedded = classifier.batcher.embed(texts).await?;
        let mut classified = embedded
            .iter()
            .map(|e| classifier.head.classify(e, k))
            .collect::<Result<Vec<_>, _>>()?;
        // The cascade: texts under the gate go through the base encoder too
        // (in one batch), and it may flag them out of scope.
        if let Some((base, texts)) = cascade {
            let asked: Vec<usize> = (0..classified.len())
                .filter(|&i| classified[i].needs_base)
                .collect();
            if !asked.is_empty() {
                let again = asked.iter().map(|&i| texts[i].clone()).collect();
                for (&i, e) in asked.iter().zip(base.embed(again).await?) {
                    classifier
                        .head
                        .second_opinion(&mut classified[i], &e.vector);
                }
            }
        }
        Ok(classified.into_iter().map(|c| c.classification).collect())
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
        self.admin(&request)?;
        let r = request.into_inner();
        let dir = if r.model_dir.is_empty() {
            self.head_dir.clone()
        } else {
            PathBuf::from(r.model_dir)
        };
        let (base, config) = (self.batcher.clone(), self.batch);
        let classifier = tokio::task::spawn_blocking(move || Classifier::load(&dir, &base, config))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let model_id = classifier.model_id().to_owned();
        let previous = self
            .classifier
            .write()
            .map_err(|_| Status::internal("head lock poisoned"))?
            .replace(Arc::new(classifier));
        Ok(Response::new(pb::ReloadModelResponse {
            model_id,
            previous_model_id: previous
                .map(|h| h.model_id().to_owned())
                .unwrap_or_default(),
        }))
    }
}
