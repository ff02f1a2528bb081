//! Waiting for SIGTERM or Ctrl-C, the two ways an operator or Kubernetes stops a process.

/// Which signal asked the process to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM (Kubernetes, systemd).
    Terminate,
    /// SIGINT (Ctrl-C).
    Interrupt,
}

/// Resolves at the first SIGTERM or SIGINT.
pub async fn signal() -> std::io::Result<StopSignal> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => Ok(StopSignal::Terminate),
        _ = int.recv() => Ok(StopSignal::Interrupt),
    }
}
