//! `POST /v1/responses`: the OpenAI Responses API over the same turn engine
//! as chat completions. The adapter (`gateway/src/adapters/responses.rs`)
//! turns the request into a neutral turn; this handler formats the turn as
//! a response object or as Responses streaming events.
//!
//! A stored response's id is `resp_<nonce>_<session id>`, and
//! `previous_response_id` continues that session, whose history the engine
//! loads as for any turn (so the input holds only the new items).
//! Continuing an older response of a session continues the session as it
//! is now; conversations do not branch. `store: false` writes nothing and
//! gives an id that cannot be continued.

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
    ApiError, adapters,
    edge::Caller,
    openai::responses::{ResponseObject, ResponseRequest},
    turn::{self, Turn, new_id},
};

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
    let mut turn_request =
        adapters::responses::turn_request(&req, super::request_timeout(&headers))?;
    turn_request.cache_control = super::cache_control(&headers)?;
    let store = turn_request.store;
    let turn = state
        .engine
        .start(
            turn_request,
            &caller.tenant,
            &state.spend.meter(&caller, "responses"),
        )
        .await?;
    let cache = super::cache_status(&turn);
    let nonce = new_id("");
    let echo = Echo {
        id: if store {
            format!("resp_{nonce}_{}", turn.prepared().ext.session_id)
        } else {
            format!("resp_{nonce}")
        },
        created: turn.prepared().created,
        model: req.model.clone(),
        store,
        req: Arc::new(req),
    };
    let response = if echo.req.stream {
        stream(turn, echo, state.sse_write_idle)
    } else {
        let (ended, ext) = turn.run(&mut turn::Buffered).await;
        let answer = turn::into_result(ended)?;
        let call_ids: Vec<String> = answer.tool_calls.iter().map(|_| new_id("fc_")).collect();
        let obj = echo.completed(&answer, &new_id("msg_"), &call_ids, ext);
        Json(obj).into_response()
    };
    Ok(super::with_cache_header(response, cache))
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
fn stream(turn: Turn, echo: Echo, write_idle: Duration) -> Response {
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
        match turn.run(&mut out).await {
            (turn::Ended::Answered(answer), ext) => {
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
                let done =
                    echo.completed(&answer, &out.message_id.clone(), &out.call_ids.clone(), ext);
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
            (turn::Ended::Failed(err), _) => {
                let (_, _, code) = err.parts();
                let _ = out
                    .send(
                        "error",
                        json!({"code": code, "message": err.to_string(), "param": null}),
                    )
                    .await;
            }
            (turn::Ended::Cancelled, _) => {}
        }
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
    super::sse_response(rx)
}
