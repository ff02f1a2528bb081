//! Soak: the whole cluster of the chaos scenarios (real Redis, real `confroute-controller`
//! and `confroute-node` processes, simulated Asterisks in this process) under steady calls for
//! a long time, watching every process for memory and file-descriptor growth and every call
//! for an error outcome.
//!
//! The rate is half of the highest rate this same load sustains on this machine, measured by a
//! short ramp on a cluster of its own (or given). The soak itself runs on a fresh cluster so
//! that the ramp's peak does not leave freed-but-resident memory in the allocators, which would
//! hide a leak until it had eaten that reserve.
//!
//! Growth is judged on medians, robust to the noise of allocators and connection pools: the
//! median of the first `trend_window` samples after the warm-up against the median of the
//! last `trend_window` samples. `docs/soak.md` describes the tool and records a full run; the
//! test suite runs a short one (`tests/tests/soak_short.rs`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::ari_sim::{AriSim, DialIn, SimError};
use crate::chaos::cluster::{Cluster, Spec};
use crate::chaos::load::{Entry, Targets};
use crate::chaos::ChaosError;
use crate::dev::traffic::{self, BridgeEvents};
use crate::harness::{wait_for_async, HarnessError};

/// How long a dialled caller may take to reach a bridge before it gives up.
const JOIN_WAIT: Duration = Duration::from_secs(5);
/// How long a SIP caller waits for the controller's answer.
const SIP_WAIT: Duration = Duration::from_secs(3);
/// Bound for stopping a load: the callers still joining wait up to [`JOIN_WAIT`], then every
/// caller hangs up.
const STOP_WAIT: Duration = Duration::from_secs(30);
/// Bound for the Asterisks and Redis to be empty once a ramp step's callers hung up.
const EMPTY_WAIT: Duration = Duration::from_secs(15);
/// Label of this process in the table.
pub const TOOL_PROCESS: &str = "soak (this tool)";

/// The soak could not run (a goal missed is not an error: it is in the report).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SoakError(pub String);

impl From<ChaosError> for SoakError {
    fn from(e: ChaosError) -> Self {
        SoakError(e.0)
    }
}

impl From<HarnessError> for SoakError {
    fn from(e: HarnessError) -> Self {
        SoakError(e.0)
    }
}

/// Result of a soak step.
pub type SoakResult<T> = Result<T, SoakError>;

/// What each caller does.
#[derive(Clone, Debug)]
pub struct CallMix {
    /// Consecutive callers sent into one conference; every conference name is new, so
    /// conferences are created and ended all the time (per-name state that is never freed
    /// shows up as growth).
    pub callers_per_conference: u64,
    /// Shortest and longest stay in the conference.
    pub hold: (Duration, Duration),
}

/// How the maximum rate is found.
#[derive(Clone, Debug)]
pub struct RampConfig {
    /// First rate tried (calls/s).
    pub start: f64,
    /// Each rate is this factor times the one before.
    pub factor: f64,
    /// Length of each step.
    pub step: Duration,
    /// Highest acceptable p99 of call set-up (routing, dial-in, join).
    pub max_p99: Duration,
    /// Share of the calls a step should have placed that it must have placed (below it, the
    /// callers could not keep the rate on this machine).
    pub min_delivered: f64,
    /// Rate at which the ramp stops even if every step passed.
    pub ceiling: f64,
}

/// Everything a soak run takes.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// Conference nodes.
    pub nodes: usize,
    /// Controllers.
    pub controllers: usize,
    /// Soak rate (calls/s); `None`: half of the maximum.
    pub rate: Option<f64>,
    /// Maximum rate of this load (calls/s); `None`: measured with the ramp.
    pub max_rate: Option<f64>,
    /// Load before the trend is measured (pools, caches and allocators settle).
    pub warmup: Duration,
    /// Length of the measured soak after the warm-up.
    pub duration: Duration,
    /// Time between two samples of every process.
    pub sample_every: Duration,
    /// Samples whose median is the start, and the end, of the trend.
    pub trend_window: usize,
    /// Largest RSS growth (percent) that still counts as flat.
    pub rss_limit_pct: f64,
    /// File descriptors by which a process may end above its start (a socket being replaced
    /// at the moment of a sample: a Redis reconnect, an accept in progress).
    pub fd_slack: u64,
    /// After the callers hung up, how long to wait for the Asterisks to have no bridge and Redis
    /// no claim (anything left then is reported).
    pub empty_wait: Duration,
    /// After the callers hung up, how long to wait for every process's open fds to come back to
    /// where they were before the load (HTTP keep-alive pools close idle connections after 30 s
    /// in the agent, 90 s in this tool's client); zero skips this check.
    pub rest_wait: Duration,
    /// The calls.
    pub mix: CallMix,
    /// The ramp (when the maximum is not given).
    pub ramp: RampConfig,
    /// Most conferences per node (the product's default, 100, would cap the rate long before
    /// the processes do; capacity is not what a soak measures).
    pub capacity: u32,
    /// Folder to save every process's output into at the end.
    pub logs: Option<PathBuf>,
    /// Print progress to stderr.
    pub progress: bool,
}

impl SoakConfig {
    /// The published soak: 2 controllers, 3 nodes, 60 s warm-up, 10 minutes at half the
    /// measured maximum, a sample every 5 s, trends over 6 samples (30 s).
    pub fn full() -> SoakConfig {
        SoakConfig {
            nodes: 3,
            controllers: 2,
            rate: None,
            max_rate: None,
            warmup: Duration::from_secs(60),
            duration: Duration::from_secs(600),
            sample_every: Duration::from_secs(5),
            trend_window: 6,
            rss_limit_pct: 5.0,
            fd_slack: 2,
            empty_wait: EMPTY_WAIT,
            rest_wait: Duration::from_secs(120),
            mix: CallMix {
                callers_per_conference: 4,
                hold: (Duration::from_secs(1), Duration::from_secs(4)),
            },
            ramp: RampConfig {
                start: 20.0,
                factor: 1.5,
                step: Duration::from_secs(15),
                max_p99: Duration::from_millis(500),
                min_delivered: 0.95,
                ceiling: 5000.0,
            },
            capacity: 1000,
            logs: None,
            progress: true,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Latency histogram
// ---------------------------------------------------------------------------------------

/// Ratio between two bucket bounds: quantiles are exact to 5 %.
const BUCKET_RATIO: f64 = 1.05;
/// Buckets up to about 100 s in microseconds.
const BUCKETS: usize = 380;

/// Latencies in logarithmic buckets: a fixed size however long the soak runs.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

impl Histogram {
    /// Adds one latency.
    pub fn add(&mut self, d: Duration) {
        let us = d.as_secs_f64() * 1e6;
        let i = if us <= 1.0 {
            0
        } else {
            ((us.ln() / BUCKET_RATIO.ln()).ceil() as usize).min(BUCKETS - 1)
        };
        self.counts[i] += 1;
        self.total += 1;
    }

    /// Latencies added.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_secs_f64(BUCKET_RATIO.powi(i as i32) / 1e6));
            }
        }
        None
    }

