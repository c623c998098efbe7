//! Provisioning through the service API: ensure a device or module exists with a given key, and
//! create individual DPS enrollments. Against the emulator or a real hub.

use serde_json::json;

use crate::iot::sas::Key;
pub use crate::service::{ServiceClient, ServiceError};

impl ServiceClient {
    async fn put(&self, path: &str, body: serde_json::Value, if_match: Option<&str>) -> Result<u16, ServiceError> {
        let headers: Vec<(&str, &str)> = if_match.map(|m| ("if-match", m)).into_iter().collect();
        self.request(reqwest::Method::PUT, path, Some(&body), &headers).await.map(|(s, _)| s)
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
