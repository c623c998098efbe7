//! Bulk registry operations, `POST /devices` with an array of up to 100 `ExportImportDevice`s
//! (IoT Hub REST "Bulk Registry - Update Registry"; Node `azure-iothub` `Registry.addDevices`,
//! `updateDevices`, `removeDevices`). Each entry's `importMode` (`create`, `update`,
//! `updateIfMatchETag`, `delete`, `deleteIfMatchETag`, `updateTwin`, `updateTwinIfMatchETag`, any
//! case) runs the single-identity operation of `service.rs`. Entries are independent, as on IoT
//! Hub: one that fails is reported in `errors` and the others still apply. 200 with
//! `isSuccessful: true` when all applied; 400 with `isSuccessful: false` and the failures
//! otherwise. A malformed request (not an array, an entry without `id` or with an unknown mode)
//! changes nothing and is refused whole with 400 ArgumentInvalid; the same identity twice, 400
//! DeviceDefinedMultipleTimes (400011); more than 100 entries, 413 TooManyDevices (413002).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::service::{self, guard};
use crate::hub::secrets::Permissions;
use crate::hub::state::{Hub, HubState};

/// The most entries one request may carry (IoT Hub's bulk limit).
pub const MAX_ENTRIES: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Create,
    Update,
    UpdateIfMatchETag,
    Delete,
    DeleteIfMatchETag,
    UpdateTwin,
    UpdateTwinIfMatchETag,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        const ALL: [(&str, Mode); 7] = [
            ("create", Mode::Create),
            ("update", Mode::Update),
            ("updateIfMatchETag", Mode::UpdateIfMatchETag),
            ("delete", Mode::Delete),
            ("deleteIfMatchETag", Mode::DeleteIfMatchETag),
            ("updateTwin", Mode::UpdateTwin),
            ("updateTwinIfMatchETag", Mode::UpdateTwinIfMatchETag),
        ];
        ALL.iter().find(|(name, _)| name.eq_ignore_ascii_case(s)).map(|(_, m)| *m)
    }
}

/// One checked entry.
struct Entry {
    device: String,
    module: Option<String>,
    mode: Mode,
    /// `eTag` (identity) or `twinETag` (twin), for the `IfMatchETag` modes.
    etag: Option<String>,
    raw: Map<String, Value>,
}

fn entry(v: &Value) -> Result<Entry, ApiError> {
    let raw = v.as_object().ok_or_else(|| ApiError::bad_request("every bulk entry must be an object"))?.clone();
    let text = |k: &str| raw.get(k).and_then(Value::as_str).map(str::to_owned);
    let device = text("id").ok_or_else(|| ApiError::bad_request("a bulk entry has no `id`"))?;
    let mode = text("importMode").unwrap_or_else(|| "create".into());
    let mode = Mode::parse(&mode)
        .ok_or_else(|| ApiError::bad_request(format!("importMode `{mode}` is not one IoT Hub knows")))?;
    let etag = match mode {
        Mode::UpdateTwinIfMatchETag => text("twinETag"),
        Mode::UpdateIfMatchETag | Mode::DeleteIfMatchETag => text("eTag").or_else(|| text("etag")),
        _ => None,
    };
    if matches!(mode, Mode::UpdateIfMatchETag | Mode::DeleteIfMatchETag | Mode::UpdateTwinIfMatchETag) && etag.is_none()
    {
        return Err(ApiError::bad_request(format!("importMode for `{device}` needs an etag")));
    }
    Ok(Entry { device, module: text("moduleId"), mode, etag, raw })
}

/// The `Device`/`Module` body the single-identity PUT takes.
fn identity_body(e: &Entry) -> Bytes {
    let mut body = Map::new();
    body.insert("deviceId".into(), json!(e.device));
    if let Some(m) = &e.module {
        body.insert("moduleId".into(), json!(m));
    }
    for k in ["status", "statusReason", "authentication", "capabilities", "managedBy"] {
        if let Some(v) = e.raw.get(k).filter(|v| !v.is_null()) {
            body.insert(k.into(), v.clone());
        }
    }
    Bytes::from(Value::Object(body).to_string())
}

