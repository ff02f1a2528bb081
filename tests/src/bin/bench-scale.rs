//! `bench-scale`: the benchmark-table figures no other tool measures, each beside its
//! reference from the same run.
//!
//! - `controller-memory`: a controller's resident memory idle and after routing 100,000
//!   distinct conferences through `POST /v1/route` (created, then looked up again), beside
//!   what Redis itself uses for those conferences (`INFO memory` used_memory).
//! - `agent-memory`: one `confroute-node` agent beside an in-process ARI simulator; its
//!   resident memory idle, with one caller in each of C conferences, and with P callers;
//!   bytes per conference and per participant.
//! - `placement`: utilisation balance (max/mean) of placers with stale views on nodes of
//!   unequal capacity through the real claim script, beside random placement through the
//!   same script (uniform, and weighted by capacity).
//! - `rehome`: the `node-kill` chaos scenario (kill -9 of an agent under load); time from
//!   the kill to each of its conferences routed elsewhere, beside the 3 s node lease.
//!
//! Every subcommand prints a human-readable report and one line starting with `BENCH`
//! (`BENCH <kind> key=value ...`) that `bench/run-all` turns into the table of
//! `docs/BENCHMARKS.md`. Build first: `cargo build --release --workspace --bins`.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use confroute_shared::name::ConferenceName;
use confroute_shared::placement::Placer;
use confroute_shared::store::{ClaimKind, Store};
use confroute_shared::types::NodeId;
use confroute_tests::ari_sim::{AriSim, DialIn, SimConfig};
use confroute_tests::chaos::{self, node_kill, Common, Length};
use confroute_tests::fixtures;
use confroute_tests::harness::{
    redis_query, require_tool, wait_for_async, ControllerProc, NodeProc, RedisServer,
};
use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

/// Leases longer than any run, so nothing measured expires mid-run.
const LONG_LEASE: Duration = Duration::from_secs(24 * 3600);

/// Time for allocators to hand back what a burst freed before RSS is read (the controller's
/// mimalloc purges after 1 s).
const SETTLE: Duration = Duration::from_secs(3);

#[derive(Parser)]
#[command(
    name = "bench-scale",
    about = "Controller and agent memory, placement balance and re-home time, each beside its reference"
)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Controller RSS idle and after routing N distinct conferences, beside Redis's memory.
    ControllerMemory {
        /// Distinct conferences routed through the controller.
        #[arg(long, default_value_t = 100_000)]
        conferences: usize,
        /// Registered (fake) nodes to place them on.
        #[arg(long, default_value_t = 8)]
        nodes: usize,
        /// Concurrent HTTP requests.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Agent RSS idle, with one caller per conference, and with every caller.
    AgentMemory {
        /// Conferences.
        #[arg(long, default_value_t = 100)]
        conferences: usize,
        /// Participants in all (at least one per conference).
        #[arg(long, default_value_t = 2000)]
        participants: usize,
        /// Concurrent callers dialling in.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Placement balance (max/mean utilisation) beside random placement.
    Placement {
        /// Nodes, of capacity 400 + 60 * i.
        #[arg(long, default_value_t = 20)]
        nodes: u32,
        /// Independent placers, each with its own view.
        #[arg(long, default_value_t = 4)]
        placers: usize,
        /// Conferences placed in all.
        #[arg(long, default_value_t = 10_000)]
        placements: usize,
        /// Each placer refreshes its view every this many of its own placements.
        #[arg(long, default_value_t = 500)]
        refresh_every: usize,
        /// Seed of the placers' and the baselines' random choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Re-home time after kill -9 of an agent (the node-kill chaos scenario).
    Rehome {
        /// The short scenario the test suite runs, instead of the full one.
        #[arg(long)]
        short: bool,
    },
}

/// Prints the machine-readable line `bench/run-all` parses; values must hold no spaces.
fn emit(kind: &str, fields: &[(&str, String)]) {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace(char::is_whitespace, "_")))
        .collect();
    println!("BENCH {kind} {}", body.join(" "));
}

/// A kB field (`VmRSS`, `VmHWM`) of `/proc/<pid>/status`.
fn status_kb(pid: u32, field: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("{path}: no {field} line"))
}

