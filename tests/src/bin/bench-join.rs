//! `bench-join`: how fast one `confroute-node` agent admits callers.
//!
//! Starts a private Redis (harness), an in-process ARI simulator and the agent as a process
//! beside it. Callers dial in (`Stasis(confroute,conf-N)`); a join is timed from the dial-in
//! (the simulator emits `StasisStart`) to `ChannelEnteredBridge`, seen by an observer app
//! subscribed to everything. The ARI round trips per join come from the simulator's request
//! log. Prints a table: new conferences, then joins into existing ones.
//!
//! `cargo build --release --workspace --bins && cargo run --release -p confroute-tests --bin bench-join`

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use confroute_tests::ari_sim::{AriSim, DialIn, SimConfig};
use confroute_tests::fixtures;
use confroute_tests::harness::{NodeProc, RedisServer};
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

/// Measures join latency and joins per second of one node agent.
#[derive(Debug, Parser)]
#[command(name = "bench-join")]
struct Args {
    /// Joins into existing conferences.
    #[arg(long, default_value_t = 3000)]
    joins: usize,
    /// Conferences (each created by its first caller before the timed joins).
    #[arg(long, default_value_t = 30)]
    conferences: usize,
    /// Concurrent callers.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Beep on entry (TwiML default); off saves one ARI call per join.
    #[arg(long, default_value_t = false)]
    beep: bool,
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Instant>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Routes `ChannelEnteredBridge` to the join waiting for it.
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
        let now = Instant::now();
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
            let _ = tx.send(now);
        }
    }
    Ok(())
}

async fn join(
    sim: &AriSim,
    waiters: &Waiters,
    id: String,
    conf: String,
) -> Result<Duration, String> {
    let (tx, rx) = oneshot::channel();
    lock(waiters).insert(id.clone(), tx);
    let started = Instant::now();
    sim.dial_in(DialIn {
        app: "confroute".into(),
        args: vec![conf],
        channel_id: Some(id.clone()),
        ..DialIn::default()
    })
    .await
    .map_err(|e| format!("dial-in {id}: {e}"))?;
    let entered = tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .map_err(|_| format!("{id} never entered a bridge"))?
        .map_err(|_| "observer stopped".to_string())?;
    Ok(entered.duration_since(started))
}

struct Row {
    phase: &'static str,
    joins: usize,
    secs: f64,
    lat: Vec<Duration>,
    ari: BTreeMap<String, usize>,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn ari_ops(sim: &AriSim) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in sim.request_log() {
        let op = r.operation.unwrap_or_else(|| "?".into());
        if op == "eventWebsocket" {
            continue;
        }
        *out.entry(op).or_default() += 1;
    }
    out
}

