//! Configuration loading: built-in defaults < TOML file (`--config FILE`) < environment
//! (`CONFROUTE_` prefix, `__` for nesting), with errors that name the offending key.
//!
//! Each binary owns its root config struct; this module holds the loader and the sections
//! every binary shares (Redis, logging).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::secret::Secret;

/// Environment variable prefix for every setting.
pub const ENV_PREFIX: &str = "CONFROUTE_";

/// Variables of the `confroute-ctl` command line; the daemons' loader skips them.
pub const CTL_ENV_PREFIX: &str = "CONFROUTE_CTL_";

/// One problem found in the configuration, naming the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key path, e.g. `redis.url`.
    pub key: String,
    /// What is wrong and what form is expected.
    pub message: String,
    /// Where the value came from (file path or environment variable), when known.
    pub origin: Option<String>,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config key `{}`: {}", self.key, self.message)?;
        if let Some(origin) = &self.origin {
            write!(f, " (set in {origin})")?;
        }
        Ok(())
    }
}

/// The configuration could not be loaded; every issue names its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// All problems found (at least one).
    pub issues: Vec<ConfigIssue>,
}

impl ConfigError {
    /// A single issue about `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            issues: vec![ConfigIssue {
                key: key.into(),
                message: message.into(),
                origin: None,
            }],
        }
    }

    /// True when some issue concerns `key` (or an element `key[i]` of it).
    pub fn mentions(&self, key: &str) -> bool {
        self.issues
            .iter()
            .any(|i| i.key == key || i.key.strip_prefix(key).is_some_and(|r| r.starts_with('[')))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

/// Checks that go beyond what deserialization can express.
pub trait Validate {
    /// Returns every semantic problem, each naming its key.
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Loads `T` from defaults, the optional TOML file, then `CONFROUTE_*` variables, and validates it.
pub fn load<T: DeserializeOwned + Validate>(file: Option<&Path>) -> Result<T, ConfigError> {
    load_from(file, &settings_vars(std::env::vars_os())?)
}

/// The `CONFROUTE_*` variables of an environment; one whose name or value is not UTF-8 is
/// an error naming it. Others are not looked at: a variable of another program's that is
/// not UTF-8 is no concern of ours.
fn settings_vars(
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (name, value) in vars {
        let shown = name.to_string_lossy();
        if !shown.starts_with(ENV_PREFIX) {
            continue;
        }
        match (name.to_str(), value.into_string()) {
            (Some(n), Ok(v)) => out.push((n.to_string(), v)),
            _ => {
                return Err(ConfigError::new(
                    "(environment)",
                    format!("variable {shown} is not valid UTF-8"),
                ))
            }
        }
    }
    Ok(out)
}

/// Like [`load`] but with an explicit environment, so tests need not touch the process's own.
pub fn load_from<T: DeserializeOwned + Validate>(
    file: Option<&Path>,
    env: &[(String, String)],
) -> Result<T, ConfigError> {
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::new(
                "--config",
                format!("file {} does not exist or is not a file", path.display()),
            ));
        }
        // Tried here rather than by the parser, whose error names no key and breaks its line.
        let readable = std::fs::File::open(path).and_then(|mut f| {
            use std::io::Read;
            f.read(&mut [0u8; 1]).map(|_| ())
        });
        if let Err(e) = readable {
            return Err(ConfigError::new(
                "--config",
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    }
    let mut layers = Vec::new();
    if let Some(path) = file {
        layers.push(Layer::of(Toml::file_exact(path))?);
    }
    layers.push(Layer::of(EnvSnapshot { vars: env.to_vec() })?);
    let value: T = extract_all(&mut layers)?;
    value.validate()?;
    Ok(value)
}

/// Most type mistakes one load reports; a guard against a loop that removes nothing.
const MAX_TYPE_ISSUES: usize = 64;

/// Extracts `T` from `layers`, reporting every value of the wrong type, not just the first:
/// serde stops at the first, so each is taken out (its default stands in) and the
/// extraction tried again.
fn extract_all<T: DeserializeOwned>(layers: &mut [Layer]) -> Result<T, ConfigError> {
    let mut issues: Vec<ConfigIssue> = Vec::new();
    loop {
        let figment = layers
            .iter()
            .fold(Figment::new(), |f, l| f.merge(l.clone()));
        let errors = match figment.extract::<T>() {
            Ok(value) if issues.is_empty() => return Ok(value),
            Ok(_) => return Err(ConfigError { issues }),
            Err(e) => e,
        };
        let mut removed = false;
        for e in errors {
            // An array element's mistake takes the whole array out: its indexes would shift.
            let mut path: Vec<String> = e
                .path
                .iter()
                .take_while(|p| p.parse::<usize>().is_err())
                .cloned()
                .collect();
            if let figment::error::Kind::UnknownField(name, _) = &e.kind {
                if path.last() != Some(name) {
                    path.push(name.clone());
                }
            }
            for layer in layers.iter_mut() {
                removed |= layer.remove(&path);
            }
            issues.extend(convert(e).issues);
        }
        if !removed || issues.len() >= MAX_TYPE_ISSUES {
            return Err(ConfigError { issues });
        }
    }
}

/// One source of settings (the file, the environment) read once, so that values found to be
/// of the wrong type can be taken out of it; it keeps the source's metadata, which says
/// where a value was set.
#[derive(Clone)]
struct Layer {
    metadata: figment::Metadata,
    data: figment::value::Map<figment::Profile, figment::value::Dict>,
}

impl Layer {
    fn of(provider: impl figment::Provider) -> Result<Layer, ConfigError> {
        let metadata = provider.metadata();
        match provider.data() {
            Ok(data) => Ok(Layer { metadata, data }),
            // As a merge would: the error says which source it came from.
            Err(mut e) => {
                e.metadata = Some(metadata);
                Err(convert(e))
            }
        }
    }

    /// Takes the value at `path` out of every profile; true when one was there.
    fn remove(&mut self, path: &[String]) -> bool {
        let mut removed = false;
        for dict in self.data.values_mut() {
            removed |= remove_path(dict, path);
        }
        removed
    }
}

impl figment::Provider for Layer {
    fn metadata(&self) -> figment::Metadata {
        self.metadata.clone()
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Ok(self.data.clone())
    }
}

fn remove_path(dict: &mut figment::value::Dict, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => dict.remove(last).is_some(),
        [first, rest @ ..] => match dict.get_mut(first) {
            Some(figment::value::Value::Dict(_, inner)) => remove_path(inner, rest),
            // A scalar where a section belongs: the mistake is the scalar itself.
            Some(_) => dict.remove(first).is_some(),
            None => false,
        },
    }
}

/// `CONFROUTE_*` variables as a figment provider; `__` separates nesting levels.
///
/// It reads a given list rather than the process environment so tests can run in parallel.
struct EnvSnapshot {
    vars: Vec<(String, String)>,
}

impl figment::Provider for EnvSnapshot {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("environment").interpolater(|_profile, keys| {
            format!("{ENV_PREFIX}{}", keys.join("__").to_uppercase())
        })
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        let mut dict = figment::value::Dict::new();
        for (key, value) in &self.vars {
            if key.starts_with(CTL_ENV_PREFIX) {
                continue;
            }
            let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if rest.is_empty() {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(figment::Error::from(format!(
                    "environment variable {key} has an empty key segment"
                )));
            }
            let value = if path
                .last()
                .is_some_and(|k| SECRET_KEYS.contains(&k.as_str()))
            {
                // A secret is taken as written: quotes, brackets and spaces are part of it
                // (parsed, `"pw"` lost its quotes and `[a, b]` became a list).
                figment::value::Value::from(value.clone())
            } else {
                env_value(value)
            };
            insert_path(&mut dict, &path, value);
        }
        let mut map = figment::value::Map::new();
        map.insert(figment::Profile::Default, dict);
        Ok(map)
    }
}

