//! SIGTERM/SIGINT handling for graceful shutdown.

use std::future::Future;

/// Waits for an installed signal; forever when it could not be installed.
#[cfg(unix)]
async fn wait(s: Option<&mut tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// Installs the SIGTERM (Kubernetes, `kill`) and SIGINT (Ctrl-C) handlers
/// *now* and returns a future that resolves when either arrives. Installing
/// at the call, not at the first poll, closes the window in which a signal
/// sent right after a process logged `listening` would still kill it with the
/// default action. If a handler cannot be installed, that signal is ignored
/// and the other still works; the failure is logged.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, signal = name, "cannot install the signal handler");
                None
            }
        };
        let mut term = install(SignalKind::terminate(), "SIGTERM");
        let mut int = install(SignalKind::interrupt(), "SIGINT");
        async move {
            tokio::select! {
                _ = wait(term.as_mut()) => tracing::info!(signal = "SIGTERM", "shutdown requested"),
                _ = wait(int.as_mut()) => tracing::info!(signal = "SIGINT", "shutdown requested"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
