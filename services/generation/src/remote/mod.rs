//! The remote backend: a model served by an OpenAI-compatible or Anthropic
//! provider, named `<provider>/<model>`. Every call runs on a credential
//! lease from the auth-rotation service and reports its outcome there. A 401
//! or 429 before the first byte moves on to the next credential at once (the
//! caller never sees it); when no credential is left (all rate limited or
//! cooling) the call ends RESOURCE_EXHAUSTED, so the gateway moves to its
//! next model without waiting. A 400/404/413/422 is the request's own fault:
//! INVALID_ARGUMENT with the provider's message, nothing retried or counted.
//! 5xx, connection errors and timeouts end the call as UNAVAILABLE so the
//! gateway's route retries or falls back. Time to first
//! token and the gap between stream events are bounded, so a stuck provider
//! fails over instead of hanging.

pub mod sse;
pub mod tools;
pub mod wire;

use std::time::{Duration, Instant};

use futures::StreamExt;
use moltbot_proto::auth::v1::{
    AcquireCredentialRequest, Lease, Outcome, ProviderKind, ReportOutcomeRequest,
    auth_rotation_service_client::AuthRotationServiceClient,
};
use moltbot_runtime::grpc::client::TracedChannel;
use tokio::sync::mpsc;

use crate::{
    GenerationError,
    backend::{Backend, GenerateInput, ModelCard},
    engine::{Event, Finish, Usage},
    text::ChatMessage,
};

/// The header carrying a session's affinity digest to an in-cluster engine
/// registered without a key (vLLM's production-stack router and llm-d can
/// route on a session header).
pub const AFFINITY_HEADER: &str = "x-session-id";

/// Limits of remote calls.
#[derive(Debug, Clone, Copy)]
pub struct RemoteSettings {
    /// Longest wait for the response headers and the first token.
    pub ttft_timeout: Duration,
    /// Longest gap between two stream events.
    pub idle_timeout: Duration,
    /// Leases tried per request when credentials answer 401/403/429.
    pub max_credentials: usize,
}

/// A `<provider>/<model>` served remotely.
pub struct RemoteBackend {
    name: String,
    provider: String,
    model: String,
    auth: AuthRotationServiceClient<TracedChannel>,
    http: reqwest::Client,
    settings: RemoteSettings,
}

/// Splits `provider/model`; `None` for a name without a provider.
pub fn split_name(name: &str) -> Option<(&str, &str)> {
    let (p, m) = name.split_once('/')?;
    (!p.is_empty() && !m.is_empty()).then_some((p, m))
}

/// What a provider's HTTP status says about the call: 2xx ok; 401/403 the
/// credential; 429 rate limited; 400/404/413/422 the request itself (the
/// client's error, counted by no breaker); anything else (5xx, 529
/// overloaded) the provider, counted by the breakers.
pub fn outcome_of(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Ok,
        401 | 403 => Outcome::AuthFailed,
        429 => Outcome::RateLimited,
        400 | 404 | 413 | 422 => Outcome::ClientError,
        _ => Outcome::ServerError,
    }
}

/// `Retry-After` in milliseconds (RFC 9110 §10.2.3): delta-seconds, or an
/// HTTP-date (counted from `now`; a date in the past is 0). 0 when absent
/// or unreadable: auth-rotation then applies its default cool-down.
pub fn retry_after_ms(headers: &reqwest::header::HeaderMap, now: std::time::SystemTime) -> u64 {
    let Some(value) = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
    else {
        return 0;
    };
    if let Ok(seconds) = value.parse::<f64>() {
        return if seconds.is_finite() && seconds > 0.0 {
            (seconds * 1000.0) as u64
        } else {
            0
        };
    }
    httpdate::parse_http_date(value)
        .ok()
        .and_then(|at| at.duration_since(now).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// The provider's error message from an error body: OpenAI's and
/// Anthropic's `{"error": {"message": …}}`, else the body's first 500
/// characters.
pub fn provider_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(500).collect())
}

/// Reports how a leased call went; failures to report are logged (the call's
/// own result stands).
async fn report(
    mut auth: AuthRotationServiceClient<TracedChannel>,
    lease: &Lease,
    outcome: Outcome,
    http_status: u16,
    retry_after_ms: u64,
    started: Instant,
) {
    let request = ReportOutcomeRequest {
        lease_id: lease.lease_id.clone(),
        outcome: outcome as i32,
        http_status: u32::from(http_status),
        retry_after_ms,
        latency_ms: started.elapsed().as_millis() as u64,
    };
    if let Err(s) = auth.report_outcome(request).await {
        tracing::warn!(provider = %lease.provider, code = ?s.code(), error = %s.message(), "ReportOutcome failed");
    }
}

