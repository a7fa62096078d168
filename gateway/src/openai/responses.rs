//! The OpenAI Responses wire format (`POST /v1/responses`, the API the
//! OpenAI Agents SDK and Codex call by default), the subset MoltBot serves.
//! Field names follow <https://platform.openai.com/docs/api-reference/responses>.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Content, Usage};

/// `input`: one user text, or a list of items.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Input {
    /// A user message.
    Text(String),
    /// Messages and function-call items, oldest first.
    Items(Vec<InputItem>),
}

/// One input item: a message (`type` absent or `message`), a function call
/// the model made (`function_call`), or its result
/// (`function_call_output`). Unknown fields are refused by name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputItem {
    /// `message` (the default), `function_call` or `function_call_output`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// A message's role: `system`, `developer`, `user` or `assistant`.
    #[serde(default)]
    pub role: Option<String>,
    /// A message's content: text, or parts (`input_text`, `output_text`).
    #[serde(default)]
    pub content: Option<Content>,
    /// An item id (output items echoed back carry one).
    #[serde(default)]
    pub id: Option<String>,
    /// An output item's status, echoed back.
    #[serde(default)]
    pub status: Option<String>,
    /// `function_call`/`function_call_output`: the call's id.
    #[serde(default)]
    pub call_id: Option<String>,
    /// `function_call`: the function.
    #[serde(default)]
    pub name: Option<String>,
    /// `function_call`: the arguments, JSON text.
    #[serde(default)]
    pub arguments: Option<String>,
    /// `function_call_output`: the result.
    #[serde(default)]
    pub output: Option<String>,
}

/// A function tool in the Responses shape (flat: `name` beside `type`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionTool {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its name.
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON schema of its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// OpenAI's strict mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `POST /v1/responses` body. Unknown fields are refused with 400 naming
/// them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseRequest {
    /// Model or route alias.
    pub model: String,
    /// The new input.
    pub input: Input,
    /// A system message put first.
    #[serde(default)]
    pub instructions: Option<String>,
    /// Continue the conversation of this response (its session).
    #[serde(default)]
    pub previous_response_id: Option<String>,
    /// Keep the turn in the session (default true); `false` keeps nothing
    /// and the response cannot be continued.
    #[serde(default)]
    pub store: Option<bool>,
    /// Stream events.
    #[serde(default)]
    pub stream: bool,
    /// Completion budget, in tokens.
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    /// Sampling temperature in [0, 2].
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass in (0, 1].
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Function tools.
    #[serde(default)]
    pub tools: Option<Vec<FunctionTool>>,
    /// `auto`, `none`, `required` or `{"type": "function", "name"}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Whether one answer may hold several calls.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// Up to 16 key-value pairs, returned with the response.
    #[serde(default)]
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
    /// End-user id; logs carry a digest.
    #[serde(default)]
    pub user: Option<String>,
}

/// Token usage in the Responses shape.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseUsage {
    /// Prompt tokens.
    pub input_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
    /// `{"cached_tokens": N}`: the whole prompt on an answer from the
    /// response cache, else 0.
    pub input_tokens_details: Value,
    /// `{"reasoning_tokens": 0}`.
    pub output_tokens_details: Value,
}

impl From<Usage> for ResponseUsage {
    fn from(u: Usage) -> Self {
        Self {
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            input_tokens_details: serde_json::json!({
                "cached_tokens": u.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
            }),
            output_tokens_details: serde_json::json!({"reasoning_tokens": 0}),
        }
    }
}

/// A response object (`object: response`).
#[derive(Debug, Clone, Serialize)]
pub struct ResponseObject {
    /// `resp_…`.
    pub id: String,
    /// Always `response`.
    pub object: &'static str,
    /// Unix seconds.
    pub created_at: u64,
    /// `in_progress`, `completed` or `incomplete`.
    pub status: &'static str,
    /// Set when the budget cut the answer: `{"reason": "max_output_tokens"}`.
    pub incomplete_details: Option<Value>,
    /// Always null (failures are HTTP errors or `error` events).
    pub error: Option<Value>,
    /// The model that answered (the request's before it is known).
    pub model: String,
    /// Output items: a message, function calls.
    pub output: Vec<Value>,
    /// The request's instructions.
    pub instructions: Option<String>,
    /// The response continued.
    pub previous_response_id: Option<String>,
    /// Whether the turn was kept.
    pub store: bool,
    /// The request's metadata.
    pub metadata: std::collections::BTreeMap<String, String>,
    /// The request's tools.
    pub tools: Vec<FunctionTool>,
    /// The request's tool choice (`auto` by default).
    pub tool_choice: Value,
    /// Whether parallel calls were allowed.
    pub parallel_tool_calls: bool,
    /// The request's temperature.
    pub temperature: Option<f32>,
    /// The request's top_p.
    pub top_p: Option<f32>,
    /// The request's budget.
    pub max_output_tokens: Option<u32>,
    /// `{"format": {"type": "text"}}`.
    pub text: Value,
    /// Usage; null until completed.
    pub usage: Option<ResponseUsage>,
    /// MoltBot extension (session, intent, sources, route, attempts).
    pub moltbot: Option<super::Extension>,
}
