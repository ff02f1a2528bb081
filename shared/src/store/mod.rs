//! The Redis data model: conference claims, node registrations, and their leases.
//!
//! Every key starts with the configured prefix, whose `{hash tag}` puts them all in one
//! Cluster slot, so the same atomic scripts run unchanged on a single Redis, behind
//! Sentinel and on Redis Cluster.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<p>conf:<name>` | hash, lease = `redis.claim_lease` until its owner's first count, then `redis.conference_lease` | owner, epoch, participants, created_ms |
//! | `<p>confs` | sorted set (score 0) | conference names, for paged listing |
//! | `<p>ended:<name>` | string, lease = `redis.conference_lease` | the epoch the name's last life ended with |
//! | `<p>node:<id>` | hash, lease = node lease | sip_uri, control, zone, capacity, state (numbered: state_seq, state_seq_state), load |
//! | `<p>node:<id>:confs` | set, lease = node lease | conferences placed on the node (capacity count) |
//! | `<p>nodes` | sorted set (score = lease end, ms) | node ids, for listing |

mod conn;
mod metrics;
mod reply;
mod scripts;

use std::time::{Duration, Instant};

use redis::Value;

pub use metrics::StoreMetrics;

pub(crate) use conn::address as connection_address;

use crate::config::RedisConfig;
use crate::name::ConferenceName;
use crate::types::{ConferenceRecord, NodeId, NodeInfo, NodeLoad, NodeRecord, NodeState, Owner};
use conn::{Conn, Connector};
use reply::Reply;
use scripts::Scripts;

/// What a state write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateChange {
    /// Written; the state before.
    Changed(NodeState),
    /// The node has no live record.
    NotRegistered,
    /// Refused: the node is stopping for good (its shutdown drain); its current state.
    Stopping(NodeState),
    /// Not written: the record's state was written again since the number the writer read
    /// (an agent writing back what a failover took away); its current state.
    Superseded(NodeState),
}

/// How a node registers, beyond its record (`register.lua`'s optional arguments).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Registration {
    /// Whether the agent's ARI events WebSocket is up; `None` when the registrant does not
    /// know (counts as up).
    pub ari: Option<bool>,
    /// For a registration that is not serving: when the drain it resumes began (Redis ms).
    pub drain_since_ms: Option<u64>,
    /// The state the agent read in this node's live record before registering: a different
    /// one there now was set by an admin meanwhile, and is kept.
    pub seen: Option<NodeState>,
    /// The agent is in its shutdown drain: the record is marked stopping in the same step,
    /// so no admin undrain can make it serving in between (invariant 4).
    pub stopping: bool,
}

/// A numbering a conference's home keeps increasing across agent restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceKind {
    /// Status callbacks' `SequenceNumber`.
    Callbacks,
    /// Call-control events' `seq`.
    Events,
}

impl SequenceKind {
    /// The conference record's field holding the numbers reserved.
    fn field(self) -> &'static str {
        match self {
            SequenceKind::Callbacks => "callback_seq",
            SequenceKind::Events => "event_seq",
        }
    }
}

/// A store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Redis could not be reached, or did not answer within `redis.timeout`.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error.
    #[error("redis error in {op}: {message}")]
    Redis {
        /// Store operation.
        op: &'static str,
        /// Redis's message.
        message: String,
    },
    /// Redis answered with something the data model does not allow.
    #[error("unexpected redis reply in {op}: {message}")]
    Protocol {
        /// Store operation.
        op: &'static str,
        /// What was wrong.
        message: String,
    },
    /// The Redis settings cannot be used.
    #[error("redis configuration: {0}")]
    Config(String),
    /// Redis lost the node records (restarted empty, or every lease ran out): no conference
    /// is placed or re-homed until the nodes that were live are back (`settle.lua`).
    #[error("redis lost the node records (restarted empty, or every lease ran out); placing nothing until the nodes that were live have registered again")]
    Settling,
    /// The Redis server holding the store is not the one the nodes were last listed on (a
    /// restart from saved data, a failover): it may have lost claims of live conferences, so
    /// nothing is placed or re-homed until the nodes have renewed them (`claim.lua`).
    #[error("the redis server changed since the nodes were listed (a restart or a failover); placing nothing until the nodes that were live have renewed their leases and claims")]
    ServerChanged,
    /// Fewer replicas than `redis.wait_replicas` acknowledged a write in time.
    #[error("claim not acknowledged by {wanted} replica(s) within the deadline (got {got})")]
    NotReplicated {
        /// Replicas required (the configured count, capped at those connected).
        wanted: u32,
        /// Replicas that acknowledged.
        got: u32,
    },
}

impl StoreError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Settling => "settling",
            StoreError::ServerChanged => "server_changed",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Redis { .. } => "redis",
            StoreError::Protocol { .. } => "protocol",
            StoreError::Config(_) => "config",
            StoreError::NotReplicated { .. } => "not_replicated",
        }
    }
}

/// How a claim ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimKind {
    /// The conference already had a live home.
    Existing,
    /// This call created the conference's home.
    Claimed,
    /// The previous owner was dead, or not serving and empty; a new owner took over.
    Rehomed,
    /// No candidate could take the conference.
    NoCapacity,
}

impl ClaimKind {
    /// The outcome label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimKind::Existing => "existing",
            ClaimKind::Claimed => "claimed",
            ClaimKind::Rehomed => "rehomed",
            ClaimKind::NoCapacity => "no_capacity",
        }
    }
}

/// The answer of [`Store::claim`], the same for winners and losers of a race.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// What happened.
    pub kind: ClaimKind,
    /// The owner after the call; for `NoCapacity`, the previous owner if there was one.
    pub owner: Option<Owner>,
    /// The owner's SIP URI (empty for `NoCapacity`).
    pub sip_uri: String,
    /// When the conference was first claimed (ms since the epoch, Redis time); 0 if never.
    pub created_ms: u64,
    /// Candidates passed over before the chosen one (all of them for `NoCapacity`).
    pub skipped: usize,
}

/// The claims a node's last agent life left, as [`Store::keep_claims`] found them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inherited {
    /// Claims that name the node.
    pub claims: u32,
    /// Participants their conference records last counted.
    pub participants: u32,
}

