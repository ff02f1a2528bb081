//! Call control on the node: hears the commands controllers send on the bus
//! (`cmd:<node id>`, see `docs/call-control.md`), checks their parameters here, at the
//! node's own boundary, and hands each to the actor of its conference, so an operation on
//! one conference is serialised with that conference's calls. Bad input is answered at once
//! with a precise error and reaches no actor; a conference this node does not host is
//! answered `conference_not_found` (only a dial-out may start one, after fencing; an end of
//! one placed here that nobody reached releases its claim).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use confroute_shared::bus::{BusError, Command, ErrorCode};
use confroute_shared::name::ConferenceName;
use confroute_shared::types::NodeId;

use crate::conference::Msg;
use crate::dialout::{self, DialoutOp};
use crate::metrics::COMMAND_METHODS;
use crate::node::Node;

/// A command still to be answered; answering it counts it in
/// `confroute_node_commands_total` and queues the reply on the bus.
#[derive(Debug)]
pub struct Pending {
    pub(crate) id: String,
    pub(crate) reply_to: String,
    method: &'static str,
    deadline_ms: u64,
    /// When the sender gives up waiting, on this process's clock: the start deadline plus
    /// the second half of the budget, kept for the work and the answer.
    finish_by_ms: u64,
}

/// What the answer needs of the budget to reach the sender over Redis pub/sub.
const ANSWER_WAY_BACK_MS: u64 = 100;

impl Pending {
    fn new(cmd: &Command) -> Pending {
        Pending {
            id: cmd.id.clone(),
            reply_to: cmd.reply_to.clone(),
            method: COMMAND_METHODS
                .iter()
                .find(|m| **m == cmd.method)
                .copied()
                .unwrap_or("unknown"),
            deadline_ms: cmd.deadline_ms,
            finish_by_ms: cmd.deadline_ms.saturating_add(cmd.timeout_ms / 2),
        }
    }

    /// How long the work may still take for its answer to reach the sender in time; zero
    /// once it cannot. Work that would outlast this must not be done: the sender will
    /// have reported the node unavailable, and the application may retry it.
    pub fn time_left(&self) -> Duration {
        Duration::from_millis(
            self.finish_by_ms
                .saturating_sub(ANSWER_WAY_BACK_MS)
                .saturating_sub(now_ms()),
        )
    }

    /// The method, as the metrics label it.
    pub fn method(&self) -> &'static str {
        self.method
    }

    /// True once the command may no longer start: what is left of the sender's budget is
    /// for the work and the answer ([`confroute_shared::bus::local_deadline`]), and a command
    /// started later could take effect after the sender reported the node unavailable.
    pub fn expired(&self) -> bool {
        now_ms() > self.deadline_ms
    }

    /// How long until [`Pending::expired`] (zero once it is).
    fn until_expired(&self) -> Duration {
        Duration::from_millis(self.deadline_ms.saturating_sub(now_ms()).saturating_add(1))
    }

    /// Answers the command.
    pub fn answer(self, node: &Node, result: Result<Value, BusError>) {
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => code_label(e.code),
        };
        node.metrics.command(self.method, outcome);
        if let Err(e) = &result {
            tracing::debug!(method = self.method, code = outcome, error = %e.message, "command refused");
        }
        node.outbox.reply(&self.id, &self.reply_to, result);
    }
}

