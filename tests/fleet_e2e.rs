//! Issue 13, the CI end-to-end check: a CI run against the embedded emulator reads its Event
//! Hubs-compatible endpoint over real AMQP and TLS, counts every message of the run there by its
//! sequence stamp and times it from the device's send-time stamp. With connections dropped
//! silently under the fleet (redeliveries), the back end's books agree with the hub's own count,
//! message for message: the same unique arrivals, the same duplicates.

use fleetsim_testkit as common;

use std::time::Duration;

use common::FleetUnderTest;
use serde_json::{Value, json};

const SCENARIO: &str = r#"
[[devices]]
name = "e2e"
count = 4
id = "e2e-{n}"
provisioning = "connection_string"
[devices.telemetry]
interval = "50ms"
fields = { x = { kind = "uniform", min = 0, max = 1 } }
[[devices.modules]]
id = "mod"
[[devices.modules.telemetry]]
interval = "100ms"
fields = { y = 1 }
"#;

fn check<'r>(r: &'r Value, name: &str) -> &'r Value {
    &r["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no check {name}"))["result"]
}

async fn ci_run(f: &mut FleetUnderTest, duration: Duration) -> Value {
    let ci = fleetsim::config::ci::CiConfig { duration, settle: Duration::from_secs(60), ..Default::default() };
    let fleet = f.fleet.take().unwrap();
    fleetsim::fleet::ci::run(fleet, &ci, std::future::pending()).await.report
}

fn scenario(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("e2e.toml");
    std::fs::write(&path, SCENARIO).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ci_run_counts_every_message_at_the_back_end_and_times_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = FleetUnderTest::start(&[scenario(dir.path())], "").await;
    let m = f.fleet().shared.metrics.clone();
    let r = ci_run(&mut f, Duration::from_secs(3)).await;
    let pretty = serde_json::to_string_pretty(&r).unwrap();
    let t = &r["telemetry"];
    let e = &r["end_to_end"];
    let acked = t["acked"].as_u64().unwrap();
    assert!(acked > 50, "{pretty}");
    assert_eq!(t["generated"], acked, "nothing dropped:\n{pretty}");
    assert_eq!(e["unique"], acked, "every acknowledged message reached the back end:\n{pretty}");
    assert_eq!(e["unique"], t["hub"]["unique"], "{pretty}");
    assert_eq!((e["duplicates"].as_u64(), e["gaps"].as_u64()), (Some(0), Some(0)), "{pretty}");
    assert_eq!(e["identities"], 8, "four devices and their modules:\n{pretty}");
    assert_eq!((e["missing"].as_u64(), e["acked_not_read"].as_u64()), (Some(0), Some(0)), "{pretty}");
    assert_eq!(e["consumer_group"], "$Default");
    assert!(e["error"].is_null(), "{pretty}");
    for which in ["enqueued", "read"] {
        let l = &e["latency_ms"][which];
        assert_eq!(l["count"], acked, "every message timed ({which}):\n{pretty}");
        let (p50, p99, max) = (l["p50"].as_f64().unwrap(), l["p99"].as_f64().unwrap(), l["max"].as_f64().unwrap());
        assert!(p50 <= p99 && p99 <= max, "{which}: {l}");
    }
    // Reading comes after enqueueing: the reader's latencies are never the smaller.
    assert!(e["latency_ms"]["read"]["max"].as_f64() >= e["latency_ms"]["enqueued"]["max"].as_f64(), "{pretty}");
    for name in ["e2e_reader", "e2e_missing", "lost"] {
        assert_eq!(check(&r, name), "pass", "{name}:\n{pretty}");
    }
    assert_eq!(check(&r, "e2e_read_p99_ms"), "not checked");
    assert_eq!(r["pass"], true, "{pretty}");
    // The same, as Prometheus metrics.
    let text = m.render();
    assert!(text.contains(&format!("fleetsim_e2e_events_total{{kind=\"unique\"}} {acked}")), "{text}");
    assert!(text.contains(&format!("fleetsim_e2e_read_seconds_count {acked}")), "{text}");
    assert!(text.contains(&format!("fleetsim_e2e_enqueued_seconds_count {acked}")), "{text}");
    assert_eq!(r["histograms"]["e2e_read_ms"]["max"], e["latency_ms"]["read"]["max"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_silent_drops_the_back_ends_books_match_the_hubs() {
    let dir = tempfile::tempdir().unwrap();
    // A short keep-alive so a silently dropped connection is noticed within the run.
    let mut f = FleetUnderTest::start(
        &[scenario(dir.path())],
        "[device]\nkeep_alive = \"2s\"\nbackoff_base = \"100ms\"\nbackoff_cap = \"1s\"\n",
    )
    .await;
    let (status, _, body) = f
        .api
        .rest(
            "PATCH",
            "/emulator/faults",
            Some(json!({"drop_fraction": 0.5, "drop_every_secs": 1, "drop_mode": "silent"})),
        )
        .await;
    assert!((200..300).contains(&status), "{body}");
    let m = f.fleet().shared.metrics.clone();
    let r = ci_run(&mut f, Duration::from_secs(6)).await;
    let pretty = serde_json::to_string_pretty(&r).unwrap();
    assert!(m.reconnect_counts().values().filter_map(Value::as_u64).sum::<u64>() > 0, "drops happened:\n{pretty}");
    let (t, e) = (&r["telemetry"], &r["end_to_end"]);
    assert_eq!(e["unique"], t["hub"]["unique"], "the back end holds what the hub holds:\n{pretty}");
    assert_eq!(e["duplicates"], t["hub"]["duplicates"], "and saw the same redeliveries:\n{pretty}");
    assert_eq!(e["gaps"], t["hub"]["gaps"], "{pretty}");
    assert_eq!(e["missing"], t["missing_at_hub"], "{pretty}");
    assert_eq!(e["acked_not_read"], 0, "{pretty}");
    assert_eq!(check(&r, "e2e_missing"), "pass", "{pretty}");
    assert_eq!(r["pass"], true, "{pretty}");
}
