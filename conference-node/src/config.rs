//! The node agent's configuration (see `shared::config` for how it is loaded).
//!
//! Conference options have a default set (`[conference]`) and named profiles
//! (`[profiles.NAME]`), like ConfBridge's bridge and user profiles; a call picks a profile
//! with the channel variable `CONFROUTE_PROFILE` and may override single options with
//! other channel variables (see [`crate::options`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use confroute_shared::config::{
    duration, redact_url, string_like, ConfigError, Issues, LogConfig, RedisConfig, Validate,
};
use confroute_shared::secret::Secret;
use confroute_shared::types::NodeId;

use crate::options::{Beep, CallbackEvent, Record};

/// Root of `confroute-node`'s settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// This node: identity, address, capacity, lifecycle timings.
    pub node: NodeSection,
    /// The agent's own HTTP port (health, metrics, drain).
    pub http: HttpConfig,
    /// The local Asterisk's REST Interface.
    pub ari: AriConfig,
    /// Default conference options.
    pub conference: ConferenceDefaults,
    /// Named option sets a call selects with `CONFROUTE_PROFILE`.
    pub profiles: BTreeMap<String, Profile>,
    /// Status callback delivery.
    pub webhook: WebhookConfig,
    /// Calling out into conferences (the `dialout` command).
    pub dialout: DialoutConfig,
    /// Where Redis is.
    pub redis: RedisConfig,
    /// Log output.
    pub log: LogConfig,
}

/// What to do with a caller who reached this node for a conference another node owns.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WrongNodePolicy {
    /// Send the call to the owner with a SIP 302 (ARI `redirect`), else hang up.
    Redirect,
    /// Hang up with cause 34 (SIP 503) so the edge asks the router again.
    Hangup,
}

/// What to do with a conference whose claim moved to another node (invariant 2).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LostPolicy {
    /// Admit nobody new; the participants already here stay until they leave.
    Drain,
    /// Hang up every participant at once.
    End,
}

/// `[node]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// Unique node id; defaults to the host name.
    pub id: Option<NodeId>,
    /// Where the edge sends calls for this node, e.g. `sip:10.0.0.5:5060`; defaults to
    /// `sip:<host name>:5060`.
    #[serde(deserialize_with = "opt_string")]
    pub sip_uri: Option<String>,
    /// Advertised HTTP control address; defaults to `http://<http.listen>`.
    #[serde(deserialize_with = "opt_string")]
    pub control: Option<String>,
    /// Zone or site label for placement preference; empty for none.
    #[serde(deserialize_with = "string_like")]
    pub zone: String,
    /// Most conferences this node hosts at once.
    pub capacity: u32,
    /// Participants (as the last heartbeat counted) at which the node takes no new
    /// conference; 0 for no such limit.
    pub participant_capacity: u32,
    /// How often the node record and load are written (the lease is three of these).
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    /// Longest a drain waits for conferences to end before ending them.
    #[serde(deserialize_with = "duration")]
    pub drain_deadline: Duration,
    /// Wrong-node arrivals: `redirect` or `hangup`.
    pub wrong_node: WrongNodePolicy,
    /// Conferences whose claim moved elsewhere: `drain` or `end`.
    pub on_ownership_lost: LostPolicy,
}

/// `[http]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address.
    #[serde(deserialize_with = "confroute_shared::config::socket_addr")]
    pub listen: SocketAddr,
    /// Bearer token required on `/v1/*`; none = open.
    pub api_token: Option<Secret>,
    /// Longest a connection may take to send a request's head (or sit idle between
    /// requests, or leave an answer unread) before it is closed.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// HTTP connections open at once; further ones are closed as they are accepted.
    pub max_connections: usize,
}

/// `[ari]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AriConfig {
    /// Base URL of Asterisk's HTTP server, e.g. `http://127.0.0.1:8088` (ARI under `/ari`).
    #[serde(deserialize_with = "string_like")]
    pub url: String,
    /// ARI user (ari.conf).
    #[serde(deserialize_with = "string_like")]
    pub username: String,
    /// ARI password (never logged).
    pub password: Secret,
    /// Stasis application name.
    #[serde(deserialize_with = "string_like")]
    pub app: String,
    /// Deadline of one REST call.
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// REST calls in flight at once (the client may keep up to twice as many connections);
    /// kept under Asterisk's http.conf `sessionlimit`, beyond which it closes new ones.
    pub max_connections: usize,
    /// First reconnect delay of the events WebSocket; doubles up to `reconnect_max`.
    #[serde(deserialize_with = "duration")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    #[serde(deserialize_with = "duration")]
    pub reconnect_max: Duration,
    /// WebSocket ping interval; no answer within two intervals means the link is dead.
    #[serde(deserialize_with = "duration")]
    pub ping_interval: Duration,
    /// How often bridges and channels are compared with what the agent believes.
    #[serde(deserialize_with = "duration")]
    pub reconcile_interval: Duration,
    /// How long Asterisk may stay out of reach (no events WebSocket) before the agent gives
    /// back its conferences' claims, so their next callers are placed on a live node rather
    /// than sent to this Asterisk; zero: never.
    #[serde(deserialize_with = "duration")]
    pub release_after: Duration,
    /// Create bridges with `proxy_media` (media always flows through Asterisk).
    pub proxy_media: bool,
    /// Channel variable naming the conference when no app argument does.
    #[serde(deserialize_with = "string_like")]
    pub conference_variable: String,
    /// SIP header naming the conference when neither an argument nor the variable does.
    #[serde(deserialize_with = "string_like")]
    pub conference_header: String,
}

