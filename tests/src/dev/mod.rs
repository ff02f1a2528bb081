//! `confroute-dev`: a whole confroute cluster on one machine, with traffic and a live view.
//!
//! Starts a private Redis, node agents each beside a simulated Asterisk (or a real one's ARI),
//! and controllers; places calls into a set of conferences through the controllers (SIP or
//! HTTP), then through the simulated Asterisks; shows what happens; and stops everything in
//! order on Ctrl-C or after `--duration`, with a summary (a second Ctrl-C stops at once).

mod cluster;
mod setup;
mod stats;
pub(crate) mod traffic;
mod view;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rand::Rng;

use cluster::{Cluster, RealAri, Topology};
use confroute_shared::shutdown::StopSignals;
use traffic::{Entry, Traffic};

/// Command line of `confroute-dev`.
#[derive(Parser, Debug)]
#[command(
    name = "confroute-dev",
    about = "Run a whole confroute cluster on this machine, with traffic and a live view"
)]
pub struct DevArgs {
    /// Conference nodes (each an agent beside a simulated Asterisk).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Controllers.
    #[arg(long, default_value_t = 2)]
    pub controllers: usize,
    /// Conferences the callers spread over.
    #[arg(long, default_value_t = 20)]
    pub conferences: usize,
    /// New callers per second.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Shortest stay of a caller, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub hold_min: f64,
    /// Longest stay of a caller, in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub hold_max: f64,
    /// How calls reach the controllers.
    #[arg(long, value_enum, default_value_t = Entry::Mixed)]
    pub entry: Entry,
    /// Dial-outs per minute (through the JSON-RPC API).
    #[arg(long, default_value_t = 6.0)]
    pub dialouts_per_minute: f64,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Kill node 2 (its Asterisk and agent, as a crash) this many seconds in.
    #[arg(long)]
    pub kill_node_after: Option<f64>,
    /// Drain node 1 this many seconds in.
    #[arg(long)]
    pub drain_node_after: Option<f64>,
    /// A real Asterisk's ARI for node 1 instead of the simulator, e.g. http://10.0.0.5:8088
    /// (one no production agent serves).
    #[arg(long)]
    pub ari: Option<String>,
    /// ARI user for `--ari`.
    #[arg(long, default_value = "confroute")]
    pub ari_username: String,
    /// ARI password for `--ari`.
    #[arg(long, default_value = "confroute")]
    pub ari_password: String,
    /// Stasis application of node 1 with `--ari` (the dialplan must send calls to it).
    #[arg(long, default_value = "confroute-dev")]
    pub ari_app: String,
    /// Where callers of node 1's conferences are sent with `--ari`, the real Asterisk's SIP
    /// address (default: sip:<host of --ari>:5060).
    #[arg(long)]
    pub sip_uri: Option<String>,
    /// Conferences each node may host.
    #[arg(long, default_value_t = 1000)]
    pub capacity: u32,
    /// Plain status lines instead of the refreshing view (the default when stdout is not a
    /// terminal).
    #[arg(long)]
    pub plain: bool,
}

