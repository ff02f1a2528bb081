//! Fencing (invariant 2) and Redis trouble (invariant 5) on the node: with Redis gone the
//! agent keeps its participants, refuses new joins and recovers by itself; a node that
//! finds its claim moved stops admitting, says so, and sends newcomers to the new owner.

mod node_common;

use std::time::Duration;

use confroute_shared::name::ConferenceName;
use confroute_tests::fixtures::{self, metric, scrape};
use confroute_tests::harness::wait_for_async;
use node_common::*;

fn name(s: &str) -> ConferenceName {
    ConferenceName::parse(s).expect("name")
}

/// Registers a live node-b, bridges a caller into `conference` on the node under test, then
/// gives the conference to node-b at epoch 2 in Redis (as a re-home would); returns the
/// caller's channel and bridge.
async fn caller_then_taken_over(s: &Single, conference: &str) -> (String, String) {
    fixtures::store(&s.cfg)
        .register(&fixtures::node("node-b", 10), Duration::from_secs(60))
        .await
        .expect("register b");
    let a = dial(&s.sim, conference, &[]).await;
    let bridge = wait_bridged(&s.sim, &a).await;
    assert_main(&bridge, 1, conference);
    s.redis
        .query(
            redis::cmd("HSET")
                .arg(format!("{{confroute}}:conf:{conference}"))
                .arg("owner")
                .arg("node-b")
                .arg("epoch")
                .arg(2),
        )
        .expect("hset");
    (a, bridge)
}

