//! The `/ari` HTTP front: authentication, parameters, routing, api-docs and the events WebSocket.
//!
//! Follows `res/res_ari.c` (`ast_ari_callback`, `ast_ari_invoke`, `ast_ari_get_docs`): form
//! bodies merge with query parameters, Basic auth wins over `api_key`, unknown paths answer
//! `404 Resource not found`, wrong methods `405 Invalid method`, and errors are `{"message": ...}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value};

use super::engine::{Core, RequestRecord};
use super::routes::{dispatch, Dispatch, Kind};

/// The Swagger's `allowMultiple` query parameters of the operations simulated.
const ALLOW_MULTIPLE: [&str; 6] = [
    "channel",
    "only",
    "eventSource",
    "media",
    "variables",
    "source",
];

/// `MAX_VALS` of the generated ARI parsers: a list of this many values or more is refused.
const MAX_VALS: usize = 128;

/// Largest request body read at all (a test's guard; Asterisk's own limit is below).
const MAX_BODY: usize = 4 * 1024 * 1024;

/// main/http.c's `MAX_CONTENT_LENGTH`: a JSON or form body longer than this is refused 413
/// ("Request body too large") and the connection closed after the answer.
const MAX_CONTENT_LENGTH: usize = 4096;

/// main/http.c's `MAX_HTTP_LINE_LENGTH`: the request line is read with `fgets` into a buffer
/// this long, so what lies past its first 4,095 bytes is cut off the URI (and read as a
/// header line, which is skipped without a colon): the request is carried out as cut.
const MAX_HTTP_LINE_LENGTH: usize = 4096;

/// The URI Asterisk acts on for a request line of `method` and `uri` (`HTTP/1.1`, CRLF).
fn as_read_by_fgets(method: &str, uri: &str) -> Option<String> {
    let line = method.len() + 1 + uri.len() + " HTTP/1.1\r\n".len();
    let room = (MAX_HTTP_LINE_LENGTH - 1).checked_sub(method.len() + 1)?;
    (line > MAX_HTTP_LINE_LENGTH - 1 && room < uri.len()).then(|| {
        let mut end = room;
        while !uri.is_char_boundary(end) {
            end -= 1;
        }
        uri[..end].to_string()
    })
}

/// An ARI error: status code and JSON body.
#[derive(Debug, Clone)]
pub(crate) struct ApiErr {
    pub code: u16,
    pub body: Value,
}

impl ApiErr {
    /// `ast_ari_response_error`: `{"message": ...}`.
    pub fn new(code: u16, message: impl Into<String>) -> ApiErr {
        ApiErr {
            code,
            body: json!({ "message": message.into() }),
        }
    }

    /// `ast_ari_response_alloc_failed`: 500 with res_ari.c's `oom_json` body.
    pub fn alloc_failed() -> ApiErr {
        ApiErr {
            code: 500,
            body: json!({ "error": "Allocation failed" }),
        }
    }
}

/// A successful ARI answer.
pub(crate) enum Resp {
    Ok(Value),
    Created(String, Value),
    NoContent,
    /// Checked, and waiting for commands in channels' queues (`app_send_command`): the
    /// answer is what the future gives once they have run or been flushed.
    Later(Pending),
}

/// The rest of a request that waits for channel commands.
pub(crate) type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = ApiResult> + Send>>;

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resp::Ok(v) => f.debug_tuple("Ok").field(v).finish(),
            Resp::Created(l, v) => f.debug_tuple("Created").field(l).field(v).finish(),
            Resp::NoContent => f.write_str("NoContent"),
            Resp::Later(_) => f.write_str("Later"),
        }
    }
}

/// Result of an ARI operation handler.
pub(crate) type ApiResult = Result<Resp, ApiErr>;

/// Request parameters: query string (merged with a form body) and the JSON body.
///
/// Accessors follow the generated `*_cb`/`*_parse_body` functions: a JSON body field of the same
/// name overrides the query value; JSON strings, integers and booleans are read as jansson does.
pub(crate) struct Params {
    query: Vec<(String, String)>,
    json: Option<Value>,
    declared: &'static [&'static str],
    op: &'static str,
    undeclared: Vec<String>,
}

