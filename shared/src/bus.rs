//! The command bus between controllers and node agents, over Redis pub/sub.
//!
//! Any controller can control a conference on any node: it publishes a [`Command`] on the
//! owning node's channel and waits for the [`Reply`] on its own reply channel; the node may
//! follow with progress notifications (dial-out status) on the same channel. Conference
//! events go to one shared channel that every controller hears and filters for its
//! subscribed clients.
//!
//! | channel (under the key prefix) | carries |
//! |---|---|
//! | `cmd:<node id>` | commands for that node |
//! | `reply:<instance id>` | replies and notifications for one controller process |
//! | `events` | conference events from every node |
//!
//! `PUBLISH` answers how many subscribers got a message, so a command to a node that is not
//! listening fails at once with `node_unavailable` (on a Cluster it counts only the
//! subscribers of the node that took it, so everyone subscribes on the primary serving the
//! channels' slot, where publishes are routed); one that is accepted but never answered
//! fails at its deadline with `no_answer`, as it may have been carried out. Nothing hangs.
//! Pub/sub keeps no history: a message sent while a process reconnects is lost, which for
//! commands shows up as `no_answer`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};

use crate::store::{Store, StoreError};
use crate::types::NodeId;

/// How often an idle subscription is probed, so a dead connection is noticed.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Events buffered per receiver before a slow one starts losing the oldest.
const EVENT_BUFFER: usize = 4096;

/// Application error codes carried across the bus (and mapped to JSON-RPC codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The conference has no home, or the node does not host it.
    ConferenceNotFound,
    /// No such participant in the conference.
    ParticipantNotFound,
    /// The owning node is not listening, or the command could not be sent: nothing was done.
    NodeUnavailable,
    /// A dial-out target that is not an E.164 number or SIP URI.
    InvalidNumber,
    /// The conference is at its maximum number of participants.
    ConferenceFull,
    /// The operation is not allowed.
    Forbidden,
    /// The command waited on the node past the last moment it could start; nothing was done.
    Timeout,
    /// Parameters the node cannot use.
    InvalidParams,
    /// The node could not reach Redis to check or claim the conference; nothing was done.
    Unavailable,
    /// The command was sent (or may have been) and no answer came within its deadline: it
    /// may have been carried out. Made by the sender, never by a node.
    NoAnswer,
    /// The node failed for a reason of its own; also any code this version does not know
    /// (a newer node's), so an answer is never lost to its code.
    #[serde(other)]
    Internal,
}

/// An error answer from a node (or from the bus itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct BusError {
    /// Machine code.
    pub code: ErrorCode,
    /// What went wrong.
    pub message: String,
}

impl BusError {
    /// An error with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        BusError {
            code,
            message: message.into(),
        }
    }

    /// The refusal of a command made while the subscription is down: nothing was sent.
    pub fn reconnecting() -> BusError {
        BusError::new(
            ErrorCode::NodeUnavailable,
            "the command bus is reconnecting to Redis; nothing was sent",
        )
    }
}

/// A command for a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Unique id; replies carry it back.
    pub id: String,
    /// Reply channel suffix (the sender's instance id).
    pub reply_to: String,
    /// Operation, e.g. `participant.mute`.
    pub method: String,
    /// Its parameters.
    pub params: Value,
    /// Wall-clock deadline (ms since the epoch) by the sender's clock; past it the sender
    /// has given up. The receiver replaces it with the last moment to start the command on
    /// its own clock ([`local_deadline`]).
    pub deadline_ms: u64,
    /// The sender's whole budget for the command (ms); 0 from senders that did not say.
    #[serde(default)]
    pub timeout_ms: u64,
    /// When it was sent, by Redis's clock as the sender reckons it (ms since the epoch); 0
    /// when the sender does not know Redis's clock yet. With it a receiver tells a command
    /// held on its way (its own process paused, Redis slow) from clocks that differ.
    #[serde(default)]
    pub sent_ms: u64,
    /// How far `sent_ms` may be off (ms): half the round trip of the sender's comparison
    /// of its clock with Redis's. A receiver counts a command as held only for what is
    /// certain.
    #[serde(default)]
    pub sent_uncertainty_ms: u64,
}

/// More than this between the sender's deadline and the one re-based on our clock means the
/// two hosts' clocks differ (transit over pub/sub takes milliseconds).
const CLOCK_SKEW_WARNING_MS: u64 = 1000;

