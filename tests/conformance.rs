//! Conformance: Microsoft's own Python and Node SDK clients, unchanged, against `fleetsim hub`.
//! Each script runs with a fresh emulator in its own network namespace (so the fixed ports 8883
//! and 443 the SDKs dial are free, and these tests run in parallel with every other test).
//! The SDKs are installed by `scripts/setup-sdks.sh`, which the README's test command runs first.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(interpreter: &Path, script: &str) {
    run_with(interpreter, script, None);
}

/// Runs a script against a fresh hub, or against `fleetsim run` with the given scenarios.
fn run_with(interpreter: &Path, script: &str, fleet_scenarios: Option<&[&str]>) {
    let root = root();
    assert!(
        interpreter.exists(),
        "{} is missing: run scripts/setup-sdks.sh (the README test command does) to install Microsoft's SDKs",
        interpreter.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let script_path = root.join("tests/conformance").join(script);
    let mut cmd = Command::new(root.join("tests/conformance/run-in-netns.sh"));
    if let Some(scenarios) = fleet_scenarios {
        let list: Vec<String> = scenarios.iter().map(|s| format!("{:?}", root.join(s).display().to_string())).collect();
        let config = format!(
            "scenarios = [{}]\n[hub]\nmode = \"embedded\"\ndata_dir = {:?}\nmqtt_addr = \"127.0.0.1:8883\"\nhttps_addr = \"127.0.0.1:443\"\n[ramp]\nrate = 500\n",
            list.join(", "),
            dir.path().display().to_string()
        );
        let path = dir.path().join("fleet.toml");
        std::fs::write(&path, config).unwrap();
        cmd.env("FLEETSIM_RUN_CONFIG", path);
    }
    let out = cmd
        .arg(env!("CARGO_BIN_EXE_fleetsim"))
        .arg(dir.path())
        .arg(interpreter)
        .arg(&script_path)
        .current_dir(script_path.parent().unwrap())
        .output()
        .expect("cannot run the network-namespace wrapper (needs unshare and ip, as root)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} failed:\n{text}");
    assert!(text.contains("ok: "), "{script} checked nothing:\n{text}");
}

fn python(script: &str) {
    run(&root().join(".venv/bin/python"), &format!("python/{script}"));
}

fn node(script: &str) {
    assert!(
        root().join("tests/conformance/node/node_modules/azure-iot-device").exists(),
        "Node SDKs missing: run scripts/setup-sdks.sh"
    );
    run(Path::new("/usr/bin/node"), &format!("node/{script}"));
}

#[test]
fn python_device_client() {
    python("device_client.py");
}

#[test]
fn python_eventhub_consumer_reads_mqtt_telemetry() {
    python("eventhub_consumer.py");
}

#[test]
fn python_eventhub_consumer_over_websockets() {
    python("eventhub_websocket.py");
}

#[test]
fn python_registry_manager_sends_c2d_over_amqp() {
    python("c2d_over_amqp.py");
}

#[test]
fn node_service_client_c2d_feedback() {
    node("c2d_feedback.js");
}

#[test]
fn python_module_client() {
    python("module_client.py");
}

#[test]
fn python_edge_deployment_routes_module_to_module() {
    python("edge_routes.py");
}

#[test]
fn python_module_from_edge_environment() {
    python("edge_module_env.py");
}

#[test]
fn python_provisioning_then_hub() {
    python("provisioning.py");
}

#[test]
fn python_registry_manager() {
    python("registry_manager.py");
}

#[test]
fn python_service_sdk_drives_fleetsim_devices() {
    let scenarios = ["scenarios/environmental-sensor.toml", "scenarios/rebootable-device.toml"];
    run_with(&root().join(".venv/bin/python"), "python/fleet_service.py", Some(&scenarios));
}

#[test]
fn node_device_client() {
    node("device_client.js");
}

#[test]
fn node_device_client_over_https() {
    node("device_http.js");
}

#[test]
fn node_registry_list_and_bulk_operations() {
    node("registry.js");
}

#[test]
fn node_dps_over_mqtt_then_hub() {
    node("dps_mqtt.js");
}
