//! `confroute-ctl` against a running controller with real Redis: listing, drain/undrain,
//! routing, the token, and its error output; dial-out followed to the end against a node
//! agent beside a simulated Asterisk, and given up at its deadline when the node dies mid-ring.

mod node_common;

use std::process::Command;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use confroute_tests::ari_sim::{EndpointMatch, Outcome};
use confroute_tests::fixtures;
use confroute_tests::harness::{wait_for_async, workspace_bin, ControllerProc, RedisServer};
use node_common::control::DIALOUT_ENV;
use node_common::{dial, wait_bridged, Single, WAIT};

const TOKEN: &str = "ctl-token-0123456789abcdef";

fn ctl(url: &str, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let (code, out, err) = ctl_code(url, token, args);
    (code == Some(0), out, err)
}

/// [`ctl`] with the exit status (`None` when a signal ended it).
fn ctl_code(url: &str, token: Option<&str>, args: &[&str]) -> (Option<i32>, String, String) {
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
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A controller on `cfg`'s Redis whose API wants [`TOKEN`].
fn token_controller(cfg: &confroute_shared::config::RedisConfig) -> ControllerProc {
    let mut env = fixtures::redis_env(cfg);
    env.push(("CONFROUTE_HTTP__API_TOKEN".into(), TOKEN.into()));
    ControllerProc::start(&env).expect("controller")
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
    // node-c's agent has not reached its Asterisk: it gets nothing.
    store
        .register_agent(
            &fixtures::node("node-c", 50),
            Duration::from_secs(300),
            false,
        )
        .await
        .expect("register");
    let controller = token_controller(&cfg);
    let url = controller.http_url();

    let (ok, out, err) = ctl(&url, Some(TOKEN), &["nodes", "list"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("ID"), "a table with a header: {out}");
    assert!(
        out.contains("node-a") && out.contains("node-b") && out.contains("serving"),
        "{out}"
    );
    let ari_of = |id: &str| {
        out.lines()
            .find(|l| l.starts_with(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_string)
    };
    assert!(
        out.lines().next().is_some_and(|h| h.contains(" ARI ")),
        "{out}"
    );
    assert_eq!(ari_of("node-a").as_deref(), Some("up"), "{out}");
    assert_eq!(ari_of("node-c").as_deref(), Some("down"), "{out}");

    let (ok, out, err) = ctl(&url, Some(TOKEN), &["--json", "nodes", "list"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(3));
    // --url and --token may follow the subcommand, as --json may.
    let out = Command::new(workspace_bin("confroute-ctl").expect("built"))
        .args(["nodes", "list", "--url", &url, "--token", TOKEN])
        .env_remove("CONFROUTE_CTL_TOKEN")
        .env_remove("CONFROUTE_CTL_URL")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("node-a"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

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

    // Paging past an E.164 name: the `+` must reach the API as itself, not as a space.
    for number in ["+15555550101", "+15555550102"] {
        let (ok, _, err) = ctl(&url, Some(TOKEN), &["route", number]);
        assert!(ok, "{err}");
    }
    let (ok, out, err) = ctl(
        &url,
        Some(TOKEN),
        &[
            "conferences",
            "list",
            "--limit",
            "1",
            "--after",
            "+15555550101",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("+15555550102"),
        "the page after the name: {out}"
    );
    assert!(!out.contains("+15555550101"), "{out}");
    // The paging hint goes to stderr: a script reading stdout gets the table alone.
    assert!(err.contains("more: --after +15555550102"), "{err}");
    assert!(!out.contains("more:"), "{out}");
    let (ok, out, err) = ctl(
        &url,
        Some(TOKEN),
        &["conferences", "list", "--after", "+15555550102"],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("weekly-sync") && !out.contains("+1555555010"),
        "{out}"
    );
    // --all follows the pages to the end: every conference once, no paging hint.
    let (ok, out, err) = ctl(
        &url,
        Some(TOKEN),
        &["conferences", "list", "--limit", "1", "--all"],
    );
    assert!(ok, "{err}");
    for name in ["+15555550101", "+15555550102", "weekly-sync"] {
        assert_eq!(out.matches(name).count(), 1, "{name} once: {out}");
    }
    assert_eq!(out.lines().count(), 4, "a header and three rows: {out}");
    assert!(!err.contains("more:"), "{err}");
    let (ok, out, err) = ctl(
        &url,
        Some(TOKEN),
        &["--json", "conferences", "list", "--limit", "2", "--all"],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(3), "{out}");
    assert!(v["next"].is_null(), "{out}");
    // A page size the API refuses is a command-line mistake, caught before any request.
    for limit in ["0", "1001"] {
        let (code, _, err) = ctl_code(
            &url,
            Some(TOKEN),
            &["conferences", "list", "--limit", limit],
        );
        assert_eq!(code, Some(2), "--limit {limit}: {err}");
    }

    let (ok, out, err) = ctl(&url, Some(TOKEN), &["nodes", "undrain", "node-a"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "node-a: draining -> serving");

    // Errors: exit non-zero with the API's code, nothing changed.
    // The exit status tells a script the kind: 4 for the token.
    let (code, _, err) = ctl_code(&url, None, &["nodes", "drain", "node-b"]);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("unauthorized"), "{err}");
    let node_b = store
        .get_node(&fixtures::id("node-b"))
        .await
        .expect("get")
        .expect("live");
    assert_eq!(node_b.info.state.as_str(), "serving");
    let (code, _, err) = ctl_code(&url, Some(TOKEN), &["nodes", "drain", "ghost"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("node_not_found"), "{err}");
    let (code, _, err) = ctl_code(&url, Some(TOKEN), &["route", "bad name"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("invalid_conference"), "{err}");
    let (code, _, err) = ctl_code("http://127.0.0.1:1", Some(TOKEN), &["nodes", "list"]);
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    // A password in --url is not repeated in messages.
    let (ok, _, err) = ctl(
        "http://admin:hunter2@127.0.0.1:1",
        Some(TOKEN),
        &["nodes", "list"],
    );
    assert!(!ok);
    assert!(
        err.contains("cannot reach") && err.contains("***") && !err.contains("hunter2"),
        "{err}"
    );
    let (code, _, err) = ctl_code("127.0.0.1:1", Some(TOKEN), &["nodes", "list"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("bad --url 127.0.0.1:1: give the scheme, http:// or https://"),
        "{err}"
    );
    // An '@' in the path is not user information: the host stays in the message.
    let (ok, _, err) = ctl(
        "http://127.0.0.1:1/mail=a@b",
        Some(TOKEN),
        &["nodes", "list"],
    );
    assert!(!ok);
    assert!(
        err.contains("cannot reach http://127.0.0.1:1/mail=a@b"),
        "{err}"
    );
    // A query would ride on every request, and every route refuses one: named at once.
    for query in ["http://127.0.0.1:1/?token=hunter2", "http://127.0.0.1:1/?"] {
        let (code, _, err) = ctl_code(query, Some(TOKEN), &["nodes", "list"]);
        assert_eq!(code, Some(2), "{query}: {err}");
        assert!(
            err.contains("bad --url http://127.0.0.1:1/?...: ")
                && err.contains("no query")
                && !err.contains("hunter2"),
            "{query}: {err}"
        );
    }
    // Nor in a URL that does not parse, or lacks its scheme, nor a query's.
    for bad in [
        "http://admin:hunter2@host:99999",
        "admin:hunter2@host:9090",
        "http://host:99999/?token=hunter2",
        "ftp://host/?token=hunter2",
        "host/?token=hunter2",
    ] {
        let (ok, _, err) = ctl(bad, Some(TOKEN), &["nodes", "list"]);
        assert!(!ok);
        assert!(
            err.contains("bad --url") && !err.contains("hunter2"),
            "{err}"
        );
    }
    // A token no header can carry is named as the problem, not the network.
    let (code, _, err) = ctl_code(&url, Some("ctl-token\nsecond-line"), &["nodes", "list"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("the token") && !err.contains("cannot reach"),
        "{err}"
    );
    let (ok, out, err) = ctl(&url, None, &["--version"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("confroute-ctl "), "{out}");

    // A conference whose owner has no live lease says so in the table.
    redis
        .query(
            redis::cmd("HSET")
                .arg(format!("{}conf:orphan-room", cfg.prefix))
                .arg("owner")
                .arg("node-z")
                .arg("epoch")
                .arg(3)
                .arg("participants")
                .arg(0),
        )
        .expect("a record written");
    let (ok, out, err) = ctl(&url, Some(TOKEN), &["conferences", "get", "orphan-room"]);
    assert!(ok, "{err}");
    assert!(out.contains("node-z (no live node)"), "{out}");
    let (ok, out, err) = ctl(&url, Some(TOKEN), &["conferences", "get", "weekly-sync"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("node-b") && !out.contains("no live node"),
        "{out}"
    );

    // Whoever reads the output goes away before it is written (`| head`): a quiet exit.
    let (closed_reader, writer) = std::io::pipe().expect("pipe");
    drop(closed_reader);
    let quiet = Command::new(workspace_bin("confroute-ctl").expect("built"))
        .args(["--url", &url, "nodes", "list"])
        .env("CONFROUTE_CTL_TOKEN", TOKEN)
        .stdout(writer)
        .output()
        .expect("run confroute-ctl");
    assert_eq!(
        quiet.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );
    assert!(
        quiet.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );

    // Some other HTTP server at --url: said so, with what it answered.
    let other_url = stranger(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 13\r\nConnection: close\r\n\r\nno such thing",
    )
    .await;
    let (code, _, err) = ctl_code(&other_url, Some(TOKEN), &["nodes", "list"]);
    assert_eq!(code, Some(1), "a stranger's 404 is no missing node: {err}");
    assert!(
        err.contains("404 Not Found")
            && err.contains("does not answer like a confroute controller")
            && err.contains("no such thing"),
        "{err}"
    );
    // One that answers 200 to anything did nothing asked of it.
    let yes_url = stranger(
        b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: close\r\n\r\n<html></html>",
    )
    .await;
    for args in [
        &["conferences", "end", "sales-4"][..],
        &["nodes", "drain", "node-a"][..],
    ] {
        let (code, out, err) = ctl_code(&yes_url, Some(TOKEN), args);
        assert_eq!(code, Some(1), "{args:?}: {out}{err}");
        assert!(
            err.contains("does not answer like a confroute controller"),
            "{err}"
        );
    }
    // A redirect (an ingress sending http to https) is not followed: across schemes the
    // token would be dropped (an exit 4 for a good token) and a POST would become a GET.
    let moved_url = stranger(
        b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://api.example/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    for args in [&["nodes", "list"][..], &["nodes", "drain", "node-a"][..]] {
        let (code, out, err) = ctl_code(&moved_url, Some(TOKEN), args);
        assert_eq!(code, Some(1), "{args:?}: {out}{err}");
        assert!(
            err.contains("redirects to https://api.example/"),
            "{args:?}: {err}"
        );
    }
    // The controller's own 404 for a route it does not have (a --url with a path) is no
    // missing node.
    let (code, _, err) = ctl_code(&format!("{url}/v1"), Some(TOKEN), &["nodes", "list"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("route_not_found"), "{err}");
}

/// A node's refusal is no token problem (exit 1, not 4), over REST and over the WebSocket,
/// and no room for a conference is a refusal too (exit 1, not 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exit_statuses_tell_refusals_from_token_and_outage() {
    let (_s, controller) =
        dialout_cluster_with(&[("CONFROUTE_DIALOUT__ENDPOINT", "PJSIP/{number}@trunk")]).await;
    let url = controller.http_url();
    for wait in [false, true] {
        let mut args = vec!["dialout", "sip-room", "sip:alice@example.com"];
        if wait {
            args.push("--wait");
        }
        let (code, _, err) = ctl_async_code(&url, &args).await;
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains("forbidden"), "{args:?}: {err}");
    }
    let (ok, _, err) = ctl_async(&url, &["nodes", "drain", "node-a"]).await;
    assert!(ok, "{err}");
    let (code, _, err) = ctl_async_code(&url, &["route", "no-room-left"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no_capacity"), "{err}");
}

/// Another HTTP server on a free port, answering every request with `answer`; its URL.
async fn stranger(answer: &'static [u8]) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let _ = conn.write_all(answer).await;
        }
    });
    url
}

/// Runs `confroute-ctl` off the async runtime (the simulated Asterisk lives on it).
async fn ctl_async(url: &str, args: &[&str]) -> (bool, String, String) {
    let (code, out, err) = ctl_async_code(url, args).await;
    (code == Some(0), out, err)
}

/// [`ctl_async`] with the exit status.
async fn ctl_async_code(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let url = url.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ctl_code(&url, None, &args)
    })
    .await
    .expect("confroute-ctl ran")
}

/// One agent beside a simulated Asterisk that can dial out, and a controller that sees it.
async fn dialout_cluster() -> (Single, ControllerProc) {
    dialout_cluster_with(DIALOUT_ENV).await
}

/// [`dialout_cluster`] with the agent's dial-out settings `env`.
async fn dialout_cluster_with(env: &[(&str, &str)]) -> (Single, ControllerProc) {
    let mut s = Single::start(env).await;
    s.node
        .wait_log("command bus subscribed", WAIT)
        .expect("the node hears commands");
    let controller = ControllerProc::start(&fixtures::redis_env(&s.cfg)).expect("controller");
    let nodes = format!("{}/v1/nodes", controller.http_url());
    wait_for_async("the controller sees the node", WAIT, || async {
        let v = fixtures::try_get_json(&nodes).await?;
        (v["items"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await
    .expect("node registered");
    fixtures::wait_ready(&controller.http_url())
        .await
        .expect("controller ready");
    (s, controller)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_dials_out_and_follows_the_call() {
    let (s, controller) = dialout_cluster().await;
    let url = controller.http_url();
    let a = dial(&s.sim, "ctl-room", &[]).await;
    let bridge = wait_bridged(&s.sim, &a).await;

    // Any spelling of the URL the REST calls take reaches the WebSocket too.
    let spelled = format!("{}/", url.replacen("http://", "HTTP://", 1));
    let (ok, out, err) =
        ctl_async(&spelled, &["dialout", "ctl-room", "+15555550101", "--wait"]).await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    let callid = lines[0].strip_prefix("callid ").expect("callid line");
    assert_eq!(&lines[1..], ["accepted", "ringing", "connected"], "{out}");
    let snap = s.sim.snapshot();
    assert_eq!(
        snap.channel(callid).and_then(|c| c.bridge.as_deref()),
        Some(bridge.as_str()),
        "the callee is in the conference"
    );

    // The listing says how long each has been in, not an epoch timestamp.
    let (ok, out, err) = ctl_async(&url, &["participants", "list", "ctl-room"]).await;
    assert!(ok, "{err}");
    assert!(
        out.lines().next().is_some_and(|h| h.contains("IN FOR")),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with(a.as_str()))
        .unwrap_or_else(|| panic!("{a} listed: {out}"));
    let in_for = row.split_whitespace().last().unwrap_or_default();
    assert!(
        in_for.ends_with('s') && in_for[..in_for.len() - 1].parse::<u64>().is_ok(),
        "seconds in: {row}"
    );

    // Participant commands reach the caller (each path built from the same pieces).
    for (args, want) in [
        (
            vec!["participants", "mute", "ctl-room", a.as_str()],
            "muted",
        ),
        (
            vec!["participants", "dtmf", "ctl-room", a.as_str(), "12#"],
            "digits sent",
        ),
        (
            vec!["participants", "unmute", "ctl-room", a.as_str()],
            "unmuted",
        ),
        (
            vec!["participants", "hold", "ctl-room", a.as_str()],
            "on hold",
        ),
        (
            vec!["participants", "unhold", "ctl-room", a.as_str()],
            "call control's hold lifted",
        ),
        (vec!["participants", "kick", "ctl-room", callid], "kicked"),
    ] {
        let (ok, out, err) = ctl_async(&url, &args).await;
        assert!(ok, "{args:?}: {err}");
        assert!(out.contains(want), "{args:?}: {out}");
    }
    // Media to one participant and to the whole conference; an option changed.
    let plays = |target: &str| {
        s.sim
            .request_log()
            .iter()
            .filter(|r| {
                r.operation
                    .as_deref()
                    .is_some_and(|o| o.starts_with("play"))
                    && r.path.starts_with(target)
            })
            .count()
    };
    let to_caller = format!("/ari/channels/{a}/play");
    let to_bridge = format!("/ari/bridges/{bridge}/play");
    let before = (plays(&to_caller), plays(&to_bridge));
    let (ok, out, err) = ctl_async(
        &url,
        &["participants", "play", "ctl-room", a.as_str(), "sound:beep"],
    )
    .await;
    assert!(ok && out.contains("playing"), "{out}{err}");
    assert_eq!(plays(&to_caller), before.0 + 1);
    let (ok, out, err) = ctl_async(
        &url,
        &["conferences", "play", "ctl-room", "sound:conf-onlyperson"],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "ctl-room: playing sound:conf-onlyperson");
    assert_eq!(plays(&to_bridge), before.1 + 1);
    let (ok, out, err) = ctl_async(
        &url,
        &[
            "participants",
            "update",
            "ctl-room",
            a.as_str(),
            "--end-conference-on-exit",
            "false",
        ],
    )
    .await;
    assert!(ok && out.contains("updated"), "{out}{err}");
    // Nothing to change, or not a boolean: a command-line mistake, nothing sent.
    for args in [
        vec!["participants", "update", "ctl-room", a.as_str()],
        vec![
            "participants",
            "update",
            "ctl-room",
            a.as_str(),
            "--beep-on-exit",
            "maybe",
        ],
    ] {
        let (code, _, err) = ctl_async_code(&url, &args).await;
        assert_eq!(code, Some(2), "{args:?}: {err}");
    }
    let snap = s.sim.snapshot();
    let caller = snap.channel(&a).expect("caller still there");
    assert_eq!(
        caller
            .variables
            .get("CONFROUTE_END_ON_EXIT")
            .map(String::as_str),
        Some("false"),
        "the update reached the participant"
    );
    assert_eq!(caller.dtmf_sent, "12#");
    assert!(!caller.bridge_mute, "muted, then unmuted");
    assert!(
        snap.channel(callid).is_none_or(|c| c.bridge.is_none()),
        "the callee was kicked"
    );
    // A move says how it went: this node hosts the target too, so bridge to bridge.
    let (ok, out, err) = ctl_async(
        &url,
        &["participants", "move", "ctl-room", a.as_str(), "ctl-other"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("moved within node node-a (bridge to bridge)"),
        "{out}"
    );

    // A busy callee: the status with its SIP code and cause, and a failing exit.
    s.sim.set_originate_behavior(
        EndpointMatch::exact("PJSIP/+15555550102@trunk"),
        Outcome::Busy,
    );
    let (ok, out, err) = ctl_async(&url, &["dialout", "ctl-room", "+15555550102", "--wait"]).await;
    assert!(!ok, "{out}");
    assert!(
        out.ends_with("accepted\nrejected (SIP 486 / cause 17)\n"),
        "{out}"
    );
    assert!(err.contains("rejected"), "{err}");

    // Options go along: the callee joins muted.
    let (ok, out, err) = ctl_async(
        &url,
        &[
            "dialout",
            "ctl-room",
            "+15555550103",
            "--option",
            "muted=true",
            "-o",
            "beep=false",
            "--wait",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let muted = out
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("callid "))
        .expect("callid line");
    let snap = s.sim.snapshot();
    let callee = snap.channel(muted).expect("the muted callee");
    // The caller has moved out and the callee before was kicked: this is a new life of the
    // conference, with a bridge of its own.
    assert!(
        callee
            .bridge
            .as_deref()
            .is_some_and(|b| b.ends_with("-ctl-room")),
        "in the conference: {out}"
    );
    assert!(callee.muted_in || callee.bridge_mute, "joined muted");
    assert_eq!(
        callee.variables.get("CONFROUTE_MUTED").map(String::as_str),
        Some("true"),
        "the option rides on the callee's channel"
    );

    // Without --wait: the call id at once.
    let (ok, out, err) = ctl_async(&url, &["dialout", "ctl-room", "sip:bob@example.com"]).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("calling sip:bob@example.com: callid dial-"),
        "{out}"
    );

    // Bad input: the API's code, nothing originated.
    let originates = || {
        s.sim
            .request_log()
            .iter()
            .filter(|r| r.operation.as_deref() == Some("originateWithId"))
            .count()
    };
    let before = originates();
    let (code, _, err) = ctl_async_code(&url, &["dialout", "ctl-room", "12", "--wait"]).await;
    assert_eq!(code, Some(1), "{err}");
    // Named as the REST commands name theirs, with the JSON-RPC number beside it.
    assert!(err.contains("invalid_number (-32004): "), "{err}");
    assert_eq!(originates(), before);
    // An option the controller does not know is named; one without a value, or given twice,
    // or a ring time out of range, is a command-line mistake (2) that sends nothing.
    let (code, _, err) = ctl_async_code(
        &url,
        &["dialout", "ctl-room", "+15555550104", "-o", "loud=true"],
    )
    .await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("loud"), "{err}");
    for args in [
        vec!["dialout", "ctl-room", "+15555550104", "-o", "muted"],
        vec!["dialout", "ctl-room", "+15555550104", "-o", "=true"],
        vec![
            "dialout",
            "ctl-room",
            "+15555550104",
            "-o",
            "muted=true",
            "-o",
            "muted=false",
        ],
        vec!["dialout", "ctl-room", "+15555550104", "--ring-timeout", "0"],
        vec![
            "dialout",
            "ctl-room",
            "+15555550104",
            "--ring-timeout",
            "601",
        ],
    ] {
        let (code, _, err) = ctl_async_code(&url, &args).await;
        assert_eq!(code, Some(2), "{args:?}: {err}");
    }
    assert_eq!(originates(), before);
    // One nobody can find exits 3, as a missing node or conference does.
    let (code, _, err) =
        ctl_async_code(&url, &["participants", "kick", "ctl-room", "nobody.1"]).await;
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("participant_not_found"), "{err}");
}

/// A name or id is sent as one path segment: `?`, `#`, `/` and dot segments in what the
/// operator typed (an unmatched shell glob such as `sales-4?`, a pasted URL) are refused by
/// name, and never turn into the path of another conference that then gets ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_never_turns_a_bad_name_into_another_conference() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    store
        .register(&fixtures::node("node-a", 50), Duration::from_secs(300))
        .await
        .expect("register");
    let controller = token_controller(&cfg);
    let url = controller.http_url();
    for name in ["sales-4", "sales-5"] {
        let (ok, _, err) = ctl(&url, Some(TOKEN), &["route", name]);
        assert!(ok, "{err}");
    }

    for args in [
        &["conferences", "end", "sales-4?"][..],
        &["conferences", "end", "sales-4#x"],
        &["conferences", "end", "x/../sales-5"],
        &["participants", "list", "sales-4?"],
    ] {
        let (ok, out, err) = ctl(&url, Some(TOKEN), args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(err.contains("conference name has"), "{args:?}: {err}");
    }
    for args in [
        &["participants", "kick", "sales-4", ".."][..],
        &["conferences", "end", "."],
        &["nodes", "drain", ""],
        // The URL parser drops tabs and line breaks: these would be `..` too.
        &["participants", "kick", "sales-4", "..\n"],
        &["participants", "play", "sales-4", "\t..", "sound:beep"],
        &["participants", "kick", "sales-4", "abc\r"],
    ] {
        let (ok, out, err) = ctl(&url, Some(TOKEN), args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(err.contains("is not a valid"), "{args:?}: {err}");
    }
    for name in ["sales-4", "sales-5"] {
        let (ok, out, err) = ctl(&url, Some(TOKEN), &["conferences", "get", name]);
        assert!(ok, "{name} was ended: {err}");
        assert!(out.contains("node-a"), "{out}");
    }
}

/// `events` runs until Ctrl-C; the controller going away is an error a script can see.
/// Waits until the controller at `url` has upgraded one events WebSocket (ctl's).
async fn wait_events_open(url: &str) {
    wait_for_async("the events WebSocket open", WAIT, || async {
        let m = fixtures::scrape(url).await;
        let upgraded = fixtures::metric(
            &m,
            r#"confroute_http_requests_total{route="/v1/rpc",status="101"}"#,
        );
        (upgraded >= 1.0).then_some(())
    })
    .await
    .expect("ctl subscribed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_events_fails_when_the_controller_goes_away() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let mut controller = ControllerProc::start(&fixtures::redis_env(&cfg)).expect("controller");
    let url = controller.http_url();
    // Its stderr read as it comes: the controller goes once ctl has said why nothing came.
    // Killed should the test fail before it ends.
    let mut child = tokio::process::Command::new(workspace_bin("confroute-ctl").expect("built"))
        .args(["--url", &url, "events", "room-1"])
        .env_remove("CONFROUTE_CTL_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run confroute-ctl");
    let stderr = child.stderr.take().expect("stderr");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut read = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = read.next_line().await {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut err = String::new();
    let hint = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.recv().await {
            err.push_str(&line);
            err.push('\n');
            if line.contains("room-1 is not live on any node now") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(hint.ok(), Some(true), "says why nothing came: {err}");
    controller.process().kill();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("ctl ends when the controller goes")
        .expect("ctl ran");
    while let Ok(Some(line)) = tokio::time::timeout(WAIT, lines.recv()).await {
        err.push_str(&line);
        err.push('\n');
    }
    assert_eq!(status.code(), Some(5), "unavailable: {err}");
    assert!(err.contains("closed the connection"), "{err}");

    // A controller that stops answering without closing (frozen): given up after the idle
    // timeout, not awaited for good.
    let mut frozen = ControllerProc::start(&fixtures::redis_env(&cfg)).expect("controller");
    let url = frozen.http_url();
    let events = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            ctl_code(&url, None, &["events", "room-1", "--idle-timeout", "2"])
        })
    };
    wait_events_open(&url).await;
    frozen.process().pause().expect("freeze");
    let ended = tokio::time::timeout(WAIT, events).await;
    frozen.process().signal(libc::SIGCONT).expect("thaw");
    let (code, _, err) = ended
        .expect("ctl gives up on a frozen controller")
        .expect("ctl ran");
    assert_eq!(code, Some(5), "unavailable: {err}");
    assert!(err.contains("sent nothing for 2s"), "{err}");
}

/// `dialout --wait` ends with a failing exit when the node placing the call dies while the
/// callee rings: its last status never comes, and the controller ends the stream with
/// `unknown` (`node_lost`) once the node's lease is gone, long before the ring time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_dialout_wait_reports_a_node_that_dies_mid_ring() {
    let (mut s, controller) = dialout_cluster().await;
    let url = controller.http_url();
    let a = dial(&s.sim, "ring-room", &[]).await;
    wait_bridged(&s.sim, &a).await;
    s.sim.set_originate_behavior(
        EndpointMatch::exact("PJSIP/+15555550199@trunk"),
        Outcome::Manual,
    );

    let started = std::time::Instant::now();
    let mut child = tokio::process::Command::new(workspace_bin("confroute-ctl").expect("built"))
        .args([
            "--url",
            url.as_str(),
            "dialout",
            "ring-room",
            "+15555550199",
        ])
        .args(["--ring-timeout", "5", "--wait"])
        .env_remove("CONFROUTE_CTL_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("confroute-ctl starts");
    let stdout = child.stdout.take().expect("piped");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    // The node answered the command and reported the ringing: then it dies, well inside the
    // 5 s ring time (were it alive then, it would report the unanswered call).
    let mut out = String::new();
    let ringing = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("ctl output") {
            out.push_str(&line);
            out.push('\n');
            if line == "ringing" {
                break;
            }
        }
    })
    .await;
    assert!(ringing.is_ok(), "no ringing in time: {out}");
    assert!(out.ends_with("accepted\nringing\n"), "{out}");
    s.node.process().kill();
    let done = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("ctl exits in time")
        .expect("ctl ran");
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(5), "outcome unknown: {out}");
    assert!(
        err.contains("the node placing the call is gone (node_lost)"),
        "{err}\n{out}"
    );
    while let Some(line) = lines.next_line().await.expect("ctl output") {
        out.push_str(&line);
        out.push('\n');
    }
    assert!(out.ends_with("ringing\nunknown\n"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(35),
        "before the ring time and its margin ran out"
    );
}

/// The controller refusing the WebSocket for want of a connection slot is a refusal with its
/// code (exit 1), not an outage whose outcome is unknown (exit 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_reports_a_websocket_refused_for_slots_with_its_code() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let mut env = fixtures::redis_env(&cfg);
    env.push(("CONFROUTE_HTTP__API_TOKEN".into(), TOKEN.into()));
    env.push(("CONFROUTE_RPC__MAX_CONNECTIONS".into(), "1".into()));
    let controller = ControllerProc::start(&env).expect("controller");
    let url = controller.http_url();
    let mut req = format!("{}/v1/rpc", url.replacen("http", "ws", 1))
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("header"),
    );
    let (_held, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("the one slot taken");
    let (code, _, err) =
        tokio::task::spawn_blocking(move || ctl_code(&url, Some(TOKEN), &["events", "sales-4"]))
            .await
            .expect("confroute-ctl ran");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("too_many_connections"), "{err}");
}

/// `events` for more conferences than one connection's burst of commands takes (a subscribe
/// and a look for each): the subscriptions refused for the rate are asked again, and the
/// last conference's events come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_events_follows_more_conferences_than_the_rate_burst() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let controller = ControllerProc::start(&fixtures::redis_env(&s.cfg)).expect("controller");
    fixtures::wait_ready(&controller.http_url())
        .await
        .expect("controller ready");
    let names: Vec<String> = (0..60).map(|i| format!("many-{i}")).collect();
    let mut args = vec![
        "--url".to_string(),
        controller.http_url(),
        "events".to_string(),
    ];
    args.extend(names.iter().cloned());
    let mut child = tokio::process::Command::new(workspace_bin("confroute-ctl").expect("built"))
        .args(&args)
        .env_remove("CONFROUTE_CTL_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run confroute-ctl");
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let a = dial(&s.sim, "many-59", &[]).await;
    wait_bridged(&s.sim, &a).await;
    // Nothing tells when ctl's last subscription is in: the caller is muted and unmuted
    // until one of its events is printed (or ctl gives up, ending its output).
    let http = fixtures::http();
    let base = format!(
        "{}/v1/conferences/many-59/participants/{a}",
        controller.http_url()
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut printed = None;
    let mut mute = true;
    while printed.is_none() && tokio::time::Instant::now() < deadline {
        let verb = if mute { "mute" } else { "unmute" };
        mute = !mute;
        let r = http
            .post(format!("{base}/{verb}"))
            .send()
            .await
            .expect("POST");
        assert!(r.status().is_success(), "{verb}: {}", r.status());
        let until = tokio::time::Instant::now() + std::time::Duration::from_millis(300);
        while let Ok(line) = tokio::time::timeout_at(until, out.next_line()).await {
            match line {
                Ok(Some(l)) if l.starts_with("many-59 ") => {
                    printed = Some(l);
                    break;
                }
                Ok(Some(_)) => {}
                _ => panic!("confroute-ctl stopped following"),
            }
        }
    }
    assert!(
        printed.is_some(),
        "the last conference's events were printed"
    );
    assert!(
        child.try_wait().expect("status").is_none(),
        "still following"
    );
}

/// `--timeout` bounds the wait for an answer (a controller that accepts and never answers:
/// exit 5, outcome unknown, naming the flag); a value out of range is a usage error.
#[test]
fn ctl_waits_as_long_as_its_timeout_says() {
    let dark = confroute_tests::harness::DarkPort::start().expect("dark port");
    let url = format!("http://{}", dark.addr());
    let (code, _, err) = ctl_code(&url, None, &["--timeout", "1", "nodes", "list"]);
    assert_eq!(code, Some(5), "{err}");
    assert!(
        err.contains("did not answer within 1 s (--timeout)"),
        "{err}"
    );
    for bad in ["0", "86401", "soon"] {
        let (code, _, err) = ctl_code(&url, None, &["--timeout", bad, "nodes", "list"]);
        assert_eq!(code, Some(2), "{bad}: {err}");
        assert!(err.contains("--timeout"), "{bad}: {err}");
    }
}

/// The wait for answers (`--timeout`, `CONFROUTE_CTL_TIMEOUT`) and a dial-out's ring time
/// (`--ring-timeout`) are two settings: a long wait neither rings a callee for as long nor,
/// above the 600 s a ring may last, makes the dial-out invalid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_keeps_its_wait_apart_from_a_dialouts_ring_time() {
    use std::sync::{Arc, Mutex};
    let bodies: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let seen = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/conferences/{name}/participants",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let seen = seen.clone();
            async move {
                if let Ok(mut b) = seen.lock() {
                    b.push(body);
                }
                axum::Json(serde_json::json!({"callid": "dial-1"}))
            }
        }),
    );
    let url = format!("http://{}", fixtures::serve_http(app).await);
    let run = |env: Option<(&'static str, &'static str)>, args: &'static [&'static str]| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(workspace_bin("confroute-ctl").expect("built"));
            cmd.arg("--url")
                .arg(&url)
                .args(args)
                .env_remove("CONFROUTE_CTL_TOKEN")
                .env_remove("CONFROUTE_CTL_TIMEOUT");
            if let Some((k, v)) = env {
                cmd.env(k, v);
            }
            cmd.output().expect("run confroute-ctl")
        })
    };
    type Case = (
        Option<(&'static str, &'static str)>,
        &'static [&'static str],
        Option<u64>,
    );
    let cases: [Case; 4] = [
        (
            None,
            &["--timeout", "120", "dialout", "room", "+15555550104"],
            None,
        ),
        (
            None,
            &["dialout", "room", "+15555550104", "--timeout", "900"],
            None,
        ),
        (
            Some(("CONFROUTE_CTL_TIMEOUT", "900")),
            &["dialout", "room", "+15555550104"],
            None,
        ),
        (
            None,
            &["dialout", "room", "+15555550104", "--ring-timeout", "45"],
            Some(45),
        ),
    ];
    for (env, args, ring) in cases {
        let out = run(env, args).await.expect("ran");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let body = bodies.lock().expect("bodies").pop().expect("one request");
        assert_eq!(body["to"], "+15555550104", "{body}");
        assert_eq!(body["timeout"].as_u64(), ring, "{args:?} {env:?}: {body}");
    }
}
