//! Choosing a node for a new conference: power-of-two random choices on capacity-normalised
//! load, with ramp correction.
//!
//! Each controller keeps its own, periodically refreshed view of the nodes. Between two
//! refreshes it adds the placements it made itself to each node's reported load (as Jitsi's
//! Jicofo does), so a burst of new conferences does not all land on the node that looked
//! emptiest at the last refresh. Two random candidates are compared rather than always taking
//! the minimum, so many controllers with similar views do not herd onto one node. The view
//! only orders candidates: the claim script checks capacity, state and ARI atomically in Redis.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::types::{NodeId, NodeRecord, NodeState};

/// No node can take a new conference.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no node with room for a new conference ({known} node(s) known, {serving} serving)")]
pub struct NoCapacity {
    /// Nodes in the current view.
    pub known: usize,
    /// Of those, nodes in state serving.
    pub serving: usize,
}

#[derive(Clone, Debug)]
struct Entry {
    id: NodeId,
    zone: String,
    capacity: u32,
    state: NodeState,
    /// The node's ARI is up: it can admit the callers of a new conference.
    ari: bool,
    reported: u32,
    placed: u32,
    blocked: bool,
    /// Participants the node last reported, and its limit on them (0: none).
    participants: u32,
    participant_capacity: u32,
}

impl Entry {
    /// Expected load: what was reported plus what all placers together have probably added
    /// since, estimated as our own placements times the number of placers.
    fn load(&self, placers: f64) -> f64 {
        f64::from(self.reported) + f64::from(self.placed) * placers
    }

    /// The fuller of the node's two limits: conferences, and participants when it has a
    /// limit on them (a node of a few large conferences is busier than its count says).
    fn utilisation(&self, placers: f64) -> f64 {
        let conferences = self.load(placers) / f64::from(self.capacity.max(1));
        if self.participant_capacity == 0 {
            return conferences;
        }
        conferences.max(f64::from(self.participants) / f64::from(self.participant_capacity))
    }

    fn eligible(&self) -> bool {
        self.state == NodeState::Serving
            && self.ari
            && !self.blocked
            && self.capacity > 0
            && self.reported.saturating_add(self.placed) < self.capacity
            && (self.participant_capacity == 0 || self.participants < self.participant_capacity)
    }
}

/// A placement view; one per controller (share it behind a mutex).
pub struct Placer {
    rng: StdRng,
    zone: Option<String>,
    nodes: Vec<Entry>,
    /// Estimated number of processes placing concurrently (at least 1).
    placers: f64,
    /// Each node's placement counter at the last refresh.
    last_placements: HashMap<NodeId, u64>,
    /// Placements this process made since the last refresh.
    own_since: u64,
}

impl Placer {
    /// A placer preferring `zone` (if any); `seed` makes choices repeatable in tests.
    pub fn new(zone: Option<String>, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Placer {
            rng,
            zone: zone.filter(|z| !z.is_empty()),
            nodes: Vec::new(),
            placers: 1.0,
            last_placements: HashMap::new(),
            own_since: 0,
        }
    }

    /// Replaces the view with fresh node records; resets the ramp correction.
    ///
    /// Other controllers place too, unseen until the next refresh. If each controller only
    /// counted its own placements, all of them would fill the same under-loaded node up to
    /// the mean and overshoot it together (a gain of N-1 at every refresh, which oscillates).
    /// So the placements everyone made between two refreshes (the nodes' placement counters)
    /// are compared with our own to estimate the number of placers, and our own placements
    /// are scaled by that estimate.
    pub fn refresh(&mut self, nodes: &[NodeRecord]) {
        let everyone: u64 = nodes
            .iter()
            .filter_map(|n| {
                self.last_placements
                    .get(&n.info.id)
                    .map(|before| n.placements.saturating_sub(*before))
            })
            .sum();
        if self.own_since > 0 {
            let estimate = (everyone as f64 / self.own_since as f64).clamp(1.0, 64.0);
            // Smoothed, so one unusual interval does not swing the estimate.
            self.placers = 0.5 * self.placers + 0.5 * estimate;
        }
        self.last_placements = nodes
            .iter()
            .map(|n| (n.info.id.clone(), n.placements))
            .collect();
        self.own_since = 0;
        self.nodes = nodes
            .iter()
            .filter(|n| n.lease_ms > 0)
            .map(|n| Entry {
                id: n.info.id.clone(),
                zone: n.info.zone.clone(),
                capacity: n.info.capacity,
                state: n.info.state,
                ari: n.load.ari,
                // `claimed` is the count the claim script enforces; the node's own count
                // can only be lower (callers still on their way are not in it yet).
                reported: n.claimed.max(n.load.conferences),
                placed: 0,
                blocked: false,
                participants: n.load.participants,
                participant_capacity: n.info.participant_capacity,
            })
            .collect();
    }

