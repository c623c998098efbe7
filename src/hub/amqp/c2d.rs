//! Cloud-to-device messages from the service side over AMQP: a sender link on
//! `/messages/devicebound`, each message naming its device in `to`
//! (`/devices/{id}/messages/devicebound`), queued through `HubState::send_c2d` into the same C2D
//! queue the MQTT and HTTPS device paths deliver from ("Send cloud-to-device messages from an IoT
//! hub": the service-facing endpoint). The message's `message-id`, `correlation-id`, `user-id`,
//! `content-type`, `content-encoding`, absolute expiry and application properties carry over;
//! the application property `iothub-ack` sets the feedback the sender asked for. Each delivery is
//! accepted once queued or rejected with the reason.

use std::time::Duration;

use fe2o3_amqp::link::Receiver;
use fe2o3_amqp::types::definitions::{AmqpError, Error, LinkError};
use fe2o3_amqp::types::messaging::{Body, Message, MessageId};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};

use super::auth::Claims;
use crate::hub::c2d::{C2dError, NewC2d};
use crate::hub::eventhub::unix_ms;
use crate::hub::secrets::Permissions;
use crate::hub::state::Hub;
use crate::iot::time::unix_secs;

/// The path of the service-facing C2D endpoint (scheme and host removed).
pub const ADDRESS: &str = "messages/devicebound";

fn reject(condition: impl Into<fe2o3_amqp::types::definitions::ErrorCondition>, why: &str) -> Error {
    Error::new(condition, why.to_owned(), None)
}

fn id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => uuid::Uuid::from_bytes(*u.as_inner()).to_string(),
        MessageId::Binary(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

/// The device a message's `to` names: `/devices/{id}/messages/devicebound` (any case for the
/// fixed parts, as IoT Hub writes `deviceBound` itself), the id percent-decoded.
pub fn device_of(to: &str) -> Option<String> {
    let rest = to.strip_prefix("/devices/")?;
    let (id, tail) = rest.split_once('/')?;
    if !tail.eq_ignore_ascii_case("messages/devicebound") || id.is_empty() {
        return None;
    }
    crate::iot::encoding::url_decode(id).ok().filter(|d| !d.is_empty())
}

/// What the hub queues for a message, or why it refuses it.
pub fn to_c2d(m: &Message<Body<Value>>, now_ms: i64) -> Result<(String, NewC2d), Error> {
    let props = m.properties.as_ref();
    let to = props.and_then(|p| p.to.as_deref()).ok_or_else(|| {
        reject(AmqpError::InvalidField, "the message's `to` must be /devices/{deviceId}/messages/devicebound")
    })?;
    let device = device_of(to).ok_or_else(|| {
        reject(AmqpError::InvalidField, "the message's `to` must be /devices/{deviceId}/messages/devicebound")
    })?;
    let body = match &m.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect::<Vec<u8>>(),
        Body::Value(v) => match &v.0 {
            Value::String(s) => s.as_bytes().to_vec(),
            Value::Binary(b) => b.to_vec(),
            _ => return Err(reject(AmqpError::DecodeError, "the body must be data, a string or binary")),
        },
        Body::Empty => Vec::new(),
        _ => return Err(reject(AmqpError::DecodeError, "the body must be data, a string or binary")),
    };
    let mut ack = None;
    let mut properties = Vec::new();
    for (k, v) in m.application_properties.iter().flat_map(|a| a.0.iter()) {
        let text = match v {
            SimpleValue::String(s) => s.clone(),
            SimpleValue::Symbol(s) => s.as_str().to_owned(),
            SimpleValue::Null => String::new(),
            SimpleValue::Bool(b) => b.to_string(),
            SimpleValue::Int(n) => n.to_string(),
            SimpleValue::Long(n) => n.to_string(),
            SimpleValue::Uint(n) => n.to_string(),
            SimpleValue::Ulong(n) => n.to_string(),
            _ => return Err(reject(AmqpError::InvalidField, "application properties must be strings or numbers")),
        };
        if k == "iothub-ack" {
            if !["none", "positive", "negative", "full"].contains(&text.to_ascii_lowercase().as_str()) {
                return Err(reject(AmqpError::InvalidField, "iothub-ack must be none, positive, negative or full"));
            }
            ack = Some(text);
        } else {
            properties.push((k.clone(), text));
        }
    }
    let ttl = props.and_then(|p| p.absolute_expiry_time.as_ref()).map(|t| {
        let ms = t.milliseconds().saturating_sub(now_ms).max(0);
        Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    });
    let text = |f: Option<&MessageId>| f.map(id_text);
    let message = NewC2d {
        body: body.into(),
        message_id: text(props.and_then(|p| p.message_id.as_ref())),
        correlation_id: text(props.and_then(|p| p.correlation_id.as_ref())),
        user_id: props.and_then(|p| p.user_id.as_ref()).map(|u| String::from_utf8_lossy(u).into_owned()),
        content_type: props.and_then(|p| p.content_type.as_ref()).map(|s| s.as_str().to_owned()),
        content_encoding: props.and_then(|p| p.content_encoding.as_ref()).map(|s| s.as_str().to_owned()),
        ack,
        ttl,
        properties,
    };
    Ok((device, message))
}

