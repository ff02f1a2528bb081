//! The running agent's shared state, and the event dispatcher: each ARI event is routed to
//! the actor of the conference it concerns (one actor per conference serialises that
//! conference's operations; there is no lock around conference work).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use confroute_shared::name::ConferenceName;
use confroute_shared::store::{Hosted, Inherited, StateChange, Store};
use confroute_shared::types::{NodeId, NodeInfo, NodeState};

use crate::ari::ws::EventSink;
use crate::ari::{AriClient, AriError, Event};
use crate::conference::{self, Msg};
use crate::config::NodeConfig;
use crate::dialout::Dialouts;
use crate::metrics::Metrics;
use crate::outbox::Outbox;

/// Asterisk's bridges and channels, listed one after the other.
pub struct Listing {
    /// When the listing began: it says nothing of what came after.
    pub taken: Instant,
    /// Every bridge.
    pub bridges: Vec<crate::ari::Bridge>,
    /// Every channel, listed after the bridges.
    pub channels: Vec<crate::ari::Channel>,
}

/// How long before a reconciliation's listing a hangup must have been asked for to count as
/// overdue there: Asterisk acts in milliseconds, but its StasisEnd may still be on its way.
const HANGUP_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether `route` sends a channel's events somewhere other than conference `name`.
fn elsewhere(route: Option<&Route>, name: &ConferenceName) -> bool {
    match route {
        None | Some(Route::Pending) => false,
        Some(Route::Conference(n) | Route::Dialout(n)) => n != name,
        Some(Route::Moving(_) | Route::Refused | Route::Gone) => true,
    }
}

/// How long a hangup Asterisk acknowledged counts as under way, at least: Asterisk carries one
/// out in milliseconds, and a channel still there after this is taken for what it is (one
/// never acknowledged counts until a listing shows its channel gone). Never
/// less than three reconciliation periods ([`Node::hangup_window`]), so each pass still
/// finds the request it repeated at the last one and repeats it again.
const HANGUP_UNDER_WAY: std::time::Duration = std::time::Duration::from_secs(60);

/// A hangup the agent asked Asterisk for.
#[derive(Clone, Copy)]
struct Hangup {
    /// When it was last asked for.
    asked: Instant,
    /// Its Q.850 cause.
    cause: u16,
    /// Whether Asterisk said yes (or that the channel was gone already) to the last ask: one
    /// never acknowledged (the request failed or is in flight) is kept until a listing
    /// shows the channel gone, however long Asterisk is unreachable.
    acknowledged: bool,
}

impl Hangup {
    /// Whether it still counts as asked for: see [`HANGUP_UNDER_WAY`].
    fn current(&self, window: std::time::Duration) -> bool {
        !self.acknowledged || self.asked.elapsed() < window
    }
}

/// Locks a mutex, taking over a poisoned one (a panicked actor must not stop the node).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How often Redis's clock is measured again.
const REDIS_CLOCK_REMEASURE: std::time::Duration = std::time::Duration::from_secs(300);

/// This host's clock (ms since the epoch).
fn local_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Count versions stay below this, far under 2^53 (the last integer Lua's doubles hold
/// exactly), with room for a life's worth of counts above it.
const MAX_COUNT_VERSION: u64 = (1 << 53) - (1 << 40);

/// A route that only the channel's StasisEnd ends: a participant's, a move's, a refusal's.
/// (A join still working one out, and a dial-out, end otherwise.)
fn settled(r: &Route) -> bool {
    matches!(r, Route::Conference(_) | Route::Moving(_) | Route::Refused)
}

/// Where a channel's events go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// StasisStart seen; its conference is being worked out.
    Pending,
    /// The channel left Stasis before its conference was known.
    Gone,
    /// The channel belongs to this conference's actor.
    Conference(ConferenceName),
    /// The channel was refused and is being hung up.
    Refused,
    /// A dial-out ringing for this conference; it joins when answered.
    Dialout(ConferenceName),
    /// Being moved out of this conference to another of this node: its events still go
    /// here, and should it leave Stasis meanwhile the mark turns to [`Route::Gone`], so the
    /// target does not take in a channel that is no more.
    Moving(ConferenceName),
}

/// One participant as `GET /v1/conferences` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ParticipantView {
    /// Channel id.
    pub channel: String,
    /// Profile its options came from.
    pub profile: String,
    /// In the holding bridge, waiting for the conference to start.
    pub waiting: bool,
    /// Muted: not heard by the others.
    pub muted: bool,
    /// On hold (put on hold through call control, or by the caller's phone).
    pub hold: bool,
    /// Caller id number.
    pub caller: String,
    /// When it joined (ms since the epoch).
    pub joined_ms: u64,
    /// Talk detection says it is talking.
    pub talking: bool,
}

/// One conference as this node sees it.
#[derive(Clone, Debug, Serialize)]
pub struct ConferenceView {
    /// Conference name.
    pub conference: ConferenceName,
    /// Epoch of the claim this node holds.
    pub epoch: u64,
    /// `active`, or `lost` when the claim moved elsewhere.
    pub phase: &'static str,
    /// Mixing bridge id.
    pub bridge: String,
    /// A starter has joined.
    pub started: bool,
    /// Recording name, while recording.
    pub recording: Option<String>,
    /// Participants.
    pub participants: Vec<ParticipantView>,
    /// Dial-outs ringing into it, and a caller being brought in: they count as people in it
    /// for Redis, so the conference keeps its home (a drain may not move it) meanwhile.
    pub ringing: u32,
    /// Version of the count this view makes (set by [`Node::publish`]).
    #[serde(skip)]
    pub count_version: u64,
}

