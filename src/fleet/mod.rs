//! `fleetsim run`: starts the embedded emulator (or finds the hub), turns the scenarios into
//! identities, runs one task per identity behind the connection ramp, serves metrics and health,
//! logs progress while ramping, and shuts everything down within the grace period.

pub mod ci;
pub mod e2e;
pub mod expand;
pub mod html;
pub mod junit;
mod reload;
pub mod report;
pub mod timeline;

pub use reload::ReloadSummary;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::transport;
use crate::config::{DaemonConfig, HubMode};
use crate::device::ramp::Ramp;
use crate::device::runtime;
use crate::device::spec::{Endpoints, IdentitySpec, Shared};
use crate::hub::info::HubInfo;
use crate::hub::{self, RunningHub};
use crate::iot::connection_string::ConnectionString;
use crate::iot::sas::Key;
use crate::metrics::{DeviceState, FleetMetrics};
use crate::problems::{Problem, Problems};
use crate::provision::dps::DpsEndpoint;
use crate::provision::registry::ServiceClient;
use crate::scenario::model::{DeviceTemplate, EdgeRouting, Provisioning};
use expand::{KeyPlan, Shard};

pub struct RunningFleet {
    /// The embedded emulator, when the config asks for one.
    pub hub: Option<RunningHub>,
    /// The emulator's hub.json (embedded or external mode).
    pub hub_info: Option<HubInfo>,
    pub shared: Arc<Shared>,
    pub metrics_addr: Option<SocketAddr>,
    /// One task per identity, by `device[/module]`.
    tasks: HashMap<String, IdentityTask>,
    /// How many identities the fleet runs now (the health and progress tasks read it).
    total: Arc<std::sync::atomic::AtomicUsize>,
    /// What a reload needs to expand scenarios the way `start` did.
    wiring: Wiring,
    shard: Shard,
    aux: Vec<JoinHandle<()>>,
    stop_aux: CancellationToken,
}

/// A running identity: its own stop signal (a child of the fleet's) and what it was made from.
struct IdentityTask {
    cancel: CancellationToken,
    handle: JoinHandle<()>,
    /// The identity's full definition, to tell a changed scenario from an unchanged one by
    /// value (its behaviour is shared, so keeping it costs a few pointers).
    spec: IdentitySpec,
    /// What the CI method probe needs of it.
    target: ci::ProbeTarget,
}

/// `device` or `device/module`: how the fleet tells its identities apart.
fn identity_key(spec: &IdentitySpec) -> String {
    crate::iot::username::client_id(&spec.device_id, spec.module_id.as_deref())
}

fn spawn_identity(spec: IdentitySpec, shared: &Arc<Shared>) -> (String, IdentityTask) {
    let key = identity_key(&spec);
    let target = ci::ProbeTarget {
        device_id: spec.device_id.clone(),
        module_id: spec.module_id.clone(),
        behaviour: spec.behaviour.clone(),
    };
    let cancel = shared.shutdown.child_token();
    let handle = tokio::spawn(runtime::run(spec.clone(), shared.clone(), cancel.clone()));
    (key, IdentityTask { cancel, handle, spec, target })
}

impl RunningFleet {
    /// Stops every identity (each drains its in-flight telemetry, then disconnects), then the
    /// embedded hub.
    pub async fn shutdown(mut self) {
        self.stop_identities().await;
        self.stop_aux.cancel();
        for t in self.aux {
            let _ = t.await;
        }
        if let Some(h) = self.hub {
            h.shutdown().await;
        }
    }

    /// Stops every identity (each drains its buffered telemetry, then disconnects); the hub,
    /// metrics and health endpoints stay up.
    pub async fn stop_identities(&mut self) {
        self.shared.shutdown.cancel();
        let grace = self.shared.settings.shutdown_grace + Duration::from_secs(5);
        let all = futures_util::future::join_all(std::mem::take(&mut self.tasks).into_values().map(|t| t.handle));
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("some identities did not stop within the grace period");
        }
    }

    /// How many identities the fleet runs.
    pub fn identities(&self) -> usize {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every identity the fleet runs, as the CI method probe sees it.
    pub fn probe_targets(&self) -> Vec<ci::ProbeTarget> {
        self.tasks.values().map(|t| t.target.clone()).collect()
    }

    /// Identities that have connected at least once.
    pub fn connected_once(&self) -> i64 {
        self.shared.metrics.ever_connected.get()
    }
}

