//! What a newcomer meets on the first day, run as the real binary: `fleetsim run` with an
//! embedded emulator writes a hub.json whose `metrics_url` is where the emulator's metrics are
//! (the fleet's endpoint, moved with `--metrics-addr`), that endpoint carries process and build
//! metrics, the operator commands find the emulator without flags, a log written to a pipe has no
//! colour codes, and stopping says what the drain did.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Polls `f` for up to 30 s.
fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn run_writes_a_usable_hub_json_serves_metrics_and_reports_its_drain() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    std::fs::write(
        dir.path().join("fleet.toml"),
        format!(
            "scenarios = [\"{root}/scenarios/environmental-sensor.toml\"]\n[hub]\nmqtt_addr = \"127.0.0.1:0\"\nhttps_addr = \"127.0.0.1:0\"\n[device]\nprogress_interval = \"1s\"\n"
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_fleetsim");
    let mut child = Command::new(bin)
        .args(["run", "--config", "fleet.toml", "--metrics-addr", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>());

    // The default data dir, where the operator commands look without --hub-json.
    let hub_json = dir.path().join(".fleetsim/hub/hub.json");
    let info: serde_json::Value = poll("hub.json with a metrics_url", || {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&hub_json).ok()?).ok()?;
        v["metrics_url"].is_string().then_some(v)
    });
    let url = info["metrics_url"].as_str().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:") && !url.ends_with(":9100/metrics"), "--metrics-addr moved it: {url}");
    let body = poll("the fleet to connect", || {
        let text = fetch(&url)?;
        text.contains("fleetsim_devices_connected_once 5").then_some(text)
    });
    for want in ["fleetsim_hub_connections", "process_resident_memory_bytes", "fleetsim_build_info{version="] {
        assert!(body.contains(want), "no {want} at {url}");
    }
    let devices = Command::new(bin).arg("devices").current_dir(dir.path()).output().unwrap();
    assert!(devices.status.success(), "{}", String::from_utf8_lossy(&devices.stderr));
    assert!(String::from_utf8_lossy(&devices.stdout).contains("env-sensor-0001"));

    // SIGTERM: a clean drain, told.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let lines = log.join().unwrap();
    assert!(status.success(), "{lines:?}");
    let stopped = lines.iter().find(|l| l.contains("stopped:")).unwrap_or_else(|| panic!("{lines:?}"));
    assert!(stopped.contains("never_sent=0") && stopped.contains("unacked=0"), "{stopped}");
    assert!(lines.iter().all(|l| !l.contains('\u{1b}')), "colour codes in a piped log: {lines:?}");
}

/// A plain-HTTP GET, enough for a Prometheus endpoint.
fn fetch(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (addr, path) = rest.split_once('/')?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /{path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}
