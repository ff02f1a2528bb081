//! Redis unreachable for every controller and agent (60 s in the full run), under load.
//!
//! All processes reach Redis through one proxy, which is black-holed: sockets stay open and
//! requests go unanswered, as in a network outage, while Redis itself (and its data and
//! TTLs) lives on. During the outage: liveness (`/healthz`) stays green and readiness
//! (`/readyz`) turns red on every process; controllers answer 503 with `Retry-After`; agents
//! keep the participants they have and refuse new joins. After it: everything recovers by
//! itself, with no process restarted and no conference given a second home.

use std::time::{Duration, Instant};

use super::cluster::{Cluster, Spec};
use super::load::{JoinOutcome, LoadSpec, RouteOutcome};
use super::report::{secs, Recovery, Report};
use super::{keep_logs, ChaosError, ChaosResult, Common};
use crate::harness::wait_for_async;

/// The goals this report misses.
pub fn goals(r: &Report) -> Vec<String> {
    let mut missed = super::report::shared_goals(r, false);
    if r.fault_503 == 0 {
        missed.push("no 503 answered during the outage".into());
    }
    super::expect_value(
        &mut missed,
        r,
        "healthz_failures",
        "/healthz failures",
        |v| v == 0.0,
    );
    let processes = r.value("processes");
    super::expect_value(
        &mut missed,
        r,
        "readyz_red",
        &format!("processes whose /readyz turned red (of {processes})"),
        |v| v == processes,
    );
    let nodes = r.value("nodes");
    super::expect_value(
        &mut missed,
        r,
        "probes",
        &format!("nodes a caller was sent to during the outage (of {nodes})"),
        |v| v == nodes,
    );
    super::expect_value(
        &mut missed,
        r,
        "probes_admitted",
        "callers admitted during the outage",
        |v| v == 0.0,
    );
    super::expect_value(
        &mut missed,
        r,
        "recovered",
        "routing and joining again after the outage",
        |v| v == 1.0,
    );
    super::expect_value(
        &mut missed,
        r,
        "ready_again",
        "every /readyz green again",
        |v| v == 1.0,
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
            // Some callers stay through the whole outage.
            long_every: 10,
            long_hold: Duration::from_secs(90),
        },
        LoadSpec {
            rate: 15.0,
            conferences: 6,
            hold: (Duration::from_secs(2), Duration::from_secs(4)),
            long_every: 5,
            long_hold: Duration::from_secs(12),
        },
    )
}

/// Status of `GET url` within 2 s (0 when no answer).
async fn probe(http: &reqwest::Client, url: &str) -> u16 {
    match tokio::time::timeout(Duration::from_secs(2), http.get(url).send()).await {
        Ok(Ok(r)) => r.status().as_u16(),
        _ => 0,
    }
}

