//! The emulator's configuration: a TOML file and command-line flags, resolved into one validated
//! `HubConfig` before any port is bound. Every knob that protocol.md marks UNCONFIRMED lives here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything `fleetsim hub` can be told. Fields left out take the defaults below.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Where the CA, the server certificate, the keys and hub.json live.
    pub data_dir: PathBuf,
    /// The hub's host name: what devices put in their username and SAS `sr`, what DPS assigns.
    pub hostname: String,
    /// More names (and IP addresses) the server certificate covers and SAS tokens may name.
    pub extra_hostnames: Vec<String>,
    /// Device MQTT over TLS, hub and DPS both (the Python SDK can only dial 8883).
    pub mqtt_addr: SocketAddr,
    /// HTTPS: service REST API, DPS device and service APIs, MQTT over WebSockets.
    pub https_addr: SocketAddr,
    /// Plain-HTTP Prometheus endpoint; `None` turns it off.
    pub metrics_addr: Option<SocketAddr>,
    pub tls: TlsFiles,
    pub keys: KeyOverrides,
    /// Enrollments to create at start, besides the default symmetric-key group.
    pub enrollments: Vec<EnrollmentSpec>,
    pub behaviour: Behaviour,
    /// Failures to inject (all off by default); changeable at run time through `/emulator/faults`.
    pub faults: super::faults::FaultConfig,
}

/// User-supplied TLS material; when absent the emulator makes and keeps its own.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Server certificate chain (PEM).
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
    /// The CA clients should trust, advertised in hub.json.
    pub ca_file: Option<PathBuf>,
}

/// Keys to use instead of generated ones (base64). The id scope is not secret but lives here too.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyOverrides {
    pub id_scope: Option<String>,
    pub iothubowner: Option<String>,
    pub service: Option<String>,
    pub device: Option<String>,
    pub registry_read: Option<String>,
    pub registry_read_write: Option<String>,
    pub provisioningserviceowner: Option<String>,
    pub group_primary: Option<String>,
    pub group_secondary: Option<String>,
}

/// One DPS enrollment from the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum EnrollmentSpec {
    Individual {
        registration_id: String,
        device_id: Option<String>,
        primary_key: Option<String>,
        secondary_key: Option<String>,
    },
    Group {
        group_id: String,
        primary_key: Option<String>,
        secondary_key: Option<String>,
    },
}

/// What to do with a subscription IoT Hub does not document, or one past the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadSubscription {
    /// Close the connection, as the hub does for other protocol violations (the default).
    Close,
    /// Answer SUBACK 0x80 for that filter and keep the connection.
    Refuse,
}

/// Protocol knobs, several of them behaviours protocol.md could not confirm.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Behaviour {
    /// Clock skew tolerated past a SAS token's expiry.
    pub sas_skew_secs: u64,
    pub bad_subscription: BadSubscription,
    pub max_subscriptions: usize,
    /// Largest telemetry message: body plus property names and values.
    pub max_message_bytes: usize,
    /// The hub closes a silent connection after 1.5x keep-alive, never later than this.
    pub keepalive_cap_secs: u64,
    /// How long a new TCP/TLS connection may take to send CONNECT.
    pub connect_timeout_secs: u64,
    /// Telemetry messages kept per identity for tests and tools to read back (0 keeps none).
    pub telemetry_buffer: usize,
    pub c2d_max_queue: usize,
    pub c2d_ttl_secs: u64,
    pub c2d_max_delivery_count: u32,
    /// What DPS tells devices to wait before polling.
    pub dps_retry_after_secs: u64,
    /// How long an assignment takes; polls before then stay `assigning`.
    pub dps_assignment_delay_ms: u64,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            sas_skew_secs: 0,
            bad_subscription: BadSubscription::Close,
            max_subscriptions: 5,
            max_message_bytes: 256 * 1024,
            keepalive_cap_secs: 1767,
            connect_timeout_secs: 10,
            telemetry_buffer: 16,
            c2d_max_queue: 50,
            c2d_ttl_secs: 2 * 24 * 3600,
            c2d_max_delivery_count: 100,
            dps_retry_after_secs: 1,
            dps_assignment_delay_ms: 0,
        }
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            data_dir: PathBuf::from("fleetsim-hub"),
            hostname: "localhost".into(),
            extra_hostnames: Vec::new(),
            mqtt_addr: SocketAddr::from(([127, 0, 0, 1], 8883)),
            https_addr: SocketAddr::from(([127, 0, 0, 1], 8443)),
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            tls: TlsFiles::default(),
            keys: KeyOverrides::default(),
            enrollments: Vec::new(),
            behaviour: Behaviour::default(),
            faults: Default::default(),
        }
    }
}