/// The twin body (`tags`, `properties`) an entry carries, if any.
fn twin_body(e: &Entry) -> Option<Bytes> {
    let mut body = Map::new();
    for k in ["tags", "properties"] {
        if let Some(v) = e.raw.get(k).filter(|v| !v.is_null()) {
            body.insert(k.into(), v.clone());
        }
    }
    (!body.is_empty()).then(|| Bytes::from(Value::Object(body).to_string()))
}

fn apply(hub: &HubState, e: &Entry) -> Result<(), ApiError> {
    let (d, m) = (e.device.as_str(), e.module.as_deref());
    let etag = e.etag.as_deref();
    match e.mode {
        Mode::Create | Mode::Update | Mode::UpdateIfMatchETag => {
            // `update` overwrites whatever exists (an unconditional If-Match); `create` refuses it.
            let cond = match e.mode {
                Mode::Create => None,
                Mode::Update => Some("*"),
                _ => etag,
            };
            service::put_identity(hub, d, m, cond, &identity_body(e))?;
            if let Some(twin) = twin_body(e) {
                service::twin_update(hub, d, m, None, &twin, false)?;
            }
        }
        Mode::Delete | Mode::DeleteIfMatchETag => {
            service::delete_identity(hub, d, m, etag)?;
        }
        Mode::UpdateTwin | Mode::UpdateTwinIfMatchETag => {
            let twin = twin_body(e).unwrap_or_else(|| Bytes::from_static(b"{}"));
            service::twin_update(hub, d, m, etag, &twin, false)?;
        }
    }
    Ok(())
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Create => "create",
        Mode::Update => "update",
        Mode::UpdateIfMatchETag => "updateIfMatchETag",
        Mode::Delete => "delete",
        Mode::DeleteIfMatchETag => "deleteIfMatchETag",
        Mode::UpdateTwin => "updateTwin",
        Mode::UpdateTwinIfMatchETag => "updateTwinIfMatchETag",
    }
}

pub async fn update_registry(
    State(hub): State<Hub>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Result<Response, ApiError> {
    guard(&hub, &headers, &uri, Permissions::REGISTRY_WRITE)?;
    let list: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::hub(400, 400012, "DeserializationError", format!("the request body is not valid: {e}"))
    })?;
    let Value::Array(items) = list else {
        return Err(ApiError::bad_request("the bulk request must be a JSON array of devices"));
    };
    if items.is_empty() {
        return Err(ApiError::bad_request("the bulk request names no device"));
    }
    if items.len() > MAX_ENTRIES {
        return Err(ApiError::hub(
            413,
            413002,
            "TooManyDevices",
            format!("at most {MAX_ENTRIES} devices per bulk request"),
        ));
    }
    let entries = items.iter().map(entry).collect::<Result<Vec<_>, _>>()?;
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = entries.iter().find(|e| !seen.insert((e.device.as_str(), e.module.as_deref()))) {
        return Err(ApiError::hub(
            400,
            400011,
            "DeviceDefinedMultipleTimes",
            format!("`{}` appears more than once in the bulk request", twice.device),
        ));
    }
    let mut errors = Vec::new();
    for e in &entries {
        if let Err(err) = apply(&hub, e) {
            let (_, name, message) = err.parts();
            errors.push(json!({
                "deviceId": e.device,
                "moduleId": e.module,
                "errorCode": name,
                "errorStatus": message,
                "operation": mode_name(e.mode),
            }));
        }
    }
    hub.refresh_identity_gauges();
    let ok = errors.is_empty();
    let status = if ok { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    let answer = (status, Json(json!({"isSuccessful": ok, "errors": errors, "warnings": []}))).into_response();
    super::error::after_commit(&hub, Ok(answer)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_read_in_any_case_and_etag_modes_need_an_etag() {
        assert_eq!(Mode::parse("Update"), Some(Mode::Update));
        assert_eq!(Mode::parse("DeleteIfMatchETag"), Some(Mode::DeleteIfMatchETag));
        assert_eq!(Mode::parse("upsert"), None);
        assert!(entry(&json!({"id": "d", "importMode": "deleteIfMatchETag"})).is_err());
        assert!(entry(&json!({"id": "d", "importMode": "deleteIfMatchETag", "eTag": "x"})).is_ok());
        assert!(entry(&json!({"importMode": "create"})).is_err());
        assert_eq!(entry(&json!({"id": "d"})).unwrap().mode, Mode::Create);
    }
}
