//! What an identity task is given: the identity itself (`IdentitySpec`, `Credentials`), where the
//! fleet connects (`Endpoints`), the per-identity knobs from the daemon config (`Settings`), and what
//! every identity task shares (`Shared`). Data only; `runtime` is what runs it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::outbox::OfflinePolicy;
use super::ramp::Ramp;
use crate::iot::sas::Key;
use crate::metrics::FleetMetrics;
use crate::provision::dps::DpsEndpoint;
use crate::provision::registry::{Ensured, ServiceClient};
use crate::scenario::model::{Behaviour, DpsTransport, EdgeRouting, Transport};

/// Where the fleet connects.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// The hub's host name for identities that do not go through DPS.
    pub hub_host: Option<String>,
    /// Dial this instead of the hub (an Edge gateway, an emulator elsewhere); names stay the hub's.
    pub gateway_host: Option<String>,
    pub mqtt_port: u16,
    /// The hub's HTTPS port: MQTT over WebSockets and the device REST API.
    pub https_port: u16,
    pub dps: Option<DpsEndpoint>,
}

/// Per-identity runtime knobs, from the daemon config.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub token_ttl: Duration,
    /// Fraction of the token's life after which it is renewed (less up to 10 % jitter).
    pub renew_at: f64,
    pub keep_alive: u16,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub connect_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Telemetry messages awaiting PUBACK per identity; more wait in the outbox.
    pub max_inflight: usize,
    /// Telemetry messages an identity holds (unwritten plus awaiting PUBACK), and what it does
    /// when that is full or it is offline.
    pub buffer: usize,
    pub offline_policy: OfflinePolicy,
    /// Stamp each message with `fleetsim-seq` so the hub can count loss end to end.
    pub sequence_numbers: bool,
    /// DPS registrations and registry calls in flight at once, fleet-wide: provisioning is part
    /// of the stampede the connection ramp exists to prevent.
    pub provision_concurrency: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            token_ttl: Duration::from_secs(3600),
            renew_at: 0.85,
            keep_alive: 60,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            max_inflight: 16,
            buffer: 256,
            offline_policy: OfflinePolicy::DropOldest,
            sequence_numbers: true,
            provision_concurrency: 64,
        }
    }
}

/// What every identity task shares.
pub struct Shared {
    pub tls: Arc<rustls::ClientConfig>,
    pub http: reqwest::Client,
    pub endpoints: Endpoints,
    pub ramp: Ramp,
    pub metrics: Arc<FleetMetrics>,
    pub shutdown: CancellationToken,
    pub settings: Settings,
    /// Creates devices and modules that do not go through DPS.
    pub service: Option<ServiceClient>,
    /// Creates individual DPS enrollments.
    pub dps_service: Option<ServiceClient>,
    /// Devices already written to the registry by this fleet, each once.
    pub ensured: Ensured,
    /// Bounds provisioning work in flight (`Settings::provision_concurrency` permits).
    pub provisioning: tokio::sync::Semaphore,
    /// This fleet run's id, the `RUN` of every sequence stamp.
    pub run_id: Arc<str>,
    /// Set at the end of a CI run: devices take no more readings, so what is buffered can drain.
    pub quiesce: std::sync::atomic::AtomicBool,
    /// Why identities fail to provision or connect: told once per template and kind, counted.
    pub failures: super::failures::Failures,
    /// Who routes Edge devices' module messages when their template does not say: the hub for an
    /// emulator (it is their Edge hub), the fleet for Azure.
    pub edge_routing: EdgeRouting,
    /// The inboxes of modules the fleet routes for.
    pub edge_inboxes: super::edge::Inboxes,
    /// What the web console sees of each identity; `None` when the console is off (nothing kept).
    pub views: Option<Arc<super::view::Views>>,
}

/// What the identities of an IoT Edge device share: the deployment applied when the device is
/// created, its routes, and who routes.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgePlan {
    /// The body of `POST /devices/{id}/applyConfigurationContent` (`{"modulesContent": ...}`).
    pub deployment: Value,
    pub routes: Arc<[crate::iot::route::Route]>,
    /// `None`: `Shared::edge_routing` decides.
    pub routing: Option<EdgeRouting>,
}

/// How an identity gets onto the hub.
#[derive(Debug, Clone, PartialEq)]
pub enum Credentials {
    Dps {
        key: Key,
        individual: bool,
        transport: DpsTransport,
        payload: Option<Value>,
    },
    /// Straight to the hub with the identity's key; `parent_key` is set for modules, whose device
    /// must exist first.
    Direct {
        key: Key,
        parent_key: Option<Key>,
    },
}

/// One identity to simulate. Compared by value on reload (keys included), so a changed key
/// restarts the identity although `Debug` shows no key material.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentitySpec {
    /// The scenario template it comes from (failures are told once per template and kind).
    pub template: Arc<str>,
    pub device_id: Arc<str>,
    pub module_id: Option<Arc<str>>,
    pub n: u64,
    pub model_id: Option<Arc<str>>,
    pub transport: Transport,
    pub behaviour: Arc<Behaviour>,
    pub credentials: Credentials,
    /// Set for every identity (device and modules) of an IoT Edge device.
    pub edge: Option<Arc<EdgePlan>>,
}

impl IdentitySpec {
    /// Whether the fleet routes this identity's messages (a module of an Edge device whose
    /// routing is the fleet's).
    pub fn fleet_routes(&self, default: EdgeRouting) -> bool {
        self.module_id.is_some()
            && self.edge.as_ref().is_some_and(|e| e.routing.unwrap_or(default) == EdgeRouting::Fleet)
    }
}

impl IdentitySpec {
    pub(crate) fn key(&self) -> &Key {
        match &self.credentials {
            Credentials::Dps { key, .. } | Credentials::Direct { key, .. } => key,
        }
    }
}
