//! A device talking to DPS over MQTT (protocol.md §3.4): register, then poll the operation until
//! it is assigned. Only `$dps/registrations/res/#` may be subscribed.

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use serde_json::json;
use tokio::sync::mpsc;

use super::contract::{PacketSession, Step, Wire};
use crate::hub::config::BadSubscription;
use crate::hub::dps::{Attestation, DpsError, Progress};
use crate::hub::metrics::Refusal;
use crate::hub::session::{CloseReason, Outbound, cap_qos};
use crate::hub::state::Hub;
use crate::iot::dps::RegistrationRequest;
use crate::iot::time::{iso8601, unix_secs};
use crate::iot::topic::{self, DevicePublish, Filter};
use crate::iot::username::DpsUsername;

pub struct DpsSession {
    hub: Hub,
    att: Attestation,
    /// Granted QoS of `$dps/registrations/res/#`; replies are dropped without it.
    responses: Option<QoS>,
    /// The connection's queue, for replies sent once the store has committed what they report.
    tx: mpsc::Sender<Box<Outbound>>,
}

/// The DPS error body (`errorCode` = status x 1000 + sub-code).
pub fn error_body(code: u32, message: &str) -> serde_json::Value {
    json!({
        "errorCode": code,
        "trackingId": uuid::Uuid::new_v4().to_string(),
        "message": message,
        "timestampUtc": iso8601(crate::hub::clock::wall()),
    })
}

impl DpsSession {
    pub fn connect(
        hub: &Hub,
        u: &DpsUsername,
        connect: &Connect,
        password: &str,
        tx: mpsc::Sender<Box<Outbound>>,
        wire: &mut Wire,
    ) -> Result<(DpsSession, u64), Refusal> {
        if connect.client_id != u.registration_id {
            return Err(Refusal::ClientIdMismatch);
        }
        let now = unix_secs(crate::hub::clock::wall());
        let att = hub.dps.authenticate(&u.id_scope, &u.registration_id, password, now).map_err(|e| {
            hub.metrics.dps_registration("unauthorized");
            e.refusal()
        })?;
        let expiry = crate::iot::sas::SasToken::parse(password).map(|t| t.expiry).unwrap_or(now);
        wire.write(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)));
        hub.metrics.accepted_dps.inc();
        hub.metrics.connections_dps.inc();
        Ok((DpsSession { hub: hub.clone(), att, responses: None, tx }, expiry))
    }

    fn reply(&self, wire: &mut Wire, status: u16, rid: &str, retry_after: Option<u64>, body: serde_json::Value) {
        let Some(granted) = self.responses else { return };
        let qos = cap_qos(QoS::AtLeastOnce, granted);
        let mut p =
            Publish::from_bytes(topic::dps_response(status, rid, retry_after), qos, Bytes::from(body.to_string()));
        if qos == QoS::AtLeastOnce {
            p.pkid = wire.pkid();
        }
        wire.write(Packet::Publish(p));
    }

    /// The assignment's 200, once the device and the registration are durable (a store that
    /// failed answers 500): through the connection's queue, so its loop never waits for the disk.
    fn reply_when_durable(&self, rid: &str, body: serde_json::Value) {
        let Some(granted) = self.responses else { return };
        let (ticket, tx, rid) = (self.hub.store.ticket(), self.tx.clone(), rid.to_owned());
        tokio::spawn(async move {
            let (status, body) = match ticket.durable().await {
                Ok(()) => (200, body),
                Err(_) => (500, error_body(500001, "the assignment could not be stored")),
            };
            let topic = topic::dps_response(status, &rid, None);
            let qos = cap_qos(QoS::AtLeastOnce, granted);
            let payload = Bytes::from(body.to_string());
            let _ = tx.send(Box::new(Outbound::Publish { topic, payload, qos, c2d_id: None })).await;
        });
    }

    fn on_publish(&mut self, p: Publish, wire: &mut Wire) -> Step {
        if p.qos == QoS::ExactlyOnce {
            return Step::Close(CloseReason::ProtocolViolation);
        }
        let parsed = match DevicePublish::parse(&p.topic) {
            Ok(x @ (DevicePublish::DpsRegister { .. } | DevicePublish::DpsPollStatus { .. })) => x,
            _ => return Step::Close(CloseReason::ProtocolViolation),
        };
        if p.qos == QoS::AtLeastOnce {
            wire.write(Packet::PubAck(PubAck::new(p.pkid)));
        }
        let retry = self.hub.behaviour.dps_retry_after_secs;
        if let Some(wait) = self.hub.faults.dps_throttle() {
            let (DevicePublish::DpsRegister { rid } | DevicePublish::DpsPollStatus { rid, .. }) = &parsed else {
                unreachable!("filtered above")
            };
            self.hub.metrics.faults_injected.with_label_values(&["dps_throttle"]).inc();
            self.reply(wire, 429, rid, Some(wait), error_body(429001, "throttled (injected fault)"));
            return Step::Continue;
        }
        match parsed {
            DevicePublish::DpsRegister { rid } => {
                let req = if p.payload.iter().all(u8::is_ascii_whitespace) {
                    Ok(RegistrationRequest::default())
                } else {
                    serde_json::from_slice::<RegistrationRequest>(&p.payload)
                };
                let Ok(req) = req else {
                    self.hub.metrics.dps_registration("bad_request");
                    self.reply(
                        wire,
                        400,
                        &rid,
                        None,
                        error_body(400004, "the register body is not a registration request"),
                    );
                    return Step::Continue;
                };
                match self.hub.dps.register(&self.att, &req, crate::hub::clock::now(), crate::hub::clock::wall()) {
                    Ok(op) => {
                        self.hub.store_registration(&self.att);
                        self.reply(wire, 202, &rid, Some(retry), serde_json::to_value(op).expect("serializable"))
                    }
                    Err(e) => {
                        self.hub.metrics.dps_registration("bad_request");
                        self.reply(wire, 400, &rid, None, error_body(400004, &e.to_string()));
                    }
                }
            }
            DevicePublish::DpsPollStatus { rid, operation_id } => {
                match self.hub.dps.poll(
                    &self.att,
                    &operation_id,
                    &self.hub.registry,
                    crate::hub::clock::now(),
                    crate::hub::clock::wall(),
                ) {
                    Ok(Progress::Assigning { status, retry_after }) => self.reply(
                        wire,
                        202,
                        &rid,
                        Some(retry_after),
                        serde_json::to_value(status).expect("serializable"),
                    ),
                    Ok(Progress::Done(status)) => {
                        self.hub.metrics.dps_registration("assigned");
                        self.hub.refresh_identity_gauges();
                        self.hub.store_registration(&self.att);
                        let body = serde_json::to_value(status).expect("serializable");
                        if self.hub.store.is_durable() {
                            self.reply_when_durable(&rid, body);
                        } else {
                            self.reply(wire, 200, &rid, None, body);
                        }
                    }
                    Err(DpsError::UnknownOperation) => {
                        self.reply(wire, 404, &rid, None, error_body(404002, "unknown operation"))
                    }
                    Err(e) => {
                        self.hub.metrics.dps_registration("failed");
                        self.reply(wire, 500, &rid, None, error_body(500001, &e.to_string()));
                    }
                }
            }
            _ => unreachable!("filtered above"),
        }
        Step::Continue
    }
}

