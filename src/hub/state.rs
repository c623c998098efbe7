//! The hub's shared state and the operations that cut across its parts: finding policies,
//! deleting identities (which closes their connections), pushing desired patches and C2D
//! messages to live sessions. The MQTT and HTTPS front ends both call into this.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio_util::sync::CancellationToken;

use super::config::{EnrollmentSpec, HubBehaviour, HubConfig};
use super::dps::{Dps, GroupEnrollment, IndividualEnrollment};
use super::feedback::Status;
use super::methods::Methods;
use super::metrics::HubMetrics;
use super::registry::{Identity, IdentityState, Registry};
use super::secrets::{DEFAULT_GROUP, POLICIES, Permissions, Secrets};
use super::session::{CloseReason, Outbound};
use super::twin_doc::DesiredChange;
use crate::iot::sas::Key;
use crate::iot::topic;

/// The Event Hub-compatible name of the built-in endpoint: the hub's name, the first label of its
/// host name (Azure: "Event Hub-compatible name" defaults to the IoT hub's name).
pub fn eventhub_name(hostname: &str) -> String {
    hostname.split('.').next().unwrap_or(hostname).to_owned()
}

/// A shared access policy with its decoded keys.
pub struct Policy {
    pub name: &'static str,
    pub keys: [Key; 2],
    pub permissions: Permissions,
}

pub struct HubState {
    pub hostname: String,
    /// Every name tokens and usernames may use for this hub (the hostname first).
    pub hostnames: Vec<String>,
    pub behaviour: HubBehaviour,
    pub policies: Vec<Policy>,
    pub registry: Arc<Registry>,
    pub dps: Arc<Dps>,
    /// The CA certificates uploaded to the hub; the verified ones authenticate
    /// `certificateAuthority` devices.
    pub ca_certs: Arc<super::ca_certs::CaCerts>,
    /// Where changes are made durable before they are acknowledged (`store/`).
    pub store: super::store::Store,
    pub methods: Methods,
    pub metrics: HubMetrics,
    pub secrets: Secrets,
    pub faults: super::faults::Faults,
    /// The built-in Event Hubs-compatible endpoint every transport's telemetry is appended to.
    pub eventhub: Arc<super::eventhub::EventHub>,
    /// Appends the hub's non-telemetry events (twin changes, lifecycle, connection state) to it.
    pub events: super::events::Emitter,
    /// C2D feedback records waiting for the service (`/messages/servicebound/feedback`).
    pub feedback: super::feedback::FeedbackQueue,
    /// The DPS assignment delay the configuration set, restored when a fault override is lifted.
    configured_assignment_delay: Duration,
    next_conn_id: AtomicU64,
    /// Cancelled when the hub stops; connection tasks close with `Shutdown`.
    pub shutdown: CancellationToken,
    /// Every connection task, so that shutdown can wait for them to finish closing.
    pub tasks: tokio_util::task::TaskTracker,
    /// Open connections across every listener, bounded by `behaviour.max_connections`.
    pub connections: crate::httpserve::ConnectionBound,
    /// Rate-limits the warning for connections turned away at that bound.
    pub connection_refusals: crate::httpserve::RefusalLog,
    /// Checks devices against their models, when a model directory is configured.
    pub model_check: Option<super::model_check::ModelCheck>,
    /// Each Edge device's routes, read from its `$edgeHub` twin.
    pub edge: super::edge_routes::EdgeRoutes,
}

impl HubState {
    /// A hub that keeps nothing on disk (unit tests, fuzzing).
    pub fn new(config: &HubConfig, secrets: Secrets) -> anyhow::Result<HubState> {
        HubState::open(config, secrets, None)
    }

