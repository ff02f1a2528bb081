//! Dial-out through a controller to the node that hosts the conference, with the exact
//! `dialout.status` sequence of each outcome: answered, busy, no answer, answered then hung
//! up by the far end, called off while ringing; refusals (invalid number, full conference)
//! originate nothing.

mod node_common;

use std::time::{Duration, Instant};

use confroute_tests::ari_sim::{EndpointMatch, Outcome};
use confroute_tests::fixtures;
use confroute_tests::harness::wait_for_async;
use node_common::control::*;
use node_common::*;
use serde_json::{json, Value};

fn originates(sim: &TestSim) -> Vec<String> {
    sim.request_log()
        .into_iter()
        .filter(|r| r.operation.as_deref() == Some("originateWithId"))
        .map(|r| r.path)
        .collect()
}

/// A conference placed by controller B with one caller in it; `(node id, bridge id)`.
async fn room(c: &Cluster, name: &str, vars: &[(&str, &str)]) -> (String, String) {
    let owner = c.route(1, name).await;
    let sim = &c.node(&owner).sim;
    let caller = dial(sim, name, vars).await;
    let bridge = wait_bridged(sim, &caller).await;
    (owner, bridge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialout_outcomes_have_their_exact_status_sequences() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let (owner, bridge) = room(&c, "sales-1", &[]).await;
    let sim = &c.node(&owner).sim;
    let mut ws = c.client(0).await;

    // Answered: accepted, ringing, connected; the callee is in the bridge with its options.
    let r = ws
        .ok(
            "dialout",
            json!({"conference": "sales-1", "to": "+15555550101", "from": "\"Sales\" <+15550000>",
                   "options": {"muted": true}}),
        )
        .await;
    let callid = r["callid"].as_str().expect("callid").to_string();
    let st = ws.statuses(&callid, "connected").await;
    assert_eq!(names(&st), ["accepted", "ringing", "connected"], "{st:?}");
    let snap = sim.snapshot();
    let callee = snap
        .channel(&callid)
        .expect("the callee's channel has the call id");
    assert_eq!(callee.bridge.as_deref(), Some(bridge.as_str()));
    assert!(
        callee.muted_in && !callee.bridge_mute,
        "options.muted applied"
    );
    assert_eq!(callee.caller_number, "+15550000");
    assert_eq!(
        originates(sim),
        vec![format!("/ari/channels/{callid}")],
        "originateWithId with the call id"
    );
    let list = ws
        .ok("participant.list", json!({"conference": "sales-1"}))
        .await;
    assert!(
        list["participants"]
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p["id"] == callid.as_str())),
        "{list}"
    );
    // The far end hangs up: cleared, with the cause.
    sim.hangup_far_end(&callid, 16).await.expect("hang up");
    let st = ws.statuses(&callid, "cleared").await;
    assert_eq!(
        st,
        vec![json!({"callid": callid, "status": "cleared", "cause": 16})]
    );

    // Busy: rejected 486 (Q.850 17), never ringing.
    sim.set_originate_behavior(
        EndpointMatch::exact("PJSIP/+15555550102@trunk"),
        Outcome::Busy,
    );
    let r = ws
        .ok(
            "dialout",
            json!({"conference": "sales-1", "to": "+15555550102"}),
        )
        .await;
    let busy = r["callid"].as_str().expect("callid").to_string();
    let st = ws.statuses(&busy, "rejected").await;
    assert_eq!(
        st,
        vec![
            json!({"callid": busy, "status": "accepted"}),
            json!({"callid": busy, "status": "rejected", "code": 486, "cause": 17}),
        ]
    );

    // No answer: rings until the timeout, then rejected 480 (Q.850 19).
    sim.set_originate_behavior(
        EndpointMatch::exact("PJSIP/+15555550103@trunk"),
        Outcome::NoAnswer,
    );
    let started = Instant::now();
    let r = ws
        .ok(
            "dialout",
            json!({"conference": "sales-1", "to": "+15555550103", "timeout": 1}),
        )
        .await;
    let silent = r["callid"].as_str().expect("callid").to_string();
    let st = ws.statuses(&silent, "rejected").await;
    assert_eq!(names(&st), ["accepted", "ringing", "rejected"], "{st:?}");
    assert_eq!(
        st[2],
        json!({"callid": silent, "status": "rejected", "code": 480, "cause": 19})
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "rejected only after the 1 s timeout ({:?})",
        started.elapsed()
    );

    // Congestion: rejected 503.
    sim.set_originate_behavior(
        EndpointMatch::exact("PJSIP/+15555550104@trunk"),
        Outcome::Congested,
    );
    let r = ws
        .ok(
            "dialout",
            json!({"conference": "sales-1", "to": "+15555550104"}),
        )
        .await;
    let congested = r["callid"].as_str().expect("callid").to_string();
    let st = ws.statuses(&congested, "rejected").await;
    assert_eq!(
        st.last().map(|p| p["code"].clone()),
        Some(json!(503)),
        "{st:?}"
    );

    // A SIP URI goes through the SIP dial string.
    let r = ws
        .ok(
            "dialout",
            json!({"conference": "sales-1", "to": "sip:alice@example.com"}),
        )
        .await;
    let sip = r["callid"].as_str().expect("callid").to_string();
    assert_eq!(
        names(&ws.statuses(&sip, "connected").await),
        ["accepted", "ringing", "connected"]
    );
    let snap = sim.snapshot();
    assert!(
        snap.channel(&sip)
            .is_some_and(|c| c.name.starts_with("PJSIP/trunk")),
        "{snap:#?}"
    );

    // Called off while ringing: kicked (its call id) → rejected 487 (Q.850 16).
    sim.set_originate_behavior(
        EndpointMatch::exact("PJSIP/+15555550105@trunk"),
        Outcome::Manual,
    );
    let r = ws
        .ok(
            "dialout",
            json!({"conference": "sales-1", "to": "+15555550105"}),
        )
        .await;
    let ringing = r["callid"].as_str().expect("callid").to_string();
    assert_eq!(
        names(&ws.statuses(&ringing, "ringing").await),
        ["accepted", "ringing"]
    );
    ws.ok(
        "participant.kick",
        json!({"conference": "sales-1", "participant": ringing}),
    )
    .await;
    assert_eq!(
        ws.statuses(&ringing, "rejected").await,
        vec![json!({"callid": ringing, "status": "rejected", "code": 487, "cause": 16})]
    );

    // The ending conference calls off a callee still ringing.
    let r = ws
        .ok(
            "dialout",
            json!({"conference": "sales-1", "to": "+15555550105"}),
        )
        .await;
    let late = r["callid"].as_str().expect("callid").to_string();
    ws.statuses(&late, "ringing").await;
    ws.ok("conference.end", json!({"conference": "sales-1"}))
        .await;
    let st = ws.statuses(&late, "rejected").await;
    assert_eq!(st.last().map(|p| p["code"].clone()), Some(json!(487)));
    assert_eq!(
        ws.statuses(&sip, "cleared").await,
        vec![json!({"callid": sip, "status": "cleared", "cause": 16})],
        "the connected SIP callee is cleared by the end"
    );

    let m = fixtures::scrape(&c.node(&owner).proc.http_url()).await;
    for (status, at_least) in [
        ("accepted", 7.0),
        ("ringing", 5.0),
        ("connected", 2.0),
        ("rejected", 5.0),
        ("cleared", 2.0),
    ] {
        let series = format!(r#"confroute_node_dialouts_total{{status="{status}"}}"#);
        assert!(fixtures::metric(&m, &series) >= at_least, "{series}\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialout_homes_a_new_conference_and_ends_it_with_its_callee() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let store = fixtures::store(&c.cfg);
    let mut ws = c.client(1).await;
    let r = ws
        .ok(
            "dialout",
            json!({"conference": "fresh-1", "to": "+15555550111"}),
        )
        .await;
    let callid = r["callid"].as_str().expect("callid").to_string();
    assert_eq!(
        names(&ws.statuses(&callid, "connected").await),
        ["accepted", "ringing", "connected"]
    );
    let rec = store
        .lookup(&"fresh-1".parse().expect("name"))
        .await
        .expect("lookup")
        .expect("homed");
    let sim = &c.node(rec.owner.node.as_str()).sim;
    let epoch = rec.owner.epoch;
    until(sim, "the callee in the new conference's bridge", |s| {
        s.channel(&callid)
            .and_then(|c| c.bridge.as_deref())
            .is_some_and(|b| is_main(b, epoch, "fresh-1"))
    })
    .await;
    sim.hangup_far_end(&callid, 16).await.expect("hang up");
    assert_eq!(names(&ws.statuses(&callid, "cleared").await), ["cleared"]);
    wait_for_async("the claim released", WAIT, || async {
        let r = store.lookup(&"fresh-1".parse().ok()?).await.ok()?;
        r.is_none().then_some(())
    })
    .await
    .expect("the conference ended with its only participant");

    // A dial-out that fails into a conference nobody is in ends it too.
    // Wherever the controller places it.
    for n in &c.nodes {
        n.sim
            .set_originate_behavior(EndpointMatch::prefix("PJSIP/+1555555"), Outcome::Busy);
    }
    let r = ws
        .ok(
            "dialout",
            json!({"conference": "fresh-2", "to": "+15555550112"}),
        )
        .await;
    let busy = r["callid"].as_str().expect("callid").to_string();
    assert_eq!(
        names(&ws.statuses(&busy, "rejected").await),
        ["accepted", "rejected"]
    );
    wait_for_async("the empty conference's claim released", WAIT, || async {
        let r = store.lookup(&"fresh-2".parse().ok()?).await.ok()?;
        r.is_none().then_some(())
    })
    .await
    .expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_dialouts_originate_nothing() {
    let c = Cluster::start(&[], &[]).await;
    let (owner, _) = room(&c, "small-1", &[("CONFROUTE_MAX_PARTICIPANTS", "1")]).await;
    let sim = &c.node(&owner).sim;
    let mut ws = c.client(0).await;
    for (params, code) in [
        (json!({"conference": "small-1", "to": "12"}), -32004),
        (
            json!({"conference": "small-1", "to": "not a number"}),
            -32004,
        ),
        (json!({"conference": "small-1", "to": "+0123456"}), -32004),
        (json!({"conference": "small-1", "to": "sip:nobody"}), -32004),
        (
            json!({"conference": "small-1", "to": "+15555550101", "timeout": 0}),
            -32602,
        ),
        (
            json!({"conference": "small-1", "to": "+15555550101", "options": {"muted": "perhaps"}}),
            -32602,
        ),
        (
            json!({"conference": "small-1", "to": "+15555550101", "options": {"colour": "red"}}),
            -32602,
        ),
        // A conference with no home yet: refused before it is homed.
        (
            json!({"conference": "fresh-z", "to": "+15555550101", "options": {"colour": "red"}}),
            -32602,
        ),
        (
            json!({"conference": "fresh-z", "to": "+15555550101", "options": {"muted": "perhaps"}}),
            -32602,
        ),
        (
            json!({"conference": "fresh-z", "to": "+15555550101", "options": {"maxParticipants": 0}}),
            -32602,
        ),
        (
            json!({"conference": "fresh-z", "to": "+15555550101",
                   "options": {"statusCallback": "http://169.254.169.254/x"}}),
            -32602,
        ),
        (
            json!({"conference": "bad name", "to": "+15555550101"}),
            -32602,
        ),
        // Full: one participant of at most one.
        (
            json!({"conference": "small-1", "to": "+15555550101"}),
            -32005,
        ),
    ] {
        let (got, msg) = ws.err("dialout", params.clone()).await;
        assert_eq!(got, code, "{params}: {msg}");
        if params["options"]["colour"].is_string() {
            assert!(msg.contains("options.colour"), "{msg}");
        }
    }
    for n in &c.nodes {
        assert!(
            originates(&n.sim).is_empty(),
            "{}: {:?}",
            n.id,
            originates(&n.sim)
        );
    }
    let v: Value = ws
        .ok("participant.list", json!({"conference": "small-1"}))
        .await;
    assert_eq!(v["participants"].as_array().map(Vec::len), Some(1));
    assert!(sim.snapshot().channels.len() == 1);
    let fresh = fixtures::store(&c.cfg)
        .lookup(&"fresh-z".parse().expect("name"))
        .await
        .expect("lookup");
    assert_eq!(fresh, None, "a refused dial-out leaves no claim behind");
    // Nor a higher epoch: the conference's first life is its first.
    let r = ws
        .ok(
            "dialout",
            json!({"conference": "fresh-z", "to": "+15555550101",
                   "options": {"profile": "default", "maxParticipants": 5.0}}),
        )
        .await;
    assert!(r["callid"].is_string(), "{r}");
    let conf = ws
        .ok("conference.get", json!({"conference": "fresh-z"}))
        .await;
    assert_eq!(conf["epoch"], 1, "{conf}");
}

/// A SIP target's scheme is case-insensitive (RFC 3261 §19.1.4): `SIP:` dials as `sip:`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sip_target_in_capitals_is_dialled() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let (owner, _) = room(&c, "caps-1", &[]).await;
    let sim = &c.node(&owner).sim;
    let mut ws = c.client(0).await;
    let r = ws
        .ok(
            "dialout",
            json!({"conference": "caps-1", "to": "SIP:bob@example.com"}),
        )
        .await;
    let callid = r["callid"].as_str().expect("callid").to_string();
    ws.statuses(&callid, "connected").await;
    assert_eq!(originates(sim), vec![format!("/ari/channels/{callid}")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ringing_dialout_keeps_its_conference_home_through_a_drain() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    for n in &c.nodes {
        n.sim
            .set_originate_behavior(EndpointMatch::Any, Outcome::Manual);
    }
    let store = fixtures::store(&c.cfg);
    let mut ws = c.client(0).await;
    let r = ws
        .ok(
            "dialout",
            json!({"conference": "ring-1", "to": "+15555550121"}),
        )
        .await;
    let callid = r["callid"].as_str().expect("callid").to_string();
    assert_eq!(
        names(&ws.statuses(&callid, "ringing").await),
        ["accepted", "ringing"]
    );
    let name: confroute_shared::name::ConferenceName = "ring-1".parse().expect("name");
    let rec = wait_for_async("the ringing callee counted in Redis", WAIT, || async {
        let rec = store.lookup(&name).await.ok()??;
        (rec.participants == 1).then_some(rec)
    })
    .await
    .expect("a ringing dial-out counts as someone in the conference");
    let owner = rec.owner.node.to_string();

    // Its node drains (a rolling upgrade): a caller for the conference still goes there,
    // where the callee will join, rather than to a new home that would end the dial-out.
    let drained = fixtures::http()
        .post(format!(
            "{}/v1/nodes/{owner}/drain",
            c.controllers[1].http_url()
        ))
        .send()
        .await
        .expect("drain");
    assert_eq!(drained.status(), 200);
    assert_eq!(
        c.route(1, "ring-1").await,
        owner,
        "the conference kept its home"
    );
    let sim = &c.node(&owner).sim;
    sim.answer_far_end(&callid).await.expect("answer");
    assert_eq!(
        names(&ws.statuses(&callid, "connected").await),
        ["connected"]
    );
    until(sim, "the callee in the conference's bridge", |s| {
        s.channel(&callid)
            .and_then(|c| c.bridge.as_deref())
            .is_some_and(|b| is_main(b, rec.owner.epoch, "ring-1"))
    })
    .await;
    // Once it gives up its seat, the count follows.
    sim.hangup_far_end(&callid, 16).await.expect("hang up");
    wait_for_async("the conference ended", WAIT, || async {
        store.lookup(&name).await.ok()?.is_none().then_some(())
    })
    .await
    .expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_caller_being_admitted_keeps_its_conference_home_through_a_drain() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(1, "admit-1").await;
    let sim = &c.node(&owner).sim;
    // The first caller is admitted; Asterisk is slow to answer it.
    sim.hold_operation("answer");
    let first = dial(sim, "admit-1", &[]).await;
    wait_for_async("the first caller being answered", WAIT, || async {
        (sim.held_requests("answer") == 1).then_some(())
    })
    .await
    .expect("admitted");
    // A heartbeat of the node passes meanwhile (it writes the conference's count too).
    let beat = || {
        c.redis
            .query(
                redis::cmd("HGET")
                    .arg(format!("{{confroute}}:node:{owner}"))
                    .arg("updated_ms"),
            )
            .and_then(|v| redis::from_redis_value::<Option<String>>(v).ok())
            .flatten()
    };
    let before = beat();
    wait_for_async(
        "a heartbeat while the caller is brought in",
        WAIT,
        || async { (beat() != before).then_some(()) },
    )
    .await
    .expect("heartbeat");
    // Its node drains meanwhile, and a second caller is routed: the conference must stay
    // where its first caller is going, not move because nobody was counted in it yet.
    let drained = fixtures::http()
        .post(format!(
            "{}/v1/nodes/{owner}/drain",
            c.controllers[0].http_url()
        ))
        .send()
        .await
        .expect("drain");
    assert_eq!(drained.status(), 200);
    assert_eq!(
        c.route(0, "admit-1").await,
        owner,
        "the conference kept its home"
    );
    sim.release_operation("answer");
    wait_bridged(sim, &first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialout_whose_originate_timed_out_never_joins_when_it_answers_late() {
    // Asterisk places the call but answers the request later than the agent's request
    // timeout: the app is told the dial-out failed while the callee's phone rings.
    let (c, owner, mut ws) =
        given_up_dialout("answer originateWithId", "late-1", "+15555550131").await;
    let sim = &c.node(&owner).sim;
    let callid = wait_for_async(
        "the agent hanging up the call it may have placed",
        WAIT,
        || async {
            sim.request_log()
                .iter()
                .filter(|r| r.operation.as_deref() == Some("hangup"))
                .find_map(|r| r.path.strip_prefix("/ari/channels/").map(str::to_string))
        },
    )
    .await
    .expect("hung up");
    sim.release_operation("answer originateWithId");
    let snap = sim.snapshot();
    if snap.channel(&callid).is_some() {
        sim.answer_far_end(&callid).await.expect("answer");
    }
    wait_hangup(sim, &callid).await;
    assert_never_joined(
        sim,
        &callid,
        "the callee of a failed dial-out joined the conference",
    );
    let list = ws
        .ok("participant.list", json!({"conference": "late-1"}))
        .await;
    assert_eq!(
        list["participants"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
}

/// An originate Asterisk refuses (a channel technology it does not have: 500 "Allocation
/// failed") placed no call: its route goes at once, and nothing is hung up for it. Only a
/// request whose fate is unknown (timed out, lost) is treated as maybe placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_originate_asterisk_refuses_leaves_no_route_behind() {
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_DIALOUT__ENDPOINT", "Nope/{number}"),
        ],
        &[],
    )
    .await;
    let (owner, _) = room(&c, "refused-1", &[]).await;
    let node = c.node(&owner);
    let mut ws = c.client(0).await;
    let (code, msg) = ws
        .err(
            "dialout",
            json!({"conference": "refused-1", "to": "+15555550171"}),
        )
        .await;
    assert_eq!(code, -32603, "{msg}");
    assert!(msg.contains("Allocation failed"), "{msg}");
    let placed = originates(&node.sim);
    assert_eq!(placed.len(), 1, "{placed:?}");
    let m = fixtures::scrape(&node.proc.http_url()).await;
    assert_eq!(
        fixtures::metric(&m, "confroute_node_tracked_channels"),
        1.0,
        "only the caller's events are routed\n{m}"
    );
    let id = placed[0].rsplit('/').next().expect("channel id");
    assert!(
        !node
            .sim
            .request_log()
            .iter()
            .any(|r| r.operation.as_deref() == Some("hangup") && r.path.ends_with(id)),
        "a call Asterisk never placed is hung up"
    );
}

/// A conference ending while Asterisk loses its hangups (a dropped connection) still calls
/// off its callee, ringing outside Stasis, and hangs up its caller: the agent asks again
/// soon after the failure, not at the periodic reconciliation a minute later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangups_lost_as_a_conference_ends_are_asked_again_for_callers_and_ringing_callees() {
    let (c, owner, mut ws, callid) = ringing_dialout("lost-end", "+15555550161").await;
    let sim = &c.node(&owner).sim;
    let caller = sim
        .snapshot()
        .channels
        .iter()
        .find(|ch| ch.id != callid && ch.bridge.is_some())
        .map(|ch| ch.id.clone())
        .expect("the caller");
    sim.lose_operation("hangup");
    ws.ok("conference.end", json!({"conference": "lost-end"}))
        .await;
    // The end's hangups were lost: both are still there.
    let snap = sim.snapshot();
    assert!(snap.channel(&callid).is_some() && snap.channel(&caller).is_some());
    sim.deliver_operation("hangup");
    for ch in [&callid, &caller] {
        let gone = sim
            .wait_for_event(WAIT, |e| {
                e["type"] == "ChannelDestroyed" && e["channel"]["id"] == ch.as_str()
            })
            .await;
        assert!(
            gone.is_some(),
            "{ch} still in Asterisk\n{}",
            c.node(&owner).proc.output()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callee_kicked_while_ringing_never_joins_even_if_it_answers_first() {
    let (c, owner, mut ws, callid) = ringing_dialout("kick-1", "+15555550141").await;
    let sim = &c.node(&owner).sim;
    // The kick's hangup is under way in Asterisk when the callee picks up.
    sim.slow_hangup(&callid);
    ws.ok(
        "participant.kick",
        json!({"conference": "kick-1", "participant": callid}),
    )
    .await;
    sim.answer_far_end(&callid).await.expect("answer");
    wait_for_async("the answered callee in the Stasis app", WAIT, || async {
        let snap = sim.snapshot();
        snap.channel(&callid)?.stasis_app.as_ref().map(|_| ())
    })
    .await
    .expect("in Stasis");
    // What the conference lists meanwhile, for the failure message.
    let list = ws
        .ok("participant.list", json!({"conference": "kick-1"}))
        .await;
    assert!(sim.finish_hangup(&callid), "the kick asked for the hangup");
    let st = ws.statuses(&callid, "rejected").await;
    assert!(
        !names(&st).contains(&"connected".to_string()),
        "a kicked callee was connected: {st:?} {list}"
    );
    assert_eq!(
        st.last().map(|p| p["status"].clone()),
        Some(json!("rejected")),
        "{st:?}"
    );
    assert_never_joined(sim, &callid, "the kicked callee entered the conference");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_callee_whose_end_was_lost_with_the_websocket_is_reported_cleared() {
    let (c, owner, mut ws, callid) = ringing_dialout("lost-1", "+15555550151").await;
    let sim = &c.node(&owner).sim;
    sim.answer_far_end(&callid).await.expect("answer");
    assert_eq!(
        names(&ws.statuses(&callid, "connected").await),
        ["connected"]
    );
    // The callee hangs up while the agent's events WebSocket is down: nobody hears its end.
    sim.drop_websockets();
    sim.hangup_far_end(&callid, 16).await.expect("hang up");
    let st = ws.statuses(&callid, "cleared").await;
    assert_eq!(
        st,
        vec![json!({"callid": callid, "status": "cleared", "cause": 16})]
    );
}

/// The callee answers while the agent's events WebSocket is down: Asterisk cannot hand it
/// to an app that is not connected and hangs it up, unheard. The next reconciliation finds
/// it gone and the dial-out ends then, not when its ring time would have run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callee_lost_while_the_websocket_was_down_ends_its_dialout_at_the_next_look() {
    let (c, owner, mut ws, callid) = ringing_dialout("lost-2", "+15555550152").await;
    let sim = &c.node(&owner).sim;
    sim.drop_websockets();
    sim.answer_far_end(&callid).await.expect("answer");
    let st = ws.statuses(&callid, "rejected").await;
    assert!(
        sim.snapshot().channel(&callid).is_none(),
        "Asterisk hung the callee up: no app took it"
    );
    assert_eq!(
        st,
        vec![json!({"callid": callid, "status": "rejected", "code": 500, "cause": 31})]
    );
    assert_never_joined(sim, &callid, "the lost callee entered the conference");
    // Its seat is freed too: once the one caller leaves, the conference ends (a seat kept
    // for the lost callee held the conference, its bridge and its claim for good).
    let caller = sim
        .snapshot()
        .channels
        .iter()
        .map(|ch| ch.id.clone())
        .find(|id| *id != callid)
        .expect("the caller");
    sim.hangup_far_end(&caller, 16).await.expect("hang up");
    let store = fixtures::store(&c.cfg);
    wait_for_async("the claim released", WAIT, || async {
        let r = store.lookup(&"lost-2".parse().ok()?).await.ok()?;
        r.is_none().then_some(())
    })
    .await
    .expect("the conference ended with its last caller");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialout_placed_after_its_originate_timed_out_is_hung_up_as_it_rings() {
    // Asterisk takes the originate up only after the agent gave up waiting, and after the
    // agent's hangup of the call id found nothing to hang up.
    let (c, owner, _ws) = given_up_dialout("originateWithId", "late-2", "+15555550161").await;
    let sim = &c.node(&owner).sim;
    wait_request(sim, "hangup", "/ari/channels/dial-").await;
    sim.release_operation("originateWithId");
    assert_late_call_hung_up(sim, "the callee of a failed dial-out joined the conference").await;
}

/// A dial-out whose admission and originate would outlast `rpc.command_timeout` (Asterisk
/// slow to take the originate, the agent's `ari.request_timeout` longer than the budget) is
/// given up within the budget and its call hung up: placed after the controller told the
/// application the node did not answer, it would ring and join, and a retry call twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialout_whose_originate_outlasts_its_budget_never_joins() {
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_ARI__REQUEST_TIMEOUT", "10s"),
        ],
        &[("CONFROUTE_RPC__COMMAND_TIMEOUT", "2s")],
    )
    .await;
    let owner = c.route(0, "slow-dial").await;
    let sim = &c.node(&owner).sim;
    let caller = dial(sim, "slow-dial", &[]).await;
    wait_bridged(sim, &caller).await;
    sim.hold_operation("originateWithId");
    let mut ws = c.client(0).await;
    let asked = Instant::now();
    let v = ws
        .call(
            "dialout",
            json!({"conference": "slow-dial", "to": "+15555550171"}),
        )
        .await;
    assert!(v["error"].is_object(), "{v}");
    // Answered by the budget, long before the agent's own 10 s ARI timeout.
    assert!(asked.elapsed() < Duration::from_secs(8), "{v}");
    // Asterisk takes the originate up now, long before the agent's own request timeout.
    sim.release_operation("originateWithId");
    // The agent gave up on it within the budget, and hangs the call up.
    wait_request(sim, "hangup", "/ari/channels/dial-").await;
    assert_late_call_hung_up(
        sim,
        "the callee of a dial-out given up at its deadline joined the conference",
    )
    .await;
}

/// Conference `conf` with one caller in it, its node's originates ringing until answered;
/// returns the node.
async fn ringing_conference(c: &Cluster, conf: &str) -> String {
    let owner = c.route(1, conf).await;
    let sim = &c.node(&owner).sim;
    let first = dial(sim, conf, &[]).await;
    wait_bridged(sim, &first).await;
    sim.set_originate_behavior(EndpointMatch::Any, Outcome::Manual);
    owner
}

/// Agents giving up on ARI requests after 300 ms, conference `conf` with one caller, and a
/// dial-out to `to` into it whose originate is held at `held` (a hold_operation name) past
/// that: the application is told it failed. Returns the cluster, the conference's node and
/// the client.
async fn given_up_dialout(held: &str, conf: &str, to: &str) -> (Cluster, String, Client) {
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_ARI__REQUEST_TIMEOUT", "300ms"),
        ],
        &[],
    )
    .await;
    let owner = ringing_conference(&c, conf).await;
    let mut ws = c.client(0).await;
    let sim = &c.node(&owner).sim;
    sim.hold_operation(held);
    let (code, msg) = ws
        .err("dialout", json!({"conference": conf, "to": to}))
        .await;
    assert_eq!(code, -32603, "{msg}");
    (c, owner, ws)
}

/// A dial-out to `to` into conference `conf` (which has one caller), ringing; returns the
/// cluster, the conference's node, the client that asked and the call id.
async fn ringing_dialout(conf: &str, to: &str) -> (Cluster, String, Client, String) {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = ringing_conference(&c, conf).await;
    let mut ws = c.client(0).await;
    let r = ws
        .ok("dialout", json!({"conference": conf, "to": to}))
        .await;
    let callid = r["callid"].as_str().expect("callid").to_string();
    assert_eq!(
        names(&ws.statuses(&callid, "ringing").await),
        ["accepted", "ringing"]
    );
    (c, owner, ws, callid)
}

/// Waits for the dial-out Asterisk placed after the agent gave up on it to be hung up, and
/// asserts it never entered a bridge; `what` says what that would mean.
async fn assert_late_call_hung_up(sim: &TestSim, what: &str) {
    let gone = sim
        .wait_for_event(WAIT, |e| {
            e["type"] == "ChannelDestroyed"
                && e["channel"]["id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("dial-"))
        })
        .await
        .unwrap_or_else(|| panic!("the late call still rings: {:#?}", sim.snapshot()));
    let callid = gone["channel"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_never_joined(sim, &callid, what);
}

/// Asserts that the callee `callid` never entered a bridge; `what` says what that means.
fn assert_never_joined(sim: &TestSim, callid: &str, what: &str) {
    let entered = sim
        .event_log()
        .into_iter()
        .filter(|e| e["type"] == "ChannelEnteredBridge" && e["channel"]["id"] == callid)
        .count();
    assert_eq!(entered, 0, "{what}");
}

/// A command that waited on its node past half of `rpc.command_timeout` (its conference was
/// busy with a slow Asterisk request) is answered `timeout` and never carried out: started
/// later, a dial-out could ring after the application was told the node did not answer,
/// and its retry would call the callee twice. The answer reaches the client in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialout_that_waited_past_half_its_budget_is_not_placed() {
    let c = Cluster::start(
        &[("CONFROUTE_CONFERENCE__BEEP", "false")],
        &[("CONFROUTE_RPC__COMMAND_TIMEOUT", "2s")],
    )
    .await;
    let owner = c.route(0, "busy-1").await;
    let sim = &c.node(&owner).sim;
    let caller = dial(sim, "busy-1", &[]).await;
    wait_bridged(sim, &caller).await;

    // The conference's actor is held up in Asterisk by a mute.
    sim.hold_operation("mute");
    let mut first = c.client(0).await;
    let params = json!({"conference": "busy-1", "participant": caller});
    let mute = tokio::spawn(async move { first.call("participant.mute", params).await });
    wait_for_async("the mute reaches Asterisk", WAIT, || async {
        (sim.held_requests("mute") == 1).then_some(())
    })
    .await
    .expect("mute held");
    sim.clear_request_log();

    let mut second = c.client(1).await;
    let dialout = tokio::spawn(async move {
        second
            .call(
                "dialout",
                json!({"conference": "busy-1", "to": "+15555550101"}),
            )
            .await
    });
    // Past half of the 2 s budget, well before the whole of it, the actor is free again.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    sim.release_operation("mute");

    let v = dialout.await.expect("dial-out task");
    // The node's own `timeout` answer, which came before the controller gave up: the
    // controller's would be -32012 (no answer).
    assert_eq!(v["error"]["code"], -32007, "{v}");
    let v = mute.await.expect("mute task");
    assert!(v["result"].is_object(), "the mute itself went through: {v}");
    // Whatever the node does with the conference next comes after the refused dial-out.
    let mut third = c.client(0).await;
    third
        .ok("participant.list", json!({"conference": "busy-1"}))
        .await;
    assert!(
        originates(sim).is_empty(),
        "nothing was originated: {:?}",
        originates(sim)
    );
}

/// An unanswered dial-out has a fallback timer for when its end is never seen (ring timeout
/// plus 30 s); a call that ends, here busy at once, stops it. Otherwise a node placing many
/// calls with long ring timeouts would keep a sleeping task per call for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_dialouts_leave_no_timer_tasks_behind() {
    const CALLS: usize = 40;
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let (owner, _) = room(&c, "timers-1", &[]).await;
    let node = c.node(&owner);
    node.sim
        .set_originate_behavior(EndpointMatch::prefix("PJSIP/+1555555"), Outcome::Busy);
    let base = node.proc.http_url();
    let tasks =
        || async { fixtures::metric(&fixtures::scrape(&base).await, "confroute_runtime_tasks") };
    let before = tasks().await;
    assert!(before > 0.0, "the agent reports its runtime's tasks");
    let mut ws = c.client(0).await;
    let mut calls = Vec::new();
    for i in 0..CALLS {
        let r = ws
            .ok(
                "dialout",
                json!({"conference": "timers-1", "to": format!("+15555550{i:03}"), "timeout": 600}),
            )
            .await;
        calls.push(r["callid"].as_str().expect("callid").to_string());
    }
    for callid in &calls {
        assert_eq!(
            names(&ws.statuses(callid, "rejected").await),
            ["accepted", "rejected"]
        );
    }
    // Some tasks of the last calls may still be finishing; a timer per call would be 40.
    let settled = wait_for_async(
        "the agent's tasks back near where they were",
        WAIT,
        || async {
            let now = tasks().await;
            (now < before + (CALLS / 4) as f64).then_some(now)
        },
    )
    .await;
    assert!(
        settled.is_ok(),
        "tasks before the calls: {before}, after: {}",
        tasks().await
    );
}

/// A node that cannot reach Redis to check or claim the conference refuses the dial-out as
/// `unavailable` (-32011, as the controller's own Redis trouble is), not as an internal
/// error, and originates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_read_redis_refuses_a_dialout_as_unavailable() {
    use confroute_tests::harness::{ControllerProc, NodeProc, RedisServer};
    // The agent's own Redis user; it loses HMGET below, the controller keeps it.
    let redis =
        RedisServer::start_with(&["--user", "agent", "on", ">agent-pw", "~*", "&*", "+@all"])
            .expect("redis");
    let cfg = fixtures::single(&redis.url());
    let sim = sim().await;
    let mut extra: Vec<(&str, &str)> = DIALOUT_ENV.to_vec();
    extra.extend([
        ("CONFROUTE_REDIS__USERNAME", "agent"),
        ("CONFROUTE_REDIS__PASSWORD", "agent-pw"),
        // A long lease: the record outlives the heartbeats the lost HMGET fails.
        ("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "5s"),
    ]);
    let mut node = NodeProc::start("node-a", &env(&sim, &cfg, &extra)).expect("node starts");
    wait_app(&sim, &node).await;
    node.wait_log("command bus subscribed", WAIT)
        .expect("the node hears commands");
    let controller = ControllerProc::start(&fixtures::redis_env(&cfg)).expect("controller");
    fixtures::wait_placeable(&controller.http_url(), 1)
        .await
        .expect("node placeable");
    let denied: Option<String> = confroute_tests::harness::redis_query(
        redis.port(),
        redis::cmd("ACL").arg("SETUSER").arg("agent").arg("-hmget"),
    );
    assert_eq!(denied.as_deref(), Some("OK"));
    let mut client = Client::connect(controller.http_port).await;
    let (code, message) = client
        .err(
            "dialout",
            json!({"conference": "fresh", "to": "+15551230000", "timeout": 10}),
        )
        .await;
    assert_eq!(code, -32011, "{message}\n{}", node.output());
    assert!(message.contains("in Redis"), "{message}");
    assert_eq!(ops(&sim, "originate"), 0, "nothing originated");
    assert_eq!(ops(&sim, "originateWithId"), 0, "nothing originated");
}

/// A conference its node lost (another node owns its claim now) keeps its callers by
/// default (`on_ownership_lost = keep`), but a callee still ringing could never join it
/// (one answering would be refused): it is called off at once, `rejected` 487, not left
/// ringing out its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callee_ringing_for_a_conference_its_node_lost_is_called_off() {
    let (c, owner, mut ws, callid) = ringing_dialout("lost-own", "+15555550161").await;
    let sim = &c.node(&owner).sim;
    let other = c.other(&owner).id.clone();
    c.redis
        .query(
            redis::cmd("HSET")
                .arg(format!("{}conf:lost-own", c.cfg.prefix))
                .arg("owner")
                .arg(&other)
                .arg("epoch")
                .arg(99),
        )
        .expect("hset");
    let st = ws.statuses(&callid, "rejected").await;
    assert_eq!(
        st,
        vec![json!({"callid": callid, "status": "rejected", "code": 487, "cause": 16})]
    );
    assert!(
        sim.snapshot().channel(&callid).is_none(),
        "the callee's call is over"
    );
    let caller = sim.snapshot().channels[0].id.clone();
    assert!(
        sim.snapshot()
            .channel(&caller)
            .is_some_and(|ch| ch.bridge.is_some()),
        "the caller stays in its bridge"
    );
}

/// While the node's events WebSocket is down its Stasis app is not registered, and Asterisk
/// would hang up a callee the moment it answered: a dial-out is refused `unavailable`, and
/// nothing is dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialout_while_the_events_websocket_is_down_dials_nothing() {
    // Reconnecting only after 10 s at the earliest (20 s with up to half of it off).
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_ARI__RECONNECT_MIN", "20s"),
            ("CONFROUTE_ARI__RECONNECT_MAX", "20s"),
        ],
        &[],
    )
    .await;
    let (owner, bridge) = room(&c, "ws-down", &[]).await;
    let node = c.node(&owner);
    node.sim.drop_websockets();
    wait_for_async(
        "the agent to see its events connection gone",
        WAIT,
        || async {
            let m = fixtures::scrape(&node.proc.http_url()).await;
            (fixtures::metric(&m, "confroute_ari_connected") == 0.0).then_some(())
        },
    )
    .await
    .expect("disconnected");
    let mut ws = c.client(0).await;
    let (code, message) = ws
        .err(
            "dialout",
            json!({"conference": "ws-down", "to": "+15555550162"}),
        )
        .await;
    assert_eq!(code, -32011, "{message}");
    assert!(message.contains("events connection"), "{message}");
    assert!(originates(&node.sim).is_empty(), "nothing dialled");
    let snap = node.sim.snapshot();
    assert_eq!(snap.channels.len(), 1, "the caller only");
    assert_eq!(
        snap.channels[0].bridge.as_deref(),
        Some(bridge.as_str()),
        "the conference goes on"
    );
}