async fn run_phase(
    sim: &AriSim,
    waiters: &Waiters,
    phase: &'static str,
    calls: Vec<(String, String)>,
    concurrency: usize,
) -> Result<Row, String> {
    sim.clear_request_log();
    let calls = Arc::new(calls);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (sim, waiters, calls, next) =
            (sim.clone(), waiters.clone(), calls.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((id, conf)) = calls.get(i).cloned() else {
                    return Ok::<_, String>(lat);
                };
                lat.push(join(&sim, &waiters, id, conf).await?);
            }
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.map_err(|e| e.to_string())??);
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    Ok(Row {
        phase,
        joins: calls.len(),
        secs,
        lat,
        ari: ari_ops(sim),
    })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("bench-join: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start().map_err(|e| e.to_string())?;
    let cfg = fixtures::single(&redis.url());
    let channelvars = [
        "CONFROUTE_PROFILE",
        "CONFROUTE_MUTED",
        "CONFROUTE_BEEP",
        "CONFROUTE_START_ON_ENTER",
        "CONFROUTE_END_ON_EXIT",
        "CONFROUTE_MAX_PARTICIPANTS",
        "CONFROUTE_WAIT_MUSIC",
        "CONFROUTE_RECORD",
        "CONFROUTE_STATUS_CALLBACK",
        "CONFROUTE_STATUS_CALLBACK_EVENT",
    ];
    let sim = AriSim::start(SimConfig {
        username: "confroute".into(),
        password: "bench-password".into(),
        channelvars: channelvars.iter().map(|s| s.to_string()).collect(),
        record_events: false,
        record_requests: true,
        ..SimConfig::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let per_conf = args.joins.div_ceil(args.conferences.max(1)) + 1;
    let mut env = fixtures::redis_env(&cfg);
    for (k, v) in [
        ("CONFROUTE_ARI__URL", sim.base_url()),
        ("CONFROUTE_ARI__USERNAME", sim.username().to_string()),
        ("CONFROUTE_ARI__PASSWORD", sim.password().to_string()),
        ("CONFROUTE_CONFERENCE__BEEP", args.beep.to_string()),
        (
            "CONFROUTE_CONFERENCE__MAX_PARTICIPANTS",
            per_conf.max(2).to_string(),
        ),
        (
            "CONFROUTE_NODE__CAPACITY",
            (args.conferences + 10).to_string(),
        ),
    ] {
        env.push((k.to_string(), v));
    }
    let node = NodeProc::start("bench-node", &env).map_err(|e| e.to_string())?;
    let waiters: Waiters = Arc::default();
    let (ready_tx, ready_rx) = oneshot::channel();
    let url = format!("{}&subscribeAll=true", sim.events_url("observer"));
    let w = waiters.clone();
    tokio::spawn(async move {
        if let Err(e) = observe(url, w, ready_tx).await {
            eprintln!("bench-join: {e}");
        }
    });
    let _ = ready_rx.await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sim
        .snapshot()
        .apps
        .iter()
        .any(|a| a.name == "confroute" && a.active)
    {
        if Instant::now() > deadline {
            return Err(format!("agent never connected:\n{}", node.output()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let firsts: Vec<(String, String)> = (0..args.conferences)
        .map(|c| (format!("first-{c}"), format!("conf-{c}")))
        .collect();
    let new_row = run_phase(&sim, &waiters, "new conference", firsts, args.concurrency).await?;
    let joins: Vec<(String, String)> = (0..args.joins)
        .map(|i| {
            (
                format!("join-{i}"),
                format!("conf-{}", i % args.conferences.max(1)),
            )
        })
        .collect();
    let existing_row = run_phase(
        &sim,
        &waiters,
        "existing conference",
        joins,
        args.concurrency,
    )
    .await?;

    println!(
        "bench-join: 1 agent (process), in-process ARI simulator, private Redis; {} concurrent callers, beep {}",
        args.concurrency,
        if args.beep { "on" } else { "off" }
    );
    println!(
        "{:<20} {:>7} {:>10} {:>9} {:>9} {:>9} {:>11}  ARI requests per join",
        "phase", "joins", "joins/s", "p50 ms", "p99 ms", "max ms", "ARI/join"
    );
    for r in [&new_row, &existing_row] {
        let total: usize = r.ari.values().sum();
        let per = total as f64 / r.joins.max(1) as f64;
        let breakdown: Vec<String> = r
            .ari
            .iter()
            .map(|(op, n)| format!("{op} {:.2}", *n as f64 / r.joins.max(1) as f64))
            .collect();
        println!(
            "{:<20} {:>7} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>11.2}  {}",
            r.phase,
            r.joins,
            r.joins as f64 / r.secs,
            pct(&r.lat, 0.50),
            pct(&r.lat, 0.99),
            r.lat
                .last()
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(0.0),
            per,
            breakdown.join(", ")
        );
    }
    let m = fixtures::scrape(&node.http_url()).await;
    let count = fixtures::metric(&m, "confroute_node_join_duration_seconds_count");
    let sum = fixtures::metric(&m, "confroute_node_join_duration_seconds_sum");
    if count > 0.0 {
        println!(
            "agent's own view (confroute_node_join_duration_seconds): {count:.0} joins, mean {:.2} ms",
            sum / count * 1000.0
        );
    }
    // Machine-readable lines for `bench/run-all`.
    for (key, r) in [("new", &new_row), ("existing", &existing_row)] {
        let total: usize = r.ari.values().sum();
        println!(
            "BENCH join phase={key} joins={} concurrency={} beep={} joins_per_s={:.0} \
             p50_ms={:.2} p99_ms={:.2} ari_per_join={:.2}",
            r.joins,
            args.concurrency,
            args.beep,
            r.joins as f64 / r.secs,
            pct(&r.lat, 0.50),
            pct(&r.lat, 0.99),
            total as f64 / r.joins.max(1) as f64,
        );
    }
    Ok(())
}