/// Runs the cluster; the exit code is non-zero when a conference was ever split.
pub async fn run(args: DevArgs) -> ExitCode {
    if let Err(e) = validate(&args) {
        eprintln!("confroute-dev: {e}");
        return ExitCode::from(2);
    }
    let real_ari = match real_ari(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("confroute-dev: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = setup::ensure_redis() {
        eprintln!("confroute-dev: {e}");
        return ExitCode::from(2);
    }
    let log_file = match log_dir() {
        Ok(dir) => dir.join("cluster.log"),
        Err(e) => {
            eprintln!(
                "confroute-dev: cannot make a log directory in {}: {e}",
                std::env::temp_dir().display()
            );
            return ExitCode::FAILURE;
        }
    };
    init_logging(&log_file);
    let token = format!("{:032x}", rand::random::<u128>());
    let topology = Topology {
        nodes: args.nodes,
        controllers: args.controllers,
        capacity: args.capacity,
        token: token.clone(),
        real_ari,
    };
    // Listened for from the start: a Ctrl-C while the cluster starts stops it there (status
    // 130), and one as soon as the banner shows stops it in order, rather than kill the
    // process unheard.
    let mut signals = match StopSignals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("confroute-dev: cannot listen for Ctrl-C: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "confroute-dev: starting Redis, {} node(s) and {} controller(s)...",
        args.nodes, args.controllers
    );
    // A Ctrl-C while the cluster starts (an unreachable --ari keeps it starting for a
    // while) stops it there: what was started is dropped with the start (Redis killed).
    let started = tokio::select! {
        started = Cluster::start(&topology) => started,
        _ = signals.next() => {
            eprintln!("confroute-dev: interrupted while starting; details in {}", log_file.display());
            return ExitCode::from(130);
        }
    };
    let mut cluster = match started {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "confroute-dev: cannot start the cluster: {e} (details in {})",
                log_file.display()
            );
            return ExitCode::FAILURE;
        }
    };
    for id in &cluster.not_placeable {
        eprintln!(
            "confroute-dev: warning: {id} has not reached its Asterisk (ARI events WebSocket down: check --ari and its credentials; details in {}); it gets no conference until it does",
            log_file.display()
        );
    }
    view::banner(&cluster, &token, &log_file);

    let node_ids: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
    let traffic = Traffic::new(node_ids);
    let sims: Arc<Vec<_>> = Arc::new(cluster.nodes.iter().map(|n| n.sim.clone()).collect());
    let mut background = Vec::new();
    for (i, sim) in sims.iter().enumerate() {
        if let Some(sim) = sim {
            background.push(tokio::spawn(traffic::observe(
                traffic.clone(),
                i,
                sim.clone(),
            )));
        }
    }
    let generator = tokio::spawn(generate(
        traffic.clone(),
        sims.clone(),
        Load {
            controllers: cluster
                .controllers
                .iter()
                .map(|c| (c.sip, c.http))
                .collect(),
            conferences: args.conferences,
            rate: args.rate,
            hold: (args.hold_min, args.hold_max),
            entry: args.entry,
            dialouts_per_minute: generated_dialouts(&args),
            token: token.clone(),
        },
    ));

    if args.ari.is_some() && args.dialouts_per_minute > 0.0 {
        println!("confroute-dev: no generated dial-outs with --ari: a conference on the real Asterisk would dial real numbers");
    }
    let live = !args.plain && std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut killed = false;
    let mut drained = false;
    let mut first = true;
    let mut interrupted = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = signals.next() => {
                interrupted = true;
                break;
            }
        }
        let t = started.elapsed().as_secs_f64();
        traffic.check();
        if let (Some(at), false) = (args.kill_node_after, killed) {
            if t >= at {
                let i = 1.min(cluster.nodes.len() - 1);
                cluster.kill(i);
                traffic.node_lost(i);
                killed = true;
                let id = cluster.nodes[i].id.clone();
                stats::with(&traffic.stats, |s| {
                    let hosted = s
                        .last_node
                        .iter()
                        .filter(|(_, n)| **n == id)
                        .map(|(c, _)| c.clone())
                        .collect();
                    s.killed = Some(stats::Killed {
                        node: id.clone(),
                        at: t,
                        hosted,
                        rehomed: Vec::new(),
                    });
                    s.notes
                        .push(format!("{t:.1}s: killed {id} (Asterisk and agent)"))
                });
            }
        }
        if let (Some(at), false) = (args.drain_node_after, drained) {
            if t >= at {
                let note = match cluster.drain(0, None).await {
                    Ok(()) => format!("{t:.1}s: draining {}", cluster.nodes[0].id),
                    Err(e) => format!("{t:.1}s: drain of {} failed: {e}", cluster.nodes[0].id),
                };
                drained = true;
                stats::with(&traffic.stats, |s| s.notes.push(note));
            }
        }
        let nodes = cluster.store.list_nodes().await.unwrap_or_default();
        view::show(&traffic, &cluster, &nodes, t, live, first);
        first = false;
        if args.duration.is_some_and(|d| t >= d) {
            break;
        }
    }

    // Stop in order: no new callers, everyone hangs up, the nodes drain empty, then stop.
    generator.abort();
    // Calls already on their way still arrive; hanging up everyone cuts those too.
    traffic.stop();
    println!(
        "\nconfroute-dev: stopping: callers hang up, nodes drain, then everything stops ({})",
        if interrupted {
            "press Ctrl-C again to stop at once"
        } else {
            "Ctrl-C to stop at once"
        }
    );
    // The orderly stop may take as long as the nodes' drain (up to 20 s); another Ctrl-C
    // ends it there.
    let finished = tokio::select! {
        code = stop_in_order(&mut cluster, &traffic, &sims, background, started) => Some(code),
        _ = signals.next() => None,
    };
    match finished {
        Some(code) => {
            println!("confroute-dev: the cluster's log is {}", log_file.display());
            code
        }
        None => stop_at_once(cluster),
    }
}

