//! ARI REST calls over reqwest: Basic auth and a deadline on every call, status codes mapped
//! to what they mean for the caller (`resource_*.c` in Asterisk uses 404 for an unknown
//! resource, 409 for a conflict or a channel not in Stasis, 412 for a channel in the wrong
//! state, 422 for a channel or bridge that cannot take the operation).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use serde::de::DeserializeOwned;

use confroute_shared::secret::Secret;

use super::events::{Bridge, Channel};
use crate::metrics::Metrics;

/// Channels named in one `addChannel` at most: well under Asterisk's 128 values (fewer when
/// their ids would not fit in one request line).
const ADD_CHANNELS_AT_ONCE: usize = 64;

/// Longest request line Asterisk reads whole (main/http.c reads it with `fgets` into 4,096
/// bytes, CRLF included): past it the URI is cut and the request carried out as cut (a
/// DTMF string, a sound list or a channel list shortened without a word).
const MAX_REQUEST_LINE: usize = 4095;

/// Longest JSON body Asterisk reads (main/http.c's `MAX_CONTENT_LENGTH`; 413 past it).
const MAX_BODY: usize = 4096;

/// Length of the request line (`METHOD SP path?query SP HTTP/1.1 CRLF`) for `url`.
fn request_line_len(method: &str, url: &str) -> usize {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let target = url[after_scheme..]
        .find('/')
        .map_or("/", |i| &url[after_scheme + i..]);
    method.len() + 1 + target.len() + " HTTP/1.1\r\n".len()
}

/// What kind of failure an ARI call had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AriErrorKind {
    /// No answer within `ari.request_timeout`.
    Timeout,
    /// The connection failed (Asterisk down or restarting).
    Transport,
    /// 400: a parameter was wrong.
    BadRequest,
    /// 401/403: the ARI credentials are wrong.
    Unauthorized,
    /// 404: the channel, bridge, playback or recording does not exist (any more).
    NotFound,
    /// 409: it exists already, or the channel is not in Stasis.
    Conflict,
    /// 412: the channel is in a state that does not allow the operation.
    InvalidState,
    /// 422: the operation cannot be done on that resource (e.g. not in Stasis).
    Unprocessable,
    /// 5xx from Asterisk.
    Server,
    /// Any other status code.
    Unexpected,
    /// A 2xx body that is not what the operation returns.
    Decode,
    /// Not sent: its request line or body is longer than Asterisk reads (or 413 from it).
    TooLong,
}

impl AriErrorKind {
    /// Whether asking again may get another answer: the request timed out, was lost with its
    /// connection, or Asterisk failed inside; not a request Asterisk refused as asked.
    pub fn transient(self) -> bool {
        matches!(
            self,
            AriErrorKind::Timeout | AriErrorKind::Transport | AriErrorKind::Server
        )
    }

    fn from_status(status: u16) -> AriErrorKind {
        match status {
            400 => AriErrorKind::BadRequest,
            401 | 403 => AriErrorKind::Unauthorized,
            404 => AriErrorKind::NotFound,
            409 => AriErrorKind::Conflict,
            413 => AriErrorKind::TooLong,
            412 => AriErrorKind::InvalidState,
            422 => AriErrorKind::Unprocessable,
            500..=599 => AriErrorKind::Server,
            _ => AriErrorKind::Unexpected,
        }
    }
}

/// An ARI call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct AriError {
    /// The operation, e.g. `addChannel`.
    pub op: &'static str,
    /// What kind of failure.
    pub kind: AriErrorKind,
    /// HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// Asterisk's message or the transport error.
    pub message: String,
}

impl fmt::Display for AriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "ARI {}: {} {}", self.op, s, self.message),
            None => write!(f, "ARI {}: {:?}: {}", self.op, self.kind, self.message),
        }
    }
}

