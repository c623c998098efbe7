//! What both benches need: an emulator process found through its hub.json, and an HTTP client
//! with a service token for its REST API.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use fleetsim::hub::info::HubInfo;
use fleetsim::iot::connection_string::ConnectionString;
use fleetsim::iot::sas::{Key, sign_token};
use fleetsim::iot::time::unix_secs;

/// Starts `fleetsim hub` on loopback with ephemeral ports and waits for its hub.json.
pub fn spawn_hub(data_dir: &Path, threads: Option<usize>, config: Option<&Path>) -> (Child, HubInfo) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetsim"));
    if let Some(t) = threads {
        cmd.args(["--threads", &t.to_string()]);
    }
    cmd.arg("hub");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let child = cmd
        .arg("--data-dir")
        .arg(data_dir)
        .args([
            "--mqtt-addr",
            "127.0.0.1:0",
            "--https-addr",
            "127.0.0.1:0",
            "--amqp-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--log",
            "warn",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start the hub");
    let hub_json = data_dir.join("hub.json");
    for _ in 0..600 {
        if hub_json.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    // hub.json is renamed into place complete, but give the listeners a moment to be polled.
    std::thread::sleep(Duration::from_millis(50));
    let info = HubInfo::load(&hub_json).unwrap_or_else(|e| panic!("the hub did not start: {e}"));
    (child, info)
}

/// An HTTP client trusting the emulator's CA, and an `iothubowner` token valid for two hours.
pub fn service_client(info: &HubInfo) -> (reqwest::Client, String) {
    let tls = fleetsim::client::transport::client_config(Some(&info.ca_file)).unwrap();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(rustls::ClientConfig::clone(&tls))
        .resolve("localhost", info.https_addr)
        .build()
        .unwrap();
    let cs: ConnectionString = info.service_connection_string.parse().unwrap();
    let key = Key::from_base64(cs.shared_access_key.as_deref().unwrap()).unwrap();
    let token = sign_token(&info.hostname, &key, unix_secs(SystemTime::now()) + 7200, Some("iothubowner"));
    (http, token)
}
