//! Routes only the emulator has, under `/emulator/`: sending a C2D message (Azure's services use
//! AMQP for that), reading back the telemetry an identity sent and its sequence-number summary, a
//! DPS registration's recorded request, and the fault injector's controls. They take a service
//! token like the rest of the service API: ServiceConnect to read, RegistryWrite for faults.

use std::time::Duration;

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
use crate::hub::faults::{FaultConfig, MAX_OUTAGE_SECS};
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
    let id = hub.send_c2d(&identity, message).map_err(|e| match e {
        C2dError::QueueFull => ApiError::hub(403, 403004, "DeviceMaximumQueueDepthExceeded", e.to_string()),
        C2dError::TooLarge => ApiError::hub(413, 413001, "MessageTooLarge", e.to_string()),
    })?;
    super::error::after_commit(&hub, Ok(Json(json!({"messageId": id})).into_response())).await
}

#[derive(Deserialize)]
pub struct EventsQuery {
    after: Option<u64>,
}

fn events(hub: &HubState, device: &str, module: Option<&str>, after: u64) -> ApiResult {
    let identity = super::service::find(hub, device, module)?;
    let st = identity.lock();
    let messages: Vec<Value> = st.telemetry.since(after).map(|(seq, m)| m.to_json(seq)).collect();
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

/// `GET /emulator/devices/{id}[/modules/{mid}]/modelcheck`: what the model check found for the
/// identity (`hub/model_check.rs`): 404 `ModelCheckOff` without a model directory, and `checked: 0`
/// for an identity that announced no model or sent nothing yet.
pub async fn model_check_route(State(hub): State<Hub>, t: super::service::Target, headers: HeaderMap) -> ApiResult {
    auth::service(&hub, &headers, Permissions::SERVICE_CONNECT)?;
    let Some(check) = &hub.model_check else {
        return Err(ApiError::hub(404, 404000, "ModelCheckOff", "the emulator has no models_dir: nothing is checked"));
    };
    let identity = super::service::find(&hub, &t.device, t.module.as_deref())?;
    let found = check.findings(&identity.key()).unwrap_or_else(|| crate::hub::model_check::Findings {
        model_id: identity.lock().record.model_id.clone().unwrap_or_default(),
        ..Default::default()
    });
    Ok(Json(found).into_response())
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

fn faults_body(hub: &HubState) -> Response {
    let outage = hub.faults.outage_left().map_or(0, |d| d.as_secs().max(1));
    let mut v = serde_json::to_value(hub.faults.get()).expect("serializable");
    v["outageSecondsLeft"] = json!(outage);
    Json(v).into_response()
}

fn parse_faults(v: Value) -> Result<FaultConfig, ApiError> {
    let c: FaultConfig = serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("bad faults: {e}")))?;
    c.validate().map_err(ApiError::bad_request)?;
    Ok(c)
}

pub async fn faults_get(State(hub): State<Hub>, headers: HeaderMap) -> ApiResult {
    auth::service(&hub, &headers, Permissions::SERVICE_CONNECT.union(Permissions::REGISTRY_WRITE))?;
    Ok(faults_body(&hub))
}

/// Replaces the fault settings; fields left out go back to their defaults (off).
pub async fn faults_put(State(hub): State<Hub>, headers: HeaderMap, body: Bytes) -> ApiResult {
    auth::service(&hub, &headers, Permissions::REGISTRY_WRITE)?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("not JSON: {e}")))?;
    hub.set_faults(parse_faults(v)?);
    tracing::info!(faults = ?hub.faults.get(), "fault settings replaced");
    Ok(faults_body(&hub))
}

/// Changes only the fields given.
pub async fn faults_patch(State(hub): State<Hub>, headers: HeaderMap, body: Bytes) -> ApiResult {
    auth::service(&hub, &headers, Permissions::REGISTRY_WRITE)?;
    let patch: Map<String, Value> =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("not a JSON object: {e}")))?;
    let mut v = serde_json::to_value(hub.faults.get()).expect("serializable");
    for (k, x) in patch {
        v[k] = x;
    }
    hub.set_faults(parse_faults(v)?);
    tracing::info!(faults = ?hub.faults.get(), "fault settings changed");
    Ok(faults_body(&hub))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DropBody {
    fraction: Option<f64>,
}

/// Drops a fraction of live connections now (all of them, a reconnect storm, by default).
pub async fn faults_drop(State(hub): State<Hub>, headers: HeaderMap, body: Bytes) -> ApiResult {
    auth::service(&hub, &headers, Permissions::REGISTRY_WRITE)?;
    let req: DropBody = if body.is_empty() {
        DropBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("bad drop request: {e}")))?
    };
    let fraction = req.fraction.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&fraction) {
        return Err(ApiError::bad_request("fraction must be between 0 and 1"));
    }
    let n = hub.drop_connections(fraction);
    tracing::info!(connections = n, "fault: dropped connections on request");
    Ok(Json(json!({"dropped": n})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutageBody {
    seconds: u64,
}

/// Refuses new connections (CONNACK 3) for the given seconds; 0 ends an outage.
pub async fn faults_outage(State(hub): State<Hub>, headers: HeaderMap, body: Bytes) -> ApiResult {
    auth::service(&hub, &headers, Permissions::REGISTRY_WRITE)?;
    let req: OutageBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("bad outage request: {e}")))?;
    if req.seconds > MAX_OUTAGE_SECS {
        return Err(ApiError::bad_request(format!("seconds must be from 0 to {MAX_OUTAGE_SECS}")));
    }
    hub.faults.start_outage(Duration::from_secs(req.seconds));
    if req.seconds > 0 {
        hub.metrics.faults_injected.with_label_values(&["outage"]).inc();
    }
    Ok(faults_body(&hub))
}

#[derive(Deserialize)]
pub struct SequenceQuery {
    run: String,
}

/// Totals over every identity whose latest stamped run is `run`, and the identities with gaps.
pub async fn sequence_summary(State(hub): State<Hub>, Query(q): Query<SequenceQuery>, headers: HeaderMap) -> ApiResult {
    auth::service(&hub, &headers, Permissions::SERVICE_CONNECT)?;
    let (mut identities, mut unique, mut duplicates, mut gaps, mut routed_away) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut with_gaps = Vec::new();
    for identity in hub.registry.all() {
        let st = identity.lock();
        let Some(t) = st.sequence.as_ref().filter(|t| t.run == q.run) else { continue };
        identities += 1;
        unique += t.unique;
        duplicates += t.duplicates;
        gaps += t.gaps();
        routed_away += t.routed_away;
        if t.gaps() > 0 && with_gaps.len() < 100 {
            with_gaps.push(json!({
                "deviceId": identity.device_id,
                "moduleId": identity.module_id,
                "gaps": t.gaps(),
                "highest": t.highest,
            }));
        }
    }
    Ok(Json(json!({
        "run": q.run,
        "identities": identities,
        "unique": unique,
        "duplicates": duplicates,
        "gaps": gaps,
        "routedAway": routed_away,
        "withGaps": with_gaps,
    }))
    .into_response())
}
