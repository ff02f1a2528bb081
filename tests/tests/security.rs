//! Security checks across the whole system: bad conference names are refused at every entry
//! (SIP, HTTP, JSON-RPC, ARI app args) and create nothing; the API token, the ARI password
//! and the Redis password never appear in any log, even at debug level and on failures;
//! message size limits hold on SIP.

use std::net::UdpSocket;
use std::time::Duration;

use confroute_tests::ari_sim::{AriSim, DialIn, SimConfig};
use confroute_tests::fixtures;
use confroute_tests::harness::{wait_for_async, ControllerProc, NodeProc, RedisServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const REDIS_PW: &str = "redis-pw-7c1e0b9a52f4";
const TOKEN: &str = "api-token-3f9d2a71c8e0b4d6";
const ARI_PW: &str = "ari-pw-5b8e1d0c7a93";
const NODE_TOKEN: &str = "node-token-91ab0c7e55d2";

/// Conference names that must be refused everywhere, with a label.
fn bad_names() -> Vec<(&'static str, String)> {
    vec![
        ("CR/LF", "a\r\nb".to_string()),
        ("braces", "{conf}".to_string()),
        ("colon", "a:b".to_string()),
        ("%00", "%00".to_string()),
        ("NUL", "a\0b".to_string()),
        ("overlong", "x".repeat(129)),
        ("non-ASCII", "caf\u{e9}".to_string()),
        ("space", "a b".to_string()),
        ("at sign", "a@b".to_string()),
        ("slash", "../etc".to_string()),
    ]
}

struct System {
    redis: RedisServer,
    controller: ControllerProc,
    node: NodeProc,
    sim: AriSim,
}

fn common_env(redis: &RedisServer) -> Vec<(String, String)> {
    vec![
        ("CONFROUTE_REDIS__URL".into(), redis.url()),
        ("CONFROUTE_REDIS__PASSWORD".into(), REDIS_PW.into()),
        // Everything, libraries' trace lines included (an HTTP or WebSocket handshake
        // dumped whole carries the ARI credentials).
        ("CONFROUTE_LOG__LEVEL".into(), "trace".into()),
    ]
}

async fn system() -> System {
    let redis =
        RedisServer::start_with(&["--requirepass", REDIS_PW]).expect("redis with a password");
    let sim = AriSim::start(SimConfig {
        username: "confroute".into(),
        password: ARI_PW.into(),
        ..SimConfig::default()
    })
    .await
    .expect("simulated Asterisk");
    let mut env = common_env(&redis);
    env.push(("CONFROUTE_HTTP__API_TOKEN".into(), TOKEN.into()));
    let controller = ControllerProc::start(&env).expect("controller");
    let mut env = common_env(&redis);
    env.extend([
        ("CONFROUTE_ARI__URL".to_string(), sim.base_url()),
        (
            "CONFROUTE_ARI__USERNAME".to_string(),
            "confroute".to_string(),
        ),
        ("CONFROUTE_ARI__PASSWORD".to_string(), ARI_PW.to_string()),
        (
            "CONFROUTE_HTTP__API_TOKEN".to_string(),
            NODE_TOKEN.to_string(),
        ),
    ]);
    let node = NodeProc::start("node-a", &env).expect("node agent");
    // Ready for calls: the agent's Stasis app is up and the controller sees the node.
    let app_up = sim
        .wait_until(Duration::from_secs(10), |s| {
            s.apps.iter().any(|a| a.name == "confroute" && a.active)
        })
        .await;
    assert!(app_up, "agent never connected\n{}", node.output());
    // Only with its ARI up in the controller's view are conferences placed on it.
    fixtures::wait_placeable(&controller.http_url(), 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", controller.output(), node.output()));
    System {
        redis,
        controller,
        node,
        sim,
    }
}

fn sip_invite(to: std::net::SocketAddr, uri_user: &str, header: Option<&str>) -> String {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let port = socket.local_addr().expect("addr").port();
    let branch = format!("z9hG4bK{:x}", rand::random::<u64>());
    let extra = header
        .map(|h| format!("X-Conference: {h}\r\n"))
        .unwrap_or_default();
    let msg = format!(
        "INVITE sip:{uri_user}@router SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch}\r\n\
         From: <sip:a@b>;tag=1\r\nTo: <sip:router>\r\nCall-ID: {branch}\r\nCSeq: 1 INVITE\r\n\
         {extra}Content-Length: 0\r\n\r\n"
    );
    socket.send_to(msg.as_bytes(), to).expect("send");
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("an answer");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_are_refused_at_every_entry_and_create_nothing() {
    let s = system().await;
    let base = s.controller.http_url();
    let http = fixtures::http();
    let mut req = format!("ws://127.0.0.1:{}/v1/rpc", s.controller.http_port)
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket");

    for (i, (label, name)) in bad_names().into_iter().enumerate() {
        // SIP: in the Request-URI (escaped, as a SIP URI must carry these bytes) and, where a
        // header can hold it, in X-Conference.
        let answer = sip_invite(s.controller.sip_addr(), &percent_encode(&name), None);
        assert!(
            answer.starts_with("SIP/2.0 404"),
            "{label} in the URI: {answer}"
        );
        assert!(
            answer.contains("\r\nWarning: 399 confroute "),
            "{label}: {answer}"
        );
        if !name.contains(['\r', '\n', '\0']) {
            let answer = sip_invite(s.controller.sip_addr(), "ok-name", Some(&name));
            assert!(
                answer.starts_with("SIP/2.0 404"),
                "{label} in X-Conference: {answer}"
            );
        }

        // HTTP: the routing body and the conference path.
        let resp = http
            .post(format!("{base}/v1/route"))
            .bearer_auth(TOKEN)
            .json(&json!({"conference": name}))
            .send()
            .await
            .expect("route");
        assert_eq!(resp.status().as_u16(), 422, "{label} in /v1/route");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"]["code"], "invalid_conference", "{label}");
        let resp = http
            .get(format!("{base}/v1/conferences/{}", percent_encode(&name)))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status().as_u16(), 422, "{label} in the path");

        // JSON-RPC.
        for method in [
            "conference.get",
            "subscribe",
            "unsubscribe",
            "participant.mute",
        ] {
            let id = i * 10 + method.len();
            // Each method's own params, so the name is what it refuses.
            let params = if method.starts_with("participant.") {
                json!({"conference": name, "participant": "p1"})
            } else {
                json!({"conference": name})
            };
            let msg = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id});
            ws.send(Message::Text(msg.to_string().into()))
                .await
                .expect("send");
            loop {
                let Some(Ok(Message::Text(t))) = ws.next().await else {
                    panic!("websocket closed");
                };
                let v: Value = serde_json::from_str(t.as_str()).expect("json");
                if v["id"] == json!(id) {
                    assert_eq!(v["error"]["code"], -32602, "{label} via {method}: {v}");
                    assert!(
                        v["error"]["message"]
                            .as_str()
                            .is_some_and(|m| m.starts_with("conference")),
                        "{label} via {method}: the name is what is refused: {v}"
                    );
                    break;
                }
            }
        }

        // ARI: a caller entering the Stasis app with the bad name as its argument.
        let channel = s
            .sim
            .dial_in(DialIn {
                app: "confroute".into(),
                args: vec![name.clone()],
                ..DialIn::default()
            })
            .await
            .expect("dial in");
        wait_for_async(
            &format!("{label}: caller refused"),
            Duration::from_secs(10),
            || async { s.sim.snapshot().channel(&channel).is_none().then_some(()) },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}: the agent must hang up a caller with a bad name"));
    }

    let keys: Vec<String> = s
        .redis
        .query(redis::cmd("KEYS").arg("{confroute}:conf:*"))
        .and_then(|v| redis::from_redis_value(v).ok())
        .expect("read keys");
    assert!(keys.is_empty(), "bad names claimed nothing: {keys:?}");
    assert!(s.sim.snapshot().bridges.is_empty(), "no bridge was created");
    let m = fixtures::scrape(&base).await;
    assert!(fixtures::metric(&m, r#"confroute_route_total{outcome="invalid"}"#) >= 10.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs() {
    let s = system().await;
    let base = s.controller.http_url();
    let http = fixtures::http();
    // Normal traffic: a routed call that joins, API calls with and without the token.
    let answer = sip_invite(s.controller.sip_addr(), "secret-check", None);
    assert!(answer.starts_with("SIP/2.0 302"), "{answer}");
    let channel = s
        .sim
        .dial_in(DialIn {
            app: "confroute".into(),
            args: vec!["secret-check".into()],
            // A mistyped callback with a password in it: refused with a warning that
            // must not repeat it.
            variables: [(
                "CONFROUTE_STATUS_CALLBACK".to_string(),
                format!("htps://app:{TOKEN}@app.example/cb"),
            )]
            .into(),
            ..DialIn::default()
        })
        .await
        .expect("dial in");
    wait_for_async("caller in a bridge", Duration::from_secs(10), || async {
        s.sim
            .snapshot()
            .channel(&channel)
            .and_then(|c| c.bridge.clone())
    })
    .await
    .expect("joined");
    for token in [Some(TOKEN), Some("wrong-token-000000000"), None] {
        let mut r = http.get(format!("{base}/v1/nodes"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.expect("nodes");
    }
    let r = http
        .post(format!("{}/v1/drain", s.node.http_url()))
        .bearer_auth("wrong-node-token-000")
        .send()
        .await
        .expect("drain");
    assert_eq!(r.status().as_u16(), 401);
    s.sim.hangup_far_end(&channel, 16).await.expect("hang up");

    // Failure paths that log connection errors: a controller whose Redis password is wrong,
    // and a config error carrying a password in a URL.
    let mut env = common_env(&s.redis);
    env.retain(|(k, _)| k != "CONFROUTE_REDIS__PASSWORD");
    env.push((
        "CONFROUTE_REDIS__PASSWORD".into(),
        format!("{REDIS_PW}-wrong"),
    ));
    env.push(("CONFROUTE_HTTP__API_TOKEN".into(), TOKEN.into()));
    let wrong = ControllerProc::start(&env).expect("controller with a wrong password");
    let answer = sip_invite(wrong.sip_addr(), "x", None);
    assert!(answer.starts_with("SIP/2.0 503"), "{answer}");
    let bad_url = std::process::Command::new(
        confroute_tests::harness::workspace_bin("confroute-controller").expect("binary"),
    )
    .env(
        "CONFROUTE_REDIS__URL",
        format!("http://user:{REDIS_PW}@127.0.0.1:1"),
    )
    .output()
    .expect("run");
    let bad_url_text = format!(
        "{}{}",
        String::from_utf8_lossy(&bad_url.stdout),
        String::from_utf8_lossy(&bad_url.stderr)
    );
    assert!(bad_url_text.contains("redis.url"), "{bad_url_text}");
    // The agent's URLs with a password in them: refused ones name their key, not the
    // password; an ARI URL it starts with is logged without it.
    let bad_node = std::process::Command::new(
        confroute_tests::harness::workspace_bin("confroute-node").expect("binary"),
    )
    .env(
        "CONFROUTE_ARI__URL",
        format!("ws://confroute:{ARI_PW}@127.0.0.1:1"),
    )
    .env(
        "CONFROUTE_CONFERENCE__STATUS_CALLBACK",
        format!("ftp://app:{TOKEN}@app.example/cb"),
    )
    .env(
        "CONFROUTE_PROFILES__VIP__STATUS_CALLBACK",
        format!("https://169.254.169.254/cb?token={NODE_TOKEN}"),
    )
    .output()
    .expect("run");
    let bad_node_text = format!(
        "{}{}",
        String::from_utf8_lossy(&bad_node.stdout),
        String::from_utf8_lossy(&bad_node.stderr)
    );
    for key in [
        "ari.url",
        "conference.status_callback",
        "profiles.vip.status_callback",
    ] {
        assert!(bad_node_text.contains(key), "{key}: {bad_node_text}");
    }
    let mut env = common_env(&s.redis);
    env.push((
        "CONFROUTE_ARI__URL".into(),
        s.sim
            .base_url()
            .replacen("http://", &format!("http://confroute:{ARI_PW}@"), 1),
    ));
    env.push(("CONFROUTE_ARI__PASSWORD".into(), ARI_PW.into()));
    let with_userinfo = NodeProc::start("node-u", &env).expect("node with a password in ari.url");
    assert!(
        with_userinfo.output().contains("confroute-node started"),
        "{}",
        with_userinfo.output()
    );

    assert!(
        s.node
            .output()
            .contains("not an http(s) URL (scheme `htps`)"),
        "the refused callback was warned of: {}",
        s.node.output()
    );
    // The ARI credentials as Basic authentication sends them.
    let ari_basic = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("confroute:{ARI_PW}"))
    };
    let logs = [
        ("controller", s.controller.output()),
        ("node", s.node.output()),
        ("controller with a wrong Redis password", wrong.output()),
        ("config error", bad_url_text),
        ("node config error", bad_node_text),
        ("node with a password in ari.url", with_userinfo.output()),
    ];
    for (who, text) in &logs {
        assert!(!text.is_empty(), "{who} logged something");
        for secret in [REDIS_PW, TOKEN, ARI_PW, NODE_TOKEN, &ari_basic] {
            assert!(!text.contains(secret), "{who} logged a secret:\n{text}");
        }
    }
    assert!(
        logs[0].1.contains("TRACE") || logs[1].1.contains("TRACE"),
        "trace logging was on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sip_message_size_limits_hold() {
    let redis = RedisServer::start().expect("redis");
    let mut env = fixtures::redis_env(&fixtures::single(&redis.url()));
    env.push(("CONFROUTE_SIP__MAX_MESSAGE_SIZE".into(), "2048".into()));
    let controller = ControllerProc::start(&env).expect("controller");

    // UDP: an oversized datagram whose header block does not fit is dropped and counted;
    // the socket keeps working.
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(400)))
        .expect("timeout");
    let port = socket.local_addr().expect("addr").port();
    let big = format!(
        "OPTIONS sip:router SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKbig\r\n\
         From: <sip:a@b>;tag=1\r\nTo: <sip:router>\r\nCall-ID: big\r\nCSeq: 1 OPTIONS\r\n\
         X-Padding: {}\r\nContent-Length: 0\r\n\r\n",
        "p".repeat(3000)
    );
    socket
        .send_to(big.as_bytes(), controller.sip_addr())
        .expect("send");
    let mut buf = [0u8; 4096];
    assert!(
        socket.recv(&mut buf).is_err(),
        "an oversized datagram gets no answer"
    );
    let small = big.replace(&"p".repeat(3000), "p");
    socket
        .send_to(small.as_bytes(), controller.sip_addr())
        .expect("send");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let n = socket.recv(&mut buf).expect("answer");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("SIP/2.0 200"));
    // One whose header block fits but whose body does not is answered 513 (RFC 3261
    // §21.5.14), as over TCP, instead of being retransmitted for 32 s.
    let big_body = format!(
        "INVITE sip:room@router SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKbody\r\n\
         From: <sip:a@b>;tag=1\r\nTo: <sip:room@router>\r\nCall-ID: body\r\nCSeq: 1 INVITE\r\n\
         Content-Type: application/sdp\r\nContent-Length: 3000\r\n\r\n{}",
        "v".repeat(3000)
    );
    socket
        .send_to(big_body.as_bytes(), controller.sip_addr())
        .expect("send");
    let n = socket.recv(&mut buf).expect("answer");
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(answer.starts_with("SIP/2.0 513 "), "{answer}");
    assert!(answer.contains("Call-ID: body\r\n"), "{answer}");
    let m = fixtures::scrape(&controller.http_url()).await;
    assert_eq!(
        fixtures::metric(&m, r#"confroute_sip_dropped_total{reason="too_large"}"#),
        1.0
    );
    assert_eq!(
        fixtures::metric(&m, r#"confroute_route_total{outcome="claimed"}"#),
        0.0,
        "nothing routed"
    );

    // TCP: a header block that never ends within the limit closes the connection.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(controller.sip_addr())
        .await
        .expect("connect");
    let endless = format!(
        "OPTIONS sip:router SIP/2.0\r\nX-Padding: {}",
        "p".repeat(4096)
    );
    let _ = tcp.write_all(endless.as_bytes()).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(_)) | Ok(Err(_))),
        "the controller closed the connection"
    );
    assert!(rest.is_empty(), "and answered nothing");
    let m = fixtures::scrape(&controller.http_url()).await;
    assert_eq!(
        fixtures::metric(&m, r#"confroute_sip_dropped_total{reason="unframeable"}"#),
        1.0
    );
}

