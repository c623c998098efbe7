//! What the hub does with device-to-cloud messages: split the property bag into system and
//! application properties, stamp the hub's own properties, count, and keep the last few per
//! identity in a bounded ring so that tests and tools can read them back.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::iot::property_bag::PropertyBag;
use crate::iot::time::iso8601;

/// Device-settable system properties: bag key to hub property name (protocol.md §4.6).
const SYSTEM_PROPERTIES: [(&str, &str); 9] = [
    ("$.mid", "message-id"),
    ("$.cid", "correlation-id"),
    ("$.uid", "user-id"),
    ("$.ct", "content-type"),
    ("$.ce", "content-encoding"),
    ("$.exp", "absolute-expiry-time"),
    ("$.on", "output-name"),
    ("$.sub", "dt-subject"),
    ("$.ifid", "interface-id"),
];

/// Where an event on the Event Hubs-compatible endpoint came from: the `iothub-message-source`
/// annotation IoT Hub stamps on every routed message ("IoT Hub message routing": data sources;
/// "Azure IoT Hub non-telemetry event schemas").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A device-to-cloud message.
    Telemetry,
    /// A device or module twin was changed or replaced.
    TwinChangeEvents,
    /// A device or module was created or deleted.
    DeviceLifecycleEvents,
    /// A device connected or disconnected.
    DeviceConnectionStateEvents,
}

impl Source {
    /// The annotation's value, as IoT Hub writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Telemetry => "Telemetry",
            Source::TwinChangeEvents => "twinChangeEvents",
            Source::DeviceLifecycleEvents => "deviceLifecycleEvents",
            Source::DeviceConnectionStateEvents => "deviceConnectionStateEvents",
        }
    }

    /// The source an annotation value names (as `as_str` writes it).
    pub fn parse(s: &str) -> Option<Source> {
        use Source::*;
        [Telemetry, TwinChangeEvents, DeviceLifecycleEvents, DeviceConnectionStateEvents]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// One received message as the back end would see it. Immutable once built, so the identity's
/// ring and the Event Hubs-compatible endpoint share one copy.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub source: Source,
    pub enqueued: SystemTime,
    pub system: Vec<(String, String)>,
    pub application: Vec<(String, Option<String>)>,
    pub body: Bytes,
}

impl StoredMessage {
    /// The message as the emulator's read-back route shows it; `seq` is its position in the
    /// identity's stream (`TelemetryLog`).
    pub fn to_json(&self, seq: u64) -> Value {
        let mut system = Map::new();
        for (k, v) in &self.system {
            system.insert(k.clone(), json!(v));
        }
        let mut app = Map::new();
        for (k, v) in &self.application {
            app.insert(k.clone(), json!(v));
        }
        let mut m = json!({
            "seq": seq,
            "enqueuedTime": iso8601(self.enqueued),
            "systemProperties": system,
            "properties": app,
        });
        match std::str::from_utf8(&self.body) {
            Ok(text) => m["body"] = json!(text),
            Err(_) => {
                use base64::Engine;
                m["bodyBase64"] = json!(base64::engine::general_purpose::STANDARD.encode(&self.body))
            }
        }
        m
    }
}

/// Who sent a message, for the properties the hub stamps.
pub struct Sender<'a> {
    pub device_id: &'a str,
    pub module_id: Option<&'a str>,
    pub model_id: Option<&'a str>,
    pub generation_id: &'a str,
}

