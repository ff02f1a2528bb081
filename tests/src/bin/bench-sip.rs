//! bench-sip: the controller's SIP redirect against Kamailio 5.6 doing the same Redis work
//! with `ndb_redis` (`tests/bench/kamailio-redirect.cfg`), in one run on one machine; then
//! `POST /v1/route` against `redis-benchmark -t get` at the same concurrency.
//!
//! For each server and each workload (10,000 existing conferences; a new conference per
//! call) sipp drives INVITE→302→ACK at increasing rates for `--duration` seconds each. A
//! rate is sustained when every call succeeded with no retransmission and sipp kept the
//! rate. Before that ramp both servers take the same fixed rate (`--cpu-rate`) while the CPU time of
//! their processes (utime+stime from `/proc/<pid>/stat`) is read before and after. Latency
//! comes from a probe sending 200 INVITEs/s alongside the load with a microsecond clock
//! (sipp's own counts whole milliseconds). Results are recorded in `docs/BENCHMARKS.md`.
//!
//! Build and run (release):
//!   cargo build --release -p confroute-controller
//!   cargo build --release -p confroute-tests --bin bench-sip
//!   target/release/bench-sip            # full run, about 20 minutes
//!   target/release/bench-sip --quick    # smoke run, about a minute
//!
//! Needs: redis-server, redis-tools (redis-benchmark), sip-tester (sipp), kamailio and
//! kamailio-redis-modules (ndb_redis), all from Debian.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use confroute_shared::name::ConferenceName;
use confroute_tests::fixtures;
use confroute_tests::harness::{
    free_udp_tcp_port, redis_query, require_tool, run_with_input, scenario, ControllerProc,
    KamailioOptions, KamailioProc, Proc, RedisServer, TempDir,
};
use rand::seq::SliceRandom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The claim script the controller runs; Kamailio runs the very same one for new conferences.
const CLAIM_LUA: &str = include_str!("../../../shared/src/store/lua/claim.lua");

/// Conference claims outlive the whole run, so the existing conferences stay existing.
const CONFERENCE_LEASE: Duration = Duration::from_secs(24 * 3600);

/// Process group of the running Kamailio (0: none), for the signal watcher in `main`.
static KAMAILIO_GROUP: AtomicI32 = AtomicI32::new(0);

/// Node ids are `bench-0` .. `bench-<NODES-1>`.
const NODES: usize = 8;

#[derive(Parser)]
#[command(
    about = "SIP redirect: confroute-controller vs Kamailio+ndb_redis, and /v1/route vs redis GET"
)]
struct Args {
    /// Short smoke run: low rates, 5 s steps, fewer HTTP requests.
    #[arg(long)]
    quick: bool,
    /// Existing conferences (claimed before the run).
    #[arg(long, default_value_t = 10_000)]
    conferences: usize,
    /// Seconds per rate step [default: 20, quick: 5].
    #[arg(long)]
    duration: Option<u32>,
    /// Call rates to try, in calls/s, lowest first [default: 2000 to 40000 by 2000;
    /// quick: 1000,2000].
    #[arg(long, value_delimiter = ',')]
    rates: Option<Vec<u32>>,
    /// Common rate for the CPU-per-call measurement [default: 8000; quick: 2000].
    #[arg(long)]
    cpu_rate: Option<u32>,
    /// Kamailio worker processes on its UDP socket.
    #[arg(long, default_value_t = 4)]
    kamailio_children: u32,
    /// Servers to measure.
    #[arg(long, value_delimiter = ',', default_value = "controller,kamailio")]
    servers: Vec<String>,
    /// Workloads to measure.
    #[arg(long, value_delimiter = ',', default_value = "existing,new")]
    workloads: Vec<String>,
    /// Concurrency levels for /v1/route and redis-benchmark [default: 32,64; quick: 32].
    #[arg(long, value_delimiter = ',')]
    http_concurrency: Option<Vec<usize>>,
    /// Requests per HTTP measurement [default: 200000; quick: 20000].
    #[arg(long)]
    http_requests: Option<usize>,
    /// Extra environment for the controller, `NAME=value` (repeatable); for experiments such
    /// as allocator tunables.
    #[arg(long = "controller-env", value_name = "NAME=value")]
    controller_env: Vec<String>,
    /// Skip the SIP part (HTTP only).
    #[arg(long)]
    no_sip: bool,
    /// Skip the HTTP part.
    #[arg(long)]
    no_http: bool,
}

/// One sipp run at one rate.
#[derive(Clone, Debug, Default)]
struct LoadRun {
    rate: u32,
    calls: u64,
    successful: u64,
    failed: u64,
    retransmissions: u64,
    elapsed: f64,
    /// INVITE→302 latency of the probe (microsecond clock), in ms.
    p50_ms: f64,
    p99_ms: f64,
    /// sipp's own 99th percentile (whole milliseconds).
    sipp_p99_ms: f64,
    /// Probe INVITEs sent, and those that got no final answer within 1 s.
    probe_sent: u64,
    probe_lost: u64,
    /// CPU seconds of the server's processes during the run.
    server_cpu: f64,
    /// CPU seconds of Redis during the run.
    redis_cpu: f64,
    /// CPU seconds of sipp (to tell when the load generator is the limit).
    sipp_cpu: f64,
    /// INVITEs/ACKs the kernel dropped on the server's UDP socket (receive buffer full).
    server_drops: u64,
    /// Answers dropped on sipp's UDP socket.
    sipp_drops: u64,
}

