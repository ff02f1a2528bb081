//! Conference events on the bus: a client subscribed on controller B sees every event of a
//! conference, in the order the node published them (`seq` rising by one), while the
//! commands that cause them go through controller A and callers come and go in Asterisk.

mod node_common;

use node_common::control::*;
use node_common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_on_another_controller_see_every_event_in_order() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let mut watcher = c.client(1).await;
    let r = watcher
        .ok("subscribe", json!({"conference": "events-1"}))
        .await;
    assert_eq!(r["subscribed"], "events-1");
    let owner = c.route(0, "events-1").await;
    let sim = &c.node(&owner).sim;
    let mut ctl = c.client(0).await;
    let who = |p: &str| json!({"conference": "events-1", "participant": p});

    let a = dial(sim, "events-1", &[]).await;
    wait_bridged(sim, &a).await;
    let b = dial(sim, "events-1", &[]).await;
    wait_bridged(sim, &b).await;
    ctl.ok("participant.mute", who(&a)).await;
    ctl.ok("participant.unmute", who(&a)).await;
    ctl.ok("participant.hold", who(&b)).await;
    assert_eq!(ctl.held_by("events-1", &b).await, json!(["api"]));
    ctl.ok("participant.unhold", who(&b)).await;
    assert_eq!(ctl.held_by("events-1", &b).await, json!([]));
    sim.caller_hold(&a, true).await.expect("caller holds");
    // The listing says who holds the call; an unhold lifts call control's hold only, so
    // here it changes nothing (and sends no event).
    let deadline = tokio::time::Instant::now() + WAIT;
    while ctl.held_by("events-1", &a).await != json!(["caller"]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the caller's hold never listed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    ctl.ok("participant.unhold", who(&a)).await;
    assert_eq!(ctl.held_by("events-1", &a).await, json!(["caller"]));
    sim.caller_hold(&a, false).await.expect("caller resumes");
    let r = ctl
        .ok(
            "dialout",
            json!({"conference": "events-1", "to": "+15555550199"}),
        )
        .await;
    let callee = r["callid"].as_str().expect("callid").to_string();
    ctl.statuses(&callee, "connected").await;
    ctl.ok("participant.kick", who(&callee)).await;
    sim.hangup_far_end(&b, 16).await.expect("b leaves");

    let events = watcher
        .events_until(|e| e["event"] == "leave" && e["data"]["participant"] == b.as_str())
        .await;
    let got: Vec<(String, Value)> = events
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap_or("").to_string(),
                e["data"]["participant"].clone(),
            )
        })
        .collect();
    let p = |s: &str| Value::String(s.to_string());
    assert_eq!(
        got,
        vec![
            ("join".to_string(), p(&a)),
            // a starts the conference (startConferenceOnEnter, the default); nobody waited.
            ("start".to_string(), Value::Null),
            ("join".to_string(), p(&b)),
            ("mute".to_string(), p(&a)),
            ("unmute".to_string(), p(&a)),
            ("hold".to_string(), p(&b)),
            ("unhold".to_string(), p(&b)),
            ("hold".to_string(), p(&a)),
            ("unhold".to_string(), p(&a)),
            ("join".to_string(), p(&callee)),
            ("leave".to_string(), p(&callee)),
            ("leave".to_string(), p(&b)),
        ],
        "{events:#?}"
    );
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=12).collect::<Vec<u64>>(), "{events:#?}");
    assert!(events
        .iter()
        .all(|e| e["conference"] == "events-1" && e["node"] == owner.as_str()));
    // Every event names the life it belongs to: the claim's epoch in Redis.
    let epoch: u64 = c
        .redis
        .query(
            redis::cmd("HGET")
                .arg(format!("{}conf:events-1", c.cfg.prefix))
                .arg("epoch"),
        )
        .and_then(|v| redis::from_redis_value::<String>(v).ok())
        .and_then(|v| v.parse().ok())
        .expect("epoch");
    assert!(
        events.iter().all(|e| e["epoch"] == json!(epoch)),
        "{epoch}: {events:#?}"
    );
    assert_eq!(events[1]["data"]["started_by"], a.as_str());
    assert_eq!(events[1]["data"]["no_longer_waiting"], json!([]));
    assert_eq!(events[5]["data"]["by"], "api");
    assert_eq!(events[7]["data"]["by"], "caller");
    assert_eq!(events[10]["data"]["reason"], "kicked");
    assert_eq!(events[11]["data"]["reason"], "hangup");

    // The claim moves to the other node (as a re-home would): owner_change.
    let other = c.other(&owner).id.clone();
    c.redis
        .query(
            redis::cmd("HSET")
                .arg(format!("{}conf:events-1", c.cfg.prefix))
                .arg("owner")
                .arg(&other)
                .arg("epoch")
                .arg(99),
        )
        .expect("hset");
    let more = watcher.events_until(|e| e["event"] == "owner_change").await;
    let change = more.last().expect("owner_change");
    assert_eq!(change["data"]["owner"], other.as_str(), "{more:#?}");
    assert_eq!(change["seq"], json!(13));
    assert_eq!(
        change["epoch"],
        json!(epoch),
        "the life that lost its claim"
    );

    // The last one out ends what is left of the conference here.
    sim.hangup_far_end(&a, 16).await.expect("a leaves");
    let rest = watcher.events_until(|e| e["event"] == "end").await;
    let tail: Vec<&str> = rest.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(tail, ["leave", "end"], "{rest:#?}");
    assert_eq!(rest[1]["seq"], json!(15));

    // Unsubscribed, nothing more arrives for it: the next conference's events only. A new
    // life of events-1 after the unsubscribe makes events; a second subscriber on the same
    // controller hears its join, so the first would have it queued before anything below.
    watcher
        .ok("unsubscribe", json!({"conference": "events-1"}))
        .await;
    let mut control = c.client(1).await;
    control
        .ok("subscribe", json!({"conference": "events-1"}))
        .await;
    let owner1 = c.route(0, "events-1").await;
    let again = dial(&c.node(&owner1).sim, "events-1", &[]).await;
    let heard = control
        .events_until(|e| e["event"] == "join" && e["data"]["participant"] == again.as_str())
        .await;
    assert_eq!(
        heard.last().map(|e| &e["conference"]),
        Some(&json!("events-1"))
    );
    watcher
        .ok("subscribe", json!({"conference": "events-2"}))
        .await;
    let owner2 = c.route(0, "events-2").await;
    let sim2 = &c.node(&owner2).sim;
    let w = dial(sim2, "events-2", &[("CONFROUTE_START_ON_ENTER", "false")]).await;
    let next = watcher.events_until(|e| e["event"] == "join").await;
    assert_eq!(next.len(), 1, "{next:#?}");
    assert_eq!(next[0]["conference"], "events-2");
    assert_eq!(next[0]["seq"], json!(1));
    assert_eq!(next[0]["data"]["waiting"], true, "{next:#?}");
    // The starter's join, then the start that takes the waiter into the mix.
    let x = dial(sim2, "events-2", &[]).await;
    wait_bridged(sim2, &x).await;
    let started = watcher.events_until(|e| e["event"] == "start").await;
    let kinds: Vec<&str> = started.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds, ["join", "start"], "{started:#?}");
    assert_eq!(started[1]["data"]["started_by"], x.as_str());
    assert_eq!(started[1]["data"]["no_longer_waiting"], json!([w]));
}

