//! The dashboard and the alerts against a small running cluster: real Redis, a controller, a
//! second controller whose Redis is down (so error series exist), and two node agents beside
//! simulated Asterisks, with some traffic (INVITEs, an HTTP route, callers joining and one
//! leaving). Every metric name the dashboard and the alerts read is exported, `promtool check
//! metrics` is clean on each binary's output, and a real Prometheus scraping the cluster
//! answers every dashboard query (variables filled in) with at least one series and
//! evaluates every alert without error.

#[path = "../deploy/common.rs"]
mod common;

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use common::*;
use confroute_tests::ari_sim::{AriSim, DialIn, SimConfig};
use confroute_tests::fixtures;
use confroute_tests::harness::{
    free_port, require_tool, wait_for_async, ControllerProc, NodeProc, Proc, RedisServer, TempDir,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Generous bound for anything a test waits on.
const WAIT: Duration = Duration::from_secs(30);

/// Nodes, their zones.
const NODES: &[(&str, &str)] = &[("node-a", "zone-1"), ("node-b", "zone-2")];

/// The `namespace` label every target gets, as a ServiceMonitor's targets do.
const NAMESPACE: &str = "confroute-test";

/// A node agent beside its simulated Asterisk.
struct Node {
    id: String,
    zone: String,
    sim: AriSim,
    proc: NodeProc,
}

/// The running cluster the metrics come from.
struct Cluster {
    _redis: RedisServer,
    controller: ControllerProc,
    /// A controller whose Redis refuses connections: its 503s and Redis errors are series the
    /// healthy cluster never produces.
    broken: ControllerProc,
    nodes: Vec<Node>,
}

impl Cluster {
    async fn start() -> Cluster {
        let redis = RedisServer::start().expect("redis");
        let cfg = fixtures::single(&redis.url());
        let controller = ControllerProc::start(&fixtures::redis_env(&cfg)).expect("controller");
        let dead = format!("redis://127.0.0.1:{}", free_port());
        let broken = ControllerProc::start(&[
            ("CONFROUTE_REDIS__URL".to_string(), dead),
            (
                "CONFROUTE_REDIS__CONNECT_TIMEOUT".to_string(),
                "200ms".to_string(),
            ),
            (
                "CONFROUTE_SIP__TCP_MAX_CONNECTIONS".to_string(),
                "1".to_string(),
            ),
        ])
        .expect("controller without Redis");
        let mut nodes = Vec::new();
        for (id, zone) in NODES {
            // No `channelvars`: the agent reads option variables one by one, and the unset
            // ones answer 404, so ARI error series exist.
            let sim = AriSim::start(SimConfig {
                username: "confroute".into(),
                password: "s3cret-ari".into(),
                playback_duration: Duration::from_millis(20),
                ..SimConfig::default()
            })
            .await
            .expect("simulator");
            let mut env = fixtures::redis_env(&cfg);
            env.extend([
                ("CONFROUTE_ARI__URL".to_string(), sim.base_url()),
                (
                    "CONFROUTE_ARI__USERNAME".to_string(),
                    "confroute".to_string(),
                ),
                (
                    "CONFROUTE_ARI__PASSWORD".to_string(),
                    "s3cret-ari".to_string(),
                ),
                ("CONFROUTE_NODE__ZONE".to_string(), zone.to_string()),
                (
                    "CONFROUTE_DIALOUT__ENDPOINT".to_string(),
                    "PJSIP/{number}@trunk".to_string(),
                ),
                // Short, so that an answer held back below times out.
                (
                    "CONFROUTE_ARI__REQUEST_TIMEOUT".to_string(),
                    "300ms".to_string(),
                ),
            ]);
            let proc = NodeProc::start(id, &env).expect("node agent");
            let ok = sim
                .wait_until(WAIT, |s| {
                    s.apps.iter().any(|a| a.name == "confroute" && a.active)
                })
                .await;
            assert!(ok, "{id} never connected to ARI\n{}", proc.output());
            nodes.push(Node {
                id: id.to_string(),
                zone: zone.to_string(),
                sim,
                proc,
            });
        }
        let c = Cluster {
            _redis: redis,
            controller,
            broken,
            nodes,
        };
        fixtures::wait_placeable(&c.controller.http_url(), NODES.len())
            .await
            .expect("nodes placeable");
        c
    }

    fn node(&self, id: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Calls that give every panel's series samples: a SIP route and an HTTP route, callers
    /// joining both conferences and one leaving (its conference ends), a dial-out into one
    /// (call control), and an INVITE the broken controller answers 503.
    async fn traffic(&self) {
        let (code, owner) = invite(self.controller.sip_addr(), "sales-1", "z9hG4bKdeploy1");
        assert_eq!(code, 302);
        let sim = &self.node(&owner.expect("X-Conference-Node")).sim;
        let a = dial(sim, "sales-1").await;
        wait_bridged(sim, &a).await;

        let resp = fixtures::http()
            .post(format!(
                "{}/v1/conferences/sales-1/participants",
                self.controller.http_url()
            ))
            .json(&json!({"to": "+15555550101"}))
            .send()
            .await
            .expect("dial-out");
        assert_eq!(resp.status().as_u16(), 202, "dial-out accepted");
        let v: Value = resp.json().await.expect("json");
        let callee = v["callid"].as_str().expect("callid").to_string();
        wait_bridged(sim, &callee).await;

        let v: Value = fixtures::http()
            .post(format!("{}/v1/route", self.controller.http_url()))
            .json(&json!({"conference": "standup-2"}))
            .send()
            .await
            .expect("route")
            .json()
            .await
            .expect("json");
        let sim = &self.node(v["node_id"].as_str().expect("node_id")).sim;
        let b = dial(sim, "standup-2").await;
        wait_bridged(sim, &b).await;
        sim.hangup_far_end(&b, 16).await.expect("hang up");

        // An ARI request that times out (Asterisk holds the answer back): the ARI errors
        // panel shows failures only.
        sim.hold_operation("answer");
        let _slow = dial(sim, "slow-4").await;
        let node_url = self
            .node(v["node_id"].as_str().expect("node_id"))
            .proc
            .http_url();
        wait_for_async("an ARI request timed out", WAIT, || async {
            let t = fixtures::scrape(&node_url).await;
            t.contains("status=\"timeout\"").then_some(())
        })
        .await
        .expect("ARI timeout counted");
        sim.release_operation("answer");

        let (code, _) = invite(self.broken.sip_addr(), "sales-3", "z9hG4bKdeploy2");
        assert_eq!(code, 503, "a controller without Redis turns callers away");

        // An edge past sip.tcp_max_connections (1 on the broken controller) is dropped.
        let _first = std::net::TcpStream::connect(self.broken.sip_addr()).expect("tcp");
        let broken = self.broken.http_url();
        wait_for_async("a connection dropped at the limit", WAIT, || async {
            let _extra = std::net::TcpStream::connect(self.broken.sip_addr()).ok()?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let t = fixtures::scrape(&broken).await;
            t.contains("reason=\"too_many_connections\"").then_some(())
        })
        .await
        .expect("too_many_connections counted");

        // A call-control request with an unknown method gets a JSON-RPC error.
        let ws_url = format!(
            "{}/v1/rpc",
            self.controller.http_url().replacen("http://", "ws://", 1)
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .expect("websocket");
        let req = json!({"jsonrpc": "2.0", "method": "no.such.method", "id": 1});
        ws.send(Message::Text(req.to_string().into()))
            .await
            .expect("send");
        loop {
            let msg = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("an answer")
                .expect("open")
                .expect("message");
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(t.as_str()).expect("json");
                if v["id"] == json!(1) {
                    assert!(v["error"]["code"].is_i64(), "{v}");
                    break;
                }
            }
        }
    }

    /// Every scrape target.
    fn targets(&self) -> Vec<Target> {
        let ns = || ("namespace".to_string(), NAMESPACE.to_string());
        let mut t = vec![
            (self.controller.http_url(), "controller", vec![ns()]),
            (self.broken.http_url(), "controller", vec![ns()]),
        ];
        for n in &self.nodes {
            t.push((
                n.proc.http_url(),
                "node",
                vec![
                    ns(),
                    ("node".into(), n.id.clone()),
                    ("zone".into(), n.zone.clone()),
                ],
            ));
        }
        t
    }
}

/// A scrape target: base URL, job, and the target labels Prometheus adds (as the chart's
/// ServiceMonitor does for nodes).
type Target = (String, &'static str, Vec<(String, String)>);

async fn get_json(url: &str) -> Option<Value> {
    fixtures::http()
        .get(url)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// Sends an INVITE over UDP; returns the status code and the X-Conference-Node header.
fn invite(to: std::net::SocketAddr, conf: &str, branch: &str) -> (u16, Option<String>) {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let port = sock.local_addr().expect("addr").port();
    let msg = format!(
        "INVITE sip:{conf}@router SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:{conf}@router>\r\n\
         Call-ID: {branch}@edge\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    );
    sock.send_to(msg.as_bytes(), to).expect("send");
    let mut buf = [0u8; 8192];
    let n = sock.recv(&mut buf).expect("an answer to the INVITE");
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    let code = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not a SIP answer: {answer}"));
    let node = answer
        .split("\r\n")
        .find_map(|l| l.strip_prefix("X-Conference-Node: "))
        .map(str::to_string);
    (code, node)
}

async fn dial(sim: &AriSim, conf: &str) -> String {
    sim.dial_in(DialIn {
        app: "confroute".into(),
        args: vec![conf.to_string()],
        caller_number: "+15550001".into(),
        ..DialIn::default()
    })
    .await
    .expect("dial in")
}

async fn wait_bridged(sim: &AriSim, ch: &str) {
    let ok = sim
        .wait_until(WAIT, |s| s.channel(ch).is_some_and(|c| c.bridge.is_some()))
        .await;
    assert!(ok, "{ch} never joined a bridge: {:#?}", sim.snapshot());
}

/// Sample names of a text exposition (`name` of `name{labels} value`).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Every metric name the dashboard and the alerts read.
fn used_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (_, e) in dashboard_queries(&dashboard()) {
        names.extend(metric_names(&e));
    }
    for (_, e) in alert_rules() {
        names.extend(metric_names(&e));
    }
    // The dashboard's variables read series too.
    for (_, metric, _) in variables() {
        names.insert(metric);
    }
    names
}

/// The dashboard's `label_values(metric{...}, label)` variables, as (variable, metric, the
/// query's selector with variables filled in).
fn variables() -> Vec<(String, String, String)> {
    let d = dashboard();
    let mut out = Vec::new();
    for v in d["templating"]["list"].as_array().expect("variables") {
        let Some(q) = v["query"]["query"].as_str().or(v["query"].as_str()) else {
            continue;
        };
        let Some(inner) = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        else {
            continue;
        };
        let (selector, _label) = inner
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        let metric = selector
            .split('{')
            .next()
            .expect("metric")
            .trim()
            .to_string();
        out.push((
            v["name"].as_str().expect("name").to_string(),
            metric,
            fill(selector.trim()),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_export_every_metric_the_dashboard_and_alerts_use() {
    let c = Cluster::start().await;
    c.traffic().await;
    let promtool = require_tool("promtool", "prometheus").expect("promtool");
    let used = used_names();

    // Series appear with their first event (the conference that ended, say); poll.
    let scrape_all = || async {
        let mut all = BTreeSet::new();
        let mut texts = Vec::new();
        for (url, _, _) in c.targets() {
            let t = fixtures::scrape(&url).await;
            all.extend(sample_names(&t));
            texts.push((url, t));
        }
        (all, texts)
    };
    let scraped = wait_for_async("every used metric to be exported", WAIT, || async {
        let (all, texts) = scrape_all().await;
        used.iter().all(|n| all.contains(n)).then_some(texts)
    })
    .await;
    let scraped = match scraped {
        Ok(texts) => texts,
        Err(e) => {
            let (all, _) = scrape_all().await;
            let missing: Vec<&String> = used.iter().filter(|n| !all.contains(*n)).collect();
            panic!("{e}: used by the dashboard or the alerts but exported by no binary: {missing:?}\nexported: {all:?}");
        }
    };

    // The namespace variable, which every panel filters on, reads a series both kinds of
    // process export from their start: controllers alone (no node up, the very incident)
    // still fill it.
    let (_, namespaces, _) = variables()
        .into_iter()
        .find(|(name, _, _)| name == "namespace")
        .expect("a namespace variable");
    for (url, body) in &scraped {
        assert!(
            sample_names(body).contains(&namespaces),
            "{url} exports no {namespaces}, which the namespace variable reads"
        );
    }

    for (url, body) in &scraped {
        let mut check = Command::new(&promtool);
        check.args(["check", "metrics"]);
        let out = confroute_tests::harness::run_with_input(
            check,
            body.as_bytes(),
            Duration::from_secs(30),
        )
        .expect("promtool output");
        assert!(
            out.status.success() && text(&out).trim().is_empty(),
            "promtool check metrics on {url}/metrics:\n{}",
            text(&out)
        );
    }
}

/// A Prometheus scraping the cluster every second, with the chart's alert rules loaded.
struct Prometheus {
    _proc: Proc,
    url: String,
    _dir: TempDir,
}

impl Prometheus {
    async fn start(c: &Cluster) -> Prometheus {
        let bin = require_tool("prometheus", "prometheus").expect("prometheus");
        let dir = TempDir::new("prometheus").expect("dir");
        let mut jobs: Vec<(&str, Vec<String>)> = Vec::new();
        for (url, job, labels) in c.targets() {
            let host = url.trim_start_matches("http://").to_string();
            let labels = labels
                .iter()
                .map(|(k, v)| format!("{k}: {v:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            let entry = format!("      - targets: [{host:?}]\n        labels: {{{labels}}}\n");
            match jobs.iter_mut().find(|(j, _)| *j == job) {
                Some((_, v)) => v.push(entry),
                None => jobs.push((job, vec![entry])),
            }
        }
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n",
        );
        config.push_str(&format!(
            "rule_files:\n  - {:?}\nscrape_configs:\n",
            chart_dir().join("rules/confroute.rules.yaml")
        ));
        for (job, entries) in jobs {
            config.push_str(&format!("  - job_name: {job}\n    static_configs:\n"));
            for e in entries {
                config.push_str(&e);
            }
        }
        let cfg_path = dir.path().join("prometheus.yml");
        std::fs::write(&cfg_path, &config).expect("write config");
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let proc = Proc::spawn("prometheus", cmd, &dir.path().join("prometheus.log"))
            .expect("start prometheus");
        let url = format!("http://127.0.0.1:{port}");
        let ready = format!("{url}/-/ready");
        wait_for_async("prometheus to be ready", WAIT, || async {
            let r = fixtures::http().get(&ready).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\nconfig:\n{config}", proc.output()));
        Prometheus {
            _proc: proc,
            url,
            _dir: dir,
        }
    }

    /// The result vector of an instant query, or None while the query fails.
    async fn query(&self, q: &str) -> Option<Vec<Value>> {
        let url = format!("{}/api/v1/query?{}", self.url, encode("query", q));
        let v = fixtures::try_get_json(&url).await?;
        (v["status"] == "success")
            .then(|| v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

/// `key=value`, URL-encoded.
fn encode(key: &str, value: &str) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair(key, value)
        .finish()
}

/// A query as Grafana sends it with `$namespace` set to the cluster's, and `$node` and
/// `$zone` to every node and zone.
fn fill(expr: &str) -> String {
    let nodes: Vec<&str> = NODES.iter().map(|(n, _)| *n).collect();
    let zones: Vec<&str> = NODES.iter().map(|(_, z)| *z).collect();
    expr.replace("$__rate_interval", "10s")
        .replace("$namespace", NAMESPACE)
        .replace("$node", &format!("({})", nodes.join("|")))
        .replace("$zone", &format!("({})", zones.join("|")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_answers_every_dashboard_query_from_the_running_cluster() {
    let c = Cluster::start().await;
    let prom = Prometheus::start(&c).await;
    c.traffic().await;

    // The variables, each read from its own query's series: zone and node values come from
    // the node agents'.
    let selectors = variables();
    for (label, want) in [
        (
            "zone",
            NODES
                .iter()
                .map(|(_, z)| z.to_string())
                .collect::<BTreeSet<_>>(),
        ),
        ("node", NODES.iter().map(|(n, _)| n.to_string()).collect()),
        ("namespace", BTreeSet::from([NAMESPACE.to_string()])),
    ] {
        let url = format!("{}/api/v1/label/{label}/values", prom.url);
        let (_, _, selector) = selectors
            .iter()
            .find(|(name, _, _)| name == label)
            .unwrap_or_else(|| panic!("no ${label} variable"));
        wait_for_async(&format!("values of ${label}"), WAIT, || async {
            let v: Value = fixtures::http()
                .get(format!("{url}?{}", encode("match[]", selector)))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let got: BTreeSet<String> = v["data"]
                .as_array()?
                .iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect();
            (got == want).then_some(())
        })
        .await
        .expect("variable values");
    }

    for (panel, expr) in dashboard_queries(&dashboard()) {
        let q = fill(&expr);
        let found = wait_for_async(&format!("panel {panel:?}"), WAIT, || async {
            let r = prom.query(&q).await?;
            (!r.is_empty()).then_some(r)
        })
        .await;
        if let Err(e) = found {
            panic!(
                "{e}: the query returned no series\n{q}\nlast answer: {:?}",
                prom.query(&q).await
            );
        }
    }

    // Every alert evaluates against real series without error.
    let rules_url = format!("{}/api/v1/rules", prom.url);
    let alerts = alert_rules();
    let groups = wait_for_async("every rule evaluated", WAIT, || async {
        let v = get_json(&rules_url).await?;
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules.len() == alerts.len()
            && rules.iter().all(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            });
        evaluated.then_some(rules)
    })
    .await
    .expect("rules loaded and evaluated");
    for r in groups {
        assert_eq!(r["health"], "ok", "{} : {}", r["name"], r["lastError"]);
    }
    // A healthy cluster fires none of the quick alerts (the broken controller's view counts
    // for nothing: the healthy one still sees serving nodes).
    let firing = prom
        .query("ALERTS{alertstate=\"firing\"}")
        .await
        .unwrap_or_default();
    assert!(
        firing.is_empty(),
        "alerts firing on a healthy cluster: {firing:?}"
    );
}
