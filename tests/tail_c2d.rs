//! Issue 13, the tools: `fleetsim tail` and `fleetsim c2d` run as the real binary against an
//! emulator over real AMQP and TLS, found through its hub.json. Tail filters by device, prefix,
//! module and source and prints text or JSON lines from a start position; c2d delivers to a device
//! over MQTT with its properties, refuses an unknown device, and keeps the key out of errors.

use fleetsim_testkit as common;

use std::time::Duration;

use common::TestHub;
use rumqttc::mqttbytes::QoS;
use serde_json::Value;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn fleetsim(args: &[&str]) -> Out {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetsim"))
        .args(args)
        .env_remove("FLEETSIM_SERVICE_CONNECTION_STRING")
        .env_remove("FLEETSIM_EVENTHUB_CONNECTION_STRING")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run).await.expect("the command ends").unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn lines(out: &Out) -> Vec<Value> {
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{}", out.stderr)))
        .collect()
}

/// Sends telemetry from devices `a-1`, `a-2`, `b-1` and module `a-1/m1`, all acknowledged.
async fn traffic(hub: &TestHub) {
    for d in ["a-1", "a-2", "b-1"] {
        let key = hub.create_device(d).await;
        let mut c = hub.connect(d, None, &key, true).await;
        for n in 1..=3 {
            c.publish(
                &format!("devices/{d}/messages/events/n={n}&%24.ct=application%2Fjson"),
                format!("{{\"n\":{n}}}"),
                QoS::AtLeastOnce,
            )
            .await;
        }
        // The last PUBACK: everything before it is stored.
        let mut acked = 0;
        while acked < 3 {
            if let Some(rumqttc::mqttbytes::v4::Packet::PubAck(_)) = c.recv().await {
                acked += 1;
            }
        }
    }
    let mkey = hub.create_module("a-1", "m1").await;
    let mut m = hub.connect("a-1", Some("m1"), &mkey, true).await;
    m.publish("devices/a-1/modules/m1/messages/events/", "plain text", QoS::AtLeastOnce).await;
    while !matches!(m.recv().await, Some(rumqttc::mqttbytes::v4::Packet::PubAck(_))) {}
}

