//! What the emulator refuses, and how: CONNACK 5 for any authentication failure, a closed
//! connection for protocol violations, forced disconnects for expiry, keep-alive and replacement.

use fleetsim_testkit as common;

use common::{TestHub, future};
use fleetsim::hub::config::BadSubscription;
use fleetsim::iot::sas::Key;
use fleetsim::iot::username::hub_username;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, SubscribeReasonCode};

async fn connack(hub: &TestHub, client_id: &str, username: &str, password: &str) -> Option<ConnectReturnCode> {
    hub.mqtt().await.connect(client_id, username, password, true, 60).await
}

#[tokio::test]
async fn authentication_failures_get_connack_5() {
    let hub = TestHub::start().await;
    let key = hub.create_device("d1").await;
    let user = hub_username("localhost", "d1", None, None);
    let good = hub.device_token("d1", None, &key, future(600));
    assert_eq!(connack(&hub, "d1", &user, &good).await, Some(ConnectReturnCode::Success));

    let refused = Some(ConnectReturnCode::NotAuthorized);
    let wrong_key = hub.device_token("d1", None, &Key::generate(), future(600));
    assert_eq!(connack(&hub, "d1", &user, &wrong_key).await, refused, "wrong key");
    let expired = hub.device_token("d1", None, &key, future(0) - 10);
    assert_eq!(connack(&hub, "d1", &user, &expired).await, refused, "expired");
    let other_device = hub.device_token("d2", None, &key, future(600));
    assert_eq!(connack(&hub, "d1", &user, &other_device).await, refused, "token for another device");
    assert_eq!(connack(&hub, "someone-else", &user, &good).await, refused, "client id mismatch");
    assert_eq!(
        connack(&hub, "ghost", &hub_username("localhost", "ghost", None, None), &good).await,
        refused,
        "unknown device"
    );
    assert_eq!(connack(&hub, "d1", &hub_username("other.host", "d1", None, None), &good).await, refused, "another hub");
    assert_eq!(connack(&hub, "d1", &user, "not a token").await, refused, "garbage password");
    // Any field order and lower-case escapes are fine as long as the signature covers them.
    let sr = "localhost%2fdevices%2fd1";
    let se = future(600);
    let sig = fleetsim::iot::encoding::url_encode(&key.sign(format!("{sr}\n{se}").as_bytes()));
    assert_eq!(
        connack(&hub, "d1", &user, &format!("SharedAccessSignature se={se}&sig={sig}&sr={sr}")).await,
        Some(ConnectReturnCode::Success)
    );
    // A policy with DeviceConnect may sign for a device; one without may not.
    let policy = |name: &str| {
        fleetsim::iot::sas::sign_token("localhost/devices/d1", &hub.policy_key(name), future(600), Some(name))
    };
    assert_eq!(connack(&hub, "d1", &user, &policy("device")).await, Some(ConnectReturnCode::Success));
    assert_eq!(connack(&hub, "d1", &user, &policy("registryRead")).await, refused);
    // A disabled device is refused even with a good token.
    let (status, _, _) = hub
        .rest_as(
            "iothubowner",
            "PUT",
            "/devices/d1",
            Some(serde_json::json!({"deviceId": "d1", "status": "disabled"})),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(connack(&hub, "d1", &user, &good).await, refused, "disabled");

    let metrics = hub.metrics().await;
    for reason in [
        "bad_credentials",
        "expired_token",
        "client_id_mismatch",
        "unknown_identity",
        "bad_username",
        "identity_disabled",
    ] {
        let line = format!("fleetsim_hub_connections_refused_total{{reason=\"{reason}\"}}");
        assert!(metrics.lines().any(|l| l.starts_with(&line) && !l.ends_with(" 0")), "{reason} not counted");
    }
    assert!(!metrics.contains("d1"), "no per-device labels");
}

#[tokio::test]
async fn protocol_violations_close_the_connection() {
    let hub = TestHub::start().await;
    let key = hub.create_device("v").await;
    for (what, topic, qos) in [
        ("QoS 2 publish", "devices/v/messages/events/", QoS::ExactlyOnce),
        ("another device's telemetry", "devices/w/messages/events/", QoS::AtLeastOnce),
        ("an undocumented topic", "some/topic", QoS::AtMostOnce),
        ("a DPS topic on the hub", "$dps/registrations/PUT/iotdps-register/?$rid=1", QoS::AtLeastOnce),
        ("a twin request without $rid", "$iothub/twin/GET/", QoS::AtLeastOnce),
    ] {
        let mut c = hub.connect("v", None, &key, true).await;
        c.publish(topic, "{}", qos).await;
        assert!(c.closed().await, "{what}");
    }
    for filter in ["devices/w/messages/devicebound/#", "#", "$iothub/twin/#"] {
        let mut c = hub.connect("v", None, &key, true).await;
        c.send(rumqttc::mqttbytes::v4::Packet::Subscribe(rumqttc::mqttbytes::v4::Subscribe::new(
            filter,
            QoS::AtLeastOnce,
        )))
        .await;
        assert!(c.closed().await, "subscribe {filter}");
    }
    // QoS 2 subscriptions are granted QoS 1.
    let mut c = hub.connect("v", None, &key, true).await;
    assert_eq!(
        c.subscribe(&[("$iothub/methods/POST/#", QoS::ExactlyOnce)]).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // A message over 256 KB is not acknowledged; the connection is dropped.
    c.publish("devices/v/messages/events/", vec![b'x'; 256 * 1024 + 1], QoS::AtLeastOnce).await;
    assert!(c.closed().await, "oversized message");
    assert_eq!(hub.events("v", None).await["received"], 0);
    assert!(hub.metric("fleetsim_hub_disconnects_total{reason=\"protocol_violation\"}").await >= 8.0);
}

#[tokio::test]
async fn subscriptions_past_the_limit_can_be_refused_instead() {
    let hub = TestHub::start_with(|c| {
        c.behaviour.max_subscriptions = 2;
        c.behaviour.bad_subscription = BadSubscription::Refuse;
    })
    .await;
    let key = hub.create_device("s").await;
    let mut c = hub.connect("s", None, &key, true).await;
    let codes = c
        .subscribe(&[
            ("$iothub/methods/POST/#", QoS::AtLeastOnce),
            ("$iothub/twin/res/#", QoS::AtLeastOnce),
            ("$iothub/twin/PATCH/properties/desired/#", QoS::AtLeastOnce),
            ("bogus/#", QoS::AtLeastOnce),
        ])
        .await;
    use SubscribeReasonCode::{Failure, Success};
    assert_eq!(codes, [Success(QoS::AtLeastOnce), Success(QoS::AtLeastOnce), Failure, Failure]);
    // The connection stays usable.
    let pkid = c.publish("devices/s/messages/events/", "{}", QoS::AtLeastOnce).await;
    c.puback(pkid).await;
}

#[tokio::test]
async fn the_hub_disconnects_when_the_token_expires() {
    let hub = TestHub::start().await;
    let key = hub.create_device("exp").await;
    let mut c = hub.mqtt().await;
    let token = hub.device_token("exp", None, &key, future(2));
    assert_eq!(
        c.connect("exp", &hub_username("localhost", "exp", None, None), &token, true, 60).await,
        Some(ConnectReturnCode::Success)
    );
    assert!(c.closed().await);
    assert_eq!(hub.metric("fleetsim_hub_disconnects_total{reason=\"token_expired\"}").await, 1.0);
}

#[tokio::test]
async fn silence_past_one_and_a_half_keepalives_is_a_disconnect() {
    let hub = TestHub::start().await;
    let key = hub.create_device("ka").await;
    let mut c = hub.mqtt().await;
    let token = hub.device_token("ka", None, &key, future(600));
    assert_eq!(
        c.connect("ka", &hub_username("localhost", "ka", None, None), &token, true, 1).await,
        Some(ConnectReturnCode::Success)
    );
    assert!(c.closed().await);
    assert_eq!(hub.metric("fleetsim_hub_disconnects_total{reason=\"keepalive_timeout\"}").await, 1.0);
}

#[tokio::test]
async fn a_new_connection_replaces_the_old_one() {
    let hub = TestHub::start().await;
    let key = hub.create_device("dup").await;
    let mut first = hub.connect("dup", None, &key, true).await;
    let mut second = hub.connect("dup", None, &key, true).await;
    assert!(first.closed().await);
    let pkid = second.publish("devices/dup/messages/events/", "{}", QoS::AtLeastOnce).await;
    second.puback(pkid).await;
    assert_eq!(hub.metric("fleetsim_hub_disconnects_total{reason=\"replaced\"}").await, 1.0);
    assert_eq!(hub.metric("fleetsim_hub_connections{kind=\"hub\"}").await, 1.0);
    // Deleting the device closes its connection too.
    let (status, _, _) = hub.rest_as("iothubowner", "DELETE", "/devices/dup", None, &[("if-match", "\"*\"")]).await;
    assert_eq!(status, 204);
    assert!(second.closed().await);
}

#[tokio::test]
async fn a_connection_that_never_sends_connect_is_dropped() {
    let hub = TestHub::start_with(|c| c.behaviour.connect_timeout_secs = 1).await;
    let mut c = hub.mqtt().await;
    assert!(c.closed().await);
    assert_eq!(hub.metric("fleetsim_hub_connections_refused_total{reason=\"no_connect\"}").await, 1.0);
    // MQTT 5 is not IoT Hub's protocol.
    let mut c = hub.mqtt().await;
    let mut raw = bytes::BytesMut::new();
    rumqttc::mqttbytes::v4::Packet::Connect(rumqttc::mqttbytes::v4::Connect::new("x"))
        .write(&mut raw, usize::MAX)
        .unwrap();
    raw[8] = 5; // protocol level byte
    c.send_raw(&raw).await;
    assert!(
        matches!(c.recv().await, Some(rumqttc::mqttbytes::v4::Packet::ConnAck(a)) if a.code == ConnectReturnCode::RefusedProtocolVersion)
    );
}
