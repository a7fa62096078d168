//! The service's state: the store, the encoder, and per collection its
//! chunking and index. Writes go to the store first and then to the index,
//! under the collection's writer lock, so the index follows the store in
//! commit order and a search (index read lock) sees a document's chunks all
//! replaced or not at all.

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use moltbot_encoder::Batcher;
use tokenizers::Tokenizer;

use crate::{
    RetrievalError,
    chunk::Chunking,
    index::{CollectionIndex, Entry, HnswParams, Quantization, snapshot},
    store::{ChunkRow, CollectionRow, Store},
};

/// One collection in memory.
pub struct Collection {
    /// Its row.
    pub row: CollectionRow,
    /// How its documents are chunked.
    pub chunking: Chunking,
    /// Its index.
    pub index: RwLock<CollectionIndex>,
    /// Serialises store writes and the index updates that follow them.
    pub writer: tokio::sync::Mutex<()>,
    /// Time of the last snapshot.
    pub snapshot_at: Mutex<Option<SystemTime>>,
    /// Changed since the last snapshot.
    pub dirty: AtomicBool,
    /// Content version (the `Versions` RPC): the change-log position of the
    /// last write applied to the index, or the position read before the
    /// collection was loaded. Raised under [`Collection::writer`] after the
    /// index changed, so a version never names content the index lacks.
    pub version: AtomicI64,
}

impl Collection {
    /// Records that the index now holds the write at change-log `seq`.
    pub fn applied(&self, seq: i64) {
        self.version.fetch_max(seq, Ordering::AcqRel);
    }
}

/// Everything the RPCs share.
pub struct State {
    /// The durable store.
    pub store: Store,
    /// Collections by name.
    pub collections: RwLock<BTreeMap<String, Arc<Collection>>>,
    /// The shared encoder, batching concurrent embeddings.
    pub batcher: Batcher,
    /// The encoder's tokenizer, for chunking.
    pub tokenizer: Tokenizer,
    /// HNSW parameters of new indexes.
    pub params: HnswParams,
    /// Where index snapshots live.
    pub snapshot_dir: PathBuf,
    /// Collections with at most this many chunks are searched exactly.
    pub exact_below: usize,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The index entry of a stored chunk.
pub fn entry_of(c: &ChunkRow) -> Entry {
    let metadata: BTreeMap<String, String> = serde_json::from_str(&c.metadata).unwrap_or_default();
    Entry {
        document_id: Arc::from(c.document_id.as_str()),
        ordinal: c.ordinal,
        text: Arc::from(c.text.as_str()),
        metadata: Arc::new(metadata),
    }
}

impl State {
    /// Loads every collection's index: from its snapshot reconciled with the
    /// store, or rebuilt from the store's vectors. Never re-embeds.
    ///
    /// Returns the change-log position read before loading: the follower
    /// (crate::follow) applies every change after it (again, for those the
    /// load already saw: applying a change is idempotent).
    pub async fn load_collections(&self) -> Result<i64, RetrievalError> {
        let from = self.store.last_change().await?;
        for row in self.store.collections().await? {
            self.load_collection(row, from).await?;
        }
        Ok(from)
    }

    /// Loads one collection's index (snapshot reconciled with the store)
    /// and puts it in [`State::collections`], at content version `version`
    /// (a change-log position read before the load).
    pub async fn load_collection(
        &self,
        row: CollectionRow,
        version: i64,
    ) -> Result<Arc<Collection>, RetrievalError> {
        {
            let started = std::time::Instant::now();
            let dimension = row.dimension as usize;
            // A quantized graph keeps full-precision vectors beside it, so it
            // needs every vector: read them in this one pass. Otherwise only
            // the vectors the snapshot lacks are read, below.
            let keeps_vectors = self.params.quantization != Quantization::F32;
            let chunks = self
                .store
                .chunks(&row.name, keeps_vectors.then_some(0))
                .await?;
            let store_keys: HashSet<u64> = chunks.iter().map(|c| c.key).collect();
            let (mut index, snapshot_keys, at) =
                match snapshot::load(&self.snapshot_dir, &row.name, dimension, self.params) {
                    Some((index, keys, at)) => (index, keys, Some(at)),
                    None => (
                        CollectionIndex::new(dimension, self.params)?,
                        Vec::new(),
                        None,
                    ),
                };
            let mut stale = 0;
            for key in &snapshot_keys {
                if !store_keys.contains(key) {
                    index.remove(*key)?;
                    stale += 1;
                }
            }
            let missing: Vec<u64> = chunks
                .iter()
                .map(|c| c.key)
                .filter(|k| !index.contains(*k))
                .collect();
            let fetched = match missing.iter().min() {
                Some(&from) if !keeps_vectors => self.store.chunks(&row.name, Some(from)).await?,
                _ => Vec::new(),
            };
            let with_vectors = if keeps_vectors { &chunks } else { &fetched };
            let mut added = 0;
            for c in with_vectors {
                let Some(v) = &c.vector else { continue };
                if index.contains(c.key) {
                    index.set_vector(c.key, v);
                } else {
                    index.add(c.key, v, entry_of(c))?;
                    added += 1;
                }
            }
            for c in &chunks {
                index.set_entry(c.key, entry_of(c));
            }
            tracing::info!(
                collection = %row.name,
                chunks = chunks.len(),
                from_snapshot = snapshot_keys.len() - stale,
                added,
                removed = stale,
                latency_ms = started.elapsed().as_millis() as u64,
                "index loaded"
            );
            let chunking = Chunking {
                chunk_tokens: row.chunk_tokens,
                overlap_tokens: row.overlap_tokens,
            };
            let collection = Arc::new(Collection {
                row: row.clone(),
                chunking,
                index: RwLock::new(index),
                writer: tokio::sync::Mutex::new(()),
                snapshot_at: Mutex::new(at),
                dirty: AtomicBool::new(added > 0 || stale > 0),
                version: AtomicI64::new(version),
            });
            self.collections
                .write()
                .map_err(|_| RetrievalError::Index("collections lock poisoned".into()))?
                .insert(row.name.clone(), collection.clone());
            Ok(collection)
        }
    }

    /// The collection `name`. Errors with
    /// [`RetrievalError::CollectionNotFound`].
    pub fn collection(&self, name: &str) -> Result<Arc<Collection>, RetrievalError> {
        self.collections
            .read()
            .map_err(|_| RetrievalError::Index("collections lock poisoned".into()))?
            .get(name)
            .cloned()
            .ok_or_else(|| RetrievalError::CollectionNotFound(name.to_owned()))
    }

    /// Snapshots every collection changed since its last snapshot. Errors
    /// are logged, not returned (the store stays the source of truth).
    pub fn snapshot_dirty(&self) {
        let collections: Vec<Arc<Collection>> = match self.collections.read() {
            Ok(c) => c.values().cloned().collect(),
            Err(_) => return,
        };
        for c in collections {
            if !c.dirty.swap(false, Ordering::AcqRel) {
                continue;
            }
            let Ok(index) = c.index.read() else { continue };
            match snapshot::save(&index, &self.snapshot_dir, &c.row.name) {
                Ok(at) => {
                    if let Ok(mut s) = c.snapshot_at.lock() {
                        *s = Some(at);
                    }
                    tracing::info!(collection = %c.row.name, vectors = index.len(), "index snapshot saved");
                }
                Err(e) => {
                    c.dirty.store(true, Ordering::Release);
                    tracing::warn!(collection = %c.row.name, error = %e, "index snapshot failed");
                }
            }
        }
    }
}
