//! IoT Hub's device REST API, the device's side: send device-to-cloud messages (one, or several
//! as a batch), poll for cloud-to-device messages and complete them by lock token (Microsoft docs,
//! IoT Hub REST: "Send Device Event", "Receive Device Bound Notification", "Complete Device Bound
//! Notification"). IoT Hub has no twins and no direct methods over HTTPS, so neither is here.
//!
//! Requests carry the identity's SAS token in `Authorization`; errors name the method, the path
//! (ids only) and the hub's error code, never the token.

use std::sync::Arc;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::iot::encoding::url_encode;
use crate::iot::https_headers;
use crate::iot::property_bag::PropertyBag;

/// The service version the requests name: what Microsoft's Node HTTP device client sends.
pub const API_VERSION: &str = "2020-09-30";
/// The content type of a batch (Microsoft docs, "Send Device Event": a JSON array of messages).
pub const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.json";
/// Largest answer read (a C2D message is at most 64 KB; the rest is headroom for error bodies).
const MAX_ANSWER: usize = 256 * 1024;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The hub answered with an error status; `detail` has its error code and message.
    #[error("{what} answered {status}: {detail}")]
    Status { what: String, status: u16, detail: String },
    /// No answer: DNS, TCP, TLS, a timeout, a body cut short.
    #[error("{what}: {detail}")]
    Transport { what: String, detail: String },
}

impl HttpError {
    /// The status, when the hub answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            HttpError::Transport { .. } => None,
        }
    }
}

/// A cloud-to-device poll's answer.
#[derive(Debug, PartialEq)]
pub enum Received {
    /// 204: nothing waiting.
    Empty,
    /// A message, locked for this device until completed (or the hub's lock timeout passes).
    Message { lock: String, properties: PropertyBag, body: Bytes },
}

/// One identity's device REST client: cheap to clone (the HTTP client and the strings are shared).
#[derive(Clone)]
pub struct DeviceHttp {
    http: reqwest::Client,
    /// `https://{host}:{port}/devices/{id}` or `.../devices/{id}/modules/{mid}`, ids percent-encoded.
    base: Arc<str>,
    /// The same without scheme and host, for error messages.
    path: Arc<str>,
    auth: HeaderValue,
}

impl std::fmt::Debug for DeviceHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHttp").field("base", &self.base).finish_non_exhaustive()
    }
}

impl DeviceHttp {
    /// A client for `device_id` (or its module `module_id`) at `host:port`, authorized by
    /// `token` (a `SharedAccessSignature sr=...` string). Fails only if the token cannot be a
    /// header value.
    pub fn new(
        http: reqwest::Client,
        host: &str,
        port: u16,
        device_id: &str,
        module_id: Option<&str>,
        token: &str,
    ) -> Result<DeviceHttp, HttpError> {
        let path = match module_id {
            Some(m) => format!("/devices/{}/modules/{}", url_encode(device_id), url_encode(m)),
            None => format!("/devices/{}", url_encode(device_id)),
        };
        let mut auth = HeaderValue::from_str(token).map_err(|_| HttpError::Transport {
            what: format!("requests to {path}"),
            detail: "the SAS token is not a valid header value".to_owned(),
        })?;
        auth.set_sensitive(true);
        Ok(DeviceHttp { http, base: format!("https://{host}:{port}{path}").into(), path: path.into(), auth })
    }

    /// Sends `messages` (at least one): a single message as the body with its properties as
    /// headers, several as one batch. A single message whose property values cannot be header
    /// values (control characters) goes as a batch of one, where they are JSON strings.
    pub async fn send(&self, messages: &[(PropertyBag, Bytes)]) -> Result<(), HttpError> {
        let url = format!("{}/messages/events?api-version={API_VERSION}", self.base);
        let what = || format!("POST {}/messages/events", self.path);
        let single = match messages {
            [(properties, body)] => headers_of(properties).map(|h| (h, body.clone())),
            _ => None,
        };
        let request = match single {
            Some((headers, body)) => self.http.post(url).headers(headers).body(body),
            None => self
                .http
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, BATCH_CONTENT_TYPE)
                .body(batch_body(messages).to_string()),
        };
        let resp = request.header(reqwest::header::AUTHORIZATION, self.auth.clone()).send().await;
        let resp = resp.map_err(|e| transport(what(), &e))?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(refusal(what(), resp).await)
    }

    /// Polls for one cloud-to-device message.
    pub async fn receive(&self) -> Result<Received, HttpError> {
        let url = format!("{}/messages/deviceBound?api-version={API_VERSION}", self.base);
        let what = || format!("GET {}/messages/deviceBound", self.path);
        let resp = self.http.get(url).header(reqwest::header::AUTHORIZATION, self.auth.clone()).send().await;
        let mut resp = resp.map_err(|e| transport(what(), &e))?;
        match resp.status().as_u16() {
            204 => Ok(Received::Empty),
            200 => {
                let lock = resp
                    .headers()
                    .get(reqwest::header::ETAG)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| v.trim().trim_matches('"').to_owned())
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| HttpError::Status {
                        what: what(),
                        status: 200,
                        detail: "a message without an ETag (its lock token)".to_owned(),
                    })?;
                let properties = https_headers::from_headers(
                    resp.headers().iter().filter_map(|(h, v)| Some((h.as_str(), v.to_str().ok()?))),
                );
                let body =
                    read_capped(&mut resp).await.map_err(|detail| HttpError::Transport { what: what(), detail })?;
                Ok(Received::Message { lock, properties, body })
            }
            _ => Err(refusal(what(), resp).await),
        }
    }

    /// Completes (deletes) the message locked under `lock`.
    pub async fn complete(&self, lock: &str) -> Result<(), HttpError> {
        let url = format!("{}/messages/deviceBound/{}?api-version={API_VERSION}", self.base, url_encode(lock));
        let what = || format!("DELETE {}/messages/deviceBound/{{lockToken}}", self.path);
        let resp = self.http.delete(url).header(reqwest::header::AUTHORIZATION, self.auth.clone()).send().await;
        let resp = resp.map_err(|e| transport(what(), &e))?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(refusal(what(), resp).await)
    }
}

