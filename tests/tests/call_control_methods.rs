//! Every call-control method, through a real JSON-RPC WebSocket on controller A, for
//! conferences hosted on a node that controller B placed: two controllers, two node agents
//! each beside its own simulated Asterisk, real Redis. Each operation is checked by what it
//! did in Asterisk (the simulator's state and events) and by what `participant.list` and
//! the status callbacks report; each refusal by its error code and by nothing changing.

mod node_common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::routing::post;
use confroute_tests::ari_sim::{DialIn, EndpointMatch, Outcome, SimSnapshot};
use confroute_tests::fixtures;
use confroute_tests::harness::wait_for_async;
use node_common::control::*;
use node_common::*;
use serde_json::{json, Value};

type Received = Arc<Mutex<Vec<HashMap<String, String>>>>;

/// An HTTP server taking status callbacks; its URL and what it received.
async fn receiver() -> (String, Received) {
    let got: Received = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route(
            "/events",
            post(
                |State(got): State<Received>, Form(form): Form<HashMap<String, String>>| async move {
                    got.lock().expect("lock").push(form);
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(got.clone());
    let addr = fixtures::serve_http(app).await;
    let url = format!("http://{addr}/events");
    (url, got)
}

/// The channel variables that ask for status callbacks of `events` to `url`.
fn hooks<'a>(url: &'a str, events: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CONFROUTE_STATUS_CALLBACK", url),
        ("CONFROUTE_STATUS_CALLBACK_EVENT", events),
    ]
}

/// Routes `conf` through controller 0 and brings a caller with `vars` into it: its node's
/// simulated Asterisk and the caller's channel.
async fn first_caller<'a>(
    c: &'a Cluster,
    conf: &str,
    vars: &[(&str, &str)],
) -> (&'a TestSim, String) {
    let owner = c.route(0, conf).await;
    let sim = &c.node(&owner).sim;
    let ch = dial(sim, conf, vars).await;
    wait_bridged(sim, &ch).await;
    (sim, ch)
}

/// A dial-out into `conf` to number `to`, met by the simulated far end with `outcome`,
/// followed until its status `until`: its call id.
async fn dial_out(
    ws: &mut Client,
    sim: &TestSim,
    conf: &str,
    to: &str,
    outcome: Outcome,
    until: &str,
) -> String {
    sim.set_originate_behavior(EndpointMatch::exact(format!("PJSIP/{to}@trunk")), outcome);
    let r = ws
        .ok("dialout", json!({"conference": conf, "to": to}))
        .await;
    let callee = r["callid"].as_str().expect("callid").to_string();
    ws.statuses(&callee, until).await;
    callee
}

/// A dial-out into `conf` whose callee rings until the test answers or hangs it up: its
/// call id.
async fn ringing_callee(ws: &mut Client, sim: &TestSim, conf: &str, to: &str) -> String {
    dial_out(ws, sim, conf, to, Outcome::Manual, "ringing").await
}

/// Waits until the receiver has a callback of `event`; all it has by then.
async fn callbacks_through(got: &Received, event: &str) -> Vec<HashMap<String, String>> {
    wait_for_async(event, WAIT, || async {
        got.lock()
            .expect("lock")
            .iter()
            .any(|f| f["StatusCallbackEvent"] == event)
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", got.lock().expect("lock")));
    got.lock().expect("lock").clone()
}

fn participant<'a>(list: &'a Value, id: &str) -> &'a Value {
    list["participants"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["id"] == id))
        .unwrap_or_else(|| panic!("no participant {id} in {list}"))
}

