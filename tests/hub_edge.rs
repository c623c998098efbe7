//! The emulator as IoT Edge hub, over real TLS: Edge devices get their system modules, a
//! deployment creates modules and sets their twins, bad routes are refused with their column,
//! and module messages go where the `$edgeHub` routes say: another module's input (at least once,
//! kept while it is offline), `$upstream`, or nowhere.

use fleetsim_testkit as common;

use common::{TestHub, poll_until};
use fleetsim::hub::eventhub::Position;
use fleetsim::hub::telemetry::Source;
use fleetsim::iot::property_bag::PropertyBag;
use fleetsim::iot::sas::Key;
use fleetsim::iot::topic::CloudPublish;
use rumqttc::mqttbytes::QoS;
use serde_json::{Value, json};

const TO_FILTER: &str = r#"FROM /messages/modules/tempSensor/outputs/temperatureOutput INTO BrokeredEndpoint("/modules/filterModule/inputs/input1")"#;
const UPSTREAM: &str = "FROM /messages/modules/filterModule/outputs/output1 INTO $upstream";

fn deployment(routes: Value, threshold: f64) -> Value {
    json!({"modulesContent": {
        "$edgeAgent": {"properties.desired": {
            "schemaVersion": "1.1",
            "runtime": {"type": "docker", "settings": {"minDockerVersion": "v1.25"}},
            "systemModules": {
                "edgeAgent": {"type": "docker", "settings": {"image": "mcr.microsoft.com/azureiotedge-agent:1.5"}},
                "edgeHub": {"type": "docker", "status": "running", "restartPolicy": "always",
                            "settings": {"image": "mcr.microsoft.com/azureiotedge-hub:1.5"}}
            },
            "modules": {
                "tempSensor": {"version": "1.0", "type": "docker", "status": "running", "restartPolicy": "always",
                               "settings": {"image": "mcr.microsoft.com/azureiotedge-simulated-temperature-sensor:1.5"}},
                "filterModule": {"version": "1.0", "type": "docker", "status": "running", "restartPolicy": "always",
                                 "settings": {"image": "localhost:5000/filtermodule:0.0.1"}}
            }
        }},
        "$edgeHub": {"properties.desired": {
            "schemaVersion": "1.1",
            "routes": routes,
            "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
        }},
        "filterModule": {"properties.desired": {"TemperatureThreshold": threshold}}
    }})
}

async fn edge_device(hub: &TestHub, id: &str) {
    let (status, _, body) = hub
        .rest("PUT", &format!("/devices/{id}"), Some(json!({"deviceId": id, "capabilities": {"iotEdge": true}})))
        .await;
    assert_eq!(status, 200, "{body}");
}

/// Applies the tutorial deployment with `routes` to edge1; it must be taken.
async fn deploy(hub: &TestHub, routes: Value) {
    let (status, _, body) =
        hub.rest("POST", "/devices/edge1/applyConfigurationContent", Some(deployment(routes, 25.0))).await;
    assert_eq!(status, 204, "{body}");
}

