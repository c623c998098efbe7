//! `fleetsim hub`: a local IoT Hub + DPS emulator faithful enough for Microsoft's SDK clients.
//!
//! `start` validates the configuration, loads or makes the keys and TLS material, binds every
//! listener (port 0 works, for tests), writes hub.json and returns a handle. Device traffic enters
//! through `mqtt` (TLS, or WebSockets via `mqtt::websocket`, whose route this file merges into the
//! HTTPS router); service traffic through `http`, and Event Hubs consumers and the AMQP service
//! links through `amqp` (TLS, or WebSockets via `amqp::websocket`, merged the same way). All act on the
//! shared `state::HubState`: `registry` (identities, twins, sessions), `dps`, `methods`, `c2d`.

pub mod amqp;
pub mod c2d;
pub mod ca_certs;
pub mod clock;
pub mod config;
pub mod devices;
pub mod dps;
pub mod edge;
pub mod edge_routes;
pub mod edge_workload;
pub mod eventhub;
pub mod events;
pub mod faults;
pub mod feedback;
pub mod http;
pub mod info;
pub mod methods;
pub mod metrics;
pub mod model_check;
pub mod mqtt;
pub mod query;
pub mod registry;
pub mod registry_io;
pub mod secrets;
pub mod sequence;
pub mod session;
pub mod state;
pub mod store;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod testing;
pub mod tls;
pub mod twin_doc;
pub mod ws_bridge;
pub mod x509;

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::iot::connection_string::ConnectionString;
use config::HubConfig;
use info::HubInfo;
use secrets::{DEFAULT_GROUP, Secrets};
use state::{Hub, HubState};

/// A running emulator.
pub struct RunningHub {
    pub info: HubInfo,
    pub info_path: std::path::PathBuf,
    pub state: Hub,
    tasks: Vec<JoinHandle<()>>,
}

/// How long shutdown waits for connection tasks to finish closing (flushing what they hold,
/// sending a close to WebSocket peers) before it gives up on them.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl RunningHub {
    /// Stops accepting, closes every connection, and waits for the listeners and then for every
    /// connection task to finish (within a grace period).
    pub async fn shutdown(self) {
        self.state.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        self.state.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.state.tasks.wait()).await.is_err() {
            tracing::warn!(left = self.state.tasks.len(), "some connections did not close within the grace period");
        }
        // The writer commits what it holds; joining it is blocking work.
        let state = self.state.clone();
        let _ = tokio::task::spawn_blocking(move || state.store.close()).await;
    }
}

/// The HTTPS listener's router as the hub serves it: the `http` front end's routes with the
/// MQTT and AMQP front ends' WebSocket endpoints merged in (for tests and fuzzing, which serve it
/// without a listener).
pub fn https_router(hub: Hub) -> axum::Router {
    http::router(hub, websocket_routes())
}

/// The WebSocket endpoints the HTTPS port carries: `/$iothub/websocket` (MQTT, or AMQP when the
/// client asks for `AMQPWSB10`: IoT Hub's service clients use this path too) and
/// `/$servicebus/websocket` (AMQP; the Event Hubs clients' path, with or without a trailing `/`).
fn websocket_routes() -> axum::Router<Hub> {
    use axum::routing::get;
    axum::Router::new()
        .route("/$iothub/websocket", get(iothub_websocket))
        .route("/$servicebus/websocket", get(amqp::websocket::upgrade))
        .route("/$servicebus/websocket/", get(amqp::websocket::upgrade))
}