fn ids(list: &Value) -> Vec<String> {
    let mut v: Vec<String> = list["participants"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Polls `participant.list` until `id` is no longer in `conference`.
async fn wait_unlisted(ws: &mut Client, conference: &str, id: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let list = ws
            .ok("participant.list", json!({"conference": conference}))
            .await;
        if !ids(&list).iter().any(|p| p == id) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} still listed: {list}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn playback_started(sim: &TestSim, target: &str, media: &str) -> bool {
    sim.event_log().iter().any(|e| {
        e["type"] == "PlaybackStarted"
            && e["application"] == "confroute"
            && e["playback"]["target_uri"] == target
            && e["playback"]["media_uri"] == media
    })
}

/// ARI requests that change something (everything but GET), for "nothing changed" checks.
fn changes(sim: &TestSim) -> usize {
    sim.request_log()
        .iter()
        .filter(|r| r.method != "GET")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_works_through_any_controller() {
    let (hook, got) = receiver().await;
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_CONFERENCE__STATUS_CALLBACK", hook.as_str()),
            (
                "CONFROUTE_CONFERENCE__STATUS_CALLBACK_EVENT",
                "[\"mute\", \"hold\"]",
            ),
        ],
        &[],
    )
    .await;
    // Controller B places the conference; callers reach that node; A controls it.
    let owner = c.route(1, "room-1").await;
    let n = c.node(&owner);
    let other = c.other(&owner);
    let sim = &n.sim;
    let a = dial(sim, "room-1", &[]).await;
    let main = wait_bridged(sim, &a).await;
    assert!(
        main.starts_with("cr-") && main.ends_with("-room-1"),
        "{main}"
    );
    let b = dial(sim, "room-1", &[]).await;
    let m = dial(sim, "room-1", &[("CONFROUTE_MUTED", "true")]).await;
    for ch in [&b, &m] {
        assert_eq!(wait_bridged(sim, ch).await, main);
    }
    let room = json!({"conference": "room-1"});
    let who = |p: &str| json!({"conference": "room-1", "participant": p});
    let mut ws = c.client(0).await;

    // participant.list, and conference.get built on it.
    let list = ws.ok("participant.list", room.clone()).await;
    let mut want = vec![a.clone(), b.clone(), m.clone()];
    want.sort();
    assert_eq!(ids(&list), want);
    let pa = participant(&list, &a);
    assert_eq!(pa["caller"], "+15550001");
    assert_eq!(pa["muted"], false);
    assert_eq!(pa["held"], false);
    assert!(pa["joined_ms"]
        .as_u64()
        .is_some_and(|t| t > 1_600_000_000_000));
    assert_eq!(participant(&list, &m)["muted"], true);
    let conf = ws.ok("conference.get", room.clone()).await;
    assert_eq!(conf["node_id"], owner.as_str());
    assert_eq!(conf["participants"].as_array().map(Vec::len), Some(3));

    // Mute: ARI channel mute, direction in (the participant is not heard).
    assert_eq!(ws.ok("participant.mute", who(&a)).await, json!({}));
    until(sim, "a muted in", |s| {
        s.channel(&a).is_some_and(|c| c.muted_in && !c.muted_out)
    })
    .await;
    let list = ws.ok("participant.list", room.clone()).await;
    assert_eq!(participant(&list, &a)["muted"], true);
    assert_eq!(ws.ok("participant.unmute", who(&a)).await, json!({}));
    until(sim, "a unmuted", |s| {
        s.channel(&a).is_some_and(|c| !c.muted_in)
    })
    .await;
    // One who joined muted is muted on the channel, as a mute command does (a bridge mute
    // would have to be taken off by adding it to its bridge again).
    assert!(sim
        .snapshot()
        .channel(&m)
        .is_some_and(|c| c.muted_in && !c.bridge_mute));
    let adds = |sim: &confroute_tests::ari_sim::AriSim| {
        sim.request_log()
            .iter()
            .filter(|r| r.operation.as_deref() == Some("addChannel"))
            .count()
    };
    let adds_before = adds(sim);
    ws.ok("participant.unmute", who(&m)).await;
    until(sim, "m unmuted in the bridge", |s| {
        s.channel(&m).is_some_and(|c| {
            !c.bridge_mute && !c.muted_in && c.bridge.as_deref() == Some(main.as_str())
        })
    })
    .await;
    assert_eq!(adds(sim), adds_before, "unmuted without being added again");
    let list = ws.ok("participant.list", room.clone()).await;
    assert_eq!(participant(&list, &m)["muted"], false);

    // Hold: out of the mix into the holding bridge with music; unhold: back.
    assert_eq!(ws.ok("participant.hold", who(&b)).await, json!({}));
    let holding = main.replacen("cr-", "crh-", 1);
    until(sim, "b on hold", |s| {
        s.channel(&b).and_then(|c| c.bridge.as_deref()) == Some(holding.as_str())
            && s.bridge(&holding)
                .is_some_and(|h| h.bridge_type == "holding" && h.moh.as_deref() == Some("default"))
    })
    .await;
    let list = ws.ok("participant.list", room.clone()).await;
    assert_eq!(participant(&list, &b)["held"], true);
    ws.ok("participant.unhold", who(&b)).await;
    until(sim, "b back in the mix, holding bridge gone", |s| {
        s.channel(&b).and_then(|c| c.bridge.as_deref()) == Some(main.as_str())
            && s.bridge(&holding).is_none()
    })
    .await;
    let list = ws.ok("participant.list", room.clone()).await;
    assert_eq!(participant(&list, &b)["held"], false);

    // The mute and hold status callbacks.
    wait_for_async("mute and hold callbacks", WAIT, || async {
        (got.lock().expect("lock").len() >= 5).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", got.lock().expect("lock")));
    let events: Vec<(String, String)> = got
        .lock()
        .expect("lock")
        .iter()
        .map(|f| {
            (
                f["StatusCallbackEvent"].clone(),
                f.get("CallSid").cloned().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        events,
        vec![
            ("participant-mute".to_string(), a.clone()),
            ("participant-unmute".to_string(), a.clone()),
            ("participant-unmute".to_string(), m.clone()),
            ("participant-hold".to_string(), b.clone()),
            ("participant-unhold".to_string(), b.clone()),
        ]
    );

    // DTMF to the participant's far end.
    ws.ok(
        "participant.dtmf",
        json!({"conference": "room-1", "participant": a, "digits": "12#"}),
    )
    .await;
    until(sim, "DTMF sent", |s| {
        s.channel(&a).is_some_and(|c| c.dtmf_sent == "12#")
    })
    .await;

    // Playback to one participant and to the whole conference.
    let r = ws
        .ok(
            "participant.play",
            json!({"conference": "room-1", "participant": a, "media": "sound:hello-world"}),
        )
        .await;
    assert!(r["playback"].as_str().is_some_and(|p| !p.is_empty()), "{r}");
    let target = format!("channel:{a}");
    wait_for_async("playback to a", WAIT, || async {
        playback_started(sim, &target, "sound:hello-world").then_some(())
    })
    .await
    .expect("participant playback started");
    let r = ws
        .ok(
            "conference.play",
            json!({"conference": "room-1", "media": "sound:conf-onlyperson"}),
        )
        .await;
    assert!(r["playback"].is_string(), "{r}");
    let target = format!("bridge:{main}");
    wait_for_async("playback to the bridge", WAIT, || async {
        playback_started(sim, &target, "sound:conf-onlyperson").then_some(())
    })
    .await
    .expect("conference playback started");

    // Refusals change nothing.
    let before = changes(sim);
    for (method, params, code) in [
        ("participant.mute", who("nobody.1"), -32002),
        ("participant.hold", who("nobody.1"), -32002),
        ("participant.kick", who("nobody.1"), -32002),
        (
            "participant.dtmf",
            json!({"conference": "room-1", "participant": "nobody.1", "digits": "1"}),
            -32002,
        ),
        (
            "participant.play",
            json!({"conference": "room-1", "participant": "nobody.1", "media": "sound:x"}),
            -32002,
        ),
        (
            "participant.update",
            json!({"conference": "room-1", "participant": "nobody.1", "beepOnExit": true}),
            -32002,
        ),
        (
            "participant.move",
            json!({"conference": "room-1", "participant": "nobody.1", "to": "room-9"}),
            -32002,
        ),
        (
            "participant.mute",
            json!({"conference": "nowhere", "participant": a}),
            -32001,
        ),
        (
            "participant.dtmf",
            json!({"conference": "room-1", "participant": a, "digits": "1X"}),
            -32602,
        ),
        (
            "participant.mute",
            json!({"conference": "room-1", "participant": "a/b"}),
            -32602,
        ),
    ] {
        let (got, msg) = ws.err(method, params.clone()).await;
        assert_eq!(got, code, "{method} {params}: {msg}");
        assert!(!msg.is_empty());
    }
    assert_eq!(changes(sim), before, "refused commands touched Asterisk");
    let moved_to = fixtures::store(&c.cfg)
        .lookup(&"room-9".parse().expect("name"))
        .await
        .expect("lookup");
    assert_eq!(
        moved_to, None,
        "a refused move leaves no claim on its target"
    );
    // Nor a trace of one: the target's first life starts at epoch 1.
    let store = fixtures::store(&c.cfg);
    let room9 = "room-9".parse().expect("name");
    let first = store
        .claim(&room9, &[fixtures::id(&other.id)])
        .await
        .expect("claim")
        .owner
        .expect("placed");
    assert_eq!(first.epoch, 1, "a refused move claimed its target");
    store.release(&room9, &first).await.expect("release");

    // Two more callers, for the moves, the kick and the update.
    let d = dial(sim, "room-1", &[]).await;
    let e = dial(sim, "room-1", &[]).await;
    wait_bridged(sim, &d).await;
    wait_bridged(sim, &e).await;

    // Move to a conference of the same node: bridge to bridge.
    let x = dial(sim, "room-2", &[]).await;
    let main2 = wait_bridged(sim, &x).await;
    let r = ws
        .ok(
            "participant.move",
            json!({"conference": "room-1", "participant": a, "to": "room-2"}),
        )
        .await;
    assert_eq!(r["moved"], "bridge", "{r}");
    until(sim, "a in room-2's bridge", |s| {
        s.channel(&a).and_then(|c| c.bridge.as_deref()) == Some(main2.as_str())
    })
    .await;
    let l1 = ws.ok("participant.list", room.clone()).await;
    assert!(!ids(&l1).contains(&a), "{l1}");
    let l2 = ws
        .ok("participant.list", json!({"conference": "room-2"}))
        .await;
    assert!(ids(&l2).contains(&a), "{l2}");

    // Move to a conference of the other node: redirected there (REFER once answered).
    let y = dial(&other.sim, "room-3", &[]).await;
    wait_bridged(&other.sim, &y).await;
    let r = ws
        .ok(
            "participant.move",
            json!({"conference": "room-1", "participant": b, "to": "room-3"}),
        )
        .await;
    assert_eq!(r["moved"], "redirect", "{r}");
    let endpoint = format!("PJSIP/sip:room-3@{}.test:5060", other.id);
    assert_eq!(r["endpoint"], endpoint.as_str());
    until(sim, "b redirected and gone", |s| s.channel(&b).is_none()).await;
    let redirect = sim
        .request_log()
        .into_iter()
        .find(|r| r.operation.as_deref() == Some("redirect"))
        .expect("a redirect request");
    assert_eq!(redirect.path, format!("/ari/channels/{b}/redirect"));
    wait_unlisted(&mut ws, "room-1", &b).await;

    // Kick: hung up, out of the bridge.
    assert_eq!(ws.ok("participant.kick", who(&m)).await, json!({}));
    assert_eq!(wait_hangup(sim, &m).await, 16);
    let l1 = ws.ok("participant.list", room.clone()).await;
    assert!(!ids(&l1).contains(&m), "{l1}");

    // Update: d now ends the conference when it leaves.
    ws.ok(
        "participant.update",
        json!({"conference": "room-1", "participant": d, "endConferenceOnExit": true}),
    )
    .await;
    sim.hangup_far_end(&d, 16).await.expect("d leaves");
    assert_eq!(wait_hangup(sim, &e).await, 16, "e hung up by the end");
    until(sim, "room-1's bridge gone", |s| s.bridge(&main).is_none()).await;

    // conference.end: everyone hung up, bridge destroyed, claim released.
    let store = fixtures::store(&c.cfg);
    let r = ws
        .ok("conference.end", json!({"conference": "room-2"}))
        .await;
    assert_eq!(r, json!({"ended": true}));
    for ch in [&a, &x] {
        assert_eq!(wait_hangup(sim, ch).await, 16);
    }
    until(sim, "room-2's bridge gone", |s| s.bridge(&main2).is_none()).await;
    wait_for_async("room-1 and room-2 claims released", WAIT, || async {
        let r1 = store.lookup(&"room-1".parse().ok()?).await.ok()?;
        let r2 = store.lookup(&"room-2".parse().ok()?).await.ok()?;
        (r1.is_none() && r2.is_none()).then_some(())
    })
    .await
    .expect("claims released");
    let (code, _) = ws
        .err("participant.list", json!({"conference": "room-2"}))
        .await;
    assert_eq!(code, -32001, "an ended conference has no home");

    // The node counted what it did.
    let metrics = fixtures::scrape(&n.proc.http_url()).await;
    for (method, outcome) in [
        ("participant.mute", "ok"),
        ("participant.unmute", "ok"),
        ("participant.hold", "ok"),
        ("participant.kick", "ok"),
        ("participant.move", "ok"),
        ("conference.end", "ok"),
        ("participant.mute", "participant_not_found"),
    ] {
        let series =
            format!(r#"confroute_node_commands_total{{method="{method}",outcome="{outcome}"}}"#);
        assert!(
            fixtures::metric(&metrics, &series) >= 1.0,
            "{series}\n{metrics}"
        );
    }
    assert!(
        metrics.contains(&format!(
            r#"confroute_node_info{{node_id="{owner}",zone=""}} 1"#
        )),
        "{metrics}"
    );
}

/// `conference.end` with an epoch ends that life of the conference only: asked for another
/// epoch, the controller leaves the conference alone (RPC -32001, REST 404), and so does the
/// node when the command reaches it naming an epoch the conference no longer lives at (the
/// name ended and was claimed again between the controller's look and the command), live
/// or placed and unreached. Asked for its own epoch, it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_naming_an_epoch_ends_that_life_only() {
    let c = Cluster::start(&[], &[]).await;
    let store = fixtures::store(&c.cfg);
    let owner = c.route(0, "life").await;
    let sim = &c.node(&owner).sim;
    let a = dial(sim, "life", &[]).await;
    wait_bridged(sim, &a).await;
    let name = "life".parse().expect("name");
    let epoch = store
        .lookup(&name)
        .await
        .expect("lookup")
        .expect("homed")
        .owner
        .epoch;
    let mut ws = c.client(0).await;

    let (code, msg) = ws
        .err(
            "conference.end",
            json!({"conference": "life", "epoch": epoch + 1}),
        )
        .await;
    assert_eq!(code, -32001, "{msg}");
    assert!(msg.contains(&format!("lives at epoch {epoch}")), "{msg}");
    let (code, msg) = ws
        .err(
            "conference.end",
            json!({"conference": "life", "epoch": "one"}),
        )
        .await;
    assert_eq!(code, -32602, "{msg}");
    let http = fixtures::http();
    let url = format!("{}/v1/conferences/life", c.controllers[1].http_url());
    let r = http
        .delete(format!("{url}?epoch={}", epoch + 1))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status().as_u16(), 404);
    let body: Value = r.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "conference_not_found", "{body}");
    for bad in ["epoch=x", "epoch=", "epoch=1&epoch=2", "life=1"] {
        let r = http
            .delete(format!("{url}?{bad}"))
            .send()
            .await
            .expect("DELETE");
        assert_eq!(r.status().as_u16(), 400, "{bad}");
        let body: Value = r.json().await.expect("JSON error");
        assert_eq!(body["error"]["code"], "invalid_request", "{bad}: {body}");
    }

    // Straight to the node, past the controller's look, as after a race with a new life.
    let bus = confroute_shared::bus::Bus::controller(store.clone());
    assert!(bus.wait_connected(WAIT).await, "bus up");
    let at_node = |conference: &'static str, epoch: u64| {
        let bus = bus.clone();
        let owner = fixtures::id(&owner);
        async move {
            bus.call(
                &owner,
                "conference.end",
                json!({"conference": conference, "epoch": epoch}),
                WAIT,
                false,
            )
            .await
            .expect("sent")
            .reply
        }
    };
    let refused = at_node("life", epoch + 5).await.expect_err("another life");
    assert_eq!(
        refused.code,
        confroute_shared::bus::ErrorCode::ConferenceNotFound,
        "{refused:?}"
    );
    assert!(
        refused.message.contains(&format!("lives at epoch {epoch}")),
        "{refused:?}"
    );
    // Placed on the node and not reached by anyone: its claim stays too.
    let ghost: confroute_shared::name::ConferenceName = "ghost-life".parse().expect("name");
    let placed = store
        .claim(&ghost, &[fixtures::id(&owner)])
        .await
        .expect("claim")
        .owner
        .expect("placed");
    let refused = at_node("ghost-life", placed.epoch + 1)
        .await
        .expect_err("another life");
    assert!(refused.message.contains("lives at epoch"), "{refused:?}");
    assert!(store.lookup(&ghost).await.expect("lookup").is_some());
    assert_eq!(
        at_node("ghost-life", placed.epoch).await,
        Ok(json!({"ended": true}))
    );
    assert!(store.lookup(&ghost).await.expect("lookup").is_none());
    assert!(
        sim.snapshot().channel(&a).is_some(),
        "the caller of the live conference is still there"
    );
    assert_eq!(
        store
            .lookup(&name)
            .await
            .expect("lookup")
            .map(|r| r.owner.epoch),
        Some(epoch)
    );

    // Its own epoch, over REST: ended.
    let r = http
        .delete(format!("{url}?epoch={epoch}"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(wait_hangup(sim, &a).await, 16);
}

/// A conference placed on a node that no caller has reached (a route claimed it): it lists
/// empty (as its record says), other commands on it are not found there, but ending it gives
/// its claim back at once; ending it again finds no home. Asterisk is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conference_the_node_does_not_host_is_not_found() {
    let c = Cluster::start(&[], &[]).await;
    // A claim without any call: Redis names node-a, but node-a hosts nothing.
    let store = fixtures::store(&c.cfg);
    let ghost = "ghost".parse().expect("name");
    store
        .claim(&ghost, &[fixtures::id("node-a")])
        .await
        .expect("claim");
    let mut ws = c.client(1).await;
    let before = changes(&c.node("node-a").sim);
    let listed = ws
        .ok("participant.list", json!({"conference": "ghost"}))
        .await;
    assert_eq!(listed["participants"], json!([]), "{listed}");
    assert_eq!(listed["seats_taken"], 0, "{listed}");
    assert!(listed["max_participants"].as_u64().is_some(), "{listed}");
    for (method, params) in [
        (
            "conference.play",
            json!({"conference": "ghost", "media": "sound:beep"}),
        ),
        (
            "participant.kick",
            json!({"conference": "ghost", "participant": "x.1"}),
        ),
    ] {
        let (code, msg) = ws.err(method, params).await;
        assert_eq!(code, -32001, "{method}: {msg}");
        assert!(msg.contains("node-a"), "{msg}");
    }
    assert!(store.lookup(&ghost).await.expect("lookup").is_some());
    let r = ws
        .ok("conference.end", json!({"conference": "ghost"}))
        .await;
    assert_eq!(r, json!({"ended": true}));
    assert!(
        store.lookup(&ghost).await.expect("lookup").is_none(),
        "the claim is given back at once"
    );
    let (code, msg) = ws
        .err("conference.end", json!({"conference": "ghost"}))
        .await;
    assert_eq!(code, -32001, "ended already: {msg}");
    assert_eq!(changes(&c.node("node-a").sim), before);
}

/// `conference.play` with nobody in the mix (the only caller waits for the start) is
/// refused rather than played to an empty bridge; once someone is in the mix, it plays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conference_play_nobody_would_hear_is_refused() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(1, "waiting-room").await;
    let sim = &c.node(&owner).sim;
    let w = dial(
        sim,
        "waiting-room",
        &[("CONFROUTE_START_ON_ENTER", "false")],
    )
    .await;
    let holding = wait_bridged(sim, &w).await;
    assert!(holding.starts_with("crh-"), "{holding}");
    let mut ws = c.client(0).await;
    let play = json!({"conference": "waiting-room", "media": "sound:conf-waitforleader"});
    let (code, msg) = ws.err("conference.play", play.clone()).await;
    assert_eq!(code, -32006, "{msg}");
    assert!(
        !sim.request_log()
            .iter()
            .any(|r| r.method == "POST" && r.path.contains("/play")),
        "nothing played"
    );
    let s = dial(sim, "waiting-room", &[]).await;
    let main = wait_bridged(sim, &s).await;
    until(sim, "the waiter in the mix", |snap| {
        snap.channel(&w).and_then(|c| c.bridge.clone()) == Some(main.clone())
    })
    .await;
    let r = ws.ok("conference.play", play).await;
    assert!(r["playback"].as_str().is_some(), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_held_before_the_start_joins_the_mix_on_unhold() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(1, "held-waiter").await;
    let sim = &c.node(&owner).sim;
    let w = dial(
        sim,
        "held-waiter",
        &[
            ("CONFROUTE_START_ON_ENTER", "false"),
            ("CONFROUTE_MUTED", "true"),
        ],
    )
    .await;
    let holding = wait_bridged(sim, &w).await;
    assert!(holding.starts_with("crh-"), "{holding}");
    let main = holding.replacen("crh-", "cr-", 1);
    let room = json!({"conference": "held-waiter"});
    let who = json!({"conference": "held-waiter", "participant": w});
    let mut ws = c.client(0).await;
    assert_eq!(ws.ok("participant.hold", who.clone()).await, json!({}));

    // The starter starts the conference; the held waiter stays with the music.
    let s = dial(sim, "held-waiter", &[]).await;
    assert_eq!(wait_bridged(sim, &s).await, main);
    let list = ws.ok("participant.list", room.clone()).await;
    assert_eq!(participant(&list, &w)["held"], true, "{list}");
    assert_eq!(
        sim.snapshot().channel(&w).and_then(|c| c.bridge.clone()),
        Some(holding.clone())
    );

    // Unheld, it joins the mix, still muted, and waits no more.
    assert_eq!(ws.ok("participant.unhold", who).await, json!({}));
    until(sim, "the waiter in the mix, holding bridge gone", |snap| {
        snap.channel(&w).is_some_and(|ch| {
            ch.bridge.as_deref() == Some(main.as_str()) && ch.muted_in && !ch.bridge_mute
        }) && snap.bridge(&holding).is_none()
    })
    .await;
    let list = ws.ok("participant.list", room).await;
    let pw = participant(&list, &w);
    assert_eq!(
        (&pw["waiting"], &pw["held"], &pw["muted"]),
        (&json!(false), &json!(false), &json!(true)),
        "{list}"
    );
}

/// Asterisk before asterisk/asterisk#1094 answers a create of a bridge that exists with 500,
/// not 409. A holding bridge made by a request the agent gave up on (its answer came after
/// the ARI request timeout) is found and used by the next hold, not refused for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_uses_the_holding_bridge_a_timed_out_create_made_on_older_asterisk() {
    let c = Cluster::start_tuned(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_ARI__REQUEST_TIMEOUT", "300ms"),
        ],
        &[],
        |s| s.bridge_update_on_create = true,
    )
    .await;
    let (sim, a) = first_caller(&c, "old-ast", &[]).await;
    let main = wait_bridged(sim, &a).await;
    let holding = main.replacen("cr-", "crh-", 1);
    let who = json!({"conference": "old-ast", "participant": a});
    let mut ws = c.client(0).await;
    sim.hold_operation("createWithId");
    let (code, message) = ws.err("participant.hold", who.clone()).await;
    assert_eq!(sim.held_requests("createWithId"), 1, "{code} {message}");
    sim.release_operation("createWithId");
    until(sim, "the holding bridge made after all", |snap| {
        snap.bridge(&holding).is_some()
    })
    .await;
    assert_eq!(ws.ok("participant.hold", who).await, json!({}));
    until(sim, "a on hold", |snap| {
        snap.channel(&a).and_then(|ch| ch.bridge.as_deref()) == Some(holding.as_str())
    })
    .await;
}

/// Asterisk runs a channel's commands one at a time, and a playback holds the channel until
/// it ends. A hold asked during a participant's announcement stops the announcement first:
/// the caller goes on hold at once, not after the announcement (and after the request's
/// timeout, the hold then carried out behind the agent's back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_during_an_announcement_stops_it_and_holds_at_once() {
    let c = Cluster::start_tuned(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_ARI__REQUEST_TIMEOUT", "500ms"),
        ],
        &[],
        |s| s.playback_duration = std::time::Duration::from_secs(60),
    )
    .await;
    let (sim, a) = first_caller(&c, "announce", &[]).await;
    let main = wait_bridged(sim, &a).await;
    let holding = main.replacen("cr-", "crh-", 1);
    let mut ws = c.client(0).await;
    ws.ok(
        "participant.play",
        json!({"conference": "announce", "participant": a, "media": "sound:long-notice"}),
    )
    .await;
    let target = format!("channel:{a}");
    wait_for_async("the announcement playing", WAIT, || async {
        playback_started(sim, &target, "sound:long-notice").then_some(())
    })
    .await
    .expect("announcement started");
    let who = json!({"conference": "announce", "participant": a});
    assert_eq!(ws.ok("participant.hold", who).await, json!({}));
    until(sim, "a on hold", |snap| {
        snap.channel(&a).and_then(|ch| ch.bridge.as_deref()) == Some(holding.as_str())
    })
    .await;
    assert!(
        sim.event_log()
            .iter()
            .any(|e| e["type"] == "PlaybackFinished"
                && e["playback"]["target_uri"] == target.as_str()),
        "the announcement was stopped"
    );
    let list = ws
        .ok("participant.list", json!({"conference": "announce"}))
        .await;
    assert_eq!(participant(&list, &a)["held"], true, "{list}");
}

