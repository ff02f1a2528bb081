//! `ari-sim`: simulated Asterisk servers speaking ARI, one per `--listen` address.
//!
//! `ari-sim --listen 127.0.0.1:8088 --username U --password P` serves ARI under `/ari` and the
//! scenario control API under `/_sim/` until interrupted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use confroute_tests::ari_sim::{AriSim, SimConfig};

/// Simulated Asterisk REST Interface servers for tests.
#[derive(Debug, Parser)]
#[command(name = "ari-sim", version)]
struct Args {
    /// Address to serve one simulated Asterisk on (repeat for several).
    #[arg(long = "listen", default_value = "127.0.0.1:8088")]
    listen: Vec<SocketAddr>,
    /// ARI user name.
    #[arg(long, default_value = "asterisk")]
    username: String,
    /// ARI password.
    #[arg(long, default_value = "asterisk")]
    password: String,
    /// Folder with Asterisk's ARI Swagger files (default: $ARI_API_DOCS or ../shared/ari-api-docs).
    #[arg(long)]
    api_docs: Option<PathBuf>,
    /// Variables or functions reported in every channel's `channelvars` (repeatable).
    #[arg(long = "channelvar")]
    channelvars: Vec<String>,
    /// How long originated channels ring before answering, in milliseconds.
    #[arg(long, default_value_t = 100)]
    ring_ms: u64,
    /// Keep no request or event logs (for load runs).
    #[arg(long)]
    no_logs: bool,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let mut sims = Vec::new();
    for listen in &args.listen {
        let cfg = SimConfig {
            listen: *listen,
            username: args.username.clone(),
            password: args.password.clone(),
            api_docs: args.api_docs.clone(),
            channelvars: args.channelvars.clone(),
            ring_time: Duration::from_millis(args.ring_ms),
            record_events: !args.no_logs,
            record_requests: !args.no_logs,
            ..SimConfig::default()
        };
        match AriSim::start(cfg).await {
            Ok(sim) => {
                println!(
                    "ari-sim listening on {} (ARI at {})",
                    sim.base_url(),
                    sim.ari_url()
                );
                sims.push(sim);
            }
            Err(e) => {
                eprintln!("ari-sim: {e}");
                std::process::exit(1);
            }
        }
    }
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("ari-sim: waiting for Ctrl-C: {e}");
    }
    for sim in sims {
        sim.shutdown().await;
    }
}
