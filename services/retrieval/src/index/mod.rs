//! The in-process index of one collection: an HNSW graph (USearch, Malkov &
//! Yashunin 2016) over the L2-normalised chunk vectors with the inner-product
//! metric (equal to cosine on unit vectors, without the norms per distance), the chunks' text and
//! metadata for building hits, exact (brute-force) search as the small-
//! collection path and the recall reference, and snapshots on disk so a
//! restart neither re-embeds nor rebuilds the graph.
//!
//! Why USearch (crate `usearch`): it supports incremental add *and* remove
//! (re-upserted documents replace their chunks), predicate-filtered traversal
//! (metadata filters), save/load of the graph, and SIMD distance kernels
//! (SimSIMD). `hnsw_rs` has no removal; `instant-distance` builds once and
//! cannot add; `hora` is unmaintained.

pub mod snapshot;

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BinaryHeap, HashMap},
    sync::Arc,
};

use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::RetrievalError;

/// How the graph stores vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantization {
    /// 4 bytes a dimension: exact distances.
    F32,
    /// IEEE half precision, 2 bytes a dimension.
    F16,
    /// Brain float, 2 bytes a dimension.
    Bf16,
    /// 8-bit scalar quantization, 1 byte a dimension (unit vectors scaled to
    /// [-127, 127]).
    I8,
}

impl Quantization {
    fn scalar(self) -> ScalarKind {
        match self {
            Self::F32 => ScalarKind::F32,
            Self::F16 => ScalarKind::F16,
            Self::Bf16 => ScalarKind::BF16,
            Self::I8 => ScalarKind::I8,
        }
    }
}

/// HNSW parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HnswParams {
    /// `M`: neighbours per node (connectivity).
    pub m: usize,
    /// `efConstruction`: candidate list size while inserting.
    pub ef_construction: usize,
    /// `efSearch`: candidate list size while searching (raised to `k` when
    /// smaller).
    pub ef_search: usize,
    /// Storage of the vectors in the graph (exact search reads them back).
    pub quantization: Quantization,
    /// With a quantized graph: how many candidates per wanted hit the graph
    /// returns, re-ranked by exact f32 inner product (kept beside the graph).
    /// 1 turns re-ranking off.
    pub rerank: usize,
}

impl Default for HnswParams {
    /// M = 16, efConstruction = 128, efSearch = 64 (recall@10 ≥ 0.95 on
    /// MiniLM embeddings; see BENCHMARKS.md).
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 128,
            ef_search: 64,
            quantization: Quantization::F32,
            rerank: 1,
        }
    }
}

/// What a hit needs besides its score.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Document id.
    pub document_id: Arc<str>,
    /// Position in the document.
    pub ordinal: u32,
    /// Passage text.
    pub text: Arc<str>,
    /// The document's metadata.
    pub metadata: Arc<BTreeMap<String, String>>,
}

/// One scored chunk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// Chunk key.
    pub key: u64,
    /// Cosine similarity, in [-1, 1].
    pub score: f32,
}

fn index_error(e: impl std::fmt::Display) -> RetrievalError {
    RetrievalError::Index(e.to_string())
}

/// Whether `metadata` holds every `key = value` of `filter`.
pub fn matches(filter: &BTreeMap<String, String>, metadata: &BTreeMap<String, String>) -> bool {
    filter.iter().all(|(k, v)| metadata.get(k) == Some(v))
}

/// The index of one collection.
pub struct CollectionIndex {
    hnsw: Index,
    dimension: usize,
    params: HnswParams,
    entries: HashMap<u64, Entry>,
    /// Full-precision unit vectors, kept when the graph is quantized (for
    /// re-ranking and exact search).
    vectors: HashMap<u64, Box<[f32]>>,
}

/// A min-heap entry by score, for top-k selection.
#[derive(PartialEq)]
struct MinScore(Scored);

impl Eq for MinScore {}

impl PartialOrd for MinScore {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for MinScore {
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.score.total_cmp(&self.0.score)
    }
}

/// `v` scaled to unit length (unchanged when it already is, or is zero).
pub fn normalized(v: &[f32]) -> std::borrow::Cow<'_, [f32]> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 || (norm - 1.0).abs() < 1e-4 {
        std::borrow::Cow::Borrowed(v)
    } else {
        std::borrow::Cow::Owned(v.iter().map(|x| x / norm).collect())
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0f32, 0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na.sqrt() * nb.sqrt())
}

/// USearch options of a graph of `dimension`-float unit vectors with
/// `params`, inner-product metric (for new graphs and snapshot loads alike).
pub(crate) fn usearch_options(dimension: usize, params: HnswParams) -> IndexOptions {
    IndexOptions {
        dimensions: dimension,
        metric: MetricKind::IP,
        quantization: params.quantization.scalar(),
        connectivity: params.m,
        expansion_add: params.ef_construction,
        expansion_search: params.ef_search,
        multi: false,
    }
}

