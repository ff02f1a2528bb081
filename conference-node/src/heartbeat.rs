//! The heartbeat: every `node.heartbeat_interval` the node record, its load and the claims
//! of its conferences are renewed in one Redis script, with a lease of three intervals
//! (invariant 3). The reply tells which claims were lost (invariant 2) and the state an
//! admin may have set through the controller, which the node adopts.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use confroute_shared::store::{Heartbeat, HostedStatus, Registration};
use confroute_shared::types::{NodeInfo, NodeLoad, NodeState, Owner};

use crate::conference::Msg;
use crate::lifecycle;
use crate::node::{lock, Node};

/// Lease of the node record: three heartbeats.
pub fn lease(node: &Node) -> Duration {
    node.cfg.node.heartbeat_interval * 3
}

/// The record to register, with the node's current state.
fn info(node: &Node) -> NodeInfo {
    NodeInfo {
        state: node.state(),
        ..node.info.clone()
    }
}

/// Registers the node (at start, and when a heartbeat finds the record gone).
pub async fn register(node: &Node) -> bool {
    let (state, version) = node.state_versioned();
    let since = node.drain_since_ms.load(Ordering::SeqCst);
    let seen = *lock(&node.seen_state);
    let how = Registration {
        ari: Some(node.ari_available()),
        drain_since_ms: (state == NodeState::Draining && since > 0).then_some(since),
        seen,
        stopping: node.stopping(),
    };
    let sent = std::time::Instant::now();
    let registered = node
        .store
        .register_with(&info(node), lease(node), &how)
        .await;
    match registered {
        Ok(previous) => {
            // Later registrations follow a lost record: nothing there for an admin to change.
            lock(&node.seen_state).take();
            node.redis_ok.store(true, Ordering::SeqCst);
            node.registered.store(true, Ordering::SeqCst);
            node.renewed(sent);
            node.state_written(version);
            // A record made anew (Redis lost the last one) says nothing of the last one's
            // numbers: the next heartbeat reads this one's.
            node.state_numbering_restarted();
            node.measure_redis_clock().await;
            node.metrics
                .heartbeats
                .with_label_values(&["registered"])
                .inc();
            tracing::info!(node = %node.id, state = %node.state(), ?previous, "node registered");
            true
        }
        Err(e) => {
            node.redis_ok.store(false, Ordering::SeqCst);
            node.metrics.heartbeats.with_label_values(&["error"]).inc();
            tracing::warn!(error = %e, "cannot register the node; retrying with the next heartbeat");
            false
        }
    }
}

/// Runs heartbeats until the task is aborted.
pub async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.cfg.node.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cpu = CpuSampler::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = node.ari_changed.notified() => {}
        }
        let n = node.beats_started.fetch_add(1, Ordering::SeqCst) + 1;
        beat(&node, cpu.sample()).await;
        node.beats_done.send_replace(n);
    }
}

/// Until this life's first reconciliation has looked at what Asterisk still holds, the
/// claims the last life left (its conferences, whose callers may still be in the bridges)
/// are renewed by nothing else: the heartbeat renews only conferences this life has
/// adopted. They are kept (see keep.lua) as a running agent keeps its own: past
/// `ari.release_after` without the events WebSocket, only while Asterisk answers REST (the
/// callers may be talking; another client holding the app, say, keeps the WebSocket out).
/// Run by each heartbeat of a registered node before it reports its load (under the
/// heartbeat's gate: a node gone keeps nothing alive), so even the first one after a
/// registration reports what those claims carry.
async fn keep_inherited_claims(node: &Arc<Node>) {
    let bound = node.cfg.ari.release_after;
    let past_bound = !bound.is_zero() && node.born.elapsed() >= bound;
    // With the WebSocket up, the reconciliation that would take them over is what is late:
    // the bound stands, or a pass that never completes would keep them for ever.
    if node.ever_reconciled() || (past_bound && (!node.ari_given_up() || asterisk_gone(node).await))
    {
        lock(&node.inherited).take();
        return;
    }
    match node.store.keep_claims(&node.id).await {
        Ok(found) => {
            if found.claims > 0 {
                tracing::debug!(
                    claims = found.claims,
                    participants = found.participants,
                    "kept the claims left from before the start until the first reconciliation"
                );
            }
            *lock(&node.inherited) = Some(found);
        }
        // The last estimate stands: the claims it counted are still kept by their leases.
        Err(e) => tracing::warn!(error = %e, "cannot keep the claims left from before the start"),
    }
}

