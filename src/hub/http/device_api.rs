//! The IoT Hub device REST API, for devices that use HTTPS instead of MQTT (Microsoft's REST
//! reference, "Device - Send Device Event", "Receive/Complete/Reject/Abandon Device Bound
//! Notification"): telemetry, single or batched, and C2D polling settled by lock token. Every
//! decision is `hub/devices.rs`'s; this file maps headers and bodies to it and its outcomes to
//! statuses and Azure's error bodies. Twins and direct methods have no device HTTPS API in IoT
//! Hub (devices use MQTT or AMQP for them), so a device token reaching the service routes for
//! them is refused there, as any token without a policy is.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::auth;
use super::error::ApiError;
use crate::hub::c2d::{C2dMessage, Settle};
use crate::hub::devices::{self, D2c};
use crate::hub::metrics::Refusal;
use crate::hub::registry::Identity;
use crate::hub::state::{Hub, HubState};
use crate::hub::x509::ClientChain;
use crate::iot::https_headers;
use crate::iot::property_bag::PropertyBag;
use crate::iot::sas::SasToken;
use crate::iot::time::iso8601;

type ApiResult = Result<Response, ApiError>;

/// The content type of a batch of messages (the Node and C SDKs send it for `sendEventBatch`).
const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.json";

/// Bag keys a device does not set on its own telemetry over HTTPS: the SDKs send `iothub-to`
/// (the path again) on every request, and acknowledgements belong to C2D messages.
const NOT_FROM_DEVICES: [&str; 2] = ["$.to", "iothub-ack"];

/// The device, and the module if any, a route names.
struct Who {
    device: String,
    module: Option<String>,
}

fn who(mut params: HashMap<String, String>) -> Result<Who, ApiError> {
    let device = params.remove("id").ok_or_else(|| ApiError::bad_request("no device id in the path"))?;
    Ok(Who { device, module: params.remove("mid") })
}

fn busy(r: Refusal) -> ApiError {
    match r {
        Refusal::Throttled => {
            ApiError::hub(429, 429001, "ThrottlingException", "the hub is throttling this device (injected fault)")
                .with_retry_after(1)
        }
        _ => ApiError::hub(503, 503001, "ServiceUnavailable", "the hub is unavailable (injected outage)"),
    }
}

/// Authenticates the request's `Authorization` SAS token for the identity its path names: 401
/// `IotHubUnauthorizedAccess` for a missing, malformed, wrongly signed or expired token; 404
/// `DeviceNotFound` / `ModuleNotFound` for an identity that does not exist or is disabled (the
/// SDKs' DeviceNotFound covers both). A request without a token on a connection that presented a
/// client certificate authenticates an X.509 identity by it (`devices::authenticate_x509`; 401
/// when the certificate does not admit it). Then admission: 429 or 503 under injected faults.
fn authenticate(
    hub: &HubState,
    headers: &HeaderMap,
    chain: Option<&ClientChain>,
    w: &Who,
) -> Result<std::sync::Arc<Identity>, ApiError> {
    let not_found = || match &w.module {
        Some(m) => ApiError::module_not_found(&w.device, m),
        None => ApiError::device_not_found(&w.device),
    };
    let header = headers.get("authorization").and_then(|v| v.to_str().ok());
    let a = match (header, chain) {
        (None, Some(chain)) => {
            let now = crate::hub::clock::wall();
            devices::authenticate_x509(hub, &hub.hostname, &w.device, w.module.as_deref(), Some(chain), now).map_err(
                |r| match r {
                    Refusal::UnknownIdentity | Refusal::IdentityDisabled => not_found(),
                    _ => ApiError::unauthorized("the client certificate is not valid for this device"),
                },
            )?
        }
        (header, _) => {
            let header = header.ok_or_else(|| ApiError::unauthorized("no Authorization header with a SAS token"))?;
            let token = SasToken::parse(header).map_err(|e| ApiError::unauthorized(e.to_string()))?;
            let host = token.resource.split('/').next().unwrap_or_default();
            devices::authenticate(hub, host, &w.device, w.module.as_deref(), header, crate::hub::clock::wall())
                .map_err(|r| match r {
                    Refusal::UnknownIdentity | Refusal::IdentityDisabled => not_found(),
                    Refusal::ExpiredToken => ApiError::unauthorized("the SAS token has expired"),
                    _ => ApiError::unauthorized("the SAS token is not valid for this device"),
                })?
        }
    };
    devices::admit(hub).map_err(busy)?;
    Ok(a.identity)
}