/// Asterisk carries out a request it has read even when the agent gave up waiting for its
/// answer (the ARI request timeout). A hold and an unhold reported failed but carried out
/// later are undone by the next reconciliation: the caller is back where the application
/// was told it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_or_unhold_carried_out_after_its_timeout_is_undone_by_reconciliation() {
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_ARI__REQUEST_TIMEOUT", "300ms"),
            ("CONFROUTE_ARI__RECONCILE_INTERVAL", "1s"),
        ],
        &[],
    )
    .await;
    let (sim, a) = first_caller(&c, "late-hold", &[]).await;
    let main = wait_bridged(sim, &a).await;
    let holding = main.replacen("cr-", "crh-", 1);
    let who = json!({"conference": "late-hold", "participant": a});
    let mut ws = c.client(0).await;
    let in_bridge = |bridge: &str| {
        let bridge = bridge.to_string();
        let a = a.clone();
        move |snap: &SimSnapshot| {
            snap.channel(&a).and_then(|ch| ch.bridge.clone()) == Some(bridge.clone())
        }
    };

    // The hold's addChannel waits in Asterisk past the agent's timeout, then runs.
    sim.hold_operation("addChannel");
    let (code, message) = ws.err("participant.hold", who.clone()).await;
    assert_eq!(sim.held_requests("addChannel"), 1, "{code} {message}");
    let entered_holding = entries(sim, &a, &holding);
    sim.release_operation("addChannel");
    wait_for_async("the late hold carried out", WAIT, || async {
        (entries(sim, &a, &holding) > entered_holding).then_some(())
    })
    .await
    .expect("a entered the holding bridge");
    until(sim, "a back in the mix", in_bridge(&main)).await;
    until(sim, "the holding bridge gone", |snap| {
        snap.bridge(&holding).is_none()
    })
    .await;
    let list = ws
        .ok("participant.list", json!({"conference": "late-hold"}))
        .await;
    assert_eq!(participant(&list, &a)["held"], false, "{list}");

    // Now on hold for real; the unhold's addChannel is the one carried out late.
    assert_eq!(ws.ok("participant.hold", who.clone()).await, json!({}));
    until(sim, "a on hold", |snap| {
        snap.channel(&a)
            .and_then(|ch| ch.bridge.as_deref())
            .is_some_and(|b| b.starts_with("crh-"))
    })
    .await;
    // A new holding bridge: the last one was destroyed with its last caller.
    let holding = sim
        .snapshot()
        .channel(&a)
        .and_then(|ch| ch.bridge.clone())
        .expect("a's holding bridge");
    sim.hold_operation("addChannel");
    let (code, message) = ws.err("participant.unhold", who.clone()).await;
    assert_eq!(sim.held_requests("addChannel"), 1, "{code} {message}");
    let entered_main = entries(sim, &a, &main);
    sim.release_operation("addChannel");
    wait_for_async("the late unhold carried out", WAIT, || async {
        (entries(sim, &a, &main) > entered_main).then_some(())
    })
    .await
    .expect("a entered the mix");
    until(sim, "a back on hold", in_bridge(&holding)).await;
    let list = ws
        .ok("participant.list", json!({"conference": "late-hold"}))
        .await;
    assert_eq!(participant(&list, &a)["held"], true, "{list}");
}

