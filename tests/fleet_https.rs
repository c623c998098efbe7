//! Both halves of HTTPS devices: the fleet's `transport = "https"` devices (provisioned through
//! DPS) against the embedded emulator's device REST API, over real TLS. Telemetry arrives with its
//! sequence stamps and no gaps; a C2D message is polled and completed.

use fleetsim_testkit as common;

use common::FleetUnderTest;
use serde_json::json;

const SCENARIO: &str = r#"
[[devices]]
name = "https-sensor"
count = 3
id = "https-sensor-{n}"
provisioning = "dps"
enrollment = "group"
transport = "https"
poll_interval = "1s"

[devices.telemetry]
interval = "1s"
fields = { t = 21.5 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_https_devices_send_telemetry_and_complete_c2d_against_the_emulator() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("https.toml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    let mut f = FleetUnderTest::start(&[scenario], "").await;
    let ids = ["https-sensor-1", "https-sensor-2", "https-sensor-3"];
    f.wait_for("every HTTPS device's telemetry, stamped", || async {
        ids.iter().all(|id| {
            let Some(identity) = f.hub_state().registry.get(id, None) else { return false };
            let st = identity.lock();
            st.sequence.as_ref().is_some_and(|t| t.unique >= 2 && t.gaps() == 0 && t.duplicates == 0)
        })
    })
    .await;
    let events = f.events("https-sensor-1", None).await;
    let first = &events["messages"][0];
    assert_eq!(first["body"], json!({"t": 21.5}).to_string(), "{first}");
    assert!(first["properties"]["fleetsim-seq"].is_string(), "{first}");
    assert_eq!(first["systemProperties"]["content-type"], "application/json", "{first}");

    let (status, _, body) =
        f.rest("POST", "/emulator/devices/https-sensor-2/messages/deviceBound", Some(json!({"body": "hello"}))).await;
    assert_eq!(status, 200, "{body}");
    f.wait_for("the C2D message polled and completed", || async {
        f.hub_state().registry.get("https-sensor-2", None).is_some_and(|i| i.lock().c2d.is_empty())
    })
    .await;
    let rendered = f.hub_state().metrics.render();
    assert!(rendered.contains("fleetsim_hub_c2d_messages_total{event=\"completed\"} 1"), "{rendered}");
    f.stop().await;
}

/// Connection-string devices with a module each, over HTTPS: the registry step creates them.
const WITH_MODULES: &str = r#"
[[devices]]
name = "https-registry"
count = 2
id = "https-reg-{n}"
provisioning = "connection_string"
transport = "https"
poll_interval = "1s"
[devices.telemetry]
interval = "200ms"
fields = { n = { kind = "counter" } }
properties = { site = "lab" }
[[devices.modules]]
id = "probe"
[[devices.modules.telemetry]]
interval = "200ms"
fields = { p = 1 }
"#;

fn received(events: &serde_json::Value) -> u64 {
    events["received"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_modules_send_and_several_c2d_messages_are_each_handled_once() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("https.toml");
    std::fs::write(&scenario, WITH_MODULES).unwrap();
    let mut f = FleetUnderTest::start(&[scenario], "").await;
    assert_eq!(f.fleet().identities(), 4);
    let dev = "https-reg-1";
    f.wait_for("telemetry from the module", || async { received(&f.events(dev, Some("probe")).await) >= 3 }).await;
    let events = f.events(dev, None).await;
    assert_eq!(events["messages"][0]["properties"]["site"], "lab", "{events}");
    for i in 0..3 {
        let (status, _, _) = f
            .rest(
                "POST",
                &format!("/emulator/devices/{dev}/messages/deviceBound"),
                Some(json!({"body": format!("hello {i}")})),
            )
            .await;
        assert_eq!(status, 200);
    }
    f.wait_for("three messages handled", || async { f.metrics().c2d_received.get() >= 3 }).await;
    f.wait_for("the queue emptied (each completed)", || async {
        f.hub_state().registry.get(dev, None).is_some_and(|i| i.lock().c2d.is_empty())
    })
    .await;
    assert_eq!(f.metrics().c2d_received.get(), 3, "each once: completed, not redelivered");
    assert_eq!(f.metrics().dropped_count(), 0);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_device_the_hub_forgets_is_created_again_and_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("https.toml");
    std::fs::write(&scenario, WITH_MODULES).unwrap();
    let mut f = FleetUnderTest::start(&[scenario], "").await;
    let dev = "https-reg-2";
    f.wait_for("telemetry", || async { received(&f.events(dev, None).await) >= 1 }).await;
    let (status, _, body) =
        f.rest_as("iothubowner", "DELETE", &format!("/devices/{dev}"), None, &[("If-Match", "*")]).await;
    assert_eq!(status, 204, "{body}");
    // Its next request is refused (401 or 404): the device runs its registry step again.
    f.wait_for("the credential step to run again", || async { f.metrics().credential_reruns("registry") >= 1 }).await;
    f.wait_for("the device to exist again", || async {
        f.rest("GET", &format!("/devices/{dev}"), None).await.0 == 200
    })
    .await;
    f.wait_for("telemetry after re-creation", || async { received(&f.events(dev, None).await) >= 1 }).await;
    f.stop().await;
}
