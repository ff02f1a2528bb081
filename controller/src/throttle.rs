//! Log lines for events that can come in floods (a Redis outage fails every call, a host
//! opens connections in a loop): at most one per period, with the count since the last, so
//! an incident does not become a logging incident. Metrics still count every event.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A log line's allowance: [`Throttle::note`] says when the next one may be written.
pub struct Throttle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> Self {
        Throttle {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Counts one event; `Some(n)` when a line may be written now, `n` the events it covers
    /// (this one and those left unlogged since the last line).
    pub fn note(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1 += 1;
        if s.0.is_some_and(|t| t.elapsed() < self.every) {
            return None;
        }
        let n = s.1;
        *s = (Some(Instant::now()), 0);
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_covers_the_events_since_the_last() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.note(), Some(1), "the first event is logged");
        assert_eq!(t.note(), None);
        assert_eq!(t.note(), None);
        let now = Throttle::new(Duration::ZERO);
        assert_eq!(now.note(), Some(1));
        assert_eq!(now.note(), Some(1), "no period: every event");
        let Some(long_ago) = Instant::now().checked_sub(Duration::from_secs(7200)) else {
            return;
        };
        let t = Throttle {
            every: Duration::from_secs(3600),
            state: Mutex::new((Some(long_ago), 2)),
        };
        assert_eq!(t.note(), Some(3), "the line covers those left unlogged");
        assert_eq!(t.note(), None, "and starts a new period");
    }
}
