//! Stage 1b of a turn: the response cache's exact tier
//! (`gateway/src/cache/`), before any enrichment.
//!
//! A request is cacheable when every route its model may take has the cache
//! on, its temperature is at most the routes' `cache.max_temperature` (no
//! temperature counts as 1, OpenAI's default) and it asks for no log
//! probabilities. For such a request the session's history and the
//! routes' collection versions are read first (concurrently), the key is
//! derived, and a hit is replayed as a started generation: no
//! classification, retrieval, counting or generation, no tokens charged to
//! the caller's tokens per minute, and the session written as for a
//! generated answer. A miss hands the history on to stage 2 (read once) and
//! keeps the key so the run stores the answer if it ends normally.

use std::time::Duration;

use moltbot_proto::{context::v1 as ctx, generation::v1::GenerateRequest};
use tokio::time::Instant;

use super::{
    Engine, Extension, Prepared, TurnRequest,
    generate::Started,
    new_id, policy,
    prepare::{client_turns, session_turns},
    unix_now,
};
use crate::{
    ApiError,
    cache::{self, CacheInfo, Entry, Key, Status},
    routing::{Route, Router},
};

/// What the lookup came to.
pub(super) enum Looked<'a> {
    /// Not looked up and not to be stored.
    Bypass,
    /// Looked up (or skipped by `no-cache`) without an answer: the history
    /// it read, the cache status to report and where to store the answer.
    Miss {
        history: Vec<ctx::Turn>,
        status: Status,
        store: Option<(Key, Duration)>,
    },
    /// A stored answer and the route (of those the request may take) that
    /// gave it.
    Hit {
        entry: std::sync::Arc<Entry>,
        route: &'a Route,
    },
}

/// The cache settings a request gets from its routes: `(route that tags the
/// key, TTL)`, or `None` when the request is not cacheable.
fn policy_of<'a>(routes: &'a [Route], req: &TurnRequest) -> Option<(&'a Route, Duration)> {
    if routes.is_empty() || routes.iter().any(|r| !r.cache.enabled) || req.sampling.logprobs {
        return None;
    }
    let max_temperature = routes
        .iter()
        .map(|r| r.cache.max_temperature)
        .fold(f32::INFINITY, f32::min);
    if req.sampling.temperature.unwrap_or(1.0) > max_temperature {
        return None;
    }
    let ttl = routes.iter().map(|r| r.cache.ttl_s).min().unwrap_or(0);
    let refs: Vec<&Route> = routes.iter().collect();
    Router::provisional(&refs).map(|r| (r, Duration::from_secs(ttl)))
}

impl Engine {
    /// Stage 1b (module doc). Errors only as stage 2 would: the history is
    /// required (503 when context fails).
    pub(super) async fn look_up<'a>(
        &self,
        req: &TurnRequest,
        tenant: &str,
        session_id: &str,
        routes: &'a [Route],
        budget: policy::Budget,
    ) -> Result<Looked<'a>, ApiError> {
        let Some((route, ttl)) = policy_of(routes, req) else {
            return Ok(Looked::Bypass);
        };
        let control = req.cache_control;
        if control.no_cache && control.no_store {
            return Ok(Looked::Bypass);
        }
        let stage = budget.capped(self.settings.enrichment_timeout);
        let mut collections: Vec<String> = routes
            .iter()
            .filter_map(|r| r.retrieval.as_ref().map(|c| c.collection.clone()))
            .collect();
        collections.sort();
        collections.dedup();
        let retrieval = &self.ports.retrieval;
        let (history, versions) = tokio::join!(self.history(tenant, session_id, stage), async {
            if collections.is_empty() {
                return Ok(Default::default());
            }
            policy::call("retrieval", "versions", stage, |left| {
                retrieval.versions(&collections, left)
            })
            .await
        });
        let history = history?;
        let versions = match versions {
            Ok(v) => v,
            // Without the versions a RAG answer cannot be keyed safely.
            Err(status) => {
                tracing::debug!(code = ?status.code(), "collection versions unavailable; cache bypassed");
                return Ok(Looked::Miss {
                    history,
                    status: Status::Bypass,
                    store: None,
                });
            }
        };
        // A collection the retrieval service does not know keys as 0.
        let versions: Vec<(String, u64)> = collections
            .into_iter()
            .map(|c| {
                let v = versions.get(&c).copied().unwrap_or(0);
                (c, v)
            })
            .collect();
        let key = cache::key::derive(&cache::key::Parts {
            tenant,
            route: &route.name,
            routes,
            history: &history,
            request: req,
            versions: &versions,
        });
        // An entry names the route that answered; the routes are part of
        // the key, so it is one of them (found all the same: a hit is
        // replayed on that route's policies).
        if !control.no_cache
            && let Some(entry) = self.cache.get(&key, ttl, control.max_age).await
            && let Some(answered) = routes.iter().find(|r| r.name == entry.route)
        {
            return Ok(Looked::Hit {
                entry,
                route: answered,
            });
        }
        Ok(Looked::Miss {
            history,
            status: if control.no_cache {
                Status::Bypass
            } else {
                Status::Miss
            },
            store: (!control.no_store).then_some((key, ttl)),
        })
    }
}

/// A hit as a turn whose generation has started: the entry replayed.
/// Errors with 400 when the route that answered refuses the request's
/// client turns (as a generated turn would be).
pub(super) fn replay(
    req: TurnRequest,
    tenant: &str,
    session_id: String,
    route: &Route,
    entry: &Entry,
    budget: policy::Budget,
    arrived: Instant,
) -> Result<(Prepared, Started), ApiError> {
    let stored = client_turns(route, &req.messages)?;
    // Stored without token counts: a later prompt counts them with the
    // tokenizer of the model it goes to.
    let new_turns = session_turns(&req.messages, &stored, &[]);
    let id = new_id("chatcmpl-");
    let age = entry.age();
    let prepared = Prepared {
        id: id.clone(),
        tenant: tenant.to_owned(),
        prompt_tokens: entry.prompt_tokens,
        created: unix_now(),
        route: entry.route.clone(),
        chain: Vec::new(),
        retry: route.retry,
        request: GenerateRequest {
            model: entry.model.clone(),
            request_id: id,
            session_id: session_id.clone(),
            ..Default::default()
        },
        new_turns,
        ext: Extension {
            session_id,
            intent: entry.intent.clone(),
            sources: entry.sources.clone(),
            route: entry.route.clone(),
            attempts: Vec::new(),
            degraded: Vec::new(),
            metadata: req.metadata,
            cache: Some(CacheInfo {
                status: Status::Hit,
                age_s: Some((age.as_millis() as f64 / 1000.0 * 10.0).round() / 10.0),
                similarity: None,
            }),
            rollout: None,
        },
        budget,
        arrived,
        store: req.store,
        counted_by: None,
        cache_write: None,
        from_cache: true,
    };
    let (first, events) = entry.events();
    cache::served_tokens(entry.prompt_tokens + entry.completion_tokens);
    Ok((
        prepared,
        Started {
            model: entry.model.clone(),
            first,
            events,
        },
    ))
}