    /// Nodes in the current view.
    pub fn known(&self) -> usize {
        self.nodes.len()
    }

    /// Up to `max` candidates, best first: the power-of-two winner, the loser, then the rest
    /// by utilisation. Same-zone nodes come first when a zone is preferred.
    pub fn candidates(&mut self, max: usize) -> Result<Vec<NodeId>, NoCapacity> {
        let eligible: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].eligible())
            .collect();
        if eligible.is_empty() || max == 0 {
            return Err(NoCapacity {
                known: self.nodes.len(),
                serving: self
                    .nodes
                    .iter()
                    .filter(|n| n.state == NodeState::Serving)
                    .count(),
            });
        }
        let (near, far): (Vec<usize>, Vec<usize>) = match &self.zone {
            Some(z) => eligible.iter().partition(|&&i| &self.nodes[i].zone == z),
            None => (eligible.clone(), Vec::new()),
        };
        let pool = if near.is_empty() { &far } else { &near };
        let mut order = Vec::with_capacity(max.min(eligible.len()));
        let a = pool[self.rng.random_range(0..pool.len())];
        if pool.len() == 1 {
            order.push(a);
        } else {
            let mut b = pool[self.rng.random_range(0..pool.len() - 1)];
            if b == a {
                b = pool[pool.len() - 1];
            }
            let k = self.placers;
            let (ua, ub) = (self.nodes[a].utilisation(k), self.nodes[b].utilisation(k));
            if ub < ua {
                order.extend([b, a]);
            } else {
                order.extend([a, b]);
            }
        }
        for group in [&near, &far] {
            let mut rest: Vec<usize> = group
                .iter()
                .copied()
                .filter(|i| !order.contains(i))
                .collect();
            let k = self.placers;
            rest.sort_by(|&x, &y| {
                self.nodes[x]
                    .utilisation(k)
                    .total_cmp(&self.nodes[y].utilisation(k))
            });
            order.extend(rest);
        }
        order.truncate(max);
        Ok(order
            .into_iter()
            .map(|i| self.nodes[i].id.clone())
            .collect())
    }

    /// Counts a placement this process made on `node` (ramp correction).
    pub fn placed(&mut self, node: &NodeId) {
        if let Some(e) = self.nodes.iter_mut().find(|e| &e.id == node) {
            e.placed = e.placed.saturating_add(1);
        }
        self.own_since += 1;
    }

    /// Marks `node` as unable to take conferences until the next refresh (the claim script
    /// passed over it: full, draining or dead).
    pub fn unavailable(&mut self, node: &NodeId) {
        if let Some(e) = self.nodes.iter_mut().find(|e| &e.id == node) {
            e.blocked = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{NodeInfo, NodeLoad};

    fn node(id: &str, zone: &str, capacity: u32, claimed: u32, state: NodeState) -> NodeRecord {
        NodeRecord {
            info: NodeInfo {
                id: NodeId::parse(id).expect("id"),
                sip_uri: format!("sip:{id}.example:5060"),
                control: String::new(),
                zone: zone.into(),
                capacity,
                participant_capacity: 0,
                state,
            },
            load: NodeLoad::default(),
            claimed,
            placements: u64::from(claimed),
            lease_ms: 3000,
            updated_ms: 0,
            stopping: false,
            drain_since_ms: None,
            lease_period_ms: None,
        }
    }

    #[test]
    fn only_serving_nodes_with_room_are_candidates() {
        let mut p = Placer::new(None, Some(1));
        p.refresh(&[
            node("full", "", 10, 10, NodeState::Serving),
            node("drain", "", 10, 0, NodeState::Draining),
            node("bye", "", 10, 0, NodeState::ShuttingDown),
            node("ok", "", 10, 3, NodeState::Serving),
        ]);
        for _ in 0..50 {
            let c = p.candidates(4).expect("one candidate");
            assert_eq!(c.len(), 1);
            assert_eq!(c[0].as_str(), "ok");
        }
    }

    #[test]
    fn a_node_whose_ari_is_down_is_no_candidate() {
        let mut p = Placer::new(None, Some(1));
        let mut deaf = node("deaf", "", 10, 0, NodeState::Serving);
        deaf.load.ari = false;
        p.refresh(&[deaf, node("ok", "", 10, 5, NodeState::Serving)]);
        for _ in 0..50 {
            assert_eq!(p.candidates(4).expect("one candidate"), vec![id("ok")]);
        }
    }

    fn id(s: &str) -> NodeId {
        NodeId::parse(s).expect("id")
    }

    fn with_participants(mut n: NodeRecord, participants: u32, most: u32) -> NodeRecord {
        n.load.participants = participants;
        n.info.participant_capacity = most;
        n
    }

    #[test]
    fn a_node_at_its_participant_limit_is_no_candidate() {
        let mut p = Placer::new(None, Some(1));
        p.refresh(&[
            with_participants(node("full", "", 10, 1, NodeState::Serving), 50, 50),
            with_participants(node("over", "", 10, 1, NodeState::Serving), 60, 50),
            with_participants(node("ok", "", 10, 5, NodeState::Serving), 49, 50),
            with_participants(node("unbounded", "", 10, 5, NodeState::Serving), 900, 0),
        ]);
        for _ in 0..50 {
            let mut c = p.candidates(4).expect("two candidates");
            c.sort();
            assert_eq!(c, vec![id("ok"), id("unbounded")]);
        }
    }

    #[test]
    fn the_fuller_limit_orders_candidates() {
        let mut p = Placer::new(None, Some(1));
        // "crowded" hosts fewer conferences but is at 90 % of its participants; "roomy" is at
        // 50 % of its conferences and has no participant limit.
        p.refresh(&[
            with_participants(node("crowded", "", 10, 2, NodeState::Serving), 90, 100),
            node("roomy", "", 10, 5, NodeState::Serving),
        ]);
        for _ in 0..20 {
            assert_eq!(
                p.candidates(2).expect("room"),
                vec![id("roomy"), id("crowded")]
            );
        }
    }

    #[test]
    fn no_capacity_is_a_typed_error() {
        let mut p = Placer::new(None, Some(1));
        assert_eq!(
            p.candidates(2),
            Err(NoCapacity {
                known: 0,
                serving: 0
            })
        );
        p.refresh(&[
            node("a", "", 1, 1, NodeState::Serving),
            node("b", "", 5, 0, NodeState::Draining),
        ]);
        assert_eq!(
            p.candidates(2),
            Err(NoCapacity {
                known: 2,
                serving: 1
            })
        );
    }

    #[test]
    fn ramp_correction_spreads_a_burst() {
        let mut p = Placer::new(None, Some(7));
        p.refresh(&[
            node("a", "", 100, 0, NodeState::Serving),
            node("b", "", 100, 0, NodeState::Serving),
            node("c", "", 100, 0, NodeState::Serving),
        ]);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..150 {
            let first = p.candidates(1).expect("room")[0].clone();
            p.placed(&first);
            *counts.entry(first.to_string()).or_insert(0) += 1;
        }
        for (id, n) in &counts {
            assert!((40..=60).contains(n), "{id} got {n} of 150");
        }
    }

    #[test]
    fn ramp_correction_stops_at_capacity() {
        let mut p = Placer::new(None, Some(3));
        p.refresh(&[node("a", "", 2, 0, NodeState::Serving)]);
        for _ in 0..2 {
            let c = p.candidates(1).expect("room");
            p.placed(&c[0]);
        }
        assert!(p.candidates(1).is_err());
    }

    #[test]
    fn zone_preference_with_fallback() {
        let mut p = Placer::new(Some("eu".into()), Some(5));
        p.refresh(&[
            node("eu1", "eu", 10, 5, NodeState::Serving),
            node("us1", "us", 10, 0, NodeState::Serving),
        ]);
        let c = p.candidates(4).expect("room");
        assert_eq!(c[0].as_str(), "eu1", "same zone first even when busier");
        assert_eq!(c[1].as_str(), "us1", "other zones as fallback");
        p.unavailable(&NodeId::parse("eu1").expect("id"));
        assert_eq!(p.candidates(4).expect("room")[0].as_str(), "us1");
    }

    #[test]
    fn seeded_placers_repeat_their_choices() {
        let nodes: Vec<NodeRecord> = (0..10)
            .map(|i| node(&format!("n{i}"), "", 100, i * 3, NodeState::Serving))
            .collect();
        let run = |seed| {
            let mut p = Placer::new(None, Some(seed));
            p.refresh(&nodes);
            (0..20)
                .map(|_| {
                    let c = p.candidates(1).expect("room")[0].clone();
                    p.placed(&c);
                    c
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
    }
}

#[cfg(test)]
mod stale_views {
    use super::*;
    use crate::types::{NodeInfo, NodeLoad};

    fn records(caps: &[u32], truth: &[u32]) -> Vec<NodeRecord> {
        caps.iter()
            .zip(truth)
            .enumerate()
            .map(|(i, (&capacity, &count))| NodeRecord {
                info: NodeInfo {
                    id: NodeId::parse(&format!("n{i}")).expect("id"),
                    sip_uri: String::new(),
                    control: String::new(),
                    zone: String::new(),
                    capacity,
                    participant_capacity: 0,
                    state: NodeState::Serving,
                },
                load: NodeLoad::default(),
                claimed: count,
                placements: u64::from(count),
                lease_ms: 1000,
                updated_ms: 0,
                stopping: false,
                drain_since_ms: None,
                lease_period_ms: None,
            })
            .collect()
    }

    /// Four placers that only see each other at refreshes: without the placer-count
    /// estimate they overshoot the same nodes together (max/mean above 1.15 here).
    #[test]
    fn interleaved_placers_stay_balanced() {
        let caps: Vec<u32> = (0..20).map(|i| 400 + 60 * i).collect();
        for seed in 0..5u64 {
            let mut truth = vec![0u32; caps.len()];
            let mut placers: Vec<Placer> = (0..4)
                .map(|p| Placer::new(None, Some(seed * 10 + p)))
                .collect();
            for k in 0..2500 {
                for p in placers.iter_mut() {
                    if k % 500 == 0 {
                        p.refresh(&records(&caps, &truth));
                    }
                    let c = p.candidates(1).expect("room");
                    let i: usize = c[0].as_str()[1..].parse().expect("index");
                    truth[i] += 1;
                    p.placed(&c[0]);
                }
            }
            let u: Vec<f64> = (0..caps.len())
                .map(|i| f64::from(truth[i]) / f64::from(caps[i]))
                .collect();
            let mean = u.iter().sum::<f64>() / u.len() as f64;
            let max = u.iter().cloned().fold(0.0, f64::max);
            assert!(
                max / mean <= 1.05,
                "seed {seed}: max/mean {:.3}",
                max / mean
            );
            assert!(
                (placers[0].placers - 4.0).abs() < 0.5,
                "estimated {} placers",
                placers[0].placers
            );
        }
    }
}
