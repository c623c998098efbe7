//! The emulator's Prometheus metrics. Handles are resolved once at start so the hot paths only
//! increment atomics; no label ever carries a device id (cardinality would follow the fleet size).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::sequence::Arrival;
use super::session::CloseReason;

/// Why a connection was refused at CONNECT or before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadCredentials,
    ExpiredToken,
    UnknownIdentity,
    IdentityDisabled,
    ClientIdMismatch,
    BadUsername,
    UnsupportedProtocol,
    TlsHandshake,
    NoConnect,
    /// An injected outage (CONNACK 3).
    Outage,
    /// Over the injected connects-per-second limit (CONNACK 3).
    Throttled,
    /// Past `behaviour.max_connections`: closed before the TLS handshake.
    ConnectionLimit,
    /// An X.509 identity connected without a client certificate (CONNACK 5).
    CertMissing,
    /// A `selfSigned` identity's certificate matches neither thumbprint (CONNACK 5).
    CertThumbprint,
    /// The certificate (or one of its chain) is past its `notAfter` (CONNACK 5).
    CertExpired,
    /// The certificate (or one of its chain) is before its `notBefore` (CONNACK 5).
    CertNotYetValid,
    /// A `certificateAuthority` identity's chain does not end in a verified CA the hub holds:
    /// signed by another CA, a CA not verified, or one removed since (CONNACK 5).
    CertUntrusted,
    /// The certificate's subject CN is not the identity's id (CONNACK 5).
    CertSubject,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadCredentials => "bad_credentials",
            Refusal::ExpiredToken => "expired_token",
            Refusal::UnknownIdentity => "unknown_identity",
            Refusal::IdentityDisabled => "identity_disabled",
            Refusal::ClientIdMismatch => "client_id_mismatch",
            Refusal::BadUsername => "bad_username",
            Refusal::UnsupportedProtocol => "unsupported_protocol",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::NoConnect => "no_connect",
            Refusal::Outage => "outage",
            Refusal::Throttled => "throttled",
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::CertMissing => "cert_missing",
            Refusal::CertThumbprint => "cert_thumbprint",
            Refusal::CertExpired => "cert_expired",
            Refusal::CertNotYetValid => "cert_not_yet_valid",
            Refusal::CertUntrusted => "cert_untrusted",
            Refusal::CertSubject => "cert_subject",
        }
    }

    const ALL: [Refusal; 18] = [
        Refusal::BadCredentials,
        Refusal::ExpiredToken,
        Refusal::UnknownIdentity,
        Refusal::IdentityDisabled,
        Refusal::ClientIdMismatch,
        Refusal::BadUsername,
        Refusal::UnsupportedProtocol,
        Refusal::TlsHandshake,
        Refusal::NoConnect,
        Refusal::Outage,
        Refusal::Throttled,
        Refusal::ConnectionLimit,
        Refusal::CertMissing,
        Refusal::CertThumbprint,
        Refusal::CertExpired,
        Refusal::CertNotYetValid,
        Refusal::CertUntrusted,
        Refusal::CertSubject,
    ];
}

pub struct HubMetrics {
    registry: Registry,
    pub connections_hub: IntGauge,
    pub connections_dps: IntGauge,
    pub accepted_hub: IntCounter,
    pub accepted_dps: IntCounter,
    refused: IntCounterVec,
    disconnects: IntCounterVec,
    pub telemetry_received: IntCounter,
    pub telemetry_bytes: IntCounter,
    pub bytes_in: IntCounter,
    twin_ops: IntCounterVec,
    method_calls: IntCounterVec,
    pub method_latency: Histogram,
    dps_registrations: IntCounterVec,
    c2d: IntCounterVec,
    rest_requests: IntCounterVec,
    pub identities: IntGaugeVec,
    /// Faults injected, by kind.
    pub faults_injected: IntCounterVec,
    /// What devices sent that their announced model does not describe, by kind (`telemetry`,
    /// `property`, `command`); only with a model directory configured.
    pub model_mismatches: IntCounterVec,
    /// IoT Edge routing of modules' messages, by outcome (`module_input`, `unrouted`,
    /// `no_such_module`, `input_overflow`, `bad_routes`); upstream messages count as telemetry.
    pub edge_routed: IntCounterVec,
    /// Sequence-numbered telemetry, by kind of arrival (handles resolved once: per-message path).
    sequence: [IntCounter; 4],
}