/// A conference's status as reported by its owner with each heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hosted {
    /// Conference name.
    pub name: ConferenceName,
    /// Epoch the node believes it owns.
    pub epoch: u64,
    /// Participants now in the conference.
    pub participants: u32,
    /// Version of this count (see [`Store::set_participants`]): the heartbeat writes it
    /// only over a count of the same or an older version.
    pub count_version: u64,
}

/// What a heartbeat learned about one hosted conference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostedStatus {
    /// Still owned at that epoch; lease renewed.
    Owned,
    /// Another node or a newer epoch owns it now: stop admitting (invariant 2).
    Lost,
    /// The claim had expired (Redis was away longer than the conference lease), or only a
    /// dead owner's record at a lower epoch was left (an older life Redis brought back); the
    /// heartbeat claimed it again for this node at the same epoch
    /// ([`Store::heartbeat_reclaiming`] only).
    Reclaimed,
    /// No claim exists any more (it expired or was released), or only a dead owner's record
    /// at a lower epoch, and it was not claimed again.
    Missing,
}

/// Whether a failed request may have reached Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    /// Certainly not carried out: the connection could not be had, or Redis answered with
    /// an error.
    No,
    /// Sent and not answered in time: it may have been carried out.
    Maybe,
    /// The connection failed under it (closed by the server, reset): it may have been
    /// written first, and a read may be made again on a new connection.
    Cut,
}

/// The reply to [`Store::heartbeat`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heartbeat {
    /// The node's record was renewed.
    Renewed {
        /// State stored in Redis (an admin may have changed it).
        state: NodeState,
        /// The number its write gave it (`set_state.lua`); `None` when it was written
        /// without one (by a controller from before numbering).
        state_seq: Option<u64>,
        /// One status per hosted conference, in the order given.
        hosted: Vec<HostedStatus>,
    },
    /// The node has no record (its lease expired): register again.
    Unregistered,
}

/// One page of conferences.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConferencePage {
    /// Conferences in name order.
    pub items: Vec<(ConferenceName, ConferenceRecord)>,
    /// Pass to the next call to continue; `None` on the last page.
    pub next: Option<String>,
}

/// A claim's script answer, and for a WAIT the replicas needed and those that acknowledged.
type ClaimRun = (Vec<Value>, Option<(u32, u32)>);

/// Connections open at most for claims that WAIT for replicas (`redis.wait_replicas`): as
/// many such claims run at once, each waiting up to half of `redis.timeout` on a lagging
/// replica.
const REPLICATED_CONNECTIONS: usize = 32;

/// How often, at most, a count of 0 makes the commands' Cluster client learn the slots anew.
const UNSURE_RESET_GAP: Duration = Duration::from_secs(5);

/// Handle to the Redis data model; cheap to clone and share.
#[derive(Clone)]
pub struct Store {
    conn: Connector,
    /// On a Cluster, the connection for call-control commands' PUBLISH (see
    /// [`conn::Retries::None`]); elsewhere `conn` serves, whose client never resends.
    unsure: Option<Connector>,
    /// When `unsure` was last made to learn the slots anew after a count of 0.
    unsure_reset: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
    /// Claims that WAIT for replicas run here, each on a connection of its own: Redis holds
    /// a client's later commands until its WAIT returns, so on a shared connection a lagging
    /// replica would stall every lookup, readiness probe and claim queued behind a claim.
    replicated: Option<std::sync::Arc<conn::ConnectorPool>>,
    prefix: String,
    confs_key: String,
    nodes_key: String,
    scripts: std::sync::Arc<Scripts>,
    timeout: Duration,
    /// What finding the server for a pub/sub connection may take (see
    /// [`conn::lookup_budget`]).
    lookup_budget: Duration,
    conference_lease: Duration,
    claim_lease: Duration,
    wait_replicas: u32,
    metrics: StoreMetrics,
}

impl Store {
    /// Prepares a store for `cfg`; connects lazily, so it succeeds while Redis is down.
    pub fn new(cfg: &RedisConfig, metrics: StoreMetrics) -> Result<Self, StoreError> {
        Ok(Store {
            conn: Connector::new(cfg, conn::Retries::Client)?,
            // A command published twice is carried out twice (two dial-outs): its PUBLISH
            // gets a Cluster client that never sends it again by itself.
            unsure: match cfg.target() {
                crate::config::RedisTarget::Cluster(_) => {
                    Some(Connector::new(cfg, conn::Retries::None)?)
                }
                _ => None,
            },
            unsure_reset: Default::default(),
            replicated: if cfg.wait_replicas > 0 {
                Some(std::sync::Arc::new(conn::ConnectorPool::new(
                    cfg,
                    REPLICATED_CONNECTIONS,
                )?))
            } else {
                None
            },
            prefix: cfg.prefix.clone(),
            confs_key: format!("{}confs", cfg.prefix),
            nodes_key: format!("{}nodes", cfg.prefix),
            scripts: std::sync::Arc::new(Scripts::new()),
            timeout: cfg.timeout,
            lookup_budget: conn::lookup_budget(cfg),
            conference_lease: cfg.conference_lease,
            claim_lease: cfg.claim_lease.min(cfg.conference_lease),
            wait_replicas: cfg.wait_replicas,
            metrics,
        })
    }

    /// The key prefix in use.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lease given to conference claims.
    pub fn conference_lease(&self) -> Duration {
        self.conference_lease
    }

    fn conf_key(&self, name: &str) -> String {
        format!("{}conf:{name}", self.prefix)
    }

    fn node_key(&self, id: &NodeId) -> String {
        format!("{}node:{id}", self.prefix)
    }

    /// Changes each time the shared connection to Redis is opened again: the server behind it
    /// may have restarted (and lost what it held) in between.
    pub fn connection_generation(&self) -> u64 {
        self.conn.generation()
    }

    /// Runs `f` on the shared connection with the operation deadline, timing it and
    /// dropping the connection if the failure means it is dead.
    async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, redis::RedisError>>,
    {
        self.run_on(&self.conn, op, f).await
    }

