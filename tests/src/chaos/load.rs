//! Continuous callers and what they saw: every routing answer (302, 503 and whether it
//! carried `Retry-After`), every join, and, from an observer on each simulated Asterisk, which
//! conference has members in which bridge on which node.
//!
//! From the bridges the tracker judges homes. A conference's bridges are `cr-EPOCH-NAME`, so
//! each member entry says which owner epoch admitted it. When a caller enters a bridge of a
//! conference while another node has members in a bridge of the same conference:
//! - at a lower epoch there, the conference was re-homed and those members were left behind
//!   (their node died or was cut off): a *split by re-home*, counted with its stranded
//!   participants, expected only when a node is lost;
//! - at the same or a higher epoch there, two nodes admitted callers of one conference under
//!   claims that cannot both be current: a *double home*, which must never happen.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use confroute_node::conference::parse_bridge_id;
use confroute_shared::store::Store;

use crate::ari_sim::{AriSim, DialIn};
use crate::dev::traffic::{self, BridgeEvents};

/// How long a caller about to hang up waits, when it finds itself out of every bridge, for
/// its end or its way back in before it counts as lost from its bridge.
const LOST_GRACE: Duration = Duration::from_secs(2);
/// How long a dialled caller may take to reach a bridge before it gives up.
const JOIN_WAIT: Duration = Duration::from_secs(5);
/// How long a SIP caller waits for the controller's answer.
const SIP_WAIT: Duration = Duration::from_secs(3);

/// How a caller reached the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// SIP INVITE over UDP.
    Sip,
    /// `POST /v1/route`.
    Http,
}

/// What a controller answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteOutcome {
    /// 302 (or HTTP 200) to this node.
    Node(String),
    /// 503, and whether it carried `Retry-After`.
    Unavailable {
        /// `Retry-After` was present.
        retry_after: bool,
    },
    /// Anything else (other status, no answer).
    Other(String),
}

/// One routing answer.
#[derive(Clone, Debug)]
pub struct RouteEvent {
    /// When the request was sent.
    pub at: Instant,
    /// When the answer came.
    pub answered: Instant,
    /// Conference asked for.
    pub conference: String,
    /// SIP or HTTP.
    pub entry: Entry,
    /// The answer.
    pub outcome: RouteOutcome,
}

/// How a dialled caller fared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinOutcome {
    /// In a bridge after this long.
    Joined(Duration),
    /// Not admitted, and why.
    Failed(String),
}

/// One caller dialled into a node's Asterisk.
#[derive(Clone, Debug)]
pub struct JoinEvent {
    /// When it was dialled.
    pub at: Instant,
    /// Conference.
    pub conference: String,
    /// Node index.
    pub node: usize,
    /// Result.
    pub outcome: JoinOutcome,
}

/// A participant that left its conference without hanging up.
#[derive(Clone, Debug)]
pub struct Dropped {
    /// When.
    pub at: Instant,
    /// Node index.
    pub node: usize,
    /// Conference.
    pub conference: String,
    /// The caller's channel.
    pub channel: String,
    /// Hangup cause (-1 when the observer missed the event).
    pub cause: i64,
    /// On a node whose conferences were expected to end (stopping, or torn down).
    pub expected: bool,
}

#[derive(Debug)]
struct Chan {
    conference: String,
    node: usize,
    dialled: Instant,
    /// When its dial-in had created it in the Asterisk (set once the request returned): a
    /// resync only takes a channel missing from a snapshot taken after that for gone.
    created: Option<Instant>,
    bridge: Option<String>,
    entered: Option<Instant>,
    hanging_up: bool,
    destroyed: Option<i64>,
}

#[derive(Debug)]
struct Home {
    epoch: u64,
    members: HashSet<String>,
    stranded: bool,
}

