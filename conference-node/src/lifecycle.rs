//! Drain and shutdown (invariant 4): `serving` → `draining` (no new conferences, existing
//! ones keep taking joiners) → when empty or at `node.drain_deadline` → for a shutdown,
//! `shutting_down`, deregistration and exit; for an admin drain, the node stays drained
//! until undrained.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use confroute_shared::name::ConferenceName;
use confroute_shared::types::NodeState;

use crate::conference::Msg;
use crate::node::{lock, Node};

/// How long ended conferences get to tear down after the deadline.
const TEARDOWN_GRACE: Duration = Duration::from_secs(10);

/// Starts draining; `shutdown` makes the drain end in an exit. Returns the previous state.
pub async fn drain(node: &Arc<Node>, shutdown: bool) -> NodeState {
    start(node, shutdown, Duration::ZERO)
        .await
        .unwrap_or_else(|state| state)
}

/// An admin's drain: `Err` with the current state, nothing done, when the node is stopping
/// (a stop's drain under way, or shutting down): the stop wins, and the node exits once
/// empty rather than stay drained. Judged with the drain's own lock, so a stop that begins
/// meanwhile is never answered as an admin's drain.
pub async fn admin_drain(node: &Arc<Node>) -> Result<NodeState, NodeState> {
    start(node, false, Duration::ZERO).await
}

/// Resumes, in an agent started again, the admin drain its last life's record held, begun
/// at `since_ms` (Redis time): it ends at the deadline it had (invariant 4), not a whole
/// `node.drain_deadline` after the restart.
pub async fn resume_drain(node: &Arc<Node>, since_ms: u64) -> NodeState {
    let elapsed = Duration::from_millis(node.redis_now_ms().saturating_sub(since_ms));
    node.drain_since_ms.store(since_ms, Ordering::SeqCst);
    let left = node.cfg.node.drain_deadline.saturating_sub(elapsed);
    tracing::info!(
        ?elapsed,
        ?left,
        "resuming the admin drain where its deadline stood"
    );
    start(node, false, elapsed)
        .await
        .unwrap_or_else(|state| state)
}

