//! The console's emulator routes, on `fleetsim hub` or on a fleet that embeds the hub: registry
//! counts and connections, the telemetry the hub keeps per identity (a live tail, read after a
//! position), and the fault panel (the same knobs and checks as the emulator's own
//! `/emulator/faults`). A fleet aimed at another hub answers 404 `NoEmulator` on every route.

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{ApiError, ApiResult, Console, parse_body};
use crate::hub::faults::{FaultConfig, MAX_OUTAGE_SECS};
use crate::hub::state::HubState;

pub fn routes() -> Router<super::State> {
    Router::new()
        .route("/api/v1/emulator", get(summary))
        .route("/api/v1/emulator/telemetry", get(telemetry))
        .route("/api/v1/emulator/faults", get(faults_get).patch(faults_patch).delete(faults_clear))
        .route("/api/v1/emulator/faults/drop", post(drop_now))
        .route("/api/v1/emulator/faults/outage", post(outage))
}

fn hub(c: &Console) -> Result<&HubState, ApiError> {
    c.hub
        .as_deref()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "NoEmulator", "this fleet does not embed the emulator"))
}

fn faults_json(h: &HubState) -> Value {
    let mut v = serde_json::to_value(h.faults.get()).unwrap_or_default();
    v["outageSecondsLeft"] = json!(h.faults.outage_left().map_or(0, |d| d.as_secs().max(1)));
    v["active"] = json!(super::series::faults_active(h));
    v
}

/// The emulator's registry, connections, telemetry received and faults (`GET /api/v1/emulator`,
/// and `hub` in the overview).
pub fn summary_json(h: &HubState) -> Value {
    let (devices, modules) = h.registry.counts();
    json!({
        "hostname": h.hostname,
        "devices": devices,
        "modules": modules,
        "connections": {"hub": h.metrics.connections_hub.get(), "dps": h.metrics.connections_dps.get()},
        "telemetryReceived": h.metrics.telemetry_received.get(),
        "telemetryKeptPerIdentity": h.behaviour.telemetry_buffer,
        "faults": faults_json(h),
        "faultEvents": h.metrics.faults_summary(),
    })
}

async fn summary(State(c): State<super::State>) -> ApiResult {
    Ok(Json(summary_json(hub(&c)?)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TailQuery {
    device: String,
    module: Option<String>,
    after: Option<u64>,
}

/// What the hub kept of an identity's telemetry after position `after`, oldest first.
async fn telemetry(
    State(c): State<super::State>,
    q: Result<Query<TailQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let h = hub(&c)?;
    let module = q.module.as_deref().filter(|m| !m.is_empty());
    let identity = h.registry.get(&q.device, module).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "DeviceNotFound", format!("the hub has no identity {}", q.device))
    })?;
    let st = identity.lock();
    let messages: Vec<Value> = st.telemetry.since(q.after.unwrap_or(0)).map(|(seq, m)| m.to_json(seq)).collect();
    Ok(Json(json!({"received": st.telemetry.received, "messages": messages})).into_response())
}

async fn faults_get(State(c): State<super::State>) -> ApiResult {
    Ok(Json(faults_json(hub(&c)?)).into_response())
}

fn apply(h: &HubState, v: Value) -> Result<(), ApiError> {
    let c: FaultConfig = serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("bad faults: {e}")))?;
    c.validate().map_err(ApiError::bad_request)?;
    h.set_faults(c);
    tracing::info!(faults = ?h.faults.get(), "fault settings changed from the console");
    Ok(())
}

/// Changes only the knobs given; a `null` turns an optional knob off.
async fn faults_patch(State(c): State<super::State>, body: Bytes) -> ApiResult {
    let h = hub(&c)?;
    let patch: Map<String, Value> = parse_body(&body)?;
    let mut v = serde_json::to_value(h.faults.get()).unwrap_or_default();
    for (k, x) in patch {
        v[k] = x;
    }
    apply(h, v)?;
    Ok(Json(faults_json(h)).into_response())
}

/// Every fault off, an outage in progress ended.
async fn faults_clear(State(c): State<super::State>) -> ApiResult {
    let h = hub(&c)?;
    h.set_faults(FaultConfig::default());
    h.faults.start_outage(std::time::Duration::ZERO);
    tracing::info!("every fault turned off from the console");
    Ok(Json(faults_json(h)).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DropBody {
    fraction: Option<f64>,
}

async fn drop_now(State(c): State<super::State>, body: Bytes) -> ApiResult {
    let h = hub(&c)?;
    let req: DropBody = parse_body(&body)?;
    let fraction = req.fraction.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&fraction) {
        return Err(ApiError::bad_request("fraction must be between 0 and 1"));
    }
    let n = h.drop_connections(fraction);
    tracing::info!(connections = n, "fault: dropped connections from the console");
    Ok(Json(json!({"dropped": n})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutageBody {
    seconds: u64,
}

async fn outage(State(c): State<super::State>, body: Bytes) -> ApiResult {
    let h = hub(&c)?;
    let req: OutageBody = parse_body(&body)?;
    if req.seconds > MAX_OUTAGE_SECS {
        return Err(ApiError::bad_request(format!("seconds must be from 0 to {MAX_OUTAGE_SECS}")));
    }
    h.faults.start_outage(std::time::Duration::from_secs(req.seconds));
    if req.seconds > 0 {
        h.metrics.faults_injected.with_label_values(&["outage"]).inc();
    }
    Ok(Json(faults_json(h)).into_response())
}
