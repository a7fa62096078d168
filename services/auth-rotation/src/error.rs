//! The auth-rotation service's errors and their gRPC status codes. Messages
//! never contain secret material.

/// Errors of the auth-rotation service.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Start-up configuration is invalid; the message says what to fix.
    #[error("{0}")]
    Config(String),
    /// A request field is invalid; the message names it.
    #[error("{0}")]
    InvalidArgument(String),
    /// Unknown provider, model, credential or lease.
    #[error("{0}")]
    NotFound(String),
    /// Every credential or the endpoint is unusable right now.
    #[error("{message}")]
    Unavailable {
        /// What is unusable and for how long.
        message: String,
    },
    /// No admin token in the metadata.
    #[error("admin RPCs need `authorization: Bearer <MOLTBOT_ADMIN_TOKEN>` metadata")]
    Unauthenticated,
    /// A wrong admin token, or admin RPCs disabled.
    #[error("{0}")]
    PermissionDenied(String),
    /// Encryption or decryption failed.
    #[error("{0}")]
    Crypto(String),
    /// The store cannot be reached.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// A store statement failed.
    #[error("store error: {0}")]
    Store(String),
}

impl From<sqlx::Error> for AuthError {
    fn from(e: sqlx::Error) -> Self {
        if moltbot_sql::is_unavailable(&e) {
            Self::StoreUnavailable(e.to_string())
        } else {
            Self::Store(e.to_string())
        }
    }
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        let message = e.to_string();
        match e {
            AuthError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            AuthError::NotFound(_) => tonic::Status::not_found(message),
            AuthError::Unavailable { .. } | AuthError::StoreUnavailable(_) => {
                tonic::Status::unavailable(message)
            }
            AuthError::Unauthenticated => tonic::Status::unauthenticated(message),
            AuthError::PermissionDenied(_) => tonic::Status::permission_denied(message),
            AuthError::Config(_) => tonic::Status::failed_precondition(message),
            AuthError::Crypto(_) | AuthError::Store(_) => tonic::Status::internal(message),
        }
    }
}
