//! A consumer's receiver link on `{hub}/ConsumerGroups/{group}/Partitions/{id}`: the events of one
//! partition of the Event Hubs-compatible endpoint from the position the link's selector filter
//! names, as AMQP messages with the annotations IoT Hub routes with them ("IoT Hub message
//! format": system properties; Event Hubs' `x-opt-*` annotations). Credit is the client's; the
//! link ends when the client detaches, the hub stops, or the claim that let it attach expires
//! (`amqp:unauthorized-access`, as Event Hubs closes a link whose token was not renewed).

use fe2o3_amqp::link::Sender;
use fe2o3_amqp::types::definitions::{AmqpError, Error, ErrorCondition};
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Batch, Body, Data, Message, MessageAnnotations, MessageId, Properties, Source,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Value};

use super::auth::Claims;
use crate::hub::eventhub::{Event, Position, unix_ms};
use crate::hub::secrets::Permissions;
use crate::hub::state::Hub;
use crate::iot::time::unix_secs;

/// The condition Event Hubs detaches a receiver with when its start position is past the end of
/// the partition.
pub const ARGUMENT_ERROR: &str = "com.microsoft:argument-error";

/// The filter key the Event Hubs clients put their selector under.
const SELECTOR: &str = "apache.org:selector-filter:string";
/// Events read from the partition per wake-up (each still waits for the client's credit).
const BATCH: usize = 64;

/// Where a partition link's address points: consumer group and partition index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub consumer_group: String,
    pub partition: usize,
}

/// Why a receiver cannot attach: the AMQP error Event Hubs answers with.
pub fn refuse(condition: AmqpError, description: &str) -> Error {
    Error::new(condition, description.to_owned(), None)
}

/// Parses `{name}/ConsumerGroups/{group}/Partitions/{id}` (scheme and host already removed).
/// The consumer group must be `$Default` or one of `behaviour.eventhub_consumer_groups`, or, when
/// that list is empty, any name (created on first use); the partition must exist. Refusals are
/// `amqp:not-found`, as Event Hubs answers for an entity it does not have.
pub fn parse_address(hub: &Hub, path: &str) -> Result<Address, Error> {
    let parts: Vec<&str> = path.split('/').collect();
    let [name, cg_key, group, p_key, id] = parts.as_slice() else {
        return Err(refuse(AmqpError::NotFound, "the address is not {hub}/ConsumerGroups/{group}/Partitions/{id}"));
    };
    if !cg_key.eq_ignore_ascii_case("ConsumerGroups") || !p_key.eq_ignore_ascii_case("Partitions") {
        return Err(refuse(AmqpError::NotFound, "the address is not {hub}/ConsumerGroups/{group}/Partitions/{id}"));
    }
    if !name.eq_ignore_ascii_case(&hub.eventhub.name) {
        return Err(refuse(AmqpError::NotFound, "no such event hub"));
    }
    let groups = &hub.behaviour.eventhub_consumer_groups;
    let known = if groups.is_empty() {
        !group.is_empty() && group.len() <= 50
    } else {
        group.eq_ignore_ascii_case("$Default") || groups.iter().any(|g| g.eq_ignore_ascii_case(group))
    };
    if !known {
        return Err(refuse(AmqpError::NotFound, "no such consumer group"));
    }
    let partition = hub.eventhub.partition(id).ok_or_else(|| refuse(AmqpError::NotFound, "no such partition"))?;
    Ok(Address { consumer_group: (*group).to_owned(), partition })
}

/// The position the source's selector filter names (the start when there is none).
pub fn position(source: Option<&Source>) -> Result<Position, Error> {
    let Some(filter) = source.and_then(|s| s.filter.as_ref()) else { return Ok(Position::Start) };
    let Some(v) = filter.get(&Symbol::from(SELECTOR)) else { return Ok(Position::Start) };
    let text = match v {
        Value::Described(d) => match &d.value {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        },
        Value::String(s) => Some(s.as_str()),
        _ => None,
    };
    let text = text.ok_or_else(|| refuse(AmqpError::InvalidField, "the selector filter must be a string"))?;
    Position::parse(text).map_err(|e| refuse(AmqpError::InvalidField, &e.to_string()))
}

