//! What the durable store costs: registry writes per second (device creations over REST, 64 in
//! flight) and twin reported patches per second (every device connected over MQTT, each sending
//! patches one after another, each waited for until its 204), with the store and with
//! `in_memory = true`, at 1k and 10k devices; and how long a hub takes to start on a store of
//! 100k identities with their twins (tags and desired properties set). One `fleetsim hub` process
//! per measurement, from a fresh data dir.
//!
//!     cargo bench --bench hub_store
//!     cargo bench --bench hub_store -- --devices 1000,10000 --patches 5 --startup 100000
//!
//! Prints one JSON object per measurement. Under `cargo test` it runs a small smoke pass (50
//! devices, 500 identities at start-up) and fails if anything was refused or lost.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/devices.rs"]
mod devices;
mod support;

use bytes::BytesMut;
use fleetsim::hub::info::HubInfo;
use fleetsim::iot::sas::Key;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish};
use serde_json::json;
use tokio::sync::Semaphore;

struct Opts {
    devices: Vec<usize>,
    patches: usize,
    startup: usize,
}

fn parse_args() -> (Opts, bool) {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let get = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let list = |s: String| s.split(',').map(|n| n.trim().parse().expect("a number")).collect();
    let opts = Opts {
        devices: get("--devices").map_or(if bench { vec![1000, 10_000] } else { vec![50] }, list),
        patches: get("--patches").map_or(if bench { 5 } else { 2 }, |s| s.parse().expect("a number")),
        startup: get("--startup").map_or(if bench { 100_000 } else { 500 }, |s| s.parse().expect("a number")),
    };
    (opts, bench)
}

/// A hub config file that keeps everything in memory, or none (the store, the default).
fn config(dir: &Path, in_memory: bool) -> Option<std::path::PathBuf> {
    in_memory.then(|| {
        let p = dir.join("hub.toml");
        std::fs::write(&p, "in_memory = true\n").unwrap();
        p
    })
}

fn stop(mut hub: std::process::Child) {
    let _ = Command::new("kill").arg("-TERM").arg(hub.id().to_string()).status();
    let _ = hub.wait();
}

/// `patches` reported patches from one connected device, each waited for (PUBACK and 204).
async fn report(mut s: devices::Stream, patches: usize) -> Result<(), String> {
    let mut buf = BytesMut::new();
    for n in 0..patches {
        let rid = format!("{n}");
        let mut p = Publish::new(
            format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
            QoS::AtLeastOnce,
            json!({"n": n, "temp": 21.5, "fw": "1.2.3"}).to_string(),
        );
        p.pkid = n as u16 + 2;
        devices::write(&mut s, Packet::Publish(p)).await?;
        let (mut acked, mut answered) = (false, false);
        devices::until(&mut s, &mut buf, |p| {
            match p {
                Packet::PubAck(_) => acked = true,
                Packet::Publish(r) if r.topic.starts_with("$iothub/twin/res/204/") => answered = true,
                _ => {}
            }
            acked && answered
        })
        .await?;
    }
    Ok(())
}

/// One mode at one size: registry writes/s, then reported patches/s.
async fn writes(info: &HubInfo, devices: usize, patches: usize) -> (f64, f64, usize) {
    let key = Key::generate();
    let t = Instant::now();
    let created = devices::create(info, &key, 0..devices).await;
    let registry_rate = created as f64 / t.elapsed().as_secs_f64();
    assert_eq!(created, devices, "every device is created");

    let tls = fleetsim::client::transport::client_config(Some(&info.ca_file)).unwrap();
    let sem = Arc::new(Semaphore::new(256));
    let mut conns = Vec::new();
    for i in 0..devices {
        let (info, tls, key, sem) = (info.clone(), tls.clone(), key.clone(), sem.clone());
        conns.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            devices::connect(&info, tls, format!("bench-{i:06}"), &key, Some("$iothub/twin/res/#")).await
        }));
    }
    let mut streams = Vec::new();
    for c in conns {
        streams.push(c.await.unwrap().expect("every device connects"));
    }
    let t = Instant::now();
    let tasks: Vec<_> = streams.into_iter().map(|s| tokio::spawn(report(s, patches))).collect();
    let mut failed = 0;
    for task in tasks {
        failed += usize::from(task.await.unwrap().is_err());
    }
    let patch_rate = (devices * patches) as f64 / t.elapsed().as_secs_f64();
    (registry_rate, patch_rate, failed)
}

/// Fills a store with `n` identities whose twins carry tags and desired properties (bulk
/// requests of 100), stops the hub, and times a start on that store until it answers for the
/// last identity.
async fn fill(info: &HubInfo, n: usize) {
    let (http, token) = support::service_client(info);
    let sem = Arc::new(Semaphore::new(8));
    let mut tasks = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let entries: Vec<_> = chunk
            .iter()
            .map(|i| {
                json!({"id": format!("boot-{i:06}"), "importMode": "create",
                       "tags": {"site": format!("s{}", i % 50), "n": i},
                       "properties": {"desired": {"interval": 30, "mode": "eco"}}})
            })
            .collect();
        let (http, token, sem) = (http.clone(), token.clone(), sem.clone());
        let url = format!("https://localhost:{}/devices?api-version=2021-04-12", info.https_port);
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let r = http.post(url).header("authorization", token).json(&entries).send().await.unwrap();
            assert!(r.status().is_success(), "{}", r.text().await.unwrap_or_default());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn started_in(dir: &Path, n: usize) -> f64 {
    let _ = std::fs::remove_file(dir.join("hub.json"));
    let t = Instant::now();
    let (hub, info) = support::spawn_hub(dir, None, None);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (http, token) = support::service_client(&info);
    let last = format!("https://localhost:{}/twins/boot-{:06}?api-version=2021-04-12", info.https_port, n - 1);
    let ok = rt.block_on(async {
        for _ in 0..2000 {
            if let Ok(r) = http.get(&last).header("authorization", &token).send().await {
                return r.status().is_success();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    });
    let secs = t.elapsed().as_secs_f64();
    stop(hub);
    assert!(ok, "the restarted hub serves the last identity");
    secs
}

fn main() {
    let (opts, bench) = parse_args();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    fleetsim::sys::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    for &devices in &opts.devices {
        for in_memory in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = config(dir.path(), in_memory);
            let (hub, info) = support::spawn_hub(dir.path(), None, cfg.as_deref());
            let (registry, patches, failed) = rt.block_on(writes(&info, devices, opts.patches));
            stop(hub);
            let store = if in_memory { "in_memory" } else { "sqlite" };
            println!(
                "{}",
                json!({"measure": "writes", "store": store, "devices": devices,
                       "registry_writes_per_sec": registry.round(), "reported_patches_per_sec": patches.round(),
                       "patches_per_device": opts.patches, "failed_devices": failed})
            );
            assert_eq!(failed, 0, "every device's patches were acknowledged");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (hub, info) = support::spawn_hub(dir.path(), None, None);
    let t = Instant::now();
    rt.block_on(fill(&info, opts.startup));
    let fill_secs = t.elapsed().as_secs_f64();
    stop(hub);
    let size = std::fs::metadata(dir.path().join(fleetsim::hub::store::FILE)).map_or(0, |m| m.len());
    let secs = started_in(dir.path(), opts.startup);
    println!(
        "{}",
        json!({"measure": "startup", "identities": opts.startup, "start_secs": (secs * 1000.0).round() / 1000.0,
               "store_bytes": size, "fill_secs": fill_secs.round()})
    );
    if !bench {
        println!("hub_store smoke: ok");
    }
}
