//! The emulator's store: what the hub acknowledged is there after a restart on the same data
//! dir (identities with keys, status and etags; twins with tags, both sections, versions,
//! metadata and etags; enrollments; DPS registrations; C2D queues with delivery counts), deletions
//! stay deleted, `in_memory` keeps nothing, and a store the hub cannot use stops it at start with
//! an error naming the file.

use fleetsim_testkit as common;

use common::{TestHub, future};
use fleetsim::iot::sas::{Key, derive_device_key, sign_token};
use fleetsim::iot::topic;
use fleetsim::iot::username::hub_username;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use serde_json::{Value, json};

/// A device's HTTPS call (C2D receive and settlement).
async fn device_call(
    hub: &TestHub,
    token: &str,
    method: &str,
    path: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    let req = hub.http.request(method.parse().unwrap(), hub.url(path)).header("authorization", token);
    let resp = tokio::time::timeout(common::WAIT, req.send()).await.expect("hung").unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.text().await.unwrap_or_default())
}

fn header(h: &reqwest::header::HeaderMap, name: &str) -> String {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// A JSON document without the fields a restart changes by design (the live connection).
fn lasting(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        for k in ["connectionState", "connectionStateUpdatedTime", "lastActivityTime"] {
            m.remove(k);
        }
    }
    v
}

async fn dps_rest(hub: &TestHub, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (status, _, v) = hub.rest_as("provisioningserviceowner", method, path, body, &[]).await;
    (status, v)
}

