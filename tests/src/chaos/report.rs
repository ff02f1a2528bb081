//! A scenario's figures, and how they are worked out from what the callers, the observers and
//! the claim watcher saw.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use super::load::{ClaimHistory, JoinOutcome, RouteOutcome, Tracker};

/// A time to recover, with its goal.
#[derive(Clone, Debug)]
pub struct Recovery {
    /// What was timed, from when to when.
    pub what: String,
    /// How long it took (`None`: it did not happen within the run).
    pub took: Option<Duration>,
    /// The goal, if the scenario has one.
    pub goal: Option<Duration>,
}

/// Calls placed during the run.
#[derive(Clone, Debug, Default)]
pub struct Calls {
    /// Routing requests sent.
    pub placed: u64,
    /// Answered with a node.
    pub routed: u64,
    /// Answered 503.
    pub unavailable: u64,
    /// Other routing answers (another status, no answer in time), by reason.
    pub route_failures: BTreeMap<String, u64>,
    /// Of those, answered while the fault lasted (and until routing came back).
    pub fault_route_failures: u64,
    /// Callers that reached a bridge.
    pub joined: u64,
    /// Callers that did not, by reason.
    pub join_failures: BTreeMap<String, u64>,
}

/// The figures of one run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// The fault injected, in words, with its durations.
    pub fault: String,
    /// Wall time of the run (start-up included).
    pub elapsed: Duration,
    /// Times to re-home or recover.
    pub recovery: Vec<Recovery>,
    /// Calls placed.
    pub calls: Calls,
    /// 503 answers while the fault lasted (and until routing came back).
    pub fault_503: u64,
    /// Of those, answers without `Retry-After`.
    pub fault_503_without_retry_after: u64,
    /// 503 answers without `Retry-After` over the whole run, fault window or not.
    pub unavailable_without_retry_after: u64,
    /// Conferences admitted on two nodes under claims that cannot both be current.
    pub double_homes: u64,
    /// Times Redis named two owners for one conference life and epoch.
    pub two_owner_claims: u64,
    /// Homes left behind with members when their conference was re-homed.
    pub split_by_rehome: u64,
    /// Participants left in those homes.
    pub stranded: u64,
    /// Participants taken out of a conference they did not leave, on nodes that were not
    /// being stopped or torn down.
    pub dropped: u64,
    /// Participants ended on a node being stopped (drain deadline) or torn down (ownership
    /// lost) as configured.
    pub dropped_expected: u64,
    /// Callers no longer in a bridge when they hung up.
    pub lost: u64,
    /// Bridges left in an Asterisk after every caller hung up.
    pub orphan_bridges: u64,
    /// Claims left in Redis after every conference ended.
    pub orphan_claims: u64,
    /// Controller and agent processes that exited or were replaced (other than on purpose).
    pub restarted: u64,
    /// Scenario-specific figures, as printed.
    pub figures: Vec<(String, String)>,
    /// Scenario-specific counts the tests assert on, by key.
    pub values: BTreeMap<&'static str, f64>,
    /// Details: double homes, splits, drops, orphans.
    pub notes: Vec<String>,
}

/// Seconds with two decimals, or `-`.
pub fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2} s", d.as_secs_f64()))
        .unwrap_or_else(|| "-".into())
}

impl Report {
    /// The figures every scenario shares, from the tracker and the claim watcher;
    /// `fault` is the window in which 503s are counted as the fault's.
    pub fn from_run(
        scenario: &str,
        fault_text: String,
        tracker: &Tracker,
        claims: &ClaimHistory,
        fault: (Instant, Instant),
    ) -> Report {
        let mut r = Report {
            scenario: scenario.to_string(),
            fault: fault_text,
            ..Report::default()
        };
        for ev in tracker.routes() {
            r.calls.placed += 1;
            match &ev.outcome {
                RouteOutcome::Node(_) => r.calls.routed += 1,
                RouteOutcome::Unavailable { retry_after } => {
                    r.calls.unavailable += 1;
                    if !retry_after {
                        r.unavailable_without_retry_after += 1;
                    }
                    if ev.at >= fault.0 && ev.at <= fault.1 {
                        r.fault_503 += 1;
                        if !retry_after {
                            r.fault_503_without_retry_after += 1;
                        }
                    }
                }
                RouteOutcome::Other(why) => {
                    *r.calls.route_failures.entry(why.clone()).or_default() += 1;
                    if ev.at >= fault.0 && ev.at <= fault.1 {
                        r.calls.fault_route_failures += 1;
                    }
                }
            }
        }
        for j in tracker.joins() {
            match j.outcome {
                JoinOutcome::Joined(_) => r.calls.joined += 1,
                JoinOutcome::Failed(why) => *r.calls.join_failures.entry(why).or_default() += 1,
            }
        }
        let (doubles, double_notes) = tracker.double_homes();
        r.double_homes = doubles;
        r.notes.extend(double_notes);
        r.two_owner_claims = claims.two_owners.len() as u64;
        r.notes.extend(claims.two_owners.iter().cloned());
        let (splits, stranded, split_notes) = tracker.splits();
        r.split_by_rehome = splits;
        r.stranded = stranded;
        r.notes.extend(split_notes);
        for d in tracker.dropped() {
            if d.expected {
                r.dropped_expected += 1;
            } else {
                r.dropped += 1;
                r.notes.push(format!(
                    "{:.1}s: participant of {} dropped on node-{} (cause {})",
                    tracker.secs(d.at),
                    d.conference,
                    d.node + 1,
                    d.cause
                ));
            }
        }
        let lost = tracker.lost();
        r.lost = lost.len() as u64;
        r.notes.extend(
            lost.iter()
                .map(|c| format!("caller {c} was out of its bridge")),
        );
        r
    }

