//! Call control: validates an operation on a live conference and sends it to the node that
//! owns the conference, over the command bus. Shared by the JSON-RPC WebSocket and the REST
//! mirrors, so both check the same things and answer the same errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use confroute_shared::bus::{Bus, BusError, ErrorCode, Notifications};
use confroute_shared::name::ConferenceName;
use confroute_shared::types::{NodeId, Owner};

use crate::router::{Decision, RouteError, Router};

/// Longest wait for a move's target to say whether it has a seat (see `check_room`).
const ROOM_CHECK_MAX: Duration = Duration::from_secs(1);

/// Why an operation failed, before or after reaching the node.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Parameters are missing, of the wrong type, or out of range.
    #[error("invalid params: {0}")]
    InvalidParams(String),
    /// The node or the bus answered an application error.
    #[error("{0}")]
    Node(BusError),
    /// Routing is impossible now (Redis down).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// No node has room for a conference that needs a home.
    #[error("no capacity: {0}")]
    NoCapacity(String),
}

impl ControlError {
    fn code(code: ErrorCode, message: impl Into<String>) -> Self {
        ControlError::Node(BusError::new(code, message))
    }
}

/// Decodes `params` into `T`, naming the offending field.
pub fn params<T: serde::de::DeserializeOwned>(params: Value) -> Result<T, ControlError> {
    if !params.is_object() {
        // serde would map an array onto the fields by position, silently.
        return Err(ControlError::InvalidParams(
            "params must be an object (named parameters)".into(),
        ));
    }
    serde_json::from_value(params).map_err(|e| ControlError::InvalidParams(e.to_string()))
}

/// `{conference}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConferenceRef {
    /// Conference name.
    pub conference: String,
}

/// `conference.end`: `{conference, epoch?}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndParams {
    /// Conference name.
    pub conference: String,
    /// The life of the conference to end (its claim's `epoch`, as `conference.get` or a
    /// route gave it): when given, a conference living at another epoch is left alone.
    #[serde(default)]
    pub epoch: Option<u64>,
}

/// `{conference, participant}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParticipantRef {
    /// Conference name.
    pub conference: String,
    /// Participant id (the channel id the node reported).
    pub participant: String,
}

/// `{conference, participant, digits}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DtmfParams {
    /// Conference name.
    pub conference: String,
    /// Participant id.
    pub participant: String,
    /// Digits `0-9 * # A-D`.
    pub digits: String,
}

/// `{conference, participant?, media}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlayParams {
    /// Conference name.
    pub conference: String,
    /// One participant; the whole conference when absent.
    #[serde(default)]
    pub participant: Option<String>,
    /// Media URI as ARI takes it, e.g. `sound:conf-onlyperson`.
    pub media: String,
}

/// `{conference, participant, to}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveParams {
    /// Conference name.
    pub conference: String,
    /// Participant id.
    pub participant: String,
    /// Target conference.
    pub to: String,
}

/// `{conference, participant, endConferenceOnExit?, beepOnExit?}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateParams {
    /// Conference name.
    pub conference: String,
    /// Participant id.
    pub participant: String,
    /// End the conference when this participant leaves.
    #[serde(default, rename = "endConferenceOnExit")]
    pub end_conference_on_exit: Option<bool>,
    /// Beep when this participant leaves.
    #[serde(default, rename = "beepOnExit")]
    pub beep_on_exit: Option<bool>,
}

/// `{conference, to, from?, timeout?, options?}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialoutParams {
    /// Conference to bring the callee into.
    pub conference: String,
    /// E.164 number or SIP URI.
    pub to: String,
    /// Caller id to present.
    #[serde(default)]
    pub from: Option<String>,
    /// Seconds to ring before giving up (1-600, default 30).
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Participant options (TwiML-style: muted, beep, startConferenceOnEnter, ...).
    #[serde(default)]
    pub options: Option<serde_json::Map<String, Value>>,
}

