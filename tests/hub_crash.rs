//! Acknowledged means durable, under SIGKILL: an external emulator (`fleetsim hub`, a child
//! process) takes a storm of registry writes (devices created, desired properties patched,
//! enrollments put), reported patches and telemetry from MQTT devices, and is killed at a random
//! moment of it, twenty times. After each kill the store file passes SQLite's integrity check,
//! every telemetry message the hub had acknowledged (PUBACK) is among the events the store keeps
//! for the Event Hubs-compatible endpoint, the hub starts again on it, and every other change it
//! had acknowledged (a 200, a PUBACK or a 204 twin response) is there.

use fleetsim_testkit as common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::Api;
use fleetsim::iot::sas::Key;
use fleetsim::iot::topic;
use rand::Rng;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::Packet;
use serde_json::json;

const KILLS: usize = 20;
const REPORTERS: usize = 4;
const SENDERS: usize = 2;
/// Every wait is bounded by this.
const BOUND: Duration = Duration::from_secs(30);

struct HubProcess(Child);

impl HubProcess {
    fn start(data_dir: &Path, mqtt: u16, https: u16) -> HubProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_fleetsim"))
            .args(["hub", "--data-dir", data_dir.to_str().unwrap()])
            .args(["--mqtt-addr", &format!("127.0.0.1:{mqtt}"), "--https-addr", &format!("127.0.0.1:{https}")])
            .args(["--amqp-addr", "127.0.0.1:0", "--no-metrics"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("fleetsim hub starts");
        HubProcess(child)
    }

    /// SIGKILL, and the exit reaped.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

async fn serving(data_dir: &Path, mqtt: u16, https: u16) {
    common::wait_until_for("the emulator to listen", BOUND, || async {
        data_dir.join("hub.json").exists()
            && tokio::net::TcpStream::connect(("127.0.0.1", mqtt)).await.is_ok()
            && tokio::net::TcpStream::connect(("127.0.0.1", https)).await.is_ok()
    })
    .await;
}

/// A service call that reports a dead hub as `None` (no retry, no panic): the status otherwise.
async fn try_rest(api: &Api, policy: &str, method: &str, path: &str, body: serde_json::Value) -> Option<u16> {
    let req = api
        .http
        .request(method.parse().unwrap(), api.url(path))
        .header("authorization", api.service_token(policy))
        .json(&body);
    let resp = tokio::time::timeout(BOUND, req.send()).await.ok()?.ok()?;
    // The status line alone is not the acknowledgement a client acts on: the whole answer is.
    let status = resp.status().as_u16();
    resp.bytes().await.ok()?;
    Some(status)
}

/// What the killed hub acknowledged in one round.
#[derive(Default)]
struct Acked {
    devices: std::sync::Mutex<Vec<String>>,
    enrollments: std::sync::Mutex<Vec<String>>,
    /// The highest desired value acknowledged for `sink`.
    desired: AtomicU64,
    /// Per reporter, the highest reported value acknowledged (PUBACK or 204 response).
    reported: [AtomicU64; REPORTERS],
    /// Per sender, the telemetry messages acknowledged (PUBACK), by their `n`.
    telemetry: [std::sync::Mutex<Vec<u64>>; SENDERS],
}

/// One device's telemetry, `{"n": n}` from `start` upwards, each awaited, until the hub is gone.
async fn telemetry_storm(mut c: common::MqttClient, who: usize, start: u64, acked: Arc<Acked>) {
    let topic = format!("devices/tel-{who}/messages/events/");
    for n in start.. {
        let pkid = c.publish(&topic, json!({"n": n}).to_string(), QoS::AtLeastOnce).await;
        loop {
            match c.recv().await {
                Some(Packet::PubAck(a)) if a.pkid == pkid => break,
                Some(_) => {}
                None => return,
            }
        }
        acked.telemetry[who].lock().unwrap().push(n);
    }
}

/// The `n` of every telemetry event of device `device` the store file keeps.
fn stored_telemetry(store: &Path, device: &str) -> std::collections::HashSet<u64> {
    let db = rusqlite::Connection::open(store).unwrap();
    let mut stmt = db.prepare("SELECT properties, body FROM events WHERE source = 'Telemetry'").unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))).unwrap();
    let sender = format!("\"iothub-connection-device-id\",\"{device}\"");
    rows.map(Result::unwrap)
        .filter(|(props, _)| props.contains(&sender))
        .filter_map(|(_, body)| serde_json::from_slice::<serde_json::Value>(&body).ok()?["n"].as_u64())
        .collect()
}

