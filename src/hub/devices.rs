//! A device's (or module's) session logic, whatever transport carries it: authentication of a SAS
//! token against the registry, admission (injected outages and throttling), telemetry acceptance
//! (the size limit, the fault-delayed acknowledgement, storing, sequence stamps) and C2D
//! delivery and settlement. The MQTT front end (`mqtt/hub_session.rs`) and the HTTPS device
//! routes (`http/device_api.rs`) both call this and never each other; AMQP would be a third
//! caller. Nothing here knows a packet, a header or a status code: each front end maps the
//! outcomes to its own wire (CONNACK codes, PUBACKs, HTTP statuses).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::c2d::{C2dMessage, LockLost, Settle};
use super::faults::Refuse;
use super::feedback::Status;
use super::metrics::Refusal;
use super::registry::Auth;
use super::registry::{Identity, IdentityState};
use super::secrets::Permissions;
use super::sequence;
use super::state::HubState;
use super::telemetry::{self, Sender};
use super::x509::{self, ClientChain};
use crate::iot::property_bag::PropertyBag;
use crate::iot::sas::{SasError, SasToken};
use crate::iot::time::unix_secs;

/// An identity whose token the hub accepted, with the token's expiry (Unix seconds).
pub struct Authenticated {
    pub identity: Arc<Identity>,
    pub expiry: u64,
}

/// Checks a SAS token for device `device_id` (module `module_id`) of hub `host` (as the client
/// named it: MQTT username, or the token's `sr`). The token's `sr` must cover
/// `{host}/devices/{id}[/modules/{mid}]` and be signed with one of the identity's keys, or with a
/// policy key when `skn` names a policy with DeviceConnect (token services, gateways), and be
/// unexpired within `behaviour.sas_skew_secs` (Microsoft: "Control access to IoT Hub with SAS").
/// Refusals name why, never the token: `BadUsername` (not this hub), `UnknownIdentity`,
/// `BadCredentials`, `ExpiredToken`, `IdentityDisabled`.
pub fn authenticate(
    hub: &HubState,
    host: &str,
    device_id: &str,
    module_id: Option<&str>,
    token: &str,
    now: SystemTime,
) -> Result<Authenticated, Refusal> {
    if !hub.is_our_host(host) {
        return Err(Refusal::BadUsername);
    }
    let identity = hub.registry.get(device_id, module_id).ok_or(Refusal::UnknownIdentity)?;
    let token = SasToken::parse(token).map_err(|_| match identity.lock().record.auth {
        // No token (an X.509 client's empty password) from an identity that expects a certificate.
        Auth::SelfSigned { .. } | Auth::CertificateAuthority => Refusal::CertMissing,
        Auth::Sas | Auth::None => Refusal::BadCredentials,
    })?;
    let resource = match module_id {
        Some(m) => format!("{host}/devices/{device_id}/modules/{m}"),
        None => format!("{host}/devices/{device_id}"),
    };
    let now = unix_secs(now);
    let skew = hub.behaviour.sas_skew_secs;
    let verified = match token.skn.as_deref() {
        Some(policy) => match hub.policy(policy).filter(|p| p.permissions.contains(Permissions::DEVICE_CONNECT)) {
            Some(p) => token.verify(&resource, &p.keys, now, skew),
            None => Err(SasError::BadSignature),
        },
        None => {
            let st = identity.lock();
            // An X.509 (or `none`) identity has no keys that sign: only a certificate or a
            // policy token admits it.
            if st.record.auth != Auth::Sas {
                return Err(Refusal::CertMissing);
            }
            let keys = st.record.keys.clone();
            drop(st);
            token.verify(&resource, &keys, now, skew)
        }
    };
    match verified {
        Ok(()) => {}
        Err(SasError::Expired) => return Err(Refusal::ExpiredToken),
        Err(_) => return Err(Refusal::BadCredentials),
    }
    admitted(&identity)?;
    Ok(Authenticated { identity, expiry: token.expiry })
}

/// An identity that exists (not deleted meanwhile) and is enabled; the refusal otherwise.
fn admitted(identity: &Identity) -> Result<(), Refusal> {
    let st = identity.lock();
    if st.removed {
        return Err(Refusal::UnknownIdentity);
    }
    if !st.record.enabled {
        return Err(Refusal::IdentityDisabled);
    }
    Ok(())
}

