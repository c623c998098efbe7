//! The daemon's configuration (`config.example.toml`): which hub (embedded emulator, an emulator
//! elsewhere via its hub.json, or Azure), which scenarios, the connection ramp, metrics and device
//! runtime knobs. Checked as a whole before anything starts; every problem is reported at once.
//! Secrets may be inline, `{ env = "VAR" }` or `{ file = "path" }`, and are never echoed.

pub mod ci;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use self::ci::CiConfig;
use crate::device::outbox::OfflinePolicy;
use crate::device::ramp::Schedule;
use crate::device::spec::Settings;
use crate::problems::{Problem, Problems};
use crate::tomlread::{Doc, MAX_DURATION, Node, Table, Val, show_duration};

/// The daemon config `run`, `check` and `cleanup` read when none is named.
pub const DEFAULT_CONFIG: &str = "config.example.toml";

/// A secret's value. `Debug` shows only where it came from.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    pub value: String,
    origin: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(from {})", self.origin)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum HubMode {
    /// The emulator in this process.
    Embedded {
        data_dir: PathBuf,
        mqtt_addr: SocketAddr,
        https_addr: SocketAddr,
        hub_config: Option<PathBuf>,
    },
    /// An emulator running elsewhere, found through its hub.json.
    External {
        hub_json: PathBuf,
    },
    Azure(AzureTarget),
}

#[derive(Debug, Clone, PartialEq)]
pub struct AzureTarget {
    pub dps_host: String,
    pub id_scope: Option<String>,
    pub group_key: Option<Secret>,
    pub service_connection_string: Option<Secret>,
    pub dps_service_connection_string: Option<Secret>,
    pub hub_host: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub gateway_host: Option<String>,
    pub mqtt_port: u16,
    pub https_port: u16,
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub file: PathBuf,
    pub scenarios: Vec<PathBuf>,
    pub hub: HubMode,
    pub ramp: Schedule,
    pub metrics_addr: Option<SocketAddr>,
    /// `[metrics] console`: serve the web console and its JSON API beside the metrics (default
    /// true; `run --no-console` turns it off).
    pub console: bool,
    pub settings: Settings,
    pub progress_interval: Duration,
    /// `[ci]`: run for a fixed time, then exit with a verdict.
    pub ci: Option<CiConfig>,
}

fn secret(doc: &mut Doc, t: &mut Table<'_>, key: &str, base: &Path) -> Option<Secret> {
    let field = t.field(key);
    let node: &Node = t.get(key)?;
    match &node.value {
        Val::Str(s) => Some(Secret { value: s.clone(), origin: "the config file".into() }),
        Val::Table(_) => {
            let mut st = doc.table(node, &field)?;
            let result = match (st.str(doc, "env"), st.str(doc, "file")) {
                (Some(var), None) => match std::env::var(&var) {
                    Ok(v) if !v.trim().is_empty() => {
                        Some(Secret { value: v.trim().to_owned(), origin: format!("${var}") })
                    }
                    _ => {
                        doc.error(node.span.clone(), &field, format!("environment variable {var} is not set"));
                        None
                    }
                },
                (None, Some(f)) => {
                    let path = base.join(&f);
                    match crate::fsio::read_text_capped(&path, crate::fsio::MAX_INPUT_FILE) {
                        Ok(v) => Some(Secret { value: v.trim().to_owned(), origin: path.display().to_string() }),
                        Err(e) => {
                            doc.error(
                                node.span.clone(),
                                &field,
                                format!("cannot read {}: {}", path.display(), crate::tomlread::io_reason(&e)),
                            );
                            None
                        }
                    }
                }
                _ => {
                    doc.error(node.span.clone(), &field, "give exactly one of env = \"VAR\" or file = \"path\"");
                    None
                }
            };
            st.finish(doc);
            result
        }
        other => {
            doc.error(
                node.span.clone(),
                &field,
                format!("expected a string or {{ env = .. }} / {{ file = .. }}, found {}", other.kind()),
            );
            None
        }
    }
}

fn addr(doc: &mut Doc, t: &mut Table<'_>, key: &str, default: &str) -> SocketAddr {
    let span = t.span_of(key);
    let field = t.field(key);
    let text = t.str(doc, key).unwrap_or_else(|| default.to_owned());
    text.parse().unwrap_or_else(|_| {
        doc.error(span, &field, format!("\"{text}\" is not an address like 127.0.0.1:8883"));
        default.parse().expect("default address")
    })
}