/// The last moment the receiver may start the command, on its own clock, `now_ms` being
/// that clock's time at receipt. The budget counts from receipt, so hosts whose clocks
/// differ by more than the budget still act on each other's commands (by the sender's clock
/// alone every such command looked expired and was dropped); pub/sub delivers within
/// milliseconds or never, so the budget is not stretched by more than the transit time.
/// Only the first half of the budget may pass before the start: the second is for the work
/// and the answer's way back. A command started as the sender gave up would be carried out
/// after the sender reported it unanswered (and a retried dial-out would call twice); this
/// way the receiver's own `timeout` answer ("nothing was done") reaches the sender in time.
pub fn local_deadline(cmd: &Command, now_ms: u64) -> u64 {
    if cmd.timeout_ms == 0 {
        return cmd.deadline_ms;
    }
    now_ms.saturating_add(cmd.timeout_ms / 2)
}

/// How long `cmd` has certainly been on its way (ms) by Redis's clock, when both its sender
/// and this process know that clock (`redis_now`: now by it and how far that may be off);
/// `None` otherwise, or for a command without a budget. What either side's comparison may
/// be off by is left out: a fresh command is never taken for a held one.
pub fn held_for(cmd: &Command, redis_now: Option<(u64, u64)>) -> Option<u64> {
    if cmd.sent_ms == 0 || cmd.timeout_ms == 0 {
        return None;
    }
    redis_now.map(|(now, uncertainty)| {
        now.saturating_sub(cmd.sent_ms)
            .saturating_sub(uncertainty.saturating_add(cmd.sent_uncertainty_ms))
    })
}

/// [`local_deadline`] for a command `held` ms on its way: the first half of the budget
/// counts from when it was sent, not from its receipt, so a command held past it (this
/// process paused, Redis slow) is answered `timeout` rather than carried out just before
/// its sender reports the node unavailable. Already past: a moment before `now_ms`.
pub fn start_by(cmd: &Command, now_ms: u64, held: u64) -> u64 {
    match (cmd.timeout_ms / 2).checked_sub(held) {
        Some(left) if left > 0 => now_ms.saturating_add(left),
        _ => now_ms.saturating_sub(1),
    }
}

/// What comes back for a command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    /// The command succeeded.
    Result {
        /// Command id.
        id: String,
        /// Its result.
        result: Value,
    },
    /// The command failed.
    Error {
        /// Command id.
        id: String,
        /// Why.
        error: BusError,
    },
    /// Progress after the result (dial-out status); `last` ends the stream.
    Notify {
        /// Command id.
        id: String,
        /// Notification parameters.
        params: Value,
        /// True on the final notification.
        last: bool,
    },
}

impl Reply {
    fn id(&self) -> &str {
        match self {
            Reply::Result { id, .. } | Reply::Error { id, .. } | Reply::Notify { id, .. } => id,
        }
    }
}

/// A conference event published by the node that hosts the conference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Conference name.
    pub conference: String,
    /// Publishing node.
    pub node: String,
    /// The epoch of the conference's claim in the life the event belongs to: with the name
    /// and node it tells one life from the next (0 from agents that did not say).
    #[serde(default)]
    pub epoch: u64,
    /// Per-conference sequence number on that node, so receivers can see order and gaps.
    pub seq: u64,
    /// Event type: `join`, `leave`, `mute`, `hold`, `talking`, `end`, `owner_change`, ...
    pub event: String,
    /// Event details.
    #[serde(default)]
    pub data: Value,
}

/// The `event` of a node's notice that some of a conference's events never reached Redis
/// (their publishing failed, or the node's queue was full); `data.count` says how many.
/// Controllers tell the conference's subscribers with `events.lost`.
pub const EVENTS_LOST: &str = "events_lost";

/// An accepted command: its first answer, then any notifications.
pub struct Call {
    /// The command id (to [`Bus::forget`] a call whose notifications are no longer wanted).
    pub id: String,
    /// The result (or error) the node answered.
    pub reply: Result<Value, BusError>,
    /// Notifications that follow (dial-out status); ends after the `last` one.
    pub notifications: Notifications,
}

/// The notifications of one command. Dropping it forgets the command: a node that died
/// never sends the last one, and the routing entry must not outlive whoever listens.
pub struct Notifications {
    rx: mpsc::UnboundedReceiver<Reply>,
    _pending: Pending,
}

impl Notifications {
    /// The next notification; `None` once the last one was delivered or the command was
    /// forgotten. The command's answer came first, with [`Call::reply`]: one arriving again
    /// (resent by a Redis client after a connection cut, as on a Cluster) is skipped.
    pub async fn recv(&mut self) -> Option<Reply> {
        loop {
            match self.rx.recv().await? {
                Reply::Result { .. } => continue,
                other => return Some(other),
            }
        }
    }
}

