//! The routing decision: which node hosts a conference. Shared by the SIP and HTTP entries.
//!
//! Hot path: one `HMGET` of the conference record; if its owner is in our node view with a
//! live lease and may take joiners, that is the answer. Otherwise one atomic claim script,
//! with candidates from the placer, decides (and re-homes when the owner is gone). The whole
//! decision has a deadline; past it, or when Redis fails, the caller answers 503: never a
//! guess (invariant 5).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use confroute_shared::name::ConferenceName;
use confroute_shared::placement::Placer;
use confroute_shared::store::{ClaimKind, Store, StoreError};
use confroute_shared::types::{NodeId, NodeRecord, NodeState};

use crate::metrics::Metrics;

/// Every value of the `outcome` label of `confroute_route_total`.
pub const OUTCOMES: [&str; 6] = [
    "existing",
    "claimed",
    "rehomed",
    "no_capacity",
    "redis_error",
    "invalid",
];

/// Where a conference goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The owning node.
    pub node_id: NodeId,
    /// The node's SIP URI.
    pub sip_uri: String,
    /// Owner epoch.
    pub epoch: u64,
    /// How the decision was reached.
    pub kind: ClaimKind,
}

impl Decision {
    /// True when this call created the conference's home (claimed or re-homed it).
    pub fn created(&self) -> bool {
        matches!(self.kind, ClaimKind::Claimed | ClaimKind::Rehomed)
    }
}

/// Why no decision could be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No serving node has room.
    #[error("no node has room for a new conference")]
    NoCapacity,
    /// Redis failed or the deadline passed.
    #[error("routing store unavailable: {0}")]
    Unavailable(String),
}

/// The nodes as last read from Redis.
pub struct NodeView {
    /// Nodes by id.
    pub nodes: HashMap<NodeId, NodeRecord>,
    /// When they were read.
    pub read_at: Instant,
}

impl NodeView {
    /// The node `id` if its lease had not run out by now (judged by our clock).
    pub fn live(&self, id: &NodeId) -> Option<&NodeRecord> {
        self.nodes
            .get(id)
            .filter(|n| self.read_at.elapsed() < Duration::from_millis(n.lease_ms))
    }
}

/// Routing state shared by every entry point.
pub struct Router {
    store: Store,
    view: RwLock<Arc<NodeView>>,
    placer: Mutex<Placer>,
    candidates: usize,
    deadline: Duration,
    metrics: Metrics,
    redis_ok: AtomicBool,
}

impl Router {
    /// A router over `store`, preferring `zone` for new conferences.
    pub fn new(
        store: Store,
        zone: Option<String>,
        candidates: usize,
        deadline: Duration,
        metrics: Metrics,
    ) -> Self {
        Router {
            store,
            view: RwLock::new(Arc::new(NodeView {
                nodes: HashMap::new(),
                read_at: Instant::now(),
            })),
            placer: Mutex::new(Placer::new(zone, None)),
            candidates,
            deadline,
            metrics,
            redis_ok: AtomicBool::new(false),
        }
    }

    /// The store (for the admin API).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The latest node view.
    pub fn view(&self) -> Arc<NodeView> {
        match self.view.read() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether the last Redis round trip of the refresher succeeded.
    pub fn redis_ok(&self) -> bool {
        self.redis_ok.load(Ordering::Relaxed)
    }

    /// Re-reads the nodes from Redis into the view and the placer.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let result = self.store.list_nodes().await;
        self.redis_ok.store(result.is_ok(), Ordering::Relaxed);
        let nodes = result?;
        if let Ok(mut p) = self.placer.lock() {
            p.refresh(&nodes);
        }
        let mut counts = [0i64; 3];
        for n in &nodes {
            counts[match n.info.state {
                NodeState::Serving => 0,
                NodeState::Draining => 1,
                NodeState::ShuttingDown => 2,
            }] += 1;
        }
        for (state, count) in ["serving", "draining", "shutting_down"].iter().zip(counts) {
            self.metrics.nodes.with_label_values(&[state]).set(count);
        }
        let view = Arc::new(NodeView {
            nodes: nodes.into_iter().map(|n| (n.info.id.clone(), n)).collect(),
            read_at: Instant::now(),
        });
        if let Ok(mut v) = self.view.write() {
            *v = view;
        }
        Ok(())
    }

    /// Refreshes the view every `every` until the task is dropped.
    pub fn spawn_refresher(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut was_ok = true;
            loop {
                ticker.tick().await;
                let Some(router) = me.upgrade() else { break };
                match router.refresh().await {
                    Ok(()) if !was_ok => {
                        tracing::info!("redis reachable again; node view refreshed");
                        was_ok = true;
                    }
                    Ok(()) => {}
                    Err(e) if was_ok => {
                        tracing::warn!(error = %e, "cannot refresh the node view; keeping the last one");
                        was_ok = false;
                    }
                    Err(_) => {}
                }
            }
        })
    }

    /// Counts a request rejected for its conference name.
    pub fn record_invalid(&self) {
        self.metrics.routes.with_label_values(&["invalid"]).inc();
    }

    /// Decides the node for `name`; `entry` labels the latency metric (`sip`, `http`).
    pub async fn route(
        &self,
        name: &ConferenceName,
        entry: &'static str,
    ) -> Result<Decision, RouteError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.deadline, self.decide(name)).await {
            Ok(r) => r,
            Err(_) => Err(RouteError::Unavailable(format!(
                "no decision within {:?}",
                self.deadline
            ))),
        };
        let outcome = match &result {
            Ok(d) => d.kind.as_str(),
            Err(RouteError::NoCapacity) => "no_capacity",
            Err(RouteError::Unavailable(_)) => "redis_error",
        };
        self.metrics.routes.with_label_values(&[outcome]).inc();
        self.metrics
            .route_duration
            .with_label_values(&[entry])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn decide(&self, name: &ConferenceName) -> Result<Decision, RouteError> {
        let unavailable = |e: StoreError| RouteError::Unavailable(e.to_string());
        let record = self.store.lookup(name).await.map_err(unavailable)?;
        if let Some(rec) = &record {
            let view = self.view();
            if let Some(node) = view.live(&rec.owner.node) {
                // A node that is not serving keeps only conferences that have people in them.
                if node.info.state == NodeState::Serving || rec.participants > 0 {
                    return Ok(Decision {
                        node_id: rec.owner.node.clone(),
                        sip_uri: node.info.sip_uri.clone(),
                        epoch: rec.owner.epoch,
                        kind: ClaimKind::Existing,
                    });
                }
            }
        }
        let candidates = match self.placer.lock() {
            Ok(mut p) => p.candidates(self.candidates).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let claim = self
            .store
            .claim(name, &candidates)
            .await
            .map_err(unavailable)?;
        if let Ok(mut p) = self.placer.lock() {
            for skipped in candidates.iter().take(claim.skipped) {
                p.unavailable(skipped);
            }
            if matches!(claim.kind, ClaimKind::Claimed | ClaimKind::Rehomed) {
                if let Some(o) = &claim.owner {
                    p.placed(&o.node);
                }
            }
        }
        match (claim.kind, claim.owner) {
            (ClaimKind::NoCapacity, _) | (_, None) => Err(RouteError::NoCapacity),
            (kind, Some(owner)) => {
                if kind == ClaimKind::Existing && record.is_none() {
                    self.metrics.claim_conflicts.inc();
                }
                Ok(Decision {
                    node_id: owner.node,
                    sip_uri: claim.sip_uri,
                    epoch: owner.epoch,
                    kind,
                })
            }
        }
    }
}