/// The load to report: the agent's own count, but until the first reconciliation at least
/// what the last life's claims carry. Before it has looked, the agent counts only the
/// callers that came since the start, while the bridges may still hold the last life's:
/// reported as empty, the node would draw new conferences past its participant limit.
fn reported_load(node: &Node) -> (u32, u32) {
    let (conferences, participants) = node.load();
    match *lock(&node.inherited) {
        Some(last) if !node.ever_reconciled() => (
            conferences.max(last.claims),
            participants.max(last.participants),
        ),
        _ => (conferences, participants),
    }
}

/// One heartbeat; right after registering again, a second one at once.
pub async fn beat(node: &Arc<Node>, cpu: f32) {
    let deregistered = node.beat_gate.lock().await;
    if *deregistered {
        return;
    }
    // The claims of a node whose record expired may have expired too. Renewing (or claiming
    // again) at once, rather than a heartbeat later, has them back before a controller that
    // sees the node registered again places any of its conferences elsewhere; the same for
    // claims found missing.
    if beat_once(node, cpu, false).await {
        beat_once(node, cpu, true).await;
    }
}

/// One heartbeat; true when a reclaiming one must follow at once (the node had to register
/// again, or claims of its conferences are missing). With `reclaim`, or when Redis failed the
/// last time, it also claims again the hosted conferences whose claims expired.
async fn beat_once(node: &Arc<Node>, cpu: f32, reclaim: bool) -> bool {
    if !node.registered.load(Ordering::SeqCst) {
        return first_registration(node).await;
    }
    if node.state_dirty() {
        node.write_state().await;
    }
    node.recheck_writes();
    let hosted = if node.ari_given_up() && asterisk_gone(node).await {
        give_back_claims(node).await;
        Vec::new()
    } else {
        if node.claims_given_back.swap(false, Ordering::SeqCst) {
            tracing::info!("Asterisk is back: claiming again the conferences still here");
        }
        node.hosted()
    };
    keep_inherited_claims(node).await;
    let (conferences, participants) = reported_load(node);
    let load = NodeLoad {
        conferences,
        participants,
        cpu,
        ari: node.ari_available(),
    };
    let (version, in_redis) = node.state_snapshot();
    let was_ok = node.redis_ok.load(Ordering::SeqCst);
    let sent = std::time::Instant::now();
    let beat = if reclaim || !was_ok {
        node.store
            .heartbeat_reclaiming(&node.id, &load, lease(node), &hosted)
            .await
    } else {
        node.store
            .heartbeat(&node.id, &load, lease(node), &hosted)
            .await
    };
    match beat {
        Ok(Heartbeat::Unregistered) => {
            tracing::warn!(node = %node.id, "node record gone (lease expired or Redis restarted); registering again");
            // First: with every node gone but those registered since this one's record was
            // lost, Redis lost them all, and nothing may be placed until the others are back
            // too (neither this node nor a newcomer may be given their conferences).
            // For this node's whole lease: the others renew within theirs (one heartbeat
            // interval for a cluster), however long it is.
            let wait = lease(node);
            match node.store.settle_after_loss(wait, lease(node)).await {
                Ok(true) => {
                    tracing::warn!(node = %node.id, ?wait, "no node registered before this one's record was lost is live: Redis lost its data; conferences are placed again once the nodes have registered again")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot tell whether Redis lost every node record")
                }
            }
            if register(node).await {
                node.request_reconcile();
                return true;
            }
        }
        Ok(Heartbeat::Renewed {
            state,
            state_seq,
            hosted: statuses,
        }) => {
            node.redis_ok.store(true, Ordering::SeqCst);
            node.renewed(sent);
            if !was_ok {
                tracing::info!("Redis reachable again");
            }
            node.metrics
                .heartbeats
                .with_label_values(&["renewed"])
                .inc();
            if node.redis_clock_stale() {
                node.measure_redis_clock().await;
            }
            // A claim gone while its conference lives here (deleted, or lost in a failover):
            // claim it again at once, as a reclaiming heartbeat does whatever this node's
            // state. Left to the conference, a draining, full or ARI-down node could not, and
            // the next caller would give the conference a second home.
            if !reclaim && statuses.contains(&HostedStatus::Missing) {
                tracing::warn!(
                    "claims of conferences hosted here are missing; claiming them again"
                );
                return true;
            }
            for (h, status) in hosted.iter().zip(statuses) {
                let msg = Msg::Claim {
                    status,
                    epoch: h.epoch,
                };
                if status != HostedStatus::Owned
                    && !node.send(&h.name, msg, false)
                    && status == HostedStatus::Reclaimed
                {
                    // The conference ended between the listing and the heartbeat: give back
                    // the claim the heartbeat just made for it, with the listing's count. Only
                    // while that count is still the last written: a first caller's new actor
                    // may have counted itself in since, and its claim must stay.
                    let owner = Owner {
                        node: node.id.clone(),
                        epoch: h.epoch,
                    };
                    let released = node
                        .store
                        .release_unless_counted_since(&h.name, &owner, h.count_version)
                        .await;
                    if let Err(e) = released {
                        tracing::warn!(conference = %h.name, error = %e, "cannot release the claim of an ended conference; it expires with its lease");
                    }
                }
            }
            // Only a state Redis held this node's own before the beat can have been changed
            // by an admin since: otherwise the reply may predate the node's own write.
            if state == node.state() {
                if in_redis {
                    node.state_agreed(version, state_seq);
                }
            } else if let Some(seq) =
                state_seq.filter(|_| in_redis && node.state_went_back(state_seq))
            {
                // Not an admin's change: a Redis failover to a replica that missed this
                // node's last state write (or an admin's it adopted) took the record back.
                let local = node.state();
                tracing::warn!(redis = %state, state = %local, "Redis holds an older state of this node than the one it last saw there (a failover lost a write); writing it again");
                node.restore_state(seq).await;
            } else if state != NodeState::ShuttingDown && in_redis {
                // A drain set through the controller counts from when it was set (the record's
                // `drain_since_ms`), not from when this heartbeat saw it: a registration after a
                // Redis restart writes the agent's own back.
                let since = if state == NodeState::Draining && node.state() == NodeState::Serving {
                    match node.store.get_node(&node.id).await {
                        Ok(rec) => rec.and_then(|r| r.drain_since_ms),
                        Err(_) => None,
                    }
                } else {
                    None
                };
                lifecycle::adopt(node, state, version, since);
                if node.state() == state {
                    node.state_agreed(version, state_seq);
                }
            }
        }
        Err(e) => {
            node.redis_ok.store(false, Ordering::SeqCst);
            node.metrics.heartbeats.with_label_values(&["error"]).inc();
            if was_ok {
                tracing::warn!(error = %e, "heartbeat failed; serving existing conferences, refusing new ones until Redis is back");
            }
        }
    }
    false
}

