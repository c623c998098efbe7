//! The four seed scenarios, run as shipped by the fleet against its embedded emulator over real
//! TLS, and driven from the service side: commands, long-running commands, writable properties
//! and their acknowledgements, reboots, module twins (the edge filter is `edge_tutorial.rs`).

use fleetsim_testkit as common;

use std::time::Duration;

use common::{FleetUnderTest, repo};
use serde_json::{Value, json};

fn is_ack(v: &Value, value: Value, ac: u64, av: u64) -> bool {
    v["value"] == value && v["ac"] == ac && v["av"] == av
}

#[tokio::test]
async fn environmental_sensor_commands_properties_and_telemetry() {
    let f = FleetUnderTest::start(&[repo("scenarios/environmental-sensor.toml")], "").await;
    assert_eq!(f.fleet().identities(), 5);
    let dev = "env-sensor-0003";

    let (status, body) = f.invoke(dev, None, "blink", json!(3)).await;
    assert_eq!(
        (status, body),
        (200, json!({"status": 200, "payload": {"description": "Blinking LED every 3 seconds"}}))
    );
    let (_, bad) = f.invoke(dev, None, "blink", json!("often")).await;
    assert_eq!(bad["status"], 400, "an invalid payload is answered 400: {bad}");
    let (_, unknown) = f.invoke(dev, None, "selfdestruct", json!(null)).await;
    assert_eq!(unknown["status"], 404);

    f.reported_until(dev, None, "state", |v| *v == json!(true)).await;
    let (_, off) = f.invoke(dev, None, "turnoff", json!(null)).await;
    assert_eq!(off["status"], 200);
    f.reported_until(dev, None, "state", |v| *v == json!(false)).await;
    let (_, on) = f.invoke(dev, None, "turnon", json!(null)).await;
    assert_eq!(on["status"], 200);
    f.reported_until(dev, None, "state", |v| *v == json!(true)).await;

    let (_, diag) = f.invoke(dev, None, "rundiagnostics", json!(null)).await;
    assert_eq!(diag["status"], 202, "{diag}");
    let done = f
        .reported_until(dev, None, "rundiagnostics", |v| {
            v["value"].as_str().is_some_and(|s| s.starts_with("Diagnostics run complete at "))
        })
        .await;
    assert!(done["value"].as_str().unwrap().ends_with("Z."), "{done}");

    let v = f.set_desired(dev, None, json!({"name": "lab bench"})).await;
    f.reported_until(dev, None, "name", |r| is_ack(r, json!("lab bench"), 200, v)).await;
    let v = f.set_desired(dev, None, json!({"brightness": 42})).await;
    let ack = f.reported_until(dev, None, "brightness", |r| is_ack(r, json!(42), 200, v)).await;
    assert_eq!(ack["ad"], "completed");
    let v = f.set_desired(dev, None, json!({"brightness": 500})).await;
    f.reported_until(dev, None, "brightness", |r| is_ack(r, json!(42), 400, v)).await;

    f.wait_for("telemetry", || async { f.events(dev, None).await["received"].as_u64().unwrap() >= 1 }).await;
    let events = f.events(dev, None).await;
    let m = &events["messages"][0];
    let body: Value = serde_json::from_str(m["body"].as_str().unwrap()).unwrap();
    assert!(
        (1.0..=75.0).contains(&body["temp"].as_f64().unwrap())
            && (30.0..=99.0).contains(&body["humid"].as_f64().unwrap()),
        "{body}"
    );
    assert_eq!(m["systemProperties"]["dt-dataschema"], "dtmi:com:example:EnvironmentalSensor;1");
    assert_eq!(m["systemProperties"]["content-type"], "application/json");
    let (_, _, reg) =
        f.rest_as("provisioningserviceowner", "GET", &format!("/emulator/registrations/{dev}"), None, &[]).await;
    assert_eq!(
        reg["requestPayload"]["modelId"], "dtmi:com:example:EnvironmentalSensor;1",
        "the DPS payload carried the model id"
    );
    let m = f.metrics();
    assert!(m.telemetry_acked.get() > 0 && m.dropped_count() == 0);
}

#[tokio::test]
async fn offline_commands_arrive_by_c2d() {
    let f = FleetUnderTest::start(&[repo("scenarios/environmental-sensor.toml")], "").await;
    let dev = "env-sensor-0001";
    f.reported_until(dev, None, "state", |v| *v == json!(true)).await;
    let (status, _, _) = f
        .rest(
            "POST",
            &format!("/emulator/devices/{dev}/messages/deviceBound"),
            Some(json!({"body": "", "properties": {"method-name": "turnoff"}})),
        )
        .await;
    assert_eq!(status, 200);
    f.reported_until(dev, None, "state", |v| *v == json!(false)).await;
    assert_eq!(f.metrics().c2d_received.get(), 1);
}

