//! `fleetsim status`: the console's overview (`GET /api/v1/overview`) printed for a terminal, for
//! ssh sessions and CI logs, from `fleetsim run` (the fleet, and its embedded emulator) or from
//! `fleetsim hub` (the emulator). Exit 0 when printed, 1 when nothing can be reached there or it
//! answers something else than an overview.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use serde_json::Value;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The metrics address where the console and its API are served: the fleet's (`[metrics]
    /// addr`, or `run --metrics-addr`) or a standalone emulator's (`metrics_addr`, `hub
    /// --metrics-addr`, default 127.0.0.1:9464).
    #[arg(long, env = "FLEETSIM_STATUS_ADDR", default_value = "127.0.0.1:9100")]
    pub addr: SocketAddr,
    /// Print the overview as JSON (the API's answer, unchanged) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Fetches the overview and prints it.
pub async fn run(args: StatusArgs) -> u8 {
    let url = format!("http://{}/api/v1/overview", args.addr);
    match fetch(&url).await {
        Ok(v) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", render(&v));
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

async fn fetch(url: &str) -> Result<Value, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let r = client.get(url).send().await.map_err(|e| {
        format!(
            "cannot reach the fleet at {url} ({}); is `fleetsim run` running with its metrics on that address?",
            crate::sys::error_chain(&e)
        )
    })?;
    let status = r.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(format!("{url} answered 404: the fleet there serves no console (started with --no-console?)"));
    }
    if !status.is_success() {
        return Err(format!("{url} answered {status}"));
    }
    let v: Value = r.json().await.map_err(|e| format!("{url} did not answer an overview: {e}"))?;
    if !v.get("identities").is_some_and(Value::is_u64) && !v.get("hub").is_some_and(Value::is_object) {
        return Err(format!("{url} did not answer an overview"));
    }
    Ok(v)
}

fn num(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::Number(n) if n.is_f64() => format!("{:.1}", n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    }
}

fn pairs(v: &Value) -> String {
    match v.as_object() {
        Some(m) if !m.is_empty() => m.iter().map(|(k, v)| format!("{k} {}", num(v))).collect::<Vec<_>>().join(", "),
        _ => "none".to_owned(),
    }
}

/// The overview as a few aligned lines: the fleet's part when there is a fleet, then the
/// emulator's when there is one.
pub fn render(v: &Value) -> String {
    let mut out = format!("{:<13} {} s\n", "uptime", num(&v["uptimeSecs"]));
    if v["fleet"].as_bool() != Some(false) {
        out.push_str(&render_fleet(v));
    }
    if let Some(h) = v["hub"].as_object() {
        let mut line = |k: &str, val: String| out.push_str(&format!("{k:<13} {val}\n"));
        line(
            "emulator",
            format!(
                "{}: {} devices, {} modules",
                h["hostname"].as_str().unwrap_or("?"),
                num(&h["devices"]),
                num(&h["modules"])
            ),
        );
        line("connections", format!("hub {}, DPS {}", num(&h["connections"]["hub"]), num(&h["connections"]["dps"])));
        line("received", format!("{} telemetry messages", num(&h["telemetryReceived"])));
        line("faults on", num(&h["faults"]["active"]));
        line("fault events", pairs(&h["faultEvents"]));
    }
    out
}

