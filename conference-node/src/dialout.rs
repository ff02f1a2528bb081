//! Dial-out: calling a number or SIP URI into a conference (the `dialout` command).
//!
//! This module holds what does not belong to one conference: the dial strings of
//! `[dialout]` and their start-up checks, the target and option checks of a command, the
//! Q.850 → SIP status mapping, and the tracker that turns the call's ARI events into
//! `dialout.status` notifications: `accepted` → `ringing` (the channel state `Ringing`, or
//! a Dial `RINGING`/`PROGRESS`) → `connected` (the callee is in the conference's bridge),
//! or `rejected` with `code` and `cause` when the call ends before that, or `cleared` with
//! `cause` when it ends after. The conference's actor originates the call and joins the
//! callee (`conference::commands`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

use confroute_shared::bus::{BusError, ErrorCode};
use confroute_shared::config::Issues;
use confroute_shared::dialout::caller_id;
pub use confroute_shared::dialout::{target, Target};

use crate::config::{DialoutConfig, NodeConfig};
use crate::control::{DialoutP, Pending};
use crate::node::{lock, Node};
use crate::options::{self, Options};

/// Seconds a callee rings when the command names no timeout.
const DEFAULT_TIMEOUT: u64 = 30;
/// How long after the callee's StasisEnd the call is reported `cleared` if Asterisk's
/// `ChannelDestroyed` (which carries the cause) never comes, e.g. across an ARI reconnect.
const CLEARED_FALLBACK: Duration = Duration::from_secs(5);
/// How long past its ring timeout an unanswered dial-out whose end was never seen (an event
/// lost across an ARI reconnect) is given up: reported `rejected` and its seat freed.
pub const RINGING_FALLBACK: Duration = Duration::from_secs(30);

/// The ARI endpoint for `target` from the configured dial strings; `forbidden` when that
/// kind of target is not configured on this node.
pub fn endpoint(cfg: &DialoutConfig, target: Target<'_>) -> Result<String, BusError> {
    let endpoint = dial_string(cfg, target)?;
    // Asterisk's originate copies what follows `TECH/` into an 80-byte buffer
    // (`AST_CHANNEL_NAME`) and dials what fits without a word: a long SIP URI would go out
    // cut (its `;transport=tls`, or part of its host, gone).
    let resource = endpoint.split_once('/').map_or("", |(_, r)| r);
    if resource.len() > MAX_DIAL_DEVICE {
        return Err(BusError::new(
            ErrorCode::InvalidParams,
            format!(
                "`to` makes a dial string of {} bytes after its technology, past the {MAX_DIAL_DEVICE} Asterisk dials without cutting it",
                resource.len()
            ),
        ));
    }
    Ok(endpoint)
}

/// Longest dial string after `TECH/` Asterisk's originate dials whole (`AST_CHANNEL_NAME`
/// less its terminating NUL).
pub const MAX_DIAL_DEVICE: usize = 79;

/// The dial string for `target` from the configured templates.
fn dial_string(cfg: &DialoutConfig, target: Target<'_>) -> Result<String, BusError> {
    match target {
        Target::Number(n) if !cfg.endpoint.is_empty() => Ok(cfg
            .endpoint
            .replace("{number}", n)
            .replace("{digits}", n.trim_start_matches('+'))),
        Target::Sip(u) if !cfg.sip_endpoint.is_empty() => Ok(cfg.sip_endpoint.replace("{uri}", u)),
        Target::Number(_) => Err(BusError::new(
            ErrorCode::Forbidden,
            "dial-out to numbers is not configured on this node (dialout.endpoint)",
        )),
        Target::Sip(_) => Err(BusError::new(
            ErrorCode::Forbidden,
            "dial-out to SIP URIs is not configured on this node (dialout.sip_endpoint)",
        )),
    }
}

