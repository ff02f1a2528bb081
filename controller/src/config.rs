//! The controller's configuration (see `shared::config` for how it is loaded).

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use confroute_shared::config::{
    duration, header_name_ok, socket_addr, string_like, ConfigError, Issues, LogConfig,
    RedisConfig, Validate, HEADER_NAME_FORM,
};
use confroute_shared::secret::Secret;

/// Root of `confroute-controller`'s settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerConfig {
    /// SIP redirect server.
    pub sip: SipConfig,
    /// HTTP API, health and metrics.
    pub http: HttpConfig,
    /// Placement and routing deadlines.
    pub routing: RoutingConfig,
    /// Call control (JSON-RPC WebSocket and REST mirrors).
    pub rpc: RpcConfig,
    /// Where Redis is.
    pub redis: RedisConfig,
    /// Log output.
    pub log: LogConfig,
    /// Threads the process runs on.
    pub runtime: RuntimeConfig,
}

/// Most worker threads accepted.
pub const MAX_WORKER_THREADS: usize = 256;

/// The longest duration any timer setting takes.
const DAY: Duration = Duration::from_secs(24 * 3600);

/// How many threads run the controller's work.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads; 0 for one per CPU.
    ///
    /// One by default: a routing decision is a few microseconds of CPU and the rest is
    /// waiting on Redis, and handing each call between threads (the receive loop, the call,
    /// the Redis connection) cost about a third of the controller's CPU per call. One thread
    /// answers over 20,000 calls/s; scale out with replicas, or raise this on a large host.
    /// With one thread the runtime is tokio's current-thread scheduler: it runs the requests
    /// already queued before the Redis connection's task, so their commands leave in one
    /// write instead of one or two at a time.
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { worker_threads: 1 }
    }
}

/// SIP listener and redirect settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SipConfig {
    /// Address for both UDP and TCP.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Transports to serve: `udp`, `tcp` or both.
    pub transports: Vec<Transport>,
    /// Header that names the conference, taking precedence over the Request-URI user part
    /// when present; empty to always use the Request-URI.
    #[serde(deserialize_with = "string_like")]
    pub conference_header: String,
    /// Name of the header carrying the conference name in the 302.
    #[serde(deserialize_with = "string_like")]
    pub header_conference: String,
    /// Name of the header carrying the chosen node id in the 302.
    #[serde(deserialize_with = "string_like")]
    pub header_node: String,
    /// Sources allowed to send requests (CIDRs); empty allows everyone.
    #[serde(deserialize_with = "cidrs")]
    pub trusted_cidrs: Vec<IpNet>,
    /// `Retry-After` seconds in 503 answers.
    pub retry_after: u32,
    /// Largest accepted message in bytes.
    pub max_message_size: usize,
    /// INVITE transactions remembered for retransmissions, at most.
    pub max_transactions: usize,
    /// Kernel receive/send buffer of the UDP socket in bytes; 0 keeps the system default.
    pub udp_buffer_size: usize,
    /// INVITEs received over UDP being routed at once; further ones are dropped (their
    /// senders retransmit) until some are answered.
    pub max_pending_invites: usize,
    /// TCP connections open at once; further ones are closed as they are accepted.
    pub tcp_max_connections: usize,
    /// TCP connections open at once from one address, so that one host cannot take every
    /// slot and keep the edge proxies out.
    pub tcp_max_connections_per_source: usize,
    /// A TCP connection with no traffic for this long is closed.
    #[serde(deserialize_with = "duration")]
    pub tcp_idle_timeout: Duration,
}

/// A SIP transport.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Datagrams.
    Udp,
    /// Streams.
    Tcp,
}

pub use confroute_shared::http_serve::{DEFAULT_HEADER_TIMEOUT, HEADER_TIMEOUT_RANGE};

/// Most `http.max_running_commands` allowed (a task each, with its bus call).
pub const MAX_RUNNING_COMMANDS: usize = 100_000;

/// HTTP API settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Bearer token required on every route but health and metrics; none = open.
    pub api_token: Option<Secret>,
    /// Largest accepted request body in bytes.
    pub max_body_size: usize,
    /// Longest a connection may take to send a request's head (or sit idle between
    /// requests, or leave an answer unread) before it is closed.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// HTTP connections open at once; further ones are closed as they are accepted.
    pub max_connections: usize,
    /// REST dial-outs and moves running at once (each runs to its end even when its client
    /// hangs up); past it one is refused with 503.
    pub max_running_commands: usize,
}

