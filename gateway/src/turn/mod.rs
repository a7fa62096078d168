//! The turn engine (docs/architecture.md, "The request path"): one chat turn
//! from a neutral [`TurnRequest`] to its end, whatever protocol it came in.
//!
//! The stages, in order (each a function of this folder):
//!
//! 1. **route candidates** for the request model ([`Engine::start`]);
//!    1b. **response cache**: a cacheable request's key is derived from
//!    its history and the routes' collection versions, and a hit is
//!    replayed from here on as a started generation (`cache.rs`);
//! 2. **context and enrichments**, concurrently: the session's history
//!    ([`ports::Sessions`]), the intent ([`ports::Understanding`], when a
//!    route of the model uses it) and the provisional route's passages
//!    ([`ports::Retrieval`]) — `prepare.rs`;
//! 3. **route** on model and intent, the route's client-turn policy;
//! 4. **prompt** within the model's context window, counted by the first
//!    candidate that can (`prompt.rs`; stored history counts are reused);
//! 5. **charge**: the prompt and the completion budget reserved against the
//!    caller's tokens per minute ([`ports::Charge`]);
//! 6. **generate** across the route's candidates (`generate.rs`);
//! 7. **run**: drain the generation into an [`Output`], restart it once it
//!    broke before anything was sent, then settle — the session written
//!    exactly once, the charge settled, the metrics recorded (`run.rs`).
//!
//! Every upstream call goes through the one call policy ([`policy`]): one
//! deadline budget per turn, one table of retryable codes, one walk over
//! the candidates. Enrichments are optional (a failure or a missed deadline
//! is named in `moltbot.degraded`); context and generation are required.
//! The engine knows nothing of HTTP or OpenAI: protocol adapters
//! (`gateway/src/adapters/`) build the request and format the [`Output`].

mod cache;
mod enrich;
mod generate;
pub mod metrics;
pub mod policy;
pub mod ports;
mod prepare;
pub mod prompt;
pub mod report;
mod request;
mod run;

#[cfg(test)]
mod tests;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use moltbot_proto::{
    context::v1 as ctx,
    generation::v1::{GenerateRequest, ModelInfo},
};
use rand::Rng;
use tokio::time::Instant;

pub use generate::Started;
pub use ports::{Admit, Charge, Reserved, Used};
pub use report::{Attempt, Extension, IntentInfo, Source, Usage};
pub use request::{Sampling, TurnRequest};
pub use run::{Answer, Buffered, Ended, Finish, Gone, Output, into_result, stored_text};

use crate::{
    ApiError,
    routing::{
        Route, Router,
        config::{Candidate, RetryPolicy},
    },
};

/// How long the generation service's model list is reused, for resolving
/// request models no route names.
const MODEL_LIST_TTL: Duration = Duration::from_secs(30);

/// The memory tier of an engine built without [`Engine::with_cache`]:
/// 64 MiB of entries.
pub const DEFAULT_CACHE_MEMORY_BYTES: u64 = 64 << 20;

/// The engine's upstreams, one trait object each.
#[derive(Clone)]
pub struct Ports {
    /// Conversation memory.
    pub sessions: Arc<dyn ports::Sessions>,
    /// Intent classification (an enrichment).
    pub understanding: Arc<dyn ports::Understanding>,
    /// Knowledge search (an enrichment).
    pub retrieval: Arc<dyn ports::Retrieval>,
    /// Token counting and generation.
    pub generation: Arc<dyn ports::Generation>,
}

/// Settings of [`Engine::new`].
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Most time each enrichment and the history load may take; also the
    /// budget of the session write after the answer.
    pub enrichment_timeout: Duration,
    /// Default (and largest) deadline of a whole turn.
    pub request_timeout: Duration,
}

