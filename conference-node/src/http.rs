//! The agent's HTTP port: health, readiness, metrics, drain and undrain, and the local view
//! of its conferences. Errors are `{"error":{"code","message"}}`, as the controller's.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::lifecycle;
use crate::node::Node;
use confroute_shared::types::NodeState;

/// Every route as (method, path).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/v1/drain"),
    ("POST", "/v1/undrain"),
    ("GET", "/v1/conferences"),
];

/// An HTTP error with a stable code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"confroute\""),
            );
        }
        resp
    }
}

/// Builds the application.
pub fn app(node: Arc<Node>) -> Router {
    let protected = Router::new()
        .route("/v1/drain", post(drain))
        .route("/v1/undrain", post(undrain))
        .route("/v1/conferences", get(conferences))
        .route_layer(middleware::from_fn_with_state(node.clone(), authorize));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // No route takes a body but `{}`: nothing larger is read.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(node)
}

/// Most of a request body read; the routes take none, or `{}` (which clients send by habit).
const MAX_BODY: usize = 1024;

async fn not_found(State(node): State<Arc<Node>>, req: Request) -> Response {
    // Which /v1 routes exist is not told without the token.
    if req.uri().path().starts_with("/v1/") {
        if let Some(refused) = unauthorized(&node, &req) {
            return refused;
        }
    }
    ApiError::new(StatusCode::NOT_FOUND, "route_not_found", "no such route").into_response()
}

async fn method_not_allowed(State(node): State<Arc<Node>>, req: Request) -> Response {
    // The route layer does not cover this fallback: without the check a 405 would tell
    // which /v1 routes exist.
    if req.uri().path().starts_with("/v1/") {
        if let Some(refused) = unauthorized(&node, &req) {
            return refused;
        }
    }
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
    .into_response()
}

async fn authorize(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    match unauthorized(&node, &req) {
        Some(refused) => refused,
        None => next.run(req).await,
    }
}

/// The 401 for a request without the configured token, if one is configured; without one,
/// the 403 for a request from a web page of another site (see `confroute_shared::origin`).
fn unauthorized(node: &Node, req: &Request) -> Option<Response> {
    if node.cfg.http.api_token.is_none() && confroute_shared::origin::cross_site(req.headers()) {
        return Some(
            ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_site",
                "refused: the request comes from a web page of another site (its Origin is not this server)",
            )
            .into_response(),
        );
    }
    let token = node.cfg.http.api_token.as_ref()?;
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if token.matches_bearer(given) {
        return None;
    }
    Some(
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required (Authorization: Bearer <token>)",
        )
        .into_response(),
    )
}

/// `GET /healthz`: the process is alive; touches neither Redis nor ARI.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: the events WebSocket is connected and Asterisk takes writes, Redis answers
/// and this life registered; the body also says
/// whether the call-control subscription is up.
async fn readyz(State(node): State<Arc<Node>>) -> Response {
    // Connected, and its writes not refused (a user ari.conf made read_only): the node is
    // out of placement otherwise, as heartbeats tell Redis.
    let ari = node.ari_available();
    // As long as any Redis call may take (`redis.timeout`): a Redis slower than a second
    // but within that serves the node's heartbeats, and readiness must not flap on it.
    let redis = tokio::time::timeout(
        node.cfg.redis.timeout + Duration::from_millis(100),
        node.store.ping(),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    // Registered in this life and renewed within its lease: otherwise the node is in no
    // placement (Redis refusing its writes, or another agent seen under its id).
    let registered = node.record_current();
    let ready = ari && redis && registered;
    // Reported, not required, as on the controller: callers are admitted without it.
    let bus = node.outbox.subscribed();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "ari": ari,
        "redis": redis,
        "registered": registered,
        "bus": bus,
        "state": node.state(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let tracked = i64::try_from(node.tracked_channels()).unwrap_or(i64::MAX);
    node.metrics.tracked_channels.set(tracked);
    node.metrics.drain_deadline.set(
        node.drain_deadline_unix()
            .map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX)),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        node.metrics.render(),
    )
        .into_response()
}

/// `POST /v1/drain`: no new conferences; existing ones keep taking joiners until they end
/// or `node.drain_deadline`; the node then stays drained, across agent restarts too.
///
/// `?shutdown=true` (the chart's preStop hook) starts the drain SIGTERM starts instead: the
/// agent exits once empty, and an agent started again serves. A stop's drain taken for an
/// admin's would outlive the stop: the pod's next agent (after a liveness restart, say)
/// would resume it and leave the node drained until someone undrained it.
async fn drain(
    State(node): State<Arc<Node>>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let shutdown = match query.as_deref() {
        None | Some("") | Some("shutdown=false") => false,
        Some("shutdown=true") => true,
        Some(other) => {
            return Err(invalid_query(
                other,
                "the only one is shutdown=true or shutdown=false",
            ))
        }
    };
    no_body(body)?;
    // The stop wins: an admin's drain answered 200 here would say the node stays drained,
    // while it exits once empty.
    let previous = if shutdown {
        lifecycle::drain(&node, true).await
    } else {
        lifecycle::admin_drain(&node).await.map_err(shutting_down)?
    };
    Ok(Json(
        json!({"id": node.id, "state": node.state(), "previous": previous}),
    ))
}

/// Refuses a query on a route that takes none: one the client meant (`?limit=`,
/// `?force=`) would otherwise be ignored without a word.
fn no_query(query: Option<&str>) -> Result<(), ApiError> {
    match query {
        None | Some("") => Ok(()),
        Some(other) => Err(invalid_query(other, "this route takes none")),
    }
}

/// Refuses a body on a route that takes none (an empty one, or `{}` as HTTP clients send by
/// habit, is none): settings the client put there would otherwise be ignored.
fn no_body(body: Result<Bytes, BytesRejection>) -> Result<(), ApiError> {
    let body = body.map_err(|e| match e.status() {
        // Past the limit: as any other body, one this route does not take.
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "this route takes no body: send none, or {}",
        ),
        status => ApiError::new(status, "invalid_body", e.body_text()),
    })?;
    if confroute_shared::http_serve::says_nothing(&body) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "this route takes no body: send none, or {}",
        ))
    }
}

/// 400 `invalid_query` for `query`, saying what the route takes.
fn invalid_query(query: &str, takes: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_query",
        format!("query `{query}` is not understood; {takes}"),
    )
}

/// `POST /v1/undrain`: back to serving (not while shutting down).
async fn undrain(
    State(node): State<Arc<Node>>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    no_query(query.as_deref())?;
    no_body(body)?;
    match lifecycle::undrain(&node).await {
        Ok(previous) => Ok(Json(
            json!({"id": node.id, "state": node.state(), "previous": previous}),
        )),
        Err(state) => Err(shutting_down(state)),
    }
}

/// 409 `node_shutting_down`: the node is stopping, and an admin's drain or undrain would
/// change nothing (it exits once empty).
fn shutting_down(state: NodeState) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "node_shutting_down",
        format!(
            "the node is stopping (state {state}); it exits once empty, whatever an admin asks"
        ),
    )
}

/// `GET /v1/conferences`: the conferences this node hosts, as it sees them (all of them:
/// a node hosts at most `node.capacity`).
async fn conferences(
    State(node): State<Arc<Node>>,
    RawQuery(query): RawQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    no_query(query.as_deref())?;
    Ok(Json(json!({
        "node_id": node.id,
        "state": node.state(),
        "items": node.views(),
    })))
}