    /// A hub whose state is loaded from and kept in the store in `store_dir` (`None`: in memory).
    /// The default group and the configuration's enrollments are put after the store is loaded:
    /// what the configuration says at start wins over what an earlier run stored for those ids.
    pub fn open(config: &HubConfig, secrets: Secrets, store_dir: Option<&std::path::Path>) -> anyhow::Result<HubState> {
        let key =
            |b64: &str, what: &str| Key::from_base64(b64).map_err(|_| anyhow::anyhow!("{what} is not valid base64"));
        let mut policies = Vec::new();
        for (name, permissions) in POLICIES {
            let pair = &secrets.policies[name];
            policies.push(Policy { name, keys: [key(&pair.primary, name)?, key(&pair.secondary, name)?], permissions });
        }
        let b = &config.behaviour;
        let dps = Arc::new(Dps::new(
            secrets.id_scope.clone(),
            config.hostname.clone(),
            b.dps_retry_after_secs,
            Duration::from_millis(b.dps_assignment_delay_ms),
            b.sas_skew_secs,
        ));
        let registry = Arc::new(Registry::default());
        let eventhub = Arc::new(super::eventhub::EventHub::new(
            eventhub_name(&config.hostname),
            b.eventhub_partitions,
            super::eventhub::Retention {
                events: b.eventhub_retention_events,
                bytes: b.eventhub_retention_bytes,
                age: Duration::from_secs(b.eventhub_retention_secs),
            },
            super::clock::wall(),
        ));
        let feedback = super::feedback::FeedbackQueue::default();
        let ca_certs = Arc::new(super::ca_certs::CaCerts::default());
        let store = match store_dir {
            Some(dir) => super::store::Store::open(
                dir,
                super::store::Parts {
                    registry: &registry,
                    dps: &dps,
                    eventhub: &eventhub,
                    feedback: &feedback,
                    ca_certs: &ca_certs,
                    keep_events: b.eventhub_durable,
                },
            )?,
            None => super::store::Store::in_memory(),
        };
        dps.put_group(GroupEnrollment {
            group_id: DEFAULT_GROUP.into(),
            keys: [
                key(&secrets.default_group.primary, "group key")?,
                key(&secrets.default_group.secondary, "group key")?,
            ],
            enabled: true,
            etag: 1,
        });
        for e in &config.enrollments {
            let pair = |p: &Option<String>, s: &Option<String>| -> anyhow::Result<[Key; 2]> {
                Ok([
                    p.as_deref().map(|k| key(k, "enrollment key")).transpose()?.unwrap_or_else(Key::generate),
                    s.as_deref().map(|k| key(k, "enrollment key")).transpose()?.unwrap_or_else(Key::generate),
                ])
            };
            match e {
                EnrollmentSpec::Individual { registration_id, device_id, primary_key, secondary_key } => dps
                    .put_individual(IndividualEnrollment {
                        registration_id: registration_id.clone(),
                        device_id: device_id.clone(),
                        keys: pair(primary_key, secondary_key)?,
                        enabled: true,
                        etag: 1,
                    }),
                EnrollmentSpec::Group { group_id, primary_key, secondary_key } => dps.put_group(GroupEnrollment {
                    group_id: group_id.clone(),
                    keys: pair(primary_key, secondary_key)?,
                    enabled: true,
                    etag: 1,
                }),
            }
        }
        let switches = super::events::Switches {
            twin_changes: b.eventhub_twin_change_events,
            lifecycle: b.eventhub_device_lifecycle_events,
            connection_state: b.eventhub_connection_state_events,
        };
        let events =
            super::events::Emitter::new(eventhub.clone(), eventhub.name.clone(), switches, super::clock::wall());
        let on_created = events.clone();
        registry.on_created(move |identity, st| on_created.lifecycle(identity, st, true, super::clock::wall()));
        let state = HubState {
            hostname: config.hostname.clone(),
            hostnames: config.all_hostnames(),
            behaviour: config.behaviour.clone(),
            policies,
            registry,
            dps,
            ca_certs,
            store,
            methods: Methods::default(),
            metrics: HubMetrics::default(),
            secrets,
            faults: super::faults::Faults::new(config.faults.clone()),
            eventhub,
            events,
            feedback,
            configured_assignment_delay: Duration::from_millis(b.dps_assignment_delay_ms),
            next_conn_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
            connections: crate::httpserve::ConnectionBound::new(b.max_connections),
            connection_refusals: Default::default(),
            model_check: config.models_dir.clone().map(super::model_check::ModelCheck::new),
            edge: super::edge_routes::EdgeRoutes::default(),
        };
        state.set_faults(config.faults.clone());
        Ok(state)
    }

    /// Replaces the fault settings, applying the ones other parts hold (the DPS delay).
    pub fn set_faults(&self, c: super::faults::FaultConfig) {
        self.dps.set_assignment_delay(
            c.dps_assignment_delay_ms.map_or(self.configured_assignment_delay, Duration::from_millis),
        );
        self.faults.set(c);
    }

