//! One identity's task: get credentials (DPS, or the registry), wait for a ramp slot, connect,
//! run the session (subscribe, fetch the twin, acknowledge writable properties, report, send
//! telemetry, answer commands) until something ends it, then come back: at once to renew the
//! token, after the downtime for a reboot, after exponential backoff with full jitter otherwise,
//! and through its credential step again when the hub refuses it as unknown (`recovery`).
//! Telemetry goes through the identity's `Outbox`, which outlives connections: nothing is lost
//! silently, and with the `drop_oldest` policy readings keep being generated while offline.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Subscribe, SubscribeFilter, SubscribeReasonCode};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::behaviour::{Agent, Out};
use super::failures;
use super::outbox::{OfflinePolicy, Outbox, Pushed};
use super::recovery::{self, Refusals, Step};
use super::spec::{Credentials, IdentitySpec, Shared};
use crate::client::mqtt::{ConnectError, MqttConn};
use crate::client::transport::{self, Endpoint};
use crate::iot::sas::sign_token;
use crate::iot::time::unix_secs;
use crate::iot::topic::{self, CloudPublish, Filter};
use crate::iot::username::hub_username;
use crate::metrics::{DeviceState, FleetMetrics};
use crate::provision::dps::{self, ProvisionError};
use crate::scenario::model::{DpsTransport, Transport};

/// How a session ended.
enum End {
    Shutdown,
    Renew,
    Reboot { downtime: Duration, method: String, answer: Option<Box<Out>> },
    Lost(&'static str),
}

fn full_jitter(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(20)).min(cap);
    ceiling.mul_f64(rand::random::<f64>())
}

/// Sleeps unless the fleet is stopping; false when it is.
async fn pause(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = cancel.cancelled() => false,
    }
}

struct StateTracker<'a> {
    metrics: &'a FleetMetrics,
    current: DeviceState,
}

impl StateTracker<'_> {
    fn to(&mut self, s: DeviceState) {
        if s != self.current {
            self.metrics.transition(Some(self.current), s);
            self.current = s;
        }
    }
}

/// Where an identity's telemetry and unconfirmed reports live between sessions.
struct Carry {
    outbox: Outbox,
    /// Reported-property patches the hub has not confirmed (204); sent again on the next session.
    reports: Vec<Value>,
    /// What the agent produced while offline, to send once connected.
    after_connect: Vec<Out>,
}

impl Carry {
    /// Numbers and buffers one reading, counting what the buffer policy did with it.
    fn enqueue(&mut self, shared: &Shared, properties: crate::iot::property_bag::PropertyBag, body: bytes::Bytes) {
        if shared.quiesce.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let m = &shared.metrics;
        let run = shared.settings.sequence_numbers.then_some(&*shared.run_id);
        let pushed = self.outbox.push(properties, body, |bag, n| {
            if let Some(run) = run {
                bag.push(crate::iot::sequence::PROPERTY, crate::iot::sequence::stamp(run, n));
            }
        });
        match pushed {
            Pushed::Queued => {
                m.telemetry_generated.inc();
                m.telemetry_queued.inc();
            }
            Pushed::DroppedOldest => {
                m.telemetry_generated.inc();
                m.telemetry_dropped("buffer_full", 1);
            }
            Pushed::Paused => m.telemetry_paused.inc(),
        }
    }

    /// Gives up what is still buffered (the fleet is stopping).
    fn abandon(&mut self, m: &FleetMetrics) {
        let (unwritten, in_doubt) = self.outbox.abandon();
        m.telemetry_dropped("shutdown", unwritten);
        m.telemetry_dropped("unacked_at_shutdown", in_doubt);
        m.telemetry_queued.sub((unwritten + in_doubt) as i64);
    }
}

