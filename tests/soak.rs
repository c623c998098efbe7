//! The suite's soak run: the real binary in CI mode (`soak/soak.toml`: the shipped scenarios plus
//! forty one-second sensors) against its embedded emulator with every fault kind on. Half-way the
//! test also drives the fault control route: an outage met by a hand-made drop of 30 % of
//! connections, then silent drops (only keep-alive can notice them); and it sets writable properties that must all end acknowledged.
//! The verdict is the binary's own, and the report is checked for the
//! things the issue names: nothing lost, nobody stuck, every fault actually fired.

use fleetsim_testkit as common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Copies the soak configuration into `dir`, beside a link to the shipped scenarios, so its
/// relative paths (and its emulator data dir) resolve inside the temporary directory.
fn stage(dir: &std::path::Path) -> std::path::PathBuf {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let soak = dir.join("soak");
    std::fs::create_dir_all(&soak).unwrap();
    for f in ["soak.toml", "hub-faults.toml", "soak-sensor.toml"] {
        std::fs::copy(repo.join("soak").join(f), soak.join(f)).unwrap();
    }
    std::os::unix::fs::symlink(repo.join("scenarios"), dir.join("scenarios")).unwrap();
    // Forty sensors reconnecting through a 100/s ramp: a 20/s hub throttle is what makes the
    // storm hit it.
    let faults = std::fs::read_to_string(soak.join("hub-faults.toml")).unwrap();
    let faults = faults.replace("connects_per_sec = 300", "connects_per_sec = 20");
    assert!(faults.contains("connects_per_sec = 20"));
    std::fs::write(soak.join("hub-faults.toml"), faults).unwrap();
    soak.join("soak.toml")
}

/// hub.json once the child has written it (it names the writer's pid).
fn wait_for_hub(path: &std::path::Path, pid: u32, child: &mut std::process::Child) -> fleetsim::hub::info::HubInfo {
    let t0 = Instant::now();
    loop {
        if let Ok(info) = fleetsim::hub::info::HubInfo::load(path)
            && info.pid == pid
        {
            return info;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("fleetsim exited early: {status}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no hub.json from the fleet");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_fleet_rides_out_every_fault_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = stage(dir.path());
    let report_path = dir.path().join("report.json");
    let stderr = std::fs::File::create(dir.path().join("fleet.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetsim"))
        .args(["run", "--config", config.to_str().unwrap(), "--report", report_path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let info = wait_for_hub(&dir.path().join(".fleetsim/soak-hub/hub.json"), child.id(), &mut child);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let api = common::Api::new(info);
        // The fixed sleeps below are the soak's phases (time spent under one fault regime), not
        // waits for something to happen; what must happen is polled for.
        tokio::time::sleep(Duration::from_secs(20)).await;
        // Writable properties set while faults fly must all end acknowledged.
        for n in 1..=10 {
            let body = json!({"properties": {"desired": {"label": format!("soak-{n}")}}});
            let (status, _, twin) = api
                .rest_as("iothubowner", "PATCH", &format!("/twins/soak-{n:05}"), Some(body), &[("if-match", "*")])
                .await;
            assert_eq!(status, 200, "{twin}");
        }
        tokio::time::sleep(Duration::from_secs(20)).await;
        // An outage, then 30 % dropped: their reconnects (within a second) meet CONNACK 3.
        let (status, _, _) = api.rest("POST", "/emulator/faults/outage", Some(json!({"seconds": 8}))).await;
        assert_eq!(status, 200);
        let (status, _, dropped) = api.rest("POST", "/emulator/faults/drop", Some(json!({"fraction": 0.3}))).await;
        assert_eq!(status, 200, "{dropped}");
        assert!(dropped["dropped"].as_u64().unwrap() > 0, "{dropped}");
        tokio::time::sleep(Duration::from_secs(10)).await;
        // Silent drops: the hub holds the sockets and says nothing; keep-alive must notice.
        let (status, _, faults) = api.rest("PATCH", "/emulator/faults", Some(json!({"drop_mode": "silent"}))).await;
        assert_eq!(status, 200, "{faults}");
        assert_eq!(faults["drop_mode"], "silent");
        let (status, _, dropped) = api.rest("POST", "/emulator/faults/drop", Some(json!({"fraction": 0.3}))).await;
        assert_eq!(status, 200, "{dropped}");
        tokio::time::sleep(Duration::from_secs(25)).await;
        let (status, _, _) = api.rest("PATCH", "/emulator/faults", Some(json!({"drop_mode": "close"}))).await;
        assert_eq!(status, 200);
        // Every writable property set under faults ends acknowledged, once the faults stop.
        for n in 1..=10 {
            let what = format!("soak-{n:05} to acknowledge its label");
            common::wait_until_for(&what, Duration::from_secs(60), || async {
                let (_, _, twin) = api.rest("GET", &format!("/twins/soak-{n:05}"), None).await;
                let ack = &twin["properties"]["reported"]["label"];
                ack["value"] == format!("soak-{n}") && ack["ac"] == 200
            })
            .await;
        }
    });

    // Two minutes of run, up to ninety seconds of settling, the drain: bounded here at six.
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(360) {
            let _ = child.kill();
            panic!("the soak run did not finish");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let log = std::fs::read_to_string(dir.path().join("fleet.log")).unwrap_or_default();
    let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap_or_default())
        .unwrap_or_else(|e| panic!("no report ({e}); log:\n{log}"));
    let pretty = serde_json::to_string_pretty(&report).unwrap();
    assert!(status.success(), "fleetsim judged the run a failure: {pretty}");
    assert_eq!(report["pass"], true, "{pretty}");

    let t = &report["telemetry"];
    assert_eq!(t["lost"], 0, "{pretty}");
    assert!(t["generated"].as_u64().unwrap() > 4000, "the fleet sent little: {pretty}");
    assert_eq!(
        t["generated"].as_u64().unwrap(),
        t["acked"].as_u64().unwrap()
            + t["dropped"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum::<u64>()
            + t["queued"].as_u64().unwrap(),
        "every message is acknowledged, queued or dropped with a reason: {pretty}"
    );
    assert!(t["retransmits"].as_u64().unwrap() > 0, "no message was ever caught in flight: {pretty}");
    assert_eq!(report["connected_at_end"], report["identities"], "{pretty}");

    let reconnects = report["reconnects"].as_object().unwrap();
    assert!(reconnects.get("keepalive_timeout").and_then(Value::as_u64).unwrap_or(0) > 0, "silent drops: {pretty}");
    assert!(reconnects.get("connection_lost").and_then(Value::as_u64).unwrap_or(0) > 0, "{pretty}");

    let faults = report["hub_faults"].as_object().unwrap();
    for kind in [
        "drop",
        "outage",
        "twin_error",
        "method_drop",
        "dps_throttle",
        "refused_outage",
        "refused_throttled",
        "closed_token_expired",
    ] {
        assert!(faults.get(kind).and_then(Value::as_u64).unwrap_or(0) > 0, "fault {kind} never fired: {pretty}");
    }
    assert!(report["methods"]["probes_ok"].as_u64().unwrap() > 100, "{pretty}");
}
