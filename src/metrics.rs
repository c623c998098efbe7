//! The fleet's Prometheus metrics. Hot-path handles (telemetry counters, the PUBACK histogram)
//! are resolved once; labels are bounded by the scenario (command names, states, causes), never
//! by device.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Where an identity is in its life; the `state` label of `fleetsim_devices`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    Provisioning,
    Connecting,
    Connected,
    Backoff,
    Rebooting,
    Stopped,
}

impl DeviceState {
    pub const ALL: [DeviceState; 6] = [
        DeviceState::Provisioning,
        DeviceState::Connecting,
        DeviceState::Connected,
        DeviceState::Backoff,
        DeviceState::Rebooting,
        DeviceState::Stopped,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DeviceState::Provisioning => "provisioning",
            DeviceState::Connecting => "connecting",
            DeviceState::Connected => "connected",
            DeviceState::Backoff => "backoff",
            DeviceState::Rebooting => "rebooting",
            DeviceState::Stopped => "stopped",
        }
    }
}

/// The `q` quantile of sorted samples by nearest rank (the value at rank ceil(q n)).
pub fn nearest_rank(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

fn buckets_seconds() -> Vec<f64> {
    vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
}

pub struct FleetMetrics {
    registry: Registry,
    devices: IntGaugeVec,
    state_handles: Vec<IntGauge>,
    pub ever_connected: IntGauge,
    provision: IntCounterVec,
    pub provision_seconds: Histogram,
    connects: IntCounterVec,
    pub connect_seconds: Histogram,
    pub telemetry_generated: IntCounter,
    pub telemetry_sent: IntCounter,
    pub telemetry_retransmits: IntCounter,
    pub telemetry_acked: IntCounter,
    telemetry_dropped: IntCounterVec,
    pub telemetry_queued: IntGauge,
    pub telemetry_paused: IntCounter,
    pub telemetry_filtered: IntCounter,
    pub puback_seconds: Histogram,
    /// The CI end-to-end check: device send time to `iothub-enqueuedtime`.
    pub e2e_enqueued_seconds: Histogram,
    /// The CI end-to-end check: device send time to arrival at the endpoint reader.
    pub e2e_read_seconds: Histogram,
    /// Fleet messages the endpoint reader saw: `unique` or `duplicate`.
    e2e_events: IntCounterVec,
    commands: IntCounterVec,
    pub desired_patches: IntCounter,
    writable_acks: IntCounterVec,
    pub writable_ack_seconds: Histogram,
    /// Direct methods the fleet itself invoked (the web console's), call to the device's answer.
    pub method_seconds: Histogram,
    reconnects: IntCounterVec,
    pub token_renewals: IntCounter,
    pub c2d_received: IntCounter,
    module_inputs: IntCounterVec,
    edge_routed: IntCounterVec,
    twin: IntCounterVec,
    credential_reruns: IntCounterVec,
    /// First connections ever made: unlike `ever_connected`, a reload never lowers it, so rates
    /// computed from it are never negative.
    first_connects: std::sync::atomic::AtomicU64,
    /// When the latest first connection happened: the moment a ramp completed, not the progress
    /// tick that noticed it.
    last_first_connect: std::sync::Mutex<Option<std::time::Instant>>,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

impl Default for FleetMetrics {
    fn default() -> Self {
        let r = Registry::new();
        let devices = reg(
            &r,
            IntGaugeVec::new(Opts::new("fleetsim_devices", "Simulated identities by state"), &["state"]).unwrap(),
        );
        let state_handles = DeviceState::ALL.iter().map(|s| devices.with_label_values(&[s.label()])).collect();
        let cv = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntCounterVec::new(Opts::new(name, help), labels).unwrap())
        };
        let c = |name: &str, help: &str| reg(&r, IntCounter::new(name, help).unwrap());
        let h = |name: &str, help: &str| {
            reg(&r, Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets_seconds())).unwrap())
        };
        let m = FleetMetrics {
            ever_connected: reg(
                &r,
                IntGauge::new("fleetsim_devices_connected_once", "Identities that have connected at least once")
                    .unwrap(),
            ),
            provision: cv("fleetsim_provision_attempts_total", "DPS registrations by outcome", &["outcome"]),
            provision_seconds: h("fleetsim_provision_duration_seconds", "Time to a DPS assignment"),
            connects: cv("fleetsim_connect_attempts_total", "MQTT connection attempts by outcome", &["outcome"]),
            connect_seconds: h("fleetsim_connect_duration_seconds", "TCP, TLS and CONNECT to CONNACK"),
            telemetry_generated: c(
                "fleetsim_telemetry_generated_total",
                "Telemetry messages created (each gets a sequence number)",
            ),
            telemetry_sent: c(
                "fleetsim_telemetry_sent_total",
                "Telemetry PUBLISH packets written (QoS 1), resends included",
            ),
            telemetry_retransmits: c(
                "fleetsim_telemetry_retransmits_total",
                "Messages written again after the connection they were in flight on was lost",
            ),
            telemetry_acked: c("fleetsim_telemetry_acked_total", "Telemetry messages the hub acknowledged"),
            telemetry_dropped: cv(
                "fleetsim_telemetry_dropped_total",
                "Telemetry messages given up, by reason: buffer_full and shutdown were never written; \
                 unacked_at_shutdown were written and may be at the hub",
                &["reason"],
            ),
            telemetry_queued: reg(
                &r,
                IntGauge::new("fleetsim_telemetry_queued", "Telemetry messages buffered: unwritten or awaiting PUBACK")
                    .unwrap(),
            ),
            telemetry_paused: c(
                "fleetsim_telemetry_paused_total",
                "Readings not generated because the buffer was full (offline policy pause)",
            ),
            telemetry_filtered: c("fleetsim_telemetry_filtered_total", "Readings a send_if condition held back"),
            puback_seconds: h("fleetsim_telemetry_puback_seconds", "Publish to PUBACK"),
            e2e_enqueued_seconds: h(
                "fleetsim_e2e_enqueued_seconds",
                "End to end (CI): the device's send-time stamp to the hub's iothub-enqueuedtime",
            ),
            e2e_read_seconds: h(
                "fleetsim_e2e_read_seconds",
                "End to end (CI): the device's send-time stamp to arrival at the Event Hubs-compatible endpoint reader",
            ),
            e2e_events: cv(
                "fleetsim_e2e_events_total",
                "End to end (CI): this run's messages read from the Event Hubs-compatible endpoint, unique or duplicate",
                &["kind"],
            ),
            commands: cv(
                "fleetsim_commands_total",
                "Commands handled by name and answered status",
                &["command", "status"],
            ),
            desired_patches: c("fleetsim_desired_patches_total", "Desired-property patches received"),
            writable_acks: cv(
                "fleetsim_writable_acks_total",
                "Writable-property acknowledgements by status",
                &["status"],
            ),
            writable_ack_seconds: h("fleetsim_writable_ack_seconds", "Desired patch received to acknowledgement sent"),
            method_seconds: h(
                "fleetsim_console_method_seconds",
                "Direct methods invoked from the web console: the service call to the device's answer",
            ),
            reconnects: cv("fleetsim_reconnects_total", "Connections lost and re-made, by cause", &["cause"]),
            token_renewals: c("fleetsim_token_renewals_total", "SAS renewals (reconnects with a fresh token)"),
            c2d_received: c("fleetsim_c2d_received_total", "Cloud-to-device messages received"),
            module_inputs: cv(
                "fleetsim_module_inputs_total",
                "Messages that arrived on module inputs (IoT Edge), by what the module did: forwarded, \
                 filtered (send_if), consumed (no output), unhandled (no such input)",
                &["result"],
            ),
            edge_routed: cv(
                "fleetsim_edge_routed_total",
                "Module messages the fleet routed as a simulated Edge device's Edge hub (routing = \"fleet\"), \
                 by where they went: upstream, module_input, unrouted (no route took them), inbox_full \
                 (the receiving module's inbox was full), no_receiver (the module is not running)",
                &["result"],
            ),
            twin: cv(
                "fleetsim_twin_requests_total",
                "Twin GET and reported PATCH answers by status class",
                &["op", "status"],
            ),
            credential_reruns: cv(
                "fleetsim_credential_reruns_total",
                "Identities refused as unknown or unauthorized whose credential step ran again, by step: \
                 registry (re-created), dps (re-provisioned), none (nothing to re-create it with)",
                &["step"],
            ),
            devices,
            state_handles,
            registry: r,
            first_connects: Default::default(),
            last_first_connect: Default::default(),
        };
        for reason in Self::DROP_REASONS {
            m.telemetry_dropped.with_label_values(&[reason]);
        }
        for step in Self::RERUN_STEPS {
            m.credential_reruns.with_label_values(&[step]);
        }
        for result in Self::INPUT_RESULTS {
            m.module_inputs.with_label_values(&[result]);
        }
        for result in Self::EDGE_ROUTED {
            m.edge_routed.with_label_values(&[result]);
        }
        m
    }
}

