//! Redis over TLS with a private CA (`redis.tls_ca_file`) and a client certificate
//! (`redis.tls_cert_file`, `redis.tls_key_file`), against a real `redis-server` with TLS on,
//! its certificates made by `openssl`: the store and the controller reach it, and without
//! the CA or the certificate the connection is refused rather than made insecure.

use std::time::Duration;

use confroute_shared::bus::Bus;
use confroute_shared::config::{ClusterConfig, RedisConfig, SentinelConfig};
use confroute_shared::store::StoreError;
use confroute_tests::fixtures;
use confroute_tests::harness::{
    free_port, wait_for_async, ControllerProc, Proc, RedisCluster, RedisServer, TempDir, TestCa,
};
use serde_json::json;

/// Claims `name` for node-a through `store` and checks node-a got it.
async fn claimed_for_node_a(store: &confroute_shared::store::Store, name: &str) {
    let claim = store
        .claim(&name.parse().expect("name"), &[fixtures::id("node-a")])
        .await
        .expect("claim over TLS");
    assert_eq!(claim.owner.expect("placed").node, fixtures::id("node-a"));
}

/// Settings trusting `ca` and presenting its client certificate.
fn trusting(ca: &TestCa) -> RedisConfig {
    RedisConfig {
        tls_ca_file: Some(ca.file("ca.pem")),
        tls_cert_file: Some(ca.file("client.pem")),
        tls_key_file: Some(ca.file("client.key")),
        ..RedisConfig::default()
    }
}

fn over_tls(ca: &TestCa, port: u16, trust: bool, client_cert: bool) -> RedisConfig {
    RedisConfig {
        url: Some(format!("rediss://127.0.0.1:{port}")),
        tls_ca_file: trust.then(|| ca.file("ca.pem")),
        tls_cert_file: client_cert.then(|| ca.file("client.pem")),
        tls_key_file: client_cert.then(|| ca.file("client.key")),
        ..RedisConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_and_the_controller_reach_redis_over_tls_with_a_private_ca() {
    let ca = TestCa::new().expect("test CA");
    let (redis, tls_port) = RedisServer::start_tls(&ca, true).expect("redis with TLS");
    let cfg = over_tls(&ca, tls_port, true, true);
    fixtures::store(&cfg)
        .register(&fixtures::node("node-a", 10), Duration::from_secs(300))
        .await
        .expect("registered over TLS");
    // Written where the plain port reads: the same server.
    let plain = fixtures::store(&fixtures::single(&redis.url()));
    let seen = plain.get_node(&fixtures::id("node-a")).await.expect("read");
    assert!(seen.is_some(), "the node written over TLS is in Redis");

    let controller = ControllerProc::start(&fixtures::redis_env(&cfg)).expect("controller");
    fixtures::wait_placeable(&controller.http_url(), 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", controller.output()));
    let r = fixtures::http()
        .post(format!("{}/v1/route", controller.http_url()))
        .json(&json!({"conference": "over-tls"}))
        .send()
        .await
        .expect("route");
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["node_id"], "node-a", "{body}");
    let placed = plain
        .lookup(&"over-tls".parse().expect("name"))
        .await
        .expect("lookup");
    assert!(placed.is_some(), "the claim made over TLS is in Redis");
}

/// Without `redis.tls_ca_file` the built-in public roots do not know a private CA; without a
/// client certificate a server that asks for one closes the handshake. Either way the store
/// reports Redis unavailable, naming the certificate trouble where TLS says it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_or_the_client_certificate_the_connection_is_refused() {
    let ca = TestCa::new().expect("test CA");
    let (_redis, tls_port) = RedisServer::start_tls(&ca, true).expect("redis with TLS");
    let untrusted = fixtures::store(&over_tls(&ca, tls_port, false, true))
        .ping()
        .await
        .expect_err("a server certificate of an unknown CA is refused");
    assert!(
        matches!(&untrusted, StoreError::Unavailable(m) if m.contains("UnknownIssuer")),
        "{untrusted:?}"
    );
    let anonymous = fixtures::store(&over_tls(&ca, tls_port, true, false))
        .ping()
        .await
        .expect_err("a server asking for a client certificate refuses a client without one");
    assert!(
        matches!(&anonymous, StoreError::Unavailable(_)),
        "{anonymous:?}"
    );
    // With both, the same server answers.
    fixtures::store(&over_tls(&ca, tls_port, true, true))
        .ping()
        .await
        .expect("ping over TLS");
}

/// A Redis Cluster over TLS: the CA and client certificate reach the cluster client (and
/// the node it asks for a slot's primary), so claims and the bus's pub/sub work there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_takes_claims_with_the_private_ca() {
    let ca = TestCa::new().expect("test CA");
    let (_cluster, seeds) = RedisCluster::start_tls(&ca).expect("cluster with TLS");
    let cfg = RedisConfig {
        cluster: Some(ClusterConfig { seeds }),
        tls: true,
        ..trusting(&ca)
    };
    let store = fixtures::store(&cfg);
    store
        .register(&fixtures::node("node-a", 10), Duration::from_secs(300))
        .await
        .expect("registered over TLS");
    claimed_for_node_a(&store, "tls-cluster").await;
    // The bus subscribes on the primary of its channels' slot, found through a seed.
    let (node, _commands) = Bus::node(fixtures::store(&cfg), &fixtures::id("node-a"));
    assert!(
        node.wait_connected(Duration::from_secs(10)).await,
        "the bus subscribed over TLS"
    );
}

