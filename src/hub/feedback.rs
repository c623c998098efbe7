//! C2D feedback: the records IoT Hub keeps for the service about the C2D messages whose sender
//! asked for an acknowledgement (`iothub-ack`), and the hub-wide queue the service reads them
//! from (over AMQP, `/messages/servicebound/feedback`). Microsoft's "Understand cloud-to-device
//! messaging" (message feedback) fixes the rules: `positive` asks for `Success` only, `negative`
//! for the other outcomes (`Expired`, `DeliveryCountExceeded`, `Rejected`, `Purged`), `full` for
//! both, `none` for nothing; a feedback message's body is a JSON array of records
//! (`originalMessageId`, `deviceGenerationId`, `deviceId`, `enqueuedTimeUtc`, `statusCode`,
//! `description`) with content type `application/vnd.microsoft.iothub.feedback.json`. No I/O.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::iot::time::iso8601;

/// The content type of a feedback message.
pub const CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.feedback.json";

/// Records one feedback message carries at most; what is pending beyond it goes in the next.
pub const MAX_BATCH: usize = 64;

/// How long a record waits to be read before it is dropped (IoT Hub's feedback queue keeps
/// records for one hour by default: `feedback.ttlAsIso8601` `PT1H`).
pub const TTL: Duration = Duration::from_secs(3600);

/// Records kept at most; past it the oldest is dropped, so a service that never reads cannot
/// exhaust memory.
pub const CAPACITY: usize = 100_000;

/// A message's outcome, as the feedback record's `statusCode` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The device completed it.
    Success,
    /// Its time to live ran out first.
    Expired,
    /// It was delivered the maximum number of times without completion (dead-lettered).
    DeliveryCountExceeded,
    /// The device rejected it.
    Rejected,
    /// The service purged the device's queue.
    Purged,
}

impl Status {
    pub fn code(self) -> &'static str {
        match self {
            Status::Success => "Success",
            Status::Expired => "Expired",
            Status::DeliveryCountExceeded => "DeliveryCountExceeded",
            Status::Rejected => "Rejected",
            Status::Purged => "Purged",
        }
    }

    /// The status a `statusCode` names (as `code` writes it).
    pub fn parse(code: &str) -> Option<Status> {
        use Status::*;
        [Success, Expired, DeliveryCountExceeded, Rejected, Purged].into_iter().find(|s| s.code() == code)
    }

    /// The record's `description`: Microsoft documents only `Success`'s; the others say what
    /// happened in the same few words.
    pub fn description(self) -> &'static str {
        match self {
            Status::Success => "Success",
            Status::Expired => "Message Expired",
            Status::DeliveryCountExceeded => "Message delivery count exceeded",
            Status::Rejected => "Message rejected",
            Status::Purged => "Message purged",
        }
    }

    /// Whether a sender that set `iothub-ack` to `ack` asked to hear of this outcome.
    pub fn wanted_by(self, ack: &str) -> bool {
        let positive = self == Status::Success;
        match ack.to_ascii_lowercase().as_str() {
            "full" => true,
            "positive" => positive,
            "negative" => !positive,
            _ => false,
        }
    }
}

/// One feedback record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub original_message_id: String,
    pub device_id: String,
    pub device_generation_id: String,
    /// When the outcome happened.
    pub at: SystemTime,
    pub status: Status,
}

impl Record {
    pub fn to_json(&self) -> Value {
        json!({
            "originalMessageId": self.original_message_id,
            "deviceGenerationId": self.device_generation_id,
            "deviceId": self.device_id,
            "enqueuedTimeUtc": iso8601(self.at),
            "statusCode": self.status.code(),
            "description": self.status.description(),
        })
    }
}

/// The body of a feedback message: the records as a JSON array.
pub fn body(records: &[Record]) -> Vec<u8> {
    Value::Array(records.iter().map(Record::to_json).collect()).to_string().into_bytes()
}

/// A record waiting in the queue, numbered so the store can keep it until a reader settles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub id: u64,
    pub record: Record,
}

/// The hub's feedback queue: records in the order their outcomes happened, a waiter woken when
/// one arrives.
#[derive(Debug, Default)]
pub struct FeedbackQueue {
    records: Mutex<Records>,
    arrived: Notify,
}

#[derive(Debug, Default)]
struct Records {
    queue: VecDeque<Pending>,
    next_id: u64,
}

