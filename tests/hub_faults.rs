//! The fault injector, one fault at a time, over real TLS: what a device or a service caller sees
//! when each is on, and the control route that turns them on and off.

use fleetsim_testkit as common;

use common::{TestHub, future};
use fleetsim::hub::faults::FaultConfig;
use fleetsim::iot::sas::{Key, derive_device_key, sign_token};
use fleetsim::iot::username::hub_username;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use serde_json::json;

#[tokio::test]
async fn the_control_route_needs_registry_write_validates_and_merges() {
    let hub = TestHub::start().await;
    let (status, _, _) = hub.rest_as("registryRead", "PATCH", "/emulator/faults", Some(json!({})), &[]).await;
    assert_eq!(status, 401, "a read-only policy may not inject faults");
    let (status, _, body) = hub.rest("PATCH", "/emulator/faults", Some(json!({"twin_error_rate": 1.5}))).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("twin_error_rate"), "{body}");
    let (status, _, body) = hub.rest("PATCH", "/emulator/faults", Some(json!({"bogus": 1}))).await;
    assert_eq!(status, 400, "{body}");

    let (status, _, body) = hub.rest("PATCH", "/emulator/faults", Some(json!({"puback_delay_ms": 300}))).await;
    assert_eq!((status, body["puback_delay_ms"].as_u64()), (200, Some(300)), "{body}");
    let (_, _, body) = hub.rest("PATCH", "/emulator/faults", Some(json!({"method_drop_rate": 0.5}))).await;
    assert_eq!((body["puback_delay_ms"].as_u64(), body["method_drop_rate"].as_f64()), (Some(300), Some(0.5)));
    let (_, _, body) = hub.rest("PUT", "/emulator/faults", Some(json!({"token_lifetime_secs": 9}))).await;
    assert_eq!(body["puback_delay_ms"], 0, "PUT replaces: what it leaves out is off again");
    assert_eq!(hub.state().faults.get(), FaultConfig { token_lifetime_secs: 9, ..Default::default() });
}

#[tokio::test]
async fn an_outage_answers_connack_3_until_it_ends() {
    let hub = TestHub::start().await;
    let key = hub.create_device("o1").await;
    let user = hub_username("localhost", "o1", None, None);
    let token = hub.device_token("o1", None, &key, future(600));
    let (status, _, body) = hub.rest("POST", "/emulator/faults/outage", Some(json!({"seconds": 600}))).await;
    assert_eq!(status, 200);
    assert!(body["outageSecondsLeft"].as_u64().unwrap() > 500, "{body}");
    let code = hub.mqtt().await.connect("o1", &user, &token, true, 60).await;
    assert_eq!(code, Some(ConnectReturnCode::ServiceUnavailable));
    hub.rest("POST", "/emulator/faults/outage", Some(json!({"seconds": 0}))).await;
    let code = hub.mqtt().await.connect("o1", &user, &token, true, 60).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    assert_eq!(hub.metric("fleetsim_hub_connections_refused_total{reason=\"outage\"}").await, 1.0);
}

#[tokio::test]
async fn the_connect_throttle_admits_its_rate_and_refuses_the_rest() {
    let hub = TestHub::start_with(|c| c.faults.connects_per_sec = 2).await;
    let key = hub.create_device("t1").await;
    let user = hub_username("localhost", "t1", None, None);
    let token = hub.device_token("t1", None, &key, future(600));
    let mut codes = Vec::new();
    let t0 = std::time::Instant::now();
    for _ in 0..8 {
        codes.push(hub.mqtt().await.connect("t1", &user, &token, true, 60).await);
    }
    // Two per one-second window: the first two always get in, and however slowly the attempts
    // ran, no more than two per window that had begun.
    assert_eq!(&codes[..2], [Some(ConnectReturnCode::Success); 2]);
    let admitted = codes.iter().filter(|c| **c == Some(ConnectReturnCode::Success)).count() as u64;
    assert!(admitted <= 2 * (t0.elapsed().as_secs() + 1), "{codes:?}");
    assert!(
        codes.iter().all(|c| matches!(c, Some(ConnectReturnCode::Success | ConnectReturnCode::ServiceUnavailable)))
    );
}

