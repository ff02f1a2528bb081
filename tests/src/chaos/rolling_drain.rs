//! A rolling drain of every node, one after another, under continuous calls: SIGTERM to an
//! agent, which drains (no new conferences; its conferences keep taking joiners), ends what
//! is left at `node.drain_deadline`, deregisters and exits; its supervisor starts it again
//! and the next node goes.
//!
//! No participant of a conference on another node may be dropped; the stopped node's
//! conferences end naturally or at the deadline (a participant it ends before its deadline,
//! less [`DEADLINE_SLACK`], is a miss); each agent exits 0 within the deadline and 10 s.

use std::time::{Duration, Instant};

use super::cluster::{Cluster, Spec};
use super::load::LoadSpec;
use super::report::{Recovery, Report};
use super::{keep_logs, ChaosError, ChaosResult, Common};

/// How much earlier than the stop plus `node.drain_deadline` (by this process's clock) a
/// draining node may end its participants and still count as ending them at the deadline:
/// the agent counts its drain on its estimate of Redis's clock (`drain_since_ms`), not on
/// ours, and the two may differ by a few milliseconds.
pub const DEADLINE_SLACK: Duration = Duration::from_millis(250);

/// What SIGTERM -> exit may take beyond the drain deadline: the agent gives ended
/// conferences up to 10 s to tear down, then deregisters and exits.
pub const EXIT_AFTER_DEADLINE: Duration = Duration::from_secs(10);

/// The goals this report misses.
pub fn goals(r: &Report) -> Vec<String> {
    let mut missed = super::report::shared_goals(r, false);
    let nodes = r.value("nodes");
    super::expect_value(
        &mut missed,
        r,
        "clean_exits",
        &format!("agents that exited 0 (of {nodes})"),
        |v| v == nodes,
    );
    super::expect_value(
        &mut missed,
        r,
        "ended_before_deadline",
        "participants a draining node ended before its deadline (goal 0)",
        |v| v == 0.0,
    );
    let allowed = r.value("drain_allowed_ms");
    super::expect_value(
        &mut missed,
        r,
        "worst_drain_ms",
        &format!("SIGTERM -> agent exited, slowest node (ms, goal <= {allowed} ms)"),
        |v| v <= allowed,
    );
    missed
}

/// Load of a run of this length.
pub fn load(common: &Common) -> LoadSpec {
    common.pick(
        LoadSpec {
            rate: 30.0,
            conferences: 12,
            hold: (Duration::from_secs(3), Duration::from_secs(10)),
            long_every: 0,
            long_hold: Duration::ZERO,
        },
        LoadSpec {
            rate: 12.0,
            conferences: 6,
            hold: (Duration::from_millis(1500), Duration::from_secs(4)),
            long_every: 0,
            long_hold: Duration::ZERO,
        },
    )
}