/// The turn engine: the routes and the upstreams.
pub struct Engine {
    ports: Ports,
    /// The routes in force; a reload swaps them ([`crate::reload`]) while
    /// every started turn keeps the routes it cloned.
    router: crate::reload::Live<Router>,
    settings: Settings,
    models: Mutex<Option<(Instant, Vec<ModelInfo>)>>,
    /// Models that answered UNIMPLEMENTED to `CountTokens` (remote ones),
    /// and when.
    uncountable: Mutex<std::collections::HashMap<String, Instant>>,
    /// The response cache (stage 1b).
    cache: Arc<crate::cache::ResponseCache>,
    /// Live rollouts: how they change routes (stage 1) and which models a
    /// session's variant tries (stage 3).
    rollouts: Arc<crate::rollout::Rollouts>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("router", &self.router)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A turn up to its generation: everything the run settles with.
#[derive(Debug)]
pub struct Prepared {
    /// `chatcmpl-…`, also the idempotency key of the session write.
    pub id: String,
    /// The caller's tenant: the session is read and written under it.
    pub tenant: String,
    /// Tokens of the assembled prompt.
    pub prompt_tokens: u32,
    /// Unix seconds.
    pub created: u64,
    /// Route name.
    pub route: String,
    /// Models to try, in order.
    pub chain: Vec<String>,
    /// Retry policy of the route.
    pub retry: RetryPolicy,
    /// The generation request (model filled per attempt).
    pub request: GenerateRequest,
    /// The request's messages as they will be stored.
    pub new_turns: Vec<ctx::Turn>,
    /// The response extension so far.
    pub ext: Extension,
    /// The turn's deadline.
    pub budget: policy::Budget,
    /// When the request arrived.
    pub arrived: Instant,
    /// Whether the turn is written to the session.
    pub store: bool,
    /// The model whose tokenizer counted the prompt: an answer of that model
    /// is stored with its token count, any other without (counted again
    /// when a later prompt needs it).
    pub counted_by: Option<String>,
    /// Where the answer goes in the response cache, and for how long, if it
    /// ends normally.
    pub cache_write: Option<(crate::cache::Key, Duration)>,
    /// The answer is replayed from the response cache.
    pub from_cache: bool,
}

/// A turn whose generation has started: run it into an [`Output`] with
/// [`Turn::run`]. Dropping it cancels the generation and charges what was
/// used.
pub struct Turn {
    engine: Arc<Engine>,
    prepared: Prepared,
    reserved: Box<dyn Reserved>,
    started: Started,
}

impl std::fmt::Debug for Turn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turn")
            .field("prepared", &self.prepared)
            .finish_non_exhaustive()
    }
}

impl Turn {
    /// What the turn was prepared with (id, session, route, …).
    pub fn prepared(&self) -> &Prepared {
        &self.prepared
    }

