//! The IoT Hub service REST API (protocol.md §6): device and module identities, twins, direct
//! methods, statistics, twin queries and the C2D purge. Devices and modules share one
//! implementation; the routes only pick the module id out of the path.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth;
use super::error::{ApiError, after_commit};
use crate::hub::events;
use crate::hub::methods::MethodError;
use crate::hub::registry::{
    AuthSpec, Identity, Record, RegistryError, auth_from_json, etag_matches, identity_json, twin_json,
};
use crate::hub::secrets::Permissions;
use crate::hub::session::Outbound;
use crate::hub::state::{Hub, HubState};
use crate::iot::sas::Key;
use crate::iot::twin;

type ApiResult = Result<Response, ApiError>;

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::hub(400, 400012, "DeserializationError", format!("the request body is not valid: {e}")))
}

/// The identity a route names, or the hub's not-found error for it.
pub(super) fn find(hub: &HubState, device: &str, module: Option<&str>) -> Result<Arc<Identity>, ApiError> {
    hub.registry.get(device, module).ok_or_else(|| match module {
        Some(m) => ApiError::module_not_found(device, m),
        None => ApiError::device_not_found(device),
    })
}

fn if_match(headers: &HeaderMap) -> Option<&str> {
    headers.get("if-match").and_then(|v| v.to_str().ok())
}

/// Checks the caller, the api-version, then runs the operation.
pub(super) fn guard(hub: &HubState, headers: &HeaderMap, uri: &Uri, needed: Permissions) -> Result<(), ApiError> {
    auth::service(hub, headers, needed)?;
    auth::api_version(uri)
}