/// `Err(previous)` when a drain that is not a stop's meets a stop (under way, or shutting
/// down); `Ok(previous)` otherwise, whether it began a drain or one was under way already.
async fn start(
    node: &Arc<Node>,
    shutdown: bool,
    elapsed: Duration,
) -> Result<NodeState, NodeState> {
    let previous = node.state();
    if previous == NodeState::ShuttingDown {
        return if shutdown {
            Ok(previous)
        } else {
            Err(previous)
        };
    }
    let left;
    {
        let mut slot = lock(&node.drain);
        match slot.as_ref() {
            Some((_, true)) if shutdown => return Ok(previous),
            Some((_, true)) => return Err(previous),
            Some((task, false)) if !shutdown && !task.is_finished() => return Ok(previous),
            _ => {}
        }
        if let Some((task, _)) = slot.take() {
            task.abort();
        }
        node.set_state_local(NodeState::Draining);
        let _ = node.drain_since_ms.compare_exchange(
            0,
            node.redis_now_ms(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        // A stop during an admin's drain keeps that drain's deadline: it counts from when the
        // drain began, as `drain_since_ms` (and the alert on a stuck drain) says, not from
        // the stop.
        let since = node.drain_since_ms.load(Ordering::SeqCst);
        let elapsed = elapsed.max(Duration::from_millis(
            node.redis_now_ms().saturating_sub(since),
        ));
        left = node.cfg.node.drain_deadline.saturating_sub(elapsed);
        let task = tokio::spawn(run(node.clone(), shutdown, elapsed));
        *slot = Some((task, shutdown));
    }
    node.write_state().await;
    tracing::info!(shutdown, deadline = ?node.cfg.node.drain_deadline, ?left, "draining: no new conferences on this node");
    Ok(previous)
}

/// Ends a drain started by an admin; `Err` with the current state when the node is
/// shutting down.
pub async fn undrain(node: &Arc<Node>) -> Result<NodeState, NodeState> {
    let previous = node.state();
    {
        let mut slot = lock(&node.drain);
        if previous == NodeState::ShuttingDown || matches!(slot.as_ref(), Some((_, true))) {
            return Err(previous);
        }
        if let Some((task, _)) = slot.take() {
            task.abort();
        }
        node.set_state_local(NodeState::Serving);
        node.drain_since_ms.store(0, Ordering::SeqCst);
    }
    node.write_state().await;
    Ok(previous)
}

/// Adopts a state an admin set through the controller (seen in a heartbeat reply); a drain
/// counts from `since_ms` (the record's `drain_since_ms`) when known.
pub fn adopt(node: &Arc<Node>, remote: NodeState, version: u64, since_ms: Option<u64>) {
    let local = node.state();
    if remote == local || local == NodeState::ShuttingDown {
        return;
    }
    let mut slot = lock(&node.drain);
    if matches!(slot.as_ref(), Some((_, true))) {
        return;
    }
    match remote {
        NodeState::Draining if node.adopt_state(NodeState::Draining, version) => {
            if let Some((task, _)) = slot.take() {
                task.abort();
            }
            let now = node.redis_now_ms();
            let since = since_ms.filter(|s| *s > 0).unwrap_or(now);
            let _ =
                node.drain_since_ms
                    .compare_exchange(0, since, Ordering::SeqCst, Ordering::SeqCst);
            let elapsed = Duration::from_millis(now.saturating_sub(since));
            *slot = Some((tokio::spawn(run(node.clone(), false, elapsed)), false));
        }
        NodeState::Serving if node.adopt_state(NodeState::Serving, version) => {
            if let Some((task, _)) = slot.take() {
                task.abort();
            }
            node.drain_since_ms.store(0, Ordering::SeqCst);
        }
        _ => {}
    }
}

/// Waits until no conference is hosted, or `deadline`; true when empty.
pub async fn wait_empty(node: &Node, deadline: Instant) -> bool {
    loop {
        let changed = node.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if node.idle() {
            return true;
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = tokio::time::sleep_until(deadline) => return node.idle(),
        }
    }
}

/// Ends every conference now.
pub fn end_all(node: &Arc<Node>, reason: &'static str) {
    for name in node.actor_names() {
        node.send(&name, Msg::End { reason }, false);
    }
}

/// How long after its placement a conference's first caller may still be on its way to this
/// Asterisk (the edge following the 302, a SIP retransmission): a stopping node waits that
/// long for it rather than leave it with nobody to answer.
const ARRIVAL_GRACE: Duration = Duration::from_secs(5);

/// Waits, at most until `deadline`, while a conference placed on this node within
/// [`ARRIVAL_GRACE`] has not had its first caller. True when one came in (the node hosts a
/// conference again).
async fn wait_arrivals(node: &Node, deadline: Instant) -> bool {
    loop {
        let changed = node.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if !node.idle() {
            return true;
        }
        let claims = match node.store.empty_claims(&node.id).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for conferences placed here just before the stop");
                return false;
            }
        };
        let hosted = node.actor_names();
        let left = claims
            .iter()
            .filter(|(name, _)| !hosted.iter().any(|h| h.as_str() == name))
            .filter_map(|(_, age)| ARRIVAL_GRACE.checked_sub(Duration::from_millis(*age)))
            .filter(|left| !left.is_zero())
            .max();
        let Some(left) = left else {
            return false;
        };
        tracing::info!(
            ?left,
            "stopping: waiting for the first caller of a conference placed here just before"
        );
        let until = (Instant::now() + left).min(deadline);
        tokio::select! {
            _ = &mut changed => {}
            _ = tokio::time::sleep_until(until) => {
                if until >= deadline {
                    return !node.idle();
                }
            }
        }
    }
}

/// Longest a drain waits for the agent's first look at what Asterisk holds before it trusts
/// its own (empty) list of conferences: Asterisk may be gone for good, and the node must
/// still stop.
const FIRST_LOOK_WAIT: Duration = Duration::from_secs(30);

