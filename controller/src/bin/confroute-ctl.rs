//! `confroute-ctl`: the operator's command line for a confroute cluster, talking to any
//! controller's HTTP API (and its JSON-RPC WebSocket to follow dial-outs and tail events).
//! Tables for people by default, `--json` for scripts.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// `print!` that ends the process when whoever reads the output has gone: quietly for a
/// closed pipe (`| head -1` on `events`), with the error for anything else (a full disk).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("confroute-ctl: cannot write the output: {e}");
            std::process::exit(1);
        }
    }};
}

/// `println!` through [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => {{
        out!("{}\n", format_args!($($arg)*));
    }};
}

/// Command line.
#[derive(Parser)]
#[command(
    name = "confroute-ctl",
    version,
    about = "Operate a confroute cluster through any controller",
    after_help = "Exit status: 0 done; 1 failed (refused, or the call did not go through); \
2 a mistake in the command line; 3 no such node, conference or participant; \
4 the API token is missing or wrong; 5 the controller, Redis or the node could not be \
reached or did not answer (the outcome may be unknown)."
)]
struct Cli {
    /// Controller HTTP base URL: scheme, host, port and an optional path prefix (a reverse
    /// proxy's), no query.
    #[arg(
        long,
        global = true,
        env = "CONFROUTE_CTL_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// API token (`http.api_token` of the controller).
    #[arg(
        long,
        global = true,
        env = "CONFROUTE_CTL_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for each answer (1-86400); give at least the controller's
    /// `rpc.command_timeout` when it is raised, or a slow command is reported unanswered.
    #[arg(
        long,
        global = true,
        env = "CONFROUTE_CTL_TIMEOUT",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Conference nodes.
    Nodes {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Live conferences.
    Conferences {
        #[command(subcommand)]
        cmd: ConfCmd,
    },
    /// Participants of a conference.
    Participants {
        #[command(subcommand)]
        cmd: PartCmd,
    },
    /// Where a conference goes (claims a node if it has none).
    Route {
        /// Conference name.
        conference: String,
    },
    /// Call a number or SIP URI into a conference.
    Dialout {
        /// Conference name.
        conference: String,
        /// E.164 number or SIP URI.
        to: String,
        /// Caller id to present.
        #[arg(long)]
        from: Option<String>,
        /// Seconds to ring (1-600; the controller's default is 30); `--timeout` is the wait
        /// for each answer.
        // Its own id: sharing `timeout` with the global flag, clap gave both one value, so a
        // callee rang as long as the wait, and a wait above 600 s made every dial-out invalid.
        #[arg(long = "ring-timeout", id = "ring_timeout", value_name = "SECONDS",
              value_parser = clap::value_parser!(u64).range(1..=600))]
        ring_timeout: Option<u64>,
        /// A participant option, `NAME=VALUE` (repeatable): `muted=true`, `beep=false`,
        /// `endConferenceOnExit=true`, `profile=sales`; docs/call-control.md lists them.
        #[arg(long = "option", short = 'o', value_name = "NAME=VALUE", value_parser = option_pair)]
        options: Vec<(String, String)>,
        /// Follow the call's status until it connects or fails.
        #[arg(long)]
        wait: bool,
    },
    /// Print the events of conferences as they happen (Ctrl-C to stop).
    Events {
        /// Conference names.
        #[arg(required = true)]
        conferences: Vec<String>,
        /// Give up (exit 5) when the controller sends nothing, not even the answer to a
        /// ping, for this many seconds.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
        idle_timeout: u64,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List nodes with a live lease.
    List,
    /// Show one node.
    Get {
        /// Node id.
        id: String,
    },
    /// Stop placing new conferences on a node.
    Drain {
        /// Node id.
        id: String,
    },
    /// Let a drained node take new conferences again.
    Undrain {
        /// Node id.
        id: String,
    },
}