/// One Sentinel monitoring `primary_tls_port` (a primary taking TLS with client
/// certificates), which it reaches with TLS and the client certificate
/// (`tls-replication`). With `tls`, the Sentinel itself takes TLS connections only, with
/// client certificates, and `requirepass` when `password` is given. Returns its port and
/// what must live as long as it.
fn sentinel_for(
    ca: &TestCa,
    primary_tls_port: u16,
    tls: bool,
    password: Option<&str>,
) -> (u16, Proc, TempDir) {
    let dir = TempDir::new("tls-sentinel").expect("dir");
    let port = free_port();
    let conf = dir.path().join("sentinel.conf");
    let f = |n: &str| ca.file(n).display().to_string();
    let listen = if tls {
        format!("port 0\ntls-port {port}\ntls-auth-clients yes\n")
    } else {
        format!("port {port}\n")
    };
    let auth = password.map_or(String::new(), |p| format!("requirepass {p}\n"));
    std::fs::write(
        &conf,
        format!(
            "{listen}{auth}bind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
             tls-replication yes\ntls-cert-file {cert}\ntls-key-file {key}\n\
             tls-client-cert-file {ccert}\ntls-client-key-file {ckey}\ntls-ca-cert-file {cafile}\n\
             sentinel monitor tls-primary 127.0.0.1 {primary_tls_port} 1\n",
            dir = dir.path().display(),
            cert = f("server.pem"),
            key = f("server.key"),
            ccert = f("client.pem"),
            ckey = f("client.key"),
            cafile = f("ca.pem"),
        ),
    )
    .expect("sentinel.conf");
    let mut cmd = std::process::Command::new("redis-server");
    cmd.arg(&conf).arg("--sentinel");
    let sentinel = Proc::spawn(
        &format!("sentinel :{port}"),
        cmd,
        &dir.path().join("sentinel.log"),
    )
    .expect("sentinel");
    (port, sentinel, dir)
}

/// Registers node-a through `cfg`'s Sentinel, claims `name` there and checks the claim is
/// in `primary`.
async fn claims_through_the_sentinel(cfg: &RedisConfig, primary: &RedisServer, name: &str) {
    let store = fixtures::store(cfg);
    // The Sentinel may still be starting: the first answers may be "unavailable".
    wait_for_async(
        "a registration through the Sentinel",
        Duration::from_secs(15),
        || async {
            store
                .register(&fixtures::node("node-a", 10), Duration::from_secs(300))
                .await
                .ok()
        },
    )
    .await
    .expect("registered over TLS behind the Sentinel");
    claimed_for_node_a(&store, name).await;
    let plain = fixtures::store(&fixtures::single(&primary.url()));
    assert!(plain
        .lookup(&name.parse().expect("name"))
        .await
        .expect("lookup")
        .is_some());
}

