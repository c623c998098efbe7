//! DPS over HTTPS: the device API (register, operation status, registration status; protocol.md
//! §3.3) and the service API's enrollments and enrollment groups, authorized by the
//! `provisioningserviceowner` policy.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth;
use super::error::ApiError;
use crate::hub::dps::{
    Attestation, DpsAuthError, DpsError, GroupEnrollment, IndividualEnrollment, Progress, valid_registration_id,
};
use crate::hub::secrets::Permissions;
use crate::hub::state::{Hub, HubState};
use crate::iot::dps::RegistrationRequest;
use crate::iot::sas::Key;
use crate::iot::time::unix_secs;

type ApiResult = Result<Response, ApiError>;

fn device_auth(
    hub: &HubState,
    scope: &str,
    reg: &str,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<Attestation, ApiError> {
    auth::api_version(uri).map_err(|_| ApiError::dps(400, 400001, "the api-version query parameter is required"))?;
    let token = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    hub.dps.authenticate(scope, reg, token, unix_secs(crate::hub::clock::wall())).map_err(|e| {
        if e == DpsAuthError::BadRegistrationId {
            // A signed request for an id DPS does not accept: the request is bad, not the caller.
            hub.metrics.dps_registration("bad_request");
            return ApiError::dps(400, 400004, e.to_string());
        }
        hub.metrics.dps_registration("unauthorized");
        hub.metrics.refused(e.refusal());
        ApiError::dps(401, 401002, e.to_string())
    })
}

fn with_retry_after(mut resp: Response, secs: u64) -> Response {
    resp.headers_mut().insert("retry-after", HeaderValue::from(secs));
    resp
}

/// A 429 with Retry-After when the fault injector says so.
fn injected_throttle(hub: &Hub) -> Result<(), ApiError> {
    match hub.faults.dps_throttle() {
        Some(wait) => {
            hub.metrics.faults_injected.with_label_values(&["dps_throttle"]).inc();
            Err(ApiError::dps(429, 429001, "throttled (injected fault)").with_retry_after(wait))
        }
        None => Ok(()),
    }
}

pub async fn register(
    State(hub): State<Hub>,
    Path((scope, reg)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> ApiResult {
    let att = device_auth(&hub, &scope, &reg, &headers, &uri)?;
    injected_throttle(&hub)?;
    let req: RegistrationRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RegistrationRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            hub.metrics.dps_registration("bad_request");
            ApiError::dps(400, 400004, format!("the register body is not a registration request: {e}"))
        })?
    };
    let op = hub.dps.register(&att, &req, crate::hub::clock::now(), crate::hub::clock::wall()).map_err(|e| {
        hub.metrics.dps_registration("bad_request");
        ApiError::dps(400, 400004, e.to_string())
    })?;
    hub.store_registration(&att);
    let resp = (StatusCode::ACCEPTED, Json(op)).into_response();
    Ok(with_retry_after(resp, hub.behaviour.dps_retry_after_secs))
}

