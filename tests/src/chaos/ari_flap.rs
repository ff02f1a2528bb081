//! The ARI events WebSocket flapping: every few seconds each simulated Asterisk drops every
//! events WebSocket (no close frame; channels and bridges stay, the Stasis app is inactive
//! until the agent reconnects), under load.
//!
//! Events are lost while a socket is down; each agent reconnects and reconciles. No bridge may
//! be orphaned (every bridge belongs to a conference its agent hosts, and none is left once
//! the callers are gone) and no participant lost (every caller that joined is in a bridge
//! until it hangs up).

use std::time::{Duration, Instant};

use confroute_node::conference::parse_bridge_id;

use super::cluster::{Cluster, Spec};
use super::load::LoadSpec;
use super::report::{Recovery, Report};
use super::{keep_logs, ChaosResult, Common};
use crate::fixtures;

/// The goals this report misses.
pub fn goals(r: &Report) -> Vec<String> {
    let mut missed = super::report::shared_goals(r, false);
    super::expect_value(
        &mut missed,
        r,
        "unknown_bridges",
        "bridges not hosted by their agent",
        |v| v == 0.0,
    );
    super::expect_value(&mut missed, r, "flaps", "WebSocket drops", |v| v >= 2.0);
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
            rate: 15.0,
            conferences: 6,
            hold: (Duration::from_millis(1500), Duration::from_secs(4)),
            long_every: 0,
            long_hold: Duration::ZERO,
        },
    )
}

/// Bridges in the Asterisks that their agent does not host now: `node:bridge`, each with
/// its member count (which may change from one look to the next: not part of the key).
async fn unknown_bridges(cluster: &Cluster) -> Vec<(String, usize)> {
    let http = fixtures::http();
    let mut out = Vec::new();
    for (i, sim) in cluster.sims.iter().enumerate() {
        let bridges = sim.snapshot().bridges;
        if bridges.is_empty() {
            continue;
        }
        let url = format!("{}/v1/conferences", cluster.nodes[i].http_url());
        let views: serde_json::Value = match http.get(&url).send().await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        let hosted: Vec<(String, u64)> = views["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|v| {
                        Some((v["conference"].as_str()?.to_string(), v["epoch"].as_u64()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        for b in bridges {
            let known = parse_bridge_id(&b.id)
                .is_some_and(|(_, epoch, name)| hosted.contains(&(name.to_string(), epoch)));
            if !known {
                out.push((
                    format!("{}:{}", cluster.node_ids[i], b.id),
                    b.channels.len(),
                ));
            }
        }
    }
    out
}

/// Runs the scenario.
pub async fn run(common: &Common) -> ChaosResult<Report> {
    let spec = load(common);
    let flapping = common.fault_or(Duration::from_secs(60), Duration::from_secs(10));
    let every = common.pick(Duration::from_secs(3), Duration::from_secs(2));
    let mut cluster = Cluster::start(&Spec::new(3, 2)).await?;
    let (claims, mut load) = super::under_load(common, &cluster, &spec).await?;
    let tracker = load.tracker.clone();

    let start = Instant::now();
    let mut flaps = 0u64;
    let mut reconnect_worst = Duration::ZERO;
    while start.elapsed() < flapping {
        let dropped_at = Instant::now();
        for sim in &cluster.sims {
            sim.drop_websockets();
        }
        flaps += 1;
        for i in 0..cluster.sims.len() {
            cluster.wait_node_app(i).await?;
        }
        reconnect_worst = reconnect_worst.max(dropped_at.elapsed());
        // The flapping period is the fault's rhythm, not a wait for an event.
        let next = dropped_at + every;
        tokio::time::sleep(next.saturating_duration_since(Instant::now())).await;
    }
    let stopped = Instant::now();
    // Every bridge must belong to a conference its agent hosts. A bridge may be between its
    // creation and its agent's view (or its last caller's leaving and its destruction) for a
    // moment: only one unknown for 5 s in a row counts.
    let mut unknown = unknown_bridges(&cluster).await;
    let settle = Instant::now();
    while !unknown.is_empty() && settle.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = unknown_bridges(&cluster).await;
        unknown.retain(|(b, _)| now.iter().any(|(n, _)| n == b));
    }
    // A measurement window under load, not a wait for an event.
    tokio::time::sleep(common.pick(Duration::from_secs(5), Duration::from_secs(1))).await;
    load.stop().await;
    let bridges = cluster.wait_no_bridges(Duration::from_secs(15)).await;
    let left_claims = cluster.wait_no_claims(Duration::from_secs(15)).await;

    let mut reconnects = Vec::new();
    let mut reconciles = Vec::new();
    for (id, n) in cluster.node_ids.iter().zip(&cluster.nodes) {
        let m = fixtures::scrape(&n.http_url()).await;
        reconnects.push(format!(
            "{id} {}",
            fixtures::metric(&m, "confroute_ari_reconnects_total")
        ));
        let actions: Vec<String> = [
            "rejoined_channel",
            "removed_gone_participant",
            "ended_missing_bridge",
            "destroyed_empty_bridge",
            "released_stale_claim",
            "adopted_conference",
        ]
        .iter()
        .filter_map(|a| {
            let v = fixtures::metric(
                &m,
                &format!(r#"confroute_node_reconcile_actions_total{{action="{a}"}}"#),
            );
            (v > 0.0).then(|| format!("{a} {v}"))
        })
        .collect();
        reconciles.push(format!("{id}: {}", actions.join(", ")));
    }

    let history = claims.history();
    let mut report = Report::from_run(
        "ari-flap",
        format!(
            "every events WebSocket of every Asterisk dropped every {:.0} s for {:.0} s \
             ({flaps} times); {} callers/s over {} conferences",
            every.as_secs_f64(),
            flapping.as_secs_f64(),
            spec.rate,
            spec.conferences
        ),
        &tracker,
        &history,
        (start, stopped),
    );
    report.recovery.push(Recovery {
        what: "drop -> every agent's Stasis app registered again (worst)".into(),
        took: Some(reconnect_worst),
        goal: None,
    });
    report.figure(
        "bridges not hosted by their agent at the end of the flapping",
        unknown.len().to_string(),
    );
    report.notes.extend(
        unknown.iter().map(|(b, members)| {
            format!("bridge {b} ({members} member(s)) not hosted by its agent")
        }),
    );
    report.figure("reconnects counted by the agents", reconnects.join(", "));
    report.figure("reconciliation actions", reconciles.join("; "));
    report.set("flaps", flaps as f64);
    report.set("unknown_bridges", unknown.len() as f64);
    report.leftovers(&bridges, &left_claims);
    report.restarts(&cluster.restarted(&[]));
    keep_logs(common, "ari-flap", &cluster);
    Ok(report)
}
