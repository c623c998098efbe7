//! Issue 12, fidelity by kind, against the emulator over real TLS: every hub-to-device topic read
//! with a strict parser of Azure's documented grammar (names unencoded, `$rid` echoed byte for
//! byte), twin input refused instead of dropped, refusals with Azure's status and error code,
//! the route variants real clients send, bulk registry operations and statistics, and the
//! fleet's registry writes and writable-property acknowledgements.

use fleetsim_testkit as common;

use common::{FleetUnderTest, TestHub, WAIT, future};
use fleetsim::iot::sas::{Key, derive_device_key, sign_token};
use fleetsim::iot::username::dps_username;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use serde_json::{Value, json};

/// What a strict reader of the documented hub-to-device grammar finds in a topic
/// (iot-mqtt-connect-to-iot-hub; sdk-for-c's parsers): written independently of `iot::topic`.
#[derive(Debug, PartialEq)]
enum Strict {
    TwinResponse { status: u16, rid: String, version: Option<u64> },
    Desired { version: u64 },
    Method { component: Option<String>, command: String, rid: String },
    C2d { device: String, bag: String },
    Dps { status: u16, rid: String, retry_after: Option<u64> },
}

fn status(s: &str) -> Result<u16, String> {
    if s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()) {
        Ok(s.parse().unwrap())
    } else {
        Err(format!("bad status {s}"))
    }
}

/// `$rid={rid}` then optionally `&{key}={digits}`; the rid is everything up to `&`, untouched.
fn rid_and(query: &str, key: &str) -> Result<(String, Option<u64>), String> {
    let rest = query.strip_prefix("?$rid=").ok_or(format!("no `?$rid=` in {query}"))?;
    let (rid, tail) = rest.split_once('&').map_or((rest, None), |(r, t)| (r, Some(t)));
    if rid.is_empty() {
        return Err("empty rid".into());
    }
    let extra = match tail {
        None => None,
        Some(t) => {
            let v = t.strip_prefix(key).and_then(|t| t.strip_prefix('=')).ok_or(format!("unexpected `{t}`"))?;
            Some(v.parse().map_err(|_| format!("`{v}` is not a number"))?)
        }
    };
    Ok((rid.to_owned(), extra))
}

fn strict(topic: &str) -> Result<Strict, String> {
    if let Some(rest) = topic.strip_prefix("$iothub/twin/res/") {
        let (s, q) = rest.split_once('/').ok_or("no `/` after the status")?;
        let (rid, version) = rid_and(q, "$version")?;
        return Ok(Strict::TwinResponse { status: status(s)?, rid, version });
    }
    if let Some(rest) = topic.strip_prefix("$iothub/twin/PATCH/properties/desired/?$version=") {
        return Ok(Strict::Desired { version: rest.parse().map_err(|_| format!("bad version {rest}"))? });
    }
    if let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") {
        let (name, q) = rest.split_once('/').ok_or("no `/` after the method name")?;
        // sdk-for-c does not decode: a `%` here would reach the application as is.
        if name.is_empty() || name.contains('%') {
            return Err(format!("method name `{name}` is empty or percent-encoded"));
        }
        let (rid, none) = rid_and(q, "")?;
        if none.is_some() {
            return Err("extra parameters after the method rid".into());
        }
        let (component, command) = match name.split_once('*') {
            Some((c, n)) => (Some(c.to_owned()), n.to_owned()),
            None => (None, name.to_owned()),
        };
        return Ok(Strict::Method { component, command, rid });
    }
    if let Some(rest) = topic.strip_prefix("$dps/registrations/res/") {
        let (s, q) = rest.split_once('/').ok_or("no `/` after the status")?;
        let (rid, retry_after) = rid_and(q, "retry-after")?;
        return Ok(Strict::Dps { status: status(s)?, rid, retry_after });
    }
    if let Some(rest) = topic.strip_prefix("devices/") {
        let (device, bag) = rest.split_once("/messages/devicebound/").ok_or("not a C2D topic")?;
        return Ok(Strict::C2d { device: device.to_owned(), bag: bag.to_owned() });
    }
    Err(format!("`{topic}` is no hub-to-device topic"))
}

