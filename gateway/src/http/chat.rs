//! `POST /v1/chat/completions`: the OpenAI Chat Completions endpoint, as one
//! JSON answer or as Server-Sent Events ending in `data: [DONE]`.
//!
//! A streamed turn sends its headers only once the first token exists, so
//! every failure before it (routing, context, all models down) still gets a
//! proper status code and error envelope. A failure after it arrives as an SSE
//! `data: {"error": …}` event. When the client goes away the generation stream
//! is dropped, which cancels the sequence in the generation service's batch,
//! and nothing is written to the session.

use std::{convert::Infallible, time::Duration};

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    http::HeaderMap,
    response::{IntoResponse, Response, sse::Event},
};
use moltbot_proto::generation::v1::{TokenLogprob, ToolCall as GenToolCall};
use tracing::Instrument;

use super::AppState;
use crate::{
    ApiError, adapters,
    edge::Caller,
    openai::{
        ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChunkChoice, Delta,
        FunctionCall, Logprobs, ResponseMessage, ToolCall, ToolCallDelta,
    },
    turn::{self, Turn},
};

/// The handler: the adapter validates, the engine starts the turn, the
/// answer is formatted as one JSON object or as SSE chunks. Errors are
/// answered as [`ApiError`] envelopes.
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = super::parse_body(body, state.max_body_bytes)?;
    let mut turn_request = adapters::chat::turn_request(
        &req,
        super::header_str(&headers, "x-session-id"),
        super::request_timeout(&headers),
    )?;
    turn_request.cache_control = super::cache_control(&headers)?;
    let turn = state
        .engine
        .start(
            turn_request,
            &caller.tenant,
            &state.spend.meter(&caller, "chat.completions"),
        )
        .await?;
    let cache = super::cache_status(&turn);
    let response = if req.stream {
        let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
        stream(
            turn,
            StreamSettings {
                write_idle: state.sse_write_idle,
                include_usage,
            },
        )
    } else {
        complete(turn).await?
    };
    Ok(super::with_cache_header(response, cache))
}

/// Whether the turn asked for token log probabilities.
fn asked_logprobs(turn: &Turn) -> bool {
    turn.prepared()
        .request
        .sampling
        .as_ref()
        .is_some_and(|s| s.logprobs)
}

/// Runs the turn to its end and answers with one JSON object. Nothing
/// reaches the client before the end, so a generation whose replica dies
/// mid-answer is started again.
async fn complete(turn: Turn) -> Result<Response, ApiError> {
    let logprobs = asked_logprobs(&turn);
    let (id, created) = (turn.prepared().id.clone(), turn.prepared().created);
    let (ended, ext) = turn.run(&mut turn::Buffered).await;
    let answer = turn::into_result(ended)?;
    let body = ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model: answer.model,
        choices: vec![Choice {
            index: 0,
            message: ResponseMessage {
                role: "assistant",
                // OpenAI answers `null` content when there are only calls.
                content: (!answer.text.is_empty() || answer.tool_calls.is_empty())
                    .then_some(answer.text),
                tool_calls: answer.tool_calls.iter().map(openai_call).collect(),
            },
            finish_reason: answer.finish.as_str(),
            logprobs: logprobs.then(|| Logprobs::of(&answer.logprobs)),
        }],
        usage: answer.usage,
        moltbot: ext,
    };
    Ok(Json(body).into_response())
}

fn event_of<T: serde::Serialize>(value: &T) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(e) => Event::default().data(format!(
            r#"{{"error":{{"message":"cannot encode chunk: {e}","type":"server_error","code":"internal"}}}}"#
        )),
    }
}

/// How a streamed answer is written.
#[derive(Debug, Clone, Copy)]
struct StreamSettings {
    /// A client that reads nothing for this long counts as gone.
    write_idle: Duration,
    /// `stream_options.include_usage`: send a last chunk with `usage` and no
    /// choices before `[DONE]`.
    include_usage: bool,
}

/// The SSE [`turn::Output`]: each delta becomes one `chat.completion.chunk`
/// sent into a bounded channel that the response body reads.
struct SseOutput {
    tx: tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
    id: String,
    created: u64,
    write_idle: Duration,
    sent: bool,
    /// The request asked for log probabilities.
    logprobs: bool,
}

