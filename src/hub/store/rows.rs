//! What one row of each table holds, and the conversions between the hub's state and rows: an
//! identity (record, twin, C2D queue), an enrollment, a registration, an event of the Event
//! Hubs-compatible endpoint, a C2D feedback record. JSON columns carry what SQL never filters on;
//! ids, keys, the X.509 fields and event numbers are columns of their own.

use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::hub::c2d::{C2dMessage, C2dQueue, Lock};
use crate::hub::clock::Instant;
use crate::hub::dps::{GroupEnrollment, IndividualEnrollment};
use crate::hub::eventhub::{Event, unix_ms};
use crate::hub::feedback::{self, Pending, Status};
use crate::hub::registry::{Auth, IdentityState, Record};
use crate::hub::telemetry::{Source, StoredMessage};
use crate::hub::twin_doc::TwinDoc;
use crate::iot::property_bag::PropertyBag;
use crate::iot::sas::Key;

/// A row the store cannot read back (a damaged or hand-edited file). Names the row, never a
/// value (a key column may be what is wrong).
#[derive(Debug, thiserror::Error)]
#[error("the stored {what} `{id}` is not readable: {reason}")]
pub struct BadRow {
    pub what: &'static str,
    pub id: String,
    pub reason: String,
}

/// A row whose body is one JSON document, read as `T`; `what` and `id` name the row if it does not
/// parse.
pub fn json<T: serde::de::DeserializeOwned>(what: &'static str, id: &str, body: &str) -> Result<T, BadRow> {
    serde_json::from_str(body).map_err(|e| BadRow { what, id: id.to_owned(), reason: e.to_string() })
}

/// The `record` column: the registry fields that are not columns of their own.
#[derive(Serialize, Deserialize)]
struct RecordJson {
    enabled: bool,
    status_reason: Option<String>,
    status_updated: Option<SystemTime>,
    record_version: u64,
    iot_edge: bool,
    managed_by: Option<String>,
    connection_state_updated: Option<SystemTime>,
    last_activity: Option<SystemTime>,
    model_id: Option<String>,
}

/// One queued C2D message (or module input). Its MQTT connection is not kept (a restarted hub has
/// none, so a message in flight there is Enqueued again, its delivery count kept); an HTTPS lock
/// is, with its token and wall-clock end, so the device can still settle what it received.
#[derive(Serialize, Deserialize)]
struct C2dJson {
    id: u64,
    body: String,
    properties: Vec<(String, Option<String>)>,
    enqueued_at: SystemTime,
    expires_at: SystemTime,
    delivery_count: u32,
    /// The module input of a message an IoT Edge route queued (absent for C2D).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    input: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lock: Option<LockJson>,
}

#[derive(Serialize, Deserialize)]
struct LockJson {
    token: String,
    until: SystemTime,
}

#[derive(Serialize, Deserialize)]
struct QueueJson {
    next_id: u64,
    messages: Vec<C2dJson>,
}

