//! The OpenAI Chat Completions wire format (the subset MoltBot serves) and the
//! `moltbot` extension object. Field names follow
//! <https://platform.openai.com/docs/api-reference/chat>.

pub mod embeddings;
pub mod responses;

pub use crate::turn::report::{Attempt, Extension, IntentInfo, Source, Usage};

use serde::{Deserialize, Serialize};

/// A message's content: a string, or an array of parts of which the `text`
/// parts are used.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts (`{"type": "text", "text": ...}`).
    Parts(Vec<ContentPart>),
}

impl Content {
    /// The text of the parts whose type is one of `kinds`, joined by
    /// newlines (plain text as it is). Errors with the type of the first
    /// other part, or of a part without text.
    pub fn joined(&self, kinds: &[&str]) -> Result<String, String> {
        match self {
            Self::Text(t) => Ok(t.clone()),
            Self::Parts(parts) => {
                let mut out = Vec::with_capacity(parts.len());
                for p in parts {
                    match &p.text {
                        Some(t) if kinds.contains(&p.kind.as_str()) => out.push(t.as_str()),
                        _ => return Err(p.kind.clone()),
                    }
                }
                Ok(out.join("\n"))
            }
        }
    }
}

/// One content part.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// Part type; only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// One request message. A field not listed (`name`, `refusal`, `audio`)
/// is refused with 400 naming it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestMessage {
    /// `system`, `developer` (treated as system), `user`, `assistant` or `tool`.
    pub role: String,
    /// Content; `null` is allowed for assistant tool calls and read as empty.
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant message's function calls.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A `tool` message: the id of the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// A function call: `{"id", "type": "function", "function": {"name",
/// "arguments"}}`, in requests (assistant messages) and answers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    /// `call_…`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The call.
    pub function: FunctionCall,
}

/// The function and its arguments.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// The arguments: a JSON object, as text.
    pub arguments: String,
}

/// One of `tools`: `{"type": "function", "function": {...}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionDef,
}

/// A function the model may call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionDef {
    /// `^[a-zA-Z0-9_-]{1,64}$`.
    pub name: String,
    /// What it does, for the model.
    #[serde(default)]
    pub description: Option<String>,
    /// JSON schema of the arguments; absent: none.
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
    /// OpenAI's strict mode: a local model always holds required calls to
    /// the schema.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `tool_choice`: `"auto"`, `"none"`, `"required"`, or
/// `{"type": "function", "function": {"name"}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    /// `auto`, `none` or `required`.
    Mode(String),
    /// One named function.
    Named(NamedToolChoice),
}

/// `{"type": "function", "function": {"name"}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedToolChoice {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: NamedFunction,
}

/// `{"name"}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedFunction {
    /// The function's name.
    pub name: String,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop sequence.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` and no choices.
    #[serde(default)]
    pub include_usage: bool,
}

/// `response_format.json_schema`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    /// The schema's name (`^[a-zA-Z0-9_-]{1,64}$`).
    pub name: String,
    /// What the schema is for: in a local model's instructions, and passed
    /// to providers.
    #[serde(default)]
    pub description: Option<String>,
    /// The JSON schema (an object). Absent: any JSON object.
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    /// OpenAI's strict mode; a local model enforces the schema always.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `response_format`: `{"type": "text"}`, `{"type": "json_object"}` or
/// `{"type": "json_schema", "json_schema": {...}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseFormat {
    /// `text`, `json_object` or `json_schema`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The schema, with `json_schema`.
    #[serde(default)]
    pub json_schema: Option<JsonSchemaFormat>,
}

/// `POST /v1/chat/completions` body. A field not listed here (e.g. `tools`,
/// `response_format`, `logprobs`) is refused with 400 naming it rather than
/// ignored: a client that asked for a JSON schema or a tool call must not
/// get free text with 200.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    /// Model or route alias (`default`).
    pub model: String,
    /// The conversation so far (usually only the new turn when a session
    /// keeps the history).
    pub messages: Vec<RequestMessage>,
    /// Stream Server-Sent Events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Completion budget, in tokens (legacy name).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Completion budget, in tokens.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature in [0, 2]; 0 is greedy.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus (top-p) mass in (0, 1].
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Seed for reproducible sampling.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop sequences (at most 4).
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Number of choices; only 1 is supported (400 otherwise).
    #[serde(default)]
    pub n: Option<u32>,
    /// Structured outputs: JSON, or JSON valid against a schema, enforced by
    /// grammar-constrained decoding on a local model and passed to remote
    /// providers.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// Functions the model may call: rendered into a local model's chat
    /// template, passed to OpenAI-compatible providers, translated for
    /// Anthropic.
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    /// Whether the model must call one (default `auto` with tools).
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
    /// Whether one answer may hold several calls (default true).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// Return each token's log probability (local models; a remote one
    /// answers UNIMPLEMENTED and the route's next model is tried).
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// With `logprobs`: also the 0 to 20 most likely alternatives per token.
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// In [-2, 2]; only 0 (no penalty) is supported (400 otherwise).
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// In [-2, 2]; only 0 (no penalty) is supported (400 otherwise).
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// End-user id: at most 256 characters, never required; logs carry a
    /// digest of it (`u-…`), never the id.
    #[serde(default)]
    pub user: Option<String>,
    /// Up to 16 key-value pairs (keys at most 64 characters, values at most
    /// 512), as OpenAI defines them: returned in `moltbot.metadata`; logs carry
    /// the keys only.
    #[serde(default)]
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
    /// MoltBot extension: conversation session (also header `x-session-id`).
    #[serde(default)]
    pub session_id: Option<String>,
}

