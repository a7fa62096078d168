//! Generation with retries and fallback: each model of the route's chain gets
//! up to `max_attempts` tries with jittered exponential backoff, all within
//! the turn's deadline; an attempt succeeds once its first event arrives (after
//! that, tokens may already be on their way to the client and the turn cannot
//! move to another model).

use std::time::{Duration, Instant};

use moltbot_proto::generation::v1::{
    GenerateRequest, GenerateResponse, generation_service_client::GenerationServiceClient,
};
use moltbot_runtime::grpc::client::TracedChannel;
use rand::SeedableRng;

use super::metrics;
use crate::{
    ApiError,
    openai::Attempt,
    routing::{self, config::RetryPolicy},
};

/// A generation that produced its first event.
pub struct Started {
    /// Model that answers.
    pub model: String,
    /// The first event (a delta, or the summary of an empty answer).
    pub first: GenerateResponse,
    /// The rest of the events.
    pub stream: tonic::Streaming<GenerateResponse>,
}

/// What to do after a failed attempt.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Try the same model again (after backoff).
    Retry,
    /// This model cannot serve the request; go to the next one.
    OtherModel,
    /// The request itself is wrong; no model will do better.
    Fail,
}

/// What follows a failed attempt with `code`; `more` says whether the chain
/// has another model after this one. RESOURCE_EXHAUSTED (every key of a
/// remote model rate limited or cooling, or a full queue) moves to the next
/// model at once: a turn never sleeps on a busy model while another could
/// answer; as the last model it is retried with backoff.
fn next_after(code: tonic::Code, more: bool) -> Next {
    use tonic::Code;
    match code {
        Code::ResourceExhausted if more => Next::OtherModel,
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::DataLoss
        | Code::Cancelled => Next::Retry,
        Code::NotFound | Code::Unimplemented | Code::Unauthenticated | Code::PermissionDenied => {
            Next::OtherModel
        }
        Code::Ok
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::AlreadyExists => Next::Fail,
    }
}

/// Whether a generation that failed with `code` after it had started may
/// be started again (when nothing has reached the client): any failure but
/// one the request itself caused.
pub fn restartable(code: tonic::Code) -> bool {
    next_after(code, false) == Next::Retry
}

/// Snake-case name of a gRPC code, as reported in `moltbot.attempts`.
pub fn outcome_name(code: tonic::Code) -> String {
    let debug = format!("{code:?}");
    let mut out = String::new();
    for (i, ch) in debug.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_lowercase());
    }
    out
}

async fn one_attempt(
    channel: TracedChannel,
    mut request: GenerateRequest,
    model: &str,
    remaining: Duration,
    affinity: Option<&str>,
) -> Result<Started, tonic::Status> {
    request.model = model.to_owned();
    let mut req = tonic::Request::new(request);
    req.set_timeout(remaining);
    // Session affinity: the balancer sends every turn of a session to the
    // same generation replica while it is ready, where the previous turns'
    // KV blocks are cached (moltbot_runtime::grpc::balance::affinity).
    if let Some(key) = affinity.and_then(|k| k.parse().ok()) {
        req.metadata_mut()
            .insert(moltbot_runtime::grpc::balance::AFFINITY_HEADER, key);
    }
    let mut client = GenerationServiceClient::new(channel);
    let call = async {
        let mut stream = client.generate(req).await?.into_inner();
        match stream.message().await? {
            Some(first) => Ok(Started {
                model: model.to_owned(),
                first,
                stream,
            }),
            None => Err(tonic::Status::internal(
                "generation ended the stream without an event",
            )),
        }
    };
    match tokio::time::timeout(remaining, call).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no first token within {} ms",
            remaining.as_millis()
        ))),
    }
}

