//! The link between a live MQTT connection and the rest of the hub. Producers (REST handlers,
//! C2D, method calls) never touch a socket: they find the identity's `Session`, check what it
//! subscribed to, and queue an `Outbound` for the connection task to write.

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::sync::mpsc;

use crate::iot::topic::Filter;

/// Why the hub ends a connection; also the `reason` label of the disconnect metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    ClientDisconnect,
    ConnectionLost,
    KeepAliveTimeout,
    TokenExpired,
    /// Another connection authenticated as the same identity (hub error 400027).
    Replaced,
    /// The identity was deleted or disabled.
    IdentityRemoved,
    ProtocolViolation,
    /// The connection could not keep up with what the hub had to send it.
    SlowConsumer,
    /// The fault injector dropped it.
    FaultInjected,
    Shutdown,
    /// The store failed before a message the device sent could be made durable: it is not
    /// acknowledged, and the device sends it again once it reconnects.
    NotDurable,
    /// The connection's task ended without closing it (a bug): the session is removed anyway.
    Aborted,
}

impl CloseReason {
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientDisconnect => "client_disconnect",
            CloseReason::ConnectionLost => "connection_lost",
            CloseReason::KeepAliveTimeout => "keepalive_timeout",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Replaced => "replaced",
            CloseReason::IdentityRemoved => "identity_removed",
            CloseReason::ProtocolViolation => "protocol_violation",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::FaultInjected => "fault_injected",
            CloseReason::Shutdown => "shutdown",
            CloseReason::NotDurable => "not_durable",
            CloseReason::Aborted => "aborted",
        }
    }

    pub const ALL: [CloseReason; 11] = [
        CloseReason::ClientDisconnect,
        CloseReason::ConnectionLost,
        CloseReason::KeepAliveTimeout,
        CloseReason::TokenExpired,
        CloseReason::Replaced,
        CloseReason::IdentityRemoved,
        CloseReason::ProtocolViolation,
        CloseReason::SlowConsumer,
        CloseReason::FaultInjected,
        CloseReason::Shutdown,
        CloseReason::NotDurable,
    ];
}

/// Something for a connection task to do on behalf of another part of the hub.
#[derive(Debug)]
pub enum Outbound {
    /// Publish with QoS already capped by the granted subscription QoS.
    Publish {
        topic: String,
        payload: Bytes,
        qos: QoS,
        c2d_id: Option<u64>,
    },
    /// A telemetry acknowledgement the fault injector held back; written once store change
    /// `after` is committed.
    PubAck {
        pkid: u16,
        after: u64,
    },
    Close(CloseReason),
}

/// Capacity of a connection's queue. Small: the hub pushes rarely (desired patches, method
/// requests, C2D), and a device that lets this many pile up is not reading its socket.
pub const OUTBOUND_CAPACITY: usize = 32;

/// The granted QoS of each subscription an identity holds (`None`: not subscribed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Subscriptions {
    pub c2d: Option<QoS>,
    pub methods: Option<QoS>,
    pub twin_responses: Option<QoS>,
    pub twin_desired: Option<QoS>,
    pub module_inputs: Option<QoS>,
}

impl Subscriptions {
    pub fn slot(&mut self, f: Filter) -> Option<&mut Option<QoS>> {
        match f {
            Filter::C2d => Some(&mut self.c2d),
            Filter::Methods => Some(&mut self.methods),
            Filter::TwinResponses => Some(&mut self.twin_responses),
            Filter::TwinDesired => Some(&mut self.twin_desired),
            Filter::ModuleInputs => Some(&mut self.module_inputs),
            Filter::DpsResponses => None,
        }
    }

    /// The subscription an identity's queued messages travel on: a module's queue holds what IoT
    /// Edge routes deliver to its inputs (modules get no C2D), a device's holds C2D.
    pub fn queue(&self, module: bool) -> Option<QoS> {
        if module { self.module_inputs } else { self.c2d }
    }

    pub fn count(&self) -> usize {
        [self.c2d, self.methods, self.twin_responses, self.twin_desired, self.module_inputs]
            .iter()
            .filter(|s| s.is_some())
            .count()
    }
}

/// The lower of what the hub wants to send at and what the subscriber was granted.
pub fn cap_qos(wanted: QoS, granted: QoS) -> QoS {
    if (wanted as u8) <= (granted as u8) { wanted } else { granted }
}

/// The live connection of one identity.
#[derive(Debug)]
pub struct Session {
    /// Tells this connection from a later one of the same identity.
    pub conn_id: u64,
    pub tx: mpsc::Sender<Box<Outbound>>,
    pub subs: Subscriptions,
    /// CleanSession=0: subscriptions and undelivered C2D outlive the connection.
    pub persistent: bool,
}

impl Session {
    /// Queues work for the connection. A full queue means the device stopped reading; it is
    /// disconnected rather than allowed to hold hub memory.
    pub fn send(&self, out: Outbound) -> bool {
        match self.tx.try_send(Box::new(out)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(Box::new(Outbound::Close(CloseReason::SlowConsumer))).await;
                });
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Publishes to a subscription if the session holds it, at the capped QoS.
    pub fn publish_to(&self, granted: Option<QoS>, topic: String, payload: Bytes, wanted: QoS) -> bool {
        match granted {
            Some(g) => self.send(Outbound::Publish { topic, payload, qos: cap_qos(wanted, g), c2d_id: None }),
            None => false,
        }
    }
}
