//! DPS over MQTT and HTTPS: group enrollments with derived keys, individual enrollments made
//! through the service API, assignment into the registry, and the refusals.

use fleetsim_testkit as common;

use common::{TestHub, future};
use fleetsim::iot::sas::{Key, derive_device_key, sign_token};
use fleetsim::iot::topic;
use fleetsim::iot::username::{dps_username, hub_username};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use serde_json::{Value, json};

fn dps_token(hub: &TestHub, reg: &str, key: &Key) -> String {
    sign_token(&format!("{}/registrations/{reg}", hub.info.id_scope), key, future(600), Some("registration"))
}

#[tokio::test]
async fn group_enrollment_over_mqtt_then_connect_to_the_assigned_hub() {
    let hub = TestHub::start().await;
    let reg = "sim-device-0001";
    let key = derive_device_key(&Key::from_base64(&hub.info.group_key).unwrap(), reg);
    let mut c = hub.mqtt().await;
    assert_eq!(
        c.connect(reg, &dps_username(&hub.info.id_scope, reg), &dps_token(&hub, reg, &key), true, 60).await,
        Some(ConnectReturnCode::Success)
    );
    c.subscribe(&[("$dps/registrations/res/#", QoS::AtLeastOnce)]).await;
    let body = json!({"registrationId": reg, "payload": {"modelId": "dtmi:com:example:Thermostat;1"}});
    c.publish(&topic::dps_register("r1"), body.to_string(), QoS::AtLeastOnce).await;
    let res = c.next_publish().await;
    assert_eq!(res.topic, "$dps/registrations/res/202/?$rid=r1&retry-after=1");
    let op: Value = serde_json::from_slice(&res.payload).unwrap();
    assert_eq!(op["status"], "assigning");
    c.publish(&topic::dps_poll("r2", op["operationId"].as_str().unwrap()), " ", QoS::AtLeastOnce).await;
    let res = c.next_publish().await;
    assert_eq!(res.topic, "$dps/registrations/res/200/?$rid=r2");
    let done: Value = serde_json::from_slice(&res.payload).unwrap();
    assert_eq!(done["status"], "assigned");
    let state = &done["registrationState"];
    assert_eq!(
        (state["assignedHub"].as_str(), state["deviceId"].as_str(), state["substatus"].as_str()),
        (Some("localhost"), Some(reg), Some("initialAssignment"))
    );

    // The device now exists with the derived key, its model recorded; it connects to the hub.
    let mut d = hub.mqtt().await;
    let token = hub.device_token(reg, None, &key, future(600));
    assert_eq!(
        d.connect(reg, &hub_username("localhost", reg, None, None), &token, true, 60).await,
        Some(ConnectReturnCode::Success)
    );
    let (_, _, twin) = hub.rest("GET", &format!("/twins/{reg}"), None).await;
    assert_eq!(twin["modelId"], "dtmi:com:example:Thermostat;1");
    let (_, _, recorded) =
        hub.rest_as("provisioningserviceowner", "GET", &format!("/emulator/registrations/{reg}"), None, &[]).await;
    assert_eq!(recorded["requestPayload"]["modelId"], "dtmi:com:example:Thermostat;1");
    assert_eq!(hub.metric("fleetsim_hub_dps_registrations_total{outcome=\"assigned\"}").await, 1.0);
}

#[tokio::test]
async fn dps_refuses_unknown_registrations_and_wrong_keys() {
    let hub = TestHub::start().await;
    let wrong = Key::generate();
    let mut c = hub.mqtt().await;
    assert_eq!(
        c.connect("nobody", &dps_username(&hub.info.id_scope, "nobody"), &dps_token(&hub, "nobody", &wrong), true, 60)
            .await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    let key = derive_device_key(&Key::from_base64(&hub.info.group_key).unwrap(), "x1");
    let mut c = hub.mqtt().await;
    assert_eq!(
        c.connect("x1", &dps_username("0neWRONG", "x1"), &dps_token(&hub, "x1", &key), true, 60).await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    // HTTPS answers 401 with the DPS error body.
    let url = format!(
        "https://localhost:{}/{}/registrations/nobody/register?api-version=2019-03-31",
        hub.info.https_port, hub.info.id_scope
    );
    let r = hub
        .http
        .put(url)
        .header("authorization", dps_token(&hub, "nobody", &wrong))
        .json(&json!({"registrationId": "nobody"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errorCode"], 401002);
    assert!(body["trackingId"].is_string());
}

#[tokio::test]
async fn individual_enrollment_over_https() {
    let hub = TestHub::start().await;
    let key = Key::generate();
    let (status, _, enrollment) = hub
        .rest_as(
            "provisioningserviceowner",
            "PUT",
            "/enrollments/ind-01",
            Some(json!({"registrationId": "ind-01", "deviceId": "device-from-ind-01", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key.to_base64()}}})),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{enrollment}");
    // Only the DPS service policy may manage enrollments.
    let (status, _, _) = hub.rest("GET", "/enrollments/ind-01", None).await;
    assert_eq!(status, 401);

    let base = format!("https://localhost:{}/{}/registrations/ind-01", hub.info.https_port, hub.info.id_scope);
    let token = dps_token(&hub, "ind-01", &key);
    let r = hub
        .http
        .put(format!("{base}/register?api-version=2019-03-31"))
        .header("authorization", &token)
        .json(&json!({"registrationId": "ind-01", "payload": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["retry-after"], "1");
    let op: Value = r.json().await.unwrap();
    let r = hub
        .http
        .get(format!("{base}/operations/{}?api-version=2019-03-31", op["operationId"].as_str().unwrap()))
        .header("authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let done: Value = r.json().await.unwrap();
    assert_eq!(done["registrationState"]["deviceId"], "device-from-ind-01");
    let (status, _, device) = hub.rest("GET", "/devices/device-from-ind-01", None).await;
    assert_eq!(status, 200);
    assert_eq!(device["authentication"]["symmetricKey"]["primaryKey"], key.to_base64());
    // Polling an operation that does not exist is a 404.
    let r = hub
        .http
        .get(format!("{base}/operations/nope?api-version=2019-03-31"))
        .header("authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn a_slow_assignment_stays_assigning_until_it_is_done() {
    let hub = TestHub::start_with(|c| {
        c.behaviour.dps_assignment_delay_ms = 1500;
        c.behaviour.dps_retry_after_secs = 2;
    })
    .await;
    let reg = "slow-1";
    let key = derive_device_key(&Key::from_base64(&hub.info.group_key).unwrap(), reg);
    let base = format!("https://localhost:{}/{}/registrations/{reg}", hub.info.https_port, hub.info.id_scope);
    let token = dps_token(&hub, reg, &key);
    let op: Value = hub
        .http
        .put(format!("{base}/register?api-version=2019-03-31"))
        .header("authorization", &token)
        .body("")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let poll = || {
        hub.http
            .get(format!("{base}/operations/{}?api-version=2019-03-31", op["operationId"].as_str().unwrap()))
            .header("authorization", &token)
            .send()
    };
    let r = poll().await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["retry-after"].to_str().unwrap()), (202, "2"));
    assert_eq!(r.json::<Value>().await.unwrap()["registrationState"]["status"], "assigning");
    assert!(hub.state().registry.get(reg, None).is_none(), "not created before assignment");
    // Assigned once the delay has passed: polled, as a device would.
    common::wait_until("the registration to be assigned", || async { poll().await.unwrap().status() == 200 }).await;
}
