//! The understanding service's one error type and its exhaustive mapping to
//! gRPC status codes.

use moltbot_encoder::EncoderError;
use tonic::Status;

/// Everything that can go wrong in the understanding service.
#[derive(Debug, thiserror::Error)]
pub enum UnderstandingError {
    /// A request field is empty, too long or too many.
    #[error("{0}")]
    InvalidArgument(String),
    /// No trained intent head is loaded.
    #[error(
        "no trained intent head at {0} yet (`moltbot up` trains one in the background and it is served once written); train one yourself with `moltbot intents train services/understanding/data/clinc150/data_full_train_val.json --name clinc150 --out {0}`, or on your own data with `moltbot intents train DATA` and serve it with `moltbot intents reload DIR`"
    )]
    NoHead(String),
    /// A head directory is missing files or does not fit the encoder.
    #[error("cannot load the intent head: {0}")]
    BadHead(String),
    /// An admin RPC without an admin token.
    #[error("{0}")]
    Unauthenticated(String),
    /// An admin RPC with the wrong token, or from off the host when no
    /// token is configured.
    #[error("{0}")]
    PermissionDenied(String),
    /// Training or evaluation data that cannot be read, naming the file
    /// and line (`crate::dataset`).
    #[error("{0}")]
    Data(String),
    /// The encoder failed or is overloaded.
    #[error(transparent)]
    Encoder(#[from] EncoderError),
}

impl From<tch::TchError> for UnderstandingError {
    fn from(e: tch::TchError) -> Self {
        UnderstandingError::Encoder(e.into())
    }
}

impl From<UnderstandingError> for Status {
    fn from(e: UnderstandingError) -> Self {
        let message = e.to_string();
        match e {
            UnderstandingError::InvalidArgument(_) | UnderstandingError::Data(_) => {
                Status::invalid_argument(message)
            }
            UnderstandingError::Unauthenticated(_) => Status::unauthenticated(message),
            UnderstandingError::PermissionDenied(_) => Status::permission_denied(message),
            UnderstandingError::NoHead(_) | UnderstandingError::BadHead(_) => {
                Status::failed_precondition(message)
            }
            UnderstandingError::Encoder(EncoderError::Busy) => Status::resource_exhausted(message),
            UnderstandingError::Encoder(EncoderError::Tokenizer(_)) => {
                Status::invalid_argument(message)
            }
            UnderstandingError::Encoder(EncoderError::Load(_)) => {
                Status::failed_precondition(message)
            }
            UnderstandingError::Encoder(EncoderError::Tensor(_)) => Status::internal(message),
        }
    }
}
