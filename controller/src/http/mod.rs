//! The controller's HTTP API: routing for edges that ask over HTTP, read and admin routes,
//! health, readiness and metrics. Described in `docs/openapi.json`.

mod api;
mod error;
mod input;
mod participants;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, MethodRouter};
use axum::Router as AxumRouter;

pub use error::ApiError;

use crate::metrics::Metrics;
use crate::router::Router;
use confroute_shared::secret::Secret;

/// Every route of the API as (method, path template); `docs/openapi.json` must match it.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/v1/route"),
    ("GET", "/v1/nodes"),
    ("GET", "/v1/nodes/{id}"),
    ("POST", "/v1/nodes/{id}/drain"),
    ("POST", "/v1/nodes/{id}/undrain"),
    ("GET", "/v1/conferences"),
    ("GET", "/v1/conferences/{name}"),
    ("DELETE", "/v1/conferences/{name}"),
    ("POST", "/v1/conferences/{name}/play"),
    ("GET", "/v1/conferences/{name}/participants"),
    ("POST", "/v1/conferences/{name}/participants"),
    ("PATCH", "/v1/conferences/{name}/participants/{id}"),
    ("DELETE", "/v1/conferences/{name}/participants/{id}"),
    ("POST", "/v1/conferences/{name}/participants/{id}/mute"),
    ("POST", "/v1/conferences/{name}/participants/{id}/unmute"),
    ("POST", "/v1/conferences/{name}/participants/{id}/hold"),
    ("POST", "/v1/conferences/{name}/participants/{id}/unhold"),
    ("POST", "/v1/conferences/{name}/participants/{id}/dtmf"),
    ("POST", "/v1/conferences/{name}/participants/{id}/play"),
    ("POST", "/v1/conferences/{name}/participants/{id}/move"),
    ("GET", "/v1/rpc"),
];

/// State shared by the handlers; one allocation, so the per-request clone axum makes is a
/// reference-count increment.
#[derive(Clone)]
pub struct ApiState(Arc<ApiShared>);

impl ApiState {
    /// Wraps the shared parts.
    pub fn new(shared: ApiShared) -> Self {
        ApiState(Arc::new(shared))
    }
}

impl std::ops::Deref for ApiState {
    type Target = ApiShared;
    fn deref(&self) -> &ApiShared {
        &self.0
    }
}

/// What the handlers share.
pub struct ApiShared {
    /// Routing decisions and the store.
    pub router: Arc<Router>,
    /// Metrics to render and count into.
    pub metrics: Metrics,
    /// Required bearer token, if any.
    pub token: Option<Secret>,
    /// Set once the SIP sockets are bound.
    pub sip_bound: Arc<AtomicBool>,
    /// `Retry-After` seconds for 503s.
    pub retry_after: u32,
    /// Call control through the command bus.
    pub control: crate::control::Control,
    /// Limits of each JSON-RPC connection.
    pub rpc_limits: crate::rpc::Limits,
    /// `http.max_body_size`: a request announcing a larger body is refused at once.
    pub max_body: usize,
    /// One permit per open JSON-RPC WebSocket (`rpc.max_connections`).
    pub rpc_connections: Arc<tokio::sync::Semaphore>,
    /// Becomes true when the controller stops: open WebSockets close with 1001.
    pub rpc_stop: tokio::sync::watch::Receiver<bool>,
    /// Slots of REST commands that run to their end (`http.max_running_commands`); a stop
    /// waits for them all.
    pub running: Arc<tokio::sync::Semaphore>,
}

/// The handler of one entry of [`ROUTES`]; registering from the table keeps the router and
/// the table (and through a test, `docs/openapi.json`) the same set.
fn endpoint(method: &str, path: &str) -> MethodRouter<ApiState> {
    match (method, path) {
        ("GET", "/healthz") => get(api::healthz),
        ("GET", "/readyz") => get(api::readyz),
        ("GET", "/metrics") => get(api::metrics),
        ("POST", "/v1/route") => post(api::route),
        ("GET", "/v1/nodes") => get(api::list_nodes),
        ("GET", "/v1/nodes/{id}") => get(api::get_node),
        ("POST", "/v1/nodes/{id}/drain") => post(api::drain),
        ("POST", "/v1/nodes/{id}/undrain") => post(api::undrain),
        ("GET", "/v1/conferences") => get(api::list_conferences),
        ("GET", "/v1/conferences/{name}") => get(api::get_conference),
        ("DELETE", "/v1/conferences/{name}") => delete(participants::end),
        ("POST", "/v1/conferences/{name}/play") => post(participants::play_all),
        ("GET", "/v1/conferences/{name}/participants") => get(participants::list),
        ("POST", "/v1/conferences/{name}/participants") => post(participants::dialout),
        ("PATCH", "/v1/conferences/{name}/participants/{id}") => patch(participants::update),
        ("DELETE", "/v1/conferences/{name}/participants/{id}") => delete(participants::kick),
        ("POST", "/v1/conferences/{name}/participants/{id}/mute") => post(participants::mute),
        ("POST", "/v1/conferences/{name}/participants/{id}/unmute") => post(participants::unmute),
        ("POST", "/v1/conferences/{name}/participants/{id}/hold") => post(participants::hold),
        ("POST", "/v1/conferences/{name}/participants/{id}/unhold") => post(participants::unhold),
        ("POST", "/v1/conferences/{name}/participants/{id}/dtmf") => post(participants::dtmf),
        ("POST", "/v1/conferences/{name}/participants/{id}/play") => post(participants::play),
        ("POST", "/v1/conferences/{name}/participants/{id}/move") => post(participants::move_to),
        ("GET", "/v1/rpc") => get(participants::rpc),
        _ => panic!("route {method} {path} is listed in ROUTES but has no handler"),
    }
}

