//! The hub's CA certificates over REST, in the shapes of IoT Hub's resource provider API
//! (Microsoft: "Certificates - Create Or Update", "Get", "List By Iot Hub", "Delete",
//! "Generate Verification Code", "Verify"): a `CertificateDescription` (`properties` with
//! `subject`, `expiry`, `thumbprint`, `isVerified`, `created`, `updated`, `certificate`; `id`,
//! `name`, `etag`, `type`), served on the hub's own host at `/certificates` with a service
//! token (read: `RegistryRead`, write: `RegistryWrite`) instead of Azure Resource Manager.

use std::time::SystemTime;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, after_commit};
use super::service::guard;
use crate::hub::ca_certs::{CaCert, CaError};
use crate::hub::secrets::Permissions;
use crate::hub::state::{Hub, HubState};

type ApiResult = Result<Response, ApiError>;

fn rfc1123(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

/// A `CertificateDescription`; with the verification code for `generateVerificationCode`'s
/// `CertificateWithNonceDescription`.
fn description(hub: &HubState, c: &CaCert, with_code: bool) -> Value {
    use base64::Engine;
    let mut properties = json!({
        "subject": c.subject,
        "expiry": rfc1123(c.expiry),
        "thumbprint": c.thumbprint,
        "isVerified": c.verified,
        "created": rfc1123(c.created),
        "updated": rfc1123(c.updated),
        "certificate": base64::engine::general_purpose::STANDARD.encode(&c.der),
    });
    if with_code {
        properties["verificationCode"] = json!(c.verification_code);
    }
    json!({
        "properties": properties,
        "id": format!("/iotHubs/{}/certificates/{}", hub.hostname, c.name),
        "name": c.name,
        "etag": c.etag(),
        "type": "Microsoft.Devices/IotHubs/Certificates",
    })
}

fn error(e: CaError) -> ApiError {
    match e {
        CaError::NotFound(_) => ApiError::hub(404, 404001, "CertificateNotFound", e.to_string()),
        CaError::PreconditionFailed => ApiError::precondition_failed(),
        CaError::TooMany => ApiError::hub(403, 403001, "IotHubQuotaExceeded", e.to_string()),
        CaError::BadName(_) | CaError::BadCertificate => ApiError::hub(400, 400004, "ArgumentInvalid", e.to_string()),
        CaError::NoVerificationCode | CaError::BadProof => {
            ApiError::hub(400, 400029, "CertificateVerificationFailed", e.to_string())
        }
    }
}

fn if_match(headers: &HeaderMap) -> Option<&str> {
    headers.get("if-match").and_then(|v| v.to_str().ok())
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::hub(400, 400012, "DeserializationError", format!("the request body is not valid: {e}")))
}

#[derive(Deserialize)]
struct PutBody {
    properties: PutProperties,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PutProperties {
    certificate: String,
    #[serde(default)]
    is_verified: bool,
}

#[derive(Deserialize)]
struct VerifyBody {
    certificate: String,
}

/// `GET /certificates`: `{"value": [CertificateDescription]}`.
pub async fn list(State(hub): State<Hub>, headers: HeaderMap, uri: Uri) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::REGISTRY_READ)?;
    let value: Vec<Value> = hub.ca_certs.list().iter().map(|c| description(&hub, c, false)).collect();
    Ok(Json(json!({ "value": value })).into_response())
}

/// `GET /certificates/{name}`.
pub async fn get(State(hub): State<Hub>, Path(name): Path<String>, headers: HeaderMap, uri: Uri) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::REGISTRY_READ)?;
    let c = hub.ca_certs.get(&name).ok_or_else(|| error(CaError::NotFound(name)))?;
    Ok(Json(description(&hub, &c, false)).into_response())
}

/// `PUT /certificates/{name}` (`{"properties": {"certificate": PEM or base64, "isVerified"}}`):
/// 201 when created, 200 when replaced (`If-Match` checked when given). Verified at once when
/// the body says `isVerified: true` or the hub's `ca_proof_of_possession` is off.
pub async fn put(
    State(hub): State<Hub>,
    Path(name): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::REGISTRY_WRITE)?;
    let body: PutBody = parse(&body)?;
    let verified = body.properties.is_verified || !hub.behaviour.ca_proof_of_possession;
    let existed = hub.ca_certs.get(&name).is_some();
    let result = hub
        .ca_certs
        .put(&name, &body.properties.certificate, verified, if_match(&headers), crate::hub::clock::wall(), |c| {
            hub.store.ca_cert(&name, c)
        })
        .map_err(error)
        .map(|c| {
            let status = if existed { StatusCode::OK } else { StatusCode::CREATED };
            (status, Json(description(&hub, &c, false))).into_response()
        });
    after_commit(&hub, result).await
}

/// `DELETE /certificates/{name}` (`If-Match` checked when given): 200. Devices chained to it
/// are refused from their next connect.
pub async fn delete(State(hub): State<Hub>, Path(name): Path<String>, headers: HeaderMap, uri: Uri) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::REGISTRY_WRITE)?;
    let result = hub
        .ca_certs
        .remove(&name, if_match(&headers), |c| hub.store.ca_cert(&name, c))
        .map_err(error)
        .map(|()| StatusCode::OK.into_response());
    after_commit(&hub, result).await
}

/// `POST /certificates/{name}/generateVerificationCode`: a `CertificateWithNonceDescription`
/// whose `properties.verificationCode` the proof of possession must carry as its CN.
pub async fn generate_code(
    State(hub): State<Hub>,
    Path(name): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::REGISTRY_WRITE)?;
    let result = hub
        .ca_certs
        .generate_code(&name, if_match(&headers), crate::hub::clock::wall(), |c| hub.store.ca_cert(&name, c))
        .map_err(error)
        .map(|c| Json(description(&hub, &c, true)).into_response());
    after_commit(&hub, result).await
}

/// `POST /certificates/{name}/verify` (`{"certificate": PEM or base64}`): the proof of
/// possession; the certificate becomes verified. 400 `CertificateVerificationFailed` otherwise.
pub async fn verify(
    State(hub): State<Hub>,
    Path(name): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> ApiResult {
    guard(&hub, &headers, &uri, Permissions::REGISTRY_WRITE)?;
    let body: VerifyBody = parse(&body)?;
    let result = hub
        .ca_certs
        .verify(&name, if_match(&headers), &body.certificate, crate::hub::clock::wall(), |c| {
            hub.store.ca_cert(&name, c)
        })
        .map_err(error)
        .map(|c| Json(description(&hub, &c, false)).into_response());
    after_commit(&hub, result).await
}