/// Checks one dial string: `TECH/resource` with exactly the placeholders allowed.
fn check_dial_string(issues: &mut Issues, key: &str, s: &str, allowed: &[&str], example: &str) {
    if s.is_empty() {
        return;
    }
    let bad = |issues: &mut Issues, why: &str| {
        issues.add(key, format!("`{s}` {why}; expected e.g. {example}"));
    };
    if s.bytes()
        .any(|b| b.is_ascii_control() || b.is_ascii_whitespace())
    {
        return bad(issues, "holds spaces or control characters");
    }
    let Some((tech, resource)) = s.split_once('/') else {
        return bad(issues, "is not an ARI endpoint TECH/resource");
    };
    if tech.is_empty() || !tech.bytes().all(|b| b.is_ascii_alphanumeric()) || resource.is_empty() {
        return bad(issues, "is not an ARI endpoint TECH/resource");
    }
    // A Local channel Asterisk may optimise away puts the callee's own channel in the
    // conference in its place (a StasisStart with `replace_channel`), which the agent does
    // not follow: `/n` keeps the Local channel in the bridge.
    if tech.eq_ignore_ascii_case("local") {
        // `local_alloc` (channels/core_local.c) takes the options after the resource's
        // first `/`, the context being optional (`default`).
        let options = resource.split_once('/').map_or("", |(_, options)| options);
        if !options.contains('n') {
            return bad(
                issues,
                "is a Local channel without the `/n` option: Asterisk would optimise it away once the callee answers and put the callee's own channel in the conference in its place, which the agent does not follow",
            );
        }
        // A SIP URI always holds an `@` (and may hold a `/`): Local would take what follows
        // the URI's `@` for its context, and every such dial-out would fail.
        if resource.contains("{uri}") {
            return bad(
                issues,
                "puts {uri} in a Local channel, which reads the URI's `@` as the start of its context (and a `/` as its options)",
            );
        }
    }
    let mut rest = s;
    let mut found = false;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return bad(issues, "has an unclosed `{`");
        };
        let name = &rest[open..open + close + 1];
        if !allowed.contains(&name) {
            return bad(
                issues,
                &format!("names {name}, which is not one of {}", allowed.join(", ")),
            );
        }
        found = true;
        rest = &rest[open + close + 1..];
    }
    if !found {
        bad(
            issues,
            &format!(
                "has no placeholder for the target ({})",
                allowed.join(" or ")
            ),
        );
    }
}

/// Start-up checks of `[dialout]`, naming the key at fault.
pub fn check_config(cfg: &DialoutConfig, issues: &mut Issues) {
    check_dial_string(
        issues,
        "dialout.endpoint",
        &cfg.endpoint,
        &["{number}", "{digits}"],
        "PJSIP/{number}@trunk",
    );
    check_dial_string(
        issues,
        "dialout.sip_endpoint",
        &cfg.sip_endpoint,
        &["{uri}"],
        "PJSIP/trunk/{uri}",
    );
    if let Err(e) = caller_id(&cfg.caller_id) {
        issues.add("dialout.caller_id", e);
    }
}

/// A checked dial-out, ready to originate.
#[derive(Debug)]
pub struct DialoutOp {
    /// The target as given (for logs).
    pub to: String,
    /// The ARI endpoint to call.
    pub endpoint: String,
    /// Caller id to present; empty for the endpoint's own.
    pub caller_id: String,
    /// Seconds to ring.
    pub timeout_secs: u64,
    /// The callee's options once it joins.
    pub options: Options,
    /// The same options as the `CONFROUTE_*` channel variables a caller would bring, set on
    /// the callee's channel: an agent that adopts the callee after a restart reads them back.
    pub variables: BTreeMap<String, String>,
}