/// The body, within the listener's body bound (a batch's JSON, base64 and all); past it, 413
/// `MessageTooLarge` before anything is parsed.
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, super::MAX_BODY).await.map_err(|_| too_large())
}

fn too_large() -> ApiError {
    ApiError::hub(413, 413001, "MessageTooLarge", "a message or batch is at most 256 KB (body and properties)")
}

/// Maps one property name (a header, or a batch property) into the bag as
/// `iot::https_headers` names them (the rule the fleet's HTTPS devices follow too): system
/// properties to their keys, `iothub-app-{name}` to `{name}`. Other names are not message
/// properties (transport headers) and are skipped; `iothub-app-` without a name is refused.
fn map_property(bag: &mut PropertyBag, name: &str, value: &str) -> Result<(), ApiError> {
    if name.eq_ignore_ascii_case(https_headers::APP_PREFIX) {
        return Err(ApiError::bad_request("an application property needs a name after iothub-app-"));
    }
    if let Some(key) = https_headers::property_key(name).filter(|k| !NOT_FROM_DEVICES.contains(&k.as_str())) {
        bag.push(key, value);
    }
    Ok(())
}

fn header_bag(headers: &HeaderMap) -> Result<PropertyBag, ApiError> {
    let mut bag = PropertyBag::default();
    for (name, value) in headers {
        let name = name.as_str();
        if https_headers::property_key(name).is_none() && name != https_headers::APP_PREFIX {
            continue;
        }
        let value = std::str::from_utf8(value.as_bytes())
            .map_err(|_| ApiError::bad_request(format!("the value of header {name} is not UTF-8")))?;
        map_property(&mut bag, name, value)?;
    }
    Ok(bag)
}

/// One message of a batch: `body` base64 unless `base64Encoded` is false (the Node SDK omits the
/// field and always encodes; the C SDK sends `true`), `properties` named as the headers are.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BatchItem {
    body: String,
    base64_encoded: Option<bool>,
    #[serde(default)]
    properties: serde_json::Map<String, Value>,
}

fn parse_batch(body: &[u8]) -> Result<Vec<(PropertyBag, Bytes)>, ApiError> {
    let items: Vec<BatchItem> =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the batch is not valid: {e}")))?;
    if items.is_empty() {
        return Err(ApiError::bad_request("the batch holds no message"));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let body = if item.base64_encoded.unwrap_or(true) {
            base64::engine::general_purpose::STANDARD
                .decode(item.body.as_bytes())
                .map_err(|_| ApiError::bad_request(format!("message {i} of the batch: the body is not base64")))?
        } else {
            item.body.into_bytes()
        };
        let mut bag = PropertyBag::default();
        for (k, v) in &item.properties {
            let Value::String(v) = v else {
                return Err(ApiError::bad_request(format!("message {i} of the batch: property {k} is not a string")));
            };
            map_property(&mut bag, k, v)?;
        }
        out.push((bag, Bytes::from(body)));
    }
    Ok(out)
}