impl SseOutput {
    fn chunk(&self, model: &str, choices: Vec<ChunkChoice>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: model.to_owned(),
            choices,
            usage: None,
            moltbot: None,
        }
    }

    /// Sends the last events: the chunk with `finish_reason` (and the
    /// `moltbot` extension), the usage chunk when asked, `[DONE]`.
    async fn finish(
        &self,
        answer: &turn::Answer,
        ext: crate::openai::Extension,
        include_usage: bool,
    ) {
        let mut last = self.chunk(
            &answer.model,
            vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    role: (!self.sent).then_some("assistant"),
                    content: None,
                    tool_calls: None,
                },
                finish_reason: Some(answer.finish.as_str()),
                logprobs: None,
            }],
        );
        last.moltbot = Some(ext);
        let mut events = vec![event_of(&last)];
        if include_usage {
            let mut usage = self.chunk(&answer.model, Vec::new());
            usage.usage = Some(answer.usage);
            events.push(event_of(&usage));
        }
        events.push(Event::default().data("[DONE]"));
        for e in events {
            if self.tx.send_timeout(Ok(e), self.write_idle).await.is_err() {
                return;
            }
        }
    }
}

impl turn::Output for SseOutput {
    fn sent_any(&self) -> bool {
        self.sent
    }

    async fn delta(
        &mut self,
        model: &str,
        text: String,
        logprobs: Vec<TokenLogprob>,
    ) -> Result<(), turn::Gone> {
        let c = self.chunk(
            model,
            vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    role: (!self.sent).then_some("assistant"),
                    content: Some(text),
                    tool_calls: None,
                },
                finish_reason: None,
                logprobs: self.logprobs.then(|| Logprobs::of(&logprobs)),
            }],
        );
        self.send(c).await
    }

    async fn tool_call(
        &mut self,
        model: &str,
        index: u32,
        call: &GenToolCall,
    ) -> Result<(), turn::Gone> {
        let call = openai_call(call);
        let c = self.chunk(
            model,
            vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    role: (!self.sent).then_some("assistant"),
                    content: None,
                    tool_calls: Some(vec![ToolCallDelta {
                        index,
                        id: call.id,
                        kind: "function",
                        function: call.function,
                    }]),
                },
                finish_reason: None,
                logprobs: None,
            }],
        );
        self.send(c).await
    }
}

impl SseOutput {
    /// Sends one chunk within `write_idle`. Errors with [`turn::Gone`].
    async fn send(&mut self, chunk: ChatCompletionChunk) -> Result<(), turn::Gone> {
        super::send_event(&self.tx, event_of(&chunk), self.write_idle).await?;
        self.sent = true;
        Ok(())
    }
}

/// A generation call in OpenAI's shape.
fn openai_call(call: &GenToolCall) -> ToolCall {
    ToolCall {
        id: call.id.clone(),
        kind: "function".to_owned(),
        function: FunctionCall {
            name: call.name.clone(),
            arguments: call.arguments.clone(),
        },
    }
}

/// Streams the answer as SSE. A task runs the turn into a bounded channel;
/// when the client disconnects the channel closes, and when the client
/// stops reading the channel stays full: after `write_idle` of that the
/// client counts as gone too. Either way the turn ends cancelled and drops
/// the generation stream (cancelling it upstream, which frees its batch
/// slot), and the reservation charges what was used.
fn stream(turn: Turn, sse: StreamSettings) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(32);
    let mut out = SseOutput {
        tx,
        id: turn.prepared().id.clone(),
        created: turn.prepared().created,
        write_idle: sse.write_idle,
        sent: false,
        logprobs: asked_logprobs(&turn),
    };
    let task = async move {
        match turn.run(&mut out).await {
            (turn::Ended::Answered(answer), ext) => {
                out.finish(&answer, ext, sse.include_usage).await;
            }
            (turn::Ended::Failed(err), _) => {
                let _ = out.tx.send(Ok(event_of(&err.envelope()))).await;
            }
            (turn::Ended::Cancelled, _) => {}
        }
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
    super::sse_response(rx)
}
