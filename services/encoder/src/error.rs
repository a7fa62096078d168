//! The encoder's one error type.

/// Everything that can go wrong loading or running the encoder.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    /// A model file is missing or unreadable; the message names it.
    #[error("cannot load the encoder: {0}; run `make models` (or `moltbot models prepare`)")]
    Load(String),
    /// The tokenizer failed on an input.
    #[error("tokenization failed: {0}")]
    Tokenizer(String),
    /// The batcher's queue is full, or it has stopped.
    #[error("the encoder is overloaded; retry later")]
    Busy,
    /// libtorch failed (out of memory, …).
    #[error("tensor error: {0}")]
    Tensor(String),
}

impl From<tch::TchError> for EncoderError {
    fn from(e: tch::TchError) -> Self {
        EncoderError::Tensor(e.to_string().lines().next().unwrap_or_default().to_owned())
    }
}
