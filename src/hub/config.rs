//! The emulator's configuration: a TOML file and command-line flags, resolved into one validated
//! `HubConfig` before any port is bound. Every knob that protocol.md marks UNCONFIRMED lives here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::problems::{Problem, Problems};
use crate::tomlread::{io_reason, line_col};

/// The largest `behaviour.max_message_bytes`: WebSocket frames and MQTT packets are bounded by it.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Where `fleetsim hub`, the embedded emulator of `fleetsim run` and the operator commands
/// (`devices`, `twin`, `invoke`, `token`: `DEFAULT_DATA_DIR/hub.json`) all look by default.
pub const DEFAULT_DATA_DIR: &str = ".fleetsim/hub";

/// Everything `fleetsim hub` can be told. Fields left out take the defaults below.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Where the CA, the server certificate, the keys, hub.json and the store live.
    pub data_dir: PathBuf,
    /// Keep identities, twins, enrollments and C2D queues in memory only (nothing of them
    /// survives a restart). Default false: they are kept in `data_dir/store.sqlite3`.
    pub in_memory: bool,
    /// The hub's host name: what devices put in their username and SAS `sr`, what DPS assigns.
    pub hostname: String,
    /// More names (and IP addresses) the server certificate covers and SAS tokens may name.
    pub extra_hostnames: Vec<String>,
    /// Device MQTT over TLS, hub and DPS both (the Python SDK can only dial 8883).
    pub mqtt_addr: SocketAddr,
    /// HTTPS: service REST API, DPS device and service APIs, MQTT over WebSockets.
    pub https_addr: SocketAddr,
    /// AMQP 1.0 over TLS: the Event Hubs-compatible endpoint and the service side (IoT Hub and
    /// Event Hubs both listen on 5671, "AMQP 1.0 in Azure Service Bus and Event Hubs protocol
    /// guide"); `None` turns it off.
    pub amqp_addr: Option<SocketAddr>,
    /// Plain-HTTP Prometheus endpoint; `None` turns it off.
    pub metrics_addr: Option<SocketAddr>,
    /// Serve the web console and its JSON API (docs/console.md) on `metrics_addr` too, on
    /// `fleetsim hub`. Default true; the console has no authentication.
    pub console: bool,
    pub tls: TlsFiles,
    pub keys: KeyOverrides,
    /// Enrollments to create at start, besides the default symmetric-key group.
    pub enrollments: Vec<EnrollmentSpec>,
    pub behaviour: HubBehaviour,
    /// Failures to inject (all off by default); changeable at run time through `/emulator/faults`.
    pub faults: super::faults::FaultConfig,
    /// A DTDL model directory (device models repository layout): when set, what devices send is
    /// checked against the model they announce (`hub/model_check.rs`).
    #[serde(default)]
    pub models_dir: Option<PathBuf>,
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
pub struct HubBehaviour {
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
    /// How long an HTTPS device's receive locks a C2D message before it is delivered again. IoT
    /// Hub's lock timeout is one minute and fixed ("Understand cloud-to-device messaging": the
    /// message life cycle); the setting exists for tests.
    pub c2d_lock_timeout_secs: u64,
    /// What DPS tells devices to wait before polling.
    pub dps_retry_after_secs: u64,
    /// How long an assignment takes; polls before then stay `assigning`.
    pub dps_assignment_delay_ms: u64,
    /// Open connections allowed across every listener (MQTT, HTTPS, WebSockets). Past it a new
    /// connection is closed at once and counted (`refused{reason="connection_limit"}`), so the
    /// process keeps descriptors for the ones it serves. 0 means the open-files limit less 64.
    pub max_connections: usize,
    /// How long an HTTPS client may take to send a request's headers (slow or half-sent
    /// requests are closed after it).
    pub http_header_timeout_secs: u64,
    /// How long an HTTPS connection may sit with no request in progress before it is closed.
    /// WebSocket connections are not affected: MQTT keep-alive governs them.
    pub http_idle_timeout_secs: u64,
    /// The idle timeout the AMQP listener announces in its `open` (milliseconds on the wire): a
    /// peer that sends nothing, not even an empty frame, for this long is closed (AMQP 1.0
    /// section 2.4.5). Azure's brokers announce 240 s.
    pub amqp_idle_timeout_secs: u64,
    /// Partitions of the Event Hubs-compatible endpoint (IoT Hub: 2 to 128, default 4); a device's
    /// messages always go to the same one (a stable hash of the device id).
    pub eventhub_partitions: u32,
    /// Events each partition retains, oldest dropped first (0 keeps none: the endpoint serves
    /// nothing, for load tests).
    pub eventhub_retention_events: usize,
    /// Bytes each partition retains (bodies plus property names and values), oldest dropped
    /// first: the emulator keeps the endpoint in memory, so this bounds it.
    pub eventhub_retention_bytes: u64,
    /// How long an event is retained (IoT Hub's built-in endpoint: 1 day by default, up to 7).
    pub eventhub_retention_secs: u64,
    /// Whether the retained events are kept in the store (default true, when the store is on):
    /// a message's PUBACK or 204 then waits for its event's commit, as on IoT Hub, where an
    /// acknowledged message is never lost. Off: the endpoint starts empty after a restart and
    /// acknowledging telemetry costs no disk write (load tests; see BENCHMARKS.md).
    pub eventhub_durable: bool,
    /// Consumer groups readers may name besides `$Default` (IoT Hub: created on the hub's
    /// built-in endpoint). Empty: any name is taken, created on first use.
    pub eventhub_consumer_groups: Vec<String>,
    /// Twin change events (`iothub-message-source` `twinChangeEvents`) on the endpoint, as a
    /// route from that source to the built-in endpoint sends them on Azure.
    pub eventhub_twin_change_events: bool,
    /// Device and module creation and deletion events (`deviceLifecycleEvents`).
    pub eventhub_device_lifecycle_events: bool,
    /// Device connect and disconnect events (`deviceConnectionStateEvents`).
    pub eventhub_connection_state_events: bool,
    /// Whether an uploaded CA certificate needs proof of possession (`generateVerificationCode`,
    /// then `verify`) before it authenticates devices, as on IoT Hub. Off: every upload is
    /// verified at once (Azure's upload with `isVerified: true` does the same for one upload).
    pub ca_proof_of_possession: bool,
}

