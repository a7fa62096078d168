//! The runtime's error type.

use std::net::SocketAddr;

/// Errors of service start-up, serving and shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A configuration value is invalid; the message says what to fix.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A listen address could not be bound (in use, or not local).
    #[error(
        "cannot listen on {addr}: {source} (is another process using the port? pick another with the flag or its environment variable)"
    )]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The gRPC transport failed while serving.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not be built from the file descriptor sets.
    #[error("gRPC reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// Tracing or logging could not be installed.
    #[error("telemetry setup failed: {0}")]
    Telemetry(String),
    /// The service could not become ready (models, stores).
    #[error("service failed to become ready: {0}")]
    NotReady(String),
    /// An I/O error outside binding.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A background task panicked or was cancelled.
    #[error("server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}
