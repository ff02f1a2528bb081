//! The JSON-RPC 2.0 WebSocket of a real controller with real Redis: every protocol error and
//! limit (with the connection staying usable), routing of commands to the owning node over
//! the command bus, dial-out notifications and subscribed events.
//!
//! The node here is a bus participant written in the test that answers like a node agent
//! does; the node agent's own handling of these commands is tested in the node tests.

use std::collections::HashMap;
use std::time::Duration;

use confroute_shared::bus::{Bus, BusError, ErrorCode, Event};
use confroute_tests::fixtures;
use confroute_tests::harness::{wait_for, wait_for_async, ControllerProc, RedisServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Setup {
    redis: RedisServer,
    controller: ControllerProc,
}

async fn setup(extra: &[(&str, &str)]) -> Setup {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    for id in ["node-a", "node-b"] {
        store
            .register(&fixtures::node(id, 100), Duration::from_secs(300))
            .await
            .expect("register");
    }
    let mut env = fixtures::redis_env(&cfg);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let controller = ControllerProc::start(&env).expect("controller");
    // Commands sent before the bus is subscribed are refused ("reconnecting").
    fixtures::wait_ready(&controller.http_url())
        .await
        .expect("controller ready");
    Setup { redis, controller }
}

async fn connect(
    s: &Setup,
    token: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://127.0.0.1:{}/v1/rpc", s.controller.http_port)
        .into_client_request()
        .expect("request");
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.expect("send");
}

async fn recv(ws: &mut Ws) -> Value {
    serde_json::from_str(&next_text(ws).await).expect("JSON answer")
}

/// Sends a request and returns the answer with its id (skipping notifications).
async fn rpc(ws: &mut Ws, method: &str, params: Value, id: u64) -> Value {
    send(
        ws,
        &json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id}).to_string(),
    )
    .await;
    loop {
        let v = recv(ws).await;
        if v.get("id") == Some(&json!(id)) {
            return v;
        }
    }
}

/// Checks the connection still answers requests.
async fn ping(ws: &mut Ws, id: u64) {
    let v = rpc(ws, "conference.list", json!({}), id).await;
    assert!(v["result"]["items"].is_array(), "usable again: {v}");
}

/// Answers a dial-out command as a node does: the call id, then `accepted`, `ringing` and
/// `connected` (the last).
async fn answer_dialout(responder: &Bus, cmd: &confroute_shared::bus::Command, callid: &str) {
    responder
        .respond(cmd, Ok(json!({ "callid": callid })))
        .await;
    for (i, st) in ["accepted", "ringing", "connected"].iter().enumerate() {
        responder
            .notify(
                &cmd.reply_to,
                &cmd.id,
                json!({"callid": callid, "status": st}),
                i == 2,
            )
            .await;
    }
}

/// `conference` claimed for node-a, whose command bus the test then plays: the store, the
/// node's bus and the commands it hears.
async fn hosted_on_node_a(
    s: &Setup,
    conference: &str,
) -> (
    confroute_shared::store::Store,
    Bus,
    tokio::sync::mpsc::Receiver<confroute_shared::bus::Command>,
) {
    let cfg = fixtures::single(&s.redis.url());
    let store = fixtures::store(&cfg);
    store
        .claim(
            &conference.parse().expect("name"),
            &[fixtures::id("node-a")],
        )
        .await
        .expect("claim");
    let (node, commands) = Bus::node(fixtures::store(&cfg), &fixtures::id("node-a"));
    assert!(node.wait_connected(Duration::from_secs(10)).await);
    (store, node, commands)
}

/// Sends a dial-out into `conference` that must fail, checks the conference has no home
/// afterwards (a refused command changes nothing), and returns the error code.
async fn refused_dialout(
    ws: &mut Ws,
    store: &confroute_shared::store::Store,
    conference: &str,
    to: &str,
    id: u64,
) -> i64 {
    let v = rpc(
        ws,
        "dialout",
        json!({"conference": conference, "to": to}),
        id,
    )
    .await;
    assert!(v.get("error").is_some(), "{v}");
    let home = store
        .lookup(&conference.parse().expect("name"))
        .await
        .expect("lookup");
    assert_eq!(home, None, "{conference} has no home after {v}");
    code(&v)
}

fn code(v: &Value) -> i64 {
    v["error"]["code"].as_i64().unwrap_or(0)
}