/// Authenticates a CONNECT: by `chain`, the TLS client certificate, when there is one and the
/// identity's type is `selfSigned` or `certificateAuthority`; else by the SAS token `password`
/// (a SAS device presenting a certificate still authenticates by its token). Without a
/// certificate this is `authenticate` itself, at its cost.
pub fn authenticate_connect(
    hub: &HubState,
    host: &str,
    device_id: &str,
    module_id: Option<&str>,
    password: &str,
    chain: Option<&ClientChain>,
    now: SystemTime,
) -> Result<Authenticated, Refusal> {
    if chain.is_some()
        && let Some(identity) = hub.registry.get(device_id, module_id)
        && matches!(identity.lock().record.auth, Auth::SelfSigned { .. } | Auth::CertificateAuthority)
    {
        return authenticate_x509(hub, host, device_id, module_id, chain, now);
    }
    authenticate(hub, host, device_id, module_id, password, now)
}

/// Authenticates a device (module) by the client certificate its TLS connection presented,
/// for an identity whose `authentication.type` is `selfSigned` or `certificateAuthority`
/// (Microsoft: "Authenticate identities with X.509 certificates"). The host must be ours as for
/// SAS. Refusals as `authenticate`'s, plus the certificate's (`check_certificate`). The session
/// has no token to expire (`expiry` is `u64::MAX`).
pub fn authenticate_x509(
    hub: &HubState,
    host: &str,
    device_id: &str,
    module_id: Option<&str>,
    chain: Option<&ClientChain>,
    now: SystemTime,
) -> Result<Authenticated, Refusal> {
    if !hub.is_our_host(host) {
        return Err(Refusal::BadUsername);
    }
    let identity = hub.registry.get(device_id, module_id).ok_or(Refusal::UnknownIdentity)?;
    let auth = identity.lock().record.auth.clone();
    check_certificate(chain, &auth, device_id, module_id, &hub.ca_certs, now)?;
    admitted(&identity)?;
    Ok(Authenticated { identity, expiry: u64::MAX })
}

/// Whether `chain` may connect as the identity `device_id` (module `module_id`) whose
/// authentication is `auth`, at `now`. The CN is the device id, or for a module the module id
/// (the emulator's reading; Microsoft's docs state the device rule only). Refusals:
/// `CertMissing` (no chain, or `auth` takes no certificate), `CertThumbprint`, `CertUntrusted`,
/// `CertExpired`, `CertNotYetValid`, `CertSubject`.
fn check_certificate(
    chain: Option<&ClientChain>,
    auth: &Auth,
    device_id: &str,
    module_id: Option<&str>,
    cas: &super::ca_certs::CaCerts,
    now: SystemTime,
) -> Result<(), Refusal> {
    let chain = chain.ok_or(Refusal::CertMissing)?;
    let leaf = chain.0.first().ok_or(Refusal::CertMissing)?;
    // The handshake already parsed every certificate; a failure here is the same refusal.
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|_| Refusal::CertUntrusted)?;
    let unix = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    match auth {
        Auth::SelfSigned { primary, secondary } => {
            let (sha1, sha256) = x509::thumbprints(leaf);
            let matches = |t: &String| t.eq_ignore_ascii_case(&sha1) || t.eq_ignore_ascii_case(&sha256);
            if !matches(primary) && !secondary.as_ref().is_some_and(matches) {
                return Err(Refusal::CertThumbprint);
            }
            let validity = cert.validity();
            if unix < validity.not_before.timestamp() {
                return Err(Refusal::CertNotYetValid);
            }
            if unix > validity.not_after.timestamp() {
                return Err(Refusal::CertExpired);
            }
        }
        Auth::CertificateAuthority => cas.verify_chain(leaf, &chain.0[1..], now)?,
        Auth::Sas | Auth::None => return Err(Refusal::CertMissing),
    }
    let want = module_id.unwrap_or(device_id);
    if x509::subject_cn(&cert).as_deref() != Some(want) {
        return Err(Refusal::CertSubject);
    }
    Ok(())
}

/// Whether the hub takes device traffic now: an injected outage or the injected connect
/// throttle turn it away (`Refusal::Outage` / `Refusal::Throttled`); an admitted call counts
/// against the throttle. MQTT asks once per CONNECT, HTTPS once per request (each HTTPS request
/// authenticates on its own, as a connection does).
pub fn admit(hub: &HubState) -> Result<(), Refusal> {
    hub.faults.admit_connect().map_err(|why| match why {
        Refuse::Outage => Refusal::Outage,
        Refuse::Throttled => Refusal::Throttled,
    })
}