#[tokio::test]
async fn rebootable_device_goes_down_and_comes_back() {
    let f = FleetUnderTest::start(&[repo("scenarios/rebootable-device.toml")], "").await;
    let dev = "dm-device-0002";
    let clean_disconnects = || {
        let text = f.hub_state().metrics.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("fleetsim_hub_disconnects_total{reason=\"client_disconnect\"}"))
            .unwrap()
            .to_owned();
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
    };
    // The devices' DPS sessions over MQTT ended with DISCONNECT too; count from here.
    let before = clean_disconnects();
    let (status, body) = f.invoke(dev, None, "rebootDevice", json!(null)).await;
    assert_eq!(
        (status, body),
        (200, json!({"status": 200, "payload": {"Response": "This is the response from the device"}}))
    );
    let down = || async {
        let (_, _, d) = f.rest("GET", &format!("/devices/{dev}"), None).await;
        d["connectionState"] == "Disconnected"
    };
    f.wait_for("the device to go down", down).await;
    let first = f.reported_until(dev, None, "rebootTime", Value::is_string).await;
    let (_, _, d) = f.rest("GET", &format!("/devices/{dev}"), None).await;
    assert_eq!(d["connectionState"], "Connected", "reported after it came back");
    // A second reboot stamps a new time (milliseconds, and the downtime is 5 s: no wait needed).
    f.invoke(dev, None, "rebootDevice", json!(null)).await;
    f.reported_until(dev, None, "rebootTime", |v| v.is_string() && *v != first).await;
    assert_eq!(clean_disconnects(), before + 2, "each reboot is a clean disconnect");
    assert_eq!(
        f.metrics().render().lines().find(|l| l.starts_with("fleetsim_reconnects_total{cause=\"reboot\"}")).unwrap(),
        "fleetsim_reconnects_total{cause=\"reboot\"} 2"
    );
}

#[tokio::test]
async fn a_module_follows_its_desired_telemetry_interval() {
    let f = FleetUnderTest::start(&[repo("scenarios/module-twin.toml")], "").await;
    assert_eq!(f.fleet().identities(), 4);
    let (dev, module) = ("module-host-0001", Some("myFirstModule"));
    // The default is reported at start as a device-set value (ac 203, av 0).
    f.reported_until(dev, module, "telemetryInterval", |v| is_ack(v, json!(10), 203, 0)).await;
    let v = f.set_desired(dev, module, json!({"telemetryInterval": 1})).await;
    f.reported_until(dev, module, "telemetryInterval", |r| is_ack(r, json!(1), 200, v)).await;
    let before = f.events(dev, module).await["received"].as_u64().unwrap();
    // At the default 10 s this could not happen within the bounded wait.
    f.wait_for("three messages at the new interval", || async {
        f.events(dev, module).await["received"].as_u64().unwrap() >= before + 3
    })
    .await;
    let v = f.set_desired(dev, module, json!({"telemetryInterval": 0})).await;
    f.reported_until(dev, module, "telemetryInterval", |r| is_ack(r, json!(1), 400, v)).await;
}