pub async fn operation(
    State(hub): State<Hub>,
    Path((scope, reg, op)): Path<(String, String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    let att = device_auth(&hub, &scope, &reg, &headers, &uri)?;
    injected_throttle(&hub)?;
    match hub.dps.poll(&att, &op, &hub.registry, crate::hub::clock::now(), crate::hub::clock::wall()) {
        Ok(Progress::Assigning { status, retry_after }) => {
            Ok(with_retry_after((StatusCode::ACCEPTED, Json(status)).into_response(), retry_after))
        }
        Ok(Progress::Done(status)) => {
            hub.metrics.dps_registration("assigned");
            hub.refresh_identity_gauges();
            // The assignment is answered only once the device and the registration are durable.
            hub.store_registration(&att);
            hub.store.durable().await.map_err(|_| ApiError::dps(500, 500001, "the assignment could not be stored"))?;
            Ok(Json(status).into_response())
        }
        Err(DpsError::UnknownOperation) => Err(ApiError::dps(404, 404002, "unknown operation")),
        Err(e) => {
            hub.metrics.dps_registration("failed");
            Err(ApiError::dps(500, 500001, e.to_string()))
        }
    }
}

pub async fn registration_status(
    State(hub): State<Hub>,
    Path((scope, reg)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    device_auth(&hub, &scope, &reg, &headers, &uri)?;
    match hub.dps.registration_state(&reg) {
        Some(state) => Ok(Json(state).into_response()),
        None => Err(ApiError::dps(404, 404201, "the device has not registered")),
    }
}

// Enrollments (the DPS service API).

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct AttestationBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    symmetric_key: Option<KeysBody>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct KeysBody {
    primary_key: Option<String>,
    secondary_key: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct EnrollmentBody {
    registration_id: Option<String>,
    enrollment_group_id: Option<String>,
    device_id: Option<String>,
    attestation: Option<AttestationBody>,
    provisioning_status: Option<String>,
}

fn dps_service_auth(hub: &HubState, headers: &HeaderMap, uri: &Uri) -> Result<(), ApiError> {
    auth::service(hub, headers, Permissions::ENROLLMENT_WRITE)?;
    auth::api_version(uri)
}

fn enrollment_keys(body: &EnrollmentBody) -> Result<[Key; 2], ApiError> {
    let att = body.attestation.as_ref();
    if let Some(kind) = att.and_then(|a| a.kind.as_deref())
        && kind != "symmetricKey"
    {
        return Err(ApiError::dps(
            400,
            400004,
            format!("attestation type `{kind}` is not emulated; use `symmetricKey`"),
        ));
    }
    let keys = att.and_then(|a| a.symmetric_key.as_ref());
    let one = |k: Option<&String>| -> Result<Key, ApiError> {
        match k.map(String::as_str).filter(|k| !k.is_empty()) {
            Some(k) => {
                Key::from_base64(k).map_err(|_| ApiError::dps(400, 400004, "an enrollment key is not valid base64"))
            }
            None => Ok(Key::generate()),
        }
    };
    Ok([one(keys.and_then(|k| k.primary_key.as_ref()))?, one(keys.and_then(|k| k.secondary_key.as_ref()))?])
}

fn enabled(body: &EnrollmentBody) -> Result<bool, ApiError> {
    match body.provisioning_status.as_deref() {
        None | Some("enabled") => Ok(true),
        Some("disabled") => Ok(false),
        Some(other) => {
            Err(ApiError::dps(400, 400004, format!("provisioningStatus `{other}` is neither enabled nor disabled")))
        }
    }
}

fn attestation_json(keys: &[Key; 2]) -> Value {
    json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": keys[0].to_base64(), "secondaryKey": keys[1].to_base64()}})
}

fn individual_json(e: &IndividualEnrollment) -> Value {
    json!({
        "registrationId": e.registration_id,
        "deviceId": e.device_id,
        "attestation": attestation_json(&e.keys),
        "provisioningStatus": if e.enabled { "enabled" } else { "disabled" },
        "etag": e.etag.to_string(),
    })
}

fn group_json(g: &GroupEnrollment) -> Value {
    json!({
        "enrollmentGroupId": g.group_id,
        "attestation": attestation_json(&g.keys),
        "provisioningStatus": if g.enabled { "enabled" } else { "disabled" },
        "etag": g.etag.to_string(),
    })
}

/// `answer` once the enrollment change is durable; DPS's 500 when the store failed.
async fn stored(hub: &HubState, answer: Response) -> ApiResult {
    hub.store.durable().await.map_err(|_| ApiError::dps(500, 500001, "the change could not be stored"))?;
    Ok(answer)
}

pub async fn enrollment_put(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> ApiResult {
    dps_service_auth(&hub, &headers, &uri)?;
    let body: EnrollmentBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::dps(400, 400004, format!("bad enrollment: {e}")))?;
    if body.registration_id.as_deref().is_some_and(|r| r != id) || !valid_registration_id(&id) {
        return Err(ApiError::dps(400, 400004, "the registration id is invalid or does not match the path"));
    }
    let etag = hub.dps.get_individual(&id).map_or(1, |e| e.etag + 1);
    let e = IndividualEnrollment {
        registration_id: id,
        device_id: body.device_id.clone(),
        keys: enrollment_keys(&body)?,
        enabled: enabled(&body)?,
        etag,
    };
    hub.dps.put_individual(e.clone());
    hub.store.individual(&e.registration_id);
    stored(&hub, Json(individual_json(&e)).into_response()).await
}

pub async fn enrollment_get(State(hub): State<Hub>, Path(id): Path<String>, headers: HeaderMap, uri: Uri) -> ApiResult {
    dps_service_auth(&hub, &headers, &uri)?;
    let e = hub.dps.get_individual(&id).ok_or_else(|| ApiError::dps(404, 404201, "no such enrollment"))?;
    Ok(Json(individual_json(&e)).into_response())
}

pub async fn enrollment_delete(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    dps_service_auth(&hub, &headers, &uri)?;
    if hub.dps.remove_individual(&id) {
        hub.store.individual(&id);
        stored(&hub, StatusCode::NO_CONTENT.into_response()).await
    } else {
        Err(ApiError::dps(404, 404201, "no such enrollment"))
    }
}

pub async fn group_put(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> ApiResult {
    dps_service_auth(&hub, &headers, &uri)?;
    let body: EnrollmentBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::dps(400, 400004, format!("bad enrollment group: {e}")))?;
    if body.enrollment_group_id.as_deref().is_some_and(|g| g != id) || id.is_empty() || id.len() > 128 {
        return Err(ApiError::dps(400, 400004, "the enrollment group id is invalid or does not match the path"));
    }
    let etag = hub.dps.get_group(&id).map_or(1, |g| g.etag + 1);
    let g = GroupEnrollment { group_id: id, keys: enrollment_keys(&body)?, enabled: enabled(&body)?, etag };
    hub.dps.put_group(g.clone());
    hub.store.group(&g.group_id);
    stored(&hub, Json(group_json(&g)).into_response()).await
}

pub async fn group_get(State(hub): State<Hub>, Path(id): Path<String>, headers: HeaderMap, uri: Uri) -> ApiResult {
    dps_service_auth(&hub, &headers, &uri)?;
    let g = hub.dps.get_group(&id).ok_or_else(|| ApiError::dps(404, 404202, "no such enrollment group"))?;
    Ok(Json(group_json(&g)).into_response())
}

pub async fn group_delete(State(hub): State<Hub>, Path(id): Path<String>, headers: HeaderMap, uri: Uri) -> ApiResult {
    dps_service_auth(&hub, &headers, &uri)?;
    if hub.dps.remove_group(&id) {
        hub.store.group(&id);
        stored(&hub, StatusCode::NO_CONTENT.into_response()).await
    } else {
        Err(ApiError::dps(404, 404202, "no such enrollment group"))
    }
}