impl CollectionIndex {
    /// An empty index of `dimension`-float vectors. Errors with
    /// [`RetrievalError::Index`] when USearch cannot allocate it.
    pub fn new(dimension: usize, params: HnswParams) -> Result<Self, RetrievalError> {
        let hnsw = Index::new(&usearch_options(dimension, params)).map_err(index_error)?;
        hnsw.reserve(1024).map_err(index_error)?;
        Ok(Self {
            hnsw,
            dimension,
            params,
            entries: HashMap::new(),
            vectors: HashMap::new(),
        })
    }

    /// The SIMD kernels USearch dispatched to on this CPU (e.g. `haswell`,
    /// `skylake`, `serial` when none).
    pub fn hardware_acceleration(&self) -> String {
        self.hnsw.hardware_acceleration()
    }

    /// Changes `efSearch` (still raised to `k` per query).
    pub fn set_ef_search(&mut self, ef: usize) {
        self.params.ef_search = ef.max(1);
    }

    /// Vector dimension.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Vectors in the graph.
    pub fn len(&self) -> usize {
        self.hnsw.size()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate memory of the graph and vectors, in bytes (USearch's
    /// figure), plus the texts held for hits.
    pub fn memory_bytes(&self) -> usize {
        self.hnsw.memory_usage()
            + self.vectors.len() * (self.dimension * 4 + 32)
            + self
                .entries
                .values()
                .map(|e| e.text.len() + e.document_id.len() + 64)
                .sum::<usize>()
    }

    /// The entry of `key`.
    pub fn entry(&self, key: u64) -> Option<&Entry> {
        self.entries.get(&key)
    }

    /// Every key with an entry.
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.keys().copied()
    }

    /// Whether the graph holds `key`.
    pub fn contains(&self, key: u64) -> bool {
        self.hnsw.contains(key)
    }

    /// Sets the text and metadata of `key` without touching the graph (used
    /// when the vector is already there, from a snapshot).
    pub fn set_entry(&mut self, key: u64, entry: Entry) {
        self.entries.insert(key, entry);
    }

    /// Adds `vector` under `key` with its entry. Errors with
    /// [`RetrievalError::InvalidArgument`] for a wrong dimension and
    /// [`RetrievalError::Index`] when USearch fails.
    pub fn add(&mut self, key: u64, vector: &[f32], entry: Entry) -> Result<(), RetrievalError> {
        if vector.len() != self.dimension {
            return Err(RetrievalError::InvalidArgument(format!(
                "vector has {} values; the collection's dimension is {}",
                vector.len(),
                self.dimension
            )));
        }
        if self.hnsw.size() + 1 > self.hnsw.capacity() {
            let grown = (self.hnsw.capacity() * 2).max(1024);
            self.hnsw.reserve(grown).map_err(index_error)?;
        }
        let unit = normalized(vector);
        self.hnsw.add(key, &unit).map_err(index_error)?;
        if self.keeps_vectors() {
            self.vectors
                .insert(key, unit.into_owned().into_boxed_slice());
        }
        self.entries.insert(key, entry);
        Ok(())
    }

    /// Removes `key` from the graph and the entries (absent keys are fine).
    pub fn remove(&mut self, key: u64) -> Result<(), RetrievalError> {
        self.entries.remove(&key);
        self.vectors.remove(&key);
        if self.hnsw.contains(key) {
            self.hnsw.remove(key).map_err(index_error)?;
        }
        Ok(())
    }

    /// Approximate top-`k` by cosine similarity, keeping only chunks whose
    /// metadata matches `filter` (during graph traversal). When the filtered
    /// traversal finds fewer than `k` while more matching chunks exist, the
    /// answer comes from exact search over the matching chunks instead, so a
    /// selective filter still gets `k` hits when `k` exist.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: &BTreeMap<String, String>,
    ) -> Result<Vec<Scored>, RetrievalError> {
        if self.hnsw.size() == 0 {
            return Ok(Vec::new());
        }
        let query = &*normalized(query);
        let rerank = if self.keeps_vectors() {
            self.params.rerank.max(1)
        } else {
            1
        };
        let candidates = k * rerank;
        let ef = self.params.ef_search.max(candidates);
        if self.hnsw.expansion_search() != ef {
            self.hnsw.change_expansion_search(ef);
        }
        let found = if filter.is_empty() {
            self.hnsw.search(query, candidates).map_err(index_error)?
        } else {
            self.hnsw
                .filtered_search(query, candidates, |key| {
                    self.entries
                        .get(&key)
                        .is_some_and(|e| matches(filter, &e.metadata))
                })
                .map_err(index_error)?
        };
        let mut hits: Vec<Scored> = found
            .keys
            .iter()
            .zip(&found.distances)
            .filter(|(key, _)| self.entries.contains_key(key))
            .map(|(&key, &d)| Scored {
                key,
                score: match (rerank > 1, self.vectors.get(&key)) {
                    (true, Some(v)) => dot(query, v),
                    _ => 1.0 - d,
                },
            })
            .collect();
        if rerank > 1 {
            hits.sort_by(|a, b| b.score.total_cmp(&a.score));
            hits.truncate(k);
        }
        if hits.len() < k && !filter.is_empty() {
            let matching = self
                .entries
                .values()
                .filter(|e| matches(filter, &e.metadata))
                .take(k)
                .count();
            if matching > hits.len() {
                return self.exact(query, k, filter);
            }
        }
        Ok(hits)
    }