/// The error message of an answer ("" for none).
fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_keep_the_connection_usable() {
    let s = setup(&[("CONFROUTE_RPC__MAX_MESSAGE_SIZE", "4096")]).await;
    let mut ws = connect(&s, None).await.expect("connect");

    send(&mut ws, "{not json").await;
    let v = recv(&mut ws).await;
    assert_eq!((code(&v), v["id"].clone()), (-32700, Value::Null), "{v}");
    ping(&mut ws, 1).await;

    for (req, want) in [
        (
            json!({"jsonrpc": "1.0", "method": "conference.list", "id": 2}),
            -32600,
        ),
        (json!({"method": "conference.list", "id": 2}), -32600),
        (json!({"jsonrpc": "2.0", "method": 7, "id": 2}), -32600),
        (
            json!({"jsonrpc": "2.0", "method": "conference.list", "params": "x", "id": 2}),
            -32600,
        ),
        (
            json!({"jsonrpc": "2.0", "method": "no.such.method", "id": 2}),
            -32601,
        ),
        (
            json!({"jsonrpc": "2.0", "method": "participant.mute", "params": {"conference": "c"}, "id": 2}),
            -32602,
        ),
        (
            json!({"jsonrpc": "2.0", "method": "participant.mute", "params": ["c", "p"], "id": 2}),
            -32602,
        ),
        (
            json!({"jsonrpc": "2.0", "method": "participant.mute", "params": {"conference": "bad name", "participant": "p"}, "id": 2}),
            -32602,
        ),
        (
            json!({"jsonrpc": "2.0", "method": "participant.dtmf", "params": {"conference": "c", "participant": "p", "digits": "12E"}, "id": 2}),
            -32602,
        ),
        (
            json!({"jsonrpc": "2.0", "method": "conference.list", "params": {"limit": 0}, "id": 2}),
            -32602,
        ),
        // A scheme Asterisk does not play: refused here, before any node is asked.
        (
            json!({"jsonrpc": "2.0", "method": "participant.play", "params": {"conference": "c", "participant": "p", "media": "http://x/a.wav"}, "id": 2}),
            -32602,
        ),
        (
            json!({"jsonrpc": "2.0", "method": "conference.list", "params": {"bogus": 1}, "id": 2}),
            -32602,
        ),
    ] {
        send(&mut ws, &req.to_string()).await;
        let v = recv(&mut ws).await;
        assert_eq!(code(&v), want, "{req} -> {v}");
        assert_eq!(v["id"], json!(2), "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    ping(&mut ws, 3).await;

    let big = json!({"jsonrpc": "2.0", "method": "conference.list", "params": {"after": "x".repeat(5000)}, "id": 4});
    send(&mut ws, &big.to_string()).await;
    let v = recv(&mut ws).await;
    assert_eq!(code(&v), -32010, "{v}");
    ping(&mut ws, 5).await;

    ws.send(Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .expect("send");
    assert_eq!(code(&recv(&mut ws).await), -32600);

    // Positional params are a valid request: an unknown method is still unknown.
    send(
        &mut ws,
        &json!({"jsonrpc": "2.0", "method": "no.such", "params": [1], "id": 7}).to_string(),
    )
    .await;
    assert_eq!(code(&recv(&mut ws).await), -32601);

    // Notifications get no answer, not even an error, alone or in a batch: the next
    // request's answer is the next message.
    for notification in [
        json!({"jsonrpc": "2.0", "method": "conference.list"}),
        json!({"jsonrpc": "2.0", "method": "no.such", "params": {}}),
        json!({"jsonrpc": "2.0", "method": "subscribe", "params": ["x"]}),
        json!({"jsonrpc": "2.0", "method": "participant.mute", "params": {"conference": "c"}}),
        json!([{"jsonrpc": "2.0", "method": "subscribe", "params": ["x"]},
               {"jsonrpc": "2.0", "method": "no.such"}]),
    ] {
        send(&mut ws, &notification.to_string()).await;
    }
    // Also those holding a value no reader here can hold (a number past a double's range, a
    // lone surrogate): they are still notifications.
    for notification in [
        r#"{"jsonrpc":"2.0","method":"conference.list","params":{"limit":1e999}}"#,
        r#"{"jsonrpc":"2.0","method":"dialout","params":{"from":"\ud83d"}}"#,
        r#"[{"jsonrpc":"2.0","method":"no.such","params":{"a":1e999}}]"#,
    ] {
        send(&mut ws, notification).await;
    }
    send(
        &mut ws,
        &json!({"jsonrpc": "2.0", "method": "conference.list", "id": 6}).to_string(),
    )
    .await;
    let v = recv(&mut ws).await;
    assert_eq!(v["id"], json!(6), "only the request is answered: {v}");
    // With an id, such a request is refused by its method: unknown, or its params unread.
    send(
        &mut ws,
        r#"{"jsonrpc":"2.0","method":"conference.list","params":{"limit":1e999},"id":8}"#,
    )
    .await;
    let v = recv(&mut ws).await;
    assert_eq!((v["id"].clone(), code(&v)), (json!(8), -32602), "{v}");
    send(
        &mut ws,
        r#"{"jsonrpc":"2.0","method":"no.such","params":{"a":1e999},"id":9}"#,
    )
    .await;
    let v = recv(&mut ws).await;
    assert_eq!((v["id"].clone(), code(&v)), (json!(9), -32601), "{v}");
    // A member name holding a lone surrogate is an unexpected member: refused, under the
    // request's own id.
    send(
        &mut ws,
        r#"{"jsonrpc":"2.0","method":"conference.list","\ud800":1,"id":10}"#,
    )
    .await;
    let v = recv(&mut ws).await;
    assert_eq!((v["id"].clone(), code(&v)), (json!(10), -32600), "{v}");

    // Bad input is counted by error code.
    let m = fixtures::scrape(&s.controller.http_url()).await;
    let errors = |code: &str| {
        fixtures::metric(
            &m,
            &format!("confroute_rpc_errors_total{{code=\"{code}\"}}"),
        )
    };
    assert_eq!(errors("-32700"), 1.0, "the one unparsable frame");
    assert_eq!(errors("-32010"), 1.0, "the one oversize message");
    assert!(errors("-32601") >= 2.0, "unknown methods");
    assert!(errors("-32600") >= 4.0, "invalid requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_without_reading_is_held_back() {
    let s = setup(&[]).await;
    let (mut sink, mut stream) = connect(&s, None).await.expect("connect").split();
    // Each answer echoes its 8 KB id, so the socket buffers fill after a few thousand.
    let pad = "i".repeat(8000);
    const LIMIT: usize = 20_000;
    let mut sent = 0;
    let mut stalled = false;
    while sent < LIMIT && !stalled {
        let frame = json!({"jsonrpc": "2.0", "method": "no.such", "id": format!("{pad}{sent}")});
        let sending = sink.send(Message::Text(frame.to_string().into()));
        match tokio::time::timeout(Duration::from_secs(3), sending).await {
            Ok(r) => r.expect("send"),
            Err(_) => stalled = true,
        }
        sent += 1;
    }
    assert!(
        stalled,
        "the controller read all {LIMIT} frames of a client that reads nothing"
    );

    // Held back, not dropped: once the client reads, every frame it sent is answered.
    let last = tokio::spawn(async move {
        sink.send(Message::Text(
            json!({"jsonrpc": "2.0", "method": "conference.list", "id": "last"})
                .to_string()
                .into(),
        ))
        .await
        .expect("send after the stall");
        sink
    });
    // Requests are answered as each is done, not in the order they came (JSON-RPC does not
    // order them): the last one's answer may come before some of the others'.
    let mut answered = 0;
    let mut last_seen = false;
    // The frame whose send timed out may not have left the client.
    while !(last_seen && answered + 1 >= sent) {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|_| panic!("{answered} answers for {sent} frames"))
            .expect("open")
            .expect("frame");
        let Message::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(t.as_str()).expect("JSON answer");
        if v["id"] == json!("last") {
            assert!(v["result"].is_object() || code(&v) == -32008, "{v}");
            last_seen = true;
            continue;
        }
        assert!(matches!(code(&v), -32601 | -32008), "{v}");
        answered += 1;
    }
    let sink = last.await.expect("sender");
    let mut ws = sink.reunite(stream).expect("one connection");
    ping(&mut ws, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_batch_runs_when_the_rate_allows_it() {
    let s = setup(&[
        ("CONFROUTE_RPC__RATE_LIMIT", "1000"),
        ("CONFROUTE_RPC__BURST", "1000"),
        ("CONFROUTE_RPC__MAX_BATCH", "200"),
    ])
    .await;
    let mut ws = connect(&s, None).await.expect("connect");
    let batch: Vec<Value> = (0..200)
        .map(|i| json!({"jsonrpc": "2.0", "method": "conference.list", "id": i}))
        .collect();
    send(&mut ws, &Value::Array(batch).to_string()).await;
    let v = recv(&mut ws).await;
    let arr = v.as_array().expect("batch answer");
    assert_eq!(arr.len(), 200);
    let refused: Vec<&Value> = arr.iter().filter(|a| a["result"].is_null()).collect();
    assert!(refused.is_empty(), "refused members: {refused:?}");
}

/// `confroute_rpc_errors_total` for -32600 (invalid request) on the controller.
async fn invalid_requests(s: &Setup) -> f64 {
    let m = fixtures::scrape(&s.controller.http_url()).await;
    fixtures::metric(&m, r#"confroute_rpc_errors_total{code="-32600"}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_rate_limits_and_subscription_limits() {
    let s = setup(&[
        ("CONFROUTE_RPC__RATE_LIMIT", "5"),
        ("CONFROUTE_RPC__BURST", "5"),
        ("CONFROUTE_RPC__MAX_SUBSCRIPTIONS", "2"),
        ("CONFROUTE_RPC__MAX_BATCH", "4"),
    ])
    .await;
    let mut ws = connect(&s, None).await.expect("connect");
    send(
        &mut ws,
        &json!([
            {"jsonrpc": "2.0", "method": "conference.list", "id": "a"},
            {"jsonrpc": "2.0", "method": "nope", "id": "b"},
            {"jsonrpc": "2.0", "method": "conference.list"},
            {"bad": true}
        ])
        .to_string(),
    )
    .await;
    let v = recv(&mut ws).await;
    let arr = v.as_array().expect("batch answer");
    assert_eq!(arr.len(), 3, "the notification gets no answer: {v}");
    let by_id = |id: Value| arr.iter().find(|x| x["id"] == id).cloned().expect("answer");
    assert!(by_id(json!("a"))["result"].is_object());
    assert_eq!(code(&by_id(json!("b"))), -32601);
    assert_eq!(code(&by_id(Value::Null)), -32600);

    send(&mut ws, "[]").await;
    assert_eq!(code(&recv(&mut ws).await), -32600);
    let five: Vec<Value> = (0..5)
        .map(|i| json!({"jsonrpc": "2.0", "method": "conference.list", "id": i}))
        .collect();
    send(&mut ws, &Value::Array(five).to_string()).await;
    let over = recv(&mut ws).await;
    let over = over
        .as_array()
        .expect("a batch over the limit is answered as a batch");
    let ids: Vec<Value> = over.iter().map(|a| a["id"].clone()).collect();
    assert_eq!(ids, (0..5).map(|i| json!(i)).collect::<Vec<_>>());
    assert!(
        over.iter()
            .all(|a| code(a) == -32600 && a.get("result").is_none()),
        "each refused: {over:?}"
    );

    // Notifications over the limit get no answer, but each refusal is counted; a call sent
    // after them is answered first, so they were read and left nothing behind.
    let refused_before = invalid_requests(&s).await;
    let notes: Vec<Value> = (0..5)
        .map(|_| json!({"jsonrpc": "2.0", "method": "conference.list"}))
        .collect();
    send(&mut ws, &Value::Array(notes).to_string()).await;
    assert!(rpc(&mut ws, "conference.list", json!({}), 99).await["result"].is_object());
    assert_eq!(invalid_requests(&s).await - refused_before, 5.0);

    // The bucket (burst 5) is spent by now: the next commands are refused, then allowed again.
    let mut limited = 0;
    for i in 100..110 {
        if code(&rpc(&mut ws, "conference.list", json!({}), i).await) == -32008 {
            limited += 1;
        }
    }
    assert!(limited >= 5, "rate limit applied ({limited} of 10 refused)");
    // Time is meant to pass here: the bucket refills at its rate.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        rpc(&mut ws, "conference.list", json!({}), 200).await["result"].is_object(),
        "refilled"
    );

    // A fresh connection has its own bucket.
    let mut ws = connect(&s, None).await.expect("connect");
    assert!(
        rpc(&mut ws, "subscribe", json!({"conference": "one"}), 201).await["result"].is_object()
    );
    assert!(
        rpc(&mut ws, "subscribe", json!({"conference": "two"}), 202).await["result"].is_object()
    );
    assert_eq!(
        code(&rpc(&mut ws, "subscribe", json!({"conference": "three"}), 203).await),
        -32009
    );
    assert_eq!(
        code(&rpc(&mut ws, "subscribe", json!({"conference": "bad{"}), 204).await),
        -32602
    );
    let v = rpc(&mut ws, "unsubscribe", json!({"conference": "one"}), 205).await;
    assert_eq!(v["result"]["was_subscribed"], true);

    // An unknown method is answered as such and takes no token: a burst of them leaves the
    // whole burst to the commands after them.
    let mut ws = connect(&s, None).await.expect("connect");
    for i in 300..305 {
        let v = rpc(&mut ws, "conference.nope", json!({"conference": "c"}), i).await;
        assert_eq!(code(&v), -32601, "{v}");
    }
    for i in 305..310 {
        let v = rpc(&mut ws, "conference.list", json!({}), i).await;
        assert!(v["result"].is_object(), "a token was left for it: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_the_owner_and_fail_fast_without_it() {
    let s = setup(&[("CONFROUTE_RPC__COMMAND_TIMEOUT", "1s")]).await;
    let cfg = fixtures::single(&s.redis.url());
    let store = fixtures::store(&cfg);
    // "owned-a" lives on node-a (which answers), "owned-b" on node-b (nobody listens).
    store
        .claim(&"owned-a".parse().expect("name"), &[fixtures::id("node-a")])
        .await
        .expect("claim");
    store
        .claim(&"owned-b".parse().expect("name"), &[fixtures::id("node-b")])
        .await
        .expect("claim");
    let (node, mut commands) = Bus::node(fixtures::store(&cfg), &fixtures::id("node-a"));
    assert!(node.wait_connected(Duration::from_secs(10)).await);
    let responder = node.clone();
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            match cmd.method.as_str() {
                "participant.mute" if cmd.params["participant"] == "p1" => {
                    responder.respond(&cmd, Ok(json!({"muted": true}))).await
                }
                "participant.mute" => {
                    responder
                        .respond(
                            &cmd,
                            Err(BusError::new(
                                ErrorCode::ParticipantNotFound,
                                "no such participant",
                            )),
                        )
                        .await
                }
                "dialout" => {
                    answer_dialout(&responder, &cmd, "call-1").await;
                }
                _ => {
                    responder
                        .respond(&cmd, Err(BusError::new(ErrorCode::Internal, "unexpected")))
                        .await
                }
            }
        }
    });

    let mut ws = connect(&s, None).await.expect("connect");
    let v = rpc(
        &mut ws,
        "participant.mute",
        json!({"conference": "owned-a", "participant": "p1"}),
        1,
    )
    .await;
    assert_eq!(v["result"], json!({"muted": true}), "{v}");
    let v = rpc(
        &mut ws,
        "participant.mute",
        json!({"conference": "owned-a", "participant": "p9"}),
        2,
    )
    .await;
    assert_eq!(code(&v), -32002, "{v}");
    let v = rpc(
        &mut ws,
        "participant.mute",
        json!({"conference": "nowhere", "participant": "p1"}),
        3,
    )
    .await;
    assert_eq!(code(&v), -32001, "{v}");
    let started = std::time::Instant::now();
    let v = rpc(
        &mut ws,
        "participant.kick",
        json!({"conference": "owned-b", "participant": "p1"}),
        4,
    )
    .await;
    assert_eq!(code(&v), -32003, "{v}");
    // Fast: nobody heard it, so nothing was waited for (not the command's 1 s deadline).
    assert!(message(&v).contains("not listening"), "{v}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "node unavailable within the deadline"
    );

    let v = rpc(
        &mut ws,
        "dialout",
        json!({"conference": "owned-a", "to": "not a number"}),
        5,
    )
    .await;
    assert_eq!(code(&v), -32004, "{v}");
    assert_eq!(
        refused_dialout(&mut ws, &store, "fresh", "12", 6).await,
        -32004
    );

    let v = rpc(
        &mut ws,
        "dialout",
        json!({"conference": "owned-a", "to": "+15555550101"}),
        7,
    )
    .await;
    assert_eq!(v["result"], json!({"callid": "call-1"}), "{v}");
    let mut statuses = Vec::new();
    while statuses.len() < 3 {
        let n = recv(&mut ws).await;
        assert_eq!(n["method"], "dialout.status", "{n}");
        statuses.push(n["params"]["status"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(statuses, ["accepted", "ringing", "connected"]);

    // Events of subscribed conferences only, in order.
    assert!(
        rpc(&mut ws, "subscribe", json!({"conference": "owned-a"}), 8).await["result"].is_object()
    );
    for (conf, seq) in [
        ("other", 0),
        ("owned-a", 0),
        ("owned-a", 1),
        ("other", 1),
        ("owned-a", 2),
    ] {
        node.publish_event(&Event {
            conference: conf.into(),
            node: "node-a".into(),
            epoch: 1,
            seq,
            event: "join".into(),
            data: json!({"participant": format!("p{seq}")}),
        })
        .await;
    }
    for want in 0..3u64 {
        let n = recv(&mut ws).await;
        assert_eq!(n["method"], "event", "{n}");
        assert_eq!(n["params"]["conference"], "owned-a");
        assert_eq!(n["params"]["seq"], json!(want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_needs_the_token_when_one_is_set() {
    let s = setup(&[("CONFROUTE_HTTP__API_TOKEN", "rpc-token-0123456789")]).await;
    for bad in [None, Some("wrong-token-0123456789")] {
        match connect(&s, bad).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 401)
            }
            other => panic!(
                "upgrade without the token must fail with 401: {:?}",
                other.map(|_| ())
            ),
        }
    }
    let mut ws = connect(&s, Some("rpc-token-0123456789"))
        .await
        .expect("connect with token");
    assert!(rpc(&mut ws, "conference.list", json!({}), 1).await["result"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_closed_and_ponging_ones_kept() {
    let s = setup(&[("CONFROUTE_RPC__PING_INTERVAL", "1s")]).await;

    // A client that reads answers the server's pings (tungstenite pongs on read): after
    // several ping intervals it is still connected and served.
    let mut live = connect(&s, None).await.expect("connect");
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(4500);
    while let Ok(msg) = tokio::time::timeout_at(until, live.next()).await {
        match msg {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("only pings while idle, got {other:?}"),
        }
    }
    assert!(pings >= 3, "pinged every second: {pings}");
    ping(&mut live, 1).await;

    // A client that never reads never pongs: the server closes it after 2.5 intervals.
    let mut silent = connect(&s, None).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let ended = loop {
        match tokio::time::timeout_at(deadline, silent.next()).await {
            Err(_) => break false,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => break true,
            Ok(Some(Ok(_))) => {}
        }
    };
    assert!(ended, "the silent connection was closed by the server");
}

/// A client that keeps sending but reads nothing (a hung consumer whose kernel still
/// acknowledges) fills the socket buffers with answers; the server does not wait on it for
/// good: once no frame has been taken for 2.5 ping intervals it closes the connection and
/// drops what was queued, so reading again later finds the end of the stream, not every
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_is_closed_rather_than_waited_on() {
    let s = setup(&[
        ("CONFROUTE_RPC__PING_INTERVAL", "1s"),
        ("CONFROUTE_RPC__RATE_LIMIT", "1000000"),
        ("CONFROUTE_RPC__BURST", "1000000"),
    ])
    .await;
    let mut ws = connect(&s, None).await.expect("connect");
    // Answers echo their id: 1,000 of 60 kB each are more than loopback's socket buffers
    // (up to 32 MB + 4 MB here) hold.
    const SENT: usize = 1000;
    let pad = "x".repeat(60_000);
    for i in 0..SENT {
        let text =
            json!({"jsonrpc": "2.0", "method": "no.such.method", "id": format!("{i}-{pad}")})
                .to_string();
        // On a slow machine the sending may outlast the limit: the server closing the
        // connection under it is the behaviour this test looks for.
        if ws.send(Message::Text(text.into())).await.is_err() {
            break;
        }
    }
    // Reading nothing (and so answering no ping) for well past the 2.5 s limit.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut answers = 0;
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Err(_) => break false,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => break true,
            Ok(Some(Ok(Message::Text(_)))) => answers += 1,
            Ok(Some(Ok(_))) => {}
        }
    };
    assert!(ended, "the connection was closed");
    assert!(
        answers < SENT,
        "every answer waited for the client ({answers}): the server kept the connection"
    );
    // The controller is still serving.
    let mut fresh = connect(&s, None).await.expect("connect");
    ping(&mut fresh, 1).await;
}

/// `rpc.max_connections`: past it an upgrade is refused with 503 `too_many_connections`
/// (and `Retry-After`), and a closed connection frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_past_rpc_max_connections_are_refused_until_one_closes() {
    let s = setup(&[("CONFROUTE_RPC__MAX_CONNECTIONS", "1")]).await;
    let open = || async {
        fixtures::metric_opt(
            &fixtures::scrape(&s.controller.http_url()).await,
            "confroute_rpc_connections",
        )
    };
    assert_eq!(open().await, Some(0.0));
    let mut first = connect(&s, None).await.expect("connect");
    ping(&mut first, 1).await;
    assert_eq!(open().await, Some(1.0));
    match connect(&s, None).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503);
            assert!(resp.headers().contains_key("retry-after"), "{resp:?}");
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default())
                .expect("JSON error body");
            assert_eq!(body["error"]["code"], "too_many_connections", "{body}");
            assert!(fixtures::documented_error_codes()
                .iter()
                .any(|c| c == "too_many_connections"));
        }
        other => panic!(
            "a second connection past the limit: {:?}",
            other.map(|_| ())
        ),
    }
    first.close(None).await.expect("close");
    drop(first);
    wait_for_async(
        "the closed connection uncounted",
        Duration::from_secs(10),
        || async { (open().await == Some(0.0)).then_some(()) },
    )
    .await
    .expect("counted down");
    let mut again = wait_for_async(
        "a place freed by the close",
        Duration::from_secs(10),
        || async { connect(&s, None).await.ok() },
    )
    .await
    .expect("connects once the first is closed");
    ping(&mut again, 2).await;
}

/// A client subscribed to `conference`, and a node (kept listening) that has published
/// `sent` events of it with `pad` bytes of data each, none of them read by the client yet.
async fn flooded(
    s: &Setup,
    conference: &str,
    sent: u64,
    pad: usize,
) -> (
    Ws,
    (
        Bus,
        tokio::sync::mpsc::Receiver<confroute_shared::bus::Command>,
    ),
) {
    let store = fixtures::store(&fixtures::single(&s.redis.url()));
    let (node, commands) = Bus::node(store, &fixtures::id("node-a"));
    assert!(node.wait_connected(Duration::from_secs(10)).await);
    let mut ws = connect(s, None).await.expect("connect");
    assert!(
        rpc(&mut ws, "subscribe", json!({ "conference": conference }), 1).await["result"]
            .is_object()
    );
    let pad = "x".repeat(pad);
    for seq in 0..sent {
        node.publish_event(&Event {
            conference: conference.into(),
            node: "node-a".into(),
            epoch: 1,
            seq,
            event: "talking".into(),
            data: json!({ "pad": pad }),
        })
        .await;
    }
    (ws, (node, commands))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_too_slowly_is_told_how_many_events_it_lost() {
    // The client reads nothing (and so answers no ping) while the events pile up, which on
    // a loaded machine takes longer than the default silence limit.
    let s = setup(&[("CONFROUTE_RPC__PING_INTERVAL", "1h")]).await;
    // Far more than the connection's queue and socket buffers hold, read by nobody meanwhile.
    const SENT: u64 = 20_000;
    let (mut ws, _node) = flooded(&s, "loud", SENT, 1000).await;
    // Every event arrives or is counted as lost; the count comes though no event follows.
    let (mut events, mut lost) = (0u64, 0u64);
    while events + lost < SENT {
        let v = recv(&mut ws).await;
        match v["method"].as_str() {
            Some("event") => events += 1,
            Some("events.lost") => lost += v["params"]["count"].as_u64().expect("count"),
            _ => panic!("unexpected {v}"),
        }
    }
    assert_eq!(events + lost, SENT);
    assert!(lost > 0, "the client did lose events ({events} arrived)");
    // Counted as told (none of them to a dispatcher falling behind, unless it did).
    let m = fixtures::scrape(&s.controller.http_url()).await;
    let counted: f64 = ["slow_client", "dispatcher_lag"]
        .iter()
        .map(|r| {
            fixtures::metric(
                &m,
                &format!(r#"confroute_rpc_events_lost_total{{reason="{r}"}}"#),
            )
        })
        .sum();
    assert_eq!(counted, lost as f64, "{m}");
    ping(&mut ws, 2).await;
}

/// A node's notice that it could not publish some of a conference's events, reaching a
/// connection that already owes its own loss notice, is told after it with the node's count
/// and reason, not folded into the connection's count as one more lost event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_loss_notice_behind_a_slow_clients_keeps_its_count_and_reason() {
    let s = setup(&[("CONFROUTE_RPC__PING_INTERVAL", "1h")]).await;
    const SENT: u64 = 20_000;
    let (mut ws, (node, _commands)) = flooded(&s, "loud", SENT, 1000).await;
    node.publish_event(&Event {
        conference: "loud".into(),
        node: "node-a".into(),
        epoch: 1,
        seq: SENT,
        event: confroute_shared::bus::EVENTS_LOST.into(),
        data: json!({ "count": 7 }),
    })
    .await;
    let (mut events, mut slow, mut told) = (0u64, 0u64, None);
    while told.is_none() {
        let v = recv(&mut ws).await;
        match (v["method"].as_str(), v["params"]["reason"].as_str()) {
            (Some("event"), _) => events += 1,
            (Some("events.lost"), Some("slow_client")) => {
                slow += v["params"]["count"].as_u64().expect("count");
                // Folded, the node's notice would be the one event past those published.
                assert!(
                    events + slow <= SENT,
                    "the node's notice was counted as lost"
                );
            }
            (Some("events.lost"), Some("node_unpublished")) => told = Some(v),
            _ => panic!("unexpected {v}"),
        }
    }
    let told = told.expect("told");
    assert_eq!(told["params"]["count"], 7, "{told}");
    assert_eq!(told["params"]["conference"], "loud", "{told}");
    assert_eq!(told["params"]["node"], "node-a", "{told}");
    assert!(slow > 0, "the client did lose events ({events} arrived)");
    assert_eq!(
        events + slow,
        SENT,
        "every event arrived or was counted, before it"
    );
    ping(&mut ws, 2).await;
}

/// Events large enough to reach the 16 MiB bound on unwritten output before the queue's
/// slots run out are dropped and told in one `events.lost` once the client has read the
/// backlog, not in a notice per dropped event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_lost_past_the_byte_bound_are_told_in_one_notice() {
    let s = setup(&[("CONFROUTE_RPC__PING_INTERVAL", "1h")]).await;
    // 1,500 events of 32 KB: 48 MB, past the bound with the queue's 1,024 slots not full.
    const SENT: u64 = 1_500;
    let (mut ws, _node) = flooded(&s, "big", SENT, 32 * 1024).await;
    let (mut events, mut lost, mut notices) = (0u64, 0u64, 0u64);
    while events + lost < SENT {
        let v = recv(&mut ws).await;
        match v["method"].as_str() {
            Some("event") => events += 1,
            Some("events.lost") => {
                notices += 1;
                lost += v["params"]["count"].as_u64().expect("count");
            }
            _ => panic!("unexpected {v}"),
        }
    }
    assert!(lost > 0, "the client did lose events ({events} arrived)");
    assert!(
        notices <= 3,
        "{notices} notices for {lost} lost events ({events} arrived)"
    );
    ping(&mut ws, 2).await;
}

/// Events still queued for a connection when it unsubscribes are not sent after the
/// `unsubscribe` answer, and the connection, following nothing now, is told of no lost
/// events: it has nothing to re-read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_an_unfollowed_conference_comes_after_the_unsubscribe() {
    let s = setup(&[("CONFROUTE_RPC__PING_INTERVAL", "1h")]).await;
    // Not read meanwhile: more than the connection's queue holds.
    let (mut ws, _node) = flooded(&s, "busy", 3_000, 512).await;
    send(
        &mut ws,
        &json!({"jsonrpc": "2.0", "method": "unsubscribe",
                "params": {"conference": "busy"}, "id": 2})
        .to_string(),
    )
    .await;
    let mut before = 0u64;
    loop {
        let v = recv(&mut ws).await;
        if v["id"] == json!(2) {
            assert_eq!(v["result"]["was_subscribed"], true, "{v}");
            break;
        }
        before += 1;
    }
    // Everything sent after the answer, up to a request's answer.
    send(
        &mut ws,
        &json!({"jsonrpc": "2.0", "method": "conference.list", "params": {}, "id": 3}).to_string(),
    )
    .await;
    let v = recv(&mut ws).await;
    assert_eq!(
        v["id"],
        json!(3),
        "after the unsubscribe answer ({before} frames before it): {v}"
    );
}

/// `dialout.status` notifications come after the `{callid}` answer, as documented, also
/// when the dial-out is in a batch answered only once its slowest member is done: the node
/// sends `accepted` right after its answer, and a client must not see statuses of a call
/// id it has not been given yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_out_statuses_follow_the_answer_even_in_a_batch() {
    let s = setup(&[]).await;
    let (_store, node, mut commands) = hosted_on_node_a(&s, "batch").await;
    let (statuses_sent, mut sent) = tokio::sync::mpsc::unbounded_channel();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let responder = node.clone();
    tokio::spawn(async move {
        let mut released = Some(released);
        while let Some(cmd) = commands.recv().await {
            match cmd.method.as_str() {
                "dialout" => {
                    answer_dialout(&responder, &cmd, "call-9").await;
                    let _ = statuses_sent.send(());
                }
                // The batch's slow member: answered when the test says.
                _ => {
                    if let Some(r) = released.take() {
                        let _ = r.await;
                    }
                    responder
                        .respond(&cmd, Ok(json!({"participants": []})))
                        .await;
                }
            }
        }
    });

    let mut ws = connect(&s, None).await.expect("connect");
    let batch = json!([
        {"jsonrpc": "2.0", "method": "dialout",
         "params": {"conference": "batch", "to": "+15555550101"}, "id": 1},
        {"jsonrpc": "2.0", "method": "participant.list",
         "params": {"conference": "batch"}, "id": 2},
    ]);
    send(&mut ws, &batch.to_string()).await;
    sent.recv().await.expect("the node sent every status");
    // The statuses reached the controller; none may reach the client before the answer.
    let early = tokio::time::timeout(Duration::from_secs(1), ws.next()).await;
    assert!(
        early.is_err(),
        "a frame before the batch's answer: {early:?}"
    );
    release.send(()).expect("release");

    let answer = recv(&mut ws).await;
    let answers = answer.as_array().expect("the batch's answer comes first");
    assert_eq!(answers.len(), 2, "{answer}");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let v = recv(&mut ws).await;
        assert_eq!(v["method"], "dialout.status", "{v}");
        seen.push(v["params"]["status"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(seen, ["accepted", "ringing", "connected"]);
}

/// When the controller's subscription to Redis comes back after it was lost, the events
/// published meanwhile are unknown: a connection that follows a conference is told with one
/// `events.lost` (`reason: bus_reconnected`); one that follows none is told nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_are_told_when_the_bus_reconnects() {
    let s = setup(&[]).await;
    let mut follower = connect(&s, None).await.expect("connect");
    assert!(
        rpc(&mut follower, "subscribe", json!({"conference": "room"}), 1).await["result"]
            .is_object()
    );
    let mut idle = connect(&s, None).await.expect("connect");
    ping(&mut idle, 1).await;

    let killed: Option<i64> = confroute_tests::harness::redis_query(
        s.redis.port(),
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"),
    );
    assert!(
        killed.unwrap_or(0) >= 1,
        "the controller's subscription was cut"
    );

    let v = recv(&mut follower).await;
    assert_eq!(v["method"], "events.lost", "{v}");
    assert_eq!(v["params"]["reason"], "bus_reconnected", "{v}");
    assert!(v["params"]["count"].is_null(), "{v}");
    ping(&mut follower, 2).await;

    // The idle connection's next frame is the answer to its own request.
    send(
        &mut idle,
        &json!({"jsonrpc": "2.0", "method": "conference.list", "params": {}, "id": 2}).to_string(),
    )
    .await;
    let v = recv(&mut idle).await;
    assert_eq!(v["id"], 2, "nothing before the answer: {v}");
}

/// A dial-out into a conference with no home homes it first; when the chosen node never
/// hears the command (its agent is not listening), nothing was done, and the claim made for
/// it is given back rather than holding a seat on that node until its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_out_nobody_heard_gives_its_new_home_back() {
    let s = setup(&[]).await;
    let store = fixtures::store(&fixtures::single(&s.redis.url()));
    let mut ws = connect(&s, None).await.expect("connect");
    // The claim made for the dial-out is given back.
    assert_eq!(
        refused_dialout(&mut ws, &store, "unheard", "+15555550101", 1).await,
        -32003
    );
}

/// -32011: a dial-out into a conference with no home when no node has room (nothing is
/// placed), and any command while Redis cannot be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_node_with_room_or_no_redis_is_unavailable() {
    let mut s = setup(&[]).await;
    let store = fixtures::store(&fixtures::single(&s.redis.url()));
    store
        .claim(&"homed".parse().expect("name"), &[fixtures::id("node-a")])
        .await
        .expect("claim");
    for id in ["node-a", "node-b"] {
        let r = fixtures::http()
            .post(format!("{}/v1/nodes/{id}/drain", s.controller.http_url()))
            .send()
            .await
            .expect("drain");
        assert_eq!(r.status().as_u16(), 200);
    }
    let mut ws = connect(&s, None).await.expect("connect");
    let v = rpc(
        &mut ws,
        "dialout",
        json!({"conference": "roomless", "to": "+15555550100"}),
        1,
    )
    .await;
    assert_eq!(code(&v), -32011, "{v}");
    assert!(!message(&v).is_empty(), "{v}");
    let home = store
        .lookup(&"roomless".parse().expect("name"))
        .await
        .expect("lookup");
    assert_eq!(home, None, "nothing was placed");

    s.redis.kill();
    let v = rpc(
        &mut ws,
        "participant.mute",
        json!({"conference": "homed", "participant": "p1"}),
        2,
    )
    .await;
    assert_eq!(code(&v), -32011, "{v}");
}

/// A request whose params hold what the server cannot read (nested deeper than 128 levels)
/// is refused as invalid params, its id echoed; `conference.play` refuses a `participant`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_params_and_a_participant_for_conference_play_are_refused() {
    let s = setup(&[]).await;
    let mut ws = connect(&s, None).await.expect("connect");
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let req = format!(
        r#"{{"jsonrpc":"2.0","method":"conference.list","params":{{"after":{deep}}},"id":41}}"#
    );
    send(&mut ws, &req).await;
    let v = recv(&mut ws).await;
    assert_eq!((v["id"].clone(), code(&v)), (json!(41), -32602), "{v}");
    // Nested that deep outside params, it is no request at all.
    let req = format!(r#"{{"jsonrpc":"2.0","method":"ping","x":{deep},"id":42}}"#);
    send(&mut ws, &req).await;
    let v = recv(&mut ws).await;
    assert_eq!((v["id"].clone(), code(&v)), (json!(42), -32600), "{v}");
    let v = rpc(
        &mut ws,
        "conference.play",
        json!({"conference": "room", "participant": "p1", "media": "sound:beep"}),
        43,
    )
    .await;
    assert_eq!(code(&v), -32602, "{v}");
    assert!(message(&v).contains("participant"), "{v}");
    ping(&mut ws, 44).await;
}

/// A connection with `max(64, rpc.max_batch)` commands in progress gets -32008 for the next
/// one at once (nothing sent), and is not closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_past_the_in_progress_limit_are_refused_at_once() {
    let s = setup(&[
        ("CONFROUTE_RPC__COMMAND_TIMEOUT", "30s"),
        ("CONFROUTE_RPC__RATE_LIMIT", "100000"),
        ("CONFROUTE_RPC__BURST", "100000"),
    ])
    .await;
    let (store, node, mut commands) = hosted_on_node_a(&s, "busy-0").await;
    // One conference each: commands of different conferences do not wait for each other.
    for i in 1..=64 {
        store
            .claim(
                &format!("busy-{i}").parse().expect("name"),
                &[fixtures::id("node-a")],
            )
            .await
            .expect("claim");
    }
    let mut ws = connect(&s, None).await.expect("connect");
    let mute = |i: u64| {
        json!({"jsonrpc": "2.0", "method": "participant.mute", "id": i,
               "params": {"conference": format!("busy-{}", i.min(64)), "participant": "p"}})
        .to_string()
    };
    for i in 0..64 {
        send(&mut ws, &mute(i)).await;
    }
    // All 64 reach the (silent) node: they are in progress.
    let mut heard = Vec::new();
    for _ in 0..64 {
        heard.push(
            tokio::time::timeout(Duration::from_secs(10), commands.recv())
                .await
                .expect("the node hears the command")
                .expect("bus open"),
        );
    }
    send(&mut ws, &mute(100)).await;
    let v = recv(&mut ws).await;
    assert_eq!((v["id"].clone(), code(&v)), (json!(100), -32008), "{v}");
    assert!(message(&v).contains("in progress"), "{v}");
    // A marker after a slot is freed: the next command the node hears is the marker, so
    // the refused one was never sent.
    let first = heard
        .iter()
        .find(|c| c.params["conference"] == "busy-0")
        .expect("busy-0's command heard");
    node.respond(first, Ok(json!({"muted": true}))).await;
    let v = recv(&mut ws).await;
    assert_eq!(v["id"], json!(0), "{v}");
    send(
        &mut ws,
        &json!({"jsonrpc": "2.0", "method": "participant.mute", "id": 200,
                "params": {"conference": "busy-0", "participant": "marker"}})
        .to_string(),
    )
    .await;
    let next = tokio::time::timeout(Duration::from_secs(10), commands.recv())
        .await
        .expect("the node hears the marker")
        .expect("bus open");
    assert_eq!(
        next.params["participant"], "marker",
        "the refused command was not sent: {next:?}"
    );
}

