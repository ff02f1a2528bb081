//! From StasisStart to the conference's actor: which conference the caller asked for (first
//! app argument, else a channel variable, else a SIP header), whether that name is valid, and
//! the caller's options. Runs per channel, before any conference is involved.

use std::collections::BTreeMap;
use std::sync::Arc;

use confroute_shared::name::ConferenceName;

use futures_util::StreamExt;

use crate::ari::{AriError, AriErrorKind, Channel};
use crate::conference::{Join, Msg, CAUSE_UNAVAILABLE};
use crate::node::Node;
use crate::options::{self, OPTION_VARIABLES};

/// Q.850 cause for a call naming no conference: unallocated number (SIP 404).
pub const CAUSE_NO_NAME: u16 = 1;
/// Q.850 cause for an invalid conference name: invalid number format (SIP 484).
pub const CAUSE_BAD_NAME: u16 = 28;

/// Option variables read at once for one caller when ari.conf's `channelvars` does not
/// carry them: a burst of joins then stays well inside Asterisk's HTTP session limit
/// (http.conf `sessionlimit`, 100 by default).
const VARIABLE_READS: usize = 4;

/// Works out the caller's conference and options and hands the join to its actor.
pub async fn prepare(node: Arc<Node>, channel: Channel, args: Vec<String>) {
    let raw = match conference_name(&node, &channel, &args).await {
        Ok(Some(n)) => n,
        Ok(None) => {
            tracing::info!(channel = %channel.id, "caller named no conference (no app argument, variable or header); hanging up");
            refuse(&node, &channel.id, CAUSE_NO_NAME, "no_name").await;
            return;
        }
        // Not "no such conference" (404): the edge may try again and get through.
        Err(e) => {
            unread(
                &node,
                &channel.id,
                "which conference the caller asked for",
                &e,
            )
            .await;
            return;
        }
    };
    let name = match ConferenceName::parse(&raw) {
        Ok(n) => n,
        Err(e) => {
            tracing::info!(channel = %channel.id, error = %e, "invalid conference name; hanging up");
            refuse(&node, &channel.id, CAUSE_BAD_NAME, "invalid_name").await;
            return;
        }
    };
    let (vars, failed) = option_variables(&node, &channel).await;
    // Defaults in place of options that could not be read could unmute a listener or
    // drop a moderator's end-on-exit: refused, the edge may try again.
    if let Some(e) = failed {
        unread(&node, &channel.id, "the caller's options", &e).await;
        return;
    }
    let (opts, warnings) = options::resolve(&node.cfg.conference, &node.cfg.profiles, &vars);
    for w in warnings {
        tracing::warn!(conference = %name, channel = %channel.id, variable = w.variable, "{}", w.message);
    }
    if !node.route(&channel.id, &name) {
        node.metrics.join("abandoned");
        return;
    }
    let join = Join {
        channel,
        options: opts,
    };
    node.send(&name, Msg::Join(Box::new(join)), true);
}

/// A caller whose channel could not be read (`what`): refused with a temporary failure,
/// unless it is gone (hung up meanwhile).
async fn unread(node: &Node, channel: &str, what: &str, e: &AriError) {
    // "Provided channel was not found"; not a 404 for the path itself.
    if e.kind == AriErrorKind::NotFound && e.message.to_ascii_lowercase().contains("channel") {
        tracing::info!(channel, "caller hung up while joining");
        node.metrics.join("abandoned");
        node.join_abandoned(channel);
        node.unroute(channel);
        return;
    }
    tracing::warn!(channel, error = %e, "cannot read {what}; refusing with a temporary failure");
    refuse(node, channel, CAUSE_UNAVAILABLE, "ari_error").await;
}

async fn refuse(node: &Node, channel: &str, cause: u16, outcome: &'static str) {
    node.metrics.join(outcome);
    node.join_abandoned(channel);
    node.unroute(channel);
    if let Err(e) = node.hang_up(channel, cause).await {
        tracing::warn!(channel, error = %e, "cannot hang up refused caller");
    }
}

