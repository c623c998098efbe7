//! CI reports across shards: the latency histograms a shard's report carries, and `fleetsim
//! report merge`, which combines the reports of every shard of one run into a single verdict.
//! Counts are summed; fleet-wide percentiles come from the merged histograms (averaging shard
//! percentiles is wrong: the p99 of a fleet is not the mean of its shards' p99s); each check is
//! judged again on the merged values against the limits the shards were given.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Upper bounds (ms) of the method-latency buckets: 10^(k/20), about 12 % apart, 0.1 ms to 100 s.
/// Fixed, so that every shard's histogram merges with every other's.
pub fn method_bounds_ms() -> Vec<f64> {
    (-20..=100).map(|k| (10f64.powf(k as f64 / 20.0) * 1e4).round() / 1e4).collect()
}

/// A histogram: `counts[i]` samples at most `bounds[i]` (and above `bounds[i-1]`); `over` above
/// the last bound. Quantiles are answered with the bucket's upper bound (nearest rank over
/// buckets), or `max` in the overflow bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub over: u64,
    pub sum: f64,
    pub max: f64,
}

impl Histogram {
    pub fn new(bounds: Vec<f64>) -> Histogram {
        let counts = vec![0; bounds.len()];
        Histogram { bounds, counts, over: 0, sum: 0.0, max: 0.0 }
    }

    pub fn from_samples(bounds: Vec<f64>, samples: &[f64]) -> Histogram {
        let mut h = Histogram::new(bounds);
        for &x in samples {
            h.observe(x);
        }
        h
    }

    /// Adds one sample (bounds are few and sorted: a binary search finds its bucket).
    pub fn observe(&mut self, x: f64) {
        let i = self.bounds.partition_point(|b| *b < x);
        match self.counts.get_mut(i) {
            Some(c) => *c += 1,
            None => self.over += 1,
        }
        self.sum += x;
        self.max = self.max.max(x);
    }

    /// A Prometheus histogram's buckets (cumulative there, per bucket here).
    pub fn from_prometheus(h: &prometheus::Histogram) -> Histogram {
        use prometheus::core::Collector;
        let mut out = Histogram::new(Vec::new());
        for family in h.collect() {
            for m in family.get_metric() {
                let p = m.get_histogram();
                let mut below = 0;
                for b in p.get_bucket() {
                    out.bounds.push(b.upper_bound());
                    out.counts.push(b.cumulative_count() - below);
                    below = b.cumulative_count();
                }
                out.over = p.get_sample_count() - below;
                out.sum = p.get_sample_sum();
                // Prometheus keeps no maximum: the last finite bound is what is known.
                out.max = out.bounds.last().copied().unwrap_or(0.0);
            }
        }
        out
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.over
    }

    /// Adds another shard's histogram; the bounds must be the same.
    pub fn merge(&mut self, other: &Histogram) -> Result<(), String> {
        if self.bounds != other.bounds {
            return Err("histograms with different buckets cannot be merged".into());
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.over += other.over;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
        Ok(())
    }

    /// The `q` quantile by nearest rank over the buckets: the upper bound of the bucket holding
    /// the sample of rank ceil(q n).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((n as f64 * q).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            seen += c;
            if seen >= rank {
                return Some(b.min(self.max));
            }
        }
        Some(self.max)
    }
}

/// Finds a CI report in text: the whole text, or the first pretty-printed JSON object in it that
/// has `checks` (pod logs mix the report with the banner and log lines).
pub fn find_report(text: &str) -> Option<Value> {
    if let Ok(v) = serde_json::from_str::<Value>(text)
        && v.get("checks").is_some()
    {
        return Some(v);
    }
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "{" {
            let mut stream = serde_json::Deserializer::from_str(&text[offset..]).into_iter::<Value>();
            if let Some(Ok(v)) = stream.next()
                && v.get("checks").is_some()
            {
                return Some(v);
            }
        }
        offset += line.len();
    }
    None
}

/// A shard's value for one of its checks.
fn check_value(r: &Value, name: &str) -> Option<f64> {
    r["checks"].as_array()?.iter().find(|c| c["name"] == name)?["value"].as_f64()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Sums numeric leaves of JSON objects key by key (counts by reason, by cause, by kind).
fn sum_maps<'a>(maps: impl Iterator<Item = &'a Value>) -> Value {
    let mut out = Map::new();
    for m in maps.filter_map(Value::as_object) {
        for (k, v) in m {
            let acc = out.entry(k.clone()).or_insert(json!(0));
            *acc = json!(u(acc) + u(v));
        }
    }
    Value::Object(out)
}

