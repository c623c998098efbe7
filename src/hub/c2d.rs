//! Cloud-to-device messages (protocol.md §4.7): a bounded queue per device, QoS 1 delivery, a
//! PUBACK completes a message, and what was not acknowledged is delivered again on the next
//! connection. Expired messages and those past the delivery limit are dropped, and counted.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::iot::property_bag::PropertyBag;

#[derive(Debug, Clone)]
pub struct C2dMessage {
    /// Queue-local id, used to match the device's PUBACK.
    pub id: u64,
    pub body: Bytes,
    /// The complete bag sent to the device (`$.mid`, `$.to`, `iothub-ack`, app properties).
    pub properties: PropertyBag,
    pub expires: Instant,
    pub delivery_count: u32,
    /// The connection it was last sent on; sent again only on another one.
    pub sent_on: Option<u64>,
}

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
}

/// Why a queued message left the queue without being completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    Expired,
    DeliveryCountExceeded,
}

#[derive(Debug, Default)]
pub struct C2dQueue {
    next_id: u64,
    messages: VecDeque<C2dMessage>,
}

impl C2dQueue {
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
        self.messages.push_back(C2dMessage {
            id: self.next_id,
            body: m.body,
            properties: bag,
            expires: now + ttl,
            delivery_count: 0,
            sent_on: None,
        });
        Ok(message_id)
    }

    /// Messages to send on connection `conn_id`: every one not already sent on it, after dropping
    /// the expired and the over-delivered. Marks them sent.
    pub fn take_deliverable(
        &mut self,
        conn_id: u64,
        max_delivery: u32,
        now: Instant,
        dropped: &mut Vec<Dropped>,
    ) -> Vec<C2dMessage> {
        self.messages.retain(|m| {
            if m.expires <= now {
                dropped.push(Dropped::Expired);
                false
            } else if m.delivery_count >= max_delivery && m.sent_on != Some(conn_id) {
                dropped.push(Dropped::DeliveryCountExceeded);
                false
            } else {
                true
            }
        });
        let mut out = Vec::new();
        for m in self.messages.iter_mut().filter(|m| m.sent_on != Some(conn_id)) {
            m.sent_on = Some(conn_id);
            m.delivery_count += 1;
            out.push(m.clone());
        }
        out
    }

    /// The device acknowledged message `id`: it is done.
    pub fn complete(&mut self, id: u64) -> bool {
        let before = self.messages.len();
        self.messages.retain(|m| m.id != id);
        self.messages.len() != before
    }

    /// Empties the queue (service purge); returns how many were removed.
    pub fn purge(&mut self) -> usize {
        let n = self.messages.len();
        self.messages.clear();
        n
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
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        let mut q = C2dQueue::default();
        let mid = q.enqueue("d", msg("a"), 50, ttl, now).unwrap();
        q.enqueue("d", msg("b"), 50, ttl, now).unwrap();
        let mut dropped = Vec::new();
        let first = q.take_deliverable(1, 100, now, &mut dropped);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].properties.get("$.mid"), Some(mid.as_str()));
        assert_eq!(first[0].properties.get("iothub-ack"), Some("full"));
        assert_eq!(first[0].properties.get("$.to"), Some("/devices/d/messages/deviceBound"));
        assert!(q.take_deliverable(1, 100, now, &mut dropped).is_empty(), "not twice on one connection");
        assert!(q.complete(first[0].id));
        let again = q.take_deliverable(2, 100, now, &mut dropped);
        assert_eq!((again.len(), again[0].delivery_count), (1, 2));
        assert!(dropped.is_empty());
    }

    #[test]
    fn bounds_the_queue_and_drops_expired_and_overdelivered() {
        let now = Instant::now();
        let mut q = C2dQueue::default();
        q.enqueue("d", msg("a"), 2, Duration::from_secs(60), now).unwrap();
        q.enqueue("d", NewC2d { ttl: Some(Duration::from_secs(1)), ..msg("b") }, 2, Duration::from_secs(60), now)
            .unwrap();
        assert_eq!(q.enqueue("d", msg("c"), 2, Duration::from_secs(60), now), Err(C2dError::QueueFull));
        let mut dropped = Vec::new();
        assert_eq!(q.take_deliverable(1, 1, now + Duration::from_secs(2), &mut dropped).len(), 1);
        assert_eq!(dropped, [Dropped::Expired]);
        assert!(q.take_deliverable(2, 1, now, &mut dropped).is_empty());
        assert_eq!(dropped, [Dropped::Expired, Dropped::DeliveryCountExceeded]);
        assert_eq!(q.purge(), 0);
    }
}