/// A start whose move of a waiter into the mix timed out leaves the waiter waiting in the
/// agent's view; Asterisk moves it later, with the bridge mute of that moment. The next
/// reconciliation settles it: the waiter is listed in the mix, waiting no more, with the
/// bridge mute its mute now calls for, and the holding bridge goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_move_carried_out_after_its_timeout_is_settled_by_reconciliation() {
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_ARI__REQUEST_TIMEOUT", "300ms"),
            ("CONFROUTE_ARI__RECONCILE_INTERVAL", "1s"),
        ],
        &[],
    )
    .await;
    let owner = c.route(1, "late-start").await;
    let sim = &c.node(&owner).sim;
    let w = dial(sim, "late-start", &[("CONFROUTE_START_ON_ENTER", "false")]).await;
    let holding = wait_bridged(sim, &w).await;
    assert!(holding.starts_with("crh-"), "{holding}");
    let main = holding.replacen("crh-", "cr-", 1);
    let mut ws = c.client(0).await;
    let who = json!({"conference": "late-start", "participant": w});
    // Muted while waiting: the start moves it in with the bridge mute.
    assert_eq!(ws.ok("participant.mute", who.clone()).await, json!({}));
    let held = format!("addChannel {w}");
    sim.hold_operation(&held);
    let s = dial(sim, "late-start", &[]).await;
    assert_eq!(wait_bridged(sim, &s).await, main);
    wait_for_async("the waiter's move held", WAIT, || async {
        (sim.held_requests(&held) == 1).then_some(())
    })
    .await
    .expect("the start moves the waiter");
    // Past the agent's timeout the waiter is still listed waiting.
    let node = &c.node(&owner).proc;
    wait_for_async("the move given up", WAIT, || async {
        node.output()
            .contains("cannot add participants to the bridge")
            .then_some(())
    })
    .await
    .expect("the start's move timed out");
    assert!(waiting(&mut ws, "late-start", &w).await);
    // Unmuted before the late move lands: nothing in the mix to take a bridge mute off yet.
    assert_eq!(ws.ok("participant.unmute", who).await, json!({}));
    let entered_main = entries(sim, &w, &main);
    sim.release_operation(&held);
    wait_for_async("the late move carried out", WAIT, || async {
        (entries(sim, &w, &main) > entered_main).then_some(())
    })
    .await
    .expect("the waiter entered the mix");
    until(
        sim,
        "the waiter in the mix without a bridge mute, the holding bridge gone",
        |snap| {
            snap.channel(&w).is_some_and(|ch| {
                ch.bridge.as_deref() == Some(main.as_str()) && !ch.bridge_mute && !ch.muted_in
            }) && snap.bridge(&holding).is_none()
        },
    )
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    while waiting(&mut ws, "late-start", &w).await {
        assert!(
            std::time::Instant::now() < deadline,
            "{w} still listed waiting"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Whether `participant.list` shows `id` of `conference` waiting for the start.
async fn waiting(ws: &mut Client, conference: &str, id: &str) -> bool {
    let list = ws
        .ok("participant.list", json!({"conference": conference}))
        .await;
    participant(&list, id)["waiting"] == true
}

/// How many times `ch` entered `bridge`, as the simulator's events say.
fn entries(sim: &TestSim, ch: &str, bridge: &str) -> usize {
    sim.event_log()
        .iter()
        .filter(|e| {
            e["type"] == "ChannelEnteredBridge"
                && e["channel"]["id"] == ch
                && e["bridge"]["id"] == bridge
        })
        .count()
}

/// Conference `from` with callers a and b, and `to` with caller x, on one node (so a move
/// between them is bridge to bridge); returns the node's simulator, a, b, x and a client
/// that has seen all three listed.
async fn two_conferences_on_one_node<'a>(
    c: &'a Cluster,
    from: &str,
    to: &str,
    x_vars: &[(&str, &str)],
) -> (&'a TestSim, String, String, String, Client) {
    let owner = c.route(1, from).await;
    let sim = &c.node(&owner).sim;
    let a = dial(sim, from, &[]).await;
    let b = dial(sim, from, &[]).await;
    wait_bridged(sim, &a).await;
    wait_bridged(sim, &b).await;
    let x = dial(sim, to, x_vars).await;
    wait_bridged(sim, &x).await;
    // Every join has had its answers: the agent lists all three callers.
    let mut ws = c.client(0).await;
    for (conf, n) in [(from, 2), (to, 1)] {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let l = ws
                .ok("participant.list", json!({ "conference": conf }))
                .await;
            if ids(&l).len() == n {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{conf}: {l}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    (sim, a, b, x, ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_hanging_up_during_a_move_leaves_no_ghost_behind() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let (sim, a, _b, x, mut ws) = two_conferences_on_one_node(&c, "from-1", "to-1", &[]).await;
    // The caller hangs up while Asterisk carries out the addChannel (answered 204), and the
    // agent hears its StasisEnd before that answer.
    sim.hangup_during_add(&a);
    sim.hold_operation("answer addChannel");
    let mut mover = c.client(0).await;
    let params = json!({"conference": "from-1", "participant": a, "to": "to-1"});
    let moved = tokio::spawn(async move { mover.err("participant.move", params).await });
    wait_for_async("the addChannel done, its answer held", WAIT, || async {
        (sim.held_requests("answer addChannel") == 1).then_some(())
    })
    .await
    .expect("the move adds the caller");
    wait_unlisted(&mut ws, "from-1", &a).await;
    sim.release_operation("answer addChannel");
    let (code, msg) = moved.await.expect("the move's answer");
    assert_eq!(code, -32002, "the participant is gone: {msg}");
    let to = ws
        .ok("participant.list", json!({"conference": "to-1"}))
        .await;
    assert_eq!(ids(&to), vec![x.clone()], "no ghost in the target: {to}");
    let rec = fixtures::store(&c.cfg)
        .lookup(&"to-1".parse().expect("name"))
        .await
        .expect("lookup")
        .expect("claimed");
    assert_eq!(rec.participants, 1, "the target counts its one caller");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_conference_during_a_move_keeps_the_caller_being_moved() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let (sim, a, b, x, mut ws) = two_conferences_on_one_node(&c, "from-2", "to-2", &[]).await;
    // The target has added the caller to its bridge; the answer is held while the source
    // conference is ended.
    ws.ok("subscribe", json!({"conference": "from-2"})).await;
    let moved = held_move(&c, sim, "from-2", &a, "to-2").await;
    ws.ok("conference.end", json!({"conference": "from-2"}))
        .await;
    assert_eq!(
        wait_hangup(sim, &b).await,
        16,
        "the one who stayed is hung up"
    );
    // Subscribers hear both leave before the end: the caller being moved by its move.
    let mut left = Vec::new();
    loop {
        let ev = ws
            .notification("event", WAIT)
            .await
            .expect("the ended conference's events");
        let p = &ev["params"];
        match p["event"].as_str() {
            Some("leave") => left.push((
                p["data"]["participant"].as_str().unwrap_or("").to_string(),
                p["data"]["reason"].as_str().unwrap_or("").to_string(),
            )),
            Some("end") => break,
            _ => {}
        }
    }
    left.sort();
    let mut want = vec![
        (a.clone(), "moved".to_string()),
        (b.clone(), "conference_ended".to_string()),
    ];
    want.sort();
    assert_eq!(left, want);
    let store = fixtures::store(&c.cfg);
    wait_for_async("the ended conference's claim released", WAIT, || async {
        let rec = store.lookup(&"from-2".parse().ok()?).await.ok()?;
        rec.is_none().then_some(())
    })
    .await
    .expect("released");
    sim.release_operation("answer addChannel");
    assert_moved_in(sim, &mut ws, moved, &a, &x, "to-2").await;
}

/// Starts moving `a` from `from` to `to` between conferences of one node, and returns once
/// the target has added it to its bridge, with that answer held; the handle gives the
/// move's own answer once `answer addChannel` is released.
async fn held_move(
    c: &Cluster,
    sim: &TestSim,
    from: &str,
    a: &str,
    to: &str,
) -> tokio::task::JoinHandle<Value> {
    sim.hold_operation("answer addChannel");
    let mut mover = c.client(0).await;
    let params = json!({"conference": from, "participant": a, "to": to});
    let moved = tokio::spawn(async move { mover.ok("participant.move", params).await });
    wait_for_async("the addChannel done, its answer held", WAIT, || async {
        (sim.held_requests("answer addChannel") == 1).then_some(())
    })
    .await
    .expect("the move adds the caller");
    moved
}

/// The move answered success, and `a` is in `to` beside `x`, in its bridge, never hung up.
async fn assert_moved_in(
    sim: &TestSim,
    ws: &mut Client,
    moved: tokio::task::JoinHandle<Value>,
    a: &str,
    x: &str,
    to: &str,
) {
    let done = moved.await.expect("the move's answer");
    assert_eq!(done["to"], to, "{done}");
    let hung_up: Vec<_> = sim
        .request_log()
        .into_iter()
        .filter(|r| r.operation.as_deref() == Some("hangup") && r.path.ends_with(a))
        .collect();
    assert!(
        hung_up.is_empty(),
        "the caller being moved was hung up: {hung_up:?}"
    );
    let list = ws.ok("participant.list", json!({ "conference": to })).await;
    let mut want = vec![a.to_string(), x.to_string()];
    want.sort();
    let mut got = ids(&list);
    got.sort();
    assert_eq!(got, want, "{list}");
    let snap = sim.snapshot();
    assert_eq!(
        snap.channel(a).and_then(|ch| ch.bridge.clone()),
        snap.channel(x).and_then(|ch| ch.bridge.clone()),
        "the moved caller hears the target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_on_a_caller_being_moved_are_refused_and_the_move_completes() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let (sim, a, _b, x, mut ws) = two_conferences_on_one_node(&c, "from-3", "to-3", &[]).await;
    let moved = held_move(&c, sim, "from-3", &a, "to-3").await;
    for method in [
        "participant.hold",
        "participant.mute",
        "participant.kick",
        "participant.move",
        "participant.update",
    ] {
        let mut params = json!({"conference": "from-3", "participant": a});
        if method == "participant.move" {
            params["to"] = json!("to-3");
        }
        // The options go with the caller to its new conference: a change here would be
        // reported done and never apply.
        if method == "participant.update" {
            params["endConferenceOnExit"] = json!(true);
        }
        let (code, msg) = ws.err(method, params).await;
        assert_eq!(code, -32006, "{method}: {msg}");
        assert!(msg.contains("move"), "{method}: {msg}");
    }
    sim.release_operation("answer addChannel");
    assert_moved_in(sim, &mut ws, moved, &a, &x, "to-3").await;
}

/// A waiter being moved to another conference is the target's: a starter joining its old
/// conference meanwhile does not pull it back into the old mix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_does_not_pull_back_a_waiter_being_moved_out() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(1, "from-w").await;
    let sim = &c.node(&owner).sim;
    let w = dial(sim, "from-w", &[("CONFROUTE_START_ON_ENTER", "false")]).await;
    wait_bridged(sim, &w).await;
    let x = dial(sim, "to-w", &[]).await;
    wait_bridged(sim, &x).await;
    let mut ws = c.client(0).await;
    for conf in ["from-w", "to-w"] {
        let deadline = std::time::Instant::now() + WAIT;
        while ids(&ws
            .ok("participant.list", json!({ "conference": conf }))
            .await)
        .len()
            != 1
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{conf} lists its caller"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let moved = held_move(&c, sim, "from-w", &w, "to-w").await;
    // A starter joins the old conference while the move's answer is held.
    let starter = dial(sim, "from-w", &[]).await;
    wait_bridged(sim, &starter).await;
    sim.release_operation("answer addChannel");
    assert_moved_in(sim, &mut ws, moved, &w, &x, "to-w").await;
    let from = ws
        .ok("participant.list", json!({"conference": "from-w"}))
        .await;
    assert_eq!(ids(&from), vec![starter.clone()], "{from}");
}

/// Moves `a` from `from` to `to` while `to` brings in a caller of its own (`y`, its
/// addChannel answer held until the test releases "answer addChannel"), so the move waits
/// behind it; returns once the source has the move (it refuses other commands for `a`):
/// `y` and the move's error, to come.
async fn move_behind_a_filling_target(
    c: &Cluster,
    sim: &TestSim,
    ws: &mut Client,
    from: &str,
    a: &str,
    to: &str,
) -> (String, tokio::task::JoinHandle<(i64, String)>) {
    sim.hold_operation("answer addChannel");
    let y = dial(sim, to, &[]).await;
    wait_for_async("the target adding its own caller", WAIT, || async {
        (sim.held_requests("answer addChannel") == 1).then_some(())
    })
    .await
    .expect("the target joins its caller");
    let mut mover = c.client(0).await;
    let params = json!({"conference": from, "participant": a, "to": to});
    let moved = tokio::spawn(async move { mover.err("participant.move", params).await });
    let who = json!({"conference": from, "participant": a});
    let deadline = std::time::Instant::now() + WAIT;
    while ws.call("participant.mute", who.clone()).await["error"]["code"] != -32006 {
        assert!(
            std::time::Instant::now() < deadline,
            "the move never reached the source"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    (y, moved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_refused_after_its_conference_ended_hangs_the_caller_up() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let room_for_two = [("CONFROUTE_MAX_PARTICIPANTS", "2")];
    let (sim, a, b, _x, mut ws) =
        two_conferences_on_one_node(&c, "from-4", "to-4", &room_for_two).await;
    // The target is busy bringing in a caller of its own, which fills it: the move waits
    // behind that, while its old conference ends.
    let (y, moved) = move_behind_a_filling_target(&c, sim, &mut ws, "from-4", &a, "to-4").await;
    ws.ok("conference.end", json!({"conference": "from-4"}))
        .await;
    assert_eq!(
        wait_hangup(sim, &b).await,
        16,
        "the one who stayed is hung up"
    );
    sim.release_operation("answer addChannel");
    let (code, msg) = moved.await.expect("the move's answer");
    assert_eq!(code, -32005, "the target is full: {msg}");
    assert_eq!(
        wait_hangup(sim, &a).await,
        16,
        "the caller whose conference ended and whose move was refused is hung up"
    );
    wait_bridged(sim, &y).await;
}

/// A move's add can end its target: the mix it joins starts a new recording, whose write
/// finds the conference claimed by another node (under `on_ownership_lost = end`). The
/// caller, out of its old conference and in none now, is hung up and the move answered
/// with the reason, not counted in a conference that is over and left in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_whose_target_ends_as_it_adds_the_caller_hangs_it_up() {
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_NODE__ON_OWNERSHIP_LOST", "end"),
        ],
        &[],
    )
    .await;
    let record = [("CONFROUTE_RECORD", "record-from-start")];
    let (sim, a, _b, x, mut ws) = two_conferences_on_one_node(&c, "from-7", "to-7", &record).await;
    // The target's only caller goes on hold: its recording leaves the emptied mix, so the
    // next caller in the mix starts a new one.
    let mark = sim.event_count();
    let who = json!({"conference": "to-7", "participant": x});
    assert_eq!(ws.ok("participant.hold", who).await, json!({}));
    sim.wait_for_event_after(mark, WAIT, |e| e["type"] == "RecordingFinished")
        .await
        .expect("the recording left with the last caller in the mix");
    ws.ok("subscribe", json!({"conference": "from-7"})).await;
    sim.hold_operation("answer addChannel");
    let mut mover = c.client(0).await;
    let params = json!({"conference": "from-7", "participant": a, "to": "to-7"});
    let moved = tokio::spawn(async move { mover.err("participant.move", params).await });
    wait_for_async("the addChannel done, its answer held", WAIT, || async {
        (sim.held_requests("answer addChannel") == 1).then_some(())
    })
    .await
    .expect("the move adds the caller");
    // Another node holds the target's claim by the time the recording's write reaches Redis
    // (the agent's actor is waiting on the add, so nothing notices it before).
    let owner = c
        .nodes
        .iter()
        .find(|n| std::ptr::eq(&n.sim, sim))
        .map(|n| n.id.clone())
        .expect("the conferences' node");
    let other = if owner == "node-a" {
        "node-b"
    } else {
        "node-a"
    };
    c.redis
        .query(
            redis::cmd("HSET")
                .arg("{confroute}:conf:to-7")
                .arg("owner")
                .arg(other)
                .arg("epoch")
                .arg(99),
        )
        .expect("hset");
    sim.release_operation("answer addChannel");
    let (code, msg) = moved.await.expect("the move's answer");
    assert_eq!(code, -32001, "the target ended: {msg}");
    assert!(msg.contains("ended as participant"), "{msg}");
    assert_eq!(
        wait_hangup(sim, &a).await,
        16,
        "the caller whose target ended is hung up"
    );
    assert_eq!(wait_hangup(sim, &x).await, 16, "the target ended");
    // Its old conference saw it leave by its move.
    let left = ws
        .notification_where("event", WAIT, |p| {
            p["event"] == "leave" && p["data"]["participant"] == a.as_str()
        })
        .await
        .expect("the caller's leave");
    assert_eq!(left["params"]["data"]["reason"], "moved", "{left}");
    let from = ws
        .ok("participant.list", json!({"conference": "from-7"}))
        .await;
    assert!(!ids(&from).contains(&a), "{from}");
}

/// With `conference.lone_starter_waits`, a starter waiting alone whose move out is refused
/// comes back to a caller who joined meanwhile (and waited: the starter was on its way out):
/// the two make a start, and the conference starts then, not at a third caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_move_gives_back_a_starter_that_starts_the_conference_it_returns_to() {
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_CONFERENCE__LONE_STARTER_WAITS", "true"),
        ],
        &[],
    )
    .await;
    let owner = c.route(1, "back-from").await;
    let sim = &c.node(&owner).sim;
    let starter = dial(sim, "back-from", &[]).await;
    wait_bridged(sim, &starter).await;
    let x = dial(sim, "back-to", &[("CONFROUTE_MAX_PARTICIPANTS", "2")]).await;
    wait_bridged(sim, &x).await;
    let mut ws = c.client(0).await;
    for conf in ["back-from", "back-to"] {
        let deadline = std::time::Instant::now() + WAIT;
        while ids(&ws
            .ok("participant.list", json!({ "conference": conf }))
            .await)
        .len()
            != 1
        {
            assert!(std::time::Instant::now() < deadline, "{conf}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    // The target fills: the move waits behind it.
    let (y, moved) =
        move_behind_a_filling_target(&c, sim, &mut ws, "back-from", &starter, "back-to").await;
    // A second caller comes while the starter is on its way out: it waits.
    let second = dial(sim, "back-from", &[("CONFROUTE_START_ON_ENTER", "false")]).await;
    wait_for_async("the second caller being added", WAIT, || async {
        (sim.held_requests("answer addChannel") == 2).then_some(())
    })
    .await
    .expect("the source adds the second caller");
    sim.release_operation("answer addChannel");
    let (code, msg) = moved.await.expect("the move's answer");
    assert_eq!(code, -32005, "the target is full: {msg}");
    wait_mixed_together(sim, &starter, &second).await;
    wait_bridged(sim, &y).await;
}

/// Waits until `conference` lists `n` participants.
async fn wait_listed(ws: &mut Client, conference: &str, n: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    while ids(&ws
        .ok("participant.list", json!({ "conference": conference }))
        .await)
    .len()
        != n
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{conference} lists {n} participants"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A waiter whose move to another conference of the node is refused comes back to its
/// conference. When that one started meanwhile (its start skipped the waiter, then on its
/// way out), the waiter joins the mix at once, not at the next reconciliation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_move_is_refused_joins_the_conference_that_started_meanwhile() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(1, "late-from").await;
    let sim = &c.node(&owner).sim;
    let w = dial(sim, "late-from", &[("CONFROUTE_START_ON_ENTER", "false")]).await;
    wait_bridged(sim, &w).await;
    let x = dial(sim, "late-to", &[("CONFROUTE_MAX_PARTICIPANTS", "2")]).await;
    wait_bridged(sim, &x).await;
    let mut ws = c.client(0).await;
    wait_listed(&mut ws, "late-from", 1).await;
    wait_listed(&mut ws, "late-to", 1).await;
    let (y, moved) =
        move_behind_a_filling_target(&c, sim, &mut ws, "late-from", &w, "late-to").await;
    // A starter joins while the waiter is on its way out: the conference starts without it.
    let starter = dial(sim, "late-from", &[]).await;
    wait_for_async("the starter being added", WAIT, || async {
        (sim.held_requests("answer addChannel") == 2).then_some(())
    })
    .await
    .expect("the source adds the starter");
    sim.release_operation("answer addChannel");
    let (code, msg) = moved.await.expect("the move's answer");
    assert_eq!(code, -32005, "the target is full: {msg}");
    let main = wait_bridged(sim, &starter).await;
    until(sim, "the waiter in the started conference's mix", |snap| {
        snap.channel(&w).and_then(|ch| ch.bridge.as_deref()) == Some(main.as_str())
    })
    .await;
    assert!(!waiting(&mut ws, "late-from", &w).await);
    wait_bridged(sim, &y).await;
}

/// With `conference.lone_starter_waits`, a starter waiting alone that is put on hold, and
/// taken off hold once another caller came, starts the conference with that caller then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unheld_lone_starter_starts_the_conference_with_who_came_meanwhile() {
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_CONFERENCE__LONE_STARTER_WAITS", "true"),
        ],
        &[],
    )
    .await;
    let owner = c.route(1, "unhold-start").await;
    let sim = &c.node(&owner).sim;
    let s = dial(sim, "unhold-start", &[]).await;
    let holding = wait_bridged(sim, &s).await;
    let mut ws = c.client(0).await;
    wait_listed(&mut ws, "unhold-start", 1).await;
    let who = json!({"conference": "unhold-start", "participant": s});
    ws.ok("participant.hold", who.clone()).await;
    let n = dial(
        sim,
        "unhold-start",
        &[("CONFROUTE_START_ON_ENTER", "false")],
    )
    .await;
    assert_eq!(wait_bridged(sim, &n).await, holding);
    wait_listed(&mut ws, "unhold-start", 2).await;
    ws.ok("participant.unhold", who).await;
    wait_mixed_together(sim, &s, &n).await;
}

/// With `conference.lone_starter_waits`, a participant on hold is not the second caller a
/// start takes: a starter coming in while the only other participant is held waits with
/// its music rather than sit alone in a silent mix, and the conference starts with both
/// once the held one is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_participant_does_not_start_a_lone_starters_conference() {
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_CONFERENCE__LONE_STARTER_WAITS", "true"),
        ],
        &[],
    )
    .await;
    let owner = c.route(1, "held-start").await;
    let sim = &c.node(&owner).sim;
    let n = dial(sim, "held-start", &[("CONFROUTE_START_ON_ENTER", "false")]).await;
    let holding = wait_bridged(sim, &n).await;
    let mut ws = c.client(0).await;
    wait_listed(&mut ws, "held-start", 1).await;
    let who = json!({"conference": "held-start", "participant": n});
    ws.ok("participant.hold", who.clone()).await;
    let s = dial(sim, "held-start", &[]).await;
    assert_eq!(
        wait_bridged(sim, &s).await,
        holding,
        "the starter waits: the only other participant is on hold"
    );
    wait_listed(&mut ws, "held-start", 2).await;
    ws.ok("participant.unhold", who).await;
    wait_mixed_together(sim, &s, &n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_older_than_an_end_does_not_take_back_a_caller_moving_out() {
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_ARI__RECONCILE_INTERVAL", "300ms"),
        ],
        &[],
    )
    .await;
    let (sim, a, b, x, mut ws) = two_conferences_on_one_node(&c, "from-5", "to-5", &[]).await;
    let owner = c.route(1, "from-5").await;
    let listings = || {
        sim.request_log()
            .iter()
            .filter(|r| r.method == "GET" && r.path == "/ari/bridges")
            .count()
    };
    // A reconciliation has listed the bridges (a in from-5's) and waits for its channels
    // while a moves out and from-5 ends.
    sim.hold_operation("GET /channels");
    wait_for_async(
        "a reconciliation waiting for its channels",
        WAIT,
        || async { (sim.held_requests("GET /channels") > 0).then_some(()) },
    )
    .await
    .expect("reconciling");
    let moved = held_move(&c, sim, "from-5", &a, "to-5").await;
    ws.ok("conference.end", json!({"conference": "from-5"}))
        .await;
    assert_eq!(wait_hangup(sim, &b).await, 16);
    let store = fixtures::store(&c.cfg);
    let from: confroute_shared::name::ConferenceName = "from-5".parse().expect("name");
    wait_for_async("the ended conference's claim released", WAIT, || async {
        store.lookup(&from).await.ok()?.is_none().then_some(())
    })
    .await
    .expect("released");
    // The move completes: the caller is the target's now.
    sim.release_operation("answer addChannel");
    assert_moved_in(sim, &mut ws, moved, &a, &x, "to-5").await;
    let listed = listings();
    sim.release_operation("GET /channels");
    wait_for_async("the held reconciliation done", WAIT, || async {
        (listings() > listed).then_some(())
    })
    .await
    .expect("reconciled");
    let m = fixtures::scrape(&c.node(&owner).proc.http_url()).await;
    assert_eq!(
        fixtures::metric_opt(
            &m,
            r#"confroute_node_reconcile_actions_total{action="adopted_conference"}"#
        ),
        Some(0.0),
        "the ended conference took its moving caller back"
    );
    assert_eq!(store.lookup(&from).await.expect("lookup"), None);
    let list = ws
        .ok("participant.list", json!({"conference": "to-5"}))
        .await;
    let mut got = ids(&list);
    got.sort();
    let mut want = vec![a.clone(), x.clone()];
    want.sort();
    assert_eq!(got, want, "{list}");
}

