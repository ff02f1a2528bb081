//! The state of one simulated Asterisk, its event routing and the channel/bridge lifecycle.
//!
//! Everything a server knows sits behind one mutex ([`Core::lock`]); events are turned into JSON
//! while it is held and pushed into unbounded per-WebSocket queues, so REST handlers never wait
//! on a slow event reader and each reader sees events in the order they happened.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch, Notify};

use super::scenario::{cause_text, EndpointMatch, Outcome};
use super::time::{ari_timestamp, epoch_secs, uuid4};
use super::SimConfig;

/// Listener and connection control: a restart takes the port down and kills every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ctl {
    pub up: bool,
    pub generation: u64,
}

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// Request path without the query string.
    pub path: String,
    /// Status code answered (101 for an accepted WebSocket).
    pub status: u16,
    /// Swagger nickname of the ARI operation, when the path named one.
    pub operation: Option<String>,
}

/// Shared per-server core: configuration, the state mutex and the logs.
pub(crate) struct Core {
    pub cfg: SimConfig,
    pub asterisk_id: String,
    pub docs_dir: PathBuf,
    state: Mutex<State>,
    pub requests: Mutex<Vec<RequestRecord>>,
    pub stall_until: Mutex<Option<Instant>>,
    /// Operations whose requests wait, unhandled, until released (test-only latency).
    pub held_ops: watch::Sender<BTreeSet<String>>,
    /// How many requests of each held operation wait now.
    pub held_waiting: Mutex<HashMap<String, usize>>,
    /// Per operation ever held: its requests pass in the order they came (a fair lock
    /// taken on arrival and kept until the request has been handled).
    held_turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Channels whose far end hangs up between an `addChannel`'s checks and its queued add.
    pub hangup_during_add: Mutex<BTreeSet<String>>,
    /// Channels whose next `answer` finds them hung up once its command runs.
    pub hangup_during_answer: Mutex<BTreeSet<String>>,
    /// Channels slow to act on `DELETE /channels/{id}`, with the cause of the hangup asked
    /// for them meanwhile (test-only latency).
    pub slow_hangups: Mutex<BTreeMap<String, Option<i64>>>,
    /// Operations whose requests are lost on the way: never carried out, never answered.
    pub lost_ops: Mutex<BTreeSet<String>>,
    /// Channels whose far end refuses a transfer (a REFER answered 4xx): a redirect is
    /// carried out, and the channel stays.
    pub refused_transfers: Mutex<BTreeSet<String>>,
    /// The ARI user is `read_only` in ari.conf: requests other than GET and OPTIONS get 403.
    pub read_only: std::sync::atomic::AtomicBool,
    /// Up but not yet fully booted: every authenticated ARI request gets 503.
    pub booting: std::sync::atomic::AtomicBool,
    pub ctl: watch::Sender<Ctl>,
    pub events_changed: Notify,
    pub violations: Mutex<Vec<String>>,
    pub unsimulated: Vec<(String, String, String)>,
}

impl Core {
    pub fn new(cfg: SimConfig, asterisk_id: String, docs_dir: PathBuf) -> Arc<Core> {
        let unsimulated = super::routes::unsimulated_operations(&docs_dir);
        let (ctl, _) = watch::channel(Ctl {
            up: true,
            generation: 0,
        });
        Arc::new(Core {
            cfg,
            asterisk_id,
            docs_dir,
            state: Mutex::new(State::new()),
            requests: Mutex::new(Vec::new()),
            stall_until: Mutex::new(None),
            held_ops: watch::Sender::new(BTreeSet::new()),
            held_waiting: Mutex::new(HashMap::new()),
            held_turns: Mutex::new(HashMap::new()),
            hangup_during_add: Mutex::new(BTreeSet::new()),
            hangup_during_answer: Mutex::new(BTreeSet::new()),
            slow_hangups: Mutex::new(BTreeMap::new()),
            lost_ops: Mutex::new(BTreeSet::new()),
            refused_transfers: Mutex::new(BTreeSet::new()),
            read_only: std::sync::atomic::AtomicBool::new(false),
            booting: std::sync::atomic::AtomicBool::new(false),
            ctl,
            events_changed: Notify::new(),
            violations: Mutex::new(Vec::new()),
            unsimulated,
        })
    }

    /// Locks the server state; a poisoned lock is taken over rather than propagated.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stalled_until(&self) -> Option<Instant> {
        let g = self.stall_until.lock().unwrap_or_else(|p| p.into_inner());
        (*g).filter(|t| *t > Instant::now())
    }

    /// Waits while the server is stalled.
    pub async fn wait_stall(&self) {
        while let Some(until) = self.stalled_until() {
            tokio::time::sleep_until(until.into()).await;
        }
    }

    /// Waits while requests for `op` are held, counted among the held meanwhile. Released
    /// requests go on in the order they came, as requests queued behind one another on a
    /// channel do: a request held on arrival gets a turn to keep until it has been handled;
    /// one that was not only waits for the released ones still before it.
    pub async fn wait_held(&self, op: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let mut rx = self.held_ops.subscribe();
        let held = rx.borrow_and_update().contains(op);
        let turn = {
            let mut turns = self.held_turns.lock().unwrap_or_else(|p| p.into_inner());
            if held {
                Some(turns.entry(op.to_string()).or_default().clone())
            } else {
                turns.get(op).cloned()
            }
        }?;
        if !held {
            // Behind the released ones still on their way, holding up nobody after it.
            drop(turn.lock_owned().await);
            return None;
        }
        let waiting = || self.held_waiting.lock().unwrap_or_else(|p| p.into_inner());
        *waiting().entry(op.to_string()).or_default() += 1;
        let guard = turn.lock_owned().await;
        let _ = rx.wait_for(|h| !h.contains(op)).await;
        if let Some(n) = waiting().get_mut(op) {
            *n = n.saturating_sub(1);
        }
        Some(guard)
    }

    pub fn log_request(&self, rec: RequestRecord) {
        if self.cfg.record_requests {
            self.requests
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(rec);
        }
    }
}

/// Runs `f` on the state after `delay`, unless the server restarted or went away meanwhile.
pub(crate) fn schedule<F>(core: &Arc<Core>, epoch: u64, delay: Duration, f: F)
where
    F: FnOnce(&Arc<Core>, &mut State) + Send + 'static,
{
    let weak: Weak<Core> = Arc::downgrade(core);
    tokio::spawn(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        } else {
            tokio::task::yield_now().await;
        }
        let Some(core) = weak.upgrade() else { return };
        let mut st = core.lock();
        if st.epoch == epoch && st.up {
            f(&core, &mut st);
        }
        drop(st);
        core.events_changed.notify_waiters();
    });
}

/// `AST_SOFTHANGUP_EXPLICIT`, the reason `ast_softhangup` reports for an ARI hangup.
pub(crate) const AST_SOFTHANGUP_EXPLICIT: i64 = 1 << 5;

/// How a hangup was requested, which decides the `ChannelHangupRequest` Asterisk publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HangupRequest {
    /// The far end hung up (`ast_queue_hangup_with_cause`).
    Remote,
    /// ARI or the core asked for it (`ast_softhangup`).
    Soft,
}

/// Channel states the simulator uses (`ast_state2str` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChanState {
    Down,
    Ring,
    Ringing,
    Up,
}

impl ChanState {
    pub fn as_str(self) -> &'static str {
        match self {
            ChanState::Down => "Down",
            ChanState::Ring => "Ring",
            ChanState::Ringing => "Ringing",
            ChanState::Up => "Up",
        }
    }
}

/// What happens to an outgoing channel once its far end answers.
#[derive(Debug, Clone)]
pub(crate) enum AfterAnswer {
    /// `POST /channels?app=`: run `Stasis(app,args)`.
    Stasis { app: String, args: Vec<String> },
    /// `POST /channels?extension=`: continue in the dialplan.
    Dialplan {
        context: String,
        exten: String,
        priority: i64,
    },
    /// `POST /channels/{id}/dial`: the channel is already in Stasis.
    StayInStasis,
}

#[derive(Debug, Clone)]
pub(crate) struct Dialing {
    pub after: AfterAnswer,
    pub token: u64,
    pub caller: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct StasisInfo {
    pub app: String,
    pub args: Vec<String>,
}

pub(crate) struct Channel {
    pub id: String,
    pub name: String,
    pub protocol_id: String,
    pub tech: String,
    pub resource: String,
    pub state: ChanState,
    pub caller_name: String,
    pub caller_number: String,
    pub connected_name: String,
    pub connected_number: String,
    pub accountcode: String,
    pub context: String,
    pub exten: String,
    pub priority: i64,
    pub appl: String,
    pub data: String,
    pub created: SystemTime,
    pub seq: u64,
    pub language: String,
    pub vars: BTreeMap<String, String>,
    pub sip_headers: BTreeMap<String, String>,
    pub stasis: Option<StasisInfo>,
    pub bridge: Option<String>,
    pub role: Option<String>,
    pub bridge_mute: bool,
    pub absorb_dtmf: bool,
    pub mute_in: bool,
    pub mute_out: bool,
    pub held: bool,
    pub moh: Option<String>,
    pub ringing: bool,
    pub early_media: bool,
    pub silence: bool,
    pub dtmf_sent: String,
    pub dialing: Option<Dialing>,
    pub dialstring: Option<String>,
    pub originated: bool,
    pub recording: Option<String>,
    pub redirected_to: Option<String>,
    /// A REFER of a `redirect` is under way: `ast_transfer` (main/channel.c) reads the
    /// channel until the transfer's result or its hangup, holding its command queue.
    pub transferring: bool,
    /// Its Stasis control is done (`control_mark_done`: a `continue` ran, or it hung up):
    /// the commands already queued still run, later ones are refused, and it leaves Stasis
    /// once its queue is empty.
    pub control_done: bool,
    /// Hung up while its queue drains: waited-for commands fail.
    pub hung_up: bool,
    /// Where a `move` sends it once its queue is empty (`control->next_app`): the last
    /// move's app, every move's arguments.
    pub next_app: Option<(String, Vec<String>)>,
}

pub(crate) struct Bridge {
    pub id: String,
    pub name: String,
    pub holding: bool,
    pub dtmf_events: bool,
    pub proxy_media: bool,
    pub video_mode: &'static str,
    pub types: String,
    pub created: SystemTime,
    pub seq: u64,
    pub channels: Vec<String>,
    pub moh: Option<String>,
    pub recording: Option<String>,
    /// Destroyed through ARI and on its way out: no longer a Stasis bridge, still listed.
    pub dissolving: bool,
    /// Its announcer channel exists (made by its first `play`, kept for later ones).
    pub announcer: bool,
}

impl Bridge {
    /// Technology a smart stasis bridge would pick for its current members.
    pub fn technology(&self) -> &'static str {
        if self.holding {
            return "holding_bridge";
        }
        match self.channels.len() {
            0 | 1 => "simple_bridge",
            2 if self.dtmf_events || self.proxy_media => "simple_bridge",
            2 => "native_rtp",
            _ => "softmix",
        }
    }
}