/// `POST /devices/{id}/messages/events` and `/devices/{id}/modules/{mid}/messages/events`: one
/// message (the body, properties in headers) or, with `Content-Type:
/// application/vnd.microsoft.iothub.json`, a batch. 204 when stored; 400 for bad headers or a
/// bad batch, 413 past `behaviour.max_message_bytes` for a message or for a batch's total.
pub async fn send_event(
    State(hub): State<Hub>,
    Path(params): Path<HashMap<String, String>>,
    chain: Option<Extension<ClientChain>>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> ApiResult {
    auth::api_version(&uri)?;
    let w = who(params)?;
    let identity = authenticate(&hub, &headers, chain.as_deref(), &w)?;
    let body = read_body(body).await?;
    let batch = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case(BATCH_CONTENT_TYPE)));
    let messages = if batch { parse_batch(&body)? } else { vec![(header_bag(&headers)?, body)] };
    let mut total = 0usize;
    for (bag, body) in &messages {
        devices::check_size(&hub, bag, body.len()).map_err(|_| too_large())?;
        total = total.saturating_add(crate::hub::telemetry::message_size(bag, body.len()));
    }
    if total > hub.behaviour.max_message_bytes {
        return Err(too_large());
    }
    if let Some(delay) = devices::ack_delay(&hub) {
        tokio::time::sleep(delay).await;
    }
    for (bag, body) in messages {
        let m = D2c { properties: &bag, body, retain: false, will: false };
        devices::accept_telemetry(&hub, &identity, None, m);
    }
    // The 204 says the hub has the messages: once the endpoint's events are durable.
    super::error::after_commit(&hub, Ok(StatusCode::NO_CONTENT.into_response())).await
}

/// The response headers of a received C2D message: the lock token as a quoted `ETag`, the system
/// properties as `iothub-*` headers, the application properties as `iothub-app-*` (a property
/// whose name or value cannot be a header is left out rather than failing the receive).
fn c2d_headers(m: &C2dMessage) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: String, value: String| {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            h.append(n, v);
        }
    };
    if let Some(lock) = &m.lock {
        put("etag".into(), format!("\"{}\"", lock.token));
    }
    put("iothub-sequencenumber".into(), m.id.to_string());
    // The number of earlier deliveries, as the SDKs' `DeliveryCount` means it.
    put("iothub-deliverycount".into(), m.delivery_count.saturating_sub(1).to_string());
    put("iothub-enqueuedtime".into(), iso8601(m.enqueued_at));
    put("iothub-expiry".into(), iso8601(m.expires_at));
    for (k, v) in m.properties.iter() {
        put(https_headers::header_name(k), v.unwrap_or_default().to_owned());
    }
    h
}

/// `GET /devices/{id}/messages/deviceBound`: 204 when nothing is deliverable, else 200 with the
/// body and headers of the oldest message, locked for `behaviour.c2d_lock_timeout_secs`.
pub async fn receive(
    State(hub): State<Hub>,
    Path(params): Path<HashMap<String, String>>,
    chain: Option<Extension<ClientChain>>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    auth::api_version(&uri)?;
    let w = who(params)?;
    let identity = authenticate(&hub, &headers, chain.as_deref(), &w)?;
    match devices::c2d_receive(&hub, &identity) {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(m) => Ok((StatusCode::OK, c2d_headers(&m), m.body).into_response()),
    }
}

fn lock_token(params: &HashMap<String, String>) -> Result<String, ApiError> {
    let raw = params.get("etag").ok_or_else(|| ApiError::bad_request("no lock token in the path"))?;
    Ok(raw.trim_matches('"').to_owned())
}

fn settle(hub: &HubState, identity: &Arc<Identity>, token: &str, how: Settle) -> ApiResult {
    devices::c2d_settle(hub, identity, token, how)
        .map_err(|e| ApiError::hub(412, 412002, "DeviceMessageLockLost", format!("{e}; receive the message again")))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `DELETE /devices/{id}/messages/deviceBound/{etag}`: completes, or with the `reject` query
/// parameter (bare or with a value) rejects. 204; 412 `DeviceMessageLockLost` for a lock token
/// that names no locked message (unknown, settled, or its lock expired).
pub async fn complete_or_reject(
    State(hub): State<Hub>,
    Path(params): Path<HashMap<String, String>>,
    chain: Option<Extension<ClientChain>>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    let (identity, token) = locked(&hub, params, chain.as_deref(), &headers, &uri)?;
    let reject = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p.split('=').next().is_some_and(|n| n.eq_ignore_ascii_case("reject"))));
    let how = if reject { Settle::Reject } else { Settle::Complete };
    super::error::after_commit(&hub, settle(&hub, &identity, &token, how)).await
}

