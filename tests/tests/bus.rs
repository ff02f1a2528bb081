//! The command bus over real Redis (single and Cluster): commands reach the node and its
//! answers come back; notifications follow in order; a node that is not listening (at once on
//! a single server: `node_unavailable`), or that never answers (`no_answer`: it may have
//! acted), fails by its deadline; events reach every controller in order.

use std::time::{Duration, Instant};

use confroute_shared::bus::{Bus, BusError, Call, Command, ErrorCode, Event, Reply};
use confroute_shared::config::{RedisConfig, RedisTarget};
use confroute_shared::secret::Secret;
use confroute_shared::types::NodeId;
use confroute_tests::fixtures;
use confroute_tests::harness::{redis_query, DarkPort, RedisCluster, RedisServer, SentinelGroup};
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

    // Nobody listens on node-b: fails at once, on a single server. A Cluster's count is
    // only that of the node the command reached, and the Cluster carries it on to the others
    // (a subscriber on another may hear it): the answer is awaited until the deadline.
    let started = Instant::now();
    let unheard = controller
        .call(
            &fixtures::id("node-b"),
            "echo",
            json!({}),
            Duration::from_millis(500),
            false,
        )
        .await;
    if matches!(cfg.target(), RedisTarget::Cluster(_)) {
        let call = unheard.expect("published");
        let err = call.reply.expect_err("no listener");
        assert_eq!(err.code, ErrorCode::NoAnswer);
        assert!(err.message.contains("did not answer"), "{}", err.message);
    } else {
        let err = unheard.err().expect("no listener");
        assert_eq!(err.code, ErrorCode::NodeUnavailable);
        assert!(err.message.contains("not listening"), "{}", err.message);
        assert!(started.elapsed() < Duration::from_millis(400));
    }
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
    assert_eq!(call.reply.map_err(|e| e.code), Err(ErrorCode::NoAnswer));
    assert!(started.elapsed() < Duration::from_secs(2));

    // Events reach every controller, in order.
    let mut a = controller.events();
    let mut b = other_controller.events();
    for seq in 0..50 {
        node.publish_event(&Event {
            conference: "room".into(),
            node: "node-a".into(),
            epoch: 1,
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

/// The cluster node (id, port) serving `slot`, read from `CLUSTER NODES` on `port`.
fn slot_owner(port: u16, slot: i64) -> Option<(String, u16)> {
    let text: String = redis_query(port, redis::cmd("CLUSTER").arg("NODES"))?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let serves = f.iter().skip(8).any(|r| match r.split_once('-') {
            Some((a, b)) => matches!(
                (a.parse::<i64>(), b.parse::<i64>()),
                (Ok(a), Ok(b)) if a <= slot && slot <= b
            ),
            None => r.parse::<i64>().ok() == Some(slot),
        });
        let p = f
            .get(1)?
            .split('@')
            .next()?
            .rsplit(':')
            .next()?
            .parse()
            .ok()?;
        serves.then(|| (f[0].to_string(), p))
    })
}

/// A node bus answering `echo`.
fn echo_node(cfg: &RedisConfig) -> Bus {
    let (node, mut commands) = Bus::node(fixtures::store(cfg), &fixtures::id("node-a"));
    let responder = node.clone();
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            responder.respond(&cmd, Ok(cmd.params.clone())).await;
        }
    });
    node
}

/// A Cluster with a controller's bus and an echoing node's bus on it, both subscribed.
async fn cluster_buses() -> (RedisCluster, RedisConfig, Bus, Bus) {
    let cluster = RedisCluster::start().expect("cluster");
    let cfg = fixtures::cluster(&cluster.seeds());
    let controller = Bus::controller(fixtures::store(&cfg));
    let node = echo_node(&cfg);
    for b in [&controller, &node] {
        assert!(b.wait_connected(Duration::from_secs(10)).await);
    }
    (cluster, cfg, controller, node)
}

