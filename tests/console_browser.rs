//! The web console in a real browser: Debian's headless Chromium, driven over WebDriver by its
//! chromedriver (both installed by scripts/setup-sdks.sh), against a real `fleetsim run` with the
//! embedded emulator and the demo's five environmental sensors, or against a standalone `fleetsim
//! hub` with those sensors run by a separate fleet. Each test saves screenshots under
//! target/browser-screenshots/. Every wait is bounded and waits for a condition, never a time.
//!
//! Tests run one at a time (a browser each is heavy on a small machine): they share a lock.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const DRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const BOUND: Duration = Duration::from_secs(60);

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The fleetsim processes, a chromedriver and a browser session; all ended on drop.
struct Console {
    _dir: tempfile::TempDir,
    procs: Vec<Child>,
    browser: Option<Client>,
    base: String,
    http: reqwest::Client,
}

impl Drop for Console {
    fn drop(&mut self) {
        for child in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` every 200 ms until it answers `Some`, for at most `BOUND`.
async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn spawn(dir: &Path, log: &str, args: &[&str]) -> Child {
    let log = std::fs::File::create(dir.join(log)).unwrap();
    Command::new(env!("CARGO_BIN_EXE_fleetsim")).args(args).stdout(Stdio::null()).stderr(log).spawn().unwrap()
}

impl Console {
    /// `fleetsim run` with the embedded emulator: the console is the fleet's.
    async fn start() -> Console {
        let dir = tempfile::tempdir().unwrap();
        let metrics = free_port();
        let config = dir.path().join("fleet.toml");
        std::fs::write(
            &config,
            format!(
                "scenarios = [{scenario:?}]\n\
                 [hub]\nmode = \"embedded\"\ndata_dir = {data:?}\nmqtt_addr = \"127.0.0.1:0\"\nhttps_addr = \"127.0.0.1:0\"\n\
                 [metrics]\naddr = \"127.0.0.1:{metrics}\"\n",
                scenario = repo("scenarios/environmental-sensor.toml").display().to_string(),
                data = dir.path().join("hub").display().to_string(),
            ),
        )
        .unwrap();
        let fleet = spawn(dir.path(), "fleet.log", &["run", "--config", config.to_str().unwrap()]);
        let console = Console::with_browser(dir, vec![fleet], metrics).await;
        // The demo fleet is up: every sensor has connected.
        until("the fleet's five identities to connect", || async {
            let o = console.api("/api/v1/overview").await?;
            (o["ramp"]["connectedOnce"] == 5).then_some(())
        })
        .await;
        console
    }

    /// A standalone `fleetsim hub`, whose console shows the emulator only, and a fleet of the
    /// demo's five sensors aimed at it (with no console of its own).
    async fn start_hub() -> Console {
        let dir = tempfile::tempdir().unwrap();
        let metrics = free_port();
        let data = dir.path().join("hub");
        let hub = spawn(
            dir.path(),
            "hub.log",
            &[
                "hub",
                "--in-memory",
                "--data-dir",
                data.to_str().unwrap(),
                "--mqtt-addr",
                "127.0.0.1:0",
                "--https-addr",
                "127.0.0.1:0",
                "--amqp-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                &format!("127.0.0.1:{metrics}"),
            ],
        );
        let hub_json = data.join("hub.json");
        until("the hub to write hub.json", || async { hub_json.exists().then_some(()) }).await;
        let config = dir.path().join("fleet.toml");
        std::fs::write(
            &config,
            format!(
                "scenarios = [{scenario:?}]\n[hub]\nmode = \"external\"\nhub_json = {hub_json:?}\n[metrics]\nenabled = false\n",
                scenario = repo("scenarios/environmental-sensor.toml").display().to_string(),
            ),
        )
        .unwrap();
        let fleet = spawn(dir.path(), "fleet.log", &["run", "--config", config.to_str().unwrap()]);
        let console = Console::with_browser(dir, vec![hub, fleet], metrics).await;
        until("the fleet's five sensors to connect to the hub", || async {
            let o = console.api("/api/v1/overview").await?;
            (o["hub"]["connections"]["hub"] == 5).then_some(())
        })
        .await;
        console
    }

    /// A chromedriver and a browser session on the console at `metrics`, beside `procs`.
    async fn with_browser(dir: tempfile::TempDir, mut procs: Vec<Child>, metrics: u16) -> Console {
        assert!(
            Path::new(DRIVER).exists() && Path::new(CHROMIUM).exists(),
            "chromium and chromedriver are missing: run scripts/setup-sdks.sh"
        );
        let port = free_port();
        procs.push(
            Command::new(DRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver starts"),
        );
        let mut console = Console {
            _dir: dir,
            procs,
            browser: None,
            base: format!("http://127.0.0.1:{metrics}"),
            http: reqwest::Client::new(),
        };
        let status = format!("http://127.0.0.1:{port}/status");
        until("chromedriver to be ready", || async {
            let r = console.http.get(&status).send().await.ok()?;
            let v: Value = r.json().await.ok()?;
            (v["value"]["ready"] == true).then_some(())
        })
        .await;
        let profile = console._dir.path().join("chromium");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,1100", format!("--user-data-dir={}", profile.display())],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let browser = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session");
        console.browser = Some(browser);
        console
    }

    fn browser(&self) -> &Client {
        self.browser.as_ref().expect("started")
    }

    async fn api(&self, path: &str) -> Option<Value> {
        let r = self.http.get(format!("{}{path}", self.base)).send().await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    async fn open(&self, hash: &str) {
        self.browser().goto(&format!("{}/{hash}", self.base)).await.unwrap();
    }

    /// The text of the first element `css` selects, or "" when there is none yet.
    async fn text(&self, css: &str) -> String {
        match self.browser().find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Replaces an input's value by typing, as a user would.
    async fn type_into(&self, css: &str, text: &str) {
        let e = self.browser().find(Locator::Css(css)).await.unwrap();
        e.clear().await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.browser().find(Locator::Css(css)).await.unwrap().click().await.unwrap();
    }

    async fn js(&self, script: &str) -> Value {
        self.browser().execute(script, vec![]).await.unwrap_or(Value::Null)
    }

    /// Saves what the browser shows as target/browser-screenshots/NAME.png.
    async fn screenshot(&self, name: &str) {
        let png = self.browser().screenshot().await.unwrap();
        let dir = repo("target/browser-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn stop(mut self) {
        if let Some(b) = self.browser.take() {
            let _ = b.close().await;
        }
    }
}

async fn row_ids(c: &Console) -> Vec<String> {
    let v = c.js("return [...document.querySelectorAll('#devices-table tbody tr')].map(r => r.dataset.id)").await;
    serde_json::from_value(v).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_devices_table_shows_the_demo_fleet_and_filters_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let c = Console::start().await;
    c.open("#/devices").await;
    let want: Vec<String> = (1..=5).map(|n| format!("env-sensor-{n:04}")).collect();
    until("the table to list the five sensors", || async { (row_ids(&c).await == want).then_some(()) }).await;
    assert!(c.text("#devices-total").await.contains("of 5"), "{}", c.text("#devices-total").await);
    until("every row to show connected", || async {
        let states = c.js("return [...document.querySelectorAll('#devices-table tbody tr td:nth-child(3)')].map(t => t.textContent)").await;
        (states == json!(vec!["connected"; 5])).then_some(())
    })
    .await;
    c.screenshot("devices").await;
    // `fleetsim status` prints the same fleet from the same API.
    let addr = c.base.trim_start_matches("http://").to_owned();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetsim")).args(["status", "--addr", &addr]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("5 of 5 identities connected at least once"), "{text}");
    assert!(text.contains("connected 5"), "{text}");

    c.type_into("#filter-prefix", "env-sensor-0003").await;
    until("the prefix filter to leave one row", || async { (row_ids(&c).await == ["env-sensor-0003"]).then_some(()) })
        .await;
    assert!(c.text("#devices-total").await.contains("of 1"), "{}", c.text("#devices-total").await);
    c.screenshot("devices-filtered").await;

    c.type_into("#filter-prefix", "").await;
    c.browser().find(Locator::Css("#filter-state")).await.unwrap().select_by_value("rebooting").await.unwrap();
    until("the state filter to match nothing", || async {
        (row_ids(&c).await.is_empty() && c.text("#devices-total").await == "no identity matches").then_some(())
    })
    .await;
    c.browser()
        .find(Locator::Css("#filter-template"))
        .await
        .unwrap()
        .select_by_value("environmental-sensor")
        .await
        .unwrap();
    c.browser().find(Locator::Css("#filter-state")).await.unwrap().select_by_value("connected").await.unwrap();
    until("template and state filters to list the fleet again", || async {
        (row_ids(&c).await.len() == 5).then_some(())
    })
    .await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoking_blink_from_the_device_page_shows_its_response() {
    let _one = ONE_AT_A_TIME.lock().await;
    let c = Console::start().await;
    c.open("#/devices").await;
    until("the table", || async { (row_ids(&c).await.len() == 5).then_some(()) }).await;
    // From the table to the device page, as a user goes.
    c.click("#devices-table tbody tr[data-id='env-sensor-0002']").await;
    until("the device page", || async { (c.text("#device-title").await == "env-sensor-0002").then_some(()) }).await;
    c.type_into("#invoke-method", "blink").await;
    c.type_into("#invoke-payload", "3").await;
    c.click("#invoke-send").await;
    let result = until("the command's response", || async {
        let t = c.text("#invoke-result").await;
        t.starts_with("status").then_some(t)
    })
    .await;
    assert!(result.starts_with("status 200"), "{result}");
    assert!(result.contains("Blinking LED every 3 seconds"), "{result}");
    // The device's own record of it, on the same page.
    until("the recent commands to list blink", || async {
        c.text("#device-commands").await.contains("blink → 200").then_some(())
    })
    .await;
    c.screenshot("device-blink").await;
    // A command the device does not know gets the device's 404.
    c.type_into("#invoke-method", "selfdestruct").await;
    c.click("#invoke-send").await;
    let result = until("the unknown command's response", || async {
        let t = c.text("#invoke-result").await;
        t.starts_with("status 404").then_some(t)
    })
    .await;
    assert!(result.starts_with("status 404"), "{result}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_brightness_from_the_device_page_shows_the_acknowledgement() {
    let _one = ONE_AT_A_TIME.lock().await;
    let c = Console::start().await;
    c.open("#/device/env-sensor-0004").await;
    until("the device page", || async { (c.text("#device-title").await == "env-sensor-0004").then_some(()) }).await;
    c.type_into("#desired-name", "brightness").await;
    c.type_into("#desired-value", "77").await;
    c.click("#desired-send").await;
    // The scenario acknowledges brightness after 5 s.
    let ack = until("the device's acknowledgement", || async {
        let t = c.text("#desired-ack").await;
        t.starts_with("acknowledged").then_some(t)
    })
    .await;
    assert!(ack.starts_with("acknowledged: brightness = 77, ac 200"), "{ack}");
    let reported = c.text("#twin-reported").await;
    assert!(reported.contains("\"brightness\"") && reported.contains("77"), "{reported}");
    c.screenshot("device-brightness").await;
    // Out of the writable's range (0 to 100): the device refuses, keeps 77, and the page says so.
    c.type_into("#desired-value", "250").await;
    c.click("#desired-send").await;
    let ack = until("the refusal", || async {
        let t = c.text("#desired-ack").await;
        (t.starts_with("acknowledged") && !t.contains("ac 200")).then_some(t)
    })
    .await;
    assert!(ack.starts_with("acknowledged: brightness = 77, ac 400") && ack.contains("invalid value"), "{ack}");
    c.stop().await;
}

/// The last value of series `i` of chart `name`, as the page holds it.
async fn last_point(c: &Console, name: &str, i: usize) -> Option<f64> {
    let v = c
        .js(&format!("const d = window.fleetsimCharts['{name}'].data[{i}]; return d.length ? d[d.length - 1] : null"))
        .await;
    v.as_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_toggled_from_the_page_shows_in_the_charts() {
    let _one = ONE_AT_A_TIME.lock().await;
    let c = Console::start().await;
    c.open("#/emulator").await;
    let knob = "#faults tr[data-knob='puback_delay_ms']";
    until("the fault panel", || async { (!c.text(knob).await.is_empty()).then_some(()) }).await;
    c.type_into(&format!("{knob} input[type=number]"), "400").await;
    c.click(&format!("{knob} input[type=checkbox]")).await;
    until("the emulator to hold PUBACKs 400 ms", || async {
        let f = c.api("/api/v1/emulator/faults").await?;
        (f["puback_delay_ms"] == 400).then_some(())
    })
    .await;
    // The live tail of one sensor's telemetry, as the hub received it.
    c.type_into("#tail-device", "env-sensor-0001").await;
    c.click("#tail-form button").await;
    until("the tail to show the sensor's readings", || async {
        c.text("#tail li").await.contains("\"temp\"").then_some(())
    })
    .await;
    until("the cards to count the fault", || async {
        c.text("#emulator-cards").await.contains("1\nfaults on").then_some(())
    })
    .await;
    until("the emulator's charts to show the sensors and the fault", || async {
        let connections = last_point(&c, "hubConnections", 1).await?;
        let faults = last_point(&c, "hubFaults", 1).await?;
        (connections == 5.0 && faults == 1.0).then_some(())
    })
    .await;
    c.js("window.scrollTo(0, 0)").await;
    c.screenshot("emulator-fault-on").await;

    c.open("#/fleet").await;
    until("the faults chart to show one fault on", || async {
        (last_point(&c, "faults", 1).await == Some(1.0)).then_some(())
    })
    .await;
    until("the latency chart to show the held PUBACKs", || async {
        (last_point(&c, "latency", 2).await? >= 300.0).then_some(())
    })
    .await;
    c.screenshot("fleet-fault").await;

    c.open("#/emulator").await;
    until("the panel to show the fault on", || async {
        let on = c.js(&format!("return document.querySelector(\"{knob} input[type=checkbox]\").checked")).await;
        (on == true).then_some(())
    })
    .await;
    c.click(&format!("{knob} input[type=checkbox]")).await;
    until("the emulator to answer PUBACKs at once again", || async {
        let f = c.api("/api/v1/emulator/faults").await?;
        (f["puback_delay_ms"] == 0).then_some(())
    })
    .await;
    c.open("#/fleet").await;
    until("the faults chart to show no fault", || async {
        (last_point(&c, "faults", 1).await == Some(0.0)).then_some(())
    })
    .await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_hub_serves_the_emulator_view_with_live_charts() {
    let _one = ONE_AT_A_TIME.lock().await;
    let c = Console::start_hub().await;
    // No fleet here: its routes say so, and the page shows the emulator only.
    let r = c.http.get(format!("{}/api/v1/devices", c.base)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "NoFleet", "{body}");
    let o = c.api("/api/v1/overview").await.unwrap();
    assert_eq!((o["fleet"].clone(), o["emulator"].clone()), (json!(false), json!(true)), "{o}");
    assert_eq!(o["hub"]["devices"], 5, "{o}");

    c.open("").await;
    until("the emulator view", || async {
        let shown = c.js("return !document.querySelector('#view-emulator').hidden").await;
        (shown == true).then_some(())
    })
    .await;
    let hidden =
        c.js("return ['fleet', 'devices'].map(v => document.querySelector(`nav a[data-view=${v}]`).hidden)").await;
    assert_eq!(hidden, json!([true, true]));
    until("the cards to count the registry", || async {
        c.text("#emulator-cards").await.contains("5\ndevices").then_some(())
    })
    .await;
    until("the connections chart to show the five sensors", || async {
        (last_point(&c, "hubConnections", 1).await == Some(5.0)).then_some(())
    })
    .await;
    until("the telemetry chart to show what the hub receives", || async {
        (last_point(&c, "hubTelemetry", 1).await? > 0.0).then_some(())
    })
    .await;

    let knob = "#faults tr[data-knob='twin_error_rate']";
    until("the fault panel", || async { (!c.text(knob).await.is_empty()).then_some(()) }).await;
    c.click(&format!("{knob} input[type=checkbox]")).await;
    until("the faults chart to show the fault on", || async {
        (last_point(&c, "hubFaults", 1).await == Some(1.0)).then_some(())
    })
    .await;
    c.js("window.scrollTo(0, 0)").await;
    c.screenshot("hub-emulator").await;

    // `fleetsim status` prints the emulator's part from the same overview.
    let addr = c.base.trim_start_matches("http://").to_owned();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetsim")).args(["status", "--addr", &addr]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(": 5 devices, 0 modules") && text.contains("faults on     1"), "{text}");
    assert!(!text.contains("ramp"), "{text}");
    c.stop().await;
}