/// An agent restarted under a live conference adopts it at the same epoch; its events go on
/// numbering above those of its last life, so a subscriber ordering them by `seq` drops
/// none and sees the jump as the gap it is (events during the restart were never sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_seq_keeps_rising_across_an_agent_restart() {
    let mut c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let mut watcher = c.client(1).await;
    watcher
        .ok("subscribe", json!({"conference": "events-3"}))
        .await;
    let owner = c.route(0, "events-3").await;
    let a = dial(&c.node(&owner).sim, "events-3", &[]).await;
    wait_bridged(&c.node(&owner).sim, &a).await;
    let before = watcher.events_until(|e| e["event"] == "start").await;
    let last = before.last().cloned().unwrap_or_default();
    let (seq, epoch) = (last["seq"].as_u64().expect("seq"), last["epoch"].clone());
    {
        let n = c.node_mut(&owner);
        n.proc.process().kill();
        until(&n.sim, "agent's socket gone", |snap| snap.websockets == 1).await;
        n.proc.restart().expect("restart");
        wait_app(&n.sim, &n.proc).await;
    }
    let mut ctl = c.client(0).await;
    // Adopted: the command reaches the conference's actor once the agent has looked.
    ctl.ok(
        "participant.mute",
        json!({"conference": "events-3", "participant": a}),
    )
    .await;
    let after = watcher.events_until(|e| e["event"] == "mute").await;
    let mute = after.last().cloned().unwrap_or_default();
    assert_eq!(mute["epoch"], epoch, "the same life: {mute}");
    assert!(
        mute["seq"].as_u64().expect("seq") > seq,
        "seq {} after {seq} before the restart",
        mute["seq"]
    );
}