/// `/$iothub/websocket`: the subprotocol picks the front end.
async fn iothub_websocket(
    state: axum::extract::State<Hub>,
    slot: Option<axum::Extension<crate::httpserve::ConnectionSlot>>,
    chain: Option<axum::Extension<x509::ClientChain>>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> axum::response::Response {
    let amqp = ws
        .requested_protocols()
        .filter_map(|p| p.to_str().ok())
        .any(|p| p.trim().eq_ignore_ascii_case(amqp::websocket::SUBPROTOCOL));
    if amqp {
        amqp::websocket::upgrade(state, slot, ws).await
    } else {
        mqtt::websocket::upgrade(state, slot, chain, ws).await
    }
}

/// A TLS connection, established and handed to its listener's handler.
pub type TlsConn = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Accepts TCP connections until shutdown, within the hub's connection bound (past it they are
/// closed and counted), gives each a TLS handshake bounded by the connect timeout (failures are
/// counted), then runs `handle` on it in its own tracked task, with its slot in the bound. Both
/// listeners use it.
pub(crate) async fn tls_accept_loop<F, Fut>(
    hub: Hub,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    what: &'static str,
    handle: F,
) where
    F: Fn(Hub, TlsConn, crate::httpserve::ConnectionSlot) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake_timeout = std::time::Duration::from_secs(hub.behaviour.connect_timeout_secs);
    let mut backoff = crate::httpserve::AcceptBackoff::new(what);
    loop {
        let (tcp, _) = tokio::select! {
            _ = hub.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => {
                    backoff.succeeded();
                    x
                }
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
        };
        // Past the bound the connection is closed at once: the process keeps the descriptors it
        // needs to serve the connections it has.
        let Some(slot) = hub.connections.try_acquire() else {
            hub.metrics.refused(metrics::Refusal::ConnectionLimit);
            hub.connection_refusals.refused(what, &hub.connections);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (hub, acceptor, handle) = (hub.clone(), acceptor.clone(), handle.clone());
        hub.tasks.clone().spawn(async move {
            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => handle(hub, tls, slot).await,
                _ => hub.metrics.refused(metrics::Refusal::TlsHandshake),
            }
        });
    }
}

/// The Event Hub-compatible endpoint as Azure writes it (`sb://{namespace host}/`), with the port
/// when it is not AMQP's 5671.
fn eventhub_endpoint(hostname: &str, port: u16) -> String {
    if port == 5671 { format!("sb://{hostname}/") } else { format!("sb://{hostname}:{port}/") }
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen for {what} on {addr}"))
}

/// Routes a caller serves beside `/metrics` on the emulator's metrics listener, made once the
/// hub's state exists (`fleetsim hub` serves the web console this way: the hub does not import it).
pub type MetricsRoutes = Box<dyn FnOnce(Hub) -> axum::Router + Send>;

/// Starts the emulator. Fails before binding anything if the configuration is invalid.
pub async fn start(config: HubConfig) -> anyhow::Result<RunningHub> {
    start_with(config, None).await
}

