//! A node agent killed (SIGKILL) while it works on a command: the client hears "no answer"
//! (-32012: the command may have been carried out) within the controller's command deadline,
//! and the next command to that node fails at once as "node unavailable" (-32003: nobody
//! listens on its channel any more, so nothing was done).

mod node_common;

use std::time::{Duration, Instant};

use confroute_tests::harness::wait_for_async;
use node_common::control::*;
use node_common::*;
use serde_json::{json, Value};

/// `rpc.command_timeout` of the controllers here.
const DEADLINE: Duration = Duration::from_secs(2);

/// Restarts the agent of `owner` (Asterisk keeps the calls) and waits until it has adopted
/// `participants` callers of its one conference again.
async fn restart_and_readopt(c: &mut Cluster, owner: &str, participants: usize) {
    let node = c.node_mut(owner);
    node.proc.restart().expect("restart");
    wait_app(&node.sim, &node.proc).await;
    node.proc
        .wait_log("command bus subscribed", WAIT)
        .expect("the node hears commands");
    let url = format!("{}/v1/conferences", node.proc.http_url());
    wait_for_async("participants re-adopted", WAIT, || async {
        let v = get_json(&url).await;
        (v["items"][0]["participants"].as_array().map(Vec::len) == Some(participants)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
}

/// Waits until the settings Redis keeps for `conference` contain `needle`, so that an agent
/// restarted next finds them.
async fn wait_settings(c: &Cluster, conference: &str, needle: &str) {
    let store = confroute_tests::fixtures::store(&c.cfg);
    let room = confroute_shared::name::ConferenceName::parse(conference).expect("name");
    wait_for_async(
        &format!("{conference}'s settings to hold {needle}"),
        WAIT,
        || async {
            store
                .conference_settings(&room)
                .await
                .ok()
                .flatten()
                .filter(|s| s.contains(needle))
                .map(drop)
        },
    )
    .await
    .expect("settings kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_command_is_reported_unavailable_in_time() {
    let mut c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_LOG__LEVEL", "confroute_node::control=debug,info"),
            // Long enough that the stalled Asterisk, not the agent, holds the command.
            ("CONFROUTE_ARI__REQUEST_TIMEOUT", "20s"),
        ],
        &[("CONFROUTE_RPC__COMMAND_TIMEOUT", "2s")],
    )
    .await;
    let owner = c.route(1, "doomed").await;
    let a = {
        let sim = &c.node(&owner).sim;
        let a = dial(sim, "doomed", &[]).await;
        wait_bridged(sim, &a).await;
        a
    };
    let port = c.controllers[0].http_port;
    // Asterisk stops answering: the conference's actor waits inside the mute.
    c.node(&owner).sim.stall(Duration::from_secs(30));
    let started = Instant::now();
    let pending = tokio::spawn(async move {
        let mut ws = Client::connect(port).await;
        let v = ws
            .call(
                "participant.mute",
                json!({"conference": "doomed", "participant": a}),
            )
            .await;
        (v, Instant::now())
    });
    let node = c.node_mut(&owner);
    node.proc
        .wait_log("command received", WAIT)
        .expect("the node took the command");
    node.proc.process().kill();
    let (v, answered) = pending.await.expect("client task");
    assert_eq!(v["error"]["code"], -32012, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("did not answer")),
        "{v}"
    );
    let took = answered - started;
    assert!(
        took <= DEADLINE + Duration::from_millis(1500),
        "answered after {took:?}, deadline {DEADLINE:?}"
    );

    // Nobody listens for that node now: refused at once, long before the deadline.
    let mut ws = c.client(0).await;
    let t = Instant::now();
    let (code, msg) = ws
        .err("participant.list", json!({"conference": "doomed"}))
        .await;
    assert_eq!(code, -32003, "{msg}");
    assert!(t.elapsed() < DEADLINE, "{:?}", t.elapsed());
    assert!(msg.contains("not listening"), "{msg}");
}

/// A command reaches a node agent only after its sender gave up (the agent's process was
/// paused: SIGSTOP here, CPU throttling or a stalled VM in life). The client was told the
/// node did not answer; the command must not take effect afterwards. Both ends know Redis's
/// clock, so the agent sees how long the command was on its way and drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_reaches_a_paused_agent_after_its_deadline_is_not_carried_out() {
    let mut c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            // A lease (three heartbeats) that outlasts the pause: the node stays the owner.
            ("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "3s"),
            // What the agent made of the command, should this fail.
            (
                "CONFROUTE_LOG__LEVEL",
                "confroute_shared::bus=debug,confroute_node::control=debug,info",
            ),
        ],
        &[("CONFROUTE_RPC__COMMAND_TIMEOUT", "2s")],
    )
    .await;
    let owner = c.route(1, "paused").await;
    let a = {
        let sim = &c.node(&owner).sim;
        let a = dial(sim, "paused", &[]).await;
        wait_bridged(sim, &a).await;
        a
    };
    let mut ws = c.client(0).await;
    // In the bridge is not yet in the conference: the agent must have had its addChannel
    // answered, or the pause fails the join itself (its request times out across it).
    let deadline = Instant::now() + WAIT;
    loop {
        let v = ws
            .call("participant.list", json!({"conference": "paused"}))
            .await;
        if v["result"]["participants"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["id"] == a.as_str()))
        {
            break;
        }
        assert!(Instant::now() < deadline, "the caller never listed: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Only a command that says when it was sent can be told held on its way.
    c.wait_clocks_known().await;
    c.node(&owner).proc.process_ref().pause().expect("stop");
    let asked = Instant::now();
    let (code, msg) = ws
        .err(
            "participant.mute",
            json!({"conference": "paused", "participant": a}),
        )
        .await;
    let answered_after = asked.elapsed();
    c.node_mut(&owner)
        .proc
        .process()
        .signal(libc::SIGCONT)
        .expect("continue");
    assert_eq!(code, -32012, "{msg}");
    // Answered after the agent read everything it was sent while stopped.
    let v = ws
        .call("participant.list", json!({"conference": "paused"}))
        .await;
    let list = v.get("result").cloned().unwrap_or_else(|| {
        panic!(
            "participant.list failed: {v}\n{}",
            c.node(&owner).proc.output()
        )
    });
    let muted = list["participants"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["id"] == a.as_str()))
        .map(|p| p["muted"].clone());
    assert_eq!(
        muted,
        Some(json!(false)),
        "the mute reported unanswered ({msg}) was carried out later: {list}\n{}",
        c.node(&owner).proc.output()
    );
    let sim = &c.node(&owner).sim;
    assert!(
        !sim.request_log()
            .iter()
            .any(|r| r.operation.as_deref() == Some("mute")),
        "Asterisk was asked to mute; the client was answered ({msg}) after {answered_after:?}; \
         the agent logged:\n{}",
        c.node(&owner).proc.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_keeps_its_participants_options() {
    let mut c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(0, "kept-options").await;
    let (muted, moderator, other) = {
        let sim = &c.node(&owner).sim;
        let muted = dial(sim, "kept-options", &[("CONFROUTE_MUTED", "true")]).await;
        let moderator = dial(sim, "kept-options", &[("CONFROUTE_END_ON_EXIT", "true")]).await;
        let other = dial(sim, "kept-options", &[]).await;
        for ch in [&muted, &moderator, &other] {
            wait_bridged(sim, ch).await;
        }
        assert!(sim.snapshot().channel(&muted).expect("muted").muted_in);
        (muted, moderator, other)
    };
    // Call control hands the end-on-exit role from the moderator to the other caller.
    let mut ws = c.client(0).await;
    for (who, end) in [(&moderator, false), (&other, true)] {
        ws.ok(
            "participant.update",
            json!({"conference": "kept-options", "participant": who, "endConferenceOnExit": end}),
        )
        .await;
    }

    // The agent restarts; Asterisk keeps the calls, and the agent adopts them again.
    restart_and_readopt(&mut c, &owner, 3).await;

    let mut ws = c.client(0).await;
    let list = ws
        .ok("participant.list", json!({"conference": "kept-options"}))
        .await;
    let muted_of = |list: &serde_json::Value, id: &str| {
        list["participants"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["id"] == id))
            .map(|p| p["muted"].clone())
    };
    assert_eq!(muted_of(&list, &muted), Some(json!(true)), "{list}");
    assert_eq!(muted_of(&list, &other), Some(json!(false)), "{list}");
    ws.ok(
        "participant.unmute",
        json!({"conference": "kept-options", "participant": muted}),
    )
    .await;
    let sim = &c.node(&owner).sim;
    let snap = sim.snapshot();
    let ch = snap.channel(&muted).expect("still there");
    assert!(
        !ch.bridge_mute && !ch.muted_in,
        "really unmuted in Asterisk: {ch:#?}"
    );
    assert_eq!(
        ch.variables.get("CONFROUTE_MUTED").map(String::as_str),
        Some("false"),
        "the unmute is recorded for the next restart"
    );
    let list = ws
        .ok("participant.list", json!({"conference": "kept-options"}))
        .await;
    assert_eq!(muted_of(&list, &muted), Some(json!(false)), "{list}");

    // The roles call control gave survived the restart: the moderator leaves and the
    // conference goes on; the other caller leaves and it ends.
    sim.hangup_far_end(&moderator, 16).await.expect("hangup");
    let url = format!("{}/v1/conferences", c.node(&owner).proc.http_url());
    wait_for_async("the moderator gone, the others kept", WAIT, || async {
        let v = get_json(&url).await;
        (v["items"][0]["participants"].as_array().map(Vec::len) == Some(2)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    // The conference's listing comes after it has handled the moderator's leave: both
    // others still in, neither hung up (an end-on-exit would have begun there).
    let list = ws
        .ok("participant.list", json!({"conference": "kept-options"}))
        .await;
    let mut ids: Vec<&str> = list["participants"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["id"].as_str()).collect())
        .unwrap_or_default();
    ids.sort_unstable();
    let mut expected = [muted.as_str(), other.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected, "{list}");
    assert!(
        !sim.event_log()
            .iter()
            .any(|e| e["type"] == "ChannelDestroyed"
                && (e["channel"]["id"] == muted.as_str() || e["channel"]["id"] == other.as_str())),
        "the moderator's leave ended the conference\n{}",
        c.logs()
    );
    sim.hangup_far_end(&other, 16).await.expect("hangup");
    assert_eq!(wait_hangup(sim, &muted).await, 16);
}

/// A dial-out callee's options come from the dial-out, not from its channel's variables: the
/// originate sets them as those variables, so an agent that adopts the callee after a
/// restart keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_keeps_its_dial_out_callees_options() {
    let mut c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(0, "dialled").await;
    let caller = {
        let sim = &c.node(&owner).sim;
        let caller = dial(sim, "dialled", &[]).await;
        wait_bridged(sim, &caller).await;
        caller
    };
    let mut ws = c.client(0).await;
    let r = ws
        .ok(
            "dialout",
            json!({"conference": "dialled", "to": "+15555550101", "options": {"muted": true}}),
        )
        .await;
    let callee = r["callid"].as_str().expect("callid").to_string();
    let st = ws.statuses(&callee, "connected").await;
    assert_eq!(names(&st), ["accepted", "ringing", "connected"], "{st:?}");
    assert!(
        c.node(&owner)
            .sim
            .snapshot()
            .channel(&callee)
            .expect("callee")
            .muted_in,
        "options.muted applied"
    );

    restart_and_readopt(&mut c, &owner, 2).await;

    let mut ws = c.client(0).await;
    let list = ws
        .ok("participant.list", json!({"conference": "dialled"}))
        .await;
    let muted_of = |id: &str| {
        list["participants"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["id"] == id))
            .map(|p| p["muted"].clone())
    };
    assert_eq!(muted_of(&callee), Some(json!(true)), "{list}");
    assert_eq!(muted_of(&caller), Some(json!(false)), "{list}");
    let snap = c.node(&owner).sim.snapshot();
    assert!(
        snap.channel(&callee).expect("callee").muted_in,
        "still muted in Asterisk"
    );
}

