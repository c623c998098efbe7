//! Error responses. IoT Hub's carry `ErrorCode`, `Message` and `ExceptionMessage` plus an
//! `iothub-errorcode` header (protocol.md §6.7); DPS's carry `errorCode`, `trackingId`, `message`
//! and `timestampUtc` (§3.3). Codes are HTTP status x 1000 + a sub-code.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::iot::time::iso8601;

#[derive(Debug)]
enum Style {
    Hub { name: &'static str },
    Dps,
}

/// An error response; boxed so that `Result<_, ApiError>` stays one pointer wide.
#[derive(Debug)]
pub struct ApiError(Box<Inner>);

#[derive(Debug)]
struct Inner {
    status: StatusCode,
    code: u32,
    style: Style,
    message: String,
    info: Option<Value>,
    retry_after: Option<u64>,
}

/// `result` once every change it acknowledges is durable (the store's ticket, taken now); a 500
/// `ServerError` instead when the store could not commit. Awaited whatever `result` is, because
/// a refusal can follow changes already made (a bulk request's earlier entries).
pub async fn after_commit(
    hub: &crate::hub::state::HubState,
    result: Result<Response, ApiError>,
) -> Result<Response, ApiError> {
    if hub.store.durable().await.is_err() {
        return Err(ApiError::hub(500, 500001, "ServerError", "the change could not be stored"));
    }
    result
}

impl ApiError {
    /// An IoT Hub service error, e.g. `(404, 404001, "DeviceNotFound", ..)`.
    pub fn hub(status: u16, code: u32, name: &'static str, message: impl Into<String>) -> ApiError {
        ApiError(Box::new(Inner {
            status: StatusCode::from_u16(status).expect("valid status"),
            code,
            style: Style::Hub { name },
            message: message.into(),
            info: None,
            retry_after: None,
        }))
    }

    pub fn dps(status: u16, code: u32, message: impl Into<String>) -> ApiError {
        ApiError(Box::new(Inner {
            status: StatusCode::from_u16(status).expect("valid status"),
            code,
            style: Style::Dps,
            message: message.into(),
            info: None,
            retry_after: None,
        }))
    }

    pub fn with_info(mut self, info: Value) -> ApiError {
        self.0.info = Some(info);
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> ApiError {
        self.0.retry_after = Some(secs);
        self
    }

    /// HTTP status, IoT Hub error name (empty for DPS errors) and message: what a bulk operation
    /// reports per device instead of failing the whole request.
    pub fn parts(&self) -> (u16, &'static str, &str) {
        let name = match self.0.style {
            Style::Hub { name } => name,
            Style::Dps => "",
        };
        (self.0.status.as_u16(), name, &self.0.message)
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::hub(400, 400004, "ArgumentInvalid", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::hub(401, 401002, "IotHubUnauthorizedAccess", message)
    }

    pub fn device_not_found(id: &str) -> ApiError {
        ApiError::hub(404, 404001, "DeviceNotFound", format!("Device {id} not registered"))
    }

    pub fn module_not_found(device: &str, module: &str) -> ApiError {
        ApiError::hub(404, 404010, "ModuleNotFound", format!("Module {module} on device {device} not registered"))
    }

    pub fn precondition_failed() -> ApiError {
        ApiError::hub(412, 412001, "PreconditionFailed", "The etag in If-Match does not match the current one")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = *self.0;
        let tracking = uuid::Uuid::new_v4().simple().to_string();
        let now = crate::hub::clock::wall();
        let (body, header) = match e.style {
            Style::Hub { name } => {
                let mut body = json!({
                    "ErrorCode": name,
                    "Message": format!("ErrorCode:{name};{}", e.message),
                    "ExceptionMessage": format!("Tracking ID:{tracking}-TimeStamp:{}", iso8601(now)),
                    "errorCode": e.code,
                });
                if let Some(info) = e.info {
                    body["info"] = info;
                }
                (body, Some(name))
            }
            Style::Dps => (
                json!({ "errorCode": e.code, "trackingId": tracking, "message": e.message, "timestampUtc": iso8601(now) }),
                None,
            ),
        };
        let mut resp = (e.status, axum::Json(body)).into_response();
        if let Some(name) = header {
            resp.headers_mut().insert("iothub-errorcode", HeaderValue::from_static(name));
        }
        if let Some(secs) = e.retry_after {
            resp.headers_mut().insert("retry-after", HeaderValue::from(secs));
        }
        resp
    }
}
