//! One node's agent cut off from Redis (a proxy between them black-holed), under load; the
//! controllers and the other agents still reach Redis.
//!
//! The cut-off agent can no longer check ownership, so it admits nobody new; its lease runs
//! out and the controllers re-home its conferences (goal, as for a dead node: within the 3 s
//! node lease, one call interval and 1 s, [`super::node_kill::rehome_margin`]). When the
//! partition heals, the agent registers again, learns from its heartbeat that its
//! conferences moved, and - with `node.on_ownership_lost = end`, as this scenario
//! configures - hangs up what was left of them: no conference stays split.
//!
//! Every few callers stays far longer than the partition and the wait for that teardown
//! ([`long_hold`]), so callers are still stranded on the node at the heal and only the
//! agent's teardown, not their own hang-up, can end them within the wait.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::cluster::{Cluster, Spec};
use super::load::{ClaimWatch, JoinOutcome, Load, LoadSpec, RouteOutcome, Targets};
use super::node_kill::LEASE;
use super::report::{secs, Recovery, Report};
use super::{first_after, keep_logs, ChaosError, ChaosResult, Common};
use crate::fixtures;
use crate::harness::wait_for_async;

/// The node cut off.
const VICTIM: usize = 0;

/// Longest wait, after the heal, for the node to end what it lost.
const TEARDOWN_WAIT: Duration = Duration::from_secs(20);

/// Longest wait, from the callers' start, for the cut: warm-up, and every node hosting a
/// conference with callers.
const READY_WAIT: Duration = Duration::from_secs(30);

/// How long a long caller stays (`fault`: the partition's length): whoever of them is on the
/// node at the cut joined at most [`READY_WAIT`] before it, so each outlasts the partition
/// and the [`TEARDOWN_WAIT`] after it (with 5 s to spare), and none hangs up by itself
/// before the teardown is judged. The load stops them all at the end anyway.
pub fn long_hold(fault: Duration) -> Duration {
    READY_WAIT + fault + TEARDOWN_WAIT + Duration::from_secs(5)
}

/// When, after the cut, a caller is dialled straight into the cut-off node (as an edge with
/// a route it learnt before would): past the grace a join started before the cut may take,
/// so there is always a join the node must refuse, whatever the controllers routed.
const PROBE_AFTER: Duration = Duration::from_secs(2);

/// The goals this report misses.
pub fn goals(r: &Report) -> Vec<String> {
    let mut missed = super::report::shared_goals(r, true);
    super::expect_value(
        &mut missed,
        r,
        "admitted_cut_off",
        "callers admitted by the cut-off node",
        |v| v == 0.0,
    );
    // Nobody admitted proves nothing unless someone tried.
    super::expect_value(
        &mut missed,
        r,
        "refused_cut_off",
        "callers refused by the cut-off node (goal > 0)",
        |v| v > 0.0,
    );
    super::expect_value(
        &mut missed,
        r,
        "rehomed_all",
        "every conference of the cut-off node re-homed",
        |v| v == 1.0,
    );
    let allowed = r.value("rehome_allowed_ms");
    super::expect_value(
        &mut missed,
        r,
        "rehome_worst_ms",
        &format!(
            "cut -> re-home (ms, goal <= {allowed} ms: the 3 s lease, one call interval and 1 s)"
        ),
        |v| v <= allowed,
    );
    // A teardown is only shown when there was something to tear down, and the agent, not
    // the callers' own hang-ups, ended it.
    super::expect_value(
        &mut missed,
        r,
        "stranded_at_heal",
        "its conferences still with callers at the heal (goal > 0)",
        |v| v > 0.0,
    );
    let stranded = r.value("stranded_callers");
    super::expect_value(
        &mut missed,
        r,
        "stranded_callers",
        "long callers on it in those conferences at the heal (goal > 0)",
        |v| v > 0.0,
    );
    super::expect_value(
        &mut missed,
        r,
        "torn_down_callers",
        &format!("of the {stranded} long callers stranded at the heal, ended by the node"),
        |v| v == stranded,
    );
    super::expect_value(
        &mut missed,
        r,
        "torn_down",
        "the lost conferences ended on the healed node",
        |v| v == 1.0,
    );
    missed
}

/// Load of a run of this length (`fault`: the partition's length).
pub fn load(common: &Common, fault: Duration) -> LoadSpec {
    common.pick(
        LoadSpec {
            rate: 30.0,
            conferences: 12,
            hold: (Duration::from_secs(3), Duration::from_secs(10)),
            long_every: 6,
            long_hold: long_hold(fault),
        },
        // Conferences here hardly ever empty, so each is placed once: enough of them that
        // every node gets some (with 6, a node left with none now and then never got one).
        LoadSpec {
            rate: 15.0,
            conferences: 9,
            hold: (Duration::from_millis(1500), Duration::from_secs(4)),
            // Some callers outlive the partition, so there is something to tear down.
            long_every: 4,
            long_hold: long_hold(fault),
        },
    )
}

