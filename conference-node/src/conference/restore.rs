//! Reconciliation's last word on where each participant is: the mixing bridge or the
//! holding bridge, as the agent placed it.
//!
//! Asterisk carries out a request it has read even when the agent gave up waiting for the
//! answer (the ARI request timeout). A hold, an unhold or a start's move that timed out was
//! reported failed, yet may put the caller in the other bridge later: a caller on hold
//! music while the application and the agent list it as not held, or the reverse. The
//! agent's view is what the application was told, so the caller is moved back to match it.
//! A waiter a started conference did not move in (the move failed, or timed out and was
//! carried out later) is moved in now, as the start meant to, with a second `start` event
//! naming it. A participant another ARI user took out of its bridge, left in the Stasis
//! app in no bridge, is put back the same way.

use std::collections::HashSet;
use std::time::Instant;

use serde_json::json;

use super::Conference;

/// Where the agent placed a participant, from its view.
fn belongs_in_holding(held: bool, waiting: bool, started: bool) -> bool {
    held || (waiting && !started)
}

impl Conference {
    /// Moves participants that the listing taken at `taken` shows in the other of the
    /// conference's two bridges back to the one the agent placed them in.
    pub(super) async fn restore_placements(
        &mut self,
        in_main: &[String],
        in_holding: &[String],
        unbridged: &HashSet<String>,
        taken: Instant,
    ) {
        let started = self.started;
        let mut to_holding = Vec::new();
        let mut to_main = Vec::new();
        let mut unwaited = Vec::new();
        for (id, p) in &self.participants {
            // The listing may predate its join or its last move (sent, or answered since).
            if p.since >= taken || p.placed_at >= taken || p.moving || p.redirected {
                continue;
            }
            let (mixed, holding) = (in_main.contains(id), in_holding.contains(id));
            // Taken out of its bridge by another ARI user, still in the Stasis app (one on
            // its way out, hanging up, is in no bridge for a moment too).
            let nowhere = !mixed
                && !holding
                && unbridged.contains(id)
                && !self.node.ended_since_listing(id)
                && !self.node.hangup_under_way(id);
            if belongs_in_holding(p.held, p.waiting, started) {
                if mixed || nowhere {
                    to_holding.push(id.clone());
                }
            } else if holding || nowhere {
                to_main.push(id.clone());
            } else if mixed && p.waiting {
                // A waiter of a started conference found in the mix got there by a start's
                // move Asterisk carried out late. It is where it belongs, its mute on its
                // channel: it only stops waiting. (Adding it again would make it leave
                // first, ending the recording were it alone in the mix.)
                unwaited.push(id.clone());
            }
        }
        for id in &unwaited {
            if let Some(p) = self.participants.get_mut(id) {
                p.waiting = false;
            }
        }
        if !unwaited.is_empty() {
            // The start's recording may have failed with its moves (timed out) as well.
            self.record_on().await;
        }
        if to_holding.is_empty() && to_main.is_empty() && unwaited.is_empty() {
            return;
        }
        for id in &to_holding {
            self.restore_one(id, true).await;
        }
        for id in &to_main {
            if self.restore_one(id, false).await {
                if let Some(p) = self.participants.get_mut(id).filter(|p| p.waiting) {
                    p.waiting = false;
                    unwaited.push(id.clone());
                }
            }
        }
        if !unwaited.is_empty() {
            unwaited.sort();
            // Subscribers saw these callers join waiting; the start they missed tells them.
            let by = self.started_by_in_mix();
            self.emit(
                "start",
                json!({"started_by": by, "no_longer_waiting": unwaited}),
            );
        }
        self.tidy_holding().await;
        self.publish();
    }

    /// Moves `id` into the holding bridge (`holding`) or the mix; true once it is there.
    async fn restore_one(&mut self, id: &str, holding: bool) -> bool {
        let Some(p) = self.participants.get(id) else {
            return false;
        };
        let mut opts = p.options.clone();
        opts.muted = p.muted;
        tracing::warn!(conference = %self.name, channel = id, holding, "participant found outside the bridge the agent placed it in (a move Asterisk carried out after the agent gave up on it, one that failed, or another ARI user's); moving it");
        let moved = if holding {
            self.move_to_holding(id, &opts).await
        } else {
            self.add(id, false, &opts).await
        };
        match moved {
            Ok(()) => {
                self.node
                    .metrics
                    .reconcile_actions
                    .with_label_values(&["restored_participant_bridge"])
                    .inc();
                true
            }
            Err(e) => {
                tracing::warn!(conference = %self.name, channel = id, error = %e, "cannot move the participant back; the next reconciliation tries again");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::belongs_in_holding;

    #[test]
    fn held_callers_and_waiters_before_the_start_belong_in_the_holding_bridge() {
        assert!(belongs_in_holding(true, false, true));
        assert!(belongs_in_holding(true, true, false));
        assert!(belongs_in_holding(false, true, false));
        // A waiter of a started conference was meant to move in with the start.
        assert!(!belongs_in_holding(false, true, true));
        assert!(!belongs_in_holding(false, false, true));
        assert!(!belongs_in_holding(false, false, false));
    }
}