    /// `p50/p99 X/Y ms`, or `-`.
    fn describe(&self) -> String {
        match (self.quantile(0.5), self.quantile(0.99)) {
            (Some(a), Some(b)) => format!(
                "p50/p99 {:.1}/{:.1} ms",
                a.as_secs_f64() * 1e3,
                b.as_secs_f64() * 1e3
            ),
            _ => "-".into(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Call outcomes
// ---------------------------------------------------------------------------------------

/// What happened to the calls placed in one phase.
#[derive(Clone, Debug, Default)]
pub struct Outcomes {
    /// Routing requests sent.
    pub placed: u64,
    /// Answered with a node.
    pub routed: u64,
    /// Callers that reached a bridge.
    pub joined: u64,
    /// Callers that joined, stayed and hung up without anything going wrong.
    pub completed: u64,
    /// Error outcomes by kind (a bounded set of kinds).
    pub errors: BTreeMap<String, u64>,
    /// The first message seen of each kind, for a look.
    pub examples: BTreeMap<String, String>,
    /// Routing request to answer.
    pub route_latency: Histogram,
    /// Routing request to the caller in a bridge.
    pub setup_latency: Histogram,
}

impl Outcomes {
    /// Error outcomes of every kind.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn error(&mut self, kind: String, example: impl Into<String>) {
        *self.errors.entry(kind.clone()).or_default() += 1;
        self.examples.entry(kind).or_insert_with(|| example.into());
    }
}

#[derive(Debug)]
struct Chan {
    node: usize,
    /// The conference it dialled: its callers in bridges on two nodes at once is a second
    /// home.
    conference: String,
    /// When its dial-in had created it in the Asterisk (set once the request returned): a
    /// resync only takes a channel missing from a snapshot taken after that for gone.
    created: Option<Instant>,
    phase: usize,
    waiter: Option<oneshot::Sender<Result<Instant, String>>>,
    joined: bool,
    in_bridge: bool,
    hanging_up: bool,
    destroyed: bool,
}

#[derive(Default)]
struct CallState {
    /// Only the callers in progress: each removes itself when done, so this stays bounded.
    chans: HashMap<String, Chan>,
    phases: [Outcomes; 2],
    observers_up: Vec<bool>,
    observer_connects: u64,
}

/// Counts outcomes; the bridge observers report into it. Cheap to clone.
#[derive(Clone, Default)]
struct Counter {
    state: Arc<Mutex<CallState>>,
}

fn lock(m: &Mutex<CallState>) -> MutexGuard<'_, CallState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Counter {
    fn with<T>(&self, f: impl FnOnce(&mut CallState) -> T) -> T {
        f(&mut lock(&self.state))
    }

    fn error(&self, phase: usize, kind: String, example: impl Into<String>) {
        self.with(|st| st.phases[phase].error(kind, example));
    }

    fn entered(st: &mut CallState, channel: &str) {
        let Some(c) = st.chans.get_mut(channel) else {
            return;
        };
        c.in_bridge = true;
        c.joined = true;
        if let Some(w) = c.waiter.take() {
            let _ = w.send(Ok(Instant::now()));
        }
        let (node, phase, conference) = (c.node, c.phase, c.conference.clone());
        // Nothing fails in a soak: callers of one conference bridged on two nodes at once
        // are a second home (invariant 1), never a re-home.
        let elsewhere = st
            .chans
            .values()
            .find(|o| o.conference == conference && o.node != node && o.in_bridge && !o.destroyed)
            .map(|o| o.node);
        if let Some(other) = elsewhere {
            st.phases[phase].error(
                "double home: callers of one conference bridged on two nodes".into(),
                format!("conference {conference} on nodes {other} and {node}"),
            );
        }
    }

    fn gone(st: &mut CallState, channel: &str, cause: i64) {
        let Some(c) = st.chans.get_mut(channel) else {
            return;
        };
        if c.destroyed {
            return;
        }
        c.destroyed = true;
        c.in_bridge = false;
        if let Some(w) = c.waiter.take() {
            let _ = w.send(Err(format!("join: hung up by the node (cause {cause})")));
        } else if c.joined && !c.hanging_up {
            let phase = c.phase;
            st.phases[phase].error(
                format!("in call: dropped by the node (cause {cause})"),
                format!("channel {channel} on node {}", c.node),
            );
        }
    }
}

impl BridgeEvents for Counter {
    fn entered(&self, _node: usize, channel: &str, _bridge: &str) {
        self.with(|st| Counter::entered(st, channel));
    }

    fn left(&self, _node: usize, channel: &str, _bridge: &str) {
        self.with(|st| {
            if let Some(c) = st.chans.get_mut(channel) {
                c.in_bridge = false;
            }
        });
    }

    fn destroyed(&self, _node: usize, channel: &str, cause: i64) {
        self.with(|st| Counter::gone(st, channel, cause));
    }

    fn connected(&self, node: usize, sim: &AriSim) {
        // Events missed while the observer's socket was down are recovered from the
        // Asterisk's state now. A channel whose dial-in had not returned before the snapshot
        // may not be in it yet.
        let taken = Instant::now();
        let snap = sim.snapshot();
        let present: HashMap<&str, bool> = snap
            .channels
            .iter()
            .map(|c| (c.id.as_str(), c.bridge.is_some()))
            .collect();
        self.with(|st| {
            if let Some(up) = st.observers_up.get_mut(node) {
                *up = true;
            }
            st.observer_connects += 1;
            let ours: Vec<(String, bool)> = st
                .chans
                .iter()
                .filter(|(_, c)| c.node == node && !c.destroyed)
                .map(|(id, c)| (id.clone(), c.created.is_some_and(|t| t < taken)))
                .collect();
            for (id, judged) in ours {
                match present.get(id.as_str()) {
                    None if judged => Counter::gone(st, &id, -1),
                    None => {}
                    Some(true) => Counter::entered(st, &id),
                    Some(false) => {
                        if let Some(c) = st.chans.get_mut(&id) {
                            c.in_bridge = false;
                        }
                    }
                }
            }
        });
    }

    fn disconnected(&self, node: usize, _sim: &AriSim) {
        self.with(|st| {
            if let Some(up) = st.observers_up.get_mut(node) {
                *up = false;
            }
        });
    }
}

/// The kind of a simulator refusal, without the channel id (kinds stay a bounded set).
fn sim_error_kind(e: &SimError) -> &'static str {
    match e {
        SimError::Bind { .. } => "bind",
        SimError::NoSuchChannel(_) => "no such channel",
        SimError::DuplicateChannel(_) => "duplicate channel",
        SimError::AppNotActive(_) => "Stasis app not active",
        SimError::NotRinging(_) => "not ringing",
        SimError::BadDigit(_) => "bad digit",
        SimError::Down => "Asterisk down",
    }
}

/// A controller's answer: the node, or the kind of failure and its message.
async fn route(
    http: &reqwest::Client,
    controller: (SocketAddr, SocketAddr),
    entry: Entry,
    conference: &str,
) -> Result<String, (String, String)> {
    match entry {
        Entry::Sip => match traffic::sip_invite(controller.0, conference, SIP_WAIT).await {
            Ok(a) => match (a.status, a.header("X-Conference-Node")) {
                (302, Some(node)) => Ok(node),
                (503, _) => Err((
                    format!(
                        "route: SIP 503 {} Retry-After",
                        if a.header("Retry-After").is_some() {
                            "with"
                        } else {
                            "without"
                        }
                    ),
                    a.header("Warning").unwrap_or_default(),
                )),
                (s, _) => Err((format!("route: SIP {s}"), a.text.lines().take(1).collect())),
            },
            Err(e) => Err(("route: no SIP answer".into(), e)),
        },
        Entry::Http => match traffic::http_route(http, controller.1, "", conference).await {
            Ok(a) => match (a.status, a.body["node_id"].as_str()) {
                (200, Some(node)) => Ok(node.to_string()),
                (s, _) => Err((format!("route: HTTP {s}"), a.body.to_string())),
            },
            Err(e) => Err(("route: HTTP request failed".into(), e)),
        },
    }
}

/// One caller: routed, dialled into the chosen node's Asterisk, in the conference for `hold`
/// (or until the load stops), then hangs up.
#[allow(clippy::too_many_arguments)]
async fn caller(
    counter: Counter,
    targets: Arc<Targets>,
    http: reqwest::Client,
    n: u64,
    conference: String,
    hold: Duration,
    phase: usize,
    mut stop: watch::Receiver<bool>,
) {
    let controller = targets.controllers[(n as usize / 2) % targets.controllers.len()];
    let entry = if n.is_multiple_of(2) {
        Entry::Sip
    } else {
        Entry::Http
    };
    counter.with(|st| st.phases[phase].placed += 1);
    let asked = Instant::now();
    let routed = route(&http, controller, entry, &conference).await;
    counter.with(|st| st.phases[phase].route_latency.add(asked.elapsed()));
    let node_id = match routed {
        Ok(node) => node,
        Err((kind, example)) => return counter.error(phase, kind, example),
    };
    counter.with(|st| st.phases[phase].routed += 1);
    let Some(node) = targets.node_ids.iter().position(|id| *id == node_id) else {
        return counter.error(phase, "route: unknown node".into(), node_id);
    };
    let sim = &targets.sims[node];
    let channel = format!("soak-{:016x}", rand::random::<u64>());
    let (tx, rx) = oneshot::channel();
    counter.with(|st| {
        st.chans.insert(
            channel.clone(),
            Chan {
                node,
                conference: conference.clone(),
                created: None,
                phase,
                waiter: Some(tx),
                joined: false,
                in_bridge: false,
                hanging_up: false,
                destroyed: false,
            },
        )
    });
    let forget = |counter: &Counter| counter.with(|st| st.chans.remove(&channel));
    let dial = DialIn {
        app: "confroute".into(),
        args: vec![conference.clone()],
        caller_number: format!("+1555{:07}", rand::rng().random_range(0..10_000_000)),
        extension: conference.clone(),
        channel_id: Some(channel.clone()),
        ..DialIn::default()
    };
    if let Err(e) = sim.dial_in(dial).await {
        forget(&counter);
        return counter.error(
            phase,
            format!("join: dial-in refused ({})", sim_error_kind(&e)),
            e.to_string(),
        );
    }
    counter.with(|st| {
        if let Some(c) = st.chans.get_mut(&channel) {
            c.created = Some(Instant::now());
        }
    });
    match tokio::time::timeout(JOIN_WAIT, rx).await {
        Ok(Ok(Ok(at))) => counter.with(|st| {
            let p = &mut st.phases[phase];
            p.joined += 1;
            p.setup_latency.add(at.saturating_duration_since(asked));
        }),
        Ok(Ok(Err(why))) => {
            forget(&counter);
            return counter.error(phase, why, format!("{channel} on node {node_id}"));
        }
        Ok(Err(_)) | Err(_) => {
            counter.with(|st| {
                if let Some(c) = st.chans.get_mut(&channel) {
                    c.hanging_up = true;
                }
            });
            // A caller still ringing gives up.
            let _ = sim.hangup_far_end(&channel, 16).await;
            forget(&counter);
            return counter.error(
                phase,
                format!("join: not in a bridge within {} s", JOIN_WAIT.as_secs()),
                format!("{channel} on node {node_id}"),
            );
        }
    }
    tokio::select! {
        _ = tokio::time::sleep(hold) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
    // Judged before hanging up: our own hang-up takes the caller out of its bridge.
    let (destroyed, out_of_bridge) = counter.with(|st| match st.chans.get_mut(&channel) {
        Some(c) => {
            c.hanging_up = true;
            (c.destroyed, !c.destroyed && !c.in_bridge)
        }
        None => (true, false),
    });
    let mut clean = !destroyed;
    if out_of_bridge {
        clean = false;
        counter.error(
            phase,
            "in call: out of its bridge at hang-up".into(),
            format!("{channel} on node {node_id}"),
        );
    }
    if !destroyed {
        if let Err(e) = sim.hangup_far_end(&channel, 16).await {
            // Gone before we hung up, and the observer had not seen it yet.
            let seen = counter.with(|st| st.chans.get(&channel).is_some_and(|c| c.destroyed));
            if !seen {
                clean = false;
                counter.error(
                    phase,
                    format!("in call: gone before hang-up ({})", sim_error_kind(&e)),
                    format!("{channel} on node {node_id}"),
                );
            }
        }
    }
    forget(&counter);
    if clean {
        counter.with(|st| st.phases[phase].completed += 1);
    }
}

/// Callers at a steady rate into ever new conferences, with an observer on every Asterisk.
struct CallLoad {
    counter: Counter,
    phase: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
    generator: Option<JoinHandle<()>>,
    observers: Vec<JoinHandle<()>>,
}

impl CallLoad {
    /// Connects the observers (waits until each is up, so no join goes unseen), then starts
    /// callers at `rate`; conference names start with `prefix`.
    async fn start(
        rate: f64,
        mix: &CallMix,
        targets: Targets,
        prefix: &str,
    ) -> SoakResult<CallLoad> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(SoakError(format!("rate {rate} is not a positive number")));
        }
        let counter = Counter::default();
        counter.with(|st| st.observers_up = vec![false; targets.sims.len()]);
        let observers = targets
            .sims
            .iter()
            .enumerate()
            .map(|(i, sim)| tokio::spawn(traffic::observe(counter.clone(), i, sim.clone())))
            .collect();
        let (stop, stop_rx) = watch::channel(false);
        let mut load = CallLoad {
            counter: counter.clone(),
            phase: Arc::default(),
            stop,
            generator: None,
            observers,
        };
        wait_for_async(
            "every bridge observer to connect",
            Duration::from_secs(10),
            || async {
                counter
                    .with(|st| st.observers_up.iter().all(|u| *u))
                    .then_some(())
            },
        )
        .await?;
        load.generator = Some(tokio::spawn(generate(
            rate,
            mix.clone(),
            prefix.to_string(),
            Arc::new(targets),
            counter,
            load.phase.clone(),
            stop_rx,
        )));
        Ok(load)
    }

