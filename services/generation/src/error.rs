//! The generation service's one error type and its exhaustive mapping to gRPC
//! status codes.

use tonic::Status;

/// Everything that can go wrong while loading a model or generating.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    /// The request names a model this service does not serve.
    #[error("model {0:?} is not served here; ListModels lists the models")]
    UnknownModel(String),
    /// The prompt plus `max_tokens` does not fit the model's context.
    #[error(
        "prompt of {prompt_tokens} tokens + max_tokens {max_tokens} exceeds the context length of {context_length} tokens"
    )]
    ContextOverflow {
        /// Prompt tokens after the chat template.
        prompt_tokens: usize,
        /// Requested completion tokens.
        max_tokens: usize,
        /// The model's context length in tokens.
        context_length: usize,
    },
    /// A field of the request is out of range or malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request queue is full; the caller should back off and retry.
    #[error("generation queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
    /// The device ran out of memory for this request; other requests go on.
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    /// The model's files are missing or unreadable.
    #[error("cannot load model from {path}: {reason}")]
    Load {
        /// The model directory.
        path: String,
        /// What is wrong, and what to do about it.
        reason: String,
    },
    /// The chat template or tokenizer failed on this input.
    #[error("tokenization failed: {0}")]
    Tokenizer(String),
    /// The grammar matcher of a constrained request failed mid-answer.
    #[error("constrained decoding failed: {0}")]
    Constraint(String),
    /// libtorch reported an error other than out-of-memory.
    #[error("tensor error: {0}")]
    Tensor(String),
    /// The model's scheduler stopped (the service is shutting down).
    #[error("the model's scheduler is not running")]
    EngineStopped,
    /// A remote provider (or auth-rotation) cannot serve the request now:
    /// every credential failed, the endpoint's breaker is open, it timed out
    /// or answered 5xx. The caller's route may retry or fall back.
    #[error("remote provider unavailable: {0}")]
    RemoteUnavailable(String),
    /// A remote model cannot take the request now and says so without
    /// fault of its own: every credential is rate limited (429) or cooling,
    /// or auth-rotation has no usable lease (breaker open, provider
    /// unhealthy). The caller should move to its next model at once rather
    /// than wait on this one.
    #[error("remote model busy: {0}")]
    RemoteExhausted(String),
    /// The provider rejected the request itself (HTTP 400, 404, 413, 422):
    /// the caller's error, passed back with the provider's own message;
    /// retrying or another key would not help.
    #[error("the provider rejected the request (HTTP {status}): {message}")]
    ProviderRejected {
        /// The provider's HTTP status.
        status: u16,
        /// The provider's error message.
        message: String,
    },
    /// The operation does not apply to this backend (token counting of a
    /// remote model).
    #[error("{0}")]
    Unsupported(String),
    /// LoadModel names a model already served (or being loaded).
    #[error(
        "a model named {0:?} is already served or loading; unload it or load under another name"
    )]
    AlreadyServed(String),
    /// LoadModel would not fit in memory.
    #[error(
        "loading {model:?} needs about {needed} MiB (weights and KV cache) but {available} MiB are available; unload a model or lower MOLTBOT_KV_CACHE_MB",
        needed = needed_bytes >> 20,
        available = available_bytes >> 20
    )]
    WontFit {
        /// The model.
        model: String,
        /// Estimated need, bytes.
        needed_bytes: u64,
        /// Memory available to the process, bytes.
        available_bytes: u64,
    },
    /// An operator RPC without the operator's credential.
    #[error("{0}")]
    Unauthenticated(String),
    /// An operator RPC with a wrong credential, or none configured.
    #[error("{0}")]
    PermissionDenied(String),
}

/// A sequence outgrew the KV blocks promised at its admission: a scheduler
/// bug, not the caller's fault.
impl From<crate::kv::OutOfBlocks> for GenerationError {
    fn from(_: crate::kv::OutOfBlocks) -> Self {
        Self::Tensor("KV cache promise broken: a sequence outgrew its blocks".into())
    }
}

impl From<tch::TchError> for GenerationError {
    fn from(e: tch::TchError) -> Self {
        let message = e.to_string();
        if message.contains("out of memory") || message.contains("DefaultCPUAllocator") {
            // Keep the first line: libtorch appends a long C++ backtrace.
            let first = message.lines().next().unwrap_or_default().to_owned();
            GenerationError::OutOfMemory(first)
        } else {
            GenerationError::Tensor(message.lines().next().unwrap_or_default().to_owned())
        }
    }
}

impl From<GenerationError> for Status {
    fn from(e: GenerationError) -> Self {
        let message = e.to_string();
        match e {
            GenerationError::UnknownModel(_) => Status::not_found(message),
            GenerationError::ContextOverflow { .. } | GenerationError::InvalidArgument(_) => {
                Status::invalid_argument(message)
            }
            GenerationError::QueueFull(_)
            | GenerationError::OutOfMemory(_)
            | GenerationError::RemoteExhausted(_) => Status::resource_exhausted(message),
            GenerationError::ProviderRejected { .. } => Status::invalid_argument(message),
            GenerationError::Load { .. } => Status::failed_precondition(message),
            GenerationError::Tokenizer(_) => Status::invalid_argument(message),
            GenerationError::Tensor(_) | GenerationError::Constraint(_) => {
                Status::internal(message)
            }
            GenerationError::EngineStopped | GenerationError::RemoteUnavailable(_) => {
                Status::unavailable(message)
            }
            GenerationError::Unsupported(_) => Status::unimplemented(message),
            GenerationError::AlreadyServed(_) => Status::already_exists(message),
            GenerationError::WontFit { .. } => Status::failed_precondition(message),
            GenerationError::Unauthenticated(_) => Status::unauthenticated(message),
            GenerationError::PermissionDenied(_) => Status::permission_denied(message),
        }
    }
}
