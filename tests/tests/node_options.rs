//! Conference options as in TwiML `<Conference>`, each checked by the ARI calls and events
//! it must cause: beep, muted, startConferenceOnEnter with wait music, endConferenceOnExit,
//! maxParticipants, record, statusCallback; profiles and per-call overrides.

mod node_common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use confroute_tests::ari_sim::AriSim;
use confroute_tests::fixtures;
use confroute_tests::harness::{wait_for_async, NodeProc, RedisServer};
use node_common::*;

fn playbacks_on(sim: &TestSim, target: &str) -> Vec<String> {
    sim.event_log()
        .iter()
        .filter(|e| {
            e["type"] == "PlaybackStarted"
                && e["application"] == "confroute"
                && e["playback"]["target_uri"] == target
        })
        .map(|e| {
            e["playback"]["media_uri"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beep_plays_to_the_bridge_on_enter_and_exit_as_asked() {
    let s = Single::start(&[]).await;
    // Default beep=true: one beep per entry and one per exit (while others remain).
    let a = dial(&s.sim, "beeps", &[("CONFROUTE_BEEP", "false")]).await;
    let bridge = wait_bridged(&s.sim, &a).await;
    assert_main(&bridge, 1, "beeps");
    let b = dial(&s.sim, "beeps", &[]).await;
    wait_bridged(&s.sim, &b).await;
    let target = format!("bridge:{bridge}");
    let target = target.as_str();
    wait_for_async("beep on enter", WAIT, || async {
        (playbacks_on(&s.sim, target).len() == 1).then_some(())
    })
    .await
    .expect("one beep for b's entry (a asked for none)");
    assert_eq!(playbacks_on(&s.sim, target), vec!["sound:beep"]);
    let c = dial(&s.sim, "beeps", &[("CONFROUTE_BEEP", "onExit")]).await;
    wait_bridged(&s.sim, &c).await;
    s.sim.hangup_far_end(&c, 16).await.expect("c leaves");
    wait_for_async("beep on exit", WAIT, || async {
        (playbacks_on(&s.sim, target).len() == 2).then_some(())
    })
    .await
    .expect("c's exit beeps, its entry did not");
    s.sim.hangup_far_end(&a, 16).await.expect("a leaves");
    until(&s.sim, "a gone", |snap| snap.channel(&a).is_none()).await;
    s.sim.hangup_far_end(&b, 16).await.expect("b leaves");
    until(&s.sim, "conference over", |snap| snap.bridges.is_empty()).await;
    assert_eq!(
        playbacks_on(&s.sim, target).len(),
        2,
        "a asked for no beep, and the last one out hears none"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn muted_profile_and_overrides_with_bad_values_logged() {
    let s = Single::start(&[
        ("CONFROUTE_PROFILES__LISTENER__MUTED", "true"),
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
    ])
    .await;
    let listener = dial(&s.sim, "opts", &[("CONFROUTE_PROFILE", "listener")]).await;
    let talker = dial(&s.sim, "opts", &[]).await;
    let forced = dial(&s.sim, "opts", &[("CONFROUTE_MUTED", "yes")]).await;
    let bad = dial(&s.sim, "opts", &[("CONFROUTE_MUTED", "perhaps")]).await;
    for ch in [&listener, &talker, &forced, &bad] {
        wait_bridged(&s.sim, ch).await;
    }
    let snap = s.sim.snapshot();
    let muted = |ch: &str| snap.channel(ch).expect("channel").muted_in;
    assert!(muted(&listener), "profile listener joins muted");
    assert!(!muted(&talker));
    assert!(muted(&forced), "CONFROUTE_MUTED=yes");
    assert!(!muted(&bad), "a bad value keeps the profile's value");
    let out = s.node.output();
    assert!(
        out.contains("CONFROUTE_MUTED") && out.contains("`perhaps` is not a boolean"),
        "bad value logged: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_are_read_with_get_channel_var_without_channelvars() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let sim = sim_with(&[]).await;
    let node = NodeProc::start("node-a", &env(&sim, &cfg, &[])).expect("node");
    wait_app(&sim, &node).await;
    let ch = dial(
        &sim,
        "",
        &[("CONFROUTE_CONFERENCE", "novars"), ("CONFROUTE_MUTED", "1")],
    )
    .await;
    assert_main(&wait_bridged(&sim, &ch).await, 1, "novars");
    assert!(sim.snapshot().channel(&ch).expect("channel").muted_in);
    assert!(ops(&sim, "getChannelVar") >= 2);
}

/// A burst of callers whose options are read one request each (no `channelvars`) stays
/// within Asterisk's HTTP session limit (http.conf `sessionlimit`, 100 by default, beyond
/// which Asterisk closes new connections unanswered): every caller is read and let in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_callers_stays_within_asterisks_http_session_limit() {
    const CALLERS: usize = 60;
    let s = Single::start_on(
        sim_with(&[]).await,
        &[("CONFROUTE_CONFERENCE__BEEP", "false")],
    )
    .await;
    let (sim, node) = (&s.sim, &s.node);
    let calls = (0..CALLERS).map(|i| async move {
        let var = format!("burst-{}", i % 3);
        dial(sim, "", &[("CONFROUTE_CONFERENCE", var.as_str())]).await
    });
    let channels = futures_util::future::join_all(calls).await;
    for ch in &channels {
        wait_bridged(sim, ch).await;
    }
    let m = fixtures::scrape(&node.http_url()).await;
    assert_eq!(
        fixtures::metric(&m, r#"confroute_node_joins_total{outcome="ari_error"}"#),
        0.0,
        "{}",
        node.output()
    );
    // ari.max_connections (40) calls in flight, as many idle connections again at most, and
    // the events WebSocket: what docs/configuration.md tells operators to plan for.
    assert!(
        sim.peak_sessions() <= 2 * 40 + 1,
        "{} connections open at once",
        sim.peak_sessions()
    );
}

/// `n` callers of `conference` waiting for its start, each in the holding bridge.
async fn waiting_callers(sim: &TestSim, conference: &str, n: usize) -> Vec<String> {
    let waits = [("CONFROUTE_START_ON_ENTER", "false")];
    let mut waiters = Vec::new();
    for _ in 0..n {
        waiters.push(dial(sim, conference, &waits).await);
    }
    for w in &waiters {
        wait_bridged(sim, w).await;
    }
    waiters
}

/// A start moves every waiter into the mix even when there are more than one `addChannel`
/// may name (Asterisk refuses a list of 128 channels or more with 400): the agent splits the
/// list, and Asterisk refuses none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_moves_more_waiters_than_one_add_channel_takes() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    waiting_callers(&s.sim, "crowded-room", 140).await;
    let starter = dial(&s.sim, "crowded-room", &[]).await;
    let main = wait_bridged(&s.sim, &starter).await;
    until(&s.sim, "every waiter in the mix", |snap| {
        snap.bridge(&main).is_some_and(|b| b.channels.len() == 141)
    })
    .await;
    let refused: Vec<_> = s
        .sim
        .request_log()
        .into_iter()
        .filter(|r| r.operation.as_deref() == Some("addChannel") && r.status >= 400)
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
}

/// When a start's later `addChannel` fails (a waiter named in it hung up just then), the
/// waiters an earlier request moved stay where they are, and only the rest are moved one by
/// one: adding a channel again to the bridge it is in makes it leave first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_later_add_fails_moves_no_waiter_twice() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let mut waiters = waiting_callers(&s.sim, "split-room", 100).await;
    // The agent moves waiters in the order of their ids, 64 to a request.
    waiters.sort();
    let gone = waiters[80].clone();
    let op = format!("addChannel {gone}");
    s.sim.hold_operation(&op);
    let starter = dial(&s.sim, "split-room", &[]).await;
    let main = wait_bridged(&s.sim, &starter).await;
    wait_for_async("the second request held", WAIT, || async {
        (s.sim.held_requests(&op) == 1).then_some(())
    })
    .await
    .expect("the start's second addChannel");
    s.sim.hangup_far_end(&gone, 16).await.expect("hang up");
    s.sim.release_operation(&op);
    until(&s.sim, "every other waiter in the mix", |snap| {
        snap.bridge(&main).is_some_and(|b| b.channels.len() == 100)
    })
    .await;
    // Added again, a waiter would leave the mix first.
    let left_mix: Vec<String> = s
        .sim
        .event_log()
        .iter()
        .filter(|e| e["type"] == "ChannelLeftBridge" && e["bridge"]["id"] == main.as_str())
        .filter_map(|e| e["channel"]["id"].as_str().map(str::to_string))
        .collect();
    assert!(left_mix.is_empty(), "{left_mix:?}");
}

/// Wait music the holding bridge could not start (Asterisk did not answer) is asked again
/// for a caller who waits a moment later (not for each of a burst, each of which would wait
/// out the timeout), rather than leave every waiter in silence for as long as the bridge
/// lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_music_that_did_not_start_is_asked_again_for_a_later_waiter() {
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_ARI__REQUEST_TIMEOUT", "1s"),
    ])
    .await;
    let waits = [("CONFROUTE_START_ON_ENTER", "false")];
    s.sim.lose_operation("startMoh");
    let w1 = dial(&s.sim, "quiet-room", &waits).await;
    let holding = wait_bridged(&s.sim, &w1).await;
    assert_holding(&holding, 1, "quiet-room");
    assert_eq!(
        s.sim.snapshot().bridge(&holding).map(|b| b.moh.clone()),
        Some(None),
        "no music yet"
    );
    s.sim.deliver_operation("startMoh");
    // Asked again for a caller who comes a while after the failure (not for each of a
    // burst): callers keep coming until one brings the music.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let w = dial(&s.sim, "quiet-room", &waits).await;
        assert_eq!(wait_bridged(&s.sim, &w).await, holding);
        if s.sim
            .snapshot()
            .bridge(&holding)
            .is_some_and(|b| b.moh.is_some())
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "wait music never asked again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let asked = s
        .sim
        .request_log()
        .iter()
        .filter(|r| r.operation.as_deref() == Some("startMoh"))
        .count();
    assert!(asked <= 3, "asked {asked} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_hear_music_in_a_holding_bridge_until_a_starter_joins() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let w1 = dial(
        &s.sim,
        "hold-room",
        &[
            ("CONFROUTE_START_ON_ENTER", "false"),
            ("CONFROUTE_WAIT_MUSIC", "jazz"),
        ],
    )
    .await;
    let holding_id = wait_bridged(&s.sim, &w1).await;
    assert_holding(&holding_id, 1, "hold-room");
    let w2 = dial(
        &s.sim,
        "hold-room",
        &[
            ("CONFROUTE_START_ON_ENTER", "false"),
            ("CONFROUTE_MUTED", "true"),
        ],
    )
    .await;
    assert_eq!(wait_bridged(&s.sim, &w2).await, holding_id);
    let snap = s.sim.snapshot();
    let holding = snap.bridge(&holding_id).expect("holding bridge");
    assert_eq!(holding.bridge_type, "holding");
    assert_eq!(holding.moh.as_deref(), Some("jazz"));
    let main = main_bridge(&snap, 1, "hold-room").expect("main bridge");
    assert!(main.channels.is_empty());
    let main_id = main.id.clone();

    let starter = dial(&s.sim, "hold-room", &[]).await;
    until(&s.sim, "everyone in the mixing bridge", |snap| {
        snap.bridge(&main_id).is_some_and(|b| b.channels.len() == 3)
            && snap.bridge(&holding_id).is_none()
    })
    .await;
    let order: Vec<String> = s
        .sim
        .event_log()
        .iter()
        .filter(|e| {
            e["application"] == "confroute"
                && e["type"] == "ChannelEnteredBridge"
                && e["bridge"]["id"] == main_id.as_str()
        })
        .map(|e| e["channel"]["id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        order[0], starter,
        "the starter enters first, then the waiters move"
    );
    let snap = s.sim.snapshot();
    assert!(!snap.channel(&w1).expect("w1").muted_in);
    assert!(
        snap.channel(&w2).expect("w2").muted_in,
        "a muted waiter stays muted in the conference"
    );
    // A later caller with startConferenceOnEnter=false joins the started conference directly.
    let late = dial(
        &s.sim,
        "hold-room",
        &[("CONFROUTE_START_ON_ENTER", "false")],
    )
    .await;
    assert_eq!(wait_bridged(&s.sim, &late).await, main_id);
}

/// With `conference.lone_starter_waits` a conference starts as Twilio's do: a starter alone
/// waits with music and `conference-start` waits too; the second caller (here not a
/// starter) starts it, and both are mixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_starter_waits_with_music_until_a_second_caller_when_asked() {
    let (url, got) = receiver(0).await;
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_CONFERENCE__LONE_STARTER_WAITS", "true"),
    ])
    .await;
    let starter = dial(
        &s.sim,
        "twilio-start",
        &[
            ("CONFROUTE_STATUS_CALLBACK", url.as_str()),
            ("CONFROUTE_STATUS_CALLBACK_EVENT", "start join"),
            ("CONFROUTE_WAIT_MUSIC", "jazz"),
        ],
    )
    .await;
    let holding_id = wait_bridged(&s.sim, &starter).await;
    assert_holding(&holding_id, 1, "twilio-start");
    let snap = s.sim.snapshot();
    assert_eq!(
        snap.bridge(&holding_id)
            .and_then(|b| b.moh.clone())
            .as_deref(),
        Some("jazz"),
        "the lone starter hears the wait music"
    );
    wait_for_async("the starter's join callback", WAIT, || async {
        (!got.lock().expect("lock").is_empty()).then_some(())
    })
    .await
    .expect("join callback");
    let main_id = main_bridge(&snap, 1, "twilio-start")
        .expect("main bridge")
        .id
        .clone();

    let second = dial(
        &s.sim,
        "twilio-start",
        &[
            ("CONFROUTE_START_ON_ENTER", "false"),
            ("CONFROUTE_BEEP", "true"),
        ],
    )
    .await;
    until(&s.sim, "both in the mixing bridge", |snap| {
        snap.bridge(&main_id).is_some_and(|b| {
            b.channels.len() == 2 && b.channels.contains(&starter) && b.channels.contains(&second)
        }) && snap.bridge(&holding_id).is_none()
    })
    .await;
    let target = format!("bridge:{main_id}");
    wait_for_async("the start's beep", WAIT, || async {
        (playbacks_on(&s.sim, &target).len() == 1).then_some(())
    })
    .await
    .expect("the second caller's entry beep tells the starter the conference began");
    let got = callbacks(&got, 3).await;
    let events = event_pairs(&got);
    assert_eq!(
        events,
        [
            ("participant-join", starter.as_str()),
            ("participant-join", second.as_str()),
            ("conference-start", ""),
        ]
    );
}