/// One field of Redis `INFO <section>`.
fn redis_info(port: u16, section: &str, field: &str) -> Result<u64, String> {
    let text: String = redis_query(port, redis::cmd("INFO").arg(section))
        .ok_or_else(|| format!("INFO {section} failed on Redis port {port}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("INFO {section} has no {field}"))
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Registers `count` serving nodes `bench-0..` with room for everything.
async fn register_nodes(store: &Store, count: usize) -> Result<(), String> {
    for i in 0..count {
        let mut info = fixtures::node(&format!("bench-{i}"), u32::MAX / 2);
        info.sip_uri = format!("sip:10.0.1.{}:5060;transport=udp", i + 1);
        store
            .register(&info, LONG_LEASE)
            .await
            .map_err(|e| format!("register bench-{i}: {e}"))?;
    }
    Ok(())
}

/// Outcome of routing a list of names.
#[derive(Default)]
struct RouteStats {
    ok: u64,
    created: u64,
    errors: u64,
    first_error: Option<String>,
    secs: f64,
}

async fn route_one(http: &reqwest::Client, url: &str, name: &str) -> Result<bool, String> {
    let resp = http
        .post(url)
        .json(&serde_json::json!({ "conference": name }))
        .send()
        .await
        .map_err(|e| format!("POST /v1/route {name}: {e}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| format!("POST /v1/route {name}: {status}, unreadable body: {e}"))?;
    if !status.is_success() {
        return Err(format!("POST /v1/route {name}: {status} {body}"));
    }
    Ok(body.get("created").and_then(|c| c.as_bool()) == Some(true))
}

/// Routes every name once through `POST /v1/route` with `concurrency` requests in flight.
async fn route_all(base: &str, names: Arc<Vec<String>>, concurrency: usize) -> RouteStats {
    let http = fixtures::http();
    let url = format!("{base}/v1/route");
    let next = Arc::new(AtomicUsize::new(0));
    let created = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (http, url, names, next) = (http.clone(), url.clone(), names.clone(), next.clone());
        let (created, ok, errors, first_error) = (
            created.clone(),
            ok.clone(),
            errors.clone(),
            first_error.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(name) = names.get(i) else {
                    return;
                };
                match route_one(&http, &url, name).await {
                    Ok(c) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if c {
                            created.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                }
            }
        }));
    }
    for t in tasks {
        if let Err(e) = t.await {
            errors.fetch_add(1, Ordering::Relaxed);
            first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(format!("routing task failed: {e}"));
        }
    }
    let first_error = first_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    RouteStats {
        ok: ok.load(Ordering::Relaxed),
        created: created.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        first_error,
        secs: started.elapsed().as_secs_f64(),
    }
}

/// Fails when more than 1 % of the requests failed: the figures would not be of N conferences.
fn check_routes(what: &str, s: &RouteStats, n: usize) -> Result<(), String> {
    println!(
        "{what}: {} routed ({} created) in {:.1} s ({:.0}/s), {} errors",
        s.ok,
        s.created,
        s.secs,
        s.ok as f64 / s.secs.max(1e-9),
        s.errors
    );
    if let Some(e) = &s.first_error {
        println!("  first error: {e}");
    }
    if s.errors as usize * 100 > n {
        return Err(format!("{what}: {} of {n} requests failed", s.errors));
    }
    Ok(())
}

async fn controller_memory(
    conferences: usize,
    nodes: usize,
    concurrency: usize,
) -> Result<(), String> {
    require_tool("redis-server", "redis-server").map_err(|e| e.to_string())?;
    let redis = RedisServer::start().map_err(|e| e.to_string())?;
    let mut cfg = fixtures::single(&redis.url());
    cfg.conference_lease = LONG_LEASE;
    cfg.claim_lease = LONG_LEASE;
    let store = fixtures::store(&cfg);
    register_nodes(&store, nodes).await?;
    let mut env = fixtures::redis_env(&cfg);
    // The production default; the harness shortens it for tests.
    env.push(("CONFROUTE_ROUTING__NODE_REFRESH".into(), "500ms".into()));
    // Nobody joins these conferences: their claims outlive the run (redis_env carries both
    // leases of `cfg`).
    let controller = ControllerProc::start(&env).map_err(|e| e.to_string())?;
    let pid = controller.pid().ok_or("the controller has no process id")?;
    let base = controller.http_url();
    let serving = "confroute_nodes{state=\"serving\"}".to_string();
    wait_for_async(
        "the controller to see every node",
        Duration::from_secs(20),
        || {
            let (base, serving) = (base.clone(), serving.clone());
            async move {
                let text = fixtures::http()
                    .get(format!("{base}/metrics"))
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                (fixtures::metric(&text, &serving) as usize >= nodes).then_some(())
            }
        },
    )
    .await
    .map_err(|e| format!("{e}\ncontroller output:\n{}", controller.output()))?;

    tokio::time::sleep(SETTLE).await;
    let idle_kb = status_kb(pid, "VmRSS")?;
    let redis_before = redis_info(redis.port(), "memory", "used_memory")?;
    println!(
        "controller-memory: {nodes} nodes, {conferences} conferences, {concurrency} concurrent requests"
    );
    println!("controller idle: RSS {:.1} MB", mb(idle_kb));

    let names: Arc<Vec<String>> =
        Arc::new((0..conferences).map(|i| format!("scale-{i}")).collect());
    let created = route_all(&base, names.clone(), concurrency).await;
    check_routes("create", &created, conferences)?;
    tokio::time::sleep(SETTLE).await;
    let created_kb = status_kb(pid, "VmRSS")?;
    let redis_after = redis_info(redis.port(), "memory", "used_memory")?;
    let looked_up = route_all(&base, names.clone(), concurrency).await;
    check_routes("lookup", &looked_up, conferences)?;
    tokio::time::sleep(SETTLE).await;
    let lookup_kb = status_kb(pid, "VmRSS")?;
    let hwm_kb = status_kb(pid, "VmHWM")?;
    let dbsize: u64 =
        redis_query(redis.port(), &mut redis::cmd("DBSIZE")).ok_or("DBSIZE failed")?;
    let redis_delta = redis_after.saturating_sub(redis_before);
    let rss_delta_kb = lookup_kb.max(created_kb).saturating_sub(idle_kb);
    println!(
        "controller after creating {conferences}: RSS {:.1} MB; after looking them all up again: \
         RSS {:.1} MB; peak {:.1} MB",
        mb(created_kb),
        mb(lookup_kb),
        mb(hwm_kb)
    );
    println!(
        "redis used_memory {:.1} MB -> {:.1} MB (+{:.1} MB for the conferences), {dbsize} keys",
        redis_before as f64 / 1048576.0,
        redis_after as f64 / 1048576.0,
        redis_delta as f64 / 1048576.0
    );
    println!(
        "controller RSS growth {:.1} MB = {:.0} bytes per conference (Redis: {:.0} bytes per conference)",
        mb(rss_delta_kb),
        rss_delta_kb as f64 * 1024.0 / conferences.max(1) as f64,
        redis_delta as f64 / conferences.max(1) as f64
    );
    emit(
        "controller_memory",
        &[
            ("conferences", conferences.to_string()),
            ("created", created.created.to_string()),
            ("errors", (created.errors + looked_up.errors).to_string()),
            (
                "create_rps",
                format!("{:.0}", created.ok as f64 / created.secs),
            ),
            (
                "lookup_rps",
                format!("{:.0}", looked_up.ok as f64 / looked_up.secs),
            ),
            ("idle_rss_kb", idle_kb.to_string()),
            ("created_rss_kb", created_kb.to_string()),
            ("lookup_rss_kb", lookup_kb.to_string()),
            ("hwm_kb", hwm_kb.to_string()),
            ("redis_used_before", redis_before.to_string()),
            ("redis_used_after", redis_after.to_string()),
            ("redis_keys", dbsize.to_string()),
        ],
    );
    Ok(())
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Routes `ChannelEnteredBridge` to the caller waiting for it.
async fn observe(url: String, waiters: Waiters, ready: oneshot::Sender<()>) -> Result<(), String> {
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|e| format!("connecting {url}: {e}"))?;
    let _ = ready.send(());
    let (_sink, mut stream) = ws.split();
    while let Some(msg) = stream.next().await {
        let Ok(Message::Text(text)) = msg else {
            continue;
        };
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(text.as_str()) else {
            continue;
        };
        if ev.get("type").and_then(|t| t.as_str()) != Some("ChannelEnteredBridge") {
            continue;
        }
        let Some(id) = ev.pointer("/channel/id").and_then(|v| v.as_str()) else {
            continue;
        };
        if let Some(tx) = lock(&waiters).remove(id) {
            let _ = tx.send(());
        }
    }
    Ok(())
}

/// `e` with the last lines the agent wrote, to tell why callers were not admitted.
fn with_agent_output(e: String, node: &NodeProc) -> String {
    let out = node.output();
    let lines: Vec<&str> = out.lines().collect();
    let tail = lines[lines.len().saturating_sub(60)..].join("\n");
    format!("{e}\nagent output (last 60 lines):\n{tail}")
}

/// Dials every `(channel id, conference)` in and waits until each is in a bridge.
async fn admit_all(
    sim: &AriSim,
    waiters: &Waiters,
    calls: Vec<(String, String)>,
    concurrency: usize,
) -> Result<(), String> {
    let calls = Arc::new(calls);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (sim, waiters, calls, next) =
            (sim.clone(), waiters.clone(), calls.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((id, conf)) = calls.get(i).cloned() else {
                    return Ok::<_, String>(());
                };
                let (tx, rx) = oneshot::channel();
                lock(&waiters).insert(id.clone(), tx);
                sim.dial_in(DialIn {
                    app: "confroute".into(),
                    args: vec![conf],
                    channel_id: Some(id.clone()),
                    ..DialIn::default()
                })
                .await
                .map_err(|e| format!("dial-in {id}: {e}"))?;
                tokio::time::timeout(Duration::from_secs(30), rx)
                    .await
                    .map_err(|_| format!("{id} never entered a bridge"))?
                    .map_err(|_| "the event observer stopped".to_string())?;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| format!("caller task failed: {e}"))??;
    }
    Ok(())
}

async fn agent_memory(
    conferences: usize,
    participants: usize,
    concurrency: usize,
) -> Result<(), String> {
    require_tool("redis-server", "redis-server").map_err(|e| e.to_string())?;
    let conferences = conferences.max(1);
    let participants = participants.max(conferences);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start().map_err(|e| e.to_string())?;
    let cfg = fixtures::single(&redis.url());
    let sim = AriSim::start(SimConfig {
        username: "confroute".into(),
        password: "bench-password".into(),
        record_events: false,
        record_requests: false,
        ..SimConfig::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let per_conf = participants.div_ceil(conferences) + 1;
    let mut env = fixtures::redis_env(&cfg);
    for (k, v) in [
        ("CONFROUTE_ARI__URL", sim.base_url()),
        ("CONFROUTE_ARI__USERNAME", sim.username().to_string()),
        ("CONFROUTE_ARI__PASSWORD", sim.password().to_string()),
        // No entry beep: a playback per join would still be running when RSS is read.
        ("CONFROUTE_CONFERENCE__BEEP", "false".to_string()),
        (
            "CONFROUTE_CONFERENCE__MAX_PARTICIPANTS",
            per_conf.to_string(),
        ),
        ("CONFROUTE_NODE__CAPACITY", (conferences + 10).to_string()),
    ] {
        env.push((k.to_string(), v));
    }
    let mut node = NodeProc::start("bench-node", &env).map_err(|e| e.to_string())?;
    let pid = node.process().pid().ok_or("the agent has no process id")?;
    let waiters: Waiters = Arc::default();
    let (ready_tx, ready_rx) = oneshot::channel();
    let url = format!("{}&subscribeAll=true", sim.events_url("observer"));
    let w = waiters.clone();
    let observer = tokio::spawn(async move {
        if let Err(e) = observe(url, w, ready_tx).await {
            eprintln!("bench-scale: {e}");
        }
    });
    ready_rx
        .await
        .map_err(|_| "the event observer could not connect".to_string())?;
    wait_for_async(
        "the agent's ARI connection",
        Duration::from_secs(20),
        || async {
            sim.snapshot()
                .apps
                .iter()
                .any(|a| a.name == "confroute" && a.active)
                .then_some(())
        },
    )
    .await
    .map_err(|e| format!("{e}\nagent output:\n{}", node.output()))?;

    tokio::time::sleep(SETTLE).await;
    let idle_kb = status_kb(pid, "VmRSS")?;
    // Conferences in two halves: the first half also pays what the agent allocates once, on
    // first use (connection pools, worker stacks, buffers), so the cost per conference comes
    // from the second half alone.
    let half = conferences.div_ceil(2);
    let firsts = |range: std::ops::Range<usize>| -> Vec<(String, String)> {
        range
            .map(|c| (format!("first-{c}"), format!("mem-{c}")))
            .collect()
    };
    admit_all(&sim, &waiters, firsts(0..half), concurrency)
        .await
        .map_err(|e| with_agent_output(e, &node))?;
    tokio::time::sleep(SETTLE).await;
    let half_kb = status_kb(pid, "VmRSS")?;
    admit_all(&sim, &waiters, firsts(half..conferences), concurrency)
        .await
        .map_err(|e| with_agent_output(e, &node))?;
    tokio::time::sleep(SETTLE).await;
    let confs_kb = status_kb(pid, "VmRSS")?;
    let rest: Vec<(String, String)> = (conferences..participants)
        .map(|i| (format!("p-{i}"), format!("mem-{}", i % conferences)))
        .collect();
    let added = rest.len();
    admit_all(&sim, &waiters, rest, concurrency)
        .await
        .map_err(|e| with_agent_output(e, &node))?;
    tokio::time::sleep(SETTLE).await;
    let full_kb = status_kb(pid, "VmRSS")?;
    let hwm_kb = status_kb(pid, "VmHWM")?;
    observer.abort();
    let snap = sim.snapshot();
    let in_bridges: usize = snap
        .bridges
        .iter()
        .filter(|b| b.bridge_type == "mixing")
        .map(|b| b.channels.len())
        .sum();
    if in_bridges != participants {
        return Err(format!(
            "{in_bridges} channels in bridges, expected {participants}"
        ));
    }
    let per_conf_b = confs_kb.saturating_sub(half_kb) as f64 * 1024.0
        / conferences.saturating_sub(half).max(1) as f64;
    let per_part_b = full_kb.saturating_sub(confs_kb) as f64 * 1024.0 / added.max(1) as f64;
    println!(
        "agent-memory: 1 agent (process), in-process ARI simulator, {conferences} conferences, \
         {participants} participants"
    );
    println!(
        "agent RSS idle {:.1} MB; {half} conferences of 1 caller {:.1} MB; {conferences} \
         conferences of 1 caller {:.1} MB; {participants} callers {:.1} MB (peak {:.1} MB)",
        mb(idle_kb),
        mb(half_kb),
        mb(confs_kb),
        mb(full_kb),
        mb(hwm_kb)
    );
    println!(
        "{per_conf_b:.0} bytes per conference (with its first caller; second half of the \
         conferences), {per_part_b:.0} bytes per further participant"
    );
    emit(
        "agent_memory",
        &[
            ("conferences", conferences.to_string()),
            ("participants", participants.to_string()),
            ("idle_rss_kb", idle_kb.to_string()),
            ("half_rss_kb", half_kb.to_string()),
            ("confs_rss_kb", confs_kb.to_string()),
            ("full_rss_kb", full_kb.to_string()),
            ("hwm_kb", hwm_kb.to_string()),
            ("bytes_per_conference", format!("{per_conf_b:.0}")),
            ("bytes_per_participant", format!("{per_part_b:.0}")),
        ],
    );
    Ok(())
}

fn capacity(i: u32) -> u32 {
    // 400 .. 1540 for 20 nodes: the largest almost four times the smallest.
    400 + 60 * i
}

/// How placements pick candidates.
#[derive(Clone, Copy, Debug)]
enum Strategy {
    /// confroute's placer: power of two choices on its (stale) view.
    Placer,
    /// Every node in a uniformly random order.
    Uniform,
    /// Every node in a random order weighted by capacity (Efraimidis–Spirakis keys).
    Weighted,
}

/// Places `placements` conferences with `strategy` on a fresh Redis and returns each node's
/// utilisation (conferences hosted / capacity), counted from the conference records.
async fn place(
    strategy: Strategy,
    nodes: u32,
    placers: usize,
    placements: usize,
    refresh_every: usize,
    seed: u64,
) -> Result<Vec<f64>, String> {
    let redis = RedisServer::start().map_err(|e| e.to_string())?;
    let mut cfg = fixtures::single(&redis.url());
    cfg.conference_lease = LONG_LEASE;
    cfg.claim_lease = LONG_LEASE;
    let admin = fixtures::store(&cfg);
    for i in 0..nodes {
        admin
            .register(
                &fixtures::node(&format!("n{i:02}"), capacity(i)),
                LONG_LEASE,
            )
            .await
            .map_err(|e| format!("register n{i:02}: {e}"))?;
    }
    let mut tasks = Vec::new();
    for p in 0..placers.max(1) {
        let store = fixtures::store(&cfg);
        let mine = placements / placers.max(1) + usize::from(p < placements % placers.max(1));
        tasks.push(tokio::spawn(async move {
            let mut placer = Placer::new(None, Some(seed.wrapping_mul(31) + p as u64 + 1));
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(131) + p as u64);
            let mut all: Vec<(NodeId, u32)> = Vec::new();
            for k in 0..mine {
                if k % refresh_every.max(1) == 0 {
                    let view = store
                        .list_nodes()
                        .await
                        .map_err(|e| format!("list nodes: {e}"))?;
                    all = view
                        .iter()
                        .map(|n| (n.info.id.clone(), n.info.capacity))
                        .collect();
                    placer.refresh(&view);
                }
                let candidates: Vec<NodeId> = match strategy {
                    Strategy::Placer => placer.candidates(4).map_err(|e| format!("placer: {e}"))?,
                    Strategy::Uniform => {
                        let mut keyed: Vec<(f64, &NodeId)> = all
                            .iter()
                            .map(|(id, _)| (rng.random::<f64>(), id))
                            .collect();
                        keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
                        keyed.into_iter().map(|(_, id)| id.clone()).collect()
                    }
                    Strategy::Weighted => {
                        let mut keyed: Vec<(f64, &NodeId)> = all
                            .iter()
                            .map(|(id, cap)| {
                                let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                                (u.powf(1.0 / f64::from((*cap).max(1))), id)
                            })
                            .collect();
                        keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
                        keyed.into_iter().map(|(_, id)| id.clone()).collect()
                    }
                };
                let name = ConferenceName::parse(&format!("p{p}-{k}"))
                    .map_err(|e| format!("conference name: {e}"))?;
                let claim = store
                    .claim(&name, &candidates)
                    .await
                    .map_err(|e| format!("claim {name}: {e}"))?;
                if claim.kind != ClaimKind::Claimed {
                    return Err(format!("{name}: {:?}", claim.kind));
                }
                let owner = claim
                    .owner
                    .ok_or_else(|| format!("{name}: claimed without an owner"))?
                    .node;
                if let Strategy::Placer = strategy {
                    for skipped in candidates.iter().take(claim.skipped) {
                        placer.unavailable(skipped);
                    }
                    placer.placed(&owner);
                }
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| format!("placer task failed: {e}"))??;
    }
    // Count owners from the conference records themselves, not from the node counters.
    let mut per_node: HashMap<String, u32> = HashMap::new();
    let mut after = None;
    loop {
        let page = admin
            .list_conferences(after.as_deref(), 1000)
            .await
            .map_err(|e| format!("list conferences: {e}"))?;
        for (_, rec) in &page.items {
            *per_node.entry(rec.owner.node.to_string()).or_default() += 1;
        }
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let total: u32 = per_node.values().sum();
    if total as usize != placements {
        return Err(format!(
            "{strategy:?}: {total} conferences in Redis, expected {placements}"
        ));
    }
    let listed = admin
        .list_nodes()
        .await
        .map_err(|e| format!("list nodes: {e}"))?;
    Ok(listed
        .iter()
        .map(|n| {
            let hosted = per_node.get(n.info.id.as_str()).copied().unwrap_or(0);
            f64::from(hosted) / f64::from(n.info.capacity.max(1))
        })
        .collect())
}

/// (max, mean, max/mean) of the utilisations.
fn balance(u: &[f64]) -> (f64, f64, f64) {
    let mean = u.iter().sum::<f64>() / u.len().max(1) as f64;
    let max = u.iter().copied().fold(0.0, f64::max);
    (max, mean, if mean > 0.0 { max / mean } else { f64::NAN })
}

async fn placement(
    nodes: u32,
    placers: usize,
    placements: usize,
    refresh_every: usize,
    seed: u64,
) -> Result<(), String> {
    require_tool("redis-server", "redis-server").map_err(|e| e.to_string())?;
    println!(
        "placement: {placements} conferences on {nodes} nodes (capacity {} .. {}), {placers} \
         placers, views refreshed every {refresh_every} placements, seed {seed}",
        capacity(0),
        capacity(nodes.saturating_sub(1))
    );
    let mut fields = vec![
        ("nodes", nodes.to_string()),
        ("placers", placers.to_string()),
        ("placements", placements.to_string()),
    ];
    for (strategy, key) in [
        (Strategy::Placer, "placer"),
        (Strategy::Weighted, "weighted"),
        (Strategy::Uniform, "uniform"),
    ] {
        let u = place(strategy, nodes, placers, placements, refresh_every, seed).await?;
        let (max, mean, ratio) = balance(&u);
        println!(
            "{:<9} utilisation mean {mean:.3} max {max:.3} max/mean {ratio:.3}",
            key
        );
        fields.push((key, format!("{ratio:.3}")));
    }
    emit("placement", &fields);
    Ok(())
}

async fn rehome(short: bool) -> Result<(), String> {
    let length = if short { Length::Short } else { Length::Full };
    let common = Common::new(length);
    let spec = node_kill::load(&common);
    let report = chaos::run("node-kill", common)
        .await
        .map_err(|e| format!("node-kill scenario: {e}"))?;
    print!("{report}");
    let missed = chaos::missed_goals("node-kill", &report);
    for m in &missed {
        println!("goal missed: {m}");
    }
    let recovery_ms = |needle: &str| {
        report
            .recovery
            .iter()
            .find(|r| r.what.contains(needle))
            .and_then(|r| r.took)
            .map(|d| d.as_millis().to_string())
            .unwrap_or_else(|| "none".into())
    };
    let worst = report.value("rehome_worst_ms");
    emit(
        "rehome",
        &[
            ("length", if short { "short" } else { "full" }.to_string()),
            (
                "worst_ms",
                if worst.is_finite() {
                    format!("{worst:.0}")
                } else {
                    "none".into()
                },
            ),
            ("redis_ms", recovery_ms("claim re-homed")),
            ("join_ms", recovery_ms("first caller in a bridge")),
            ("lease_ms", node_kill::LEASE.as_millis().to_string()),
            (
                "allowed_ms",
                format!("{:.0}", report.value("rehome_allowed_ms")),
            ),
            (
                "call_interval_ms",
                spec.per_conference_interval().as_millis().to_string(),
            ),
            (
                "conferences",
                report
                    .figures
                    .iter()
                    .find(|(k, _)| k == "conferences on the killed node")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(|| "?".into()),
            ),
            ("double_homes", report.double_homes.to_string()),
            ("goals_missed", missed.len().to_string()),
        ],
    );
    // A missed time goal is a figure for the table; two homes at once break invariant 1,
    // which no figure makes up for.
    if report.double_homes > 0 {
        return Err(format!(
            "{} conference(s) had two homes at once (invariant 1)",
            report.double_homes
        ));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.what {
        What::ControllerMemory {
            conferences,
            nodes,
            concurrency,
        } => controller_memory(conferences, nodes, concurrency).await,
        What::AgentMemory {
            conferences,
            participants,
            concurrency,
        } => agent_memory(conferences, participants, concurrency).await,
        What::Placement {
            nodes,
            placers,
            placements,
            refresh_every,
            seed,
        } => placement(nodes, placers, placements, refresh_every, seed).await,
        What::Rehome { short } => rehome(short).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-scale: {e}");
            ExitCode::FAILURE
        }
    }
}
