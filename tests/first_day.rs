//! What a newcomer meets on the first day, run as the real binary: `fleetsim run` with an
//! embedded emulator writes a hub.json whose `metrics_url` is where the emulator's metrics are
//! (the fleet's endpoint, moved with `--metrics-addr`), that endpoint carries process and build
//! metrics, the operator commands find the emulator without flags, a log written to a pipe has no
//! colour codes, and stopping says what the drain did.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Polls `f` for up to 30 s.
fn poll<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    fleetsim_testkit::poll_blocking(what, Duration::from_secs(30), f)
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

/// The emulator's log at debug level tells an SDK author what happened to each connection: who
/// connected, who was refused and why, who left and why; never the token.
#[test]
fn the_emulator_logs_each_connection_with_its_identity_and_cause() {
    use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetsim"))
        .args([
            "hub",
            "--data-dir",
            "d",
            "--mqtt-addr",
            "127.0.0.1:0",
            "--https-addr",
            "127.0.0.1:0",
            "--amqp-addr",
            "127.0.0.1:0",
            "--no-metrics",
        ])
        .args(["--log", "fleetsim=debug"])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>());
    let info: serde_json::Value =
        poll("hub.json", || serde_json::from_slice(&std::fs::read(dir.path().join("d/hub.json")).ok()?).ok());
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let ca = std::path::PathBuf::from(info["ca_file"].as_str().unwrap());
    let tls = fleetsim::client::transport::client_config(Some(&ca)).unwrap();
    let addr: std::net::SocketAddr = info["mqtt_addr"].as_str().unwrap().parse().unwrap();
    let host = info["hostname"].as_str().unwrap().to_owned();
    let cs: fleetsim::iot::connection_string::ConnectionString =
        info["service_connection_string"].as_str().unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let http = fleetsim::service::https_client(&tls).unwrap();
        let service = fleetsim::service::ServiceClient::new(http, &cs).unwrap();
        let key = fleetsim::iot::sas::Key::generate();
        service.ensure_device("real-1", &key).await.unwrap();
        let session = |id: &'static str, key: fleetsim::iot::sas::Key| {
            let (tls, host) = (tls.clone(), host.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let mut s =
                    tokio_rustls::TlsConnector::from(tls).connect("localhost".try_into().unwrap(), tcp).await.unwrap();
                let mut c = Connect::new(id);
                let token = fleetsim::iot::sas::sign_token(&format!("{host}/devices/{id}"), &key, u64::MAX / 4, None);
                c.set_login(fleetsim::iot::username::hub_username(&host, id, None, None), token);
                let mut buf = bytes::BytesMut::new();
                Packet::Connect(c).write(&mut buf, 1 << 20).unwrap();
                s.write_all(&buf).await.unwrap();
                let mut rbuf = bytes::BytesMut::new();
                let code = loop {
                    if let Ok(Packet::ConnAck(ConnAck { code, .. })) = Packet::read(&mut rbuf, 1 << 20) {
                        break code;
                    }
                    assert!(s.read_buf(&mut rbuf).await.unwrap() > 0, "closed without CONNACK");
                };
                let mut out = bytes::BytesMut::new();
                Packet::Disconnect.write(&mut out, 1 << 20).unwrap();
                let _ = s.write_all(&out).await;
                let _ = s.read_buf(&mut rbuf).await;
                code
            }
        };
        assert_eq!(session("ghost-1", key.clone()).await, ConnectReturnCode::NotAuthorized);
        assert_eq!(session("real-1", key).await, ConnectReturnCode::Success);
    });
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let lines = log.join().unwrap();
    let find = |parts: &[&str]| {
        lines
            .iter()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .unwrap_or_else(|| panic!("no {parts:?} in {lines:#?}"))
            .clone()
    };
    find(&["connection refused", "client_id=\"ghost-1\"", "reason=\"unknown_identity\"", "connack=5"]);
    find(&["connected", "client_id=\"real-1\""]);
    find(&["disconnected", "client_id=\"real-1\"", "reason=\"client_disconnect\""]);
    assert!(lines.iter().all(|l| !l.contains("SharedAccessSignature")), "a token reached the log");
}
