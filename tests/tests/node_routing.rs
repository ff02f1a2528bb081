//! A real controller and three node agents, each beside its own simulated Asterisk: callers
//! of one conference reaching the router from different edges land in one bridge on one
//! node, and different conferences spread over the nodes.

mod node_common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::UdpSocket;
use std::time::Duration;

use confroute_tests::fixtures;
use confroute_tests::harness::{wait_for_async, ControllerProc, NodeProc, RedisServer};
use node_common::*;
use serde_json::json;

struct Cluster {
    _redis: RedisServer,
    cfg: confroute_shared::config::RedisConfig,
    controller: ControllerProc,
    nodes: Vec<(String, TestSim, NodeProc)>,
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        Self::start_with(n, &[]).await
    }

    /// [`Cluster::start`] with `extra` settings for every agent.
    async fn start_with(n: usize, extra: &[(&str, &str)]) -> Cluster {
        let redis = RedisServer::start().expect("redis");
        let cfg = fixtures::single(&redis.url());
        let controller = ControllerProc::start(&fixtures::redis_env(&cfg)).expect("controller");
        let mut nodes = Vec::new();
        for i in 0..n {
            let id = format!("node-{}", (b'a' + i as u8) as char);
            let sim = sim().await;
            let node = NodeProc::start(&id, &env(&sim, &cfg, extra)).expect("node");
            wait_app(&sim, &node).await;
            nodes.push((id, sim, node));
        }
        let c = Cluster {
            _redis: redis,
            cfg,
            controller,
            nodes,
        };
        fixtures::wait_placeable(&c.controller.http_url(), n)
            .await
            .expect("nodes placeable");
        c
    }

    /// What the agent of node `id` logged, for failure messages.
    fn node_output(&self, id: &str) -> String {
        self.nodes
            .iter()
            .find(|(n, _, _)| n == id)
            .map(|(_, _, p)| p.output())
            .unwrap_or_default()
    }

    /// The HTTP base of node `id`'s agent.
    fn node_url(&self, id: &str) -> String {
        self.nodes
            .iter()
            .find(|(n, _, _)| n == id)
            .map(|(_, _, p)| p.http_url())
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    fn sim_of(&self, id: &str) -> &TestSim {
        &self
            .nodes
            .iter()
            .find(|(n, _, _)| n == id)
            .unwrap_or_else(|| panic!("no node {id}"))
            .1
    }

    /// Edge 1 asks over SIP: the 302's `X-Conference-Node`.
    fn route_sip(&self, conf: &str, branch: &str) -> String {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let port = sock.local_addr().expect("addr").port();
        let msg = format!(
            "INVITE sip:{conf}@router SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:{conf}@router>\r\n\
             Call-ID: {branch}@edge1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        );
        sock.send_to(msg.as_bytes(), self.controller.sip_addr())
            .expect("send");
        let mut buf = [0u8; 8192];
        let n = sock.recv(&mut buf).expect("answer");
        let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(answer.starts_with("SIP/2.0 302"), "{answer}");
        answer
            .split("\r\n")
            .find_map(|l| l.strip_prefix("X-Conference-Node: "))
            .unwrap_or_else(|| panic!("no node header: {answer}"))
            .to_string()
    }

    /// Edge 2 asks over HTTP.
    async fn route_http(&self, conf: &str) -> String {
        fixtures::route_node(&self.controller.http_url(), conf).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_from_two_edges_share_one_bridge_on_one_node() {
    let c = Cluster::start(3).await;
    let first = c.route_sip("sales-42", "z9hG4bKe1a");
    let a = dial(c.sim_of(&first), "sales-42", &[]).await;
    let bridge = wait_bridged(c.sim_of(&first), &a).await;
    let second = c.route_http("sales-42").await;
    assert_eq!(first, second, "both edges are sent to the same node");
    let b = dial(c.sim_of(&second), "sales-42", &[]).await;
    assert_eq!(wait_bridged(c.sim_of(&second), &b).await, bridge);
    let third = c.route_sip("sales-42", "z9hG4bKe1b");
    assert_eq!(third, first);
    for (id, sim, _) in &c.nodes {
        if *id != first {
            assert!(sim.snapshot().bridges.is_empty(), "{id} hosts nothing");
        }
    }
    assert_eq!(
        c.sim_of(&first)
            .snapshot()
            .bridge(&bridge)
            .expect("bridge")
            .channels,
        vec![a, b]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_conferences_spread_over_the_nodes() {
    let c = Cluster::start(3).await;
    let mut placed: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..12 {
        let conf = format!("room-{i}");
        let node = c.route_http(&conf).await;
        let ch = dial(c.sim_of(&node), &conf, &[]).await;
        assert_main(&wait_bridged(c.sim_of(&node), &ch).await, 1, &conf);
        *placed.entry(node).or_default() += 1;
    }
    let used: BTreeSet<&String> = placed.keys().collect();
    assert!(used.len() >= 2, "12 conferences on one node: {placed:?}");
    for (id, sim, _) in &c.nodes {
        assert_eq!(
            sim.snapshot().bridges.len(),
            placed.get(id).copied().unwrap_or(0),
            "{id}"
        );
    }
}

/// Waits until the controller's `GET /v1/nodes/{node}` says its ARI is `up` (or not).
async fn wait_ari(c: &Cluster, node: &str, up: bool) {
    let url = format!("{}/v1/nodes/{node}", c.controller.http_url());
    wait_for_async(
        &format!("{node} reported with ARI up={up}"),
        WAIT,
        || async {
            let v = fixtures::try_get_json(&url).await?;
            (v["ari"] == json!(up)).then_some(())
        },
    )
    .await
    .expect("ARI state reported");
}

/// A conference the controller placed on node-a (named `prefix-N`) with one caller in it,
/// whose join is over (the agent lists it: a crash before its addChannel is answered would
/// fail the join and end the conference); the conference and the caller.
async fn a_caller_on_node_a(c: &Cluster, prefix: &str) -> (String, String) {
    let mut kept = None;
    for i in 0..40 {
        let conf = format!("{prefix}-{i}");
        if c.route_http(&conf).await == "node-a" {
            kept = Some(conf);
            break;
        }
    }
    let kept = kept.expect("a conference placed on node-a");
    let sim_a = c.sim_of("node-a");
    let caller = dial(sim_a, &kept, &[]).await;
    wait_bridged(sim_a, &caller).await;
    wait_listed(&c.node_url("node-a"), &caller)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.node_output("node-a")));
    (kept, caller)
}

/// Invariant 4: while a node's Asterisk is down its agent can admit nobody, so new conferences
/// go elsewhere; its conference keeps its home, and it gets new ones again once ARI is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_ari_is_down_gets_no_new_conference_but_keeps_its_own() {
    let c = Cluster::start(2).await;
    let (kept, _) = a_caller_on_node_a(&c, "kept").await;
    let sim_a = c.sim_of("node-a");

    sim_a.crash();
    wait_ari(&c, "node-a", false).await;
    for i in 0..20 {
        let conf = format!("new-{i}");
        assert_eq!(c.route_http(&conf).await, "node-b", "{conf}");
    }
    let home = c.route_http(&kept).await;
    assert_eq!(
        home,
        "node-a",
        "the live conference stays; node-a's agent logged:\n{}",
        c.node_output("node-a")
    );

    sim_a.recover();
    wait_ari(&c, "node-a", true).await;
    let mut on_a = 0;
    for i in 0..20 {
        if c.route_http(&format!("later-{i}")).await == "node-a" {
            on_a += 1;
        }
    }
    assert!(on_a > 0, "node-a gets new conferences again");
}

/// `node.participant_capacity`: once a node's agent counts that many callers, new
/// conferences go elsewhere, while its own conference keeps its home and admits more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_at_its_participant_capacity_gets_no_new_conference_but_admits_to_its_own() {
    let c = Cluster::start_with(2, &[("CONFROUTE_NODE__PARTICIPANT_CAPACITY", "2")]).await;
    let (kept, _) = a_caller_on_node_a(&c, "big").await;
    let sim_a = c.sim_of("node-a");
    let second = dial(sim_a, &kept, &[]).await;
    wait_bridged(sim_a, &second).await;
    let url = format!("{}/v1/nodes/node-a", c.controller.http_url());
    wait_for_async("node-a reporting two participants", WAIT, || async {
        let v = fixtures::try_get_json(&url).await?;
        (v["participants"] == json!(2) && v["participant_capacity"] == json!(2)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.node_output("node-a")));

    for i in 0..20 {
        let conf = format!("new-{i}");
        assert_eq!(c.route_http(&conf).await, "node-b", "{conf}");
    }
    assert_eq!(c.route_http(&kept).await, "node-a", "its conference stays");
    let third = dial(sim_a, &kept, &[]).await;
    wait_bridged(sim_a, &third).await;
}

/// An Asterisk out of reach for `ari.release_after` has its conferences' claims given back:
/// the next caller of such a conference is placed on a live node, not sent to the Asterisk
/// that may never come back. Once it is back (here restarted, empty), the node takes new
/// conferences again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conferences_of_an_asterisk_gone_past_release_after_are_placed_elsewhere() {
    let c = Cluster::start_with(2, &[("CONFROUTE_ARI__RELEASE_AFTER", "2s")]).await;
    let (kept, _) = a_caller_on_node_a(&c, "stranded").await;
    let sim_a = c.sim_of("node-a");

    sim_a.crash();
    wait_ari(&c, "node-a", false).await;
    // Within the two seconds it keeps its home; past them the claim is given back.
    let store = fixtures::store(&c.cfg);
    let name = confroute_shared::name::ConferenceName::parse(&kept).expect("name");
    wait_for_async("the claim given back", WAIT, || async {
        store.lookup(&name).await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.node_output("node-a")));
    assert!(
        c.node_output("node-a")
            .contains("Asterisk out of reach for ari.release_after"),
        "{}",
        c.node_output("node-a")
    );
    assert_eq!(
        c.route_http(&kept).await,
        "node-b",
        "the next caller goes to a live node"
    );

    sim_a.recover();
    wait_ari(&c, "node-a", true).await;
    let mut on_a = 0;
    for i in 0..20 {
        if c.route_http(&format!("after-{i}")).await == "node-a" {
            on_a += 1;
        }
    }
    assert!(on_a > 0, "node-a gets new conferences again");
    assert_eq!(
        c.route_http(&kept).await,
        "node-b",
        "the conference keeps its new home"
    );
}

/// `ari.release_after` against an Asterisk that lives: while only its events WebSocket is
/// unreachable (REST answers) the conference keeps its home, its callers may be talking;
/// once REST stops answering too the claim is given back; and when Asterisk answers again
/// with the call still up, nobody having taken the conference, node-a claims it back as it
/// was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_after_keeps_a_live_asterisks_conference_and_claims_back_a_returning_one() {
    let c = Cluster::start_with(
        2,
        &[
            ("CONFROUTE_ARI__RELEASE_AFTER", "1s"),
            ("CONFROUTE_ARI__REQUEST_TIMEOUT", "300ms"),
            // A node lease of 3 s, so a loss of pings can be shorter than it with room for
            // the ping under way to time out and the next one to come.
            ("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "1s"),
        ],
    )
    .await;
    let (kept, caller) = a_caller_on_node_a(&c, "returning").await;
    let sim_a = c.sim_of("node-a");
    let store = fixtures::store(&c.cfg);
    let name = confroute_shared::name::ConferenceName::parse(&kept).expect("name");
    let home = || async { store.lookup(&name).await.ok().flatten().map(|r| r.owner) };
    let before = home().await.expect("claimed");

    // The events WebSocket is cut off; REST still answers.
    sim_a.lose_operation("eventWebsocket");
    sim_a.drop_websockets();
    wait_ari(&c, "node-a", false).await;
    wait_for_async(
        "the agent to keep a conference whose Asterisk answers",
        WAIT,
        || async {
            c.node_output("node-a")
                .contains("events WebSocket down past ari.release_after, but Asterisk answers REST")
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.node_output("node-a")));
    assert_eq!(
        home().await,
        Some(before.clone()),
        "kept while REST answers"
    );

    // A ping or two lost (here for less than a node lease) proves nothing: nothing given back.
    let pings = || {
        sim_a
            .request_log()
            .iter()
            .filter(|r| r.operation.as_deref() == Some("ping"))
            .count()
    };
    sim_a.lose_operation("ping");
    // The length of the loss is the scenario (over one heartbeat, under three), not a wait;
    // throughout it the conference keeps its home.
    let lossy = tokio::time::Instant::now() + Duration::from_millis(1000);
    while tokio::time::Instant::now() < lossy {
        assert_eq!(
            home().await,
            Some(before.clone()),
            "kept through a short loss of pings:\n{}",
            c.node_output("node-a")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sim_a.deliver_operation("ping");
    let answered = pings();
    wait_for_async("two more pings answered", WAIT, || async {
        (pings() >= answered + 2).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.node_output("node-a")));
    assert_eq!(
        home().await,
        Some(before.clone()),
        "a short loss of pings gives nothing back:\n{}",
        c.node_output("node-a")
    );
    assert!(
        !c.node_output("node-a")
            .contains("Asterisk out of reach for ari.release_after"),
        "{}",
        c.node_output("node-a")
    );

    // REST stops answering too: given back.
    sim_a.lose_operation("ping");
    wait_for_async("the claim given back", WAIT, || async {
        home().await.is_none().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.node_output("node-a")));

    // Asterisk answers again, the call still up: node-a claims it back as it was.
    sim_a.deliver_operation("ping");
    sim_a.deliver_operation("eventWebsocket");
    wait_for_async("the claim taken back", WAIT, || async {
        (home().await == Some(before.clone())).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.node_output("node-a")));
    assert!(
        sim_a
            .snapshot()
            .channel(&caller)
            .is_some_and(|ch| ch.bridge.is_some()),
        "the caller is still in its bridge"
    );
    assert_eq!(c.route_http(&kept).await, "node-a");
}

/// Invariant 4 when Asterisk lets the agent read but not write (ari.conf makes its user
/// `read_only`: the events WebSocket and every GET still work): the node gets no new
/// conference, whether the refusal comes with a caller or is there from the start, and takes
/// conferences again once writes go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_asterisk_refuses_its_writes_gets_no_new_conference() {
    let c = Cluster::start(2).await;
    let sim_a = c.sim_of("node-a");
    // A reload made the user read-only: the next caller's bridge is refused, and with it
    // the node.
    sim_a.set_read_only(true);
    let mut on_a = None;
    for i in 0..40 {
        let conf = format!("ro-{i}");
        if c.route_http(&conf).await == "node-a" {
            on_a = Some(conf);
            break;
        }
    }
    let conf = on_a.expect("a conference placed on node-a");
    dial(sim_a, &conf, &[]).await;
    wait_ari(&c, "node-a", false).await;
    let refused = "Asterisk refuses the agent's ARI requests";
    assert!(
        c.node_output("node-a").contains(refused),
        "{}",
        c.node_output("node-a")
    );
    for i in 0..20 {
        let conf = format!("new-{i}");
        assert_eq!(c.route_http(&conf).await, "node-b", "{conf}");
    }
    sim_a.set_read_only(false);
    wait_ari(&c, "node-a", true).await;

    // Read-only from the start: the agent connects its events, and is still not placed on.
    let sim_z = sim().await;
    sim_z.set_read_only(true);
    let mut node = NodeProc::start("node-z", &env(&sim_z, &c.cfg, &[])).expect("node");
    node.wait_log(refused, WAIT).expect("the refusal logged");
    let url = format!("{}/v1/nodes/node-z", c.controller.http_url());
    let seen = fixtures::try_get_json(&url).await.expect("node-z listed");
    assert_eq!(seen["ari"], json!(false), "{seen}\n{}", node.output());
    for i in 0..20 {
        let conf = format!("later-{i}");
        assert_ne!(c.route_http(&conf).await, "node-z", "{conf}");
    }
    // The node's own metrics tell it from a lost Asterisk: connected, but refused.
    let text = fixtures::scrape(&node.http_url()).await;
    assert_eq!(
        fixtures::metric(&text, "confroute_ari_connected"),
        1.0,
        "{text}"
    );
    assert_eq!(
        fixtures::metric(&text, "confroute_ari_writes_refused"),
        1.0,
        "{text}"
    );
    sim_z.set_read_only(false);
    wait_for_async("node-z placeable once writes go through", WAIT, || async {
        let v = fixtures::try_get_json(&url).await?;
        (v["ari"] == json!(true)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
    let text = fixtures::scrape(&node.http_url()).await;
    assert!(
        text.lines().any(|l| l == "confroute_ari_writes_refused 0"),
        "{text}"
    );
}

/// Invariant 4 from the first moment: an agent that never reached its Asterisk (here a wrong
/// ARI password) registers, but no conference is placed on it until its ARI is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_agent_never_reached_ari_gets_no_conference() {
    let c = Cluster::start(1).await;
    let sim = sim().await;
    let mut node = NodeProc::start(
        "node-z",
        &env(
            &sim,
            &c.cfg,
            &[("CONFROUTE_ARI__PASSWORD", "not-the-password")],
        ),
    )
    .expect("node");
    let url = format!("{}/v1/nodes/node-z", c.controller.http_url());
    let seen = wait_for_async("node-z registered", WAIT, || async {
        let v = fixtures::try_get_json(&url).await?;
        (v["id"] == json!("node-z")).then_some(v)
    })
    .await
    .expect("node-z registered");
    assert_eq!(seen["ari"], json!(false), "{seen}\n{}", node.output());
    for i in 0..20 {
        let conf = format!("new-{i}");
        assert_eq!(c.route_http(&conf).await, "node-a", "{conf}");
    }
    assert!(sim.snapshot().bridges.is_empty(), "{}", node.output());
    // Operators see it: the controller counts the node among those with ARI down.
    let base = c.controller.http_url();
    wait_for_async("node-z counted with ARI down", WAIT, || async {
        let m = fixtures::scrape(&base).await;
        (fixtures::metric(&m, "confroute_nodes_ari_down") == 1.0).then_some(())
    })
    .await
    .expect("confroute_nodes_ari_down");
    // And the agent's log names the settings to check.
    node.wait_log("check ari.username and ari.password", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
}

/// `ari.release_after` tells a silent Asterisk from a busy one: with every ARI connection
/// the agent may open taken by a call Asterisk is slow to answer, its pings still reach
/// Asterisk, which answers them, so its conference keeps its home.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_after_pings_a_busy_asterisk_past_its_connection_limit() {
    let s = Single::start(&[
        ("CONFROUTE_ARI__RELEASE_AFTER", "1s"),
        ("CONFROUTE_ARI__REQUEST_TIMEOUT", "30s"),
        ("CONFROUTE_ARI__MAX_CONNECTIONS", "1"),
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
    ])
    .await;
    // The caller's answer stays unanswered: the agent's one connection is taken.
    s.sim.hold_operation("answer");
    dial(&s.sim, "busy-room", &[]).await;
    wait_for_async("the answer held", WAIT, || async {
        (s.sim.held_requests("answer") > 0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    let store = fixtures::store(&s.cfg);
    let name = confroute_shared::name::ConferenceName::parse("busy-room").expect("name");
    let before = store
        .lookup(&name)
        .await
        .expect("lookup")
        .expect("claimed")
        .owner;

    s.sim.lose_operation("eventWebsocket");
    s.sim.drop_websockets();
    let pings = || {
        s.sim
            .request_log()
            .iter()
            .filter(|r| r.operation.as_deref() == Some("ping") && r.status == 200)
            .count()
    };
    // Past release_after, pings for more than a node lease (heartbeats of 200 ms).
    wait_for_async("eight pings answered", WAIT, || async {
        (pings() >= 8).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert_eq!(
        store.lookup(&name).await.expect("lookup").map(|r| r.owner),
        Some(before),
        "kept while Asterisk answers:\n{}",
        s.node.output()
    );
    s.sim.release_operation("answer");
}