/// A message larger than `behaviour.max_message_bytes` (IoT Hub: 256 KB, body plus property
/// names and values; "IoT Hub quotas and throttling").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge;

/// Checks a device-to-cloud message's size against the hub's limit.
pub fn check_size(hub: &HubState, properties: &PropertyBag, body_len: usize) -> Result<(), TooLarge> {
    if telemetry::message_size(properties, body_len) > hub.behaviour.max_message_bytes { Err(TooLarge) } else { Ok(()) }
}

/// How long the acknowledgement of an accepted message is held back (the `puback_delay_ms`
/// fault; MQTT delays the PUBACK, HTTPS the 204).
pub fn ack_delay(hub: &HubState) -> Option<Duration> {
    hub.faults.puback_delay()
}

/// One device-to-cloud message, in the property bag every transport maps into (MQTT topic
/// bags as they are, HTTPS `iothub-*` headers to the same keys), so that the telemetry log, the
/// sequence tracker and every reader see the same message whichever transport carried it.
pub struct D2c<'a> {
    pub properties: &'a PropertyBag,
    pub body: Bytes,
    /// MQTT's retain flag (kept as the `mqtt-retain` application property).
    pub retain: bool,
    /// Sent by the hub on the device's behalf (an MQTT Will).
    pub will: bool,
}

/// Stores an accepted message in the identity's telemetry log and the Event Hubs-compatible
/// endpoint (`eventhub.rs`), notes its activity, counts the
/// fleet's sequence stamp (`iot::sequence::PROPERTY`) and the telemetry metrics. `model_id` is
/// the one the connection announced, if any, else the identity's.
pub fn store_telemetry(hub: &HubState, identity: &Identity, st: &mut IdentityState, model_id: Option<&str>, m: D2c) {
    let wall = crate::hub::clock::wall();
    let sender = Sender {
        device_id: &identity.device_id,
        module_id: identity.module_id.as_deref(),
        model_id: model_id.or(st.record.model_id.as_deref()),
        generation_id: &st.record.generation_id,
    };
    let D2c { properties, body, retain, will } = m;
    if let (Some(check), Some(model)) = (&hub.model_check, sender.model_id) {
        let key = identity.key();
        let found = check.telemetry(&key, model, properties.get("$.sub"), &body);
        hub.metrics.model_mismatches.with_label_values(&["telemetry"]).inc_by(found as u64);
    }
    let make = || Arc::new(telemetry::receive(properties, body.clone(), &sender, retain, will, wall));
    // Built once and shared by both readers: the identity's read-back ring and the Event
    // Hubs-compatible endpoint (each may keep nothing, for load tests).
    let mut built = None;
    if hub.eventhub.enabled() {
        let m = make();
        hub.eventhub.append(&identity.device_id, m.clone(), wall);
        built = Some(m);
    }
    st.telemetry.record(hub.behaviour.telemetry_buffer, || built.take().unwrap_or_else(make));
    arrived(hub, st, properties, body.len(), true);
}

/// What every message that reached the hub counts, stored upstream or routed elsewhere: the
/// identity's activity, the fleet's sequence stamp and the telemetry metrics.
/// `upstream` is false for a message IoT Edge routes sent only to module inputs.
fn arrived(hub: &HubState, st: &mut IdentityState, properties: &PropertyBag, len: usize, upstream: bool) {
    st.record.last_activity = Some(crate::hub::clock::wall());
    if let Some((run, n)) = properties.get(crate::iot::sequence::PROPERTY).and_then(crate::iot::sequence::parse) {
        let tracker = match &mut st.sequence {
            Some(t) if t.run == run => t,
            slot => slot.insert(Box::new(sequence::Tracker::new(run))),
        };
        let arrival = tracker.record(n);
        if !upstream && arrival != sequence::Arrival::Duplicate {
            tracker.routed_away += 1;
        }
        hub.metrics.sequence_arrival(arrival);
    }
    hub.metrics.telemetry_received.inc();
    hub.metrics.telemetry_bytes.inc_by(len as u64);
}

/// Accepts a device-to-cloud message from `identity`: IoT Edge routing first (`edge.rs`: a module
/// of an Edge device with routes goes where they say, perhaps only to other modules' inputs),
/// then storing what goes upstream. Locks the identity for the store and, after releasing it,
/// each input's module in turn, so two modules routing to each other cannot deadlock.
pub fn accept_telemetry(hub: &HubState, identity: &Identity, model_id: Option<&str>, m: D2c) {
    let Some(plan) = super::edge::plan(hub, identity, m.properties, &m.body) else {
        store_telemetry(hub, identity, &mut identity.lock(), model_id, m);
        return;
    };
    let (properties, body) = (m.properties, m.body.clone());
    {
        let mut st = identity.lock();
        if plan.upstream {
            store_telemetry(hub, identity, &mut st, model_id, m);
        } else {
            arrived(hub, &mut st, properties, body.len(), false);
        }
    }
    super::edge::deliver(hub, identity, &plan, properties, &body);
}

