//! The enrichments of a turn: intent from understanding and passages from
//! retrieval. Each runs under the call policy within its stage budget; a
//! failure or a missed deadline comes back as `Err(reason)` so the turn goes
//! on degraded instead of failing.

use super::{
    IntentInfo, Source,
    policy::{self, Budget},
    ports::{Retrieval, Understanding},
};
use crate::routing::config::RetrievalConfig;

fn reason(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Classifies `text`. Errors with a reason when understanding fails, has no
/// trained head, or misses `budget`.
pub async fn classify(
    understanding: &dyn Understanding,
    text: &str,
    budget: Budget,
) -> Result<IntentInfo, String> {
    policy::call("understanding", "classify", budget, |left| {
        understanding.classify(text, left)
    })
    .await
    .map_err(|s| reason(&s))
}

/// Searches `config.collection` for `text`. Errors with a reason when
/// retrieval fails, the collection does not exist, or `budget` passes.
pub async fn retrieve(
    retrieval: &dyn Retrieval,
    config: &RetrievalConfig,
    text: &str,
    budget: Budget,
) -> Result<Vec<Source>, String> {
    policy::call("retrieval", "search", budget, |left| {
        retrieval.search(config, text, left)
    })
    .await
    .map_err(|s| reason(&s))
}