/// With `conference.lone_starter_waits`, callers left waiting that make a start (the agent
/// stopped between the second caller's wait and the start) are started by the restarted
/// agent once it adopts them, not left with music until a third caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_that_make_a_start_are_started_after_a_restart() {
    let mut s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_CONFERENCE__LONE_STARTER_WAITS", "true"),
    ])
    .await;
    let starter = dial(&s.sim, "restart-start", &[]).await;
    let holding = wait_bridged(&s.sim, &starter).await;
    assert_holding(&holding, 1, "restart-start");
    let second = second_waiter_behind_a_stopped_agent(&mut s, "restart-start", &holding).await;
    s.node.restart().expect("restart");
    both_mixed(&s.sim, &starter, &second, &holding).await;
}

/// Waits until `a` and `b` share a bridge other than `holding`.
async fn both_mixed(sim: &TestSim, a: &str, b: &str, holding: &str) {
    until(sim, "both mixed", |snap| {
        let bridge = |ch: &str| snap.channel(ch).and_then(|c| c.bridge.clone());
        bridge(a).is_some_and(|m| m != holding && bridge(b).as_deref() == Some(m.as_str()))
    })
    .await;
}

/// Waits until one `answer` is held back by the simulator.
async fn answer_held(sim: &TestSim) {
    wait_for_async("an answer held back", WAIT, || async {
        (sim.held_requests("answer") == 1).then_some(())
    })
    .await
    .expect("answer asked");
}

/// Adds `ch` to `bridge` through ARI, as another client (or the agent's own request in
/// flight) would.
async fn add_behind_the_agent(sim: &TestSim, bridge: &str, ch: &str) {
    let resp = fixtures::http()
        .post(format!(
            "{}/ari/bridges/{bridge}/addChannel?channel={ch}",
            sim.base_url()
        ))
        .basic_auth(sim.username(), Some(sim.password()))
        .send()
        .await
        .expect("addChannel");
    assert_eq!(resp.status().as_u16(), 204);
}

/// Puts a second caller of `conf` in the holding bridge beside the starter while the agent's
/// own join of it waits on its answer, then stops the agent: as if it stopped between the
/// second caller's wait and the start. Returns the second caller's channel.
async fn second_waiter_behind_a_stopped_agent(s: &mut Single, conf: &str, holding: &str) -> String {
    s.sim.hold_operation("answer");
    let second = dial(&s.sim, conf, &[]).await;
    answer_held(&s.sim).await;
    add_behind_the_agent(&s.sim, holding, &second).await;
    s.node.process().kill();
    s.sim.release_operation("answer");
    second
}

/// The same waiters, adopted by a newcomer's admission before the restarted agent's first
/// reconciliation, start as that newcomer is refused (the conference is full), not only once
/// the reconciliation comes round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_adopted_for_a_refused_newcomer_start_at_once() {
    let mut s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_CONFERENCE__LONE_STARTER_WAITS", "true"),
    ])
    .await;
    let max = [("CONFROUTE_MAX_PARTICIPANTS", "2")];
    let starter = dial(&s.sim, "adopt-start", &max).await;
    let holding = wait_bridged(&s.sim, &starter).await;
    assert_holding(&holding, 1, "adopt-start");
    let second = second_waiter_behind_a_stopped_agent(&mut s, "adopt-start", &holding).await;
    s.restart_with_channel_listing_held().await;
    let third = dial(&s.sim, "adopt-start", &[]).await;
    assert_eq!(wait_hangup(&s.sim, &third).await, 17, "full: busy");
    // The reconciliation still waits for its channel listing: the start is the refusal's.
    both_mixed(&s.sim, &starter, &second, &holding).await;
    assert!(s.sim.held_requests("GET /channels") > 0);
    s.sim.release_operation("GET /channels");
}

