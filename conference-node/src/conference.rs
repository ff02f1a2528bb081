//! One conference's actor: it alone touches its bridges, participants, recording and claim,
//! one message at a time. A join is: fence (Redis says this node owns the conference at its
//! epoch, else claim it, else send the caller to the owner), create the bridge idempotently,
//! answer, add the channel, apply the options, record the count in Redis.
//!
//! Call-control commands (mute, hold, kick, move, dial-out, ...) run here too, in
//! [`commands`], so they are serialised with the conference's calls. Every change a
//! subscriber may care about is published on the bus as an event with a `seq` that rises by
//! one per conference (reset when the conference starts again on this node).

mod commands;
mod restore;
mod settings;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use confroute_shared::bus;

use confroute_shared::name::ConferenceName;
use confroute_shared::store::{ClaimKind, HostedStatus, SequenceKind};
use confroute_shared::types::{NodeId, NodeState, Owner};

use crate::ari::{AriError, AriErrorKind, Bridge, Channel};
use crate::config::{LostPolicy, WrongNodePolicy};
use crate::node::{ConferenceView, Node, ParticipantView};
use crate::options::{self, CallbackEvent, Options, Record};
use crate::webhook::{Callbacks, ParticipantFields, Reservations, Sequence};

/// How often wait music that failed to start is asked for again, at most.
const MUSIC_RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a participant redirected to another node may still be seen here before the
/// redirect counts as refused: an answered call is moved with a REFER, which its phone or
/// trunk may refuse, and ARI reports nothing of it (`app_control_redirect` ignores the
/// outcome). The far end hangs up once its new call to the target is answered, which takes
/// seconds; the margin covers a slow target under load.
pub const REDIRECT_GRACE: Duration = Duration::from_secs(30);

/// Q.850 cause for a caller the conference cannot take now: switching congestion (SIP 503),
/// so the edge can try again through the router.
pub const CAUSE_UNAVAILABLE: u16 = 34;
/// Q.850 cause for a full conference: user busy (SIP 486).
pub const CAUSE_BUSY: u16 = 17;
/// Q.850 cause for participants hung up by the conference: normal clearing.
pub const CAUSE_NORMAL: u16 = 16;

/// How long a refused caller may listen to the "conference full" sound.
const FULL_SOUND_LIMIT: Duration = Duration::from_secs(30);

/// A caller ready to join.
#[derive(Debug)]
pub struct Join {
    /// The channel as StasisStart showed it.
    pub channel: Channel,
    /// Its resolved options.
    pub options: Options,
}

/// What an actor is told.
#[derive(Debug)]
pub enum Msg {
    /// A caller wants in.
    Join(Box<Join>),
    /// A participant's channel left Stasis.
    Left {
        /// Channel id.
        channel: String,
    },
    /// A participant put the call on hold or took it off.
    Hold {
        /// Channel id.
        channel: String,
        /// On hold now.
        held: bool,
    },
    /// A bridge recording finished (stopped by the agent, or ended by Asterisk).
    RecordingFinished {
        /// The recording's name.
        name: String,
    },
    /// A bridge recording failed.
    RecordingFailed {
        /// The recording's name.
        name: String,
    },
    /// One of the conference's bridges was destroyed.
    BridgeGone {
        /// Bridge id.
        bridge: String,
    },
    /// The heartbeat found the claim lost or missing.
    Claim {
        /// What the heartbeat found.
        status: HostedStatus,
        /// The epoch the heartbeat renewed (or claimed again) for it.
        epoch: u64,
    },
    /// Reconciliation: the conference's bridges as Asterisk has them now.
    Reconcile {
        /// The conference's mixing bridges found (normally one; a lifetime's bridge whose
        /// destruction failed may still be there beside the current one).
        main: Vec<Bridge>,
        /// Its holding bridges found, the same way.
        holding: Vec<Bridge>,
        /// Snapshots of the bridges' members, as listed with them.
        members: HashMap<String, Channel>,
        /// Every channel Asterisk listed: one of the conference's missing there is gone.
        listed: Arc<HashSet<String>>,
        /// Channels in this agent's Stasis app that no bridge held: a participant among
        /// them was taken out behind the agent's back and is put back, not let go.
        unbridged: Arc<HashSet<String>>,
        /// When the listing was taken: what changed since is newer than it.
        taken: Instant,
        /// Answers whether the conference is active and owned afterwards.
        reply: oneshot::Sender<bool>,
    },
    /// End the conference now (drain deadline, shutdown).
    End {
        /// Why, for logs and metrics.
        reason: &'static str,
    },
    /// A call-control command for this conference (see [`crate::control`]).
    Command(Box<crate::control::Request>),
    /// A dial-out's callee answered and entered the Stasis app.
    DialoutAnswered {
        /// The callee's channel as StasisStart showed it.
        channel: Channel,
    },
    /// A dial-out ended before its callee answered.
    DialoutGone {
        /// The callee's channel id (the call id).
        channel: String,
        /// The Q.850 cause its `rejected` status reported, when known.
        cause: Option<i64>,
    },
    /// A participant of another conference on this node moves in (`participant.move`).
    MoveIn(Box<MoveIn>),
    /// The answer to a [`Msg::MoveIn`] this conference sent.
    MovedOut {
        /// The participant's channel id.
        channel: String,
        /// True when it is now in the other conference.
        moved: bool,
    },
    /// Talk detection on a participant's channel.
    Talking {
        /// Channel id.
        channel: String,
        /// Talking now.
        talking: bool,
    },
}

/// The name of a new recording of conference `name` in lifetime `epoch`:
/// `confroute-<name>-<epoch>-<8 hex digits>` ([`recording_conference`] reads it back).
fn recording_name(name: &ConferenceName, epoch: u64) -> String {
    format!("confroute-{}-{}-{:08x}", name, epoch, rand::random::<u32>())
}

/// The conference a recording named by [`recording_name`] belongs to.
pub fn recording_conference(recording: &str) -> Option<ConferenceName> {
    let rest = recording.strip_prefix("confroute-")?;
    let mut parts = rest.rsplitn(3, '-');
    let (hex, epoch, name) = (parts.next()?, parts.next()?, parts.next()?);
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    epoch.parse::<u64>().ok()?;
    ConferenceName::parse(name).ok()
}

/// Reads of an adopted conference's kept settings before it goes on without them.
const SETTINGS_TRIES: u32 = 3;
/// The wait after the first failed read (doubling).
const SETTINGS_RETRY: Duration = Duration::from_millis(200);

/// What a conference's record in Redis keeps for an agent that restarts.
struct Kept {
    /// The conference-wide settings.
    opts: Options,
    /// The status callbacks' ConferenceSid.
    sid: Option<String>,
    /// The recording under way ([`settings::recording`]).
    recording: Option<Option<String>>,
    /// Whether it had started.
    started: bool,
    /// Whether the application was told of it ([`settings::announced`]).
    announced: bool,
    /// Redis could not say: these are the configured defaults standing in.
    unread: bool,
}

/// A participant moving between two conferences of this node.
#[derive(Debug)]
pub struct MoveIn {
    /// The participant's channel.
    pub channel: Channel,
    /// Its options, carried over.
    pub options: Options,
    /// Those options are defaults standing in for ones an adoption could not read: the
    /// conference it joins reads them again (see [`Conference::reread_options`]).
    pub options_unread: bool,
    /// Muted in the conference it leaves.
    pub muted: bool,
    /// Held in the conference it leaves (its channel says so for a restarted agent).
    pub held: bool,
    /// Its phone has the call on hold, as the conference it leaves last announced.
    pub caller_held: bool,
    /// Caller id number.
    pub caller: String,
    /// The conference it leaves.
    pub from: ConferenceName,
    /// The command to answer once the move is done or refused.
    pub pending: crate::control::Pending,
}

/// The bridge ids of one lifetime of a conference: `cr-EPOCH.LIFETIME-NAME` (mixing) and
/// `crh-EPOCH.LIFETIME-NAME` (holding). Epochs start again at 1 once a claim is released, so
/// without the random `lifetime` a late `BridgeDestroyed` of the previous lifetime's bridge
/// would name the new one, and Asterisk would see an id reused right after its destruction.
pub fn bridge_ids(name: &ConferenceName, epoch: u64, lifetime: u32) -> (String, String) {
    (
        format!("cr-{epoch}.{lifetime:08x}-{name}"),
        format!("crh-{epoch}.{lifetime:08x}-{name}"),
    )
}

/// Reads a bridge id back: `(holding, epoch, name)`; `None` for bridges that are not ours.
/// Ids without a lifetime (`cr-EPOCH-NAME`, from agents before it) are still ours.
pub fn parse_bridge_id(id: &str) -> Option<(bool, u64, ConferenceName)> {
    let (holding, rest) = if let Some(r) = id.strip_prefix("crh-") {
        (true, r)
    } else {
        (false, id.strip_prefix("cr-")?)
    };
    let (epoch, name) = rest.split_once('-')?;
    let epoch = match epoch.split_once('.') {
        Some((e, lifetime))
            if !lifetime.is_empty() && lifetime.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            e
        }
        Some(_) => return None,
        None => epoch,
    };
    let epoch = epoch.parse().ok()?;
    Some((holding, epoch, ConferenceName::parse(name).ok()?))
}

/// Queues `conference-end` for `reason`, with the call that ended it when one did.
fn send_end(cb: &mut Callbacks, reason: &str, ended_by: Option<&str>) {
    let mut extra = vec![("ReasonConferenceEnded", twilio_end_reason(reason))];
    if let Some(by) = ended_by {
        extra.push(("CallSidEndingConference", by.to_string()));
    }
    cb.send(CallbackEvent::End, "conference-end", None, &extra);
}

/// `ReasonConferenceEnded` of a `conference-end` callback: Twilio's value where Twilio has
/// one for the reason, else the agent's own with dashes (`drain-deadline`).
fn twilio_end_reason(reason: &str) -> String {
    match reason {
        "ended_by_api" => "conference-ended-via-api".to_string(),
        "last_participant_left" => "last-participant-left".to_string(),
        "end_conference_on_exit" => "participant-with-end-conference-on-exit-left".to_string(),
        "end_conference_on_exit_kicked" => {
            "participant-with-end-conference-on-exit-kicked".to_string()
        }
        "last_participant_kicked" => "last-participant-kicked".to_string(),
        other => other.replace('_', "-"),
    }
}

/// `ReasonParticipantLeft` and `ParticipantCallStatus` of a `participant-leave` callback
/// for a participant that left with the agent's `reason` while its conference went on.
fn twilio_leave(reason: &str) -> (&'static str, &'static str) {
    match reason {
        "hangup" => ("participant_hung_up", "completed"),
        "kicked" => ("participant_updated_via_api", "completed"),
        // Moved to another conference: the call goes on there.
        "moved" => ("participant_updated_via_api", "in-progress"),
        // Taken out of the conference's bridges behind the agent's back; still up.
        _ => ("participant_removed", "in-progress"),
    }
}

/// `ReasonParticipantLeft` of the participants a conference's end hangs up: Twilio's value
/// where Twilio has one, else the conference's own end reason (`drain_deadline`).
fn twilio_leave_at_end(reason: &'static str) -> &'static str {
    match reason {
        "ended_by_api" => "conference_ended_via_api",
        "end_conference_on_exit" | "end_conference_on_exit_kicked" => "moderator_ended_conference",
        other => other,
    }
}

/// `ParticipantCallStatus` of a dial-out that ended before its callee came in, from the
/// Q.850 cause reported with its `rejected` status (`None`: not known).
fn twilio_add_failed_status(cause: Option<i64>) -> &'static str {
    match cause {
        Some(17) => "busy",
        Some(18..=20) => "no-answer",
        // Normal clearing before an answer is a call given up (SIP 487).
        Some(16) => "canceled",
        _ => "failed",
    }
}

