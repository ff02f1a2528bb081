//! `ari-sim-bench`: how many channel joins per second the ARI simulator sustains.
//!
//! Starts `--servers` simulated Asterisks in this process. Against each, an ARI client (one
//! events WebSocket, REST over HTTP) runs `--concurrency` join loops; a join is a caller dialling
//! in, `StasisStart`, answer, `addChannel` to a mixing bridge and `ChannelEnteredBridge`.
//! Prints joins per second and join latency percentiles.
//!
//! `cargo run --release -p confroute-tests --bin ari-sim-bench -- --servers 3 --joins 30000`

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use confroute_tests::ari_sim::{AriSim, DialIn, SimConfig};
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

/// Measures the ARI simulator's channel joins per second.
#[derive(Debug, Parser)]
#[command(name = "ari-sim-bench")]
struct Args {
    /// Simulated Asterisk servers in this process.
    #[arg(long, default_value_t = 3)]
    servers: usize,
    /// Joins in total, spread evenly over the servers.
    #[arg(long, default_value_t = 30_000)]
    joins: usize,
    /// Concurrent join loops per server.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Members per conference bridge.
    #[arg(long, default_value_t = 50)]
    members: usize,
}

type Waiters = Arc<Mutex<HashMap<(String, &'static str), oneshot::Sender<()>>>>;

fn lock(
    w: &Waiters,
) -> std::sync::MutexGuard<'_, HashMap<(String, &'static str), oneshot::Sender<()>>> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// Routes `StasisStart` and `ChannelEnteredBridge` to the join waiting for them.
async fn read_events(
    url: String,
    waiters: Waiters,
    ready: oneshot::Sender<()>,
) -> Result<(), String> {
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
        let stage = match ev.get("type").and_then(|t| t.as_str()) {
            Some("StasisStart") => "start",
            Some("ChannelEnteredBridge") => "entered",
            _ => continue,
        };
        let Some(id) = ev.pointer("/channel/id").and_then(|v| v.as_str()) else {
            continue;
        };
        if let Some(tx) = lock(&waiters).remove(&(id.to_string(), stage)) {
            let _ = tx.send(());
        }
    }
    Ok(())
}

async fn wait(rx: oneshot::Receiver<()>, what: &str) -> Result<(), String> {
    tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .map_err(|_| format!("timed out waiting for {what}"))?
        .map_err(|_| format!("event reader stopped before {what}"))
}

async fn post(http: &reqwest::Client, sim: &AriSim, path: &str) -> Result<(), String> {
    let resp = http
        .post(format!("{}{path}", sim.ari_url()))
        .basic_auth(sim.username(), Some(sim.password()))
        .send()
        .await
        .map_err(|e| format!("POST {path}: {e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("POST {path}: {}", resp.status()))
    }
}

struct Server {
    sim: AriSim,
    waiters: Waiters,
    index: usize,
}

async fn join(
    http: &reqwest::Client,
    s: &Server,
    n: usize,
    members: usize,
) -> Result<Duration, String> {
    let started = Instant::now();
    let id = format!("bench-{}-{n}", s.index);
    let (start_tx, start_rx) = oneshot::channel();
    lock(&s.waiters).insert((id.clone(), "start"), start_tx);
    s.sim
        .dial_in(DialIn {
            app: "bench".into(),
            args: vec![format!("conf-{}", n / members)],
            caller_number: format!("+1555{n:07}"),
            channel_id: Some(id.clone()),
            ..DialIn::default()
        })
        .await
        .map_err(|e| format!("dial-in {id}: {e}"))?;
    wait(start_rx, "StasisStart").await?;
    post(http, &s.sim, &format!("/channels/{id}/answer")).await?;
    let (entered_tx, entered_rx) = oneshot::channel();
    lock(&s.waiters).insert((id.clone(), "entered"), entered_tx);
    post(
        http,
        &s.sim,
        &format!("/bridges/conf-{}/addChannel?channel={id}", n / members),
    )
    .await?;
    wait(entered_rx, "ChannelEnteredBridge").await?;
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("ari-sim-bench: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let servers = args.servers.max(1);
    let per_server = args.joins.div_ceil(servers);
    let members = args.members.max(1);
    let cfg = SimConfig {
        record_events: false,
        record_requests: false,
        ..SimConfig::default()
    };
    let sims = AriSim::start_many(servers, cfg)
        .await
        .map_err(|e| e.to_string())?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()
        .map_err(|e| format!("building HTTP client: {e}"))?;

    let mut prepared = Vec::new();
    for (index, sim) in sims.into_iter().enumerate() {
        let waiters: Waiters = Arc::default();
        let (ready_tx, ready_rx) = oneshot::channel();
        let url = sim.events_url("bench");
        let w = Arc::clone(&waiters);
        tokio::spawn(async move {
            if let Err(e) = read_events(url, w, ready_tx).await {
                eprintln!("ari-sim-bench: {e}");
            }
        });
        wait(ready_rx, "the events WebSocket").await?;
        for c in 0..per_server.div_ceil(members) {
            post(&http, &sim, &format!("/bridges/conf-{c}?type=mixing")).await?;
        }
        prepared.push(Arc::new(Server {
            sim,
            waiters,
            index,
        }));
    }

    println!(
        "ari-sim-bench: {servers} servers, {} joins, {} concurrent per server, {members} members per bridge",
        per_server * servers,
        args.concurrency
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in &prepared {
        let next = Arc::new(AtomicUsize::new(0));
        for _ in 0..args.concurrency.max(1) {
            let s = Arc::clone(s);
            let next = Arc::clone(&next);
            let http = http.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= per_server {
                        return Ok::<_, String>(latencies);
                    }
                    latencies.push(join(&http, &s, n, members).await?);
                }
            }));
        }
    }
    let mut latencies = Vec::new();
    for t in tasks {
        let mut l = t.await.map_err(|e| format!("join loop panicked: {e}"))??;
        latencies.append(&mut l);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies
            .get(i)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    println!(
        "ari-sim-bench: {} joins in {:.2} s: {:.0} joins/s (latency p50 {:.1} ms, p99 {:.1} ms)",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.99),
    );
    for s in prepared {
        let channels = s.sim.snapshot().channels.len();
        if channels != per_server {
            return Err(format!(
                "server {} holds {channels} channels, expected {per_server}",
                s.index
            ));
        }
    }
    // Machine-readable line for `bench/run-all`: a bare ARI join (answer, addChannel).
    println!(
        "BENCH ari_sim servers={servers} joins={} concurrency={} members={members} \
         joins_per_s={:.0} p50_ms={:.2} p99_ms={:.2} ari_per_join=2",
        latencies.len(),
        args.concurrency,
        latencies.len() as f64 / elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.99),
    );
    Ok(())
}
