//! The OpenAI Responses adapter, request side: a [`ResponseRequest`]
//! validated into a neutral [`TurnRequest`] (instructions as a system
//! message, input items as messages, function calls and their outputs as
//! assistant calls and tool results). The answer side, the response object
//! and its streaming events, is `gateway/src/http/responses.rs`.
//!
//! The conversation is the session: a stored response's id is
//! `resp_<nonce>_<session id>`, and `previous_response_id` continues that
//! session.

use std::time::Duration;

use moltbot_proto::generation::v1 as gen_pb;
use serde_json::Value;

use super::common::{self, Incoming};
use crate::{
    ApiError,
    openai::{
        Content,
        responses::{Input, ResponseRequest},
    },
    turn::{Sampling, TurnRequest},
};

/// The session a response id continues. Errors with 404 for an id that
/// names none (malformed, or a `store: false` response).
pub fn session_of(previous: &str) -> Result<String, ApiError> {
    previous
        .strip_prefix("resp_")
        .and_then(|rest| rest.split_once('_'))
        .map(|(_, session)| session.to_owned())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::ResponseNotFound(previous.to_owned()))
}

fn text_of(i: usize, content: Option<&Content>) -> Result<String, ApiError> {
    content.map_or(Ok(String::new()), |c| {
        c.joined(&["input_text", "output_text"]).map_err(|kind| {
            ApiError::InvalidRequest(format!(
                "input[{i}].content: part type `{kind}` is not supported; send input_text"
            ))
        })
    })
}

fn invalid<T>(m: String) -> Result<T, ApiError> {
    Err(ApiError::InvalidRequest(m))
}

/// The input items as messages; consecutive function calls belong to one
/// assistant message. Errors with 400 naming the item.
fn items_of(req: &ResponseRequest) -> Result<Vec<Incoming>, ApiError> {
    let mut out = Vec::new();
    if let Some(instructions) = &req.instructions {
        out.push(Incoming {
            role: "system".to_owned(),
            text: instructions.clone(),
            ..Default::default()
        });
    }
    let items = match &req.input {
        Input::Text(t) => {
            out.push(Incoming {
                role: "user".to_owned(),
                text: t.clone(),
                ..Default::default()
            });
            return Ok(out);
        }
        Input::Items(items) => items,
    };
    for (i, item) in items.iter().enumerate() {
        match item.kind.as_deref().unwrap_or("message") {
            "message" => {
                let Some(role) = &item.role else {
                    return invalid(format!("input[{i}].role is required on a message"));
                };
                out.push(Incoming {
                    role: role.clone(),
                    text: text_of(i, item.content.as_ref())?,
                    ..Default::default()
                });
            }
            "function_call" => {
                let (Some(call_id), Some(name)) = (&item.call_id, &item.name) else {
                    return invalid(format!(
                        "input[{i}]: a function_call needs call_id and name"
                    ));
                };
                let call = gen_pb::ToolCall {
                    id: call_id.clone(),
                    name: name.clone(),
                    arguments: item.arguments.clone().unwrap_or_else(|| "{}".to_owned()),
                };
                match out.last_mut() {
                    Some(last) if last.role == "assistant" && !last.tool_calls.is_empty() => {
                        last.tool_calls.push(call);
                    }
                    _ => out.push(Incoming {
                        role: "assistant".to_owned(),
                        tool_calls: vec![call],
                        ..Default::default()
                    }),
                }
            }
            "function_call_output" => {
                let Some(call_id) = &item.call_id else {
                    return invalid(format!("input[{i}]: a function_call_output needs call_id"));
                };
                out.push(Incoming {
                    role: "tool".to_owned(),
                    text: item.output.clone().unwrap_or_default(),
                    tool_calls: Vec::new(),
                    tool_call_id: Some(call_id.clone()),
                });
            }
            other => {
                return invalid(format!(
                    "input[{i}].type `{other}` is not one of message, function_call, function_call_output"
                ));
            }
        }
    }
    Ok(out)
}