/// Behind a Sentinel (plain) whose primary takes TLS only, with client certificates: the
/// store builds its Sentinel client with the CA and certificate for the data nodes, asks the
/// Sentinel for the primary (its TLS port) and claims there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_over_tls_behind_a_sentinel_takes_claims_with_the_private_ca() {
    let ca = TestCa::new().expect("test CA");
    let (primary, tls_port) = RedisServer::start_tls(&ca, true).expect("redis with TLS");
    let (port, _sentinel, _dir) = sentinel_for(&ca, tls_port, false, None);
    let cfg = RedisConfig {
        sentinel: Some(SentinelConfig {
            master_name: "tls-primary".into(),
            addresses: vec![format!("redis://127.0.0.1:{port}")],
            username: None,
            password: None,
            tls: false,
        }),
        tls: true,
        ..trusting(&ca)
    };
    claims_through_the_sentinel(&cfg, &primary, "tls-sentinel").await;
}

/// A Sentinel reached over TLS itself, asking for a client certificate and a password: the
/// private CA and the client certificate reach the connection to the Sentinel too, and the
/// password written in the Sentinel's `rediss://` URL is sent to it (as on the plain path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_over_tls_with_a_password_in_its_url_finds_the_primary() {
    let ca = TestCa::new().expect("test CA");
    let (primary, tls_port) = RedisServer::start_tls(&ca, true).expect("redis with TLS");
    let (port, _sentinel, _dir) = sentinel_for(&ca, tls_port, true, Some("sentinel-secret"));
    let sentinel = |url: String| RedisConfig {
        sentinel: Some(SentinelConfig {
            master_name: "tls-primary".into(),
            addresses: vec![url],
            username: None,
            password: None,
            tls: false,
        }),
        tls: true,
        ..trusting(&ca)
    };
    claims_through_the_sentinel(
        &sentinel(format!("rediss://:sentinel-secret@127.0.0.1:{port}")),
        &primary,
        "tls-sentinel-auth",
    )
    .await;
    // The password is what let it in: without it the Sentinel refuses.
    let refused = fixtures::store(&sentinel(format!("rediss://127.0.0.1:{port}")))
        .ping()
        .await
        .expect_err("a Sentinel with requirepass refuses a client without the password");
    assert!(
        matches!(&refused, StoreError::Unavailable(_)),
        "{refused:?}"
    );
}

/// With TLS files the Sentinel client takes one user and password for every sentinel:
/// addresses naming different ones are a configuration error naming the key, not a silent
/// choice of one.
#[test]
fn sentinels_with_different_passwords_and_tls_files_are_a_config_error() {
    let ca = TestCa::new().expect("test CA");
    let cfg = RedisConfig {
        sentinel: Some(SentinelConfig {
            master_name: "tls-primary".into(),
            addresses: vec![
                "rediss://:one@127.0.0.1:26379".into(),
                "rediss://:two@127.0.0.1:26380".into(),
            ],
            username: None,
            password: None,
            tls: false,
        }),
        tls: true,
        ..trusting(&ca)
    };
    let err = confroute_shared::store::Store::new(
        &cfg,
        confroute_shared::store::StoreMetrics::disabled(),
    )
    .err()
    .expect("refused");
    assert!(
        matches!(&err, StoreError::Config(m) if m.starts_with("redis.sentinel.addresses")),
        "{err:?}"
    );
}

