//! The turn engine's upstream interfaces: one small trait per upstream it
//! depends on, implemented by typed gRPC clients in production
//! (`gateway/src/upstream/grpc.rs`) and by in-process fakes in the engine's
//! tests (`gateway/src/turn/tests/fakes.rs`).
//!
//! Every method is **one attempt**: retries, backoff, the deadline and the
//! per-call metrics are the call policy's ([`super::policy`]), in one place
//! for every upstream. `timeout` is what is left of the turn's budget for
//! this attempt; an implementation forwards it as the call's own deadline
//! (the gRPC `grpc-timeout` header) so the callee stops too, and the policy
//! enforces it.

use std::time::Duration;

use futures::{future::BoxFuture, stream::BoxStream};
use moltbot_proto::{
    context::v1 as ctx,
    generation::v1::{
        CountTokensRequest, CountTokensResponse, GenerateRequest, GenerateResponse, ModelInfo,
    },
};

use super::report::{IntentInfo, Source};
use crate::{ApiError, routing::config::RetrievalConfig};

/// The result of one upstream attempt.
pub type Call<'a, T> = BoxFuture<'a, Result<T, tonic::Status>>;

/// How a generation stream broke after it started.
#[derive(Debug, Clone)]
pub struct Broke {
    /// The status the stream ended with.
    pub status: tonic::Status,
    /// True when the connection to the replica failed (a transport error,
    /// not a status the service itself sent): only such a break may be
    /// restarted on another replica.
    pub transport: bool,
}

/// The events of one started generation: deltas and tool calls, then one
/// summary. Dropping it cancels the generation upstream.
pub type Events = BoxStream<'static, Result<GenerateResponse, Broke>>;

/// Conversation memory (the context service).
pub trait Sessions: Send + Sync {
    /// The newest `max_turns` turns of `session` (oldest first), with the
    /// token counts stored when they were written. NOT_FOUND for a session
    /// that has no turns yet.
    fn history<'a>(
        &'a self,
        tenant: &'a str,
        session: &'a str,
        max_turns: u32,
        timeout: Duration,
    ) -> Call<'a, Vec<ctx::Turn>>;

    /// Appends `turns` to `session` in one call, idempotent by `key` (a
    /// retry after a lost answer stores nothing twice).
    fn append<'a>(
        &'a self,
        tenant: &'a str,
        session: &'a str,
        turns: &'a [ctx::Turn],
        key: &'a str,
        timeout: Duration,
    ) -> Call<'a, ()>;
}

/// Intent classification (the understanding service).
pub trait Understanding: Send + Sync {
    /// Classifies `text`. FAILED_PRECONDITION while no head is served.
    fn classify<'a>(&'a self, text: &'a str, timeout: Duration) -> Call<'a, IntentInfo>;
}

/// Knowledge search (the retrieval service).
pub trait Retrieval: Send + Sync {
    /// The passages of `config.collection` nearest to `text`, best first.
    fn search<'a>(
        &'a self,
        config: &'a RetrievalConfig,
        text: &'a str,
        timeout: Duration,
    ) -> Call<'a, Vec<Source>>;

    /// The content version of each of `collections` the service knows (a
    /// write raises it): part of the response cache's key.
    fn versions<'a>(
        &'a self,
        collections: &'a [String],
        timeout: Duration,
    ) -> Call<'a, std::collections::HashMap<String, u64>>;
}

/// Token counting and generation (the generation service).
pub trait Generation: Send + Sync {
    /// Counts a prompt and texts with a model's tokenizer. NOT_FOUND for a
    /// model not served, UNIMPLEMENTED for one that cannot count (remote).
    fn count_tokens(
        &self,
        request: CountTokensRequest,
        timeout: Duration,
    ) -> Call<'_, CountTokensResponse>;

    /// Starts `request` (its `model` set); resolves once the call is open.
    /// `affinity` keeps a session's turns on one replica when it can.
    fn generate<'a>(
        &'a self,
        request: GenerateRequest,
        affinity: Option<&'a str>,
        timeout: Duration,
    ) -> Call<'a, Events>;

    /// The models served, local and remote.
    fn list_models(&self, timeout: Duration) -> Call<'_, Vec<ModelInfo>>;
}

/// What a turn is admitted with ([`Charge::reserve`]).
#[derive(Debug, Clone, Copy)]
pub struct Admit<'a> {
    /// The turn's id (`chatcmpl-…`): the ledger row's request id.
    pub request_id: &'a str,
    /// The route taken.
    pub route: &'a str,
    /// The models that may answer, in order (the worst case is reserved
    /// at the dearest).
    pub chain: &'a [String],
    /// Tokens of the prompt.
    pub prompt_tokens: u32,
    /// Most completion tokens (`max_tokens`).
    pub completion_budget: u32,
    /// The route refuses models without a price when a budget applies.
    pub refuse_unpriced: bool,
    /// The answer is replayed from the response cache: no tokens per
    /// minute are taken, the cache-hit price applies.
    pub cache_hit: bool,
}

/// The tokens a turn used, as it settles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    /// Prompt tokens, the cached included.
    pub prompt_tokens: u32,
    /// Prompt tokens a provider served from its prompt cache.
    pub cached_tokens: u32,
    /// Completion tokens.
    pub completion_tokens: u32,
}

impl Used {
    /// Prompt plus completion tokens.
    pub fn total(&self) -> u32 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// What a turn holds against the caller's limits and budgets (the edge's
/// meter implements it: `gateway/src/spend/meter.rs`). Dropped without
/// [`Reserved::settle`] (a cancelled or failed turn), it charges what was
/// seen.
pub trait Reserved: Send + Sync {
    /// The generation of `model` started (the model a drop charges).
    fn started(&mut self, model: &str);
    /// Counts `n` completion tokens produced so far (charged if the turn
    /// ends without settling).
    fn saw_completion(&mut self, n: u32);
    /// Charges what the turn used instead of the reservation.
    fn settle(self: Box<Self>, used: Used);
}

/// Admission of a turn's cost: the caller's tokens per minute and budgets.
pub trait Charge: Send + Sync {
    /// Reserves the prompt's tokens and the whole completion budget, and
    /// their worst-case cost on every budget of the caller. Errors with
    /// [`ApiError::RateLimited`], [`ApiError::BudgetExceeded`],
    /// [`ApiError::Unpriced`], or 503 when the budget store fails.
    fn reserve<'a>(
        &'a self,
        admit: Admit<'a>,
    ) -> BoxFuture<'a, Result<Box<dyn Reserved>, ApiError>>;
}

/// A charge that admits everything and charges nothing (batch work and
/// tests that do not exercise limits).
#[derive(Debug, Clone, Copy, Default)]
pub struct Free;

impl Reserved for Free {
    fn started(&mut self, _model: &str) {}
    fn saw_completion(&mut self, _n: u32) {}
    fn settle(self: Box<Self>, _used: Used) {}
}

impl Charge for Free {
    fn reserve<'a>(
        &'a self,
        _admit: Admit<'a>,
    ) -> BoxFuture<'a, Result<Box<dyn Reserved>, ApiError>> {
        Box::pin(async { Ok(Box::new(Free) as Box<dyn Reserved>) })
    }
}