/// The assistant's message in a non-streamed response.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The answer's text; `null` when it is only function calls.
    pub content: Option<String>,
    /// The answer's function calls.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

/// A function call in a streamed chunk (whole: name and arguments in one
/// delta).
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallDelta {
    /// Position among the answer's calls.
    pub index: u32,
    /// `call_…`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The call.
    pub function: FunctionCall,
}

/// One non-streamed choice.
#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    /// Always 0 (n = 1).
    pub index: u32,
    /// The answer.
    pub message: ResponseMessage,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: &'static str,
    /// With `logprobs`: `{"content": [...], "refusal": null}`; else null.
    pub logprobs: Option<Logprobs>,
}

/// `choices[].logprobs`.
#[derive(Debug, Clone, Serialize)]
pub struct Logprobs {
    /// One entry per generated token.
    pub content: Vec<LogprobEntry>,
    /// Always null.
    pub refusal: Option<String>,
}

/// One token's log probability, as OpenAI reports it.
#[derive(Debug, Clone, Serialize)]
pub struct LogprobEntry {
    /// The token's text.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// The step's most likely tokens (`top_logprobs` of them).
    pub top_logprobs: Vec<TopLogprobEntry>,
}

/// One alternative.
#[derive(Debug, Clone, Serialize)]
pub struct TopLogprobEntry {
    /// The token's text.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

impl Logprobs {
    /// The entries of generation's `TokenLogprob`s.
    pub fn of(entries: &[moltbot_proto::generation::v1::TokenLogprob]) -> Self {
        Self {
            content: entries
                .iter()
                .map(|e| LogprobEntry {
                    token: e.token.clone(),
                    logprob: e.logprob,
                    bytes: e.bytes.clone(),
                    top_logprobs: e
                        .top_logprobs
                        .iter()
                        .map(|t| TopLogprobEntry {
                            token: t.token.clone(),
                            logprob: t.logprob,
                            bytes: t.bytes.clone(),
                        })
                        .collect(),
                })
                .collect(),
            refusal: None,
        }
    }
}

/// Non-streamed response.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-…`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Model that answered.
    pub model: String,
    /// One choice.
    pub choices: Vec<Choice>,
    /// Token usage.
    pub usage: Usage,
    /// MoltBot extension.
    pub moltbot: Extension,
}

/// Delta of a streamed chunk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Delta {
    /// `assistant` on the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// New function calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// One streamed choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkChoice {
    /// Always 0.
    pub index: u32,
    /// What is new.
    pub delta: Delta,
    /// Set on the last content chunk.
    pub finish_reason: Option<&'static str>,
    /// With `logprobs`: the delta's tokens; else null.
    pub logprobs: Option<Logprobs>,
}

/// One SSE `data:` object (`chat.completion.chunk`).
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    /// Same id on every chunk of a completion.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Model that answered.
    pub model: String,
    /// Zero or one choice (none on the usage chunk).
    pub choices: Vec<ChunkChoice>,
    /// Set on the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// MoltBot extension, on the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moltbot: Option<Extension>,
}

/// `GET /v1/models` entry.
#[derive(Debug, Clone, Serialize)]
pub struct ModelObject {
    /// Model or route alias.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds (0: unknown).
    pub created: u64,
    /// `moltbot` for routes, else the backend (`local`, provider name).
    pub owned_by: String,
}

/// `GET /v1/models` body.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// Route aliases first, then concrete models.
    pub data: Vec<ModelObject>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_unimplemented_field_is_refused_by_name() {
        let body = r#"{"model": "default", "messages": [], "logit_bias": {"1": 5}}"#;
        let e = serde_json::from_str::<ChatCompletionRequest>(body)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `logit_bias`"), "{e}");
        let ok = r#"{"model": "default", "messages": [], "stream_options": {"include_usage": true}, "user": "u1", "metadata": {"k": "v"}, "logprobs": false}"#;
        assert!(serde_json::from_str::<ChatCompletionRequest>(ok).is_ok());
        // Inside messages and stream_options too.
        for (body, field) in [
            (
                r#"{"model": "d", "messages": [{"role": "user", "content": "hi", "name": "ada"}]}"#,
                "name",
            ),
            (
                r#"{"model": "d", "messages": [], "stream_options": {"include_obfuscation": true}}"#,
                "include_obfuscation",
            ),
        ] {
            let e = serde_json::from_str::<ChatCompletionRequest>(body)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("unknown field `{field}`")), "{e}");
        }
    }
}
