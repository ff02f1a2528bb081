//! The node agent's own checks of the commands it hears on the bus (it trusts no
//! controller): every bad command gets a precise bus error code and changes nothing in
//! Asterisk; a conference another node owns is refused (fencing); dial-out needs its dial
//! strings configured. Commands are sent straight on the bus, as a controller would.

mod node_common;

use std::time::Duration;

use confroute_shared::bus::{Bus, ErrorCode};
use confroute_tests::ari_sim::{EndpointMatch, Outcome};
use confroute_tests::fixtures;
use node_common::control::DIALOUT_ENV;
use node_common::*;
use serde_json::{json, Value};

async fn bus(s: &Single) -> Bus {
    let bus = Bus::controller(fixtures::store(&s.cfg));
    assert!(bus.wait_connected(WAIT).await, "bus connects");
    bus
}

async fn send(bus: &Bus, method: &str, params: Value) -> Result<Value, (ErrorCode, String)> {
    let call = bus
        .call(
            &fixtures::id("node-a"),
            method,
            params,
            Duration::from_secs(5),
            false,
        )
        .await
        .map_err(|e| (e.code, e.message))?;
    call.reply.map_err(|e| (e.code, e.message))
}

/// An agent (with `extra` settings) that hears commands, and caller `a` in conference
/// `room`; returns both.
async fn listening_with_a_caller(extra: &[(&str, &str)]) -> (Single, String) {
    let mut s = Single::start(extra).await;
    s.node
        .wait_log("command bus subscribed", WAIT)
        .expect("the node hears commands");
    let a = dial(&s.sim, "room", &[]).await;
    wait_bridged(&s.sim, &a).await;
    // The join is done (its entry beep asked for) once the agent lists the caller: a test
    // that counts Asterisk requests from here sees none of the join's.
    wait_listed(&s.node.http_url(), &a)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    (s, a)
}

/// An agent with dial strings and a caller in `room`, and a dial-out into `conference`
/// sent on the bus, ringing until the test answers it; returns the agent, the bus and the
/// call id.
async fn ringing_dialout_into(conference: &str) -> (Single, Bus, String) {
    let (s, _caller) = listening_with_a_caller(DIALOUT_ENV).await;
    s.sim
        .set_originate_behavior(EndpointMatch::Any, Outcome::Manual);
    let bus = bus(&s).await;
    let v = send(
        &bus,
        "dialout",
        json!({"conference": conference, "to": "+15555550101"}),
    )
    .await
    .expect("dialout");
    let callid = v["callid"].as_str().expect("callid").to_string();
    (s, bus, callid)
}