/// Two waiters of `conf`, then a starter whose own join waits on its answer while the
/// start's first moves happen behind the agent (the starter and the first waiter into the
/// mix), and the agent stopped before the second waiter's: a start cut short. Returns the
/// mix and the holding bridge, and the starter and both waiters' channels.
async fn cut_short_start(s: &mut Single, conf: &str) -> (String, String, [String; 3]) {
    let wait = [("CONFROUTE_START_ON_ENTER", "false")];
    let w1 = dial(&s.sim, conf, &wait).await;
    let holding = wait_bridged(&s.sim, &w1).await;
    assert_holding(&holding, 1, conf);
    let w2 = dial(&s.sim, conf, &wait).await;
    assert_eq!(wait_bridged(&s.sim, &w2).await, holding);
    let main = main_bridge(&s.sim.snapshot(), 1, conf)
        .expect("main bridge")
        .id
        .clone();
    s.sim.hold_operation("answer");
    let starter = dial(&s.sim, conf, &[]).await;
    answer_held(&s.sim).await;
    for ch in [&starter, &w1] {
        add_behind_the_agent(&s.sim, &main, ch).await;
    }
    s.node.process().kill();
    s.sim.release_operation("answer");
    (main, holding, [starter, w1, w2])
}

/// A start cut short by an agent restart (one waiter moved into the mix, the other not) is
/// finished by the restarted agent: the waiter left with music joins the others and the
/// holding bridge goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_cut_short_by_a_restart_is_finished() {
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let (main, holding, _) = cut_short_start(&mut s, "cut-short").await;
    s.node.restart().expect("restart");
    until(&s.sim, "all three mixed, the holding bridge gone", |snap| {
        snap.bridge(&main).is_some_and(|b| b.channels.len() == 3) && snap.bridge(&holding).is_none()
    })
    .await;
}