    /// Calls placed from now on count in phase 1 (the soak proper).
    fn next_phase(&self) {
        self.phase.store(1, Ordering::SeqCst);
    }

    /// Stops placing calls; every caller in a conference hangs up now. Waits (bounded) until
    /// every caller is done.
    async fn stop(&mut self) {
        self.stop.send_replace(true);
        if let Some(mut g) = self.generator.take() {
            // Callers still running past the wait are stopped, not left to the runtime.
            if tokio::time::timeout(STOP_WAIT, &mut g).await.is_err() {
                g.abort();
            }
        }
    }

    /// Outcomes of both phases so far.
    fn outcomes(&self) -> [Outcomes; 2] {
        self.counter.with(|st| st.phases.clone())
    }

    /// Callers in progress now.
    fn in_progress(&self) -> usize {
        self.counter.with(|st| st.chans.len())
    }

    /// Times an observer (re)connected, beyond the first connection of each.
    fn observer_reconnects(&self) -> u64 {
        self.counter.with(|st| {
            st.observer_connects
                .saturating_sub(st.observers_up.len() as u64)
        })
    }
}

impl Drop for CallLoad {
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
    rate: f64,
    mix: CallMix,
    prefix: String,
    targets: Arc<Targets>,
    counter: Counter,
    phase: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) {
    let http = crate::fixtures::http();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    // Calls the generator could not place in time are not made up in a burst: the shortfall
    // shows as fewer calls placed than asked for.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let per = mix.callers_per_conference.max(1);
    let mut callers = JoinSet::new();
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let conference = format!("{prefix}-{:07}", n / per);
        let (lo, hi) = mix.hold;
        let hold = if hi > lo {
            Duration::from_secs_f64(rand::rng().random_range(lo.as_secs_f64()..=hi.as_secs_f64()))
        } else {
            lo
        };
        callers.spawn(caller(
            counter.clone(),
            targets.clone(),
            http.clone(),
            n,
            conference,
            hold,
            phase.load(Ordering::SeqCst),
            stop.clone(),
        ));
        n += 1;
        while callers.try_join_next().is_some() {}
    }
    while callers.join_next().await.is_some() {}
}

// ---------------------------------------------------------------------------------------
// Process sampling
// ---------------------------------------------------------------------------------------

/// A process to watch.
#[derive(Clone, Debug)]
pub struct Watched {
    /// Label in the table.
    pub name: String,
    /// Process id.
    pub pid: u32,
    /// Its growth counts towards the goals (false for this tool itself).
    pub judged: bool,
    /// Established TCP connections from this process to these ports are HTTP keep-alive
    /// connections of its own client pool (an agent's ARI REST client).
    pub pool_remote: Vec<u16>,
    /// Established TCP connections to these local ports of this process are keep-alive
    /// connections of a client's pool (this tool's, on a controller's HTTP port).
    pub pool_local: Vec<u16>,
}

/// One sample of one process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcSample {
    /// Seconds since the load started.
    pub at: f64,
    /// Resident set size in KiB (`VmRSS`); `None` when the process is gone.
    pub rss_kib: Option<u64>,
    /// Open file descriptors; `None` when the process is gone.
    pub fds: Option<u64>,
    /// Of those, established HTTP keep-alive connections of a pool (see [`Watched`]).
    pub pooled: Option<u64>,
}

impl ProcSample {
    /// Open fds other than pooled keep-alive connections: what a leak would raise.
    pub fn other_fds(&self) -> Option<u64> {
        Some(self.fds?.saturating_sub(self.pooled.unwrap_or(0)))
    }
}

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(dir.count() as u64)
}

