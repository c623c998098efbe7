//! Authorization of HTTPS requests. The service API and the DPS service API take a policy token
//! (`skn` names the policy) whose resource is this hub; the DPS device API takes a registration
//! token checked like the MQTT one. The `api-version` query parameter is required, as on Azure.

use std::time::SystemTime;

use axum::http::{HeaderMap, Uri};

use super::error::ApiError;
use crate::hub::secrets::Permissions;
use crate::hub::state::HubState;
use crate::iot::sas::{SasError, SasToken};
use crate::iot::time::unix_secs;

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
    let now = unix_secs(SystemTime::now());
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
    fn api_version_is_required() {
        assert!(api_version(&"/devices/x?api-version=2021-04-12".parse().unwrap()).is_ok());
        assert!(api_version(&"/devices/x?top=1&api-version=2020-09-30".parse().unwrap()).is_ok());
        assert!(api_version(&"/devices/x".parse().unwrap()).is_err());
        assert!(api_version(&"/devices/x?api-version=".parse().unwrap()).is_err());
    }
}