#[derive(Subcommand)]
enum ConfCmd {
    /// List live conferences.
    List {
        /// Start after this name.
        #[arg(long)]
        after: Option<String>,
        /// Page size (1-1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
        /// Follow the pages to the end and print every conference.
        #[arg(long)]
        all: bool,
    },
    /// Show a conference and its owner.
    Get {
        /// Conference name.
        name: String,
    },
    /// End a conference: everyone is hung up.
    End {
        /// Conference name.
        name: String,
        /// End only this life of the conference (the epoch `conference get` shows); a
        /// conference living at another epoch is left alone.
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Play media to everyone in a conference.
    Play {
        /// Conference name.
        name: String,
        /// Media URI, e.g. `sound:conf-onlyperson`.
        media: String,
    },
}

#[derive(Subcommand)]
enum PartCmd {
    /// List participants.
    List {
        /// Conference name.
        conference: String,
    },
    /// Mute a participant.
    Mute {
        /// Conference name.
        conference: String,
        /// Participant id.
        participant: String,
    },
    /// Unmute a participant.
    Unmute {
        /// Conference name.
        conference: String,
        /// Participant id.
        participant: String,
    },
    /// Put a participant on hold (music on hold, out of the mix).
    Hold {
        /// Conference name.
        conference: String,
        /// Participant id.
        participant: String,
    },
    /// Take a participant off hold.
    Unhold {
        /// Conference name.
        conference: String,
        /// Participant id.
        participant: String,
    },
    /// Hang a participant up.
    Kick {
        /// Conference name.
        conference: String,
        /// Participant id.
        participant: String,
    },
    /// Send DTMF digits to a participant.
    Dtmf {
        /// Conference name.
        conference: String,
        /// Participant id.
        participant: String,
        /// Digits 0-9 * # A-D.
        digits: String,
    },
    /// Move a participant to another conference.
    Move {
        /// Conference name.
        conference: String,
        /// Participant id.
        participant: String,
        /// Target conference.
        to: String,
    },
    /// Play media to one participant.
    Play {
        /// Conference name.
        conference: String,
        /// Participant id.
        participant: String,
        /// Media URI, e.g. `sound:beep`.
        media: String,
    },
    /// Change a participant's options (at least one).
    Update {
        /// Conference name.
        conference: String,
        /// Participant id.
        participant: String,
        /// Whether the conference ends when this participant leaves.
        #[arg(long, value_name = "BOOL")]
        end_conference_on_exit: Option<bool>,
        /// Whether a beep plays when this participant leaves.
        #[arg(long, value_name = "BOOL")]
        beep_on_exit: Option<bool>,
    },
}

/// One `--option NAME=VALUE`; the controller checks the name and the value.
fn option_pair(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("`{arg}` is not NAME=VALUE")),
    }
}

/// A failed command: its message, and the exit status that tells a script its kind.
struct Failure(String, Exit);

/// Exit statuses besides 0 (success) and clap's 2 for a command line it cannot parse.
#[derive(Clone, Copy, Debug)]
enum Exit {
    /// The command failed: refused by the controller, or the call did not go through.
    Failed = 1,
    /// A mistake in the command line that clap cannot see (`--url`, the token, an id).
    Usage = 2,
    /// The node, conference or participant does not exist.
    NotFound = 3,
    /// The API token is missing or wrong.
    Denied = 4,
    /// The controller (or behind it Redis or the node) cannot be reached or did not answer.
    Unavailable = 5,
}

/// A failure of the generic kind.
fn failed(message: impl Into<String>) -> Failure {
    Failure(message.into(), Exit::Failed)
}

/// A command-line mistake.
fn usage(message: impl Into<String>) -> Failure {
    Failure(message.into(), Exit::Usage)
}

/// Nobody to answer: the controller, or Redis or the node behind it.
fn unavailable(message: impl Into<String>) -> Failure {
    Failure(message.into(), Exit::Unavailable)
}

/// The exit status for the controller's refusal with `status` and error `code` (none when
/// the body is not the controller's JSON error). Only the token makes 4 and only a missing
/// node, conference or participant 3: a node's `forbidden` (403) and a route the
/// controller does not have (`route_not_found`, a wrong `--url` path) are refusals, and so
/// is `no_capacity`, a definite answer with nothing done.
fn http_exit(status: reqwest::StatusCode, code: Option<&str>) -> Exit {
    match (status.as_u16(), code) {
        (_, Some("unauthorized")) | (401, _) => Exit::Denied,
        (_, Some("node_not_found" | "conference_not_found" | "participant_not_found")) => {
            Exit::NotFound
        }
        (_, Some("no_capacity" | "too_many_connections")) => Exit::Failed,
        (502..=504, _) => Exit::Unavailable,
        _ => Exit::Failed,
    }
}

/// Longest wait for the WebSocket to open.
const WS_CONNECT: Duration = Duration::from_secs(10);

/// How long `dialout --wait` waits past the ring time for the final status.
const DIALOUT_MARGIN: Duration = Duration::from_secs(30);