    /// Runs the turn to its end into `out` (docs of `run.rs`). Returns how it
    /// ended and the response extension.
    pub async fn run<O: Output>(self, out: &mut O) -> (Ended, Extension) {
        let Self {
            engine,
            mut prepared,
            reserved,
            started,
        } = self;
        let ended = run::run(&engine, &mut prepared, reserved, started, out).await;
        (ended, prepared.ext)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random lower-case hex id with a prefix.
pub fn new_id(prefix: &str) -> String {
    let bytes: [u8; 12] = rand::rng().random();
    let mut out = String::with_capacity(prefix.len() + 24);
    out.push_str(prefix);
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

impl Engine {
    /// An engine over `ports` with `router`.
    pub fn new(ports: Ports, router: Router, settings: Settings) -> Self {
        Self {
            ports,
            router: crate::reload::Live::new(router),
            settings,
            models: Mutex::new(None),
            uncountable: Mutex::new(std::collections::HashMap::new()),
            cache: Arc::new(crate::cache::ResponseCache::in_memory(
                DEFAULT_CACHE_MEMORY_BYTES,
            )),
            rollouts: Arc::new(crate::rollout::Rollouts::in_memory()),
        }
    }

    /// This engine with `rollouts` as its live rollouts.
    pub fn with_rollouts(mut self, rollouts: Arc<crate::rollout::Rollouts>) -> Self {
        self.rollouts = rollouts;
        self
    }

    /// The live rollouts (for the operator's endpoints).
    pub fn rollouts(&self) -> &Arc<crate::rollout::Rollouts> {
        &self.rollouts
    }

    /// This engine with `cache` as its response cache.
    pub fn with_cache(mut self, cache: Arc<crate::cache::ResponseCache>) -> Self {
        self.cache = cache;
        self
    }

    /// The response cache (for the operator's purge).
    pub fn cache(&self) -> &Arc<crate::cache::ResponseCache> {
        &self.cache
    }

    /// Default (and largest) deadline of one request.
    pub fn request_timeout(&self) -> Duration {
        self.settings.request_timeout
    }

    /// The routes in force now.
    pub fn router(&self) -> Arc<Router> {
        self.router.get()
    }

    /// Replaces the routes (a configuration reload): turns that started
    /// keep theirs, the next turn takes these.
    pub fn set_router(&self, router: Router) {
        self.router.set(router);
    }

    /// Runs stages 1 to 6 (see the module doc) for `req` on behalf of
    /// `tenant`, charging `charge`: the turn, once its generation produced
    /// its first event.
    ///
    /// Errors: 400 for a route policy the request breaks, 404 for an unknown
    /// model, 422 for a prompt longer than the context window, 429 from
    /// `charge`, 503/504 when context or every candidate failed or the
    /// deadline ran out. A turn that fails here has written nothing.
    pub async fn start(
        self: &Arc<Self>,
        mut req: TurnRequest,
        tenant: &str,
        charge: &dyn Charge,
    ) -> Result<Turn, ApiError> {
        let arrived = Instant::now();
        let timeout = req.timeout.map_or(self.settings.request_timeout, |t| {
            t.min(self.settings.request_timeout)
        });
        let budget = policy::Budget::new(timeout);
        let routes = self.routes_for(&req.model, budget).await?;
        let session_id = req
            .session_id
            .get_or_insert_with(|| new_id("sess-"))
            .clone();
        let (history, cache_status, cache_write) = match self
            .look_up(&req, tenant, &session_id, &routes, budget)
            .await?
        {
            cache::Looked::Hit { entry, route } => {
                let (prepared, started) =
                    cache::replay(req, tenant, session_id, route, &entry, budget, arrived)?;
                crate::cache::record(crate::cache::Status::Hit, Some(arrived.elapsed()));
                // A hit generates nothing: no tokens per minute, and the
                // cache-hit price (zero by default) on the budgets.
                let reserved = charge
                    .reserve(Admit {
                        request_id: &prepared.id,
                        route: &prepared.route,
                        chain: std::slice::from_ref(&entry.model),
                        prompt_tokens: entry.prompt_tokens,
                        completion_budget: entry.completion_tokens,
                        refuse_unpriced: false,
                        cache_hit: true,
                    })
                    .await?;
                return Ok(Turn {
                    engine: self.clone(),
                    prepared,
                    reserved,
                    started,
                });
            }
            cache::Looked::Miss {
                history,
                status,
                store,
            } => (Some(history), status, store),
            cache::Looked::Bypass => (None, crate::cache::Status::Bypass, None),
        };
        crate::cache::record(cache_status, None);
        let mut prepared = self
            .prepare(req, tenant, &routes, budget, arrived, history)
            .await?;
        prepared.ext.cache = Some(crate::cache::CacheInfo::of(cache_status));
        prepared.cache_write = cache_write;
        let budget_tokens = prepared
            .request
            .sampling
            .as_ref()
            .map_or(0, |s| s.max_tokens);
        let refuse_unpriced = routes
            .iter()
            .find(|r| r.name == prepared.route)
            .is_some_and(|r| r.refuse_unpriced);
        let reserved = charge
            .reserve(Admit {
                request_id: &prepared.id,
                route: &prepared.route,
                chain: &prepared.chain,
                prompt_tokens: prepared.prompt_tokens,
                completion_budget: budget_tokens,
                refuse_unpriced,
                cache_hit: false,
            })
            .await?;
        let started = generate::start(&self.ports, &mut prepared).await;
        if let Some(assigned) = &prepared.ext.rollout {
            self.rollouts.observe(
                assigned,
                &prepared.ext.attempts,
                started.as_ref().ok().map(|s| s.model.as_str()),
                prepared.arrived.elapsed(),
                matches!(started, Err(ApiError::AllAttemptsFailed { .. })),
            );
        }
        let started = match started {
            Ok(s) => s,
            Err(e) => {
                run::count(&prepared, "error");
                return Err(e);
            }
        };
        metrics::TTFT
            .with_label_values(&[prepared.route.as_str()])
            .observe(prepared.arrived.elapsed().as_secs_f64());
        Ok(Turn {
            engine: self.clone(),
            prepared,
            reserved,
            started,
        })
    }

    /// The generation service's models, cached for [`MODEL_LIST_TTL`].
    /// Errors with [`ApiError::Upstream`] when generation is unreachable.
    pub async fn served_models(&self) -> Result<Vec<ModelInfo>, ApiError> {
        self.served_models_within(policy::Budget::new(self.settings.enrichment_timeout))
            .await
    }

    /// The generation service's models read now, not from the cache (an
    /// operator who just added a provider expects to see it). Errors as
    /// [`Engine::served_models`].
    pub async fn served_models_now(&self) -> Result<Vec<ModelInfo>, ApiError> {
        if let Ok(mut cache) = self.models.lock() {
            *cache = None;
        }
        self.served_models().await
    }

    async fn served_models_within(
        &self,
        budget: policy::Budget,
    ) -> Result<Vec<ModelInfo>, ApiError> {
        if let Ok(cache) = self.models.lock()
            && let Some((at, models)) = cache.as_ref()
            && at.elapsed() < MODEL_LIST_TTL
        {
            return Ok(models.clone());
        }
        let budget = budget.capped(self.settings.enrichment_timeout);
        let generation = &self.ports.generation;
        let models = policy::call("generation", "list_models", budget, |left| {
            generation.list_models(left)
        })
        .await
        .map_err(|status| ApiError::Upstream {
            service: "generation",
            status,
        })?;
        if let Ok(mut cache) = self.models.lock() {
            *cache = Some((Instant::now(), models.clone()));
        }
        Ok(models)
    }

    /// The routes a request model may take, as their rollouts leave them
    /// ([`crate::rollout::effective`]); a model no route names but the
    /// generation service serves gets a direct route of its own.
    async fn routes_for(
        &self,
        model: &str,
        budget: policy::Budget,
    ) -> Result<Vec<Route>, ApiError> {
        let rollouts = self.rollouts.snapshot();
        let routes: Vec<Route> = self
            .router
            .get()
            .for_model(model)
            .into_iter()
            .map(|r| crate::rollout::effective(r.clone(), rollouts.get(&r.name)))
            .collect();
        if !routes.is_empty() {
            return Ok(routes);
        }
        let served = self.served_models_within(budget).await?;
        if served.iter().any(|m| m.name == model) {
            return Ok(vec![Route {
                name: model.to_owned(),
                matches: Default::default(),
                system_prompt: None,
                understanding: true,
                retrieval: None,
                candidates: vec![Candidate {
                    model: model.to_owned(),
                    weight: 1,
                }],
                fallbacks: Vec::new(),
                retry: RetryPolicy::default(),
                default_max_tokens: 256,
                client_turns: Default::default(),
                cache: Default::default(),
                refuse_unpriced: false,
                rollout: None,
            }]);
        }
        Err(ApiError::ModelNotFound(model.to_owned()))
    }
}