/// The bus's channels move with their slot: after the slot is handed to another primary
/// (what a failover or a resharding does), commands may wait for their answer for a moment,
/// then every process has subscribed where the slot is now served and commands get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_bus_follows_its_channels_slot_to_another_primary() {
    let (cluster, cfg, controller, _node) = cluster_buses().await;
    let echo = || async {
        controller
            .call(
                &fixtures::id("node-a"),
                "echo",
                json!(1),
                Duration::from_secs(2),
                false,
            )
            .await
            .ok()
            .and_then(|c| c.reply.ok())
    };
    assert_eq!(echo().await, Some(json!(1)));
    // Redis's clock, read where the prefix's slot lives (TIME alone goes to any node).
    let clock = fixtures::store(&cfg)
        .time_ms()
        .await
        .expect("Redis's clock");
    assert!(clock > 1_600_000_000_000, "{clock}");
    let ports: Vec<u16> = cluster.nodes().iter().map(RedisServer::port).collect();
    let slot: i64 = redis_query(
        ports[0],
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("{}events", cfg.prefix)),
    )
    .expect("keyslot");
    let (from_id, from) = slot_owner(ports[0], slot).expect("owner");
    let to = *ports.iter().find(|p| **p != from).expect("another primary");
    let to_id: String = redis_query(to, redis::cmd("CLUSTER").arg("MYID")).expect("target id");
    // The documented hand-over of a slot (no keys live in it: pub/sub channels are not keys).
    let set = |port: u16, args: &[&str]| {
        let mut c = redis::cmd("CLUSTER");
        c.arg("SETSLOT").arg(slot);
        for a in args {
            c.arg(*a);
        }
        let ok: Option<String> = redis_query(port, &mut c);
        assert_eq!(ok.as_deref(), Some("OK"), "SETSLOT {args:?} on {port}");
    };
    set(to, &["IMPORTING", &from_id]);
    set(from, &["MIGRATING", &to_id]);
    for p in std::iter::once(to).chain(std::iter::once(from)) {
        set(p, &["NODE", &to_id]);
    }
    for p in ports.iter().filter(|p| **p != to && **p != from) {
        set(*p, &["NODE", &to_id]);
    }
    confroute_tests::harness::wait_for_async(
        "commands heard where the slot is served now",
        Duration::from_secs(30),
        || async { (echo().await == Some(json!(1))).then_some(()) },
    )
    .await
    .expect("the bus followed its slot");
    assert_eq!(slot_owner(ports[0], slot).map(|(_, p)| p), Some(to));
    // Once every subscriber has left the old primary (still up, as after a manual
    // failover), commands still get through: the controller publishes where the slot is
    // now, not where it was (where nobody is counted any more).
    // The node's subscription (its commands) and the controller's (its replies, with the
    // events channel): a reply published while the latter moves is lost with it.
    let commands = format!("{}cmd:node-a", cfg.prefix);
    let events = format!("{}events", cfg.prefix);
    let subscribers = |port: u16, channel: &str| {
        let counts: Option<Vec<redis::Value>> =
            redis_query(port, redis::cmd("PUBSUB").arg("NUMSUB").arg(channel));
        match counts.as_deref() {
            Some([_, redis::Value::Int(n)]) => *n,
            _ => -1,
        }
    };
    confroute_tests::harness::wait_for_async(
        "both subscriptions moved",
        Duration::from_secs(30),
        || async {
            [&commands, &events]
                .iter()
                .all(|c| subscribers(to, c) == 1 && subscribers(from, c) == 0)
                .then_some(())
        },
    )
    .await
    .expect("moved");
    for i in 0..3 {
        assert_eq!(echo().await, Some(json!(1)), "echo {i} after the move");
    }
}

/// A node's reply is sent again over a new connection when the one it went out on was
/// closed under it (an idle `timeout`, a proxy, `CLIENT KILL`): a reply read twice is
/// harmless, a lost one leaves the controller waiting out the command's budget for an
/// answer to something that was done. (Only commands go out without being sent again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_replies_over_a_new_connection_after_its_own_was_closed() {
    let (cluster, _cfg, controller, _node) = cluster_buses().await;
    let echo = |to: &'static str| {
        let controller = controller.clone();
        async move {
            controller
                .call(
                    &fixtures::id(to),
                    "echo",
                    json!(1),
                    Duration::from_secs(2),
                    false,
                )
                .await
                .ok()
                .and_then(|c| c.reply.ok())
        }
    };
    assert_eq!(echo("node-a").await, Some(json!(1)));
    // Every connection but the subscriptions is closed: the node's, the controller's.
    for n in cluster.nodes() {
        let _: Option<i64> = redis_query(
            n.port(),
            redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal"),
        );
    }
    // The controller's next PUBLISH finds its connection closed and opens another; this
    // one goes to nobody, so the node's connection is still the closed one.
    let _ = echo("node-b").await;
    assert_eq!(
        echo("node-a").await,
        Some(json!(1)),
        "the reply went out over a new connection"
    );
}