#[derive(Default)]
struct State {
    chans: HashMap<String, Chan>,
    /// conference → (node, bridge id) → members.
    homes: HashMap<String, HashMap<(usize, String), Home>>,
    expected_drops: HashSet<usize>,
    double_homes: HashSet<String>,
    double_home_notes: Vec<String>,
    splits: HashSet<(String, usize, String)>,
    stranded: u64,
    split_notes: Vec<String>,
    dropped: Vec<Dropped>,
    lost: Vec<String>,
    routes: Vec<RouteEvent>,
    joins: Vec<JoinEvent>,
    entries: Vec<(Instant, usize, String)>,
}

/// Everything the callers and observers saw; cheap to clone.
#[derive(Clone)]
pub struct Tracker {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    started: Instant,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            state: Arc::default(),
            changed: Arc::default(),
            started: Instant::now(),
        }
    }
}

/// The id the cluster gives the node at index `i` (`node-1` is index 0), for notes.
fn node_name(i: usize) -> String {
    format!("node-{}", i + 1)
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tracker {
    /// Seconds from the tracker's start to `at`, for notes.
    pub fn secs(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.started).as_secs_f64()
    }

    /// Drops of participants on `node` are expected from now on (it is being stopped, or its
    /// lost conferences are torn down as configured).
    pub fn expect_drops(&self, node: usize, expected: bool) {
        let mut st = lock(&self.state);
        if expected {
            st.expected_drops.insert(node);
        } else {
            st.expected_drops.remove(&node);
        }
    }

    /// Every routing answer so far.
    pub fn routes(&self) -> Vec<RouteEvent> {
        lock(&self.state).routes.clone()
    }

    /// Every join so far.
    pub fn joins(&self) -> Vec<JoinEvent> {
        lock(&self.state).joins.clone()
    }

    /// Every participant dropped so far.
    pub fn dropped(&self) -> Vec<Dropped> {
        lock(&self.state).dropped.clone()
    }

    /// Entries into conference bridges: (when, node, conference).
    pub fn entries(&self) -> Vec<(Instant, usize, String)> {
        lock(&self.state).entries.clone()
    }

    /// Conferences admitted on two nodes at once, with a line about each.
    pub fn double_homes(&self) -> (u64, Vec<String>) {
        let st = lock(&self.state);
        (st.double_homes.len() as u64, st.double_home_notes.clone())
    }

    /// Homes left behind by a re-home (conference, node), the participants left in them,
    /// and a line about each.
    pub fn splits(&self) -> (u64, u64, Vec<String>) {
        let st = lock(&self.state);
        (st.splits.len() as u64, st.stranded, st.split_notes.clone())
    }

    /// Callers that were no longer in a bridge when they hung up.
    pub fn lost(&self) -> Vec<String> {
        lock(&self.state).lost.clone()
    }

    /// Conferences with members now, per node index.
    pub fn conferences_on(&self, node: usize) -> Vec<String> {
        let st = lock(&self.state);
        let mut out: Vec<String> = st
            .homes
            .iter()
            .filter(|(_, homes)| {
                homes
                    .iter()
                    .any(|((n, _), h)| *n == node && !h.members.is_empty())
            })
            .map(|(c, _)| c.clone())
            .collect();
        out.sort();
        out
    }

    /// Callers in a bridge on node index `node` now: (channel, conference, when it first
    /// entered a bridge).
    pub fn callers_on(&self, node: usize) -> Vec<(String, String, Instant)> {
        let st = lock(&self.state);
        let mut out: Vec<(String, String, Instant)> = st
            .chans
            .iter()
            .filter(|(_, c)| c.node == node && c.bridge.is_some() && c.destroyed.is_none())
            .filter_map(|(id, c)| Some((id.clone(), c.conference.clone(), c.entered?)))
            .collect();
        out.sort();
        out
    }

    /// Participants in bridges now, per node index.
    pub fn members_on(&self, node: usize) -> usize {
        let st = lock(&self.state);
        st.homes
            .values()
            .flat_map(|h| h.iter())
            .filter(|((n, _), _)| *n == node)
            .map(|(_, h)| h.members.len())
            .sum()
    }

    fn record_route(&self, ev: RouteEvent) {
        lock(&self.state).routes.push(ev);
    }

    fn dialled(&self, channel: &str, conference: &str, node: usize) {
        lock(&self.state).chans.insert(
            channel.to_string(),
            Chan {
                conference: conference.to_string(),
                node,
                dialled: Instant::now(),
                created: None,
                bridge: None,
                entered: None,
                hanging_up: false,
                destroyed: None,
            },
        );
    }

    /// Notes that `channel`'s dial-in returned: the Asterisk holds it from now on.
    fn created(&self, channel: &str) {
        if let Some(c) = lock(&self.state).chans.get_mut(channel) {
            c.created = Some(Instant::now());
        }
    }

    fn record_join(&self, channel: &str, outcome: JoinOutcome) {
        let mut st = lock(&self.state);
        let Some(c) = st.chans.get(channel) else {
            return;
        };
        let ev = JoinEvent {
            at: c.dialled,
            conference: c.conference.clone(),
            node: c.node,
            outcome,
        };
        st.joins.push(ev);
    }

    /// Waits until `decide` says something of `channel`'s state (`None` while the channel is
    /// unknown), or `within` has passed (`None`).
    async fn watch_chan<T>(
        &self,
        channel: &str,
        within: Duration,
        decide: impl Fn(Option<&Chan>) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = decide(lock(&self.state).chans.get(channel)) {
                return Some(v);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Waits until the caller is in a bridge (`Ok(latency)`) or gone (`Err(why)`).
    async fn wait_joined(&self, channel: &str, within: Duration) -> Result<Duration, String> {
        self.watch_chan(channel, within, |c| match c {
            None => Some(Err("unknown channel".to_string())),
            Some(c) => match (c.entered, c.destroyed) {
                (Some(at), _) => Some(Ok(at.saturating_duration_since(c.dialled))),
                (None, Some(cause)) => Some(Err(format!("hung up by the node (cause {cause})"))),
                (None, None) => None,
            },
        })
        .await
        .unwrap_or_else(|| Err(format!("not in a bridge within {} s", within.as_secs())))
    }

    /// Waits (up to `within`) while `channel` is out of every bridge but not gone: a caller
    /// the node is hanging up leaves its bridge first (the bridge can be destroyed before
    /// the hangup is carried out), and its end may still be on its way; a caller stranded
    /// outside a bridge stays so.
    async fn settle(&self, channel: &str, within: Duration) {
        let stranded = |c: &Chan| c.destroyed.is_none() && c.bridge.is_none();
        self.watch_chan(channel, within, |c| {
            (!c.is_some_and(stranded)).then_some(())
        })
        .await;
    }

    /// The caller is about to hang up; when it had `joined`, it must still be in a bridge.
    fn hanging_up(&self, channel: &str, joined: bool) {
        let mut st = lock(&self.state);
        let lost = match st.chans.get_mut(channel) {
            Some(c) => {
                c.hanging_up = true;
                joined && c.destroyed.is_none() && c.bridge.is_none()
            }
            None => false,
        };
        if lost {
            st.lost.push(channel.to_string());
        }
    }

    fn forget(&self, channel: &str) {
        lock(&self.state).chans.remove(channel);
    }

    fn enter(&self, st: &mut State, node: usize, channel: &str, bridge: &str) {
        let now = Instant::now();
        if let Some(c) = st.chans.get_mut(channel) {
            c.bridge = Some(bridge.to_string());
            c.entered.get_or_insert(now);
        }
        let Some((_, epoch, name)) = parse_bridge_id(bridge) else {
            return;
        };
        let conference = name.to_string();
        let homes = st.homes.entry(conference.clone()).or_default();
        if homes
            .get(&(node, bridge.to_string()))
            .is_some_and(|h| h.members.contains(channel))
        {
            return;
        }
        let mut doubles = Vec::new();
        let mut splits = Vec::new();
        for ((n, b), h) in homes.iter_mut() {
            if *n == node || h.members.is_empty() || h.stranded {
                continue;
            }
            if h.epoch < epoch {
                h.stranded = true;
                splits.push((*n, b.clone(), h.members.len()));
            } else {
                doubles.push(format!(
                    "{:.1}s: {conference}: a caller entered {bridge} on {} while {} had {} member(s) in {b}",
                    self.secs(now),
                    node_name(node),
                    node_name(*n),
                    h.members.len()
                ));
            }
        }
        let home = homes
            .entry((node, bridge.to_string()))
            .or_insert_with(|| Home {
                epoch,
                members: HashSet::new(),
                stranded: false,
            });
        if home.stranded {
            doubles.push(format!(
                "{:.1}s: {conference}: a caller entered {bridge} on {} after the conference moved elsewhere",
                self.secs(now),
                node_name(node)
            ));
        }
        home.members.insert(channel.to_string());
        st.entries.push((now, node, conference.clone()));
        for (n, b, members) in splits {
            st.stranded += members as u64;
            st.splits.insert((conference.clone(), n, b.clone()));
            st.split_notes.push(format!(
                "{:.1}s: {conference} re-homed to {} ({bridge}); {members} participant(s) left in {b} on {}",
                self.secs(now),
                node_name(node),
                node_name(n)
            ));
        }
        if !doubles.is_empty() {
            st.double_homes.insert(conference);
            st.double_home_notes.extend(doubles);
        }
    }

    fn leave(&self, st: &mut State, node: usize, channel: &str, bridge: &str) {
        if let Some(c) = st.chans.get_mut(channel) {
            if c.bridge.as_deref() == Some(bridge) {
                c.bridge = None;
            }
        }
        if let Some((_, _, name)) = parse_bridge_id(bridge) {
            if let Some(h) = st
                .homes
                .get_mut(name.as_str())
                .and_then(|homes| homes.get_mut(&(node, bridge.to_string())))
            {
                h.members.remove(channel);
            }
        }
    }

    fn gone(&self, st: &mut State, node: usize, channel: &str, cause: i64) {
        for homes in st.homes.values_mut() {
            for ((n, _), h) in homes.iter_mut() {
                if *n == node {
                    h.members.remove(channel);
                }
            }
        }
        let expected = st.expected_drops.contains(&node);
        let Some(c) = st.chans.get_mut(channel) else {
            return;
        };
        if c.destroyed.is_some() {
            return;
        }
        c.destroyed = Some(cause);
        c.bridge = None;
        if c.entered.is_some() && !c.hanging_up {
            let d = Dropped {
                at: Instant::now(),
                node,
                conference: c.conference.clone(),
                channel: channel.to_string(),
                cause,
                expected,
            };
            st.dropped.push(d);
        }
    }
}

impl Tracker {
    /// A caller dialled straight into node `node`'s Asterisk for `conference` (as an edge
    /// with a route it learnt earlier would): joined, or refused and why. It hangs up once
    /// the answer is known.
    pub async fn probe_join(&self, sim: &AriSim, node: usize, conference: &str) -> JoinOutcome {
        let channel = format!("probe-{:016x}", rand::random::<u64>());
        self.dialled(&channel, conference, node);
        let dial = DialIn {
            app: "confroute".into(),
            args: vec![conference.to_string()],
            caller_number: "+15550000".into(),
            extension: conference.to_string(),
            channel_id: Some(channel.clone()),
            ..DialIn::default()
        };
        let outcome = match sim.dial_in(dial).await {
            Err(e) => JoinOutcome::Failed(format!("dial-in: {e}")),
            Ok(_) => {
                self.created(&channel);
                match self.wait_joined(&channel, JOIN_WAIT).await {
                    Ok(latency) => JoinOutcome::Joined(latency),
                    Err(why) => JoinOutcome::Failed(why),
                }
            }
        };
        self.hanging_up(&channel, false);
        let _ = sim.hangup_far_end(&channel, 16).await;
        outcome
    }
}

impl BridgeEvents for Tracker {
    fn entered(&self, node: usize, channel: &str, bridge: &str) {
        let mut st = lock(&self.state);
        self.enter(&mut st, node, channel, bridge);
        drop(st);
        self.changed.notify_waiters();
    }

    fn left(&self, node: usize, channel: &str, bridge: &str) {
        let mut st = lock(&self.state);
        self.leave(&mut st, node, channel, bridge);
        drop(st);
        self.changed.notify_waiters();
    }

    fn destroyed(&self, node: usize, channel: &str, cause: i64) {
        let mut st = lock(&self.state);
        self.gone(&mut st, node, channel, cause);
        drop(st);
        self.changed.notify_waiters();
    }

    fn connected(&self, node: usize, sim: &AriSim) {
        // Events missed while the observer's socket was down (it is dropped with the agent's
        // when the WebSocket flaps) are recovered from the Asterisk's state now. A channel
        // whose dial-in had not returned before the snapshot may not be in it yet.
        let taken = Instant::now();
        let snap = sim.snapshot();
        let mut st = lock(&self.state);
        let present: HashMap<&str, Option<&str>> = snap
            .channels
            .iter()
            .map(|c| (c.id.as_str(), c.bridge.as_deref()))
            .collect();
        let ours: Vec<(String, Option<String>, bool, bool)> = st
            .chans
            .iter()
            .filter(|(_, c)| c.node == node)
            .map(|(id, c)| {
                let judged = c.created.is_some_and(|t| t < taken);
                (id.clone(), c.bridge.clone(), c.destroyed.is_some(), judged)
            })
            .collect();
        for (id, bridge, destroyed, judged) in ours {
            if destroyed {
                continue;
            }
            match present.get(id.as_str()) {
                None if judged => self.gone(&mut st, node, &id, -1),
                None => {}
                Some(now) => {
                    if let Some(b) = &bridge {
                        if *now != Some(b.as_str()) {
                            self.leave(&mut st, node, &id, b);
                        }
                    }
                    if let Some(b) = now {
                        self.enter(&mut st, node, &id, b);
                    }
                }
            }
        }
        drop(st);
        self.changed.notify_waiters();
    }
}

/// Where callers go: controllers (SIP, HTTP) and the nodes' Asterisks.
#[derive(Clone)]
pub struct Targets {
    /// Controllers: SIP and HTTP addresses.
    pub controllers: Vec<(SocketAddr, SocketAddr)>,
    /// Simulated Asterisk of each node.
    pub sims: Vec<AriSim>,
    /// Node ids, same order.
    pub node_ids: Vec<String>,
}

/// What the callers do.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// New callers per second.
    pub rate: f64,
    /// Conferences, called in turn so each gets a caller every `conferences / rate` s.
    pub conferences: usize,
    /// Shortest and longest stay.
    pub hold: (Duration, Duration),
    /// Every n-th caller stays `long_hold` instead (so some outlive the fault).
    pub long_every: u64,
    /// Stay of those callers.
    pub long_hold: Duration,
}

impl LoadSpec {
    /// Seconds between two callers of the same conference.
    pub fn per_conference_interval(&self) -> Duration {
        Duration::from_secs_f64(self.conferences as f64 / self.rate)
    }

    /// Conference names.
    pub fn names(&self) -> Vec<String> {
        (0..self.conferences)
            .map(|i| format!("chaos-{i:03}"))
            .collect()
    }
}

/// Running callers and observers.
pub struct Load {
    /// What they saw.
    pub tracker: Tracker,
    stop: watch::Sender<bool>,
    generator: Option<JoinHandle<()>>,
    observers: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts an observer on every Asterisk and callers at `spec.rate`.
    pub fn start(spec: LoadSpec, targets: Targets) -> Load {
        let tracker = Tracker::default();
        let observers = targets
            .sims
            .iter()
            .enumerate()
            .map(|(i, sim)| tokio::spawn(traffic::observe(tracker.clone(), i, sim.clone())))
            .collect();
        let (stop, stop_rx) = watch::channel(false);
        let generator = tokio::spawn(generate(spec, Arc::new(targets), tracker.clone(), stop_rx));
        Load {
            tracker,
            stop,
            generator: Some(generator),
            observers,
        }
    }

    /// Stops placing calls; every caller still in a conference hangs up now. Waits (bounded)
    /// until they have.
    pub async fn stop(&mut self) {
        self.stop.send_replace(true);
        if let Some(mut g) = self.generator.take() {
            // Callers still running past the wait are stopped, not left to the runtime.
            if tokio::time::timeout(Duration::from_secs(30), &mut g)
                .await
                .is_err()
            {
                g.abort();
            }
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(g) = self.generator.take() {
            g.abort();
        }
        for o in &self.observers {
            o.abort();
        }
    }
}

async fn generate(
    spec: LoadSpec,
    targets: Arc<Targets>,
    tracker: Tracker,
    mut stop: watch::Receiver<bool>,
) {
    let names = spec.names();
    let http = crate::fixtures::http();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / spec.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut callers = tokio::task::JoinSet::new();
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let conference = names[(n as usize) % names.len()].clone();
        let hold = if spec.long_every > 0 && n % spec.long_every == spec.long_every - 1 {
            spec.long_hold
        } else {
            let (lo, hi) = spec.hold;
            Duration::from_secs_f64(rand::rng().random_range(lo.as_secs_f64()..=hi.as_secs_f64()))
        };
        callers.spawn(caller(
            tracker.clone(),
            targets.clone(),
            http.clone(),
            n,
            conference,
            hold,
            stop.clone(),
        ));
        n += 1;
        while callers.try_join_next().is_some() {}
    }
    while callers.join_next().await.is_some() {}
}

async fn route(
    http: &reqwest::Client,
    controller: (SocketAddr, SocketAddr),
    entry: Entry,
    conference: &str,
) -> RouteOutcome {
    match entry {
        Entry::Sip => match traffic::sip_invite(controller.0, conference, SIP_WAIT).await {
            Ok(a) => match (a.status, a.header("X-Conference-Node")) {
                (302, Some(node)) => RouteOutcome::Node(node),
                (503, _) => RouteOutcome::Unavailable {
                    retry_after: a.header("Retry-After").is_some(),
                },
                (s, _) => RouteOutcome::Other(format!("SIP {s}")),
            },
            Err(e) => RouteOutcome::Other(e),
        },
        Entry::Http => match traffic::http_route(http, controller.1, "", conference).await {
            Ok(a) => match (a.status, a.body["node_id"].as_str()) {
                (200, Some(node)) => RouteOutcome::Node(node.to_string()),
                (503, _) => RouteOutcome::Unavailable {
                    retry_after: a.retry_after.is_some(),
                },
                (s, _) => RouteOutcome::Other(format!("HTTP {s}")),
            },
            Err(e) => RouteOutcome::Other(e),
        },
    }
}

async fn caller(
    tracker: Tracker,
    targets: Arc<Targets>,
    http: reqwest::Client,
    n: u64,
    conference: String,
    hold: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let controller = targets.controllers[(n as usize / 2) % targets.controllers.len()];
    let entry = if n.is_multiple_of(2) {
        Entry::Sip
    } else {
        Entry::Http
    };
    let at = Instant::now();
    // A node id the run does not know is a routing answer no caller can follow: counted
    // with the other wrong answers, not taken for a route.
    let outcome = match route(&http, controller, entry, &conference).await {
        RouteOutcome::Node(id) if !targets.node_ids.contains(&id) => {
            RouteOutcome::Other(format!("routed to a node the run does not know ({id})"))
        }
        other => other,
    };
    tracker.record_route(RouteEvent {
        at,
        answered: Instant::now(),
        conference: conference.clone(),
        entry,
        outcome: outcome.clone(),
    });
    let RouteOutcome::Node(node_id) = outcome else {
        return;
    };
    let Some(node) = targets.node_ids.iter().position(|id| *id == node_id) else {
        return;
    };
    let sim = &targets.sims[node];
    let channel = format!("chaos-{:016x}", rand::random::<u64>());
    tracker.dialled(&channel, &conference, node);
    let dial = DialIn {
        app: "confroute".into(),
        args: vec![conference.clone()],
        caller_number: format!("+1555{:07}", rand::rng().random_range(0..10_000_000)),
        extension: conference.clone(),
        channel_id: Some(channel.clone()),
        ..DialIn::default()
    };
    if let Err(e) = sim.dial_in(dial).await {
        tracker.record_join(&channel, JoinOutcome::Failed(format!("dial-in: {e}")));
        tracker.forget(&channel);
        return;
    }
    tracker.created(&channel);
    match tracker.wait_joined(&channel, JOIN_WAIT).await {
        Ok(latency) => tracker.record_join(&channel, JoinOutcome::Joined(latency)),
        Err(why) => {
            tracker.record_join(&channel, JoinOutcome::Failed(why));
            // A caller still ringing gives up.
            tracker.hanging_up(&channel, false);
            let _ = sim.hangup_far_end(&channel, 16).await;
            return;
        }
    }
    tokio::select! {
        _ = tokio::time::sleep(hold) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
    tracker.settle(&channel, LOST_GRACE).await;
    tracker.hanging_up(&channel, true);
    // Gone already (ended by the node, its Asterisk lost) is fine: the tracker counted it.
    let _ = sim.hangup_far_end(&channel, 16).await;
}

/// What a claim watcher saw in Redis.
#[derive(Default, Clone, Debug)]
pub struct ClaimHistory {
    /// Times the same (conference, life, epoch) was seen with two different owners.
    pub two_owners: Vec<String>,
    /// Owner changes seen: (when, conference, from, to).
    pub changes: Vec<(Instant, String, String, String)>,
    /// Samples that could not be read (Redis away).
    pub failed_samples: u64,
    /// Samples read.
    pub samples: u64,
}

/// Samples every claim in Redis every 100 ms, checking that one (conference, life, epoch)
/// names one owner only; a life is identified by the claim's `created_ms`, which a re-home
/// keeps and a new claim after the conference ended does not.
pub struct ClaimWatch {
    history: Arc<Mutex<ClaimHistory>>,
    task: JoinHandle<()>,
}

impl ClaimWatch {
    /// Starts watching through `store`.
    pub fn start(store: Store) -> ClaimWatch {
        let history: Arc<Mutex<ClaimHistory>> = Arc::default();
        let h = history.clone();
        let task = tokio::spawn(async move {
            let mut owners: HashMap<(String, u64, u64), String> = HashMap::new();
            let mut last: BTreeMap<String, String> = BTreeMap::new();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let mut all = Vec::new();
                let mut after: Option<String> = None;
                let ok = loop {
                    match store.list_conferences(after.as_deref(), 1000).await {
                        Ok(page) => {
                            all.extend(page.items);
                            match page.next {
                                Some(n) => after = Some(n),
                                None => break true,
                            }
                        }
                        Err(_) => break false,
                    }
                };
                let mut hist = h.lock().unwrap_or_else(|p| p.into_inner());
                if !ok {
                    hist.failed_samples += 1;
                    continue;
                }
                hist.samples += 1;
                let now = Instant::now();
                for (name, rec) in all {
                    let owner = rec.owner.node.to_string();
                    let key = (name.to_string(), rec.created_ms, rec.owner.epoch);
                    match owners.get(&key) {
                        Some(o) if *o != owner => hist.two_owners.push(format!(
                            "{name} (created {} ms, epoch {}) owned by {o} and by {owner}",
                            rec.created_ms, rec.owner.epoch
                        )),
                        Some(_) => {}
                        None => {
                            owners.insert(key, owner.clone());
                        }
                    }
                    if let Some(before) = last.insert(name.to_string(), owner.clone()) {
                        if before != owner {
                            hist.changes.push((now, name.to_string(), before, owner));
                        }
                    }
                }
            }
        });
        ClaimWatch { history, task }
    }

    /// What was seen so far.
    pub fn history(&self) -> ClaimHistory {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for ClaimWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