/// Ids of the Redis clients holding a subscription now.
fn pubsub_clients(port: u16) -> Vec<String> {
    let list: String = confroute_tests::harness::redis_query(
        port,
        redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("pubsub"),
    )
    .unwrap_or_default();
    list.lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_string)
        .collect()
}

/// The controller's pub/sub connections to Redis, once it has subscribed.
async fn controller_subscriptions(s: &Setup) -> Vec<String> {
    confroute_tests::harness::wait_for_async(
        "the controller's subscription",
        Duration::from_secs(10),
        || async {
            let ids = pubsub_clients(s.redis.port());
            (!ids.is_empty()).then_some(ids)
        },
    )
    .await
    .expect("subscribed")
}

/// Cuts the pub/sub connections `ids` (a bus gap), leaving every other connection be.
fn cut_subscriptions(s: &Setup, ids: &[String]) {
    for id in ids {
        let _: Option<i64> = confroute_tests::harness::redis_query(
            s.redis.port(),
            redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id),
        );
    }
}

/// Statuses published while the controller's bus was reconnecting never reach it. Once it
/// is back, it asks the node where each dial-out it streams is: one that moved on is
/// reported at its new status (and not again when the node's own notice follows); one that
/// ended is reported `unknown` (`reason: bus_reconnected`), its last status being lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_out_streams_catch_up_with_their_node_after_a_bus_gap() {
    let s = setup(&[]).await;
    let controller_subs = controller_subscriptions(&s).await;
    let (store, node, mut commands) = hosted_on_node_a(&s, "gap-a").await;
    store
        .claim(&"gap-b".parse().expect("name"), &[fixtures::id("node-a")])
        .await
        .expect("claim");
    let responder = node.clone();
    let (tx, mut asked) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            match cmd.method.as_str() {
                "dialout" => {
                    let callid = if cmd.params["conference"] == "gap-a" {
                        "call-a"
                    } else {
                        "call-b"
                    };
                    responder.respond(&cmd, Ok(json!({"callid": callid}))).await;
                    responder
                        .notify(
                            &cmd.reply_to,
                            &cmd.id,
                            json!({"callid": callid, "status": "ringing"}),
                            false,
                        )
                        .await;
                    let _ = tx.send(format!("{} {}", cmd.id, cmd.reply_to));
                }
                "dialout.state" => {
                    // call-a was answered meanwhile; call-b ended.
                    let status = (cmd.params["callid"] == "call-a").then_some("connected");
                    responder.respond(&cmd, Ok(json!({"status": status}))).await;
                }
                _ => responder.respond(&cmd, Ok(json!({}))).await,
            }
        }
    });
    let mut ws = connect(&s, None).await.expect("connect");
    let mut streams = Vec::new();
    for (i, conf) in ["gap-a", "gap-b"].into_iter().enumerate() {
        let v = rpc(
            &mut ws,
            "dialout",
            json!({"conference": conf, "to": "+15555550101"}),
            i as u64 + 1,
        )
        .await;
        assert!(v["result"]["callid"].is_string(), "{v}");
        let ringing = recv(&mut ws).await;
        assert_eq!(ringing["params"]["status"], "ringing", "{ringing}");
        streams.push(asked.recv().await.expect("command seen"));
    }

    // Only the controller's subscription is cut.
    cut_subscriptions(&s, &controller_subs);
    let mut got = HashMap::new();
    while got.len() < 2 {
        let v = recv(&mut ws).await;
        assert_eq!(v["method"], "dialout.status", "{v}");
        let callid = v["params"]["callid"].as_str().unwrap_or("").to_string();
        got.insert(callid, v["params"].clone());
    }
    assert_eq!(
        got["call-a"],
        json!({"callid": "call-a", "status": "connected"})
    );
    assert_eq!(
        got["call-b"],
        json!({"callid": "call-b", "status": "unknown", "reason": "bus_reconnected"})
    );

    // The node's own notices for call-a go on: `connected` again is not repeated.
    let (id, reply_to) = streams[0].split_once(' ').expect("id and reply address");
    for (status, last) in [("connected", false), ("cleared", true)] {
        node.notify(
            reply_to,
            id,
            json!({"callid": "call-a", "status": status, "cause": 16}),
            last,
        )
        .await;
    }
    let v = recv(&mut ws).await;
    assert_eq!(v["params"]["status"], "cleared", "{v}");
    ping(&mut ws, 9).await;
}