/// `[conference]`: the options every call gets unless a profile or a variable says otherwise.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConferenceDefaults {
    /// TwiML `muted`: the participant joins muted.
    pub muted: bool,
    /// TwiML `beep`: `true`, `false`, `onEnter` or `onExit`.
    pub beep: Beep,
    /// TwiML `startConferenceOnEnter`.
    pub start_conference_on_enter: bool,
    /// TwiML `endConferenceOnExit`.
    pub end_conference_on_exit: bool,
    /// TwiML `maxParticipants` (2–250 in Twilio; here 1–10000).
    pub max_participants: u32,
    /// TwiML `waitUrl`, as a music-on-hold class.
    #[serde(deserialize_with = "string_like")]
    pub wait_music: String,
    /// TwiML `record`: `do-not-record` or `record-from-start`.
    pub record: Record,
    /// TwiML `statusCallback`: URL for conference events; empty for none.
    #[serde(deserialize_with = "string_like")]
    pub status_callback: String,
    /// TwiML `statusCallbackEvent`: any of start, end, join, leave, mute, hold.
    pub status_callback_event: Vec<CallbackEvent>,
    /// Sound played to the bridge for a beep.
    #[serde(deserialize_with = "string_like")]
    pub beep_sound: String,
    /// Sound played to a caller refused because the conference is full; empty for none.
    #[serde(deserialize_with = "string_like")]
    pub full_sound: String,
    /// File format of conference recordings.
    #[serde(deserialize_with = "string_like")]
    pub recording_format: String,
    /// Twilio's start: a conference starts once two participants are in, one a starter; a
    /// starter alone waits with music.
    pub lone_starter_waits: bool,
}

/// `[profiles.NAME]`: any option of `[conference]` that differs from the defaults.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// See [`ConferenceDefaults::muted`].
    pub muted: Option<bool>,
    /// See [`ConferenceDefaults::beep`].
    pub beep: Option<Beep>,
    /// See [`ConferenceDefaults::start_conference_on_enter`].
    pub start_conference_on_enter: Option<bool>,
    /// See [`ConferenceDefaults::end_conference_on_exit`].
    pub end_conference_on_exit: Option<bool>,
    /// See [`ConferenceDefaults::max_participants`].
    pub max_participants: Option<u32>,
    /// See [`ConferenceDefaults::wait_music`].
    #[serde(deserialize_with = "opt_string")]
    pub wait_music: Option<String>,
    /// See [`ConferenceDefaults::record`].
    pub record: Option<Record>,
    /// See [`ConferenceDefaults::status_callback`].
    #[serde(deserialize_with = "opt_string")]
    pub status_callback: Option<String>,
    /// See [`ConferenceDefaults::status_callback_event`].
    pub status_callback_event: Option<Vec<CallbackEvent>>,
}

/// Largest `webhook.queue_size` (events queued per conference).
pub const MAX_QUEUE_SIZE: usize = 1_000_000;

/// Longest `webhook.shutdown_wait`: past it a stop would outlast any sane grace period.
const MAX_SHUTDOWN_WAIT: Duration = Duration::from_secs(600);
/// Longest `webhook.timeout`: a receiver slower than this is down, and the stop's wait for the
/// node's last bus messages (twice this) must stay within a pod's grace period.
const MAX_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest `webhook.retry_max` (and so `retry_initial`): an event held longer than this
/// between tries is stale to its receiver.
const MAX_WEBHOOK_RETRY: Duration = Duration::from_secs(3600);

/// `[webhook]`: how status callbacks are delivered.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Deadline of one POST.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Attempts per event before it is given up.
    pub max_attempts: u32,
    /// First retry delay; doubles up to `retry_max`.
    #[serde(deserialize_with = "duration")]
    pub retry_initial: Duration,
    /// Longest retry delay.
    #[serde(deserialize_with = "duration")]
    pub retry_max: Duration,
    /// Events queued per conference at most; past it new events are dropped and counted.
    pub queue_size: usize,
    /// How long a stopping agent waits for the callbacks still queued (the leave and end
    /// events of the conferences it ended) before it exits without them.
    #[serde(deserialize_with = "duration")]
    pub shutdown_wait: Duration,
    /// Signs each callback as Twilio does (`X-Twilio-Signature`, HMAC-SHA1 of the URL and the
    /// sorted form fields), with the auth token the receiving application validates with.
    pub auth_token: Option<Secret>,
    /// `AccountSid` sent in every callback (empty: none), for applications that check it.
    #[serde(deserialize_with = "string_like")]
    pub account_sid: String,
}