struct Api {
    /// `--timeout`, for messages.
    timeout_secs: u64,
    http: reqwest::Client,
    url: String,
    /// `url` as messages show it: without its password, if it has one.
    shown: String,
    token: Option<String>,
}

/// Checks `--url` and `--token` before any request: a mistake in either gets a message
/// naming it rather than a client library's.
fn api(
    http: reqwest::Client,
    url: &str,
    token: Option<String>,
    timeout_secs: u64,
) -> Result<Api, Failure> {
    // Whatever the URL's shape, user information (before the last '@' of the authority)
    // stays out of every message; an '@' in the path or query is not one.
    let start = url.find("://").map_or(0, |s| s + 3);
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let redacted = match url[start..end].rfind('@') {
        Some(at) => format!("{}***@{}", &url[..start], &url[start + at + 1..]),
        None => url.to_string(),
    };
    // Nor a query, which may hold one (`?token=`).
    let redacted = match redacted.split_once('?') {
        Some((base, _)) => format!("{base}?..."),
        None => redacted,
    };
    // Without one, `host:port` would parse as a URL whose scheme is the host.
    if !url.contains("://") {
        return Err(usage(format!(
            "bad --url {redacted}: give the scheme, http:// or https://"
        )));
    }
    let shown = match reqwest::Url::parse(url) {
        Ok(u) if !matches!(u.scheme(), "http" | "https") => {
            return Err(usage(format!(
                "bad --url {redacted}: the scheme must be http or https"
            )))
        }
        // Every request would carry it, and every route refuses a query.
        Ok(u) if u.query().is_some() => {
            return Err(usage(format!(
                "bad --url {redacted}: give the controller's base URL, with no query"
            )));
        }
        Ok(_) => redacted,
        Err(e) => return Err(usage(format!("bad --url {redacted}: {e}"))),
    };
    if let Some(t) = &token {
        if reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).is_err() {
            return Err(usage(
                "the token (--token or CONFROUTE_CTL_TOKEN) holds a character an HTTP header cannot carry, such as a line break",
            ));
        }
    }
    Ok(Api {
        timeout_secs,
        http,
        url: url.to_string(),
        shown,
        token,
    })
}

impl Api {
    /// Calls the API at the path made of `segments`, each percent-encoded as one segment:
    /// a name holding `?`, `#`, `/` or `%` reaches the API as itself (and is refused there)
    /// instead of turning into another path, such as a different conference.
    async fn call(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        self.call_with_query(method, segments, &[], body).await
    }

