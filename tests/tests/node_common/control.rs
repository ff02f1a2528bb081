//! A call-control cluster for the `call_control_*` tests: real Redis, two controllers, two
//! node agents each beside its own simulated Asterisk, and a JSON-RPC WebSocket client.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use confroute_shared::config::RedisConfig;
use confroute_tests::ari_sim::SimConfig;
use confroute_tests::fixtures;
use confroute_tests::harness::{ControllerProc, NodeProc, RedisServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::{env, sim_tuned, wait_app, TestSim, CHANNELVARS, WAIT};

/// Dial strings every test node gets (the simulator answers any endpoint).
pub const DIALOUT_ENV: &[(&str, &str)] = &[
    ("CONFROUTE_DIALOUT__ENDPOINT", "PJSIP/{number}@trunk"),
    ("CONFROUTE_DIALOUT__SIP_ENDPOINT", "PJSIP/trunk/{uri}"),
];

/// One node agent beside its simulated Asterisk.
pub struct ClusterNode {
    /// Node id.
    pub id: String,
    /// Its Asterisk.
    pub sim: TestSim,
    /// The agent process.
    pub proc: NodeProc,
}

/// Redis, controllers `[A, B]` and nodes `[node-a, node-b]`.
pub struct Cluster {
    /// Redis (kept running).
    pub redis: RedisServer,
    /// Its settings.
    pub cfg: RedisConfig,
    /// Controller A and B.
    pub controllers: Vec<ControllerProc>,
    /// The node agents.
    pub nodes: Vec<ClusterNode>,
}

impl Cluster {
    /// Starts everything; `node_extra` and `ctl_extra` are added to every node's and
    /// controller's settings. Returns once both controllers see both nodes and both nodes
    /// hear commands.
    pub async fn start(node_extra: &[(&str, &str)], ctl_extra: &[(&str, &str)]) -> Cluster {
        Self::start_tuned(node_extra, ctl_extra, |_| {}).await
    }

    /// [`Cluster::start`] with every simulated Asterisk's settings changed by `tune`.
    pub async fn start_tuned(
        node_extra: &[(&str, &str)],
        ctl_extra: &[(&str, &str)],
        tune: impl Fn(&mut SimConfig),
    ) -> Cluster {
        let redis = RedisServer::start().expect("redis");
        let cfg = fixtures::single(&redis.url());
        let mut nodes = Vec::new();
        for id in ["node-a", "node-b"] {
            let sim = sim_tuned(CHANNELVARS, &tune).await;
            let mut extra: Vec<(&str, &str)> = DIALOUT_ENV.to_vec();
            extra.extend_from_slice(node_extra);
            let mut proc = NodeProc::start(id, &env(&sim, &cfg, &extra)).expect("node starts");
            wait_app(&sim, &proc).await;
            proc.wait_log("command bus subscribed", WAIT)
                .expect("the node hears commands");
            nodes.push(ClusterNode {
                id: id.to_string(),
                sim,
                proc,
            });
        }
        let mut ctl_env = fixtures::redis_env(&cfg);
        ctl_env.extend([
            ("CONFROUTE_RPC__RATE_LIMIT".to_string(), "1000".to_string()),
            ("CONFROUTE_RPC__BURST".to_string(), "1000".to_string()),
        ]);
        ctl_env.extend(
            ctl_extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let controllers = vec![
            ControllerProc::start(&ctl_env).expect("controller A"),
            ControllerProc::start(&ctl_env).expect("controller B"),
        ];
        for c in &controllers {
            fixtures::wait_placeable(&c.http_url(), 2)
                .await
                .expect("nodes placeable");
            fixtures::wait_ready(&c.http_url())
                .await
                .expect("controller ready");
        }
        Cluster {
            redis,
            cfg,
            controllers,
            nodes,
        }
    }

    /// The node with this id.
    pub fn node(&self, id: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// The node with this id, mutably.
    pub fn node_mut(&mut self, id: &str) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Waits until every controller and agent knows Redis's clock (its
    /// `confroute_redis_clock_uncertainty_seconds` is finite): from then on a command says
    /// when it was sent, and one held on its way is told from a fresh one.
    pub async fn wait_clocks_known(&self) {
        let series = "confroute_redis_clock_uncertainty_seconds";
        let bases = self
            .controllers
            .iter()
            .map(|c| c.http_url())
            .chain(self.nodes.iter().map(|n| n.proc.http_url()));
        for base in bases {
            confroute_tests::harness::wait_for_async(
                &format!("{base} to know Redis's clock"),
                WAIT,
                || async {
                    let text = fixtures::scrape(&base).await;
                    let listed = text.lines().any(|l| l.starts_with(&format!("{series} ")));
                    (listed && fixtures::metric(&text, series).is_finite()).then_some(())
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// The node that is not `id`.
    pub fn other(&self, id: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.id != id)
            .unwrap_or_else(|| panic!("no node besides {id}"))
    }

    /// Places `conference` through controller `c` (`POST /v1/route`); the owner's id.
    pub async fn route(&self, c: usize, conference: &str) -> String {
        fixtures::route_node(&self.controllers[c].http_url(), conference).await
    }

    /// A JSON-RPC client on controller `c`.
    pub async fn client(&self, c: usize) -> Client {
        Client::connect(self.controllers[c].http_port).await
    }

    /// Everything the processes logged, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push_str(&format!("--- {} ---\n{}\n", n.id, n.proc.output()));
        }
        for (i, c) in self.controllers.iter().enumerate() {
            out.push_str(&format!("--- controller {i} ---\n{}\n", c.output()));
        }
        out
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A JSON-RPC 2.0 client over the controller's WebSocket; notifications that arrive while
/// it waits for an answer are kept for [`Client::notification`].
pub struct Client {
    ws: Ws,
    kept: VecDeque<Value>,
    next_id: u64,
}

impl Client {
    /// Connects to `ws://127.0.0.1:<port>/v1/rpc`.
    pub async fn connect(port: u16) -> Client {
        let req = format!("ws://127.0.0.1:{port}/v1/rpc")
            .into_client_request()
            .expect("request");
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("WebSocket connects");
        Client {
            ws,
            kept: VecDeque::new(),
            next_id: 1,
        }
    }

    async fn recv(&mut self, within: Duration) -> Option<Value> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, self.ws.next()).await.ok()??;
            if let Ok(Message::Text(t)) = msg {
                return Some(serde_json::from_str(t.as_str()).expect("JSON from the controller"));
            }
        }
    }

    /// Sends a request and returns its whole answer (`result` or `error`).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id});
        self.ws
            .send(Message::Text(req.to_string().into()))
            .await
            .expect("send");
        loop {
            let v = self
                .recv(WAIT)
                .await
                .unwrap_or_else(|| panic!("no answer to {method} {params}"));
            if v.get("id") == Some(&json!(id)) {
                return v;
            }
            self.kept.push_back(v);
        }
    }

    /// The result of a request that must succeed.
    pub async fn ok(&mut self, method: &str, params: Value) -> Value {
        let v = self.call(method, params.clone()).await;
        match v.get("result") {
            Some(r) => r.clone(),
            None => panic!("{method} {params} failed: {v}"),
        }
    }

    /// The error code and message of a request that must fail.
    pub async fn err(&mut self, method: &str, params: Value) -> (i64, String) {
        let v = self.call(method, params.clone()).await;
        match v.get("error") {
            Some(e) => (
                e["code"].as_i64().unwrap_or(0),
                e["message"].as_str().unwrap_or("").to_string(),
            ),
            None => panic!("{method} {params} should fail: {v}"),
        }
    }

    /// The next notification named `method` (kept ones first), within `within`.
    pub async fn notification(&mut self, method: &str, within: Duration) -> Option<Value> {
        self.notification_where(method, within, |_| true).await
    }

    /// The next notification named `method` whose params satisfy `pred`; others are kept.
    pub async fn notification_where(
        &mut self,
        method: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let wanted = |v: &Value| v["method"] == method && pred(&v["params"]);
        if let Some(i) = self.kept.iter().position(wanted) {
            return self.kept.remove(i);
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.recv(left).await?;
            if wanted(&v) {
                return Some(v);
            }
            self.kept.push_back(v);
        }
    }

    /// Dial-out statuses of `callid` until the last one (`rejected` or `cleared`), or until
    /// `stop_at` is reached.
    pub async fn statuses(&mut self, callid: &str, stop_at: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let n = self
                .notification_where("dialout.status", WAIT, |p| p["callid"] == callid)
                .await
                .unwrap_or_else(|| panic!("dial-out {callid}: statuses so far {out:?}"));
            let p = n["params"].clone();
            let status = p["status"].as_str().unwrap_or("").to_string();
            out.push(p);
            if status == stop_at || status == "rejected" || status == "cleared" {
                return out;
            }
        }
    }

    /// `held_by` of `participant` in `conference`, from `participant.list` (null if absent).
    pub async fn held_by(&mut self, conference: &str, participant: &str) -> Value {
        let list = self
            .ok("participant.list", json!({ "conference": conference }))
            .await;
        list["participants"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["id"] == participant))
            .map(|p| p["held_by"].clone())
            .unwrap_or(Value::Null)
    }

    /// Events of subscribed conferences until `pred` holds for one (included).
    pub async fn events_until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let n = self
                .notification("event", WAIT)
                .await
                .unwrap_or_else(|| panic!("events so far: {out:#?}"));
            let p = n["params"].clone();
            let done = pred(&p);
            out.push(p);
            if done {
                return out;
            }
        }
    }
}

/// The status names of a list of `dialout.status` params.
pub fn names(statuses: &[Value]) -> Vec<String> {
    statuses
        .iter()
        .map(|p| p["status"].as_str().unwrap_or("").to_string())
        .collect()
}