/// `tool_choice`: a mode, or `{"type": "function", "name": …}`.
fn tool_choice_of(value: Option<&Value>) -> Result<Option<gen_pb::ToolChoice>, ApiError> {
    match value {
        None => Ok(None),
        Some(Value::String(mode)) => common::tool_choice_mode(mode).map(Some),
        Some(v) if v["type"] == "function" && v["name"].is_string() => Ok(Some(
            common::tool_choice_named(v["name"].as_str().unwrap_or_default()),
        )),
        Some(other) => invalid(format!(
            "tool_choice {other} is not auto, none, required or {{\"type\": \"function\", \"name\": …}}"
        )),
    }
}

/// Validates `req` into a turn; `timeout` is the client's deadline.
///
/// Errors: 400 naming the first invalid item or field; 404 for a
/// `previous_response_id` that names no session.
pub fn turn_request(
    req: &ResponseRequest,
    timeout: Option<Duration>,
) -> Result<TurnRequest, ApiError> {
    let session_id = req
        .previous_response_id
        .as_deref()
        .map(session_of)
        .transpose()?;
    common::sampling_bounds(req.temperature, req.top_p, req.max_output_tokens)?;
    common::user_and_metadata(req.user.as_deref(), req.metadata.as_ref())?;
    let tools = req
        .tools
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, t)| {
            common::function_tool(
                i,
                &t.kind,
                &t.name,
                t.description.as_deref(),
                t.parameters.as_ref(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tool_choice = tool_choice_of(req.tool_choice.as_ref())?;
    common::tools_and_choice(&tools, tool_choice.as_ref())?;
    let conversation = common::conversation(items_of(req)?, "input")?;
    Ok(TurnRequest {
        model: req.model.clone(),
        session_id,
        system: conversation.system,
        messages: conversation.messages,
        last_user: conversation.last_user,
        sampling: Sampling {
            temperature: req.temperature,
            top_p: req.top_p,
            max_tokens: req.max_output_tokens,
            ..Sampling::default()
        },
        response_format: None,
        tools,
        tool_choice,
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        end_user: req.user.clone(),
        metadata: req.metadata.clone(),
        store: req.store.unwrap_or(true),
        timeout,
        cache_control: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    #[test]
    fn items_become_messages_and_ids_name_their_session() {
        let req: ResponseRequest = serde_json::from_value(json!({
            "model": "default",
            "instructions": "Be brief.",
            "previous_response_id": "resp_0a1b_sess-1",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "18 C"}
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "max_output_tokens": 9
        }))
        .unwrap();
        let turn = turn_request(&req, None).unwrap();
        assert_eq!(turn.system, vec!["Be brief."]);
        let roles: Vec<i32> = turn.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                gen_pb::Role::User,
                gen_pb::Role::Assistant,
                gen_pb::Role::Tool
            ]
            .map(|r| r as i32)
        );
        assert_eq!(turn.messages[1].tool_calls.len(), 2);
        assert_eq!(turn.messages[2].tool_call_id, "c1");
        assert_eq!(turn.sampling.max_tokens, Some(9));
        assert_eq!(turn.session_id.as_deref(), Some("sess-1"));
        assert_eq!(
            turn.tool_choice.unwrap().mode,
            gen_pb::tool_choice::Mode::Function as i32
        );
        assert!(turn.store);

        assert_eq!(session_of("resp_0a1b_sess-42").unwrap(), "sess-42");
        assert!(session_of("resp_0a1b").is_err());
        assert!(session_of("chatcmpl-1").is_err());
        let unknown = serde_json::from_value::<ResponseRequest>(
            json!({"model": "d", "input": "hi", "reasoning": {"effort": "low"}}),
        )
        .unwrap_err()
        .to_string();
        assert!(unknown.contains("unknown field `reasoning`"), "{unknown}");
        // Item errors name the input item.
        let bad: ResponseRequest = serde_json::from_value(json!({
            "model": "d", "input": [{"role": "user", "content": " "}]
        }))
        .unwrap();
        let err = turn_request(&bad, None).unwrap_err().to_string();
        assert!(err.contains("input[0].content is empty"), "{err}");
    }
}
