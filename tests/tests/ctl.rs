//! `confroute-ctl` against a running controller with real Redis: listing, drain/undrain,
//! routing, the token, and its error output.

use std::process::Command;
use std::time::Duration;

use confroute_tests::fixtures;
use confroute_tests::harness::{workspace_bin, ControllerProc, RedisServer};

const TOKEN: &str = "ctl-token-0123456789abcdef";

fn ctl(url: &str, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(workspace_bin("confroute-ctl").expect("confroute-ctl built"));
    cmd.arg("--url")
        .arg(url)
        .args(args)
        .env_remove("CONFROUTE_CTL_TOKEN");
    if let Some(t) = token {
        cmd.env("CONFROUTE_CTL_TOKEN", t);
    }
    let out = cmd.output().expect("run confroute-ctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_lists_routes_drains_and_reports_errors() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    for id in ["node-a", "node-b"] {
        store
            .register(&fixtures::node(id, 50), Duration::from_secs(300))
            .await
            .expect("register");
    }
    let mut env = fixtures::redis_env(&cfg);
    env.push(("CONFROUTE_HTTP__API_TOKEN".into(), TOKEN.into()));
    let controller = ControllerProc::start(&env).expect("controller");
    let url = controller.http_url();

    let (ok, out, err) = ctl(&url, Some(TOKEN), &["nodes", "list"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("ID"), "a table with a header: {out}");
    assert!(
        out.contains("node-a") && out.contains("node-b") && out.contains("serving"),
        "{out}"
    );

    let (ok, out, err) = ctl(&url, Some(TOKEN), &["--json", "nodes", "list"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(2));

    let (ok, out, err) = ctl(&url, Some(TOKEN), &["nodes", "drain", "node-a"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "node-a: serving -> draining");
    let node_a = store
        .get_node(&fixtures::id("node-a"))
        .await
        .expect("get")
        .expect("live");
    assert_eq!(node_a.info.state.as_str(), "draining");

    let (ok, out, err) = ctl(&url, Some(TOKEN), &["route", "weekly-sync"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("weekly-sync -> node-b"),
        "a drained node gets nothing new: {out}"
    );
    assert!(out.contains("new"), "{out}");

    let (ok, out, err) = ctl(&url, Some(TOKEN), &["conferences", "list"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("weekly-sync") && out.contains("node-b"),
        "{out}"
    );

    let (ok, out, err) = ctl(&url, Some(TOKEN), &["nodes", "undrain", "node-a"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "node-a: draining -> serving");

    // Errors: exit non-zero with the API's code, nothing changed.
    let (ok, _, err) = ctl(&url, None, &["nodes", "drain", "node-b"]);
    assert!(!ok);
    assert!(err.contains("unauthorized"), "{err}");
    let node_b = store
        .get_node(&fixtures::id("node-b"))
        .await
        .expect("get")
        .expect("live");
    assert_eq!(node_b.info.state.as_str(), "serving");
    let (ok, _, err) = ctl(&url, Some(TOKEN), &["nodes", "drain", "ghost"]);
    assert!(!ok);
    assert!(err.contains("node_not_found"), "{err}");
    let (ok, _, err) = ctl(&url, Some(TOKEN), &["route", "bad name"]);
    assert!(!ok);
    assert!(err.contains("invalid_conference"), "{err}");
    let (ok, _, err) = ctl("http://127.0.0.1:1", Some(TOKEN), &["nodes", "list"]);
    assert!(!ok);
    assert!(err.contains("cannot reach"), "{err}");
}
