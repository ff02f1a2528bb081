//! The controller's HTTP API against a real controller and Redis: every route, with the
//! token on and off, and every error path with its status and JSON error code. Also checks
//! that `docs/openapi.json`'s routes are served and that `/metrics` passes
//! `promtool check metrics`.

use std::time::Duration;

use confroute_shared::store::Store;
use confroute_tests::fixtures;
use confroute_tests::harness::{require_tool, ControllerProc, RedisServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const TOKEN: &str = "test-token-0123456789abcdef";

struct Setup {
    _redis: RedisServer,
    store: Store,
    controller: ControllerProc,
}

async fn setup(token: Option<&str>) -> Setup {
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
    env.push(("CONFROUTE_HTTP__MAX_BODY_SIZE".into(), "2048".into()));
    if let Some(t) = token {
        env.push(("CONFROUTE_HTTP__API_TOKEN".into(), t.into()));
    }
    let controller = ControllerProc::start(&env).expect("controller");
    Setup {
        _redis: redis,
        store,
        controller,
    }
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
    text: String,
}

async fn call(
    s: &Setup,
    method: Method,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Answer {
    let mut req = fixtures::http().request(method, format!("{}{path}", s.controller.http_url()));
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

fn openapi() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .expect("openapi document"),
    )
    .expect("valid JSON")
}

/// Every (method, path template) in `docs/openapi.json`.
fn documented() -> Vec<(String, String)> {
    let doc = openapi();
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for method in ops.as_object().expect("ops").keys() {
            out.push((method.to_uppercase(), path.clone()));
        }
    }
    out
}

