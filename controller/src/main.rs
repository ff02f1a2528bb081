//! `confroute-controller`: loads its configuration and serves SIP and HTTP until SIGTERM or
//! Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use confroute_controller::app;
use confroute_controller::config::ControllerConfig;
use confroute_shared::{config, shutdown, telemetry};

/// Command line of the controller.
#[derive(Parser)]
#[command(
    version,
    about = "confroute controller: routes conference calls to Asterisk nodes"
)]
struct Args {
    /// TOML configuration file; `CONFROUTE_*` environment variables override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let cfg: ControllerConfig = match config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("confroute-controller: invalid configuration\n{e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&cfg.log);
    let controller = match app::start(&cfg).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("confroute-controller: {e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(
        sip = %controller.sip_addr,
        http = %controller.http_addr,
        redis = %cfg.redis.describe(),
        "confroute-controller started"
    );
    match shutdown::signal().await {
        Ok(sig) => tracing::info!(?sig, "stopping"),
        Err(e) => tracing::error!(error = %e, "cannot wait for signals; stopping"),
    }
    controller.stop().await;
    ExitCode::SUCCESS
}
