//! Scenario tests of the ARI simulator: the exact event sequences of each call outcome, as a
//! Stasis application subscribed only to its own channels receives them from Asterisk.
//!
//! Sequences follow Asterisk's sources: `res/res_stasis.c` (`stasis_app_exec`: StasisStart, the
//! bridge leaving before StasisEnd), `main/dial.c` (Dial events with dialstatus "" then
//! ANSWER/BUSY/CONGESTION; an originate's ringing shows only as the channel's state change,
//! since `handle_frame_ownerless` publishes no Dial event for it), `res/ari/resource_channels.c` (originate subscribes the app
//! to the channel before dialling, so it also sees ChannelDestroyed) and `res/stasis/app.c`
//! (an app only hears about channels and bridges it is subscribed to).

use std::time::{Duration, Instant};

use confroute_tests::ari_sim::client::{AriClient, AriResponse, ClientError, EventStream};
use confroute_tests::ari_sim::{AriSim, DialIn, EndpointMatch, Outcome, SimConfig};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

async fn sim() -> AriSim {
    AriSim::start(SimConfig {
        username: "u".into(),
        password: "p".into(),
        channelvars: vec![
            "CONFROUTE_CONFERENCE".into(),
            "PJSIP_HEADER(read,X-Conference)".into(),
        ],
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts")
}

async fn events(sim: &AriSim, app: &str) -> EventStream {
    EventStream::connect(&sim.events_url(app))
        .await
        .expect("events WebSocket connects")
}

fn ty(e: &Value) -> &str {
    e.get("type").and_then(Value::as_str).unwrap_or("")
}

fn str_at<'a>(e: &'a Value, ptr: &str) -> &'a str {
    e.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

/// Each event as `Type` plus the detail that distinguishes it in a call flow.
fn summary(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .map(|e| match ty(e) {
            "Dial" => format!("Dial({})", str_at(e, "/dialstatus")),
            "ChannelStateChange" => format!("ChannelStateChange({})", str_at(e, "/channel/state")),
            "ChannelDialplan" => format!("ChannelDialplan({})", str_at(e, "/dialplan_app")),
            "ChannelDestroyed" | "ChannelHangupRequest" => {
                format!(
                    "{}({})",
                    ty(e),
                    e.get("cause").and_then(Value::as_i64).unwrap_or(-1)
                )
            }
            "ChannelVarset" => format!("ChannelVarset({})", str_at(e, "/variable")),
            "ChannelDtmfReceived" => format!("ChannelDtmfReceived({})", str_at(e, "/digit")),
            other => other.to_string(),
        })
        .collect()
}

fn is(t: &'static str) -> impl Fn(&Value) -> bool {
    move |e| ty(e) == t
}

async fn expect_seq<F: Fn(&Value) -> bool>(
    ws: &mut EventStream,
    last: F,
    want: &[&str],
) -> Vec<Value> {
    let evs = match ws.until(WAIT, last).await {
        Ok(evs) => evs,
        Err(seen) => panic!(
            "sequence did not complete; got {:?}, want {want:?}",
            summary(&seen)
        ),
    };
    assert_eq!(summary(&evs), want, "event sequence");
    evs
}

async fn ok(c: &AriClient, method: &str, path: &str) -> Value {
    let r = c
        .call(method, path, None)
        .await
        .expect("ARI request is answered");
    assert!(
        r.status < 300,
        "{method} {path} answered {}: {}",
        r.status,
        r.text
    );
    r.json.unwrap_or(Value::Null)
}

fn dial_in(app: &str, conf: &str) -> DialIn {
    DialIn {
        app: app.into(),
        args: vec![conf.into()],
        caller_number: "+15550001".into(),
        caller_name: "Alice".into(),
        extension: conf.into(),
        variables: [("CONFROUTE_CONFERENCE".into(), conf.into())].into(),
        sip_headers: [("X-Conference".into(), conf.into())].into(),
        ..DialIn::default()
    }
}

/// A simulator whose playbacks last a minute (tests end them when they need to), a client,
/// and the events of the `confroute` application.
async fn slow_playbacks() -> (AriSim, AriClient, EventStream) {
    let sim = AriSim::start(SimConfig {
        username: "u".into(),
        password: "p".into(),
        playback_duration: Duration::from_secs(60),
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");
    let c = AriClient::new(&sim).expect("client");
    let ws = events(&sim, "confroute").await;
    (sim, c, ws)
}

/// A request sent on a client of its own, for a test to collect with [`answer_of`] once it
/// is answered (it may wait in a channel's command queue meanwhile).
fn send_later(
    sim: &AriSim,
    method: &'static str,
    path: String,
) -> tokio::task::JoinHandle<Result<AriResponse, ClientError>> {
    let client = AriClient::new(sim).expect("client");
    tokio::spawn(async move { client.call(method, &path, None).await })
}

/// The answer to a request sent with [`send_later`], within `WAIT`.
async fn answer_of(task: tokio::task::JoinHandle<Result<AriResponse, ClientError>>) -> AriResponse {
    tokio::time::timeout(WAIT, task)
        .await
        .expect("answered in time")
        .expect("task")
        .expect("answered")
}

/// Where in `log` the first event of type `t` that `pred` accepts is.
fn position(log: &[Value], t: &str, pred: impl Fn(&Value) -> bool) -> Option<usize> {
    log.iter().position(|e| ty(e) == t && pred(e))
}

/// A caller dialling in for `conf`, once it is in the `confroute` application.
async fn caller(sim: &AriSim, ws: &mut EventStream, conf: &str) -> String {
    let id = sim
        .dial_in(dial_in("confroute", conf))
        .await
        .expect("dial in");
    ws.until(WAIT, is("StasisStart")).await.expect("in Stasis");
    id
}

#[tokio::test]
async fn caller_dials_in_joins_and_hangs_up() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    ok(&c, "POST", "/bridges/sales-42?type=mixing").await;

    let ch = sim
        .dial_in(dial_in("confroute", "sales-42"))
        .await
        .expect("dial-in");
    let start = expect_seq(&mut ws, is("StasisStart"), &["StasisStart"]).await;
    let e = &start[0];
    assert_eq!(e["args"], serde_json::json!(["sales-42"]));
    assert_eq!(str_at(e, "/channel/id"), ch);
    assert_eq!(str_at(e, "/channel/state"), "Ring");
    assert_eq!(str_at(e, "/channel/caller/number"), "+15550001");
    assert_eq!(str_at(e, "/channel/dialplan/exten"), "sales-42");
    assert_eq!(str_at(e, "/channel/dialplan/app_name"), "Stasis");
    assert_eq!(
        str_at(e, "/channel/dialplan/app_data"),
        "confroute,sales-42"
    );
    assert_eq!(
        str_at(e, "/channel/channelvars/CONFROUTE_CONFERENCE"),
        "sales-42"
    );
    assert_eq!(
        str_at(e, "/channel/channelvars/PJSIP_HEADER(read,X-Conference)"),
        "sales-42"
    );
    assert!(str_at(e, "/channel/name").starts_with("PJSIP/trunk-"));
    assert_eq!(str_at(e, "/application"), "confroute");
    assert_eq!(str_at(e, "/asterisk_id"), sim.asterisk_id());

    let v = ok(
        &c,
        "GET",
        &format!("/channels/{ch}/variable?variable=PJSIP_HEADER(read,X-Conference)"),
    )
    .await;
    assert_eq!(v["value"], "sales-42");

    ok(&c, "POST", &format!("/channels/{ch}/answer")).await;
    ok(
        &c,
        "POST",
        &format!("/bridges/sales-42/addChannel?channel={ch}"),
    )
    .await;
    let evs = expect_seq(
        &mut ws,
        is("ChannelEnteredBridge"),
        &["ChannelStateChange(Up)", "ChannelEnteredBridge"],
    )
    .await;
    assert_eq!(evs[1]["bridge"]["channels"], serde_json::json!([ch]));

    sim.hangup_far_end(&ch, 16).await.expect("far end hangs up");
    expect_seq(
        &mut ws,
        is("StasisEnd"),
        &["ChannelHangupRequest(16)", "ChannelLeftBridge", "StasisEnd"],
    )
    .await;
    // After StasisEnd the app no longer follows a dialplan-entered channel: no ChannelDestroyed.
    assert!(
        ws.next(Duration::from_millis(300)).await.is_none(),
        "nothing after StasisEnd"
    );
    let snap = sim.snapshot();
    assert!(snap.channels.is_empty());
    assert!(snap
        .bridge("sales-42")
        .expect("bridge stays")
        .channels
        .is_empty());
}

#[tokio::test]
async fn originate_answered_enters_stasis() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    sim.set_originate_behavior(
        EndpointMatch::exact("PJSIP/alice"),
        Outcome::AnswerAfter(Duration::from_millis(300)),
    );
    let t0 = Instant::now();
    let chan = ok(
        &c,
        "POST",
        "/channels?endpoint=PJSIP/alice&app=confroute&appArgs=sales-42&callerId=Bob%20%3C100%3E",
    )
    .await;
    assert_eq!(chan["state"], "Down");
    assert_eq!(chan["dialplan"]["app_name"], "AppDial2");
    assert_eq!(chan["caller"]["number"], "100");
    let evs = expect_seq(
        &mut ws,
        is("StasisStart"),
        &[
            "Dial()",
            "ChannelStateChange(Ringing)",
            "ChannelStateChange(Up)",
            "Dial(ANSWER)",
            "ChannelDialplan(Stasis)",
            "StasisStart",
        ],
    )
    .await;
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "rang for the configured time"
    );
    assert_eq!(evs[0]["dialstring"], "alice");
    assert_eq!(evs[5]["args"], serde_json::json!(["sales-42"]));
    assert_eq!(evs[5]["channel"]["id"], chan["id"]);

    // The default far end (no behaviour set) rings briefly and answers.
    let chan2 = ok(&c, "POST", "/channels?endpoint=PJSIP/carol&app=confroute").await;
    let evs = ws
        .until(WAIT, is("StasisStart"))
        .await
        .expect("default originate enters Stasis");
    assert_eq!(evs.last().expect("event")["channel"]["id"], chan2["id"]);
    assert_eq!(evs.last().expect("event")["args"], serde_json::json!([]));

    // The far end hangs up: the originate subscription also brings ChannelDestroyed.
    let id = chan["id"].as_str().expect("id").to_string();
    ok(&c, "POST", "/bridges/b1").await;
    ok(&c, "POST", &format!("/bridges/b1/addChannel?channel={id}")).await;
    ws.until(WAIT, is("ChannelEnteredBridge"))
        .await
        .expect("entered");
    sim.hangup_far_end(&id, 16).await.expect("hangup");
    let evs = expect_seq(
        &mut ws,
        is("ChannelDestroyed"),
        &[
            "ChannelHangupRequest(16)",
            "ChannelLeftBridge",
            "StasisEnd",
            "ChannelVarset(STASISSTATUS)",
            "ChannelDestroyed(16)",
        ],
    )
    .await;
    assert_eq!(evs[4]["cause_txt"], "Normal Clearing");
}

