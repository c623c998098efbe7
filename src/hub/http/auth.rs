//! Authorization of HTTPS requests. The service API and the DPS service API take a policy token
//! (`skn` names the policy) whose resource is this hub; the DPS device API takes a registration
//! token checked like the MQTT one. The `api-version` query parameter is required, as on Azure.
//!
//! Scope is checked once for every route, by the [`scope`] middleware the router wraps them all
//! in, so no route can forget it: a token reaches only the resources under its `sr`, by whole
//! path segments (IoT Hub's rule for SAS tokens: the `sr` is a URI prefix of what it grants).
//! Signature, expiry and permissions are the handlers' part (`service`), since only they know
//! which permission an operation needs.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::hub::secrets::Permissions;
use crate::hub::state::{Hub, HubState};
use crate::iot::encoding::url_decode;
use crate::iot::sas::{SasError, SasToken, resource_covers};
use crate::iot::time::unix_secs;

/// Refuses, with 401, a request whose SAS token's `sr` does not cover the requested path (issue
/// 10: a token for `host/devices/dev1` signed with the owner key listed and deleted other
/// devices). A request without a SAS token passes: the handler refuses it if it needs one (the
/// WebSocket upgrade authenticates in MQTT instead).
pub async fn scope(State(hub): State<Hub>, req: Request, next: Next) -> Response {
    let token = req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|h| SasToken::parse(h).ok());
    if let Some(token) = token
        && !token_covers(&hub, &token.resource, req.uri().path())
    {
        let message = "the token's resource (sr) does not cover this request";
        return if is_dps_path(req.uri().path()) {
            ApiError::dps(401, 401002, message).into_response()
        } else {
            ApiError::unauthorized(message).into_response()
        };
    }
    next.run(req).await
}

/// Whether a token for resource `sr` may reach `path`. A hub or DPS service token's `sr` starts
/// with one of the hub's host names and covers that host's paths; a DPS device token's starts with
/// the id scope and covers `/{scope}/registrations/{id}/...`. Compared without regard to case, as
/// the service lower-cases resource URIs.
fn token_covers(hub: &HubState, sr: &str, path: &str) -> bool {
    let Ok(path) = url_decode(path) else { return false };
    let host = sr.split('/').next().unwrap_or_default();
    let requested =
        if hub.is_our_host(host) { format!("{host}{path}") } else { path.trim_start_matches('/').to_owned() };
    resource_covers(&sr.to_ascii_lowercase(), requested.trim_end_matches('/').to_ascii_lowercase().as_str())
}

/// DPS routes answer in DPS's error shape: the enrollment collections, and
/// `/{scope}/registrations/...` where the first segment is not one of the hub's own collections
/// (a device may be named `registrations`).
fn is_dps_path(path: &str) -> bool {
    const HUB: &[&str] =
        &["devices", "twins", "certificates", "statistics", "emulator", "$iothub", "jobs", "configurations"];
    let mut segs = path.trim_start_matches('/').split('/');
    let first = segs.next().unwrap_or_default();
    first.eq_ignore_ascii_case("enrollments")
        || first.eq_ignore_ascii_case("enrollmentGroups")
        || (!HUB.iter().any(|h| h.eq_ignore_ascii_case(first)) && segs.next().is_some_and(|s| s == "registrations"))
}

/// Checks a service token and that its policy has at least one of `needed`.
pub fn service(hub: &HubState, headers: &HeaderMap, needed: Permissions) -> Result<&'static str, ApiError> {
    let header = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::unauthorized("no Authorization header"))?;
    let token = SasToken::parse(header).map_err(|e| ApiError::unauthorized(e.to_string()))?;
    let policy_name = token.skn.as_deref().ok_or_else(|| ApiError::unauthorized("the token names no policy (skn)"))?;
    let policy = hub.policy(policy_name).ok_or_else(|| ApiError::unauthorized("the token's policy does not exist"))?;
    let host = token.resource.split('/').next().unwrap_or_default();
    if !hub.is_our_host(host) {
        return Err(ApiError::unauthorized(SasError::WrongResource.to_string()));
    }
    let now = unix_secs(crate::hub::clock::wall());
    token
        .verify(&token.resource, &policy.keys, now, hub.behaviour.sas_skew_secs)
        .map_err(|e| ApiError::unauthorized(e.to_string()))?;
    if !policy.permissions.any_of(needed) {
        return Err(ApiError::unauthorized(format!(
            "policy {} lacks the permission this operation needs",
            policy.name
        )));
    }
    Ok(policy.name)
}

/// Every hub and DPS API call names its `api-version`; any value is accepted.
pub fn api_version(uri: &Uri) -> Result<(), ApiError> {
    let has = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p.starts_with("api-version=") && p.len() > "api-version=".len()));
    if has {
        Ok(())
    } else {
        Err(ApiError::hub(400, 400001, "InvalidProtocolVersion", "the api-version query parameter is required"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dps_paths_are_told_from_hub_paths() {
        assert!(is_dps_path("/0ne00000A0A/registrations/dev1/register"));
        assert!(is_dps_path("/enrollmentGroups/g1"));
        assert!(!is_dps_path("/devices/registrations"));
        assert!(!is_dps_path("/twins/registrations/modules/m"));
        assert!(!is_dps_path("/twins/dev1"));
    }

    #[test]
    fn api_version_is_required() {
        assert!(api_version(&"/devices/x?api-version=2021-04-12".parse().unwrap()).is_ok());
        assert!(api_version(&"/devices/x?top=1&api-version=2020-09-30".parse().unwrap()).is_ok());
        assert!(api_version(&"/devices/x".parse().unwrap()).is_err());
        assert!(api_version(&"/devices/x?api-version=".parse().unwrap()).is_err());
    }
}
