//! One identity's task: get credentials (`credentials`), wait for a ramp slot, open a link for
//! its transport (`link/`), run the session (`session`) until something ends it, then come
//! back: at once to renew the token, after the downtime for a reboot, after exponential backoff
//! with full jitter otherwise, and through its credential step again when the hub refuses it as
//! unknown (`recovery`). The identity's state lives in its `Core`, which outlives connections:
//! nothing is lost silently, and with the `drop_oldest` policy readings keep being generated
//! while offline.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::behaviour::Agent;
use super::core::{Core, Ctx, End, full_jitter};
use super::credentials::obtain;
use super::edge::EdgeRole;
use super::link::OpenError;
use super::link::https::HttpsLink;
use super::link::mqtt::MqttLink;
use super::outbox::{OfflinePolicy, Outbox};
use super::recovery::{self, Refusals, Step};
use super::session::{self, Until};
use super::spec::{Credentials, IdentitySpec, Shared};
use super::view::{Control, DeviceView};
use crate::client::https::DeviceHttp;
use crate::client::mqtt::{ConnectError, MqttConn};
use crate::client::transport::{self, Endpoint};
use crate::iot::sas::sign_token;
use crate::iot::time::unix_secs;
use crate::iot::username::hub_username;
use crate::metrics::{DeviceState, FleetMetrics};
use crate::scenario::model::Transport;

/// Sleeps unless the identity is stopping; false when it is.
async fn pause(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = cancel.cancelled() => false,
    }
}

struct StateTracker<'a> {
    metrics: &'a FleetMetrics,
    view: Option<&'a DeviceView>,
    current: DeviceState,
}

impl StateTracker<'_> {
    fn to(&mut self, s: DeviceState) {
        if s != self.current {
            self.metrics.transition(Some(self.current), s);
            if let Some(v) = self.view {
                v.set_state(s);
            }
            self.current = s;
        }
    }
}

/// The console's view of `spec`, registered with the fleet's views (when the fleet keeps them).
fn make_view(spec: &IdentitySpec, shared: &Shared) -> Option<Arc<DeviceView>> {
    let views = shared.views.as_ref()?;
    let credentials = match &spec.credentials {
        Credentials::Dps { individual: true, .. } => "dps-individual",
        Credentials::Dps { .. } => "dps-group",
        Credentials::Direct { .. } => "registry",
    };
    let transport = match spec.transport {
        Transport::Mqtt => "mqtt",
        Transport::WebSockets => "mqtt-ws",
        Transport::Https { .. } => "https",
    };
    let v = Arc::new(DeviceView::new(
        spec.device_id.clone(),
        spec.module_id.clone(),
        spec.template.clone(),
        credentials,
        transport,
    ));
    v.set_state(DeviceState::Provisioning);
    views.insert(v.clone());
    Some(v)
}

impl Shared {
    /// What the core reads of the fleet.
    pub fn ctx(&self) -> Ctx<'_> {
        Ctx {
            metrics: &self.metrics,
            settings: &self.settings,
            run_id: &self.run_id,
            quiesce: &self.quiesce,
            inboxes: &self.edge_inboxes,
        }
    }
}

/// Runs `fut` (a backoff, a ramp slot, a connect) while the identity is offline. Under the
/// `drop_oldest` policy the device keeps taking readings on its schedule meanwhile, into the
/// outbox (`Core::tick_offline`).
async fn offline<F: std::future::Future>(fut: F, generate: bool, core: &mut Core, ctx: Ctx<'_>) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    if !generate {
        return fut.await;
    }
    loop {
        let next = core.next_deadline_offline();
        tokio::select! {
            r = &mut fut => return r,
            _ = crate::sys::sleep_until_opt(next) => core.tick_offline(ctx, Instant::now()),
        }
    }
}

/// An open link, whichever the transport. The HTTPS link (and below, its session) is boxed so
/// that the far more common MQTT identity's task is not sized for it.
enum Opened {
    Mqtt(MqttLink),
    Https(Box<HttpsLink>),
}

