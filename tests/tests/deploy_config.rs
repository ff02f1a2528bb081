//! What the packaging hands the binaries is accepted by them: for every values scenario of
//! the chart, the rendered TOML file plus the container's environment (pod fields, Secrets)
//! starts `confroute-controller` and `confroute-node` past configuration loading (an unknown
//! key or a bad value would stop them with exit code 2); the same for the sample
//! /etc/confroute files of the Debian packages.

#[path = "../deploy/common.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use confroute_tests::harness::{
    free_port, require_tool, wait_for, workspace_bin, Proc, TempDir, TestCa,
};
use serde_json::Value;

/// Stand-ins for what Kubernetes would fill in.
const POD_NAME: &str = "confroute-node-0";
const POD_IP: &str = "127.0.0.1";
const SECRET: &str = "secret-from-an-existing-secret-0123456789";

/// The environment Kubernetes would give `container` (`$(VAR)` references expanded, pod
/// fields and Secrets filled in).
fn pod_env(r: &Rendered, container: &Value) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for e in container["env"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let name = e["name"].as_str().expect("env name").to_string();
        let value = if let Some(v) = e["value"].as_str() {
            let mut v = v.to_string();
            for (k, val) in &env {
                v = v.replace(&format!("$({k})"), val);
            }
            v
        } else if let Some(f) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match f {
                "metadata.name" => POD_NAME.to_string(),
                "status.podIP" | "status.hostIP" => POD_IP.to_string(),
                other => panic!("unexpected field {other}"),
            }
        } else if let Some(s) = e["valueFrom"]["secretKeyRef"].as_object() {
            let (n, k) = (
                s["name"].as_str().expect("name"),
                s["key"].as_str().expect("key"),
            );
            r.secret_value(n, k).unwrap_or_else(|| SECRET.to_string())
        } else {
            panic!("unexpected env entry {e}")
        };
        env.push((name, value));
    }
    env
}