/// A participant held through call control is still held, not waiting, once a restarted agent
/// adopts it from the holding bridge, and its unhold takes it back into the mix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_keeps_a_held_participant_held() {
    let mut c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(0, "held-over").await;
    let (a, b, main) = {
        let sim = &c.node(&owner).sim;
        let a = dial(sim, "held-over", &[]).await;
        let b = dial(sim, "held-over", &[]).await;
        let main = wait_bridged(sim, &a).await;
        wait_bridged(sim, &b).await;
        (a, b, main)
    };
    let mut ws = c.client(0).await;
    let who = json!({"conference": "held-over", "participant": b});
    ws.ok("participant.hold", who.clone()).await;
    let holding = main.replacen("cr-", "crh-", 1);
    until(&c.node(&owner).sim, "b on hold", |s| {
        s.channel(&b).and_then(|c| c.bridge.as_deref()) == Some(holding.as_str())
    })
    .await;

    restart_and_readopt(&mut c, &owner, 2).await;

    let mut ws = c.client(0).await;
    let list = ws
        .ok("participant.list", json!({"conference": "held-over"}))
        .await;
    let state_of = |id: &str| {
        list["participants"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["id"] == id))
            .map(|p| (p["held"].clone(), p["waiting"].clone()))
    };
    assert_eq!(state_of(&b), Some((json!(true), json!(false))), "{list}");
    assert_eq!(state_of(&a), Some((json!(false), json!(false))), "{list}");
    ws.ok("participant.unhold", who).await;
    until(&c.node(&owner).sim, "b back in the mix", |s| {
        s.channel(&b).and_then(|c| c.bridge.as_deref()) == Some(main.as_str())
    })
    .await;
}

