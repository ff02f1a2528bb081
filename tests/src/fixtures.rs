//! Small builders shared by the integration tests: Redis settings for each deployment kind
//! and registered test nodes.

use std::time::Duration;

use confroute_shared::config::{ClusterConfig, RedisConfig, SentinelConfig};
use confroute_shared::store::{Store, StoreMetrics};
use confroute_shared::types::{NodeId, NodeInfo, NodeState};

/// Settings for a single server at `url`, with a fresh key prefix.
pub fn single(url: &str) -> RedisConfig {
    RedisConfig {
        url: Some(url.to_string()),
        ..RedisConfig::default()
    }
}

/// Settings for a primary whose claims wait for one replica, within a 2 s Redis timeout
/// (so a claim's WAIT gets 1 s: a loaded test machine's replica can take a few hundred ms).
pub fn replicated(url: &str) -> RedisConfig {
    RedisConfig {
        wait_replicas: 1,
        timeout: Duration::from_secs(2),
        ..single(url)
    }
}

/// Settings for a Redis Cluster with these seeds.
pub fn cluster(seeds: &[String]) -> RedisConfig {
    RedisConfig {
        cluster: Some(ClusterConfig {
            seeds: seeds.to_vec(),
        }),
        ..RedisConfig::default()
    }
}

/// Settings for a Sentinel group; claims wait for one replica so a failover loses none.
pub fn sentinel(master_name: &str, sentinels: &[String]) -> RedisConfig {
    RedisConfig {
        sentinel: Some(SentinelConfig {
            master_name: master_name.to_string(),
            addresses: sentinels.to_vec(),
            username: None,
            password: None,
            tls: false,
        }),
        wait_replicas: 1,
        timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    }
}

