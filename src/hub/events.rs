//! The hub's non-telemetry events on the built-in Event Hubs-compatible endpoint: twin changes,
//! identity creation and deletion, device connects and disconnects, each built as IoT Hub routes
//! it ("Azure IoT Hub non-telemetry event schemas") and appended to the partition of the device
//! it concerns, behind the same `iothub-message-source` annotation a back end filters on. On
//! Azure these arrive only when a route sends them to the built-in endpoint; the emulator acts as
//! if those routes exist, each source switchable in the hub config
//! (`behaviour.eventhub_twin_change_events`, `..._device_lifecycle_events`,
//! `..._connection_state_events`). No I/O; callers are the places the state changes
//! (`state.rs`, the registry's creation hook, the MQTT session, the service twin routes).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::{Value, json};

use super::eventhub::EventHub;
use super::registry::{Identity, IdentityState};
use super::telemetry::{Source, StoredMessage};
use crate::iot::time::iso8601;

/// Which event sources reach the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switches {
    pub twin_changes: bool,
    pub lifecycle: bool,
    pub connection_state: bool,
}

/// How a twin changed: the event's `opType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinOp {
    /// A device's reported patch or a service PATCH (`updateTwin`).
    Update,
    /// A service PUT (`replaceTwin`).
    Replace,
}

/// Builds and appends the events. Cheap to clone (the registry's creation hook holds one).
#[derive(Debug, Clone)]
pub struct Emitter {
    eventhub: Arc<EventHub>,
    /// The IoT hub's name (`hubName`, and the events' `user-id`).
    hub_name: String,
    switches: Switches,
    /// Orders one hub's connection state events (`sequenceNumber`).
    connection_seq: Arc<AtomicU64>,
    /// The high half of every `sequenceNumber`: when this hub started, so numbers keep growing
    /// across restarts.
    epoch: u64,
}

impl Emitter {
    pub fn new(eventhub: Arc<EventHub>, hub_name: String, switches: Switches, now: SystemTime) -> Emitter {
        let epoch = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Emitter { eventhub, hub_name, switches, connection_seq: Arc::new(AtomicU64::new(0)), epoch }
    }

    /// A twin changed: `body` is what the event carries (see `twin_body`).
    pub fn twin_changed(&self, identity: &Identity, op: TwinOp, body: Value, at: SystemTime) {
        if !self.switches.twin_changes {
            return;
        }
        let op = match op {
            TwinOp::Update => "updateTwin",
            TwinOp::Replace => "replaceTwin",
        };
        self.append(identity, Source::TwinChangeEvents, "twinChangeNotification", op, body, at);
    }

    /// An identity was created (`created`) or deleted; the body is its twin as it stands.
    pub fn lifecycle(&self, identity: &Identity, st: &IdentityState, created: bool, at: SystemTime) {
        if !self.switches.lifecycle {
            return;
        }
        let op = match (identity.module_id.is_some(), created) {
            (false, true) => "createDeviceIdentity",
            (false, false) => "deleteDeviceIdentity",
            (true, true) => "createModuleIdentity",
            (true, false) => "deleteModuleIdentity",
        };
        let (tags, properties) = st.twin.service_parts();
        let mut body = json!({
            "deviceId": identity.device_id,
            "etag": st.twin.etag(),
            "version": st.twin.version,
            "properties": properties,
        });
        if let Some(m) = &identity.module_id {
            body["moduleId"] = json!(m);
        }
        if tags.as_object().is_some_and(|t| !t.is_empty()) {
            body["tags"] = tags;
        }
        self.append(identity, Source::DeviceLifecycleEvents, "deviceLifecycleNotification", op, body, at);
    }

    /// A device (never a module: IoT Hub emits these for devices) connected or disconnected.
    pub fn connection(&self, identity: &Identity, connected: bool, at: SystemTime) {
        if !self.switches.connection_state || identity.module_id.is_some() {
            return;
        }
        let op = if connected { "deviceConnected" } else { "deviceDisconnected" };
        let n = self.connection_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let body = json!({ "sequenceNumber": sequence_number(self.epoch, n) });
        self.append(identity, Source::DeviceConnectionStateEvents, "deviceConnectionStateNotification", op, body, at);
    }

