//! `POST /v1/chat/completions`: the OpenAI Chat Completions endpoint, as one
//! JSON answer or as Server-Sent Events ending in `data: [DONE]`.
//!
//! A streamed turn sends its headers only once the first token exists, so
//! every failure before it (routing, context, all models down) still gets a
//! proper status code and error envelope. A failure after it arrives as an SSE
//! `data: {"error": …}` event. When the client goes away the generation stream
//! is dropped, which cancels the sequence in the generation service's batch,
//! and nothing is written to the session.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use moltbot_proto::generation::v1::{FinishReason, GenerationSummary, generate_response};
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::AppState;
use crate::{
    ApiError,
    edge::{Caller, ratelimit::Reservation},
    openai::{
        ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChunkChoice, Delta,
        ResponseMessage, Usage,
    },
    pipeline::{Pipeline, Prepared, generate::Started, metrics},
};

fn finish_reason(summary: &GenerationSummary) -> &'static str {
    match summary.finish_reason() {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled | FinishReason::Unspecified => "stop",
    }
}

fn usage_of(summary: &GenerationSummary) -> Usage {
    let u = summary.usage.unwrap_or_default();
    Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.prompt_tokens + u.completion_tokens,
    }
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Parses the body. Errors: 413 over the limit, 400 for bad JSON or a body
/// that is not a chat completion request (the message names the field).
fn parse(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<ChatCompletionRequest, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::InvalidJson(rejection.body_text())
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(e.to_string()))
}

fn record_done(prepared: &Prepared, usage: &Usage) {
    let route = prepared.route.as_str();
    metrics::TURNS.with_label_values(&[route, "ok"]).inc();
    metrics::TOKENS
        .with_label_values(&[route, "in"])
        .inc_by(u64::from(usage.prompt_tokens));
    metrics::TOKENS
        .with_label_values(&[route, "out"])
        .inc_by(u64::from(usage.completion_tokens));
    metrics::TURN_DURATION
        .with_label_values(&[route])
        .observe(prepared.arrived.elapsed().as_secs_f64());
}