/// A caller moved to a conference of another node is redirected there by SIP, where a full
/// conference would only refuse it on arrival (hung up, out of both). A target with no seat
/// left is refused up front (`conference full`), and the caller stays where it was; one with
/// a seat is moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_to_a_full_conference_on_another_node_is_refused_up_front() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(0, "from-5").await;
    let sim = &c.node(&owner).sim;
    let other = c.other(&owner);
    let a = dial(sim, "from-5", &[]).await;
    let bridge = wait_bridged(sim, &a).await;
    // The target, on the other node, holds two callers at most: one in, one dial-out ringing.
    let y = dial(&other.sim, "full-5", &[("CONFROUTE_MAX_PARTICIPANTS", "2")]).await;
    wait_bridged(&other.sim, &y).await;
    other.sim.set_originate_behavior(
        EndpointMatch::exact("PJSIP/+15555550177@trunk"),
        Outcome::Manual,
    );
    let mut ws = c.client(1).await;
    let ringing = ws
        .ok(
            "dialout",
            json!({"conference": "full-5", "to": "+15555550177"}),
        )
        .await;
    let listed = ws
        .ok("participant.list", json!({"conference": "full-5"}))
        .await;
    assert_eq!(
        (
            listed["seats_taken"].clone(),
            listed["max_participants"].clone()
        ),
        (json!(2), json!(2)),
        "{listed}"
    );
    let (code, msg) = ws
        .err(
            "participant.move",
            json!({"conference": "from-5", "participant": a, "to": "full-5"}),
        )
        .await;
    assert_eq!(code, -32005, "{msg}");
    assert!(
        !sim.request_log()
            .iter()
            .any(|r| r.operation.as_deref() == Some("redirect")),
        "nobody was redirected"
    );
    assert_eq!(
        sim.snapshot().channel(&a).and_then(|ch| ch.bridge.clone()),
        Some(bridge),
        "the caller stays in its conference"
    );
    // A seat frees up (the dial-out is called off): the move goes through.
    let callid = ringing["callid"].as_str().expect("callid").to_string();
    ws.ok(
        "participant.kick",
        json!({"conference": "full-5", "participant": callid}),
    )
    .await;
    wait_for_async("the ringing seat freed", WAIT, || async {
        let l = c
            .client(1)
            .await
            .ok("participant.list", json!({"conference": "full-5"}))
            .await;
        (l["seats_taken"] == json!(1)).then_some(())
    })
    .await
    .expect("freed");
    let r = ws
        .ok(
            "participant.move",
            json!({"conference": "from-5", "participant": a, "to": "full-5"}),
        )
        .await;
    assert_eq!(r["moved"], "redirect", "{r}");
}

