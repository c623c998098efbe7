//! The MQTT link: IoT Hub's device topics over the lean client in `client::mqtt`, on TLS or
//! WebSockets. Opening subscribes to what the identity can receive (methods, twin answers,
//! desired patches; C2D for devices; inputs for Edge modules the hub routes to); keep-alive and the dead-connection check live in `next`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Subscribe, SubscribeFilter, SubscribeReasonCode};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Closed, Link};
use crate::client::mqtt::MqttConn;
use crate::device::core::{Caps, Inbound, Sink};
use crate::iot::property_bag::PropertyBag;
use crate::iot::topic::{self, CloudPublish, Filter};

/// The request id of the twin GET (reported patches use `r{n}`).
const TWIN_GET_RID: &str = "get";

pub struct MqttLink {
    conn: MqttConn,
    device_id: Arc<str>,
    module_id: Option<Arc<str>>,
    keep_alive: Duration,
    next_ping: Instant,
    /// Last time anything arrived: a silent hub is a dead connection.
    last_heard: Instant,
}

impl MqttLink {
    /// Takes a connected client and queues the identity's subscriptions (sent with the first
    /// flush, before anything else the core queues). `inputs`: a module whose inputs the hub
    /// routes to (IoT Edge) also subscribes to `devices/{d}/modules/{m}/inputs/#`.
    pub fn open(
        mut conn: MqttConn,
        device_id: Arc<str>,
        module_id: Option<Arc<str>>,
        keep_alive_secs: u16,
        inputs: bool,
    ) -> MqttLink {
        let mut filters = vec![Filter::Methods, Filter::TwinResponses, Filter::TwinDesired];
        if module_id.is_none() {
            filters.push(Filter::C2d);
        } else if inputs {
            filters.push(Filter::ModuleInputs);
        }
        let module = module_id.as_deref();
        let mut sub = Subscribe::new_many(
            filters.iter().map(|f| SubscribeFilter::new(f.text(&device_id, module), QoS::AtLeastOnce)),
        );
        sub.pkid = conn.pkid();
        conn.queue(Packet::Subscribe(sub));
        let keep_alive = Duration::from_secs(keep_alive_secs.max(1) as u64);
        let now = Instant::now();
        MqttLink { conn, device_id, module_id, keep_alive, next_ping: now + keep_alive, last_heard: now }
    }

    /// Silence this long means the connection is dead: the hub answers every PINGREQ.
    fn silence_limit(&self) -> Instant {
        self.last_heard + self.keep_alive * 3 / 2
    }

    /// What a packet means to the core; acknowledges QoS 1 publishes on the way.
    fn translate(&mut self, p: Packet) -> Option<Inbound> {
        match p {
            Packet::PubAck(a) => Some(Inbound::Acked(a.pkid)),
            Packet::SubAck(a) => {
                if a.return_codes.contains(&SubscribeReasonCode::Failure) {
                    tracing::warn!(device = %self.device_id, "the hub refused a subscription");
                }
                None
            }
            Packet::Publish(p) => {
                if p.qos == QoS::AtLeastOnce {
                    self.conn.queue(Packet::PubAck(PubAck::new(p.pkid)));
                }
                match CloudPublish::parse(&p.topic).ok()? {
                    CloudPublish::TwinResponse { status, rid, .. } if rid == TWIN_GET_RID => {
                        Some(Inbound::Twin { status, body: p.payload })
                    }
                    CloudPublish::TwinResponse { status, rid, .. } => Some(Inbound::Reported { rid, status }),
                    CloudPublish::DesiredPatch { version } => Some(Inbound::Desired { version, body: p.payload }),
                    CloudPublish::MethodRequest { name, rid } => {
                        Some(Inbound::Method { name, rid, payload: p.payload })
                    }
                    CloudPublish::C2d { properties, .. } => Some(Inbound::C2d { properties, payload: p.payload }),
                    CloudPublish::ModuleInput { input, properties } => {
                        Some(Inbound::Input { input, properties, payload: p.payload })
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

impl Sink for MqttLink {
    fn telemetry(&mut self, properties: &PropertyBag, body: Bytes) -> u16 {
        let topic = topic::telemetry(&self.device_id, self.module_id.as_deref(), properties);
        self.conn.publish(topic, body, QoS::AtLeastOnce)
    }

    fn twin_get(&mut self) {
        self.conn.publish(topic::twin_get(TWIN_GET_RID), " ", QoS::AtLeastOnce);
    }

    fn report(&mut self, rid: &str, patch: String) {
        self.conn.publish(topic::twin_patch_reported(rid), patch, QoS::AtLeastOnce);
    }

    fn method_response(&mut self, rid: &str, status: u16, payload: Bytes) {
        self.conn.publish(topic::method_response(status, rid), payload, QoS::AtLeastOnce);
    }
}

impl Link for MqttLink {
    fn caps(&self) -> Caps {
        Caps { twin: true }
    }

    async fn flush(&mut self) -> Result<(), Closed> {
        self.conn.flush().await.map_err(|_| Closed::Lost("connection_lost"))
    }

    async fn next(&mut self, deadline: Instant, cancel: &CancellationToken) -> Result<Option<Inbound>, Closed> {
        loop {
            if let Some(ev) = self.try_next()? {
                return Ok(Some(ev));
            }
            let now = Instant::now();
            if now >= self.silence_limit() {
                return Err(Closed::Lost("keepalive_timeout"));
            }
            if now >= self.next_ping {
                self.conn.queue(Packet::PingReq);
                self.next_ping = now + self.keep_alive;
            }
            // Acknowledgements of what `try_next` read, and the ping, go out before waiting.
            self.flush().await?;
            if now >= deadline {
                return Ok(None);
            }
            let wake = deadline.min(self.next_ping).min(self.silence_limit());
            tokio::select! {
                r = self.conn.fill() => match r {
                    Ok(0) | Err(_) => return Err(Closed::Lost("connection_lost")),
                    Ok(_) => self.last_heard = Instant::now(),
                },
                _ = tokio::time::sleep_until(wake) => {}
                _ = cancel.cancelled() => return Ok(None),
            }
        }
    }

    fn try_next(&mut self) -> Result<Option<Inbound>, Closed> {
        loop {
            match self.conn.next_packet() {
                Ok(Some(p)) => {
                    if let Some(ev) = self.translate(p) {
                        return Ok(Some(ev));
                    }
                }
                Ok(None) => return Ok(None),
                Err(_) => return Err(Closed::Lost("protocol_error")),
            }
        }
    }

    async fn close(self) {
        self.conn.disconnect().await;
    }
}