async fn module_key(hub: &TestHub, device: &str, module: &str) -> Key {
    let (status, _, body) = hub.rest("GET", &format!("/devices/{device}/modules/{module}"), None).await;
    assert_eq!(status, 200, "{body}");
    Key::from_base64(body["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap()).unwrap()
}

async fn module_ids(hub: &TestHub, device: &str) -> Vec<String> {
    let (status, _, body) = hub.rest("GET", &format!("/devices/{device}/modules"), None).await;
    assert_eq!(status, 200, "{body}");
    let mut ids: Vec<String> =
        body.as_array().unwrap().iter().map(|m| m["moduleId"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    ids
}

fn reading(temperature: f64) -> String {
    json!({"machine": {"temperature": temperature, "pressure": 1.1}, "timeCreated": "2026-11-29T00:00:00Z"}).to_string()
}

const SENSOR_TOPIC: &str = "devices/edge1/modules/tempSensor/messages/events/%24.on=temperatureOutput&%24.ct=application%2Fjson&%24.ce=utf-8&seq=";

#[tokio::test]
async fn edge_devices_get_system_modules_and_deployments_set_module_twins() {
    let hub = TestHub::start().await;
    edge_device(&hub, "edge1").await;
    assert_eq!(module_ids(&hub, "edge1").await, ["$edgeAgent", "$edgeHub"]);
    // An ordinary device has none, and cannot take a deployment.
    hub.create_device("plain").await;
    assert!(module_ids(&hub, "plain").await.is_empty());
    let (status, _, body) =
        hub.rest("POST", "/devices/plain/applyConfigurationContent", Some(deployment(json!({}), 25.0))).await;
    assert_eq!((status, body["ErrorCode"].as_str()), (400, Some("ArgumentInvalid")), "{body}");
    let (status, _, _) =
        hub.rest("POST", "/devices/nosuch/applyConfigurationContent", Some(deployment(json!({}), 25.0))).await;
    assert_eq!(status, 404);

    let routes =
        json!({"sensorToFilter": TO_FILTER, "filterToIoTHub": {"route": UPSTREAM, "priority": 0, "timeToLiveSecs": 0}});
    deploy(&hub, routes).await;
    assert_eq!(module_ids(&hub, "edge1").await, ["$edgeAgent", "$edgeHub", "filterModule", "tempSensor"]);
    let (_, _, twin) = hub.rest("GET", "/twins/edge1/modules/filterModule", None).await;
    assert_eq!(twin["properties"]["desired"]["TemperatureThreshold"], 25.0);
    let (_, _, twin) = hub.rest("GET", "/twins/edge1/modules/$edgeHub", None).await;
    assert_eq!(twin["properties"]["desired"]["routes"]["sensorToFilter"], TO_FILTER);
    // The deployment's twin writes are twin change events (replaceTwin) on the built-in endpoint,
    // and the modules it created are lifecycle events, as for any other writer.
    let eh = &hub.state().eventhub;
    let now = std::time::SystemTime::now();
    let p = eh.partition_for("edge1");
    let start = eh.start(p, Position::Start, now).unwrap();
    let events = eh.read(p, start, 1000, now);
    let of = |source: Source, module: &str| {
        events
            .iter()
            .filter(|e| e.message.source == source)
            .filter(|e| e.message.application.iter().any(|(k, v)| k == "moduleId" && v.as_deref() == Some(module)))
            .count()
    };
    assert_eq!(of(Source::TwinChangeEvents, "filterModule"), 1, "one replaceTwin for filterModule");
    assert_eq!(of(Source::TwinChangeEvents, "$edgeHub"), 1);
    assert_eq!(of(Source::DeviceLifecycleEvents, "tempSensor"), 1, "tempSensor's creation");

    // A second deployment replaces desired properties (and keeps the modules).
    let (status, _, _) = hub
        .rest("POST", "/devices/edge1/applyConfigurationContent", Some(deployment(json!({"only": UPSTREAM}), 30.0)))
        .await;
    assert_eq!(status, 204);
    let (_, _, twin) = hub.rest("GET", "/twins/edge1/modules/$edgeHub", None).await;
    assert!(twin["properties"]["desired"]["routes"].get("sensorToFilter").is_none(), "{twin}");
    let (_, _, twin) = hub.rest("GET", "/twins/edge1/modules/filterModule", None).await;
    assert_eq!(twin["properties"]["desired"]["TemperatureThreshold"], 30.0);
}

#[tokio::test]
async fn bad_deployments_are_refused_whole_with_the_route_and_column() {
    let hub = TestHub::start().await;
    edge_device(&hub, "edge1").await;
    for (routes, needle) in [
        (json!({"r1": "FROM /messages/* WHERE temperature > 30 INTO $upstream"}), "route r1: at position 36"),
        (json!({"r2": "FROM /messages/* INTO $downstream"}), "route r2: at position 23"),
        (json!({"r3": "FROM messages INTO $upstream"}), "route r3: at position 6"),
        (json!({"r4": 7}), "route r4 must be"),
    ] {
        let (status, _, body) =
            hub.rest("POST", "/devices/edge1/applyConfigurationContent", Some(deployment(routes, 25.0))).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["ErrorCode"], "ArgumentInvalid", "{body}");
        assert!(body["Message"].as_str().unwrap().contains(needle), "{body}");
    }
    // Nothing of a refused deployment was applied.
    assert_eq!(module_ids(&hub, "edge1").await, ["$edgeAgent", "$edgeHub"]);
    for body in [json!({}), json!({"modulesContent": {"m": {"desired": {}}}}), json!({"modulesContent": 5})] {
        let (status, _, reply) = hub.rest("POST", "/devices/edge1/applyConfigurationContent", Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {reply}");
    }
    let (status, text) = hub.http_raw("POST", "/devices/edge1/applyConfigurationContent", "{not json".into()).await;
    assert_eq!(status, 400, "{text}");
}

#[tokio::test]
async fn module_outputs_reach_inputs_and_upstream_as_the_routes_say() {
    let hub = TestHub::start().await;
    edge_device(&hub, "edge1").await;
    let routes = json!({
        "sensorToFilter": TO_FILTER,
        "filterToIoTHub": UPSTREAM,
        "hotOnly": "FROM /messages/modules/tempSensor/* WHERE $body.machine.temperature > 30 INTO BrokeredEndpoint(\"/modules/filterModule/inputs/hot\")"
    });
    deploy(&hub, routes).await;
    let sensor_key = module_key(&hub, "edge1", "tempSensor").await;
    let filter_key = module_key(&hub, "edge1", "filterModule").await;

    let mut filter = hub.connect("edge1", Some("filterModule"), &filter_key, true).await;
    filter.subscribe(&[("devices/edge1/modules/filterModule/inputs/#", QoS::AtLeastOnce)]).await;
    let mut sensor = hub.connect("edge1", Some("tempSensor"), &sensor_key, true).await;

    // A cool reading reaches input1 only; a hot one input1 and hot. Neither goes upstream.
    for (n, t) in [(1, 21.0), (2, 35.5)] {
        let pkid = sensor.publish(&format!("{SENSOR_TOPIC}{n}"), reading(t), QoS::AtLeastOnce).await;
        sensor.puback(pkid).await;
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        // Acknowledged as it arrives.
        let p = filter.next_publish().await;
        let Ok(CloudPublish::ModuleInput { input, properties }) = CloudPublish::parse(&p.topic) else {
            panic!("not an input topic: {}", p.topic)
        };
        assert_eq!(properties.get("$.cdid"), Some("edge1"));
        assert_eq!(properties.get("$.cmid"), Some("tempSensor"));
        assert_eq!(properties.get("$.on"), None, "the output name is not forwarded");
        assert_eq!(properties.get("$.ct"), Some("application/json"));
        got.push((input, properties.get("seq").unwrap().to_owned()));
    }
    got.sort();
    assert_eq!(got, [("hot".into(), "2".into()), ("input1".into(), "1".into()), ("input1".into(), "2".into())]);
    assert_eq!(
        hub.events("edge1", Some("tempSensor")).await["received"],
        0,
        "the sensor's readings are not routed upstream"
    );

    // The filter's output goes upstream, as filterModule's telemetry.
    let pkid = filter
        .publish(
            "devices/edge1/modules/filterModule/messages/events/%24.on=output1&MessageType=Alert",
            reading(35.5),
            QoS::AtLeastOnce,
        )
        .await;
    filter.puback(pkid).await;
    let events = hub.events("edge1", Some("filterModule")).await;
    assert_eq!(events["received"], 1, "{events}");
    assert_eq!(events["messages"][0]["properties"]["MessageType"], "Alert");
    // An output no route takes goes nowhere, and is counted.
    let pkid = filter
        .publish("devices/edge1/modules/filterModule/messages/events/%24.on=elsewhere", "x", QoS::AtLeastOnce)
        .await;
    filter.puback(pkid).await;
    assert_eq!(hub.events("edge1", Some("filterModule")).await["received"], 1);
    assert_eq!(hub.metric("fleetsim_hub_edge_routed_total{outcome=\"unrouted\"}").await, 1.0);
    assert_eq!(hub.metric("fleetsim_hub_edge_routed_total{outcome=\"module_input\"}").await, 3.0);
}

#[tokio::test]
async fn inputs_are_kept_while_the_module_is_offline_and_redelivered_until_acknowledged() {
    let hub = TestHub::start().await;
    edge_device(&hub, "edge1").await;
    deploy(&hub, json!({"toFilter": TO_FILTER})).await;
    let sensor_key = module_key(&hub, "edge1", "tempSensor").await;
    let filter_key = module_key(&hub, "edge1", "filterModule").await;
    let mut sensor = hub.connect("edge1", Some("tempSensor"), &sensor_key, true).await;
    for n in 1..=3 {
        let pkid = sensor.publish(&format!("{SENSOR_TOPIC}{n}"), reading(20.0 + n as f64), QoS::AtLeastOnce).await;
        sensor.puback(pkid).await;
    }
    // The filter was offline: it gets all three, in order, when it subscribes.
    let mut filter = hub.connect("edge1", Some("filterModule"), &filter_key, true).await;
    filter.subscribe(&[("devices/edge1/modules/filterModule/inputs/#", QoS::AtLeastOnce)]).await;
    let mut seqs = Vec::new();
    for _ in 0..3 {
        let p = filter.try_next_publish(false).await.expect("an input");
        let Ok(CloudPublish::ModuleInput { properties, .. }) = CloudPublish::parse(&p.topic) else {
            panic!("{}", p.topic)
        };
        seqs.push(properties.get("seq").unwrap().to_owned());
        // Not acknowledged: they must come again on the next connection.
    }
    assert_eq!(seqs, ["1", "2", "3"]);
    drop(filter);
    let mut filter = hub.connect("edge1", Some("filterModule"), &filter_key, true).await;
    filter.subscribe(&[("devices/edge1/modules/filterModule/inputs/#", QoS::AtLeastOnce)]).await;
    for expected in ["1", "2", "3"] {
        let p = filter.next_publish().await;
        let bag = PropertyBag::parse(p.topic.rsplit_once('/').unwrap().1).unwrap();
        assert_eq!(bag.get("seq"), Some(expected));
    }
    poll_until("the acknowledged inputs to leave the queue", || async {
        let id = hub.state().registry.get("edge1", Some("filterModule")).unwrap();
        id.lock().c2d.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn routes_follow_the_edge_hub_twin_and_its_deletion() {
    let hub = TestHub::start().await;
    edge_device(&hub, "edge1").await;
    deploy(&hub, json!({"toFilter": TO_FILTER})).await;
    let sensor_key = module_key(&hub, "edge1", "tempSensor").await;
    let mut sensor = hub.connect("edge1", Some("tempSensor"), &sensor_key, true).await;
    let pkid = sensor.publish(&format!("{SENSOR_TOPIC}1"), reading(20.0), QoS::AtLeastOnce).await;
    sensor.puback(pkid).await;
    assert_eq!(hub.events("edge1", Some("tempSensor")).await["received"], 0);
    // A twin PATCH of $edgeHub from any service client changes the routes.
    let patch = json!({"properties": {"desired": {"routes": {"toFilter": null, "all": "FROM /* INTO $upstream"}}}});
    let (status, _, body) = hub.rest("PATCH", "/twins/edge1/modules/$edgeHub", Some(patch)).await;
    assert_eq!(status, 200, "{body}");
    let pkid = sensor.publish(&format!("{SENSOR_TOPIC}2"), reading(20.0), QoS::AtLeastOnce).await;
    sensor.puback(pkid).await;
    assert_eq!(hub.events("edge1", Some("tempSensor")).await["received"], 1);
    // Without its $edgeHub module the device routes like any other: everything upstream.
    let (status, _, _) = hub.rest("DELETE", "/devices/edge1/modules/$edgeHub", None).await;
    assert_eq!(status, 204);
    let pkid = sensor.publish(&format!("{SENSOR_TOPIC}3"), reading(20.0), QoS::AtLeastOnce).await;
    sensor.puback(pkid).await;
    assert_eq!(hub.events("edge1", Some("tempSensor")).await["received"], 2);
}

/// One HTTP/1.1 request over the workload socket: status and body.
async fn workload(uri: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = uri.strip_prefix("unix://").unwrap();
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(common::WAIT, s.read_to_string(&mut reply)).await.unwrap().unwrap();
    let status = reply.split(' ').nth(1).unwrap().parse().unwrap();
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // The reply may be chunked: the JSON is the part between the braces.
    let json = body.find('{').and_then(|a| body.rfind('}').map(|b| &body[a..=b])).unwrap_or("null");
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_workload_api_signs_with_the_module_key_and_refuses_the_rest() {
    let hub = TestHub::start().await;
    let uri = hub.info.edge_workload_uri.clone().expect("the workload socket is served");
    edge_device(&hub, "edge1").await;
    deploy(&hub, json!({"toFilter": TO_FILTER})).await;
    let (_, _, m) = hub.rest("GET", "/devices/edge1/modules/filterModule", None).await;
    let genid = m["generationId"].as_str().unwrap();
    let key = Key::from_base64(m["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap()).unwrap();
    let secondary = Key::from_base64(m["authentication"]["symmetricKey"]["secondaryKey"].as_str().unwrap()).unwrap();

    let (status, bundle) = workload(&uri, "GET", "/trust-bundle?api-version=2019-01-30", "").await;
    assert_eq!(status, 200);
    let ca = std::fs::read_to_string(&hub.info.ca_file).unwrap();
    assert_eq!(bundle["certificate"], ca);

    let data = "localhost%2Fdevices%2Fedge1%2Fmodules%2FfilterModule\n1700000000";
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, data);
    let sign = |key_id: &str, algo: &str, data: &str| json!({"keyId": key_id, "algo": algo, "data": data}).to_string();
    let path = format!("/modules/filterModule/genid/{genid}/sign?api-version=2019-01-30");
    let (status, digest) = workload(&uri, "POST", &path, &sign("primary", "HMACSHA256", &b64)).await;
    assert_eq!(status, 200, "{digest}");
    assert_eq!(digest["digest"], key.sign(data.as_bytes()));
    let (status, digest) = workload(&uri, "POST", &path, &sign("secondary", "HMACSHA256", &b64)).await;
    assert_eq!((status, digest["digest"].as_str()), (200, Some(secondary.sign(data.as_bytes()).as_str())));

    for (path, body, want) in [
        (
            "/modules/filterModule/genid/999/sign?api-version=2019-01-30".to_string(),
            sign("primary", "HMACSHA256", &b64),
            404,
        ),
        ("/modules/nosuch/genid/1/sign?api-version=2019-01-30".to_string(), sign("primary", "HMACSHA256", &b64), 404),
        (path.clone(), sign("tertiary", "HMACSHA256", &b64), 400),
        (path.clone(), sign("primary", "HMACSHA1", &b64), 400),
        (path.clone(), sign("primary", "HMACSHA256", "not base64!"), 400),
        (path.clone(), "{broken".to_string(), 400),
        (format!("/modules/filterModule/genid/{genid}/sign"), sign("primary", "HMACSHA256", &b64), 400),
    ] {
        let (status, reply) = workload(&uri, "POST", &path, &body).await;
        assert_eq!(status, want, "{path} {body}: {reply}");
    }
}
