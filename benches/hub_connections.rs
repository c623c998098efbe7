//! How many concurrent TLS device connections one `fleetsim hub` process holds, and what each
//! costs it in memory. Starts the hub as its own process (each process may hold at most 20,000
//! files here), registers N devices through the REST API, connects them from this process at a
//! fixed rate (each sends one QoS 1 message and waits for its PUBACK), holds them, and reads the
//! hub's resident memory from /proc.
//!
//!     cargo bench --bench hub_connections -- --devices 19000 --rate 2000
//!
//! Under `cargo test` it runs a 50-device smoke pass and fails if any device did not connect.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

// Only `create` is used here: connections are made by `connect_one`, which writes CONNECT and
// the first PUBLISH together so that a connect costs one round trip.
#[allow(dead_code)]
#[path = "support/devices.rs"]
mod devices;
#[path = "support/procstat.rs"]
mod procstat;
mod support;

/// Resident set size of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    procstat::proc_stats(pid).0
}

/// CPU seconds (user + system) of a process.
fn cpu_secs(pid: u32) -> f64 {
    procstat::proc_stats(pid).1
}

use bytes::BytesMut;
use fleetsim::hub::info::HubInfo;
use fleetsim::iot::sas::{Key, sign_token};
use fleetsim::iot::time::unix_secs;
use fleetsim::iot::username::hub_username;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

struct Opts {
    devices: usize,
    rate: f64,
    hold: Duration,
}

fn parse_args() -> (Opts, bool) {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let get = |name: &str| {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(|s| s.parse::<f64>().expect("a number"))
    };
    let opts = Opts {
        devices: get("--devices").map_or(if bench { 19_000 } else { 50 }, |v| v as usize),
        rate: get("--rate").unwrap_or(2000.0),
        hold: Duration::from_secs_f64(get("--hold").unwrap_or(if bench { 10.0 } else { 0.5 })),
    };
    (opts, bench)
}

async fn connect_one(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    id: String,
    password: String,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| format!("tcp: {}", e.kind()))?;
    let _ = tcp.set_nodelay(true);
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .map_err(|_| "tls".to_string())?;
    let mut c = Connect::new(id.clone());
    c.keep_alive = 1000;
    c.set_login(hub_username("localhost", &id, None, None), password);
    let mut p = Publish::new(format!("devices/{id}/messages/events/"), QoS::AtLeastOnce, r#"{"temp":21.5}"#);
    p.pkid = 1;
    let mut out = BytesMut::new();
    Packet::Connect(c).write(&mut out, usize::MAX).unwrap();
    Packet::Publish(p).write(&mut out, usize::MAX).unwrap();
    s.write_all(&out).await.map_err(|_| "write".to_string())?;
    let mut buf = BytesMut::with_capacity(64);
    let mut acked = false;
    while !acked {
        if s.read_buf(&mut buf).await.map_err(|_| "read".to_string())? == 0 {
            return Err("closed".into());
        }
        while let Ok(p) = Packet::read(&mut buf, 4096) {
            match p {
                Packet::ConnAck(a) if a.code != ConnectReturnCode::Success => {
                    return Err(format!("connack {:?}", a.code));
                }
                Packet::PubAck(_) => acked = true,
                _ => {}
            }
        }
    }
    Ok(s)
}

fn main() {
    let (opts, bench) = parse_args();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    fleetsim::sys::raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let (mut hub, info) = support::spawn_hub(dir.path(), None, None);
    let pid = hub.id();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let result = rt.block_on(run(&opts, &info, pid));
    let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    let _ = hub.wait();
    let (connected, failed) = result;
    if !bench {
        assert_eq!((connected, failed), (opts.devices, 0), "smoke: every device connects");
        println!("hub_connections smoke: {connected} connected");
    }
}