/// A catch-up after a bus gap that the node did not answer (busy, its answer lost) is asked
/// again at the next audit, still for the gap: a dial-out found ended then is `unknown` with
/// `reason: bus_reconnected`, not `node_restarted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_the_node_did_not_answer_keeps_its_reason() {
    let s = setup(&[("CONFROUTE_RPC__COMMAND_TIMEOUT", "1s")]).await;
    let controller_subs = controller_subscriptions(&s).await;
    let (_store, node, mut commands) = hosted_on_node_a(&s, "gap-c").await;
    let responder = node.clone();
    tokio::spawn(async move {
        let mut states = 0;
        while let Some(cmd) = commands.recv().await {
            match cmd.method.as_str() {
                "dialout" => {
                    responder
                        .respond(&cmd, Ok(json!({"callid": "call-c"})))
                        .await;
                    responder
                        .notify(
                            &cmd.reply_to,
                            &cmd.id,
                            json!({"callid": "call-c", "status": "ringing"}),
                            false,
                        )
                        .await;
                }
                "dialout.state" => {
                    states += 1;
                    // The first ask, right after the gap, goes unanswered; the call ended.
                    if states > 1 {
                        responder.respond(&cmd, Ok(json!({"status": null}))).await;
                    }
                }
                _ => responder.respond(&cmd, Ok(json!({}))).await,
            }
        }
    });
    let mut ws = connect(&s, None).await.expect("connect");
    let v = rpc(
        &mut ws,
        "dialout",
        json!({"conference": "gap-c", "to": "+15555550101"}),
        1,
    )
    .await;
    assert!(v["result"]["callid"].is_string(), "{v}");
    let ringing = recv(&mut ws).await;
    assert_eq!(ringing["params"]["status"], "ringing", "{ringing}");
    cut_subscriptions(&s, &controller_subs);
    let v = recv(&mut ws).await;
    assert_eq!(
        v["params"],
        json!({"callid": "call-c", "status": "unknown", "reason": "bus_reconnected"}),
        "{v}"
    );
}