/// Whether the agent's first look at Asterisk may find conferences to adopt: Redis holds
/// claims for this node (true when Redis cannot say), or the events connection is up, so
/// that the look is under way (an agent away longer than `redis.conference_lease` has no
/// claims left, while Asterisk may still hold its callers). An agent whose Asterisk is gone
/// and that hosted nothing does not wait for a look that may never come.
async fn may_find_conferences(node: &Node) -> bool {
    node.ari_connected.load(std::sync::atomic::Ordering::SeqCst) || claims_left(node).await
}

/// Whether Redis holds conference claims for this node (true when Redis cannot say).
async fn claims_left(node: &Node) -> bool {
    let mut after: Option<String> = None;
    loop {
        match node.store.list_conferences(after.as_deref(), 1000).await {
            Ok(page) => {
                if page.items.iter().any(|(_, r)| r.owner.node == node.id) {
                    return true;
                }
                match page.next {
                    Some(next) => after = Some(next),
                    None => return false,
                }
            }
            Err(_) => return true,
        }
    }
}

/// Waits until a reconciliation has run since the events WebSocket connected, or `until`.
async fn wait_reconciled(node: &Node, until: Instant) {
    loop {
        let changed = node.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if node.reconciled() {
            return;
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = tokio::time::sleep_until(until) => return,
        }
    }
}

/// The drain itself; `elapsed` of its deadline went by in an earlier life of the agent.
async fn run(node: Arc<Node>, shutdown: bool, elapsed: Duration) {
    let deadline = Instant::now() + node.cfg.node.drain_deadline.saturating_sub(elapsed);
    // Right after a restart the agent hosts nothing until it has adopted the conferences
    // Asterisk still holds: empty then is not drained, and exiting would leave those calls
    // without an agent (and their claims to expire under them). Claims in Redis for this
    // node say a previous life hosted some; a connected Asterisk may hold some either way.
    if !node.reconciled() && may_find_conferences(&node).await {
        tracing::info!("draining: waiting for the first look at what Asterisk holds");
        // Not cut short by the deadline: a deadline already near (a resumed drain, a short
        // setting) would find the node idle before the adoption and leave the conferences
        // it adopts next running; at the deadline they are ended like any others.
        wait_reconciled(&node, Instant::now() + FIRST_LOOK_WAIT).await;
    }
    let mut empty = wait_empty(&node, deadline).await;
    // A conference placed here just before the stop has its first caller on the way; once
    // in, it is drained like the others. Redis says draining first (the task may have
    // started before the stop's own write): no placement can follow the look.
    if empty && shutdown {
        node.write_state().await;
    }
    while empty && shutdown && wait_arrivals(&node, deadline).await {
        empty = wait_empty(&node, deadline).await;
    }
    if !empty {
        let (left, participants) = node.load();
        tracing::warn!(
            conferences = left,
            participants,
            "drain deadline reached; ending the remaining conferences"
        );
        end_all(&node, "drain_deadline");
        if !wait_empty(&node, Instant::now() + TEARDOWN_GRACE).await {
            tracing::error!("conferences still tearing down after the grace period");
        }
    }
    if shutdown {
        if empty {
            // Nothing is admitted once shutting down; a first caller admitted after the
            // drain found the node empty, before that, is ended rather than left running.
            node.set_state_local(NodeState::ShuttingDown);
            if !node.idle() {
                tracing::warn!(
                    "a conference began after the drain found the node empty; ending it"
                );
                end_all(&node, "shutdown");
                wait_empty(&node, Instant::now() + TEARDOWN_GRACE).await;
            }
        }
        finish_shutdown(&node, false).await;
    } else {
        stay_drained(&node, deadline).await;
    }
}