/// Which models to try, how, and for which session.
pub struct Plan<'a> {
    /// Route name (for errors).
    pub route: &'a str,
    /// Models in order.
    pub chain: &'a [String],
    /// Attempts and backoff per model.
    pub policy: &'a RetryPolicy,
    /// A digest of tenant and session: keeps a session's turns on one
    /// generation replica when it can (its prefix cache lives there).
    pub affinity: Option<&'a str>,
}

/// Tries `plan.chain` in order under `plan.policy` until one model starts
/// answering. Every attempt is appended to `attempts`.
///
/// Errors: [`ApiError::Upstream`] at once for a request no model can serve
/// (INVALID_ARGUMENT and the like); [`ApiError::AllAttemptsFailed`] when every
/// model failed or the deadline ran out (`deadline: true`).
pub async fn start(
    channel: &TracedChannel,
    plan: Plan<'_>,
    request: GenerateRequest,
    deadline: Instant,
    attempts: &mut Vec<Attempt>,
) -> Result<Started, ApiError> {
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut deadline_hit = false;
    let Plan {
        route,
        chain,
        policy,
        affinity,
    } = plan;
    'models: for (index, model) in chain.iter().enumerate() {
        let more = index + 1 < chain.len();
        for n in 1..=policy.max_attempts {
            let wait = routing::backoff(policy, n, &mut rng);
            let now = Instant::now();
            if now + wait >= deadline {
                deadline_hit = true;
                break 'models;
            }
            tokio::time::sleep(wait).await;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let began = Instant::now();
            let result =
                one_attempt(channel.clone(), request.clone(), model, remaining, affinity).await;
            let latency_ms = began.elapsed().as_millis() as u64;
            match result {
                Ok(started) => {
                    metrics::ATTEMPTS
                        .with_label_values(&[model.as_str(), "ok"])
                        .inc();
                    attempts.push(Attempt {
                        model: model.clone(),
                        outcome: "ok".to_owned(),
                        latency_ms,
                        error: None,
                    });
                    return Ok(started);
                }
                Err(status) => {
                    let outcome = outcome_name(status.code());
                    metrics::ATTEMPTS
                        .with_label_values(&[model.as_str(), outcome.as_str()])
                        .inc();
                    tracing::warn!(model = %model, attempt = n, %outcome, error = %status.message(), "generation attempt failed");
                    attempts.push(Attempt {
                        model: model.clone(),
                        outcome,
                        latency_ms,
                        error: Some(status.message().to_owned()),
                    });
                    match next_after(status.code(), more) {
                        Next::Retry => {}
                        Next::OtherModel => continue 'models,
                        Next::Fail => {
                            return Err(ApiError::Upstream {
                                service: "generation",
                                status,
                            });
                        }
                    }
                    if Instant::now() >= deadline {
                        deadline_hit = true;
                        break 'models;
                    }
                }
            }
        }
    }
    let summary = attempts
        .iter()
        .map(|a| format!("{}: {}", a.model, a.outcome))
        .collect::<Vec<_>>()
        .join(", ");
    Err(ApiError::AllAttemptsFailed {
        route: route.to_owned(),
        summary: if summary.is_empty() {
            "no attempt fitted in the deadline".to_owned()
        } else {
            summary
        },
        deadline: deadline_hit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_are_snake_case() {
        assert_eq!(
            outcome_name(tonic::Code::DeadlineExceeded),
            "deadline_exceeded"
        );
        assert_eq!(outcome_name(tonic::Code::Unavailable), "unavailable");
        assert_eq!(next_after(tonic::Code::NotFound, true), Next::OtherModel);
        assert_eq!(next_after(tonic::Code::InvalidArgument, true), Next::Fail);
        // A rate-limited model: the next one at once, a retry only when
        // nothing follows it.
        assert_eq!(
            next_after(tonic::Code::ResourceExhausted, true),
            Next::OtherModel
        );
        assert_eq!(
            next_after(tonic::Code::ResourceExhausted, false),
            Next::Retry
        );
        assert_eq!(next_after(tonic::Code::Unavailable, true), Next::Retry);
    }
}