/// Runs the scenario.
pub async fn run(common: &Common) -> ChaosResult<Report> {
    let fault = common.fault_or(Duration::from_secs(30), Duration::from_secs(6));
    let spec = load(common, fault);
    let mut cluster = Cluster::start(&Spec {
        node_proxies: vec![VICTIM],
        ..Spec::new(3, 2).node_setting("CONFROUTE_NODE__ON_OWNERSHIP_LOST", "end")
    })
    .await?;
    let claims = ClaimWatch::start(cluster.store.clone());
    let mut load = Load::start(
        spec.clone(),
        Targets {
            controllers: cluster.controller_addrs(),
            sims: cluster.sims.clone(),
            node_ids: cluster.node_ids.clone(),
        },
    );
    let tracker = load.tracker.clone();
    let victim_id = cluster.node_ids[VICTIM].clone();
    let warm = Instant::now() + common.pick(Duration::from_secs(10), Duration::from_secs(3));
    wait_for_async(
        "the node to be cut off to host conferences with callers",
        READY_WAIT,
        || async {
            let ready = !tracker.conferences_on(VICTIM).is_empty()
                && (0..cluster.nodes.len()).all(|i| !tracker.conferences_on(i).is_empty());
            (ready && Instant::now() >= warm).then_some(())
        },
    )
    .await
    .map_err(|e| {
        let per_node: Vec<usize> = (0..cluster.nodes.len())
            .map(|i| tracker.conferences_on(i).len())
            .collect();
        ChaosError(format!(
            "{e}; conferences with callers per node: {per_node:?}"
        ))
    })?;
    let proxy = cluster.node_proxies[VICTIM]
        .as_ref()
        .ok_or_else(|| ChaosError("no proxy for the node".into()))?;
    let members_at_cut = tracker.members_on(VICTIM);

    let cut = Instant::now();
    proxy.black_hole();
    let mut hosted: BTreeSet<String> = tracker.conferences_on(VICTIM).into_iter().collect();
    if let Ok(page) = cluster.store.list_conferences(None, 1000).await {
        hosted.extend(
            page.items
                .iter()
                .filter(|(_, r)| r.owner.node.as_str() == victim_id)
                .map(|(n, _)| n.to_string()),
        );
    }
    let probe_conference = hosted
        .iter()
        .next()
        .cloned()
        .unwrap_or_else(|| "chaos-probe".into());
    // The partition lasts its full length: a real duration, not a wait for an event; a
    // caller dialled straight into the node meanwhile must be refused.
    let (_, probe) = tokio::join!(tokio::time::sleep(fault), async {
        tokio::time::sleep(PROBE_AFTER.min(fault)).await;
        tracker
            .probe_join(&cluster.sims[VICTIM], VICTIM, &probe_conference)
            .await
    });
    let stranded_at_heal: Vec<String> = tracker
        .conferences_on(VICTIM)
        .into_iter()
        .filter(|c| hosted.contains(c))
        .collect();
    // An ordinary caller may still be on the node at the heal and hang up by itself before
    // the teardown; one that entered its bridge longer ago than the longest ordinary stay
    // (and 1 s for a late caller task) is a long caller, which outlasts the wait: the agent
    // must end every one of those.
    let healed = Instant::now();
    let long_before = healed.checked_sub(spec.hold.1 + Duration::from_secs(1));
    let stranded_callers: Vec<String> = tracker
        .callers_on(VICTIM)
        .into_iter()
        .filter(|(_, c, entered)| {
            stranded_at_heal.contains(c) && long_before.is_some_and(|b| *entered <= b)
        })
        .map(|(channel, ..)| channel)
        .collect();
    // What the agent ends when it learns it lost ownership is ended as configured.
    tracker.expect_drops(VICTIM, true);
    proxy.heal();

    // The agent ends its lost conferences once its heartbeat says so.
    let torn_down = wait_for_async(
        "the cut-off node to end the conferences it lost",
        TEARDOWN_WAIT,
        || async {
            let routes = tracker.routes();
            let still = tracker.conferences_on(VICTIM).into_iter().any(|c| {
                hosted.contains(&c)
                    && first_after(
                        &routes,
                        cut,
                        |e| e.at,
                        |e| {
                            e.conference == c
                                && matches!(&e.outcome, RouteOutcome::Node(n) if *n != victim_id)
                        },
                    )
                    .is_some()
            });
            (!still).then(Instant::now)
        },
    )
    .await
    .ok();
    let torn_down_callers = tracker
        .dropped()
        .iter()
        .filter(|d| {
            d.node == VICTIM
                && d.expected
                && d.at >= healed
                && stranded_callers.contains(&d.channel)
        })
        .count();
    cluster.wait_controllers_see(cluster.nodes.len()).await?;
    let back = Instant::now();
    let metrics = fixtures::scrape(&cluster.nodes[VICTIM].http_url()).await;
    let losses = fixtures::metric(&metrics, "confroute_node_ownership_losses_total");
    tracker.expect_drops(VICTIM, false);
    // A measurement window under load, not a wait for an event.
    tokio::time::sleep(common.pick(Duration::from_secs(5), Duration::from_secs(1))).await;
    load.stop().await;
    let bridges = cluster.wait_no_bridges(Duration::from_secs(15)).await;
    let left_claims = cluster.wait_no_claims(Duration::from_secs(15)).await;

    let routes = tracker.routes();
    let mut worst: Option<Duration> = Some(Duration::ZERO);
    let mut per_conference = Vec::new();
    for c in &hosted {
        let answered = routes
            .iter()
            .filter(|e| {
                e.at >= cut
                    && e.conference == *c
                    && matches!(&e.outcome, RouteOutcome::Node(n) if *n != victim_id)
            })
            .map(|e| e.answered)
            .min();
        let took = answered.map(|a| a - cut);
        per_conference.push(format!("{c} {}", secs(took)));
        worst = match (worst, took) {
            (Some(w), Some(t)) => Some(w.max(t)),
            _ => None,
        };
    }
    // Admissions on the cut-off node once it could no longer have checked its claims (a
    // join that started before the cut may finish within a Redis timeout of it).
    let grace = Duration::from_secs(1);
    let admitted_cut_off = tracker
        .entries()
        .iter()
        .filter(|(at, n, _)| *n == VICTIM && *at > cut + grace && *at <= healed)
        .count();
    let refused = tracker
        .joins()
        .iter()
        .filter(|j| {
            j.node == VICTIM
                && j.at >= cut
                && j.at <= healed
                && matches!(j.outcome, JoinOutcome::Failed(_))
        })
        .count();

    let history = claims.history();
    let mut report = Report::from_run(
        "partition",
        format!(
            "{victim_id}'s agent cut off from Redis for {:.0} s (its own proxy black-holed) with \
             {} conference(s) and {members_at_cut} participant(s) on it; \
             node.on_ownership_lost = end; {} callers/s over {} conferences",
            fault.as_secs_f64(),
            hosted.len(),
            spec.rate,
            spec.conferences
        ),
        &tracker,
        &history,
        (cut, healed),
    );
    report.recovery.push(Recovery {
        what: "cut -> first route of each of its conferences to another node (worst)".into(),
        took: worst,
        // Each conference moves on its own next call after the lease runs out, plus 1 s for
        // a loaded machine: the goal `goals` enforces.
        goal: Some(LEASE + super::node_kill::rehome_margin(&spec)),
    });
    report.recovery.push(Recovery {
        what: "heal -> the node ended what was left of its lost conferences".into(),
        took: torn_down.map(|t| t - healed),
        goal: None,
    });
    report.recovery.push(Recovery {
        what: "heal -> the node serving again in every controller's view".into(),
        took: Some(back - healed),
        goal: None,
    });
    report.figure("re-home per conference", per_conference.join(", "));
    report.figure(
        "callers admitted by the cut-off node after its claims could lapse",
        admitted_cut_off.to_string(),
    );
    report.figure(
        "callers refused by the cut-off node",
        format!(
            "{refused} (a caller dialled straight into it {:.1} s after the cut: {})",
            PROBE_AFTER.min(fault).as_secs_f64(),
            match &probe {
                JoinOutcome::Joined(_) => "admitted".to_string(),
                JoinOutcome::Failed(why) => format!("refused, {why}"),
            }
        ),
    );
    report.figure(
        "long callers stranded on it at the heal, ended by it",
        format!("{torn_down_callers} of {}", stranded_callers.len()),
    );
    report.figure(
        "its conferences still with callers at the heal",
        stranded_at_heal.len().to_string(),
    );
    report.figure("ownership losses it counted", format!("{losses}"));
    report.set("admitted_cut_off", admitted_cut_off as f64);
    report.set("refused_cut_off", refused as f64);
    report.set("stranded_callers", stranded_callers.len() as f64);
    report.set("torn_down_callers", torn_down_callers as f64);
    report.set("rehomed_all", if worst.is_some() { 1.0 } else { 0.0 });
    report.set(
        "rehome_worst_ms",
        worst.map(|w| w.as_millis() as f64).unwrap_or(f64::INFINITY),
    );
    report.set(
        "rehome_allowed_ms",
        (LEASE + super::node_kill::rehome_margin(&spec)).as_millis() as f64,
    );
    report.set("conferences", hosted.len() as f64);
    report.set("stranded_at_heal", stranded_at_heal.len() as f64);
    report.set("ownership_losses", losses);
    report.set("torn_down", if torn_down.is_some() { 1.0 } else { 0.0 });
    report.leftovers(&bridges, &left_claims);
    report.restarts(&cluster.restarted(&[]));
    keep_logs(common, "partition", &cluster);
    Ok(report)
}
