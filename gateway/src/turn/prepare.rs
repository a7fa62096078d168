//! Stages 2 to 4 of a turn (see `gateway/src/turn/mod.rs`): history and
//! enrichments concurrently, the route, the prompt within the context
//! window.

use moltbot_proto::{
    context::v1 as ctx,
    generation::v1::{self as gen_pb, GenerateRequest, SamplingParams},
};
use tokio::time::Instant;

use super::{
    Engine, Extension, IntentInfo, Prepared, TurnRequest, enrich, metrics, new_id,
    policy::{self, Budget},
    prompt, stored_text, unix_now,
};
use crate::{
    ApiError,
    routing::{IntentKey, Route, Router, config::ClientTurns, model_chain},
};

/// Most history turns loaded per turn (the token budget trims further).
pub const MAX_HISTORY_TURNS: u32 = 200;

/// The session role of a generation role.
fn ctx_role(role: gen_pb::Role) -> ctx::Role {
    match role {
        gen_pb::Role::System => ctx::Role::System,
        gen_pb::Role::User | gen_pb::Role::Unspecified => ctx::Role::User,
        gen_pb::Role::Assistant => ctx::Role::Assistant,
        gen_pb::Role::Tool => ctx::Role::Tool,
    }
}

/// The request's `messages` as the session keeps them: those `stored`
/// keeps ([`client_turns`]), each with its token count from `tokens` (by
/// position; 0 where none is given, counted again when a later prompt
/// needs it).
pub(super) fn session_turns(
    messages: &[gen_pb::ChatMessage],
    stored: &[bool],
    tokens: &[u32],
) -> Vec<ctx::Turn> {
    messages
        .iter()
        .zip(stored)
        .enumerate()
        .filter(|(_, (_, keep))| **keep)
        .map(|(i, (m, _))| ctx::Turn {
            role: ctx_role(m.role()) as i32,
            content: stored_text(&m.content, &m.tool_calls),
            token_count: tokens.get(i).copied().unwrap_or(0),
            created_at: None,
        })
        .collect()
}

/// Applies the route's [`ClientTurns`] policy to the request's `assistant`
/// messages: refused (400 naming the first), or kept for the prompt and
/// left out of what is written to the session (`false` in the returned
/// list). `tool` results are the client's own data, stored like user
/// messages (docs/security.md).
pub fn client_turns(
    route: &Route,
    messages: &[gen_pb::ChatMessage],
) -> Result<Vec<bool>, ApiError> {
    let supplied = |m: &gen_pb::ChatMessage| m.role == gen_pb::Role::Assistant as i32;
    match route.client_turns {
        ClientTurns::Refuse => match messages.iter().position(supplied) {
            Some(i) => Err(ApiError::InvalidRequest(format!(
                "route `{}` does not accept client-supplied assistant messages (non-system message {}); send the conversation's session_id instead",
                route.name,
                i + 1
            ))),
            None => Ok(vec![true; messages.len()]),
        },
        ClientTurns::Transient => Ok(messages.iter().map(|m| !supplied(m)).collect()),
    }
}

impl Engine {
    /// Whether `model` answered UNIMPLEMENTED to counting within
    /// `MODEL_LIST_TTL`.
    fn known_uncountable(&self, model: &str) -> bool {
        self.uncountable
            .lock()
            .ok()
            .and_then(|m| m.get(model).copied())
            .is_some_and(|at| at.elapsed() < super::MODEL_LIST_TTL)
    }

    /// Remembers the models that answered UNIMPLEMENTED to counting.
    fn learn_uncountable(&self, attempts: &[super::Attempt]) {
        if let Ok(mut m) = self.uncountable.lock() {
            for a in attempts.iter().filter(|a| a.outcome == "unimplemented") {
                m.insert(a.model.clone(), Instant::now());
            }
        }
    }

    /// The session's history within `budget` (capped by the enrichment
    /// timeout). A session's first turn has none (NOT_FOUND).
    pub(super) async fn history(
        &self,
        tenant: &str,
        session_id: &str,
        budget: Budget,
    ) -> Result<Vec<ctx::Turn>, ApiError> {
        let sessions = &self.ports.sessions;
        match policy::call("context", "history", budget, |left| {
            sessions.history(tenant, session_id, MAX_HISTORY_TURNS, left)
        })
        .await
        {
            Err(status) if status.code() == tonic::Code::NotFound => Ok(Vec::new()),
            r => r.map_err(|status| ApiError::Upstream {
                service: "context",
                status,
            }),
        }
    }