/// ARI requests that change something (everything but GET).
fn changes(sim: &TestSim) -> usize {
    sim.request_log()
        .iter()
        .filter(|r| r.method != "GET")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_get_precise_errors_and_change_nothing() {
    let (s, a) = listening_with_a_caller(DIALOUT_ENV).await;
    let store = fixtures::store(&s.cfg);
    // "theirs" belongs to another live node.
    store
        .register(&fixtures::node("node-z", 10), Duration::from_secs(60))
        .await
        .expect("register node-z");
    store
        .claim(&"theirs".parse().expect("name"), &[fixtures::id("node-z")])
        .await
        .expect("claim");
    let bus = bus(&s).await;
    let before = changes(&s.sim);
    let p = |extra: Value| {
        let mut v = json!({"conference": "room", "participant": a});
        if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
            m.extend(e);
        }
        v
    };
    let dial_to = |to: &str, extra: Value| {
        let mut v = json!({"conference": "room", "to": to});
        if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
            m.extend(e);
        }
        v
    };
    use ErrorCode::*;
    let cases: Vec<(&str, Value, ErrorCode, &str)> = vec![
        (
            "participant.frobnicate",
            p(json!({})),
            InvalidParams,
            "not a node command",
        ),
        (
            "participant.mute",
            json!(["room", a]),
            InvalidParams,
            "object",
        ),
        (
            "participant.mute",
            p(json!({"extra": 1})),
            InvalidParams,
            "extra",
        ),
        (
            "participant.mute",
            json!({"conference": "room"}),
            InvalidParams,
            "participant",
        ),
        (
            "participant.mute",
            json!({"conference": "bad name", "participant": a}),
            InvalidParams,
            "conference",
        ),
        (
            "participant.kick",
            json!({"conference": "room", "participant": "a/b"}),
            InvalidParams,
            "participant",
        ),
        (
            "participant.dtmf",
            p(json!({"digits": "12E"})),
            InvalidParams,
            "digits",
        ),
        (
            "participant.dtmf",
            p(json!({"digits": ""})),
            InvalidParams,
            "digits",
        ),
        (
            "participant.play",
            p(json!({"media": "hello"})),
            InvalidParams,
            "media",
        ),
        // Asterisk would take these and play nothing, saying why only in its log.
        (
            "participant.play",
            p(json!({"media": "sound:"})),
            InvalidParams,
            "names nothing",
        ),
        (
            "participant.play",
            p(json!({"media": "SOUND:beep"})),
            InvalidParams,
            "scheme `SOUND`",
        ),
        (
            "participant.play",
            p(json!({"media": "number:abc"})),
            InvalidParams,
            "not a number",
        ),
        (
            "participant.play",
            json!({"conference": "room", "media": "sound:x"}),
            InvalidParams,
            "participant is required",
        ),
        (
            "conference.play",
            p(json!({"media": "sound:x"})),
            InvalidParams,
            "participant.play",
        ),
        (
            "participant.move",
            p(json!({"to": "room", "to_node": "node-a"})),
            InvalidParams,
            "already there",
        ),
        (
            "participant.move",
            p(json!({"to": "bad name", "to_node": "node-a"})),
            InvalidParams,
            "to:",
        ),
        (
            "participant.move",
            p(json!({"to": "elsewhere", "to_node": "bad id"})),
            InvalidParams,
            "to_node",
        ),
        (
            "participant.move",
            p(json!({"to": "elsewhere", "to_node": "node-b"})),
            InvalidParams,
            "to_sip_uri",
        ),
        (
            "participant.move",
            p(json!({"to": "elsewhere", "to_node": "node-b", "to_sip_uri": "http://x"})),
            InvalidParams,
            "to_sip_uri",
        ),
        (
            "participant.update",
            p(json!({})),
            InvalidParams,
            "nothing to update",
        ),
        (
            "participant.update",
            p(json!({"beepOnExit": "yes"})),
            InvalidParams,
            "beepOnExit",
        ),
        ("dialout", dial_to("12", json!({})), InvalidNumber, "E.164"),
        (
            "dialout",
            dial_to("sip:x@a b", json!({})),
            InvalidNumber,
            "E.164",
        ),
        (
            "dialout",
            dial_to("+15555550101", json!({"from": "a\u{1}b"})),
            InvalidParams,
            "from",
        ),
        (
            "dialout",
            dial_to("+15555550101", json!({"timeout": 0})),
            InvalidParams,
            "timeout",
        ),
        (
            "dialout",
            dial_to("+15555550101", json!({"timeout": 601})),
            InvalidParams,
            "timeout",
        ),
        (
            "dialout",
            dial_to("+15555550101", json!({"options": {"beep": "loud"}})),
            InvalidParams,
            "options.beep",
        ),
        (
            "dialout",
            dial_to("+15555550101", json!({"options": {"muted": [1]}})),
            InvalidParams,
            "options.muted",
        ),
        (
            "dialout",
            dial_to("+15555550101", json!({"options": {"profile": "nope"}})),
            InvalidParams,
            "options.profile",
        ),
        (
            "dialout",
            dial_to("+15555550101", json!({"options": {"loudness": 3}})),
            InvalidParams,
            "options.loudness",
        ),
        // Fencing: another node owns it; this node neither originates nor takes it.
        (
            "dialout",
            json!({"conference": "theirs", "to": "+15555550101"}),
            ConferenceNotFound,
            "node-z",
        ),
        (
            "participant.mute",
            json!({"conference": "ghost", "participant": a}),
            ConferenceNotFound,
            "node-a",
        ),
        (
            "participant.list",
            json!({"conference": "theirs"}),
            ConferenceNotFound,
            "node-a",
        ),
        (
            "participant.mute",
            p(json!({"participant": "nobody.1"})),
            ParticipantNotFound,
            "nobody.1",
        ),
        (
            "dialout.state",
            json!({"callid": "a/b"}),
            InvalidParams,
            "participant",
        ),
        ("dialout.state", json!({}), InvalidParams, "callid"),
        (
            "dialout.state",
            json!({"callid": "x", "conference": "room"}),
            InvalidParams,
            "conference",
        ),
    ];
    for (method, params, code, words) in cases {
        match send(&bus, method, params.clone()).await {
            Err((got, msg)) => {
                assert_eq!(got, code, "{method} {params}: {msg}");
                assert!(
                    msg.contains(words),
                    "{method} {params}: {msg:?} should mention {words:?}"
                );
            }
            Ok(v) => panic!("{method} {params} should fail, answered {v}"),
        }
    }
    assert_eq!(changes(&s.sim), before, "{:#?}", s.sim.request_log());
    let rec = store
        .lookup(&"theirs".parse().expect("name"))
        .await
        .expect("lookup")
        .expect("still claimed");
    assert_eq!(rec.owner.node.as_str(), "node-z");
    // The conference and its caller are untouched and the node still answers.
    let v = send(&bus, "participant.list", json!({"conference": "room"}))
        .await
        .expect("list");
    assert_eq!(v["participants"][0]["id"], a.as_str());
    // A call this node never placed has no state.
    let v = send(&bus, "dialout.state", json!({"callid": a}))
        .await
        .expect("state");
    assert_eq!(v, json!({"status": null}));
    let m = fixtures::scrape(&s.node.http_url()).await;
    assert!(
        fixtures::metric(
            &m,
            r#"confroute_node_commands_total{method="dialout",outcome="invalid_params"}"#
        ) >= 7.0,
        "{m}"
    );
    assert!(
        fixtures::metric(
            &m,
            r#"confroute_node_commands_total{method="unknown",outcome="invalid_params"}"#
        ) >= 1.0,
        "{m}"
    );
}

