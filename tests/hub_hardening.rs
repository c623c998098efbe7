//! Issue 10, the emulator's side: hostile input is refused with Azure's status and error code and
//! never crashes, hangs or pins the emulator. Each test starts with the instance the issue reported
//! and goes on to others of the same kind.

use fleetsim_testkit as common;

use common::{TestHub, future};
use fleetsim::iot::sas::sign_token;
use fleetsim::iot::username::hub_username;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use serde_json::{Value, json};

/// The hub still answers an ordinary request.
async fn alive(hub: &TestHub) {
    let (status, _, body) = hub.rest("GET", "/devices", None).await;
    assert_eq!(status, 200, "the emulator stopped answering: {body}");
}

async fn query(hub: &TestHub, q: String) -> (u16, Value) {
    let (status, _, body) = hub.rest("POST", "/devices/query", Some(json!({ "query": q }))).await;
    (status, body)
}

#[tokio::test]
async fn deeply_nested_input_is_a_400_not_a_stack_overflow() {
    let hub = TestHub::start().await;
    hub.create_device("d1").await;
    // The reported instances: 1,500 nested parentheses, 5,000 nested NOTs (they aborted the process).
    let parens = format!("SELECT * FROM devices WHERE {}deviceId = 'd1'{}", "(".repeat(1500), ")".repeat(1500));
    let nots = format!("SELECT * FROM devices WHERE {}deviceId = 'd1'", "NOT ".repeat(5000));
    for q in [parens, nots] {
        let (status, body) = query(&hub, q).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["ErrorCode"], "ArgumentInvalid", "{body}");
        assert!(body["Message"].as_str().unwrap().contains("deeper than 64"), "{body}");
    }
    // A long flat chain is fine: it adds no depth.
    let chain = vec!["deviceId = 'd1'"; 2000].join(" AND ");
    let (status, body) = query(&hub, format!("SELECT * FROM devices WHERE {chain}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_array().map(Vec::len), Some(1));

    // JSON 10,000 deep in every body that takes JSON: the parser's depth limit answers 400.
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_obj = format!("{{\"properties\":{{\"desired\":{{\"a\":{deep}}}}}}}");
    for (method, path) in [("PATCH", "/twins/d1"), ("PUT", "/twins/d1"), ("POST", "/devices/query")] {
        let resp = hub.http_raw(method, path, deep_obj.clone()).await;
        assert_eq!(resp.0, 400, "{method} {path}: {}", resp.1);
    }
    // Over MQTT: a reported patch that deep is refused on the twin response topic.
    let key = hub.create_device("d2").await;
    let mut c = hub.connect("d2", None, &key, true).await;
    c.subscribe(&[("$iothub/twin/res/#", QoS::AtMostOnce)]).await;
    let body = format!("{{\"a\":{deep}}}");
    c.publish("$iothub/twin/PATCH/properties/reported/?$rid=7", body, QoS::AtMostOnce).await;
    let res = c.next_publish().await;
    assert!(res.topic.starts_with("$iothub/twin/res/400/"), "{}", res.topic);
    alive(&hub).await;
}

#[tokio::test]
async fn numbers_that_would_overflow_a_clock_are_refused_or_saturated() {
    let hub = TestHub::start().await;
    let key = hub.create_device("d1").await;
    // A validly signed token expiring at 2^64-1 (and 2^63) connects; it used to panic the
    // connection task after the session was installed, leaving a ghost "Connected" device.
    for se in [u64::MAX, 1 << 63] {
        let mut c = hub.mqtt().await;
        let token = hub.device_token("d1", None, &key, se);
        let code = c.connect("d1", &hub_username("localhost", "d1", None, None), &token, true, 60).await;
        assert_eq!(code, Some(ConnectReturnCode::Success), "se = {se}");
        let pkid = c.publish("devices/d1/messages/events/", "{}", QoS::AtLeastOnce).await;
        assert!(pkid > 0);
        drop(c);
    }
    common::wait_until("the device shows Disconnected and the gauge falls", || async {
        let (_, _, d) = hub.rest("GET", "/devices/d1", None).await;
        d["connectionState"] == "Disconnected" && hub.metric("fleetsim_hub_connections{kind=\"hub\"}").await == 0.0
    })
    .await;

    // Fault settings and requests with numbers past any clock: 400, with the field named.
    for (method, path, body, field) in [
        ("PATCH", "/emulator/faults", json!({"token_lifetime_secs": u64::MAX}), "token_lifetime_secs"),
        ("PATCH", "/emulator/faults", json!({"puback_delay_ms": u64::MAX}), "puback_delay_ms"),
        ("PATCH", "/emulator/faults", json!({"outage_secs": u64::MAX, "outage_every_secs": u64::MAX}), "outage"),
        ("PATCH", "/emulator/faults", json!({"dps_assignment_delay_ms": u64::MAX}), "dps_assignment_delay_ms"),
        ("PUT", "/emulator/faults", json!({"storm_every_secs": u64::MAX}), "storm_every_secs"),
        ("POST", "/emulator/faults/outage", json!({"seconds": u64::MAX}), "seconds"),
        ("POST", "/emulator/faults/outage", json!({"seconds": -1}), "outage"),
    ] {
        let (status, _, resp) = hub.rest(method, path, Some(body.clone())).await;
        assert_eq!(status, 400, "{method} {path} {body}: {resp}");
        assert!(resp["Message"].as_str().unwrap_or_default().contains(field), "{body}: {resp}");
    }
    let (status, _, faults) = hub.rest("GET", "/emulator/faults", None).await;
    assert_eq!((status, &faults["token_lifetime_secs"]), (200, &json!(0)), "nothing was applied");
    // Method timeouts outside IoT Hub's ranges.
    for body in [
        json!({"methodName": "m", "responseTimeoutInSeconds": u64::MAX}),
        json!({"methodName": "m", "connectTimeoutInSeconds": u64::MAX}),
        json!({"methodName": "m", "responseTimeoutInSeconds": -5}),
    ] {
        let (status, _, resp) = hub.rest("POST", "/twins/d1/methods", Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {resp}");
    }
    alive(&hub).await;
}

#[tokio::test]
async fn a_token_reaches_only_what_its_resource_covers() {
    let hub = TestHub::start().await;
    hub.create_device("dev1").await;
    hub.create_device("dev2").await;
    // The reported instance: `sr = localhost/devices/dev1` signed with the owner key listed the
    // registry and deleted another device.
    let scoped = sign_token("localhost/devices/dev1", &hub.policy_key("iothubowner"), future(600), Some("iothubowner"));
    for (method, path) in [
        ("GET", "/devices"),
        ("DELETE", "/devices/dev2"),
        ("GET", "/devices/dev2"),
        ("GET", "/devices/dev10"),
        ("GET", "/twins/dev2"),
        ("POST", "/devices/query"),
        ("GET", "/statistics/devices"),
        ("GET", "/emulator/faults"),
        ("POST", "/emulator/faults/drop"),
    ] {
        let body = (method == "POST").then(|| json!({"query": "SELECT * FROM devices"}));
        let (status, headers, resp) = hub.rest_with_token(&scoped, method, path, body, &[("if-match", "*")]).await;
        assert_eq!(status, 401, "{method} {path}: {resp}");
        assert_eq!(headers["iothub-errorcode"], "IotHubUnauthorizedAccess", "{method} {path}");
    }
    let (status, _, d) = hub.rest("GET", "/devices/dev2", None).await;
    assert_eq!(status, 200, "dev2 survived: {d}");
    // What lies under the resource is allowed, in any case and with encoded separators.
    for path in ["/devices/dev1", "/devices/dev1/modules", "/devices/DEV1"] {
        let (status, _, resp) = hub.rest_with_token(&scoped, "GET", path, None, &[]).await;
        assert_ne!(status, 401, "{path}: {resp}");
    }
    // A prefix that is not a whole segment does not count: `devices/dev1` does not cover `dev10`.
    hub.create_device("dev10").await;
    let (status, _, _) = hub.rest_with_token(&scoped, "GET", "/devices/dev10", None, &[]).await;
    assert_eq!(status, 401);

    // DPS: a registration token for one id cannot register another (DPS's error shape).
    let info = &hub.info;
    let reg_key =
        fleetsim::iot::sas::derive_device_key(&fleetsim::iot::sas::Key::from_base64(&info.group_key).unwrap(), "a");
    let token = sign_token(&format!("{}/registrations/a", info.id_scope), &reg_key, future(600), Some("registration"));
    let (status, _, resp) = hub
        .rest_with_token(
            &token,
            "PUT",
            &format!("/{}/registrations/b/register", info.id_scope),
            Some(json!({"registrationId": "b"})),
            &[],
        )
        .await;
    assert_eq!(status, 401, "{resp}");
    assert_eq!(resp["errorCode"], 401002, "{resp}");
    let (status, _, resp) = hub
        .rest_with_token(
            &token,
            "PUT",
            &format!("/{}/registrations/a/register", info.id_scope),
            Some(json!({"registrationId": "a"})),
            &[],
        )
        .await;
    assert!(status == 200 || status == 202, "{status}: {resp}");
}

#[tokio::test]
async fn devices_and_modules_named_registrations_connect_to_the_hub() {
    let hub = TestHub::start().await;
    let key = hub.create_device("registrations").await;
    let mut c = hub.connect("registrations", None, &key, true).await;
    c.publish("devices/registrations/messages/events/", "{}", QoS::AtLeastOnce).await;
    let mkey = hub.create_module("registrations", "registrations").await;
    let _m = hub.connect("registrations", Some("registrations"), &mkey, true).await;
    common::wait_until("the telemetry arrived", || async { hub.events("registrations", None).await["received"] == 1 })
        .await;
}

#[tokio::test]
async fn malformed_fixed_headers_close_the_connection() {
    let hub = TestHub::start().await;
    let key = hub.create_device("d1").await;
    // SUBSCRIBE with flags 0000 instead of 0010 (MQTT-3.8.1-1), UNSUBSCRIBE likewise
    // (MQTT-3.10.1-1), a PINGREQ with a flag set (MQTT-2.2.2-2), a QoS 3 PUBLISH (MQTT-3.3.1-4).
    for raw in [
        &[0x80, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x00][..],
        &[0xA0, 0x07, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b'][..],
        &[0xC1, 0x00][..],
        &[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01][..],
    ] {
        let mut c = hub.connect("d1", None, &key, true).await;
        c.send_raw(raw).await;
        assert!(c.closed().await, "{raw:02x?}");
    }
    // Before CONNECT too: a CONNECT whose reserved flags are set is not read as one.
    let mut c = hub.mqtt().await;
    c.send_raw(&[0x1F, 0x00]).await;
    assert!(c.closed().await);
    alive(&hub).await;
}

#[tokio::test]
async fn method_payloads_over_128_kb_are_refused() {
    let hub = TestHub::start().await;
    let key = hub.create_device("d1").await;
    let _c = hub.connect("d1", None, &key, true).await;
    let big = "x".repeat(128 * 1024);
    let (status, headers, body) =
        hub.rest("POST", "/twins/d1/methods", Some(json!({"methodName": "m", "payload": big}))).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(headers["iothub-errorcode"], "MessageTooLarge");
    assert_eq!(body["errorCode"], 413001);
}