impl RemoteBackend {
    /// A backend for `name` (`provider/model`) leasing from `auth`.
    pub fn new(
        name: &str,
        auth: AuthRotationServiceClient<TracedChannel>,
        http: reqwest::Client,
        settings: RemoteSettings,
    ) -> Result<Self, GenerationError> {
        let (provider, model) =
            split_name(name).ok_or_else(|| GenerationError::UnknownModel(name.to_owned()))?;
        Ok(Self {
            name: name.to_owned(),
            provider: provider.to_owned(),
            model: model.to_owned(),
            auth,
            http,
            settings,
        })
    }

    async fn lease(&self) -> Result<Lease, GenerationError> {
        let mut auth = self.auth.clone();
        let response = auth
            .acquire_credential(AcquireCredentialRequest {
                provider: self.provider.clone(),
                model: self.model.clone(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => GenerationError::UnknownModel(self.name.clone()),
                // No usable lease (every key cooling or behind an open
                // breaker, the provider unhealthy): not worth waiting on.
                tonic::Code::Unavailable => {
                    GenerationError::RemoteExhausted(format!("{}: {}", self.name, s.message()))
                }
                _ => GenerationError::RemoteUnavailable(format!("auth-rotation: {}", s.message())),
            })?;
        response.into_inner().lease.ok_or_else(|| {
            GenerationError::RemoteUnavailable("auth-rotation answered without a lease".into())
        })
    }
}

#[tonic::async_trait]
impl Backend for RemoteBackend {
    fn card(&self) -> ModelCard {
        ModelCard {
            name: self.name.clone(),
            context_length: 0,
            device: "remote".into(),
            dtype: "-".into(),
            backend: format!("remote:{}", self.provider),
            active_sequences: 0,
            queued_requests: 0,
            max_batch_size: 0,
        }
    }

    fn count_tokens(
        &self,
        _messages: &[ChatMessage],
        _texts: &[String],
    ) -> Result<(usize, Vec<usize>), GenerationError> {
        Err(GenerationError::Unsupported(format!(
            "{} is remote: its tokenizer is not available here; count with a local model",
            self.name
        )))
    }

