//! The fleet load benchmark: S emulator processes and S fleet processes (`--shard i/S`, each
//! fleet against its own emulator, since one process holds at most 20,000 files here) on
//! loopback. It waits until every device is connected, then measures a steady window: memory
//! (RSS from /proc) and CPU per process, telemetry counts and PUBACK latency from the fleets'
//! metrics, and direct-method round trips to a sample of devices. Prints a table and JSON.
//!
//!     cargo bench --bench fleet_load -- --devices 10000 [--shards N] [--interval 10] [--rate 2000]
//!                                       [--steady 30] [--methods 200] [--json PATH]
//!                                       [--behaviour FILE] [--console-requests N] [--no-console]
//!                                       [--hub-behaviour "key = value"]
//!
//! The web console is on in the fleets (as by default): during the steady window a client keeps its
//! live stream open on the first fleet and sends `--console-requests` API requests (none by
//! default with `--bench`: the standard figures are the fleet's own) spread over the window (overview, a devices page at a random offset, a state-filtered page that walks the whole
//! fleet, one identity's page with its twin), and their latency is reported. `--no-console` runs
//! the fleets without it, to compare their CPU per message.
//!
//! `--hub-behaviour` adds lines to the emulators' `[behaviour]` (e.g. `eventhub_durable = false`).
//!
//! `--behaviour FILE` replaces the built-in telemetry and `ping` command with the template lines in
//! FILE (e.g. `model = "dtmi:..."` with an absolute `model_dir`, or hand-written tables under
//! `devices.`): how memory per device compares between shapes of device.
//!
//! Under `cargo test` it runs a 40-device, 2-shard smoke pass that fails unless every device
//! connects and telemetry is acknowledged.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

#[path = "support/procstat.rs"]
mod procstat;
mod support;
use procstat::proc_stats;

use fleetsim::hub::info::HubInfo;
use serde_json::json;

struct Args {
    devices: u64,
    shards: u64,
    interval: u64,
    rate: f64,
    steady: u64,
    methods: usize,
    json: Option<PathBuf>,
    /// Worker threads per process (`--threads`); none: one per core.
    threads: Option<usize>,
    /// Template lines replacing the built-in behaviour (`--behaviour`).
    behaviour: Option<PathBuf>,
    /// Console API requests in the steady window (0 with `--no-console`).
    console_requests: usize,
    console: bool,
    /// More `[behaviour]` lines for the emulators' config (`--hub-behaviour "k = v"`).
    hub_behaviour: String,
}

fn args() -> (Args, bool) {
    let a: Vec<String> = std::env::args().collect();
    let bench = a.iter().any(|x| x == "--bench");
    let get = |k: &str| a.iter().position(|x| x == k).and_then(|i| a.get(i + 1)).cloned();
    let num = |k: &str, d: f64| get(k).map_or(d, |v| v.parse().expect("a number"));
    let devices = num("--devices", if bench { 10_000.0 } else { 40.0 }) as u64;
    let shards =
        get("--shards").map_or(devices.div_ceil(18_000).max(if bench { 1 } else { 2 }), |v| v.parse().unwrap());
    let args = Args {
        devices,
        shards,
        interval: num("--interval", if bench { 10.0 } else { 1.0 }) as u64,
        rate: num("--rate", 2000.0),
        steady: num("--steady", if bench { 30.0 } else { 3.0 }) as u64,
        methods: num("--methods", if bench { 200.0 } else { 10.0 }) as usize,
        json: get("--json").map(PathBuf::from),
        threads: get("--threads").map(|v| v.parse().expect("a number")),
        behaviour: get("--behaviour").map(PathBuf::from),
        // Nobody looks at the console unless asked: the standard figures are the fleet's own.
        console_requests: num("--console-requests", if bench { 0.0 } else { 20.0 }) as usize,
        console: !a.iter().any(|x| x == "--no-console"),
        hub_behaviour: get("--hub-behaviour").unwrap_or_default(),
    };
    (args, bench)
}

