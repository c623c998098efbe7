//! Cloud-to-device messages: a bounded queue per device, the one queue every transport reads.
//! Over MQTT, QoS 1 delivery, a PUBACK completes a message, and what was not acknowledged is
//! delivered again on the next connection. Over HTTPS (Microsoft's "Understand cloud-to-device
//! messaging": the message life cycle) a receive locks one message (Invisible) for the lock
//! timeout under a lock token; complete and reject remove it, abandon or an expired lock make it
//! Enqueued again. Expired messages and those past the delivery limit are dropped (dead-lettered),
//! and counted.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::hub::clock::Instant;
use crate::iot::property_bag::PropertyBag;

#[derive(Debug, Clone)]
pub struct C2dMessage {
    /// Queue-local id, used to match the device's PUBACK.
    pub id: u64,
    pub body: Bytes,
    /// The complete bag sent to the device (`$.mid`, `$.to`, `iothub-ack`, app properties).
    pub properties: PropertyBag,
    pub expires: Instant,
    /// When the hub accepted it, and when it expires, as wall-clock times for the HTTPS headers.
    pub enqueued_at: SystemTime,
    pub expires_at: SystemTime,
    pub delivery_count: u32,
    /// The MQTT connection it was last sent on; sent again only on another one.
    pub sent_on: Option<u64>,
    /// An HTTPS receive's lock: the token and until when it holds. While it holds, no transport
    /// delivers the message again.
    pub lock: Option<Lock>,
    /// The module input an IoT Edge route delivers it to (`edge.rs`); `None` for C2D. Input
    /// messages are redelivered until they expire, with no delivery limit, as Edge hub does.
    pub input: Option<String>,
}

/// The lock an HTTPS receive takes on a message (state Invisible).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    pub token: String,
    pub until: Instant,
}

impl C2dMessage {
    /// The MQTT topic it is published on: a module input, or the device's C2D topic.
    pub fn topic(&self, device_id: &str, module_id: Option<&str>) -> String {
        match (&self.input, module_id) {
            (Some(input), Some(module)) => crate::iot::topic::module_input(device_id, module, input, &self.properties),
            _ => crate::iot::topic::c2d(device_id, &self.properties),
        }
    }

    fn locked(&self, now: Instant) -> bool {
        self.lock.as_ref().is_some_and(|l| l.until > now)
    }
}

/// How a device settles a locked message (REST: DELETE, DELETE with `reject`, POST `/abandon`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Complete,
    Reject,
    Abandon,
}

/// The lock token names no message this device holds locked: unknown, settled, or expired
/// (Azure: 412 PreconditionFailed, error `DeviceMessageLockLost`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the lock token is unknown or its lock has expired")]
pub struct LockLost;

/// The service-side description of a message to send.
#[derive(Debug, Clone, Default)]
pub struct NewC2d {
    pub body: Bytes,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub ack: Option<String>,
    pub ttl: Option<Duration>,
    pub properties: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum C2dError {
    #[error("the device already has the maximum number of messages queued")]
    QueueFull,
    /// IoT Hub's limit on a C2D message body: 64 KB ("IoT Hub quotas and throttling").
    #[error("a C2D message is at most 64 KB")]
    TooLarge,
}

/// The largest C2D body IoT Hub takes.
pub const MAX_C2D_BODY: usize = 64 * 1024;

/// Why a queued message left the queue without being completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Expired,
    DeliveryCountExceeded,
}

/// A message that left the queue without being completed, for the counters and the feedback
/// its sender may have asked for.
#[derive(Debug, Clone)]
pub struct Dropped {
    pub why: DropReason,
    pub message: C2dMessage,
}

impl C2dMessage {
    /// The message id the hub delivered it under (`$.mid`).
    pub fn message_id(&self) -> &str {
        self.properties.get("$.mid").unwrap_or_default()
    }

    /// The feedback its sender asked for (`iothub-ack`: none, positive, negative, full).
    pub fn ack(&self) -> &str {
        self.properties.get("iothub-ack").unwrap_or("none")
    }
}

#[derive(Debug, Default)]
pub struct C2dQueue {
    next_id: u64,
    messages: VecDeque<C2dMessage>,
}

impl C2dQueue {
    /// The queue as the store keeps it: the next id and the messages in order (a cheap copy, the
    /// bodies are shared).
    pub fn snapshot(&self) -> (u64, Vec<C2dMessage>) {
        (self.next_id, self.messages.iter().cloned().collect())
    }