/// Renewed TLS files (cert-manager rewrites a mounted Secret in place) reach the next
/// connection without a restart: Redis comes back with a certificate of a new CA, the files
/// are replaced with that CA's, and the same store connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_tls_files_reach_the_next_connection_without_a_restart() {
    let (old, new) = (
        TestCa::new().expect("old CA"),
        TestCa::new().expect("new CA"),
    );
    let (mut redis, port) = RedisServer::start_tls(&old, true).expect("redis with TLS");
    let secret = TempDir::new("mounted-secret").expect("dir");
    let mount = |ca: &TestCa| {
        for (from, to) in [
            ("ca.pem", "ca.crt"),
            ("client.pem", "tls.crt"),
            ("client.key", "tls.key"),
        ] {
            std::fs::copy(ca.file(from), secret.path().join(to)).expect("copy");
        }
    };
    mount(&old);
    let cfg = RedisConfig {
        url: Some(format!("rediss://127.0.0.1:{port}")),
        tls_ca_file: Some(secret.path().join("ca.crt")),
        tls_cert_file: Some(secret.path().join("tls.crt")),
        tls_key_file: Some(secret.path().join("tls.key")),
        ..RedisConfig::default()
    };
    let store = fixtures::store(&cfg);
    store.ping().await.expect("ping with the first files");
    redis.kill();
    let _renewed = RedisServer::start_tls_on(&new, true, port).expect("redis under the new CA");
    mount(&new);
    wait_for_async(
        "a ping with the renewed files",
        Duration::from_secs(15),
        || async { store.ping().await.ok() },
    )
    .await
    .expect("the store connects again with the renewed files");
}

/// TLS files that do not hold what their key says (a private key as the CA, the client
/// certificate and key swapped, a certificate whose PEM text is corrupt) are a
/// configuration error naming that key (exit 2, which service managers do not restart),
/// not a connection error blamed on `redis.url` at start-up.
#[test]
fn tls_files_that_do_not_parse_are_a_config_error_naming_their_key() {
    let ca = TestCa::new().expect("test CA");
    let dir = confroute_tests::harness::TempDir::new("bad-pem").expect("dir");
    let corrupt = dir.path().join("corrupt.pem");
    let good = std::fs::read_to_string(ca.file("ca.pem")).expect("ca.pem");
    // The base64 body keeps its form but no longer encodes a certificate.
    let broken: String = good
        .lines()
        .map(|l| {
            if l.starts_with("-----") {
                l.to_string()
            } else {
                "A".repeat(l.len())
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&corrupt, broken).expect("write");
    let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let (ca_pem, key, cert, corrupt) = (
        path(ca.file("ca.pem")),
        path(ca.file("client.key")),
        path(ca.file("client.pem")),
        path(corrupt),
    );
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 4] = [
        (
            "confroute-controller",
            vec![("CONFROUTE_REDIS__TLS_CA_FILE", &key)],
            "redis.tls_ca_file",
        ),
        (
            "confroute-controller",
            vec![("CONFROUTE_REDIS__TLS_CA_FILE", &corrupt)],
            "redis.tls_ca_file",
        ),
        (
            "confroute-controller",
            vec![
                ("CONFROUTE_REDIS__TLS_CA_FILE", &ca_pem),
                ("CONFROUTE_REDIS__TLS_CERT_FILE", &key),
                ("CONFROUTE_REDIS__TLS_KEY_FILE", &cert),
            ],
            "redis.tls_cert_file",
        ),
        (
            "confroute-node",
            vec![
                ("CONFROUTE_REDIS__TLS_CA_FILE", &ca_pem),
                ("CONFROUTE_REDIS__TLS_CERT_FILE", &cert),
                ("CONFROUTE_REDIS__TLS_KEY_FILE", &cert),
            ],
            "redis.tls_key_file",
        ),
    ];
    for (bin, vars, key) in cases {
        let mut child = std::process::Command::new(
            confroute_tests::harness::workspace_bin(bin).expect("binary"),
        )
        .env_clear()
        .env("CONFROUTE_REDIS__URL", "rediss://127.0.0.1:9")
        .envs(vars.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
        // A binary that took the files would start and wait for Redis: stopped, it fails.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "{bin} {vars:?} did not exit 2 within 10 s: {err}"
        );
        assert!(
            err.contains(key),
            "{bin} {vars:?} does not name {key}: {err}"
        );
    }
}
