//! Cloud-to-device messages from the service side over AMQP, as IoT Hub's service SDKs send
//! them ("Send cloud-to-device messages from an IoT hub"): a sender link on
//! `/messages/devicebound`, each message's `to` naming its device
//! (`/devices/{id}/messages/devicebound`), the application property `iothub-ack` asking for
//! feedback; and the feedback receiver on `/messages/servicebound/feedback`, whose messages are
//! JSON arrays of records (`originalMessageId`, `statusCode`, `description`, `deviceId`,
//! `enqueuedTimeUtc`; "Message feedback").

use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail};
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Data, Message, MessageId, Outcome, Properties};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Timestamp, Value};
use serde::{Deserialize, Serialize};

use super::amqp::{Link, within};
use crate::iot::encoding::url_encode;

pub const DEVICEBOUND: &str = "/messages/devicebound";
pub const FEEDBACK: &str = "/messages/servicebound/feedback";

/// The feedback a message asks for (`iothub-ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    None,
    Positive,
    Negative,
    Full,
}

impl Ack {
    pub fn as_str(self) -> &'static str {
        match self {
            Ack::None => "none",
            Ack::Positive => "positive",
            Ack::Negative => "negative",
            Ack::Full => "full",
        }
    }
}

impl std::str::FromStr for Ack {
    type Err = String;

    fn from_str(s: &str) -> Result<Ack, String> {
        match s {
            "none" => Ok(Ack::None),
            "positive" => Ok(Ack::Positive),
            "negative" => Ok(Ack::Negative),
            "full" => Ok(Ack::Full),
            other => Err(format!("`{other}` is not none, positive, negative or full")),
        }
    }
}

/// One message to one device.
#[derive(Debug, Clone)]
pub struct C2dMessage {
    pub device_id: String,
    pub message_id: String,
    pub correlation_id: Option<String>,
    pub body: Vec<u8>,
    pub properties: Vec<(String, String)>,
    pub ack: Ack,
    /// Time to live; the hub's default when `None`.
    pub ttl: Option<Duration>,
}

/// One feedback record, as IoT Hub writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackRecord {
    pub original_message_id: String,
    /// `Success`, `Expired`, `DeliveryCountExceeded`, `Rejected` or `Purged`.
    pub status_code: String,
    #[serde(default)]
    pub description: String,
    pub device_id: String,
    #[serde(default)]
    pub enqueued_time_utc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_generation_id: Option<String>,
}

/// The records of one feedback message's body.
pub fn parse_feedback(body: &[u8]) -> Result<Vec<FeedbackRecord>, String> {
    serde_json::from_slice(body).map_err(|e| format!("a feedback message is not a JSON array of records: {e}"))
}

fn to_amqp(m: &C2dMessage) -> Message<Body<Value>> {
    let mut app = ApplicationProperties::default();
    for (k, v) in &m.properties {
        app.0.insert(k.clone(), SimpleValue::String(v.clone()));
    }
    app.0.insert("iothub-ack".into(), SimpleValue::String(m.ack.as_str().into()));
    let expiry = m.ttl.map(|ttl| {
        let at = SystemTime::now() + ttl;
        Timestamp::from_milliseconds(super::consumer::unix_ms(at))
    });
    Message::builder()
        .properties(Properties {
            message_id: Some(MessageId::String(m.message_id.clone())),
            correlation_id: m.correlation_id.clone().map(MessageId::String),
            to: Some(format!("/devices/{}/messages/devicebound", url_encode(&m.device_id))),
            absolute_expiry_time: expiry,
            ..Default::default()
        })
        .application_properties(app)
        .body(Body::Data(vec![Data(Binary::from(m.body.clone()))].into()))
        .build()
}