/// The agent: configuration, clients, and what it hosts.
pub struct Node {
    /// Configuration.
    pub cfg: NodeConfig,
    /// This node's id.
    pub id: NodeId,
    /// What the node registers in Redis (state is filled in at each registration).
    pub info: NodeInfo,
    /// The Redis data model.
    pub store: Store,
    /// ARI REST.
    pub ari: AriClient,
    /// Metrics.
    pub metrics: Metrics,
    /// Status callback delivery: the HTTP client and what is still to go out.
    pub webhooks: crate::webhook::Delivery,
    /// Whether the last Redis operation of the heartbeat succeeded.
    pub redis_ok: AtomicBool,
    /// Whether this life has registered the node yet: until it has, a heartbeat would renew
    /// an earlier life's record (its state, drain and capacity) instead of writing this one's.
    pub registered: AtomicBool,
    /// Set when the start-up check that no other agent uses this node id could not read
    /// Redis: the first registration makes it first.
    pub id_unchecked: AtomicBool,
    /// The state this life read in the node's live record before its first registration:
    /// the registration keeps a different one an admin set there meanwhile.
    pub seen_state: Mutex<Option<NodeState>>,
    /// Whether the events WebSocket is connected.
    pub ari_connected: AtomicBool,
    /// When the current drain began (ms since the epoch; 0 while serving), handed to a
    /// registration of a draining node so its record keeps the drain's deadline.
    pub drain_since_ms: AtomicU64,
    /// Redis's clock less this host's (ms), as last measured: drain starts and deadlines are
    /// counted on Redis's clock, which `drain_since_ms` in the node record is written in.
    redis_clock_offset_ms: std::sync::atomic::AtomicI64,
    /// When the offset was last measured; `None` until it is.
    redis_clock_measured: Mutex<Option<std::time::Instant>>,
    /// Wakes the heartbeat when the events WebSocket connects or drops, so the node record's
    /// `ari` changes at once rather than a heartbeat later: callers arriving right after a
    /// reconnection find the node placeable again.
    pub ari_changed: Notify,
    /// Since when the events WebSocket is down (from the start until its first connection).
    ari_down_since: Mutex<Option<Instant>>,
    /// The claims were given back for Asterisk being out of reach (see [`Node::ari_given_up`]).
    pub claims_given_back: AtomicBool,
    /// This outage of the events WebSocket was logged as one Asterisk's REST still answers.
    pub rest_answers_logged: AtomicBool,
    /// Since when Asterisk's REST interface has not answered a ping, while the events
    /// WebSocket has been down past `ari.release_after` (`None` while it answers).
    pub rest_silent_since: Mutex<Option<Instant>>,
    /// A ping of Asterisk's REST interface is in flight (see `heartbeat::asterisk_gone`).
    pub rest_ping_running: AtomicBool,
    /// The events connection (see [`Node::connection`]) for which Asterisk was last seen to
    /// let the agent write; 0 before any.
    pub writes_checked: AtomicU64,
    /// Held by the write check in progress (see [`Node::check_writes`]).
    write_check: tokio::sync::Mutex<()>,
    /// Heartbeats started so far, so the events WebSocket can wait for one that saw it
    /// connected (see [`Sink`]).
    pub beats_started: AtomicU64,
    /// The number of the last heartbeat finished.
    pub beats_done: watch::Sender<u64>,
    /// Held through each heartbeat and the deregistration; true once deregistered, after
    /// which no heartbeat runs (one finding the record gone would register it again).
    pub beat_gate: tokio::sync::Mutex<bool>,
    /// Events WebSocket connections made so far.
    connections: AtomicU64,
    /// The connection under which the last complete reconciliation ran.
    reconciled_under: AtomicU64,
    /// The load the last life's claims carry, reported until the first reconciliation has
    /// adopted what is left of it (the agent's own count is nothing before that).
    pub inherited: Mutex<Option<Inherited>>,
    /// When this agent life started.
    pub born: Instant,
    /// Asterisk's bridges and channels as listed under an events connection, for the
    /// newcomers compared with them before the reconciliation reaches their conferences
    /// ([`Node::listing_since_connect`]); one listing serves them all.
    listing: tokio::sync::Mutex<Option<(u64, Arc<Listing>)>>,
    /// The ordered publisher of command replies, dial-out notifications and events.
    pub outbox: Outbox,
    /// Dial-outs in progress, turning their calls' events into status notifications.
    pub dialouts: Dialouts,
    state: watch::Sender<NodeState>,
    state_version: AtomicU64,
    state_dirty: AtomicBool,
    /// The newest state version known written to Redis.
    state_in_redis: AtomicU64,
    /// The number (`set_state.lua`) of the last state Redis was seen to hold in agreement
    /// with this node's, 0 before any: a different state under a number no higher is one a
    /// failover took back (the write of this state was lost), not an admin's change.
    state_seq_seen: AtomicU64,
    /// When the last heartbeat or registration that renewed this node's record was sent.
    renewed_at: Mutex<Option<std::time::Instant>>,
    registry: Mutex<HashMap<ConferenceName, mpsc::UnboundedSender<Msg>>>,
    routes: Mutex<HashMap<String, Route>>,
    /// Routed channels whose caller's phone has them on hold (ChannelHold), whatever
    /// conference they are in, joining or moving to: a conference taking one in reads it
    /// here, since a hold that came meanwhile went to no conference.
    caller_holds: Mutex<std::collections::HashSet<String>>,
    /// Routed channels the last reconciliation found missing from Asterisk.
    vanished: Mutex<std::collections::HashSet<String>>,
    joining: Mutex<HashMap<String, Instant>>,
    ended: Mutex<std::collections::HashSet<String>>,
    /// Channels the agent asked Asterisk to hang up, until their `StasisEnd` or a listing
    /// without them.
    hanging_up: Mutex<HashMap<String, Hangup>>,
    /// Set while a reconciliation is due to ask again for hangups that failed.
    hangup_retry_due: Arc<AtomicBool>,
    stale_claims: Mutex<HashMap<(ConferenceName, u64), Instant>>,
    views: Mutex<BTreeMap<ConferenceName, ConferenceView>>,
    /// Versions of participant counts, rising across views and direct writes (and across
    /// restarts: it starts at the wall clock's microseconds), so Redis keeps the newest.
    count_versions: AtomicU64,
    playbacks: Mutex<HashMap<String, oneshot::Sender<()>>>,
    /// Playbacks started on participants' channels (id → channel), until their
    /// `PlaybackFinished`.
    channel_playbacks: Mutex<HashMap<String, String>>,
    /// Wakes whoever waits for the hosted set to change (drain).
    pub changed: Notify,
    reconcile: mpsc::UnboundedSender<()>,
    /// The running drain, and whether it ends in an exit.
    pub drain: Mutex<Option<(tokio::task::JoinHandle<()>, bool)>>,
    /// Turns true when a shutdown drain finished and the process may exit.
    pub exit: watch::Sender<bool>,
}