#[tokio::test]
async fn tail_filters_and_prints_json_or_text_from_the_start() {
    let hub = TestHub::start().await;
    traffic(&hub).await;
    let hub_json = hub.dir.path().join("hub.json");
    let hj = hub_json.to_str().unwrap();
    let base = ["tail", "--hub-json", hj, "--from", "earliest", "--duration", "60s"];
    let run = |extra: &'static [&'static str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        async move { fleetsim(&a).await }
    };

    // By prefix: a-1 (device and module) and a-2, never b-1; JSON lines with IoT Hub's fields.
    let out = run(&["--json", "--device-prefix", "a-", "--source", "Telemetry", "--count", "7"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let events = lines(&out);
    assert_eq!(events.len(), 7, "{}", out.stdout);
    assert!(events.iter().all(|e| e["device_id"].as_str().unwrap().starts_with("a-")), "{}", out.stdout);
    assert!(events.iter().all(|e| e["source"] == "Telemetry"), "{}", out.stdout);
    let first = events.iter().find(|e| e["device_id"] == "a-2").unwrap();
    assert_eq!(first["source"], "Telemetry");
    assert_eq!(first["content_type"], "application/json");
    assert!(first["body"]["n"].is_u64(), "a JSON body is printed as JSON: {first}");
    assert!(first["properties"]["n"].is_string(), "{first}");
    assert!(first["iothub_enqueued_time"].as_str().unwrap().ends_with('Z'), "{first}");
    assert!(first["sequence_number"].is_i64());
    let from_module: Vec<&Value> = events.iter().filter(|e| e["module_id"] == "m1").collect();
    assert_eq!(from_module.len(), 1);
    assert_eq!(from_module[0]["body"], "plain text");

    // One device, as text; the module filter; a source no telemetry has.
    let out = run(&["--device", "b-1", "--source", "Telemetry", "--count", "3"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let text: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(text.len(), 3, "{}", out.stdout);
    assert!(text.iter().all(|l| l.contains(" b-1 Telemetry [") && l.contains("{\"n\":")), "{}", out.stdout);
    let out = run(&["--json", "--module", "m1", "--source", "telemetry", "--count", "1"]).await;
    let e = &lines(&out)[0];
    assert_eq!((e["device_id"].as_str(), e["body"].as_str()), (Some("a-1"), Some("plain text")), "{e}");
    // The hub's own events pass the same filters: a-2's creation, by its source.
    let out = run(&["--json", "--device", "a-2", "--source", "deviceLifecycleEvents", "--count", "1"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let e = &lines(&out)[0];
    assert_eq!((e["device_id"].as_str(), e["source"].as_str()), (Some("a-2"), Some("deviceLifecycleEvents")), "{e}");

    // From latest: nothing already there is printed, what comes next is.
    let key = hub.create_device("late-1").await;
    let mut c = hub.connect("late-1", None, &key, true).await;
    c.publish("devices/late-1/messages/events/", "early", QoS::AtLeastOnce).await;
    while !matches!(c.recv().await, Some(rumqttc::mqttbytes::v4::Packet::PubAck(_))) {}
    let hub_json2 = hj.to_owned();
    let later = tokio::spawn(async move {
        let args = ["tail", "--hub-json", &hub_json2, "--device", "late-1", "--source", "Telemetry", "--json"];
        fleetsim(&[&args[..], &["--count", "1", "--duration", "60s"]].concat()).await
    });
    // Keep sending until the tail (attaching meanwhile) has seen one; each message is new.
    let mut n = 100;
    while !later.is_finished() && n < 400 {
        c.publish(&format!("devices/late-1/messages/events/n={n}"), "late", QoS::AtLeastOnce).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = later.await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let e = &lines(&out)[0];
    assert_eq!(e["body"], "late", "from latest, the first event is a new one: {e}");
}

#[tokio::test]
async fn tail_refuses_bad_arguments_and_a_wrong_key_without_printing_it() {
    let hub = TestHub::start().await;
    let hj = hub.dir.path().join("hub.json");
    let hj = hj.to_str().unwrap();
    let out = fleetsim(&["tail", "--hub-json", hj, "--since", "yesterday-ish"]).await;
    assert_eq!(out.code, 64, "{}", out.stderr);
    assert!(out.stderr.contains("--since"), "{}", out.stderr);
    let out = fleetsim(&["tail", "--hub-json", "/nonexistent/hub.json"]).await;
    assert_eq!(out.code, 64);
    let port = hub.info.amqp_addr.unwrap().port();
    let ca = hub.info.ca_file.to_str().unwrap().to_owned();
    let wrong = format!(
        "Endpoint=sb://localhost:{port}/;SharedAccessKeyName=service;SharedAccessKey=bm90dGhla2V5;EntityPath={}",
        hub.info.eventhub_name
    );
    let out = fleetsim(&["tail", "--connection-string", &wrong, "--ca-file", &ca, "--duration", "30s"]).await;
    assert_eq!(out.code, 1, "a refused token fails the command: {}", out.stderr);
    assert!(out.stderr.contains("refused"), "{}", out.stderr);
    assert!(!out.stderr.contains("bm90dGhla2V5"), "the key never reaches an error: {}", out.stderr);
    let out =
        fleetsim(&["tail", "--connection-string", "Endpoint=sb://h/;SharedAccessKeyName=p;SharedAccessKey=s3cret"])
            .await;
    assert_eq!(out.code, 64);
    assert!(out.stderr.contains("EntityPath") && !out.stderr.contains("s3cret"), "{}", out.stderr);
}

#[tokio::test]
async fn c2d_reaches_a_device_with_its_properties_and_refuses_unknown_devices() {
    let hub = TestHub::start().await;
    let key = hub.create_device("d1").await;
    let mut device = hub.connect("d1", None, &key, true).await;
    device.subscribe(&[("devices/d1/messages/devicebound/#", QoS::AtLeastOnce)]).await;
    let hj = hub.dir.path().join("hub.json");
    let hj = hj.to_str().unwrap();
    let out = fleetsim(&[
        "c2d",
        "d1",
        "--hub-json",
        hj,
        "--body",
        "hello",
        "--property",
        "colour=blue",
        "--message-id",
        "mid-1",
        "--ack",
        "full",
        "--json",
    ])
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let summary: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!((summary["message_id"].as_str(), summary["sent"].as_bool()), (Some("mid-1"), Some(true)));
    let p = device.next_publish().await;
    assert_eq!(&p.payload[..], b"hello");
    assert!(p.topic.starts_with("devices/d1/messages/devicebound/"), "{}", p.topic);
    assert!(p.topic.contains("colour=blue") && p.topic.contains("mid-1"), "{}", p.topic);
    assert!(p.topic.contains("iothub-ack=full"), "{}", p.topic);

    // The device completed it (PUBACK): with --wait-feedback the hub's record says Success.
    let hj2 = hj.to_owned();
    let waiting = tokio::spawn(async move {
        let args = ["c2d", "d1", "--hub-json", &hj2, "--body", "ack me", "--message-id", "mid-2", "--ack", "full"];
        fleetsim(&[&args[..], &["--wait-feedback", "--feedback-timeout", "60s", "--json"]].concat()).await
    });
    let p = device.next_publish().await;
    assert_eq!(&p.payload[..], b"ack me");
    let out = waiting.await.unwrap();
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let summary: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let f = &summary["feedback"];
    assert_eq!(
        (f["originalMessageId"].as_str(), f["statusCode"].as_str(), f["deviceId"].as_str()),
        (Some("mid-2"), Some("Success"), Some("d1")),
        "{summary}"
    );
    assert!(f["enqueuedTimeUtc"].as_str().is_some_and(|t| !t.is_empty()), "{summary}");

    let out = fleetsim(&["c2d", "nobody", "--hub-json", hj, "--body", "x"]).await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("rejected"), "{}", out.stderr);
    let out = fleetsim(&["c2d", "d1", "--hub-json", hj, "--wait-feedback"]).await;
    assert_eq!(out.code, 64, "waiting needs an ack: {}", out.stderr);
    let wrong = "HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey=bm90dGhla2V5";
    let ca = hub.info.ca_file.to_str().unwrap().to_owned();
    // A connection string means Azure's port 5671, where nothing listens here: the call fails,
    // and the key stays out of the error.
    let out = fleetsim(&["c2d", "d1", "--connection-string", wrong, "--ca-file", &ca]).await;
    assert_ne!(out.code, 0);
    assert!(!out.stderr.contains("bm90dGhla2V5"), "{}", out.stderr);
}