/// Checking where the channels' slot is served (every 5 s) opens no connection: an idle
/// bus on a Cluster leaves the servers' connection counts as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_cluster_bus_opens_no_connections() {
    let (cluster, _cfg, _controller, _node) = cluster_buses().await;
    let opened = || -> u64 {
        cluster
            .nodes()
            .iter()
            .map(|n| {
                let info: String =
                    redis_query(n.port(), redis::cmd("INFO").arg("stats")).unwrap_or_default();
                info.lines()
                    .find_map(|l| l.strip_prefix("total_connections_received:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0)
            })
            .sum()
    };
    // Settled: a window holding a slot check of each bus in which only the counting's own
    // connections were opened (the buses' first check and clock reading come before).
    let nodes = cluster.nodes().len() as u64;
    let settled = Instant::now() + Duration::from_secs(40);
    loop {
        let start = opened();
        tokio::time::sleep(Duration::from_millis(5500)).await;
        if opened() - start == nodes {
            break;
        }
        assert!(Instant::now() < settled, "the buses never settled");
    }
    let before = opened();
    // Two slot checks of each bus.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let after = opened();
    // Counting opens one connection to each server.
    assert_eq!(
        after - before,
        cluster.nodes().len() as u64,
        "connections opened by idle buses"
    );
}

/// A process that started while Redis answered slowly (its first clock comparison failed)
/// compares its clock again soon, not a whole check period later. Until it knows Redis's
/// clock it cannot tell a command held on its way from a fresh one, and carries out commands
/// whose sender already reported them unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_started_while_redis_was_slow_soon_drops_commands_held_on_their_way() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    redis.signal(libc::SIGSTOP).expect("pause redis");
    let node_id = fixtures::id("node-late-clock");
    let (node, mut commands) = Bus::node(fixtures::store(&cfg), &node_id);
    // Redis stays silent past the clock comparison's longest usable round trip (500 ms).
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.signal(libc::SIGCONT).expect("resume redis");
    assert!(
        node.wait_connected(Duration::from_secs(10)).await,
        "bus connects"
    );
    let channel = format!("{}cmd:{node_id}", cfg.prefix);
    let publish = |cmd: &Command| {
        let text = serde_json::to_string(cmd).expect("command JSON");
        redis_query::<i64>(redis.port(), redis::cmd("PUBLISH").arg(&channel).arg(text))
            .expect("publish");
    };
    // Well before the next regular comparison (5 s after the first).
    let deadline = Instant::now() + Duration::from_secs(3);
    for round in 0.. {
        let (secs, micros): (u64, u64) =
            redis_query(redis.port(), &mut redis::cmd("TIME")).expect("TIME");
        let now = secs * 1000 + micros / 1000;
        let command = |id: String, sent_ms: u64| Command {
            id,
            reply_to: "test".into(),
            method: "echo".into(),
            params: json!({}),
            deadline_ms: now + 2_000,
            timeout_ms: 2_000,
            sent_ms,
            sent_uncertainty_ms: 0,
        };
        // Sent 3 s ago with a 2 s budget: its sender gave up a second ago.
        let stale = command(format!("stale-{round}"), now - 3_000);
        let fresh = command(format!("fresh-{round}"), 0);
        publish(&stale);
        publish(&fresh);
        let mut stale_delivered = false;
        loop {
            let got = tokio::time::timeout(Duration::from_secs(5), commands.recv())
                .await
                .expect("the fresh command arrives")
                .expect("bus running");
            if got.id == stale.id {
                stale_delivered = true;
            }
            if got.id == fresh.id {
                break;
            }
        }
        if !stale_delivered {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "commands held on their way still delivered 3 s after Redis answered again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Redis stalls past `redis.timeout` while a command is on its way, then carries it: the
/// node acts on it and answers, and the sender, still listening for the rest of its budget,
/// reports that answer rather than "node unavailable" for a command that was carried out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_redis_confirms_late_is_answered_with_what_the_node_did() {
    let redis = RedisServer::start().expect("redis");
    let cfg = RedisConfig {
        timeout: Duration::from_millis(200),
        ..fixtures::single(&redis.url())
    };
    let controller = Bus::controller(fixtures::store(&cfg));
    let node = echo_node(&cfg);
    assert!(controller.wait_connected(Duration::from_secs(10)).await);
    assert!(node.wait_connected(Duration::from_secs(10)).await);
    let node_a = fixtures::id("node-a");
    redis.signal(libc::SIGSTOP).expect("pause redis");
    let started = Instant::now();
    let (call, resumed) = tokio::join!(
        controller.call(
            &node_a,
            "echo",
            json!({"n": 7}),
            Duration::from_secs(5),
            false,
        ),
        async {
            // Three times `redis.timeout`: the command's PUBLISH gets no answer in time.
            tokio::time::sleep(Duration::from_millis(600)).await;
            redis.signal(libc::SIGCONT)
        }
    );
    resumed.expect("resume redis");
    let call = call.expect("sent");
    assert_eq!(call.reply, Ok(json!({"n": 7})));
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "answered only once Redis was back"
    );

    // Redis stalls again: the first command's PUBLISH gets no answer and is awaited; its
    // connection is dropped, so the next command must connect first, and a connection that
    // cannot be made means that command never left: refused once the connect gives up, not
    // at the end of its budget.
    // Connected again first: the stall left the controller without a connection.
    let warm = controller
        .call(
            &node_a,
            "echo",
            json!({"n": 0}),
            Duration::from_secs(5),
            false,
        )
        .await
        .expect("sent");
    assert_eq!(warm.reply, Ok(json!({"n": 0})));
    redis.signal(libc::SIGSTOP).expect("pause redis");
    let budget = Duration::from_secs(8);
    let (first, second) = tokio::join!(
        controller.call(&node_a, "echo", json!({"n": 1}), budget, false),
        async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let started = Instant::now();
            let call = controller
                .call(&node_a, "echo", json!({"n": 2}), budget, false)
                .await;
            let took = started.elapsed();
            redis.signal(libc::SIGCONT).expect("resume redis");
            (call, took)
        }
    );
    let (second, took) = second;
    // Refused as never sent (an `Err`, not a reply): a caller gives back what it made for it.
    let Err(refused) = second else {
        panic!("a command that never left was taken as sent");
    };
    assert_eq!(refused.code, ErrorCode::NodeUnavailable, "{refused:?}");
    assert!(refused.message.contains("nothing was sent"), "{refused:?}");
    assert!(
        took < Duration::from_secs(4),
        "refused when its connect gave up, not after its {budget:?} budget: {took:?}"
    );
    // The first one reached the node once Redis was back.
    assert_eq!(first.expect("sent").reply, Ok(json!({"n": 1})));
}