/// Builds the stored form of a message, as IoT Hub would route it.
pub fn receive(
    bag: &PropertyBag,
    body: Bytes,
    from: &Sender<'_>,
    retain: bool,
    will: bool,
    at: SystemTime,
) -> StoredMessage {
    let mut system = Vec::new();
    let mut application = Vec::new();
    for (k, v) in bag.iter() {
        match SYSTEM_PROPERTIES.iter().find(|(key, _)| *key == k) {
            Some((_, name)) => system.push(((*name).to_owned(), v.unwrap_or_default().to_owned())),
            None => application.push((k.to_owned(), v.map(str::to_owned))),
        }
    }
    if retain {
        application.push(("mqtt-retain".into(), Some("true".into())));
    }
    if will {
        application.push(("iothub-MessageType".into(), Some("Will".into())));
    }
    system.push(("iothub-connection-device-id".into(), from.device_id.to_owned()));
    if let Some(m) = from.module_id {
        system.push(("iothub-connection-module-id".into(), m.to_owned()));
    }
    let scope = if from.module_id.is_some() { "module" } else { "device" };
    system.push((
        "iothub-connection-auth-method".into(),
        format!(r#"{{"scope":"{scope}","type":"sas","issuer":"iothub"}}"#),
    ));
    system.push(("iothub-connection-auth-generation-id".into(), from.generation_id.to_owned()));
    system.push(("iothub-enqueuedtime".into(), iso8601(at)));
    if let Some(model) = from.model_id {
        system.push(("dt-dataschema".into(), model.to_owned()));
    }
    StoredMessage { source: Source::Telemetry, enqueued: at, system, application, body }
}

/// The size IoT Hub counts against the 256 KB limit: body plus property names and values.
pub fn message_size(bag: &PropertyBag, body_len: usize) -> usize {
    body_len + bag.iter().map(|(k, v)| k.len() + v.map_or(0, str::len)).sum::<usize>()
}

/// The last `capacity` messages of one identity, each with its position in the identity's stream
/// (from 1; gaps in what is kept mean the ring overflowed), and how many it ever sent.
#[derive(Debug, Default)]
pub struct TelemetryLog {
    pub received: u64,
    kept: VecDeque<(u64, Arc<StoredMessage>)>,
}

impl TelemetryLog {
    /// Counts a message and keeps it, built by `make`, when the ring has room for any: with
    /// capacity 0 (load tests) nothing is built at all.
    pub fn record(&mut self, capacity: usize, make: impl FnOnce() -> Arc<StoredMessage>) {
        self.received += 1;
        if capacity == 0 {
            return;
        }
        if self.kept.len() == capacity {
            self.kept.pop_front();
        }
        self.kept.push_back((self.received, make()));
    }

    /// Kept messages with their position `> after`, oldest first.
    pub fn since(&self, after: u64) -> impl Iterator<Item = (u64, &StoredMessage)> {
        self.kept.iter().filter(move |(seq, _)| *seq > after).map(|(seq, m)| (*seq, &**m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_system_from_application_properties() {
        let bag =
            PropertyBag::parse("%24.mid=7&%24.ct=application%2Fjson&%24.sub=thermostat1&alert=high&flag").unwrap();
        let from = Sender { device_id: "d", module_id: Some("m"), model_id: Some("dtmi:x;1"), generation_id: "1" };
        let m = receive(&bag, Bytes::from_static(b"{}"), &from, true, false, SystemTime::UNIX_EPOCH);
        let v = m.to_json(1);
        assert_eq!(v["systemProperties"]["message-id"], "7");
        assert_eq!(v["systemProperties"]["dt-subject"], "thermostat1");
        assert_eq!(v["systemProperties"]["dt-dataschema"], "dtmi:x;1");
        assert_eq!(v["systemProperties"]["iothub-connection-module-id"], "m");
        assert_eq!(v["properties"]["alert"], "high");
        assert_eq!(v["properties"]["flag"], Value::Null);
        assert_eq!(v["properties"]["mqtt-retain"], "true");
        assert_eq!(v["body"], "{}");
        assert_eq!(message_size(&bag, 2), 2 + 5 + 1 + 4 + 16 + 5 + 11 + 5 + 4 + 4);
    }

    #[test]
    fn the_ring_keeps_the_newest() {
        let mut log = TelemetryLog::default();
        let from = Sender { device_id: "d", module_id: None, model_id: None, generation_id: "1" };
        for i in 0..5u8 {
            log.record(3, || {
                Arc::new(receive(
                    &PropertyBag::default(),
                    Bytes::from(vec![i]),
                    &from,
                    false,
                    false,
                    SystemTime::UNIX_EPOCH,
                ))
            });
        }
        assert_eq!(log.received, 5);
        let mut counting = TelemetryLog::default();
        counting.record(0, || panic!("nothing is built when nothing is kept"));
        assert_eq!((counting.received, counting.since(0).count()), (1, 0));
        assert_eq!(log.since(0).map(|(seq, _)| seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(log.since(4).count(), 1);
        let (seq, first) = log.since(0).next().unwrap();
        assert!(first.to_json(seq).get("bodyBase64").is_none());
    }
}