async fn failed_originate(outcome: Outcome, query: &str, want: &[&str]) -> (Vec<Value>, Duration) {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    sim.set_originate_behavior(EndpointMatch::prefix("PJSIP/5551"), outcome);
    let t0 = Instant::now();
    ok(
        &c,
        "POST",
        &format!("/channels?endpoint=PJSIP/5551234&app=confroute{query}"),
    )
    .await;
    let evs = expect_seq(&mut ws, is("ChannelDestroyed"), want).await;
    let elapsed = t0.elapsed();
    assert!(sim.snapshot().channels.is_empty(), "the channel is gone");
    (evs, elapsed)
}

#[tokio::test]
async fn originate_busy() {
    let (evs, _) = failed_originate(
        Outcome::Busy,
        "",
        // chan_pjsip queues the hangup with the response's cause; monitor_dial (main/dial.c)
        // then publishes the Dial status that cause maps to before hanging up.
        &[
            "Dial()",
            "ChannelHangupRequest(17)",
            "Dial(BUSY)",
            "ChannelDestroyed(17)",
        ],
    )
    .await;
    assert_eq!(evs[3]["cause_txt"], "User busy");
}

#[tokio::test]
async fn originate_congested() {
    let (evs, _) = failed_originate(
        Outcome::Congested,
        "",
        &[
            "Dial()",
            "ChannelHangupRequest(34)",
            "Dial(CONGESTION)",
            "ChannelDestroyed(34)",
        ],
    )
    .await;
    assert_eq!(evs[3]["cause_txt"], "Circuit/channel congestion");
}

#[tokio::test]
async fn originate_rejected() {
    let (evs, _) = failed_originate(
        Outcome::Rejected,
        "",
        // ast_hangup_cause_to_dial_status maps every other cause to NOANSWER.
        &[
            "Dial()",
            "ChannelHangupRequest(21)",
            "Dial(NOANSWER)",
            "ChannelDestroyed(21)",
        ],
    )
    .await;
    assert_eq!(evs[3]["cause_txt"], "Call Rejected");
}

#[tokio::test]
async fn originate_not_answered_until_timeout() {
    let (evs, elapsed) = failed_originate(
        Outcome::NoAnswer,
        "&timeout=1",
        // No Dial status and no cause at the timeout: Asterisk's handle_timeout_trip
        // (main/dial.c) hangs the channel up and keeps its no-answer cause to itself.
        &[
            "Dial()",
            "ChannelStateChange(Ringing)",
            "ChannelDestroyed(0)",
        ],
    )
    .await;
    assert_eq!(evs[2]["cause_txt"], "Unknown");
    assert!(
        elapsed >= Duration::from_secs(1),
        "rang until the 1 s timeout, took {elapsed:?}"
    );
}

/// An application hanging up a channel it originated while it still rings: the dialler
/// reads no frame and publishes the Dial status of the hangup's cause (main/dial.c
/// monitor_dial) before the channel goes.
#[tokio::test]
async fn deleting_a_ringing_originate_gives_its_dial_status() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    sim.set_originate_behavior(EndpointMatch::Any, Outcome::Manual);
    let chan = ok(&c, "POST", "/channels?endpoint=PJSIP/ringing&app=confroute").await;
    let id = chan["id"].as_str().expect("id").to_string();
    expect_seq(
        &mut ws,
        |e| ty(e) == "ChannelStateChange" && e["channel"]["state"] == "Ringing",
        &["Dial()", "ChannelStateChange(Ringing)"],
    )
    .await;
    ok(&c, "DELETE", &format!("/channels/{id}")).await;
    let evs = expect_seq(
        &mut ws,
        is("ChannelDestroyed"),
        &[
            "ChannelHangupRequest(32)",
            "Dial(NOANSWER)",
            "ChannelDestroyed(16)",
        ],
    )
    .await;
    assert_eq!(evs[0]["soft"], true);
}

#[tokio::test]
async fn manual_far_end_answers_when_told() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    sim.set_originate_behavior(EndpointMatch::Any, Outcome::Manual);
    let chan = ok(&c, "POST", "/channels?endpoint=PJSIP/dave&app=confroute").await;
    let id = chan["id"].as_str().expect("id").to_string();
    expect_seq(
        &mut ws,
        |e| ty(e) == "ChannelStateChange" && str_at(e, "/channel/state") == "Ringing",
        &["Dial()", "ChannelStateChange(Ringing)"],
    )
    .await;
    assert!(
        ws.next(Duration::from_millis(300)).await.is_none(),
        "keeps ringing"
    );
    sim.answer_far_end(&id).await.expect("answers");
    expect_seq(
        &mut ws,
        is("StasisStart"),
        &[
            "ChannelStateChange(Up)",
            "Dial(ANSWER)",
            "ChannelDialplan(Stasis)",
            "StasisStart",
        ],
    )
    .await;
    assert!(
        sim.answer_far_end(&id).await.is_err(),
        "an answered call cannot answer again"
    );
}

#[tokio::test]
async fn create_then_dial() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    let chan = ok(
        &c,
        "POST",
        "/channels/create?endpoint=PJSIP/erin&app=confroute&channelId=erin-1",
    )
    .await;
    assert_eq!(chan["state"], "Down");
    let evs = expect_seq(
        &mut ws,
        is("StasisStart"),
        &["ChannelDialplan(Stasis)", "StasisStart"],
    )
    .await;
    assert_eq!(evs[1]["channel"]["state"], "Down");
    let r = c
        .call("POST", "/channels/erin-1/answer", None)
        .await
        .expect("answered");
    assert_eq!(
        r.status, 412,
        "a Down channel cannot be answered: {}",
        r.text
    );
    ok(&c, "POST", "/channels/erin-1/dial?timeout=5").await;
    expect_seq(
        &mut ws,
        |e| ty(e) == "Dial" && str_at(e, "/dialstatus") == "ANSWER",
        &[
            "Dial()",
            "ChannelStateChange(Ringing)",
            "Dial(RINGING)",
            "ChannelStateChange(Up)",
            "Dial(ANSWER)",
        ],
    )
    .await;
    let r = c
        .call("POST", "/channels/erin-1/dial", None)
        .await
        .expect("answered");
    assert_eq!(r.status, 409);
    ok(&c, "DELETE", "/channels/erin-1").await;
    let evs = expect_seq(
        &mut ws,
        is("ChannelDestroyed"),
        &[
            "ChannelHangupRequest(32)",
            "StasisEnd",
            "ChannelVarset(STASISSTATUS)",
            "ChannelDestroyed(16)",
        ],
    )
    .await;
    // ast_softhangup reports its reason flag (AST_SOFTHANGUP_EXPLICIT), not the Q.850 cause.
    assert_eq!(evs[0]["soft"], true, "an ARI hangup is a soft hangup");
}

