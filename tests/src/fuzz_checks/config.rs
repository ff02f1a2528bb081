//! The config loader (`shared::config::load_from`) with the controller's and the node's
//! root sections: a TOML file plus `CONFROUTE_*` variables.
//!
//! Input: the TOML text, then optionally a line `%%env` followed by `KEY=VALUE` lines. A
//! key without the `CONFROUTE_` prefix gets it, so the fuzzer spends no effort finding it.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use confroute_controller::config::ControllerConfig;
use confroute_node::config::NodeConfig;
use confroute_node::options::{self, VAR_PROFILE};
use confroute_shared::config::{
    load_from, redact_url, ConfigError, RedisConfig, RedisTarget, Validate, ENV_PREFIX,
};
use confroute_shared::store::{Store, StoreMetrics};

use super::http_url;

/// Separates the TOML text from the environment in an input.
const ENV_MARKER: &[u8] = b"\n%%env\n";

/// Loads the input as both binaries' configuration and checks the outcome.
pub fn config_toml(data: &[u8]) {
    let (toml, env) = split(data);
    let file = TempToml::write(toml);
    match load_from::<ControllerConfig>(Some(&file.0), &env) {
        Ok(cfg) => controller(&cfg),
        Err(e) => error(&e),
    }
    match load_from::<NodeConfig>(Some(&file.0), &env) {
        Ok(cfg) => node(&cfg),
        Err(e) => error(&e),
    }
}

fn split(data: &[u8]) -> (&[u8], Vec<(String, String)>) {
    let Some(at) = data.windows(ENV_MARKER.len()).position(|w| w == ENV_MARKER) else {
        return (data, Vec::new());
    };
    let env = String::from_utf8_lossy(&data[at + ENV_MARKER.len()..])
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| {
            let key = if k.starts_with(ENV_PREFIX) {
                k.to_string()
            } else {
                format!("{ENV_PREFIX}{k}")
            };
            (key, v.to_string())
        })
        .collect();
    (&data[..at], env)
}

/// The TOML file `load_from` reads, removed when dropped.
struct TempToml(PathBuf);

impl TempToml {
    fn write(text: &[u8]) -> TempToml {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        thread_local! {
            static SLOT: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        let n = SLOT.with(|s| *s);
        let path = std::env::temp_dir().join(format!(
            "confroute-fuzz-config-{}-{n}.toml",
            std::process::id()
        ));
        let mut f = std::fs::File::create(&path).expect("create the temporary config");
        f.write_all(text).expect("write the temporary config");
        TempToml(path)
    }
}

impl Drop for TempToml {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A refused configuration names at least one key, and each issue says something.
fn error(e: &ConfigError) {
    assert!(!e.issues.is_empty(), "an error without issues");
    for issue in &e.issues {
        assert!(!issue.key.is_empty(), "an issue without a key: {issue:?}");
        assert!(!issue.message.is_empty(), "an issue without a message");
        assert!(e.mentions(&issue.key));
    }
    assert!(!e.to_string().is_empty());
}

/// Everything derived from an accepted Redis section is usable and loggable without secrets.
fn redis(cfg: &RedisConfig) {
    let urls = match cfg.target() {
        RedisTarget::Single(u) => vec![u],
        RedisTarget::Sentinel { addresses, .. } => addresses,
        RedisTarget::Cluster(seeds) => seeds,
    };
    for url in &urls {
        let shown = redact_url(url);
        if let (Some(scheme), Some(at)) = (url.find("://"), url.rfind('@')) {
            if at > scheme {
                let after_scheme = &shown[scheme + 3..];
                assert!(
                    after_scheme.starts_with("***@") && after_scheme.matches('@').count() == 1,
                    "credentials left in {shown:?}"
                );
            }
        }
    }
    let _ = cfg.describe();
    // Building the store parses every URL but connects to nothing.
    let _ = Store::new(cfg, StoreMetrics::disabled());
}

fn controller(cfg: &ControllerConfig) {
    cfg.validate().expect("a loaded config validates again");
    redis(&cfg.redis);
    assert!(!cfg.sip.transports.is_empty());
    assert!((1024..=65_535).contains(&cfg.sip.max_message_size));
    assert!((1..=16).contains(&cfg.routing.candidates));
    let limits = cfg.rpc.limits();
    assert_eq!(limits.max_message_size, cfg.rpc.max_message_size);
    assert!(limits.burst >= 1 && limits.rate_per_sec >= 1 && limits.max_batch >= 1);
}

fn node(cfg: &NodeConfig) {
    cfg.validate().expect("a loaded config validates again");
    redis(&cfg.redis);
    let _ = cfg.node_id();
    let _ = cfg.sip_uri();
    let _ = cfg.ari_base();
    for bound in ["0.0.0.0:9090", "127.0.0.1:9091"] {
        let url = cfg.control_url(bound.parse().expect("literal address"));
        assert!(url.starts_with("http://") || url.starts_with("https://"));
    }
    // Every profile a call may pick resolves to options within the documented bounds.
    let mut picks: Vec<Option<&str>> = vec![None, Some("no-such-profile")];
    picks.extend(cfg.profiles.keys().map(|k| Some(k.as_str())));
    for pick in picks {
        let vars: BTreeMap<String, String> = pick
            .map(|p| (VAR_PROFILE.to_string(), p.to_string()))
            .into_iter()
            .collect();
        let (o, _) = options::resolve(&cfg.conference, &cfg.profiles, &vars);
        match pick {
            Some(p) if cfg.profiles.contains_key(p) => assert_eq!(o.profile, p),
            _ => assert_eq!(o.profile, "default"),
        }
        assert!((1..=10_000).contains(&o.max_participants));
        assert!(
            o.status_callback.is_empty() || http_url(&o.status_callback),
            "status callback {:?}",
            o.status_callback
        );
    }
}
