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
    let root = root();
    assert!(
        interpreter.exists(),
        "{} is missing: run scripts/setup-sdks.sh (the README test command does) to install Microsoft's SDKs",
        interpreter.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let script_path = root.join("tests/conformance").join(script);
    let out = Command::new(root.join("tests/conformance/run-in-netns.sh"))
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
fn python_module_client() {
    python("module_client.py");
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
fn node_device_client() {
    node("device_client.js");
}

#[test]
fn node_dps_over_mqtt_then_hub() {
    node("dps_mqtt.js");
}