    /// Closes about `fraction` of the live device and module connections (all of them at 1.0),
    /// as an injected fault. Returns how many were told to close.
    pub fn drop_connections(&self, fraction: f64) -> usize {
        let mut n = 0;
        for identity in self.registry.all() {
            let st = identity.lock();
            if let Some(s) = &st.session
                && (fraction >= 1.0 || rand::random::<f64>() < fraction)
                && s.send(Outbound::Close(CloseReason::FaultInjected))
            {
                n += 1;
            }
        }
        self.metrics.faults_injected.with_label_values(&["drop"]).inc_by(n as u64);
        n
    }

    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }

    /// Whether `host` (with or without a port) names this hub.
    pub fn is_our_host(&self, host: &str) -> bool {
        let bare = match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        self.hostnames.iter().any(|h| h.eq_ignore_ascii_case(bare))
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Deletes a device (with its modules) or a module, closing their connections; each removed
    /// identity is a lifecycle event.
    pub fn remove_identity(&self, device_id: &str, module_id: Option<&str>) -> bool {
        let removed = self.registry.remove(device_id, module_id);
        for identity in &removed {
            let mut st = identity.lock();
            self.events.lifecycle(identity, &st, false, super::clock::wall());
            st.removed = true;
            if let Some(s) = st.session.take() {
                s.send(Outbound::Close(CloseReason::IdentityRemoved));
            }
            drop(st);
            self.store.identity(identity);
            identity.changed.notify_waiters();
        }
        self.refresh_identity_gauges();
        !removed.is_empty()
    }

    /// Sets the identity gauges from the registry's counts (constant time: called on every
    /// registry write).
    pub fn refresh_identity_gauges(&self) {
        let (devices, modules) = self.registry.counts();
        self.metrics.identities.with_label_values(&["device"]).set(devices as i64);
        self.metrics.identities.with_label_values(&["module"]).set(modules as i64);
    }

    /// Queues for the store what a DPS register or assignment changed: the registration and the
    /// device it assigned (created or re-keyed).
    pub fn store_registration(&self, att: &super::dps::Attestation) {
        self.store.registration(&att.registration_id);
        if let Some(device) = self.registry.get(&att.device_id, None) {
            self.store.identity(&device);
        }
    }

    /// Sends a desired-property change to the identity's session, if it subscribed to them.
    pub fn notify_desired(&self, st: &IdentityState, change: &DesiredChange) {
        if let Some(s) = &st.session {
            let payload = Bytes::from(change.patch.to_string());
            s.publish_to(s.subs.twin_desired, topic::desired_patch(change.version), payload, QoS::AtLeastOnce);
        }
    }

    /// A C2D message of device `device_id` (state `st`) reached its end with `status`: queues the
    /// feedback record its sender asked for, if any (`feedback.rs`).
    pub fn c2d_outcome(&self, device_id: &str, st: &IdentityState, m: &super::c2d::C2dMessage, status: Status) {
        if status.wanted_by(m.ack()) {
            let pending = self.feedback.push(super::feedback::Record {
                original_message_id: m.message_id().to_owned(),
                device_id: device_id.to_owned(),
                device_generation_id: st.record.generation_id.clone(),
                at: super::clock::wall(),
                status,
            });
            // Queued before the caller queues the message's own change, so a crash between the
            // two commits can repeat a record but never lose one.
            self.store.feedback(pending);
        }
    }

    /// Counts C2D messages dropped from device `device_id`'s queue (expired, or past the maximum
    /// delivery count) and queues the feedback their senders asked for.
    pub fn count_c2d_dropped(&self, device_id: &str, st: &IdentityState, dropped: Vec<super::c2d::Dropped>) {
        use super::c2d::DropReason;
        for d in dropped {
            let (metric, status) = match d.why {
                DropReason::Expired => ("expired", Status::Expired),
                DropReason::DeliveryCountExceeded => ("dead_lettered", Status::DeliveryCountExceeded),
            };
            self.metrics.c2d(metric);
            self.c2d_outcome(device_id, st, &d.message, status);
        }
    }

    /// C2D messages a live MQTT connection `conn_id` should now receive (after dropping the
    /// expired and the over-delivered, counted).
    pub fn c2d_deliverable(
        &self,
        device_id: &str,
        st: &mut IdentityState,
        conn_id: u64,
    ) -> Vec<super::c2d::C2dMessage> {
        let mut dropped = Vec::new();
        let out =
            st.c2d.take_deliverable(conn_id, self.behaviour.c2d_max_delivery_count, super::clock::now(), &mut dropped);
        self.count_c2d_dropped(device_id, st, dropped);
        out
    }

    /// Expires every queued C2D message whose time has come, so that its sender's `Expired`
    /// feedback does not wait for the device to come back (see `c2d_expiry`).
    pub fn expire_c2d(&self) {
        let now = super::clock::now();
        for identity in self.registry.all() {
            let mut st = identity.lock();
            if st.c2d.is_empty() {
                continue;
            }
            let mut dropped = Vec::new();
            st.c2d.expire(now, &mut dropped);
            if !dropped.is_empty() {
                // The queue changed; nobody waits for it, but a restart must not bring them back.
                self.store.identity(&identity);
            }
            self.count_c2d_dropped(&identity.device_id, &st, dropped);
        }
    }

    /// Queues a C2D message for `identity` (what every service-side sender calls: the emulator's
    /// REST route, AMQP's `/messages/devicebound`), counts it and pushes it to a live MQTT
    /// session. Refuses a body over `c2d::MAX_C2D_BODY` and a full queue
    /// (`behaviour.c2d_max_queue`). Returns the message id.
    pub fn send_c2d(
        &self,
        identity: &Arc<Identity>,
        message: super::c2d::NewC2d,
    ) -> Result<String, super::c2d::C2dError> {
        if message.body.len() > super::c2d::MAX_C2D_BODY {
            return Err(super::c2d::C2dError::TooLarge);
        }
        let mut st = identity.lock();
        let b = &self.behaviour;
        let id = st.c2d.enqueue(
            &identity.device_id,
            message,
            b.c2d_max_queue,
            Duration::from_secs(b.c2d_ttl_secs),
            super::clock::now(),
            super::clock::wall(),
        )?;
        self.metrics.c2d("sent");
        self.push_c2d(identity, &mut st);
        self.store.identity(identity);
        Ok(id)
    }

    /// Pushes pending C2D messages to a device's live, subscribed session.
    pub fn push_c2d(&self, identity: &Identity, st: &mut IdentityState) {
        let module = identity.module_id.is_some();
        let Some((conn_id, granted)) = st.session.as_ref().and_then(|s| s.subs.queue(module).map(|q| (s.conn_id, q)))
        else {
            return;
        };
        for m in self.c2d_deliverable(&identity.device_id, st, conn_id) {
            let qos = super::session::cap_qos(QoS::AtLeastOnce, granted);
            let sent = st.session.as_ref().is_some_and(|s| {
                s.send(Outbound::Publish {
                    topic: m.topic(&identity.device_id, identity.module_id.as_deref()),
                    payload: m.body.clone(),
                    qos,
                    c2d_id: Some(m.id),
                })
            });
            if sent {
                self.metrics.c2d("delivered");
                if qos == QoS::AtMostOnce && st.c2d.complete(m.id).is_some() {
                    self.c2d_outcome(&identity.device_id, st, &m, Status::Success);
                }
            }
        }
    }
}

/// Convenience for handlers holding an `Arc`.
pub type Hub = Arc<HubState>;

/// Expires queued C2D messages once a second until the hub stops (their `Expired` feedback).
pub async fn c2d_expiry(hub: Hub) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = hub.shutdown.cancelled() => return,
        }
        hub.expire_c2d();
    }
}

/// Fires the scheduled faults (drops, storms, outages) once a second until the hub stops.
pub async fn fault_schedule(hub: Hub) {
    use super::faults::{Scheduled, due};
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut elapsed = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = hub.shutdown.cancelled() => return,
        }
        for action in due(&hub.faults.get(), elapsed) {
            match action {
                Scheduled::Drop(fraction) => {
                    let n = hub.drop_connections(fraction);
                    tracing::info!(connections = n, "fault: dropped connections");
                }
                Scheduled::Storm => {
                    let n = hub.drop_connections(1.0);
                    tracing::info!(connections = n, "fault: reconnect storm");
                }
                Scheduled::Outage(d) => {
                    hub.faults.start_outage(d);
                    hub.metrics.faults_injected.with_label_values(&["outage"]).inc();
                    tracing::info!(seconds = d.as_secs(), "fault: refusing connections");
                }
            }
        }
        elapsed += 1;
    }
}