    /// Stages 2 to 4: a turn ready to generate. `history` is the session's
    /// history when stage 1b read it already, else it is read here
    /// concurrently with the enrichments.
    pub(super) async fn prepare(
        &self,
        req: TurnRequest,
        tenant: &str,
        routes: &[Route],
        budget: Budget,
        arrived: Instant,
        history: Option<Vec<ctx::Turn>>,
    ) -> Result<Prepared, ApiError> {
        let refs: Vec<&Route> = routes.iter().collect();
        let session_id = req.session_id.clone().unwrap_or_else(|| new_id("sess-"));
        let stage = budget.capped(self.settings.enrichment_timeout);
        let classify = refs.iter().any(|r| r.understanding);
        let provisional = Router::provisional(&refs).and_then(|r| r.retrieval.clone());
        let ports = &self.ports;
        let (history, intent, provisional_sources) = tokio::join!(
            async {
                match history {
                    Some(h) => Ok(h),
                    None => self.history(tenant, &session_id, stage).await,
                }
            },
            async {
                if classify {
                    Some(
                        enrich::classify(ports.understanding.as_ref(), &req.last_user, stage).await,
                    )
                } else {
                    None
                }
            },
            async {
                match &provisional {
                    Some(cfg) => Some(
                        enrich::retrieve(ports.retrieval.as_ref(), cfg, &req.last_user, stage)
                            .await,
                    ),
                    None => None,
                }
            }
        );
        let history = history?;
        let mut degraded = Vec::new();
        let intent: Option<IntentInfo> = match intent {
            None => None,
            Some(Ok(i)) => Some(i),
            Some(Err(reason)) => {
                tracing::warn!(%reason, "understanding skipped");
                degraded.push("understanding".to_owned());
                None
            }
        };
        let in_scope = intent.as_ref().filter(|i| !i.out_of_scope);
        let key = IntentKey {
            domain: in_scope.map(|i| i.domain.as_str()),
            intent: in_scope.map(|i| i.name.as_str()),
        };
        let route = Router::select(&refs, &key)
            .or(Router::provisional(&refs))
            .ok_or_else(|| ApiError::ModelNotFound(req.model.clone()))?;
        let stored = client_turns(route, &req.messages)?;
        let same_collection = match (&route.retrieval, &provisional) {
            (Some(a), Some(b)) => a.collection == b.collection,
            (None, _) => true,
            (Some(_), None) => false,
        };
        let sources = match (&route.retrieval, provisional_sources) {
            (None, _) => Ok(Vec::new()),
            (Some(_), Some(found)) if same_collection => found,
            (Some(cfg), _) => {
                let stage = budget.capped(self.settings.enrichment_timeout);
                enrich::retrieve(ports.retrieval.as_ref(), cfg, &req.last_user, stage).await
            }
        };
        let sources = match sources {
            Ok(s) => s,
            Err(reason) => {
                tracing::warn!(%reason, "retrieval skipped");
                degraded.push("retrieval".to_owned());
                Vec::new()
            }
        };
        for d in &degraded {
            metrics::DEGRADED.with_label_values(&[d.as_str()]).inc();
        }

        // A route under a rollout: the session's variant decides the chain
        // (canary first, or the stable models alone).
        let (chain, rollout) = match &route.rollout {
            Some(r) => {
                let assigned = self
                    .rollouts
                    .assign(r, tenant, &session_id, !history.is_empty())
                    .await;
                let chain = crate::rollout::chain(route, &r.to, assigned.variant, &mut rand::rng());
                (chain, Some(assigned))
            }
            None => (model_chain(route, &mut rand::rng()), None),
        };
        let parts = prompt::Parts {
            system: prompt::system_message(route.system_prompt.as_deref(), &req.system),
            passages: prompt::passages_message(&sources),
            new: req.messages.clone(),
        };
        let wanted = req.sampling.max_tokens.unwrap_or(route.default_max_tokens);
        // Models known not to count (remote ones) are not asked again
        // within MODEL_LIST_TTL: a relayed turn saves that round trip.
        let countable: Vec<String> = chain
            .iter()
            .filter(|m| !self.known_uncountable(m))
            .cloned()
            .collect();
        let mut counting = Vec::new();
        let assembled = prompt::assemble_on_chain(
            ports.generation.as_ref(),
            &countable,
            &route.retry,
            parts,
            &history,
            wanted,
            budget,
            &mut counting,
        )
        .await;
        self.learn_uncountable(&counting);
        let assembled = assembled.map_err(|e| match e {
            prompt::ChainError::Api(e) => e,
            prompt::ChainError::NoneServes => ApiError::ModelNotFound(req.model.clone()),
        })?;
        let new_turns = session_turns(&req.messages, &stored, &assembled.new_message_tokens);
        let id = new_id("chatcmpl-");
        let s = req.sampling;
        let request = GenerateRequest {
            model: String::new(),
            messages: assembled.messages,
            sampling: Some(SamplingParams {
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: None,
                repetition_penalty: None,
                seed: s.seed,
                max_tokens: assembled.max_tokens,
                stop: s.stop,
                logprobs: s.logprobs,
                top_logprobs: s.top_logprobs,
            }),
            request_id: id.clone(),
            session_id: session_id.clone(),
            response_format: req.response_format,
            tools: req.tools,
            tool_choice: req.tool_choice,
            parallel_tool_calls: req.parallel_tool_calls,
        };
        // Per turn, so debug: the request's own span and metrics carry
        // what an operator watches.
        tracing::debug!(
            route = %route.name,
            session = %moltbot_runtime::telemetry::redact::session_id(tenant, &session_id),
            end_user = req.end_user.as_deref().map(|u| moltbot_runtime::telemetry::redact::end_user(tenant, u)),
            // Keys only: values are the application's and may identify people.
            metadata_keys = req.metadata.as_ref().map(|m| m.keys().cloned().collect::<Vec<_>>().join(",")),
            history_kept = assembled.history_kept,
            sources = sources.len(),
            degraded = ?degraded,
            "turn prepared"
        );
        Ok(Prepared {
            id,
            tenant: tenant.to_owned(),
            prompt_tokens: assembled.prompt_tokens,
            created: unix_now(),
            route: route.name.clone(),
            chain,
            retry: route.retry,
            request,
            new_turns,
            ext: Extension {
                session_id,
                intent,
                sources,
                route: route.name.clone(),
                attempts: Vec::new(),
                degraded,
                metadata: req.metadata,
                cache: None,
                rollout,
            },
            budget,
            arrived,
            store: req.store,
            counted_by: assembled.counted_by,
            cache_write: None,
            from_cache: false,
        })
    }
}
