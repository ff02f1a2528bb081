//! Counters and latency histograms of a dev-cluster run, shared by the traffic tasks and
//! the live view.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

/// Log-spaced latency histogram from 10 µs to ~100 s (a few percent resolution).
#[derive(Clone)]
pub struct Latency {
    buckets: Vec<u64>,
    count: u64,
}

const BASE_US: f64 = 10.0;
const GROWTH: f64 = 1.05;
const BUCKETS: usize = 330;

impl Default for Latency {
    fn default() -> Self {
        Latency {
            buckets: vec![0; BUCKETS],
            count: 0,
        }
    }
}

impl Latency {
    /// Records one sample.
    pub fn add(&mut self, d: Duration) {
        let us = d.as_secs_f64() * 1e6;
        let i = if us <= BASE_US {
            0
        } else {
            ((us / BASE_US).ln() / GROWTH.ln()).ceil() as usize
        };
        self.buckets[i.min(BUCKETS - 1)] += 1;
        self.count += 1;
    }

    /// The `q` quantile (0..1) in milliseconds; `None` without samples.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let want = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(BASE_US * GROWTH.powi(i as i32) / 1000.0);
            }
        }
        None
    }

    /// `p50 x ms p99 y ms`, or `-` without samples.
    pub fn describe(&self) -> String {
        match (self.quantile_ms(0.5), self.quantile_ms(0.99)) {
            (Some(a), Some(b)) => format!("p50 {a:.2} ms  p99 {b:.2} ms"),
            _ => "p50 -  p99 -".to_string(),
        }
    }
}

/// A conference that moved to another node.
#[derive(Clone, Debug)]
pub struct Rehome {
    /// Conference name.
    pub conference: String,
    /// Node before.
    pub from: String,
    /// Node after.
    pub to: String,
    /// Seconds into the run.
    pub at: f64,
}

/// Everything counted during a run.
#[derive(Default)]
pub struct Stats {
    /// Calls started by the generator.
    pub placed: u64,
    /// Calls that got a routing decision.
    pub routed: u64,
    /// Routing failures by reason.
    pub route_failures: BTreeMap<String, u64>,
    /// Callers that reached a bridge.
    pub joined: u64,
    /// Callers that did not, by reason.
    pub join_failures: BTreeMap<String, u64>,
    /// Calls routed to the node on a real Asterisk (`--ari`): not dialled, and not failures.
    pub not_dialled: u64,
    /// INVITE→302 (or POST /v1/route) latency.
    pub route_latency: Latency,
    /// Caller entering the app → in the bridge.
    pub join_latency: Latency,
    /// Dial-out statuses seen (and errors).
    pub dialouts: BTreeMap<String, u64>,
    /// Times a conference had members on two nodes at once.
    pub splits: u64,
    /// Conferences that changed node.
    pub rehomes: Vec<Rehome>,
    /// Last node each conference was seen on.
    pub last_node: HashMap<String, String>,
    /// Events worth a line in the summary (kills, drains).
    pub notes: Vec<String>,
    /// A killed node: its id, when, and the conferences it hosted then.
    pub killed: Option<Killed>,
}

/// The node `--kill-node-after` killed.
#[derive(Clone, Debug, Default)]
pub struct Killed {
    /// Node id.
    pub node: String,
    /// Seconds into the run.
    pub at: f64,
    /// Conferences last routed to it.
    pub hosted: Vec<String>,
    /// Of those, the ones later routed elsewhere: (conference, new node, seconds after the kill).
    pub rehomed: Vec<(String, String, f64)>,
}

impl Stats {
    /// Counts a routing failure.
    pub fn route_failed(&mut self, reason: impl Into<String>) {
        *self.route_failures.entry(reason.into()).or_default() += 1;
    }

    /// Counts a join failure.
    pub fn join_failed(&mut self, reason: impl Into<String>) {
        *self.join_failures.entry(reason.into()).or_default() += 1;
    }

    /// Total routing failures.
    pub fn failed_routes(&self) -> u64 {
        self.route_failures.values().sum()
    }

    /// Total join failures.
    pub fn failed_joins(&self) -> u64 {
        self.join_failures.values().sum()
    }
}

/// Stats behind a lock.
pub type Shared = std::sync::Arc<Mutex<Stats>>;

/// Runs `f` on the stats (a poisoned lock still holds usable counters).
pub fn with<T>(s: &Shared, f: impl FnOnce(&mut Stats) -> T) -> T {
    match s.lock() {
        Ok(mut g) => f(&mut g),
        Err(p) => f(&mut p.into_inner()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_the_bucket_resolution() {
        let mut l = Latency::default();
        for ms in 1..=100 {
            l.add(Duration::from_millis(ms));
        }
        let p50 = l.quantile_ms(0.5).expect("samples");
        let p99 = l.quantile_ms(0.99).expect("samples");
        assert!((p50 - 50.0).abs() / 50.0 < 0.06, "{p50}");
        assert!((p99 - 99.0).abs() / 99.0 < 0.06, "{p99}");
        assert_eq!(Latency::default().quantile_ms(0.5), None);
    }
}