/// Socket inodes of `pid`'s open fds.
fn socket_inodes(pid: u32) -> Option<Vec<u64>> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        dir.filter_map(|e| {
            let link = std::fs::read_link(e.ok()?.path()).ok()?;
            let text = link.to_str()?;
            text.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect(),
    )
}

/// An established TCP connection: local and remote port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TcpConn {
    local: u16,
    remote: u16,
}

/// The established TCP connections of this network namespace by socket inode, from
/// `/proc/net/tcp` and `/proc/net/tcp6`.
fn established() -> HashMap<u64, TcpConn> {
    let mut out = HashMap::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            if let Some((inode, conn)) = parse_tcp_line(line) {
                out.insert(inode, conn);
            }
        }
    }
    out
}

/// One line of `/proc/net/tcp`: `sl local rem st queues tr retrnsmt uid timeout inode ...`,
/// addresses as `HEXADDR:HEXPORT`; `None` unless established (state `01`).
fn parse_tcp_line(line: &str) -> Option<(u64, TcpConn)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let port = |a: &str| u16::from_str_radix(a.rsplit(':').next()?, 16).ok();
    if f.get(3) != Some(&"01") {
        return None;
    }
    let local = port(f.get(1)?)?;
    let remote = port(f.get(2)?)?;
    let inode = f.get(9)?.parse().ok()?;
    Some((inode, TcpConn { local, remote }))
}

/// Median of `values` (mean of the two middle ones when even); `None` when empty.
pub fn median(values: &[u64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_unstable();
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2] as f64),
        _ => Some((v[n / 2 - 1] + v[n / 2]) as f64 / 2.0),
    }
}

/// How one process did after the warm-up.
#[derive(Clone, Debug)]
pub struct ProcessTrend {
    /// Label.
    pub name: String,
    /// Process id.
    pub pid: u32,
    /// Counts towards the goals.
    pub judged: bool,
    /// Every sample, warm-up included.
    pub samples: Vec<ProcSample>,
    /// Median RSS (KiB) of the first window after the warm-up.
    pub rss_start: f64,
    /// Highest RSS (KiB) after the warm-up.
    pub rss_max: u64,
    /// Median RSS (KiB) of the last window.
    pub rss_end: f64,
    /// `rss_end` against `rss_start`, percent.
    pub rss_growth_pct: f64,
    /// Median open fds, pooled keep-alive connections aside, of the first window after the
    /// warm-up.
    pub fds_start: f64,
    /// Highest of those after the warm-up.
    pub fds_max: u64,
    /// Median of those in the last window.
    pub fds_end: f64,
    /// Most pooled keep-alive connections seen after the warm-up.
    pub pooled_max: u64,
    /// All open fds before the load started, and once it had stopped and pools idled out
    /// (`None`: not measured).
    pub fds_at_rest: Option<(u64, u64)>,
    /// A sample found the process gone.
    pub exited: bool,
}

impl ProcessTrend {
    /// The trend of `samples` after `warmup` seconds, over windows of `window` samples
    /// (shrunk to half the samples when there are fewer than two windows' worth).
    pub fn compute(
        w: &Watched,
        samples: Vec<ProcSample>,
        warmup: f64,
        window: usize,
    ) -> ProcessTrend {
        let after: Vec<&ProcSample> = samples.iter().filter(|s| s.at >= warmup).collect();
        let exited = samples
            .iter()
            .any(|s| s.rss_kib.is_none() || s.fds.is_none());
        let k = window.min(after.len() / 2).max(1);
        let rss: Vec<u64> = after.iter().filter_map(|s| s.rss_kib).collect();
        let fds: Vec<u64> = after.iter().filter_map(|s| s.other_fds()).collect();
        let head = |v: &[u64]| median(&v[..k.min(v.len())]).unwrap_or(f64::NAN);
        let tail = |v: &[u64]| median(&v[v.len().saturating_sub(k)..]).unwrap_or(f64::NAN);
        let rss_start = head(&rss);
        let rss_end = tail(&rss);
        ProcessTrend {
            name: w.name.clone(),
            pid: w.pid,
            judged: w.judged,
            rss_start,
            rss_max: rss.iter().copied().max().unwrap_or(0),
            rss_end,
            rss_growth_pct: (rss_end - rss_start) / rss_start * 100.0,
            fds_start: head(&fds),
            fds_max: fds.iter().copied().max().unwrap_or(0),
            fds_end: tail(&fds),
            pooled_max: after.iter().filter_map(|s| s.pooled).max().unwrap_or(0),
            fds_at_rest: None,
            exited,
            samples,
        }
    }

    /// Open fds (pooled keep-alive connections aside) at the end above the start.
    pub fn fd_growth(&self) -> f64 {
        self.fds_end - self.fds_start
    }

    /// Open fds at rest after the load above those before it (0 when not measured).
    pub fn fd_growth_at_rest(&self) -> i64 {
        self.fds_at_rest
            .map(|(before, after)| after as i64 - before as i64)
            .unwrap_or(0)
    }
}

struct Sampler {
    watched: Vec<Watched>,
    samples: Vec<Vec<ProcSample>>,
    started: Instant,
}

impl Sampler {
    fn new(watched: Vec<Watched>, started: Instant) -> Sampler {
        let samples = vec![Vec::new(); watched.len()];
        Sampler {
            watched,
            samples,
            started,
        }
    }

    fn sample(&mut self) {
        let at = self.started.elapsed().as_secs_f64();
        let conns = established();
        for (w, s) in self.watched.iter().zip(&mut self.samples) {
            let pooled = socket_inodes(w.pid).map(|inodes| {
                inodes
                    .iter()
                    .filter_map(|i| conns.get(i))
                    .filter(|c| {
                        w.pool_remote.contains(&c.remote) || w.pool_local.contains(&c.local)
                    })
                    .count() as u64
            });
            s.push(ProcSample {
                at,
                rss_kib: rss_kib(w.pid),
                fds: fd_count(w.pid),
                pooled,
            });
        }
    }

    /// Samples every `every` from now until `until` (a last sample at `until` when `at_end`).
    async fn run_until(
        &mut self,
        every: Duration,
        until: Instant,
        at_end: bool,
        mut tick: impl FnMut(&Sampler),
    ) {
        let mut next = Instant::now();
        loop {
            if next >= until {
                tokio::time::sleep_until(until.into()).await;
                if at_end {
                    self.sample();
                    tick(self);
                }
                return;
            }
            tokio::time::sleep_until(next.into()).await;
            self.sample();
            tick(self);
            next += every;
        }
    }

