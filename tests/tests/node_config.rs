//! The agent refuses a bad configuration before doing anything, naming the key, the
//! expected form and where the value came from (exit code 2); its `/metrics` passes
//! `promtool check metrics`.

mod node_common;

use std::process::Command;
use std::time::Duration;

use confroute_tests::fixtures;
use confroute_tests::harness::{require_tool, workspace_bin, Proc, TempDir};
use node_common::*;

fn run_to_exit(env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let dir = TempDir::new("node-cfg").expect("temp dir");
    let mut cmd = Command::new(workspace_bin("confroute-node").expect("binary built"));
    cmd.args(args).envs(env.iter().copied());
    let mut p = Proc::spawn("confroute-node", cmd, &dir.path().join("out.log")).expect("start");
    let code = p.wait_exit(Duration::from_secs(20)).expect("exits");
    (code, p.output())
}

#[test]
fn bad_keys_and_values_stop_start_up_naming_the_key() {
    // (variable, value, key, whether the message can name the variable: values that fail
    // to parse carry their origin, values that parse but are out of range do not)
    let cases: &[(&str, &str, &str, bool)] = &[
        ("CONFROUTE_NODE__CAPACITY", "0", "`node.capacity`", false),
        (
            "CONFROUTE_NODE__HEARTBEAT_INTERVAL",
            "often",
            "`node.heartbeat_interval`",
            true,
        ),
        (
            "CONFROUTE_NODE__HEARTBEAT_INTERVAL",
            "30s",
            "`node.heartbeat_interval`",
            false,
        ),
        ("CONFROUTE_REDIS__TLS", "true", "`redis.tls`", false),
        ("CONFROUTE_ARI__URL", "ftp://asterisk", "`ari.url`", false),
        ("CONFROUTE_ARI__NOPE", "1", "`ari.nope`", true),
        (
            "CONFROUTE_NODE__WRONG_NODE",
            "bounce",
            "`node.wrong_node`",
            true,
        ),
        (
            "CONFROUTE_CONFERENCE__BEEP",
            "loud",
            "`conference.beep`",
            true,
        ),
        (
            "CONFROUTE_PROFILES__VIP__MAX_PARTICIPANTS",
            "0",
            "`profiles.vip.max_participants`",
            false,
        ),
        // Past the upper bounds (a value near the type's limit overflowed at a SIGTERM).
        (
            "CONFROUTE_NODE__DRAIN_DEADLINE",
            "300000000000y",
            "`node.drain_deadline`",
            false,
        ),
        (
            "CONFROUTE_ARI__RECONCILE_INTERVAL",
            "25h",
            "`ari.reconcile_interval`",
            false,
        ),
        (
            "CONFROUTE_ARI__PING_INTERVAL",
            "2h",
            "`ari.ping_interval`",
            false,
        ),
        (
            "CONFROUTE_ARI__RELEASE_AFTER",
            "8d",
            "`ari.release_after`",
            false,
        ),
        (
            "CONFROUTE_ARI__REQUEST_TIMEOUT",
            "2h",
            "`ari.request_timeout`",
            false,
        ),
    ];
    for (var, value, key, origin) in cases {
        let (code, out) = run_to_exit(&[(var, value)], &[]);
        assert_eq!(code, Some(2), "{var}={value}: {out}");
        assert!(out.contains(key), "{var}={value}: {out}");
        if *origin {
            assert!(out.contains(var), "origin named for {var}: {out}");
        }
        assert!(!out.contains("started"), "{out}");
    }
}

#[test]
fn bad_value_in_a_file_names_key_form_and_file() {
    let dir = TempDir::new("node-cfg").expect("temp dir");
    let file = dir.path().join("node.toml");
    for (text, key, form) in [
        (
            "[node]\nid = \"node-1\"\n[conference]\nrecord = \"always\"\n",
            "`conference.record`",
            "record-from-start",
        ),
        (
            "[ari]\nrequest_timeout = \"soon\"\n",
            "`ari.request_timeout`",
            "500ms",
        ),
        (
            "[profiles.vip]\nbeep = \"sometimes\"\n",
            "`profiles.vip.beep`",
            "onEnter",
        ),
    ] {
        std::fs::write(&file, text).expect("write");
        let (code, out) = run_to_exit(&[], &["--config", file.to_str().expect("utf-8")]);
        assert_eq!(code, Some(2), "{out}");
        assert!(out.contains(key) && out.contains(form), "{text}: {out}");
        assert!(out.contains("node.toml"), "{out}");
        assert!(!out.contains("started"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool() {
    let promtool = require_tool("promtool", "prometheus").expect("promtool");
    let s = Single::start(&[]).await;
    let a = dial(&s.sim, "metrics-room", &[]).await;
    wait_bridged(&s.sim, &a).await;
    let bad = dial(&s.sim, "bad name", &[]).await;
    wait_hangup(&s.sim, &bad).await;
    let text = fixtures::scrape(&s.node.http_url()).await;
    for series in [
        "confroute_node_conferences",
        "confroute_node_participants",
        "confroute_node_joins_total",
        "confroute_node_leaves_total",
        "confroute_node_join_duration_seconds_bucket",
        "confroute_ari_request_duration_seconds_bucket",
        "confroute_ari_reconnects_total",
        "confroute_webhook_deliveries_total",
        "confroute_node_ownership_losses_total",
        "confroute_node_state",
        "confroute_redis_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(series), "{series} missing:\n{text}");
    }
    assert!(
        !text.contains("metrics-room"),
        "no conference names in labels"
    );
    let dir = TempDir::new("promtool").expect("dir");
    let path = dir.path().join("metrics.txt");
    std::fs::write(&path, &text).expect("write");
    let out = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&path).expect("open"))
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A node lease (three heartbeats) under twice `redis.timeout` validates, but one heartbeat
/// Redis answers slowly yet within its timeout can let the node record lapse: the agent says
/// so at start, naming both keys; with the defaults it says nothing.
#[test]
fn a_node_lease_under_twice_the_redis_timeout_is_warned_of() {
    for (env, warned) in [
        (
            vec![
                ("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "200ms"),
                ("CONFROUTE_REDIS__TIMEOUT", "1s"),
            ],
            true,
        ),
        (vec![], false),
    ] {
        let dir = TempDir::new("node-lease").expect("temp dir");
        let mut cmd = Command::new(workspace_bin("confroute-node").expect("binary built"));
        cmd.env_clear()
            .env("CONFROUTE_REDIS__URL", "redis://127.0.0.1:9")
            .env("CONFROUTE_HTTP__LISTEN", "127.0.0.1:0")
            .env("CONFROUTE_ARI__URL", "http://127.0.0.1:9")
            // Not the host name's default, which a host name with `_` makes refused.
            .env("CONFROUTE_NODE__SIP_URI", "sip:127.0.0.1:5060")
            .envs(env.iter().copied());
        let mut p = Proc::spawn("confroute-node", cmd, &dir.path().join("out.log")).expect("start");
        // Said before the start line, on the same thread.
        confroute_tests::harness::wait_for("the start line", Duration::from_secs(20), || {
            p.output().contains("confroute-node started").then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", p.output()));
        let out = p.output();
        assert_eq!(
            out.contains("is under twice redis.timeout"),
            warned,
            "{env:?}:\n{out}"
        );
        p.kill();
    }
}
