//! From StasisStart to the conference's actor: which conference the caller asked for (first
//! app argument, else a channel variable, else a SIP header), whether that name is valid, and
//! the caller's options. Runs per channel, before any conference is involved.

use std::collections::BTreeMap;
use std::sync::Arc;

use confroute_shared::name::ConferenceName;

use crate::ari::Channel;
use crate::conference::{Join, Msg};
use crate::node::Node;
use crate::options::{self, OPTION_VARIABLES};

/// Q.850 cause for a call naming no conference: unallocated number (SIP 404).
pub const CAUSE_NO_NAME: u16 = 1;
/// Q.850 cause for an invalid conference name: invalid number format (SIP 484).
pub const CAUSE_BAD_NAME: u16 = 28;

/// Works out the caller's conference and options and hands the join to its actor.
pub async fn prepare(node: Arc<Node>, channel: Channel, args: Vec<String>) {
    let raw = match conference_name(&node, &channel, &args).await {
        Some(n) => n,
        None => {
            tracing::info!(channel = %channel.id, "caller named no conference (no app argument, variable or header); hanging up");
            refuse(&node, &channel.id, CAUSE_NO_NAME, "no_name").await;
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
    let vars = option_variables(&node, &channel).await;
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
async fn conference_name(node: &Node, channel: &Channel, args: &[String]) -> Option<String> {
    if let Some(a) = args.first().filter(|a| !a.is_empty()) {
        return Some(a.clone());
    }
    let var = &node.cfg.ari.conference_variable;
    if let Some(v) = channel.channelvar(var) {
        return Some(v);
    }
    let listed = channel
        .channelvars
        .as_ref()
        .is_some_and(|m| m.contains_key(var.as_str()));
    if !listed {
        match node.ari.get_variable(&channel.id, var).await {
            Ok(Some(v)) => return Some(v),
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(channel = %channel.id, error = %e, "cannot read the conference variable")
            }
        }
    }
    let header = format!("PJSIP_HEADER(read,{})", node.cfg.ari.conference_header);
    match node.ari.get_variable(&channel.id, &header).await {
        Ok(v) => v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()),
        Err(e) => {
            tracing::debug!(channel = %channel.id, error = %e, "cannot read the conference header");
            None
        }
    }
}

/// One channel variable: from `channelvars` when the snapshot carries it, else read.
pub(crate) async fn variable(node: &Node, channel: &Channel, name: &str) -> Option<String> {
    if let Some(v) = channel.channelvar(name) {
        return Some(v);
    }
    if channel
        .channelvars
        .as_ref()
        .is_some_and(|m| m.contains_key(name))
    {
        return None;
    }
    let mut out = BTreeMap::new();
    read_variables(node, &channel.id, &[name], &mut out).await;
    out.remove(name).filter(|v| !v.is_empty())
}

/// The option variables that are set: from `channelvars` when the snapshot carries them
/// (no round trip), else read one by one, concurrently.
pub(crate) async fn option_variables(node: &Node, channel: &Channel) -> BTreeMap<String, String> {
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
            return out;
        }
        read_variables(node, &channel.id, &missing, &mut out).await;
        return out;
    }
    read_variables(node, &channel.id, OPTION_VARIABLES, &mut out).await;
    out
}

async fn read_variables(
    node: &Node,
    channel: &str,
    names: &[&str],
    out: &mut BTreeMap<String, String>,
) {
    let reads = names.iter().map(|n| async move {
        let v = node.ari.get_variable(channel, n).await;
        (*n, v)
    });
    for (name, value) in futures_util::future::join_all(reads).await {
        match value {
            Ok(Some(v)) => {
                out.insert(name.to_string(), v);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(channel, variable = name, error = %e, "cannot read option variable")
            }
        }
    }
}