/// An agent restarted within its lease (its node never looked gone) no longer knows the
/// dial-outs of its last life, whose last statuses will never come: the controller asks the
/// node every few seconds, and ends such a stream with `unknown` (`reason: node_restarted`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_out_its_restarted_node_forgot_ends_its_stream() {
    let s = setup(&[]).await;
    let (_store, node, mut commands) = hosted_on_node_a(&s, "forgot").await;
    let responder = node.clone();
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            match cmd.method.as_str() {
                "dialout" => {
                    responder
                        .respond(&cmd, Ok(json!({"callid": "call-f"})))
                        .await;
                    responder
                        .notify(
                            &cmd.reply_to,
                            &cmd.id,
                            json!({"callid": "call-f", "status": "ringing"}),
                            false,
                        )
                        .await;
                }
                // The agent that answers now is a new life: it tracks no call.
                "dialout.state" => responder.respond(&cmd, Ok(json!({"status": null}))).await,
                _ => responder.respond(&cmd, Ok(json!({}))).await,
            }
        }
    });
    let mut ws = connect(&s, None).await.expect("connect");
    let v = rpc(
        &mut ws,
        "dialout",
        json!({"conference": "forgot", "to": "+15555550101"}),
        1,
    )
    .await;
    assert_eq!(v["result"]["callid"], "call-f", "{v}");
    let ringing = recv(&mut ws).await;
    assert_eq!(ringing["params"]["status"], "ringing", "{ringing}");
    let last = tokio::time::timeout(Duration::from_secs(15), recv(&mut ws))
        .await
        .expect("the stream ends");
    assert_eq!(
        last["params"],
        json!({"callid": "call-f", "status": "unknown", "reason": "node_restarted"}),
        "{last}"
    );
    ping(&mut ws, 2).await;
}

/// A dial-out whose node dies before its last status would stream nothing more, for as long
/// as the connection lives: once the node's lease is gone the stream ends with `unknown`
/// (`reason: node_lost`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_out_stream_ends_when_its_node_is_gone() {
    let s = setup(&[]).await;
    let (store, node, mut commands) = hosted_on_node_a(&s, "orphan").await;
    let responder = node.clone();
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            responder
                .respond(&cmd, Ok(json!({"callid": "call-7"})))
                .await;
            responder
                .notify(
                    &cmd.reply_to,
                    &cmd.id,
                    json!({"callid": "call-7", "status": "ringing"}),
                    false,
                )
                .await;
        }
    });
    let mut ws = connect(&s, None).await.expect("connect");
    let v = rpc(
        &mut ws,
        "dialout",
        json!({"conference": "orphan", "to": "+15555550101"}),
        1,
    )
    .await;
    assert_eq!(v["result"]["callid"], "call-7", "{v}");
    let ringing = recv(&mut ws).await;
    assert_eq!(ringing["params"]["status"], "ringing", "{ringing}");
    // The node dies: its record goes, and nothing more comes from it.
    store
        .deregister(&fixtures::id("node-a"))
        .await
        .expect("deregister");
    let last = recv(&mut ws).await;
    assert_eq!(last["method"], "dialout.status", "{last}");
    assert_eq!(last["params"]["status"], "unknown", "{last}");
    assert_eq!(last["params"]["reason"], "node_lost", "{last}");
    assert_eq!(last["params"]["callid"], "call-7", "{last}");
    ping(&mut ws, 2).await;
}

/// Commands for one conference sent back to back on one connection reach its node one at a
/// time, in the order they were sent (a mute then an unmute leaves the caller unmuted); a
/// command for another conference does not wait behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_for_one_conference_run_in_the_order_sent() {
    let s = setup(&[]).await;
    let (store, node, mut commands) = hosted_on_node_a(&s, "ordered").await;
    store
        .claim(&"other".parse().expect("name"), &[fixtures::id("node-a")])
        .await
        .expect("claim");
    // The node answers "ordered" commands 20 ms late and notes what it heard, and whether
    // one came while another was still unanswered.
    let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel::<(String, String, bool)>();
    let responder = node.clone();
    tokio::spawn(async move {
        let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        while let Some(cmd) = commands.recv().await {
            let conference = cmd.params["conference"].as_str().unwrap_or("").to_string();
            let participant = cmd.params["participant"].as_str().unwrap_or("").to_string();
            let overlapped =
                conference == "ordered" && busy.swap(true, std::sync::atomic::Ordering::SeqCst);
            let _ = heard_tx.send((conference.clone(), participant, overlapped));
            let (responder, busy) = (responder.clone(), busy.clone());
            tokio::spawn(async move {
                if conference == "ordered" {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    busy.store(false, std::sync::atomic::Ordering::SeqCst);
                }
                responder.respond(&cmd, Ok(json!({}))).await;
            });
        }
    });
    let mut ws = connect(&s, None).await.expect("connect");
    let mut frames = Vec::new();
    for i in 0..16u64 {
        let method = if i % 2 == 0 {
            "participant.mute"
        } else {
            "participant.unmute"
        };
        frames.push(json!({"jsonrpc": "2.0", "method": method, "id": i,
            "params": {"conference": "ordered", "participant": format!("p{i}")}}));
    }
    // A batch keeps its members' order too.
    let batch: Vec<Value> = (16..20u64)
        .map(|i| {
            json!({"jsonrpc": "2.0", "method": "participant.mute", "id": i,
            "params": {"conference": "ordered", "participant": format!("p{i}")}})
        })
        .collect();
    for f in &frames {
        send(&mut ws, &f.to_string()).await;
    }
    send(&mut ws, &Value::Array(batch).to_string()).await;
    send(
        &mut ws,
        &json!({"jsonrpc": "2.0", "method": "participant.mute", "id": 100,
            "params": {"conference": "other", "participant": "q"}})
        .to_string(),
    )
    .await;
    let mut order = Vec::new();
    let mut other_at = None;
    while order.len() < 20 || other_at.is_none() {
        let (conference, participant, overlapped) =
            tokio::time::timeout(Duration::from_secs(10), heard.recv())
                .await
                .expect("the node hears every command")
                .expect("node running");
        assert!(
            !overlapped,
            "{participant} reached the node before the command before it was answered"
        );
        if conference == "other" {
            other_at = Some(order.len());
        } else {
            order.push(participant);
        }
    }
    let sent: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
    assert_eq!(order, sent, "the node heard the commands out of order");
    assert!(
        other_at.is_some_and(|at| at < 20),
        "the other conference's command waited behind the first's ({other_at:?})"
    );
    // Every command is answered.
    let mut answered = 0;
    while answered < 21 {
        let v = recv(&mut ws).await;
        answered += v.as_array().map_or(1, Vec::len);
    }
}

/// A move is in line for its target too: a command for the target sent right after it waits
/// for the move's answer (it would otherwise miss the participant on its way there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_a_moves_target_waits_for_the_move() {
    let s = setup(&[]).await;
    let (store, node, mut commands) = hosted_on_node_a(&s, "from-room").await;
    store
        .claim(&"to-room".parse().expect("name"), &[fixtures::id("node-a")])
        .await
        .expect("claim");
    let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel::<(String, bool)>();
    let responder = node.clone();
    tokio::spawn(async move {
        let moving = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        while let Some(cmd) = commands.recv().await {
            let method = cmd.method.clone();
            let during_move = moving.load(std::sync::atomic::Ordering::SeqCst);
            if method != "participant.list" {
                let _ = heard_tx.send((method.clone(), during_move));
            }
            let (responder, moving) = (responder.clone(), moving.clone());
            tokio::spawn(async move {
                match method.as_str() {
                    "participant.list" => {
                        responder
                            .respond(&cmd, Ok(json!({"participants": [{"id": "p1"}]})))
                            .await
                    }
                    "participant.move" => {
                        moving.store(true, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        moving.store(false, std::sync::atomic::Ordering::SeqCst);
                        responder
                            .respond(&cmd, Ok(json!({"moved": "bridge"})))
                            .await
                    }
                    _ => responder.respond(&cmd, Ok(json!({}))).await,
                }
            });
        }
    });
    let mut ws = connect(&s, None).await.expect("connect");
    send(
        &mut ws,
        &json!({"jsonrpc": "2.0", "method": "participant.move", "id": 1,
            "params": {"conference": "from-room", "participant": "p1", "to": "to-room"}})
        .to_string(),
    )
    .await;
    send(
        &mut ws,
        &json!({"jsonrpc": "2.0", "method": "participant.mute", "id": 2,
            "params": {"conference": "to-room", "participant": "p1"}})
        .to_string(),
    )
    .await;
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(
            tokio::time::timeout(Duration::from_secs(10), heard.recv())
                .await
                .expect("the node hears both")
                .expect("node running"),
        );
    }
    assert_eq!(
        got,
        vec![
            ("participant.move".to_string(), false),
            ("participant.mute".to_string(), false)
        ],
        "the mute for the target came during the move"
    );
    for _ in 0..2 {
        let v = recv(&mut ws).await;
        assert!(v.get("result").is_some(), "{v}");
    }
}

