//! SIGHUP reloads the scenarios of a running daemon: a broken file is refused with its position
//! and the fleet is untouched; a good one adds what is new and leaves the rest connected.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A template of one-second sensors.
fn sensors(name: &str, count: u32, id: &str) -> String {
    format!(
        "[[devices]]\nname = \"{name}\"\ncount = {count}\nid = \"{id}\"\nprovisioning = \"dps\"\nenrollment = \"group\"\n\
         [devices.telemetry]\ninterval = \"1s\"\nfields = {{ t = {{ kind = \"uniform\", min = 0, max = 1 }} }}\n"
    )
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

fn scrape(url: &str) -> String {
    let out = Command::new("curl").args(["-sS", url]).output().expect("curl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` (bounded) until it holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    fleetsim_testkit::poll_blocking(what, Duration::from_secs(60), || f().then_some(()))
}

/// The log without terminal colour codes.
fn plain(log: &str) -> String {
    let mut out = String::new();
    let mut rest = log;
    while let Some(i) = rest.find('\x1b') {
        out.push_str(&rest[..i]);
        rest = rest[i..].find('m').map_or("", |m| &rest[i + m + 1..]);
    }
    out.push_str(rest);
    out
}

fn hup(pid: u32) {
    assert!(Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
}

#[test]
fn a_bad_reload_changes_nothing_and_a_good_one_adds_without_disturbing() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("sensors.toml");
    std::fs::write(&scenario, sensors("first", 3, "keep-{n}")).unwrap();
    // Not *.toml: the scenario pattern would take it for a scenario.
    let config = dir.path().join("fleet.conf");
    std::fs::write(
        &config,
        "scenarios = [\"*.toml\"]\n[hub]\nmode = \"embedded\"\ndata_dir = \"hub\"\nmqtt_addr = \"127.0.0.1:0\"\nhttps_addr = \"127.0.0.1:0\"\n[metrics]\naddr = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let log_path = dir.path().join("fleet.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetsim"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let metrics_url = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.trim().strip_prefix("metrics:").map(|r| r.split_whitespace().next().unwrap().to_owned()))
        .expect("the daemon prints its metrics address");
    let connected = |m: &str| metric(m, "fleetsim_devices{state=\"connected\"}");
    let accepted = |m: &str| metric(m, "fleetsim_hub_connections_accepted_total{kind=\"hub\"}");
    eventually("three connected devices", || connected(&scrape(&metrics_url)) == 3.0);
    let before = accepted(&scrape(&metrics_url));

    // A broken file: refused with its position, nothing changes.
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[[devices]]\nname = \"x\"\ncount = \"many\"\n").unwrap();
    hup(pid);
    eventually("the refusal in the log", || {
        std::fs::read_to_string(&log_path).unwrap().contains("reload refused: the fleet keeps")
    });
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("broken.toml:3:9"), "the error names file, line and column:\n{log}");
    let m = scrape(&metrics_url);
    assert_eq!((connected(&m), accepted(&m)), (3.0, before), "the fleet was untouched");

    // Issue 10: numbers that overflowed `Duration` killed the daemon on reload. Now they are
    // refused like any other error, with their position, and the daemon keeps running.
    for (n, bad) in ["interval = 1e20", "interval = \"5124095576030432h\""].iter().enumerate() {
        std::fs::write(&broken, sensors("x", 1, "x-{n}").replace("interval = \"1s\"", bad)).unwrap();
        hup(pid);
        eventually("the second refusal in the log", || {
            std::fs::read_to_string(&log_path).unwrap().matches("reload refused: the fleet keeps").count() >= n + 2
        });
        assert!(child.try_wait().unwrap().is_none(), "the daemon is still running after {bad}");
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert!(log.contains("broken.toml:8:12") && log.contains("must be between 1ms and 30d"), "{log}");
    }
    let m = scrape(&metrics_url);
    assert_eq!((connected(&m), accepted(&m)), (3.0, before), "the fleet was untouched");

    // Fixed, plus two new devices: only those connect.
    std::fs::remove_file(&broken).unwrap();
    std::fs::write(dir.path().join("more.toml"), sensors("second", 2, "new-{n}")).unwrap();
    hup(pid);
    eventually("five connected devices", || connected(&scrape(&metrics_url)) == 5.0);
    let m = scrape(&metrics_url);
    assert_eq!(accepted(&m), before + 2.0, "the three unchanged devices kept their connections");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("reloaded") && log.contains("added") && log.contains("unchanged"), "{log}");

    // Removing a file stops its devices.
    std::fs::remove_file(dir.path().join("more.toml")).unwrap();
    hup(pid);
    eventually("three devices again", || {
        let m = scrape(&metrics_url);
        connected(&m) == 3.0 && m.contains("fleetsim_devices{state=\"stopped\"} 0")
    });

    // A changed key restarts its identity, although `Debug` (which the comparison used to rely
    // on) shows no key material.
    let keys = dir.path().join("keys.csv");
    let key = |b: u8| fleetsim::iot::sas::Key::from_bytes(vec![b; 32]).to_base64();
    std::fs::write(&keys, format!("keyed-1,{}\n", key(1))).unwrap();
    let keyed = sensors("keyed", 1, "keyed-{n}").replace(
        "provisioning = \"dps\"\nenrollment = \"group\"",
        "provisioning = \"connection_string\"\nkeys_file = \"keys.csv\"",
    );
    std::fs::write(dir.path().join("keyed.toml"), keyed).unwrap();
    hup(pid);
    eventually("four connected devices", || connected(&scrape(&metrics_url)) == 4.0);
    let before = accepted(&scrape(&metrics_url));
    std::fs::write(&keys, format!("keyed-1,{}\n", key(2))).unwrap();
    hup(pid);
    eventually("the keyed device reconnects with its new key", || {
        let m = scrape(&metrics_url);
        accepted(&m) == before + 1.0 && connected(&m) == 4.0
    });
    let log = plain(&std::fs::read_to_string(&log_path).unwrap());
    assert!(log.contains("changed=1"), "the key change counts as a change:\n{log}");

    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}