impl Params {
    pub fn new(
        query: Vec<(String, String)>,
        json: Option<Value>,
        declared: &'static [&'static str],
        op: &'static str,
    ) -> Params {
        Params {
            query,
            json,
            declared,
            op,
            undeclared: Vec::new(),
        }
    }

    fn note(&mut self, name: &str) {
        if !self.declared.contains(&name) {
            self.undeclared
                .push(format!("{} read undeclared parameter {name}", self.op));
        }
    }

    fn json_field(&self, name: &str) -> Option<&Value> {
        self.json
            .as_ref()
            .and_then(|j| j.as_object())
            .and_then(|o| o.get(name))
    }

    fn query_last(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A string parameter; a non-string JSON value counts as absent, as `ast_json_string_get` does.
    pub fn s(&mut self, name: &str) -> Option<String> {
        self.note(name);
        if let Some(v) = self.json_field(name) {
            return v.as_str().map(str::to_string);
        }
        self.query_last(name).map(str::to_string)
    }

    /// A string parameter, empty when absent (Asterisk's `ast_strlen_zero` checks treat both alike).
    pub fn se(&mut self, name: &str) -> String {
        self.s(name).unwrap_or_default()
    }

    /// An `allowMultiple` parameter: comma separated in the query, array or string in JSON.
    pub fn multi(&mut self, name: &str) -> Vec<String> {
        self.note(name);
        if let Some(v) = self.json_field(name) {
            return match v {
                Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().unwrap_or_default().to_string())
                    .collect(),
                other => vec![other.as_str().unwrap_or_default().to_string()],
            };
        }
        match self.query_last(name) {
            None => Vec::new(),
            Some("") => vec![String::new()],
            Some(v) => v.split(',').map(str::to_string).collect(),
        }
    }

    /// An integer parameter read like `atoi` (garbage is 0), `None` when absent.
    pub fn int(&mut self, name: &str) -> Option<i64> {
        self.note(name);
        if let Some(v) = self.json_field(name) {
            return Some(v.as_i64().unwrap_or(0));
        }
        self.query_last(name).map(atoi)
    }

    /// A boolean parameter read like `ast_true` (JSON: only `true`).
    pub fn boolean(&mut self, name: &str) -> bool {
        self.note(name);
        if let Some(v) = self.json_field(name) {
            return v.as_bool().unwrap_or(false);
        }
        self.query_last(name).is_some_and(ast_true)
    }

    /// The whole JSON body, for operations with a `body` parameter (`variables`).
    pub fn body(&mut self, name: &str) -> Option<&Value> {
        self.note(name);
        self.json.as_ref()
    }

    pub fn take_undeclared(&mut self) -> Vec<String> {
        std::mem::take(&mut self.undeclared)
    }
}

