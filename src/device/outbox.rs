//! One identity's telemetry between "generated" and "acknowledged". Every message gets a sequence
//! number and ends in exactly one place: acknowledged by the hub, still here, or dropped with a
//! counted reason. Written-but-unacknowledged messages survive a lost connection and are written
//! again after the reconnect (QoS 1 is at-least-once; the hub counts the duplicates). The buffer
//! is bounded: when it is full, `drop_oldest` discards the oldest message never written (so a
//! dropped message is one the hub cannot have), and `pause` generates nothing new until there is
//! room.

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::time::Instant;

use crate::iot::property_bag::PropertyBag;

/// What a full buffer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflinePolicy {
    /// Keep generating while disconnected; when full, drop the oldest unwritten message.
    DropOldest,
    /// Generate only while there is room, and not at all while disconnected.
    Pause,
}

#[derive(Debug)]
pub struct Message {
    pub seq: u64,
    pub properties: PropertyBag,
    pub body: Bytes,
    /// Written to some connection at least once (the hub may hold it).
    pub written: bool,
}

/// What `push` did with a new message.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Queued, and an older unwritten message was dropped to make room.
    DroppedOldest,
    /// Not generated: the buffer is full and the policy is `pause`.
    Paused,
}

/// Queue capacity an idle identity keeps.
const SMALL: usize = 4;

#[derive(Debug)]
pub struct Outbox {
    policy: OfflinePolicy,
    capacity: usize,
    next_seq: u64,
    /// Not written on the current connection, oldest first.
    pending: VecDeque<Message>,
    /// Written on the current connection, awaiting PUBACK: packet id, when written.
    inflight: VecDeque<(u16, Instant, Message)>,
}

impl Outbox {
    pub fn new(policy: OfflinePolicy, capacity: usize) -> Outbox {
        Outbox { policy, capacity: capacity.max(1), next_seq: 1, pending: VecDeque::new(), inflight: VecDeque::new() }
    }

    pub fn policy(&self) -> OfflinePolicy {
        self.policy
    }