/// Registers this life for the first time, when start-up could not: after the check that no
/// other agent uses the node id, if start-up could not make it, taking over an admin drain the
/// last life's record held. True when registered (a reclaiming heartbeat follows).
async fn first_registration(node: &Arc<Node>) -> bool {
    if node.id_unchecked.load(Ordering::SeqCst) {
        let interval = node.cfg.node.heartbeat_interval;
        match crate::app::id_free(&node.store, &node.id, interval).await {
            Ok(crate::app::IdCheck::Free(last)) => {
                node.id_unchecked.store(false, Ordering::SeqCst);
                *lock(&node.seen_state) = last.as_ref().map(|rec| rec.info.state);
                if let (NodeState::Draining, since) = crate::app::inherited(last.as_ref()) {
                    if node.state() == NodeState::Serving {
                        // The drain's deadline counts on Redis's clock.
                        node.measure_redis_clock().await;
                        tracing::info!("the node record says draining (an admin drained it): resuming the drain");
                        match since {
                            Some(since) => lifecycle::resume_drain(node, since).await,
                            None => lifecycle::drain(node, false).await,
                        };
                    }
                }
            }
            Ok(crate::app::IdCheck::Unreadable(_)) => {
                // Said once at start-up; the metric counts each try.
                node.redis_ok.store(false, Ordering::SeqCst);
                node.metrics.heartbeats.with_label_values(&["error"]).inc();
                return false;
            }
            Err(e) => {
                // As at start-up: registering would take the other agent's conferences, and
                // running on would answer its commands and hold its record (marked without
                // ARI, so no conference is placed on it) at every heartbeat. The process
                // exits; no record or claim of its own is left behind.
                tracing::error!(error = %e.0, "cannot start: exiting");
                eprintln!("confroute-node: {e}");
                std::process::exit(1);
            }
        }
    }
    if register(node).await {
        node.request_reconcile();
        return true;
    }
    false
}

