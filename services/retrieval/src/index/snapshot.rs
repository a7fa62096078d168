//! Index snapshots: the HNSW graph as USearch saves it
//! (`<dir>/<collection>.usearch`) and the keys it holds
//! (`<dir>/<collection>.keys`, little-endian u64). Written to temporary files
//! and renamed, keys last, so a crash leaves the previous snapshot or none.
//! On start the snapshot is reconciled with the store: keys the store no
//! longer has are removed, chunks the snapshot lacks are added.

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use usearch::Index;

use super::{CollectionIndex, HnswParams, index_error, usearch_options};
use crate::RetrievalError;

fn paths(dir: &Path, collection: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{collection}.usearch")),
        dir.join(format!("{collection}.keys")),
    )
}

fn path_str(p: &Path) -> Result<&str, RetrievalError> {
    p.to_str()
        .ok_or_else(|| RetrievalError::Index(format!("snapshot path {} is not UTF-8", p.display())))
}

/// Saves `index` as the snapshot of `collection` in `dir`; returns its time.
/// Errors with [`RetrievalError::Index`] when a file cannot be written.
pub fn save(
    index: &CollectionIndex,
    dir: &Path,
    collection: &str,
) -> Result<SystemTime, RetrievalError> {
    std::fs::create_dir_all(dir).map_err(index_error)?;
    let (graph, keys) = paths(dir, collection);
    let graph_tmp = graph.with_extension(format!("usearch.{}.tmp", std::process::id()));
    let keys_tmp = keys.with_extension(format!("keys.{}.tmp", std::process::id()));
    index
        .hnsw()
        .save(path_str(&graph_tmp)?)
        .map_err(index_error)?;
    let bytes: Vec<u8> = index.keys().flat_map(u64::to_le_bytes).collect();
    std::fs::write(&keys_tmp, bytes).map_err(index_error)?;
    // Keys are removed first and renamed last: a graph without its keys file
    // is never taken for a snapshot.
    let _ = std::fs::remove_file(&keys);
    std::fs::rename(&graph_tmp, &graph).map_err(index_error)?;
    std::fs::rename(&keys_tmp, &keys).map_err(index_error)?;
    Ok(SystemTime::now())
}

/// Removes the snapshot of `collection` (absent files are fine).
pub fn remove(dir: &Path, collection: &str) {
    let (graph, keys) = paths(dir, collection);
    let _ = std::fs::remove_file(keys);
    let _ = std::fs::remove_file(graph);
}

/// Loads the snapshot of `collection`: an index without entries, the keys it
/// holds, and the snapshot's time. `None` when there is none, it is
/// unreadable, or its dimension differs (then the index is rebuilt from the
/// store).
pub fn load(
    dir: &Path,
    collection: &str,
    dimension: usize,
    params: HnswParams,
) -> Option<(CollectionIndex, Vec<u64>, SystemTime)> {
    let (graph, keys_path) = paths(dir, collection);
    let keys_bytes = std::fs::read(&keys_path).ok()?;
    let at = std::fs::metadata(&keys_path)
        .and_then(|m| m.modified())
        .ok()?;
    let hnsw = Index::new(&usearch_options(dimension, params)).ok()?;
    if let Err(e) = hnsw.load(graph.to_str()?) {
        tracing::warn!(collection, error = %e, "index snapshot unreadable; rebuilding from the store");
        return None;
    }
    if hnsw.dimensions() != dimension {
        return None;
    }
    let keys: Vec<u64> = keys_bytes
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .collect();
    hnsw.change_expansion_search(params.ef_search);
    Some((
        CollectionIndex::from_parts(hnsw, dimension, params),
        keys,
        at,
    ))
}