/// `{after?, limit?}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Exclusive start name.
    #[serde(default)]
    pub after: Option<String>,
    /// Page size 1-1000.
    #[serde(default)]
    pub limit: Option<usize>,
}

fn name(raw: &str) -> Result<ConferenceName, ControlError> {
    ConferenceName::parse(raw).map_err(|e| ControlError::InvalidParams(format!("conference: {e}")))
}

/// Checks a participant id: 1-128 bytes of `A-Z a-z 0-9 . _ -`.
pub(crate) fn participant_id(raw: &str) -> Result<&str, ControlError> {
    let ok = !raw.is_empty()
        && raw.len() <= 128
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then_some(raw).ok_or_else(|| {
        ControlError::InvalidParams(
            "participant: expected 1-128 bytes of A-Z a-z 0-9 . _ -".to_string(),
        )
    })
}

/// Checks DTMF digits: `0-9 * # A-D`, 1 to 64 of them.
pub fn valid_digits(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 64
        && d.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'*' | b'#' | b'A'..=b'D'))
}

/// Checks a dial-out target (the rule shared with the node: `confroute_shared::dialout`).
pub fn valid_target(t: &str) -> bool {
    confroute_shared::dialout::target(t).is_some()
}

/// A dial-out that was accepted: its call id, then status notifications.
pub struct Dialout {
    /// The call id the node assigned.
    pub result: Value,
    /// Status notifications (`accepted`, `ringing`, `connected`, `rejected`, `cleared`).
    pub notifications: Notifications,
    /// The node placing the call.
    pub node: NodeId,
}

/// Least of a command's timeout worth sending it with: with less, the node could not hear
/// it and answer in time, and the sender could only report the outcome unknown.
const MIN_SEND: Duration = Duration::from_millis(50);

/// Call control over the bus.
#[derive(Clone)]
pub struct Control {
    router: Arc<Router>,
    bus: Bus,
    fanout: Arc<crate::fanout::Fanout>,
    timeout: Duration,
}

impl Control {
    /// A control service sending commands with `timeout` as their deadline; events that
    /// connections following them did not get are counted in `events_lost`.
    pub fn new(
        router: Arc<Router>,
        bus: Bus,
        timeout: Duration,
        events_lost: prometheus::IntCounterVec,
    ) -> Self {
        Control {
            router,
            fanout: crate::fanout::Fanout::start(&bus, events_lost),
            bus,
            timeout,
        }
    }

    /// `rpc.command_timeout`: how long a command may take to reach its node and be answered.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The same service for a command with only `left` of its timeout remaining (it waited
    /// in line behind earlier commands): what it sends carries that as its deadline.
    pub fn with_timeout(&self, left: Duration) -> Control {
        Control {
            timeout: left,
            ..self.clone()
        }
    }

    /// The bus (for gap notices and dial-out streams).
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Who follows which conference's events.
    pub fn fanout(&self) -> &Arc<crate::fanout::Fanout> {
        &self.fanout
    }

    /// True when Redis answers and says `node` has no live lease: it is gone, not merely
    /// out of sight while Redis is unreachable or just back (leases being renewed then).
    pub fn node_gone(&self, node: &NodeId) -> bool {
        self.router.redis_ok() && !self.router.settling() && self.router.view().live(node).is_none()
    }

