//! One verdict for a sharded run: two shards of one fleet run in CI mode as real processes (each
//! with its own embedded emulator), then `fleetsim report merge` combines their reports: counts
//! summed, percentiles from the merged histograms, checks judged again, the exit status the
//! fleet-wide verdict.

use std::process::{Command, Stdio};

fn config(dir: &std::path::Path, shard: usize) -> std::path::PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = format!(
        "scenarios = [\"{root}/scenarios/environmental-sensor.toml\"]\n[hub]\ndata_dir = \"hub-{shard}\"\nmqtt_addr = \"127.0.0.1:0\"\nhttps_addr = \"127.0.0.1:0\"\n[metrics]\nenabled = false\n[ci]\nduration = \"3s\"\nsettle = \"30s\"\n[ci.thresholds]\nmax_lost = 0\nmethod_p99 = \"10s\"\n[ci.probe]\nmethod = \"blink\"\npayload = \"1\"\nevery = \"100ms\"\n"
    );
    let path = dir.join(format!("shard-{shard}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn shard_reports_merge_into_one_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_fleetsim");
    let children: Vec<_> = (0..2)
        .map(|i| {
            let report = dir.path().join(format!("report-{i}.json"));
            Command::new(bin)
                .args(["run", "--config", config(dir.path(), i).to_str().unwrap(), "--shard", &format!("{i}/2")])
                .args(["--report", report.to_str().unwrap()])
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let reports: Vec<serde_json::Value> = (0..2)
        .map(|i| serde_json::from_slice(&std::fs::read(dir.path().join(format!("report-{i}.json"))).unwrap()).unwrap())
        .collect();
    let merged_path = dir.path().join("merged.json");
    let out = Command::new(bin)
        .args(["report", "merge", "report-0.json", "report-1.json", "--out", "merged.json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let merged: serde_json::Value = serde_json::from_slice(&std::fs::read(&merged_path).unwrap()).unwrap();
    let sum = |f: &dyn Fn(&serde_json::Value) -> u64| reports.iter().map(f).sum::<u64>();
    assert_eq!(merged["identities"], 5, "3 + 2 identities of the 5-device scenario");
    assert_eq!(merged["identities"].as_u64(), Some(sum(&|r| r["identities"].as_u64().unwrap())));
    assert_eq!(
        merged["telemetry"]["generated"].as_u64(),
        Some(sum(&|r| r["telemetry"]["generated"].as_u64().unwrap()))
    );
    let probes = sum(&|r| r["methods"]["probes_ok"].as_u64().unwrap());
    assert!(probes > 0, "the probe ran");
    assert_eq!(merged["methods"]["probes_ok"].as_u64(), Some(probes));
    // The merged histogram holds every shard's samples, and the p99 is read from it.
    let h = &merged["histograms"]["method_ms"];
    let count: u64 =
        h["counts"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum::<u64>() + h["over"].as_u64().unwrap();
    assert_eq!(count, probes);
    let p99 = merged["methods"]["p99_ms"].as_f64().unwrap();
    let slowest = reports.iter().map(|r| r["histograms"]["method_ms"]["max"].as_f64().unwrap()).fold(0.0, f64::max);
    assert!(p99 > 0.0 && p99 <= slowest * 1.13, "p99 {p99} within a bucket of the slowest call {slowest}");
    assert_eq!(merged["pass"], true, "{merged}");

    // A shard that lost messages fails the merged run, even though the other passed.
    let mut bad = reports[1].clone();
    bad["telemetry"]["lost"] = serde_json::json!(3);
    std::fs::write(dir.path().join("bad.json"), bad.to_string()).unwrap();
    let out = Command::new(bin)
        .args(["report", "merge", "report-0.json", "bad.json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lost = m["checks"].as_array().unwrap().iter().find(|c| c["name"] == "lost").unwrap().clone();
    assert_eq!((lost["value"].as_f64(), lost["result"].as_str()), (Some(3.0), Some("fail")), "{lost}");

    // Not a report: refused with the file named.
    std::fs::write(dir.path().join("junk.txt"), "hello").unwrap();
    let out = Command::new(bin).args(["report", "merge", "junk.txt"]).current_dir(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("junk.txt: holds no fleetsim CI report"));
}