    async fn generate(
        &self,
        input: GenerateInput,
    ) -> Result<mpsc::UnboundedReceiver<Event>, GenerationError> {
        if input.logprobs.is_some() {
            // UNIMPLEMENTED: the gateway tries the route's next model.
            return Err(GenerationError::Unsupported(format!(
                "{}: log probabilities are served by local models only",
                self.name
            )));
        }
        let mut last_error = String::new();
        let mut rate_limited = false;
        for _ in 0..self.settings.max_credentials.max(1) {
            let lease = match self.lease().await {
                Ok(lease) => lease,
                // A key already refused this turn and no other to lease.
                Err(GenerationError::RemoteExhausted(m)) if !last_error.is_empty() => {
                    return Err(GenerationError::RemoteExhausted(format!(
                        "{m} (after {last_error})"
                    )));
                }
                Err(e) => return Err(e),
            };
            let kind = ProviderKind::try_from(lease.kind).unwrap_or(ProviderKind::Openai);
            let (url, body) = match kind {
                ProviderKind::Anthropic => (
                    format!("{}/messages", lease.base_url),
                    wire::anthropic_body(&self.model, &input),
                ),
                _ => (
                    format!("{}/chat/completions", lease.base_url),
                    wire::openai_body(&self.model, &input),
                ),
            };
            let started = Instant::now();
            let mut request = self.http.post(&url).json(&body);
            if lease.auth_header_name.is_empty() {
                // An in-cluster engine without a key (vLLM, llm-d, KServe, a
                // llama.cpp server): no auth header, and the session's
                // digest as an affinity header, so the engine's router can
                // keep a conversation on the replica holding its KV cache.
                // Never sent to a keyed (third-party) provider.
                if !input.affinity.is_empty() {
                    request = request.header(AFFINITY_HEADER, input.affinity.as_str());
                }
            } else {
                request = request.header(
                    lease.auth_header_name.as_str(),
                    lease.auth_header_value.as_str(),
                );
            }
            if kind == ProviderKind::Anthropic {
                request = request.header("anthropic-version", wire::ANTHROPIC_VERSION);
            }
            let response =
                match tokio::time::timeout(self.settings.ttft_timeout, request.send()).await {
                    Err(_) => {
                        report(self.auth.clone(), &lease, Outcome::Timeout, 0, 0, started).await;
                        return Err(GenerationError::RemoteUnavailable(format!(
                            "{}: no answer within {} ms",
                            self.name,
                            self.settings.ttft_timeout.as_millis()
                        )));
                    }
                    Ok(Err(e)) => {
                        let outcome = if e.is_timeout() {
                            Outcome::Timeout
                        } else {
                            Outcome::ConnectionError
                        };
                        report(self.auth.clone(), &lease, outcome, 0, 0, started).await;
                        return Err(GenerationError::RemoteUnavailable(format!(
                            "{}: {}",
                            self.name,
                            moltbot_runtime::tls::explain(&e)
                        )));
                    }
                    Ok(Ok(r)) => r,
                };
            let status = response.status().as_u16();
            let outcome = outcome_of(status);
            match outcome {
                Outcome::Ok => {}
                Outcome::ClientError => {
                    report(self.auth.clone(), &lease, outcome, status, 0, started).await;
                    let body = tokio::time::timeout(
                        self.settings.ttft_timeout.saturating_sub(started.elapsed()),
                        response.text(),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                    return Err(GenerationError::ProviderRejected {
                        status,
                        message: provider_message(&body),
                    });
                }
                Outcome::AuthFailed | Outcome::RateLimited => {
                    // This credential cannot serve now; the next lease gets
                    // another one (auth-rotation invalidates or cools it).
                    let wait = retry_after_ms(response.headers(), std::time::SystemTime::now());
                    report(self.auth.clone(), &lease, outcome, status, wait, started).await;
                    tracing::warn!(provider = %self.provider, model = %self.model, credential_id = %lease.credential_id, http_status = status, "credential refused; trying the next");
                    last_error = format!("HTTP {status} from {}", self.provider);
                    rate_limited |= outcome == Outcome::RateLimited;
                    continue;
                }
                _ => {
                    report(self.auth.clone(), &lease, outcome, status, 0, started).await;
                    return Err(GenerationError::RemoteUnavailable(format!(
                        "{}: HTTP {status}",
                        self.name
                    )));
                }
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let auth = self.auth.clone();
            let settings = self.settings;
            let name = self.name.clone();
            tokio::spawn(async move {
                let answer_tool = input.response_format.is_some();
                let result = pump(
                    response,
                    kind,
                    answer_tool,
                    &tx,
                    settings,
                    input.received,
                    started,
                )
                .await;
                let outcome = match &result {
                    Ok(()) => Outcome::Ok,
                    Err(_) => Outcome::Timeout,
                };
                report(auth, &lease, outcome, status, 0, started).await;
                if let Err(e) = result {
                    tracing::warn!(model = %name, error = %e, "remote stream failed");
                    let _ = tx.send(Event::Failed(e));
                }
            });
            return Ok(rx);
        }
        let message = format!("{}: no credential was accepted ({last_error})", self.name);
        Err(if rate_limited {
            GenerationError::RemoteExhausted(message)
        } else {
            GenerationError::RemoteUnavailable(message)
        })
    }
}

/// Reads the provider's stream into events. Errors when the first token or
/// the next event does not come in time, or the stream breaks.
async fn pump(
    response: reqwest::Response,
    kind: ProviderKind,
    answer_tool: bool,
    tx: &mpsc::UnboundedSender<Event>,
    settings: RemoteSettings,
    received: Instant,
    started: Instant,
) -> Result<(), GenerationError> {
    let mut body = response.bytes_stream();
    let mut reader = sse::SseReader::default();
    let mut usage = Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
        time_to_first_token_ms: 0,
        total_ms: 0,
    };
    let mut deltas = 0usize;
    let mut finish = Finish::Stop;
    let mut first = true;
    let mut calls = tools::Calls::default();
    loop {
        let wait = if first {
            settings.ttft_timeout.saturating_sub(started.elapsed())
        } else {
            settings.idle_timeout
        };
        let chunk = match tokio::time::timeout(wait, body.next()).await {
            Err(_) => {
                return Err(GenerationError::RemoteUnavailable(format!(
                    "the stream stalled for {} ms",
                    wait.as_millis()
                )));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(GenerationError::RemoteUnavailable(format!(
                    "stream broke: {}",
                    e.without_url()
                )));
            }
            Ok(Some(Ok(bytes))) => bytes,
        };
        for data in reader.push(&chunk) {
            let p = match kind {
                ProviderKind::Anthropic => wire::anthropic_event(&data, answer_tool),
                _ => wire::openai_event(&data),
            };
            if let Some(n) = p.prompt_tokens {
                usage.prompt_tokens = n;
            }
            if let Some(n) = p.completion_tokens {
                usage.completion_tokens = n;
            }
            if let Some(f) = &p.finish {
                finish = match f.as_str() {
                    "length" | "max_tokens" => Finish::Length,
                    "tool_calls" | "tool_use" if !answer_tool => Finish::ToolCalls,
                    _ => Finish::Stop,
                };
            }
            if !p.tool_fragments.is_empty() && first {
                usage.time_to_first_token_ms = received.elapsed().as_millis() as u64;
                first = false;
            }
            for f in p.tool_fragments {
                calls.push(f);
            }
            if let Some(text) = p.text {
                if first {
                    usage.time_to_first_token_ms = received.elapsed().as_millis() as u64;
                    first = false;
                }
                deltas += 1;
                if tx
                    .send(Event::Delta {
                        text,
                        token_ids: Vec::new(),
                        logprobs: Vec::new(),
                    })
                    .is_err()
                {
                    // The caller went away: stop reading (drops the connection).
                    return Ok(());
                }
            }
            if p.done {
                return finished(tx, finish, usage, deltas, calls, received);
            }
        }
    }
    finished(tx, finish, usage, deltas, calls, received)
}

fn finished(
    tx: &mpsc::UnboundedSender<Event>,
    mut reason: Finish,
    mut usage: Usage,
    deltas: usize,
    calls: tools::Calls,
    received: Instant,
) -> Result<(), GenerationError> {
    if usage.completion_tokens == 0 {
        usage.completion_tokens = deltas;
    }
    usage.total_ms = received.elapsed().as_millis() as u64;
    if !calls.is_empty() {
        reason = Finish::ToolCalls;
    }
    for call in calls.into_events() {
        let _ = tx.send(call);
    }
    let _ = tx.send(Event::Finished { reason, usage });
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn with_retry_after(v: &str) -> reqwest::header::HeaderMap {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::RETRY_AFTER,
            reqwest::header::HeaderValue::from_str(v)
                .unwrap_or_else(|_| reqwest::header::HeaderValue::from_static("unreadable")),
        );
        h
    }