impl FleetMetrics {
    /// One of this run's messages read at the back end: `unique` or `duplicate`.
    pub fn e2e_event(&self, kind: &'static str) {
        self.e2e_events.with_label_values(&[kind]).inc();
    }

    /// An identity connected for the first time.
    pub fn connected_first_time(&self) {
        self.ever_connected.inc();
        self.first_connects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.last_first_connect.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
    }

    /// First connections so far (never decreases).
    pub fn first_connects(&self) -> u64 {
        self.first_connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// When the latest first connection happened.
    pub fn last_first_connect(&self) -> Option<std::time::Instant> {
        *self.last_first_connect.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves one identity from one state to another (`None`: it is new).
    pub fn transition(&self, from: Option<DeviceState>, to: DeviceState) {
        if let Some(f) = from {
            self.state_handles[DeviceState::ALL.iter().position(|s| *s == f).expect("known state")].dec();
        }
        self.state_handles[DeviceState::ALL.iter().position(|s| *s == to).expect("known state")].inc();
    }

    /// An identity leaves the fleet (a reload removed it).
    pub fn remove(&self, from: DeviceState) {
        self.state_handles[DeviceState::ALL.iter().position(|s| *s == from).expect("known state")].dec();
    }

    pub fn state_count(&self, s: DeviceState) -> i64 {
        self.devices.with_label_values(&[s.label()]).get()
    }

    pub fn provisioned(&self, outcome: &str) {
        self.provision.with_label_values(&[outcome]).inc();
    }

    pub fn connect_attempt(&self, outcome: &str) {
        self.connects.with_label_values(&[outcome]).inc();
    }

    /// Reasons a message can be dropped; the first two were never written.
    pub const DROP_REASONS: [&'static str; 4] = ["buffer_full", "shutdown", "unacked_at_shutdown", "rejected_by_hub"];

    pub fn telemetry_dropped(&self, reason: &'static str, n: u64) {
        debug_assert!(Self::DROP_REASONS.contains(&reason));
        if n > 0 {
            self.telemetry_dropped.with_label_values(&[reason]).inc_by(n);
        }
    }

    pub fn dropped(&self, reason: &str) -> u64 {
        self.telemetry_dropped.with_label_values(&[reason]).get()
    }

    pub fn dropped_count(&self) -> u64 {
        Self::DROP_REASONS.iter().map(|r| self.dropped(r)).sum()
    }

    pub fn command(&self, name: &str, status: u16) {
        self.commands.with_label_values(&[name, &status.to_string()]).inc();
    }

    /// What a module did with messages on its inputs; the labels of `fleetsim_module_inputs_total`.
    pub const INPUT_RESULTS: [&'static str; 4] = ["forwarded", "filtered", "consumed", "unhandled"];

    pub fn module_input(&self, result: &'static str) {
        debug_assert!(Self::INPUT_RESULTS.contains(&result));
        self.module_inputs.with_label_values(&[result]).inc();
    }

    pub fn module_inputs(&self, result: &str) -> u64 {
        self.module_inputs.with_label_values(&[result]).get()
    }

    /// Where the fleet's Edge routing sent module messages; the labels of `fleetsim_edge_routed_total`.
    pub const EDGE_ROUTED: [&'static str; 5] = ["upstream", "module_input", "unrouted", "inbox_full", "no_receiver"];

    pub fn edge_routed(&self, result: &'static str) {
        debug_assert!(Self::EDGE_ROUTED.contains(&result));
        self.edge_routed.with_label_values(&[result]).inc();
    }

    pub fn edge_routed_count(&self, result: &str) -> u64 {
        self.edge_routed.with_label_values(&[result]).get()
    }

    pub fn writable_ack(&self, status: u16) {
        self.writable_acks.with_label_values(&[&status.to_string()]).inc();
    }

    /// Reconnects so far, by cause.
    pub fn reconnect_counts(&self) -> serde_json::Map<String, serde_json::Value> {
        use prometheus::core::Collector;
        let mut out = serde_json::Map::new();
        for family in self.reconnects.collect() {
            for metric in family.get_metric() {
                let cause = metric.get_label().first().map(|l| l.value().to_owned()).unwrap_or_default();
                out.insert(cause, serde_json::json!(metric.get_counter().get_value() as u64));
            }
        }
        out
    }

    /// What went wrong so far, by kind: connection attempts, DPS registrations and twin requests
    /// that failed (by outcome or status class) and commands answered with a non-2xx status.
    pub fn error_counts(&self) -> serde_json::Map<String, serde_json::Value> {
        use prometheus::core::Collector;
        let mut out = serde_json::Map::new();
        let mut add = |key: String, n: u64| {
            if n > 0 {
                let v = out.get(&key).and_then(|v| v.as_u64()).unwrap_or(0) + n;
                out.insert(key, serde_json::json!(v));
            }
        };
        let labels = |m: &prometheus::proto::Metric| -> Vec<String> {
            m.get_label().iter().map(|l| l.value().to_owned()).collect()
        };
        for (vec, kind) in [(&self.connects, "connect"), (&self.provision, "provision")] {
            for family in vec.collect() {
                for m in family.get_metric() {
                    let l = labels(m);
                    let outcome = l.first().map(String::as_str).unwrap_or("");
                    if outcome != "ok" && outcome != "assigned" {
                        add(format!("{kind}_{outcome}"), m.get_counter().get_value() as u64);
                    }
                }
            }
        }
        for family in self.twin.collect() {
            for m in family.get_metric() {
                if let [op, class] = &labels(m)[..]
                    && class != "2xx"
                {
                    add(format!("twin_{op}_{class}"), m.get_counter().get_value() as u64);
                }
            }
        }
        for family in self.commands.collect() {
            for m in family.get_metric() {
                if let [_, status] = &labels(m)[..]
                    && !status.starts_with('2')
                {
                    add(format!("command_{status}"), m.get_counter().get_value() as u64);
                }
            }
        }
        for reason in Self::DROP_REASONS {
            add(format!("dropped_{reason}"), self.dropped(reason));
        }
        out
    }

    pub fn reconnect(&self, cause: &str) {
        self.reconnects.with_label_values(&[cause]).inc();
    }

    /// The `step` labels of `fleetsim_credential_reruns_total` (`device::recovery::Step`).
    pub const RERUN_STEPS: [&'static str; 3] = ["registry", "dps", "none"];

    /// An identity refused as unknown or unauthorized runs `step` again.
    pub fn credential_rerun(&self, step: &'static str) {
        debug_assert!(Self::RERUN_STEPS.contains(&step));
        self.credential_reruns.with_label_values(&[step]).inc();
    }

    pub fn credential_reruns(&self, step: &str) -> u64 {
        self.credential_reruns.with_label_values(&[step]).get()
    }

    pub fn twin(&self, op: &str, status: u16) {
        let class = if status < 300 {
            "2xx"
        } else if status < 500 {
            "4xx"
        } else {
            "5xx"
        };
        self.twin.with_label_values(&[op, class]).inc();
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&v, 0.5), Some(50.0));
        assert_eq!(nearest_rank(&v, 0.99), Some(99.0));
        assert_eq!(nearest_rank(&[7.0], 0.99), Some(7.0));
        assert_eq!(nearest_rank(&[], 0.5), None);
    }
}
