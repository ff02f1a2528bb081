//! The command bus over real Redis (single and Cluster): commands reach the node and its
//! answers come back; notifications follow in order; a node that is not listening, or that
//! never answers, fails fast with `node_unavailable`; events reach every controller in order.

use std::time::{Duration, Instant};

use confroute_shared::bus::{Bus, BusError, Call, ErrorCode, Event, Reply};
use confroute_shared::config::RedisConfig;
use confroute_shared::secret::Secret;
use confroute_tests::fixtures;
use confroute_tests::harness::{redis_query, RedisCluster, RedisServer};
use serde_json::json;
use tokio::sync::mpsc;

async fn exercise(cfg: &RedisConfig) {
    let controller = Bus::controller(fixtures::store(cfg));
    let other_controller = Bus::controller(fixtures::store(cfg));
    let node_id = fixtures::id("node-a");
    let (node, mut commands) = Bus::node(fixtures::store(cfg), &node_id);
    for b in [&controller, &other_controller, &node] {
        assert!(
            b.wait_connected(Duration::from_secs(10)).await,
            "bus connects"
        );
    }

    // The node answers each command; the dial-out also sends notifications.
    let responder = node.clone();
    let serve = tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            match cmd.method.as_str() {
                "echo" => responder.respond(&cmd, Ok(cmd.params.clone())).await,
                "fail" => {
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
                    responder.respond(&cmd, Ok(json!({"callid": "c1"}))).await;
                    for (i, status) in ["accepted", "ringing", "connected"].iter().enumerate() {
                        responder
                            .notify(&cmd.reply_to, &cmd.id, json!({"status": status}), i == 2)
                            .await;
                    }
                }
                _ => {} // "ignore": never answered
            }
        }
    });

    let call = controller
        .call(
            &node_id,
            "echo",
            json!({"x": 1}),
            Duration::from_secs(5),
            false,
        )
        .await
        .expect("accepted");
    assert_eq!(call.reply, Ok(json!({"x": 1})));

    let call = controller
        .call(&node_id, "fail", json!({}), Duration::from_secs(5), false)
        .await
        .expect("accepted");
    assert_eq!(
        call.reply.map_err(|e| e.code),
        Err(ErrorCode::ParticipantNotFound)
    );

    let mut call = controller
        .call(&node_id, "dialout", json!({}), Duration::from_secs(5), true)
        .await
        .expect("accepted");
    assert_eq!(call.reply, Ok(json!({"callid": "c1"})));
    let mut statuses = Vec::new();
    while let Some(Reply::Notify { params, last, .. }) = call.notifications.recv().await {
        statuses.push(params["status"].as_str().unwrap_or("").to_string());
        if last {
            break;
        }
    }
    assert_eq!(statuses, ["accepted", "ringing", "connected"]);

    // Nobody listens on node-b: fails at once.
    let started = Instant::now();
    let err = controller
        .call(
            &fixtures::id("node-b"),
            "echo",
            json!({}),
            Duration::from_secs(5),
            false,
        )
        .await
        .err()
        .expect("no listener");
    assert_eq!(err.code, ErrorCode::NodeUnavailable);
    assert!(started.elapsed() < Duration::from_secs(2));

    // Heard but never answered: fails at the deadline, not later.
    let started = Instant::now();
    let call = controller
        .call(
            &node_id,
            "ignore",
            json!({}),
            Duration::from_millis(500),
            false,
        )
        .await
        .expect("published");
    assert_eq!(
        call.reply.map_err(|e| e.code),
        Err(ErrorCode::NodeUnavailable)
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // Events reach every controller, in order.
    let mut a = controller.events();
    let mut b = other_controller.events();
    for seq in 0..50 {
        node.publish_event(&Event {
            conference: "room".into(),
            node: "node-a".into(),
            seq,
            event: "join".into(),
            data: json!({}),
        })
        .await;
    }
    for rx in [&mut a, &mut b] {
        for want in 0..50 {
            let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("event in time")
                .expect("event");
            assert_eq!(ev.seq, want);
        }
    }
    serve.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_on_single_redis() {
    let redis = RedisServer::start().expect("redis");
    exercise(&fixtures::single(&redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_on_redis_cluster() {
    let cluster = RedisCluster::start().expect("cluster");
    // Whichever seed comes first: a PUBLISH counts only the subscribers of the node that
    // takes it, so every process must subscribe where the channels' slot is served.
    let mut seeds = cluster.seeds();
    for _ in 0..seeds.len() {
        exercise(&fixtures::cluster(&seeds)).await;
        seeds.rotate_left(1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_resubscribes_after_redis_restarts() {
    let mut redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let controller = Bus::controller(fixtures::store(&cfg));
    let node_id = fixtures::id("node-a");
    let (node, mut commands) = Bus::node(fixtures::store(&cfg), &node_id);
    assert!(node.wait_connected(Duration::from_secs(10)).await);
    assert!(controller.wait_connected(Duration::from_secs(10)).await);
    let gaps = controller.gaps();
    let responder = node.clone();
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            responder.respond(&cmd, Ok(json!("pong"))).await;
        }
    });
    redis.restart().expect("restart");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let call = controller
            .call(&node_id, "ping", json!({}), Duration::from_secs(1), false)
            .await;
        if matches!(call, Ok(Call { reply: Ok(_), .. })) {
            break;
        }
        assert!(Instant::now() < deadline, "bus never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Events published while it was away never reached it: the gap is reported.
    assert!(gaps.has_changed().unwrap_or(false), "the gap is counted");
}

/// A node agent on its own bus that hears every command: `follow` is answered with a result
/// and one status that is not the last; anything else is heard and never answered.
fn silent_node(cfg: &RedisConfig) -> (Bus, mpsc::UnboundedReceiver<String>) {
    let (node, mut commands) = Bus::node(fixtures::store(cfg), &fixtures::id("node-a"));
    let (heard_tx, heard) = mpsc::unbounded_channel();
    let responder = node.clone();
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            let _ = heard_tx.send(cmd.method.clone());
            if cmd.method == "follow" {
                responder.respond(&cmd, Ok(json!({"callid": "c1"}))).await;
                responder
                    .notify(&cmd.reply_to, &cmd.id, json!({"status": "ringing"}), false)
                    .await;
            }
        }
    });
    (node, heard)
}

/// A call given up before its answer (its client went away) and a status stream dropped
/// before its last notification leave no routing entry behind: a node that never answers
/// would otherwise leak one per command for the life of the controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_calls_leave_nothing_pending() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let controller = Bus::controller(fixtures::store(&cfg));
    let (node, mut heard) = silent_node(&cfg);
    let node_id = fixtures::id("node-a");
    for b in [&controller, &node] {
        assert!(b.wait_connected(Duration::from_secs(10)).await);
    }

    let mut call = Box::pin(controller.call(
        &node_id,
        "ignore",
        json!({}),
        Duration::from_secs(60),
        false,
    ));
    tokio::select! {
        _ = &mut call => panic!("an ignored command was answered"),
        m = heard.recv() => assert_eq!(m.as_deref(), Some("ignore")),
    }
    assert_eq!(controller.pending(), 1, "awaiting the answer");
    drop(call);
    assert_eq!(controller.pending(), 0, "a call given up is forgotten");

    let call = controller
        .call(&node_id, "follow", json!({}), Duration::from_secs(5), true)
        .await
        .expect("accepted");
    assert_eq!(call.reply, Ok(json!({"callid": "c1"})));
    let mut notes = call.notifications;
    match notes.recv().await {
        Some(Reply::Notify { last: false, .. }) => {}
        other => panic!("expected a status, got {other:?}"),
    }
    assert_eq!(controller.pending(), 1, "following the statuses");
    drop(notes);
    assert_eq!(
        controller.pending(),
        0,
        "a dropped status stream is forgotten"
    );
}

/// While a controller cannot subscribe to its reply channel (here Redis refuses it the
/// SUBSCRIBE command), a command would be carried out and its answer never heard: it is
/// refused at once as `node_unavailable`, and the node never hears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_cannot_hear_replies_sends_no_command() {
    let redis = RedisServer::start().expect("redis");
    let acl: Option<String> = redis_query(
        redis.port(),
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("deaf")
            .arg("on")
            .arg(">deaf-secret")
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .arg("-subscribe"),
    );
    assert_eq!(acl.as_deref(), Some("OK"));
    let deaf = RedisConfig {
        username: Some("deaf".into()),
        password: Some(Secret::new("deaf-secret".to_string())),
        ..fixtures::single(&redis.url())
    };
    let controller = Bus::controller(fixtures::store(&deaf));
    let (node, mut heard) = silent_node(&fixtures::single(&redis.url()));
    assert!(node.wait_connected(Duration::from_secs(10)).await);
    // The controller can publish (the node's subscription counts it) but never subscribes.
    assert!(!controller.wait_connected(Duration::from_millis(500)).await);

    let started = Instant::now();
    let call = controller
        .call(
            &fixtures::id("node-a"),
            "follow",
            json!({}),
            Duration::from_secs(30),
            false,
        )
        .await;
    match call {
        Err(e) => assert_eq!(e.code, ErrorCode::NodeUnavailable, "{e}"),
        Ok(_) => panic!("a command went out that nobody could hear answered"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused at once, not after the timeout"
    );
    assert_eq!(controller.pending(), 0);
    // The node hears a command sent after the refused one, and nothing before it.
    let other = Bus::controller(fixtures::store(&fixtures::single(&redis.url())));
    assert!(other.wait_connected(Duration::from_secs(10)).await);
    let answered = other
        .call(
            &fixtures::id("node-a"),
            "follow",
            json!({"marker": true}),
            Duration::from_secs(5),
            false,
        )
        .await
        .expect("accepted");
    assert!(answered.reply.is_ok());
    assert_eq!(heard.recv().await.as_deref(), Some("follow"));
    assert!(
        heard.try_recv().is_err(),
        "the refused command never reached the node"
    );
}