impl Node {
    /// Builds the node; `reconcile` receives a unit each time reconciliation is wanted.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: NodeConfig,
        info: NodeInfo,
        store: Store,
        ari: AriClient,
        metrics: Metrics,
        webhook_http: reqwest::Client,
        initial: NodeState,
        reconcile: mpsc::UnboundedSender<()>,
        outbox: Outbox,
    ) -> Node {
        let (state, _) = watch::channel(initial);
        metrics.set_state(initial.as_str());
        Node {
            id: info.id.clone(),
            cfg,
            info,
            store,
            ari,
            metrics,
            webhooks: crate::webhook::Delivery {
                http: webhook_http,
                in_flight: crate::webhook::InFlight::default(),
                stop_by: crate::webhook::StopBy::default(),
            },
            redis_ok: AtomicBool::new(false),
            registered: AtomicBool::new(false),
            id_unchecked: AtomicBool::new(false),
            seen_state: Mutex::new(None),
            ari_connected: AtomicBool::new(false),
            drain_since_ms: AtomicU64::new(0),
            redis_clock_offset_ms: std::sync::atomic::AtomicI64::new(0),
            redis_clock_measured: Mutex::new(None),
            ari_changed: Notify::new(),
            ari_down_since: Mutex::new(Some(Instant::now())),
            claims_given_back: AtomicBool::new(false),
            rest_answers_logged: AtomicBool::new(false),
            rest_silent_since: Mutex::new(None),
            rest_ping_running: AtomicBool::new(false),
            writes_checked: AtomicU64::new(0),
            write_check: tokio::sync::Mutex::new(()),
            beats_started: AtomicU64::new(0),
            beats_done: watch::channel(0).0,
            beat_gate: tokio::sync::Mutex::new(false),
            connections: AtomicU64::new(0),
            reconciled_under: AtomicU64::new(0),
            inherited: Mutex::new(None),
            born: Instant::now(),
            listing: tokio::sync::Mutex::new(None),
            outbox,
            dialouts: Dialouts::default(),
            state,
            state_version: AtomicU64::new(0),
            state_dirty: AtomicBool::new(false),
            state_in_redis: AtomicU64::new(0),
            state_seq_seen: AtomicU64::new(0),
            renewed_at: Mutex::new(None),
            registry: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            caller_holds: Mutex::new(std::collections::HashSet::new()),
            vanished: Mutex::new(std::collections::HashSet::new()),
            joining: Mutex::new(HashMap::new()),
            ended: Mutex::new(std::collections::HashSet::new()),
            hanging_up: Mutex::new(HashMap::new()),
            hangup_retry_due: Arc::new(AtomicBool::new(false)),
            stale_claims: Mutex::new(HashMap::new()),
            views: Mutex::new(BTreeMap::new()),
            count_versions: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64),
            ),
            playbacks: Mutex::new(HashMap::new()),
            channel_playbacks: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            reconcile,
            drain: Mutex::new(None),
            exit: watch::channel(false).0,
        }
    }

    // ----- node state -----

    /// The node's state now.
    pub fn state(&self) -> NodeState {
        *self.state.borrow()
    }

    /// Whether the node is drained past its drain's deadline: a conference that has not
    /// begun here by then does not begin (it would be ended at once).
    pub fn drain_overdue(&self) -> bool {
        let since = self.drain_since_ms.load(Ordering::SeqCst);
        let deadline = u64::try_from(self.cfg.node.drain_deadline.as_millis()).unwrap_or(u64::MAX);
        self.state() == NodeState::Draining
            && since > 0
            && self.redis_now_ms() >= since.saturating_add(deadline)
    }

    /// A receiver that sees every state change.
    pub fn watch_state(&self) -> watch::Receiver<NodeState> {
        self.state.subscribe()
    }

    /// `(state, version)`; the version changes with every local state change.
    pub fn state_versioned(&self) -> (NodeState, u64) {
        (self.state(), self.state_version.load(Ordering::SeqCst))
    }

    /// Changes the state locally and marks it for writing to Redis.
    pub fn set_state_local(&self, to: NodeState) -> NodeState {
        let previous = self.state.send_replace(to);
        self.state_version.fetch_add(1, Ordering::SeqCst);
        self.state_dirty.store(true, Ordering::SeqCst);
        self.metrics.set_state(to.as_str());
        if previous != to {
            tracing::info!(%previous, state = %to, "node state changed");
        }
        previous
    }

    /// Adopts a state set elsewhere (an admin through the controller), unless a local change
    /// happened since `version` was read or is not yet written.
    pub fn adopt_state(&self, to: NodeState, version: u64) -> bool {
        if self.state_dirty.load(Ordering::SeqCst)
            || self.state_version.load(Ordering::SeqCst) != version
            || self.state() == to
        {
            return false;
        }
        self.state.send_replace(to);
        self.metrics.set_state(to.as_str());
        tracing::info!(state = %to, "adopting node state set through the controller");
        true
    }

    /// True while a local state change still has to be written to Redis.
    pub fn state_dirty(&self) -> bool {
        self.state_dirty.load(Ordering::SeqCst)
    }

    /// Notes that Redis held this node's state under number `seq` at a heartbeat read while
    /// the local state was at `version`, unless it changed since. A state written without a
    /// number (a controller from before numbering) leaves nothing to compare the next with:
    /// the next numbered one is taken as newer.
    pub fn state_agreed(&self, version: u64, seq: Option<u64>) {
        if !self.state_dirty() && self.state_version.load(Ordering::SeqCst) == version {
            self.state_seq_seen
                .store(seq.unwrap_or(0), Ordering::SeqCst);
        }
    }

    /// Whether a state Redis holds under number `seq` that differs from this node's is older
    /// than the one last seen agreeing: a failover lost the write that agreed.
    pub fn state_went_back(&self, seq: Option<u64>) -> bool {
        seq.is_some_and(|s| s <= self.state_seq_seen.load(Ordering::SeqCst))
    }

    /// Forgets the number last seen: a registration may have made the record anew, whose
    /// numbers owe nothing to the lost one's.
    pub fn state_numbering_restarted(&self) {
        self.state_seq_seen.store(0, Ordering::SeqCst);
    }

    /// Writes the local state back over the older one a failover left under number `seq`,
    /// unless the record was written since (an admin's change, which the next heartbeat
    /// reads). A failure is left to the next heartbeat, which finds the same again.
    pub async fn restore_state(&self, seq: u64) {
        let (state, version) = self.state_versioned();
        let stopping = self.stopping();
        match self
            .store
            .restore_own_state(&self.id, state, stopping, seq)
            .await
        {
            Ok(StateChange::Superseded(now)) => {
                tracing::info!(redis = %now, "the node's state was changed in Redis meanwhile; not writing it back")
            }
            Ok(_) => self.state_written(version),
            Err(e) => {
                tracing::warn!(error = %e, %state, "cannot write the node state back yet; the next heartbeat tries again")
            }
        }
    }

    /// Records that the local state reached Redis.
    pub fn state_written(&self, version: u64) {
        self.state_in_redis.fetch_max(version, Ordering::SeqCst);
        if self.state_version.load(Ordering::SeqCst) == version {
            self.state_dirty.store(false, Ordering::SeqCst);
        }
    }

    /// Notes a renewal of this node's record by a heartbeat or registration sent at `sent`.
    pub fn renewed(&self, sent: std::time::Instant) {
        let mut at = lock(&self.renewed_at);
        if at.is_none_or(|t| t < sent) {
            *at = Some(sent);
        }
    }

    /// Whether this node's record is surely alive in Redis: renewed within its lease (three
    /// heartbeat intervals) counted from when the renewal was sent. Past it, controllers
    /// may find no record and take the node for dead, re-homing its conferences at their
    /// next call: a caller admitted here then would be split from the rest.
    pub fn record_current(&self) -> bool {
        let lease = crate::heartbeat::lease(self);
        lock(&self.renewed_at).is_some_and(|t| t.elapsed() < lease)
    }

    /// The state version now, and whether Redis was known to hold it then: a heartbeat
    /// sent while a local change was still on its way may be answered with the state from
    /// before it, which is no admin's change to adopt.
    pub fn state_snapshot(&self) -> (u64, bool) {
        // Read first: it never passes the version, so equal means the version did not move
        // in between.
        let written = self.state_in_redis.load(Ordering::SeqCst);
        let version = self.state_version.load(Ordering::SeqCst);
        (version, written >= version)
    }

    /// When the running drain's deadline comes, in Unix seconds (its start, as the record
    /// keeps it across restarts, plus `node.drain_deadline`); `None` when not draining.
    pub fn drain_deadline_unix(&self) -> Option<u64> {
        let since = self.drain_since_ms.load(Ordering::SeqCst);
        let draining = matches!(self.state(), NodeState::Draining | NodeState::ShuttingDown);
        (draining && since > 0)
            .then(|| (since / 1000).saturating_add(self.cfg.node.drain_deadline.as_secs()))
    }

    /// True from the start of the node's own shutdown drain: its record must say so.
    pub fn stopping(&self) -> bool {
        self.state() == NodeState::ShuttingDown
            || matches!(lock(&self.drain).as_ref(), Some((_, true)))
    }

    /// Writes the local state to Redis now (best effort; the heartbeat retries). During a
    /// shutdown the record is marked stopping, so no admin can make the node serving again.
    pub async fn write_state(&self) {
        // Before this life registers, the record is an earlier life's or another agent's;
        // the registration writes the state.
        if !self.registered.load(Ordering::SeqCst) {
            return;
        }
        let (state, version) = self.state_versioned();
        let stopping = self.stopping();
        match self.store.set_own_state(&self.id, state, stopping).await {
            Ok(_) => self.state_written(version),
            Err(e) => {
                tracing::warn!(error = %e, %state, "cannot write node state yet; the heartbeat retries")
            }
        }
    }

    // ----- conference actors -----

    /// Sends `msg` to the conference's actor, starting one when `spawn` and there is none.
    pub fn send(self: &Arc<Self>, name: &ConferenceName, msg: Msg, spawn: bool) -> bool {
        self.deliver(name, msg, spawn).is_ok()
    }

    /// [`Node::send`], handing the message back when no actor takes it.
    pub fn deliver(
        self: &Arc<Self>,
        name: &ConferenceName,
        msg: Msg,
        spawn: bool,
    ) -> Result<(), Box<Msg>> {
        let mut reg = lock(&self.registry);
        let msg = match reg.get(name) {
            Some(tx) => match tx.send(msg) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(m)) => {
                    reg.remove(name);
                    m
                }
            },
            None => msg,
        };
        if !spawn {
            return Err(Box::new(msg));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        if let Err(mpsc::error::SendError(m)) = tx.send(msg) {
            return Err(Box::new(m));
        }
        reg.insert(name.clone(), tx);
        tokio::spawn(conference::run(self.clone(), name.clone(), rx));
        Ok(())
    }

    /// Called by an idle actor: removes it if no message waits for it. Sends happen under the
    /// same lock, so none can slip in between the check and the removal.
    pub fn retire(&self, name: &ConferenceName, rx: &mpsc::UnboundedReceiver<Msg>) -> bool {
        let mut reg = lock(&self.registry);
        if rx.is_empty() {
            reg.remove(name);
            drop(reg);
            self.changed.notify_waiters();
            true
        } else {
            false
        }
    }

    /// Whether no conference has an actor (nothing hosted, nothing being set up).
    pub fn idle(&self) -> bool {
        lock(&self.registry).is_empty() && lock(&self.views).is_empty()
    }

    /// Plays `media` to a participant's channel as playback `id`, noted until it finishes.
    pub async fn play_to(&self, channel: &str, id: &str, media: &str) -> Result<(), AriError> {
        lock(&self.channel_playbacks).insert(id.to_string(), channel.to_string());
        let r = self.ari.play_on_channel(channel, id, media).await;
        if r.is_err() {
            lock(&self.channel_playbacks).remove(id);
        }
        r
    }

    /// Stops the playbacks the agent started on `channel`. Asterisk runs a channel's commands
    /// one at a time, and a playback holds the channel until it ends: an `addChannel` moving
    /// it (hold, unhold, a move, the start) would wait for it, past
    /// the request's timeout, and be carried out later behind the agent's back.
    pub async fn stop_playbacks(&self, channel: &str) {
        let ids: Vec<String> = lock(&self.channel_playbacks)
            .iter()
            .filter(|(_, c)| c.as_str() == channel)
            .map(|(id, _)| id.clone())
            .collect();
        // Together: one slow answer bounds the wait, however many there are.
        let stops = ids.iter().map(|id| self.ari.stop_playback(id));
        for (id, r) in ids.iter().zip(futures_util::future::join_all(stops).await) {
            match r {
                Ok(()) => {
                    lock(&self.channel_playbacks).remove(id);
                }
                Err(e) => {
                    tracing::warn!(channel, playback = %id, error = %e, "cannot stop a playback before moving the channel")
                }
            }
        }
    }

    /// Names of conferences with an actor.
    pub fn actor_names(&self) -> Vec<ConferenceName> {
        lock(&self.registry).keys().cloned().collect()
    }

    /// Routes a channel's events to `name`; false if the channel already left Stasis.
    pub fn route(&self, channel: &str, name: &ConferenceName) -> bool {
        let mut routes = lock(&self.routes);
        match routes.get(channel) {
            Some(Route::Gone) => {
                routes.remove(channel);
                false
            }
            _ => {
                routes.insert(channel.to_string(), Route::Conference(name.clone()));
                true
            }
        }
    }

    /// Forgets that `channel` belongs to conference `name` (found in none of its bridges),
    /// so a later join may claim it.
    pub fn release_route(&self, channel: &str, name: &ConferenceName) {
        let mut routes = lock(&self.routes);
        if matches!(routes.get(channel), Some(Route::Conference(n)) if n == name) {
            routes.remove(channel);
        }
    }

    /// Marks a channel that will not join (refused, or its move refused after its conference
    /// ended); its StasisEnd removes the mark.
    pub fn unroute(&self, channel: &str) {
        let mut routes = lock(&self.routes);
        match routes.get(channel) {
            Some(Route::Pending | Route::Moving(_)) => {
                routes.insert(channel.to_string(), Route::Refused);
            }
            Some(Route::Gone) => {
                routes.remove(channel);
            }
            _ => {}
        }
    }

    /// Channels whose ARI events are routed here now (participants, callers being admitted,
    /// ringing dial-outs, channels whose end is awaited).
    pub fn tracked_channels(&self) -> usize {
        lock(&self.routes).len()
    }

    /// The channels routed to a conference (or refused) before a reconciliation lists
    /// Asterisk's channels, for [`Node::forget_vanished`] after it.
    pub fn settled_routes(&self) -> Vec<String> {
        lock(&self.routes)
            .iter()
            .filter(|(_, r)| settled(r))
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// Forgets the routes of channels (of `before`, taken before the listing) that this
    /// listing and the one before it both lack: their StasisEnd was lost (an Asterisk
    /// restart drops its channels unannounced) and would otherwise be awaited for good.
    /// One miss is not enough: a channel that just ended may still have its StasisEnd on
    /// the way, which needs its route. Returns how many were forgotten.
    pub fn forget_vanished(&self, before: Vec<String>, present: &HashSet<&str>) -> usize {
        let missing: HashSet<String> = before
            .into_iter()
            .filter(|c| !present.contains(c.as_str()))
            .collect();
        let mut vanished = lock(&self.vanished);
        let mut routes = lock(&self.routes);
        let mut forgotten = 0;
        for c in missing.intersection(&vanished) {
            if routes.get(c).is_some_and(settled) {
                routes.remove(c);
                lock(&self.caller_holds).remove(c);
                lock(&self.channel_playbacks).retain(|_, ch| ch != c);
                forgotten += 1;
            }
        }
        *vanished = missing;
        forgotten
    }

    /// Starts a reconciliation's record of channels that leave Stasis meanwhile.
    pub fn forget_ended(&self) {
        lock(&self.ended).clear();
        // A channel never in Stasis (a callee that did not answer) sends no StasisEnd.
        let window = self.hangup_window();
        lock(&self.hanging_up).retain(|_, h| h.current(window));
    }

    /// Forgets the hangups asked for before `taken` whose channel a listing taken then no
    /// longer shows: they are done, whether or not Asterisk said so.
    pub fn forget_hangups_done(&self, present: &HashSet<&str>, taken: Instant) {
        lock(&self.hanging_up).retain(|ch, h| h.asked > taken || present.contains(ch.as_str()));
    }

    /// How long a hangup asked for is remembered (see [`HANGUP_UNDER_WAY`]).
    fn hangup_window(&self) -> std::time::Duration {
        HANGUP_UNDER_WAY.max(self.cfg.ari.reconcile_interval * 3)
    }

    /// Asks Asterisk to hang up `channel` with Q.850 `cause`. Asterisk answers before the
    /// channel has left its bridge and Stasis, so the channel is remembered until its
    /// `StasisEnd`: a listing taken meanwhile shows it, and must not bring it back.
    pub async fn hang_up(&self, channel: &str, cause: u16) -> Result<(), AriError> {
        self.ask_hangup(channel, cause, true).await.map(drop)
    }

    /// [`Node::hang_up`], telling whether Asterisk still had the channel: false when it had
    /// gone already (a caller hanging up as it is kicked), its `StasisEnd` perhaps not
    /// yet heard.
    pub async fn hang_up_found(&self, channel: &str, cause: u16) -> Result<bool, AriError> {
        self.ask_hangup(channel, cause, true).await
    }

    /// [`Node::hang_up`] asked again (by a reconciliation, or before the exit): a failure
    /// brings no reconciliation forward, so one that keeps failing is asked at the periodic
    /// pace, not every few seconds, of an Asterisk already struggling.
    pub async fn hang_up_again(&self, channel: &str, cause: u16) -> Result<(), AriError> {
        self.ask_hangup(channel, cause, false).await.map(drop)
    }

    async fn ask_hangup(&self, channel: &str, cause: u16, first: bool) -> Result<bool, AriError> {
        let asked = Instant::now();
        let ask = Hangup {
            asked,
            cause,
            acknowledged: false,
        };
        lock(&self.hanging_up).insert(channel.to_string(), ask);
        let result = self.ari.hangup(channel, cause).await;
        match &result {
            Ok(_) => {
                if let Some(h) = lock(&self.hanging_up)
                    .get_mut(channel)
                    .filter(|h| h.asked == asked)
                {
                    h.acknowledged = true;
                }
            }
            // A request lost or not answered; one Asterisk refused (a 400) would be refused
            // again, and is left to the periodic reconciliation.
            Err(e) if first && e.kind.transient() => self.retry_hangups_soon(),
            Err(_) => {}
        }
        result
    }

    /// Has a reconciliation run once [`HANGUP_RETRY_AFTER`] has passed, to ask again for
    /// the hangups that failed (of a caller, or of a callee still ringing, which nothing
    /// else would call off): waiting for the periodic one would leave them up to
    /// `ari.reconcile_interval` in silence, or ringing. Failures meanwhile share that run;
    /// one whose ask fails again waits for the periodic one.
    fn retry_hangups_soon(&self) {
        if self.hangup_retry_due.swap(true, Ordering::SeqCst) {
            return;
        }
        let (due, reconcile) = (self.hangup_retry_due.clone(), self.reconcile.clone());
        tokio::spawn(async move {
            tokio::time::sleep(HANGUP_RETRY_AFTER).await;
            due.store(false, Ordering::SeqCst);
            let _ = reconcile.send(());
        });
    }

    /// Forgets a hangup request that failed and is not to be repeated (the caller was told).
    pub fn hangup_failed(&self, channel: &str) {
        lock(&self.hanging_up).remove(channel);
    }

    /// Whether the agent asked for `channel`'s hangup and it has not left Stasis yet.
    pub fn hangup_under_way(&self, channel: &str) -> bool {
        let window = self.hangup_window();
        lock(&self.hanging_up)
            .get(channel)
            .is_some_and(|h| h.current(window))
    }

    /// The cause of a hangup the agent asked for before `before` and that has not happened
    /// yet (the request failed, or Asterisk lost it): the channel is still listed after it.
    pub fn hangup_overdue(&self, channel: &str, before: Instant) -> Option<u16> {
        let window = self.hangup_window();
        lock(&self.hanging_up)
            .get(channel)
            .filter(|h| {
                before.checked_duration_since(h.asked) >= Some(HANGUP_RETRY_AFTER)
                    && h.current(window)
            })
            .map(|h| h.cause)
    }

    /// The hangups Asterisk has not acknowledged (failed, or still in flight), with their
    /// causes.
    pub fn unacknowledged_hangups(&self) -> Vec<(String, u16)> {
        lock(&self.hanging_up)
            .iter()
            .filter(|(_, h)| !h.acknowledged)
            .map(|(ch, h)| (ch.clone(), h.cause))
            .collect()
    }

    /// Whether the channel left Stasis since [`Node::forget_ended`].
    pub fn ended_since_listing(&self, channel: &str) -> bool {
        lock(&self.ended).contains(channel)
    }

    /// Routes the events of a dial-out's channel (created with a known id) to `name`
    /// before it exists, so nothing it does is missed.
    pub fn route_dialout(&self, channel: &str, name: &ConferenceName) {
        lock(&self.routes).insert(channel.to_string(), Route::Dialout(name.clone()));
    }

    /// Forgets a dial-out's route (its originate failed or it ended before answering);
    /// true when it was still ringing.
    pub fn unroute_dialout(&self, channel: &str) -> Option<ConferenceName> {
        let mut routes = lock(&self.routes);
        match routes.get(channel) {
            Some(Route::Dialout(_)) => match routes.remove(channel) {
                Some(Route::Dialout(n)) => Some(n),
                _ => None,
            },
            _ => None,
        }
    }

    /// A dial-out's callee is gone before it answered: its route is forgotten and its
    /// conference frees its seat. Nothing happens for a call already forgotten or answered.
    pub fn dialout_gone(self: &Arc<Self>, channel: &str, cause: Option<i64>) {
        if let Some(name) = self.unroute_dialout(channel) {
            self.send(
                &name,
                Msg::DialoutGone {
                    channel: channel.to_string(),
                    cause,
                },
                false,
            );
        }
    }

    /// Whether the channel is routed as a dial-out.
    pub fn is_dialout(&self, channel: &str) -> bool {
        matches!(lock(&self.routes).get(channel), Some(Route::Dialout(_)))
    }

    /// The conference a channel's events go to, if it is one of its participants.
    pub fn conference_of(&self, channel: &str) -> Option<ConferenceName> {
        match lock(&self.routes).get(channel) {
            Some(Route::Conference(n) | Route::Moving(n)) => Some(n.clone()),
            _ => None,
        }
    }

    /// Whether the caller's phone has `channel` on hold (the last ChannelHold/Unhold);
    /// `None` once the channel has left Stasis, when there is nothing left to tell.
    pub fn caller_held(&self, channel: &str) -> Option<bool> {
        let routes = lock(&self.routes);
        match routes.get(channel) {
            None | Some(Route::Gone) => None,
            Some(_) => Some(lock(&self.caller_holds).contains(channel)),
        }
    }

    /// Marks a participant of `name` as being moved to another conference of this node.
    pub fn mark_moving(&self, channel: &str, name: &ConferenceName) {
        let mut routes = lock(&self.routes);
        if matches!(routes.get(channel), Some(Route::Conference(n)) if n == name) {
            routes.insert(channel.to_string(), Route::Moving(name.clone()));
        }
    }

    /// Channels being admitted (their variables read, their conference not yet reached).
    pub fn pending_joins(&self) -> Vec<String> {
        lock(&self.routes)
            .iter()
            .filter(|(_, r)| matches!(r, Route::Pending))
            .map(|(ch, _)| ch.clone())
            .collect()
    }

    /// Marks a channel found by reconciliation as being worked on; false if already known.
    pub fn claim_route(&self, channel: &str) -> bool {
        let mut routes = lock(&self.routes);
        if routes.contains_key(channel) {
            return false;
        }
        routes.insert(channel.to_string(), Route::Pending);
        true
    }

    /// Routes a channel found in one of the conference's bridges by reconciliation, unless
    /// it belongs elsewhere by now (see [`Node::routed_elsewhere`]). False when it left
    /// Stasis since the listing: its StasisEnd found no route and reached no conference.
    pub fn claim_adopted(&self, channel: &str, name: &ConferenceName) -> bool {
        let mut routes = lock(&self.routes);
        // Checked under the routes lock: a StasisEnd marks the channel ended before it looks
        // for its route, so it either is seen here or finds the route taken now.
        if self.ended_since_listing(channel) {
            return false;
        }
        if !elsewhere(routes.get(channel), name) {
            routes.insert(channel.to_string(), Route::Conference(name.clone()));
        }
        true
    }

    /// Whether the channel's events go somewhere other than conference `name`: another
    /// conference, a move under way, a refusal, or it left Stasis. A listing older than that
    /// may still show it in `name`'s bridge, and `name` must not take it back.
    pub fn routed_elsewhere(&self, channel: &str, name: &ConferenceName) -> bool {
        elsewhere(lock(&self.routes).get(channel), name)
    }

    /// Starts the join clock of a channel (StasisStart).
    pub fn join_started(&self, channel: &str, at: Instant) {
        lock(&self.joining).insert(channel.to_string(), at);
    }

    /// Stops the join clock without observing it (refused or gone).
    pub fn join_abandoned(&self, channel: &str) {
        lock(&self.joining).remove(channel);
    }

    // ----- published views -----

    /// Replaces (or with `None`, removes) a conference's view and updates the gauges.
    pub fn publish(&self, name: &ConferenceName, view: Option<ConferenceView>) {
        let mut views = lock(&self.views);
        match view {
            Some(mut v) => {
                v.count_version = self.next_count_version();
                views.insert(name.clone(), v);
            }
            None => {
                views.remove(name);
            }
        }
        self.metrics.conferences.set(views.len() as i64);
        self.metrics
            .participants
            .set(views.values().map(|v| v.participants.len() as i64).sum());
        drop(views);
        self.changed.notify_waiters();
    }

    /// Marks a participant of `name`'s published view talking or not: talk detection comes
    /// often, and this leaves the rest of the view (and its count version) as it is.
    pub fn publish_talking(&self, name: &ConferenceName, channel: &str, talking: bool) {
        let mut views = lock(&self.views);
        if let Some(p) = views
            .get_mut(name)
            .and_then(|v| v.participants.iter_mut().find(|p| p.channel == channel))
        {
            p.talking = talking;
        }
    }

    /// A participant count version newer than every view published so far: a count written
    /// with it is not undone by a heartbeat carrying an older view (heartbeat.lua).
    pub fn next_count_version(&self) -> u64 {
        self.count_versions.fetch_add(1, Ordering::Relaxed)
    }

    /// Keeps later count versions above `seen`, one written by this node (an earlier life
    /// whose clock ran ahead of this one's): versions start at the wall clock, which may have
    /// been stepped back since, and a count written below one already in Redis would not
    /// hold against heartbeats, nor guard its claim against a release on an older listing.
    /// A version past [`MAX_COUNT_VERSION`] (written by hand, or by a clock gone wild) is
    /// not followed: Lua compares versions as doubles, exact only below 2^53.
    pub fn count_versions_above(&self, seen: u64) {
        if seen < MAX_COUNT_VERSION {
            self.count_versions
                .fetch_max(seen.saturating_add(1), Ordering::Relaxed);
        }
    }

    /// Now on Redis's clock (ms since the epoch), from this host's clock and the last
    /// measured offset ([`Node::measure_redis_clock`]); this host's own until one is.
    pub fn redis_now_ms(&self) -> u64 {
        let offset = self.redis_clock_offset_ms.load(Ordering::Relaxed);
        local_now_ms().saturating_add_signed(offset)
    }

    /// Reads Redis's clock and keeps its offset from this host's: a drain begun by an admin
    /// (its start in Redis time) and one begun here then count on the same clock, however
    /// far apart the hosts' clocks are. Kept as it was when Redis does not answer.
    pub async fn measure_redis_clock(&self) {
        let before = local_now_ms();
        if let Ok(redis) = self.store.time_ms().await {
            // Taken as read halfway through the round trip.
            let local = before / 2 + local_now_ms() / 2;
            let offset =
                i64::try_from(redis).unwrap_or(i64::MAX) - i64::try_from(local).unwrap_or(i64::MAX);
            self.redis_clock_offset_ms.store(offset, Ordering::Relaxed);
            *lock(&self.redis_clock_measured) = Some(std::time::Instant::now());
        }
    }

    /// Whether Redis's clock is to be measured again: never measured yet (Redis did not
    /// answer), or not for [`REDIS_CLOCK_REMEASURE`] (a failover may have brought another
    /// primary, and clocks drift).
    pub fn redis_clock_stale(&self) -> bool {
        lock(&self.redis_clock_measured).is_none_or(|at| at.elapsed() >= REDIS_CLOCK_REMEASURE)
    }

    /// Every conference view.
    pub fn views(&self) -> Vec<ConferenceView> {
        lock(&self.views).values().cloned().collect()
    }

    /// Conferences this node holds a claim for, as the heartbeat reports them.
    pub fn hosted(&self) -> Vec<Hosted> {
        lock(&self.views)
            .values()
            .filter(|v| v.phase == "active")
            .map(|v| Hosted {
                name: v.conference.clone(),
                epoch: v.epoch,
                participants: v.participants.len() as u32 + v.ringing,
                count_version: v.count_version,
            })
            .collect()
    }

    /// Whether Asterisk has been out of reach longer than `ari.release_after`: its
    /// conferences' claims are then given back, and no longer renewed until it is back.
    pub fn ari_given_up(&self) -> bool {
        let after = self.cfg.ari.release_after;
        !after.is_zero() && lock(&self.ari_down_since).is_some_and(|t| t.elapsed() >= after)
    }

    /// `(conferences, participants)` hosted now.
    pub fn load(&self) -> (u32, u32) {
        let views = lock(&self.views);
        (
            views.len() as u32,
            views.values().map(|v| v.participants.len() as u32).sum(),
        )
    }

    // ----- playbacks -----

    /// Returns a receiver that fires when playback `id` finishes.
    pub fn wait_playback(&self, id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        lock(&self.playbacks).insert(id.to_string(), tx);
        rx
    }

    /// Empty claims found without a conference by the previous reconciliation.
    pub fn take_stale_claims(&self) -> HashMap<(ConferenceName, u64), Instant> {
        std::mem::take(&mut *lock(&self.stale_claims))
    }

    /// Remembers empty claims without a conference, with when each was first seen so, until
    /// the next reconciliation.
    pub fn keep_stale_claims(&self, seen: HashMap<(ConferenceName, u64), Instant>) {
        *lock(&self.stale_claims) = seen;
    }

    /// Forgets a playback nobody waits for any more.
    pub fn forget_playback(&self, id: &str) {
        lock(&self.playbacks).remove(id);
    }

    /// Whether the node can take new conferences as far as ARI goes: false while the events
    /// WebSocket is down, including before its first connection: an agent that never reached
    /// its Asterisk (wrong URL or password, Asterisk not up yet) can admit nobody; and while
    /// Asterisk refuses its writes (a user ari.conf makes `read_only`).
    pub fn ari_available(&self) -> bool {
        self.ari_connected.load(Ordering::SeqCst)
            && !self.ari.writes_refused()
            && self.writes_checked.load(Ordering::SeqCst) == self.connection()
    }

    /// Asks Asterisk whether it lets the agent write ([`AriClient::check_writes`]), unless
    /// that is known for the events connection in place and nothing was refused since: a
    /// user ari.conf makes `read_only` keeps its reads and its events, and would draw
    /// conferences whose callers it cannot bridge. Bounded by `ari.request_timeout`.
    ///
    /// [`AriClient::check_writes`]: crate::ari::AriClient::check_writes
    pub async fn check_writes(&self) {
        let _one = self.write_check.lock().await;
        if !self.ari_connected.load(Ordering::SeqCst) {
            return;
        }
        let connection = self.connection();
        if !self.ari.writes_refused() && self.writes_checked.load(Ordering::SeqCst) == connection {
            return;
        }
        if let Ok(true) = self.ari.check_writes().await {
            self.writes_checked.store(connection, Ordering::SeqCst);
        }
    }

    /// Starts [`Node::check_writes`] in the background when it is due (a connection not
    /// checked yet, or writes refused: a fixed ari.conf is noticed without a restart), and
    /// wakes the heartbeat when it changes whether the node can admit.
    pub fn recheck_writes(self: &Arc<Self>) {
        let due = self.ari_connected.load(Ordering::SeqCst)
            && (self.ari.writes_refused()
                || self.writes_checked.load(Ordering::SeqCst) != self.connection());
        if !due || self.write_check.try_lock().is_err() {
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            let before = node.ari_available();
            node.check_writes().await;
            if node.ari_available() != before {
                node.ari_changed.notify_one();
            }
        });
    }

    /// The events WebSocket connection in place now (counted from 1).
    pub fn connection(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Records that a reconciliation started under `connection` completed.
    pub fn reconciled_at(&self, connection: u64) {
        self.reconciled_under.store(connection, Ordering::SeqCst);
        // Newcomers need no listing of their own once the reconciliation has looked.
        if let Ok(mut listing) = self.listing.try_lock() {
            *listing = None;
        }
        // A drain waits for this before it trusts an empty list of conferences.
        self.changed.notify_waiters();
    }

    /// Asterisk's bridges and channels listed under the current events connection: made by
    /// the first caller to ask after a (re)connect, shared by the others (which wait for it
    /// rather than list again), so a burst of newcomers after a reconnect asks Asterisk for
    /// one listing, not one per conference. Not kept when listing failed.
    pub async fn listing_since_connect(&self) -> Result<Arc<Listing>, AriError> {
        let connection = self.connection();
        let mut cached = self.listing.lock().await;
        if let Some((under, listing)) = cached.as_ref() {
            if *under == connection {
                return Ok(listing.clone());
            }
        }
        let taken = Instant::now();
        let bridges = self.ari.list_bridges().await?;
        let channels = self.ari.list_channels().await?;
        let listing = Arc::new(Listing {
            taken,
            bridges,
            channels,
        });
        *cached = Some((connection, listing.clone()));
        Ok(listing)
    }

    /// Whether a reconciliation has completed in this agent's life.
    pub fn ever_reconciled(&self) -> bool {
        self.reconciled_under.load(Ordering::SeqCst) != 0
    }

    /// Whether a reconciliation completed since the events WebSocket last connected.
    pub fn reconciled(&self) -> bool {
        let now = self.connection();
        now != 0 && self.reconciled_under.load(Ordering::SeqCst) == now
    }

    /// Asks the reconcile worker for a run.
    pub fn request_reconcile(&self) {
        let _ = self.reconcile.send(());
    }

    /// The callee of a dial-out answered (its route turned from ringing to its conference):
    /// its conference joins it with the options the dial-out asked for.
    fn dialout_answered(self: &Arc<Self>, name: ConferenceName, channel: crate::ari::Channel) {
        let id = channel.id.clone();
        self.dialouts.answered(&id);
        if !self.send(&name, Msg::DialoutAnswered { channel }, false) {
            self.join_abandoned(&id);
            let node = self.clone();
            tokio::spawn(async move {
                if let Err(e) = node.hang_up(&id, conference::CAUSE_NORMAL).await {
                    tracing::warn!(channel = %id, error = %e, "cannot hang up a callee whose conference is gone");
                }
            });
        }
    }

    /// A callee a listing shows in the Stasis app, in no bridge, while the agent still
    /// has it ringing: its StasisStart was lost (written to an events connection that had
    /// died). It joins as that event would have made it; false when it was not ringing.
    pub fn answered_unheard(self: &Arc<Self>, channel: crate::ari::Channel) -> bool {
        let name = {
            let mut routes = lock(&self.routes);
            let Some(Route::Dialout(name)) = routes.get(&channel.id) else {
                return false;
            };
            let name = name.clone();
            routes.insert(channel.id.clone(), Route::Conference(name.clone()));
            name
        };
        tracing::warn!(channel = %channel.id, conference = %name, "a ringing callee is found in the Stasis app: its StasisStart was lost; joining it");
        self.join_started(&channel.id, Instant::now());
        self.dialout_answered(name, channel);
        true
    }

    /// Handles one event (called in the order events arrive).
    pub fn dispatch(self: &Arc<Self>, event: Event) {
        match event {
            Event::StasisStart { channel, args } => {
                let now = Instant::now();
                let dialout = {
                    let mut routes = lock(&self.routes);
                    match routes.get(&channel.id) {
                        Some(Route::Dialout(name)) => {
                            let name = name.clone();
                            routes.insert(channel.id.clone(), Route::Conference(name.clone()));
                            Some(name)
                        }
                        Some(_) => return,
                        None => {
                            routes.insert(channel.id.clone(), Route::Pending);
                            None
                        }
                    }
                };
                self.join_started(&channel.id, now);
                match dialout {
                    Some(name) => self.dialout_answered(name, channel),
                    None => {
                        tokio::spawn(crate::join::prepare(self.clone(), channel, args));
                    }
                }
            }
            Event::StasisEnd { channel } => {
                lock(&self.channel_playbacks).retain(|_, c| *c != channel.id);
                self.join_abandoned(&channel.id);
                lock(&self.caller_holds).remove(&channel.id);
                lock(&self.ended).insert(channel.id.clone());
                lock(&self.hanging_up).remove(&channel.id);
                self.dialouts.stasis_ended(self, &channel.id);
                let route = {
                    let mut routes = lock(&self.routes);
                    match routes.remove(&channel.id) {
                        Some(Route::Pending) => {
                            routes.insert(channel.id.clone(), Route::Gone);
                            None
                        }
                        Some(Route::Conference(n)) => Some(n),
                        Some(Route::Moving(n)) => {
                            routes.insert(channel.id.clone(), Route::Gone);
                            Some(n)
                        }
                        _ => None,
                    }
                };
                if let Some(name) = route {
                    self.send(
                        &name,
                        Msg::Left {
                            channel: channel.id,
                        },
                        false,
                    );
                }
            }
            Event::ChannelEnteredBridge {
                channel: Some(channel),
                ..
            } => {
                if let Some(at) = lock(&self.joining).remove(&channel.id) {
                    self.metrics
                        .join_duration
                        .observe(at.elapsed().as_secs_f64());
                }
            }
            Event::ChannelHold { channel } => self.hold(&channel.id, true),
            Event::ChannelUnhold { channel } => self.hold(&channel.id, false),
            // An originated callee rings (a 180): Asterisk shows it only as the state.
            Event::ChannelStateChange { channel } if channel.state == "Ringing" => {
                self.dial_progress(channel.id, "RINGING");
            }
            Event::Dial { peer, dialstatus } => self.dial_progress(peer.id, &dialstatus),
            Event::ChannelHangupRequest {
                channel,
                cause,
                soft,
            } => {
                // A soft hangup's cause is a flag, not a Q.850 cause.
                if soft != Some(true) {
                    if let Some(c) = cause {
                        self.dialouts.hangup_requested(&channel.id, c);
                    }
                }
            }
            Event::ChannelDestroyed { channel, cause } => {
                let cause = self.dialouts.destroyed(self, &channel.id, cause);
                self.dialout_gone(&channel.id, cause);
            }
            Event::ChannelTalkingStarted { channel } => self.talking(&channel.id, true),
            Event::ChannelTalkingFinished { channel } => self.talking(&channel.id, false),
            Event::PlaybackFinished { playback } => {
                lock(&self.channel_playbacks).remove(&playback.id);
                if let Some(tx) = lock(&self.playbacks).remove(&playback.id) {
                    let _ = tx.send(());
                }
            }
            Event::BridgeDestroyed { bridge } => {
                if let Some((_, _, name)) = conference::parse_bridge_id(&bridge.id) {
                    self.send(&name, Msg::BridgeGone { bridge: bridge.id }, false);
                }
            }
            Event::RecordingFinished { recording } => {
                if let Some(name) = conference::recording_conference(&recording.name) {
                    self.send(
                        &name,
                        Msg::RecordingFinished {
                            name: recording.name,
                        },
                        false,
                    );
                }
            }
            Event::RecordingFailed { recording } => {
                tracing::warn!(recording = %recording.name, "conference recording failed");
                if let Some(name) = conference::recording_conference(&recording.name) {
                    self.send(
                        &name,
                        Msg::RecordingFailed {
                            name: recording.name,
                        },
                        false,
                    );
                }
            }
            // The events WebSocket reconnects on ApplicationReplaced itself.
            Event::ChannelLeftBridge { .. }
            | Event::ChannelEnteredBridge { channel: None, .. }
            | Event::ChannelStateChange { .. }
            | Event::ApplicationReplaced { .. }
            | Event::Other => {}
        }
    }

    /// Progress of an outgoing call `callid`: a Dial status, or `RINGING` from its state.
    fn dial_progress(self: &Arc<Self>, callid: String, status: &str) {
        let tracked = self.dialouts.dial_status(self, &callid, status);
        // A dial-out given up (its originate failed, yet Asterisk placed the call after the
        // agent's hangup found nothing): hung up as soon as it shows alive. A final status
        // (busy, no answer, ...) is its end already.
        let alive = matches!(
            status,
            "" | "RINGING" | "PROGRESS" | "PROCEEDING" | "ANSWER"
        );
        if !tracked && self.is_dialout(&callid) && alive {
            let node = self.clone();
            tokio::spawn(async move {
                if let Err(e) = node.hang_up(&callid, conference::CAUSE_NORMAL).await {
                    tracing::warn!(%callid, error = %e, "cannot hang up a dial-out that was given up");
                }
            });
        }
    }

    fn talking(self: &Arc<Self>, channel: &str, talking: bool) {
        if let Some(name) = self.conference_of(channel) {
            self.send(
                &name,
                Msg::Talking {
                    channel: channel.to_string(),
                    talking,
                },
                false,
            );
        }
    }

    fn hold(self: &Arc<Self>, channel: &str, held: bool) {
        let name = {
            let routes = lock(&self.routes);
            let Some(route) = routes.get(channel).filter(|r| !matches!(r, Route::Gone)) else {
                return;
            };
            // Recorded under the routes' lock: a conference that routes the channel to
            // itself after this reads it; one that did before gets the message below.
            let mut holds = lock(&self.caller_holds);
            if held {
                holds.insert(channel.to_string());
            } else {
                holds.remove(channel);
            }
            match route {
                Route::Conference(n) => n.clone(),
                // Joining or moving: the conference that takes it in reads the hold.
                _ => return,
            }
        };
        self.send(
            &name,
            Msg::Hold {
                channel: channel.to_string(),
                held,
            },
            false,
        );
    }
}