/// A Redis, a controller's bus and node-a's bus, both subscribed; with node-a's commands.
async fn connected_buses() -> (RedisServer, Bus, NodeId, Bus, mpsc::Receiver<Command>) {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let controller = Bus::controller(fixtures::store(&cfg));
    let node_id = fixtures::id("node-a");
    let (node, commands) = Bus::node(fixtures::store(&cfg), &node_id);
    for b in [&controller, &node] {
        assert!(b.wait_connected(Duration::from_secs(10)).await);
    }
    (redis, controller, node_id, node, commands)
}

/// A command's answer that arrives twice (a Redis client resending it after a connection
/// cut, as a Cluster's does) is not taken for a notification: the statuses that follow
/// still reach the caller, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_delivered_twice_does_not_end_the_notifications() {
    let (_redis, controller, node_id, node, mut commands) = connected_buses().await;
    let responder = node.clone();
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            responder.respond(&cmd, Ok(json!({"callid": "c1"}))).await;
            responder.respond(&cmd, Ok(json!({"callid": "c1"}))).await;
            for (i, status) in ["ringing", "connected"].iter().enumerate() {
                responder
                    .notify(&cmd.reply_to, &cmd.id, json!({"status": status}), i == 1)
                    .await;
            }
        }
    });
    let mut call = controller
        .call(&node_id, "dialout", json!({}), Duration::from_secs(5), true)
        .await
        .expect("accepted");
    assert_eq!(call.reply, Ok(json!({"callid": "c1"})));
    let mut statuses = Vec::new();
    while let Some(reply) = call.notifications.recv().await {
        match reply {
            Reply::Notify { params, last, .. } => {
                statuses.push(params["status"].as_str().unwrap_or("").to_string());
                if last {
                    break;
                }
            }
            other => panic!("not a notification: {other:?}"),
        }
    }
    assert_eq!(statuses, ["ringing", "connected"]);
}

