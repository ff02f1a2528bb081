//! The two binaries load their configuration, refuse a bad one with a message naming the
//! key, and stop cleanly on SIGTERM.

use std::process::Command;
use std::time::Duration;

use confroute_tests::harness::{
    free_port, free_udp_tcp_port, wait_for, workspace_bin, Proc, RedisServer, TempDir,
};

const BINARIES: [&str; 2] = ["confroute-controller", "confroute-node"];

fn run_to_exit(bin: &str, env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let dir = TempDir::new("bin").expect("temp dir");
    let mut cmd = Command::new(workspace_bin(bin).expect("binary built"));
    cmd.args(args).envs(env.iter().copied());
    let mut p = Proc::spawn(bin, cmd, &dir.path().join("out.log")).expect("start");
    let code = p.wait_exit(Duration::from_secs(20)).expect("exits");
    (code, p.output())
}

/// Free loopback ports for `bin`'s listeners: tests run side by side, so none may take
/// the defaults.
fn listen_env(bin: &str) -> Vec<(String, String)> {
    let mut env = vec![(
        "CONFROUTE_HTTP__LISTEN".to_string(),
        format!("127.0.0.1:{}", free_port()),
    )];
    if bin == "confroute-controller" {
        env.push((
            "CONFROUTE_SIP__LISTEN".to_string(),
            format!("127.0.0.1:{}", free_udp_tcp_port()),
        ));
    }
    env
}

/// Starts `bin` against `redis` on free ports and waits until its output holds `text`;
/// returns its temporary directory (kept while it runs) and the process.
fn spawn_until(bin: &str, redis: &RedisServer, text: &str) -> (TempDir, Proc) {
    spawn_with_until(bin, &redis.url(), &[], text)
}

