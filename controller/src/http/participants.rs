//! REST mirrors of the call-control operations, for clients that prefer HTTP to the JSON-RPC
//! WebSocket, and the WebSocket upgrade itself. Both go through [`crate::control::Control`].

use axum::extract::rejection::JsonRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use confroute_shared::bus::ErrorCode;

use super::api::{conference_name, json_rejection};
use super::input::{NoBody, NoInput, NoQuery};
use super::{ApiError, ApiState};
use crate::control::{
    ConferenceRef, ControlError, DialoutParams, DtmfParams, EndParams, MoveParams, ParticipantRef,
    PlayParams, UpdateParams,
};

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::InvalidParams(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_params", m)
            }
            // `Retry-After` (sip.retry_after) is added to every 503 by the gate.
            ControlError::Unavailable(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
            }
            // As `POST /v1/route` says it.
            ControlError::NoCapacity(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_capacity", m)
            }
            ControlError::Node(b) => {
                let (status, code) = match b.code {
                    ErrorCode::ConferenceNotFound => {
                        (StatusCode::NOT_FOUND, "conference_not_found")
                    }
                    ErrorCode::ParticipantNotFound => {
                        (StatusCode::NOT_FOUND, "participant_not_found")
                    }
                    ErrorCode::NodeUnavailable => {
                        (StatusCode::SERVICE_UNAVAILABLE, "node_unavailable")
                    }
                    ErrorCode::InvalidNumber => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_number")
                    }
                    ErrorCode::ConferenceFull => (StatusCode::CONFLICT, "conference_full"),
                    ErrorCode::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
                    ErrorCode::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
                    ErrorCode::InvalidParams => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_params")
                    }
                    ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                    // Not 503: that invites a retry, and this command may have been done.
                    ErrorCode::NoAnswer => (StatusCode::GATEWAY_TIMEOUT, "no_answer"),
                    ErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
                };
                ApiError::new(status, code, b.message)
            }
        }
    }
}

/// `GET /v1/rpc`: upgrades to the JSON-RPC WebSocket.
pub async fn rpc(
    State(state): State<ApiState>,
    q: Result<super::input::NoQuery, ApiError>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Err(e) = q {
        return e.into_response();
    }
    let ws = match ws {
        Ok(ws) => ws,
        // RFC 6455 §4.2.2: a version this server does not speak is answered with the one it
        // does, so the client can retry with it.
        Err(WebSocketUpgradeRejection::InvalidWebSocketVersionHeader(_)) => {
            let mut r = ApiError::new(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                "only WebSocket version 13 (RFC 6455) is spoken here: send Sec-WebSocket-Version: 13",
            )
            .into_response();
            r.headers_mut().insert(
                "sec-websocket-version",
                axum::http::HeaderValue::from_static("13"),
            );
            // RFC 9110 §15.5.22: a 426 names the protocol to upgrade to; §7.8: with
            // `upgrade` in Connection, so that intermediaries do not pass it on.
            r.headers_mut().insert(
                axum::http::header::UPGRADE,
                axum::http::HeaderValue::from_static("websocket"),
            );
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("upgrade"),
            );
            return r;
        }
        Err(other) => return other.into_response(),
    };
    // Held for the connection's life: each open WebSocket has its tasks and queues.
    let Ok(slot) = state.rpc_connections.clone().try_acquire_owned() else {
        return ApiError::unavailable(
            "too_many_connections",
            "the controller has as many call-control connections as rpc.max_connections allows; try another controller or later",
            state.retry_after,
        )
        .into_response();
    };
    let limits = state.rpc_limits.clone();
    let control = state.control.clone();
    let series = crate::rpc::Series {
        errors: state.metrics.rpc_errors.clone(),
        events_lost: state.metrics.rpc_events_lost.clone(),
    };
    let open = state.metrics.rpc_connections.clone();
    let stop = state.rpc_stop.clone();
    // The protocol cap sits well above our own limit so an oversize message gets a JSON-RPC
    // error and the connection stays usable; only absurd frames close it. The frame cap is
    // the same: a frame is read whole before its message is measured, so a larger one
    // would hold its declared size in memory first.
    let cap = limits.max_message_size.saturating_mul(16).max(1 << 20);
    ws.max_message_size(cap)
        .max_frame_size(cap)
        .on_upgrade(move |socket| async move {
            /// Counts the connection open until it ends, however it ends.
            struct Open(prometheus::IntGauge);
            impl Drop for Open {
                fn drop(&mut self) {
                    self.0.dec();
                }
            }
            open.inc();
            let _open = Open(open);
            crate::rpc::serve(socket, control, limits, series, stop).await;
            drop(slot);
        })
}