/// The fleetsim binary with the bench's thread setting.
fn fleetsim(threads: Option<usize>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fleetsim"));
    if let Some(t) = threads {
        c.args(["--threads", &t.to_string()]);
    }
    c
}

/// Sums of every series of a metric family, with buckets kept by `le`.
#[derive(Default, Clone)]
struct Scrape {
    values: HashMap<String, f64>,
}

impl Scrape {
    fn get(&self, series: &str) -> f64 {
        self.values.get(series).copied().unwrap_or(0.0)
    }

    fn add(&mut self, other: &Scrape) {
        for (k, v) in &other.values {
            *self.values.entry(k.clone()).or_default() += v;
        }
    }

    fn sum_prefix(&self, prefix: &str) -> f64 {
        self.values.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum()
    }
}

fn scrape(url: &str) -> Scrape {
    let text = reqwest::blocking_get(url);
    let mut s = Scrape::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((k, v)) = line.rsplit_once(' ')
            && let Ok(v) = v.parse::<f64>()
        {
            s.values.insert(k.to_owned(), v);
        }
    }
    s
}

mod reqwest {
    /// A tiny blocking GET for plain-HTTP metrics, so the bench needs no extra runtime here.
    pub fn blocking_get(url: &str) -> String {
        use std::io::{Read, Write};
        let rest = url.strip_prefix("http://").expect("plain http");
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let Ok(mut s) = std::net::TcpStream::connect(host) else { return String::new() };
        let _ = write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
    }
}

/// The quantile of a Prometheus histogram (bucket deltas between two scrapes), by linear
/// interpolation inside the bucket.
fn quantile(before: &Scrape, after: &Scrape, family: &str, q: f64) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = after
        .values
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(&format!("{family}_bucket{{le=\""))?.strip_suffix("\"}")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, v - before.get(k)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let target = q * total;
    let mut prev = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= target {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let frac = if count > prev.1 { (target - prev.1) / (count - prev.1) } else { 1.0 };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, count);
    }
    None
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

struct Fleet {
    child: Child,
    metrics: String,
}

