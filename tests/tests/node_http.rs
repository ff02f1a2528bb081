//! The agent's HTTP API refuses bad requests with a JSON error and changes nothing:
//! a missing or wrong bearer token, an unknown route, a wrong method; health never depends
//! on Redis or ARI, readiness does.

mod node_common;

use confroute_shared::types::NodeState;
use confroute_tests::fixtures;
use confroute_tests::harness::{NodeProc, RedisServer};
use node_common::*;
use serde_json::Value;

const TOKEN: &str = "an-admin-token-of-some-length";

async fn call(method: &str, url: &str, token: Option<&str>) -> (u16, Value) {
    let http = fixtures::http();
    let mut req = match method {
        "POST" => http.post(url),
        _ => http.get(url),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_and_change_nothing() {
    let s = Single::start(&[("CONFROUTE_HTTP__API_TOKEN", TOKEN)]).await;
    let store = fixtures::store(&s.cfg);
    let base = s.node.http_url();
    let state = || async {
        store
            .get_node(&fixtures::id("node-a"))
            .await
            .expect("redis")
            .map(|n| n.info.state)
    };
    for token in [None, Some("wrong-token-wrong-token")] {
        let (status, body) = call("POST", &format!("{base}/v1/drain"), token).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], "unauthorized");
        assert_eq!(state().await, Some(NodeState::Serving), "nothing changed");
    }
    let (status, body) = call("GET", &format!("{base}/v1/conferences"), None).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (401, "unauthorized".into())
    );
    // A wrong method without the token says nothing of the methods the path takes.
    let wrong = fixtures::http()
        .get(format!("{base}/v1/drain"))
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status().as_u16(), 401);
    assert!(
        wrong.headers().get("allow").is_none(),
        "{:?}",
        wrong.headers()
    );
    // The scheme is case-insensitive (RFC 9110 §11.1), as on the controller.
    let lower = fixtures::http()
        .get(format!("{base}/v1/conferences"))
        .header("Authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .expect("request");
    assert_eq!(lower.status().as_u16(), 200);
    let (status, body) = call("GET", &format!("{base}/v1/nope"), Some(TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "route_not_found");
    // Without the token, which /v1 routes exist is not told.
    let (status, body) = call("GET", &format!("{base}/v1/nope"), None).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (401, "unauthorized".into())
    );
    let (status, body) = call("GET", &format!("{base}/v1/undrain"), Some(TOKEN)).await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["error"]["code"], "method_not_allowed");
    // Nor does a wrong method tell it.
    let (status, body) = call("GET", &format!("{base}/v1/undrain"), None).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (401, "unauthorized".into())
    );
    assert_eq!(state().await, Some(NodeState::Serving));
    // Health and metrics stay open; the token opens the admin routes.
    assert_eq!(call("GET", &format!("{base}/healthz"), None).await.0, 200);
    let (status, body) = call("GET", &format!("{base}/readyz"), None).await;
    assert_eq!(
        (status, body["ari"].clone(), body["redis"].clone()),
        (200, true.into(), true.into())
    );
    confroute_tests::harness::wait_for_async("readyz to report the bus up", WAIT, || async {
        let (_, body) = call("GET", &format!("{base}/readyz"), None).await;
        (body["bus"] == true).then_some(())
    })
    .await
    .expect("bus reported up");
    let (status, body) = call("POST", &format!("{base}/v1/drain"), Some(TOKEN)).await;
    assert_eq!((status, body["state"].clone()), (200, "draining".into()));
    assert_eq!(state().await, Some(NodeState::Draining));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_without_ari_or_redis_and_readiness_with_both() {
    // Nothing listens on the ARI port and Redis is gone: alive, not ready.
    let mut redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let closed = confroute_tests::harness::free_port();
    let mut env = fixtures::redis_env(&cfg);
    env.push((
        "CONFROUTE_ARI__URL".into(),
        format!("http://127.0.0.1:{closed}"),
    ));
    let node = NodeProc::start("node-a", &env).expect("starts without Asterisk");
    let base = node.http_url();
    // Subscribed first, so that losing it is what the end shows.
    confroute_tests::harness::wait_for_async("readyz to report the bus up", WAIT, || async {
        let (_, body) = call("GET", &format!("{base}/readyz"), None).await;
        (body["bus"] == true).then_some(())
    })
    .await
    .expect("bus reported up");
    redis.kill();
    assert_eq!(call("GET", &format!("{base}/healthz"), None).await.0, 200);
    let (status, body) = call("GET", &format!("{base}/readyz"), None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ari"], false);
    assert_eq!(body["redis"], false);
    // The command bus lost its subscription with Redis, and says so.
    confroute_tests::harness::wait_for_async("readyz to report the bus down", WAIT, || async {
        let (_, body) = call("GET", &format!("{base}/readyz"), None).await;
        (body["bus"] == false).then_some(())
    })
    .await
    .expect("bus reported down");
}

/// An agent pointed at a Redis that answers reads but refuses its writes (a replica, a read
/// endpoint) never registers: `/readyz` says so, though `PING` is answered and ARI is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_needs_the_node_registered_not_only_redis_answering() {
    let (primary, replica) = RedisServer::with_replica().expect("primary and replica");
    let cfg = fixtures::single(&replica.url());
    let sim = sim().await;
    let mut node = NodeProc::start("node-a", &env(&sim, &cfg, &[])).expect("node starts");
    wait_app(&sim, &node).await;
    node.wait_log("cannot read this node's record", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    let (status, body) = call("GET", &format!("{}/readyz", node.http_url()), None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["registered"], false, "{body}");
    assert_eq!(body["redis"], true, "{body}");
    assert_eq!(body["ari"], true, "{body}");
    drop(primary);
}

/// Talk detection shows in the node's own listing as it happens, not only at the next
/// join, mute or hold of the conference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_shows_who_is_talking_as_it_changes() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let a = dial(&s.sim, "chatty", &[]).await;
    wait_bridged(&s.sim, &a).await;
    let base = s.node.http_url();
    let talking = || async {
        let (status, body) = call("GET", &format!("{base}/v1/conferences"), None).await;
        assert_eq!(status, 200, "{body}");
        body["items"][0]["participants"][0]["talking"].as_bool()
    };
    assert_eq!(talking().await, Some(false));
    for (now, duration) in [(true, 0), (false, 1200)] {
        s.sim
            .caller_talks(&a, now, duration)
            .await
            .expect("talk detection");
        confroute_tests::harness::wait_for_async(
            "the listing follows talk detection",
            WAIT,
            || async { (talking().await == Some(now)).then_some(()) },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    }
}

/// An Asterisk that refuses the agent's writes (a user ari.conf made `read_only`) takes the
/// node out of placement, and `/readyz` says so: its events still come, but no call can be
/// answered or bridged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_asterisk_refuses_writes() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let ready = format!("{}/readyz", s.node.http_url());
    let (status, body) = call("GET", &ready, None).await;
    assert_eq!((status, body["ari"].clone()), (200, true.into()), "{body}");
    s.sim.set_read_only(true);
    // A caller's answer is the write Asterisk refuses.
    dial(&s.sim, "refused", &[]).await;
    confroute_tests::harness::wait_for_async("readyz to report ARI unusable", WAIT, || async {
        let (status, body) = call("GET", &ready, None).await;
        (status == 503 && body["ari"] == false).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
}

/// Readiness waits for Redis as long as `redis.timeout` lets every other Redis call wait: a
/// Redis slower than a second but within that (a distant region, a busy server) leaves the
/// node ready, serving as its heartbeats still renew it, rather than flapping out of the
/// Service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_redis_as_long_as_redis_timeout() {
    let Proxied {
        redis: _redis,
        proxy,
        sim: _sim,
        node,
        ..
    } = behind_a_proxy(&[
        ("CONFROUTE_REDIS__TIMEOUT", "5s"),
        ("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "3s"),
        ("CONFROUTE_REDIS__CONFERENCE_LEASE", "30s"),
    ])
    .await;
    let url = format!("{}/readyz", node.http_url());
    confroute_tests::harness::wait_for_async("ready", WAIT, || async {
        (call("GET", &url, None).await.0 == 200).then_some(())
    })
    .await
    .expect("ready at first");
    // Each Redis round trip now takes 1.4 s.
    proxy.set_delay(std::time::Duration::from_millis(700));
    let (status, body) = call("GET", &url, None).await;
    assert_eq!(
        (status, body["redis"].clone()),
        (200, true.into()),
        "{body}\n{}",
        node.output()
    );
}