/// A command whose turn does not come within `rpc.command_timeout` is answered `timeout` and
/// never reaches the node. With a 4 s timeout and a node that answers nothing: mute 1 holds
/// the conference's line 0–4 s; mutes 2 and 3 (sent at 0.5 s and 1 s) wait for it, give up
/// within their own timeout and are never sent, not even once the line frees: a fourth
/// command sent after every answer reaches the node right after mute 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_left_waiting_in_line_past_the_timeout_is_not_carried_out() {
    // Mute 1 holds the line 4 s; the others give up 2 s after they came, at 2.5 s and 3 s:
    // a second of slack for the gaps below.
    let s = setup(&[("CONFROUTE_RPC__COMMAND_TIMEOUT", "4s")]).await;
    let (_store, _node, mut commands) = hosted_on_node_a(&s, "slow-room").await;
    let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            let _ = heard_tx.send(cmd.params["participant"].as_str().unwrap_or("").to_string());
        }
    });
    let mut ws = connect(&s, None).await.expect("connect");
    let mute = |id: u64| {
        json!({"jsonrpc": "2.0", "method": "participant.mute", "id": id,
            "params": {"conference": "slow-room", "participant": format!("p{id}")}})
        .to_string()
    };
    send(&mut ws, &mute(1)).await;
    for (id, gap) in [(2, 500), (3, 500)] {
        // Gaps, not synchronisation: they space the waits' deadlines apart.
        tokio::time::sleep(Duration::from_millis(gap)).await;
        send(&mut ws, &mute(id)).await;
    }
    let mut answers = HashMap::new();
    while answers.len() < 3 {
        let v = recv(&mut ws).await;
        answers.insert(v["id"].as_u64().expect("id"), v);
    }
    assert_eq!(code(&answers[&1]), -32012, "{:?}", answers[&1]);
    // Mute 1 holds the line for the whole timeout: the others give up after half of it.
    for id in [2, 3] {
        assert_eq!(code(&answers[&id]), -32007, "{:?}", answers[&id]);
        assert!(
            answers[&id]["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("not carried out")),
            "{:?}",
            answers[&id]
        );
    }
    // A barrier: the conference's next command. Anything the ones that gave up sent would
    // reach the node before it.
    send(&mut ws, &mute(9)).await;
    let mut reached = Vec::new();
    while reached.last().is_none_or(|m| m != "p9") {
        let m = tokio::time::timeout(Duration::from_secs(10), heard.recv())
            .await
            .unwrap_or_else(|_| panic!("the barrier never reached the node: {reached:?}"))
            .expect("heard");
        reached.push(m);
    }
    assert_eq!(
        reached,
        ["p1", "p9"],
        "a command that gave up reached the node"
    );
}

/// A command that waited in line behind an earlier one of its conference takes to the node
/// only what is left of its `rpc.command_timeout`: the whole command, wait included, is
/// answered within one timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_waited_in_line_takes_what_is_left_of_the_timeout() {
    let s = setup(&[("CONFROUTE_RPC__COMMAND_TIMEOUT", "3s")]).await;
    let (_store, node, mut commands) = hosted_on_node_a(&s, "line-room").await;
    let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            let who = cmd.params["participant"].as_str().unwrap_or("").to_string();
            let _ = heard_tx.send((who.clone(), cmd.timeout_ms));
            // The first is answered after 1 s; the second never.
            if who == "p1" {
                let node = node.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    node.respond(&cmd, Ok(json!({}))).await
                });
            }
        }
    });
    let mut ws = connect(&s, None).await.expect("connect");
    for id in [1, 2] {
        send(
            &mut ws,
            &json!({"jsonrpc": "2.0", "method": "participant.mute", "id": id,
                "params": {"conference": "line-room", "participant": format!("p{id}")}})
            .to_string(),
        )
        .await;
    }
    let mut answers = HashMap::new();
    while answers.len() < 2 {
        let v = recv(&mut ws).await;
        answers.insert(v["id"].as_u64().expect("id"), v);
    }
    assert!(answers[&1].get("result").is_some(), "{:?}", answers[&1]);
    assert_eq!(code(&answers[&2]), -32012, "{:?}", answers[&2]);
    let first = heard.recv().await.expect("p1 reached the node");
    let second = heard.recv().await.expect("p2 reached the node");
    assert_eq!((first.0.as_str(), second.0.as_str()), ("p1", "p2"));
    assert!(first.1 <= 3000, "{first:?}");
    // p2 waited about the 1 s p1 took (less how much later it came): about 2 s of the 3
    // are left for it, where a fresh timeout would be all 3.
    assert!(second.1 <= 2500, "p2 was given {} ms", second.1);
}

/// A move's participant check, its target's homing and the move share one
/// `rpc.command_timeout`: the move reaches the node with what the check left of it, so a
/// slow check cannot stretch the command to twice the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_gets_one_command_timeout_in_all() {
    let s = setup(&[("CONFROUTE_RPC__COMMAND_TIMEOUT", "3s")]).await;
    let (store, node, mut commands) = hosted_on_node_a(&s, "slow-check").await;
    store
        .claim(
            &"elsewhere".parse().expect("name"),
            &[fixtures::id("node-a")],
        )
        .await
        .expect("claim");
    let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let responder = node.clone();
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            let _ = heard_tx.send((cmd.method.clone(), cmd.timeout_ms));
            if cmd.method == "participant.list" {
                let responder = responder.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    responder
                        .respond(&cmd, Ok(json!({"participants": [{"id": "p1"}]})))
                        .await
                });
            }
        }
    });
    let mut ws = connect(&s, None).await.expect("connect");
    send(
        &mut ws,
        &json!({"jsonrpc": "2.0", "method": "participant.move", "id": 1,
            "params": {"conference": "slow-check", "participant": "p1", "to": "elsewhere"}})
        .to_string(),
    )
    .await;
    let answer = recv(&mut ws).await;
    assert_eq!(
        code(&answer),
        -32012,
        "the node never answers the move: {answer}"
    );
    let mut reached = Vec::new();
    while let Ok(m) = heard.try_recv() {
        reached.push(m);
    }
    assert_eq!(reached.len(), 2, "{reached:?}");
    assert_eq!(reached[0].0, "participant.list");
    assert!(reached[0].1 <= 3000, "{reached:?}");
    let (method, budget) = &reached[1];
    assert_eq!(method, "participant.move");
    // The check took 2 s of the 3: at most 1 s is left for the move itself.
    assert!(*budget <= 1000, "the move was given {budget} ms");
}

/// A move whose participant check gets no answer was never sent: it is refused `timeout`
/// (nothing done), not `no_answer` (may have been done), and its target is not homed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_whose_check_gets_no_answer_says_nothing_was_done() {
    let s = setup(&[("CONFROUTE_RPC__COMMAND_TIMEOUT", "1s")]).await;
    let (store, _node, mut commands) = hosted_on_node_a(&s, "unchecked").await;
    let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
    // The node hears the check and never answers it.
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            let _ = heard_tx.send(cmd.method.clone());
        }
    });
    let mut ws = connect(&s, None).await.expect("connect");
    send(
        &mut ws,
        &json!({"jsonrpc": "2.0", "method": "participant.move", "id": 1,
            "params": {"conference": "unchecked", "participant": "p1", "to": "never-homed"}})
        .to_string(),
    )
    .await;
    let answer = recv(&mut ws).await;
    assert_eq!(code(&answer), -32007, "nothing was done: {answer}");
    // A barrier: the conference's next command. A move sent after all would reach the node
    // before it.
    send(
        &mut ws,
        &json!({"jsonrpc": "2.0", "method": "participant.mute", "id": 2,
            "params": {"conference": "unchecked", "participant": "p1"}})
        .to_string(),
    )
    .await;
    let mut reached = Vec::new();
    while reached.last().is_none_or(|m| m != "participant.mute") {
        let m = tokio::time::timeout(Duration::from_secs(10), heard.recv())
            .await
            .unwrap_or_else(|_| panic!("the barrier never reached the node: {reached:?}"))
            .expect("heard");
        reached.push(m);
    }
    assert_eq!(reached, ["participant.list", "participant.mute"]);
    let home = store
        .lookup(&"never-homed".parse().expect("name"))
        .await
        .expect("lookup");
    assert_eq!(home, None);
}

/// A raw WebSocket connection to the controller's `/v1/rpc`, upgraded, for frames no client
/// library sends.
/// Bytes waiting unread in the receive queue of the IPv4 loopback socket on `port` whose
/// peer is on `peer` (from `/proc/net/tcp`).
fn unread_bytes(port: u16, peer: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
        let remote = u16::from_str_radix(f.get(2)?.rsplit(':').next()?, 16).ok()?;
        if local != port || remote != peer {
            return None;
        }
        u64::from_str_radix(f.get(4)?.rsplit(':').next()?, 16).ok()
    })
}

async fn raw_ws(s: &Setup) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.controller.http_port))
        .await
        .expect("connect");
    tcp.write_all(
        b"GET /v1/rpc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .expect("upgrade request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.expect("upgrade answer");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// A masked client frame: FIN, `opcode`, `payload` (the mask is zero, which leaves the
/// payload as is).
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Reads server frames until a close frame; its status code (`Some(None)` for a close without
/// one), or `None` if the connection ended without a close frame or nothing came in time.
async fn close_code_of(tcp: &mut tokio::net::TcpStream) -> Option<Option<u16>> {
    frames_until_close(tcp, &mut Vec::new()).await
}

/// [`close_code_of`], keeping the text frames that came before the close in `texts`.
async fn frames_until_close(
    tcp: &mut tokio::net::TcpStream,
    texts: &mut Vec<String>,
) -> Option<Option<u16>> {
    use tokio::io::AsyncReadExt;
    let read = async {
        loop {
            let mut h = [0u8; 2];
            tcp.read_exact(&mut h).await.ok()?;
            let mut len = u64::from(h[1] & 0x7f);
            if len == 126 {
                let mut l = [0u8; 2];
                tcp.read_exact(&mut l).await.ok()?;
                len = u64::from(u16::from_be_bytes(l));
            } else if len == 127 {
                let mut l = [0u8; 8];
                tcp.read_exact(&mut l).await.ok()?;
                len = u64::from_be_bytes(l);
            }
            let mut payload = vec![0u8; usize::try_from(len).ok()?];
            tcp.read_exact(&mut payload).await.ok()?;
            if h[0] & 0x0f == 0x1 {
                texts.push(String::from_utf8_lossy(&payload).into_owned());
            }
            if h[0] & 0x0f == 0x8 {
                return Some(
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
                );
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
}

/// Frames the WebSocket layer refuses end the connection with the status code RFC 6455
/// §7.4.1 gives their fault, so a client can tell why; a frame announcing more than the cap
/// (16× `rpc.max_message_size`, at least 1 MiB) is refused from its header, before its
/// payload is taken in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_frames_close_with_the_status_code_of_their_fault() {
    use tokio::io::AsyncWriteExt;
    let s = setup(&[]).await;
    let unmasked = {
        let mut f = frame(0x1, b"{}");
        f[1] &= 0x7f;
        f.truncate(2);
        f.extend_from_slice(b"{}");
        f
    };
    let huge = {
        // A text frame announcing 2 MiB: only its header is sent.
        let mut f = vec![0x81, 0x80 | 127];
        f.extend_from_slice(&(2u64 << 20).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]);
        f
    };
    let cases: [(&str, Vec<u8>, u16); 5] = [
        ("text that is not UTF-8", frame(0x1, &[0xff, 0xfe]), 1007),
        ("an unmasked client frame", unmasked, 1002),
        ("a reserved opcode", frame(0x3, b"x"), 1002),
        ("a ping over 125 bytes", frame(0x9, &[b'p'; 126]), 1002),
        ("a frame over the cap", huge, 1009),
    ];
    for (what, bytes, want) in cases {
        let mut tcp = raw_ws(&s).await;
        tcp.write_all(&bytes).await.expect("write");
        assert_eq!(close_code_of(&mut tcp).await, Some(Some(want)), "{what}");
    }
    // A good frame on a fresh connection is still answered.
    let mut ws = connect(&s, None).await.expect("connect");
    ping(&mut ws, 1).await;
}

/// A controller that is stopped closes its call-control connections with 1001 (going away),
/// so clients reconnect elsewhere knowing it was no crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_controller_closes_its_websockets_with_going_away() {
    use tokio::io::AsyncWriteExt;
    let mut s = setup(&[]).await;
    let mut tcp = raw_ws(&s).await;
    let list = json!({"jsonrpc": "2.0", "method": "conference.list", "id": 1}).to_string();
    tcp.write_all(&frame(0x1, list.as_bytes()))
        .await
        .expect("write");
    s.controller
        .process()
        .signal(15)
        .expect("SIGTERM the controller");
    assert_eq!(close_code_of(&mut tcp).await, Some(Some(1001)));
    let exited = s
        .controller
        .process()
        .wait_exit(Duration::from_secs(10))
        .expect("wait");
    assert_eq!(exited, Some(0), "{}", s.controller.output());
}

/// An upgrade asking for another WebSocket version is answered 426 with the version spoken
/// here (RFC 6455 §4.2.2), so the client can retry with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_for_another_websocket_version_is_told_version_13() {
    let s = setup(&[]).await;
    let r = fixtures::http()
        .get(format!("{}/v1/rpc", s.controller.http_url()))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "8")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 426);
    assert_eq!(
        r.headers()
            .get("sec-websocket-version")
            .and_then(|v| v.to_str().ok()),
        Some("13")
    );
    // RFC 9110 §15.5.22: a 426 names the protocol to upgrade to, and §7.8 lists `upgrade`
    // in Connection with it.
    assert_eq!(
        r.headers().get("upgrade").and_then(|v| v.to_str().ok()),
        Some("websocket")
    );
    assert!(
        r.headers()
            .get("connection")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade")),
        "{:?}",
        r.headers()
    );
    let body: Value = r.json().await.expect("JSON error body");
    assert_eq!(body["error"]["code"], "upgrade_required", "{body}");
}