#[derive(Default)]
pub(crate) struct App {
    pub session: Option<u64>,
    pub subscribe_all: bool,
    pub channels: HashMap<String, u32>,
    pub bridges: HashMap<String, u32>,
    pub endpoints: HashMap<String, u32>,
    pub devices: HashMap<String, u32>,
}

impl App {
    fn finished(&self) -> bool {
        self.session.is_none()
            && self.channels.is_empty()
            && self.bridges.is_empty()
            && self.endpoints.is_empty()
            && self.devices.is_empty()
    }
}

/// Commands for a WebSocket writer task.
#[derive(Debug)]
pub(crate) enum WsCmd {
    Text(String),
    Drop,
    /// The link dies without a word (a half-open TCP connection): nothing more is written
    /// or read, pongs included, while Asterisk still counts the app as subscribed.
    Freeze,
}

pub(crate) struct Session {
    pub apps: Vec<String>,
    pub tx: mpsc::UnboundedSender<WsCmd>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Channel(String),
    Bridge(String),
}

impl Target {
    pub fn uri(&self) -> String {
        match self {
            Target::Channel(c) => format!("channel:{c}"),
            Target::Bridge(b) => format!("bridge:{b}"),
        }
    }
}

pub(crate) struct Playback {
    pub id: String,
    pub media: Vec<String>,
    pub index: usize,
    pub target: Target,
    pub language: String,
    pub state: &'static str,
    /// Order of creation: a target plays its playbacks one after another, in this order.
    pub seq: u64,
    /// Stopped while queued (`playback_cancel`): it ends, unplayed, when its turn comes.
    pub canceled: bool,
    /// Once an item of it could be stopped (a sound, a recording, a tone), it can be for the
    /// rest of its items too (`play_on_channel` never clears the flag).
    pub controllable: bool,
}

pub(crate) struct Recording {
    pub name: String,
    pub format: String,
    pub target: Target,
    pub state: &'static str,
    pub started: Option<Instant>,
    pub token: u64,
    /// A channel recording under way holds its channel's command queue.
    pub running: bool,
}

/// An event before it is addressed to applications.
pub(crate) struct Ev {
    pub ty: &'static str,
    pub body: Map<String, Value>,
    pub channels: Vec<String>,
    pub bridges: Vec<String>,
    pub endpoints: Vec<String>,
    pub to_app: Option<String>,
}

impl Ev {
    pub fn new(ty: &'static str) -> Ev {
        Ev {
            ty,
            body: Map::new(),
            channels: Vec::new(),
            bridges: Vec::new(),
            endpoints: Vec::new(),
            to_app: None,
        }
    }

    pub fn with(mut self, key: &str, v: Value) -> Ev {
        self.body.insert(key.to_string(), v);
        self
    }
}

/// Everything one simulated Asterisk knows.
pub(crate) struct State {
    pub epoch: u64,
    pub up: bool,
    pub startup: SystemTime,
    pub last_reload: SystemTime,
    seq: u64,
    name_seq: u64,
    pub channels: HashMap<String, Channel>,
    pub bridges: HashMap<String, Bridge>,
    pub apps: HashMap<String, App>,
    pub sessions: HashMap<u64, Session>,
    pub playbacks: HashMap<String, Playback>,
    pub recordings: HashMap<String, Recording>,
    pub globals: HashMap<String, String>,
    pub behaviors: Vec<(EndpointMatch, Outcome)>,
    pub event_log: Vec<Value>,
    /// Channel commands waiting their turn behind a playback, a recording or earlier
    /// commands on their channel.
    queued_commands: Vec<QueuedCommand>,
}

/// What an asynchronous channel command does once its turn comes.
pub(crate) type CommandEffect = Box<dyn FnOnce(&Arc<Core>, &mut State) + Send>;

/// The next entry of a channel's or bridge's queue.
enum QueueHead {
    /// The queued command at this index of `queued_commands`.
    Command(usize),
    /// The queued playback with this id.
    Playback(String),
}

/// An asynchronous channel command (`stasis_app_send_command_async`) in its channel's queue.
struct QueuedCommand {
    channel: String,
    /// Its place in the queue, among the channel's playbacks.
    seq: u64,
    effect: CommandEffect,
}

impl State {
    fn new() -> State {
        let now = SystemTime::now();
        State {
            epoch: 0,
            up: true,
            startup: now,
            last_reload: now,
            seq: 0,
            name_seq: 0,
            channels: HashMap::new(),
            bridges: HashMap::new(),
            apps: HashMap::new(),
            sessions: HashMap::new(),
            playbacks: HashMap::new(),
            recordings: HashMap::new(),
            globals: HashMap::new(),
            behaviors: Vec::new(),
            event_log: Vec::new(),
            queued_commands: Vec::new(),
        }
    }

    /// Runs an asynchronous channel command (mute, hold, music on hold, DTMF,
    /// setChannelVar, redirect, ...) as Asterisk does: through the channel's command queue,
    /// which a playback or a recording on the channel holds until it ends (control.c
    /// `exec_command`, res_stasis_playback.c `play_uri`). Asterisk answers such a request at
    /// once; its effect comes when its turn does, or never if the channel leaves Stasis
    /// first. A control that is done (a `continue` ran, or the channel hung up) refuses it:
    /// false, and `effect` is dropped.
    pub fn run_channel_command(
        core: &Arc<Core>,
        st: &mut State,
        channel: &str,
        effect: impl FnOnce(&Arc<Core>, &mut State) + Send + 'static,
    ) -> bool {
        // `stasis_app_send_command_async` refuses commands once the control is done.
        if !st
            .channels
            .get(channel)
            .is_some_and(|c| c.stasis.is_some() && !c.control_done)
        {
            return false;
        }
        if !st.channel_busy(channel) {
            effect(core, st);
            Self::end_of_pass(core, st, channel);
            return true;
        }
        let seq = st.next_seq();
        st.queued_commands.push(QueuedCommand {
            channel: channel.to_string(),
            seq,
            effect: Box::new(effect),
        });
        true
    }

    /// Whether the channel's thread is busy: a playback or recording of its own under way or
    /// waiting, or commands queued.
    fn channel_busy(&self, channel: &str) -> bool {
        let target = Target::Channel(channel.to_string());
        self.playbacks.values().any(|p| p.target == target)
            || self
                .recordings
                .values()
                .any(|r| r.target == target && r.running)
            || self.queued_commands.iter().any(|c| c.channel == channel)
            || self.channels.get(channel).is_some_and(|c| c.transferring)
    }

    /// The end of a dispatch pass (`control_dispatch_all` found the queue empty): a channel
    /// whose control is done leaves Stasis; one with a move pending moves
    /// (`stasis_app_exec`'s loop checks both only between passes).
    fn end_of_pass(core: &Arc<Core>, st: &mut State, channel: &str) {
        if st.channel_busy(channel) {
            return;
        }
        let Some(ch) = st.channels.get_mut(channel) else {
            return;
        };
        if ch.stasis.is_none() {
            return;
        }
        if ch.control_done {
            ch.next_app = None;
            st.leave_stasis(core, channel);
        } else if let Some((app, args)) = ch.next_app.take() {
            super::ops::move_to_app(core, st, channel, app, args);
        }
    }