/// Runs the scenario.
pub async fn run(common: &Common) -> ChaosResult<Report> {
    let spec = load(common);
    let deadline = common.fault_or(Duration::from_secs(20), Duration::from_secs(2));
    let deadline_text = format!("{}ms", deadline.as_millis());
    let mut cluster = Cluster::start(
        &Spec::new(3, 2).node_setting("CONFROUTE_NODE__DRAIN_DEADLINE", &deadline_text),
    )
    .await?;
    let (claims, mut load) = super::under_load(common, &cluster, &spec).await?;
    let tracker = load.tracker.clone();

    let mut per_node = Vec::new();
    let mut report_notes = Vec::new();
    let mut exit_codes = Vec::new();
    let mut worst_drain = Duration::ZERO;
    let mut admitted_while_draining = 0usize;
    let mut ended_early = 0usize;
    let first_stop = Instant::now();
    for i in 0..cluster.nodes.len() {
        let id = cluster.node_ids[i].clone();
        let confs = tracker.conferences_on(i);
        let members = tracker.members_on(i);
        let drops_before = tracker.dropped().len();
        tracker.expect_drops(i, true);
        let stop = Instant::now();
        cluster.nodes[i]
            .process()
            .signal(libc::SIGTERM)
            .map_err(|e| ChaosError(e.0))?;
        let code = cluster.nodes[i]
            .process()
            .wait_exit(deadline + Duration::from_secs(30))?;
        let exited = Instant::now();
        exit_codes.push(code);
        let drain_took = exited - stop;
        worst_drain = worst_drain.max(drain_took);
        let dropped = tracker.dropped();
        let ended: Vec<_> = dropped
            .get(drops_before..)
            .unwrap_or_default()
            .iter()
            .filter(|d| d.node == i)
            .collect();
        // A conference of a draining node ends naturally (its callers hang up: no drop) or
        // at the deadline; a participant ended sooner was cut off for nothing.
        let early_from = stop + deadline.saturating_sub(DEADLINE_SLACK);
        let early: Vec<_> = ended.iter().filter(|d| d.at < early_from).collect();
        ended_early += early.len();
        for d in &early {
            report_notes.push(format!(
                "{id}: participant of {} ended {:.2} s after SIGTERM, before the {:.1} s deadline",
                d.conference,
                d.at.saturating_duration_since(stop).as_secs_f64(),
                deadline.as_secs_f64()
            ));
        }
        let mut at_deadline: Vec<&String> = ended.iter().map(|d| &d.conference).collect();
        at_deadline.sort();
        at_deadline.dedup();
        let admitted = tracker
            .entries()
            .iter()
            .filter(|(at, n, _)| *n == i && *at > stop && *at <= exited)
            .count();
        admitted_while_draining += admitted;
        per_node.push(format!(
            "{id}: {} conference(s), {members} participant(s) at SIGTERM; {admitted} joiner(s) \
             admitted while draining; exit {:?} after {:.1} s; {} conference(s) ended at the \
             deadline ({} participant(s), {} of them before it), {} ended naturally",
            confs.len(),
            code,
            drain_took.as_secs_f64(),
            at_deadline.len(),
            ended.len(),
            early.len(),
            confs.len().saturating_sub(at_deadline.len()),
        ));
        // Its supervisor starts it again; the next node goes once it is back in service.
        cluster.nodes[i].restart()?;
        cluster.wait_node_app(i).await?;
        cluster.wait_controllers_see(cluster.nodes.len()).await?;
        tracker.expect_drops(i, false);
    }
    let rolled = Instant::now();
    // A measurement window under load, not a wait for an event.
    tokio::time::sleep(common.pick(Duration::from_secs(5), Duration::from_secs(1))).await;
    load.stop().await;
    let bridges = cluster.wait_no_bridges(Duration::from_secs(15)).await;
    let left_claims = cluster.wait_no_claims(Duration::from_secs(15)).await;

    let history = claims.history();
    let mut report = Report::from_run(
        "rolling-drain",
        format!(
            "SIGTERM to each of {} agents in turn (node.drain_deadline {:.1} s), each started \
             again before the next; {} callers/s over {} conferences",
            cluster.nodes.len(),
            deadline.as_secs_f64(),
            spec.rate,
            spec.conferences
        ),
        &tracker,
        &history,
        (first_stop, rolled),
    );
    report.recovery.push(Recovery {
        what: "SIGTERM -> agent exited (slowest node)".into(),
        took: Some(worst_drain),
        goal: Some(deadline + EXIT_AFTER_DEADLINE),
    });
    report.recovery.push(Recovery {
        what: "whole rolling drain".into(),
        took: Some(rolled - first_stop),
        goal: None,
    });
    for line in per_node {
        report.figure("node", line);
    }
    report.figure(
        "joiners admitted by draining nodes",
        admitted_while_draining.to_string(),
    );
    let clean_exits = exit_codes.iter().filter(|c| **c == Some(0)).count();
    report.set("clean_exits", clean_exits as f64);
    report.set("nodes", cluster.nodes.len() as f64);
    report.set("worst_drain_ms", worst_drain.as_millis() as f64);
    report.set(
        "drain_allowed_ms",
        (deadline + EXIT_AFTER_DEADLINE).as_millis() as f64,
    );
    report.figure(
        "participants ended before their node's deadline",
        ended_early.to_string(),
    );
    report.set("ended_before_deadline", ended_early as f64);
    report.notes.extend(report_notes);
    report.leftovers(&bridges, &left_claims);
    let nodes = cluster.node_ids.clone();
    report.restarts(&cluster.restarted(&nodes));
    keep_logs(common, "rolling-drain", &cluster);
    Ok(report)
}
