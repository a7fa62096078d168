//! The gateway's errors: start-up failures ([`GatewayError`]) and the errors of
//! one API request ([`ApiError`]), which map to HTTP status codes and the
//! OpenAI error envelope `{"error": {"message", "type", "code"}}` in one
//! exhaustive `match`.

use std::{net::SocketAddr, time::Duration};

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

/// Errors of gateway start-up and serving.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A flag, environment variable or the config file is invalid; the message
    /// says what to fix.
    #[error(transparent)]
    Config(#[from] moltbot_runtime::RuntimeError),
    /// The HTTP address could not be bound.
    #[error(
        "cannot listen on {addr}: {source} (set MOLTBOT_HTTP_ADDR or --http-addr to a free port)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("HTTP server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Why one API request failed. Every variant names the HTTP status it answers
/// with in [`IntoResponse`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not valid JSON for the endpoint.
    #[error("invalid JSON body: {0}")]
    InvalidJson(String),
    /// 400: a field is invalid; the message names it.
    #[error("{0}")]
    InvalidRequest(String),
    /// 401: missing or unknown API key.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 404: no route and no served model has this name.
    #[error("model `{0}` does not exist; GET /v1/models lists the models")]
    ModelNotFound(String),
    /// 404: `previous_response_id` names no stored response.
    #[error("response `{0}` was not found (a `store: false` response cannot be continued)")]
    ResponseNotFound(String),
    /// 404: an operator endpoint's object does not exist (the message
    /// names it).
    #[error("{0}")]
    NotFound(String),
    /// 409: the request does not fit the object's state (a rollout's
    /// phase); the message says what would.
    #[error("{0}")]
    Conflict(String),
    /// 408: the request body did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// 503: the gateway is at its in-flight limit (with `Retry-After`).
    #[error("{0}")]
    Overloaded(String),
    /// 413: the body is over the limit.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 422: the prompt does not fit the model's context window.
    #[error(
        "the prompt is {prompt_tokens} tokens, but model `{model}` has a context length of {context_length} tokens (leaving no room for the answer); shorten the messages"
    )]
    ContextLengthExceeded {
        /// Model the prompt was counted for.
        model: String,
        /// Tokens of the prompt without history.
        prompt_tokens: u32,
        /// The model's context window, in tokens.
        context_length: u32,
    },
    /// 429: the key's request or token rate is spent.
    #[error("rate limit of {limit} reached; retry after {} s", retry_after.as_secs().max(1))]
    RateLimited {
        /// Which limit (`requests per minute`, `tokens per minute`).
        limit: &'static str,
        /// When a request can be accepted again.
        retry_after: Duration,
    },
    /// The request's worst-case cost does not fit a budget (429).
    #[error(
        "budget {budget} ({window}, ${max_usd}) cannot take this request: ${spent_usd:.6} is spent or reserved and the request may cost up to ${needed_usd:.6}; it resets at {resets_at}"
    )]
    BudgetExceeded {
        /// `key:NAME` or `tenant:NAME`.
        budget: String,
        /// `daily`, `weekly`, `monthly` or `rolling`.
        window: String,
        /// The budget, USD.
        max_usd: f64,
        /// Spent or reserved in the window, USD.
        spent_usd: f64,
        /// This request's worst-case cost, USD.
        needed_usd: f64,
        /// When the window resets (RFC 3339).
        resets_at: String,
        /// Until then.
        retry_after: Duration,
    },
    /// The route refuses a model without a price for a caller with a
    /// budget (403).
    #[error(
        "route `{route}` may answer with model `{model}`, which has no price, and refuses unpriced models under a budget: add it to spend.prices"
    )]
    Unpriced {
        /// The route.
        route: String,
        /// The unpriced model.
        model: String,
    },
    /// An upstream gRPC call failed; the status maps to 4xx/5xx.
    #[error("{service}: {}", status.message())]
    Upstream {
        /// Upstream name (`context`, `generation`).
        service: &'static str,
        /// Its status.
        status: tonic::Status,
    },
    /// 503/504: every model of the route failed; `moltbot.attempts`-like
    /// summary in the message.
    #[error("every model of route `{route}` failed: {summary}")]
    AllAttemptsFailed {
        /// Route.
        route: String,
        /// `model: outcome` of each attempt.
        summary: String,
        /// True when the turn's deadline ran out (504) rather than the models
        /// being unavailable (503).
        deadline: bool,
    },
}

fn upstream_status(code: tonic::Code) -> (StatusCode, &'static str) {
    use tonic::Code;
    match code {
        Code::InvalidArgument | Code::OutOfRange => {
            (StatusCode::BAD_REQUEST, "invalid_request_error")
        }
        Code::FailedPrecondition => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error"),
        Code::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error"),
        Code::Unauthenticated | Code::PermissionDenied => {
            (StatusCode::BAD_GATEWAY, "upstream_error")
        }
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout_error"),
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted | Code::Cancelled => {
            (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable")
        }
        Code::Ok
        | Code::Unknown
        | Code::AlreadyExists
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss => (StatusCode::BAD_GATEWAY, "upstream_error"),
    }
}

impl ApiError {
    /// HTTP status, OpenAI error `type` and `code`.
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::InvalidJson(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
            ),
            Self::InvalidRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
            ),
            Self::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
            ),
            Self::ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
            ),
            Self::ResponseNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "response_not_found",
            ),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "invalid_request_error", "conflict"),
            Self::RequestTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "request_timeout",
            ),
            Self::Overloaded(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "overloaded",
            ),
            Self::PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
            ),
            Self::ContextLengthExceeded { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "context_length_exceeded",
            ),
            Self::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            Self::BudgetExceeded { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "budget_exceeded",
            ),
            Self::Unpriced { .. } => (StatusCode::FORBIDDEN, "permission_error", "unpriced_model"),
            Self::Upstream { status, .. } => {
                let (code, kind) = upstream_status(status.code());
                (code, kind, "upstream_error")
            }
            Self::AllAttemptsFailed { deadline: true, .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "timeout_error",
                "deadline_exceeded",
            ),
            Self::AllAttemptsFailed {
                deadline: false, ..
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "all_models_failed",
            ),
        }
    }

    /// The envelope as a JSON value (also sent as an SSE `data:` object when a
    /// stream fails after its first chunk).
    pub fn envelope(&self) -> serde_json::Value {
        let (_, kind, code) = self.parts();
        json!({"error": {"message": self.to_string(), "type": kind, "code": code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.parts();
        if status.is_server_error() {
            tracing::warn!(error = %self, status = status.as_u16(), "request failed");
        } else {
            tracing::info!(error = %self, status = status.as_u16(), "request rejected");
        }
        let mut response = (status, Json(self.envelope())).into_response();
        if matches!(self, Self::Overloaded(_)) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Self::RateLimited { retry_after, .. } | Self::BudgetExceeded { retry_after, .. } =
            &self
        {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}
