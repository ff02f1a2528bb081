//! Helpers shared by the node agent tests: a simulated Asterisk per node, the agent's
//! environment, and waits on the simulator.

#![allow(dead_code)]

use std::time::Duration;

use confroute_shared::config::RedisConfig;
use confroute_tests::ari_sim::client::EventStream;
use confroute_tests::ari_sim::{AriSim, BridgeSnapshot, DialIn, SimConfig, SimSnapshot};
use confroute_tests::fixtures;
use confroute_tests::harness::{NodeProc, RedisServer, TcpProxy};
use serde_json::Value;

pub mod control;

/// Generous bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(10);

/// Option variables listed in ari.conf `channelvars` for most tests (no extra round trips).
pub const CHANNELVARS: &[&str] = &[
    "CONFROUTE_CONFERENCE",
    "CONFROUTE_PROFILE",
    "CONFROUTE_MUTED",
    "CONFROUTE_BEEP",
    "CONFROUTE_START_ON_ENTER",
    "CONFROUTE_END_ON_EXIT",
    "CONFROUTE_MAX_PARTICIPANTS",
    "CONFROUTE_WAIT_MUSIC",
    "CONFROUTE_RECORD",
    "CONFROUTE_STATUS_CALLBACK",
    "CONFROUTE_STATUS_CALLBACK_EVENT",
];

/// A simulated Asterisk plus an observer app following everything, so the event log also
/// holds events the agent's app stops seeing (e.g. `ChannelDestroyed` with its cause).
pub struct TestSim {
    pub sim: AriSim,
    _observer: EventStream,
}

impl std::ops::Deref for TestSim {
    type Target = AriSim;
    fn deref(&self) -> &AriSim {
        &self.sim
    }
}

/// A simulated Asterisk with the test credentials and `channelvars` set.
pub async fn sim() -> TestSim {
    sim_with(CHANNELVARS).await
}

/// A simulated Asterisk listing `channelvars` in channel snapshots.
pub async fn sim_with(channelvars: &[&str]) -> TestSim {
    sim_tuned(channelvars, |_| {}).await
}

/// [`sim_with`], its settings changed by `tune` (e.g. an older Asterisk's behaviour).
pub async fn sim_tuned(channelvars: &[&str], tune: impl FnOnce(&mut SimConfig)) -> TestSim {
    let mut cfg = SimConfig {
        username: "confroute".into(),
        password: "s3cret-ari".into(),
        channelvars: channelvars.iter().map(|s| s.to_string()).collect(),
        playback_duration: Duration::from_millis(50),
        ..SimConfig::default()
    };
    tune(&mut cfg);
    let sim = AriSim::start(cfg).await.expect("simulator starts");
    let observer =
        EventStream::connect(&format!("{}&subscribeAll=true", sim.events_url("observer")))
            .await
            .expect("observer connects");
    TestSim {
        sim,
        _observer: observer,
    }
}