    /// Queues a synchronous channel command (`app_send_command`: answer, addChannel,
    /// removeChannel) in the channel's queue as [`State::run_channel_command`] does; the
    /// request waits on the receiver for what `effect` gave. A channel that has left
    /// Stasis, or leaves before the command's turn, completes it with failure: the
    /// receiver then gives an error.
    pub fn call_channel_command<T: Send + 'static>(
        core: &Arc<Core>,
        st: &mut State,
        channel: &str,
        effect: impl FnOnce(&Arc<Core>, &mut State) -> T + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = channel.to_string();
        // Refused, the sender is dropped with the effect: the command failed.
        let _ = Self::run_channel_command(core, st, channel, move |core, st| {
            // On a channel hung up while its queue drains, the command fails.
            if !st.channels.get(&id).is_some_and(|c| c.hung_up) {
                let _ = tx.send(effect(core, st));
            }
        });
        rx
    }

    /// Drops the queued commands of a channel that left Stasis or is gone
    /// (`control_flush_queue`: nothing runs them).
    fn flush_commands(&mut self, channel: &str) {
        self.queued_commands.retain(|c| c.channel != channel);
        // A flushed `record_file` command's data destructor (`recording_cleanup`) drops its
        // recording without a word.
        let target = Target::Channel(channel.to_string());
        let before = self.recordings.len();
        self.recordings
            .retain(|_, r| r.target != target || r.running);
        if self.recordings.len() != before {
            let kept = self.recordings.values().any(|r| r.target == target);
            if let Some(ch) = self.channels.get_mut(channel).filter(|_| !kept) {
                ch.recording = None;
            }
        }
    }

    /// Forgets everything, as an Asterisk process that died would; originate behaviours stay.
    pub fn crash(&mut self) {
        for (_, s) in self.sessions.drain() {
            let _ = s.tx.send(WsCmd::Drop);
        }
        self.channels.clear();
        self.bridges.clear();
        self.apps.clear();
        self.playbacks.clear();
        self.recordings.clear();
        self.globals.clear();
        self.queued_commands.clear();
        self.epoch += 1;
        self.up = false;
    }

    pub fn boot(&mut self) {
        let now = SystemTime::now();
        self.startup = now;
        self.last_reload = now;
        self.up = true;
    }

    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    // ----- JSON models -----

    pub fn channel_json(&self, core: &Core, ch: &Channel) -> Value {
        let mut v = json!({
            "id": ch.id,
            "name": ch.name,
            "state": ch.state.as_str(),
            "protocol_id": ch.protocol_id,
            "caller": {"name": ch.caller_name, "number": ch.caller_number},
            "connected": {"name": ch.connected_name, "number": ch.connected_number},
            "accountcode": ch.accountcode,
            "dialplan": {
                "context": ch.context,
                "exten": ch.exten,
                "priority": ch.priority,
                "app_name": ch.appl,
                "app_data": ch.data,
            },
            "creationtime": ari_timestamp(ch.created),
            "language": ch.language,
        });
        if !core.cfg.channelvars.is_empty() {
            let vars: Map<String, Value> = core
                .cfg
                .channelvars
                .iter()
                .map(|name| {
                    let val = read_variable(ch, name, &self.globals)
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    (name.clone(), Value::String(val))
                })
                .collect();
            if let Some(o) = v.as_object_mut() {
                o.insert("channelvars".into(), Value::Object(vars));
            }
        }
        v
    }

    pub fn chan_json(&self, core: &Core, id: &str) -> Value {
        self.channels
            .get(id)
            .map(|c| self.channel_json(core, c))
            .unwrap_or(Value::Null)
    }

    pub fn bridge_json(&self, b: &Bridge) -> Value {
        json!({
            "id": b.id,
            "technology": b.technology(),
            "bridge_type": if b.holding { "holding" } else { "mixing" },
            "bridge_class": "stasis",
            "creator": "Stasis",
            "name": b.name,
            "channels": b.channels,
            "video_mode": b.video_mode,
            "creationtime": ari_timestamp(b.created),
        })
    }

    pub fn brg_json(&self, id: &str) -> Value {
        self.bridges
            .get(id)
            .map(|b| self.bridge_json(b))
            .unwrap_or(Value::Null)
    }

    pub fn playback_json(pb: &Playback) -> Value {
        // Taken up but not playing yet is still queued to a client.
        let state = if pb.state == "starting" {
            "queued"
        } else {
            pb.state
        };
        let mut v = json!({
            "id": pb.id,
            "media_uri": pb.media.get(pb.index).cloned().unwrap_or_default(),
            "target_uri": pb.target.uri(),
            "language": pb.language,
            "state": state,
        });
        if let (Some(next), Some(o)) = (pb.media.get(pb.index + 1), v.as_object_mut()) {
            o.insert("next_media_uri".into(), Value::String(next.clone()));
        }
        v
    }

    pub fn recording_json(rec: &Recording) -> Value {
        let mut v = json!({
            "name": rec.name,
            "format": rec.format,
            "state": rec.state,
            "target_uri": rec.target.uri(),
        });
        // `duration` once `ast_play_and_record_full` has measured one.
        if rec.started.is_some() && (rec.state == "done" || rec.state == "canceled") {
            let secs = rec.started.map(|s| s.elapsed().as_secs()).unwrap_or(0);
            if let Some(o) = v.as_object_mut() {
                o.insert("duration".into(), json!(secs));
                o.insert("talking_duration".into(), json!(secs));
                o.insert("silence_duration".into(), json!(0));
            }
        }
        v
    }

    pub fn app_json(&self, name: &str) -> Option<Value> {
        let app = self.apps.get(name)?;
        let keys = |m: &HashMap<String, u32>| {
            let mut v: Vec<&String> = m.keys().collect();
            v.sort();
            v.into_iter().cloned().collect::<Vec<_>>()
        };
        Some(json!({
            "name": name,
            "channel_ids": keys(&app.channels),
            "bridge_ids": keys(&app.bridges),
            "endpoint_ids": keys(&app.endpoints),
            "device_names": keys(&app.devices),
            "events_allowed": [],
            "events_disallowed": [],
        }))
    }

    // ----- events -----

    /// Addresses `ev` to every application subscribed to what it is about and queues it.
    pub fn emit(&mut self, core: &Core, ev: Ev) {
        let mut recipients: Vec<(String, u64)> = Vec::new();
        match &ev.to_app {
            Some(app) => {
                if let Some(sid) = self.apps.get(app).and_then(|a| a.session) {
                    recipients.push((app.clone(), sid));
                }
            }
            None => {
                for (name, app) in &self.apps {
                    let Some(sid) = app.session else { continue };
                    let wanted = app.subscribe_all
                        || ev.channels.iter().any(|c| app.channels.contains_key(c))
                        || ev.bridges.iter().any(|b| app.bridges.contains_key(b))
                        || ev.endpoints.iter().any(|e| app.endpoints.contains_key(e));
                    if wanted {
                        recipients.push((name.clone(), sid));
                    }
                }
                recipients.sort();
            }
        }
        if recipients.is_empty() {
            return;
        }
        let timestamp = Value::String(ari_timestamp(SystemTime::now()));
        for (app, sid) in recipients {
            let mut body = ev.body.clone();
            body.insert("type".into(), Value::String(ev.ty.to_string()));
            body.insert("timestamp".into(), timestamp.clone());
            body.insert("application".into(), Value::String(app));
            body.insert(
                "asterisk_id".into(),
                Value::String(core.asterisk_id.clone()),
            );
            let v = Value::Object(body);
            if let Some(s) = self.sessions.get(&sid) {
                let _ = s.tx.send(WsCmd::Text(v.to_string()));
            }
            if core.cfg.record_events {
                self.event_log.push(v);
            }
        }
    }

    /// An event about channel `id`, carrying its snapshot under `channel`.
    pub fn chan_ev(&self, core: &Core, ty: &'static str, id: &str) -> Ev {
        let mut ev = Ev::new(ty).with("channel", self.chan_json(core, id));
        ev.channels.push(id.to_string());
        if let Some(ch) = self.channels.get(id) {
            ev.endpoints.push(format!("{}/{}", ch.tech, ch.resource));
            ev.endpoints.push(ch.tech.clone());
        }
        ev
    }

    pub fn emit_chan(&mut self, core: &Core, ty: &'static str, id: &str) {
        let ev = self.chan_ev(core, ty, id);
        self.emit(core, ev);
    }

    // ----- subscriptions -----

    pub fn sub_channel(&mut self, app: &str, id: &str) {
        if let Some(a) = self.apps.get_mut(app) {
            *a.channels.entry(id.to_string()).or_insert(0) += 1;
        }
    }

    pub fn unsub_channel(&mut self, app: &str, id: &str) {
        if let Some(a) = self.apps.get_mut(app) {
            if let Some(n) = a.channels.get_mut(id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    a.channels.remove(id);
                }
            }
        }
        self.reap_app(app);
    }

    pub fn sub_bridge(&mut self, app: &str, id: &str) {
        if let Some(a) = self.apps.get_mut(app) {
            *a.bridges.entry(id.to_string()).or_insert(0) += 1;
        }
    }

    pub fn unsub_bridge(&mut self, app: &str, id: &str) {
        if let Some(a) = self.apps.get_mut(app) {
            if let Some(n) = a.bridges.get_mut(id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    a.bridges.remove(id);
                }
            }
        }
        self.reap_app(app);
    }

    /// Drops an application that has no WebSocket and nothing it follows (`app_is_finished`).
    pub fn reap_app(&mut self, app: &str) {
        if self.apps.get(app).is_some_and(App::finished) {
            self.apps.remove(app);
        }
    }

    // ----- WebSocket sessions -----

    /// Registers `apps` for a new WebSocket; an app already on another socket is taken over.
    pub fn open_session(
        &mut self,
        core: &Core,
        sid: u64,
        apps: &[String],
        subscribe_all: bool,
        tx: mpsc::UnboundedSender<WsCmd>,
    ) {
        for name in apps {
            let previous = self.apps.get(name).and_then(|a| a.session);
            if let Some(old) = previous.filter(|old| *old != sid) {
                let mut ev = Ev::new("ApplicationReplaced");
                ev.to_app = Some(name.clone());
                self.emit(core, ev);
                if let Some(s) = self.sessions.get_mut(&old) {
                    s.apps.retain(|a| a != name);
                }
            }
            let app = self.apps.entry(name.clone()).or_default();
            app.session = Some(sid);
            app.subscribe_all = subscribe_all;
        }
        self.sessions.insert(
            sid,
            Session {
                apps: apps.to_vec(),
                tx,
            },
        );
    }

    /// Deactivates the apps of a closed WebSocket; channels stay in their Stasis apps.
    pub fn close_session(&mut self, sid: u64) {
        let Some(s) = self.sessions.remove(&sid) else {
            return;
        };
        for name in s.apps {
            if let Some(app) = self.apps.get_mut(&name) {
                if app.session == Some(sid) {
                    app.session = None;
                    app.subscribe_all = false;
                }
            }
            self.reap_app(&name);
        }
    }

    pub fn app_active(&self, app: &str) -> bool {
        self.apps.get(app).is_some_and(|a| a.session.is_some())
    }

    // ----- channel lifecycle -----

    /// Creates a channel and announces it (`ChannelCreated`, seen only by applications already
    /// following its endpoint or everything).
    pub fn new_channel(
        &mut self,
        core: &Core,
        id: Option<String>,
        tech: &str,
        resource: &str,
        state: ChanState,
        language: &str,
    ) -> String {
        self.new_channel_with(core, id, tech, resource, state, language, |_| {})
    }

    /// [`State::new_channel`], with `init` filling in details before the channel is announced.
    #[allow(clippy::too_many_arguments)]
    pub fn new_channel_with<F: FnOnce(&mut Channel)>(
        &mut self,
        core: &Core,
        id: Option<String>,
        tech: &str,
        resource: &str,
        state: ChanState,
        language: &str,
        init: F,
    ) -> String {
        let seq = self.next_seq();
        self.name_seq += 1;
        let now = SystemTime::now();
        let id = id.unwrap_or_else(|| {
            if core.cfg.system_name.is_empty() {
                format!("{}.{}", epoch_secs(now), seq)
            } else {
                format!("{}-{}.{}", core.cfg.system_name, epoch_secs(now), seq)
            }
        });
        let peer = resource.split('@').next().unwrap_or(resource);
        let name = format!("{tech}/{peer}-{:08x}", self.name_seq);
        let protocol_id = if tech.eq_ignore_ascii_case("PJSIP") {
            uuid4()
        } else {
            String::new()
        };
        self.channels.insert(
            id.clone(),
            Channel {
                id: id.clone(),
                name,
                protocol_id,
                tech: tech.to_string(),
                resource: resource.to_string(),
                state,
                caller_name: String::new(),
                caller_number: String::new(),
                connected_name: String::new(),
                connected_number: String::new(),
                accountcode: String::new(),
                context: "default".into(),
                exten: "s".into(),
                priority: 1,
                appl: String::new(),
                data: String::new(),
                created: now,
                seq,
                language: language.to_string(),
                vars: BTreeMap::new(),
                sip_headers: BTreeMap::new(),
                stasis: None,
                bridge: None,
                role: None,
                bridge_mute: false,
                absorb_dtmf: false,
                mute_in: false,
                mute_out: false,
                held: false,
                moh: None,
                ringing: false,
                early_media: false,
                silence: false,
                control_done: false,
                hung_up: false,
                next_app: None,
                dtmf_sent: String::new(),
                dialing: None,
                dialstring: None,
                originated: false,
                recording: None,
                redirected_to: None,
                transferring: false,
            },
        );
        if let Some(ch) = self.channels.get_mut(&id) {
            init(ch);
        }
        self.emit_chan(core, "ChannelCreated", &id);
        id
    }

    pub fn set_state(&mut self, core: &Core, id: &str, state: ChanState) {
        let Some(ch) = self.channels.get_mut(id) else {
            return;
        };
        if ch.state == state {
            return;
        }
        ch.state = state;
        self.emit_chan(core, "ChannelStateChange", id);
    }

    /// Sets a channel variable and publishes `ChannelVarset`, as `pbx_builtin_setvar_helper` does.
    pub fn set_var(&mut self, core: &Core, id: &str, name: &str, value: &str) {
        let Some(ch) = self.channels.get_mut(id) else {
            return;
        };
        ch.vars.insert(name.to_string(), value.to_string());
        let ev = self
            .chan_ev(core, "ChannelVarset", id)
            .with("variable", json!(name))
            .with("value", json!(value));
        self.emit(core, ev);
    }

    /// The channel starts running a dialplan application (publishes `ChannelDialplan`).
    pub fn set_app(&mut self, core: &Core, id: &str, appl: &str, data: &str) {
        let Some(ch) = self.channels.get_mut(id) else {
            return;
        };
        ch.appl = appl.to_string();
        ch.data = data.to_string();
        let ev = self
            .chan_ev(core, "ChannelDialplan", id)
            .with("dialplan_app", json!(appl))
            .with("dialplan_app_data", json!(data));
        self.emit(core, ev);
    }

    /// Runs `Stasis(app,args)` on the channel; false when the app is not registered and active.
    pub fn enter_stasis(&mut self, core: &Core, id: &str, app: &str, args: Vec<String>) -> bool {
        if !self.app_active(app) || !self.channels.contains_key(id) {
            return false;
        }
        if let Some(ch) = self.channels.get_mut(id) {
            ch.stasis = Some(StasisInfo {
                app: app.to_string(),
                args: args.clone(),
            });
            ch.control_done = false;
            ch.next_app = None;
        }
        let mut ev = self
            .chan_ev(core, "StasisStart", id)
            .with("args", json!(args));
        ev.to_app = Some(app.to_string());
        self.emit(core, ev);
        self.sub_channel(app, id);
        true
    }

    /// The channel leaves its Stasis app: out of its bridge, `StasisEnd`, then `STASISSTATUS`.
    pub fn leave_stasis(&mut self, core: &Core, id: &str) {
        let Some(ch) = self.channels.get(id) else {
            return;
        };
        let Some(info) = ch.stasis.clone() else {
            return;
        };
        let bridge = ch.bridge.clone();
        self.flush_commands(id);
        if let Some(bid) = bridge {
            self.bridge_remove(core, &bid, id, Leave::LeftStasis);
        }
        if let Some(ch) = self.channels.get_mut(id) {
            ch.stasis = None;
        }
        self.unsub_channel(&info.app, id);
        let mut ev = self.chan_ev(core, "StasisEnd", id);
        ev.to_app = Some(info.app.clone());
        self.emit(core, ev);
        self.set_var(core, id, "STASISSTATUS", "SUCCESS");
    }

    /// Hangs a channel up with Q.850 `cause`: optional `ChannelHangupRequest`, media stops,
    /// Stasis ends, `ChannelDestroyed`.
    pub fn hangup(
        &mut self,
        core: &Arc<Core>,
        id: &str,
        cause: i64,
        request: Option<HangupRequest>,
    ) {
        if !self.channels.contains_key(id) {
            return;
        }
        match request {
            // ast_queue_hangup_with_cause: the far end's cause.
            Some(HangupRequest::Remote) => {
                let ev = self
                    .chan_ev(core, "ChannelHangupRequest", id)
                    .with("cause", json!(cause));
                self.emit(core, ev);
            }
            // ast_softhangup: the blob's cause is the soft hangup reason flag, not Q.850.
            Some(HangupRequest::Soft) => {
                let ev = self
                    .chan_ev(core, "ChannelHangupRequest", id)
                    .with("cause", json!(AST_SOFTHANGUP_EXPLICIT))
                    .with("soft", json!(true));
                self.emit(core, ev);
            }
            None => {}
        }
        // A channel still being dialled reads no frame once hung up: the dialler publishes
        // the Dial status its cause maps to, then hangs it up (monitor_dial and
        // ast_hangup_cause_to_dial_status in main/dial.c).
        if let Some(d) = self.channels.get_mut(id).and_then(|c| c.dialing.take()) {
            let ev = self.dial_ev(core, id, dial_status_of(cause), d.caller.as_deref());
            self.emit(core, ev);
        }
        self.drain_after_hangup(core, id);
        self.flush_commands(id);
        let target = Target::Channel(id.to_string());
        let pbs: Vec<String> = self
            .playbacks
            .values()
            .filter(|p| p.target == target)
            .map(|p| p.id.clone())
            .collect();
        for pb in pbs {
            self.finish_playback(core, &pb, "done");
        }
        if let Some(rec) = self.channels.get(id).and_then(|c| c.recording.clone()) {
            self.finish_recording(core, &rec, "done");
        }
        self.leave_stasis(core, id);
        let ev = self
            .chan_ev(core, "ChannelDestroyed", id)
            .with("cause", json!(cause))
            .with("cause_txt", json!(cause_text(cause)));
        self.emit(core, ev);
        self.channels.remove(id);
        let apps: Vec<String> = self
            .apps
            .iter()
            .filter(|(_, a)| a.channels.contains_key(id))
            .map(|(n, _)| n.clone())
            .collect();
        for app in apps {
            if let Some(a) = self.apps.get_mut(&app) {
                a.channels.remove(id);
            }
            self.reap_app(&app);
        }
    }

    /// A hangup does not stop the dispatch pass under way (`control_dispatch_all` checks for
    /// none): the media on the channel ends (a playback `failed`, a recording `done`), then
    /// every command already queued runs on the hung-up channel in turn. A queued playback
    /// starts and fails at once, a queued recording starts and finishes, waited-for commands
    /// fail, and the rest (a setChannelVar's `ChannelVarset`) happen. Stasis ends after.
    fn drain_after_hangup(&mut self, core: &Arc<Core>, id: &str) {
        let Some(ch) = self.channels.get_mut(id) else {
            return;
        };
        if ch.stasis.is_none() {
            return;
        }
        ch.hung_up = true;
        ch.control_done = true;
        let target = Target::Channel(id.to_string());
        let playing: Vec<String> = self
            .playbacks
            .values()
            .filter(|p| p.target == target && p.state != "queued")
            .map(|p| p.id.clone())
            .collect();
        for pb in playing {
            // Taken up, its PlaybackStarted not out yet: it starts, then fails, as a queued one.
            if self
                .playbacks
                .get(&pb)
                .is_some_and(|p| p.state == "starting")
            {
                self.fail_unplayed(core, &target, &pb);
            } else {
                self.finish_playback(core, &pb, "failed");
            }
        }
        self.finish_running_recording(core, &target);
        while let Some(head) = self.queue_head(&target) {
            match head {
                QueueHead::Command(i) => {
                    let q = self.queued_commands.remove(i);
                    (q.effect)(core, self);
                    self.finish_running_recording(core, &target);
                }
                QueueHead::Playback(pb) => self.fail_unplayed(core, &target, &pb),
            }
        }
    }

    /// A playback whose turn comes on a hung-up channel: `PlaybackStarted`, then it fails at
    /// once (`play_on_channel`); one stopped while it waited only finishes.
    fn fail_unplayed(&mut self, core: &Core, target: &Target, pb: &str) {
        let canceled = self.playbacks.get(pb).is_some_and(|p| p.canceled);
        if let Some(p) = self.playbacks.get_mut(pb) {
            p.state = if canceled { "starting" } else { "playing" };
        }
        if !canceled {
            if let Some(p) = self.playbacks.get(pb) {
                let v = Self::playback_json(p);
                let ev = self
                    .target_ev(core, "PlaybackStarted", target)
                    .with("playback", v);
                self.emit(core, ev);
            }
        }
        self.finish_playback(core, pb, if canceled { "done" } else { "failed" });
    }

    /// A channel recording a drained command started on a hung-up channel records nothing:
    /// `RecordingStarted`, then `RecordingFinished`.
    fn finish_running_recording(&mut self, core: &Core, target: &Target) {
        let running: Vec<String> = self
            .recordings
            .values()
            .filter(|r| &r.target == target && r.running)
            .map(|r| r.name.clone())
            .collect();
        for name in running {
            if let Some(rec) = self
                .recordings
                .get_mut(&name)
                .filter(|r| r.state != "recording")
            {
                rec.state = "recording";
                rec.started = Some(Instant::now());
                let v = Self::recording_json(rec);
                let ev = self
                    .target_ev(core, "RecordingStarted", target)
                    .with("recording", v);
                self.emit(core, ev);
            }
            self.finish_recording(core, &name, "done");
        }
    }

    /// Whether a DTMF digit from the caller reaches the core (a native RTP bridge carries it past).
    pub fn dtmf_visible(&self, id: &str) -> bool {
        let Some(ch) = self.channels.get(id) else {
            return false;
        };
        match ch.bridge.as_ref().and_then(|b| self.bridges.get(b)) {
            Some(b) => b.technology() != "native_rtp",
            None => true,
        }
    }

    // ----- bridges -----

    /// Puts a Stasis channel into a bridge, leaving any bridge it was in.
    pub fn bridge_add(
        &mut self,
        core: &Core,
        bid: &str,
        cid: &str,
        role: Option<String>,
        mute: bool,
        absorb: bool,
    ) {
        let Some(ch) = self.channels.get(cid) else {
            return;
        };
        let app = ch.stasis.as_ref().map(|s| s.app.clone());
        // `control_add_channel_to_bridge` departs the channel's current Stasis bridge first,
        // the one it is added to included, then imparts it again with the new features.
        if let Some(old) = ch.bridge.clone() {
            self.bridge_remove(core, &old, cid, Leave::Moved);
        }
        // The bridge was found when the request came; one dissolved since refuses the
        // impart (`bridge_channel_internal_push`), and the channel, departed from its own
        // bridge all the same, is left in none. The request still answers 204.
        let Some(b) = self.bridges.get_mut(bid).filter(|b| !b.dissolving) else {
            return;
        };
        b.channels.push(cid.to_string());
        let default_role = b.holding.then(|| "participant".to_string());
        if let Some(app) = &app {
            self.sub_bridge(app, bid);
        }
        if let Some(ch) = self.channels.get_mut(cid) {
            ch.bridge = Some(bid.to_string());
            ch.role = role.or(default_role);
            ch.bridge_mute = mute;
            ch.absorb_dtmf = absorb;
        }
        let mut ev = self
            .chan_ev(core, "ChannelEnteredBridge", cid)
            .with("bridge", self.brg_json(bid));
        Self::bridge_topic_only(&mut ev, bid);
        self.emit(core, ev);
    }

    /// Routes a bridge enter or leave event as Asterisk publishes it: to the bridge's topic
    /// alone (`ast_bridge_publish_enter`/`_leave` in main/stasis_bridges.c), so it reaches
    /// apps that follow the bridge, not those that follow only the channel or its endpoint.
    fn bridge_topic_only(ev: &mut Ev, bid: &str) {
        ev.channels.clear();
        ev.endpoints.clear();
        ev.bridges.push(bid.to_string());
    }

    /// Takes a channel out of a bridge (`ChannelLeftBridge`); `unsubscribe` drops its app's interest.
    pub fn bridge_remove(&mut self, core: &Core, bid: &str, cid: &str, how: Leave) {
        let Some(b) = self.bridges.get_mut(bid) else {
            return;
        };
        let before = b.channels.len();
        b.channels.retain(|c| c != cid);
        if b.channels.len() == before {
            return;
        }
        // The bridge's music and recording are channels of their own (an Announcer and a
        // Recorder) pushed with AST_BRIDGE_CHANNEL_FLAG_LONELY (`bridge_moh_create` in
        // res_stasis.c, `ast_ari_bridges_record`): when the last other member leaves,
        // `bridge_channel_dissolve_check` (main/bridge.c) makes them leave too. The music is
        // forgotten with its channel (`moh_after_bridge_cb`) and the recording ends. A channel
        // added again to the bridge it is in departs it first, so that counts as leaving.
        let emptied = b.channels.is_empty();
        let rec = if emptied {
            b.moh = None;
            b.recording.clone()
        } else {
            None
        };
        let app = match self.channels.get_mut(cid) {
            Some(ch) => {
                ch.bridge = None;
                ch.role = None;
                ch.stasis.as_ref().map(|s| s.app.clone())
            }
            None => None,
        };
        let mut ev = self
            .chan_ev(core, "ChannelLeftBridge", cid)
            .with("bridge", self.brg_json(bid));
        Self::bridge_topic_only(&mut ev, bid);
        self.emit(core, ev);
        // A member moved to another bridge (or removed) stays in Stasis: the app's bridge
        // subscription through it is dropped as it leaves (`internal_bridge_after_cb` in
        // res/stasis/control.c, then the `stasis_app_exec` loop in res_stasis.c), before the
        // lonely Recorder leaves, so the recording's end reaches only apps that follow the
        // bridge otherwise (`POST /applications/{app}/subscribe`). One that left Stasis
        // (hung up) keeps it until after: the loop ends before its unsubscribe.
        let in_stasis = !matches!(how, Leave::LeftStasis);
        let unsubscribe = !matches!(how, Leave::Destroyed);
        if unsubscribe && in_stasis {
            if let Some(app) = &app {
                self.unsub_bridge(app, bid);
            }
        }
        if let Some(rec) = rec {
            self.finish_recording(core, &rec, "done");
        }
        if unsubscribe && !in_stasis {
            if let Some(app) = app {
                self.unsub_bridge(&app, bid);
            }
        }
    }

    /// Destroys a bridge: members leave it (they stay in Stasis), then `BridgeDestroyed`.
    pub fn bridge_destroy(&mut self, core: &Core, bid: &str) {
        let Some(b) = self.bridges.get(bid) else {
            return;
        };
        let members = b.channels.clone();
        let rec = b.recording.clone();
        let target = Target::Bridge(bid.to_string());
        let pbs: Vec<String> = self
            .playbacks
            .values()
            .filter(|p| p.target == target)
            .map(|p| p.id.clone())
            .collect();
        for pb in pbs {
            self.finish_playback(core, &pb, "done");
        }
        if let Some(rec) = rec {
            self.finish_recording(core, &rec, "done");
        }
        for cid in &members {
            self.bridge_remove(core, bid, cid, Leave::Destroyed);
        }
        let mut ev = Ev::new("BridgeDestroyed").with("bridge", self.brg_json(bid));
        ev.bridges.push(bid.to_string());
        self.emit(core, ev);
        self.bridges.remove(bid);
        let apps: Vec<String> = self
            .apps
            .iter()
            .filter(|(_, a)| a.bridges.contains_key(bid))
            .map(|(n, _)| n.clone())
            .collect();
        for app in apps {
            if let Some(a) = self.apps.get_mut(&app) {
                a.bridges.remove(bid);
            }
            self.reap_app(&app);
        }
    }

    // ----- playbacks and recordings -----

    fn target_ev(&self, core: &Core, ty: &'static str, target: &Target) -> Ev {
        let mut ev = Ev::new(ty);
        match target {
            Target::Channel(c) => {
                ev.channels.push(c.clone());
                if let Some(ch) = self.channels.get(c) {
                    ev.endpoints.push(format!("{}/{}", ch.tech, ch.resource));
                    ev.endpoints.push(ch.tech.clone());
                }
            }
            Target::Bridge(b) => ev.bridges.push(b.clone()),
        }
        let _ = core;
        ev
    }

    /// Queues a playback. A channel runs its commands one at a time, and a bridge plays
    /// through its one announcer channel: a target's playbacks play one after another
    /// (`stasis_app_send_command_async`), each once those before it are finished.
    pub fn start_playback(core: &Arc<Core>, st: &mut State, mut pb: Playback) -> Value {
        let id = pb.id.clone();
        pb.seq = st.next_seq();
        let first = Self::playback_json(&pb);
        let target = pb.target.clone();
        if let Target::Channel(c) = &target {
            // Refused by a done control: answered all the same, never played, forgotten.
            if st.channels.get(c).is_some_and(|ch| ch.control_done) {
                return first;
            }
        }
        st.playbacks.insert(id, pb);
        Self::dispatch_queue(core, st, &target);
        first
    }

    /// What `target`'s queue holds next, in arrival order: a channel's commands and
    /// playbacks share one queue; a bridge has playbacks only.
    fn queue_head(&self, target: &Target) -> Option<QueueHead> {
        let playback = self
            .playbacks
            .values()
            .filter(|p| &p.target == target && p.state == "queued")
            .min_by_key(|p| p.seq)
            .map(|p| (p.id.clone(), p.seq));
        let command = match target {
            Target::Channel(c) => self
                .queued_commands
                .iter()
                .enumerate()
                .filter(|(_, q)| &q.channel == c)
                .min_by_key(|(_, q)| q.seq)
                .map(|(i, q)| (i, q.seq)),
            Target::Bridge(_) => None,
        };
        match (command, playback) {
            (Some((i, cseq)), Some((_, pseq))) if cseq < pseq => Some(QueueHead::Command(i)),
            (_, Some((id, _))) => Some(QueueHead::Playback(id)),
            (Some((i, _)), None) => Some(QueueHead::Command(i)),
            (None, None) => None,
        }
    }

    /// The dispatch loop of `target`'s queue: unless a playback (or, on a channel, a
    /// recording) holds it, runs the commands and starts the playback next in line, in
    /// arrival order; a channel whose queue is empty ends its pass (`end_of_pass`).
    fn dispatch_queue(core: &Arc<Core>, st: &mut State, target: &Target) {
        let id = loop {
            if let Target::Channel(c) = target {
                let recording = st
                    .recordings
                    .values()
                    .any(|r| &r.target == target && r.running);
                if recording || st.channels.get(c).is_some_and(|ch| ch.transferring) {
                    return;
                }
            }
            if st
                .playbacks
                .values()
                .any(|p| &p.target == target && p.state != "queued")
            {
                return;
            }
            match st.queue_head(target) {
                Some(QueueHead::Command(i)) => {
                    let q = st.queued_commands.remove(i);
                    (q.effect)(core, st);
                }
                Some(QueueHead::Playback(id)) => break id,
                None => {
                    if let Target::Channel(c) = target {
                        Self::end_of_pass(core, st, c);
                    }
                    return;
                }
            }
        };
        if let Some(pb) = st.playbacks.get_mut(&id) {
            // Taken up: no longer waiting, whatever it does next.
            pb.state = "starting";
        }
        if let Target::Channel(c) = target {
            if let Some(ch) = st.channels.get_mut(c) {
                super::ops::progress_unless_up(ch);
            }
        }
        let epoch = st.epoch;
        schedule(core, epoch, Duration::ZERO, move |core, st| {
            Self::play_item(core, st, id);
        });
    }

    /// `playback_first_update` for the current media item: `PlaybackStarted`, or, for a
    /// playback stopped while it waited, `PlaybackFinished` at once.
    fn play_item(core: &Arc<Core>, st: &mut State, id: String) {
        let Some(pb) = st.playbacks.get_mut(&id) else {
            return;
        };
        if pb.canceled {
            Self::end_playback(core, st, &id);
            return;
        }
        pb.state = "playing";
        if pb.media.get(pb.index).is_some_and(|m| {
            ["sound:", "recording:", "tone:"]
                .iter()
                .any(|scheme| m.starts_with(scheme))
        }) {
            pb.controllable = true;
        }
        let v = Self::playback_json(pb);
        let target = pb.target.clone();
        let ev = st
            .target_ev(core, "PlaybackStarted", &target)
            .with("playback", v);
        st.emit(core, ev);
        let epoch = st.epoch;
        let step = core.cfg.playback_duration;
        schedule(core, epoch, step, move |core, st| {
            Self::item_done(core, st, id);
        });
    }

    /// `playback_final_update`: `PlaybackContinuing` (this item and the next) and the next
    /// item, or `PlaybackFinished` after the last.
    fn item_done(core: &Arc<Core>, st: &mut State, id: String) {
        let Some(pb) = st.playbacks.get_mut(&id) else {
            return;
        };
        if pb.state != "playing" {
            return;
        }
        if pb.index + 1 >= pb.media.len() {
            Self::end_playback(core, st, &id);
            return;
        }
        pb.state = "continuing";
        let v = Self::playback_json(pb);
        pb.index += 1;
        let target = pb.target.clone();
        let ev = st
            .target_ev(core, "PlaybackContinuing", &target)
            .with("playback", v);
        st.emit(core, ev);
        Self::play_item(core, st, id);
    }

    /// Ends a playback (`done`) and lets the next one of its target start.
    pub fn end_playback(core: &Arc<Core>, st: &mut State, id: &str) {
        let Some(target) = st.playbacks.get(id).map(|p| p.target.clone()) else {
            return;
        };
        st.finish_playback(core, id, "done");
        Self::dispatch_queue(core, st, &target);
    }

    /// Ends a playback; one that had started (or was stopped while it waited and whose turn
    /// came) sends `PlaybackFinished`.
    pub fn finish_playback(&mut self, core: &Core, id: &str, state: &'static str) {
        let Some(mut pb) = self.playbacks.remove(id) else {
            return;
        };
        let started = pb.state != "queued";
        pb.state = state;
        if started {
            let v = Self::playback_json(&pb);
            let ev = self
                .target_ev(core, "PlaybackFinished", &pb.target)
                .with("playback", v);
            self.emit(core, ev);
        }
    }

    /// Starts a live recording; it runs until stopped, its target goes away or `max_duration`.
    pub fn start_recording(
        core: &Arc<Core>,
        st: &mut State,
        rec: Recording,
        max_duration: Option<Duration>,
    ) -> Value {
        let name = rec.name.clone();
        let token = rec.token;
        let first = Self::recording_json(&rec);
        match &rec.target {
            Target::Channel(c) => {
                if let Some(ch) = st.channels.get_mut(c) {
                    ch.recording = Some(name.clone());
                }
            }
            Target::Bridge(b) => {
                if let Some(br) = st.bridges.get_mut(b) {
                    br.recording = Some(name.clone());
                }
            }
        }
        let target = rec.target.clone();
        st.recordings.insert(name.clone(), rec);
        // `record_file` runs on a channel's own thread through its command queue
        // (`stasis_app_send_command_async`), so a channel recording starts when the channel's
        // earlier commands and playbacks are done, and holds the queue until it ends; a
        // bridge records through its own recorder channel and starts at once.
        let begin = move |core: &Arc<Core>, st: &mut State| {
            let Some(rec) = st.recordings.get(&name).filter(|r| r.token == token) else {
                return;
            };
            if let Target::Channel(c) = rec.target.clone() {
                if st.channels.get(&c).is_some_and(|ch| ch.bridge.is_some()) {
                    st.fail_recording(core, &name, "Cannot record channel while in bridge");
                    return;
                }
                // `ast_auto_answer`, which fails on a hung-up channel not yet answered.
                if st
                    .channels
                    .get(&c)
                    .is_some_and(|ch| ch.hung_up && ch.state != ChanState::Up)
                {
                    st.fail_recording(core, &name, "Failed to answer channel");
                    return;
                }
                st.set_state(core, &c, ChanState::Up);
                if let Some(rec) = st.recordings.get_mut(&name) {
                    rec.running = true;
                }
            }
            let epoch = st.epoch;
            let n = name.clone();
            schedule(core, epoch, Duration::ZERO, move |core, st| {
                let Some(rec) = st.recordings.get_mut(&n) else {
                    return;
                };
                if rec.token != token {
                    return;
                }
                // Whatever a stop while it was queued said (`recording_disregard`).
                rec.state = "recording";
                rec.started = Some(Instant::now());
                let v = Self::recording_json(rec);
                let target = rec.target.clone();
                let ev = st
                    .target_ev(core, "RecordingStarted", &target)
                    .with("recording", v);
                st.emit(core, ev);
            });
            if let Some(max) = max_duration {
                schedule(core, epoch, max, move |core, st| {
                    if st.recordings.get(&name).is_some_and(|r| r.token == token) {
                        Self::end_recording(core, st, &name, "done");
                    }
                });
            }
        };
        match &target {
            Target::Channel(c) => {
                // Refused by a done control: the flushed command's `recording_cleanup`
                // forgets the recording; the request was answered 201 all the same.
                if !Self::run_channel_command(core, st, c, begin) {
                    st.recordings.retain(|_, r| r.token != token);
                    if let Some(ch) = st.channels.get_mut(c) {
                        ch.recording = None;
                    }
                }
            }
            Target::Bridge(_) => begin(core, st),
        }
        first
    }

    /// `recording_fail`: `RecordingFailed` with its cause; the recording is gone and its
    /// channel may be added to bridges again.
    fn fail_recording(&mut self, core: &Core, name: &str, cause: &str) {
        let Some(mut rec) = self.recordings.remove(name) else {
            return;
        };
        if let Target::Channel(c) = &rec.target {
            if let Some(ch) = self.channels.get_mut(c) {
                ch.recording = None;
            }
        }
        rec.state = "failed";
        let mut v = Self::recording_json(&rec);
        if let Some(o) = v.as_object_mut() {
            o.insert("cause".into(), json!(cause));
        }
        let ev = self
            .target_ev(core, "RecordingFailed", &rec.target)
            .with("recording", v);
        self.emit(core, ev);
    }

    /// The result of a channel's transfer arrived (`AST_CONTROL_TRANSFER`): its queued
    /// commands and playbacks go on.
    pub fn end_transfer(core: &Arc<Core>, st: &mut State, channel: &str) {
        let Some(ch) = st.channels.get_mut(channel).filter(|c| c.transferring) else {
            return;
        };
        ch.transferring = false;
        Self::dispatch_queue(core, st, &Target::Channel(channel.to_string()));
    }

    /// Ends a live recording ([`State::finish_recording`]); a channel's queued commands and
    /// playbacks then go on.
    pub fn end_recording(core: &Arc<Core>, st: &mut State, name: &str, state: &'static str) {
        let target = st.recordings.get(name).map(|r| r.target.clone());
        st.finish_recording(core, name, state);
        if let Some(target @ Target::Channel(_)) = target {
            Self::dispatch_queue(core, st, &target);
        }
    }

    pub fn finish_recording(&mut self, core: &Core, name: &str, state: &'static str) {
        let Some(mut rec) = self.recordings.remove(name) else {
            return;
        };
        match &rec.target {
            Target::Channel(c) => {
                if let Some(ch) = self.channels.get_mut(c) {
                    ch.recording = None;
                }
            }
            Target::Bridge(b) => {
                if let Some(br) = self.bridges.get_mut(b) {
                    br.recording = None;
                }
            }
        }
        rec.state = state;
        let v = Self::recording_json(&rec);
        let ev = self
            .target_ev(core, "RecordingFinished", &rec.target)
            .with("recording", v);
        self.emit(core, ev);
    }

    // ----- outgoing calls -----

    /// The outcome configured for an endpoint, or the default (ring briefly, answer).
    pub fn outcome_for(&self, core: &Core, endpoint: &str) -> Outcome {
        self.behaviors
            .iter()
            .rev()
            .find(|(m, _)| m.matches(endpoint))
            .map(|(_, o)| o.clone())
            .unwrap_or(Outcome::AnswerAfter(core.cfg.ring_time))
    }

    fn dial_ev(&self, core: &Core, id: &str, status: &str, caller: Option<&str>) -> Ev {
        let dialstring = self
            .channels
            .get(id)
            .map(|c| c.resource.clone())
            .unwrap_or_default();
        let mut ev = Ev::new("Dial")
            .with("peer", self.chan_json(core, id))
            .with("dialstring", json!(dialstring))
            .with("dialstatus", json!(status))
            .with("forward", json!(""));
        ev.channels.push(id.to_string());
        if let Some(ch) = self.channels.get(id) {
            ev.endpoints.push(format!("{}/{}", ch.tech, ch.resource));
            ev.endpoints.push(ch.tech.clone());
        }
        if let Some(c) = caller.filter(|c| self.channels.contains_key(*c)) {
            ev.body.insert("caller".into(), self.chan_json(core, c));
            ev.channels.push(c.to_string());
        }
        ev
    }

    fn dialing_token(&self, id: &str) -> Option<u64> {
        self.channels
            .get(id)
            .and_then(|c| c.dialing.as_ref())
            .map(|d| d.token)
    }

    /// Calls the far end of channel `id` and plays out `outcome` (`main/dial.c` as ARI drives it).
    pub fn start_dial(
        core: &Arc<Core>,
        st: &mut State,
        id: &str,
        after: AfterAnswer,
        outcome: Outcome,
        timeout: Option<Duration>,
        caller: Option<String>,
    ) {
        let token = st.next_seq();
        // An originate dials with no calling channel (`ari_originate_dial` runs
        // `ast_dial_run(dial, NULL, 0)`), and `handle_frame_ownerless` in main/dial.c
        // publishes no Dial event for ringing: only the channel driver's state change (a 180
        // in chan_pjsip) shows it. A channel dialled with /channels/{id}/dial rings inside the
        // dial bridge, which the simulator reports as a Dial status.
        let stasis_dial = matches!(after, AfterAnswer::StayInStasis);
        let Some(ch) = st.channels.get_mut(id) else {
            return;
        };
        ch.dialing = Some(Dialing {
            after,
            token,
            caller,
        });
        let epoch = st.epoch;
        let id = id.to_string();
        schedule(core, epoch, Duration::ZERO, move |core, st| {
            if st.dialing_token(&id) != Some(token) {
                return;
            }
            let caller = st
                .channels
                .get(&id)
                .and_then(|c| c.dialing.as_ref())
                .and_then(|d| d.caller.clone());
            let ev = st.dial_ev(core, &id, "", caller.as_deref());
            st.emit(core, ev);
            let ring = |core: &Arc<Core>, st: &mut State| {
                st.set_state(core, &id, ChanState::Ringing);
                if stasis_dial {
                    let ev = st.dial_ev(core, &id, "RINGING", caller.as_deref());
                    st.emit(core, ev);
                }
            };
            let epoch = st.epoch;
            let mut answer_at = None;
            match outcome {
                Outcome::AnswerAfter(d) if d.is_zero() => {
                    st.far_end_answer(core, &id);
                    return;
                }
                Outcome::AnswerAfter(d) => {
                    ring(core, st);
                    answer_at = Some(d);
                    let id2 = id.clone();
                    schedule(core, epoch, d, move |core, st| {
                        if st.dialing_token(&id2) == Some(token) {
                            st.far_end_answer(core, &id2);
                        }
                    });
                }
                Outcome::NoAnswer | Outcome::Manual => ring(core, st),
                Outcome::Busy | Outcome::Congested | Outcome::Rejected => {
                    let id2 = id.clone();
                    schedule(core, epoch, core.cfg.reject_delay, move |core, st| {
                        if st.dialing_token(&id2) == Some(token) {
                            st.far_end_fail(core, &id2, &outcome);
                        }
                    });
                    return;
                }
            }
            if let Some(t) = timeout.filter(|t| answer_at.is_none_or(|a| *t < a)) {
                let id2 = id.clone();
                schedule(core, epoch, t, move |core, st| {
                    if st.dialing_token(&id2) == Some(token) {
                        st.far_end_fail(core, &id2, &Outcome::NoAnswer);
                    }
                });
            }
        });
    }

    /// The far end of a dialling channel answers.
    pub fn far_end_answer(&mut self, core: &Arc<Core>, id: &str) -> bool {
        let Some(dialing) = self.channels.get_mut(id).and_then(|c| c.dialing.take()) else {
            return false;
        };
        self.set_state(core, id, ChanState::Up);
        let ev = self.dial_ev(core, id, "ANSWER", dialing.caller.as_deref());
        self.emit(core, ev);
        match dialing.after {
            AfterAnswer::Stasis { app, args } => {
                let mut data = app.clone();
                for a in &args {
                    data.push(',');
                    data.push_str(a);
                }
                self.set_app(core, id, "Stasis", &data);
                if !self.enter_stasis(core, id, &app, args) {
                    self.set_var(core, id, "STASISSTATUS", "FAILED");
                    self.hangup(core, id, 16, None);
                }
            }
            AfterAnswer::Dialplan {
                context,
                exten,
                priority,
            } => {
                if let Some(ch) = self.channels.get_mut(id) {
                    ch.context = context;
                    ch.exten = exten;
                    ch.priority = priority;
                }
            }
            AfterAnswer::StayInStasis => {}
        }
        true
    }

    /// The far end of a dialling channel gives up with `outcome` (busy, congestion, reject, no answer).
    pub fn far_end_fail(&mut self, core: &Arc<Core>, id: &str, outcome: &Outcome) {
        if self.channels.get(id).is_none_or(|c| c.dialing.is_none()) {
            return;
        }
        match outcome {
            // chan_pjsip queues the hangup with the cause of the final response
            // (ast_queue_hangup_with_cause); `hangup` adds the Dial status it maps to.
            Outcome::Busy => self.hangup(core, id, 17, Some(HangupRequest::Remote)),
            Outcome::Congested => self.hangup(core, id, 34, Some(HangupRequest::Remote)),
            // The originate's ring timeout: `handle_timeout_trip` (main/dial.c) hangs the
            // channel up itself, so no Dial status; the no-answer cause it records stays in
            // the dial structure, and the channel is destroyed with none (0).
            Outcome::NoAnswer => {
                if let Some(ch) = self.channels.get_mut(id) {
                    ch.dialing = None;
                }
                self.hangup(core, id, 0, None);
            }
            _ => self.hangup(core, id, 21, Some(HangupRequest::Remote)),
        }
    }

    /// Rejects a ringing call with an arbitrary cause, as a far end sending a final error would.
    pub fn far_end_reject(&mut self, core: &Arc<Core>, id: &str, cause: i64) {
        self.hangup(core, id, cause, Some(HangupRequest::Remote));
    }
}

