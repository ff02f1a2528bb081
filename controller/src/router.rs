//! The routing decision: which node hosts a conference. Shared by the SIP and HTTP entries.
//!
//! Hot path: one `HMGET` of the conference record; if its owner is in our node view with a
//! live lease and may take joiners, that is the answer. Otherwise one atomic claim script,
//! with candidates from the placer, decides (and re-homes when the owner is gone). The whole
//! decision has a deadline; past it, or when Redis fails, the caller answers 503: never a
//! guess (invariant 5).
//!
//! Redis trouble also stops every node from renewing its lease: when Redis comes back (or a
//! replica is promoted), the leases of live nodes may have run out meanwhile, and a claim
//! would re-home their conferences (people still talking on the old node, newcomers sent to
//! a new one) or place a conference whose claim Redis lost next to its live bridge. So after
//! trouble no conference is placed or re-homed until the nodes that were live before it
//! have been seen registered again, or their lease has passed since Redis came back (then
//! they are really gone); conferences with a live owner are routed as usual meanwhile.

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

/// Lease assumed for nodes never seen (three heartbeats of the default 1 s).
const DEFAULT_NODE_LEASE: Duration = Duration::from_secs(3);

/// Longest wait for the known nodes after Redis trouble: the longest lease an agent takes
/// (three of the longest `node.heartbeat_interval`, 60 s). A node is waited for its whole
/// lease, however long: one that renews every 20 s could not write twice within a shorter
/// wait, and its conferences would be placed beside their live bridges (invariant 1).
const MAX_SETTLE: Duration = Duration::from_secs(180);

/// Claims one placement may make: each after the last one's candidates all turned out full,
/// draining or gone since the node view was read.
const CLAIM_TRIES: usize = 3;

/// Writes of a node that must be seen after Redis trouble, each newer than the last: the
/// first may have been made before the trouble; a node that had to register again renews
/// (or claims again) the conferences it hosts right after, which the second leaves time for.
const SIGHTINGS: u8 = 2;

/// A node that was live before Redis trouble.
#[derive(Clone)]
struct Known {
    id: NodeId,
    /// Its full lease (the longest lease left ever seen).
    lease: Duration,
    /// Redis time of its last write seen before the trouble.
    updated_ms: u64,
}

/// Whether Redis trouble may have let leases of live nodes run out.
enum Health {
    /// No trouble seen since the last settled state.
    Good,
    /// Redis failed at `since`; these nodes were live before. `restarted`: no short trouble
    /// makes it harmless: the server behind the store changed meanwhile (a restart from
    /// saved data, a failover), which may have lost the last claims while keeping the node
    /// records as they were, or it came while settling after earlier trouble.
    Trouble {
        known: Vec<Known>,
        since: Instant,
        restarted: bool,
        /// The writes seen and the end of the wait, when the trouble came while settling
        /// (and the server did not change): a short trouble then resumes that wait.
        during: Option<Sightings>,
    },
    /// Redis is back; waiting for these nodes to write to Redis again (writes seen since,
    /// each newer than the last, with the last one's time), at most until `until`.
    Settling {
        known: Vec<Known>,
        seen: HashMap<NodeId, (u8, u64)>,
        until: Instant,
    },
}

/// Writes seen per node while settling (each newer than the last, with the last one's time),
/// and when the wait ends at the latest.
type Sightings = (HashMap<NodeId, (u8, u64)>, Instant);

