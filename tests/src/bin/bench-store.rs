//! bench-store: conference lookups and claims per second against a local Redis, side by side
//! with `redis-benchmark -t get` at the same concurrency, in one run.
//!
//! Run: `cargo run --release -p confroute-tests --bin bench-store -- --requests 200000`
//! It starts its own private `redis-server` unless `--redis-url` is given.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use confroute_shared::name::ConferenceName;
use confroute_tests::fixtures;
use confroute_tests::harness::{require_tool, RedisServer};

#[derive(Parser)]
#[command(about = "Store throughput vs raw Redis GET, side by side")]
struct Args {
    /// Use this Redis instead of starting a private one.
    #[arg(long)]
    redis_url: Option<String>,
    /// Concurrency levels (clients for redis-benchmark, tasks for the store).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64,128")]
    concurrency: Vec<usize>,
    /// Requests per measurement.
    #[arg(long, default_value_t = 100_000)]
    requests: usize,
    /// Existing conferences to look up.
    #[arg(long, default_value_t = 10_000)]
    conferences: usize,
}

async fn run_parallel<F, Fut>(concurrency: usize, requests: usize, op: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let op = op.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                op(i).await;
            }
        }));
    }
    for t in tasks {
        if let Err(e) = t.await {
            eprintln!("worker failed: {e}");
        }
    }
    requests as f64 / started.elapsed().as_secs_f64()
}

fn redis_benchmark_get(port: u16, clients: usize, requests: usize) -> Option<f64> {
    let out = std::process::Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-t",
            "get",
            "-c",
            &clients.to_string(),
            "-n",
            &requests.to_string(),
        ])
        .args(["-q", "--csv"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("\"GET\""))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(e) = require_tool("redis-benchmark", "redis-tools") {
        eprintln!("{e}");
        return std::process::ExitCode::FAILURE;
    }
    let private;
    let (url, port) = match &args.redis_url {
        Some(u) => {
            let port = u
                .rsplit(':')
                .next()
                .and_then(|p| p.trim_end_matches('/').parse().ok())
                .unwrap_or(6379);
            (u.clone(), port)
        }
        None => match RedisServer::start() {
            Ok(r) => {
                private = r;
                (private.url(), private.port())
            }
            Err(e) => {
                eprintln!("{e}");
                return std::process::ExitCode::FAILURE;
            }
        },
    };
    // Nobody joins the claimed names: their claims must outlive the run for the lookups and
    // "claim-exist" to find them.
    let store = fixtures::store(&confroute_shared::config::RedisConfig {
        claim_lease: Duration::from_secs(24 * 3600),
        conference_lease: Duration::from_secs(24 * 3600),
        ..fixtures::single(&url)
    });
    for i in 0..8 {
        if let Err(e) = store
            .register(
                &fixtures::node(&format!("bench-{i}"), u32::MAX / 2),
                Duration::from_secs(3600),
            )
            .await
        {
            eprintln!("register: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    let names: Arc<Vec<ConferenceName>> = Arc::new(
        (0..args.conferences)
            .filter_map(|i| ConferenceName::parse(&format!("bench-{i}")).ok())
            .collect(),
    );
    let candidates = Arc::new(vec![fixtures::id("bench-0"), fixtures::id("bench-1")]);
    for n in names.iter() {
        if let Err(e) = store.claim(n, &candidates).await {
            eprintln!("claim: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    println!(
        "{:>11} {:>12} {:>15} {:>12} {:>13} {:>11}",
        "concurrency", "lookup/s", "claim-exist/s", "claim-new/s", "redis GET/s", "lookup/GET"
    );
    // Calls that failed: a rate that counted them would not be a rate of lookups or claims.
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let fail = |ok: bool, failed: &std::sync::atomic::AtomicU64| {
        if !ok {
            failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    };
    for (round, &c) in args.concurrency.iter().enumerate() {
        let (s, n, f) = (store.clone(), names.clone(), failed.clone());
        let lookups = run_parallel(c, args.requests, move |i| {
            let (s, n, f) = (s.clone(), n.clone(), f.clone());
            async move {
                fail(s.lookup(&n[i % n.len()]).await.is_ok(), &f);
            }
        })
        .await;
        let (s, n, cand, f) = (
            store.clone(),
            names.clone(),
            candidates.clone(),
            failed.clone(),
        );
        let existing = run_parallel(c, args.requests / 2, move |i| {
            let (s, n, cand, f) = (s.clone(), n.clone(), cand.clone(), f.clone());
            async move {
                fail(s.claim(&n[i % n.len()], &cand).await.is_ok(), &f);
            }
        })
        .await;
        let (s, cand, f) = (store.clone(), candidates.clone(), failed.clone());
        let fresh = run_parallel(c, args.requests / 2, move |i| {
            let (s, cand, f) = (s.clone(), cand.clone(), f.clone());
            async move {
                if let Ok(name) = ConferenceName::parse(&format!("new-{round}-{i}")) {
                    fail(s.claim(&name, &cand).await.is_ok(), &f);
                }
            }
        })
        .await;
        let get = redis_benchmark_get(port, c, args.requests);
        let ratio = get
            .map(|g| format!("{:.2}x", lookups / g))
            .unwrap_or("-".into());
        println!(
            "{:>11} {:>12.0} {:>15.0} {:>12.0} {:>13} {:>11}",
            c,
            lookups,
            existing,
            fresh,
            get.map(|g| format!("{g:.0}")).unwrap_or("-".into()),
            ratio
        );
        let n = failed.load(std::sync::atomic::Ordering::Relaxed);
        if n > 0 {
            eprintln!("{n} store calls failed at concurrency {c}: the rates above count them and are void");
            return std::process::ExitCode::FAILURE;
        }
    }
    std::process::ExitCode::SUCCESS
}