/// The parts of a start-up that depend on where the hub is.
struct Wiring {
    tls: Arc<rustls::ClientConfig>,
    endpoints: Endpoints,
    service: Option<ConnectionString>,
    dps_service: Option<ConnectionString>,
    group: Option<Key>,
    seed: Key,
}

fn from_emulator(info: &HubInfo) -> anyhow::Result<Wiring> {
    let group = Key::from_base64(&info.group_key).map_err(|_| anyhow!("hub.json: group_key is not base64"))?;
    Ok(Wiring {
        tls: transport::client_config(Some(&info.ca_file))?,
        endpoints: Endpoints {
            hub_host: Some(info.hostname.clone()),
            gateway_host: None,
            mqtt_port: info.mqtt_port,
            https_port: info.https_port,
            dps: Some(DpsEndpoint {
                host: info.dps_host.clone(),
                https_port: info.https_port,
                mqtt_port: info.mqtt_port,
                id_scope: info.id_scope.clone(),
            }),
        },
        service: Some(info.service_connection_string.parse().map_err(|e| anyhow!("hub.json: {e}"))?),
        dps_service: Some(info.dps_service_connection_string.parse().map_err(|e| anyhow!("hub.json: {e}"))?),
        seed: group.clone(),
        group: Some(group),
    })
}

/// What the hub settings give the templates to work with: an emulator gives everything, Azure
/// what its settings name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Provides {
    pub dps: bool,
    pub group_key: bool,
    pub dps_service: bool,
    pub hub_host: bool,
    pub service: bool,
}

impl Provides {
    fn of(w: &Wiring) -> Provides {
        Provides {
            dps: w.endpoints.dps.is_some(),
            group_key: w.group.is_some(),
            dps_service: w.dps_service.is_some(),
            hub_host: w.endpoints.hub_host.is_some(),
            service: w.service.is_some(),
        }
    }

    /// What a config's hub settings will provide, known before anything starts.
    pub fn of_config(hub: &HubMode) -> Provides {
        match hub {
            HubMode::Azure(a) => Provides {
                dps: a.id_scope.is_some(),
                group_key: a.group_key.is_some(),
                dps_service: a.dps_service_connection_string.is_some(),
                hub_host: a.hub_host.is_some() || a.service_connection_string.is_some(),
                service: a.service_connection_string.is_some(),
            },
            HubMode::Embedded { .. } | HubMode::External { .. } => {
                Provides { dps: true, group_key: true, dps_service: true, hub_host: true, service: true }
            }
        }
    }
}