/// C `atoi`: optional sign and leading digits, 0 otherwise.
pub(crate) fn atoi(s: &str) -> i64 {
    let t = s.trim_start();
    let (neg, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let n: i64 = digits
        .bytes()
        .take_while(u8::is_ascii_digit)
        .fold(0i64, |acc, d| {
            acc.saturating_mul(10).saturating_add(i64::from(d - b'0'))
        });
    if neg {
        -n
    } else {
        n
    }
}

/// Asterisk's `ast_true`.
pub(crate) fn ast_true(s: &str) -> bool {
    matches!(
        s.trim().to_ascii_lowercase().as_str(),
        "yes" | "true" | "y" | "t" | "1" | "on"
    )
}

/// One request being served: path parameters and [`Params`].
pub(crate) struct Req {
    pub path: HashMap<&'static str, String>,
    pub params: Params,
}

impl Req {
    /// A path parameter (always present once routed).
    pub fn path(&self, name: &str) -> String {
        self.path.get(name).cloned().unwrap_or_default()
    }
}

fn server_header(core: &Core) -> HeaderValue {
    HeaderValue::from_str(&format!("Asterisk/{}", core.cfg.version))
        .unwrap_or(HeaderValue::from_static("Asterisk"))
}

fn json_response(
    core: &Core,
    status: u16,
    body: Option<&Value>,
    extra: Vec<(header::HeaderName, String)>,
) -> Response {
    let mut resp = match body {
        Some(b) => {
            let mut r = Response::new(Body::from(b.to_string()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        None => Response::new(Body::empty()),
    };
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(header::SERVER, server_header(core));
    for (k, v) in extra {
        if let Ok(v) = HeaderValue::from_str(&v) {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}

fn error_response(core: &Core, err: &ApiErr, extra: Vec<(header::HeaderName, String)>) -> Response {
    json_response(core, err.code, Some(&err.body), extra)
}

/// `ast_http_error`: Asterisk's small HTML error page, used outside ARI's JSON handlers.
fn html_error(core: &Core, status: u16, title: &str, text: &str) -> Response {
    let page = format!(
        "<!DOCTYPE HTML PUBLIC \"-//IETF//DTD HTML 2.0//EN\">\r\n<html><head>\r\n<title>{status} {title}</title>\r\n</head><body>\r\n<h1>{title}</h1>\r\n<p>{text}</p>\r\n<hr />\r\n<address>Asterisk Server</address>\r\n</body></html>\r\n"
    );
    let mut r = Response::new(Body::from(page));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    r.headers_mut().insert(header::SERVER, server_header(core));
    r
}

/// Basic auth if an `Authorization: Basic` header is present, else `?api_key=user:pass`.
fn authorized(core: &Core, headers: &HeaderMap, params: &[(String, String)]) -> bool {
    let check = |user: &str, pass: &str| user == core.cfg.username && pass == core.cfg.password;
    if let Some(h) = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
    {
        let mut parts = h.trim().splitn(2, ' ');
        if parts
            .next()
            .is_some_and(|s| s.eq_ignore_ascii_case("basic"))
        {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(parts.next().unwrap_or_default().trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            return match decoded.as_deref().and_then(|d| d.split_once(':')) {
                Some((u, p)) => check(u, p),
                None => false,
            };
        }
    }
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("api_key"))
        .and_then(|(_, v)| v.split_once(':'))
        .is_some_and(|(u, p)| check(u, p))
}

fn decode_segment(seg: &str) -> String {
    let plus = seg.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8_lossy()
        .into_owned()
}

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Entry point for every request outside `/_sim`.
pub(crate) async fn entry(State(core): State<Arc<Core>>, req: Request) -> Response {
    core.wait_stall().await;
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let (resp, operation) = serve(&core, req).await;
    core.log_request(RequestRecord {
        method: method.to_string(),
        path,
        status: resp.status().as_u16(),
        operation: operation.map(str::to_string),
    });
    resp
}

async fn serve(core: &Arc<Core>, req: Request) -> (Response, Option<&'static str>) {
    let (mut parts, body) = req.into_parts();
    let sent = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if let Some(cut) = as_read_by_fgets(parts.method.as_str(), &sent) {
        if let Ok(uri) = cut.parse() {
            parts.uri = uri;
        }
    }
    let raw_path = parts.uri.path().to_string();
    let Some(rel) = raw_path
        .strip_prefix("/ari")
        .filter(|r| r.is_empty() || r.starts_with('/'))
    else {
        return (
            html_error(
                core,
                404,
                "Not Dispatch",
                "The requested URL was not found on this server.",
            ),
            None,
        );
    };
    let rel = rel.strip_prefix('/').unwrap_or(rel).to_string();

    let mut query: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let bytes = match to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            let err = ApiErr::new(413, "Request body too large");
            return (error_response(core, &err, Vec::new()), None);
        }
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if content_type == "application/x-www-form-urlencoded" {
        // res_ari.c reads form data before it looks at the credentials.
        if bytes.len() > MAX_CONTENT_LENGTH {
            let err = ApiErr::new(413, "Request body too large");
            let close = (header::CONNECTION, "close".to_string());
            return (error_response(core, &err, vec![close]), None);
        }
        let mut post: Vec<(String, String)> = form_urlencoded::parse(&bytes).into_owned().collect();
        post.append(&mut query);
        query = post;
    }

    if !authorized(core, &parts.headers, &query) {
        let err = ApiErr::new(401, "Authentication required");
        let challenge = (
            header::WWW_AUTHENTICATE,
            "Basic realm=\"Asterisk REST Interface\"".to_string(),
        );
        return (error_response(core, &err, vec![challenge]), None);
    }
    // res_ari.c: until Asterisk is fully booted (`ast_fully_booted`), an authenticated
    // request (the events WebSocket's too) is answered 503 and its connection closed.
    if core.booting.load(std::sync::atomic::Ordering::SeqCst) {
        let err = ApiErr::new(503, "Asterisk not booted");
        let close = (header::CONNECTION, "close".to_string());
        return (error_response(core, &err, vec![close]), None);
    }
    // res_ari.c refuses a read-only user's writes before it looks at the path.
    if core.read_only.load(std::sync::atomic::Ordering::SeqCst)
        && parts.method != Method::GET
        && parts.method != Method::OPTIONS
    {
        let err = ApiErr::new(403, "Write access denied");
        return (error_response(core, &err, Vec::new()), None);
    }
    if rel.ends_with('/') {
        let err = ApiErr::new(
            404,
            format!(
                "ARI URLs do not end with a slash. Try /ari/{}",
                rel.trim_end_matches('/')
            ),
        );
        return (error_response(core, &err, Vec::new()), None);
    }
    if let Some(file) = rel.strip_prefix("api-docs/") {
        if parts.method != Method::GET {
            let err = ApiErr::new(405, "Unsupported method");
            return (error_response(core, &err, Vec::new()), None);
        }
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        return (api_docs(core, file, host), None);
    }

    let segments: Vec<String> = rel
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode_segment)
        .collect();
    let (route, path_params) = match dispatch(core, parts.method.as_str(), &segments) {
        Dispatch::Route(route, params) => (route, params),
        Dispatch::Options(allow) => {
            return (
                json_response(core, 204, None, vec![(header::ALLOW, allow)]),
                None,
            );
        }
        Dispatch::MethodNotAllowed(allow) => {
            let err = ApiErr::new(405, "Invalid method");
            return (
                error_response(core, &err, vec![(header::ALLOW, allow)]),
                None,
            );
        }
        Dispatch::Unsimulated(nickname) => {
            let err = ApiErr::new(501, "Method not implemented");
            return (error_response(core, &err, Vec::new()), Some(nickname));
        }
        Dispatch::NotFound => {
            let err = ApiErr::new(404, "Resource not found");
            return (error_response(core, &err, Vec::new()), None);
        }
    };

    let handler = match route.kind {
        Kind::Rest(h) => h,
        Kind::Events => {
            let lost = core
                .lost_ops
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(route.nickname);
            if lost {
                // Test-only loss, as for REST requests: the handshake never reaches Asterisk.
                std::future::pending::<()>().await;
            }
            let params = Params::new(query, None, route.params, route.nickname);
            return (
                events_upgrade(core, &mut parts, params).await,
                Some(route.nickname),
            );
        }
    };

    // The generated parsers (res/ari/res_ari_*.c) split a comma-separated `allowMultiple`
    // query value into at most MAX_VALS (128) values and refuse a list that fills them,
    // before the body is read.
    for (name, value) in &query {
        let multiple =
            ALLOW_MULTIPLE.contains(&name.as_str()) && route.params.contains(&name.as_str());
        if multiple && !value.is_empty() && value.split(',').count() >= MAX_VALS {
            let err = ApiErr::new(400, format!("Too many values for {name}"));
            return (error_response(core, &err, Vec::new()), Some(route.nickname));
        }
    }
    let json = if content_type == "application/json"
        && !route.params.is_empty()
        && !bytes.iter().all(u8::is_ascii_whitespace)
    {
        if bytes.len() > MAX_CONTENT_LENGTH {
            let err = ApiErr::new(413, "Request body too large");
            let close = (header::CONNECTION, "close".to_string());
            return (
                error_response(core, &err, vec![close]),
                Some(route.nickname),
            );
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => Some(v),
            Err(_) => {
                let err = ApiErr::new(400, "Error parsing request body");
                return (error_response(core, &err, Vec::new()), Some(route.nickname));
            }
        }
    } else {
        None
    };
    let mut req = Req {
        path: path_params,
        params: Params::new(query, json, route.params, route.nickname),
    };
    // Asterisk carries out a request it has read even when its client gives up waiting
    // (a timeout closes the connection): the work runs on a task of its own.
    let nickname = route.nickname;
    let by_path = format!("{} {}", route.method, route.path);
    let lost = {
        let lost = core.lost_ops.lock().unwrap_or_else(|p| p.into_inner());
        lost.contains(nickname) || lost.contains(&by_path)
    };
    if lost {
        // Test-only loss: the request never reached Asterisk's handler.
        std::future::pending::<()>().await;
    }
    let worker = core.clone();
    let work = tokio::spawn(async move {
        let core = &worker;
        // Nicknames repeat across resources (`list`): a hold may also name the route itself.
        // The turns are kept until the request is handled, so held requests keep their order.
        let mut turns = Vec::new();
        turns.push(core.wait_held(nickname).await);
        turns.push(core.wait_held(&by_path).await);
        let mut queued_behind = match (route.method, nickname) {
            ("POST", "addChannel" | "removeChannel") => req.params.multi("channel"),
            ("POST", "answer") => vec![req.path("channelId")],
            _ => Vec::new(),
        };
        // One order for every request, so two naming the same channels cannot wait on each
        // other's turn.
        queued_behind.sort();
        queued_behind.dedup();
        for ch in &queued_behind {
            turns.push(core.wait_held(&format!("{nickname} {ch}")).await);
        }
        // A request still on its way when the simulated Asterisk died is lost with it: its
        // connection is gone, and the emptied state must not carry it out. It gives up its
        // turns, or it would hold up every later request of its operation.
        if !core.lock().up {
            turns.clear();
            std::future::pending::<()>().await;
        }
        let result = handler(core, &mut req);
        drop(turns);
        let undeclared = req.params.take_undeclared();
        if !undeclared.is_empty() {
            core.violations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(undeclared);
        }
        core.events_changed.notify_waiters();
        let mut result = result;
        while let Ok(Resp::Later(rest)) = result {
            result = rest.await;
            core.events_changed.notify_waiters();
        }
        // Test-only latency after the work is done: the events it caused are out, the
        // answer waits (`answer <nickname>`).
        drop(core.wait_held(&format!("answer {nickname}")).await);
        result
    });
    let result = match work.await {
        Ok(r) => r,
        Err(_) => Err(ApiErr::new(500, "Internal Server Error")),
    };
    let resp = match result {
        // Asterisk writes no body for a NULL message (`ast_ari_response_ok(response, NULL)`).
        Ok(Resp::Ok(Value::Null)) => json_response(core, 200, None, Vec::new()),
        Ok(Resp::Ok(v)) => json_response(core, 200, Some(&v), Vec::new()),
        Ok(Resp::Created(location, v)) => {
            json_response(core, 201, Some(&v), vec![(header::LOCATION, location)])
        }
        Ok(Resp::NoContent) => json_response(core, 204, None, Vec::new()),
        // Awaited above until it gave an answer.
        Ok(Resp::Later(_)) => unreachable!("a pending answer is awaited before it is written"),
        Err(e) => error_response(core, &e, Vec::new()),
    };
    (resp, Some(route.nickname))
}

/// `GET /ari/events`: checks the apps, registers them before the upgrade completes (events
/// queue until the socket is up, as Asterisk's event session does) and hands over to the socket.
async fn events_upgrade(
    core: &Arc<Core>,
    parts: &mut axum::http::request::Parts,
    mut params: Params,
) -> Response {
    let is_upgrade = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_upgrade {
        return html_error(core, 426, "Upgrade Required", "");
    }
    let apps = params.multi("app");
    let subscribe_all = params.boolean("subscribeAll");
    if apps.is_empty() {
        return html_error(
            core,
            400,
            "Bad Request",
            "HTTP request is missing param: [app]",
        );
    }
    if apps.iter().any(String::is_empty) {
        return html_error(
            core,
            400,
            "Bad Request",
            "Invalid application provided in param [app].",
        );
    }
    let ws = match WebSocketUpgrade::from_request_parts(parts, &()).await {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let sid = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    {
        let mut st = core.lock();
        if !st.up {
            return html_error(core, 503, "Service Unavailable", "Asterisk not booted");
        }
        st.open_session(core, sid, &apps, subscribe_all, tx);
    }
    let core_run = Arc::clone(core);
    let core_fail = Arc::clone(core);
    let mut resp = ws
        .protocols(["ari"])
        .on_failed_upgrade(move |_| core_fail.lock().close_session(sid))
        .on_upgrade(move |socket| super::ws::run_session(core_run, sid, rx, socket));
    resp.headers_mut()
        .insert(header::SERVER, server_header(core));
    resp
}

/// `ast_ari_get_docs`: serves a Swagger file with `basePath` pointing at this server.
fn api_docs(core: &Core, file: &str, host: Option<&str>) -> Response {
    let err = |code: u16, msg: &str| error_response(core, &ApiErr::new(code, msg), Vec::new());
    let Ok(dir) = core.docs_dir.canonicalize() else {
        return err(500, "Cannot find rest-api directory");
    };
    let Ok(path) = dir.join(file).canonicalize() else {
        return err(404, "Resource not found");
    };
    if !path.starts_with(&dir) {
        return err(404, "Resource not found");
    }
    if !path.is_file() {
        return err(403, "Invalid access");
    }
    let Some(mut doc) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    else {
        return err(500, "Yikes! Cannot parse resource");
    };
    if let Some(obj) = doc.as_object_mut() {
        if obj.contains_key("basePath") {
            match host {
                Some(h) => {
                    obj.insert("basePath".into(), Value::String(format!("http://{h}/ari")));
                }
                None => {
                    obj.remove("basePath");
                }
            }
        }
    }
    json_response(core, 200, Some(&doc), Vec::new())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_request_line_is_cut_where_fgets_stops() {
        let short = "/ari/bridges/b/addChannel?channel=a,b";
        assert_eq!(super::as_read_by_fgets("POST", short), None);
        let long = format!("/ari/bridges/b/addChannel?channel={}", "x".repeat(5000));
        let cut = super::as_read_by_fgets("POST", &long).expect("cut");
        assert_eq!("POST ".len() + cut.len(), 4095);
        assert!(long.starts_with(&cut));
        // Only the version is cut off: the URI stays whole.
        let just = format!("/ari/x?a={}", "y".repeat(4095 - "POST /ari/x?a=".len()));
        assert_eq!(super::as_read_by_fgets("POST", &just), None);
    }

    use super::*;

    #[test]
    fn atoi_and_ast_true_behave_like_c() {
        assert_eq!(atoi("42"), 42);
        assert_eq!(atoi(" -7x"), -7);
        assert_eq!(atoi("abc"), 0);
        assert_eq!(atoi(""), 0);
        for t in ["yes", "TRUE", "y", "t", "1", "on"] {
            assert!(ast_true(t), "{t}");
        }
        for f in ["no", "false", "0", "", "maybe"] {
            assert!(!ast_true(f), "{f}");
        }
    }

    #[test]
    fn json_body_overrides_query_like_parse_body() {
        let query = vec![
            ("endpoint".to_string(), "PJSIP/a".to_string()),
            ("timeout".to_string(), "5".to_string()),
        ];
        let json = serde_json::json!({"endpoint": "PJSIP/b", "channel": ["x", "y"], "mute": true, "app": 3});
        let mut p = Params::new(
            query,
            Some(json),
            &["endpoint", "timeout", "channel", "mute", "app"],
            "test",
        );
        assert_eq!(p.s("endpoint").as_deref(), Some("PJSIP/b"));
        assert_eq!(p.int("timeout"), Some(5));
        assert_eq!(p.multi("channel"), vec!["x", "y"]);
        assert!(p.boolean("mute"));
        assert_eq!(p.s("app"), None, "a non-string JSON value reads as absent");
        assert!(p.take_undeclared().is_empty());
        let _ = p.s("other");
        assert_eq!(p.take_undeclared().len(), 1);
    }

    #[test]
    fn multi_splits_commas() {
        let mut p = Params::new(
            vec![("channel".into(), "a,b".into())],
            None,
            &["channel"],
            "test",
        );
        assert_eq!(p.multi("channel"), vec!["a", "b"]);
        let mut p = Params::new(
            vec![("channel".into(), String::new())],
            None,
            &["channel"],
            "test",
        );
        assert_eq!(p.multi("channel"), vec![String::new()]);
    }
}