/// Runs one identity until `cancel` fires (the fleet stops, or a reload removes the identity).
pub async fn run(spec: IdentitySpec, shared: Arc<Shared>, cancel: CancellationToken) {
    let m = &shared.metrics;
    let ctx = shared.ctx();
    m.transition(None, DeviceState::Provisioning);
    let view = make_view(&spec, &shared);
    let mut state = StateTracker { metrics: m, view: view.as_deref(), current: DeviceState::Provisioning };
    let agent =
        Agent::new(spec.behaviour.clone(), spec.device_id.clone(), spec.module_id.clone(), spec.n, Instant::now());
    let mut core = Core::new(agent, Outbox::new(shared.settings.offline_policy, shared.settings.buffer));
    if let Some(v) = &view {
        core.observe(v.clone());
    }
    // A module of an Edge device the fleet routes for: its messages go by the routes, and what
    // the routes deliver to it arrives in its inbox (`device::edge`).
    let fleet_routes = spec.fleet_routes(shared.edge_routing);
    let mut inbox = None;
    if let (true, Some(plan), Some(module)) = (fleet_routes, &spec.edge, &spec.module_id) {
        inbox = (!spec.behaviour.inputs.is_empty()).then(|| shared.edge_inboxes.register(&spec.device_id, module));
        let role =
            EdgeRole { device_id: spec.device_id.clone(), module_id: module.clone(), routes: plan.routes.clone() };
        core.route_as_edge(role, inbox.clone());
    }
    let mut hub: Option<(String, String)> = None;
    let mut ensured = false;
    let mut failures = 0u32;
    let mut refusals = Refusals::default();
    let mut ever_connected = false;
    let cancel = &cancel;
    // Readings continue offline only once the device has been up (its schedule has started).
    let generate_offline = |ever: bool| ever && shared.settings.offline_policy == OfflinePolicy::DropOldest;
    let backoff = |failures: u32| full_jitter(shared.settings.backoff_base, shared.settings.backoff_cap, failures);
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
                &mut core,
                ctx,
            )
            .await;
            match obtained {
                Ok(h) => hub = Some(h),
                Err((wait, forgotten)) => {
                    if forgotten {
                        // Re-enrolled: whatever twin the device had is gone with its registration.
                        core.forget_twin();
                    }
                    failures += 1;
                    state.to(DeviceState::Backoff);
                    if !offline(pause(wait, cancel), gen_off, &mut core, ctx).await {
                        break;
                    }
                    continue;
                }
            }
        }
        state.to(DeviceState::Connecting);
        if !offline(shared.ramp.acquire(cancel), gen_off, &mut core, ctx).await {
            break;
        }
        let Some((host, device_id)) = hub.clone() else { continue };
        let t0 = Instant::now();
        let ttl = shared.settings.token_ttl;
        let expiry = unix_secs(SystemTime::now()) + ttl.as_secs();
        let renew_at = t0 + ttl.mul_f64(shared.settings.renew_at * (1.0 - 0.1 * rand::random::<f64>()));
        let connected =
            offline(Box::pin(connect(&spec, &shared, &host, &device_id, expiry)), gen_off, &mut core, ctx).await;
        // Why the hub refused the identity's credentials, when it did.
        let refused: Option<String>;
        let wait = match connected {
            Ok(link) => {
                m.connect_attempt("ok");
                m.connect_seconds.observe(t0.elapsed().as_secs_f64());
                failures = 0;
                if !ever_connected {
                    ever_connected = true;
                    m.connected_first_time();
                }
                state.to(DeviceState::Connected);
                // The console can end this connection (a disconnect or a reboot it asks for).
                let conn_end = cancel.child_token();
                if let Some(v) = &view {
                    v.online(conn_end.clone());
                }
                let until = Until { renew_at, cancel: &conn_end, grace: shared.settings.shutdown_grace };
                let end = match link {
                    Opened::Mqtt(l) => session::run(l, &mut core, ctx, until).await,
                    Opened::Https(l) => Box::pin(session::run(*l, &mut core, ctx, until)).await,
                };
                let asked = view.as_ref().and_then(|v| v.offline());
                match end {
                    End::Shutdown if cancel.is_cancelled() => break,
                    End::Shutdown => match asked {
                        Some(Control::Reboot(downtime)) => {
                            tracing::info!(device = %spec.device_id, downtime_secs = downtime.as_secs_f64(), "rebooting (console)");
                            state.to(DeviceState::Rebooting);
                            m.reconnect("console_reboot");
                            if !pause(downtime, cancel).await {
                                break;
                            }
                            continue;
                        }
                        _ => {
                            tracing::info!(device = %spec.device_id, "disconnected (console)");
                            m.reconnect("console_disconnect");
                            failures = 1;
                            refused = None;
                        }
                    },
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
                        core.rebooted(&method, answer);
                        continue;
                    }
                    End::Lost(cause) => {
                        m.reconnect(cause);
                        failures = 1;
                        refused = None;
                    }
                    End::Refused(why) => {
                        m.reconnect("refused");
                        let (host, port) = dial(&spec, &shared, &host);
                        let failure = super::failures::hub_status(401, format!("{host}:{port}: {why}"));
                        shared.failures.report(&spec.template, &spec.device_id, "connect", failure);
                        failures = 1;
                        refused = Some(why);
                    }
                }
                backoff(failures)
            }
            Err(e) => {
                m.connect_attempt(e.outcome());
                let (host, port) = dial(&spec, &shared, &host);
                shared.failures.report(
                    &spec.template,
                    &spec.device_id,
                    "connect",
                    e.failure(&format!("{host}:{port}")),
                );
                failures += 1;
                refused = recovery::hub_forgot(&e).then(|| e.to_string());
                backoff(failures)
            }
        };
        if let Some(why) = refused {
            // The hub no longer takes this identity's key (it restarted with an empty registry,
            // or the device was deleted): the same key can never succeed, so the credential
            // step runs again after the backoff.
            let step = match &spec.credentials {
                Credentials::Dps { .. } => Step::Dps,
                Credentials::Direct { .. } if shared.service.is_some() => Step::Registry,
                Credentials::Direct { .. } => Step::None,
            };
            refusals.rerun(m, &spec.device_id, spec.module_id.as_deref(), step, &why);
            if step != Step::None {
                hub = None;
                ensured = false;
                // The fleet-wide record would skip the device write the hub now needs.
                shared.ensured.forget(&spec.device_id);
                // A re-created identity has a new twin, whose desired versions start over.
                core.forget_twin();
            }
        }
        state.to(DeviceState::Backoff);
        if !offline(pause(wait, cancel), generate_offline(ever_connected), &mut core, ctx).await {
            break;
        }
    }
    core.abandon(m);
    if let (Some(i), Some(module)) = (&inbox, &spec.module_id) {
        shared.edge_inboxes.unregister(&spec.device_id, module, i);
    }
    if shared.shutdown.is_cancelled() {
        state.to(DeviceState::Stopped);
    } else {
        if let (Some(views), Some(v)) = (&shared.views, &view) {
            views.remove(v);
        }
        // A reload removed this identity: it leaves the fleet's gauges altogether.
        m.remove(state.current);
        if ever_connected {
            m.ever_connected.dec();
        }
    }
}