impl Default for HubBehaviour {
    fn default() -> Self {
        HubBehaviour {
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
            c2d_lock_timeout_secs: 60,
            dps_retry_after_secs: 1,
            dps_assignment_delay_ms: 0,
            max_connections: 0,
            http_header_timeout_secs: crate::httpserve::Limits::DEFAULT.header_timeout.as_secs(),
            http_idle_timeout_secs: crate::httpserve::Limits::DEFAULT.idle_timeout.as_secs(),
            amqp_idle_timeout_secs: 240,
            eventhub_partitions: 4,
            eventhub_retention_events: 10_000,
            eventhub_retention_bytes: 64 * 1024 * 1024,
            eventhub_retention_secs: 86_400,
            eventhub_durable: true,
            eventhub_consumer_groups: Vec::new(),
            eventhub_twin_change_events: true,
            eventhub_device_lifecycle_events: true,
            eventhub_connection_state_events: true,
            ca_proof_of_possession: true,
        }
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            in_memory: false,
            hostname: "localhost".into(),
            extra_hostnames: Vec::new(),
            mqtt_addr: SocketAddr::from(([127, 0, 0, 1], 8883)),
            https_addr: SocketAddr::from(([127, 0, 0, 1], 8443)),
            amqp_addr: Some(SocketAddr::from(([127, 0, 0, 1], 5671))),
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            console: true,
            tls: TlsFiles::default(),
            keys: KeyOverrides::default(),
            enrollments: Vec::new(),
            behaviour: HubBehaviour::default(),
            faults: Default::default(),
            models_dir: None,
        }
    }
}

/// A consumer group name Event Hubs accepts: 1 to 50 letters, digits, `.`, `-` and `_`,
/// starting and ending with a letter or digit ("Event Hubs quotas and limits": naming rules).
pub fn valid_consumer_group(name: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    (1..=50).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
        && edge(name.chars().next())
        && edge(name.chars().last())
}

impl HubConfig {
    /// Reads a TOML file. Problems: the file cannot be read (placed at 1:1), or serde's first
    /// error (located at its span, no field path: serde does not give one).
    pub fn load(path: &Path) -> Result<HubConfig, Problems> {
        let text = crate::fsio::read_text_capped(path, crate::fsio::MAX_INPUT_FILE)
            .map_err(|e| Problem::file(path, format!("cannot read: {}", io_reason(&e))))?;
        toml::from_str(&text).map_err(|e| {
            let at = e.span().map_or((1, 1), |s| line_col(&text, s.start));
            Problem::at(path.display().to_string(), at, "", e.message().trim()).into()
        })
    }

