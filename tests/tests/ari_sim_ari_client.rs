//! A real third-party ARI client drives the simulator: the npm `ari-client` library builds itself
//! from the simulator's `/ari/api-docs`, then runs Asterisk's bridge-hold example
//! (`tests/node/bridge-hold.js`): list bridges, create a holding bridge, take a caller from
//! `StasisStart`, answer, add it to the bridge, start music on hold, and see `StasisEnd` when
//! the caller hangs up.
//!
//! Needs node and npm; the test installs `ari-client` into `tests/node/node_modules` with npm
//! when it is not there yet, and fails (it does not skip) when node or npm are missing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use confroute_tests::ari_sim::{AriSim, DialIn, SimConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

const APP: &str = "bridge-hold-example";

fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("node")
}

async fn require_tool(tool: &str) {
    let out = Command::new(tool).arg("--version").output().await;
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`{tool} --version` failed ({}); node and npm are required for the ari-client test",
            o.status
        ),
        Err(e) => {
            panic!("`{tool}` cannot run ({e}); node and npm are required for the ari-client test")
        }
    }
}

async fn install_ari_client() {
    let dir = node_dir();
    if dir.join("node_modules/ari-client/package.json").is_file() {
        return;
    }
    let run = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("npm install finishes within 5 minutes")
        .expect("npm install runs");
    assert!(
        out.status.success(),
        "npm install in {} failed: {}\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn npm_ari_client_runs_the_bridge_hold_example() {
    // node-ari-client builds its API from the simulator's /ari/api-docs, served from
    // Asterisk's Swagger files.
    let docs = confroute_tests::ari_sim::spec::docs_dir();
    if !docs.join("resources.json").is_file() {
        println!(
            "skipping the ari-client test: spec folder {} is absent (set ARI_API_DOCS)",
            docs.display()
        );
        return;
    }
    require_tool("node").await;
    require_tool("npm").await;
    install_ari_client().await;

    let sim = AriSim::start(SimConfig {
        username: "ari".into(),
        password: "s3cret".into(),
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");

    let mut child = Command::new("node")
        .arg(node_dir().join("bridge-hold.js"))
        .args([sim.base_url().as_str(), "ari", "s3cret", APP])
        .current_dir(node_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = BufReader::new(stdout).lines();

    let mut seen: Vec<String> = Vec::new();
    let mut caller = None;
    let run = async {
        while let Some(line) = lines
            .next_line()
            .await
            .expect("reading the script's output")
        {
            seen.push(line.clone());
            let mut words = line.split_whitespace();
            match words.next() {
                Some("READY") => {
                    let id = sim
                        .dial_in(DialIn {
                            app: APP.into(),
                            args: vec!["hold".into()],
                            caller_number: "+15550100".into(),
                            ..DialIn::default()
                        })
                        .await
                        .expect("a caller dials in");
                    caller = Some(id);
                }
                Some("MOH_STARTED") => {
                    let bridge_id = words.next().expect("bridge id").to_string();
                    let ch = caller.clone().expect("the caller dialled in before MOH");
                    let snap = sim.snapshot();
                    let bridge = snap.bridge(&bridge_id).expect("the holding bridge exists");
                    assert_eq!(bridge.bridge_type, "holding");
                    assert_eq!(bridge.channels, vec![ch.clone()]);
                    assert_eq!(bridge.moh.as_deref(), Some("default"));
                    let chan = snap.channel(&ch).expect("the caller's channel exists");
                    assert_eq!(chan.state, "Up", "the example answered the caller");
                    assert_eq!(chan.role.as_deref(), Some("participant"));
                    sim.hangup_far_end(&ch, 16)
                        .await
                        .expect("the caller hangs up");
                }
                Some("STASIS_END") | Some("FAIL") => break,
                _ => {}
            }
        }
    };
    let finished = tokio::time::timeout(Duration::from_secs(60), run).await;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let mut err = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), stderr.read_to_string(&mut err)).await;
    assert!(
        finished.is_ok(),
        "the example did not finish; output: {seen:#?}\nstderr: {err}"
    );
    let status = status
        .expect("node exits after StasisEnd")
        .expect("node's exit status");
    assert!(
        status.success(),
        "node failed ({status}); output: {seen:#?}\nstderr: {err}"
    );

    // swagger-client prints its own notices (a Swagger 1.x deprecation warning) on stdout too.
    const STEPS: [&str; 8] = [
        "BRIDGES",
        "CREATED",
        "READY",
        "STASIS_START",
        "ADDED",
        "MOH_STARTED",
        "STASIS_END",
        "FAIL",
    ];
    let steps: Vec<&str> = seen
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| STEPS.contains(w))
        .collect();
    assert_eq!(
        steps,
        [
            "BRIDGES",
            "CREATED",
            "READY",
            "STASIS_START",
            "ADDED",
            "MOH_STARTED",
            "STASIS_END"
        ],
        "output: {seen:#?}"
    );
    let ch = caller.expect("caller");
    assert!(
        seen.iter()
            .any(|l| l == &format!("STASIS_START {ch} [\"hold\"]")),
        "{seen:#?}"
    );
    assert!(
        seen.iter().any(|l| l == &format!("STASIS_END {ch}")),
        "{seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("CREATED ") && l.ends_with(" holding")),
        "{seen:#?}"
    );

    // The library fetched the docs and used ARI through them.
    let log = sim.request_log();
    for path in [
        "/ari/api-docs/resources.json",
        "/ari/api-docs/bridges.json",
        "/ari/api-docs/events.json",
    ] {
        assert!(
            log.iter().any(|r| r.path == path && r.status == 200),
            "{path} was served: {log:#?}"
        );
    }
    for op in [
        "list",
        "create",
        "answer",
        "addChannel",
        "startMoh",
        "eventWebsocket",
    ] {
        assert!(
            log.iter()
                .any(|r| r.operation.as_deref() == Some(op) && r.status < 300),
            "{op} was called successfully: {log:#?}"
        );
    }
}