/// Reads a channel variable or dialplan function the way `getChannelVar` resolves it.
///
/// `Ok(None)`: not set; `Err(())`: a function the simulator cannot read.
pub(crate) fn read_variable(
    ch: &Channel,
    name: &str,
    globals: &HashMap<String, String>,
) -> Result<Option<String>, ()> {
    if let Some(inner) = name.strip_suffix(')') {
        let (func, args) = inner.split_once('(').ok_or(())?;
        let args: Vec<&str> = args.split(',').map(str::trim).collect();
        let header = |h: &str| {
            ch.sip_headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(h))
                .map(|(_, v)| v.clone())
        };
        return match func.to_ascii_uppercase().as_str() {
            // A header the request lacks is a failed read, not an empty value
            // (`read_header` in res_pjsip_header_funcs.c returns -1): 500 from getChannelVar.
            "PJSIP_HEADER" if args.first().is_some_and(|a| a.eq_ignore_ascii_case("read")) => {
                args.get(1).and_then(|h| header(h)).map(Some).ok_or(())
            }
            "SIP_HEADER" => Ok(Some(
                args.first().and_then(|h| header(h)).unwrap_or_default(),
            )),
            "CALLERID" => match args.first().map(|a| a.to_ascii_lowercase()).as_deref() {
                Some("num") | Some("number") => Ok(Some(ch.caller_number.clone())),
                Some("name") => Ok(Some(ch.caller_name.clone())),
                Some("all") => Ok(Some(format!(
                    "\"{}\" <{}>",
                    ch.caller_name, ch.caller_number
                ))),
                _ => Err(()),
            },
            "CHANNEL" => match args.first().map(|a| a.to_ascii_lowercase()).as_deref() {
                Some("name") => Ok(Some(ch.name.clone())),
                Some("language") => Ok(Some(ch.language.clone())),
                Some("state") => Ok(Some(ch.state.as_str().to_string())),
                _ => Err(()),
            },
            _ => Err(()),
        };
    }
    if let Some(v) = ch.vars.get(name) {
        return Ok(Some(v.clone()));
    }
    Ok(match name {
        "CHANNEL" => Some(ch.name.clone()),
        "UNIQUEID" => Some(ch.id.clone()),
        "EXTEN" => Some(ch.exten.clone()),
        "CONTEXT" => Some(ch.context.clone()),
        "PRIORITY" => Some(ch.priority.to_string()),
        "LANGUAGE" => Some(ch.language.clone()),
        // `ast_str_retrieve_variable` looks in the channel's variables, then in the globals
        // (`places[2] = { headp, &globals }`).
        _ => globals.get(name).cloned(),
    })
}