    /// A queue the store kept, put back (`store/rows.rs` rebuilds the messages).
    pub fn restore(next_id: u64, messages: Vec<C2dMessage>) -> C2dQueue {
        C2dQueue { next_id, messages: messages.into() }
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Adds a message, filling in the system properties the hub adds. Returns its message id.
    pub fn enqueue(
        &mut self,
        device_id: &str,
        m: NewC2d,
        max_queue: usize,
        default_ttl: Duration,
        now: Instant,
        wall: SystemTime,
    ) -> Result<String, C2dError> {
        if self.messages.len() >= max_queue {
            return Err(C2dError::QueueFull);
        }
        self.next_id += 1;
        let message_id = m.message_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let mut bag = PropertyBag::default();
        bag.push("$.mid", message_id.clone());
        bag.push("$.to", format!("/devices/{device_id}/messages/deviceBound"));
        for (key, value) in
            [("$.cid", m.correlation_id), ("$.uid", m.user_id), ("$.ct", m.content_type), ("$.ce", m.content_encoding)]
        {
            if let Some(v) = value {
                bag.push(key, v);
            }
        }
        bag.push("iothub-ack", m.ack.unwrap_or_else(|| "none".into()).to_ascii_lowercase());
        for (k, v) in m.properties {
            bag.push(k, v);
        }
        let ttl = m.ttl.unwrap_or(default_ttl).min(default_ttl);
        self.push(m.body, bag, ttl, (now, wall), None);
        Ok(message_id)
    }

    /// Appends a message under the id already taken (`next_id`), fresh: never delivered.
    fn push(
        &mut self,
        body: Bytes,
        properties: PropertyBag,
        ttl: Duration,
        at: (Instant, SystemTime),
        input: Option<String>,
    ) {
        let (now, wall) = at;
        self.messages.push_back(C2dMessage {
            id: self.next_id,
            body,
            properties,
            expires: now + ttl,
            enqueued_at: wall,
            expires_at: wall + ttl,
            delivery_count: 0,
            sent_on: None,
            lock: None,
            input,
        });
    }

    /// Queues a message an IoT Edge route delivers to module input `input`, with its property bag
    /// as routed. A full queue (`max_queue`) drops its oldest message first; returns whether one was
    /// dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue_input(
        &mut self,
        input: &str,
        properties: PropertyBag,
        body: Bytes,
        ttl: Duration,
        max_queue: usize,
        now: Instant,
        wall: SystemTime,
    ) -> bool {
        let dropped = self.messages.len() >= max_queue.max(1);
        if dropped {
            self.messages.pop_front();
        }
        self.next_id += 1;
        self.push(body, properties, ttl, (now, wall), Some(input.to_string()));
        dropped
    }

    /// Removes the messages `why` gives a reason for, into `dropped`.
    fn drop_where(&mut self, dropped: &mut Vec<Dropped>, why: impl Fn(&C2dMessage) -> Option<DropReason>) {
        let mut kept = VecDeque::with_capacity(self.messages.len());
        for m in self.messages.drain(..) {
            match why(&m) {
                Some(why) => dropped.push(Dropped { why, message: m }),
                None => kept.push_back(m),
            }
        }
        self.messages = kept;
    }

    /// Drops the expired messages (whether or not any transport is delivering): IoT Hub expires
    /// a message at its time, and its sender hears of it then.
    pub fn expire(&mut self, now: Instant, dropped: &mut Vec<Dropped>) {
        if self.messages.iter().any(|m| m.expires <= now) {
            self.drop_where(dropped, |m| (m.expires <= now).then_some(DropReason::Expired));
        }
    }

    /// Messages to send on MQTT connection `conn_id`: every one not already sent on it nor locked
    /// by an HTTPS receive, after dropping the expired and the over-delivered. Marks them sent.
    pub fn take_deliverable(
        &mut self,
        conn_id: u64,
        max_delivery: u32,
        now: Instant,
        dropped: &mut Vec<Dropped>,
    ) -> Vec<C2dMessage> {
        self.drop_where(dropped, |m| {
            if m.expires <= now {
                Some(DropReason::Expired)
            } else if m.delivery_count >= max_delivery
                && m.input.is_none()
                && m.sent_on != Some(conn_id)
                && !m.locked(now)
            {
                Some(DropReason::DeliveryCountExceeded)
            } else {
                None
            }
        });
        let mut out = Vec::new();
        for m in self.messages.iter_mut().filter(|m| m.sent_on != Some(conn_id) && !m.locked(now)) {
            m.sent_on = Some(conn_id);
            m.lock = None;
            m.delivery_count += 1;
            out.push(m.clone());
        }
        out
    }