    /// Routing answers that were neither a node nor a 503 (another status, no answer in
    /// time), over the whole run.
    pub fn other_route_answers(&self) -> u64 {
        self.calls.route_failures.values().sum()
    }

    /// Adds a scenario-specific figure.
    pub fn figure(&mut self, name: &str, value: impl Into<String>) {
        self.figures.push((name.to_string(), value.into()));
    }

    /// Sets a count the tests assert on.
    pub fn set(&mut self, key: &'static str, value: f64) {
        self.values.insert(key, value);
    }

    /// A count set with [`Report::set`] (`NaN` when the scenario did not set it).
    pub fn value(&self, key: &str) -> f64 {
        self.values.get(key).copied().unwrap_or(f64::NAN)
    }

    /// Records the bridges and claims left after every caller hung up.
    pub fn leftovers(&mut self, bridges: &[(usize, String, usize)], claims: &[String]) {
        self.orphan_bridges = bridges.len() as u64;
        for (node, id, members) in bridges {
            self.notes.push(format!(
                "orphan bridge {id} on node-{} ({members} member(s))",
                node + 1
            ));
        }
        self.orphan_claims = claims.len() as u64;
        for c in claims {
            self.notes.push(format!("claim left in Redis: {c}"));
        }
    }

    /// Records the processes that exited or were replaced.
    pub fn restarts(&mut self, names: &[String]) {
        self.restarted = names.len() as u64;
        for n in names {
            self.notes
                .push(format!("process {n} exited or was replaced"));
        }
    }
}

/// The goals every scenario shares; `splits_allowed` when a node is lost on purpose (its
/// callers cannot be moved without its agent).
pub fn shared_goals(r: &Report, splits_allowed: bool) -> Vec<String> {
    let mut missed = Vec::new();
    let mut zero = |what: &str, n: u64| {
        if n != 0 {
            missed.push(format!("{what}: {n} (goal 0)"));
        }
    };
    zero("double homes", r.double_homes);
    zero("Redis naming two owners", r.two_owner_claims);
    if !splits_allowed {
        zero("conferences split by a re-home", r.split_by_rehome);
    }
    zero("participants dropped", r.dropped);
    zero("participants lost from their bridge", r.lost);
    zero("orphan bridges", r.orphan_bridges);
    zero("orphan claims", r.orphan_claims);
    zero("processes restarted", r.restarted);
    // A caller told nothing it can act on (a timeout, a 500) is worse than a 503: it may
    // retry at once or give up; during a fault and outside one, a controller answers a
    // node, or 503 with `Retry-After`.
    zero(
        "routing answers neither a node nor 503 (other status, no answer)",
        r.other_route_answers(),
    );
    zero(
        "503s without Retry-After (whole run)",
        r.unavailable_without_retry_after,
    );
    missed
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "== {} ==", self.scenario)?;
        writeln!(f, "fault: {}", self.fault)?;
        writeln!(f, "run time: {:.1} s", self.elapsed.as_secs_f64())?;
        for rec in &self.recovery {
            let goal = rec
                .goal
                .map(|g| format!(" (goal <= {})", secs(Some(g))))
                .unwrap_or_default();
            writeln!(f, "{}: {}{goal}", rec.what, secs(rec.took))?;
        }
        let c = &self.calls;
        writeln!(
            f,
            "calls: {} routed of {} placed, {} answered 503, {} joined",
            c.routed, c.placed, c.unavailable, c.joined
        )?;
        for (why, n) in &c.route_failures {
            writeln!(f, "  route failed ({why}): {n}")?;
        }
        writeln!(
            f,
            "routing answers neither a node nor 503: {} ({} during the fault)",
            self.other_route_answers(),
            c.fault_route_failures
        )?;
        for (why, n) in &c.join_failures {
            writeln!(f, "  join failed ({why}): {n}")?;
        }
        writeln!(
            f,
            "503s during the fault: {} ({} without Retry-After; {} without it in the whole run)",
            self.fault_503,
            self.fault_503_without_retry_after,
            self.unavailable_without_retry_after
        )?;
        writeln!(
            f,
            "double homes: {} (Redis naming two owners: {})",
            self.double_homes, self.two_owner_claims
        )?;
        writeln!(
            f,
            "split by re-home: {} home(s), {} participant(s) left behind",
            self.split_by_rehome, self.stranded
        )?;
        writeln!(
            f,
            "participants dropped: {} (ended as configured on a stopped or torn-down node: {})",
            self.dropped, self.dropped_expected
        )?;
        writeln!(f, "participants lost from their bridge: {}", self.lost)?;
        writeln!(
            f,
            "orphan bridges: {}, orphan claims: {}",
            self.orphan_bridges, self.orphan_claims
        )?;
        writeln!(f, "processes restarted: {}", self.restarted)?;
        for (k, v) in &self.figures {
            writeln!(f, "{k}: {v}")?;
        }
        if !self.notes.is_empty() {
            writeln!(f, "notes:")?;
            for n in self.notes.iter().take(40) {
                writeln!(f, "  {n}")?;
            }
            if self.notes.len() > 40 {
                writeln!(f, "  ... {} more", self.notes.len() - 40)?;
            }
        }
        Ok(())
    }
}