/// The `CONFROUTE_REDIS__*` variables that reproduce `cfg` in a child process.
pub fn redis_env(cfg: &RedisConfig) -> Vec<(String, String)> {
    let mut env = vec![
        ("CONFROUTE_REDIS__PREFIX".to_string(), cfg.prefix.clone()),
        (
            "CONFROUTE_REDIS__TIMEOUT".to_string(),
            format!("{}ms", cfg.timeout.as_millis()),
        ),
        (
            "CONFROUTE_REDIS__WAIT_REPLICAS".to_string(),
            cfg.wait_replicas.to_string(),
        ),
    ];
    let list = |v: &[String]| {
        format!(
            "[{}]",
            v.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    if let Some(url) = &cfg.url {
        env.push(("CONFROUTE_REDIS__URL".into(), url.clone()));
    }
    // Only leases a test chose: a test's own later setting of one must not be shadowed.
    let defaults = RedisConfig::default();
    for (key, lease, default) in [
        (
            "CONFROUTE_REDIS__CONFERENCE_LEASE",
            cfg.conference_lease,
            defaults.conference_lease,
        ),
        (
            "CONFROUTE_REDIS__CLAIM_LEASE",
            cfg.claim_lease,
            defaults.claim_lease,
        ),
    ] {
        if lease != default {
            env.push((key.into(), format!("{}ms", lease.as_millis())));
        }
    }
    for (key, file) in [
        ("CONFROUTE_REDIS__TLS_CA_FILE", &cfg.tls_ca_file),
        ("CONFROUTE_REDIS__TLS_CERT_FILE", &cfg.tls_cert_file),
        ("CONFROUTE_REDIS__TLS_KEY_FILE", &cfg.tls_key_file),
    ] {
        if let Some(f) = file {
            env.push((key.into(), f.to_string_lossy().into_owned()));
        }
    }
    if let Some(c) = &cfg.cluster {
        env.push(("CONFROUTE_REDIS__CLUSTER__SEEDS".into(), list(&c.seeds)));
    }
    if let Some(s) = &cfg.sentinel {
        env.push((
            "CONFROUTE_REDIS__SENTINEL__MASTER_NAME".into(),
            s.master_name.clone(),
        ));
        env.push((
            "CONFROUTE_REDIS__SENTINEL__ADDRESSES".into(),
            list(&s.addresses),
        ));
    }
    env
}

/// A store without metrics.
pub fn store(cfg: &RedisConfig) -> Store {
    Store::new(cfg, StoreMetrics::disabled()).expect("valid redis settings")
}

/// A serving test node `id` with `capacity`.
pub fn node(id: &str, capacity: u32) -> NodeInfo {
    NodeInfo {
        id: NodeId::parse(id).expect("valid node id"),
        sip_uri: format!("sip:{id}.test:5060"),
        control: format!("http://{id}.test:9090"),
        zone: String::new(),
        capacity,
        participant_capacity: 0,
        state: NodeState::Serving,
    }
}

/// A node id from a literal.
pub fn id(s: &str) -> NodeId {
    NodeId::parse(s).expect("valid node id")
}

/// An HTTP client for tests (installs the TLS crypto provider once; plain HTTP needs none,
/// but the client is built with TLS support).
pub fn http() -> reqwest::Client {
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// GETs `url` as JSON; `None` while it cannot be fetched or read (for polls with a deadline).
pub async fn try_get_json(url: &str) -> Option<serde_json::Value> {
    http().get(url).send().await.ok()?.json().await.ok()
}

/// The value of one series in a Prometheus text exposition (`name{labels}` exactly as
/// rendered, labels sorted by name), or 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    metric_opt(text, series).unwrap_or(0.0)
}

/// [`metric`] for a series that must be exported: its value, or `None` when it is absent
/// (so a renamed series or label does not read as a zero).
pub fn metric_opt(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// Fetches `/metrics` from `base`.
pub async fn scrape(base: &str) -> String {
    http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

/// Routes `conference` through the controller at `base` (`POST /v1/route`); the node id.
pub async fn route_node(base: &str, conference: &str) -> String {
    let v: serde_json::Value = http()
        .post(format!("{base}/v1/route"))
        .json(&serde_json::json!({ "conference": conference }))
        .send()
        .await
        .expect("POST /v1/route")
        .json()
        .await
        .expect("route JSON");
    v["node_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no node_id in {v}"))
        .to_string()
}

/// Waits until the process at `base` answers `GET /readyz` with 200 and, for a controller,
/// reports its call-control bus subscribed (commands sent before are refused).
pub async fn wait_ready(base: &str) -> crate::harness::HarnessResult<()> {
    let url = format!("{base}/readyz");
    crate::harness::wait_for_async(
        &format!("{url} to answer 200 with the bus subscribed"),
        Duration::from_secs(30),
        || async {
            let r = http().get(&url).send().await.ok()?;
            if !r.status().is_success() {
                return None;
            }
            let body: serde_json::Value = r.json().await.ok()?;
            (body["bus"] != false).then_some(())
        },
    )
    .await
}

/// Waits until the controller at `base` would place conferences on `n` nodes: its view holds
/// them serving with ARI up. A node is listed as soon as its agent registers, but its record
/// says ARI is up only after a heartbeat that followed the events connection, and the view
/// picks that up at its next refresh; a route sent before then may find no room.
pub async fn wait_placeable(base: &str, n: usize) -> crate::harness::HarnessResult<()> {
    crate::harness::wait_for_async(
        &format!("{n} placeable nodes in the controller's view"),
        Duration::from_secs(30),
        || async {
            let m = scrape(base).await;
            (metric(&m, r#"confroute_nodes{state="serving"}"#) == n as f64
                && metric(&m, "confroute_nodes_ari_down") == 0.0)
                .then_some(())
        },
    )
    .await
}

/// The error codes `docs/openapi.json` lets an HTTP client expect.
pub fn documented_error_codes() -> Vec<String> {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .expect("openapi document"),
    )
    .expect("valid JSON");
    doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
        .as_array()
        .expect("error code enum")
        .iter()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect()
}

/// Serves `app` on a free loopback port for the rest of the test; its address.
pub async fn serve_http(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}