fn code_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::ConferenceNotFound => "conference_not_found",
        ErrorCode::ParticipantNotFound => "participant_not_found",
        ErrorCode::NodeUnavailable => "node_unavailable",
        ErrorCode::InvalidNumber => "invalid_number",
        ErrorCode::ConferenceFull => "conference_full",
        ErrorCode::Forbidden => "forbidden",
        ErrorCode::Timeout => "timeout",
        ErrorCode::InvalidParams => "invalid_params",
        ErrorCode::Unavailable => "unavailable",
        // Made by a command's sender when its answer does not come; no node answers it.
        ErrorCode::Internal | ErrorCode::NoAnswer => "internal",
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A checked operation on one conference.
#[derive(Debug)]
pub enum Op {
    /// `participant.list`.
    List,
    /// `conference.end`; with an epoch, only while the conference lives at that epoch.
    End {
        /// The conference's life the client means (its claim's epoch), when it named one.
        epoch: Option<u64>,
    },
    /// `conference.play`: media to the whole conference.
    PlayConference {
        /// Media URI.
        media: String,
    },
    /// `participant.mute` (true) / `participant.unmute` (false).
    Mute {
        /// Participant id.
        participant: String,
        /// Mute or unmute.
        on: bool,
    },
    /// `participant.hold` (true) / `participant.unhold` (false).
    Hold {
        /// Participant id.
        participant: String,
        /// Hold or unhold.
        on: bool,
    },
    /// `participant.kick`.
    Kick {
        /// Participant id (or the call id of a ringing dial-out).
        participant: String,
    },
    /// `participant.dtmf`.
    Dtmf {
        /// Participant id.
        participant: String,
        /// Digits `0-9 * # A-D`.
        digits: String,
    },
    /// `participant.play`.
    Play {
        /// Participant id.
        participant: String,
        /// Media URI.
        media: String,
    },
    /// `participant.move`.
    Move {
        /// Participant id.
        participant: String,
        /// Target conference.
        to: ConferenceName,
        /// The target's owner, as the controller found (or made) it.
        to_node: NodeId,
        /// The owner's SIP URI, for a redirect to another node.
        to_sip_uri: String,
    },
    /// `participant.update`.
    Update {
        /// Participant id.
        participant: String,
        /// New `endConferenceOnExit`.
        end_on_exit: Option<bool>,
        /// New `beepOnExit`.
        beep_on_exit: Option<bool>,
    },
    /// `dialout`.
    Dialout(Box<DialoutOp>),
}

/// A command for one conference's actor.
#[derive(Debug)]
pub struct Request {
    /// The conference.
    pub conference: ConferenceName,
    /// What to do.
    pub op: Op,
    /// Whom to answer.
    pub pending: Pending,
}

/// Hands every command heard on the bus to its conference until the bus goes away.
///
/// A command for a conference with no actor here, heard before the agent's first look at
/// what Asterisk holds since its events WebSocket (re)connected, is held: the conference may
/// be one Asterisk still has, about to be adopted, and "not hosted" would tell the
/// application it ended. It goes to the conference's actor as soon as the look makes one,
/// behind any held before it for the same conference; commands for other conferences do not
/// wait. Once the look is done, what is still held is answered as usual; one whose start
/// deadline comes first is answered `timeout`, nothing done.
pub async fn run(node: Arc<Node>, mut commands: mpsc::Receiver<Command>) {
    let mut held = Held::default();
    loop {
        let changed = node.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        held.release(&node);
        // Woken for the look, to try again where an actor may have come (the look makes
        // them one by one), or to answer a held command at its deadline.
        let wake = held
            .next_expiry()
            .map(|at| at.min(tokio::time::Instant::now() + HELD_RETRY));
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(cmd) => {
                    if let Some(req) = intake(&node, cmd) {
                        held.hand_over(&node, req);
                    }
                }
                None => break,
            },
            _ = &mut changed, if !held.is_empty() => {}
            _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => {}
        }
    }
}

/// How often held commands look for their conference's actor while the look goes on.
const HELD_RETRY: Duration = Duration::from_millis(50);

/// Most commands held at once; past it one is answered `timeout` at once, nothing done.
const MAX_HELD: usize = 10_000;

/// Commands held until the first look at Asterisk, by conference, each in arrival order.
#[derive(Default)]
struct Held {
    by_conference: std::collections::HashMap<ConferenceName, VecDeque<Request>>,
    count: usize,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The earliest start deadline among the held commands.
    fn next_expiry(&self) -> Option<tokio::time::Instant> {
        self.by_conference
            .values()
            .filter_map(|q| q.iter().map(|r| r.pending.until_expired()).min())
            .min()
            .map(|d| tokio::time::Instant::now() + d)
    }

    /// Gives `req` to its conference's actor, or holds it (see [`run`]), or answers it.
    fn hand_over(&mut self, node: &Arc<Node>, req: Request) {
        if let Some(q) = self.by_conference.get_mut(&req.conference) {
            // Behind the ones held for its conference.
            if self.count >= MAX_HELD {
                return refuse_held(node, req);
            }
            q.push_back(req);
            self.count += 1;
            return;
        }
        let looked = node.reconciled();
        let spawn = spawns(&req.op, looked);
        let conference = req.conference.clone();
        if let Err(back) = node.deliver(&conference, Msg::Command(Box::new(req)), spawn) {
            if let Msg::Command(req) = *back {
                if !looked {
                    if self.count >= MAX_HELD {
                        return refuse_held(node, *req);
                    }
                    self.by_conference
                        .entry(conference)
                        .or_default()
                        .push_back(*req);
                    self.count += 1;
                    return;
                }
                not_hosted(node, *req);
            }
        }
    }