impl LoadRun {
    /// Every call succeeded without a retransmission, and sipp kept the rate.
    fn sustained(&self) -> bool {
        let expected = f64::from(self.rate) > 0.0 && self.calls > 0;
        let on_time = self.elapsed <= (self.calls as f64 / f64::from(self.rate)) * 1.05 + 1.0;
        expected
            && self.failed == 0
            && self.retransmissions == 0
            && self.successful == self.calls
            && self.probe_lost == 0
            && on_time
    }

    fn achieved(&self) -> f64 {
        if self.elapsed > 0.0 {
            self.successful as f64 / self.elapsed
        } else {
            0.0
        }
    }

    /// Calls the server answered during the run: sipp's and the probe's.
    fn answered(&self) -> u64 {
        self.successful + self.probe_sent - self.probe_lost
    }

    fn us_per_call(cpu: f64, calls: u64) -> f64 {
        if calls == 0 {
            0.0
        } else {
            cpu * 1e6 / calls as f64
        }
    }

    fn line(&self) -> String {
        let sipp_load = if self.elapsed > 0.0 {
            self.sipp_cpu / self.elapsed * 100.0
        } else {
            0.0
        };
        let verdict = if self.sustained() {
            "sustained"
        } else {
            "NOT sustained"
        };
        format!(
            "rate {:>6}/s  achieved {:>8.0}/s  ok {:>7}/{:<7} failed {:>5} retrans {:>5}  \
             p50 {:>6.2} ms  p99 {:>7.2} ms (sipp p99 {:>4.0} ms, probe lost {})  \
             sipp cpu {sipp_load:>3.0}%  udp drops server {} sipp {}  {verdict}",
            self.rate,
            self.achieved(),
            self.successful,
            self.calls,
            self.failed,
            self.retransmissions,
            self.p50_ms,
            self.p99_ms,
            self.sipp_p99_ms,
            self.probe_lost,
            self.server_drops,
            self.sipp_drops,
        )
    }
}

/// Seconds of CPU (user + system) a process has used, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which may hold spaces and ends with ')'.
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks / if hz > 0 { hz as f64 } else { 100.0 }
}