/// The headers of a single message, or `None` if a property value cannot be a header value.
fn headers_of(properties: &PropertyBag) -> Option<HeaderMap> {
    let mut map = HeaderMap::new();
    for (name, value) in https_headers::to_headers(properties) {
        let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
        map.append(name, HeaderValue::from_str(&value).ok()?);
    }
    Some(map)
}

/// A batch: `[{"body": <base64>, "base64Encoded": true, "properties": {<header>: <value>}}]`.
pub fn batch_body(messages: &[(PropertyBag, Bytes)]) -> serde_json::Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    messages
        .iter()
        .map(|(properties, body)| {
            let props: serde_json::Map<String, serde_json::Value> =
                https_headers::to_headers(properties).into_iter().map(|(h, v)| (h, v.into())).collect();
            serde_json::json!({"body": b64.encode(body), "base64Encoded": true, "properties": props})
        })
        .collect()
}

fn transport(what: String, e: &reqwest::Error) -> HttpError {
    HttpError::Transport { what, detail: crate::sys::error_chain(e) }
}

/// An error answer: the status, IoT Hub's `iothub-errorcode` header and the start of the body
/// (its `Message` says why).
async fn refusal(what: String, mut resp: reqwest::Response) -> HttpError {
    let status = resp.status().as_u16();
    let code = resp.headers().get("iothub-errorcode").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = read_capped(&mut resp).await.unwrap_or_default();
    let text: String = String::from_utf8_lossy(&body).trim().chars().take(300).collect();
    let detail = match (code, text.is_empty()) {
        (Some(c), false) => format!("{c}: {text}"),
        (Some(c), true) => c,
        (None, false) => text,
        (None, true) => "(no body)".to_owned(),
    };
    HttpError::Status { what, status, detail }
}

/// The answer's body, refusing more than `MAX_ANSWER` bytes.
async fn read_capped(resp: &mut reqwest::Response) -> Result<Bytes, String> {
    let mut out = BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| crate::sys::error_chain(&e))? {
        if out.len() + chunk.len() > MAX_ANSWER {
            return Err(format!("an answer over {MAX_ANSWER} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_carries_bodies_in_base64_and_properties_by_header_name() {
        let mut p = PropertyBag::default();
        p.push("$.ct", "application/json");
        p.push("fleetsim-seq", "run:7");
        let b = batch_body(&[(p, Bytes::from_static(b"{\"t\":1}")), (PropertyBag::default(), Bytes::new())]);
        assert_eq!(
            b,
            serde_json::json!([
                {"body": "eyJ0IjoxfQ==", "base64Encoded": true,
                 "properties": {"iothub-contenttype": "application/json", "iothub-app-fleetsim-seq": "run:7"}},
                {"body": "", "base64Encoded": true, "properties": {}}
            ])
        );
    }

    #[test]
    fn values_that_cannot_be_headers_are_noticed() {
        let mut ok = PropertyBag::default();
        ok.push("alert", "high temp");
        assert!(headers_of(&ok).is_some());
        let mut bad = PropertyBag::default();
        bad.push("alert", "line\nbreak");
        assert!(headers_of(&bad).is_none());
    }

    #[test]
    fn the_token_stays_out_of_debug_output() {
        let c =
            DeviceHttp::new(reqwest::Client::new(), "h", 443, "d 1", None, "SharedAccessSignature sig=secret").unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("/devices/d%201"), "{shown}");
    }
}
