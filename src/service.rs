//! A client for the hub's service REST API, signed with a shared access policy from a service
//! connection string: what the fleet needs (creating identities, probing methods, reading the
//! emulator's loss counts) and what the operator commands need (devices, twins, methods, queries).
//! Works against the emulator and a real IoT Hub alike; the `/emulator/` calls only the former.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::iot::connection_string::ConnectionString;
use crate::iot::encoding::url_encode;
use crate::iot::sas::{Key, sign_token};
use crate::iot::time::unix_secs;

const API_VERSION: &str = "2021-04-12";

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
    /// A non-2xx answer: the hub's error code and its message (IoT Hub puts the reason there:
    /// which argument of a query is invalid, which device was not found).
    #[error("the service API answered {status}: {error_code}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Status { status: u16, error_code: String, message: String },
    /// No answer: the URL (never a token: the signature travels in a header) and every cause.
    #[error("the service API could not be reached: {0}")]
    Unreachable(String),
    #[error("the connection string is not a service (policy) connection string")]
    NotService,
}

impl ServiceError {
    /// The HTTP status, or 0 when there was no answer.
    pub fn status(&self) -> u16 {
        match self {
            ServiceError::Status { status, .. } => *status,
            _ => 0,
        }
    }
}

/// A direct method's answer: the device's status and payload.
#[derive(Debug, Clone)]
pub struct MethodResult {
    pub status: i64,
    pub payload: Value,
}

/// How a load test counts a method call: `Ok` for a 2xx answer from the device; otherwise a label
/// by who failed it, `device_<status>` or `hub_<status>` (`hub_0`: no answer at all).
pub fn method_outcome(r: &Result<MethodResult, ServiceError>) -> Result<(), String> {
    match r {
        Ok(res) if (200..300).contains(&res.status) => Ok(()),
        Ok(res) => Err(format!("device_{}", res.status)),
        Err(e) => Err(format!("hub_{}", e.status())),
    }
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

    /// One request; a non-2xx answer is an error carrying the hub's error code and message.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, Value), ServiceError> {
        self.exchange(method, path, body, headers).await.map(|(status, _, value)| (status, value))
    }

    /// `request`, also returning the `x-ms-continuation` header (query pages).
    async fn exchange(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, Option<String>, Value), ServiceError> {
        // A path may bring its own api-version (DPS's service API has other versions than IoT Hub's).
        let url = match (path.contains("api-version="), path.contains('?')) {
            (true, _) => format!("https://{}{path}", self.base),
            (false, true) => format!("https://{}{path}&api-version={API_VERSION}", self.base),
            (false, false) => format!("https://{}{path}?api-version={API_VERSION}", self.base),
        };
        let mut req = self.http.request(method, url).header("authorization", self.token());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let unreachable = |e: reqwest::Error| ServiceError::Unreachable(crate::sys::error_chain(&e));
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status().as_u16();
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let (mut error_code, continuation) =
            (header("iothub-errorcode").unwrap_or_default(), header("x-ms-continuation"));
        let bytes = resp.bytes().await.map_err(unreachable)?;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        if (200..300).contains(&status) {
            return Ok((status, continuation, value));
        }
        let message = value
            .get("Message")
            .or_else(|| value.get("message"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if error_code.is_empty() {
            error_code = value.get("ErrorCode").and_then(Value::as_str).unwrap_or("(no error code)").to_owned();
        }
        Err(ServiceError::Status { status, error_code, message })
    }

    fn path(device: &str, module: Option<&str>) -> String {
        match module {
            Some(m) => format!("/twins/{}/modules/{}", url_encode(device), url_encode(m)),
            None => format!("/twins/{}", url_encode(device)),
        }
    }

    /// Invokes a direct method and waits for the device's answer.
    pub async fn invoke(
        &self,
        device: &str,
        module: Option<&str>,
        method: &str,
        payload: &Value,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<MethodResult, ServiceError> {
        let body = json!({
            "methodName": method,
            "payload": payload,
            "responseTimeoutInSeconds": response_timeout.as_secs().max(5),
            "connectTimeoutInSeconds": connect_timeout.as_secs(),
        });
        let path = format!("{}/methods", Self::path(device, module));
        let (_, v) = self.request(reqwest::Method::POST, &path, Some(&body), &[]).await?;
        Ok(MethodResult { status: v["status"].as_i64().unwrap_or(0), payload: v["payload"].clone() })
    }

    pub async fn twin(&self, device: &str, module: Option<&str>) -> Result<Value, ServiceError> {
        self.request(reqwest::Method::GET, &Self::path(device, module), None, &[]).await.map(|(_, v)| v)
    }

    /// Merges `desired` into the twin's desired properties; returns the updated twin.
    pub async fn patch_desired(
        &self,
        device: &str,
        module: Option<&str>,
        desired: &Value,
    ) -> Result<Value, ServiceError> {
        let body = json!({"properties": {"desired": desired}});
        let path = Self::path(device, module);
        self.request(reqwest::Method::PATCH, &path, Some(&body), &[("if-match", "*")]).await.map(|(_, v)| v)
    }

    /// Runs a twin query (`SELECT * FROM devices WHERE ...`), following continuation tokens.
    pub async fn query(&self, sql: &str, limit: usize) -> Result<Vec<Value>, ServiceError> {
        let mut out = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut headers = vec![("x-ms-max-item-count", "1000")];
            if let Some(c) = &continuation {
                headers.push(("x-ms-continuation", c.as_str()));
            }
            let body = json!({"query": sql});
            let (_, next, v) = self.exchange(reqwest::Method::POST, "/devices/query", Some(&body), &headers).await?;
            out.extend(v.as_array().cloned().unwrap_or_default());
            match next {
                Some(c) if !c.is_empty() && out.len() < limit => continuation = Some(c),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// The emulator's sequence-number summary for one fleet run.
    pub async fn sequence_summary(&self, run: &str) -> Result<Value, ServiceError> {
        let path = format!("/emulator/telemetry/sequence?run={}", url_encode(run));
        self.request(reqwest::Method::GET, &path, None, &[]).await.map(|(_, v)| v)
    }
}

/// An HTTPS client for the service API trusting `tls`'s roots (HTTP/2 where offered).
pub fn https_client(tls: &std::sync::Arc<rustls::ClientConfig>) -> anyhow::Result<reqwest::Client> {
    let mut cfg = rustls::ClientConfig::clone(tls);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(cfg)
        .pool_max_idle_per_host(32)
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))
}
