//! `confroute-node`: loads its configuration, hosts conferences until SIGTERM, then drains
//! and exits.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use confroute_node::config::NodeConfig;
use confroute_node::{app, lifecycle};
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
    exit_on_panic();
    let redis = cfg.redis.describe();
    let ari_url = cfg.ari_base();
    // Listened for before start-up, which can take two heartbeats of a previous life's
    // record: a stop asked meanwhile is kept and drains the node as soon as it is up. Without
    // a handler, a stop signal would kill the agent outright, and as a container's PID 1
    // (where the default action is to ignore it) leave it running, serving, until SIGKILL.
    let mut signals = match shutdown::StopSignals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("confroute-node: cannot listen for stop signals: {e}");
            return ExitCode::from(1);
        }
    };
    // Valid apart, the two can still not work together: a heartbeat Redis answers within
    // redis.timeout but after the lease has run out lets the node record lapse, and the
    // controllers place the node's conferences elsewhere while their callers are still here.
    let lease = cfg.node.heartbeat_interval * 3;
    if lease < cfg.redis.timeout * 2 {
        tracing::warn!(
            node_lease = ?lease,
            redis_timeout = ?cfg.redis.timeout,
            "the node lease (three node.heartbeat_interval) is under twice redis.timeout: one slow heartbeat can let the node record lapse and its conferences be placed elsewhere; raise node.heartbeat_interval or lower redis.timeout"
        );
    }
    let agent = match app::start(cfg).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("confroute-node: {e}");
            return ExitCode::from(1);
        }
    };
    let node = agent.node.clone();
    tracing::info!(
        node = %node.id,
        sip_uri = %node.info.sip_uri,
        http = %agent.http_addr,
        ari = %confroute_shared::config::redact_url(&ari_url),
        redis = %redis,
        "confroute-node started"
    );
    confroute_shared::http_serve::warn_if_open(agent.http_addr, node.cfg.http.api_token.is_some());
    let mut exit = node.exit.subscribe();
    // A shutdown drain is started by a stop signal or over HTTP (`POST /v1/drain?shutdown=true`,
    // the chart's preStop hook); either way the agent exits when it is done.
    let signalled = tokio::select! {
        sig = signals.next() => {
            tracing::info!(?sig, "stop requested; draining");
            true
        }
        _ = exit.wait_for(|done| *done) => false,
    };
    if signalled {
        lifecycle::drain(&node, true).await;
        tokio::select! {
            _ = exit.wait_for(|done| *done) => {}
            sig = signals.next() => {
                tracing::info!(?sig, "second stop signal");
                lifecycle::shutdown_now(&node).await;
            }
        }
    }
    agent.stop().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Makes a panic anywhere in the agent end the process. A panic ends only its own task, and
/// an agent missing one (a conference's actor, the events WebSocket, the heartbeat) would
/// look alive: it would keep renewing claims and drawing callers it no longer serves. A
/// process that exits is restarted (by Kubernetes or systemd) and adopts the calls Asterisk
/// still holds.
fn exit_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!(panic = %info, "the agent panicked; exiting so that it is restarted and adopts the calls Asterisk holds");
        std::process::exit(70);
    }));
}