/// C2D messages a live MQTT connection `conn_id` should now receive (after dropping the expired
/// and the over-delivered, counted): the rule lives with the C2D push in `state.rs`.
pub fn c2d_deliverable(hub: &HubState, identity: &Identity, st: &mut IdentityState, conn_id: u64) -> Vec<C2dMessage> {
    hub.c2d_deliverable(&identity.device_id, st, conn_id)
}

/// The device acknowledged delivery `id` on a transport without lock tokens (an MQTT PUBACK, or
/// a QoS 0 delivery): the message is done.
pub fn c2d_acknowledged(hub: &HubState, identity: &Arc<Identity>, id: u64) {
    let st = &mut *identity.lock();
    if let Some(m) = st.c2d.complete(id) {
        hub.metrics.c2d("completed");
        hub.c2d_outcome(&identity.device_id, st, &m, Status::Success);
        hub.store.identity(identity);
    }
}

/// A polling receive (HTTPS): the oldest deliverable message, locked for
/// `behaviour.c2d_lock_timeout_secs` under a new lock token, its delivery counted; `None` when
/// nothing is deliverable. Messages in flight on the identity's live MQTT connection are left to
/// it.
pub fn c2d_receive(hub: &HubState, identity: &Arc<Identity>) -> Option<C2dMessage> {
    let mut st = identity.lock();
    let live = st.session.as_ref().map(|s| s.conn_id);
    let mut dropped = Vec::new();
    let lock = Duration::from_secs(hub.behaviour.c2d_lock_timeout_secs);
    let m =
        st.c2d.take_locked(live, lock, hub.behaviour.c2d_max_delivery_count, crate::hub::clock::now(), &mut dropped);
    let dropped_any = !dropped.is_empty();
    hub.count_c2d_dropped(&identity.device_id, &st, dropped);
    drop(st);
    if m.is_some() || dropped_any {
        // The delivery count (or the queue) changed; no one waits for it to be durable.
        hub.store.identity(identity);
    }
    if m.is_some() {
        hub.metrics.c2d("delivered");
    }
    m
}