    /// Where dial-out `callid` placed by `node` is now (`accepted`, `ringing`, `connected`),
    /// or `None` once the node tracks it no more (it ended).
    pub async fn dialout_state(
        &self,
        node: &NodeId,
        callid: &str,
    ) -> Result<Option<String>, ControlError> {
        let call = self
            .bus
            .call(
                node,
                "dialout.state",
                json!({ "callid": callid }),
                self.timeout,
                false,
            )
            .await
            .map_err(ControlError::Node)?;
        let state = call.reply.map_err(ControlError::Node)?;
        Ok(state
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_string))
    }

    async fn owner(&self, conference: &ConferenceName) -> Result<NodeId, ControlError> {
        Ok(self.record(conference).await?.owner.node)
    }

    async fn record(
        &self,
        conference: &ConferenceName,
    ) -> Result<confroute_shared::types::ConferenceRecord, ControlError> {
        match self.router.store().lookup(conference).await {
            Ok(Some(rec)) => Ok(rec),
            Ok(None) => Err(ControlError::code(
                ErrorCode::ConferenceNotFound,
                format!("conference `{conference}` has no home"),
            )),
            Err(e) => Err(ControlError::Unavailable(e.to_string())),
        }
    }

    /// What is left of the command's timeout `started` ago for its message to the node: the
    /// lookups before it count (an answer comes within one `rpc.command_timeout` of the
    /// command's arrival, and the node acts on it no later). None left: it is not sent.
    fn left(&self, started: Instant) -> Result<Duration, ControlError> {
        let left = self.timeout.saturating_sub(started.elapsed());
        if left < MIN_SEND {
            return Err(ControlError::code(
                ErrorCode::Timeout,
                format!(
                    "not carried out: Redis took the whole of rpc.command_timeout ({:?}) before the command could be sent; nothing was sent",
                    self.timeout
                ),
            ));
        }
        Ok(left)
    }

    async fn send(
        &self,
        conference: &ConferenceName,
        method: &str,
        params: Value,
    ) -> Result<Value, ControlError> {
        let started = Instant::now();
        let node = self.owner(conference).await?;
        let call = self
            .bus
            .call(&node, method, params, self.left(started)?, false)
            .await
            .map_err(ControlError::Node)?;
        call.reply.map_err(ControlError::Node)
    }

    /// `conference.list`: a page of live conferences from Redis.
    pub async fn list(&self, p: ListParams) -> Result<Value, ControlError> {
        let limit = p.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(ControlError::InvalidParams("limit must be 1-1000".into()));
        }
        if let Some(a) = &p.after {
            confroute_shared::name::validate_cursor(a).map_err(ControlError::InvalidParams)?;
        }
        let page = self
            .router
            .store()
            .list_conferences(p.after.as_deref(), limit)
            .await
            .map_err(|e| ControlError::Unavailable(e.to_string()))?;
        let items: Vec<Value> = page
            .items
            .iter()
            .map(|(n, r)| {
                json!({"conference": n, "node_id": r.owner.node, "epoch": r.owner.epoch,
                       "participants": r.participants, "created_ms": r.created_ms})
            })
            .collect();
        Ok(json!({"items": items, "next": page.next}))
    }

    /// `conference.get`: owner, epoch and the participants with their state (from the node).
    pub async fn get(&self, p: ConferenceRef) -> Result<Value, ControlError> {
        let started = Instant::now();
        let conference = name(&p.conference)?;
        let rec = self
            .router
            .store()
            .lookup(&conference)
            .await
            .map_err(|e| ControlError::Unavailable(e.to_string()))?
            .ok_or_else(|| {
                ControlError::code(
                    ErrorCode::ConferenceNotFound,
                    format!("conference `{conference}` has no home"),
                )
            })?;
        let call = self
            .bus
            .call(
                &rec.owner.node,
                "participant.list",
                json!({"conference": conference}),
                self.left(started)?,
                false,
            )
            .await
            .map_err(ControlError::Node)?;
        let participants = call.reply.map_err(ControlError::Node)?;
        Ok(json!({
            "conference": conference,
            "node_id": rec.owner.node,
            "epoch": rec.owner.epoch,
            "created_ms": rec.created_ms,
            "participants": participants.get("participants").cloned().unwrap_or(participants),
        }))
    }

    /// `conference.end`: the owning node hangs everyone up and releases the claim; with an
    /// epoch, only that life of the conference (a later one under the same name lives on).
    pub async fn end(&self, p: EndParams) -> Result<Value, ControlError> {
        let conference = name(&p.conference)?;
        let Some(epoch) = p.epoch else {
            return self
                .send(
                    &conference,
                    "conference.end",
                    json!({"conference": conference}),
                )
                .await;
        };
        let started = Instant::now();
        let rec = self.record(&conference).await?;
        if rec.owner.epoch != epoch {
            return Err(ControlError::code(
                ErrorCode::ConferenceNotFound,
                format!(
                    "conference `{conference}` lives at epoch {}, not {epoch}; nothing was done",
                    rec.owner.epoch
                ),
            ));
        }
        // The node checks the epoch again: the conference may end and begin again on the
        // same node between this look and the command.
        let call = self
            .bus
            .call(
                &rec.owner.node,
                "conference.end",
                json!({"conference": conference, "epoch": epoch}),
                self.left(started)?,
                false,
            )
            .await
            .map_err(ControlError::Node)?;
        call.reply.map_err(ControlError::Node)
    }

    /// `participant.list`.
    pub async fn participants(&self, p: ConferenceRef) -> Result<Value, ControlError> {
        let conference = name(&p.conference)?;
        self.send(
            &conference,
            "participant.list",
            json!({"conference": conference}),
        )
        .await
    }

    /// A participant operation without further parameters: `participant.mute`, `unmute`,
    /// `hold`, `unhold`, `kick`.
    pub async fn participant(
        &self,
        method: &str,
        p: ParticipantRef,
    ) -> Result<Value, ControlError> {
        let conference = name(&p.conference)?;
        let participant = participant_id(&p.participant)?;
        self.send(
            &conference,
            method,
            json!({"conference": conference, "participant": participant}),
        )
        .await
    }

    /// `participant.dtmf`.
    pub async fn dtmf(&self, p: DtmfParams) -> Result<Value, ControlError> {
        let conference = name(&p.conference)?;
        let participant = participant_id(&p.participant)?;
        if !valid_digits(&p.digits) {
            return Err(ControlError::InvalidParams(
                "digits: expected 1-64 of 0-9 * # A-D".into(),
            ));
        }
        self.send(
            &conference,
            "participant.dtmf",
            json!({"conference": conference, "participant": participant, "digits": p.digits}),
        )
        .await
    }

    /// `participant.play` / `conference.play`.
    pub async fn play(&self, p: PlayParams) -> Result<Value, ControlError> {
        let conference = name(&p.conference)?;
        if let Some(id) = &p.participant {
            participant_id(id)?;
        }
        confroute_shared::media::check(&p.media).map_err(ControlError::InvalidParams)?;
        let method = if p.participant.is_some() {
            "participant.play"
        } else {
            "conference.play"
        };
        self.send(
            &conference,
            method,
            json!({"conference": conference, "participant": p.participant, "media": p.media}),
        )
        .await
    }

    /// `participant.move`: to a conference on the same node (bridge to bridge) or elsewhere
    /// (the node redirects the channel to the target's owner). The target is homed first.
    pub async fn move_participant(&self, p: MoveParams) -> Result<Value, ControlError> {
        let conference = name(&p.conference)?;
        let participant = participant_id(&p.participant)?;
        let to = ConferenceName::parse(&p.to)
            .map_err(|e| ControlError::InvalidParams(format!("to: {e}")))?;
        if to == conference {
            return Err(ControlError::InvalidParams(
                "to: the participant is already there".into(),
            ));
        }
        // One deadline for the whole move, as for any command: the participant check, the
        // target's homing and the move itself share `rpc.command_timeout`.
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let node = self.owner(&conference).await?;
        let first = self.left(started)?;
        // Homing the target claims it: a move refused for its participant would have changed
        // state (a claim given back leaves the name's next life a higher epoch), so the
        // participant is looked for first. One that leaves meanwhile is still refused by
        // the node, and the claim given back.
        let listed = self
            .bus
            .call(
                &node,
                "participant.list",
                json!({"conference": conference}),
                first,
                false,
            )
            .await
            .and_then(|call| call.reply)
            .map_err(|e| match e.code {
                // Only the check was asked (a read): the move itself was never sent.
                ErrorCode::NoAnswer => ControlError::Node(BusError::new(
                    ErrorCode::Timeout,
                    format!(
                        "the move was not carried out: asked whether the participant is there, {}; nothing was sent to move it",
                        e.message
                    ),
                )),
                _ => ControlError::Node(e),
            })?;
        let present = listed["participants"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["id"] == participant));
        if !present {
            return Err(ControlError::code(
                ErrorCode::ParticipantNotFound,
                format!("no participant `{participant}` in conference `{conference}`"),
            ));
        }
        let target = self.home(&to).await?;
        if target.node_id != node && !target.created() {
            self.check_room(&to, &target, deadline).await?;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // Too little left for the node to hear the move and answer: not sent at all.
        let (reply, sent) = if left < MIN_SEND {
            let e = BusError::new(
                ErrorCode::Timeout,
                format!(
                    "the move was not carried out: its checks took all of {:?}",
                    self.timeout
                ),
            );
            (Err(e), false)
        } else {
            match self
                .bus
                .call(
                    &node,
                    "participant.move",
                    json!({"conference": conference, "participant": participant, "to": to,
                           "to_node": target.node_id, "to_sip_uri": target.sip_uri, "to_epoch": target.epoch}),
                    left,
                    false,
                )
                .await
            {
                Ok(call) => (call.reply, true),
                Err(e) => (Err(e), false),
            }
        };
        if let Err(e) = &reply {
            self.give_back(&to, &target, e, sent).await;
        }
        reply.map_err(ControlError::Node)
    }

    /// Refuses a move into `to` on another node when that conference has no seat left. The
    /// caller is redirected there by SIP, and a full conference would refuse it only then:
    /// hung up, out of both. Without an answer (not started there yet, or the node slow)
    /// nothing says it is full, and the move goes ahead.
    async fn check_room(
        &self,
        to: &ConferenceName,
        target: &Decision,
        deadline: tokio::time::Instant,
    ) -> Result<(), ControlError> {
        // A share of what is left, so a target slow to answer still leaves the move its own.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let budget = (left / 2).min(ROOM_CHECK_MAX);
        let Ok(listed) = self
            .bus
            .call(
                &target.node_id,
                "participant.list",
                json!({"conference": to}),
                budget,
                false,
            )
            .await
            .and_then(|call| call.reply)
        else {
            return Ok(());
        };
        match (
            listed["seats_taken"].as_u64(),
            listed["max_participants"].as_u64(),
        ) {
            (Some(taken), Some(max)) if taken >= max => Err(ControlError::code(
                ErrorCode::ConferenceFull,
                format!(
                    "conference `{to}` is full ({taken} of {max} seats taken); nobody was moved"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Gives back the home this command claimed for `conference` when the node refused the
    /// command, or never heard it (`sent` false): such a command changes nothing (invariant
    /// 6), and the claim would count against the node's capacity until its lease ran out.
    /// Not after a timeout, where the command may yet have been carried out.
    async fn give_back(
        &self,
        conference: &ConferenceName,
        home: &Decision,
        why: &BusError,
        sent: bool,
    ) {
        let refused = !sent
            || matches!(
                why.code,
                ErrorCode::InvalidParams
                    | ErrorCode::Unavailable
                    | ErrorCode::InvalidNumber
                    | ErrorCode::ParticipantNotFound
                    | ErrorCode::ConferenceNotFound
                    | ErrorCode::ConferenceFull
                    | ErrorCode::Forbidden
                    | ErrorCode::Timeout
            );
        if !home.created() || !refused {
            return;
        }
        let owner = Owner {
            node: home.node_id.clone(),
            epoch: home.epoch,
        };
        // Only while empty: a caller may have reached the new home meanwhile.
        if let Err(e) = self
            .router
            .store()
            .release_if_empty(conference, &owner)
            .await
        {
            tracing::warn!(%conference, error = %e, "cannot give back the claim of a refused command; it expires with its lease");
        }
    }

    /// `participant.update`: `endConferenceOnExit`, `beepOnExit`.
    pub async fn update(&self, p: UpdateParams) -> Result<Value, ControlError> {
        let conference = name(&p.conference)?;
        let participant = participant_id(&p.participant)?;
        if p.end_conference_on_exit.is_none() && p.beep_on_exit.is_none() {
            return Err(ControlError::InvalidParams(
                "nothing to update: give endConferenceOnExit and/or beepOnExit".into(),
            ));
        }
        self.send(
            &conference,
            "participant.update",
            json!({"conference": conference, "participant": participant,
                   "endConferenceOnExit": p.end_conference_on_exit, "beepOnExit": p.beep_on_exit}),
        )
        .await
    }

    async fn home(
        &self,
        conference: &ConferenceName,
    ) -> Result<crate::router::Decision, ControlError> {
        self.router
            .route(conference, "control")
            .await
            .map_err(|e| match e {
                RouteError::NoCapacity => {
                    ControlError::NoCapacity("no conference node is taking new conferences with room to spare (each is full, draining or without its Asterisk)".into())
                }
                RouteError::Unavailable(why) => ControlError::Unavailable(why),
            })
    }

    /// `dialout`: validates the target, homes the conference if it has no home yet, and asks
    /// the owning node to originate; status notifications follow.
    pub async fn dialout(&self, p: DialoutParams) -> Result<Dialout, ControlError> {
        let started = Instant::now();
        let conference = name(&p.conference)?;
        if !valid_target(&p.to) {
            return Err(ControlError::code(
                ErrorCode::InvalidNumber,
                format!(
                    "`{}` is not an E.164 number or a SIP URI",
                    p.to.chars().take(64).collect::<String>()
                ),
            ));
        }
        if let Some(from) = &p.from {
            if let Err(e) = confroute_shared::dialout::caller_id(from) {
                return Err(ControlError::InvalidParams(format!("from: {e}")));
            }
        }
        let timeout = p.timeout.unwrap_or(30);
        if !(1..=600).contains(&timeout) {
            return Err(ControlError::InvalidParams("timeout: 1-600 seconds".into()));
        }
        // Checked before the conference is homed: a claim made and given back would leave
        // the name's next life a higher epoch.
        if let Some(options) = &p.options {
            confroute_shared::options::check_dialout_options(options)
                .map_err(ControlError::InvalidParams)?;
        }
        // Nor is it homed while the bus is down: the claim would be given back at once, its
        // epoch spent.
        if !self.bus.connected() {
            return Err(ControlError::Node(BusError::reconnecting()));
        }
        let home = self.home(&conference).await?;
        let left = match self.left(started) {
            Ok(left) => left,
            Err(e) => {
                // Homed for this dial-out and never sent: given back as a refusal is.
                let unsent = BusError::new(ErrorCode::Timeout, "not sent");
                self.give_back(&conference, &home, &unsent, false).await;
                return Err(e);
            }
        };
        let call = self
            .bus
            .call(
                &home.node_id,
                "dialout",
                json!({"conference": conference, "to": p.to, "from": p.from,
                       "timeout": timeout, "options": p.options.unwrap_or_default()}),
                left,
                true,
            )
            .await;
        match call {
            Ok(call) => match call.reply {
                Ok(result) => Ok(Dialout {
                    result,
                    notifications: call.notifications,
                    node: home.node_id.clone(),
                }),
                Err(e) => {
                    self.give_back(&conference, &home, &e, true).await;
                    Err(ControlError::Node(e))
                }
            },
            Err(e) => {
                self.give_back(&conference, &home, &e, false).await;
                Err(ControlError::Node(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits() {
        assert!(valid_digits("0123456789*#ABCD"));
        for bad in ["", "E", "1 2", "abc", &"1".repeat(65)] {
            assert!(!valid_digits(bad), "{bad:?}");
        }
    }

    #[test]
    fn participant_ids() {
        assert!(participant_id("1716282823.42").is_ok());
        assert!(participant_id("a/b").is_err());
        assert!(participant_id("").is_err());
    }
}