/// Keys whose environment values are secrets, kept exactly as written.
const SECRET_KEYS: &[&str] = &["password", "api_token", "auth_token"];

/// An environment value as figment reads it (`50`, `true`, `["a", "b"]`), else the string.
fn env_value(value: &str) -> figment::value::Value {
    // figment 0.10's string unescaping slices at a char index: a backslash after a non-ASCII
    // character inside quotes panics (found by fuzzing). Such a value stays a plain string.
    if !value.is_ascii() && value.contains('\\') {
        return figment::value::Value::from(value.to_string());
    }
    let parsed: figment::value::Value = match value.parse() {
        Ok(v) => v,
        Err(_) => return figment::value::Value::from(value.to_string()),
    };
    // A number whose usual rendering is not what was written (`007`, `+1`, `1.50`, a token
    // of 40 digits) is text to the operator: a token, password or id keeps every character.
    let rendered = parsed
        .to_u128()
        .map(|n| n.to_string())
        .or_else(|| parsed.to_i128().map(|n| n.to_string()))
        .or_else(|| parsed.to_f64().map(|n| n.to_string()));
    match rendered {
        Some(r) if r != value.trim() => figment::value::Value::from(value.to_string()),
        _ => parsed,
    }
}

fn insert_path(dict: &mut figment::value::Dict, path: &[String], value: figment::value::Value) {
    use figment::value::{Dict, Value};
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            } else {
                let mut inner = Dict::new();
                insert_path(&mut inner, rest, value);
                *entry = Value::from(inner);
            }
        }
    }
}

/// A wrong value as an error shows it: text is not quoted, since it may be a secret (a
/// password, a token, a URL with credentials) set where another type was expected.
fn unquoted(actual: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Str(_) => "a string".to_string(),
        Actual::Bytes(_) => "bytes".to_string(),
        Actual::Char(_) => "a character".to_string(),
        other => other.to_string(),
    }
}

/// A parser's message without the lines that quote the file (`2 | api_token = s3cr3t`):
/// the line at fault may hold a secret; the message says where it is.
fn without_source_lines(message: &str) -> String {
    message
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            let t = t
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start();
            !t.starts_with('|')
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn convert(err: figment::Error) -> ConfigError {
    use figment::error::Kind;
    let issues = err
        .into_iter()
        .map(|e| {
            let mut path = e.path.clone();
            let message = match &e.kind {
                Kind::UnknownField(name, expected) => {
                    if path.last() != Some(name) {
                        path.push(name.clone());
                    }
                    if expected.is_empty() {
                        "unknown key; this section takes no keys".to_string()
                    } else {
                        format!("unknown key; expected one of: {}", expected.join(", "))
                    }
                }
                Kind::MissingField(name) => {
                    if path.last().map(String::as_str) != Some(name.as_ref()) {
                        path.push(name.to_string());
                    }
                    "required key is missing".to_string()
                }
                Kind::InvalidType(actual, expected) => {
                    format!("found {}, expected {expected}", unquoted(actual))
                }
                Kind::InvalidValue(actual, expected) => {
                    format!("invalid value {}, expected {expected}", unquoted(actual))
                }
                Kind::UnknownVariant(actual, expected) => {
                    format!(
                        "unknown value `{actual}`, expected one of: {}",
                        expected.join(", ")
                    )
                }
                other => without_source_lines(&other.to_string()),
            };
            // Array elements show as `key[i]`; their variable is the array's own.
            let mut key = String::new();
            let mut var_parts: Vec<&str> = Vec::new();
            for part in &path {
                if part.parse::<usize>().is_ok() {
                    key.push_str(&format!("[{part}]"));
                } else {
                    if !key.is_empty() {
                        key.push('.');
                    }
                    key.push_str(part);
                    var_parts.push(part);
                }
            }
            let origin = e.metadata.as_ref().map(|m| match &m.source {
                Some(figment::Source::File(p)) => p.display().to_string(),
                _ if m.name == "environment" => format!(
                    "environment variable {ENV_PREFIX}{}",
                    var_parts.join("__").to_uppercase()
                ),
                _ => m.name.to_string(),
            });
            ConfigIssue {
                key: if key.is_empty() {
                    "(root)".to_string()
                } else {
                    key
                },
                message,
                origin,
            }
        })
        .collect();
    ConfigError { issues }
}

/// Accepts a duration written like `500ms`, `2s`, `1h 30m`.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Duration;
        // Also what a bare number is told: it has no unit.
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration with its unit, like 500ms, 2s, 5m")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
            humantime_serde::re::humantime::parse_duration(text).map_err(|e| {
                E::custom(format!(
                    "`{text}` is not a duration ({e}); expected a form like 500ms, 2s, 5m"
                ))
            })
        }
    }
    d.deserialize_any(V)
}

/// Accepts a listen address, `IP:PORT` (`[IPv6]:PORT`), naming the value and the form when
/// it is not one.
pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = string_like(d)?;
    text.trim().parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "`{text}` is not an IP address and port; expected e.g. 0.0.0.0:5060 or [::]:5060 (no host names)"
        ))
    })
}

/// Accepts a string, or a number or boolean written where a string is meant.
///
/// Environment values are parsed (so `CONFROUTE_NODE__CAPACITY=50` is a number); a string key
/// such as a node id or a password that happens to look numeric must still load.
pub fn string_like<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

/// [`string_like`] for an optional key.
pub fn opt_string_like<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    string_like(d).map(Some)
}

/// Collects issues from several checks into one error.
#[derive(Default)]
pub struct Issues(Vec<ConfigIssue>);

impl Issues {
    /// Records a problem with `key`.
    pub fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigIssue {
            key: key.into(),
            message: message.into(),
            origin: None,
        });
    }

    /// Merges the issues of a nested validation.
    pub fn extend(&mut self, result: Result<(), ConfigError>) {
        if let Err(e) = result {
            self.0.extend(e.issues);
        }
    }

    /// Ok when nothing was recorded.
    pub fn finish(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { issues: self.0 })
        }
    }
}