/// Runs the scenario.
pub async fn run(common: &Common) -> ChaosResult<Report> {
    let spec = load(common);
    // The short outage leaves a loaded machine time to notice it everywhere: a process sees
    // Redis gone when a call of its own times out, which under load took over 4 s.
    let outage = common.fault_or(Duration::from_secs(60), Duration::from_secs(7));
    // The outage outlasts the conference lease (60 s by default; 3 s, three of the short
    // run's 1 s heartbeats, in the short run), so claims expire meanwhile and must come back
    // to the nodes that still host them.
    let conference_lease = common.pick("60s", "3s");
    let lease_env = vec![(
        "CONFROUTE_REDIS__CONFERENCE_LEASE".to_string(),
        conference_lease.to_string(),
    )];
    let mut cluster = Cluster::start(&Spec {
        shared_proxy: true,
        node_env: lease_env.clone(),
        controller_env: lease_env,
        ..Spec::new(3, 2)
    })
    .await?;
    let (claims, mut load) = super::under_load(common, &cluster, &spec).await?;
    let tracker = load.tracker.clone();

    let mut targets: Vec<(String, String)> = cluster
        .controllers
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("controller-{}", i + 1), c.http_url()))
        .collect();
    targets.extend(
        cluster
            .node_ids
            .iter()
            .zip(&cluster.nodes)
            .map(|(id, n)| (id.clone(), n.http_url())),
    );
    let http = crate::fixtures::http();
    let participants_before: usize = (0..cluster.nodes.len())
        .map(|i| tracker.members_on(i))
        .sum();
    let proxy = cluster
        .shared_proxy
        .as_ref()
        .ok_or_else(|| ChaosError("no shared proxy".into()))?;

    let cut = Instant::now();
    proxy.black_hole();
    let mut healthz_failures = Vec::new();
    let mut red: Vec<Option<Duration>> = vec![None; targets.len()];
    // One caller sent straight to each node (a route learnt before the outage) once that
    // node says it knows Redis is gone: it must be refused, not admitted. Each on a task of
    // its own, so that one waiting for its answer holds up neither the others nor the
    // probes of readiness.
    let first_node = cluster.controllers.len();
    let mut probing: Vec<Option<tokio::task::JoinHandle<bool>>> =
        (0..cluster.sims.len()).map(|_| None).collect();
    while cut.elapsed() < outage {
        for (i, (name, url)) in targets.iter().enumerate() {
            let h = probe(&http, &format!("{url}/healthz")).await;
            if h != 200 {
                healthz_failures.push(format!(
                    "{:.1}s into the outage: {name} /healthz answered {h}",
                    cut.elapsed().as_secs_f64()
                ));
            }
            if red[i].is_none() && probe(&http, &format!("{url}/readyz")).await == 503 {
                red[i] = Some(cut.elapsed());
            }
        }
        for (i, sim) in cluster.sims.iter().enumerate() {
            if probing[i].is_some() || red.get(first_node + i).is_none_or(Option::is_none) {
                continue;
            }
            let conf = tracker
                .conferences_on(i)
                .into_iter()
                .next()
                .unwrap_or_else(|| format!("probe-{i}"));
            let (tracker, sim) = (tracker.clone(), sim.clone());
            probing[i] = Some(tokio::spawn(async move {
                matches!(
                    tracker.probe_join(&sim, i, &conf).await,
                    JoinOutcome::Joined(_)
                )
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Judged while Redis is still away: a probe still waiting is waited for before the heal.
    let mut probes = (0usize, 0usize);
    for handle in probing.into_iter().flatten() {
        probes.0 += 1;
        if handle.await.unwrap_or(false) {
            probes.1 += 1;
        }
    }
    let participants_end_of_outage: usize = (0..cluster.nodes.len())
        .map(|i| tracker.members_on(i))
        .sum();
    let healed = Instant::now();
    proxy.heal();

    let ready_again = wait_for_async(
        "every process ready again",
        Duration::from_secs(60),
        || async {
            for (_, url) in &targets {
                if probe(&http, &format!("{url}/readyz")).await != 200 {
                    return None;
                }
            }
            Some(Instant::now())
        },
    )
    .await
    .ok();
    let recovered = wait_for_async(
        "a route and a join to succeed after the outage",
        Duration::from_secs(60),
        || async {
            let routed = tracker
                .routes()
                .iter()
                .filter(|e| e.at >= healed && matches!(e.outcome, RouteOutcome::Node(_)))
                .map(|e| e.answered)
                .min();
            let joined = tracker
                .joins()
                .iter()
                .filter_map(|j| match j.outcome {
                    JoinOutcome::Joined(l) if j.at >= healed => Some(j.at + l),
                    _ => None,
                })
                .min();
            match (routed, joined) {
                (Some(r), Some(j)) => Some((r, j)),
                _ => None,
            }
        },
    )
    .await
    .ok();
    // A measurement window under load, not a wait for an event.
    tokio::time::sleep(common.pick(Duration::from_secs(10), Duration::from_secs(2))).await;
    load.stop().await;
    let bridges = cluster.wait_no_bridges(Duration::from_secs(15)).await;
    let left_claims = cluster.wait_no_claims(Duration::from_secs(15)).await;

    let routes = tracker.routes();
    let last_failure = routes
        .iter()
        .filter(|e| e.at >= cut && !matches!(e.outcome, RouteOutcome::Node(_)))
        .map(|e| e.answered)
        .max();
    let fault_end = match (recovered.map(|r| r.0), last_failure) {
        (Some(r), Some(f)) => r.max(f),
        (Some(r), None) => r,
        (None, _) => Instant::now(),
    };
    let refused = tracker
        .joins()
        .iter()
        .filter(|j| j.at >= cut && j.at <= healed && matches!(j.outcome, JoinOutcome::Failed(_)))
        .count();

    let history = claims.history();
    let mut report = Report::from_run(
        "redis-outage",
        format!(
            "every controller and agent cut off from Redis for {:.0} s (proxy black-holed: \
             sockets open, no answers) with {participants_before} participant(s) in \
             conferences; {} callers/s over {} conferences; conference lease {conference_lease}",
            outage.as_secs_f64(),
            spec.rate,
            spec.conferences
        ),
        &tracker,
        &history,
        (cut, fault_end),
    );
    report.recovery.push(Recovery {
        what: "outage end -> every /readyz green".into(),
        took: ready_again.map(|t| t - healed),
        goal: None,
    });
    report.recovery.push(Recovery {
        what: "outage end -> first route".into(),
        took: recovered.map(|r| r.0.saturating_duration_since(healed)),
        goal: None,
    });
    report.recovery.push(Recovery {
        what: "outage end -> first caller in a bridge".into(),
        took: recovered.map(|r| r.1.saturating_duration_since(healed)),
        goal: None,
    });
    report.recovery.push(Recovery {
        what: "outage end -> last failed route answered".into(),
        took: last_failure.map(|f| f.saturating_duration_since(healed)),
        goal: None,
    });
    report.figure(
        "/healthz failures during the outage",
        healthz_failures.len().to_string(),
    );
    report.set("healthz_failures", healthz_failures.len() as f64);
    report.set("recovered", if recovered.is_some() { 1.0 } else { 0.0 });
    report.set("ready_again", if ready_again.is_some() { 1.0 } else { 0.0 });
    report.notes.extend(healthz_failures);
    let turned_red = red.iter().filter(|r| r.is_some()).count();
    report.set("readyz_red", turned_red as f64);
    report.set("processes", targets.len() as f64);
    report.set("probes", probes.0 as f64);
    report.set("nodes", cluster.sims.len() as f64);
    report.set("probes_admitted", probes.1 as f64);
    report.set("participants_kept", participants_end_of_outage as f64);
    report.figure(
        "/readyz turned red",
        format!(
            "{turned_red} of {} processes (slowest after {})",
            targets.len(),
            secs(red.iter().flatten().max().copied())
        ),
    );
    report.figure(
        "participants kept through the outage",
        format!("{participants_end_of_outage} in bridges at its end"),
    );
    report.figure(
        "callers sent straight to a node during the outage",
        format!("{} dialled, {} admitted", probes.0, probes.1),
    );
    report.figure("joins refused during the outage", refused.to_string());
    report.leftovers(&bridges, &left_claims);
    report.restarts(&cluster.restarted(&[]));
    keep_logs(common, "redis-outage", &cluster);
    Ok(report)
}