    /// `call` with query parameters, percent-encoded: a raw `+` in a query means a space.
    async fn call_with_query(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        // The URL parser would resolve these as path steps rather than send them, and it
        // drops tabs and line breaks, so `..` followed by one is such a step too.
        if let Some(bad) = segments
            .iter()
            .find(|s| matches!(**s, "" | "." | "..") || s.chars().any(char::is_control))
        {
            return Err(usage(format!(
                "{bad:?} is not a valid conference name, node id or participant id"
            )));
        }
        let bad_url = |e: String| usage(format!("bad --url {}: {e}", self.shown));
        let mut url = reqwest::Url::parse(&self.url).map_err(|e| bad_url(e.to_string()))?;
        url.path_segments_mut()
            .map_err(|()| bad_url("not an http(s) URL".into()))?
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut req = self.http.request(method, url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                Failure(
                    format!(
                        "{} did not answer within {} s (--timeout); the outcome is unknown",
                        self.shown, self.timeout_secs
                    ),
                    Exit::Unavailable,
                )
            } else {
                // reqwest's message repeats the URL, password and all.
                unavailable(format!(
                    "cannot reach {}: {}",
                    self.shown,
                    causes(&e.without_url())
                ))
            }
        })?;
        let status = resp.status();
        if status.is_redirection() {
            let to = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("elsewhere")
                .to_string();
            return Err(failed(format!(
                "{status}: {} redirects to {to}; give --url the address that serves the API",
                self.shown
            )));
        }
        // Cut off halfway, the answer leaves the outcome unknown.
        let text = resp
            .text()
            .await
            .map_err(|e| unavailable(format!("reading the answer: {e}")))?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        // A controller answers with a JSON object; a server that answers 200 to anything
        // (a wrong --url) did nothing that was asked.
        if status.is_success() && v.is_object() {
            Ok(v)
        } else if let (Some(code), Some(msg)) =
            (v["error"]["code"].as_str(), v["error"]["message"].as_str())
        {
            Err(Failure(
                format!("{status}: {code}: {msg}"),
                http_exit(status, Some(code)),
            ))
        } else {
            // Not a controller's error body: some other server (a wrong --url, a proxy).
            let body: String = match &v {
                Value::String(t) => t.chars().take(200).collect(),
                other => other.to_string().chars().take(200).collect(),
            };
            let exit = if status.is_server_error() {
                Exit::Unavailable
            } else {
                Exit::Failed
            };
            Err(Failure(format!(
                "{status} from {}, which does not answer like a confroute controller (is --url right?){}",
                self.shown,
                if body.trim().is_empty() {
                    String::new()
                } else {
                    format!(": {}", body.trim())
                }
            ), exit))
        }
    }

    async fn websocket(
        &self,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        Failure,
    > {
        // Parsed as the REST calls' URL is, so any spelling they accept (`HTTP://`, a path
        // prefix) reaches the same controller.
        let bad_url = |e: String| usage(format!("bad --url {}: {e}", self.shown));
        let mut url = reqwest::Url::parse(&self.url).map_err(|e| bad_url(e.to_string()))?;
        let scheme = match url.scheme() {
            "http" => "ws",
            "https" => "wss",
            other => return Err(bad_url(format!("{other}: not an http(s) URL"))),
        };
        url.set_scheme(scheme)
            .map_err(|()| bad_url("not an http(s) URL".into()))?;
        url.path_segments_mut()
            .map_err(|()| bad_url("not an http(s) URL".into()))?
            .pop_if_empty()
            .extend(["v1", "rpc"]);
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| bad_url(e.to_string()))?;
        if let Some(t) = &self.token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| usage("the token is not a valid header value"))?;
            req.headers_mut().insert("authorization", v);
        }
        let (ws, _) = tokio::time::timeout(WS_CONNECT, tokio_tungstenite::connect_async(req))
            .await
            .map_err(|_| unavailable(format!("cannot open the WebSocket within {WS_CONNECT:?}")))?
            .map_err(|e| match e {
                WsError::Http(resp) => {
                    // The controller's refusal carries its JSON error body, as any other.
                    let v: Value = resp
                        .body()
                        .as_deref()
                        .and_then(|b| serde_json::from_slice(b).ok())
                        .unwrap_or(Value::Null);
                    let code = v["error"]["code"].as_str();
                    let said = match (code, v["error"]["message"].as_str()) {
                        (Some(c), Some(m)) => format!(": {c}: {m}"),
                        _ => String::new(),
                    };
                    Failure(
                        format!("cannot open the WebSocket: {}{said}", resp.status()),
                        http_exit(resp.status(), code),
                    )
                }
                other => unavailable(format!("cannot open the WebSocket: {other}")),
            })?;
        Ok(ws)
    }
}