/// How to reach Redis: exactly one of `url`, `sentinel` or `cluster`. Its `Debug` hides the
/// credentials a URL may carry (`redis://user:password@host`).
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// A single Redis: `redis://host:port/db` or `rediss://` for TLS.
    pub url: Option<String>,
    /// A Sentinel-managed primary.
    pub sentinel: Option<SentinelConfig>,
    /// A Redis Cluster.
    pub cluster: Option<ClusterConfig>,
    /// ACL user name for the data nodes.
    #[serde(deserialize_with = "opt_string_like")]
    pub username: Option<String>,
    /// Password for the data nodes.
    pub password: Option<Secret>,
    /// Use TLS to the data nodes (implied by a `rediss://` URL).
    pub tls: bool,
    /// PEM file of the CAs to trust for TLS to Redis (data nodes and sentinels) instead of
    /// the built-in public roots: a private CA (cert-manager, a cloud's server CA).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that ask for one (`tls-auth-clients`); with
    /// `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Prefix of every key; must hold a `{hash tag}` so all keys share one Cluster slot.
    pub prefix: String,
    /// Deadline for one Redis operation; past it the caller gets an error (and SIP a 503).
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Deadline for opening a connection.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Replicas that must acknowledge a claim before it is answered (Redis `WAIT`), capped at
    /// the replicas online at that moment (not in their first full sync); 0 = none. Set 1 or more behind Sentinel so a
    /// failover cannot lose a claim that was already answered; since only connected
    /// replicas are waited for, set Redis's `min-replicas-to-write` on the primary too, or a
    /// primary cut off from its replicas confirms claims the promoted one never gets.
    pub wait_replicas: u32,
    /// Lease of a conference claim, renewed by its owner while the conference lives.
    #[serde(deserialize_with = "duration")]
    pub conference_lease: Duration,
    /// Lease of a new claim until a caller or dial-out reaches its node (the agent's first
    /// count write then gives it `conference_lease`), capped at `conference_lease`: a claim
    /// no call ever reaches (a scanner, an edge that does not follow the 302) frees its
    /// node's capacity after this, not after a whole conference lease.
    #[serde(deserialize_with = "duration")]
    pub claim_lease: Duration,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("sentinel", &self.sentinel)
            .field("cluster", &self.cluster)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("tls", &self.tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("wait_replicas", &self.wait_replicas)
            .field("conference_lease", &self.conference_lease)
            .field("claim_lease", &self.claim_lease)
            .finish()
    }
}

/// Addresses as they may be logged: a URL as [`redact_url`] shows it, and `user:pass@host`
/// (an address taken without its scheme) without its user part.
fn redacted_all(urls: &[String]) -> Vec<String> {
    // A scheme is letters first, then letters, digits, `+`, `-` or `.`: a `://` after
    // anything else is inside a password.
    let has_scheme = |u: &str| {
        u.split_once("://").is_some_and(|(scheme, _)| {
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        })
    };
    urls.iter()
        .map(|u| match (has_scheme(u), u.rfind('@')) {
            (false, Some(at)) => format!("***@{}", &u[at + 1..]),
            _ => redact_url(u),
        })
        .collect()
}

/// Sentinel group settings. Its `Debug` hides credentials in the addresses.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// Name of the monitored primary (`sentinel monitor <name> ...`).
    #[serde(deserialize_with = "string_like")]
    pub master_name: String,
    /// Sentinel addresses as `host:port` or `redis://host:port`.
    pub addresses: Vec<String>,
    /// ACL user name for the sentinels.
    #[serde(default, deserialize_with = "opt_string_like")]
    pub username: Option<String>,
    /// Password for the sentinels (the data-node password is `redis.password`).
    #[serde(default)]
    pub password: Option<Secret>,
    /// Use TLS to the sentinels.
    #[serde(default)]
    pub tls: bool,
}

impl std::fmt::Debug for SentinelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelConfig")
            .field("master_name", &self.master_name)
            .field("addresses", &redacted_all(&self.addresses))
            .field("username", &self.username)
            .field("password", &self.password)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Redis Cluster settings. Its `Debug` hides credentials in the seeds.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Seed nodes as `host:port` or `redis://host:port`.
    pub seeds: Vec<String>,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("seeds", &redacted_all(&self.seeds))
            .finish()
    }
}

/// Default Redis address when none is configured.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            sentinel: None,
            cluster: None,
            username: None,
            password: None,
            tls: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            prefix: "{confroute}:".to_string(),
            timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(1),
            wait_replicas: 0,
            conference_lease: Duration::from_secs(60),
            claim_lease: Duration::from_secs(10),
        }
    }
}

/// Checks that `pem` (the file at `path`, named by `key`) holds X.509 certificates that
/// parse; the error names the key.
fn check_certificates(
    key: &str,
    path: &std::path::Path,
    pem: &[u8],
) -> Result<(), (String, String)> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let fail = |why: String| Err((key.to_string(), format!("`{}` {why}", path.display())));
    let mut roots = rustls::RootCertStore::empty();
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = match cert {
            Ok(c) => c,
            Err(e) => return fail(format!("holds a certificate that is not valid PEM ({e})")),
        };
        // Read as a trust anchor: any well-formed certificate is one.
        if let Err(e) = roots.add(cert) {
            return fail(format!("holds a certificate that does not parse ({e})"));
        }
        found += 1;
    }
    if found == 0 {
        return fail("holds no certificate (a `-----BEGIN CERTIFICATE-----` block)".into());
    }
    Ok(())
}

/// Checks that `pem` (the file at `path`) holds a private key rustls can sign with.
fn check_private_key(path: &std::path::Path, pem: &[u8]) -> Result<(), (String, String)> {
    use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
    let fail = |why: String| {
        Err((
            "redis.tls_key_file".to_string(),
            format!("`{}` {why}", path.display()),
        ))
    };
    let key = match PrivateKeyDer::from_pem_slice(pem) {
        Ok(k) => k,
        Err(e) => return fail(format!("holds no private key ({e})")),
    };
    if let Err(e) = rustls::crypto::ring::sign::any_supported_type(&key) {
        return fail(format!("holds a private key that cannot be used ({e})"));
    }
    Ok(())
}

/// TLS material for Redis read from the configured PEM files.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CAs to trust instead of the built-in roots.
    pub ca: Option<Vec<u8>>,
    /// Client certificate and key.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for TlsFiles {
    // The key never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles")
            .field("ca_bytes", &self.ca.as_ref().map(Vec::len))
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

/// The Redis deployment a [`RedisConfig`] describes, after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server.
    Single(String),
    /// A Sentinel group.
    Sentinel {
        /// Primary's name.
        master_name: String,
        /// Sentinel addresses, normalised to URLs.
        addresses: Vec<String>,
    },
    /// A Cluster, by seed URLs.
    Cluster(Vec<String>),
}

fn normalise_addr(a: &str, tls: bool) -> String {
    if a.contains("://") {
        a.to_string()
    } else if tls {
        format!("rediss://{a}")
    } else {
        format!("redis://{a}")
    }
}

