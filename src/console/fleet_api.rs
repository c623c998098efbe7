//! The console's fleet routes: the overview, the time series (whole ring and live stream), the
//! devices table and one identity's page, and the actions on an identity (invoke a command, set a
//! desired property, send C2D, reboot, disconnect). Shapes and errors: docs/console.md.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::series::{buckets, quantile};
use super::{ApiError, ApiResult, Console, parse_body, unix_ms};
use crate::device::view::{Control, DeviceView, Filter};
use crate::metrics::DeviceState;

/// The most rows a devices page returns.
pub const MAX_PAGE: usize = 500;
/// The longest a console reboot may keep a device down.
pub const MAX_REBOOT_SECS: u64 = 3600;

pub fn routes() -> Router<super::State> {
    Router::new()
        .route("/api/v1/overview", get(overview))
        .route("/api/v1/series", get(series))
        .route("/api/v1/stream", get(stream))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{device}", get(device))
        .route("/api/v1/devices/{device}/modules/{module}", get(module))
        .route("/api/v1/devices/{device}/actions/{action}", post(device_action))
        .route("/api/v1/devices/{device}/modules/{module}/actions/{action}", post(module_action))
}

fn percentiles(h: &prometheus::Histogram) -> Value {
    let b = buckets(h);
    let ms = |q: f64| quantile(&b, &[], q).map(|s| (s * 10_000.0).round() / 10.0);
    json!({"count": h.get_sample_count(), "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99)})
}

/// The overview: everything `fleetsim status` prints. The fleet's part is there when the console
/// runs a fleet (`"fleet": true`), the emulator's summary (`hub`) when it has an emulator.
pub fn overview_json(c: &Console) -> Value {
    let elapsed = c.started.elapsed();
    let mut v = match &c.fleet {
        Some(f) => fleet_overview(c, f, elapsed),
        None => json!({}),
    };
    v["uptimeSecs"] = json!(elapsed.as_secs());
    v["startedAt"] = json!(unix_ms(c.started_at));
    v["fleet"] = json!(c.fleet.is_some());
    v["emulator"] = json!(c.hub.is_some());
    v["hub"] = c.hub.as_deref().map_or(Value::Null, super::emulator::summary_json);
    v
}

fn fleet_overview(c: &Console, f: &super::Fleet, elapsed: Duration) -> Value {
    let m = &f.shared.metrics;
    let total = f.total.load(Ordering::Relaxed);
    let once = m.ever_connected.get();
    let mut states = Map::new();
    for s in DeviceState::ALL {
        states.insert(s.label().to_owned(), json!(m.state_count(s)));
    }
    let latest = c.series.latest();
    let rates = json!({
        "generatedPerSec": latest.as_ref().map_or(0.0, |s| s.generated_per_sec),
        "ackedPerSec": latest.as_ref().map_or(0.0, |s| s.acked_per_sec),
        "droppedPerSec": latest.as_ref().map_or(0.0, |s| s.dropped_per_sec),
        "retransmitsPerSec": latest.as_ref().map_or(0.0, |s| s.retransmits_per_sec),
    });
    json!({
        "identities": total,
        "ramp": {
            "connectedOnce": once,
            "total": total,
            "fraction": if total == 0 { 1.0 } else { (once as f64 / total as f64).min(1.0) },
        },
        "states": states,
        "telemetry": {
            "generated": m.telemetry_generated.get(),
            "sent": m.telemetry_sent.get(),
            "acked": m.telemetry_acked.get(),
            "dropped": m.dropped_count(),
            "retransmitted": m.telemetry_retransmits.get(),
            "queued": m.telemetry_queued.get(),
        },
        "rates": rates,
        "latencyMs": {
            "puback": percentiles(&m.puback_seconds),
            "connect": percentiles(&m.connect_seconds),
            "method": percentiles(&m.method_seconds),
        },
        "reconnects": m.reconnect_counts(),
        "errors": m.error_counts(),
        "ci": f.ci.as_ref().map(|ci| ci_standing(f, ci, elapsed)),
    })
}

/// CI mode's thresholds and the figures that can be judged while running; the rest are judged at
/// the end of the run (their `value` is null here).
fn ci_standing(f: &super::Fleet, ci: &crate::config::ci::CiConfig, elapsed: Duration) -> Value {
    let m = &f.shared.metrics;
    let t = &ci.thresholds;
    let total = f.total.load(Ordering::Relaxed) as i64;
    let mut checks = Vec::new();
    let mut check = |name: &str, limit: Value, value: Value, ok: Option<bool>| {
        checks.push(json!({"name": name, "limit": limit, "value": value, "ok": ok}));
    };
    if let Some(max) = t.max_dropped {
        let d = m.dropped_count();
        check("max_dropped", json!(max), json!(d), Some(d <= max));
    }
    if let Some(within) = t.all_connected_within {
        let once = m.ever_connected.get();
        let ok = if once >= total {
            Some(true)
        } else if elapsed > within {
            Some(false)
        } else {
            None
        };
        check("all_connected_within", json!(within.as_secs_f64()), json!(once), ok);
    }
    if let Some(max) = t.max_lost {
        check("max_lost", json!(max), Value::Null, None);
    }
    if let Some(max) = t.max_unaccounted {
        check("max_unaccounted", json!(max), Value::Null, None);
    }
    if let Some(max) = t.max_stuck {
        check("max_stuck", json!(max), Value::Null, None);
    }
    if let Some(p99) = t.method_p99 {
        check("method_p99", json!(p99.as_secs_f64()), Value::Null, None);
    }
    if let Some(rate) = t.max_error_rate {
        check("max_error_rate", json!(rate), Value::Null, None);
    }
    json!({
        "durationSecs": ci.duration.as_secs_f64(),
        "settleSecs": ci.settle.as_secs_f64(),
        "elapsedSecs": elapsed.as_secs_f64(),
        "fraction": (elapsed.as_secs_f64() / ci.duration.as_secs_f64().max(0.001)).min(1.0),
        "checks": checks,
    })
}

async fn overview(State(c): State<super::State>) -> impl IntoResponse {
    Json(overview_json(&c))
}

async fn series(State(c): State<super::State>) -> impl IntoResponse {
    let all = c.series.all();
    let samples: Vec<&super::series::Sample> = all.iter().map(|s| &**s).collect();
    Json(json!({"periodSecs": super::series::PERIOD.as_secs(), "samples": samples}))
}

/// Server-sent events: one `sample` event per new sample. A client that falls behind skips what
/// it missed rather than slowing the sampler.
async fn stream(State(c): State<super::State>) -> impl IntoResponse {
    let rx = c.series.subscribe();
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(s) => {
                    let e = Event::default().event("sample").json_data(&*s).unwrap_or_default();
                    return Some((Ok::<_, Infallible>(e), rx));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesQuery {
    prefix: Option<String>,
    template: Option<String>,
    state: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

fn parse_state(s: &str) -> Result<DeviceState, ApiError> {
    DeviceState::ALL.into_iter().find(|x| x.label() == s).ok_or_else(|| {
        let known: Vec<_> = DeviceState::ALL.iter().map(|s| s.label()).collect();
        ApiError::bad_request(format!("state must be one of {}", known.join(", ")))
    })
}

fn row(v: &DeviceView) -> Value {
    let c = v.counters();
    json!({
        "id": &*v.key,
        "deviceId": &*v.device_id,
        "moduleId": v.module_id.as_deref(),
        "template": &*v.template,
        "state": v.state().label(),
        "credentials": v.credentials,
        "transport": v.transport,
        "generated": c.generated,
        "acked": c.acked,
    })
}

async fn devices(
    State(c): State<super::State>,
    q: Result<Query<DevicesQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let f = c.fleet()?;
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!("limit must be from 1 to {MAX_PAGE}")));
    }
    let filter = Filter {
        prefix: q.prefix.filter(|p| !p.is_empty()),
        template: q.template.filter(|t| !t.is_empty()),
        state: q.state.filter(|s| !s.is_empty()).as_deref().map(parse_state).transpose()?,
    };
    let offset = q.offset.unwrap_or(0);
    let page = f.views.page(&filter, offset, limit);
    Ok(Json(json!({
        "total": page.total,
        "offset": offset,
        "limit": limit,
        "items": page.items.iter().map(|v| row(v)).collect::<Vec<_>>(),
        "templates": f.views.templates().iter().map(|t| t.to_string()).collect::<Vec<_>>(),
    }))
    .into_response())
}

fn find(c: &Console, device: &str, module: Option<&str>) -> Result<Arc<DeviceView>, ApiError> {
    let key = crate::iot::username::client_id(device, module);
    c.fleet()?.views.get(&key).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "DeviceNotFound", format!("the fleet runs no identity {key}"))
    })
}