/// How conferences are placed and how long a routing decision may take.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Preferred zone for new conferences (nodes elsewhere are the fallback); empty for none.
    #[serde(deserialize_with = "string_like")]
    pub zone: String,
    /// How often the node list is re-read from Redis.
    #[serde(deserialize_with = "duration")]
    pub node_refresh: Duration,
    /// Deadline for one routing decision, all Redis calls included; past it SIP gets 503.
    #[serde(deserialize_with = "duration")]
    pub deadline: Duration,
    /// Candidates passed to one claim (the claim script tries them in order).
    pub candidates: usize,
}

/// Call-control limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// Deadline for a command to reach the owning node and be answered.
    #[serde(deserialize_with = "duration")]
    pub command_timeout: Duration,
    /// Largest JSON-RPC message accepted, in bytes.
    pub max_message_size: usize,
    /// Conferences one connection may subscribe to.
    pub max_subscriptions: usize,
    /// Commands per second per connection, on average.
    pub rate_limit: u32,
    /// Commands per connection allowed in a burst.
    pub burst: u32,
    /// Requests in one batch.
    pub max_batch: usize,
    /// How often each connection is pinged; silent for 2.5 of these, it is closed.
    #[serde(deserialize_with = "duration")]
    pub ping_interval: Duration,
    /// WebSocket connections open at once; further upgrades get 503.
    pub max_connections: usize,
}

impl Default for RpcConfig {
    fn default() -> Self {
        let l = crate::rpc::Limits::default();
        RpcConfig {
            command_timeout: crate::rpc::DEFAULT_COMMAND_TIMEOUT,
            max_message_size: l.max_message_size,
            max_subscriptions: l.max_subscriptions,
            rate_limit: l.rate_per_sec,
            burst: l.burst,
            max_batch: l.max_batch,
            ping_interval: l.ping_interval,
            max_connections: 10_000,
        }
    }
}

impl RpcConfig {
    /// The per-connection limits these settings give.
    pub fn limits(&self) -> crate::rpc::Limits {
        crate::rpc::Limits {
            max_message_size: self.max_message_size,
            max_subscriptions: self.max_subscriptions,
            rate_per_sec: self.rate_limit,
            burst: self.burst,
            max_batch: self.max_batch,
            ping_interval: self.ping_interval,
            // A whole batch may run at once: its members would otherwise be refused as
            // too many in progress however low the rate.
            max_in_flight: crate::rpc::Limits::default()
                .max_in_flight
                .max(self.max_batch),
        }
    }
}

fn cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let items = Vec::<String>::deserialize(d)?;
    items
        .iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "`{s}` is not a CIDR; expected a form like 10.0.0.0/8 or 2001:db8::/32"
                    ))
                })
        })
        .collect()
}

impl Default for SipConfig {
    fn default() -> Self {
        SipConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 5060)),
            transports: vec![Transport::Udp, Transport::Tcp],
            conference_header: "X-Conference".to_string(),
            header_conference: "X-Conference".to_string(),
            header_node: "X-Conference-Node".to_string(),
            trusted_cidrs: Vec::new(),
            retry_after: 5,
            max_message_size: crate::sip::message::DEFAULT_MAX_MESSAGE,
            max_transactions: 200_000,
            udp_buffer_size: 4 * 1024 * 1024,
            max_pending_invites: 10_000,
            tcp_max_connections: 4096,
            tcp_max_connections_per_source: 256,
            tcp_idle_timeout: Duration::from_secs(600),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            api_token: None,
            max_body_size: 64 * 1024,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections: confroute_shared::http_serve::DEFAULT_MAX_CONNECTIONS,
            max_running_commands: 1024,
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            zone: String::new(),
            node_refresh: Duration::from_millis(500),
            deadline: Duration::from_secs(1),
            candidates: 4,
        }
    }
}