/// Datagrams the kernel dropped on the UDP sockets bound to `port` (receive buffer full),
/// from the `drops` column of `/proc/net/udp`.
fn udp_drops(port: u16) -> u64 {
    let Ok(table) = std::fs::read_to_string("/proc/net/udp") else {
        return 0;
    };
    let want = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let local = cols.get(1)?;
            local
                .ends_with(&want)
                .then(|| cols.last()?.parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

fn total_cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Epoch seconds at the end of a sipp time field (`date\ttime\tepoch`).
fn epoch_of(field: &str) -> Option<f64> {
    field.split('\t').next_back()?.trim().parse().ok()
}

/// Writes sipp's injection file: one conference name per line.
fn write_names(path: &Path, names: &[String]) -> Result<(), String> {
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut w = BufWriter::new(f);
    let mut write = || -> std::io::Result<()> {
        writeln!(w, "SEQUENTIAL")?;
        for n in names {
            writeln!(w, "{n};")?;
        }
        w.flush()
    };
    write().map_err(|e| format!("{}: {e}", path.display()))
}

/// Latency probe: sipp's response-time clock counts whole milliseconds, so a separate client
/// sends `PROBE_RATE` INVITEs per second alongside the load and times each INVITE→302 in
/// microseconds. Returns the sorted latencies (ms) and how many INVITEs it sent.
const PROBE_RATE: u64 = 200;

fn spawn_probe(
    target: SocketAddr,
    names: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<f64>, u64)> {
    std::thread::spawn(move || {
        let Ok(sock) = std::net::UdpSocket::bind("127.0.0.1:0") else {
            return (Vec::new(), 0);
        };
        let _ = sock.set_read_timeout(Some(Duration::from_millis(1000)));
        let local = sock
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut lat = Vec::new();
        let mut sent = 0u64;
        let tag: u32 = rand::random();
        let every = Duration::from_micros(1_000_000 / PROBE_RATE);
        let mut next = Instant::now();
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now < next {
                std::thread::sleep(next - now);
            }
            next += every;
            let name = &names[(sent as usize) % names.len()];
            let branch = format!("z9hG4bK-probe-{tag:08x}-{sent}");
            let head = format!(
                "sip:{name}@{target} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={branch}\r\n\
                 From: <sip:probe@{local}>;tag=p{tag:08x}\r\nTo: <sip:{name}@{target}>\r\n\
                 Call-ID: probe-{tag:08x}-{sent}@{local}\r\n"
            );
            let invite = format!(
                "INVITE {head}CSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            );
            sent += 1;
            let started = Instant::now();
            if sock.send_to(invite.as_bytes(), target).is_err() {
                continue;
            }
            // Skip provisional answers and stray late answers to earlier probes.
            let final_to = loop {
                let Ok(n) = sock.recv(&mut buf) else {
                    break None;
                };
                let msg = String::from_utf8_lossy(&buf[..n]);
                if !msg.contains(&branch) || msg.starts_with("SIP/2.0 1") {
                    continue;
                }
                break msg
                    .split("\r\n")
                    .find(|l| l.starts_with("To:"))
                    .map(str::to_string);
            };
            let Some(to) = final_to else {
                continue;
            };
            lat.push(started.elapsed().as_secs_f64() * 1000.0);
            let ack = format!(
                "ACK sip:{name}@{target} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={branch}\r\n\
                 From: <sip:probe@{local}>;tag=p{tag:08x}\r\n{to}\r\n\
                 Call-ID: probe-{tag:08x}-{}@{local}\r\nCSeq: 1 ACK\r\nMax-Forwards: 70\r\n\
                 Content-Length: 0\r\n\r\n",
                sent - 1
            );
            let _ = sock.send_to(ack.as_bytes(), target);
        }
        lat.sort_by(f64::total_cmp);
        (lat, sent)
    })
}

/// Runs sipp at `rate` calls/s for `secs` against `target`, names from `names_file`.
fn run_sipp_load(
    target: SocketAddr,
    names_file: &Path,
    probe_names: Arc<Vec<String>>,
    rate: u32,
    secs: u32,
    server_pids: &[u32],
    redis_pid: u32,
) -> Result<LoadRun, String> {
    let dir = TempDir::new("bench-sipp").map_err(|e| e.to_string())?;
    let calls = u64::from(rate) * u64::from(secs);
    let stat = dir.path().join("stat.csv");
    let sipp_port = free_udp_tcp_port();
    let mut cmd = Command::new("sipp");
    cmd.current_dir(dir.path())
        .arg("-sf")
        .arg(scenario("bench_redirect.xml"))
        .arg("-inf")
        .arg(names_file)
        .args(["-i", "127.0.0.1", "-p", &sipp_port.to_string()])
        .args(["-t", "u1", "-r", &rate.to_string(), "-rp", "1000"])
        .args(["-m", &calls.to_string(), "-l", &rate.max(100).to_string()])
        .args(["-recv_timeout", "4000", "-buff_size", "8388608", "-nostdin"])
        .args(["-timeout", &format!("{}s", secs * 3 + 30)])
        .args(["-trace_stat", "-stf"])
        .arg(&stat)
        .args(["-fd", "1", "-trace_rtt", "-rtt_freq", "1000"])
        .args(["-trace_err", "-error_file"])
        .arg(dir.path().join("errors.log"))
        .arg(target.to_string());
    let server_drops_before = udp_drops(target.port());
    let server_before = total_cpu(server_pids);
    let redis_before = cpu_seconds(redis_pid);
    let mut p =
        Proc::spawn("sipp", cmd, &dir.path().join("sipp.out")).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let probe = spawn_probe(target, probe_names, stop.clone());
    let sipp_pid = p.pid().unwrap_or(0);
    // Sample sipp's own CPU just before it exits: a reaped process has no /proc entry.
    let mut sipp_cpu = 0.0;
    let deadline = Instant::now() + Duration::from_secs(u64::from(secs) * 3 + 60);
    let mut sipp_drops_seen = 0;
    while p.is_running() {
        sipp_cpu = cpu_seconds(sipp_pid).max(sipp_cpu);
        sipp_drops_seen = udp_drops(sipp_port).max(sipp_drops_seen);
        if Instant::now() > deadline {
            p.kill();
            return Err(format!("sipp did not finish:\n{}", p.output()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let server_cpu = total_cpu(server_pids) - server_before;
    let server_drops = udp_drops(target.port()).saturating_sub(server_drops_before);
    // sipp's socket is gone once it exits; its drops were sampled while it ran.
    let sipp_drops = sipp_drops_seen;
    let redis_cpu = cpu_seconds(redis_pid) - redis_before;
    stop.store(true, Ordering::Relaxed);
    let (probe_lat, probe_sent) = probe
        .join()
        .map_err(|_| "the latency probe panicked".to_string())?;

    let text = std::fs::read_to_string(&stat)
        .map_err(|e| format!("sipp wrote no statistics ({e}):\n{}", p.output()))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next().unwrap_or("").split(';').collect();
    let last: Vec<&str> = lines.next_back().unwrap_or("").split(';').collect();
    let col = |name: &str| -> Option<&str> {
        let i = header.iter().position(|h| *h == name)?;
        last.get(i).copied()
    };
    let num = |name: &str| {
        col(name)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let elapsed = match (
        col("StartTime").and_then(epoch_of),
        col("CurrentTime").and_then(epoch_of),
    ) {
        (Some(a), Some(b)) => b - a,
        _ => 0.0,
    };

    let mut rtts: Vec<f64> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir.path()) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with("_rtt.csv") {
                let body = std::fs::read_to_string(e.path()).unwrap_or_default();
                rtts.extend(
                    body.lines()
                        .filter_map(|l| l.split(';').nth(1)?.trim().parse::<f64>().ok()),
                );
            }
        }
    }
    rtts.sort_by(f64::total_cmp);
    Ok(LoadRun {
        rate,
        calls,
        successful: num("SuccessfulCall(C)"),
        failed: num("FailedCall(C)"),
        retransmissions: num("Retransmissions(C)"),
        elapsed,
        p50_ms: percentile(&probe_lat, 0.50),
        p99_ms: percentile(&probe_lat, 0.99),
        sipp_p99_ms: percentile(&rtts, 0.99),
        probe_sent,
        probe_lost: probe_sent.saturating_sub(probe_lat.len() as u64),
        server_cpu,
        redis_cpu,
        sipp_cpu,
        server_drops,
        sipp_drops,
    })
}

/// A server under test.
struct Server {
    name: &'static str,
    addr: SocketAddr,
    pids: Vec<u32>,
}

/// Results of one server on one workload.
#[derive(Default)]
struct Outcome {
    best: Option<LoadRun>,
    first_failure: Option<LoadRun>,
    fixed: Option<LoadRun>,
    /// Every sustained step of the ramp as (rate, probe p99 in ms), lowest rate first.
    sustained: Vec<(u32, f64)>,
}

struct Plan {
    secs: u32,
    rates: Vec<u32>,
    cpu_rate: u32,
}

/// Names for one run: the existing conferences shuffled, or fresh ones.
fn names_for(workload: &str, existing: &[String], tag: &str, count: u64) -> Vec<String> {
    if workload == "existing" {
        let mut v = existing.to_vec();
        v.shuffle(&mut rand::rng());
        v
    } else {
        (0..count).map(|i| format!("n{tag}-{i}")).collect()
    }
}

/// Names for the latency probe: the same kind of conference as the load.
fn probe_names(workload: &str, existing: &[String], tag: &str, plan: &Plan) -> Arc<Vec<String>> {
    let count = PROBE_RATE * u64::from(plan.secs) * 3;
    Arc::new(names_for(workload, existing, &format!("p{tag}"), count))
}

fn measure(
    server: &Server,
    workload: &str,
    existing: &[String],
    plan: &Plan,
    redis_pid: u32,
    redis_port: u16,
    dir: &Path,
) -> Result<Outcome, String> {
    let mut out = Outcome::default();
    let names_file = dir.join(format!("{}-{workload}.csv", server.name));
    // The common rate first, on a server no step has overloaded yet: right after the
    // ramp's failed steps a server still pays for what the overload left behind (the
    // controller: 60.7 µs per call there against 42.7 on a fresh one, 2026-12-07).
    let calls = u64::from(plan.cpu_rate) * u64::from(plan.secs);
    let names = names_for(workload, existing, &format!("{}cpu", server.name), calls);
    write_names(&names_file, &names)?;
    let probe = probe_names(workload, existing, &format!("{}cpu", server.name), plan);
    let run = run_sipp_load(
        server.addr,
        &names_file,
        probe,
        plan.cpu_rate,
        plan.secs,
        &server.pids,
        redis_pid,
    )?;
    // The 302s must have come from real claims: every name of the run has an owner now.
    let sample: Vec<&String> = names.iter().step_by((names.len() / 200).max(1)).collect();
    let unowned = sample
        .iter()
        .filter(|n| {
            let owner: Option<String> = redis_query(
                redis_port,
                redis::cmd("HGET")
                    .arg(format!("{{confroute}}:conf:{n}"))
                    .arg("owner"),
            );
            owner.is_none()
        })
        .count();
    if unowned > 0 {
        println!(
            "  WARNING {} / {workload}: {unowned} of {} sampled conferences have no owner in Redis",
            server.name,
            sample.len()
        );
    }
    println!(
        "  {:<10} {:<8} {}  cpu {:.1} us/call (redis {:.1} us/call)",
        server.name,
        workload,
        run.line(),
        LoadRun::us_per_call(run.server_cpu, run.answered()),
        LoadRun::us_per_call(run.redis_cpu, run.answered())
    );
    out.fixed = Some(run);
    let mut step = 0;
    let mut retried = false;
    let mut pending: Vec<u32> = plan.rates.iter().rev().copied().collect();
    while let Some(rate) = pending.pop() {
        step += 1;
        let calls = u64::from(rate) * u64::from(plan.secs);
        let names = names_for(
            workload,
            existing,
            &format!("{}{step}r{rate}", server.name),
            calls,
        );
        write_names(&names_file, &names)?;
        let probe = probe_names(workload, existing, &format!("{}{step}", server.name), plan);
        let run = run_sipp_load(
            server.addr,
            &names_file,
            probe,
            rate,
            plan.secs,
            &server.pids,
            redis_pid,
        )?;
        println!("  {:<10} {:<8} {}", server.name, workload, run.line());
        if run.sustained() {
            out.sustained.push((run.rate, run.p99_ms));
            out.best = Some(run);
            retried = false;
        } else if !retried {
            // Both servers share two cores with sipp and Redis: one noisy step gets a second
            // chance, for either server alike.
            retried = true;
            pending.push(rate);
            continue;
        } else {
            out.first_failure = Some(run);
            break;
        }
    }
    Ok(out)
}

/// What the HTTP client asks for.
#[derive(Clone)]
enum HttpLoad {
    /// `POST /v1/route` for these conferences in turn.
    Route(Arc<Vec<String>>),
    /// `GET /healthz`: the HTTP stack alone, no Redis; the floor of any API request.
    Healthz,
}

impl HttpLoad {
    fn request(&self, i: u64) -> String {
        match self {
            HttpLoad::Route(names) => {
                let body = format!("{{\"conference\":\"{}\"}}", names[i as usize % names.len()]);
                format!(
                    "POST /v1/route HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            }
            HttpLoad::Healthz => "GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n".to_string(),
        }
    }
}

/// A minimal HTTP/1.1 keep-alive client: one request after another on one connection.
async fn http_worker(
    addr: SocketAddr,
    load: HttpLoad,
    next: Arc<AtomicU64>,
    total: u64,
    errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    conn.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total || stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let req = load.request(i);
        conn.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        // Read one response: headers, then Content-Length bytes of body.
        let mut have = 0usize;
        let (head_end, content_length) = loop {
            let n = conn
                .read(&mut buf[have..])
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("server closed the connection".into());
            }
            have += n;
            if let Some(end) = find(&buf[..have], b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                if !head.starts_with("http/1.1 200") {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (end + 4, len);
            }
            if have == buf.len() {
                return Err("response header too large".into());
            }
        };
        let mut body_have = have - head_end;
        while body_have < content_length {
            let n = conn
                .read(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("server closed the connection mid-body".into());
            }
            body_have += n;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Requests per second of `load` with `concurrency` connections, generated on one thread of
/// its own as `redis-benchmark` generates its load, so that the client takes no more of the
/// shared cores in one measurement than in the other.
async fn http_rate(
    addr: SocketAddr,
    load: HttpLoad,
    concurrency: usize,
    requests: u64,
) -> Result<(f64, u64), String> {
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("HTTP load runtime: {e}"))?
            .block_on(http_rate_here(addr, load, concurrency, requests))
    })
    .await
    .map_err(|e| format!("HTTP load thread: {e}"))?
}

async fn http_rate_here(
    addr: SocketAddr,
    load: HttpLoad,
    concurrency: usize,
    requests: u64,
) -> Result<(f64, u64), String> {
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        tasks.push(tokio::spawn(http_worker(
            addr,
            load.clone(),
            next.clone(),
            requests,
            errors.clone(),
            stop.clone(),
        )));
    }
    let mut failure = None;
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                stop.store(true, Ordering::Relaxed);
                failure.get_or_insert(e);
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                failure.get_or_insert(e.to_string());
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    // Only answers that were 200 count: a server answering errors fast is not fast.
    let errors = errors.load(Ordering::Relaxed);
    Ok((
        requests.saturating_sub(errors) as f64 / started.elapsed().as_secs_f64(),
        errors,
    ))
}

/// Longest a `redis-benchmark` run may take before it is killed and its figure left out.
const REDIS_BENCHMARK_LIMIT: Duration = Duration::from_secs(300);

fn redis_benchmark_get(port: u16, clients: usize, requests: usize) -> Option<f64> {
    let mut cmd = Command::new("redis-benchmark");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", "get", "-c", &clients.to_string()])
        .args(["-n", &requests.to_string(), "-q", "--csv"]);
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

fn fmt_rate(r: Option<&LoadRun>) -> String {
    r.map(|r| format!("{}", r.rate))
        .unwrap_or_else(|| "-".into())
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.2}"),
        _ => "-".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

async fn setup_store(redis: &RedisServer, conferences: usize) -> Result<Vec<String>, String> {
    let mut cfg = fixtures::single(&redis.url());
    cfg.conference_lease = CONFERENCE_LEASE;
    // Nobody joins the benchmark's conferences: their claims must outlive the run as well.
    cfg.claim_lease = CONFERENCE_LEASE;
    let store = fixtures::store(&cfg);
    for i in 0..NODES {
        let mut info = fixtures::node(&format!("bench-{i}"), u32::MAX / 2);
        info.sip_uri = format!("sip:10.0.1.{}:5060;transport=udp", i + 1);
        store
            .register(&info, Duration::from_secs(24 * 3600))
            .await
            .map_err(|e| format!("register bench-{i}: {e}"))?;
    }
    let all: Vec<_> = (0..NODES)
        .map(|i| fixtures::id(&format!("bench-{i}")))
        .collect();
    let mut names = Vec::with_capacity(conferences);
    for i in 0..conferences {
        let name = format!("conf-{i}");
        let parsed = ConferenceName::parse(&name).map_err(|e| format!("{name}: {e}"))?;
        let first = i % NODES;
        let cands = [all[first].clone(), all[(first + 1) % NODES].clone()];
        store
            .claim(&parsed, &cands)
            .await
            .map_err(|e| format!("claim {name}: {e}"))?;
        names.push(name);
    }
    Ok(names)
}

fn script_sha(port: u16) -> Result<String, String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .map_err(|e| format!("redis client: {e}"))?;
    let mut conn = client
        .get_connection()
        .map_err(|e| format!("redis connection: {e}"))?;
    redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(CLAIM_LUA)
        .query::<String>(&mut conn)
        .map_err(|e| format!("SCRIPT LOAD claim.lua: {e}"))
}

fn start_kamailio(redis_port: u16, sha: &str, children: u32) -> Result<KamailioProc, String> {
    let cfg = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("bench")
        .join("kamailio-redirect.cfg");
    let mut opts = KamailioOptions::new(cfg)
        .define("CHILDREN", children.to_string())
        .define(
            "REDIS_SERVER",
            format!("\"name=confroute;addr=127.0.0.1;port={redis_port}\""),
        )
        .define("CLAIM_SHA", format!("\"{sha}\""))
        .define("NODES", NODES.to_string())
        .define("CLAIM_LEASE_MS", CONFERENCE_LEASE.as_millis().to_string());
    // The memory the issue asks for under load: 512 MB shared.
    opts.shm_mb = 512;
    opts.pkg_mb = 16;
    KamailioProc::start(&opts).map_err(|e| e.to_string())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{cpus} CPUs, {model}")
}

async fn run(args: Args) -> Result<(), String> {
    for (tool, pkg) in [
        ("sipp", "sip-tester"),
        ("redis-server", "redis-server"),
        ("redis-benchmark", "redis-tools"),
        ("kamailio", "kamailio kamailio-redis-modules"),
    ] {
        require_tool(tool, pkg).map_err(|e| e.to_string())?;
    }
    let plan = Plan {
        secs: args.duration.unwrap_or(if args.quick { 5 } else { 20 }),
        rates: args.rates.clone().unwrap_or_else(|| {
            if args.quick {
                vec![1000, 2000]
            } else {
                (1..=20).map(|k| k * 2000).collect()
            }
        }),
        cpu_rate: args
            .cpu_rate
            .unwrap_or(if args.quick { 2000 } else { 8000 }),
    };
    println!("bench-sip on {}", machine());
    println!(
        "steps of {} s, rates {:?}, CPU measured at {} calls/s, {} existing conferences",
        plan.secs, plan.rates, plan.cpu_rate, args.conferences
    );

    let redis = RedisServer::start().map_err(|e| e.to_string())?;
    let redis_pid = redis.pid().unwrap_or(0);
    let names = setup_store(&redis, args.conferences).await?;
    let sha = script_sha(redis.port())?;
    let mut env = fixtures::redis_env(&fixtures::single(&redis.url()));
    // The production default; the harness shortens it for tests.
    env.push(("CONFROUTE_ROUTING__NODE_REFRESH".into(), "500ms".into()));
    // Claims that outlive the run, as Kamailio's (CLAIM_LEASE_MS): the new conferences of
    // one step are existing ones in the next, for both servers alike.
    for key in [
        "CONFROUTE_REDIS__CONFERENCE_LEASE",
        "CONFROUTE_REDIS__CLAIM_LEASE",
    ] {
        env.push((key.into(), format!("{}s", CONFERENCE_LEASE.as_secs())));
    }
    for kv in &args.controller_env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--controller-env {kv}: expected NAME=value"))?;
        env.push((k.to_string(), v.to_string()));
    }
    let mut controller = ControllerProc::start(&env).map_err(|e| e.to_string())?;
    let controller_pid = controller.process().pid();
    let dir = TempDir::new("bench-sip").map_err(|e| e.to_string())?;

    let mut results: HashMap<(String, String), Outcome> = HashMap::new();
    // Machine-readable lines for `bench/run-all`, printed after the human-readable report.
    let mut bench_lines: Vec<String> = Vec::new();
    if !args.no_sip {
        let kamailio = if args.servers.iter().any(|s| s == "kamailio") {
            let k = start_kamailio(redis.port(), &sha, args.kamailio_children)?;
            let group = k.pid().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
            KAMAILIO_GROUP.store(group, Ordering::SeqCst);
            Some(k)
        } else {
            None
        };
        let mut servers = Vec::new();
        if args.servers.iter().any(|s| s == "controller") {
            servers.push(Server {
                name: "controller",
                addr: controller.sip_addr(),
                pids: controller_pid.into_iter().collect(),
            });
        }
        if let Some(k) = &kamailio {
            servers.push(Server {
                name: "kamailio",
                addr: k.sip_addr(),
                pids: k.pids(),
            });
        }
        for workload in &args.workloads {
            for server in &servers {
                println!("== {} / {workload} conferences", server.name);
                let out = measure(
                    server,
                    workload,
                    &names,
                    &plan,
                    redis_pid,
                    redis.port(),
                    dir.path(),
                )?;
                results.insert((server.name.to_string(), workload.clone()), out);
            }
        }
        print_sip_table(&results, &args.workloads, &plan);
        for w in &args.workloads {
            for s in ["controller", "kamailio"] {
                if let Some(o) = results.get(&(s.to_string(), w.clone())) {
                    bench_lines.push(bench_sip_line(s, w, o, &plan));
                }
            }
        }
        for w in &args.workloads {
            if let Some(line) = bench_p99_line(&results, w) {
                println!("{}", line.trim_start_matches("BENCH "));
                bench_lines.push(line);
            }
        }
        // Stopped here (as before), and the signal watcher has no group left to kill.
        drop(kamailio);
        KAMAILIO_GROUP.store(0, Ordering::SeqCst);
    }

    if !args.no_http {
        let conc = args.http_concurrency.clone().unwrap_or_else(|| {
            if args.quick {
                vec![32]
            } else {
                vec![32, 64]
            }
        });
        let requests = args
            .http_requests
            .unwrap_or(if args.quick { 20_000 } else { 200_000 });
        let http_addr = SocketAddr::from(([127, 0, 0, 1], controller.http_port));
        let route = HttpLoad::Route(Arc::new(names.clone()));
        println!();
        println!("== POST /v1/route (existing conferences) vs redis-benchmark -t get");
        println!("   (GET /healthz: the same client and HTTP stack with no Redis call, the floor)");
        println!(
            "{:>11} {:>12} {:>8} {:>13} {:>12} {:>16} {:>16} {:>14} {:>12} {:>18}",
            "concurrency",
            "route req/s",
            "errors",
            "redis GET/s",
            "route/GET",
            "ctrl cpu us/req",
            "redis cpu us/req",
            "healthz req/s",
            "healthz/GET",
            "healthz cpu us/req"
        );
        for c in conc {
            // Warm-up: connections and the node view.
            let _ = http_rate(http_addr, route.clone(), c, (requests / 10) as u64).await?;
            let cpu_before = controller_pid.map(cpu_seconds).unwrap_or(0.0);
            let redis_before = cpu_seconds(redis_pid);
            let (rps, errors) = http_rate(http_addr, route.clone(), c, requests as u64).await?;
            let cpu = controller_pid.map(cpu_seconds).unwrap_or(0.0) - cpu_before;
            let redis_cpu = cpu_seconds(redis_pid) - redis_before;
            let floor_before = controller_pid.map(cpu_seconds).unwrap_or(0.0);
            let (floor, floor_errors) =
                http_rate(http_addr, HttpLoad::Healthz, c, requests as u64).await?;
            let floor_cpu = controller_pid.map(cpu_seconds).unwrap_or(0.0) - floor_before;
            let get = redis_benchmark_get(redis.port(), c, requests);
            bench_lines.push(format!(
                "BENCH route concurrency={c} requests={requests} route_rps={rps:.0} errors={} \
                 redis_get_rps={} controller_cpu_us={:.1} redis_cpu_us={:.1} healthz_rps={floor:.0} \
                 healthz_cpu_us={:.1}",
                errors + floor_errors,
                get.map(|g| format!("{g:.0}")).unwrap_or_else(|| "none".into()),
                LoadRun::us_per_call(cpu, requests as u64),
                LoadRun::us_per_call(redis_cpu, requests as u64),
                LoadRun::us_per_call(floor_cpu, requests as u64),
            ));
            println!(
                "{:>11} {:>12.0} {:>8} {:>13} {:>12} {:>16.1} {:>16.1} {:>14.0} {:>12} {:>18.1}",
                c,
                rps,
                errors + floor_errors,
                get.map(|g| format!("{g:.0}")).unwrap_or_else(|| "-".into()),
                ratio(Some(rps), get),
                LoadRun::us_per_call(cpu, requests as u64),
                LoadRun::us_per_call(redis_cpu, requests as u64),
                floor,
                ratio(Some(floor), get),
                LoadRun::us_per_call(floor_cpu, requests as u64),
            );
        }
    }
    if !bench_lines.is_empty() {
        println!();
        for l in &bench_lines {
            println!("{l}");
        }
    }
    Ok(())
}

/// `BENCH sipp99 ...`: the controller's highest sustained rate whose p99 is no worse than
/// Kamailio's p99 at Kamailio's own highest sustained rate (the rate goal is "at no worse
/// p99"; the top rates alone compare p99s taken at different loads).
fn bench_p99_line(results: &HashMap<(String, String), Outcome>, workload: &str) -> Option<String> {
    let get = |s: &str| results.get(&(s.to_string(), workload.to_string()));
    let k = get("kamailio")?.best.as_ref()?;
    let c = get("controller")?;
    let within = c
        .sustained
        .iter()
        .filter(|(_, p99)| *p99 <= k.p99_ms)
        .max_by_key(|(rate, _)| *rate);
    Some(format!(
        "BENCH sipp99 workload={workload} kamailio_rate={} kamailio_p99_ms={:.2} \
         controller_rate={} controller_p99_ms={}",
        k.rate,
        k.p99_ms,
        within
            .map(|w| w.0.to_string())
            .unwrap_or_else(|| "none".into()),
        within
            .map(|w| format!("{:.2}", w.1))
            .unwrap_or_else(|| "none".into()),
    ))
}

/// `BENCH sip ...`: one server on one workload, for `bench/run-all`.
fn bench_sip_line(server: &str, workload: &str, o: &Outcome, plan: &Plan) -> String {
    let num = |v: Option<f64>, digits: usize| match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "none".into(),
    };
    let best = o.best.as_ref();
    let fixed = o.fixed.as_ref();
    format!(
        "BENCH sip server={server} workload={workload} step_secs={} top_rate={} max_rate={} p50_ms={} \
         p99_ms={} first_failure={} cpu_rate={} cpu_us={} redis_cpu_us={} fixed_p99_ms={} \
         fixed_sustained={}",
        plan.secs,
        plan.rates.iter().max().copied().unwrap_or(0),
        best.map(|b| b.rate.to_string())
            .unwrap_or_else(|| "none".into()),
        num(best.map(|b| b.p50_ms), 2),
        num(best.map(|b| b.p99_ms), 2),
        o.first_failure
            .as_ref()
            .map(|f| f.rate.to_string())
            .unwrap_or_else(|| "none".into()),
        plan.cpu_rate,
        num(
            fixed.map(|f| LoadRun::us_per_call(f.server_cpu, f.answered())),
            1
        ),
        num(
            fixed.map(|f| LoadRun::us_per_call(f.redis_cpu, f.answered())),
            1
        ),
        num(fixed.map(|f| f.p99_ms), 2),
        fixed.map(|f| f.sustained()).unwrap_or(false),
    )
}

fn print_sip_table(
    results: &HashMap<(String, String), Outcome>,
    workloads: &[String],
    plan: &Plan,
) {
    println!();
    println!(
        "== SIP redirect: highest rate sustained {} s with no failed call and no retransmission",
        plan.secs
    );
    println!(
        "{:<10} {:<9} {:>10} {:>9} {:>9} {:>16} {:>16} {:>11} {:>11}",
        "server",
        "confs",
        "max rate",
        "p50 ms",
        "p99 ms",
        "cpu us/call @",
        "redis us/call @",
        "fail@rate",
        "fixed p99"
    );
    for w in workloads {
        for s in ["controller", "kamailio"] {
            let Some(o) = results.get(&(s.to_string(), w.clone())) else {
                continue;
            };
            let fixed = o.fixed.as_ref();
            println!(
                "{:<10} {:<9} {:>10} {:>9} {:>9} {:>16} {:>16} {:>11} {:>11}",
                s,
                w,
                fmt_rate(o.best.as_ref()),
                fmt_ms(o.best.as_ref().map(|b| b.p50_ms)),
                fmt_ms(o.best.as_ref().map(|b| b.p99_ms)),
                fixed
                    .map(|f| format!(
                        "{:.1} @{}",
                        LoadRun::us_per_call(f.server_cpu, f.answered()),
                        f.rate
                    ))
                    .unwrap_or_else(|| "-".into()),
                fixed
                    .map(|f| format!("{:.1}", LoadRun::us_per_call(f.redis_cpu, f.answered())))
                    .unwrap_or_else(|| "-".into()),
                fmt_rate(o.first_failure.as_ref()),
                fmt_ms(fixed.map(|f| f.p99_ms)),
            );
        }
        let c = results.get(&("controller".to_string(), w.clone()));
        let k = results.get(&("kamailio".to_string(), w.clone()));
        if let (Some(c), Some(k)) = (c, k) {
            // Only where both sustained the rate: past its capacity a server's figure counts
            // retransmissions and drops a fair comparison would not.
            let cpu = |o: &Outcome| {
                o.fixed
                    .as_ref()
                    .filter(|f| f.sustained())
                    .map(|f| LoadRun::us_per_call(f.server_cpu, f.answered()))
            };
            let rate = |o: &Outcome| o.best.as_ref().map(|b| f64::from(b.rate));
            let p99 = |o: &Outcome| o.best.as_ref().map(|b| b.p99_ms);
            println!(
                "  {w}: controller/kamailio  CPU per call {} (goal <= 0.50x)  max rate {} (goal >= 1.20x)  p99 at max {} vs {} ms",
                ratio(cpu(c), cpu(k)),
                ratio(rate(c), rate(k)),
                fmt_ms(p99(c)),
                fmt_ms(p99(k)),
            );
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Kamailio's workers live in their own process group: a bench killed by a signal would
    // leave them running (the other servers die with it, `PR_SET_PDEATHSIG`). The SIP part
    // blocks its thread for minutes, so the watcher runs on a worker thread and kills the
    // group itself.
    tokio::spawn(async {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        let why = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        };
        let group = KAMAILIO_GROUP.load(Ordering::SeqCst);
        if group > 0 {
            // SAFETY: kill(2) on the process group the harness created for our Kamailio.
            unsafe {
                libc::kill(-group, libc::SIGKILL);
            }
        }
        eprintln!("bench-sip: stopped by {why}");
        std::process::exit(130);
    });
    let result = run(args).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-sip: {e}");
            ExitCode::FAILURE
        }
    }
}