/// A restarted agent that cannot read whether a participant it finds in the holding bridge
/// of a started conference is held (Asterisk does not answer its reads) keeps it on hold,
/// rather than put it into the mix against the hold; its unhold brings it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_participant_whose_mark_cannot_be_read_after_a_restart_stays_held() {
    let mut c = Cluster::start_tuned(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_ARI__REQUEST_TIMEOUT", "300ms"),
            ("CONFROUTE_ARI__RECONCILE_INTERVAL", "1s"),
        ],
        &[],
        // Every variable is read with getChannelVar, none comes in the snapshots.
        |sim| sim.channelvars.clear(),
    )
    .await;
    let owner = c.route(0, "unread-hold").await;
    let (b, w, h, main) = {
        let sim = &c.node(&owner).sim;
        let a = dial(sim, "unread-hold", &[]).await;
        let b = dial(sim, "unread-hold", &[]).await;
        let w = dial(sim, "unread-hold", &[]).await;
        let h = dial(sim, "unread-hold", &[]).await;
        let main = wait_bridged(sim, &a).await;
        wait_bridged(sim, &b).await;
        wait_bridged(sim, &w).await;
        wait_bridged(sim, &h).await;
        (b, w, h, main)
    };
    let mut ws = c.client(0).await;
    let who = |p: &str| json!({"conference": "unread-hold", "participant": p});
    ws.ok("participant.hold", who(&b)).await;
    ws.ok("participant.hold", who(&w)).await;
    ws.ok("participant.hold", who(&h)).await;
    let holding = main.replacen("cr-", "crh-", 1);
    let in_bridge = |s: &confroute_tests::ari_sim::SimSnapshot, ch: &str, bridge: &str| {
        s.channel(ch).and_then(|c| c.bridge.as_deref()) == Some(bridge)
    };
    until(&c.node(&owner).sim, "b, w and h on hold", |s| {
        in_bridge(s, &b, &holding) && in_bridge(s, &w, &holding) && in_bridge(s, &h, &holding)
    })
    .await;
    // w's mark says it is not held, as a waiter's does whose move into the started mix a
    // restart cut short.
    let other =
        confroute_tests::ari_sim::client::AriClient::new(&c.node(&owner).sim).expect("client");
    let r = other
        .call_raw(
            "POST",
            &format!("/channels/{w}/variable?variable=CONFROUTE_HELD&value=false"),
            None,
            true,
        )
        .await
        .expect("set the mark");
    assert_eq!(r.status, 204);
    // So does h's, which the application will hold again while its mark is unread.
    let r = other
        .call_raw(
            "POST",
            &format!("/channels/{h}/variable?variable=CONFROUTE_HELD&value=false"),
            None,
            true,
        )
        .await
        .expect("set the mark");
    assert_eq!(r.status, 204);

    let sim = c.node(&owner).sim.clone();
    sim.lose_operation("getChannelVar");
    restart_and_readopt(&mut c, &owner, 4).await;
    let url = format!("{}/v1/conferences", c.node(&owner).proc.http_url());
    let adopted = get_json(&url).await;
    let hold_of = |v: &Value, ch: &str| {
        v["items"][0]["participants"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["channel"] == ch))
            .map(|p| p["hold"].clone())
    };
    assert_eq!(hold_of(&adopted, &b), Some(json!(true)), "{adopted}");
    assert_eq!(hold_of(&adopted, &w), Some(json!(true)), "{adopted}");
    assert!(
        in_bridge(&sim.snapshot(), &b, &holding) && in_bridge(&sim.snapshot(), &w, &holding),
        "both kept out of the mix while their marks are unread\n{}",
        c.logs()
    );
    // The application holds h while its mark is unread: its word settles it.
    let mut ws = c.client(0).await;
    assert_eq!(ws.ok("participant.hold", who(&h)).await, json!({}));
    // The marks read at last: w joins the mix, b stays held, and h, whose mark the hold
    // wrote again, too.
    sim.deliver_operation("getChannelVar");
    until(&sim, "w in the mix", |s| in_bridge(s, &w, &main)).await;
    wait_for_async("w listed as not held", WAIT, || async {
        (hold_of(&get_json(&url).await, &w) == Some(json!(false))).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    c.node_mut(&owner)
        .proc
        .wait_log(
            &format!(
                "read an adopted participant's hold mark at last conference=unread-hold channel={b} held=true"
            ),
            WAIT,
        )
        .expect("b's mark read at last");
    assert!(in_bridge(&sim.snapshot(), &b, &holding), "b still on hold");
    assert!(
        in_bridge(&sim.snapshot(), &h, &holding),
        "h, held by the application, still on hold\n{}",
        c.logs()
    );
    assert_eq!(hold_of(&get_json(&url).await, &h), Some(json!(true)));
    ws.ok("participant.unhold", who(&b)).await;
    until(&sim, "b back in the mix", |s| in_bridge(s, &b, &main)).await;
}

/// A caller held in one conference and moved to another of the same node is not held there;
/// an agent that restarts while it waits for that conference's start must not take it for
/// held (its channel still said so), or the start would leave it with the music.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_caller_moved_to_a_waiting_conference_joins_its_start_after_a_restart() {
    let mut c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(0, "lobby").await;
    let waits = [("CONFROUTE_START_ON_ENTER", "false")];
    let (a, w) = {
        let sim = &c.node(&owner).sim;
        let a = dial(sim, "lobby", &waits).await;
        let w = dial(sim, "stage", &waits).await;
        wait_bridged(sim, &a).await;
        wait_bridged(sim, &w).await;
        (a, w)
    };
    let mut ws = c.client(0).await;
    ws.ok(
        "participant.hold",
        json!({"conference": "lobby", "participant": a}),
    )
    .await;
    let r = ws
        .ok(
            "participant.move",
            json!({"conference": "lobby", "participant": a, "to": "stage"}),
        )
        .await;
    assert_eq!(r["moved"], "bridge", "{r}");
    let list = ws
        .ok("participant.list", json!({"conference": "stage"}))
        .await;
    let held = list["participants"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["id"] == a.as_str()))
        .map(|p| p["held"].clone());
    assert_eq!(held, Some(json!(false)), "{list}");

    // Only "stage" is left (the lobby ended with its last caller); the agent restarts.
    restart_and_readopt(&mut c, &owner, 2).await;
    let sim = &c.node(&owner).sim;
    let starter = dial(sim, "stage", &[]).await;
    let main = wait_bridged(sim, &starter).await;
    until(sim, "both waiters in the mix", |s| {
        [&a, &w]
            .iter()
            .all(|ch| s.channel(ch).and_then(|c| c.bridge.as_deref()) == Some(main.as_str()))
    })
    .await;
}

