//! A fleet outlives its hub: an external emulator (`fleetsim hub`, a child process) is killed
//! with SIGKILL under a running fleet and started again on the same data dir and ports. With its
//! store (the default) it comes back with every identity, twin and enrollment, and the fleet
//! reconnects without creating anything. In memory (`--in-memory`) it comes back with an
//! empty registry. Connection-string devices and their modules are created again through the
//! registry, DPS devices re-provision (the individual enrollment is made again), every identity
//! connects, desired properties set on the new twins are acknowledged with their new versions,
//! and the CI report tells the messages the dead hub had acknowledged apart from the fleet's own
//! losses. The same recovery without a restart: identities deleted from under a running fleet
//! (as someone might on a real hub) come back. And the credential step, run again, writes only
//! what the fleet owns.

use fleetsim_testkit as common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::Api;
use fleetsim::metrics::DeviceState;
use serde_json::{Value, json};

/// Every wait here is bounded by this; reconnecting takes a few backoff rounds of at most 1 s.
const BOUND: Duration = Duration::from_secs(60);

const SCENARIO: &str = r#"
[[devices]]
name = "direct"
count = 2
id = "direct-{n}"
provisioning = "connection_string"
[devices.telemetry]
interval = "100ms"
fields = { x = { kind = "uniform", min = 0, max = 1 } }
[[devices.writable]]
name = "target"
type = "number"
[[devices.modules]]
id = "mod"
[[devices.modules.telemetry]]
interval = "100ms"
fields = { y = 1 }
[[devices.modules.writable]]
name = "target"
type = "number"

[[devices]]
name = "group"
count = 2
id = "group-{n}"
provisioning = "dps"
enrollment = "group"
dps_transport = "https"
[devices.telemetry]
interval = "100ms"
fields = { z = 1 }
[[devices.writable]]
name = "target"
type = "number"

[[devices]]
name = "individual"
count = 1
id = "individual-{n}"
provisioning = "dps"
enrollment = "individual"
dps_transport = "mqtt"
[devices.telemetry]
interval = "100ms"
fields = { w = 1 }
[[devices.writable]]
name = "target"
type = "number"
"#;

/// Every identity of `SCENARIO`: device, module.
const IDENTITIES: [(&str, Option<&str>); 7] = [
    ("direct-1", None),
    ("direct-1", Some("mod")),
    ("direct-2", None),
    ("direct-2", Some("mod")),
    ("group-1", None),
    ("group-2", None),
    ("individual-1", None),
];

/// An external emulator; SIGKILLed when dropped, so a failing test leaves no process behind.
struct HubProcess {
    child: Child,
}

impl HubProcess {
    /// `fleetsim hub` on fixed ports, its log appended to `log`; `extra` flags after the rest.
    fn start(data_dir: &Path, mqtt: u16, https: u16, log: &Path, extra: &[&str]) -> HubProcess {
        Self::start_with_amqp(data_dir, mqtt, https, 0, log, extra)
    }