/// [`spawn_until`] with `extra` variables.
fn spawn_with_until(
    bin: &str,
    redis_url: &str,
    extra: &[(&str, &str)],
    text: &str,
) -> (TempDir, Proc) {
    let dir = TempDir::new("bin").expect("temp dir");
    let mut cmd = Command::new(workspace_bin(bin).expect("binary built"));
    cmd.env("CONFROUTE_REDIS__URL", redis_url)
        .envs(listen_env(bin))
        .envs(extra.iter().copied());
    let p = Proc::spawn(bin, cmd, &dir.path().join("out.log")).expect("start");
    wait_for(&format!("{bin}: {text:?}"), Duration::from_secs(20), || {
        p.output().contains(text).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", p.output()));
    (dir, p)
}

#[test]
fn unknown_key_stops_start_up_naming_the_key() {
    for bin in BINARIES {
        let (code, out) = run_to_exit(bin, &[("CONFROUTE_REDIS__URLL", "redis://x:1")], &[]);
        assert_eq!(code, Some(2), "{bin}: {out}");
        assert!(out.contains("`redis.urll`"), "{bin}: {out}");
        assert!(out.contains("CONFROUTE_REDIS__URLL"), "{bin}: {out}");
    }
}

#[test]
fn bad_value_in_file_names_key_and_form() {
    let dir = TempDir::new("cfg").expect("temp dir");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[redis]\ntimeout = \"soon\"\n").expect("write config");
    for bin in BINARIES {
        let (code, out) = run_to_exit(bin, &[], &["--config", file.to_str().expect("utf-8")]);
        assert_eq!(code, Some(2), "{bin}: {out}");
        assert!(out.contains("`redis.timeout`"), "{bin}: {out}");
        assert!(out.contains("500ms"), "{bin}: expected form shown: {out}");
    }
}

#[test]
fn starts_logs_without_colour_codes_to_a_file_and_exits_zero_on_sigterm() {
    let redis = RedisServer::start().expect("redis");
    for bin in BINARIES {
        let (_dir, mut p) = spawn_until(bin, &redis, "started");
        p.signal(libc::SIGTERM).expect("sigterm");
        let code = p.wait_exit(Duration::from_secs(10)).expect("exits");
        let log = p.output();
        assert_eq!(code, Some(0), "{bin}: {log}");
        // Its stderr is a file here, not a terminal: no ANSI escapes in the text log.
        assert!(!log.contains('\x1b'), "{bin}: {log:?}");
    }
}

/// A Redis that may evict keys when full could evict live claims and leases: each binary
/// says so in its log once it reaches Redis.
#[test]
fn an_evicting_redis_is_named_in_the_log() {
    let redis =
        RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"])
            .expect("redis");
    for bin in BINARIES {
        let (_dir, mut p) = spawn_until(bin, &redis, "maxmemory-policy allkeys-lru");
        p.signal(libc::SIGTERM).expect("sigterm");
        let _ = p.wait_exit(Duration::from_secs(10));
    }
}

/// An API without `http.api_token` on an address other hosts reach is said in the log (it
/// dials out, ends conferences and drains nodes); with a token, nothing is said.
#[test]
fn an_open_api_on_a_routable_address_is_warned_about() {
    let redis = RedisServer::start().expect("redis");
    let warning = "http.api_token is not set";
    for bin in BINARIES {
        let open = format!("0.0.0.0:{}", free_port());
        let env = [("CONFROUTE_HTTP__LISTEN", open.as_str())];
        let (_dir, mut p) = spawn_with_until(bin, &redis.url(), &env, warning);
        p.signal(libc::SIGTERM).expect("sigterm");
        let _ = p.wait_exit(Duration::from_secs(10));

        let open = format!("0.0.0.0:{}", free_port());
        let env = [
            ("CONFROUTE_HTTP__LISTEN", open.as_str()),
            ("CONFROUTE_HTTP__API_TOKEN", "t0ken-for-the-test"),
        ];
        let (_dir, mut p) = spawn_with_until(bin, &redis.url(), &env, "started");
        p.signal(libc::SIGTERM).expect("sigterm");
        let _ = p.wait_exit(Duration::from_secs(10));
        assert!(!p.output().contains(warning), "{bin}: {}", p.output());
    }
}

/// A controller taking SIP from any host (`sip.trusted_cidrs` empty on an address other
/// hosts reach) says so in its log: anyone sending INVITEs for made-up names places
/// conferences. With the edges trusted, or on loopback, nothing is said.
#[test]
fn sip_open_to_every_host_is_warned_about() {
    let redis = RedisServer::start().expect("redis");
    let warning = "sip.trusted_cidrs is empty";
    let open = format!("0.0.0.0:{}", free_port());
    let env = [("CONFROUTE_SIP__LISTEN", open.as_str())];
    let (_dir, mut p) = spawn_with_until("confroute-controller", &redis.url(), &env, warning);
    p.signal(libc::SIGTERM).expect("sigterm");
    let _ = p.wait_exit(Duration::from_secs(10));

    let open = format!("0.0.0.0:{}", free_port());
    let loopback = format!("127.0.0.1:{}", free_port());
    for env in [
        vec![
            ("CONFROUTE_SIP__LISTEN", open.as_str()),
            ("CONFROUTE_SIP__TRUSTED_CIDRS", "[\"10.0.0.0/8\"]"),
        ],
        vec![("CONFROUTE_SIP__LISTEN", loopback.as_str())],
    ] {
        let (_dir, mut p) = spawn_with_until("confroute-controller", &redis.url(), &env, "started");
        p.signal(libc::SIGTERM).expect("sigterm");
        let _ = p.wait_exit(Duration::from_secs(10));
        assert!(!p.output().contains(warning), "{env:?}: {}", p.output());
    }
}

/// A `RUST_LOG` that is not a filter is said, not silently replaced by `log.level`.
#[test]
fn a_bad_rust_log_is_named_and_log_level_used() {
    let redis = RedisServer::start().expect("redis");
    for bin in BINARIES {
        let (_dir, mut p) = spawn_with_until(bin, &redis.url(), &[("RUST_LOG", "[[[")], "started");
        let log = p.output();
        assert!(
            log.contains("RUST_LOG `[[[` is not a log filter") && log.contains("using log.level"),
            "{bin}: {log}"
        );
        p.signal(libc::SIGTERM).expect("sigterm");
        p.wait_exit(Duration::from_secs(10)).expect("exits");
    }
}

/// A stop asked while the agent is still starting (watching a previous life's record) is
/// kept: once up, the agent drains, deregisters and exits 0. Without a handler installed
/// that early the signal killed it outright, and as a container's PID 1, where a signal
/// without a handler is ignored, it would have stayed up and serving until SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_start_up_drains_once_up_and_exits_zero() {
    let redis = RedisServer::start().expect("redis");
    let cfg = confroute_tests::fixtures::single(&redis.url());
    let store = confroute_tests::fixtures::store(&cfg);
    store
        .register(
            &confroute_tests::fixtures::node("node-a", 10),
            Duration::from_secs(3),
        )
        .await
        .expect("a previous life's record");
    let (_dir, mut p) = tokio::task::spawn_blocking({
        let redis_url = redis.url();
        move || {
            spawn_with_until(
                "confroute-node",
                &redis_url,
                &[("CONFROUTE_NODE__ID", "node-a")],
                "checking that no other agent renews it",
            )
        }
    })
    .await
    .expect("spawned");
    p.signal(libc::SIGTERM).expect("sigterm");
    let code = p.wait_exit(Duration::from_secs(20)).expect("exits");
    let log = p.output();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("stop requested"), "{log}");
    assert!(
        store
            .get_node(&confroute_tests::fixtures::id("node-a"))
            .await
            .expect("read")
            .is_none(),
        "deregistered on the way out: {log}"
    );
}

/// The controller says what UDP receive buffer the kernel granted: one capped in silence
/// (no CAP_NET_ADMIN and a low `net.core.rmem_max`) drops bursts of INVITEs, so it warns
/// naming the sysctl, and an operator can check either way.
#[test]
fn the_granted_udp_buffer_is_logged() {
    let redis = RedisServer::start().expect("redis");
    let (_dir, mut p) = spawn_with_until(
        "confroute-controller",
        &redis.url(),
        &[("CONFROUTE_SIP__UDP_BUFFER_SIZE", "1048576")],
        "started",
    );
    let log = p.output();
    let granted = log.contains("SIP UDP receive buffer") && log.contains("bytes=1048576");
    let capped = log.contains("smaller than sip.udp_buffer_size")
        && log.contains("asked=1048576")
        && log.contains("net.core.rmem_max");
    assert!(granted || capped, "{log}");
    p.signal(libc::SIGTERM).expect("sigterm");
    p.wait_exit(Duration::from_secs(10)).expect("exits");
}
