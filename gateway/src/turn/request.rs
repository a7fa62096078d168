//! The neutral turn request: what every protocol adapter
//! (`gateway/src/adapters/`) produces once it has validated its wire format.
//! Nothing here is an OpenAI type; messages, tools and formats are the
//! mesh's own (`proto/moltbot/generation/v1/generation.proto`).

use std::{collections::BTreeMap, time::Duration};

use moltbot_proto::generation::v1::{ChatMessage, ResponseFormat, Tool, ToolChoice};

/// Sampling settings of a turn, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    /// In [0, 2]; 0 is greedy. `None`: the model's default.
    pub temperature: Option<f32>,
    /// Nucleus mass in (0, 1].
    pub top_p: Option<f32>,
    /// Seed for reproducible sampling.
    pub seed: Option<u64>,
    /// Completion budget in tokens (at least 1); `None`: the route's
    /// `default_max_tokens`.
    pub max_tokens: Option<u32>,
    /// Stop sequences (at most 4).
    pub stop: Vec<String>,
    /// Return each token's log probability.
    pub logprobs: bool,
    /// With `logprobs`: alternatives per token, 0 to 20.
    pub top_logprobs: u32,
}

/// One validated turn, ready for [`super::Engine::start`].
#[derive(Debug, Clone, Default)]
pub struct TurnRequest {
    /// Request model or route alias (`default`).
    pub model: String,
    /// Session to continue; `None` starts a new one.
    pub session_id: Option<String>,
    /// The client's system (and developer) messages, in order.
    pub system: Vec<String>,
    /// The request's own messages (user, assistant, tool), in order; the
    /// last is a user message or a tool result.
    pub messages: Vec<ChatMessage>,
    /// Text of the last user message: what understanding classifies and
    /// retrieval searches for.
    pub last_user: String,
    /// Sampling settings.
    pub sampling: Sampling,
    /// Structured output, when asked.
    pub response_format: Option<ResponseFormat>,
    /// Functions the model may call.
    pub tools: Vec<Tool>,
    /// Whether and which function it must call.
    pub tool_choice: Option<ToolChoice>,
    /// Whether one answer may hold several calls.
    pub parallel_tool_calls: bool,
    /// The application's end-user id (logged as a digest only).
    pub end_user: Option<String>,
    /// The application's key-value pairs, returned with the answer (logged
    /// by key only).
    pub metadata: Option<BTreeMap<String, String>>,
    /// Whether the turn is written to the session.
    pub store: bool,
    /// The client's deadline for the whole turn; bounded by the gateway's
    /// request timeout.
    pub timeout: Option<Duration>,
    /// The request's `Cache-Control` (the response cache's read, write and
    /// age).
    pub cache_control: crate::cache::CacheControl,
}