// ----- inspection for tests -----

/// State of one channel, for test assertions.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelSnapshot {
    /// Unique id.
    pub id: String,
    /// Channel name (`PJSIP/alice-00000001`).
    pub name: String,
    /// Channel state (`Ring`, `Up`, ...).
    pub state: String,
    /// Stasis application it is in.
    pub stasis_app: Option<String>,
    /// Stasis arguments.
    pub stasis_args: Vec<String>,
    /// Bridge it is in.
    pub bridge: Option<String>,
    /// Bridge role.
    pub role: Option<String>,
    /// Muted in the bridge (addChannel `mute`).
    pub bridge_mute: bool,
    /// DTMF absorbed in the bridge.
    pub absorb_dtmf: bool,
    /// Audio from the channel muted (`direction=in`).
    pub muted_in: bool,
    /// Audio to the channel muted (`direction=out`).
    pub muted_out: bool,
    /// On hold (ARI hold or the caller's own hold).
    pub held: bool,
    /// Music on hold class playing to it.
    pub moh: Option<String>,
    /// Ringing indicated to it.
    pub ringing: bool,
    /// Progress (early media) indicated to it.
    pub early_media: bool,
    /// Silence generator on.
    pub silence: bool,
    /// DTMF digits sent to it through ARI.
    pub dtmf_sent: String,
    /// Channel variables.
    pub variables: BTreeMap<String, String>,
    /// Caller id number.
    pub caller_number: String,
    /// Live recording on it.
    pub recording: Option<String>,
    /// Where ARI redirected it (`POST /channels/{id}/redirect`).
    pub redirected_to: Option<String>,
    /// The REFER of a redirect is under way: its commands wait.
    pub transferring: bool,
    /// Commands waiting in its queue (behind a playback, a recording, a transfer or
    /// earlier commands).
    pub queued_commands: usize,
}

