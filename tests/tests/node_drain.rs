//! Draining (invariant 4): SIGTERM and `POST /v1/drain` stop new conferences while existing
//! ones keep taking joiners; the drain ends when the node is empty or at its deadline (the
//! remaining callers are then hung up); SIGTERM then deregisters and exits 0, an admin
//! drain stays drained until undrained. A drain set through the controller is adopted.

mod node_common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use confroute_shared::name::ConferenceName;
use confroute_shared::store::StateChange;
use confroute_shared::types::NodeState;
use confroute_tests::fixtures;
use confroute_tests::harness::{wait_for_async, ControllerProc, NodeProc, RedisServer};
use node_common::*;
use serde_json::Value;

async fn node_state(store: &confroute_shared::store::Store, id: &str) -> Option<NodeState> {
    store
        .get_node(&fixtures::id(id))
        .await
        .ok()
        .flatten()
        .map(|n| n.info.state)
}

/// Waits until Redis says node-a is draining.
async fn wait_draining(s: &Single, store: &confroute_shared::store::Store) {
    wait_for_async("draining in Redis", WAIT, || async {
        (node_state(store, "node-a").await == Some(NodeState::Draining)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
}

/// node-a with `extra` settings and a caller in conference `busy`, sent SIGTERM and
/// draining; returns the setup, a store and the caller.
async fn draining_with_a_caller(
    extra: &[(&str, &str)],
) -> (Single, confroute_shared::store::Store, String) {
    let mut settings = vec![("CONFROUTE_CONFERENCE__BEEP", "false")];
    settings.extend_from_slice(extra);
    let mut s = Single::start(&settings).await;
    let store = fixtures::store(&s.cfg);
    let a = dial(&s.sim, "busy", &[]).await;
    wait_bridged(&s.sim, &a).await;
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    wait_draining(&s, &store).await;
    (s, store, a)
}

/// Kills node-a's agent, starts it again, and waits until it serves (locally and in Redis).
async fn killed_and_serving_again(s: &mut Single, store: &confroute_shared::store::Store) {
    s.node.process().kill();
    s.node.restart().expect("restart");
    wait_app(&s.sim, &s.node).await;
    wait_for_async("serving again", WAIT, || async {
        let v = get_json(&format!("{}/v1/conferences", s.node.http_url())).await;
        (v["state"] == "serving" && node_state(store, "node-a").await == Some(NodeState::Serving))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
}

async fn post(url: &str) -> (u16, Value) {
    let r = fixtures::http().post(url).send().await.expect("POST");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A caller that reached the Stasis app as the node stopped, whose variables were still
/// being read when the agent was about to exit, is refused (Q.850 34) before the exit
/// rather than left in the app in silence with nobody to admit it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_still_being_admitted_at_exit_is_refused_not_left_in_silence() {
    // Every variable is read with getChannelVar, none comes in the snapshots.
    let mut s = Single::start_on(
        sim_with(&[]).await,
        &[("CONFROUTE_CONFERENCE__BEEP", "false")],
    )
    .await;
    s.sim.hold_operation("getChannelVar");
    let late = dial(&s.sim, "too-late", &[]).await;
    confroute_tests::harness::wait_for_async("the caller's variables asked", WAIT, || async {
        (s.sim.held_requests("getChannelVar") >= 1).then_some(())
    })
    .await
    .expect("variables asked");
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    let code = s.node.process().wait_exit(WAIT).expect("exits");
    assert_eq!(code, Some(0), "{}", s.node.output());
    s.sim.release_operation("getChannelVar");
    assert_eq!(wait_hangup(&s.sim, &late).await, 34, "{}", s.node.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_deregisters_and_exits_zero_when_empty() {
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let store = fixtures::store(&s.cfg);
    let controller = ControllerProc::start(&fixtures::redis_env(&s.cfg)).expect("controller");
    let a = dial(&s.sim, "busy", &[]).await;
    wait_bridged(&s.sim, &a).await;
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    wait_draining(&s, &store).await;
    // An admin cannot undrain a node that is stopping, nor turn its stop into a drain it
    // stays in: both would be answered as done while the agent still exits once empty.
    for action in ["undrain", "drain", "drain?shutdown=false"] {
        let (status, body) = post(&format!("{}/v1/{action}", s.node.http_url())).await;
        assert_eq!(status, 409, "{action}: {body}");
        // The same code as the controller's, below.
        assert_eq!(
            body["error"]["code"], "node_shutting_down",
            "{action}: {body}"
        );
    }
    // Asking for the stop it is doing already is fine.
    let (status, body) = post(&format!("{}/v1/drain?shutdown=true", s.node.http_url())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "draining", "{body}");
    // Nor through a controller: Redis would say serving and conferences would be placed
    // on a node that ends them at its drain deadline.
    for action in ["undrain", "drain"] {
        let url = format!("{}/v1/nodes/node-a/{action}", controller.http_url());
        let (status, body) = post(&url).await;
        assert_eq!(status, 409, "{action}: {body}");
        assert_eq!(body["error"]["code"], "node_shutting_down", "{body}");
    }
    // What the API shows tells this drain from an admin's: it ends in the agent's exit.
    let shown = fixtures::http()
        .get(format!("{}/v1/nodes/node-a", controller.http_url()))
        .send()
        .await
        .expect("GET node");
    let shown: Value = shown.json().await.expect("json");
    assert_eq!(shown["state"], "draining", "{shown}");
    assert_eq!(shown["stopping"], true, "{shown}");
    assert!(
        fixtures::documented_error_codes()
            .iter()
            .any(|c| c == "node_shutting_down"),
        "the controller's code is in docs/openapi.json"
    );
    assert_eq!(
        node_state(&store, "node-a").await,
        Some(NodeState::Draining)
    );
    // A new conference is refused; the existing one still takes joiners.
    let fresh = dial(&s.sim, "fresh", &[]).await;
    assert_eq!(wait_hangup(&s.sim, &fresh).await, 34);
    let joiner = dial(&s.sim, "busy", &[]).await;
    if !s
        .sim
        .wait_until(WAIT, |snap| {
            snap.channel(&joiner).is_some_and(|c| c.bridge.is_some())
        })
        .await
    {
        panic!("joiner not admitted while draining\n{}", s.node.output());
    }
    assert!(s.node.process().is_running());
    s.sim.hangup_far_end(&a, 16).await.expect("hangup");
    s.sim.hangup_far_end(&joiner, 16).await.expect("hangup");
    let code = s.node.process().wait_exit(WAIT).expect("exits");
    assert_eq!(code, Some(0), "{}", s.node.output());
    assert_eq!(node_state(&store, "node-a").await, None, "deregistered");
    let out = s.node.output();
    assert!(
        out.contains("shutting_down") && out.contains("deregistered"),
        "{out}"
    );
    let name = ConferenceName::parse("busy").expect("name");
    assert!(store.lookup(&name).await.expect("lookup").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deadline_ends_remaining_conferences_then_exits() {
    let mut s = Single::start(&[
        ("CONFROUTE_NODE__DRAIN_DEADLINE", "700ms"),
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
    ])
    .await;
    let a = dial(&s.sim, "stubborn", &[]).await;
    wait_bridged(&s.sim, &a).await;
    let store = fixtures::store(&s.cfg);
    let signalled = Instant::now();
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    wait_draining(&s, &store).await;
    // Drained first, the caller kept until the deadline (counted from the drain's start,
    // after the signal), then hung up as a normal clearing.
    assert_eq!(wait_hangup(&s.sim, &a).await, 16, "{}", s.node.output());
    // The agent counts the deadline on its reading of Redis's clock: a little slack.
    assert!(
        signalled.elapsed() >= Duration::from_millis(600),
        "hung up {:?} after the signal, before the 700 ms deadline\n{}",
        signalled.elapsed(),
        s.node.output()
    );
    let code = s.node.process().wait_exit(WAIT).expect("exits");
    assert_eq!(code, Some(0), "{}", s.node.output());
    assert!(s.sim.snapshot().bridges.is_empty());
    let store = fixtures::store(&s.cfg);
    let name = ConferenceName::parse("stubborn").expect("name");
    assert!(store.lookup(&name).await.expect("lookup").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_drain_with_deadline_stays_drained_until_undrain() {
    let s = Single::start(&[
        ("CONFROUTE_NODE__DRAIN_DEADLINE", "700ms"),
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
    ])
    .await;
    let store = fixtures::store(&s.cfg);
    let a = dial(&s.sim, "kept", &[]).await;
    wait_bridged(&s.sim, &a).await;
    let (status, body) = post(&format!("{}/v1/drain", s.node.http_url())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "draining");
    assert_eq!(body["previous"], "serving");
    assert_eq!(
        node_state(&store, "node-a").await,
        Some(NodeState::Draining)
    );
    assert_eq!(wait_hangup(&s.sim, &a).await, 16, "ended at the deadline");
    until(&s.sim, "bridge gone", |snap| snap.bridges.is_empty()).await;
    // Still drained: new conferences refused.
    let refused = dial(&s.sim, "new-one", &[]).await;
    assert_eq!(wait_hangup(&s.sim, &refused).await, 34);
    let (status, body) = post(&format!("{}/v1/undrain", s.node.http_url())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "serving");
    assert_eq!(node_state(&store, "node-a").await, Some(NodeState::Serving));
    let welcome = dial(&s.sim, "new-one", &[]).await;
    assert_main(&wait_bridged(&s.sim, &welcome).await, 1, "new-one");
    // Bad input: a wrong method or route gets a JSON error and changes nothing.
    let r = fixtures::http()
        .get(format!("{}/v1/drain", s.node.http_url()))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), 405);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "method_not_allowed");
    assert_eq!(node_state(&store, "node-a").await, Some(NodeState::Serving));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_set_through_the_controller_is_adopted() {
    let s = Single::start(&[]).await;
    let controller = ControllerProc::start(&fixtures::redis_env(&s.cfg)).expect("controller");
    let (status, body) = post(&format!("{}/v1/nodes/node-a/drain", controller.http_url())).await;
    assert_eq!(status, 200, "{body}");
    wait_for_async("agent adopts draining", WAIT, || async {
        let v = get_json(&format!("{}/v1/conferences", s.node.http_url())).await;
        (v["state"] == "draining").then_some(())
    })
    .await
    .expect("adopted");
    let refused = dial(&s.sim, "after-drain", &[]).await;
    assert_eq!(wait_hangup(&s.sim, &refused).await, 34);
    let (status, _) = post(&format!(
        "{}/v1/nodes/node-a/undrain",
        controller.http_url()
    ))
    .await;
    assert_eq!(status, 200);
    wait_for_async("agent adopts serving", WAIT, || async {
        let v = get_json(&format!("{}/v1/conferences", s.node.http_url())).await;
        (v["state"] == "serving").then_some(())
    })
    .await
    .expect("adopted");
}

/// A drain set through the controller counts from when the controller set it: the agent
/// adopts the record's `drain_since_ms`, so its registration after Redis came back empty
/// writes that time back, not when the agent first saw the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_set_through_the_controller_keeps_its_start_across_a_redis_restart() {
    let mut s = Single::start(&[]).await;
    let store = fixtures::store(&s.cfg);
    let controller = ControllerProc::start(&fixtures::redis_env(&s.cfg)).expect("controller");
    let (status, body) = post(&format!("{}/v1/nodes/node-a/drain", controller.http_url())).await;
    assert_eq!(status, 200, "{body}");
    let since = |store: &confroute_shared::store::Store| {
        let store = store.clone();
        async move {
            store
                .get_node(&fixtures::id("node-a"))
                .await
                .ok()
                .flatten()
                .and_then(|n| n.drain_since_ms)
        }
    };
    let set = since(&store)
        .await
        .expect("drain_since_ms set by the controller");
    wait_for_async("agent adopts draining", WAIT, || async {
        let v = get_json(&format!("{}/v1/conferences", s.node.http_url())).await;
        (v["state"] == "draining").then_some(())
    })
    .await
    .expect("adopted");
    s.redis.restart().expect("redis back, empty");
    let again = wait_for_async("registered again, draining", WAIT, || async {
        let n = store.get_node(&fixtures::id("node-a")).await.ok()??;
        (n.info.state == NodeState::Draining).then_some(n.drain_since_ms)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert_eq!(again, Some(set), "{}", s.node.output());
}

/// An admin's drain carries over a crash: the agent started again at once watches its last
/// life's record until it expires, and still resumes the drain that record held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_drain_survives_a_crash_and_an_immediate_restart() {
    // A lease (three heartbeats) of 3 s: the restart must come while the record lives, and
    // a loaded machine may take more than the harness's 600 ms to start a process.
    let mut s = Single::start(&[("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "1s")]).await;
    let (status, body) = post(&format!("{}/v1/drain", s.node.http_url())).await;
    assert_eq!(status, 200, "{body}");
    s.node.process().kill();
    s.node.restart().expect("restart");
    assert!(
        s.node
            .output()
            .contains("this node id has a live record: checking that no other agent renews it"),
        "restarted while the last life's record lived:\n{}",
        s.node.output()
    );
    let v = get_json(&format!("{}/v1/conferences", s.node.http_url())).await;
    assert_eq!(v["state"], "draining", "{}", s.node.output());
    let refused = dial(&s.sim, "after-crash", &[]).await;
    assert_eq!(wait_hangup(&s.sim, &refused).await, 34);
}

/// An admin drain set (through the controller's store call) while a restarted agent checks
/// that no other agent uses its node id is kept: the agent starts draining. (A drain landing
/// after the check's last read is kept by `register.lua`: `store_model`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_drain_set_while_a_restarted_agent_checks_its_id_is_kept() {
    // A 3 s lease: the restart comes while the record lives, and the check watches two
    // heartbeats of it (2 s), time enough to drain during it.
    let mut s = Single::start(&[("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "1s")]).await;
    s.node.process().kill();
    s.node.relaunch().expect("relaunch");
    s.node
        .wait_log(
            "this node id has a live record: checking that no other agent renews it",
            WAIT,
        )
        .expect("the restarted agent checks its id");
    let store = fixtures::store(&s.cfg);
    let change = store
        .set_state(&fixtures::id("node-a"), NodeState::Draining)
        .await
        .expect("admin drain");
    assert_eq!(change, StateChange::Changed(NodeState::Serving));
    s.node.wait_started().expect("the agent starts");
    let url = format!("{}/v1/conferences", s.node.http_url());
    wait_for_async("the restarted agent adopting the drain", WAIT, || async {
        (get_json(&url).await["state"] == "draining").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let rec = store
        .get_node(&fixtures::id("node-a"))
        .await
        .expect("read")
        .expect("live record");
    assert_eq!(
        rec.info.state,
        NodeState::Draining,
        "the record keeps the drain"
    );
    assert!(rec.drain_since_ms.is_some(), "with when it began");
}

/// node-a with `extra` settings and a caller in `conference`, drained through its API;
/// returns the setup, the caller and when the drain was asked for.
async fn admin_drained_with_a_caller(
    conference: &str,
    extra: &[(&str, &str)],
) -> (Single, String, Instant) {
    let mut settings = vec![("CONFROUTE_CONFERENCE__BEEP", "false")];
    settings.extend_from_slice(extra);
    let s = Single::start(&settings).await;
    let a = dial(&s.sim, conference, &[]).await;
    wait_bridged(&s.sim, &a).await;
    let drained_at = Instant::now();
    let (status, body) = post(&format!("{}/v1/drain", s.node.http_url())).await;
    assert_eq!(status, 200, "{body}");
    (s, a, drained_at)
}

/// Starts the agent again and checks it resumed the drain its record held.
fn restart_resuming_the_drain(s: &mut Single) {
    s.node.restart().expect("restart");
    assert!(
        s.node
            .output()
            .contains("resuming the admin drain where its deadline stood"),
        "restarted while the drained record lived:\n{}",
        s.node.output()
    );
}

/// An admin drain's deadline carries over a restart of the agent: the conference still there
/// ends when the deadline set at the drain comes, not a whole deadline after the restart.
/// (The drain's start is in the node record; the restart comes halfway through.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_drains_deadline_carries_over_a_restart() {
    const DEADLINE: Duration = Duration::from_secs(8);
    // A 3 s lease: the restart must come while the record lives, on a loaded machine too.
    let (mut s, a, drained_at) = admin_drained_with_a_caller(
        "long-haul",
        &[
            ("CONFROUTE_NODE__DRAIN_DEADLINE", "8s"),
            ("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "1s"),
        ],
    )
    .await;
    // Half the deadline passes in this life of the agent: the time itself is what is tested.
    tokio::time::sleep_until((drained_at + DEADLINE / 2).into()).await;
    restart_resuming_the_drain(&mut s);
    // A whole deadline after the restart would be at least 12 s after the drain.
    ended_at_the_deadline(&s, &a, drained_at, DEADLINE).await;
}

/// The agent exports when its drain's deadline comes (the stuck-drain alert's input): the
/// drain's start plus `node.drain_deadline`, the same after a restart of the agent, and 0
/// once it is undrained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_is_exported_and_kept_across_a_restart() {
    // A 3 s lease: the restart must come while the record lives, on a loaded machine too.
    let (mut s, _a, _) = admin_drained_with_a_caller(
        "deadline-gauge",
        &[
            ("CONFROUTE_NODE__DRAIN_DEADLINE", "10m"),
            ("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "1s"),
        ],
    )
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let gauge = "confroute_node_drain_deadline_timestamp_seconds";
    let before = fixtures::metric(&fixtures::scrape(&s.node.http_url()).await, gauge);
    assert!(
        (before - (now + 600.0)).abs() < 5.0,
        "{before} is not ten minutes from now ({now})"
    );
    restart_resuming_the_drain(&mut s);
    let url = s.node.http_url();
    wait_for_async("the restarted agent's drain deadline", WAIT, || async {
        let after = fixtures::metric(&fixtures::scrape(&url).await, gauge);
        (after == before).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let (status, body) = post(&format!("{url}/v1/undrain")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        fixtures::metric(&fixtures::scrape(&url).await, gauge),
        0.0,
        "not draining"
    );
}

/// Waits until caller `a` is hung up (16) and checks that came `deadline` after the drain
/// began at `drained_at`, give or take the test's own delays: before the half deadline later
/// that a deadline counted again from the restart or stop (halfway through) would give.
async fn ended_at_the_deadline(s: &Single, a: &str, drained_at: Instant, deadline: Duration) {
    assert_eq!(wait_hangup(&s.sim, a).await, 16, "ended at the deadline");
    let ended = drained_at.elapsed();
    assert!(
        ended >= deadline - Duration::from_secs(1)
            && ended < deadline + deadline / 2 - Duration::from_millis(500),
        "ended {ended:?} after the drain, deadline {deadline:?}\n{}",
        s.node.output()
    );
}

/// A stop during an admin's drain keeps that drain's deadline (counted from when the drain
/// began, as `drain_since_ms` and the stuck-drain alert count it), not a whole deadline from
/// the stop; the agent then exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_an_admin_drain_keeps_its_deadline() {
    const DEADLINE: Duration = Duration::from_secs(8);
    let (mut s, a, drained_at) =
        admin_drained_with_a_caller("stop-late", &[("CONFROUTE_NODE__DRAIN_DEADLINE", "8s")]).await;
    // Half the deadline passes before the stop: the time itself is what is tested.
    tokio::time::sleep_until((drained_at + DEADLINE / 2).into()).await;
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    // A whole deadline after the stop would be at least 12 s after the drain.
    ended_at_the_deadline(&s, &a, drained_at, DEADLINE).await;
    assert_eq!(
        s.node.process().wait_exit(WAIT).expect("exits"),
        Some(0),
        "{}",
        s.node.output()
    );
}

/// An admin drain whose deadline passed while its agent was down (its record still alive):
/// the agent started again first adopts the conference Asterisk still holds, then ends it
/// (the deadline is past), rather than finding itself empty before the adoption and leaving
/// the call running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_drain_past_its_deadline_at_a_restart_ends_what_the_agent_adopts() {
    // A 9 s lease outlives the 1 s deadline by far.
    let (mut s, a, drained_at) = admin_drained_with_a_caller(
        "overdue",
        &[
            ("CONFROUTE_NODE__DRAIN_DEADLINE", "1s"),
            ("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "3s"),
        ],
    )
    .await;
    s.node.process().kill();
    // The deadline passes while no agent runs.
    tokio::time::sleep_until((drained_at + Duration::from_millis(1500)).into()).await;
    assert!(
        s.sim.snapshot().channel(&a).is_some(),
        "the call is still up"
    );
    restart_resuming_the_drain(&mut s);
    let gone = s
        .sim
        .wait_for_event(WAIT, |e| {
            e["type"] == "ChannelDestroyed" && e["channel"]["id"] == a.as_str()
        })
        .await
        .unwrap_or_else(|| panic!("not ended once adopted\n{}", s.node.output()));
    assert_eq!(gone["cause"], 16, "{gone}");
}

/// An agent killed in its own shutdown drain (its grace period ran out) and started again
/// while its record still lives is a new life: it serves, and keeps the calls Asterisk still
/// has. Only an admin's drain carries over a restart; this one would have drained for good
/// and ended those calls at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_during_its_shutdown_drain_serves_again() {
    // A long lease: the record is still there when the agent comes back.
    let (mut s, store, a) =
        draining_with_a_caller(&[("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "5s")]).await;
    killed_and_serving_again(&mut s, &store).await;
    // The caller is still in its conference, now this life's.
    assert!(s
        .sim
        .snapshot()
        .channel(&a)
        .is_some_and(|c| c.bridge.is_some()));
}

/// `POST /v1/drain?shutdown=true` (the chart's preStop hook) is the drain SIGTERM starts: an
/// agent killed in it and started again serves (an admin's drain would carry over and leave
/// the pod drained for good), and one left empty exits. A query it does not know is refused
/// with a JSON error and drains nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_for_a_stop_ends_in_an_exit_and_does_not_outlive_the_agent() {
    let mut s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        // A long lease: the record is still there when the agent comes back.
        ("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "5s"),
    ])
    .await;
    let store = fixtures::store(&s.cfg);
    let drain = format!("{}/v1/drain", s.node.http_url());
    for bad in ["shutdown=yes", "deadline=5", "shutdown"] {
        let (status, body) = post(&format!("{drain}?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_query", "{body}");
    }
    let v = get_json(&format!("{}/v1/conferences", s.node.http_url())).await;
    assert_eq!(v["state"], "serving", "a refused drain drained: {v}");
    // Routes that take no query refuse one rather than ignore it.
    let (status, body) = post(&format!("{}/v1/undrain?force=true", s.node.http_url())).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_query", "{body}");
    // And routes that take no body refuse one other than `{}`.
    // A body past what any route reads is refused as any other, without waiting for the rest.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.node.http_port))
            .await
            .expect("connect");
        tcp.write_all(b"POST /v1/drain HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n")
            .await
            .expect("write");
        // A first part of it: more than any route reads.
        tcp.write_all(&[b'x'; 2048]).await.expect("write");
        let mut head = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut head))
            .await
            .expect("an answer before the body")
            .expect("read");
        let head = String::from_utf8_lossy(&head[..n]);
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        assert!(head.contains("invalid_body"), "{head}");
    }
    let big = "x".repeat(4096);
    for (url, body) in [
        (&drain, "{\"deadline\":\"5s\"}"),
        (&drain, "[1"),
        (&format!("{}/v1/undrain", s.node.http_url()), "x"),
        // Past what any route reads: the same refusal, not a 413.
        (&drain, big.as_str()),
    ] {
        let r = fixtures::http()
            .post(url.as_str())
            .body(body.to_string())
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status().as_u16(), 400, "{url} {body}");
        let v: serde_json::Value = r.json().await.expect("JSON error");
        assert_eq!(v["error"]["code"], "invalid_body", "{v}");
    }
    // An empty object, however spaced, is no body.
    let r = fixtures::http()
        .post(format!("{}/v1/undrain", s.node.http_url()))
        .body("{ \n }")
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 200);
    let v = get_json(&format!("{}/v1/conferences", s.node.http_url())).await;
    assert_eq!(v["state"], "serving", "a refused drain drained: {v}");
    let listed = fixtures::http()
        .get(format!("{}/v1/conferences?limit=1", s.node.http_url()))
        .send()
        .await
        .expect("GET");
    assert_eq!(listed.status().as_u16(), 400);

    let a = dial(&s.sim, "busy", &[]).await;
    wait_bridged(&s.sim, &a).await;
    let (status, body) = post(&format!("{drain}?shutdown=true")).await;
    assert_eq!(status, 200, "{body}");
    wait_draining(&s, &store).await;
    killed_and_serving_again(&mut s, &store).await;

    // Drained for a stop with its last caller gone, it exits.
    let (status, body) = post(&format!("{drain}?shutdown=true")).await;
    assert_eq!(status, 200, "{body}");
    s.sim.hangup_far_end(&a, 16).await.expect("hangup");
    let code = s
        .node
        .process()
        .wait_exit(WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert_eq!(code, Some(0), "{}", s.node.output());
}

/// A node in its shutdown drain whose record is lost (Redis restarted, or the lease ran out
/// while Redis was slow) registers again still marked stopping: no admin can then make it
/// serving, which would place new conferences on a node about to end them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_registering_again_in_its_shutdown_drain_stays_stopping() {
    let (s, store, _caller) = draining_with_a_caller(&[]).await;
    let deleted: Option<i64> = confroute_tests::harness::redis_query(
        s.redis.port(),
        redis::cmd("DEL").arg("{confroute}:node:node-a"),
    );
    assert_eq!(deleted, Some(1));
    wait_for_async("registered again", WAIT, || async {
        let rec = store.get_node(&fixtures::id("node-a")).await.ok()??;
        rec.stopping.then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let change = store
        .set_state(&fixtures::id("node-a"), NodeState::Serving)
        .await
        .expect("set_state");
    assert_eq!(change, StateChange::Stopping(NodeState::Draining));
    assert_eq!(
        node_state(&store, "node-a").await,
        Some(NodeState::Draining)
    );
}

/// The agent, stopping, has adopted the one conference Asterisk holds and drains it: it runs
/// on until caller `a` leaves, then exits.
async fn adopted_drained_then_exits(s: &mut Single, a: &str) {
    wait_for_async("the conference adopted while draining", WAIT, || async {
        let v = fixtures::try_get_json(&format!("{}/v1/conferences", s.node.http_url())).await?;
        (v["state"] == "draining" && v["items"].as_array().is_some_and(|i| i.len() == 1))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert!(s.node.process().is_running(), "still serving its callers");
    s.sim
        .hangup_far_end(a, 16)
        .await
        .expect("the caller leaves");
    let code = s.node.process().wait_exit(WAIT).expect("exits once empty");
    assert_eq!(code, Some(0), "{}", s.node.output());
}

/// A stop signal right after a restart, before the agent has looked at what Asterisk holds:
/// the agent hosts nothing yet, but that is not drained. It waits for its first look, adopts
/// the conference still in Asterisk, and drains it instead of exiting under its callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_right_after_a_restart_waits_for_the_conferences_asterisk_holds() {
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let a = dial(&s.sim, "kept", &[]).await;
    wait_bridged(&s.sim, &a).await;
    s.restart_with_channel_listing_held().await;
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    let store = fixtures::store(&s.cfg);
    wait_draining(&s, &store).await;
    s.sim.release_operation("GET /channels");
    adopted_drained_then_exits(&mut s, &a).await;
}

/// The same stop right after a restart, when the agent was away longer than the claims'
/// lease (Redis holds none for the node any more): what Asterisk holds is still adopted and
/// drained, not left with its callers to an agent that exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_right_after_a_restart_waits_for_asterisk_even_with_the_claims_lapsed() {
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let a = dial(&s.sim, "lapsed", &[]).await;
    wait_bridged(&s.sim, &a).await;
    s.restart_with_channel_listing_held().await;
    // The claim lapsed while the agent was away.
    s.redis
        .query(redis::cmd("DEL").arg("{confroute}:conf:lapsed"))
        .expect("del");
    let store = fixtures::store(&s.cfg);
    assert!(store
        .lookup(&ConferenceName::parse("lapsed").expect("name"))
        .await
        .expect("lookup")
        .is_none());
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    s.node
        .wait_log("waiting for the first look", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    s.sim.release_operation("GET /channels");
    adopted_drained_then_exits(&mut s, &a).await;
}

/// A second stop signal before the agent's first look at what Asterisk holds after a
/// restart still ends the conferences Asterisk holds: the agent waits briefly for the look,
/// adopts them and hangs their callers up, rather than exiting and leaving them in Asterisk
/// with no agent and their claims to lapse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_before_the_first_look_still_ends_what_asterisk_holds() {
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let a = dial(&s.sim, "kept", &[]).await;
    wait_bridged(&s.sim, &a).await;
    s.restart_with_channel_listing_held().await;
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    s.node
        .wait_log("waiting for the first look", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    s.node.process().signal(libc::SIGINT).expect("sigint");
    s.node
        .wait_log("waiting briefly for the first look", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    s.sim.release_operation("GET /channels");
    assert_eq!(
        wait_hangup(&s.sim, &a).await,
        16,
        "the adopted caller hung up"
    );
    let code = s.node.process().wait_exit(WAIT).expect("exits");
    assert_eq!(code, Some(0), "{}", s.node.output());
}

/// A second stop signal sent while the first one's drain is still being written to a slow
/// Redis is not lost: the agent ends everything now, as it does for any second signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_during_a_slow_drain_start_is_heard() {
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let a = dial(&s.sim, "busy", &[]).await;
    wait_bridged(&s.sim, &a).await;
    let redis_pid = s.redis.pid().expect("redis pid") as libc::pid_t;
    // Redis answers nothing: the drain's state write waits out its timeout.
    // SAFETY: signalling a child process this test started.
    assert_eq!(unsafe { libc::kill(redis_pid, libc::SIGSTOP) }, 0);
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    s.node
        .wait_log("stop requested; draining", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    s.node.process().signal(libc::SIGINT).expect("sigint");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(redis_pid, libc::SIGCONT) }, 0);
    s.node
        .wait_log("second stop signal", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert_eq!(wait_hangup(&s.sim, &a).await, 16, "everything ended now");
    let code = s.node.process().wait_exit(WAIT).expect("exits");
    assert_eq!(code, Some(0), "{}", s.node.output());
}

/// After a second stop signal the node is stopping for good: while its conferences are torn
/// down (here Asterisk is slow to hang the caller up), an undrain is refused and the node
/// takes no new conference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_ending_everything_after_a_second_stop_signal_cannot_be_undrained() {
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let a = dial(&s.sim, "busy", &[]).await;
    wait_bridged(&s.sim, &a).await;
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    s.node
        .wait_log("stop requested; draining", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    s.sim.hold_operation("hangup");
    s.node.process().signal(libc::SIGINT).expect("sigint");
    s.node
        .wait_log("second stop signal", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    wait_for_async("the caller's hangup sent", WAIT, || async {
        (s.sim.held_requests("hangup") > 0).then_some(())
    })
    .await
    .expect("hangup held");
    let (status, body) = post(&format!("{}/v1/undrain", s.node.http_url())).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "node_shutting_down", "{body}");
    let store = fixtures::store(&s.cfg);
    // Still listed, and as taking no new conference (not merely no longer listed).
    assert!(
        matches!(
            node_state(&store, "node-a").await,
            Some(NodeState::Draining | NodeState::ShuttingDown)
        ),
        "{}",
        s.node.output()
    );
    s.sim.release_operation("hangup");
    let code = s.node.process().wait_exit(WAIT).expect("exits");
    assert_eq!(code, Some(0), "{}", s.node.output());
}

/// A conference placed on the node just before its stop has its first caller on the way (the
/// edge follows the 302): the stopping agent waits for that caller and admits it, then drains
/// the conference like any other, rather than exit at once and leave it with nobody to answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_right_after_a_placement_waits_for_its_first_caller() {
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let store = fixtures::store(&s.cfg);
    let name: ConferenceName = "just-placed".parse().expect("name");
    store
        .claim(&name, &[fixtures::id("node-a")])
        .await
        .expect("claim");
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    s.node
        .wait_log(
            "waiting for the first caller of a conference placed here just before",
            WAIT,
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let a = dial(&s.sim, "just-placed", &[]).await;
    wait_bridged(&s.sim, &a).await;
    assert!(s.node.process().is_running(), "{}", s.node.output());
    s.sim.hangup_far_end(&a, 16).await.expect("hangup");
    assert_eq!(
        s.node.process().wait_exit(WAIT).expect("exits"),
        Some(0),
        "{}",
        s.node.output()
    );
}

/// Writes the record a last life of node-a left: `state`, `stopping`, capacity 5, the drain
/// begun at `since` (Redis time), with 30 s left though its heartbeat was short (the id check
/// watches two of them: 400 ms).
async fn last_lives_record(
    store: &confroute_shared::store::Store,
    redis_port: u16,
    state: NodeState,
    stopping: bool,
    since: u64,
) {
    let info = confroute_shared::types::NodeInfo {
        sip_uri: "sip:last-life.test:5060".into(),
        state,
        ..fixtures::node("node-a", 5)
    };
    store
        .register_draining_agent(&info, Duration::from_secs(30), true, since)
        .await
        .expect("register the last life");
    if stopping {
        store
            .set_own_state(&fixtures::id("node-a"), state, true)
            .await
            .expect("mark stopping");
    }
    let set: Option<i64> = confroute_tests::harness::redis_query(
        redis_port,
        redis::cmd("HSET")
            .arg("{confroute}:node:node-a")
            .arg("lease_period_ms")
            .arg(600),
    );
    assert_eq!(set, Some(0), "lease_period_ms written by the registration");
}

fn redis_maxmemory(port: u16, bytes: u64) {
    let ok: Option<String> = confroute_tests::harness::redis_query(
        port,
        redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(bytes),
    );
    assert_eq!(ok.as_deref(), Some("OK"));
}

/// An agent whose first registration is refused (Redis refusing writes for a moment) while
/// the record of its last life, killed in its shutdown drain, still lives registers at a
/// later heartbeat: it does not renew that record and carry on its drain, stopping mark,
/// SIP URI and capacity for the whole of its own life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_registration_failed_at_start_registers_rather_than_renew_its_last_life() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    let sim = sim().await;
    last_lives_record(&store, redis.port(), NodeState::Draining, true, 1).await;
    // Reads are answered, writes refused (OOM).
    redis_maxmemory(redis.port(), 1);
    let mut node = NodeProc::start(
        "node-a",
        &env(&sim, &cfg, &[("CONFROUTE_CONFERENCE__BEEP", "false")]),
    )
    .expect("node starts");
    node.wait_log("cannot register the node", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    redis_maxmemory(redis.port(), 0);
    wait_for_async("this life registered", WAIT, || async {
        let rec = store.get_node(&fixtures::id("node-a")).await.ok()??;
        (rec.info.capacity == 100
            && rec.info.sip_uri == "sip:node-a.test:5060"
            && rec.info.state == NodeState::Serving
            && !rec.stopping)
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    let v = get_json(&format!("{}/v1/conferences", node.http_url())).await;
    assert_eq!(v["state"], "serving", "{v}");
}

/// An agent that cannot read Redis at start cannot tell whether its last life was drained by
/// an admin: it registers only once Redis answers, after the id check, and the admin drain
/// the record holds carries over with its start, as it does when Redis answers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_drain_carries_over_a_restart_that_could_not_read_redis_at_first() {
    let redis = RedisServer::start().expect("redis");
    let upstream = format!("127.0.0.1:{}", redis.port())
        .parse()
        .expect("address");
    let proxy = confroute_tests::harness::TcpProxy::start(upstream)
        .await
        .expect("proxy");
    let direct = fixtures::store(&fixtures::single(&redis.url()));
    let since: u64 = {
        let t: Option<Vec<String>> =
            confroute_tests::harness::redis_query(redis.port(), &mut redis::cmd("TIME"));
        let t = t.expect("TIME");
        t[0].parse::<u64>().expect("seconds") * 1000 - 2_000
    };
    last_lives_record(&direct, redis.port(), NodeState::Draining, false, since).await;
    proxy.black_hole();
    let cfg = fixtures::single(&proxy.redis_url());
    let sim = sim().await;
    let mut node = NodeProc::start(
        "node-a",
        &env(
            &sim,
            &cfg,
            &[
                ("CONFROUTE_CONFERENCE__BEEP", "false"),
                ("CONFROUTE_REDIS__TIMEOUT", "300ms"),
            ],
        ),
    )
    .expect("node starts");
    node.wait_log("cannot read this node's record", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    proxy.heal();
    wait_for_async("this life registered, draining", WAIT, || async {
        let rec = direct.get_node(&fixtures::id("node-a")).await.ok()??;
        (rec.info.capacity == 100).then_some(rec)
    })
    .await
    .map(|rec| {
        assert_eq!(rec.info.state, NodeState::Draining, "{}", node.output());
        assert_eq!(rec.drain_since_ms, Some(since), "the drain's start is kept");
        assert!(!rec.stopping);
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    let v = get_json(&format!("{}/v1/conferences", node.http_url())).await;
    assert_eq!(v["state"], "draining", "{v}");
}

/// A second stop signal means now: the callbacks its ending of every conference queued do
/// not hold the exit for `webhook.shutdown_wait` when their receiver answers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_does_not_wait_out_the_callbacks_shutdown_wait() {
    let dark = confroute_tests::harness::DarkPort::start().expect("dark port");
    let mut s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_WEBHOOK__TIMEOUT", "5m"),
        ("CONFROUTE_WEBHOOK__SHUTDOWN_WAIT", "10m"),
    ])
    .await;
    let url = format!("http://{}/events", dark.addr());
    let a = dial(
        &s.sim,
        "busy",
        &[
            ("CONFROUTE_STATUS_CALLBACK", url.as_str()),
            ("CONFROUTE_STATUS_CALLBACK_EVENT", "leave end"),
        ],
    )
    .await;
    wait_bridged(&s.sim, &a).await;
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    s.node
        .wait_log("stop requested; draining", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    s.node.process().signal(libc::SIGINT).expect("sigint");
    assert_eq!(wait_hangup(&s.sim, &a).await, 16, "everything ended now");
    // The teardown's grace (10 s) and the hurried wait (5 s), with room to spare; far below
    // the 10 minutes configured.
    let code = s
        .node
        .process()
        .wait_exit(Duration::from_secs(40))
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert_eq!(code, Some(0), "{}", s.node.output());
    // Given up within the hurried wait (the leave's try cut short to leave the end its
    // share, the end's own try at its deadline), or abandoned at the exit.
    let out = s.node.output();
    assert!(
        out.contains("status callbacks still queued at exit")
            || out.matches("status callback given up").count() >= 2,
        "{out}"
    );
}

/// A caller of `conference` asking for its leave and end to `url` hangs up; once the
/// receiver has seen the leave (`got`), the node is stopped: it exits cleanly, and the end
/// reached the receiver after the leave.
async fn leave_then_stop(
    s: &mut Single,
    conference: &str,
    url: &str,
    got: &Arc<Mutex<Vec<String>>>,
) {
    let a = dial(
        &s.sim,
        conference,
        &[
            ("CONFROUTE_STATUS_CALLBACK", url),
            ("CONFROUTE_STATUS_CALLBACK_EVENT", "leave end"),
        ],
    )
    .await;
    wait_bridged(&s.sim, &a).await;
    s.sim.hangup_far_end(&a, 16).await.expect("hang up");
    wait_for_async("the leave being sent", WAIT, || async {
        got.lock()
            .expect("lock")
            .iter()
            .any(|e| e == "participant-leave")
            .then_some(())
    })
    .await
    .expect("the leave was sent");
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    let code = s
        .node
        .process()
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert_eq!(code, Some(0), "{}", s.node.output());
    assert_eq!(
        *got.lock().expect("lock"),
        vec!["participant-leave", "conference-end"],
        "{}",
        s.node.output()
    );
}

/// A callback waiting out its receiver's `Retry-After` when the node stops is given up as
/// soon as that retry could not come before the stop: the conference's end, queued behind
/// it, still goes out, rather than being dropped when `webhook.shutdown_wait` runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_waiting_to_retry_at_a_stop_does_not_hold_up_the_conference_end() {
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = {
        let got = got.clone();
        axum::Router::new().route(
            "/events",
            axum::routing::post(
                move |axum::extract::Form(f): axum::extract::Form<HashMap<String, String>>| async move {
                    let event = f.get("StatusCallbackEvent").cloned().unwrap_or_default();
                    got.lock().expect("lock").push(event.clone());
                    if event == "participant-leave" {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            [("retry-after", "30")],
                        )
                            .into_response()
                    } else {
                        axum::http::StatusCode::NO_CONTENT.into_response()
                    }
                },
            ),
        )
    };
    let url = format!("http://{}/events", fixtures::serve_http(app).await);
    let mut s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_WEBHOOK__SHUTDOWN_WAIT", "5s"),
    ])
    .await;
    // The leave is refused, to be retried in 30 s; the end waits behind it.
    leave_then_stop(&mut s, "retrying", &url, &got).await;
}

/// A callback already being sent when the node begins to stop, to a receiver that holds it
/// open, is cut short when the stop leaves it no more time than the conference's end needs:
/// the end, queued behind it, still goes out before the exit (not dropped while the first
/// request runs out its own `webhook.timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_in_flight_at_a_stop_does_not_hold_up_the_conference_end() {
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = {
        let got = got.clone();
        axum::Router::new().route(
            "/events",
            axum::routing::post(
                move |axum::extract::Form(f): axum::extract::Form<HashMap<String, String>>| async move {
                    let event = f.get("StatusCallbackEvent").cloned().unwrap_or_default();
                    got.lock().expect("lock").push(event.clone());
                    if event == "participant-leave" {
                        // Holds the request open past the stop's whole wait.
                        tokio::time::sleep(Duration::from_secs(120)).await;
                    }
                    axum::http::StatusCode::NO_CONTENT
                },
            ),
        )
    };
    let url = format!("http://{}/events", fixtures::serve_http(app).await);
    let mut s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_WEBHOOK__TIMEOUT", "1m"),
        ("CONFROUTE_WEBHOOK__SHUTDOWN_WAIT", "5s"),
    ])
    .await;
    leave_then_stop(&mut s, "held-open", &url, &got).await;
}

/// The first caller of a conference placed here before a stop, arriving only once the drain
/// has found the node empty and it is stopping (its last callbacks still going out), is
/// refused: admitted, its conference would run on under an agent about to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_caller_arriving_as_the_node_stops_is_refused() {
    let dark = confroute_tests::harness::DarkPort::start().expect("dark port");
    let mut s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_WEBHOOK__TIMEOUT", "5m"),
        ("CONFROUTE_WEBHOOK__SHUTDOWN_WAIT", "5s"),
    ])
    .await;
    let store = fixtures::store(&s.cfg);
    let url = format!("http://{}/events", dark.addr());
    let a = dial(
        &s.sim,
        "first",
        &[
            ("CONFROUTE_STATUS_CALLBACK", url.as_str()),
            ("CONFROUTE_STATUS_CALLBACK_EVENT", "leave end"),
        ],
    )
    .await;
    wait_bridged(&s.sim, &a).await;
    // Placed here by a controller; its caller is slow to come.
    let late = ConferenceName::parse("late").expect("name");
    store
        .claim(&late, &[fixtures::id("node-a")])
        .await
        .expect("claim");
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    wait_draining(&s, &store).await;
    s.sim.hangup_far_end(&a, 16).await.expect("hangup");
    // The drain waits out the placement's grace, then stops: its callbacks hold the exit.
    wait_for_async("shutting down", Duration::from_secs(15), || async {
        (node_state(&store, "node-a").await == Some(NodeState::ShuttingDown)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let b = dial(&s.sim, "late", &[]).await;
    wait_hangup(&s.sim, &b).await;
    assert!(
        !s.sim
            .event_log()
            .iter()
            .any(|e| e["type"] == "ChannelEnteredBridge" && e["channel"]["id"] == b.as_str()),
        "the late caller never entered a bridge\n{}",
        s.node.output()
    );
    let code = s
        .node
        .process()
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert_eq!(code, Some(0), "{}", s.node.output());
}

/// A conference whose first caller arrives after an admin drain found the node empty (it was
/// placed just before the drain) is held to the drain's deadline, and past the deadline a
/// first caller is refused: a drained node does not host a conference for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conference_beginning_on_a_drained_node_is_held_to_the_drain_deadline() {
    let mut s = Single::start(&[
        ("CONFROUTE_NODE__DRAIN_DEADLINE", "6s"),
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
    ])
    .await;
    let store = fixtures::store(&s.cfg);
    // Placed here by a controller before the drain; their callers are slow to come.
    for name in ["late", "later"] {
        store
            .claim(
                &ConferenceName::parse(name).expect("name"),
                &[fixtures::id("node-a")],
            )
            .await
            .expect("claim");
    }
    let drained_at = Instant::now();
    let (status, body) = post(&format!("{}/v1/drain", s.node.http_url())).await;
    assert_eq!(status, 200, "{body}");
    s.node
        .wait_log("drained: no conference left", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let a = dial(&s.sim, "late", &[]).await;
    wait_bridged(&s.sim, &a).await;
    ended_at_the_deadline(&s, &a, drained_at, Duration::from_secs(6)).await;
    s.node
        .wait_log("a conference began on the drained node", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    // Past the deadline, a first caller is refused: its conference would be ended at once.
    let b = dial(&s.sim, "later", &[]).await;
    assert_eq!(wait_hangup(&s.sim, &b).await, 34, "{}", s.node.output());
    assert!(
        !s.sim
            .event_log()
            .iter()
            .any(|e| e["type"] == "ChannelEnteredBridge" && e["channel"]["id"] == b.as_str()),
        "the late caller never entered a bridge\n{}",
        s.node.output()
    );
    until(&s.sim, "bridges gone", |snap| snap.bridges.is_empty()).await;
    assert_eq!(
        node_state(&store, "node-a").await,
        Some(NodeState::Draining),
        "still drained"
    );
}

/// At a stop's drain deadline, hangups lost on their way to Asterisk (a connection dropped,
/// or closed for going past http.conf's `sessionlimit` under a storm of them) are asked again
/// before the agent exits: nothing would ask once it is gone, and those callers would stay
/// in Asterisk in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangups_lost_at_the_drain_deadline_are_asked_again_before_the_exit() {
    let mut s = Single::start(&[
        ("CONFROUTE_NODE__DRAIN_DEADLINE", "700ms"),
        ("CONFROUTE_ARI__REQUEST_TIMEOUT", "1s"),
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
    ])
    .await;
    let a = dial(&s.sim, "slow-end", &[]).await;
    wait_bridged(&s.sim, &a).await;
    let b = dial(&s.sim, "slow-end", &[]).await;
    wait_bridged(&s.sim, &b).await;
    s.sim.lose_operation("hangup");
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    // The deadline's hangups never reach Asterisk; the agent's requests time out.
    s.node
        .wait_log("cannot hang up participant", WAIT)
        .expect("the deadline's hangups time out");
    s.sim.deliver_operation("hangup");
    let code = s.node.process().wait_exit(WAIT * 2).expect("exits");
    assert_eq!(code, Some(0), "{}", s.node.output());
    let snap = s.sim.snapshot();
    for ch in [&a, &b] {
        assert!(
            snap.channel(ch).is_none(),
            "caller {ch} left in Asterisk\n{}",
            s.node.output()
        );
    }
}

/// Heartbeats this node renewed its record with, as its metrics count them.
async fn renewals(s: &Single) -> f64 {
    let text = fixtures::scrape(&s.node.http_url()).await;
    fixtures::metric(
        &text,
        "confroute_node_heartbeats_total{outcome=\"renewed\"}",
    )
}

/// Waits until two more heartbeats renewed the record: the second was sent after the
/// record changed, so the agent read its state there.
async fn two_heartbeats(s: &Single) {
    let from = renewals(s).await;
    wait_for_async("two heartbeats", WAIT, || async {
        (renewals(s).await >= from + 2.0).then_some(())
    })
    .await
    .expect("heartbeats");
}

/// The state field and its number in the node record.
fn numbered_state(s: &Single) -> (String, u64, String) {
    let reply = s
        .redis
        .query(
            redis::cmd("HMGET")
                .arg("{confroute}:node:node-a")
                .arg("state")
                .arg("state_seq")
                .arg("state_seq_state"),
        )
        .expect("hmget");
    let fields: Vec<Option<String>> = redis::from_redis_value(reply).expect("fields");
    let text = |i: usize| fields.get(i).cloned().flatten().unwrap_or_default();
    (text(0), text(1).parse().unwrap_or(0), text(2))
}

/// Puts the record back to `state` under number `seq`, as a replica that missed the writes
/// after it would hold it once promoted.
fn take_back(s: &Single, state: &str, seq: u64) {
    s.redis
        .query(
            redis::cmd("HSET")
                .arg("{confroute}:node:node-a")
                .arg("state")
                .arg(state)
                .arg("state_seq")
                .arg(seq)
                .arg("state_seq_state")
                .arg(state),
        )
        .expect("hset");
}

async fn agent_state(s: &Single) -> Value {
    get_json(&format!("{}/v1/conferences", s.node.http_url())).await["state"].clone()
}

/// A Redis failover to a replica that missed the node's last state write takes its record
/// back to an older state. That is not an admin's change: the agent saw its own state there
/// under a later number, so it writes it again, whether it drained itself or adopted an
/// admin's drain. A state written without a number (by a controller from before numbering)
/// is still adopted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_a_redis_failover_took_back_is_written_again() {
    let mut s = Single::start(&[]).await;
    two_heartbeats(&s).await;
    let (state, serving_seq, of) = numbered_state(&s);
    assert_eq!((state.as_str(), of.as_str()), ("serving", "serving"));
    assert!(serving_seq > 0, "the registration numbered the state");

    // The node's own drain, lost.
    let (status, body) = post(&format!("{}/v1/drain", s.node.http_url())).await;
    assert_eq!(status, 200, "{body}");
    let (state, drain_seq, _) = numbered_state(&s);
    assert_eq!(state, "draining");
    assert!(
        drain_seq > serving_seq,
        "numbered above: {drain_seq} {serving_seq}"
    );
    two_heartbeats(&s).await;
    take_back(&s, "serving", serving_seq);
    wait_for_async("the drain written again", WAIT, || async {
        (numbered_state(&s).0 == "draining").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert_eq!(agent_state(&s).await, "draining", "{}", s.node.output());
    s.node
        .wait_log("a failover lost a write", WAIT)
        .expect("the agent says why");

    // An admin's drain the agent adopted, lost.
    let (status, body) = post(&format!("{}/v1/undrain", s.node.http_url())).await;
    assert_eq!(status, 200, "{body}");
    two_heartbeats(&s).await;
    let (_, undrained_seq, _) = numbered_state(&s);
    let store = fixtures::store(&s.cfg);
    store
        .set_state(&fixtures::id("node-a"), NodeState::Draining)
        .await
        .expect("admin drain");
    wait_for_async("the agent adopts the admin's drain", WAIT, || async {
        (agent_state(&s).await == "draining").then_some(())
    })
    .await
    .expect("adopted");
    two_heartbeats(&s).await;
    take_back(&s, "serving", undrained_seq);
    wait_for_async("the admin's drain written again", WAIT, || async {
        (numbered_state(&s).0 == "draining").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert_eq!(agent_state(&s).await, "draining");

    // A failover takes the record back, and an admin undrains right after it: the undrain is
    // numbered above what the agent saw (Redis's clock), so it is the admin's, and stays.
    let (_, seen, _) = numbered_state(&s);
    take_back(&s, "serving", seen - 1);
    store
        .set_state(&fixtures::id("node-a"), NodeState::Serving)
        .await
        .expect("admin undrain");
    wait_for_async("the admin's undrain adopted", WAIT, || async {
        (agent_state(&s).await == "serving").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    two_heartbeats(&s).await;
    assert_eq!(numbered_state(&s).0, "serving", "{}", s.node.output());
    assert_eq!(agent_state(&s).await, "serving");

    // States a controller from before numbering writes are an admin's all the same, each
    // of them, whatever number the record kept from the last numbered write.
    for state in ["draining", "serving", "draining"] {
        s.redis
            .query(
                redis::cmd("HSET")
                    .arg("{confroute}:node:node-a")
                    .arg("state")
                    .arg(state),
            )
            .expect("hset");
        wait_for_async(&format!("the unnumbered {state} adopted"), WAIT, || async {
            (agent_state(&s).await == state).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
        two_heartbeats(&s).await;
        assert_eq!(numbered_state(&s).0, state, "{}", s.node.output());
        assert_eq!(agent_state(&s).await, state, "{}", s.node.output());
    }
}