/// Waits until the node counted one ownership loss.
async fn loss_noticed(s: &Single) {
    wait_for_async("loss noticed", WAIT, || async {
        let m = scrape(&s.node.http_url()).await;
        (metric(&m, "confroute_node_ownership_losses_total") == 1.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
}

async fn status(url: &str) -> u16 {
    fixtures::http()
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_participants_refuses_joins_and_recovers() {
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let a = dial(&s.sim, "steady", &[]).await;
    let bridge = wait_bridged(&s.sim, &a).await;
    assert_main(&bridge, 1, "steady");
    let settling = |s: &Single| {
        s.redis
            .query(redis::cmd("PTTL").arg("{confroute}:settling"))
            .and_then(|v| redis::from_redis_value::<i64>(v).ok())
            .unwrap_or(-2)
    };
    assert_eq!(settling(&s), -2, "a first registration marks nothing");
    s.redis.kill();
    let ready = format!("{}/readyz", s.node.http_url());
    wait_for_async("readyz reports Redis down", WAIT, || async {
        (status(&ready).await == 503).then_some(())
    })
    .await
    .expect("not ready");
    assert_eq!(status(&format!("{}/healthz", s.node.http_url())).await, 200);

    let joiner = dial(&s.sim, "steady", &[]).await;
    assert_eq!(wait_hangup(&s.sim, &joiner).await, 34);
    let fresh = dial(&s.sim, "fresh", &[]).await;
    assert_eq!(wait_hangup(&s.sim, &fresh).await, 34);
    let snap = s.sim.snapshot();
    assert_eq!(
        snap.bridge(&bridge).expect("bridge").channels,
        vec![a.clone()],
        "the participant stays"
    );
    let m = scrape(&s.node.http_url()).await;
    assert_eq!(
        metric(
            &m,
            r#"confroute_node_joins_total{outcome="redis_unavailable"}"#
        ),
        2.0
    );

    // Redis comes back empty (no persistence): the node registers again and re-claims
    // the conference it hosts, by itself.
    s.redis.restart().expect("redis back");
    let store = fixtures::store(&s.cfg);
    wait_for_async("claim re-established", WAIT, || async {
        let rec = store.lookup(&name("steady")).await.ok().flatten()?;
        (rec.owner.node.as_str() == "node-a").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    // Registering again with no node live, the agent held back placements for its lease
    // (the mark lives 600 ms here: its log says it set it).
    s.node
        .wait_log("Redis lost its data", WAIT)
        .expect("settling mark set");
    wait_for_async("ready again", WAIT, || async {
        (status(&ready).await == 200).then_some(())
    })
    .await
    .expect("ready");
    let later = dial(&s.sim, "steady", &[]).await;
    assert_eq!(wait_bridged(&s.sim, &later).await, bridge);
}

/// A node whose heartbeats Redis refuses (out of memory) while its lookups still answer
/// admits nobody once its own record may have expired: controllers take it for dead then
/// and place the conference elsewhere at its next call. Writes allowed again, it registers
/// and admits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_record_lapsed_admits_nobody_while_lookups_still_answer() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let a = dial(&s.sim, "lapsed", &[]).await;
    let bridge = wait_bridged(&s.sim, &a).await;
    let maxmemory = |bytes: u64| {
        let ok: Option<String> = s
            .redis
            .query(redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(bytes))
            .and_then(|v| redis::from_redis_value(v).ok());
        assert_eq!(ok.as_deref(), Some("OK"));
    };
    // Out of memory: Redis refuses writes (heartbeats) and still answers reads (lookups).
    maxmemory(1);
    let store = fixtures::store(&s.cfg);
    wait_for_async("the node record expired", WAIT, || async {
        store
            .get_node(&fixtures::id("node-a"))
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let claim = store.lookup(&name("lapsed")).await.expect("lookups answer");
    assert_eq!(
        claim.map(|r| r.owner.node.as_str().to_string()).as_deref(),
        Some("node-a"),
        "the conference's claim outlives the node record"
    );
    let joiner = dial(&s.sim, "lapsed", &[]).await;
    assert_eq!(wait_hangup(&s.sim, &joiner).await, 34);
    assert_eq!(
        s.sim.snapshot().bridge(&bridge).expect("bridge").channels,
        vec![a.clone()],
        "the participant stays, nobody joins"
    );
    maxmemory(0);
    let ready = format!("{}/readyz", s.node.http_url());
    wait_for_async("registered again", WAIT, || async {
        (status(&ready).await == 200).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let again = dial(&s.sim, "lapsed", &[]).await;
    let joined = s
        .sim
        .wait_until(WAIT, |snap| {
            snap.channel(&again)
                .is_some_and(|c| c.bridge.as_deref() == Some(bridge.as_str()))
        })
        .await;
    assert!(joined, "not admitted again\n{}", s.node.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_claim_stops_admitting_and_says_so() {
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let store = fixtures::store(&s.cfg);
    // The claim moves to a live node b at a new epoch (as a re-home would do).
    let (a, bridge) = caller_then_taken_over(&s, "contested").await;
    loss_noticed(&s).await;
    s.node
        .wait_log("lost ownership of the conference", WAIT)
        .expect("loss logged");
    let v = get_json(&format!("{}/v1/conferences", s.node.http_url())).await;
    assert_eq!(v["items"][0]["phase"], "lost");
    // The participant already here stays; a newcomer is sent to node b.
    let newcomer = dial(&s.sim, "contested", &[]).await;
    wait_request(&s.sim, "redirect", &format!("/ari/channels/{newcomer}")).await;
    s.node
        .wait_log("sip:contested@node-b.test:5060", WAIT)
        .expect("redirect target logged");
    assert_eq!(
        s.sim.snapshot().bridge(&bridge).expect("bridge").channels,
        vec![a.clone()]
    );
    // When the last one leaves the bridge goes, but the claim is node b's to keep.
    s.sim.hangup_far_end(&a, 16).await.expect("hangup");
    until(&s.sim, "bridge gone", |snap| snap.bridges.is_empty()).await;
    let rec = store
        .lookup(&name("contested"))
        .await
        .expect("lookup")
        .expect("still claimed");
    assert_eq!((rec.owner.node.as_str(), rec.owner.epoch), ("node-b", 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_claim_ends_the_conference_at_once_when_configured() {
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_NODE__ON_OWNERSHIP_LOST", "end"),
    ])
    .await;
    let (a, _) = caller_then_taken_over(&s, "taken").await;
    assert_eq!(wait_hangup(&s.sim, &a).await, 16);
    until(&s.sim, "bridge gone", |snap| snap.bridges.is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_that_expired_with_the_node_record_come_back_with_its_registration() {
    // Redis away longer than both leases: the node's record and its conference's claim are
    // gone when Redis answers again, while the bridge still has its caller. A controller
    // that sees the node registered again places conferences again, so the claim must be
    // back with the registration, not a heartbeat (here 3 s) later.
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "3s"),
    ])
    .await;
    let a = dial(&s.sim, "kept", &[]).await;
    let bridge = wait_bridged(&s.sim, &a).await;
    assert_main(&bridge, 1, "kept");
    let store = fixtures::store(&s.cfg);
    s.redis
        .query(
            redis::cmd("DEL")
                .arg("{confroute}:node:node-a")
                .arg("{confroute}:conf:kept"),
        )
        .expect("del");
    let node_id = fixtures::id("node-a");
    wait_for_async("the node registered again", WAIT, || async {
        store.get_node(&node_id).await.ok().flatten().map(|_| ())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let rec = wait_for_async(
        "the claim back within 1 s of the registration",
        Duration::from_secs(1),
        || async { store.lookup(&name("kept")).await.ok().flatten() },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert_eq!((rec.owner.node.as_str(), rec.owner.epoch), ("node-a", 1));
    assert_eq!(rec.participants, 1);
    // The caller was never disturbed, and newcomers join the same bridge.
    let later = dial(&s.sim, "kept", &[]).await;
    assert_eq!(wait_bridged(&s.sim, &later).await, bridge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_won_back_at_the_same_epoch_is_renewed_by_heartbeats() {
    let lease = Duration::from_secs(2);
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_REDIS__CONFERENCE_LEASE", "2s"),
        ("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "400ms"),
    ])
    .await;
    let store = fixtures::store(&s.cfg);
    // Node b takes the conference over; node a's heartbeat finds its claim lost.
    let (_, bridge) = caller_then_taken_over(&s, "regained").await;
    loss_noticed(&s).await;
    // Node b's conference ends: the claim is released, so the next claim is at epoch 1
    // again, the epoch node a still has.
    s.redis
        .query(redis::cmd("DEL").arg("{confroute}:conf:regained"))
        .expect("del");
    let b = dial(&s.sim, "regained", &[]).await;
    assert_eq!(wait_bridged(&s.sim, &b).await, bridge);
    // For two leases the claim stays node a's, never lapsing in between (a claim that
    // lapsed and was taken again at epoch 1 would look the same at the end): its heartbeats
    // renew it. The length of the window is the scenario, not a wait.
    let until = tokio::time::Instant::now() + lease * 2 + Duration::from_millis(500);
    let mut rec = None;
    while tokio::time::Instant::now() < until {
        let now = store
            .lookup(&name("regained"))
            .await
            .expect("lookup")
            .unwrap_or_else(|| panic!("the claim lapsed\n{}", s.node.output()));
        assert_eq!((now.owner.node.as_str(), now.owner.epoch), ("node-a", 1));
        rec = Some(now);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rec = rec.expect("looked up");
    assert_eq!(rec.participants, 2);
    let v = get_json(&format!("{}/v1/conferences", s.node.http_url())).await;
    assert_eq!(v["items"][0]["phase"], "active", "{v}");
}

/// An agent finding Redis emptied marks the store settling for its whole lease, however long
/// its heartbeat: the other agents of its cluster renew within the same interval, and a
/// shorter mark would let their conferences be placed beside their live bridges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settling_mark_lasts_the_agents_whole_lease_past_ten_seconds() {
    // A 4 s heartbeat: a 12 s lease.
    let mut s = Single::start(&[("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "4s")]).await;
    s.redis.restart().expect("redis back, empty");
    let ttl = wait_for_async("the settling mark", Duration::from_secs(15), || async {
        let ttl: Option<i64> = confroute_tests::harness::redis_query(
            s.redis.port(),
            redis::cmd("PTTL").arg("{confroute}:settling"),
        );
        ttl.filter(|t| *t > 0)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert!(ttl > 10_000, "the mark lives the 12 s lease: {ttl} ms left");
}

/// A claim made anew for this same node at another epoch while its conference runs (given
/// back, then placed here again by a controller) is a new record without the conference's
/// settings: the agent writes them in again, and the count, or a restart would adopt the
/// conference with the configuration's defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_made_anew_here_at_another_epoch_gets_the_conference_settings_again() {
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "400ms"),
    ])
    .await;
    let store = fixtures::store(&s.cfg);
    let room = name("kept");
    let a = dial(&s.sim, "kept", &[("CONFROUTE_MAX_PARTICIPANTS", "7")]).await;
    wait_bridged(&s.sim, &a).await;
    let settings_kept = || async {
        store
            .conference_settings(&room)
            .await
            .ok()
            .flatten()
            .filter(|t| t.contains(r#""CONFROUTE_MAX_PARTICIPANTS":"7""#))
            .map(drop)
    };
    wait_for_async("settings kept", WAIT, settings_kept)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    // In one step, as claim.lua makes a new home: the record again, at epoch 2, with nothing
    // of the last one's.
    s.redis
        .query(
            redis::cmd("EVAL")
                .arg(
                    "redis.call('DEL', KEYS[1]) \
                     redis.call('HSET', KEYS[1], 'owner', 'node-a', 'epoch', 2, \
                       'participants', 0, 'created_ms', 1, 'updated_ms', 1) \
                     redis.call('PEXPIRE', KEYS[1], 10000) return 1",
                )
                .arg(1)
                .arg("{confroute}:conf:kept"),
        )
        .expect("eval");
    wait_for_async("settings written again", WAIT, settings_kept)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let rec = store.lookup(&room).await.expect("lookup").expect("record");
    assert_eq!((rec.owner.node.as_str(), rec.owner.epoch), ("node-a", 2));
    assert_eq!(rec.participants, 1);
}
