//! The IoT Edge filter-module tutorial (`scenarios/edge-filter.toml`) run by the fleet against its
//! embedded emulator over real TLS: `tempSensor` sends on `temperatureOutput`, the deployment's
//! routes deliver to `filterModule`'s `input1`, the filter marks readings above its desired
//! `TemperatureThreshold` with `MessageType: Alert` and sends them on `output1`, which goes
//! `$upstream`. Driven from the service side: the threshold is changed in the module twin and the
//! hub's telemetry log shows which readings arrived.

use fleetsim_testkit as common;

use common::{FleetUnderTest, repo};
use serde_json::{Value, json};

const DEV: &str = "edge-0001";
const FILTER: Option<&str> = Some("filterModule");

/// The shipped scenario with one device, readings every 200 ms, and `routing` forced.
fn tutorial(dir: &std::path::Path, routing: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo("scenarios/edge-filter.toml")).unwrap();
    let text = text
        .replace("count = 2", "count = 1")
        .replace("interval = \"5s\"", "interval = \"200ms\"")
        .replace("[devices.edge]\n", &format!("[devices.edge]\nrouting = \"{routing}\"\n"));
    assert!(text.contains(&format!("routing = \"{routing}\"")) && text.contains("200ms"), "the scenario changed shape");
    let path = dir.join("edge-filter.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn alerts(f: &FleetUnderTest) -> Vec<Value> {
    f.events(DEV, FILTER).await["messages"].as_array().cloned().unwrap_or_default()
}

async fn received(f: &FleetUnderTest, module: &str) -> u64 {
    f.events(DEV, Some(module)).await["received"].as_u64().unwrap()
}

fn temperature(m: &Value) -> f64 {
    let body: Value = serde_json::from_str(m["body"].as_str().unwrap()).unwrap();
    body["machine"]["temperature"].as_f64().unwrap_or_else(|| panic!("no machine.temperature in {body}"))
}

async fn set_threshold(f: &FleetUnderTest, t: f64) {
    let v = f.set_desired(DEV, FILTER, json!({"TemperatureThreshold": t})).await;
    f.reported_until(DEV, FILTER, "TemperatureThreshold", |r| r["ac"] == 200 && r["av"] == v).await;
}

/// Readings the filter has judged so far (forwarded or held back), fleet-wide.
fn judged(f: &FleetUnderTest) -> u64 {
    f.metrics().module_inputs("forwarded") + f.metrics().module_inputs("filtered")
}

/// The tutorial's flow, whoever routes.
async fn above_the_threshold_arrives_marked_and_below_does_not(f: &FleetUnderTest) {
    assert_eq!(f.fleet().identities(), 3);
    let (status, _, device) = f.rest("GET", &format!("/devices/{DEV}"), None).await;
    assert_eq!((status, &device["capabilities"]["iotEdge"]), (200, &json!(true)), "{device}");
    // Everything is above zero: every reading reaches IoT Hub, through the filter.
    set_threshold(f, 0.0).await;
    f.wait_for("three alerts upstream", || async { received(f, "filterModule").await >= 3 }).await;
    for m in alerts(f).await {
        assert_eq!(m["properties"]["MessageType"], "Alert", "{m}");
        assert_eq!(m["systemProperties"]["output-name"], "output1", "{m}");
        let body: Value = serde_json::from_str(m["body"].as_str().unwrap()).unwrap();
        for path in
            ["/machine/temperature", "/machine/pressure", "/ambient/temperature", "/ambient/humidity", "/timeCreated"]
        {
            assert!(body.pointer(path).is_some(), "the alert is not the sensor's reading: {body}");
        }
    }

    // Above every reading: the filter judges and holds back all of them. The acknowledgement
    // comes after the filter took the new value, so nothing is forwarded from here on.
    set_threshold(f, 1000.0).await;
    let (forwarded, seen) = (f.metrics().module_inputs("forwarded"), f.metrics().module_inputs("filtered"));
    f.wait_for("three readings held back", || async { f.metrics().module_inputs("filtered") >= seen + 3 }).await;
    assert_eq!(f.metrics().module_inputs("forwarded"), forwarded, "nothing passes a threshold of 1000");

    // In between: what arrives is exactly what is above it, whatever the sensor's walk does.
    set_threshold(f, 26.5).await;
    let (from_hub, from_fwd, from_judged) =
        (received(f, "filterModule").await, f.metrics().module_inputs("forwarded"), judged(f));
    f.wait_for("ten readings judged at 26.5", || async { judged(f) >= from_judged + 10 }).await;
    let forwarded = f.metrics().module_inputs("forwarded") - from_fwd;
    f.wait_for("every forwarded alert at the hub", || async {
        received(f, "filterModule").await >= from_hub + forwarded
    })
    .await;
    let all = alerts(f).await;
    let arrived = (received(f, "filterModule").await - from_hub) as usize;
    assert_eq!(arrived as u64, forwarded, "the hub holds exactly what the filter forwarded");
    let new = &all[all.len().saturating_sub(arrived)..];
    for m in new {
        assert!(temperature(m) > 26.5, "a reading at or below the threshold went upstream: {m}");
    }
}

