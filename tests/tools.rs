//! The operator commands, run as the real binary against a running fleet's emulator: listing,
//! twins (one and a sweep), methods (one and a storm), selection by prefix and by twin query,
//! failures in the exit status, and no secret in any error.

use fleetsim_testkit as common;

use common::{FleetUnderTest, repo};
use serde_json::{Value, json};

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

async fn fleetsim(args: Vec<String>) -> Out {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetsim"))
        .args(&args)
        .env_remove("FLEETSIM_SERVICE_CONNECTION_STRING")
        .output()
        .await
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn args(hub_json: &str, rest: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
    v.extend(["--hub-json".to_owned(), hub_json.to_owned()]);
    v
}

#[tokio::test]
async fn every_command_against_a_running_fleet() {
    let f = FleetUnderTest::start(&[repo("scenarios/environmental-sensor.toml")], "").await;
    let hub_json = f.fleet().hub.as_ref().unwrap().info_path.display().to_string();
    let run = |rest: &[&str]| fleetsim(args(&hub_json, rest));

    let list = run(&["devices"]).await;
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert!(
        list.stdout.contains("env-sensor-0001") && list.stdout.contains("5 identities, 5 connected"),
        "{}",
        list.stdout
    );
    let list = run(&["devices", "--json", "--prefix", "env-sensor-000"]).await.json();
    assert_eq!(list.as_array().unwrap().len(), 5);
    assert!(list.as_array().unwrap().iter().all(|d| d["connectionState"] == "Connected"), "{list}");

    let twin = run(&["twin", "env-sensor-0001", "--json"]).await;
    assert_eq!((twin.code, twin.json()["deviceId"].as_str()), (0, Some("env-sensor-0001")));
    let patched = run(&["twin", "env-sensor-0001", "--desired", r#"{"name": "lobby"}"#]).await;
    assert_eq!(patched.code, 0, "{}", patched.stderr);
    f.reported_until("env-sensor-0001", None, "name", |v| v["value"] == "lobby" && v["ac"] == 200).await;

    let one = run(&["invoke", "env-sensor-0002", "blink", "--payload", "2"]).await;
    assert_eq!(one.code, 0, "{}", one.stderr);
    assert!(one.stdout.contains("status 200") && one.stdout.contains("Blinking LED every 2 seconds"), "{}", one.stdout);
    let refused = run(&["invoke", "env-sensor-0002", "selfdestruct", "--json"]).await;
    assert_eq!((refused.code, refused.json()["status"].as_i64()), (1, Some(404)), "the device's 404 fails the command");

    // A method storm over a prefix, and one over a twin query.
    let storm =
        run(&["invoke", "--prefix", "env-sensor-", "blink", "--payload", "1", "--concurrency", "3", "--json"]).await;
    assert_eq!(storm.code, 0, "{}", storm.stderr);
    let s = storm.json();
    assert_eq!((s["calls"].as_u64(), s["ok"].as_u64()), (Some(5), Some(5)), "{s}");
    assert!(s["latency_ms"]["p99"].as_f64().unwrap() > 0.0, "{s}");
    let q = "SELECT * FROM devices WHERE deviceId = 'env-sensor-0004' OR deviceId = 'env-sensor-0005'";
    let by_query = run(&["invoke", "--query", q, "turnoff", "--json"]).await.json();
    assert_eq!(by_query["ok"], 2, "{by_query}");
    f.reported_until("env-sensor-0004", None, "state", |v| *v == json!(false)).await;
    let text = run(&["invoke", "--prefix", "env-sensor-", "selfdestruct"]).await;
    assert_eq!(text.code, 1, "failures make the exit status");
    assert!(text.stdout.contains("device_404: 5") && text.stdout.contains("p99"), "{}", text.stdout);

    // A desired-property sweep.
    let sweep = run(&["twin", "--prefix", "env-sensor-", "--desired", r#"{"brightness": 42}"#, "--json"]).await;
    assert_eq!((sweep.code, sweep.json()["ok"].as_u64()), (0, Some(5)), "{}", sweep.stdout);
    f.reported_until("env-sensor-0005", None, "brightness", |v| v["value"] == 42).await;
}

#[tokio::test]
async fn bad_credentials_and_arguments_are_reported_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.json").display().to_string();
    let out = fleetsim(args(&missing, &["devices"])).await;
    assert_eq!(out.code, 64, "{}", out.stderr);
    assert!(out.stderr.contains("nowhere.json"), "{}", out.stderr);

    let secret = "c2VjcmV0LXNlcnZpY2Uta2V5";
    let cs = format!("HostName=127.0.0.1:1;SharedAccessKeyName=iothubowner;SharedAccessKey={secret}");
    let out = fleetsim(vec!["invoke".into(), "d1".into(), "m".into(), "--connection-string".into(), cs]).await;
    assert_eq!(out.code, 1, "an unreachable hub is a failed call: {}", out.stderr);
    assert!(!out.stderr.contains(secret) && !out.stdout.contains(secret), "{}", out.stderr);

    let out = fleetsim(args(&missing, &["invoke", "d1", "m", "--payload", "{not json"])).await;
    assert_eq!(out.code, 64);
    let out = fleetsim(args(&missing, &["twin", "d1/m/x"])).await;
    assert_eq!(out.code, 64, "{}", out.stderr);
}

/// Errors that name their cause: the URL and the network reason when the hub cannot be reached,
/// the hub's own message with a refused query, what a selector matched when it matched nothing.
#[tokio::test]
async fn errors_carry_their_cause() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cs = format!("HostName=127.0.0.1:{port};SharedAccessKeyName=iothubowner;SharedAccessKey=c2VjcmV0");
    let out = fleetsim(vec!["devices".into(), "--connection-string".into(), cs]).await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    for want in [format!("https://127.0.0.1:{port}/"), "Connection refused".to_owned()] {
        assert!(out.stderr.contains(&want), "no {want:?} in {}", out.stderr);
    }

    let f = FleetUnderTest::start(&[repo("scenarios/environmental-sensor.toml")], "").await;
    let hub_json = f.fleet().hub.as_ref().unwrap().info_path.display().to_string();
    let run = |rest: &[&str]| fleetsim(args(&hub_json, rest));
    let bad = run(&["devices", "--query", "SELECT deviceId FROM devices"]).await;
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    let line = bad.stderr.lines().next().unwrap_or_default();
    let (_, message) = line.split_once("400: ").unwrap_or_else(|| panic!("no status in {line}"));
    assert!(message.contains(':') && message.len() > "ArgumentInvalid".len() + 2, "the hub's message is kept: {line}");

    for (rest, want) in [
        (vec!["invoke", "--prefix", "no-such-", "blink"], "no device id starts with `no-such-` (5 devices in the hub)"),
        (vec!["twin", "--prefix", "no-such-", "--desired", "{}"], "no device id starts with `no-such-`"),
        (vec!["invoke", "--query", "SELECT * FROM devices WHERE deviceId = 'x'", "blink"], "selected no device"),
    ] {
        let out = run(&rest).await;
        assert_eq!(out.code, 1, "{rest:?}: {}", out.stderr);
        assert!(out.stderr.contains(want), "{rest:?}: {}", out.stderr);
    }
}

/// `fleetsim cleanup` removes what a fleet made, here from an external emulator: a dry run only
/// counts, the real run deletes every device of the templates (modules with them), and a second
/// run finds nothing left.
#[tokio::test]
async fn cleanup_deletes_what_the_fleet_created() {
    let scenario = repo("scenarios/module-twin.toml");
    let mut f = FleetUnderTest::start(std::slice::from_ref(&scenario), "").await;
    f.fleet.as_mut().unwrap().stop_identities().await;
    let hub_json = f.fleet().hub.as_ref().unwrap().info_path.clone();
    let config = f.dir.path().join("external.toml");
    std::fs::write(
        &config,
        format!(
            "scenarios = [{:?}]\n[hub]\nmode = \"external\"\nhub_json = {:?}\n",
            scenario.display().to_string(),
            hub_json.display().to_string()
        ),
    )
    .unwrap();
    let cleanup = |extra: &[&str]| {
        let mut v =
            vec!["cleanup".to_owned(), "--config".to_owned(), config.display().to_string(), "--json".to_owned()];
        v.extend(extra.iter().map(|s| s.to_string()));
        fleetsim(v)
    };
    let devices = f.api.rest("GET", "/devices", None).await.2;
    let before = devices.as_array().unwrap().len() as u64;
    assert!(before > 0, "{devices}");

    let dry = cleanup(&["--dry-run"]).await;
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert_eq!(dry.json()["devices"].as_u64(), Some(before), "{}", dry.stdout);
    assert_eq!(
        f.api.rest("GET", "/devices", None).await.2.as_array().unwrap().len() as u64,
        before,
        "a dry run deletes nothing"
    );

    let real = cleanup(&[]).await;
    assert_eq!((real.code, real.json()["devices"].as_u64()), (0, Some(before)), "{}{}", real.stdout, real.stderr);
    let after = f.api.rest("GET", "/devices", None).await.2;
    assert_eq!(after.as_array().unwrap().len(), 0, "{after}");
    let modules = f.api.rest("POST", "/devices/query", Some(json!({"query": "SELECT * FROM devices.modules"}))).await.2;
    assert_eq!(modules.as_array().map(Vec::len), Some(0), "modules went with their devices: {modules}");
    let again = cleanup(&[]).await;
    assert_eq!((again.code, again.json()["devices"].as_u64()), (0, Some(0)));
}
