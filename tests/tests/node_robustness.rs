//! The agent against a tiny fake Asterisk that misbehaves: malformed and unknown events,
//! unexpected status codes and a REST call that never answers are logged, counted and
//! survived; the caller involved is hung up with a clear cause and nothing is left behind.
//! And the events WebSocket holds a new connection's events until the node is ready for them.

mod node_common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use confroute_shared::name::ConferenceName;
use confroute_tests::fixtures::{self, metric, scrape};
use confroute_tests::harness::{wait_for_async, NodeProc, RedisServer};
use node_common::WAIT;
use serde_json::json;
use tokio::sync::mpsc;

#[derive(Clone)]
struct Fake {
    requests: Arc<Mutex<Vec<String>>>,
    frames: Arc<Mutex<Option<mpsc::UnboundedReceiver<String>>>>,
}

async fn events(State(fake): State<Fake>, ws: WebSocketUpgrade) -> Response {
    let rx = fake.frames.lock().expect("lock").take();
    ws.on_upgrade(move |socket| async move {
        if let Some(rx) = rx {
            pump(socket, rx).await;
        }
    })
}

async fn pump(mut socket: WebSocket, mut rx: mpsc::UnboundedReceiver<String>) {
    loop {
        tokio::select! {
            frame = rx.recv() => match frame {
                Some(f) if f == "<binary>" => {
                    if socket.send(Message::Binary(vec![0xff, 0x00].into())).await.is_err() { return; }
                }
                Some(f) => {
                    if socket.send(Message::Text(f.into())).await.is_err() { return; }
                }
                None => return,
            },
            got = socket.recv() => if got.is_none() { return },
        }
    }
}

/// The REST side: records every request and answers by rule.
async fn rest(State(fake): State<Fake>, req: Request) -> Response {
    let line = format!(
        "{} {}",
        req.method(),
        req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("")
    );
    fake.requests.lock().expect("lock").push(line.clone());
    let path = req.uri().path().to_string();
    let method = req.method().as_str().to_string();
    match (method.as_str(), path.as_str()) {
        ("GET", "/ari/bridges") | ("GET", "/ari/channels") => {
            (StatusCode::OK, axum::Json(json!([]))).into_response()
        }
        // No option variables set: Asterisk's answer for an unset variable.
        ("GET", p) if p.starts_with("/ari/channels/") && p.ends_with("/variable") => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"message": "Provided variable was not found"})),
        )
            .into_response(),
        // Not what Asterisk would ever say: a proxy's HTML error page.
        ("POST", p) if p.starts_with("/ari/bridges/cr-1.") && p.ends_with("-room-503") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "<html>upstream gone</html>",
        )
            .into_response(),
        ("POST", p) if p.starts_with("/ari/bridges/") && !p.ends_with("addChannel") => {
            (StatusCode::OK, axum::Json(json!({"id": "x"}))).into_response()
        }
        ("POST", "/ari/channels/c-teapot/answer") => StatusCode::IM_A_TEAPOT.into_response(),
        ("POST", "/ari/channels/c-slow/answer") => StatusCode::NO_CONTENT.into_response(),
        ("POST", p) if p.ends_with("/addChannel") => {
            // Never answers in time.
            tokio::time::sleep(Duration::from_secs(3)).await;
            StatusCode::NO_CONTENT.into_response()
        }
        ("DELETE", _) => StatusCode::NO_CONTENT.into_response(),
        _ => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"message": "Resource not found"})),
        )
            .into_response(),
    }
}