/// `res_stasis_playback.c`: each media item of a playback starts with `PlaybackStarted`,
/// items are linked by `PlaybackContinuing` (the item done, the next one); a target plays
/// its playbacks one after another; one stopped while it waits stays listed and ends with
/// `PlaybackFinished` when its turn comes, without playing.
#[tokio::test]
async fn playbacks_queue_per_target_and_report_each_media_item() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    let a = caller(&sim, &mut ws, "pb").await;
    ok(&c, "POST", &format!("/channels/{a}/answer")).await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/play/first?media=sound:a,sound:b"),
    )
    .await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/play/second?media=sound:c"),
    )
    .await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/play/third?media=sound:d"),
    )
    .await;
    let waiting = ok(&c, "GET", "/playbacks/third").await;
    assert_eq!(waiting["state"], "queued");
    ok(&c, "DELETE", "/playbacks/third").await;
    assert_eq!(
        ok(&c, "GET", "/playbacks/third").await["state"],
        "queued",
        "a stopped playback waiting for its turn is still there"
    );
    let evs = match ws
        .until(WAIT, |e| {
            ty(e) == "PlaybackFinished" && str_at(e, "/playback/id") == "third"
        })
        .await
    {
        Ok(evs) => evs,
        Err(seen) => panic!("playbacks did not finish: {:?}", summary(&seen)),
    };
    let seq: Vec<String> = evs
        .iter()
        .filter(|e| ty(e).starts_with("Playback"))
        .map(|e| {
            format!(
                "{}({} {} {})",
                ty(e),
                str_at(e, "/playback/id"),
                str_at(e, "/playback/media_uri"),
                str_at(e, "/playback/next_media_uri")
            )
        })
        .collect();
    assert_eq!(
        seq,
        [
            "PlaybackStarted(first sound:a sound:b)",
            "PlaybackContinuing(first sound:a sound:b)",
            "PlaybackStarted(first sound:b )",
            "PlaybackFinished(first sound:b )",
            "PlaybackStarted(second sound:c )",
            "PlaybackFinished(second sound:c )",
            "PlaybackFinished(third sound:d )",
        ]
    );
    let r = c
        .call("GET", "/playbacks/third", None)
        .await
        .expect("answered");
    assert_eq!(r.status, 404, "{}", r.text);
    // A media list with an empty item is refused as a whole.
    let r = c
        .call("POST", &format!("/channels/{a}/play?media=sound:a,"), None)
        .await
        .expect("answered");
    assert_eq!(r.status, 500, "{}", r.text);
}

/// A channel runs its Stasis commands one at a time, and a playback on it holds that thread
/// until it ends (res/res_stasis_playback.c `play_uri`). An `addChannel` moving the channel to
/// another bridge waits behind the playback: Asterisk answers it, and the channel enters the
/// bridge, only after `PlaybackFinished`. A bridge's own playback holds no channel.
#[tokio::test]
async fn a_move_waits_behind_the_channels_playback() {
    let sim = AriSim::start(SimConfig {
        username: "u".into(),
        password: "p".into(),
        playback_duration: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    let a = caller(&sim, &mut ws, "pb").await;
    ok(&c, "POST", &format!("/channels/{a}/answer")).await;
    for b in ["one", "two"] {
        ok(&c, "POST", &format!("/bridges/{b}?type=mixing")).await;
    }
    ok(&c, "POST", &format!("/bridges/one/addChannel?channel={a}")).await;
    ok(
        &c,
        "POST",
        "/bridges/one/play/tune?media=sound:w,sound:x,sound:y,sound:z",
    )
    .await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/play/long?media=sound:a,sound:b"),
    )
    .await;
    let r = c
        .call(
            "POST",
            &format!("/bridges/two/addChannel?channel={a}"),
            None,
        )
        .await
        .expect("answered");
    assert_eq!(r.status, 204, "{}", r.text);
    let log = sim.event_log();
    let at = |t: &str, pred: &dyn Fn(&Value) -> bool| position(&log, t, pred);
    let finished = at("PlaybackFinished", &|e| str_at(e, "/playback/id") == "long");
    let entered = at("ChannelEnteredBridge", &|e| {
        str_at(e, "/bridge/id") == "two"
    });
    assert!(
        finished.is_some() && entered.is_some() && finished < entered,
        "answered once the playback was over, then moved: {:?}",
        summary(&log)
    );
    assert!(
        at("PlaybackFinished", &|e| str_at(e, "/playback/id") == "tune").is_none(),
        "the bridge's playback held nothing: {:?}",
        summary(&log)
    );
}

/// An add that waits in the channel's queue while its bridge is destroyed: at its turn the
/// channel departs its own bridge all the same (`control_swap_channel_in_bridge`), and the
/// impart into the dissolved bridge fails, leaving it in none; the request answers 204.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_whose_bridge_goes_while_it_waits_leaves_the_channel_in_no_bridge() {
    // A transfer the far end refuses holds the channel's queue for the ring time: long
    // enough for the bridge to go meanwhile, short enough to wait out.
    let sim = AriSim::start(SimConfig {
        username: "u".into(),
        password: "p".into(),
        ring_time: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    let a = caller(&sim, &mut ws, "gone").await;
    ok(&c, "POST", &format!("/channels/{a}/answer")).await;
    for b in ["one", "two"] {
        ok(&c, "POST", &format!("/bridges/{b}?type=mixing")).await;
    }
    ok(&c, "POST", &format!("/bridges/one/addChannel?channel={a}")).await;
    sim.refuse_transfers(&a);
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/redirect?endpoint=PJSIP/elsewhere"),
    )
    .await;
    assert!(
        sim.wait_until(WAIT, |s| s.channel(&a).is_some_and(|ch| ch.transferring))
            .await
    );
    let add = send_later(&sim, "POST", format!("/bridges/two/addChannel?channel={a}"));
    assert!(
        sim.wait_until(WAIT, |s| s
            .channel(&a)
            .is_some_and(|ch| ch.queued_commands == 1))
            .await,
        "the add waits behind the transfer"
    );
    let r = c
        .call("DELETE", "/bridges/two", None)
        .await
        .expect("answered");
    assert_eq!(r.status, 204, "{}", r.text);
    let r = answer_of(add).await;
    assert_eq!(r.status, 204, "{}", r.text);
    let snap = sim.snapshot();
    assert_eq!(
        snap.channel(&a).and_then(|ch| ch.bridge.clone()),
        None,
        "departed its own bridge, joined none"
    );
    assert!(snap.bridge("one").is_some_and(|b| b.channels.is_empty()));
    let log = sim.event_log();
    assert!(
        position(&log, "ChannelLeftBridge", |e| str_at(e, "/bridge/id")
            == "one")
        .is_some(),
        "{:?}",
        summary(&log)
    );
}

/// `ChannelEnteredBridge` and `ChannelLeftBridge` go to the bridge's topic alone: an app that
/// follows only the channel does not get them, one that follows the bridge does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_enter_and_leave_reach_the_bridges_followers_only() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    let mut channel_only = events(&sim, "by-channel").await;
    let mut bridge_too = events(&sim, "by-bridge").await;
    let a = caller(&sim, &mut ws, "topics").await;
    ok(&c, "POST", "/bridges/mix?type=mixing").await;
    ok(
        &c,
        "POST",
        &format!("/applications/by-channel/subscription?eventSource=channel:{a}"),
    )
    .await;
    ok(
        &c,
        "POST",
        "/applications/by-bridge/subscription?eventSource=bridge:mix",
    )
    .await;
    ok(&c, "POST", &format!("/bridges/mix/addChannel?channel={a}")).await;
    ok(
        &c,
        "POST",
        &format!("/bridges/mix/removeChannel?channel={a}"),
    )
    .await;
    ok(&c, "DELETE", &format!("/channels/{a}")).await;
    for (ws, who) in [(&mut bridge_too, "the bridge's follower")] {
        ws.until(WAIT, is("ChannelEnteredBridge"))
            .await
            .unwrap_or_else(|e| panic!("{who}: {e:?}"));
        ws.until(WAIT, is("ChannelLeftBridge"))
            .await
            .unwrap_or_else(|e| panic!("{who}: {e:?}"));
    }
    // The channel's follower hears of the hangup, and of no bridge on the way.
    let seen = channel_only
        .until(WAIT, is("ChannelDestroyed"))
        .await
        .expect("the channel's end");
    let log = sim.event_log();
    let heard = |app: &str, t: &str| {
        log.iter()
            .any(|e| str_at(e, "/application") == app && str_at(e, "/type") == t)
    };
    assert!(heard("by-channel", "ChannelDestroyed"), "{seen:?}");
    assert!(
        !heard("by-channel", "ChannelEnteredBridge"),
        "{:?}",
        summary(&log)
    );
    assert!(
        !heard("by-channel", "ChannelLeftBridge"),
        "{:?}",
        summary(&log)
    );
}

