//! `POST /v1/responses`: the OpenAI Responses API over the same pipeline as
//! chat completions. The request becomes a chat request (instructions as a
//! system message, input items as messages, function calls and their
//! outputs as assistant `tool_calls` and `tool` messages), runs through
//! [`turn::run`], and is formatted as a response object or as Responses
//! streaming events.
//!
//! The conversation is the session: a stored response's id is
//! `resp_<nonce>_<session id>`, and `previous_response_id` continues that
//! session, whose history the pipeline loads as for any turn (so the input
//! holds only the new items). Continuing an older response of a session
//! continues the session as it is now; conversations do not branch.
//! `store: false` writes nothing and gives an id that cannot be continued.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    http::HeaderMap,
    response::{IntoResponse, Response, sse::Event},
};
use moltbot_proto::generation::v1::ToolCall as GenToolCall;
use serde_json::{Value, json};
use tracing::Instrument;

use super::AppState;
use crate::{
    ApiError,
    edge::{Caller, ratelimit::Reservation},
    openai::{
        ChatCompletionRequest, Content, FunctionCall, FunctionDef, NamedFunction, NamedToolChoice,
        RequestMessage, Tool, ToolCall, ToolChoice,
        responses::{Input, ResponseObject, ResponseRequest},
    },
    pipeline::{Pipeline, Prepared, generate::Started, new_id, turn},
};