    /// Hands held commands on where their conference's actor has come, or all of them once
    /// the look is done; answers those past their start deadline.
    fn release(&mut self, node: &Arc<Node>) {
        if self.count == 0 {
            return;
        }
        let looked = node.reconciled();
        let names: Vec<ConferenceName> = self.by_conference.keys().cloned().collect();
        for name in names {
            let Some(mut q) = self.by_conference.remove(&name) else {
                continue;
            };
            while let Some(req) = q.pop_front() {
                if req.pending.expired() {
                    self.count -= 1;
                    refuse_held(node, req);
                    continue;
                }
                let spawn = spawns(&req.op, looked);
                match node.deliver(&name, Msg::Command(Box::new(req)), spawn) {
                    Ok(()) => self.count -= 1,
                    Err(back) => {
                        let Msg::Command(req) = *back else { continue };
                        if looked {
                            self.count -= 1;
                            not_hosted(node, *req);
                        } else {
                            q.push_front(*req);
                            break;
                        }
                    }
                }
            }
            if !q.is_empty() {
                self.by_conference.insert(name, q);
            }
        }
    }
}

/// Whether `op` may start its conference's actor: a dial-out brings its conference; an end
/// of one placed here that no caller reached (its actor gives the claim back), but only once
/// the look is done: before, the conference may be one about to be adopted.
fn spawns(op: &Op, looked: bool) -> bool {
    match op {
        Op::Dialout(_) => true,
        Op::End { .. } => looked,
        _ => false,
    }
}

fn not_hosted(node: &Arc<Node>, req: Request) {
    // A conference placed here (a route claimed it) that no caller has reached yet has
    // nobody in it, as its record and the controller's `GET /v1/conferences/{name}` say:
    // listed empty rather than not found. Anything else needs it started.
    if matches!(req.op, Op::List) {
        let node = node.clone();
        tokio::spawn(async move {
            let placed = matches!(
                node.store.lookup(&req.conference).await,
                Ok(Some(rec)) if rec.owner.node == node.id
            );
            if placed {
                let empty = json!({
                    "participants": [],
                    "seats_taken": 0,
                    "max_participants": node.cfg.conference.max_participants,
                });
                req.pending.answer(&node, Ok(empty));
            } else {
                refuse_not_hosted(&node, req);
            }
        });
        return;
    }
    refuse_not_hosted(node, req);
}

fn refuse_not_hosted(node: &Arc<Node>, req: Request) {
    let msg = format!(
        "conference `{}` is not hosted on node {}",
        req.conference, node.id
    );
    req.pending
        .answer(node, Err(BusError::new(ErrorCode::ConferenceNotFound, msg)));
}

fn refuse_held(node: &Arc<Node>, req: Request) {
    let msg = "not carried out: the agent was still looking at what Asterisk holds after a (re)start when the command's time to start ran out; nothing was done";
    req.pending
        .answer(node, Err(BusError::new(ErrorCode::Timeout, msg)));
}

/// Checks one command: answers it at once (bad parameters, `dialout.state`), or gives back
/// the request for its conference's actor.
fn intake(node: &Arc<Node>, cmd: Command) -> Option<Request> {
    tracing::debug!(id = %cmd.id, method = %cmd.method, "command received");
    let pending = Pending::new(&cmd);
    // A controller whose bus was reconnecting may have missed statuses of a dial-out it
    // streams: it asks where the call is now. Nothing of a conference is involved.
    if cmd.method == "dialout.state" {
        let state = decode::<DialoutStateP>(&cmd.params)
            .and_then(|p| participant(&p.callid))
            .map(|callid| json!({"status": node.dialouts.state(&callid)}));
        pending.answer(node, state);
        return None;
    }
    let (conference, op) = match parse(node, &cmd) {
        Ok(x) => x,
        Err(e) => {
            pending.answer(node, Err(e));
            return None;
        }
    };
    // Only a dial-out may bring a conference to this node; everything else needs one here,
    // but for an end of one placed here that no caller reached yet (its actor releases the
    // claim, in order with any first caller): see `hand_over`.
    Some(Request {
        conference,
        op,
        pending,
    })
}

fn invalid(message: impl Into<String>) -> BusError {
    BusError::new(ErrorCode::InvalidParams, message)
}

/// Decodes `params`, naming the parameter at fault.
fn decode<T: DeserializeOwned>(params: &Value) -> Result<T, BusError> {
    serde_path_to_error::deserialize(params.clone()).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            invalid(e.inner().to_string())
        } else {
            invalid(format!("{path}: {}", e.inner()))
        }
    })
}

