//! The web console in a real browser: Debian's headless Chromium, driven over WebDriver by its
//! chromedriver (both installed by scripts/setup-sdks.sh), against a real `fleetsim run` with the
//! embedded emulator and the demo's five environmental sensors. Each test saves screenshots under
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

/// A fleet process, a chromedriver and a browser session; all ended on drop.
struct Console {
    _dir: tempfile::TempDir,
    fleet: Child,
    driver: Child,
    browser: Option<Client>,
    base: String,
    http: reqwest::Client,
}

impl Drop for Console {
    fn drop(&mut self) {
        for child in [&mut self.fleet, &mut self.driver] {
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

impl Console {
    async fn start() -> Console {
        assert!(
            Path::new(DRIVER).exists() && Path::new(CHROMIUM).exists(),
            "chromium and chromedriver are missing: run scripts/setup-sdks.sh"
        );
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
        let log = std::fs::File::create(dir.path().join("fleet.log")).unwrap();
        let fleet = Command::new(env!("CARGO_BIN_EXE_fleetsim"))
            .args(["run", "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let port = free_port();
        let driver = Command::new(DRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let mut console = Console {
            _dir: dir,
            fleet,
            driver,
            browser: None,
            base: format!("http://127.0.0.1:{metrics}"),
            http: reqwest::Client::new(),
        };
        // The demo fleet is up: every sensor has connected.
        until("the fleet's five identities to connect", || async {
            let o = console.api("/api/v1/overview").await?;
            (o["ramp"]["connectedOnce"] == 5).then_some(())
        })
        .await;
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
