//! HTTP handlers. Each validates its input before touching Redis (invariant 6).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use confroute_shared::name::ConferenceName;
use confroute_shared::store::{StateChange, StoreError};
use confroute_shared::types::{NodeId, NodeRecord, NodeState};

use super::input::{NoInput, NoQuery};
use super::{sip_ready, ApiError, ApiState};
use crate::router::RouteError;

/// The error for a body the JSON extractor refused.
pub fn json_rejection(r: JsonRejection) -> ApiError {
    match r {
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.body_text())
        }
        JsonRejection::JsonDataError(e) => ApiError::bad_request(e.body_text()),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected Content-Type: application/json",
        ),
        other => {
            let status = other.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "payload_too_large"
            } else {
                "invalid_request"
            };
            ApiError::new(status, code, other.body_text())
        }
    }
}

fn store_error(e: StoreError, retry_after: u32) -> ApiError {
    ApiError::unavailable(
        "unavailable",
        format!("routing store unavailable: {e}"),
        retry_after,
    )
}

/// A conference name from a request, or 422 `invalid_conference`.
pub(super) fn conference_name(raw: &str) -> Result<ConferenceName, ApiError> {
    ConferenceName::parse(raw).map_err(|e| ApiError::invalid_conference(e.to_string()))
}

fn node_id(raw: &str) -> Result<NodeId, ApiError> {
    NodeId::parse(raw).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_node_id",
            e.to_string(),
        )
    })
}

/// `GET /healthz`: the process is alive; never touches Redis.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: Redis reachable and SIP sockets bound; the body also says whether the
/// call-control bus is subscribed.
pub async fn readyz(State(state): State<ApiState>) -> Response {
    let redis = state.router.redis_ok();
    let sip = sip_ready(&state);
    // Reported, not required: routing needs no subscription, and a Redis that refuses one
    // (an ACL without channel rights) must not take the controller out of the SIP Service.
    let bus = state.control.bus().connected();
    let ready = redis && sip;
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "redis": redis,
        "sip": sip,
        "bus": bus,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Body of `POST /v1/route`.
pub struct RouteRequest {
    conference: String,
}

impl<'de> Deserialize<'de> for RouteRequest {
    /// Only from a JSON object: a derived struct would also take an array, field by
    /// position (`["sales-2"]`), which the API does not offer.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            conference: String,
        }
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = RouteRequest;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object with `conference`")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RouteRequest, A::Error> {
                let f = Fields::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RouteRequest {
                    conference: f.conference,
                })
            }
        }
        d.deserialize_map(Object)
    }
}

/// Answer of `POST /v1/route`.
#[derive(Serialize)]
pub struct RouteAnswer {
    conference: String,
    node_id: String,
    sip_uri: String,
    epoch: u64,
    created: bool,
}

/// `POST /v1/route`: the routing decision as JSON.
pub async fn route(
    State(state): State<ApiState>,
    q: Result<NoQuery, ApiError>,
    body: Result<Json<RouteRequest>, JsonRejection>,
) -> Result<Json<RouteAnswer>, ApiError> {
    q?;
    // A body that names no conference (not JSON, no `conference`) is an invalid routing
    // request as much as a badly spelled name: an edge sending the wrong field shows there.
    let Json(req) = body
        .map_err(json_rejection)
        .inspect_err(|_| state.router.record_invalid())?;
    let name = conference_name(&req.conference).inspect_err(|_| state.router.record_invalid())?;
    match state.router.route(&name, "http").await {
        Ok(d) => Ok(Json(RouteAnswer {
            conference: name.to_string(),
            created: d.created(),
            node_id: d.node_id.to_string(),
            sip_uri: d.sip_uri,
            epoch: d.epoch,
        })),
        Err(RouteError::NoCapacity) => Err(ApiError::unavailable(
            "no_capacity",
            "no conference node is taking new conferences with room to spare (each is full, draining or without its Asterisk)",
            state.retry_after,
        )),
        Err(RouteError::Unavailable(why)) => Err(ApiError::unavailable(
            "unavailable",
            format!("routing store unavailable: {why}"),
            state.retry_after,
        )),
    }
}

fn node_json(n: &NodeRecord) -> Value {
    json!({
        "id": n.info.id,
        "sip_uri": n.info.sip_uri,
        "control": n.info.control,
        "zone": n.info.zone,
        "capacity": n.info.capacity,
        "participant_capacity": n.info.participant_capacity,
        "state": n.info.state,
        "ari": n.load.ari,
        "conferences": n.load.conferences,
        "participants": n.load.participants,
        "cpu": n.load.cpu,
        "claimed": n.claimed,
        "lease_ms": n.lease_ms,
        "updated_ms": n.updated_ms,
        "drain_since_ms": n.drain_since_ms,
        "stopping": n.stopping,
    })
}