impl Validate for ControllerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let mut issues = Issues::default();
        issues.extend(self.redis.validate());
        issues.extend(self.log.validate());
        if self.sip.transports.is_empty() {
            issues.add("sip.transports", "must list udp, tcp or both");
        }
        if !self.sip.conference_header.is_empty() && !header_name_ok(&self.sip.conference_header) {
            issues.add(
                "sip.conference_header",
                format!("must be a header name ({HEADER_NAME_FORM}) or empty"),
            );
        }
        for (key, value) in [
            ("sip.header_conference", &self.sip.header_conference),
            ("sip.header_node", &self.sip.header_node),
        ] {
            if !header_name_ok(value) {
                issues.add(key, format!("must be a header name ({HEADER_NAME_FORM})"));
            }
        }
        if self.sip.max_message_size < 1024 || self.sip.max_message_size > 65_535 {
            issues.add(
                "sip.max_message_size",
                "must be between 1024 and 65535 bytes",
            );
        }
        if self.sip.retry_after == 0 {
            issues.add("sip.retry_after", "must be at least 1 second");
        }
        if let Some(problem) = self
            .http
            .api_token
            .as_ref()
            .and_then(|t| confroute_shared::secret::api_token_problem(t.expose()))
        {
            issues.add("http.api_token", problem);
        }
        if self.http.max_body_size < 1024 {
            issues.add("http.max_body_size", "must be at least 1024 bytes");
        }
        if !HEADER_TIMEOUT_RANGE.contains(&self.http.header_timeout) {
            issues.add("http.header_timeout", "must be between 1s and 1h");
        }
        if !confroute_shared::http_serve::MAX_CONNECTIONS_RANGE.contains(&self.http.max_connections)
        {
            issues.add("http.max_connections", "must be between 1 and 1000000");
        }
        if !(1..=MAX_RUNNING_COMMANDS).contains(&self.http.max_running_commands) {
            issues.add("http.max_running_commands", "must be between 1 and 100000");
        }
        // Under RFC 3261's 32 s (Timer H, 64·T1): past it the INVITE's transaction is
        // forgotten while it is still being routed, and neither a CANCEL nor a lost answer's
        // resend can find it.
        if self.routing.deadline.is_zero() || self.routing.deadline >= Duration::from_secs(32) {
            issues.add(
                "routing.deadline",
                "must be greater than zero and under 32s (an INVITE transaction's lifetime)",
            );
        }
        if !(1..=1_000_000).contains(&self.sip.max_pending_invites) {
            issues.add("sip.max_pending_invites", "must be between 1 and 1000000");
        }
        if !(1..=1_000_000).contains(&self.sip.tcp_max_connections) {
            issues.add("sip.tcp_max_connections", "must be between 1 and 1000000");
        }
        if !(1..=1_000_000).contains(&self.sip.tcp_max_connections_per_source) {
            issues.add(
                "sip.tcp_max_connections_per_source",
                "must be between 1 and 1000000",
            );
        }
        if self.sip.tcp_idle_timeout < Duration::from_secs(1) {
            issues.add("sip.tcp_idle_timeout", "must be at least 1s");
        }
        if self.routing.node_refresh < Duration::from_millis(50) {
            issues.add("routing.node_refresh", "must be at least 50ms");
        }
        if !(1..=16).contains(&self.routing.candidates) {
            issues.add("routing.candidates", "must be between 1 and 16");
        }
        // Upper bounds too: a deadline computed from an absurd duration would overflow.
        if !(Duration::from_millis(100)..=DAY).contains(&self.rpc.command_timeout) {
            issues.add("rpc.command_timeout", "must be between 100ms and 24h");
        }
        if !(1024..=1024 * 1024).contains(&self.rpc.max_message_size) {
            issues.add(
                "rpc.max_message_size",
                "must be between 1024 and 1048576 bytes",
            );
        }
        if self.rpc.rate_limit == 0 {
            issues.add("rpc.rate_limit", "must be at least 1");
        }
        if self.rpc.burst == 0 {
            issues.add("rpc.burst", "must be at least 1");
        }
        if self.runtime.worker_threads > MAX_WORKER_THREADS {
            issues.add(
                "runtime.worker_threads",
                format!("must be between 0 (one per CPU) and {MAX_WORKER_THREADS}"),
            );
        }
        if !(Duration::from_secs(1)..=DAY).contains(&self.rpc.ping_interval) {
            issues.add("rpc.ping_interval", "must be between 1s and 24h");
        }
        // Each member of a batch may be in progress at once: a bound keeps that a number.
        if !(1..=10_000).contains(&self.rpc.max_batch) {
            issues.add("rpc.max_batch", "must be between 1 and 10000");
        }
        if self.rpc.max_subscriptions == 0 {
            issues.add("rpc.max_subscriptions", "must be at least 1");
        }
        if !(1..=1_000_000).contains(&self.rpc.max_connections) {
            issues.add("rpc.max_connections", "must be between 1 and 1000000");
        }
        issues.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confroute_shared::config::load_from;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let cfg: ControllerConfig = load_from(None, &[]).expect("defaults");
        assert_eq!(cfg.sip.listen.port(), 5060);
        assert_eq!(cfg.sip.transports, vec![Transport::Udp, Transport::Tcp]);
        assert!(cfg.http.api_token.is_none());
        assert_eq!(cfg.runtime.worker_threads, 1);
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("CONFROUTE_SIP__LISTEN", "nowhere", "sip.listen"),
            ("CONFROUTE_SIP__TRANSPORTS", "[\"sctp\"]", "sip.transports"),
            (
                "CONFROUTE_SIP__TRUSTED_CIDRS",
                "[\"10.0.0.0/33\"]",
                "sip.trusted_cidrs",
            ),
            ("CONFROUTE_SIP__HEADER_NODE", "X Node", "sip.header_node"),
            ("CONFROUTE_SIP__RETRY_AFTER", "0", "sip.retry_after"),
            ("CONFROUTE_HTTP__API_TOKEN", "short", "http.api_token"),
            (
                "CONFROUTE_HTTP__MAX_CONNECTIONS",
                "0",
                "http.max_connections",
            ),
            (
                "CONFROUTE_HTTP__MAX_RUNNING_COMMANDS",
                "0",
                "http.max_running_commands",
            ),
            (
                "CONFROUTE_HTTP__MAX_RUNNING_COMMANDS",
                "100001",
                "http.max_running_commands",
            ),
            (
                "CONFROUTE_HTTP__API_TOKEN",
                "abcdefghijklmnop\n",
                "http.api_token",
            ),
            (
                "CONFROUTE_HTTP__HEADER_TIMEOUT",
                "0s",
                "http.header_timeout",
            ),
            (
                "CONFROUTE_HTTP__HEADER_TIMEOUT",
                "soon",
                "http.header_timeout",
            ),
            ("CONFROUTE_ROUTING__DEADLINE", "0s", "routing.deadline"),
            ("CONFROUTE_ROUTING__DEADLINE", "32s", "routing.deadline"),
            ("CONFROUTE_ROUTING__CANDIDATES", "99", "routing.candidates"),
            ("CONFROUTE_HTTP__NOPE", "1", "http.nope"),
            (
                "CONFROUTE_SIP__TCP_MAX_CONNECTIONS",
                "0",
                "sip.tcp_max_connections",
            ),
            (
                "CONFROUTE_SIP__TCP_MAX_CONNECTIONS_PER_SOURCE",
                "0",
                "sip.tcp_max_connections_per_source",
            ),
            (
                "CONFROUTE_SIP__MAX_PENDING_INVITES",
                "0",
                "sip.max_pending_invites",
            ),
            (
                "CONFROUTE_SIP__TCP_IDLE_TIMEOUT",
                "0s",
                "sip.tcp_idle_timeout",
            ),
            ("CONFROUTE_RPC__RATE_LIMIT", "0", "rpc.rate_limit"),
            ("CONFROUTE_RPC__BURST", "0", "rpc.burst"),
            ("CONFROUTE_RPC__PING_INTERVAL", "10ms", "rpc.ping_interval"),
            ("CONFROUTE_RPC__PING_INTERVAL", "25h", "rpc.ping_interval"),
            (
                "CONFROUTE_RPC__COMMAND_TIMEOUT",
                "9999999999999s",
                "rpc.command_timeout",
            ),
            ("CONFROUTE_RPC__MAX_BATCH", "0", "rpc.max_batch"),
            (
                "CONFROUTE_RPC__MAX_BATCH",
                "4611686018427387904",
                "rpc.max_batch",
            ),
            ("CONFROUTE_RPC__MAX_CONNECTIONS", "0", "rpc.max_connections"),
            (
                "CONFROUTE_RPC__MAX_SUBSCRIPTIONS",
                "0",
                "rpc.max_subscriptions",
            ),
            (
                "CONFROUTE_RUNTIME__WORKER_THREADS",
                "257",
                "runtime.worker_threads",
            ),
            (
                "CONFROUTE_RUNTIME__WORKER_THREADS",
                "-1",
                "runtime.worker_threads",
            ),
        ];
        for (var, value, key) in cases {
            let err = load_from::<ControllerConfig>(None, &env(&[(var, value)])).expect_err(var);
            assert!(err.mentions(key), "{var}={value}: {err}");
        }
        // A listen address names the value and the form it takes.
        for value in ["localhost:5060", "127.0.0.1:99999"] {
            let err =
                load_from::<ControllerConfig>(None, &env(&[("CONFROUTE_HTTP__LISTEN", value)]))
                    .expect_err(value);
            assert!(err.mentions("http.listen"), "{err}");
            let text = err.to_string();
            assert!(
                text.contains(value) && text.contains("0.0.0.0:5060"),
                "{text}"
            );
        }
        let cfg: ControllerConfig =
            load_from(None, &env(&[("CONFROUTE_SIP__LISTEN", "[::1]:5070")])).expect("IPv6");
        assert_eq!(cfg.sip.listen, "[::1]:5070".parse().expect("addr"));
    }

    #[test]
    fn cidrs_and_single_addresses() {
        let cfg: ControllerConfig = load_from(
            None,
            &env(&[(
                "CONFROUTE_SIP__TRUSTED_CIDRS",
                "[\"10.0.0.0/8\", \"192.0.2.7\"]",
            )]),
        )
        .expect("cidrs");
        assert_eq!(cfg.sip.trusted_cidrs.len(), 2);
        assert!(cfg.sip.trusted_cidrs[1]
            .contains(&"192.0.2.7".parse::<std::net::IpAddr>().expect("ip")));
    }
}
