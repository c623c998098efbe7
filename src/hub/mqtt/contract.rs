//! The contract between an MQTT connection's event loop (`connection.rs`) and what runs on it
//! (`hub_session.rs`, `dps_session.rs`): the write buffer they share, what a session answers
//! after each event, and the session trait. A leaf: it imports neither side, so both import it.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;

use crate::hub::session::{CloseReason, Outbound};

/// The parts of a connection every kind of session uses: one output buffer, flushed by the event
/// loop once per wake-up, and the packet ids of the hub's own QoS 1 publishes.
#[derive(Default)]
pub struct Wire {
    pub out: BytesMut,
    next_pkid: u16,
}

impl Wire {
    pub fn new() -> Wire {
        Wire::default()
    }

    pub fn write(&mut self, p: Packet) {
        // Packets the hub builds are well-formed and below any limit that could fail here.
        let _ = p.write(&mut self.out, usize::MAX);
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

    #[test]
    fn packet_ids_skip_zero_when_they_wrap() {
        let mut w = Wire::new();
        assert_eq!(w.pkid(), 1);
        w.next_pkid = u16::MAX;
        assert_eq!(w.pkid(), 1);
    }
}
