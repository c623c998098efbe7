//! Issue 13: the Event Hubs-compatible endpoint over real AMQP 1.0 and TLS, with `fe2o3-amqp` as
//! the client. Telemetry a device sends over MQTT reaches a partition reader with the annotations
//! IoT Hub adds; SASL PLAIN (token or key) and `$cbs` put-token authorize, anything else is
//! refused with Azure's errors (`amqp:unauthorized-access`, status 401); a claim that expires ends
//! the links it admitted; selector filters and `$management` reads work. Every wait is bounded.

use fleetsim_testkit as common;

use std::time::Duration;

use common::{TestHub, future};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{AmqpValue, ApplicationProperties, Body, Message, MessageId, Properties, Source};
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};
use fe2o3_amqp::{Connection, Session};
use fleetsim::iot::sas::{Key, sign_token};
use rumqttc::mqttbytes::QoS;
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Longest any single AMQP step may take before the test fails.
const STEP: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

async fn open(hub: &TestHub, sasl: SaslProfile) -> Result<ConnectionHandle<()>, String> {
    let addr = hub.info.amqp_addr.expect("the AMQP listener is on");
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(hub.tls.clone()).connect("localhost".try_into().unwrap(), tcp).await.unwrap();
    within(
        "open",
        Connection::builder().container_id("test").hostname("localhost").sasl_profile(sasl).open_with_stream(tls),
    )
    .await
    .map_err(|e| format!("{e:?}"))
}

fn plain_with_token(hub: &TestHub, policy: &str) -> SaslProfile {
    SaslProfile::Plain {
        username: format!("{policy}@sas.root.{}", hub.info.eventhub_name),
        password: hub.service_token(policy),
    }
}

fn partition_address(hub: &TestHub, group: &str, device: &str) -> String {
    let p = hub.state().eventhub.partition_for(device);
    format!("amqps://localhost/{}/ConsumerGroups/{group}/Partitions/{p}", hub.info.eventhub_name)
}

fn selector(expr: &str) -> Source {
    let filter = Described { descriptor: Descriptor::Code(0x0000_0137_0000_000A), value: Value::String(expr.into()) };
    Source::builder().address("x").add_to_filter("apache.org:selector-filter:string", filter).build()
}

async fn reader(session: &mut SessionHandle<()>, address: &str, filter: Option<&str>) -> Result<Receiver, String> {
    let mut source = match filter {
        Some(f) => selector(f),
        None => Source::builder().build(),
    };
    source.address = Some(address.to_owned());
    within("attach", Receiver::builder().name(format!("r-{address}")).source(source).target("me").attach(session))
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn next(r: &mut Receiver) -> Result<Message<Body<Value>>, String> {
    let d = within("an event", r.recv::<Body<Value>>()).await.map_err(|e| format!("{e:?}"))?;
    r.accept(&d).await.map_err(|e| format!("{e:?}"))?;
    Ok(d.into_message())
}

fn annotation<'m>(m: &'m Message<Body<Value>>, name: &str) -> Option<&'m Value> {
    m.message_annotations.as_ref()?.0.get(&OwnedKey::Symbol(Symbol::from(name)))
}

fn body(m: &Message<Body<Value>>) -> Vec<u8> {
    match &m.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.to_vec()).collect(),
        other => panic!("expected data sections, got {other:?}"),
    }
}

/// A request on `$cbs`/`$management` and its answer (status code, body).
async fn request(session: &mut SessionHandle<()>, node: &str, props: &[(&str, &str)], body: Value) -> (i64, Value) {
    let mut sender = within("request link", Sender::attach(session, format!("{node}-req"), node)).await.unwrap();
    let reply_to = format!("{node}-reply");
    let source = Source::builder().address(node).build();
    let mut receiver = within(
        "reply link",
        Receiver::builder().name(format!("{node}-resp")).source(source).target(reply_to.clone()).attach(session),
    )
    .await
    .unwrap();
    let mut app = ApplicationProperties::default();
    for (k, v) in props {
        app.0.insert((*k).to_owned(), SimpleValue::String((*v).to_owned()));
    }
    let msg = Message::builder()
        .properties(Properties {
            message_id: Some(MessageId::String("req-1".into())),
            reply_to: Some(reply_to),
            ..Default::default()
        })
        .application_properties(app)
        .body(Body::Value(AmqpValue(body)))
        .build();
    within("request sent", sender.send(msg)).await.unwrap();
    let answer = next(&mut receiver).await.unwrap();
    let correlation = answer.properties.as_ref().and_then(|p| p.correlation_id.clone());
    assert_eq!(correlation, Some(MessageId::String("req-1".into())), "the answer names the request");
    let status = match answer.application_properties.as_ref().and_then(|a| a.0.get("status-code")) {
        Some(SimpleValue::Int(c)) => i64::from(*c),
        other => panic!("no status-code: {other:?}"),
    };
    let _ = sender.close().await;
    let _ = receiver.close().await;
    let value = match answer.body {
        Body::Value(v) => v.0,
        _ => Value::Null,
    };
    (status, value)
}