    /// Checks what serde cannot: names, the relations between fields. Reports every problem,
    /// each with its field path (`behaviour.max_subscriptions`) and a message that begins with
    /// it; no file position: `validate::hub` locates them in the file the values came from.
    pub fn validate(&self) -> Result<(), Problems> {
        let mut problems = Problems::default();
        let mut problem = |field: &str, message: String| problems.push(Problem::field(field, message));
        if self.hostname.is_empty() || self.hostname.contains(['/', ' ', ':']) {
            problem("hostname", format!("hostname `{}` is not a host name", self.hostname));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            problem("tls.cert_file", "tls.cert_file and tls.key_file go together".to_owned());
        }
        if self.tls.cert_file.is_some() && self.tls.ca_file.is_none() {
            problem(
                "tls.cert_file",
                "tls.ca_file is needed with tls.cert_file (clients must be told what to trust)".to_owned(),
            );
        }
        let b = &self.behaviour;
        const DAY: u64 = 86_400;
        // Every number is bounded, so that no setting can overflow a clock or exhaust memory.
        for (name, v, min, max) in [
            ("sas_skew_secs", b.sas_skew_secs, 0, DAY),
            ("max_subscriptions", b.max_subscriptions as u64, 1, 1000),
            ("max_message_bytes", b.max_message_bytes as u64, 1024, MAX_MESSAGE_BYTES as u64),
            ("keepalive_cap_secs", b.keepalive_cap_secs, 1, DAY),
            ("connect_timeout_secs", b.connect_timeout_secs, 1, 3600),
            ("telemetry_buffer", b.telemetry_buffer as u64, 0, 1_000_000),
            ("c2d_max_queue", b.c2d_max_queue as u64, 1, 100_000),
            ("c2d_ttl_secs", b.c2d_ttl_secs, 1, 365 * DAY),
            // IoT Hub's own range for the maximum delivery count.
            ("c2d_max_delivery_count", b.c2d_max_delivery_count as u64, 1, 100),
            ("c2d_lock_timeout_secs", b.c2d_lock_timeout_secs, 1, 3600),
            ("dps_retry_after_secs", b.dps_retry_after_secs, 0, 3600),
            ("dps_assignment_delay_ms", b.dps_assignment_delay_ms, 0, 3_600_000),
            ("max_connections", b.max_connections as u64, 0, 10_000_000),
            ("http_header_timeout_secs", b.http_header_timeout_secs, 1, 3600),
            ("http_idle_timeout_secs", b.http_idle_timeout_secs, 1, DAY),
            ("amqp_idle_timeout_secs", b.amqp_idle_timeout_secs, 1, DAY),
            ("eventhub_partitions", b.eventhub_partitions as u64, 1, 128),
            ("eventhub_retention_events", b.eventhub_retention_events as u64, 0, 10_000_000),
            ("eventhub_retention_secs", b.eventhub_retention_secs, 1, 7 * DAY),
            ("eventhub_retention_bytes", b.eventhub_retention_bytes, 1024, 1 << 40),
        ] {
            if !(min..=max).contains(&v) {
                problem(&format!("behaviour.{name}"), format!("behaviour.{name} must be from {min} to {max}"));
            }
        }
        for group in &b.eventhub_consumer_groups {
            if !valid_consumer_group(group) {
                problem(
                    "behaviour.eventhub_consumer_groups",
                    format!(
                        "behaviour.eventhub_consumer_groups: `{group}` is not a consumer group name (1 to 50 letters, digits, `.`, `-`, `_`, starting and ending with a letter or digit)"
                    ),
                );
            }
        }
        if let Some(scope) = &self.keys.id_scope
            && (scope.is_empty() || !scope.chars().all(|c| c.is_ascii_alphanumeric()))
        {
            problem("keys.id_scope", format!("keys.id_scope `{scope}` must be letters and digits"));
        }
        for (i, e) in self.enrollments.iter().enumerate() {
            let id = match e {
                EnrollmentSpec::Individual { registration_id, .. } => registration_id,
                EnrollmentSpec::Group { group_id, .. } => group_id,
            };
            if id.is_empty() || id.len() > 128 {
                problem(&format!("enrollments[{i}]"), format!("enrollments[{i}]: the id must be 1 to 128 characters"));
            }
        }
        // `FaultConfig::validate` (shared with the REST route, which answers in one string) gives
        // one "faults.<field> must ..." sentence per line: the field is its first word.
        if let Err(e) = self.faults.validate() {
            for line in e.lines() {
                problem(line.split(' ').next().unwrap_or("faults"), line.to_owned());
            }
        }
        problems.or_ok(())
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
    fn consumer_groups_follow_the_event_hubs_naming_rules() {
        for good in ["analytics", "a", "tail-1.x_y", &"a".repeat(50)] {
            assert!(valid_consumer_group(good), "{good}");
        }
        for bad in ["", "-a", "a-", "$Default", "has space", &"a".repeat(51)] {
            assert!(!valid_consumer_group(bad), "{bad}");
        }
        let mut c = HubConfig::default();
        c.behaviour.eventhub_consumer_groups = vec!["ok".into(), "not ok".into()];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("`not ok` is not a consumer group name") && !err.contains("`ok`"), "{err}");
    }

