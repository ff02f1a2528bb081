//! `http.header_timeout` on both binaries' HTTP servers: a connection that sends half a
//! request head or half a body, or sits idle after an answer, is closed once the timeout
//! passes, where it used to hold its task and file descriptor for good; whole requests are
//! served as before.

use std::time::Duration;

use confroute_tests::fixtures;
use confroute_tests::harness::{free_port, ControllerProc, NodeProc, RedisServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection; `None` when it stays open past `within`.
/// Returns what was read.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Checks the server on `port` with a 1 s header timeout: a half-sent head and an idle
/// keep-alive connection are both closed well within 10 s, and a whole request is answered.
async fn slow_and_idle_connections_are_closed(port: u16, path: &str) {
    let addr = format!("127.0.0.1:{port}");
    // Half a request head, never finished.
    let mut half = TcpStream::connect(&addr).await.expect("connect");
    half.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n").as_bytes())
        .await
        .expect("write");
    let got = closed_within(&mut half, Duration::from_secs(10)).await;
    assert!(
        got.is_some(),
        "a half-sent request head kept its connection"
    );
    assert!(
        !String::from_utf8_lossy(&got.unwrap_or_default()).starts_with("HTTP/1.1 200"),
        "the unfinished request was answered"
    );

    // A whole request is answered; the connection then idles and is closed.
    let mut idle = TcpStream::connect(&addr).await.expect("connect");
    idle.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let got = closed_within(&mut idle, Duration::from_secs(10))
        .await
        .expect("an idle keep-alive connection was kept");
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_closes_slow_and_idle_http_connections() {
    let redis = RedisServer::start().expect("redis");
    let mut env = fixtures::redis_env(&fixtures::single(&redis.url()));
    env.push(("CONFROUTE_HTTP__HEADER_TIMEOUT".into(), "1s".into()));
    let controller = ControllerProc::start(&env).expect("controller");
    slow_and_idle_connections_are_closed(controller.http_port, "/healthz").await;

    // A body announced and never finished: refused once the timeout has passed, and the
    // connection closed, rather than a handler waiting for it for good.
    let mut slow = TcpStream::connect(format!("127.0.0.1:{}", controller.http_port))
        .await
        .expect("connect");
    slow.write_all(
        b"POST /v1/route HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"conference\"",
    )
    .await
    .expect("write");
    let got = closed_within(&mut slow, Duration::from_secs(10))
        .await
        .expect("a half-sent body kept its connection");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("http.header_timeout"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_agent_closes_slow_and_idle_http_connections() {
    let redis = RedisServer::start().expect("redis");
    let mut env = fixtures::redis_env(&fixtures::single(&redis.url()));
    env.push(("CONFROUTE_HTTP__HEADER_TIMEOUT".into(), "1s".into()));
    // No Asterisk is needed for /healthz: the agent serves HTTP while ARI is away.
    env.push((
        "CONFROUTE_ARI__URL".into(),
        format!("http://127.0.0.1:{}", free_port()),
    ));
    let node = NodeProc::start("node-t", &env).expect("node");
    slow_and_idle_connections_are_closed(node.http_port, "/healthz").await;
}