/// Runs `fut` (a backoff, a ramp slot, a connect) while the identity is offline. Under the
/// `drop_oldest` policy the device keeps taking readings on its schedule meanwhile, into the
/// outbox; reports wait for the connection; command completions are counted.
async fn offline<F: std::future::Future>(
    fut: F,
    generate: bool,
    agent: &mut Agent,
    carry: &mut Carry,
    shared: &Shared,
) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    if !generate {
        return fut.await;
    }
    loop {
        let next = agent.next_deadline();
        tokio::select! {
            r = &mut fut => return r,
            _ = crate::sys::sleep_until_opt(next) => {
                for o in agent.on_tick(Instant::now()) {
                    match o {
                        Out::Telemetry { properties, body } => carry.enqueue(shared, properties, body),
                        Out::Filtered => shared.metrics.telemetry_filtered.inc(),
                        Out::CommandRan { name, status } => shared.metrics.command(&name, status),
                        r @ Out::Report(_) => carry.after_connect.push(r),
                        // Answers to requests from a connection that is gone have no one to go to.
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Runs one identity until `cancel` fires (the fleet stops, or a reload removes the identity).
pub async fn run(spec: IdentitySpec, shared: Arc<Shared>, cancel: CancellationToken) {
    let m = &shared.metrics;
    m.transition(None, DeviceState::Provisioning);
    let mut state = StateTracker { metrics: m, current: DeviceState::Provisioning };
    let mut agent =
        Agent::new(spec.behaviour.clone(), spec.device_id.clone(), spec.module_id.clone(), spec.n, Instant::now());
    let mut carry = Carry {
        outbox: Outbox::new(shared.settings.offline_policy, shared.settings.buffer),
        reports: Vec::new(),
        after_connect: Vec::new(),
    };
    let mut hub: Option<(String, String)> = None;
    let mut ensured = false;
    let mut failures = 0u32;
    let mut refusals = Refusals::default();
    let mut ever_connected = false;
    let cancel = &cancel;
    // Readings continue offline only once the device has been up (its schedule has started).
    let generate_offline = |ever: bool| ever && shared.settings.offline_policy == OfflinePolicy::DropOldest;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        let gen_off = generate_offline(ever_connected);
        if hub.is_none() {
            state.to(DeviceState::Provisioning);
            // Boxed: provisioning futures (HTTP clients, DPS over MQTT) are large and short-lived;
            // inline they would size every idle device's task (measured: 11.6 KB per device).
            let obtained = offline(
                Box::pin(obtain(&spec, &shared, &mut ensured, &mut refusals, failures)),
                gen_off,
                &mut agent,
                &mut carry,
                &shared,
            )
            .await;
            match obtained {
                Ok(h) => hub = Some(h),
                Err((wait, forgotten)) => {
                    if forgotten {
                        // Re-enrolled: whatever twin the device had is gone with its registration.
                        agent.forget_twin();
                    }
                    failures += 1;
                    state.to(DeviceState::Backoff);
                    if !offline(pause(wait, cancel), gen_off, &mut agent, &mut carry, &shared).await {
                        break;
                    }
                    continue;
                }
            }
        }
        state.to(DeviceState::Connecting);
        if !offline(shared.ramp.acquire(cancel), gen_off, &mut agent, &mut carry, &shared).await {
            break;
        }
        let (host, device_id) = hub.clone().expect("set above");
        let t0 = Instant::now();
        let ttl = shared.settings.token_ttl;
        let expiry = unix_secs(SystemTime::now()) + ttl.as_secs();
        let renew_at = t0 + ttl.mul_f64(shared.settings.renew_at * (1.0 - 0.1 * rand::random::<f64>()));
        let connected = offline(
            Box::pin(connect(&spec, &shared, &host, &device_id, expiry)),
            gen_off,
            &mut agent,
            &mut carry,
            &shared,
        )
        .await;
        let wait = match connected {
            Ok(conn) => {
                m.connect_attempt("ok");
                m.connect_seconds.observe(t0.elapsed().as_secs_f64());
                failures = 0;
                if !ever_connected {
                    ever_connected = true;
                    m.connected_first_time();
                }
                state.to(DeviceState::Connected);
                match session(conn, &spec, &device_id, &shared, &mut agent, &mut carry, Until { renew_at, cancel })
                    .await
                {
                    End::Shutdown => break,
                    End::Renew => {
                        m.token_renewals.inc();
                        continue;
                    }
                    End::Reboot { downtime, method, answer } => {
                        tracing::info!(device = %spec.device_id, method = %method, downtime_secs = downtime.as_secs_f64(), "rebooting");
                        state.to(DeviceState::Rebooting);
                        m.reconnect("reboot");
                        // A rebooting device takes no readings.
                        if !pause(downtime, cancel).await {
                            break;
                        }
                        carry.after_connect.extend(answer.map(|a| *a));
                        carry.after_connect.extend(agent.after_reboot(&method));
                        continue;
                    }
                    End::Lost(cause) => {
                        m.reconnect(cause);
                        failures = 1;
                        full_jitter(shared.settings.backoff_base, shared.settings.backoff_cap, failures)
                    }
                }
            }
            Err(e) => {
                m.connect_attempt(match &e {
                    ConnectError::Refused(_) => "refused",
                    ConnectError::Timeout => "timeout",
                    ConnectError::Io(_) | ConnectError::Protocol => "error",
                });
                let (host, port) = dial(&spec, &shared, &host);
                let detail = format!("{host}:{port}: {}", failures::chain(&e));
                let failure = match &e {
                    ConnectError::Refused(code) => failures::connack(*code as u8, detail),
                    ConnectError::Timeout => failures::network(format!("{detail} (connect_timeout)")),
                    _ => failures::network(detail),
                };
                shared.failures.report(&spec.template, &spec.device_id, "connect", failure);
                failures += 1;
                if recovery::hub_forgot(&e) {
                    // The hub no longer takes this identity's key (it restarted with an empty
                    // registry, or the device was deleted): the same key can never succeed, so
                    // the credential step runs again after the backoff.
                    let step = match &spec.credentials {
                        Credentials::Dps { .. } => Step::Dps,
                        Credentials::Direct { .. } if shared.service.is_some() => Step::Registry,
                        Credentials::Direct { .. } => Step::None,
                    };
                    refusals.rerun(m, &spec.device_id, spec.module_id.as_deref(), step, &e.to_string());
                    if step != Step::None {
                        hub = None;
                        ensured = false;
                        // The fleet-wide record would skip the device write the hub now needs.
                        shared.ensured.forget(&spec.device_id);
                        // A re-created identity has a new twin, whose desired versions start over.
                        agent.forget_twin();
                    }
                }
                full_jitter(shared.settings.backoff_base, shared.settings.backoff_cap, failures)
            }
        };
        state.to(DeviceState::Backoff);
        if !offline(pause(wait, cancel), generate_offline(ever_connected), &mut agent, &mut carry, &shared).await {
            break;
        }
    }
    carry.abandon(m);
    if shared.shutdown.is_cancelled() {
        state.to(DeviceState::Stopped);
    } else {
        // A reload removed this identity: it leaves the fleet's gauges altogether.
        m.remove(state.current);
        if ever_connected {
            m.ever_connected.dec();
        }
    }
}

/// DPS registration, or registry creation; the hub and device id to connect as. The error is how
/// long to wait before trying again, and whether DPS refused the identity as unknown (its
/// enrollment is re-created on the next attempt).
async fn obtain(
    spec: &IdentitySpec,
    shared: &Shared,
    ensured: &mut bool,
    refusals: &mut Refusals,
    failures: u32,
) -> Result<(String, String), (Duration, bool)> {
    let m = &shared.metrics;
    let backoff = || full_jitter(shared.settings.backoff_base, shared.settings.backoff_cap, failures + 1);
    match &spec.credentials {
        Credentials::Dps { key, individual, transport, payload } => {
            if *individual && !*ensured {
                if let Some(s) = &shared.dps_service {
                    s.ensure_enrollment(&spec.device_id, key).await.map_err(|e| {
                        let f = failures::registry(format!("creating the individual enrollment: {e}"));
                        shared.failures.report(&spec.template, &spec.device_id, "enrollment", f);
                        (backoff(), false)
                    })?;
                }
                *ensured = true;
            }
            let ep = shared.target.dps.as_ref().expect("configuration checked that DPS is configured");
            let t0 = Instant::now();
            let result = match transport {
                DpsTransport::Https => {
                    dps::register_https(&shared.http, ep, &spec.device_id, key, payload.clone()).await
                }
                DpsTransport::Mqtt => {
                    dps::register_mqtt(shared.tls.clone(), ep, &spec.device_id, key, payload.clone()).await
                }
            };
            match result {
                Ok(a) => {
                    m.provisioned("assigned");
                    m.provision_seconds.observe(t0.elapsed().as_secs_f64());
                    Ok((a.assigned_hub, a.device_id))
                }
                Err(ProvisionError::Throttled { retry_after }) => {
                    m.provisioned("throttled");
                    Err((retry_after + Duration::from_millis(rand::random::<u64>() % 1000), false))
                }
                Err(e) if recovery::dps_forgot(&e) => {
                    m.provisioned("unauthorized");
                    let ProvisionError::Unauthorized(status, _) = &e else { unreachable!("dps_forgot") };
                    let f = failures::dps_status(*status, e.to_string());
                    shared.failures.report(&spec.template, &spec.device_id, "provisioning", f);
                    // An individual enrollment this fleet made can be made again (DPS forgot it,
                    // or someone deleted it); a group enrollment or a keys file cannot.
                    let reenroll = *individual && shared.dps_service.is_some();
                    let step = if reenroll { Step::Dps } else { Step::None };
                    refusals.rerun(m, &spec.device_id, spec.module_id.as_deref(), step, &e.to_string());
                    if reenroll {
                        *ensured = false;
                    }
                    Err((backoff(), reenroll))
                }
                Err(e) => {
                    let failure = match &e {
                        ProvisionError::Failed(_) => failures::dps_status(400, e.to_string()),
                        ProvisionError::Timeout => failures::network(format!("{e} (timeout)")),
                        _ => failures::network(e.to_string()),
                    };
                    shared.failures.report(&spec.template, &spec.device_id, "provisioning", failure);
                    m.provisioned("error");
                    Err((backoff(), false))
                }
            }
        }
        Credentials::Direct { key, parent_key } => {
            if !*ensured {
                if let Some(s) = &shared.service {
                    let r = match (&spec.module_id, parent_key) {
                        (Some(module), Some(parent)) => match shared.ensured.device(s, &spec.device_id, parent).await {
                            Ok(()) => s.ensure_module(&spec.device_id, module, key).await,
                            Err(e) => Err(e),
                        },
                        _ => shared.ensured.device(s, &spec.device_id, key).await,
                    };
                    r.map_err(|e| {
                        let f = failures::registry(format!("creating the identity: {e}"));
                        shared.failures.report(&spec.template, &spec.device_id, "identity", f);
                        (backoff(), false)
                    })?;
                }
                *ensured = true;
            }
            let host = shared.target.hub_host.clone().expect("configuration checked that the hub host is known");
            Ok((host, spec.device_id.to_string()))
        }
    }
}

/// The host and port an identity dials: the gateway (or emulator elsewhere) when there is one.
fn dial(spec: &IdentitySpec, shared: &Shared, host: &str) -> (String, u16) {
    let t = &shared.target;
    let port = if spec.transport == Transport::WebSockets { t.ws_port } else { t.mqtt_port };
    (t.gateway_host.clone().unwrap_or_else(|| host.to_owned()), port)
}

async fn connect(
    spec: &IdentitySpec,
    shared: &Shared,
    host: &str,
    device_id: &str,
    expiry: u64,
) -> Result<MqttConn, ConnectError> {
    let (dial_host, port) = dial(spec, shared, host);
    let ep = Endpoint { host: dial_host, port, websocket: spec.transport == Transport::WebSockets };
    let timeout = shared.settings.connect_timeout;
    let io = tokio::time::timeout(timeout, transport::open(&ep, shared.tls.clone()))
        .await
        .map_err(|_| ConnectError::Timeout)??;
    let module = spec.module_id.as_deref();
    let (client_id, resource) = match module {
        Some(m) => (format!("{device_id}/{m}"), format!("{host}/devices/{device_id}/modules/{m}")),
        None => (device_id.to_owned(), format!("{host}/devices/{device_id}")),
    };
    let password = sign_token(&resource, spec.key(), expiry, None);
    let username = hub_username(host, device_id, module, spec.model_id.as_deref());
    MqttConn::connect(io, &client_id, &username, &password, shared.settings.keep_alive, timeout).await
}

struct Session<'a> {
    conn: MqttConn,
    spec: &'a IdentitySpec,
    device_id: &'a str,
    shared: &'a Shared,
    next_rid: u64,
    /// Reported patches awaiting the hub's answer, by request id number (`r{n}`): ordered, so
    /// that what a lost connection leaves unconfirmed is sent again oldest first and an older
    /// writable acknowledgement cannot overwrite a newer one.
    reports: std::collections::BTreeMap<u64, Value>,
    /// Reported patches the hub throttled or failed, to send again at the given time, with the
    /// request number they were first sent under.
    report_retries: Vec<(Instant, u64, Value)>,
    /// For each reported property path (`reported::paths`), the request number of the latest
    /// patch that set it: a patch sent again loses the paths a newer one set since.
    latest_report: std::collections::HashMap<String, u64>,
    /// Reported patches failed in a row: the backoff's exponent.
    report_failures: u32,
    /// When to ask for the twin again after the hub failed the last GET.
    twin_retry: Option<Instant>,
    twin_failures: u32,
    /// Last time anything arrived: a silent hub is a dead connection.
    last_heard: Instant,
}

impl Session<'_> {
    fn report(&mut self, patch: Value) {
        self.next_rid += 1;
        for path in super::reported::paths(&patch) {
            self.latest_report.insert(path, self.next_rid);
        }
        let rid = format!("r{}", self.next_rid);
        self.conn.publish(topic::twin_patch_reported(&rid), patch.to_string(), QoS::AtLeastOnce);
        self.reports.insert(self.next_rid, patch);
    }

    /// What is left of patch number `n` once the paths a later patch set are taken out.
    fn still_current(&self, n: u64, patch: &Value) -> Option<Value> {
        super::reported::without(patch, |path| self.latest_report.get(path).is_some_and(|latest| *latest > n))
    }

    /// A retry delay for a throttled or failed twin request: full jitter, at least 100 ms.
    fn retry_delay(&self, attempt: u32) -> Duration {
        let s = &self.shared.settings;
        full_jitter(s.backoff_base, s.backoff_cap, attempt).max(Duration::from_millis(100))
    }

    /// Writes buffered telemetry while the in-flight window has room.
    fn pump(&mut self, carry: &mut Carry) {
        let m = &self.shared.metrics;
        let now = Instant::now();
        while let Some(msg) = carry.outbox.next_to_write(self.shared.settings.max_inflight) {
            let topic = topic::telemetry(self.device_id, self.spec.module_id.as_deref(), &msg.properties);
            let pkid = self.conn.publish(topic, msg.body.clone(), QoS::AtLeastOnce);
            if msg.written {
                m.telemetry_retransmits.inc();
            }
            m.telemetry_sent.inc();
            carry.outbox.written(pkid, msg, now);
        }
    }

    /// Queues what the agent asked for; a reboot ends the session.
    fn emit(&mut self, outs: Vec<Out>, carry: &mut Carry) -> Option<End> {
        let m = &self.shared.metrics;
        for o in outs {
            match o {
                Out::Telemetry { properties, body } => carry.enqueue(self.shared, properties, body),
                Out::Report(patch) => self.report(patch),
                Out::MethodResponse { rid, status, payload } => {
                    self.conn.publish(topic::method_response(status, &rid), payload, QoS::AtLeastOnce);
                }
                Out::CommandRan { name, status } => {
                    tracing::info!(device = %self.spec.device_id, module = ?self.spec.module_id, command = %name, status, "command");
                    m.command(&name, status)
                }
                Out::Acked { status, latency } => {
                    m.writable_ack(status);
                    m.writable_ack_seconds.observe(latency.as_secs_f64());
                }
                Out::Filtered => m.telemetry_filtered.inc(),
                Out::Reboot { downtime, method, answer } => return Some(End::Reboot { downtime, method, answer }),
            }
        }
        self.pump(carry);
        None
    }

    fn on_packet(&mut self, p: Packet, agent: &mut Agent, carry: &mut Carry) -> Option<End> {
        let m = &self.shared.metrics;
        let now = Instant::now();
        match p {
            Packet::PubAck(a) => {
                if let Some(sent) = carry.outbox.acked(a.pkid) {
                    m.telemetry_acked.inc();
                    m.telemetry_queued.dec();
                    m.puback_seconds.observe(sent.elapsed().as_secs_f64());
                    self.pump(carry);
                }
                None
            }
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
                let outs = match CloudPublish::parse(&p.topic) {
                    Ok(CloudPublish::TwinResponse { status, rid, .. }) if rid == "get" => {
                        m.twin("get", status);
                        match serde_json::from_slice::<Value>(&p.payload) {
                            Ok(twin) if status == 200 => {
                                self.twin_failures = 0;
                                agent.on_twin(&twin, now)
                            }
                            _ => {
                                // Without its twin the device cannot catch up on desired properties.
                                self.twin_failures += 1;
                                self.twin_retry = Some(now + self.retry_delay(self.twin_failures));
                                Vec::new()
                            }
                        }
                    }
                    Ok(CloudPublish::TwinResponse { status, rid, .. }) => {
                        m.twin("patch_reported", status);
                        let n = rid.strip_prefix('r').and_then(|n| n.parse::<u64>().ok());
                        match n.and_then(|n| self.reports.remove(&n)) {
                            Some(patch) if status == 429 || status >= 500 => {
                                self.report_failures += 1;
                                let at = now + self.retry_delay(self.report_failures);
                                self.report_retries.push((at, n.unwrap_or_default(), patch));
                            }
                            // Accepted, or refused for good (a 4xx other than 429: retrying cannot help).
                            Some(_) => self.report_failures = 0,
                            None => {}
                        }
                        Vec::new()
                    }
                    Ok(CloudPublish::DesiredPatch { version }) => {
                        m.desired_patches.inc();
                        match serde_json::from_slice::<Value>(&p.payload) {
                            Ok(patch) => {
                                let v = version.or_else(|| patch.get("$version").and_then(Value::as_u64)).unwrap_or(0);
                                agent.on_desired(&patch, v, now, false)
                            }
                            Err(_) => Vec::new(),
                        }
                    }
                    Ok(CloudPublish::MethodRequest { name, rid }) => {
                        agent.on_method(&name, Some(&rid), &p.payload, now)
                    }
                    Ok(CloudPublish::C2d { properties, .. }) => {
                        m.c2d_received.inc();
                        agent.on_c2d(&properties, &p.payload, now)
                    }
                    _ => Vec::new(),
                };
                self.emit(outs, carry)
            }
            _ => None,
        }
    }

    /// Sends what is queued, then waits up to the grace period for outstanding PUBACKs.
    async fn drain(&mut self, agent: &mut Agent, carry: &mut Carry) {
        let deadline = Instant::now() + self.shared.settings.shutdown_grace;
        while !carry.outbox.is_empty() {
            self.pump(carry);
            if tokio::time::timeout_at(deadline, self.conn.flush()).await.map_or(true, |r| r.is_err()) {
                return;
            }
            while let Ok(Some(p)) = self.conn.next_packet() {
                if let Packet::PubAck(_) = p {
                    self.on_packet(p, agent, carry);
                }
            }
            if carry.outbox.is_empty() {
                break;
            }
            match tokio::time::timeout_at(deadline, self.conn.fill()).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => break,
            }
        }
    }

    /// Hands what must outlive this connection back to the identity.
    fn close(&mut self, carry: &mut Carry) {
        carry.outbox.connection_lost();
        // Oldest first, each without what a newer patch set since, so that sending them again on
        // the next connection cannot undo a newer report.
        let mut pending: Vec<(u64, Value)> = std::mem::take(&mut self.reports).into_iter().collect();
        pending.extend(self.report_retries.drain(..).map(|(_, n, p)| (n, p)));
        pending.sort_by_key(|(n, _)| *n);
        carry.reports.extend(pending.into_iter().filter_map(|(n, p)| self.still_current(n, &p)));
    }
}