/// An identity's row, ready to bind (`writer.rs`) or just read (`load.rs`).
pub struct IdentityRow {
    pub key: String,
    pub device_id: String,
    pub module_id: Option<String>,
    pub generation_id: String,
    pub auth_type: String,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
    pub record: String,
    pub twin: String,
    pub c2d: String,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl IdentityRow {
    /// The row for an identity as it is now (taken under its lock); `now` and `wall` are the same
    /// moment, to turn lock deadlines into wall-clock times.
    pub fn of(
        key: String,
        device_id: &str,
        module_id: Option<&str>,
        st: &IdentityState,
        now: Instant,
        wall: SystemTime,
    ) -> IdentityRow {
        let r = &st.record;
        let record = RecordJson {
            enabled: r.enabled,
            status_reason: r.status_reason.clone(),
            status_updated: r.status_updated,
            record_version: r.record_version,
            iot_edge: r.iot_edge,
            managed_by: r.managed_by.clone(),
            connection_state_updated: r.connection_state_updated,
            last_activity: r.last_activity,
            model_id: r.model_id.clone(),
        };
        let (next_id, messages) = st.c2d.snapshot();
        let queue = QueueJson {
            next_id,
            messages: messages
                .into_iter()
                .map(|m| C2dJson {
                    id: m.id,
                    body: b64().encode(&m.body),
                    properties: m.properties.0,
                    enqueued_at: m.enqueued_at,
                    expires_at: m.expires_at,
                    delivery_count: m.delivery_count,
                    input: m.input,
                    lock: m
                        .lock
                        .filter(|l| l.until > now)
                        .map(|l| LockJson { until: wall + l.until.saturating_duration_since(now), token: l.token }),
                })
                .collect(),
        };
        IdentityRow {
            key,
            device_id: device_id.to_owned(),
            module_id: module_id.map(str::to_owned),
            generation_id: r.generation_id.clone(),
            auth_type: r.auth.kind().into(),
            // Keys only where they authenticate: IoT Hub keeps none for the other types.
            primary_key: (r.auth == Auth::Sas).then(|| r.primary_key.clone()),
            secondary_key: (r.auth == Auth::Sas).then(|| r.secondary_key.clone()),
            primary_thumbprint: r.auth.thumbprints().0.map(str::to_owned),
            secondary_thumbprint: r.auth.thumbprints().1.map(str::to_owned),
            // Serializing plain data (maps, strings, numbers, times after 1970) cannot fail.
            record: serde_json::to_string(&record).unwrap_or_default(),
            twin: serde_json::to_string(&st.twin).unwrap_or_default(),
            c2d: serde_json::to_string(&queue).unwrap_or_default(),
        }
    }

    /// The record, twin and queue this row holds, with C2D deadlines rebuilt on the hub's clock
    /// (`now` and `wall` are the same moment).
    pub fn into_state(self, now: Instant, wall: SystemTime) -> Result<(Record, TwinDoc, C2dQueue), BadRow> {
        let bad = |reason: String| BadRow { what: "identity", id: self.key.clone(), reason };
        let rec: RecordJson = serde_json::from_str(&self.record).map_err(|e| bad(format!("record: {e}")))?;
        let key = |k: &Option<String>| {
            k.as_deref().map(Key::from_base64).transpose().map_err(|_| bad("a key is not base64".into()))
        };
        let auth =
            Auth::from_parts(&self.auth_type, self.primary_thumbprint.clone(), self.secondary_thumbprint.clone())
                .ok_or_else(|| bad(format!("authentication type `{}` is not one this build serves", self.auth_type)))?;
        let (primary, secondary) = match (key(&self.primary_key)?, key(&self.secondary_key)?) {
            (Some(p), Some(s)) => (p, s),
            // Keys that never sign anything: the type is not `sas`.
            _ if auth != Auth::Sas => (Key::generate(), Key::generate()),
            _ => return Err(bad("a `sas` identity without both keys".into())),
        };
        let mut record = Record::new(primary, secondary);
        record.auth = auth;
        record.generation_id = self.generation_id.clone();
        record.enabled = rec.enabled;
        record.status_reason = rec.status_reason;
        record.status_updated = rec.status_updated;
        record.record_version = rec.record_version;
        record.iot_edge = rec.iot_edge;
        record.managed_by = rec.managed_by;
        record.connection_state_updated = rec.connection_state_updated;
        record.last_activity = rec.last_activity;
        record.model_id = rec.model_id;
        let twin: TwinDoc = serde_json::from_str(&self.twin).map_err(|e| bad(format!("twin: {e}")))?;
        let queue: QueueJson = serde_json::from_str(&self.c2d).map_err(|e| bad(format!("c2d: {e}")))?;
        let mut messages = Vec::with_capacity(queue.messages.len());
        for m in queue.messages {
            let body = b64().decode(&m.body).map_err(|_| bad("a c2d body is not base64".into()))?;
            let left = m.expires_at.duration_since(wall).unwrap_or(Duration::ZERO);
            messages.push(C2dMessage {
                id: m.id,
                body: Bytes::from(body),
                properties: PropertyBag(m.properties),
                expires: now + left,
                enqueued_at: m.enqueued_at,
                expires_at: m.expires_at,
                delivery_count: m.delivery_count,
                sent_on: None,
                lock: m.lock.and_then(|l| {
                    let left = l.until.duration_since(wall).ok()?;
                    Some(Lock { token: l.token, until: now + left })
                }),
                input: m.input,
            });
        }
        Ok((record, twin, C2dQueue::restore(queue.next_id, messages)))
    }
}

/// The `body` of an enrollment row (`kind` `individual` or `group`).
#[derive(Serialize, Deserialize)]
struct EnrollmentJson {
    /// The id as it was written (the row's key folds an individual enrollment's case, as DPS does).
    id: String,
    device_id: Option<String>,
    primary_key: String,
    secondary_key: String,
    enabled: bool,
    etag: u64,
}

pub fn individual_body(e: &IndividualEnrollment) -> String {
    let j = EnrollmentJson {
        id: e.registration_id.clone(),
        device_id: e.device_id.clone(),
        primary_key: e.keys[0].to_base64(),
        secondary_key: e.keys[1].to_base64(),
        enabled: e.enabled,
        etag: e.etag,
    };
    serde_json::to_string(&j).unwrap_or_default()
}

pub fn group_body(g: &GroupEnrollment) -> String {
    let j = EnrollmentJson {
        id: g.group_id.clone(),
        device_id: None,
        primary_key: g.keys[0].to_base64(),
        secondary_key: g.keys[1].to_base64(),
        enabled: g.enabled,
        etag: g.etag,
    };
    serde_json::to_string(&j).unwrap_or_default()
}

fn enrollment(id: &str, body: &str) -> Result<(EnrollmentJson, [Key; 2]), BadRow> {
    let bad = |reason: &str| BadRow { what: "enrollment", id: id.to_owned(), reason: reason.to_owned() };
    let j: EnrollmentJson = serde_json::from_str(body).map_err(|_| bad("not the enrollment shape"))?;
    let k = |s: &str| Key::from_base64(s).map_err(|_| bad("a key is not base64"));
    let keys = [k(&j.primary_key)?, k(&j.secondary_key)?];
    Ok((j, keys))
}

pub fn individual_from(id: &str, body: &str) -> Result<IndividualEnrollment, BadRow> {
    let (j, keys) = enrollment(id, body)?;
    Ok(IndividualEnrollment { registration_id: j.id, device_id: j.device_id, keys, enabled: j.enabled, etag: j.etag })
}

pub fn group_from(id: &str, body: &str) -> Result<GroupEnrollment, BadRow> {
    let (j, keys) = enrollment(id, body)?;
    Ok(GroupEnrollment { group_id: j.id, keys, enabled: j.enabled, etag: j.etag })
}

/// An event row of the Event Hubs-compatible endpoint: the numbers as columns, the message's
/// source and properties as JSON, the body as it arrived.
pub struct EventRow {
    pub partition: i64,
    pub seq: i64,
    pub offset: i64,
    pub enqueued_ms: i64,
    pub source: String,
    pub properties: String,
    pub body: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct EventProperties {
    system: Vec<(String, String)>,
    application: Vec<(String, Option<String>)>,
}

/// Milliseconds since the Unix epoch as a wall-clock time (0 and below: the epoch).
pub fn from_unix_ms(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl EventRow {
    pub fn of(partition: usize, e: &Event) -> EventRow {
        let m = &e.message;
        let props = EventProperties { system: m.system.clone(), application: m.application.clone() };
        EventRow {
            partition: partition as i64,
            seq: e.sequence_number,
            offset: e.offset,
            enqueued_ms: unix_ms(e.enqueued),
            source: m.source.as_str().to_owned(),
            properties: serde_json::to_string(&props).unwrap_or_default(),
            body: m.body.to_vec(),
        }
    }

    pub fn into_event(self) -> Result<Event, BadRow> {
        let bad = |reason: String| BadRow {
            what: "event",
            id: format!("partition {} sequence number {}", self.partition, self.seq),
            reason,
        };
        let source = Source::parse(&self.source).ok_or_else(|| bad(format!("unknown source `{}`", self.source)))?;
        let props: EventProperties =
            serde_json::from_str(&self.properties).map_err(|e| bad(format!("properties: {e}")))?;
        let enqueued = from_unix_ms(self.enqueued_ms);
        Ok(Event {
            sequence_number: self.seq,
            offset: self.offset,
            enqueued,
            message: std::sync::Arc::new(StoredMessage {
                source,
                enqueued,
                system: props.system,
                application: props.application,
                body: Bytes::from(self.body),
            }),
        })
    }
}

/// The `body` of a feedback row.
#[derive(Serialize, Deserialize)]
struct FeedbackJson {
    original_message_id: String,
    device_id: String,
    device_generation_id: String,
    at: SystemTime,
    status: String,
}

pub fn feedback_body(r: &feedback::Record) -> String {
    let j = FeedbackJson {
        original_message_id: r.original_message_id.clone(),
        device_id: r.device_id.clone(),
        device_generation_id: r.device_generation_id.clone(),
        at: r.at,
        status: r.status.code().to_owned(),
    };
    serde_json::to_string(&j).unwrap_or_default()
}

pub fn feedback_from(id: u64, body: &str) -> Result<Pending, BadRow> {
    let bad = |reason: String| BadRow { what: "feedback record", id: id.to_string(), reason };
    let j: FeedbackJson = json("feedback record", &id.to_string(), body)?;
    let status = Status::parse(&j.status).ok_or_else(|| bad(format!("unknown status `{}`", j.status)))?;
    Ok(Pending {
        id,
        record: feedback::Record {
            original_message_id: j.original_message_id,
            device_id: j.device_id,
            device_generation_id: j.device_generation_id,
            at: j.at,
            status,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_row_gives_back_the_event() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let e = Event {
            sequence_number: 41,
            offset: 9000,
            enqueued: at,
            message: std::sync::Arc::new(StoredMessage {
                source: Source::TwinChangeEvents,
                enqueued: at,
                system: vec![("iothub-connection-device-id".into(), "d1".into())],
                application: vec![("k".into(), Some("v".into())), ("flag".into(), None)],
                body: Bytes::from_static(b"\x00binary\xff"),
            }),
        };
        let back = EventRow::of(3, &e).into_event().unwrap();
        assert_eq!((back.sequence_number, back.offset, back.enqueued), (41, 9000, at));
        assert_eq!(back.message.source, Source::TwinChangeEvents);
        assert_eq!(back.message.system, e.message.system);
        assert_eq!(back.message.application, e.message.application);
        assert_eq!(back.message.body, e.message.body);
    }

    #[test]
    fn a_damaged_event_or_feedback_row_is_named_not_loaded() {
        let mut row = EventRow::of(
            0,
            &Event {
                sequence_number: 7,
                offset: 0,
                enqueued: SystemTime::UNIX_EPOCH,
                message: std::sync::Arc::new(StoredMessage {
                    source: Source::Telemetry,
                    enqueued: SystemTime::UNIX_EPOCH,
                    system: Vec::new(),
                    application: Vec::new(),
                    body: Bytes::new(),
                }),
            },
        );
        row.source = "Gossip".into();
        let e = row.into_event().unwrap_err().to_string();
        assert!(e.contains("partition 0 sequence number 7") && e.contains("Gossip"), "{e}");
        assert!(feedback_from(3, "{}").unwrap_err().to_string().contains("feedback record `3`"));
        let r = feedback::Record {
            original_message_id: "m".into(),
            device_id: "d".into(),
            device_generation_id: "g".into(),
            at: SystemTime::UNIX_EPOCH,
            status: Status::Purged,
        };
        assert_eq!(feedback_from(5, &feedback_body(&r)).unwrap(), Pending { id: 5, record: r });
    }
}
