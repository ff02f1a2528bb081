//! Call-control commands inside a conference's actor (parameters were checked by
//! [`crate::control`]): list, end, play, mute, hold, kick, DTMF, move, update and dial-out.
//!
//! - Mute is ARI's channel mute in direction `in`: the participant hears the conference
//!   but is not heard, in whichever bridge it is. A caller who joins muted is muted the
//!   same way, never with addChannel's bridge `mute`, which only adding the channel again
//!   takes off; and adding a channel to the bridge it is in makes it leave first, taking a
//!   lone member's wait music or the recording along (lonely bridge members in Asterisk).
//! - Hold is Twilio's: the participant leaves the mix and hears music. ARI's channel
//!   `hold` only indicates hold to the far end (chan_pjsip then plays music locally) and
//!   leaves the channel's audio in the mixing bridge, so the others would still hear it;
//!   instead the channel moves to the conference's holding bridge, which plays the wait
//!   music and mixes nobody, and moves back on unhold.
//! - Move to a conference of this node goes bridge to bridge through the target's actor,
//!   which admits the participant like any joiner (fencing, room); until it answers, the
//!   participant stays here. To another node, the channel is redirected to the target's
//!   owner with ARI `redirect`, which chan_pjsip turns into a 302 while the call rings and
//!   into a REFER once it is answered (`transfer()` in channels/chan_pjsip.c).

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};

use confroute_shared::bus::{BusError, ErrorCode};
use confroute_shared::name::ConferenceName;
use confroute_shared::types::NodeId;

use super::{
    redirect_endpoint, Conference, Join, MoveIn, Msg, Participant, Phase, Refusal, CAUSE_NORMAL,
};
use crate::ari::{AriError, AriErrorKind, Channel, Originate};
use crate::control::{Op, Pending, Request};
use crate::dialout::{self, DialoutOp};
use crate::options::{self, Beep, CallbackEvent};

/// The least of a dial-out command's budget worth placing the call with: one ARI request.
const MIN_ORIGINATE: Duration = Duration::from_millis(50);

fn not_found(ch: &str) -> BusError {
    BusError::new(
        ErrorCode::ParticipantNotFound,
        format!("no participant `{ch}` in this conference"),
    )
}

/// A participant being moved out belongs to neither conference until the target has it: a
/// command acting on its bridge now would pull it back out of the target's.
fn moving(ch: &str) -> BusError {
    BusError::new(
        ErrorCode::Forbidden,
        format!("a move of participant `{ch}` is under way; send the command to its new conference once the move is answered"),
    )
}

/// A participant redirected to another node whose transfer has not ended either way: Asterisk
/// runs none of its channel's commands until the far end says how the REFER ended
/// (`ast_transfer` reads the channel till then), and a bridge move waiting there would hold
/// the conference up. It ends with the participant's leave, or with `move_failed`.
fn transferring(ch: &str) -> BusError {
    BusError::new(
        ErrorCode::Forbidden,
        format!("participant `{ch}` is being transferred to another node; it leaves when its phone takes the transfer, or stays and `move_failed` follows"),
    )
}

/// Who holds a participant: `api` (call control), `caller` (its own phone), or both.
fn held_by(api: bool, caller: bool) -> Vec<&'static str> {
    [(api, "api"), (caller, "caller")]
        .into_iter()
        .filter_map(|(on, by)| on.then_some(by))
        .collect()
}

/// An ARI failure on a participant's channel: gone means not found, anything else internal.
fn ari_failure(ch: &str, e: &AriError) -> BusError {
    if e.channel_gone() {
        not_found(ch)
    } else if e.kind == AriErrorKind::TooLong {
        // Not sent: the caller's digits or sounds are too long for one ARI request.
        BusError::new(ErrorCode::InvalidParams, e.to_string())
    } else {
        BusError::new(ErrorCode::Internal, e.to_string())
    }
}

fn refusal_error(name: &ConferenceName, node: &NodeId, r: Refusal) -> BusError {
    match r {
        Refusal::Elsewhere { node: owner, .. } => BusError::new(
            ErrorCode::ConferenceNotFound,
            format!("conference `{name}` is owned by node {owner}, not by node {node}"),
        ),
        Refusal::NotServing => BusError::new(
            ErrorCode::ConferenceNotFound,
            format!("conference `{name}` has no home and node {node} takes no new conferences"),
        ),
        Refusal::Unavailable(why) => BusError::new(
            ErrorCode::Unavailable,
            format!("node {node} cannot check the ownership of `{name}` in Redis: {why}"),
        ),
        Refusal::Full => BusError::new(
            ErrorCode::ConferenceFull,
            format!("conference `{name}` is at its maximum number of participants"),
        ),
        Refusal::Bridge(e) => BusError::new(
            ErrorCode::Internal,
            format!("cannot create the conference bridge: {e}"),
        ),
    }
}