    /// An HTTPS receive: locks the oldest message that is neither locked nor in flight on the live
    /// MQTT connection `live_conn`, for `lock_for`, under a new lock token, and counts a delivery.
    /// Expired messages and those already delivered `max_delivery` times are dropped on the way.
    pub fn take_locked(
        &mut self,
        live_conn: Option<u64>,
        lock_for: Duration,
        max_delivery: u32,
        now: Instant,
        dropped: &mut Vec<Dropped>,
    ) -> Option<C2dMessage> {
        let free = |m: &C2dMessage| !m.locked(now) && (m.sent_on.is_none() || m.sent_on != live_conn);
        self.drop_where(dropped, |m| {
            if m.expires <= now {
                Some(DropReason::Expired)
            } else if m.delivery_count >= max_delivery && free(m) {
                Some(DropReason::DeliveryCountExceeded)
            } else {
                None
            }
        });
        let m = self.messages.iter_mut().find(|m| free(m))?;
        m.sent_on = None;
        m.lock = Some(Lock { token: uuid::Uuid::new_v4().to_string(), until: now + lock_for });
        m.delivery_count += 1;
        Some(m.clone())
    }

    /// Settles the message locked under `token`: complete and reject remove it (returned, for
    /// the caller's counters), abandon unlocks it for the next receive.
    pub fn settle(&mut self, token: &str, how: Settle, now: Instant) -> Result<C2dMessage, LockLost> {
        let i = self
            .messages
            .iter()
            .position(|m| m.locked(now) && m.lock.as_ref().is_some_and(|l| l.token == token))
            .ok_or(LockLost)?;
        match how {
            Settle::Complete | Settle::Reject => self.messages.remove(i).ok_or(LockLost),
            Settle::Abandon => {
                let m = &mut self.messages[i];
                m.lock = None;
                Ok(m.clone())
            }
        }
    }

    /// The device acknowledged message `id`: it is done, and returned (`None` if it was not
    /// queued any more).
    pub fn complete(&mut self, id: u64) -> Option<C2dMessage> {
        let i = self.messages.iter().position(|m| m.id == id)?;
        self.messages.remove(i)
    }

    /// Empties the queue (service purge); returns what was removed.
    pub fn purge(&mut self) -> Vec<C2dMessage> {
        self.messages.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &'static str) -> NewC2d {
        NewC2d {
            body: Bytes::from_static(body.as_bytes()),
            ack: Some("Full".into()),
            properties: vec![("k".into(), "v".into())],
            ..Default::default()
        }
    }

