//! A device or module connected to the hub: CONNECT authentication, then the IoT Hub topic router
//! (telemetry, twin GET and reported PATCH, method responses, C2D acknowledgements) and the
//! subscription rules. Anything outside the documented topics closes the connection.

use std::sync::Arc;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, Publish, SubAck, Subscribe, SubscribeReasonCode,
    UnsubAck,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::contract::{PacketSession, Step, Wire};
use crate::hub::c2d::C2dMessage;
use crate::hub::config::BadSubscription;
use crate::hub::devices;
use crate::hub::events;
use crate::hub::methods::MethodResponse;
use crate::hub::metrics::Refusal;
use crate::hub::registry::{Identity, IdentityState};
use crate::hub::session::{CloseReason, Outbound, Session, Subscriptions, cap_qos};
use crate::hub::state::Hub;
use crate::hub::x509::ClientChain;
use crate::iot::topic::{self, DevicePublish, Filter};
use crate::iot::username::HubUsername;

pub struct HubSession {
    hub: Hub,
    identity: Arc<Identity>,
    /// `device` or `device/module`, to match method responses to requests.
    key: String,
    conn_id: u64,
    /// This connection's view of its subscriptions, mirrored into the identity's `Session`.
    subs: Subscriptions,
    persistent: bool,
    /// Packet ids of C2D messages awaiting the device's PUBACK.
    c2d_inflight: Vec<(u16, u64)>,
    will: Option<LastWill>,
    model_id: Option<String>,
    /// This connection's own queue, for acknowledgements the fault injector delays.
    tx: mpsc::Sender<Box<Outbound>>,
}

