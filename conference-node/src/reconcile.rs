//! Reconciliation after an ARI (re)connect, an agent restart, and periodically: what
//! Asterisk has (bridges, channels) and what Redis says (claims) are brought in line with
//! what the agent believes, so nothing is orphaned in either.
//!
//! - Bridges of ours (`cr-*`, `crh-*`) go to their conference's actor, which re-adopts them
//!   when this node still owns the conference (or can claim it), tears them down when the
//!   claim moved elsewhere, and destroys them when empty.
//! - Actors whose bridge vanished end their conference (and release the claim).
//! - Claims owned by this node with no live conference here are released.
//! - Callers still in our Stasis app but in no bridge are joined again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use confroute_shared::name::ConferenceName;
use confroute_shared::types::Owner;

use crate::ari::{Bridge, Channel};
use crate::conference::{parse_bridge_id, Msg};
use crate::node::Node;

/// Delay before retrying a reconciliation that could not finish.
const RETRY: Duration = Duration::from_secs(1);
/// Longest delay between retries (Redis or Asterisk may be away for long).
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How long an empty claim without a bridge is left alone: a controller may just have placed
/// the conference here, its first caller on the way (a 302 and a new INVITE).
const FRESH_CLAIM_GRACE: Duration = Duration::from_secs(5);