/// Creates devices (and every fourth time an enrollment) until a request fails (the hub died).
async fn registry_storm(api: Arc<Api>, round: usize, worker: usize, acked: Arc<Acked>) {
    for i in 0.. {
        let id = format!("r{round}-w{worker}-{i}");
        if i % 4 == 3 {
            let body = json!({"registrationId": id, "attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": Key::generate().to_base64()}}});
            let path = format!("/enrollments/{id}");
            match try_rest(&api, "provisioningserviceowner", "PUT", &path, body).await {
                Some(200) => acked.enrollments.lock().unwrap().push(id),
                _ => return,
            }
            continue;
        }
        let path = format!("/devices/{id}");
        match try_rest(&api, "iothubowner", "PUT", &path, json!({"deviceId": id})).await {
            Some(200) => acked.devices.lock().unwrap().push(id),
            _ => return,
        }
    }
}

/// Patches the `sink` twin's desired `v` upwards until a request fails.
async fn desired_storm(api: Arc<Api>, start: u64, acked: Arc<Acked>) {
    for v in start.. {
        let patch = json!({"properties": {"desired": {"v": v}}});
        match try_rest(&api, "iothubowner", "PATCH", "/twins/sink", patch).await {
            Some(200) => acked.desired.store(v, Ordering::SeqCst),
            _ => return,
        }
    }
}

