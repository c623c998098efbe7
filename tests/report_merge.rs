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

    // Issue 13: the end-to-end books and latency histograms (device send to back-end reader)
    // merge like the others: counts summed, percentiles from the merged buckets.
    let e2e = &merged["end_to_end"];
    assert_eq!(e2e["shards"], 2, "{merged}");
    assert_eq!(e2e["unique"].as_u64(), Some(sum(&|r| r["end_to_end"]["unique"].as_u64().unwrap())));
    assert_eq!(e2e["unique"], merged["telemetry"]["acked"], "every acknowledged message was read: {merged}");
    for key in ["e2e_enqueued_ms", "e2e_read_ms"] {
        let count = |h: &serde_json::Value| {
            h["counts"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum::<u64>()
                + h["over"].as_u64().unwrap()
        };
        let shards: u64 = reports.iter().map(|r| count(&r["histograms"][key])).sum();
        assert!(shards > 0, "{key} has samples");
        assert_eq!(count(&merged["histograms"][key]), shards, "{key}");
    }
    let read_p99 = e2e["latency_ms"]["read"]["p99"].as_f64().unwrap();
    let slowest = reports.iter().map(|r| r["histograms"]["e2e_read_ms"]["max"].as_f64().unwrap()).fold(0.0, f64::max);
    assert!(read_p99 > 0.0 && read_p99 <= slowest, "read p99 {read_p99} at most the slowest message {slowest}");
    let names: Vec<&str> = merged["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for name in ["e2e_reader", "e2e_missing", "e2e_enqueued_p99_ms", "e2e_read_p99_ms"] {
        assert!(names.contains(&name), "{name} judged again: {names:?}");
    }
    // The timelines merge too, and the merged HTML and JUnit files are written beside --out.
    let tl_total = |r: &serde_json::Value| {
        r["timeline"]["generated"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum::<u64>()
    };
    assert_eq!(tl_total(&merged), sum(&tl_total));
    assert!(dir.path().join("merged.html").exists() && dir.path().join("merged.junit.xml").exists());

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

/// The end-to-end histograms of shards merge bucket by bucket: a fleet's p99 is read from the
/// merged buckets, not averaged from the shards' p99s, and a shard whose reader failed fails the
/// merged `e2e_reader` check.
#[test]
fn end_to_end_latency_merges_from_buckets_across_shards() {
    use fleetsim::fleet::report::{Histogram, merge, method_bounds_ms};
    let shard = |samples: &[f64], error: Option<&str>| {
        let h = Histogram::from_samples(method_bounds_ms(), samples);
        let empty = Histogram::new(vec![0.005]);
        serde_json::json!({
            "pass": true, "run_id": "r", "identities": 1, "connected_at_end": 1,
            "telemetry": {"generated": samples.len(), "acked": samples.len(), "dropped": {}},
            "methods": {"probes_ok": 0, "failures": {}},
            "end_to_end": {"consumer_group": "$Default", "unique": samples.len(), "acked_not_read": 0, "error": error},
            "histograms": {
                "method_ms": Histogram::new(method_bounds_ms()), "puback_seconds": empty,
                "e2e_enqueued_ms": h, "e2e_read_ms": h,
            },
            "checks": [
                {"name": "finished", "value": true, "limit": true, "result": "pass"},
                {"name": "e2e_reader", "value": null, "limit": null, "result": "pass"},
                {"name": "e2e_read_p99_ms", "value": null, "limit": 500.0, "result": "pass"},
            ],
        })
    };
    // Shard A: 99 fast messages; B: 1 fast and 9 slow. Averaging p99s would say ~500 ms.
    let mut slow = vec![10.0];
    slow.extend([1000.0; 9]);
    let m = merge(&[shard(&[10.0; 99], None), shard(&slow, None)]).unwrap();
    assert_eq!(m["end_to_end"]["unique"], 109);
    assert_eq!(m["end_to_end"]["latency_ms"]["read"]["count"], 109);
    assert_eq!(m["end_to_end"]["latency_ms"]["read"]["p50"], 10.0);
    assert_eq!(m["end_to_end"]["latency_ms"]["read"]["p99"], 1000.0);
    assert_eq!(m["end_to_end"]["latency_ms"]["enqueued"]["max"], 1000.0);
    let check = |m: &serde_json::Value, name: &str| {
        m["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()["result"].clone()
    };
    assert_eq!(check(&m, "e2e_read_p99_ms"), "fail", "1000 ms against 500: {m}");
    assert_eq!(check(&m, "e2e_reader"), "pass");
    assert_eq!(m["pass"], false);
    // A shard whose reader failed.
    let m = merge(&[shard(&[10.0; 5], None), shard(&[10.0; 5], Some("refused"))]).unwrap();
    assert_eq!(check(&m, "e2e_reader"), "fail");
    assert_eq!(m["end_to_end"]["error"], "shard 2: refused");
}
