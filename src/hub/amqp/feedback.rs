//! The service's receiver link on `/messages/servicebound/feedback` (what Node's
//! `Client.getFeedbackReceiver` and the .NET `GetFeedbackReceiver` open): the hub's C2D feedback
//! records (`feedback.rs`), batched into messages whose body is the JSON array of records and
//! whose content type is `application/vnd.microsoft.iothub.feedback.json` ("Understand
//! cloud-to-device messaging": message feedback). A message the service accepts (or rejects) is
//! gone; one it releases or modifies, or that the link loses, goes back to the queue for the
//! next reader. The link ends when the client detaches, the hub stops or the claim that admitted
//! it expires (`amqp:unauthorized-access`).

use std::time::Duration;

use fe2o3_amqp::link::Sender;
use fe2o3_amqp::types::definitions::AmqpError;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{Batch, Body, Data, Message, MessageAnnotations, MessageId, Outcome, Properties};
use fe2o3_amqp::types::primitives::{Binary, Symbol, Timestamp, Value};

use super::auth::Claims;
use super::partition::refuse;
use crate::hub::eventhub::unix_ms;
use crate::hub::feedback::{self, Record};
use crate::hub::secrets::Permissions;
use crate::hub::state::Hub;
use crate::iot::time::unix_secs;

/// The feedback endpoint's path (scheme and host removed), compared without case: the SDKs
/// write `serviceBound`.
pub const ADDRESS: &str = "messages/servicebound/feedback";

/// A feedback message: the records as a JSON array in one data section, a new message id, the
/// feedback content type, `user-id` the hub's name and `iothub-enqueuedtime` when it was made.
pub fn to_amqp(hub_name: &str, records: &[Record], now: std::time::SystemTime) -> Message<Body<Value>> {
    let props = Properties {
        message_id: Some(MessageId::String(uuid::Uuid::new_v4().to_string())),
        user_id: Some(Binary::from(hub_name.as_bytes().to_vec())),
        content_type: Some(Symbol::from(feedback::CONTENT_TYPE)),
        content_encoding: Some(Symbol::from("utf-8")),
        ..Default::default()
    };
    let ann = MessageAnnotations::builder()
        .insert(
            OwnedKey::Symbol(Symbol::from("iothub-enqueuedtime")),
            Value::Timestamp(Timestamp::from_milliseconds(unix_ms(now))),
        )
        .build();
    Message::builder()
        .properties(props)
        .message_annotations(ann)
        .body(Body::Data(Batch::from(vec![Data(Binary::from(feedback::body(records)))])))
        .build()
}

/// Serves one feedback link until it ends; `resource` is what its claim must cover.
pub async fn serve(hub: Hub, claims: Claims, mut sender: Sender, resource: String) {
    loop {
        let now = crate::hub::clock::wall();
        let Some(expiry) = claims.authorizes(&resource, Permissions::SERVICE_CONNECT, unix_secs(now)) else {
            let _ = sender.close_with_error(refuse(AmqpError::UnauthorizedAccess, "the token has expired")).await;
            return;
        };
        let batch = hub.feedback.take_batch(now);
        if batch.is_empty() {
            let until_expiry = Duration::from_secs(expiry.saturating_sub(unix_secs(now)).saturating_add(1));
            tokio::select! {
                _ = hub.shutdown.cancelled() => {
                    let _ = sender.close().await;
                    return;
                }
                _ = sender.on_detach() => return,
                _ = hub.feedback.arrived() => {}
                _ = tokio::time::sleep(until_expiry.min(Duration::from_secs(3600))) => {}
            }
            continue;
        }
        let records: Vec<Record> = batch.iter().map(|p| p.record.clone()).collect();
        let message = to_amqp(&hub.eventhub.name, &records, now);
        let outcome = tokio::select! {
            _ = hub.shutdown.cancelled() => None,
            o = sender.send(message) => o.ok(),
        };
        tracing::debug!(records = batch.len(), outcome = ?outcome, "AMQP feedback message");
        match outcome {
            // Received: the records are gone, from the store too (a crash before that commit
            // delivers them again, as a broker would after an unsettled delivery).
            Some(Outcome::Accepted(_) | Outcome::Rejected(_)) => {
                hub.store.feedback_settled(batch.iter().map(|p| p.id).collect())
            }
            Some(_) => hub.feedback.put_back(batch),
            None => {
                hub.feedback.put_back(batch);
                let _ = sender.close().await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::feedback::Status;

    #[test]
    fn a_feedback_message_carries_the_records_as_json_with_the_feedback_content_type() {
        let at = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let r = Record {
            original_message_id: "m1".into(),
            device_id: "d".into(),
            device_generation_id: "1".into(),
            at,
            status: Status::Success,
        };
        let m = to_amqp("hub", &[r.clone(), r], at);
        let props = m.properties.as_ref().unwrap();
        assert_eq!(props.content_type.as_ref().map(|s| s.as_str()), Some(feedback::CONTENT_TYPE));
        assert_eq!(props.user_id.as_ref().map(|u| u.to_vec()), Some(b"hub".to_vec()));
        let Body::Data(batch) = &m.body else { panic!("a data body") };
        let bytes: Vec<u8> = batch.iter().flat_map(|d| d.0.to_vec()).collect();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v.as_array().map(Vec::len), Some(2));
        assert_eq!(v[0]["statusCode"], "Success");
    }
}