fn body(b: Result<Json<Value>, JsonRejection>) -> Result<Map<String, Value>, ApiError> {
    match b.map_err(json_rejection)?.0 {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad_request("the body must be a JSON object")),
    }
}

/// The body with the path's values added. A body naming another one is refused: acting on
/// what the path says while the client meant what its body says would act on the wrong
/// conference or participant. The same value, repeated, is fine, and so is `null` (a client
/// library's unset field, as JSON-RPC takes it).
fn with(mut m: Map<String, Value>, extra: &[(&str, &str)]) -> Result<Value, ApiError> {
    for (k, v) in extra {
        if m.get(*k)
            .is_some_and(|given| !given.is_null() && given.as_str() != Some(*v))
        {
            return Err(ControlError::InvalidParams(format!(
                "`{k}` differs from the {k} the path names"
            ))
            .into());
        }
        m.insert((*k).to_string(), Value::String((*v).to_string()));
    }
    Ok(Value::Object(m))
}

/// The path's conference name, checked before anything else the request says: a name that
/// breaks the naming rules is `invalid_conference`, as on `GET /v1/conferences/{name}`.
fn checked(name: String) -> Result<String, ApiError> {
    conference_name(&name)?;
    Ok(name)
}

impl ParticipantPath {
    /// The path's names, checked before the query and body: what the path names wrong is
    /// what the answer says, whatever else is wrong with the request.
    fn checked(self) -> Result<Self, ApiError> {
        conference_name(&self.name)?;
        crate::control::participant_id(&self.id).map_err(ApiError::from)?;
        Ok(self)
    }
}

fn decode<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    crate::control::params(v).map_err(ApiError::from)
}

/// `GET /v1/conferences/{name}/participants`.
pub async fn list(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    q: Result<NoQuery, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let name = checked(name)?;
    q?;
    Ok(Json(
        state
            .control
            .participants(ConferenceRef { conference: name })
            .await?,
    ))
}

/// Query of `DELETE /v1/conferences/{name}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndQuery {
    /// Only this life of the conference (its claim's epoch).
    epoch: Option<u64>,
}

/// `DELETE /v1/conferences/{name}[?epoch=N]`: the owning node ends the conference (with an
/// epoch, only while it lives at that epoch).
pub async fn end(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    q: Result<Query<EndQuery>, QueryRejection>,
    input: Result<NoBody, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let name = checked(name)?;
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    input?;
    Ok(Json(
        state
            .control
            .end(EndParams {
                conference: name,
                epoch: q.epoch,
            })
            .await?,
    ))
}

/// `POST /v1/conferences/{name}/participants`: dial out; answers 202 with the call id.
pub async fn dialout(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    q: Result<NoQuery, ApiError>,
    b: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let name = checked(name)?;
    q?;
    let p: DialoutParams = decode(with(body(b)?, &[("conference", &name)])?)?;
    let control = state.control.clone();
    let d = to_the_end(&state, async move { control.dialout(p).await }).await??;
    // Statuses are not events: REST callers see the callee's `join` (participant = call id)
    // among the conference events; the JSON-RPC `dialout` streams every status. Dropping
    // the stream forgets the command.
    drop(d.notifications);
    Ok((StatusCode::ACCEPTED, Json(d.result)).into_response())
}

/// `POST /v1/conferences/{name}/play`: an announcement to the whole conference.
pub async fn play_all(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    q: Result<NoQuery, ApiError>,
    b: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = checked(name)?;
    q?;
    let mut m = body(b)?;
    // As JSON-RPC's `conference.play` refuses it (a null one is no participant).
    match m.get("participant") {
        Some(Value::Null) => {
            m.remove("participant");
        }
        Some(_) => {
            return Err(ControlError::InvalidParams(
                "participant: conference.play takes none; use /participants/{id}/play for one participant"
                    .into(),
            )
            .into())
        }
        None => {}
    }
    let p: PlayParams = decode(with(m, &[("conference", &name)])?)?;
    Ok(Json(state.control.play(p).await?))
}

/// Path of a participant route.
#[derive(Deserialize)]
pub struct ParticipantPath {
    name: String,
    id: String,
}

async fn simple(
    state: &ApiState,
    method: &str,
    p: ParticipantPath,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        state
            .control
            .participant(
                method,
                ParticipantRef {
                    conference: p.name,
                    participant: p.id,
                },
            )
            .await?,
    ))
}