#[tokio::test]
async fn every_provisioning_path_and_transport_connects() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("paths.toml");
    std::fs::write(
        &scenario,
        r#"
[[devices]]
name = "group-https"
count = 2
id = "gh-{n}"
[devices.telemetry]
interval = "1s"
fields = { x = 1 }

[[devices]]
name = "group-mqtt-over-websockets"
count = 2
id = "gw-{n}"
dps_transport = "mqtt"
transport = "websockets"
[devices.telemetry]
interval = "1s"
fields = { x = 2 }

[[devices]]
name = "individual-https"
count = 2
id = "ih-{n}"
enrollment = "individual"
[devices.telemetry]
interval = "1s"
fields = { x = 3 }

[[devices]]
name = "individual-mqtt"
count = 2
id = "im-{n}"
enrollment = "individual"
dps_transport = "mqtt"
[devices.telemetry]
interval = "1s"
fields = { x = 4 }

[[devices]]
name = "connection-string"
count = 2
id = "cs-{n}"
provisioning = "connection_string"
[devices.telemetry]
interval = "1s"
fields = { x = 5 }
"#,
    )
    .unwrap();
    let f = FleetUnderTest::start(&[scenario], "").await;
    assert_eq!(f.fleet().identities(), 10);
    for (dev, x) in [("gh-2", 1), ("gw-1", 2), ("ih-1", 3), ("im-2", 4), ("cs-1", 5)] {
        f.wait_for("telemetry", || async { f.events(dev, None).await["received"].as_u64().unwrap() > 0 }).await;
        let body: Value =
            serde_json::from_str(f.events(dev, None).await["messages"][0]["body"].as_str().unwrap()).unwrap();
        assert_eq!(body, json!({"x": x}), "{dev}");
    }
    let (status, _, e) = f.rest_as("provisioningserviceowner", "GET", "/enrollments/im-1", None, &[]).await;
    assert_eq!(
        (status, e["attestation"]["type"].as_str()),
        (200, Some("symmetricKey")),
        "the fleet made the individual enrollment"
    );
    let m = f.metrics();
    assert_eq!(
        m.render().lines().find(|l| l.starts_with("fleetsim_provision_attempts_total{outcome=\"assigned\"}")).unwrap(),
        "fleetsim_provision_attempts_total{outcome=\"assigned\"} 8"
    );
}

#[tokio::test]
async fn shutdown_drains_and_disconnects_cleanly() {
    let mut f = FleetUnderTest::start(&[repo("scenarios/environmental-sensor.toml")], "").await;
    f.wait_for("some telemetry", || async { f.metrics().telemetry_acked.get() >= 5 }).await;
    let metrics = f.fleet().shared.metrics.clone();
    let hub = f.fleet().hub.as_ref().unwrap().state.clone();
    f.stop().await;
    assert_eq!(metrics.state_count(fleetsim::metrics::DeviceState::Stopped), 5);
    assert_eq!(
        metrics.telemetry_generated.get(),
        metrics.telemetry_acked.get() + metrics.dropped_count(),
        "every message is accounted for"
    );
    assert_eq!(metrics.telemetry_queued.get(), 0, "nothing is left in a buffer");
    assert!(
        hub.metrics.render().contains("fleetsim_hub_disconnects_total{reason=\"client_disconnect\"} 5"),
        "devices said DISCONNECT"
    );
}

/// Reported patches the hub throttled are sent again later; one sent again must not undo a newer
/// acknowledgement. With every reported patch failing, four desired versions are each
/// acknowledged (and each refused 429, so all four wait to be sent again at jittered times);
/// once the hub accepts again, the twin must end with the newest version acknowledged, never an
/// older one resent after it. Deterministic: the superseded retries are dropped, not raced.
#[tokio::test]
async fn a_retried_acknowledgement_never_undoes_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("acks.toml");
    std::fs::write(
        &scenario,
        "[[devices]]\nid = \"ack-{n}\"\nprovisioning = \"connection_string\"\n\
         [[devices.writable]]\nname = \"level\"\ntype = \"integer\"\n\
         [devices.telemetry]\ninterval = \"10s\"\nfields = { a = 1 }\n",
    )
    .unwrap();
    let f = FleetUnderTest::start(&[scenario], "[device]\nbackoff_base = \"200ms\"\nbackoff_cap = \"2s\"\n").await;
    let (status, _, body) = f.rest("PATCH", "/emulator/faults", Some(json!({"twin_error_rate": 1.0}))).await;
    assert_eq!(status, 200, "{body}");
    let mut last = 0;
    for level in 1..=4 {
        last = f.set_desired("ack-1", None, json!({"level": level})).await;
    }
    // Let every acknowledgement be refused at least once.
    let refused = || f.hub_state().metrics.faults_injected.with_label_values(&["twin_error"]).get();
    f.wait_for("the refused reported patches", || async { refused() >= 4 }).await;
    let (status, _, body) = f.rest("PATCH", "/emulator/faults", Some(json!({"twin_error_rate": 0.0}))).await;
    assert_eq!(status, 200, "{body}");
    f.reported_until("ack-1", None, "level", |v| is_ack(v, json!(4), 200, last)).await;
    // No older acknowledgement may follow: watched for longer than any pending retry could wait
    // (backoff_cap 2 s), failing at the first overwrite.
    common::holds_for("the newest acknowledgement (an older one overwrote it)", Duration::from_secs(3), || async {
        let v = f.reported_until("ack-1", None, "level", |_| true).await;
        is_ack(&v, json!(4), 200, last)
    })
    .await;
}