/// A command's entry in the routing table of replies, removed when this is dropped: also
/// when the caller gives up on [`Bus::call`] before the answer (a client that went away),
/// since a node that drops the command (past its deadline, queue full) never answers.
struct Pending {
    inner: Arc<Inner>,
    id: String,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(mut p) = self.inner.pending.lock() {
            p.remove(&self.id);
        }
    }
}

struct Inner {
    store: Store,
    instance: String,
    pending: Mutex<HashMap<String, mpsc::UnboundedSender<Reply>>>,
    events: broadcast::Sender<Arc<Event>>,
    connected: AtomicBool,
    /// How many times the subscription came back after being lost: events published in
    /// each gap are unknown to this process.
    gaps: tokio::sync::watch::Sender<u64>,
    counter: AtomicU64,
    /// Redis's clock minus ours (ms), and when (our clock) it was last measured; 0 = never.
    offset_ms: std::sync::atomic::AtomicI64,
    offset_at: AtomicU64,
    /// The round trip (ms) of the comparison the offset comes from.
    offset_rtt: AtomicU64,
    /// Refusals of commands the full queue did not take, being published at once: bounded,
    /// so that a flood of commands while Redis is slow cannot pile up tasks without end.
    refusals: Arc<tokio::sync::Semaphore>,
}

/// Most refusals (command queue full) published at once; past it a refused command gets no
/// answer and its sender reports it unanswered when its time is up.
const MAX_REFUSALS_IN_FLIGHT: usize = 256;

/// How often this process compares its clock with Redis's.
const CLOCK_CHECK_EVERY: Duration = Duration::from_secs(5);
/// A `TIME` round trip up to this gives a good offset: the next check comes after
/// [`CLOCK_CHECK_EVERY`], and only a good one replaces it before [`CLOCK_SAMPLE_STALE_MS`].
const CLOCK_SAMPLE_MAX_RTT_MS: u64 = 100;
/// After this long (ms) any usable comparison replaces the one in use: a clock stepped
/// meanwhile (NTP) makes an old offset wrong by the step.
const CLOCK_SAMPLE_STALE_MS: u64 = 15_000;
/// A `TIME` round trip up to this still gives an offset within half of it: used until a
/// better comparison comes (Redis or this host loaded), since without any offset a command
/// held on its way cannot be told from a fresh one. Longer says too little to be used.
const CLOCK_SAMPLE_USABLE_RTT_MS: u64 = 500;
/// First delay before comparing again when a comparison failed or was unusable; it doubles
/// up to [`CLOCK_CHECK_EVERY`].
const CLOCK_RETRY_MIN: Duration = Duration::from_millis(100);

impl Inner {
    /// Now by Redis's clock, as this process reckons it, and how far that may be off (ms:
    /// half the comparison's round trip); `None` before the first comparison. An old
    /// comparison still counts: the clocks drift apart by parts per million, and a process
    /// paused for minutes must judge the commands it then reads by it before its next
    /// comparison comes back.
    fn redis_clock(&self) -> Option<(u64, u64)> {
        if self.offset_at.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let offset = self.offset_ms.load(Ordering::Relaxed);
        let uncertainty = self.offset_rtt.load(Ordering::Relaxed).div_ceil(2);
        Some((now_ms().saturating_add_signed(offset), uncertainty))
    }
}

/// One comparison of this process's clock with Redis's; false when Redis did not answer or
/// answered too slowly for the offset to last (a slow answer still replaces a slower one, or
/// none, as long as it is usable).
async fn compare_clocks(inner: &Inner) -> bool {
    let before = now_ms();
    let Ok(redis) = inner.store.time_ms().await else {
        return false;
    };
    let after = now_ms();
    let rtt = after.saturating_sub(before);
    let at = inner.offset_at.load(Ordering::Relaxed);
    let in_use = (at != 0).then(|| {
        (
            inner.offset_rtt.load(Ordering::Relaxed),
            after.saturating_sub(at),
        )
    });
    if sample_used(rtt, in_use) {
        let ours = before + rtt / 2;
        let offset =
            i64::try_from(redis).unwrap_or(i64::MAX) - i64::try_from(ours).unwrap_or(i64::MAX);
        inner.offset_ms.store(offset, Ordering::Relaxed);
        inner.offset_rtt.store(rtt, Ordering::Relaxed);
        inner.offset_at.store(after.max(1), Ordering::Relaxed);
        inner
            .store
            .metrics()
            .clock_compared(Duration::from_millis(rtt));
    }
    rtt <= CLOCK_SAMPLE_MAX_RTT_MS
}