/// A new directory of this run's own for the cluster's log, under a name nobody could have
/// prepared (a shared /tmp: a path another user made, or a link there, is never written
/// through). Kept after the run, for reading.
fn log_dir() -> std::io::Result<std::path::PathBuf> {
    let mut last = None;
    for _ in 0..16 {
        let dir = std::env::temp_dir().join(format!(
            "confroute-dev-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        // `create_dir` fails on anything already there, a link included.
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
}

/// The orderly end of a run: every caller hangs up, the live nodes drain empty, everything
/// stops, and the summary is printed; non-zero when a conference was ever split.
async fn stop_in_order(
    cluster: &mut Cluster,
    traffic: &Traffic,
    sims: &[Option<crate::ari_sim::AriSim>],
    background: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
) -> ExitCode {
    for sim in sims.iter().flatten() {
        for ch in sim.snapshot().channels {
            let _ = sim.hangup_far_end(&ch.id, 16).await;
        }
    }
    for i in 0..cluster.nodes.len() {
        if cluster.nodes[i].alive {
            let _ = cluster.drain(i, None).await;
        }
    }
    wait_empty(cluster).await;
    traffic.check();
    let nodes = cluster.store.list_nodes().await.unwrap_or_default();
    let splits = stats::with(&traffic.stats, |s| s.splits);
    for b in background {
        b.abort();
    }
    cluster.stop().await;
    view::summary(traffic, &nodes, started.elapsed().as_secs_f64());
    if splits > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Ends the process on a second Ctrl-C, with no drain and no summary: Redis, the only child
/// process, is killed (and its directory removed); the agents, controllers and simulated
/// Asterisks are threads and tasks of this process and end with it.
fn stop_at_once(cluster: Cluster) -> ! {
    // Dropping the server kills it (SIGKILL), reaps it and removes its directory; what is
    // left of the orderly stop (an agent still draining) is not waited for.
    drop(cluster.redis);
    eprintln!("confroute-dev: stopped at once (nodes not drained, no summary)");
    std::process::exit(130)
}

fn validate(a: &DevArgs) -> Result<(), String> {
    if a.nodes == 0 || a.nodes > 50 {
        return Err("--nodes must be 1-50".into());
    }
    if a.controllers == 0 || a.controllers > 10 {
        return Err("--controllers must be 1-10".into());
    }
    if a.conferences == 0 {
        return Err("--conferences must be at least 1".into());
    }
    // Bounded so that every interval the generator derives from them is a Duration.
    if !(0.01..=5000.0).contains(&a.rate) {
        return Err("--rate must be between 0.01 and 5000 calls/s".into());
    }
    if !(a.hold_min >= 0.0 && a.hold_max >= a.hold_min && a.hold_max <= 86_400.0) {
        return Err("--hold-min must be >= 0 and <= --hold-max, at most 86400 s".into());
    }
    if !(a.dialouts_per_minute == 0.0 || (0.01..=60_000.0).contains(&a.dialouts_per_minute)) {
        return Err("--dialouts-per-minute must be 0 or between 0.01 and 60000".into());
    }
    if a.capacity == 0 {
        return Err("--capacity must be at least 1".into());
    }
    for (flag, value) in [
        ("--duration", a.duration),
        ("--kill-node-after", a.kill_node_after),
        ("--drain-node-after", a.drain_node_after),
    ] {
        if value.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
            return Err(format!("{flag} must be a number of seconds, 0 or more"));
        }
    }
    if a.kill_node_after.is_some() && a.nodes < 2 {
        return Err("--kill-node-after needs at least 2 nodes (one must survive)".into());
    }
    if a.sip_uri.is_some() && a.ari.is_none() {
        return Err("--sip-uri is the SIP address of the real Asterisk given with --ari".into());
    }
    Ok(())
}

/// The real Asterisk of `--ari`, if given, with its SIP address: `--sip-uri`, or port 5060 on
/// the host of the ARI URL.
fn real_ari(a: &DevArgs) -> Result<Option<RealAri>, String> {
    let Some(url) = &a.ari else {
        return Ok(None);
    };
    let sip_uri = match &a.sip_uri {
        Some(uri) => uri.clone(),
        None => {
            let host = reqwest::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .ok_or_else(|| {
                    format!("--ari `{url}` is not a URL with a host, e.g. http://10.0.0.5:8088")
                })?;
            format!("sip:{host}:5060")
        }
    };
    Ok(Some(RealAri {
        url: url.clone(),
        username: a.ari_username.clone(),
        password: a.ari_password.clone(),
        app: a.ari_app.clone(),
        sip_uri,
    }))
}

fn init_logging(file: &std::path::Path) {
    use tracing_subscriber::EnvFilter;
    let Ok(f) = std::fs::File::create(file) else {
        return;
    };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(f))
        .try_init();
}

/// What the generator places.
struct Load {
    controllers: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
    conferences: usize,
    rate: f64,
    hold: (f64, f64),
    entry: Entry,
    dialouts_per_minute: f64,
    token: String,
}

/// Dial-outs per minute the generator places: none with a real Asterisk, whose node could
/// host the conference and would dial a real number through its trunk.
fn generated_dialouts(args: &DevArgs) -> f64 {
    if args.ari.is_some() {
        0.0
    } else {
        args.dialouts_per_minute
    }
}

/// Places callers at the configured rate, and dial-outs now and then.
async fn generate(traffic: Traffic, sims: Arc<Vec<Option<crate::ari_sim::AriSim>>>, load: Load) {
    let Load {
        controllers,
        conferences,
        rate,
        hold: (hold_min, hold_max),
        entry,
        dialouts_per_minute,
        token,
    } = load;
    let names: Vec<String> = (0..conferences).map(|i| format!("conf-{i:03}")).collect();
    let http = crate::fixtures::http();
    let every = Duration::from_secs_f64(1.0 / rate);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let dial_every =
        (dialouts_per_minute > 0.0).then(|| Duration::from_secs_f64(60.0 / dialouts_per_minute));
    let mut next_dial = Instant::now() + dial_every.unwrap_or_default() / 2;
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        let (conf, hold, controller) = {
            let mut rng = rand::rng();
            let conf = names[rng.random_range(0..names.len())].clone();
            let hold = Duration::from_secs_f64(rng.random_range(hold_min..=hold_max));
            (conf, hold, controllers[n as usize % controllers.len()])
        };
        let use_sip = match entry {
            Entry::Sip => true,
            Entry::Http => false,
            Entry::Mixed => n.is_multiple_of(2),
        };
        tokio::spawn(traffic::call(
            traffic.clone(),
            sims.clone(),
            http.clone(),
            controller,
            token.clone(),
            use_sip,
            conf.clone(),
            hold,
        ));
        if let Some(d) = dial_every {
            if Instant::now() >= next_dial {
                next_dial += d;
                tokio::spawn(traffic::dialout(
                    traffic.clone(),
                    controller.1,
                    token.clone(),
                    conf,
                    sims.clone(),
                    hold,
                ));
            }
        }
    }
}

/// Waits (up to 20 s) until no live node hosts a conference.
async fn wait_empty(cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let http = crate::fixtures::http();
    loop {
        let mut busy = 0;
        for n in cluster.nodes.iter().filter(|n| n.alive) {
            if let Ok(r) = http
                .get(format!("http://{}/v1/conferences", n.http))
                .send()
                .await
            {
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                busy += v["items"].as_array().map(Vec::len).unwrap_or(0);
            }
        }
        if busy == 0 || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a real Asterisk behind node 1 the generator dials no one out: the conference
    /// could be on that node, whose dial-outs leave through a real trunk.
    #[test]
    fn no_dialouts_are_generated_with_a_real_asterisk() {
        let simulated = DevArgs::parse_from(["confroute-dev"]);
        assert!(generated_dialouts(&simulated) > 0.0);
        let real = DevArgs::parse_from(["confroute-dev", "--ari", "http://10.0.0.5:8088"]);
        assert_eq!(generated_dialouts(&real), 0.0);
    }

    /// A real Asterisk gets an app of its own (not the production agents' `confroute`, which
    /// Asterisk would hand over to this newer subscriber) and a SIP address callers can
    /// reach: its own host unless `--sip-uri` names another.
    #[test]
    fn a_real_asterisk_gets_its_own_app_and_a_reachable_sip_address() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["confroute-dev"];
            argv.extend_from_slice(extra);
            DevArgs::parse_from(argv)
        };
        assert!(real_ari(&parse(&[])).expect("no --ari").is_none());
        let real = real_ari(&parse(&["--ari", "http://10.0.0.5:8088"]))
            .expect("valid")
            .expect("given");
        assert_eq!(real.app, "confroute-dev");
        assert_eq!(real.sip_uri, "sip:10.0.0.5:5060");
        assert_eq!(real.url, "http://10.0.0.5:8088");
        let v6 = real_ari(&parse(&["--ari", "http://[fd00::5]:8088"]))
            .expect("valid")
            .expect("given");
        assert_eq!(v6.sip_uri, "sip:[fd00::5]:5060");
        let chosen = real_ari(&parse(&[
            "--ari",
            "http://10.0.0.5:8088",
            "--ari-app",
            "lab",
            "--sip-uri",
            "sip:pbx.lab:5080;transport=tcp",
        ]))
        .expect("valid")
        .expect("given");
        assert_eq!(chosen.app, "lab");
        assert_eq!(chosen.sip_uri, "sip:pbx.lab:5080;transport=tcp");
        assert!(real_ari(&parse(&["--ari", "10.0.0.5:8088"])).is_err());
        assert!(validate(&parse(&["--sip-uri", "sip:10.0.0.5"])).is_err());
    }

    /// Numbers the generator could not turn into intervals (or that would panic its task and
    /// leave the view at zero calls) are refused at start, naming the flag.
    #[test]
    fn numbers_the_generator_cannot_use_are_refused_naming_the_flag() {
        let check = |extra: &[&str]| {
            let mut argv = vec!["confroute-dev".to_string()];
            // `--flag=` with its value joined: a value starting with `-` is no flag then.
            match extra {
                [flag, value] if flag.ends_with('=') => argv.push(format!("{flag}{value}")),
                _ => argv.extend(extra.iter().map(|a| a.to_string())),
            }
            validate(&DevArgs::try_parse_from(argv).expect("parses"))
        };
        assert!(check(&[]).is_ok());
        assert!(check(&["--dialouts-per-minute", "0", "--rate", "0.5"]).is_ok());
        for (flag, value) in [
            ("--rate", "1e-30"),
            ("--rate", "NaN"),
            ("--hold-max", "1e20"),
            ("--hold-max", "inf"),
            ("--dialouts-per-minute", "1e-300"),
            ("--dialouts-per-minute=", "-1"),
            ("--capacity", "0"),
            ("--duration", "NaN"),
            ("--kill-node-after=", "-5"),
            ("--drain-node-after", "inf"),
        ] {
            let refused = check(&[flag, value]).expect_err(value);
            let flag = flag.trim_end_matches('=');
            let named = if flag == "--hold-max" {
                "--hold-"
            } else {
                flag
            };
            assert!(refused.contains(named), "{flag} {value}: {refused}");
        }
    }

    /// The log directory is new and this run's own: never one already there.
    #[test]
    fn each_run_gets_a_log_directory_of_its_own() {
        let (a, b) = (log_dir().expect("dir"), log_dir().expect("dir"));
        assert_ne!(a, b);
        assert!(a.is_dir() && b.is_dir());
        for d in [a, b] {
            std::fs::remove_dir(d).expect("empty, removed");
        }
    }
}