async fn run(opts: &Opts, info: &HubInfo, pid: u32) -> (usize, usize) {
    let tls = fleetsim::client::transport::client_config(Some(&info.ca_file)).unwrap();
    let key = Key::generate();
    let rss_start = rss_kib(pid);

    let t = Instant::now();
    let created = devices::create(info, &key, 0..opts.devices).await;
    let register_secs = t.elapsed().as_secs_f64();
    let rss_registered = rss_kib(pid);
    let cpu_before = cpu_secs(pid);

    let (stop_tx, stop_rx) = watch::channel(false);
    let connected = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<String, usize>::new()));
    let start = tokio::time::Instant::now();
    let mut handles = Vec::new();
    let expiry = unix_secs(SystemTime::now()) + 7200;
    for i in 0..opts.devices {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / opts.rate)).await;
        let id = format!("bench-{i:06}");
        let password = sign_token(&format!("localhost/devices/{id}"), &key, expiry, None);
        let (tls, mut stop, connected, failures) = (tls.clone(), stop_rx.clone(), connected.clone(), failures.clone());
        let addr = info.mqtt_addr;
        handles.push(tokio::spawn(async move {
            match connect_one(addr, tls, id, password).await {
                Ok(stream) => {
                    connected.fetch_add(1, Ordering::Relaxed);
                    let _ = stop.changed().await;
                    drop(stream);
                }
                Err(e) => *failures.lock().unwrap().entry(e).or_default() += 1,
            }
        }));
    }
    // Everything is launched; wait until each attempt has finished one way or the other.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let done = connected.load(Ordering::Relaxed) + failures.lock().unwrap().values().sum::<usize>();
        if done >= opts.devices || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_secs = start.elapsed().as_secs_f64();
    let cpu_connect = cpu_secs(pid) - cpu_before;
    tokio::time::sleep(opts.hold).await;
    let rss_held = rss_kib(pid);
    let n = connected.load(Ordering::Relaxed);
    let failed: usize = failures.lock().unwrap().values().sum();
    let metrics = reqwest::get(info.metrics_url.clone().unwrap()).await.unwrap().text().await.unwrap();
    let hub_sees = metrics
        .lines()
        .find(|l| l.starts_with("fleetsim_hub_connections{kind=\"hub\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("?")
        .to_owned();
    let per_conn = if n > 0 { (rss_held as f64 - rss_registered as f64) / n as f64 } else { 0.0 };
    let per_identity = if created > 0 { (rss_registered as f64 - rss_start as f64) / created as f64 } else { 0.0 };
    let _ = stop_tx.send(true);
    for h in handles {
        let _ = h.await;
    }

    println!("| measure | value |");
    println!("|---|---|");
    println!("| devices registered (REST, 64 concurrent) | {created} in {register_secs:.1} s |");
    println!(
        "| devices connected over TLS, each with 1 QoS 1 message acked | {n} (hub reports {hub_sees}), {failed} failed {:?} |",
        failures.lock().unwrap()
    );
    println!(
        "| connect phase at a target of {:.0}/s | {connect_secs:.1} s, {:.0} connections/s |",
        opts.rate,
        n as f64 / connect_secs
    );
    println!(
        "| hub CPU during the connect phase | {cpu_connect:.2} s ({:.0} µs per connection) |",
        cpu_connect * 1e6 / n.max(1) as f64
    );
    println!(
        "| hub RSS: start / registered / holding | {} / {} / {} MiB |",
        rss_start / 1024,
        rss_registered / 1024,
        rss_held / 1024
    );
    println!("| hub RSS per registered identity | {:.2} KiB |", per_identity);
    println!("| hub RSS per connected device | {:.1} KiB |", per_conn);
    let json = serde_json::json!({
        "devices": opts.devices, "registered": created, "connected": n, "failed": failed,
        "connect_secs": connect_secs, "connect_rate": n as f64 / connect_secs, "hub_cpu_connect_secs": cpu_connect,
        "hub_rss_kib": {"start": rss_start, "registered": rss_registered, "holding": rss_held},
        "hub_rss_per_identity_kib": per_identity, "hub_rss_per_connection_kib": per_conn,
    });
    println!("{json}");
    (n, failed)
}