    #[test]
    fn every_number_is_range_checked() {
        // Issue 10: 2^64-1 seconds overflowed `Instant + Duration` inside connection tasks.
        let huge = u64::MAX;
        let mut c = HubConfig::default();
        let b = &mut c.behaviour;
        (b.sas_skew_secs, b.keepalive_cap_secs, b.connect_timeout_secs, b.c2d_ttl_secs) = (huge, huge, huge, huge);
        (b.dps_retry_after_secs, b.dps_assignment_delay_ms) = (huge, huge);
        (b.http_header_timeout_secs, b.http_idle_timeout_secs) = (0, huge);
        (b.max_message_bytes, b.c2d_max_delivery_count, b.c2d_max_queue) = (usize::MAX, 0, 0);
        b.c2d_lock_timeout_secs = huge;
        (b.amqp_idle_timeout_secs, b.eventhub_retention_secs) = (huge, huge);
        (b.eventhub_partitions, b.eventhub_retention_events) = (0, usize::MAX);
        b.eventhub_retention_bytes = huge;
        c.faults.token_lifetime_secs = huge;
        c.faults.puback_delay_ms = huge;
        c.faults.storm_every_secs = huge;
        c.faults.dps_assignment_delay_ms = Some(huge);
        let err = c.validate().unwrap_err().to_string();
        for field in [
            "behaviour.sas_skew_secs must be from 0 to 86400",
            "behaviour.keepalive_cap_secs",
            "behaviour.connect_timeout_secs",
            "behaviour.c2d_ttl_secs",
            "behaviour.dps_retry_after_secs",
            "behaviour.dps_assignment_delay_ms",
            "behaviour.http_header_timeout_secs must be from 1",
            "behaviour.http_idle_timeout_secs",
            "behaviour.max_message_bytes",
            "behaviour.c2d_max_delivery_count must be from 1 to 100",
            "behaviour.c2d_max_queue",
            "behaviour.c2d_lock_timeout_secs must be from 1 to 3600",
            "behaviour.amqp_idle_timeout_secs must be from 1 to 86400",
            "behaviour.eventhub_partitions must be from 1 to 128",
            "behaviour.eventhub_retention_events must be from 0 to 10000000",
            "behaviour.eventhub_retention_secs must be from 1 to 604800",
            "behaviour.eventhub_retention_bytes must be from 1024 to 1099511627776",
            "faults.token_lifetime_secs must be from 0 to 31536000",
            "faults.puback_delay_ms",
            "faults.storm_every_secs",
            "faults.dps_assignment_delay_ms",
        ] {
            assert!(err.contains(field), "{field} missing from:\n{err}");
        }
        assert_eq!(err.lines().count(), 21, "{err}");
    }

    #[test]
    fn the_shipped_example_is_valid_and_shows_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("hub.example.toml");
        let c = HubConfig::load(&path).unwrap();
        c.validate().unwrap();
        let d = HubConfig::default();
        assert_eq!((c.mqtt_addr, c.https_addr, c.metrics_addr), (d.mqtt_addr, d.https_addr, d.metrics_addr));
        assert_eq!(c.amqp_addr, d.amqp_addr);
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