/// Starts `bin` with `config` and `env` (nothing inherited but PATH) and waits until it says
/// it started; fails with its output if it exits first.
fn starts(bin: &str, config: &Path, env: &[(String, String)], what: &str) {
    let dir = TempDir::new("config-check").expect("dir");
    let mut cmd = Command::new(workspace_bin(bin).expect("binary"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .arg("--config")
        .arg(config)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut p = Proc::spawn(bin, cmd, &dir.path().join("out.log")).expect("spawn");
    let done = wait_for(
        &format!("{what}: {bin} to start"),
        Duration::from_secs(30),
        || {
            let out = p.output();
            if out.contains(&format!("{bin} started")) {
                Some(Ok(()))
            } else if !p.is_running() {
                Some(Err(out))
            } else {
                None
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", p.output()));
    if let Err(out) = done {
        panic!("{what}: {bin} refused its configuration:\n{out}");
    }
    p.kill();
}

/// Listen addresses the test can bind, overriding the chart's (the environment wins over
/// the file).
fn local_listen(sip: bool) -> Vec<(String, String)> {
    let mut v = vec![(
        "CONFROUTE_HTTP__LISTEN".to_string(),
        format!("127.0.0.1:{}", free_port()),
    )];
    if sip {
        v.push((
            "CONFROUTE_SIP__LISTEN".to_string(),
            format!(
                "127.0.0.1:{}",
                confroute_tests::harness::free_udp_tcp_port()
            ),
        ));
    }
    v
}

/// Where the chart mounts the Redis TLS Secret.
const REDIS_TLS_MOUNT: &str = "/etc/confroute/redis-tls";

/// A rendered config file as the pod sees it: the Redis TLS Secret's mount point is a
/// directory holding what such a Secret holds (`ca.crt`, `tls.crt`, `tls.key`).
fn as_mounted(toml: &str, secret_dir: &Path) -> String {
    toml.replace(REDIS_TLS_MOUNT, &secret_dir.to_string_lossy())
}

#[test]
fn binaries_accept_what_the_chart_renders() {
    let ca = TestCa::new().expect("test CA");
    let secret = TempDir::new("redis-tls-secret").expect("dir");
    for (from, to) in [
        ("ca.pem", "ca.crt"),
        ("client.pem", "tls.crt"),
        ("client.key", "tls.key"),
    ] {
        std::fs::copy(ca.file(from), secret.path().join(to)).expect("copy");
    }
    for (name, values) in scenarios() {
        let r = render(&values);
        let dir = TempDir::new("rendered-config").expect("dir");

        let ctl_toml = dir.path().join("controller.toml");
        std::fs::write(
            &ctl_toml,
            as_mounted(
                r.one("ConfigMap", "-controller")["data"]["controller.toml"]
                    .as_str()
                    .expect("controller.toml"),
                secret.path(),
            ),
        )
        .expect("write");
        let deploy = r.one("Deployment", "-controller");
        let mut env = pod_env(&r, r.container(deploy, "controller"));
        env.extend(local_listen(true));
        starts("confroute-controller", &ctl_toml, &env, &name);

        let node_toml = dir.path().join("node.toml");
        std::fs::write(
            &node_toml,
            as_mounted(
                r.one("ConfigMap", "-node")["data"]["node.toml"]
                    .as_str()
                    .expect("node.toml"),
                secret.path(),
            ),
        )
        .expect("write");
        let sts = r.one("StatefulSet", "-node");
        let mut env = pod_env(&r, r.container(sts, "agent"));
        env.extend(local_listen(false));
        // The pod's own address and name reach the node record.
        assert!(env.contains(&("CONFROUTE_NODE__ID".into(), POD_NAME.into())));
        assert!(env
            .iter()
            .any(|(k, v)| k == "CONFROUTE_NODE__SIP_URI" && v.starts_with("sip:127.0.0.1:")));
        starts("confroute-node", &node_toml, &env, &name);
    }
}

#[test]
fn binaries_accept_the_packaged_sample_configuration() {
    let dir = repo().join("examples/packaging");
    // The samples name the usual local Redis and Asterisk ports: a private Redis and an ARI
    // port nobody serves keep a developer's own Redis and Asterisk out of the test.
    let redis = confroute_tests::harness::RedisServer::start().expect("redis");
    let private = [
        ("CONFROUTE_REDIS__URL".to_string(), redis.url()),
        (
            "CONFROUTE_ARI__URL".to_string(),
            format!("http://127.0.0.1:{}", free_port()),
        ),
    ];
    let mut env = local_listen(true);
    env.extend(private.iter().take(1).cloned());
    env.push(("CONFROUTE_HTTP__API_TOKEN".into(), SECRET.into()));
    starts(
        "confroute-controller",
        &dir.join("controller.toml"),
        &env,
        "examples/packaging/controller.toml",
    );
    let mut env = local_listen(false);
    env.extend(private.iter().cloned());
    env.push(("CONFROUTE_ARI__PASSWORD".into(), SECRET.into()));
    starts(
        "confroute-node",
        &dir.join("node.toml"),
        &env,
        "examples/packaging/node.toml",
    );
}

/// The packages install the files their metadata names, and the units stop the way the
/// binaries expect (SIGTERM; the node's stop timeout above its drain deadline).
#[test]
fn deb_metadata_names_existing_files() {
    for (pkg, unit) in [
        ("controller", "confroute-controller"),
        ("conference-node", "confroute-node"),
    ] {
        let manifest = std::fs::read_to_string(repo().join(pkg).join("Cargo.toml")).expect("toml");
        let meta = manifest
            .split("[package.metadata.deb]")
            .nth(1)
            .unwrap_or_else(|| panic!("{pkg}/Cargo.toml has no [package.metadata.deb]"));
        for src in meta.split('"').filter(|s| s.starts_with("../")) {
            let path = repo().join(pkg).join(src);
            assert!(path.exists(), "{pkg}: {src} does not exist");
        }
        let service = std::fs::read_to_string(
            repo().join(format!("examples/packaging/systemd/{unit}.service")),
        )
        .expect("unit");
        assert!(service.contains("Restart=on-failure"), "{unit}");
        assert!(service.contains("KillSignal=SIGTERM"), "{unit}");
        assert!(service.contains("TimeoutStopSec="), "{unit}");
    }
    let node =
        std::fs::read_to_string(repo().join("examples/packaging/systemd/confroute-node.service"))
            .expect("unit");
    assert!(node.contains("TimeoutStopSec=4h 5min"));
    let sample =
        std::fs::read_to_string(repo().join("examples/packaging/node.toml")).expect("toml");
    assert!(sample.contains("drain_deadline = \"4h\""));
}

/// systemd reads the units without a complaint (an unknown key, a value it cannot parse, a
/// setting of the wrong section: `systemd-analyze verify` prints each and systemd would
/// ignore it). The packages install the binaries in /usr/bin, which the metadata test above
/// checks; here the units point at the built ones, since verify also checks the command.
#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let analyze = require_tool("systemd-analyze", "systemd").expect("systemd-analyze");
    let dir = TempDir::new("units").expect("dir");
    let mut units = Vec::new();
    for unit in ["confroute-controller", "confroute-node"] {
        let text = std::fs::read_to_string(
            repo().join(format!("examples/packaging/systemd/{unit}.service")),
        )
        .expect("unit");
        let installed = format!("/usr/bin/{unit} ");
        assert!(
            text.contains(&installed),
            "{unit}: ExecStart runs {installed}"
        );
        let built = workspace_bin(unit).expect("built binary");
        let path = dir.path().join(format!("{unit}.service"));
        std::fs::write(
            &path,
            text.replace(&installed, &format!("{} ", built.display())),
        )
        .expect("write unit");
        units.push(path);
    }
    let out = Command::new(&analyze)
        .arg("verify")
        .args(&units)
        .output()
        .expect("systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
}

/// Durations whose bounds the schema cannot express (the heartbeat at most a third of the
/// 60 s conference lease, the TCP idle timeout at least 1 s, the WebSocket ping and the
/// command timeout within their ranges, the routing deadline, node refresh and Redis timeout
/// above their floors): a value
/// the binary would refuse at start, crash-looping every pod, is refused by the chart with
/// the key's name; the bounds themselves render and start.
#[test]
fn durations_the_binaries_refuse_are_refused_by_the_chart() {
    let dir = TempDir::new("durations").expect("dir");
    let cases = [
        (
            serde_json::json!({"node": {"config": {"node": {"heartbeat_interval": "30s"}}}}),
            "node.config.node.heartbeat_interval",
            (
                "confroute-node",
                "CONFROUTE_NODE__HEARTBEAT_INTERVAL",
                "30s",
            ),
        ),
        (
            serde_json::json!({"node": {"config": {"node": {"heartbeat_interval": "20s 1ms"}}}}),
            "node.config.node.heartbeat_interval",
            (
                "confroute-node",
                "CONFROUTE_NODE__HEARTBEAT_INTERVAL",
                "20s 1ms",
            ),
        ),
        (
            serde_json::json!({"node": {"config": {"node": {"heartbeat_interval": "50ms"}}}}),
            "node.config.node.heartbeat_interval",
            (
                "confroute-node",
                "CONFROUTE_NODE__HEARTBEAT_INTERVAL",
                "50ms",
            ),
        ),
        (
            serde_json::json!({"controller": {"config": {"sip": {"tcp_idle_timeout": "500ms"}}}}),
            "controller.config.sip.tcp_idle_timeout",
            (
                "confroute-controller",
                "CONFROUTE_SIP__TCP_IDLE_TIMEOUT",
                "500ms",
            ),
        ),
        (
            serde_json::json!({"controller": {"config": {"rpc": {"ping_interval": "0s"}}}}),
            "controller.config.rpc.ping_interval",
            ("confroute-controller", "CONFROUTE_RPC__PING_INTERVAL", "0s"),
        ),
        (
            serde_json::json!({"controller": {"config": {"rpc": {"ping_interval": "25h"}}}}),
            "controller.config.rpc.ping_interval",
            (
                "confroute-controller",
                "CONFROUTE_RPC__PING_INTERVAL",
                "25h",
            ),
        ),
        (
            serde_json::json!({"controller": {"config": {"rpc": {"command_timeout": "50ms"}}}}),
            "controller.config.rpc.command_timeout",
            (
                "confroute-controller",
                "CONFROUTE_RPC__COMMAND_TIMEOUT",
                "50ms",
            ),
        ),
        (
            serde_json::json!({"controller": {"config": {"routing": {"deadline": "0s"}}}}),
            "controller.config.routing.deadline",
            ("confroute-controller", "CONFROUTE_ROUTING__DEADLINE", "0s"),
        ),
        (
            serde_json::json!({"controller": {"config": {"routing": {"node_refresh": "10ms"}}}}),
            "controller.config.routing.node_refresh",
            (
                "confroute-controller",
                "CONFROUTE_ROUTING__NODE_REFRESH",
                "10ms",
            ),
        ),
        (
            serde_json::json!({"controller": {"config": {"routing": {"deadline": "40s"}}}}),
            "controller.config.routing.deadline",
            ("confroute-controller", "CONFROUTE_ROUTING__DEADLINE", "40s"),
        ),
        (
            serde_json::json!({"controller": {"config": {"http": {"header_timeout": "2h"}}}}),
            "controller.config.http.header_timeout",
            (
                "confroute-controller",
                "CONFROUTE_HTTP__HEADER_TIMEOUT",
                "2h",
            ),
        ),
        (
            serde_json::json!({"node": {"config": {"webhook": {"shutdown_wait": "11m"}}}}),
            "node.config.webhook.shutdown_wait",
            ("confroute-node", "CONFROUTE_WEBHOOK__SHUTDOWN_WAIT", "11m"),
        ),
        (
            serde_json::json!({"node": {"config": {"ari": {"release_after": "500ms"}}}}),
            "node.config.ari.release_after",
            ("confroute-node", "CONFROUTE_ARI__RELEASE_AFTER", "500ms"),
        ),
        (
            serde_json::json!({"redis": {"timeout": "0s"}}),
            "redis.timeout",
            ("confroute-controller", "CONFROUTE_REDIS__TIMEOUT", "0s"),
        ),
        (
            serde_json::json!({"redis": {"timeout": "2h"}}),
            "redis.timeout",
            ("confroute-controller", "CONFROUTE_REDIS__TIMEOUT", "2h"),
        ),
        (
            serde_json::json!({"node": {"config": {"webhook": {"timeout": "6m"}}}}),
            "node.config.webhook.timeout",
            ("confroute-node", "CONFROUTE_WEBHOOK__TIMEOUT", "6m"),
        ),
        (
            serde_json::json!({"node": {"config": {"webhook": {"retry_max": "2h"}}}}),
            "node.config.webhook.retry_max",
            ("confroute-node", "CONFROUTE_WEBHOOK__RETRY_MAX", "2h"),
        ),
        (
            serde_json::json!({"node": {"config": {"ari": {"reconcile_interval": "25h"}}}}),
            "node.config.ari.reconcile_interval",
            ("confroute-node", "CONFROUTE_ARI__RECONCILE_INTERVAL", "25h"),
        ),
        (
            serde_json::json!({"node": {"config": {"ari": {"request_timeout": "2h"}}}}),
            "node.config.ari.request_timeout",
            ("confroute-node", "CONFROUTE_ARI__REQUEST_TIMEOUT", "2h"),
        ),
    ];
    for (values, key, (bin, var, value)) in cases {
        // The binary refuses it (so the chart must).
        let out = Command::new(workspace_bin(bin).expect("binary"))
            .env_clear()
            .env(var, value)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{bin} accepted {var}={value}");
        let file = values_file(dir.path(), "bad", &values);
        let out = chart_py(&[
            "render",
            chart_dir().to_str().expect("path"),
            file.to_str().expect("path"),
            dir.path().join("out").to_str().expect("path"),
        ]);
        let msg = text(&out);
        assert!(!out.status.success(), "{values}: rendered\n{msg}");
        assert!(
            msg.contains(key),
            "{values}: the message does not name {key}:\n{msg}"
        );
    }

    // The bounds are accepted by the chart and by the binaries (the grace period covering a
    // stop that waits out the longest routing deadline).
    let values = serde_json::json!({
        "controller": {"terminationGracePeriodSeconds": 45, "config": {
            "sip": {"tcp_idle_timeout": "1s"},
            "rpc": {"ping_interval": "1000ms"},
            "routing": {"deadline": "31s"},
            "http": {"header_timeout": "1h"},
        }},
        "node": {"config": {
            "node": {"heartbeat_interval": "20s"},
            "ari": {"release_after": "0s"},
        }},
    });
    let r = render(&values_file(dir.path(), "bounds", &values));
    let cfg = dir.path().join("controller.toml");
    std::fs::write(
        &cfg,
        r.one("ConfigMap", "-controller")["data"]["controller.toml"]
            .as_str()
            .expect("controller.toml"),
    )
    .expect("write");
    let mut env = pod_env(
        &r,
        r.container(r.one("Deployment", "-controller"), "controller"),
    );
    env.extend(local_listen(true));
    starts("confroute-controller", &cfg, &env, "bounds");
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        r.one("ConfigMap", "-node")["data"]["node.toml"]
            .as_str()
            .expect("node.toml"),
    )
    .expect("write");
    let mut env = pod_env(&r, r.container(r.one("StatefulSet", "-node"), "agent"));
    env.extend(local_listen(false));
    starts("confroute-node", &cfg, &env, "bounds");
}

/// `RUST_LOG` set but empty (an env file passing `RUST_LOG=${RUST_LOG}` through) is taken
/// for unset: `log.level` applies, and a Redis that cannot be reached at start-up is still
/// said. As a filter, the empty value turned every line off.
#[test]
fn an_empty_rust_log_leaves_log_level_in_charge() {
    for (bin, sip) in [("confroute-controller", true), ("confroute-node", false)] {
        let dir = TempDir::new("empty-rust-log").expect("dir");
        let mut cmd = Command::new(workspace_bin(bin).expect("binary"));
        cmd.env_clear()
            .env("RUST_LOG", "")
            .env("CONFROUTE_REDIS__URL", "redis://127.0.0.1:9")
            .envs(local_listen(sip));
        if !sip {
            // Not the host name's default, which a host name with `_` makes refused.
            cmd.env("CONFROUTE_NODE__SIP_URI", "sip:127.0.0.1:5060");
        }
        let mut p = Proc::spawn(bin, cmd, &dir.path().join("out.log")).expect("spawn");
        wait_for(&format!("{bin} to log"), Duration::from_secs(30), || {
            let out = p.output();
            (out.contains("WARN") && out.contains("redis")).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", p.output()));
        p.kill();
    }
}