/// Every way the templates need more than the hub settings provide, each located at its
/// template (`[[devices]]`) and naming the setting to add.
pub fn template_problems(p: Provides, templates: &[DeviceTemplate], keys_files: &KeyFiles) -> Vec<Problem> {
    let mut problems = Vec::new();
    for t in templates {
        let mut need = |field: &str, message: String| {
            problems.push(Problem {
                file: t.file.display().to_string(),
                line: t.at.0,
                column: t.at.1,
                field: field.to_owned(),
                message: format!("template \"{}\" {message}", t.name),
            })
        };
        match t.provisioning {
            Provisioning::Dps { individual, .. } => {
                if !p.dps {
                    need("provisioning", "registers through DPS, which needs hub.id_scope in the config".into());
                }
                if !individual && !p.group_key {
                    need("enrollment", "uses a group enrollment, which needs hub.group_key in the config".into());
                }
                if individual && !p.dps_service && t.keys_file.is_none() {
                    need(
                        "enrollment",
                        "uses individual enrollments, which need keys_file or hub.dps_service_connection_string".into(),
                    );
                }
            }
            Provisioning::ConnectionString => {
                if !p.hub_host {
                    need(
                        "provisioning",
                        "connects by connection string, which needs hub.hub_host or hub.service_connection_string"
                            .into(),
                    );
                }
                if !p.service && t.keys_file.is_none() {
                    need(
                        "provisioning",
                        "connects by connection string, which needs keys_file or hub.service_connection_string".into(),
                    );
                }
            }
        }
        if !t.modules.is_empty() && !p.service && t.keys_file.is_none() {
            need(
                "modules",
                "has modules, which need keys_file or hub.service_connection_string (DPS does not create them)".into(),
            );
        }
        if !t.modules.is_empty() && !p.hub_host {
            need("modules", "has modules, which need hub.hub_host or hub.service_connection_string".into());
        }
        if let Some(f) = &t.keys_file
            && !keys_files.contains_key(f)
        {
            need("keys_file", format!("names {}, which was not loaded", f.display()));
        }
    }
    problems
}

/// Checks that the hub configuration can serve every template; all problems at once.
fn check_wiring(w: &Wiring, templates: &[DeviceTemplate], keys_files: &KeyFiles) -> Result<(), Problems> {
    Problems(template_problems(Provides::of(w), templates, keys_files)).or_ok(())
}

/// Why `start` did not start a fleet. The caller's exit status follows from the variant: a
/// usage problem is the configuration's (exit 64, EX_USAGE), anything else the world's.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration and the scenarios do not fit together, or a file they name cannot be
    /// used: every problem, located.
    #[error("{0}")]
    Usage(Problems),
    /// Anything else: a port already bound, an unreachable or unreadable hub.json ...
    #[error(transparent)]
    Runtime(#[from] anyhow::Error),
}

impl From<Problems> for StartError {
    fn from(p: Problems) -> StartError {
        StartError::Usage(p)
    }
}

pub type KeyFiles = HashMap<std::path::PathBuf, HashMap<String, Key>>;

/// The `keys_file`s the templates name, loaded; every unreadable one reported.
pub fn load_key_files(templates: &[DeviceTemplate]) -> Result<KeyFiles, Problems> {
    let mut files = HashMap::new();
    let mut problems = Problems::default();
    for f in templates.iter().filter_map(|t| t.keys_file.clone()) {
        match expand::load_keys_file(&f) {
            Ok(k) => {
                files.insert(f, k);
            }
            Err(e) => problems.push(e),
        }
    }
    problems.or_ok(files)
}