/// Combines the reports of one run's shards into one report with one verdict.
pub fn merge(shards: &[Value]) -> Result<Value, String> {
    if shards.is_empty() {
        return Err("no reports to merge".into());
    }
    let sum = |path: &[&str]| -> u64 { shards.iter().map(|r| u(path.iter().fold(r, |v, k| &v[*k]))).sum() };
    let all_some =
        |path: &[&str]| -> Option<u64> { shards.iter().map(|r| path.iter().fold(r, |v, k| &v[*k]).as_u64()).sum() };
    let mut methods: Option<Histogram> = None;
    let mut puback: Option<Histogram> = None;
    for (i, r) in shards.iter().enumerate() {
        for (key, acc) in [("method_ms", &mut methods), ("puback_seconds", &mut puback)] {
            let h = &r["histograms"][key];
            if h.is_null() {
                return Err(format!(
                    "report {} has no histograms.{key}: it was written by an older fleetsim; percentiles cannot be merged",
                    i + 1
                ));
            }
            let h: Histogram =
                serde_json::from_value(h.clone()).map_err(|e| format!("report {}: histograms.{key}: {e}", i + 1))?;
            match acc {
                Some(a) => a.merge(&h).map_err(|e| format!("report {}: {key}: {e}", i + 1))?,
                None => *acc = Some(h),
            }
        }
    }
    let methods = methods.expect("at least one report");
    let puback = puback.expect("at least one report");
    let e2e = merge_end_to_end(shards)?;
    let timeline = merge_timelines(shards)?;
    let errors = merge_errors(shards);

    let generated = sum(&["telemetry", "generated"]);
    let dropped = sum_maps(shards.iter().map(|r| &r["telemetry"]["dropped"]));
    let failures = sum_maps(shards.iter().map(|r| &r["methods"]["failures"]));
    let probes_ok = sum(&["methods", "probes_ok"]);
    let probes_failed: u64 =
        failures.as_object().into_iter().flatten().filter(|(k, _)| *k != "skipped_busy").map(|(_, v)| u(v)).sum();
    let buffer_full = u(&dropped["buffer_full"]);
    let dropped_total: u64 = dropped.as_object().into_iter().flatten().map(|(_, v)| u(v)).sum();
    let operations = generated + probes_ok + probes_failed;
    let error_rate = if operations == 0 { 0.0 } else { (buffer_full + probes_failed) as f64 / operations as f64 };
    let identities = sum(&["identities"]);
    let connected_at_end = sum(&["connected_at_end"]);
    let lost = all_some(&["telemetry", "lost"]);
    // The fleet is all connected when its slowest shard is.
    let all_connected: Option<f64> =
        shards.iter().map(|r| check_value(r, "all_connected_secs")).try_fold(0f64, |m, v| v.map(|v| m.max(v)));
    let finished = shards
        .iter()
        .all(|r| r["checks"].as_array().into_iter().flatten().any(|c| c["name"] == "finished" && c["value"] == true));
    let p99 = methods.quantile(0.99);

    // Each check on the merged value, against the limit the shards ran with (the first's).
    let limit = |name: &str| -> Value {
        shards[0]["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == name)
            .map_or(Value::Null, |c| c["limit"].clone())
    };
    let judge = |value: Option<f64>, limit: &Value| -> &'static str {
        match (value, limit.as_f64()) {
            (_, None) => "not checked",
            (None, Some(_)) => "fail",
            (Some(v), Some(l)) if v <= l => "pass",
            _ => "fail",
        }
    };
    let mut checks = vec![
        json!({"name": "finished", "value": finished, "limit": true, "result": if finished { "pass" } else { "fail" }}),
    ];
    for (name, value) in [
        ("lost", lost.map(|x| x as f64)),
        ("unaccounted", Some(shards.iter().filter_map(|r| check_value(r, "unaccounted")).sum::<f64>())),
        ("dropped", Some(dropped_total as f64)),
        ("stuck", Some(identities.saturating_sub(connected_at_end) as f64)),
        ("all_connected_secs", all_connected),
        ("method_p99_ms", p99),
        ("error_rate", Some(error_rate)),
    ] {
        let l = limit(name);
        // `lost` cannot be judged when any shard could not count arrivals (Azure).
        let result = if name == "lost" && lost.is_none() { "not checked" } else { judge(value, &l) };
        checks.push(json!({"name": name, "value": value, "limit": l, "result": result}));
    }
    checks.extend(e2e.checks(shards, &limit, &judge));
    let pass = checks.iter().all(|c| c["result"] != "fail");
    Ok(json!({
        "pass": pass,
        "shards": shards.len(),
        "shards_passed": shards.iter().filter(|r| r["pass"] == true).count(),
        "run_ids": shards.iter().map(|r| r["run_id"].clone()).collect::<Vec<_>>(),
        "duration_secs": shards.iter().filter_map(|r| r["duration_secs"].as_f64()).fold(0.0, f64::max),
        "identities": identities,
        "connected_at_end": connected_at_end,
        "settled": shards.iter().all(|r| r["settled"] == true),
        "telemetry": {
            "generated": generated,
            "acked": sum(&["telemetry", "acked"]),
            "sent": sum(&["telemetry", "sent"]),
            "retransmits": sum(&["telemetry", "retransmits"]),
            "queued": sum(&["telemetry", "queued"]),
            "paused": sum(&["telemetry", "paused"]),
            "dropped": dropped,
            "lost": lost,
        },
        "methods": {
            "probes_ok": probes_ok,
            "failures": failures,
            "p50_ms": methods.quantile(0.5),
            "p99_ms": p99,
        },
        "puback_ms": { "p50": puback.quantile(0.5).map(|s| s * 1e3), "p99": puback.quantile(0.99).map(|s| s * 1e3) },
        "reconnects": sum_maps(shards.iter().map(|r| &r["reconnects"])),
        "end_to_end": e2e.section,
        "errors": errors,
        "timeline": timeline.map_or(Value::Null, |t| t.to_json()),
        "histograms": {
            "method_ms": methods, "puback_seconds": puback,
            "e2e_enqueued_ms": e2e.enqueued, "e2e_read_ms": e2e.read,
        },
        "checks": checks,
    }))
}

