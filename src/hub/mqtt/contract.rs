//! The contract between an MQTT connection's event loop (`connection.rs`) and what runs on it
//! (`hub_session.rs`, `dps_session.rs`): the write buffer they share, what a session answers
//! after each event, and the session trait. A leaf: it imports neither side, so both import it.

use std::collections::VecDeque;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Packet, PubAck};

use crate::hub::session::{CloseReason, Outbound};
use crate::hub::store::Committed;
use tokio::sync::watch;

/// The parts of a connection every kind of session uses: one output buffer, flushed by the event
/// loop once per wake-up, the packet ids of the hub's own QoS 1 publishes, and the answers held
/// until the store commits what they acknowledge.
#[derive(Default)]
pub struct Wire {
    pub out: BytesMut,
    next_pkid: u16,
    /// Answers waiting for a store commit, in the order they were given: a PUBACK that needs no
    /// commit still waits behind them, since MQTT 3.1.1 §4.6 has PUBACKs sent in the order their
    /// PUBLISHes arrived.
    held: VecDeque<Held>,
    /// The highest change number known committed.
    committed: u64,
    /// Where the store publishes how far it has committed (none without a store).
    store: Option<watch::Receiver<Committed>>,
}

/// Answers written once change `after` is committed: `ok`, or `failed` if the store failed
/// first (`None`: the connection is closed instead, so the client sends again).
struct Held {
    after: u64,
    ok: Vec<Packet>,
    failed: Option<Vec<Packet>>,
}

/// The store failed before a held answer could be written, and that answer has no failure form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotDurable;

impl Wire {
    pub fn new() -> Wire {
        Wire::default()
    }

    /// A wire whose held answers follow the store's progress `committed`.
    pub fn with_store(committed: Option<watch::Receiver<Committed>>) -> Wire {
        Wire { store: committed, ..Wire::default() }
    }

    /// Whether change `after` is known committed, asking the store when the cached figure is
    /// behind (a read of the store's latest progress, no wait).
    fn settled(&mut self, after: u64) -> bool {
        if after > self.committed
            && let Some(rx) = &self.store
        {
            self.committed = self.committed.max(rx.borrow().seq);
        }
        after <= self.committed
    }

    pub fn write(&mut self, p: Packet) {
        // Packets the hub builds are well-formed and below any limit that could fail here.
        let _ = p.write(&mut self.out, usize::MAX);
    }

    /// A PUBACK for `pkid`, written once store change `after` is committed (0: nothing to wait
    /// for) and every answer held before it is written. If the store fails first, the connection
    /// is closed without it.
    pub fn puback_after(&mut self, after: u64, pkid: u16) {
        let ack = Packet::PubAck(PubAck::new(pkid));
        if self.held.is_empty() && self.settled(after) {
            self.write(ack);
        } else {
            self.held.push_back(Held { after, ok: vec![ack], failed: None });
        }
    }

    /// `ok` once store change `after` is committed, in order with every other held answer;
    /// `failed` if the store fails first.
    pub fn answer_after(&mut self, after: u64, ok: Vec<Packet>, failed: Vec<Packet>) {
        if self.held.is_empty() && self.settled(after) {
            ok.into_iter().for_each(|p| self.write(p));
        } else {
            self.held.push_back(Held { after, ok, failed: Some(failed) });
        }
    }

    /// The change number the first held answer waits for, if any.
    pub fn waiting_for(&self) -> Option<u64> {
        self.held.front().map(|h| h.after)
    }

    /// Writes the held answers the store's progress `c` allows, in order. `Err` when the store
    /// failed and an answer has no failure form: the connection must close.
    pub fn release(&mut self, c: Committed) -> Result<(), NotDurable> {
        self.committed = self.committed.max(c.seq);
        while let Some(h) = self.held.front() {
            if h.after > self.committed && !c.failed {
                break;
            }
            let Some(h) = self.held.pop_front() else { break };
            let packets = if h.after <= self.committed { h.ok } else { h.failed.ok_or(NotDurable)? };
            packets.into_iter().for_each(|p| self.write(p));
        }
        Ok(())
    }

    /// The next packet id for a QoS 1 publish from the hub (never 0, MQTT 3.1.1 §2.3.1).
    pub fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        self.next_pkid
    }
}

/// What a session asks of the event loop after handling an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Continue,
    Close(CloseReason),
}

/// The behaviour of an authenticated MQTT connection, driven by its event loop: packets from the
/// peer, work other parts of the hub queued for it, and the close (exactly once, whatever ended
/// the connection).
pub trait PacketSession {
    fn on_packet(&mut self, p: Packet, wire: &mut Wire) -> Step;
    fn on_outbound(&mut self, o: Outbound, wire: &mut Wire) -> Step;
    fn on_close(&mut self, reason: CloseReason, wire: &mut Wire);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(w: &mut Wire) -> Vec<Packet> {
        let mut out = Vec::new();
        while let Ok(p) = Packet::read(&mut w.out, usize::MAX) {
            out.push(p);
        }
        out
    }

    fn acks(packets: &[Packet]) -> Vec<u16> {
        packets.iter().filter_map(|p| if let Packet::PubAck(a) = p { Some(a.pkid) } else { None }).collect()
    }

    #[test]
    fn pubacks_leave_in_the_order_their_publishes_came_whatever_each_waits_for() {
        let mut w = Wire::new();
        w.puback_after(0, 1);
        assert_eq!(acks(&written(&mut w)), [1], "nothing to wait for: at once");
        w.puback_after(5, 2);
        w.puback_after(0, 3);
        w.answer_after(6, vec![Packet::PubAck(PubAck::new(4))], vec![]);
        assert!(written(&mut w).is_empty(), "3 needs no commit but waits behind 2");
        assert_eq!(w.waiting_for(), Some(5));
        w.release(Committed { seq: 5, failed: false }).unwrap();
        assert_eq!(acks(&written(&mut w)), [2, 3]);
        w.release(Committed { seq: 6, failed: false }).unwrap();
        assert_eq!(acks(&written(&mut w)), [4]);
        assert_eq!(w.waiting_for(), None);
        w.puback_after(6, 5);
        assert_eq!(acks(&written(&mut w)), [5], "already committed: at once");
    }

    #[test]
    fn a_failed_store_writes_the_failure_forms_or_closes() {
        let mut w = Wire::new();
        w.puback_after(3, 1);
        w.answer_after(4, vec![Packet::PubAck(PubAck::new(2))], vec![Packet::PubAck(PubAck::new(9))]);
        w.release(Committed { seq: 3, failed: true }).unwrap();
        assert_eq!(acks(&written(&mut w)), [1, 9], "1 was committed; 2 gets its failure form");
        w.puback_after(7, 3);
        assert_eq!(w.release(Committed { seq: 3, failed: true }), Err(NotDurable), "a PUBACK has none");
    }

    #[test]
    fn packet_ids_skip_zero_when_they_wrap() {
        let mut w = Wire::new();
        assert_eq!(w.pkid(), 1);
        w.next_pkid = u16::MAX;
        assert_eq!(w.pkid(), 1);
    }
}
