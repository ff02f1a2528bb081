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

/// mimalloc: the redirect path allocates small, short-lived buffers per call, where glibc's
/// malloc took a fifth of the controller's CPU in the SIP benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (the same in mimalloc 2 and 3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // mimalloc gives freed pages back to the OS 10 ms after they empty, so every burst of
    // calls faulted them in again (page faults were 7% of the controller's CPU at 8,000
    // calls/s). A server's working set is steady: keep pages for a second.
    // SAFETY: a documented runtime option; mimalloc reads it on its next purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
    let args = Args::parse();
    let cfg: ControllerConfig = match config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("confroute-controller: invalid configuration\n{e}");
            return ExitCode::from(2);
        }
    };
    // The runtime is built after the configuration is read: `runtime.worker_threads` sizes it.
    // One thread gets the current-thread scheduler: it has no LIFO slot, so a burst of
    // requests all queue their Redis commands before the connection task writes them.
    let mut builder = if cfg.runtime.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if cfg.runtime.worker_threads > 1 {
        builder.worker_threads(cfg.runtime.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("confroute-controller: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(serve(cfg))
}

/// Runs the controller until a stop signal.
async fn serve(cfg: ControllerConfig) -> ExitCode {
    telemetry::init(&cfg.log);
    // Listened for before start-up: a stop asked while it connects is kept, not fatal.
    let mut signals = match shutdown::StopSignals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("confroute-controller: cannot listen for stop signals: {e}");
            return ExitCode::from(1);
        }
    };
    let mut controller = match app::start(&cfg).await {
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
    confroute_shared::http_serve::warn_if_open(controller.http_addr, cfg.http.api_token.is_some());
    if cfg.sip.trusted_cidrs.is_empty() && !controller.sip_addr.ip().is_loopback() {
        // Each INVITE for a new name places a conference, holding a seat on a node until a
        // call arrives or the claim lapses: a flood of made-up names fills every node.
        tracing::warn!(sip = %controller.sip_addr, "sip.trusted_cidrs is empty and sip.listen is reachable from other hosts: anyone who can send it INVITEs places conferences, each holding a node's seat for redis.claim_lease until a call arrives; set sip.trusted_cidrs to the edge proxies");
    }
    tokio::select! {
        sig = signals.next() => tracing::info!(?sig, "stopping"),
        why = controller.failed() => {
            // Exits rather than serve half: routes from a view no longer refreshed, or no
            // SIP answers, behind a liveness probe that stays green.
            tracing::error!(%why, "a part of the controller stopped; exiting so that it is restarted");
            return ExitCode::from(70);
        }
    }
    controller.stop().await;
    ExitCode::SUCCESS
}