/// Sends one message and waits for the hub to accept it; a rejection carries the hub's
/// description (an unknown device, a full queue, a message too large).
pub async fn send(link: &mut Link, m: &C2dMessage) -> anyhow::Result<()> {
    let name = format!("fleetsim-c2d-{}", uuid::Uuid::new_v4());
    let mut sender =
        within("attaching /messages/devicebound", Sender::attach(&mut link.session, name, DEVICEBOUND)).await?;
    let outcome = within("sending the message", sender.send(to_amqp(m))).await;
    let _ = sender.close().await;
    match outcome? {
        Outcome::Accepted(_) => Ok(()),
        Outcome::Rejected(r) => {
            let why = r.error.map(|e| e.description.unwrap_or_else(|| format!("{:?}", e.condition)));
            bail!("the hub rejected the message: {}", why.unwrap_or_else(|| "no reason given".into()))
        }
        other => bail!("the hub did not accept the message: {other:?}"),
    }
}

/// Reads feedback batches until one holds a record for `message_id`, accepting every batch (as
/// the service SDKs' feedback receivers do), or fails after `timeout`.
pub async fn wait_feedback(link: &mut Link, message_id: &str, timeout: Duration) -> anyhow::Result<FeedbackRecord> {
    let name = format!("fleetsim-feedback-{}", uuid::Uuid::new_v4());
    let receiver = Receiver::builder()
        .name(name)
        .source(FEEDBACK)
        .target("fleetsim-feedback")
        .auto_accept(true)
        .attach(&mut link.session);
    let mut receiver = within("attaching /messages/servicebound/feedback", receiver).await?;
    let found = tokio::time::timeout(timeout, async {
        loop {
            let d = receiver.recv::<Body<Value>>().await.map_err(|e| anyhow!("reading feedback: {e}"))?;
            let body: Vec<u8> = match d.body() {
                Body::Data(batch) => batch.iter().flat_map(|x| x.0.iter().copied()).collect(),
                Body::Value(v) => match &v.0 {
                    Value::Binary(b) => b.to_vec(),
                    Value::String(s) => s.clone().into_bytes(),
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            };
            let records = parse_feedback(&body).map_err(|e| anyhow!(e))?;
            if let Some(r) = records.into_iter().find(|r| r.original_message_id == message_id) {
                return anyhow::Ok(r);
            }
        }
    })
    .await;
    let _ = receiver.close().await;
    found.map_err(|_| anyhow!("no feedback for message {message_id} within {}s", timeout.as_secs()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_records_read_as_documented() {
        // The example record of "Message feedback" in the IoT Hub C2D documentation.
        let body = br#"[{"originalMessageId":"0987654321","enqueuedTimeUtc":"2015-07-28T16:24:48.789Z",
            "statusCode":"Success","description":"Success","deviceId":"123","deviceGenerationId":"abcdefghijklmnopqrstuvwxyz"}]"#;
        let r = parse_feedback(body).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].original_message_id.as_str(), r[0].status_code.as_str(), r[0].device_id.as_str()),
            ("0987654321", "Success", "123")
        );
        assert_eq!(r[0].enqueued_time_utc, "2015-07-28T16:24:48.789Z");
        assert!(parse_feedback(b"{}").is_err());
    }

    #[test]
    fn the_message_names_its_device_and_asks_for_its_ack() {
        let m = C2dMessage {
            device_id: "dev 1".into(),
            message_id: "m1".into(),
            correlation_id: None,
            body: b"hi".to_vec(),
            properties: vec![("k".into(), "v".into())],
            ack: Ack::Full,
            ttl: None,
        };
        let a = to_amqp(&m);
        assert_eq!(a.properties.as_ref().unwrap().to.as_deref(), Some("/devices/dev%201/messages/devicebound"));
        let app = &a.application_properties.as_ref().unwrap().0;
        assert_eq!(app.get("iothub-ack"), Some(&SimpleValue::String("full".into())));
        assert_eq!(app.get("k"), Some(&SimpleValue::String("v".into())));
        for (s, want) in
            [("none", Ack::None), ("positive", Ack::Positive), ("negative", Ack::Negative), ("full", Ack::Full)]
        {
            assert_eq!(s.parse::<Ack>().unwrap(), want);
        }
        assert!("all".parse::<Ack>().is_err());
    }
}