/// State of one bridge, for test assertions.
#[derive(Debug, Clone, Serialize)]
pub struct BridgeSnapshot {
    /// Bridge id.
    pub id: String,
    /// Bridge name.
    pub name: String,
    /// `mixing` or `holding`.
    pub bridge_type: String,
    /// Type attributes as requested.
    pub types: String,
    /// Current technology.
    pub technology: String,
    /// Members in join order.
    pub channels: Vec<String>,
    /// Music on hold class playing to the bridge.
    pub moh: Option<String>,
    /// Live recording of the bridge.
    pub recording: Option<String>,
}

/// State of one Stasis application, for test assertions.
#[derive(Debug, Clone, Serialize)]
pub struct AppSnapshot {
    /// Application name.
    pub name: String,
    /// Whether a WebSocket serves it.
    pub active: bool,
    /// Registered with `subscribeAll`.
    pub subscribe_all: bool,
    /// Channels it follows.
    pub channel_ids: Vec<String>,
    /// Bridges it follows.
    pub bridge_ids: Vec<String>,
}

/// State of one playback, for test assertions.
#[derive(Debug, Clone, Serialize)]
pub struct PlaybackSnapshot {
    /// Playback id.
    pub id: String,
    /// Media list.
    pub media: Vec<String>,
    /// `channel:ID` or `bridge:ID`.
    pub target_uri: String,
    /// Current state.
    pub state: String,
}