/// The environment of an agent for `sim` and Redis `cfg`, plus `extra`.
pub fn env(sim: &AriSim, cfg: &RedisConfig, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = fixtures::redis_env(cfg);
    env.push(("CONFROUTE_ARI__URL".into(), sim.base_url()));
    env.push(("CONFROUTE_ARI__USERNAME".into(), sim.username().into()));
    env.push(("CONFROUTE_ARI__PASSWORD".into(), sim.password().into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// One Redis, one simulator and one agent.
pub struct Single {
    pub redis: RedisServer,
    pub cfg: RedisConfig,
    pub sim: TestSim,
    pub node: NodeProc,
}

impl Single {
    /// Starts Redis, a simulator and agent `node-a` with `extra` settings, and waits until
    /// the agent's Stasis app is registered.
    pub async fn start(extra: &[(&str, &str)]) -> Single {
        Self::start_on(sim().await, extra).await
    }

    /// [`Single::start`] beside the simulator `sim` (one tuned by the test).
    pub async fn start_on(sim: TestSim, extra: &[(&str, &str)]) -> Single {
        let redis = RedisServer::start().expect("redis");
        let cfg = fixtures::single(&redis.url());
        let node = NodeProc::start("node-a", &env(&sim, &cfg, extra)).expect("node starts");
        wait_app(&sim, &node).await;
        // The app is registered before the heartbeat says ARI is up: until then no
        // conference is placed on the node.
        let store = fixtures::store(&cfg);
        confroute_tests::harness::wait_for_async("the node placeable in Redis", WAIT, || async {
            let rec = store.get_node(&fixtures::id("node-a")).await.ok()??;
            rec.load.ari.then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.output()));
        Single {
            redis,
            cfg,
            sim,
            node,
        }
    }
}

impl Single {
    /// Kills the agent and starts it again with Asterisk holding `GET /channels`; returns
    /// once its first reconciliation has listed the bridges and waits for the channels
    /// (release with `sim.release_operation("GET /channels")`).
    pub async fn restart_with_channel_listing_held(&mut self) {
        self.node.process().kill();
        until(&self.sim, "agent's socket gone", |snap| {
            snap.websockets == 1
        })
        .await;
        self.sim.hold_operation("GET /channels");
        self.node.restart().expect("restart");
        wait_app(&self.sim, &self.node).await;
        confroute_tests::harness::wait_for_async(
            "the reconciliation waiting for its channels",
            WAIT,
            || async { (self.sim.held_requests("GET /channels") > 0).then_some(()) },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.node.output()));
    }
}

/// Waits until the agent's events WebSocket registered the `confroute` app.
pub async fn wait_app(sim: &AriSim, node: &NodeProc) {
    let ok = sim
        .wait_until(WAIT, |s| {
            s.apps.iter().any(|a| a.name == "confroute" && a.active)
        })
        .await;
    assert!(
        ok,
        "agent never connected its events WebSocket\n{}",
        node.output()
    );
}

/// A caller dials in with Stasis argument `conf` (empty: no argument) and `vars`.
pub async fn dial(sim: &AriSim, conf: &str, vars: &[(&str, &str)]) -> String {
    sim.dial_in(DialIn {
        app: "confroute".into(),
        args: if conf.is_empty() {
            vec![]
        } else {
            vec![conf.to_string()]
        },
        caller_number: "+15550001".into(),
        variables: vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..DialIn::default()
    })
    .await
    .expect("dial in")
}

/// Waits until the agent at `node_url` lists channel `ch` in one of its conferences. Its
/// join's requests to Asterisk are then over: the addChannel answered, the entry beep asked
/// for (the count in Redis is written just after the listing is published). A count in
/// Redis alone comes earlier: the first caller's seat is written before its add.
pub async fn wait_listed(node_url: &str, ch: &str) -> Result<(), String> {
    let url = format!("{node_url}/v1/conferences");
    confroute_tests::harness::wait_for_async(&format!("{ch} listed by the agent"), WAIT, || async {
        let v = fixtures::try_get_json(&url).await?;
        let listed = v["items"].as_array()?.iter().any(|conf| {
            conf["participants"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["channel"] == ch))
        });
        listed.then_some(())
    })
    .await
    .map_err(|e| e.to_string())
}

/// Waits until channel `ch` is in a bridge; returns the bridge id.
pub async fn wait_bridged(sim: &AriSim, ch: &str) -> String {
    let ok = sim
        .wait_until(WAIT, |s| s.channel(ch).is_some_and(|c| c.bridge.is_some()))
        .await;
    let snap = sim.snapshot();
    assert!(ok, "channel {ch} never entered a bridge: {snap:#?}");
    snap.channel(ch)
        .and_then(|c| c.bridge.clone())
        .expect("bridged")
}

/// Waits until channel `ch` is gone (hung up); returns its hangup cause from the event log.
pub async fn wait_hangup(sim: &AriSim, ch: &str) -> i64 {
    let ev = sim
        .wait_for_event(WAIT, |e| {
            e["type"] == "ChannelDestroyed" && e["channel"]["id"] == ch
        })
        .await
        .unwrap_or_else(|| panic!("channel {ch} was not hung up: {:#?}", sim.snapshot()));
    ev["cause"].as_i64().expect("cause")
}

/// Waits until `pred` holds for the snapshot, failing with the snapshot.
pub async fn until(sim: &AriSim, what: &str, pred: impl Fn(&SimSnapshot) -> bool) {
    if !sim.wait_until(WAIT, pred).await {
        panic!("timed out waiting for {what}: {:#?}", sim.snapshot());
    }
}

/// Waits until `a` and `b` are in one mixing bridge.
pub async fn wait_mixed_together(sim: &AriSim, a: &str, b: &str) {
    until(sim, "both mixed", |snap| {
        let bridge = |ch: &str| snap.channel(ch).and_then(|c| c.bridge.clone());
        bridge(a).is_some_and(|m| {
            bridge(b).as_deref() == Some(m.as_str())
                && snap.bridge(&m).is_some_and(|m| m.bridge_type == "mixing")
        })
    })
    .await;
}

/// `GET` a JSON document from the agent.
pub async fn get_json(url: &str) -> Value {
    fixtures::http()
        .get(url)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON")
}

/// The ARI requests of one operation nickname in the simulator's log.
pub fn ops(sim: &AriSim, op: &str) -> usize {
    sim.request_log()
        .iter()
        .filter(|r| r.operation.as_deref() == Some(op))
        .count()
}

/// Waits until the simulator logged a request for `op` whose path starts with `prefix`.
/// (The log entry is written after the answer, so a state change can be seen first.)
pub async fn wait_request(sim: &AriSim, op: &str, prefix: &str) {
    let found = confroute_tests::harness::wait_for_async(
        &format!("an ARI {op} request on {prefix}"),
        WAIT,
        || async {
            sim.request_log()
                .iter()
                .any(|r| r.operation.as_deref() == Some(op) && r.path.starts_with(prefix))
                .then_some(())
        },
    )
    .await;
    if let Err(e) = found {
        panic!("{e}: {:#?}", sim.request_log());
    }
}

/// `(holding, epoch, conference)` named by a bridge id the agent made; `None` for others.
pub fn bridge_of(id: &str) -> Option<(bool, u64, String)> {
    confroute_node::conference::parse_bridge_id(id).map(|(h, e, n)| (h, e, n.to_string()))
}

/// Whether `id` is the agent's mixing bridge of `conf` at `epoch` (any lifetime).
pub fn is_main(id: &str, epoch: u64, conf: &str) -> bool {
    bridge_of(id) == Some((false, epoch, conf.to_string()))
}

/// Whether `id` is the agent's holding bridge of `conf` at `epoch` (any lifetime).
pub fn is_holding(id: &str, epoch: u64, conf: &str) -> bool {
    bridge_of(id) == Some((true, epoch, conf.to_string()))
}

/// Asserts that `id` is the agent's mixing bridge of `conf` at `epoch`.
#[track_caller]
pub fn assert_main(id: &str, epoch: u64, conf: &str) {
    assert!(
        is_main(id, epoch, conf),
        "{id} is not the mixing bridge of {conf} at epoch {epoch}"
    );
}

/// Asserts that `id` is the agent's holding bridge of `conf` at `epoch`.
#[track_caller]
pub fn assert_holding(id: &str, epoch: u64, conf: &str) {
    assert!(
        is_holding(id, epoch, conf),
        "{id} is not the holding bridge of {conf} at epoch {epoch}"
    );
}

/// The agent's mixing bridge of `conf` at `epoch` in `snap`.
pub fn main_bridge<'a>(
    snap: &'a SimSnapshot,
    epoch: u64,
    conf: &str,
) -> Option<&'a BridgeSnapshot> {
    snap.bridges.iter().find(|b| is_main(&b.id, epoch, conf))
}