impl RedisConfig {
    /// Whether any connection to Redis (data nodes or sentinels) uses TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls
            || self
                .url
                .as_deref()
                .is_some_and(|u| u.starts_with("rediss://"))
            || self
                .sentinel
                .as_ref()
                .is_some_and(|s| s.tls || s.addresses.iter().any(|a| a.starts_with("rediss://")))
            || self
                .cluster
                .as_ref()
                .is_some_and(|c| c.seeds.iter().any(|a| a.starts_with("rediss://")))
    }

    /// The PEM files of `tls_ca_file`, `tls_cert_file` and `tls_key_file`, read; `None`
    /// when none is set. The error names the key.
    pub fn tls_files(&self) -> Result<Option<TlsFiles>, (String, String)> {
        if self.tls_ca_file.is_none() && self.tls_cert_file.is_none() && self.tls_key_file.is_none()
        {
            return Ok(None);
        }
        let read =
            |key: &str, path: &Option<PathBuf>| -> Result<Option<Vec<u8>>, (String, String)> {
                let Some(path) = path else { return Ok(None) };
                let pem = std::fs::read(path).map_err(|e| {
                    (
                        key.to_string(),
                        format!("cannot read `{}`: {e}", path.display()),
                    )
                })?;
                if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
                    return Err((
                        key.to_string(),
                        format!("`{}` holds no PEM block", path.display()),
                    ));
                }
                Ok(Some(pem))
            };
        let ca = read("redis.tls_ca_file", &self.tls_ca_file)?;
        let cert = read("redis.tls_cert_file", &self.tls_cert_file)?;
        let key = read("redis.tls_key_file", &self.tls_key_file)?;

        let client = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err((
                    "redis.tls_key_file".into(),
                    "is needed with redis.tls_cert_file".into(),
                ))
            }
            (None, Some(_)) => {
                return Err((
                    "redis.tls_cert_file".into(),
                    "is needed with redis.tls_key_file".into(),
                ))
            }
        };
        // Parsed here, not only when connecting: a broken or swapped file is then a
        // configuration error naming its key, not a connection error blamed on the URL.
        if let (Some(pem), Some(path)) = (&ca, &self.tls_ca_file) {
            check_certificates("redis.tls_ca_file", path, pem)?;
        }
        if let (Some((cert, key)), Some(cert_path), Some(key_path)) =
            (&client, &self.tls_cert_file, &self.tls_key_file)
        {
            check_certificates("redis.tls_cert_file", cert_path, cert)?;
            check_private_key(key_path, key)?;
        }
        Ok(Some(TlsFiles { ca, client }))
    }

    fn check_tls_files(&self, issues: &mut Issues) {
        let set = [
            ("redis.tls_ca_file", &self.tls_ca_file),
            ("redis.tls_cert_file", &self.tls_cert_file),
            ("redis.tls_key_file", &self.tls_key_file),
        ];
        if let Some((key, _)) = set.iter().find(|(_, v)| v.is_some()) {
            if !self.uses_tls() {
                issues.add(
                    *key,
                    "is set but no connection to Redis uses TLS (a rediss:// URL, redis.tls or redis.sentinel.tls)",
                );
                return;
            }
        }
        if let Err((key, message)) = self.tls_files() {
            issues.add(key, message);
        }
    }

    /// Which deployment to connect to (single URL when nothing is set).
    pub fn target(&self) -> RedisTarget {
        if let Some(s) = &self.sentinel {
            RedisTarget::Sentinel {
                master_name: s.master_name.clone(),
                addresses: s
                    .addresses
                    .iter()
                    .map(|a| normalise_addr(a, s.tls))
                    .collect(),
            }
        } else if let Some(c) = &self.cluster {
            RedisTarget::Cluster(
                c.seeds
                    .iter()
                    .map(|a| normalise_addr(a, self.tls))
                    .collect(),
            )
        } else {
            RedisTarget::Single(
                self.url
                    .clone()
                    .unwrap_or_else(|| DEFAULT_REDIS_URL.to_string()),
            )
        }
    }

    /// A loggable description with no credentials.
    pub fn describe(&self) -> String {
        match self.target() {
            RedisTarget::Single(url) => format!("single server {}", redact_url(&url)),
            RedisTarget::Sentinel {
                master_name,
                addresses,
            } => format!(
                "sentinel master {master_name} via {}",
                addresses
                    .iter()
                    .map(|a| redact_url(a))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            RedisTarget::Cluster(seeds) => format!(
                "cluster via {}",
                seeds
                    .iter()
                    .map(|a| redact_url(a))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

/// The characters [`header_name_ok`] takes, as messages say them.
pub const HEADER_NAME_FORM: &str = "letters, digits, '-', '_' and '.'";

/// Whether `s` is a SIP header name both binaries take: a token (RFC 3261 §25.1) of the
/// characters that need no quoting anywhere it goes (an Asterisk dialplan function's
/// argument on the node).
pub fn header_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Removes `user:password@` from a URL so it can be logged.
pub fn redact_url(url: &str) -> String {
    // The last `@` ends what may be a user part: a password may hold `/`, `?` or `#`
    // (base64 does), so the authority's end cannot be trusted to bound it. An `@` in a
    // path or query is redacted with it, which hides too much rather than too little.
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

fn check_url(issues: &mut Issues, key: &str, url: &str) {
    let ok = (url.starts_with("redis://") || url.starts_with("rediss://"))
        && url.split("://").nth(1).is_some_and(|rest| !rest.is_empty());
    if !ok {
        issues.add(
            key,
            format!(
                "`{}` is not a Redis URL; expected redis://host:port or rediss://host:port",
                redact_url(url)
            ),
        );
        return;
    }
    // What the client itself refuses (a port that is not a number, a database that is
    // not one) is a configuration mistake too, told before anything starts.
    if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url) {
        issues.add(
            key,
            format!(
                "`{}` is not a usable Redis URL ({e}); expected redis://[:password@]host:port[/db]",
                redact_url(url)
            ),
        );
    }
}

fn check_addresses(issues: &mut Issues, key: &str, list: &[String], tls: bool, flag: &str) {
    if list.is_empty() {
        issues.add(key, "must list at least one address (host:port)");
    }
    for (i, a) in list.iter().enumerate() {
        let key = format!("{key}[{i}]");
        // Some connections (the bus's, the slot lookups) take their TLS from the address
        // alone: a redis:// one would go out in plaintext, password and all, while the
        // operator believes TLS is on.
        if tls && a.starts_with("redis://") {
            issues.add(
                &key,
                format!(
                    "`{}` is a redis:// URL but {flag} is true; write it as host:port or rediss://host:port",
                    redact_url(a)
                ),
            );
            continue;
        }
        check_url(issues, &key, &normalise_addr(a, tls));
    }
}

/// Whether any of these addresses carries a password of its own (`redis://:pw@host`).
fn any_password(addresses: &[String], tls: bool) -> bool {
    addresses.iter().any(|a| {
        redis::IntoConnectionInfo::into_connection_info(normalise_addr(a, tls).as_str())
            .is_ok_and(|info| info.redis_settings().password().is_some())
    })
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

impl Validate for RedisConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let mut issues = Issues::default();
        let set = [
            self.url.is_some(),
            self.sentinel.is_some(),
            self.cluster.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if set > 1 {
            issues.add(
                "redis",
                "set exactly one of redis.url, redis.sentinel, redis.cluster",
            );
        }
        if let Some(url) = &self.url {
            check_url(&mut issues, "redis.url", url);
        }
        if let Some(s) = &self.sentinel {
            if s.master_name.trim().is_empty() {
                issues.add("redis.sentinel.master_name", "must not be empty");
            }
            check_addresses(
                &mut issues,
                "redis.sentinel.addresses",
                &s.addresses,
                s.tls,
                "redis.sentinel.tls",
            );
        }
        if let Some(c) = &self.cluster {
            check_addresses(
                &mut issues,
                "redis.cluster.seeds",
                &c.seeds,
                self.tls,
                "redis.tls",
            );
            // A Cluster has database 0 only: a seed naming another fails every connection
            // ("SELECT is not allowed in cluster mode") with nothing naming the key.
            for (i, seed) in c.seeds.iter().enumerate() {
                let db = redis::IntoConnectionInfo::into_connection_info(
                    normalise_addr(seed, self.tls).as_str(),
                )
                .map(|info| info.redis_settings().db())
                .unwrap_or(0);
                if db != 0 {
                    issues.add(
                        format!("redis.cluster.seeds[{i}]"),
                        format!("names database {db}; a Redis Cluster has database 0 only"),
                    );
                }
            }
        }
        // A single server's TLS comes from its URL scheme alone; accepting the flag beside a
        // redis:// URL would send the password in plaintext while the operator believes not.
        if self.tls {
            if let RedisTarget::Single(url) = self.target() {
                if !url.starts_with("rediss://") {
                    issues.add(
                        "redis.tls",
                        format!(
                            "is true but the single server `{}` is a redis:// URL; write it as rediss:// to use TLS (redis.tls applies to Sentinel and Cluster)",
                            redact_url(&url)
                        ),
                    );
                }
            }
        }
        self.check_tls_files(&mut issues);
        match (self.prefix.find('{'), self.prefix.find('}')) {
            (Some(open), Some(close)) if close > open + 1 => {}
            _ => issues.add(
                "redis.prefix",
                format!(
                    "`{}` has no hash tag; expected a form like {{confroute}}: so every key lands in one Cluster slot",
                    self.prefix
                ),
            ),
        }
        // Bounded above too: the store multiplies these into budgets and millisecond
        // leases, which an absurd value would overflow.
        for (key, value) in [
            ("redis.timeout", self.timeout),
            ("redis.connect_timeout", self.connect_timeout),
        ] {
            if value.is_zero() || value > HOUR {
                issues.add(key, "must be greater than zero and at most 1h");
            }
        }
        for (key, value) in [
            ("redis.conference_lease", self.conference_lease),
            ("redis.claim_lease", self.claim_lease),
        ] {
            if !(Duration::from_secs(1)..=DAY).contains(&value) {
                issues.add(key, "must be at least 1s and at most 24h");
            }
        }
        // redis-rs would send `AUTH ""`, which every Redis refuses: no connection, with
        // nothing naming the key.
        let sentinel_password = self.sentinel.as_ref().and_then(|s| s.password.as_ref());
        for (key, secret) in [
            ("redis.password", self.password.as_ref()),
            ("redis.sentinel.password", sentinel_password),
        ] {
            if secret.is_some_and(Secret::is_empty) {
                issues.add(key, "must not be empty (leave it unset for no password)");
            }
        }
        // A user name goes out only with a password (`AUTH user password`): without one it
        // would be dropped and the connection run as `default`; an empty one is refused by
        // every Redis.
        let data_urls: Vec<String> = match self.target() {
            RedisTarget::Single(url) => vec![url],
            RedisTarget::Cluster(seeds) => seeds,
            RedisTarget::Sentinel { .. } => Vec::new(),
        };
        let sentinel_user = self.sentinel.as_ref().map(|s| {
            (
                s.username.as_ref(),
                sentinel_password.is_some() || any_password(&s.addresses, s.tls),
            )
        });
        for (key, user, has_password) in [
            (
                "redis.username",
                self.username.as_ref(),
                self.password.is_some() || any_password(&data_urls, self.tls),
            ),
            (
                "redis.sentinel.username",
                sentinel_user.and_then(|(u, _)| u),
                sentinel_user.is_some_and(|(_, p)| p),
            ),
        ] {
            match user {
                Some(u) if u.is_empty() => {
                    issues.add(key, "must not be empty (leave it unset for the default user)")
                }
                Some(_) if !has_password => issues.add(
                    key,
                    "is set without a password; set the matching password too (a user name alone is never sent)",
                ),
                _ => {}
            }
        }
        issues.finish()
    }
}

/// Log output settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (human-readable) or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `confroute_controller=debug,info`.
    pub level: String,
}

/// Log line format.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

impl Validate for LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        // An empty filter turns every line off, "started" included: surely not meant.
        if self.level.trim().is_empty() {
            return Err(ConfigError::new(
                "log.level",
                "must not be empty; expected e.g. info or confroute_controller=debug,info",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            return Err(ConfigError::new(
                "log.level",
                format!(
                    "`{}` is not a log filter ({e}); expected e.g. info or confroute_controller=debug,info",
                    self.level
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debug output of the Redis settings (a `tracing::debug!(?cfg)` some day) shows no
    /// password a URL carries.
    #[test]
    fn redis_settings_debug_hides_url_credentials() {
        let cfg = RedisConfig {
            url: Some("redis://app:url-secret-1@redis:6379/0".into()),
            sentinel: Some(SentinelConfig {
                master_name: "main".into(),
                addresses: vec![
                    "redis://s:sentinel-secret-2@s1:26379".into(),
                    "s:bare-secret-4@s2:26379".into(),
                    "s:odd://secret-5@s3:26379".into(),
                ],
                username: None,
                password: None,
                tls: false,
            }),
            cluster: Some(ClusterConfig {
                seeds: vec!["redis://c:cluster-secret-3@c1:6379".into()],
            }),
            ..RedisConfig::default()
        };
        let shown = format!("{cfg:?}");
        for secret in [
            "url-secret-1",
            "sentinel-secret-2",
            "cluster-secret-3",
            "bare-secret-4",
            "odd:",
            "secret-5",
        ] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.contains("redis:6379/0") && shown.contains("c1:6379"),
            "{shown}"
        );
    }
    use std::io::Write;

    #[derive(Debug, Deserialize, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Root {
        redis: RedisConfig,
        log: LogConfig,
        #[serde(deserialize_with = "string_like")]
        name: String,
    }

    impl Validate for Root {
        fn validate(&self) -> Result<(), ConfigError> {
            let mut i = Issues::default();
            i.extend(self.redis.validate());
            i.extend(self.log.validate());
            i.finish()
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn toml(text: &str) -> tempfile_lite::TempFile {
        let f = tempfile_lite::TempFile::new("toml");
        let mut h = std::fs::File::create(f.path()).expect("create temp config");
        h.write_all(text.as_bytes()).expect("write temp config");
        f
    }

    /// A tiny temp file helper so the shared crate needs no extra dev-dependency.
    mod tempfile_lite {
        use std::path::{Path, PathBuf};
        pub struct TempFile(PathBuf);
        impl TempFile {
            pub fn new(ext: &str) -> Self {
                let n: u64 = rand::random();
                TempFile(std::env::temp_dir().join(format!("confroute-cfg-{n:x}.{ext}")))
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn tls_files_are_checked_and_named() {
        let pem = toml("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        let not_pem = toml("hello\n");
        let pem_path = pem.path().to_string_lossy().into_owned();
        let bad_path = not_pem.path().to_string_lossy().into_owned();
        let tls = ("CONFROUTE_REDIS__URL", "rediss://redis.example:6380");
        // (Files that parse are read by the TLS tests of the test crate.)
        for (vars, key, says) in [
            (
                vec![tls, ("CONFROUTE_REDIS__TLS_CA_FILE", pem_path.as_str())],
                "redis.tls_ca_file",
                "does not parse",
            ),
            (
                vec![tls, ("CONFROUTE_REDIS__TLS_CA_FILE", "/nonexistent/ca.pem")],
                "redis.tls_ca_file",
                "cannot read",
            ),
            (
                vec![tls, ("CONFROUTE_REDIS__TLS_CA_FILE", bad_path.as_str())],
                "redis.tls_ca_file",
                "no PEM block",
            ),
            (
                vec![tls, ("CONFROUTE_REDIS__TLS_CERT_FILE", pem_path.as_str())],
                "redis.tls_key_file",
                "is needed",
            ),
            (
                vec![tls, ("CONFROUTE_REDIS__TLS_KEY_FILE", pem_path.as_str())],
                "redis.tls_cert_file",
                "is needed",
            ),
            // Without TLS anywhere the file would be ignored while the operator believes not.
            (
                vec![("CONFROUTE_REDIS__TLS_CA_FILE", pem_path.as_str())],
                "redis.tls_ca_file",
                "no connection to Redis uses TLS",
            ),
        ] {
            let err = load_from::<Root>(None, &env(&vars)).expect_err(key);
            assert!(err.mentions(key), "{key}: {err}");
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    /// A variable that is not UTF-8 is no panic: another program's is passed over, one of
    /// ours is named.
    #[test]
    fn variables_that_are_not_utf8_are_passed_over_or_named() {
        use std::os::unix::ffi::OsStringExt;
        let junk = std::ffi::OsString::from_vec(vec![0xff, 0xfe]);
        let vars = vec![
            ("JUNK".into(), junk.clone()),
            ("CONFROUTE_LOG__FORMAT".into(), "json".into()),
        ];
        let ours = settings_vars(vars.into_iter()).expect("others' variables are passed over");
        assert_eq!(ours, vec![("CONFROUTE_LOG__FORMAT".into(), "json".into())]);
        let vars = vec![("CONFROUTE_REDIS__PASSWORD".into(), junk)];
        let err = settings_vars(vars.into_iter()).expect_err("ours must be UTF-8");
        assert!(
            err.to_string().contains("CONFROUTE_REDIS__PASSWORD"),
            "{err}"
        );
    }

    #[test]
    fn every_type_mistake_is_reported_at_once_with_where_it_was_set() {
        let f = toml("[redis]\ntimeout = \"soon\"\nbogus = 1\n[log]\nformat = \"xml\"\n");
        let err = load_from::<Root>(
            Some(f.path()),
            &env(&[
                ("CONFROUTE_REDIS__CONNECT_TIMEOUT", "5"),
                ("CONFROUTE_REDIS__PASSWORD", "pw"),
            ]),
        )
        .expect_err("four mistakes");
        for key in [
            "redis.timeout",
            "redis.bogus",
            "log.format",
            "redis.connect_timeout",
        ] {
            assert!(err.mentions(key), "{key}: {err}");
        }
        assert_eq!(err.issues.len(), 4, "{err}");
        let text = err.to_string();
        let file = f.path().display().to_string();
        assert!(text.contains(&format!("(set in {file})")), "{text}");
        assert!(
            text.contains("(set in environment variable CONFROUTE_REDIS__CONNECT_TIMEOUT)"),
            "{text}"
        );
        // Neither a parse error nor a type mistake quotes the value: it may be a secret.
        let unquoted = toml("[http]\napi_token = s3cr3t-token-0123456789\n");
        let err = load_from::<Root>(Some(unquoted.path()), &[]).expect_err("a syntax error");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        assert!(err.to_string().contains("line 2"), "{err}");
        let escaped = toml("[redis]\npassword = \"pa\\ss-s3cr3t\"\n");
        let err = load_from::<Root>(Some(escaped.path()), &[]).expect_err("a bad escape");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        let err = load_from::<Root>(
            None,
            &env(&[(
                "CONFROUTE_REDIS__CLUSTER__SEEDS",
                "rediss://default:s3cr3t@c1:6379",
            )]),
        )
        .expect_err("seeds are a list");
        assert!(err.mentions("redis.cluster.seeds"), "{err}");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        let broken = toml("[redis\n");
        let err = load_from::<Root>(Some(broken.path()), &[]).expect_err("a syntax error");
        let file = broken.path().display().to_string();
        assert!(
            err.to_string().contains(&format!("(set in {file})")),
            "{err}"
        );
        // The limits wait for the types: nothing is said about what the defaults stood in for.
        let f = toml("[redis]\ntimeout = \"soon\"\nconference_lease = \"1ms\"\n");
        let err = load_from::<Root>(Some(f.path()), &[]).expect_err("a type mistake");
        assert_eq!(err.issues.len(), 1, "{err}");
    }

    #[test]
    fn leases_under_a_second_are_refused_by_name() {
        let root: Root = load_from(None, &[]).expect("defaults load");
        assert_eq!(root.redis.claim_lease, Duration::from_secs(10));
        assert_eq!(root.redis.conference_lease, Duration::from_secs(60));
        for key in ["conference_lease", "claim_lease"] {
            let var = format!("CONFROUTE_REDIS__{}", key.to_uppercase());
            let err = load_from::<Root>(None, &env(&[(var.as_str(), "500ms")]))
                .expect_err("a lease under a second");
            assert!(err.mentions(&format!("redis.{key}")), "{key}: {err}");
            assert!(err.to_string().contains("at least 1s"), "{err}");
            assert_eq!(err.issues.len(), 1, "{err}");
        }
    }

    #[test]
    fn defaults_apply_without_file_or_env() {
        let root: Root = load_from(None, &[]).expect("defaults load");
        assert_eq!(
            root.redis.target(),
            RedisTarget::Single(DEFAULT_REDIS_URL.into())
        );
        assert_eq!(root.redis.timeout, Duration::from_millis(500));
        assert_eq!(root.log.format, LogFormat::Text);
    }

    #[test]
    fn env_overrides_file_overrides_defaults() {
        let f = toml("name = \"from-file\"\n[redis]\nurl = \"redis://file:1\"\ntimeout = \"2s\"\n");
        let root: Root = load_from(Some(f.path()), &[]).expect("file loads");
        assert_eq!(root.redis.url.as_deref(), Some("redis://file:1"));
        assert_eq!(root.redis.timeout, Duration::from_secs(2));
        let root: Root = load_from(
            Some(f.path()),
            &env(&[
                ("CONFROUTE_REDIS__URL", "redis://env:2"),
                ("CONFROUTE_NAME", "12345"),
                ("OTHER_VAR", "ignored"),
                ("CONFROUTE_CTL_TOKEN", "belongs to confroute-ctl"),
            ]),
        )
        .expect("env loads");
        assert_eq!(root.redis.url.as_deref(), Some("redis://env:2"));
        assert_eq!(
            root.redis.timeout,
            Duration::from_secs(2),
            "file value kept"
        );
        assert_eq!(root.name, "12345", "a numeric env value fills a string key");
        // Digits that read as a number are still the operator's text, every character kept.
        for text in [
            "00001111222233334444",
            "007",
            "+15555550101",
            "1.50",
            "1234567890123456789012345678901234567890",
        ] {
            let root: Root = load_from(None, &env(&[("CONFROUTE_NAME", text)])).expect("env loads");
            assert_eq!(root.name, text);
        }
        // A Sentinel group named with digits (`sentinel monitor 1 ...` is valid).
        let root: Root = load_from(
            None,
            &env(&[
                ("CONFROUTE_REDIS__SENTINEL__MASTER_NAME", "1"),
                ("CONFROUTE_REDIS__SENTINEL__ADDRESSES", "[\"s1:26379\"]"),
            ]),
        )
        .expect("a numeric Sentinel group name loads");
        let sentinel = root.redis.sentinel.as_ref().expect("sentinel settings");
        assert_eq!(sentinel.master_name, "1");
        let root: Root = load_from(None, &env(&[("CONFROUTE_REDIS__WAIT_REPLICAS", "2")]))
            .expect("a number still fills a number");
        assert_eq!(root.redis.wait_replicas, 2);
    }

    /// A file that exists but cannot be read (permissions; here a file the kernel refuses
    /// to read from its start) is named as the `--config` problem it is.
    #[test]
    fn an_unreadable_file_is_named_as_the_config_option() {
        let err =
            load_from::<Root>(Some(Path::new("/proc/self/mem")), &[]).expect_err("unreadable");
        assert!(err.mentions("--config"), "{err}");
        assert!(
            err.to_string().contains("cannot read /proc/self/mem"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let f = toml("[redis]\nurll = \"redis://x:1\"\n");
        let err = load_from::<Root>(Some(f.path()), &[]).expect_err("unknown key");
        assert!(err.mentions("redis.urll"), "{err}");
        assert!(err.to_string().contains("expected one of"), "{err}");

        let err = load_from::<Root>(None, &env(&[("CONFROUTE_REDIS__NOPE", "1")]))
            .expect_err("unknown env key");
        assert!(err.mentions("redis.nope"), "{err}");
        assert!(
            err.to_string().contains("CONFROUTE_REDIS__NOPE"),
            "origin named: {err}"
        );
    }

    #[test]
    fn bad_values_are_named_with_the_expected_form() {
        let err = load_from::<Root>(None, &env(&[("CONFROUTE_REDIS__TIMEOUT", "soon")]))
            .expect_err("bad duration");
        assert!(err.mentions("redis.timeout"), "{err}");
        assert!(err.to_string().contains("500ms"), "{err}");

        let err = load_from::<Root>(None, &env(&[("CONFROUTE_REDIS__WAIT_REPLICAS", "-3")]))
            .expect_err("negative count");
        assert!(err.mentions("redis.wait_replicas"), "{err}");

        let err = load_from::<Root>(None, &env(&[("CONFROUTE_LOG__FORMAT", "xml")]))
            .expect_err("bad enum");
        assert!(err.mentions("log.format"), "{err}");
        assert!(err.to_string().contains("text, json"), "{err}");

        let err = load_from::<Root>(None, &env(&[("CONFROUTE_REDIS__URL", "http://x")]))
            .expect_err("bad url");
        assert!(err.mentions("redis.url"), "{err}");

        let err = load_from::<Root>(None, &env(&[("CONFROUTE_REDIS__PREFIX", "confroute:")]))
            .expect_err("prefix without hash tag");
        assert!(err.mentions("redis.prefix"), "{err}");

        let err = load_from::<Root>(None, &env(&[("CONFROUTE_LOG__LEVEL", "info,[[[")]))
            .expect_err("bad filter");
        assert!(err.mentions("log.level"), "{err}");
        // An empty filter would silence every line.
        let err = load_from::<Root>(None, &env(&[("CONFROUTE_LOG__LEVEL", "")]))
            .expect_err("empty filter");
        assert!(err.mentions("log.level"), "{err}");

        // What the Redis client itself would refuse at start-up is named here, no password.
        for url in ["redis://:pw@host:notaport", "redis://127.0.0.1:6379/abc"] {
            let err =
                load_from::<Root>(None, &env(&[("CONFROUTE_REDIS__URL", url)])).expect_err(url);
            assert!(err.mentions("redis.url"), "{err}");
            assert!(!err.to_string().contains("pw@"), "{err}");
        }

        // A bare number where a duration belongs is told to give its unit.
        let err = load_from::<Root>(None, &env(&[("CONFROUTE_REDIS__TIMEOUT", "5")]))
            .expect_err("a duration without its unit");
        assert!(err.mentions("redis.timeout"), "{err}");
        assert!(err.to_string().contains("with its unit"), "{err}");

        for url in [None, Some("redis://secret@cache:6379")] {
            let mut vars = vec![("CONFROUTE_REDIS__TLS", "true")];
            vars.extend(url.map(|u| ("CONFROUTE_REDIS__URL", u)));
            let err = load_from::<Root>(None, &env(&vars)).expect_err("tls with redis://");
            assert!(err.mentions("redis.tls"), "{err}");
            assert!(err.to_string().contains("rediss://"), "{err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn tls_goes_with_a_rediss_url_sentinel_or_cluster() {
        let ok: Root = load_from(
            None,
            &env(&[
                ("CONFROUTE_REDIS__TLS", "true"),
                ("CONFROUTE_REDIS__URL", "rediss://cache:6379"),
            ]),
        )
        .expect("tls with rediss://");
        assert!(ok.redis.tls);
        let f = toml(
            "[redis]\ntls = true\n[redis.sentinel]\nmaster_name = \"m\"\naddresses = [\"127.0.0.1:26379\"]\n",
        );
        load_from::<Root>(Some(f.path()), &[]).expect("tls behind sentinel");
        let f = toml("[redis]\ntls = true\n[redis.cluster]\nseeds = [\"127.0.0.1:7000\"]\n");
        load_from::<Root>(Some(f.path()), &[]).expect("tls to a cluster");
    }

    /// What the client would otherwise take wrongly, or fail on at every connection with
    /// nothing naming the key: a redis:// address beside a TLS flag, a Cluster seed naming a
    /// database, a user name without a password or an empty one.
    #[test]
    fn redis_addresses_and_users_the_client_would_take_wrongly_name_their_key() {
        for (text, key) in [
            (
                "[redis]\ntls = true\npassword = \"pw\"\n[redis.cluster]\nseeds = [\"127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]\n",
                "redis.cluster.seeds[1]",
            ),
            (
                "[redis.sentinel]\nmaster_name = \"m\"\ntls = true\naddresses = [\"redis://127.0.0.1:26379\"]\n",
                "redis.sentinel.addresses[0]",
            ),
            (
                "[redis.cluster]\nseeds = [\"redis://127.0.0.1:7000/2\"]\n",
                "redis.cluster.seeds[0]",
            ),
            ("[redis]\nusername = \"app\"\n", "redis.username"),
            (
                "[redis]\nusername = \"\"\npassword = \"pw\"\n",
                "redis.username",
            ),
            (
                "[redis.sentinel]\nmaster_name = \"m\"\naddresses = [\"127.0.0.1:26379\"]\nusername = \"watcher\"\n",
                "redis.sentinel.username",
            ),
        ] {
            let f = toml(text);
            let err = load_from::<Root>(Some(f.path()), &[]).expect_err(text);
            assert!(err.mentions(key), "{text}: {err}");
            assert_eq!(err.issues.len(), 1, "{text}: {err}");
        }
        // A password in the URL goes with the user name; rediss:// beside the flag is TLS.
        for text in [
            "[redis]\nurl = \"redis://:pw@127.0.0.1:6379\"\nusername = \"app\"\n",
            "[redis]\ntls = true\n[redis.cluster]\nseeds = [\"rediss://127.0.0.1:7000\", \"127.0.0.1:7001\"]\n",
            "[redis.sentinel]\nmaster_name = \"m\"\naddresses = [\"127.0.0.1:26379\"]\nusername = \"watcher\"\npassword = \"pw\"\n",
        ] {
            let f = toml(text);
            load_from::<Root>(Some(f.path()), &[]).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
    }

    #[test]
    fn exactly_one_redis_mode() {
        let f =
            toml("[redis]\nurl = \"redis://a:1\"\n[redis.cluster]\nseeds = [\"127.0.0.1:7000\"]\n");
        let err = load_from::<Root>(Some(f.path()), &[]).expect_err("two modes");
        assert!(err.mentions("redis"), "{err}");

        let f = toml("[redis.sentinel]\nmaster_name = \"mymaster\"\naddresses = []\n");
        let err = load_from::<Root>(Some(f.path()), &[]).expect_err("no sentinels");
        assert!(err.mentions("redis.sentinel.addresses"), "{err}");

        let f = toml("[redis.sentinel]\naddresses = [\"127.0.0.1:26379\"]\n");
        let err = load_from::<Root>(Some(f.path()), &[]).expect_err("missing master name");
        assert!(err.mentions("redis.sentinel.master_name"), "{err}");
    }

    #[test]
    fn redis_timers_and_passwords_out_of_range_name_their_key() {
        for (var, value, key) in [
            ("CONFROUTE_REDIS__TIMEOUT", "200000000000y", "redis.timeout"),
            ("CONFROUTE_REDIS__TIMEOUT", "2h", "redis.timeout"),
            (
                "CONFROUTE_REDIS__CONNECT_TIMEOUT",
                "0s",
                "redis.connect_timeout",
            ),
            (
                "CONFROUTE_REDIS__CONNECT_TIMEOUT",
                "61m",
                "redis.connect_timeout",
            ),
            (
                "CONFROUTE_REDIS__CONFERENCE_LEASE",
                "25h",
                "redis.conference_lease",
            ),
            ("CONFROUTE_REDIS__CLAIM_LEASE", "500ms", "redis.claim_lease"),
            ("CONFROUTE_REDIS__PASSWORD", "", "redis.password"),
        ] {
            let err = load_from::<Root>(None, &env(&[(var, value)]))
                .expect_err(&format!("{var}={value} is refused"));
            assert!(err.mentions(key), "{var}={value}: {err}");
            assert_eq!(err.issues.len(), 1, "{err}");
        }
        let f = toml(
            "[redis.sentinel]\nmaster_name = \"m\"\naddresses = [\"127.0.0.1:26379\"]\npassword = \"\"\n",
        );
        let err = load_from::<Root>(Some(f.path()), &[]).expect_err("empty sentinel password");
        assert!(err.mentions("redis.sentinel.password"), "{err}");
        let root: Root = load_from(
            None,
            &env(&[
                ("CONFROUTE_REDIS__TIMEOUT", "1h"),
                ("CONFROUTE_REDIS__CONFERENCE_LEASE", "24h"),
                ("CONFROUTE_REDIS__PASSWORD", "pw"),
            ]),
        )
        .expect("the bounds themselves are accepted");
        assert_eq!(root.redis.timeout, Duration::from_secs(3600));
    }

    #[test]
    fn sentinel_and_cluster_targets() {
        let f = toml(
            "[redis]\npassword = \"s3cret\"\n[redis.sentinel]\nmaster_name = \"m\"\naddresses = [\"127.0.0.1:26379\", \"redis://h:26380\"]\n",
        );
        let root: Root = load_from(Some(f.path()), &[]).expect("sentinel config");
        assert_eq!(
            root.redis.target(),
            RedisTarget::Sentinel {
                master_name: "m".into(),
                addresses: vec!["redis://127.0.0.1:26379".into(), "redis://h:26380".into()]
            }
        );
        assert!(!format!("{:?}", root.redis).contains("s3cret"));
        let root: Root = load_from(
            None,
            &env(&[("CONFROUTE_REDIS__CLUSTER__SEEDS", "[\"a:1\", \"b:2\"]")]),
        )
        .expect("cluster from env");
        assert_eq!(
            root.redis.target(),
            RedisTarget::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
    }

    #[test]
    fn env_values_with_escapes_after_non_ascii_do_not_panic() {
        // Found by fuzzing: figment's unescaping panicked on this value.
        let value = "[\"10.\u{e9}\\\\ADER_NODE=X\"]";
        let err = load_from::<Root>(None, &env(&[("CONFROUTE_REDIS__CLUSTER__SEEDS", value)]))
            .expect_err("a string where a list belongs");
        assert!(err.mentions("redis.cluster.seeds"), "{err}");
        let root: Root =
            load_from(None, &env(&[("CONFROUTE_NAME", "caf\u{e9}\\x")])).expect("kept as a string");
        assert_eq!(root.name, "caf\u{e9}\\x");
        // ASCII values are still parsed, escapes included.
        let root: Root =
            load_from(None, &env(&[("CONFROUTE_NAME", "\"x\\\\y\"")])).expect("escaped string");
        assert_eq!(root.name, "x\\y");
    }

    /// Passwords and tokens reach containers as environment variables: each is taken exactly
    /// as written, where other values are parsed (`"x"` would lose its quotes, `[a]` become
    /// a list, spaces be trimmed).
    #[test]
    fn secrets_from_the_environment_are_taken_as_written() {
        for raw in [
            "\"quoted\"",
            "[1, 2]",
            "{a}",
            " padded ",
            "007",
            "true",
            "p;w#x",
        ] {
            let root: Root = load_from(
                None,
                &env(&[
                    ("CONFROUTE_REDIS__URL", "redis://127.0.0.1:6379"),
                    ("CONFROUTE_REDIS__PASSWORD", raw),
                ]),
            )
            .unwrap_or_else(|e| panic!("{raw:?}: {e}"));
            let got = root.redis.password.as_ref().map(|p| p.expose().to_string());
            assert_eq!(got.as_deref(), Some(raw));
        }
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = load_from::<Root>(Some(Path::new("/nonexistent/confroute.toml")), &[])
            .expect_err("missing file");
        assert!(err.mentions("--config"), "{err}");
    }

    #[test]
    fn redaction() {
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        assert_eq!(
            redact_url("http://asterisk:s3cret@127.0.0.1:8088"),
            "http://***@127.0.0.1:8088"
        );
        for (url, secret) in [
            ("redis://:ab/cd+x==@redis:6379", "ab/cd"),
            ("http://u:p#w@h:8088", "p#w"),
            ("https://u:p?w@h/cb", "p?w"),
        ] {
            assert!(!redact_url(url).contains(secret), "{url}");
        }
    }
}