/// An error with its causes, `a: b: c` (reqwest's own message leaves out why).
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        text.push_str(": ");
        text.push_str(&c.to_string());
        next = c.source();
    }
    text
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A JSON-RPC error as the REST commands print theirs: the code's name first (as the
/// HTTP API spells it), then its number and the message.
fn rpc_failure(e: &Value) -> Failure {
    use confroute_controller::rpc::codes;
    let name = match e["code"].as_i64().unwrap_or(0) {
        codes::PARSE_ERROR => "invalid_json",
        codes::INVALID_REQUEST => "invalid_request",
        codes::METHOD_NOT_FOUND => "method_not_found",
        codes::INVALID_PARAMS => "invalid_params",
        codes::INTERNAL_ERROR => "internal",
        codes::CONFERENCE_NOT_FOUND => "conference_not_found",
        codes::PARTICIPANT_NOT_FOUND => "participant_not_found",
        codes::NODE_UNAVAILABLE => "node_unavailable",
        codes::INVALID_NUMBER => "invalid_number",
        codes::CONFERENCE_FULL => "conference_full",
        codes::FORBIDDEN => "forbidden",
        codes::TIMEOUT => "timeout",
        codes::RATE_LIMITED => "rate_limited",
        codes::TOO_MANY_SUBSCRIPTIONS => "too_many_subscriptions",
        codes::MESSAGE_TOO_LARGE => "message_too_large",
        codes::UNAVAILABLE => "unavailable",
        codes::NO_ANSWER => "no_answer",
        _ => "error",
    };
    let exit = match e["code"].as_i64().unwrap_or(0) {
        codes::CONFERENCE_NOT_FOUND | codes::PARTICIPANT_NOT_FOUND => Exit::NotFound,
        codes::NODE_UNAVAILABLE | codes::TIMEOUT | codes::UNAVAILABLE | codes::NO_ANSWER => {
            Exit::Unavailable
        }
        _ => Exit::Failed,
    };
    Failure(
        format!("{name} ({}): {}", s(&e["code"]), s(&e["message"])),
        exit,
    )
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_nodes(v: &Value) {
    let mut rows = vec![vec![
        "ID",
        "STATE",
        "ARI",
        "ZONE",
        "CONFS",
        "CLAIMED/CAP",
        "PARTICIPANTS",
        "CPU",
        "SIP URI",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>()];
    let items = v["items"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| vec![v.clone()]);
    for n in items {
        rows.push(vec![
            s(&n["id"]),
            // A drain for the agent's own shutdown ends in its exit; an admin's does not.
            if n["stopping"] == true {
                format!("{} (stopping)", s(&n["state"]))
            } else {
                s(&n["state"])
            },
            // A node whose agent lost its Asterisk gets no new conference, whatever its state.
            if n["ari"] == false { "down" } else { "up" }.into(),
            if n["zone"].as_str().unwrap_or("").is_empty() {
                "-".into()
            } else {
                s(&n["zone"])
            },
            s(&n["conferences"]),
            format!("{}/{}", s(&n["claimed"]), s(&n["capacity"])),
            // Participants against the node's limit on them, when it has one.
            match n["participant_capacity"].as_u64() {
                Some(most) if most > 0 => format!("{}/{most}", s(&n["participants"])),
                _ => s(&n["participants"]),
            },
            format!("{:.0}%", n["cpu"].as_f64().unwrap_or(0.0)),
            s(&n["sip_uri"]),
        ]);
    }
    out!("{}", table(&rows));
}

fn print_conferences(v: &Value) {
    let mut rows = vec![vec!["CONFERENCE", "NODE", "EPOCH", "PARTICIPANTS"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()];
    let items = v["items"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| vec![v.clone()]);
    for c in items {
        rows.push(vec![
            s(&c["conference"]),
            // One conference's answer says whether its owner still has a live lease.
            if c.get("node").is_some_and(Value::is_null) {
                format!("{} (no live node)", s(&c["node_id"]))
            } else {
                s(&c["node_id"])
            },
            s(&c["epoch"]),
            s(&c["participants"]),
        ]);
    }
    out!("{}", table(&rows));
    if let Some(next) = v["next"].as_str() {
        // On stderr: a script reading the table from stdout gets rows only.
        eprintln!("more: --after {next}");
    }
}

/// How long ago `ms` (since the epoch) was, as `1h2m`, `3m4s` or `5s`; the exact time is in
/// `--json`.
fn since(ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let secs = now.saturating_sub(ms) / 1000;
    match (secs / 3600, secs / 60 % 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

fn print_participants(v: &Value) {
    let mut rows = vec![vec!["PARTICIPANT", "CALLER", "MUTED", "HELD", "IN FOR"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()];
    let items = v["participants"].as_array().cloned().unwrap_or_default();
    for p in items {
        rows.push(vec![
            s(&p["id"]),
            s(&p["caller"]),
            s(&p["muted"]),
            s(&p["held"]),
            p["joined_ms"].as_u64().map_or_else(|| "-".into(), since),
        ]);
    }
    out!("{}", table(&rows));
}

async fn run(cli: Cli) -> Result<(), Failure> {
    // Redirects are not followed: across schemes the token would be dropped (an exit 4 for
    // a good token), and a 301 or 302 turns a POST into a GET; the answer names the target.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(cli.timeout))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| failed(format!("http client: {e}")))?;
    let api = api(http, &cli.url, cli.token.clone(), cli.timeout)?;
    let json_out = cli.json;
    let show = |v: &Value, human: fn(&Value)| {
        if json_out {
            outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            human(v);
        }
    };
    let done = |v: &Value, what: &str| {
        if json_out {
            outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            outln!("{what}");
        }
    };
    match cli.cmd {
        Cmd::Nodes { cmd } => match cmd {
            NodeCmd::List => show(
                &api.call(Method::GET, &["v1", "nodes"], None).await?,
                print_nodes,
            ),
            NodeCmd::Get { id } => show(
                &api.call(Method::GET, &["v1", "nodes", &id], None).await?,
                print_nodes,
            ),
            NodeCmd::Drain { id } => {
                let v = api
                    .call(Method::POST, &["v1", "nodes", &id, "drain"], None)
                    .await?;
                done(
                    &v,
                    &format!("{id}: {} -> {}", s(&v["previous"]), s(&v["state"])),
                );
            }
            NodeCmd::Undrain { id } => {
                let v = api
                    .call(Method::POST, &["v1", "nodes", &id, "undrain"], None)
                    .await?;
                done(
                    &v,
                    &format!("{id}: {} -> {}", s(&v["previous"]), s(&v["state"])),
                );
            }
        },
        Cmd::Conferences { cmd } => match cmd {
            ConfCmd::List {
                mut after,
                limit,
                all,
            } => {
                let limit = limit.to_string();
                let mut items = Vec::new();
                loop {
                    let mut query = vec![("limit", limit.as_str())];
                    if let Some(a) = &after {
                        query.push(("after", a));
                    }
                    let mut page = api
                        .call_with_query(Method::GET, &["v1", "conferences"], &query, None)
                        .await?;
                    if !all {
                        show(&page, print_conferences);
                        break;
                    }
                    if let Some(page_items) = page["items"].as_array_mut() {
                        items.append(page_items);
                    }
                    // The cursor is the last name of the page, so each page starts past the
                    // one before: a conference created meanwhile shows up once or not at all.
                    match page["next"].as_str() {
                        // Names are paged in byte order: a cursor that does not move on
                        // would fetch the same page for ever.
                        Some(next) if after.as_deref().is_some_and(|a| next <= a) => {
                            return Err(failed(format!(
                                "the controller's next page starts at {next:?}, not past {:?}",
                                after.unwrap_or_default()
                            )));
                        }
                        Some(next) => after = Some(next.to_string()),
                        None => {
                            show(&json!({"items": items, "next": null}), print_conferences);
                            break;
                        }
                    }
                }
            }
            ConfCmd::Get { name } => show(
                &api.call(Method::GET, &["v1", "conferences", &name], None)
                    .await?,
                print_conferences,
            ),
            ConfCmd::End { name, epoch } => {
                let epoch = epoch.map(|e| e.to_string());
                let query: Vec<(&str, &str)> =
                    epoch.iter().map(|e| ("epoch", e.as_str())).collect();
                let v = api
                    .call_with_query(Method::DELETE, &["v1", "conferences", &name], &query, None)
                    .await?;
                done(&v, &format!("{name}: ended"));
            }
            ConfCmd::Play { name, media } => {
                let v = api
                    .call(
                        Method::POST,
                        &["v1", "conferences", &name, "play"],
                        Some(json!({"media": media})),
                    )
                    .await?;
                done(&v, &format!("{name}: playing {media}"));
            }
        },
        Cmd::Participants { cmd } => {
            // (method, conference, participant, action after the participant, body, done)
            let (method, conference, participant, action, body, what) = match cmd {
                PartCmd::List { conference } => {
                    let v = api
                        .call(
                            Method::GET,
                            &["v1", "conferences", &conference, "participants"],
                            None,
                        )
                        .await?;
                    show(&v, print_participants);
                    return Ok(());
                }
                PartCmd::Mute {
                    conference,
                    participant,
                } => (
                    Method::POST,
                    conference,
                    participant,
                    Some("mute"),
                    None,
                    "muted",
                ),
                PartCmd::Unmute {
                    conference,
                    participant,
                } => (
                    Method::POST,
                    conference,
                    participant,
                    Some("unmute"),
                    None,
                    "unmuted",
                ),
                PartCmd::Hold {
                    conference,
                    participant,
                } => (
                    Method::POST,
                    conference,
                    participant,
                    Some("hold"),
                    None,
                    "on hold",
                ),
                PartCmd::Unhold {
                    conference,
                    participant,
                } => (
                    Method::POST,
                    conference,
                    participant,
                    Some("unhold"),
                    None,
                    // A hold from the caller's own phone lasts until the caller resumes.
                    "call control's hold lifted",
                ),
                PartCmd::Kick {
                    conference,
                    participant,
                } => (
                    Method::DELETE,
                    conference,
                    participant,
                    None,
                    None,
                    "kicked",
                ),
                PartCmd::Dtmf {
                    conference,
                    participant,
                    digits,
                } => (
                    Method::POST,
                    conference,
                    participant,
                    Some("dtmf"),
                    Some(json!({"digits": digits})),
                    "digits sent",
                ),
                PartCmd::Play {
                    conference,
                    participant,
                    media,
                } => (
                    Method::POST,
                    conference,
                    participant,
                    Some("play"),
                    Some(json!({"media": media})),
                    "playing",
                ),
                PartCmd::Update {
                    conference,
                    participant,
                    end_conference_on_exit,
                    beep_on_exit,
                } => {
                    let mut body = serde_json::Map::new();
                    if let Some(v) = end_conference_on_exit {
                        body.insert("endConferenceOnExit".into(), json!(v));
                    }
                    if let Some(v) = beep_on_exit {
                        body.insert("beepOnExit".into(), json!(v));
                    }
                    if body.is_empty() {
                        return Err(usage(
                            "update needs --end-conference-on-exit or --beep-on-exit",
                        ));
                    }
                    (
                        Method::PATCH,
                        conference,
                        participant,
                        None,
                        Some(Value::Object(body)),
                        "updated",
                    )
                }
                PartCmd::Move {
                    conference,
                    participant,
                    to,
                } => (
                    Method::POST,
                    conference,
                    participant,
                    Some("move"),
                    Some(json!({"to": to})),
                    "moved",
                ),
            };
            let mut path = vec![
                "v1",
                "conferences",
                &conference,
                "participants",
                &participant,
            ];
            path.extend(action);
            let v = api.call(method, &path, body).await?;
            let what = match v["moved"].as_str() {
                Some("redirect") => format!(
                    "moved: redirected to node {} ({})",
                    s(&v["node"]),
                    s(&v["endpoint"])
                ),
                Some(_) => format!("moved within node {} (bridge to bridge)", s(&v["node"])),
                None => what.to_string(),
            };
            done(&v, &what);
        }
        Cmd::Route { conference } => {
            let v = api
                .call(
                    Method::POST,
                    &["v1", "route"],
                    Some(json!({"conference": conference})),
                )
                .await?;
            done(
                &v,
                &format!(
                    "{conference} -> {} ({}) epoch {}{}",
                    s(&v["node_id"]),
                    s(&v["sip_uri"]),
                    s(&v["epoch"]),
                    if v["created"] == true { ", new" } else { "" }
                ),
            );
        }
        Cmd::Dialout {
            conference,
            to,
            from,
            ring_timeout,
            options,
            wait,
        } => {
            let mut params = json!({"conference": conference, "to": to});
            if let Some(f) = from {
                params["from"] = json!(f);
            }
            if let Some(t) = ring_timeout {
                params["timeout"] = json!(t);
            }
            if !options.is_empty() {
                let mut map = serde_json::Map::new();
                for (name, value) in options {
                    if map.contains_key(&name) {
                        return Err(usage(format!("--option {name} is given twice")));
                    }
                    map.insert(name, Value::String(value));
                }
                params["options"] = Value::Object(map);
            }
            if !wait {
                let mut body = params.clone();
                if let Some(m) = body.as_object_mut() {
                    m.remove("conference");
                }
                let v = api
                    .call(
                        Method::POST,
                        &["v1", "conferences", &conference, "participants"],
                        Some(body),
                    )
                    .await?;
                done(&v, &format!("calling {to}: callid {}", s(&v["callid"])));
                return Ok(());
            }
            let mut ws = api.websocket().await?;
            let req = json!({"jsonrpc": "2.0", "method": "dialout", "params": params, "id": 1});
            ws.send(Message::Text(req.to_string().into()))
                .await
                .map_err(|e| unavailable(format!("send: {e}")))?;
            // A node that dies while the call rings never sends the last status: give up
            // once the ring time and a margin have passed.
            let ring = Duration::from_secs(ring_timeout.unwrap_or(30));
            let deadline = tokio::time::Instant::now() + ring + DIALOUT_MARGIN;
            loop {
                let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
                    Ok(Some(msg)) => msg,
                    Ok(None) => break,
                    // The node may have died mid-ring, or the call may still connect.
                    Err(_) => {
                        return Err(unavailable(format!(
                            "no final status within {:?} (the ring time and {DIALOUT_MARGIN:?}): outcome unknown",
                            ring + DIALOUT_MARGIN
                        )))
                    }
                };
                let Ok(Message::Text(t)) = msg else { continue };
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                if json_out {
                    outln!("{v}");
                }
                if v["id"] == json!(1) {
                    if let Some(e) = v.get("error") {
                        return Err(rpc_failure(e));
                    }
                    if !json_out {
                        outln!("callid {}", s(&v["result"]["callid"]));
                    }
                } else if v["method"] == "dialout.status" {
                    let p = &v["params"];
                    let status = p["status"].as_str().unwrap_or("");
                    if !json_out {
                        let extra = match (p.get("code"), p.get("cause")) {
                            (Some(c), Some(q)) => format!(" (SIP {} / cause {})", s(c), s(q)),
                            (None, Some(q)) => format!(" (cause {})", s(q)),
                            _ => String::new(),
                        };
                        outln!("{status}{extra}");
                    }
                    match status {
                        "connected" | "cleared" => return Ok(()),
                        "rejected" => return Err(failed("the call was rejected")),
                        "unknown" => {
                            return Err(unavailable(format!(
                                "the node placing the call is gone ({}); its outcome is unknown",
                                s(&p["reason"])
                            )))
                        }
                        _ => {}
                    }
                }
            }
            return Err(unavailable(
                "the connection closed before the call finished",
            ));
        }
        Cmd::Events {
            conferences,
            idle_timeout,
        } => {
            let mut ws = api.websocket().await?;
            let subscribe = |i: usize, c: &str| {
                let req = json!({"jsonrpc": "2.0", "method": "subscribe", "params": {"conference": c}, "id": i});
                Message::Text(req.to_string().into())
            };
            for (i, c) in conferences.iter().enumerate() {
                ws.send(subscribe(i, c))
                    .await
                    .map_err(|e| unavailable(format!("send: {e}")))?;
                // Subscribing to a conference nobody is in succeeds: a look at it tells the
                // user why nothing comes.
                let look = json!({"jsonrpc": "2.0", "method": "conference.get", "params": {"conference": c}, "id": format!("look-{i}")});
                ws.send(Message::Text(look.to_string().into()))
                    .await
                    .map_err(|e| unavailable(format!("send: {e}")))?;
            }
            // A quiet conference sends nothing for hours: pings tell a live controller from
            // one that stopped answering (frozen, or cut off without a close).
            let idle = Duration::from_secs(idle_timeout);
            let mut ping = tokio::time::interval(idle / 3);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut heard = tokio::time::Instant::now();
            loop {
                let msg = tokio::select! {
                    msg = ws.next() => msg,
                    _ = ping.tick() => {
                        if heard.elapsed() >= idle {
                            return Err(unavailable(format!(
                                "the controller sent nothing for {idle:?}, not even a pong; giving up"
                            )));
                        }
                        ws.send(Message::Ping(Vec::new().into()))
                            .await
                            .map_err(|e| unavailable(format!("send: {e}")))?;
                        continue;
                    }
                };
                let Some(msg) = msg else { break };
                heard = tokio::time::Instant::now();
                let Ok(Message::Text(t)) = msg else { continue };
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                let look = v["id"]
                    .as_str()
                    .and_then(|id| id.strip_prefix("look-"))
                    .and_then(|i| i.parse::<usize>().ok())
                    .and_then(|i| conferences.get(i));
                if let Some(c) = look {
                    if v["error"]["code"] == -32001 {
                        eprintln!("({c} is not live on any node now: no home, or no caller has reached its node yet; its events start when a caller or a dial-out brings it there)");
                    }
                    continue;
                }
                if let Some(e) = v.get("error") {
                    // Many conferences at once pass the connection's rate (rpc.rate_limit,
                    // burst rpc.burst): a subscription refused for it is asked again.
                    let retry = v["id"].as_u64().and_then(|i| {
                        let i = usize::try_from(i).ok()?;
                        conferences.get(i).map(|c| (i, c))
                    });
                    if let (Some((i, c)), true) = (retry, e["code"] == -32008) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        ws.send(subscribe(i, c))
                            .await
                            .map_err(|e| unavailable(format!("send: {e}")))?;
                        continue;
                    }
                    return Err(rpc_failure(e));
                }
                if v["method"] == "event" {
                    if json_out {
                        outln!("{}", v["params"]);
                    } else {
                        let p = &v["params"];
                        outln!(
                            "{} {} #{} {} {}",
                            s(&p["conference"]),
                            s(&p["node"]),
                            s(&p["seq"]),
                            s(&p["event"]),
                            p["data"]
                        );
                    }
                } else if v["method"] == "events.lost" {
                    eprintln!("({} events lost)", s(&v["params"]["count"]));
                }
            }
            // Only Ctrl-C is a normal end; a script must see the controller going away.
            return Err(unavailable("the controller closed the connection"));
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(m, exit)) => {
            eprintln!("confroute-ctl: {m}");
            ExitCode::from(exit as u8)
        }
    }
}