/// A hub whose endpoint carries telemetry only (no twin, lifecycle or connection events), for
/// tests that count sequence numbers.
fn telemetry_only(c: &mut fleetsim::hub::config::HubConfig) {
    c.behaviour.eventhub_twin_change_events = false;
    c.behaviour.eventhub_device_lifecycle_events = false;
    c.behaviour.eventhub_connection_state_events = false;
}

fn app_str<'m>(m: &'m Message<Body<Value>>, key: &str) -> Option<&'m str> {
    match m.application_properties.as_ref()?.0.get(key)? {
        SimpleValue::String(s) => Some(s),
        _ => None,
    }
}

fn json_body(m: &Message<Body<Value>>) -> serde_json::Value {
    serde_json::from_slice(&body(m)).expect("a JSON body")
}

async fn put_token(session: &mut SessionHandle<()>, audience: &str, token: String) -> i64 {
    let props = [("operation", "put-token"), ("type", "servicebus.windows.net:sastoken"), ("name", audience)];
    request(session, "$cbs", &props, Value::String(token)).await.0
}

#[tokio::test]
async fn mqtt_telemetry_reaches_an_amqp_partition_reader_with_iot_hub_annotations() {
    let hub = TestHub::start_with(telemetry_only).await;
    let key = hub.create_device("d1").await;
    let module_key = hub.create_module("d1", "m1").await;
    let mut device = hub.connect("d1", None, &key, true).await;
    device
        .publish(
            "devices/d1/messages/events/%24.mid=msg-1&%24.ct=application%2Fjson&alert=high",
            "{\"t\":1}",
            QoS::AtLeastOnce,
        )
        .await;
    let mut module = hub.connect("d1", Some("m1"), &module_key, true).await;
    module.publish("devices/d1/modules/m1/messages/events/", "from the module", QoS::AtLeastOnce).await;

    let mut conn = open(&hub, plain_with_token(&hub, "service")).await.expect("SASL PLAIN with a service token");
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut r = reader(&mut session, &partition_address(&hub, "$Default", "d1"), None).await.unwrap();
    let first = next(&mut r).await.unwrap();
    assert_eq!(body(&first), b"{\"t\":1}");
    assert_eq!(annotation(&first, "x-opt-sequence-number"), Some(&Value::Long(0)));
    assert_eq!(annotation(&first, "x-opt-offset"), Some(&Value::String("0".into())));
    assert!(matches!(annotation(&first, "x-opt-enqueued-time"), Some(Value::Timestamp(_))));
    assert!(matches!(annotation(&first, "iothub-enqueuedtime"), Some(Value::Timestamp(_))));
    assert_eq!(annotation(&first, "iothub-connection-device-id"), Some(&Value::String("d1".into())));
    assert_eq!(annotation(&first, "iothub-connection-module-id"), None);
    assert_eq!(annotation(&first, "iothub-message-source"), Some(&Value::String("Telemetry".into())));
    let props = first.properties.as_ref().unwrap();
    assert_eq!(props.message_id, Some(MessageId::String("msg-1".into())));
    assert_eq!(props.content_type.as_ref().map(|s| s.as_str()), Some("application/json"));
    let app = &first.application_properties.as_ref().unwrap().0;
    assert_eq!(app.get("alert"), Some(&SimpleValue::String("high".into())));

    let second = next(&mut r).await.unwrap();
    assert_eq!(body(&second), b"from the module");
    assert_eq!(
        annotation(&second, "x-opt-sequence-number"),
        Some(&Value::Long(1)),
        "the same device, the same partition"
    );
    assert_eq!(annotation(&second, "iothub-connection-module-id"), Some(&Value::String("m1".into())));

    // Another consumer group reads the same events independently, from a selector position.
    let mut r2 = reader(
        &mut session,
        &partition_address(&hub, "analytics", "d1"),
        Some("amqp.annotation.x-opt-sequence-number > '0'"),
    )
    .await
    .unwrap();
    let only = next(&mut r2).await.unwrap();
    assert_eq!(annotation(&only, "x-opt-sequence-number"), Some(&Value::Long(1)));
    let _ = conn.close().await;
}

