//! The retrieval service's errors and their gRPC status codes.

/// Errors of the retrieval service.
#[derive(Debug, thiserror::Error)]
pub enum RetrievalError {
    /// A request field is invalid; the message names it.
    #[error("{0}")]
    InvalidArgument(String),
    /// The collection does not exist.
    #[error("collection `{0}` does not exist")]
    CollectionNotFound(String),
    /// The collection name is taken.
    #[error("collection `{0}` already exists")]
    CollectionExists(String),
    /// The store cannot be reached (PostgreSQL down, SQLite file locked).
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// A store statement failed.
    #[error("store error: {0}")]
    Store(String),
    /// The encoder failed or its queue is full.
    #[error("encoder: {0}")]
    Encoder(#[from] moltbot_encoder::EncoderError),
    /// The index failed.
    #[error("index: {0}")]
    Index(String),
    /// The service is still loading its encoder, store and indexes.
    #[error("retrieval is still loading")]
    NotReady,
}

impl From<sqlx::Error> for RetrievalError {
    fn from(e: sqlx::Error) -> Self {
        if moltbot_sql::is_unavailable(&e) {
            Self::StoreUnavailable(e.to_string())
        } else {
            Self::Store(e.to_string())
        }
    }
}

impl From<RetrievalError> for tonic::Status {
    fn from(e: RetrievalError) -> Self {
        let message = e.to_string();
        match e {
            RetrievalError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            RetrievalError::CollectionNotFound(_) => tonic::Status::not_found(message),
            RetrievalError::CollectionExists(_) => tonic::Status::already_exists(message),
            RetrievalError::StoreUnavailable(_) | RetrievalError::NotReady => {
                tonic::Status::unavailable(message)
            }
            RetrievalError::Encoder(moltbot_encoder::EncoderError::Busy) => {
                tonic::Status::resource_exhausted(message)
            }
            RetrievalError::Encoder(_) | RetrievalError::Store(_) | RetrievalError::Index(_) => {
                tonic::Status::internal(message)
            }
        }
    }
}
