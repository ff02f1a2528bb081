//! The node's bus publisher (answers, dial-out statuses and conference events over Redis
//! pub/sub) with Redis a little slow: a stopping node still publishes its last events before
//! it exits, and a command's answer is not held behind a burst of events.

mod node_common;

use std::time::Duration;

use confroute_shared::bus::Bus;
use confroute_shared::config::RedisConfig;
use confroute_tests::fixtures;
use confroute_tests::harness::{wait_for_async, ControllerProc, NodeProc, RedisServer, TcpProxy};
use futures_util::StreamExt;
use node_common::*;
use serde_json::{json, Value};

const CONFERENCES: usize = 4;
const CALLERS: usize = 100;

/// [`Proxied`] with `CALLERS` callers in each of `CONFERENCES` conferences `crowd-0` ...;
/// the proxy passes bytes on at once.
struct Crowd {
    redis: RedisServer,
    proxy: TcpProxy,
    cfg: RedisConfig,
    sim: TestSim,
    node: NodeProc,
    callers: Vec<String>,
}

async fn crowd() -> Crowd {
    let Proxied {
        redis,
        proxy,
        cfg,
        sim,
        node,
    } = behind_a_proxy(&[
        ("CONFROUTE_NODE__DRAIN_DEADLINE", "1s"),
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
    ])
    .await;
    let mut callers = Vec::new();
    for c in 0..CONFERENCES {
        for _ in 0..CALLERS {
            callers.push(dial(&sim, &format!("crowd-{c}"), &[]).await);
        }
    }
    for ch in &callers {
        wait_bridged(&sim, ch).await;
    }
    Crowd {
        redis,
        proxy,
        cfg,
        sim,
        node,
        callers,
    }
}

/// A stopping node's last bus messages go out before it exits: at the drain deadline it
/// ends its conferences at once, and a burst of `leave` events, then each conference's
/// `end`, is queued just before it deregisters. With Redis a little slow the publisher is
/// still working through them then; call control's subscribers must see every conference
/// end all the same, not have the tail cut off with the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_publishes_its_last_events_before_it_exits() {
    let mut c = crowd().await;
    let client = redis::Client::open(c.redis.url()).expect("client");
    let mut events = client.get_async_pubsub().await.expect("pubsub");
    events
        .subscribe(format!("{}events", c.cfg.prefix))
        .await
        .expect("subscribe");
    // Each publish now takes a few milliseconds: the last events queue up behind each other.
    c.proxy.set_delay(Duration::from_millis(2));
    c.node.process().signal(libc::SIGTERM).expect("sigterm");
    let code = c
        .node
        .process()
        .wait_exit(Duration::from_secs(30))
        .expect("exits");
    assert_eq!(code, Some(0), "{}", c.node.output());
    // Everything published before the exit is in the subscription's buffer by now.
    let mut stream = events.on_message();
    let (mut ended, mut left) = (std::collections::BTreeSet::new(), 0);
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(2), stream.next()).await {
        let payload: Vec<u8> = msg.get_payload().unwrap_or_default();
        let v: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
        match v["event"].as_str() {
            Some("end") => {
                ended.insert(v["conference"].as_str().unwrap_or_default().to_string());
            }
            Some("leave") => left += 1,
            _ => {}
        }
    }
    assert_eq!(left, CONFERENCES * CALLERS, "every leave published");
    assert_eq!(ended.len(), CONFERENCES, "every end published: {ended:?}");
}

/// A command's answer goes out ahead of events queued before it: when a burst of events
/// (here 400 callers leaving at once, some 2.4 s of publishing) backs up behind a slow
/// Redis, an answer queued after them would reach its controller past the command's 1 s
/// deadline, which then reports the node
/// unavailable for a command the node carried out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_answer_is_not_held_behind_a_burst_of_events() {
    let c = crowd().await;
    // A conference of its own, whose actor has nothing else to do.
    let quiet = dial(&c.sim, "quiet", &[]).await;
    wait_bridged(&c.sim, &quiet).await;
    let bus = Bus::controller(fixtures::store(&fixtures::single(&c.redis.url())));
    assert!(bus.wait_connected(Duration::from_secs(10)).await);
    c.proxy.set_delay(Duration::from_millis(3));
    let hangups = c.callers.iter().map(|ch| c.sim.hangup_far_end(ch, 16));
    for r in futures_util::future::join_all(hangups).await {
        r.expect("hang up");
    }
    // The agent has ended the crowd's conferences, so their leave and end events are all
    // queued (far from all published); the command follows.
    let hosted = format!("{}/v1/conferences", c.node.http_url());
    wait_for_async("the crowd's conferences ended", WAIT, || async {
        let v = fixtures::try_get_json(&hosted).await?;
        let names: Vec<&str> = v["items"]
            .as_array()?
            .iter()
            .filter_map(|c| c["conference"].as_str())
            .collect();
        (names == ["quiet"]).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.node.output()));
    let call = bus
        .call(
            &fixtures::id("node-a"),
            "participant.list",
            json!({"conference": "quiet"}),
            Duration::from_secs(1),
            false,
        )
        .await
        .unwrap_or_else(|e| panic!("answered within 1 s: {e:?}\n{}", c.node.output()));
    let listed = call.reply.expect("listed").to_string();
    assert!(listed.contains(&quiet), "{listed}");
}