    /// The same, with the AMQP listener on a fixed port too (0: any), for a reader that must find
    /// the restarted hub where it was.
    fn start_with_amqp(data_dir: &Path, mqtt: u16, https: u16, amqp: u16, log: &Path, extra: &[&str]) -> HubProcess {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fleetsim"))
            .args(["hub", "--data-dir", data_dir.to_str().unwrap()])
            .args(["--mqtt-addr", &format!("127.0.0.1:{mqtt}"), "--https-addr", &format!("127.0.0.1:{https}")])
            .args(["--amqp-addr", &format!("127.0.0.1:{amqp}")])
            .arg("--no-metrics")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("fleetsim hub starts");
        HubProcess { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Two ports that were free a moment ago (bound to port 0 together, then released): the
/// restarted hub must come back where the fleet expects it.
fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

/// Polls `check` every 100 ms until it holds, failing the test after `BOUND`.
async fn until<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    common::wait_until_for(what, BOUND, check).await
}

/// Waits until the emulator in `data_dir` serves both ports (its hub.json is written after it
/// bound them, but on a restart the old one is still there).
async fn serving(data_dir: &Path, mqtt: u16, https: u16) {
    until("the emulator to listen", || async {
        data_dir.join("hub.json").exists()
            && tokio::net::TcpStream::connect(("127.0.0.1", mqtt)).await.is_ok()
            && tokio::net::TcpStream::connect(("127.0.0.1", https)).await.is_ok()
    })
    .await;
}

fn twin_path(device: &str, module: Option<&str>) -> String {
    match module {
        Some(m) => format!("/twins/{device}/modules/{m}"),
        None => format!("/twins/{device}"),
    }
}

fn identity_path(device: &str, module: Option<&str>) -> String {
    match module {
        Some(m) => format!("/devices/{device}/modules/{m}"),
        None => format!("/devices/{device}"),
    }
}

/// Sets desired `target` and returns the twin's new desired `$version`.
async fn set_target(api: &Api, device: &str, module: Option<&str>, value: u64) -> u64 {
    let patch = json!({"properties": {"desired": {"target": value}}});
    let (status, _, body) = api.rest("PATCH", &twin_path(device, module), Some(patch)).await;
    assert_eq!(status, 200, "{device}/{module:?}: {body}");
    body["properties"]["desired"]["$version"].as_u64().unwrap()
}

/// Waits until the identity acknowledged `target` = `value` at desired version `version` (PnP).
async fn acked(api: &Api, device: &str, module: Option<&str>, value: u64, version: u64) {
    let what = format!("{device}/{module:?} to acknowledge target {value} at version {version}");
    until(&what, || async {
        let (status, _, twin) = api.rest("GET", &twin_path(device, module), None).await;
        let ack = &twin["properties"]["reported"]["target"];
        status == 200 && ack["value"] == value && ack["av"] == version && ack["ac"] == 200
    })
    .await;
}

/// Whether the emulator's registry shows the identity connected.
async fn connected_at_hub(api: &Api, device: &str, module: Option<&str>) -> bool {
    let (status, _, body) = api.rest("GET", &identity_path(device, module), None).await;
    status == 200 && body["connectionState"] == "Connected"
}

fn fleet_config(dir: &Path, hub_json: &Path, scenario: &Path) -> PathBuf {
    let text = format!(
        "scenarios = [{:?}]\n[hub]\nmode = \"external\"\nhub_json = {:?}\n[metrics]\nenabled = false\n\
         [ramp]\nrate = 2000\n[device]\nbackoff_base = \"100ms\"\nbackoff_cap = \"1s\"\n",
        scenario.display().to_string(),
        hub_json.display().to_string(),
    );
    let path = dir.join("fleet.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_recovers_every_identity_after_its_external_hub_restarts_empty() {
    common::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("hub");
    let log = dir.path().join("hub.log");
    let (mqtt, https) = free_ports();
    let mut hub = HubProcess::start(&data_dir, mqtt, https, &log, &["--in-memory"]);
    serving(&data_dir, mqtt, https).await;

    let scenario = dir.path().join("s.toml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    let cfg = fleetsim::config::DaemonConfig::load(&fleet_config(dir.path(), &data_dir.join("hub.json"), &scenario))
        .unwrap_or_else(|e| panic!("{e}"));
    let templates = fleetsim::scenario::schema::load(&cfg.scenarios).unwrap_or_else(|e| panic!("{e}"));
    let fleet = fleetsim::fleet::start(&cfg, templates, Default::default()).await.expect("fleet starts");
    let api = Api::new(fleet.hub_info.clone().unwrap());
    let m = fleet.shared.metrics.clone();
    let total = IDENTITIES.len() as i64;
    assert_eq!(fleet.identities() as i64, total);
    until("every identity to connect", || async { m.state_count(DeviceState::Connected) == total }).await;

    // Desired versions well above what a new twin starts at, each acknowledged.
    let mut old_versions = Vec::new();
    for (device, module) in IDENTITIES {
        let mut v = 0;
        for value in 1..=3 {
            v = set_target(&api, device, module, value).await;
        }
        acked(&api, device, module, 3, v).await;
        old_versions.push(v);
    }
    until("telemetry acknowledged by the first hub", || async { m.telemetry_acked.get() >= 100 }).await;

    // SIGKILL: the hub's memory (registry, enrollments, twins, sequence counts) is gone.
    hub.kill();
    until("every identity to notice", || async { m.state_count(DeviceState::Connected) == 0 }).await;
    // Every PUBACK the dead hub sent has been read: these are exactly what it acknowledged.
    let acked_by_first_hub = m.telemetry_acked.get();
    let mut hub = HubProcess::start(&data_dir, mqtt, https, &log, &["--in-memory"]);
    serving(&data_dir, mqtt, https).await;

    until("every identity connected again", || async { m.state_count(DeviceState::Connected) == total }).await;
    for (device, module) in IDENTITIES {
        let what = format!("the new hub to show {device}/{module:?} connected");
        until(&what, || connected_at_hub(&api, device, module)).await;
    }
    // Each module ensures itself (and its parent device, which may then connect unrefused).
    assert!(m.credential_reruns("registry") >= 2, "modules were ensured again:\n{}", m.render());
    assert!(m.credential_reruns("dps") >= 3, "DPS devices were provisioned again:\n{}", m.render());
    assert_eq!(m.credential_reruns("none"), 0);

    // The new twins' versions start low again; the devices take and acknowledge them anyway.
    for ((device, module), old) in IDENTITIES.into_iter().zip(old_versions) {
        let v = set_target(&api, device, module, 42).await;
        assert!(v < old, "{device}/{module:?}: the new twin's version {v} should be below the old {old}");
        acked(&api, device, module, 42, v).await;
    }

    // Judge the run: what the first hub acknowledged is its loss, not the fleet's.
    let ci = fleetsim::config::ci::CiConfig {
        duration: Duration::from_millis(500),
        settle: Duration::from_secs(30),
        ..Default::default()
    };
    let outcome = fleetsim::fleet::ci::run(fleet, &ci, std::future::pending()).await;
    let r = &outcome.report;
    let pretty = serde_json::to_string_pretty(r).unwrap();
    let t = &r["telemetry"];
    assert_eq!(t["in_doubt_at_end"], 0, "{pretty}");
    assert_eq!(t["lost_by_hub"], acked_by_first_hub, "{pretty}");
    assert_eq!(t["lost"], 0, "the fleet lost nothing:\n{pretty}");
    assert_eq!(t["missing_at_hub"], acked_by_first_hub, "{pretty}");
    let check = |name: &str| -> Value {
        r["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()["result"].clone()
    };
    assert_eq!(check("lost"), "pass", "{pretty}");
    assert_eq!(check("lost_by_hub"), "not checked", "hub-side loss is not judged by default:\n{pretty}");
    assert_eq!(r["pass"], true, "{pretty}");
    hub.kill();
}

/// The CI end-to-end check across a hub restart: the reader on the external emulator's Event
/// Hubs-compatible endpoint loses its connection when the hub is killed, reconnects to the
/// restarted one, sees that its Event Hub was created anew and reads it from the start. Its books
/// then hold what the restarted emulator forgot, and every written message is either read or
/// counted missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_back_ends_books_hold_across_a_hub_restart() {
    common::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("hub");
    let log = dir.path().join("hub.log");
    let (mqtt, https) = free_ports();
    let amqp = free_ports().0;
    let mut hub = HubProcess::start_with_amqp(&data_dir, mqtt, https, amqp, &log, &["--in-memory"]);
    serving(&data_dir, mqtt, https).await;

    let scenario = dir.path().join("s.toml");
    std::fs::write(
        &scenario,
        "[[devices]]\nname = \"e2e\"\ncount = 3\nid = \"e2e-{n}\"\nprovisioning = \"connection_string\"\n\
         [devices.telemetry]\ninterval = \"50ms\"\nfields = { x = 1 }\n",
    )
    .unwrap();
    let path = fleet_config(dir.path(), &data_dir.join("hub.json"), &scenario);
    let mut text = std::fs::read_to_string(&path).unwrap();
    // An external emulator: the check is on when asked for. Hub-side loss is expected here.
    text.push_str("[ci]\nduration = \"8s\"\n[ci.end_to_end]\nenabled = true\nmax_missing = -1\ndrain = \"20s\"\n");
    std::fs::write(&path, text).unwrap();
    let cfg = fleetsim::config::DaemonConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let templates = fleetsim::scenario::schema::load(&cfg.scenarios).unwrap_or_else(|e| panic!("{e}"));
    let fleet = fleetsim::fleet::start(&cfg, templates, Default::default()).await.expect("fleet starts");
    let m = fleet.shared.metrics.clone();
    until("every identity to connect", || async { m.state_count(DeviceState::Connected) == 3 }).await;
    let ci = cfg.ci.clone().expect("[ci]");
    let run = tokio::spawn(async move { fleetsim::fleet::ci::run(fleet, &ci, std::future::pending()).await });

    until("telemetry acknowledged by the first hub", || async { m.telemetry_acked.get() >= 60 }).await;
    hub.kill();
    until("every identity to notice", || async { m.state_count(DeviceState::Connected) == 0 }).await;
    let _hub = HubProcess::start_with_amqp(&data_dir, mqtt, https, amqp, &log, &["--in-memory"]);
    serving(&data_dir, mqtt, https).await;

    let r = tokio::time::timeout(BOUND * 2, run).await.expect("the CI run ends").unwrap().report;
    let pretty = serde_json::to_string_pretty(&r).unwrap();
    let (t, e) = (&r["telemetry"], &r["end_to_end"]);
    assert!(e["error"].is_null(), "the reader outlived the restart:\n{pretty}");
    let n = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {v}\n{pretty}"));
    let written = n(&t["generated"]) - n(&t["dropped"]["buffer_full"]) - n(&t["dropped"]["shutdown"]);
    assert_eq!(n(&e["unique"]) + n(&e["missing"]), written, "every written message read or missing:\n{pretty}");
    assert!(
        n(&e["unique"]) > n(&t["hub"]["unique"]),
        "the back end holds the first hub's messages, which the restarted emulator forgot:\n{pretty}"
    );
    assert!(n(&e["acked_not_read"]) <= n(&t["lost_by_hub"]), "the reader lost nothing the hub kept:\n{pretty}");
    assert_eq!(t["lost"], 0, "{pretty}");
    assert_eq!(n(&e["latency_ms"]["read"]["count"]), n(&e["unique"]), "{pretty}");
    let check = |name: &str| -> Value {
        r["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()["result"].clone()
    };
    assert_eq!(check("e2e_reader"), "pass", "{pretty}");
    assert_eq!(check("e2e_missing"), "not checked", "{pretty}");
}

/// The store's half of the same story: SIGKILLed under a running fleet and started again, the
/// hub has every identity with its keys, every twin with its versions and etag, and the DPS
/// devices' registrations; the fleet reconnects without re-running a credential step and takes
/// the next desired version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_reconnects_to_its_restarted_durable_hub_without_creating_anything() {
    common::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("hub");
    let log = dir.path().join("hub.log");
    let (mqtt, https) = free_ports();
    let mut hub = HubProcess::start(&data_dir, mqtt, https, &log, &[]);
    serving(&data_dir, mqtt, https).await;

    let scenario = dir.path().join("s.toml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    let cfg = fleetsim::config::DaemonConfig::load(&fleet_config(dir.path(), &data_dir.join("hub.json"), &scenario))
        .unwrap_or_else(|e| panic!("{e}"));
    let templates = fleetsim::scenario::schema::load(&cfg.scenarios).unwrap_or_else(|e| panic!("{e}"));
    let fleet = fleetsim::fleet::start(&cfg, templates, Default::default()).await.expect("fleet starts");
    let api = Api::new(fleet.hub_info.clone().unwrap());
    let m = fleet.shared.metrics.clone();
    let total = IDENTITIES.len() as i64;
    until("every identity to connect", || async { m.state_count(DeviceState::Connected) == total }).await;

    let mut before = Vec::new();
    for (device, module) in IDENTITIES {
        let mut v = 0;
        for value in 1..=3 {
            v = set_target(&api, device, module, value).await;
        }
        acked(&api, device, module, 3, v).await;
        let (_, _, twin) = api.rest("GET", &twin_path(device, module), None).await;
        let (_, _, identity) = api.rest("GET", &identity_path(device, module), None).await;
        before.push((v, twin, identity));
    }

    hub.kill();
    until("every identity to notice", || async { m.state_count(DeviceState::Connected) == 0 }).await;
    let mut hub = HubProcess::start(&data_dir, mqtt, https, &log, &[]);
    serving(&data_dir, mqtt, https).await;

    // What the dead hub acknowledged is all there, before any device is back to change it.
    for ((device, module), (_, twin, identity)) in IDENTITIES.into_iter().zip(&before) {
        let (status, _, now) = api.rest("GET", &twin_path(device, module), None).await;
        assert_eq!(status, 200, "{device}/{module:?}");
        for field in ["etag", "version", "properties", "tags", "deviceEtag"] {
            let reported_since = field == "properties" || field == "etag" || field == "version";
            // A device may already have reconnected and reported again; compare what it cannot
            // have changed when it did.
            if reported_since && now["version"] != twin["version"] {
                assert_eq!(now["properties"]["desired"], twin["properties"]["desired"], "{device}/{module:?}");
                continue;
            }
            assert_eq!(now[field], twin[field], "{device}/{module:?} {field}");
        }
        let (_, _, now) = api.rest("GET", &identity_path(device, module), None).await;
        for field in ["etag", "generationId", "authentication", "status"] {
            assert_eq!(now[field], identity[field], "{device}/{module:?} {field}");
        }
    }
    until("every identity connected again", || async { m.state_count(DeviceState::Connected) == total }).await;
    for ((device, module), (old, _, _)) in IDENTITIES.into_iter().zip(before) {
        let v = set_target(&api, device, module, 42).await;
        assert_eq!(v, old + 1, "{device}/{module:?}: the twin's desired version carries on");
        acked(&api, device, module, 42, v).await;
    }
    for kind in ["registry", "dps", "none"] {
        assert_eq!(m.credential_reruns(kind), 0, "{kind}: nothing was created again:\n{}", m.render());
    }
    fleet.shutdown().await;
    hub.kill();
}

/// The credential step runs at start and after every refusal, so it must write only what the
/// fleet owns: a missing identity or enrollment is created, one with another key is re-keyed,
/// and what an operator decided (disabled) survives both.
#[tokio::test]
async fn ensuring_an_identity_again_keeps_what_an_operator_decided() {
    use fleetsim::iot::sas::Key;
    use fleetsim::provision::registry::ServiceClient;
    let hub = common::TestHub::start().await;
    let http = fleetsim::service::https_client(&hub.tls).unwrap();
    let registry = ServiceClient::new(http.clone(), &hub.info.service_connection_string.parse().unwrap()).unwrap();
    let dps = ServiceClient::new(http, &hub.info.dps_service_connection_string.parse().unwrap()).unwrap();
    let (ours, theirs) = (Key::generate(), Key::generate());
    let primary = |v: &Value| v["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let enrollment_key = |v: &Value| v["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();

    // Missing: created with our key.
    registry.ensure_device("op-1", &ours).await.unwrap();
    registry.ensure_module("op-1", "m", &ours).await.unwrap();
    dps.ensure_enrollment("op-enr", &ours).await.unwrap();
    let (_, _, d) = hub.rest("GET", "/devices/op-1", None).await;
    assert_eq!((primary(&d), d["status"].as_str()), (ours.to_base64(), Some("enabled")), "{d}");

    // An operator disables them and gives them other keys (a module has no status of its own).
    let auth =
        json!({"type": "sas", "symmetricKey": {"primaryKey": theirs.to_base64(), "secondaryKey": theirs.to_base64()}});
    for (path, body) in [
        ("/devices/op-1", json!({"deviceId": "op-1", "status": "disabled", "authentication": auth})),
        ("/devices/op-1/modules/m", json!({"deviceId": "op-1", "moduleId": "m", "authentication": auth})),
    ] {
        let (status, _, b) = hub.rest_as("iothubowner", "PUT", path, Some(body), &[("if-match", "*")]).await;
        assert_eq!(status, 200, "{path}: {b}");
    }
    let enrollment = json!({
        "registrationId": "op-enr", "provisioningStatus": "disabled",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": theirs.to_base64(), "secondaryKey": theirs.to_base64()}},
    });
    let (status, _, b) =
        hub.rest_as("provisioningserviceowner", "PUT", "/enrollments/op-enr", Some(enrollment), &[]).await;
    assert_eq!(status, 200, "{b}");

    // Ensured again: our key back, still disabled.
    registry.ensure_device("op-1", &ours).await.unwrap();
    registry.ensure_module("op-1", "m", &ours).await.unwrap();
    dps.ensure_enrollment("op-enr", &ours).await.unwrap();
    let (_, _, d) = hub.rest("GET", "/devices/op-1", None).await;
    assert_eq!((primary(&d), d["status"].as_str()), (ours.to_base64(), Some("disabled")), "{d}");
    let (_, _, m) = hub.rest("GET", "/devices/op-1/modules/m", None).await;
    assert_eq!(primary(&m), ours.to_base64(), "{m}");
    let (_, _, e) = hub.rest_as("provisioningserviceowner", "GET", "/enrollments/op-enr", None, &[]).await;
    assert_eq!((enrollment_key(&e), e["provisioningStatus"].as_str()), (ours.to_base64(), Some("disabled")), "{e}");

    // Already ours: nothing is written (the etag does not move).
    let (_, _, before) = hub.rest("GET", "/devices/op-1", None).await;
    registry.ensure_device("op-1", &ours).await.unwrap();
    let (_, _, after) = hub.rest("GET", "/devices/op-1", None).await;
    assert_eq!(before["etag"], after["etag"]);
}

/// Identities deleted from under a running fleet (devices, a module alone, a DPS device and its
/// individual enrollment) are refused when they reconnect, created again, and take desired
/// properties on their new twins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_identities_are_created_again_and_take_new_desired_versions() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("s.toml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    let f =
        common::FleetUnderTest::start(&[scenario], "[device]\nbackoff_base = \"100ms\"\nbackoff_cap = \"1s\"\n").await;
    let api: &Api = &f;
    let m = f.metrics();
    let mut old_versions = Vec::new();
    for (device, module) in IDENTITIES {
        let mut v = 0;
        for value in 1..=3 {
            v = set_target(api, device, module, value).await;
        }
        acked(api, device, module, 3, v).await;
        old_versions.push(v);
    }

    // direct-1 takes its module with it; direct-2 loses only its module.
    let deleted: [(&str, Option<&str>); 5] = [
        ("direct-1", None),
        ("direct-1", Some("mod")),
        ("direct-2", Some("mod")),
        ("group-1", None),
        ("individual-1", None),
    ];
    for path in ["/devices/direct-1", "/devices/direct-2/modules/mod", "/devices/group-1", "/devices/individual-1"] {
        let (status, _, body) = f.rest("DELETE", path, None).await;
        assert_eq!(status, 204, "{path}: {body}");
    }
    let (status, _, body) =
        f.rest_as("provisioningserviceowner", "DELETE", "/enrollments/individual-1", None, &[]).await;
    assert_eq!(status, 204, "{body}");

    for (device, module) in IDENTITIES {
        let what = format!("{device}/{module:?} connected at the hub");
        until(&what, || async {
            let (status, _, body) = f.rest("GET", &identity_path(device, module), None).await;
            status == 200 && body["connectionState"] == "Connected"
        })
        .await;
    }
    until("every identity connected in the fleet", || async {
        m.state_count(DeviceState::Connected) == IDENTITIES.len() as i64
    })
    .await;
    assert!(m.credential_reruns("registry") >= 2, "{}", m.render());
    assert!(m.credential_reruns("dps") >= 2, "{}", m.render());
    let (status, _, e) = f.rest_as("provisioningserviceowner", "GET", "/enrollments/individual-1", None, &[]).await;
    assert_eq!(status, 200, "the individual enrollment was made again: {e}");

    for ((device, module), old) in IDENTITIES.into_iter().zip(old_versions) {
        let v = set_target(api, device, module, 42).await;
        if deleted.contains(&(device, module)) {
            assert!(v < old, "{device}/{module:?}: a new twin starts over ({v} vs {old})");
        }
        acked(api, device, module, 42, v).await;
    }
}