/// [`start`], with `extra` routes on the metrics listener (ignored when it is off).
pub async fn start_with(config: HubConfig, extra: Option<MetricsRoutes>) -> anyhow::Result<RunningHub> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create the data dir {}", config.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&config.data_dir)?;
    let secrets = Secrets::load_or_create(&data_dir, &config.keys)?;
    let tls = tls::load_or_create(&config.tls, &data_dir, &config.all_hostnames())?;
    let store_dir = (!config.in_memory).then_some(data_dir.as_path());
    let hub: Hub = Arc::new(HubState::open(&config, secrets, store_dir)?);
    edge::refresh_all(&hub);

    let mqtt = bind(config.mqtt_addr, "MQTT").await?;
    let https = bind(config.https_addr, "HTTPS").await?;
    let amqp = match config.amqp_addr {
        Some(a) => Some(bind(a, "AMQP").await?),
        None => None,
    };
    let amqp_addr = match &amqp {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let metrics = match config.metrics_addr {
        Some(a) => Some(bind(a, "metrics").await?),
        None => None,
    };
    let (mqtt_addr, https_addr) = (mqtt.local_addr()?, https.local_addr()?);
    let metrics_url = match &metrics {
        Some(m) => Some(format!("http://{}/metrics", m.local_addr()?)),
        None => None,
    };

    let mut tasks = vec![
        tokio::spawn(mqtt::accept_loop(hub.clone(), mqtt, tls.mqtt.clone())),
        tokio::spawn(http::accept_loop(hub.clone(), https, tls.https.clone(), websocket_routes())),
    ];
    if let Some(a) = amqp {
        // No ALPN, as for MQTT: AMQP clients negotiate none.
        tasks.push(tokio::spawn(amqp::accept_loop(hub.clone(), a, tls.mqtt.clone())));
    }
    if let Some(m) = metrics {
        let extra = extra.map(|make| make(hub.clone()));
        tasks.push(tokio::spawn(http::metrics_loop(hub.clone(), m, extra)));
    }
    tasks.push(tokio::spawn(state::fault_schedule(hub.clone())));
    tasks.push(tokio::spawn(state::c2d_expiry(hub.clone())));
    let workload_socket = edge_workload::socket_path(&data_dir);
    let edge_workload_uri = match edge_workload::bind(&workload_socket) {
        Some(listener) => {
            let ca_pem = std::fs::read_to_string(&tls.ca_file)
                .with_context(|| format!("cannot read {}", tls.ca_file.display()))?;
            tasks.push(tokio::spawn(edge_workload::serve(hub.clone(), listener, ca_pem)));
            Some(edge_workload::uri(&workload_socket))
        }
        None => None,
    };
    hub.refresh_identity_gauges();

    let rest_host = if https_addr.port() == 443 {
        config.hostname.clone()
    } else {
        format!("{}:{}", config.hostname, https_addr.port())
    };
    let s = &hub.secrets;
    let info = HubInfo {
        hostname: config.hostname.clone(),
        mqtt_port: mqtt_addr.port(),
        https_port: https_addr.port(),
        mqtt_addr,
        https_addr,
        ca_file: tls.ca_file.clone(),
        service_connection_string: ConnectionString::service(
            &rest_host,
            "iothubowner",
            &s.policies["iothubowner"].primary,
        )
        .to_string(),
        dps_service_connection_string: ConnectionString::service(
            &rest_host,
            "provisioningserviceowner",
            &s.policies["provisioningserviceowner"].primary,
        )
        .to_string(),
        id_scope: s.id_scope.clone(),
        dps_host: config.hostname.clone(),
        group_id: DEFAULT_GROUP.into(),
        group_key: s.default_group.primary.clone(),
        metrics_url,
        websocket_url: format!("wss://{}:{}/$iothub/websocket", config.hostname, https_addr.port()),
        amqp_addr,
        eventhub_name: hub.eventhub.name.clone(),
        eventhub_endpoint: amqp_addr.map(|a| eventhub_endpoint(&config.hostname, a.port())),
        eventhub_connection_string: amqp_addr.map(|a| {
            format!(
                "Endpoint={};SharedAccessKeyName=service;SharedAccessKey={};EntityPath={}",
                eventhub_endpoint(&config.hostname, a.port()),
                s.policies["service"].primary,
                hub.eventhub.name
            )
        }),
        edge_workload_uri,
        pid: std::process::id(),
    };
    let info_path = data_dir.join("hub.json");
    info.save(&info_path).with_context(|| format!("cannot write {}", info_path.display()))?;
    tracing::info!(mqtt = %mqtt_addr, https = %https_addr, hostname = %config.hostname, id_scope = %info.id_scope, "hub ready");
    Ok(RunningHub { info, info_path, state: hub, tasks })
}

#[cfg(test)]
mod tests {
    /// The files of `src/hub/{dir}` (not recursive), with their text.
    fn sources(dir: &str) -> Vec<(String, String)> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/hub").join(dir);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&root).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                // Code only: comments may name anything.
                let text = std::fs::read_to_string(&path).unwrap();
                let code: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect();
                out.push((path.display().to_string(), code.join("\n")));
            }
        }
        assert!(!out.is_empty(), "{}", root.display());
        out
    }

    #[test]
    fn the_front_ends_never_import_each_other_and_the_mqtt_contract_is_a_leaf() {
        let mut wrong = Vec::new();
        let imports = |text: &str, front: &str| {
            text.contains(&format!("hub::{front}")) || text.contains(&format!("super::super::{front}"))
        };
        for (path, text) in sources("http") {
            if imports(&text, "mqtt") {
                wrong.push(format!("{path} imports the MQTT front end"));
            }
            if imports(&text, "amqp") {
                wrong.push(format!("{path} imports the AMQP front end"));
            }
        }
        for (path, text) in sources("amqp") {
            for front in ["mqtt", "http"] {
                if imports(&text, front) || text.contains(&format!("super::{front}")) {
                    wrong.push(format!("{path} imports the {front} front end"));
                }
            }
        }
        for (path, text) in sources("mqtt") {
            if text.contains("hub::http") || text.contains("super::super::http") || text.contains("super::http") {
                wrong.push(format!("{path} imports the HTTPS front end"));
            }
            if imports(&text, "amqp") {
                wrong.push(format!("{path} imports the AMQP front end"));
            }
            let name = path.rsplit('/').next().unwrap_or_default();
            let session = matches!(name, "hub_session.rs" | "dps_session.rs" | "contract.rs");
            if session && text.contains("connection::") {
                wrong.push(format!("{path} imports the event loop (use contract.rs)"));
            }
            if name == "contract.rs" && (text.contains("hub_session") || text.contains("dps_session")) {
                wrong.push(format!("{path} imports a session"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
