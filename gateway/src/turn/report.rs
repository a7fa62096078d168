//! What a turn reports besides its answer: usage, the intent, the sources,
//! the attempts and what was degraded. The `moltbot` extension object of
//! every API response ([`Extension`]) is this, serialised as is; the
//! protocol adapters re-export these types (`gateway/src/openai/mod.rs`).

use serde::{Deserialize, Serialize};

/// Token usage.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    /// Prompt tokens (after history and passages were added).
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
    /// OpenAI's `prompt_tokens_details`: on an answer from the response
    /// cache, `cached_tokens` equals `prompt_tokens` (the counts are the
    /// original generation's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from a cache.
    pub cached_tokens: u32,
}

/// `moltbot.intent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntentInfo {
    /// Domain, e.g. `banking`.
    pub domain: String,
    /// Intent, e.g. `balance`.
    pub name: String,
    /// Intent confidence in [0, 1].
    pub confidence: f32,
    /// True when the message is outside every known intent.
    pub out_of_scope: bool,
}

/// One of `moltbot.sources`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// `<collection>:<chunk id>`, as cited in the prompt.
    pub id: String,
    /// Cosine similarity to the query.
    pub score: f32,
    /// The passage.
    pub text: String,
}

/// One of `moltbot.attempts`.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    /// Model tried.
    pub model: String,
    /// `ok`, or the failure (`unavailable`, `deadline_exceeded`, …).
    pub outcome: String,
    /// Time the attempt took, in milliseconds.
    pub latency_ms: u64,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The `moltbot` extension object of every response.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Extension {
    /// Session the turns were stored in.
    pub session_id: String,
    /// Understanding's classification; null when degraded.
    pub intent: Option<IntentInfo>,
    /// Passages put in the prompt.
    pub sources: Vec<Source>,
    /// Route taken.
    pub route: String,
    /// Every generation attempt, in order.
    pub attempts: Vec<Attempt>,
    /// Enrichments skipped (`understanding`, `retrieval`) or steps that failed
    /// without failing the turn (`context_write`).
    pub degraded: Vec<String>,
    /// The request's `metadata`, when it had any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
    /// How the response cache took part (`status`, `age_s`, `similarity`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<crate::cache::CacheInfo>,
    /// The rollout the route is under and the session's variant (`id`,
    /// `variant`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::rollout::Assigned>,
}
