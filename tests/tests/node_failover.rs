//! Losing the agent or Asterisk: a killed agent's conference is re-homed on the next call
//! once its lease is gone; a restarted agent re-adopts what it still owns and cleans up the
//! rest; an Asterisk restart is survived by reconnecting and reconciling.

mod node_common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;

use confroute_shared::name::ConferenceName;
use confroute_shared::store::ClaimKind;
use confroute_tests::ari_sim::client::EventStream;
use confroute_tests::ari_sim::SimSnapshot;
use confroute_tests::fixtures::{self, metric, scrape};
use confroute_tests::harness::{wait_for_async, NodeProc, RedisServer};
use node_common::*;

fn name(s: &str) -> ConferenceName {
    ConferenceName::parse(s).expect("name")
}

/// An agent started again at once after a crash watches its last life's record for a while
/// (another live agent under the same id would renew it). A record with less lease left
/// than that watch used to expire during it, and for that moment a controller could place
/// the node's conferences elsewhere while their callers were still in its Asterisk. Now the
/// record is held through the watch: Redis never reports it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_holds_its_last_lives_record_while_it_checks_its_id() {
    let redis = RedisServer::start_with(&["--notify-keyspace-events", "Ex"]).expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    let client = redis::Client::open(redis.url()).expect("client");
    let mut expired = client.get_async_pubsub().await.expect("pubsub");
    expired
        .subscribe("__keyevent@0__:expired")
        .await
        .expect("subscribe");
    // The crashed life's record: a 900 ms lease, so a live agent would renew it every
    // 300 ms; the new agent watches two of those and half a second more, past its expiry.
    store
        .register(&fixtures::node("node-a", 10), Duration::from_millis(900))
        .await
        .expect("register");
    let sim_a = sim().await;
    let node_a = NodeProc::start("node-a", &env(&sim_a, &cfg, &[])).expect("node a");
    wait_app(&sim_a, &node_a).await;
    let rec = store
        .get_node(&fixtures::id("node-a"))
        .await
        .expect("read")
        .expect("registered");
    assert_eq!(
        rec.info.control,
        format!("http://127.0.0.1:{}", node_a.http_port),
        "the new life registered"
    );
    // A key of the test's own expires now: its notification shows expiries are heard, so
    // hearing none for the record means it did not expire.
    let set: Option<String> = confroute_tests::harness::redis_query(
        redis.port(),
        redis::cmd("SET").arg("control").arg("1").arg("PX").arg(100),
    );
    assert_eq!(set.as_deref(), Some("OK"));
    let mut messages = expired.on_message();
    let mut control_expired = false;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), messages.next()).await
    {
        let key: String = m.get_payload().unwrap_or_default();
        assert!(
            !key.ends_with("node:node-a"),
            "the node's record expired while its agent was starting again"
        );
        control_expired |= key == "control";
    }
    assert!(control_expired, "expiry notifications are heard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_conference_is_rehomed_on_the_next_call_after_the_lease() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    let sim_a = sim().await;
    let mut node_a = NodeProc::start("node-a", &env(&sim_a, &cfg, &[])).expect("node a");
    let sim_b = sim().await;
    let node_b = NodeProc::start("node-b", &env(&sim_b, &cfg, &[])).expect("node b");
    wait_app(&sim_a, &node_a).await;
    wait_app(&sim_b, &node_b).await;

    let first = dial(&sim_a, "phoenix", &[]).await;
    wait_bridged(&sim_a, &first).await;
    node_a.process().kill();
    // Before the lease runs out the claim still points at the dead node: b redirects.
    let early = dial(&sim_b, "phoenix", &[]).await;
    wait_request(&sim_b, "redirect", &format!("/ari/channels/{early}")).await;
    wait_for_async("node a's lease to expire", WAIT, || async {
        store
            .get_node(&fixtures::id("node-a"))
            .await
            .ok()
            .and_then(|n| n.is_none().then_some(()))
    })
    .await
    .expect("lease expired");
    let next = dial(&sim_b, "phoenix", &[]).await;
    assert_main(&wait_bridged(&sim_b, &next).await, 2, "phoenix");
    let rec = store
        .lookup(&name("phoenix"))
        .await
        .expect("lookup")
        .expect("claimed");
    assert_eq!(rec.owner.node.as_str(), "node-b");
    assert_eq!(rec.owner.epoch, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_readopts_its_conference_and_leaves_no_orphans() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    let sim = sim().await;
    let mut node = NodeProc::start("node-a", &env(&sim, &cfg, &[])).expect("node");
    wait_app(&sim, &node).await;
    let stays = dial(&sim, "keep", &[]).await;
    let kept = wait_bridged(&sim, &stays).await;
    let leaves = dial(&sim, "vanish", &[]).await;
    wait_bridged(&sim, &leaves).await;

    node.process().kill();
    until(&sim, "agent's socket gone", |s| s.websockets == 1).await;
    // While the agent is down, the only caller of "vanish" hangs up: its bridge stays in
    // Asterisk and its claim in Redis.
    sim.hangup_far_end(&leaves, 16).await.expect("hangup");
    assert!(main_bridge(&sim.snapshot(), 1, "vanish").is_some());
    assert!(store
        .lookup(&name("vanish"))
        .await
        .expect("lookup")
        .is_some());

    node.restart().expect("restart");
    wait_app(&sim, &node).await;
    until(&sim, "empty bridge destroyed", |s| {
        main_bridge(s, 1, "vanish").is_none()
    })
    .await;
    wait_for_async("stale claim released", WAIT, || async {
        store
            .lookup(&name("vanish"))
            .await
            .ok()
            .and_then(|r| r.is_none().then_some(()))
    })
    .await
    .expect("released");
    let rec = store
        .lookup(&name("keep"))
        .await
        .expect("lookup")
        .expect("kept");
    assert_eq!((rec.owner.node.as_str(), rec.owner.epoch), ("node-a", 1));
    wait_for_async("re-adopted", WAIT, || async {
        let v = get_json(&format!("{}/v1/conferences", node.http_url())).await;
        (v["items"][0]["conference"] == "keep"
            && v["items"][0]["participants"].as_array().map(Vec::len) == Some(1))
        .then_some(())
    })
    .await
    .expect("local view");

    // The re-adopted conference works as before: a new caller joins the same bridge, and
    // when everyone has left nothing remains anywhere.
    let late = dial(&sim, "keep", &[]).await;
    assert_eq!(wait_bridged(&sim, &late).await, kept);
    sim.hangup_far_end(&stays, 16).await.expect("hangup");
    sim.hangup_far_end(&late, 16).await.expect("hangup");
    until(&sim, "no bridges", |s| s.bridges.is_empty()).await;
    wait_for_async("no claims", WAIT, || async {
        let page = store.list_conferences(None, 100).await.ok()?;
        page.items.is_empty().then_some(())
    })
    .await
    .expect("nothing left in Redis");
}

/// The same check when the live agent beats less often than the newcomer (agents of one
/// cluster configured differently): it is still seen renewing its record, so the newcomer
/// refuses rather than taking the id over between two of its heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_agent_with_a_slower_heartbeat_still_keeps_its_node_id() {
    let s = Single::start(&[("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "1500ms")]).await;
    second_agent_is_refused(&s).await;
    // A record that does not say its lease (an older agent's): the whole remaining lease is
    // watched, which a live agent's renewal always falls within.
    let key = format!("{}node:node-a", s.cfg.prefix);
    let removed: Option<i64> = confroute_tests::harness::redis_query(
        s.redis.port(),
        redis::cmd("HDEL").arg(&key).arg("lease_period_ms"),
    );
    assert_eq!(removed, Some(1));
    second_agent_is_refused(&s).await;
}

/// Another Asterisk's agent, given node-a's id by mistake, refuses to start and leaves the
/// live agent's record as it was: placeable all along (its check does not mark the live
/// node's ARI down), and not taken over.
async fn second_agent_is_refused(s: &Single) {
    let store = fixtures::store(&s.cfg);
    let id = fixtures::id("node-a");
    let before = store.get_node(&id).await.expect("redis").expect("record");
    assert!(before.load.ari, "placeable before");
    let other = sim().await;
    let env = env(&other, &s.cfg, &[]);
    let second =
        tokio::task::spawn_blocking(move || NodeProc::start("node-a", &env).map(|p| p.output()));
    // Every few milliseconds while the second agent checks the id.
    let mut marked_down = 0;
    while !second.is_finished() {
        if let Ok(Some(rec)) = store.get_node(&id).await {
            if !rec.load.ari {
                marked_down += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let err = match second.await.expect("start attempt") {
        Ok(out) => panic!("a second agent started as node-a:\n{out}"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("node.id: node node-a is in use by another live agent"),
        "{err}"
    );
    assert_eq!(
        marked_down, 0,
        "the live node was shown out of placement during the second agent's check"
    );
    let after = store.get_node(&id).await.expect("redis").expect("record");
    assert_eq!(after.info.control, before.info.control, "record taken over");
}

/// The same refusal for an agent that could not read Redis at start-up and began without
/// the check: once Redis answers, the check finds the live agent and the newcomer exits
/// rather than run on beside it (answering its commands, holding its record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_that_starts_while_redis_is_away_exits_once_it_sees_the_live_one() {
    let s = Single::start(&[]).await;
    let store = fixtures::store(&s.cfg);
    let before = store
        .get_node(&fixtures::id("node-a"))
        .await
        .expect("redis")
        .expect("record");
    let upstream = format!("127.0.0.1:{}", s.redis.port())
        .parse()
        .expect("address");
    let proxy = confroute_tests::harness::TcpProxy::start(upstream)
        .await
        .expect("proxy");
    proxy.black_hole();
    let cfg = fixtures::single(&proxy.redis_url());
    let other = sim().await;
    let mut second = NodeProc::start(
        "node-a",
        &env(&other, &cfg, &[("CONFROUTE_REDIS__TIMEOUT", "300ms")]),
    )
    .expect("starts without the check");
    second
        .wait_log("cannot read this node's record", WAIT)
        .expect("the check postponed");
    proxy.heal();
    let code = second.process().wait_exit(WAIT).expect("exits");
    assert_eq!(code, Some(1), "{}", second.output());
    assert!(
        second
            .output()
            .contains("node.id: node node-a is in use by another live agent"),
        "{}",
        second.output()
    );
    let rec = store
        .get_node(&fixtures::id("node-a"))
        .await
        .expect("redis")
        .expect("the live agent's record");
    assert_eq!(rec.info.control, before.info.control, "record taken over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_under_a_live_agents_node_id_refuses_to_start_and_takes_nothing() {
    // A 3 s lease: the restart at the end must come while the record lives, on a loaded
    // machine too.
    let mut s = Single::start(&[("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "1s")]).await;
    let store = fixtures::store(&s.cfg);
    let caller = dial(&s.sim, "phoenix", &[]).await;
    let bridge = wait_bridged(&s.sim, &caller).await;
    second_agent_is_refused(&s).await;
    let rec = store
        .lookup(&name("phoenix"))
        .await
        .expect("lookup")
        .expect("claim kept");
    assert_eq!((rec.owner.node.as_str(), rec.owner.epoch), ("node-a", 1));
    let late = dial(&s.sim, "phoenix", &[]).await;
    assert_eq!(wait_bridged(&s.sim, &late).await, bridge);

    // A crashed agent's record is not renewed: the agent started again at once, while that
    // record still lives, takes the id back.
    s.node.process().kill();
    s.node.restart().expect("restarted under its own id");
    assert!(
        s.node
            .output()
            .contains("this node id has a live record: checking that no other agent renews it"),
        "the restart did not find the last life's record:\n{}",
        s.node.output()
    );
    wait_app(&s.sim, &s.node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asterisk_restart_is_survived_by_reconnecting_and_reconciling() {
    let s = Single::start(&[]).await;
    let store = fixtures::store(&s.cfg);
    let ch = dial(&s.sim, "through-restart", &[]).await;
    wait_bridged(&s.sim, &ch).await;
    s.sim
        .restart_with_downtime(Duration::from_millis(300))
        .await;
    wait_app(&s.sim, &s.node).await;
    // Asterisk lost the bridge and the caller: the conference ends and its claim goes.
    wait_for_async("claim released after the restart", WAIT, || async {
        store
            .lookup(&name("through-restart"))
            .await
            .ok()
            .and_then(|r| r.is_none().then_some(()))
    })
    .await
    .expect("released");
    // A new life of the name, above the epoch the last one ended with.
    let again = dial(&s.sim, "through-restart", &[]).await;
    assert_main(&wait_bridged(&s.sim, &again).await, 2, "through-restart");
    let m = scrape(&s.node.http_url()).await;
    assert!(metric(&m, "confroute_ari_reconnects_total") >= 1.0, "{m}");
    assert_eq!(metric(&m, "confroute_ari_connected"), 1.0);
}

/// A caller that reaches a conference after Asterisk restarted, before the reconciliation
/// came to that conference, is not admitted against what the conference was before: the
/// conference is compared with Asterisk first, found gone and ended, and the newcomer starts
/// a new one. Admitted into the old state, it skipped the wait for a start (the old
/// conference had started) and was hung up when the reconciliation then removed the
/// `endConferenceOnExit` caller the restart had taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_after_an_asterisk_restart_is_not_admitted_into_the_lost_conference() {
    const DONE: &str = "first reconciliation since the events connection opened is done";
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_ARI__RECONCILE_INTERVAL", "10m"),
    ])
    .await;
    let m = dial(&s.sim, "lost-life", &[("CONFROUTE_END_ON_EXIT", "true")]).await;
    wait_bridged(&s.sim, &m).await;
    let other = dial(&s.sim, "lost-life", &[]).await;
    wait_bridged(&s.sim, &other).await;
    let before = s.node.output().matches(DONE).count();
    // The reconciliation after the reconnect waits on its listing of bridges.
    s.sim.hold_operation("GET /bridges");
    s.sim
        .restart_with_downtime(Duration::from_millis(300))
        .await;
    wait_app(&s.sim, &s.node).await;
    wait_for_async("the reconciliation's listing to be asked", WAIT, || async {
        (s.sim.held_requests("GET /bridges") >= 1).then_some(())
    })
    .await
    .expect("listing asked");
    let b = dial(
        &s.sim,
        "lost-life",
        &[("CONFROUTE_START_ON_ENTER", "false")],
    )
    .await;
    // The newcomer's admission is under way before the listings go on, so it is queued
    // ahead of the reconciliation's message to the conference: it asks for a listing of
    // its own, or (admitted against the old state) has its answer.
    wait_for_async("the newcomer's admission under way", WAIT, || async {
        let answered = s
            .sim
            .snapshot()
            .channel(&b)
            .is_some_and(|c| c.state == "Up");
        (answered || s.sim.held_requests("GET /bridges") >= 2).then_some(())
    })
    .await
    .expect("admission under way");
    s.sim.release_operation("GET /bridges");
    let in_bridge = wait_bridged(&s.sim, &b).await;
    assert!(
        in_bridge.starts_with("crh-"),
        "the newcomer waits for a start in a new conference, not in {in_bridge}"
    );
    wait_for_async("the reconciliation done", WAIT, || async {
        (s.node.output().matches(DONE).count() > before).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let snap = s.sim.snapshot();
    assert!(
        snap.channel(&b)
            .is_some_and(|c| c.bridge.as_deref() == Some(in_bridge.as_str())),
        "the newcomer is still waiting: {:?}\n{}",
        snap.channel(&b),
        s.node.output()
    );
}

/// Newcomers of several live conferences arriving after a reconnect, before the
/// reconciliation, are compared with one listing of Asterisk's bridges, not one each: a
/// burst of callers after a reconnect does not multiply full listings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newcomers_after_a_reconnect_share_one_listing() {
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_ARI__RECONCILE_INTERVAL", "10m"),
    ])
    .await;
    let rooms = ["share-1", "share-2", "share-3"];
    for room in rooms {
        let a = dial(&s.sim, room, &[]).await;
        wait_bridged(&s.sim, &a).await;
    }
    let listings = |from: usize| {
        s.sim.request_log()[from..]
            .iter()
            .filter(|r| r.method == "GET" && r.path == "/ari/bridges")
            .count()
    };
    let from = s.sim.request_log().len();
    s.sim.hold_operation("GET /bridges");
    s.sim.drop_websockets();
    wait_for_async("the reconciliation's listing asked", WAIT, || async {
        (s.sim.held_requests("GET /bridges") >= 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let newcomers: Vec<String> =
        futures_util::future::join_all(rooms.iter().map(|room| dial(&s.sim, room, &[]))).await;
    wait_for_async("the first newcomer's listing asked", WAIT, || async {
        (s.sim.held_requests("GET /bridges") >= 2).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    s.sim.release_operation("GET /bridges");
    for ch in &newcomers {
        wait_bridged(&s.sim, ch).await;
    }
    assert_eq!(
        listings(from),
        2,
        "the reconciliation's listing and one shared by the newcomers\n{}",
        s.node.output()
    );
}

/// Asterisk serves its HTTP port before it is fully booted, answering every ARI request
/// (the events WebSocket's too) 503 "Asterisk not booted": the agent keeps trying, connects
/// once Asterisk is booted, finds the old conference gone and admits callers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asterisk_still_booting_is_waited_for() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let a = dial(&s.sim, "booting", &[]).await;
    wait_bridged(&s.sim, &a).await;
    s.sim.crash();
    s.sim.recover_booting();
    wait_for_async(
        "the events WebSocket refused while booting",
        WAIT,
        || async {
            s.sim
                .request_log()
                .iter()
                .any(|r| r.path == "/ari/events" && r.status == 503)
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert!(
        !s.sim.snapshot().apps.iter().any(|a| a.active),
        "no app is registered while Asterisk boots"
    );
    s.sim.finish_boot();
    wait_app(&s.sim, &s.node).await;
    let b = dial(&s.sim, "booting", &[]).await;
    assert_main(&wait_bridged(&s.sim, &b).await, 2, "booting");
    let m = scrape(&s.node.http_url()).await;
    assert_eq!(metric(&m, "confroute_ari_connected"), 1.0, "{m}");
}

/// An agent started again under its id keeps the claims its last life left while it cannot
/// yet look at what its Asterisk holds (its listing of channels is held here well past the
/// conference lease): they do not expire while their callers are still in the bridges, to
/// be placed on another node, and the conference is adopted under the same claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_left_by_the_last_life_outlive_a_slow_first_look() {
    let mut s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_REDIS__CONFERENCE_LEASE", "2s"),
    ])
    .await;
    let store = fixtures::store(&s.cfg);
    let a = dial(&s.sim, "kept", &[]).await;
    let bridge = wait_bridged(&s.sim, &a).await;
    let rec = store
        .lookup(&name("kept"))
        .await
        .expect("lookup")
        .expect("claimed");
    s.restart_with_channel_listing_held().await;
    // Three conference leases after the restart, the claim is still there.
    let until = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < until {
        let now = store.lookup(&name("kept")).await.expect("lookup");
        assert_eq!(
            now.as_ref().map(|r| &r.owner),
            Some(&rec.owner),
            "the claim lapsed while its caller is in the bridge\n{}",
            s.node.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.sim.release_operation("GET /channels");
    wait_listed(&s.node.http_url(), &a)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert_eq!(
        store
            .lookup(&name("kept"))
            .await
            .expect("lookup")
            .map(|r| r.owner),
        Some(rec.owner)
    );
    assert_eq!(
        s.sim.snapshot().channel(&a).and_then(|c| c.bridge.clone()),
        Some(bridge)
    );
}

/// Until its first reconciliation has adopted what the bridges still hold, a restarted
/// agent counts none of its last life's callers itself. It reports the load those claims
/// carry instead: reported as empty, a node at its participant limit drew new conferences
/// for the callers still in its bridges, and placement favoured it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_reports_its_last_lives_load_until_it_has_looked() {
    let mut s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_NODE__PARTICIPANT_CAPACITY", "2"),
    ])
    .await;
    let store = fixtures::store(&s.cfg);
    let id = fixtures::id("node-a");
    let a = dial(&s.sim, "full", &[]).await;
    wait_bridged(&s.sim, &a).await;
    let b = dial(&s.sim, "full", &[]).await;
    wait_bridged(&s.sim, &b).await;
    wait_for_async("two participants counted", WAIT, || async {
        let rec = store.get_node(&id).await.ok()??;
        (rec.load.participants == 2).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));

    s.restart_with_channel_listing_held().await;
    // Three heartbeats of the new life, all before its first look.
    let base = s.node.http_url();
    wait_for_async("three heartbeats after the restart", WAIT, || async {
        let m = scrape(&base).await;
        let renewed = metric(&m, "confroute_node_heartbeats_total{outcome=\"renewed\"}");
        (renewed >= 3.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let rec = store.get_node(&id).await.expect("read").expect("listed");
    assert_eq!(
        (rec.load.conferences, rec.load.participants, rec.load.ari),
        (1, 2, true),
        "{}",
        s.node.output()
    );
    let claim = store
        .claim(&name("another"), std::slice::from_ref(&id))
        .await
        .expect("claim");
    assert_eq!(claim.kind, ClaimKind::NoCapacity, "{claim:?}");

    // Once it has looked, its own count: the callers it adopted, and no more.
    s.sim.release_operation("GET /channels");
    wait_listed(&s.node.http_url(), &a)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    s.sim.hangup_far_end(&b, 16).await.expect("hangup");
    wait_for_async("one participant counted", WAIT, || async {
        let rec = store.get_node(&id).await.ok()??;
        (rec.load.participants == 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let claim = store.claim(&name("another"), &[id]).await.expect("claim");
    assert_eq!(claim.kind, ClaimKind::Claimed, "{claim:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_destroyed_behind_the_agents_back_ends_the_conference_cleanly() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let store = fixtures::store(&s.cfg);
    let a = dial(&s.sim, "yanked", &[]).await;
    let bridge = wait_bridged(&s.sim, &a).await;
    let other = confroute_tests::ari_sim::client::AriClient::new(&s.sim).expect("client");
    let r = other
        .call("DELETE", &format!("/bridges/{bridge}"), None)
        .await
        .expect("destroy");
    assert_eq!(r.status, 204);
    assert_eq!(
        wait_hangup(&s.sim, &a).await,
        16,
        "the participant is let go"
    );
    wait_for_async("claim released", WAIT, || async {
        store
            .lookup(&name("yanked"))
            .await
            .ok()
            .and_then(|r| r.is_none().then_some(()))
    })
    .await
    .expect("released");
    let again = dial(&s.sim, "yanked", &[]).await;
    assert_main(&wait_bridged(&s.sim, &again).await, 2, "yanked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_taken_out_of_their_bridge_behind_the_agents_back_are_put_back() {
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_ARI__RECONCILE_INTERVAL", "300ms"),
    ])
    .await;
    let other = confroute_tests::ari_sim::client::AriClient::new(&s.sim).expect("client");
    // A waiter's holding bridge destroyed by another ARI application: Asterisk leaves the
    // caller in the Stasis app, in no bridge. It is put back on hold with music.
    let waiter = dial(&s.sim, "put-back", &[("CONFROUTE_START_ON_ENTER", "false")]).await;
    let holding = wait_bridged(&s.sim, &waiter).await;
    assert!(is_holding(&holding, 1, "put-back"), "{holding}");
    let r = other
        .call("DELETE", &format!("/bridges/{holding}"), None)
        .await
        .expect("destroy");
    assert_eq!(r.status, 204);
    until(&s.sim, "the waiter in a new holding bridge", |snap| {
        snap.channel(&waiter)
            .and_then(|c| c.bridge.as_deref())
            .is_some_and(|b| b != holding && is_holding(b, 1, "put-back"))
    })
    .await;

    // A caller removed from the mixing bridge by another application: the next
    // reconciliation finds it in no bridge and puts it back.
    let a = dial(&s.sim, "put-back-2", &[]).await;
    let b = dial(&s.sim, "put-back-2", &[]).await;
    let main = wait_bridged(&s.sim, &a).await;
    assert_eq!(wait_bridged(&s.sim, &b).await, main);
    let r = other
        .call(
            "POST",
            &format!("/bridges/{main}/removeChannel?channel={b}"),
            None,
        )
        .await
        .expect("remove");
    assert_eq!(r.status, 204);
    until(&s.sim, "the removed caller back in the mix", |snap| {
        snap.channel(&b).and_then(|c| c.bridge.as_deref()) == Some(main.as_str())
    })
    .await;
    assert_eq!(
        s.sim.snapshot().channel(&a).and_then(|c| c.bridge.clone()),
        Some(main),
        "the other caller was never disturbed"
    );

    // The same for a chair (`endConferenceOnExit`): it never left, so the conference goes
    // on, with the same bridge, the other caller and the chair back in it.
    let chair = dial(&s.sim, "put-back-3", &[("CONFROUTE_END_ON_EXIT", "true")]).await;
    let main = wait_bridged(&s.sim, &chair).await;
    let member = dial(&s.sim, "put-back-3", &[]).await;
    assert_eq!(wait_bridged(&s.sim, &member).await, main);
    let r = other
        .call(
            "POST",
            &format!("/bridges/{main}/removeChannel?channel={chair}"),
            None,
        )
        .await
        .expect("remove");
    assert_eq!(r.status, 204);
    until(
        &s.sim,
        "the chair back in the conference's bridge",
        |snap| snap.channel(&chair).and_then(|c| c.bridge.as_deref()) == Some(main.as_str()),
    )
    .await;
    assert_eq!(
        s.sim
            .snapshot()
            .channel(&member)
            .and_then(|c| c.bridge.clone()),
        Some(main),
        "the conference did not end: the other caller is still in it"
    );
    // Put back as the participants they were: nobody left or joined again.
    let m = scrape(&s.node.http_url()).await;
    assert_eq!(
        fixtures::metric_opt(
            &m,
            r#"confroute_node_reconcile_actions_total{action="rejoined_channel"}"#
        ),
        Some(0.0),
        "{}",
        s.node.output()
    );
    assert_eq!(
        fixtures::metric_opt(&m, r#"confroute_node_leaves_total{reason="gone"}"#),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holding_bridge_destroyed_during_a_join_leaves_one_holding_bridge_with_every_waiter() {
    // Reconciliation far off: what it would tidy up is the join's to get right.
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let other = confroute_tests::ari_sim::client::AriClient::new(&s.sim).expect("client");
    let waits = [("CONFROUTE_START_ON_ENTER", "false")];
    let first = dial(&s.sim, "yanked-wait", &waits).await;
    let holding = wait_bridged(&s.sim, &first).await;
    assert!(is_holding(&holding, 1, "yanked-wait"), "{holding}");
    // The second waiter's addChannel is under way when another application destroys the
    // holding bridge: it is answered 404, and the BridgeDestroyed reaches the agent after.
    // Another waiter hangs up meanwhile, its end not yet seen by the agent: a list naming it
    // is refused whole, and the others must still be put back.
    let gone = dial(&s.sim, "yanked-wait", &waits).await;
    assert_eq!(wait_bridged(&s.sim, &gone).await, holding);
    s.sim.hold_operation("addChannel");
    let second = dial(&s.sim, "yanked-wait", &waits).await;
    until(&s.sim, "the second waiter's add under way", |_| {
        s.sim.held_requests("addChannel") == 1
    })
    .await;
    s.sim.hangup_far_end(&gone, 16).await.expect("hangs up");
    let r = other
        .call("DELETE", &format!("/bridges/{holding}"), None)
        .await
        .expect("destroy");
    assert_eq!(r.status, 204);
    s.sim.release_operation("addChannel");
    let together = |snap: &SimSnapshot| {
        let a = snap.channel(&first).and_then(|c| c.bridge.clone());
        let b = snap.channel(&second).and_then(|c| c.bridge.clone());
        a.is_some() && a == b
    };
    until(&s.sim, "both waiters in one holding bridge", together).await;
    let holdings = |snap: &SimSnapshot| {
        snap.bridges
            .iter()
            .filter(|b| is_holding(&b.id, 1, "yanked-wait"))
            .map(|b| (b.id.clone(), b.channels.len()))
            .collect::<Vec<_>>()
    };
    until(&s.sim, "no holding bridge but the waiters'", |snap| {
        together(snap) && holdings(snap).len() == 1
    })
    .await;
    let snap = s.sim.snapshot();
    let kept = snap.channel(&first).and_then(|c| c.bridge.clone());
    assert_ne!(kept.as_deref(), Some(holding.as_str()), "a new bridge");
    assert_eq!(holdings(&snap), vec![(kept.unwrap_or_default(), 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_bridge_of_an_earlier_lifetime_is_merged_not_taken_for_the_conference() {
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_ARI__RECONCILE_INTERVAL", "300ms"),
    ])
    .await;
    let store = fixtures::store(&s.cfg);
    let a = dial(&s.sim, "twice", &[]).await;
    let main = wait_bridged(&s.sim, &a).await;
    // A bridge an earlier lifetime of the conference could not destroy (Asterisk did not
    // answer its DELETE), listed after the live one.
    let other = confroute_tests::ari_sim::client::AriClient::new(&s.sim).expect("client");
    let leftover = "cr-1.00000000-twice";
    assert_ne!(main, leftover);
    let r = other
        .call("POST", &format!("/bridges/{leftover}?type=mixing"), None)
        .await
        .expect("create");
    assert_eq!(r.status, 200);
    until(&s.sim, "the leftover destroyed", |snap| {
        !snap.bridges.iter().any(|b| b.id == leftover)
    })
    .await;
    let snap = s.sim.snapshot();
    assert_eq!(
        snap.channel(&a).and_then(|c| c.bridge.clone()),
        Some(main.clone()),
        "the caller stayed in the live bridge"
    );
    let rec = store
        .lookup(&name("twice"))
        .await
        .expect("lookup")
        .expect("the conference is still claimed");
    assert_eq!(rec.participants, 1);
    // And the conference goes on there.
    let b = dial(&s.sim, "twice", &[]).await;
    assert_eq!(wait_bridged(&s.sim, &b).await, main);
}

/// An agent with one caller in `conf`, counted in Redis, drained by an admin; returns the
/// agent, a store, the caller, its bridge and the conference's record.
async fn a_caller_on_a_draining_node(
    conf: &str,
) -> (
    Single,
    confroute_shared::store::Store,
    String,
    String,
    confroute_shared::types::ConferenceRecord,
) {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let store = fixtures::store(&s.cfg);
    let a = dial(&s.sim, conf, &[]).await;
    let bridge = wait_bridged(&s.sim, &a).await;
    let rec = wait_for_async("the caller counted", WAIT, || async {
        let rec = store.lookup(&name(conf)).await.ok()??;
        (rec.participants == 1).then_some(rec)
    })
    .await
    .expect("counted");
    let drained = fixtures::http()
        .post(format!("{}/v1/drain", s.node.http_url()))
        .send()
        .await
        .expect("drain");
    assert!(drained.status().is_success());
    (s, store, a, bridge, rec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_claims_again_a_live_conference_whose_claim_vanished() {
    let (s, store, a, bridge, rec) = a_caller_on_a_draining_node("vanished").await;
    // The claim goes (a failover to a replica without it, or a release by mistake) while the
    // conference lives on the draining node: it must come back there, or the next caller
    // would be placed elsewhere and the conference would have two homes.
    assert!(store
        .release(&name("vanished"), &rec.owner)
        .await
        .expect("release"));
    let back = wait_for_async("the claim back on its node", WAIT, || async {
        store.lookup(&name("vanished")).await.ok()?
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert_eq!(back.owner.node.as_str(), "node-a");
    assert_eq!(
        s.sim.snapshot().channel(&a).and_then(|c| c.bridge.clone()),
        Some(bridge)
    );
}

/// An agent restarted on a draining node finds its conference's bridge, callers in it, and
/// its claim gone (a failover lost it): the claim script places nothing on a draining node,
/// so the agent claims it back at its bridge's epoch with the heartbeat, as it does for a
/// conference it never lost sight of. It used to keep the callers unclaimed, and the next
/// caller was placed on another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_draining_agent_claims_back_an_adopted_conference_whose_claim_vanished() {
    let (mut s, store, a, bridge, rec) = a_caller_on_a_draining_node("vanished-2").await;
    s.restart_with_channel_listing_held().await;
    assert!(store
        .release(&name("vanished-2"), &rec.owner)
        .await
        .expect("release"));
    s.sim.release_operation("GET /channels");
    let back = wait_for_async("the claim back on its node", WAIT, || async {
        store.lookup(&name("vanished-2")).await.ok()?
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert_eq!(back.owner, rec.owner, "back at its bridge's epoch");
    let node = store
        .get_node(&fixtures::id("node-a"))
        .await
        .expect("node")
        .expect("registered");
    assert_eq!(
        node.info.state,
        confroute_shared::types::NodeState::Draining
    );
    assert_eq!(
        s.sim.snapshot().channel(&a).and_then(|c| c.bridge.clone()),
        Some(bridge)
    );
}

/// Redis stalls just as a restarted agent asks it who owns a conference it found in
/// Asterisk, and answers again for the pass's next step. The pass used to take the
/// unanswered check for "not here" and release the live conference's claim as stale; now
/// it is incomplete, retried, and the conference adopted with its claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_stall_during_adoption_releases_no_claim_of_a_live_conference() {
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let store = fixtures::store(&s.cfg);
    let a = dial(&s.sim, "keep", &[]).await;
    wait_bridged(&s.sim, &a).await;
    // The restarted agent's first reconciliation waits for its bridge listing.
    s.node.process().kill();
    until(&s.sim, "agent's socket gone", |snap| snap.websockets == 1).await;
    s.sim.hold_operation("GET /bridges");
    s.node.restart().expect("restart");
    wait_app(&s.sim, &s.node).await;
    wait_for_async(
        "the reconciliation waiting for its bridges",
        WAIT,
        || async { (s.sim.held_requests("GET /bridges") > 0).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    // A script that keeps Redis busy for 900 ms: the agent's ownership check (500 ms
    // deadline) fails, and what it sends after that waits less than its deadline.
    let script = "local s = redis.call('TIME'); local t0 = s[1] * 1000000 + s[2]; \
        while true do local t = redis.call('TIME'); \
        if t[1] * 1000000 + t[2] - t0 > tonumber(ARGV[1]) then break end end return 1";
    let mut busy = std::net::TcpStream::connect(("127.0.0.1", s.redis.port())).expect("connect");
    let frame = format!(
        "*4\r\n$4\r\nEVAL\r\n${}\r\n{script}\r\n$1\r\n0\r\n$6\r\n900000\r\n",
        script.len()
    );
    std::io::Write::write_all(&mut busy, frame.as_bytes()).expect("send the script");
    s.sim.release_operation("GET /bridges");
    let url = s.node.http_url();
    wait_for_async("the conference adopted", WAIT, || async {
        let m = scrape(&url).await;
        (metric(
            &m,
            r#"confroute_node_reconcile_actions_total{action="adopted_conference"}"#,
        ) == 1.0)
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let m = scrape(&url).await;
    assert_eq!(
        fixtures::metric_opt(
            &m,
            r#"confroute_node_reconcile_actions_total{action="released_stale_claim"}"#
        ),
        Some(0.0),
        "{}",
        s.node.output()
    );
    let rec = store.lookup(&name("keep")).await.expect("lookup");
    assert_eq!(
        rec.map(|r| r.owner.node.as_str().to_string()),
        Some("node-a".into())
    );
    // The stall happened (the script ran its 900 ms) while the agent used Redis: a request
    // of its went unanswered past its deadline (the ownership check, the settings read after
    // it or a heartbeat, as timing on a loaded machine falls).
    let mut reply = [0u8; 64];
    let n = std::io::Read::read(&mut busy, &mut reply).expect("the script's reply");
    assert_eq!(&reply[..n], b":1\r\n", "the stalling script ran to its end");
    assert!(
        s.node.output().contains("timed out"),
        "the stall hit the agent's requests\n{}",
        s.node.output()
    );
    drop(busy);
}

/// With `redis.wait_replicas`, a claim no replica acknowledged stays marked unconfirmed: a
/// failover could still lose it. A caller reaching its node then is refused for now (503,
/// the edge may retry), as a controller's route is, and admitted once a replica has the claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_is_not_admitted_on_a_claim_no_replica_acknowledged() {
    let (primary, replica) = RedisServer::with_replica().expect("primary and replica");
    let cfg = fixtures::replicated(&primary.url());
    let store = fixtures::store(&cfg);
    let sim = sim().await;
    let node = NodeProc::start(
        "node-a",
        &env(&sim, &cfg, &[("CONFROUTE_CONFERENCE__BEEP", "false")]),
    )
    .expect("node starts");
    wait_app(&sim, &node).await;
    wait_for_async("the node placeable", WAIT, || async {
        let rec = store.get_node(&fixtures::id("node-a")).await.ok()??;
        rec.load.ari.then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    let pid = replica.pid().expect("replica pid") as libc::pid_t;
    // SAFETY: signals a child process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let placed = store.claim(&name("fresh"), &[fixtures::id("node-a")]).await;
    let a = dial(&sim, "fresh", &[]).await;
    let cause = wait_hangup(&sim, &a).await;
    // SAFETY: as above; resumed before any assertion can fail.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        matches!(
            placed,
            Err(confroute_shared::store::StoreError::NotReplicated { .. })
        ),
        "{placed:?}"
    );
    assert_eq!(cause, 34, "refused for now\n{}", node.output());
    let b = dial(&sim, "fresh", &[]).await;
    wait_bridged(&sim, &b).await;
    let rec = store.lookup(&name("fresh")).await.expect("lookup");
    assert_eq!(
        rec.map(|r| (r.owner.epoch, r.unconfirmed)),
        Some((1, false))
    );
}

/// A placement whose caller never comes is released by reconciliation, but only after it
/// has been stale for the grace a caller on its way gets (5 s), however many passes run
/// meanwhile (here one every 300 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_whose_caller_never_comes_is_released_by_reconciliation() {
    let s = Single::start(&[("CONFROUTE_ARI__RECONCILE_INTERVAL", "300ms")]).await;
    let store = fixtures::store(&s.cfg);
    let placed_at = std::time::Instant::now();
    let placed = store
        .claim(&name("no-show"), &[fixtures::id("node-a")])
        .await
        .expect("claim");
    assert_eq!(placed.kind, confroute_shared::store::ClaimKind::Claimed);
    // A caller that does come in time finds the placement and uses it.
    store
        .claim(&name("on-time"), &[fixtures::id("node-a")])
        .await
        .expect("claim");
    let ch = dial(&s.sim, "on-time", &[]).await;
    assert_main(&wait_bridged(&s.sim, &ch).await, 1, "on-time");
    wait_for_async("empty placement released", WAIT, || async {
        store
            .lookup(&name("no-show"))
            .await
            .ok()
            .and_then(|r| r.is_none().then_some(()))
    })
    .await
    .expect("released");
    assert!(
        placed_at.elapsed() >= Duration::from_secs(5),
        "released after {:?}, within the grace a caller on its way gets",
        placed_at.elapsed()
    );
    assert!(store
        .lookup(&name("on-time"))
        .await
        .expect("lookup")
        .is_some());
    let m = scrape(&s.node.http_url()).await;
    assert_eq!(
        metric(
            &m,
            r#"confroute_node_reconcile_actions_total{action="released_stale_claim"}"#
        ),
        1.0
    );
}

async fn http_status(url: &str) -> u16 {
    match fixtures::http().get(url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_client_subscribing_to_the_app_does_not_leave_the_agent_deaf() {
    // A slow first reconnect makes the agent's not-ready spell long enough to be seen.
    let s = Single::start(&[
        ("CONFROUTE_ARI__RECONNECT_MIN", "1s"),
        ("CONFROUTE_ARI__RECONNECT_MAX", "2s"),
    ])
    .await;
    let ready = format!("{}/readyz", s.node.http_url());
    assert_eq!(http_status(&ready).await, 200);

    // An operator debugs with their own events socket on the agent's app: Asterisk hands it
    // the app and sends the agent's socket nothing more.
    let mut operator = EventStream::connect(&s.sim.events_url("confroute"))
        .await
        .expect("operator connects");
    wait_for_async("the agent to report not ready", WAIT, || async {
        (http_status(&ready).await == 503).then_some(())
    })
    .await
    .expect("not ready while another client has the app");
    // The agent subscribes again and so takes the app back from the operator.
    operator
        .until(WAIT, |e| e["type"] == "ApplicationReplaced")
        .await
        .unwrap_or_else(|seen| panic!("the agent never took the app back: {seen:#?}"));
    wait_for_async("the agent to be ready again", WAIT, || async {
        (http_status(&ready).await == 200).then_some(())
    })
    .await
    .expect("ready again");

    // The operator goes away; the app stays with the agent and calls work.
    drop(operator);
    until(&s.sim, "operator's socket gone", |snap| {
        snap.websockets == 2 && snap.apps.iter().any(|a| a.name == "confroute" && a.active)
    })
    .await;
    let ch = dial(&s.sim, "after-debugging", &[]).await;
    wait_bridged(&s.sim, &ch).await;
    let m = scrape(&s.node.http_url()).await;
    assert!(metric(&m, "confroute_ari_reconnects_total") >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_bridge_destroyed_of_the_previous_lifetime_does_not_end_the_next() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let store = fixtures::store(&s.cfg);
    let a = dial(&s.sim, "again", &[]).await;
    let first = wait_bridged(&s.sim, &a).await;
    assert_main(&first, 1, "again");
    s.sim.hangup_far_end(&a, 16).await.expect("hangup");
    wait_for_async("the first lifetime's claim released", WAIT, || async {
        store
            .lookup(&name("again"))
            .await
            .ok()
            .and_then(|r| r.is_none().then_some(()))
    })
    .await
    .expect("released");
    // The conference starts again, above the epoch its first lifetime ended with, with a
    // bridge of its own.
    let b = dial(&s.sim, "again", &[]).await;
    let second = wait_bridged(&s.sim, &b).await;
    assert_main(&second, 2, "again");
    assert_ne!(first, second, "each lifetime has a bridge of its own");

    // A BridgeDestroyed for the first lifetime's bridge reaches the agent now (Asterisk only
    // sends it to an app following that bridge; here another client makes the agent's app
    // follow a bridge it creates under that id, then destroys it).
    let other = confroute_tests::ari_sim::client::AriClient::new(&s.sim).expect("client");
    for (method, path, want) in [
        ("POST", format!("/bridges/{first}?type=mixing"), 200),
        (
            "POST",
            format!("/applications/confroute/subscription?eventSource=bridge:{first}"),
            200,
        ),
        ("DELETE", format!("/bridges/{first}"), 204),
    ] {
        let r = other.call(method, &path, None).await.expect("ARI call");
        assert_eq!(r.status, want, "{method} {path}: {}", r.text);
    }
    s.sim
        .wait_for_event(WAIT, |e| {
            e["type"] == "BridgeDestroyed"
                && e["application"] == "confroute"
                && e["bridge"]["id"] == first.as_str()
        })
        .await
        .expect("the agent's app hears the old bridge destroyed");
    // A newcomer's join is handled after that event (events arrive in order): the second
    // lifetime's conference is still on, its first caller still in it.
    let c = dial(&s.sim, "again", &[]).await;
    assert_eq!(wait_bridged(&s.sim, &c).await, second);
    let snap = s.sim.snapshot();
    assert_eq!(
        snap.bridge(&second).map(|br| br.channels.clone()),
        Some(vec![b.clone(), c.clone()]),
        "the conference was not ended: {snap:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_reads_back_the_options_of_the_callers_it_adopts() {
    // ari.conf lists no channelvars: the options are only to be had by reading each one.
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let sim = sim_with(&[]).await;
    let extra = [("CONFROUTE_CONFERENCE__BEEP", "false")];
    let mut node = NodeProc::start("node-a", &env(&sim, &cfg, &extra)).expect("node");
    wait_app(&sim, &node).await;
    let muted = dial(&sim, "read-back", &[("CONFROUTE_MUTED", "true")]).await;
    let moderator = dial(&sim, "read-back", &[("CONFROUTE_END_ON_EXIT", "true")]).await;
    let other = dial(&sim, "read-back", &[]).await;
    for ch in [&muted, &moderator, &other] {
        wait_bridged(&sim, ch).await;
    }
    let url = format!("{}/v1/conferences", node.http_url());
    let joined_before = get_json(&url).await["items"][0]["participants"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["channel"] == other.as_str()))
        .and_then(|p| p["joined_ms"].as_u64())
        .expect("joined_ms");
    // Spacing, not synchronisation: the adoption comes well after the join.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    node.process().kill();
    until(&sim, "agent's socket gone", |s| s.websockets == 1).await;
    node.restart().expect("restart");
    wait_app(&sim, &node).await;
    let url = format!("{}/v1/conferences", node.http_url());
    let view = wait_for_async("participants re-adopted", WAIT, || async {
        let v = get_json(&url).await;
        let ps = v["items"][0]["participants"].as_array()?.clone();
        (ps.len() == 3).then_some(ps)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    let muted_of = |id: &str| {
        view.iter()
            .find(|p| p["channel"] == id)
            .map(|p| p["muted"].clone())
    };
    assert_eq!(muted_of(&muted), Some(serde_json::json!(true)), "{view:#?}");
    assert_eq!(
        muted_of(&other),
        Some(serde_json::json!(false)),
        "{view:#?}"
    );
    // When it joined is kept (from the channel's creation), not reset to the adoption.
    let joined_after = view
        .iter()
        .find(|p| p["channel"] == other.as_str())
        .and_then(|p| p["joined_ms"].as_u64())
        .expect("joined_ms");
    assert!(
        joined_after.abs_diff(joined_before) < 500,
        "joined {joined_before}, after the restart {joined_after}"
    );

    // The moderator still ends the conference as it leaves.
    sim.hangup_far_end(&moderator, 16).await.expect("hangup");
    assert_eq!(wait_hangup(&sim, &other).await, 16);
    assert_eq!(wait_hangup(&sim, &muted).await, 16);
}

/// A participant adopted with default options (Asterisk did not answer their reads) and
/// moved to another conference of the node before a reconciliation read them is read again
/// there: its `endConferenceOnExit` still ends the conference it was moved to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_an_adoption_could_not_read_are_read_after_a_move() {
    // ari.conf lists no channelvars: the adoption reads each caller's options.
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let sim = sim_with(&[]).await;
    let extra = [
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_ARI__REQUEST_TIMEOUT", "500ms"),
        ("CONFROUTE_ARI__RECONCILE_INTERVAL", "500ms"),
    ];
    let mut node = NodeProc::start("node-a", &env(&sim, &cfg, &extra)).expect("node");
    wait_app(&sim, &node).await;
    let moderator = dial(&sim, "moved-from", &[("CONFROUTE_END_ON_EXIT", "true")]).await;
    let stays = dial(&sim, "moved-from", &[]).await;
    let there = dial(&sim, "moved-to", &[]).await;
    for ch in [&moderator, &stays, &there] {
        wait_bridged(&sim, ch).await;
    }
    node.process().kill();
    until(&sim, "agent's socket gone", |s| s.websockets == 1).await;
    // Every read of the callers' options goes unanswered until the move is made.
    sim.hold_operation("getChannelVar");
    node.restart().expect("restart");
    wait_app(&sim, &node).await;
    let url = format!("{}/v1/conferences", node.http_url());
    wait_for_async("both conferences adopted", WAIT, || async {
        let v = get_json(&url).await;
        let n: usize = v["items"]
            .as_array()?
            .iter()
            .filter_map(|c| c["participants"].as_array().map(Vec::len))
            .sum();
        (n == 3).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    let bus = confroute_shared::bus::Bus::controller(fixtures::store(&cfg));
    assert!(bus.wait_connected(WAIT).await);
    let moved = bus
        .call(
            &fixtures::id("node-a"),
            "participant.move",
            serde_json::json!({"conference": "moved-from", "participant": moderator, "to": "moved-to", "to_node": "node-a"}),
            Duration::from_secs(5),
            false,
        )
        .await
        .unwrap_or_else(|e| panic!("moved: {e:?}\n{}", node.output()));
    let answer = moved.reply.expect("moved").to_string();
    assert!(answer.contains("bridge"), "{answer}");
    sim.release_operation("getChannelVar");
    // All three read at last, the moderator's in the conference it was moved to.
    let series = r#"confroute_node_reconcile_actions_total{action="read_adopted_options"}"#;
    wait_for_async("the options read at last", WAIT, || async {
        let text = scrape(&node.http_url()).await;
        (metric(&text, series) >= 3.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    sim.hangup_far_end(&moderator, 16).await.expect("hangup");
    assert_eq!(wait_hangup(&sim, &there).await, 16, "{}", node.output());
}

/// A caller hanging up while the restarted agent adopts its conference (reading the
/// callers' options) leaves it then, not at the next periodic reconciliation: its StasisEnd
/// came before the agent routed its channel anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_hanging_up_during_the_adoption_leaves_at_once() {
    // ari.conf lists no channelvars: the adoption reads each caller's options, which the
    // test holds up.
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let sim = sim_with(&[]).await;
    let extra = [
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        // Only the fix can take the caller out before the test ends.
        ("CONFROUTE_ARI__RECONCILE_INTERVAL", "10m"),
    ];
    let mut node = NodeProc::start("node-a", &env(&sim, &cfg, &extra)).expect("node");
    wait_app(&sim, &node).await;
    let leaving = dial(&sim, "adopting", &[]).await;
    let staying = dial(&sim, "adopting", &[]).await;
    for ch in [&leaving, &staying] {
        wait_bridged(&sim, ch).await;
    }
    node.process().kill();
    until(&sim, "agent's socket gone", |s| s.websockets == 1).await;
    sim.hold_operation("getChannelVar");
    node.restart().expect("restart");
    wait_for_async("the adoption reading options", WAIT, || async {
        (sim.held_requests("getChannelVar") > 0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    sim.hangup_far_end(&leaving, 16).await.expect("hangup");
    until(&sim, "the caller gone", |s| s.channel(&leaving).is_none()).await;
    sim.release_operation("getChannelVar");
    let url = format!("{}/v1/conferences", node.http_url());
    let listed = wait_for_async("only the caller still there listed", WAIT, || async {
        let v = get_json(&url).await;
        let ps = v["items"][0]["participants"].as_array()?.clone();
        let ids: Vec<&str> = ps.iter().filter_map(|p| p["channel"].as_str()).collect();
        (ids == [staying.as_str()]).then_some(())
    })
    .await;
    if let Err(e) = listed {
        panic!("{e}\n{}\n{}", get_json(&url).await, node.output());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_coming_before_the_restarted_agent_reconciles_joins_the_same_mix() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let sim = sim().await;
    let extra = [("CONFROUTE_CONFERENCE__BEEP", "false")];
    let mut node = NodeProc::start("node-a", &env(&sim, &cfg, &extra)).expect("node");
    wait_app(&sim, &node).await;
    let a = dial(&sim, "one-mix", &[("CONFROUTE_MUTED", "true")]).await;
    let bridge = wait_bridged(&sim, &a).await;
    node.process().kill();
    until(&sim, "agent's socket gone", |s| s.websockets == 1).await;

    // The restarted agent's first reconciliation waits in Asterisk (its listings are held),
    // so the next caller of the conference comes before it.
    sim.hold_operation("list");
    node.restart().expect("restart");
    wait_app(&sim, &node).await;
    let b = dial(&sim, "one-mix", &[]).await;
    wait_for_async(
        "the reconciliation's and the join's listings held",
        WAIT,
        || async { (sim.held_requests("list") >= 2).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    sim.release_operation("list");
    assert_eq!(wait_bridged(&sim, &b).await, bridge, "one mix, not two");
    let url = format!("{}/v1/conferences", node.http_url());
    let view = wait_for_async("both callers in the conference", WAIT, || async {
        let v = get_json(&url).await;
        let ps = v["items"][0]["participants"].as_array()?.clone();
        (ps.len() == 2).then_some(ps)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    assert!(
        view.iter()
            .any(|p| p["channel"] == a.as_str() && p["muted"] == true),
        "{view:#?}"
    );

    // The caller who was there first keeps the conference going after the newcomer leaves.
    sim.hangup_far_end(&b, 16).await.expect("hangup");
    wait_for_async("one participant left", WAIT, || async {
        let v = get_json(&url).await;
        (v["items"][0]["participants"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    assert_eq!(
        sim.snapshot().bridge(&bridge).map(|br| br.channels.clone()),
        Some(vec![a.clone()])
    );
    sim.hangup_far_end(&a, 16).await.expect("hangup");
    until(&sim, "no bridges", |s| s.bridges.is_empty()).await;
}

/// Ends conference `conf`: its chair (end-on-exit) hangs up while `other`, whose channel is
/// slow to act on the agent's hangup request, lingers in Stasis. Returns once the agent has
/// released the claim, destroyed the bridge and asked for `other`'s hangup.
async fn end_with_a_lingering_caller(s: &Single, conf: &str, chair: &str, other: &str) {
    s.sim.slow_hangup(other);
    end_by_its_chair(s, conf, chair).await;
    wait_request(&s.sim, "hangup", &format!("/ari/channels/{other}")).await;
    assert!(
        s.sim
            .snapshot()
            .channel(other)
            .is_some_and(|c| c.stasis_app.is_some()),
        "the caller lingers in Stasis until its hangup is carried out"
    );
}

/// After a full reconciliation that saw `other` lingering: the ended conference stayed
/// ended, then `other`'s hangup completes.
async fn assert_stays_ended(s: &Single, conf: &str, other: &str, created: usize) {
    let store = fixtures::store(&s.cfg);
    let m = scrape(&s.node.http_url()).await;
    for action in ["rejoined_channel", "adopted_conference"] {
        assert_eq!(
            fixtures::metric_opt(
                &m,
                &format!(r#"confroute_node_reconcile_actions_total{{action="{action}"}}"#)
            ),
            Some(0.0),
            "{action}\n{}",
            s.node.output()
        );
    }
    assert_eq!(ops(&s.sim, "createWithId"), created, "no bridge made again");
    assert!(store.lookup(&name(conf)).await.expect("lookup").is_none());
    assert!(
        s.sim.finish_hangup(other),
        "the agent asked for the hangup once"
    );
    wait_hangup(&s.sim, other).await;
    assert!(s.sim.snapshot().bridges.is_empty());
    assert!(store.lookup(&name(conf)).await.expect("lookup").is_none());
}

/// How many times the agent has listed the bridges (each reconciliation does, first).
fn bridge_listings(s: &Single) -> usize {
    s.sim
        .request_log()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/ari/bridges")
        .count()
}

/// Waits until the agent has listed the bridges `n` more times than `since`.
async fn wait_listings(s: &Single, since: usize, n: usize) {
    wait_for_async("reconciliations", WAIT, || async {
        (bridge_listings(s) >= since + n).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciliation_does_not_rejoin_a_caller_whose_hangup_is_under_way() {
    let (s, chair, other) = chaired_conference("wrap-up", &[]).await;
    end_with_a_lingering_caller(&s, "wrap-up", &chair, &other).await;
    // Asterisk answered the hangup request; the channel is still in Stasis, in no bridge.
    let created = ops(&s.sim, "createWithId");
    // The listing in progress may predate the end: wait for two that do not.
    wait_listings(&s, bridge_listings(&s), 3).await;
    assert_stays_ended(&s, "wrap-up", &other, created).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_taken_before_a_conference_ended_does_not_bring_it_back() {
    let (s, chair, other) = chaired_conference("stale-view", &[]).await;
    // A reconciliation has listed the bridges, the conference in them, and waits for its
    // channels listing while the conference ends.
    s.sim.hold_operation("GET /channels");
    wait_for_async(
        "a reconciliation waiting for its channels",
        WAIT,
        || async { (s.sim.held_requests("GET /channels") > 0).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    end_with_a_lingering_caller(&s, "stale-view", &chair, &other).await;
    let created = ops(&s.sim, "createWithId");
    let listed = bridge_listings(&s);
    s.sim.release_operation("GET /channels");
    // The next listing begins once the one that was held has been acted on.
    wait_listings(&s, listed, 1).await;
    assert_stays_ended(&s, "stale-view", &other, created).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_whose_hangup_request_failed_is_hung_up_at_the_next_reconciliation() {
    let (s, chair, other) =
        chaired_conference("no-silence", &[("CONFROUTE_ARI__REQUEST_TIMEOUT", "300ms")]).await;
    let store = fixtures::store(&s.cfg);
    // The conference ends while hangup requests are lost on the way to Asterisk: the
    // agent's request for the other caller times out and is never carried out.
    s.sim.lose_operation("hangup");
    end_by_its_chair(&s, "no-silence", &chair).await;
    s.sim.deliver_operation("hangup");
    // The caller sits in Stasis in no bridge: the reconciliation asks for its hangup again.
    assert_eq!(wait_hangup(&s.sim, &other).await, 16);
    let m = scrape(&s.node.http_url()).await;
    assert!(
        metric(
            &m,
            r#"confroute_node_reconcile_actions_total{action="hung_up_again"}"#
        ) >= 1.0
    );
    assert!(store
        .lookup(&name("no-silence"))
        .await
        .expect("lookup")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_whose_last_caller_left_during_the_restarts_listing_is_destroyed() {
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let a = dial(&s.sim, "last-one", &[]).await;
    wait_bridged(&s.sim, &a).await;
    // The restarted agent lists the bridges (the caller still in its conference's), and
    // the caller hangs up before the channels are listed.
    s.restart_with_channel_listing_held().await;
    s.sim.hangup_far_end(&a, 16).await.expect("hangup");
    s.sim.release_operation("GET /channels");
    until(&s.sim, "the conference's empty bridge destroyed", |snap| {
        snap.bridges.is_empty()
    })
    .await;
    wait_released(&s, "last-one").await;
}

/// The chair (end-on-exit) of `conf` hangs up; returns once the agent has released the
/// claim and Asterisk no longer has the bridge.
async fn end_by_its_chair(s: &Single, conf: &str, chair: &str) {
    s.sim.hangup_far_end(chair, 16).await.expect("hangup");
    wait_released(s, conf).await;
    until(&s.sim, "the bridge destroyed", |snap| {
        snap.bridges.is_empty()
    })
    .await;
}

/// An agent reconciling every 300 ms (with `extra` settings), and conference `conf` with
/// its chair (end-on-exit) and another caller; returns them.
async fn chaired_conference(conf: &str, extra: &[(&str, &str)]) -> (Single, String, String) {
    let mut settings = vec![
        ("CONFROUTE_ARI__RECONCILE_INTERVAL", "300ms"),
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
    ];
    settings.extend_from_slice(extra);
    let s = Single::start(&settings).await;
    let chair = dial(&s.sim, conf, &[("CONFROUTE_END_ON_EXIT", "true")]).await;
    wait_bridged(&s.sim, &chair).await;
    let other = dial(&s.sim, conf, &[]).await;
    wait_bridged(&s.sim, &other).await;
    (s, chair, other)
}

/// Waits until conference `conf` has no claim in Redis.
async fn wait_released(s: &Single, conf: &str) {
    let store = fixtures::store(&s.cfg);
    wait_for_async("the claim released", WAIT, || async {
        store
            .lookup(&name(conf))
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
}

/// An Asterisk restart drops its channels without a StasisEnd for any of them. The agent
/// forgets those channels once two reconciliations in a row no longer find them, so it does
/// not keep a route per caller for every restart it lives through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_an_asterisk_restart_dropped_are_forgotten() {
    const CALLERS: usize = 6;
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_ARI__RECONCILE_INTERVAL", "300ms"),
    ])
    .await;
    let tracked = || async {
        metric(
            &scrape(&s.node.http_url()).await,
            "confroute_node_tracked_channels",
        )
    };
    for i in 0..CALLERS {
        let ch = dial(&s.sim, &format!("dropped-{}", i % 2), &[]).await;
        wait_bridged(&s.sim, &ch).await;
    }
    assert_eq!(tracked().await, CALLERS as f64, "each caller is tracked");
    s.sim
        .restart_with_downtime(Duration::from_millis(300))
        .await;
    wait_app(&s.sim, &s.node).await;
    wait_for_async("the dropped callers forgotten", WAIT, || async {
        (tracked().await == 0.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let m = scrape(&s.node.http_url()).await;
    assert_eq!(
        metric(
            &m,
            "confroute_node_reconcile_actions_total{action=\"forgot_vanished_channel\"}"
        ),
        CALLERS as f64,
        "{m}"
    );
    // A caller after the restart is tracked as before.
    let ch = dial(&s.sim, "dropped-0", &[]).await;
    wait_bridged(&s.sim, &ch).await;
    assert_eq!(tracked().await, 1.0);
}

/// Count versions start at the agent's wall clock. One stepped back since an earlier life
/// (or a new host) would write counts below those that life left in Redis, which heartbeats
/// and releases on an older listing take for older: the agent keeps its versions above any
/// it finds in its own records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_versions_stay_above_those_an_earlier_life_left() {
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_ARI__RECONCILE_INTERVAL", "300ms"),
    ])
    .await;
    // About 70 years ahead in microseconds, below 2^53 (Lua reads numbers as doubles).
    let ahead: u64 = 4_000_000_000_000_000;
    // An earlier life's record, its count written with a clock far ahead; its bridge is gone,
    // so reconciliation releases it, having read it.
    s.redis
        .query(
            redis::cmd("HSET")
                .arg("{confroute}:conf:earlier-life")
                .arg("owner")
                .arg("node-a")
                .arg("epoch")
                .arg(1)
                .arg("participants")
                .arg(2)
                .arg("count_v")
                .arg(ahead),
        )
        .expect("hset");
    s.redis
        .query(
            redis::cmd("ZADD")
                .arg("{confroute}:confs")
                .arg(0)
                .arg("earlier-life"),
        )
        .expect("zadd");
    let store = fixtures::store(&s.cfg);
    wait_for_async("the earlier life's claim released", WAIT, || async {
        store
            .lookup(&name("earlier-life"))
            .await
            .ok()
            .and_then(|r| r.is_none().then_some(()))
    })
    .await
    .expect("released");
    let a = dial(&s.sim, "later-life", &[]).await;
    wait_bridged(&s.sim, &a).await;
    let written = || {
        s.redis
            .query(
                redis::cmd("HGET")
                    .arg("{confroute}:conf:later-life")
                    .arg("count_v"),
            )
            .and_then(|v| redis::from_redis_value::<u64>(v).ok())
    };
    assert!(
        written().is_some_and(|v| v > ahead),
        "count_v {:?} not above {ahead}",
        written()
    );
}

/// An agent that logs each command it hears, and a controller to send them through.
async fn agent_with_a_controller() -> (Single, confroute_tests::harness::ControllerProc) {
    let mut settings = vec![
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        // Says when a command is heard.
        ("CONFROUTE_LOG__LEVEL", "confroute_node::control=debug,info"),
    ];
    settings.extend_from_slice(node_common::control::DIALOUT_ENV);
    let s = Single::start(&settings).await;
    let controller = confroute_tests::harness::ControllerProc::start(&fixtures::redis_env(&s.cfg))
        .expect("controller");
    fixtures::wait_ready(&controller.http_url())
        .await
        .expect("controller ready");
    (s, controller)
}

/// Sends `method` through the controller on `port`, on a connection of its own; its answer.
fn call_apart(
    port: u16,
    method: &'static str,
    params: serde_json::Value,
) -> tokio::task::JoinHandle<serde_json::Value> {
    tokio::spawn(async move {
        let mut client = node_common::control::Client::connect(port).await;
        client.call(method, params).await
    })
}

/// The answer `call` gets, within [`WAIT`].
async fn answer(call: tokio::task::JoinHandle<serde_json::Value>) -> serde_json::Value {
    tokio::time::timeout(WAIT, call)
        .await
        .expect("answered")
        .expect("client task")
}

/// Waits until the agent has logged `n` commands heard (it is held or in line there).
async fn commands_heard(s: &Single, n: usize) {
    wait_for_async("the commands heard", WAIT, || async {
        (s.node.output().matches("command received").count() >= n).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
}

/// Restarts the agent with its first look at Asterisk held (its channel listing), and waits
/// until it hears commands.
async fn restart_before_the_first_look(s: &mut Single) {
    s.restart_with_channel_listing_held().await;
    s.node
        .wait_log("command bus subscribed", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
}

/// An agent with a controller and a caller in conference `kept`, restarted as
/// [`restart_before_the_first_look`] says; the caller's channel.
async fn kept_caller_before_the_first_look(
) -> (Single, confroute_tests::harness::ControllerProc, String) {
    let (mut s, controller) = agent_with_a_controller().await;
    let a = dial(&s.sim, "kept", &[]).await;
    wait_bridged(&s.sim, &a).await;
    restart_before_the_first_look(&mut s).await;
    (s, controller, a)
}

/// A command for a conference Asterisk still holds, reaching a restarted agent before it has
/// looked at what Asterisk holds, waits for that look and is carried out: answered "not
/// hosted" it would tell the application the conference had ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_before_the_restarted_agents_first_look_waits_for_the_adoption() {
    let (s, controller, _caller) = kept_caller_before_the_first_look().await;
    let port = controller.http_port;
    let listed = call_apart(
        port,
        "participant.list",
        serde_json::json!({"conference": "kept"}),
    );
    // The command is in line at the agent before its look ends.
    commands_heard(&s, 1).await;
    s.sim.release_operation("GET /channels");
    let v = answer(listed).await;
    let participants = v["result"]["participants"]
        .as_array()
        .unwrap_or_else(|| panic!("listed: {v}\n{}", s.node.output()));
    assert_eq!(participants.len(), 1, "{v}");
}

/// While a reconnected agent looks again at what Asterisk holds, a command held for a
/// conference it has no actor for does not hold up commands for the conferences it hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_command_does_not_hold_up_commands_for_hosted_conferences() {
    let (s, controller) = agent_with_a_controller().await;
    let a = dial(&s.sim, "live", &[]).await;
    wait_bridged(&s.sim, &a).await;
    // "ghost" is claimed for the node but nothing of it is here.
    let store = fixtures::store(&s.cfg);
    store
        .claim(&name("ghost"), &[fixtures::id("node-a")])
        .await
        .expect("claim");
    // The events WebSocket drops; the look after the reconnect waits for its channel list.
    s.sim.hold_operation("GET /channels");
    s.sim.drop_websockets();
    wait_for_async("the look waiting for its channels", WAIT, || async {
        (s.sim.held_requests("GET /channels") > 0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let port = controller.http_port;
    let ghost = call_apart(
        port,
        "participant.list",
        serde_json::json!({"conference": "ghost"}),
    );
    // The ghost's command is at the agent, held, before the next one is sent.
    commands_heard(&s, 1).await;
    let mut client = node_common::control::Client::connect(port).await;
    let listed = client
        .ok(
            "participant.list",
            serde_json::json!({"conference": "live"}),
        )
        .await;
    assert_eq!(
        listed["participants"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    assert!(
        !ghost.is_finished(),
        "the ghost's command waits for the look"
    );
    s.sim.release_operation("GET /channels");
    let v = answer(ghost).await;
    // Placed here, nobody in it: listed empty once looked.
    assert_eq!(
        v["result"]["participants"],
        serde_json::json!([]),
        "listed once looked: {v}"
    );
}

/// `conference.end` heard before a restarted agent's first look ends the conference once
/// it is adopted: before, it made an empty actor that found the claim counted and answered
/// "not hosted", and the callers stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_before_the_restarted_agents_first_look_ends_the_adopted_conference() {
    let (s, controller, a) = kept_caller_before_the_first_look().await;
    let port = controller.http_port;
    let ended = call_apart(
        port,
        "conference.end",
        serde_json::json!({"conference": "kept"}),
    );
    commands_heard(&s, 1).await;
    s.sim.release_operation("GET /channels");
    let v = answer(ended).await;
    assert!(v.get("result").is_some(), "ended: {v}\n{}", s.node.output());
    wait_hangup(&s.sim, &a).await;
}

/// A dial-out held behind another command for its conference before the first look still
/// brings its conference once the look is done (the other, a listing of a conference with
/// nothing here, lists no one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialout_held_behind_another_command_still_starts_its_conference() {
    let (mut s, controller) = agent_with_a_controller().await;
    let store = fixtures::store(&s.cfg);
    store
        .claim(&name("placed"), &[fixtures::id("node-a")])
        .await
        .expect("claim");
    restart_before_the_first_look(&mut s).await;
    let port = controller.http_port;
    let listed = call_apart(
        port,
        "participant.list",
        serde_json::json!({"conference": "placed"}),
    );
    commands_heard(&s, 1).await;
    let dialed = call_apart(
        port,
        "dialout",
        serde_json::json!({"conference": "placed", "to": "+15555550123"}),
    );
    commands_heard(&s, 2).await;
    s.sim.release_operation("GET /channels");
    let list = answer(listed).await;
    assert_eq!(
        list["result"]["participants"],
        serde_json::json!([]),
        "{list}"
    );
    let dial = answer(dialed).await;
    assert!(
        dial["result"]["callid"].is_string(),
        "{dial}\n{}",
        s.node.output()
    );
}

/// A newcomer reaching a restarted agent before its first look, whose own look for the
/// bridges a restart left fails (Asterisk slow past `ari.request_timeout`), is refused for
/// now (the edge may retry) rather than given a new bridge beside the callers' one: two
/// mixes of one conference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_whose_look_for_old_bridges_fails_is_refused_not_split_off() {
    let mut s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_ARI__REQUEST_TIMEOUT", "1s"),
    ])
    .await;
    let a = dial(&s.sim, "split", &[]).await;
    let bridge = wait_bridged(&s.sim, &a).await;
    s.restart_with_channel_listing_held().await;
    s.sim.hold_operation("GET /bridges");
    let c = dial(&s.sim, "split", &[]).await;
    assert_eq!(
        wait_hangup(&s.sim, &c).await,
        34,
        "refused for now\n{}",
        s.node.output()
    );
    s.sim.release_operation("GET /bridges");
    s.sim.release_operation("GET /channels");
    let snap = s.sim.snapshot();
    assert_eq!(snap.bridges.len(), 1, "one mix: {:?}", snap.bridges);
    assert_eq!(
        snap.channel(&a).and_then(|ch| ch.bridge.clone()),
        Some(bridge),
        "the caller stays in its bridge"
    );
}

/// An agent back after its conference was re-homed elsewhere adopts its callers still in
/// Asterisk as the life they were in (its bridge's epoch, lost to the new home), not as epoch
/// 0, and without the new home's settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_adopted_after_a_rehome_keeps_its_own_epoch() {
    orphan_after_a_rehome(false).await;
}

/// The orphan's node owns the conference again once the new home let it go and a caller
/// comes back to the orphan: from then on it is this node's life, with its callbacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_whose_node_owns_it_again_sends_its_callbacks() {
    orphan_after_a_rehome(true).await;
}

/// Conference `phoenix` re-homed from node a (killed) to node b, and node a back with its
/// first caller still in the old bridge: the orphan, lost. Its status callbacks (node a's
/// configuration) say nothing while node b holds the conference; with `again`, node b's
/// caller leaves, a caller comes back to node a, which owns it again, and they do.
async fn orphan_after_a_rehome(again: bool) {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    // Status callbacks of node a, the one the conference leaves.
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let hook = {
        let got = got.clone();
        let app = axum::Router::new().route(
            "/events",
            axum::routing::post(move |body: String| async move {
                got.lock().expect("lock").push(body);
                axum::http::StatusCode::NO_CONTENT
            }),
        );
        format!("http://{}/events", fixtures::serve_http(app).await)
    };
    let hooks = [
        ("CONFROUTE_CONFERENCE__STATUS_CALLBACK", hook.as_str()),
        (
            "CONFROUTE_CONFERENCE__STATUS_CALLBACK_EVENT",
            "[\"leave\", \"end\"]",
        ),
    ];
    let sim_a = sim().await;
    let mut node_a = NodeProc::start("node-a", &env(&sim_a, &cfg, &hooks)).expect("node a");
    let sim_b = sim().await;
    let node_b = NodeProc::start("node-b", &env(&sim_b, &cfg, &[])).expect("node b");
    wait_app(&sim_a, &node_a).await;
    wait_app(&sim_b, &node_b).await;
    let first = dial(&sim_a, "phoenix", &[]).await;
    wait_bridged(&sim_a, &first).await;
    node_a.process().kill();
    wait_for_async("node a's lease to expire", WAIT, || async {
        store
            .get_node(&fixtures::id("node-a"))
            .await
            .ok()
            .and_then(|n| n.is_none().then_some(()))
    })
    .await
    .expect("lease expired");
    let next = dial(&sim_b, "phoenix", &[("CONFROUTE_MAX_PARTICIPANTS", "7")]).await;
    wait_bridged(&sim_b, &next).await;
    node_a.restart().expect("restart");
    wait_app(&sim_a, &node_a).await;
    let url = format!("{}/v1/conferences", node_a.http_url());
    let view = wait_for_async("the orphan adopted", WAIT, || async {
        let v = fixtures::try_get_json(&url).await?;
        v["items"]
            .as_array()?
            .iter()
            .find(|c| c["conference"] == "phoenix")
            .cloned()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node_a.output()));
    assert_eq!(view["phase"], "lost", "{view}");
    assert_eq!(view["epoch"], 1, "the life its bridge was made in: {view}");

    let back = if again {
        sim_b.hangup_far_end(&next, 16).await.expect("hang up");
        wait_for_async("node b's claim released", WAIT, || async {
            store
                .lookup(&name("phoenix"))
                .await
                .ok()
                .and_then(|r| r.is_none().then_some(()))
        })
        .await
        .expect("released");
        let back = dial(&sim_a, "phoenix", &[]).await;
        wait_bridged(&sim_a, &back).await;
        let v = get_json(&url).await;
        assert_eq!(v["items"][0]["phase"], "active", "{v}");
        sim_a.hangup_far_end(&back, 16).await.expect("hang up");
        Some(back)
    } else {
        None
    };
    // What is left of it here ends with its caller, untold while node b holds the
    // conference: the application knows it by node b's ConferenceSid, and node b tells its
    // story.
    sim_a.hangup_far_end(&first, 16).await.expect("hang up");
    wait_for_async("the orphan ended", WAIT, || async {
        let v = fixtures::try_get_json(&url).await?;
        v["items"].as_array()?.is_empty().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node_a.output()));
    // A stop waits for the callbacks under way: once node a is gone, it has sent them all.
    node_a.process().signal(libc::SIGTERM).expect("sigterm");
    node_a
        .process()
        .wait_exit(Duration::from_secs(30))
        .expect("node a stops");
    let got = got.lock().expect("lock").clone();
    match back {
        None => assert_eq!(got, Vec::<String>::new(), "{}", node_a.output()),
        // Both leaves and the end, under one ConferenceSid.
        Some(back) => {
            assert_eq!(got.len(), 3, "{got:#?}\n{}", node_a.output());
            assert!(got[0].contains(&format!("CallSid={back}")), "{got:#?}");
            assert!(got[1].contains(&format!("CallSid={first}")), "{got:#?}");
            assert!(
                got[2].contains("StatusCallbackEvent=conference-end"),
                "{got:#?}"
            );
            let sid = |body: &str| {
                body.split('&')
                    .find(|kv| kv.starts_with("ConferenceSid="))
                    .map(str::to_string)
            };
            assert!(got.iter().all(|b| sid(b) == sid(&got[0])), "{got:#?}");
        }
    }
}

/// An agent restarted while its Asterisk answers REST but the events WebSocket cannot be
/// opened (another client holds the app, a proxy refuses the upgrade) keeps the last life's
/// claims past `ari.release_after`, as a running agent keeps its own: their callers may be
/// talking, and a claim left to lapse would give their conference a second home. Once REST
/// goes silent too, they are let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_without_its_websocket_keeps_the_last_lives_claims_while_rest_answers() {
    let mut s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_ARI__RELEASE_AFTER", "1s"),
        ("CONFROUTE_ARI__REQUEST_TIMEOUT", "300ms"),
        ("CONFROUTE_REDIS__CONFERENCE_LEASE", "1s"),
    ])
    .await;
    let store = fixtures::store(&s.cfg);
    let a = dial(&s.sim, "talking", &[]).await;
    wait_bridged(&s.sim, &a).await;
    let home = || async {
        store
            .lookup(&name("talking"))
            .await
            .ok()
            .flatten()
            .map(|r| r.owner.node.to_string())
    };
    assert_eq!(home().await.as_deref(), Some("node-a"));
    s.node.process().kill();
    until(&s.sim, "the agent's socket gone", |snap| {
        snap.websockets == 1
    })
    .await;
    s.sim.lose_operation("eventWebsocket");
    s.node.restart().expect("restart");
    wait_for_async("past release_after with REST answering", WAIT, || async {
        s.node
            .output()
            .contains("events WebSocket down past ari.release_after, but Asterisk answers REST")
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    // Three conference leases, each of which would have ended the claim unrenewed.
    let window = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < window {
        assert_eq!(
            home().await.as_deref(),
            Some("node-a"),
            "the last life's claim kept while REST answers\n{}",
            s.node.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.sim.lose_operation("ping");
    wait_for_async("the claim let go once REST is silent", WAIT, || async {
        home().await.is_none().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
}

/// The hangup asked again at a reconciliation needs only Asterisk: with Redis down as well
/// (the claims it would check unreadable), the caller left in silence is still hung up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_hangup_is_asked_again_while_redis_is_down() {
    let (mut s, chair, other) =
        chaired_conference("no-redis", &[("CONFROUTE_ARI__REQUEST_TIMEOUT", "300ms")]).await;
    s.sim.lose_operation("hangup");
    end_by_its_chair(&s, "no-redis", &chair).await;
    s.redis.kill();
    // Every pass from here on finds Redis down (one begun before it may have gone on).
    wait_listings(&s, bridge_listings(&s), 2).await;
    s.sim.deliver_operation("hangup");
    assert_eq!(wait_hangup(&s.sim, &other).await, 16, "{}", s.node.output());
    // By the reconciliation's ask, not a first request that came late.
    let m = scrape(&s.node.http_url()).await;
    assert!(
        metric(
            &m,
            r#"confroute_node_reconcile_actions_total{action="hung_up_again"}"#
        ) >= 1.0,
        "{}",
        s.node.output()
    );
}
