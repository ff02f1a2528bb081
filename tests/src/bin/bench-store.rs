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
use confroute_tests::harness::{require_tool, run_with_input, RedisServer};

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

/// Where `redis-benchmark` measures the reference: the same server (and database, and
/// credentials) the store runs against.
struct Target {
    host: String,
    port: u16,
    user: Option<String>,
    password: Option<String>,
    db: u32,
}

impl Target {
    /// The parts of a `redis://` URL `redis-benchmark` needs; an error for one it cannot
    /// reach the same way (TLS, a Unix socket).
    fn from_url(url: &str) -> Result<Target, String> {
        let u = reqwest::Url::parse(url).map_err(|e| format!("--redis-url `{url}`: {e}"))?;
        if u.scheme() != "redis" {
            return Err(format!(
                "--redis-url `{url}`: only redis:// is measured (redis-benchmark is started without TLS)"
            ));
        }
        let host = u
            .host_str()
            .ok_or_else(|| format!("--redis-url `{url}` names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let db = match u.path().trim_start_matches('/') {
            "" => 0,
            d => d
                .parse()
                .map_err(|_| format!("--redis-url `{url}`: database `{d}` is not a number"))?,
        };
        Ok(Target {
            host,
            port: u.port().unwrap_or(6379),
            user: Some(u.username())
                .filter(|n| !n.is_empty())
                .map(percent_decode),
            password: u.password().map(percent_decode),
            db,
        })
    }
}

/// `%XX` escapes of a URL's user or password, decoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Longest a `redis-benchmark` run may take before it is killed and its figure left out.
const REDIS_BENCHMARK_LIMIT: Duration = Duration::from_secs(300);

fn redis_benchmark_get(target: &Target, clients: usize, requests: usize) -> Option<f64> {
    let mut cmd = std::process::Command::new("redis-benchmark");
    cmd.args(["-h", &target.host, "-p", &target.port.to_string()])
        .args(["--dbnum", &target.db.to_string()]);
    // redis-benchmark reads no password from the environment, and `--user` needs `-a`.
    if let Some(password) = &target.password {
        cmd.args(["-a", password]);
        if let Some(user) = &target.user {
            cmd.args(["--user", user]);
        }
    }
    cmd.args([
        "-t",
        "get",
        "-c",
        &clients.to_string(),
        "-n",
        &requests.to_string(),
    ])
    .args(["-q", "--csv"]);
    // redis-benchmark has no timeout of its own: a Redis that stops answering would hang the run.
    let out = match run_with_input(cmd, b"", REDIS_BENCHMARK_LIMIT) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("redis-benchmark: {e}");
            return None;
        }
    };
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
    let url = match &args.redis_url {
        Some(u) => u.clone(),
        None => match RedisServer::start() {
            Ok(r) => {
                private = r;
                private.url()
            }
            Err(e) => {
                eprintln!("{e}");
                return std::process::ExitCode::FAILURE;
            }
        },
    };
    let target = match Target::from_url(&url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
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
        let get = redis_benchmark_get(&target, c, args.requests);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference is measured on the server, database and account the store uses.
    #[test]
    fn the_reference_targets_the_stores_own_redis() {
        let t = Target::from_url("redis://bench:p%40ss@10.0.0.7:6380/3").expect("url");
        assert_eq!((t.host.as_str(), t.port, t.db), ("10.0.0.7", 6380, 3));
        assert_eq!(t.user.as_deref(), Some("bench"));
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        let t = Target::from_url("redis://[::1]/").expect("url");
        assert_eq!((t.host.as_str(), t.port, t.db), ("::1", 6379, 0));
        assert!(t.user.is_none() && t.password.is_none());
        assert!(Target::from_url("rediss://10.0.0.7:6380").is_err());
        assert!(Target::from_url("redis://10.0.0.7/x").is_err());
    }
}