/// The ARI redirect endpoint for a caller on `tech` to the owner's SIP URI: chan_pjsip's
/// `transfer_redirect` parses the resource as the 302's Contact URI, so the endpoint is
/// `PJSIP/sip:NAME@host:port`.
pub fn redirect_endpoint(tech: &str, owner_uri: &str, name: &str) -> String {
    let (scheme, rest) = match owner_uri.split_once(':') {
        Some((s, r)) if s.eq_ignore_ascii_case("sip") || s.eq_ignore_ascii_case("sips") => (s, r),
        _ => ("sip", owner_uri),
    };
    let hostpart = match rest.rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    format!("{tech}/{scheme}:{name}@{hostpart}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No conference here.
    Idle,
    /// Hosting it under a claim this node holds.
    Active,
    /// Hosting what is left of it; the claim moved elsewhere (invariant 2).
    Lost,
}

#[derive(Debug)]
struct Participant {
    options: Options,
    waiting: bool,
    /// Not heard by the others (ARI channel mute `in`, which follows the channel from
    /// bridge to bridge).
    muted: bool,
    /// On hold through call control: in the holding bridge, hearing music, out of the mix.
    held: bool,
    /// The caller's own phone put the call on hold (ChannelHold).
    caller_held: bool,
    /// Talk detection says the participant is talking.
    talking: bool,
    /// A move to another conference of this node is under way.
    moving: bool,
    /// Redirected to another node: its hangup is a move, not a leave.
    redirected: bool,
    /// When it was redirected, and to which conference (see [`REDIRECT_GRACE`]).
    redirect: Option<(Instant, ConferenceName)>,
    /// Caller id number.
    caller: String,
    /// Channel technology (`PJSIP`), for redirects.
    tech: String,
    /// Wall-clock join time (ms since the epoch).
    joined_ms: u64,
    /// Adopted with default options because Asterisk did not answer their reads: each
    /// reconciliation tries again (see [`Conference::reread_options`]).
    options_unread: bool,
    /// Adopted on hold from a started conference's holding bridge because its hold mark
    /// could not be read: each reconciliation reads it again.
    held_unread: bool,
    since: Instant,
    /// When the agent last had an addChannel for it under way (sent or answered): a
    /// listing taken before then may show it where it was.
    placed_at: Instant,
}

impl Participant {
    fn new(options: Options, waiting: bool, muted: bool, caller: String) -> Participant {
        Participant {
            options,
            waiting,
            muted,
            held: false,
            caller_held: false,
            talking: false,
            moving: false,
            redirected: false,
            redirect: None,
            caller,
            tech: "PJSIP".to_string(),
            joined_ms: now_ms(),
            options_unread: false,
            held_unread: false,
            since: Instant::now(),
            placed_at: Instant::now(),
        }
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a caller (or a moving participant) cannot be admitted.
enum Refusal {
    /// Another node owns the conference.
    Elsewhere { node: NodeId, sip_uri: String },
    /// Nobody owns it and this node takes no new conferences.
    NotServing,
    /// Redis could not say who owns it.
    Unavailable(String),
    /// At `maxParticipants`.
    Full,
    /// The mixing bridge could not be created.
    Bridge(AriError),
}

enum Fence {
    Owned(u64),
    Elsewhere { node: NodeId, sip_uri: String },
    NotServing,
    Unavailable(String),
}

struct Conference {
    node: Arc<Node>,
    name: ConferenceName,
    phase: Phase,
    epoch: u64,
    main: String,
    main_created: bool,
    main_created_at: Instant,
    holding: String,
    holding_created: bool,
    /// When the holding bridge's wait music last failed to start: asked again for a caller
    /// put there [`MUSIC_RETRY_EVERY`] later or more.
    holding_music_failed: Option<Instant>,
    started: bool,
    participants: BTreeMap<String, Participant>,
    max_participants: u32,
    record: Record,
    recording: Option<String>,
    /// Adopted started from Asterisk after a restart: a recording of the last life may be
    /// under way under a name this life does not know (ARI lists no live recordings), so
    /// none is started until Asterisk says it ended.
    recording_inherited: bool,
    /// The mixing bridge the app follows for itself ([`AriClient::follow_bridge`]), so a
    /// recording's end is heard however the mix emptied.
    ///
    /// [`AriClient::follow_bridge`]: crate::ari::AriClient::follow_bridge
    followed: Option<String>,
    /// A recording of this life failed: a fault a new file would meet again (format, disk),
    /// so none is started any more.
    recording_failed: bool,
    /// What the kept settings said of the recording under way when the conference was
    /// adopted after a restart (see [`settings::recording`]).
    kept_recording: Option<Option<String>>,
    /// Whether the kept settings said the conference had started, when it was adopted.
    kept_started: bool,
    callbacks: Option<Callbacks>,
    /// The callbacks of an orphan adopted as lost (its conference re-homed elsewhere), kept
    /// silent: they are taken up should this node own the conference again.
    parked_callbacks: Option<Callbacks>,
    /// The conference's settings as kept in Redis (none when they are the configured
    /// defaults), and whether the record has them.
    settings: Option<String>,
    settings_saved: bool,
    /// The settings an earlier lifetime kept could not be read at adoption: those Redis has
    /// are not written over, and no callback goes out (the URL and ConferenceSid are
    /// unknown; callbacks under a new sid would name a conference the application never saw).
    settings_unread: bool,
    beeps: u64,
    /// Numbers of the events published on the bus: from 1 in a new life, above what an
    /// earlier agent lifetime used in an adopted one.
    seq: Sequence,
    /// Someone entered, or a dial-out was placed: the application has heard of the
    /// conference, so its end is told. One whose first caller never got in ends unheard.
    heard_of: bool,
    /// The settings say the application was told of the conference (its first join sent).
    announced: bool,
    /// Dial-outs ringing into this conference: call id and the callee's options.
    dialing: HashMap<String, Options>,
    /// A dial-out's callee that answered and is being let in: call id and options.
    answering: Option<(String, Options)>,
    /// A caller admitted and being brought in (answer, bridge): counted in the view, so a
    /// heartbeat meanwhile does not write the conference's count back to 0.
    admitting: bool,
    /// A reconciliation's answer, sent once the actor has retired if it was going to: the
    /// reconciliation then finds the names of actors that ended gone from the registry.
    reconciled: Option<(oneshot::Sender<bool>, bool)>,
    /// The last reconciliation could not tell whether this node owns the conference (Redis
    /// did not answer): its answer is withheld, so the pass counts as incomplete.
    reconcile_unsure: bool,
    /// The events connection under which a newcomer last had this conference compared with
    /// Asterisk before the reconciliation came to it (see [`Conference::look_before_admitting`]).
    looked_under: u64,
}

/// A new life's event numbering (from 1), reserving its next blocks in the conference's record.
fn events_sequence(node: &Node, name: &ConferenceName) -> Sequence {
    Sequence::new(Arc::new(Reservations {
        kind: SequenceKind::Events,
        store: node.store.clone(),
        name: name.clone(),
        node: node.id.clone(),
    }))
}

/// Runs a conference's actor until it is idle with nothing queued.
pub async fn run(node: Arc<Node>, name: ConferenceName, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut c = Conference {
        node: node.clone(),
        name: name.clone(),
        phase: Phase::Idle,
        epoch: 0,
        main: String::new(),
        main_created: false,
        main_created_at: Instant::now(),
        holding: String::new(),
        holding_created: false,
        holding_music_failed: None,
        started: false,
        participants: BTreeMap::new(),
        max_participants: 0,
        record: Record::DoNotRecord,
        recording: None,
        recording_inherited: false,
        followed: None,
        recording_failed: false,
        kept_recording: None,
        kept_started: false,
        callbacks: None,
        parked_callbacks: None,
        settings: None,
        settings_saved: false,
        settings_unread: false,
        beeps: 0,
        seq: events_sequence(&node, &name),
        heard_of: false,
        announced: false,
        dialing: HashMap::new(),
        answering: None,
        admitting: false,
        reconciled: None,
        reconcile_unsure: false,
        looked_under: 0,
    };
    loop {
        let retired = c.phase == Phase::Idle && node.retire(&name, &rx);
        if let Some((reply, owned)) = c.reconciled.take() {
            let _ = reply.send(owned);
        }
        if retired {
            return;
        }
        let Some(msg) = rx.recv().await else {
            return;
        };
        c.handle(msg).await;
    }
}

impl Conference {
    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Join(j) => {
                let span = tracing::info_span!("call", conference = %self.name, channel = %j.channel.id, node = %self.node.id);
                self.join(*j).instrument(span).await
            }
            Msg::Left { channel } => self.left(&channel, "hangup").await,
            Msg::Hold { channel, held } => self.hold(&channel, held),
            Msg::BridgeGone { bridge } => self.bridge_gone(&bridge).await,
            Msg::RecordingFinished { name } => self.recording_finished(&name).await,
            Msg::RecordingFailed { name } => self.recording_failed(&name).await,
            Msg::Claim { status, epoch } => self.claim_status(status, epoch).await,
            Msg::Reconcile {
                main,
                holding,
                members,
                listed,
                unbridged,
                taken,
                reply,
            } => {
                let main = self.one_bridge(main, &self.main.clone()).await;
                let holding = self.one_bridge(holding, &self.holding.clone()).await;
                let owned = self
                    .reconcile(main, holding, &members, &listed, &unbridged, taken)
                    .await;
                self.check_recording().await;
                if self.check_redirects(&listed, taken) {
                    // A waiter whose transfer failed is one again: a start may be due, or
                    // one that skipped it may take it in now.
                    self.start_if_due().await;
                    self.finish_cut_short_start().await;
                }
                self.reread_options(taken).await;
                if std::mem::take(&mut self.reconcile_unsure) {
                    // Dropped unanswered: the pass is retried and releases no claim.
                    drop(reply);
                } else {
                    self.reconciled = Some((reply, owned));
                }
            }
            Msg::End { reason } => self.end(reason, None).await,
            Msg::Command(req) => {
                let span = tracing::info_span!("command", conference = %self.name, method = req.pending.method(), node = %self.node.id);
                self.command(*req).instrument(span).await
            }
            Msg::DialoutAnswered { channel } => {
                let span = tracing::info_span!("call", conference = %self.name, channel = %channel.id, node = %self.node.id);
                self.dialout_answered(channel).instrument(span).await
            }
            Msg::DialoutGone { channel, cause } => self.dialout_gone(&channel, cause).await,
            Msg::MoveIn(m) => {
                let span = tracing::info_span!("call", conference = %self.name, channel = %m.channel.id, node = %self.node.id);
                self.move_in(*m).instrument(span).await
            }
            Msg::MovedOut { channel, moved } => self.moved_out(&channel, moved).await,
            Msg::Talking { channel, talking } => self.talking(&channel, talking),
        }
    }

    /// Publishes a conference event on the bus (through the node's ordered publisher, so
    /// the actor never waits for Redis).
    fn emit(&mut self, event: &str, data: Value) {
        let seq = self.seq.next();
        self.node.outbox.event(bus::Event {
            conference: self.name.to_string(),
            node: self.node.id.to_string(),
            epoch: self.epoch,
            seq,
            event: event.to_string(),
            data,
        });
    }

    /// Ends a conference nobody is in and nobody is being called into.
    async fn end_if_empty(&mut self, reason: &'static str) {
        if self.phase != Phase::Idle && self.participants.is_empty() && self.dialing.is_empty() {
            self.end(reason, None).await;
        }
    }

    // ----- joining -----

    /// Asks Redis who owns the conference; claims it for this node when nobody does.
    async fn fence(&self) -> Fence {
        // Owning a claim counts only while this node's own record lives: heartbeats failing
        // (Redis refusing writes) while lookups still answer would otherwise let callers in
        // here after controllers took the node for dead and placed the conference elsewhere.
        if !self.node.record_current() {
            return Fence::Unavailable(
                "this node's record may have expired: its heartbeats are not renewing it".into(),
            );
        }
        let store = &self.node.store;
        match store.lookup(&self.name).await {
            Err(e) => return Fence::Unavailable(e.to_string()),
            // An unconfirmed claim (its replicas' WAIT failed) may yet be lost in a failover:
            // the claim below waits for the replicas again and confirms it first, as a
            // controller's routing does.
            Ok(Some(rec)) if rec.owner.node == self.node.id && !rec.unconfirmed => {
                return Fence::Owned(rec.owner.epoch)
            }
            Ok(_) => {}
        }
        match store
            .claim(&self.name, std::slice::from_ref(&self.node.id))
            .await
        {
            Err(e) => Fence::Unavailable(e.to_string()),
            Ok(c) => match (c.kind, c.owner) {
                (ClaimKind::NoCapacity, _) => Fence::NotServing,
                (_, Some(o)) if o.node == self.node.id => Fence::Owned(o.epoch),
                (ClaimKind::Existing, Some(o)) => Fence::Elsewhere {
                    node: o.node,
                    sip_uri: c.sip_uri,
                },
                (kind, owner) => Fence::Unavailable(format!(
                    "unexpected claim answer {} for owner {owner:?}",
                    kind.as_str()
                )),
            },
        }
    }

    /// Starts the conference's life on this node with the settings of `opts`; `sid` is the
    /// ConferenceSid of an adopted conference's callbacks (a new one otherwise). Not shown to
    /// the heartbeat yet: the caller publishes once the callers of an adopted conference are
    /// in, so no heartbeat writes it empty.
    fn activate_quietly(
        &mut self,
        epoch: u64,
        opts: &Options,
        sid: Option<String>,
        announced: bool,
    ) {
        let (main, holding) = bridge_ids(&self.name, epoch, rand::random());
        self.phase = Phase::Active;
        self.epoch = epoch;
        self.main = main;
        self.main_created = false;
        self.holding = holding;
        self.holding_created = false;
        self.started = false;
        self.recording = None;
        self.recording_inherited = false;
        self.recording_failed = false;
        self.beeps = 0;
        self.seq = events_sequence(&self.node, &self.name);
        self.heard_of = false;
        self.parked_callbacks = None;
        self.apply_settings(opts, sid, announced);
        tracing::info!(conference = %self.name, epoch, bridge = %self.main, "conference starting on this node");
    }

    /// Takes the conference-wide settings of `opts` (the first caller's, or those kept from
    /// before a restart) and starts its status callbacks.
    fn apply_settings(&mut self, opts: &Options, sid: Option<String>, announced: bool) {
        self.max_participants = opts.max_participants;
        self.record = opts.record;
        let sid = sid.unwrap_or_else(|| format!("CF{:032x}", rand::random::<u128>()));
        let cfg = &self.node.cfg;
        let defaults = options::resolve(&cfg.conference, &cfg.profiles, &BTreeMap::new()).0;
        self.announced = announced;
        self.settings = settings::encode(opts, &defaults, &sid)
            .map(|text| settings::with_announced(&text, announced));
        self.settings_saved = false;
        self.settings_unread = false;
        self.callbacks = self.start_callbacks(opts, sid);
    }

    /// The status callbacks `opts` ask for, under `sid`; none without a URL.
    fn start_callbacks(&self, opts: &Options, sid: String) -> Option<Callbacks> {
        (!opts.status_callback.is_empty()).then(|| {
            Callbacks::start(
                &self.node.webhooks,
                opts.status_callback.clone(),
                opts.status_callback_event.clone(),
                &self.node.cfg.webhook,
                self.node.metrics.clone(),
                sid,
                Reservations {
                    kind: SequenceKind::Callbacks,
                    store: self.node.store.clone(),
                    name: self.name.clone(),
                    node: self.node.id.clone(),
                },
            )
        })
    }

    /// The last callers of a conference this node still holds at the epoch of its bridges
    /// left while no agent was watching (it was restarting): the application heard of the
    /// conference from the last lifetime (its settings were kept with a join) and is owed its
    /// `conference-end`, numbered after what that lifetime sent. Who left is not known here:
    /// no `participant-leave` goes with it.
    async fn tell_ended_while_away(&mut self, bridge: Option<&Bridge>) {
        let Some((_, epoch, _)) = bridge.and_then(|b| parse_bridge_id(&b.id)) else {
            return;
        };
        // Not a life this node ended itself (its claim is released first, and this actor
        // ran it or told its end already), nor a later one. Only looked at: a fence would
        // claim a name nobody holds, for a conference that is over.
        if self.epoch == epoch || !self.node.record_current() {
            return;
        }
        let ours = matches!(
            self.node.store.lookup(&self.name).await,
            Ok(Some(rec)) if rec.owner.node == self.node.id && rec.owner.epoch == epoch
        );
        if !ours {
            return;
        }
        // Once: bridges whose destruction failed are found again by the next pass.
        self.epoch = epoch;
        let kept = self.kept_settings().await;
        // Not if its first caller never got in: the application never heard of it.
        let Some(sid) = kept.sid.filter(|_| !kept.unread && kept.announced) else {
            return;
        };
        let Some(mut cb) = self.start_callbacks(&kept.opts, sid) else {
            return;
        };
        cb.resume_numbering().await;
        let reason = "last_participant_left";
        send_end(&mut cb, reason, None);
        self.node
            .metrics
            .conferences_ended
            .with_label_values(&[reason])
            .inc();
        tracing::info!(conference = %self.name, epoch, "the conference's last callers left while the agent was away; its end is told");
        // Given back here, not left to the pass's release of stale claims: a pass cut short
        // (another conference's look failing) would leave it for the next pass's new actor,
        // which would tell the end again.
        let owner = Owner {
            node: self.node.id.clone(),
            epoch,
        };
        if let Err(e) = self.node.store.release(&self.name, &owner).await {
            tracing::warn!(conference = %self.name, error = %e, "cannot give back the claim of a conference that ended while the agent was away; the next reconciliation does");
        }
    }

    /// The conference lived here before a restart: it goes on with the settings its first
    /// caller gave it, and its callbacks go on numbering above what they sent.
    async fn resume_settings(&mut self) {
        let kept = self.kept_settings().await;
        self.apply_settings(&kept.opts, kept.sid, kept.announced);
        if kept.unread {
            self.forgo_settings();
        }
        self.kept_recording = kept.recording;
        self.kept_started = kept.started;
        // Its end is told if the application was told of it.
        self.heard_of = kept.announced;
        self.resume_numbering().await;
    }

    /// The kept settings could not be read: this lifetime runs on the defaults without
    /// writing them or sending callbacks (see [`Conference::settings_unread`]).
    fn forgo_settings(&mut self) {
        tracing::warn!(conference = %self.name, "the conference's kept settings could not be read; it goes on with the configured defaults, sends no status callbacks and leaves the kept settings as they are");
        self.settings_unread = true;
        self.callbacks = None;
    }

    /// An adopted conference's callbacks and events go on numbering above what the last
    /// agent lifetime sent.
    async fn resume_numbering(&mut self) {
        if let Some(cb) = &mut self.callbacks {
            cb.resume_numbering().await;
        }
        if !self.seq.resume().await {
            tracing::warn!(conference = %self.name, "no event seq block could be reserved; events are numbered from the clock (milliseconds since 1970)");
        }
    }

    /// Checks that a newcomer may enter: this node owns the conference (claiming it when
    /// nobody does), there is room, and the mixing bridge exists.
    async fn admit(&mut self, opts: &Options) -> Result<(), Refusal> {
        self.look_before_admitting().await;
        match self.fence().await {
            // Past its drain the node is about to deregister and exit: a conference started
            // now would be left running under it (its claim re-homed once the node is gone).
            // Past an admin drain's deadline, it would be ended at once.
            Fence::Owned(_)
                if self.phase == Phase::Idle
                    && (self.node.state() == NodeState::ShuttingDown
                        || self.node.drain_overdue()) =>
            {
                return Err(Refusal::NotServing);
            }
            Fence::Owned(epoch) => match self.phase {
                Phase::Idle => {
                    // Shown to the heartbeat only with the callers a restart left in its
                    // bridges adopted: shown empty first, a heartbeat would write it empty,
                    // and a draining node's conference could be placed elsewhere.
                    self.activate_quietly(epoch, opts, None, false);
                    if let Err(e) = self.find_bridges().await {
                        // A new bridge beside the one still holding the callers would split
                        // the conference: the newcomer is refused for now.
                        self.phase = Phase::Idle;
                        return Err(Refusal::Unavailable(format!(
                            "cannot look for bridges left from before a restart: {e}"
                        )));
                    }
                    self.publish();
                }
                // A Lost conference may win its claim back at the epoch it had (epochs
                // restart at 1 once a claim is released): only Active claims are renewed.
                _ if self.epoch != epoch || self.phase == Phase::Lost => {
                    if self.epoch != epoch {
                        tracing::info!(conference = %self.name, from = self.epoch, to = epoch, "claim re-established at a new epoch");
                    }
                    if self.phase == Phase::Lost {
                        tracing::info!(conference = %self.name, epoch, "this node owns the conference again");
                        if let Some(cb) = self.parked_callbacks.take() {
                            self.callbacks = Some(cb);
                        }
                    }
                    self.phase = Phase::Active;
                    self.epoch = epoch;
                    // The heartbeat renews what the view says is active.
                    self.publish();
                    // A new claim is a new record: the settings and numbers go in again.
                    self.record_anew().await;
                }
                _ => {}
            },
            other => return Err(self.not_owned(other).await),
        }
        // A ringing dial-out holds its seat.
        if self.participants.len() + self.dialing.len() >= self.max_participants as usize {
            return Err(Refusal::Full);
        }
        // The first one in an empty conference counts at once, before the ARI work: claim.lua
        // moves an empty conference off a node that is not serving, and a caller routed
        // meanwhile would open a second home. Written only while this node still owns it.
        if self.people() == 0 {
            self.count_first_in().await?;
        }
        if !self.main_created {
            self.create_main().await.map_err(Refusal::Bridge)?;
        }
        Ok(())
    }

    /// A live conference's state may be stale after the events WebSocket (re)connected:
    /// StasisEnds were lost while it was down, or Asterisk restarted and took the bridge and
    /// every caller with it. Until the reconciliation reaches this conference (it goes one
    /// conference at a time, behind the joins already queued), a newcomer is compared with
    /// Asterisk's own lists first, once per connection: admitted against the stale state, it
    /// would skip the wait for a start that a new conference needs, or be refused as full by
    /// callers long gone, and the reconciliation's later removal of a gone
    /// `endConferenceOnExit` participant would hang it up.
    async fn look_before_admitting(&mut self) {
        let connection = self.node.connection();
        if self.phase != Phase::Active || self.node.reconciled() || self.looked_under == connection
        {
            return;
        }
        let listing = match self.node.listing_since_connect().await {
            Ok(listing) => listing,
            // Admitted as before: the reconciliation is still to come.
            Err(e) => {
                tracing::warn!(conference = %self.name, error = %e, "cannot compare the conference with Asterisk before admitting a newcomer; the reconciliation will");
                return;
            }
        };
        self.looked_under = connection;
        // Shared, and perhaps older than this conference's latest changes: reconcile() takes
        // nothing from a listing older than a bridge or a participant.
        let (mains, holdings) = self.own_bridges(listing.bridges.clone());
        let listed: HashSet<String> = listing.channels.iter().map(|c| c.id.clone()).collect();
        let members: HashMap<String, Channel> = listing
            .channels
            .iter()
            .filter(|c| {
                mains
                    .iter()
                    .chain(holdings.iter())
                    .any(|b| b.channels.contains(&c.id))
            })
            .map(|c| (c.id.clone(), c.clone()))
            .collect();
        let bridged: HashSet<String> = listing
            .bridges
            .iter()
            .flat_map(|b| b.channels.iter().cloned())
            .collect();
        let unbridged =
            crate::reconcile::unbridged(&self.node.cfg.ari.app, &bridged, &listing.channels);
        let main = self.one_bridge(mains, &self.main.clone()).await;
        let holding = self.one_bridge(holdings, &self.holding.clone()).await;
        self.reconcile(main, holding, &members, &listed, &unbridged, listing.taken)
            .await;
    }

    /// This conference's mixing and holding bridges among `bridges` (any lifetime's).
    fn own_bridges(&self, bridges: Vec<Bridge>) -> (Vec<Bridge>, Vec<Bridge>) {
        let (mut mains, mut holdings) = (Vec::new(), Vec::new());
        for b in bridges {
            match parse_bridge_id(&b.id) {
                Some((true, _, name)) if name == self.name => holdings.push(b),
                Some((false, _, name)) if name == self.name => mains.push(b),
                _ => {}
            }
        }
        (mains, holdings)
    }

    /// Why a newcomer cannot enter when the fence is not this node's own; a conference
    /// found owned elsewhere is given up here.
    async fn not_owned(&mut self, fence: Fence) -> Refusal {
        match fence {
            Fence::Elsewhere { node, sip_uri } => {
                if self.phase == Phase::Active {
                    self.lost(&node).await;
                }
                Refusal::Elsewhere { node, sip_uri }
            }
            Fence::NotServing => Refusal::NotServing,
            Fence::Unavailable(why) => Refusal::Unavailable(why),
            Fence::Owned(_) => Refusal::Unavailable("the conference's claim changed".into()),
        }
    }

    /// Writes a count of 1 for the first one into an empty conference, while this node
    /// owns it; a claim found re-established by this node at another epoch is followed once.
    /// The conference's settings (its ConferenceSid among them) go in with it: the join's
    /// callbacks are queued before the next count write, and an agent restarted in between
    /// must adopt the conference under the sid the application was told.
    async fn count_first_in(&mut self) -> Result<(), Refusal> {
        for _ in 0..2 {
            let owner = Owner {
                node: self.node.id.clone(),
                epoch: self.epoch,
            };
            let settings = self
                .settings
                .as_deref()
                .filter(|_| !self.settings_saved && !self.settings_unread);
            let with_settings = settings.is_some();
            match self
                .node
                .store
                .set_participants(
                    &self.name,
                    &owner,
                    1,
                    self.node.next_count_version(),
                    settings,
                )
                .await
            {
                Ok(true) => {
                    self.settings_saved |= with_settings;
                    return Ok(());
                }
                Ok(false) => match self.fence().await {
                    Fence::Owned(epoch) => {
                        // A new claim is a new record: the next count writes the settings.
                        self.epoch = epoch;
                        self.settings_saved = false;
                        self.publish();
                    }
                    other => return Err(self.not_owned(other).await),
                },
                Err(e) => return Err(Refusal::Unavailable(e.to_string())),
            }
        }
        Err(Refusal::Unavailable(
            "the conference's claim kept changing while admitting".into(),
        ))
    }

    async fn join(&mut self, j: Join) {
        self.bring_in(j).await;
        // Whatever came of it, the seat it held (being admitted, or a dial-out's callee
        // ringing) is given back or taken: the view the heartbeat counts from says so now,
        // not at the conference's next change, which a quiet call may never have.
        self.admitting = false;
        self.publish();
        // Callers the admission adopted after a restart may make a start that a newcomer
        // refused or gone never made; the reconciliation may be a while yet.
        self.start_if_due().await;
    }

    async fn bring_in(&mut self, j: Join) {
        let ch = j.channel.id.clone();
        match self.admit(&j.options).await {
            Ok(()) => {
                self.admitting = true;
                self.publish();
            }
            // A refused joiner may have been all the conference had (a dial-out's callee,
            // its `dialing` entry gone once it answered): an empty conference ends rather
            // than keep its bridge and claim with nobody to end it.
            Err(Refusal::Elsewhere { node, sip_uri }) => {
                self.wrong_node(&j.channel, &node, &sip_uri).await;
                self.end_if_empty("join_refused").await;
                return;
            }
            Err(Refusal::NotServing) => {
                tracing::info!(conference = %self.name, state = %self.node.state(), "no claim and this node takes no new conference; refusing");
                self.refuse(&ch, CAUSE_UNAVAILABLE, "not_serving").await;
                self.end_if_empty("join_refused").await;
                return;
            }
            Err(Refusal::Unavailable(why)) => {
                tracing::warn!(conference = %self.name, error = %why, "cannot check ownership in Redis; refusing the new joiner");
                self.refuse(&ch, CAUSE_UNAVAILABLE, "redis_unavailable")
                    .await;
                self.end_if_empty("join_refused").await;
                return;
            }
            Err(Refusal::Full) => {
                tracing::info!(conference = %self.name, max = self.max_participants, "conference full; refusing with busy");
                self.refuse_full(&j.channel).await;
                self.end_if_empty("join_refused").await;
                return;
            }
            Err(Refusal::Bridge(e)) => {
                tracing::error!(conference = %self.name, error = %e, "cannot create the conference bridge");
                self.refuse(&ch, CAUSE_UNAVAILABLE, "ari_error").await;
                self.end_if_empty("bridge_failed").await;
                return;
            }
        }
        if !j.channel.state.eq_ignore_ascii_case("Up") {
            if let Err(e) = self.node.ari.answer(&ch).await {
                self.join_failed(&ch, &e).await;
                return;
            }
        }
        let waiting = self.joins_waiting(&j.options);
        if waiting {
            if let Err(e) = self.ensure_holding(&j.options.wait_music).await {
                tracing::error!(conference = %self.name, error = %e, "cannot create the holding bridge");
                self.refuse(&ch, CAUSE_UNAVAILABLE, "ari_error").await;
                self.end_if_empty("bridge_failed").await;
                return;
            }
        }
        // Muted on the channel, not with addChannel's bridge `mute`: a bridge mute only a
        // new addChannel takes off, and adding a channel to the bridge it is in makes it
        // leave first, which takes a lone member's wait music or recording along (lonely
        // bridge members, main/bridge.c). Asterisk runs the channel's commands in order, so
        // the mute is on before the channel is in the bridge.
        if j.options.muted {
            if let Err(e) = self.node.ari.mute(&ch, "in", true).await {
                self.join_failed(&ch, &e).await;
                return;
            }
        }
        if let Err(e) = self.add(&ch, waiting, &j.options).await {
            self.join_failed(&ch, &e).await;
            return;
        }
        // Adding it can end the conference (a recording's count write found the claim
        // gone, under `on_ownership_lost = end`): the newcomer is hung up like the others,
        // not recorded in a conference that is over and left in silence with no actor.
        if self.phase == Phase::Idle {
            tracing::info!(conference = %self.name, channel = %ch, "the conference ended as the caller joined; hanging it up");
            if let Err(e) = self.node.hang_up(&ch, CAUSE_NORMAL).await {
                tracing::warn!(channel = %ch, error = %e, "cannot hang up a caller whose conference ended as it joined");
            }
            return;
        }
        let muted = j.options.muted;
        let mut p = Participant::new(j.options, waiting, muted, j.channel.caller.number.clone());
        if let Some(tech) = j.channel.name.split('/').next().filter(|t| !t.is_empty()) {
            p.tech = tech.to_string();
        }
        self.entered(&ch, p, None).await;
        self.sync_caller_hold(&ch);
    }

    /// Bookkeeping once a channel is in one of the conference's bridges: the participant
    /// is recorded, announced (metrics, status callback, bus event), starts the conference
    /// or beeps as its options say, and a dial-out's callee counts as connected.
    async fn entered(&mut self, ch: &str, p: Participant, moved_from: Option<&ConferenceName>) {
        // In now: counted as a participant from here on.
        self.admitting = false;
        self.heard_of = true;
        let waiting = p.waiting;
        let starts = self.starts_with(&p);
        // A waiter that starts the conference (`lone_starter_waits`) is in the mix by the
        // time the beep plays, and the beep is what tells the one waiting alone it started.
        let beep_in = (!waiting || starts) && p.options.beep.on_enter();
        let data = json!({
            "participant": ch,
            "caller": p.caller,
            "muted": p.muted,
            "waiting": waiting,
            "moved_from": moved_from.map(ConferenceName::as_str),
        });
        self.participants.insert(ch.to_string(), p);
        self.node
            .metrics
            .join(if waiting { "waiting" } else { "joined" });
        tracing::info!(conference = %self.name, channel = %ch, waiting, participants = self.participants.len(), "participant joined");
        self.callback_participant(CallbackEvent::Join, "participant-join", ch);
        self.emit("join", data);
        if !self.announced {
            // Recorded before the entry's ARI work: an agent restarted from here on tells
            // this conference's end, under the sid the join named.
            self.announced = true;
            if let Some(text) = self.settings.as_deref() {
                self.settings = Some(settings::with_announced(text, true));
                self.settings_saved = false;
                self.counts_changed().await;
            }
        }
        self.node.dialouts.connected(&self.node, ch);
        if starts {
            self.start(ch).await;
        }
        if beep_in {
            self.beep().await;
        }
        self.counts_changed().await;
    }

    /// Whether a participant coming in now with `opts` waits in the holding bridge: before
    /// the start, unless it starts the conference (a starter; with
    /// `conference.lone_starter_waits`, only one that finds someone already there).
    fn joins_waiting(&self, opts: &Options) -> bool {
        if self.started {
            return false;
        }
        !opts.start_on_enter
            || (self.lone_starter_waits() && self.present() + 1 < self.start_needs())
    }

    /// Whether `p`, coming in now (not yet counted), starts the conference. With
    /// `conference.lone_starter_waits` it takes two participants, one of them a starter, as
    /// Twilio's conferences do: a second caller starts it for a starter waiting alone.
    fn starts_with(&self, p: &Participant) -> bool {
        if self.started {
            return false;
        }
        if !self.lone_starter_waits() {
            return p.options.start_on_enter;
        }
        self.present() + 1 >= self.start_needs()
            && (p.options.start_on_enter || self.waiting_starter().is_some())
    }

    fn lone_starter_waits(&self) -> bool {
        self.node.cfg.conference.lone_starter_waits
    }

    /// Participants a start takes: two, as Twilio's, but one where only one may be in.
    fn start_needs(&self) -> usize {
        if self.max_participants <= 1 {
            1
        } else {
            2
        }
    }

    /// A starter waiting here for the start (not on hold, not on its way out).
    fn waiting_starter(&self) -> Option<String> {
        self.participants
            .iter()
            .find(|(_, p)| {
                p.waiting && !p.held && !p.moving && !p.redirected && p.options.start_on_enter
            })
            .map(|(id, _)| id.clone())
    }

    /// Participants that are here, staying (not being moved out, nor transferred to another
    /// node) and not on hold: the ones a start would put in the mix. A held one would leave
    /// a lone starter in a silent mix (`lone_starter_waits`), as a held starter starts
    /// nothing.
    fn present(&self) -> usize {
        self.participants
            .values()
            .filter(|p| !p.moving && !p.redirected && !p.held)
            .count()
    }

    /// With `conference.lone_starter_waits`, starts a conference whose waiters make one now
    /// (a move out refused, callers adopted after a restart): nothing else would, and they
    /// would wait with music for a third caller.
    async fn start_if_due(&mut self) {
        if self.phase == Phase::Idle || self.started || !self.lone_starter_waits() {
            return;
        }
        if self.present() < self.start_needs() {
            return;
        }
        let Some(by) = self.waiting_starter() else {
            return;
        };
        // Adopted from its holding bridge alone, the conference may have no mix yet.
        if !self.main_created {
            if let Err(e) = self.create_main().await {
                tracing::error!(conference = %self.name, error = %e, "cannot create the conference bridge to start it");
                return;
            }
        }
        self.start(&by).await;
        self.publish();
    }

    /// Whom a repeated `start` event names as its starter: a participant in the mix, one
    /// with `startConferenceOnEnter` first; `None` when the mix is empty.
    fn started_by_in_mix(&self) -> Option<String> {
        self.participants
            .iter()
            .filter(|(_, p)| !p.waiting && !p.held && !p.moving)
            .max_by_key(|(_, p)| p.options.start_on_enter)
            .map(|(id, _)| id.clone())
    }

    /// A start cut short by an agent restart (some waiters moved into the mix, others not),
    /// or one that could not move a waiter, left adopted waiters in the holding bridge of a
    /// started conference: they are moved in now. Whether the last life sent the start's
    /// callback and started its recording cannot be told (they follow the moves), and twice
    /// would be worse than never: only the `start` event goes out again, so that subscribers
    /// see who no longer waits (a repeat tells them nothing false).
    async fn finish_cut_short_start(&mut self) {
        if !self.started {
            return;
        }
        let waiter = |p: &Participant| p.waiting && !p.held && !p.moving && !p.redirected;
        if !self.participants.values().any(waiter) {
            return;
        }
        // Its mix may be gone (destroyed while the agent was away): made again first, as a
        // start makes it, or every move would fail and the waiters stay on music.
        if !self.main_created {
            if let Err(e) = self.create_main().await {
                tracing::error!(conference = %self.name, error = %e, "cannot create the conference bridge to move the waiters in");
                return;
            }
        }
        let by = self.started_by_in_mix();
        let mut moved = self.move_waiters_in().await;
        moved.sort();
        tracing::info!(conference = %self.name, moved = moved.len(), "moved in the callers a start cut short left waiting");
        self.emit(
            "start",
            json!({"started_by": by, "no_longer_waiting": moved}),
        );
        self.tidy_holding().await;
        self.publish();
    }

    /// `addChannel` of `ids` into `bridge`, with each participant among them marked as being
    /// placed while the request is under way (see [`Participant::placed_at`]).
    async fn bridge_add(&mut self, bridge: &str, ids: &[&str]) -> Result<(), AriError> {
        self.bridge_add_counted(bridge, ids).await.1
    }

    /// [`Conference::bridge_add`], also saying how many of `ids`, from the first, are in
    /// (a long list goes in several requests; those before a failure went through).
    async fn bridge_add_counted(
        &mut self,
        bridge: &str,
        ids: &[&str],
    ) -> (usize, Result<(), AriError>) {
        self.mark_placed(ids);
        let result = self.node.ari.add_channels(bridge, ids).await;
        self.mark_placed(ids);
        result
    }

    fn mark_placed(&mut self, ids: &[&str]) {
        let now = Instant::now();
        for id in ids {
            if let Some(p) = self.participants.get_mut(*id) {
                p.placed_at = now;
            }
        }
    }

    /// Moves `ch` out of the mix into the holding bridge, made first if need be (and made
    /// again once if it vanished, as [`Conference::add`] does).
    async fn move_to_holding(&mut self, ch: &str, opts: &Options) -> Result<(), AriError> {
        self.ensure_holding(&opts.wait_music).await?;
        self.add(ch, true, opts).await
    }

    /// `addChannel` into the mixing or the holding bridge. A bridge that vanished (404:
    /// destroyed behind the agent's back) is created again once.
    async fn add(&mut self, ch: &str, waiting: bool, opts: &Options) -> Result<(), AriError> {
        self.node.stop_playbacks(ch).await;
        let mut recreated = false;
        loop {
            let bridge = if waiting {
                self.holding.clone()
            } else {
                self.main.clone()
            };
            match self.bridge_add(&bridge, &[ch]).await {
                Ok(()) if !waiting => {
                    self.record_on().await;
                    return Ok(());
                }
                Err(e) if e.kind == AriErrorKind::NotFound && !recreated => {
                    tracing::warn!(conference = %self.name, bridge = %bridge, "bridge vanished; creating it again");
                    recreated = true;
                    if waiting {
                        self.renew_holding(&opts.wait_music, ch).await?;
                    } else {
                        self.main_created = false;
                        self.create_main().await?;
                    }
                }
                other => return other,
            }
        }
    }

    /// Until the first reconciliation after a (re)connect has run, Asterisk may still hold
    /// bridges of this conference made before an agent restart: the newcomer joins those,
    /// with the callers still in them, not a new lifetime's, so the conference stays in one
    /// mix.
    async fn find_bridges(&mut self) -> Result<(), AriError> {
        if self.node.reconciled() {
            return Ok(());
        }
        let bridges = match self.node.ari.list_bridges().await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(conference = %self.name, error = %e, "cannot look for bridges left from before a restart; refusing the newcomer for now");
                return Err(e);
            }
        };
        let (mains, holdings) = self.own_bridges(bridges);
        let mut members: Vec<(String, bool)> = Vec::new();
        let holding_found = !holdings.is_empty();
        if let Some(b) = self.one_bridge(holdings, "").await {
            members.extend(b.channels.iter().map(|c| (c.clone(), true)));
            self.holding = b.id;
            self.holding_created = true;
        }
        if let Some(b) = self.one_bridge(mains, "").await {
            tracing::info!(conference = %self.name, bridge = %b.id, "using the conference bridge left from before a restart");
            members.extend(b.channels.iter().map(|c| (c.clone(), false)));
            self.main = b.id;
            self.main_created = true;
            self.main_created_at = Instant::now();
        }
        if !members.is_empty() {
            // Not the newcomer's settings: those of the conference it walks into.
            self.resume_settings().await;
            self.started = members.iter().any(|(_, waiting)| !waiting)
                || !holding_found
                || std::mem::take(&mut self.kept_started);
            if self.started {
                self.mark_started();
            }
            self.recording_inherited = self.started;
            self.settle_inherited_recording().await;
            let none = HashMap::new();
            let adopted = members
                .iter()
                .map(|(id, waiting)| self.adopted(id, &none, *waiting));
            for (id, p) in futures_util::future::join_all(adopted).await {
                if self.node.claim_adopted(&id, &self.name) {
                    self.participants.insert(id, p);
                } else {
                    // Gone while its options were read: it leaves, without the conference
                    // ending as its last participant would (the newcomer is on its way in).
                    self.left_while_adopted(&id, &p);
                }
            }
            tracing::info!(conference = %self.name, participants = self.participants.len(), "adopted the callers left in the conference's bridges from before a restart");
            self.finish_cut_short_start().await;
        }
        self.publish();
        Ok(())
    }

    async fn create_main(&mut self) -> Result<(), AriError> {
        let mut types = String::from("mixing,dtmf_events");
        if self.node.cfg.ari.proxy_media {
            types.push_str(",proxy_media");
        }
        let created = self
            .node
            .ari
            .create_bridge(&self.main, &types, self.name.as_str())
            .await?;
        if !created {
            tracing::info!(bridge = %self.main, "conference bridge exists already; using it");
        }
        self.main_created = true;
        self.main_created_at = Instant::now();
        // A bridge made again (Asterisk restarted) is a new one to follow.
        self.followed = None;
        Ok(())
    }

    async fn ensure_holding(&mut self, moh: &str) -> Result<(), AriError> {
        // A retry at most every few seconds: one that times out holds the actor for a whole
        // `ari.request_timeout`, which each waiter of a burst would pay.
        let retry = self
            .holding_music_failed
            .is_some_and(|at| at.elapsed() >= MUSIC_RETRY_EVERY);
        if self.holding_created && !retry {
            return Ok(());
        }
        if !self.holding_created {
            self.node
                .ari
                .create_bridge(&self.holding, "holding", self.name.as_str())
                .await?;
            self.holding_created = true;
        }
        // Music that did not start is asked again for the next caller put here, rather than
        // leave everyone waiting in silence for the bridge's life.
        match self.node.ari.start_bridge_moh(&self.holding, moh).await {
            Ok(()) => self.holding_music_failed = None,
            Err(e) => {
                self.holding_music_failed = Some(Instant::now());
                tracing::warn!(conference = %self.name, error = %e, "cannot start wait music; asking again for the next caller who waits")
            }
        }
        Ok(())
    }

    /// A starter joined: everyone waiting moves into the mixing bridge (except those put on
    /// hold, who stay with the music, now held in a started conference, and those being
    /// moved to another conference, whose new bridge has them), recording starts.
    async fn start(&mut self, by: &str) {
        self.started = true;
        self.mark_started();
        let mut unwaited = self.move_waiters_in().await;
        unwaited.sort();
        self.emit(
            "start",
            json!({"started_by": by, "no_longer_waiting": unwaited}),
        );
        self.tidy_holding().await;
        if self.record == Record::RecordFromStart {
            self.start_recording().await;
        }
        tracing::info!(conference = %self.name, "conference started");
        if let Some(cb) = &mut self.callbacks {
            cb.send(CallbackEvent::Start, "conference-start", None, &[]);
        }
    }

    /// Starts recording the mixing bridge, unless a recording of it is under way.
    /// Has the app follow the mixing bridge for itself, once per bridge (see
    /// [`Conference::followed`]); a failure is logged, and reconciliation still finds a
    /// recording that ended unheard.
    async fn follow_main(&mut self) {
        if self.followed.as_deref() == Some(self.main.as_str()) || self.main.is_empty() {
            return;
        }
        match self
            .node
            .ari
            .follow_bridge(&self.node.cfg.ari.app, &self.main)
            .await
        {
            Ok(()) => self.followed = Some(self.main.clone()),
            Err(e) => {
                tracing::warn!(conference = %self.name, bridge = %self.main, error = %e, "cannot follow the mixing bridge; a recording's end may be seen only at a reconciliation")
            }
        }
    }

    async fn start_recording(&mut self) {
        if self.recording.is_some()
            || self.recording_inherited
            || self.recording_failed
            || !self.main_created
        {
            return;
        }
        self.follow_main().await;
        let name = recording_name(&self.name, self.epoch);
        match self
            .node
            .ari
            .record_bridge(
                &self.main,
                &name,
                &self.node.cfg.conference.recording_format,
            )
            .await
        {
            Ok(()) => {
                tracing::info!(conference = %self.name, recording = %name, "recording started");
                self.recording = Some(name);
                self.note_recording().await;
            }
            // A format this Asterisk has no module for (422), options it refuses (400): the
            // same answer at every join, so this life records no more.
            Err(e)
                if matches!(
                    e.kind,
                    AriErrorKind::Unprocessable | AriErrorKind::BadRequest | AriErrorKind::TooLong
                ) =>
            {
                tracing::error!(conference = %self.name, error = %e, format = %self.node.cfg.conference.recording_format, "cannot start recording; not trying again in this conference (conference.recording_format is a file extension of a format module Asterisk has loaded, e.g. wav)");
                self.recording_failed = true;
            }
            // Asterisk may have started it all the same, answering late (or the request may
            // never have left: no free connection): Asterisk says which. One under way is
            // kept, so the next join does not start a second recording (a second file).
            Err(e) if e.kind == AriErrorKind::Timeout => {
                match self.node.ari.live_recording_exists(&name).await {
                    Ok(true) => {
                        tracing::warn!(conference = %self.name, recording = %name, error = %e, "no answer to the recording's start, but it is under way");
                        self.recording = Some(name);
                        self.note_recording().await;
                    }
                    _ => {
                        tracing::error!(conference = %self.name, error = %e, "cannot start recording")
                    }
                }
            }
            Err(e) => {
                tracing::error!(conference = %self.name, error = %e, "cannot start recording")
            }
        }
    }

    /// Reads again the options of participants adopted with defaults because Asterisk did
    /// not answer (see [`Participant::options_unread`]), and applies them: its channel
    /// variables say what the participant joined with and what call control changed since
    /// (mute, `participant.update`). A mute they show is made Asterisk's too; this is a
    /// correction of what the agent believed, so it sends no event. Participants adopted
    /// within `taken`'s pass wait for the next one (their reads just failed), and the others
    /// are read together, so a pass waits for one round of reads at most.
    async fn reread_options(&mut self, taken: Instant) {
        let unread = self.adopted_unread(taken, |p| p.options_unread);
        if unread.is_empty() {
            // A hold mark is read on its own: one left unread while the options were read
            // still needs its pass.
            self.reread_holds(taken).await;
            return;
        }
        let node = self.node.clone();
        let reads = unread.iter().map(|id| {
            let channel = Channel {
                id: id.clone(),
                ..Channel::default()
            };
            let node = node.clone();
            async move { crate::join::option_variables(&node, &channel).await }
        });
        let results = futures_util::future::join_all(reads).await;
        for (id, (vars, failed)) in unread.into_iter().zip(results) {
            if let Some(e) = failed {
                tracing::warn!(conference = %self.name, channel = %id, error = %e, "still cannot read an adopted participant's options; trying again at the next reconciliation");
                continue;
            }
            let (opts, _) =
                options::resolve(&self.node.cfg.conference, &self.node.cfg.profiles, &vars);
            let muted = opts.muted;
            let Some(was_muted) = self.participants.get(&id).map(|p| p.muted) else {
                continue;
            };
            if muted != was_muted {
                if let Err(e) = self.node.ari.mute(&id, "in", muted).await {
                    tracing::warn!(conference = %self.name, channel = %id, error = %e, "cannot set an adopted participant's mute on its channel; trying again at the next reconciliation");
                    continue;
                }
            }
            if let Some(p) = self.participants.get_mut(&id) {
                p.options = opts;
                p.muted = muted;
                p.options_unread = false;
            }
            tracing::info!(conference = %self.name, channel = %id, muted, "read an adopted participant's options at last");
            self.adopted_read();
        }
        self.reread_holds(taken).await;
    }

    /// Participants adopted before `taken`'s pass, not being moved, for which `unread` holds.
    fn adopted_unread(&self, taken: Instant, unread: impl Fn(&Participant) -> bool) -> Vec<String> {
        self.participants
            .iter()
            .filter(|(_, p)| unread(p) && !p.moving && p.since < taken)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Something an adoption could not read was read at last and applied.
    fn adopted_read(&self) {
        self.node
            .metrics
            .reconcile_actions
            .with_label_values(&["read_adopted_options"])
            .inc();
        self.publish();
    }

    /// Reads again the hold mark of participants adopted on hold because it could not be read
    /// (see [`Participant::held_unread`]): one the mark does not say is held (a waiter whose
    /// move into the started mix a restart cut short) joins the mix. A correction of what the
    /// agent believed, so it sends no event.
    async fn reread_holds(&mut self, taken: Instant) {
        let unknown = self.adopted_unread(taken, |p| p.held_unread);
        let mut moved = false;
        for id in unknown {
            let channel = Channel {
                id: id.clone(),
                ..Channel::default()
            };
            let held = match crate::join::variable(&self.node, &channel, options::VAR_HELD).await {
                Ok(v) => v.is_some_and(|v| v == "true"),
                Err(e) => {
                    tracing::warn!(conference = %self.name, channel = %id, error = %e, "still cannot read whether an adopted participant is held; trying again at the next reconciliation");
                    continue;
                }
            };
            if !held {
                let Some(opts) = self.participants.get(&id).map(|p| {
                    let mut o = p.options.clone();
                    o.muted = p.muted;
                    o
                }) else {
                    continue;
                };
                if let Err(e) = self.add(&id, false, &opts).await {
                    tracing::warn!(conference = %self.name, channel = %id, error = %e, "cannot move an adopted participant that is not held into the mix; trying again at the next reconciliation");
                    continue;
                }
                moved = true;
            }
            if let Some(p) = self.participants.get_mut(&id) {
                p.held_unread = false;
                if !held {
                    p.held = false;
                    p.waiting = false;
                }
            }
            tracing::info!(conference = %self.name, channel = %id, held, "read an adopted participant's hold mark at last");
            self.adopted_read();
        }
        // One moved into the mix may have been the holding bridge's last member: Asterisk
        // then took its music away with it, and a bridge kept would put the next caller held
        // there in silence. It goes, as after any last leave; the next one is made with music.
        if moved {
            self.tidy_holding().await;
        }
    }

    /// Reconciliation: a participant redirected to another node that Asterisk still lists
    /// [`REDIRECT_GRACE`] after was refused the transfer by its far end. It is a participant
    /// here again (its hangup a leave, not a move), and subscribers hear `move_failed`. True
    /// when there was one.
    fn check_redirects(&mut self, listed: &HashSet<String>, taken: Instant) -> bool {
        let refused: Vec<(String, ConferenceName)> = self
            .participants
            .iter()
            .filter(|(id, p)| p.redirected && listed.contains(*id))
            .filter_map(|(id, p)| {
                let (at, to) = p.redirect.as_ref()?;
                (taken.checked_duration_since(*at)? >= REDIRECT_GRACE)
                    .then(|| (id.clone(), to.clone()))
            })
            .collect();
        let any = !refused.is_empty();
        for (id, to) in refused {
            if let Some(p) = self.participants.get_mut(&id) {
                p.redirected = false;
                p.redirect = None;
            }
            tracing::warn!(conference = %self.name, channel = %id, to = %to, "a participant redirected to another node is still here: its phone or trunk refused the transfer; it stays in this conference");
            self.node
                .metrics
                .reconcile_actions
                .with_label_values(&["redirect_refused"])
                .inc();
            self.emit(
                "move_failed",
                json!({"participant": id, "to": to.to_string()}),
            );
        }
        any
    }

    /// Reconciliation: a recording whose end was lost with the events WebSocket is taken as
    /// ended (and the conference records on).
    async fn check_recording(&mut self) {
        let Some(name) = self.recording.clone() else {
            return;
        };
        match self.node.ari.live_recording_exists(&name).await {
            Ok(false) => {
                tracing::warn!(conference = %self.name, recording = %name, "the recording ended unseen");
                self.recording_finished(&name).await;
            }
            Ok(true) => {}
            Err(e) => {
                tracing::debug!(conference = %self.name, error = %e, "cannot look at the recording")
            }
        }
    }

    /// Asterisk could not record (say the format is unknown to it, or the disk is full):
    /// this life records no more rather than fail again at every chance.
    async fn recording_failed(&mut self, name: &str) {
        if self.recording.as_deref() != Some(name) {
            return;
        }
        tracing::error!(conference = %self.name, recording = %name, "the conference recording failed; not recording again in this conference");
        self.recording = None;
        self.recording_failed = true;
        self.note_recording().await;
    }

    /// Notes in the settings (written with the next count, the join's) that the conference
    /// started: a restart that finds nobody in the mix, its callers on hold, then still
    /// knows. A conference with the default settings gets settings for it.
    fn mark_started(&mut self) {
        let text = self.settings.as_deref().unwrap_or("{}");
        self.settings = Some(settings::with_started(text));
        self.settings_saved = false;
    }

    /// Keeps the recording under way (or that none is) in the settings in Redis, for an
    /// agent that restarts: ARI cannot tell it.
    async fn note_recording(&mut self) {
        if let Some(text) = &self.settings {
            self.settings = Some(settings::with_recording(text, self.recording.as_deref()));
            self.settings_saved = false;
            self.counts_changed().await;
        }
    }

    /// A started conference adopted after a restart: the kept settings say which recording
    /// the last life had under way, if any, and Asterisk whether it still is. Unknown (settings
    /// of an agent before this one, or Asterisk out of reach), the last life's recording may
    /// still run: none is started until Asterisk reports it ended.
    async fn settle_inherited_recording(&mut self) {
        let kept = self.kept_recording.take();
        if !self.recording_inherited {
            return;
        }
        // Its end is awaited: heard however the mix empties.
        self.follow_main().await;
        let live = match kept {
            None => return,
            Some(None) => None,
            Some(Some(name)) => match self.node.ari.live_recording_exists(&name).await {
                Ok(true) => Some(name),
                Ok(false) => None,
                Err(e) => {
                    tracing::warn!(conference = %self.name, recording = %name, error = %e, "cannot ask whether the last life's recording runs; recording no more until it is seen to end");
                    return;
                }
            },
        };
        self.recording_inherited = false;
        match live {
            Some(name) => {
                tracing::info!(conference = %self.name, recording = %name, "the last life's recording goes on");
                self.recording = Some(name);
                self.note_recording().await;
            }
            None => {
                self.note_recording().await;
                // Asterisk ended it with the mix: on again now if the mix has someone, else
                // with the next participant added to it.
                if matches!(self.node.ari.get_bridge(&self.main).await, Ok(Some(b)) if !b.channels.is_empty())
                {
                    self.record_on().await;
                }
            }
        }
    }

    /// Records the mix again after someone was added to it, if the conference records and
    /// its recording ended meanwhile (see [`Conference::recording_finished`]).
    async fn record_on(&mut self) {
        if self.started && self.phase != Phase::Idle && self.record == Record::RecordFromStart {
            self.start_recording().await;
        }
    }

    /// A recording of this conference finished. One the agent did not stop was ended by
    /// Asterisk: the recording is a lonely member of the bridge (a Recorder channel) that
    /// leaves with the last participant in the mix, for instance when that one is put on
    /// hold. The conference goes on, so its recording does too, in a new file: now if the
    /// mix has someone in it again, else with the next participant added to it. Not when
    /// the mix is empty, which is also how a conference's last caller hanging up looks at
    /// this point (its leave comes after).
    async fn recording_finished(&mut self, name: &str) {
        let inherited =
            self.recording_inherited && recording_conference(name).as_ref() == Some(&self.name);
        if self.recording.as_deref() != Some(name) && !inherited {
            return;
        }
        self.recording = None;
        self.recording_inherited = false;
        self.note_recording().await;
        if !self.started || self.phase == Phase::Idle || self.record != Record::RecordFromStart {
            return;
        }
        match self.node.ari.get_bridge(&self.main).await {
            Ok(Some(b)) if !b.channels.is_empty() => {
                tracing::info!(conference = %self.name, recording = %name, "recording ended by Asterisk while the mix emptied; recording on in a new file");
                self.start_recording().await;
            }
            Ok(_) => {
                tracing::info!(conference = %self.name, recording = %name, "recording ended by Asterisk as the mix emptied; the next participant in the mix starts a new file");
            }
            // Better a file begun in an empty mix than the rest of the conference lost.
            Err(e) => {
                tracing::warn!(conference = %self.name, error = %e, "cannot look at the conference bridge; recording on in a new file");
                self.start_recording().await;
            }
        }
    }

    /// Moves the participants waiting in the holding bridge into the mix (a held one stays,
    /// no longer waiting); returns who stopped waiting, for the `start` event: without it a
    /// subscriber would see them still waiting, as their `join` said.
    async fn move_waiters_in(&mut self) -> Vec<String> {
        let mut unwaited: Vec<String> = Vec::new();
        for (id, p) in self.participants.iter_mut() {
            if p.waiting && p.held && !p.moving {
                p.waiting = false;
                unwaited.push(id.clone());
            }
        }
        let waiting: Vec<String> = self
            .participants
            .iter()
            // One being transferred to another node would hold the whole group's move up
            // until its transfer ends; it stays waiting (see `check_redirects`).
            .filter(|(_, p)| p.waiting && !p.held && !p.moving && !p.redirected)
            .map(|(id, _)| id.clone())
            .collect();
        // A participant's announcement would hold its move until it ends.
        let node = self.node.clone();
        futures_util::future::join_all(waiting.iter().map(|id| node.stop_playbacks(id))).await;
        let main = self.main.clone();
        let group: Vec<&str> = waiting.iter().map(String::as_str).collect();
        if group.is_empty() {
            return unwaited;
        }
        // Nothing runs start() again: one waiter hanging up as the starter joins must not
        // leave the others on hold music for good.
        let moved = self.add_all(&main, &group).await;
        let any = !moved.is_empty();
        for id in moved {
            if let Some(p) = self.participants.get_mut(id) {
                p.waiting = false;
                unwaited.push(id.to_string());
            }
        }
        if any {
            self.record_on().await;
        }
        unwaited
    }

    /// Destroys the holding bridge once nobody waits or is on hold in it. Its wait music is
    /// a lonely member (an Announcer channel) that Asterisk makes leave with the last
    /// caller, and forgets: a holding bridge kept for the next caller would be silent. The
    /// next one is made with its music.
    async fn tidy_holding(&mut self) {
        if !self.holding_created || self.participants.values().any(|p| p.waiting || p.held) {
            return;
        }
        if let Err(e) = self.node.ari.destroy_bridge(&self.holding).await {
            tracing::warn!(conference = %self.name, error = %e, "cannot destroy the holding bridge");
        }
        self.holding_created = false;
        // The next holding bridge gets an id of its own: this one's BridgeDestroyed may come
        // after it is made, and must not be taken for its end.
        self.holding = bridge_ids(&self.name, self.epoch, rand::random()).1;
    }

    async fn beep(&mut self) {
        if !self.main_created {
            return;
        }
        self.beeps += 1;
        let id = format!(
            "beep-{}-{}-{}",
            self.main,
            self.beeps,
            rand::random::<u32>()
        );
        let media = format!("sound:{}", self.node.cfg.conference.beep_sound);
        if let Err(e) = self.node.ari.play_on_bridge(&self.main, &id, &media).await {
            tracing::warn!(conference = %self.name, error = %e, "cannot play the beep");
        }
    }

    async fn join_failed(&mut self, ch: &str, e: &AriError) {
        // No longer being brought in: counted no more.
        self.admitting = false;
        // A caller hanging up while a request for it waits in its channel's queue gets that
        // request a plain failure (`answer`: 500); whether the channel is still there tells.
        // Only then: asking after a timeout would hold this conference up for another one.
        let queued_failure = e.kind == AriErrorKind::Server && e.status == Some(500);
        let gone = e.channel_gone()
            || (queued_failure && matches!(self.node.ari.channel_exists(ch).await, Ok(false)));
        if gone {
            tracing::info!(conference = %self.name, channel = ch, error = %e, "caller left while joining");
            self.node.metrics.join("abandoned");
        } else {
            tracing::error!(conference = %self.name, channel = ch, error = %e, "join failed");
            self.node.metrics.join("ari_error");
            let _ = self.node.hang_up(ch, CAUSE_UNAVAILABLE).await;
        }
        self.node.join_abandoned(ch);
        self.end_if_empty("join_failed").await;
    }

    async fn refuse(&self, ch: &str, cause: u16, outcome: &'static str) {
        self.node.metrics.join(outcome);
        self.node.join_abandoned(ch);
        if let Err(e) = self.node.hang_up(ch, cause).await {
            tracing::warn!(channel = ch, error = %e, "cannot hang up refused caller");
        }
    }

    /// A full conference: optional sound, then busy. Runs beside the actor so the sound
    /// does not hold up other callers. The sound goes out as early media: answering would
    /// turn the busy into a 200 and a BYE, billed as answered, that the edge cannot fail
    /// over. An Asterisk without `progress` (before 20.16, 21.11, 22.6) is asked to play all
    /// the same: its playback indicates progress itself to a channel not answered
    /// (res_stasis_playback.c `play_on_channel`).
    async fn refuse_full(&self, channel: &Channel) {
        let ch = channel.id.clone();
        self.node.metrics.join("full");
        self.node.join_abandoned(&ch);
        let sound = self.node.cfg.conference.full_sound.clone();
        let node = self.node.clone();
        let up = channel.state.eq_ignore_ascii_case("Up");
        tokio::spawn(async move {
            if !sound.is_empty() {
                let id = format!("full-{ch}");
                let done = node.wait_playback(&id);
                let early = if up {
                    Ok(())
                } else {
                    node.ari.progress(&ch).await
                };
                let played = match early {
                    Ok(()) => node
                        .ari
                        .play_on_channel(&ch, &id, &format!("sound:{sound}"))
                        .await
                        .is_ok(),
                    // No such route (or the caller gone, which the play finds out too).
                    Err(e) if e.kind == AriErrorKind::NotFound => {
                        tracing::debug!(channel = %ch, error = %e, "no progress request here; the playback gives the early media");
                        node.ari
                            .play_on_channel(&ch, &id, &format!("sound:{sound}"))
                            .await
                            .is_ok()
                    }
                    Err(e) => {
                        tracing::info!(channel = %ch, error = %e, "no early media for the conference-full sound; refusing with busy only");
                        false
                    }
                };
                if played {
                    let _ = tokio::time::timeout(FULL_SOUND_LIMIT, done).await;
                }
                node.forget_playback(&id);
            }
            if let Err(e) = node.hang_up(&ch, CAUSE_BUSY).await {
                tracing::warn!(channel = %ch, error = %e, "cannot hang up caller of a full conference");
            }
        });
    }

    async fn wrong_node(&self, channel: &Channel, owner: &NodeId, sip_uri: &str) {
        let ch = channel.id.as_str();
        self.node.join_abandoned(ch);
        let tech = channel.name.split('/').next().unwrap_or("PJSIP");
        // Only chan_pjsip answers an unanswered call's transfer with a 302, and only in state
        // `Ring` (`transfer()` in channels/chan_pjsip.c; otherwise a REFER, which an early
        // dialog cannot take). Other drivers transfer nothing, and ARI says nothing either
        // way: the caller would be left in the app.
        let can_redirect = self.node.cfg.node.wrong_node == WrongNodePolicy::Redirect
            && !sip_uri.is_empty()
            && tech.eq_ignore_ascii_case("PJSIP")
            && channel.state.eq_ignore_ascii_case("Ring");
        if can_redirect {
            let endpoint = redirect_endpoint(tech, sip_uri, self.name.as_str());
            match self.node.ari.redirect(ch, &endpoint).await {
                Ok(()) => {
                    tracing::info!(conference = %self.name, channel = ch, owner = %owner, %endpoint, "caller reached the wrong node; redirected to the owner");
                    self.node.metrics.join("redirected");
                    return;
                }
                Err(e) => {
                    tracing::warn!(conference = %self.name, channel = ch, error = %e, "redirect failed; hanging up instead");
                }
            }
        }
        tracing::info!(conference = %self.name, channel = ch, owner = %owner, "caller reached the wrong node; hanging up so the edge asks the router again");
        self.node.metrics.join("wrong_node_hangup");
        if let Err(e) = self.node.hang_up(ch, CAUSE_UNAVAILABLE).await {
            tracing::warn!(channel = ch, error = %e, "cannot hang up wrong-node caller");
        }
    }

    // ----- leaving -----

    async fn left(&mut self, ch: &str, reason: &'static str) {
        let Some(p) = self.participants.remove(ch) else {
            return;
        };
        let reason = if p.redirected && reason == "hangup" {
            "moved"
        } else {
            reason
        };
        self.node.metrics.leaves.with_label_values(&[reason]).inc();
        tracing::info!(conference = %self.name, channel = ch, participants = self.participants.len(), reason, "participant left");
        let (why, call_status) = twilio_leave(reason);
        self.callback_left(ch, &p, why, call_status);
        self.emit("leave", json!({"participant": ch, "reason": reason}));
        let in_mix = !p.waiting && !p.held;
        // Twilio tells a kick from a leave in the reason, so applications porting from it
        // do too.
        let kicked = reason == "kicked";
        // A starter waiting alone (`lone_starter_waits`) is the conference's moderator all
        // the same: its leaving calls off the callees still ringing for it.
        if p.options.end_on_exit
            && (!p.waiting || (self.lone_starter_waits() && p.options.start_on_enter))
        {
            let why = if kicked {
                "end_conference_on_exit_kicked"
            } else {
                "end_conference_on_exit"
            };
            self.end(why, Some(ch)).await;
            return;
        }
        if self.participants.is_empty() && self.dialing.is_empty() {
            let why = if kicked {
                "last_participant_kicked"
            } else {
                "last_participant_left"
            };
            // Its call ended the conference, as Twilio's CallSidEndingConference says.
            self.end(why, Some(ch)).await;
            return;
        }
        if in_mix
            && p.options.beep.on_exit()
            && self.participants.values().any(|p| !p.waiting && !p.held)
        {
            self.beep().await;
        }
        self.tidy_holding().await;
        self.counts_changed().await;
    }

    /// Adopted participants that left Stasis while they were being adopted leave now, as
    /// when their StasisEnd comes; false when the conference ended with them.
    async fn leave_gone(&mut self, gone: &[String]) -> bool {
        for id in gone {
            self.left(id, "hangup").await;
            if self.phase == Phase::Idle {
                return false;
            }
        }
        true
    }

    /// A caller left in the bridges from before a restart, gone while a newcomer's join
    /// adopted it: its leave is told (the last life told its join), and the conference goes
    /// on for the newcomer.
    fn left_while_adopted(&mut self, ch: &str, p: &Participant) {
        self.node
            .metrics
            .leaves
            .with_label_values(&["hangup"])
            .inc();
        tracing::info!(conference = %self.name, channel = ch, "a caller left from before the restart hung up while it was adopted");
        let (why, call_status) = twilio_leave("hangup");
        self.callback_left(ch, p, why, call_status);
        self.emit("leave", json!({"participant": ch, "reason": "hangup"}));
    }

    /// Catches up with the caller's own hold of a participant this conference just took in
    /// or got back: a ChannelHold that came while it was joining or moving reached no
    /// conference.
    fn sync_caller_hold(&mut self, ch: &str) {
        // A channel that left Stasis meanwhile has its leave on the way: no unhold before it.
        if let Some(held) = self.node.caller_held(ch) {
            self.hold(ch, held);
        }
    }

    /// The caller's phone put the call on hold or took it off (ChannelHold/ChannelUnhold).
    fn hold(&mut self, ch: &str, held: bool) {
        let Some(p) = self.participants.get_mut(ch) else {
            return;
        };
        if p.caller_held == held {
            return;
        }
        // A callback's `Hold` is one state, either hold: it is told when that changes, not
        // when a second hold comes on or one of two goes.
        let told = !p.held;
        p.caller_held = held;
        if told {
            self.callback_participant(
                CallbackEvent::Hold,
                if held {
                    "participant-hold"
                } else {
                    "participant-unhold"
                },
                ch,
            );
        }
        self.emit(
            if held { "hold" } else { "unhold" },
            json!({"participant": ch, "by": "caller"}),
        );
        self.publish();
    }

    /// Talk detection (ChannelTalkingStarted/Finished) on a participant.
    fn talking(&mut self, ch: &str, talking: bool) {
        let Some(p) = self.participants.get_mut(ch) else {
            return;
        };
        if p.talking == talking {
            return;
        }
        p.talking = talking;
        self.node.publish_talking(&self.name, ch, talking);
        self.emit(
            if talking {
                "talking_start"
            } else {
                "talking_stop"
            },
            json!({"participant": ch}),
        );
    }

    /// Ends the conference: recording stopped, remaining callers hung up, bridges destroyed,
    /// claim released by compare-and-delete, `end` sent.
    async fn end(&mut self, reason: &'static str, ended_by: Option<&str>) {
        if self.phase == Phase::Idle {
            return;
        }
        if let Some(rec) = self.recording.take() {
            match self.node.ari.stop_recording(&rec).await {
                Ok(()) => {
                    tracing::info!(conference = %self.name, recording = %rec, "recording stopped")
                }
                Err(e) => {
                    tracing::warn!(conference = %self.name, error = %e, "cannot stop recording")
                }
            }
        }
        // A caller being moved to another conference of this node is the target's now:
        // should the target refuse it after all, `moved_out` hangs it up. It leaves this one
        // by its move, and is told so before the end.
        let (moving, remaining): (Vec<_>, Vec<_>) = std::mem::take(&mut self.participants)
            .into_iter()
            .partition(|(_, p)| p.moving);
        for (ch, p) in &moving {
            self.node.metrics.leaves.with_label_values(&["moved"]).inc();
            let (why, call_status) = twilio_leave("moved");
            self.callback_left(ch, p, why, call_status);
            self.emit("leave", json!({"participant": ch, "reason": "moved"}));
        }
        let why = twilio_leave_at_end(reason);
        for (ch, p) in &remaining {
            self.node
                .metrics
                .leaves
                .with_label_values(&["conference_ended"])
                .inc();
            self.callback_left(ch, p, why, "completed");
            self.emit(
                "leave",
                json!({"participant": ch, "reason": "conference_ended"}),
            );
        }
        // A callee refused as it answered (the refusal is what ends the conference).
        if let Some((ch, opts)) = self.answering.take() {
            if !remaining.iter().any(|(id, _)| *id == ch) {
                self.callback_add_failed(&ch, &opts, "failed");
            }
        }
        let ringing = self.call_off_ringing();
        // Queued now, behind the leaves: the slow steps below (hangups, bridges, Redis, each
        // up to its timeout) must not keep it from a stop's last deliveries.
        if let Some(mut cb) = self.callbacks.take().filter(|_| self.heard_of) {
            send_end(&mut cb, reason, ended_by);
        }
        let node = &self.node;
        let hangups = remaining
            .iter()
            .map(|(ch, _)| ch)
            .chain(ringing.iter())
            .map(|ch| async move {
                if let Err(e) = node.hang_up(ch, CAUSE_NORMAL).await {
                    tracing::warn!(channel = %ch, error = %e, "cannot hang up participant");
                }
            });
        futures_util::future::join_all(hangups).await;
        for (created, id) in [
            (self.main_created, self.main.clone()),
            (self.holding_created, self.holding.clone()),
        ] {
            if created {
                if let Err(e) = self.node.ari.destroy_bridge(&id).await {
                    tracing::warn!(bridge = %id, error = %e, "cannot destroy bridge");
                }
            }
        }
        self.main_created = false;
        self.holding_created = false;
        if self.phase == Phase::Active {
            let owner = Owner {
                node: self.node.id.clone(),
                epoch: self.epoch,
            };
            match self.node.store.release(&self.name, &owner).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(conference = %self.name, "claim was no longer ours to release")
                }
                Err(e) => {
                    tracing::warn!(conference = %self.name, error = %e, "cannot release claim; it expires with its lease")
                }
            }
        }
        self.node
            .metrics
            .conferences_ended
            .with_label_values(&[reason])
            .inc();
        tracing::info!(conference = %self.name, reason, "conference ended");
        self.emit("end", json!({"reason": reason, "ended_by": ended_by}));
        self.phase = Phase::Idle;
        self.started = false;
        self.node.publish(&self.name, None);
    }

    // ----- ownership -----

    async fn lost(&mut self, new_owner: &NodeId) {
        if self.phase != Phase::Active {
            return;
        }
        self.phase = Phase::Lost;
        self.node.metrics.ownership_losses.inc();
        tracing::warn!(conference = %self.name, epoch = self.epoch, owner = %new_owner, participants = self.participants.len(), "lost ownership of the conference; admitting nobody new");
        self.emit(
            "owner_change",
            json!({"owner": new_owner, "previous": self.node.id, "epoch": self.epoch}),
        );
        if self.node.cfg.node.on_ownership_lost == LostPolicy::End || self.participants.is_empty() {
            self.end("ownership_lost", None).await;
        } else {
            // The callers stay, but a callee answering now would be refused (34): it is
            // not left ringing for a conference it can never join.
            let ringing = self.call_off_ringing();
            let node = &self.node;
            let hangups = ringing.iter().map(|ch| async move {
                if let Err(e) = node.hang_up(ch, CAUSE_NORMAL).await {
                    tracing::warn!(channel = %ch, error = %e, "cannot call off a ringing callee");
                }
            });
            futures_util::future::join_all(hangups).await;
            self.publish();
        }
    }

    /// Takes the callees still ringing out of the conference, their dial-outs called off
    /// (they end `rejected`, 487, once their channels go); returns their channels, for the
    /// caller to hang up.
    fn call_off_ringing(&mut self) -> Vec<String> {
        let ringing: Vec<(String, Options)> =
            std::mem::take(&mut self.dialing).into_iter().collect();
        for (ch, opts) in &ringing {
            self.callback_add_failed(ch, opts, "canceled");
        }
        ringing.into_iter().map(|(ch, _)| ch).collect()
    }

    async fn claim_status(&mut self, status: HostedStatus, epoch: u64) {
        if self.phase != Phase::Active {
            // Ended between the heartbeat's listing and its answer: the claim it made again
            // for the conference would otherwise keep routing callers here for a lease.
            if self.phase == Phase::Idle && status == HostedStatus::Reclaimed {
                let owner = Owner {
                    node: self.node.id.clone(),
                    epoch,
                };
                if let Err(e) = self.node.store.release(&self.name, &owner).await {
                    tracing::warn!(conference = %self.name, error = %e, "cannot release the claim of an ended conference; it expires with its lease");
                }
            }
            return;
        }
        match status {
            HostedStatus::Owned => {}
            HostedStatus::Reclaimed => {
                tracing::info!(conference = %self.name, epoch = self.epoch, "claim had expired while Redis was away; the heartbeat claimed it again");
                self.record_anew().await;
                self.counts_changed().await;
            }
            HostedStatus::Lost => match self.node.store.lookup(&self.name).await {
                // Same node, another epoch: the claim was made anew for this node (a restart of
                // ours, or a placement after the claim was given back): a new record, without
                // the settings and numbers.
                Ok(Some(rec)) if rec.owner.node == self.node.id => {
                    if rec.owner.epoch != self.epoch {
                        tracing::info!(conference = %self.name, from = self.epoch, to = rec.owner.epoch, "claim re-established at a new epoch");
                        self.epoch = rec.owner.epoch;
                        self.record_anew().await;
                        self.counts_changed().await;
                    } else {
                        self.publish();
                    }
                }
                Ok(Some(rec)) => self.lost(&rec.owner.node).await,
                // Gone since, or not known: the next heartbeat says again. Meanwhile a
                // newcomer's admission asks Redis itself (invariant 2 holds).
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(conference = %self.name, error = %e, "the heartbeat found the claim lost, and its new owner cannot be read; asking again at the next heartbeat")
                }
            },
            HostedStatus::Missing => {
                // The claim expired (Redis was away longer than the lease, or restarted
                // empty): claim it again; whoever holds it now wins.
                match self.fence().await {
                    Fence::Owned(e) => {
                        tracing::info!(conference = %self.name, epoch = e, "claim re-established after it expired");
                        self.epoch = e;
                        self.record_anew().await;
                        self.counts_changed().await;
                    }
                    Fence::Elsewhere { node, .. } => self.lost(&node).await,
                    Fence::NotServing | Fence::Unavailable(_) => {}
                }
            }
        }
    }

    /// The conference's record was made anew (its claim expired and was made again):
    /// without the settings, the count, and the callback and event numbers used, which a
    /// restart after it would otherwise number from the first blocks again.
    /// The next count write puts the settings back.
    async fn record_anew(&mut self) {
        self.settings_saved = false;
        if let Some(cb) = &mut self.callbacks {
            cb.record_numbering().await;
        }
        if !self.seq.record_again().await {
            tracing::warn!(conference = %self.name, "event numbers not recorded again; a restart may repeat some");
        }
    }

    // ----- reconciliation -----

    async fn bridge_gone(&mut self, bridge: &str) {
        if self.phase == Phase::Idle {
            return;
        }
        if bridge == self.holding {
            if !self.holding_created {
                return;
            }
            self.holding_created = false;
            // Destroyed outside the agent: Asterisk left its callers in the Stasis app, in
            // silence. They go back to waiting with music in a new holding bridge.
            let Some(music) = self
                .stranded_in_holding("")
                .first()
                .and_then(|id| self.participants.get(id))
                .map(|p| p.options.wait_music.clone())
            else {
                self.holding = bridge_ids(&self.name, self.epoch, rand::random()).1;
                return;
            };
            tracing::warn!(conference = %self.name, "holding bridge destroyed outside the agent; putting its callers back");
            if let Err(e) = self.renew_holding(&music, "").await {
                tracing::warn!(conference = %self.name, error = %e, "cannot make the holding bridge again");
            }
            return;
        }
        if bridge == self.main && self.main_created {
            self.main_created = false;
            tracing::warn!(conference = %self.name, "conference bridge destroyed outside the agent; ending the conference");
            self.end("bridge_gone", None).await;
        }
    }

    /// Those who wait or are held with music but `skip`, in the holding bridge as far as the
    /// agent knows.
    fn stranded_in_holding(&self, skip: &str) -> Vec<String> {
        self.participants
            .iter()
            .filter(|(id, p)| {
                (p.waiting || p.held) && !p.moving && !p.redirected && id.as_str() != skip
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The holding bridge is gone (destroyed outside the agent): a new one, under an id of
    /// its own, takes everyone who waited or was held in it but `skip` (whose own add comes
    /// next). The new id keeps the old bridge's `BridgeDestroyed`, which may come later, from
    /// being taken for the new one's end, and a bridge made again under the old id from being
    /// left behind, empty, when that event moves its callers on.
    async fn renew_holding(&mut self, music: &str, skip: &str) -> Result<(), AriError> {
        self.holding_created = false;
        self.holding = bridge_ids(&self.name, self.epoch, rand::random()).1;
        self.ensure_holding(music).await?;
        let stranded = self.stranded_in_holding(skip);
        if stranded.is_empty() {
            return Ok(());
        }
        for id in &stranded {
            self.node.stop_playbacks(id).await;
        }
        let ids: Vec<&str> = stranded.iter().map(String::as_str).collect();
        let holding = self.holding.clone();
        self.add_all(&holding, &ids).await;
        Ok(())
    }

    /// `addChannel` of `group` into `bridge`, in one request if it can; the ones in once it
    /// is over. Asterisk adds nobody when one channel of a list is gone or out of Stasis
    /// (`control_list_create` checks them all first): then the rest go one by one, those
    /// gone left out, so that one caller hanging up meanwhile strands no other. Any other
    /// failure (a timeout: Asterisk may still carry the list out) is left to reconciliation,
    /// rather than hold the actor a request deadline per caller.
    async fn add_all<'g>(&mut self, bridge: &str, group: &[&'g str]) -> Vec<&'g str> {
        match self.bridge_add_counted(bridge, group).await {
            (_, Ok(())) => group.to_vec(),
            (added, Err(e)) if group.len() - added > 1 && e.channel_gone() => {
                tracing::warn!(conference = %self.name, bridge, error = %e, "cannot add the participants together; adding them one by one");
                // Those a request before the failure added are in: adding one again would
                // have it leave the bridge first.
                let mut moved = group[..added].to_vec();
                for id in group[added..].iter().copied() {
                    match self.bridge_add(bridge, &[id]).await {
                        Ok(()) => moved.push(id),
                        Err(e) if e.channel_gone() => {
                            tracing::info!(conference = %self.name, channel = id, "participant left before it could be added");
                        }
                        Err(e) => {
                            tracing::error!(conference = %self.name, channel = id, bridge, error = %e, "cannot add a participant to the bridge");
                        }
                    }
                }
                moved
            }
            (added, Err(e)) => {
                tracing::error!(conference = %self.name, bridge, error = %e, "cannot add participants to the bridge");
                group[..added].to_vec()
            }
        }
    }

    /// Of the bridges of one kind found for this conference, the one to go on with: the
    /// actor's own, else (adopting after a restart) the one with the most callers. Callers
    /// in the others are moved into it, and the others destroyed: they are leftovers of an
    /// earlier lifetime, and taking one for the conference would leave the callers of the
    /// real one out of it.
    async fn one_bridge(&mut self, mut found: Vec<Bridge>, current: &str) -> Option<Bridge> {
        if found.len() <= 1 {
            return found.pop();
        }
        let pick = found
            .iter()
            .position(|b| b.id == current)
            .or_else(|| {
                found
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, b)| b.channels.len())
                    .map(|(i, _)| i)
            })
            .unwrap_or(0);
        let mut chosen = found.swap_remove(pick);
        for extra in found {
            tracing::warn!(conference = %self.name, keep = %chosen.id, leftover = %extra.id, callers = extra.channels.len(), "two bridges of one kind for the conference; merging the leftover into the other");
            if !extra.channels.is_empty() {
                let ids: Vec<&str> = extra.channels.iter().map(String::as_str).collect();
                let (added, result) = self.bridge_add_counted(&chosen.id, &ids).await;
                chosen
                    .channels
                    .extend(extra.channels.iter().take(added).cloned());
                if let Err(e) = result {
                    tracing::warn!(bridge = %extra.id, error = %e, "cannot move callers out of a leftover bridge");
                    continue;
                }
            }
            self.destroy_found(&extra.id, "merged_leftover_bridge")
                .await;
        }
        Some(chosen)
    }

    /// Destroys a bridge reconciliation found to be of no use, counted as `action`.
    async fn destroy_found(&self, id: &str, action: &str) {
        if let Err(e) = self.node.ari.destroy_bridge(id).await {
            tracing::warn!(bridge = %id, error = %e, action, "cannot destroy a bridge found by reconciliation");
        }
        self.node
            .metrics
            .reconcile_actions
            .with_label_values(&[action])
            .inc();
    }

    /// Brings the actor in line with Asterisk; returns whether it owns an active conference.
    async fn reconcile(
        &mut self,
        main: Option<Bridge>,
        holding: Option<Bridge>,
        members: &HashMap<String, Channel>,
        listed: &HashSet<String>,
        unbridged: &HashSet<String>,
        taken: Instant,
    ) -> bool {
        let in_main: Vec<String> = main
            .as_ref()
            .map(|b| b.channels.clone())
            .unwrap_or_default();
        let in_holding: Vec<String> = holding
            .as_ref()
            .map(|b| b.channels.clone())
            .unwrap_or_default();
        if self.phase == Phase::Idle {
            if main.is_none() && holding.is_none() {
                return false;
            }
            // The listing may be older than this conference's end: members that left Stasis
            // since, are being hung up (Asterisk answers that request before the channel
            // leaves) or belong elsewhere now (moved out as it ended) were in the conference
            // that ended, and are nobody to adopt.
            // The channels were listed after the bridges: a member missing there is gone,
            // whether or not its StasisEnd has been heard yet.
            let leaving = |c: &String| {
                !members.contains_key(c)
                    || self.node.ended_since_listing(c)
                    || self.node.hangup_under_way(c)
                    || self.node.routed_elsewhere(c, &self.name)
            };
            let in_main: Vec<String> = in_main.into_iter().filter(|c| !leaving(c)).collect();
            let in_holding: Vec<String> = in_holding.into_iter().filter(|c| !leaving(c)).collect();
            // Nobody to adopt: the bridges go. One the conference's end destroyed already
            // answers 404 (or 409 while it dissolves); one whose last callers left while the
            // agent was away is an orphan otherwise.
            if in_main.is_empty() && in_holding.is_empty() {
                for b in main.iter().chain(holding.iter()) {
                    self.destroy_found(&b.id, "destroyed_empty_bridge").await;
                }
                self.tell_ended_while_away(main.as_ref().or(holding.as_ref()))
                    .await;
                return false;
            }
            let fence = self.fence().await;
            let owned_epoch = match &fence {
                Fence::Owned(e) => Some(*e),
                Fence::Unavailable(why) => {
                    tracing::warn!(conference = %self.name, error = %why, "cannot check ownership while reconciling; will retry");
                    // Not "not here": the pass must not go on to release this claim.
                    self.reconcile_unsure = true;
                    return false;
                }
                _ => None,
            };
            // No claim, and claim.lua places nothing on this node now (draining, full, or its
            // ARI not yet reported up), while its callers are here: the reclaiming heartbeat
            // claims it back at its bridge's epoch, as for any hosted conference whose claim
            // went missing. Left unclaimed, the next caller would give it a second home.
            // The life its bridges were made in.
            let bridge_epoch = main
                .iter()
                .chain(holding.iter())
                .find_map(|b| parse_bridge_id(&b.id))
                .map(|(_, epoch, _)| epoch);
            let reclaim_at = match fence {
                Fence::NotServing => bridge_epoch,
                _ => None,
            };
            // Settings and numbering are the current owner's: those of a conference re-homed
            // elsewhere meanwhile (its settings, its ConferenceSid) are not this life's.
            let ours = owned_epoch.is_some() || reclaim_at.is_some();
            let kept = if ours {
                self.kept_settings().await
            } else {
                self.default_settings()
            };
            self.activate_quietly(
                owned_epoch.or(bridge_epoch).unwrap_or(0),
                &kept.opts,
                kept.sid,
                kept.announced,
            );
            if kept.unread {
                self.forgo_settings();
            }
            if !ours {
                // The application knows this conference under the new home's ConferenceSid,
                // whose callbacks that home sends: the leaves and end of what is left here,
                // under a sid made up now, would tell of a conference it never saw. Should
                // this node own it again, that sid becomes the new life's (see admit).
                self.parked_callbacks = self.callbacks.take();
            }
            self.kept_recording = kept.recording;
            self.kept_started = kept.started;
            // Callers are in it: the application heard of it from the last life, unless
            // the first of them was still on its way in.
            self.heard_of = kept.announced;
            if ours {
                self.resume_numbering().await;
            }
            if let Some(b) = &main {
                self.main = b.id.clone();
                self.main_created = true;
                self.main_created_at = Instant::now();
            }
            if let Some(b) = &holding {
                self.holding = b.id.clone();
                self.holding_created = true;
            }
            self.started =
                !in_main.is_empty() || holding.is_none() || std::mem::take(&mut self.kept_started);
            if self.started {
                self.mark_started();
            }
            self.recording_inherited = self.started;
            self.settle_inherited_recording().await;
            // Callers whose StasisEnd came while their options were read: it reached no
            // conference (their channels were routed nowhere yet), so they leave here.
            let mut gone_meanwhile = Vec::new();
            for (ids, waiting) in [(&in_main, false), (&in_holding, true)] {
                let adopted = ids.iter().map(|id| self.adopted(id, members, waiting));
                for (id, p) in futures_util::future::join_all(adopted).await {
                    self.participants.insert(id.clone(), p);
                    if !self.node.claim_adopted(&id, &self.name) {
                        gone_meanwhile.push(id);
                    }
                }
            }
            self.node
                .metrics
                .reconcile_actions
                .with_label_values(&["adopted_conference"])
                .inc();
            tracing::info!(conference = %self.name, participants = self.participants.len(), owned = owned_epoch.is_some(), "re-adopted conference found in Asterisk");
            match fence {
                Fence::Owned(_) => {
                    self.publish();
                    if !self.leave_gone(&gone_meanwhile).await {
                        return false;
                    }
                    // A restart between a start's first step and its last leaves callers
                    // that make a start waiting, or some of them moved in and others not.
                    self.start_if_due().await;
                    self.finish_cut_short_start().await;
                    self.counts_changed().await;
                    return true;
                }
                Fence::Elsewhere { node, .. } => {
                    // Not this node's to report: their leaves are gone with them.
                    for id in &gone_meanwhile {
                        self.participants.remove(id);
                    }
                    self.phase = Phase::Active;
                    self.lost(&node).await;
                    return false;
                }
                _ if reclaim_at.is_some() => {
                    tracing::warn!(conference = %self.name, epoch = self.epoch, "adopted conference has no claim and this node takes no placement; claiming it back with the heartbeat");
                    // Shown with its callers in: the heartbeat's claim counts them. Nobody
                    // new is admitted until it holds.
                    self.publish();
                    if !self.leave_gone(&gone_meanwhile).await {
                        return false;
                    }
                    self.start_if_due().await;
                    self.finish_cut_short_start().await;
                    return true;
                }
                _ => {
                    for id in &gone_meanwhile {
                        self.participants.remove(id);
                    }
                    self.phase = Phase::Lost;
                    self.publish();
                    return false;
                }
            }
        }
        // A listing older than the bridge (or a participant) says nothing about it.
        if main.is_none() && self.main_created && self.main_created_at < taken {
            tracing::warn!(conference = %self.name, "conference bridge no longer exists in Asterisk; ending the conference");
            self.node
                .metrics
                .reconcile_actions
                .with_label_values(&["ended_missing_bridge"])
                .inc();
            self.main_created = false;
            self.end("bridge_gone", None).await;
            return false;
        }
        let present: Vec<&String> = in_main.iter().chain(in_holding.iter()).collect();
        let gone: Vec<String> = self
            .participants
            .iter()
            // One being moved out is the move's to settle: the listing may show it in its
            // new conference's bridge already. One the agent was moving between the two
            // bridges as the listing was taken (a hold, a start) may be in neither: Asterisk
            // takes it out of one before it puts it in the other, and lists bridges one by
            // one.
            // One still in the Stasis app in no bridge at all was taken out by another
            // ARI user: it is put back where the agent placed it, below, as the same
            // participant. Letting it go and joining it again would tell a leave and a
            // join for a caller that never left, and the leave of an `endConferenceOnExit`
            // caller would end the conference for everyone.
            .filter(|(id, p)| {
                p.since < taken
                    && p.placed_at < taken
                    && !p.moving
                    && !present.contains(id)
                    && (p.redirected || !unbridged.contains(*id))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.node
                .metrics
                .reconcile_actions
                .with_label_values(&["removed_gone_participant"])
                .inc();
            // A caller still in the Stasis app but in none of the conference's bridges
            // (taken out behind the agent's back) is no longer routed here, so the
            // reconciliation's last step joins it again rather than leaving it in silence.
            self.node.release_route(&id, &self.name);
            // Not listed at all: its hangup was lost (the events WebSocket was down).
            let reason = if listed.contains(&id) {
                "gone"
            } else {
                "hangup"
            };
            self.left(&id, reason).await;
            if self.phase == Phase::Idle {
                return false;
            }
        }
        self.restore_placements(&in_main, &in_holding, unbridged, taken)
            .await;
        // Callers adopted before a restart may make a start nothing else made.
        self.start_if_due().await;
        self.phase == Phase::Active
    }

    /// The settings the conference was started with, as its record in Redis keeps them, for
    /// adopting it after a restart; the configuration's defaults when there are none.
    async fn kept_settings(&self) -> Kept {
        let cfg = &self.node.cfg;
        // A failover or a slow moment passes: read again before giving up on them.
        let mut wait = SETTINGS_RETRY;
        let mut read = self.node.store.conference_settings(&self.name).await;
        for _ in 1..SETTINGS_TRIES {
            if read.is_ok() {
                break;
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
            read = self.node.store.conference_settings(&self.name).await;
        }
        match read {
            Ok(Some(text)) => match settings::decode(&cfg.conference, &cfg.profiles, &text) {
                Ok((opts, sid)) => {
                    return Kept {
                        opts,
                        sid,
                        recording: settings::recording(&text),
                        started: settings::started(&text),
                        announced: settings::announced(&text),
                        unread: false,
                    }
                }
                Err(why) => {
                    tracing::warn!(conference = %self.name, reason = %why, "the conference's recorded settings are unusable; using the configured defaults")
                }
            },
            // The conference was started with the defaults: nothing was recorded.
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(conference = %self.name, error = %e, tries = SETTINGS_TRIES, "cannot read the conference's settings");
                return Kept {
                    unread: true,
                    ..self.default_settings()
                };
            }
        }
        self.default_settings()
    }

    /// The configured defaults, as a conference started without options has them.
    fn default_settings(&self) -> Kept {
        let cfg = &self.node.cfg;
        let defaults = options::resolve(&cfg.conference, &cfg.profiles, &BTreeMap::new()).0;
        Kept {
            opts: defaults,
            sid: None,
            recording: None,
            started: false,
            announced: true,
            unread: false,
        }
    }

    /// A participant found in one of the conference's bridges after a restart, with the
    /// options its channel variables give, as when it joined. Muted, it is muted on its
    /// channel again (a no-op when it is already): an agent before this one muted joiners
    /// with addChannel's bridge mute only, which the next move between bridges drops.
    async fn adopted(
        &self,
        id: &str,
        members: &HashMap<String, Channel>,
        waiting: bool,
    ) -> (String, Participant) {
        let channel = members.get(id).cloned().unwrap_or_else(|| Channel {
            id: id.to_string(),
            ..Channel::default()
        });
        let (vars, failed) = crate::join::option_variables(&self.node, &channel).await;
        if let Some(e) = &failed {
            tracing::warn!(conference = %self.name, channel = id, error = %e, "cannot read an adopted participant's options; the unread ones take their defaults until a reconciliation reads them");
        }
        let (opts, warnings) =
            options::resolve(&self.node.cfg.conference, &self.node.cfg.profiles, &vars);
        for w in warnings {
            tracing::warn!(conference = %self.name, channel = id, variable = w.variable, "{}", w.message);
        }
        let muted = opts.muted;
        if muted {
            if let Err(e) = self.node.ari.mute(id, "in", true).await {
                tracing::warn!(conference = %self.name, channel = id, error = %e, "cannot mute an adopted participant on its channel");
            }
        }
        // Only a caller still in the holding bridge is on hold: one found in the mix was
        // taken off hold before the variable could say so.
        let mut held_unread = false;
        let held = waiting
            && match crate::join::variable(&self.node, &channel, options::VAR_HELD).await {
                Ok(v) => v.is_some_and(|v| v == "true"),
                // Unknown: in a started conference it stays held, with the music, rather than
                // be put into the mix against a hold, until a reconciliation reads the mark
                // (or an unhold brings it in); before the start it waits there either way.
                Err(e) => {
                    tracing::warn!(conference = %self.name, channel = id, error = %e, "cannot read whether an adopted participant is held; keeping it on hold until a reconciliation reads it");
                    held_unread = self.started;
                    self.started
                }
            };
        let waiting = waiting && !(held && self.started);
        let mut p = Participant::new(opts, waiting, muted, channel.caller.number.clone());
        p.held = held;
        p.held_unread = held_unread;
        p.options_unread = failed.is_some();
        // The last life knew when it joined; the channel's creation is the nearest Asterisk
        // keeps (a caller joins as it reaches the app), better than the moment of adoption.
        if let Some(created) = channel.created_ms().filter(|ms| *ms <= p.joined_ms) {
            p.joined_ms = created;
        }
        if let Some(tech) = channel.name.split('/').next().filter(|t| !t.is_empty()) {
            p.tech = tech.to_string();
        }
        (id.to_string(), p)
    }

    // ----- bookkeeping -----

    fn callback_participant(&mut self, event: CallbackEvent, status: &str, ch: &str) {
        let Some(p) = self.participants.get(ch) else {
            return;
        };
        let fields = ParticipantFields {
            call_sid: ch.to_string(),
            muted: p.muted,
            hold: p.held || p.caller_held,
            start_on_enter: p.options.start_on_enter,
            end_on_exit: p.options.end_on_exit,
        };
        if let Some(cb) = &mut self.callbacks {
            cb.send(event, status, Some(&fields), &[]);
        }
    }

    /// `participant-leave` for a participant that was in: `why` and `call_status` are
    /// Twilio's `ReasonParticipantLeft` and `ParticipantCallStatus`.
    fn callback_left(&mut self, ch: &str, p: &Participant, why: &str, call_status: &str) {
        let fields = ParticipantFields {
            call_sid: ch.to_string(),
            muted: p.muted,
            hold: p.held || p.caller_held,
            start_on_enter: p.options.start_on_enter,
            end_on_exit: p.options.end_on_exit,
        };
        self.callback_leave(&fields, why, call_status);
    }

    /// `participant-leave` for a dial-out whose callee never came in, as Twilio reports a
    /// participant added through its API that did not answer.
    pub(super) fn callback_add_failed(&mut self, ch: &str, opts: &Options, call_status: &str) {
        let fields = ParticipantFields {
            call_sid: ch.to_string(),
            muted: opts.muted,
            hold: false,
            start_on_enter: opts.start_on_enter,
            end_on_exit: opts.end_on_exit,
        };
        self.callback_leave(&fields, "participant_add_failed", call_status);
    }

    fn callback_leave(&mut self, fields: &ParticipantFields, why: &str, call_status: &str) {
        if let Some(cb) = &mut self.callbacks {
            cb.send(
                CallbackEvent::Leave,
                "participant-leave",
                Some(fields),
                &[
                    ("ReasonParticipantLeft", why.to_string()),
                    ("ParticipantCallStatus", call_status.to_string()),
                ],
            );
        }
    }

    fn publish(&self) {
        if self.phase == Phase::Idle {
            self.node.publish(&self.name, None);
            return;
        }
        let view = ConferenceView {
            conference: self.name.clone(),
            epoch: self.epoch,
            phase: if self.phase == Phase::Active {
                "active"
            } else {
                "lost"
            },
            bridge: self.main.clone(),
            started: self.started,
            recording: self.recording.clone(),
            participants: self
                .participants
                .iter()
                .map(|(id, p)| ParticipantView {
                    channel: id.clone(),
                    profile: p.options.profile.clone(),
                    waiting: p.waiting,
                    muted: p.muted,
                    hold: p.held || p.caller_held,
                    caller: p.caller.clone(),
                    joined_ms: p.joined_ms,
                    talking: p.talking,
                })
                .collect(),
            ringing: self.dialing.len() as u32 + u32::from(self.admitting),
            count_version: 0,
        };
        self.node.publish(&self.name, Some(view));
    }

    /// Who keeps the conference at its home: participants and dial-outs ringing into it.
    /// The caller being admitted counts too: a count written while it is being brought in
    /// (a recording restarted by its add) would otherwise say 0 for a live conference.
    fn people(&self) -> u32 {
        (self.participants.len() + self.dialing.len() + usize::from(self.admitting)) as u32
    }

    /// Publishes the view and records the participant count in Redis (owner-only write).
    async fn counts_changed(&mut self) {
        self.publish();
        if self.phase != Phase::Active {
            return;
        }
        let owner = Owner {
            node: self.node.id.clone(),
            epoch: self.epoch,
        };
        let settings = self
            .settings
            .as_deref()
            .filter(|_| !self.settings_saved && !self.settings_unread);
        match self
            .node
            .store
            .set_participants(
                &self.name,
                &owner,
                self.people(),
                self.node.next_count_version(),
                settings,
            )
            .await
        {
            Ok(true) => self.settings_saved = true,
            Ok(false) => {
                let owner = match self.node.store.lookup(&self.name).await {
                    Ok(Some(rec)) => rec.owner.node,
                    _ => self.node.id.clone(),
                };
                if owner != self.node.id {
                    self.lost(&owner).await;
                }
            }
            Err(e) => {
                tracing::debug!(conference = %self.name, error = %e, "participant count not written; the heartbeat carries it")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_names_lead_back_to_their_conference() {
        let name = ConferenceName::parse("sales-42-7").expect("name");
        let rec = recording_name(&name, 12);
        assert_eq!(recording_conference(&rec), Some(name));
        for other in [
            "",
            "confroute-",
            "confroute-sales-12",
            "confroute-sales-x-0000abcd",
            "confroute-sales-12-abcd",
            "confroute-sales-12-0000abcg",
            "voicemail-sales-12-0000abcd",
            "confroute--12-0000abcd",
        ] {
            assert_eq!(recording_conference(other), None, "{other}");
        }
    }

    #[test]
    fn failed_dialouts_report_twilio_call_statuses() {
        assert_eq!(twilio_add_failed_status(Some(17)), "busy");
        assert_eq!(twilio_add_failed_status(Some(19)), "no-answer");
        assert_eq!(twilio_add_failed_status(Some(18)), "no-answer");
        assert_eq!(twilio_add_failed_status(Some(16)), "canceled");
        assert_eq!(twilio_add_failed_status(Some(34)), "failed");
        assert_eq!(twilio_add_failed_status(None), "failed");
        assert_eq!(
            twilio_leave_at_end("end_conference_on_exit_kicked"),
            "moderator_ended_conference"
        );
        assert_eq!(twilio_leave_at_end("drain_deadline"), "drain_deadline");
    }

    #[test]
    fn bridge_ids_round_trip() {
        let name = ConferenceName::parse("+1555-0101.x_y~z").expect("name");
        let (main, holding) = bridge_ids(&name, 7, 0xbeef);
        assert_eq!(main, "cr-7.0000beef-+1555-0101.x_y~z");
        assert_eq!(parse_bridge_id(&main), Some((false, 7, name.clone())));
        assert_eq!(parse_bridge_id(&holding), Some((true, 7, name.clone())));
        assert_ne!(bridge_ids(&name, 7, 1), bridge_ids(&name, 7, 2));
        assert_eq!(
            parse_bridge_id("cr-7-+1555-0101.x_y~z"),
            Some((false, 7, name)),
            "ids of agents before lifetimes"
        );
        assert_eq!(parse_bridge_id("some-other-bridge"), None);
        assert_eq!(parse_bridge_id("cr-x-name"), None);
        assert_eq!(parse_bridge_id("cr-1.-name"), None);
        assert_eq!(parse_bridge_id("cr-1.xyz-name"), None);
        assert_eq!(parse_bridge_id("cr-1-bad name"), None);
    }

    #[test]
    fn redirect_endpoints_carry_the_conference_in_the_uri() {
        assert_eq!(
            redirect_endpoint("PJSIP", "sip:10.0.0.5:5060", "sales-42"),
            "PJSIP/sip:sales-42@10.0.0.5:5060"
        );
        assert_eq!(
            redirect_endpoint("PJSIP", "sip:old@node-b.example;transport=tcp", "room"),
            "PJSIP/sip:room@node-b.example;transport=tcp"
        );
        assert_eq!(
            redirect_endpoint("PJSIP", "node-c:5070", "r"),
            "PJSIP/sip:r@node-c:5070"
        );
    }
}
