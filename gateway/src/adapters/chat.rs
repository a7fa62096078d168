//! The OpenAI Chat Completions adapter, request side: a
//! [`ChatCompletionRequest`] validated into a neutral [`TurnRequest`].
//! (The answer side, JSON and SSE chunks, is `gateway/src/http/chat.rs`.)

use std::time::Duration;

use moltbot_proto::generation::v1 as gen_pb;

use super::common::{self, Incoming};
use crate::{
    ApiError,
    openai::{ChatCompletionRequest, Content, RequestMessage, Stop, ToolChoice},
    turn::{Sampling, TurnRequest},
};

fn text_of(index: usize, content: Option<&Content>) -> Result<String, ApiError> {
    content.map_or(Ok(String::new()), |c| {
        c.joined(&["text"]).map_err(|kind| {
            ApiError::InvalidRequest(format!(
                "messages[{index}].content: part type `{kind}` is not supported; send text parts"
            ))
        })
    })
}

/// A message's `tool_calls` for generation. Errors with 400 naming the
/// call that is not a function.
fn calls_of(index: usize, msg: &RequestMessage) -> Result<Vec<gen_pb::ToolCall>, ApiError> {
    let Some(calls) = &msg.tool_calls else {
        return Ok(Vec::new());
    };
    if msg.role != "assistant" {
        return Err(ApiError::InvalidRequest(format!(
            "messages[{index}].tool_calls is only allowed on an `assistant` message"
        )));
    }
    calls
        .iter()
        .enumerate()
        .map(|(j, c)| {
            if c.kind != "function" {
                return Err(ApiError::InvalidRequest(format!(
                    "messages[{index}].tool_calls[{j}].type `{}` is not `function`",
                    c.kind
                )));
            }
            Ok(gen_pb::ToolCall {
                id: c.id.clone(),
                name: c.function.name.clone(),
                arguments: c.function.arguments.clone(),
            })
        })
        .collect()
}