/// Serves one `/messages/devicebound` link: each message queued for its device and accepted, or
/// rejected (`amqp:not-found` for an unknown device, `amqp:resource-limit-exceeded` for a full
/// queue, `amqp:link:message-size-exceeded` past 64 KB, `amqp:invalid-field` for a bad `to` or
/// `iothub-ack`). The link is closed with `amqp:unauthorized-access` once the claim that
/// admitted it has expired.
pub async fn serve(hub: Hub, claims: Claims, mut r: Receiver, resource: String) {
    loop {
        let delivery = tokio::select! {
            _ = hub.shutdown.cancelled() => break,
            d = r.recv::<Body<Value>>() => match d {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(error = ?e, "AMQP C2D link ended");
                    return;
                }
            },
        };
        let now = crate::hub::clock::wall();
        if claims.authorizes(&resource, Permissions::SERVICE_CONNECT, unix_secs(now)).is_none() {
            let _ = r.reject(&delivery, reject(AmqpError::UnauthorizedAccess, "the token has expired")).await;
            let _ = r.close_with_error(reject(AmqpError::UnauthorizedAccess, "the token has expired")).await;
            return;
        }
        let outcome = to_c2d(delivery.message(), unix_ms(now)).and_then(|(device, message)| {
            let identity = hub
                .registry
                .get(&device, None)
                .ok_or_else(|| reject(AmqpError::NotFound, "the device is not registered"))?;
            hub.send_c2d(&identity, message).map_err(|e| match e {
                C2dError::QueueFull => reject(AmqpError::ResourceLimitExceeded, &e.to_string()),
                C2dError::TooLarge => reject(LinkError::MessageSizeExceeded, &e.to_string()),
            })
        });
        // Accepted means durable, as a REST 2xx does.
        let outcome = match outcome {
            Ok(id) => match hub.store.durable().await {
                Ok(()) => Ok(id),
                Err(_) => Err(reject(AmqpError::InternalError, "the message could not be stored")),
            },
            refused => refused,
        };
        tracing::debug!(ok = outcome.is_ok(), "AMQP C2D message");
        let settled = match outcome {
            Ok(_) => r.accept(&delivery).await,
            Err(why) => r.reject(&delivery, why).await,
        };
        if settled.is_err() {
            return;
        }
    }
    let _ = r.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::messaging::{AmqpValue, ApplicationProperties, Properties};
    use fe2o3_amqp::types::primitives::Timestamp;

    fn message(to: Option<&str>, ack: Option<&str>) -> Message<Body<Value>> {
        let mut app = ApplicationProperties::default();
        app.0.insert("k".into(), SimpleValue::String("v".into()));
        if let Some(a) = ack {
            app.0.insert("iothub-ack".into(), SimpleValue::String(a.into()));
        }
        Message::builder()
            .properties(Properties {
                to: to.map(str::to_owned),
                message_id: Some(MessageId::String("m1".into())),
                absolute_expiry_time: Some(Timestamp::from_milliseconds(61_000)),
                ..Default::default()
            })
            .application_properties(app)
            .body(Body::Value(AmqpValue(Value::String("hi".into()))))
            .build()
    }

    #[test]
    fn the_to_address_names_the_device() {
        assert_eq!(device_of("/devices/d%2F1/messages/devicebound").as_deref(), Some("d/1"));
        assert_eq!(device_of("/devices/d1/messages/deviceBound").as_deref(), Some("d1"));
        for bad in ["/devices//messages/devicebound", "/devices/d1/messages/events", "devices/d1", "/devices/d1"] {
            assert_eq!(device_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_message_maps_to_the_c2d_queue_or_is_refused() {
        let (device, m) = to_c2d(&message(Some("/devices/d1/messages/devicebound"), Some("full")), 1_000).unwrap();
        assert_eq!(device, "d1");
        assert_eq!(
            (m.body.as_ref(), m.message_id.as_deref(), m.ack.as_deref()),
            (&b"hi"[..], Some("m1"), Some("full"))
        );
        assert_eq!(m.properties, [("k".to_owned(), "v".to_owned())], "iothub-ack is not an application property");
        assert_eq!(m.ttl, Some(Duration::from_secs(60)), "absolute expiry becomes the time to live");
        let no_to = to_c2d(&message(None, None), 0).unwrap_err();
        assert_eq!(no_to.condition, AmqpError::InvalidField.into());
        let bad_ack = to_c2d(&message(Some("/devices/d1/messages/devicebound"), Some("sometimes")), 0).unwrap_err();
        assert_eq!(bad_ack.condition, AmqpError::InvalidField.into());
    }
}
