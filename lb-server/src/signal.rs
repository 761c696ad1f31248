//! The shutdown signal: SIGTERM (what Kubernetes sends) or SIGINT.

use std::future::Future;

/// Installs the SIGTERM and SIGINT handlers now, and returns a future that
/// completes on the first of them. Call it before the server starts
/// serving: until a handler is installed, a signal has its default action
/// and kills the process without a drain. Must be called within a tokio
/// runtime.
pub fn shutdown() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
        async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutdown signal received");
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutdown signal received");
        }
    }
}
