//! What one row of each table holds, and the conversions between the hub's state and rows: an
//! identity (record, twin, C2D queue), an enrollment, a registration. JSON columns carry what SQL
//! never filters on; ids, keys and the X.509 fields are columns of their own.

use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::hub::c2d::{C2dMessage, C2dQueue};
use crate::hub::clock::Instant;
use crate::hub::dps::{GroupEnrollment, IndividualEnrollment};
use crate::hub::registry::{IdentityState, Record};
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

/// One queued C2D message (or module input). Its MQTT connection and HTTPS lock are not kept: a restarted hub has
/// neither, so the message is Enqueued again (its delivery count kept).
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
    pub record: String,
    pub twin: String,
    pub c2d: String,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl IdentityRow {
    /// The row for an identity as it is now (taken under its lock).
    pub fn of(key: String, device_id: &str, module_id: Option<&str>, st: &IdentityState) -> IdentityRow {
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
                })
                .collect(),
        };
        IdentityRow {
            key,
            device_id: device_id.to_owned(),
            module_id: module_id.map(str::to_owned),
            generation_id: r.generation_id.clone(),
            auth_type: "sas".into(),
            primary_key: Some(r.primary_key.clone()),
            secondary_key: Some(r.secondary_key.clone()),
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
        let (Some(primary), Some(secondary)) = (key(&self.primary_key)?, key(&self.secondary_key)?) else {
            return Err(bad(format!("authentication type `{}` is not one this build serves", self.auth_type)));
        };
        let mut record = Record::new(primary, secondary);
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
                lock: None,
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
