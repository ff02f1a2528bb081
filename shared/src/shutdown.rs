//! Waiting for SIGTERM or Ctrl-C, the two ways an operator or Kubernetes stops a process.

/// Which signal asked the process to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM (Kubernetes, systemd).
    Terminate,
    /// SIGINT (Ctrl-C).
    Interrupt,
}

/// The process's stop signals, listened for from creation on: one that arrives while the
/// process is busy elsewhere (a drain writing to a slow Redis) is kept for the next
/// [`StopSignals::next`]; listeners made afresh for each wait would miss it.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Starts listening for SIGTERM and SIGINT.
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next stop signal (at once if one came since the last call).
    pub async fn next(&mut self) -> StopSignal {
        tokio::select! {
            _ = self.term.recv() => StopSignal::Terminate,
            _ = self.int.recv() => StopSignal::Interrupt,
        }
    }
}

/// Resolves at the first SIGTERM or SIGINT.
pub async fn signal() -> std::io::Result<StopSignal> {
    Ok(StopSignals::new()?.next().await)
}