/// Starts the fleet the config and templates describe (this shard of it): the hub side first,
/// then one task per identity. `StartError::Usage` when the templates need what the hub settings
/// do not provide or a `keys_file` cannot be used; `Runtime` for everything the world refuses.
pub async fn start(
    cfg: &DaemonConfig,
    templates: Vec<DeviceTemplate>,
    shard: Shard,
) -> Result<RunningFleet, StartError> {
    let keys_files = load_key_files(&templates)?;

    let (mut hub, mut hub_info, wiring) = match &cfg.hub {
        HubMode::Embedded { data_dir, mqtt_addr, https_addr, hub_config } => {
            let mut hc = match hub_config {
                Some(p) => hub::config::HubConfig::load(p)?,
                None => hub::config::HubConfig::default(),
            };
            hc.data_dir = data_dir.clone();
            hc.mqtt_addr = *mqtt_addr;
            hc.https_addr = *https_addr;
            // The fleet's config names no AMQP address: the embedded hub's endpoint takes a free
            // port beside MQTT (hub.json tells it), so fleets and tests never collide on 5671.
            hc.amqp_addr = Some(std::net::SocketAddr::new(mqtt_addr.ip(), 0));
            // The fleet's own endpoint serves the embedded hub's metrics too.
            hc.metrics_addr = None;
            // Devices built from models are checked against the same models.
            if hc.models_dir.is_none() {
                hc.models_dir = templates.iter().find_map(|t| t.model_dir.clone());
            }
            let running = hub::start(hc).await.context("cannot start the embedded hub")?;
            let info = running.info.clone();
            let w = from_emulator(&info)?;
            (Some(running), Some(info), w)
        }
        HubMode::External { hub_json } => {
            let info = HubInfo::load(hub_json).context(
                "cannot read the external emulator's hub.json (is `fleetsim hub` running with that --data-dir?)",
            )?;
            let w = from_emulator(&info)?;
            (None, Some(info), w)
        }
        HubMode::Azure(a) => {
            let service: Option<ConnectionString> = a
                .service_connection_string
                .as_ref()
                .map(|s| s.value.parse())
                .transpose()
                .map_err(|e| anyhow!("hub.service_connection_string: {e}"))?;
            let dps_service: Option<ConnectionString> = a
                .dps_service_connection_string
                .as_ref()
                .map(|s| s.value.parse())
                .transpose()
                .map_err(|e| anyhow!("hub.dps_service_connection_string: {e}"))?;
            let group = a
                .group_key
                .as_ref()
                .map(|k| Key::from_base64(&k.value))
                .transpose()
                .map_err(|_| anyhow!("hub.group_key is not base64"))?;
            let seed = group
                .clone()
                .or_else(|| service.as_ref().and_then(|s| Key::from_base64(s.shared_access_key.as_deref()?).ok()))
                .unwrap_or_else(Key::generate);
            let hub_host = a
                .hub_host
                .clone()
                .or_else(|| service.as_ref().map(|s| s.host_name.split(':').next().unwrap_or_default().to_owned()));
            let w = Wiring {
                tls: transport::client_config(a.ca_file.as_deref())?,
                endpoints: Endpoints {
                    hub_host,
                    gateway_host: a.gateway_host.clone(),
                    mqtt_port: a.mqtt_port,
                    https_port: a.https_port,
                    dps: a.id_scope.clone().map(|id_scope| DpsEndpoint {
                        host: a.dps_host.clone(),
                        https_port: a.https_port,
                        mqtt_port: a.mqtt_port,
                        id_scope,
                    }),
                },
                service,
                dps_service,
                group,
                seed,
            };
            (None, None, w)
        }
    };
    if let Err(e) = check_wiring(&wiring, &templates, &keys_files) {
        if let Some(h) = hub {
            h.shutdown().await;
        }
        return Err(e.into());
    }

    let http = crate::service::https_client(&wiring.tls)?;
    let service = wiring
        .service
        .as_ref()
        .map(|cs| ServiceClient::new(http.clone(), cs))
        .transpose()
        .map_err(|e| anyhow!("{e}"))?;
    let dps_service = wiring
        .dps_service
        .as_ref()
        .map(|cs| ServiceClient::new(http.clone(), cs))
        .transpose()
        .map_err(|e| anyhow!("{e}"))?;
    let metrics = Arc::new(FleetMetrics::default());
    let shared = Arc::new(Shared {
        tls: wiring.tls.clone(),
        http,
        endpoints: wiring.endpoints.clone(),
        ramp: Ramp::new(cfg.ramp.clone()),
        metrics: metrics.clone(),
        shutdown: CancellationToken::new(),
        settings: cfg.settings.clone(),
        service,
        dps_service,
        ensured: Default::default(),
        provisioning: tokio::sync::Semaphore::new(cfg.settings.provision_concurrency.max(1)),
        run_id: format!("{:08x}", rand::random::<u32>()).into(),
        quiesce: Default::default(),
        failures: Default::default(),
        edge_routing: match cfg.hub {
            // An emulator is the Edge devices' Edge hub; Azure's devices have none.
            HubMode::Embedded { .. } | HubMode::External { .. } => EdgeRouting::Hub,
            HubMode::Azure(_) => EdgeRouting::Fleet,
        },
        edge_inboxes: Default::default(),
        // The console's per-identity views are kept only when there is a console to show them.
        views: (cfg.console && cfg.metrics_addr.is_some()).then(Default::default),
    });
    let keys = KeyPlan { group: wiring.group.clone(), seed: wiring.seed.clone(), files: keys_files };
    let specs = expand::expand(&templates, shard, &keys);
    let identities = specs.len();
    let tasks: HashMap<_, _> = specs.into_iter().map(|s| spawn_identity(s, &shared)).collect();
    let total = Arc::new(std::sync::atomic::AtomicUsize::new(identities));

    let stop_aux = CancellationToken::new();
    let mut aux = vec![tokio::spawn(progress(shared.clone(), total.clone(), cfg.progress_interval, stop_aux.clone()))];
    let mut metrics_addr = None;
    if let Some(addr) = cfg.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        let local = listener.local_addr().context("the metrics listener has no address")?;
        metrics_addr = Some(local);
        // The embedded emulator's metrics are served here: hub.json must say so.
        if let Some(h) = hub.as_mut() {
            h.info.metrics_url = Some(format!("http://{local}/metrics"));
            h.info.save(&h.info_path).with_context(|| format!("cannot write {}", h.info_path.display()))?;
            hub_info = Some(h.info.clone());
        }
        let state =
            MetricsState { fleet: metrics.clone(), hub: hub.as_ref().map(|h| h.state.clone()), total: total.clone() };
        let console = shared.views.clone().map(|views| {
            let fleet =
                crate::console::Fleet { shared: shared.clone(), views, total: total.clone(), ci: cfg.ci.clone() };
            let c = Arc::new(crate::console::Console::new(Some(fleet), hub.as_ref().map(|h| h.state.clone())));
            aux.push(tokio::spawn(crate::console::series::run(c.clone(), stop_aux.clone())));
            crate::console::router(c)
        });
        aux.push(tokio::spawn(serve_metrics(listener, state, console, stop_aux.clone())));
    }
    tracing::info!(
        identities,
        shard = %format!("{}/{}", shard.index, shard.count),
        aims_at = %describe_target(&cfg.hub, hub_info.as_ref()),
        "fleet started"
    );
    Ok(RunningFleet { hub, hub_info, shared, metrics_addr, tasks, total, wiring, shard, aux, stop_aux })
}