    fn append(&self, identity: &Identity, source: Source, schema: &str, op: &str, body: Value, at: SystemTime) {
        if !self.eventhub.enabled() {
            return;
        }
        let m = build(&self.hub_name, identity, source, schema, op, &body, at);
        self.eventhub.append(&identity.device_id, Arc::new(m), at);
    }
}

/// The `sequenceNumber` of a connection state event: 64 upper-case hex digits that sort in the
/// order the events happened (Azure documents it as a string to compare, not a number to parse).
pub fn sequence_number(epoch: u64, n: u64) -> String {
    format!("{epoch:032X}{n:032X}")
}

/// The body of a twin change event: the twin's `version` and what changed, under `properties`
/// (`reported` or `desired`) and `tags`.
pub fn twin_body(version: u64, tags: Option<Value>, desired: Option<Value>, reported: Option<Value>) -> Value {
    let mut body = json!({ "version": version });
    if let Some(t) = tags {
        body["tags"] = t;
    }
    let mut props = serde_json::Map::new();
    if let Some(d) = desired {
        props.insert("desired".into(), d);
    }
    if let Some(r) = reported {
        props.insert("reported".into(), r);
    }
    if !props.is_empty() {
        body["properties"] = Value::Object(props);
    }
    body
}

/// One event as IoT Hub writes it: system properties `content-type` `application/json`,
/// `content-encoding` `utf-8`, a unique `correlation-id`, `user-id` the hub's name, the
/// connection device (and module) id and `iothub-enqueuedtime`; application properties
/// `hubName`, `deviceId` (`moduleId`), `operationTimestamp`, `iothub-message-schema`, `opType`;
/// the body JSON.
fn build(
    hub_name: &str,
    identity: &Identity,
    source: Source,
    schema: &str,
    op: &str,
    body: &Value,
    at: SystemTime,
) -> StoredMessage {
    let mut system = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("content-encoding".to_owned(), "utf-8".to_owned()),
        ("correlation-id".to_owned(), uuid::Uuid::new_v4().simple().to_string()),
        ("user-id".to_owned(), hub_name.to_owned()),
        ("iothub-connection-device-id".to_owned(), identity.device_id.clone()),
    ];
    if let Some(m) = &identity.module_id {
        system.push(("iothub-connection-module-id".to_owned(), m.clone()));
    }
    system.push(("iothub-enqueuedtime".to_owned(), iso8601(at)));
    let mut application = vec![
        ("hubName".to_owned(), Some(hub_name.to_owned())),
        ("deviceId".to_owned(), Some(identity.device_id.clone())),
    ];
    if let Some(m) = &identity.module_id {
        application.push(("moduleId".to_owned(), Some(m.clone())));
    }
    application.extend([
        ("operationTimestamp".to_owned(), Some(iso8601(at))),
        ("iothub-message-schema".to_owned(), Some(schema.to_owned())),
        ("opType".to_owned(), Some(op.to_owned())),
    ]);
    StoredMessage { source, enqueued: at, system, application, body: Bytes::from(body.to_string()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn hub(switches: Switches) -> (Arc<EventHub>, Emitter) {
        let keep = super::super::eventhub::Retention { events: 100, bytes: u64::MAX, age: Duration::from_secs(60) };
        let eh = Arc::new(EventHub::new("hub".into(), 1, keep, crate::hub::clock::wall()));
        let em = Emitter::new(eh.clone(), "hub".into(), switches, SystemTime::UNIX_EPOCH);
        (eh, em)
    }

    const ALL: Switches = Switches { twin_changes: true, lifecycle: true, connection_state: true };

    fn app<'m>(m: &'m StoredMessage, key: &str) -> Option<&'m str> {
        m.application.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.as_deref())
    }

    fn sys<'m>(m: &'m StoredMessage, key: &str) -> Option<&'m str> {
        m.system.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn each_event_carries_the_source_schema_and_operation() {
        let (eh, em) = hub(ALL);
        let reg = crate::hub::registry::Registry::default();
        let rec =
            || crate::hub::registry::Record::new(crate::iot::sas::Key::generate(), crate::iot::sas::Key::generate());
        let now = crate::hub::clock::wall();
        let d = reg.create("d1", None, rec(), now).unwrap();
        let m = reg.create("d1", Some("m1"), rec(), now).unwrap();
        em.lifecycle(&d, &d.lock(), true, now);
        em.twin_changed(&m, TwinOp::Update, twin_body(2, None, None, Some(json!({"a": 1}))), now);
        em.connection(&d, true, now);
        em.connection(&m, true, now);
        em.connection(&d, false, now);
        em.lifecycle(&m, &m.lock(), false, now);
        let events = eh.read(0, 0, 10, now);
        let got: Vec<_> = events
            .iter()
            .map(|e| {
                let m = &e.message;
                (m.source, app(m, "iothub-message-schema").unwrap(), app(m, "opType").unwrap())
            })
            .collect();
        assert_eq!(
            got,
            [
                (Source::DeviceLifecycleEvents, "deviceLifecycleNotification", "createDeviceIdentity"),
                (Source::TwinChangeEvents, "twinChangeNotification", "updateTwin"),
                (Source::DeviceConnectionStateEvents, "deviceConnectionStateNotification", "deviceConnected"),
                (Source::DeviceConnectionStateEvents, "deviceConnectionStateNotification", "deviceDisconnected"),
                (Source::DeviceLifecycleEvents, "deviceLifecycleNotification", "deleteModuleIdentity"),
            ],
            "modules have no connection state events"
        );
        let twin = &events[1].message;
        assert_eq!(
            (app(twin, "hubName"), app(twin, "deviceId"), app(twin, "moduleId")),
            (Some("hub"), Some("d1"), Some("m1"))
        );
        assert_eq!(sys(twin, "iothub-connection-module-id"), Some("m1"));
        assert_eq!(
            (sys(twin, "content-type"), sys(twin, "content-encoding")),
            (Some("application/json"), Some("utf-8"))
        );
        assert_eq!(sys(twin, "user-id"), Some("hub"));
        let body: Value = serde_json::from_slice(&twin.body).unwrap();
        assert_eq!(body, json!({"version": 2, "properties": {"reported": {"a": 1}}}));
        let created: Value = serde_json::from_slice(&events[0].message.body).unwrap();
        assert_eq!((created["deviceId"].as_str(), created["version"].as_u64()), (Some("d1"), Some(1)));
        assert_eq!(created["properties"]["desired"]["$version"], 1);
        assert!(created.get("moduleId").is_none());
        let seq = |i: usize| -> String {
            serde_json::from_slice::<Value>(&events[i].message.body).unwrap()["sequenceNumber"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(seq(2).len(), 64);
        assert!(seq(2) < seq(3), "connection state events are ordered by their sequence numbers");
        assert_ne!(sys(&events[2].message, "correlation-id"), sys(&events[3].message, "correlation-id"));
    }

    #[test]
    fn a_switched_off_source_adds_nothing() {
        let (eh, em) = hub(Switches { twin_changes: false, lifecycle: false, connection_state: true });
        let reg = crate::hub::registry::Registry::default();
        let rec = crate::hub::registry::Record::new(crate::iot::sas::Key::generate(), crate::iot::sas::Key::generate());
        let now = crate::hub::clock::wall();
        let d = reg.create("d1", None, rec, now).unwrap();
        em.lifecycle(&d, &d.lock(), true, now);
        em.twin_changed(&d, TwinOp::Replace, twin_body(2, Some(json!({})), None, None), now);
        assert!(eh.read(0, 0, 10, now).is_empty());
        em.connection(&d, true, now);
        assert_eq!(eh.read(0, 0, 10, now).len(), 1);
    }
}