/// How long Redis trouble may last without any live node losing its lease for it: a live
/// node renews every third of its lease (three heartbeats per lease), so it still has a
/// third of its lease left to renew in. A blip (a timed-out call, a reconnect) stays under
/// this and changes nothing.
fn harmless(known: &[Known]) -> Duration {
    known
        .iter()
        .map(|k| k.lease)
        .filter(|l| !l.is_zero())
        .min()
        .unwrap_or(DEFAULT_NODE_LEASE)
        / 3
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
    health: Mutex<Health>,
    /// Longest lease left seen per node: its full lease, give or take a heartbeat.
    leases: Mutex<HashMap<NodeId, u64>>,
    /// The Redis connection the node view was last read on ([`Store::connection_generation`]).
    view_generation: std::sync::atomic::AtomicU64,
    /// Held by the placement that reads the nodes again after trouble or a reconnect.
    verifying: tokio::sync::Mutex<()>,
    /// The Redis server the nodes were last listed on (its `run_id`).
    server: Mutex<Option<String>>,
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
            health: Mutex::new(Health::Good),
            leases: Mutex::new(HashMap::new()),
            view_generation: std::sync::atomic::AtomicU64::new(0),
            verifying: tokio::sync::Mutex::new(()),
            server: Mutex::new(None),
        }
    }

    /// Notes a Redis failure: placements wait until the live nodes are seen again.
    fn trouble(&self) {
        self.trouble_with(false);
    }

    /// [`Router::trouble`]; `restarted` when the server behind the store changed, which no
    /// short trouble makes harmless.
    fn trouble_with(&self, restarted: bool) {
        let mut health = match self.health.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        let (known, since, restarted) = match &mut *health {
            Health::Good => {
                let view = self.view();
                let leases = match self.leases.lock() {
                    Ok(l) => l.clone(),
                    Err(p) => p.into_inner().clone(),
                };
                // Every node of the last listing, live when it was read: trouble noticed late
                // (a slow first failure) must not take nodes whose leases seem to have run
                // out meanwhile, by our clock, for gone.
                let known = view
                    .nodes
                    .values()
                    .map(|n| Known {
                        id: n.info.id.clone(),
                        lease: Duration::from_millis(
                            leases.get(&n.info.id).copied().unwrap_or(n.lease_ms),
                        ),
                        updated_ms: n.updated_ms,
                    })
                    .collect();
                (known, Instant::now(), restarted)
            }
            Health::Trouble {
                restarted: before,
                during,
                ..
            } => {
                *before |= restarted;
                // A server that changed may have lost writes counted before.
                if restarted {
                    *during = None;
                }
                return;
            }
            // Trouble again while settling does not end the wait as a short trouble would:
            // the nodes live before have not all written since the first one, which may have
            // lost their claims (a reconnect right after a restart, say, would otherwise
            // place conferences whose claims it lost). A short one resumes it with the writes
            // seen so far, so that repeated blips do not keep placements refused.
            Health::Settling { known, seen, until } => {
                let during = (!restarted).then(|| (seen.clone(), *until));
                *health = Health::Trouble {
                    known: known.clone(),
                    since: Instant::now(),
                    restarted,
                    during,
                };
                return;
            }
        };
        *health = Health::Trouble {
            known,
            since,
            restarted,
            during: None,
        };
    }

    /// After a successful refresh: moves on from trouble once the nodes known before it are
    /// seen again (or had time to be).
    fn settle(&self, nodes: &[NodeRecord]) {
        let mut health = match self.health.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        if let Health::Trouble {
            known,
            since,
            restarted,
            during,
        } = &*health
        {
            let short = since.elapsed() < harmless(known);
            if let (Some((seen, until)), true) = (during, short) {
                // A blip while settling: the wait goes on where it was, as long again as
                // the blip lasted.
                *health = Health::Settling {
                    known: known.clone(),
                    seen: seen.clone(),
                    until: *until + since.elapsed(),
                };
                return self.count_sightings(&mut health, nodes);
            }
            // Short trouble left every lease time to be renewed, unless Redis lost them: a
            // restart without persistence comes back empty in well under a second, and a
            // node that registers again first would be given the conferences of the others.
            // A server that changed (a restart from saved data, a failover) may have kept
            // the node records and lost the last claims: their nodes claim them back at
            // their next heartbeats, and nothing is placed until then.
            let intact = known.iter().all(|k| {
                nodes
                    .iter()
                    .any(|n| n.info.id == k.id && n.updated_ms >= k.updated_ms)
            });
            if short && intact && !restarted && during.is_none() {
                *health = Health::Good;
                return;
            }
            let longest = known
                .iter()
                .map(|k| k.lease)
                .max()
                .filter(|l| !l.is_zero())
                .unwrap_or(DEFAULT_NODE_LEASE)
                .min(MAX_SETTLE);
            tracing::info!(wait_at_most = ?longest, nodes = known.len(), "redis reachable again; placing no conference until the nodes that were live have renewed their leases");
            *health = Health::Settling {
                known: known.clone(),
                seen: HashMap::new(),
                until: Instant::now() + longest,
            };
        }
        self.count_sightings(&mut health, nodes);
    }

    /// While settling: counts the writes of the known nodes in this listing, and moves on
    /// once each wrote twice (or the wait is over).
    fn count_sightings(&self, health: &mut Health, nodes: &[NodeRecord]) {
        let Health::Settling { known, seen, until } = health else {
            return;
        };
        // A record that merely outlived the trouble says nothing: it may expire before its
        // node reaches Redis again. Only a write since the trouble shows the node is back.
        // Each sighting must be a write newer than the last one counted: the view taken when
        // the trouble began may predate the node's last write before it, and that one write,
        // seen on every refresh, would otherwise count as the node being back.
        for k in known.iter() {
            match nodes.iter().find(|n| n.info.id == k.id) {
                Some(n) => {
                    let (count, last) = seen.entry(k.id.clone()).or_insert((0, k.updated_ms));
                    if n.updated_ms > *last {
                        *count = count.saturating_add(1);
                        *last = n.updated_ms;
                    }
                }
                None => {
                    seen.remove(&k.id);
                }
            }
        }
        let back = !known.is_empty()
            && known
                .iter()
                .all(|k| seen.get(&k.id).is_some_and(|(n, _)| *n >= SIGHTINGS));
        if back || Instant::now() >= *until {
            tracing::info!(
                all_back = back,
                "placing conferences again after the redis trouble"
            );
            *health = Health::Good;
        }
    }

    /// Before a placement: after Redis trouble, or a reconnect since the node view was read,
    /// the nodes are read again first, so that a Redis that lost its data is noticed before
    /// anything is placed in it.
    async fn verify_before_placing(&self) -> Result<(), RouteError> {
        let reconnected =
            self.store.connection_generation() != self.view_generation.load(Ordering::Relaxed);
        let unverified = match self.health.lock() {
            Ok(h) => matches!(*h, Health::Trouble { .. }),
            Err(p) => matches!(*p.into_inner(), Health::Trouble { .. }),
        };
        if !(reconnected || unverified) {
            return Ok(());
        }
        // One read for all the placements waiting on it.
        let _one = self.verifying.lock().await;
        let reconnected =
            self.store.connection_generation() != self.view_generation.load(Ordering::Relaxed);
        let unverified = match self.health.lock() {
            Ok(h) => matches!(*h, Health::Trouble { .. }),
            Err(p) => matches!(*p.into_inner(), Health::Trouble { .. }),
        };
        if reconnected || unverified {
            self.refresh()
                .await
                .map_err(|e| RouteError::Unavailable(e.to_string()))?;
        }
        Ok(())
    }

    /// True while Redis trouble may have let leases of live nodes run out.
    pub fn settling(&self) -> bool {
        let health = match self.health.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        match &*health {
            Health::Good => false,
            Health::Trouble {
                known,
                since,
                restarted,
                during,
            } => *restarted || during.is_some() || since.elapsed() >= harmless(known),
            Health::Settling { until, .. } => Instant::now() < *until,
        }
    }

    /// A routing error for a store failure, noting Redis trouble.
    fn store_failed(&self, e: StoreError) -> RouteError {
        if matches!(e, StoreError::Unavailable(_)) {
            self.trouble();
        }
        RouteError::Unavailable(e.to_string())
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
        // Leases are read at the server: counting them from before the request errs on the
        // side of a node being gone.
        let asked = Instant::now();
        // The connection as it was before the read: one opened meanwhile (by this read or
        // another call) is noticed by the next look rather than credited with this listing.
        let generation = self.store.connection_generation();
        let result = self.store.list_nodes_on_server().await;
        self.redis_ok.store(result.is_ok(), Ordering::Relaxed);
        let (nodes, server) = match result {
            Ok(n) => n,
            Err(e) => {
                if matches!(e, StoreError::Unavailable(_)) {
                    self.trouble();
                }
                return Err(e);
            }
        };
        // Connected anew since the last read: Redis may have restarted in between, unseen by
        // any failed call here, and come back without the leases. That is trouble too; the
        // listing then shows whether the nodes live before are still there.
        // A connection opened during the read (by it, or by another call that found the old
        // one dead) means this listing may come from a Redis that restarted: trouble, judged
        // against the view from before it.
        let after = self.store.connection_generation();
        let previous = self.view_generation.swap(generation, Ordering::Relaxed);
        let reconnected = previous != generation || generation != after;
        if previous != 0 && reconnected {
            self.trouble();
        }
        // Whether the listing came from the server of before, on every listing (a Cluster
        // client reconnects to a restarted shard without a new connection of ours): Redis
        // restarted from saved data, or a replica promoted, comes back with the node records
        // but may lack the last claims written, which a short reconnect would not show.
        if let Some(id) = server {
            self.server_seen(id);
        }
        if let Ok(mut leases) = self.leases.lock() {
            // Only listed nodes are looked up; a node id gone from Redis (a replaced agent
            // with a new id) is forgotten rather than kept for the life of the process.
            let listed: std::collections::HashSet<&NodeId> =
                nodes.iter().map(|n| &n.info.id).collect();
            leases.retain(|id, _| listed.contains(id));
            for n in &nodes {
                let l = leases.entry(n.info.id.clone()).or_default();
                *l = (*l).max(n.lease_ms);
            }
        }
        self.settle(&nodes);
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
        let ari_down = nodes.iter().filter(|n| !n.load.ari).count();
        self.metrics
            .nodes_ari_down
            .set(i64::try_from(ari_down).unwrap_or(i64::MAX));
        // As the placer and claim.lua judge them: serving nodes can all be full or without
        // their Asterisk, when every new conference is refused as surely as with none.
        let placeable = nodes
            .iter()
            .filter(|n| {
                n.lease_ms > 0
                    && n.info.state == NodeState::Serving
                    && n.load.ari
                    && n.claimed.max(n.load.conferences) < n.info.capacity
                    && (n.info.participant_capacity == 0
                        || n.load.participants < n.info.participant_capacity)
            })
            .count();
        self.metrics
            .nodes_placeable
            .set(i64::try_from(placeable).unwrap_or(i64::MAX));
        let view = Arc::new(NodeView {
            nodes: nodes.into_iter().map(|n| (n.info.id.clone(), n)).collect(),
            read_at: asked,
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

    /// Notes that the store's Redis server is `id` (its `run_id`); one that changed is
    /// trouble no short outage makes harmless. The trouble is set before the new id is
    /// visible: a placement or refresh that sees the new id finds the trouble too.
    fn server_seen(&self, id: String) {
        let mut known = match self.server.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if known.as_deref() == Some(id.as_str()) {
            return;
        }
        if known.is_some() {
            tracing::warn!("the redis server behind the store changed (a restart or a failover); placing no conference until the nodes that were live have renewed their leases and claims");
            self.trouble_with(true);
        }
        *known = Some(id);
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
        let unavailable = |e: StoreError| self.store_failed(e);
        // Whether the lookup found no record at all (not merely one it could not read).
        let mut found_none = true;
        let record = match self.store.lookup(name).await {
            Ok(r) => r,
            // A record this process cannot read (written by hand, or by something else) is
            // the claim's to judge: it reads such fields leniently and keeps one home.
            Err(StoreError::Protocol { message, .. }) => {
                tracing::warn!(conference = %name, error = %message, "unreadable conference record; letting the claim decide");
                found_none = false;
                None
            }
            Err(e) => return Err(unavailable(e)),
        };
        // An unconfirmed record may yet be lost in a failover: claiming confirms it first.
        if let Some(rec) = record.as_ref().filter(|r| !r.unconfirmed) {
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
        self.verify_before_placing().await?;
        if self.settling() {
            return Err(RouteError::Unavailable(
                "redis was unreachable; waiting for the live nodes to renew their leases before placing or re-homing a conference".into(),
            ));
        }
        // The view may be up to a refresh old: candidates the claim finds full, draining or
        // gone are set aside and others asked, so a stale view does not answer 503 while a
        // node (another zone's, a fifth) has room.
        let mut tries = 0;
        let claim = loop {
            tries += 1;
            let candidates = match self.placer.lock() {
                Ok(mut p) => p.candidates(self.candidates).unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            let server = match self.server.lock() {
                Ok(s) => s.clone(),
                Err(p) => p.into_inner().clone(),
            };
            let claim = match self
                .store
                .claim_on(name, &candidates, server.as_deref())
                .await
            {
                Ok(c) => c,
                Err(StoreError::ServerChanged) => {
                    // Found before the refresher: the same wait for the nodes as it sets.
                    self.trouble_with(true);
                    return Err(RouteError::Unavailable(
                        StoreError::ServerChanged.to_string(),
                    ));
                }
                Err(e) => return Err(unavailable(e)),
            };
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
            let all_stale = !candidates.is_empty() && claim.skipped >= candidates.len();
            if claim.kind != ClaimKind::NoCapacity || !all_stale || tries >= CLAIM_TRIES {
                break claim;
            }
        };
        match (claim.kind, claim.owner) {
            (ClaimKind::NoCapacity, _) | (_, None) => Err(RouteError::NoCapacity),
            (kind, Some(owner)) => {
                // A race with another caller only when the lookup saw no record at all: an
                // unreadable one was there all along.
                if kind == ClaimKind::Existing && record.is_none() && found_none {
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

#[cfg(test)]
mod tests {
    use super::*;
    use confroute_shared::config::RedisConfig;
    use confroute_shared::types::{NodeInfo, NodeLoad};

    fn router() -> Router {
        let metrics = Metrics::new().expect("metrics");
        // Never connected to: these tests drive the health state by hand.
        let store = Store::new(&RedisConfig::default(), metrics.store.clone()).expect("store");
        Router::new(store, None, 2, Duration::from_secs(1), metrics)
    }

    fn record(id: &str, updated_ms: u64) -> NodeRecord {
        NodeRecord {
            info: NodeInfo {
                id: id.parse().expect("id"),
                sip_uri: "sip:10.0.0.1:5060".into(),
                control: String::new(),
                zone: String::new(),
                capacity: 10,
                participant_capacity: 0,
                state: NodeState::Serving,
            },
            load: NodeLoad {
                conferences: 0,
                participants: 0,
                cpu: 0.0,
                ari: true,
            },
            claimed: 0,
            placements: 0,
            lease_ms: 3000,
            updated_ms,
            stopping: false,
            drain_since_ms: None,
            lease_period_ms: None,
        }
    }

    /// Trouble that began 5 s ago, longer than node-a's 3 s lease makes harmless; node-a
    /// last wrote at 100 before it.
    fn past_trouble(r: &Router) {
        let mut h = r.health.lock().expect("health lock");
        *h = Health::Trouble {
            known: vec![Known {
                id: "node-a".parse().expect("id"),
                lease: Duration::from_secs(3),
                updated_ms: 100,
            }],
            since: Instant::now() - Duration::from_secs(5),
            restarted: false,
            during: None,
        };
    }

    /// The view taken when trouble began may predate a node's last write before it: that
    /// write, read on refresh after refresh, is one sighting, not the node being back.
    #[test]
    fn settling_counts_each_write_once() {
        let r = router();
        past_trouble(&r);
        r.settle(&[record("node-a", 150)]);
        assert!(r.settling(), "one write seen");
        r.settle(&[record("node-a", 150)]);
        assert!(r.settling(), "the same write again is no second sighting");
        r.settle(&[record("node-a", 1150)]);
        assert!(!r.settling(), "two writes since: the node is back");
    }

    /// Trouble too short to cost a lease still needs the nodes seen before it: a Redis that
    /// came back empty lost them.
    #[test]
    fn short_trouble_is_harmless_only_if_the_nodes_are_still_there() {
        let r = router();
        let trouble = || Health::Trouble {
            known: vec![Known {
                id: "node-a".parse().expect("id"),
                lease: Duration::from_secs(30),
                updated_ms: 100,
            }],
            since: Instant::now(),
            restarted: false,
            during: None,
        };
        {
            let mut h = r.health.lock().expect("health lock");
            *h = trouble();
        }
        r.settle(&[record("node-a", 100)]);
        assert!(!r.settling(), "still listed: nothing was lost");
        {
            let mut h = r.health.lock().expect("health lock");
            *h = trouble();
        }
        r.settle(&[record("node-b", 100)]);
        assert!(r.settling(), "node-a is gone from Redis");
        // A server that changed may have kept the records and lost the last claims.
        {
            let mut h = r.health.lock().expect("health lock");
            *h = trouble();
        }
        r.trouble_with(true);
        assert!(r.settling(), "the server changed: settling at once");
        r.settle(&[record("node-a", 100)]);
        assert!(r.settling(), "still listed, but the server changed");
        // A blip while settling (a reconnect right after the restart) is no short trouble
        // of its own: the records still listed say nothing of the claims lost before it.
        r.trouble();
        assert!(r.settling(), "nothing placed during the blip");
        r.settle(&[record("node-a", 100)]);
        assert!(r.settling(), "a blip while settling does not end the wait");
    }

    /// Blips while settling do not start the wait over: the writes seen before one still
    /// count after it, so repeated short troubles cannot keep placements refused for ever.
    /// A server that changed does start it over.
    #[test]
    fn writes_seen_while_settling_count_across_a_blip() {
        let r = router();
        past_trouble(&r);
        r.settle(&[record("node-a", 200)]);
        assert!(r.settling(), "one write seen");
        r.trouble();
        r.settle(&[record("node-a", 300)]);
        assert!(
            !r.settling(),
            "the second write, after a blip: the node is back"
        );

        past_trouble(&r);
        r.settle(&[record("node-a", 200)]);
        r.trouble_with(true);
        r.settle(&[record("node-a", 300)]);
        assert!(
            r.settling(),
            "a new server: the writes before it count for nothing"
        );
        r.settle(&[record("node-a", 400)]);
        assert!(!r.settling(), "two writes on the new server");
    }

    /// After trouble, a node with a long lease (a long heartbeat interval) is waited for as
    /// long as its lease, not a fixed bound shorter than two of its heartbeats.
    #[test]
    fn settling_waits_as_long_as_the_longest_lease() {
        let r = router();
        {
            let mut h = r.health.lock().expect("health lock");
            *h = Health::Trouble {
                known: vec![Known {
                    id: "node-a".parse().expect("id"),
                    lease: Duration::from_secs(60),
                    updated_ms: 100,
                }],
                since: Instant::now() - Duration::from_secs(30),
                restarted: false,
                during: None,
            };
        }
        r.settle(&[record("node-b", 100)]);
        let until = match r.health.lock().as_deref() {
            Ok(Health::Settling { until, .. }) => *until,
            _ => panic!("settling"),
        };
        assert!(
            until >= Instant::now() + Duration::from_secs(55),
            "waits the node's 60 s lease"
        );
    }
}