// Identities.

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct IdentityBody {
    device_id: Option<String>,
    module_id: Option<String>,
    status: Option<String>,
    status_reason: Option<String>,
    authentication: Option<Value>,
    capabilities: Option<Capabilities>,
    managed_by: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Capabilities {
    iot_edge: Option<bool>,
}

/// The authentication a request body asks for (`None` when it has none): Azure's 400
/// `ArgumentInvalid` naming the field when it is not one IoT Hub accepts.
fn body_auth(body: &IdentityBody, module: bool) -> Result<Option<AuthSpec>, ApiError> {
    match body.authentication.as_ref().filter(|a| !a.is_null()) {
        None => Ok(None),
        Some(a) => auth_from_json(a, module).map(Some).map_err(ApiError::bad_request),
    }
}

/// Creates or updates an identity from a `Device`/`Module` body; `if_match` as the header gives it.
pub(super) fn put_identity(
    hub: &HubState,
    device: &str,
    module: Option<&str>,
    if_match: Option<&str>,
    body: &Bytes,
) -> ApiResult {
    let body: IdentityBody = if body.is_empty() { IdentityBody::default() } else { parse_json(body)? };
    if body.device_id.as_deref().is_some_and(|d| d != device)
        || body.module_id.as_deref().is_some_and(|m| Some(m) != module)
    {
        return Err(ApiError::bad_request("the id in the body does not match the id in the path"));
    }
    let enabled = match body.status.as_deref() {
        None | Some("enabled") => true,
        Some("disabled") => false,
        Some(other) => return Err(ApiError::bad_request(format!("status `{other}` is neither enabled nor disabled"))),
    };
    let spec = body_auth(&body, module.is_some())?;
    let [primary, secondary] = spec.as_ref().map(|s| s.keys.clone()).unwrap_or_default();
    let now = crate::hub::clock::wall();
    if let Some(existing) = hub.registry.get(device, module) {
        let Some(cond) = if_match else {
            return Err(match module {
                Some(_) => ApiError::hub(
                    409,
                    409301,
                    "ModuleAlreadyExistsOnDevice",
                    "A module with this id already exists on the device",
                ),
                None => ApiError::hub(
                    409,
                    409001,
                    "DeviceAlreadyExists",
                    format!("A device with id {device} is already registered"),
                ),
            });
        };
        let mut st = existing.lock();
        if !etag_matches(cond, &st.record.etag()) {
            return Err(ApiError::precondition_failed());
        }
        let r = &mut st.record;
        if primary.is_some() || secondary.is_some() {
            let p = primary.unwrap_or_else(|| r.keys[0].clone());
            let s = secondary.unwrap_or_else(|| r.keys[1].clone());
            r.set_keys(p, s);
        }
        if let Some(spec) = &spec {
            r.auth = spec.auth.clone();
        }
        if r.enabled != enabled {
            r.enabled = enabled;
            r.status_updated = Some(now);
        }
        r.status_reason = body.status_reason.clone();
        let became_edge = body.capabilities.as_ref().and_then(|c| c.iot_edge).is_some_and(|e| e && !r.iot_edge);
        if let Some(edge) = body.capabilities.as_ref().and_then(|c| c.iot_edge) {
            r.iot_edge = edge;
        }
        if body.managed_by.is_some() {
            r.managed_by = body.managed_by.clone();
        }
        r.record_version += 1;
        hub.store.identity(&existing);
        if !enabled && let Some(s) = st.session.take() {
            s.send(Outbound::Close(crate::hub::session::CloseReason::IdentityRemoved));
        }
        let response = Json(identity_json(&existing, &st)).into_response();
        drop(st);
        if became_edge && module.is_none() {
            crate::hub::edge::ensure_system_modules(hub, device);
            hub.refresh_identity_gauges();
        }
        return Ok(response);
    }
    let mut record = Record::new(primary.unwrap_or_else(Key::generate), secondary.unwrap_or_else(Key::generate));
    record.enabled = enabled;
    record.status_reason = body.status_reason.clone();
    record.iot_edge = body.capabilities.as_ref().and_then(|c| c.iot_edge).unwrap_or(false);
    record.managed_by = body.managed_by.clone();
    record.auth = spec.map(|s| s.auth).unwrap_or_default();
    let created = hub.registry.create(device, module, record, now).map_err(|e| match e {
        RegistryError::DeviceNotFound => ApiError::device_not_found(device),
        RegistryError::InvalidId(_) => ApiError::bad_request(e.to_string()),
        // Created by a concurrent request since the lookup above: the same 409 as that path.
        _ if module.is_some() => ApiError::hub(
            409,
            409301,
            "ModuleAlreadyExistsOnDevice",
            "A module with this id already exists on the device",
        ),
        other => ApiError::hub(409, 409001, "DeviceAlreadyExists", other.to_string()),
    })?;
    // IoT Hub gives an Edge device its `$edgeAgent` and `$edgeHub` modules when it is created.
    if module.is_none() && created.lock().record.iot_edge {
        crate::hub::edge::ensure_system_modules(hub, device);
    }
    hub.refresh_identity_gauges();
    hub.store.identity(&created);
    let st = created.lock();
    Ok(Json(identity_json(&created, &st)).into_response())
}

fn get_identity(hub: &HubState, device: &str, module: Option<&str>) -> ApiResult {
    let identity = find(hub, device, module)?;
    let st = identity.lock();
    Ok(Json(identity_json(&identity, &st)).into_response())
}

pub(super) fn delete_identity(hub: &HubState, device: &str, module: Option<&str>, if_match: Option<&str>) -> ApiResult {
    let identity = find(hub, device, module)?;
    if let Some(cond) = if_match
        && !etag_matches(cond, &identity.lock().record.etag())
    {
        return Err(ApiError::precondition_failed());
    }
    hub.remove_identity(device, module);
    if matches!(module, None | Some("$edgeHub")) {
        crate::hub::edge::refresh(hub, device);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The identity a route names: `{id}`, and `{mid}` on module routes. One handler serves both.
pub struct Target {
    pub device: String,
    pub module: Option<String>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Target {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(mut params) = Path::<std::collections::HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("bad path: {e}")))?;
        let device = params.remove("id").ok_or_else(|| ApiError::bad_request("no device id in the path"))?;
        Ok(Target { device, module: params.remove("mid") })
    }
}

pub async fn identity_put(State(hub): State<Hub>, t: Target, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::REGISTRY_WRITE)?;
    after_commit(&hub, put_identity(&hub, &t.device, t.module.as_deref(), if_match(&headers), &body)).await
}

pub async fn identity_get(State(hub): State<Hub>, t: Target, headers: HeaderMap, uri: Uri) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::REGISTRY_READ)?;
    get_identity(&hub, &t.device, t.module.as_deref())
}

pub async fn identity_delete(State(hub): State<Hub>, t: Target, headers: HeaderMap, uri: Uri) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::REGISTRY_WRITE)?;
    after_commit(&hub, delete_identity(&hub, &t.device, t.module.as_deref(), if_match(&headers))).await
}