/// Checks a `dialout` command: target (`invalid_number`), dial string configured
/// (`forbidden`), `from`, `timeout` and `options` (`invalid_params`).
pub fn prepare(cfg: &NodeConfig, p: DialoutP) -> Result<DialoutOp, BusError> {
    let Some(t) = target(&p.to) else {
        return Err(BusError::new(
            ErrorCode::InvalidNumber,
            format!(
                "`{}` is not an E.164 number or a SIP URI",
                p.to.chars().take(64).collect::<String>()
            ),
        ));
    };
    let invalid = |m: String| BusError::new(ErrorCode::InvalidParams, m);
    let caller = p.from.unwrap_or_else(|| cfg.dialout.caller_id.clone());
    caller_id(&caller).map_err(|e| invalid(format!("from: {e}")))?;
    let timeout_secs = p.timeout.unwrap_or(DEFAULT_TIMEOUT);
    if !(1..=600).contains(&timeout_secs) {
        return Err(invalid("timeout: 1-600 seconds".into()));
    }
    let variables = options::dialout_variables(&p.options.unwrap_or_default()).map_err(invalid)?;
    let options = resolve_callee(cfg, &variables).map_err(invalid)?;
    let endpoint = endpoint(&cfg.dialout, t)?;
    Ok(DialoutOp {
        to: p.to,
        endpoint,
        caller_id: caller,
        timeout_secs,
        options,
        variables,
    })
}

/// The callee's options: the dial-out's `options` map (TwiML names) over the profile it
/// names over `[conference]`, with the same rules as a caller's channel variables; any bad
/// value is an error naming the option.
pub fn callee_options(cfg: &NodeConfig, given: &Map<String, Value>) -> Result<Options, String> {
    resolve_callee(cfg, &options::dialout_variables(given)?)
}

/// Options from the callee's variables, by the join path's rules; a bad value is an error
/// naming its option.
fn resolve_callee(cfg: &NodeConfig, vars: &BTreeMap<String, String>) -> Result<Options, String> {
    let (opts, warnings) = options::resolve(&cfg.conference, &cfg.profiles, vars);
    if let Some(w) = warnings.first() {
        let key = options::dialout_option_name(w.variable).unwrap_or(w.variable);
        let why = w
            .message
            .trim_end_matches("; keeping the profile's value")
            .trim_end_matches("; using the defaults");
        return Err(format!("options.{key}: {why}"));
    }
    Ok(opts)
}

/// The SIP status reported for a dial-out that ended before it connected, from the
/// Q.850 cause of its channel (docs/call-control.md). It inverts chan_pjsip's own mapping
/// of a callee's final answer to a cause (`hangup_sip2cause`), so a 408 from the far end
/// reads as 408 again, and otherwise follows its `hangup_cause2sip`.
pub fn sip_code(cause: i64) -> u16 {
    match cause {
        1..=3 => 404,
        // Called off by this side before an answer: the conference ended or it was kicked.
        16 => 487,
        17 => 486,
        // chan_pjsip's cause for a 408 or a transaction timeout: nobody answered the INVITE.
        18 => 408,
        19 | 20 => 480,
        // A 603 Decline (or a 403) from the far end; a person turning the call down
        // sends 603.
        21 => 603,
        22 => 410,
        27 => 502,
        28 => 484,
        29 => 501,
        34 | 41 | 42 => 503,
        // A far-end 500 (chan_pjsip's AST_CAUSE_FAILURE), reported as the error it was
        // rather than as a congestion a caller would try again after.
        38 => 500,
        58 => 488,
        // A far-end 504 (a gateway's timeout).
        102 => 504,
        _ => 500,
    }
}

/// One dial-out's progress.
#[derive(Debug)]
struct Track {
    id: String,
    reply_to: String,
    accepted: bool,
    ringing: bool,
    /// The callee answered (its channel entered the app); its conference is joining it.
    answered: bool,
    connected: bool,
    /// When the callee entered the conference.
    connected_at: Option<std::time::Instant>,
    /// When Asterisk took the originate up (the callee's channel existed from then).
    accepted_at: Option<std::time::Instant>,
    /// Cause of the last hangup request from the far end (not a soft hangup).
    requested: Option<i64>,
    /// The call ended (with this cause) before `accepted` could be sent.
    ended: Option<i64>,
    /// The ring-timeout fallback watching this call while it is unanswered.
    timer: Option<Timer>,
    /// When Asterisk gives the call up unanswered: its `timeout` from the originate.
    rings_until: std::time::Instant,
}