/// The node as the events WebSocket's sink.
pub struct Sink(pub Arc<Node>);

impl EventSink for Sink {
    /// Completes once Asterisk was asked whether it lets the agent write and a heartbeat that
    /// started after that has run: Redis then says whether this node's ARI is up before the
    /// connection's first event is handled. A caller's
    /// StasisStart may need the node to claim a new conference for itself, which claim.lua
    /// refuses to a node whose record says ARI is down.
    fn connected(&self, _reconnect: bool) -> BoxFuture<'static, ()> {
        self.0.connections.fetch_add(1, Ordering::SeqCst);
        self.0.ari_connected.store(true, Ordering::SeqCst);
        *lock(&self.0.ari_down_since) = None;
        self.0.rest_answers_logged.store(false, Ordering::SeqCst);
        *lock(&self.0.rest_silent_since) = None;
        // First the write check, then a heartbeat that started after it, which tells Redis
        // whether the node can admit; then the connection's events are handled and the
        // reconciliation runs: a caller joined by either may need the node to claim the
        // conference, which claim.lua refuses while the record says ARI is down. Held at
        // most a lease.
        let node = self.0.clone();
        let (ready, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let within = crate::heartbeat::lease(&node);
        // The events WebSocket waits for `ready` at most max(ari.request_timeout, 1 s) before
        // it reads on (Asterisk drops a subscriber that reads nothing for long): the check
        // takes half of that, the heartbeat the rest. One not done by then is the
        // heartbeat's to finish.
        let check_within = node.cfg.ari.request_timeout.max(Duration::from_secs(1)) / 2;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(within, async {
                let _ = tokio::time::timeout(check_within, node.check_writes()).await;
                let wanted = node.beats_started.load(Ordering::SeqCst) + 1;
                let mut done = node.beats_done.subscribe();
                node.ari_changed.notify_one();
                let _ = done.wait_for(|n| *n >= wanted).await;
            })
            .await;
            let _ = ready.send(());
            node.request_reconcile();
        });
        Box::pin(async move {
            let _ = ready_rx.await;
        })
    }

    fn disconnected(&self) {
        self.0.ari_connected.store(false, Ordering::SeqCst);
        lock(&self.0.ari_down_since).get_or_insert_with(Instant::now);
        self.0.ari_changed.notify_one();
    }

    fn event(&self, event: Event) {
        self.0.dispatch(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hangup_asterisk_never_acknowledged_outlives_the_window() {
        let ask = |acknowledged| Hangup {
            asked: Instant::now(),
            cause: 16,
            acknowledged,
        };
        let window = std::time::Duration::ZERO;
        assert!(!ask(true).current(window), "acknowledged: past the window");
        assert!(
            ask(false).current(window),
            "never acknowledged: kept until a listing shows the channel gone"
        );
    }
}