fn stasis_start(id: &str, conf: &str) -> String {
    json!({
        "type": "StasisStart",
        "application": "confroute",
        "args": [conf],
        "channel": {
            "id": id, "name": format!("PJSIP/trunk-{id}"), "state": "Ring",
            "caller": {"name": "", "number": "100"},
            "dialplan": {"context": "default", "exten": "s", "app_name": "Stasis", "app_data": format!("confroute,{conf}")},
            "channelvars": {}
        }
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_and_unexpected_answers_are_logged_and_survived() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let (tx, rx) = mpsc::unbounded_channel();
    let fake = Fake {
        requests: Arc::default(),
        frames: Arc::new(Mutex::new(Some(rx))),
    };
    let app = axum::Router::new()
        .route("/ari/events", get(events))
        .fallback(rest)
        .with_state(fake.clone());
    let addr = fixtures::serve_http(app).await;
    let base = format!("http://{addr}");
    let mut env = fixtures::redis_env(&cfg);
    env.push(("CONFROUTE_ARI__URL".into(), base));
    env.push(("CONFROUTE_ARI__REQUEST_TIMEOUT".into(), "300ms".into()));
    let mut node = NodeProc::start("node-a", &env).expect("node");
    node.wait_log("ARI events connected", WAIT)
        .expect("connected");

    for frame in [
        "not json at all",
        r#"{"type":"StasisStart","channel":"not an object","args":[]}"#,
        r#"{"type":"StasisEnd"}"#,
        r#"{"type":"EventFromTheFuture","whatever":[1,2,3]}"#,
        "<binary>",
    ] {
        tx.send(frame.to_string()).expect("send");
    }
    tx.send(stasis_start("c-503", "room-503")).expect("send");
    tx.send(stasis_start("c-teapot", "room-teapot"))
        .expect("send");
    tx.send(stasis_start("c-slow", "room-slow")).expect("send");

    let requests = fake.requests.clone();
    for ch in ["c-503", "c-teapot", "c-slow"] {
        let want = format!("DELETE /ari/channels/{ch}?reason=congestion");
        wait_for_async(&format!("{ch} hung up with cause 34"), WAIT, || {
            let requests = requests.clone();
            let want = want.clone();
            async move { requests.lock().expect("lock").contains(&want).then_some(()) }
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n{:#?}\n{}",
                requests.lock().expect("lock"),
                node.output()
            )
        });
    }
    assert!(node.process().is_running(), "{}", node.output());
    let health = fixtures::http()
        .get(format!("{}/healthz", node.http_url()))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
    let m = scrape(&node.http_url()).await;
    assert_eq!(
        metric(&m, r#"confroute_ari_events_total{kind="malformed"}"#),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"confroute_ari_events_total{kind="unknown"}"#),
        1.0
    );
    assert_eq!(
        metric(&m, r#"confroute_node_joins_total{outcome="ari_error"}"#),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            r#"confroute_ari_request_duration_seconds_count{op="createBridge",status="503"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"confroute_ari_request_duration_seconds_count{op="answer",status="418"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"confroute_ari_request_duration_seconds_count{op="addChannel",status="timeout"}"#
        ),
        1.0
    );
    let out = node.output();
    assert!(out.contains("ignoring malformed ARI event"), "{out}");
    assert!(
        out.contains("upstream gone"),
        "the odd answer is logged: {out}"
    );
    // Nothing left in Redis for the failed conferences.
    let store = fixtures::store(&cfg);
    for conf in ["room-503", "room-teapot", "room-slow"] {
        let name = ConferenceName::parse(conf).expect("name");
        wait_for_async(&format!("{conf} released"), WAIT, || async {
            store
                .lookup(&name)
                .await
                .ok()
                .flatten()
                .is_none()
                .then_some(())
        })
        .await
        .expect("released");
    }
}

/// An events WebSocket that never reads (so never answers pings) and never writes.
async fn silent_events(State(count): State<Arc<Mutex<usize>>>, ws: WebSocketUpgrade) -> Response {
    *count.lock().expect("lock") += 1;
    ws.on_upgrade(|socket| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(socket);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_stops_answering_pings_is_dropped_and_reconnected() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let count: Arc<Mutex<usize>> = Arc::default();
    let app = axum::Router::new()
        .route("/ari/events", get(silent_events))
        .fallback(|| async { (StatusCode::OK, axum::Json(json!([]))) })
        .with_state(count.clone());
    let addr = fixtures::serve_http(app).await;
    let base = format!("http://{addr}");
    let mut env = fixtures::redis_env(&cfg);
    env.push(("CONFROUTE_ARI__URL".into(), base));
    env.push(("CONFROUTE_ARI__PING_INTERVAL".into(), "200ms".into()));
    let mut node = NodeProc::start("node-a", &env).expect("node");
    node.wait_log("no answer to pings", WAIT)
        .expect("silence noticed");
    wait_for_async("a second connection", WAIT, || {
        let count = count.clone();
        async move { (*count.lock().expect("lock") >= 2).then_some(()) }
    })
    .await
    .expect("reconnected");
    let m = scrape(&node.http_url()).await;
    assert!(metric(&m, "confroute_ari_reconnects_total") >= 1.0, "{m}");
}

/// Upgrades, then closes at once: a proxy or an Asterisk that will not keep the session.
async fn closing_events(
    State(seen): State<Arc<Mutex<Vec<std::time::Instant>>>>,
    ws: WebSocketUpgrade,
) -> Response {
    seen.lock().expect("lock").push(std::time::Instant::now());
    ws.on_upgrade(|mut socket| async move {
        let _ = socket.send(Message::Close(None)).await;
    })
}

/// A connection that ends right after its handshake does not start the backoff over: the
/// agent waits longer before each new try instead of reconnecting (and reconciling) as fast
/// as the handshakes go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_closed_right_after_its_handshake_is_retried_with_growing_delays() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let seen: Arc<Mutex<Vec<std::time::Instant>>> = Arc::default();
    let app = axum::Router::new()
        .route("/ari/events", get(closing_events))
        .fallback(|| async { (StatusCode::OK, axum::Json(json!([]))) })
        .with_state(seen.clone());
    let addr = fixtures::serve_http(app).await;
    let mut env = fixtures::redis_env(&cfg);
    env.push(("CONFROUTE_ARI__URL".into(), format!("http://{addr}")));
    // The harness's backoff: 50 ms doubling up to 500 ms, each delay at least half of it.
    let node = NodeProc::start("node-a", &env).expect("node");
    wait_for_async("eight connections", WAIT, || {
        let seen = seen.clone();
        async move { (seen.lock().expect("lock").len() >= 8).then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    let seen = seen.lock().expect("lock").clone();
    // From the sixth try on the delay is capped at 500 ms, so at least 250 ms apart.
    let gap = seen[7] - seen[6];
    assert!(
        gap >= Duration::from_millis(250),
        "the 8th connection came {gap:?} after the 7th:\n{}",
        node.output()
    );
}

/// The events WebSocket hands over no event of a connection before the sink says it is
/// ready (the node waits for a heartbeat recording its ARI up): a caller arriving at once is
/// held back, not handled against a node record that still says ARI is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_reaches_the_sink_before_it_is_ready_for_the_connection() {
    use confroute_node::ari::ws::{self, EventSink, Timing};
    use confroute_node::ari::Event;
    use futures_util::future::BoxFuture;
    use tokio::sync::{oneshot, watch};

    struct Sink {
        ready: Mutex<Option<oneshot::Receiver<()>>>,
        events: mpsc::UnboundedSender<String>,
    }
    impl EventSink for Sink {
        fn connected(&self, _reconnect: bool) -> BoxFuture<'static, ()> {
            let ready = self.ready.lock().expect("lock").take();
            let _ = self.events.send("connected".into());
            Box::pin(async move {
                if let Some(r) = ready {
                    let _ = r.await;
                }
            })
        }
        fn disconnected(&self) {}
        fn event(&self, event: Event) {
            let _ = self.events.send(format!("{event:?}"));
        }
    }

    let sim = node_common::sim().await;
    let metrics = confroute_node::metrics::Metrics::new().expect("metrics");
    let client = sim_client(&sim, 50, &metrics);
    let (ready_tx, ready_rx) = oneshot::channel();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sink = Arc::new(Sink {
        ready: Mutex::new(Some(ready_rx)),
        events: tx,
    });
    let timing = Timing {
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        ping_interval: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(30),
    };
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(ws::run(
        client,
        "confroute".into(),
        timing,
        metrics,
        sink,
        stop,
    ));
    assert_eq!(rx.recv().await.as_deref(), Some("connected"));
    assert!(
        sim.wait_until(WAIT, |s| s
            .apps
            .iter()
            .any(|a| a.name == "confroute" && a.active))
            .await,
        "the app is registered"
    );
    let caller = node_common::dial(&sim, "early", &[]).await;
    // The StasisStart is out (the simulator logged it) but the sink has not had it.
    sim.wait_for_event(WAIT, |e| {
        e["type"] == "StasisStart" && e["channel"]["id"] == caller.as_str()
    })
    .await
    .expect("Asterisk sent the StasisStart");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "an event reached the sink before it was ready"
    );
    ready_tx.send(()).expect("the connection waits");
    let first = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the held events follow")
        .expect("an event");
    assert!(first.contains("StasisStart"), "{first}");
    // Nobody left to say stop (its owner dropped the sender): the WebSocket stops rather than
    // reconnecting for ever.
    drop(stop_tx);
    tokio::time::timeout(WAIT, task)
        .await
        .expect("the events WebSocket stops once its stop sender is gone")
        .expect("the task ends cleanly");
}

/// A write Asterisk refuses (a user ari.conf makes `read_only`) marks the client's writes
/// refused; a write sent before the refusal and answered after it does not lift it, and
/// the write check tells a refusing Asterisk from one that lets writes through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_stands_against_a_write_sent_before_it() {
    let sim = node_common::sim().await;
    let metrics = confroute_node::metrics::Metrics::new().expect("metrics");
    let client = sim_client(&sim, 10, &metrics);
    assert!(client.check_writes().await.expect("answered"), "writable");
    // A write in flight (held past Asterisk's user checks), then a reload to read-only and
    // a refused write.
    sim.hold_operation("createWithId");
    let early = {
        let client = client.clone();
        tokio::spawn(async move { client.create_bridge("early", "mixing", "early").await })
    };
    wait_for_async("the early write held", WAIT, || async {
        (sim.held_requests("createWithId") > 0).then_some(())
    })
    .await
    .expect("held");
    sim.set_read_only(true);
    assert!(client
        .create_bridge("late", "mixing", "late")
        .await
        .is_err());
    assert!(client.writes_refused());
    sim.release_operation("createWithId");
    early
        .await
        .expect("task")
        .expect("the early write went through");
    assert!(
        client.writes_refused(),
        "a write sent before the refusal does not lift it"
    );
    assert!(!client.check_writes().await.expect("answered"));
    sim.set_read_only(false);
    assert!(client.check_writes().await.expect("answered"));
    assert!(!client.writes_refused());
}

/// The agent's ARI client for `sim`, with at most `connections` requests at once.
fn sim_client(
    sim: &confroute_tests::ari_sim::AriSim,
    connections: usize,
    metrics: &confroute_node::metrics::Metrics,
) -> confroute_node::ari::AriClient {
    // reqwest is built without a default TLS provider; the agent installs this one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    confroute_node::ari::AriClient::new(
        &sim.base_url(),
        sim.username(),
        confroute_shared::secret::Secret::new(sim.password()),
        Duration::from_secs(5),
        connections,
        metrics.clone(),
    )
    .expect("client")
}

/// Asterisk reads a request line whole only up to 4,095 bytes and carries out the rest cut
/// short: the client splits a long channel list over several `addChannel` requests by
/// length (every channel added), and refuses, without sending it, a request that cannot be
/// split (a DTMF string that long) rather than have a shortened one played.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_asterisks_line_limit_are_split_or_refused_never_cut() {
    use confroute_node::ari::client::AriErrorKind;
    use confroute_tests::ari_sim::client::EventStream;
    use confroute_tests::ari_sim::DialIn;
    let sim = node_common::sim().await;
    let _app = EventStream::connect(&sim.events_url("long"))
        .await
        .expect("events");
    let metrics = confroute_node::metrics::Metrics::new().expect("metrics");
    let client = sim_client(&sim, 10, &metrics);
    // Channel ids as long as a long `systemname` prefix makes them: 64 of them are 5 KiB.
    let mut ids = Vec::new();
    for i in 0..70 {
        let id = format!(
            "{}-{i:04}",
            "pbx-eu-west-1a-media-server-0042.example.net".repeat(2)
        );
        sim.dial_in(DialIn {
            app: "long".into(),
            channel_id: Some(id.clone()),
            answered: true,
            ..DialIn::default()
        })
        .await
        .expect("dial in");
        ids.push(id);
    }
    assert!(client
        .create_bridge("long-bridge", "mixing", "long")
        .await
        .expect("bridge"));
    sim.clear_request_log();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (added, result) = client.add_channels("long-bridge", &refs).await;
    result.expect("every part accepted");
    assert_eq!(added, ids.len());
    let mut members = sim
        .snapshot()
        .bridge("long-bridge")
        .expect("bridge")
        .channels
        .clone();
    members.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(members, expected, "every channel in the bridge");
    let adds = sim
        .request_log()
        .into_iter()
        .filter(|r| r.operation.as_deref() == Some("addChannel"))
        .count();
    assert!(adds >= 2, "split over {adds} requests");
    sim.clear_request_log();
    let digits = "1".repeat(5000);
    let err = client
        .send_dtmf(&ids[0], &digits)
        .await
        .expect_err("too long to send");
    assert_eq!(err.kind, AriErrorKind::TooLong, "{err}");
    assert!(
        sim.request_log().is_empty(),
        "nothing sent: {:?}",
        sim.request_log()
    );
}