/// A fallback timer task, stopped when its call no longer needs it (answered or ended), so
/// a busy node does not keep one sleeping task per call for the whole ring timeout.
#[derive(Debug)]
struct Timer(Option<tokio::task::AbortHandle>);

impl Timer {
    /// Lets the task run on (the timer that fired ends by itself).
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Dial-outs in progress on this node, by call id (the callee's channel id).
#[derive(Default)]
pub struct Dialouts {
    calls: Mutex<HashMap<String, Track>>,
}

fn send(node: &Node, t: &Track, callid: &str, status: &'static str, extra: Value, last: bool) {
    let mut params = json!({"callid": callid, "status": status});
    if let (Some(p), Value::Object(e)) = (params.as_object_mut(), extra) {
        p.extend(e);
    }
    node.metrics.dialout(status);
    tracing::info!(callid, status, "dial-out status");
    node.outbox.notify(&t.id, &t.reply_to, params, last);
}

fn finish(node: &Node, t: &Track, callid: &str, cause: i64) {
    if t.connected {
        send(node, t, callid, "cleared", json!({"cause": cause}), true);
    } else {
        send(
            node,
            t,
            callid,
            "rejected",
            json!({"code": sip_code(cause), "cause": cause}),
            true,
        );
    }
}

impl Dialouts {
    /// Starts tracking call `callid` of command `pending`, ringing for `ring` (before the
    /// originate, so no event of the call is missed).
    pub fn begin(&self, callid: &str, pending: &Pending, ring: std::time::Duration) {
        lock(&self.calls).insert(
            callid.to_string(),
            Track {
                id: pending.id.clone(),
                reply_to: pending.reply_to.clone(),
                accepted: false,
                ringing: false,
                answered: false,
                connected: false,
                connected_at: None,
                accepted_at: None,
                requested: None,
                ended: None,
                timer: None,
                rings_until: std::time::Instant::now() + ring,
            },
        );
    }

    /// Hands the ring-timeout fallback of call `callid` to its tracker, which stops it once
    /// the callee answers or the call ends; stopped at once if that has already happened.
    pub fn watch(&self, callid: &str, timer: tokio::task::AbortHandle) {
        let timer = Timer(Some(timer));
        if let Some(t) = lock(&self.calls)
            .get_mut(callid)
            .filter(|t| !t.connected && !t.answered)
        {
            t.timer = Some(timer);
        }
    }

    /// The callee of call `callid` answered: the ring-timeout fallback stops. Its conference
    /// may take long to join it (its actor busy with slow ARI requests), and the call is not
    /// to be reported `rejected` meanwhile: it ends as `connected` then `cleared`, or, should
    /// the join fail, with the channel's end (or its absence at a reconciliation).
    pub fn answered(&self, callid: &str) {
        if let Some(t) = lock(&self.calls).get_mut(callid) {
            t.answered = true;
            t.timer = None;
        }
    }

    /// The command was answered with the call id: `accepted`, then whatever the call did
    /// meanwhile.
    pub fn accepted(&self, node: &Node, callid: &str) {
        let mut calls = lock(&self.calls);
        let Some(t) = calls.get_mut(callid) else {
            return;
        };
        t.accepted = true;
        t.accepted_at = Some(std::time::Instant::now());
        send(node, t, callid, "accepted", Value::Null, false);
        if t.ringing {
            send(node, t, callid, "ringing", Value::Null, false);
        }
        if t.connected {
            send(node, t, callid, "connected", Value::Null, false);
        }
        if let Some(cause) = t.ended {
            finish(node, t, callid, cause);
            calls.remove(callid);
        }
    }

    /// The latest status of call `callid` (`accepted`, `ringing` or `connected`); `None`
    /// once it ended (its last status is sent) or when no such call was placed here.
    pub fn state(&self, callid: &str) -> Option<&'static str> {
        let calls = lock(&self.calls);
        let t = calls
            .get(callid)
            .filter(|t| t.accepted && t.ended.is_none())?;
        Some(if t.connected {
            "connected"
        } else if t.ringing {
            "ringing"
        } else {
            "accepted"
        })
    }

    /// The originate failed: no notifications follow.
    pub fn abandon(&self, callid: &str) {
        lock(&self.calls).remove(callid);
    }

    /// Progress of the call (a Dial status, or `RINGING` from its channel state); false when
    /// the call is not tracked (never, or no more).
    pub fn dial_status(&self, node: &Node, callid: &str, status: &str) -> bool {
        let mut calls = lock(&self.calls);
        let Some(t) = calls.get_mut(callid) else {
            return false;
        };
        if !matches!(status, "RINGING" | "PROGRESS") || t.ringing || t.connected {
            return true;
        }
        t.ringing = true;
        if t.accepted {
            send(node, t, callid, "ringing", Value::Null, false);
        }
        true
    }

    /// The callee is in the conference's bridge.
    pub fn connected(&self, node: &Node, callid: &str) {
        let mut calls = lock(&self.calls);
        let Some(t) = calls.get_mut(callid) else {
            return;
        };
        if t.connected {
            return;
        }
        t.connected = true;
        t.connected_at = Some(std::time::Instant::now());
        t.timer = None;
        if t.accepted {
            send(node, t, callid, "connected", Value::Null, false);
        }
    }

    /// A reconciliation listed Asterisk's channels (`present`) after `taken`: a callee
    /// connected, or placed, before that and not among them is gone. Its end may have been
    /// lost with the events WebSocket, or may still be on its way: it is reported cleared
    /// (rejected, if it never connected) unless its ChannelDestroyed comes soon.
    pub fn vanished(
        &self,
        node: &Arc<Node>,
        present: &std::collections::HashSet<&str>,
        taken: std::time::Instant,
    ) {
        let gone: Vec<(String, bool)> = lock(&self.calls)
            .iter()
            .filter(|(id, t)| {
                let listed_after = if t.connected {
                    t.connected_at.is_some_and(|at| at < taken)
                } else {
                    t.accepted_at.is_some_and(|at| at < taken)
                };
                t.accepted && listed_after && !present.contains(id.as_str())
            })
            .map(|(id, t)| (id.clone(), t.connected))
            .collect();
        for (callid, connected) in gone {
            if connected {
                tracing::info!(callid = %callid, "connected callee no longer in Asterisk");
                clear_later(node, callid, CAUSE_NORMAL_CLEARING);
            } else {
                // Answered while the events WebSocket was down, Asterisk could not hand the
                // callee to the app and hung it up; or it failed unheard. Without this the
                // call would be reported only when its ring time ran out.
                tracing::info!(callid = %callid, "ringing callee no longer in Asterisk");
                clear_later(node, callid, CAUSE_NORMAL_UNSPECIFIED);
            }
        }
    }

    /// The far end asked to hang up with Q.850 `cause`.
    pub fn hangup_requested(&self, callid: &str, cause: i64) {
        if let Some(t) = lock(&self.calls).get_mut(callid) {
            t.requested = Some(cause);
        }
    }

    /// The call's channel is gone (ChannelDestroyed): the last notification. Returns the
    /// cause it is reported with, if it was tracked.
    pub fn destroyed(&self, node: &Node, callid: &str, cause: i64) -> Option<i64> {
        let mut calls = lock(&self.calls);
        let t = calls.get_mut(callid)?;
        // Asterisk's own ring timeout hangs the callee up with no cause of its own and no
        // Dial status (`handle_timeout_trip` in main/dial.c): past the ring time, that is
        // the no-answer it means.
        let cause = match (cause > 0, t.requested) {
            (true, _) => cause,
            (false, Some(asked)) => asked,
            (false, None) if !t.connected && std::time::Instant::now() >= t.rings_until => {
                CAUSE_NO_ANSWER
            }
            (false, None) => CAUSE_NORMAL_CLEARING,
        };
        if !t.accepted {
            t.ended = Some(cause);
            return Some(cause);
        }
        finish(node, t, callid, cause);
        calls.remove(callid);
        Some(cause)
    }

    /// Gives up a dial-out still unanswered long after its ring timeout (its end was not
    /// seen): `rejected` with the last cause heard, else 19 (no answer). Returns that cause
    /// when it was given up.
    pub fn expire(&self, node: &Node, callid: &str) -> Option<i64> {
        let mut calls = lock(&self.calls);
        if !calls
            .get(callid)
            .is_some_and(|t| t.accepted && !t.connected && !t.answered)
        {
            return None;
        }
        let mut t = calls.remove(callid)?;
        // Called from that timer, which still has the seat to free.
        if let Some(timer) = t.timer.take() {
            timer.disarm();
        }
        let cause = t.requested.unwrap_or(CAUSE_NO_ANSWER);
        finish(node, &t, callid, cause);
        Some(cause)
    }

    /// The callee left the Stasis app; if Asterisk's ChannelDestroyed does not follow, the
    /// call is reported cleared anyway.
    pub fn stasis_ended(&self, node: &Arc<Node>, callid: &str) {
        if !lock(&self.calls)
            .get(callid)
            .is_some_and(|t| t.connected && t.accepted)
        {
            return;
        }
        clear_later(node, callid.to_string(), CAUSE_NORMAL_CLEARING);
    }
}

/// Q.850 normal call clearing.
const CAUSE_NORMAL_CLEARING: i64 = 16;
/// Q.850 19, no answer from user (user alerted): a dial-out that rang out.
const CAUSE_NO_ANSWER: i64 = 19;
/// Q.850 normal, unspecified: the call ended and nothing says how.
const CAUSE_NORMAL_UNSPECIFIED: i64 = 31;

/// Reports a call ended (cleared, or rejected if it never connected) after
/// [`CLEARED_FALLBACK`] unless its ChannelDestroyed (with the real cause) has ended it by
/// then; `cause` when the far end gave none.
fn clear_later(node: &Arc<Node>, callid: String, cause: i64) {
    let node = node.clone();
    tokio::spawn(async move {
        tokio::time::sleep(CLEARED_FALLBACK).await;
        let reported = {
            let mut calls = lock(&node.dialouts.calls);
            calls.remove(&callid).map(|t| {
                let cause = t.requested.unwrap_or(cause);
                finish(&node, &t, &callid, cause);
                cause
            })
        };
        // A callee that never answered still holds its seat and route in the conference:
        // no ChannelDestroyed will free them now.
        node.dialout_gone(&callid, reported);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answered_call_stops_its_ring_timeout_fallback() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let calls = Dialouts::default();
            let track = |id: &str| Track {
                id: id.to_string(),
                reply_to: "ctl".to_string(),
                accepted: true,
                ringing: true,
                answered: false,
                connected: false,
                connected_at: None,
                accepted_at: None,
                requested: None,
                ended: None,
                timer: None,
                rings_until: std::time::Instant::now(),
            };
            lock(&calls.calls).insert("c1".to_string(), track("cmd-1"));
            let fallback = tokio::spawn(std::future::pending::<()>());
            calls.watch("c1", fallback.abort_handle());
            calls.answered("c1");
            let ended = fallback.await.expect_err("stopped");
            assert!(ended.is_cancelled());
            // A fallback handed over after the answer is stopped at once.
            let late = tokio::spawn(std::future::pending::<()>());
            calls.watch("c1", late.abort_handle());
            assert!(late.await.expect_err("stopped").is_cancelled());
            assert_eq!(calls.state("c1"), Some("ringing"));
        });
    }