#[derive(Deserialize)]
pub struct ListQuery {
    top: Option<usize>,
}

pub async fn devices_list(
    State(hub): State<Hub>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::REGISTRY_READ)?;
    let top = q.top.unwrap_or(1000).min(1000);
    let list: Vec<Value> = hub.registry.devices(top).iter().map(|i| identity_json(i, &i.lock())).collect();
    Ok(Json(list).into_response())
}

pub async fn modules_list(State(hub): State<Hub>, Path(d): Path<String>, headers: HeaderMap, uri: Uri) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::REGISTRY_READ)?;
    find(&hub, &d, None)?;
    let list: Vec<Value> = hub.registry.modules(&d).iter().map(|i| identity_json(i, &i.lock())).collect();
    Ok(Json(list).into_response())
}

pub async fn statistics(State(hub): State<Hub>, headers: HeaderMap, uri: Uri) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::REGISTRY_READ)?;
    let (total, enabled) = hub.registry.device_counts();
    Ok(Json(json!({"totalDeviceCount": total, "enabledDeviceCount": enabled, "disabledDeviceCount": total - enabled}))
        .into_response())
}

/// `GET /statistics/service`: devices connected now (modules are not counted, as on IoT Hub).
pub async fn service_statistics(State(hub): State<Hub>, headers: HeaderMap, uri: Uri) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::SERVICE_CONNECT.union(Permissions::REGISTRY_READ))?;
    let connected = hub.registry.devices(usize::MAX).iter().filter(|d| d.lock().session.is_some()).count();
    Ok(Json(json!({"connectedDeviceCount": connected})).into_response())
}

// Twins.

#[derive(Deserialize, Default)]
struct TwinBody {
    tags: Option<Value>,
    properties: Option<TwinProperties>,
}

#[derive(Deserialize, Default)]
struct TwinProperties {
    desired: Option<Value>,
    reported: Option<Value>,
}

fn twin_get(hub: &HubState, device: &str, module: Option<&str>) -> ApiResult {
    let identity = find(hub, device, module)?;
    hub.metrics.twin_op("service_get", "ok");
    let st = identity.lock();
    Ok(Json(twin_json(&identity, &st)).into_response())
}

/// A service twin PATCH (merge) or PUT (`replace`), conditional on `if_match` when given.
pub(super) fn twin_update(
    hub: &HubState,
    device: &str,
    module: Option<&str>,
    if_match: Option<&str>,
    body: &Bytes,
    replace: bool,
) -> ApiResult {
    let identity = find(hub, device, module)?;
    let body: TwinBody = parse_json(body)?;
    let props = body.properties.unwrap_or_default();
    // A twin read back from the hub carries `$version` and `$metadata`; anything else in reported
    // is a write the service may not make, and is refused rather than dropped.
    let reported = props.reported.as_ref().map(twin::without_read_only);
    if reported.as_ref().is_some_and(|r| r.as_object().is_none_or(|m| !m.is_empty())) {
        return Err(ApiError::bad_request("reported properties can only be changed by the device"));
    }
    let desired = props.desired.as_ref().map(twin::without_read_only);
    let mut st = identity.lock();
    if let Some(cond) = if_match
        && !etag_matches(cond, &st.twin.etag())
    {
        return Err(ApiError::precondition_failed());
    }
    let now = crate::hub::clock::wall();
    let result = if replace {
        st.twin.replace_service(body.tags.as_ref(), desired.as_ref(), now)
    } else {
        st.twin.patch_service(body.tags.as_ref(), desired.as_ref(), now)
    };
    let op = if replace { "service_replace" } else { "service_patch" };
    let change = result.map_err(|e| {
        hub.metrics.twin_op(op, "rejected");
        // IoT Hub answers a twin it will not store with ArgumentInvalid, as on the device side.
        ApiError::bad_request(e.to_string())
    })?;
    hub.metrics.twin_op(op, "ok");
    let body = if replace {
        let (tags, props) = st.twin.service_parts();
        events::twin_body(st.twin.version, Some(tags), props.get("desired").cloned(), None)
    } else {
        let desired = change.as_ref().and_then(|c| c.patch.as_object()).map(|p| st.twin.desired_change(p));
        events::twin_body(st.twin.version, body.tags.clone(), desired, None)
    };
    let op = if replace { events::TwinOp::Replace } else { events::TwinOp::Update };
    hub.events.twin_changed(&identity, op, body, now);
    hub.store.identity(&identity);
    if let Some(change) = change {
        hub.notify_desired(&st, &change);
    }
    let response = Json(twin_json(&identity, &st)).into_response();
    drop(st);
    // Edge hub reads its routes from its own twin, whoever writes it.
    if module == Some("$edgeHub") {
        crate::hub::edge::refresh(hub, device);
    }
    Ok(response)
}