fn conference(raw: &str) -> Result<ConferenceName, BusError> {
    ConferenceName::parse(raw).map_err(|e| invalid(format!("conference: {e}")))
}

/// A participant id as the node reports them (channel ids): 1-128 bytes of
/// `A-Z a-z 0-9 . _ -`.
pub fn participant(raw: &str) -> Result<String, BusError> {
    let ok = !raw.is_empty()
        && raw.len() <= 128
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(raw.to_string())
    } else {
        Err(invalid(
            "participant: expected 1-128 bytes of A-Z a-z 0-9 . _ -",
        ))
    }
}

fn digits(raw: &str) -> Result<String, BusError> {
    let ok = !raw.is_empty()
        && raw.len() <= 64
        && raw
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'*' | b'#' | b'A'..=b'D'));
    if ok {
        Ok(raw.to_string())
    } else {
        Err(invalid("digits: expected 1-64 of 0-9 * # A-D"))
    }
}

fn media(raw: &str) -> Result<String, BusError> {
    confroute_shared::media::check(raw).map_err(invalid)?;
    Ok(raw.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConferenceP {
    conference: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndP {
    conference: String,
    #[serde(default)]
    epoch: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParticipantP {
    conference: String,
    participant: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DtmfP {
    conference: String,
    participant: String,
    digits: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlayP {
    conference: String,
    #[serde(default)]
    participant: Option<String>,
    media: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveP {
    conference: String,
    participant: String,
    to: String,
    to_node: String,
    #[serde(default)]
    to_sip_uri: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    to_epoch: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateP {
    conference: String,
    participant: String,
    #[serde(default, rename = "endConferenceOnExit")]
    end_on_exit: Option<bool>,
    #[serde(default, rename = "beepOnExit")]
    beep_on_exit: Option<bool>,
}

/// `dialout.state` parameters.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DialoutStateP {
    /// The call id the dial-out was answered with.
    callid: String,
}

/// `dialout` parameters as the controller sends them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialoutP {
    /// Conference name.
    pub conference: String,
    /// E.164 number or SIP URI.
    pub to: String,
    /// Caller id to present.
    #[serde(default)]
    pub from: Option<String>,
    /// Seconds to ring (1-600).
    #[serde(default)]
    pub timeout: Option<u64>,
    /// The callee's options (TwiML `<Conference>` attributes).
    #[serde(default)]
    pub options: Option<Map<String, Value>>,
}

/// Checks a command's parameters; the conference it is for and what to do.
fn parse(node: &Node, cmd: &Command) -> Result<(ConferenceName, Op), BusError> {
    if !cmd.params.is_object() {
        return Err(invalid("params must be an object"));
    }
    let p = &cmd.params;
    let simple = |f: fn(String) -> Op| -> Result<(ConferenceName, Op), BusError> {
        let v: ParticipantP = decode(p)?;
        Ok((conference(&v.conference)?, f(participant(&v.participant)?)))
    };
    match cmd.method.as_str() {
        "participant.list" => {
            let v: ConferenceP = decode(p)?;
            Ok((conference(&v.conference)?, Op::List))
        }
        "conference.end" => {
            let v: EndP = decode(p)?;
            Ok((conference(&v.conference)?, Op::End { epoch: v.epoch }))
        }
        "conference.play" => {
            let v: PlayP = decode(p)?;
            if v.participant.is_some() {
                return Err(invalid(
                    "conference.play takes no participant (use participant.play)",
                ));
            }
            Ok((
                conference(&v.conference)?,
                Op::PlayConference {
                    media: media(&v.media)?,
                },
            ))
        }
        "participant.mute" => simple(|participant| Op::Mute {
            participant,
            on: true,
        }),
        "participant.unmute" => simple(|participant| Op::Mute {
            participant,
            on: false,
        }),
        "participant.hold" => simple(|participant| Op::Hold {
            participant,
            on: true,
        }),
        "participant.unhold" => simple(|participant| Op::Hold {
            participant,
            on: false,
        }),
        "participant.kick" => simple(|participant| Op::Kick { participant }),
        "participant.dtmf" => {
            let v: DtmfP = decode(p)?;
            Ok((
                conference(&v.conference)?,
                Op::Dtmf {
                    participant: participant(&v.participant)?,
                    digits: digits(&v.digits)?,
                },
            ))
        }
        "participant.play" => {
            let v: PlayP = decode(p)?;
            let Some(who) = v.participant else {
                return Err(invalid("participant is required"));
            };
            Ok((
                conference(&v.conference)?,
                Op::Play {
                    participant: participant(&who)?,
                    media: media(&v.media)?,
                },
            ))
        }
        "participant.move" => {
            let v: MoveP = decode(p)?;
            let from = conference(&v.conference)?;
            let to = ConferenceName::parse(&v.to).map_err(|e| invalid(format!("to: {e}")))?;
            if to == from {
                return Err(invalid("to: the participant is already there"));
            }
            let to_node =
                NodeId::parse(&v.to_node).map_err(|e| invalid(format!("to_node: {e}")))?;
            let to_sip_uri = v.to_sip_uri.unwrap_or_default();
            if to_node != node.id && !valid_sip_uri(&to_sip_uri) {
                return Err(invalid(
                    "to_sip_uri: a SIP URI of the target's node is needed to move a participant to another node",
                ));
            }
            Ok((
                from,
                Op::Move {
                    participant: participant(&v.participant)?,
                    to,
                    to_node,
                    to_sip_uri,
                },
            ))
        }
        "participant.update" => {
            let v: UpdateP = decode(p)?;
            if v.end_on_exit.is_none() && v.beep_on_exit.is_none() {
                return Err(invalid(
                    "nothing to update: give endConferenceOnExit and/or beepOnExit",
                ));
            }
            Ok((
                conference(&v.conference)?,
                Op::Update {
                    participant: participant(&v.participant)?,
                    end_on_exit: v.end_on_exit,
                    beep_on_exit: v.beep_on_exit,
                },
            ))
        }
        "dialout" => {
            let v: DialoutP = decode(p)?;
            let name = conference(&v.conference)?;
            let op = dialout::prepare(&node.cfg, v)?;
            Ok((name, Op::Dialout(Box::new(op))))
        }
        other => Err(invalid(format!(
            "method `{}` is not a node command",
            other.chars().take(64).collect::<String>()
        ))),
    }
}

/// A SIP URI the redirect can name: `sip:`/`sips:` and a host, no spaces or controls.
fn valid_sip_uri(uri: &str) -> bool {
    let lower = uri.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("sip:")
        .or_else(|| lower.strip_prefix("sips:"));
    rest.is_some_and(|r| {
        !r.is_empty() && r.len() <= 256 && !r.bytes().any(|b| b.is_ascii_control() || b == b' ')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_checks() {
        assert!(participant("1716282823.42").is_ok());
        assert!(participant("a/b").is_err());
        assert!(participant("").is_err());
        assert!(digits("0123456789*#ABCD").is_ok());
        for bad in ["", "E", "1 2", &"1".repeat(65)] {
            assert!(digits(bad).is_err(), "{bad:?}");
        }
        assert!(media("sound:beep").is_ok());
        for bad in [
            "beep",
            "sound:a b",
            "",
            &format!("sound:{}", "x".repeat(300)),
        ] {
            assert!(media(bad).is_err(), "{bad:?}");
        }
        assert!(valid_sip_uri("sip:10.0.0.5:5060"));
        assert!(valid_sip_uri("SIPS:node-b.example;transport=tls"));
        assert!(!valid_sip_uri("http://x"));
        assert!(!valid_sip_uri("sip:"));
        assert!(!valid_sip_uri("sip:a b"));
    }

    #[test]
    fn error_codes_have_bounded_labels() {
        // Every code: the match below stops compiling when a code is added, as a reminder to
        // list it in `codes` too (kept in step by hand), and then this test fails until the
        // metric's outcomes know its label.
        let codes = [
            ErrorCode::ConferenceNotFound,
            ErrorCode::ParticipantNotFound,
            ErrorCode::NodeUnavailable,
            ErrorCode::InvalidNumber,
            ErrorCode::ConferenceFull,
            ErrorCode::Forbidden,
            ErrorCode::Timeout,
            ErrorCode::InvalidParams,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
            ErrorCode::NoAnswer,
        ];
        for code in codes {
            match code {
                ErrorCode::ConferenceNotFound
                | ErrorCode::ParticipantNotFound
                | ErrorCode::NodeUnavailable
                | ErrorCode::InvalidNumber
                | ErrorCode::ConferenceFull
                | ErrorCode::Forbidden
                | ErrorCode::Timeout
                | ErrorCode::InvalidParams
                | ErrorCode::Unavailable
                | ErrorCode::Internal
                | ErrorCode::NoAnswer => {}
            }
            assert!(
                crate::metrics::COMMAND_OUTCOMES.contains(&code_label(code)),
                "{code:?}"
            );
        }
    }
}