async fn detail(c: &Console, device: &str, module: Option<&str>) -> ApiResult {
    let v = find(c, device, module)?;
    let history: Vec<Value> = v.history().iter().map(|(t, s)| json!({"at": unix_ms(*t), "state": s.label()})).collect();
    let telemetry: Vec<Value> = v
        .last_telemetry()
        .iter()
        .map(|s| match std::str::from_utf8(&s.body) {
            Ok(text) => json!({"at": unix_ms(s.at), "body": text}),
            Err(_) => json!({"at": unix_ms(s.at), "bytes": s.body.len()}),
        })
        .collect();
    let commands: Vec<Value> =
        v.last_commands().iter().map(|r| json!({"at": unix_ms(r.at), "name": r.name, "status": r.status})).collect();
    let twin = match &c.fleet()?.shared.service {
        Some(s) => match tokio::time::timeout(Duration::from_secs(10), s.twin(device, module)).await {
            Ok(Ok(t)) => json!({
                "version": t.get("version"),
                "desired": t.pointer("/properties/desired"),
                "reported": t.pointer("/properties/reported"),
            }),
            Ok(Err(e)) => json!({"error": e.to_string()}),
            Err(_) => json!({"error": "the hub did not answer the twin request within 10 s"}),
        },
        None => json!({"error": "no service connection string: the fleet cannot read twins"}),
    };
    Ok(Json(json!({
        "id": &*v.key,
        "deviceId": &*v.device_id,
        "moduleId": v.module_id.as_deref(),
        "template": &*v.template,
        "state": v.state().label(),
        "credentials": {"path": v.credentials, "transport": v.transport},
        "history": history,
        "counters": v.counters(),
        "lastTelemetry": telemetry,
        "commands": commands,
        "twin": twin,
    }))
    .into_response())
}