fn main() {
    let (a, bench) = args();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    fleetsim::sys::raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Emulators. They keep no telemetry for read-back: that ring is for tests and demos, and at
    // scale it would be most of the emulator's memory.
    let hub_config = d.join("hub.toml");
    std::fs::write(&hub_config, format!("[behaviour]\ntelemetry_buffer = 0\n{}\n", a.hub_behaviour)).unwrap();
    let mut hubs: Vec<(Child, HubInfo)> = Vec::new();
    for i in 0..a.shards {
        let data = d.join(format!("hub-{i}"));
        hubs.push(support::spawn_hub(&data, a.threads, Some(&hub_config)));
    }

    // The scenario: connection-string devices (created in each emulator's registry by the fleet).
    let scenario = d.join("load.toml");
    let header = format!(
        "[[devices]]\nname = \"load\"\ncount = {}\nid = \"load-{{n:06}}\"\nprovisioning = \"connection_string\"\n",
        a.devices
    );
    let behaviour = match &a.behaviour {
        Some(file) => std::fs::read_to_string(file).expect("the --behaviour file"),
        None => format!(
            "[devices.telemetry]\ninterval = \"{}s\"\njitter = 0.1\n\
             fields = {{ temp = {{ kind = \"walk\", start = 20, step = 0.5, min = 0, max = 40, decimals = 2 }}, seq = {{ kind = \"counter\" }} }}\n\
             [[devices.commands]]\nname = \"ping\"\nresponse = {{ pong = \"{{now}}\" }}\n",
            a.interval
        ),
    };
    std::fs::write(&scenario, format!("{header}{behaviour}")).unwrap();

    // Fleets, one per emulator.
    let started = Instant::now();
    let mut fleets = Vec::new();
    for (i, (_, info)) in hubs.iter().enumerate() {
        let cfg = d.join(format!("fleet-{i}.toml"));
        let hub_json = info.ca_file.with_file_name("hub.json");
        std::fs::write(
            &cfg,
            format!(
                "scenarios = [{:?}]\n[hub]\nmode = \"external\"\nhub_json = {:?}\n[ramp]\nrate = {}\n[metrics]\naddr = \"127.0.0.1:0\"\n[device]\nprogress_interval = \"5s\"\n",
                scenario.display().to_string(),
                hub_json.display().to_string(),
                a.rate / a.shards as f64
            ),
        )
        .unwrap();
        let mut child = fleetsim(a.threads)
            .args(["run", "--config"])
            .arg(&cfg)
            .args(["--shard", &format!("{i}/{}", a.shards), "--log", "warn"])
            .args(if a.console { &[][..] } else { &["--no-console"][..] })
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a fleet");
        let out = BufReader::new(child.stdout.take().unwrap());
        let metrics = out
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.split_once("metrics:").map(|(_, r)| r.split_whitespace().next().unwrap().to_owned()))
            .expect("the fleet prints its metrics address");
        fleets.push(Fleet { child, metrics });
    }

    let fleet_scrape = |fleets: &[Fleet]| {
        let mut s = Scrape::default();
        for f in fleets {
            s.add(&scrape(&f.metrics));
        }
        s
    };
    let deadline = Instant::now() + Duration::from_secs_f64(a.devices as f64 / a.rate * 4.0 + 120.0);
    let mut connected = 0.0;
    while Instant::now() < deadline {
        connected = fleet_scrape(&fleets).get("fleetsim_devices_connected_once");
        if connected as u64 >= a.devices {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let connect_secs = started.elapsed().as_secs_f64();

    // Steady state.
    std::thread::sleep(Duration::from_secs(2));
    let pids = |v: &[u32]| v.iter().map(|p| proc_stats(*p)).fold((0u64, 0.0f64), |acc, x| (acc.0 + x.0, acc.1 + x.1));
    let fleet_pids: Vec<u32> = fleets.iter().map(|f| f.child.id()).collect();
    let hub_pids: Vec<u32> = hubs.iter().map(|h| h.0.id()).collect();
    let s0 = fleet_scrape(&fleets);
    let (_, fleet_cpu0) = pids(&fleet_pids);
    let (_, hub_cpu0) = pids(&hub_pids);
    let console_base = fleets[0].metrics.trim_end_matches("/metrics").to_owned();
    let window = Duration::from_secs(a.steady);
    let requests = if a.console { a.console_requests } else { 0 };
    let (shard0, every) = (a.devices.div_ceil(a.shards), a.shards);
    let console = std::thread::spawn(move || console_load(&console_base, requests, window, shard0, every));
    let rtts = invoke_methods(&hubs, a.devices, a.shards, a.methods, window);
    let (console_ms, console_failed) = console.join().expect("the console client");
    let s1 = fleet_scrape(&fleets);
    let (fleet_rss, fleet_cpu1) = pids(&fleet_pids);
    let (hub_rss, hub_cpu1) = pids(&hub_pids);
    let window_acked = s1.get("fleetsim_telemetry_acked_total") - s0.get("fleetsim_telemetry_acked_total");

    for f in &fleets {
        let _ = Command::new("kill").arg("-TERM").arg(f.child.id().to_string()).status();
    }
    for mut f in fleets {
        let _ = f.child.wait();
    }
    for (child, _) in &hubs {
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    }
    for (mut child, _) in hubs {
        let _ = child.wait();
    }

    let n = connected.max(1.0);
    let mut rtt = rtts.clone();
    rtt.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let failed = s1.sum_prefix("fleetsim_telemetry_failed_total");
    let report = json!({
        "date": fleetsim::iot::time::iso8601(SystemTime::now()),
        "devices": a.devices, "shards": a.shards, "telemetry_interval_secs": a.interval, "ramp_rate": a.rate,
        "connected": connected, "connect_secs": connect_secs, "connect_rate": connected / connect_secs,
        "fleet_rss_kib_per_device": fleet_rss as f64 / n, "hub_rss_kib_per_device": hub_rss as f64 / n,
        "fleet_rss_mib": fleet_rss / 1024, "hub_rss_mib": hub_rss / 1024,
        "steady_secs": a.steady, "steady_acked": window_acked, "steady_msgs_per_sec": window_acked / a.steady as f64,
        "fleet_cpu_us_per_acked": (fleet_cpu1 - fleet_cpu0) * 1e6 / window_acked.max(1.0),
        "hub_cpu_us_per_acked": (hub_cpu1 - hub_cpu0) * 1e6 / window_acked.max(1.0),
        "fleet_cpu_cores": (fleet_cpu1 - fleet_cpu0) / a.steady as f64, "hub_cpu_cores": (hub_cpu1 - hub_cpu0) / a.steady as f64,
        "telemetry_sent": s1.get("fleetsim_telemetry_sent_total"), "telemetry_acked": s1.get("fleetsim_telemetry_acked_total"), "telemetry_failed": failed,
        "puback_p50_ms": quantile(&s0, &s1, "fleetsim_telemetry_puback_seconds", 0.5).map(|x| x * 1e3),
        "puback_p99_ms": quantile(&s0, &s1, "fleetsim_telemetry_puback_seconds", 0.99).map(|x| x * 1e3),
        "methods": rtt.len(), "method_p50_ms": percentile(&rtt, 0.5), "method_p99_ms": percentile(&rtt, 0.99),
        "console": a.console, "console_requests": console_ms.len(), "console_failed": console_failed,
        "console_p50_ms": percentile(&console_ms, 0.5), "console_p99_ms": percentile(&console_ms, 0.99),
        "console_max_ms": console_ms.last().copied(),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" }, "threads_per_process": a.threads,
        "scenario": std::fs::read_to_string(&scenario).unwrap_or_default(),
    });
    println!("| measure | value |\n|---|---|");
    println!(
        "| devices connected (shards) | {connected} of {} ({} fleet + {} hub processes) |",
        a.devices, a.shards, a.shards
    );
    println!(
        "| time to connect all, rate | {connect_secs:.1} s, {:.0} devices/s (ramp {} /s) |",
        connected / connect_secs,
        a.rate
    );
    println!(
        "| RSS per device: fleet / emulator | {:.1} / {:.1} KiB ({} / {} MiB in all) |",
        fleet_rss as f64 / n,
        hub_rss as f64 / n,
        fleet_rss / 1024,
        hub_rss / 1024
    );
    println!("| steady telemetry ({} s window) | {:.0} msg/s acknowledged |", a.steady, window_acked / a.steady as f64);
    println!(
        "| CPU per acknowledged message: fleet / emulator | {:.1} / {:.1} µs |",
        report["fleet_cpu_us_per_acked"].as_f64().unwrap(),
        report["hub_cpu_us_per_acked"].as_f64().unwrap()
    );
    println!(
        "| telemetry sent / acked / failed | {} / {} / {failed} |",
        s1.get("fleetsim_telemetry_sent_total"),
        s1.get("fleetsim_telemetry_acked_total")
    );
    println!(
        "| PUBACK latency p50 / p99 | {:.2} / {:.2} ms |",
        report["puback_p50_ms"].as_f64().unwrap_or(f64::NAN),
        report["puback_p99_ms"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "| method round trip p50 / p99 ({} calls) | {:.2} / {:.2} ms |",
        rtt.len(),
        percentile(&rtt, 0.5),
        percentile(&rtt, 0.99)
    );
    if a.console {
        println!(
            "| console API p50 / p99 / max ({} requests, stream open) | {:.2} / {:.2} / {:.2} ms |",
            console_ms.len(),
            percentile(&console_ms, 0.5),
            percentile(&console_ms, 0.99),
            console_ms.last().copied().unwrap_or(f64::NAN)
        );
    } else {
        println!("| console | off (--no-console) |");
    }
    println!("{report}");
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
    if !bench {
        assert_eq!(connected as u64, a.devices, "smoke: every device connects");
        assert!(window_acked > 0.0 && failed == 0.0, "smoke: telemetry flows without loss");
        assert_eq!(rtt.len(), a.methods, "smoke: every sampled method answered");
        assert!(
            console_failed == 0 && console_ms.len() == a.console_requests,
            "smoke: every console request answered ({console_failed} failed)"
        );
        println!("fleet_load smoke: ok");
    }
}

/// The console's client on fleet `base` (shard 0, whose devices are `load-{1 + k * every}`): its
/// live stream open for the whole `window`, and `count` API requests spread over it. Returns the
/// answered requests' latencies in ms, sorted, and how many failed.
fn console_load(base: &str, count: usize, window: Duration, shard_devices: u64, every: u64) -> (Vec<f64>, usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let http = ::reqwest::Client::new();
        let start = tokio::time::Instant::now();
        let stream = if count > 0 {
            let r = http.get(format!("{base}/api/v1/stream")).send().await.ok();
            Some(tokio::spawn(async move {
                let mut events = 0usize;
                if let Some(mut r) = r {
                    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(start + window, r.chunk()).await {
                        events += chunk.windows(6).filter(|w| w == b"event:").count();
                    }
                }
                events
            }))
        } else {
            None
        };
        let mut ms = Vec::new();
        let mut failed = 0;
        for i in 0..count {
            tokio::time::sleep_until(start + window.mul_f64(i as f64 / count.max(1) as f64)).await;
            let k = (i as u64 * 7919) % shard_devices.max(1);
            let path = match i % 4 {
                0 => "/api/v1/overview".to_owned(),
                1 => format!("/api/v1/devices?offset={k}&limit=50"),
                2 => "/api/v1/devices?state=connected&limit=50".to_owned(),
                _ => format!("/api/v1/devices/load-{:06}", 1 + k * every),
            };
            let t = tokio::time::Instant::now();
            let answered = match http.get(format!("{base}{path}")).send().await {
                Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                _ => false,
            };
            if answered {
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            } else {
                failed += 1;
            }
        }
        tokio::time::sleep_until(start + window).await;
        if let Some(s) = stream {
            let events = s.await.unwrap_or(0);
            if count > 0 && events == 0 {
                failed += 1;
            }
        }
        ms.sort_by(|x, y| x.partial_cmp(y).unwrap());
        (ms, failed)
    })
}

