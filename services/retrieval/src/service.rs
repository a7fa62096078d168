//! `moltbot.retrieval.v1.RetrievalService` over the [`State`].

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock, atomic::Ordering},
    time::UNIX_EPOCH,
};

use moltbot_proto::retrieval::v1::{
    ChunkingConfig, Collection as PbCollection, CreateCollectionRequest, CreateCollectionResponse,
    DeleteCollectionRequest, DeleteCollectionResponse, DeleteRequest, DeleteResponse, Hit,
    ListCollectionsRequest, ListCollectionsResponse, SearchRequest, SearchResponse, StatsRequest,
    StatsResponse, UpsertRequest, UpsertResponse, VersionsRequest, VersionsResponse,
    retrieval_service_server::RetrievalService, search_request::Query,
};
use tonic::{Request, Response, Status};

use crate::{
    RetrievalError,
    chunk::{self, Chunking},
    index::{CollectionIndex, Entry, snapshot},
    state::{Collection, State, now_ms},
    store::{CollectionRow, NewChunk},
};

/// Most documents in one Upsert.
pub const MAX_DOCUMENTS_PER_UPSERT: usize = 256;
/// Most chunks one document may make (about 8 MB of text at the defaults).
pub const MAX_CHUNKS_PER_DOCUMENT: usize = 50_000;
/// Largest `top_k`.
pub const MAX_TOP_K: u32 = 1000;
/// Texts per embedding call while ingesting.
const EMBED_BATCH: usize = 32;

/// The service.
#[derive(Clone)]
pub struct RetrievalApi {
    state: Arc<State>,
}

fn timestamp_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn validate_name(name: &str) -> Result<(), RetrievalError> {
    if moltbot_runtime::config::is_resource_name(name) {
        Ok(())
    } else {
        Err(RetrievalError::InvalidArgument(format!(
            "collection name {name:?} must match [a-z0-9_-]{{1,64}}"
        )))
    }
}

fn read<T>(lock: &RwLock<T>) -> Result<std::sync::RwLockReadGuard<'_, T>, RetrievalError> {
    lock.read()
        .map_err(|_| RetrievalError::Index("index lock poisoned".into()))
}

fn write<T>(lock: &RwLock<T>) -> Result<std::sync::RwLockWriteGuard<'_, T>, RetrievalError> {
    lock.write()
        .map_err(|_| RetrievalError::Index("index lock poisoned".into()))
}

impl RetrievalApi {
    /// Wraps the loaded state.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }

    async fn pb_collection(&self, c: &Collection) -> Result<PbCollection, RetrievalError> {
        let documents = self.state.store.document_count(&c.row.name).await?;
        let chunks = read(&c.index)?.keys().count() as u64;
        Ok(PbCollection {
            name: c.row.name.clone(),
            dimension: c.row.dimension,
            chunking: Some(ChunkingConfig {
                chunk_tokens: c.chunking.chunk_tokens,
                overlap_tokens: c.chunking.overlap_tokens,
            }),
            document_count: documents,
            chunk_count: chunks,
            created_at: Some(timestamp_ms(c.row.created_at_ms)),
        })
    }