/// A configuration problem, located in its file when it came from one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}:{line}:{column}: {message}")]
    Parse { path: String, line: usize, column: usize, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl HubConfig {
    /// Reads a TOML file; parse errors carry the file, line and column.
    pub fn load(path: &Path) -> Result<HubConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        toml::from_str(&text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(&text, s.start)).unwrap_or((1, 1));
            ConfigError::Parse { path: path.display().to_string(), line, column, message: e.message().to_owned() }
        })
    }

    /// Checks what serde cannot: names, the relations between fields. Reports every problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.hostname.is_empty() || self.hostname.contains(['/', ' ', ':']) {
            problems.push(format!("hostname `{}` is not a host name", self.hostname));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            problems.push("tls.cert_file and tls.key_file go together".to_owned());
        }
        if self.tls.cert_file.is_some() && self.tls.ca_file.is_none() {
            problems.push("tls.ca_file is needed with tls.cert_file (clients must be told what to trust)".to_owned());
        }
        if self.behaviour.max_subscriptions == 0 {
            problems.push("behaviour.max_subscriptions must be at least 1".to_owned());
        }
        if self.behaviour.max_message_bytes < 1024 {
            problems.push("behaviour.max_message_bytes must be at least 1024".to_owned());
        }
        if let Some(scope) = &self.keys.id_scope
            && (scope.is_empty() || !scope.chars().all(|c| c.is_ascii_alphanumeric()))
        {
            problems.push(format!("keys.id_scope `{scope}` must be letters and digits"));
        }
        for (i, e) in self.enrollments.iter().enumerate() {
            let id = match e {
                EnrollmentSpec::Individual { registration_id, .. } => registration_id,
                EnrollmentSpec::Group { group_id, .. } => group_id,
            };
            if id.is_empty() || id.len() > 128 {
                problems.push(format!("enrollments[{i}]: the id must be 1 to 128 characters"));
            }
        }
        if let Err(e) = self.faults.validate() {
            problems.extend(e.lines().map(str::to_owned));
        }
        if problems.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(problems.join("\n"))) }
    }

    /// Every name the certificate covers and tokens may use, the main hostname first.
    pub fn all_hostnames(&self) -> Vec<String> {
        let mut names = vec![self.hostname.clone()];
        for n in self.extra_hostnames.iter().map(String::as_str).chain(["localhost", "127.0.0.1"]) {
            if !names.iter().any(|x| x.eq_ignore_ascii_case(n)) {
                names.push(n.to_owned());
            }
        }
        names
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_errors_by_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hub.toml");
        std::fs::write(&p, "hostname = \"h\"\n[behaviour]\nmax_subscriptions = \"five\"\n").unwrap();
        let err = HubConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("hub.toml:3:21"), "{err}");
        std::fs::write(&p, "hostname = \"h\"\nbogus = 1\n").unwrap();
        let err = HubConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("hub.toml:2:1") && err.contains("bogus"), "{err}");
    }

    #[test]
    fn validation_reports_every_problem() {
        let mut c = HubConfig { hostname: "bad host".into(), ..Default::default() };
        c.tls.cert_file = Some("x".into());
        c.behaviour.max_subscriptions = 0;
        let err = c.validate().unwrap_err().to_string();
        assert_eq!(err.lines().count(), 4, "{err}");
    }

    #[test]
    fn the_shipped_example_is_valid_and_shows_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("hub.example.toml");
        let c = HubConfig::load(&path).unwrap();
        c.validate().unwrap();
        let d = HubConfig::default();
        assert_eq!((c.mqtt_addr, c.https_addr, c.metrics_addr), (d.mqtt_addr, d.https_addr, d.metrics_addr));
        assert_eq!(format!("{:?}", c.behaviour), format!("{:?}", d.behaviour));
    }

    #[test]
    fn reads_enrollments_and_knobs() {
        let c: HubConfig = toml::from_str(
            r#"
            hostname = "myhub.azure-devices.net"
            [behaviour]
            bad_subscription = "refuse"
            [[enrollments]]
            kind = "individual"
            registration_id = "dev-1"
            [[enrollments]]
            kind = "group"
            group_id = "g2"
            "#,
        )
        .unwrap();
        assert_eq!(c.behaviour.bad_subscription, BadSubscription::Refuse);
        assert_eq!(c.enrollments.len(), 2);
        assert_eq!(c.all_hostnames(), ["myhub.azure-devices.net", "localhost", "127.0.0.1"]);
    }
}