/// Asterisk hands a caller to another node by a SIP transfer, which only chan_pjsip carries
/// out: a participant on another driver's channel is not moved there (forbidden, nothing
/// asked of Asterisk), rather than told it moved while it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_on_a_channel_that_cannot_be_transferred_is_not_moved_to_another_node() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(0, "from-6").await;
    let sim = &c.node(&owner).sim;
    let other = c.other(&owner);
    let a = sim
        .dial_in(DialIn {
            app: "confroute".into(),
            args: vec!["from-6".into()],
            tech: "IAX2".into(),
            ..DialIn::default()
        })
        .await
        .expect("dial in");
    let bridge = wait_bridged(sim, &a).await;
    let y = dial(&other.sim, "to-6", &[]).await;
    wait_bridged(&other.sim, &y).await;
    let mut ws = c.client(1).await;
    let (code, msg) = ws
        .err(
            "participant.move",
            json!({"conference": "from-6", "participant": a, "to": "to-6"}),
        )
        .await;
    assert_eq!(code, -32006, "{msg}");
    assert!(msg.contains("PJSIP"), "{msg}");
    assert!(
        !sim.request_log()
            .iter()
            .any(|r| r.operation.as_deref() == Some("redirect")),
        "nobody was redirected"
    );
    assert_eq!(
        sim.snapshot().channel(&a).and_then(|ch| ch.bridge.clone()),
        Some(bridge),
        "the caller stays in its conference"
    );
}

/// A participant that hangs up just as it is kicked left on its own: Asterisk answers the
/// kick's hangup 404, and its leave says `hangup`, not `kicked`, while the kick succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_that_finds_its_participant_gone_reports_its_own_hangup() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let mut ws = c.client(0).await;
    let mut watcher = c.client(0).await;
    watcher
        .ok("subscribe", json!({"conference": "kick-race"}))
        .await;
    let owner = c.route(0, "kick-race").await;
    let sim = &c.node(&owner).sim;
    let stays = dial(sim, "kick-race", &[]).await;
    wait_bridged(sim, &stays).await;
    let leaving = dial(sim, "kick-race", &[]).await;
    wait_bridged(sim, &leaving).await;
    sim.hold_operation("hangup");
    let kick = ws.ok(
        "participant.kick",
        json!({"conference": "kick-race", "participant": leaving}),
    );
    let hangs_up_first = async {
        until(sim, "the kick's hangup under way", |_| {
            sim.held_requests("hangup") == 1
        })
        .await;
        sim.hangup_far_end(&leaving, 16).await.expect("hangs up");
        sim.release_operation("hangup");
    };
    let (answer, ()) = tokio::join!(kick, hangs_up_first);
    assert_eq!(answer, json!({}));
    let events = watcher.events_until(|e| e["event"] == "leave").await;
    let leave = &events[events.len() - 1]["data"];
    assert_eq!(leave["participant"], leaving.as_str(), "{events:#?}");
    assert_eq!(leave["reason"], "hangup", "{events:#?}");
    let list = ws
        .ok("participant.list", json!({"conference": "kick-race"}))
        .await;
    let ids: Vec<&str> = list["participants"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, vec![stays.as_str()], "the conference goes on");
}