    /// Chunks and embeds one document's text.
    async fn prepare(
        &self,
        text: &str,
        chunking: Chunking,
    ) -> Result<Vec<NewChunk>, RetrievalError> {
        let pieces = chunk::chunk(&self.state.tokenizer, text, chunking)?;
        if pieces.len() > MAX_CHUNKS_PER_DOCUMENT {
            return Err(RetrievalError::InvalidArgument(format!(
                "the document makes {} chunks; the limit is {MAX_CHUNKS_PER_DOCUMENT}: split it into several documents",
                pieces.len()
            )));
        }
        let mut out = Vec::with_capacity(pieces.len());
        for group in pieces.chunks(EMBED_BATCH) {
            let embedded = self.state.batcher.embed(group.to_vec()).await?;
            for (text, e) in group.iter().zip(embedded) {
                out.push(NewChunk {
                    ordinal: out.len() as u32,
                    text: text.clone(),
                    vector: e.vector,
                });
            }
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl RetrievalService for RetrievalApi {
    async fn create_collection(
        &self,
        request: Request<CreateCollectionRequest>,
    ) -> Result<Response<CreateCollectionResponse>, Status> {
        let r = request.into_inner();
        validate_name(&r.name)?;
        let cfg = r.chunking.unwrap_or_default();
        let chunking = Chunking::resolve(cfg.chunk_tokens, cfg.overlap_tokens)?;
        let row = CollectionRow {
            name: r.name.clone(),
            dimension: self.state.batcher.dimension() as u32,
            chunk_tokens: chunking.chunk_tokens,
            overlap_tokens: chunking.overlap_tokens,
            created_at_ms: now_ms(),
        };
        let seq = self.state.store.create_collection(&row).await?;
        snapshot::remove(&self.state.snapshot_dir, &row.name);
        let collection = Arc::new(Collection {
            row: row.clone(),
            chunking,
            index: RwLock::new(CollectionIndex::new(
                row.dimension as usize,
                self.state.params,
            )?),
            writer: tokio::sync::Mutex::new(()),
            snapshot_at: std::sync::Mutex::new(None),
            dirty: Default::default(),
            version: std::sync::atomic::AtomicI64::new(seq),
        });
        write(&self.state.collections)?.insert(r.name.clone(), collection.clone());
        tracing::info!(collection = %r.name, "collection created");
        Ok(Response::new(CreateCollectionResponse {
            collection: Some(self.pb_collection(&collection).await?),
        }))
    }

    async fn list_collections(
        &self,
        _request: Request<ListCollectionsRequest>,
    ) -> Result<Response<ListCollectionsResponse>, Status> {
        let all: Vec<Arc<Collection>> = read(&self.state.collections)?.values().cloned().collect();
        let mut collections = Vec::with_capacity(all.len());
        for c in all {
            collections.push(self.pb_collection(&c).await?);
        }
        Ok(Response::new(ListCollectionsResponse { collections }))
    }

    async fn delete_collection(
        &self,
        request: Request<DeleteCollectionRequest>,
    ) -> Result<Response<DeleteCollectionResponse>, Status> {
        let name = request.into_inner().name;
        let collection = self.state.collection(&name)?;
        let _writer = collection.writer.lock().await;
        let deleted_chunks = self.state.store.delete_collection(&name).await?;
        write(&self.state.collections)?.remove(&name);
        snapshot::remove(&self.state.snapshot_dir, &name);
        tracing::info!(collection = %name, deleted_chunks, "collection deleted");
        Ok(Response::new(DeleteCollectionResponse { deleted_chunks }))
    }

    async fn upsert(
        &self,
        request: Request<UpsertRequest>,
    ) -> Result<Response<UpsertResponse>, Status> {
        let r = request.into_inner();
        let collection = self.state.collection(&r.collection)?;
        if r.documents.len() > MAX_DOCUMENTS_PER_UPSERT {
            return Err(RetrievalError::InvalidArgument(format!(
                "{} documents in one Upsert; the limit is {MAX_DOCUMENTS_PER_UPSERT}",
                r.documents.len()
            ))
            .into());
        }
        for (i, d) in r.documents.iter().enumerate() {
            if d.id.is_empty() || d.id.len() > 512 {
                return Err(RetrievalError::InvalidArgument(format!(
                    "documents[{i}].id must be 1 to 512 bytes"
                ))
                .into());
            }
            if d.text.trim().is_empty() {
                return Err(RetrievalError::InvalidArgument(format!(
                    "documents[{i}].text is empty"
                ))
                .into());
            }
        }
        // Chunk and embed outside the writer lock: the expensive part runs
        // concurrently with other writers and with searches.
        let mut prepared = Vec::with_capacity(r.documents.len());
        for d in &r.documents {
            let chunks = self.prepare(&d.text, collection.chunking).await?;
            let metadata: BTreeMap<String, String> = d.metadata.clone().into_iter().collect();
            let json = serde_json::to_string(&metadata)
                .map_err(|e| RetrievalError::InvalidArgument(format!("metadata: {e}")))?;
            prepared.push((d, chunks, Arc::new(metadata), json));
        }
        let _writer = collection.writer.lock().await;
        let mut total_chunks = 0u32;
        for (d, chunks, metadata, json) in &prepared {
            let replaced = self
                .state
                .store
                .upsert_document(&r.collection, &d.id, json, chunks)
                .await?;
            // Durable now; the index follows under its write lock, so a
            // search sees all of the document's new chunks or none.
            let mut index = write(&collection.index)?;
            for key in &replaced.old_keys {
                index.remove(*key)?;
            }
            let document_id: Arc<str> = Arc::from(d.id.as_str());
            for (key, c) in replaced.new_keys.iter().zip(chunks) {
                index.add(
                    *key,
                    &c.vector,
                    Entry {
                        document_id: document_id.clone(),
                        ordinal: c.ordinal,
                        text: Arc::from(c.text.as_str()),
                        metadata: metadata.clone(),
                    },
                )?;
            }
            drop(index);
            collection.applied(replaced.seq);
            total_chunks += chunks.len() as u32;
        }
        collection.dirty.store(true, Ordering::Release);
        Ok(Response::new(UpsertResponse {
            documents: prepared.len() as u32,
            chunks: total_chunks,
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let r = request.into_inner();
        let collection = self.state.collection(&r.collection)?;
        let _writer = collection.writer.lock().await;
        let (deleted_documents, keys, seq) = self
            .state
            .store
            .delete_documents(&r.collection, &r.document_ids)
            .await?;
        {
            let mut index = write(&collection.index)?;
            for key in &keys {
                index.remove(*key)?;
            }
        }
        collection.applied(seq);
        collection.dirty.store(true, Ordering::Release);
        Ok(Response::new(DeleteResponse {
            deleted_documents,
            deleted_chunks: keys.len() as u32,
        }))
    }

    async fn search(
        &self,
        request: Request<SearchRequest>,
    ) -> Result<Response<SearchResponse>, Status> {
        let r = request.into_inner();
        if r.top_k == 0 || r.top_k > MAX_TOP_K {
            return Err(RetrievalError::InvalidArgument(format!(
                "top_k is {}; it must be in 1..={MAX_TOP_K}",
                r.top_k
            ))
            .into());
        }
        if let Some(m) = r.min_score
            && !(-1.0..=1.0).contains(&m)
        {
            return Err(RetrievalError::InvalidArgument(format!(
                "min_score is {m}; it must be in [-1, 1]"
            ))
            .into());
        }
        let collection = self.state.collection(&r.collection)?;
        let query: Vec<f32> = match r.query {
            Some(Query::Text(text)) if !text.trim().is_empty() => {
                let mut e = self
                    .state
                    .batcher
                    .embed(vec![text])
                    .await
                    .map_err(RetrievalError::from)?;
                e.pop().map(|e| e.vector).unwrap_or_default()
            }
            Some(Query::Vector(v)) if !v.values.is_empty() => {
                if v.values.len() != collection.row.dimension as usize {
                    return Err(RetrievalError::InvalidArgument(format!(
                        "query vector has {} values; collection `{}` has dimension {}",
                        v.values.len(),
                        r.collection,
                        collection.row.dimension
                    ))
                    .into());
                }
                v.values
            }
            _ => {
                return Err(RetrievalError::InvalidArgument(
                    "the query is empty: give query text or a query vector".into(),
                )
                .into());
            }
        };
        let filter: BTreeMap<String, String> = r.filter.into_iter().collect();
        let index = read(&collection.index)?;
        let exact = r.exact || index.len() <= self.state.exact_below;
        let k = r.top_k as usize;
        let scored = if exact {
            index.exact(&query, k, &filter)?
        } else {
            index.search(&query, k, &filter)?
        };
        let hits = scored
            .into_iter()
            .filter(|s| r.min_score.is_none_or(|m| s.score >= m))
            .filter_map(|s| {
                index.entry(s.key).map(|e| Hit {
                    document_id: e.document_id.to_string(),
                    chunk_id: format!("{}#{}", e.document_id, e.ordinal),
                    text: e.text.to_string(),
                    score: s.score,
                    metadata: e
                        .metadata
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                })
            })
            .collect();
        Ok(Response::new(SearchResponse { hits, exact }))
    }

    async fn versions(
        &self,
        request: Request<VersionsRequest>,
    ) -> Result<Response<VersionsResponse>, Status> {
        let names = request.into_inner().collections;
        let all = read(&self.state.collections)?;
        let versions = names
            .into_iter()
            .filter_map(|name| {
                let version = all.get(&name)?.version.load(Ordering::Acquire);
                Some((name, version.max(0) as u64))
            })
            .collect();
        Ok(Response::new(VersionsResponse { versions }))
    }

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        let name = request.into_inner().collection;
        let collection = self.state.collection(&name)?;
        let pb = self.pb_collection(&collection).await?;
        let (indexed, memory) = {
            let index = read(&collection.index)?;
            (index.len() as u64, index.memory_bytes() as u64)
        };
        let snapshot_at = collection
            .snapshot_at
            .lock()
            .ok()
            .and_then(|s| *s)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| timestamp_ms(d.as_millis() as i64));
        Ok(Response::new(StatsResponse {
            collection: Some(pb),
            indexed_vectors: indexed,
            index_memory_bytes: memory,
            snapshot_at,
        }))
    }
}