/// With `conference.lone_starter_waits`, a started conference whose callers are all on hold
/// (all in the holding bridge, its mix empty) is not started a second time by a restarted
/// agent that adopts them: a held starter makes no start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_start_again_a_conference_whose_callers_are_all_held() {
    let mut c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_CONFERENCE__LONE_STARTER_WAITS", "true"),
        ],
        &[],
    )
    .await;
    let owner = c.route(0, "all-held").await;
    let (a, b) = {
        let sim = &c.node(&owner).sim;
        let a = dial(sim, "all-held", &[]).await;
        let b = dial(sim, "all-held", &[]).await;
        until(sim, "both mixed", |snap| {
            let bridge = |ch: &str| snap.channel(ch).and_then(|c| c.bridge.clone());
            bridge(&a).is_some() && bridge(&a) == bridge(&b)
        })
        .await;
        (a, b)
    };
    let mut ws = c.client(0).await;
    for who in [&a, &b] {
        ws.ok(
            "participant.hold",
            json!({"conference": "all-held", "participant": who}),
        )
        .await;
    }
    let mut watcher = c.client(1).await;
    watcher
        .ok("subscribe", json!({"conference": "all-held"}))
        .await;
    restart_and_readopt(&mut c, &owner, 2).await;
    let mut ws = c.client(0).await;
    ws.ok(
        "participant.unhold",
        json!({"conference": "all-held", "participant": b}),
    )
    .await;
    let events = watcher
        .events_until(|e| e["event"] == "unhold" && e["data"]["participant"] == b.as_str())
        .await;
    assert!(
        !events.iter().any(|e| e["event"] == "start"),
        "started again: {events:#?}"
    );
}