/// `tools` and `tool_choice` for generation. Errors with 400 naming the
/// field.
fn tools_of(
    req: &ChatCompletionRequest,
) -> Result<(Vec<gen_pb::Tool>, Option<gen_pb::ToolChoice>), ApiError> {
    let tools = req
        .tools
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, t)| {
            common::function_tool(
                i,
                &t.kind,
                &t.function.name,
                t.function.description.as_deref(),
                t.function.parameters.as_ref(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let choice = match &req.tool_choice {
        None => None,
        Some(ToolChoice::Mode(mode)) => Some(common::tool_choice_mode(mode)?),
        Some(ToolChoice::Named(named)) => {
            if named.kind != "function" {
                return Err(ApiError::InvalidRequest(format!(
                    "tool_choice.type `{}` is not `function`",
                    named.kind
                )));
            }
            Some(common::tool_choice_named(&named.function.name))
        }
    };
    common::tools_and_choice(&tools, choice.as_ref())?;
    Ok((tools, choice))
}

/// Checks the fields MoltBot accepts with one value only (`n`, the
/// penalties), `logprobs`, `stop` and `session_id`.
fn validate_options(req: &ChatCompletionRequest) -> Result<(), ApiError> {
    let refuse = |m: &str| Err(ApiError::InvalidRequest(m.to_owned()));
    if req.n.is_some_and(|n| n != 1) {
        return refuse("n: only 1 choice is supported; send n=1 or leave it out");
    }
    match (req.logprobs, req.top_logprobs) {
        (_, Some(k)) if k > 20 => return refuse("top_logprobs: at most 20"),
        (Some(true), _) | (_, None | Some(0)) => {}
        (_, Some(_)) => return refuse("top_logprobs needs logprobs: true"),
    }
    for (name, value) in [
        ("presence_penalty", req.presence_penalty),
        ("frequency_penalty", req.frequency_penalty),
    ] {
        if value.is_some_and(|v| v != 0.0) {
            return Err(ApiError::InvalidRequest(format!(
                "{name}: only 0 is supported; leave it out"
            )));
        }
    }
    if let Some(Stop::Many(list)) = &req.stop
        && list.len() > 4
    {
        return refuse("stop: at most 4 sequences");
    }
    if let Some(id) = &req.session_id
        && id.is_empty()
    {
        return refuse("session_id is empty");
    }
    Ok(())
}

/// `response_format` for the generation service; `None` for text. Errors
/// with 400 naming the field that is wrong.
fn response_format(
    req: &ChatCompletionRequest,
) -> Result<Option<gen_pb::ResponseFormat>, ApiError> {
    use gen_pb::response_format::Kind;
    let Some(format) = &req.response_format else {
        return Ok(None);
    };
    let invalid = |m: String| Err(ApiError::InvalidRequest(m));
    let kind = match (format.kind.as_str(), &format.json_schema) {
        ("text", None) => return Ok(None),
        ("json_object", None) => Kind::JsonObject(gen_pb::JsonObject {}),
        ("json_schema", Some(s)) => {
            let name_ok = !s.name.is_empty()
                && s.name.len() <= 64
                && s.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !name_ok {
                return invalid(format!(
                    "response_format.json_schema.name `{}` must be 1 to 64 letters, digits, `_` or `-`",
                    s.name
                ));
            }
            let schema = s
                .schema
                .clone()
                .unwrap_or_else(|| serde_json::json!({"type": "object"}));
            if !schema.is_object() {
                return invalid(
                    "response_format.json_schema.schema must be a JSON object".to_owned(),
                );
            }
            Kind::JsonSchema(gen_pb::JsonSchema {
                name: s.name.clone(),
                schema_json: schema.to_string(),
                strict: s.strict.unwrap_or(false),
                description: s.description.clone().unwrap_or_default(),
            })
        }
        ("json_schema", None) => {
            return invalid(
                "response_format: type `json_schema` needs a `json_schema` object".to_owned(),
            );
        }
        ("text" | "json_object", Some(_)) => {
            return invalid(format!(
                "response_format: `json_schema` is only allowed with type `json_schema`, not `{}`",
                format.kind
            ));
        }
        (other, _) => {
            return invalid(format!(
                "response_format.type `{other}` is not one of text, json_object, json_schema"
            ));
        }
    };
    Ok(Some(gen_pb::ResponseFormat { kind: Some(kind) }))
}

/// Validates `req` into a turn. `session_header` is `x-session-id` (the
/// body's `session_id` wins); `timeout` the client's deadline.
///
/// Errors: 400 naming the first invalid field.
pub fn turn_request(
    req: &ChatCompletionRequest,
    session_header: Option<String>,
    timeout: Option<Duration>,
) -> Result<TurnRequest, ApiError> {
    validate_options(req)?;
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    common::sampling_bounds(req.temperature, req.top_p, max_tokens)?;
    common::user_and_metadata(req.user.as_deref(), req.metadata.as_ref())?;
    let response_format = response_format(req)?;
    let (tools, tool_choice) = tools_of(req)?;
    let items = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            Ok(Incoming {
                role: m.role.clone(),
                text: text_of(i, m.content.as_ref())?,
                tool_calls: calls_of(i, m)?,
                tool_call_id: m.tool_call_id.clone(),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let conversation = common::conversation(items, "messages")?;
    Ok(TurnRequest {
        model: req.model.clone(),
        session_id: req.session_id.clone().or(session_header),
        system: conversation.system,
        messages: conversation.messages,
        last_user: conversation.last_user,
        sampling: Sampling {
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            max_tokens,
            stop: match &req.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
            logprobs: req.logprobs.unwrap_or(false),
            top_logprobs: req.top_logprobs.unwrap_or(0),
        },
        response_format,
        tools,
        tool_choice,
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        end_user: req.user.clone(),
        metadata: req.metadata.clone(),
        store: true,
        timeout,
        cache_control: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request(json: serde_json::Value) -> ChatCompletionRequest {
        serde_json::from_value(json).unwrap()
    }

    fn turn(json: serde_json::Value) -> Result<TurnRequest, ApiError> {
        turn_request(&request(json), None, None)
    }

    #[test]
    fn messages_are_validated() {
        let ok = turn(serde_json::json!({"model": "default", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}
        ]}))
        .unwrap();
        assert_eq!(ok.system, vec!["Be brief."]);
        assert_eq!(ok.last_user, "hi");
        assert_eq!(ok.messages.len(), 1);

        for (body, want) in [
            (serde_json::json!({"model": "d", "messages": []}), "empty"),
            (
                serde_json::json!({"model": "d", "messages": [{"role": "wizard", "content": "x"}]}),
                "wizard",
            ),
            (
                serde_json::json!({"model": "d", "messages": [{"role": "user", "content": " "}]}),
                "empty",
            ),
            (
                serde_json::json!({"model": "d", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
                "last non-system",
            ),
            (
                serde_json::json!({"model": "d", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "image_url",
            ),
            (
                serde_json::json!({"model": "d", "messages": [{"role": "user", "content": "a"}], "temperature": 3.0}),
                "temperature",
            ),
            (
                serde_json::json!({"model": "d", "messages": [{"role": "user", "content": "a"}], "n": 2}),
                "n: only 1",
            ),
            (
                serde_json::json!({"model": "d", "messages": [{"role": "tool", "content": "a"}]}),
                "tool_call_id is required",
            ),
        ] {
            let err = turn(body).err().unwrap();
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn session_from_the_body_wins_over_the_header() {
        let body = request(serde_json::json!({"model": "d", "session_id": "s-body",
            "messages": [{"role": "user", "content": "a"}]}));
        let t = turn_request(&body, Some("s-header".into()), None).unwrap();
        assert_eq!(t.session_id.as_deref(), Some("s-body"));
        let mut body = body;
        body.session_id = None;
        let t = turn_request(&body, Some("s-header".into()), None).unwrap();
        assert_eq!(t.session_id.as_deref(), Some("s-header"));
    }
}
