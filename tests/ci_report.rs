//! Issue 18, the CI report people can look at: a short CI run of the real binary against its
//! embedded emulator (with connections dropped under it, so faults and reconnects happen) writes,
//! beside the JSON report, a self-contained HTML report and a JUnit XML file. The HTML opens in
//! real headless Chromium with no network (the suite runs in its own network namespace) and every
//! timeline chart draws its series; a screenshot is kept under the test's output directory. The
//! JUnit XML parses, has one test case per check, and its counts agree with the JSON verdict; the
//! run is given one threshold it cannot meet, which must be a failing test case with the value
//! and the limit. A hostile string in a report stays text in the page.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

const HUB: &str = r#"
[faults]
drop_fraction = 0.5
drop_every_secs = 2
drop_mode = "close"
"#;

fn config(dir: &Path) -> PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    std::fs::write(dir.join("hub.toml"), HUB).unwrap();
    // `all_connected_within = "1ms"` cannot hold: connecting takes longer. It is the failing check.
    let text = format!(
        "scenarios = [\"{root}/scenarios/environmental-sensor.toml\"]\n\
         [hub]\ndata_dir = \"hub\"\nmqtt_addr = \"127.0.0.1:0\"\nhttps_addr = \"127.0.0.1:0\"\nconfig = \"hub.toml\"\n\
         [metrics]\nenabled = false\n\
         [device]\nbackoff_base = \"200ms\"\nbackoff_cap = \"1s\"\n\
         [ci]\nduration = \"7s\"\nsettle = \"30s\"\n\
         [ci.thresholds]\nmax_lost = 0\nall_connected_within = \"1ms\"\n"
    );
    let path = dir.join("fleet.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Where this test keeps what a person may want to look at after a run (the screenshots).
fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ci_report");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Opens `page` in headless Chromium, lets its scripts run (virtual time, so a slow machine
/// waits rather than fails), saves a screenshot and returns the DOM after the scripts ran.
fn chromium(page: &Path, screenshot: &Path, profile: &Path) -> String {
    let url = format!("file://{}", page.display());
    let common = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--virtual-time-budget=5000",
        "--window-size=1100,2600",
    ];
    let profile = format!("--user-data-dir={}", profile.display());
    let run = |extra: &str| {
        let out = Command::new("chromium")
            .args(common)
            .arg(&profile)
            .arg(extra)
            .arg(&url)
            .stdin(Stdio::null())
            .output()
            .expect("chromium runs (installed by scripts/setup-sdks.sh)");
        assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    run(&format!("--screenshot={}", screenshot.display()));
    assert!(std::fs::metadata(screenshot).map(|m| m.len() > 10_000).unwrap_or(false), "a screenshot was taken");
    String::from_utf8(run("--dump-dom").stdout).unwrap()
}

/// The render check the page's script wrote: chart id -> (status, series pixels).
fn render_check(dom: &str) -> Vec<(String, String, u64)> {
    let start = dom.find("<ul id=\"render-check\">").expect("the render check list");
    let end = start + dom[start..].find("</ul>").unwrap();
    let attr = |li: &str, name: &str| -> Option<String> {
        let i = li.find(&format!("{name}=\""))? + name.len() + 2;
        Some(li[i..i + li[i..].find('"')?].to_owned())
    };
    dom[start..end]
        .split("<li ")
        .skip(1)
        .map(|li| {
            (
                attr(li, "data-chart").unwrap_or_default(),
                attr(li, "data-status").unwrap_or_default(),
                attr(li, "data-series-pixels").and_then(|n| n.parse().ok()).unwrap_or(0),
            )
        })
        .collect()
}

fn junit_counts(xml: &str) -> (usize, usize, usize, Vec<(String, Option<String>)>) {
    let doc = roxmltree::Document::parse(xml).expect("the JUnit file is well-formed XML");
    let suite = doc.descendants().find(|n| n.has_tag_name("testsuite")).expect("a testsuite");
    let n = |a: &str| suite.attribute(a).and_then(|v| v.parse().ok()).unwrap();
    let cases = suite
        .children()
        .filter(|c| c.has_tag_name("testcase"))
        .map(|c| {
            let failure = c.children().find(|f| f.has_tag_name("failure")).and_then(|f| f.attribute("message"));
            (c.attribute("name").unwrap().to_owned(), failure.map(str::to_owned))
        })
        .collect::<Vec<_>>();
    assert_eq!(cases.len(), n("tests"), "tests= counts the test cases");
    (n("tests"), n("failures"), n("skipped"), cases)
}

fn results(report: &Value) -> (usize, usize, usize) {
    let checks = report["checks"].as_array().unwrap();
    let count = |r: &str| checks.iter().filter(|c| c["result"] == r).count();
    (checks.len(), count("fail"), count("not checked"))
}

#[test]
fn a_ci_run_writes_an_html_report_that_renders_offline_and_a_junit_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_fleetsim");
    let out = Command::new(bin)
        .args(["run", "--config", config(dir.path()).to_str().unwrap(), "--report", "report.json"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the impossible threshold fails the run: {stderr}");
    let report: Value = serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    let pretty = serde_json::to_string_pretty(&report).unwrap();
    assert!(stderr.contains("HTML report: report.html") && stderr.contains("JUnit XML: report.junit.xml"), "{stderr}");

    // The timeline: a point a second, counts that add up to the run's totals.
    let tl = &report["timeline"];
    let points = tl["t"].as_array().unwrap().len();
    assert!(points >= 7, "at least the 7 s run at one point a second: {points}");
    let total = |k: &str| tl[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum::<u64>();
    assert_eq!(total("generated"), report["telemetry"]["generated"].as_u64().unwrap(), "{pretty}");
    assert_eq!(total("acked"), report["telemetry"]["acked"].as_u64().unwrap(), "{pretty}");
    let reconnects: u64 = report["reconnects"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total("reconnects"), reconnects, "{pretty}");
    assert!(reconnects > 0 && total("faults") > 0, "connections were dropped under the fleet: {pretty}");
    assert!(tl["puback_p99_ms"].as_array().unwrap().iter().any(Value::is_number), "{pretty}");
    let settle = tl["settle_from_secs"].as_f64().unwrap();
    assert!((7.0..tl["end_secs"].as_f64().unwrap() + 0.01).contains(&settle), "the settle began after 7 s: {pretty}");

    // The HTML opens without network and every chart draws its lines.
    let shots = output_dir();
    let html = dir.path().join("report.html");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(!page.contains("<script src") && !page.contains("<link") && !page.contains("<img"), "nothing to fetch");
    let dom = chromium(&html, &shots.join("report.png"), &dir.path().join("profile"));
    assert!(dom.contains("<span id=\"verdict\">FAIL</span>"));
    let drawn = render_check(&dom);
    let ids: Vec<&str> = drawn.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(ids, ["connected", "rates", "latency", "faults", "reconnects"], "{dom}");
    for (id, status, pixels) in &drawn {
        assert_eq!(status, "drawn", "chart {id}");
        assert!(*pixels > 50, "chart {id} drew its series ({pixels} pixels of its colours)");
    }
    assert!(dom.contains("<td>all_connected_secs</td>"), "the thresholds table");

    // JUnit: one test case per check, the counts of the JSON verdict, the failure explained.
    let xml = std::fs::read_to_string(dir.path().join("report.junit.xml")).unwrap();
    let (tests, failures, skipped, cases) = junit_counts(&xml);
    assert_eq!((tests, failures, skipped), results(&report), "{xml}");
    assert_eq!(failures, 1, "only the impossible threshold fails: {pretty}");
    let failed: Vec<_> = cases.iter().filter(|(_, f)| f.is_some()).collect();
    let value =
        report["checks"].as_array().unwrap().iter().find(|c| c["name"] == "all_connected_secs").unwrap()["value"]
            .clone();
    assert_eq!(failed[0].0, "all_connected_secs");
    assert_eq!(
        failed[0].1.as_deref(),
        Some(format!("all_connected_secs: measured {value}, limit 0.001").as_str()),
        "{xml}"
    );

    // `report merge` writes the merged views too; a hostile string in a shard stays text.
    let mut hostile = report.clone();
    let evil = "</script><script>document.title='owned'</script><b id=injected>x</b>";
    hostile["errors"] =
        serde_json::json!([{"source": "connect", "kind": evil, "count": 1, "example": evil, "device": evil}]);
    hostile["timeline"]["note"] = serde_json::json!(evil);
    std::fs::write(dir.path().join("hostile.json"), hostile.to_string()).unwrap();
    let out = Command::new(bin)
        .args(["report", "merge", "report.json", "hostile.json", "--out", "merged.json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let merged: Value = serde_json::from_slice(&std::fs::read(dir.path().join("merged.json")).unwrap()).unwrap();
    let dom = chromium(&dir.path().join("merged.html"), &shots.join("merged.png"), &dir.path().join("profile"));
    assert!(!dom.contains("id=\"injected\"") && !dom.contains("<title>owned"), "no markup or script from a report");
    assert!(dom.contains("&lt;/script&gt;&lt;script&gt;document.title="), "shown as text");
    for (id, status, pixels) in render_check(&dom) {
        assert!(status == "drawn" && pixels > 50, "merged chart {id}: {status} {pixels}");
    }
    let xml = std::fs::read_to_string(dir.path().join("merged.junit.xml")).unwrap();
    let (tests, failures, skipped, _) = junit_counts(&xml);
    assert_eq!((tests, failures, skipped), results(&merged), "{xml}");
}