#[tokio::test]
async fn links_need_a_claim_and_end_when_it_expires() {
    let hub = TestHub::start().await;
    let name = hub.info.eventhub_name.clone();
    let address = partition_address(&hub, "$Default", "d1");

    let refused = open(
        &hub,
        SaslProfile::Plain {
            username: "service@sas.root.localhost".into(),
            password: "SharedAccessSignature sr=x".into(),
        },
    )
    .await;
    assert!(refused.is_err(), "a bad SASL PLAIN password fails the connection");
    let refused =
        open(&hub, SaslProfile::Plain { username: "service".into(), password: "bm90IHRoZSBrZXk=".into() }).await;
    assert!(refused.is_err(), "a wrong policy key fails the connection");

    let mut conn = open(&hub, SaslProfile::Anonymous).await.expect("ANONYMOUS is offered");
    let mut session = Session::begin(&mut conn).await.unwrap();
    let denied = match reader(&mut session, &address, None).await {
        Err(e) => e,
        Ok(mut r) => next(&mut r).await.expect_err("no claim, no events"),
    };
    assert!(denied.contains("UnauthorizedAccess"), "{denied}");

    let key = hub.policy_key("service");
    let audience = format!("sb://localhost/{name}");
    let wrong_key = sign_token(&audience, &Key::from_bytes(b"guess".to_vec()), future(60), Some("service"));
    assert_eq!(put_token(&mut session, &audience, wrong_key).await, 401);
    let elsewhere = sign_token("sb://elsewhere/x", &key, future(60), Some("service"));
    assert_eq!(put_token(&mut session, "sb://elsewhere/x", elsewhere).await, 401);
    let no_service_connect = sign_token(&audience, &hub.policy_key("registryRead"), future(60), Some("registryRead"));
    assert_eq!(put_token(&mut session, &audience, no_service_connect).await, 200, "a valid token is accepted");
    let denied = match reader(&mut session, &address, None).await {
        Err(e) => e,
        Ok(mut r) => next(&mut r).await.expect_err("registryRead cannot read events"),
    };
    assert!(denied.contains("UnauthorizedAccess"), "{denied}");

    // A short-lived token admits the link; when it runs out, the link is closed.
    let short = sign_token(&audience, &key, future(2), Some("service"));
    assert_eq!(put_token(&mut session, &audience, short).await, 200);
    let mut r = reader(&mut session, &address, None).await.expect("the claim admits the link");
    let ended = next(&mut r).await.expect_err("the link ends when its claim expires");
    assert!(ended.contains("UnauthorizedAccess"), "{ended}");
    let _ = conn.close().await;
}

#[tokio::test]
async fn management_reads_the_endpoint_and_partitions_and_bad_addresses_are_refused() {
    let hub = TestHub::start_with(|c| {
        telemetry_only(c);
        c.behaviour.eventhub_partitions = 2;
    })
    .await;
    let name = hub.info.eventhub_name.clone();
    let key = hub.create_device("d1").await;
    let mut device = hub.connect("d1", None, &key, true).await;
    device.publish("devices/d1/messages/events/", "x", QoS::AtLeastOnce).await;
    let p = hub.state().eventhub.partition_for("d1").to_string();

    let mut conn = open(&hub, plain_with_token(&hub, "iothubowner")).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let read = |ty: &'static str| [("operation", "READ"), ("type", ty), ("name", name.as_str())];
    let (status, info) = request(&mut session, "$management", &read("com.microsoft:eventhub"), Value::Null).await;
    assert_eq!(status, 200);
    let Value::Map(m) = info else { panic!("a map") };
    assert_eq!(m.get(&Value::String("name".into())), Some(&Value::String(name.clone())));
    let ids = m.get(&Value::String("partition_ids".into())).expect("partition_ids");
    assert_eq!(format!("{ids:?}").matches("String").count(), 2, "{ids:?}");

    common::wait_until("the event is in its partition", || async {
        hub.state().eventhub.info(p.parse().unwrap(), std::time::SystemTime::now()).last_enqueued_sequence_number == 0
    })
    .await;
    let mut props = read("com.microsoft:partition").to_vec();
    props.push(("partition", p.as_str()));
    let (status, info) = request(&mut session, "$management", &props, Value::Null).await;
    assert_eq!(status, 200);
    let Value::Map(m) = info else { panic!("a map") };
    assert_eq!(m.get(&Value::String("last_enqueued_sequence_number".into())), Some(&Value::Long(0)));
    assert_eq!(m.get(&Value::String("is_partition_empty".into())), Some(&Value::Bool(false)));
    props.pop();
    props.push(("partition", "7"));
    assert_eq!(request(&mut session, "$management", &props, Value::Null).await.0, 404);
    let other = [("operation", "READ"), ("type", "com.microsoft:eventhub"), ("name", "nothere")];
    assert_eq!(request(&mut session, "$management", &other, Value::Null).await.0, 404);

    for (address, filter, condition) in [
        (format!("amqps://localhost/{name}/ConsumerGroups/$Default/Partitions/9"), None, "NotFound"),
        ("amqps://localhost/other/ConsumerGroups/$Default/Partitions/0".to_owned(), None, "NotFound"),
        (format!("{name}/Partitions/0"), None, "NotFound"),
        (
            format!("amqps://localhost/{name}/ConsumerGroups/$Default/Partitions/0"),
            Some("amqp.annotation.x-opt-offset > 12"),
            "InvalidField",
        ),
    ] {
        let e = match reader(&mut session, &address, filter).await {
            Err(e) => e,
            Ok(mut r) => next(&mut r).await.expect_err("refused"),
        };
        assert!(e.contains(condition), "{address} {filter:?}: {e}");
    }
    let _ = conn.close().await;
}