/// Commands Asterisk queues on the channel and waits for (`addChannel`, `removeChannel`,
/// `answer`: control.c `app_send_command_on_condition`) take their place in the channel's
/// queue in arrival order: one sent during a playback runs when that playback ends, before a
/// playback queued after it. Their checks are made on arrival; a channel that hangs up while
/// they wait fails them in the queue, which `answer` reports (500) and `removeChannel` does
/// not (204).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_commands_keep_their_place_and_are_checked_on_arrival() {
    let (sim, c, mut ws) = slow_playbacks().await;
    let a = caller(&sim, &mut ws, "fifo").await;
    ok(&c, "POST", &format!("/channels/{a}/answer")).await;
    ok(&c, "POST", "/bridges/one?type=mixing").await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/play/long?media=sound:a"),
    )
    .await;
    ws.until(WAIT, is("PlaybackStarted"))
        .await
        .expect("the playback started");
    let queued = |n: usize| {
        let a = a.clone();
        move |s: &confroute_tests::ari_sim::SimSnapshot| {
            s.channel(&a).is_some_and(|ch| ch.queued_commands == n)
        }
    };

    let add = send_later(&sim, "POST", format!("/bridges/one/addChannel?channel={a}"));
    assert!(sim.wait_until(WAIT, queued(1)).await, "the add is queued");
    // Checked on arrival: the channel is not in the bridge yet, whatever is queued.
    let early = c
        .call(
            "POST",
            &format!("/bridges/one/removeChannel?channel={a}"),
            None,
        )
        .await
        .expect("answered");
    assert_eq!(early.status, 422, "{}", early.text);
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/play/next?media=sound:b"),
    )
    .await;
    ok(&c, "DELETE", "/playbacks/long").await;
    let r = answer_of(add).await;
    assert_eq!(r.status, 204, "{}", r.text);
    ws.until(WAIT, |e| {
        ty(e) == "PlaybackStarted" && str_at(e, "/playback/id") == "next"
    })
    .await
    .expect("the next playback started");
    let log = sim.event_log();
    let at = |t: &str, pred: &dyn Fn(&Value) -> bool| position(&log, t, pred);
    let finished = at("PlaybackFinished", &|e| str_at(e, "/playback/id") == "long");
    let entered = at("ChannelEnteredBridge", &|e| {
        str_at(e, "/bridge/id") == "one"
    });
    let next = at("PlaybackStarted", &|e| str_at(e, "/playback/id") == "next");
    assert!(
        finished.is_some() && entered.is_some() && next.is_some(),
        "{:?}",
        summary(&log)
    );
    assert!(
        finished < entered && entered < next,
        "the add ran in its place, before the playback queued after it: {:?}",
        summary(&log)
    );

    // Behind "next": both pass their checks now, then the channel hangs up.
    let answer = send_later(&sim, "POST", format!("/channels/{a}/answer"));
    let remove = send_later(
        &sim,
        "POST",
        format!("/bridges/one/removeChannel?channel={a}"),
    );
    assert!(sim.wait_until(WAIT, queued(2)).await, "both are queued");
    ok(&c, "DELETE", &format!("/channels/{a}")).await;
    let answer = answer_of(answer).await;
    assert_eq!(answer.status, 500, "{}", answer.text);
    let body: Value = serde_json::from_str(&answer.text).expect("JSON error body");
    assert_eq!(body["message"], "Failed to answer channel");
    let remove = answer_of(remove).await;
    assert_eq!(remove.status, 204, "{}", remove.text);
}

/// An answer or addChannel waiting behind a playback runs at its turn, not on arrival: the
/// ringing channel is answered between the playback's end and the next playback, and an add
/// whose bridge was destroyed while it waited answers 204 and adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_commands_act_at_their_turn() {
    let (sim, c, mut ws) = slow_playbacks().await;
    let a = caller(&sim, &mut ws, "turn").await;
    ok(&c, "POST", "/bridges/doomed?type=mixing").await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/play/long?media=sound:a"),
    )
    .await;
    ws.until(WAIT, is("PlaybackStarted"))
        .await
        .expect("the playback started");
    let answer = send_later(&sim, "POST", format!("/channels/{a}/answer"));
    let add = send_later(
        &sim,
        "POST",
        format!("/bridges/doomed/addChannel?channel={a}"),
    );
    assert!(
        sim.wait_until(WAIT, |s| s
            .channel(&a)
            .is_some_and(|ch| ch.queued_commands == 2))
            .await,
        "both queued"
    );
    assert!(sim
        .snapshot()
        .channel(&a)
        .is_some_and(|ch| ch.state == "Ring"));
    ok(&c, "DELETE", "/bridges/doomed").await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/play/next?media=sound:b"),
    )
    .await;
    ok(&c, "DELETE", "/playbacks/long").await;
    for (what, task) in [("answer", answer), ("add", add)] {
        let r = answer_of(task).await;
        assert_eq!(r.status, 204, "{what}: {}", r.text);
    }
    ws.until(WAIT, |e| {
        ty(e) == "PlaybackStarted" && str_at(e, "/playback/id") == "next"
    })
    .await
    .expect("the next playback started");
    let log = sim.event_log();
    let at = |t: &str, pred: &dyn Fn(&Value) -> bool| position(&log, t, pred);
    let finished = at("PlaybackFinished", &|e| str_at(e, "/playback/id") == "long");
    let up = at("ChannelStateChange", &|e| {
        str_at(e, "/channel/state") == "Up"
    });
    let next = at("PlaybackStarted", &|e| str_at(e, "/playback/id") == "next");
    assert!(
        finished.is_some() && up.is_some() && finished < up && up < next,
        "answered at its turn: {:?}",
        summary(&log)
    );
    assert!(
        at("ChannelEnteredBridge", &|_| true).is_none(),
        "the destroyed bridge took no one: {:?}",
        summary(&log)
    );
}

/// A channel recording runs on the channel's own thread through its command queue, like a
/// playback (res_stasis_recording.c `record_file`): asked for during a playback it is
/// answered at once as `queued` and starts when the playback ends; while it records, later
/// commands wait until it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_recording_waits_its_turn_and_holds_the_queue() {
    let (sim, c, mut ws) = slow_playbacks().await;
    let a = caller(&sim, &mut ws, "rec").await;
    ok(&c, "POST", &format!("/channels/{a}/answer")).await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/play/long?media=sound:a"),
    )
    .await;
    ws.until(WAIT, is("PlaybackStarted"))
        .await
        .expect("the playback started");
    let r = c
        .call(
            "POST",
            &format!("/channels/{a}/record?name=memo&format=wav"),
            None,
        )
        .await
        .expect("answered");
    assert_eq!(r.status, 201, "{}", r.text);
    let body: Value = serde_json::from_str(&r.text).expect("JSON body");
    assert_eq!(body["state"], "queued");
    ok(&c, "DELETE", "/playbacks/long").await;
    let evs = ws
        .until(WAIT, is("RecordingStarted"))
        .await
        .expect("the recording started");
    assert!(
        evs.iter().any(|e| ty(e) == "PlaybackFinished"),
        "after the playback: {:?}",
        summary(&evs)
    );
    ok(&c, "POST", &format!("/channels/{a}/mute?direction=in")).await;
    assert!(
        sim.snapshot()
            .channel(&a)
            .is_some_and(|ch| ch.queued_commands == 1 && !ch.muted_in),
        "the mute waits behind the recording"
    );
    ok(&c, "POST", "/recordings/live/memo/stop").await;
    ws.until(WAIT, is("RecordingFinished"))
        .await
        .expect("the recording finished");
    assert!(
        sim.wait_until(WAIT, |s| s.channel(&a).is_some_and(|ch| ch.muted_in))
            .await,
        "the mute ran once the recording stopped"
    );
}