/// Host CPU use from `/proc/stat`, as the busy share between two samples.
pub struct CpuSampler {
    last: Option<(u64, u64)>,
}

impl Default for CpuSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuSampler {
    /// A sampler with no previous sample.
    pub fn new() -> Self {
        CpuSampler {
            last: read_proc_stat(),
        }
    }

    /// Per cent busy since the previous sample (0 when unknown).
    pub fn sample(&mut self) -> f32 {
        let now = read_proc_stat();
        let out = match (self.last, now) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                (busy1.saturating_sub(busy0)) as f32 * 100.0 / (total1 - total0) as f32
            }
            _ => 0.0,
        };
        self.last = now.or(self.last);
        out.clamp(0.0, 100.0)
    }
}

/// `(busy, total)` jiffies from the `cpu` line of `/proc/stat`.
fn read_proc_stat() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_proc_stat(&text)
}

fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Whether an Asterisk whose events WebSocket has been down for `ari.release_after` is gone
/// too: its REST interface has answered no ping for a whole node lease. Pings run one at a
/// time beside the heartbeat (so a slow one does not hold it up), each with the whole
/// `ari.request_timeout` and outside `ari.max_connections` (calls waiting on a busy
/// Asterisk are no silence). Any HTTP answer counts, an error status too: the server lives,
/// and so may the callers in its bridges (the WebSocket alone is broken, or another client
/// holds the app), so its conferences keep their home. Giving the claims back while callers
/// talk would split their conferences. Pinged at every heartbeat, after the claims were
/// given back too, so an Asterisk that answers again has its conferences claimed again.
async fn asterisk_gone(node: &Arc<Node>) -> bool {
    if !node.rest_ping_running.swap(true, Ordering::SeqCst) {
        let node = node.clone();
        tokio::spawn(async move {
            let sent = Instant::now();
            let connection = node.connection();
            let answered = match node.ari.ping().await {
                Ok(()) => true,
                Err(e) => e.status.is_some(),
            };
            // A ping that outlived the outage it was sent in says nothing of the next one.
            if node.connection() != connection || !node.ari_given_up() {
                node.rest_ping_running.store(false, Ordering::SeqCst);
                return;
            }
            {
                let mut silent_since = crate::node::lock(&node.rest_silent_since);
                if answered {
                    *silent_since = None;
                } else {
                    silent_since.get_or_insert(sent);
                }
            }
            if answered && !node.rest_answers_logged.swap(true, Ordering::SeqCst) {
                tracing::warn!("events WebSocket down past ari.release_after, but Asterisk answers REST: keeping its conferences");
            }
            node.rest_ping_running.store(false, Ordering::SeqCst);
        });
    }
    let silent_since = *crate::node::lock(&node.rest_silent_since);
    silent_since.is_some_and(|since| since.elapsed() >= lease(node))
}

/// Asterisk has been out of reach for `ari.release_after`: gives back (compare-and-delete)
/// the claims of the conferences hosted here, once, so each one's next caller is placed on a
/// live node instead of being sent to an Asterisk that may never come back. The callers
/// still in its bridges (if it lives) are beyond the agent's reach meanwhile; once it is
/// back, the heartbeat claims again those no other node took (reported missing), and
/// ownership decides for the others (`node.on_ownership_lost`).
async fn give_back_claims(node: &Arc<Node>) {
    if node.claims_given_back.swap(true, Ordering::SeqCst) {
        return;
    }
    let hosted = node.hosted();
    tracing::warn!(
        after = ?node.cfg.ari.release_after,
        conferences = hosted.len(),
        "Asterisk out of reach for ari.release_after: giving back the claims of this node's conferences, so their next callers are placed elsewhere"
    );
    for h in hosted {
        let owner = Owner {
            node: node.id.clone(),
            epoch: h.epoch,
        };
        if let Err(e) = node.store.release(&h.name, &owner).await {
            tracing::warn!(conference = %h.name, error = %e, "cannot give back a claim; it expires with its lease, no longer renewed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_parsing() {
        let text = "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse_proc_stat(text), Some((200, 1000)));
        assert_eq!(parse_proc_stat("nothing"), None);
        let mut s = CpuSampler::new();
        let v = s.sample();
        assert!((0.0..=100.0).contains(&v));
    }
}