/// Runs reconciliations when asked and every `ari.reconcile_interval`.
pub async fn run(node: Arc<Node>, mut wake: mpsc::UnboundedReceiver<()>) {
    let every = node.cfg.ari.reconcile_interval;
    loop {
        tokio::select! {
            got = wake.recv() => if got.is_none() { return },
            _ = tokio::time::sleep(every) => {}
        }
        while wake.try_recv().is_ok() {}
        let mut delay = RETRY;
        loop {
            if !node.ari_connected.load(Ordering::SeqCst) {
                break;
            }
            let connection = node.connection();
            match once(&node).await {
                Ok(()) => {
                    if !node.reconciled() {
                        tracing::info!(
                            connection,
                            "first reconciliation since the events connection opened is done"
                        );
                    }
                    node.reconciled_at(connection);
                    break;
                }
                Err(why) => {
                    tracing::warn!(error = %why, retry_in = ?delay, "reconciliation incomplete; retrying");
                    // A reconnect or a new registration asks for a pass at once: it is not
                    // left waiting out a backoff that an earlier failure set (the backoff
                    // goes on growing should that pass fail too).
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        got = wake.recv() => {
                            if got.is_none() {
                                return;
                            }
                        }
                    }
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

#[derive(Default)]
struct Found {
    main: Vec<Bridge>,
    holding: Vec<Bridge>,
}

/// The channels in Stasis app `app` that no bridge holds (`bridged`: every bridge's
/// members, listed before the channels).
pub fn unbridged(app: &str, bridged: &HashSet<String>, channels: &[Channel]) -> HashSet<String> {
    channels
        .iter()
        .filter(|c| !bridged.contains(&c.id) && c.stasis_app().is_some_and(|(a, _)| a == app))
        .map(|c| c.id.clone())
        .collect()
}

/// One reconciliation pass.
pub async fn once(node: &Arc<Node>) -> Result<(), String> {
    let taken = std::time::Instant::now();
    let routed = node.settled_routes();
    node.forget_ended();
    let bridges = node.ari.list_bridges().await.map_err(|e| e.to_string())?;
    let channels = node.ari.list_channels().await.map_err(|e| e.to_string())?;
    let snapshots: HashMap<&str, &Channel> = channels.iter().map(|c| (c.id.as_str(), c)).collect();
    let present: HashSet<&str> = snapshots.keys().copied().collect();
    let listed: Arc<HashSet<String>> = Arc::new(present.iter().map(|c| c.to_string()).collect());
    node.dialouts.vanished(node, &present, taken);
    node.forget_hangups_done(&present, taken);
    let forgotten = node.forget_vanished(routed, &present);
    if forgotten > 0 {
        tracing::info!(
            channels = forgotten,
            "forgot channels Asterisk no longer has whose end was never heard"
        );
        node.metrics
            .reconcile_actions
            .with_label_values(&["forgot_vanished_channel"])
            .inc_by(forgotten as u64);
    }
    let mut ours: BTreeMap<ConferenceName, Found> = BTreeMap::new();
    let mut bridged: HashSet<String> = HashSet::new();
    for b in bridges {
        bridged.extend(b.channels.iter().cloned());
        if let Some((holding, _epoch, name)) = parse_bridge_id(&b.id) {
            let f = ours.entry(name).or_default();
            if holding {
                f.holding.push(b);
            } else {
                f.main.push(b);
            }
        }
    }
    for name in node.actor_names() {
        ours.entry(name).or_default();
    }
    let had_bridge: HashSet<ConferenceName> = ours
        .iter()
        .filter(|(_, f)| !f.main.is_empty() || !f.holding.is_empty())
        .map(|(n, _)| n.clone())
        .collect();
    let unbridged = Arc::new(unbridged(&node.cfg.ari.app, &bridged, &channels));
    let mut active: HashSet<ConferenceName> = HashSet::new();
    let mut incomplete = false;
    for (name, found) in ours {
        let spawn = !found.main.is_empty() || !found.holding.is_empty();
        let members: HashMap<String, Channel> = found
            .main
            .iter()
            .chain(found.holding.iter())
            .flat_map(|b| b.channels.iter())
            .filter_map(|id| {
                snapshots
                    .get(id.as_str())
                    .map(|c| (id.clone(), (*c).clone()))
            })
            .collect();
        let (tx, rx) = oneshot::channel();
        let msg = Msg::Reconcile {
            main: found.main,
            holding: found.holding,
            members,
            listed: listed.clone(),
            unbridged: unbridged.clone(),
            taken,
            reply: tx,
        };
        if !node.send(&name, msg, spawn) {
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(true)) => {
                active.insert(name);
            }
            Ok(Ok(false)) => {}
            // No answer (the actor could not ask Redis who owns it, or took too long): its
            // claim must not be released as stale by this pass.
            _ => incomplete = true,
        }
    }
    // A Redis failure here leaves the rest to do: what follows needs only ARI (hangups to
    // repeat, callers in no bridge), and callers must not wait in silence for Redis.
    let mut released = Ok(());
    if !incomplete {
        released = release_stale_claims(node, &active, &had_bridge).await;
    }
    for ch in channels {
        // A caller the agent hung up (its conference ended, it was kicked or refused), or a
        // callee it called off while ringing (outside Stasis), is still here: the request
        // failed or was lost, so it is asked again rather than left in silence or ringing.
        if let Some(cause) = node.hangup_overdue(&ch.id, taken) {
            if !node.ended_since_listing(&ch.id) {
                tracing::warn!(channel = %ch.id, cause, "a caller the agent hung up is still in Asterisk; hanging it up again");
                node.metrics
                    .reconcile_actions
                    .with_label_values(&["hung_up_again"])
                    .inc();
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = node.hang_up_again(&ch.id, cause).await {
                        tracing::warn!(channel = %ch.id, error = %e, "cannot hang up the caller again");
                    }
                });
            }
            continue;
        }
        let Some((app, args)) = ch.stasis_app() else {
            continue;
        };
        if app != node.cfg.ari.app {
            continue;
        }
        if bridged.contains(&ch.id) || node.ended_since_listing(&ch.id) {
            continue;
        }
        if !node.claim_route(&ch.id) {
            // A callee still ringing for the agent whose StasisStart never came.
            if node.answered_unheard(ch.clone()) {
                node.metrics
                    .reconcile_actions
                    .with_label_values(&["joined_unheard_callee"])
                    .inc();
            }
            continue;
        }
        tracing::info!(channel = %ch.id, "caller in the Stasis app but in no bridge; joining it again");
        node.metrics
            .reconcile_actions
            .with_label_values(&["rejoined_channel"])
            .inc();
        node.join_started(&ch.id, std::time::Instant::now());
        tokio::spawn(crate::join::prepare(node.clone(), ch, args));
    }
    if incomplete {
        return Err("a conference did not answer in time".to_string());
    }
    released
}

/// Releases (compare-and-delete) claims this node holds in Redis for conferences it does
/// not host: their bridge no longer exists.
async fn release_stale_claims(
    node: &Arc<Node>,
    active: &HashSet<ConferenceName>,
    had_bridge: &HashSet<ConferenceName>,
) -> Result<(), String> {
    let previous = node.take_stale_claims();
    let mut seen = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = node
            .store
            .list_conferences(after.as_deref(), 1000)
            .await
            .map_err(|e| e.to_string())?;
        for (name, rec) in &page.items {
            if rec.owner.node == node.id {
                node.count_versions_above(rec.count_version);
            }
            if rec.owner.node != node.id || active.contains(name) {
                continue;
            }
            // An actor may be creating this conference's bridge right now.
            if node.actor_names().contains(name) {
                continue;
            }
            // A claim that never had a participant nor a bridge may be a placement a controller
            // just made, its first caller on the way: release it only once it has been stale
            // for a while (passes can run back to back: a reconnect, a re-registration).
            let key = (name.clone(), rec.owner.epoch);
            if rec.participants == 0 && !had_bridge.contains(name) {
                let first = previous.get(&key).copied().unwrap_or_else(Instant::now);
                if first.elapsed() < FRESH_CLAIM_GRACE {
                    seen.insert(key, first);
                    continue;
                }
            }
            let owner = Owner {
                node: node.id.clone(),
                epoch: rec.owner.epoch,
            };
            // Only while its count is still the one listed: a first caller's actor, started
            // since the check above, counts itself in Redis before anything else, and its
            // claim must stay.
            let released = node
                .store
                .release_unless_counted_since(name, &owner, rec.count_version)
                .await;
            match released {
                Ok(true) => {
                    tracing::info!(conference = %name, epoch = rec.owner.epoch, "released a claim whose bridge no longer exists");
                    node.metrics
                        .reconcile_actions
                        .with_label_values(&["released_stale_claim"])
                        .inc();
                }
                Ok(false) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        match page.next {
            Some(n) => after = Some(n),
            None => {
                node.keep_stale_claims(seen);
                return Ok(());
            }
        }
    }
}