/// The shards' end-to-end sections combined: counts summed, the latency histograms merged
/// bucket by bucket (as the method and PUBACK ones), percentiles read from the merged buckets.
struct EndToEnd {
    section: Value,
    enqueued: Option<Histogram>,
    read: Option<Histogram>,
    acked_not_read: Option<u64>,
    /// The reader's errors, `shard N: why`; empty when every reader ran.
    errors: Vec<String>,
    /// Shards whose report has an end-to-end section.
    shards: usize,
}

/// A histogram as reports show it: `count`, `p50`, `p90`, `p99` and `max` (milliseconds;
/// `null` when empty).
pub fn percentiles(h: &Histogram) -> Value {
    json!({
        "count": h.count(),
        "p50": h.quantile(0.5),
        "p90": h.quantile(0.9),
        "p99": h.quantile(0.99),
        "max": (h.count() > 0).then_some(h.max),
    })
}

fn merge_end_to_end(shards: &[Value]) -> Result<EndToEnd, String> {
    let mut out =
        EndToEnd { section: Value::Null, enqueued: None, read: None, acked_not_read: None, errors: vec![], shards: 0 };
    let with: Vec<(usize, &Value)> = shards.iter().enumerate().filter(|(_, r)| r["end_to_end"].is_object()).collect();
    if with.is_empty() {
        return Ok(out);
    }
    out.shards = with.len();
    for (key, acc) in [("e2e_enqueued_ms", &mut out.enqueued), ("e2e_read_ms", &mut out.read)] {
        for (i, r) in &with {
            let h = &r["histograms"][key];
            if h.is_null() {
                continue; // the reader never started (its error says why)
            }
            let h: Histogram =
                serde_json::from_value(h.clone()).map_err(|e| format!("report {}: histograms.{key}: {e}", i + 1))?;
            match acc {
                Some(a) => a.merge(&h).map_err(|e| format!("report {}: {key}: {e}", i + 1))?,
                None => *acc = Some(h),
            }
        }
    }
    for (i, r) in &with {
        if let Some(e) = r["end_to_end"]["error"].as_str() {
            out.errors.push(format!("shard {}: {e}", i + 1));
        }
    }
    let sum = |k: &str| -> u64 { with.iter().map(|(_, r)| u(&r["end_to_end"][k])).sum() };
    let all = |k: &str| -> Option<u64> { with.iter().map(|(_, r)| r["end_to_end"][k].as_u64()).sum() };
    out.acked_not_read = all("acked_not_read");
    let empty = Histogram::new(method_bounds_ms());
    out.section = json!({
        "shards": with.len(),
        "consumer_groups": with.iter().map(|(_, r)| r["end_to_end"]["consumer_group"].clone()).collect::<Vec<_>>(),
        "unique": sum("unique"),
        "duplicates": sum("duplicates"),
        "gaps": sum("gaps"),
        "identities": sum("identities"),
        "other_events": sum("other_events"),
        "untimed": sum("untimed"),
        "missing": all("missing"),
        "acked_not_read": out.acked_not_read,
        "never_acked_not_read": all("never_acked_not_read"),
        "error": (!out.errors.is_empty()).then(|| out.errors.join("; ")),
        "latency_ms": {
            "enqueued": percentiles(out.enqueued.as_ref().unwrap_or(&empty)),
            "read": percentiles(out.read.as_ref().unwrap_or(&empty)),
        },
    });
    Ok(out)
}

