//! The `ari-sim` binary: several independent simulated Asterisks, driven through ARI and the
//! `/_sim/` control API.

use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use confroute_tests::ari_sim::client::{ensure_crypto_provider, AriClient, EventStream};
use serde_json::{json, Value};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(10);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

async fn control(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> reqwest::Response {
    http.request(method, format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .expect("control API answers")
}

fn ty(e: &Value) -> &str {
    e.get("type").and_then(Value::as_str).unwrap_or("")
}

#[tokio::test]
async fn binary_serves_independent_servers_with_control_api() {
    ensure_crypto_provider();
    let (pa, pb) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_ari-sim"))
        .args([
            "--listen",
            &format!("127.0.0.1:{pa}"),
            "--listen",
            &format!("127.0.0.1:{pb}"),
        ])
        .args([
            "--username",
            "U",
            "--password",
            "P",
            "--channelvar",
            "CONFROUTE_CONFERENCE",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ari-sim starts");
    let (a, b) = (
        format!("http://127.0.0.1:{pa}"),
        format!("http://127.0.0.1:{pb}"),
    );
    let ca = AriClient::with_credentials(&a, "U", "P").expect("client");
    let cb = AriClient::with_credentials(&b, "U", "P").expect("client");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for c in [&ca, &cb] {
        loop {
            if let Ok(r) = c.call("GET", "/asterisk/ping", None).await {
                assert_eq!(r.status, 200);
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "ari-sim did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let id_a = ca
        .call("GET", "/asterisk/ping", None)
        .await
        .expect("ping")
        .json
        .expect("json")["asterisk_id"]
        .clone();
    let id_b = cb
        .call("GET", "/asterisk/ping", None)
        .await
        .expect("ping")
        .json
        .expect("json")["asterisk_id"]
        .clone();
    assert_ne!(id_a, id_b, "each server is its own Asterisk");

    let mut ws = EventStream::connect(&format!(
        "ws://127.0.0.1:{pa}/ari/events?app=confroute&api_key=U:P"
    ))
    .await
    .expect("events socket");
    let http = reqwest::Client::new();
    let r = control(
        &http,
        &a,
        reqwest::Method::POST,
        "/_sim/dial-in",
        json!({"app": "confroute", "args": ["sales-42"], "caller_number": "+15550001", "extension": "sales-42",
               "variables": {"CONFROUTE_CONFERENCE": "sales-42"}, "sip_headers": {"X-Conference": "sales-42"}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let ch = r.json::<Value>().await.expect("json")["channel_id"]
        .as_str()
        .expect("id")
        .to_string();
    let evs = ws
        .until(WAIT, |e| ty(e) == "StasisStart")
        .await
        .expect("StasisStart");
    let start = evs.last().expect("event");
    assert_eq!(start["channel"]["id"], ch.as_str());
    assert_eq!(
        start["channel"]["channelvars"]["CONFROUTE_CONFERENCE"],
        "sales-42"
    );
    assert_eq!(
        cb.call("GET", "/channels", None).await.expect("list").json,
        Some(json!([])),
        "the other server has no calls"
    );

    let r = control(
        &http,
        &a,
        reqwest::Method::POST,
        "/_sim/originate-behavior",
        json!({"match": {"prefix": "PJSIP/5551"}, "outcome": "busy"}),
    )
    .await;
    assert_eq!(r.status(), 204);
    let r = ca
        .call(
            "POST",
            "/channels?endpoint=PJSIP/5551000&app=confroute",
            None,
        )
        .await
        .expect("originate");
    assert_eq!(r.status, 200);
    let evs = ws
        .until(WAIT, |e| ty(e) == "ChannelDestroyed")
        .await
        .expect("busy call ends");
    assert_eq!(evs.last().expect("event")["cause"], 17);

    let r = control(
        &http,
        &a,
        reqwest::Method::POST,
        &format!("/_sim/channels/{ch}/dtmf"),
        json!({"digits": "1"}),
    )
    .await;
    assert_eq!(r.status(), 204);
    ws.until(WAIT, |e| ty(e) == "ChannelDtmfReceived")
        .await
        .expect("DTMF");
    let r = control(
        &http,
        &a,
        reqwest::Method::POST,
        &format!("/_sim/channels/{ch}/hangup"),
        json!({"cause": 16}),
    )
    .await;
    assert_eq!(r.status(), 204);
    ws.until(WAIT, |e| ty(e) == "StasisEnd")
        .await
        .expect("StasisEnd");

    let snap: Value = http
        .get(format!("{a}/_sim/snapshot"))
        .send()
        .await
        .expect("snapshot")
        .json()
        .await
        .expect("json");
    assert_eq!(snap["channels"], json!([]));
    let reqs: Value = http
        .get(format!("{a}/_sim/requests"))
        .send()
        .await
        .expect("requests")
        .json()
        .await
        .expect("json");
    assert!(
        reqs.as_array()
            .expect("list")
            .iter()
            .any(|r| r["operation"] == "originate" && r["status"] == 200),
        "{reqs}"
    );

    let r = control(
        &http,
        &a,
        reqwest::Method::POST,
        "/_sim/restart",
        json!({"downtime_ms": 100}),
    )
    .await;
    assert_eq!(r.status(), 204);
    assert!(ws.closed(WAIT).await, "the events socket closes on restart");

    child.kill().await.expect("ari-sim stops");
}