/// A hangup does not stop the dispatch pass under way (control.c `control_dispatch_all`):
/// the playback it cuts short finishes `failed`, then the commands queued behind it still
/// run on the hung-up channel: a queued playback starts and fails at once, a setChannelVar
/// sets its variable, a waited-for answer fails (500). Stasis ends after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hangup_lets_the_queued_commands_run_before_stasis_ends() {
    let (sim, c, mut ws) = slow_playbacks().await;
    let a = caller(&sim, &mut ws, "hang").await;
    ok(&c, "POST", &format!("/channels/{a}/answer")).await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/play/first?media=sound:a"),
    )
    .await;
    ws.until(WAIT, is("PlaybackStarted"))
        .await
        .expect("the playback started");
    ok(&c, "POST", &format!("/channels/{a}/mute?direction=in")).await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/play/second?media=sound:b,sound:c"),
    )
    .await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/variable?variable=QUEUED&value=1"),
    )
    .await;
    let answer = send_later(&sim, "POST", format!("/channels/{a}/answer"));
    assert!(
        sim.wait_until(WAIT, |s| s
            .channel(&a)
            .is_some_and(|ch| ch.queued_commands == 3))
            .await,
        "mute, setChannelVar and answer queued"
    );
    ok(&c, "DELETE", &format!("/channels/{a}")).await;
    let answer = answer_of(answer).await;
    assert_eq!(answer.status, 500, "{}", answer.text);
    ws.until(WAIT, is("StasisEnd")).await.expect("Stasis ended");
    let log = sim.event_log();
    let order: Vec<String> = log
        .iter()
        .filter(|e| {
            matches!(
                ty(e),
                "ChannelHangupRequest"
                    | "PlaybackStarted"
                    | "PlaybackFinished"
                    | "ChannelVarset"
                    | "StasisEnd"
            ) && !(ty(e) == "ChannelVarset" && str_at(e, "/variable") != "QUEUED")
        })
        .map(|e| {
            let what = [str_at(e, "/playback/id"), str_at(e, "/playback/state")].join(" ");
            format!("{} {}", ty(e), what.trim()).trim_end().to_string()
        })
        .collect();
    assert_eq!(
        order,
        vec![
            "PlaybackStarted first playing",
            "ChannelHangupRequest",
            "PlaybackFinished first failed",
            "PlaybackStarted second playing",
            "PlaybackFinished second failed",
            "ChannelVarset",
            "StasisEnd",
        ],
        "{:?}",
        summary(&log)
    );
}

/// `app_control_move` only notes where to go; the Stasis loop moves the channel between
/// dispatch passes. Commands queued behind the move in the same pass still run in the old
/// application, and two moves in one pass make one move: to the last one's application,
/// with both moves' arguments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_happens_once_the_dispatch_pass_is_over() {
    let (sim, c, mut ws) = slow_playbacks().await;
    let mut other = events(&sim, "other").await;
    let a = caller(&sim, &mut ws, "mv").await;
    ok(&c, "POST", &format!("/channels/{a}/answer")).await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/play/long?media=sound:a"),
    )
    .await;
    ws.until(WAIT, is("PlaybackStarted"))
        .await
        .expect("the playback started");
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/move?app=nowhere&appArgs=one"),
    )
    .await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/move?app=other&appArgs=two"),
    )
    .await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/variable?variable=BEHIND&value=1"),
    )
    .await;
    ok(&c, "DELETE", "/playbacks/long").await;
    let start = other.until(WAIT, is("StasisStart")).await.expect("moved");
    assert_eq!(
        start.last().expect("event")["args"],
        serde_json::json!(["one", "two"]),
        "one move, with both moves' arguments"
    );
    let old = ws.until(WAIT, is("StasisEnd")).await.expect("left");
    assert!(
        old.iter()
            .any(|e| ty(e) == "ChannelVarset" && str_at(e, "/variable") == "BEHIND"),
        "the command behind the move ran in the old app: {:?}",
        summary(&old)
    );
    assert!(
        !sim.event_log()
            .iter()
            .any(|e| ty(e) == "ApplicationMoveFailed"),
        "the first move was overridden, not tried"
    );
}

/// A bridge records through a recorder channel of its own and plays through an announcer of
/// its own: neither waits for the other.
#[tokio::test]
async fn a_bridge_plays_while_it_records() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    let a = caller(&sim, &mut ws, "br").await;
    ok(&c, "POST", "/bridges/one?type=mixing").await;
    ok(&c, "POST", &format!("/bridges/one/addChannel?channel={a}")).await;
    let r = c
        .call("POST", "/bridges/one/record?name=minutes&format=wav", None)
        .await
        .expect("answered");
    assert_eq!(r.status, 201, "{}", r.text);
    ws.until(WAIT, is("RecordingStarted"))
        .await
        .expect("the recording started");
    ok(&c, "POST", "/bridges/one/play/hello?media=sound:hello").await;
    ws.until(WAIT, |e| {
        ty(e) == "PlaybackFinished" && str_at(e, "/playback/id") == "hello"
    })
    .await
    .expect("the playback ran while the bridge records");
}

/// `res_stasis_recording.c`: a channel recording still queued is only marked canceled by a
/// stop (`recording_disregard`, no event) and still records when its turn comes; a second stop
/// finds it not in session (409). One queued before a `continue` ran still records before
/// the channel leaves Stasis. `record_file` answers a ringing channel first, and refuses a
/// bridged one with `RecordingFailed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_recordings_follow_their_command_in_the_queue() {
    let (sim, c, mut ws) = slow_playbacks().await;
    let mut ids = Vec::new();
    for conf in ["stop", "gone", "ring", "bridged", "unanswered"] {
        let id = sim
            .dial_in(dial_in("confroute", conf))
            .await
            .expect("dial in");
        ws.until(WAIT, is("StasisStart")).await.expect("in Stasis");
        ids.push(id);
    }
    let (a, b, r, x, u) = (&ids[0], &ids[1], &ids[2], &ids[3], &ids[4]);
    let record = |id: &str, name: &str| {
        let path = format!("/channels/{id}/record?name={name}&format=wav");
        let client = AriClient::new(&sim).expect("client");
        async move { client.call("POST", &path, None).await.expect("answered") }
    };
    let status = |name: &str| {
        let path = format!("/recordings/live/{name}");
        let client = AriClient::new(&sim).expect("client");
        async move { client.call("GET", &path, None).await.expect("answered") }
    };

    // Stopped while queued behind a playback: disregarded, then recorded all the same.
    for id in [a, b] {
        ok(&c, "POST", &format!("/channels/{id}/answer")).await;
        ok(
            &c,
            "POST",
            &format!("/channels/{id}/play/pb-{id}?media=sound:a"),
        )
        .await;
    }
    assert_eq!(record(a, "kept").await.status, 201);
    let stop = c
        .call("POST", "/recordings/live/kept/stop", None)
        .await
        .expect("answered");
    assert_eq!(stop.status, 204, "{}", stop.text);
    let got: Value = serde_json::from_str(&status("kept").await.text).expect("JSON");
    assert_eq!(got["state"], "canceled");
    let again = c
        .call("POST", "/recordings/live/kept/stop", None)
        .await
        .expect("answered");
    assert_eq!(again.status, 409, "{}", again.text);
    ok(&c, "DELETE", &format!("/playbacks/pb-{a}")).await;
    let started = ws
        .until(WAIT, is("RecordingStarted"))
        .await
        .expect("it started when its turn came");
    assert_eq!(
        str_at(started.last().expect("event"), "/recording/name"),
        "kept"
    );
    let got: Value = serde_json::from_str(&status("kept").await.text).expect("JSON");
    assert_eq!(got["state"], "recording");

    // A continue, then a recording, behind a playback: the continue only marks the control
    // done; the recording queued before it ran still records in the same dispatch pass, and
    // commands sent after it are refused (answered, never carried out). Stasis ends when
    // the recording does.
    ok(&c, "POST", &format!("/channels/{b}/continue")).await;
    assert_eq!(record(b, "after-continue").await.status, 201);
    ok(&c, "DELETE", &format!("/playbacks/pb-{b}")).await;
    ws.until(WAIT, |e| {
        ty(e) == "RecordingStarted" && str_at(e, "/recording/name") == "after-continue"
    })
    .await
    .expect("the recording queued before the continue ran started");
    // Asked for once the control is done: answered 201, never recorded, forgotten.
    assert_eq!(record(b, "too-late").await.status, 201);
    assert_eq!(status("too-late").await.status, 404);
    ok(
        &c,
        "POST",
        &format!("/channels/{b}/variable?variable=LATE&value=1"),
    )
    .await;
    let late = c
        .call(
            "POST",
            &format!("/channels/{b}/play/late?media=sound:z"),
            None,
        )
        .await
        .expect("answered");
    assert_eq!(late.status, 201, "{}", late.text);
    let snap = sim.snapshot();
    let ch = snap.channel(b).expect("channel");
    assert!(
        ch.stasis_app.is_some() && !ch.variables.contains_key("LATE"),
        "still in Stasis, the late command refused: {ch:?}"
    );
    let gone = c
        .call("GET", "/playbacks/late", None)
        .await
        .expect("answered");
    assert_eq!(gone.status, 404, "the refused playback is forgotten");
    ok(&c, "POST", "/recordings/live/after-continue/stop").await;
    let evs = ws
        .until(WAIT, |e| {
            ty(e) == "StasisEnd" && str_at(e, "/channel/id") == b.as_str()
        })
        .await
        .expect("the channel left Stasis once its queue was empty");
    assert!(
        evs.iter().any(|e| ty(e) == "RecordingFinished"),
        "{:?}",
        summary(&evs)
    );

    // A ringing channel is answered first; a bridged one cannot be recorded.
    assert_eq!(record(r, "answered").await.status, 201);
    let evs = ws
        .until(WAIT, |e| {
            ty(e) == "RecordingStarted" && str_at(e, "/recording/name") == "answered"
        })
        .await
        .expect("recording");
    assert!(
        evs.iter().any(|e| ty(e) == "ChannelStateChange"
            && str_at(e, "/channel/id") == r.as_str()
            && str_at(e, "/channel/state") == "Up"),
        "answered before it records: {:?}",
        summary(&evs)
    );
    ok(&c, "POST", &format!("/channels/{x}/answer")).await;
    ok(&c, "POST", "/bridges/one?type=mixing").await;
    ok(&c, "POST", &format!("/bridges/one/addChannel?channel={x}")).await;
    assert_eq!(record(x, "refused").await.status, 201);
    let evs = ws
        .until(WAIT, is("RecordingFailed"))
        .await
        .expect("the recording failed");
    let failed = evs.last().expect("event");
    assert_eq!(str_at(failed, "/recording/name"), "refused");
    assert_eq!(
        str_at(failed, "/recording/cause"),
        "Cannot record channel while in bridge"
    );
    assert_eq!(status("refused").await.status, 404);

    // Queued on a channel never answered that then hangs up: its turn still comes, and
    // answering the hung-up channel fails it.
    ok(
        &c,
        "POST",
        &format!("/channels/{u}/play/pb-u?media=sound:a"),
    )
    .await;
    assert_eq!(record(u, "never").await.status, 201);
    ok(&c, "DELETE", &format!("/channels/{u}")).await;
    let evs = ws
        .until(WAIT, |e| {
            ty(e) == "RecordingFailed" && str_at(e, "/recording/name") == "never"
        })
        .await
        .expect("the recording failed");
    assert_eq!(
        str_at(evs.last().expect("event"), "/recording/cause"),
        "Failed to answer channel"
    );
    assert!(
        !evs.iter()
            .any(|e| ty(e) == "ChannelStateChange" && str_at(e, "/channel/id") == u.as_str()),
        "the hung-up channel was not answered: {:?}",
        summary(&evs)
    );
    let snap = sim.snapshot();
    assert!(snap.channel(x).is_some_and(|ch| ch.recording.is_none()));
    assert!(
        !sim.event_log()
            .iter()
            .any(|e| ty(e) == "RecordingFinished" && str_at(e, "/recording/name") == "refused"),
        "the refused recording never finished: {:?}",
        summary(&sim.event_log())
    );
}