impl AriError {
    /// True when the failure means the caller's channel is gone or left Stasis: a channel
    /// operation's 404 (`Channel not found`) or 409 (`Channel not in Stasis application`), or
    /// `addChannel`'s 400 `Channel not found` and 422 (`find_channel_control` in
    /// resource_bridges.c answers those where channel operations answer 404/409).
    pub fn channel_gone(&self) -> bool {
        match (self.op, self.kind) {
            ("addChannel", AriErrorKind::BadRequest) => self.message.contains("Channel not found"),
            ("addChannel", AriErrorKind::Unprocessable) => true,
            ("addChannel", _) => false,
            (_, AriErrorKind::NotFound | AriErrorKind::Conflict) => true,
            _ => false,
        }
    }
}

/// Percent-encodes one path segment or query value; Asterisk's HTTP server decodes `+` as a
/// space (`ast_uri_decode` with the legacy HTTP rules), so `+` must be escaped.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Typed REST side of ARI; cheap to clone.
#[derive(Clone)]
pub struct AriClient {
    http: reqwest::Client,
    base: String,
    username: String,
    password: Secret,
    timeout: Duration,
    metrics: Metrics,
    /// One permit per request in flight (`ari.max_connections`): each takes a connection of
    /// Asterisk's HTTP server, which closes those beyond http.conf's `sessionlimit` unanswered.
    /// The pool may hold up to as many idle ones again (hyper opens a connection for a request
    /// that an idle one then serves, and keeps both).
    slots: Arc<Semaphore>,
    max_connections: usize,
    /// When Asterisk last refused this user (401 or 403), while no request sent after that
    /// has been let through (see [`AriClient::writes_refused`]).
    refused: Arc<std::sync::Mutex<Option<Instant>>>,
}

/// The bridge id the write check deletes: no bridge of the agent's is ever named so, so an
/// Asterisk that lets the user write answers 404 and nothing changes.
const WRITE_CHECK_BRIDGE: &str = "confroute-write-check";

/// HTTP method of a call.
#[derive(Clone, Copy)]
enum Method {
    Get,
    Post,
    Delete,
}