/// `[dialout]`: how the node calls out. Dial strings are ARI endpoints (`TECH/resource`);
/// an empty one turns that kind of target off (the command is answered `forbidden`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DialoutConfig {
    /// Dial string for E.164 numbers, e.g. `PJSIP/{number}@trunk`: `{number}` is the number
    /// as given (with its `+`), `{digits}` the same without the `+`.
    #[serde(deserialize_with = "string_like")]
    pub endpoint: String,
    /// Dial string for `sip:`/`sips:` URIs, e.g. `PJSIP/trunk/{uri}`: `{uri}` is the URI.
    #[serde(deserialize_with = "string_like")]
    pub sip_endpoint: String,
    /// Caller id presented when a dial-out names no `from`; empty for the endpoint's own.
    #[serde(deserialize_with = "string_like")]
    pub caller_id: String,
}

fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    string_like(d).map(Some)
}

/// The machine's host name, for default ids and addresses.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// `node.sip_uri` when it is not set: the host name, port 5060.
fn default_sip_uri(host: &str) -> String {
    format!("sip:{host}:5060")
}

/// Why `node.sip_uri`'s default from host name `host` cannot be used, if it cannot.
fn default_sip_uri_problem(host: &str) -> Option<String> {
    let uri = default_sip_uri(host);
    check_sip_uri(&uri).err().map(|why| {
        format!("is not set, and its default from the host name, `{uri}`, is not a SIP URI the controller's 302 Contact can carry ({why}); set node.sip_uri, e.g. sip:10.0.0.5:5060")
    })
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            id: None,
            sip_uri: None,
            control: None,
            zone: String::new(),
            capacity: 100,
            participant_capacity: 0,
            heartbeat_interval: Duration::from_secs(1),
            drain_deadline: Duration::from_secs(600),
            wrong_node: WrongNodePolicy::Redirect,
            on_ownership_lost: LostPolicy::Drain,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            api_token: None,
            header_timeout: confroute_shared::http_serve::DEFAULT_HEADER_TIMEOUT,
            max_connections: confroute_shared::http_serve::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl Default for AriConfig {
    fn default() -> Self {
        AriConfig {
            url: "http://127.0.0.1:8088".to_string(),
            username: "confroute".to_string(),
            password: Secret::default(),
            app: "confroute".to_string(),
            request_timeout: Duration::from_secs(2),
            // The HTTP client may keep up to twice this many connections open (idle ones, and
            // one opened for a call an idle one then served): 81 with the events WebSocket,
            // under http.conf's default `sessionlimit` (100), with room for other clients.
            max_connections: 40,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            ping_interval: Duration::from_secs(5),
            reconcile_interval: Duration::from_secs(60),
            release_after: Duration::from_secs(120),
            proxy_media: false,
            conference_variable: "CONFROUTE_CONFERENCE".to_string(),
            conference_header: "X-Conference".to_string(),
        }
    }
}

impl Default for ConferenceDefaults {
    fn default() -> Self {
        ConferenceDefaults {
            muted: false,
            beep: Beep::True,
            start_conference_on_enter: true,
            end_conference_on_exit: false,
            max_participants: 250,
            wait_music: "default".to_string(),
            record: Record::DoNotRecord,
            status_callback: String::new(),
            status_callback_event: vec![CallbackEvent::Start, CallbackEvent::End],
            beep_sound: "beep".to_string(),
            full_sound: String::new(),
            recording_format: "wav".to_string(),
            lone_starter_waits: false,
        }
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            timeout: Duration::from_secs(5),
            max_attempts: 5,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            queue_size: 1000,
            shutdown_wait: Duration::from_secs(15),
            auth_token: None,
            account_sid: String::new(),
        }
    }
}

impl NodeConfig {
    /// This node's id (the configured one, else the host name made into a valid id).
    pub fn node_id(&self) -> NodeId {
        if let Some(id) = &self.node.id {
            return id.clone();
        }
        let host: String = host_name()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .take(confroute_shared::types::MAX_NODE_ID_LEN)
            .collect();
        NodeId::parse(&host).unwrap_or_else(|_| NodeId::parse("node").expect("literal id"))
    }

    /// The SIP URI callers of this node's conferences are sent to.
    pub fn sip_uri(&self) -> String {
        self.node
            .sip_uri
            .clone()
            .unwrap_or_else(|| default_sip_uri(&host_name()))
    }

    /// The advertised control URL, given the bound HTTP address (a wildcard address is
    /// advertised as the host name, which others can reach).
    pub fn control_url(&self, bound: SocketAddr) -> String {
        self.node.control.clone().unwrap_or_else(|| {
            if bound.ip().is_unspecified() {
                format!("http://{}:{}", host_name(), bound.port())
            } else {
                format!("http://{bound}")
            }
        })
    }

    /// The ARI base URL without a trailing slash or `/ari`.
    pub fn ari_base(&self) -> String {
        let u = self.ari.url.trim_end_matches('/');
        u.strip_suffix("/ari").unwrap_or(u).to_string()
    }
}

fn http_url_ok(s: &str) -> bool {
    (s.starts_with("http://") || s.starts_with("https://"))
        && reqwest::Url::parse(s).is_ok_and(|u| u.host_str().is_some_and(|h| !h.is_empty()))
}