    fn last_line(&self) -> String {
        self.watched
            .iter()
            .zip(&self.samples)
            .filter_map(|(w, s)| {
                let last = s.last()?;
                Some(format!(
                    "{} {} MiB/{} fds",
                    w.name,
                    last.rss_kib
                        .map(|k| format!("{:.1}", k as f64 / 1024.0))
                        .unwrap_or_else(|| "-".into()),
                    last.fds
                        .map(|f| f.to_string())
                        .unwrap_or_else(|| "-".into())
                ))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Open fds of every process in `procs`.
fn all_fds(procs: &[Watched]) -> Vec<Option<u64>> {
    procs.iter().map(|w| fd_count(w.pid)).collect()
}

/// Waits (up to `within`) until every judged process has at most `slack` more open fds than
/// `before`; returns the counts then.
async fn wait_fds_at_rest(
    procs: &[Watched],
    before: &[Option<u64>],
    slack: u64,
    within: Duration,
) -> Vec<Option<u64>> {
    let rested = || {
        let now = all_fds(procs);
        let ok = procs.iter().zip(before).zip(&now).all(|((w, b), n)| {
            !w.judged || matches!((b, n), (Some(b), Some(n)) if *n <= b + slack)
        });
        ok.then_some(now)
    };
    let waited = wait_for_async(
        "open fds back to their level before the load",
        within,
        || async { rested() },
    )
    .await;
    waited.unwrap_or_else(|_| all_fds(procs))
}

fn watched(cluster: &mut Cluster) -> SoakResult<Vec<Watched>> {
    let mut out = Vec::new();
    for (i, (name, pid)) in cluster.current_pids().into_iter().enumerate() {
        let pid = pid.ok_or_else(|| SoakError(format!("{name} is not running")))?;
        // current_pids lists the controllers, then the nodes, each in order.
        let (pool_remote, pool_local) = match cluster.controllers.get(i) {
            Some(c) => (Vec::new(), vec![c.http_port]),
            None => {
                let node = i - cluster.controllers.len();
                let sim = cluster
                    .sims
                    .get(node)
                    .ok_or_else(|| SoakError(format!("no Asterisk for {name}")))?;
                (vec![sim.addr().port()], Vec::new())
            }
        };
        out.push(Watched {
            name,
            pid,
            judged: true,
            pool_remote,
            pool_local,
        });
    }
    let redis = cluster
        .single
        .as_ref()
        .and_then(|r| r.pid())
        .ok_or_else(|| SoakError("redis-server is not running".into()))?;
    out.push(Watched {
        name: "redis".into(),
        pid: redis,
        judged: true,
        pool_remote: Vec::new(),
        pool_local: Vec::new(),
    });
    out.push(Watched {
        name: TOOL_PROCESS.into(),
        pid: std::process::id(),
        judged: false,
        pool_remote: Vec::new(),
        pool_local: Vec::new(),
    });
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Ramp
// ---------------------------------------------------------------------------------------

/// One step of the ramp.
#[derive(Clone, Debug)]
pub struct StepResult {
    /// Rate asked for (calls/s).
    pub rate: f64,
    /// Seconds the callers were placed for.
    pub seconds: f64,
    /// What happened to the calls.
    pub calls: Outcomes,
    /// `Ok`: sustained; `Err`: why not.
    pub verdict: Result<(), String>,
    /// Bridges and claims of this step's conferences left once its callers hung up (reported,
    /// not judged).
    pub left: Vec<String>,
}

impl StepResult {
    /// `sustained`, or `not sustained: <why>`, as the progress lines and the report print it.
    pub fn verdict_text(&self) -> String {
        match &self.verdict {
            Ok(()) => "sustained".to_string(),
            Err(e) => format!("not sustained: {e}"),
        }
    }
}

/// Whether `calls`, placed at `rate` for `seconds`, show the rate sustained: every call
/// routed and joined with no error, the callers kept the rate, and set-up p99 within bound.
pub fn judge_step(
    rate: f64,
    seconds: f64,
    calls: &Outcomes,
    cfg: &RampConfig,
) -> Result<(), String> {
    let mut why = Vec::new();
    let errors = calls.error_count();
    if errors > 0 {
        let kinds: Vec<String> = calls
            .errors
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        why.push(format!("{errors} error(s) ({})", kinds.join("; ")));
    }
    let wanted = rate * seconds;
    if (calls.placed as f64) < cfg.min_delivered * wanted {
        why.push(format!(
            "placed {} of {:.0} calls (the callers could not keep the rate)",
            calls.placed, wanted
        ));
    }
    if calls.joined < calls.placed && errors == 0 {
        why.push(format!(
            "{} of {} placed calls joined",
            calls.joined, calls.placed
        ));
    }
    match calls.setup_latency.quantile(0.99) {
        Some(p99) if p99 > cfg.max_p99 => why.push(format!(
            "set-up p99 {:.0} ms > {} ms",
            p99.as_secs_f64() * 1e3,
            cfg.max_p99.as_millis()
        )),
        Some(_) => {}
        None => why.push("no call joined".into()),
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

/// Runs one step on `cluster` and waits until its Asterisks are empty again.
async fn ramp_step(
    cluster: &Cluster,
    cfg: &SoakConfig,
    rate: f64,
    n: usize,
) -> SoakResult<StepResult> {
    let prefix = format!("ramp{n}");
    let mut load = CallLoad::start(rate, &cfg.mix, targets(cluster), &prefix).await?;
    let started = Instant::now();
    tokio::time::sleep(cfg.ramp.step).await;
    let seconds = started.elapsed().as_secs_f64();
    load.stop().await;
    let calls = load.outcomes()[0].clone();
    drop(load);
    let verdict = judge_step(rate, seconds, &calls, &cfg.ramp);
    // Reported, not judged: the ramp measures the rate callers get through at; what is left
    // behind is the soak's goal. Only this step's conferences: what an earlier step left was
    // reported with that step.
    let left = leftovers(cluster, &format!("{prefix}-"), EMPTY_WAIT).await;
    Ok(StepResult {
        rate,
        seconds,
        calls,
        verdict,
        left,
    })
}

/// Every claim in Redis, page by page.
async fn all_claims(cluster: &Cluster) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = cluster
            .store
            .list_conferences(after.as_deref(), 1000)
            .await
            .map_err(|e| format!("cannot list claims: {e}"))?;
        out.extend(page.items.iter().map(|(n, r)| {
            format!(
                "claim {n} (owner {}, epoch {})",
                r.owner.node, r.owner.epoch
            )
        }));
        match page.next {
            Some(n) => after = Some(n),
            None => return Ok(out),
        }
    }
}

/// Waits (up to `within`) until no Asterisk has a bridge and Redis has no claim of a conference
/// whose name holds `marker`; returns those left.
async fn leftovers(cluster: &Cluster, marker: &str, within: Duration) -> Vec<String> {
    let list = || async {
        let mut out: Vec<String> = cluster
            .bridges()
            .into_iter()
            .filter(|(_, id, _)| id.contains(marker))
            .map(|(node, id, members)| {
                format!("bridge {id} on node-{} ({members} member(s))", node + 1)
            })
            .collect();
        match all_claims(cluster).await {
            Ok(claims) => out.extend(claims.into_iter().filter(|c| c.contains(marker))),
            Err(e) => out.push(e),
        }
        out
    };
    let _ = wait_for_async("the conferences to be gone", within, || async {
        list().await.is_empty().then_some(())
    })
    .await;
    list().await
}

/// What each agent's reconciliation with Asterisk did (from its metrics), as notes. No agent
/// restarts during a soak, so a conference it re-adopted from Asterisk's listing is one it had
/// just ended: the listing was older than the end.
async fn reconcile_notes(cluster: &Cluster) -> Vec<String> {
    let http = crate::fixtures::http();
    let mut notes = Vec::new();
    for (id, node) in cluster.node_ids.iter().zip(&cluster.nodes) {
        let url = format!("{}/metrics", node.http_url());
        let text = match http.get(&url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => {
                notes.push(format!("{id}: cannot read {url}: {e}"));
                continue;
            }
        };
        let actions: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("confroute_node_reconcile_actions_total{action=\""))
            .filter_map(|l| {
                let (action, value) = l.split_once("\"}")?;
                let n: f64 = value.trim().parse().ok()?;
                (n > 0.0).then(|| format!("{action} {n}"))
            })
            .collect();
        if !actions.is_empty() {
            notes.push(format!(
                "{id}: reconciliation with Asterisk acted: {}",
                actions.join(", ")
            ));
        }
    }
    notes
}

/// Rounds a rate for display and for the next step (whole calls/s from 10 up).
fn round_rate(r: f64) -> f64 {
    if r >= 10.0 {
        r.round()
    } else {
        (r * 10.0).round() / 10.0
    }
}

/// Raises the rate step by step until a step fails twice (once more on a shared machine
/// before concluding); then tries halfway between the last pass and the failure once.
/// Returns the highest sustained rate and every step.
async fn ramp(cfg: &SoakConfig) -> SoakResult<(f64, Vec<StepResult>, Vec<String>)> {
    let mut cluster = Cluster::start(&spec(cfg)).await?;
    let mut steps: Vec<StepResult> = Vec::new();
    let mut best: Option<f64> = None;
    let mut failed: Option<f64> = None;
    let mut rate = round_rate(cfg.ramp.start);
    let attempt = |steps: &mut Vec<StepResult>, r: StepResult| {
        if cfg.progress {
            eprintln!(
                "soak: ramp {:>6} calls/s: {} placed, {} joined, {} error(s), set-up {} -> {}",
                r.rate,
                r.calls.placed,
                r.calls.joined,
                r.calls.error_count(),
                r.calls.setup_latency.describe(),
                r.verdict_text()
            );
        }
        if cfg.progress {
            for l in &r.left {
                eprintln!("soak:   left: {l}");
            }
        }
        let ok = r.verdict.is_ok();
        steps.push(r);
        ok
    };
    while rate <= cfg.ramp.ceiling {
        let n = steps.len();
        let mut ok = attempt(&mut steps, ramp_step(&cluster, cfg, rate, n).await?);
        if !ok {
            let n = steps.len();
            ok = attempt(&mut steps, ramp_step(&cluster, cfg, rate, n).await?);
        }
        if !ok {
            failed = Some(rate);
            break;
        }
        best = Some(rate);
        rate = round_rate(rate * cfg.ramp.factor);
    }
    if let (Some(b), Some(f)) = (best, failed) {
        let mid = round_rate((b + f) / 2.0);
        if mid > b && mid < f {
            let n = steps.len();
            if attempt(&mut steps, ramp_step(&cluster, cfg, mid, n).await?) {
                best = Some(mid);
            }
        }
    }
    let notes = reconcile_notes(&cluster)
        .await
        .into_iter()
        .map(|n| format!("ramp: {n}"))
        .collect();
    if let Some(dir) = &cfg.logs {
        cluster.save_logs(&dir.join("ramp"));
    }
    let restarted = cluster.restarted(&[]);
    if !restarted.is_empty() {
        return Err(SoakError(format!(
            "process(es) exited during the ramp: {}",
            restarted.join(", ")
        )));
    }
    match best {
        Some(b) => Ok((b, steps, notes)),
        None => Err(SoakError(format!(
            "even the first ramp step ({} calls/s) was not sustained: {}",
            cfg.ramp.start,
            steps
                .last()
                .and_then(|s| s.verdict.clone().err())
                .unwrap_or_default()
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// Where the maximum rate came from.
#[derive(Clone, Debug, PartialEq)]
pub enum MaxRate {
    /// Measured by the ramp.
    Measured(f64),
    /// Given on the command line.
    Given(f64),
    /// Not needed: the soak rate was given.
    Unknown,
}

/// One goal and whether it was met.
#[derive(Clone, Debug)]
pub struct Goal {
    /// The goal in words.
    pub name: String,
    /// Met.
    pub met: bool,
    /// Figures behind the verdict.
    pub detail: String,
}

/// Everything a soak run found.
#[derive(Clone, Debug)]
pub struct SoakReport {
    /// The settings it ran with.
    pub config: SoakConfig,
    /// The maximum rate and where it came from.
    pub max_rate: MaxRate,
    /// The ramp's steps (empty when the maximum was given).
    pub ramp: Vec<StepResult>,
    /// The soak rate (calls/s).
    pub rate: f64,
    /// Seconds from the end of the warm-up to the last sample.
    pub soak_seconds: f64,
    /// Every watched process.
    pub processes: Vec<ProcessTrend>,
    /// Calls placed during the warm-up.
    pub warmup_calls: Outcomes,
    /// Calls placed during the soak.
    pub soak_calls: Outcomes,
    /// Bridges and claims left once every caller hung up.
    pub leftovers: Vec<String>,
    /// Controller and agent processes that exited or were replaced.
    pub restarted: Vec<String>,
    /// Details worth a look.
    pub notes: Vec<String>,
    /// The goals, judged.
    pub goals: Vec<Goal>,
}

impl SoakReport {
    /// Every sample as CSV: `process,pid,seconds,rss_kib,fds,pooled` (empty fields: gone).
    pub fn samples_csv(&self) -> String {
        let mut out = String::from("process,pid,seconds,rss_kib,fds,pooled\n");
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        for p in &self.processes {
            for s in &p.samples {
                out.push_str(&format!(
                    "{},{},{:.1},{},{},{}\n",
                    p.name,
                    p.pid,
                    s.at,
                    opt(s.rss_kib),
                    opt(s.fds),
                    opt(s.pooled)
                ));
            }
        }
        out
    }

    /// The goals missed.
    pub fn missed(&self) -> Vec<&Goal> {
        self.goals.iter().filter(|g| !g.met).collect()
    }

    /// The trend of the process labelled `name`.
    pub fn process(&self, name: &str) -> Option<&ProcessTrend> {
        self.processes.iter().find(|p| p.name == name)
    }

    /// Error outcomes of the warm-up and the soak.
    pub fn errors(&self) -> u64 {
        self.warmup_calls.error_count() + self.soak_calls.error_count()
    }

    fn judge(&mut self) {
        let cfg = &self.config;
        let judged: Vec<&ProcessTrend> = self.processes.iter().filter(|p| p.judged).collect();
        let rss_bad: Vec<String> = judged
            .iter()
            .filter(|p| !rss_flat(p, cfg))
            .map(|p| format!("{} {:+.1}%", p.name, p.rss_growth_pct))
            .collect();
        let worst = judged
            .iter()
            .map(|p| (p.rss_growth_pct, p.name.as_str()))
            .fold(
                (f64::NEG_INFINITY, ""),
                |a, b| if b.0 > a.0 { b } else { a },
            );
        let fd_bad: Vec<String> = judged
            .iter()
            .filter(|p| !fds_flat(p, cfg))
            .map(|p| {
                let rest = p
                    .fds_at_rest
                    .map(|(b, a)| format!(", at rest {b} -> {a}"))
                    .unwrap_or_default();
                format!(
                    "{} {} -> {}{rest}",
                    p.name,
                    count(p.fds_start),
                    count(p.fds_end)
                )
            })
            .collect();
        let rest_checked = judged.iter().all(|p| p.fds_at_rest.is_some());
        let gone: Vec<String> = self
            .processes
            .iter()
            .filter(|p| p.exited)
            .map(|p| p.name.clone())
            .chain(self.restarted.iter().cloned())
            .collect();
        let wanted = self.rate * self.soak_seconds;
        let placed = self.soak_calls.placed;
        let errors = self.errors();
        let window = format!(
            "median of the first {} samples after the warm-up against the last {}",
            cfg.trend_window, cfg.trend_window
        );
        self.goals = vec![
            Goal {
                name: format!(
                    "RSS flat: growth < {}% after the warm-up",
                    cfg.rss_limit_pct
                ),
                met: rss_bad.is_empty(),
                detail: if rss_bad.is_empty() {
                    format!("largest {:+.1}% ({}); {window}", worst.0, worst.1)
                } else {
                    format!("{}; {window}", rss_bad.join(", "))
                },
            },
            Goal {
                name: "no error outcomes".into(),
                met: errors == 0,
                detail: format!(
                    "{errors} error(s) in {} calls",
                    self.warmup_calls.placed + self.soak_calls.placed
                ),
            },
            Goal {
                name: format!("no file-descriptor growth (slack {})", cfg.fd_slack),
                met: fd_bad.is_empty(),
                detail: if fd_bad.is_empty() {
                    format!(
                        "under load, fds other than pooled keep-alive connections ended within the slack of their start{}",
                        if rest_checked {
                            "; at rest, all fds came back to their level before the load"
                        } else {
                            " (at rest: not checked)"
                        }
                    )
                } else {
                    fd_bad.join(", ")
                },
            },
            Goal {
                name: "every process stayed up".into(),
                met: gone.is_empty(),
                detail: if gone.is_empty() {
                    "none exited".into()
                } else {
                    format!("gone: {}", gone.join(", "))
                },
            },
            Goal {
                name: "nothing left behind once the callers hung up".into(),
                met: self.leftovers.is_empty(),
                detail: if self.leftovers.is_empty() {
                    "no bridge, no claim".into()
                } else {
                    format!("{} left", self.leftovers.len())
                },
            },
            Goal {
                name: "the load was delivered (>= 95% of the calls asked for)".into(),
                met: placed as f64 >= 0.95 * wanted,
                detail: format!(
                    "{placed} placed of {wanted:.0} ({:.1} calls/s)",
                    placed as f64 / self.soak_seconds.max(1e-9)
                ),
            },
        ];
    }
}

/// RSS grew less than the limit (a trend that could not be computed is not flat).
fn rss_flat(p: &ProcessTrend, cfg: &SoakConfig) -> bool {
    p.rss_growth_pct.is_finite() && p.rss_growth_pct < cfg.rss_limit_pct
}

/// Open fds (pooled keep-alive connections aside) ended within the slack of the start, and,
/// when measured, all open fds at rest came back within the slack of their level before the
/// load.
fn fds_flat(p: &ProcessTrend, cfg: &SoakConfig) -> bool {
    let g = p.fd_growth();
    g.is_finite() && g <= cfg.fd_slack as f64 && p.fd_growth_at_rest() <= cfg.fd_slack as i64
}

fn spec(cfg: &SoakConfig) -> Spec {
    Spec::new(cfg.nodes, cfg.controllers)
        .node_setting("CONFROUTE_NODE__CAPACITY", &cfg.capacity.to_string())
}

fn targets(cluster: &Cluster) -> Targets {
    Targets {
        controllers: cluster.controller_addrs(),
        sims: cluster.sims.clone(),
        node_ids: cluster.node_ids.clone(),
    }
}

/// Runs the soak: finds the maximum rate (unless given), then the warm-up and the soak at the
/// chosen rate on a fresh cluster, and judges the goals.
pub async fn run(cfg: &SoakConfig) -> SoakResult<SoakReport> {
    if cfg.trend_window == 0 {
        return Err(SoakError(
            "the trend window must hold at least one sample".into(),
        ));
    }
    let (max_rate, ramp_steps, mut notes) = match (cfg.max_rate, cfg.rate) {
        (Some(m), _) => (MaxRate::Given(m), Vec::new(), Vec::new()),
        (None, Some(_)) => (MaxRate::Unknown, Vec::new(), Vec::new()),
        (None, None) => {
            if cfg.progress {
                eprintln!("soak: measuring the maximum rate of this load ...");
            }
            let (m, steps, notes) = ramp(cfg).await?;
            (MaxRate::Measured(m), steps, notes)
        }
    };
    let rate = match (cfg.rate, &max_rate) {
        (Some(r), _) => r,
        (None, MaxRate::Measured(m) | MaxRate::Given(m)) => round_rate(m / 2.0),
        (None, MaxRate::Unknown) => return Err(SoakError("no rate and no maximum".into())),
    };
    if cfg.progress {
        eprintln!(
            "soak: {rate} calls/s, {} s warm-up, then {} s measured, a sample every {} s",
            cfg.warmup.as_secs_f64(),
            cfg.duration.as_secs_f64(),
            cfg.sample_every.as_secs_f64()
        );
    }

    let mut cluster = Cluster::start(&spec(cfg)).await?;
    let procs = watched(&mut cluster)?;
    // This tool's own store connects to Redis on first use; it is used after the load, so it
    // connects now, before Redis's fds are counted.
    cluster
        .store
        .list_conferences(None, 1)
        .await
        .map_err(|e| SoakError(format!("cannot list claims in Redis: {e}")))?;
    let fds_before = all_fds(&procs);
    let mut load = CallLoad::start(rate, &cfg.mix, targets(&cluster), "soak").await?;
    let started = Instant::now();
    let warm_end = started + cfg.warmup;
    let end = warm_end + cfg.duration;
    let mut sampler = Sampler::new(procs, started);
    let progress_every = Duration::from_secs(30).max(cfg.sample_every);
    let mut last_progress = started;
    let progress = cfg.progress;
    let mut report_progress = |s: &Sampler| {
        if progress && last_progress.elapsed() >= progress_every {
            last_progress = Instant::now();
            eprintln!(
                "soak: {:>5.0} s: {}",
                started.elapsed().as_secs_f64(),
                s.last_line()
            );
        }
    };
    sampler
        .run_until(cfg.sample_every, warm_end, false, &mut report_progress)
        .await;
    load.next_phase();
    let measured_from = Instant::now();
    if progress {
        let o = load.outcomes();
        eprintln!(
            "soak: warm-up over: {} calls, {} error(s); measuring",
            o[0].placed,
            o[0].error_count()
        );
    }
    sampler
        .run_until(cfg.sample_every, end, true, &mut report_progress)
        .await;
    // As measured: the sampler's last step may end a little after the configured length.
    let soak_seconds = measured_from.elapsed().as_secs_f64();
    let in_progress = load.in_progress();
    load.stop().await;
    let [warmup_calls, soak_calls] = load.outcomes();
    let reconnects = load.observer_reconnects();
    if reconnects > 0 {
        notes.push(format!(
            "the bridge observers reconnected {reconnects} time(s) (events missed meanwhile were recovered from the Asterisks' state)"
        ));
    }
    drop(load);
    notes.push(format!(
        "{in_progress} caller(s) were in progress when the soak ended"
    ));
    let leftovers = leftovers(&cluster, "", cfg.empty_wait).await;
    let fds_after = if cfg.rest_wait.is_zero() {
        None
    } else {
        if progress {
            eprintln!("soak: waiting for every process's open fds to come back to their level before the load ...");
        }
        Some(wait_fds_at_rest(&sampler.watched, &fds_before, cfg.fd_slack, cfg.rest_wait).await)
    };
    notes.extend(reconcile_notes(&cluster).await);
    let restarted = cluster.restarted(&[]);
    if let Some(dir) = &cfg.logs {
        cluster.save_logs(&dir.join("soak"));
    }
    drop(cluster);

    let warmup = cfg.warmup.as_secs_f64();
    let processes = sampler
        .watched
        .iter()
        .zip(sampler.samples)
        .enumerate()
        .map(|(i, (w, s))| {
            let mut t = ProcessTrend::compute(w, s, warmup, cfg.trend_window);
            if let Some(after) = &fds_after {
                if let (Some(Some(b)), Some(Some(a))) = (fds_before.get(i), after.get(i)) {
                    t.fds_at_rest = Some((*b, *a));
                }
            }
            t
        })
        .collect();
    let mut report = SoakReport {
        config: cfg.clone(),
        max_rate,
        ramp: ramp_steps,
        rate,
        soak_seconds,
        processes,
        warmup_calls,
        soak_calls,
        leftovers,
        restarted,
        notes,
        goals: Vec::new(),
    };
    report.judge();
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// Printing
// ---------------------------------------------------------------------------------------

fn mib(kib: f64) -> String {
    if kib.is_finite() {
        format!("{:.1} MiB", kib / 1024.0)
    } else {
        "-".into()
    }
}

fn count(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn write_calls(f: &mut fmt::Formatter<'_>, what: &str, seconds: f64, o: &Outcomes) -> fmt::Result {
    writeln!(
        f,
        "calls, {what} ({seconds:.0} s): {} placed ({:.1}/s), {} routed, {} joined, {} completed, {} error(s)",
        o.placed,
        o.placed as f64 / seconds.max(1e-9),
        o.routed,
        o.joined,
        o.completed,
        o.error_count()
    )?;
    writeln!(
        f,
        "  routing {}; set-up (routing, dial-in, join) {}",
        o.route_latency.describe(),
        o.setup_latency.describe()
    )?;
    for (kind, n) in &o.errors {
        let example = o.examples.get(kind).map(String::as_str).unwrap_or("");
        writeln!(f, "  {kind}: {n} (e.g. {example})")?;
    }
    Ok(())
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cfg = &self.config;
        writeln!(f, "== soak ==")?;
        writeln!(
            f,
            "cluster: {} controller(s), {} node(s) (capacity {} conferences each), one Redis",
            cfg.controllers, cfg.nodes, cfg.capacity
        )?;
        writeln!(
            f,
            "load: new conference every {} callers, SIP and HTTP routing alternately, stays {:.1}-{:.1} s",
            cfg.mix.callers_per_conference,
            cfg.mix.hold.0.as_secs_f64(),
            cfg.mix.hold.1.as_secs_f64()
        )?;
        if !self.ramp.is_empty() {
            writeln!(
                f,
                "ramp ({:.0} s steps, x{} each; sustained = no error, >= {:.0}% of the calls placed, set-up p99 <= {} ms):",
                cfg.ramp.step.as_secs_f64(),
                cfg.ramp.factor,
                cfg.ramp.min_delivered * 100.0,
                cfg.ramp.max_p99.as_millis()
            )?;
            writeln!(
                f,
                "  {:>8}  {:>7}  {:>7}  {:>6}  {:>20}  result",
                "calls/s", "placed", "joined", "errors", "set-up latency"
            )?;
            for s in &self.ramp {
                writeln!(
                    f,
                    "  {:>8}  {:>7}  {:>7}  {:>6}  {:>20}  {}",
                    s.rate,
                    s.calls.placed,
                    s.calls.joined,
                    s.calls.error_count(),
                    s.calls.setup_latency.describe(),
                    s.verdict_text()
                )?;
            }
        }
        for s in &self.ramp {
            for l in s.left.iter().take(10) {
                writeln!(f, "  left after the {} calls/s step: {l}", s.rate)?;
            }
        }
        match &self.max_rate {
            MaxRate::Measured(m) => writeln!(f, "maximum rate (measured): {m} calls/s")?,
            MaxRate::Given(m) => writeln!(f, "maximum rate (given): {m} calls/s")?,
            MaxRate::Unknown => {}
        }
        let half = match (&self.max_rate, cfg.rate) {
            (_, Some(_)) => " (given)".to_string(),
            (MaxRate::Measured(_) | MaxRate::Given(_), None) => " (half of the maximum)".into(),
            _ => String::new(),
        };
        writeln!(
            f,
            "soak rate: {} calls/s{half}; warm-up {:.0} s, measured {:.0} s, a sample every {:.0} s",
            self.rate,
            cfg.warmup.as_secs_f64(),
            self.soak_seconds,
            cfg.sample_every.as_secs_f64()
        )?;
        writeln!(
            f,
            "warm-up and end: medians of the first and last {} samples after the warm-up; max: highest single sample after it",
            cfg.trend_window
        )?;
        writeln!(
            f,
            "fds: open fds other than pooled HTTP keep-alive connections; pool: most of those seen; at rest: all fds before the load -> after it, once pools idled out"
        )?;
        writeln!(
            f,
            "  {:<17} {:>7}  {:>11}  {:>11}  {:>11}  {:>6}  {:>7}  {:>7}  {:>7}  {:>4}  {:>9}  verdict",
            "process", "pid", "RSS warm-up", "RSS max", "RSS end", "growth", "fds w-u", "fds max", "fds end", "pool", "at rest"
        )?;
        for p in &self.processes {
            let rss_ok = rss_flat(p, cfg);
            let fd_ok = fds_flat(p, cfg);
            let mut verdict = match (rss_ok, fd_ok, p.exited) {
                (_, _, true) => "exited".to_string(),
                (true, true, _) => "ok".into(),
                (false, true, _) => "RSS grew".into(),
                (true, false, _) => "fds grew".into(),
                (false, false, _) => "RSS and fds grew".into(),
            };
            if !p.judged {
                verdict = format!("not judged ({verdict}): the simulated Asterisks and callers");
            }
            let rest = p
                .fds_at_rest
                .map(|(b, a)| format!("{b} -> {a}"))
                .unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "  {:<17} {:>7}  {:>11}  {:>11}  {:>11}  {:>+5.1}%  {:>7}  {:>7}  {:>7}  {:>4}  {:>9}  {verdict}",
                p.name,
                p.pid,
                mib(p.rss_start),
                mib(p.rss_max as f64),
                mib(p.rss_end),
                p.rss_growth_pct,
                count(p.fds_start),
                p.fds_max,
                count(p.fds_end),
                p.pooled_max,
                rest,
            )?;
        }
        write_calls(f, "warm-up", cfg.warmup.as_secs_f64(), &self.warmup_calls)?;
        write_calls(f, "soak", self.soak_seconds, &self.soak_calls)?;
        if !self.leftovers.is_empty() {
            writeln!(f, "left behind once the callers hung up:")?;
            for l in self.leftovers.iter().take(20) {
                writeln!(f, "  {l}")?;
            }
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        writeln!(f, "goals:")?;
        for g in &self.goals {
            writeln!(
                f,
                "  [{}] {}: {}",
                if g.met { "met" } else { "MISSED" },
                g.name,
                g.detail
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp_cfg() -> RampConfig {
        SoakConfig::full().ramp
    }

    fn outcomes(placed: u64, joined: u64, setup_ms: u64) -> Outcomes {
        let mut o = Outcomes {
            placed,
            routed: placed,
            joined,
            completed: joined,
            ..Outcomes::default()
        };
        for _ in 0..joined {
            o.setup_latency.add(Duration::from_millis(setup_ms));
        }
        o
    }

    #[test]
    fn median_is_robust_to_one_outlier() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[5]), Some(5.0));
        assert_eq!(median(&[10, 10, 900, 10, 10]), Some(10.0));
        assert_eq!(median(&[1, 2, 3, 4]), Some(2.5));
    }

    #[test]
    fn histogram_quantiles_are_within_five_percent() {
        let mut h = Histogram::default();
        for ms in 1..=100 {
            h.add(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).expect("not empty").as_secs_f64() * 1e3;
        let p99 = h.quantile(0.99).expect("not empty").as_secs_f64() * 1e3;
        assert!((50.0..=52.5).contains(&p50), "p50 {p50}");
        assert!((99.0..=104.0).contains(&p99), "p99 {p99}");
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn trend_compares_medians_after_the_warm_up() {
        let w = Watched {
            name: "x".into(),
            pid: 1,
            judged: true,
            pool_remote: Vec::new(),
            pool_local: Vec::new(),
        };
        // Warm-up samples (at < 10) are ignored; one spike in each window does not move the
        // medians; the end is 10 % above the start.
        let mut samples = Vec::new();
        for i in 0..30u64 {
            let rss = match i {
                0..=9 => 50_000,
                12 => 99_999,
                10..=19 => 1000,
                _ => 1100,
            };
            samples.push(ProcSample {
                at: i as f64,
                rss_kib: Some(rss),
                // Pool connections come and go; only the other fds are judged.
                fds: Some(if i == 28 { 40 } else { 20 } + i % 7),
                pooled: Some(i % 7),
            });
        }
        let t = ProcessTrend::compute(&w, samples, 10.0, 5);
        assert_eq!(t.rss_start, 1000.0);
        assert_eq!(t.rss_end, 1100.0);
        assert!((t.rss_growth_pct - 10.0).abs() < 1e-9);
        assert_eq!(t.rss_max, 99_999);
        assert_eq!(t.fd_growth(), 0.0);
        assert_eq!(t.fds_max, 40);
        assert_eq!(t.pooled_max, 6);
        assert!(!t.exited);
    }

    #[test]
    fn a_process_gone_from_proc_is_marked_exited() {
        let w = Watched {
            name: "x".into(),
            pid: 1,
            judged: true,
            pool_remote: Vec::new(),
            pool_local: Vec::new(),
        };
        let samples = vec![
            ProcSample {
                at: 0.0,
                rss_kib: Some(1),
                fds: Some(1),
                pooled: Some(0),
            },
            ProcSample {
                at: 1.0,
                rss_kib: None,
                fds: None,
                pooled: None,
            },
        ];
        assert!(ProcessTrend::compute(&w, samples, 0.0, 1).exited);
    }

    #[test]
    fn proc_net_tcp_lines_give_established_connections() {
        let est = "   3: 0100007F:A1B2 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 20 4 30 10 -1";
        let listen = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 654321 1 0000000000000000 100 0 0 10 0";
        let close_wait = "   4: 0100007F:A1B3 0100007F:1F90 08 00000000:00000000 00:00000000 00000000     0        0 123457 1 0000000000000000 20 4 30 10 -1";
        let conn = TcpConn {
            local: 0xA1B2,
            remote: 8080,
        };
        assert_eq!(parse_tcp_line(est), Some((123456, conn)));
        assert_eq!(parse_tcp_line(listen), None);
        assert_eq!(parse_tcp_line(close_wait), None);
        assert_eq!(parse_tcp_line("garbage"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let pid = std::process::id();
        assert!(rss_kib(pid).is_some_and(|k| k > 0));
        assert!(fd_count(pid).is_some_and(|n| n >= 3));
        assert_eq!(rss_kib(u32::MAX), None);
    }

    #[test]
    fn a_step_is_sustained_only_without_errors_shortfall_or_slow_set_up() {
        let cfg = ramp_cfg();
        assert_eq!(judge_step(10.0, 10.0, &outcomes(100, 100, 5), &cfg), Ok(()));
        let mut errs = outcomes(100, 99, 5);
        errs.error("join: not in a bridge within 5 s".into(), "x");
        assert!(judge_step(10.0, 10.0, &errs, &cfg).is_err());
        assert!(judge_step(10.0, 10.0, &outcomes(90, 90, 5), &cfg).is_err());
        assert!(judge_step(10.0, 10.0, &outcomes(100, 100, 800), &cfg).is_err());
        assert!(judge_step(10.0, 10.0, &outcomes(100, 0, 5), &cfg).is_err());
    }
}
