//! SIGTERM/SIGINT handling for graceful shutdown.

/// Resolves when the process receives SIGTERM (Kubernetes, `kill`) or SIGINT
/// (Ctrl-C). If a handler cannot be installed, that signal is ignored and the
/// other still works; the failure is logged.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot install SIGTERM handler");
                None
            }
        };
        let term = async {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = term => tracing::info!(signal = "SIGTERM", "shutdown requested"),
            r = tokio::signal::ctrl_c() => match r {
                Ok(()) => tracing::info!(signal = "SIGINT", "shutdown requested"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot install SIGINT handler");
                    std::future::pending::<()>().await
                }
            },
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