/// An agent whose link to Redis runs through `proxy` (which the test can silence), and a
/// controller reaching Redis directly, with a call-control client subscribed to
/// `conference`.
struct Watched {
    _redis: RedisServer,
    proxy: TcpProxy,
    sim: TestSim,
    node: NodeProc,
    _controller: ControllerProc,
    ws: control::Client,
}

async fn watched(conference: &str, extra: &[(&str, &str)]) -> Watched {
    let redis = RedisServer::start().expect("redis");
    let upstream = format!("127.0.0.1:{}", redis.port()).parse().expect("addr");
    let proxy = TcpProxy::start(upstream).await.expect("proxy");
    let sim = sim().await;
    let mut settings = vec![("CONFROUTE_CONFERENCE__BEEP", "false")];
    settings.extend_from_slice(extra);
    let mut node = NodeProc::start(
        "node-a",
        &env(&sim, &fixtures::single(&proxy.redis_url()), &settings),
    )
    .expect("node");
    wait_app(&sim, &node).await;
    node.wait_log("command bus subscribed", WAIT)
        .expect("the node's bus is up");
    let cfg = fixtures::single(&redis.url());
    let controller = ControllerProc::start(&fixtures::redis_env(&cfg)).expect("controller");
    fixtures::wait_ready(&controller.http_url())
        .await
        .expect("controller ready");
    let mut ws = control::Client::connect(controller.http_port).await;
    ws.ok("subscribe", json!({ "conference": conference }))
        .await;
    Watched {
        _redis: redis,
        proxy,
        sim,
        node,
        _controller: controller,
        ws,
    }
}

/// Silences the agent's link to Redis, hangs `caller` up, and waits until the agent has
/// given up publishing `events` events.
async fn hang_up_unheard(
    proxy: &TcpProxy,
    sim: &TestSim,
    node: &NodeProc,
    caller: &str,
    events: f64,
) {
    proxy.black_hole();
    sim.hangup_far_end(caller, 16).await.expect("hang up");
    let series = "confroute_node_bus_dropped_total{kind=\"event\"}";
    wait_for_async("the events not published", WAIT, || async {
        let text = fixtures::scrape(&node.http_url()).await;
        (fixtures::metric(&text, series) >= events).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
}

/// Events a node could not publish (Redis did not take them) are not lost without a trace:
/// once Redis takes messages again the node publishes a notice for the conference, and
/// every controller tells the conference's subscribers with `events.lost`
/// (`node_unpublished`), so an application that missed a conference's `end` knows to re-read
/// it rather than believe it goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_redis_did_not_take_are_reported_to_subscribers_as_lost() {
    let Watched {
        proxy,
        sim,
        node,
        mut ws,
        _redis,
        _controller,
    } = watched("solo", &[]).await;
    let caller = dial(&sim, "solo", &[]).await;
    wait_bridged(&sim, &caller).await;
    ws.notification_where("event", WAIT, |p| p["event"] == "join")
        .await
        .expect("the join heard");
    // The agent's link to Redis goes silent as the only caller hangs up: its leave and the
    // conference's end cannot be published.
    hang_up_unheard(&proxy, &sim, &node, &caller, 2.0).await;
    proxy.heal();
    let lost = ws
        .notification("events.lost", WAIT)
        .await
        .unwrap_or_else(|| panic!("no events.lost\n{}", node.output()));
    let p = &lost["params"];
    assert_eq!(p["reason"], "node_unpublished", "{lost}");
    assert_eq!(p["conference"], "solo", "{lost}");
    assert_eq!(p["node"], "node-a", "{lost}");
    assert!(p["count"].as_u64().is_some_and(|n| n >= 2), "{lost}");
}

/// The notice of events Redis did not take goes out before any later event of the
/// conference: a caller joining right after Redis takes messages again is heard after the
/// `events.lost`, so an application re-reads the conference knowing its gap comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_notice_goes_out_before_the_events_after_the_loss() {
    // The node's lease outlasts the silence: only the events are lost, not the node's
    // record and with it the conference.
    let Watched {
        proxy,
        sim,
        node,
        mut ws,
        _redis,
        _controller,
    } = watched("duo", &[("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "2s")]).await;
    let first = dial(&sim, "duo", &[]).await;
    let second = dial(&sim, "duo", &[]).await;
    for ch in [&first, &second] {
        wait_bridged(&sim, ch).await;
        ws.notification_where("event", WAIT, |p| {
            p["event"] == "join" && p["data"]["participant"] == ch.as_str()
        })
        .await
        .expect("the join heard");
    }
    // The first caller's leave cannot be published: Redis does not answer the agent.
    hang_up_unheard(&proxy, &sim, &node, &first, 1.0).await;
    // Redis answers again, and a caller joins at once: its join is queued while the notice
    // is still owed.
    proxy.heal();
    let third = dial(&sim, "duo", &[]).await;
    ws.notification_where("event", WAIT, |p| {
        p["event"] == "join" && p["data"]["participant"] == third.as_str()
    })
    .await
    .unwrap_or_else(|| panic!("the third caller's join\n{}", node.output()));
    // Everything heard before that join was kept: the notice must be among it.
    let lost = ws
        .notification("events.lost", Duration::ZERO)
        .await
        .unwrap_or_else(|| panic!("the join came before the notice\n{}", node.output()));
    assert_eq!(lost["params"]["conference"], "duo", "{lost}");
    assert_eq!(lost["params"]["reason"], "node_unpublished", "{lost}");
}