    #[test]
    fn statuses_map_to_outcomes() {
        assert_eq!(outcome_of(200), Outcome::Ok);
        assert_eq!(outcome_of(401), Outcome::AuthFailed);
        assert_eq!(outcome_of(403), Outcome::AuthFailed);
        assert_eq!(outcome_of(429), Outcome::RateLimited);
        for client in [400, 404, 413, 422] {
            assert_eq!(outcome_of(client), Outcome::ClientError, "{client}");
        }
        for server in [500, 502, 503, 529] {
            assert_eq!(outcome_of(server), Outcome::ServerError, "{server}");
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after_ms(&with_retry_after("7"), now), 7_000);
        assert_eq!(retry_after_ms(&with_retry_after("0.5"), now), 500);
        let later = httpdate::fmt_http_date(now + Duration::from_secs(42));
        assert_eq!(retry_after_ms(&with_retry_after(&later), now), 42_000);
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(5));
        assert_eq!(retry_after_ms(&with_retry_after(&earlier), now), 0);
        assert_eq!(retry_after_ms(&with_retry_after("soon"), now), 0);
        assert_eq!(retry_after_ms(&reqwest::header::HeaderMap::new(), now), 0);
    }

    #[test]
    fn provider_messages_come_from_either_error_envelope() {
        assert_eq!(
            provider_message(
                r#"{"error":{"message":"max_tokens is too large","type":"invalid_request_error"}}"#
            ),
            "max_tokens is too large"
        );
        assert_eq!(
            provider_message(
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"messages: empty"}}"#
            ),
            "messages: empty"
        );
        assert_eq!(provider_message("plain text"), "plain text");
    }
}