    /// [`Store::run`] on the connection `connector` manages.
    async fn run_on<T, F, Fut>(
        &self,
        connector: &Connector,
        op: &'static str,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, redis::RedisError>>,
    {
        self.exchange(connector, op, f).await.map_err(|(e, _)| e)
    }

    /// [`Store::run`] for a read, made once more on a new connection when its connection
    /// turned out closed under it (Sentinel kills a reconfigured primary's clients; Redis or
    /// a proxy closes idle ones): a read is safe to repeat, and the caller gets an answer
    /// rather than an outage. A timeout is not repeated: it already took the deadline.
    async fn read<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, redis::RedisError>>,
    {
        match self.exchange(&self.conn, op, &f).await {
            Err((_, Sent::Cut)) => self.run(op, f).await,
            other => other.map_err(|(e, _)| e),
        }
    }

    /// [`Store::run_on`], telling with a failure whether the request may have reached
    /// Redis (see [`Sent`]).
    async fn exchange<T, F, Fut>(
        &self,
        connector: &Connector,
        op: &'static str,
        f: F,
    ) -> Result<T, (StoreError, Sent)>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, redis::RedisError>>,
    {
        let started = Instant::now();
        let result = async {
            let (conn, generation) = connector.get().await.map_err(|e| (e, Sent::No))?;
            match tokio::time::timeout(self.timeout, f(conn)).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => {
                    if conn::is_fatal(&e) {
                        if conn::is_refusal(&e) {
                            connector.invalidate_refused(generation);
                        } else {
                            connector.invalidate(generation);
                        }
                        // The client's own response deadline (sent, not answered), or the
                        // connection failing under the request: it may have been written.
                        // A refusal Redis answered (READONLY, LOADING, ...) did nothing.
                        let sent = if e.is_timeout() {
                            Sent::Maybe
                        } else if e.is_io_error() || e.is_connection_dropped() {
                            Sent::Cut
                        } else {
                            Sent::No
                        };
                        Err((StoreError::Unavailable(format!("{op}: {e}")), sent))
                    } else {
                        Err((
                            StoreError::Redis {
                                op,
                                message: e.to_string(),
                            },
                            Sent::No,
                        ))
                    }
                }
                Err(_) => {
                    // A socket that swallows requests (a partition) looks exactly like this;
                    // start over with a fresh connection next time.
                    connector.invalidate(generation);
                    Err((
                        StoreError::Unavailable(format!(
                            "{op}: no answer within {:?}",
                            self.timeout
                        )),
                        Sent::Maybe,
                    ))
                }
            }
        }
        .await;
        self.metrics
            .observe(op, started.elapsed(), result.as_ref().err().map(|(e, _)| e));
        result
    }

