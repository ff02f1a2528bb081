//! `chaos`: runs the chaos scenarios at full length on this machine and prints their figures
//! (see `docs/chaos.md`). Exits non-zero when a scenario cannot run or misses a goal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use confroute_tests::chaos::{self, Common, Length, SCENARIOS};

/// Command line of `chaos`.
#[derive(Parser, Debug)]
#[command(
    name = "chaos",
    about = "Run confroute's chaos scenarios (real Redis and binaries, simulated Asterisks) and print their figures"
)]
struct Args {
    /// A scenario (node-kill, sentinel-failover, redis-outage, rolling-drain, partition,
    /// ari-flap), or `all`.
    scenario: String,
    /// The fault's duration in seconds: the outage, the partition, the flapping, the drain
    /// deadline, or the observation window after a kill or a failover.
    #[arg(long)]
    duration: Option<f64>,
    /// The short versions the test suite runs, instead of the full ones.
    #[arg(long)]
    short: bool,
    /// Folder to keep every process's output in (one sub-folder per scenario).
    #[arg(long)]
    logs: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let names: Vec<&str> = if args.scenario == "all" {
        SCENARIOS.to_vec()
    } else if SCENARIOS.contains(&args.scenario.as_str()) {
        vec![args.scenario.as_str()]
    } else {
        eprintln!(
            "chaos: unknown scenario `{}`; one of: {}, all",
            args.scenario,
            SCENARIOS.join(", ")
        );
        return ExitCode::from(2);
    };
    let fault = match args.duration {
        Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
        Some(_) => {
            eprintln!("chaos: --duration must be a positive number of seconds");
            return ExitCode::from(2);
        }
        None => None,
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let mut failed = false;
    for name in names {
        let common = Common {
            length: if args.short {
                Length::Short
            } else {
                Length::Full
            },
            fault,
            logs: args.logs.clone(),
        };
        println!("chaos: running {name} ...");
        match chaos::run(name, common).await {
            Ok(report) => {
                print!("{report}");
                let missed = chaos::missed_goals(name, &report);
                if missed.is_empty() {
                    println!("goals: all met\n");
                } else {
                    failed = true;
                    println!("goals missed:");
                    for m in missed {
                        println!("  {m}");
                    }
                    println!();
                }
            }
            Err(e) => {
                failed = true;
                println!("== {name} ==\ncould not run: {e}\n");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
