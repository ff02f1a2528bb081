//! The controller's HTTP API: routing for edges that ask over HTTP, read and admin routes,
//! health, readiness and metrics. Described in `docs/openapi.json`.

mod api;
mod error;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router as AxumRouter;
use subtle::ConstantTimeEq;

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
];

/// State shared by the handlers.
#[derive(Clone)]
pub struct ApiState {
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
}

/// Builds the axum application.
pub fn app(state: ApiState, max_body: usize) -> AxumRouter {
    let protected = AxumRouter::new()
        .route("/v1/route", post(api::route))
        .route("/v1/nodes", get(api::list_nodes))
        .route("/v1/nodes/{id}", get(api::get_node))
        .route("/v1/nodes/{id}/drain", post(api::drain))
        .route("/v1/nodes/{id}/undrain", post(api::undrain))
        .route("/v1/conferences", get(api::list_conferences))
        .route(
            "/v1/conferences/{name}",
            get(api::get_conference).delete(api::end_conference),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    AxumRouter::new()
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), count))
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

async fn authorize(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok: bool = given.as_bytes().ct_eq(token.expose().as_bytes()).into();
        if !ok {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required (Authorization: Bearer <token>)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn count(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let resp = next.run(req).await;
    state
        .metrics
        .http_requests
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    resp
}
