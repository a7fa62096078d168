//! The gateway's error type.

use std::net::SocketAddr;

/// Errors of gateway start-up and serving.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A flag or environment variable is invalid; the message says what to fix.
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
