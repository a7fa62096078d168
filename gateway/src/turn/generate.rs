//! Stage 6: generation across the route's candidates under the call
//! policy's walk ([`super::policy::walk`]). An attempt succeeds once its
//! first event arrives: after that, tokens may already be on their way to
//! the client and the turn cannot move to another model.

use futures::StreamExt;
use moltbot_proto::generation::v1::GenerateResponse;

use super::{
    Ports, Prepared, metrics,
    policy::{self, WalkError},
    ports::Events,
};
use crate::ApiError;

/// A generation that produced its first event.
pub struct Started {
    /// Model that answers.
    pub model: String,
    /// The first event (a delta, or the summary of an empty answer).
    pub first: GenerateResponse,
    /// The rest of the events.
    pub events: Events,
}

/// Starts generation for `prepared` on its chain, recording every attempt
/// in `prepared.ext.attempts`.
///
/// Errors: [`ApiError::Upstream`] at once for a request no model can serve
/// (INVALID_ARGUMENT and the like); [`ApiError::AllAttemptsFailed`] when
/// every model failed or the deadline ran out (`deadline: true`).
pub async fn start(ports: &Ports, prepared: &mut Prepared) -> Result<Started, ApiError> {
    // Session affinity: the balancer sends every turn of a session to the
    // same generation replica while it is ready, where the previous turns'
    // KV blocks are cached (moltbot_runtime::grpc::balance::affinity).
    let affinity =
        moltbot_runtime::telemetry::redact::session_id(&prepared.tenant, &prepared.ext.session_id);
    let generation = ports.generation.as_ref();
    let request = &prepared.request;
    let affinity = affinity.as_str();
    let before = prepared.ext.attempts.len();
    let attempt = |model: &str, left| {
        let mut request = request.clone();
        request.model = model.to_owned();
        async move {
            let mut events = generation.generate(request, Some(affinity), left).await?;
            match events.next().await {
                Some(Ok(first)) => Ok((first, events)),
                Some(Err(broke)) => Err(broke.status),
                None => Err(tonic::Status::internal(
                    "generation ended the stream without an event",
                )),
            }
        }
    };
    // A canary session tries the canary on its own first: whatever it
    // answers — even a status that would end the walk, such as a request
    // the canary refuses — the stable chain still gets the turn, so a
    // client never sees a canary's failure (gateway/src/rollout/).
    let canary_first = prepared
        .ext
        .rollout
        .as_ref()
        .is_some_and(|r| r.variant == crate::rollout::Variant::Canary)
        && prepared.chain.len() > 1;
    let (head, rest) = prepared.chain.split_at(usize::from(canary_first));
    let mut walked = Err(WalkError::Exhausted { deadline: false });
    if canary_first {
        walked = policy::walk(
            "generation",
            "generate",
            head,
            &prepared.retry,
            prepared.budget,
            &mut prepared.ext.attempts,
            attempt,
        )
        .await;
    }
    if walked.is_err() {
        walked = policy::walk(
            "generation",
            "generate",
            rest,
            &prepared.retry,
            prepared.budget,
            &mut prepared.ext.attempts,
            attempt,
        )
        .await;
    }
    for a in &prepared.ext.attempts[before..] {
        metrics::ATTEMPTS
            .with_label_values(&[a.model.as_str(), a.outcome.as_str()])
            .inc();
    }
    match walked {
        Ok((model, (first, events))) => Ok(Started {
            model,
            first,
            events,
        }),
        Err(WalkError::Fail(status)) => Err(ApiError::Upstream {
            service: "generation",
            status,
        }),
        Err(WalkError::Exhausted { deadline }) => {
            let summary = prepared
                .ext
                .attempts
                .iter()
                .map(|a| format!("{}: {}", a.model, a.outcome))
                .collect::<Vec<_>>()
                .join(", ");
            Err(ApiError::AllAttemptsFailed {
                route: prepared.route.clone(),
                summary: if summary.is_empty() {
                    "no attempt fitted in the deadline".to_owned()
                } else {
                    summary
                },
                deadline,
            })
        }
    }
}
