//! The device side of DPS (protocol.md §3.3-3.4): register, then poll the operation until it is
//! assigned, honouring `Retry-After` and 429s, over HTTPS (one shared HTTP/2 client) or MQTT.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Subscribe};
use serde_json::Value;

use crate::client::mqtt::MqttConn;
use crate::client::transport::{self, Endpoint};
use crate::iot::dps::{OperationStatus, RegistrationRequest};
use crate::iot::sas::{Key, sign_token};
use crate::iot::time::unix_secs;
use crate::iot::topic::{self, CloudPublish};
use crate::iot::username::dps_username;

/// Where DPS is.
#[derive(Debug, Clone)]
pub struct DpsEndpoint {
    pub host: String,
    pub https_port: u16,
    pub mqtt_port: u16,
    pub id_scope: String,
}

/// The hub and device id a registration was assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub assigned_hub: String,
    pub device_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// Wrong key, unknown registration: retrying will not help. The status and what DPS said.
    #[error("DPS refused the registration: {0} {1}")]
    Unauthorized(u16, String),
    #[error("DPS throttled the registration")]
    Throttled { retry_after: Duration },
    #[error("the registration failed: {0}")]
    Failed(String),
    #[error("DPS could not be reached: {0}")]
    Unreachable(String),
    #[error("DPS did not assign the device in time")]
    Timeout,
}

/// How many polls before giving up (at least 1 s apart, as DPS asks).
const MAX_POLLS: usize = 60;
const DEFAULT_RETRY: Duration = Duration::from_secs(2);

fn token(ep: &DpsEndpoint, reg: &str, key: &Key) -> String {
    sign_token(
        &format!("{}/registrations/{reg}", ep.id_scope),
        key,
        unix_secs(SystemTime::now()) + 3600,
        Some("registration"),
    )
}