#[tokio::test]
async fn every_hub_to_device_topic_parses_strictly_and_echoes_the_rid() {
    let hub = TestHub::start().await;
    // A MAC-address id (`:` is in the documented id set) on every topic that names the device.
    let id = "aa:bb:cc:dd:ee:ff";
    let key = hub.create_device(id).await;
    let mut c = hub.connect(id, None, &key, true).await;
    c.subscribe(&[
        ("$iothub/twin/res/#", QoS::AtLeastOnce),
        ("$iothub/twin/PATCH/properties/desired/#", QoS::AtLeastOnce),
        ("$iothub/methods/POST/#", QoS::AtMostOnce),
        (&format!("devices/{id}/messages/devicebound/#"), QoS::AtLeastOnce),
    ])
    .await;

    // Request ids as sdk-for-c and hand-written stacks choose them: echoed exactly.
    for rid in ["get:1", "{7c9e6679-7425-40de-944b-e07fc1f90ae7}", "a%2Fb"] {
        c.publish(&format!("$iothub/twin/GET/?$rid={rid}"), " ", QoS::AtLeastOnce).await;
        let res = c.next_publish().await;
        assert_eq!(strict(&res.topic), Ok(Strict::TwinResponse { status: 200, rid: rid.into(), version: None }));
    }
    c.publish("$iothub/twin/PATCH/properties/reported/?$rid=p:2", r#"{"fw":"1.0"}"#, QoS::AtLeastOnce).await;
    let res = c.next_publish().await;
    assert_eq!(strict(&res.topic), Ok(Strict::TwinResponse { status: 204, rid: "p:2".into(), version: Some(2) }));

    let (status, _, _) = hub
        .rest(
            "PATCH",
            &format!("/twins/{}", "aa%3Abb%3Acc%3Add%3Aee%3Aff"),
            Some(json!({"properties": {"desired": {"x": 1}}})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(strict(&c.next_publish().await.topic), Ok(Strict::Desired { version: 2 }));

    // The issue-12 instance: a component command arrives with its `*`, unencoded.
    let call = {
        let (http, url, token) =
            (hub.http.clone(), hub.url("/twins/aa%3Abb%3Acc%3Add%3Aee%3Aff/methods"), hub.service_token("iothubowner"));
        tokio::spawn(async move {
            let r = http
                .post(url)
                .header("authorization", token)
                .json(&json!({"methodName": "comp*cmd", "payload": 1, "responseTimeoutInSeconds": 10}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    let req = c.next_publish().await;
    let Ok(Strict::Method { component, command, rid }) = strict(&req.topic) else { panic!("{}", req.topic) };
    assert_eq!((component.as_deref(), command.as_str()), (Some("comp"), "cmd"), "{}", req.topic);
    c.publish(&format!("$iothub/methods/res/200/?$rid={rid}"), r#"{"ok":1}"#, QoS::AtLeastOnce).await;
    let (status, body) = tokio::time::timeout(WAIT, call).await.unwrap().unwrap();
    assert_eq!((status, body), (200, json!({"status": 200, "payload": {"ok": 1}})));

    let (status, _, body) = hub
        .rest("POST", "/emulator/devices/aa%3Abb%3Acc%3Add%3Aee%3Aff/messages/deviceBound", Some(json!({"body": "hi"})))
        .await;
    assert_eq!(status, 200, "{body}");
    let m = c.next_publish().await;
    let Ok(Strict::C2d { device, .. }) = strict(&m.topic) else { panic!("{}", m.topic) };
    assert_eq!(device, id);
}

#[tokio::test]
async fn dps_responses_echo_the_rid_as_sent() {
    let hub = TestHub::start().await;
    let reg = "rid-echo-1";
    let key = derive_device_key(&Key::from_base64(&hub.info.group_key).unwrap(), reg);
    let token =
        sign_token(&format!("{}/registrations/{reg}", hub.info.id_scope), &key, future(600), Some("registration"));
    let mut c = hub.mqtt().await;
    assert_eq!(
        c.connect(reg, &dps_username(&hub.info.id_scope, reg), &token, true, 60).await,
        Some(ConnectReturnCode::Success)
    );
    c.subscribe(&[("$dps/registrations/res/#", QoS::AtLeastOnce)]).await;
    c.publish(
        "$dps/registrations/PUT/iotdps-register/?$rid=reg:1",
        json!({"registrationId": reg}).to_string(),
        QoS::AtLeastOnce,
    )
    .await;
    let res = c.next_publish().await;
    let Ok(Strict::Dps { status: 202, rid, retry_after: Some(_) }) = strict(&res.topic) else {
        panic!("{}", res.topic)
    };
    assert_eq!(rid, "reg:1");
    let op: Value = serde_json::from_slice(&res.payload).unwrap();
    let poll = format!(
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={{p 2}}&operationId={}",
        op["operationId"].as_str().unwrap()
    );
    c.publish(&poll, " ", QoS::AtLeastOnce).await;
    let res = c.next_publish().await;
    let Ok(Strict::Dps { rid, .. }) = strict(&res.topic) else { panic!("{}", res.topic) };
    assert_eq!(rid, "{p 2}");
}

#[tokio::test]
async fn twin_input_the_hub_would_not_store_is_refused_on_every_path() {
    let hub = TestHub::start().await;
    let key = hub.create_device("tw").await;
    hub.create_module("tw", "m").await;
    let mut c = hub.connect("tw", None, &key, true).await;
    c.subscribe(&[("$iothub/twin/res/#", QoS::AtLeastOnce)]).await;

    // The issue-12 instance: a `$` key reported by the device is a 400 with 400004, and no version.
    c.publish("$iothub/twin/PATCH/properties/reported/?$rid=1", r#"{"$foo":1}"#, QoS::AtLeastOnce).await;
    let res = c.next_publish().await;
    assert_eq!(res.topic, "$iothub/twin/res/400/?$rid=1");
    assert_eq!(serde_json::from_slice::<Value>(&res.payload).unwrap()["errorCode"], 400004);
    let (_, _, twin) = hub.rest("GET", "/twins/tw", None).await;
    assert_eq!(twin["properties"]["reported"]["$version"], 1);

    // Service side: desired, tags and reported, device and module twins, PATCH and PUT.
    let refused = [
        ("PATCH", "/twins/tw", json!({"properties": {"desired": {"$foo": 1}}})),
        ("PATCH", "/twins/tw", json!({"tags": {"$t": 1}})),
        ("PATCH", "/twins/tw", json!({"properties": {"reported": {"$foo": 1}}})),
        ("PUT", "/twins/tw", json!({"properties": {"desired": {"ok": {"$nested": 1}}}})),
        ("PATCH", "/twins/tw/modules/m", json!({"properties": {"desired": {"$foo": 1}}})),
        ("PUT", "/twins/tw/modules/m", json!({"tags": {"a.b": 1}})),
        // A bad key inside an array of arrays was stored unchecked before.
        ("PATCH", "/twins/tw", json!({"properties": {"desired": {"list": [[{"$k": 1}]]}}})),
    ];
    for (method, path, body) in refused {
        let (status, headers, err) = hub.rest(method, path, Some(body.clone())).await;
        assert_eq!(
            (status, headers["iothub-errorcode"].to_str().unwrap()),
            (400, "ArgumentInvalid"),
            "{method} {path} {body}"
        );
        assert_eq!(err["errorCode"], 400004, "{err}");
    }
    let (_, _, after) = hub.rest("GET", "/twins/tw", None).await;
    assert_eq!(
        (after["version"].as_u64(), after["tags"].as_object().map(|t| t.len())),
        (twin["version"].as_u64(), Some(0))
    );

    // A twin read back and sent again (get-modify-replace) carries read-only members: accepted.
    let mut replace = after.clone();
    replace["properties"]["desired"]["mode"] = json!("eco");
    let (status, _, put) = hub.rest("PUT", "/twins/tw", Some(replace)).await;
    assert_eq!(status, 200, "{put}");
    assert_eq!(put["properties"]["desired"]["mode"], "eco");
}

#[tokio::test]
async fn refusals_carry_the_status_and_code_azure_uses() {
    let hub = TestHub::start().await;
    let group = Key::from_base64(&hub.info.group_key).unwrap();
    // The issue-12 instance and two more invalid ids: signed correctly, refused as a bad request.
    for (reg, path_reg) in
        [("dev@prod12", "dev%40prod12"), ("bad id", "bad%20id"), (&*"a".repeat(129), &*"a".repeat(129))]
    {
        let token = sign_token(
            &format!("{}/registrations/{reg}", hub.info.id_scope),
            &derive_device_key(&group, reg),
            future(600),
            Some("registration"),
        );
        let url = format!(
            "https://localhost:{}/{}/registrations/{path_reg}/register?api-version=2019-03-31",
            hub.info.https_port, hub.info.id_scope
        );
        let r = hub
            .http
            .put(&url)
            .header("authorization", token)
            .json(&json!({"registrationId": reg}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{reg}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["errorCode"], 400004, "{body}");
        assert_eq!(body["message"], "Invalid RegistrationId");
        // A token DPS cannot validate stays a 401.
        let bad = sign_token(
            &format!("{}/registrations/{reg}", hub.info.id_scope),
            &Key::generate(),
            future(600),
            Some("registration"),
        );
        let r =
            hub.http.put(&url).header("authorization", bad).json(&json!({"registrationId": reg})).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{reg}");
        assert_eq!(r.json::<Value>().await.unwrap()["errorCode"], 401002);
    }
    // A twin key the hub refuses is ArgumentInvalid (it was IotHubFormatError before).
    hub.create_device("d").await;
    let (status, headers, body) =
        hub.rest("PATCH", "/twins/d", Some(json!({"properties": {"desired": {"a b": 1}}}))).await;
    assert_eq!(
        (status, headers["iothub-errorcode"].to_str().unwrap(), body["errorCode"].as_u64()),
        (400, "ArgumentInvalid", Some(400004))
    );
    // Creating a module that exists is 409301, a device 409001.
    hub.create_module("d", "m").await;
    let (status, _, body) =
        hub.rest("PUT", "/devices/d/modules/m", Some(json!({"deviceId": "d", "moduleId": "m"}))).await;
    assert_eq!((status, body["errorCode"].as_u64()), (409, Some(409301)));
}

/// A GET with the path and query exactly as given (no api-version added).
async fn get_raw(hub: &TestHub, path_and_query: &str) -> (u16, Value) {
    let url = format!("https://localhost:{}{path_and_query}", hub.info.https_port);
    let r = hub.http.get(url).header("authorization", hub.service_token("iothubowner")).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn route_variants_real_clients_send_are_accepted() {
    let hub = TestHub::start().await;
    hub.create_device("r1").await;
    // The issue-12 instance: Node's Registry.list always sends the trailing slash.
    let (status, list) = get_raw(&hub, "/devices/?api-version=2021-04-12").await;
    assert_eq!((status, list.as_array().map(Vec::len)), (200, Some(1)));
    for path in [
        "/devices?API-VERSION=2021-04-12",
        "/devices/r1/?api-version=2021-04-12",
        "/twins/r1/?Api-Version=2021-04-12",
        "/devices/r1/modules/?api-version=2021-04-12",
        "/statistics/devices/?api-version=2021-04-12",
    ] {
        assert_eq!(get_raw(&hub, path).await.0, 200, "{path}");
    }
    // Without any api-version the route still refuses, whatever the slash.
    assert_eq!(get_raw(&hub, "/devices/").await.0, 400);
    // Ids with reserved characters travel percent-encoded, `#` and `:` included.
    for (id, encoded) in [("a#b", "a%23b"), ("m:1", "m%3A1"), ("x;y", "x%3By")] {
        let (status, _, body) = hub.rest("PUT", &format!("/devices/{encoded}"), Some(json!({"deviceId": id}))).await;
        assert_eq!(status, 200, "{id}: {body}");
        let (status, dev) = get_raw(&hub, &format!("/devices/{encoded}?api-version=2021-04-12")).await;
        assert_eq!((status, dev["deviceId"].as_str()), (200, Some(id)));
    }
    // An encoded `/` decodes into an id IoT Hub does not allow: a 400, not a different route.
    let (status, _, _) = hub.rest("PUT", "/devices/a%2Fb", Some(json!({"deviceId": "a/b"}))).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn bulk_registry_operations_and_statistics() {
    let hub = TestHub::start().await;
    let entries: Vec<Value> = (1..=3).map(|i| json!({"id": format!("b{i}"), "importMode": "create"})).collect();
    // The issue-12 instance: POST /devices with an array.
    let (status, _, r) = hub.rest("POST", "/devices", Some(Value::Array(entries))).await;
    assert_eq!((status, r["isSuccessful"].as_bool()), (200, Some(true)), "{r}");
    assert_eq!(hub.rest("GET", "/statistics/devices", None).await.2["totalDeviceCount"], 3);

    // Entries are independent: the existing one is reported, the new one applies.
    let (status, _, r) = hub.rest("POST", "/devices", Some(json!([{"id": "b1"}, {"id": "aa:bb:cc:00:11:22"}]))).await;
    assert_eq!((status, r["isSuccessful"].as_bool()), (400, Some(false)));
    assert_eq!(
        r["errors"],
        json!([{"deviceId": "b1", "moduleId": null, "errorCode": "DeviceAlreadyExists", "errorStatus": "A device with id b1 is already registered", "operation": "create"}])
    );
    assert_eq!(hub.rest("GET", "/devices/aa%3Abb%3Acc%3A00%3A11%3A22", None).await.0, 200);

    let (_, _, b2) = hub.rest("GET", "/devices/b2", None).await;
    let ops = json!([
        {"id": "b2", "importMode": "Update", "status": "disabled"},
        {"id": "b3", "importMode": "updateTwin", "tags": {"site": "oslo"}, "properties": {"desired": {"rate": 5}}},
        {"id": "b1", "importMode": "DeleteIfMatchETag", "eTag": "stale"},
    ]);
    let (status, _, r) = hub.rest("POST", "/devices", Some(ops)).await;
    assert_eq!(status, 400, "{r}");
    let codes: Vec<(&str, &str)> = r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["deviceId"].as_str().unwrap(), e["errorCode"].as_str().unwrap()))
        .collect();
    assert_eq!(codes, [("b1", "PreconditionFailed")]);
    let (_, _, b2_now) = hub.rest("GET", "/devices/b2", None).await;
    assert_eq!(b2_now["status"], "disabled");
    // The update changed b2's etag: a delete conditional on the old one is refused, on the new one applied.
    let (status, _, r) = hub
        .rest("POST", "/devices", Some(json!([{"id": "b2", "importMode": "deleteIfMatchETag", "eTag": b2["etag"]}])))
        .await;
    assert_eq!((status, r["errors"][0]["errorCode"].as_str()), (400, Some("PreconditionFailed")));
    let (status, _, _) = hub
        .rest(
            "POST",
            "/devices",
            Some(json!([{"id": "b2", "importMode": "deleteIfMatchETag", "eTag": b2_now["etag"]}])),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(hub.rest("GET", "/devices/b2", None).await.0, 404);
    let (_, _, twin) = hub.rest("GET", "/twins/b3", None).await;
    assert_eq!(
        (twin["tags"]["site"].as_str(), twin["properties"]["desired"]["rate"].as_u64()),
        (Some("oslo"), Some(5))
    );

    // A malformed request changes nothing; more than 100 entries is 413.
    let (status, _, _) = hub.rest("POST", "/devices", Some(json!([{"id": "n1"}, {"importMode": "create"}]))).await;
    assert_eq!(status, 400);
    assert_eq!(hub.rest("GET", "/devices/n1", None).await.0, 404);
    let (status, _, _) = hub.rest("POST", "/devices", Some(json!([{"id": "n1", "importMode": "upsert"}]))).await;
    assert_eq!(status, 400);
    let (status, headers, _) =
        hub.rest("POST", "/devices", Some(json!([{"id": "n1"}, {"id": "n1", "importMode": "update"}]))).await;
    assert_eq!((status, headers["iothub-errorcode"].to_str().unwrap()), (400, "DeviceDefinedMultipleTimes"));
    assert_eq!(hub.rest("GET", "/devices/n1", None).await.0, 404);
    let many: Vec<Value> = (0..101).map(|i| json!({"id": format!("m{i}")})).collect();
    assert_eq!(hub.rest("POST", "/devices", Some(Value::Array(many))).await.0, 413);
    let (status, _, _) = hub.rest_as("registryRead", "POST", "/devices", Some(json!([{"id": "n2"}])), &[]).await;
    assert_eq!(status, 401);

    let (status, _, r) = hub
        .rest(
            "POST",
            "/devices",
            Some(json!([{"id": "b1", "importMode": "delete"}, {"id": "b3", "importMode": "delete"}])),
        )
        .await;
    assert_eq!((status, r["isSuccessful"].as_bool()), (200, Some(true)));

    // Statistics: the service's connected-device count.
    let (_, _, s) = hub.rest("GET", "/statistics/service", None).await;
    assert_eq!(s, json!({"connectedDeviceCount": 0}));
    let key = hub.create_device("online").await;
    let _c = hub.connect("online", None, &key, true).await;
    let (status, _, s) = hub.rest("GET", "/statistics/service", None).await;
    assert_eq!((status, s), (200, json!({"connectedDeviceCount": 1})));
}

fn scenario(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn the_fleet_writes_each_identity_once_and_acks_with_the_value_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = scenario(
        dir.path(),
        "hosts.toml",
        r#"
[[devices]]
name = "hosts"
count = 1
id = "host-{n:02}"
provisioning = "connection_string"

[[devices.writable]]
name = "brightness"
type = "number"
min = 0
max = 100

[[devices.modules]]
id = "m1"
[[devices.modules]]
id = "m2"
[[devices.modules]]
id = "m3"
"#,
    );
    let f = FleetUnderTest::start(&[path], "").await;
    assert_eq!(f.fleet().identities(), 4);
    // One device write and one per module: N + 1, where it was 2N + 2 with every module
    // re-writing its parent (409 and an If-Match retry each).
    let rendered = f.hub_state().metrics.render();
    let requests: f64 = rendered
        .lines()
        .filter(|l| l.starts_with("fleetsim_hub_rest_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(requests, 4.0, "{rendered}");

    // The issue-12 instance of kind 6: a refused value with nothing in use is acknowledged
    // without a null value (a null would delete the property on Azure).
    let v = f.set_desired("host-01", None, json!({"brightness": 500})).await;
    let ack = f.reported_until("host-01", None, "brightness", |r| r["ac"] == 400 && r["av"] == v).await;
    assert!(ack.get("value").is_none(), "{ack}");
}