/// Completes, rejects or abandons the message locked under `lock_token`. A rejected message is
/// dead-lettered ("Understand cloud-to-device messaging": the message life cycle); an abandoned
/// one is Enqueued again and counts against the maximum delivery count on its next receive.
pub fn c2d_settle(hub: &HubState, identity: &Arc<Identity>, lock_token: &str, how: Settle) -> Result<(), LockLost> {
    let st = &mut *identity.lock();
    let m = st.c2d.settle(lock_token, how, crate::hub::clock::now())?;
    match how {
        Settle::Complete => hub.c2d_outcome(&identity.device_id, st, &m, Status::Success),
        Settle::Reject => hub.c2d_outcome(&identity.device_id, st, &m, Status::Rejected),
        Settle::Abandon => {}
    }
    hub.store.identity(identity);
    hub.metrics.c2d(match how {
        Settle::Complete => "completed",
        Settle::Reject => "rejected",
        Settle::Abandon => "abandoned",
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::c2d::NewC2d;
    use crate::hub::clock;
    use crate::hub::testing::{bench, identity, token};
    use crate::iot::sas::{Key, sign_token};

    #[tokio::test(start_paused = true)]
    async fn authentication_takes_identity_keys_or_a_device_connect_policy() {
        let b = bench(|_| {});
        let key = identity(&b.hub, "d1", None);
        let auth = |t: &str, module: Option<&str>| authenticate(&b.hub, "localhost", "d1", module, t, clock::wall());
        let Ok(a) = auth(&token("localhost/devices/d1", &key, 60), None) else { panic!("its own key") };
        assert_eq!(a.identity.device_id, "d1");
        let policy = |name: &str| {
            let k = Key::from_base64(&b.hub.secrets.policies[name].primary).unwrap();
            sign_token("localhost", &k, crate::iot::time::unix_secs(clock::wall()) + 60, Some(name))
        };
        assert!(auth(&policy("device"), None).is_ok(), "DeviceConnect signs for any device");
        assert_eq!(auth(&policy("registryRead"), None).err(), Some(Refusal::BadCredentials));
        assert_eq!(auth(&token("localhost/devices/d1", &key, 60), Some("m")).err(), Some(Refusal::UnknownIdentity));
        let t = token("localhost/devices/d1", &key, 60);
        tokio::time::advance(std::time::Duration::from_secs(61)).await;
        assert_eq!(auth(&t, None).err(), Some(Refusal::ExpiredToken));
    }

    #[tokio::test(start_paused = true)]
    async fn an_https_receive_locks_for_the_configured_timeout_then_redelivers() {
        let b = bench(|c| {
            c.behaviour.c2d_lock_timeout_secs = 30;
            c.behaviour.c2d_max_delivery_count = 2;
        });
        identity(&b.hub, "d1", None);
        let id = b.hub.registry.get("d1", None).unwrap();
        let m = NewC2d { body: Bytes::from_static(b"x"), ..Default::default() };
        id.lock().c2d.enqueue("d1", m, 50, Duration::from_secs(3600), clock::now(), clock::wall()).unwrap();
        let first = c2d_receive(&b.hub, &id).expect("pending");
        assert!(c2d_receive(&b.hub, &id).is_none(), "locked");
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(c2d_receive(&b.hub, &id).is_none(), "still locked");
        tokio::time::advance(Duration::from_secs(1)).await;
        let token = |m: &C2dMessage| m.lock.clone().unwrap().token;
        assert_eq!(c2d_settle(&b.hub, &id, &token(&first), Settle::Complete), Err(LockLost));
        let second = c2d_receive(&b.hub, &id).expect("redelivered after the lock timeout");
        assert_eq!(second.delivery_count, 2);
        c2d_settle(&b.hub, &id, &token(&second), Settle::Abandon).unwrap();
        assert!(c2d_receive(&b.hub, &id).is_none(), "past the maximum delivery count: dead-lettered");
        assert!(id.lock().c2d.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn https_settlement_and_dead_lettering_give_the_feedback_the_sender_asked_for() {
        let b = bench(|c| c.behaviour.c2d_max_delivery_count = 1);
        identity(&b.hub, "d1", None);
        let id = b.hub.registry.get("d1", None).unwrap();
        let send = |mid: &str, ack: &str| {
            let m = NewC2d {
                body: Bytes::from_static(b"x"),
                message_id: Some(mid.into()),
                ack: Some(ack.into()),
                ..Default::default()
            };
            id.lock().c2d.enqueue("d1", m, 50, Duration::from_secs(3600), clock::now(), clock::wall()).unwrap();
        };
        let token = |m: &C2dMessage| m.lock.clone().unwrap().token;
        send("done", "positive");
        send("refused", "negative");
        send("abandoned", "full");
        send("quiet", "positive");
        let m = c2d_receive(&b.hub, &id).unwrap();
        c2d_settle(&b.hub, &id, &token(&m), Settle::Complete).unwrap();
        let m = c2d_receive(&b.hub, &id).unwrap();
        c2d_settle(&b.hub, &id, &token(&m), Settle::Reject).unwrap();
        let m = c2d_receive(&b.hub, &id).unwrap();
        c2d_settle(&b.hub, &id, &token(&m), Settle::Abandon).unwrap();
        let m = c2d_receive(&b.hub, &id).unwrap();
        assert_eq!(m.message_id(), "quiet", "the abandoned one is past its delivery count");
        c2d_settle(&b.hub, &id, &token(&m), Settle::Reject).unwrap();
        let records = b.hub.feedback.take_batch(clock::wall());
        let got: Vec<(&str, &str)> =
            records.iter().map(|p| (p.record.original_message_id.as_str(), p.record.status.code())).collect();
        assert_eq!(
            got,
            [("done", "Success"), ("refused", "Rejected"), ("abandoned", "DeliveryCountExceeded")],
            "a positive-only sender hears nothing of a rejection"
        );
        assert_eq!(records[0].record.device_id, "d1");
        assert_eq!(records[0].record.device_generation_id, id.lock().record.generation_id);
    }

    #[tokio::test(start_paused = true)]
    async fn admission_follows_the_injected_outage() {
        let b = bench(|_| {});
        assert_eq!(admit(&b.hub), Ok(()));
        b.hub.faults.start_outage(Duration::from_secs(10));
        assert_eq!(admit(&b.hub), Err(Refusal::Outage));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(admit(&b.hub), Ok(()));
    }
}