impl FeedbackQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a record (dropping the oldest past `CAPACITY`), wakes a reader, and returns it
    /// numbered.
    pub fn push(&self, record: Record) -> Pending {
        let mut r = self.lock();
        if r.queue.len() >= CAPACITY {
            r.queue.pop_front();
        }
        r.next_id += 1;
        let pending = Pending { id: r.next_id, record };
        r.queue.push_back(pending.clone());
        drop(r);
        self.arrived.notify_one();
        pending
    }

    /// Puts back records a store kept, oldest first, before any push: numbering goes on after
    /// the highest id.
    pub fn restore(&self, records: Vec<Pending>) {
        let mut r = self.lock();
        for p in records {
            r.next_id = r.next_id.max(p.id);
            if r.queue.len() >= CAPACITY {
                r.queue.pop_front();
            }
            r.queue.push_back(p);
        }
    }

    /// Takes up to `MAX_BATCH` records for one feedback message, after dropping those older than
    /// `TTL` at `now`; empty when nothing is pending.
    pub fn take_batch(&self, now: SystemTime) -> Vec<Pending> {
        let mut r = self.lock();
        while r.queue.front().is_some_and(|p| now.duration_since(p.record.at).is_ok_and(|age| age > TTL)) {
            r.queue.pop_front();
        }
        let n = r.queue.len().min(MAX_BATCH);
        r.queue.drain(..n).collect()
    }

    /// Puts back records a reader took but did not settle as received (released, or the link
    /// went away), ahead of the rest, and wakes a reader.
    pub fn put_back(&self, records: Vec<Pending>) {
        if records.is_empty() {
            return;
        }
        let mut r = self.lock();
        for p in records.into_iter().rev() {
            r.queue.push_front(p);
        }
        drop(r);
        self.arrived.notify_one();
    }

    /// Waits until a record may be pending (a permit is kept if none is waiting, so a record
    /// pushed between `take_batch` and this call is not missed).
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }

    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, status: Status, at: SystemTime) -> Record {
        Record { original_message_id: id.into(), device_id: "d".into(), device_generation_id: "63".into(), at, status }
    }

    #[test]
    fn the_ack_decides_which_outcomes_are_reported() {
        use Status::*;
        let all = [Success, Expired, DeliveryCountExceeded, Rejected, Purged];
        let wanted = |ack: &str| all.iter().filter(|s| s.wanted_by(ack)).copied().collect::<Vec<_>>();
        assert_eq!(wanted("full"), all);
        assert_eq!(wanted("Full"), all, "any case");
        assert_eq!(wanted("positive"), [Success]);
        assert_eq!(wanted("negative"), [Expired, DeliveryCountExceeded, Rejected, Purged]);
        assert!(wanted("none").is_empty());
        assert!(wanted("").is_empty());
    }

    #[test]
    fn records_batch_in_order_and_come_back_when_not_received() {
        let q = FeedbackQueue::default();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for i in 0..MAX_BATCH + 2 {
            q.push(record(&format!("m{i}"), Status::Success, t));
        }
        let first = q.take_batch(t);
        assert_eq!(first.len(), MAX_BATCH);
        assert_eq!((first[0].id, first[0].record.original_message_id.as_str()), (1, "m0"));
        q.put_back(first);
        assert_eq!(q.len(), MAX_BATCH + 2);
        assert_eq!(q.take_batch(t)[0].record.original_message_id, "m0", "put back ahead of the rest");
        assert_eq!(q.take_batch(t).len(), 2);
        assert!(q.take_batch(t).is_empty());
        q.push(record("old", Status::Expired, t));
        assert!(q.take_batch(t + TTL + Duration::from_secs(1)).is_empty(), "older than the TTL");
    }

    #[test]
    fn restored_records_keep_their_ids_and_numbering_goes_on() {
        let q = FeedbackQueue::default();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        q.restore(vec![Pending { id: 7, record: record("a", Status::Success, t) }]);
        assert_eq!(q.push(record("b", Status::Rejected, t)).id, 8);
        let ids: Vec<u64> = q.take_batch(t).iter().map(|p| p.id).collect();
        assert_eq!(ids, [7, 8]);
    }

    #[test]
    fn a_record_has_the_documented_fields() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let v: Value = serde_json::from_slice(&body(&[record("m1", Status::Rejected, t)])).unwrap();
        assert_eq!(
            v,
            json!([{
                "originalMessageId": "m1",
                "deviceGenerationId": "63",
                "deviceId": "d",
                "enqueuedTimeUtc": "2023-11-14T22:13:20.000Z",
                "statusCode": "Rejected",
                "description": "Message rejected",
            }])
        );
    }
}
