//! Secrets stay secret: a fleet and its embedded emulator run with known keys at debug log level,
//! and neither their logs, their metrics nor their error output contain a key, a derived key, a
//! SAS signature or a connection string.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use fleetsim::iot::sas::{Key, derive_device_key};
use fleetsim_testkit as common;
use serde_json::json;

const OWNER: &str = "b3duZXIta2V5LWZvci10aGUtc2VjcmV0cy10ZXN0LTAwMDAwMDAwMDA=";
const GROUP: &str = "Z3JvdXAta2V5LWZvci10aGUtc2VjcmV0cy10ZXN0LTExMTExMTExMTE=";

#[test]
fn no_secret_reaches_logs_metrics_or_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    std::fs::write(
        dir.path().join("hub.toml"),
        format!("[keys]\niothubowner = \"{OWNER}\"\ngroup_primary = \"{GROUP}\"\n"),
    )
    .unwrap();
    let config = dir.path().join("fleet.toml");
    std::fs::write(
        &config,
        format!(
            "scenarios = [\"{root}/scenarios/environmental-sensor.toml\", \"{root}/scenarios/module-twin.toml\", \"{root}/scenarios/rebootable-device.toml\"]\n\
             [hub]\nmode = \"embedded\"\ndata_dir = \"{d}/hub\"\nmqtt_addr = \"127.0.0.1:0\"\nhttps_addr = \"127.0.0.1:0\"\nconfig = \"{d}/hub.toml\"\n\
             [metrics]\naddr = \"127.0.0.1:0\"\n[ramp]\nrate = 500\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    // Logs go to a file: at debug level they would fill a pipe nobody reads until the end.
    let log_path = dir.path().join("fleet.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetsim"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    // The banner names the identities and the metrics endpoint. Bounded: a fleet that prints no
    // banner within a minute is killed, which ends the read.
    let hub_json = dir.path().join("hub/hub.json");
    let (banner_read, banner_wait) = std::sync::mpsc::channel::<()>();
    let pid = child.id().to_string();
    std::thread::spawn(move || {
        if banner_wait.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = Command::new("kill").arg("-KILL").arg(pid).status();
        }
    });
    let mut stdout = String::new();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 4096];
    while !stdout.contains("metrics:") {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "fleetsim stopped (or was stopped) before its banner: {stdout}");
        stdout.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let _ = banner_read.send(());
    let identities: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("fleetsim: ")?.split_whitespace().next()?.parse().ok())
        .expect("the identity count printed");
    let metrics_url = stdout
        .lines()
        .find_map(|l| l.split_once("metrics:").map(|(_, r)| r.split_whitespace().next().unwrap().to_owned()))
        .expect("metrics address printed");
    // Every identity provisioned and connected, and every one with telemetry sent (so every flow
    // has logged): the hub holds telemetry from each sender. (A module's host device may send
    // nothing itself.)
    let scenarios: Vec<_> = ["environmental-sensor", "module-twin", "rebootable-device"]
        .iter()
        .map(|s| std::path::PathBuf::from(format!("{root}/scenarios/{s}.toml")))
        .collect();
    let templates = fleetsim::scenario::schema::load(&scenarios).unwrap();
    let senders: u64 = templates
        .iter()
        .map(|t| {
            let modules = t.modules.iter().filter(|m| !m.behaviour.telemetry.is_empty()).count() as u64;
            t.count * (u64::from(!t.behaviour.telemetry.is_empty()) + modules)
        })
        .sum();
    let identities_in_templates: u64 = templates.iter().map(|t| t.count * (1 + t.modules.len() as u64)).sum();
    assert_eq!(identities_in_templates, identities as u64, "the banner counts every identity");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let api = common::Api::new(fleetsim::hub::info::HubInfo::load(&hub_json).unwrap());
        common::wait_until_for("telemetry from every identity at the hub", Duration::from_secs(60), || async {
            let (mut connected, mut sent) = (0u64, 0u64);
            for (sql, module) in [("SELECT * FROM devices", false), ("SELECT * FROM devices.modules", true)] {
                let (status, _, twins) = api.rest("POST", "/devices/query", Some(json!({"query": sql}))).await;
                assert_eq!(status, 200, "{twins}");
                for t in twins.as_array().into_iter().flatten() {
                    let device = t["deviceId"].as_str().unwrap_or_default();
                    let module = if module { t["moduleId"].as_str() } else { None };
                    connected += u64::from(t["connectionState"] == "Connected");
                    if api.events(device, module).await["received"].as_u64().unwrap_or(0) > 0 {
                        sent += 1;
                    }
                }
            }
            connected == identities_in_templates && sent >= senders
        })
        .await;
    });
    let metrics = {
        let rest = metrics_url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut s = std::net::TcpStream::connect(host).unwrap();
        use std::io::Write;
        write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    assert!(metrics.contains("fleetsim_telemetry_acked_total"), "the fleet ran");
    // A bad request carries a real token: the error it gets back must not echo it.
    let bad = Command::new(env!("CARGO_BIN_EXE_fleetsim")).args(["check", "/nonexistent.toml"]).output().unwrap();
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    out.read_to_string(&mut stdout).unwrap();
    let _ = child.wait();
    let stderr = std::fs::read_to_string(&log_path).unwrap();
    let everything = format!("{stdout}\n{stderr}\n{metrics}\n{}", String::from_utf8_lossy(&bad.stderr));
    assert!(stderr.lines().count() > 50, "debug logging was on:\n{stderr}");
    // The search would find a key if one were printed: the keys are really in use.
    assert!(
        std::fs::read_to_string(dir.path().join("hub/keys.json")).unwrap().contains(OWNER),
        "the configured owner key is in use"
    );

    let group = Key::from_base64(GROUP).unwrap();
    let derived = derive_device_key(&group, "env-sensor-0001").to_base64();
    for (what, secret) in
        [("the owner key", OWNER), ("the group key", GROUP), ("a derived device key", derived.as_str())]
    {
        assert!(!everything.contains(secret), "{what} leaked");
        let encoded = fleetsim::iot::encoding::url_encode(secret);
        assert!(!everything.contains(&encoded), "{what} leaked, percent-encoded");
    }
    for marker in ["SharedAccessSignature", "SharedAccessKey=", "sig="] {
        assert!(!everything.contains(marker), "`{marker}` appears in the output");
    }
}