    pub fn len(&self) -> usize {
        self.pending.len() + self.inflight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Numbers a new message; `stamp` adds the number to its properties.
    pub fn push(
        &mut self,
        mut properties: PropertyBag,
        body: Bytes,
        stamp: impl FnOnce(&mut PropertyBag, u64),
    ) -> Pushed {
        let mut outcome = Pushed::Queued;
        if self.len() >= self.capacity {
            match self.policy {
                OfflinePolicy::Pause => return Pushed::Paused,
                OfflinePolicy::DropOldest => match self.pending.iter().position(|m| !m.written) {
                    Some(i) => {
                        self.pending.remove(i);
                        outcome = Pushed::DroppedOldest;
                    }
                    // Everything held was written and may be at the hub: keep it, skip the new one.
                    None => return Pushed::Paused,
                },
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        stamp(&mut properties, seq);
        self.pending.push_back(Message { seq, properties, body, written: false });
        outcome
    }

    /// The next message to write, if the in-flight window has room.
    pub fn next_to_write(&mut self, window: usize) -> Option<Message> {
        if self.inflight.len() >= window { None } else { self.pending.pop_front() }
    }

    pub fn written(&mut self, pkid: u16, mut m: Message, at: Instant) {
        m.written = true;
        self.inflight.push_back((pkid, at, m));
    }

    /// A PUBACK: when its message was written, if it was ours.
    pub fn acked(&mut self, pkid: u16) -> Option<Instant> {
        let i = self.inflight.iter().position(|(id, _, _)| *id == pkid)?;
        let at = self.inflight.remove(i).map(|(_, at, _)| at);
        // A backlog (after a storm, say) leaves large queues behind; an idle device should not
        // keep them. Small ones stay, so the steady one-message cycle does not reallocate.
        if self.is_empty() && self.pending.capacity() + self.inflight.capacity() > 2 * SMALL {
            self.pending.shrink_to(SMALL);
            self.inflight.shrink_to(SMALL);
        }
        at
    }

    /// The connection is gone: what was in flight goes back to the front, in order, to be written
    /// again on the next one. Returns how many.
    pub fn connection_lost(&mut self) -> usize {
        let n = self.inflight.len();
        while let Some((_, _, m)) = self.inflight.pop_back() {
            self.pending.push_front(m);
        }
        n
    }

    /// Empties the buffer at shutdown: (never written, written but unacknowledged).
    pub fn abandon(&mut self) -> (u64, u64) {
        self.connection_lost();
        let written = self.pending.iter().filter(|m| m.written).count() as u64;
        let total = self.pending.len() as u64;
        self.pending.clear();
        (total - written, written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(o: &mut Outbox) -> Pushed {
        o.push(PropertyBag::default(), Bytes::new(), |bag, seq| bag.push("seq", seq.to_string()))
    }

    #[test]
    fn numbers_messages_and_resends_what_was_in_flight() {
        let mut o = Outbox::new(OfflinePolicy::DropOldest, 8);
        for _ in 0..3 {
            assert_eq!(push(&mut o), Pushed::Queued);
        }
        let now = Instant::now();
        let a = o.next_to_write(2).unwrap();
        assert_eq!((a.seq, a.properties.get("seq")), (1, Some("1")));
        o.written(10, a, now);
        let b = o.next_to_write(2).unwrap();
        o.written(11, b, now);
        assert!(o.next_to_write(2).is_none(), "the window is full");
        assert!(o.acked(10).is_some() && o.acked(10).is_none());
        assert_eq!(o.connection_lost(), 1);
        let again = o.next_to_write(2).unwrap();
        assert_eq!((again.seq, again.written), (2, true));
        assert_eq!(o.next_to_write(2).unwrap().seq, 3);
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_unwritten_message() {
        let mut o = Outbox::new(OfflinePolicy::DropOldest, 3);
        for _ in 0..3 {
            push(&mut o);
        }
        let first = o.next_to_write(4).unwrap();
        o.written(1, first, Instant::now());
        o.connection_lost();
        assert_eq!(push(&mut o), Pushed::DroppedOldest);
        let seqs: Vec<u64> = std::iter::from_fn(|| o.next_to_write(9).map(|m| m.seq)).collect();
        assert_eq!(seqs, [1, 3, 4], "message 1 was written and kept; 2 was dropped");
    }

    #[test]
    fn pause_generates_nothing_when_full_and_numbers_stay_contiguous() {
        let mut o = Outbox::new(OfflinePolicy::Pause, 2);
        push(&mut o);
        push(&mut o);
        assert_eq!(push(&mut o), Pushed::Paused);
        o.next_to_write(1);
        assert_eq!(push(&mut o), Pushed::Queued);
        assert_eq!(o.pending.back().unwrap().seq, 3);
    }

    #[test]
    fn a_drained_backlog_gives_its_memory_back() {
        let mut o = Outbox::new(OfflinePolicy::DropOldest, 256);
        for _ in 0..200 {
            push(&mut o);
        }
        let mut pkid = 0;
        while let Some(m) = o.next_to_write(16) {
            pkid += 1;
            o.written(pkid, m, Instant::now());
            o.acked(pkid);
        }
        assert!(o.is_empty());
        assert!(o.pending.capacity() + o.inflight.capacity() <= 2 * SMALL + 8, "{}", o.pending.capacity());
    }

    #[test]
    fn abandon_tells_unwritten_from_in_doubt() {
        let mut o = Outbox::new(OfflinePolicy::DropOldest, 8);
        for _ in 0..4 {
            push(&mut o);
        }
        let m = o.next_to_write(8).unwrap();
        o.written(1, m, Instant::now());
        assert_eq!(o.abandon(), (3, 1));
        assert!(o.is_empty());
    }
}
