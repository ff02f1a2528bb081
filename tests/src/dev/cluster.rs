//! The local cluster of `confroute-dev`: a private Redis (child process), controllers and
//! node agents in this process, and one simulated Asterisk per node (or a real Asterisk's
//! ARI for the first node).
//!
//! Each agent runs on its own runtime thread, so "kill a node" can stop it the way a crash
//! does: every task dropped at once, nothing deregistered, its Asterisk gone with it.

use std::net::SocketAddr;
use std::time::Duration;

use confroute_controller::app::{self as controller_app, Controller};
use confroute_controller::config::ControllerConfig;
use confroute_node::config::NodeConfig;
use confroute_shared::config::load_from;
use confroute_shared::store::{Store, StoreMetrics};

use crate::ari_sim::{AriSim, SimConfig};
use crate::harness::{free_udp_tcp_port, RedisServer};

/// ARI credentials of the simulated Asterisks.
const ARI_USER: &str = "confroute";
const ARI_PASSWORD: &str = "confroute-dev";

/// What to start.
pub struct Topology {
    /// Node agents (each with its own Asterisk).
    pub nodes: usize,
    /// Controllers.
    pub controllers: usize,
    /// Conferences each node may host.
    pub capacity: u32,
    /// API token the controllers require.
    pub token: String,
    /// A real Asterisk for node 1 instead of a simulated one.
    pub real_ari: Option<RealAri>,
}

/// A real Asterisk behind node 1.
pub struct RealAri {
    /// ARI base URL, `http://host:8088`.
    pub url: String,
    /// ari.conf user.
    pub username: String,
    /// Its password.
    pub password: String,
    /// Stasis application the agent subscribes to (the dialplan sends calls to it).
    pub app: String,
    /// Where callers of the node's conferences are sent (the controllers' 302 Contact).
    pub sip_uri: String,
}

/// One controller.
pub struct ControllerHandle {
    /// SIP address (UDP and TCP).
    pub sip: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    running: Option<Controller>,
}

/// One node: its agent thread and its Asterisk.
pub struct NodeHandle {
    /// Node id.
    pub id: String,
    /// The simulated Asterisk (`None` for a real one).
    pub sim: Option<AriSim>,
    /// Agent HTTP address.
    pub http: SocketAddr,
    /// The ARI base URL the agent uses.
    pub ari_url: String,
    /// The Stasis application the agent subscribes to.
    pub ari_app: String,
    /// Where the controllers send callers of this node's conferences.
    pub sip_uri: String,
    /// False once killed.
    pub alive: bool,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Everything started.
pub struct Cluster {
    /// The private Redis.
    pub redis: RedisServer,
    /// A store on it (for the view: node states, claims).
    pub store: Store,
    /// Controllers.
    pub controllers: Vec<ControllerHandle>,
    /// Nodes.
    pub nodes: Vec<NodeHandle>,
    /// Nodes that had not reached their Asterisk when the controllers started.
    pub not_placeable: Vec<String>,
}

fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

impl Cluster {
    /// Starts Redis, the simulated Asterisks, the agents and the controllers.
    pub async fn start(t: &Topology) -> Result<Cluster, String> {
        let redis = RedisServer::start().map_err(|e| e.to_string())?;
        let redis_cfg = crate::fixtures::single(&redis.url());
        let store = Store::new(&redis_cfg, StoreMetrics::disabled()).map_err(|e| e.to_string())?;

        let mut nodes = Vec::new();
        for i in 0..t.nodes {
            let id = format!("node-{}", i + 1);
            let (sim, mut vars) = match (&t.real_ari, i) {
                (Some(real), 0) => (
                    None,
                    vec![
                        ("CONFROUTE_NODE__SIP_URI", real.sip_uri.clone()),
                        ("CONFROUTE_ARI__URL", real.url.clone()),
                        ("CONFROUTE_ARI__USERNAME", real.username.clone()),
                        ("CONFROUTE_ARI__PASSWORD", real.password.clone()),
                        // Not the production agents' app: Asterisk gives an app to its
                        // newest events WebSocket, so sharing one would take it from them.
                        ("CONFROUTE_ARI__APP", real.app.clone()),
                    ],
                ),
                _ => {
                    let sim = AriSim::start(SimConfig {
                        listen: "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
                        username: ARI_USER.into(),
                        password: ARI_PASSWORD.into(),
                        record_events: false,
                        record_requests: false,
                        ..SimConfig::default()
                    })
                    .await
                    .map_err(|e| format!("simulated Asterisk for {id}: {e}"))?;
                    let url = sim.base_url();
                    // The node's SIP address is where a real edge would send its callers;
                    // here the generator dials straight into the simulator, so any distinct
                    // address will do.
                    let sip_port = free_udp_tcp_port();
                    (
                        Some(sim),
                        vec![
                            (
                                "CONFROUTE_NODE__SIP_URI",
                                format!("sip:127.0.0.1:{sip_port}"),
                            ),
                            ("CONFROUTE_ARI__URL", url),
                            ("CONFROUTE_ARI__USERNAME", ARI_USER.to_string()),
                            ("CONFROUTE_ARI__PASSWORD", ARI_PASSWORD.to_string()),
                        ],
                    )
                }
            };
            vars.extend([
                ("CONFROUTE_NODE__ID", id.clone()),
                ("CONFROUTE_NODE__CAPACITY", t.capacity.to_string()),
                ("CONFROUTE_NODE__DRAIN_DEADLINE", "15s".into()),
                ("CONFROUTE_HTTP__LISTEN", "127.0.0.1:0".into()),
                ("CONFROUTE_REDIS__URL", redis.url()),
                // The simulator rings and answers any endpoint; a real Asterisk given
                // with --ari needs a `trunk` endpoint in its pjsip.conf for dial-outs.
                ("CONFROUTE_DIALOUT__ENDPOINT", "PJSIP/{number}@trunk".into()),
            ]);
            let cfg: NodeConfig =
                load_from(None, &env(&vars)).map_err(|e| format!("{id} configuration: {e}"))?;
            nodes.push(start_agent(id, sim, cfg).await?);
        }

        // Controllers read the nodes once as they start, then every `node_refresh`: with
        // the nodes placeable by then, the first calls find them (not 503s that say nothing
        // about the cluster).
        let not_placeable =
            Self::wait_placeable(&store, &nodes, std::time::Duration::from_secs(10)).await;

        let mut controllers = Vec::new();
        for i in 0..t.controllers {
            let cfg: ControllerConfig = load_from(
                None,
                &env(&[
                    ("CONFROUTE_SIP__LISTEN", "127.0.0.1:0".into()),
                    ("CONFROUTE_HTTP__LISTEN", "127.0.0.1:0".into()),
                    ("CONFROUTE_HTTP__API_TOKEN", t.token.clone()),
                    ("CONFROUTE_ROUTING__NODE_REFRESH", "250ms".into()),
                    ("CONFROUTE_REDIS__URL", redis.url()),
                ]),
            )
            .map_err(|e| format!("controller {} configuration: {e}", i + 1))?;
            let c = controller_app::start(&cfg)
                .await
                .map_err(|e| format!("controller {}: {e}", i + 1))?;
            controllers.push(ControllerHandle {
                sip: c.sip_addr,
                http: c.http_addr,
                running: Some(c),
            });
        }
        Ok(Cluster {
            redis,
            store,
            controllers,
            nodes,
            not_placeable,
        })
    }