/// The handler.
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match handle(state, caller, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(
    state: AppState,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = parse(body, state.max_body_bytes)?;
    let timeout = header_str(&headers, "x-request-timeout-ms")
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    let pipeline = state.pipeline.clone();
    let mut prepared = pipeline
        .prepare(
            &req,
            &caller.tenant,
            header_str(&headers, "x-session-id"),
            timeout,
        )
        .await?;
    // Reserve the prompt and the whole completion budget before anything
    // is generated; settled with what the turn used.
    let budget = prepared
        .request
        .sampling
        .as_ref()
        .map_or(0, |s| s.max_tokens);
    let reservation = caller
        .limiter
        .reserve(prepared.prompt_tokens, budget)
        .await?;
    let started = start(&pipeline, &mut prepared).await?;
    metrics::TTFT
        .with_label_values(&[prepared.route.as_str()])
        .observe(prepared.arrived.elapsed().as_secs_f64());
    if req.stream {
        Ok(stream(
            pipeline,
            reservation,
            prepared,
            started,
            state.sse_write_idle,
        ))
    } else {
        complete(&pipeline, reservation, prepared, started).await
    }
}

/// Starts generation; a turn that cannot start is counted as an error.
async fn start(pipeline: &Pipeline, prepared: &mut Prepared) -> Result<Started, ApiError> {
    let started = pipeline.start(prepared).await;
    if started.is_err() {
        metrics::TURNS
            .with_label_values(&[prepared.route.as_str(), "error"])
            .inc();
    }
    started
}

/// Generations restarted after a stream broke mid-answer, per turn.
const MAX_RESTARTS: u32 = 2;

/// Reads one generation to its summary: (model, text, summary), or the
/// status that broke it.
async fn drain(started: Started) -> Result<(String, String, GenerationSummary), tonic::Status> {
    let Started {
        model,
        first,
        mut stream,
    } = started;
    let mut text = String::new();
    let mut event = Some(first);
    loop {
        match event.and_then(|e| e.event) {
            Some(generate_response::Event::Delta(d)) => text.push_str(&d.text),
            Some(generate_response::Event::Summary(s)) => return Ok((model, text, s)),
            None => {}
        }
        event = match stream.message().await? {
            Some(e) => Some(e),
            None => {
                return Err(tonic::Status::unavailable(
                    "the generation stream ended without a summary",
                ));
            }
        };
    }
}

/// Drains the generation and answers with one JSON object. Nothing has
/// reached the client yet, so a generation whose connection breaks
/// mid-answer (its replica died) is started again, on whichever replica the
/// balancer picks, up to [`MAX_RESTARTS`] times within the turn's deadline.
async fn complete(
    pipeline: &Pipeline,
    reservation: Reservation,
    mut prepared: Prepared,
    started: Started,
) -> Result<Response, ApiError> {
    let mut started = started;
    let mut restarts = 0;
    let (model, text, summary) = loop {
        match drain(started).await {
            Ok(done) => break done,
            // Only a broken connection to the generation replica (a
            // transport error: the status carries its source) is started
            // again; a status the service itself sent (a stalled provider,
            // say) fails the turn as before.
            Err(status)
                if restarts < MAX_RESTARTS
                    && std::error::Error::source(&status).is_some()
                    && crate::pipeline::generate::restartable(status.code())
                    && std::time::Instant::now() < prepared.deadline =>
            {
                restarts += 1;
                tracing::warn!(code = ?status.code(), error = %status.message(), restarts, "generation broke mid-answer; starting it again");
                started = start(pipeline, &mut prepared).await?;
            }
            Err(status) => {
                metrics::TURNS
                    .with_label_values(&[prepared.route.as_str(), "error"])
                    .inc();
                return Err(ApiError::Upstream {
                    service: "generation",
                    status,
                });
            }
        }
    };
    let usage = usage_of(&summary);
    pipeline
        .finish(&mut prepared, &text, usage.completion_tokens)
        .await;
    reservation.settle(usage.total_tokens);
    record_done(&prepared, &usage);
    let body = ChatCompletion {
        id: prepared.id.clone(),
        object: "chat.completion",
        created: prepared.created,
        model,
        choices: vec![Choice {
            index: 0,
            message: ResponseMessage {
                role: "assistant",
                content: text,
            },
            finish_reason: finish_reason(&summary),
        }],
        usage,
        moltbot: prepared.ext,
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

/// Streams the answer as SSE. A task drives generation and sends events into
/// a bounded channel; when the client disconnects the channel closes, and
/// when the client stops reading the channel stays full: after
/// `write_idle` of that the client counts as gone too. Either way the task
/// returns and drops the generation stream (cancelling it upstream, which
/// frees its batch slot), and the reservation charges what was used.
fn stream(
    pipeline: Arc<Pipeline>,
    mut reservation: Reservation,
    mut prepared: Prepared,
    started: Started,
    write_idle: Duration,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(32);
    let task = async move {
        let Started {
            model,
            first,
            mut stream,
        } = started;
        let (id, created) = (prepared.id.clone(), prepared.created);
        let chunk = |choices: Vec<ChunkChoice>| ChatCompletionChunk {
            id: id.clone(),
            object: "chat.completion.chunk",
            created,
            model: model.clone(),
            choices,
            usage: None,
            moltbot: None,
        };
        let mut text = String::new();
        let mut first_chunk = true;
        let mut event = Some(first);
        let summary = loop {
            match event.and_then(|e| e.event) {
                Some(generate_response::Event::Delta(d)) => {
                    text.push_str(&d.text);
                    let c = chunk(vec![ChunkChoice {
                        index: 0,
                        delta: Delta {
                            role: first_chunk.then_some("assistant"),
                            content: Some(d.text),
                        },
                        finish_reason: None,
                    }]);
                    first_chunk = false;
                    reservation.saw_completion(1);
                    if let Err(e) = tx.send_timeout(Ok(event_of(&c)), write_idle).await {
                        let why = match e {
                            SendTimeoutError::Timeout(_) => "client stopped reading",
                            SendTimeoutError::Closed(_) => "client went away",
                        };
                        tracing::info!(why, "generation cancelled");
                        metrics::TURNS
                            .with_label_values(&[prepared.route.as_str(), "cancelled"])
                            .inc();
                        return;
                    }
                }
                Some(generate_response::Event::Summary(s)) => break s,
                None => {}
            }
            event = match stream.message().await {
                Ok(Some(e)) => Some(e),
                Ok(None) | Err(_) => {
                    let err = ApiError::Upstream {
                        service: "generation",
                        status: tonic::Status::unavailable("generation stopped mid-answer"),
                    };
                    metrics::TURNS
                        .with_label_values(&[prepared.route.as_str(), "error"])
                        .inc();
                    let _ = tx.send(Ok(event_of(&err.envelope()))).await;
                    return;
                }
            };
        };
        drop(stream);
        let usage = usage_of(&summary);
        pipeline
            .finish(&mut prepared, &text, usage.completion_tokens)
            .await;
        reservation.settle(usage.total_tokens);
        record_done(&prepared, &usage);
        let last = chunk(vec![ChunkChoice {
            index: 0,
            delta: Delta {
                role: first_chunk.then_some("assistant"),
                content: None,
            },
            finish_reason: Some(finish_reason(&summary)),
        }]);
        let mut usage_chunk = chunk(Vec::new());
        usage_chunk.usage = Some(usage);
        usage_chunk.moltbot = Some(prepared.ext.clone());
        for e in [
            event_of(&last),
            event_of(&usage_chunk),
            Event::default().data("[DONE]"),
        ] {
            if tx.send_timeout(Ok(e), write_idle).await.is_err() {
                return;
            }
        }
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