/// A start cut short by an agent restart (the settings say started, one waiter was moved
/// in), whose mixing bridge was then destroyed while the agent was down: the restarted agent
/// finds only the holding bridge with a waiter of a started conference. It makes the mix again before it moves the waiter in (an addChannel
/// to the missing bridge left the waiter on music until a later reconciliation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_short_start_whose_mix_is_gone_makes_it_again() {
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let (main, holding, callers) = cut_short_start(&mut s, "cut-gone").await;
    // What the last life wrote as its start began: the settings say started.
    let settings = s
        .redis
        .query(
            redis::cmd("HGET")
                .arg("{confroute}:conf:cut-gone")
                .arg("settings"),
        )
        .and_then(|v| redis::from_redis_value::<String>(v).ok())
        .unwrap_or_else(|| "{}".into());
    let mut kept: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&settings).expect("settings are a JSON object");
    kept.insert("started".into(), "1".into());
    s.redis
        .query(
            redis::cmd("HSET")
                .arg("{confroute}:conf:cut-gone")
                .arg("settings")
                .arg(serde_json::Value::Object(kept).to_string()),
        )
        .expect("HSET");
    let other = confroute_tests::ari_sim::client::AriClient::new(&s.sim).expect("client");
    let r = other
        .call("DELETE", &format!("/bridges/{main}"), None)
        .await
        .expect("destroy");
    assert_eq!(r.status, 204);
    let before = s.sim.request_log().len();
    s.node.restart().expect("restart");
    let mut want = callers.to_vec();
    want.sort();
    let mixed = |snap: &confroute_tests::ari_sim::SimSnapshot| {
        snap.bridges.iter().any(|b| {
            let mut got = b.channels.clone();
            got.sort();
            b.id != holding && got == want
        }) && snap.bridge(&holding).is_none()
    };
    until(
        &s.sim,
        "all three in one mix, the holding bridge gone",
        mixed,
    )
    .await;
    let missing: Vec<_> = s.sim.request_log()[before..]
        .iter()
        .filter(|r| r.operation.as_deref() == Some("addChannel") && r.status == 404)
        .map(|r| r.path.clone())
        .collect();
    assert!(
        missing.is_empty(),
        "adds to a missing bridge: {missing:?}\n{}",
        s.node.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_move_in_even_when_one_hangs_up_as_the_starter_joins() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let wait = [("CONFROUTE_START_ON_ENTER", "false")];
    let mut waiters = Vec::new();
    let mut holding_id = String::new();
    for _ in 0..3 {
        let w = dial(&s.sim, "race-room", &wait).await;
        let bridge = wait_bridged(&s.sim, &w).await;
        assert_holding(&bridge, 1, "race-room");
        holding_id = bridge;
        waiters.push(w);
    }
    let main_id = main_bridge(&s.sim.snapshot(), 1, "race-room")
        .expect("main bridge")
        .id
        .clone();
    let gone = waiters.pop().expect("three waiters");
    // The starter's answer waits in Asterisk while a waiter hangs up, so the conference's
    // actor, busy with the starter's join, moves the waiters before it hears of it.
    s.sim.hold_operation("answer");
    let starter = dial(&s.sim, "race-room", &[]).await;
    wait_for_async("the starter's answer held", WAIT, || async {
        (s.sim.held_requests("answer") == 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    s.sim
        .hangup_far_end(&gone, 16)
        .await
        .expect("a waiter hangs up");
    s.sim.release_operation("answer");
    let mut want = vec![starter, waiters[0].clone(), waiters[1].clone()];
    want.sort();
    until(
        &s.sim,
        "the other waiters in the mix, holding bridge gone",
        |snap| {
            snap.bridge(&main_id).is_some_and(|b| {
                let mut got = b.channels.clone();
                got.sort();
                got == want
            }) && snap.bridge(&holding_id).is_none()
        },
    )
    .await;
    assert!(
        s.sim.request_log().iter().any(|r| {
            r.operation.as_deref() == Some("addChannel")
                && r.path == format!("/ari/bridges/{main_id}/addChannel")
                && r.status == 400
        }),
        "the waiters were never refused together: {:#?}",
        s.sim.request_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_conference_on_exit_hangs_up_everyone() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let moderator = dial(&s.sim, "mod-room", &[("CONFROUTE_END_ON_EXIT", "true")]).await;
    let p1 = dial(&s.sim, "mod-room", &[]).await;
    let p2 = dial(&s.sim, "mod-room", &[]).await;
    for ch in [&moderator, &p1, &p2] {
        wait_bridged(&s.sim, ch).await;
    }
    s.sim
        .hangup_far_end(&moderator, 16)
        .await
        .expect("moderator leaves");
    assert_eq!(wait_hangup(&s.sim, &p1).await, 16);
    assert_eq!(wait_hangup(&s.sim, &p2).await, 16);
    until(&s.sim, "bridge destroyed", |snap| {
        snap.bridges.is_empty() && snap.channels.is_empty()
    })
    .await;
}

/// A waiter put on hold before the conference starts is, once it has started, a held
/// participant of a started conference: with endConferenceOnExit its leaving ends it, as
/// Twilio's does, and the list no longer shows it waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_held_before_the_start_ends_the_conference_on_exit_after_it() {
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    s.node
        .wait_log("command bus subscribed", WAIT)
        .expect("the node hears commands");
    let store = fixtures::store(&s.cfg);
    let bus = confroute_shared::bus::Bus::controller(store);
    assert!(bus.wait_connected(WAIT).await, "bus connects");
    let send = |method: &'static str, params: serde_json::Value| {
        let bus = bus.clone();
        async move {
            bus.call(
                &fixtures::id("node-a"),
                method,
                params,
                std::time::Duration::from_secs(5),
                false,
            )
            .await
            .expect("sent")
            .reply
            .expect("done")
        }
    };
    let customer = dial(
        &s.sim,
        "held-room",
        &[
            ("CONFROUTE_START_ON_ENTER", "false"),
            ("CONFROUTE_END_ON_EXIT", "true"),
        ],
    )
    .await;
    let holding = wait_bridged(&s.sim, &customer).await;
    send(
        "participant.hold",
        serde_json::json!({"conference": "held-room", "participant": customer}),
    )
    .await;
    let agent = dial(&s.sim, "held-room", &[]).await;
    let main = wait_bridged(&s.sim, &agent).await;
    assert_ne!(main, holding, "the agent started the conference in its mix");
    let list = send(
        "participant.list",
        serde_json::json!({"conference": "held-room"}),
    )
    .await;
    let entry = list["participants"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["id"] == customer.as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (&entry["waiting"], &entry["held"]),
        (&serde_json::json!(false), &serde_json::json!(true)),
        "{list}"
    );
    s.sim
        .hangup_far_end(&customer, 16)
        .await
        .expect("the customer leaves");
    assert_eq!(
        wait_hangup(&s.sim, &agent).await,
        16,
        "the conference ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_participants_refuses_the_next_caller_with_a_sound_then_busy() {
    refused_full_with_a_sound(true).await;
}

/// On an Asterisk without `POST /channels/{id}/progress` (before 20.16, 21.11, 22.6) the
/// refused caller still hears the sound: the playback itself indicates progress to a channel
/// not answered, so it goes out as early media there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_conference_plays_its_sound_on_an_asterisk_without_progress() {
    refused_full_with_a_sound(false).await;
}

/// A third caller of a conference of two, refused with the full sound (as early media, the
/// call never answered) and then busy; `progress_route`: the Asterisk has the progress route.
async fn refused_full_with_a_sound(progress_route: bool) {
    let s = Single::start_on(
        sim_tuned(CHANNELVARS, |c| c.progress_route = progress_route).await,
        &[
            ("CONFROUTE_CONFERENCE__BEEP", "false"),
            ("CONFROUTE_CONFERENCE__FULL_SOUND", "conf-full"),
        ],
    )
    .await;
    // The conference's first caller sets its size.
    let a = dial(&s.sim, "small", &[("CONFROUTE_MAX_PARTICIPANTS", "2")]).await;
    wait_bridged(&s.sim, &a).await;
    let b = dial(&s.sim, "small", &[]).await;
    wait_bridged(&s.sim, &b).await;
    let c = dial(&s.sim, "small", &[]).await;
    assert_eq!(wait_hangup(&s.sim, &c).await, 17, "user busy (SIP 486)");
    let log = s.sim.event_log();
    let target = format!("channel:{c}");
    let finished = log.iter().position(|e| {
        e["type"] == "PlaybackFinished" && e["playback"]["target_uri"] == target.as_str()
    });
    let destroyed = log
        .iter()
        .position(|e| e["type"] == "ChannelDestroyed" && e["channel"]["id"] == c.as_str());
    assert!(
        finished.is_some() && finished < destroyed,
        "the full sound played to the end before the hangup"
    );
    assert!(
        log.iter()
            .any(|e| e["type"] == "PlaybackStarted"
                && e["playback"]["media_uri"] == "sound:conf-full")
    );
    // The sound went out as early media: the refused call was never answered, so the edge
    // gets the busy (486), not a 200 and a BYE.
    assert!(
        !log.iter().any(|e| e["type"] == "ChannelStateChange"
            && e["channel"]["id"] == c.as_str()
            && e["channel"]["state"] == "Up"),
        "the refused caller was answered"
    );
    let requests = s.sim.request_log();
    let on_c = |op: &str| {
        requests
            .iter()
            .any(|r| r.operation.as_deref() == Some(op) && r.path.contains(c.as_str()))
    };
    assert!(!on_c("answer"), "{requests:#?}");
    if progress_route {
        assert!(on_c("progress"), "early media asked for: {requests:#?}");
    }
    assert_eq!(
        main_bridge(&s.sim.snapshot(), 1, "small")
            .expect("bridge")
            .channels
            .len(),
        2
    );
}

/// `record-from-start` records the mixing bridge from the start; a conference ended while
/// others are still in it (its moderator leaving, `endConferenceOnExit`) has its recording
/// stopped before its bridge goes. A conference's last caller hanging up takes the
/// recording along by itself (a lonely bridge member in Asterisk), and no new one starts.
/// The conference's name holds `..`, which Asterisk takes in a recording's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_from_start_records_the_bridge_until_the_end() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let a = dial(
        &s.sim,
        "rec..room",
        &[
            ("CONFROUTE_RECORD", "record-from-start"),
            ("CONFROUTE_END_ON_EXIT", "true"),
        ],
    )
    .await;
    let bridge = wait_bridged(&s.sim, &a).await;
    assert_main(&bridge, 1, "rec..room");
    let b = dial(&s.sim, "rec..room", &[]).await;
    assert_eq!(wait_bridged(&s.sim, &b).await, bridge);
    let target = format!("bridge:{bridge}");
    let started = s
        .sim
        .wait_for_event(WAIT, |e| {
            e["type"] == "RecordingStarted" && e["recording"]["target_uri"] == target.as_str()
        })
        .await
        .expect("recording started");
    let name = started["recording"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    assert!(name.starts_with("confroute-rec..room-1-"), "{name}");
    s.sim.hangup_far_end(&a, 16).await.expect("leave");
    s.sim
        .wait_for_event(WAIT, |e| {
            e["type"] == "RecordingFinished" && e["recording"]["name"] == name.as_str()
        })
        .await
        .expect("recording finished");
    until(&s.sim, "bridge gone", |snap| snap.bridges.is_empty()).await;
    let bridge_path = format!("/ari/bridges/{bridge}");
    wait_request(&s.sim, "destroy", &bridge_path).await;
    let log = s.sim.request_log();
    let stop = log.iter().position(|r| {
        r.operation.as_deref() == Some("stop") && r.path.starts_with("/ari/recordings/live/")
    });
    let destroy = log
        .iter()
        .position(|r| r.operation.as_deref() == Some("destroy") && r.path == bridge_path);
    assert!(
        stop.is_some() && stop < destroy,
        "recording stopped before the bridge went: {log:#?}"
    );

    // Alone, the last caller hanging up ends the recording itself.
    let c = dial(
        &s.sim,
        "rec..room-2",
        &[("CONFROUTE_RECORD", "record-from-start")],
    )
    .await;
    let bridge = wait_bridged(&s.sim, &c).await;
    let target = format!("bridge:{bridge}");
    let started = s
        .sim
        .wait_for_event(WAIT, |e| {
            e["type"] == "RecordingStarted" && e["recording"]["target_uri"] == target.as_str()
        })
        .await
        .expect("recording started");
    let mark = s.sim.event_count();
    s.sim.hangup_far_end(&c, 16).await.expect("leave");
    s.sim
        .wait_for_event_after(mark, WAIT, |e| {
            e["type"] == "RecordingFinished"
                && e["recording"]["name"] == started["recording"]["name"]
        })
        .await
        .expect("recording finished");
    until(&s.sim, "bridge gone", |snap| snap.bridges.is_empty()).await;
    let restarted = s
        .sim
        .event_log()
        .iter()
        .skip(mark)
        .any(|e| e["type"] == "RecordingStarted");
    assert!(!restarted, "no recording after the last caller left");
}

type Received = Arc<Mutex<Vec<HashMap<String, String>>>>;

/// Waits until the receiver has `n` callbacks; they, in order.
async fn callbacks(got: &Received, n: usize) -> Vec<HashMap<String, String>> {
    wait_for_async("the callbacks", WAIT, || async {
        (got.lock().expect("lock").len() == n).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", got.lock().expect("lock")));
    got.lock().expect("lock").clone()
}

/// Each callback's `StatusCallbackEvent` and `CallSid` (empty for a conference event).
fn event_pairs(got: &[HashMap<String, String>]) -> Vec<(&str, &str)> {
    got.iter()
        .map(|f| {
            (
                f["StatusCallbackEvent"].as_str(),
                f.get("CallSid").map(String::as_str).unwrap_or(""),
            )
        })
        .collect()
}

/// A status callback receiver: its URL and what it took. It answers 500 to the first
/// `fail_first` requests, and each answer takes `slow`.
async fn receiver_with(fail_first: usize, slow: std::time::Duration) -> (String, Received) {
    let got: Received = Arc::default();
    let failures = Arc::new(Mutex::new(fail_first));
    let state = (got.clone(), failures);
    let app = axum::Router::new()
        .route(
            "/events",
            post(
                move |State((got, failures)): State<(Received, Arc<Mutex<usize>>)>,
                      Form(form): Form<HashMap<String, String>>| async move {
                    let failed = {
                        let mut f = failures.lock().expect("lock");
                        let failed = *f > 0;
                        if failed {
                            *f -= 1;
                        } else {
                            got.lock().expect("lock").push(form);
                        }
                        failed
                    };
                    tokio::time::sleep(slow).await;
                    if failed {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::NO_CONTENT
                    }
                },
            ),
        )
        .with_state(state);
    let addr = fixtures::serve_http(app).await;
    (format!("http://{addr}/events"), got)
}

async fn receiver(fail_first: usize) -> (String, Received) {
    receiver_with(fail_first, std::time::Duration::ZERO).await
}

/// A caller of `conference` asking for `events` callbacks to `url`, once in its bridge.
async fn dial_hooked(sim: &AriSim, conference: &str, url: &str, events: &str) -> String {
    let ch = dial(
        sim,
        conference,
        &[
            ("CONFROUTE_STATUS_CALLBACK", url),
            ("CONFROUTE_STATUS_CALLBACK_EVENT", events),
        ],
    )
    .await;
    wait_bridged(sim, &ch).await;
    ch
}

/// Waits until conference `conference`'s settings are kept in Redis.
async fn settings_kept(s: &Single, conference: &str) -> String {
    let store = fixtures::store(&s.cfg);
    let name = confroute_shared::name::ConferenceName::parse(conference).expect("name");
    wait_for_async("settings recorded", WAIT, || async {
        store.conference_settings(&name).await.ok().flatten()
    })
    .await
    .expect("settings in Redis")
}

/// The caller's phone puts the call on hold while the agent is still reading the caller's
/// options (no `channelvars`, so it asks Asterisk for each): the conference it joins
/// announces the hold once it is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_from_the_phone_during_admission_is_announced_once_the_caller_is_in() {
    let (url, got) = receiver(0).await;
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let sim = sim_with(&[]).await;
    let node = NodeProc::start(
        "node-a",
        &env(&sim, &cfg, &[("CONFROUTE_CONFERENCE__BEEP", "false")]),
    )
    .expect("node");
    wait_app(&sim, &node).await;
    sim.hold_operation("getChannelVar");
    let ch = dial(
        &sim,
        "held-early",
        &[
            ("CONFROUTE_STATUS_CALLBACK", url.as_str()),
            // Twilio's `speaker` (a callback confroute does not send) spoils nothing.
            ("CONFROUTE_STATUS_CALLBACK_EVENT", "start join hold speaker"),
        ],
    )
    .await;
    confroute_tests::harness::wait_for_async("the options being read", WAIT, || async {
        (sim.held_requests("getChannelVar") > 0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    sim.caller_hold(&ch, true).await.expect("the phone holds");
    sim.release_operation("getChannelVar");
    wait_bridged(&sim, &ch).await;
    wait_for_async("three callbacks", WAIT, || async {
        (got.lock().expect("lock").len() == 3).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}\n{}", got.lock().expect("lock"), node.output()));
    let got = got.lock().expect("lock").clone();
    let events: Vec<&str> = got
        .iter()
        .map(|f| f["StatusCallbackEvent"].as_str())
        .collect();
    assert_eq!(
        events,
        ["participant-join", "conference-start", "participant-hold"],
        "{got:#?}"
    );
    assert_eq!(got[2]["Hold"], "true");
    assert_eq!(got[2]["CallSid"], ch);
}

/// A conference whose first caller never got in (it hung up while being answered) ends
/// without a word to the application: it never heard of it, and a `conference-end` for a
/// `ConferenceSid` no other callback named would be one it cannot place. Twilio creates no
/// conference for a caller it never added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conference_nobody_entered_ends_without_callbacks() {
    let (url, got) = receiver(0).await;
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let hooks = [
        ("CONFROUTE_STATUS_CALLBACK", url.as_str()),
        ("CONFROUTE_STATUS_CALLBACK_EVENT", "start end join leave"),
    ];
    s.sim.hold_operation("answer");
    let shy = dial(&s.sim, "never-in", &hooks).await;
    wait_for_async("the answer to be asked", WAIT, || async {
        (s.sim.held_requests("answer") == 1).then_some(())
    })
    .await
    .expect("answer asked");
    s.sim.hangup_during_answer(&shy);
    s.sim.release_operation("answer");
    let node_url = s.node.http_url();
    wait_for_async("the conference ended", WAIT, || async {
        let m = fixtures::scrape(&node_url).await;
        (fixtures::metric(
            &m,
            r#"confroute_node_conferences_ended_total{reason="join_failed"}"#,
        ) == 1.0)
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    // A conference someone entered, after it, to the same receiver: its callbacks coming
    // through show the first one's would have come by now.
    let a = dial(&s.sim, "was-in", &hooks).await;
    wait_bridged(&s.sim, &a).await;
    s.sim.hangup_far_end(&a, 16).await.expect("hang up");
    wait_for_async("the second conference's end", WAIT, || async {
        got.lock()
            .expect("lock")
            .iter()
            .any(|f| f["StatusCallbackEvent"] == "conference-end")
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", got.lock().expect("lock")));
    let got = got.lock().expect("lock").clone();
    assert!(
        got.iter().all(|f| f["FriendlyName"] == "was-in"),
        "{got:#?}"
    );
    assert_eq!(got.len(), 4, "{got:#?}");
}

/// A caller whose hangup was lost with the events WebSocket is found gone by the
/// reconciliation after the reconnect and reported as having hung up, its call completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hangup_lost_with_the_websocket_is_reported_as_a_hangup() {
    let (url, got) = receiver(0).await;
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    dial_hooked(&s.sim, "lost-hangup", &url, "leave").await;
    let b = dial(&s.sim, "lost-hangup", &[]).await;
    wait_bridged(&s.sim, &b).await;
    s.sim.drop_websockets();
    s.sim.hangup_far_end(&b, 16).await.expect("hang up");
    wait_for_async("b's leave callback", WAIT, || async {
        (!got.lock().expect("lock").is_empty()).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let got = got.lock().expect("lock").clone();
    assert_eq!(got[0]["CallSid"], b, "{got:#?}");
    assert_eq!(got[0]["ReasonParticipantLeft"], "participant_hung_up");
    assert_eq!(got[0]["ParticipantCallStatus"], "completed");
}

/// A caller another ARI client put into a bridge of its own, still up and in the app, is
/// reported removed with its call in progress (not hung up). (One merely taken out of the
/// conference's bridge, in no bridge at all, is put back as the same participant:
/// `node_failover::callers_taken_out_of_their_bridge_behind_the_agents_back_are_put_back`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_taken_out_behind_the_agents_back_is_reported_removed_not_hung_up() {
    let (url, got) = receiver(0).await;
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_ARI__RECONCILE_INTERVAL", "300ms"),
    ])
    .await;
    let a = dial(
        &s.sim,
        "taken-out",
        &[
            ("CONFROUTE_STATUS_CALLBACK", url.as_str()),
            ("CONFROUTE_STATUS_CALLBACK_EVENT", "leave"),
        ],
    )
    .await;
    let bridge = wait_bridged(&s.sim, &a).await;
    let b = dial(&s.sim, "taken-out", &[]).await;
    wait_bridged(&s.sim, &b).await;
    let ari = |path: String| {
        fixtures::http()
            .post(format!("{}/ari{path}", s.sim.base_url()))
            .basic_auth(s.sim.username(), Some(s.sim.password()))
            .send()
    };
    let resp = ari("/bridges/elsewhere?type=mixing".to_string())
        .await
        .expect("create a bridge");
    assert_eq!(resp.status().as_u16(), 200);
    let resp = ari(format!("/bridges/elsewhere/addChannel?channel={b}"))
        .await
        .expect("addChannel");
    assert_eq!(resp.status().as_u16(), 204);
    let got = callbacks(&got, 1).await;
    assert_eq!(got[0]["CallSid"], b, "{got:#?}");
    assert_eq!(got[0]["ReasonParticipantLeft"], "participant_removed");
    assert_eq!(got[0]["ParticipantCallStatus"], "in-progress");
    assert_eq!(
        s.sim.snapshot().channel(&b).and_then(|c| c.bridge.clone()),
        Some("elsewhere".to_string()),
        "left where the other client put it"
    );
    assert_eq!(
        s.sim.snapshot().channel(&a).and_then(|c| c.bridge.clone()),
        Some(bridge),
        "the conference goes on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_callbacks_arrive_in_order_with_retries_after_a_500() {
    let (url, got) = receiver(2).await;
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_WEBHOOK__RETRY_INITIAL", "50ms"),
    ])
    .await;
    let vars = [
        ("CONFROUTE_STATUS_CALLBACK", url.as_str()),
        (
            "CONFROUTE_STATUS_CALLBACK_EVENT",
            "start end join leave hold",
        ),
    ];
    let a = dial(&s.sim, "hooks", &vars).await;
    wait_bridged(&s.sim, &a).await;
    let b = dial(&s.sim, "hooks", &[]).await;
    wait_bridged(&s.sim, &b).await;
    s.sim.caller_hold(&b, true).await.expect("hold");
    s.sim.caller_hold(&b, false).await.expect("unhold");
    s.sim.hangup_far_end(&b, 16).await.expect("b leaves");
    s.sim.hangup_far_end(&a, 16).await.expect("a leaves");
    let got = callbacks(&got, 8).await;
    let events = event_pairs(&got);
    assert_eq!(
        events,
        vec![
            ("participant-join", a.as_str()),
            ("conference-start", ""),
            ("participant-join", b.as_str()),
            ("participant-hold", b.as_str()),
            ("participant-unhold", b.as_str()),
            ("participant-leave", b.as_str()),
            ("participant-leave", a.as_str()),
            ("conference-end", ""),
        ]
    );
    let seq: Vec<u64> = got
        .iter()
        .map(|f| f["SequenceNumber"].parse().expect("number"))
        .collect();
    assert_eq!(seq, (1..=8).collect::<Vec<u64>>());
    let sid = &got[0]["ConferenceSid"];
    assert!(sid.starts_with("CF") && sid.len() == 34, "{sid}");
    assert!(got
        .iter()
        .all(|f| &f["ConferenceSid"] == sid && f["FriendlyName"] == "hooks"));
    assert_eq!(got[3]["Hold"], "true");
    assert_eq!(got[7]["ReasonConferenceEnded"], "last-participant-left");
    assert_eq!(
        got[7]["CallSidEndingConference"], a,
        "the last to leave ended it"
    );
    assert_eq!(got[0]["Muted"], "false");
    assert!(got[0]["Timestamp"].ends_with("+0000"));
    let m = fixtures::scrape(&s.node.http_url()).await;
    assert_eq!(fixtures::metric(&m, "confroute_webhook_retries_total"), 2.0);
    assert_eq!(
        fixtures::metric(
            &m,
            r#"confroute_webhook_deliveries_total{outcome="delivered"}"#
        ),
        8.0
    );
}

/// What the first caller set for the whole conference (its size, its status callbacks and
/// their ConferenceSid) outlives a restart of the agent: the conference is adopted with it,
/// not with the configured defaults.
/// Starts conference "kept" with settings that differ from the defaults (a room of two,
/// callbacks for start and join to `url`): returns its first caller once both callbacks
/// arrived and the settings are in Redis.
async fn kept_conference(s: &Single, url: &str, got: &Received) -> String {
    let a = dial(
        &s.sim,
        "kept",
        &[
            ("CONFROUTE_MAX_PARTICIPANTS", "2"),
            ("CONFROUTE_STATUS_CALLBACK", url),
            ("CONFROUTE_STATUS_CALLBACK_EVENT", "start join"),
        ],
    )
    .await;
    wait_bridged(&s.sim, &a).await;
    settings_kept(s, "kept").await;
    wait_for_async("start callbacks", WAIT, || async {
        (got.lock().expect("lock").len() == 2).then_some(())
    })
    .await
    .expect("join and start delivered");
    a
}

/// Waits until the agent lists `n` participants in conference "kept".
async fn wait_kept_listed(s: &Single, n: usize) {
    let view = format!("{}/v1/conferences", s.node.http_url());
    wait_for_async(
        "the conference's participants in the agent's view",
        WAIT,
        || async {
            let v = fixtures::try_get_json(&view).await?;
            let kept = v["items"]
                .as_array()?
                .iter()
                .find(|c| c["conference"] == "kept")?
                .clone();
            (kept["participants"].as_array().map(Vec::len) == Some(n)).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
}

/// After the restart, a newcomer `b` joined conference "kept": the room of two refuses a
/// third caller, and `b`'s join reached the application as the same conference, numbered
/// after everything sent before the restart.
async fn check_kept_after_restart(s: &Single, got: &Received, b: &str) {
    let c = dial(&s.sim, "kept", &[]).await;
    assert_eq!(
        wait_hangup(&s.sim, &c).await,
        17,
        "the room of two is still full at two"
    );
    wait_for_async("the join after the restart", WAIT, || async {
        (got.lock().expect("lock").len() == 3).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", got.lock().expect("lock")));
    let got = got.lock().expect("lock").clone();
    assert_eq!(got[2]["StatusCallbackEvent"], "participant-join");
    assert_eq!(got[2]["CallSid"], b);
    assert_eq!(
        got[2]["ConferenceSid"], got[0]["ConferenceSid"],
        "the same conference to the application"
    );
    let seq = |i: usize| -> u64 {
        got[i]["SequenceNumber"]
            .parse()
            .unwrap_or_else(|e| panic!("SequenceNumber of {:?}: {e}", got[i]))
    };
    assert!(
        seq(0) < seq(1) && seq(1) < seq(2),
        "SequenceNumber keeps increasing across the restart: {got:#?}"
    );
}

/// A first caller of `conference` asking for `events` callbacks to `url` is counted (its
/// settings in Redis) while Asterisk is still adding it to the bridge; the agent is killed
/// then, and the add is carried out: returns the caller, in the bridge of an agent gone.
async fn first_caller_in_as_the_agent_dies(
    s: &mut Single,
    conference: &str,
    url: &str,
    events: &str,
) -> String {
    s.sim.hold_operation("addChannel");
    let a = dial(
        &s.sim,
        conference,
        &[
            ("CONFROUTE_STATUS_CALLBACK", url),
            ("CONFROUTE_STATUS_CALLBACK_EVENT", events),
        ],
    )
    .await;
    wait_for_async("the first caller being added", WAIT, || async {
        (s.sim.held_requests("addChannel") > 0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    // The callbacks are among them: a restarted agent that sends none did not lose them.
    let kept = settings_kept(s, conference).await;
    assert!(kept.contains(url), "{kept}");
    s.node.process().kill();
    s.sim.release_operation("addChannel");
    wait_bridged(&s.sim, &a).await;
    a
}

/// The first caller's settings (its status callbacks, its ConferenceSid) are in Redis as
/// soon as it is counted, before the ARI work of its entry: an agent killed while Asterisk
/// is still adding it to the bridge is restarted into the conference with them, not with
/// the configured defaults (which have no callbacks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_are_kept_from_the_first_callers_count() {
    let (url, got) = receiver(0).await;
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    first_caller_in_as_the_agent_dies(&mut s, "early", &url, "join").await;
    s.node.restart().expect("restart");
    wait_app(&s.sim, &s.node).await;
    let b = dial(&s.sim, "early", &[]).await;
    wait_bridged(&s.sim, &b).await;
    wait_for_async("the second caller's join callback", WAIT, || async {
        got.lock()
            .expect("lock")
            .iter()
            .any(|c| c.get("CallSid") == Some(&b))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
}

/// A first caller whose agent died before it was in (its join never sent) leaves a
/// conference the application never heard of: the restarted agent that finds its bridge
/// empty ends it without a `conference-end` under a ConferenceSid no callback named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conference_whose_first_caller_never_got_in_ends_untold_after_a_restart() {
    let (url, got) = receiver(0).await;
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let store = fixtures::store(&s.cfg);
    let a =
        first_caller_in_as_the_agent_dies(&mut s, "unheard", &url, "start end join leave").await;
    s.sim.hangup_far_end(&a, 16).await.expect("hang up");
    s.node.restart().expect("restart");
    wait_app(&s.sim, &s.node).await;
    let name = confroute_shared::name::ConferenceName::parse("unheard").expect("name");
    wait_for_async("the empty conference ended", WAIT, || async {
        store.lookup(&name).await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    // Its end would have been queued before the claim went: a moment for its delivery.
    let quiet = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    while tokio::time::Instant::now() < quiet {
        assert!(
            got.lock().expect("lock").is_empty(),
            "callbacks for a conference the application never heard of: {:?}",
            got.lock().expect("lock")
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_keeps_the_settings_the_first_caller_gave_the_conference() {
    let (url, got) = receiver(0).await;
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    kept_conference(&s, &url, &got).await;
    let store = fixtures::store(&s.cfg);
    // A conference started with the configured defaults and no callbacks records only that
    // it started.
    let started = Some(r#"{"started":"1"}"#.to_string());
    let plain = dial(&s.sim, "plain", &[]).await;
    wait_bridged(&s.sim, &plain).await;
    let plain_name = confroute_shared::name::ConferenceName::parse("plain").expect("name");
    wait_listed(&s.node.http_url(), &plain)
        .await
        .expect("the plain caller listed");
    // Written with the join's count, just after the listing.
    wait_for_async("the plain conference's settings", WAIT, || async {
        (store.conference_settings(&plain_name).await.ok()? == started).then_some(())
    })
    .await
    .expect("only that it started");

    s.node.process().kill();
    until(&s.sim, "agent's socket gone", |snap| snap.websockets == 1).await;
    s.node.restart().expect("restart");
    wait_app(&s.sim, &s.node).await;
    wait_kept_listed(&s, 1).await;
    // Every write of the first life is done by now (the listing above can come just before
    // its count is written), and adopting the conference records nothing more.
    assert_eq!(
        store.conference_settings(&plain_name).await.expect("read"),
        started
    );

    let b = dial(&s.sim, "kept", &[]).await;
    wait_bridged(&s.sim, &b).await;
    check_kept_after_restart(&s, &got, &b).await;
}

/// The last caller of a conference hangs up while its agent is away (restarting): the
/// restarted agent finds the conference's bridge empty and, the conference still claimed by
/// this node at that bridge's epoch, tells the application it ended, under its
/// `ConferenceSid` and numbered after what was sent before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conference_that_emptied_while_its_agent_was_away_is_told_ended() {
    let (url, got) = receiver(0).await;
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let a = dial_hooked(&s.sim, "away", &url, "start end join leave").await;
    callbacks(&got, 2).await;
    settings_kept(&s, "away").await;
    let store = fixtures::store(&s.cfg);
    let name = confroute_shared::name::ConferenceName::parse("away").expect("name");
    s.node.process().kill();
    until(&s.sim, "agent's socket gone", |snap| snap.websockets == 1).await;
    s.sim.hangup_far_end(&a, 16).await.expect("hangup");
    s.node.restart().expect("restart");
    wait_app(&s.sim, &s.node).await;
    until(&s.sim, "the empty bridge destroyed", |snap| {
        snap.bridges.is_empty()
    })
    .await;
    let got = callbacks(&got, 3).await;
    assert_eq!(event_pairs(&got)[2], ("conference-end", ""), "{got:#?}");
    assert_eq!(got[2]["ReasonConferenceEnded"], "last-participant-left");
    assert_eq!(got[2]["ConferenceSid"], got[0]["ConferenceSid"]);
    let seq = |i: usize| -> u64 { got[i]["SequenceNumber"].parse().expect("number") };
    assert!(
        seq(2) > seq(1),
        "numbered after the last lifetime's: {got:#?}"
    );
    wait_for_async("the claim released", WAIT, || async {
        store.lookup(&name).await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
}

/// A restarted agent that cannot read a conference's kept settings (every read fails all
/// through the adoption) goes on with the configured defaults, but writes nothing over the
/// settings Redis keeps (a later restart may read them) and sends no callback under a
/// `ConferenceSid` the application never heard of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_settings_a_restarted_agent_cannot_read_are_not_written_over() {
    let (url, got) = receiver(0).await;
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    kept_conference(&s, &url, &got).await;
    let fields = || {
        s.redis
            .query(
                redis::cmd("HMGET")
                    .arg("{confroute}:conf:kept")
                    .arg("settings")
                    .arg("participants"),
            )
            .and_then(|v| redis::from_redis_value::<(Option<Vec<u8>>, Option<u64>)>(v).ok())
    };
    assert!(fields().and_then(|f| f.0).is_some(), "settings kept");
    s.node.process().kill();
    until(&s.sim, "agent's socket gone", |snap| snap.websockets == 1).await;
    // Bytes that are not UTF-8: the agent's client fails every read of them, as it fails a
    // read cut short. Nothing else the agent reads holds the settings.
    let kept = b"{\"status_callback\":\"\xff\"}".to_vec();
    s.redis
        .query(
            redis::cmd("HSET")
                .arg("{confroute}:conf:kept")
                .arg("settings")
                .arg(&kept[..]),
        )
        .expect("HSET");
    s.node.restart().expect("restart");
    wait_app(&s.sim, &s.node).await;
    wait_kept_listed(&s, 1).await;
    let b = dial(&s.sim, "kept", &[]).await;
    wait_bridged(&s.sim, &b).await;
    wait_for_async("the newcomer counted in Redis", WAIT, || async {
        (fields()?.1 == Some(2)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", fields(), s.node.output()));
    assert_eq!(
        fields().and_then(|f| f.0),
        Some(kept),
        "the kept settings were written over"
    );
    assert!(
        s.node
            .output()
            .contains("the conference's kept settings could not be read"),
        "{}",
        s.node.output()
    );
    let got = got.lock().expect("lock").clone();
    assert_eq!(got.len(), 2, "callbacks after the restart: {got:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_before_the_first_reconciliation_gets_the_settings_the_conference_had() {
    let (url, got) = receiver(0).await;
    let mut s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let a = kept_conference(&s, &url, &got).await;
    let bridge = wait_bridged(&s.sim, &a).await;

    // The restarted agent's first reconciliation lists the bridges, then the channels:
    // holding the latter keeps it from adopting the conference before the newcomer comes.
    s.restart_with_channel_listing_held().await;
    let b = dial(&s.sim, "kept", &[]).await;
    assert_eq!(
        wait_bridged(&s.sim, &b).await,
        bridge,
        "the newcomer joins the caller left from before the restart"
    );
    check_kept_after_restart(&s, &got, &b).await;
    s.sim.release_operation("GET /channels");
    wait_kept_listed(&s, 2).await;
}

/// Hits per path of a receiver whose `/gone` answers 404, `/moved` redirects to `/events`,
/// and `/events` takes anything.
type Hits = Arc<Mutex<HashMap<String, usize>>>;

async fn refusing_receiver() -> (std::net::SocketAddr, Hits) {
    let hits: Hits = Arc::default();
    let count = |hits: Hits, path: &'static str, answer: StatusCode| {
        post(move || async move {
            *hits
                .lock()
                .expect("lock")
                .entry(path.to_string())
                .or_default() += 1;
            if answer == StatusCode::TEMPORARY_REDIRECT {
                return (answer, [("location", "/events")]).into_response();
            }
            answer.into_response()
        })
    };
    let app = axum::Router::new()
        .route(
            "/gone/p4th-s3cret",
            count(hits.clone(), "gone", StatusCode::NOT_FOUND),
        )
        .route(
            "/moved/p4th-s3cret",
            count(hits.clone(), "moved", StatusCode::TEMPORARY_REDIRECT),
        )
        .route(
            "/events",
            count(hits.clone(), "events", StatusCode::NO_CONTENT),
        );
    (fixtures::serve_http(app).await, hits)
}

/// A receiver that refuses a callback (404) gets it once: the same request would get the
/// same answer. A redirect is not followed (an outside receiver must not send the agent's
/// POSTs to an address inside), nor retried. Credentials in the URL (user, password, path,
/// query) never reach the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_callbacks_are_not_retried_nor_redirected_and_their_secrets_not_logged() {
    let (addr, hits) = refusing_receiver().await;
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_WEBHOOK__RETRY_INITIAL", "10ms"),
        ("CONFROUTE_WEBHOOK__MAX_ATTEMPTS", "2"),
    ])
    .await;
    for (conf, path) in [("refused", "gone"), ("redirected", "moved")] {
        // Webhook services put their secret in the path as often as in the query.
        let url = format!("http://hook-user:s3cr3t-pw@{addr}/{path}/p4th-s3cret?token=t0ken-value");
        let vars = [
            ("CONFROUTE_STATUS_CALLBACK", url.as_str()),
            ("CONFROUTE_STATUS_CALLBACK_EVENT", "start end"),
        ];
        let a = dial(&s.sim, conf, &vars).await;
        wait_bridged(&s.sim, &a).await;
        s.sim.hangup_far_end(&a, 16).await.expect("leaves");
    }
    // Two events each: start and end.
    wait_for_async("every callback given up", WAIT, || async {
        let m = fixtures::scrape(&s.node.http_url()).await;
        (fixtures::metric(
            &m,
            r#"confroute_webhook_deliveries_total{outcome="failed"}"#,
        ) == 4.0)
            .then_some(())
    })
    .await
    .expect("callbacks given up");
    let hits = hits.lock().expect("lock").clone();
    assert_eq!(
        hits.get("gone"),
        Some(&2),
        "one attempt per refused event: {hits:?}"
    );
    assert_eq!(
        hits.get("moved"),
        Some(&2),
        "a redirect is neither followed nor retried: {hits:?}"
    );
    assert_eq!(
        hits.get("events"),
        None,
        "the redirect was not followed: {hits:?}"
    );
    let log = s.node.output();
    assert!(log.contains("status callback given up"), "{log}");
    for secret in ["s3cr3t-pw", "t0ken-value", "hook-user", "p4th-s3cret"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

/// A callback URL naming a host goes through the agent's own resolver (which drops
/// link-local and unspecified answers) and is delivered to the address the name has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_url_naming_a_host_is_resolved_and_delivered() {
    let (url, got) = receiver(0).await;
    let url = url.replacen("127.0.0.1", "localhost", 1);
    assert!(url.starts_with("http://localhost:"), "{url}");
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let vars = [
        ("CONFROUTE_STATUS_CALLBACK", url.as_str()),
        ("CONFROUTE_STATUS_CALLBACK_EVENT", "start"),
    ];
    let a = dial(&s.sim, "named-hook", &vars).await;
    wait_bridged(&s.sim, &a).await;
    let got = callbacks(&got, 1).await;
    assert_eq!(event_pairs(&got), vec![("conference-start", "")]);
}

/// Stops the agent with SIGTERM and waits for its clean exit.
async fn stop(s: &mut Single) {
    s.node.process().signal(libc::SIGTERM).expect("sigterm");
    let code = s.node.process().wait_exit(WAIT).expect("exits");
    assert_eq!(code, Some(0), "{}", s.node.output());
}

/// The `StatusCallbackEvent` of each callback received, in order.
fn callback_events(got: &Received) -> Vec<String> {
    got.lock()
        .expect("lock")
        .iter()
        .map(|f| f["StatusCallbackEvent"].clone())
        .collect()
}

/// The leave and end callbacks of the conferences a shutdown ends are queued as they end:
/// the agent gives them time to go out before it exits, even to a slow receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_of_the_last_conferences_go_out_before_exit() {
    // A slow receiver: each answer takes a while.
    let (url, got) = receiver_with(0, std::time::Duration::from_millis(700)).await;
    let mut s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_NODE__DRAIN_DEADLINE", "1s"),
    ])
    .await;
    let vars = [
        ("CONFROUTE_STATUS_CALLBACK", url.as_str()),
        ("CONFROUTE_STATUS_CALLBACK_EVENT", "start end join leave"),
    ];
    let a = dial(&s.sim, "last", &vars).await;
    wait_bridged(&s.sim, &a).await;
    stop(&mut s).await;
    // Deregistered last: no heartbeat brought the record back while the callbacks went out.
    let store = fixtures::store(&s.cfg);
    assert!(
        store
            .get_node(&fixtures::id("node-a"))
            .await
            .expect("read")
            .is_none(),
        "the exited node is not registered: {}",
        s.node.output()
    );
    let events = callback_events(&got);
    assert_eq!(
        events,
        [
            "participant-join",
            "conference-start",
            "participant-leave",
            "conference-end"
        ],
        "every callback was sent before the agent exited"
    );
}

/// A conference's callbacks go out one at a time: a shutdown that ends a conference of
/// several callers queues a leave for each before the end, and the agent waits
/// `webhook.shutdown_wait` for them all, not a bound tied to one POST's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_conferences_end_callback_goes_out_behind_its_leaves_at_exit() {
    // One POST's deadline: twice it is less than the queue at exit takes.
    let (s, events) =
        leaves_and_end_at_exit("crowd", 5, &[("CONFROUTE_WEBHOOK__TIMEOUT", "500ms")]).await;
    let mut expected = vec!["participant-leave".to_string(); 5];
    expected.push("conference-end".to_string());
    assert_eq!(events, expected, "{}", s.node.output());
}

/// `n` callers in `conference`, asking for leave and end callbacks from a receiver taking
/// 300 ms per answer, on an agent with `settings` that is then stopped (its drain deadline
/// 1 s); the agent and the callbacks received by its exit.
async fn leaves_and_end_at_exit(
    conference: &str,
    n: usize,
    settings: &[(&str, &str)],
) -> (Single, Vec<String>) {
    let (url, got) = receiver_with(0, std::time::Duration::from_millis(300)).await;
    let mut all = vec![
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_NODE__DRAIN_DEADLINE", "1s"),
    ];
    all.extend_from_slice(settings);
    let mut s = Single::start(&all).await;
    let vars = [
        ("CONFROUTE_STATUS_CALLBACK", url.as_str()),
        ("CONFROUTE_STATUS_CALLBACK_EVENT", "leave end"),
    ];
    for _ in 0..n {
        let c = dial(&s.sim, conference, &vars).await;
        wait_bridged(&s.sim, &c).await;
    }
    stop(&mut s).await;
    let events = callback_events(&got);
    (s, events)
}

/// A stop keeps time for each conference's `conference-end` (one POST's deadline, at most
/// half of `webhook.shutdown_wait`): leaves get only what is left beyond it and are dropped,
/// counted, once it is reached; the end goes out. Sent in turn, 12 leaves of 300 ms would
/// hold it past the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_keeps_time_for_the_end_behind_a_slow_receiver() {
    const CALLERS: usize = 12;
    let (s, events) = leaves_and_end_at_exit(
        "slow-crowd",
        CALLERS,
        &[
            ("CONFROUTE_WEBHOOK__TIMEOUT", "1s"),
            ("CONFROUTE_WEBHOOK__SHUTDOWN_WAIT", "3s"),
        ],
    )
    .await;
    end_kept_and_leaves_dropped(
        &s,
        &events,
        CALLERS,
        "status callbacks dropped at the stop to leave time for the conference's end",
    );
}

/// `events` (callbacks received by the exit of `s`'s agent, `callers` of them leaves) end
/// with `conference-end` though some leaves were dropped, as the log line `dropped` says.
fn end_kept_and_leaves_dropped(s: &Single, events: &[String], callers: usize, dropped: &str) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("conference-end"),
        "{events:?}\n{}",
        s.node.output()
    );
    let leaves = events.iter().filter(|e| *e == "participant-leave").count();
    assert!(leaves < callers, "some leaves were dropped: {events:?}");
    assert!(s.node.output().contains(dropped), "{}", s.node.output());
}

/// A conference ending with more leaves than its callback queue holds (behind a slow
/// receiver) drops leaves, counted, but never its `conference-end`, which comes last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_callback_queue_drops_leaves_but_never_the_end() {
    const CALLERS: usize = 6;
    let (s, events) = leaves_and_end_at_exit(
        "overflow",
        CALLERS,
        &[("CONFROUTE_WEBHOOK__QUEUE_SIZE", "2")],
    )
    .await;
    end_kept_and_leaves_dropped(
        &s,
        &events,
        CALLERS,
        "status callback queue full; event dropped",
    );
}

/// A receiver answering 429 with `Retry-After: 2` is asked again after those 2 s, not after
/// the agent's own backoff (50 ms here); the event then goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receivers_retry_after_is_waited_for() {
    type Arrivals = Arc<Mutex<Vec<std::time::Instant>>>;
    let arrivals: Arrivals = Arc::default();
    let app = axum::Router::new()
        .route(
            "/events",
            post(|State(arrivals): State<Arrivals>| async move {
                let mut a = arrivals.lock().expect("lock");
                a.push(std::time::Instant::now());
                if a.len() == 1 {
                    (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "2")]).into_response()
                } else {
                    StatusCode::NO_CONTENT.into_response()
                }
            }),
        )
        .with_state(arrivals.clone());
    let url = format!("http://{}/events", fixtures::serve_http(app).await);
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_WEBHOOK__RETRY_INITIAL", "50ms"),
        ("CONFROUTE_WEBHOOK__RETRY_MAX", "10s"),
    ])
    .await;
    let vars = [
        ("CONFROUTE_STATUS_CALLBACK", url.as_str()),
        ("CONFROUTE_STATUS_CALLBACK_EVENT", "start"),
    ];
    let c = dial(&s.sim, "rate-limited", &vars).await;
    wait_bridged(&s.sim, &c).await;
    wait_for_async("the callback delivered on its second try", WAIT, || async {
        (arrivals.lock().expect("lock").len() == 2).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let a = arrivals.lock().expect("lock").clone();
    let waited = a[1] - a[0];
    assert!(
        waited >= std::time::Duration::from_millis(1900),
        "asked again after {waited:?}, not the 2 s asked for"
    );
}

/// Signed callbacks: the signature, the URL as the receiver rebuilds it, and the form.
type Signed = Arc<Mutex<Vec<(String, String, Vec<(String, String)>)>>>;

/// With `webhook.auth_token`, every callback carries `X-Twilio-Signature` as Twilio computes
/// it (checked here with Python's HMAC, not the agent's code) over the URL the receiver
/// rebuilds from the request (`Host` and the request target: no credentials, no fragment),
/// so an application validating Twilio's signature accepts it; `webhook.account_sid` adds
/// `AccountSid`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_are_signed_as_twilio_signs_them_when_an_auth_token_is_set() {
    let got: Signed = Arc::default();
    let app = axum::Router::new()
        .route(
            "/events",
            post(
                |State(got): State<Signed>,
                 uri: axum::http::Uri,
                 headers: axum::http::HeaderMap,
                 Form(form): Form<Vec<(String, String)>>| async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string()
                    };
                    let seen = format!("http://{}{uri}", header("host"));
                    got.lock()
                        .expect("lock")
                        .push((header("x-twilio-signature"), seen, form));
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(got.clone());
    let addr = fixtures::serve_http(app).await;
    // Credentials and a fragment the request does not carry as part of its URL.
    let url = format!("http://hooks:pw@{addr}/events?tenant=7#part");
    let token = "tw-auth-token-0123456789";
    let account = "AC0123456789abcdef0123456789abcdef";
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_WEBHOOK__AUTH_TOKEN", token),
        ("CONFROUTE_WEBHOOK__ACCOUNT_SID", account),
    ])
    .await;
    dial_hooked(&s.sim, "signed", &url, "start join").await;
    wait_for_async("two callbacks", WAIT, || async {
        (got.lock().expect("lock").len() == 2).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let got = got.lock().expect("lock").clone();
    for (sig, seen, form) in &got {
        assert_eq!(seen, &format!("http://{addr}/events?tenant=7"));
        assert!(
            form.iter().any(|(k, v)| k == "AccountSid" && v == account),
            "{form:?}"
        );
        let mut args = vec![token.to_string(), seen.clone()];
        for (k, v) in form {
            args.push(k.clone());
            args.push(v.clone());
        }
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import sys,hmac,hashlib,base64\n\
                 t,u,*kv=sys.argv[1:]\n\
                 d=u+''.join(k+v for k,v in sorted(zip(kv[0::2],kv[1::2])))\n\
                 print(base64.b64encode(hmac.new(t.encode(),d.encode(),hashlib.sha1).digest()).decode())",
            )
            .args(&args)
            .output()
            .expect("python3");
        let want = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!want.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(sig, &want, "{form:?}");
    }
}

/// Without `channelvars`, a caller's options are read from its channel. When Asterisk does
/// not answer those reads, the caller is refused with a temporary failure (Q.850 34, SIP
/// 503: the edge may try again), never admitted with defaults in place of its options (a
/// listener who joins muted would be heard). The same for the conference's name when it
/// is not an app argument.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_whose_options_cannot_be_read_is_refused_for_now() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let sim = sim_with(&[]).await;
    let node = NodeProc::start(
        "node-a",
        &env(&sim, &cfg, &[("CONFROUTE_ARI__REQUEST_TIMEOUT", "300ms")]),
    )
    .expect("node");
    wait_app(&sim, &node).await;
    sim.lose_operation("getChannelVar");
    let listener = dial(&sim, "unread", &[("CONFROUTE_MUTED", "true")]).await;
    assert_eq!(wait_hangup(&sim, &listener).await, 34);
    let unnamed = dial(&sim, "", &[("CONFROUTE_CONFERENCE", "unread")]).await;
    assert_eq!(wait_hangup(&sim, &unnamed).await, 34);
    assert!(
        sim.snapshot().bridges.is_empty(),
        "nobody admitted: {:#?}",
        sim.snapshot()
    );
    let m = fixtures::scrape(&node.http_url()).await;
    assert_eq!(
        fixtures::metric(&m, r#"confroute_node_joins_total{outcome="ari_error"}"#),
        2.0
    );
    assert!(node.output().contains("cannot read the caller's options"));

    // Asterisk answers again: the next caller gets in with its options.
    sim.deliver_operation("getChannelVar");
    let later = dial(&sim, "unread", &[("CONFROUTE_MUTED", "true")]).await;
    wait_bridged(&sim, &later).await;
    assert!(sim.snapshot().channel(&later).is_some_and(|c| c.muted_in));
}

/// A recording format Asterisk refuses (a codec name, not a file extension) is tried once per
/// conference: asking again at every join would fail the same way each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_format_asterisk_refuses_is_tried_once_per_conference() {
    let mut s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_CONFERENCE__RECORDING_FORMAT", "slin"),
    ])
    .await;
    let a = dial(
        &s.sim,
        "rec-bad",
        &[("CONFROUTE_RECORD", "record-from-start")],
    )
    .await;
    let bridge = wait_bridged(&s.sim, &a).await;
    // Joins are handled one at a time: once the last is in, the others' tries are done.
    for _ in 0..2 {
        let b = dial(&s.sim, "rec-bad", &[]).await;
        assert_eq!(wait_bridged(&s.sim, &b).await, bridge);
    }
    s.node
        .wait_log("not trying again in this conference", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let record = format!("/ari/bridges/{bridge}/record");
    let tries = s
        .sim
        .request_log()
        .iter()
        .filter(|r| r.path == record)
        .count();
    assert_eq!(tries, 1, "{}", s.node.output());
    assert!(s.sim.snapshot().recordings.is_empty());
}

/// A recording whose start got no answer in time (Asterisk slow, the recording under way all
/// the same) is taken for under way: the next join does not start a second one, which would
/// make a second file of the same conference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_start_left_unanswered_is_not_started_twice() {
    let mut s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("CONFROUTE_ARI__REQUEST_TIMEOUT", "1s"),
    ])
    .await;
    // Asterisk starts the recording, then is slow to say so.
    s.sim.hold_operation("answer record");
    let a = dial(
        &s.sim,
        "rec-slow",
        &[("CONFROUTE_RECORD", "record-from-start")],
    )
    .await;
    let bridge = wait_bridged(&s.sim, &a).await;
    s.node
        .wait_log("recordBridge: Timeout", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    s.sim.release_operation("answer record");
    let b = dial(&s.sim, "rec-slow", &[]).await;
    assert_eq!(wait_bridged(&s.sim, &b).await, bridge);
    // Logged once its join is done, recording start included.
    s.node
        .wait_log("participants=2", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let target = format!("bridge:{bridge}");
    let started: std::collections::BTreeSet<String> = s
        .sim
        .event_log()
        .iter()
        .filter(|e| {
            e["type"] == "RecordingStarted" && e["recording"]["target_uri"] == target.as_str()
        })
        .filter_map(|e| e["recording"]["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(started.len(), 1, "{started:?}\n{}", s.node.output());
    assert_eq!(s.sim.snapshot().recordings.len(), 1);
}
