//! Routes only the emulator has, under `/emulator/`: sending a C2D message (Azure's services use
//! AMQP for that), reading back the telemetry an identity sent, and a DPS registration's recorded
//! request. They take a service token with ServiceConnect, like the rest of the service API.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::auth;
use super::error::ApiError;
use crate::hub::c2d::{C2dError, NewC2d};
use crate::hub::secrets::Permissions;
use crate::hub::state::{Hub, HubState};

type ApiResult = Result<Response, ApiError>;

/// A C2D message: `body` is sent as is when it is a string, as JSON text otherwise.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct C2dBody {
    body: Option<Value>,
    message_id: Option<String>,
    correlation_id: Option<String>,
    user_id: Option<String>,
    content_type: Option<String>,
    content_encoding: Option<String>,
    ack: Option<String>,
    ttl_seconds: Option<u64>,
    #[serde(default)]
    properties: Map<String, Value>,
}

pub async fn c2d_send(State(hub): State<Hub>, Path(d): Path<String>, headers: HeaderMap, body: Bytes) -> ApiResult {
    auth::service(&hub, &headers, Permissions::SERVICE_CONNECT)?;
    let req: C2dBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("bad C2D message: {e}")))?;
    if let Some(ack) = &req.ack
        && !["none", "positive", "negative", "full"].contains(&ack.to_ascii_lowercase().as_str())
    {
        return Err(ApiError::bad_request("ack must be none, positive, negative or full"));
    }
    let payload = match req.body {
        None => Bytes::new(),
        Some(Value::String(s)) => Bytes::from(s),
        Some(other) => Bytes::from(other.to_string()),
    };
    if payload.len() > 64 * 1024 {
        return Err(ApiError::hub(413, 413001, "MessageTooLarge", "a C2D message is at most 64 KB"));
    }
    let properties = req
        .properties
        .into_iter()
        .map(|(k, v)| (k, v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())))
        .collect();
    let message = NewC2d {
        body: payload,
        message_id: req.message_id,
        correlation_id: req.correlation_id,
        user_id: req.user_id,
        content_type: req.content_type,
        content_encoding: req.content_encoding,
        ack: req.ack,
        ttl: req.ttl_seconds.map(Duration::from_secs),
        properties,
    };
    let identity = super::service::find(&hub, &d, None)?;
    let mut st = identity.lock();
    let b = &hub.behaviour;
    let id = st
        .c2d
        .enqueue(&d, message, b.c2d_max_queue, Duration::from_secs(b.c2d_ttl_secs), Instant::now())
        .map_err(|e| match e {
            C2dError::QueueFull => ApiError::hub(403, 403004, "DeviceMaximumQueueDepthExceeded", e.to_string()),
        })?;
    hub.metrics.c2d("sent");
    hub.push_c2d(&identity, &mut st);
    Ok(Json(json!({"messageId": id})).into_response())
}

#[derive(Deserialize)]
pub struct EventsQuery {
    after: Option<u64>,
}

fn events(hub: &HubState, device: &str, module: Option<&str>, after: u64) -> ApiResult {
    let identity = super::service::find(hub, device, module)?;
    let st = identity.lock();
    let messages: Vec<Value> = st.telemetry.since(after).map(|m| m.to_json()).collect();
    Ok(Json(json!({"received": st.telemetry.received, "messages": messages})).into_response())
}

pub async fn events_route(
    State(hub): State<Hub>,
    t: super::service::Target,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult {
    auth::service(&hub, &headers, Permissions::SERVICE_CONNECT)?;
    events(&hub, &t.device, t.module.as_deref(), q.after.unwrap_or(0))
}

pub async fn dps_registration(
    State(hub): State<Hub>,
    Path(reg): Path<String>,
    headers: HeaderMap,
    _uri: Uri,
) -> ApiResult {
    auth::service(&hub, &headers, Permissions::ENROLLMENT_WRITE.union(Permissions::SERVICE_CONNECT))?;
    let state = hub.dps.registration_state(&reg);
    let payload = hub.dps.registration_payload(&reg);
    if state.is_none() && payload.is_none() {
        return Err(ApiError::dps(404, 404201, "the device has not registered"));
    }
    Ok(Json(json!({"registrationState": state, "requestPayload": payload})).into_response())
}
