//! The Redis primary killed under load behind Sentinel (one primary, one replica, three
//! Sentinels; claims wait for the replica, `redis.wait_replicas = 1`).
//!
//! While the Sentinels fail over, controllers must answer 503 with `Retry-After` (never a
//! guess), agents refuse new joins but keep their participants, and nobody gives any
//! conference a second home; once the replica is promoted everyone follows it by itself
//! (goal: routing back within 10 s of the promotion) with every process still the same one.

use std::time::{Duration, Instant};

use super::cluster::{Cluster, RedisKind, Spec};
use super::load::{JoinOutcome, LoadSpec, RouteOutcome};
use super::report::{secs, Recovery, Report};
use super::{keep_logs, ChaosError, ChaosResult, Common};
use crate::harness::wait_for_async;

/// Goal: routing works again this soon after the promotion.
pub const ROUTING_BACK: Duration = Duration::from_secs(10);

/// The goals this report misses.
pub fn goals(r: &Report) -> Vec<String> {
    let mut missed = super::report::shared_goals(r, false);
    if r.fault_503 == 0 {
        missed.push("no 503 answered during the failover".into());
    }
    super::expect_value(
        &mut missed,
        r,
        "routing_back_ms",
        "promotion -> routing back (ms, goal <= 10000)",
        |v| v <= ROUTING_BACK.as_millis() as f64,
    );
    missed
}

/// Load of a run of this length.
pub fn load(common: &Common) -> LoadSpec {
    common.pick(
        LoadSpec {
            rate: 40.0,
            conferences: 12,
            hold: (Duration::from_secs(3), Duration::from_secs(10)),
            long_every: 0,
            long_hold: Duration::ZERO,
        },
        LoadSpec {
            rate: 15.0,
            conferences: 6,
            hold: (Duration::from_secs(2), Duration::from_secs(5)),
            long_every: 0,
            long_hold: Duration::ZERO,
        },
    )
}

/// Runs the scenario.
pub async fn run(common: &Common) -> ChaosResult<Report> {
    let spec = load(common);
    let mut cluster = Cluster::start(&Spec {
        redis: RedisKind::Sentinel,
        ..Spec::new(3, 2)
    })
    .await?;
    let (claims, mut load) = super::under_load(common, &cluster, &spec).await?;
    let tracker = load.tracker.clone();
    let participants: usize = (0..cluster.nodes.len())
        .map(|i| tracker.members_on(i))
        .sum();

    let group = cluster
        .sentinel
        .as_mut()
        .ok_or_else(|| ChaosError("no Sentinel group".into()))?;
    let old_primary = group.primary_port();
    let killed = Instant::now();
    group.kill_primary_and_wait_failover(Duration::from_secs(30))?;
    let promoted = Instant::now();

    // Routing is back once a route and a join succeed after the promotion, and no routing
    // request sent after that point fails.
    wait_for_async(
        "a route and a join to succeed after the promotion",
        Duration::from_secs(30),
        || async {
            let routed = tracker
                .routes()
                .iter()
                .any(|e| e.at >= promoted && matches!(e.outcome, RouteOutcome::Node(_)));
            let joined = tracker
                .joins()
                .iter()
                .any(|j| j.at >= promoted && matches!(j.outcome, JoinOutcome::Joined(_)));
            (routed && joined).then_some(())
        },
    )
    .await?;
    // A measurement window under load, not a wait for an event.
    tokio::time::sleep(common.fault_or(Duration::from_secs(20), Duration::from_secs(3))).await;
    load.stop().await;
    let bridges = cluster.wait_no_bridges(Duration::from_secs(15)).await;
    let left_claims = cluster.wait_no_claims(Duration::from_secs(15)).await;

    let routes = tracker.routes();
    let last_failure = routes
        .iter()
        .filter(|e| e.at >= killed && !matches!(e.outcome, RouteOutcome::Node(_)))
        .map(|e| e.answered)
        .max();
    let first_success = routes
        .iter()
        .filter(|e| e.at >= promoted && matches!(e.outcome, RouteOutcome::Node(_)))
        .map(|e| e.answered)
        .min();
    let back = match (first_success, last_failure) {
        (Some(s), Some(f)) => Some(s.max(f)),
        (s, _) => s,
    };
    let routing_back = back.map(|b| b.saturating_duration_since(promoted));
    let fault_end = back.unwrap_or(promoted);
    let refused = tracker
        .joins()
        .iter()
        .filter(|j| {
            j.at >= killed && j.at <= fault_end && matches!(j.outcome, JoinOutcome::Failed(_))
        })
        .count();

    let history = claims.history();
    let mut report = Report::from_run(
        "sentinel-failover",
        format!(
            "SIGKILL of the Redis primary (port {old_primary}) behind 3 Sentinels \
             (down-after 1 s) with {participants} participant(s) in conferences; \
             {} callers/s over {} conferences; redis.wait_replicas = 1",
            spec.rate, spec.conferences
        ),
        &tracker,
        &history,
        (killed, fault_end),
    );
    report.recovery.push(Recovery {
        what: "primary killed -> replica promoted".into(),
        took: Some(promoted - killed),
        goal: None,
    });
    report.recovery.push(Recovery {
        what: "promotion -> routing back (last failed route answered)".into(),
        took: routing_back,
        goal: Some(ROUTING_BACK),
    });
    report.figure(
        "joins refused or failed during the failover",
        refused.to_string(),
    );
    report.figure(
        "claim samples failed during the failover",
        history.failed_samples.to_string(),
    );
    report.figure(
        "first route after the promotion",
        secs(first_success.map(|s| s.saturating_duration_since(promoted))),
    );
    report.set(
        "routing_back_ms",
        routing_back
            .map(|d| d.as_millis() as f64)
            .unwrap_or(f64::INFINITY),
    );
    report.leftovers(&bridges, &left_claims);
    report.restarts(&cluster.restarted(&[]));
    keep_logs(common, "sentinel-failover", &cluster);
    Ok(report)
}
