//! HTTPS devices against the real emulator over TLS: telemetry (single, batched, from a module)
//! read back as the MQTT path stores it, sequence stamps counted, C2D received and settled by lock
//! token, lock expiry and redelivery, TTL, and the refusals Azure gives (401, 404, 400, 412, 413,
//! 429, 503). Waits poll with a bound; nothing asserts a duration.

use fleetsim_testkit as common;

use common::{TestHub, future, wait_until};
use fleetsim::iot::sas::Key;
use rumqttc::mqttbytes::QoS;
use serde_json::{Value, json};

/// A device REST call: status, headers and the body as text.
async fn call(
    hub: &TestHub,
    token: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &[u8])],
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = hub.http.request(method.parse().unwrap(), hub.url(path)).header("authorization", token);
    for (k, v) in headers {
        req = req.header(*k, reqwest::header::HeaderValue::from_bytes(v).unwrap());
    }
    let resp = tokio::time::timeout(common::WAIT, req.body(body).send()).await.expect("hung").unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.text().await.unwrap_or_default())
}

/// Polls `check` until it yields a value, failing the test after `common::WAIT`.
async fn poll<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    common::poll_until(what, check).await
}

fn error_code(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["ErrorCode"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

async fn device(hub: &TestHub, id: &str) -> (Key, String) {
    let key = hub.create_device(id).await;
    let token = hub.device_token(id, None, &key, future(3600));
    (key, token)
}

/// The parts of a stored message that do not depend on when it arrived.
fn comparable(m: &Value) -> Value {
    let mut m = m.clone();
    m["systemProperties"].as_object_mut().unwrap().remove("iothub-enqueuedtime");
    for k in ["enqueuedTime", "seq"] {
        m.as_object_mut().unwrap().remove(k);
    }
    m
}

#[tokio::test]
async fn telemetry_over_https_is_stored_as_mqtt_telemetry_is() {
    let hub = TestHub::start().await;
    let (_, token) = device(&hub, "h1").await;
    let headers: [(&str, &[u8]); 7] = [
        ("iothub-messageid", b"m1"),
        ("iothub-correlationid", b"c1"),
        ("iothub-contenttype", b"application/json"),
        ("iothub-contentencoding", b"utf-8"),
        ("iothub-app-alert", b"high temp"),
        ("iothub-app-fleetsim-seq", b"runA:1"),
        ("dt-subject", b"thermostat1"),
    ];
    let (status, _, body) =
        call(&hub, &token, "POST", "/devices/h1/messages/events", &headers, b"{\"t\":1}".to_vec()).await;
    assert_eq!(status, 204, "{body}");

    // The same message over MQTT, from a second device, stores the same properties.
    let key2 = hub.create_device("m1").await;
    let mut c = hub.connect("m1", None, &key2, true).await;
    c.publish(
        "devices/m1/messages/events/%24.mid=m1&%24.cid=c1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high%20temp&fleetsim-seq=runB%3A1&%24.sub=thermostat1",
        "{\"t\":1}",
        QoS::AtLeastOnce,
    )
    .await;
    let over_https = hub.events("h1", None).await["messages"][0].clone();
    wait_until("the MQTT message is stored", || async { hub.events("m1", None).await["received"] == 1 }).await;
    let over_mqtt = hub.events("m1", None).await["messages"][0].clone();
    assert_eq!(over_https["systemProperties"]["message-id"], "m1");
    assert_eq!(over_https["systemProperties"]["correlation-id"], "c1");
    assert_eq!(over_https["systemProperties"]["content-type"], "application/json");
    assert_eq!(over_https["systemProperties"]["dt-subject"], "thermostat1");
    assert_eq!(over_https["properties"]["alert"], "high temp");
    assert_eq!(over_https["body"], "{\"t\":1}");
    let (mut a, mut b) = (comparable(&over_https), comparable(&over_mqtt));
    for m in [&mut a, &mut b] {
        let sys = m["systemProperties"].as_object_mut().unwrap();
        sys.remove("iothub-connection-device-id");
        sys.remove("iothub-connection-auth-generation-id");
        m["properties"].as_object_mut().unwrap().remove("fleetsim-seq");
    }
    assert_eq!(a, b, "the same message whichever transport carried it");

    // A batch, as the SDKs send it: base64 bodies, properties named as headers are.
    let batch = json!([
        {"body": "eyJ0IjoyfQ==", "properties": {"iothub-app-fleetsim-seq": "runA:2", "iothub-messageid": "m2"}},
        {"body": "eyJ0IjozfQ==", "base64Encoded": true, "properties": {"iothub-app-fleetsim-seq": "runA:4"}},
    ]);
    let ct: [(&str, &[u8]); 1] = [("content-type", b"application/vnd.microsoft.iothub.json")];
    let (status, _, body) =
        call(&hub, &token, "POST", "/devices/h1/messages/events", &ct, batch.to_string().into_bytes()).await;
    assert_eq!(status, 204, "{body}");
    let events = hub.events("h1", None).await;
    assert_eq!(events["received"], 3);
    assert_eq!(events["messages"][1]["body"], "{\"t\":2}");
    assert_eq!(events["messages"][1]["systemProperties"]["message-id"], "m2");
    assert_eq!(events["messages"][2]["body"], "{\"t\":3}");
    let (status, _, seq) = hub.rest("GET", "/emulator/telemetry/sequence?run=runA", None).await;
    assert_eq!(status, 200);
    assert_eq!((seq["unique"].as_u64(), seq["gaps"].as_u64()), (Some(3), Some(1)), "{seq}");
}

#[tokio::test]
async fn a_module_sends_over_https_with_a_module_token() {
    let hub = TestHub::start().await;
    hub.create_device("e1").await;
    let key = hub.create_module("e1", "filter").await;
    let token = hub.device_token("e1", Some("filter"), &key, future(3600));
    let h: [(&str, &[u8]); 1] = [("iothub-app-kind", b"module")];
    let (status, _, body) =
        call(&hub, &token, "POST", "/devices/e1/modules/filter/messages/events", &h, b"m".to_vec()).await;
    assert_eq!(status, 204, "{body}");
    // A policy with DeviceConnect may sign for any identity (token services, gateways).
    let policy =
        fleetsim::iot::sas::sign_token(&hub.info.hostname, &hub.policy_key("device"), future(3600), Some("device"));
    let (status, _, body) =
        call(&hub, &policy, "POST", "/devices/e1/modules/filter/messages/events", &h, b"m".to_vec()).await;
    assert_eq!(status, 204, "{body}");
    let registry_read = fleetsim::iot::sas::sign_token(
        &hub.info.hostname,
        &hub.policy_key("registryRead"),
        future(3600),
        Some("registryRead"),
    );
    let (status, _, body) =
        call(&hub, &registry_read, "POST", "/devices/e1/modules/filter/messages/events", &h, b"m".to_vec()).await;
    assert_eq!((status, error_code(&body).as_str()), (401, "IotHubUnauthorizedAccess"), "no DeviceConnect");
    let stored = hub.events("e1", Some("filter")).await;
    assert_eq!(stored["received"], 2);
    assert_eq!(stored["messages"][0]["systemProperties"]["iothub-connection-module-id"], "filter");
    assert_eq!(stored["messages"][0]["properties"]["kind"], "module");
    // A module's token does not reach its device's route (the token's scope is the module).
    let (status, _, body) = call(&hub, &token, "POST", "/devices/e1/messages/events", &[], b"m".to_vec()).await;
    assert_eq!((status, error_code(&body).as_str()), (401, "IotHubUnauthorizedAccess"));
}

async fn send_c2d(hub: &TestHub, device: &str, body: Value) {
    let (status, _, resp) =
        hub.rest("POST", &format!("/emulator/devices/{device}/messages/deviceBound"), Some(body)).await;
    assert_eq!(status, 200, "{resp}");
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

fn lock_token(h: &reqwest::header::HeaderMap) -> String {
    header(h, "etag").trim_matches('"').to_owned()
}

#[tokio::test]
async fn c2d_is_received_and_completed_rejected_or_abandoned_by_lock_token() {
    let hub = TestHub::start().await;
    let (_, token) = device(&hub, "c1").await;
    let bound = "/devices/c1/messages/deviceBound";
    let (status, _, _) = call(&hub, &token, "GET", bound, &[], vec![]).await;
    assert_eq!(status, 204, "nothing queued");
    for (i, body) in ["one", "two", "three"].iter().enumerate() {
        send_c2d(
            &hub,
            "c1",
            json!({"body": body, "messageId": format!("id{i}"), "correlationId": "corr", "ack": "full",
                   "userId": "svc", "properties": {"color": "red"}}),
        )
        .await;
    }
    let (status, h, body) = call(&hub, &token, "GET", bound, &[], vec![]).await;
    assert_eq!((status, body.as_str()), (200, "one"));
    assert_eq!(header(&h, "iothub-messageid"), "id0");
    assert_eq!(header(&h, "iothub-to"), "/devices/c1/messages/deviceBound");
    assert_eq!(header(&h, "iothub-correlationid"), "corr");
    assert_eq!(header(&h, "iothub-userid"), "svc");
    assert_eq!(header(&h, "iothub-ack"), "full");
    assert_eq!(header(&h, "iothub-app-color"), "red");
    assert_eq!(header(&h, "iothub-deliverycount"), "0");
    assert!(!header(&h, "iothub-enqueuedtime").is_empty() && !header(&h, "iothub-expiry").is_empty());
    assert!(header(&h, "etag").starts_with('"') && header(&h, "etag").ends_with('"'));
    let first = lock_token(&h);
    let (status, _, body) = call(&hub, &token, "DELETE", &format!("{bound}/{first}"), &[], vec![]).await;
    assert_eq!(status, 204, "{body}");
    let (status, _, body) = call(&hub, &token, "DELETE", &format!("{bound}/{first}"), &[], vec![]).await;
    assert_eq!((status, error_code(&body).as_str()), (412, "DeviceMessageLockLost"), "completed already");

    // The Node SDK spells the route `devicebound` and rejects with a bare `&reject`.
    let (status, h, body) = call(&hub, &token, "GET", "/devices/c1/messages/devicebound", &[], vec![]).await;
    assert_eq!((status, body.as_str()), (200, "two"));
    let path = format!("/devices/c1/messages/devicebound/{}?reject", lock_token(&h));
    let (status, _, body) = call(&hub, &token, "DELETE", &path, &[], vec![]).await;
    assert_eq!(status, 204, "{body}");

    let (_, h, body) = call(&hub, &token, "GET", bound, &[], vec![]).await;
    assert_eq!(body, "three");
    let (status, _, _) = call(&hub, &token, "POST", &format!("{bound}/{}/abandon", lock_token(&h)), &[], vec![]).await;
    assert_eq!(status, 204);
    let (status, h, body) = call(&hub, &token, "GET", bound, &[], vec![]).await;
    assert_eq!((status, body.as_str(), header(&h, "iothub-deliverycount")), (200, "three", "1"), "abandoned: again");
    call(&hub, &token, "DELETE", &format!("{bound}/{}", lock_token(&h)), &[], vec![]).await;
    let (status, _, _) = call(&hub, &token, "GET", bound, &[], vec![]).await;
    assert_eq!(status, 204, "rejected and completed messages are gone");
    assert_eq!(hub.metric("fleetsim_hub_c2d_messages_total{event=\"rejected\"}").await, 1.0);
    assert_eq!(hub.metric("fleetsim_hub_c2d_messages_total{event=\"abandoned\"}").await, 1.0);
    assert_eq!(hub.metric("fleetsim_hub_c2d_messages_total{event=\"completed\"}").await, 2.0);

    let (status, _, body) = call(&hub, &token, "POST", &format!("{bound}/nonsense/abandon"), &[], vec![]).await;
    assert_eq!((status, error_code(&body).as_str()), (412, "DeviceMessageLockLost"));
}

#[tokio::test]
async fn an_expired_lock_redelivers_until_the_delivery_count_then_dead_letters() {
    let hub = TestHub::start_with(|c| {
        c.behaviour.c2d_lock_timeout_secs = 1;
        c.behaviour.c2d_max_delivery_count = 2;
    })
    .await;
    let (_, token) = device(&hub, "r1").await;
    let bound = "/devices/r1/messages/deviceBound";
    send_c2d(&hub, "r1", json!({"body": "again"})).await;
    let (status, h, _) = call(&hub, &token, "GET", bound, &[], vec![]).await;
    assert_eq!(status, 200);
    let first = lock_token(&h);
    let second = poll("the lock expires and the message is delivered again", || async {
        let (status, h, _) = call(&hub, &token, "GET", bound, &[], vec![]).await;
        (status == 200).then(|| (header(&h, "iothub-deliverycount").to_owned(), lock_token(&h)))
    })
    .await;
    assert_eq!(second.0, "1");
    let second = Some(second.1);
    assert_ne!(second.as_deref(), Some(first.as_str()), "a new lock token");
    let (status, _, body) = call(&hub, &token, "DELETE", &format!("{bound}/{first}"), &[], vec![]).await;
    assert_eq!((status, error_code(&body).as_str()), (412, "DeviceMessageLockLost"), "the old lock is lost");
    // Each receive after the second lock expires finds the message past the delivery count.
    wait_until("past the delivery count the message is dead-lettered", || async {
        let (status, _, _) = call(&hub, &token, "GET", bound, &[], vec![]).await;
        assert_eq!(status, 204, "delivered a third time");
        hub.metric("fleetsim_hub_c2d_messages_total{event=\"dead_lettered\"}").await == 1.0
    })
    .await;
    let (status, _, _) = call(&hub, &token, "GET", bound, &[], vec![]).await;
    assert_eq!(status, 204);
}

#[tokio::test]
async fn an_expired_message_is_not_delivered() {
    let hub = TestHub::start().await;
    let (_, token) = device(&hub, "t1").await;
    let bound = "/devices/t1/messages/deviceBound";
    send_c2d(&hub, "t1", json!({"body": "brief", "ttlSeconds": 1})).await;
    wait_until("the message expires", || async {
        let (status, h, _) = call(&hub, &token, "GET", bound, &[], vec![]).await;
        if status == 200 {
            call(&hub, &token, "POST", &format!("{bound}/{}/abandon", lock_token(&h)), &[], vec![]).await;
        }
        status == 204
    })
    .await;
    assert_eq!(hub.metric("fleetsim_hub_c2d_messages_total{event=\"expired\"}").await, 1.0);
}

#[tokio::test]
async fn refusals_are_azures() {
    let hub = TestHub::start().await;
    let (key, token) = device(&hub, "x1").await;
    let (_, other) = device(&hub, "x2").await;
    let events = "/devices/x1/messages/events";
    let post = |token: String, path: &'static str, headers: Vec<(&'static str, Vec<u8>)>, body: Vec<u8>| {
        let hub = &hub;
        async move {
            let h: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
            call(hub, &token, "POST", path, &h, body).await
        }
    };
    for (what, t) in [
        ("another device's token", other.clone()),
        ("an expired token", hub.device_token("x1", None, &key, 1)),
        ("a token signed with another key", hub.device_token("x1", None, &Key::generate(), future(3600))),
        ("no token", String::new()),
        ("not a token", "Bearer abc".into()),
    ] {
        let (status, h, body) = post(t, events, vec![], b"x".to_vec()).await;
        assert_eq!((status, error_code(&body).as_str()), (401, "IotHubUnauthorizedAccess"), "{what}: {body}");
        assert_eq!(header(&h, "iothub-errorcode"), "IotHubUnauthorizedAccess");
    }
    let ghost = hub.device_token("ghost", None, &Key::generate(), future(3600));
    let (status, _, body) = post(ghost, "/devices/ghost/messages/events", vec![], b"x".to_vec()).await;
    assert_eq!((status, error_code(&body).as_str()), (404, "DeviceNotFound"));
    let disable = Some(json!({"deviceId": "x2", "status": "disabled"}));
    let (status, _, body) = hub.rest_as("iothubowner", "PUT", "/devices/x2", disable, &[("if-match", "*")]).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = post(other.clone(), "/devices/x2/messages/events", vec![], b"x".to_vec()).await;
    assert_eq!((status, error_code(&body).as_str()), (404, "DeviceNotFound"), "disabled");

    // Bad input: 400 or 413 with Azure's body, never a panic.
    let big = vec![b'a'; 256 * 1024 + 1];
    let (status, _, body) = post(token.clone(), events, vec![], big).await;
    assert_eq!((status, error_code(&body).as_str()), (413, "MessageTooLarge"));
    let (status, _, body) = post(token.clone(), events, vec![], vec![0u8; 4 * 1024 * 1024]).await;
    assert_eq!((status, error_code(&body).as_str()), (413, "MessageTooLarge"), "past the body bound");
    let ct = ("content-type", b"application/vnd.microsoft.iothub.json".to_vec());
    let half = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, vec![b'a'; 150 * 1024]);
    let batch = json!([{"body": half}, {"body": half}]).to_string().into_bytes();
    let (status, _, body) = post(token.clone(), events, vec![ct.clone()], batch).await;
    assert_eq!((status, error_code(&body).as_str()), (413, "MessageTooLarge"), "the batch as a whole");
    for bad in [&b"[{\"body\":\"***\"}]"[..], b"[]", b"nope", b"[[[[[[[[[[[[[[[[", b"\xff\xfe"] {
        let (status, _, body) = post(token.clone(), events, vec![ct.clone()], bad.to_vec()).await;
        assert_eq!((status, error_code(&body).as_str()), (400, "ArgumentInvalid"), "{}", String::from_utf8_lossy(bad));
    }
    let deep = format!("[{{\"body\":\"\",\"properties\":{{\"a\":{}}}}}]", "[".repeat(100_000));
    let (status, _, _) = post(token.clone(), events, vec![ct.clone()], deep.into_bytes()).await;
    assert_eq!(status, 400);
    let (status, _, body) =
        post(token.clone(), events, vec![("iothub-app-x", b"\xff\xfe\x80".to_vec())], b"x".to_vec()).await;
    assert_eq!((status, error_code(&body).as_str()), (400, "ArgumentInvalid"), "non-UTF-8 header");
    let (status, _, _) = post(token.clone(), events, vec![("iothub-app-x", b"\x80ok".to_vec())], b"x".to_vec()).await;
    assert_eq!(status, 400);
    let resp = hub.http.post(hub.url(events).replace("api-version=2021-04-12", "x=1")).header("authorization", &token);
    assert_eq!(resp.send().await.unwrap().status().as_u16(), 400, "api-version is required");
    assert_eq!(hub.events("x1", None).await["received"], 0, "nothing refused was stored");

    // Twins and methods have no device HTTPS API: a device token is refused by the service routes.
    let (status, _, body) = call(&hub, &token, "GET", "/twins/x1", &[], vec![]).await;
    assert_eq!((status, error_code(&body).as_str()), (401, "IotHubUnauthorizedAccess"));
    let (status, _, _) = call(&hub, &token, "POST", "/twins/x1/methods", &[], b"{}".to_vec()).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn injected_throttling_and_outages_answer_429_and_503() {
    let hub = TestHub::start().await;
    let (_, token) = device(&hub, "f1").await;
    let (status, _, body) = hub.rest("PATCH", "/emulator/faults", Some(json!({"connects_per_sec": 1}))).await;
    assert_eq!(status, 200, "{body}");
    let throttled = poll("a request over the rate is throttled", || async {
        let (status, h, body) = call(&hub, &token, "POST", "/devices/f1/messages/events", &[], b"x".to_vec()).await;
        assert!(status == 204 || status == 429, "{status} {body}");
        (status == 429).then(|| (error_code(&body), header(&h, "retry-after").to_owned()))
    })
    .await;
    assert_eq!(throttled, ("ThrottlingException".into(), "1".into()));
    hub.rest("PUT", "/emulator/faults", Some(json!({}))).await;
    let (status, _, _) = hub.rest("POST", "/emulator/faults/outage", Some(json!({"seconds": 600}))).await;
    assert_eq!(status, 200);
    let (status, _, body) = call(&hub, &token, "GET", "/devices/f1/messages/deviceBound", &[], vec![]).await;
    assert_eq!((status, error_code(&body).as_str()), (503, "ServiceUnavailable"));
}
