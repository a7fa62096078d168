//! Replica convergence: every `MOLTBOT_FOLLOW_INTERVAL_MS` the follower
//! reads the store's change log (crate::store::changes) after the last
//! position it applied and applies each change to this replica's
//! in-process indexes, in commit order:
//!
//! - `chunks`: the removed keys leave the index; the added keys that still
//!   exist in the store are read back with their vectors (nothing is
//!   re-embedded) and enter it;
//! - `collection_created` / `collection_deleted`: the collection is loaded
//!   or dropped.
//!
//! Changes this replica made itself are already in its index; applying them
//! again changes nothing. Each change is applied under the collection's
//! writer lock, as local writes are, so a local write and a followed one
//! never interleave. Bound: a write through one replica is searchable
//! through another within one interval plus the time to apply.

use std::{
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use crate::{
    RetrievalError,
    index::snapshot,
    state::{State, entry_of, now_ms},
    store::changes::{self, Change},
};

/// Changes read per round trip.
const BATCH: i64 = 500;

/// Changes older than this are pruned from the log (ms): a replica that
/// was away longer reloads from the store at its next start.
const KEEP_MS: i64 = 3_600_000;

/// Starts following from `cursor` (the position read before the state was
/// loaded). The task ends when the state is dropped.
pub fn spawn(state: &Arc<State>, cursor: i64, interval: Duration) {
    let weak = Arc::downgrade(state);
    tokio::spawn(run(weak, cursor, interval));
}

async fn run(state: Weak<State>, mut cursor: i64, interval: Duration) {
    let mut rounds: u64 = 0;
    loop {
        tokio::time::sleep(interval).await;
        let Some(state) = state.upgrade() else { return };
        match catch_up(&state, cursor).await {
            Ok(next) => cursor = next,
            Err(e) => tracing::warn!(error = %e, cursor, "cannot read the change log; retrying"),
        }
        rounds += 1;
        // About once a minute at the default interval.
        if rounds.is_multiple_of(120)
            && let Err(e) = state.store.prune_changes(now_ms() - KEEP_MS).await
        {
            tracing::warn!(error = %e, "cannot prune the change log");
        }
    }
}

/// Applies every change after `cursor`; returns the new position.
pub async fn catch_up(state: &State, mut cursor: i64) -> Result<i64, RetrievalError> {
    loop {
        let batch = state.store.changes_after(cursor, BATCH).await?;
        let Some(last) = batch.last().map(|c| c.seq) else {
            return Ok(cursor);
        };
        for change in &batch {
            apply(state, change).await?;
        }
        cursor = last;
        if (batch.len() as i64) < BATCH {
            return Ok(cursor);
        }
    }
}

async fn apply(state: &State, change: &Change) -> Result<(), RetrievalError> {
    let name = &change.collection;
    match change.kind.as_str() {
        changes::COLLECTION_CREATED => {
            if state.collection(name).is_err()
                && let Some(row) = state.store.collection_row(name).await?
            {
                state.load_collection(row, change.seq).await?;
                tracing::info!(collection = %name, "followed: collection created");
            }
        }
        changes::COLLECTION_DELETED => {
            let still = state.store.collection_row(name).await?;
            let mut all = state
                .collections
                .write()
                .map_err(|_| RetrievalError::Index("collections lock poisoned".into()))?;
            // Deleted and created again since: the newer collection stays.
            let replaced = matches!((all.get(name), &still), (Some(c), Some(row)) if c.row.created_at_ms == row.created_at_ms);
            if !replaced && all.remove(name).is_some() {
                snapshot::remove(&state.snapshot_dir, name);
                tracing::info!(collection = %name, "followed: collection deleted");
            }
        }
        changes::CHUNKS => {
            // A collection deleted since: nothing to apply.
            let Ok(collection) = state.collection(name) else {
                return Ok(());
            };
            let _writer = collection.writer.lock().await;
            let added: Vec<u64> = {
                let index = collection
                    .index
                    .read()
                    .map_err(|_| RetrievalError::Index("index lock poisoned".into()))?;
                change
                    .added
                    .iter()
                    .copied()
                    .filter(|k| !index.contains(*k))
                    .collect()
            };
            let rows = state.store.chunks_with_keys(name, &added).await?;
            let mut index = collection
                .index
                .write()
                .map_err(|_| RetrievalError::Index("index lock poisoned".into()))?;
            let mut changed = false;
            for key in &change.removed {
                if index.contains(*key) {
                    index.remove(*key)?;
                    changed = true;
                }
            }
            for row in &rows {
                if let Some(vector) = &row.vector
                    && !index.contains(row.key)
                {
                    index.add(row.key, vector, entry_of(row))?;
                    changed = true;
                }
            }
            if changed {
                collection.dirty.store(true, Ordering::Release);
                tracing::debug!(collection = %name, seq = change.seq, "followed a write");
            }
            collection.applied(change.seq);
        }
        other => tracing::warn!(
            kind = other,
            seq = change.seq,
            "unknown change kind; skipped"
        ),
    }
    Ok(())
}
