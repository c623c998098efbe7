//! `[ci]` in the daemon config: how long a CI run lasts, its settle period, its thresholds, the
//! method probe and the end-to-end check (`[ci.end_to_end]`). Pure data, read here with the rest
//! of the config; `fleet::ci` runs and judges.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::Secret;
use crate::tomlread::{Doc, Table};

/// `[ci]` in the daemon config.
#[derive(Debug, Clone)]
pub struct CiConfig {
    pub duration: Duration,
    /// After `duration`, how long the fleet may take to be all connected again with every
    /// buffered message acknowledged.
    pub settle: Duration,
    pub report: Option<std::path::PathBuf>,
    /// The self-contained HTML report (`fleet::html`).
    pub html_report: ReportFile,
    /// The verdict as JUnit XML, one test case per check (`fleet::junit`).
    pub junit_report: ReportFile,
    /// Turn an external emulator's faults off before the settle period (the embedded one's
    /// always are: they are this run's own).
    pub lift_faults: bool,
    /// Judge messages the hub acknowledged and then lost (an emulator that crashed, a hub that
    /// forgot identities) against `max_lost` too; by default only the fleet's own losses are.
    pub judge_hub_loss: bool,
    pub thresholds: Thresholds,
    pub probe: Option<Probe>,
    pub end_to_end: EndToEnd,
}

/// Where one of the report's other files goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReportFile {
    /// Beside the JSON report, named after it (`report.json` -> `report.html`,
    /// `report.junit.xml`); not written without a JSON report file.
    #[default]
    Beside,
    Off,
    At(std::path::PathBuf),
}

impl ReportFile {
    /// The path to write, given the JSON report's and this file's suffix (`html`, `junit.xml`).
    pub fn path(&self, json: Option<&Path>, suffix: &str) -> Option<std::path::PathBuf> {
        match self {
            ReportFile::Off => None,
            ReportFile::At(p) => Some(p.clone()),
            ReportFile::Beside => json.map(|j| match j.with_extension(suffix) {
                // `report.html` as the JSON report's own name: never overwrite it.
                same if same == j => std::path::PathBuf::from(format!("{}.{suffix}", j.display())),
                beside => beside,
            }),
        }
    }

    /// `path = "..."` or `false` in the config, relative to the config's directory.
    fn read(doc: &mut Doc, t: &mut Table<'_>, key: &str, base: &Path) -> ReportFile {
        let Some(node) = t.get(key) else { return ReportFile::Beside };
        match &node.value {
            crate::tomlread::Val::Str(s) if !s.is_empty() => ReportFile::At(base.join(s)),
            crate::tomlread::Val::Bool(false) => ReportFile::Off,
            v => {
                doc.error(node.span.clone(), &t.field(key), format!("expected a path or false, found {}", v.kind()));
                ReportFile::Beside
            }
        }
    }
}

/// `[ci.end_to_end]`: read the hub's Event Hubs-compatible endpoint for the run, count the
/// fleet's sequence stamps that reach it and time them from the device's send-time stamp.
#[derive(Debug, Clone)]
pub struct EndToEnd {
    /// `None`: on when the endpoint is known without configuration (an emulator, whose hub.json
    /// names it), or a connection string is given; off otherwise.
    pub enabled: Option<bool>,
    /// The Event Hubs connection string with `EntityPath` (Azure portal: IoT hub, Built-in
    /// endpoints). Not needed for an emulator.
    pub connection_string: Option<Secret>,
    pub consumer_group: String,
    /// After the fleet stops, how long the reader may take to catch up with every message the hub
    /// acknowledged.
    pub drain: Duration,
    /// Messages the hub acknowledged that never reached the reader. `None`: not checked.
    pub max_missing: Option<u64>,
    /// Send time to `iothub-enqueuedtime`, 99th percentile.
    pub enqueued_p99: Option<Duration>,
    /// Send time to arrival at the reader, 99th percentile.
    pub read_p99: Option<Duration>,
}

impl Default for EndToEnd {
    fn default() -> Self {
        EndToEnd {
            enabled: None,
            connection_string: None,
            consumer_group: "$Default".into(),
            drain: Duration::from_secs(30),
            max_missing: Some(0),
            enqueued_p99: None,
            read_p99: None,
        }
    }
}

/// Pass/fail limits. `None` means not checked.
#[derive(Debug, Clone)]
pub struct Thresholds {
    /// Messages the fleet lost: written, never acknowledged, and not at the hub (needs the
    /// emulator's sequence counts). With `CiConfig::judge_hub_loss`, also the limit for messages
    /// the hub acknowledged and then lost.
    pub max_lost: Option<u64>,
    /// Messages the fleet's own books cannot place (generated, yet not acked, dropped or queued).
    pub max_unaccounted: Option<u64>,
    /// Messages dropped by the buffer policy or at shutdown.
    pub max_dropped: Option<u64>,
    /// Identities not connected at the end of the settle period.
    pub max_stuck: Option<u64>,
    /// Every identity connected at least once within this long of the start.
    pub all_connected_within: Option<Duration>,
    pub method_p99: Option<Duration>,
    /// (dropped telemetry + failed method probes) / (generated telemetry + method probes).
    pub max_error_rate: Option<f64>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_lost: Some(0),
            max_unaccounted: Some(0),
            max_dropped: None,
            max_stuck: Some(0),
            all_connected_within: None,
            method_p99: None,
            max_error_rate: None,
        }
    }
}