/// An admin's drain, once the node is empty, lasts until undrained (this task is aborted
/// then). A conference that begins here meanwhile (its first caller was routed before the
/// drain, or a restarted Asterisk's callers are adopted) is held to the same deadline, and
/// past it ended at once (a first caller is refused by then): left alone, it would run on a
/// drained node for ever.
async fn stay_drained(node: &Arc<Node>, deadline: Instant) {
    loop {
        if node.idle() {
            tracing::info!("drained: no conference left; the node stays drained until undrained");
            wait_busy(node).await;
        }
        if wait_empty(node, deadline).await {
            continue;
        }
        let (left, participants) = node.load();
        tracing::warn!(
            conferences = left,
            participants,
            "a conference began on the drained node; ending it at the drain deadline"
        );
        let ended = node.actor_names();
        end_all(node, "drain_deadline");
        // Those ended; one beginning meanwhile (adopted) is the next round's.
        if !wait_gone(node, &ended, Instant::now() + TEARDOWN_GRACE).await {
            tracing::error!("conferences still tearing down after the grace period");
        }
    }
}

/// Waits until none of `names` has an actor, or `until`; true when none has.
async fn wait_gone(node: &Node, names: &[ConferenceName], until: Instant) -> bool {
    loop {
        let changed = node.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let hosted = node.actor_names();
        if !names.iter().any(|n| hosted.contains(n)) {
            return true;
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = tokio::time::sleep_until(until) => return false,
        }
    }
}

/// Waits until the node hosts a conference.
async fn wait_busy(node: &Node) {
    loop {
        let changed = node.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if !node.idle() {
            return;
        }
        changed.await;
    }
}

/// Longest a second stop signal waits for the last callbacks and bus messages: it asked for
/// an exit now, not after `webhook.shutdown_wait`.
const HURRIED_SEND: Duration = Duration::from_secs(5);

/// `shutting_down`, deregistration, and the signal to exit; `hurry` after a second stop
/// signal bounds the wait for the last callbacks by [`HURRIED_SEND`].
pub async fn finish_shutdown(node: &Arc<Node>, hurry: bool) {
    node.set_state_local(NodeState::ShuttingDown);
    node.write_state().await;
    // The last conferences' callbacks (their leave and end events) were queued as they
    // ended: they get a bounded time to go out while the node is still registered (a
    // heartbeat would register a deregistered node again).
    // Their bus events too (call control's subscribers would never see those conferences
    // end), within twice `webhook.timeout`.
    // Callbacks go one at a time per conference, so a big conference's leave events can
    // take a while ahead of its end event: they get `webhook.shutdown_wait`.
    let (mut wait, mut bound) = (node.cfg.webhook.shutdown_wait, node.cfg.webhook.timeout * 2);
    if hurry {
        wait = wait.min(HURRIED_SEND);
        bound = bound.min(HURRIED_SEND);
    }
    // Each conference's delivery keeps time for its end within the wait: one POST's
    // deadline, at most half of the wait.
    node.webhooks.stop_by.set(
        tokio::time::Instant::now() + wait,
        node.cfg.webhook.timeout.min(wait / 2),
    );
    // Within the callbacks' and messages' own wait, which the pod's grace period counts.
    let hangups = TEARDOWN_GRACE.min(wait.max(bound));
    let (left, unsent, mut not_hung_up) = tokio::join!(
        node.webhooks.in_flight.settle(wait),
        node.outbox.flush(bound),
        hang_up_before_exit(node, Instant::now() + hangups)
    );
    // Callers still being admitted (they reached the Stasis app as the node stopped, and
    // their variables were still being read) would reach no conference once the agent is
    // gone, and stay in the app in silence: refused as a stopping node's callers are.
    let pending = node.pending_joins();
    if !pending.is_empty() {
        tracing::warn!(
            channels = pending.len(),
            "callers still being admitted at exit; refusing them"
        );
        let asks = pending
            .iter()
            .map(|ch| node.hang_up(ch, crate::conference::CAUSE_UNAVAILABLE));
        let _ = tokio::time::timeout(
            node.cfg.ari.request_timeout,
            futures_util::future::join_all(asks),
        )
        .await;
        not_hung_up = node.unacknowledged_hangups().len();
    }
    if not_hung_up > 0 {
        tracing::error!(
            channels = not_hung_up,
            "Asterisk did not acknowledge the hangup of these callers by exit; they stay in Asterisk until they hang up"
        );
    }
    if unsent > 0 {
        tracing::warn!(
            unsent,
            "bus messages (events, command answers) still unsent at exit after {bound:?}; dropped"
        );
    }
    if left > 0 {
        tracing::warn!(
            left,
            "status callbacks still queued at exit after {wait:?} (webhook.shutdown_wait, or less after a second stop signal); dropped"
        );
        node.metrics
            .webhooks
            .with_label_values(&["dropped"])
            .inc_by(left as u64);
    }
    // A heartbeat under way finishes first; none runs after: one that found the record
    // gone would register the node again, left to live out its lease.
    let mut deregistered = node.beat_gate.lock().await;
    *deregistered = true;
    // A record this life never wrote is an earlier life's or another agent's: not this
    // one's to delete.
    if node.registered.load(Ordering::SeqCst) {
        match node.store.deregister(&node.id).await {
            Ok(_) => tracing::info!(node = %node.id, "deregistered"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot deregister; the node record expires with its lease")
            }
        }
    }
    drop(deregistered);
    node.exit.send_replace(true);
}

