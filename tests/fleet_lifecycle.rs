//! A device's life beyond the happy path: SAS renewal by reconnecting, reconnecting with backoff
//! after the hub drops it (then re-fetching the twin and acknowledging what changed meanwhile),
//! and waiting out a slow DPS assignment.

use fleetsim_testkit as common;

use common::FleetUnderTest;
use serde_json::json;

fn scenario(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let p = dir.path().join("s.toml");
    std::fs::write(&p, text).unwrap();
    p
}

const ONE_DEVICE: &str = r#"
[[devices]]
count = 1
id = "life-{n}"
provisioning = "connection_string"
[devices.telemetry]
interval = "500ms"
fields = { x = 1 }
[[devices.writable]]
name = "mode"
type = "string"
"#;

#[tokio::test]
async fn tokens_are_renewed_by_reconnecting_before_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    // A 60 s token renewed at 10 % of its life: within 6 s.
    let f =
        FleetUnderTest::start(&[scenario(&dir, ONE_DEVICE)], "[device]\ntoken_ttl = \"60s\"\nrenew_at = 0.1\n").await;
    f.wait_for("a token renewal", || async { f.metrics().token_renewals.get() >= 1 }).await;
    let acked = f.metrics().telemetry_acked.get();
    f.wait_for("telemetry after the renewal", || async { f.metrics().telemetry_acked.get() > acked + 2 }).await;
    assert_eq!(f.metrics().state_count(fleetsim::metrics::DeviceState::Connected), 1);
    assert!(
        f.hub_state().metrics.render().contains("fleetsim_hub_disconnects_total{reason=\"token_expired\"} 0"),
        "renewed before the hub had to cut it off"
    );
}

#[tokio::test]
async fn a_dropped_device_backs_off_reconnects_and_catches_up_on_its_twin() {
    let dir = tempfile::tempdir().unwrap();
    let f = FleetUnderTest::start(
        &[scenario(&dir, ONE_DEVICE)],
        "[device]\nbackoff_base = \"100ms\"\nbackoff_cap = \"500ms\"\n",
    )
    .await;
    let dev = "life-1";
    // Disabling the device closes its connection; its reconnects are refused meanwhile.
    let (status, _, _) = f
        .rest_as(
            "iothubowner",
            "PUT",
            &format!("/devices/{dev}"),
            Some(json!({"deviceId": dev, "status": "disabled"})),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(status, 200);
    f.wait_for("refused reconnects", || async {
        f.metrics().render().contains("fleetsim_connect_attempts_total{outcome=\"refused\"}")
    })
    .await;
    // Refused as unauthorized, the device ensures its identity again, which must leave an
    // operator's decision alone: it stays disabled and refused.
    f.wait_for("the credential step to run again", || async { f.metrics().credential_reruns("registry") >= 2 }).await;
    let (_, _, identity) = f.rest("GET", &format!("/devices/{dev}"), None).await;
    assert_eq!(identity["status"], "disabled", "{identity}");
    assert_eq!(f.metrics().state_count(fleetsim::metrics::DeviceState::Connected), 0);
    let v = f.set_desired(dev, None, json!({"mode": "eco"})).await;
    let (status, _, _) = f
        .rest_as(
            "iothubowner",
            "PUT",
            &format!("/devices/{dev}"),
            Some(json!({"deviceId": dev, "status": "enabled"})),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(status, 200);
    // Back: it fetched the twin and acknowledged the change it missed.
    let ack = f.reported_until(dev, None, "mode", |r| r["value"] == "eco" && r["av"] == v).await;
    assert_eq!(ack["ac"], 200);
    let text = f.metrics().render();
    assert!(text.contains("fleetsim_reconnects_total{cause=\"connection_lost\"} 1"), "{text}");
    assert_eq!(f.metrics().state_count(fleetsim::metrics::DeviceState::Connected), 1);
}

#[tokio::test]
async fn provisioning_waits_out_a_slow_assignment() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hub.toml"),
        "[behaviour]\ndps_assignment_delay_ms = 1500\ndps_retry_after_secs = 1\n",
    )
    .unwrap();
    let s = scenario(
        &dir,
        "[[devices]]\ncount = 2\nid = \"slow-{n}\"\n[devices.telemetry]\ninterval = \"1s\"\nfields = { x = 1 }\n",
    );
    let f = FleetUnderTest::start_with_hub_config(&[s], "", &dir.path().join("hub.toml")).await;
    let m = f.metrics().render();
    assert!(m.contains("fleetsim_provision_attempts_total{outcome=\"assigned\"} 2"), "{m}");
    // The assignment took at least the hub's delay; the client polled rather than failed.
    let slowest = f.metrics().provision_seconds.get_sample_sum() / 2.0;
    assert!(slowest >= 1.5, "mean provisioning time {slowest}s is below the 1.5 s assignment delay");
}

/// A start the configuration refuses is a `StartError::Usage` carrying located problems (exit 64
/// in `main`, by the variant alone): here a `keys_file` gone between `check` and `run`.
#[tokio::test]
async fn a_start_the_configuration_refuses_is_a_usage_error_with_its_problems() {
    common::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.csv");
    let s = scenario(
        &dir,
        "[[devices]]\nid = \"kf-{n}\"\nprovisioning = \"connection_string\"\nkeys_file = \"keys.csv\"\n\
         [devices.telemetry]\ninterval = \"10s\"\nfields = { a = 1 }\n",
    );
    let text = format!(
        "scenarios = [{:?}]\n[hub]\nmode = \"embedded\"\ndata_dir = {:?}\nmqtt_addr = \"127.0.0.1:0\"\n\
         https_addr = \"127.0.0.1:0\"\n[metrics]\nenabled = false\n",
        s.display().to_string(),
        dir.path().join("hub").display().to_string()
    );
    let path = dir.path().join("fleet.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = fleetsim::config::DaemonConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let templates = fleetsim::scenario::schema::load(&cfg.scenarios).unwrap_or_else(|e| panic!("{e}"));
    assert!(!keys.exists());
    match fleetsim::fleet::start(&cfg, templates, Default::default()).await {
        Err(fleetsim::fleet::StartError::Usage(problems)) => {
            assert_eq!(problems.len(), 1, "{problems}");
            let p = &problems.0[0];
            assert_eq!((p.file.as_str(), p.line, p.column), (keys.display().to_string().as_str(), 1, 1));
            assert!(p.message.starts_with("cannot read: no such file"), "{problems}");
        }
        Err(e) => panic!("a usage problem expected, got: {e}"),
        Ok(_) => panic!("a fleet started with a keys_file that cannot be read"),
    }
}