/// One device's reported patches, `n` upwards from `start`, each awaited, until the hub is gone.
async fn reported_storm(mut c: common::MqttClient, who: usize, start: u64, acked: Arc<Acked>) {
    for n in start.. {
        let rid = n.to_string();
        let pkid = c.publish(&topic::twin_patch_reported(&rid), json!({"n": n}).to_string(), QoS::AtLeastOnce).await;
        let (mut puback, mut response) = (false, false);
        while !(puback && response) {
            match c.recv().await {
                Some(Packet::PubAck(a)) if a.pkid == pkid => puback = true,
                Some(Packet::Publish(p)) if p.topic.starts_with(&format!("$iothub/twin/res/204/?$rid={rid}")) => {
                    response = true
                }
                Some(Packet::Publish(p)) => panic!("rep-{who}: unexpected {}", p.topic),
                Some(_) => {}
                None => return,
            }
            if puback || response {
                // Either acknowledgement alone promises the patch is durable.
                acked.reported[who].fetch_max(n, Ordering::SeqCst);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_change_survives_sigkill_during_a_storm() {
    common::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("hub");
    let (mqtt, https) = free_ports();
    let mut hub = HubProcess::start(&data_dir, mqtt, https);
    serving(&data_dir, mqtt, https).await;
    let info: fleetsim::hub::info::HubInfo =
        serde_json::from_slice(&std::fs::read(data_dir.join("hub.json")).unwrap()).unwrap();
    let api = Arc::new(Api::new(info));
    let keys: Vec<Key> = {
        let mut keys = Vec::new();
        for who in 0..REPORTERS {
            keys.push(api.create_device(&format!("rep-{who}")).await);
        }
        keys
    };
    let senders: Vec<Key> = {
        let mut keys = Vec::new();
        for who in 0..SENDERS {
            keys.push(api.create_device(&format!("tel-{who}")).await);
        }
        keys
    };
    api.create_device("sink").await;
    let (mut desired_floor, mut reported_floor) = (0u64, [0u64; REPORTERS]);
    let mut telemetry_floor = [0u64; SENDERS];
    let mut totals = (0usize, 0usize, 0usize);

    for round in 0..KILLS {
        let acked = Arc::new(Acked::default());
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..2 {
            tasks.spawn(registry_storm(api.clone(), round, w, acked.clone()));
        }
        tasks.spawn(desired_storm(api.clone(), desired_floor + 1, acked.clone()));
        for (who, key) in keys.iter().enumerate() {
            let mut c = api.connect(&format!("rep-{who}"), None, key, true).await;
            c.subscribe(&[("$iothub/twin/res/#", QoS::AtLeastOnce)]).await;
            tasks.spawn(reported_storm(c, who, reported_floor[who] + 1, acked.clone()));
        }
        for (who, key) in senders.iter().enumerate() {
            let c = api.connect(&format!("tel-{who}"), None, key, true).await;
            tasks.spawn(telemetry_storm(c, who, telemetry_floor[who] + 1, acked.clone()));
        }
        let at = Duration::from_millis(rand::rng().random_range(50..500));
        tokio::time::sleep(at).await;
        hub.kill();
        // Every storm task ends on its own once its connection or request fails.
        tokio::time::timeout(BOUND, async {
            while let Some(r) = tasks.join_next().await {
                r.expect("a storm task failed");
            }
        })
        .await
        .expect("the storm tasks end after the kill");

        // The file the killed hub left is a sound database.
        let store = data_dir.join(fleetsim::hub::store::FILE);
        let check: String =
            rusqlite::Connection::open(&store).unwrap().query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok", "round {round}: the store is damaged");
        for (who, floor) in telemetry_floor.iter_mut().enumerate() {
            let kept = stored_telemetry(&store, &format!("tel-{who}"));
            let sent = acked.telemetry[who].lock().unwrap().clone();
            let lost: Vec<&u64> = sent.iter().filter(|n| !kept.contains(n)).collect();
            assert!(lost.is_empty(), "round {round} (killed at {at:?}): tel-{who}'s acknowledged {lost:?} lost");
            // The next round numbers on past anything the store kept, acknowledged or not.
            *floor = kept.iter().copied().max().unwrap_or(0).max(*floor);
        }

        hub = HubProcess::start(&data_dir, mqtt, https);
        serving(&data_dir, mqtt, https).await;
        let devices = acked.devices.lock().unwrap().clone();
        for id in &devices {
            let (status, _, body) = api.rest("GET", &format!("/devices/{id}"), None).await;
            assert_eq!(status, 200, "round {round} (killed at {at:?}): acknowledged device {id} lost: {body}");
        }
        let enrollments = acked.enrollments.lock().unwrap().clone();
        for id in &enrollments {
            let (status, _, body) =
                api.rest_as("provisioningserviceowner", "GET", &format!("/enrollments/{id}"), None, &[]).await;
            assert_eq!(status, 200, "round {round}: acknowledged enrollment {id} lost: {body}");
        }
        let (_, _, sink) = api.rest("GET", "/twins/sink", None).await;
        let desired = sink["properties"]["desired"]["v"].as_u64().unwrap_or(0);
        let acked_desired = acked.desired.load(Ordering::SeqCst).max(desired_floor);
        assert!(desired >= acked_desired, "round {round}: desired v {desired} < acknowledged {acked_desired}");
        desired_floor = desired;
        for (who, floor) in reported_floor.iter_mut().enumerate() {
            let (_, _, twin) = api.rest("GET", &format!("/twins/rep-{who}"), None).await;
            let n = twin["properties"]["reported"]["n"].as_u64().unwrap_or(0);
            let acked_n = acked.reported[who].load(Ordering::SeqCst).max(*floor);
            assert!(n >= acked_n, "round {round}: rep-{who} reported n {n} < acknowledged {acked_n}: {twin}");
            *floor = n;
        }
        totals.0 += devices.len() + enrollments.len();
        totals.1 += acked.reported.iter().map(|a| a.load(Ordering::SeqCst) as usize).sum::<usize>();
        totals.2 += acked.telemetry.iter().map(|t| t.lock().unwrap().len()).sum::<usize>();
    }
    hub.kill();
    // The storms did write (a kill before anything was acknowledged would prove nothing).
    assert!(
        totals.0 > 0 && totals.2 > 0 && reported_floor.iter().all(|&n| n > 0),
        "registry and telemetry {totals:?}, reported {reported_floor:?}"
    );
}
