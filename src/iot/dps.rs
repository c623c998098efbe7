//! DPS device-API messages (protocol.md §3.3-3.4): the register request, the operation status that
//! both the HTTPS and the MQTT flows return, and the error body.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Body of a register request. `payload` may be absent or null (the Python SDK sends null).
/// A registration id DPS accepts: alphanumerics and `-._:`, at most 128, ending in an
/// alphanumeric or `-` (protocol.md §3.1). Also a valid IoT Hub device id.
pub fn valid_registration_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
        && id.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRequest {
    #[serde(default)]
    pub registration_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

impl RegistrationRequest {
    /// The Plug and Play model id in the payload, in any of the three shapes IoT Central has used.
    pub fn model_id(&self) -> Option<String> {
        let p = self.payload.as_ref()?;
        let s = p
            .get("modelId")
            .or_else(|| p.get("iotcModelId"))
            .or_else(|| p.get("__iot:interfaces")?.get("CapabilityModelId"))?;
        s.as_str().map(str::to_owned)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OperationStatus {
    pub operation_id: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<RegistrationState>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationState {
    pub registration_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

/// A request-level DPS error (`errorCode` = HTTP status x 1000 + sub-code).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DpsError {
    pub error_code: u32,
    pub tracking_id: String,
    pub message: String,
    pub timestamp_utc: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_requests_from_every_sdk() {
        let py: RegistrationRequest = serde_json::from_value(json!({"payload": null, "registrationId": "d"})).unwrap();
        assert_eq!((py.registration_id.as_deref(), py.model_id()), (Some("d"), None));
        let pnp: RegistrationRequest =
            serde_json::from_value(json!({"registrationId": "d", "payload": {"modelId": "dtmi:a;1"}})).unwrap();
        assert_eq!(pnp.model_id().as_deref(), Some("dtmi:a;1"));
        let old: RegistrationRequest =
            serde_json::from_value(json!({"payload": {"__iot:interfaces": {"CapabilityModelId": "urn:x:1"}}})).unwrap();
        assert_eq!(old.model_id().as_deref(), Some("urn:x:1"));
        let iotc: RegistrationRequest = serde_json::from_value(json!({"payload": {"iotcModelId": "urn:y:1"}})).unwrap();
        assert_eq!(iotc.model_id().as_deref(), Some("urn:y:1"));
    }

    #[test]
    fn writes_camel_case_status() {
        let s = OperationStatus {
            operation_id: "op".into(),
            status: "assigned".into(),
            registration_state: Some(RegistrationState {
                registration_id: "d".into(),
                assigned_hub: Some("h".into()),
                status: "assigned".into(),
                ..Default::default()
            }),
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v,
            json!({"operationId": "op", "status": "assigned", "registrationState": {"registrationId": "d", "assignedHub": "h", "status": "assigned"}})
        );
    }
}