/// Sending media to a channel not yet answered (music on hold, silence, DTMF, a playback,
/// a bridge's first playback to its members) first indicates progress, as control.c,
/// res_stasis_playback.c and resource_bridges.c do: early media, and the channel stays
/// unanswered. An answered channel gets no progress indication.
#[tokio::test]
async fn media_to_an_unanswered_channel_indicates_progress_first() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    let mut ids = Vec::new();
    for conf in ["moh", "silence", "dtmf", "play", "answered"] {
        let id = sim
            .dial_in(dial_in("confroute", conf))
            .await
            .expect("dial in");
        ws.until(WAIT, is("StasisStart")).await.expect("in Stasis");
        ids.push(id);
    }
    ok(&c, "POST", &format!("/channels/{}/answer", ids[4])).await;
    ok(&c, "POST", &format!("/channels/{}/moh", ids[0])).await;
    ok(&c, "POST", &format!("/channels/{}/silence", ids[1])).await;
    ok(&c, "POST", &format!("/channels/{}/dtmf?dtmf=5", ids[2])).await;
    ok(
        &c,
        "POST",
        &format!("/channels/{}/play/p?media=sound:a", ids[3]),
    )
    .await;
    ok(&c, "POST", &format!("/channels/{}/moh", ids[4])).await;
    ws.until(WAIT, is("PlaybackStarted"))
        .await
        .expect("the playback started");
    // A bridge's first playback makes its announcer, which indicates progress to every
    // member (`ari_bridges_play_new`).
    let member = caller(&sim, &mut ws, "member").await;
    ok(&c, "POST", "/bridges/early?type=mixing").await;
    ok(
        &c,
        "POST",
        &format!("/bridges/early/addChannel?channel={member}"),
    )
    .await;
    assert!(sim
        .snapshot()
        .channel(&member)
        .is_some_and(|ch| !ch.early_media));
    ok(&c, "POST", "/bridges/early/play/hello?media=sound:hello").await;
    ids.push(member);
    let snap = sim.snapshot();
    for id in ids[..4].iter().chain(&ids[5..]) {
        let ch = snap.channel(id).expect("channel");
        assert!(ch.early_media && ch.state == "Ring", "{ch:?}");
    }
    let ch = snap.channel(&ids[4]).expect("channel");
    assert!(!ch.early_media && ch.state == "Up", "{ch:?}");
}

/// `addChannel` with several channels adds them one after another and checks each for a
/// recording as it queues its add: a recording channel answers 409 after the channels named
/// before it were added, and those stay in the bridge.
#[tokio::test]
async fn add_channel_stops_at_a_recording_channel_keeping_those_added_before() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    let mut ids = Vec::new();
    for conf in ["x", "y", "z"] {
        let id = sim
            .dial_in(dial_in("confroute", conf))
            .await
            .expect("dial in");
        ws.until(WAIT, is("StasisStart")).await.expect("in Stasis");
        ok(&c, "POST", &format!("/channels/{id}/answer")).await;
        ids.push(id);
    }
    let (x, y, z) = (&ids[0], &ids[1], &ids[2]);
    ok(&c, "POST", "/bridges/one?type=mixing").await;
    let r = c
        .call(
            "POST",
            &format!("/channels/{y}/record?name=busy&format=wav"),
            None,
        )
        .await
        .expect("answered");
    assert_eq!(r.status, 201, "{}", r.text);
    let r = c
        .call(
            "POST",
            &format!("/bridges/one/addChannel?channel={x},{y},{z}"),
            None,
        )
        .await
        .expect("answered");
    assert_eq!(r.status, 409, "{}", r.text);
    let body: Value = serde_json::from_str(&r.text).expect("JSON error body");
    assert_eq!(body["message"], format!("Channel {y} currently recording"));
    let snap = sim.snapshot();
    let bridge = snap.bridge("one").expect("bridge");
    assert_eq!(bridge.channels, vec![x.clone()], "x added, y and z not");
}

