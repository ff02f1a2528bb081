//! The cluster a scenario runs on this machine: Redis (one server, or a primary, a replica and
//! three Sentinels), optionally reached through partition proxies; one simulated Asterisk
//! (in this process) and one real `confroute-node` process per node; real
//! `confroute-controller` processes. Everything is stopped when the cluster is dropped.
//!
//! The processes run with the product's default timings (heartbeat 1 s, so a node lease of
//! 3 s; ARI reconnect 100 ms to 5 s; node view refresh 500 ms), not the harness's faster test
//! timings: the figures are those an operator gets out of the box.
//!
//! Processes are started from the caller's own thread (never a blocking-pool thread), since
//! the harness ties each child's life to the thread that started it.

use std::path::Path;
use std::time::Duration;

use confroute_shared::config::{RedisConfig, SentinelConfig};
use confroute_shared::store::{Store, StoreMetrics};

use super::{ChaosError, ChaosResult};
use crate::ari_sim::{AriSim, SimConfig};
use crate::fixtures;
use crate::harness::{
    wait_for_async, ControllerProc, NodeProc, RedisServer, SentinelGroup, TcpProxy,
};

/// ARI credentials of the simulated Asterisks.
const ARI_USER: &str = "confroute";
const ARI_PASSWORD: &str = "chaos-ari-secret";

/// Bound for start-up steps.
const START_WAIT: Duration = Duration::from_secs(20);

/// Which Redis deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisKind {
    /// One `redis-server`.
    Single,
    /// A primary, one replica and three Sentinels; claims wait for the replica.
    Sentinel,
}

/// What to start.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Conference nodes.
    pub nodes: usize,
    /// Controllers.
    pub controllers: usize,
    /// Redis deployment.
    pub redis: RedisKind,
    /// Every controller and agent reaches Redis through one shared proxy (single Redis only).
    pub shared_proxy: bool,
    /// These nodes' agents reach Redis through a proxy of their own (single Redis only).
    pub node_proxies: Vec<usize>,
    /// Extra agent settings.
    pub node_env: Vec<(String, String)>,
    /// Extra controller settings.
    pub controller_env: Vec<(String, String)>,
}

impl Spec {
    /// `nodes` nodes and `controllers` controllers on a single Redis, reached directly.
    pub fn new(nodes: usize, controllers: usize) -> Spec {
        Spec {
            nodes,
            controllers,
            redis: RedisKind::Single,
            shared_proxy: false,
            node_proxies: Vec::new(),
            node_env: Vec::new(),
            controller_env: Vec::new(),
        }
    }

    /// Adds an agent setting.
    pub fn node_setting(mut self, key: &str, value: &str) -> Spec {
        self.node_env.push((key.to_string(), value.to_string()));
        self
    }
}

