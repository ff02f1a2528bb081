//! Scenario control over HTTP under `/_sim/`, for tests driving the `ari-sim` binary.
//!
//! | method and path | body | effect |
//! |---|---|---|
//! | `POST /_sim/dial-in` | [`DialIn`] as JSON | a caller dials in; answers `{"channel_id": ...}` |
//! | `POST /_sim/channels/{id}/hangup` | `{"cause": 16}` | the far end hangs up |
//! | `POST /_sim/channels/{id}/dtmf` | `{"digits": "1#"}` | the caller presses keys |
//! | `POST /_sim/channels/{id}/hold`, `.../unhold` | | the caller holds / resumes |
//! | `POST /_sim/channels/{id}/answer` | | the far end of a ringing call answers |
//! | `POST /_sim/originate-behavior` | `{"match": {"prefix": "PJSIP/5551"}, "outcome": "busy"}` | how originated calls end |
//! | `DELETE /_sim/originate-behavior` | | back to ring-and-answer |
//! | `POST /_sim/restart` | `{"downtime_ms": 500}` | Asterisk restarts (50 ms after answering) |
//! | `POST /_sim/stall` | `{"ms": 3000}` | Asterisk stops answering for a while |
//! | `POST /_sim/drop-websockets` | | event WebSockets drop, nothing else changes |
//! | `GET /_sim/snapshot` | | channels, bridges, apps, playbacks, recordings |
//! | `GET`/`DELETE /_sim/requests` | | the ARI request log |
//! | `GET`/`DELETE /_sim/events` | | every event delivered |
//!
//! Outcomes are `"busy"`, `"no_answer"`, `"congested"`, `"rejected"`, `"manual"` or
//! `{"answer_after": MILLISECONDS}`; matches are `"any"`, `{"exact": E}` or `{"prefix": P}`.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::scenario::{DialIn, EndpointMatch, Outcome};
use super::{AriSim, SimError};

fn error(e: SimError) -> Response {
    let code = match e {
        SimError::NoSuchChannel(_) => StatusCode::NOT_FOUND,
        SimError::Down => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    (code, Json(json!({"message": e.to_string()}))).into_response()
}

fn done(r: Result<(), SimError>) -> Response {
    match r {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(e),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Cause {
    cause: Option<i64>,
}

#[derive(Deserialize)]
struct Digits {
    digits: String,
}

#[derive(Deserialize)]
struct Behavior {
    #[serde(rename = "match")]
    matcher: EndpointMatch,
    outcome: Outcome,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Restart {
    downtime_ms: Option<u64>,
}

#[derive(Deserialize)]
struct Stall {
    ms: u64,
}

async fn dial_in(State(sim): State<AriSim>, Json(d): Json<DialIn>) -> Response {
    match sim.dial_in(d).await {
        Ok(id) => Json(json!({"channel_id": id})).into_response(),
        Err(e) => error(e),
    }
}

async fn hangup(
    State(sim): State<AriSim>,
    Path(id): Path<String>,
    body: Option<Json<Cause>>,
) -> Response {
    let cause = body.and_then(|b| b.0.cause).unwrap_or(16);
    done(sim.hangup_far_end(&id, cause).await)
}

async fn dtmf(
    State(sim): State<AriSim>,
    Path(id): Path<String>,
    Json(d): Json<Digits>,
) -> Response {
    done(sim.send_dtmf_from_caller(&id, &d.digits).await)
}

async fn hold(State(sim): State<AriSim>, Path(id): Path<String>) -> Response {
    done(sim.caller_hold(&id, true).await)
}

async fn unhold(State(sim): State<AriSim>, Path(id): Path<String>) -> Response {
    done(sim.caller_hold(&id, false).await)
}

async fn answer(State(sim): State<AriSim>, Path(id): Path<String>) -> Response {
    done(sim.answer_far_end(&id).await)
}

async fn set_behavior(State(sim): State<AriSim>, Json(b): Json<Behavior>) -> Response {
    sim.set_originate_behavior(b.matcher, b.outcome);
    StatusCode::NO_CONTENT.into_response()
}

async fn clear_behavior(State(sim): State<AriSim>) -> Response {
    sim.clear_originate_behaviors();
    StatusCode::NO_CONTENT.into_response()
}

async fn restart(State(sim): State<AriSim>, body: Option<Json<Restart>>) -> Response {
    let downtime = body
        .and_then(|b| b.0.downtime_ms)
        .map(Duration::from_millis);
    // The restart kills this very connection, so it starts once the answer is on its way.
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        sim.restart_with_downtime(downtime.unwrap_or(super::DEFAULT_DOWNTIME))
            .await;
    });
    StatusCode::NO_CONTENT.into_response()
}

async fn stall(State(sim): State<AriSim>, Json(s): Json<Stall>) -> Response {
    sim.stall(Duration::from_millis(s.ms));
    StatusCode::NO_CONTENT.into_response()
}

async fn drop_ws(State(sim): State<AriSim>) -> Response {
    sim.drop_websockets();
    StatusCode::NO_CONTENT.into_response()
}

async fn snapshot(State(sim): State<AriSim>) -> Response {
    Json(sim.snapshot()).into_response()
}

async fn requests(State(sim): State<AriSim>) -> Response {
    Json(sim.request_log()).into_response()
}

async fn clear_requests(State(sim): State<AriSim>) -> Response {
    sim.clear_request_log();
    StatusCode::NO_CONTENT.into_response()
}

async fn events(State(sim): State<AriSim>) -> Response {
    Json(sim.event_log()).into_response()
}

async fn clear_events(State(sim): State<AriSim>) -> Response {
    sim.clear_event_log();
    StatusCode::NO_CONTENT.into_response()
}

/// Routes of the control API, mounted beside `/ari`.
pub(crate) fn router(sim: AriSim) -> Router {
    Router::new()
        .route("/_sim/dial-in", post(dial_in))
        .route("/_sim/channels/{id}/hangup", post(hangup))
        .route("/_sim/channels/{id}/dtmf", post(dtmf))
        .route("/_sim/channels/{id}/hold", post(hold))
        .route("/_sim/channels/{id}/unhold", post(unhold))
        .route("/_sim/channels/{id}/answer", post(answer))
        .route(
            "/_sim/originate-behavior",
            post(set_behavior).delete(clear_behavior),
        )
        .route("/_sim/restart", post(restart))
        .route("/_sim/stall", post(stall))
        .route("/_sim/drop-websockets", post(drop_ws))
        .route("/_sim/snapshot", get(snapshot))
        .route("/_sim/requests", get(requests).delete(clear_requests))
        .route("/_sim/events", get(events).delete(clear_events))
        .with_state(sim)
}
