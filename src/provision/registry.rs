//! The few service-API calls the fleet makes: ensure a device or module exists with a given key,
//! and create individual DPS enrollments. Against the emulator or a real hub, with a policy
//! connection string.

use std::time::SystemTime;

use serde_json::json;

use crate::iot::connection_string::ConnectionString;
use crate::iot::sas::{Key, sign_token};
use crate::iot::time::unix_secs;

/// A service endpoint and the policy to sign with.
#[derive(Clone)]
pub struct ServiceClient {
    http: reqwest::Client,
    /// `host[:port]` from the connection string.
    base: String,
    host: String,
    policy: String,
    key: Key,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("the service API answered {status}: {error_code}")]
    Status { status: u16, error_code: String },
    #[error("the service API could not be reached: {0}")]
    Unreachable(String),
    #[error("the connection string is not a service (policy) connection string")]
    NotService,
}

impl ServiceClient {
    pub fn new(http: reqwest::Client, cs: &ConnectionString) -> Result<ServiceClient, ServiceError> {
        let (Some(policy), Some(key)) = (&cs.shared_access_key_name, &cs.shared_access_key) else {
            return Err(ServiceError::NotService);
        };
        let key = Key::from_base64(key).map_err(|_| ServiceError::NotService)?;
        let host = cs.host_name.split(':').next().unwrap_or_default().to_owned();
        Ok(ServiceClient { http, base: cs.host_name.clone(), host, policy: policy.clone(), key })
    }

    fn token(&self) -> String {
        sign_token(&self.host, &self.key, unix_secs(SystemTime::now()) + 3600, Some(&self.policy))
    }

    async fn put(&self, path: &str, body: serde_json::Value, if_match: Option<&str>) -> Result<u16, ServiceError> {
        let mut req = self
            .http
            .put(format!("https://{}{path}?api-version=2021-04-12", self.base))
            .header("authorization", self.token())
            .json(&body);
        if let Some(m) = if_match {
            req = req.header("if-match", m);
        }
        let resp = req.send().await.map_err(|e| ServiceError::Unreachable(e.without_url().to_string()))?;
        let status = resp.status().as_u16();
        if resp.status().is_success() {
            return Ok(status);
        }
        let error_code = resp.headers().get("iothub-errorcode").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        Err(ServiceError::Status { status, error_code })
    }

    /// Creates the identity with this key, or sets the key on the one that exists.
    async fn ensure_identity(&self, path: &str, mut body: serde_json::Value, key: &Key) -> Result<(), ServiceError> {
        body["authentication"] =
            json!({"type": "sas", "symmetricKey": {"primaryKey": key.to_base64(), "secondaryKey": key.to_base64()}});
        match self.put(path, body.clone(), None).await {
            Ok(_) => Ok(()),
            Err(ServiceError::Status { status: 409, .. }) => self.put(path, body, Some("*")).await.map(|_| ()),
            Err(e) => Err(e),
        }
    }

    pub async fn ensure_device(&self, device_id: &str, key: &Key) -> Result<(), ServiceError> {
        self.ensure_identity(&format!("/devices/{device_id}"), json!({"deviceId": device_id}), key).await
    }

    pub async fn ensure_module(&self, device_id: &str, module_id: &str, key: &Key) -> Result<(), ServiceError> {
        self.ensure_identity(
            &format!("/devices/{device_id}/modules/{module_id}"),
            json!({"deviceId": device_id, "moduleId": module_id}),
            key,
        )
        .await
    }

    /// A DPS individual enrollment (this client must hold the `provisioningserviceowner` policy).
    pub async fn ensure_enrollment(&self, registration_id: &str, key: &Key) -> Result<(), ServiceError> {
        let body = json!({
            "registrationId": registration_id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key.to_base64(), "secondaryKey": key.to_base64()}},
        });
        self.put(&format!("/enrollments/{registration_id}"), body, None).await.map(|_| ())
    }
}