#[tokio::test]
async fn c2d_sent_over_amqp_reaches_the_mqtt_device_and_bad_messages_are_rejected() {
    use fe2o3_amqp::types::messaging::Outcome;
    let hub = TestHub::start().await;
    let key = hub.create_device("c2d").await;
    let mut device = hub.connect("c2d", None, &key, true).await;
    device.subscribe(&[("devices/c2d/messages/devicebound/#", QoS::AtLeastOnce)]).await;

    let mut conn = open(&hub, plain_with_token(&hub, "service")).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut sender =
        within("attach", Sender::attach(&mut session, "c2d", "amqps://localhost/messages/devicebound")).await.unwrap();
    let message = |to: &str, ack: &str| {
        let mut app = ApplicationProperties::default();
        app.0.insert("color".into(), SimpleValue::String("blue".into()));
        app.0.insert("iothub-ack".into(), SimpleValue::String(ack.into()));
        Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::String("c2d-1".into())),
                to: Some(to.to_owned()),
                ..Default::default()
            })
            .application_properties(app)
            .body(Body::Value(AmqpValue(Value::String("hello".into()))))
            .build()
    };
    let outcome = within("send", sender.send(message("/devices/c2d/messages/devicebound", "full"))).await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    let p = within("the C2D publish", device.next_publish()).await;
    assert_eq!(&p.payload[..], b"hello");
    let topic = p.topic.clone();
    assert!(
        topic.contains("color=blue") && topic.contains("%24.mid=c2d-1") && topic.contains("iothub-ack=full"),
        "{topic}"
    );

    for (to, ack, condition) in [
        ("/devices/nobody/messages/devicebound", "none", "NotFound"),
        ("/devices/c2d/messages/events", "none", "InvalidField"),
        ("/devices/c2d/messages/devicebound", "sometimes", "InvalidField"),
    ] {
        let outcome = within("send", sender.send(message(to, ack))).await;
        let text = format!("{outcome:?}");
        assert!(text.contains("Rejected") && text.contains(condition), "{to} {ack}: {text}");
    }
    let _ = sender.close().await;

    // Without a claim the link is refused.
    let mut anon = open(&hub, SaslProfile::Anonymous).await.unwrap();
    let mut session = Session::begin(&mut anon).await.unwrap();
    let refused =
        match within("attach", Sender::attach(&mut session, "c2d", "amqps://localhost/messages/devicebound")).await {
            Err(e) => format!("{e:?}"),
            Ok(mut s) => {
                format!("{:?}", within("send", s.send(message("/devices/c2d/messages/devicebound", "none"))).await)
            }
        };
    assert!(refused.contains("UnauthorizedAccess") || refused.contains("Detached"), "{refused}");
    let _ = conn.close().await;
}

