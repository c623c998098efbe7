//! The console's JSON API against a real fleet with its embedded emulator, over real HTTP on the
//! fleet's metrics listener: paging and filters over a few hundred identities, one identity's
//! page, the actions the browser tests do not drive (C2D, disconnect, reboot), the emulator's
//! fault routes, errors as JSON with their status, and `--no-console` (`[metrics] console = false`)
//! serving none of it.

use std::time::Duration;

use fleetsim_testkit as common;
use serde_json::{Value, json};

struct Fleet {
    fleet: Option<fleetsim::fleet::RunningFleet>,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

const SCENARIO: &str = r#"
[[devices]]
name = "alpha"
count = 200
id = "alpha-{n:04}"
provisioning = "connection_string"
[devices.telemetry]
interval = "1s"
fields = { t = { kind = "uniform", min = 1, max = 2 } }

[[devices]]
name = "beta"
count = 100
id = "beta-{n:04}"
provisioning = "connection_string"
[devices.telemetry]
interval = "1s"
fields = { t = { kind = "uniform", min = 1, max = 2 } }
"#;

async fn start(console: bool) -> Fleet {
    common::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("s.toml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    let path = dir.path().join("fleet.toml");
    std::fs::write(
        &path,
        format!(
            "scenarios = [{:?}]\n[hub]\nmode = \"embedded\"\ndata_dir = {:?}\nmqtt_addr = \"127.0.0.1:0\"\nhttps_addr = \"127.0.0.1:0\"\n\
             [metrics]\naddr = \"127.0.0.1:0\"\nconsole = {console}\n[ramp]\nrate = 2000\n",
            scenario.display().to_string(),
            dir.path().join("hub").display().to_string()
        ),
    )
    .unwrap();
    let cfg = fleetsim::config::DaemonConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let templates = fleetsim::scenario::schema::load(&cfg.scenarios).unwrap_or_else(|e| panic!("{e}"));
    let fleet = fleetsim::fleet::start(&cfg, templates, Default::default()).await.expect("fleet starts");
    let base = format!("http://{}", fleet.metrics_addr.expect("a metrics listener"));
    let f = Fleet { fleet: Some(fleet), base, http: reqwest::Client::new(), _dir: dir };
    common::wait_until("every identity to connect", || async { f.fleet.as_ref().unwrap().connected_once() == 300 })
        .await;
    f
}

impl Fleet {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get(&self, path: &str) -> Value {
        let (status, v) = self.call("GET", path, None).await;
        assert_eq!(status, 200, "{path}: {v}");
        v
    }

    async fn stop(mut self) {
        if let Some(f) = self.fleet.take() {
            f.shutdown().await;
        }
    }
}

fn ids(page: &Value) -> Vec<&str> {
    page["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_filters_errors_and_actions() {
    let f = start(true).await;

    // Paging in id order over the whole fleet, and filters.
    let p = f.get("/api/v1/devices?offset=195&limit=10").await;
    assert_eq!(p["total"], 300);
    assert_eq!(
        ids(&p),
        [
            "alpha-0196",
            "alpha-0197",
            "alpha-0198",
            "alpha-0199",
            "alpha-0200",
            "beta-0001",
            "beta-0002",
            "beta-0003",
            "beta-0004",
            "beta-0005"
        ]
    );
    assert_eq!(p["templates"], json!(["alpha", "beta"]));
    let p = f.get("/api/v1/devices?prefix=alpha-01&limit=500").await;
    assert_eq!(p["total"], 100);
    assert!(ids(&p).iter().all(|i| i.starts_with("alpha-01")));
    let p = f.get("/api/v1/devices?template=beta&state=connected&limit=1").await;
    assert_eq!((p["total"].as_u64(), ids(&p)), (Some(100), vec!["beta-0001"]));
    assert_eq!(p["items"][0]["credentials"], "registry");
    let p = f.get("/api/v1/devices?state=rebooting").await;
    assert_eq!(p["total"], 0);

    // Errors: JSON with the status, a code and a message.
    for (path, status, code) in [
        ("/api/v1/devices?limit=0", 400, "BadRequest"),
        ("/api/v1/devices?limit=501", 400, "BadRequest"),
        ("/api/v1/devices?state=asleep", 400, "BadRequest"),
        ("/api/v1/devices?offset=-1", 400, "BadRequest"),
        ("/api/v1/devices?colour=red", 400, "BadRequest"),
        ("/api/v1/devices/nobody", 404, "DeviceNotFound"),
        ("/api/v1/nothing/here", 404, "NoSuchRoute"),
    ] {
        let (s, v) = f.call("GET", path, None).await;
        assert_eq!((s, v["error"].as_str()), (status, Some(code)), "{path}: {v}");
        assert_eq!(v["status"], status, "{v}");
        assert!(!v["message"].as_str().unwrap().is_empty(), "{v}");
    }
    for (action, body, status, code) in [
        ("fly", json!({}), 404, "NoSuchAction"),
        ("invoke", json!({"payload": 1}), 400, "BadRequest"),
        ("invoke", json!({"method": ""}), 400, "BadRequest"),
        ("desired", json!({"patch": {}}), 400, "BadRequest"),
        ("desired", json!("brightness"), 400, "BadRequest"),
        ("reboot", json!({"downtimeSecs": 3601}), 400, "BadRequest"),
        ("c2d", json!({"body": "x", "extra": 1}), 400, "BadRequest"),
    ] {
        let (s, v) = f.call("POST", &format!("/api/v1/devices/alpha-0001/actions/{action}"), Some(body)).await;
        assert_eq!((s, v["error"].as_str()), (status, Some(code)), "{action}: {v}");
    }
    // Not JSON at all.
    let r = f.http.post(format!("{}/api/v1/devices/alpha-0001/actions/invoke", f.base)).body("{").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // C2D through the embedded hub reaches the device, counted on its page.
    let (s, v) = f.call("POST", "/api/v1/devices/alpha-0002/actions/c2d", Some(json!({"body": "hi"}))).await;
    assert_eq!(s, 200, "{v}");
    common::wait_until("the device to receive the C2D message", || async {
        f.get("/api/v1/devices/alpha-0002").await["counters"]["c2dReceived"] == 1
    })
    .await;

    // Disconnect: the device reconnects, its history and the reconnect causes say why.
    let (s, v) = f.call("POST", "/api/v1/devices/alpha-0003/actions/disconnect", None).await;
    assert_eq!(s, 202, "{v}");
    common::wait_until("the device to connect again", || async {
        let d = f.get("/api/v1/devices/alpha-0003").await;
        d["counters"]["connects"] == 2 && d["state"] == "connected"
    })
    .await;
    let o = f.get("/api/v1/overview").await;
    assert_eq!(o["reconnects"]["console_disconnect"], 1, "{o}");

    // Reboot: down (rebooting) for its downtime, then back; a second request while it is down is
    // refused as not connected.
    let (s, v) = f.call("POST", "/api/v1/devices/beta-0007/actions/reboot", Some(json!({"downtimeSecs": 3}))).await;
    assert_eq!(s, 202, "{v}");
    common::wait_until("the device to be rebooting", || async {
        f.get("/api/v1/devices/beta-0007").await["state"] == "rebooting"
    })
    .await;
    let (s, v) = f.call("POST", "/api/v1/devices/beta-0007/actions/disconnect", None).await;
    assert_eq!((s, v["error"].as_str()), (409, Some("NotConnected")), "{v}");
    let p = f.get("/api/v1/devices?state=rebooting").await;
    assert_eq!(ids(&p), ["beta-0007"]);
    common::wait_until("the rebooted device to come back", || async {
        let d = f.get("/api/v1/devices/beta-0007").await;
        d["state"] == "connected" && d["counters"]["connects"] == 2
    })
    .await;
    let d = f.get("/api/v1/devices/beta-0007").await;
    let states: Vec<&str> = d["history"].as_array().unwrap().iter().map(|h| h["state"].as_str().unwrap()).collect();
    assert!(states.ends_with(&["connected", "rebooting", "connecting", "connected"]), "{states:?}");
    assert!(!d["lastTelemetry"].as_array().unwrap().is_empty(), "{d}");
    assert!(d["twin"]["version"].is_u64(), "{d}");
    // No secret on the page: the identity's key is not in it.
    let text = d.to_string();
    assert!(!text.contains("SharedAccessKey") && !text.contains("primaryKey"), "{text}");

    // The fault routes: a bad value is refused naming the knob; a good one shows in the series.
    let (s, v) = f.call("PATCH", "/api/v1/emulator/faults", Some(json!({"drop_fraction": 2.0}))).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("drop_fraction"), "{v}");
    let (s, v) = f.call("PATCH", "/api/v1/emulator/faults", Some(json!({"twin_error_rate": 0.5}))).await;
    assert_eq!((s, v["twin_error_rate"].as_f64(), v["active"].as_u64()), (200, Some(0.5), Some(1)), "{v}");
    common::wait_until("a sample to count the fault", || async {
        let s = f.get("/api/v1/series").await;
        s["samples"].as_array().unwrap().last().is_some_and(|x| x["faultsActive"] == 1)
    })
    .await;
    let (s, v) = f.call("DELETE", "/api/v1/emulator/faults", None).await;
    assert_eq!((s, v["active"].as_u64()), (200, Some(0)), "{v}");
    let (s, v) = f.call("POST", "/api/v1/emulator/faults/outage", Some(json!({"seconds": 100000}))).await;
    assert_eq!(s, 400, "{v}");
    let e = f.get("/api/v1/emulator").await;
    assert_eq!((e["devices"].as_u64(), e["modules"].as_u64()), (Some(300), Some(0)), "{e}");
    let tail = f.get("/api/v1/emulator/telemetry?device=alpha-0001").await;
    assert!(!tail["messages"].as_array().unwrap().is_empty(), "{tail}");
    let after = tail["messages"].as_array().unwrap().last().unwrap()["seq"].as_u64().unwrap();
    let later = f.get(&format!("/api/v1/emulator/telemetry?device=alpha-0001&after={after}")).await;
    assert!(later["messages"].as_array().unwrap().iter().all(|m| m["seq"].as_u64().unwrap() > after), "{later}");

    // The stream sends samples as server-sent events.
    let mut r = f.http.get(format!("{}/api/v1/stream", f.base)).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let chunk = tokio::time::timeout(Duration::from_secs(10), r.chunk()).await.unwrap().unwrap().unwrap();
    let text = String::from_utf8_lossy(&chunk);
    assert!(text.contains("event: sample") || text.starts_with(':'), "{text}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_console_off_only_metrics_and_health_are_served() {
    let f = start(false).await;
    for path in ["/", "/api/v1/overview", "/api/v1/devices", "/assets/console.js"] {
        let (s, _) = f.call("GET", path, None).await;
        assert_eq!(s, 404, "{path}");
    }
    let (s, v) = f.call("GET", "/metrics", None).await;
    assert_eq!(s, 200);
    assert!(v.as_str().unwrap().contains("fleetsim_devices"), "{v}");
    let (s, _) = f.call("GET", "/healthz", None).await;
    assert_eq!(s, 200);
    // And no view is kept per identity.
    assert!(f.fleet.as_ref().unwrap().shared.views.is_none());
    f.stop().await;
}