fn variable_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// Checks a profile's or the defaults' callback URL: by the rule a call's own
/// `CONFROUTE_STATUS_CALLBACK` meets, so the configuration cannot aim callbacks where no
/// call may (a link-local metadata address).
fn check_callback(issues: &mut Issues, key: &str, url: &str) {
    if url.is_empty() {
        return;
    }
    // The error names the URL without what may be a secret: a user part, a path, a query
    // (one that does not parse, without its user part and query).
    let shown = if reqwest::Url::parse(url).is_ok() {
        crate::webhook::redacted(url)
    } else {
        // Up to the first `/` after the scheme: a path may be a secret as much as a query.
        let full = redact_url(url);
        let start = full.find("://").map_or(0, |i| i + 3);
        match full[start..].find(['/', '?']) {
            Some(i) => format!("{}…", &full[..start + i]),
            None => full,
        }
    };
    if !http_url_ok(url) {
        issues.add(
            key,
            format!(
                "`{shown}` is not an http(s) URL; expected e.g. https://app.example.com/events"
            ),
        );
    } else if let Err(why) = crate::options::callback_ok(url) {
        issues.add(key, format!("`{shown}` is refused: {why}"));
    }
}

/// Checks a profile's or the defaults' music on hold class by the rule a call's own meets.
fn check_music(issues: &mut Issues, key: &str, class: &str) {
    if let Err(why) = crate::options::moh_class_ok(class) {
        issues.add(
            key,
            format!("{why}; expected a class of musiconhold.conf, e.g. default"),
        );
    }
}

/// Checks a node's SIP URI, which controllers copy into their 302's Contact as it is: a
/// host (an IPv6 one in brackets, RFC 3261 §25.1), an optional port, parameters; no URI
/// headers and nothing that would end the Contact's `<...>` early.
fn check_sip_uri(uri: &str) -> Result<(), &'static str> {
    let lower = uri.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("sip:")
        .or_else(|| lower.strip_prefix("sips:"))
        .ok_or("it must start with sip: or sips:")?;
    if rest.contains(|c: char| c.is_whitespace() || c.is_control() || "<>\",\\".contains(c)) {
        return Err("no blanks, control characters, <, >, \", , or \\");
    }
    if rest.contains('?') {
        return Err("no URI headers (?...)");
    }
    // The host the Contact names: after any user part, before any parameter.
    let hostport = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hostport = hostport.split(';').next().unwrap_or("");
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (v6, after) = bracketed
            .split_once(']')
            .ok_or("an IPv6 host's [ has no ]")?;
        if v6.is_empty()
            || !v6.contains(':')
            || !v6
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Err("the bracketed host is not an IPv6 address");
        }
        match after {
            "" => (v6, None),
            p => (
                v6,
                Some(
                    p.strip_prefix(':')
                        .ok_or("after ] comes :port or nothing")?,
                ),
            ),
        }
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err("no host");
    }
    if !hostport.starts_with('[')
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err("the host is not a name or IPv4 address (an IPv6 address goes in brackets)");
    }
    if let Some(p) = port {
        if !p.bytes().all(|b| b.is_ascii_digit()) || !matches!(p.parse::<u32>(), Ok(1..=65535)) {
            return Err("the port is not 1-65535");
        }
    }
    Ok(())
}

fn check_max(issues: &mut Issues, key: &str, n: u32) {
    if !(1..=10_000).contains(&n) {
        issues.add(key, "must be between 1 and 10000");
    }
}