/// `POST /devices/{id}/applyConfigurationContent`: applies an IoT Edge deployment (REST
/// "Configuration - Apply On Edge Device": 204 No Content; 404 DeviceNotFound; 400 ArgumentInvalid
/// for content the emulator refuses, such as a route that does not parse, with its column).
pub async fn apply_configuration(
    State(hub): State<Hub>,
    Path(device): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::REGISTRY_WRITE)?;
    let content: Value = parse_json(&body)?;
    let applied = crate::hub::edge::apply(&hub, &device, &content).map_err(|e| match e {
        crate::hub::edge::ApplyError::DeviceNotFound => ApiError::device_not_found(&device),
        crate::hub::edge::ApplyError::Invalid(why) => ApiError::bad_request(why),
    });
    after_commit(&hub, applied.map(|()| StatusCode::NO_CONTENT.into_response())).await
}

pub async fn twin_get_route(State(hub): State<Hub>, t: Target, headers: HeaderMap, uri: Uri) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::SERVICE_CONNECT)?;
    twin_get(&hub, &t.device, t.module.as_deref())
}

pub async fn twin_patch_route(
    State(hub): State<Hub>,
    t: Target,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::SERVICE_CONNECT)?;
    after_commit(&hub, twin_update(&hub, &t.device, t.module.as_deref(), if_match(&headers), &body, false)).await
}

pub async fn twin_put_route(State(hub): State<Hub>, t: Target, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::SERVICE_CONNECT)?;
    after_commit(&hub, twin_update(&hub, &t.device, t.module.as_deref(), if_match(&headers), &body, true)).await
}

// Direct methods.

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MethodBody {
    method_name: String,
    #[serde(default)]
    payload: Value,
    response_timeout_in_seconds: Option<u64>,
    connect_timeout_in_seconds: Option<u64>,
}

/// The largest direct-method request payload, as JSON text: 128 KB.
const MAX_METHOD_PAYLOAD: usize = 128 * 1024;

/// Method names IoT Hub accepts: printable ASCII without separators or spaces.
fn valid_method_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_graphic() && !b"$()<>@,;:\\\"/[]?={}".contains(&b))
}

/// `hh:mm:ss` as in the `404103` body's `info.timeout`.
fn hms(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

async fn invoke(hub: &HubState, device: &str, module: Option<&str>, body: &Bytes) -> ApiResult {
    let body: MethodBody = parse_json(body)?;
    if !valid_method_name(&body.method_name) {
        return Err(ApiError::bad_request("methodName must be printable ASCII without spaces or $()<>@,;:\\\"/[]?={}"));
    }
    let response_timeout = body.response_timeout_in_seconds.unwrap_or(30);
    let connect_timeout = body.connect_timeout_in_seconds.unwrap_or(0);
    if !(5..=300).contains(&response_timeout) || connect_timeout > 300 {
        return Err(ApiError::bad_request("responseTimeoutInSeconds must be 5-300 and connectTimeoutInSeconds 0-300"));
    }
    let payload = Bytes::from(body.payload.to_string());
    // IoT Hub refuses a direct-method request payload above 128 KB (the method quotas table).
    if payload.len() > MAX_METHOD_PAYLOAD {
        return Err(ApiError::hub(
            413,
            413001,
            "MessageTooLarge",
            format!("the method payload is {} bytes; IoT Hub allows at most {MAX_METHOD_PAYLOAD}", payload.len()),
        ));
    }
    let identity = find(hub, device, module)?;
    let started = crate::hub::clock::now();
    let deliver = !hub.faults.drop_method();
    if !deliver {
        hub.metrics.faults_injected.with_label_values(&["method_drop"]).inc();
    }
    let result = hub
        .methods
        .invoke(
            &identity,
            &body.method_name,
            payload,
            Duration::from_secs(connect_timeout),
            Duration::from_secs(response_timeout),
            deliver,
        )
        .await;
    match result {
        Ok(resp) => {
            hub.metrics.method_latency.observe(started.elapsed().as_secs_f64());
            let payload = if resp.payload.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                match serde_json::from_slice::<Value>(&resp.payload) {
                    Ok(v) => v,
                    Err(_) => {
                        hub.metrics.method_call("bad_response");
                        return Err(ApiError::hub(
                            400,
                            400031,
                            "InvalidResponsePayload",
                            "the device answered with a payload that is not JSON",
                        ));
                    }
                }
            };
            hub.metrics.method_call("ok");
            let model = identity.lock().record.model_id.clone();
            if let (Some(check), Some(model)) = (&hub.model_check, model) {
                let found = check.command_response(&identity.key(), &model, &body.method_name, resp.status, &payload);
                hub.metrics.model_mismatches.with_label_values(&["command"]).inc_by(found as u64);
            }
            Ok(Json(json!({"status": resp.status, "payload": payload})).into_response())
        }
        Err(MethodError::NotOnline { waited }) => {
            hub.metrics.method_call("not_online");
            Err(ApiError::hub(
                404,
                404103,
                "DeviceNotOnline",
                "Timed out waiting for the device to connect and subscribe to methods",
            )
            .with_info(json!({"timeout": hms(waited)})))
        }
        Err(MethodError::Timeout) => {
            hub.metrics.method_call("timeout");
            Err(ApiError::hub(504, 504101, "GatewayTimeout", "Timed out waiting for the response from the device"))
        }
    }
}