/// A direct method invoked on a random identity every `every`.
#[derive(Debug, Clone)]
pub struct Probe {
    pub method: String,
    pub payload: Value,
    pub every: Duration,
    pub response_timeout: Duration,
}

impl Default for CiConfig {
    fn default() -> Self {
        CiConfig {
            duration: Duration::from_secs(60),
            settle: Duration::from_secs(60),
            report: None,
            html_report: ReportFile::Beside,
            junit_report: ReportFile::Beside,
            lift_faults: true,
            judge_hub_loss: false,
            thresholds: Thresholds::default(),
            probe: None,
            end_to_end: EndToEnd::default(),
        }
    }
}

/// Reads `[ci]`, if present; problems go to `doc`.
pub(super) fn read(doc: &mut Doc, top: &mut Table<'_>, base: &Path) -> Option<CiConfig> {
    let mut t = top.table(doc, "ci")?;
    let d = CiConfig::default();
    let duration = match t.duration(doc, "duration") {
        Some(x) if x.is_zero() => {
            doc.error(t.span_of("duration"), &t.field("duration"), "must be above zero");
            d.duration
        }
        Some(x) => x,
        None => {
            t.missing(doc, "duration");
            d.duration
        }
    };
    let mut thresholds = Thresholds::default();
    if let Some(mut th) = t.table(doc, "thresholds") {
        // A threshold set to -1 is switched off (TOML has no null).
        let mut limit = |doc: &mut Doc, key: &str, default: Option<u64>| match th.f64(doc, key) {
            Some(v) if v < 0.0 => None,
            Some(v) => Some(v as u64),
            None => default,
        };
        thresholds.max_lost = limit(doc, "max_lost", thresholds.max_lost);
        thresholds.max_unaccounted = limit(doc, "max_unaccounted", thresholds.max_unaccounted);
        thresholds.max_dropped = limit(doc, "max_dropped", thresholds.max_dropped);
        thresholds.max_stuck = limit(doc, "max_stuck", thresholds.max_stuck);
        thresholds.all_connected_within = th.duration(doc, "all_connected_within");
        thresholds.method_p99 = th.duration(doc, "method_p99");
        thresholds.max_error_rate = th.f64(doc, "max_error_rate");
        if thresholds.max_error_rate.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
            doc.error(th.span_of("max_error_rate"), &th.field("max_error_rate"), "is a fraction between 0 and 1");
        }
        th.finish(doc);
    }
    let probe = t.table(doc, "probe").map(|mut p| {
        let method = p.req_str(doc, "method").unwrap_or_default();
        let payload = match p.str(doc, "payload") {
            Some(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                doc.error(p.span_of("payload"), &p.field("payload"), format!("is not JSON: {e}"));
                serde_json::Value::Null
            }),
            None => serde_json::Value::Null,
        };
        let probe = Probe {
            method,
            payload,
            every: p
                .duration_in(doc, "every", Duration::from_millis(10), Duration::from_secs(3600))
                .unwrap_or(Duration::from_secs(1)),
            // IoT Hub's responseTimeoutInSeconds allows at most 300.
            response_timeout: p
                .duration_in(doc, "response_timeout", Duration::from_secs(1), Duration::from_secs(300))
                .unwrap_or(Duration::from_secs(10)),
        };
        p.finish(doc);
        probe
    });
    let end_to_end = match t.table(doc, "end_to_end") {
        None => EndToEnd::default(),
        Some(mut e) => {
            let d = EndToEnd::default();
            let connection_string = super::secret(doc, &mut e, "connection_string", base);
            if let Some(cs) = &connection_string
                && let Err(why) = cs.value.parse::<crate::backend::target::EventHubTarget>()
            {
                doc.error(e.span_of("connection_string"), &e.field("connection_string"), why.to_string());
            }
            let group = e.str(doc, "consumer_group").unwrap_or(d.consumer_group);
            if group.is_empty() || group.contains('/') {
                doc.error(e.span_of("consumer_group"), &e.field("consumer_group"), "is a consumer group name");
            }
            let max_missing = match e.f64(doc, "max_missing") {
                Some(v) if v < 0.0 => None,
                Some(v) => Some(v as u64),
                None => d.max_missing,
            };
            let end_to_end = EndToEnd {
                enabled: e.bool(doc, "enabled"),
                connection_string,
                consumer_group: group,
                drain: e.duration_in(doc, "drain", Duration::ZERO, Duration::from_secs(3600)).unwrap_or(d.drain),
                max_missing,
                enqueued_p99: e.duration(doc, "enqueued_p99"),
                read_p99: e.duration(doc, "read_p99"),
            };
            e.finish(doc);
            end_to_end
        }
    };
    let cfg = CiConfig {
        duration,
        settle: t.duration(doc, "settle").unwrap_or(d.settle),
        report: t.str(doc, "report").map(|r| base.join(r)),
        html_report: ReportFile::read(doc, &mut t, "html_report", base),
        junit_report: ReportFile::read(doc, &mut t, "junit_report", base),
        lift_faults: t.bool(doc, "lift_faults").unwrap_or(d.lift_faults),
        judge_hub_loss: t.bool(doc, "judge_hub_loss").unwrap_or(d.judge_hub_loss),
        thresholds,
        probe,
        end_to_end,
    };
    t.finish(doc);
    Some(cfg)
}