#[derive(Clone)]
struct MetricsState {
    fleet: Arc<FleetMetrics>,
    hub: Option<hub::state::Hub>,
    total: Arc<std::sync::atomic::AtomicUsize>,
}

/// `/metrics`, `/healthz` and `/readyz`, and the web console's routes when it is on.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    state: MetricsState,
    console: Option<Router>,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<MetricsState>| async move {
                let mut text = s.fleet.render();
                if let Some(h) = &s.hub {
                    text.push_str(&h.metrics.render());
                }
                text.push_str(&crate::sys::process_metrics());
                text
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<MetricsState>| async move {
                let once = s.fleet.ever_connected.get() as usize;
                let total = s.total.load(std::sync::atomic::Ordering::Relaxed);
                let status = if once >= total { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                (status, format!("{once}/{total} identities have connected\n"))
            }),
        )
        .with_state(state);
    let app = match console {
        Some(c) => app.merge(c),
        None => app,
    };
    let bound = crate::httpserve::ConnectionBound::new(crate::httpserve::METRICS_CONNECTIONS);
    crate::httpserve::serve_plain(listener, app, crate::httpserve::Limits::DEFAULT, bound, "fleet metrics", stop).await
}

/// The progress log: one line per interval while the fleet ramps (with failures by kind), one
/// when every identity has connected (timed from the last first connection, not the tick that
/// noticed it), then a steady-state line at most once a minute (rates, acked, dropped,
/// reconnects).
async fn progress(
    shared: Arc<Shared>,
    total: Arc<std::sync::atomic::AtomicUsize>,
    every: Duration,
    stop: CancellationToken,
) {
    let m = &shared.metrics;
    let mut ramp_start = std::time::Instant::now();
    let mut announced = false;
    let mut last_first = m.first_connects();
    let steady_every = every.max(Duration::from_secs(60));
    let mut steady_at = tokio::time::Instant::now() + steady_every;
    let mut last = (m.telemetry_sent.get(), m.telemetry_acked.get(), m.dropped_count(), reconnects(m));
    let mut last_at = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let total = total.load(std::sync::atomic::Ordering::Relaxed);
        let once = m.ever_connected.get();
        let first = m.first_connects();
        let connected = m.state_count(DeviceState::Connected);
        let failures = shared.failures.take();
        let failed = !failures.is_empty();
        let failures = if failed { failures } else { "none".to_owned() };
        if once as usize >= total {
            if !announced {
                announced = true;
                let secs =
                    m.last_first_connect().map_or(0.0, |t| t.saturating_duration_since(ramp_start).as_secs_f64());
                tracing::info!(identities = total, secs, "every identity has connected");
            }
            let now = tokio::time::Instant::now();
            if now >= steady_at || failed {
                let secs = now.duration_since(last_at).as_secs_f64().max(0.001);
                let current = (m.telemetry_sent.get(), m.telemetry_acked.get(), m.dropped_count(), reconnects(m));
                tracing::info!(
                    connected,
                    of = total,
                    sent_per_sec = ((current.0 - last.0) as f64 / secs * 10.0).round() / 10.0,
                    acked_per_sec = ((current.1 - last.1) as f64 / secs * 10.0).round() / 10.0,
                    acked = current.1,
                    dropped = current.2,
                    reconnects = current.3 - last.3,
                    queued = m.telemetry_queued.get(),
                    failures = %failures,
                    "steady"
                );
                last = current;
                last_at = now;
                steady_at = now + steady_every;
            }
            last_first = first;
            continue;
        }
        if announced {
            // A reload added identities: a new ramp.
            announced = false;
            ramp_start = std::time::Instant::now();
        }
        tracing::info!(
            connected,
            of = total,
            per_sec = first.saturating_sub(last_first) as f64 / every.as_secs_f64(),
            provisioning = m.state_count(DeviceState::Provisioning),
            backoff = m.state_count(DeviceState::Backoff),
            telemetry_acked = m.telemetry_acked.get(),
            telemetry_dropped = m.dropped_count(),
            failures = %failures,
            "ramping"
        );
        last_first = first;
    }
}