    #[test]
    fn redelivers_what_was_not_acknowledged_on_the_next_connection() {
        let now = crate::hub::clock::now();
        let ttl = Duration::from_secs(60);
        let mut q = C2dQueue::default();
        let mid = q.enqueue("d", msg("a"), 50, ttl, now, SystemTime::UNIX_EPOCH).unwrap();
        q.enqueue("d", msg("b"), 50, ttl, now, SystemTime::UNIX_EPOCH).unwrap();
        let mut dropped = Vec::new();
        let first = q.take_deliverable(1, 100, now, &mut dropped);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].properties.get("$.mid"), Some(mid.as_str()));
        assert_eq!(first[0].properties.get("iothub-ack"), Some("full"));
        assert_eq!(first[0].properties.get("$.to"), Some("/devices/d/messages/deviceBound"));
        assert!(q.take_deliverable(1, 100, now, &mut dropped).is_empty(), "not twice on one connection");
        assert!(q.complete(first[0].id).is_some());
        assert!(q.complete(first[0].id).is_none(), "completed once");
        let again = q.take_deliverable(2, 100, now, &mut dropped);
        assert_eq!((again.len(), again[0].delivery_count), (1, 2));
        assert!(dropped.is_empty());
    }

    #[test]
    fn bounds_the_queue_and_drops_expired_and_overdelivered() {
        let now = crate::hub::clock::now();
        let mut q = C2dQueue::default();
        q.enqueue("d", msg("a"), 2, Duration::from_secs(60), now, SystemTime::UNIX_EPOCH).unwrap();
        q.enqueue(
            "d",
            NewC2d { ttl: Some(Duration::from_secs(1)), ..msg("b") },
            2,
            Duration::from_secs(60),
            now,
            SystemTime::UNIX_EPOCH,
        )
        .unwrap();
        assert_eq!(
            q.enqueue("d", msg("c"), 2, Duration::from_secs(60), now, SystemTime::UNIX_EPOCH),
            Err(C2dError::QueueFull)
        );
        let mut dropped = Vec::new();
        assert_eq!(q.take_deliverable(1, 1, now + Duration::from_secs(2), &mut dropped).len(), 1);
        let why = |d: &[Dropped]| d.iter().map(|d| d.why).collect::<Vec<_>>();
        assert_eq!(why(&dropped), [DropReason::Expired]);
        assert_eq!(dropped[0].message.body.as_ref(), b"b", "the dropped message comes back for its feedback");
        assert_eq!(dropped[0].message.ack(), "full");
        assert!(q.take_deliverable(2, 1, now, &mut dropped).is_empty());
        assert_eq!(why(&dropped), [DropReason::Expired, DropReason::DeliveryCountExceeded]);
        assert!(q.purge().is_empty());
    }

    #[test]
    fn an_https_lock_hides_a_message_until_settled_or_expired() {
        let now = crate::hub::clock::now();
        let lock = Duration::from_secs(60);
        let mut q = C2dQueue::default();
        let wall = SystemTime::UNIX_EPOCH;
        q.enqueue("d", msg("a"), 50, Duration::from_secs(3600), now, wall).unwrap();
        q.enqueue("d", msg("b"), 50, Duration::from_secs(3600), now, wall).unwrap();
        let mut dropped = Vec::new();
        let a = q.take_locked(None, lock, 10, now, &mut dropped).unwrap();
        assert_eq!((a.body.as_ref(), a.delivery_count), (b"a".as_ref(), 1));
        assert_eq!(a.expires_at, wall + Duration::from_secs(3600));
        let b = q.take_locked(None, lock, 10, now, &mut dropped).unwrap();
        assert_eq!(b.body.as_ref(), b"b");
        assert!(q.take_locked(None, lock, 10, now, &mut dropped).is_none(), "both are locked");
        assert!(q.take_deliverable(7, 10, now, &mut dropped).is_empty(), "MQTT does not take locked messages");
        let token = |m: &C2dMessage| m.lock.clone().unwrap().token;
        assert_eq!(q.settle(&token(&a), Settle::Complete, now).unwrap().id, a.id);
        assert_eq!(q.settle(&token(&a), Settle::Complete, now).err(), Some(LockLost), "settled already");
        assert_eq!(q.settle("nonsense", Settle::Reject, now).err(), Some(LockLost));
        // b's lock expires: settling fails and the next receive gets it again, counted.
        let later = now + lock;
        assert_eq!(q.settle(&token(&b), Settle::Abandon, later).err(), Some(LockLost));
        let again = q.take_locked(None, lock, 10, later, &mut dropped).unwrap();
        assert_eq!((again.id, again.delivery_count), (b.id, 2));
        assert_ne!(token(&again), token(&b), "a new lock, a new token");
        q.settle(&token(&again), Settle::Abandon, later).unwrap();
        assert_eq!(q.take_locked(None, lock, 10, later, &mut dropped).unwrap().delivery_count, 3);
        assert!(dropped.is_empty());
    }

    #[test]
    fn https_receives_dead_letter_past_the_delivery_count_and_skip_mqtt_in_flight() {
        let now = crate::hub::clock::now();
        let lock = Duration::from_secs(60);
        let mut q = C2dQueue::default();
        q.enqueue("d", msg("a"), 50, Duration::from_secs(3600), now, SystemTime::UNIX_EPOCH).unwrap();
        let mut dropped = Vec::new();
        assert_eq!(q.take_deliverable(5, 2, now, &mut dropped).len(), 1);
        assert!(q.take_locked(Some(5), lock, 2, now, &mut dropped).is_none(), "in flight on the live connection");
        let m = q.take_locked(None, lock, 2, now, &mut dropped).expect("the connection is gone");
        assert_eq!(m.delivery_count, 2);
        q.settle(&m.lock.unwrap().token, Settle::Abandon, now).unwrap();
        assert!(q.take_locked(None, lock, 2, now, &mut dropped).is_none());
        assert_eq!(dropped.iter().map(|d| d.why).collect::<Vec<_>>(), [DropReason::DeliveryCountExceeded]);
        assert!(q.is_empty());
    }
}