/// A restarted agent adopts a conference whose recording the last life started: ARI lists
/// no live recordings, so it cannot know that one is under way, and starts none beside it
/// when callers join. Once Asterisk ends that recording (the mix emptied: its only caller
/// put on hold), the conference records on in a new file as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_starts_no_second_recording_beside_the_last_lifes() {
    let mut c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(0, "rec-kept").await;
    let (a, main) = {
        let sim = &c.node(&owner).sim;
        let a = dial(
            sim,
            "rec-kept",
            &[("CONFROUTE_RECORD", "record-from-start")],
        )
        .await;
        let main = wait_bridged(sim, &a).await;
        sim.wait_for_event(WAIT, |e| e["type"] == "RecordingStarted")
            .await
            .expect("recording started");
        (a, main)
    };
    // The conference's settings (record-from-start) are in Redis for the next life.
    wait_settings(&c, "rec-kept", "record-from-start").await;
    restart_and_readopt(&mut c, &owner, 1).await;
    let sim = &c.node(&owner).sim;
    // Recordings started since event `from` (an event is logged once per application
    // that got it).
    let started = |from: usize| {
        sim.event_log()
            .iter()
            .skip(from)
            .filter(|e| e["type"] == "RecordingStarted")
            .filter_map(|e| e["recording"]["name"].as_str().map(str::to_string))
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let mark = sim.event_count();
    let b = dial(sim, "rec-kept", &[]).await;
    assert_eq!(wait_bridged(sim, &b).await, main);
    wait_listed(&c.node(&owner).proc.http_url(), &b)
        .await
        .expect("b in");
    assert_eq!(started(mark), 0, "the last life's recording goes on alone");
    // The join's addChannel was answered, and any recording it asked for with it: Asterisk
    // has exactly the one it had.
    let target = format!("bridge:{main}");
    let live: Vec<String> = sim
        .snapshot()
        .recordings
        .iter()
        .filter(|r| r.target_uri == target)
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(live.len(), 1, "one recording of the mix: {live:?}");

    // b leaves and a is held: the mix empties and Asterisk ends the recording.
    sim.hangup_far_end(&b, 16).await.expect("b leaves");
    let mut ws = c.client(0).await;
    let who = json!({"conference": "rec-kept", "participant": a});
    let mark = sim.event_count();
    assert_eq!(ws.ok("participant.hold", who.clone()).await, json!({}));
    sim.wait_for_event_after(mark, WAIT, |e| e["type"] == "RecordingFinished")
        .await
        .expect("the recording ended with the mix");
    assert_eq!(ws.ok("participant.unhold", who).await, json!({}));
    sim.wait_for_event_after(mark, WAIT, |e| e["type"] == "RecordingStarted")
        .await
        .expect("recording on in a new file");
    assert_eq!(started(mark), 1);
}

