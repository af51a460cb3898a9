//! SIGTERM (Kubernetes) and Ctrl-C both cancel the token every task of a worker watches.

use tokio_util::sync::CancellationToken;

/// A token cancelled on SIGTERM or Ctrl-C; a second signal ends the process at once (status
/// 130), as an operator pressing Ctrl-C again expects. The handlers are in place when this
/// returns (it must be called on a Tokio runtime): a signal that comes at any later moment,
/// even before the worker has started, is seen. Until then a process that is PID 1 in its
/// container (as a Kubernetes pod's is) ignores SIGTERM, and Kubernetes waits out the grace
/// period.
///
/// # Panics
/// When the process cannot install a signal handler (no runtime, or the OS refuses).
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::spawn(async move {
            let mut either = async || {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            };
            either().await;
            tracing::info!("shutdown requested: draining (a second signal stops at once)");
            t.cancel();
            // The handlers stay installed for the process's life: without this, every later
            // SIGTERM or Ctrl-C would be ignored while the drain goes on.
            either().await;
            tracing::warn!("second signal: stopping without finishing the drain");
            std::process::exit(130);
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown requested: draining");
        t.cancel();
    });
    token
}