impl HubSession {
    /// Authenticates a CONNECT and installs the session, replacing any older one of the identity.
    pub fn connect(
        hub: &Hub,
        u: &HubUsername,
        connect: &Connect,
        password: &str,
        chain: Option<&ClientChain>,
        tx: mpsc::Sender<Box<Outbound>>,
        wire: &mut Wire,
    ) -> Result<(HubSession, u64), Refusal> {
        if connect.client_id != u.client_id() {
            return Err(Refusal::ClientIdMismatch);
        }
        let devices::Authenticated { identity, expiry } = devices::authenticate_connect(
            hub,
            &u.host,
            &u.device_id,
            u.module_id.as_deref(),
            password,
            chain,
            crate::hub::clock::wall(),
        )?;
        let conn_id = hub.next_conn_id();
        let mut st = identity.lock();
        if st.removed {
            return Err(Refusal::UnknownIdentity);
        }
        if !st.record.enabled {
            return Err(Refusal::IdentityDisabled);
        }
        let replaced = st.session.take().map(|old| old.send(Outbound::Close(CloseReason::Replaced))).is_some();
        let session_present = !connect.clean_session && st.saved_subs.is_some();
        let subs = if connect.clean_session {
            st.saved_subs = None;
            Subscriptions::default()
        } else {
            st.saved_subs.take().unwrap_or_default()
        };
        st.session = Some(Session { conn_id, tx: tx.clone(), subs, persistent: !connect.clean_session });
        let wall = crate::hub::clock::wall();
        // A connection that takes over from a live one leaves the device connected: no event.
        if !replaced {
            hub.events.connection(&identity, true, wall);
        }
        st.record.connection_state_updated = Some(wall);
        st.record.last_activity = Some(wall);
        if let Some(m) = &u.model_id {
            st.record.model_id = Some(m.clone());
        }
        wire.write(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, session_present)));
        let queued = subs.queue(identity.module_id.is_some());
        let redeliver =
            if queued.is_some() { devices::c2d_deliverable(hub, &identity, &mut st, conn_id) } else { Vec::new() };
        drop(st);
        if u.model_id.is_some() || !redeliver.is_empty() {
            // The announced model, or delivery counts, changed; no one waits for them to be durable.
            hub.store.identity(&identity);
        }
        identity.changed.notify_waiters();
        hub.metrics.accepted_hub.inc();
        hub.metrics.connections_hub.inc();
        let mut session = HubSession {
            hub: hub.clone(),
            key: identity.key(),
            identity,
            conn_id,
            subs,
            persistent: !connect.clean_session,
            c2d_inflight: Vec::new(),
            will: connect.last_will.clone(),
            model_id: u.model_id.clone(),
            tx,
        };
        for m in redeliver {
            session.send_c2d(m, wire);
        }
        Ok((session, expiry))
    }

    fn publish(wire: &mut Wire, topic: String, payload: Bytes, qos: QoS) -> u16 {
        let mut p = Publish::from_bytes(topic, qos, payload);
        if qos != QoS::AtMostOnce {
            p.pkid = wire.pkid();
        }
        let pkid = p.pkid;
        wire.write(Packet::Publish(p));
        pkid
    }

    fn send_c2d(&mut self, m: C2dMessage, wire: &mut Wire) {
        let granted = self.subs.queue(self.identity.module_id.is_some()).unwrap_or(QoS::AtMostOnce);
        let qos = cap_qos(QoS::AtLeastOnce, granted);
        let pkid =
            Self::publish(wire, m.topic(&self.identity.device_id, self.identity.module_id.as_deref()), m.body, qos);
        self.hub.metrics.c2d("delivered");
        if qos == QoS::AtLeastOnce {
            self.c2d_inflight.push((pkid, m.id));
        } else {
            devices::c2d_acknowledged(&self.hub, &self.identity, m.id);
        }
    }

    /// A twin response, sent only if the device subscribed to `$iothub/twin/res/#`.
    fn twin_response(&self, wire: &mut Wire, status: u16, rid: &str, version: Option<u64>, body: Bytes) {
        if let Some(granted) = self.subs.twin_responses {
            Self::publish(wire, topic::twin_response(status, rid, version), body, cap_qos(QoS::AtLeastOnce, granted));
        }
    }

    fn store_telemetry(
        &self,
        st: &mut IdentityState,
        properties: &crate::iot::property_bag::PropertyBag,
        body: Bytes,
        retain: bool,
        will: bool,
    ) {
        let m = devices::D2c { properties, body, retain, will };
        devices::store_telemetry(&self.hub, &self.identity, st, self.model_id.as_deref(), m);
    }

    fn on_publish(&mut self, p: Publish, wire: &mut Wire) -> Step {
        if p.qos == QoS::ExactlyOnce {
            return Step::Close(CloseReason::ProtocolViolation);
        }
        let Ok(parsed) = DevicePublish::parse(&p.topic) else { return Step::Close(CloseReason::ProtocolViolation) };
        if let DevicePublish::Telemetry { device_id, module_id, properties } = &parsed {
            if *device_id != self.identity.device_id || *module_id != self.identity.module_id {
                return Step::Close(CloseReason::ProtocolViolation);
            }
            if devices::check_size(&self.hub, properties, p.payload.len()).is_err() {
                // MQTT 3.1.1 has no negative PUBACK; the hub drops the connection instead.
                return Step::Close(CloseReason::ProtocolViolation);
            }
        }
        // Every PUBACK goes through the wire's held answers (`Wire::puback_after`), so PUBACKs
        // leave in the order their PUBLISHes came even when some wait for the store: a message
        // is acknowledged once what it changed (the endpoint's events, the twin) is durable.
        let pkid = (p.qos == QoS::AtLeastOnce).then_some(p.pkid);
        if matches!(parsed, DevicePublish::TwinGet { .. } | DevicePublish::TwinPatchReported { .. })
            && let Some(status) = self.hub.faults.twin_error()
        {
            let (DevicePublish::TwinGet { rid } | DevicePublish::TwinPatchReported { rid }) = &parsed else {
                unreachable!("matched above")
            };
            self.hub.metrics.faults_injected.with_label_values(&["twin_error"]).inc();
            Self::puback(wire, pkid, 0);
            let body = json!({"errorCode": status as u32 * 1000 + 1, "message": "injected fault"});
            self.twin_response(wire, status, rid, None, Bytes::from(body.to_string()));
            return Step::Continue;
        }
        match parsed {
            DevicePublish::Telemetry { properties, .. } => {
                let m = devices::D2c { properties: &properties, body: p.payload, retain: p.retain, will: false };
                devices::accept_telemetry(&self.hub, &self.identity, self.model_id.as_deref(), m);
                let after = self.hub.store.mark();
                match (pkid, devices::ack_delay(&self.hub)) {
                    (Some(pkid), Some(delay)) => {
                        let tx = self.tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = tx.send(Box::new(Outbound::PubAck { pkid, after })).await;
                        });
                    }
                    (pkid, _) => Self::puback(wire, pkid, after),
                }
            }
            DevicePublish::TwinGet { rid } => {
                Self::puback(wire, pkid, 0);
                let view = self.identity.lock().twin.device_view();
                self.hub.metrics.twin_op("get", "ok");
                self.twin_response(wire, 200, &rid, None, Bytes::from(view.to_string()));
            }
            DevicePublish::TwinPatchReported { rid } => {
                let result = serde_json::from_slice::<Value>(&p.payload)
                    .map_err(|e| format!("the reported patch is not JSON: {e}"))
                    .and_then(|patch| {
                        let now = crate::hub::clock::wall();
                        let mut st = self.identity.lock();
                        let version = st.twin.patch_reported(&patch, now).map_err(|e| e.to_string())?;
                        let change = patch.as_object().map(|p| st.twin.reported_change(p));
                        let body = events::twin_body(st.twin.version, None, None, change);
                        self.hub.events.twin_changed(&self.identity, events::TwinOp::Update, body, now);
                        drop(st);
                        self.hub.store.identity(&self.identity);
                        if let (Some(check), Some(model)) = (&self.hub.model_check, &self.model_id) {
                            let found = check.reported(&self.key, model, &patch);
                            self.hub.metrics.model_mismatches.with_label_values(&["property"]).inc_by(found as u64);
                        }
                        Ok(version)
                    });
                match result {
                    Ok(version) => {
                        self.hub.metrics.twin_op("patch_reported", "ok");
                        self.answer_reported(wire, pkid, &rid, version);
                    }
                    Err(message) => {
                        Self::puback(wire, pkid, 0);
                        self.hub.metrics.twin_op("patch_reported", "rejected");
                        let body = json!({"errorCode": 400004, "message": message});
                        self.twin_response(wire, 400, &rid, None, Bytes::from(body.to_string()));
                    }
                }
            }
            DevicePublish::MethodResponse { status, rid } => {
                Self::puback(wire, pkid, 0);
                self.hub.methods.complete(&self.key, &rid, MethodResponse { status, payload: p.payload });
            }
            DevicePublish::DpsRegister { .. } | DevicePublish::DpsPollStatus { .. } => {
                return Step::Close(CloseReason::ProtocolViolation);
            }
        }
        Step::Continue
    }

    /// A QoS 1 PUBACK, once store change `after` is committed (0: nothing to wait for).
    fn puback(wire: &mut Wire, pkid: Option<u16>, after: u64) {
        if let Some(pkid) = pkid {
            wire.puback_after(after, pkid);
        }
    }

    /// An accepted reported patch's PUBACK and 204 (with the twin's new version), once the store
    /// has committed it; its PUBACK and a 500 if the store failed first. The connection's loop
    /// holds them (`Wire::answer_after`) and never waits for the disk itself.
    fn answer_reported(&self, wire: &mut Wire, pkid: Option<u16>, rid: &str, version: u64) {
        let after = self.hub.store.mark();
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        if let Some(pkid) = pkid {
            ok.push(Packet::PubAck(PubAck::new(pkid)));
            failed.push(Packet::PubAck(PubAck::new(pkid)));
        }
        if let Some(granted) = self.subs.twin_responses {
            let qos = cap_qos(QoS::AtLeastOnce, granted);
            let mut response = |status, version, body: Bytes| {
                let mut p = Publish::from_bytes(topic::twin_response(status, rid, version), qos, body);
                if qos != QoS::AtMostOnce {
                    p.pkid = wire.pkid();
                }
                Packet::Publish(p)
            };
            ok.push(response(204, Some(version), Bytes::new()));
            let body = json!({"errorCode": 500001, "message": "the patch could not be stored"});
            failed.push(response(500, None, Bytes::from(body.to_string())));
        }
        wire.answer_after(after, ok, failed);
    }

    fn on_subscribe(&mut self, s: Subscribe, wire: &mut Wire) -> Step {
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut newly = Subscriptions::default();
        let mut next = self.subs;
        for f in &s.filters {
            let filter = Filter::parse(&f.path, &self.identity.device_id, self.identity.module_id.as_deref())
                .ok()
                .filter(|f| *f != Filter::DpsResponses);
            let granted = cap_qos(f.qos, QoS::AtLeastOnce);
            let accepted = match filter {
                Some(kind) => {
                    let slot = next.slot(kind).expect("hub filters have a slot");
                    let was = slot.replace(granted);
                    if next.count() > self.hub.behaviour.max_subscriptions {
                        *next.slot(kind).expect("hub filters have a slot") = was;
                        false
                    } else {
                        *newly.slot(kind).expect("hub filters have a slot") = Some(granted);
                        true
                    }
                }
                None => false,
            };
            if !accepted {
                if self.hub.behaviour.bad_subscription == BadSubscription::Close {
                    return Step::Close(CloseReason::ProtocolViolation);
                }
                codes.push(SubscribeReasonCode::Failure);
            } else {
                codes.push(SubscribeReasonCode::Success(granted));
            }
        }
        self.subs = next;
        wire.write(Packet::SubAck(SubAck::new(s.pkid, codes)));
        let mut st = self.identity.lock();
        if let Some(sess) = st.session.as_mut().filter(|s| s.conn_id == self.conn_id) {
            sess.subs = self.subs;
        }
        let redeliver = if newly.queue(self.identity.module_id.is_some()).is_some() {
            devices::c2d_deliverable(&self.hub, &self.identity, &mut st, self.conn_id)
        } else {
            Vec::new()
        };
        if !redeliver.is_empty() {
            self.hub.store.identity(&self.identity);
        }
        drop(st);
        for m in redeliver {
            self.send_c2d(m, wire);
        }
        if newly.methods.is_some() {
            self.identity.changed.notify_waiters();
        }
        Step::Continue
    }

    fn on_unsubscribe(&mut self, topics: &[String]) {
        for t in topics {
            if let Ok(kind) = Filter::parse(t, &self.identity.device_id, self.identity.module_id.as_deref())
                && let Some(slot) = self.subs.slot(kind)
            {
                *slot = None;
            }
        }
        let mut st = self.identity.lock();
        if let Some(sess) = st.session.as_mut().filter(|s| s.conn_id == self.conn_id) {
            sess.subs = self.subs;
        }
    }
}

