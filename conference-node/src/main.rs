//! `confroute-node`: loads its configuration and serves until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use confroute_node::config::NodeConfig;
use confroute_shared::store::{Store, StoreMetrics};
use confroute_shared::{config, shutdown, telemetry};

/// Command line of the node agent.
#[derive(Parser)]
#[command(
    version,
    about = "confroute conference-node agent: hosts conferences on one Asterisk"
)]
struct Args {
    /// TOML configuration file; `CONFROUTE_*` environment variables override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let cfg: NodeConfig = match config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("confroute-node: invalid configuration\n{e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&cfg.log);
    let _store = match Store::new(&cfg.redis, StoreMetrics::disabled()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("confroute-node: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(redis = %cfg.redis.describe(), "confroute-node started");
    match shutdown::signal().await {
        Ok(sig) => tracing::info!(?sig, "stopping"),
        Err(e) => {
            tracing::error!(error = %e, "cannot wait for signals");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