fn annotation(name: &str) -> OwnedKey {
    OwnedKey::Symbol(Symbol::from(name))
}

/// An event as the consumer receives it: `properties` from the device's system properties,
/// `application-properties` as sent, the `x-opt-*` and `iothub-*` annotations, the body as sent
/// in one data section.
pub fn to_amqp(e: &Event) -> Message<Body<Value>> {
    let m = &e.message;
    let mut props = Properties::default();
    let mut ann = MessageAnnotations::builder()
        .insert(annotation("x-opt-sequence-number"), Value::Long(e.sequence_number))
        .insert(annotation("x-opt-offset"), Value::String(e.offset.to_string()))
        .insert(annotation("x-opt-enqueued-time"), Value::Timestamp(Timestamp::from_milliseconds(unix_ms(e.enqueued))))
        .insert(annotation("iothub-message-source"), Value::String(m.source.as_str().into()))
        .build();
    for (k, v) in &m.system {
        match k.as_str() {
            "message-id" => props.message_id = Some(MessageId::String(v.clone())),
            "correlation-id" => props.correlation_id = Some(MessageId::String(v.clone())),
            "user-id" => props.user_id = Some(Binary::from(v.as_bytes().to_vec())),
            "content-type" => props.content_type = Some(Symbol::from(v.as_str())),
            "content-encoding" => props.content_encoding = Some(Symbol::from(v.as_str())),
            "iothub-enqueuedtime" => {
                ann.0.insert(annotation(k), Value::Timestamp(Timestamp::from_milliseconds(unix_ms(m.enqueued))));
            }
            // Absolute expiry is ISO 8601 on MQTT; Event Hubs consumers do not read it back.
            "absolute-expiry-time" => {}
            _ => {
                ann.0.insert(annotation(k), Value::String(v.clone()));
            }
        }
    }
    let mut app = ApplicationProperties::default();
    for (k, v) in &m.application {
        let value = v.as_ref().map_or(SimpleValue::Null, |s| SimpleValue::String(s.clone()));
        app.0.insert(k.clone(), value);
    }
    Message::builder()
        .properties(props)
        .message_annotations(ann)
        .application_properties(app)
        .body(Body::Data(Batch::from(vec![Data(Binary::from(m.body.to_vec()))])))
        .build()
}

/// Serves one partition link until it ends. `resource` is `host/{hub}/...`, what the claim
/// must cover; `expiry` the Unix second the claim that admitted it runs out.
pub async fn serve(hub: Hub, claims: Claims, mut sender: Sender, resource: String, addr: Address, from: Position) {
    let eh = &hub.eventhub;
    let p = addr.partition;
    let mut written = eh.watch(p);
    let mut next = match eh.start(p, from, crate::hub::clock::wall()) {
        Ok(n) => n,
        Err(beyond) => {
            let why = Error::new(ErrorCondition::Custom(Symbol::from(ARGUMENT_ERROR)), beyond.to_string(), None);
            let _ = sender.close_with_error(why).await;
            return;
        }
    };
    loop {
        let now = crate::hub::clock::wall();
        let Some(expiry) = claims.authorizes(&resource, Permissions::SERVICE_CONNECT, unix_secs(now)) else {
            let _ = sender.close_with_error(refuse(AmqpError::UnauthorizedAccess, "the token has expired")).await;
            return;
        };
        let batch = eh.read(p, next, BATCH, now);
        if batch.is_empty() {
            let until_expiry = std::time::Duration::from_secs(expiry.saturating_sub(unix_secs(now)).saturating_add(1));
            tokio::select! {
                _ = hub.shutdown.cancelled() => {
                    let _ = sender.close().await;
                    return;
                }
                _ = sender.on_detach() => return,
                changed = written.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(until_expiry.min(std::time::Duration::from_secs(3600))) => {}
            }
            continue;
        }
        for e in &batch {
            next = e.sequence_number + 1;
            let send = tokio::select! {
                _ = hub.shutdown.cancelled() => {
                    let _ = sender.close().await;
                    return;
                }
                r = sender.send_batchable(to_amqp(e)) => r,
            };
            if send.is_err() {
                return;
            }
        }
    }
}
