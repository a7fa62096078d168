//! The remote backend: a model served by an OpenAI-compatible or Anthropic
//! provider, named `<provider>/<model>`. Every call runs on a credential
//! lease from the auth-rotation service and reports its outcome there. A 401
//! or 429 before the first byte moves on to the next credential at once (the
//! caller never sees it); 5xx, connection errors and timeouts end the call as
//! UNAVAILABLE so the gateway's route retries or falls back. Time to first
//! token and the gap between stream events are bounded, so a stuck provider
//! fails over instead of hanging.

pub mod sse;
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

fn outcome_of(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Ok,
        401 | 403 => Outcome::AuthFailed,
        429 => Outcome::RateLimited,
        _ => Outcome::ServerError,
    }
}

fn retry_after_ms(headers: &reqwest::header::HeaderMap) -> u64 {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |s| (s * 1000.0) as u64)
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
        let mut last_error = String::new();
        for _ in 0..self.settings.max_credentials.max(1) {
            let lease = self.lease().await?;
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
            let mut request = self
                .http
                .post(&url)
                .header(
                    lease.auth_header_name.as_str(),
                    lease.auth_header_value.as_str(),
                )
                .json(&body);
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
                Outcome::AuthFailed | Outcome::RateLimited => {
                    // This credential cannot serve now; the next lease gets
                    // another one (auth-rotation invalidates or cools it).
                    let wait = retry_after_ms(response.headers());
                    report(self.auth.clone(), &lease, outcome, status, wait, started).await;
                    tracing::warn!(provider = %self.provider, model = %self.model, credential_id = %lease.credential_id, http_status = status, "credential refused; trying the next");
                    last_error = format!("HTTP {status} from {}", self.provider);
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
                let result = pump(response, kind, &tx, settings, input.received, started).await;
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
        Err(GenerationError::RemoteUnavailable(format!(
            "{}: no credential was accepted ({last_error})",
            self.name
        )))
    }
}

/// Reads the provider's stream into events. Errors when the first token or
/// the next event does not come in time, or the stream breaks.
async fn pump(
    response: reqwest::Response,
    kind: ProviderKind,
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
                ProviderKind::Anthropic => wire::anthropic_event(&data),
                _ => wire::openai_event(&data),
            };
            if let Some(n) = p.prompt_tokens {
                usage.prompt_tokens = n;
            }
            if let Some(n) = p.completion_tokens {
                usage.completion_tokens = n;
            }
            if let Some(f) = &p.finish {
                finish = if matches!(f.as_str(), "length" | "max_tokens") {
                    Finish::Length
                } else {
                    Finish::Stop
                };
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
                    })
                    .is_err()
                {
                    // The caller went away: stop reading (drops the connection).
                    return Ok(());
                }
            }
            if p.done {
                return finished(tx, finish, usage, deltas, received);
            }
        }
    }
    finished(tx, finish, usage, deltas, received)
}

fn finished(
    tx: &mpsc::UnboundedSender<Event>,
    reason: Finish,
    mut usage: Usage,
    deltas: usize,
    received: Instant,
) -> Result<(), GenerationError> {
    if usage.completion_tokens == 0 {
        usage.completion_tokens = deltas;
    }
    usage.total_ms = received.elapsed().as_millis() as u64;
    let _ = tx.send(Event::Finished { reason, usage });
    Ok(())
}