    #[test]
    fn endpoints_from_templates() {
        let cfg = DialoutConfig {
            endpoint: "PJSIP/{number}@trunk".into(),
            sip_endpoint: "PJSIP/trunk/{uri}".into(),
            caller_id: String::new(),
        };
        assert_eq!(
            endpoint(&cfg, Target::Number("+15555550101")).expect("number"),
            "PJSIP/+15555550101@trunk"
        );
        assert_eq!(
            endpoint(&cfg, Target::Sip("sip:a@b")).expect("uri"),
            "PJSIP/trunk/sip:a@b"
        );
        let digits = DialoutConfig {
            endpoint: "PJSIP/00{digits}@carrier".into(),
            ..DialoutConfig::default()
        };
        assert_eq!(
            endpoint(&digits, Target::Number("+4930123")).expect("digits"),
            "PJSIP/004930123@carrier"
        );
        let e = endpoint(&digits, Target::Sip("sip:a@b")).expect_err("not configured");
        assert_eq!(e.code, ErrorCode::Forbidden);
        assert!(e.message.contains("dialout.sip_endpoint"));
    }

    #[test]
    fn dial_string_checks() {
        let check = |endpoint: &str, sip: &str| {
            let mut issues = Issues::default();
            check_config(
                &DialoutConfig {
                    endpoint: endpoint.into(),
                    sip_endpoint: sip.into(),
                    caller_id: String::new(),
                },
                &mut issues,
            );
            issues.finish()
        };
        assert!(check("", "").is_ok());
        assert!(check("PJSIP/{number}@trunk", "PJSIP/trunk/{uri}").is_ok());
        assert!(check("Local/{digits}@outbound/n", "").is_ok());
        assert!(check("Local/{digits}@outbound/nj", "").is_ok());
        assert!(check("Local/{digits}/n", "").is_ok());
        for (e, s, key) in [
            ("Local/{digits}@outbound", "", "dialout.endpoint"),
            ("local/{digits}@outbound/j", "", "dialout.endpoint"),
            ("", "Local/{uri}@sip-out", "dialout.sip_endpoint"),
            ("", "Local/{uri}@sip-out/n", "dialout.sip_endpoint"),
            ("PJSIP/trunk", "", "dialout.endpoint"),
            ("{number}", "", "dialout.endpoint"),
            ("PJSIP/{num}", "", "dialout.endpoint"),
            ("PJSIP/{number", "", "dialout.endpoint"),
            ("PJ SIP/{number}", "", "dialout.endpoint"),
            ("", "PJSIP/{number}", "dialout.sip_endpoint"),
            ("", "/{uri}", "dialout.sip_endpoint"),
        ] {
            let err = check(e, s).expect_err(e);
            assert!(err.mentions(key), "{e} {s}: {err}");
        }
    }