/// `POST /devices/{id}/messages/deviceBound/{etag}/abandon`: the message is Enqueued again. 204;
/// 412 `DeviceMessageLockLost` as for complete.
pub async fn abandon(
    State(hub): State<Hub>,
    Path(params): Path<HashMap<String, String>>,
    chain: Option<Extension<ClientChain>>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    let (identity, token) = locked(&hub, params, chain.as_deref(), &headers, &uri)?;
    super::error::after_commit(&hub, settle(&hub, &identity, &token, Settle::Abandon)).await
}

/// What settling a message by lock token needs: the API version checked, the lock token, and the
/// device its SAS token authenticates.
fn locked(
    hub: &HubState,
    params: HashMap<String, String>,
    chain: Option<&ClientChain>,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<(Arc<Identity>, String), ApiError> {
    auth::api_version(uri)?;
    let token = lock_token(&params)?;
    let identity = authenticate(hub, headers, chain, &who(params)?)?;
    Ok((identity, token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_map_into_the_bag_the_mqtt_path_uses() {
        let mut h = HeaderMap::new();
        h.insert("iothub-messageid", HeaderValue::from_static("m1"));
        h.insert("iothub-contenttype", HeaderValue::from_static("application/json"));
        h.insert("iothub-app-alert", HeaderValue::from_static("high"));
        h.insert("dt-subject", HeaderValue::from_static("thermostat1"));
        h.insert("iothub-creation-time-utc", HeaderValue::from_static("2024-01-01T00:00:00Z"));
        h.insert("user-agent", HeaderValue::from_static("node"));
        h.insert("iothub-to", HeaderValue::from_static("/devices/d/messages/events"));
        let bag = header_bag(&h).unwrap();
        assert_eq!(bag.get("$.mid"), Some("m1"));
        assert_eq!(bag.get("$.ct"), Some("application/json"));
        assert_eq!(bag.get("alert"), Some("high"));
        assert_eq!(bag.get("$.sub"), Some("thermostat1"));
        assert_eq!(bag.get("iothub-creation-time-utc"), Some("2024-01-01T00:00:00Z"));
        assert_eq!(bag.iter().count(), 5, "transport headers are not properties");

        let mut bad = HeaderMap::new();
        bad.insert("iothub-app-x", HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        assert_eq!(header_bag(&bad).unwrap_err().parts().0, 400);
        let mut empty = HeaderMap::new();
        empty.insert("iothub-app-", HeaderValue::from_static("v"));
        assert_eq!(header_bag(&empty).unwrap_err().parts().0, 400);
    }

    #[test]
    fn batches_decode_base64_by_default_and_refuse_bad_input() {
        let ok = br#"[{"body":"aGk=","properties":{"iothub-app-k":"v","iothub-messageid":"1"}},
                     {"body":"plain","base64Encoded":false}]"#;
        let msgs = parse_batch(ok).unwrap();
        assert_eq!(msgs[0].1.as_ref(), b"hi");
        assert_eq!((msgs[0].0.get("k"), msgs[0].0.get("$.mid")), (Some("v"), Some("1")));
        assert_eq!(msgs[1].1.as_ref(), b"plain");
        for bad in [
            &br#"[]"#[..],
            br#"[{"body":"%%%"}]"#,
            br#"[{"body":"aGk=","properties":{"iothub-app-k":{"nested":[1]}}}]"#,
            br#"{"body":"aGk="}"#,
            br#"[{"nobody":1}]"#,
            b"\xff\xfe",
        ] {
            assert_eq!(parse_batch(bad).unwrap_err().parts().0, 400, "{}", String::from_utf8_lossy(bad));
        }
        let deep = format!("[{}]", "[".repeat(10_000));
        assert_eq!(parse_batch(deep.as_bytes()).unwrap_err().parts().0, 400);
    }
}