    /// Exact top-`k` by cosine similarity over every (matching) chunk: the
    /// recall reference, and the path for small collections.
    pub fn exact(
        &self,
        query: &[f32],
        k: usize,
        filter: &BTreeMap<String, String>,
    ) -> Result<Vec<Scored>, RetrievalError> {
        let mut heap: BinaryHeap<MinScore> = BinaryHeap::with_capacity(k + 1);
        let mut buf = vec![0f32; self.dimension];
        for (&key, entry) in &self.entries {
            if !filter.is_empty() && !matches(filter, &entry.metadata) {
                continue;
            }
            let score = match self.vectors.get(&key) {
                Some(v) => cosine(query, v),
                None => {
                    if self.hnsw.get(key, &mut buf).map_err(index_error)? == 0 {
                        continue;
                    }
                    cosine(query, &buf)
                }
            };
            if heap.len() < k {
                heap.push(MinScore(Scored { key, score }));
            } else if heap.peek().is_some_and(|m| score > m.0.score) {
                heap.pop();
                heap.push(MinScore(Scored { key, score }));
            }
        }
        let mut out: Vec<Scored> = heap.into_iter().map(|m| m.0).collect();
        out.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(out)
    }

    pub(crate) fn hnsw(&self) -> &Index {
        &self.hnsw
    }

    pub(crate) fn from_parts(hnsw: Index, dimension: usize, params: HnswParams) -> Self {
        Self {
            hnsw,
            dimension,
            params,
            entries: HashMap::new(),
            vectors: HashMap::new(),
        }
    }

    /// Whether full-precision vectors are kept beside a quantized graph.
    pub fn keeps_vectors(&self) -> bool {
        self.params.quantization != Quantization::F32
    }

    /// Keeps the full-precision vector of `key` (after a snapshot load of a
    /// quantized graph).
    pub fn set_vector(&mut self, key: u64, vector: &[f32]) {
        if self.keeps_vectors() {
            self.vectors
                .insert(key, normalized(vector).into_owned().into_boxed_slice());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(doc: &str, tag: &str) -> Entry {
        Entry {
            document_id: Arc::from(doc),
            ordinal: 0,
            text: Arc::from("t"),
            metadata: Arc::new(BTreeMap::from([("tag".to_owned(), tag.to_owned())])),
        }
    }

    #[test]
    fn add_search_remove_and_filter() {
        let mut idx = CollectionIndex::new(4, HnswParams::default()).unwrap();
        idx.add(1, &[1.0, 0.0, 0.0, 0.0], entry("a", "x")).unwrap();
        idx.add(2, &[0.9, 0.1, 0.0, 0.0], entry("b", "y")).unwrap();
        idx.add(3, &[0.0, 1.0, 0.0, 0.0], entry("c", "y")).unwrap();
        let q = [1.0, 0.0, 0.0, 0.0];
        let hits = idx.search(&q, 2, &BTreeMap::new()).unwrap();
        assert_eq!(hits.iter().map(|h| h.key).collect::<Vec<_>>(), vec![1, 2]);
        assert!((hits[0].score - 1.0).abs() < 1e-5);
        let y = BTreeMap::from([("tag".to_owned(), "y".to_owned())]);
        let hits = idx.search(&q, 2, &y).unwrap();
        assert_eq!(hits.iter().map(|h| h.key).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(
            idx.exact(&q, 2, &y)
                .unwrap()
                .iter()
                .map(|h| h.key)
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        idx.remove(1).unwrap();
        let hits = idx.search(&q, 3, &BTreeMap::new()).unwrap();
        assert_eq!(hits.iter().map(|h| h.key).collect::<Vec<_>>(), vec![2, 3]);
        assert!(idx.add(9, &[1.0], entry("d", "x")).is_err());
    }
}