/// A running cluster. Fields drop in order: processes first, then Asterisks, proxies, Redis.
pub struct Cluster {
    /// Controllers.
    pub controllers: Vec<ControllerProc>,
    /// Node agents, same order as `sims`.
    pub nodes: Vec<NodeProc>,
    /// Simulated Asterisks.
    pub sims: Vec<AriSim>,
    /// Node ids.
    pub node_ids: Vec<String>,
    /// Per-node proxies (for the nodes in [`Spec::node_proxies`]).
    pub node_proxies: Vec<Option<TcpProxy>>,
    /// The proxy every process goes through ([`Spec::shared_proxy`]).
    pub shared_proxy: Option<TcpProxy>,
    /// A store reaching Redis directly (for the scenario's own checks).
    pub store: Store,
    /// Redis settings reaching it directly.
    pub direct: RedisConfig,
    /// The single server.
    pub single: Option<RedisServer>,
    /// The Sentinel group.
    pub sentinel: Option<SentinelGroup>,
    pids: Vec<(String, Option<u32>)>,
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Agent settings at the product's defaults where the harness sets faster test values.
fn node_defaults() -> Vec<(String, String)> {
    pairs(&[
        ("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "1s"),
        ("CONFROUTE_ARI__RECONNECT_MIN", "100ms"),
        ("CONFROUTE_ARI__RECONNECT_MAX", "5s"),
        ("CONFROUTE_ARI__PING_INTERVAL", "5s"),
        // Beeps are playbacks: load on the simulator that says nothing about routing.
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
    ])
}

/// Controller settings at the product's defaults where the harness sets faster test values.
fn controller_defaults() -> Vec<(String, String)> {
    pairs(&[("CONFROUTE_ROUTING__NODE_REFRESH", "500ms")])
}

fn sentinel_config(group: &SentinelGroup) -> RedisConfig {
    RedisConfig {
        sentinel: Some(SentinelConfig {
            master_name: group.master_name().to_string(),
            addresses: group.sentinel_urls(),
            username: None,
            password: None,
            tls: false,
        }),
        // As docs/architecture.md recommends behind Sentinel: a claim is answered only once
        // the replica has it, so a failover cannot lose it.
        wait_replicas: 1,
        ..RedisConfig::default()
    }
}

impl Cluster {
    /// Starts Redis, the Asterisks, the agents (each registered, its Stasis app up) and the
    /// controllers (each seeing every node serving).
    pub async fn start(spec: &Spec) -> ChaosResult<Cluster> {
        let (single, sentinel, direct) = match spec.redis {
            RedisKind::Single => {
                let r = RedisServer::start()?;
                let cfg = fixtures::single(&r.url());
                (Some(r), None, cfg)
            }
            RedisKind::Sentinel => {
                let g = SentinelGroup::start()?;
                let cfg = sentinel_config(&g);
                (None, Some(g), cfg)
            }
        };
        let store = Store::new(&direct, StoreMetrics::disabled())
            .map_err(|e| ChaosError(format!("store: {e}")))?;
        let upstream = single
            .as_ref()
            .map(|r| std::net::SocketAddr::from(([127, 0, 0, 1], r.port())));
        let shared_proxy = match (spec.shared_proxy, upstream) {
            (true, Some(up)) => Some(TcpProxy::start(up).await?),
            (true, None) => return Err(ChaosError("a shared proxy needs a single Redis".into())),
            _ => None,
        };
        let mut node_proxies = Vec::new();
        for i in 0..spec.nodes {
            node_proxies.push(match (spec.node_proxies.contains(&i), upstream) {
                (true, Some(up)) => Some(TcpProxy::start(up).await?),
                (true, None) => return Err(ChaosError("a node proxy needs a single Redis".into())),
                _ => None,
            });
        }
        let via = |proxy: Option<&TcpProxy>| -> RedisConfig {
            match proxy.or(shared_proxy.as_ref()) {
                Some(p) => fixtures::single(&p.redis_url()),
                None => direct.clone(),
            }
        };

        let mut sims = Vec::new();
        let mut nodes = Vec::new();
        let mut node_ids = Vec::new();
        for (i, proxy) in node_proxies.iter().enumerate() {
            let sim = AriSim::start(SimConfig {
                username: ARI_USER.into(),
                password: ARI_PASSWORD.into(),
                record_events: false,
                record_requests: false,
                ..SimConfig::default()
            })
            .await
            .map_err(|e| ChaosError(format!("simulated Asterisk {}: {e}", i + 1)))?;
            let id = format!("node-{}", i + 1);
            let mut env = node_defaults();
            env.extend(fixtures::redis_env(&via(proxy.as_ref())));
            env.extend(pairs(&[
                ("CONFROUTE_ARI__URL", &sim.base_url()),
                ("CONFROUTE_ARI__USERNAME", ARI_USER),
                ("CONFROUTE_ARI__PASSWORD", ARI_PASSWORD),
            ]));
            env.extend(spec.node_env.iter().cloned());
            let node = NodeProc::start(&id, &env)?;
            wait_app(&sim, &node).await?;
            sims.push(sim);
            nodes.push(node);
            node_ids.push(id);
        }
        let mut controllers = Vec::new();
        for _ in 0..spec.controllers {
            let mut env = controller_defaults();
            env.extend(fixtures::redis_env(&via(None)));
            env.extend(spec.controller_env.iter().cloned());
            controllers.push(ControllerProc::start(&env)?);
        }
        let mut cluster = Cluster {
            controllers,
            nodes,
            sims,
            node_ids,
            node_proxies,
            shared_proxy,
            store,
            direct,
            single,
            sentinel,
            pids: Vec::new(),
        };
        cluster.wait_controllers_see(spec.nodes).await?;
        cluster.pids = cluster.current_pids();
        Ok(cluster)
    }

    /// Waits until every controller's node view holds `serving` serving nodes.
    pub async fn wait_controllers_see(&self, serving: usize) -> ChaosResult<()> {
        for c in &self.controllers {
            let url = c.http_url();
            wait_for_async(
                &format!("controller {url} to see {serving} serving node(s)"),
                START_WAIT,
                || async {
                    let text = fixtures::scrape(&url).await;
                    (fixtures::metric(&text, r#"confroute_nodes{state="serving"}"#)
                        == serving as f64)
                        .then_some(())
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Waits until node `i`'s agent has its Stasis app registered again.
    pub async fn wait_node_app(&self, i: usize) -> ChaosResult<()> {
        wait_app(&self.sims[i], &self.nodes[i]).await
    }

    /// SIP and HTTP addresses of every controller.
    pub fn controller_addrs(&self) -> Vec<(std::net::SocketAddr, std::net::SocketAddr)> {
        self.controllers
            .iter()
            .map(|c| {
                (
                    c.sip_addr(),
                    std::net::SocketAddr::from(([127, 0, 0, 1], c.http_port)),
                )
            })
            .collect()
    }

    /// Name and pid of every controller and agent process now.
    pub fn current_pids(&mut self) -> Vec<(String, Option<u32>)> {
        let mut out = Vec::new();
        for (i, c) in self.controllers.iter_mut().enumerate() {
            let running = c.process().is_running();
            out.push((format!("controller-{}", i + 1), c.pid().filter(|_| running)));
        }
        for (i, n) in self.nodes.iter_mut().enumerate() {
            let running = n.process().is_running();
            let pid = n.process().pid().filter(|_| running);
            out.push((self.node_ids[i].clone(), pid));
        }
        out
    }

    /// Processes (other than `exempt`) that exited or were replaced since the start.
    pub fn restarted(&mut self, exempt: &[String]) -> Vec<String> {
        let now = self.current_pids();
        self.pids
            .iter()
            .zip(now)
            .filter(|((name, before), (_, after))| !exempt.contains(name) && before != after)
            .map(|((name, _), _)| name.clone())
            .collect()
    }

    /// Writes every process's output into `dir` (for a look after a run).
    pub fn save_logs(&self, dir: &Path) {
        let _ = std::fs::create_dir_all(dir);
        for (i, c) in self.controllers.iter().enumerate() {
            let _ = std::fs::write(dir.join(format!("controller-{}.log", i + 1)), c.output());
        }
        for (id, n) in self.node_ids.iter().zip(&self.nodes) {
            let _ = std::fs::write(dir.join(format!("{id}.log")), n.all_output());
        }
    }

    /// Bridges left in the Asterisks: `(node index, bridge id, members)`.
    pub fn bridges(&self) -> Vec<(usize, String, usize)> {
        let mut out = Vec::new();
        for (i, sim) in self.sims.iter().enumerate() {
            for b in sim.snapshot().bridges {
                out.push((i, b.id, b.channels.len()));
            }
        }
        out
    }

    /// Waits (up to `within`) until no Asterisk has a bridge; returns those left.
    pub async fn wait_no_bridges(&self, within: Duration) -> Vec<(usize, String, usize)> {
        let _ = wait_for_async("every bridge to be gone", within, || async {
            self.bridges().is_empty().then_some(())
        })
        .await;
        self.bridges()
    }

    /// Waits (up to `within`) until Redis holds no conference claim; returns those left.
    pub async fn wait_no_claims(&self, within: Duration) -> Vec<String> {
        let left = || async {
            match self.store.list_conferences(None, 1000).await {
                Ok(page) => page
                    .items
                    .iter()
                    .map(|(n, r)| format!("{n} (owner {}, epoch {})", r.owner.node, r.owner.epoch))
                    .collect(),
                Err(e) => vec![format!("cannot list claims: {e}")],
            }
        };
        let _ = wait_for_async("every claim to be released", within, || async {
            left().await.is_empty().then_some(())
        })
        .await;
        left().await
    }
}

async fn wait_app(sim: &AriSim, node: &NodeProc) -> ChaosResult<()> {
    let up = sim
        .wait_until(START_WAIT, |s| {
            s.apps.iter().any(|a| a.name == "confroute" && a.active)
        })
        .await;
    if up {
        Ok(())
    } else {
        Err(ChaosError(format!(
            "{}'s agent never connected its events WebSocket\n{}",
            node.id,
            node.output()
        )))
    }
}