/// Whether a comparison with round trip `rtt` (ms) replaces the one in use (`in_use`: its
/// round trip and age in ms, `None` when there is none): a good one always does (the clocks
/// drift), a slow but usable one only a slower one, a stale one or none.
fn sample_used(rtt: u64, in_use: Option<(u64, u64)>) -> bool {
    rtt <= CLOCK_SAMPLE_MAX_RTT_MS
        || (rtt <= CLOCK_SAMPLE_USABLE_RTT_MS
            && in_use.is_none_or(|(h, age)| rtt < h || age >= CLOCK_SAMPLE_STALE_MS))
}

/// A process's end of the bus; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Bus {
    /// A controller's bus: hears replies to its own commands and every conference event.
    pub fn controller(store: Store) -> Bus {
        let instance = format!("ctl-{:016x}", rand::random::<u64>());
        let bus = Bus::new(store, instance.clone());
        let channels = vec![format!("reply:{instance}"), "events".to_string()];
        bus.spawn_subscriber(channels, None);
        bus.spawn_clock();
        bus
    }

    /// A node's bus: hears the commands addressed to `node`, delivered on the receiver.
    pub fn node(store: Store, node: &NodeId) -> (Bus, mpsc::Receiver<Command>) {
        let bus = Bus::new(store, format!("node-{node}"));
        let (tx, rx) = mpsc::channel(1024);
        bus.spawn_subscriber(vec![format!("cmd:{node}")], Some(tx));
        bus.spawn_clock();
        (bus, rx)
    }

    fn new(store: Store, instance: String) -> Bus {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Bus {
            inner: Arc::new(Inner {
                store,
                instance,
                pending: Mutex::new(HashMap::new()),
                events,
                connected: AtomicBool::new(false),
                gaps: tokio::sync::watch::channel(0).0,
                counter: AtomicU64::new(0),
                offset_ms: std::sync::atomic::AtomicI64::new(0),
                offset_at: AtomicU64::new(0),
                offset_rtt: AtomicU64::new(0),
                refusals: Arc::new(tokio::sync::Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
            }),
        }
    }

    /// Compares this process's clock with Redis's now and every [`CLOCK_CHECK_EVERY`] (sooner
    /// again after a comparison that failed or took too long), so
    /// commands carry when they were sent by the clock every process shares.
    fn spawn_clock(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            // A failed or unusable comparison is tried again soon: until the first one
            // counts, commands held on their way cannot be told from fresh ones.
            let mut retry = CLOCK_RETRY_MIN;
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let next = if compare_clocks(&inner).await {
                    retry = CLOCK_RETRY_MIN;
                    CLOCK_CHECK_EVERY
                } else {
                    let now = retry;
                    retry = (retry * 2).min(CLOCK_CHECK_EVERY);
                    now
                };
                drop(inner);
                tokio::time::sleep(next).await;
            }
        });
    }

    /// Whether the subscription is up (commands can be heard and answered).
    pub fn connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    /// Waits until the subscription is up or `within` passes; true when it is up.
    pub async fn wait_connected(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while !self.connected() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Every conference event this process hears (controllers only).
    pub fn events(&self) -> broadcast::Receiver<Arc<Event>> {
        self.inner.events.subscribe()
    }

    /// Changes each time the subscription comes up (after it was lost, and the first time):
    /// the events published before never reached this process.
    pub fn gaps(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.gaps.subscribe()
    }

    /// Commands whose answer or notifications are still awaited.
    pub fn pending(&self) -> usize {
        self.inner.pending.lock().map_or(0, |p| p.len())
    }

    /// Sends `method` to `node` and waits up to `timeout` for its answer. With `follow`, the
    /// notifications that come after the result are delivered on [`Call::notifications`]
    /// until the last one (or [`Bus::forget`]). An `Err` means the command was not sent, or
    /// nobody heard it: it certainly had no effect. A [`Call`] whose reply is an error may
    /// have been carried out when that error is `no_answer`.
    pub async fn call(
        &self,
        node: &NodeId,
        method: &str,
        params: Value,
        timeout: Duration,
        follow: bool,
    ) -> Result<Call, BusError> {
        // Without the subscription the answer could not be heard: the node would act and
        // the caller would be told, after the whole timeout, that it did not answer.
        if !self.connected() {
            return Err(BusError::reconnecting());
        }
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", self.inner.instance);
        let (tx, mut rx) = mpsc::unbounded_channel();
        if let Ok(mut p) = self.inner.pending.lock() {
            p.insert(id.clone(), tx);
        }
        let pending = Pending {
            inner: self.inner.clone(),
            id: id.clone(),
        };
        let clock = self.inner.redis_clock();
        let cmd = Command {
            id: id.clone(),
            reply_to: self.inner.instance.clone(),
            method: method.to_string(),
            params,
            deadline_ms: now_ms() + timeout.as_millis() as u64,
            // 0 would read as "no budget given" (an older sender).
            timeout_ms: (timeout.as_millis() as u64).max(1),
            sent_ms: clock.map_or(0, |(now, _)| now),
            sent_uncertainty_ms: clock.map_or(0, |(_, u)| u),
        };
        let payload = match serde_json::to_vec(&cmd) {
            Ok(p) => p,
            Err(e) => return Err(BusError::new(ErrorCode::Internal, format!("encode: {e}"))),
        };
        let sent_at = tokio::time::Instant::now();
        let mut unconfirmed = None;
        match self
            .inner
            .store
            .publish_unsure(&format!("cmd:{node}"), &payload)
            .await
        {
            // A Cluster's count is the node it reached only (an old primary after a
            // failover, say), and the Cluster carries the command on to every node: it may
            // reach the node all the same, whose answer is awaited.
            Ok(0) if self.inner.store.is_cluster() => {
                unconfirmed = Some(StoreError::Unavailable(
                    "no subscriber counted where the command was published".into(),
                ));
            }
            Ok(0) => {
                return Err(BusError::new(
                    ErrorCode::NodeUnavailable,
                    format!("node {node} is not listening for commands"),
                ));
            }
            Ok(_) => {}
            // No answer from Redis in time, or the connection failed under the request: the
            // command may well have reached Redis and the node. Its answer is awaited for the
            // rest of the budget, so the client learns what came of it rather than a guess.
            Err((e, true)) => {
                unconfirmed = Some(e);
            }
            // Not sent (no connection could be had), or refused by Redis: certainly no effect.
            Err((e, false)) => {
                self.forget(&id);
                drop((rx, pending));
                return Err(BusError::new(
                    ErrorCode::NodeUnavailable,
                    format!("cannot send the command to node {node} through Redis; nothing was sent: {e}"),
                ));
            }
        }
        let first = tokio::time::timeout_at(sent_at + timeout, rx.recv()).await;
        let reply = match first {
            Ok(Some(Reply::Result { result, .. })) => Ok(result),
            Ok(Some(Reply::Error { error, .. })) => Err(error),
            // The node reports progress on the command, so it took it; its answer was lost
            // on the way (a Redis cut, a full queue): carried out, what came of it unknown.
            Ok(Some(Reply::Notify { .. })) => Err(BusError::new(
                ErrorCode::NoAnswer,
                format!("node {node}'s answer was lost, but it reported progress on the command: it was carried out"),
            )),
            Ok(None) => Err(BusError::new(
                ErrorCode::Internal,
                "the command's answers stopped before its result",
            )),
            Err(_) => Err(BusError::new(
                ErrorCode::NoAnswer,
                match &unconfirmed {
                    Some(e) => format!("node {node} did not answer within {timeout:?}, and Redis did not confirm the command was sent ({e})"),
                    None => format!("node {node} did not answer within {timeout:?}"),
                },
            )),
        };
        if reply.is_err() || !follow {
            self.forget(&id);
        }
        Ok(Call {
            id,
            reply,
            notifications: Notifications {
                rx,
                _pending: pending,
            },
        })
    }

    /// Stops routing notifications of command `id` (the caller lost interest).
    pub fn forget(&self, id: &str) {
        if let Ok(mut p) = self.inner.pending.lock() {
            p.remove(id);
        }
    }

    /// Answers `cmd` (node side).
    pub async fn respond(&self, cmd: &Command, result: Result<Value, BusError>) {
        let reply = match result {
            Ok(result) => Reply::Result {
                id: cmd.id.clone(),
                result,
            },
            Err(error) => Reply::Error {
                id: cmd.id.clone(),
                error,
            },
        };
        self.send_reply(&cmd.reply_to, &reply).await;
    }

    /// Sends a progress notification for command `id` to `reply_to` (node side).
    pub async fn notify(&self, reply_to: &str, id: &str, params: Value, last: bool) {
        let reply = Reply::Notify {
            id: id.to_string(),
            params,
            last,
        };
        self.send_reply(reply_to, &reply).await;
    }

    async fn send_reply(&self, reply_to: &str, reply: &Reply) {
        match serde_json::to_vec(reply) {
            Ok(payload) => {
                if let Err(e) = self
                    .inner
                    .store
                    .publish(&format!("reply:{reply_to}"), &payload)
                    .await
                {
                    tracing::warn!(error = %e, "cannot send a command reply");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode a command reply"),
        }
    }

    /// A command reply or notification for the controller `reply_to`, ready for
    /// [`Bus::publish_batch`].
    pub fn encode_reply(reply_to: &str, reply: &Reply) -> Result<(String, Vec<u8>), String> {
        serde_json::to_vec(reply)
            .map(|payload| (format!("reply:{reply_to}"), payload))
            .map_err(|e| format!("cannot encode a command reply: {e}"))
    }

    /// A conference event, ready for [`Bus::publish_batch`].
    pub fn encode_event(event: &Event) -> Result<(String, Vec<u8>), String> {
        serde_json::to_vec(event)
            .map(|payload| ("events".to_string(), payload))
            .map_err(|e| format!("cannot encode a conference event: {e}"))
    }

    /// Publishes encoded replies and events in one round trip, in order (node side); an
    /// error when Redis did not take them (some may have gone out all the same).
    pub async fn publish_batch(&self, messages: &[(String, Vec<u8>)]) -> Result<(), String> {
        self.inner
            .store
            .publish_all(messages)
            .await
            .map_err(|e| e.to_string())
    }

    /// Publishes a conference event (node side); false when Redis did not take it.
    pub async fn publish_event(&self, event: &Event) -> bool {
        match serde_json::to_vec(event) {
            Ok(payload) => match self.inner.store.publish("events", &payload).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot publish a conference event");
                    false
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a conference event");
                false
            }
        }
    }

    fn spawn_subscriber(&self, channels: Vec<String>, commands: Option<mpsc::Sender<Command>>) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            // Failed tries in a row: a Redis that refuses the subscription (an ACL without
            // channel rights) must show in the log, not only at debug level.
            let mut failures: u32 = 0;
            loop {
                let Some(inner) = weak.upgrade() else { break };
                let prefix = inner.store.prefix().to_string();
                match subscribe(&inner, &prefix, &channels).await {
                    Ok((pubsub, home)) => {
                        backoff = Duration::from_millis(100);
                        failures = 0;
                        inner.connected.store(true, Ordering::Relaxed);
                        // Every subscription follows a time without one: a later one the
                        // gap since the last was lost, the first the start-up (a client that
                        // subscribed to a conference before it, or while Redis refused it,
                        // missed what was published meanwhile).
                        inner.gaps.send_modify(|g| *g += 1);
                        drop(inner);
                        listen(pubsub, home, &weak, &prefix, commands.as_ref()).await;
                        if let Some(inner) = weak.upgrade() {
                            inner.connected.store(false, Ordering::Relaxed);
                        }
                        tracing::warn!("command bus subscription lost; reconnecting");
                    }
                    Err(e) => {
                        drop(inner);
                        failures = failures.saturating_add(1);
                        // About 3 s of failures (the waits double from 100 ms), then every
                        // 150 tries (5 to 10 minutes).
                        if failures == 6 || failures.is_multiple_of(150) {
                            tracing::warn!(error = %e, tries = failures, "command bus cannot subscribe; call control is unavailable until it does (Redis unreachable, or its ACL refuses the channels)");
                        } else {
                            tracing::debug!(error = %e, "command bus cannot subscribe yet");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
    }
}

/// Subscribes to `channels`; with the subscription, on a Cluster, the address of the node
/// it is on (see [`listen`]).
async fn subscribe(
    inner: &Inner,
    prefix: &str,
    channels: &[String],
) -> Result<(redis::aio::PubSub, Option<String>), String> {
    let client = inner
        .store
        .pubsub_client(&format!("{prefix}events"))
        .await
        .map_err(|e| e.to_string())?;
    let home = inner
        .store
        .is_cluster()
        .then(|| crate::store::connection_address(client.get_connection_info()));
    let mut pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
        .await
        .map_err(|_| "pub/sub connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    // The client waits for SUBSCRIBE's answers without a deadline of its own: a server (or
    // a network) gone silent after the handshake would hold the bus unsubscribed until TCP
    // gave up, minutes later.
    for c in channels {
        tokio::time::timeout(
            Duration::from_secs(2),
            pubsub.subscribe(format!("{prefix}{c}")),
        )
        .await
        .map_err(|_| "SUBSCRIBE timed out".to_string())?
        .map_err(|e| e.to_string())?;
    }
    Ok((pubsub, home))
}

/// Hands on what the subscription brings until it fails, or, on a Cluster, until the
/// channels' slot is served by another node than `home` (a failover): publishers' counts
/// come from that node, so the subscription must move there.
async fn listen(
    pubsub: redis::aio::PubSub,
    home: Option<String>,
    weak: &std::sync::Weak<Inner>,
    prefix: &str,
    commands: Option<&mpsc::Sender<Command>>,
) {
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let events_channel = format!("{prefix}events");
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else { return };
                let Some(inner) = weak.upgrade() else { return };
                let payload: Vec<u8> = msg.get_payload().unwrap_or_default();
                let channel = msg.get_channel_name();
                if channel == events_channel {
                    match serde_json::from_slice::<Event>(&payload) {
                        Ok(ev) => { let _ = inner.events.send(Arc::new(ev)); }
                        Err(e) => tracing::debug!(error = %e, "undecodable conference event"),
                    }
                } else if let Some(tx) = commands {
                    match serde_json::from_slice::<Command>(&payload) {
                        Ok(mut cmd) => {
                            let now = now_ms();
                            let held = held_for(&cmd, inner.redis_clock());
                            if held.is_some_and(|ms| ms >= cmd.timeout_ms) {
                                // Its sender has reported it unanswered: nobody listens.
                                tracing::warn!(id = %cmd.id, held_ms = held, "dropping a command that reached this process after its sender gave up (this process paused, or Redis slow)");
                                continue;
                            }
                            let local = match held {
                                Some(ms) => start_by(&cmd, now, ms),
                                None => {
                                    let full = now.saturating_add(cmd.timeout_ms);
                                    if cmd.timeout_ms > 0
                                        && full.abs_diff(cmd.deadline_ms) > CLOCK_SKEW_WARNING_MS
                                    {
                                        tracing::warn!(id = %cmd.id, skew_ms = i128::from(cmd.deadline_ms) - i128::from(full), "a command's deadline is off from what its budget gives by our clock: the hosts' clocks differ (check NTP on both) or it was held on its way (this process paused, Redis or the network slow)");
                                    }
                                    local_deadline(&cmd, now)
                                }
                            };
                            cmd.deadline_ms = local;
                            // A command late by Redis's clock goes on, to be answered
                            // `timeout` (nothing done) while its sender still listens.
                            if local < now && held.is_none() {
                                tracing::debug!(id = %cmd.id, "dropping a command past its deadline");
                            } else if let Err(mpsc::error::TrySendError::Full(cmd)) = tx.try_send(cmd) {
                                // Answered `timeout` (nothing done) at once, rather than left
                                // for its sender to wait out as "may have been done".
                                match inner.refusals.clone().try_acquire_owned() {
                                    Ok(permit) => {
                                        tracing::warn!(id = %cmd.id, "command queue full; refusing a command");
                                        let bus = Bus { inner };
                                        tokio::spawn(async move {
                                            let busy = BusError::new(
                                                ErrorCode::Timeout,
                                                "the node's command queue is full; nothing was done",
                                            );
                                            bus.respond(&cmd, Err(busy)).await;
                                            drop(permit);
                                        });
                                    }
                                    Err(_) => tracing::warn!(id = %cmd.id, "command queue full and too many refusals still being published; dropping a command unanswered"),
                                }
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "undecodable command"),
                    }
                } else {
                    match serde_json::from_slice::<Reply>(&payload) {
                        Ok(reply) => deliver(&inner, reply),
                        Err(e) => tracing::debug!(error = %e, "undecodable reply"),
                    }
                }
            }
            _ = ping.tick() => {
                let alive = tokio::time::timeout(Duration::from_secs(2), sink.ping::<redis::Value>()).await;
                if !matches!(alive, Ok(Ok(_))) {
                    return;
                }
                if let (Some(home), Some(inner)) = (&home, weak.upgrade()) {
                    if let Ok(Some(now)) = inner.store.pubsub_home(&events_channel).await {
                        if &now != home {
                            tracing::info!(from = %home, to = %now, "the bus's Cluster slot moved; subscribing there");
                            inner.store.follow_slot_move();
                            return;
                        }
                    }
                }
            }
        }
    }
}

fn deliver(inner: &Inner, reply: Reply) {
    let Ok(mut pending) = inner.pending.lock() else {
        return;
    };
    let id = reply.id().to_string();
    let finished = matches!(
        &reply,
        Reply::Error { .. } | Reply::Notify { last: true, .. }
    );
    let gone = match pending.get(&id) {
        Some(tx) => tx.send(reply).is_err(),
        None => false,
    };
    if finished || gone {
        pending.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_clock_comparison_is_used_only_until_a_faster_one() {
        assert!(
            sample_used(300, None),
            "better than not knowing Redis's clock"
        );
        assert!(sample_used(200, Some((300, 0))), "a faster one replaces it");
        assert!(!sample_used(400, Some((300, 0))), "a slower one does not");
        assert!(
            !sample_used(150, Some((20, 5_000))),
            "nor does one slower than a good one"
        );
        assert!(
            sample_used(150, Some((20, CLOCK_SAMPLE_STALE_MS))),
            "unless that one is stale: a clock may have been stepped since"
        );
        assert!(
            sample_used(90, Some((20, 0))),
            "a good one always does: the clocks drift"
        );
        assert!(!sample_used(600, None), "too slow to say anything");
    }

    #[test]
    fn deadlines_count_from_receipt_whatever_the_clocks() {
        let cmd = |deadline_ms, timeout_ms| Command {
            id: "c-1".into(),
            reply_to: "x".into(),
            method: "conference.get".into(),
            params: serde_json::json!({}),
            deadline_ms,
            timeout_ms,
            sent_ms: 0,
            sent_uncertainty_ms: 0,
        };
        // The sender's clock is an hour behind ours: its deadline is long past here. The
        // command may start within the first half of its budget.
        let now = 10_000_000;
        assert_eq!(
            local_deadline(&cmd(now - 3_600_000, 5_000), now),
            now + 2_500
        );
        // An hour ahead: the command must not live an hour here either.
        assert_eq!(
            local_deadline(&cmd(now + 3_600_000, 5_000), now),
            now + 2_500
        );
        // A sender that did not give its budget: its deadline as it is.
        assert_eq!(local_deadline(&cmd(now + 10, 0), now), now + 10);
        let old: Command = serde_json::from_value(serde_json::json!({
            "id": "c-2", "reply_to": "x", "method": "m", "params": {}, "deadline_ms": 7
        }))
        .expect("a command without timeout_ms still decodes");
        assert_eq!(old.timeout_ms, 0);
        assert_eq!(old.sent_ms, 0);
    }

    #[test]
    fn a_command_held_on_its_way_keeps_the_budget_counted_from_its_sending() {
        let now = 10_000_000;
        let sent = |sent_ms| Command {
            id: "c-1".into(),
            reply_to: "x".into(),
            method: "participant.mute".into(),
            params: serde_json::json!({}),
            // Whatever the sender's own clock said: Redis's clock decides here.
            deadline_ms: 0,
            timeout_ms: 5_000,
            sent_ms,
            sent_uncertainty_ms: 0,
        };
        // Both know Redis's clock: held 1 s, 1.5 s of the first half are left.
        let held = held_for(&sent(now - 1_000), Some((now, 0)));
        assert_eq!(held, Some(1_000));
        assert_eq!(start_by(&sent(now - 1_000), now, 1_000), now + 1_500);
        // Held past the first half (a paused process): already too late to start.
        assert!(start_by(&sent(now - 3_000), now, 3_000) < now);
        // Either side not knowing Redis's clock: counted from receipt, as before.
        assert_eq!(held_for(&sent(0), Some((now, 0))), None);
        assert_eq!(held_for(&sent(now - 1_000), None), None);
        // A sender a little ahead (estimates differ by milliseconds): not held at all.
        assert_eq!(held_for(&sent(now + 3), Some((now, 0))), Some(0));
        // Comparisons that may be off: only what is certain counts as held.
        let unsure = Command {
            sent_uncertainty_ms: 150,
            ..sent(now - 1_000)
        };
        assert_eq!(held_for(&unsure, Some((now, 100))), Some(750));
        assert_eq!(held_for(&unsure, Some((now, 900))), Some(0));
    }

    #[test]
    fn wire_forms_are_stable() {
        let r = Reply::Error {
            id: "c-1".into(),
            error: BusError::new(ErrorCode::NodeUnavailable, "gone"),
        };
        assert_eq!(
            serde_json::to_value(&r).expect("encode"),
            serde_json::json!({"kind": "error", "id": "c-1", "error": {"code": "node_unavailable", "message": "gone"}})
        );
        let n: Reply = serde_json::from_value(serde_json::json!(
            {"kind": "notify", "id": "c-2", "params": {"status": "ringing"}, "last": false}
        ))
        .expect("decode");
        assert_eq!(n.id(), "c-2");
    }
}