/// Registers `reg` through the default group over HTTPS until assigned; returns its device key.
async fn provision(hub: &TestHub, reg: &str) -> Key {
    let key = derive_device_key(&Key::from_base64(&hub.info.group_key).unwrap(), reg);
    let token =
        sign_token(&format!("{}/registrations/{reg}", hub.info.id_scope), &key, future(600), Some("registration"));
    let base = format!("https://localhost:{}/{}/registrations/{reg}", hub.info.https_port, hub.info.id_scope);
    let r = hub
        .http
        .put(format!("{base}/register?api-version=2019-03-31"))
        .header("authorization", &token)
        .json(&json!({"registrationId": reg}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let op: Value = r.json().await.unwrap();
    let url = format!("{base}/operations/{}?api-version=2019-03-31", op["operationId"].as_str().unwrap());
    let r = hub.http.get(url).header("authorization", &token).send().await.unwrap();
    assert_eq!(r.status(), 200, "assigned at once (no assignment delay)");
    key
}

/// Every document the test compares across the restart, by the path it was read from.
async fn snapshot(hub: &TestHub) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for path in [
        "/devices/d1",
        "/devices/d1/modules/m1",
        "/devices/d2",
        "/devices/dps-dev-1",
        "/twins/d1",
        "/twins/d1/modules/m1",
        "/twins/d2",
        "/twins/dps-dev-1",
    ] {
        let (status, _, v) = hub.rest("GET", path, None).await;
        assert_eq!(status, 200, "{path}: {v}");
        out.push((path.to_owned(), lasting(&v)));
    }
    for path in ["/enrollments/ind-01", "/enrollmentGroups/grp-1", "/emulator/registrations/dps-dev-1"] {
        let (status, v) = dps_rest(hub, "GET", path, None).await;
        assert_eq!(status, 200, "{path}: {v}");
        out.push((path.to_owned(), v));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_acknowledged_is_there_after_a_restart() {
    let mut hub = TestHub::start().await;
    // Identities: a device with a module, a disabled device, one deleted again.
    let (status, _, _) =
        hub.rest("PUT", "/devices/d1", Some(json!({"deviceId": "d1", "capabilities": {"iotEdge": true}}))).await;
    assert_eq!(status, 200);
    let d1_key = Key::from_base64(
        hub.rest("GET", "/devices/d1", None).await.2["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap(),
    )
    .unwrap();
    hub.create_module("d1", "m1").await;
    let (status, _, _) = hub
        .rest("PUT", "/devices/d2", Some(json!({"deviceId": "d2", "status": "disabled", "statusReason": "parked"})))
        .await;
    assert_eq!(status, 200);
    hub.create_device("gone").await;
    assert_eq!(hub.rest("DELETE", "/devices/gone", None).await.0, 204);

    // Twins: tags and desired from the service (twice, so versions move), reported from the device.
    for (path, n) in [("/twins/d1", 1), ("/twins/d1", 2), ("/twins/d1/modules/m1", 7)] {
        let patch = json!({"tags": {"floor": n}, "properties": {"desired": {"target": n, "nested": {"a": n}}}});
        assert_eq!(hub.rest("PATCH", path, Some(patch)).await.0, 200);
    }
    let mut c = hub.mqtt().await;
    let token = hub.device_token("d1", None, &d1_key, future(600));
    assert_eq!(
        c.connect("d1", &hub_username("localhost", "d1", None, None), &token, true, 60).await,
        Some(ConnectReturnCode::Success)
    );
    c.subscribe(&[("$iothub/twin/res/#", QoS::AtLeastOnce)]).await;
    c.publish(&topic::twin_patch_reported("r1"), json!({"fw": "1.0", "t": {"x": 1}}).to_string(), QoS::AtLeastOnce)
        .await;
    let res = c.next_publish().await;
    assert!(res.topic.starts_with("$iothub/twin/res/204/?$rid=r1"), "{}", res.topic);

    // Enrollments: one of each kind kept, one deleted; a device assigned through DPS.
    let individual = json!({"registrationId": "ind-01", "deviceId": "dev-of-ind-01",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": Key::generate().to_base64()}}});
    assert_eq!(dps_rest(&hub, "PUT", "/enrollments/ind-01", Some(individual.clone())).await.0, 200);
    assert_eq!(dps_rest(&hub, "PUT", "/enrollments/ind-01", Some(individual)).await.0, 200, "etag 2");
    let group = json!({"enrollmentGroupId": "grp-1",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": Key::generate().to_base64()}}});
    assert_eq!(dps_rest(&hub, "PUT", "/enrollmentGroups/grp-1", Some(group)).await.0, 200);
    let doomed = json!({"registrationId": "ind-02",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": Key::generate().to_base64()}}});
    assert_eq!(dps_rest(&hub, "PUT", "/enrollments/ind-02", Some(doomed)).await.0, 200);
    assert_eq!(dps_rest(&hub, "DELETE", "/enrollments/ind-02", None).await.0, 204);
    let dps_key = provision(&hub, "dps-dev-1").await;

    // C2D: three queued for d2's neighbour d1 over HTTPS; one completed, one abandoned (its
    // delivery counted), one never received.
    let d1_https = hub.device_token("d1", None, &d1_key, future(600));
    drop(c);
    for body in ["one", "two", "three"] {
        let (status, _, v) = hub
            .rest("POST", "/emulator/devices/d1/messages/deviceBound", Some(json!({"body": body, "ttlSeconds": 3600})))
            .await;
        assert_eq!(status, 200, "{v}");
    }
    let bound = "/devices/d1/messages/deviceBound";
    let (_, h, body) = device_call(&hub, &d1_https, "GET", bound).await;
    assert_eq!(body, "one");
    let etag = header(&h, "etag");
    assert_eq!(device_call(&hub, &d1_https, "DELETE", &format!("{bound}/{}", etag.trim_matches('"'))).await.0, 204);
    let (_, h, body) = device_call(&hub, &d1_https, "GET", bound).await;
    assert_eq!(body, "two");
    let etag = header(&h, "etag");
    let abandon = format!("{bound}/{}/abandon", etag.trim_matches('"'));
    assert_eq!(device_call(&hub, &d1_https, "POST", &abandon).await.0, 204);

    let before = snapshot(&hub).await;
    hub.stop().await;
    let TestHub { dir, .. } = hub;
    let hub = TestHub::start_in(dir, |_| {}).await;
    let after = snapshot(&hub).await;
    for ((path, b), (_, a)) in before.iter().zip(&after) {
        assert_eq!(a, b, "{path} differs after the restart");
    }
    assert_eq!(after[0].1["cloudToDeviceMessageCount"], 2, "two left in the queue");
    assert_eq!(after[4].1["properties"]["reported"]["fw"], "1.0");
    assert_eq!(after[4].1["tags"]["floor"], 2);
    assert_eq!(after[4].1["properties"]["desired"]["$version"], 3);
    assert_eq!(after[2].1["status"], "disabled");
    assert_eq!(after[2].1["statusReason"], "parked");
    assert_eq!(after[8].1["etag"], "2");
    assert_eq!(hub.rest("GET", "/devices/gone", None).await.0, 404, "a deletion is kept too");
    // The gauges count what was loaded: d1, d2, dps-dev-1; m1 and d1's two Edge system modules.
    assert_eq!(hub.metric("fleetsim_hub_identities{kind=\"device\"}").await, 3.0);
    assert_eq!(hub.metric("fleetsim_hub_identities{kind=\"module\"}").await, 3.0);
    // d1 is an IoT Edge device: the system modules the hub made for it are kept like any module.
    for m in ["$edgeAgent", "$edgeHub"] {
        assert_eq!(hub.rest("GET", &format!("/devices/d1/modules/{m}"), None).await.0, 200, "{m}");
    }
    assert_eq!(dps_rest(&hub, "GET", "/enrollments/ind-02", None).await.0, 404);

    // The queue carries on where it was: the abandoned message first, its delivery counted.
    let d1_https = hub.device_token("d1", None, &d1_key, future(600));
    let (_, h, body) = device_call(&hub, &d1_https, "GET", bound).await;
    assert_eq!((body.as_str(), header(&h, "iothub-deliverycount").as_str()), ("two", "1"));
    // Keys are kept: the DPS device and d1 connect with what they had.
    for (id, key) in [("dps-dev-1", &dps_key), ("d1", &d1_key)] {
        let mut c = hub.mqtt().await;
        let token = hub.device_token(id, None, key, future(600));
        assert_eq!(
            c.connect(id, &hub_username("localhost", id, None, None), &token, true, 60).await,
            Some(ConnectReturnCode::Success),
            "{id}"
        );
    }
    // Versions carry on from where they were.
    let (_, _, twin) = hub.rest("PATCH", "/twins/d1", Some(json!({"properties": {"desired": {"target": 9}}}))).await;
    assert_eq!(twin["properties"]["desired"]["$version"], 4);
}

/// An HTTPS receive's lock outlives a restart: the device settles what it received before the
/// restart with the lock token it got, and the message stays hidden from other receives while
/// the lock holds ("Understand cloud-to-device messaging": the message life cycle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c2d_lock_taken_over_https_is_kept_across_a_restart() {
    let mut hub = TestHub::start().await;
    let key = hub.create_device("locker").await;
    for body in ["held", "next"] {
        let path = "/emulator/devices/locker/messages/deviceBound";
        let (status, _, v) = hub.rest("POST", path, Some(json!({"body": body, "ttlSeconds": 3600}))).await;
        assert_eq!(status, 200, "{v}");
    }
    let bound = "/devices/locker/messages/deviceBound";
    let token = hub.device_token("locker", None, &key, future(600));
    let (status, h, body) = device_call(&hub, &token, "GET", bound).await;
    assert_eq!((status, body.as_str()), (200, "held"));
    let etag = header(&h, "etag");
    hub.stop().await;
    let TestHub { dir, .. } = hub;
    let hub = TestHub::start_in(dir, |_| {}).await;
    let token = hub.device_token("locker", None, &key, future(600));
    let (status, _, body) = device_call(&hub, &token, "GET", bound).await;
    assert_eq!((status, body.as_str()), (200, "next"), "the locked message is still hidden");
    let settle = format!("{bound}/{}", etag.trim_matches('"'));
    assert_eq!(device_call(&hub, &token, "DELETE", &settle).await.0, 204, "its lock token still settles it");
    let (_, _, twin) = hub.rest("GET", "/devices/locker", None).await;
    assert_eq!(twin["cloudToDeviceMessageCount"], 1, "only the second, locked, is left: {twin}");
}

#[tokio::test]
async fn an_in_memory_hub_writes_no_store_and_starts_empty() {
    let mut hub = TestHub::start_with(|c| c.in_memory = true).await;
    hub.create_device("d1").await;
    assert!(!hub.dir.path().join(fleetsim::hub::store::FILE).exists());
    hub.stop().await;
    let TestHub { dir, .. } = hub;
    let hub = TestHub::start_in(dir, |c| c.in_memory = true).await;
    assert_eq!(hub.rest("GET", "/devices/d1", None).await.0, 404);
}

#[tokio::test]
async fn a_store_the_hub_cannot_use_stops_it_at_start_naming_the_file() {
    common::install_crypto();
    let start = |dir: &std::path::Path| {
        let config = fleetsim::hub::config::HubConfig {
            data_dir: dir.to_owned(),
            mqtt_addr: "127.0.0.1:0".parse().unwrap(),
            https_addr: "127.0.0.1:0".parse().unwrap(),
            amqp_addr: None,
            metrics_addr: None,
            ..Default::default()
        };
        fleetsim::hub::start(config)
    };
    // Written by a newer build.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(fleetsim::hub::store::FILE);
    let c = rusqlite::Connection::open(&path).unwrap();
    c.pragma_update(None, "user_version", fleetsim::hub::store::schema::VERSION + 1).unwrap();
    drop(c);
    let err = format!("{:#}", start(dir.path()).await.err().expect("refused"));
    assert!(err.contains("newer fleetsim") && err.contains(&path.display().to_string()), "{err}");
    // Not a database at all.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(fleetsim::hub::store::FILE);
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = format!("{:#}", start(dir.path()).await.err().expect("refused"));
    assert!(err.contains(&path.display().to_string()), "{err}");
    // A row damaged by hand: named, and no value of it repeated.
    let dir = tempfile::tempdir().unwrap();
    {
        let mut hub = TestHub::start_in(tempfile::tempdir_in(dir.path()).unwrap(), |_| {}).await;
        hub.create_device("hurt").await;
        hub.stop().await;
        let store = hub.dir.path().join(fleetsim::hub::store::FILE);
        let c = rusqlite::Connection::open(&store).unwrap();
        c.execute("UPDATE identities SET primary_key = 'not base64 at all!' WHERE key = 'hurt'", []).unwrap();
        drop(c);
        let err = format!("{:#}", start(hub.dir.path()).await.err().expect("refused"));
        assert!(err.contains("`hurt`") && !err.contains("not base64 at all"), "{err}");
    }
}

/// `fleetsim hub import` seeds a stopped hub's store from IoT Hub bulk lines (as an export blob
/// holds them); the hub serves them after it starts; `fleetsim hub export` gives them back; and
/// neither runs while a hub has the store open.
#[tokio::test]
async fn import_seeds_a_stopped_hub_and_export_gives_the_registry_back() {
    let dir = tempfile::tempdir().unwrap();
    let key = Key::generate().to_base64();
    let lines = [
        json!({"id": "seed-1", "eTag": "MQ==", "status": "enabled", "twinETag": "AAAAAAAAAAE=",
               "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": key},
                                  "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null}},
               "tags": {"site": "lab"}, "properties": {"desired": {"interval": 30, "$version": 7}, "reported": {}},
               "capabilities": {"iotEdge": false}}),
        json!({"id": "seed-1", "moduleId": "m", "importMode": "create"}),
        json!({"id": "seed-2", "importMode": "delete"}),
    ];
    let file = dir.path().join("devices.txt");
    std::fs::write(&file, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let data_dir = dir.path().join("hub");
    let fleetsim = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_fleetsim")).args(args).output().expect("fleetsim runs")
    };
    let out = fleetsim(&["hub", "import", file.to_str().unwrap(), "--data-dir", data_dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "one line refused: {stderr}");
    assert!(stderr.contains("line 3") && stderr.contains("imported 2 lines, refused 1"), "{stderr}");

    let hub = TestHub::start_in(dir, |c| c.data_dir = data_dir.clone()).await;
    let (status, _, twin) = hub.rest("GET", "/twins/seed-1", None).await;
    assert_eq!(status, 200, "{twin}");
    assert_eq!(
        (twin["tags"]["site"].as_str(), twin["properties"]["desired"]["interval"].as_u64()),
        (Some("lab"), Some(30))
    );
    let (status, _, device) = hub.rest("GET", "/devices/seed-1", None).await;
    assert_eq!((status, device["authentication"]["symmetricKey"]["primaryKey"].as_str()), (200, Some(key.as_str())));
    assert_eq!(hub.rest("GET", "/devices/seed-1/modules/m", None).await.0, 200);

    // While the hub runs, its store is locked.
    let out = fleetsim(&["hub", "export", "--data-dir", data_dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"), "{}", String::from_utf8_lossy(&out.stderr));
    let mut hub = hub;
    hub.stop().await;
    let out = fleetsim(&["hub", "export", "--data-dir", data_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let exported: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(exported.len(), 2);
    assert_eq!((exported[0]["id"].as_str(), exported[0]["tags"]["site"].as_str()), (Some("seed-1"), Some("lab")));
    assert_eq!(exported[0]["authentication"]["symmetricKey"]["primaryKey"], key);
    assert_eq!(exported[1]["moduleId"], "m");
}
