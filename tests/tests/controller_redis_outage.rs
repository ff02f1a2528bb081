//! Invariant 5: with Redis gone the controller answers 503 with Retry-After, stays alive
//! (`/healthz` 200) but not ready (`/readyz` 503), and routes again by itself when Redis is
//! back, without a restart.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use confroute_tests::fixtures;
use confroute_tests::harness::{wait_for, wait_for_async, ControllerProc, RedisServer};

fn invite(to: std::net::SocketAddr, name: &str) -> String {
    request(to, "INVITE", name)
}

/// Sends one `method` request for `name` over UDP and returns the answer.
fn request(to: std::net::SocketAddr, method: &str, name: &str) -> String {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let port = socket.local_addr().expect("addr").port();
    let branch = format!("z9hG4bK{:x}", rand::random::<u64>());
    let msg = format!(
        "{method} sip:{name}@router SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch}\r\n\
         From: <sip:a@b>;tag=1\r\nTo: <sip:{name}@router>\r\nCall-ID: {branch}\r\nCSeq: 1 {method}\r\n\
         Content-Length: 0\r\n\r\n"
    );
    socket.send_to(msg.as_bytes(), to).expect("send");
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("answer");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A controller's settings for `cfg` that notice Redis trouble quickly: 300 ms Redis and
/// connect timeouts, an 800 ms routing deadline.
fn quick_env(cfg: &confroute_shared::config::RedisConfig) -> Vec<(String, String)> {
    let mut env = fixtures::redis_env(cfg);
    env.push(("CONFROUTE_REDIS__TIMEOUT".into(), "300ms".into()));
    env.push(("CONFROUTE_REDIS__CONNECT_TIMEOUT".into(), "300ms".into()));
    env.push(("CONFROUTE_ROUTING__DEADLINE".into(), "800ms".into()));
    env
}

/// An INVITE for `name`, which has no claim, is answered 503 while the controller waits for
/// the nodes, and nothing is claimed for it.
async fn refused_without_a_second_home(
    controller: &ControllerProc,
    store: &confroute_shared::store::Store,
    name: &confroute_shared::name::ConferenceName,
) {
    let during = invite(controller.sip_addr(), name.as_str());
    assert!(
        during.starts_with("SIP/2.0 503"),
        "{during}\n{}",
        controller.output()
    );
    assert!(
        store.lookup(name).await.expect("lookup").is_none(),
        "no second home was claimed"
    );
}

/// node-a and node-b come back as their agents' heartbeats bring them (a lease renewed,
/// node-a claiming `name` back at `epoch`), until the controller routes `name` to node-a
/// again: placement resumes without a restart once the nodes live before have written.
async fn routes_again_once_the_nodes_are_back(
    controller: &ControllerProc,
    store: &confroute_shared::store::Store,
    name: &confroute_shared::name::ConferenceName,
    epoch: u64,
) {
    let lease = Duration::from_secs(30);
    let hosted = [confroute_shared::store::Hosted {
        name: name.clone(),
        epoch,
        participants: 1,
        count_version: 1,
    }];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        for id in ["node-a", "node-b"] {
            store
                .register(&fixtures::node(id, 100), lease)
                .await
                .expect("register");
        }
        store
            .heartbeat_reclaiming(&fixtures::id("node-a"), &Default::default(), lease, &hosted)
            .await
            .expect("heartbeat");
        let answer = invite(controller.sip_addr(), name.as_str());
        if answer.starts_with("SIP/2.0 302") {
            assert!(
                answer.contains("X-Conference-Node: node-a"),
                "routed to the node that claimed it back: {answer}"
            );
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no routing after the nodes came back: {answer}\n{}",
            controller.output()
        );
        // A heartbeat period of the agents this plays.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// node-a and node-b registered with 30 s leases (no heartbeats: their records stay as
/// written), and a controller on `cfg` that has routed a first call.
async fn two_nodes_and_a_controller(
    cfg: &confroute_shared::config::RedisConfig,
) -> (confroute_shared::store::Store, ControllerProc) {
    let store = fixtures::store(cfg);
    for id in ["node-a", "node-b"] {
        store
            .register(&fixtures::node(id, 100), Duration::from_secs(30))
            .await
            .expect("register");
    }
    let controller = ControllerProc::start(&quick_env(cfg)).expect("controller");
    let warm = invite(controller.sip_addr(), "warm-up");
    assert!(warm.contains("302 Moved"), "{warm}");
    (store, controller)
}

/// Waits until the controller says the Redis server behind the store changed: what it
/// answers next is that wait's, not a connection still broken.
fn server_change_noticed(controller: &ControllerProc) {
    wait_for(
        "the controller to notice the server changed",
        Duration::from_secs(10),
        || {
            controller
                .output()
                .contains("the redis server behind the store changed")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", controller.output()));
}

async fn status(url: &str) -> u16 {
    fixtures::http()
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_gives_503s_and_recovery_needs_no_restart() {
    let mut redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    let node = fixtures::node("node-a", 100);
    store
        .register(&node, Duration::from_secs(300))
        .await
        .expect("register");
    let env = quick_env(&cfg);
    let mut controller = ControllerProc::start(&env).expect("controller");
    let base = controller.http_url();
    let pid = controller.process().pid();

    assert!(invite(controller.sip_addr(), "before").starts_with("SIP/2.0 302"));
    assert_eq!(status(&format!("{base}/readyz")).await, 200);
    assert!(request(controller.sip_addr(), "OPTIONS", "probe").starts_with("SIP/2.0 200"));

    redis.kill();
    let started = Instant::now();
    let answer = invite(controller.sip_addr(), "during");
    assert!(answer.starts_with("SIP/2.0 503"), "{answer}");
    assert!(answer.contains("\r\nRetry-After: 5\r\n"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "503 comes within the deadline"
    );
    // Existing conferences cannot be confirmed either: still 503, never a guess.
    assert!(invite(controller.sip_addr(), "before").starts_with("SIP/2.0 503"));
    assert_eq!(
        status(&format!("{base}/healthz")).await,
        200,
        "liveness stays green"
    );
    wait_for_async("readiness to turn red", Duration::from_secs(10), || async {
        (status(&format!("{base}/readyz")).await == 503).then_some(())
    })
    .await
    .expect("not ready while redis is down");
    // An edge's OPTIONS probe gets the answer an INVITE would (RFC 3261 §11.2), so it can
    // send its calls to another controller.
    let answer = request(controller.sip_addr(), "OPTIONS", "probe");
    assert!(answer.starts_with("SIP/2.0 503"), "{answer}");
    assert!(answer.contains("\r\nRetry-After: 5\r\n"), "{answer}");
    let resp = fixtures::http()
        .post(format!("{base}/v1/route"))
        .json(&serde_json::json!({"conference": "during"}))
        .send()
        .await
        .expect("http route");
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );

    redis.restart().expect("redis back");
    // A real node re-registers with its next heartbeat; this test plays that part.
    wait_for_async("node to re-register", Duration::from_secs(10), || async {
        store.register(&node, Duration::from_secs(300)).await.ok()
    })
    .await
    .expect("register again");
    // A Redis that restarted may have lost claims: routing waits for the nodes that were
    // live to write again twice (their heartbeats, which claim their conferences back),
    // which this test plays too.
    wait_for_async("routing to work again", Duration::from_secs(10), || async {
        store.register(&node, Duration::from_secs(300)).await.ok()?;
        invite(controller.sip_addr(), "after")
            .starts_with("SIP/2.0 302")
            .then_some(())
    })
    .await
    .expect("routes again without a restart");
    wait_for_async(
        "readiness to turn green",
        Duration::from_secs(10),
        || async { (status(&format!("{base}/readyz")).await == 200).then_some(()) },
    )
    .await
    .expect("ready again");
    assert!(request(controller.sip_addr(), "OPTIONS", "probe").starts_with("SIP/2.0 200"));
    assert!(controller.process().is_running());
    assert_eq!(controller.process().pid(), pid, "same process throughout");
}

/// With `redis.wait_replicas`, a claim its replica has not acknowledged is answered 503, and
/// so is every later call for that conference until the replica acknowledges it: a failover
/// could still lose it, and a second home would follow. Then it routes as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_claim_is_not_routed_until_a_replica_has_it() {
    let (primary, replica) = RedisServer::with_replica().expect("primary and replica");
    let cfg = fixtures::replicated(&primary.url());
    let store = fixtures::store(&cfg);
    store
        .register(&fixtures::node("node-a", 100), Duration::from_secs(300))
        .await
        .expect("register");
    let controller = ControllerProc::start(&fixtures::redis_env(&cfg)).expect("controller");
    let route = |name: &'static str| {
        let url = format!("{}/v1/route", controller.http_url());
        async move {
            let r = fixtures::http()
                .post(url)
                .json(&serde_json::json!({"conference": name}))
                .send()
                .await
                .expect("request");
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, body)
        }
    };
    let (status, body) = route("kept").await;
    assert_eq!(status, 200, "{body}");

    let pid = replica.pid().expect("replica pid") as libc::pid_t;
    // SAFETY: signals a child process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let first = route("fresh").await;
    let again = route("fresh").await;
    let existing = route("kept").await;
    // SAFETY: as above; resumed before any assertion can fail.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(first.0, 503, "not acknowledged: {}", first.1);
    assert_eq!(
        again.0, 503,
        "the unacknowledged claim is not routed by a lookup: {}",
        again.1
    );
    assert_eq!(
        existing.0, 200,
        "confirmed conferences route: {}",
        existing.1
    );

    let (status, body) = route("fresh").await;
    assert_eq!(status, 200, "acknowledged now: {body}");
    assert_eq!(body["created"], false, "the same claim, confirmed: {body}");
    assert_eq!(body["node_id"], "node-a");
}

/// Redis with node-a and node-b registered (30 s leases: an outage in a test is far shorter
/// than a third of one) and `sales-42` claimed on node-a.
async fn two_nodes_and_a_claim() -> (
    RedisServer,
    confroute_shared::config::RedisConfig,
    confroute_shared::store::Store,
    Duration,
    confroute_shared::name::ConferenceName,
    confroute_shared::store::Claim,
) {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    let lease = Duration::from_secs(30);
    for id in ["node-a", "node-b"] {
        store
            .register(&fixtures::node(id, 100), lease)
            .await
            .expect("register");
    }
    let name: confroute_shared::name::ConferenceName = "sales-42".parse().expect("name");
    let claim = store
        .claim(&name, &[fixtures::id("node-a")])
        .await
        .expect("claim");
    (redis, cfg, store, lease, name, claim)
}

/// A Redis restarted without persistence comes back empty within a second: too short for
/// live nodes to lose their leases to the outage, yet every lease is gone. Until the nodes
/// that were live have written again, no conference is placed: the node that registers
/// again first would otherwise be given a live conference of another (a second home).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_came_back_empty_places_nothing_until_the_live_nodes_are_back() {
    let (mut redis, cfg, store, lease, name, claim) = two_nodes_and_a_claim().await;
    let env = quick_env(&cfg);
    let controller = ControllerProc::start(&env).expect("controller");
    let before = invite(controller.sip_addr(), "sales-42");
    assert!(
        before.contains("X-Conference-Node: node-a"),
        "placed on node-a: {before}"
    );

    redis.restart().expect("redis back, empty");
    // node-b's heartbeat comes first; node-a's is late.
    wait_for_async(
        "node-b to register again",
        Duration::from_secs(10),
        || async {
            store
                .register(&fixtures::node("node-b", 100), lease)
                .await
                .ok()
        },
    )
    .await
    .expect("node-b registers again");
    let base = controller.http_url();
    wait_for_async(
        "the controller to read Redis again",
        Duration::from_secs(10),
        || async {
            let nodes: serde_json::Value = fixtures::http()
                .get(format!("{base}/v1/nodes"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (nodes.to_string().contains("node-b") && !nodes.to_string().contains("node-a"))
                .then_some(())
        },
    )
    .await
    .expect("node-b listed alone");
    refused_without_a_second_home(&controller, &store, &name).await;
    let epoch = claim.owner.expect("owner").epoch;
    routes_again_once_the_nodes_are_back(&controller, &store, &name, epoch).await;
}

/// A Redis restarted from saved data (a snapshot, an append-only file synced every second)
/// comes back with the node records as they were but without the claims written last: a
/// conference whose claim was lost still has its callers on its node, and placing it anew
/// would give it a second home. The controller notices the server changed (its `run_id`)
/// and places nothing until the nodes that were live have renewed their leases (and with
/// them, claimed their conferences back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_from_saved_data_places_nothing_until_the_nodes_are_back() {
    let mut redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let (store, controller) = two_nodes_and_a_controller(&cfg).await;
    // The snapshot, then a claim it does not hold: the tail a restart loses.
    redis.query(&mut redis::cmd("SAVE")).expect("SAVE");
    let name: confroute_shared::name::ConferenceName = "sales-42".parse().expect("name");
    let claim = store
        .claim(&name, &[fixtures::id("node-a")])
        .await
        .expect("claim");
    redis.restart().expect("redis back from its snapshot");
    assert!(
        store.lookup(&name).await.expect("lookup").is_none(),
        "the claim was lost with the restart"
    );
    // The controller has read the new server (both nodes listed, as in the snapshot) and
    // told it from the old one.
    server_change_noticed(&controller);
    refused_without_a_second_home(&controller, &store, &name).await;
    let epoch = claim.owner.expect("owner").epoch;
    routes_again_once_the_nodes_are_back(&controller, &store, &name, epoch).await;
}

/// A controller that starts after Redis came back empty knows of no node from before, so its
/// own wait cannot hold it back: the mark the first agent registering again leaves
/// (`settle_after_loss`, as every agent calls it when its record is gone) does, even when a
/// new agent registered into the emptied Redis before it. No conference is placed until the
/// nodes that were live are back; the conference's own node then claims it back and the new
/// controller routes to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_started_after_redis_came_back_empty_places_nothing_until_the_nodes_are_back()
{
    let (mut redis, cfg, store, lease, name, claim) = two_nodes_and_a_claim().await;
    redis.restart().expect("redis back, empty");
    // A new agent, node-c, starts into the emptied Redis: a first registration marks nothing.
    wait_for_async("node-c to register", Duration::from_secs(10), || async {
        store
            .register(&fixtures::node("node-c", 100), lease)
            .await
            .ok()
    })
    .await
    .expect("node-c registers");
    // node-b is back next, as an agent registers again; node-a is late.
    let back = |id: &'static str| {
        let store = store.clone();
        async move {
            let first = store.settle_after_loss(lease, lease).await.ok()?;
            store.register(&fixtures::node(id, 100), lease).await.ok()?;
            Some(first)
        }
    };
    let first = wait_for_async("node-b to register again", Duration::from_secs(10), || {
        back("node-b")
    })
    .await
    .expect("node-b registers again");
    assert!(
        first,
        "no node from before the loss was live: the store is marked settling"
    );

    let mut env = fixtures::redis_env(&cfg);
    env.push(("CONFROUTE_ROUTING__DEADLINE".into(), "800ms".into()));
    let controller = ControllerProc::start(&env).expect("controller");
    fixtures::wait_placeable(&controller.http_url(), 2)
        .await
        .expect("node-b and node-c placeable");
    let during = invite(controller.sip_addr(), "sales-42");
    assert!(
        during.starts_with("SIP/2.0 503") && during.contains("Retry-After"),
        "{during}\n{}",
        controller.output()
    );
    assert!(
        store.lookup(&name).await.expect("lookup").is_none(),
        "no second home was claimed"
    );

    // node-a is back and claims its conference back, as its agent's first heartbeat does;
    // node-b and node-c registered since the loss, so the wait is set again from now.
    assert!(back("node-a").await.expect("node-a registers again"));
    let hosted = [confroute_shared::store::Hosted {
        name: name.clone(),
        epoch: claim.owner.expect("owner").epoch,
        participants: 3,
        count_version: 1,
    }];
    store
        .heartbeat_reclaiming(&fixtures::id("node-a"), &Default::default(), lease, &hosted)
        .await
        .expect("heartbeat");
    let after = invite(controller.sip_addr(), "sales-42");
    assert!(
        after.contains("X-Conference-Node: node-a"),
        "{after}\n{}",
        controller.output()
    );
}

/// On a Redis Cluster, the shard holding the store's slot restarted from saved data (node
/// records kept, the last claim lost) is told from the server of before, by the `run_id`
/// every listing and every placement checks, and nothing is placed until the nodes are
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_shard_restarted_from_saved_data_places_nothing_until_the_nodes_are_back() {
    let mut cluster = confroute_tests::harness::RedisCluster::start().expect("cluster");
    let cfg = fixtures::cluster(&cluster.seeds());
    let (store, controller) = two_nodes_and_a_controller(&cfg).await;
    // Every key shares the prefix's hash tag: one shard holds them all.
    let shard = cluster
        .nodes()
        .iter()
        .position(|n| {
            n.query(&mut redis::cmd("DBSIZE"))
                .and_then(|v| redis::from_redis_value::<u64>(v).ok())
                .is_some_and(|n| n > 0)
        })
        .expect("the shard holding the store");
    cluster.nodes()[shard]
        .query(&mut redis::cmd("SAVE"))
        .expect("SAVE");
    let name: confroute_shared::name::ConferenceName = "sales-42".parse().expect("name");
    let claim = store
        .claim(&name, &[fixtures::id("node-a")])
        .await
        .expect("claim");
    cluster
        .restart_node(shard)
        .expect("shard back from its snapshot");
    wait_for_async(
        "the claim lost with the restart",
        Duration::from_secs(10),
        || async { store.lookup(&name).await.ok()?.is_none().then_some(()) },
    )
    .await
    .expect("lost");
    server_change_noticed(&controller);
    refused_without_a_second_home(&controller, &store, &name).await;
    let epoch = claim.owner.expect("owner").epoch;
    routes_again_once_the_nodes_are_back(&controller, &store, &name, epoch).await;
}
