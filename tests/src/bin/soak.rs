//! `soak`: the whole cluster (real Redis, controllers and node agents, simulated Asterisks)
//! under steady calls for a long time, at half of the maximum rate of that load; prints, per
//! process, RSS and open file descriptors after the warm-up and at the end, the calls and
//! their errors, and the verdict per goal (see `docs/soak.md`). Exits non-zero when the soak
//! cannot run or a goal is missed.
//!
//! `cargo build --release --workspace --bins && cargo run --release -p confroute-tests --bin soak`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use confroute_tests::soak::{self, SoakConfig};

/// Command line of `soak`.
#[derive(Parser, Debug)]
#[command(
    name = "soak",
    about = "Soak confroute: steady calls at half the maximum rate for a long time; RSS, fds and errors per process"
)]
struct Args {
    /// Controllers.
    #[arg(long, default_value_t = 2)]
    controllers: usize,
    /// Conference nodes (agent + simulated Asterisk).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Maximum call rate of this load (calls/s); skips the ramp that measures it.
    #[arg(long)]
    max_rate: Option<f64>,
    /// Soak rate (calls/s); default half of the maximum.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds measured after the warm-up.
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// Seconds of load before the measurement starts.
    #[arg(long, default_value_t = 60.0)]
    warmup: f64,
    /// Seconds between two samples of every process.
    #[arg(long, default_value_t = 5.0)]
    sample_interval: f64,
    /// Samples whose median is the start, and the end, of each trend.
    #[arg(long, default_value_t = 6)]
    trend_window: usize,
    /// Largest RSS growth, in percent, that still counts as flat.
    #[arg(long, default_value_t = 5.0)]
    rss_limit: f64,
    /// File descriptors a process may end above its start.
    #[arg(long, default_value_t = 2)]
    fd_slack: u64,
    /// Callers sent into each (new) conference.
    #[arg(long, default_value_t = 4)]
    callers_per_conference: u64,
    /// Shortest stay in a conference, seconds.
    #[arg(long, default_value_t = 1.0)]
    hold_min: f64,
    /// Longest stay in a conference, seconds.
    #[arg(long, default_value_t = 4.0)]
    hold_max: f64,
    /// Most conferences per node.
    #[arg(long, default_value_t = 1000)]
    capacity: u32,
    /// First rate of the ramp (calls/s).
    #[arg(long, default_value_t = 20.0)]
    ramp_start: f64,
    /// Factor between two ramp rates.
    #[arg(long, default_value_t = 1.5)]
    ramp_factor: f64,
    /// Seconds per ramp step.
    #[arg(long, default_value_t = 15.0)]
    ramp_step: f64,
    /// Highest call set-up p99 (ms) a ramp step may show and count as sustained.
    #[arg(long, default_value_t = 500)]
    ramp_p99_ms: u64,
    /// Seconds to wait, after the callers hung up, for every process's open fds to come back
    /// to their level before the load (keep-alive pools idle out); 0 skips the check.
    #[arg(long, default_value_t = 120.0)]
    rest_wait: f64,
    /// Folder to keep every process's output in (`ramp/` and `soak/`).
    #[arg(long)]
    logs: Option<PathBuf>,
    /// File to write every sample of every process to, as CSV.
    #[arg(long)]
    samples_csv: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

fn secs(name: &str, v: f64, zero_ok: bool) -> Result<Duration, String> {
    if v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0)) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!("--{name} must be a positive number of seconds"))
    }
}

fn positive(name: &str, v: Option<f64>) -> Result<Option<f64>, String> {
    match v {
        Some(r) if !(r.is_finite() && r > 0.0) => Err(format!("--{name} must be positive")),
        other => Ok(other),
    }
}

fn config(a: &Args) -> Result<SoakConfig, String> {
    let mut c = SoakConfig::full();
    c.controllers = a.controllers;
    c.nodes = a.nodes;
    c.max_rate = positive("max-rate", a.max_rate)?;
    c.rate = positive("rate", a.rate)?;
    c.duration = secs("duration", a.duration, false)?;
    c.warmup = secs("warmup", a.warmup, true)?;
    c.sample_every = secs("sample-interval", a.sample_interval, false)?;
    c.trend_window = a.trend_window;
    c.rss_limit_pct = a.rss_limit;
    c.fd_slack = a.fd_slack;
    c.rest_wait = secs("rest-wait", a.rest_wait, true)?;
    c.mix.callers_per_conference = a.callers_per_conference.max(1);
    c.mix.hold = (
        secs("hold-min", a.hold_min, true)?,
        secs("hold-max", a.hold_max, true)?,
    );
    if c.mix.hold.1 < c.mix.hold.0 {
        return Err("--hold-max must be at least --hold-min".into());
    }
    c.capacity = a.capacity;
    c.ramp.start = positive("ramp-start", Some(a.ramp_start))?.unwrap_or(20.0);
    if !(a.ramp_factor.is_finite() && a.ramp_factor > 1.0) {
        return Err("--ramp-factor must be above 1".into());
    }
    c.ramp.factor = a.ramp_factor;
    c.ramp.step = secs("ramp-step", a.ramp_step, false)?;
    c.ramp.max_p99 = Duration::from_millis(a.ramp_p99_ms);
    c.logs = a.logs.clone();
    c.progress = !a.quiet;
    if c.nodes == 0 || c.controllers == 0 || c.trend_window == 0 {
        return Err("--nodes, --controllers and --trend-window must be at least 1".into());
    }
    Ok(c)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    // The run is polled here, on the main thread that started the processes: Ctrl-C drops it,
    // which stops every process it started (the harness kills them when dropped).
    let outcome = tokio::select! {
        r = soak::run(&cfg) => Some(r),
        _ = tokio::signal::ctrl_c() => None,
    };
    match outcome {
        None => {
            eprintln!("soak: interrupted; every process it started was stopped");
            ExitCode::from(130)
        }
        Some(Err(e)) => {
            println!("soak: could not run: {e}");
            ExitCode::FAILURE
        }
        Some(Ok(report)) => {
            print!("{report}");
            // Samples asked for and not written are a failed run, whatever the goals say:
            // a script reading them would read nothing (or an old file).
            let mut written = true;
            if let Some(path) = &args.samples_csv {
                if let Err(e) = std::fs::write(path, report.samples_csv()) {
                    println!("soak: cannot write {}: {e}", path.display());
                    written = false;
                }
            }
            if report.missed().is_empty() && written {
                println!("verdict: every goal met");
                ExitCode::SUCCESS
            } else if report.missed().is_empty() {
                println!("verdict: every goal met, but the samples were not written");
                ExitCode::FAILURE
            } else {
                println!("verdict: {} goal(s) missed", report.missed().len());
                ExitCode::FAILURE
            }
        }
    }
}