async fn device(State(c): State<super::State>, Path(device): Path<String>) -> ApiResult {
    detail(&c, &device, None).await
}

async fn module(State(c): State<super::State>, Path((device, module)): Path<(String, String)>) -> ApiResult {
    detail(&c, &device, Some(&module)).await
}

async fn device_action(
    State(c): State<super::State>,
    Path((device, action)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    act(&c, &device, None, &action, &body).await
}

async fn module_action(
    State(c): State<super::State>,
    Path((device, module, action)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult {
    act(&c, &device, Some(&module), &action, &body).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct InvokeBody {
    method: String,
    #[serde(default)]
    payload: Value,
    response_timeout_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DesiredBody {
    patch: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct C2dBody {
    #[serde(default)]
    body: Value,
    #[serde(default)]
    properties: Map<String, Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RebootBody {
    downtime_secs: Option<u64>,
}

fn service_error(e: crate::service::ServiceError) -> ApiError {
    match e.status() {
        0 => ApiError::new(StatusCode::BAD_GATEWAY, "HubUnreachable", e.to_string()),
        s => ApiError::new(StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY), "HubRefused", e.to_string()),
    }
}

fn no_service() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "NoServiceClient",
        "the fleet has no service connection string: it cannot invoke methods or set desired properties",
    )
}

async fn act(c: &Console, device: &str, module: Option<&str>, action: &str, body: &[u8]) -> ApiResult {
    let f = c.fleet()?;
    let v = find(c, device, module)?;
    match action {
        "invoke" => {
            let req: InvokeBody = parse_body(body)?;
            if req.method.is_empty() || req.method.len() > 128 {
                return Err(ApiError::bad_request("method must be 1 to 128 characters"));
            }
            let timeout = Duration::from_secs(req.response_timeout_secs.unwrap_or(10).clamp(5, 300));
            let service = f.shared.service.as_ref().ok_or_else(no_service)?;
            let t0 = std::time::Instant::now();
            let r = service.invoke(device, module, &req.method, &req.payload, timeout, Duration::from_secs(0)).await;
            let latency = t0.elapsed();
            let r = r.map_err(service_error)?;
            f.shared.metrics.method_seconds.observe(latency.as_secs_f64());
            Ok(Json(json!({"status": r.status, "payload": r.payload, "latencyMs": latency.as_millis() as u64}))
                .into_response())
        }
        "desired" => {
            let req: DesiredBody = parse_body(body)?;
            if req.patch.is_empty() {
                return Err(ApiError::bad_request("patch must name at least one property"));
            }
            let service = f.shared.service.as_ref().ok_or_else(no_service)?;
            let twin = service.patch_desired(device, module, &Value::Object(req.patch)).await.map_err(service_error)?;
            Ok(Json(json!({"desiredVersion": twin.pointer("/properties/desired/$version")})).into_response())
        }
        "c2d" => {
            let req: C2dBody = parse_body(body)?;
            let Some(hub) = &c.hub else {
                return Err(ApiError::new(
                    StatusCode::NOT_IMPLEMENTED,
                    "NeedsEmbeddedHub",
                    "the console sends C2D through the embedded emulator; use `fleetsim c2d` otherwise",
                ));
            };
            if module.is_some() {
                return Err(ApiError::bad_request("modules have no cloud-to-device messages"));
            }
            let identity = hub.registry.get(device, None).ok_or_else(|| {
                ApiError::new(StatusCode::NOT_FOUND, "DeviceNotFound", format!("the hub has no device {device} yet"))
            })?;
            let payload = match req.body {
                Value::Null => Bytes::new(),
                Value::String(s) => Bytes::from(s),
                other => Bytes::from(other.to_string()),
            };
            let properties = req
                .properties
                .into_iter()
                .map(|(k, v)| (k, v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())))
                .collect();
            let message = crate::hub::c2d::NewC2d {
                body: payload,
                message_id: None,
                correlation_id: None,
                user_id: None,
                content_type: None,
                content_encoding: None,
                ack: None,
                ttl: None,
                properties,
            };
            let id = hub
                .send_c2d(&identity, message)
                .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, "C2dRefused", e.to_string()))?;
            Ok(Json(json!({"messageId": id})).into_response())
        }
        "reboot" | "disconnect" => {
            let what = if action == "reboot" {
                let req: RebootBody = parse_body(body)?;
                let secs = req.downtime_secs.unwrap_or(10);
                if secs > MAX_REBOOT_SECS {
                    return Err(ApiError::bad_request(format!("downtimeSecs must be from 0 to {MAX_REBOOT_SECS}")));
                }
                Control::Reboot(Duration::from_secs(secs))
            } else {
                Control::Disconnect
            };
            if !v.request(what) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "NotConnected",
                    format!("{} is {}, not connected", v.key, v.state().label()),
                ));
            }
            Ok((StatusCode::ACCEPTED, Json(json!({"accepted": action}))).into_response())
        }
        other => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NoSuchAction",
            format!("no action {other:?}: invoke, desired, c2d, reboot or disconnect"),
        )),
    }
}