/// A web page of another site, opened in a browser that reaches the API (left without a
/// token here), cannot use it: its POSTs and its WebSocket handshake carry its `Origin`, and
/// the controller and the agent refuse them (403 `cross_site`) and change nothing. A
/// program naming the server itself in `Origin` (as some WebSocket libraries do) is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_pages_of_other_sites_cannot_use_an_api_without_a_token() {
    let redis = RedisServer::start().expect("redis");
    let sim = AriSim::start(SimConfig {
        username: "confroute".into(),
        password: ARI_PW.into(),
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let env = vec![("CONFROUTE_REDIS__URL".to_string(), redis.url())];
    let controller = ControllerProc::start(&env).expect("controller");
    let mut node_env = env.clone();
    node_env.extend([
        ("CONFROUTE_ARI__URL".to_string(), sim.base_url()),
        (
            "CONFROUTE_ARI__USERNAME".to_string(),
            "confroute".to_string(),
        ),
        ("CONFROUTE_ARI__PASSWORD".to_string(), ARI_PW.to_string()),
    ]);
    let node = NodeProc::start("node-a", &node_env).expect("node agent");
    fixtures::wait_placeable(&controller.http_url(), 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", controller.output(), node.output()));
    const PAGE: &str = "https://pages.example";
    let http = fixtures::http();
    let refused = |resp: reqwest::Response| async move {
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.expect("JSON error body");
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["code"], "cross_site", "{body}");
        assert!(
            fixtures::documented_error_codes()
                .iter()
                .any(|c| c == "cross_site"),
            "cross_site is in docs/openapi.json"
        );
    };
    // A page's form-like POSTs, which a browser sends without asking first.
    let c = controller.http_url();
    for (path, body) in [
        ("/v1/route", r#"{"conference":"from-a-page"}"#),
        ("/v1/nodes/node-a/drain", ""),
    ] {
        let resp = http
            .post(format!("{c}{path}"))
            .header("origin", PAGE)
            .header("content-type", "text/plain")
            .body(body)
            .send()
            .await
            .expect("request");
        refused(resp).await;
    }
    let resp = http
        .post(format!("{}/v1/drain?shutdown=true", node.http_url()))
        .header("origin", PAGE)
        .send()
        .await
        .expect("request");
    refused(resp).await;
    let nodes: Value = http
        .get(format!("{c}/v1/nodes"))
        .send()
        .await
        .expect("nodes")
        .json()
        .await
        .expect("JSON");
    assert_eq!(nodes["items"][0]["state"], "serving", "{nodes}");
    let conf: Value = http
        .get(format!("{c}/v1/conferences/from-a-page"))
        .send()
        .await
        .expect("conference")
        .json()
        .await
        .expect("JSON");
    assert_eq!(conf["error"]["code"], "conference_not_found", "{conf}");

    // The call-control WebSocket: a page's handshake is refused, a program's is served.
    let ws = |origin: String| {
        let mut req = format!("ws://127.0.0.1:{}/v1/rpc", controller.http_port)
            .into_client_request()
            .expect("request");
        req.headers_mut()
            .insert("origin", origin.parse().expect("header"));
        tokio_tungstenite::connect_async(req)
    };
    match ws(PAGE.to_string()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 403)
        }
        other => panic!(
            "a page's WebSocket was not refused: {:?}",
            other.map(|_| ())
        ),
    }
    let own = format!("http://127.0.0.1:{}", controller.http_port);
    let (mut socket, _) = ws(own)
        .await
        .expect("a program naming the server is served");
    socket
        .send(Message::Text(
            r#"{"jsonrpc":"2.0","id":1,"method":"conference.list","params":{}}"#.into(),
        ))
        .await
        .expect("send");
    let answer = loop {
        match socket.next().await.expect("answer").expect("frame") {
            Message::Text(t) => break serde_json::from_str::<Value>(&t).expect("JSON"),
            _ => continue,
        }
    };
    assert!(answer["result"].is_object(), "{answer}");
}