fn finish(status: OperationStatus) -> Result<Option<Assignment>, ProvisionError> {
    match status.status.as_str() {
        "assigned" => {
            let s = status
                .registration_state
                .ok_or_else(|| ProvisionError::Failed("assigned without a registration state".into()))?;
            match (s.assigned_hub, s.device_id) {
                (Some(assigned_hub), Some(device_id)) => Ok(Some(Assignment { assigned_hub, device_id })),
                _ => Err(ProvisionError::Failed("assigned without a hub or device id".into())),
            }
        }
        "assigning" | "unassigned" => Ok(None),
        other => {
            let msg = status.registration_state.and_then(|s| s.error_message).unwrap_or_default();
            Err(ProvisionError::Failed(format!("status {other} {msg}")))
        }
    }
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Duration {
    headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .map_or(DEFAULT_RETRY, |s| Duration::from_secs(s.max(1)))
}

/// A refusal's body, shortened: DPS says why in it (`{"errorCode":401002,"message":...}`).
async fn answer(resp: reqwest::Response) -> String {
    let text = resp.text().await.unwrap_or_default();
    let text = text.trim();
    if text.is_empty() {
        return "(no body)".to_owned();
    }
    text.chars().take(300).collect()
}

pub async fn register_https(
    http: &reqwest::Client,
    ep: &DpsEndpoint,
    reg: &str,
    key: &Key,
    payload: Option<Value>,
) -> Result<Assignment, ProvisionError> {
    let base = format!("https://{}:{}/{}/registrations/{reg}", ep.host, ep.https_port, ep.id_scope);
    let auth = token(ep, reg, key);
    let body = RegistrationRequest { registration_id: Some(reg.to_owned()), payload };
    // The URL names the scope and registration id, never a key: it says where we tried to go.
    let unreachable = |e: reqwest::Error| ProvisionError::Unreachable(crate::sys::error_chain(&e));
    let resp = http
        .put(format!("{base}/register?api-version=2019-03-31"))
        .header("authorization", &auth)
        .json(&body)
        .send()
        .await
        .map_err(unreachable)?;
    let status = resp.status().as_u16();
    let wait = retry_after(resp.headers());
    if !(200..=299).contains(&status) && status != 429 {
        let body = answer(resp).await;
        let at = format!("PUT https://{}:{}/{}/registrations/{reg}/register", ep.host, ep.https_port, ep.id_scope);
        return Err(match status {
            401 | 403 | 404 => ProvisionError::Unauthorized(status, format!("from {at}: {body}")),
            s if s >= 500 => ProvisionError::Unreachable(format!("{at} answered {s}: {body}")),
            s => ProvisionError::Failed(format!("{at} answered {s}: {body}")),
        });
    }
    if status == 429 {
        return Err(ProvisionError::Throttled { retry_after: wait });
    }
    let op: OperationStatus = resp.json().await.map_err(unreachable)?;
    if let Some(a) = finish(op.clone())? {
        return Ok(a);
    }
    let mut wait = wait;
    for _ in 0..MAX_POLLS {
        tokio::time::sleep(wait).await;
        let url = format!("{base}/operations/{}?api-version=2019-03-31", op.operation_id);
        let resp = http.get(url).header("authorization", &auth).send().await.map_err(unreachable)?;
        let status = resp.status().as_u16();
        wait = retry_after(resp.headers());
        match status {
            200..=299 => {
                if let Some(a) = finish(resp.json().await.map_err(unreachable)?)? {
                    return Ok(a);
                }
            }
            // Throttled or busy: keep polling after the time DPS asked for.
            429 | 500..=599 => {}
            401 | 403 => return Err(ProvisionError::Unauthorized(status, answer(resp).await)),
            s => return Err(ProvisionError::Failed(format!("DPS answered {s} while polling: {}", answer(resp).await))),
        }
    }
    Err(ProvisionError::Timeout)
}

pub async fn register_mqtt(
    tls: Arc<rustls::ClientConfig>,
    ep: &DpsEndpoint,
    reg: &str,
    key: &Key,
    payload: Option<Value>,
) -> Result<Assignment, ProvisionError> {
    let endpoint = Endpoint { host: ep.host.clone(), port: ep.mqtt_port, websocket: false };
    let io = transport::open(&endpoint, tls).await.map_err(|e| {
        ProvisionError::Unreachable(format!(
            "{}:{} (MQTT): {}",
            endpoint.host,
            endpoint.port,
            crate::sys::error_chain(&e)
        ))
    })?;
    let mut c = MqttConn::connect(
        io,
        reg,
        &dps_username(&ep.id_scope, reg),
        &token(ep, reg, key),
        120,
        Duration::from_secs(30),
    )
    .await
    .map_err(|e| {
        if e.is_auth() {
            ProvisionError::Unauthorized(401, e.to_string())
        } else {
            ProvisionError::Unreachable(e.to_string())
        }
    })?;
    let result = mqtt_flow(&mut c, reg, payload).await;
    c.disconnect().await;
    result
}

async fn mqtt_flow(c: &mut MqttConn, reg: &str, payload: Option<Value>) -> Result<Assignment, ProvisionError> {
    let io = |e: std::io::Error| ProvisionError::Unreachable(e.to_string());
    let mut sub = Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce);
    sub.pkid = c.pkid();
    c.queue(Packet::Subscribe(sub));
    let body = serde_json::to_vec(&RegistrationRequest { registration_id: Some(reg.to_owned()), payload })
        .expect("serializable");
    c.publish(topic::dps_register("1"), body, QoS::AtLeastOnce);
    c.flush().await.map_err(io)?;
    for poll in 0..=MAX_POLLS {
        let (status, retry, body) = tokio::time::timeout(Duration::from_secs(30), next_response(c))
            .await
            .map_err(|_| ProvisionError::Timeout)??;
        match status {
            200..=299 => {
                let op: OperationStatus =
                    serde_json::from_slice(&body).map_err(|e| ProvisionError::Failed(e.to_string()))?;
                if let Some(a) = finish(op.clone())? {
                    return Ok(a);
                }
                tokio::time::sleep(retry).await;
                c.publish(topic::dps_poll(&format!("p{poll}"), &op.operation_id), " ", QoS::AtLeastOnce);
                c.flush().await.map_err(io)?;
            }
            429 => return Err(ProvisionError::Throttled { retry_after: retry }),
            401 | 403 | 404 => {
                return Err(ProvisionError::Unauthorized(status, String::from_utf8_lossy(&body).into_owned()));
            }
            s => return Err(ProvisionError::Failed(format!("DPS answered {s}: {}", String::from_utf8_lossy(&body)))),
        }
    }
    Err(ProvisionError::Timeout)
}

/// The next `$dps/registrations/res/...` publish: status, retry-after, body.
async fn next_response(c: &mut MqttConn) -> Result<(u16, Duration, bytes::Bytes), ProvisionError> {
    loop {
        while let Some(p) = c.next_packet().map_err(|e| ProvisionError::Failed(e.to_string()))? {
            if let Packet::Publish(p) = p {
                if p.qos == QoS::AtLeastOnce {
                    c.queue(Packet::PubAck(PubAck::new(p.pkid)));
                }
                if let Ok(CloudPublish::DpsResponse { status, retry_after, .. }) = CloudPublish::parse(&p.topic) {
                    let wait = retry_after.map_or(DEFAULT_RETRY, |s| Duration::from_secs(s.max(1)));
                    return Ok((status, wait, p.payload));
                }
            }
        }
        c.flush().await.map_err(|e| ProvisionError::Unreachable(e.to_string()))?;
        if c.fill().await.map_err(|e| ProvisionError::Unreachable(e.to_string()))? == 0 {
            return Err(ProvisionError::Unreachable("DPS closed the connection".into()));
        }
    }
}