/// Builds the axum application: health and metrics open, everything under `/v1` behind the
/// bearer token when one is configured.
pub fn app(state: ApiState, max_body: usize) -> AxumRouter {
    let mut router = AxumRouter::new();
    for (method, path) in ROUTES {
        router = router.route(path, endpoint(method, path));
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state)
}

/// `true` when the SIP sockets are bound.
pub fn sip_ready(state: &ApiState) -> bool {
    state.sip_bound.load(Ordering::Relaxed)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "route_not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

/// Whether route `template` takes `method` (HEAD wherever GET, but for the WebSocket
/// upgrade, which refuses one).
fn takes(template: &str, method: &axum::http::Method) -> bool {
    let method = if method == axum::http::Method::HEAD && template != "/v1/rpc" {
        "GET"
    } else {
        method.as_str()
    };
    ROUTES.iter().any(|(m, p)| *p == template && *m == method)
}

/// True when `given` is the `Authorization` value the configured token asks for; compared in
/// constant time.
fn authorized(token: &Secret, given: Option<&header::HeaderValue>) -> bool {
    token.matches_bearer(given.and_then(|v| v.to_str().ok()))
}

/// The one middleware of every request: the bearer token on the `/v1` routes, then the
/// request count by route template and status. One layer rather than two: each layer costs
/// a boxed future per request, on the path of `POST /v1/route`.
async fn gate(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().cloned();
    let template = route.as_ref().map_or("unmatched", |p| p.as_str());
    // The API's own paths, served or not: without the token, which routes exist is not told.
    let guarded =
        template.starts_with("/v1/") || (route.is_none() && req.uri().path().starts_with("/v1/"));
    // A body announced past the limit is refused before it is sent: waiting for it would
    // hold the connection until the body deadline.
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut resp = match &state.token {
        None if guarded && confroute_shared::origin::cross_site(req.headers()) => ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_site",
            "refused: the request comes from a web page of another site (its Origin is not this server)",
        )
        .into_response(),
        Some(token) if guarded && !authorized(token, req.headers().get(header::AUTHORIZATION)) => {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required (Authorization: Bearer <token>)",
            )
            .into_response()
        }
        // Past the router's own 404 and 405, which need no body.
        _ if route.is_some()
            && announced.is_some_and(|n| n > state.max_body as u64)
            && takes(template, req.method()) =>
        {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "the body announces {} bytes; http.max_body_size is {}",
                    announced.unwrap_or_default(),
                    state.max_body
                ),
            )
            .into_response()
        }
        _ => as_json_error(next.run(req).await).await,
    };
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED
        && !resp.headers().contains_key(header::ALLOW)
    {
        // A 405 must say what the route takes (RFC 9110 §15.5.6); the WebSocket upgrade's
        // own refusal of a HEAD does not.
        let mut allowed: Vec<&str> = ROUTES
            .iter()
            .filter(|(_, path)| *path == template)
            .map(|(method, _)| *method)
            .collect();
        // axum answers HEAD wherever it answers GET (RFC 9110 §9.3.2), but for the
        // WebSocket upgrade, which refuses one.
        if allowed.contains(&"GET") && template != "/v1/rpc" {
            allowed.push("HEAD");
        }
        if let Ok(v) = header::HeaderValue::from_str(&allowed.join(",")) {
            if !allowed.is_empty() {
                resp.headers_mut().insert(header::ALLOW, v);
            }
        }
    }
    if resp.status() == StatusCode::SERVICE_UNAVAILABLE
        && !resp.headers().contains_key(header::RETRY_AFTER)
    {
        // Every 503 says when to come back (invariant 5), whichever part refused.
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(state.retry_after),
        );
    }
    state
        .metrics
        .http_requests
        .with_label_values(&[template, resp.status().as_str()])
        .inc();
    resp
}

/// Longest plain-text error kept when it is turned into a JSON error body.
const MAX_PLAIN_ERROR: usize = 1024;

/// Gives an error answered in plain text by an extractor of axum's (a path that is not
/// UTF-8, a WebSocket upgrade without its headers) the JSON error body every other error
/// has; anything else passes through untouched.
async fn as_json_error(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = match axum::body::to_bytes(resp.into_body(), MAX_PLAIN_ERROR).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let code = match status {
        StatusCode::BAD_REQUEST => "invalid_request",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UPGRADE_REQUIRED => "upgrade_required",
        s if s.is_server_error() => "internal",
        _ => "invalid_request",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = ApiError::new(status, code, message).into_response();
    if status == StatusCode::UPGRADE_REQUIRED {
        // RFC 9110 §15.5.22: a 426 names the protocol to upgrade to; §7.8: with `upgrade`
        // in Connection, so that intermediaries do not pass it on.
        out.headers_mut().insert(
            header::UPGRADE,
            axum::http::HeaderValue::from_static("websocket"),
        );
        out.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("upgrade"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::ROUTES;

    /// `docs/openapi.json` documents exactly the routes the router serves.
    #[test]
    fn openapi_document_lists_every_route() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let text = std::fs::read_to_string(path).expect("docs/openapi.json exists");
        let doc: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let mut documented: Vec<(String, String)> = doc["paths"]
            .as_object()
            .expect("paths object")
            .iter()
            .flat_map(|(p, ops)| {
                ops.as_object()
                    .expect("operations object")
                    .keys()
                    .map(move |m| (m.to_uppercase(), p.clone()))
            })
            .collect();
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }

    /// Every listed route has a handler (building the router would panic otherwise).
    #[test]
    fn every_listed_route_has_a_handler() {
        for (m, p) in ROUTES {
            let _ = super::endpoint(m, p);
        }
    }
}