/// Invokes `ping` on sampled devices, spread over `window`; returns round trips in ms.
fn invoke_methods(hubs: &[(Child, HubInfo)], devices: u64, shards: u64, count: usize, window: Duration) -> Vec<f64> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let mut clients = Vec::new();
        for (_, info) in hubs {
            let (http, token) = support::service_client(info);
            clients.push((http, token, info.https_port));
        }
        let start = tokio::time::Instant::now();
        let mut rtts = Vec::new();
        for i in 0..count {
            tokio::time::sleep_until(start + window.mul_f64(i as f64 / count.max(1) as f64)).await;
            // Devices are numbered from 1; ordinal n-1 decides the shard.
            let n = 1 + (i as u64 * 7919) % devices;
            let (http, token, port) = &clients[((n - 1) % shards) as usize];
            let url = format!("https://localhost:{port}/twins/load-{n:06}/methods?api-version=2021-04-12");
            let t = tokio::time::Instant::now();
            let r = http
                .post(url)
                .header("authorization", token)
                .json(&json!({"methodName": "ping", "responseTimeoutInSeconds": 10}))
                .send()
                .await;
            if matches!(r, Ok(ref resp) if resp.status().is_success()) {
                rtts.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        tokio::time::sleep_until(start + window).await;
        rtts
    })
}