/// `GET /v1/nodes`: every node with a live lease.
pub async fn list_nodes(
    State(state): State<ApiState>,
    q: Result<NoQuery, ApiError>,
) -> Result<Json<Value>, ApiError> {
    q?;
    let nodes = state
        .router
        .store()
        .list_nodes()
        .await
        .map_err(|e| store_error(e, state.retry_after))?;
    // By id: Redis's index is ordered by lease end, which every heartbeat changes.
    let mut nodes: Vec<&NodeRecord> = nodes.iter().collect();
    nodes.sort_by(|a, b| a.info.id.as_str().cmp(b.info.id.as_str()));
    Ok(Json(
        json!({"items": nodes.into_iter().map(node_json).collect::<Vec<_>>()}),
    ))
}

/// `GET /v1/nodes/{id}`.
pub async fn get_node(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    q: Result<NoQuery, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let id = node_id(&id)?;
    q?;
    match state.router.store().get_node(&id).await {
        Ok(Some(n)) => Ok(Json(node_json(&n))),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "node_not_found",
            format!("no live node `{id}`"),
        )),
        Err(e) => Err(store_error(e, state.retry_after)),
    }
}

async fn set_state(state: &ApiState, raw_id: &str, to: NodeState) -> Result<Json<Value>, ApiError> {
    let id = node_id(raw_id)?;
    match state.router.store().set_state(&id, to).await {
        Ok(StateChange::Changed(previous)) => {
            tracing::info!(node = %id, %previous, state = %to, "node state changed by the admin API");
            // Take effect for this controller's placements now, not at the next refresh.
            let _ = state.router.refresh().await;
            Ok(Json(json!({"id": id, "state": to, "previous": previous})))
        }
        Ok(StateChange::NotRegistered) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "node_not_found",
            format!("no live node `{id}`"),
        )),
        Ok(StateChange::Stopping(current)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "node_shutting_down",
            format!("node `{id}` is {current} for a shutdown; its state can no longer be changed"),
        )),
        // Only a node's own conditional write is superseded; an admin's is unconditional.
        Ok(StateChange::Superseded(current)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("node `{id}`'s state ({current}) was not written"),
        )),
        Err(e) => Err(store_error(e, state.retry_after)),
    }
}

/// `POST /v1/nodes/{id}/drain`: no new conferences on the node (it learns with its next
/// heartbeat and drains).
pub async fn drain(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    input: Result<NoInput, ApiError>,
) -> Result<Json<Value>, ApiError> {
    node_id(&id)?;
    input?;
    set_state(&state, &id, NodeState::Draining).await
}

/// `POST /v1/nodes/{id}/undrain`: the node takes new conferences again.
pub async fn undrain(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    input: Result<NoInput, ApiError>,
) -> Result<Json<Value>, ApiError> {
    node_id(&id)?;
    input?;
    set_state(&state, &id, NodeState::Serving).await
}

/// Query of `GET /v1/conferences`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/conferences?after=NAME&limit=N`: live conferences in name order, paged.
pub async fn list_conferences(
    State(state): State<ApiState>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    if let Some(after) = &q.after {
        confroute_shared::name::validate_cursor(after).map_err(ApiError::bad_request)?;
    }
    let page = state
        .router
        .store()
        .list_conferences(q.after.as_deref(), limit)
        .await
        .map_err(|e| store_error(e, state.retry_after))?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|(name, rec)| {
            json!({
                "conference": name,
                "node_id": rec.owner.node,
                "epoch": rec.owner.epoch,
                "participants": rec.participants,
                "created_ms": rec.created_ms,
            })
        })
        .collect();
    Ok(Json(json!({"items": items, "next": page.next})))
}

/// `GET /v1/conferences/{name}`: owner, epoch, participants, and the owner node.
pub async fn get_conference(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    q: Result<NoQuery, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let name = conference_name(&raw)?;
    q?;
    let store = state.router.store();
    let rec = store
        .lookup(&name)
        .await
        .map_err(|e| store_error(e, state.retry_after))?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "conference_not_found",
                format!("conference `{name}` has no home"),
            )
        })?;
    let view = state.router.view();
    let node = view.live(&rec.owner.node).map(node_json);
    Ok(Json(json!({
        "conference": name,
        "node_id": rec.owner.node,
        "epoch": rec.owner.epoch,
        "participants": rec.participants,
        "created_ms": rec.created_ms,
        "node": node,
    })))
}