impl PacketSession for HubSession {
    fn on_packet(&mut self, p: Packet, wire: &mut Wire) -> Step {
        match p {
            Packet::Publish(p) => self.on_publish(p, wire),
            Packet::Subscribe(s) => self.on_subscribe(s, wire),
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(&u.topics);
                wire.write(Packet::UnsubAck(UnsubAck::new(u.pkid)));
                Step::Continue
            }
            Packet::PubAck(ack) => {
                if let Some(i) = self.c2d_inflight.iter().position(|(pkid, _)| *pkid == ack.pkid) {
                    let (_, id) = self.c2d_inflight.swap_remove(i);
                    devices::c2d_acknowledged(&self.hub, &self.identity, id);
                }
                Step::Continue
            }
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
            Outbound::Publish { topic, payload, qos, c2d_id } => {
                let pkid = Self::publish(wire, topic, payload, qos);
                if let Some(id) = c2d_id.filter(|_| qos == QoS::AtLeastOnce) {
                    self.c2d_inflight.push((pkid, id));
                }
                Step::Continue
            }
            Outbound::PubAck { pkid, after } => {
                wire.puback_after(after, pkid);
                Step::Continue
            }
            Outbound::Close(r) => Step::Close(r),
        }
    }

    fn on_close(&mut self, reason: CloseReason, _wire: &mut Wire) {
        let mut st = self.identity.lock();
        if st.session.as_ref().is_some_and(|s| s.conn_id == self.conn_id) {
            st.session = None;
            if self.persistent {
                st.saved_subs = Some(self.subs);
            }
            let wall = crate::hub::clock::wall();
            st.record.connection_state_updated = Some(wall);
            self.hub.events.connection(&self.identity, false, wall);
        }
        // The Will stands in for telemetry when the device vanished without DISCONNECT.
        if reason != CloseReason::ClientDisconnect
            && let Some(will) = self.will.take()
            && let Ok(DevicePublish::Telemetry { device_id, module_id, properties }) = DevicePublish::parse(&will.topic)
            && device_id == self.identity.device_id
            && module_id == self.identity.module_id
        {
            self.store_telemetry(&mut st, &properties, will.message, will.retain, true);
        }
        drop(st);
        self.identity.changed.notify_waiters();
        self.hub.metrics.connections_hub.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rumqttc::mqttbytes::v4::{ConnAck, SubscribeReasonCode};

    use super::*;
    use crate::hub::testing::{bench, connect, identity, publish, publishes, subscribe, token, written};
    use crate::iot::sas::Key;
    use crate::iot::username::{Username, hub_username};

    const HOST: &str = "localhost";

    fn username(device: &str, module: Option<&str>) -> HubUsername {
        match Username::parse(&hub_username(HOST, device, module, None)).unwrap() {
            Username::Hub(u) => u,
            Username::Dps(_) => unreachable!(),
        }
    }

    struct Conn {
        session: HubSession,
        wire: Wire,
        rx: mpsc::Receiver<Box<Outbound>>,
    }

    fn open(hub: &Hub, device: &str, password: &str) -> Result<Conn, Refusal> {
        let (tx, rx) = mpsc::channel(8);
        let mut wire = Wire::new();
        let c = connect(device, &hub_username(HOST, device, None, None), password, true);
        let (session, _) = HubSession::connect(hub, &username(device, None), &c, password, None, tx, &mut wire)?;
        Ok(Conn { session, wire, rx })
    }

    #[tokio::test(start_paused = true)]
    async fn connect_refusals_name_the_reason() {
        let b = bench(|_| {});
        let key = identity(&b.hub, "d1", None);
        let good = token(&format!("{HOST}/devices/d1"), &key, 60);
        let refused = |client: &str, user: HubUsername, password: &str| {
            let (tx, _rx) = mpsc::channel(1);
            let c = connect(client, "u", password, true);
            HubSession::connect(&b.hub, &user, &c, password, None, tx, &mut Wire::new()).err()
        };
        assert_eq!(refused("other", username("d1", None), &good), Some(Refusal::ClientIdMismatch));
        assert_eq!(refused("ghost", username("ghost", None), &good), Some(Refusal::UnknownIdentity));
        let mut foreign = username("d1", None);
        foreign.host = "elsewhere.azure-devices.net".into();
        assert_eq!(refused("d1", foreign, &good), Some(Refusal::BadUsername));
        let wrong_key = token(&format!("{HOST}/devices/d1"), &Key::generate(), 60);
        assert_eq!(refused("d1", username("d1", None), &wrong_key), Some(Refusal::BadCredentials));
        assert_eq!(refused("d1", username("d1", None), "not a token"), Some(Refusal::BadCredentials));
        let other_device = token(&format!("{HOST}/devices/d2"), &key, 60);
        assert_eq!(refused("d1", username("d1", None), &other_device), Some(Refusal::BadCredentials));

        // A token good now is expired once the (paused) clock has passed its expiry.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(refused("d1", username("d1", None), &good), Some(Refusal::ExpiredToken));

        let fresh = token(&format!("{HOST}/devices/d1"), &key, 60);
        b.hub.registry.get("d1", None).unwrap().lock().record.enabled = false;
        assert_eq!(refused("d1", username("d1", None), &fresh), Some(Refusal::IdentityDisabled));
        b.hub.registry.get("d1", None).unwrap().lock().record.enabled = true;
        let mut c = open(&b.hub, "d1", &fresh).expect("accepted");
        assert!(matches!(
            written(&mut c.wire)[..],
            [Packet::ConnAck(ConnAck { code: ConnectReturnCode::Success, .. })]
        ));

        // A second connection of the same identity replaces the first.
        let mut second = open(&b.hub, "d1", &fresh).expect("accepted");
        assert!(matches!(*c.rx.try_recv().unwrap(), Outbound::Close(CloseReason::Replaced)));
        second.session.on_close(CloseReason::ClientDisconnect, &mut second.wire);
        c.session.on_close(CloseReason::Replaced, &mut c.wire);
        assert!(b.hub.registry.get("d1", None).unwrap().lock().session.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn subscriptions_follow_the_documented_filters() {
        let b = bench(|c| c.behaviour.max_subscriptions = 3);
        let key = identity(&b.hub, "d1", None);
        let mut c = open(&b.hub, "d1", &token(&format!("{HOST}/devices/d1"), &key, 3600)).unwrap();
        written(&mut c.wire);
        let step = c.session.on_packet(
            subscribe(1, &["devices/d1/messages/devicebound/#", "$iothub/methods/POST/#", "$iothub/twin/res/#"]),
            &mut c.wire,
        );
        assert_eq!(step, Step::Continue);
        let [Packet::SubAck(ack)] = &written(&mut c.wire)[..] else { panic!("one SUBACK") };
        assert_eq!(ack.return_codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce); 3]);
        let subs = b.hub.registry.get("d1", None).unwrap().lock().session.as_ref().unwrap().subs;
        assert!(subs.c2d.is_some() && subs.methods.is_some() && subs.twin_responses.is_some());
        // Past max_subscriptions, or another identity's filter: the connection closes (the default).
        let step = c.session.on_packet(subscribe(2, &["$iothub/twin/PATCH/properties/desired/#"]), &mut c.wire);
        assert_eq!(step, Step::Close(CloseReason::ProtocolViolation));

        let r = bench(|c| c.behaviour.bad_subscription = BadSubscription::Refuse);
        let key = identity(&r.hub, "d2", None);
        let mut c = open(&r.hub, "d2", &token(&format!("{HOST}/devices/d2"), &key, 3600)).unwrap();
        written(&mut c.wire);
        let step = c.session.on_packet(
            subscribe(3, &["devices/other/messages/devicebound/#", "$dps/registrations/res/#", "$iothub/twin/res/#"]),
            &mut c.wire,
        );
        assert_eq!(step, Step::Continue);
        let [Packet::SubAck(ack)] = &written(&mut c.wire)[..] else { panic!("one SUBACK") };
        assert_eq!(
            ack.return_codes,
            [
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtLeastOnce)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn twin_get_and_reported_patch_answer_on_the_response_topic() {
        let b = bench(|_| {});
        let key = identity(&b.hub, "d1", None);
        let mut c = open(&b.hub, "d1", &token(&format!("{HOST}/devices/d1"), &key, 3600)).unwrap();
        // Without the response subscription a twin request gets no answer.
        c.session.on_packet(publish("$iothub/twin/GET/?$rid=0", b"", QoS::AtMostOnce, 0), &mut c.wire);
        assert!(publishes(&written(&mut c.wire)).is_empty());
        c.session.on_packet(subscribe(1, &["$iothub/twin/res/#"]), &mut c.wire);
        c.session.on_packet(publish("$iothub/twin/GET/?$rid=1", b"", QoS::AtMostOnce, 0), &mut c.wire);
        let out = publishes(&written(&mut c.wire));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, "$iothub/twin/res/200/?$rid=1");
        let twin: Value = serde_json::from_str(&out[0].1).unwrap();
        assert_eq!(twin["desired"]["$version"], 1);

        let patch = publish("$iothub/twin/PATCH/properties/reported/?$rid=2", br#"{"fw":"1.2"}"#, QoS::AtLeastOnce, 7);
        c.session.on_packet(patch, &mut c.wire);
        let out = written(&mut c.wire);
        assert!(matches!(out[0], Packet::PubAck(PubAck { pkid: 7 })));
        assert_eq!(publishes(&out)[0].0, "$iothub/twin/res/204/?$rid=2&$version=2");
        let reported = b.hub.registry.get("d1", None).unwrap().lock().twin.device_view();
        assert_eq!(reported["reported"]["fw"], "1.2");

        c.session.on_packet(
            publish("$iothub/twin/PATCH/properties/reported/?$rid=3", b"{", QoS::AtMostOnce, 0),
            &mut c.wire,
        );
        let out = publishes(&written(&mut c.wire));
        assert_eq!(out[0].0, "$iothub/twin/res/400/?$rid=3");
        assert!(out[0].1.contains("400004"));
    }

    #[tokio::test(start_paused = true)]
    async fn method_responses_complete_the_call_they_answer() {
        let b = bench(|_| {});
        let key = identity(&b.hub, "d1", None);
        let mut c = open(&b.hub, "d1", &token(&format!("{HOST}/devices/d1"), &key, 3600)).unwrap();
        c.session.on_packet(subscribe(1, &["$iothub/methods/POST/#"]), &mut c.wire);
        written(&mut c.wire);
        let identity = b.hub.registry.get("d1", None).unwrap();
        let hub = b.hub.clone();
        let call = tokio::spawn(async move {
            hub.methods
                .invoke(&identity, "blink", Bytes::from_static(b"3"), Duration::ZERO, Duration::from_secs(30), true)
                .await
        });
        let o = c.rx.recv().await.expect("the request is queued for the connection");
        assert_eq!(c.session.on_outbound(*o, &mut c.wire), Step::Continue);
        let (topic, payload) = publishes(&written(&mut c.wire)).remove(0);
        assert_eq!(payload, "3");
        let rid = topic.strip_prefix("$iothub/methods/POST/blink/?$rid=").expect("the request topic").to_owned();
        // An answer to another request id completes nothing; the right one completes the call.
        c.session.on_packet(publish("$iothub/methods/res/200/?$rid=nope", b"{}", QoS::AtMostOnce, 0), &mut c.wire);
        let answer = format!("$iothub/methods/res/201/?$rid={rid}");
        let mut p = Publish::new(answer, QoS::AtMostOnce, "{\"ok\":true}");
        p.pkid = 0;
        c.session.on_packet(Packet::Publish(p), &mut c.wire);
        let resp = call.await.unwrap().expect("answered");
        assert_eq!((resp.status, resp.payload.as_ref()), (201, b"{\"ok\":true}".as_ref()));

        // Unanswered, the call times out when the (paused) clock passes the response timeout.
        let identity = b.hub.registry.get("d1", None).unwrap();
        let hub = b.hub.clone();
        let call = tokio::spawn(async move {
            hub.methods.invoke(&identity, "slow", Bytes::new(), Duration::ZERO, Duration::from_secs(30), true).await
        });
        let _ = c.rx.recv().await;
        assert!(matches!(call.await.unwrap(), Err(crate::hub::methods::MethodError::Timeout)));
    }

    #[tokio::test(start_paused = true)]
    async fn telemetry_is_stored_and_c2d_completed_by_its_puback() {
        let b = bench(|c| c.behaviour.max_message_bytes = 1024);
        let key = identity(&b.hub, "d1", None);
        let mut c = open(&b.hub, "d1", &token(&format!("{HOST}/devices/d1"), &key, 3600)).unwrap();
        written(&mut c.wire);
        let t = publish("devices/d1/messages/events/%24.mid=1&fleetsim-seq=r%3A2", b"{}", QoS::AtLeastOnce, 5);
        assert_eq!(c.session.on_packet(t, &mut c.wire), Step::Continue);
        assert!(matches!(written(&mut c.wire)[..], [Packet::PubAck(PubAck { pkid: 5 })]));
        let identity = b.hub.registry.get("d1", None).unwrap();
        {
            let st = identity.lock();
            assert_eq!(st.telemetry.received, 1);
            let seq = st.sequence.as_ref().unwrap();
            assert_eq!((seq.run.as_str(), seq.highest, seq.gaps()), ("r", 2, 1));
        }
        let big: &'static [u8] = Box::leak(vec![b'x'; 2048].into_boxed_slice());
        let step = c.session.on_packet(publish("devices/d1/messages/events/", big, QoS::AtLeastOnce, 6), &mut c.wire);
        assert_eq!(step, Step::Close(CloseReason::ProtocolViolation), "past max_message_bytes");
        let other = publish("devices/d2/messages/events/", b"{}", QoS::AtMostOnce, 0);
        assert_eq!(c.session.on_packet(other, &mut c.wire), Step::Close(CloseReason::ProtocolViolation));

        c.session.on_packet(subscribe(1, &["devices/d1/messages/devicebound/#"]), &mut c.wire);
        written(&mut c.wire);
        let message = crate::hub::c2d::NewC2d { body: Bytes::from_static(b"hi"), ..Default::default() };
        {
            let mut st = identity.lock();
            st.c2d
                .enqueue(
                    "d1",
                    message,
                    50,
                    Duration::from_secs(60),
                    crate::hub::clock::now(),
                    crate::hub::clock::wall(),
                )
                .unwrap();
            b.hub.push_c2d(&identity, &mut st);
        }
        let o = c.rx.recv().await.unwrap();
        c.session.on_outbound(*o, &mut c.wire);
        let [Packet::Publish(p)] = &written(&mut c.wire)[..] else { panic!("the C2D publish") };
        assert!(p.topic.starts_with("devices/d1/messages/devicebound/"));
        assert_eq!(identity.lock().c2d.len(), 1, "pending until acknowledged");
        c.session.on_packet(Packet::PubAck(PubAck::new(p.pkid)), &mut c.wire);
        assert!(identity.lock().c2d.is_empty());
    }
}
