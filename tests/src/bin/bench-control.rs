//! `bench-control`: call-control round trips and conference-event fan-out.
//!
//! Starts a private Redis (harness), a `confroute-controller` and a `confroute-node` process,
//! the node beside an in-process ARI simulator with callers in one conference. Then:
//!
//! 1. Command round trip: JSON-RPC clients on the controller toggle `participant.mute` /
//!    `participant.unmute`; each command goes controller → Redis → owning node → ARI
//!    (`POST`/`DELETE /channels/{id}/mute`) → node → Redis → controller → client. Timed at
//!    the client, one client alone and then many at once.
//! 2. Fan-out: WebSocket clients subscribe to the conference on the controller; the
//!    simulated callers put their calls on hold and take them off (`ChannelHold`), each a
//!    `hold`/`unhold` event the node publishes and the controller forwards to every
//!    subscriber. The driver stays at most `--window` events ahead of the slowest
//!    subscriber, so the rate is what the path sustains without dropping.
//!
//! `cargo build --release --workspace --bins && target/release/bench-control`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use confroute_tests::ari_sim::{AriSim, DialIn, SimConfig};
use confroute_tests::fixtures;
use confroute_tests::harness::{ControllerProc, NodeProc, RedisServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Measures command round trips and event fan-out through a controller and a node agent.
#[derive(Debug, Parser)]
#[command(name = "bench-control")]
struct Args {
    /// Commands per round-trip measurement.
    #[arg(long, default_value_t = 2000)]
    commands: usize,
    /// Concurrent clients in the second round-trip measurement.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Subscribed WebSocket clients for the fan-out.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Events in the fan-out measurement.
    #[arg(long, default_value_t = 20000)]
    events: u64,
    /// Most events the driver may be ahead of the slowest subscriber.
    #[arg(long, default_value_t = 1000)]
    window: u64,
    /// Callers in the conference (the fan-out toggles their hold).
    #[arg(long, default_value_t = 20)]
    callers: usize,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(port: u16) -> Result<Ws, String> {
    let url = format!("ws://127.0.0.1:{port}/v1/rpc");
    tokio_tungstenite::connect_async(url.as_str())
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| format!("connecting {url}: {e}"))
}

/// Sends one request and waits for its answer (other messages are skipped).
async fn rpc(ws: &mut Ws, id: u64, method: &str, params: Value) -> Result<Value, String> {
    let req = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id});
    ws.send(Message::Text(req.to_string().into()))
        .await
        .map_err(|e| format!("send: {e}"))?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .map_err(|_| format!("no answer to {method} in 10 s"))?
            .ok_or("connection closed")?
            .map_err(|e| e.to_string())?;
        let Message::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
        if v.get("id") == Some(&json!(id)) {
            if let Some(e) = v.get("error") {
                return Err(format!("{method}: {e}"));
            }
            return Ok(v);
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

struct Latency {
    label: String,
    commands: usize,
    secs: f64,
    lat: Vec<Duration>,
}

/// `clients` clients share `total` mute/unmute commands, each on its own participant.
async fn round_trips(
    port: u16,
    participants: &[String],
    clients: usize,
    total: usize,
) -> Result<Latency, String> {
    let per = total.div_ceil(clients.max(1));
    let mut conns = Vec::new();
    for _ in 0..clients.max(1) {
        conns.push(connect(port).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut ws) in conns.into_iter().enumerate() {
        let who = participants[i % participants.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for n in 0..per {
                let method = if n % 2 == 0 {
                    "participant.mute"
                } else {
                    "participant.unmute"
                };
                let t = Instant::now();
                rpc(
                    &mut ws,
                    n as u64 + 1,
                    method,
                    json!({"conference": "bench-1", "participant": who}),
                )
                .await?;
                lat.push(t.elapsed());
            }
            Ok::<_, String>(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.map_err(|e| e.to_string())??);
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    Ok(Latency {
        label: format!(
            "mute/unmute, {} client{}",
            clients,
            if clients == 1 { "" } else { "s" }
        ),
        commands: lat.len(),
        secs,
        lat,
    })
}

struct FanOut {
    events: u64,
    secs: f64,
    delivered: u64,
    lost: u64,
    out_of_order: u64,
}

async fn fan_out(
    port: u16,
    sim: &AriSim,
    callers: &[String],
    subscribers: usize,
    events: u64,
    window: u64,
) -> Result<FanOut, String> {
    let counts: Arc<Vec<AtomicU64>> =
        Arc::new((0..subscribers).map(|_| AtomicU64::new(0)).collect());
    let lost = Arc::new(AtomicU64::new(0));
    let disorder = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for i in 0..subscribers {
        let mut ws = connect(port).await?;
        rpc(&mut ws, 1, "subscribe", json!({"conference": "bench-1"})).await?;
        let (counts, lost, disorder) = (counts.clone(), lost.clone(), disorder.clone());
        readers.push(tokio::spawn(async move {
            let mut last_seq = 0u64;
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(t) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                    continue;
                };
                match v["method"].as_str() {
                    Some("event") => {
                        let seq = v["params"]["seq"].as_u64().unwrap_or(0);
                        if seq <= last_seq {
                            disorder.fetch_add(1, Ordering::Relaxed);
                        }
                        last_seq = seq;
                        counts[i].fetch_add(1, Ordering::Relaxed);
                    }
                    Some("events.lost") => {
                        let n = v["params"]["count"].as_u64().unwrap_or(0);
                        lost.fetch_add(n, Ordering::Relaxed);
                        counts[i].fetch_add(n, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        }));
    }
    let slowest = |counts: &[AtomicU64]| {
        counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    };
    let mut held = vec![false; callers.len()];
    let started = Instant::now();
    for n in 0..events {
        while n >= slowest(&counts) + window {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let i = (n as usize) % callers.len();
        held[i] = !held[i];
        sim.caller_hold(&callers[i], held[i])
            .await
            .map_err(|e| e.to_string())?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while slowest(&counts) < events {
        if Instant::now() > deadline {
            return Err(format!(
                "subscribers got {} of {events} events after 60 s",
                slowest(&counts)
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    for r in readers {
        r.abort();
    }
    let delivered: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    Ok(FanOut {
        events,
        secs,
        delivered: delivered - lost.load(Ordering::Relaxed),
        lost: lost.load(Ordering::Relaxed),
        out_of_order: disorder.load(Ordering::Relaxed),
    })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("bench-control: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start().map_err(|e| e.to_string())?;
    let cfg = fixtures::single(&redis.url());
    let sim = AriSim::start(SimConfig {
        username: "confroute".into(),
        password: "bench-password".into(),
        channelvars: vec!["CONFROUTE_CONFERENCE".into()],
        record_events: false,
        record_requests: false,
        ..SimConfig::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut env = fixtures::redis_env(&cfg);
    for (k, v) in [
        ("CONFROUTE_ARI__URL", sim.base_url()),
        ("CONFROUTE_ARI__USERNAME", sim.username().to_string()),
        ("CONFROUTE_ARI__PASSWORD", sim.password().to_string()),
        ("CONFROUTE_CONFERENCE__BEEP", "false".to_string()),
    ] {
        env.push((k.to_string(), v));
    }
    let mut node = NodeProc::start("bench-node", &env).map_err(|e| e.to_string())?;
    tokio::task::block_in_place(|| {
        node.wait_log("command bus subscribed", Duration::from_secs(20))
    })
    .map_err(|e| e.to_string())?;
    let mut ctl_env = fixtures::redis_env(&cfg);
    for (k, v) in [
        ("CONFROUTE_RPC__RATE_LIMIT", "1000000"),
        ("CONFROUTE_RPC__BURST", "1000000"),
        ("CONFROUTE_RPC__MAX_SUBSCRIPTIONS", "10"),
    ] {
        ctl_env.push((k.to_string(), v.to_string()));
    }
    let controller = ControllerProc::start(&ctl_env).map_err(|e| e.to_string())?;
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
    let mut callers = Vec::new();
    for i in 0..args.callers.max(1) {
        let id = format!("caller-{i}");
        sim.dial_in(DialIn {
            app: "confroute".into(),
            args: vec!["bench-1".into()],
            channel_id: Some(id.clone()),
            ..DialIn::default()
        })
        .await
        .map_err(|e| format!("dial-in: {e}"))?;
        callers.push(id);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !callers.iter().all(|c| {
        sim.snapshot()
            .channel(c)
            .is_some_and(|ch| ch.bridge.is_some())
    }) {
        if Instant::now() > deadline {
            return Err("callers never joined".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The controller must see the node before it can route commands to it.
    let port = controller.http_port;
    let mut ws = connect(port).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        if rpc(
            &mut ws,
            n,
            "participant.list",
            json!({"conference": "bench-1"}),
        )
        .await
        .is_ok()
        {
            break;
        }
        if Instant::now() > deadline {
            return Err("the controller cannot reach the node".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(ws);

    // Warm-up (connections, JIT-free but caches and pools).
    round_trips(port, &callers, 4, 200).await?;
    let one = round_trips(port, &callers, 1, args.commands).await?;
    let many = round_trips(port, &callers, args.clients, args.commands).await?;
    let fan = fan_out(
        port,
        &sim,
        &callers,
        args.subscribers,
        args.events,
        args.window,
    )
    .await?;

    println!(
        "bench-control: 1 controller and 1 node agent (processes), in-process ARI simulator, private Redis; {} callers in the conference",
        callers.len()
    );
    println!();
    println!("command round trip (client -> controller -> Redis -> node -> ARI -> node -> Redis -> controller -> client)");
    println!(
        "{:<28} {:>9} {:>11} {:>9} {:>9} {:>9}",
        "load", "commands", "commands/s", "p50 ms", "p99 ms", "max ms"
    );
    for r in [&one, &many] {
        println!(
            "{:<28} {:>9} {:>11.0} {:>9.2} {:>9.2} {:>9.2}",
            r.label,
            r.commands,
            r.commands as f64 / r.secs,
            pct(&r.lat, 0.50),
            pct(&r.lat, 0.99),
            r.lat
                .last()
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(0.0)
        );
    }
    println!();
    println!(
        "event fan-out (ChannelHold -> node -> Redis -> controller -> {} WebSocket subscribers, driver at most {} events ahead)",
        args.subscribers, args.window
    );
    println!(
        "{:<12} {:>9} {:>10} {:>14} {:>8} {:>13}",
        "subscribers", "events", "events/s", "deliveries/s", "lost", "out of order"
    );
    println!(
        "{:<12} {:>9} {:>10.0} {:>14.0} {:>8} {:>13}",
        args.subscribers,
        fan.events,
        fan.events as f64 / fan.secs,
        fan.delivered as f64 / fan.secs,
        fan.lost,
        fan.out_of_order
    );
    Ok(())
}