/// The conference's settings in Redis say which recording is under way, so a restarted agent
/// knows the last life's recording by name (ARI cannot list live recordings): ending the
/// conference, it stops that recording before the bridge goes, as the last life would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_knows_the_recording_under_way_and_stops_it_at_the_end() {
    let mut c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(0, "rec-known").await;
    let name = {
        let sim = &c.node(&owner).sim;
        let a = dial(
            sim,
            "rec-known",
            &[("CONFROUTE_RECORD", "record-from-start")],
        )
        .await;
        wait_bridged(sim, &a).await;
        let started = sim
            .wait_for_event(WAIT, |e| e["type"] == "RecordingStarted")
            .await
            .expect("recording started");
        started["recording"]["name"]
            .as_str()
            .expect("name")
            .to_string()
    };
    wait_settings(&c, "rec-known", &name).await;
    restart_and_readopt(&mut c, &owner, 1).await;
    let mut ws = c.client(0).await;
    ws.ok("conference.end", json!({"conference": "rec-known"}))
        .await;
    let sim = &c.node(&owner).sim;
    until(sim, "bridges gone", |snap| snap.bridges.is_empty()).await;
    let log = sim.request_log();
    let stop = format!("/ari/recordings/live/{name}/stop");
    let stopped = log.iter().position(|r| r.path == stop);
    let destroyed = log.iter().rposition(|r| {
        r.operation.as_deref() == Some("destroy") && r.path.starts_with("/ari/bridges/")
    });
    assert!(
        stopped.is_some() && stopped < destroyed,
        "the last life's recording stopped before the bridge went: {log:#?}"
    );
}

