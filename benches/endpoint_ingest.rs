//! The Event Hubs-compatible endpoint under load (issue 13): devices send telemetry over MQTT at a
//! set total rate while one back end reads every partition over AMQP with fleetsim's own reader
//! (`fleetsim::backend::consumer`, what `fleetsim tail` and the CI end-to-end check use). One
//! `fleetsim hub` process per measurement, from a fresh data dir, with the store (the default)
//! and with `in_memory = true`.
//!
//! Measured over a window after a warm-up: events/s sent, acknowledged (PUBACK) and read; the
//! emulator's CPU (user + system) per event; and per message, latency from send to PUBACK, from
//! send to the reader, and from PUBACK to the reader (negative when the event is readable before
//! its PUBACK leaves, which is the rule with the store: the PUBACK waits for the commit, the event
//! is readable as soon as it is appended).
//!
//!     cargo bench --bench endpoint_ingest
//!     cargo bench --bench endpoint_ingest -- --rates 10000,50000 --secs 20 --devices 200
//!
//! Prints one JSON object per measurement; `acked_not_read_by_end` counts acknowledged messages
//! the reader had not received a second after the senders' drain (a reader that fell behind).
//! Under `cargo test` it runs a small smoke pass (500 events/s for 2 s) and fails if any.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "support/devices.rs"]
mod devices;
#[path = "support/procstat.rs"]
mod procstat;
mod support;

use bytes::BytesMut;
use fleetsim::backend::consumer::{self, ConsumerConfig, StartAt};
use fleetsim::hub::info::HubInfo;
use fleetsim::iot::sas::Key;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// Time before the window during which nothing is counted: connections settle, the reader attaches.
const WARMUP: Duration = Duration::from_secs(3);
/// How long after the window the bench waits for the last PUBACKs and events.
const DRAIN: Duration = Duration::from_secs(10);

struct Opts {
    rates: Vec<u64>,
    secs: u64,
    devices: usize,
}

fn parse_args() -> (Opts, bool) {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let get = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let num = |s: String| s.trim().parse().expect("a number");
    let opts = Opts {
        rates: get("--rates").map_or(if bench { vec![10_000, 50_000] } else { vec![500] }, |s| {
            s.split(',').map(|n| num(n.into())).collect()
        }),
        secs: get("--secs").map_or(if bench { 20 } else { 2 }, num),
        devices: get("--devices").map_or(if bench { 200 } else { 10 }, |s| s.trim().parse().expect("a number")),
    };
    (opts, bench)
}

/// Microseconds since the run's start: every time in this bench is one.
fn micros(t0: Instant) -> u64 {
    t0.elapsed().as_micros() as u64
}

/// One device's run: when each message `n` was sent and when its PUBACK came (the hub answers
/// PUBACKs in the order of the PUBLISHes, so the k-th PUBACK is message k's).
#[derive(Default)]
struct Sent {
    sent: Vec<u64>,
    acked: Vec<u64>,
}

/// Sends `{"d": d, "n": n}` at `per_sec` until `until` (µs since `t0`), reading PUBACKs meanwhile,
/// then waits up to `DRAIN` for the rest.
async fn send(stream: devices::Stream, d: usize, per_sec: f64, t0: Instant, until: u64) -> Sent {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let sent = Arc::new(Mutex::new(Vec::new()));
    let acks = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut buf = BytesMut::with_capacity(4096);
            let deadline = until + DRAIN.as_micros() as u64;
            loop {
                while let Ok(p) = Packet::read(&mut buf, 1 << 16) {
                    if let Packet::PubAck(_) = p {
                        acked.push(micros(t0));
                    }
                }
                let done = { acked.len() >= sent.lock().unwrap().len() && micros(t0) > until };
                if done || micros(t0) > deadline {
                    return acked;
                }
                match tokio::time::timeout(Duration::from_millis(100), rd.read_buf(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return acked,
                    _ => {}
                }
            }
        })
    };
    let topic = format!("devices/bench-{d:06}/messages/events/");
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let start = micros(t0);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        let now = micros(t0);
        if now > until {
            break;
        }
        let due = ((now - start) as f64 / 1e6 * per_sec) as u64;
        let mut out = BytesMut::new();
        while n < due {
            let mut p = Publish::new(&topic, QoS::AtLeastOnce, json!({"d": d, "n": n}).to_string());
            p.pkid = (n % 65_535) as u16 + 1;
            p.write(&mut out).unwrap();
            sent.lock().unwrap().push(micros(t0));
            n += 1;
        }
        if !out.is_empty() && tokio::io::AsyncWriteExt::write_all(&mut wr, &out).await.is_err() {
            break;
        }
    }
    let acked = acks.await.unwrap_or_default();
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    Sent { sent, acked }
}

/// The reader: every event's arrival, by device and message number.
async fn read(cfg: ConsumerConfig, devices: usize, t0: Instant, stop: CancellationToken) -> Vec<Vec<u64>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(8192);
    let reader = tokio::spawn(consumer::run(cfg, tx, stop.clone()));
    let mut arrived = vec![Vec::new(); devices];
    while let Some(e) = rx.recv().await {
        let at = micros(t0);
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&e.body) else { continue };
        let (Some(d), Some(n)) = (v["d"].as_u64(), v["n"].as_u64()) else { continue };
        if let Some(slots) = arrived.get_mut(d as usize) {
            if slots.len() <= n as usize {
                slots.resize(n as usize + 1, 0);
            }
            slots[n as usize] = at;
        }
    }
    if let Ok(Err(e)) = reader.await {
        panic!("the reader failed: {e:#}");
    }
    arrived
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    (v[i] * 100.0).round() / 100.0
}