impl PacketSession for DpsSession {
    fn on_packet(&mut self, p: Packet, wire: &mut Wire) -> Step {
        match p {
            Packet::Publish(p) => self.on_publish(p, wire),
            Packet::Subscribe(s) => {
                let mut codes = Vec::new();
                for f in &s.filters {
                    if Filter::parse(&f.path, &self.att.registration_id, None) == Ok(Filter::DpsResponses) {
                        let q = cap_qos(f.qos, QoS::AtLeastOnce);
                        self.responses = Some(q);
                        codes.push(SubscribeReasonCode::Success(q));
                    } else if self.hub.behaviour.bad_subscription == BadSubscription::Close {
                        return Step::Close(CloseReason::ProtocolViolation);
                    } else {
                        codes.push(SubscribeReasonCode::Failure);
                    }
                }
                wire.write(Packet::SubAck(SubAck::new(s.pkid, codes)));
                Step::Continue
            }
            Packet::Unsubscribe(u) => {
                self.responses = None;
                wire.write(Packet::UnsubAck(UnsubAck::new(u.pkid)));
                Step::Continue
            }
            Packet::PubAck(_) => Step::Continue,
            Packet::PingReq => {
                wire.write(Packet::PingResp);
                Step::Continue
            }
            Packet::Disconnect => Step::Close(CloseReason::ClientDisconnect),
            _ => Step::Close(CloseReason::ProtocolViolation),
        }
    }

    fn on_outbound(&mut self, o: Outbound, wire: &mut Wire) -> Step {
        match o {
            Outbound::Close(r) => Step::Close(r),
            Outbound::Publish { topic, payload, qos, .. } => {
                let mut p = Publish::from_bytes(topic, qos, payload);
                if qos == QoS::AtLeastOnce {
                    p.pkid = wire.pkid();
                }
                wire.write(Packet::Publish(p));
                Step::Continue
            }
            Outbound::PubAck { pkid, after } => {
                wire.puback_after(after, pkid);
                Step::Continue
            }
        }
    }