impl AriClient {
    /// A client for the Asterisk at `base` (`http://host:port`, ARI under `/ari`), with at
    /// most `max_connections` requests (so connections) open at once.
    pub fn new(
        base: &str,
        username: &str,
        password: Secret,
        timeout: Duration,
        max_connections: usize,
        metrics: Metrics,
    ) -> Result<AriClient, String> {
        let max_connections = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(max_connections)
            // Under Asterisk's own keep-alive (http.conf `session_keep_alive`, 15 s by
            // default), so the agent never sends a request on a connection Asterisk is
            // closing as idle: that request would fail without reaching it.
            .pool_idle_timeout(Duration::from_secs(10))
            // ARI answers itself; a redirect (a proxy, http.conf's `redirect`) would turn a
            // POST or DELETE into a GET whose 404 reads as "channel gone".
            .redirect(reqwest::redirect::Policy::none())
            // Proxy variables set for the host's egress must not carry requests (and their
            // credentials) to the local Asterisk, whose events WebSocket goes direct anyway.
            .no_proxy()
            .build()
            .map_err(|e| format!("building the ARI HTTP client: {e}"))?;
        Ok(AriClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            username: username.to_string(),
            password,
            timeout,
            metrics,
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            refused: Arc::new(std::sync::Mutex::new(None)),
        })
    }

    /// Asterisk refused the last write (or any request) of this user with 401 or 403, and
    /// none has been let through since: a wrong password, or a user ari.conf makes
    /// `read_only`, whose reads and events still work. Such a node can admit nobody.
    pub fn writes_refused(&self) -> bool {
        self.refusal().is_some()
    }

    fn refusal(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a refusal (401 or 403); true when it is the first since writes went through.
    fn refuse(&self) -> bool {
        let mut refused = self.refusal();
        self.metrics.ari_writes_refused.set(1);
        refused.replace(Instant::now()).is_none()
    }

    /// Whether Asterisk lets this user write, without changing anything: deletes a bridge
    /// that does not exist (404 when writes are allowed; res_ari.c refuses a read-only
    /// user's with 403 before it looks for the bridge). Updates [`Self::writes_refused`].
    pub async fn check_writes(&self) -> Result<bool, AriError> {
        let path = format!("/bridges/{WRITE_CHECK_BRIDGE}");
        let started = Instant::now();
        match self.call("writeCheck", Method::Delete, &path, &[]).await {
            Err(e) if e.kind == AriErrorKind::Unauthorized => Ok(false),
            // Any other answer of Asterisk's got past res_ari.c's user checks, which come
            // before routing; a 5xx may be a proxy's, or Asterisk still booting: no answer.
            Ok(_) => Ok(self.allowed(started)),
            Err(e) if e.status.is_some_and(|s| s < 500) => Ok(self.allowed(started)),
            Err(e) => Err(e),
        }
    }

    /// Records that a request sent at `started` was let through; whether writes are allowed
    /// now. A refusal that came after the request was sent (ari.conf reloaded meanwhile)
    /// stands.
    fn allowed(&self, started: Instant) -> bool {
        let mut refused = self.refusal();
        match *refused {
            Some(at) if at > started => false,
            Some(_) => {
                *refused = None;
                self.metrics.ari_writes_refused.set(0);
                tracing::info!("Asterisk accepts the agent's ARI writes again");
                true
            }
            None => true,
        }
    }

    /// `ws://host:port/ari/events?app=APP` for the events WebSocket.
    pub fn events_url(&self, app: &str) -> String {
        let ws = if let Some(rest) = self.base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = self.base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            self.base.clone()
        };
        format!("{ws}/ari/events?app={}", encode(app))
    }

    /// The `Authorization` header value for the WebSocket handshake.
    pub fn basic_auth(&self) -> String {
        use base64::Engine as _;
        let raw = format!("{}:{}", self.username, self.password.expose());
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// One call: `path` relative to `/ari` with already encoded segments.
    async fn call(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Vec<u8>, AriError> {
        self.call_with_body(op, method, path, query, None).await
    }

    /// [`Self::call`] with a JSON body, for the operations whose Swagger has a `body`
    /// parameter (`variables`).
    async fn call_with_body(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<Vec<u8>, AriError> {
        let mut url = format!("{}/ari{path}", self.base);
        for (i, (k, v)) in query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(k);
            url.push('=');
            url.push_str(&encode(v));
        }
        let verb = match method {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        };
        // Refused here, not sent to be cut short or refused there: nothing is done.
        let line = request_line_len(verb, &url);
        let body_len = body.map_or(0, |b| b.to_string().len());
        if line > MAX_REQUEST_LINE || body_len > MAX_BODY {
            let message = if line > MAX_REQUEST_LINE {
                format!("request line of {line} bytes is longer than Asterisk reads whole ({MAX_REQUEST_LINE}); not sent")
            } else {
                format!(
                    "body of {body_len} bytes is longer than Asterisk reads ({MAX_BODY}); not sent"
                )
            };
            return Err(AriError {
                op,
                kind: AriErrorKind::TooLong,
                status: None,
                message,
            });
        }
        let req = match method {
            Method::Get => self.http.get(&url),
            Method::Post => self.http.post(&url),
            Method::Delete => self.http.delete(&url),
        }
        .basic_auth(&self.username, Some(self.password.expose()));
        let req = match body {
            Some(b) => req.json(b),
            None => req,
        };
        let started = Instant::now();
        let result = async {
            // The wait for a free connection counts against the request's deadline. A ping
            // takes none: it asks whether Asterisk answers at all, which calls waiting on a
            // busy one must not make look like silence.
            let _slot = if op == "ping" {
                None
            } else {
                match tokio::time::timeout(self.timeout, self.slots.acquire()).await {
                    Ok(Ok(permit)) => Some(permit),
                    _ => {
                        return Err(AriError {
                            op,
                            kind: AriErrorKind::Timeout,
                            status: None,
                            message: format!(
                            "no free connection within {:?} (all {} of ari.max_connections in use)",
                            self.timeout, self.max_connections
                        ),
                        })
                    }
                }
            };
            let req = req.timeout(self.timeout.saturating_sub(started.elapsed()));
            let resp = req.send().await.map_err(|e| self.transport(op, e))?;
            let status = resp.status().as_u16();
            let body = resp.bytes().await.map_err(|e| self.transport(op, e))?;
            if (200..300).contains(&status) {
                Ok(body.to_vec())
            } else {
                Err(AriError {
                    op,
                    kind: AriErrorKind::from_status(status),
                    status: Some(status),
                    message: error_message(&body),
                })
            }
        }
        .await;
        let label = match &result {
            Ok(_) => "2xx".to_string(),
            Err(e) => match (e.status, e.kind) {
                (Some(s), _) => s.to_string(),
                (None, AriErrorKind::Timeout) => "timeout".to_string(),
                (None, _) => "transport".to_string(),
            },
        };
        self.metrics
            .ari_requests
            .with_label_values(&[op, &label])
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Err(e) => {
                // The first refusal of a run of them is logged, as an error: it needs a fix.
                let refused = e.kind == AriErrorKind::Unauthorized;
                if refused && self.refuse() {
                    tracing::error!(error = %e, user = %self.username, "Asterisk refuses the agent's ARI requests: check ari.username and ari.password, and that ari.conf does not make the user read_only; the node takes no new conference until a write goes through");
                } else if matches!(e.kind, AriErrorKind::Unexpected | AriErrorKind::Server)
                    && !unreadable_function(e)
                {
                    tracing::warn!(error = %e, "unexpected ARI answer");
                }
            }
            Ok(_) => {
                if !matches!(method, Method::Get) {
                    self.allowed(started);
                }
            }
        }
        result
    }

    fn transport(&self, op: &'static str, e: reqwest::Error) -> AriError {
        if e.is_timeout() {
            AriError {
                op,
                kind: AriErrorKind::Timeout,
                status: None,
                message: format!("no answer within {:?}", self.timeout),
            }
        } else {
            AriError {
                op,
                kind: AriErrorKind::Transport,
                status: None,
                message: e.to_string(),
            }
        }
    }

    async fn call_json<T: DeserializeOwned>(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, AriError> {
        let body = self.call(op, method, path, query).await?;
        serde_json::from_slice(&body).map_err(|e| AriError {
            op,
            kind: AriErrorKind::Decode,
            status: None,
            message: format!("unexpected body: {e}"),
        })
    }

    /// `POST /bridges/{id}`: creates the bridge; `Ok(false)` when it existed already.
    ///
    /// Asterisk says so with a 409 since asterisk/asterisk#1094 (2025). Before, it took the
    /// request for an update of the bridge and answered 500 ("Supplying a bridge type when
    /// updating a bridge is not allowed"): a 500 is followed by a look for the bridge. It
    /// exists when a create the agent gave up on (timed out) was carried out after all.
    pub async fn create_bridge(&self, id: &str, types: &str, name: &str) -> Result<bool, AriError> {
        let path = format!("/bridges/{}", encode(id));
        match self
            .call(
                "createBridge",
                Method::Post,
                &path,
                &[("type", types), ("name", name)],
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind == AriErrorKind::Conflict => Ok(false),
            Err(e) if e.status == Some(500) => match self.bridge_exists(id).await {
                Ok(true) => Ok(false),
                _ => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// `GET /asterisk/ping`: whether Asterisk's REST interface answers at all. Outside
    /// `ari.max_connections`: one at a time, from the heartbeat's check of an Asterisk whose
    /// events WebSocket is down.
    pub async fn ping(&self) -> Result<(), AriError> {
        self.call("ping", Method::Get, "/asterisk/ping", &[])
            .await
            .map(drop)
    }

    /// `GET /bridges/{id}`: whether the bridge exists (`false` on 404).
    pub async fn bridge_exists(&self, id: &str) -> Result<bool, AriError> {
        self.get_bridge(id).await.map(|b| b.is_some())
    }

    /// `DELETE /bridges/{id}`; a bridge already gone is fine, and so is one already being
    /// destroyed (409: no longer a Stasis bridge while it dissolves).
    pub async fn destroy_bridge(&self, id: &str) -> Result<(), AriError> {
        let path = format!("/bridges/{}", encode(id));
        match self.call("destroyBridge", Method::Delete, &path, &[]).await {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.kind, AriErrorKind::NotFound | AriErrorKind::Conflict) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `GET /bridges`.
    pub async fn list_bridges(&self) -> Result<Vec<Bridge>, AriError> {
        self.call_json("listBridges", Method::Get, "/bridges", &[])
            .await
    }

    /// `GET /bridges/{id}`; `None` on 404.
    pub async fn get_bridge(&self, id: &str) -> Result<Option<Bridge>, AriError> {
        let path = format!("/bridges/{}", encode(id));
        match self
            .call_json::<Bridge>("getBridge", Method::Get, &path, &[])
            .await
        {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind == AriErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /channels/{id}`: whether the channel still exists (`false` on 404).
    pub async fn channel_exists(&self, channel: &str) -> Result<bool, AriError> {
        let path = format!("/channels/{}", encode(channel));
        match self
            .call_json::<Channel>("getChannel", Method::Get, &path, &[])
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind == AriErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `GET /channels`.
    pub async fn list_channels(&self) -> Result<Vec<Channel>, AriError> {
        self.call_json("listChannels", Method::Get, "/channels", &[])
            .await
    }

    /// `POST /bridges/{id}/addChannel` with one or more channels (moved from any other bridge).
    /// Asterisk refuses a list of 128 channels or more (its parsers' `MAX_VALS`), and a
    /// request line past 4 KiB: a longer list goes in several requests, in order, stopping
    /// at the first error. Also says how many channels the requests that went through added
    /// (each request is all or nothing).
    pub async fn add_channels(
        &self,
        bridge: &str,
        channels: &[&str],
    ) -> (usize, Result<(), AriError>) {
        let path = format!("/bridges/{}/addChannel", encode(bridge));
        let fixed = request_line_len("POST", &format!("{}/ari{path}?channel=", self.base));
        let mut added = 0;
        let mut rest = channels;
        while !rest.is_empty() {
            // As many as fit in one request line (at least one: a single id too long for it
            // is refused by `call` without being sent).
            let mut line = fixed;
            let mut n = 0;
            for ch in rest.iter().take(ADD_CHANNELS_AT_ONCE) {
                let more = encode(ch).len() + usize::from(n > 0) * encode(",").len();
                if n > 0 && line + more > MAX_REQUEST_LINE {
                    break;
                }
                line += more;
                n += 1;
            }
            let (part, later) = rest.split_at(n);
            let list = part.join(",");
            let q = [("channel", list.as_str())];
            if let Err(e) = self.call("addChannel", Method::Post, &path, &q).await {
                return (added, Err(e));
            }
            added += part.len();
            rest = later;
        }
        (added, Ok(()))
    }

    /// `POST /channels/{id}/answer`.
    pub async fn answer(&self, channel: &str) -> Result<(), AriError> {
        let path = format!("/channels/{}/answer", encode(channel));
        self.call("answer", Method::Post, &path, &[])
            .await
            .map(drop)
    }

    /// `POST /channels/{id}/progress`: early media without answering (Asterisk 20.16, 21.11,
    /// 22.6 and later; older versions answer 404).
    pub async fn progress(&self, channel: &str) -> Result<(), AriError> {
        let path = format!("/channels/{}/progress", encode(channel));
        self.call("progress", Method::Post, &path, &[])
            .await
            .map(drop)
    }

    /// `DELETE /channels/{id}` with the Q.850 `cause`, as a named `reason` where ARI has one
    /// and as `reason_code` otherwise (newer versions only; older ones ignore it and hang up
    /// `normal`); a channel already gone is fine: false says it was (404). An older Asterisk
    /// knows only `normal`, `busy` and `congestion` and refuses any other name with 400: the
    /// hangup is asked again with the nearest of those, or the caller would stay in Stasis.
    pub async fn hangup(&self, channel: &str, cause: u16) -> Result<bool, AriError> {
        let path = format!("/channels/{}", encode(channel));
        let code = cause.to_string();
        let param = match hangup_reason(cause) {
            Some(reason) => ("reason", reason),
            None => ("reason_code", code.as_str()),
        };
        let mut answer = self.call("hangup", Method::Delete, &path, &[param]).await;
        if let (Err(e), ("reason", reason)) = (&answer, param) {
            let classic = classic_hangup_reason(cause);
            if e.kind == AriErrorKind::BadRequest && reason != classic {
                tracing::debug!(
                    channel,
                    reason,
                    classic,
                    "Asterisk does not know this hangup reason; hanging up with an older one"
                );
                answer = self
                    .call("hangup", Method::Delete, &path, &[("reason", classic)])
                    .await;
            }
        }
        match answer {
            Ok(_) => Ok(true),
            Err(e) if e.kind == AriErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `POST /channels/{id}/redirect?endpoint=TECH/URI` (a 302 while the call is unanswered).
    pub async fn redirect(&self, channel: &str, endpoint: &str) -> Result<(), AriError> {
        let path = format!("/channels/{}/redirect", encode(channel));
        self.call("redirect", Method::Post, &path, &[("endpoint", endpoint)])
            .await
            .map(drop)
    }

    /// `POST /channels/{id}` (originateWithId): calls `endpoint`; once answered the channel
    /// enters Stasis `app` with `app_args`. Ringing longer than `timeout` seconds ends the
    /// attempt (Asterisk hangs up with cause 19).
    pub async fn originate(&self, o: &Originate<'_>) -> Result<Channel, AriError> {
        let path = format!("/channels/{}", encode(o.channel_id));
        let timeout = o.timeout_secs.to_string();
        let mut q = vec![
            ("endpoint", o.endpoint),
            ("app", o.app),
            ("appArgs", o.app_args),
            ("timeout", timeout.as_str()),
        ];
        if !o.caller_id.is_empty() {
            q.push(("callerId", o.caller_id));
        }
        let body =
            (!o.variables.is_empty()).then(|| serde_json::json!({ "variables": o.variables }));
        let op = "originateWithId";
        let answer = self
            .call_with_body(op, Method::Post, &path, &q, body.as_ref())
            .await?;
        serde_json::from_slice(&answer).map_err(|e| AriError {
            op,
            kind: AriErrorKind::Decode,
            status: None,
            message: format!("unexpected body: {e}"),
        })
    }

    /// `POST /channels/{id}/dtmf?dtmf=...`: sends DTMF digits to the channel's far end.
    pub async fn send_dtmf(&self, channel: &str, digits: &str) -> Result<(), AriError> {
        let path = format!("/channels/{}/dtmf", encode(channel));
        self.call("sendDTMF", Method::Post, &path, &[("dtmf", digits)])
            .await
            .map(drop)
    }

    /// `POST` (mute) or `DELETE` (unmute) `/channels/{id}/mute?direction=...`.
    pub async fn mute(&self, channel: &str, direction: &str, on: bool) -> Result<(), AriError> {
        let path = format!("/channels/{}/mute", encode(channel));
        let (op, method) = if on {
            ("mute", Method::Post)
        } else {
            ("unmute", Method::Delete)
        };
        self.call(op, method, &path, &[("direction", direction)])
            .await
            .map(drop)
    }

    /// `POST /channels/{id}/variable?variable=...&value=...`.
    pub async fn set_variable(
        &self,
        channel: &str,
        variable: &str,
        value: &str,
    ) -> Result<(), AriError> {
        let path = format!("/channels/{}/variable", encode(channel));
        self.call(
            "setChannelVar",
            Method::Post,
            &path,
            &[("variable", variable), ("value", value)],
        )
        .await
        .map(drop)
    }

    /// `GET /channels/{id}/variable`: `None` when the variable is not set (404).
    pub async fn get_variable(
        &self,
        channel: &str,
        variable: &str,
    ) -> Result<Option<String>, AriError> {
        #[derive(serde::Deserialize)]
        struct Var {
            value: Option<String>,
        }
        let path = format!("/channels/{}/variable", encode(channel));
        match self
            .call_json::<Var>(
                "getChannelVar",
                Method::Get,
                &path,
                &[("variable", variable)],
            )
            .await
        {
            Ok(v) => Ok(v.value.filter(|s| !s.is_empty())),
            Err(e) if e.kind == AriErrorKind::NotFound && e.message.contains("variable") => {
                Ok(None)
            }
            // A function Asterisk cannot read for this channel (`PJSIP_HEADER` of a header
            // the call did not carry) is answered 500 "Unable to read provided function"
            // (`ast_ari_channels_get_channel_var`): nothing to read, not a failure.
            Err(e) if unreadable_function(&e) && variable.ends_with(')') => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /bridges/{id}/play/{playbackId}?media=...`.
    pub async fn play_on_bridge(
        &self,
        bridge: &str,
        playback: &str,
        media: &str,
    ) -> Result<(), AriError> {
        let path = format!("/bridges/{}/play/{}", encode(bridge), encode(playback));
        self.call("playBridge", Method::Post, &path, &[("media", media)])
            .await
            .map(drop)
    }

    /// `POST /channels/{id}/play/{playbackId}?media=...`.
    pub async fn play_on_channel(
        &self,
        channel: &str,
        playback: &str,
        media: &str,
    ) -> Result<(), AriError> {
        let path = format!("/channels/{}/play/{}", encode(channel), encode(playback));
        self.call("playChannel", Method::Post, &path, &[("media", media)])
            .await
            .map(drop)
    }

    /// `POST /bridges/{id}/moh?mohClass=...`.
    pub async fn start_bridge_moh(&self, bridge: &str, class: &str) -> Result<(), AriError> {
        let path = format!("/bridges/{}/moh", encode(bridge));
        self.call(
            "startBridgeMoh",
            Method::Post,
            &path,
            &[("mohClass", class)],
        )
        .await
        .map(drop)
    }

    /// `POST /bridges/{id}/record`: a live recording named `name`.
    pub async fn record_bridge(
        &self,
        bridge: &str,
        name: &str,
        format: &str,
    ) -> Result<(), AriError> {
        let path = format!("/bridges/{}/record", encode(bridge));
        self.call(
            "recordBridge",
            Method::Post,
            &path,
            &[
                ("name", name),
                ("format", format),
                ("ifExists", "overwrite"),
            ],
        )
        .await
        .map(drop)
    }

    /// `POST /applications/{app}/subscription?eventSource=bridge:{id}`: the app follows the
    /// bridge for itself, not only through the channels in it. Asterisk drops a bridge
    /// subscription that came through a channel when the channel moves out, before the
    /// bridge's lonely Recorder leaves, so a recording's end would go unheard.
    pub async fn follow_bridge(&self, app: &str, bridge: &str) -> Result<(), AriError> {
        let path = format!("/applications/{}/subscription", encode(app));
        let source = format!("bridge:{bridge}");
        self.call(
            "subscribe",
            Method::Post,
            &path,
            &[("eventSource", &source)],
        )
        .await
        .map(drop)
    }

    /// `DELETE /playbacks/{id}`; a playback already finished is fine.
    pub async fn stop_playback(&self, id: &str) -> Result<(), AriError> {
        let path = format!("/playbacks/{}", encode(id));
        match self.call("stopPlayback", Method::Delete, &path, &[]).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind == AriErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `GET /recordings/live/{name}`: whether the recording is still under way.
    pub async fn live_recording_exists(&self, name: &str) -> Result<bool, AriError> {
        let path = format!("/recordings/live/{}", encode(name));
        match self
            .call_json::<serde_json::Value>("getLive", Method::Get, &path, &[])
            .await
        {
            // Asterisk lists a recording that has just ended (`done`, `canceled`) until its
            // command is cleaned up: over all the same. A `failed` one stays for its
            // `RecordingFailed` to say (no new file after a failure).
            Ok(v) => Ok(!matches!(
                v.get("state").and_then(serde_json::Value::as_str),
                Some("done" | "canceled")
            )),
            Err(e) if e.kind == AriErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `POST /recordings/live/{name}/stop`; a recording already finished is fine (404, or
    /// 409 "Recording not in session" while Asterisk still lists it, `control_recording` in
    /// res/ari/resource_recordings.c).
    pub async fn stop_recording(&self, name: &str) -> Result<(), AriError> {
        let path = format!("/recordings/live/{}/stop", encode(name));
        match self.call("stopRecording", Method::Post, &path, &[]).await {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.kind, AriErrorKind::NotFound | AriErrorKind::Conflict) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Asterisk's answer to reading a function it cannot read for the channel (`PJSIP_HEADER` of
/// a header the call did not carry): expected, not worth a warning (see
/// [`AriClient::get_variable`]).
fn unreadable_function(e: &AriError) -> bool {
    e.op == "getChannelVar"
        && e.status == Some(500)
        && e.message.contains("Unable to read provided function")
}

/// What an originate asks for.
#[derive(Clone, Debug)]
pub struct Originate<'a> {
    /// The channel id to give the new channel (also the dial-out's call id).
    pub channel_id: &'a str,
    /// `TECH/resource` to call.
    pub endpoint: &'a str,
    /// Stasis application the answered channel enters.
    pub app: &'a str,
    /// Its arguments (comma separated).
    pub app_args: &'a str,
    /// Caller id to present; empty for the endpoint's default.
    pub caller_id: &'a str,
    /// Seconds to ring before giving up.
    pub timeout_secs: u64,
    /// Channel variables set on the new channel as it is created.
    pub variables: &'a BTreeMap<String, String>,
}

/// ARI's name for a hangup cause (`convert_reason_to_hangup_code` in resource_channels.c).
pub fn hangup_reason(cause: u16) -> Option<&'static str> {
    Some(match cause {
        1 => "unallocated",
        16 => "normal",
        17 => "busy",
        18 => "timeout",
        19 => "no_answer",
        21 => "rejected",
        28 => "number_incomplete",
        31 => "normal_unspecified",
        34 => "congestion",
        38 => "failure",
        _ => return None,
    })
}

/// The reason of the three every ARI version takes nearest to Q.850 `cause`: the edge gets
/// busy for busy, a retry elsewhere (`congestion`) for a failure here, and a plain end
/// otherwise.
pub fn classic_hangup_reason(cause: u16) -> &'static str {
    match cause {
        17 => "busy",
        34 | 38 | 41 | 42 | 47 => "congestion",
        _ => "normal",
    }
}

/// Asterisk's `{"message": ...}` error body, or the raw text.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Msg {
        message: Option<String>,
        error: Option<String>,
    }
    match serde_json::from_slice::<Msg>(body) {
        Ok(Msg {
            message: Some(m), ..
        }) => m,
        Ok(Msg { error: Some(e), .. }) => e,
        _ => String::from_utf8_lossy(body).chars().take(200).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_escapes_plus_and_reserved_bytes() {
        assert_eq!(encode("cr-1-+15550101"), "cr-1-%2B15550101");
        assert_eq!(encode("a b/c~d"), "a%20b%2Fc%7Ed");
        assert_eq!(encode("PJSIP/sip:x@h:5060"), "PJSIP%2Fsip%3Ax%40h%3A5060");
    }

    #[test]
    fn status_codes_map_to_kinds() {
        assert_eq!(AriErrorKind::from_status(404), AriErrorKind::NotFound);
        assert_eq!(AriErrorKind::from_status(409), AriErrorKind::Conflict);
        assert_eq!(AriErrorKind::from_status(422), AriErrorKind::Unprocessable);
        assert_eq!(AriErrorKind::from_status(412), AriErrorKind::InvalidState);
        assert_eq!(AriErrorKind::from_status(503), AriErrorKind::Server);
        assert_eq!(AriErrorKind::from_status(418), AriErrorKind::Unexpected);
        assert_eq!(
            error_message(br#"{"message":"Channel not found"}"#),
            "Channel not found"
        );
        assert_eq!(error_message(b"<html>oops</html>"), "<html>oops</html>");
        let e = |op, status: u16, message: &str| AriError {
            op,
            kind: AriErrorKind::from_status(status),
            status: Some(status),
            message: message.to_string(),
        };
        assert!(e("answer", 404, "Channel not found").channel_gone());
        assert!(e("answer", 409, "Channel not in Stasis application").channel_gone());
        assert!(!e("answer", 412, "Channel in invalid state").channel_gone());
        assert!(e("addChannel", 400, "Channel not found").channel_gone());
        assert!(e("addChannel", 422, "Channel not in Stasis application").channel_gone());
        assert!(!e("addChannel", 404, "Bridge not found").channel_gone());
        assert!(!e("addChannel", 409, "Channel x currently recording").channel_gone());
    }
}