/// The callee answers while the events connection is dead unnoticed (half-open: nothing
/// comes, pongs included): Asterisk puts it in the Stasis app, and its StasisStart dies with
/// the connection. After the reconnect the agent's look at Asterisk finds the callee
/// there while it still has it ringing, and joins it: connected, in the bridge, not left in
/// silence until its ring time runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callee_whose_stasis_start_was_lost_is_joined_after_the_reconnect() {
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_ARI__PING_INTERVAL", "500ms"),
        ],
        &[],
    )
    .await;
    let owner = ringing_conference(&c, "unheard").await;
    let sim = &c.node(&owner).sim;
    let bridge = sim
        .snapshot()
        .channels
        .first()
        .and_then(|ch| ch.bridge.clone())
        .expect("the caller's bridge");
    let mut ws = c.client(0).await;
    let r = ws
        .ok(
            "dialout",
            json!({"conference": "unheard", "to": "+15555550163", "timeout": 60}),
        )
        .await;
    let callid = r["callid"].as_str().expect("callid").to_string();
    assert_eq!(
        names(&ws.statuses(&callid, "ringing").await),
        ["accepted", "ringing"]
    );
    sim.freeze_websockets();
    sim.answer_far_end(&callid).await.expect("answer");
    assert_eq!(
        names(&ws.statuses(&callid, "connected").await),
        ["connected"]
    );
    assert_eq!(
        wait_bridged(sim, &callid).await,
        bridge,
        "the callee is in the conference"
    );
    let m = fixtures::scrape(&c.node(&owner).proc.http_url()).await;
    assert_eq!(
        fixtures::metric(
            &m,
            r#"confroute_node_reconcile_actions_total{action="joined_unheard_callee"}"#
        ),
        1.0,
        "its StasisStart was lost: {}",
        c.node(&owner).proc.output()
    );
}