/// One rate against one fresh hub; the JSON line, and how many acknowledged messages in the
/// window never reached the reader.
async fn measure(info: &HubInfo, pid: u32, rate: u64, secs: u64, n_devices: usize) -> (serde_json::Value, usize) {
    let key = Key::generate();
    assert_eq!(devices::create(info, &key, 0..n_devices).await, n_devices, "every device is created");
    let tls = fleetsim::client::transport::client_config(Some(&info.ca_file)).unwrap();
    let mut streams = Vec::new();
    for d in 0..n_devices {
        streams.push(devices::connect(info, tls.clone(), format!("bench-{d:06}"), &key, None).await.expect("connects"));
    }
    let target = info.eventhub_connection_string.as_deref().expect("the endpoint is on").parse().unwrap();
    let cfg = ConsumerConfig {
        target,
        dial: info.amqp_addr.expect("AMQP is on").to_string(),
        tls: tls.clone(),
        group: "$Default".into(),
        start: StartAt::Earliest,
        partitions: Vec::new(),
    };
    let t0 = Instant::now();
    let stop = CancellationToken::new();
    let reader = tokio::spawn(read(cfg, n_devices, t0, stop.clone()));
    let (from, to) = (WARMUP.as_micros() as u64, (WARMUP + Duration::from_secs(secs)).as_micros() as u64);
    let per_device = rate as f64 / n_devices as f64;
    let senders: Vec<_> =
        streams.into_iter().enumerate().map(|(d, s)| tokio::spawn(send(s, d, per_device, t0, to))).collect();
    tokio::time::sleep(WARMUP).await;
    let cpu0 = procstat::proc_stats(pid).1;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let cpu1 = procstat::proc_stats(pid).1;
    let mut runs = Vec::new();
    for s in senders {
        runs.push(s.await.unwrap());
    }
    // The reader has had the drain time the senders took; give it a last moment, then stop it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let arrived = reader.await.unwrap();

    let (mut to_ack, mut to_read, mut ack_to_read) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sent_n, mut acked_n, mut missing) = (0usize, 0usize, 0usize);
    for (d, run) in runs.iter().enumerate() {
        for (n, &s) in run.sent.iter().enumerate() {
            if s < from || s >= to {
                continue;
            }
            sent_n += 1;
            let ack = run.acked.get(n).copied();
            let got = arrived[d].get(n).copied().filter(|&t| t > 0);
            if let Some(a) = ack {
                acked_n += 1;
                to_ack.push((a - s) as f64 / 1000.0);
            }
            if let Some(r) = got {
                to_read.push((r - s) as f64 / 1000.0);
            }
            match (ack, got) {
                (Some(a), Some(r)) => ack_to_read.push((r as f64 - a as f64) / 1000.0),
                (Some(_), None) => missing += 1,
                _ => {}
            }
        }
    }
    let read_n = to_read.len();
    let window = secs as f64;
    let line = json!({
        "target_events_per_sec": rate,
        "devices": n_devices,
        "sent_per_sec": (sent_n as f64 / window).round(),
        "acked_per_sec": (acked_n as f64 / window).round(),
        "read_per_sec": (read_n as f64 / window).round(),
        "hub_cpu_us_per_event": ((cpu1 - cpu0) * 1e6 / sent_n.max(1) as f64).round(),
        "hub_cpu_cores": ((cpu1 - cpu0) / window * 100.0).round() / 100.0,
        "send_to_puback_ms": {"p50": percentile(&mut to_ack, 0.5), "p99": percentile(&mut to_ack, 0.99)},
        "send_to_reader_ms": {"p50": percentile(&mut to_read, 0.5), "p99": percentile(&mut to_read, 0.99)},
        "puback_to_reader_ms": {"p50": percentile(&mut ack_to_read, 0.5), "p99": percentile(&mut ack_to_read, 0.99)},
        "acked_not_read_by_end": missing,
    });
    (line, missing)
}

fn main() {
    let (opts, bench) = parse_args();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    fleetsim::sys::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    for in_memory in [false, true] {
        for &rate in &opts.rates {
            let dir = tempfile::tempdir().unwrap();
            // No read-back ring and only telemetry on the endpoint: what is measured is the
            // endpoint's path alone.
            let cfg = dir.path().join("hub.toml");
            let head = if in_memory { "in_memory = true\n" } else { "" };
            std::fs::write(
                &cfg,
                format!(
                    "{head}[behaviour]\ntelemetry_buffer = 0\neventhub_device_lifecycle_events = false\n\
                     eventhub_connection_state_events = false\neventhub_twin_change_events = false\n"
                ),
            )
            .unwrap();
            let (mut hub, info) = support::spawn_hub(dir.path(), None, Some(&cfg));
            let (mut line, missing) = rt.block_on(measure(&info, hub.id(), rate, opts.secs, opts.devices));
            let _ = std::process::Command::new("kill").arg("-TERM").arg(hub.id().to_string()).status();
            let _ = hub.wait();
            line["store"] = json!(if in_memory { "in_memory" } else { "sqlite" });
            println!("{line}");
            // In a bench run a reader that falls behind is a result (reported), not a failure.
            assert!(bench || missing == 0, "every acknowledged message reached the reader");
        }
    }
    if !bench {
        println!("endpoint_ingest smoke: ok");
    }
}