    fn on_close(&mut self, _reason: CloseReason, _wire: &mut Wire) {
        self.hub.metrics.connections_dps.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rumqttc::mqttbytes::v4::SubscribeReasonCode;

    use super::*;
    use crate::hub::testing::{bench, connect, publish, publishes, subscribe, token, written};
    use crate::iot::sas::{Key, derive_device_key};
    use crate::iot::username::{Username, dps_username};

    fn open(hub: &Hub, reg: &str, password: &str) -> Result<(DpsSession, Wire), Refusal> {
        let user = match Username::parse(&dps_username(&hub.dps.id_scope, reg)).unwrap() {
            Username::Dps(u) => u,
            Username::Hub(_) => unreachable!(),
        };
        let mut wire = Wire::new();
        let c = connect(reg, "u", password, true);
        DpsSession::connect(hub, &user, &c, password, tokio::sync::mpsc::channel(1).0, &mut wire)
            .map(|(s, _)| (s, wire))
    }

    fn group_token(hub: &Hub, reg: &str) -> String {
        let group = Key::from_base64(&hub.secrets.default_group.primary).unwrap();
        token(&format!("{}/registrations/{reg}", hub.dps.id_scope), &derive_device_key(&group, reg), 3600)
    }

    #[tokio::test(start_paused = true)]
    async fn register_then_poll_until_the_assignment_delay_has_passed() {
        let b = bench(|c| c.behaviour.dps_assignment_delay_ms = 5_000);
        let (mut s, mut wire) = open(&b.hub, "sensor-1", &group_token(&b.hub, "sensor-1")).expect("accepted");
        written(&mut wire);
        // Only the DPS response filter may be subscribed.
        assert_eq!(s.on_packet(subscribe(1, &["$dps/registrations/res/#"]), &mut wire), Step::Continue);
        let [Packet::SubAck(ack)] = &written(&mut wire)[..] else { panic!("one SUBACK") };
        assert_eq!(ack.return_codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);

        let register = publish("$dps/registrations/PUT/iotdps-register/?$rid=1", b"{}", QoS::AtLeastOnce, 4);
        s.on_packet(register, &mut wire);
        let out = written(&mut wire);
        assert!(matches!(out[0], Packet::PubAck(PubAck { pkid: 4 })));
        let (topic, body) = publishes(&out).remove(0);
        assert_eq!(topic, "$dps/registrations/res/202/?$rid=1&retry-after=1");
        let op: serde_json::Value = serde_json::from_str(&body).unwrap();
        let op_id = op["operationId"].as_str().unwrap().to_owned();
        let poll_topic = format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId={op_id}");
        let poll = |s: &mut DpsSession, wire: &mut Wire| {
            let mut p = Publish::new(poll_topic.clone(), QoS::AtMostOnce, "");
            p.pkid = 0;
            s.on_packet(Packet::Publish(p), wire);
            publishes(&written(wire)).remove(0)
        };
        let (topic, body) = poll(&mut s, &mut wire);
        assert!(topic.starts_with("$dps/registrations/res/202/?$rid=2"), "{topic}");
        assert!(body.contains("assigning"));
        assert!(b.hub.registry.get("sensor-1", None).is_none());

        tokio::time::advance(Duration::from_secs(5)).await;
        let (topic, body) = poll(&mut s, &mut wire);
        assert_eq!(topic, "$dps/registrations/res/200/?$rid=2");
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status["status"], "assigned");
        assert_eq!(status["registrationState"]["deviceId"], "sensor-1");
        assert!(b.hub.registry.get("sensor-1", None).is_some(), "assigned into the registry");

        let unknown = publish(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=3&operationId=nope",
            b"",
            QoS::AtMostOnce,
            0,
        );
        s.on_packet(unknown, &mut wire);
        assert!(publishes(&written(&mut wire))[0].0.starts_with("$dps/registrations/res/404/"));
        // Hub topics and hub filters are not DPS's: the connection closes.
        let telemetry = publish("devices/sensor-1/messages/events/", b"{}", QoS::AtMostOnce, 0);
        assert_eq!(s.on_packet(telemetry, &mut wire), Step::Close(CloseReason::ProtocolViolation));
        assert_eq!(
            s.on_packet(subscribe(5, &["$iothub/twin/res/#"]), &mut wire),
            Step::Close(CloseReason::ProtocolViolation)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_and_injected_throttling() {
        let b = bench(|_| {});
        assert!(open(&b.hub, "sensor-2", &group_token(&b.hub, "other")).is_err(), "a key derived for another id");
        let expired = {
            let t = group_token(&b.hub, "sensor-2");
            tokio::time::advance(Duration::from_secs(3601)).await;
            t
        };
        assert!(open(&b.hub, "sensor-2", &expired).is_err(), "expired on the hub's clock");
        let (mut s, mut wire) = open(&b.hub, "sensor-2", &group_token(&b.hub, "sensor-2")).expect("accepted");
        s.on_packet(subscribe(1, &["$dps/registrations/res/#"]), &mut wire);
        written(&mut wire);
        b.hub.set_faults(crate::hub::faults::FaultConfig {
            dps_throttle_rate: 1.0,
            dps_retry_after_secs: 7,
            ..Default::default()
        });
        s.on_packet(publish("$dps/registrations/PUT/iotdps-register/?$rid=9", b"{}", QoS::AtMostOnce, 0), &mut wire);
        let (topic, body) = publishes(&written(&mut wire)).remove(0);
        assert_eq!(topic, "$dps/registrations/res/429/?$rid=9&retry-after=7");
        assert!(body.contains("429001"));
    }
}