/// The agent's holding bridge of `conf` at `epoch` in `snap`.
pub fn holding_bridge<'a>(
    snap: &'a SimSnapshot,
    epoch: u64,
    conf: &str,
) -> Option<&'a BridgeSnapshot> {
    snap.bridges.iter().find(|b| is_holding(&b.id, epoch, conf))
}

/// Redis, a proxy in front of it for the agent (passing bytes on at once until told to be
/// slow), a simulated Asterisk and agent `node-a` on them, its app registered.
pub struct Proxied {
    pub redis: RedisServer,
    pub proxy: TcpProxy,
    pub cfg: RedisConfig,
    pub sim: TestSim,
    pub node: NodeProc,
}

/// [`Proxied`], the agent started with `extra` settings.
pub async fn behind_a_proxy(extra: &[(&str, &str)]) -> Proxied {
    let redis = RedisServer::start().expect("redis");
    let upstream = format!("127.0.0.1:{}", redis.port()).parse().expect("addr");
    let proxy = TcpProxy::start(upstream).await.expect("proxy");
    let cfg = fixtures::single(&proxy.redis_url());
    let sim = sim().await;
    let node = NodeProc::start("node-a", &env(&sim, &cfg, extra)).expect("node");
    wait_app(&sim, &node).await;
    Proxied {
        redis,
        proxy,
        cfg,
        sim,
        node,
    }
}