#[tokio::test]
async fn the_filter_tutorial_with_the_fleet_as_edge_hub() {
    let dir = tempfile::tempdir().unwrap();
    let f = FleetUnderTest::start(&[tutorial(dir.path(), "fleet")], "").await;
    above_the_threshold_arrives_marked_and_below_does_not(&f).await;
    // The sensor's output has no route to IoT Hub: its readings reach it only through the filter.
    assert_eq!(received(&f, "tempSensor").await, 0);
    assert!(f.metrics().edge_routed_count("module_input") >= 10);
    assert!(f.metrics().edge_routed_count("upstream") >= 3);
    assert_eq!(f.metrics().edge_routed_count("no_receiver") + f.metrics().edge_routed_count("inbox_full"), 0);
}

#[tokio::test]
async fn the_filter_tutorial_with_the_emulator_as_edge_hub() {
    let dir = tempfile::tempdir().unwrap();
    let f = FleetUnderTest::start(&[tutorial(dir.path(), "hub")], "").await;
    // The fleet applied the deployment: the emulator holds the routes and the module's desired.
    let hub_twin = f.twin(DEV, Some("$edgeHub")).await;
    let routes = &hub_twin["properties"]["desired"]["routes"];
    assert_eq!(routes["filterToIoTHub"], "FROM /messages/modules/filterModule/outputs/output1 INTO $upstream");
    assert_eq!(f.twin(DEV, FILTER).await["properties"]["desired"]["TemperatureThreshold"], 25);
    above_the_threshold_arrives_marked_and_below_does_not(&f).await;
    assert_eq!(f.metrics().edge_routed_count("module_input") + f.metrics().edge_routed_count("upstream"), 0);
}

/// The README shows the tutorial's deployment and filter: those lines are the shipped scenario's.
#[test]
fn the_readme_excerpt_is_the_shipped_scenario() {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let scenario = std::fs::read_to_string(repo("scenarios/edge-filter.toml")).unwrap();
    let start = readme.find("```toml\n[devices.edge]\n").expect("the README's Edge example") + "```toml\n".len();
    let excerpt = &readme[start..start + readme[start..].find("```").unwrap()];
    let mut rest = scenario.as_str();
    for line in excerpt.lines().filter(|l| !l.is_empty()) {
        let at = rest.find(line).unwrap_or_else(|| panic!("README line not in the scenario (in order): {line}"));
        rest = &rest[at + line.len()..];
    }
}

/// A device an earlier, non-Edge scenario created with the same key becomes an Edge device (its
/// operator-set status kept), so the deployment that follows is not refused; the deployment
/// applied through the registry client is the one the emulator then routes by.
#[tokio::test]
async fn an_existing_device_is_made_an_edge_device_and_takes_the_deployment() {
    use fleetsim::iot::sas::Key;
    use fleetsim::provision::registry::ServiceClient;
    let hub = common::TestHub::start().await;
    let http = fleetsim::service::https_client(&hub.tls).unwrap();
    let registry = ServiceClient::new(http, &hub.info.service_connection_string.parse().unwrap()).unwrap();
    let ours = Key::generate();
    // Created before, not as an Edge device, with the fleet's key, and disabled by an operator.
    let (status, _, _) = hub
        .rest("PUT", "/devices/plain-1", Some(json!({"deviceId": "plain-1", "status": "disabled", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": ours.to_base64(), "secondaryKey": ours.to_base64()}}})))
        .await;
    assert_eq!(status, 200);
    let (_, _, d) = hub.rest("GET", "/devices/plain-1", None).await;
    assert_eq!(d["capabilities"]["iotEdge"], false, "{d}");

    let templates = fleetsim::scenario::schema::load(&[repo("scenarios/edge-filter.toml")]).unwrap();
    let content = templates[0].modules_content().unwrap();
    let ensured = fleetsim::provision::registry::Ensured::default();
    ensured.device(&registry, "plain-1", &ours, Some(&content)).await.unwrap();
    let (_, _, d) = hub.rest("GET", "/devices/plain-1", None).await;
    assert_eq!((&d["capabilities"]["iotEdge"], &d["status"]), (&json!(true), &json!("disabled")), "{d}");
    let (_, _, twin) = hub.rest("GET", "/twins/plain-1/modules/$edgeHub", None).await;
    assert_eq!(
        twin["properties"]["desired"]["routes"],
        content["modulesContent"]["$edgeHub"]["properties.desired"]["routes"]
    );
    assert_eq!(twin["properties"]["desired"]["storeAndForwardConfiguration"]["timeToLiveSecs"], 7200);

    // The same deployment again writes nothing; a changed one (a reload) is applied.
    ensured.device(&registry, "plain-1", &ours, Some(&content)).await.unwrap();
    let mut changed = content.clone();
    changed["modulesContent"]["$edgeHub"]["properties.desired"]["storeAndForwardConfiguration"]["timeToLiveSecs"] =
        json!(60);
    ensured.device(&registry, "plain-1", &ours, Some(&changed)).await.unwrap();
    let (_, _, twin) = hub.rest("GET", "/twins/plain-1/modules/$edgeHub", None).await;
    assert_eq!(twin["properties"]["desired"]["storeAndForwardConfiguration"]["timeToLiveSecs"], 60);
}