    /// Waits up to `limit` until every node is registered, serving and connected to its
    /// Asterisk; the ids of those that are not.
    async fn wait_placeable(
        store: &Store,
        nodes: &[NodeHandle],
        limit: std::time::Duration,
    ) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let records = store.list_nodes().await.unwrap_or_default();
            let waiting: Vec<String> = nodes
                .iter()
                .filter(|n| {
                    !records.iter().any(|r| {
                        r.info.id.as_str() == n.id
                            && r.info.state == confroute_shared::types::NodeState::Serving
                            && r.load.ari
                    })
                })
                .map(|n| n.id.clone())
                .collect();
            if waiting.is_empty() || tokio::time::Instant::now() >= deadline {
                return waiting;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Kills node `i` as a crash would: its Asterisk dies with every call, its agent stops
    /// mid-step and leaves its Redis record to expire.
    pub fn kill(&mut self, i: usize) {
        let Some(n) = self.nodes.get_mut(i) else {
            return;
        };
        if let Some(sim) = &n.sim {
            sim.crash();
        }
        if let Some(k) = n.kill.take() {
            let _ = k.send(());
        }
        if let Some(t) = n.thread.take() {
            let _ = t.join();
        }
        n.alive = false;
    }

    /// Asks node `i`'s agent to drain (as `POST /v1/drain` on its own port).
    pub async fn drain(&self, i: usize, token: Option<&str>) -> Result<(), String> {
        let n = self.nodes.get(i).ok_or("no such node")?;
        let mut req = crate::fixtures::http().post(format!("http://{}/v1/drain", n.http));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("drain answered {}", resp.status()))
        }
    }

    /// Stops what is left, in order: node agents (already drained), controllers, simulated
    /// Asterisks, Redis.
    pub async fn stop(&mut self) {
        for n in &mut self.nodes {
            if let Some(s) = n.stop.take() {
                let _ = s.send(());
            }
            if let Some(t) = n.thread.take() {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
        }
        for c in &mut self.controllers {
            if let Some(r) = c.running.take() {
                r.stop().await;
            }
        }
        for n in &mut self.nodes {
            if let Some(sim) = n.sim.take() {
                sim.shutdown().await;
            }
        }
        self.redis.kill();
    }
}

/// Starts an agent on its own runtime thread and waits until it is up.
async fn start_agent(
    id: String,
    sim: Option<AriSim>,
    cfg: NodeConfig,
) -> Result<NodeHandle, String> {
    let ari_url = cfg.ari.url.clone();
    let ari_app = cfg.ari.app.clone();
    let sip_uri = cfg.sip_uri();
    // Awaited, not blocked on: a Ctrl-C while the cluster starts is heard meanwhile.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<SocketAddr, String>>();
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let name = id.clone();
    let thread = std::thread::Builder::new()
        .name(format!("agent-{id}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("runtime: {e}")));
                    return;
                }
            };
            let graceful = rt.block_on(async move {
                let agent = match confroute_node::app::start(cfg).await {
                    Ok(a) => a,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return false;
                    }
                };
                let _ = ready_tx.send(Ok(agent.http_addr));
                tokio::select! {
                    _ = kill_rx => {
                        // A crash runs no cleanup: the tasks are dropped with the runtime.
                        std::mem::forget(agent);
                        false
                    }
                    _ = stop_rx => {
                        agent.stop().await;
                        true
                    }
                }
            });
            let _ = graceful;
            rt.shutdown_background();
        })
        .map_err(|e| format!("agent thread: {e}"))?;
    let http = tokio::time::timeout(Duration::from_secs(20), ready_rx)
        .await
        .map_err(|_| format!("{name}: agent did not start within 20 s"))?
        .map_err(|_| format!("{name}: the agent's thread ended before it started"))??;
    Ok(NodeHandle {
        id,
        sim,
        http,
        ari_url,
        ari_app,
        sip_uri,
        alive: true,
        kill: Some(kill_tx),
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}