/// State of one live recording, for test assertions.
#[derive(Debug, Clone, Serialize)]
pub struct RecordingSnapshot {
    /// Recording name.
    pub name: String,
    /// File format.
    pub format: String,
    /// `channel:ID` or `bridge:ID`.
    pub target_uri: String,
    /// Current state.
    pub state: String,
}

/// Everything a simulated Asterisk holds, for test assertions.
#[derive(Debug, Clone, Serialize)]
pub struct SimSnapshot {
    /// Whether it is up (not crashed).
    pub up: bool,
    /// Channels in creation order.
    pub channels: Vec<ChannelSnapshot>,
    /// Bridges in creation order.
    pub bridges: Vec<BridgeSnapshot>,
    /// Registered applications by name.
    pub apps: Vec<AppSnapshot>,
    /// Playbacks in progress.
    pub playbacks: Vec<PlaybackSnapshot>,
    /// Live recordings.
    pub recordings: Vec<RecordingSnapshot>,
    /// Open event WebSockets.
    pub websockets: usize,
}

impl SimSnapshot {
    /// The channel with this id.
    pub fn channel(&self, id: &str) -> Option<&ChannelSnapshot> {
        self.channels.iter().find(|c| c.id == id)
    }

    /// The bridge with this id.
    pub fn bridge(&self, id: &str) -> Option<&BridgeSnapshot> {
        self.bridges.iter().find(|b| b.id == id)
    }
}

