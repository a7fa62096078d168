//! The context service's error type and its one mapping to gRPC status codes.

/// Errors of the context service.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The request is malformed; the message says which field and why.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such session for this tenant (never says whether another tenant has it).
    #[error("session not found")]
    NotFound,
    /// The store did not answer within its deadline or the connection failed.
    #[error("session store unavailable: {0}")]
    StoreUnavailable(String),
    /// The store answered something this service cannot read.
    #[error("session store returned corrupt data: {0}")]
    Corrupt(String),
    /// The archive rejected a statement for a reason other than reachability
    /// (a bug or a schema out of step with the migrations).
    #[error("archive error: {0}")]
    Archive(String),
}

impl From<ContextError> for tonic::Status {
    fn from(e: ContextError) -> Self {
        match e {
            ContextError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            ContextError::NotFound => tonic::Status::not_found("session not found"),
            ContextError::StoreUnavailable(m) => {
                tonic::Status::unavailable(format!("session store unavailable: {m}"))
            }
            ContextError::Corrupt(m) => {
                tonic::Status::internal(format!("corrupt session data: {m}"))
            }
            ContextError::Archive(m) => tonic::Status::internal(format!("archive error: {m}")),
        }
    }
}

impl From<redis::RedisError> for ContextError {
    fn from(e: redis::RedisError) -> Self {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
        {
            ContextError::StoreUnavailable(e.to_string())
        } else {
            ContextError::Corrupt(e.to_string())
        }
    }
}

impl From<sqlx::Error> for ContextError {
    fn from(e: sqlx::Error) -> Self {
        let unreachable = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // SQLSTATE classes 08 (connection exception), 53 (insufficient
            // resources) and 57 (operator intervention, which includes
            // 57014 statement_timeout): the archive is there but cannot serve.
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("53") || c.starts_with("57")),
            _ => false,
        };
        if unreachable {
            ContextError::StoreUnavailable(format!("archive: {e}"))
        } else {
            ContextError::Archive(e.to_string())
        }
    }
}