/// The conference name: first app argument, else the conference variable (from the
/// snapshot's `channelvars` when ari.conf lists it, else read), else the SIP header.
/// `Ok(None)` when none names one; an error when Asterisk could not be asked.
async fn conference_name(
    node: &Node,
    channel: &Channel,
    args: &[String],
) -> Result<Option<String>, AriError> {
    // Trimmed as the header is: a name holds no spaces, and a dialplan's stray one
    // (`Stasis(confroute, sales-42)`, a `Set()` with a trailing space) is no reason to refuse.
    let named = |v: &str| Some(v.trim().to_string()).filter(|v| !v.is_empty());
    if let Some(a) = args.first().and_then(|a| named(a)) {
        return Ok(Some(a));
    }
    let var = &node.cfg.ari.conference_variable;
    if let Some(v) = channel.channelvar(var).and_then(|v| named(&v)) {
        return Ok(Some(v));
    }
    let listed = channel
        .channelvars
        .as_ref()
        .is_some_and(|m| m.contains_key(var.as_str()));
    if !listed {
        match node.ari.get_variable(&channel.id, var).await {
            Ok(Some(v)) if named(&v).is_some() => return Ok(named(&v)),
            Ok(_) => {}
            Err(e) => return Err(e),
        }
    }
    let header = format!("PJSIP_HEADER(read,{})", node.cfg.ari.conference_header);
    match node.ari.get_variable(&channel.id, &header).await {
        Ok(v) => Ok(v.and_then(|s| named(&s))),
        Err(e) => Err(e),
    }
}

/// One channel variable: from `channelvars` when the snapshot carries it, else read; an
/// error when Asterisk could not be asked.
pub(crate) async fn variable(
    node: &Node,
    channel: &Channel,
    name: &str,
) -> Result<Option<String>, AriError> {
    if let Some(v) = channel.channelvar(name) {
        return Ok(Some(v));
    }
    if channel
        .channelvars
        .as_ref()
        .is_some_and(|m| m.contains_key(name))
    {
        return Ok(None);
    }
    let mut out = BTreeMap::new();
    if let Some(e) = read_variables(node, &channel.id, &[name], &mut out).await {
        return Err(e);
    }
    Ok(out.remove(name).filter(|v| !v.is_empty()))
}

/// The option variables that are set: from `channelvars` when the snapshot carries them
/// (no round trip), else read one by one, a few at a time. With them, the first read
/// error, if Asterisk could not be asked for some (those are missing from the map).
pub(crate) async fn option_variables(
    node: &Node,
    channel: &Channel,
) -> (BTreeMap<String, String>, Option<AriError>) {
    let mut out = BTreeMap::new();
    if let Some(map) = &channel.channelvars {
        for name in OPTION_VARIABLES {
            if let Some(v) = map.get(*name).and_then(|v| v.as_str()) {
                if !v.is_empty() {
                    out.insert(name.to_string(), v.to_string());
                }
            }
        }
        // ari.conf lists the variables it wants in every snapshot; any it does not list
        // are read below, so a partial list still works.
        let missing: Vec<&str> = OPTION_VARIABLES
            .iter()
            .copied()
            .filter(|n| !map.contains_key(*n))
            .collect();
        if missing.is_empty() {
            return (out, None);
        }
        let failed = read_variables(node, &channel.id, &missing, &mut out).await;
        return (out, failed);
    }
    let failed = read_variables(node, &channel.id, OPTION_VARIABLES, &mut out).await;
    (out, failed)
}

/// Reads `names` into `out` (an unset variable is left out); the first error, if any.
async fn read_variables(
    node: &Node,
    channel: &str,
    names: &[&str],
    out: &mut BTreeMap<String, String>,
) -> Option<AriError> {
    // Owned names: a closure taking `&&str` makes the spawned join future's lifetimes
    // higher-ranked, which the compiler cannot prove Send.
    let names: Vec<String> = names.iter().map(|n| (*n).to_string()).collect();
    let reads = futures_util::stream::iter(names.into_iter().map(|n| async move {
        let v = node.ari.get_variable(channel, &n).await;
        (n, v)
    }))
    .buffer_unordered(VARIABLE_READS)
    .collect::<Vec<_>>()
    .await;
    let mut failed = None;
    for (name, value) in reads {
        match value {
            Ok(Some(v)) => {
                out.insert(name, v);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(channel, variable = %name, error = %e, "cannot read a channel variable");
                failed.get_or_insert(e);
            }
        }
    }
    failed
}