/// A request for a documented route with its placeholders filled in (and a body where
/// the route needs one to get past validation).
fn concrete_request(
    method: &str,
    path: &str,
    conference: &str,
) -> (Method, String, Option<&'static str>) {
    let m = Method::from_bytes(method.as_bytes()).expect("method");
    let id = if path.contains("participants") {
        "p1"
    } else {
        "node-a"
    };
    let concrete = path.replace("{id}", id).replace("{name}", conference);
    let body = (m == Method::POST && path == "/v1/route").then_some(r#"{"conference":"t"}"#);
    (m, concrete, body)
}

/// Drains both test nodes through the API: nothing has room any more.
async fn drain_every_node(s: &Setup) {
    for id in ["node-a", "node-b"] {
        let a = call(
            s,
            Method::POST,
            &format!("/v1/nodes/{id}/drain"),
            None,
            None,
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
}

fn assert_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status.as_u16(), status, "{}", a.text);
    assert_eq!(a.body["error"]["code"], code, "{}", a.text);
    assert!(
        fixtures::documented_error_codes().iter().any(|c| c == code),
        "error code {code} is not in docs/openapi.json"
    );
    assert!(
        a.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "message present: {}",
        a.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_answers_and_its_error_paths() {
    let s = setup(None).await;
    let a = call(
        &s,
        Method::POST,
        "/v1/route",
        Some(r#"{"conference":"sales-42"}"#),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["conference"], "sales-42");
    assert_eq!(a.body["epoch"], 1);
    assert_eq!(a.body["created"], true);
    let node = a.body["node_id"].as_str().expect("node").to_string();
    assert_eq!(a.body["sip_uri"], format!("sip:{node}.test:5060"));
    let again = call(
        &s,
        Method::POST,
        "/v1/route",
        Some(r#"{"conference":"sales-42"}"#),
        None,
    )
    .await;
    assert_eq!(again.body["created"], false);
    assert_eq!(again.body["node_id"], node.as_str());

    let cases: &[(&str, u16, &str)] = &[
        (r#"{"conference":"bad name"}"#, 422, "invalid_conference"),
        (r#"{"conference":""}"#, 422, "invalid_conference"),
        (r#"{"conference":"a\r\nb"}"#, 422, "invalid_conference"),
        (r#"{"conference":"caf\u00e9"}"#, 422, "invalid_conference"),
        (r#"{"conference":"{x}"}"#, 422, "invalid_conference"),
        (r#"{"conference":"a:b"}"#, 422, "invalid_conference"),
        (r#"{"conference":"%00"}"#, 422, "invalid_conference"),
        (r#"{"conference":1}"#, 400, "invalid_request"),
        (r#"{}"#, 400, "invalid_request"),
        (r#"{"conference":"a","extra":1}"#, 400, "invalid_request"),
        (r#"{"conference": "#, 400, "invalid_json"),
        ("not json", 400, "invalid_json"),
        // serde would take an array for the object, field by position.
        (r#"["sales-2"]"#, 400, "invalid_request"),
        (r#"[]"#, 400, "invalid_request"),
        (r#""sales-2""#, 400, "invalid_request"),
    ];
    for (body, status, code) in cases {
        let a = call(&s, Method::POST, "/v1/route", Some(body), None).await;
        assert_error(&a, *status, code);
        // The message speaks of the API, not of the server's own types.
        assert!(!a.text.contains("RouteRequest"), "{}", a.text);
    }
    let long = format!(r#"{{"conference":"{}"}}"#, "x".repeat(129));
    assert_error(
        &call(&s, Method::POST, "/v1/route", Some(&long), None).await,
        422,
        "invalid_conference",
    );
    let huge = format!(r#"{{"conference":"{}"}}"#, "x".repeat(4096));
    assert_error(
        &call(&s, Method::POST, "/v1/route", Some(&huge), None).await,
        413,
        "payload_too_large",
    );
    let no_type = fixtures::http()
        .post(format!("{}/v1/route", s.controller.http_url()))
        .body(r#"{"conference":"x"}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(no_type.status().as_u16(), 415);
    let page = s.store.list_conferences(None, 100).await.expect("list");
    assert_eq!(page.items.len(), 1, "bad requests created nothing");
    // Each one that reached the route named no valid conference: counted `invalid`, a body
    // that is not one (the cases, the 415) as much as a badly spelled name (the long one).
    // The 413 is refused from its Content-Length, before the route.
    let m = fixtures::scrape(&s.controller.http_url()).await;
    assert_eq!(
        fixtures::metric(&m, r#"confroute_route_total{outcome="invalid"}"#),
        (cases.len() + 2) as f64,
        "{m}"
    );

    // Every node drained: no capacity.
    drain_every_node(&s).await;
    let a = call(
        &s,
        Method::POST,
        "/v1/route",
        Some(r#"{"conference":"new-one"}"#),
        None,
    )
    .await;
    assert_error(&a, 503, "no_capacity");
    // Every node is draining, not full: the message does not send the operator looking
    // for capacity alone.
    assert!(
        a.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("draining")),
        "{}",
        a.text
    );
    assert_eq!(
        a.headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("5")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_drain_undrain_and_their_errors() {
    let s = setup(None).await;
    let a = call(&s, Method::GET, "/v1/nodes", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    let ids: Vec<&str> = a.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert_eq!(ids, ["node-a", "node-b"], "listed by id: {}", a.text);
    let a = call(&s, Method::GET, "/v1/nodes/node-a", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["state"], "serving");
    assert_eq!(a.body["capacity"], 100);
    assert_eq!(a.body["participant_capacity"], 0, "{}", a.text);
    assert_eq!(a.body["drain_since_ms"], Value::Null, "{}", a.text);
    assert_eq!(a.body["stopping"], false, "{}", a.text);
    assert_error(
        &call(&s, Method::GET, "/v1/nodes/nope", None, None).await,
        404,
        "node_not_found",
    );
    assert_error(
        &call(&s, Method::GET, "/v1/nodes/bad%20id", None, None).await,
        422,
        "invalid_node_id",
    );

    let a = call(&s, Method::POST, "/v1/nodes/node-a/drain", None, None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(
        a.body,
        json!({"id": "node-a", "state": "draining", "previous": "serving"})
    );
    let a = call(&s, Method::GET, "/v1/nodes/node-a", None, None).await;
    let since = a.body["drain_since_ms"].as_u64();
    let registered = a.body["updated_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(
        since.is_some_and(|ms| ms >= registered && ms < registered.saturating_add(60_000)),
        "a draining node says when its drain began: {}",
        a.text
    );
    for i in 0..10 {
        let a = call(
            &s,
            Method::POST,
            "/v1/route",
            Some(&format!(r#"{{"conference":"d{i}"}}"#)),
            None,
        )
        .await;
        assert_eq!(
            a.body["node_id"], "node-b",
            "no new conference on a draining node"
        );
    }
    let a = call(&s, Method::POST, "/v1/nodes/node-a/undrain", None, None).await;
    assert_eq!(
        a.body,
        json!({"id": "node-a", "state": "serving", "previous": "draining"})
    );
    // Serving again: new conferences reach node-a once the controller's view has it so.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for i in 0.. {
        let a = call(
            &s,
            Method::POST,
            "/v1/route",
            Some(&format!(r#"{{"conference":"u{i}"}}"#)),
            None,
        )
        .await;
        if a.body["node_id"] == "node-a" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new conference on the undrained node: {}",
            a.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_error(
        &call(&s, Method::POST, "/v1/nodes/ghost/drain", None, None).await,
        404,
        "node_not_found",
    );
    assert_error(
        &call(&s, Method::POST, "/v1/nodes/ghost/undrain", None, None).await,
        404,
        "node_not_found",
    );
    assert_error(
        &call(&s, Method::POST, "/v1/nodes/a:b/drain", None, None).await,
        422,
        "invalid_node_id",
    );
}

/// A REST dial-out into a conference that needs a home when no node has room says so as
/// `POST /v1/route` does (`no_capacity`, not a generic `unavailable`), and places nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_dialout_with_no_node_with_room_is_no_capacity() {
    let s = setup(None).await;
    drain_every_node(&s).await;
    let a = call(
        &s,
        Method::POST,
        "/v1/conferences/roomless/participants",
        Some(r#"{"to":"+15555550100"}"#),
        None,
    )
    .await;
    assert_error(&a, 503, "no_capacity");
    assert!(a.headers.contains_key("retry-after"), "{:?}", a.headers);
    let route = call(
        &s,
        Method::POST,
        "/v1/route",
        Some(r#"{"conference":"roomless"}"#),
        None,
    )
    .await;
    assert_error(&route, 503, "no_capacity");
    assert!(
        s.store
            .lookup(&"roomless".parse().expect("name"))
            .await
            .expect("lookup")
            .is_none(),
        "nothing was placed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conferences_list_get_end_and_their_errors() {
    let s = setup(None).await;
    for i in 0..5 {
        call(
            &s,
            Method::POST,
            "/v1/route",
            Some(&format!(r#"{{"conference":"c{i}"}}"#)),
            None,
        )
        .await;
    }
    let a = call(&s, Method::GET, "/v1/conferences?limit=2", None, None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(a.body["next"], "c1");
    let a = call(
        &s,
        Method::GET,
        "/v1/conferences?limit=2&after=c3",
        None,
        None,
    )
    .await;
    assert_eq!(a.body["items"][0]["conference"], "c4");
    assert_eq!(a.body["next"], Value::Null);
    for q in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "after=",
        format!("after={}", "x".repeat(1025)).as_str(),
        "page=2",
    ] {
        assert_error(
            &call(&s, Method::GET, &format!("/v1/conferences?{q}"), None, None).await,
            400,
            "invalid_request",
        );
    }

    let a = call(&s, Method::GET, "/v1/conferences/c0", None, None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["conference"], "c0");
    assert_eq!(a.body["epoch"], 1);
    assert_eq!(a.body["node"]["id"], a.body["node_id"]);
    assert_error(
        &call(&s, Method::GET, "/v1/conferences/unknown", None, None).await,
        404,
        "conference_not_found",
    );
    assert_error(
        &call(&s, Method::GET, "/v1/conferences/bad%7Bname", None, None).await,
        422,
        "invalid_conference",
    );
    // The test nodes are registrations only: no agent listens for the command. Every 503
    // says when to come back.
    let a = call(&s, Method::DELETE, "/v1/conferences/c0", None, None).await;
    assert_error(&a, 503, "node_unavailable");
    assert_eq!(
        a.headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("5"),
        "sip.retry_after on a node's 503"
    );
    // What axum's extractors refuse in plain text gets the JSON error body too.
    assert_error(
        &call(&s, Method::GET, "/v1/conferences/%FF", None, None).await,
        400,
        "invalid_request",
    );
    assert_error(
        &call(&s, Method::GET, "/v1/rpc", None, None).await,
        400,
        "invalid_request",
    );
    assert_error(
        &call(&s, Method::DELETE, "/v1/conferences/nobody", None, None).await,
        404,
        "conference_not_found",
    );
    // A bad name in a call-control path is named as on `GET /v1/conferences/{name}`,
    // ahead of anything the body says.
    for (method, path, body) in [
        (Method::DELETE, "/v1/conferences/bad%00", None),
        (Method::GET, "/v1/conferences/bad%20name/participants", None),
        (
            Method::POST,
            "/v1/conferences/bad%20name/participants",
            Some(r#"{"to":"sip:x@example.com"}"#),
        ),
        (
            Method::POST,
            "/v1/conferences/a:b/play",
            Some(r#"{"media":"sound:beep","conference":"other"}"#),
        ),
        (
            Method::POST,
            "/v1/conferences/%7Bx%7D/participants/p1/mute",
            None,
        ),
        (
            Method::DELETE,
            "/v1/conferences/%7Bx%7D/participants/p1",
            None,
        ),
        (
            Method::POST,
            "/v1/conferences/a:b/participants/p1/move",
            Some(r#"{"to":"elsewhere"}"#),
        ),
        (
            Method::PATCH,
            "/v1/conferences/a:b/participants/p1",
            Some(r#"{"beepOnExit":true}"#),
        ),
    ] {
        let a = call(&s, method.clone(), path, body, None).await;
        assert_error(&a, 422, "invalid_conference");
        assert!(
            a.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{method} {path}: {}",
            a.text
        );
    }

    assert_error(
        &call(&s, Method::GET, "/v1/nothing", None, None).await,
        404,
        "route_not_found",
    );
    assert_error(
        &call(&s, Method::PUT, "/v1/route", None, None).await,
        405,
        "method_not_allowed",
    );
    // Every 405 says what the route takes, the WebSocket route's refusal of HEAD included.
    for (method, path, allow) in [
        (Method::PUT, "/v1/route", "POST"),
        (Method::HEAD, "/v1/rpc", "GET"),
        (Method::PUT, "/v1/nodes", "GET,HEAD"),
    ] {
        let r = fixtures::http()
            .request(method.clone(), format!("{}{path}", s.controller.http_url()))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status().as_u16(), 405, "{method} {path}");
        let got = r
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(got.contains(allow), "{method} {path}: Allow `{got}`");
        if path == "/v1/rpc" {
            assert!(!got.contains("HEAD"), "the upgrade refuses HEAD: `{got}`");
        }
    }
    // A body announced past http.max_body_size is refused at once, before it is sent.
    let head = head_only(
        &s,
        "POST /v1/route HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("payload_too_large"), "{head}");
    // An unknown route is still a 404, whatever its body would be.
    let head = head_only(
        &s,
        "POST /v1/nope HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

/// Sends a request head alone (no body follows) and returns the start of the answer.
async fn head_only(s: &Setup, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.controller.http_port))
        .await
        .expect("connect");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut head = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut head))
        .await
        .expect("an answer before the body")
        .expect("read");
    String::from_utf8_lossy(&head[..n]).into_owned()
}

/// A conference record this process cannot read (an epoch that is not a number, written by
/// hand or by something else) is left to the claim, which reads it as the store's scripts
/// do, rather than answered 503 until it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_conference_record_is_left_to_the_claim() {
    let s = setup(None).await;
    s._redis
        .query(
            redis::cmd("HSET")
                .arg("{confroute}:conf:junk")
                .arg("owner")
                .arg("node-a")
                .arg("epoch")
                .arg("not-a-number"),
        )
        .expect("write the record");
    let a = call(
        &s,
        Method::POST,
        "/v1/route",
        Some(r#"{"conference":"junk"}"#),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["node_id"], "node-a", "{}", a.text);
    assert_eq!(a.body["created"], false, "{}", a.text);
    // The record was there all along: no race with another caller is counted.
    let m = fixtures::scrape(&s.controller.http_url()).await;
    assert_eq!(fixtures::metric(&m, "confroute_claim_conflicts_total"), 0.0);
    // The admin API reads it as the claim does: its epoch is 0.
    let a = call(&s, Method::GET, "/v1/conferences/junk", None, None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["epoch"], 0, "{}", a.text);

    // Records another writer left, each with its index entry.
    let write_indexed = |name: &str, fields: &[(&str, &str)]| {
        let mut hset = redis::cmd("HSET");
        hset.arg(format!("{{confroute}}:conf:{name}"));
        for (k, v) in fields {
            hset.arg(*k).arg(*v);
        }
        s._redis.query(&mut hset).expect("write the record");
        s._redis
            .query(redis::cmd("ZADD").arg("{confroute}:confs").arg(0).arg(name))
            .expect("index it");
    };
    // A record naming a node no node can be is no home: not found, and left out of the
    // listing, whose pages after it are still reachable.
    write_indexed("bad-owner", &[("owner", "a b"), ("epoch", "1")]);
    let a = call(&s, Method::GET, "/v1/conferences/bad-owner", None, None).await;
    assert_error(&a, 404, "conference_not_found");
    // A count no reader can take for one reads as 0, as in the scripts.
    write_indexed(
        "neg-count",
        &[("owner", "node-a"), ("epoch", "1"), ("participants", "-1")],
    );
    // A name the rules refuse (written by another tool) is left out of its page, but may
    // be the page's `next`: the pages after it are reachable all the same.
    write_indexed("bad@name", &[("owner", "node-a"), ("epoch", "1")]);
    for name in ["zz-after-1", "zz-after-2"] {
        let a = call(
            &s,
            Method::POST,
            "/v1/route",
            Some(&format!(r#"{{"conference":"{name}"}}"#)),
            None,
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
    let mut listed = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let path = match &next {
            Some(c) => format!("/v1/conferences?limit=1&after={c}"),
            None => "/v1/conferences?limit=1".to_string(),
        };
        let a = call(&s, Method::GET, &path, None, None).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text);
        for item in a.body["items"].as_array().expect("items") {
            listed.push(item["conference"].as_str().unwrap_or("").to_string());
        }
        match a.body["next"].as_str() {
            Some(c) => next = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(
        listed,
        ["neg-count", "zz-after-1", "zz-after-2"],
        "{listed:?}"
    );
}

/// A path segment that is not UTF-8 is refused with 400 on every route that has one, as
/// the API document says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_path_segment_gets_the_documented_400_everywhere() {
    let s = setup(None).await;
    let doc = openapi();
    for (method, path) in documented() {
        if !path.contains('{') {
            continue;
        }
        let m = Method::from_bytes(method.as_bytes()).expect("method");
        let concrete = path.replace("{id}", "%FF").replace("{name}", "%FF");
        let body = matches!(m, Method::POST | Method::PATCH).then_some("{}");
        let a = call(&s, m, &concrete, body, None).await;
        assert_error(&a, 400, "invalid_request");
        assert!(
            doc["paths"][&path][method.to_lowercase()]["responses"]
                .get("400")
                .is_some(),
            "{method} {path} answers 400 but does not document it"
        );
    }
    let page = s.store.list_conferences(None, 10).await.expect("list");
    assert!(page.items.is_empty(), "nothing claimed: {:?}", page.items);
}

/// A call-control body that names another conference or participant than its path is
/// refused, before anything is claimed or sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_control_bodies_may_not_name_what_their_path_names() {
    let s = setup(None).await;
    for (path, body) in [
        (
            "/v1/conferences/path-conf/participants",
            r#"{"to":"+15555550101","conference":"body-conf"}"#,
        ),
        (
            "/v1/conferences/path-conf/play",
            r#"{"media":"sound:beep","conference":"body-conf"}"#,
        ),
        (
            "/v1/conferences/path-conf/participants/p1/dtmf",
            r#"{"digits":"1","participant":"p2"}"#,
        ),
        (
            "/v1/conferences/path-conf/participants/p1/dtmf",
            r#"{"digits":"1","conference":"body-conf"}"#,
        ),
    ] {
        let a = call(&s, Method::POST, path, Some(body), None).await;
        assert_error(&a, 422, "invalid_params");
        assert!(
            a.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("the path names")),
            "{path}: {}",
            a.text
        );
    }
    // A participant for the whole conference's announcement: refused as JSON-RPC refuses it.
    let a = call(
        &s,
        Method::POST,
        "/v1/conferences/path-conf/play",
        Some(r#"{"media":"sound:beep","participant":"p1"}"#),
        None,
    )
    .await;
    assert_error(&a, 422, "invalid_params");
    let page = s.store.list_conferences(None, 10).await.expect("list");
    assert!(page.items.is_empty(), "nothing claimed: {:?}", page.items);
    // The path's own value, repeated in the body, is no conflict, nor is `null` (a client
    // library's unset field): the request goes on, to find that the conference has no home.
    for body in [
        r#"{"digits":"1","conference":"path-conf","participant":"p1"}"#,
        r#"{"digits":"1","conference":null,"participant":null}"#,
    ] {
        let a = call(
            &s,
            Method::POST,
            "/v1/conferences/path-conf/participants/p1/dtmf",
            Some(body),
            None,
        )
        .await;
        // Past the body's checks: the conference has no home.
        assert_error(&a, 404, "conference_not_found");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_every_v1_route_but_not_health_or_metrics() {
    let s = setup(Some(TOKEN)).await;
    for (method, path) in documented() {
        if !path.starts_with("/v1/") {
            continue;
        }
        let (m, concrete, body) = concrete_request(&method, &path, "t");
        for bad in [None, Some("wrong-token-0123456789"), Some("")] {
            let a = call(&s, m.clone(), &concrete, body, bad).await;
            assert_error(&a, 401, "unauthorized");
            assert!(a.headers.contains_key("www-authenticate"), "{m} {path}");
        }
        let a = call(&s, m.clone(), &concrete, body, Some(TOKEN)).await;
        assert_ne!(
            a.status.as_u16(),
            401,
            "{m} {path} with the token: {}",
            a.text
        );
    }
    let page = s.store.list_conferences(None, 10).await.expect("list");
    assert_eq!(
        page.items.len(),
        1,
        "only the authorised route call created a conference"
    );
    // Which /v1 routes exist is not told without the token: an unknown one gets 401 too,
    // and its 404 only with the token.
    assert_error(
        &call(&s, Method::GET, "/v1/nothing", None, None).await,
        401,
        "unauthorized",
    );
    assert_error(
        &call(&s, Method::GET, "/v1/nothing", None, Some(TOKEN)).await,
        404,
        "route_not_found",
    );
    assert_error(
        &call(&s, Method::GET, "/nothing", None, None).await,
        404,
        "route_not_found",
    );
    // Nor by the methods a known path takes: a wrong method without the token is a plain
    // 401, without the `Allow` its 405 has with the token.
    for (m, path) in [(Method::GET, "/v1/route"), (Method::POST, "/v1/nodes/x")] {
        let a = call(&s, m.clone(), path, None, None).await;
        assert_error(&a, 401, "unauthorized");
        assert!(
            !a.headers.contains_key("allow"),
            "{m} {path}: {:?}",
            a.headers
        );
        let a = call(&s, m.clone(), path, None, Some(TOKEN)).await;
        assert_error(&a, 405, "method_not_allowed");
        assert!(a.headers.contains_key("allow"), "{m} {path}");
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            call(&s, Method::GET, path, None, None).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    // The scheme is case-insensitive (RFC 9110 §11.1); the token is not.
    let nodes = format!("{}/v1/nodes", s.controller.http_url());
    for (value, want) in [
        (format!("bearer {TOKEN}"), 200),
        (format!("BEARER  {TOKEN}"), 200),
        (format!("Bearer {}", TOKEN.to_uppercase()), 401),
        (format!("Basic {TOKEN}"), 401),
    ] {
        let resp = fixtures::http()
            .get(&nodes)
            .header("authorization", &value)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), want, "{value}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_routes_are_served_and_metrics_pass_promtool() {
    let s = setup(None).await;
    for (method, path) in documented() {
        {
            let (m, concrete, body) = concrete_request(&method, &path, "doc-check");
            let a = call(&s, m, &concrete, body, None).await;
            let code = a.body["error"]["code"].as_str().unwrap_or("");
            assert!(
                code != "route_not_found" && code != "method_not_allowed",
                "{method} {path} is documented but not served: {}",
                a.text
            );
        }
    }
    assert_eq!(
        call(&s, Method::GET, "/healthz", None, None).await.body,
        json!({"status": "ok"})
    );
    fixtures::wait_ready(&s.controller.http_url())
        .await
        .expect("controller ready");
    assert_eq!(
        call(&s, Method::GET, "/readyz", None, None).await.body,
        json!({"status": "ready", "redis": true, "sip": true, "bus": true})
    );
    let metrics = call(&s, Method::GET, "/metrics", None, None).await;
    assert!(metrics
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")));
    let promtool = require_tool("promtool", "prometheus").expect("promtool");
    let mut check = std::process::Command::new(promtool);
    check.args(["check", "metrics"]);
    let out = confroute_tests::harness::run_with_input(
        check,
        metrics.text.as_bytes(),
        Duration::from_secs(30),
    )
    .expect("promtool finishes");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !metrics.text.contains("doc-check"),
        "no conference name appears in any label"
    );
    // The latency histograms reach past an outage's worst (docs/metrics.md's ranges): a
    // connect timeout plus redis.timeout, a long routing.deadline.
    for bucket in [
        "confroute_route_duration_seconds_bucket{entry=\"http\",le=\"10\"}",
        "confroute_redis_request_duration_seconds_bucket{op=\"claim\",le=\"5\"}",
    ] {
        assert!(
            metrics.text.contains(bucket),
            "{bucket} in\n{}",
            metrics.text
        );
    }
}

/// `runtime.worker_threads`: one thread (the current-thread scheduler) and several (the
/// multi-thread one) both route, and only the latter starts worker threads of its own.
#[tokio::test]
async fn worker_threads_sizes_the_runtime_and_either_kind_routes() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    store
        .register(&fixtures::node("node-a", 100), Duration::from_secs(300))
        .await
        .expect("register");
    let mut threads = Vec::new();
    for n in [1usize, 3] {
        let mut env = fixtures::redis_env(&cfg);
        env.push(("CONFROUTE_RUNTIME__WORKER_THREADS".into(), n.to_string()));
        let controller = ControllerProc::start(&env).expect("controller");
        let resp = fixtures::http()
            .post(format!("{}/v1/route", controller.http_url()))
            .header("content-type", "application/json")
            .body(format!(r#"{{"conference":"threads-{n}"}}"#))
            .send()
            .await
            .expect("route");
        assert_eq!(resp.status(), StatusCode::OK, "{n} thread(s)");
        let body: Value = serde_json::from_str(&resp.text().await.expect("body")).expect("json");
        assert_eq!(body["node_id"], "node-a", "{n} thread(s): {body}");
        let pid = controller.pid().expect("pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let count: usize = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("a Threads line");
        threads.push(count);
    }
    assert!(
        threads[1] >= threads[0] + 3,
        "3 workers should add 3 threads to the single-thread controller's: {threads:?}"
    );
}

/// A route that takes no query or no body refuses one (400 `invalid_request`) rather than
/// act as if it were not there, and changes nothing; an empty body or `{}` is no body. A bad
/// name in the path is still named first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_a_route_does_not_take_is_refused_and_changes_nothing() {
    let s = setup(None).await;
    let state = |s: &Setup| {
        let url = format!("{}/v1/nodes/node-a", s.controller.http_url());
        async move {
            fixtures::try_get_json(&url)
                .await
                .map(|v| v["state"].clone())
                .unwrap_or(Value::Null)
        }
    };
    for body in ["[1,2", "{\"deadline\":\"5s\"}", "null", "x"] {
        assert_error(
            &call(&s, Method::POST, "/v1/nodes/node-a/drain", Some(body), None).await,
            400,
            "invalid_request",
        );
    }
    assert_error(
        &call(
            &s,
            Method::POST,
            "/v1/nodes/node-a/drain?deadline=5s",
            None,
            None,
        )
        .await,
        400,
        "invalid_request",
    );
    assert_eq!(state(&s).await, "serving", "nothing was drained");
    let a = call(
        &s,
        Method::POST,
        "/v1/nodes/node-a/drain",
        Some(" {\n } "),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(state(&s).await, "draining");
    assert_error(
        &call(
            &s,
            Method::POST,
            "/v1/nodes/node-a/undrain",
            Some("{bad"),
            None,
        )
        .await,
        400,
        "invalid_request",
    );
    assert_eq!(state(&s).await, "draining", "still draining");

    for (method, path) in [
        (Method::GET, "/v1/nodes?limit=abc"),
        (Method::GET, "/v1/nodes/node-a?x=1"),
        (Method::GET, "/v1/conferences/room-1?x=1"),
        (Method::GET, "/v1/conferences/room-1/participants?x=1"),
        (Method::POST, "/v1/route?x=1"),
    ] {
        let body = (method == Method::POST).then_some(r#"{"conference":"room-1"}"#);
        assert_error(
            &call(&s, method, path, body, None).await,
            400,
            "invalid_request",
        );
    }
    assert_eq!(
        s.store
            .lookup(&"room-1".parse().expect("name"))
            .await
            .expect("lookup"),
        None,
        "the refused route placed nothing"
    );
    // Call control: refused before any node is asked (there is none to ask here).
    for (method, path) in [
        (Method::POST, "/v1/conferences/room-1/participants/p1/mute"),
        (
            Method::POST,
            "/v1/conferences/room-1/participants/p1/unhold",
        ),
        (Method::DELETE, "/v1/conferences/room-1/participants/p1"),
        (Method::DELETE, "/v1/conferences/room-1"),
    ] {
        assert_error(
            &call(&s, method.clone(), path, Some("[1]"), None).await,
            400,
            "invalid_request",
        );
    }
    // The path's name is named first.
    assert_error(
        &call(
            &s,
            Method::POST,
            "/v1/conferences/bad%20name/participants/p1/mute",
            Some("[1]"),
            None,
        )
        .await,
        422,
        "invalid_conference",
    );
}

/// `http.max_connections`: with that many connections open, a new one takes the place of
/// the one whose last request is the longest ago, closed since it sits idle between
/// requests: a client holding idle connections cannot keep out the next (a probe's, say),
/// and a client that uses its connection keeps it. So does a connection halfway through a
/// request head, for a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_past_http_max_connections_replaces_the_least_recently_used() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_redis, controller) = controller_with("CONFROUTE_HTTP__MAX_CONNECTIONS", "3");
    let addr = controller.http_url().replace("http://", "");
    let ask = |mut c: tokio::net::TcpStream| async move {
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap_or(0);
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        c
    };
    let closed = |mut c: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 16];
        tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("closed, not left open")
            .unwrap_or(0)
            == 0
    };
    // Opened one after the other, each answered once; then the first used again.
    let mut held = Vec::new();
    for _ in 0..3 {
        let c = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        held.push(ask(c).await);
    }
    let first = ask(held.remove(0)).await;
    let (second, third) = (held.remove(0), held.remove(0));
    let fourth = ask(tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect"))
    .await;
    assert!(closed(second).await, "{}", controller.output());
    ask(first).await;
    ask(fourth).await;
    drop(third);

    // A connection that never finishes its request head goes too, after its second (here
    // the only one a controller may hold).
    let (_redis_one, one) = controller_with("CONFROUTE_HTTP__MAX_CONNECTIONS", "1");
    let one_addr = one.http_url().replace("http://", "");
    let mut slow = tokio::net::TcpStream::connect(&one_addr)
        .await
        .expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .expect("write");
    ask(tokio::net::TcpStream::connect(&one_addr)
        .await
        .expect("connect"))
    .await;
    assert!(closed(slow).await, "{}", one.output());
}

/// A client that asks for answers and reads none of them holds its connection no longer
/// than `http.header_timeout`: the controller gives up on the answer and closes it, so the
/// client gets only what was written before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_is_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_redis, controller) = controller_with("CONFROUTE_HTTP__HEADER_TIMEOUT", "1s");
    let addr: std::net::SocketAddr = controller
        .http_url()
        .replace("http://", "")
        .parse()
        .expect("addr");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let conn = socket.connect(addr).await.expect("connect");
    let (mut rx, mut tx) = conn.into_split();
    const ASKED: usize = 5000;
    let writer = tokio::spawn(async move {
        let one = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        for _ in 0..ASKED {
            if tx.write_all(one).await.is_err() {
                return;
            }
        }
        let _ = tx.flush().await;
        // Kept open: a half-closed request side could end the exchange by itself.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    // Not reading is the scenario: for well over the timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = Vec::new();
    let read_all = async {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_all)
        .await
        .expect("the controller closed the connection");
    writer.abort();
    let answered = String::from_utf8_lossy(&got)
        .matches("HTTP/1.1 200")
        .count();
    assert!(
        answered < ASKED,
        "all {ASKED} answers ({} bytes) were held for a client reading none of them",
        got.len()
    );
}

/// Every status a documented route answers to a query it does not take, or to a body over
/// `http.max_body_size`, is one `docs/openapi.json` gives for that route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statuses_of_stray_queries_and_oversized_bodies_are_documented() {
    let s = setup(None).await;
    let doc = openapi();
    let big = format!(r#"{{"conference":"t","pad":"{}"}}"#, "x".repeat(4096));
    let mut undocumented = Vec::new();
    for (method, path) in documented() {
        if path == "/v1/rpc" {
            continue;
        }
        let (m, concrete, _) = concrete_request(&method, &path, "stray");
        let responses = &doc["paths"][&path][method.to_lowercase()]["responses"];
        let query = format!("{concrete}?bogus=1");
        for (what, target, body) in [
            ("a stray query", query.as_str(), None),
            ("an oversized body", concrete.as_str(), Some(big.as_str())),
        ] {
            let a = call(&s, m.clone(), target, body, None).await;
            let status = a.status.as_u16().to_string();
            if responses.get(&status).is_none() {
                undocumented.push(format!("{method} {path}: {what} got {status}"));
            }
        }
    }
    assert!(
        undocumented.is_empty(),
        "statuses not in docs/openapi.json:\n{}",
        undocumented.join("\n")
    );
}

/// A participant id in the path that breaks its rules is what the answer names, whatever
/// else is wrong with the request (a body the route cannot take).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_participant_id_in_the_path_is_named_before_the_body() {
    let s = setup(None).await;
    for (method, path) in documented() {
        if !path.contains("/participants/{id}") {
            continue;
        }
        let m = Method::from_bytes(method.as_bytes()).expect("method");
        let concrete = path.replace("{name}", "room").replace("{id}", "bad%20id");
        let a = call(&s, m, &concrete, Some("[1]"), None).await;
        assert_error(&a, 422, "invalid_params");
        assert!(
            a.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("participant")),
            "{method} {path}: {}",
            a.text
        );
    }
}

/// Redis and a controller started with one setting beside the usual ones.
fn controller_with(key: &str, value: &str) -> (RedisServer, ControllerProc) {
    let redis = RedisServer::start().expect("redis");
    let mut env = fixtures::redis_env(&fixtures::single(&redis.url()));
    env.push((key.into(), value.into()));
    let controller = ControllerProc::start(&env).expect("controller");
    (redis, controller)
}

/// The WebSocket upgrade takes no query, as no `/v1` route without parameters does (a
/// `?token=` would otherwise be silently ignored); a wrong method is 405 whatever body it
/// announces, not 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_refuses_a_query_and_a_wrong_method_is_405_before_413() {
    let s = setup(None).await;
    let upgrade = |target: &str| {
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    };
    let head = head_only(&s, &upgrade("/v1/rpc?token=abc")).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let head = head_only(&s, &upgrade("/v1/rpc")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let head = head_only(
        &s,
        "PUT /v1/route HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nallow: post"),
        "{head}"
    );
    // The upgrade takes no HEAD, whatever body it announces.
    let head = head_only(
        &s,
        "HEAD /v1/rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nallow: get\r\n"),
        "{head}"
    );
}

/// A controller (with `extra` settings) and node `node-a`, registered, whose command bus
/// the test plays: it hears the commands and answers them, or not.
struct Played {
    _redis: RedisServer,
    store: Store,
    node: confroute_shared::bus::Bus,
    commands: tokio::sync::mpsc::Receiver<confroute_shared::bus::Command>,
    controller: ControllerProc,
}

async fn node_a_played_by_the_test(extra: &[(&str, &str)]) -> Played {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    store
        .register(&fixtures::node("node-a", 100), Duration::from_secs(300))
        .await
        .expect("register");
    let (node, commands) =
        confroute_shared::bus::Bus::node(fixtures::store(&cfg), &fixtures::id("node-a"));
    assert!(node.wait_connected(Duration::from_secs(10)).await);
    let mut env = fixtures::redis_env(&cfg);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let controller = ControllerProc::start(&env).expect("controller");
    fixtures::wait_ready(&controller.http_url())
        .await
        .expect("controller ready");
    Played {
        _redis: redis,
        store,
        node,
        commands,
        controller,
    }
}

/// A stop lets a call-control request in flight run its course (up to its
/// `rpc.command_timeout`): its client gets the answer, here 504 `no_answer` from a node that
/// heard the command and never answered, rather than a connection dropped a few seconds into the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_lets_a_call_control_request_in_flight_finish() {
    let Played {
        _redis,
        store,
        node: _node,
        mut commands,
        mut controller,
    } = node_a_played_by_the_test(&[("CONFROUTE_RPC__COMMAND_TIMEOUT", "7s")]).await;
    store
        .claim(&"held-up".parse().expect("name"), &[fixtures::id("node-a")])
        .await
        .expect("claim");
    // node-a hears commands and answers none.
    let url = format!(
        "{}/v1/conferences/held-up/participants/p1/mute",
        controller.http_url()
    );
    let request = tokio::spawn(async move { fixtures::http().post(url).send().await });
    tokio::time::timeout(Duration::from_secs(10), commands.recv())
        .await
        .expect("the node hears the command")
        .expect("bus open");
    controller.process().signal(libc::SIGTERM).expect("sigterm");
    let answer = tokio::time::timeout(Duration::from_secs(20), request)
        .await
        .expect("the request ends")
        .expect("request task")
        .expect("an answer, not a dropped connection");
    // 504, not 503: the node heard the command and may have carried it out, so it is not
    // one to retry blindly.
    assert_eq!(answer.status().as_u16(), 504);
    assert!(answer.headers().get("retry-after").is_none());
    let body: Value = answer.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "no_answer", "{body}");
    controller
        .process()
        .wait_exit(Duration::from_secs(10))
        .expect("exits");
}

/// REST dial-outs run to their end even when their client hangs up, so they are bounded by
/// `http.max_running_commands` (past it: 503 `too_many_commands`, nothing claimed), and a
/// stop waits for them: a node's refusal that arrives after the stop began still has the
/// conference's claim given back, instead of an empty claim left holding a seat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_dialouts_whose_clients_left_are_bounded_and_finished_at_a_stop() {
    use confroute_shared::bus::{BusError, ErrorCode};
    // node-a hears commands; the test answers them.
    let Played {
        _redis,
        store,
        node,
        mut commands,
        mut controller,
    } = node_a_played_by_the_test(&[
        ("CONFROUTE_RPC__COMMAND_TIMEOUT", "10s"),
        ("CONFROUTE_HTTP__MAX_RUNNING_COMMANDS", "1"),
    ])
    .await;
    let dialout = |conference: &str| {
        fixtures::http()
            .post(format!(
                "{}/v1/conferences/{conference}/participants",
                controller.http_url()
            ))
            .header("content-type", "application/json")
            .body(r#"{"to":"+15555550101"}"#)
    };
    // The first client gives up long before the node answers.
    let gave_up = dialout("first")
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.is_err(), "no answer within the client's time");
    let cmd = tokio::time::timeout(Duration::from_secs(10), commands.recv())
        .await
        .expect("the node hears the dial-out")
        .expect("bus open");
    assert_eq!(cmd.method, "dialout");
    let first = "first".parse().expect("name");
    assert!(
        store.lookup(&first).await.expect("lookup").is_some(),
        "homed"
    );

    // Its command still runs: a second one has no slot.
    let refused = dialout("second").send().await.expect("request");
    assert_eq!(refused.status().as_u16(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "too_many_commands", "{body}");
    let second = "second".parse().expect("name");
    assert!(
        store.lookup(&second).await.expect("lookup").is_none(),
        "nothing claimed for the refused one"
    );

    controller.process().signal(libc::SIGTERM).expect("sigterm");
    confroute_tests::harness::wait_for_async(
        "the controller stopping",
        Duration::from_secs(10),
        || async { controller.output().contains("stopping").then_some(()) },
    )
    .await
    .expect("stopping");
    node.respond(
        &cmd,
        Err(BusError::new(
            ErrorCode::ConferenceFull,
            "no room for a callee",
        )),
    )
    .await;
    let code = controller
        .process()
        .wait_exit(Duration::from_secs(30))
        .expect("exits");
    assert_eq!(code, Some(0), "{}", controller.output());
    assert!(
        store.lookup(&first).await.expect("lookup").is_none(),
        "the refused dial-out's claim was given back before the exit: {}",
        controller.output()
    );
}

/// `confroute_nodes_placeable` counts the nodes the placer would offer a new conference:
/// serving, ARI usable, below capacity. A full node, a draining one and one whose ARI is
/// down are serving or listed but not placeable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeable_nodes_leave_out_full_draining_and_deaf_ones() {
    use confroute_shared::types::{NodeLoad, NodeState};
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    let lease = Duration::from_secs(300);
    store
        .register(&fixtures::node("open", 100), lease)
        .await
        .expect("register");
    store
        .register(&fixtures::node("full", 1), lease)
        .await
        .expect("register");
    let mut draining = fixtures::node("draining", 100);
    draining.state = NodeState::Draining;
    store.register(&draining, lease).await.expect("register");
    store
        .claim(&"filler".parse().expect("name"), &[fixtures::id("full")])
        .await
        .expect("claim");
    let mut env = fixtures::redis_env(&cfg);
    env.push(("CONFROUTE_ROUTING__NODE_REFRESH".into(), "200ms".into()));
    let controller = ControllerProc::start(&env).expect("controller");
    let gauges = || async {
        let m = fixtures::scrape(&controller.http_url()).await;
        (
            fixtures::metric(&m, "confroute_nodes_placeable"),
            fixtures::metric(&m, r#"confroute_nodes{state="serving"}"#),
        )
    };
    confroute_tests::harness::wait_for_async(
        "one placeable node of two serving",
        Duration::from_secs(10),
        || async { (gauges().await == (1.0, 2.0)).then_some(()) },
    )
    .await
    .expect("placeable 1");
    // The open node's Asterisk goes: none takes a conference, both still serve.
    let deaf = NodeLoad {
        ari: false,
        ..NodeLoad::default()
    };
    store
        .heartbeat(&fixtures::id("open"), &deaf, lease, &[])
        .await
        .expect("heartbeat");
    confroute_tests::harness::wait_for_async(
        "no placeable node, two serving",
        Duration::from_secs(10),
        || async { (gauges().await == (0.0, 2.0)).then_some(()) },
    )
    .await
    .expect("placeable 0");
}

/// With a token, a request's `Origin` is not judged: a program behind a reverse proxy that
/// rewrites `Host` (its own `Origin` then names another host) is served on its token, and a
/// browser page cannot send the token anyway. Without the token it is refused as always.
#[tokio::test]
async fn with_a_token_a_foreign_origin_is_not_refused() {
    let s = setup(Some(TOKEN)).await;
    let route = |token: Option<&'static str>| {
        let mut req = fixtures::http()
            .post(format!("{}/v1/route", s.controller.http_url()))
            .header("origin", "https://public-name.example")
            .header("content-type", "application/json")
            .body(r#"{"conference":"behind-a-proxy"}"#);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let served = route(Some(TOKEN)).await.expect("request");
    assert_eq!(served.status().as_u16(), 200);
    let refused = route(None).await.expect("request");
    assert_eq!(refused.status().as_u16(), 401);
}