fn reconnects(m: &FleetMetrics) -> u64 {
    m.reconnect_counts().values().filter_map(|v| v.as_u64()).sum()
}

/// What the fleet aims at, for the start banner and log: Azure's DPS host and id scope and the
/// hub host, or which emulator. Never a key or connection string.
pub fn describe_target(hub: &HubMode, info: Option<&HubInfo>) -> String {
    match (hub, info) {
        (HubMode::Azure(a), _) => {
            let mut parts = Vec::new();
            match &a.id_scope {
                Some(scope) => parts.push(format!("DPS {}:{} id scope {scope}", a.dps_host, a.https_port)),
                None => parts.push("no DPS (no id_scope)".to_owned()),
            }
            let host = a.hub_host.clone().or_else(|| {
                let cs: ConnectionString = a.service_connection_string.as_ref()?.value.parse().ok()?;
                Some(cs.host_name)
            });
            if let Some(h) = host {
                parts.push(format!("hub {h}"));
            }
            if let Some(g) = &a.gateway_host {
                parts.push(format!("via gateway {g}"));
            }
            parts.push(format!("MQTT port {}", a.mqtt_port));
            if let Some(ca) = &a.ca_file {
                parts.push(format!("trusting {}", ca.display()));
            }
            format!("Azure: {}", parts.join(", "))
        }
        (HubMode::Embedded { .. }, Some(i)) => format!("the embedded emulator at {} (hub {})", i.mqtt_addr, i.hostname),
        (HubMode::External { hub_json }, Some(i)) => {
            format!("the emulator of {} at {} (hub {})", hub_json.display(), i.mqtt_addr, i.hostname)
        }
        (_, None) => "an emulator".to_owned(),
    }
}