/// Pause between two rounds of [`hang_up_before_exit`] whose asks failed.
const HANGUP_ROUND_PAUSE: Duration = Duration::from_secs(1);

/// Asks Asterisk again, until `until`, to hang up the callers whose hangup it has not
/// acknowledged (the request was lost with its connection, refused past http.conf's
/// `sessionlimit`, or timed out): nothing would ask again once the agent has exited, and
/// they would stay in silence. One that was only slow is answered 404 now, which counts as
/// done. Returns how many are still unacknowledged.
async fn hang_up_before_exit(node: &Node, until: Instant) -> usize {
    loop {
        let left = node.unacknowledged_hangups();
        if left.is_empty() || Instant::now() >= until {
            return left.len();
        }
        tracing::warn!(
            channels = left.len(),
            "asking Asterisk again to hang up callers before exiting"
        );
        let asks = left
            .iter()
            .map(|(ch, cause)| node.hang_up_again(ch, *cause));
        let Ok(answers) =
            tokio::time::timeout_at(until, futures_util::future::join_all(asks)).await
        else {
            return node.unacknowledged_hangups().len();
        };
        // One line per round: under a storm there may be thousands.
        let mut failed = answers.into_iter().filter_map(Result::err);
        if let Some(first) = failed.next() {
            tracing::warn!(failed = 1 + failed.count(), error = %first, "cannot hang up callers again");
        }
        if !node.unacknowledged_hangups().is_empty() {
            tokio::time::sleep_until((Instant::now() + HANGUP_ROUND_PAUSE).min(until)).await;
        }
    }
}

/// A second stop signal: end everything now and exit.
pub async fn shutdown_now(node: &Arc<Node>) {
    {
        let mut slot = lock(&node.drain);
        if let Some((task, _)) = slot.take() {
            task.abort();
        }
        // Stopping from here on: with the drain's slot empty, nothing else would say so
        // while the conferences are torn down, and an undrain then would make a node about
        // to exit take new conferences.
        node.set_state_local(NodeState::ShuttingDown);
    }
    // Right after a restart the conferences Asterisk still holds are ended only once they
    // are adopted: exiting before the first look would leave their callers in Asterisk with
    // no agent, and their claims to lapse under them (a second home). A short wait here.
    if !node.reconciled() {
        let until = Instant::now() + HURRIED_SEND;
        let look = async {
            if may_find_conferences(node).await {
                tracing::warn!("second stop signal: waiting briefly for the first look at what Asterisk holds, to end it too");
                wait_reconciled(node, until).await;
            }
        };
        let _ = tokio::time::timeout_at(until, look).await;
    }
    tracing::warn!("second stop signal: ending every conference now");
    end_all(node, "shutdown");
    wait_empty(node, Instant::now() + TEARDOWN_GRACE).await;
    finish_shutdown(node, true).await;
}