fn counter_vec(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    reg.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

fn counter(reg: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("metric definition is valid");
    reg.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

impl Default for HubMetrics {
    fn default() -> Self {
        let reg = Registry::new();
        let connections = IntGaugeVec::new(
            Opts::new("fleetsim_hub_connections", "Open MQTT connections (TLS and WebSocket)"),
            &["kind"],
        )
        .unwrap();
        reg.register(Box::new(connections.clone())).unwrap();
        let accepted = counter_vec(
            &reg,
            "fleetsim_hub_connections_accepted_total",
            "MQTT connections accepted at CONNECT",
            &["kind"],
        );
        let refused = counter_vec(
            &reg,
            "fleetsim_hub_connections_refused_total",
            "Connections refused before or at CONNECT",
            &["reason"],
        );
        for r in Refusal::ALL {
            refused.with_label_values(&[r.label()]);
        }
        let disconnects =
            counter_vec(&reg, "fleetsim_hub_disconnects_total", "Accepted connections that ended", &["reason"]);
        for r in CloseReason::ALL {
            disconnects.with_label_values(&[r.label()]);
        }
        let method_latency = Histogram::with_opts(
            HistogramOpts::new(
                "fleetsim_hub_method_duration_seconds",
                "Direct method round trip, request published to response received",
            )
            .buckets(vec![0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .unwrap();
        reg.register(Box::new(method_latency.clone())).unwrap();
        let identities =
            IntGaugeVec::new(Opts::new("fleetsim_hub_identities", "Identities in the registry"), &["kind"]).unwrap();
        reg.register(Box::new(identities.clone())).unwrap();
        HubMetrics {
            connections_hub: connections.with_label_values(&["hub"]),
            connections_dps: connections.with_label_values(&["dps"]),
            accepted_hub: accepted.with_label_values(&["hub"]),
            accepted_dps: accepted.with_label_values(&["dps"]),
            refused,
            disconnects,
            telemetry_received: counter(
                &reg,
                "fleetsim_hub_telemetry_received_total",
                "Device-to-cloud messages accepted",
            ),
            telemetry_bytes: counter(
                &reg,
                "fleetsim_hub_telemetry_bytes_total",
                "Device-to-cloud payload bytes accepted",
            ),
            bytes_in: counter(&reg, "fleetsim_hub_mqtt_bytes_received_total", "MQTT bytes received (after TLS)"),
            twin_ops: counter_vec(
                &reg,
                "fleetsim_hub_twin_operations_total",
                "Twin operations by kind and outcome",
                &["op", "outcome"],
            ),
            method_calls: counter_vec(
                &reg,
                "fleetsim_hub_method_calls_total",
                "Direct method invocations by outcome",
                &["outcome"],
            ),
            method_latency,
            dps_registrations: counter_vec(
                &reg,
                "fleetsim_hub_dps_registrations_total",
                "DPS register requests by outcome",
                &["outcome"],
            ),
            c2d: counter_vec(&reg, "fleetsim_hub_c2d_messages_total", "Cloud-to-device message events", &["event"]),
            rest_requests: counter_vec(
                &reg,
                "fleetsim_hub_rest_requests_total",
                "Service and DPS HTTPS requests by status class",
                &["status"],
            ),
            identities,
            faults_injected: counter_vec(
                &reg,
                "fleetsim_hub_faults_injected_total",
                "Faults injected, by kind",
                &["kind"],
            ),
            model_mismatches: counter_vec(
                &reg,
                "fleetsim_hub_model_mismatches_total",
                "Values devices sent that their announced model does not describe, by kind",
                &["kind"],
            ),
            edge_routed: counter_vec(
                &reg,
                "fleetsim_hub_edge_routed_total",
                "IoT Edge routing of modules' messages, by outcome",
                &["outcome"],
            ),
            sequence: {
                let v = counter_vec(
                    &reg,
                    "fleetsim_hub_telemetry_sequence_total",
                    "Sequence-numbered telemetry: unique, duplicate, skipped (a higher number came first), late (a skipped one arrived)",
                    &["kind"],
                );
                ["unique", "duplicate", "skipped", "late"].map(|k| v.with_label_values(&[k]))
            },
            registry: reg,
        }
    }
}

impl HubMetrics {
    pub fn refused(&self, r: Refusal) {
        self.refused.with_label_values(&[r.label()]).inc();
    }

    /// Counts one sequence-stamped message by what it turned out to be.
    pub fn sequence_arrival(&self, a: Arrival) {
        let [unique, duplicate, skipped, late] = &self.sequence;
        match a {
            Arrival::New { skipped: n } => {
                unique.inc();
                skipped.inc_by(n);
            }
            Arrival::Filled => {
                unique.inc();
                late.inc();
            }
            Arrival::Duplicate => duplicate.inc(),
        }
    }

    /// What the fault injector did: injections by kind, the connects it refused, the
    /// connections it expired early.
    /// Faults injected so far, every kind together (the CI timeline's faults column).
    pub fn faults_injected_total(&self) -> u64 {
        use prometheus::core::Collector;
        self.faults_injected
            .collect()
            .iter()
            .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value() as u64))
            .sum()
    }

    pub fn faults_summary(&self) -> serde_json::Map<String, serde_json::Value> {
        use prometheus::core::Collector;
        let mut out = serde_json::Map::new();
        for family in self.faults_injected.collect() {
            for m in family.get_metric() {
                let kind = m.get_label().first().map(|l| l.value().to_owned()).unwrap_or_default();
                out.insert(kind, serde_json::json!(m.get_counter().get_value() as u64));
            }
        }
        for r in [Refusal::Outage, Refusal::Throttled] {
            let n = self.refused.with_label_values(&[r.label()]).get();
            out.insert(format!("refused_{}", r.label()), serde_json::json!(n));
        }
        for r in [CloseReason::TokenExpired, CloseReason::FaultInjected] {
            out.insert(
                format!("closed_{}", r.label()),
                serde_json::json!(self.disconnects.with_label_values(&[r.label()]).get()),
            );
        }
        out
    }

    pub fn disconnected(&self, r: CloseReason) {
        self.disconnects.with_label_values(&[r.label()]).inc();
    }

    pub fn twin_op(&self, op: &str, outcome: &str) {
        self.twin_ops.with_label_values(&[op, outcome]).inc();
    }

    pub fn method_call(&self, outcome: &str) {
        self.method_calls.with_label_values(&[outcome]).inc();
    }

    pub fn dps_registration(&self, outcome: &str) {
        self.dps_registrations.with_label_values(&[outcome]).inc();
    }

    pub fn c2d(&self, event: &str) {
        self.c2d.with_label_values(&[event]).inc();
    }

    pub fn rest_request(&self, status: u16) {
        let class = match status {
            200..=299 => "2xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        };
        self.rest_requests.with_label_values(&[class]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}