/// A conference ended by a kick says so as Twilio does: `last-participant-kicked` when the
/// kicked one was the last, `participant-with-end-conference-on-exit-kicked` when the kicked
/// one ended it by leaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conference_ended_by_a_kick_says_so_in_its_end_callback() {
    let (url, got) = receiver().await;
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let mut ws = c.client(0).await;
    let hooks = hooks(&url, "end");
    let owner = c.route(0, "kick-last").await;
    let sim = &c.node(&owner).sim;
    let a = dial(sim, "kick-last", &hooks).await;
    wait_bridged(sim, &a).await;
    ws.ok(
        "participant.kick",
        json!({"conference": "kick-last", "participant": a}),
    )
    .await;

    let owner = c.route(0, "kick-ender").await;
    let sim = &c.node(&owner).sim;
    let mut ender_vars = hooks.to_vec();
    ender_vars.push(("CONFROUTE_END_ON_EXIT", "true"));
    let b = dial(sim, "kick-ender", &ender_vars).await;
    wait_bridged(sim, &b).await;
    let stays = dial(sim, "kick-ender", &[]).await;
    wait_bridged(sim, &stays).await;
    ws.ok(
        "participant.kick",
        json!({"conference": "kick-ender", "participant": b}),
    )
    .await;

    wait_for_async("both end callbacks", WAIT, || async {
        (got.lock().expect("lock").len() == 2).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", got.lock().expect("lock")));
    let got = got.lock().expect("lock").clone();
    let reason = |name: &str| {
        got.iter()
            .find(|f| f["FriendlyName"] == name)
            .map(|f| f["ReasonConferenceEnded"].clone())
    };
    assert_eq!(
        reason("kick-last").as_deref(),
        Some("last-participant-kicked")
    );
    assert_eq!(
        reason("kick-ender").as_deref(),
        Some("participant-with-end-conference-on-exit-kicked")
    );
}

/// `participant-leave` tells why each participant left and how its call stands, in Twilio's
/// `ReasonParticipantLeft` and `ParticipantCallStatus`: hung up, kicked, moved, ended with
/// the conference; a dial-out whose callee never came in is reported as Twilio reports a
/// participant it could not add (busy; called off by the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_leave_callbacks_say_why_as_twilio_does() {
    let (url, got) = receiver().await;
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let mut ws = c.client(0).await;
    let hooks = hooks(&url, "leave end");
    let (sim, stays) = first_caller(&c, "why", &hooks).await;
    let mut callers = Vec::new();
    for _ in 0..3 {
        let ch = dial(sim, "why", &[]).await;
        wait_bridged(sim, &ch).await;
        callers.push(ch);
    }
    let (hangs_up, kicked, moved) = (&callers[0], &callers[1], &callers[2]);
    sim.hangup_far_end(hangs_up, 16).await.expect("hang up");
    ws.ok(
        "participant.kick",
        json!({"conference": "why", "participant": kicked}),
    )
    .await;
    ws.ok(
        "participant.move",
        json!({"conference": "why", "participant": moved, "to": "why-next"}),
    )
    .await;
    let busy = dial_out(
        &mut ws,
        sim,
        "why",
        "+15555550102",
        Outcome::Busy,
        "rejected",
    )
    .await;
    let ringing = ringing_callee(&mut ws, sim, "why", "+15555550103").await;
    wait_for_async("four leave callbacks", WAIT, || async {
        (got.lock().expect("lock").len() == 4).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", got.lock().expect("lock")));
    ws.ok("conference.end", json!({"conference": "why"})).await;
    wait_for_async("every callback", WAIT, || async {
        (got.lock().expect("lock").len() == 7).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", got.lock().expect("lock")));
    let got = got.lock().expect("lock").clone();
    let why = |ch: &str| {
        let f = got
            .iter()
            .find(|f| f.get("CallSid").map(String::as_str) == Some(ch))
            .unwrap_or_else(|| panic!("no callback for {ch}: {got:#?}"));
        assert_eq!(f["StatusCallbackEvent"], "participant-leave", "{f:?}");
        (
            f["ReasonParticipantLeft"].as_str(),
            f["ParticipantCallStatus"].as_str(),
        )
    };
    assert_eq!(why(hangs_up), ("participant_hung_up", "completed"));
    assert_eq!(why(kicked), ("participant_updated_via_api", "completed"));
    assert_eq!(why(moved), ("participant_updated_via_api", "in-progress"));
    assert_eq!(why(&busy), ("participant_add_failed", "busy"));
    assert_eq!(why(&stays), ("conference_ended_via_api", "completed"));
    assert_eq!(why(&ringing), ("participant_add_failed", "canceled"));
    let end = &got[6];
    assert_eq!(end["StatusCallbackEvent"], "conference-end", "{got:#?}");
    assert_eq!(end["ReasonConferenceEnded"], "conference-ended-via-api");
    assert!(!end.contains_key("ReasonParticipantLeft"), "{end:?}");
}

/// A dial-out's callee that answers but never gets in (it hangs up before its addChannel
/// runs, which fails) is reported as Twilio reports a participant it could not add.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callee_lost_as_it_joins_is_reported_not_added() {
    let (url, got) = receiver().await;
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let mut ws = c.client(0).await;
    let hooks = hooks(&url, "join leave end");
    let (sim, host) = first_caller(&c, "lost-callee", &hooks).await;
    let callee = ringing_callee(&mut ws, sim, "lost-callee", "+15555550108").await;
    sim.hold_operation("addChannel");
    sim.answer_far_end(&callee).await.expect("answer");
    wait_for_async("the callee's addChannel", WAIT, || async {
        (sim.held_requests("addChannel") == 1).then_some(())
    })
    .await
    .expect("the agent adds the callee");
    sim.hangup_far_end(&callee, 16).await.expect("hang up");
    sim.release_operation("addChannel");
    ws.statuses(&callee, "cleared").await;
    ws.ok("conference.end", json!({"conference": "lost-callee"}))
        .await;
    let got = callbacks_through(&got, "conference-end").await;
    let seen: Vec<(&str, &str, &str)> = got
        .iter()
        .map(|f| {
            (
                f["StatusCallbackEvent"].as_str(),
                f.get("CallSid").map(String::as_str).unwrap_or(""),
                f.get("ReasonParticipantLeft")
                    .map(String::as_str)
                    .unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("participant-join", host.as_str(), ""),
            (
                "participant-leave",
                callee.as_str(),
                "participant_add_failed"
            ),
            (
                "participant-leave",
                host.as_str(),
                "conference_ended_via_api"
            ),
            ("conference-end", "", ""),
        ],
        "{got:#?}"
    );
}

/// With `conference.lone_starter_waits`, a moderator (starter with endConferenceOnExit)
/// waiting alone for the callee it dialled ends the conference by hanging up: the ringing
/// callee is called off rather than answering into an empty conference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moderator_waiting_alone_calls_off_its_dialout_by_leaving() {
    let (url, got) = receiver().await;
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_CONFERENCE__LONE_STARTER_WAITS", "true"),
        ],
        &[],
    )
    .await;
    let mut ws = c.client(0).await;
    let hooks = [
        ("CONFROUTE_STATUS_CALLBACK", url.as_str()),
        ("CONFROUTE_STATUS_CALLBACK_EVENT", "start end"),
        ("CONFROUTE_END_ON_EXIT", "true"),
    ];
    let (sim, moderator) = first_caller(&c, "moderated", &hooks).await;
    let callee = ringing_callee(&mut ws, sim, "moderated", "+15555550109").await;
    sim.hangup_far_end(&moderator, 16).await.expect("hang up");
    let st = ws.statuses(&callee, "rejected").await;
    assert_eq!(
        st.last(),
        Some(&json!({"callid": callee, "status": "rejected", "code": 487, "cause": 16})),
        "{st:?}"
    );
    let got = callbacks_through(&got, "conference-end").await;
    assert_eq!(got.len(), 1, "never started: {got:#?}");
    assert_eq!(got[0]["StatusCallbackEvent"], "conference-end");
    assert_eq!(
        got[0]["ReasonConferenceEnded"],
        "participant-with-end-conference-on-exit-left"
    );
    assert_eq!(got[0]["CallSidEndingConference"], moderator);
}

/// The seat check before a cross-node move takes a share of the move's time: a target node
/// that does not answer (its agent stopped) leaves the move its own budget, and the caller
/// is moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_to_a_node_slow_to_answer_still_goes_ahead() {
    let mut c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(0, "from-6").await;
    let other_id = c.other(&owner).id.clone();
    let a = dial(&c.node(&owner).sim, "from-6", &[]).await;
    wait_bridged(&c.node(&owner).sim, &a).await;
    let y = dial(&c.node(&other_id).sim, "to-6", &[]).await;
    wait_bridged(&c.node(&other_id).sim, &y).await;
    let mut ws = c.client(0).await;
    c.node(&other_id)
        .proc
        .process_ref()
        .pause()
        .expect("SIGSTOP the target's agent");
    let r = ws
        .call(
            "participant.move",
            json!({"conference": "from-6", "participant": a, "to": "to-6"}),
        )
        .await;
    c.node_mut(&other_id)
        .proc
        .process()
        .signal(libc::SIGCONT)
        .expect("SIGCONT");
    assert_eq!(r["result"]["moved"], "redirect", "{r}");
}

/// Polls `participant.list` until `participant` of `conference` is held by `want`.
async fn wait_held_by(ws: &mut Client, conference: &str, participant: &str, want: Value) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let got = ws.held_by(conference, participant).await;
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{participant} in {conference}: held_by {got}, want {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A callback's `Hold` is one state whichever side holds: the API's hold and the phone's
/// on top of it give one `participant-hold`, and the `participant-unhold` comes when the
/// last of them goes, with `Hold=false`, never while the other still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_callbacks_follow_one_hold_state_across_api_and_phone() {
    let (url, got) = receiver().await;
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let mut ws = c.client(0).await;
    let hooks = hooks(&url, "hold mute");
    let (sim, _a) = first_caller(&c, "two-holds", &hooks).await;
    let b = dial(sim, "two-holds", &[]).await;
    wait_bridged(sim, &b).await;
    let who = json!({"conference": "two-holds", "participant": b});
    ws.ok("participant.hold", who.clone()).await;
    sim.caller_hold(&b, true).await.expect("the phone holds");
    wait_held_by(&mut ws, "two-holds", &b, json!(["api", "caller"])).await;
    ws.ok("participant.unhold", who.clone()).await;
    wait_held_by(&mut ws, "two-holds", &b, json!(["caller"])).await;
    sim.caller_hold(&b, false).await.expect("the phone resumes");
    wait_held_by(&mut ws, "two-holds", &b, json!([])).await;
    // The last callback, after the others in the conference's one queue.
    ws.ok("participant.mute", who).await;
    let got = callbacks_through(&got, "participant-mute").await;
    let seen: Vec<(&str, &str)> = got
        .iter()
        .map(|f| (f["StatusCallbackEvent"].as_str(), f["Hold"].as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("participant-hold", "true"),
            ("participant-unhold", "false"),
            ("participant-mute", "false"),
        ],
        "{got:#?}"
    );
}

/// A move does not take the caller's phone off hold: the target lists the caller as held by
/// its phone and announces the phone's resume. A hold from the phone while the caller is
/// being moved is not lost either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hold_a_callers_phone_put_on_survives_a_move() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let (sim, a, _b, _x, mut ws) = two_conferences_on_one_node(&c, "from-h", "to-h", &[]).await;
    let mut watcher = c.client(1).await;
    watcher.ok("subscribe", json!({"conference": "to-h"})).await;
    sim.caller_hold(&a, true).await.expect("the phone holds");
    wait_held_by(&mut ws, "from-h", &a, json!(["caller"])).await;
    ws.ok(
        "participant.move",
        json!({"conference": "from-h", "participant": &a, "to": "to-h"}),
    )
    .await;
    assert_eq!(ws.held_by("to-h", &a).await, json!(["caller"]));
    sim.caller_hold(&a, false).await.expect("the phone resumes");
    let events = watcher
        .events_until(|e| e["event"] == "unhold" && e["data"]["participant"] == a.as_str())
        .await;
    let last = events.last().expect("the unhold");
    assert_eq!(last["data"]["by"], "caller", "{events:#?}");
    assert_eq!(ws.held_by("to-h", &a).await, json!([]));

    // The phone holds while the move back is under way (the target has added the caller,
    // its answer held): the hold reaches the conference the caller ends up in.
    let moved = held_move(&c, sim, "to-h", &a, "from-h").await;
    sim.caller_hold(&a, true).await.expect("the phone holds");
    sim.release_operation("answer addChannel");
    moved.await.expect("the move's answer");
    wait_held_by(&mut ws, "from-h", &a, json!(["caller"])).await;
}

/// Asterisk's bridge music is a lonely member of the holding bridge that leaves with the
/// last caller in it, and adding a channel to the bridge it is in makes it leave first. A
/// caller who joined muted, alone on hold, is unmuted without being added again: the
/// music plays on. Before, the unmute added it to its bridge again (to lift a bridge mute)
/// and, against Asterisk, left it in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_alone_on_hold_music_keeps_it_when_unmuted() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(1, "lone-music").await;
    let sim = &c.node(&owner).sim;
    let s = dial(sim, "lone-music", &[]).await;
    let main = wait_bridged(sim, &s).await;
    let m = dial(sim, "lone-music", &[("CONFROUTE_MUTED", "true")]).await;
    assert_eq!(wait_bridged(sim, &m).await, main);
    let mut ws = c.client(0).await;
    let who = json!({"conference": "lone-music", "participant": m});
    assert_eq!(ws.ok("participant.hold", who.clone()).await, json!({}));
    let holding = main.replacen("cr-", "crh-", 1);
    until(sim, "m alone on hold with music", |snap| {
        snap.channel(&m).and_then(|c| c.bridge.as_deref()) == Some(holding.as_str())
            && snap.bridge(&holding).is_some_and(|b| b.moh.is_some())
    })
    .await;
    assert_eq!(ws.ok("participant.unmute", who).await, json!({}));
    until(sim, "m unmuted", |snap| {
        snap.channel(&m)
            .is_some_and(|c| !c.muted_in && !c.bridge_mute)
    })
    .await;
    let snap = sim.snapshot();
    assert_eq!(
        snap.channel(&m).and_then(|c| c.bridge.clone()),
        Some(holding.clone())
    );
    assert!(
        snap.bridge(&holding).is_some_and(|b| b.moh.is_some()),
        "still hearing the music: {snap:#?}"
    );
}