/// A client that sends a burst of requests and then drops its connection with a reset: the
/// answers can no longer be written, and the connection's slot is freed all the same, with
/// the requests still buffered unread, rather than its tasks waiting on each other for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_after_a_burst_frees_its_connection_slot() {
    use tokio::io::AsyncWriteExt;
    let s = setup(&[("CONFROUTE_RPC__MAX_CONNECTIONS", "1")]).await;
    let mut tcp = raw_ws(&s).await;
    let mut burst = Vec::new();
    for id in 0..1400 {
        let req = json!({"jsonrpc": "2.0", "method": "conference.list", "id": id}).to_string();
        burst.extend_from_slice(&frame(0x1, req.as_bytes()));
    }
    tcp.write_all(&burst).await.expect("write the burst");
    tcp.set_zero_linger().expect("linger 0");
    drop(tcp);
    wait_for_async(
        "the connection slot freed",
        Duration::from_secs(20),
        || async {
            let mut ws = connect(&s, None).await.ok()?;
            ping(&mut ws, 1).await;
            Some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.controller.output()));
}

/// A stopping controller still delivers answers that come in soon after (within 2 s), then
/// closes with 1001 even while a command is still waiting on its node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_controller_waits_briefly_for_answers_then_closes() {
    use tokio::io::AsyncWriteExt;
    let mut s = setup(&[("CONFROUTE_RPC__COMMAND_TIMEOUT", "30s")]).await;
    let (store, node, mut commands) = hosted_on_node_a(&s, "grace-7").await;
    store
        .claim(&"grace-8".parse().expect("name"), &[fixtures::id("node-a")])
        .await
        .expect("claim");
    let mut tcp = raw_ws(&s).await;
    // Two conferences: commands of one conference wait for each other.
    for id in [7, 8] {
        let req = json!({"jsonrpc": "2.0", "method": "participant.mute",
                         "params": {"conference": format!("grace-{id}"), "participant": format!("p{id}")}, "id": id});
        tcp.write_all(&frame(0x1, req.to_string().as_bytes()))
            .await
            .expect("write");
    }
    let mut heard = Vec::new();
    for _ in 0..2 {
        heard.push(
            tokio::time::timeout(Duration::from_secs(10), commands.recv())
                .await
                .expect("the node hears the command")
                .expect("bus open"),
        );
    }
    s.controller
        .process()
        .signal(15)
        .expect("SIGTERM the controller");
    wait_for("the controller stopping", Duration::from_secs(10), || {
        s.controller.output().contains("stopping").then_some(())
    })
    .expect("stopping");
    // One answer comes soon; the other never does.
    let quick = heard
        .iter()
        .find(|c| c.params["participant"] == "p7")
        .expect("p7's command");
    node.respond(quick, Ok(json!({"muted": true}))).await;
    let mut texts = Vec::new();
    assert_eq!(
        frames_until_close(&mut tcp, &mut texts).await,
        Some(Some(1001))
    );
    let answers: Vec<Value> = texts
        .iter()
        .filter_map(|t| serde_json::from_str(t).ok())
        .collect();
    assert!(
        answers
            .iter()
            .any(|a| a["id"] == 7 && a.get("result").is_some()),
        "{texts:?}"
    );
}

/// A connection with every one of its 256 frame slots taken by commands waiting on a node
/// that does not answer still hears its controller stop, and is closed with 1001, not cut
/// off when the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_every_frame_slot_taken_is_closed_1001_at_a_stop() {
    use tokio::io::AsyncWriteExt;
    let mut s = setup(&[
        ("CONFROUTE_RPC__COMMAND_TIMEOUT", "60s"),
        ("CONFROUTE_RPC__RATE_LIMIT", "100000"),
        ("CONFROUTE_RPC__BURST", "100000"),
    ])
    .await;
    let (_store, _node, mut commands) = hosted_on_node_a(&s, "full-slots").await;
    let mut tcp = raw_ws(&s).await;
    // Commands of one conference wait in line, each holding its frame's slot: the reader
    // waits for a free one at the 257th, and the ping after them goes unanswered.
    for id in 0..300 {
        let req = json!({"jsonrpc": "2.0", "method": "participant.mute",
                         "params": {"conference": "full-slots", "participant": format!("p{id}")}, "id": id});
        tcp.write_all(&frame(0x1, req.to_string().as_bytes()))
            .await
            .expect("write");
    }
    let ping = json!({"jsonrpc": "2.0", "method": "ping", "id": "after"});
    tcp.write_all(&frame(0x1, ping.to_string().as_bytes()))
        .await
        .expect("write");
    tokio::time::timeout(Duration::from_secs(10), commands.recv())
        .await
        .expect("the node hears the first command")
        .expect("bus open");
    // The reader has taken up what it could and waits for a slot: the controller's side of
    // the socket keeps unread bytes (the frames past the 256th and the ping), no longer
    // shrinking. A stop before that would be seen by its outer loop, and the test would
    // prove nothing.
    let local = tcp.local_addr().expect("local address").port();
    let unread = || unread_bytes(s.controller.http_port, local);
    wait_for_async(
        "the reader waiting for a slot",
        Duration::from_secs(10),
        || async {
            let before = unread()?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            (before > 0 && unread() == Some(before)).then_some(())
        },
    )
    .await
    .expect("the reader stops with frames unread");
    s.controller
        .process()
        .signal(15)
        .expect("SIGTERM the controller");
    let mut texts = Vec::new();
    assert_eq!(
        frames_until_close(&mut tcp, &mut texts).await,
        Some(Some(1001)),
        "{texts:?}"
    );
    assert!(
        !texts.iter().any(|t| t.contains(r#""id":"after""#)),
        "the ping was read: the reader never waited for a slot: {texts:?}"
    );
}

/// An answer carries its request's id exactly as written (JSON-RPC 2.0 §5): numbers a JSON
/// reader would turn into floats or round come back as sent, alone, in a batch, and in the
/// error answer to an invalid request, even one refused for a number beyond a double's range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_echo_their_request_ids_exactly_as_written() {
    let s = setup(&[]).await;
    let mut ws = connect(&s, None).await.expect("connect");
    for id in [
        "12345678901234567890123",
        "1e3",
        "1.50",
        "-0",
        r#""\u00e9""#,
    ] {
        send(
            &mut ws,
            &format!(r#"{{"jsonrpc":"2.0","method":"conference.list","id":{id}}}"#),
        )
        .await;
        let answer = next_text(&mut ws).await;
        assert!(answer.contains(&format!(r#""id":{id}"#)), "{id}: {answer}");
        assert!(answer.contains(r#""result""#), "{answer}");
        send(
            &mut ws,
            &format!(
                r#"[{{"jsonrpc":"2.0","method":"conference.list","id":{id}}},{{"jsonrpc":"1.0","method":"x","id":{id}}}]"#
            ),
        )
        .await;
        let batch = next_text(&mut ws).await;
        assert_eq!(
            batch.matches(&format!(r#""id":{id}"#)).count(),
            2,
            "{id}: {batch}"
        );
    }
    // Valid JSON holding a number no double holds: refused as a request (-32600), not as
    // unparseable (-32700), with the id as written.
    send(
        &mut ws,
        r#"{"jsonrpc":"2.0","method":"conference.list","params":{"limit":1e999},"id":1e400}"#,
    )
    .await;
    let answer = next_text(&mut ws).await;
    assert!(
        answer.contains(r#""id":1e400"#) && answer.contains(r#""code":-32600"#),
        "{answer}"
    );
}

/// The next text frame, as written.
async fn next_text(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an answer in time")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = msg {
            return t.as_str().to_string();
        }
    }
}

/// A Redis whose ACL refuses the controller's channels: routing goes on and the controller
/// stays ready (its SIP Service must not lose it), `/readyz` says the bus is down, the log
/// says why, and a command is refused at once as not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_refusing_the_subscription_leaves_routing_up_and_commands_refused() {
    let redis = RedisServer::start().expect("redis");
    let admin = fixtures::single(&redis.url());
    let store = fixtures::store(&admin);
    store
        .register(&fixtures::node("node-a", 100), Duration::from_secs(300))
        .await
        .expect("register");
    // The keys and channels under the prefix, as docs/configuration.md asks: the bus is up.
    let acl = |user: &str, rules: &[&str]| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER")
            .arg(user)
            .arg("on")
            .arg(">secret")
            .arg(rules);
        let _: String =
            confroute_tests::harness::redis_query(redis.port(), &mut cmd).expect("acl user");
    };
    let prefix = admin.prefix.clone();
    acl(
        "scoped",
        &[&format!("~{prefix}*"), &format!("&{prefix}*"), "+@all"],
    );
    let as_user = |user: &str| confroute_shared::config::RedisConfig {
        prefix: prefix.clone(),
        ..fixtures::single(&format!("redis://{user}:secret@127.0.0.1:{}", redis.port()))
    };
    let scoped =
        ControllerProc::start(&fixtures::redis_env(&as_user("scoped"))).expect("controller");
    fixtures::wait_ready(&scoped.http_url())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", scoped.output()));
    drop(scoped);
    // Every key and command, no channel.
    acl("router", &["~*", "+@all", "resetchannels"]);
    let cfg = as_user("router");
    let controller = ControllerProc::start(&fixtures::redis_env(&cfg)).expect("controller");
    let base = controller.http_url();
    wait_for_async(
        "the controller to log the refused subscription",
        Duration::from_secs(20),
        || async {
            // The warning, not the debug line every try writes (RUST_LOG may show it).
            controller
                .output()
                .contains("call control is unavailable until it does")
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", controller.output()));
    let ready = fixtures::http()
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.expect("readyz JSON");
    assert_eq!(
        body,
        json!({"status": "ready", "redis": true, "sip": true, "bus": false})
    );
    assert_eq!(fixtures::route_node(&base, "acl-room").await, "node-a");
    let s = Setup { redis, controller };
    let mut ws = connect(&s, None).await.expect("connect");
    let v = rpc(
        &mut ws,
        "participant.list",
        json!({"conference": "acl-room"}),
        1,
    )
    .await;
    assert_eq!(v["error"]["code"], -32003, "{v}");
    assert!(message(&v).contains("nothing was sent"), "{v}");
    // A dial-out into a conference nobody has reached yet is refused before it is homed: a
    // claim made and given back would leave the name's next life a higher epoch.
    let claimed = r#"confroute_route_total{outcome="claimed"}"#;
    let before = fixtures::metric(&fixtures::scrape(&base).await, claimed);
    let v = rpc(
        &mut ws,
        "dialout",
        json!({"conference": "unhomed-room", "to": "+15555550101"}),
        3,
    )
    .await;
    assert_eq!(v["error"]["code"], -32003, "{v}");
    assert!(message(&v).contains("nothing was sent"), "{v}");
    assert_eq!(
        fixtures::metric(&fixtures::scrape(&base).await, claimed),
        before,
        "a conference was claimed for a dial-out that could not be sent"
    );
    assert_eq!(
        s.redis.query(redis::cmd("KEYS").arg("*unhomed-room*")),
        Some(redis::Value::Array(vec![])),
        "keys left for the refused dial-out's conference"
    );
    // A client that follows a conference meanwhile missed whatever was published: once
    // Redis lets the controller subscribe, it is told to re-read.
    let v = rpc(&mut ws, "subscribe", json!({"conference": "acl-room"}), 4).await;
    assert!(v["result"].is_object(), "{v}");
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER").arg("router").arg("allchannels");
    let _: String =
        confroute_tests::harness::redis_query(s.redis.port(), &mut cmd).expect("acl channels");
    let v = tokio::time::timeout(Duration::from_secs(20), recv(&mut ws))
        .await
        .unwrap_or_else(|_| panic!("no notice once subscribed\n{}", s.controller.output()));
    assert_eq!(v["method"], "events.lost", "{v}");
    assert_eq!(v["params"]["reason"], "bus_reconnected", "{v}");
}

/// A REST dial-out runs to its end even when its client hangs up first: the node's late
/// refusal still gives back the home the dial-out claimed, as it does for a client that
/// waits. Cut short with the request, it left an empty claim holding a seat on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_dial_out_whose_client_hung_up_still_gives_its_new_home_back() {
    let s = setup(&[]).await;
    let cfg = fixtures::single(&s.redis.url());
    let store = fixtures::store(&cfg);
    // Only node-a takes the new conference; its agent answers late, with a refusal.
    store
        .set_state(
            &fixtures::id("node-b"),
            confroute_shared::types::NodeState::Draining,
        )
        .await
        .expect("drain node-b");
    let (node, mut commands) = Bus::node(fixtures::store(&cfg), &fixtures::id("node-a"));
    assert!(node.wait_connected(Duration::from_secs(10)).await);
    let (hung_up, client_gone) = tokio::sync::oneshot::channel::<()>();
    let (answered, node_answered) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if let Some(cmd) = commands.recv().await {
            // The node answers only once the client has given up.
            let _ = client_gone.await;
            node.respond(
                &cmd,
                Err(BusError::new(ErrorCode::Forbidden, "no dial template")),
            )
            .await;
            let _ = answered.send(());
        }
    });
    let name: confroute_shared::name::ConferenceName = "late-refusal".parse().expect("name");
    let sent = fixtures::http()
        .post(format!(
            "{}/v1/conferences/late-refusal/participants",
            s.controller.http_url()
        ))
        .json(&json!({"to": "+15555550101"}))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(
        sent.as_ref().is_err_and(|e| e.is_timeout()),
        "the client gives up first: {sent:?}"
    );
    assert!(
        store.lookup(&name).await.expect("lookup").is_some(),
        "homed for the dial-out"
    );
    let _ = hung_up.send(());
    node_answered.await.expect("the node answered");
    wait_for_async("the home given back", Duration::from_secs(5), || async {
        store.lookup(&name).await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.controller.output()));
}

/// A client that asks for large answers and does not read them is disconnected (1008) once
/// 16 MiB of them wait to be written, rather than having its controller hold them all: here
/// 300 pages of 1000 conferences, about 60 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_large_answers_unread_is_disconnected() {
    let s = setup(&[
        ("CONFROUTE_RPC__RATE_LIMIT", "100000"),
        ("CONFROUTE_RPC__BURST", "100000"),
        // Room for all the requests in progress at once (the limit is the larger of 64
        // and the batch limit).
        ("CONFROUTE_RPC__MAX_BATCH", "1000"),
        // 300 pages of 1000 asked at once keep Redis busy for a while.
        ("CONFROUTE_REDIS__TIMEOUT", "30s"),
    ])
    .await;
    let store = fixtures::store(&confroute_shared::config::RedisConfig {
        claim_lease: Duration::from_secs(600),
        ..fixtures::single(&s.redis.url())
    });
    store
        .register(
            &fixtures::node("node-big", 100_000),
            Duration::from_secs(300),
        )
        .await
        .expect("register");
    for i in 0..1000 {
        let name = format!("a-conference-with-a-long-name-{i:04}")
            .parse()
            .expect("name");
        store
            .claim(&name, &[fixtures::id("node-big")])
            .await
            .expect("claim");
    }
    // A small receive buffer, so what the client leaves unread stays at the controller and
    // not in the kernel (whose loopback buffers can take tens of MB).
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
    let tcp = socket
        .connect(([127, 0, 0, 1], s.controller.http_port).into())
        .await
        .expect("connect");
    let url = format!("ws://127.0.0.1:{}/v1/rpc", s.controller.http_port);
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp)
        .await
        .expect("upgrade");
    const ASKED: u64 = 300;
    for id in 0..ASKED {
        let req = json!({"jsonrpc": "2.0", "method": "conference.list",
                         "params": {"limit": 1000}, "id": id});
        ws.send(Message::Text(req.to_string().into()))
            .await
            .expect("send");
    }
    // The client reads nothing until the controller says it closes the connection.
    wait_for_async(
        "the connection closed for unread answers",
        Duration::from_secs(60),
        || async {
            s.controller
                .output()
                .contains("answers and events not read")
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.controller.output()));
    let mut answers = 0;
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Text(_)) => answers += 1,
                Ok(Message::Close(frame)) => return frame,
                Ok(_) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        None
    })
    .await
    .unwrap_or_else(|_| panic!("not closed after {answers} answers"));
    let frame = closed.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1008, "{frame:?}");
    assert!(frame.reason.contains("not read"), "{frame:?}");
    assert!(answers < ASKED, "every answer was held for the client");
}

