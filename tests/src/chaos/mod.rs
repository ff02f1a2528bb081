//! Chaos scenarios: a whole cluster on this machine (real Redis, real `confroute-controller`
//! and `confroute-node` processes, simulated Asterisks), continuous callers, one fault
//! injected under that load, and a [`Report`] of what callers and operators would have seen.
//!
//! Each scenario has a full length (`target/release/chaos <scenario>`, after
//! `cargo build --release --workspace --bins`: it starts the binaries built beside it)
//! and a short one that the test suite runs and asserts on (`tests/tests/chaos_*.rs`).
//! `docs/chaos.md` describes them and records a full run.

pub mod ari_flap;
pub mod cluster;
pub mod load;
pub mod node_kill;
pub mod partition;
pub mod redis_outage;
pub mod report;
pub mod rolling_drain;
pub mod sentinel_failover;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use report::Report;

use crate::harness::HarnessError;

/// A scenario could not run (a goal missed is not an error: it is in the report).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ChaosError(pub String);

impl From<HarnessError> for ChaosError {
    fn from(e: HarnessError) -> Self {
        ChaosError(e.0)
    }
}

/// Result of a scenario step.
pub type ChaosResult<T> = Result<T, ChaosError>;

/// Every scenario, by its command-line name.
pub const SCENARIOS: [&str; 6] = [
    "node-kill",
    "sentinel-failover",
    "redis-outage",
    "rolling-drain",
    "partition",
    "ari-flap",
];

/// How long a scenario runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    /// The figures to publish (the `chaos` tool).
    Full,
    /// Enough to assert the goals in the test suite on a loaded 2-core machine.
    Short,
}

/// Settings every scenario takes.
#[derive(Clone, Debug)]
pub struct Common {
    /// Length.
    pub length: Length,
    /// Overrides the scenario's fault duration (outage, partition, flapping; the observation
    /// window after a kill or a failover; the drain deadline).
    pub fault: Option<Duration>,
    /// Folder to save every process's output into at the end.
    pub logs: Option<PathBuf>,
}

impl Common {
    /// The given length, default fault duration, no logs kept.
    pub fn new(length: Length) -> Common {
        Common {
            length,
            fault: None,
            logs: None,
        }
    }

    /// `full` or `short` by length, unless a fault duration was given.
    pub fn fault_or(&self, full: Duration, short: Duration) -> Duration {
        self.fault.unwrap_or(match self.length {
            Length::Full => full,
            Length::Short => short,
        })
    }

    /// `full` or `short` by length.
    pub fn pick<T>(&self, full: T, short: T) -> T {
        match self.length {
            Length::Full => full,
            Length::Short => short,
        }
    }
}

/// Runs the scenario called `name`.
pub async fn run(name: &str, common: Common) -> ChaosResult<Report> {
    let started = Instant::now();
    let mut report = match name {
        "node-kill" => node_kill::run(&common).await?,
        "sentinel-failover" => sentinel_failover::run(&common).await?,
        "redis-outage" => redis_outage::run(&common).await?,
        "rolling-drain" => rolling_drain::run(&common).await?,
        "partition" => partition::run(&common).await?,
        "ari-flap" => ari_flap::run(&common).await?,
        other => {
            return Err(ChaosError(format!(
                "unknown scenario `{other}`; one of: {}",
                SCENARIOS.join(", ")
            )))
        }
    };
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The goals of scenario `name` that `report` misses (empty: all met).
pub fn missed_goals(name: &str, report: &Report) -> Vec<String> {
    match name {
        "node-kill" => node_kill::goals(report),
        "sentinel-failover" => sentinel_failover::goals(report),
        "redis-outage" => redis_outage::goals(report),
        "rolling-drain" => rolling_drain::goals(report),
        "partition" => partition::goals(report),
        "ari-flap" => ari_flap::goals(report),
        other => vec![format!("unknown scenario `{other}`")],
    }
}

/// `missed` plus a line when `value` of `report` is not `want`.
pub(crate) fn expect_value(
    missed: &mut Vec<String>,
    report: &Report,
    key: &str,
    what: &str,
    ok: impl Fn(f64) -> bool,
) {
    let v = report.value(key);
    if !ok(v) {
        missed.push(format!("{what}: {v}"));
    }
}

/// The first instant at or after `from` for which `pred` holds among `events`.
pub(crate) fn first_after<T>(
    events: &[T],
    from: Instant,
    at: impl Fn(&T) -> Instant,
    pred: impl Fn(&T) -> bool,
) -> Option<Instant> {
    events
        .iter()
        .filter(|e| at(e) >= from && pred(e))
        .map(&at)
        .min()
}

/// Starts `spec`'s callers on `cluster` and a claim watcher, then waits for the warm-up
/// (10 s; short: 3 s) and, up to 15 s more, for every node to host a conference with callers
/// in it: the state every scenario injects its fault into.
pub(crate) async fn under_load(
    common: &Common,
    cluster: &cluster::Cluster,
    spec: &load::LoadSpec,
) -> ChaosResult<(load::ClaimWatch, load::Load)> {
    let claims = load::ClaimWatch::start(cluster.store.clone());
    let load = load::Load::start(
        spec.clone(),
        load::Targets {
            controllers: cluster.controller_addrs(),
            sims: cluster.sims.clone(),
            node_ids: cluster.node_ids.clone(),
        },
    );
    let tracker = load.tracker.clone();
    let warm = Instant::now() + common.pick(Duration::from_secs(10), Duration::from_secs(3));
    crate::harness::wait_for_async(
        "a conference with callers after the warm-up",
        Duration::from_secs(30),
        || async {
            let any = (0..cluster.nodes.len()).any(|i| !tracker.conferences_on(i).is_empty());
            (any && Instant::now() >= warm).then_some(())
        },
    )
    .await?;
    // Every node hosting a conference makes the fault bite everywhere, but with few
    // conferences that never end (callers keep coming) a node may get none: the fault
    // then goes in anyway, rather than the run failing for how placement fell.
    let _ = crate::harness::wait_for_async(
        "every node to host a conference with callers",
        Duration::from_secs(15),
        || async {
            (0..cluster.nodes.len())
                .all(|i| !tracker.conferences_on(i).is_empty())
                .then_some(())
        },
    )
    .await;
    Ok((claims, load))
}

/// Saves the cluster's logs when asked.
pub(crate) fn keep_logs(common: &Common, scenario: &str, cluster: &cluster::Cluster) {
    if let Some(dir) = &common.logs {
        cluster.save_logs(&dir.join(scenario));
    }
}