impl Conference {
    fn not_hosted(&self) -> BusError {
        BusError::new(
            ErrorCode::ConferenceNotFound,
            format!(
                "conference `{}` is not hosted on node {}",
                self.name, self.node.id
            ),
        )
    }

    /// The refusal of a command meant for another life of this conference (`asked`, where
    /// it lives at `epoch`): that life is over, or not begun.
    fn other_life(&self, asked: u64, epoch: u64) -> BusError {
        BusError::new(
            ErrorCode::ConferenceNotFound,
            format!(
                "conference `{}` lives at epoch {epoch}, not {asked}; nothing was done",
                self.name
            ),
        )
    }

    /// `end` of a conference placed on this node that no caller has reached yet (a
    /// controller claimed it for a route, say): its claim is given back at once rather than
    /// when reconciliation finds it stale. Run in this conference's actor, so a first
    /// caller arriving meanwhile is handled after it, under a claim of its own.
    async fn end_unreached(&mut self, epoch: Option<u64>) -> Result<Value, BusError> {
        let unavailable = |e: confroute_shared::store::StoreError| {
            BusError::new(
                ErrorCode::Unavailable,
                format!("cannot check the claim of `{}` in Redis: {e}", self.name),
            )
        };
        let rec = match self.node.store.lookup(&self.name).await {
            Ok(Some(rec)) if rec.owner.node == self.node.id => rec,
            Ok(_) => return Err(self.not_hosted()),
            Err(e) => return Err(unavailable(e)),
        };
        if let Some(asked) = epoch.filter(|e| *e != rec.owner.epoch) {
            return Err(self.other_life(asked, rec.owner.epoch));
        }
        match self
            .node
            .store
            .release_if_empty(&self.name, &rec.owner)
            .await
        {
            Ok(true) => {
                tracing::info!(conference = %self.name, epoch = rec.owner.epoch, "ended before anyone reached it: claim released");
                Ok(json!({"ended": true}))
            }
            Ok(false) => Err(self.not_hosted()),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Runs one command and answers it (a move to a conference of this node is answered
    /// by the target's actor).
    pub(super) async fn command(&mut self, req: Request) {
        let Request { op, pending, .. } = req;
        if pending.expired() {
            pending.answer(
                &self.node,
                Err(BusError::new(
                    ErrorCode::Timeout,
                    "the command waited past its deadline; nothing was done",
                )),
            );
            return;
        }
        if let Op::Dialout(d) = op {
            self.dialout(*d, pending).await;
            return;
        }
        if self.phase == Phase::Idle {
            let answer = match op {
                Op::End { epoch } => self.end_unreached(epoch).await,
                _ => Err(self.not_hosted()),
            };
            pending.answer(&self.node, answer);
            return;
        }
        let result = match op {
            Op::List => Ok(self.list()),
            Op::End { epoch: Some(asked) } if asked != self.epoch => {
                Err(self.other_life(asked, self.epoch))
            }
            Op::End { .. } => {
                self.end("ended_by_api", None).await;
                Ok(json!({"ended": true}))
            }
            Op::PlayConference { media } => self.play_conference(&media).await,
            Op::Mute { participant, on } => self.mute(&participant, on).await,
            Op::Hold { participant, on } => self.hold_api(&participant, on).await,
            Op::Kick { participant } => self.kick(&participant).await,
            Op::Dtmf {
                participant,
                digits,
            } => self.dtmf(&participant, &digits).await,
            Op::Play { participant, media } => self.play(&participant, &media).await,
            Op::Update {
                participant,
                end_on_exit,
                beep_on_exit,
            } => self.update(&participant, end_on_exit, beep_on_exit).await,
            Op::Move {
                participant,
                to,
                to_node,
                to_sip_uri,
            } => {
                if let Some((pending, result)) = self
                    .move_out(&participant, to, to_node, &to_sip_uri, pending)
                    .await
                {
                    pending.answer(&self.node, result);
                }
                return;
            }
            Op::Dialout(_) => return,
        };
        pending.answer(&self.node, result);
    }

    fn list(&self) -> Value {
        let participants: Vec<Value> = self
            .participants
            .iter()
            .map(|(id, p)| {
                json!({
                    "id": id,
                    "caller": p.caller,
                    "muted": p.muted,
                    "held": p.held || p.caller_held,
                    // Who holds it: an unhold lifts only the API's hold, so an application
                    // needs to tell the two apart.
                    "held_by": held_by(p.held, p.caller_held),
                    "joined_ms": p.joined_ms,
                    "waiting": p.waiting,
                    "talking": p.talking,
                    "profile": p.options.profile,
                })
            })
            .collect();
        // Seats as admission counts them (ringing dial-outs hold one), so a controller
        // moving a caller here from another node can tell it would be refused as full.
        json!({
            "participants": participants,
            "seats_taken": self.participants.len() + self.dialing.len(),
            "max_participants": self.max_participants,
        })
    }

    async fn play_conference(&mut self, media: &str) -> Result<Value, BusError> {
        // The mixing bridge exists from the first caller's admission, waiters' and ringing
        // dial-outs' included: played there with nobody in it, it is heard by no one.
        let heard = self
            .participants
            .values()
            .any(|p| !p.waiting && !p.held && !p.caller_held && !p.redirected);
        if !self.main_created || !heard {
            return Err(BusError::new(
                ErrorCode::Forbidden,
                "nobody is in the conference's mix to hear it (nobody has joined yet, or everyone waits for the start or is on hold); nothing was played",
            ));
        }
        let id = format!("cp-{:016x}", rand::random::<u64>());
        self.node
            .ari
            .play_on_bridge(&self.main, &id, media)
            .await
            .map_err(|e| BusError::new(ErrorCode::Internal, e.to_string()))?;
        Ok(json!({"playback": id}))
    }

    async fn play(&mut self, ch: &str, media: &str) -> Result<Value, BusError> {
        // Not to one being moved: its move stopped its announcements, and a new one would
        // hold the move up.
        self.settled(ch)?;
        let id = format!("pp-{:016x}", rand::random::<u64>());
        self.node
            .play_to(ch, &id, media)
            .await
            .map_err(|e| ari_failure(ch, &e))?;
        Ok(json!({"playback": id}))
    }

    async fn dtmf(&mut self, ch: &str, digits: &str) -> Result<Value, BusError> {
        if !self.participants.contains_key(ch) {
            return Err(not_found(ch));
        }
        self.node
            .ari
            .send_dtmf(ch, digits)
            .await
            .map_err(|e| ari_failure(ch, &e))?;
        Ok(json!({}))
    }

    async fn mute(&mut self, ch: &str, on: bool) -> Result<Value, BusError> {
        let p = self.settled(ch)?;
        let already = p.muted == on;
        // Asked of Asterisk even when this agent believes it done: its belief may be a
        // default (an adopted participant whose options could not be read), and only the
        // channel's own mute decides what the others hear. Asterisk's mute is idempotent.
        self.node
            .ari
            .mute(ch, "in", on)
            .await
            .map_err(|e| ari_failure(ch, &e))?;
        let ari = &self.node.ari;
        // Asterisk shows no mute that an agent restarted later could read back; the
        // variable a caller joins muted with can say it instead. Written in either case: a
        // variable left saying the opposite would be read back later (a restart, or the
        // re-read of an adoption's options) and undo this.
        let value = if on { "true" } else { "false" };
        if let Err(e) = ari.set_variable(ch, options::VAR_MUTED, value).await {
            tracing::warn!(conference = %self.name, channel = ch, error = %e, "cannot record the mute on the channel; a restarted agent may not know it");
        }
        if already {
            return Ok(json!({}));
        }
        if let Some(p) = self.participants.get_mut(ch) {
            p.muted = on;
        }
        let status = if on {
            "participant-mute"
        } else {
            "participant-unmute"
        };
        self.callback_participant(CallbackEvent::Mute, status, ch);
        self.emit(
            if on { "mute" } else { "unmute" },
            json!({"participant": ch}),
        );
        self.publish();
        Ok(json!({}))
    }

    async fn hold_api(&mut self, ch: &str, on: bool) -> Result<Value, BusError> {
        let p = self.movable(ch)?;
        if p.held == on {
            // Adopted after a restart whose read of its hold mark failed, it is taken for
            // held until the mark is read: the application's hold settles it, and the mark
            // is written so that reading it later does not undo the hold.
            if on && p.held_unread {
                if let Err(e) = self
                    .node
                    .ari
                    .set_variable(ch, options::VAR_HELD, "true")
                    .await
                {
                    tracing::warn!(conference = %self.name, channel = ch, error = %e, "cannot record the hold on the channel; a restarted agent may not know it");
                }
                if let Some(p) = self.participants.get_mut(ch) {
                    p.held_unread = false;
                }
            }
            return Ok(json!({}));
        }
        // A participant waiting for the conference to start is in the holding bridge
        // already; held, it stays there when the conference starts (start() skips it), so
        // once the conference has started its unhold is its move into the mix.
        let to_mix = !on && (!p.waiting || self.started);
        let mut opts = p.options.clone();
        opts.muted = p.muted;
        if on && !p.waiting {
            self.move_to_holding(ch, &opts)
                .await
                .map_err(|e| ari_failure(ch, &e))?;
        } else if to_mix {
            self.add(ch, false, &opts)
                .await
                .map_err(|e| ari_failure(ch, &e))?;
        }
        let value = if on { "true" } else { "false" };
        if let Err(e) = self
            .node
            .ari
            .set_variable(ch, options::VAR_HELD, value)
            .await
        {
            tracing::warn!(conference = %self.name, channel = ch, error = %e, "cannot record the hold on the channel; a restarted agent may not know it");
        }
        let mut told = true;
        if let Some(p) = self.participants.get_mut(ch) {
            p.held = on;
            // Settled by the application: a later read of the mark has nothing to correct.
            p.held_unread = false;
            // A waiter left behind by a start cut short is no longer waiting once held in a
            // started conference, as start() leaves a held waiter.
            if to_mix || (on && self.started) {
                p.waiting = false;
            }
            // The phone's own hold keeps the callback's one `Hold` state as it was.
            told = !p.caller_held;
        }
        let status = if on {
            "participant-hold"
        } else {
            "participant-unhold"
        };
        if told {
            self.callback_participant(CallbackEvent::Hold, status, ch);
        }
        self.emit(
            if on { "hold" } else { "unhold" },
            json!({"participant": ch, "by": "api"}),
        );
        if !on {
            self.tidy_holding().await;
            // A starter back from hold may make a start with whoever came meanwhile
            // (`lone_starter_waits`); nothing else would look again.
            self.start_if_due().await;
        }
        self.publish();
        Ok(json!({}))
    }

    /// The participant `ch`, unless there is none or it is being moved out.
    fn settled(&self, ch: &str) -> Result<&Participant, BusError> {
        match self.participants.get(ch) {
            None => Err(not_found(ch)),
            Some(p) if p.moving => Err(moving(ch)),
            Some(p) => Ok(p),
        }
    }

    /// [`Conference::settled`], and not being transferred to another node: a bridge move
    /// (hold, unhold, move) would wait in Asterisk until the transfer ends. Mute, play and
    /// the rest are queued by Asterisk and answered at once.
    fn movable(&self, ch: &str) -> Result<&Participant, BusError> {
        let p = self.settled(ch)?;
        if p.redirected {
            return Err(transferring(ch));
        }
        Ok(p)
    }

    async fn kick(&mut self, ch: &str) -> Result<Value, BusError> {
        let ringing = self.dialing.contains_key(ch);
        // One being transferred can be hung up: Asterisk's hangup does not wait in its
        // channel's queue.
        match self.participants.get(ch) {
            _ if ringing => {}
            None => return Err(not_found(ch)),
            Some(p) if p.moving => return Err(moving(ch)),
            Some(_) => {}
        }
        let found = match self.node.hang_up_found(ch, CAUSE_NORMAL).await {
            Ok(found) => found,
            Err(e) => {
                // The application hears the kick failed: nothing is to carry it out later.
                self.node.hangup_failed(ch);
                return Err(BusError::new(ErrorCode::Internal, e.to_string()));
            }
        };
        if !found {
            // It hung up on its own first: its end, on its way, tells how it left (a
            // callee's real cause, a caller's hangup), not the kick that found it gone.
            if !ringing {
                self.left(ch, "hangup").await;
            }
        } else if ringing {
            // Its dial-out ends when its channel is destroyed. Should the callee answer
            // before Asterisk acts on the hangup, nobody waits for it: it is hung up, not
            // joined.
            if let Some(opts) = self.dialing.remove(ch) {
                self.callback_add_failed(ch, &opts, "canceled");
            }
            self.end_if_empty("dialout_failed").await;
            self.counts_changed().await;
        } else {
            self.left(ch, "kicked").await;
        }
        Ok(json!({}))
    }

    async fn update(
        &mut self,
        ch: &str,
        end_on_exit: Option<bool>,
        beep_on_exit: Option<bool>,
    ) -> Result<Value, BusError> {
        // One being moved out takes the options it had to its new conference: a change
        // here would be reported done and never apply.
        self.settled(ch)?;
        let Some(p) = self.participants.get_mut(ch) else {
            return Err(not_found(ch));
        };
        if let Some(v) = end_on_exit {
            p.options.end_on_exit = v;
        }
        if let Some(v) = beep_on_exit {
            p.options.beep = match (p.options.beep.on_enter(), v) {
                (true, true) => Beep::True,
                (true, false) => Beep::OnEnter,
                (false, true) => Beep::OnExit,
                (false, false) => Beep::False,
            };
        }
        // Kept on the channel, as the mute is, for a restarted agent to read back.
        let mut record = Vec::new();
        if end_on_exit.is_some() {
            record.push((options::VAR_END_ON_EXIT, p.options.end_on_exit.to_string()));
        }
        if beep_on_exit.is_some() {
            record.push((options::VAR_BEEP, p.options.beep.as_str().to_string()));
        }
        for (var, value) in record {
            if let Err(e) = self.node.ari.set_variable(ch, var, &value).await {
                tracing::warn!(conference = %self.name, channel = ch, variable = var, error = %e, "cannot record the option on the channel; a restarted agent may not know it");
            }
        }
        Ok(json!({}))
    }

    // ----- moving -----

    /// Starts a move; `Some` with the answer when it is done (or refused) here, `None` when
    /// the target's actor answers.
    async fn move_out(
        &mut self,
        ch: &str,
        to: ConferenceName,
        to_node: NodeId,
        to_sip_uri: &str,
        pending: Pending,
    ) -> Option<(Pending, Result<Value, BusError>)> {
        if let Err(e) = self.movable(ch) {
            return Some((pending, Err(e)));
        }
        let Some(p) = self.participants.get_mut(ch) else {
            return Some((pending, Err(not_found(ch))));
        };
        if to_node == self.node.id {
            p.moving = true;
            self.node.mark_moving(ch, &self.name);
            let m = MoveIn {
                channel: Channel {
                    id: ch.to_string(),
                    name: format!("{}/{ch}", p.tech),
                    state: "Up".to_string(),
                    ..Channel::default()
                },
                options: p.options.clone(),
                options_unread: p.options_unread,
                muted: p.muted,
                held: p.held,
                caller_held: p.caller_held,
                caller: p.caller.clone(),
                from: self.name.clone(),
                pending,
            };
            tracing::info!(conference = %self.name, channel = ch, to = %to, "moving a participant to a conference of this node");
            self.node.send(&to, Msg::MoveIn(Box::new(m)), true);
            return None;
        }
        // Only chan_pjsip carries out a transfer to a SIP URI (a 302 or a REFER); ARI accepts
        // the redirect of any channel whose driver matches and answers 204, and a driver
        // without one (a Local channel of a dial-out template, say) only logs a notice: the
        // application would be told the caller moved while it stayed.
        if !p.tech.eq_ignore_ascii_case("PJSIP") {
            return Some((
                pending,
                Err(BusError::new(
                    ErrorCode::Forbidden,
                    format!(
                        "participant `{ch}` is on a {} channel: only a PJSIP channel can be moved to a conference on another node (the agent hands it over with a PJSIP transfer); nothing was done",
                        p.tech
                    ),
                )),
            ));
        }
        let endpoint = redirect_endpoint(&p.tech, to_sip_uri, to.as_str());
        // Asterisk would carry the transfer out only once the participant's announcement ended.
        self.node.stop_playbacks(ch).await;
        match self.node.ari.redirect(ch, &endpoint).await {
            Ok(()) => {
                if let Some(p) = self.participants.get_mut(ch) {
                    p.redirected = true;
                    p.redirect = Some((std::time::Instant::now(), to.clone()));
                }
                tracing::info!(conference = %self.name, channel = ch, to = %to, node = %to_node, %endpoint, "participant redirected to the target's node");
                Some((
                    pending,
                    Ok(
                        json!({"moved": "redirect", "to": to, "node": to_node, "endpoint": endpoint}),
                    ),
                ))
            }
            Err(e) => Some((pending, Err(ari_failure(ch, &e)))),
        }
    }

    /// The target side of a move between two conferences of this node.
    pub(super) async fn move_in(&mut self, m: MoveIn) {
        let ch = m.channel.id.clone();
        let from = m.from.clone();
        let refused = |c: &mut Self, m: MoveIn, e: BusError| {
            let back = Msg::MovedOut {
                channel: m.channel.id.clone(),
                moved: false,
            };
            // A source that ended and retired meanwhile still means what it says: the
            // caller's conference is over.
            if !c.node.send(&from, back, true) {
                tracing::warn!(channel = %m.channel.id, from = %from, "cannot return a refused move to its conference");
            }
            m.pending.answer(&c.node, Err(e));
        };
        if m.pending.expired() {
            let e = BusError::new(
                ErrorCode::Timeout,
                "the move waited past its deadline; nothing was done",
            );
            refused(self, m, e);
            return;
        }
        if let Err(r) = self.admit(&m.options).await {
            let e = refusal_error(&self.name, &self.node.id, r);
            self.end_if_empty("move_failed").await;
            refused(self, m, e);
            return;
        }
        let mut opts = m.options.clone();
        opts.muted = m.muted;
        let waiting = self.joins_waiting(&opts);
        if waiting {
            if let Err(e) = self.ensure_holding(&opts.wait_music).await {
                let e = BusError::new(ErrorCode::Internal, e.to_string());
                self.end_if_empty("move_failed").await;
                refused(self, m, e);
                return;
            }
        }
        if let Err(e) = self.add(&ch, waiting, &opts).await {
            let e = ari_failure(&ch, &e);
            self.end_if_empty("move_failed").await;
            refused(self, m, e);
            return;
        }
        // Adding it can end this conference (a recording's count write found the claim gone,
        // under `on_ownership_lost = end`), taking its bridge, and the caller with it, away:
        // the caller left its old conference and has none now, so it is hung up as it would
        // have been had it arrived a moment earlier, not left in silence with no actor.
        if self.phase == Phase::Idle {
            tracing::info!(conference = %self.name, channel = %ch, from = %from, "the conference ended as the participant moved in; hanging it up");
            self.tell_moved(&from, &ch);
            self.node.unroute(&ch);
            if let Err(e) = self.node.hang_up(&ch, CAUSE_NORMAL).await {
                tracing::warn!(channel = %ch, error = %e, "cannot hang up a participant whose target conference ended as it moved in");
            }
            let e = BusError::new(
                ErrorCode::ConferenceNotFound,
                format!(
                    "conference `{}` ended as participant `{ch}` was added to it; the participant was hung up",
                    self.name
                ),
            );
            m.pending.answer(&self.node, Err(e));
            return;
        }
        if !self.node.route(&ch, &self.name) {
            // It left Stasis while Asterisk carried out the add (answered all the same).
            tracing::info!(conference = %self.name, channel = %ch, "participant hung up during its move");
            self.end_if_empty("move_failed").await;
            m.pending.answer(&self.node, Err(not_found(&ch)));
            return;
        }
        if m.held {
            // Not held here: a restarted agent must not read the old conference's hold.
            if let Err(e) = self
                .node
                .ari
                .set_variable(&ch, options::VAR_HELD, "false")
                .await
            {
                tracing::warn!(conference = %self.name, channel = %ch, error = %e, "cannot clear the hold recorded on the channel; a restarted agent may take it for held");
            }
        }
        let mut p = Participant::new(opts, waiting, m.muted, m.caller.clone());
        if let Some(tech) = m.channel.name.split('/').next() {
            p.tech = tech.to_string();
        }
        // A move does not take the phone off hold.
        p.caller_held = m.caller_held;
        // Nor does it read what an adoption could not: the next reconciliation here does.
        p.options_unread = m.options_unread;
        tracing::info!(conference = %self.name, channel = %ch, from = %from, "participant moved in");
        self.entered(&ch, p, Some(&from)).await;
        self.sync_caller_hold(&ch);
        self.tell_moved(&from, &ch);
        let result = json!({"moved": "bridge", "to": self.name, "node": self.node.id});
        m.pending.answer(&self.node, Ok(result));
    }

    /// Tells the conference `from` that its participant `ch` left it for this one.
    fn tell_moved(&self, from: &ConferenceName, ch: &str) {
        let done = Msg::MovedOut {
            channel: ch.to_string(),
            moved: true,
        };
        self.node.send(from, done, false);
    }

    /// The answer of a move this conference started.
    pub(super) async fn moved_out(&mut self, ch: &str, moved: bool) {
        let Some(p) = self.participants.get_mut(ch) else {
            if !moved {
                // The conference ended while the move was under way: the caller has no
                // conference left, as if it had stayed for the end.
                self.refused_move_of_ended(ch).await;
            }
            return;
        };
        if !p.moving {
            return;
        }
        p.moving = false;
        if moved {
            self.left(ch, "moved").await;
        } else {
            // Still ours: its route goes back from "moving" to this conference.
            if self.node.route(ch, &self.name) {
                self.sync_caller_hold(ch);
            }
            // Not counted while it was on its way out: with it back, the waiters may make a
            // start now. A waiter that a start skipped while it was on its way out joins the
            // mix now.
            self.start_if_due().await;
            self.finish_cut_short_start().await;
        }
    }

    /// Hangs up a caller the target of its move refused after its conference ended.
    async fn refused_move_of_ended(&self, ch: &str) {
        tracing::info!(conference = %self.name, channel = ch, "move refused after the conference ended; hanging the caller up");
        self.node.unroute(ch);
        if let Err(e) = self.node.hang_up(ch, CAUSE_NORMAL).await {
            tracing::warn!(conference = %self.name, channel = ch, error = %e, "cannot hang up the caller of an ended conference");
        }
    }

    // ----- dial-out -----

    /// Originates a dial-out into this conference once this node owns it (claiming it
    /// when nobody does) and it has room; answers with the call id at once.
    async fn dialout(&mut self, d: DialoutOp, pending: Pending) {
        // With no events connection the Stasis app is not registered in Asterisk: a callee
        // answering would be hung up on the spot, having been rung for nothing.
        if !self.node.ari_connected.load(Ordering::SeqCst) {
            self.end_if_empty("dialout_failed").await;
            pending.answer(
                &self.node,
                Err(BusError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "node {} has no events connection to Asterisk (its Stasis app is not registered): a callee answering now would be hung up; nothing was dialled",
                        self.node.id
                    ),
                )),
            );
            return;
        }
        if let Err(r) = self.admit(&d.options).await {
            let e = refusal_error(&self.name, &self.node.id, r);
            self.end_if_empty("dialout_failed").await;
            pending.answer(&self.node, Err(e));
            return;
        }
        // Admission may have taken most of the budget (a slow Redis or Asterisk). A call
        // placed after the sender gave up would ring while the application was told the
        // node did not answer, and a retry would call the callee twice.
        let left = pending.time_left();
        if left < MIN_ORIGINATE {
            tracing::warn!(conference = %self.name, to = %d.to, left_ms = left.as_millis() as u64, "dial-out not placed: its command's deadline came during admission");
            self.end_if_empty("dialout_failed").await;
            pending.answer(
                &self.node,
                Err(BusError::new(
                    ErrorCode::Timeout,
                    "the dial-out's deadline came before it could be placed; nothing was dialled",
                )),
            );
            return;
        }
        let callid = format!(
            "dial-{:016x}{:08x}",
            rand::random::<u64>(),
            rand::random::<u32>()
        );
        self.node.route_dialout(&callid, &self.name);
        self.node.dialouts.begin(
            &callid,
            &pending,
            std::time::Duration::from_secs(d.timeout_secs),
        );
        self.dialing.insert(callid.clone(), d.options);
        let app = self.node.cfg.ari.app.clone();
        let o = Originate {
            channel_id: &callid,
            endpoint: &d.endpoint,
            app: &app,
            app_args: self.name.as_str(),
            caller_id: &d.caller_id,
            timeout_secs: d.timeout_secs,
            variables: &d.variables,
        };
        // Within what is left of the command's budget: a placed call whose answer comes too
        // late takes the failure path below, which hangs it up.
        let placed = match tokio::time::timeout(left, self.node.ari.originate(&o)).await {
            Ok(r) => r,
            Err(_) => Err(AriError {
                op: "originateWithId",
                kind: AriErrorKind::Timeout,
                status: None,
                message: format!(
                    "no answer within the {left:?} left of the command's budget (rpc.command_timeout)"
                ),
            }),
        };
        match placed {
            Ok(_) => {
                self.heard_of = true;
                tracing::info!(conference = %self.name, callid = %callid, to = %d.to, endpoint = %d.endpoint, "dialing out");
                pending.answer(&self.node, Ok(json!({"callid": callid})));
                self.node.dialouts.accepted(&self.node, &callid);
                self.counts_changed().await;
                // Asterisk ends the call by the ring timeout; should that end never be seen,
                // the seat is freed and the dial-out reported all the same.
                let node = self.node.clone();
                let name = self.name.clone();
                let limit = Duration::from_secs(d.timeout_secs) + dialout::RINGING_FALLBACK;
                let watched = callid.clone();
                let timer = tokio::spawn(async move {
                    tokio::time::sleep(limit).await;
                    let cause = node.dialouts.expire(&node, &callid);
                    if cause.is_some() {
                        tracing::warn!(conference = %name, callid = %callid, "dial-out end never seen; given up");
                    }
                    // Also when a reconciliation reported it first: the seat goes either way.
                    node.dialout_gone(&callid, cause);
                });
                self.node.dialouts.watch(&watched, timer.abort_handle());
            }
            Err(e) => {
                tracing::warn!(conference = %self.name, to = %d.to, endpoint = %d.endpoint, error = %e, "cannot originate the dial-out");
                self.node.dialouts.abandon(&callid);
                self.dialing.remove(&callid);
                // Refused by Asterisk (an endpoint it does not know, a channel it could not
                // allocate): no call exists, and its route goes now. A request that timed
                // out, failed on its way or answered what cannot be read may have placed the
                // call all the same (a 409 says a channel has its id): it is hung up now, and
                // should it still answer, its route (kept until it could have rung out) marks
                // it a dial-out nobody waits for, hung up rather than joined as a caller.
                // A 500 is Asterisk's own (no dial, no channel); a 502 to 504 may be a
                // proxy's in front of an Asterisk that did place it.
                let refused = e.status == Some(500)
                    || matches!(
                        e.kind,
                        AriErrorKind::BadRequest
                            | AriErrorKind::Unauthorized
                            | AriErrorKind::NotFound
                            | AriErrorKind::InvalidState
                            | AriErrorKind::Unprocessable
                            | AriErrorKind::TooLong
                    );
                if refused {
                    self.node.unroute_dialout(&callid);
                } else {
                    let node = self.node.clone();
                    let limit = Duration::from_secs(d.timeout_secs) + dialout::RINGING_FALLBACK;
                    let placed = callid.clone();
                    tokio::spawn(async move {
                        if let Err(e) = node.hang_up(&placed, CAUSE_NORMAL).await {
                            tracing::warn!(callid = %placed, error = %e, "cannot hang up a dial-out that failed");
                        }
                        tokio::time::sleep(limit).await;
                        node.unroute_dialout(&placed);
                    });
                }
                self.end_if_empty("dialout_failed").await;
                // Settings too long for Asterisk's request limits are the caller's to shorten.
                let code = if e.kind == AriErrorKind::TooLong {
                    ErrorCode::InvalidParams
                } else {
                    ErrorCode::Internal
                };
                pending.answer(
                    &self.node,
                    Err(BusError::new(code, format!("cannot call {}: {e}", d.to))),
                );
            }
        }
    }

    /// A dial-out's callee answered: it joins with the options the dial-out gave.
    pub(super) async fn dialout_answered(&mut self, channel: Channel) {
        let Some(options) = self.dialing.remove(&channel.id) else {
            // The dial-out was called off (the conference ended) as the callee answered.
            self.node.join_abandoned(&channel.id);
            if let Err(e) = self.node.hang_up(&channel.id, CAUSE_NORMAL).await {
                tracing::warn!(channel = %channel.id, error = %e, "cannot hang up a callee nobody waits for");
            }
            return;
        };
        let ch = channel.id.clone();
        self.answering = Some((ch.clone(), options.clone()));
        self.join(Join { channel, options }).await;
        // Answered but not let in (refused, or its join failed): reported as a participant
        // that could not be added, unless the conference's end already did.
        if let Some((ch, opts)) = self.answering.take() {
            if !self.participants.contains_key(&ch) {
                self.callback_add_failed(&ch, &opts, "failed");
            }
        }
    }

    /// A dial-out ended before its callee answered.
    pub(super) async fn dialout_gone(&mut self, ch: &str, cause: Option<i64>) {
        if let Some(opts) = self.dialing.remove(ch) {
            self.callback_add_failed(ch, &opts, super::twilio_add_failed_status(cause));
            self.end_if_empty("dialout_failed").await;
            self.counts_changed().await;
        }
    }
}