impl Validate for NodeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let mut issues = Issues::default();
        issues.extend(self.redis.validate());
        issues.extend(self.log.validate());
        if let Some(uri) = &self.node.sip_uri {
            if let Err(why) = check_sip_uri(uri) {
                issues.add(
                    "node.sip_uri",
                    format!("`{uri}` is not a SIP URI the controller's 302 Contact can carry ({why}); expected e.g. sip:10.0.0.5:5060 or sip:[2001:db8::5]:5060"),
                );
            }
        } else if let Some(problem) = default_sip_uri_problem(&host_name()) {
            // Checked as a set one is: the controllers would otherwise send callers to a
            // Contact they cannot use, or refuse to route to the node.
            issues.add("node.sip_uri", problem);
        }
        if let Some(c) = &self.node.control {
            if !http_url_ok(c) {
                issues.add(
                    "node.control",
                    format!("`{c}` is not an http(s) URL; expected e.g. http://10.0.0.5:9090"),
                );
            }
        }
        if self.node.capacity == 0 {
            issues.add("node.capacity", "must be at least 1");
        }
        if self.node.heartbeat_interval < Duration::from_millis(100)
            || self.node.heartbeat_interval > Duration::from_secs(60)
        {
            issues.add("node.heartbeat_interval", "must be between 100ms and 60s");
        }
        // Only heartbeats renew conference claims: like the node lease, a claim's lease must
        // span three of them, or one late heartbeat lets a live conference's claim lapse and
        // a controller give it a second home.
        if self
            .node
            .heartbeat_interval
            .checked_mul(3)
            .is_none_or(|three| three > self.redis.conference_lease)
        {
            issues.add(
                "node.heartbeat_interval",
                format!(
                    "{:?} is more than a third of redis.conference_lease ({:?}); claims are renewed only by heartbeats, three per lease",
                    self.node.heartbeat_interval, self.redis.conference_lease
                ),
            );
        }
        if self.node.drain_deadline.is_zero() {
            issues.add("node.drain_deadline", "must be greater than zero");
        }
        if !self.ari.url.starts_with("http://")
            || reqwest::Url::parse(&self.ari.url).map_or(true, |u| u.host_str().is_none())
        {
            issues.add(
                "ari.url",
                format!(
                    "`{}` is not a plain http URL; expected e.g. http://127.0.0.1:8088 (the agent runs beside Asterisk; TLS to ARI is not supported)",
                    redact_url(&self.ari.url)
                ),
            );
        }
        if self.ari.username.is_empty() {
            issues.add("ari.username", "must not be empty");
        }
        // `.` and `..` are path segments URL parsers collapse: `/applications/../subscription`
        // would be another path.
        if self.ari.app.is_empty()
            || self.ari.app == "."
            || self.ari.app == ".."
            || !self
                .ari
                .app
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            issues.add(
                "ari.app",
                "must be a Stasis application name (letters, digits, '_', '-', '.'; not `.` or `..`)",
            );
        }
        for (key, d) in [
            ("ari.request_timeout", self.ari.request_timeout),
            ("ari.reconnect_min", self.ari.reconnect_min),
            ("ari.ping_interval", self.ari.ping_interval),
            ("ari.reconcile_interval", self.ari.reconcile_interval),
        ] {
            if d.is_zero() {
                issues.add(key, "must be greater than zero");
            }
        }
        // Upper bounds well past any use: the agent adds these to clock readings and
        // multiplies some, and a value near the type's limit (`300000000000y`) overflowed
        // there, at the worst moment (a drain's deadline at SIGTERM).
        const HOUR: Duration = Duration::from_secs(3600);
        const DAY: Duration = Duration::from_secs(24 * 3600);
        for (key, d, most, shown) in [
            (
                "node.drain_deadline",
                self.node.drain_deadline,
                7 * DAY,
                "7d",
            ),
            ("ari.request_timeout", self.ari.request_timeout, HOUR, "1h"),
            ("ari.reconnect_min", self.ari.reconnect_min, HOUR, "1h"),
            ("ari.reconnect_max", self.ari.reconnect_max, HOUR, "1h"),
            ("ari.ping_interval", self.ari.ping_interval, HOUR, "1h"),
            (
                "ari.reconcile_interval",
                self.ari.reconcile_interval,
                DAY,
                "24h",
            ),
            ("ari.release_after", self.ari.release_after, 7 * DAY, "7d"),
        ] {
            if d > most {
                issues.add(key, format!("must be at most {shown}"));
            }
        }
        if !self.ari.release_after.is_zero() && self.ari.release_after < Duration::from_secs(1) {
            issues.add("ari.release_after", "must be at least 1s, or 0s for never");
        }
        if !(1..=1000).contains(&self.ari.max_connections) {
            issues.add(
                "ari.max_connections",
                format!(
                    "{} is out of range; expected 1-1000, below http.conf's sessionlimit",
                    self.ari.max_connections
                ),
            );
        }
        if self.ari.reconnect_max < self.ari.reconnect_min {
            issues.add(
                "ari.reconnect_max",
                "must not be less than ari.reconnect_min",
            );
        }
        if !variable_ok(&self.ari.conference_variable) {
            issues.add(
                "ari.conference_variable",
                "must be a channel variable name (letters, digits, '_' and '-')",
            );
        }
        if !confroute_shared::config::header_name_ok(&self.ari.conference_header) {
            issues.add(
                "ari.conference_header",
                format!(
                    "must be a SIP header name ({})",
                    confroute_shared::config::HEADER_NAME_FORM
                ),
            );
        }
        if let Some(problem) = self
            .http
            .api_token
            .as_ref()
            .and_then(|t| confroute_shared::secret::api_token_problem(t.expose()))
        {
            issues.add("http.api_token", problem);
        }
        if !confroute_shared::http_serve::HEADER_TIMEOUT_RANGE.contains(&self.http.header_timeout) {
            issues.add("http.header_timeout", "must be between 1s and 1h");
        }
        if !confroute_shared::http_serve::MAX_CONNECTIONS_RANGE.contains(&self.http.max_connections)
        {
            issues.add("http.max_connections", "must be between 1 and 1000000");
        }
        let c = &self.conference;
        check_max(
            &mut issues,
            "conference.max_participants",
            c.max_participants,
        );
        check_callback(
            &mut issues,
            "conference.status_callback",
            &c.status_callback,
        );
        check_music(&mut issues, "conference.wait_music", &c.wait_music);
        if c.beep_sound.is_empty() {
            issues.add("conference.beep_sound", "must name a sound, e.g. beep");
        }
        if c.recording_format.is_empty() {
            issues.add(
                "conference.recording_format",
                "must name a format, e.g. wav",
            );
        }
        for (name, p) in &self.profiles {
            if !variable_ok(name) {
                issues.add(
                    format!("profiles.{name}"),
                    "profile names take letters, digits, '_' and '-'",
                );
            }
            if let Some(n) = p.max_participants {
                check_max(&mut issues, &format!("profiles.{name}.max_participants"), n);
            }
            if let Some(u) = &p.status_callback {
                check_callback(&mut issues, &format!("profiles.{name}.status_callback"), u);
            }
            if let Some(m) = &p.wait_music {
                check_music(&mut issues, &format!("profiles.{name}.wait_music"), m);
            }
        }
        crate::dialout::check_config(&self.dialout, &mut issues);
        if self.webhook.max_attempts == 0 {
            issues.add("webhook.max_attempts", "must be at least 1");
        }
        // Each queue holds whole callback forms: past a million per conference the node
        // runs out of memory long before, and the channel cannot be that large anyway.
        if !(1..=MAX_QUEUE_SIZE).contains(&self.webhook.queue_size) {
            issues.add("webhook.queue_size", "must be between 1 and 1000000");
        }
        if self.webhook.timeout.is_zero() || self.webhook.timeout > MAX_WEBHOOK_TIMEOUT {
            issues.add(
                "webhook.timeout",
                "must be greater than zero and at most 5m",
            );
        }
        if self.webhook.shutdown_wait.is_zero() || self.webhook.shutdown_wait > MAX_SHUTDOWN_WAIT {
            issues.add(
                "webhook.shutdown_wait",
                "must be greater than zero and at most 10m (a stopping pod's grace period must cover it)",
            );
        }
        if self
            .webhook
            .auth_token
            .as_ref()
            .is_some_and(Secret::is_empty)
        {
            issues.add(
                "webhook.auth_token",
                "must not be empty (leave it unset to send callbacks unsigned)",
            );
        }
        let sid = &self.webhook.account_sid;
        let sid_ok = sid.is_empty()
            || (sid.len() == 34
                && sid.starts_with("AC")
                && sid.bytes().skip(2).all(|b| b.is_ascii_hexdigit()));
        if !sid_ok {
            issues.add(
                "webhook.account_sid",
                "must be a Twilio account SID (AC and 32 hex digits) or empty",
            );
        }
        if self.webhook.retry_initial.is_zero() {
            issues.add("webhook.retry_initial", "must be greater than zero");
        }
        if self.webhook.retry_max < self.webhook.retry_initial {
            issues.add(
                "webhook.retry_max",
                "must not be less than webhook.retry_initial",
            );
        } else if self.webhook.retry_max > MAX_WEBHOOK_RETRY {
            issues.add("webhook.retry_max", "must be at most 1h");
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

    /// The default `node.sip_uri` (from the host name) is checked as a set one is: a host
    /// name the controller's Contact cannot carry is refused at start, not advertised.
    #[test]
    fn the_default_sip_uri_from_the_host_name_is_checked() {
        assert_eq!(default_sip_uri_problem("node-1.example"), None);
        assert_eq!(default_sip_uri_problem("10.0.0.5"), None);
        let problem = default_sip_uri_problem("my_host.example").expect("refused");
        assert!(problem.contains("sip:my_host.example:5060"), "{problem}");
        assert!(problem.contains("set node.sip_uri"), "{problem}");
    }

    #[test]
    fn defaults_are_valid() {
        let cfg: NodeConfig = load_from(None, &[]).expect("defaults");
        assert_eq!(cfg.node.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(cfg.ari.app, "confroute");
        assert_eq!(cfg.conference.beep, Beep::True);
        assert_eq!(cfg.ari_base(), "http://127.0.0.1:8088");
        let host = host_name();
        assert_eq!(
            cfg.control_url("0.0.0.0:9090".parse().expect("addr")),
            format!("http://{host}:9090")
        );
        assert_eq!(
            cfg.control_url("127.0.0.1:9091".parse().expect("addr")),
            "http://127.0.0.1:9091"
        );
    }

    #[test]
    fn a_claim_lease_of_three_heartbeats_is_enough() {
        let cfg: NodeConfig = load_from(
            None,
            &env(&[
                ("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "2s"),
                ("CONFROUTE_REDIS__CONFERENCE_LEASE", "6s"),
            ]),
        )
        .expect("three heartbeats per conference lease");
        assert_eq!(cfg.node.heartbeat_interval * 3, cfg.redis.conference_lease);
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("CONFROUTE_NODE__ID", "bad id", "node.id"),
            ("CONFROUTE_NODE__SIP_URI", "10.0.0.5", "node.sip_uri"),
            ("CONFROUTE_NODE__SIP_URI", "sip:user@", "node.sip_uri"),
            (
                "CONFROUTE_NODE__SIP_URI",
                "sip:;transport=tcp",
                "node.sip_uri",
            ),
            ("CONFROUTE_NODE__SIP_URI", "sip::5060", "node.sip_uri"),
            ("CONFROUTE_NODE__SIP_URI", "sip:[]:5060", "node.sip_uri"),
            ("CONFROUTE_NODE__CAPACITY", "0", "node.capacity"),
            (
                "CONFROUTE_NODE__PARTICIPANT_CAPACITY",
                "-1",
                "node.participant_capacity",
            ),
            (
                "CONFROUTE_NODE__PARTICIPANT_CAPACITY",
                "many",
                "node.participant_capacity",
            ),
            (
                "CONFROUTE_NODE__HEARTBEAT_INTERVAL",
                "soon",
                "node.heartbeat_interval",
            ),
            (
                "CONFROUTE_NODE__HEARTBEAT_INTERVAL",
                "21s",
                "node.heartbeat_interval",
            ),
            (
                "CONFROUTE_REDIS__CONFERENCE_LEASE",
                "2s",
                "node.heartbeat_interval",
            ),
            ("CONFROUTE_REDIS__TLS", "true", "redis.tls"),
            (
                "CONFROUTE_NODE__DRAIN_DEADLINE",
                "0s",
                "node.drain_deadline",
            ),
            ("CONFROUTE_NODE__WRONG_NODE", "bounce", "node.wrong_node"),
            ("CONFROUTE_ARI__URL", "ws://x", "ari.url"),
            ("CONFROUTE_ARI__APP", "bad app", "ari.app"),
            ("CONFROUTE_ARI__APP", "..", "ari.app"),
            ("CONFROUTE_ARI__APP", ".", "ari.app"),
            (
                "CONFROUTE_ARI__REQUEST_TIMEOUT",
                "0s",
                "ari.request_timeout",
            ),
            ("CONFROUTE_ARI__MAX_CONNECTIONS", "0", "ari.max_connections"),
            ("CONFROUTE_ARI__RELEASE_AFTER", "500ms", "ari.release_after"),
            (
                "CONFROUTE_ARI__MAX_CONNECTIONS",
                "5000",
                "ari.max_connections",
            ),
            ("CONFROUTE_CONFERENCE__BEEP", "loud", "conference.beep"),
            (
                "CONFROUTE_CONFERENCE__RECORD",
                "always",
                "conference.record",
            ),
            (
                "CONFROUTE_CONFERENCE__MAX_PARTICIPANTS",
                "0",
                "conference.max_participants",
            ),
            (
                "CONFROUTE_CONFERENCE__STATUS_CALLBACK",
                "ftp://x",
                "conference.status_callback",
            ),
            (
                "CONFROUTE_CONFERENCE__STATUS_CALLBACK_EVENT",
                "[\"speak\"]",
                "conference.status_callback_event",
            ),
            ("CONFROUTE_HTTP__API_TOKEN", "short", "http.api_token"),
            (
                "CONFROUTE_HTTP__MAX_CONNECTIONS",
                "0",
                "http.max_connections",
            ),
            (
                "CONFROUTE_HTTP__API_TOKEN",
                "abcdefghijklmnop\n",
                "http.api_token",
            ),
            (
                "CONFROUTE_HTTP__HEADER_TIMEOUT",
                "500ms",
                "http.header_timeout",
            ),
            (
                "CONFROUTE_HTTP__HEADER_TIMEOUT",
                "2h",
                "http.header_timeout",
            ),
            ("CONFROUTE_NODE__NOPE", "1", "node.nope"),
            (
                "CONFROUTE_PROFILES__VIP__MUTED",
                "maybe",
                "profiles.vip.muted",
            ),
            (
                "CONFROUTE_PROFILES__VIP__COLOUR",
                "red",
                "profiles.vip.colour",
            ),
            (
                "CONFROUTE_DIALOUT__ENDPOINT",
                "PJSIP/trunk",
                "dialout.endpoint",
            ),
            (
                "CONFROUTE_DIALOUT__ENDPOINT",
                "{number}@trunk",
                "dialout.endpoint",
            ),
            (
                "CONFROUTE_DIALOUT__ENDPOINT",
                "PJSIP/{numbr}@trunk",
                "dialout.endpoint",
            ),
            (
                "CONFROUTE_DIALOUT__SIP_ENDPOINT",
                "PJSIP/{number}",
                "dialout.sip_endpoint",
            ),
            (
                "CONFROUTE_DIALOUT__SIP_ENDPOINT",
                "PJSIP/trunk /{uri}",
                "dialout.sip_endpoint",
            ),
            (
                "CONFROUTE_DIALOUT__CALLER_ID",
                "x\u{7}y",
                "dialout.caller_id",
            ),
            ("CONFROUTE_DIALOUT__TRUNK", "x", "dialout.trunk"),
            // Refused for a call's own variables, so for the configuration too.
            (
                "CONFROUTE_CONFERENCE__STATUS_CALLBACK",
                "http://169.254.169.254/latest",
                "conference.status_callback",
            ),
            (
                "CONFROUTE_PROFILES__VIP__STATUS_CALLBACK",
                "http://[::ffff:169.254.169.254]/x",
                "profiles.vip.status_callback",
            ),
            (
                "CONFROUTE_CONFERENCE__STATUS_CALLBACK",
                "http://0.0.0.0/x",
                "conference.status_callback",
            ),
            (
                "CONFROUTE_CONFERENCE__WAIT_MUSIC",
                "",
                "conference.wait_music",
            ),
            (
                "CONFROUTE_PROFILES__VIP__WAIT_MUSIC",
                "jazz;x",
                "profiles.vip.wait_music",
            ),
            (
                "CONFROUTE_WEBHOOK__RETRY_INITIAL",
                "0s",
                "webhook.retry_initial",
            ),
            ("CONFROUTE_WEBHOOK__RETRY_MAX", "1ms", "webhook.retry_max"),
            ("CONFROUTE_WEBHOOK__RETRY_MAX", "2h", "webhook.retry_max"),
            ("CONFROUTE_WEBHOOK__TIMEOUT", "0s", "webhook.timeout"),
            (
                "CONFROUTE_WEBHOOK__TIMEOUT",
                "300000000000y",
                "webhook.timeout",
            ),
            (
                "CONFROUTE_WEBHOOK__SHUTDOWN_WAIT",
                "0s",
                "webhook.shutdown_wait",
            ),
            (
                "CONFROUTE_WEBHOOK__SHUTDOWN_WAIT",
                "11m",
                "webhook.shutdown_wait",
            ),
            ("CONFROUTE_WEBHOOK__QUEUE_SIZE", "0", "webhook.queue_size"),
            (
                "CONFROUTE_WEBHOOK__QUEUE_SIZE",
                "1000001",
                "webhook.queue_size",
            ),
            ("CONFROUTE_HTTP__LISTEN", "localhost:9090", "http.listen"),
            ("CONFROUTE_WEBHOOK__AUTH_TOKEN", "", "webhook.auth_token"),
            (
                "CONFROUTE_WEBHOOK__ACCOUNT_SID",
                "AC123",
                "webhook.account_sid",
            ),
            (
                "CONFROUTE_ARI__CONFERENCE_HEADER",
                "X,Conf",
                "ari.conference_header",
            ),
        ];
        for (var, value, key) in cases {
            let err = load_from::<NodeConfig>(None, &env(&[(var, value)])).expect_err(var);
            assert!(err.mentions(key), "{var}={value}: {err}");
        }
        // SIP URIs a 302's Contact could not carry as they are.
        for uri in [
            "sip:2001:db8::5:5060",
            "sip:2001:db8::5",
            "sip:[2001:db8::5",
            "sip:[node-5]:5060",
            "sip:[2001:db8::5]5060",
            "sip:10.0.0.5:0",
            "sip:10.0.0.5:70000",
            "sip:10.0.0.5:50a",
            "sip:node?X-A=a@b",
            "sip:node>",
            "sip:a,b",
            "sip:no_underscore.example",
            "http://10.0.0.5",
        ] {
            let err = load_from::<NodeConfig>(None, &env(&[("CONFROUTE_NODE__SIP_URI", uri)]))
                .expect_err(uri);
            assert!(err.mentions("node.sip_uri"), "{uri}: {err}");
        }
        // The chart's IPv6 form of the node's addresses loads.
        let cfg: NodeConfig = load_from(
            None,
            &env(&[
                ("CONFROUTE_NODE__SIP_URI", "sip:[fd00:10::5]:5060"),
                ("CONFROUTE_NODE__CONTROL", "http://[fd00:10::5]:9090"),
            ]),
        )
        .expect("bracketed IPv6 addresses");
        assert_eq!(cfg.node.sip_uri.as_deref(), Some("sip:[fd00:10::5]:5060"));
        for uri in [
            "sip:10.0.0.5",
            "sips:asterisk-0.voice.svc:5061;transport=tls",
            "sip:confroute@10.0.0.5:5060;transport=tcp",
            "sip:[2001:db8::5];transport=tcp",
            "sip:+15555550101;npdi@gw.example.com",
            "sip:[::ffff:10.0.0.5]:5060",
        ] {
            let cfg: NodeConfig = load_from(None, &env(&[("CONFROUTE_NODE__SIP_URI", uri)]))
                .unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!(cfg.node.sip_uri.as_deref(), Some(uri));
        }
        // A header name the controller takes, the node takes too.
        let cfg: NodeConfig = load_from(
            None,
            &env(&[("CONFROUTE_ARI__CONFERENCE_HEADER", "X-Conf.Name_1")]),
        )
        .expect("a dotted header name");
        assert_eq!(cfg.ari.conference_header, "X-Conf.Name_1");
    }

    #[test]
    fn the_sample_config_loads() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/node.toml");
        let cfg: NodeConfig = load_from(Some(std::path::Path::new(path)), &[])
            .unwrap_or_else(|e| panic!("examples/node.toml: {e}"));
        assert_eq!(cfg.node_id().as_str(), "node-5");
        assert_eq!(cfg.profiles["moderator"].beep, Some(Beep::OnEnter));
        assert_eq!(cfg.profiles["listener"].beep, Some(Beep::False));
    }

    #[test]
    fn profiles_and_twiml_spellings_load() {
        let cfg: NodeConfig = load_from(
            None,
            &env(&[
                ("CONFROUTE_PROFILES__MODERATOR__BEEP", "onExit"),
                (
                    "CONFROUTE_PROFILES__MODERATOR__END_CONFERENCE_ON_EXIT",
                    "true",
                ),
                ("CONFROUTE_PROFILES__LISTENER__MUTED", "true"),
                ("CONFROUTE_CONFERENCE__RECORD", "record-from-start"),
                (
                    "CONFROUTE_CONFERENCE__STATUS_CALLBACK_EVENT",
                    "[\"start\", \"end\", \"join\"]",
                ),
            ]),
        )
        .expect("profiles");
        assert_eq!(cfg.profiles["moderator"].beep, Some(Beep::OnExit));
        assert_eq!(cfg.profiles["listener"].muted, Some(true));
        assert_eq!(cfg.conference.record, Record::RecordFromStart);
        assert_eq!(cfg.conference.status_callback_event.len(), 3);
    }
}