/// The Redis lookup that finds a command's node counts against its `rpc.command_timeout`:
/// the node is given only what is left, so the answer (and anything the node does) comes
/// within one timeout of the command's arrival, not a lookup later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_lookup_leaves_the_node_only_what_is_left_of_the_timeout() {
    let redis = RedisServer::start().expect("redis");
    let upstream = format!("127.0.0.1:{}", redis.port())
        .parse()
        .expect("address");
    let proxy = confroute_tests::harness::TcpProxy::start(upstream)
        .await
        .expect("proxy");
    let s = Setup {
        controller: {
            let mut env = fixtures::redis_env(&fixtures::single(&proxy.redis_url()));
            env.extend([
                (
                    "CONFROUTE_RPC__COMMAND_TIMEOUT".to_string(),
                    "2s".to_string(),
                ),
                ("CONFROUTE_REDIS__TIMEOUT".to_string(), "3s".to_string()),
            ]);
            let store = fixtures::store(&fixtures::single(&redis.url()));
            store
                .register(&fixtures::node("node-a", 100), Duration::from_secs(300))
                .await
                .expect("register");
            let controller = ControllerProc::start(&env).expect("controller");
            fixtures::wait_ready(&controller.http_url())
                .await
                .expect("controller ready");
            controller
        },
        redis,
    };
    let (_store, node, mut commands) = hosted_on_node_a(&s, "slow-lookup").await;
    let mut ws = connect(&s, None).await.expect("connect");
    // Each way 300 ms: the lookup takes at least 600 ms of the 2 s.
    proxy.set_delay(Duration::from_millis(300));
    send(
        &mut ws,
        &json!({"jsonrpc": "2.0", "method": "participant.mute",
                "params": {"conference": "slow-lookup", "participant": "p1"}, "id": 1})
        .to_string(),
    )
    .await;
    let cmd = tokio::time::timeout(Duration::from_secs(10), commands.recv())
        .await
        .expect("the node hears the command")
        .expect("bus open");
    assert!(
        cmd.timeout_ms <= 1_400,
        "the node was given {} ms of the 2,000 after a lookup of 600 ms or more",
        cmd.timeout_ms
    );
    node.respond(&cmd, Ok(json!({"muted": true}))).await;
    proxy.set_delay(Duration::ZERO);
    let v = recv(&mut ws).await;
    assert_eq!(v["result"]["muted"], true, "{v}");
}

/// Commands the rate limit refuses take no place in their conference's line: behind a slow
/// command each would hold a task until that command ended, and a client retrying fast could
/// pile up any number of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_commands_behind_a_slow_one_hold_nothing() {
    let s = setup(&[
        ("CONFROUTE_RPC__COMMAND_TIMEOUT", "30s"),
        ("CONFROUTE_RPC__RATE_LIMIT", "5"),
        ("CONFROUTE_RPC__BURST", "5"),
    ])
    .await;
    let (_store, node, mut commands) = hosted_on_node_a(&s, "slow").await;
    let mut ws = connect(&s, None).await.expect("connect");
    let mute = |i: u64| {
        json!({"jsonrpc": "2.0", "method": "participant.mute", "id": i,
               "params": {"conference": "slow", "participant": "p"}})
        .to_string()
    };
    send(&mut ws, &mute(0)).await;
    // The node hears it and stays silent: the conference's line is held.
    let held = tokio::time::timeout(Duration::from_secs(10), commands.recv())
        .await
        .expect("the node hears the command")
        .expect("bus open");
    let tasks = || async {
        fixtures::metric(
            &fixtures::scrape(&s.controller.http_url()).await,
            "confroute_runtime_tasks",
        )
    };
    let before = tasks().await;
    const SENT: u64 = 2000;
    for i in 1..=SENT {
        send(&mut ws, &mute(i)).await;
    }
    // All but the few the bucket still had (and what it refilled meanwhile) are refused.
    let mut refused = 0;
    while refused < SENT - 100 {
        let v = tokio::time::timeout(Duration::from_secs(10), recv(&mut ws))
            .await
            .unwrap_or_else(|_| panic!("answers stopped after {refused} refusals"));
        assert_eq!(code(&v), -32008, "{v}");
        refused += 1;
    }
    let after = tasks().await;
    assert!(
        after - before < 100.0,
        "{refused} refused commands left {} tasks behind",
        after - before
    );
    node.respond(&held, Ok(json!({"muted": true}))).await;
}

/// A client's close is answered with a close (RFC 6455 §5.5.1) even when an answer comes due
/// after it: the frame the client no longer takes must not end the connection without the
/// reply, which clients would see as an unclean close (1006).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_close_is_answered_even_with_an_answer_coming_due() {
    use tokio::io::AsyncWriteExt;
    let s = setup(&[("CONFROUTE_RPC__COMMAND_TIMEOUT", "1s")]).await;
    let (_store, _node, mut commands) = hosted_on_node_a(&s, "closing-1").await;
    let mut tcp = raw_ws(&s).await;
    let req = json!({"jsonrpc": "2.0", "method": "participant.mute",
                     "params": {"conference": "closing-1", "participant": "p1"}, "id": 1});
    tcp.write_all(&frame(0x1, req.to_string().as_bytes()))
        .await
        .expect("write");
    tokio::time::timeout(Duration::from_secs(10), commands.recv())
        .await
        .expect("the node hears the command")
        .expect("bus open");
    // The node never answers: the command's timeout answer comes due after the close.
    tcp.write_all(&frame(0x8, &1000u16.to_be_bytes()))
        .await
        .expect("close");
    assert_eq!(close_code_of(&mut tcp).await, Some(Some(1000)));
}