#[tokio::test]
async fn twin_errors_delayed_pubacks_and_early_expiry_reach_the_device() {
    let hub = TestHub::start().await;
    let key = hub.create_device("f1").await;
    let mut c = hub.connect("f1", None, &key, true).await;
    c.subscribe(&[("$iothub/twin/res/#", QoS::AtMostOnce)]).await;

    hub.state().set_faults(FaultConfig { twin_error_rate: 1.0, twin_error_status: 503, ..Default::default() });
    c.publish("$iothub/twin/GET/?$rid=g1", " ", QoS::AtMostOnce).await;
    assert!(c.next_publish().await.topic.starts_with("$iothub/twin/res/503/?$rid=g1"));
    hub.state().set_faults(FaultConfig::default());
    c.publish("$iothub/twin/GET/?$rid=g2", " ", QoS::AtMostOnce).await;
    assert!(c.next_publish().await.topic.starts_with("$iothub/twin/res/200/?$rid=g2"));

    hub.state().set_faults(FaultConfig { puback_delay_ms: 400, ..Default::default() });
    let t0 = std::time::Instant::now();
    let pkid = c.publish("devices/f1/messages/events/", "{}", QoS::AtLeastOnce).await;
    c.puback(pkid).await;
    assert!(t0.elapsed() >= std::time::Duration::from_millis(400), "the PUBACK came early");

    hub.state().set_faults(FaultConfig { token_lifetime_secs: 1, ..Default::default() });
    let mut short = hub.connect("f1", None, &key, true).await;
    assert!(short.closed().await, "the connection is expired despite its hour-long token");
    assert_eq!(hub.metric("fleetsim_hub_disconnects_total{reason=\"token_expired\"}").await, 1.0);
}

#[tokio::test]
async fn a_dropped_method_times_out_for_the_caller() {
    let hub = TestHub::start_with(|c| c.faults.method_drop_rate = 1.0).await;
    let key = hub.create_device("m1").await;
    let mut c = hub.connect("m1", None, &key, true).await;
    c.subscribe(&[("$iothub/methods/POST/#", QoS::AtMostOnce)]).await;
    let (status, _, body) = hub
        .rest(
            "POST",
            "/twins/m1/methods",
            Some(json!({"methodName": "blink", "payload": 1, "responseTimeoutInSeconds": 5})),
        )
        .await;
    assert_eq!(status, 504, "{body}");
    assert!(c.silent_for(std::time::Duration::from_secs(1)).await, "the request never reached the device");
}

#[tokio::test]
async fn dps_throttling_is_a_429_with_retry_after() {
    let hub = TestHub::start_with(|c| {
        c.faults.dps_throttle_rate = 1.0;
        c.faults.dps_retry_after_secs = 7;
    })
    .await;
    let reg = "thr-1";
    let key = derive_device_key(&Key::from_base64(&hub.info.group_key).unwrap(), reg);
    let token =
        sign_token(&format!("{}/registrations/{reg}", hub.info.id_scope), &key, future(600), Some("registration"));
    let r = hub
        .http
        .put(format!(
            "https://localhost:{}/{}/registrations/{reg}/register?api-version=2019-03-31",
            hub.info.https_port, hub.info.id_scope
        ))
        .header("authorization", token)
        .json(&json!({"registrationId": reg}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
}

#[tokio::test]
async fn a_drop_closes_connections_and_silent_mode_keeps_the_socket_quiet() {
    let hub = TestHub::start().await;
    let key = hub.create_device("s1").await;
    let mut loud = hub.connect("s1", None, &key, true).await;
    let (_, _, body) = hub.rest("POST", "/emulator/faults/drop", None).await;
    assert_eq!(body["dropped"], 1);
    assert!(loud.closed().await);

    hub.rest("PATCH", "/emulator/faults", Some(json!({"drop_mode": "silent"}))).await;
    let mut quiet = hub.connect("s1", None, &key, true).await;
    hub.rest("POST", "/emulator/faults/drop", Some(json!({"fraction": 1.0}))).await;
    quiet.send(Packet::PingReq).await;
    assert!(quiet.silent_for(std::time::Duration::from_secs(2)).await, "no PINGRESP, and no close either");
    assert!(hub.state().registry.get("s1", None).unwrap().lock().session.is_none(), "the hub let the device go");
}