/// A started conference whose only caller is on hold has nobody in its mix. The settings in
/// Redis say it started, so an agent restarted then does not take it for one waiting for a
/// starter: taken off hold, the caller goes back into the mix. Before, it stayed with the
/// wait music, counted as waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_knows_a_conference_with_an_empty_mix_had_started() {
    let mut c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(0, "held-alone").await;
    let a = {
        let sim = &c.node(&owner).sim;
        let a = dial(sim, "held-alone", &[]).await;
        assert!(wait_bridged(sim, &a).await.starts_with("cr-"));
        a
    };
    let mut ws = c.client(0).await;
    let who = json!({"conference": "held-alone", "participant": a});
    assert_eq!(ws.ok("participant.hold", who.clone()).await, json!({}));
    until(&c.node(&owner).sim, "a on hold", |snap| {
        snap.channel(&a)
            .and_then(|ch| ch.bridge.as_deref())
            .is_some_and(|b| b.starts_with("crh-"))
    })
    .await;
    wait_settings(&c, "held-alone", r#""started":"1""#).await;
    restart_and_readopt(&mut c, &owner, 1).await;
    let mut ws = c.client(0).await;
    assert_eq!(ws.ok("participant.unhold", who).await, json!({}));
    until(&c.node(&owner).sim, "a back in the mix", |snap| {
        snap.channel(&a)
            .and_then(|ch| ch.bridge.as_deref())
            .is_some_and(|b| b.starts_with("cr-"))
    })
    .await;
    let list = ws
        .ok("participant.list", json!({"conference": "held-alone"}))
        .await;
    let p = &list["participants"][0];
    assert_eq!(
        (&p["waiting"], &p["held"]),
        (&json!(false), &json!(false)),
        "{list}"
    );
}