    #[test]
    fn q850_to_sip() {
        for (cause, code) in [
            (17, 486),
            (18, 408),
            (19, 480),
            (20, 480),
            (21, 603),
            (29, 501),
            (34, 503),
            (38, 500),
            (102, 504),
            (41, 503),
            (42, 503),
            (1, 404),
            (2, 404),
            (3, 404),
            (16, 487),
            (99, 500),
        ] {
            assert_eq!(sip_code(cause), code, "cause {cause}");
        }
    }

    #[test]
    fn callee_options_name_the_bad_key() {
        let cfg = NodeConfig::default();
        let ok: Map<String, Value> = serde_json::from_value(json!({
            "muted": true, "beep": "onExit", "startConferenceOnEnter": false,
            "maxParticipants": 5, "statusCallbackEvent": ["join", "leave"]
        }))
        .expect("map");
        let o = callee_options(&cfg, &ok).expect("valid options");
        assert!(o.muted && !o.start_on_enter);
        assert_eq!(o.max_participants, 5);
        assert_eq!(o.beep, options::Beep::OnExit);
        for (bad, key) in [
            (json!({"muted": "perhaps"}), "options.muted"),
            (json!({"colour": "red"}), "options.colour"),
            (json!({"maxParticipants": 0}), "options.maxParticipants"),
            (json!({"profile": "nope"}), "options.profile"),
            (json!({"beep": {"a": 1}}), "options.beep"),
        ] {
            let m: Map<String, Value> = serde_json::from_value(bad.clone()).expect("map");
            let e = callee_options(&cfg, &m).expect_err("bad option");
            assert!(e.starts_with(key), "{bad}: {e}");
        }
    }
}