/// A command whose answer was lost while the node's progress notices got through (a Redis
/// cut between them) was carried out: the caller is told "no answer, may have been done"
/// (so a client checks before sending it again), not an internal error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_before_a_lost_answer_says_the_command_was_carried_out() {
    let (_redis, controller, node_id, node, mut commands) = connected_buses().await;
    let responder = node.clone();
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            responder
                .notify(&cmd.reply_to, &cmd.id, json!({"status": "ringing"}), false)
                .await;
        }
    });
    let call = controller
        .call(&node_id, "dialout", json!({}), Duration::from_secs(5), true)
        .await
        .expect("sent");
    let err = call.reply.expect_err("no result came");
    assert_eq!(err.code, ErrorCode::NoAnswer, "{err}");
    // Told by the progress notice, not by the budget running out.
    assert!(err.message.contains("reported progress"), "{err}");
}

/// A command the node cannot queue (its 1,024 places full: the agent is stuck) is answered
/// `timeout`, nothing done, at once, rather than left for its sender to wait out and report
/// as "may have been carried out".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_the_node_cannot_queue_is_answered_nothing_done() {
    // Commands are never taken from the node's queue.
    let (_redis, controller, node_id, _node, _commands) = connected_buses().await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..1100 {
        let controller = controller.clone();
        let node_id = node_id.clone();
        calls.spawn(async move {
            controller
                .call(
                    &node_id,
                    "ping",
                    json!({"i": i}),
                    Duration::from_secs(5),
                    false,
                )
                .await
                .map(|c| c.reply)
        });
    }
    let mut refused = 0;
    let mut unanswered = 0;
    while let Some(done) = calls.join_next().await {
        match done.expect("task").expect("sent") {
            Err(e) if e.code == ErrorCode::Timeout => refused += 1,
            Err(e) if e.code == ErrorCode::NoAnswer => unanswered += 1,
            other => panic!("unexpected answer: {other:?}"),
        }
    }
    assert_eq!(unanswered, 1024, "the queued ones wait for the node");
    assert_eq!(refused, 1100 - 1024, "the rest are refused at once");
}

/// A first-listed sentinel or Cluster seed whose host went dark (each connect to it waits
/// out its whole timeout) does not keep the bus from subscribing through the others, even
/// with a short `redis.timeout`: finding the server for the subscription gets the time the
/// lookup needs, not a few operation timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dark_first_sentinel_or_seed_does_not_keep_the_bus_away() {
    let dark = DarkPort::start().expect("dark port");
    let dark_url = format!("redis://{}", dark.addr());

    let group = SentinelGroup::start().expect("sentinel");
    let mut sentinels = vec![dark_url.clone()];
    sentinels.extend(group.sentinel_urls());
    let cfg = RedisConfig {
        timeout: Duration::from_millis(200),
        wait_replicas: 0,
        ..fixtures::sentinel(group.master_name(), &sentinels)
    };
    let bus = Bus::controller(fixtures::store(&cfg));
    assert!(
        bus.wait_connected(Duration::from_secs(15)).await,
        "the bus subscribed behind sentinel"
    );

    let cluster = RedisCluster::start().expect("cluster");
    let mut seeds = vec![dark_url];
    seeds.extend(cluster.seeds());
    let cfg = RedisConfig {
        timeout: Duration::from_millis(200),
        ..fixtures::cluster(&seeds)
    };
    let bus = Bus::controller(fixtures::store(&cfg));
    assert!(
        bus.wait_connected(Duration::from_secs(15)).await,
        "the bus subscribed on the cluster"
    );
}
