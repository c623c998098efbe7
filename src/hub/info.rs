//! hub.json: how scripts, tests and `fleetsim run` find a running emulator. Written atomically
//! (mode 0600, since it holds the service connection string and the group key) once every
//! listener is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsio::write_private;

#[derive(Clone, Serialize, Deserialize)]
pub struct HubInfo {
    /// The hub's host name, as devices put it in usernames and tokens.
    pub hostname: String,
    pub mqtt_port: u16,
    pub https_port: u16,
    pub mqtt_addr: SocketAddr,
    pub https_addr: SocketAddr,
    /// Absolute path of the CA PEM clients must trust.
    pub ca_file: PathBuf,
    /// Policy `iothubowner`. `HostName` carries the HTTPS port when it is not 443.
    pub service_connection_string: String,
    /// Policy `provisioningserviceowner`, for the enrollment API.
    pub dps_service_connection_string: String,
    pub id_scope: String,
    /// The DPS host devices dial (the emulator serves DPS on the same ports).
    pub dps_host: String,
    pub group_id: String,
    /// Primary key of the default symmetric-key enrollment group.
    pub group_key: String,
    pub metrics_url: Option<String>,
    pub websocket_url: String,
    /// The AMQP listener (Event Hubs-compatible endpoint), when it is on.
    #[serde(default)]
    pub amqp_addr: Option<SocketAddr>,
    /// The Event Hub-compatible name: the hub's name (its host name's first label).
    #[serde(default)]
    pub eventhub_name: String,
    /// The Event Hub-compatible endpoint, `sb://{hostname}[:port]/`.
    #[serde(default)]
    pub eventhub_endpoint: Option<String>,
    /// `Endpoint=...;SharedAccessKeyName=service;SharedAccessKey=...;EntityPath={name}`, what the
    /// Event Hubs clients take (Azure portal: "Event Hub-compatible endpoint").
    #[serde(default)]
    pub eventhub_connection_string: Option<String>,
    /// `IOTEDGE_WORKLOADURI` for modules run against the emulator (`unix://{data dir}/workload.sock`),
    /// when the socket is served.
    #[serde(default)]
    pub edge_workload_uri: Option<String>,
    pub pid: u32,
}

impl std::fmt::Debug for HubInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubInfo")
            .field("hostname", &self.hostname)
            .field("mqtt_addr", &self.mqtt_addr)
            .field("https_addr", &self.https_addr)
            .field("amqp_addr", &self.amqp_addr)
            .field("id_scope", &self.id_scope)
            .finish_non_exhaustive()
    }
}

impl HubInfo {
    pub fn load(path: &Path) -> anyhow::Result<HubInfo> {
        let bytes = crate::fsio::read_capped(path, crate::fsio::MAX_INPUT_FILE)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: not a hub.json: {e}", path.display()))
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        write_private(path, &serde_json::to_vec_pretty(self).expect("serializable"))
    }
}