pub async fn method_route(State(hub): State<Hub>, t: Target, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::SERVICE_CONNECT)?;
    invoke(&hub, &t.device, t.module.as_deref(), &body).await
}

// Query and C2D purge.

#[derive(Deserialize)]
struct QueryBody {
    query: String,
}

/// Twin queries (`hub::query`), paged with `x-ms-max-item-count` and `x-ms-continuation`.
pub async fn query(State(hub): State<Hub>, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::SERVICE_CONNECT.union(Permissions::REGISTRY_READ))?;
    let q: QueryBody = parse_json(&body)?;
    let query = crate::hub::query::Query::parse(&q.query).map_err(ApiError::bad_request)?;
    let page = headers
        .get("x-ms-max-item-count")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(100)
        .clamp(1, 1000);
    let start = headers.get("x-ms-continuation").and_then(|v| v.to_str().ok()?.parse::<usize>().ok()).unwrap_or(0);
    // The continuation is a position in the filtered list: stable while the registry is.
    let mut matched = hub
        .registry
        .all()
        .into_iter()
        .filter(|i| i.module_id.is_some() == query.modules)
        .map(|i| twin_json(&i, &i.lock()))
        .filter(|twin| query.matches(twin));
    let items: Vec<Value> = matched.by_ref().skip(start).take(page).collect();
    let more = matched.next().is_some();
    let mut resp = Json(items).into_response();
    resp.headers_mut().insert("x-ms-item-type", "Twin".parse().expect("static header"));
    if more {
        resp.headers_mut().insert("x-ms-continuation", (start + page).to_string().parse().expect("digits"));
    }
    Ok(resp)
}

pub async fn c2d_purge(State(hub): State<Hub>, Path(d): Path<String>, headers: HeaderMap, uri: Uri) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::SERVICE_CONNECT)?;
    let identity = find(&hub, &d, None)?;
    let purged = {
        let st = &mut *identity.lock();
        let removed = st.c2d.purge();
        for m in &removed {
            hub.c2d_outcome(&identity.device_id, st, m, crate::hub::feedback::Status::Purged);
        }
        removed.len()
    };
    hub.store.identity(&identity);
    hub.store
        .durable()
        .await
        .map_err(|_| ApiError::hub(500, 500001, "ServerError", "the change could not be stored"))?;
    Ok(Json(json!({"totalMessagesPurged": purged, "deviceId": d, "moduleId": null})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_follow_the_hub_rules() {
        assert!(valid_method_name("rebootDevice"));
        assert!(valid_method_name("thermostat2*getMaxMinReport"));
        for bad in ["", "a b", "a/b", "a$", "x{y}"] {
            assert!(!valid_method_name(bad), "{bad}");
        }
        assert_eq!(hms(Duration::from_secs(3725)), "01:02:05");
    }
}
