//! The request/response nodes of the AMQP endpoint: `$cbs` (put-token: a SharedAccessSignature
//! becomes a claim of the connection; "AMQP 1.0 in Azure Service Bus and Event Hubs protocol
//! guide", claims-based authorization) and `$management` (the READ operations of
//! `com.microsoft:eventhub` and `com.microsoft:partition` that `get_eventhub_properties` and
//! `get_partition_properties` send). A request is a message with `application-properties`
//! (`operation`, `type`, `name`, ...); the answer carries `status-code` and
//! `status-description` and the request's `message-id` as its `correlation-id`.

use fe2o3_amqp::types::messaging::{AmqpValue, ApplicationProperties, Body, Message, Properties};
use fe2o3_amqp::types::primitives::{OrderedMap, SimpleValue, Timestamp, Value};

use super::auth::{Claims, verify_policy_token};
use crate::hub::eventhub::{EventHub, unix_ms};
use crate::hub::secrets::Permissions;
use crate::hub::state::HubState;
use crate::iot::time::unix_secs;

/// A message both nodes take and give.
pub type AmqpMessage = Message<Body<Value>>;

fn app_str<'m>(m: &'m AmqpMessage, key: &str) -> Option<&'m str> {
    match m.application_properties.as_ref()?.0.get(key)? {
        SimpleValue::String(s) => Some(s),
        SimpleValue::Symbol(s) => Some(s.as_str()),
        _ => None,
    }
}

fn response(request: &AmqpMessage, status: i32, description: &str, body: Value) -> AmqpMessage {
    let correlation = request.properties.as_ref().and_then(|p| p.message_id.clone());
    let props = ApplicationProperties::builder()
        .insert("status-code", SimpleValue::Int(status))
        .insert("status-description", SimpleValue::String(description.to_owned()))
        .build();
    Message::builder()
        .properties(Properties { correlation_id: correlation, ..Default::default() })
        .application_properties(props)
        .body(Body::Value(AmqpValue(body)))
        .build()
}

/// `$cbs` put-token: the body is the token (a string), `name` its audience, `type`
/// `servicebus.windows.net:sastoken`. 200 and a new claim when the token holds (IoT Hub's answer:
/// Microsoft's Node service client takes nothing else, the Python clients any 2xx); 401 with the
/// reason otherwise; 400 for a request that is not a put-token.
pub fn cbs(hub: &HubState, claims: &Claims, request: &AmqpMessage) -> AmqpMessage {
    if app_str(request, "operation") != Some("put-token") {
        return response(request, 400, "the operation must be put-token", Value::Null);
    }
    let token = match &request.body {
        Body::Value(v) => match &v.0 {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        },
        _ => None,
    };
    let Some(token) = token else {
        return response(request, 400, "the body must be the token as a string", Value::Null);
    };
    match verify_policy_token(hub, token, crate::hub::clock::wall()) {
        Ok(claim) => {
            tracing::debug!(audience = %claim.resource, "AMQP claim accepted");
            claims.add(claim);
            response(request, 200, "OK", Value::Null)
        }
        Err(e) => {
            tracing::debug!(error = %e, "AMQP claim refused");
            response(request, 401, &e.to_string(), Value::Null)
        }
    }
}

/// `$management` READ of the endpoint or of one partition. The caller must hold a claim with
/// ServiceConnect on the endpoint, from the connection or from the request's `security_token`
/// (which the Event Hubs clients send with each request); 401 otherwise, 404 for another name
/// or partition, 400 for another operation or type.
pub fn management(hub: &HubState, claims: &Claims, request: &AmqpMessage) -> AmqpMessage {
    let eh = &hub.eventhub;
    let now = crate::hub::clock::wall();
    if app_str(request, "operation") != Some("READ") {
        return response(request, 400, "only READ is supported", Value::Null);
    }
    let Some(name) = app_str(request, "name") else {
        return response(request, 400, "the request has no name", Value::Null);
    };
    let resource = format!("{}/{name}", hub.hostname);
    let from_token = app_str(request, "security_token")
        .and_then(|t| verify_policy_token(hub, t, now).ok())
        .filter(|c| c.permissions.contains(Permissions::SERVICE_CONNECT))
        .is_some_and(|c| crate::iot::sas::resource_covers(&c.resource, &resource));
    if !from_token && claims.authorizes(&resource, Permissions::SERVICE_CONNECT, unix_secs(now)).is_none() {
        return response(request, 401, "Unauthorized", Value::Null);
    }
    if name != eh.name {
        return response(request, 404, "no such event hub", Value::Null);
    }
    match app_str(request, "type") {
        Some("com.microsoft:eventhub") => response(request, 200, "OK", eventhub_info(eh)),
        Some("com.microsoft:partition") => match app_str(request, "partition").and_then(|p| eh.partition(p)) {
            Some(p) => response(request, 200, "OK", partition_info(eh, p, now)),
            None => response(request, 404, "no such partition", Value::Null),
        },
        _ => response(request, 400, "unknown type", Value::Null),
    }
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    let mut m = OrderedMap::new();
    for (k, v) in entries {
        m.insert(Value::String(k.to_owned()), v);
    }
    Value::Map(m)
}

fn eventhub_info(eh: &EventHub) -> Value {
    let ids = (0..eh.partition_count()).map(|p| Value::String(p.to_string())).collect();
    map(vec![
        ("name", Value::String(eh.name.clone())),
        ("type", Value::String("com.microsoft:eventhub".into())),
        ("created_at", Value::Timestamp(Timestamp::from_milliseconds(unix_ms(eh.created)))),
        ("partition_count", Value::Int(eh.partition_count() as i32)),
        ("partition_ids", Value::Array(ids)),
    ])
}

fn partition_info(eh: &EventHub, p: usize, now: std::time::SystemTime) -> Value {
    let i = eh.info(p, now);
    let last_time = i.last_enqueued_time.map_or(0, unix_ms);
    map(vec![
        ("name", Value::String(eh.name.clone())),
        ("type", Value::String("com.microsoft:partition".into())),
        ("partition", Value::String(p.to_string())),
        ("begin_sequence_number", Value::Long(i.begin_sequence_number)),
        ("last_enqueued_sequence_number", Value::Long(i.last_enqueued_sequence_number)),
        ("last_enqueued_offset", Value::String(i.last_enqueued_offset.to_string())),
        ("last_enqueued_time_utc", Value::Timestamp(Timestamp::from_milliseconds(last_time))),
        ("is_partition_empty", Value::Bool(i.is_empty)),
    ])
}