/// Asynchronous channel commands (mute, DTMF, setChannelVar, ...: control.c
/// `stasis_app_send_command_async`) are answered at once but wait in the channel's command
/// queue behind its playback, and run in order before the playback queued after them. A
/// setChannelVar that cannot be carried out is still answered 204 (the failure is only
/// logged), and a getChannelVar, which is not queued, reads the value of the moment.
#[tokio::test]
async fn async_channel_commands_run_after_the_channels_playback() {
    let (sim, c, mut ws) = slow_playbacks().await;
    let a = caller(&sim, &mut ws, "q").await;
    ok(&c, "POST", &format!("/channels/{a}/answer")).await;
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/play/long?media=sound:a"),
    )
    .await;
    ws.until(WAIT, is("PlaybackStarted"))
        .await
        .expect("the playback started");
    for path in [
        format!("/channels/{a}/mute?direction=in"),
        format!("/channels/{a}/dtmf?dtmf=1"),
        format!("/channels/{a}/variable?variable=QUEUED&value=1"),
        format!("/channels/{a}/variable?variable=NOSUCHFUNC(x)&value=1"),
    ] {
        let r = c.call("POST", &path, None).await.expect("answered");
        assert_eq!(r.status, 204, "{path}: {}", r.text);
    }
    ok(
        &c,
        "POST",
        &format!("/channels/{a}/play/next?media=sound:b"),
    )
    .await;
    let snap = sim.snapshot();
    let ch = snap.channel(&a).expect("channel");
    assert!(!ch.muted_in && ch.dtmf_sent.is_empty(), "{ch:?}");
    let r = c
        .call(
            "GET",
            &format!("/channels/{a}/variable?variable=QUEUED"),
            None,
        )
        .await
        .expect("answered");
    assert_eq!(r.status, 404, "not set yet: {}", r.text);

    ok(&c, "DELETE", "/playbacks/long").await;
    ws.until(WAIT, |e| {
        ty(e) == "PlaybackStarted" && str_at(e, "/playback/id") == "next"
    })
    .await
    .expect("the next playback started");
    let snap = sim.snapshot();
    let ch = snap.channel(&a).expect("channel");
    assert!(ch.muted_in && ch.dtmf_sent == "1", "{ch:?}");
    let log = sim.event_log();
    let at = |t: &str, pred: &dyn Fn(&Value) -> bool| position(&log, t, pred);
    let finished = at("PlaybackFinished", &|e| str_at(e, "/playback/id") == "long");
    let varset = at("ChannelVarset", &|e| str_at(e, "/variable") == "QUEUED");
    let next = at("PlaybackStarted", &|e| str_at(e, "/playback/id") == "next");
    assert!(
        finished.is_some()
            && varset.is_some()
            && next.is_some()
            && finished < varset
            && varset < next,
        "in queue order: {:?}",
        summary(&log)
    );
    let value = ok(
        &c,
        "GET",
        &format!("/channels/{a}/variable?variable=QUEUED"),
    )
    .await;
    assert_eq!(value["value"], "1");

    // Behind the second playback, an unmute waits in turn too.
    ok(&c, "DELETE", &format!("/channels/{a}/mute?direction=in")).await;
    assert!(sim.snapshot().channel(&a).is_some_and(|ch| ch.muted_in));
    ok(&c, "DELETE", "/playbacks/next").await;
    assert!(
        sim.wait_until(WAIT, |snap| snap.channel(&a).is_some_and(|ch| !ch.muted_in))
            .await,
        "unmuted once the playback ended"
    );
}

#[tokio::test]
async fn caller_dtmf_and_hold() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    let a = sim
        .dial_in(dial_in("confroute", "c1"))
        .await
        .expect("dial-in a");
    let b = sim
        .dial_in(dial_in("confroute", "c1"))
        .await
        .expect("dial-in b");
    ws.until(WAIT, |e| {
        ty(e) == "StasisStart" && str_at(e, "/channel/id") == b
    })
    .await
    .expect("both in Stasis");

    // Not bridged: Asterisk's core sees the digits.
    sim.send_dtmf_from_caller(&a, "1#").await.expect("dtmf");
    expect_seq(
        &mut ws,
        |e| str_at(e, "/digit") == "#",
        &["ChannelDtmfReceived(1)", "ChannelDtmfReceived(#)"],
    )
    .await;

    // Two channels in a plain mixing bridge are bridged natively: digits pass Asterisk by.
    ok(&c, "POST", "/bridges/plain?type=mixing").await;
    ok(
        &c,
        "POST",
        &format!("/bridges/plain/addChannel?channel={a},{b}"),
    )
    .await;
    ws.until(WAIT, |e| {
        ty(e) == "ChannelEnteredBridge" && str_at(e, "/channel/id") == b
    })
    .await
    .expect("both bridged");
    assert_eq!(
        sim.snapshot().bridge("plain").expect("bridge").technology,
        "native_rtp"
    );
    sim.send_dtmf_from_caller(&a, "5").await.expect("dtmf");
    assert!(
        ws.next(Duration::from_millis(300)).await.is_none(),
        "no DTMF event in a native bridge"
    );

    // A dtmf_events bridge keeps media in the core, so digits are reported again.
    ok(&c, "POST", "/bridges/dtmf?type=mixing,dtmf_events").await;
    ok(
        &c,
        "POST",
        &format!("/bridges/dtmf/addChannel?channel={a},{b}"),
    )
    .await;
    ws.until(WAIT, |e| {
        ty(e) == "ChannelEnteredBridge"
            && str_at(e, "/channel/id") == b
            && str_at(e, "/bridge/id") == "dtmf"
    })
    .await
    .expect("moved");
    sim.send_dtmf_from_caller(&a, "7").await.expect("dtmf");
    expect_seq(
        &mut ws,
        is("ChannelDtmfReceived"),
        &["ChannelDtmfReceived(7)"],
    )
    .await;

    sim.caller_hold(&a, true).await.expect("hold");
    sim.caller_hold(&a, false).await.expect("unhold");
    expect_seq(
        &mut ws,
        is("ChannelUnhold"),
        &["ChannelHold", "ChannelUnhold"],
    )
    .await;
    assert!(!sim.snapshot().channel(&a).expect("channel").held);
}

#[tokio::test]
async fn restart_drops_everything_and_comes_back() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    ok(&c, "POST", "/bridges/sales-42").await;
    let ch = sim
        .dial_in(dial_in("confroute", "sales-42"))
        .await
        .expect("dial-in");
    ws.until(WAIT, is("StasisStart")).await.expect("in Stasis");

    let restarting = sim.clone();
    let restart = tokio::spawn(async move {
        restarting
            .restart_with_downtime(Duration::from_millis(1500))
            .await
    });
    assert!(ws.closed(WAIT).await, "the events WebSocket closes");
    let down = c.call("GET", "/asterisk/ping", None).await;
    assert!(
        down.is_err(),
        "connections are refused while Asterisk is down"
    );
    restart.await.expect("restart finishes");

    let mut ws = events(&sim, "confroute").await;
    assert_eq!(ok(&c, "GET", "/channels").await, serde_json::json!([]));
    assert_eq!(ok(&c, "GET", "/bridges").await, serde_json::json!([]));
    let r = c
        .call("GET", &format!("/channels/{ch}"), None)
        .await
        .expect("answered");
    assert_eq!(r.status, 404);
    let ch = sim
        .dial_in(dial_in("confroute", "again"))
        .await
        .expect("calls work again");
    let evs = ws
        .until(WAIT, is("StasisStart"))
        .await
        .expect("StasisStart after restart");
    assert_eq!(str_at(&evs[0], "/channel/id"), ch);
}

#[tokio::test]
async fn stall_delays_answers() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    ok(&c, "GET", "/asterisk/ping").await;
    sim.stall(Duration::from_millis(600));
    let t0 = Instant::now();
    ok(&c, "GET", "/asterisk/ping").await;
    assert!(
        t0.elapsed() >= Duration::from_millis(550),
        "answered only after the stall"
    );
}

#[tokio::test]
async fn dropped_websocket_keeps_calls_and_resumes() {
    let sim = sim().await;
    let mut ws = events(&sim, "confroute").await;
    let ch = sim
        .dial_in(dial_in("confroute", "flap"))
        .await
        .expect("dial-in");
    ws.until(WAIT, is("StasisStart")).await.expect("in Stasis");

    sim.drop_websockets();
    assert!(ws.closed(WAIT).await, "the WebSocket drops");
    let snap = sim.snapshot();
    assert_eq!(
        snap.channel(&ch)
            .expect("call survives")
            .stasis_app
            .as_deref(),
        Some("confroute")
    );
    assert!(!snap.apps.iter().any(|a| a.active), "the app is inactive");

    let mut ws = events(&sim, "confroute").await;
    sim.hangup_far_end(&ch, 16).await.expect("hangup");
    expect_seq(
        &mut ws,
        is("StasisEnd"),
        &["ChannelHangupRequest(16)", "StasisEnd"],
    )
    .await;
}

#[tokio::test]
async fn dial_in_without_app_fails_like_asterisk() {
    let sim = sim().await;
    let err = sim.dial_in(dial_in("nobody", "x")).await;
    assert!(err.is_err(), "Stasis fails without a registered app");
    assert!(sim.snapshot().channels.is_empty(), "the call was hung up");
}

#[tokio::test]
async fn second_websocket_replaces_the_app() {
    let sim = sim().await;
    let mut first = events(&sim, "confroute").await;
    let _second = events(&sim, "confroute").await;
    expect_seq(
        &mut first,
        is("ApplicationReplaced"),
        &["ApplicationReplaced"],
    )
    .await;
    sim.dial_in(dial_in("confroute", "x"))
        .await
        .expect("dial-in");
    assert!(
        first.next(Duration::from_millis(300)).await.is_none(),
        "the replaced socket hears nothing"
    );
}