/// `dialout.state` tells a controller that lost notices where a call stands: ringing,
/// connected, and nothing once it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialout_state_follows_the_call() {
    let (s, bus, callid) = ringing_dialout_into("room").await;
    let state = |want: Value| {
        let (bus, callid) = (&bus, callid.clone());
        async move {
            confroute_tests::harness::wait_for_async("the call's state", WAIT, || async {
                let v = send(bus, "dialout.state", json!({"callid": callid}))
                    .await
                    .ok()?;
                (v["status"] == want).then_some(())
            })
            .await
            .unwrap_or_else(|e| panic!("{e}: wanted {want}"));
        }
    };
    state(json!("ringing")).await;
    s.sim.answer_far_end(&callid).await.expect("answer");
    state(json!("connected")).await;
    s.sim.hangup_far_end(&callid, 16).await.expect("hang up");
    state(Value::Null).await;
}

/// A dial-out's callee is all a new conference has; refused when it answers (Redis cannot
/// confirm the home), it leaves the conference empty, which then ends instead of keeping its
/// bridge with nobody in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conference_left_empty_by_a_refused_callee_ends() {
    let (mut s, _bus, callid) = ringing_dialout_into("lonely").await;
    until(&s.sim, "the new conference's bridge", |snap| {
        snap.bridges.iter().any(|b| b.id.ends_with("-lonely"))
    })
    .await;
    // Redis goes away as the callee answers: the agent cannot confirm the home.
    s.redis.kill();
    s.sim.answer_far_end(&callid).await.expect("answer");
    wait_hangup(&s.sim, &callid).await;
    until(&s.sim, "the empty conference's bridge gone", |snap| {
        !snap.bridges.iter().any(|b| b.id.ends_with("-lonely"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialout_needs_its_dial_string() {
    let (s, _caller) =
        listening_with_a_caller(&[("CONFROUTE_DIALOUT__ENDPOINT", "PJSIP/{number}@trunk")]).await;
    let bus = bus(&s).await;
    let before = changes(&s.sim);
    match send(
        &bus,
        "dialout",
        json!({"conference": "room", "to": "sip:alice@example.com"}),
    )
    .await
    {
        Err((code, msg)) => {
            assert_eq!(code, ErrorCode::Forbidden, "{msg}");
            assert!(msg.contains("dialout.sip_endpoint"), "{msg}");
        }
        Ok(v) => panic!("no SIP dial string, yet {v}"),
    }
    assert_eq!(changes(&s.sim), before);
}

/// Asterisk's originate dials at most 79 bytes after `TECH/` and cuts the rest without a
/// word: a SIP URI that long would go out to another address (its `;transport=tls` gone).
/// It is refused, and nothing is dialled; one that fits is dialled whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_string_asterisk_would_cut_is_refused() {
    let (s, _caller) =
        listening_with_a_caller(&[("CONFROUTE_DIALOUT__SIP_ENDPOINT", "PJSIP/trunk/{uri}")]).await;
    let bus = bus(&s).await;
    let before = changes(&s.sim);
    // "trunk/" (6) and this URI (74): 80 bytes, one past what Asterisk dials.
    let long = format!(
        "sip:+49301234567@{}.example.net;transport=tls",
        "s".repeat(31)
    );
    assert_eq!(long.len(), 74);
    match send(&bus, "dialout", json!({"conference": "room", "to": long})).await {
        Err((code, msg)) => {
            assert_eq!(code, ErrorCode::InvalidParams, "{msg}");
            assert!(msg.contains("79"), "{msg}");
        }
        Ok(v) => panic!("a dial string Asterisk would cut, yet {v}"),
    }
    assert_eq!(changes(&s.sim), before, "nothing dialled");
    let fits = format!(
        "sip:+49301234567@{}.example.net;transport=tls",
        "s".repeat(30)
    );
    let v = send(&bus, "dialout", json!({"conference": "room", "to": fits}))
        .await
        .unwrap_or_else(|(code, msg)| panic!("{code:?}: {msg}"));
    assert!(v["callid"].is_string(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_dial_string_stops_start_up_naming_the_key() {
    let redis = confroute_tests::harness::RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let sim = sim().await;
    for (key, var, value) in [
        (
            "dialout.endpoint",
            "CONFROUTE_DIALOUT__ENDPOINT",
            "PJSIP/trunk",
        ),
        (
            "dialout.sip_endpoint",
            "CONFROUTE_DIALOUT__SIP_ENDPOINT",
            "PJSIP/trunk/{number}",
        ),
        (
            "dialout.caller_id",
            "CONFROUTE_DIALOUT__CALLER_ID",
            "a\u{7}b",
        ),
    ] {
        let err = match confroute_tests::harness::NodeProc::start(
            "node-a",
            &env(&sim, &cfg, &[(var, value)]),
        ) {
            Ok(_) => panic!("{var}={value:?} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(key), "{var}={value:?}: {err}");
    }
}
