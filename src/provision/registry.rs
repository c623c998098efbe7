//! Provisioning through the service API: ensure a device or module exists with a given key, and
//! create individual DPS enrollments. Against the emulator or a real hub.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::sync::OnceCell;

use crate::iot::encoding::url_encode;
use crate::iot::sas::Key;
pub use crate::service::{ServiceClient, ServiceError};

impl ServiceClient {
    async fn put(&self, path: &str, body: serde_json::Value, if_match: Option<&str>) -> Result<u16, ServiceError> {
        let headers: Vec<(&str, &str)> = if_match.map(|m| ("if-match", m)).into_iter().collect();
        self.request(reqwest::Method::PUT, path, Some(&body), &headers).await.map(|(s, _)| s)
    }

    /// Creates the identity with this key, or sets the key on the one that exists. Runs at start
    /// and again whenever the hub refuses the identity (`device::recovery`), so it writes only
    /// what the fleet owns: an identity that exists with this key is left alone, and one with
    /// another key gets the key but keeps its `status` (a device an operator disabled stays
    /// disabled: PUT replaces the whole identity, and an absent `status` would enable it).
    /// `fits` says whether an existing identity is otherwise as the fleet needs it (an Edge
    /// device must have `capabilities.iotEdge`); one that does not is written like a re-key.
    async fn ensure_identity(
        &self,
        path: &str,
        mut body: serde_json::Value,
        key: &Key,
        fits: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<(), ServiceError> {
        let ours = key.to_base64();
        body["authentication"] = json!({"type": "sas", "symmetricKey": {"primaryKey": ours, "secondaryKey": ours}});
        match self.put(path, body.clone(), None).await {
            Ok(_) => return Ok(()),
            Err(ServiceError::Status { status: 409, .. }) => {}
            Err(e) => return Err(e),
        }
        let (_, existing) = self.request(reqwest::Method::GET, path, None, &[]).await?;
        let auth = &existing["authentication"];
        if auth["type"] == "sas" && auth["symmetricKey"]["primaryKey"] == ours.as_str() && fits(&existing) {
            return Ok(());
        }
        self.rekey(path, body, &existing, "status").await
    }

    /// Replaces `existing` (read just before) with `body`, which carries the fleet's key, keeping
    /// the operator's `status_field`, conditional on the etag that was read.
    async fn rekey(
        &self,
        path: &str,
        mut body: serde_json::Value,
        existing: &serde_json::Value,
        status_field: &str,
    ) -> Result<(), ServiceError> {
        if let Some(status) = existing.get(status_field) {
            body[status_field] = status.clone();
        }
        let etag = existing["etag"].as_str().map(|e| format!("\"{}\"", e.trim_matches('"')));
        self.put(path, body, Some(etag.as_deref().unwrap_or("*"))).await.map(|_| ())
    }

    pub async fn ensure_device(&self, device_id: &str, key: &Key) -> Result<(), ServiceError> {
        self.ensure_identity(
            &format!("/devices/{}", url_encode(device_id)),
            json!({"deviceId": device_id}),
            key,
            |_| true,
        )
        .await
    }

    /// An IoT Edge device: `capabilities.iotEdge` set, as `az iot hub device-identity create
    /// --edge-enabled` writes it. A device that exists with this key but without the capability
    /// (created by an earlier, non-Edge scenario) is written again with it, keeping its status.
    pub async fn ensure_edge_device(&self, device_id: &str, key: &Key) -> Result<(), ServiceError> {
        let body = json!({"deviceId": device_id, "capabilities": {"iotEdge": true}});
        let edge = |d: &serde_json::Value| d["capabilities"]["iotEdge"] == true;
        self.ensure_identity(&format!("/devices/{}", url_encode(device_id)), body, key, edge).await
    }

    /// Applies an IoT Edge deployment to one device: `POST
    /// /devices/{id}/applyConfigurationContent` with `{"modulesContent": ...}` (REST
    /// "Configuration - Apply On Edge Device", api-version 2021-04-12), which sets the
    /// `$edgeAgent`, `$edgeHub` and module twins' desired properties.
    ///
    /// # Errors
    /// The hub's answer when not 2xx (a 404 from a hub without deployments, a 400 for a route it
    /// refuses), or no answer.
    pub async fn apply_configuration(&self, device_id: &str, content: &serde_json::Value) -> Result<(), ServiceError> {
        let path = format!("/devices/{}/applyConfigurationContent?api-version=2021-04-12", url_encode(device_id));
        self.request(reqwest::Method::POST, &path, Some(content), &[]).await.map(|_| ())
    }

    pub async fn ensure_module(&self, device_id: &str, module_id: &str, key: &Key) -> Result<(), ServiceError> {
        self.ensure_identity(
            &format!("/devices/{}/modules/{}", url_encode(device_id), url_encode(module_id)),
            json!({"deviceId": device_id, "moduleId": module_id}),
            key,
            |_| true,
        )
        .await
    }

    /// A DPS individual enrollment (this client must hold the `provisioningserviceowner` policy).
    /// Like `ensure_identity`, and for the same reason, it leaves an enrollment with this key
    /// alone and keeps the `provisioningStatus` of one it re-keys: DPS's PUT creates or replaces,
    /// so it reads first.
    pub async fn ensure_enrollment(&self, registration_id: &str, key: &Key) -> Result<(), ServiceError> {
        let path = format!("/enrollments/{}", url_encode(registration_id));
        let ours = key.to_base64();
        let body = json!({
            "registrationId": registration_id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": ours, "secondaryKey": ours}},
        });
        let existing = match self.request(reqwest::Method::GET, &path, None, &[]).await {
            Ok((_, e)) => Some(e),
            Err(ServiceError::Status { status: 404, .. }) => None,
            Err(e) => return Err(e),
        };
        let Some(existing) = existing else {
            return self.put(&path, body, None).await.map(|_| ());
        };
        if existing["attestation"]["symmetricKey"]["primaryKey"] == ours.as_str() {
            return Ok(());
        }
        self.rekey(&path, body, &existing, "provisioningStatus").await
    }
}

/// The devices this fleet has ensured, so that each is written once fleet-wide however many of
/// its modules (and itself) start: IoT Hub throttles identity-registry writes (100/min/unit on
/// S1, iot-hub-devguide-quotas-throttling), and a device with N modules would otherwise cost
/// N + 1 device writes. Concurrent callers for one device wait for the first; a failure leaves
/// the entry unset, so the next caller tries again.
#[derive(Debug, Default)]
pub struct Ensured {
    devices: Mutex<HashMap<String, EnsuredDevice>>,
}

/// One device's write: the deployment it was ensured with (Edge devices), and the write's cell.
type EnsuredDevice = (Option<serde_json::Value>, Arc<OnceCell<()>>);

impl Ensured {
    /// Ensures the device once; later calls for the same id return at once. With a
    /// `deployment` (an IoT Edge device's `{"modulesContent": ...}`) the device is created Edge
    /// enabled and the deployment applied. A hub that has no deployments API (404) leaves the
    /// device without one: a WARN names the device, and the fleet goes on. A different deployment
    /// (a reload changed the template) writes the device again and applies it.
    pub async fn device(
        &self,
        service: &ServiceClient,
        device_id: &str,
        key: &Key,
        deployment: Option<&serde_json::Value>,
    ) -> Result<(), ServiceError> {
        let cell = {
            let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
            let entry = devices.entry(device_id.to_owned()).or_default();
            if entry.0.as_ref() != deployment {
                *entry = (deployment.cloned(), Arc::default());
            }
            entry.1.clone()
        };
        cell.get_or_try_init(|| async {
            let Some(content) = deployment else { return service.ensure_device(device_id, key).await };
            service.ensure_edge_device(device_id, key).await?;
            match service.apply_configuration(device_id, content).await {
                Err(ServiceError::Status { status: 404, error_code, .. }) => {
                    tracing::warn!(
                        device = %device_id,
                        %error_code,
                        "the hub answered 404 to applyConfigurationContent: this Edge device has no deployment \
                         (no routes, no module desired properties from it)"
                    );
                    Ok(())
                }
                other => other,
            }
        })
        .await
        .map(|_| ())
    }

    /// Forgets a device (the hub refused it as unknown: `device::recovery`), so the next `device`
    /// call writes it again. Several of its identities may each forget it; the extra calls find
    /// the device there with the fleet's key and write nothing (`ensure_identity`).
    pub fn forget(&self, device_id: &str) {
        self.devices.lock().unwrap_or_else(|p| p.into_inner()).remove(device_id);
    }
}