/// Expands `dir/*.toml`-style patterns (a `*` in the file name only) relative to `base`.
fn expand_glob(base: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    let path = base.join(pattern);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !name.contains('*') {
        return Ok(vec![path]);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let (prefix, suffix) = name.split_once('*').expect("contains *");
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {}", dir.display(), crate::tomlread::io_reason(&e)))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().map(|n| n.to_string_lossy()).is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    out.sort();
    Ok(out)
}

impl DaemonConfig {
    pub fn load(path: &Path) -> Result<DaemonConfig, Problems> {
        match Self::read(path) {
            (Some(c), d) if d.is_empty() => Ok(c),
            (_, d) => Err(Problems(d)),
        }
    }

    pub fn parse(path: &Path, text: String) -> Result<DaemonConfig, Problems> {
        match Self::parse_all(path, text) {
            (Some(c), d) if d.is_empty() => Ok(c),
            (_, d) => Err(Problems(d)),
        }
    }

    /// Reads a config as far as it can be read: the config (with defaults where fields are bad)
    /// whenever the file is a TOML table, and every problem. `fleetsim check` uses the partial
    /// config to go on and check the scenario files it names.
    pub fn read(path: &Path) -> (Option<DaemonConfig>, Vec<Problem>) {
        match crate::fsio::read_text_capped(path, crate::fsio::MAX_INPUT_FILE) {
            Ok(text) => Self::parse_all(path, text),
            Err(e) => (None, vec![Problem::file(path, format!("cannot read: {}", crate::tomlread::io_reason(&e)))]),
        }
    }

    fn parse_all(path: &Path, text: String) -> (Option<DaemonConfig>, Vec<Problem>) {
        let base = path.parent().map(Path::to_owned).unwrap_or_default();
        let (mut doc, root) = Doc::parse(path.display().to_string(), text);
        let mut cfg = None;
        if let Some(mut top) = doc.table(&root, "") {
            let mut scenarios = Vec::new();
            let span = top.span_of("scenarios");
            for pattern in top.strings(&mut doc, "scenarios").unwrap_or_default() {
                match expand_glob(&base, &pattern) {
                    Ok(found) if found.is_empty() => {
                        doc.error(span.clone(), "scenarios", format!("\"{pattern}\" matches no file"))
                    }
                    Ok(found) => scenarios.extend(found),
                    Err(e) => doc.error(span.clone(), "scenarios", format!("\"{pattern}\": {e}")),
                }
            }
            let hub = hub_mode(&mut doc, &mut top, &base);
            let ramp = ramp(&mut doc, &mut top);
            let (metrics_addr, console) = match top.table(&mut doc, "metrics") {
                Some(mut m) => {
                    let enabled = m.bool(&mut doc, "enabled").unwrap_or(true);
                    let a = addr(&mut doc, &mut m, "addr", "127.0.0.1:9100");
                    let console = m.bool(&mut doc, "console").unwrap_or(true);
                    m.finish(&mut doc);
                    (enabled.then_some(a), console)
                }
                None => (Some("127.0.0.1:9100".parse().expect("default")), true),
            };
            let (settings, progress_interval) = settings(&mut doc, &mut top);
            let ci = ci::read(&mut doc, &mut top, &base);
            top.finish(&mut doc);
            cfg = Some(DaemonConfig {
                file: path.to_owned(),
                scenarios,
                hub,
                ramp,
                metrics_addr,
                console,
                settings,
                progress_interval,
                ci,
            });
        }
        (cfg, doc.into_problems())
    }
}

fn hub_mode(doc: &mut Doc, top: &mut Table<'_>, base: &Path) -> HubMode {
    let embedded_default = || HubMode::Embedded {
        data_dir: base.join(".fleetsim/hub"),
        mqtt_addr: "127.0.0.1:8883".parse().expect("default"),
        https_addr: "127.0.0.1:8443".parse().expect("default"),
        hub_config: None,
    };
    let Some(mut h) = top.table(doc, "hub") else { return embedded_default() };
    let mode = h.choice(doc, "mode", &["embedded", "external", "azure"]).unwrap_or("embedded");
    let result = match mode {
        "external" => {
            let p = h.req_str(doc, "hub_json").unwrap_or_default();
            HubMode::External { hub_json: base.join(p) }
        }
        "azure" => {
            let a = AzureTarget {
                dps_host: h.str(doc, "dps_host").unwrap_or_else(|| "global.azure-devices-provisioning.net".into()),
                id_scope: h.str(doc, "id_scope"),
                group_key: secret(doc, &mut h, "group_key", base),
                service_connection_string: secret(doc, &mut h, "service_connection_string", base),
                dps_service_connection_string: secret(doc, &mut h, "dps_service_connection_string", base),
                hub_host: h.str(doc, "hub_host"),
                ca_file: h.str(doc, "ca_file").map(|f| base.join(f)),
                gateway_host: h.str(doc, "gateway_host"),
                mqtt_port: h.u64_in(doc, "mqtt_port", 1..=65535).map_or(8883, |p| p as u16),
                https_port: h.u64_in(doc, "https_port", 1..=65535).map_or(443, |p| p as u16),
            };
            if let Some(k) = &a.group_key
                && crate::iot::sas::Key::from_base64(&k.value).is_err()
            {
                doc.error(h.span_of("group_key"), &h.field("group_key"), "is not a base64 key");
            }
            for (key, cs) in [
                ("service_connection_string", &a.service_connection_string),
                ("dps_service_connection_string", &a.dps_service_connection_string),
            ] {
                if let Some(cs) = cs
                    && let Err(e) = cs.value.parse::<crate::iot::connection_string::ConnectionString>()
                {
                    doc.error(h.span_of(key), &h.field(key), e.to_string());
                }
            }
            HubMode::Azure(a)
        }
        _ => {
            let HubMode::Embedded { data_dir, .. } = embedded_default() else { unreachable!() };
            HubMode::Embedded {
                data_dir: h.str(doc, "data_dir").map_or(data_dir, |d| base.join(d)),
                mqtt_addr: addr(doc, &mut h, "mqtt_addr", "127.0.0.1:8883"),
                https_addr: addr(doc, &mut h, "https_addr", "127.0.0.1:8443"),
                hub_config: h.str(doc, "config").map(|c| base.join(c)),
            }
        }
    };
    h.finish(doc);
    result
}

/// Connections per second a ramp may ask for: slower than one per 1,000 s is a typo, and faster than
/// a million is beyond any hub's connect throttle (and `1 / rate` must stay a usable `Duration`).
const RAMP_RATES: std::ops::RangeInclusive<f64> = 0.001..=1_000_000.0;

fn ramp(doc: &mut Doc, top: &mut Table<'_>) -> Schedule {
    let Some(mut r) = top.table(doc, "ramp") else { return Schedule::constant(200.0) };
    let rate = r.f64_in(doc, "rate", RAMP_RATES).unwrap_or(200.0);
    let mut steps = vec![(Duration::ZERO, rate)];
    for mut s in r.tables(doc, "schedule") {
        let after = s.duration(doc, "after");
        let rate = s.f64_in(doc, "rate", RAMP_RATES);
        match (after, rate) {
            (Some(a), Some(x)) => steps.push((a, x)),
            _ => {
                for k in ["after", "rate"] {
                    if !s.has(k) {
                        s.missing(doc, k);
                    }
                }
            }
        }
        s.finish(doc);
    }
    if steps.windows(2).any(|w| w[1].0 <= w[0].0 && w[1].0 != Duration::ZERO) {
        doc.error(r.span.clone(), &r.field("schedule"), "steps must come in increasing `after` order");
    }
    r.finish(doc);
    Schedule(steps)
}

fn settings(doc: &mut Doc, top: &mut Table<'_>) -> (Settings, Duration) {
    let d = Settings::default();
    let mut progress = Duration::from_secs(10);
    let Some(mut t) = top.table(doc, "device") else { return (d, progress) };
    let secs = Duration::from_secs;
    let s = Settings {
        token_ttl: t.duration_in(doc, "token_ttl", secs(60), MAX_DURATION).unwrap_or(d.token_ttl),
        renew_at: t.f64_in(doc, "renew_at", 0.1..=0.99).unwrap_or(d.renew_at),
        // IoT Hub's MQTT keep-alive ceiling: it closes a connection silent for 1.5x, at most 1767 s.
        keep_alive: t.duration_in(doc, "keep_alive", secs(1), secs(1177)).map_or(d.keep_alive, |k| k.as_secs() as u16),
        backoff_base: t
            .duration_in(doc, "backoff_base", Duration::from_millis(1), secs(3600))
            .unwrap_or(d.backoff_base),
        backoff_cap: t.duration_in(doc, "backoff_cap", Duration::from_millis(1), secs(86_400)).unwrap_or(d.backoff_cap),
        connect_timeout: t.duration_in(doc, "connect_timeout", secs(1), secs(600)).unwrap_or(d.connect_timeout),
        shutdown_grace: t.duration_in(doc, "shutdown_grace", Duration::ZERO, secs(3600)).unwrap_or(d.shutdown_grace),
        // MQTT packet ids are 16 bits: more in flight than that cannot be told apart.
        max_inflight: t.u64_in(doc, "max_inflight", 1..=65_535).map_or(d.max_inflight, |m| m as usize),
        buffer: t.u64_in(doc, "buffer", 2..=10_000_000).map_or(d.buffer, |b| b as usize),
        offline_policy: match t.choice(doc, "offline", &["drop_oldest", "pause"]) {
            Some("pause") => OfflinePolicy::Pause,
            Some(_) => OfflinePolicy::DropOldest,
            None => d.offline_policy,
        },
        sequence_numbers: t.bool(doc, "sequence_numbers").unwrap_or(d.sequence_numbers),
        provision_concurrency: t
            .u64_in(doc, "provision_concurrency", 1..=100_000)
            .map_or(d.provision_concurrency, |m| m as usize),
    };
    if s.backoff_cap < s.backoff_base {
        doc.error(
            t.span_of("backoff_cap"),
            &t.field("backoff_cap"),
            format!("must not be below backoff_base ({})", show_duration(s.backoff_base)),
        );
    }
    if s.buffer <= s.max_inflight {
        doc.error(
            t.span_of("buffer"),
            &t.field("buffer"),
            format!("must be larger than max_inflight ({}), so unwritten messages have room", s.max_inflight),
        );
    }
    if let Some(p) = t.duration_in(doc, "progress_interval", secs(1), secs(86_400)) {
        progress = p;
    }
    t.finish(doc);
    (s, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let c = DaemonConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(c.hub, HubMode::Embedded { .. }));
        assert_eq!(c.scenarios.len(), 5, "{:?}", c.scenarios);
    }

    #[test]
    fn hub_side_loss_is_judged_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let judged = |extra: &str| {
            let path = dir.path().join("c.toml");
            std::fs::write(&path, format!("scenarios = []\n[ci]\nduration = \"1s\"\n{extra}")).unwrap();
            DaemonConfig::load(&path).unwrap_or_else(|e| panic!("{e}")).ci.unwrap().judge_hub_loss
        };
        assert!(!judged(""));
        assert!(judged("judge_hub_loss = true\n"));
    }

    #[test]
    fn the_html_and_junit_reports_go_beside_the_json_one_unless_told() {
        use super::ci::ReportFile;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let load = |extra: &str| {
            std::fs::write(&path, format!("scenarios = []\n[ci]\nduration = \"1s\"\n{extra}")).unwrap();
            DaemonConfig::load(&path).map(|c| c.ci.unwrap())
        };
        let ci = load("report = \"out/r.json\"\njunit_report = false\n").unwrap();
        let json = ci.report.as_deref();
        assert_eq!(ci.html_report.path(json, "html"), Some(dir.path().join("out/r.html")));
        assert_eq!(ci.junit_report.path(json, "junit.xml"), None);
        let ci = load("html_report = \"x/page.html\"\n").unwrap();
        assert_eq!(ci.html_report, ReportFile::At(dir.path().join("x/page.html")));
        assert_eq!(ci.junit_report.path(None, "junit.xml"), None, "nothing beside a JSON report not written");
        // A JSON report named .html is never overwritten.
        let odd = std::path::Path::new("r.html");
        assert_eq!(ReportFile::Beside.path(Some(odd), "html"), Some("r.html.html".into()));
        let e = load("html_report = 3\n").unwrap_err().to_string();
        assert!(e.contains("ci.html_report") && e.contains("expected a path or false"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_and_secrets_stay_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"
scenarios = ["nothing-*.toml"]
[hub]
mode = "azure"
id_scope = "0ne00000000"
group_key = { env = "FLEETSIM_TEST_UNSET_VARIABLE" }
service_connection_string = "HostName=h;SharedAccessKeyName=p;SharedAccessKey=c2VjcmV0LXNlcnZpY2Uta2V5"
bogus = 1
[ramp]
rate = 0
[device]
renew_at = 2.0
buffer = 4
offline = "sometimes"
[ci]
settle = "1m"
[ci.thresholds]
max_error_rate = 2
[ci.probe]
payload = "{not json"
"#;
        let err = DaemonConfig::parse(&dir.path().join("c.toml"), text.to_owned()).unwrap_err().to_string();
        for want in [
            "c.toml:2:13: scenarios: \"nothing-*.toml\" matches no file",
            "hub.group_key: environment variable FLEETSIM_TEST_UNSET_VARIABLE is not set",
            "c.toml:8:1: hub.bogus: unknown field",
            "c.toml:10:8: ramp.rate: must be a number from 0.001 to 1000000",
            "device.renew_at: must be a number from 0.1 to 0.99",
            "device.buffer: must be larger than max_inflight (16)",
            "device.offline: expected one of \"drop_oldest\", \"pause\"",
            "c.toml:15:1: ci.duration: is required",
            "ci.thresholds.max_error_rate: is a fraction between 0 and 1",
            "ci.probe.method: is required",
            "ci.probe.payload: is not JSON",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
        assert!(!err.contains("c2VjcmV0"), "a secret leaked into:\n{err}");
    }
}