#[tokio::test]
async fn subscribe_all_sees_channel_creation() {
    let sim = sim().await;
    let mut all = EventStream::connect(&format!("{}&subscribeAll=true", sim.events_url("watcher")))
        .await
        .expect("connects");
    let _app = events(&sim, "confroute").await;
    sim.dial_in(dial_in("confroute", "x"))
        .await
        .expect("dial-in");
    let evs = all
        .until(WAIT, is("ChannelDialplan"))
        .await
        .expect("events");
    let types: Vec<&str> = evs.iter().map(ty).collect();
    assert_eq!(
        types,
        ["ChannelCreated", "ChannelVarset", "ChannelDialplan"],
        "a subscribeAll app sees the call arrive; StasisStart goes only to the call's app"
    );
    assert!(all.next(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn request_log_counts_round_trips() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    sim.clear_request_log();
    ok(&c, "GET", "/asterisk/ping").await;
    ok(&c, "POST", "/bridges/x").await;
    let r = c
        .call("GET", "/bridges/nope", None)
        .await
        .expect("answered");
    assert_eq!(r.status, 404);
    let log = sim.request_log();
    let seen: Vec<(String, String, u16)> = log
        .iter()
        .map(|r| (r.method.clone(), r.path.clone(), r.status))
        .collect();
    assert_eq!(
        seen,
        [
            ("GET".to_string(), "/ari/asterisk/ping".to_string(), 200),
            ("POST".to_string(), "/ari/bridges/x".to_string(), 200),
            ("GET".to_string(), "/ari/bridges/nope".to_string(), 404),
        ]
    );
    assert_eq!(log[1].operation.as_deref(), Some("createWithId"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_hanging_up_during_add_channel_gets_204_and_never_enters() {
    let sim = sim().await;
    let mut ws = events(&sim, "confroute").await;
    let c = AriClient::new(&sim).expect("client");
    let chan = ok(&c, "POST", "/channels?endpoint=PJSIP/dave&app=confroute").await;
    ws.until(WAIT, is("StasisStart")).await.expect("in Stasis");
    let id = chan["id"].as_str().expect("id").to_string();
    ok(&c, "POST", "/bridges/b2").await;
    sim.hangup_during_add(&id);
    let r = c
        .call(
            "POST",
            &format!("/bridges/b2/addChannel?channel={id}"),
            None,
        )
        .await
        .expect("addChannel");
    assert_eq!(
        r.status, 204,
        "Asterisk reports only a recording channel's failure"
    );
    let evs = ws
        .until(WAIT, is("StasisEnd"))
        .await
        .expect("the caller left");
    assert!(
        !evs.iter().any(|e| ty(e) == "ChannelEnteredBridge"),
        "it never entered: {:?}",
        summary(&evs)
    );
    assert!(sim.snapshot().channel(&id).is_none());
}

/// Requests held on their way (the test-only latency of `hold_operation`) go on in the order
/// they came once released, as requests queued behind one another on a channel do: the last
/// `addChannel` sent leaves its bridge mute, whichever was released first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_go_on_in_the_order_they_came() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    let a = caller(&sim, &mut ws, "order").await;
    ok(&c, "POST", &format!("/channels/{a}/answer")).await;
    ok(&c, "POST", "/bridges/one?type=mixing").await;
    let op = format!("addChannel {a}");
    for round in 0..10 {
        sim.hold_operation(&op);
        let (first, last) = if round % 2 == 0 {
            ("true", "false")
        } else {
            ("false", "true")
        };
        let add = |mute: &str| {
            send_later(
                &sim,
                "POST",
                format!("/bridges/one/addChannel?channel={a}&mute={mute}"),
            )
        };
        let earlier = add(first);
        assert!(
            sim.wait_until(WAIT, |_| sim.held_requests(&op) == 1).await,
            "the first add is held"
        );
        let later = add(last);
        assert!(
            sim.wait_until(WAIT, |_| sim.held_requests(&op) == 2).await,
            "both adds are held"
        );
        sim.release_operation(&op);
        for r in [answer_of(earlier).await, answer_of(later).await] {
            assert_eq!(r.status, 204, "{}", r.text);
        }
        let muted = sim
            .snapshot()
            .channel(&a)
            .map(|ch| ch.bridge_mute)
            .expect("the channel");
        assert_eq!(
            muted.to_string(),
            last,
            "round {round}: the add sent last left its mute"
        );
    }
}

/// A bridge's music and recording are lonely members (an Announcer and a Recorder channel,
/// `bridge_moh_create` in res_stasis.c and `ast_ari_bridges_record`): when the last other
/// member leaves, `bridge_channel_dissolve_check` (main/bridge.c) makes them leave too, so
/// the music stops for good and the recording finishes. A channel added again to the bridge
/// it is in departs it first (`control_swap_channel_in_bridge`), which counts as leaving.
#[tokio::test]
async fn the_last_member_leaving_takes_the_music_and_the_recording_along() {
    let sim = sim().await;
    let c = AriClient::new(&sim).expect("client");
    let mut ws = events(&sim, "confroute").await;
    let a = caller(&sim, &mut ws, "lonely").await;
    let b = caller(&sim, &mut ws, "lonely").await;
    ok(&c, "POST", "/bridges/hold-1?type=holding").await;
    ok(&c, "POST", "/bridges/hold-1/moh?mohClass=jazz").await;
    ok(
        &c,
        "POST",
        &format!("/bridges/hold-1/addChannel?channel={a}"),
    )
    .await;
    ws.until(WAIT, is("ChannelEnteredBridge"))
        .await
        .expect("entered");
    let moh = |sim: &AriSim| sim.snapshot().bridge("hold-1").and_then(|b| b.moh.clone());
    assert_eq!(moh(&sim).as_deref(), Some("jazz"));
    // Added again to the bridge it is in, the only member leaves it first: no more music.
    ok(
        &c,
        "POST",
        &format!("/bridges/hold-1/addChannel?channel={a}"),
    )
    .await;
    expect_seq(
        &mut ws,
        is("ChannelEnteredBridge"),
        &["ChannelLeftBridge", "ChannelEnteredBridge"],
    )
    .await;
    assert_eq!(moh(&sim), None, "the music left with the last member");
    // Started again, it stays while another member remains.
    ok(&c, "POST", "/bridges/hold-1/moh?mohClass=jazz").await;
    ok(
        &c,
        "POST",
        &format!("/bridges/hold-1/addChannel?channel={b}"),
    )
    .await;
    ws.until(WAIT, is("ChannelEnteredBridge"))
        .await
        .expect("entered");
    ok(
        &c,
        "POST",
        &format!("/bridges/hold-1/removeChannel?channel={a}"),
    )
    .await;
    ws.until(WAIT, is("ChannelLeftBridge")).await.expect("left");
    assert_eq!(moh(&sim).as_deref(), Some("jazz"), "one member is left");

    // A recording of a mixing bridge finishes when its last member leaves.
    ok(&c, "POST", "/bridges/mix-1?type=mixing").await;
    ok(
        &c,
        "POST",
        &format!("/bridges/mix-1/addChannel?channel={a}"),
    )
    .await;
    ws.until(WAIT, is("ChannelEnteredBridge"))
        .await
        .expect("entered");
    record_then_empty(&c, &mut ws, "lonely-rec", &a).await;
    // The app followed the bridge only through its member: that subscription goes as the
    // member leaves (it stays in Stasis), before the lonely Recorder leaves, so the app does
    // not hear the recording end (res/stasis/control.c `internal_bridge_after_cb`, the
    // `stasis_app_exec` loop in res_stasis.c). The next event it hears is the member's
    // return.
    ok(
        &c,
        "POST",
        &format!("/bridges/mix-1/addChannel?channel={a}"),
    )
    .await;
    expect_seq(
        &mut ws,
        is("ChannelEnteredBridge"),
        &["ChannelLeftBridge", "ChannelEnteredBridge"],
    )
    .await;
    assert!(sim
        .snapshot()
        .bridge("mix-1")
        .is_some_and(|b| b.recording.is_none()));
    // An app that follows the bridge for itself hears it.
    ok(
        &c,
        "POST",
        "/applications/confroute/subscription?eventSource=bridge:mix-1",
    )
    .await;
    record_then_empty(&c, &mut ws, "lonely-rec-2", &a).await;
    let evs = expect_seq(
        &mut ws,
        is("RecordingFinished"),
        &["ChannelLeftBridge", "RecordingFinished"],
    )
    .await;
    assert_eq!(str_at(&evs[1], "/recording/name"), "lonely-rec-2");
}

/// Records bridge `mix-1` as `name`, then takes its only member `member` out of it.
async fn record_then_empty(c: &AriClient, ws: &mut EventStream, name: &str, member: &str) {
    ok(
        c,
        "POST",
        &format!("/bridges/mix-1/record?name={name}&format=wav"),
    )
    .await;
    ws.until(WAIT, is("RecordingStarted"))
        .await
        .expect("recording");
    ok(
        c,
        "POST",
        &format!("/bridges/mix-1/removeChannel?channel={member}"),
    )
    .await;
}