impl EndToEnd {
    /// The end-to-end checks judged again on the merged values.
    fn checks(
        &self,
        shards: &[Value],
        limit: &dyn Fn(&str) -> Value,
        judge: &dyn Fn(Option<f64>, &Value) -> &'static str,
    ) -> Vec<Value> {
        if self.shards == 0 {
            return vec![];
        }
        // The reader ran on every shard that asked for it.
        let asked = shards.iter().any(|r| {
            r["checks"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["name"] == "e2e_reader" && c["result"] != "not checked")
        });
        let reader = match (asked, self.errors.is_empty()) {
            (false, _) => "not checked",
            (true, true) => "pass",
            (true, false) => "fail",
        };
        let mut out = vec![json!({
            "name": "e2e_reader", "value": (!self.errors.is_empty()).then(|| self.errors.join("; ")),
            "limit": Value::Null, "result": reader,
        })];
        for (name, value) in [
            ("e2e_missing", self.acked_not_read.map(|x| x as f64)),
            ("e2e_enqueued_p99_ms", self.enqueued.as_ref().and_then(|h| h.quantile(0.99))),
            ("e2e_read_p99_ms", self.read.as_ref().and_then(|h| h.quantile(0.99))),
        ] {
            let l = limit(name);
            out.push(json!({"name": name, "value": value, "limit": l, "result": judge(value, &l)}));
        }
        out
    }
}

/// The shards' timelines as one (`timeline::merge`); shards without one (older reports) are
/// left out.
fn merge_timelines(shards: &[Value]) -> Result<Option<super::timeline::Timeline>, String> {
    let mut parts = Vec::new();
    for (i, r) in shards.iter().enumerate() {
        if r["timeline"].is_null() {
            continue;
        }
        parts.push(super::timeline::Timeline::from_json(&r["timeline"]).map_err(|e| format!("report {}: {e}", i + 1))?);
    }
    super::timeline::merge(&parts)
}

/// How many kinds of error a report lists.
pub const TOP_ERRORS: usize = 20;

/// Most frequent first (then by source and kind, so equal counts keep one order), at most
/// `TOP_ERRORS`.
pub fn sort_errors(errors: &mut Vec<Value>) {
    errors.sort_by(|a, b| {
        let key =
            |v: &Value| (v["source"].as_str().unwrap_or("").to_owned(), v["kind"].as_str().unwrap_or("").to_owned());
        b["count"].as_u64().unwrap_or(0).cmp(&a["count"].as_u64().unwrap_or(0)).then_with(|| key(a).cmp(&key(b)))
    });
    errors.truncate(TOP_ERRORS);
}

/// The shards' top errors by source and kind: counts summed, the first shard's example kept.
fn merge_errors(shards: &[Value]) -> Value {
    let mut by_kind: Vec<Value> = Vec::new();
    for e in shards.iter().flat_map(|r| r["errors"].as_array().into_iter().flatten().take(TOP_ERRORS)) {
        match by_kind.iter_mut().find(|x| x["source"] == e["source"] && x["kind"] == e["kind"]) {
            Some(x) => x["count"] = json!(u(&x["count"]).saturating_add(u(&e["count"]))),
            None => by_kind.push(e.clone()),
        }
    }
    sort_errors(&mut by_kind);
    Value::Array(by_kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_percentiles_come_from_merged_buckets_not_averages() {
        let bounds = method_bounds_ms();
        // Shard A: 99 fast calls; shard B: 1 fast and 9 slow ones. Averaging p99s (1 ms and
        // ~1000 ms) would say ~500 ms; the fleet's p99 is among the slow calls.
        let a = Histogram::from_samples(bounds.clone(), &[1.0; 99]);
        let mut b_samples = vec![1.0];
        b_samples.extend([1000.0; 9]);
        let b = Histogram::from_samples(bounds.clone(), &b_samples);
        let mut m = a.clone();
        m.merge(&b).unwrap();
        assert_eq!(m.count(), 109);
        assert_eq!(m.quantile(0.5), Some(1.0));
        assert_eq!(m.quantile(0.99), Some(1000.0));
        assert_eq!(a.quantile(0.99), Some(1.0));
        assert!(Histogram::new(vec![1.0]).merge(&a).is_err(), "different buckets do not merge");
        assert_eq!(Histogram::new(bounds).quantile(0.5), None);
    }

    #[test]
    fn a_report_is_found_in_pod_logs() {
        let log = "fleetsim: 3 identities (shard 0/2)\n{\"timestamp\":\"x\",\"level\":\"INFO\"}\n{\n  \"pass\": true,\n  \"checks\": []\n}\nfleetsim: PASS\n";
        assert_eq!(find_report(log).unwrap()["pass"], true);
        assert!(find_report("no report here").is_none());
    }
}