impl State {
    pub fn snapshot(&self) -> SimSnapshot {
        let mut chans: Vec<&Channel> = self.channels.values().collect();
        chans.sort_by_key(|c| c.seq);
        let mut bridges: Vec<&Bridge> = self.bridges.values().collect();
        bridges.sort_by_key(|b| b.seq);
        let mut apps: Vec<AppSnapshot> = self
            .apps
            .iter()
            .map(|(name, a)| {
                let mut channel_ids: Vec<String> = a.channels.keys().cloned().collect();
                channel_ids.sort();
                let mut bridge_ids: Vec<String> = a.bridges.keys().cloned().collect();
                bridge_ids.sort();
                AppSnapshot {
                    name: name.clone(),
                    active: a.session.is_some(),
                    subscribe_all: a.subscribe_all,
                    channel_ids,
                    bridge_ids,
                }
            })
            .collect();
        apps.sort_by(|a, b| a.name.cmp(&b.name));
        SimSnapshot {
            up: self.up,
            channels: chans
                .into_iter()
                .map(|c| ChannelSnapshot {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    state: c.state.as_str().to_string(),
                    stasis_app: c.stasis.as_ref().map(|s| s.app.clone()),
                    stasis_args: c
                        .stasis
                        .as_ref()
                        .map(|s| s.args.clone())
                        .unwrap_or_default(),
                    bridge: c.bridge.clone(),
                    role: c.role.clone(),
                    bridge_mute: c.bridge_mute,
                    absorb_dtmf: c.absorb_dtmf,
                    muted_in: c.mute_in,
                    muted_out: c.mute_out,
                    held: c.held,
                    moh: c.moh.clone(),
                    ringing: c.ringing,
                    early_media: c.early_media,
                    silence: c.silence,
                    dtmf_sent: c.dtmf_sent.clone(),
                    variables: c.vars.clone(),
                    caller_number: c.caller_number.clone(),
                    recording: c.recording.clone(),
                    redirected_to: c.redirected_to.clone(),
                    transferring: c.transferring,
                    queued_commands: self
                        .queued_commands
                        .iter()
                        .filter(|q| q.channel == c.id)
                        .count(),
                })
                .collect(),
            bridges: bridges
                .into_iter()
                .map(|b| BridgeSnapshot {
                    id: b.id.clone(),
                    name: b.name.clone(),
                    bridge_type: if b.holding { "holding" } else { "mixing" }.to_string(),
                    types: b.types.clone(),
                    technology: b.technology().to_string(),
                    channels: b.channels.clone(),
                    moh: b.moh.clone(),
                    recording: b.recording.clone(),
                })
                .collect(),
            apps,
            playbacks: self
                .playbacks
                .values()
                .map(|p| PlaybackSnapshot {
                    id: p.id.clone(),
                    media: p.media.clone(),
                    target_uri: p.target.uri(),
                    state: p.state.to_string(),
                })
                .collect(),
            recordings: self
                .recordings
                .values()
                .map(|r| RecordingSnapshot {
                    name: r.name.clone(),
                    format: r.format.clone(),
                    target_uri: r.target.uri(),
                    state: r.state.to_string(),
                })
                .collect(),
            websockets: self.sessions.len(),
        }
    }
}

/// The Dial status of a dialled channel hung up with Q.850 `cause`
/// (`ast_hangup_cause_to_dial_status` in main/dial.c).
fn dial_status_of(cause: i64) -> &'static str {
    match cause {
        17 => "BUSY",
        34 => "CONGESTION",
        3 | 20 => "CHANUNAVAIL",
        _ => "NOANSWER",
    }
}

/// How a channel leaves a bridge, which decides when its app stops following the bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leave {
    /// Moved to another bridge or removed: it stays in Stasis.
    Moved,
    /// Out of Stasis (hung up, or continued in the dialplan).
    LeftStasis,
    /// The bridge is being destroyed: subscriptions go with it.
    Destroyed,
}