#[tokio::test]
async fn twin_lifecycle_and_connection_events_reach_the_endpoint_as_iot_hub_routes_them() {
    use serde_json::json;
    let hub = TestHub::start().await;
    let key = hub.create_device("ev1").await;
    let mut device = hub.connect("ev1", None, &key, true).await;
    device.subscribe(&[("$iothub/twin/res/#", QoS::AtLeastOnce)]).await;
    device.publish("$iothub/twin/PATCH/properties/reported/?$rid=p1", r#"{"fw":"1.2"}"#, QoS::AtLeastOnce).await;
    assert_eq!(device.next_publish().await.topic, "$iothub/twin/res/204/?$rid=p1&$version=2");
    let (status, _, _) = hub
        .rest("PATCH", "/twins/ev1", Some(json!({"properties": {"desired": {"rate": 5}}, "tags": {"site": "a"}})))
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = hub.rest("PUT", "/twins/ev1", Some(json!({"properties": {"desired": {"only": true}}}))).await;
    assert_eq!(status, 200);
    device.send(rumqttc::mqttbytes::v4::Packet::Disconnect).await;
    assert!(device.closed().await);
    common::wait_until("the disconnect is seen", || async {
        hub.state().registry.get("ev1", None).is_some_and(|i| i.lock().session.is_none())
    })
    .await;
    let (status, _, _) = hub.rest("DELETE", "/devices/ev1", None).await;
    assert_eq!(status, 204);

    let mut conn = open(&hub, plain_with_token(&hub, "service")).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut r = reader(&mut session, &partition_address(&hub, "$Default", "ev1"), None).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..7 {
        seen.push(next(&mut r).await.unwrap());
    }
    let kinds: Vec<(String, String, String)> = seen
        .iter()
        .map(|m| {
            let source = match annotation(m, "iothub-message-source") {
                Some(Value::String(s)) => s.clone(),
                other => panic!("no source: {other:?}"),
            };
            (source, app_str(m, "iothub-message-schema").unwrap().to_owned(), app_str(m, "opType").unwrap().to_owned())
        })
        .collect();
    let k = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
    assert_eq!(
        kinds,
        [
            k("deviceLifecycleEvents", "deviceLifecycleNotification", "createDeviceIdentity"),
            k("deviceConnectionStateEvents", "deviceConnectionStateNotification", "deviceConnected"),
            k("twinChangeEvents", "twinChangeNotification", "updateTwin"),
            k("twinChangeEvents", "twinChangeNotification", "updateTwin"),
            k("twinChangeEvents", "twinChangeNotification", "replaceTwin"),
            k("deviceConnectionStateEvents", "deviceConnectionStateNotification", "deviceDisconnected"),
            k("deviceLifecycleEvents", "deviceLifecycleNotification", "deleteDeviceIdentity"),
        ]
    );
    for m in &seen {
        assert_eq!(annotation(m, "iothub-connection-device-id"), Some(&Value::String("ev1".into())));
        assert_eq!(
            (app_str(m, "hubName"), app_str(m, "deviceId")),
            (Some(hub.info.eventhub_name.as_str()), Some("ev1"))
        );
        assert!(app_str(m, "operationTimestamp").is_some_and(|t| t.ends_with('Z')));
        let props = m.properties.as_ref().expect("system properties");
        assert_eq!(props.content_type.as_ref().map(|s| s.as_str()), Some("application/json"));
        assert_eq!(props.content_encoding.as_ref().map(|s| s.as_str()), Some("utf-8"));
        assert!(props.correlation_id.is_some());
    }
    let created = json_body(&seen[0]);
    assert_eq!((created["deviceId"].as_str(), created["version"].as_u64()), (Some("ev1"), Some(1)));
    assert_eq!(created["properties"]["reported"]["$version"], 1);
    let reported = json_body(&seen[2]);
    assert_eq!(reported["version"], 2, "the twin's version after the patch");
    assert_eq!(reported["properties"]["reported"]["fw"], "1.2");
    assert_eq!(reported["properties"]["reported"]["$version"], 2);
    assert!(reported["properties"]["reported"]["$metadata"]["fw"]["$lastUpdated"].is_string());
    let desired = json_body(&seen[3]);
    assert_eq!(desired["properties"]["desired"]["rate"], 5);
    assert_eq!(desired["properties"]["desired"]["$version"], 2);
    assert_eq!(desired["tags"], json!({"site": "a"}));
    let replaced = json_body(&seen[4]);
    assert_eq!(replaced["properties"]["desired"]["only"], true);
    assert!(replaced["properties"]["desired"].get("rate").is_none(), "a replace carries the whole section");
    assert_eq!(replaced["tags"], json!({}));
    let seq = |m: &Message<Body<Value>>| json_body(m)["sequenceNumber"].as_str().unwrap().to_owned();
    assert!(seq(&seen[1]) < seq(&seen[5]));
    let _ = conn.close().await;
}

#[tokio::test]
async fn switched_off_sources_leave_only_telemetry() {
    let hub = TestHub::start_with(telemetry_only).await;
    let key = hub.create_device("quiet").await;
    let mut device = hub.connect("quiet", None, &key, true).await;
    device.subscribe(&[("$iothub/twin/res/#", QoS::AtLeastOnce)]).await;
    device.publish("$iothub/twin/PATCH/properties/reported/?$rid=p1", r#"{"x":1}"#, QoS::AtLeastOnce).await;
    device.next_publish().await;
    device.publish("devices/quiet/messages/events/", "t", QoS::AtLeastOnce).await;
    let p = hub.state().eventhub.partition_for("quiet");
    common::wait_until("the telemetry is in its partition", || async {
        hub.state().eventhub.info(p, std::time::SystemTime::now()).last_enqueued_sequence_number == 0
    })
    .await;
    let events = hub.state().eventhub.read(p, 0, 10, std::time::SystemTime::now());
    assert_eq!(events.len(), 1, "only the telemetry");
    assert_eq!(events[0].message.source, fleetsim::hub::telemetry::Source::Telemetry);
}

#[tokio::test]
async fn c2d_feedback_reaches_the_feedback_receiver_for_the_outcomes_each_sender_asked_for() {
    use fe2o3_amqp::types::messaging::Outcome;
    use fe2o3_amqp::types::primitives::Timestamp;
    let hub = TestHub::start_with(telemetry_only).await;
    let key = hub.create_device("fb").await;
    hub.create_device("off").await;
    let mut device = hub.connect("fb", None, &key, true).await;
    device.subscribe(&[("devices/fb/messages/devicebound/#", QoS::AtLeastOnce)]).await;

    let mut conn = open(&hub, plain_with_token(&hub, "service")).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut sender =
        within("attach", Sender::attach(&mut session, "c2d", "amqps://localhost/messages/devicebound")).await.unwrap();
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let message = |device: &str, id: &str, ack: &str, ttl_ms: Option<i64>| {
        let mut app = ApplicationProperties::default();
        app.0.insert("iothub-ack".into(), SimpleValue::String(ack.into()));
        Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::String(id.into())),
                to: Some(format!("/devices/{device}/messages/devicebound")),
                absolute_expiry_time: ttl_ms.map(|t| Timestamp::from_milliseconds(now_ms() + t)),
                ..Default::default()
            })
            .application_properties(app)
            .body(Body::Value(AmqpValue(Value::String(id.into()))))
            .build()
    };
    for m in [
        message("fb", "m-ok", "full", None),
        message("fb", "m-none", "none", None),
        message("off", "m-pos", "positive", Some(1000)),
        message("off", "m-neg", "negative", Some(1000)),
        message("off", "m-purge", "full", None),
    ] {
        let outcome = within("send", sender.send(m)).await.unwrap();
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    }
    // The connected device takes (and acknowledges) both of its messages.
    for _ in 0..2 {
        within("the C2D publish", device.next_publish()).await;
    }
    common::wait_until("the offline device's messages expire", || async {
        hub.state().registry.get("off", None).is_some_and(|i| i.lock().c2d.len() == 1)
    })
    .await;
    let (status, _, purged) = hub.rest("DELETE", "/devices/off/commands", None).await;
    assert_eq!((status, purged["totalMessagesPurged"].as_u64()), (200, Some(1)));

    let source = Source::builder().address("amqps://localhost/messages/serviceBound/feedback").build();
    let mut r =
        within("feedback link", Receiver::builder().name("fb").source(source).target("me").attach(&mut session))
            .await
            .unwrap();
    // Released: the records come back in a later message.
    let first = within("a feedback message", r.recv::<Body<Value>>()).await.unwrap();
    let released: Vec<serde_json::Value> = serde_json::from_slice(&body(first.message())).unwrap();
    r.release(&first).await.unwrap();
    let mut records = Vec::new();
    while records.len() < 3 {
        let m = next(&mut r).await.unwrap();
        let props = m.properties.as_ref().unwrap();
        assert_eq!(
            props.content_type.as_ref().map(|s| s.as_str()),
            Some("application/vnd.microsoft.iothub.feedback.json")
        );
        let batch: Vec<serde_json::Value> = serde_json::from_slice(&body(&m)).expect("a JSON array");
        records.extend(batch);
    }
    assert!(released.iter().all(|r| records.contains(r)), "released records are delivered again");
    let mut got: Vec<(String, String, String)> = records
        .iter()
        .map(|r| {
            for field in ["deviceGenerationId", "enqueuedTimeUtc", "description"] {
                assert!(r[field].is_string(), "{field} in {r}");
            }
            let s = |k: &str| r[k].as_str().unwrap().to_owned();
            (s("originalMessageId"), s("deviceId"), s("statusCode"))
        })
        .collect();
    got.sort();
    let t = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
    assert_eq!(
        got,
        [t("m-neg", "off", "Expired"), t("m-ok", "fb", "Success"), t("m-purge", "off", "Purged")],
        "no record for ack=none, nor for a positive-only message that expired"
    );
    assert!(hub.state().feedback.is_empty());
    let _ = conn.close().await;
}

