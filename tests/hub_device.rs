//! Device and module flows against the emulator over real TLS: telemetry, twins, methods, C2D,
//! module identities and MQTT over WebSockets.

use fleetsim_testkit as common;

use common::{TestHub, WAIT};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, SubscribeReasonCode};
use serde_json::{Value, json};

#[tokio::test]
async fn telemetry_is_acknowledged_counted_and_readable() {
    let hub = TestHub::start().await;
    let key = hub.create_device("dev1").await;
    let mut c = hub.connect("dev1", None, &key, true).await;
    let topic = "devices/dev1/messages/events/%24.mid=m1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high%20temp";
    let pkid = c.publish(topic, r#"{"temp":21.5}"#, QoS::AtLeastOnce).await;
    c.puback(pkid).await;
    // Both shapes the SDKs and docs use are accepted.
    let pkid = c.publish("devices/dev1/messages/events", "plain", QoS::AtLeastOnce).await;
    c.puback(pkid).await;
    let events = hub.events("dev1", None).await;
    assert_eq!(events["received"], 2);
    let first = &events["messages"][0];
    assert_eq!(first["body"], r#"{"temp":21.5}"#);
    assert_eq!(first["systemProperties"]["message-id"], "m1");
    assert_eq!(first["systemProperties"]["content-type"], "application/json");
    assert_eq!(first["systemProperties"]["iothub-connection-device-id"], "dev1");
    assert_eq!(first["properties"]["alert"], "high temp");
    assert_eq!(hub.metric("fleetsim_hub_telemetry_received_total").await, 2.0);
    let (_, _, dev) = hub.rest("GET", "/devices/dev1", None).await;
    assert_eq!(dev["connectionState"], "Connected");
}

#[tokio::test]
async fn twin_get_reported_patch_and_desired_notifications() {
    let hub = TestHub::start().await;
    let key = hub.create_device("tw").await;
    let mut c = hub.connect("tw", None, &key, true).await;
    let codes = c
        .subscribe(&[
            ("$iothub/twin/res/#", QoS::AtLeastOnce),
            ("$iothub/twin/PATCH/properties/desired/#", QoS::AtLeastOnce),
        ])
        .await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce); 2]);

    c.publish("$iothub/twin/GET/?$rid=g1", " ", QoS::AtLeastOnce).await;
    let res = c.next_publish().await;
    assert_eq!(res.topic, "$iothub/twin/res/200/?$rid=g1");
    let twin: Value = serde_json::from_slice(&res.payload).unwrap();
    assert_eq!(twin, json!({"desired": {"$version": 1}, "reported": {"$version": 1}}));

    c.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=p1",
        r#"{"state":true,"fw":{"v":"1.0"}}"#,
        QoS::AtLeastOnce,
    )
    .await;
    let res = c.next_publish().await;
    assert_eq!(res.topic, "$iothub/twin/res/204/?$rid=p1&$version=2");
    assert!(res.payload.is_empty());
    c.publish("$iothub/twin/PATCH/properties/reported/?$rid=p2", r#"{"fw":null}"#, QoS::AtLeastOnce).await;
    assert_eq!(c.next_publish().await.topic, "$iothub/twin/res/204/?$rid=p2&$version=3");
    c.publish("$iothub/twin/PATCH/properties/reported/?$rid=bad", r#"{"a.b":1}"#, QoS::AtLeastOnce).await;
    let bad = c.next_publish().await;
    assert_eq!(bad.topic, "$iothub/twin/res/400/?$rid=bad");
    assert!(serde_json::from_slice::<Value>(&bad.payload).unwrap()["errorCode"].is_number());

    let (status, _, svc) = hub
        .rest("PATCH", "/twins/tw", Some(json!({"properties": {"desired": {"brightness": 7}}, "tags": {"site": "a"}})))
        .await;
    assert_eq!(status, 200, "{svc}");
    assert_eq!(
        svc["properties"]["reported"],
        json!({"state": true, "$metadata": svc["properties"]["reported"]["$metadata"], "$version": 3})
    );
    assert_eq!(svc["tags"]["site"], "a");
    let patch = c.next_publish().await;
    assert_eq!(patch.topic, "$iothub/twin/PATCH/properties/desired/?$version=2");
    assert_eq!(serde_json::from_slice::<Value>(&patch.payload).unwrap(), json!({"brightness": 7, "$version": 2}));

    // A stale etag is refused; the current one is accepted.
    let (status, _, _) = hub
        .rest_as(
            "iothubowner",
            "PATCH",
            "/twins/tw",
            Some(json!({"tags": {"x": 1}})),
            &[("if-match", "\"AAAAAAAAAAE=\"")],
        )
        .await;
    assert_eq!(status, 412);
    let etag = format!("\"{}\"", svc["etag"].as_str().unwrap());
    let (status, _, _) =
        hub.rest_as("iothubowner", "PATCH", "/twins/tw", Some(json!({"tags": {"x": 1}})), &[("if-match", &etag)]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn direct_methods_round_trip_and_fail_as_the_hub_does() {
    let hub = TestHub::start().await;
    let key = hub.create_device("m1").await;

    let (status, headers, body) =
        hub.rest("POST", "/twins/m1/methods", Some(json!({"methodName": "blink", "payload": 5}))).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(headers["iothub-errorcode"], "DeviceNotOnline");
    assert_eq!(body["info"]["timeout"], "00:00:00");

    let mut c = hub.connect("m1", None, &key, true).await;
    c.subscribe(&[("$iothub/methods/POST/#", QoS::AtMostOnce)]).await;
    let call = {
        let http = hub.http.clone();
        let url = hub.url("/twins/m1/methods");
        let token = hub.service_token("iothubowner");
        tokio::spawn(async move {
            let r = http
                .post(url)
                .header("authorization", token)
                .json(&json!({"methodName": "blink", "payload": {"interval": 2}, "responseTimeoutInSeconds": 10}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    let req = c.next_publish().await;
    assert!(req.topic.starts_with("$iothub/methods/POST/blink/?$rid="), "{}", req.topic);
    assert_eq!(req.qos, QoS::AtMostOnce);
    assert_eq!(serde_json::from_slice::<Value>(&req.payload).unwrap(), json!({"interval": 2}));
    let rid = req.topic.rsplit("$rid=").next().unwrap().to_owned();
    c.publish(&format!("$iothub/methods/res/201/?$rid={rid}"), r#"{"ok":true}"#, QoS::AtMostOnce).await;
    let (status, body) = tokio::time::timeout(WAIT, call).await.unwrap().unwrap();
    assert_eq!((status, body), (200, json!({"status": 201, "payload": {"ok": true}})));

    // Subscribed but silent: 504 after the response timeout (5 s is the hub's minimum).
    let (status, headers, _) =
        hub.rest("POST", "/twins/m1/methods", Some(json!({"methodName": "slow", "responseTimeoutInSeconds": 5}))).await;
    assert_eq!(status, 504);
    assert_eq!(headers["iothub-errorcode"], "GatewayTimeout");
    let (status, _, _) = hub.rest("POST", "/twins/m1/methods", Some(json!({"methodName": "bad name"}))).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_method_waits_for_the_device_to_connect() {
    let hub = TestHub::start().await;
    let key = hub.create_device("late").await;
    let call = {
        let http = hub.http.clone();
        let url = hub.url("/twins/late/methods");
        let token = hub.service_token("service");
        tokio::spawn(async move {
            let r = http
                .post(url)
                .header("authorization", token)
                .json(&json!({"methodName": "ping", "connectTimeoutInSeconds": 20}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    let mut c = hub.connect("late", None, &key, true).await;
    c.subscribe(&[("$iothub/methods/POST/#", QoS::AtLeastOnce)]).await;
    let req = c.next_publish().await;
    let rid = req.topic.rsplit("$rid=").next().unwrap().to_owned();
    c.publish(&format!("$iothub/methods/res/200/?$rid={rid}"), "", QoS::AtLeastOnce).await;
    let (status, body) = tokio::time::timeout(WAIT, call).await.unwrap().unwrap();
    assert_eq!((status, body), (200, json!({"status": 200, "payload": null})));
}

#[tokio::test]
async fn modules_have_their_own_telemetry_twin_and_methods() {
    let hub = TestHub::start().await;
    hub.create_device("edge1").await;
    let mkey = hub.create_module("edge1", "filter").await;
    let mut c = hub.connect("edge1", Some("filter"), &mkey, true).await;
    c.subscribe(&[
        ("$iothub/methods/POST/#", QoS::AtLeastOnce),
        ("$iothub/twin/res/#", QoS::AtLeastOnce),
        ("devices/edge1/modules/filter/inputs/#", QoS::AtLeastOnce),
    ])
    .await;
    let pkid = c
        .publish("devices/edge1/modules/filter/messages/events/%24.on=alert&MessageType=Alert", "{}", QoS::AtLeastOnce)
        .await;
    c.puback(pkid).await;
    let events = hub.events("edge1", Some("filter")).await;
    assert_eq!(events["messages"][0]["systemProperties"]["output-name"], "alert");
    assert_eq!(events["messages"][0]["systemProperties"]["iothub-connection-module-id"], "filter");
    assert_eq!(events["messages"][0]["properties"]["MessageType"], "Alert");
    assert_eq!(hub.events("edge1", None).await["received"], 0);

    let (status, _, twin) = hub
        .rest(
            "PATCH",
            "/twins/edge1/modules/filter",
            Some(json!({"properties": {"desired": {"TemperatureThreshold": 30}}})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(twin["moduleId"], "filter");
    c.publish("$iothub/twin/GET/?$rid=1", "", QoS::AtLeastOnce).await;
    let res = c.next_publish().await;
    assert_eq!(
        serde_json::from_slice::<Value>(&res.payload).unwrap()["desired"],
        json!({"TemperatureThreshold": 30, "$version": 2})
    );

    let call = {
        let http = hub.http.clone();
        let url = hub.url("/twins/edge1/modules/filter/methods");
        let token = hub.service_token("iothubowner");
        tokio::spawn(async move {
            http.post(url)
                .header("authorization", token)
                .json(&json!({"methodName": "reset"}))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    let req = c.next_publish().await;
    let rid = req.topic.rsplit("$rid=").next().unwrap().to_owned();
    c.publish(&format!("$iothub/methods/res/200/?$rid={rid}"), "\"done\"", QoS::AtLeastOnce).await;
    assert_eq!(call.await.unwrap(), json!({"status": 200, "payload": "done"}));
    // A module's telemetry may not name its device's topic.
    c.publish("devices/edge1/messages/events/", "{}", QoS::AtLeastOnce).await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn c2d_is_redelivered_until_acknowledged() {
    let hub = TestHub::start().await;
    let key = hub.create_device("c2d").await;
    // A persistent session subscribes, then goes away.
    let mut c = hub.connect("c2d", None, &key, false).await;
    c.subscribe(&[("devices/c2d/messages/devicebound/#", QoS::AtLeastOnce)]).await;
    c.send(Packet::Disconnect).await;
    assert!(c.closed().await);

    let (status, _, sent) = hub
        .rest(
            "POST",
            "/emulator/devices/c2d/messages/deviceBound",
            Some(json!({"body": "hello", "ack": "full", "properties": {"method-name": "GenerateDiagnostics"}})),
        )
        .await;
    assert_eq!(status, 200, "{sent}");
    let (_, _, dev) = hub.rest("GET", "/devices/c2d", None).await;
    assert_eq!(dev["cloudToDeviceMessageCount"], 1);

    // Delivered on reconnect without subscribing again; not acknowledged this time.
    let mut c = hub.connect("c2d", None, &key, false).await;
    let m = c.try_next_publish(false).await.unwrap();
    assert!(m.topic.starts_with("devices/c2d/messages/devicebound/"), "{}", m.topic);
    assert!(m.topic.contains("method-name=GenerateDiagnostics") && m.topic.contains("iothub-ack=full"), "{}", m.topic);
    assert!(m.topic.contains(&format!("%24.mid={}", sent["messageId"].as_str().unwrap())));
    assert_eq!(&m.payload[..], b"hello");
    c.send(Packet::Disconnect).await;
    assert!(c.closed().await);

    // Redelivered, acknowledged, gone.
    let mut c = hub.connect("c2d", None, &key, false).await;
    let again = c.next_publish().await;
    assert_eq!(&again.payload[..], b"hello");
    c.send(Packet::PingReq).await;
    assert!(matches!(c.recv().await, Some(Packet::PingResp)));
    let (_, _, dev) = hub.rest("GET", "/devices/c2d", None).await;
    assert_eq!(dev["cloudToDeviceMessageCount"], 0);
    let (status, _, purge) = hub.rest("DELETE", "/devices/c2d/commands", None).await;
    assert_eq!((status, &purge["totalMessagesPurged"]), (200, &json!(0)));
}

#[tokio::test]
async fn mqtt_over_websockets_uses_the_same_routes() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let hub = TestHub::start().await;
    let key = hub.create_device("ws1").await;
    let mut req = format!("wss://localhost:{}/$iothub/websocket", hub.info.https_port).into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", "MQTT".parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(hub.info.https_addr).await.unwrap();
    let connector = tokio_tungstenite::Connector::Rustls(hub.tls.clone());
    let (mut ws, resp) =
        tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(connector)).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "MQTT");

    let mut connect = rumqttc::mqttbytes::v4::Connect::new("ws1");
    connect.set_login(
        fleetsim::iot::username::hub_username("localhost", "ws1", None, None),
        hub.device_token("ws1", None, &key, common::future(600)),
    );
    let mut publish = rumqttc::mqttbytes::v4::Publish::new("devices/ws1/messages/events/", QoS::AtLeastOnce, "over ws");
    publish.pkid = 9;
    let mut out = bytes::BytesMut::new();
    Packet::Connect(connect).write(&mut out, usize::MAX).unwrap();
    Packet::Publish(publish).write(&mut out, usize::MAX).unwrap();
    // Split across frames on purpose: MQTT packets need not align with WebSocket messages.
    let (a, b) = out.split_at(7);
    ws.send(Message::Binary(bytes::Bytes::copy_from_slice(a))).await.unwrap();
    ws.send(Message::Binary(bytes::Bytes::copy_from_slice(b))).await.unwrap();
    let mut inbound = bytes::BytesMut::new();
    let mut got = Vec::new();
    while got.len() < 2 {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        inbound.extend_from_slice(&msg.into_data());
        while let Ok(p) = Packet::read(&mut inbound, 1 << 20) {
            got.push(p);
        }
    }
    assert!(matches!(&got[0], Packet::ConnAck(a) if a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success));
    assert!(matches!(&got[1], Packet::PubAck(a) if a.pkid == 9));
    assert_eq!(hub.events("ws1", None).await["messages"][0]["body"], "over ws");
}