/// `POST .../participants/{id}/mute`.
pub async fn mute(
    State(s): State<ApiState>,
    Path(p): Path<ParticipantPath>,
    input: Result<NoInput, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let p = p.checked()?;
    input?;
    simple(&s, "participant.mute", p).await
}

/// `POST .../participants/{id}/unmute`.
pub async fn unmute(
    State(s): State<ApiState>,
    Path(p): Path<ParticipantPath>,
    input: Result<NoInput, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let p = p.checked()?;
    input?;
    simple(&s, "participant.unmute", p).await
}

/// `POST .../participants/{id}/hold`.
pub async fn hold(
    State(s): State<ApiState>,
    Path(p): Path<ParticipantPath>,
    input: Result<NoInput, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let p = p.checked()?;
    input?;
    simple(&s, "participant.hold", p).await
}

/// `POST .../participants/{id}/unhold`.
pub async fn unhold(
    State(s): State<ApiState>,
    Path(p): Path<ParticipantPath>,
    input: Result<NoInput, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let p = p.checked()?;
    input?;
    simple(&s, "participant.unhold", p).await
}

/// `DELETE .../participants/{id}`: kick.
pub async fn kick(
    State(s): State<ApiState>,
    Path(p): Path<ParticipantPath>,
    input: Result<NoInput, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let p = p.checked()?;
    input?;
    simple(&s, "participant.kick", p).await
}

/// `POST .../participants/{id}/dtmf` with `{"digits"}`.
pub async fn dtmf(
    State(state): State<ApiState>,
    Path(p): Path<ParticipantPath>,
    q: Result<NoQuery, ApiError>,
    b: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let p = p.checked()?;
    q?;
    let v = with(body(b)?, &[("conference", &p.name), ("participant", &p.id)])?;
    let params: DtmfParams = decode(v)?;
    Ok(Json(state.control.dtmf(params).await?))
}

/// `POST .../participants/{id}/play` with `{"media"}`.
pub async fn play(
    State(state): State<ApiState>,
    Path(p): Path<ParticipantPath>,
    q: Result<NoQuery, ApiError>,
    b: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let p = p.checked()?;
    q?;
    let v = with(body(b)?, &[("conference", &p.name), ("participant", &p.id)])?;
    let params: PlayParams = decode(v)?;
    Ok(Json(state.control.play(params).await?))
}

/// `POST .../participants/{id}/move` with `{"to"}`.
pub async fn move_to(
    State(state): State<ApiState>,
    Path(p): Path<ParticipantPath>,
    q: Result<NoQuery, ApiError>,
    b: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let p = p.checked()?;
    q?;
    let v = with(body(b)?, &[("conference", &p.name), ("participant", &p.id)])?;
    let params: MoveParams = decode(v)?;
    let control = state.control.clone();
    Ok(Json(
        to_the_end(
            &state,
            async move { control.move_participant(params).await },
        )
        .await??,
    ))
}

/// Runs a command that claims a home in a task of its own, so it finishes even when the
/// client hangs up (hyper then drops the request's future): cut short between its claim and
/// the claim's hand-back after a node's refusal, it would leave an empty conference holding
/// a seat of the node's capacity. Such tasks outlive their requests, so they take a slot of
/// `http.max_running_commands` (a client hanging up at once and asking again would
/// otherwise start commands without bound), and a stop waits for them.
async fn to_the_end<T: Send + 'static>(
    state: &ApiState,
    command: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, ApiError> {
    let Ok(slot) = state.running.clone().try_acquire_owned() else {
        return Err(ApiError::unavailable(
            "too_many_commands",
            "this controller runs http.max_running_commands dial-outs and moves already; retry, or use another controller",
            state.retry_after,
        ));
    };
    tokio::spawn(async move {
        let done = command.await;
        drop(slot);
        done
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the command failed: {e}"),
        )
    })
}

/// `PATCH .../participants/{id}` with `{"endConferenceOnExit"?, "beepOnExit"?}`.
pub async fn update(
    State(state): State<ApiState>,
    Path(p): Path<ParticipantPath>,
    q: Result<NoQuery, ApiError>,
    b: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let p = p.checked()?;
    q?;
    let v = with(body(b)?, &[("conference", &p.name), ("participant", &p.id)])?;
    let params: UpdateParams = decode(v)?;
    Ok(Json(state.control.update(params).await.map(|r| {
        if r.is_null() {
            json!({"updated": true})
        } else {
            r
        }
    })?))
}