/// When a session must end: at token renewal, or when the identity is told to stop.
struct Until<'a> {
    renew_at: Instant,
    cancel: &'a CancellationToken,
}

async fn session(
    conn: MqttConn,
    spec: &IdentitySpec,
    device_id: &str,
    shared: &Shared,
    agent: &mut Agent,
    carry: &mut Carry,
    until: Until<'_>,
) -> End {
    let Until { renew_at, cancel } = until;
    let mut s = Session {
        conn,
        spec,
        device_id,
        shared,
        next_rid: 0,
        reports: Default::default(),
        report_retries: Vec::new(),
        latest_report: Default::default(),
        report_failures: 0,
        twin_retry: None,
        twin_failures: 0,
        last_heard: Instant::now(),
    };
    let module = spec.module_id.as_deref();
    let mut filters = vec![Filter::Methods, Filter::TwinResponses, Filter::TwinDesired];
    if module.is_none() {
        filters.push(Filter::C2d);
    }
    let mut sub =
        Subscribe::new_many(filters.iter().map(|f| SubscribeFilter::new(f.text(device_id, module), QoS::AtLeastOnce)));
    sub.pkid = s.conn.pkid();
    s.conn.queue(Packet::Subscribe(sub));
    s.conn.publish(topic::twin_get("get"), " ", QoS::AtLeastOnce);
    for patch in std::mem::take(&mut carry.reports) {
        s.report(patch);
    }
    let startup = agent.startup();
    let held = std::mem::take(&mut carry.after_connect);
    if let Some(end) = s.emit(startup, carry).or_else(|| s.emit(held, carry)) {
        s.close(carry);
        return end;
    }
    agent.on_connected(Instant::now());
    let keep_alive = Duration::from_secs(shared.settings.keep_alive.max(1) as u64);
    let mut next_ping = Instant::now() + keep_alive;
    // Silence this long means the connection is dead: the hub answers every PINGREQ.
    let silence_limit = keep_alive * 3 / 2;
    let (end, polite) = 'session: loop {
        let now = Instant::now();
        if let Some(end) = s.emit(agent.on_tick(now), carry) {
            let _ = s.conn.flush().await;
            break (end, true);
        }
        if now >= renew_at {
            s.drain(agent, carry).await;
            break (End::Renew, true);
        }
        if now >= next_ping {
            s.conn.queue(Packet::PingReq);
            next_ping = now + keep_alive;
        }
        if now >= s.last_heard + silence_limit {
            break (End::Lost("keepalive_timeout"), false);
        }
        if s.twin_retry.is_some_and(|at| now >= at) {
            s.twin_retry = None;
            s.conn.publish(topic::twin_get("get"), " ", QoS::AtLeastOnce);
        }
        if s.report_retries.iter().any(|(at, _, _)| now >= *at) {
            let (mut due, later): (Vec<_>, Vec<_>) = s.report_retries.drain(..).partition(|(at, _, _)| now >= *at);
            s.report_retries = later;
            due.sort_by_key(|(_, n, _)| *n);
            for (_, n, patch) in due {
                if let Some(patch) = s.still_current(n, &patch) {
                    s.report(patch);
                }
            }
        }
        if s.conn.flush().await.is_err() {
            break (End::Lost("connection_lost"), false);
        }
        let deadline = [
            agent.next_deadline(),
            Some(next_ping),
            Some(renew_at),
            Some(s.last_heard + silence_limit),
            s.twin_retry,
            s.report_retries.iter().map(|(at, _, _)| *at).min(),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("the ping deadline is always there");
        tokio::select! {
            r = s.conn.fill() => match r {
                Ok(0) | Err(_) => break (End::Lost("connection_lost"), false),
                Ok(_) => {
                    s.last_heard = Instant::now();
                    loop {
                        match s.conn.next_packet() {
                            Ok(Some(p)) => {
                                if let Some(end) = s.on_packet(p, agent, carry) {
                                    let _ = s.conn.flush().await;
                                    break 'session (end, true);
                                }
                            }
                            Ok(None) => break,
                            Err(_) => break 'session (End::Lost("protocol_error"), false),
                        }
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline) => {}
            _ = cancel.cancelled() => {
                s.drain(agent, carry).await;
                break (End::Shutdown, true);
            }
        }
    };
    s.close(carry);
    if polite {
        s.conn.disconnect().await;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_under_a_cap() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(60));
        for attempt in 0..30 {
            let d = full_jitter(base, cap, attempt);
            assert!(d <= cap.min(base * 2u32.pow(attempt.min(6))), "{attempt}: {d:?}");
        }
    }
}