/// The session a response id continues. Errors with 404 for an id that
/// names none (malformed, or a `store: false` response).
fn session_of(previous: &str) -> Result<String, ApiError> {
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

fn message(role: &str, text: String) -> RequestMessage {
    RequestMessage {
        role: role.to_owned(),
        content: Some(Content::Text(text)),
        tool_calls: None,
        tool_call_id: None,
    }
}

/// The chat request a Responses request amounts to. Errors with 400 naming
/// the item or field that is wrong.
fn to_chat(
    req: &ResponseRequest,
    session: Option<String>,
) -> Result<ChatCompletionRequest, ApiError> {
    let invalid = |m: String| Err(ApiError::InvalidRequest(m));
    let mut messages = Vec::new();
    if let Some(instructions) = &req.instructions {
        messages.push(message("system", instructions.clone()));
    }
    match &req.input {
        Input::Text(t) => messages.push(message("user", t.clone())),
        Input::Items(items) => {
            for (i, item) in items.iter().enumerate() {
                match item.kind.as_deref().unwrap_or("message") {
                    "message" => {
                        let Some(role) = &item.role else {
                            return invalid(format!("input[{i}].role is required on a message"));
                        };
                        messages.push(message(role, text_of(i, item.content.as_ref())?));
                    }
                    "function_call" => {
                        let (Some(call_id), Some(name)) = (&item.call_id, &item.name) else {
                            return invalid(format!(
                                "input[{i}]: a function_call needs call_id and name"
                            ));
                        };
                        let call = ToolCall {
                            id: call_id.clone(),
                            kind: "function".to_owned(),
                            function: FunctionCall {
                                name: name.clone(),
                                arguments: item
                                    .arguments
                                    .clone()
                                    .unwrap_or_else(|| "{}".to_owned()),
                            },
                        };
                        // Consecutive calls belong to one assistant message.
                        match messages.last_mut() {
                            Some(last) if last.role == "assistant" && last.tool_calls.is_some() => {
                                if let Some(calls) = &mut last.tool_calls {
                                    calls.push(call);
                                }
                            }
                            _ => messages.push(RequestMessage {
                                role: "assistant".to_owned(),
                                content: None,
                                tool_calls: Some(vec![call]),
                                tool_call_id: None,
                            }),
                        }
                    }
                    "function_call_output" => {
                        let Some(call_id) = &item.call_id else {
                            return invalid(format!(
                                "input[{i}]: a function_call_output needs call_id"
                            ));
                        };
                        messages.push(RequestMessage {
                            role: "tool".to_owned(),
                            content: Some(Content::Text(item.output.clone().unwrap_or_default())),
                            tool_calls: None,
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
        }
    }
    let tools = match &req.tools {
        None => None,
        Some(tools) => {
            let mut out = Vec::with_capacity(tools.len());
            for (i, t) in tools.iter().enumerate() {
                if t.kind != "function" {
                    return invalid(format!("tools[{i}].type `{}` is not `function`", t.kind));
                }
                out.push(Tool {
                    kind: "function".to_owned(),
                    function: FunctionDef {
                        name: t.name.clone(),
                        description: t.description.clone(),
                        parameters: t.parameters.clone(),
                        strict: t.strict,
                    },
                });
            }
            Some(out)
        }
    };
    let tool_choice = match &req.tool_choice {
        None => None,
        Some(Value::String(mode)) => Some(ToolChoice::Mode(mode.clone())),
        Some(v) if v["type"] == "function" && v["name"].is_string() => {
            Some(ToolChoice::Named(NamedToolChoice {
                kind: "function".to_owned(),
                function: NamedFunction {
                    name: v["name"].as_str().unwrap_or_default().to_owned(),
                },
            }))
        }
        Some(other) => {
            return invalid(format!(
                "tool_choice {other} is not auto, none, required or {{\"type\": \"function\", \"name\": …}}"
            ));
        }
    };
    Ok(ChatCompletionRequest {
        model: req.model.clone(),
        messages,
        stream: req.stream,
        max_completion_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        tools,
        tool_choice,
        parallel_tool_calls: req.parallel_tool_calls,
        metadata: req.metadata.clone(),
        user: req.user.clone(),
        session_id: session,
        ..ChatCompletionRequest::default()
    })
}

/// What the response object echoes of the request.
#[derive(Debug, Clone)]
struct Echo {
    id: String,
    created: u64,
    model: String,
    store: bool,
    req: Arc<ResponseRequest>,
}

impl Echo {
    fn object(&self, status: &'static str, output: Vec<Value>) -> ResponseObject {
        let req = &self.req;
        ResponseObject {
            id: self.id.clone(),
            object: "response",
            created_at: self.created,
            status,
            incomplete_details: None,
            error: None,
            model: self.model.clone(),
            output,
            instructions: req.instructions.clone(),
            previous_response_id: req.previous_response_id.clone(),
            store: self.store,
            metadata: req.metadata.clone().unwrap_or_default(),
            tools: req.tools.clone().unwrap_or_default(),
            tool_choice: req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
            parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
            temperature: req.temperature,
            top_p: req.top_p,
            max_output_tokens: req.max_output_tokens,
            text: json!({"format": {"type": "text"}}),
            usage: None,
            moltbot: None,
        }
    }

    /// The finished response for `answer`.
    fn completed(
        &self,
        answer: &turn::Answer,
        message_id: &str,
        call_ids: &[String],
        ext: crate::openai::Extension,
    ) -> ResponseObject {
        let mut output = Vec::new();
        if !answer.text.is_empty() || answer.tool_calls.is_empty() {
            output.push(message_item(message_id, &answer.text, "completed"));
        }
        for (call, id) in answer.tool_calls.iter().zip(call_ids) {
            output.push(call_item(id, call, "completed"));
        }
        let incomplete = answer.finish == turn::Finish::Length;
        let mut obj = self.object(
            if incomplete {
                "incomplete"
            } else {
                "completed"
            },
            output,
        );
        if incomplete {
            obj.incomplete_details = Some(json!({"reason": "max_output_tokens"}));
        }
        obj.model = answer.model.clone();
        obj.usage = Some(answer.usage.into());
        obj.moltbot = Some(ext);
        obj
    }
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn call_item(id: &str, call: &GenToolCall, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call.id, "name": call.name,
           "arguments": call.arguments, "status": status})
}

/// The handler. Errors are answered as [`ApiError`] envelopes.
pub async fn responses(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ResponseRequest = super::parse_body(body, state.max_body_bytes)?;
    let session = req
        .previous_response_id
        .as_deref()
        .map(session_of)
        .transpose()?;
    let store = req.store.unwrap_or(true);
    let chat = to_chat(&req, session)?;
    let pipeline = state.pipeline.clone();
    let mut prepared = pipeline
        .prepare(
            &chat,
            &caller.tenant,
            None,
            super::request_timeout(&headers),
        )
        .await?;
    prepared.store = store;
    let nonce = new_id("");
    let echo = Echo {
        id: if store {
            format!("resp_{nonce}_{}", prepared.ext.session_id)
        } else {
            format!("resp_{nonce}")
        },
        created: prepared.created,
        model: req.model.clone(),
        store,
        req: Arc::new(req),
    };
    let (reservation, started) = turn::begin(&pipeline, &mut prepared, &caller.limiter).await?;
    if echo.req.stream {
        Ok(stream(
            pipeline,
            reservation,
            prepared,
            started,
            echo,
            state.sse_write_idle,
        ))
    } else {
        let answer = turn::run_buffered(&pipeline, &mut prepared, reservation, started).await?;
        let call_ids: Vec<String> = answer.tool_calls.iter().map(|_| new_id("fc_")).collect();
        let obj = echo.completed(&answer, &new_id("msg_"), &call_ids, prepared.ext);
        Ok(Json(obj).into_response())
    }
}

/// The Responses SSE [`turn::Output`]: `response.output_item.added` and
/// `response.content_part.added` before the first text, one
/// `response.output_text.delta` per delta, and for each call its item with
/// its arguments in one `response.function_call_arguments.delta`.
struct EventsOutput {
    tx: tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
    write_idle: Duration,
    sequence: u64,
    message_id: String,
    /// Output index of the open message item, once text arrived.
    message_index: Option<usize>,
    text: String,
    /// Ids of the function-call items sent so far.
    call_ids: Vec<String>,
}

impl EventsOutput {
    async fn send(&mut self, kind: &str, mut data: Value) -> Result<(), turn::Gone> {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        let event = Event::default().event(kind).data(data.to_string());
        super::send_event(&self.tx, event, self.write_idle).await
    }

    /// Output items opened so far: the message once text arrived, and
    /// each call.
    fn items(&self) -> usize {
        usize::from(self.message_index.is_some()) + self.call_ids.len()
    }

    /// Closes the message item, if open: its text, part and item `done`.
    async fn close_message(&mut self) -> Result<(), turn::Gone> {
        let Some(index) = self.message_index else {
            return Ok(());
        };
        let id = self.message_id.clone();
        let text = self.text.clone();
        self.send(
            "response.output_text.done",
            json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
        )
        .await?;
        self.send(
            "response.content_part.done",
            json!({"item_id": id, "output_index": index, "content_index": 0,
            "part": {"type": "output_text", "text": text, "annotations": []}}),
        )
        .await?;
        self.send(
            "response.output_item.done",
            json!({"output_index": index, "item": message_item(&id, &text, "completed")}),
        )
        .await
    }
}

impl turn::Output for EventsOutput {
    fn sent_any(&self) -> bool {
        // `response.created` went before generation started; what counts
        // is output.
        self.items() > 0
    }

    async fn delta(
        &mut self,
        _model: &str,
        text: String,
        _logprobs: Vec<moltbot_proto::generation::v1::TokenLogprob>,
    ) -> Result<(), turn::Gone> {
        let index = match self.message_index {
            Some(i) => i,
            None => {
                let i = self.items();
                self.message_index = Some(i);
                let id = self.message_id.clone();
                self.send("response.output_item.added", json!({"output_index": i,
                    "item": {"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []}})).await?;
                self.send(
                    "response.content_part.added",
                    json!({"item_id": id, "output_index": i, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []}}),
                )
                .await?;
                i
            }
        };
        self.text.push_str(&text);
        let id = self.message_id.clone();
        self.send(
            "response.output_text.delta",
            json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text}),
        )
        .await
    }

    async fn tool_call(
        &mut self,
        _model: &str,
        _index: u32,
        call: &GenToolCall,
    ) -> Result<(), turn::Gone> {
        self.close_message().await?;
        let i = self.items();
        let id = new_id("fc_");
        self.call_ids.push(id.clone());
        self.send(
            "response.output_item.added",
            json!({"output_index": i, "item": call_item(&id, &GenToolCall {
            arguments: String::new(), ..call.clone() }, "in_progress")}),
        )
        .await?;
        self.send(
            "response.function_call_arguments.delta",
            json!({"item_id": id, "output_index": i, "delta": call.arguments}),
        )
        .await?;
        self.send(
            "response.function_call_arguments.done",
            json!({"item_id": id, "output_index": i, "arguments": call.arguments}),
        )
        .await?;
        self.send(
            "response.output_item.done",
            json!({"output_index": i, "item": call_item(&id, call, "completed")}),
        )
        .await
    }
}

/// Streams Responses events; the turn runs in a task as for chat
/// completions (cancelled when the client goes away).
fn stream(
    pipeline: Arc<Pipeline>,
    reservation: Reservation,
    mut prepared: Prepared,
    started: Started,
    echo: Echo,
    write_idle: Duration,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(32);
    let task = async move {
        let mut out = EventsOutput {
            tx,
            write_idle,
            sequence: 0,
            message_id: new_id("msg_"),
            message_index: None,
            text: String::new(),
            call_ids: Vec::new(),
        };
        let created =
            serde_json::to_value(echo.object("in_progress", Vec::new())).unwrap_or_default();
        if out
            .send("response.created", json!({"response": created}))
            .await
            .is_err()
            || out
                .send("response.in_progress", json!({"response": created}))
                .await
                .is_err()
        {
            return;
        }
        match turn::run(&pipeline, &mut prepared, reservation, started, &mut out).await {
            turn::Ended::Answered(answer) => {
                if answer.tool_calls.is_empty() && out.message_index.is_none() {
                    // An empty answer still has its message item.
                    if turn::Output::delta(&mut out, &answer.model, String::new(), Vec::new())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if out.close_message().await.is_err() {
                    return;
                }
                let done = echo.completed(
                    &answer,
                    &out.message_id.clone(),
                    &out.call_ids.clone(),
                    prepared.ext,
                );
                let kind = if done.status == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                let _ = out
                    .send(
                        kind,
                        json!({"response": serde_json::to_value(done).unwrap_or_default()}),
                    )
                    .await;
            }
            turn::Ended::Failed(err) => {
                let (_, _, code) = err.parts();
                let _ = out
                    .send(
                        "error",
                        json!({"code": code, "message": err.to_string(), "param": null}),
                    )
                    .await;
            }
            turn::Ended::Cancelled => {}
        }
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
    super::sse_response(rx)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn items_become_messages_and_ids_name_their_session() {
        let req: ResponseRequest = serde_json::from_value(json!({
            "model": "default",
            "instructions": "Be brief.",
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
        let chat = to_chat(&req, Some("sess-1".into())).unwrap();
        let roles: Vec<&str> = chat.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(chat.messages[2].tool_calls.as_ref().unwrap().len(), 2);
        assert_eq!(chat.messages[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(chat.max_completion_tokens, Some(9));
        assert_eq!(chat.session_id.as_deref(), Some("sess-1"));
        assert!(matches!(chat.tool_choice, Some(ToolChoice::Named(_))));

        assert_eq!(session_of("resp_0a1b_sess-42").unwrap(), "sess-42");
        assert!(session_of("resp_0a1b").is_err());
        assert!(session_of("chatcmpl-1").is_err());
        let unknown = serde_json::from_value::<ResponseRequest>(
            json!({"model": "d", "input": "hi", "reasoning": {"effort": "low"}}),
        )
        .unwrap_err()
        .to_string();
        assert!(unknown.contains("unknown field `reasoning`"), "{unknown}");
    }
}
