//! Both halves of HTTPS devices: the fleet's `transport = "https"` devices (provisioned through
//! DPS) against the embedded emulator's device REST API, over real TLS. Telemetry arrives with its
//! sequence stamps and no gaps; a C2D message is polled and completed.

mod common;

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