#[tokio::test]
async fn a_start_past_the_end_is_refused_and_consumer_groups_come_from_the_config() {
    let hub = TestHub::start_with(|c| {
        telemetry_only(c);
        c.behaviour.eventhub_consumer_groups = vec!["analytics".into()];
    })
    .await;
    let key = hub.create_device("pe").await;
    let mut device = hub.connect("pe", None, &key, true).await;
    for i in 0..3 {
        device.publish("devices/pe/messages/events/", format!("m{i}"), QoS::AtLeastOnce).await;
    }
    let p = hub.state().eventhub.partition_for("pe");
    common::wait_until("three events", || async {
        hub.state().eventhub.info(p, std::time::SystemTime::now()).last_enqueued_sequence_number == 2
    })
    .await;
    let mut conn = open(&hub, plain_with_token(&hub, "service")).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let address = |group: &str| partition_address(&hub, group, "pe");

    let refused =
        match reader(&mut session, &address("$Default"), Some("amqp.annotation.x-opt-sequence-number > '5'")).await {
            Err(e) => e,
            Ok(mut r) => next(&mut r).await.expect_err("past the end"),
        };
    assert!(
        refused.contains("com.microsoft:argument-error")
            && refused
                .contains("The supplied sequence number '5' is invalid. The last sequence number in the system is '2'"),
        "{refused}"
    );
    // Just past the last event is where new events will come: allowed.
    let mut r =
        reader(&mut session, &address("analytics"), Some("amqp.annotation.x-opt-sequence-number > '1'")).await.unwrap();
    let m = next(&mut r).await.unwrap();
    assert_eq!(annotation(&m, "x-opt-sequence-number"), Some(&Value::Long(2)));
    let unknown = match reader(&mut session, &address("nobody"), None).await {
        Err(e) => e,
        Ok(mut r) => next(&mut r).await.expect_err("an unknown consumer group"),
    };
    assert!(unknown.contains("NotFound"), "{unknown}");
    let _ = conn.close().await;
}

#[tokio::test]
async fn amqp_over_websockets_answers_on_both_paths_and_needs_its_subprotocol() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Ws;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let hub = TestHub::start().await;
    let connect = |path: &'static str, protocol: &'static str| {
        let hub = &hub;
        async move {
            let mut req = format!("wss://localhost:{}{path}", hub.info.https_port).into_client_request().unwrap();
            req.headers_mut().insert("sec-websocket-protocol", protocol.parse().unwrap());
            let tcp = TcpStream::connect(hub.info.https_addr).await.unwrap();
            let connector = tokio_tungstenite::Connector::Rustls(hub.tls.clone());
            tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(connector)).await
        }
    };
    for path in ["/$servicebus/websocket", "/$servicebus/websocket/", "/$iothub/websocket"] {
        let (mut ws, resp) = within("upgrade", connect(path, "AMQPWSB10")).await.unwrap();
        assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "AMQPWSB10", "{path}");
        ws.send(Ws::Binary(bytes::Bytes::from_static(b"AMQP\x03\x01\x00\x00"))).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 8 {
            match within("the SASL header back", ws.next()).await {
                Some(Ok(Ws::Binary(b))) => got.extend_from_slice(&b),
                other => panic!("{path}: {other:?}"),
            }
        }
        assert_eq!(&got[..8], b"AMQP\x03\x01\x00\x00", "{path}: the hub answers as an AMQP SASL peer");
    }
    let refused = within("upgrade", connect("/$servicebus/websocket", "mqtt")).await;
    assert!(format!("{refused:?}").contains("400"), "{refused:?}");
}