/// The host and port an identity dials: the gateway if there is one, else the hub; 8883 for
/// MQTT, 443 for WebSockets and HTTPS (or the configured ports).
fn dial(spec: &IdentitySpec, shared: &Shared, host: &str) -> (String, u16) {
    let t = &shared.endpoints;
    let port = match spec.transport {
        Transport::Mqtt => t.mqtt_port,
        Transport::WebSockets | Transport::Https { .. } => t.https_port,
    };
    (t.gateway_host.clone().unwrap_or_else(|| host.to_owned()), port)
}

/// Opens the identity's link with a token valid until `expiry` (Unix seconds).
async fn connect(
    spec: &IdentitySpec,
    shared: &Shared,
    host: &str,
    device_id: &str,
    expiry: u64,
) -> Result<Opened, OpenError> {
    let (dial_host, port) = dial(spec, shared, host);
    let timeout = shared.settings.connect_timeout;
    let module = spec.module_id.as_deref();
    let resource = match module {
        Some(m) => format!("{host}/devices/{device_id}/modules/{m}"),
        None => format!("{host}/devices/{device_id}"),
    };
    let token = sign_token(&resource, spec.key(), expiry, None);
    if let Transport::Https { poll_interval } = spec.transport {
        let client = DeviceHttp::new(shared.http.clone(), &dial_host, port, device_id, module, &token)?;
        // Modules have no cloud-to-device messages to poll for.
        let poll = module.is_none().then_some(poll_interval);
        let link =
            tokio::time::timeout(timeout, HttpsLink::open(client, poll)).await.map_err(|_| OpenError::Timeout)??;
        return Ok(Opened::Https(Box::new(link)));
    }
    let ep = Endpoint { host: dial_host, port, websocket: spec.transport == Transport::WebSockets };
    let io = tokio::time::timeout(timeout, transport::open(&ep, shared.tls.clone()))
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Io)?;
    let client_id = crate::iot::username::client_id(device_id, module);
    let username = hub_username(host, device_id, module, spec.model_id.as_deref());
    let conn = MqttConn::connect(io, &client_id, &username, &token, shared.settings.keep_alive, timeout).await?;
    // Module inputs come from the hub only when the hub is the Edge device's Edge hub.
    let inputs = !spec.behaviour.inputs.is_empty() && !spec.fleet_routes(shared.edge_routing);
    Ok(Opened::Mqtt(MqttLink::open(conn, device_id.into(), spec.module_id.clone(), shared.settings.keep_alive, inputs)))
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