/// A recording is a lonely member of the mixing bridge too: it ends when the last
/// participant in the mix leaves it, here for the holding bridge. The conference records on
/// in a new file once someone is in the mix again, and its last caller hanging up makes no
/// new file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_ended_by_an_emptied_mix_goes_on_in_a_new_file() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(1, "rec-hold").await;
    let sim = &c.node(&owner).sim;
    let a = dial(
        sim,
        "rec-hold",
        &[("CONFROUTE_RECORD", "record-from-start")],
    )
    .await;
    let main = wait_bridged(sim, &a).await;
    let target = format!("bridge:{main}");
    let recording_started = |from: usize| {
        let target = target.clone();
        async move {
            sim.wait_for_event_after(from, WAIT, |e| {
                e["type"] == "RecordingStarted" && e["recording"]["target_uri"] == target.as_str()
            })
            .await
            .and_then(|e| e["recording"]["name"].as_str().map(str::to_string))
        }
    };
    let first = recording_started(0).await.expect("recording started");
    let mut ws = c.client(0).await;
    let who = json!({"conference": "rec-hold", "participant": a});
    let mark = sim.event_count();
    assert_eq!(ws.ok("participant.hold", who.clone()).await, json!({}));
    sim.wait_for_event_after(mark, WAIT, |e| {
        e["type"] == "RecordingFinished" && e["recording"]["name"] == first.as_str()
    })
    .await
    .expect("the recording left with the last participant in the mix");
    let mark = sim.event_count();
    assert_eq!(ws.ok("participant.unhold", who).await, json!({}));
    let second = recording_started(mark).await.expect("recording on");
    assert_ne!(second, first);
    assert!(second.starts_with("confroute-rec-hold-"), "{second}");
    until(sim, "the mix recorded again", |snap| {
        snap.bridge(&main)
            .is_some_and(|b| b.recording.as_deref() == Some(second.as_str()))
    })
    .await;

    // The last caller hangs up: the recording ends with the conference, and no new one.
    let mark = sim.event_count();
    sim.hangup_far_end(&a, 16).await.expect("hang up");
    until(sim, "bridges gone", |snap| snap.bridges.is_empty()).await;
    let again = sim
        .event_log()
        .iter()
        .skip(mark)
        .filter(|e| e["type"] == "RecordingStarted")
        .count();
    assert_eq!(again, 0, "no recording after the last caller left");
}

/// A participant moved to another node's conference is redirected with ARI `redirect`,
/// which chan_pjsip sends as a REFER once the call is answered. A phone or trunk that
/// refuses it leaves the call where it was, and Asterisk reports nothing: at a
/// reconciliation 30 s on, the agent finds it still there, tells subscribers `move_failed`,
/// and takes it as a participant again (its hangup is a `leave` with `hangup`, not `moved`).
/// A redirect that goes through gets no `move_failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_the_far_end_refuses_is_reported_and_the_participant_stays() {
    let c = Cluster::start(
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_ARI__RECONCILE_INTERVAL", "1s"),
        ],
        &[],
    )
    .await;
    let owner = c.route(0, "stay-here").await;
    let sim = &c.node(&owner).sim;
    let other = c.other(&owner);
    let a = dial(sim, "stay-here", &[]).await;
    let b = dial(sim, "stay-here", &[]).await;
    let main = wait_bridged(sim, &a).await;
    assert_eq!(wait_bridged(sim, &b).await, main);
    let far = dial(&other.sim, "far-room", &[]).await;
    wait_bridged(&other.sim, &far).await;
    sim.refuse_transfers(&a);
    let d = dial(sim, "stay-here", &[]).await;
    assert_eq!(wait_bridged(sim, &d).await, main);

    let mut ws = c.client(0).await;
    ws.ok("subscribe", json!({"conference": "stay-here"})).await;
    let r = ws
        .ok(
            "participant.move",
            json!({"conference": "stay-here", "participant": a, "to": "far-room"}),
        )
        .await;
    assert_eq!(r["moved"], "redirect", "{r}");
    let moved_at = std::time::Instant::now();
    // d's phone takes the transfer: it leaves for far-room, with no move_failed.
    let r = ws
        .ok(
            "participant.move",
            json!({"conference": "stay-here", "participant": d, "to": "far-room"}),
        )
        .await;
    assert_eq!(r["moved"], "redirect", "{r}");
    until(sim, "d transferred", |s| s.channel(&d).is_none()).await;
    let failed = ws
        .notification_where("event", std::time::Duration::from_secs(60), |p| {
            p["event"] == "move_failed"
        })
        .await
        .expect("move_failed");
    assert!(
        moved_at.elapsed() >= std::time::Duration::from_secs(30),
        "a transfer gets 30 s: {:?}",
        moved_at.elapsed()
    );
    assert_eq!(failed["params"]["data"]["participant"], a.as_str());
    assert_eq!(failed["params"]["data"]["to"], "far-room");
    assert_eq!(
        sim.snapshot().channel(&a).and_then(|ch| ch.bridge.clone()),
        Some(main.clone()),
        "still in the conference"
    );
    sim.hangup_far_end(&a, 16).await.expect("a hangs up");
    let left = ws
        .notification_where("event", WAIT, |p| {
            p["event"] == "leave" && p["data"]["participant"] == a.as_str()
        })
        .await
        .expect("a's leave");
    assert_eq!(left["params"]["data"]["reason"], "hangup");
    assert!(
        ws.notification_where("event", std::time::Duration::from_millis(100), |p| {
            p["event"] == "move_failed"
        })
        .await
        .is_none(),
        "one move_failed, for a only"
    );
}

/// Conference `from` on one node with callers a and b, `to` on the other with a caller; a's
/// phone refuses transfers, and a is moved to `to`: the redirect is answered and the
/// transfer stays under way. Returns the cluster's `from` simulator, a, b and a client
/// subscribed to `from`.
async fn a_transfer_under_way<'a>(
    c: &'a Cluster,
    from: &str,
    to: &str,
    a_options: &[(&str, &str)],
) -> (&'a TestSim, String, String, Client) {
    let owner = c.route(0, from).await;
    let sim = &c.node(&owner).sim;
    let other = c.other(&owner);
    let a = dial(sim, from, a_options).await;
    wait_bridged(sim, &a).await;
    let b = dial(sim, from, a_options).await;
    wait_bridged(sim, &b).await;
    let far = dial(&other.sim, to, &[]).await;
    wait_bridged(&other.sim, &far).await;
    sim.refuse_transfers(&a);
    let mut ws = c.client(0).await;
    ws.ok("subscribe", json!({ "conference": from })).await;
    let r = ws
        .ok(
            "participant.move",
            json!({"conference": from, "participant": a, "to": to}),
        )
        .await;
    assert_eq!(r["moved"], "redirect", "{r}");
    (sim, a, b, ws)
}

/// Asterisk runs none of a channel's commands while its REFER is under way (`ast_transfer`
/// reads the channel until the far end says how it ended): a hold or another move of a
/// participant being transferred to another node, which would wait there with the
/// conference held up, is refused at once, as one of a caller being moved within the node
/// is. What Asterisk queues and answers at once (mute, play) is taken; a kick still hangs
/// it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_moves_of_a_caller_being_transferred_to_another_node_are_refused() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let (sim, a, b, mut ws) = a_transfer_under_way(&c, "xfer-from", "xfer-to", &[]).await;
    for method in ["participant.hold", "participant.move"] {
        let mut params = json!({"conference": "xfer-from", "participant": a});
        if method == "participant.move" {
            params["to"] = json!("xfer-to");
        }
        let (code, msg) = ws.err(method, params).await;
        assert_eq!(code, -32006, "{method}: {msg}");
        assert!(msg.contains("transferred"), "{method}: {msg}");
    }
    let who = json!({"conference": "xfer-from", "participant": a});
    ws.ok("participant.mute", who.clone()).await;
    // The far end refuses the transfer after the simulator's ring time; nothing the agent
    // refused was left queued to run then.
    until(sim, "the transfer refused", |s| {
        s.channel(&a).is_some_and(|ch| !ch.transferring)
    })
    .await;
    let list = ws
        .ok("participant.list", json!({"conference": "xfer-from"}))
        .await;
    assert_eq!(participant(&list, &a)["held"], false, "{list}");
    assert_eq!(participant(&list, &a)["muted"], true, "{list}");
    // Other participants are not held up.
    ws.ok(
        "participant.hold",
        json!({"conference": "xfer-from", "participant": b}),
    )
    .await;
    ws.ok("participant.kick", who).await;
    until(sim, "a hung up", |s| s.channel(&a).is_none()).await;
}

/// A starter joining while a waiter is being transferred to another node moves the other
/// waiters into the mix without it: Asterisk adds a list of channels only once each is free,
/// so the transfer would hold the whole start up. The waiter stays in the holding bridge;
/// had its phone refused the transfer, it joins at a reconciliation after `move_failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_leaves_a_waiter_being_transferred_to_another_node_waiting() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let waits = [("CONFROUTE_START_ON_ENTER", "false")];
    let (sim, a, b, mut ws) = a_transfer_under_way(&c, "xfer-wait", "xfer-far", &waits).await;
    let holding = sim
        .snapshot()
        .channel(&a)
        .and_then(|ch| ch.bridge.clone())
        .expect("a waits in the holding bridge");
    let starter = dial(sim, "xfer-wait", &[]).await;
    let main = wait_bridged(sim, &starter).await;
    let started = ws
        .notification_where("event", WAIT, |p| p["event"] == "start")
        .await
        .expect("start");
    assert_eq!(
        started["params"]["data"]["no_longer_waiting"],
        json!([b.clone()]),
        "{started}"
    );
    until(sim, "b in the mix", |s| {
        s.channel(&b).and_then(|ch| ch.bridge.as_deref()) == Some(main.as_str())
    })
    .await;
    // Past the far end's refusal, when anything queued for a would have run.
    until(sim, "the transfer refused", |s| {
        s.channel(&a).is_some_and(|ch| !ch.transferring)
    })
    .await;
    let snap = sim.snapshot();
    assert_eq!(
        snap.channel(&a).and_then(|ch| ch.bridge.clone()),
        Some(holding),
        "a still waits"
    );
    assert_eq!(entries(sim, &a, &main), 0, "a was never added to the mix");
}

/// An unmute reaches Asterisk even when the agent takes the participant for unmuted
/// already (here another ARI client muted the channel behind its back; an adopted
/// participant whose options could not be read is taken for unmuted too): the channel's own
/// mute is what the others hear. It sends no event, the state being unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmute_reaches_asterisk_even_when_the_agent_thinks_it_done() {
    let c = Cluster::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")], &[]).await;
    let owner = c.route(0, "stuck-mute").await;
    let sim = &c.node(&owner).sim;
    let a = dial(sim, "stuck-mute", &[]).await;
    wait_bridged(sim, &a).await;
    let other = confroute_tests::ari_sim::client::AriClient::new(sim).expect("client");
    let r = other
        .call_raw(
            "POST",
            &format!("/channels/{a}/mute?direction=in"),
            None,
            true,
        )
        .await
        .expect("mute behind the agent's back");
    assert_eq!(r.status, 204);
    assert!(sim.snapshot().channel(&a).expect("channel").muted_in);
    let mut ws = c.client(0).await;
    ws.ok(
        "participant.unmute",
        json!({"conference": "stuck-mute", "participant": a}),
    )
    .await;
    assert!(
        !sim.snapshot().channel(&a).expect("channel").muted_in,
        "the channel is unmuted in Asterisk"
    );
    let list = ws
        .ok("participant.list", json!({"conference": "stuck-mute"}))
        .await;
    assert_eq!(participant(&list, &a)["muted"], false);
}