/// Every event a partition reader gets from the start of device `device`'s partition, as
/// (sequence number, offset, source, body).
async fn read_partition(hub: &TestHub, device: &str) -> Vec<(Value, Value, Option<Value>, Vec<u8>)> {
    let p = hub.state().eventhub.partition_for(device);
    let info = hub.state().eventhub.info(p, std::time::SystemTime::now());
    let count = (info.last_enqueued_sequence_number - info.begin_sequence_number + 1).max(0);
    let mut conn = open(hub, plain_with_token(hub, "service")).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut r = reader(&mut session, &partition_address(hub, "$Default", device), None).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..count {
        let m = next(&mut r).await.unwrap();
        let a = |k| annotation(&m, k).cloned();
        got.push((
            a("x-opt-sequence-number").unwrap(),
            a("x-opt-offset").unwrap(),
            a("iothub-message-source"),
            body(&m),
        ));
    }
    let _ = conn.close().await;
    got
}

/// Issue 15: the endpoint's retained events (telemetry and the hub's own events) and the C2D
/// feedback the service has not received are kept across a restart, with the same sequence
/// numbers and offsets, and numbering goes on where it stopped; PUBACKs keep their order when
/// some wait for the store (MQTT 3.1.1 §4.6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_events_and_unread_feedback_survive_a_restart() {
    use fe2o3_amqp::types::messaging::Outcome;
    use rumqttc::mqttbytes::v4::Packet;
    let mut hub = TestHub::start().await;
    let key = hub.create_device("d1").await;
    hub.create_device("off").await;
    let mut device = hub.connect("d1", None, &key, true).await;
    // Telemetry, a reported patch (written to the store as well) and telemetry again: the
    // PUBACKs come back in the order of the PUBLISHes.
    // The three go out in one write, so the hub reads them together and the patch's commit
    // cannot finish between them.
    let mut out = bytes::BytesMut::new();
    let mut ids = Vec::new();
    for (topic, payload) in [
        ("devices/d1/messages/events/", "first"),
        ("$iothub/twin/PATCH/properties/reported/?$rid=1", "{\"fw\":\"2\"}"),
        ("devices/d1/messages/events/k=v", "second"),
    ] {
        let mut p = rumqttc::mqttbytes::v4::Publish::new(topic, QoS::AtLeastOnce, payload);
        p.pkid = device.pkid();
        ids.push(p.pkid);
        p.write(&mut out).unwrap();
    }
    device.send_raw(&out).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let mut acks = Vec::new();
    while acks.len() < 3 {
        match within("PUBACKs", device.recv()).await {
            Some(Packet::PubAck(p)) => acks.push(p.pkid),
            Some(_) => {}
            None => panic!("closed before every PUBACK"),
        }
    }
    assert_eq!(acks, [a, b, c]);

    // A C2D message with full feedback for a device that never connects, purged: one record.
    let mut conn = open(&hub, plain_with_token(&hub, "service")).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut sender =
        within("attach", Sender::attach(&mut session, "c2d", "amqps://localhost/messages/devicebound")).await.unwrap();
    let mut app = ApplicationProperties::default();
    app.0.insert("iothub-ack".into(), SimpleValue::String("full".into()));
    let m = Message::builder()
        .properties(Properties {
            message_id: Some(MessageId::String("m-kept".into())),
            to: Some("/devices/off/messages/devicebound".into()),
            ..Default::default()
        })
        .application_properties(app)
        .body(Body::Value(AmqpValue(Value::String("x".into()))))
        .build();
    assert!(matches!(within("send", sender.send(m)).await.unwrap(), Outcome::Accepted(_)));
    let _ = conn.close().await;
    assert_eq!(hub.rest("DELETE", "/devices/off/commands", None).await.0, 200);
    assert_eq!(hub.state().feedback.len(), 1);

    let before = read_partition(&hub, "d1").await;
    let bodies: Vec<&[u8]> =
        before.iter().filter(|e| e.2 == Some(Value::String("Telemetry".into()))).map(|e| &e.3[..]).collect();
    assert_eq!(bodies, [&b"first"[..], b"second"]);
    assert!(before.len() > 2, "the lifecycle, twin and connection events are there too: {before:?}");
    drop(device);
    hub.stop().await;
    let TestHub { dir, .. } = hub;
    let mut hub = TestHub::start_in(dir, |_| {}).await;
    let after = read_partition(&hub, "d1").await;
    assert!(after.len() >= before.len(), "{} events kept of {}", after.len(), before.len());
    assert_eq!(after[..before.len()], before[..], "the same events, numbers and offsets");

    // Numbering goes on from the last event: sequence number + 1, offset + the body's length.
    let mut device = hub.connect("d1", None, &key, true).await;
    let d = device.publish("devices/d1/messages/events/", "third", QoS::AtLeastOnce).await;
    device.puback(d).await;
    let now = read_partition(&hub, "d1").await;
    let third = now.iter().find(|e| e.3 == b"third").expect("the new event");
    let (Value::Long(last_seq), Value::String(last_offset)) = (&before.last().unwrap().0, &before.last().unwrap().1)
    else {
        panic!("numbers")
    };
    let last_len = before.last().unwrap().3.len().max(1) as i64;
    let (Value::Long(seq), Value::String(offset)) = (&third.0, &third.1) else { panic!("numbers") };
    assert!(*seq > *last_seq, "{seq} after {last_seq}");
    assert!(offset.parse::<i64>().unwrap() >= last_offset.parse::<i64>().unwrap() + last_len);
    assert_eq!(now.iter().map(|e| &e.0).collect::<Vec<_>>().windows(2).filter(|w| w[0] == w[1]).count(), 0);

    // The unread feedback record is there; once received it is gone for good.
    assert_eq!(hub.state().feedback.len(), 1, "the record is kept");
    let mut conn = open(&hub, plain_with_token(&hub, "service")).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let source = Source::builder().address("amqps://localhost/messages/serviceBound/feedback").build();
    let mut r =
        within("feedback link", Receiver::builder().name("fb").source(source).target("me").attach(&mut session))
            .await
            .unwrap();
    let m = next(&mut r).await.unwrap();
    let records: Vec<serde_json::Value> = serde_json::from_slice(&body(&m)).unwrap();
    assert_eq!((records.len(), records[0]["originalMessageId"].as_str()), (1, Some("m-kept")));
    assert_eq!(records[0]["statusCode"], "Purged");
    let store = hub.dir.path().join(fleetsim::hub::store::FILE);
    common::wait_until("the received record leaves the store", || async {
        let db = rusqlite::Connection::open(&store).unwrap();
        db.query_row("SELECT count(*) FROM feedback", [], |r| r.get::<_, i64>(0)).unwrap() == 0
    })
    .await;
    let _ = conn.close().await;
    drop(device);
    hub.stop().await;
    let TestHub { dir, .. } = hub;
    let hub = TestHub::start_in(dir, |_| {}).await;
    assert!(hub.state().feedback.is_empty(), "a received record does not come back");
}