    /// `INFO` of `sections` from the server holding this store's keys: on a Cluster, the
    /// primary of the prefix's slot (INFO without a route goes to every node and comes back
    /// as a map no string can be read from).
    async fn info(&self, op: &'static str, sections: &[&str]) -> Result<String, StoreError> {
        let slot = conn::hash_slot(self.prefix.as_bytes());
        self.run(op, |mut c| async move {
            let mut cmd = redis::cmd("INFO");
            for section in sections {
                cmd.arg(*section);
            }
            match &mut c {
                Conn::Cluster(cc) => {
                    use redis::cluster_routing::{
                        Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
                    };
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                        Route::new(slot, SlotAddr::Master),
                    ));
                    let v = cc.route_command(cmd, route).await?;
                    Ok(redis::from_redis_value(v)?)
                }
                Conn::Plain(_) => cmd.query_async(&mut c).await,
            }
        })
        .await
    }

    /// What in Redis's own settings breaks this store's guarantees, one sentence each (read
    /// with `INFO`, which managed Redis offerings allow where `CONFIG GET` is refused).
    pub async fn settings_warnings(&self) -> Result<Vec<String>, StoreError> {
        let info = self
            .info("settings_check", &["memory", "replication"])
            .await?;
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
                .map(str::trim)
        };
        let mut out = Vec::new();
        let limited = field("maxmemory").is_some_and(|m| m != "0");
        match field("maxmemory_policy") {
            Some(policy) if limited && policy != "noeviction" => out.push(format!(
                "Redis evicts keys when full (maxmemory-policy {policy}): conference claims \
                 and node leases all carry TTLs and may be evicted first, which moves live \
                 conferences to a second home; set maxmemory-policy noeviction"
            )),
            _ => {}
        }
        let replicas = field("connected_slaves")
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0);
        if self.wait_replicas == 0 && replicas > 0 {
            out.push(format!(
                "the Redis primary has {replicas} replica(s) but redis.wait_replicas is 0: a \
                 claim is answered before any replica has it, and a failover right after \
                 loses it, which gives the conference a second home; set redis.wait_replicas \
                 to 1"
            ));
        }
        if self.wait_replicas > 0 && field("min_slaves_good_slaves").is_none() {
            out.push(
                "redis.wait_replicas is set but the primary has no min-replicas-to-write: \
                 cut off from its replicas it keeps confirming claims that a failover loses; \
                 set min-replicas-to-write and min-replicas-max-lag"
                    .to_string(),
            );
        }
        Ok(out)
    }

    /// Logs [`Store::settings_warnings`] once Redis first answers them (it may be down at
    /// start-up), in the background.
    pub fn spawn_settings_check(&self) {
        let store = self.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(500);
            loop {
                match store.settings_warnings().await {
                    Ok(warnings) => {
                        for w in warnings {
                            tracing::warn!("{w}");
                        }
                        return;
                    }
                    Err(StoreError::Unavailable(_)) => {
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(30));
                    }
                    // A server that answers INFO in another form (a proxy): nothing to say.
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read Redis's settings");
                        return;
                    }
                }
            }
        });
    }

    /// Publishes `payload` on `channel` (under the key prefix); returns how many subscribers
    /// received it, which is 0 when nobody listens. The client may send it again after a
    /// broken connection (a reply or an event read twice is harmless; see
    /// [`Store::publish_unsure`] for what must not be).
    pub async fn publish(&self, channel: &str, payload: &[u8]) -> Result<u64, StoreError> {
        self.publish_on(&self.conn, channel, payload)
            .await
            .map_err(|(e, _)| e)
    }

    /// One PUBLISH through `connector`.
    async fn publish_on(
        &self,
        connector: &Connector,
        channel: &str,
        payload: &[u8],
    ) -> Result<u64, (StoreError, Sent)> {
        let channel = format!("{}{channel}", self.prefix);
        self.exchange(connector, "publish", |mut c| async move {
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(payload)
                .query_async::<u64>(&mut c)
                .await
        })
        .await
    }

    /// Publishes `messages` (channel under the key prefix, payload) in one round trip, in
    /// order: a pipeline on one connection. Resent like [`Store::publish`]; on a failure
    /// any of them may have gone out.
    pub async fn publish_all(&self, messages: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for (channel, payload) in messages {
            pipe.cmd("PUBLISH")
                .arg(format!("{}{channel}", self.prefix))
                .arg(payload.as_slice())
                .ignore();
        }
        let pipe = &pipe;
        self.exchange(&self.conn, "publish", |mut c| async move {
            pipe.query_async::<()>(&mut c).await
        })
        .await
        .map_err(|(e, _)| e)
    }

    /// On a Cluster, makes the next [`Store::publish_unsure`] learn where the slots are
    /// anew. Its client hears no `MOVED` (Redis answers PUBLISH on any node), so after a
    /// failover that left the old primary up it would go on publishing there, where the
    /// subscribers, moved to the new primary, are no longer counted.
    pub(crate) fn follow_slot_move(&self) {
        if let Some(unsure) = &self.unsure {
            unsure.reset();
        }
    }

    /// Publishes a message that must not be sent twice (a call-control command), telling with
    /// a failure whether it may have gone out all the same (sent, no answer within
    /// `redis.timeout`). On a Cluster its client never resends by itself, and its count is
    /// the subscribers of the node it reached only: a Cluster carries every message to
    /// every node, so 0 there does not say that nobody heard it.
    pub async fn publish_unsure(
        &self,
        channel: &str,
        payload: &[u8],
    ) -> Result<u64, (StoreError, bool)> {
        let connector = self.unsure.as_ref().unwrap_or(&self.conn);
        let sent = self
            .publish_on(connector, channel, payload)
            .await
            .map_err(|(e, sent)| (e, sent != Sent::No));
        // Nobody counted where it went: on a Cluster that may be an old primary, and the
        // next one asks where the slot is now. At most every few seconds: each time opens
        // connections to every server of the Cluster, and commands to a node that is simply
        // not listening would do it every time.
        if matches!(sent, Ok(0)) && self.unsure.is_some() {
            let mut last = self.unsure_reset.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_none_or(|at| at.elapsed() >= UNSURE_RESET_GAP) {
                *last = Some(Instant::now());
                self.follow_slot_move();
            }
        }
        sent
    }

    /// The store's instrumentation.
    pub(crate) fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }

    /// Redis's clock (`TIME`), in ms since the epoch: the clock every process shares. Read
    /// on the server holding the prefix's keys (on a Cluster `TIME` alone would go to any
    /// node, each with its own clock).
    pub async fn time_ms(&self) -> Result<u64, StoreError> {
        let key = format!("{}clock", self.prefix);
        let script = &self.scripts.time;
        let (secs, micros): (u64, u64) = self
            .run("time", |mut c| async move {
                script.key(&key).invoke_async(&mut c).await
            })
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// A client to open a pub/sub connection with (see [`crate::bus`]): on a Cluster, the
    /// primary serving `channel`'s slot.
    pub(crate) async fn pubsub_client(&self, channel: &str) -> Result<redis::Client, StoreError> {
        let slot = conn::hash_slot(channel.as_bytes());
        tokio::time::timeout(self.lookup_budget, self.conn.pubsub_client(slot))
            .await
            .map_err(|_| StoreError::Unavailable("pub/sub connect timed out".into()))?
            .map_err(|e| StoreError::Unavailable(format!("pub/sub connect: {e}")))
    }

    /// True on a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    /// On a Cluster, `host:port` of the primary serving `channel`'s slot now; `None` on a
    /// single server or Sentinel (nothing to follow).
    pub(crate) async fn pubsub_home(&self, channel: &str) -> Result<Option<String>, StoreError> {
        let slot = conn::hash_slot(channel.as_bytes());
        // A check of a live subscription, on its listener: a few operation timeouts, not
        // the whole lookup a new subscription may need, or commands wait unread meanwhile.
        tokio::time::timeout(self.timeout * 4, self.conn.slot_primary(slot))
            .await
            .map_err(|_| StoreError::Unavailable("cluster slots timed out".into()))?
            .map_err(|e| StoreError::Unavailable(format!("cluster slots: {e}")))
    }

    /// Checks that Redis answers (used by readiness probes). On a Cluster only the primary
    /// holding this store's slot is asked (a script on the prefix's key): a `PING` would go to
    /// every primary, and a shard this store never uses being down would fail it.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let key = format!("{}clock", self.prefix);
        let script = &self.scripts.time;
        self.run("ping", |mut c| async move {
            script.key(&key).invoke_async::<(u64, u64)>(&mut c).await?;
            Ok(())
        })
        .await
    }

    /// Reads a conference's record: one `HMGET`, no script, for the routing hot path.
    pub async fn lookup(
        &self,
        name: &ConferenceName,
    ) -> Result<Option<ConferenceRecord>, StoreError> {
        let key = self.conf_key(name.as_str());
        let key = &key;
        let values: Vec<Value> = self
            .read("lookup", |mut c| async move {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg(&[
                        "owner",
                        "epoch",
                        "participants",
                        "created_ms",
                        "unconfirmed",
                    ])
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let r = Reply::new("lookup", &values);
        if r.is_nil(0)? {
            return Ok(None);
        }
        // Fields read as claim.lua reads them, so a record written by something else means
        // the same here: an owner no node can be is no home (the next claim re-homes the
        // conference), a field that is not a number is 0.
        let node = match r.node_id(0) {
            Ok(node) => node,
            Err(e) => {
                tracing::warn!(conference = %name, error = %e, "conference record names no possible node; taken for no home");
                return Ok(None);
            }
        };
        Ok(Some(ConferenceRecord {
            owner: Owner {
                node,
                epoch: r.u64_lenient(1)?,
            },
            participants: u32::try_from(r.u64_lenient(2)?).unwrap_or(u32::MAX),
            created_ms: r.u64_lenient(3)?,
            unconfirmed: r.u64_lenient(4)? == 1,
            count_version: 0,
        }))
    }

    /// Finds or places the conference's home in one atomic step (invariants 1, 2, 4).
    ///
    /// `candidates` are tried in order; the first that is alive, serving and under capacity
    /// takes the conference if it has no live home. Every concurrent caller for the same
    /// name gets the same owner back.
    pub async fn claim(
        &self,
        name: &ConferenceName,
        candidates: &[NodeId],
    ) -> Result<Claim, StoreError> {
        self.claim_on(name, candidates, None).await
    }

    /// [`Store::claim`], placing or re-homing only on the Redis server whose `run_id` is
    /// `server` (the one the nodes were listed on, [`Store::list_nodes_on_server`]): on
    /// another, [`StoreError::ServerChanged`].
    pub async fn claim_on(
        &self,
        name: &ConferenceName,
        candidates: &[NodeId],
        server: Option<&str>,
    ) -> Result<Claim, StoreError> {
        let server = server.filter(|s| !s.is_empty()).unwrap_or("-");
        let conf_key = self.conf_key(name.as_str());
        let touch = if self.wait_replicas > 0 { "1" } else { "0" };
        let lease_ms = self.claim_lease.as_millis() as u64;
        let script = &self.scripts.claim;
        let wait = self.wait_replicas;
        // The server-side WAIT must end before the client's deadline for the command (the
        // same `redis.timeout`), or a lagging replica would look like a dead connection and
        // drop it for every claim sharing it; half the budget leaves the rest for the script
        // and the round trips.
        let wait_ms = (self.timeout.as_millis() as u64 / 2).max(1);
        let slot = conn::hash_slot(conf_key.as_bytes());
        let cluster = self.conn.is_cluster();
        let mut lent = match &self.replicated {
            Some(pool) => match pool.lend(self.timeout).await {
                Some(lent) => Some(lent),
                None => {
                    let e = StoreError::Unavailable(format!(
                        "claim: all {REPLICATED_CONNECTIONS} connections for replicated claims busy for {:?}",
                        self.timeout
                    ));
                    self.metrics.error("claim", &e);
                    return Err(e);
                }
            },
            None => None,
        };
        let connector = lent.as_ref().map_or(&self.conn, |l| l.connector());
        let ran: Result<ClaimRun, StoreError> = self
            .run_on(connector, "claim", |mut c| async move {
                let mut inv = script.key(&conf_key);
                inv.key(&self.confs_key)
                    .arg(&self.prefix)
                    .arg(name.as_str())
                    .arg(lease_ms)
                    .arg(touch)
                    .arg(server);
                for id in candidates {
                    inv.arg(id.as_str());
                }
                let values: Vec<Value> = inv.invoke_async(&mut c).await?;
                // Wait only for replicas online now: with none, no replica lacking this write
                // can be promoted with data newer than its last sync, and a WAIT would just
                // time out.
                let connected = Reply::new("claim", &values).u64_or_zero(6).unwrap_or(0) as u32;
                let need = wait.min(connected);
                let acked = if need > 0 {
                    let got = wait_for_replicas(&mut c, cluster, slot, need, wait_ms).await?;
                    Some((need, got))
                } else {
                    None
                };
                let reply = Reply::new("claim", &values);
                let placed = reply.string(0).ok();
                if wait > 0
                    && acked.is_none_or(|(need, got)| got >= need)
                    && !matches!(
                        placed.as_deref(),
                        Some("no_capacity" | "settling" | "server_changed")
                    )
                {
                    // Acknowledged (or no replica could be promoted without it): lookups may
                    // route to it from now on. Only this claim's mark: the WAIT says nothing
                    // of a re-home made meanwhile by another client.
                    let owner = reply.string(1).unwrap_or_default();
                    let epoch = reply.u64_or_zero(2).unwrap_or(0);
                    self.scripts
                        .confirm
                        .key(&conf_key)
                        .arg(owner)
                        .arg(epoch)
                        .invoke_async::<i64>(&mut c)
                        .await?;
                }
                Ok((values, acked))
            })
            .await;
        if let Some(l) = lent.as_mut() {
            l.finished();
        }
        let (values, acked) = ran?;
        if let Some((need, got)) = acked {
            if got < need {
                // Redis answered every command, so the run above counted no error.
                let e = StoreError::NotReplicated { wanted: need, got };
                self.metrics.error("claim", &e);
                return Err(e);
            }
        }
        let claim = parse_claim(&values);
        // Refusals the script answered (`settling`, `server_changed`): Redis answered, so
        // the run counted nothing.
        if let Err(e) = &claim {
            self.metrics.error("claim", e);
        }
        claim
    }

    /// Extends the lease of a claim this owner holds; false if it is no longer the owner.
    pub async fn renew(&self, name: &ConferenceName, owner: &Owner) -> Result<bool, StoreError> {
        let key = self.conf_key(name.as_str());
        let lease_ms = self.conference_lease.as_millis() as u64;
        let script = &self.scripts.renew;
        self.run("renew", |mut c| async move {
            script
                .key(&key)
                .arg(owner.node.as_str())
                .arg(owner.epoch)
                .arg(lease_ms)
                .invoke_async::<i64>(&mut c)
                .await
                .map(|n| n == 1)
        })
        .await
    }

    /// Ends a claim by compare-and-delete on owner and epoch; false if not the owner.
    pub async fn release(&self, name: &ConferenceName, owner: &Owner) -> Result<bool, StoreError> {
        self.release_with(name, owner, false, None).await
    }

    /// [`Store::release`], only while nobody is in the conference (its recorded count is 0):
    /// for a claim made for a command that was then refused, which a caller may have used.
    pub async fn release_if_empty(
        &self,
        name: &ConferenceName,
        owner: &Owner,
    ) -> Result<bool, StoreError> {
        self.release_with(name, owner, true, None).await
    }

    /// [`Store::release`], only while the participant count is the one of version `seen`
    /// or older: for a claim released on what a listing said, which a new actor of the same
    /// name may have counted its first caller into since.
    pub async fn release_unless_counted_since(
        &self,
        name: &ConferenceName,
        owner: &Owner,
        seen: u64,
    ) -> Result<bool, StoreError> {
        self.release_with(name, owner, false, Some(seen)).await
    }

    async fn release_with(
        &self,
        name: &ConferenceName,
        owner: &Owner,
        only_empty: bool,
        seen: Option<u64>,
    ) -> Result<bool, StoreError> {
        let key = self.conf_key(name.as_str());
        let script = &self.scripts.release;
        self.run("release", |mut c| async move {
            script
                .key(&key)
                .key(&self.confs_key)
                .arg(&self.prefix)
                .arg(name.as_str())
                .arg(owner.node.as_str())
                .arg(owner.epoch)
                .arg(if only_empty { "1" } else { "0" })
                .arg(self.conference_lease.as_millis() as u64)
                .arg(seen.map(|v| v.to_string()))
                .invoke_async::<i64>(&mut c)
                .await
                .map(|n| n == 1)
        })
        .await
    }

    /// Records the participant count of a conference this owner holds, and with `settings`
    /// the opaque settings its agent keeps across a restart; false if not owner. `version`
    /// orders it against the counts heartbeats carry: one rising counter per agent, so a
    /// heartbeat's older snapshot never undoes this write. The write gives the claim the
    /// whole conference lease: a new claim has only `redis.claim_lease` until then.
    pub async fn set_participants(
        &self,
        name: &ConferenceName,
        owner: &Owner,
        count: u32,
        version: u64,
        settings: Option<&str>,
    ) -> Result<bool, StoreError> {
        let key = self.conf_key(name.as_str());
        let script = &self.scripts.participants;
        self.run("set_participants", |mut c| async move {
            script
                .key(&key)
                .arg(owner.node.as_str())
                .arg(owner.epoch)
                .arg(count)
                .arg(version)
                .arg(self.conference_lease.as_millis() as u64)
                .arg(settings)
                .invoke_async::<i64>(&mut c)
                .await
                .map(|n| n == 1)
        })
        .await
    }

    /// The settings its owner recorded with [`Store::set_participants`] for the conference's
    /// current home, if any.
    pub async fn conference_settings(
        &self,
        name: &ConferenceName,
    ) -> Result<Option<String>, StoreError> {
        let key = self.conf_key(name.as_str());
        self.run("conference_settings", |mut c| async move {
            redis::cmd("HGET")
                .arg(&key)
                .arg("settings")
                .query_async::<Option<String>>(&mut c)
                .await
        })
        .await
    }

    /// Reserves the next `block` numbers of sequence `kind` of a conference `node` owns,
    /// above `used` (the highest it may have used already); returns the block's last
    /// number, or `None` when `node` is not the owner.
    pub async fn reserve_sequence(
        &self,
        kind: SequenceKind,
        name: &ConferenceName,
        node: &NodeId,
        block: u64,
        used: u64,
    ) -> Result<Option<u64>, StoreError> {
        let key = self.conf_key(name.as_str());
        let script = &self.scripts.callback_seq;
        self.run("reserve_sequence", |mut c| async move {
            script
                .key(&key)
                .arg(node.as_str())
                .arg(block)
                .arg(used)
                .arg(kind.field())
                .invoke_async::<i64>(&mut c)
                .await
                .map(|n| u64::try_from(n).ok())
        })
        .await
    }

    /// Announces a node with a lease; returns the state its previous record had, if any.
    /// The record says nothing of ARI until a heartbeat does, which counts as up.
    pub async fn register(
        &self,
        node: &NodeInfo,
        lease: Duration,
    ) -> Result<Option<NodeState>, StoreError> {
        self.register_with(node, lease, &Registration::default())
            .await
    }

    /// Announces a node agent with a lease and whether its ARI events WebSocket is up, so an
    /// agent that has not reached its Asterisk is not placed on before its first heartbeat.
    pub async fn register_agent(
        &self,
        node: &NodeInfo,
        lease: Duration,
        ari: bool,
    ) -> Result<Option<NodeState>, StoreError> {
        let how = Registration {
            ari: Some(ari),
            ..Registration::default()
        };
        self.register_with(node, lease, &how).await
    }

    /// [`Store::register_agent`] for an agent that resumes a drain its last life's record
    /// held: `drain_since_ms` is when that drain began (Redis time), kept unless the record is
    /// still alive with its own.
    pub async fn register_draining_agent(
        &self,
        node: &NodeInfo,
        lease: Duration,
        ari: bool,
        drain_since_ms: u64,
    ) -> Result<Option<NodeState>, StoreError> {
        let how = Registration {
            ari: Some(ari),
            drain_since_ms: Some(drain_since_ms),
            ..Registration::default()
        };
        self.register_with(node, lease, &how).await
    }

    /// Announces a node the way `how` says (`register.lua`): with `seen`, a state an admin
    /// set on the live record since the agent read it wins over `node.state`.
    pub async fn register_with(
        &self,
        node: &NodeInfo,
        lease: Duration,
        how: &Registration,
    ) -> Result<Option<NodeState>, StoreError> {
        let key = self.node_key(&node.id);
        let script = &self.scripts.register;
        let ari = match how.ari {
            Some(true) => "1",
            Some(false) => "0",
            None => "",
        };
        let since = how
            .drain_since_ms
            .map(|s| s.to_string())
            .unwrap_or_default();
        let seen = how.seen.map(NodeState::as_str).unwrap_or_default();
        let value: Value = self
            .run("register", |mut c| {
                let since = since.clone();
                async move {
                    script
                        .key(&key)
                        .key(&self.nodes_key)
                        .arg(&self.prefix)
                        .arg(node.id.as_str())
                        .arg(lease.as_millis() as u64)
                        .arg(&node.sip_uri)
                        .arg(&node.control)
                        .arg(&node.zone)
                        .arg(node.capacity)
                        .arg(node.participant_capacity)
                        .arg(node.state.as_str())
                        .arg(ari)
                        .arg(since)
                        .arg(seen)
                        .arg(if how.stopping { "1" } else { "" })
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await?;
        reply::optional_state("register", &value)
    }

    /// Conferences claimed for node `id` that nobody is in yet, each with how long ago (Redis
    /// time, ms) its claim was last written: a stopping agent waits for the first caller of
    /// one placed just now.
    pub async fn empty_claims(&self, id: &NodeId) -> Result<Vec<(String, u64)>, StoreError> {
        let set = format!("{}node:{id}:confs", self.prefix);
        let names: Vec<String> = self
            .run("empty_claims", |mut c| async move {
                redis::cmd("SMEMBERS").arg(&set).query_async(&mut c).await
            })
            .await?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.time_ms().await?;
        let mut out = Vec::new();
        for name in names {
            let key = self.conf_key(&name);
            let rec: Vec<Option<String>> = self
                .run("empty_claims", |mut c| async move {
                    redis::cmd("HMGET")
                        .arg(&key)
                        .arg(&["owner", "participants", "updated_ms"])
                        .query_async(&mut c)
                        .await
                })
                .await?;
            let field = |i: usize| rec.get(i).cloned().flatten();
            let empty = field(1).is_none_or(|p| p.parse::<u64>().is_ok_and(|n| n == 0));
            if field(0).as_deref() == Some(id.as_str()) && empty {
                let written = field(2).and_then(|w| w.parse::<u64>().ok()).unwrap_or(0);
                out.push((name, now.saturating_sub(written)));
            }
        }
        Ok(out)
    }

    /// For a running agent that must register again (its record is gone): when no node
    /// registered more than `since` ago is live, Redis lost them all, and claims wait `lease`
    /// for the nodes that were live to register again and claim back their conferences
    /// (`settle.lua`). `since` is the caller's own lease: its record was lost within it, so
    /// a node registered since then is a newcomer or one already back. True when it set that
    /// wait.
    pub async fn settle_after_loss(
        &self,
        lease: Duration,
        since: Duration,
    ) -> Result<bool, StoreError> {
        let mark = format!("{}settling", self.prefix);
        let script = &self.scripts.settle;
        let set: i64 = self
            .run("settle", |mut c| async move {
                script
                    .key(&self.nodes_key)
                    .key(&mark)
                    .arg(lease.as_millis() as u64)
                    .arg(since.as_millis() as u64)
                    .arg(&self.prefix)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(set == 1)
    }

    /// Keeps an existing node record (and its index entry and placement set) alive for at
    /// least `lease` without renewing it: for an agent starting again under a node id whose
    /// record is still live, while it checks that no other agent renews it. False when the
    /// record had expired (nothing is created).
    pub async fn hold_node(&self, id: &NodeId, lease: Duration) -> Result<bool, StoreError> {
        let key = self.node_key(id);
        let script = &self.scripts.hold;
        let conf_lease = self.conference_lease.as_millis() as u64;
        let held: i64 = self
            .run("hold", |mut c| async move {
                script
                    .key(&key)
                    .key(&self.nodes_key)
                    .arg(&self.prefix)
                    .arg(id.as_str())
                    .arg(lease.as_millis() as u64)
                    .arg(conf_lease)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(held == 1)
    }

    /// Extends the claims node `id` holds (its placement set's, naming it) to the conference
    /// lease, creating none: the claims an agent's last life left, kept until the agent
    /// started again has looked at what its Asterisk still holds. Returns how many, and the
    /// participants their records last counted.
    pub async fn keep_claims(&self, id: &NodeId) -> Result<Inherited, StoreError> {
        let set = format!("{}node:{}:confs", self.prefix, id.as_str());
        let record = self.node_key(id);
        let script = &self.scripts.keep;
        let conf_lease = self.conference_lease.as_millis() as u64;
        let (kept, participants): (i64, i64) = self
            .run("keep", |mut c| async move {
                script
                    .key(&set)
                    .key(&record)
                    .arg(&self.prefix)
                    .arg(id.as_str())
                    .arg(conf_lease)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(Inherited {
            claims: u32::try_from(kept.max(0)).unwrap_or(u32::MAX),
            participants: u32::try_from(participants.max(0)).unwrap_or(u32::MAX),
        })
    }

    /// Renews a node's lease, records its load and renews the claims it hosts.
    pub async fn heartbeat(
        &self,
        id: &NodeId,
        load: &NodeLoad,
        lease: Duration,
        hosted: &[Hosted],
    ) -> Result<Heartbeat, StoreError> {
        self.heartbeat_with(id, load, lease, hosted, false).await
    }

    /// [`Store::heartbeat`] that also claims again, for this node at its epoch, each hosted
    /// conference whose claim is gone: for the first heartbeat after Redis trouble or a new
    /// registration, when claims may have expired under live conferences. (At other times a
    /// missing claim means the conference just ended and released it.)
    pub async fn heartbeat_reclaiming(
        &self,
        id: &NodeId,
        load: &NodeLoad,
        lease: Duration,
        hosted: &[Hosted],
    ) -> Result<Heartbeat, StoreError> {
        self.heartbeat_with(id, load, lease, hosted, true).await
    }

    async fn heartbeat_with(
        &self,
        id: &NodeId,
        load: &NodeLoad,
        lease: Duration,
        hosted: &[Hosted],
        reclaim: bool,
    ) -> Result<Heartbeat, StoreError> {
        let key = self.node_key(id);
        let script = &self.scripts.heartbeat;
        let conf_lease = self.conference_lease.as_millis() as u64;
        let values: Vec<Value> = self
            .run("heartbeat", |mut c| async move {
                let mut inv = script.key(&key);
                inv.key(&self.nodes_key)
                    .arg(&self.prefix)
                    .arg(id.as_str())
                    .arg(lease.as_millis() as u64)
                    .arg(conf_lease)
                    .arg(load.conferences)
                    .arg(load.participants)
                    .arg(format!("{:.1}", load.cpu))
                    .arg(if reclaim { "1" } else { "0" })
                    .arg(if load.ari { "1" } else { "0" });
                for h in hosted {
                    inv.arg(h.name.as_str())
                        .arg(h.epoch)
                        .arg(h.participants)
                        .arg(h.count_version);
                }
                inv.invoke_async(&mut c).await
            })
            .await?;
        reply::heartbeat(&values, hosted.len())
    }

    /// An admin's change of a live node's state; refused for a node stopping for good.
    pub async fn set_state(
        &self,
        id: &NodeId,
        state: NodeState,
    ) -> Result<StateChange, StoreError> {
        self.write_state(id, state, "admin", None).await
    }

    /// A node's own write of its state; `stopping` marks it as shutting down for good, so
    /// admins can no longer change it.
    pub async fn set_own_state(
        &self,
        id: &NodeId,
        state: NodeState,
        stopping: bool,
    ) -> Result<StateChange, StoreError> {
        let who = if stopping { "node-stopping" } else { "node" };
        self.write_state(id, state, who, None).await
    }

    /// [`Store::set_own_state`] only while the record's state still has number `seq` (as a
    /// heartbeat read it): a node writing back the state a failover took away leaves an
    /// admin's change made since alone ([`StateChange::Superseded`]).
    pub async fn restore_own_state(
        &self,
        id: &NodeId,
        state: NodeState,
        stopping: bool,
        seq: u64,
    ) -> Result<StateChange, StoreError> {
        let who = if stopping { "node-stopping" } else { "node" };
        self.write_state(id, state, who, Some(seq)).await
    }

    async fn write_state(
        &self,
        id: &NodeId,
        state: NodeState,
        who: &'static str,
        expected: Option<u64>,
    ) -> Result<StateChange, StoreError> {
        let key = self.node_key(id);
        let script = &self.scripts.set_state;
        let expected = expected.map(|s| s.to_string()).unwrap_or_default();
        let value: Value = self
            .run("set_state", |mut c| {
                let expected = expected.clone();
                async move {
                    script
                        .key(&key)
                        .arg(state.as_str())
                        .arg(who)
                        .arg(expected)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await?;
        reply::state_change(&value)
    }

    /// Removes a node's record at a clean shutdown; true if there was one.
    pub async fn deregister(&self, id: &NodeId) -> Result<bool, StoreError> {
        let key = self.node_key(id);
        let script = &self.scripts.deregister;
        self.run("deregister", |mut c| async move {
            script
                .key(&key)
                .key(&self.nodes_key)
                .arg(&self.prefix)
                .arg(id.as_str())
                .invoke_async::<i64>(&mut c)
                .await
                .map(|n| n == 1)
        })
        .await
    }

    /// Every node with a live lease.
    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        Ok(self.list_nodes_on_server().await?.0)
    }

    /// [`Store::list_nodes`], with the `run_id` of the Redis server the listing came from,
    /// read in the same step (`None` where Redis refuses `INFO`).
    pub async fn list_nodes_on_server(
        &self,
    ) -> Result<(Vec<NodeRecord>, Option<String>), StoreError> {
        let script = &self.scripts.list_nodes;
        let (server, values): (String, Vec<Vec<Value>>) = self
            .run("list_nodes", |mut c| async move {
                script
                    .key(&self.nodes_key)
                    .arg(&self.prefix)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let server = (!server.is_empty()).then_some(server);
        // One unreadable record (written by hand, or by something else) must not hide every
        // node from placement: it is skipped, said in the log and counted.
        let nodes = values
            .iter()
            .filter_map(|v| match reply::node_record(v) {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping an unreadable node record");
                    self.metrics.error("list_nodes", &e);
                    None
                }
            })
            .collect();
        Ok((nodes, server))
    }

    /// One node with a live lease, if registered.
    pub async fn get_node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StoreError> {
        Ok(self
            .list_nodes()
            .await?
            .into_iter()
            .find(|n| &n.info.id == id))
    }

    /// A page of live conferences in name order, starting after `after`.
    pub async fn list_conferences(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ConferencePage, StoreError> {
        let script = &self.scripts.list_conferences;
        let limit = limit.clamp(1, 1000);
        let values: Vec<Value> = self
            .run("list_conferences", |mut c| async move {
                script
                    .key(&self.confs_key)
                    .arg(&self.prefix)
                    .arg(after.unwrap_or(""))
                    .arg(limit)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        reply::conference_page(&values)
    }
}

/// Blocks until `wanted` replicas acknowledged this connection's writes, or the deadline.
async fn wait_for_replicas(
    c: &mut Conn,
    cluster: bool,
    slot: u16,
    wanted: u32,
    timeout_ms: u64,
) -> Result<u32, redis::RedisError> {
    let mut cmd = redis::cmd("WAIT");
    cmd.arg(wanted).arg(timeout_ms);
    let got: i64 = match c {
        // WAIT must run on the primary that took the write, over the same connection.
        Conn::Cluster(cc) => {
            use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                slot,
                SlotAddr::Master,
            )));
            let v = cc.route_command(cmd, route).await?;
            redis::from_redis_value(v)?
        }
        Conn::Plain(_) => {
            debug_assert!(!cluster);
            cmd.query_async(c).await?
        }
    };
    Ok(u32::try_from(got.max(0)).unwrap_or(u32::MAX))
}

fn parse_claim(values: &[Value]) -> Result<Claim, StoreError> {
    let r = Reply::new("claim", values);
    let kind = match r.string(0)?.as_str() {
        "existing" => ClaimKind::Existing,
        "claimed" => ClaimKind::Claimed,
        "rehomed" => ClaimKind::Rehomed,
        "no_capacity" => ClaimKind::NoCapacity,
        "settling" => return Err(StoreError::Settling),
        "server_changed" => return Err(StoreError::ServerChanged),
        other => {
            return Err(StoreError::Protocol {
                op: "claim",
                message: format!("unknown outcome `{other}`"),
            })
        }
    };
    let owner_id = r.string(1)?;
    let owner = if owner_id.is_empty() {
        None
    } else {
        Some(Owner {
            node: r.node_id(1)?,
            epoch: r.u64(2)?,
        })
    };
    Ok(Claim {
        kind,
        owner,
        sip_uri: r.string_or_empty(3)?,
        created_ms: r.u64_or_zero(4)?,
        skipped: r.u64_or_zero(5)? as usize,
    })
}
