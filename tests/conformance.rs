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

fn run_with(interpreter: &Path, script: &str, fleet_scenarios: Option<&[&str]>) {
    run_env(interpreter, script, fleet_scenarios, &[]);
}

/// Runs a script against a fresh hub, or against `fleetsim run` with the given scenarios, with
/// `env` added to its environment.
fn run_env(interpreter: &Path, script: &str, fleet_scenarios: Option<&[&str]>, env: &[(&str, &Path)]) {
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
    cmd.envs(env.iter().copied());
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

/// Test certificates for the X.509 scripts, as PEM files in a fresh directory (`X509_DIR`):
/// `root.pem` (a CA the script uploads), `ss` (self-signed, CN `x509-ss`, with `ss.sha1` and
/// `ss.sha256` thumbprints), `ca-dev` (CN `x509-ca`, signed by the root), `wrong` (the same CN
/// signed by another CA) and `expired` (signed by the root, valid 2020-2021); each `NAME.pem` with
/// `NAME.key.pem`. Made with rcgen, ECDSA P-256.
fn x509_files() -> tempfile::TempDir {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let dir = tempfile::tempdir().unwrap();
    let params = |cn: &str, from: i32, to: i32| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.not_before = rcgen::date_time_ymd(from, 1, 1);
        p.not_after = rcgen::date_time_ymd(to, 1, 1);
        p
    };
    let new_key = || KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let write = |name: &str, cert: &rcgen::Certificate, key: &KeyPair| {
        std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.path().join(format!("{name}.key.pem")), key.serialize_pem()).unwrap();
    };
    let ca = |cn: &str| {
        let mut p = params(cn, 2020, 2090);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = new_key();
        let cert = p.self_signed(&key).unwrap();
        (p, key, cert)
    };
    let (root_params, root_key, root) = ca("fleetsim conformance root");
    let (other_params, other_key, _) = ca("some other root");
    std::fs::write(dir.path().join("root.pem"), root.pem()).unwrap();
    let root_issuer = Issuer::from_params(&root_params, &root_key);
    let other_issuer = Issuer::from_params(&other_params, &other_key);
    let key = new_key();
    let ss = params("x509-ss", 2020, 2090).self_signed(&key).unwrap();
    write("ss", &ss, &key);
    let (sha1, sha256) = fleetsim::hub::x509::thumbprints(ss.der());
    std::fs::write(dir.path().join("ss.sha1"), sha1).unwrap();
    std::fs::write(dir.path().join("ss.sha256"), sha256).unwrap();
    for (name, from, to, issuer) in [
        ("ca-dev", 2020, 2090, &root_issuer),
        ("wrong", 2020, 2090, &other_issuer),
        ("expired", 2020, 2021, &root_issuer),
    ] {
        let key = new_key();
        let cert = params("x509-ca", from, to).signed_by(&key, issuer).unwrap();
        write(name, &cert, &key);
    }
    dir
}

#[test]
fn python_x509_device_client() {
    let certs = x509_files();
    let python = root().join(".venv/bin/python");
    run_env(&python, "python/x509_device_client.py", None, &[("X509_DIR", certs.path())]);
}

#[test]
fn node_x509_device_client() {
    assert!(
        root().join("tests/conformance/node/node_modules/azure-iot-device").exists(),
        "Node SDKs missing: run scripts/setup-sdks.sh"
    );
    let certs = x509_files();
    run_env(Path::new("/usr/bin/node"), "node/x509_device_client.js", None, &[("X509_DIR", certs.path())]);
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