fn render_fleet(v: &Value) -> String {
    let mut out = String::new();
    let mut line = |k: &str, val: String| out.push_str(&format!("{k:<13} {val}\n"));
    let fraction = v["ramp"]["fraction"].as_f64().unwrap_or(0.0);
    line(
        "ramp",
        format!(
            "{} of {} identities connected at least once ({:.0} %)",
            num(&v["ramp"]["connectedOnce"]),
            num(&v["ramp"]["total"]),
            fraction * 100.0
        ),
    );
    line("states", pairs(&v["states"]));
    let t = &v["telemetry"];
    line(
        "telemetry",
        format!(
            "generated {}, acked {}, dropped {}, retransmitted {}, queued {}",
            num(&t["generated"]),
            num(&t["acked"]),
            num(&t["dropped"]),
            num(&t["retransmitted"]),
            num(&t["queued"])
        ),
    );
    let r = &v["rates"];
    line(
        "rates (/s)",
        format!(
            "generated {}, acked {}, dropped {}, retransmitted {}",
            num(&r["generatedPerSec"]),
            num(&r["ackedPerSec"]),
            num(&r["droppedPerSec"]),
            num(&r["retransmitsPerSec"])
        ),
    );
    for (name, key) in [("puback (ms)", "puback"), ("connect (ms)", "connect"), ("method (ms)", "method")] {
        let l = &v["latencyMs"][key];
        line(
            name,
            format!(
                "p50 {}, p90 {}, p99 {} ({} samples)",
                num(&l["p50"]),
                num(&l["p90"]),
                num(&l["p99"]),
                num(&l["count"])
            ),
        );
    }
    line("reconnects", pairs(&v["reconnects"]));
    line("errors", pairs(&v["errors"]));
    if let Some(ci) = v["ci"].as_object() {
        line(
            "ci",
            format!(
                "{} of {} s ({:.0} %)",
                num(&ci["elapsedSecs"]),
                num(&ci["durationSecs"]),
                ci["fraction"].as_f64().unwrap_or(0.0) * 100.0
            ),
        );
        for c in ci["checks"].as_array().into_iter().flatten() {
            let standing = match c["ok"].as_bool() {
                Some(true) => "passing",
                Some(false) => "FAILING",
                None => "judged at the end",
            };
            line(
                "",
                format!(
                    "{}: limit {}, now {}: {standing}",
                    c["name"].as_str().unwrap_or("?"),
                    num(&c["limit"]),
                    num(&c["value"])
                ),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_every_part_and_survives_a_sparse_answer() {
        let v = json!({
            "uptimeSecs": 12, "identities": 5,
            "ramp": {"connectedOnce": 4, "total": 5, "fraction": 0.8},
            "states": {"connected": 4, "backoff": 1},
            "telemetry": {"generated": 10, "acked": 9, "dropped": 0, "retransmitted": 1, "queued": 1},
            "rates": {"generatedPerSec": 2.5},
            "latencyMs": {"puback": {"p50": 1.5, "p90": 2.0, "p99": 3.0, "count": 9}},
            "reconnects": {}, "errors": {"connect_refused": 2},
            "ci": {"elapsedSecs": 6.0, "durationSecs": 60.0, "fraction": 0.1,
                   "checks": [{"name": "max_dropped", "limit": 0, "value": 0, "ok": true}]},
        });
        let text = render(&v);
        assert!(text.contains("4 of 5 identities connected at least once (80 %)"), "{text}");
        assert!(text.contains("p50 1.5, p90 2.0, p99 3.0 (9 samples)"), "{text}");
        assert!(text.contains("connect_refused 2"), "{text}");
        assert!(text.contains("max_dropped: limit 0, now 0: passing"), "{text}");
        assert!(text.contains("reconnects    none"), "{text}");
        assert!(!text.contains("emulator"), "{text}");
        assert!(!render(&json!({})).is_empty());
    }

    #[test]
    fn a_standalone_emulator_prints_its_part_only() {
        let v = json!({
            "uptimeSecs": 3, "fleet": false, "emulator": true,
            "hub": {"hostname": "localhost", "devices": 7, "modules": 2, "connections": {"hub": 5, "dps": 0},
                    "telemetryReceived": 40, "faults": {"active": 1}, "faultEvents": {"drop": 3}},
        });
        let text = render(&v);
        assert!(text.contains("localhost: 7 devices, 2 modules"), "{text}");
        assert!(text.contains("hub 5, DPS 0"), "{text}");
        assert!(text.contains("faults on     1"), "{text}");
        assert!(text.contains("drop 3"), "{text}");
        assert!(!text.contains("ramp"), "{text}");
    }
}