/// A store written under another partition count is not loaded into the endpoint (a device's
/// partition is its id's hash modulo the count): it starts empty and numbers from 0.
#[tokio::test]
async fn a_new_partition_count_starts_the_endpoint_afresh() {
    let mut hub = TestHub::start_with(telemetry_only).await;
    let key = hub.create_device("d1").await;
    let mut device = hub.connect("d1", None, &key, true).await;
    let id = device.publish("devices/d1/messages/events/", "old", QoS::AtLeastOnce).await;
    device.puback(id).await;
    assert_eq!(read_partition(&hub, "d1").await.len(), 1);
    drop(device);
    hub.stop().await;
    let TestHub { dir, .. } = hub;
    let hub = TestHub::start_in(dir, |c| {
        telemetry_only(c);
        c.behaviour.eventhub_partitions = 2;
    })
    .await;
    assert!(read_partition(&hub, "d1").await.is_empty());
    let mut device = hub.connect("d1", None, &key, true).await;
    let id = device.publish("devices/d1/messages/events/", "new", QoS::AtLeastOnce).await;
    device.puback(id).await;
    let now = read_partition(&hub, "d1").await;
    assert_eq!((now.len(), &now[0].0, now[0].3.as_slice()), (1, &Value::Long(0), &b"new"[..]));
}

/// `eventhub_durable = false`: the endpoint is not kept, so it starts empty after a restart, and
/// what an earlier run kept is dropped rather than served stale.
#[tokio::test]
async fn an_endpoint_not_kept_starts_empty_after_a_restart() {
    let mut hub = TestHub::start_with(telemetry_only).await;
    let key = hub.create_device("d1").await;
    let mut device = hub.connect("d1", None, &key, true).await;
    let id = device.publish("devices/d1/messages/events/", "kept", QoS::AtLeastOnce).await;
    device.puback(id).await;
    drop(device);
    hub.stop().await;
    let TestHub { dir, .. } = hub;
    let mut hub = TestHub::start_in(dir, |c| {
        telemetry_only(c);
        c.behaviour.eventhub_durable = false;
    })
    .await;
    assert!(read_partition(&hub, "d1").await.is_empty(), "not loaded");
    let mut device = hub.connect("d1", None, &key, true).await;
    let id = device.publish("devices/d1/messages/events/", "not kept", QoS::AtLeastOnce).await;
    device.puback(id).await;
    assert_eq!(read_partition(&hub, "d1").await.len(), 1);
    drop(device);
    hub.stop().await;
    let TestHub { dir, .. } = hub;
    let hub = TestHub::start_in(dir, telemetry_only).await;
    assert!(read_partition(&hub, "d1").await.is_empty(), "neither run's events come back");
}
