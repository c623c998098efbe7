//! What can be checked here of the deployment files (no Docker engine, no cluster): the
//! Kubernetes manifests parse and agree with each other, every pod name yields its shard, the
//! ConfigMap's config and scenarios load, the Dockerfile copies files that exist and runs as a
//! non-root user, the systemd unit raises the file limit and points at a valid config, and every
//! metric the Grafana dashboard queries is one fleetsim exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fleetsim::fleet::expand::Shard;
use serde_yaml::Value;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn manifest(name: &str) -> Value {
    let text = std::fs::read_to_string(repo("deploy/kubernetes").join(name)).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn kubernetes_manifests_agree_and_every_pod_gets_its_shard() {
    let kustomization = manifest("kustomization.yaml");
    for r in kustomization["resources"].as_sequence().unwrap() {
        let doc = manifest(r.as_str().unwrap());
        assert!(doc["kind"].is_string() && doc["apiVersion"].is_string(), "{r:?}");
    }
    let sts = manifest("statefulset.yaml");
    let name = sts["metadata"]["name"].as_str().unwrap();
    let replicas = sts["spec"]["replicas"].as_u64().unwrap();
    let pod = &sts["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let shard_arg = args[args.iter().position(|a| *a == "--shard").unwrap() + 1];
    assert_eq!(shard_arg, format!("$(POD_NAME)/{replicas}"), "the shard count must equal the replica count");
    let env = container["env"].as_sequence().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "POD_NAME" && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"),
        "POD_NAME comes from the pod's own name"
    );
    // Kubernetes substitutes $(POD_NAME) with `name-ordinal`; each ordinal must map to itself.
    for ordinal in 0..replicas {
        let arg = shard_arg.replace("$(POD_NAME)", &format!("{name}-{ordinal}"));
        assert_eq!(arg.parse::<Shard>().unwrap(), Shard { index: ordinal, count: replicas }, "{arg}");
    }
    assert_eq!(pod["securityContext"]["runAsNonRoot"], Value::Bool(true));

    // The Service selects the pods and exposes the port the probes and Prometheus use.
    let svc = manifest("service.yaml");
    assert_eq!(svc["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"]);
    assert_eq!(svc["metadata"]["name"].as_str(), sts["spec"]["serviceName"].as_str());
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], container["ports"][0]["name"]);
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");

    // The ConfigMap's files load as the pod would see them, with the Secret's variables set.
    let cm = manifest("configmap.yaml");
    let secret = manifest("secret.yaml");
    assert_eq!(container["envFrom"][0]["secretRef"]["name"], secret["metadata"]["name"]);
    let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (file, text) in cm["data"].as_mapping().unwrap() {
        std::fs::write(dir.path().join(file.as_str().unwrap()), text.as_str().unwrap()).unwrap();
    }
    let config_text = std::fs::read_to_string(dir.path().join("config.toml")).unwrap();
    let config_text = config_text.replace(mount, &dir.path().display().to_string());
    let needed: BTreeSet<String> =
        secret["stringData"].as_mapping().unwrap().keys().map(|k| k.as_str().unwrap().into()).collect();
    for var in ["FLEETSIM_GROUP_KEY", "FLEETSIM_SERVICE_CONNECTION_STRING"] {
        assert!(needed.contains(var) && config_text.contains(var), "{var} is in the Secret and used by the config");
    }
    // SAFETY: this test is the only one in its binary touching these variables.
    unsafe {
        std::env::set_var("FLEETSIM_GROUP_KEY", "c2VjcmV0LWdyb3VwLWtleQ==");
        std::env::set_var(
            "FLEETSIM_SERVICE_CONNECTION_STRING",
            "HostName=h.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5",
        );
    }
    let cfg = fleetsim::config::DaemonConfig::parse(&dir.path().join("config.toml"), config_text)
        .unwrap_or_else(|e| panic!("the ConfigMap's config: {e}"));
    let templates = fleetsim::scenario::schema::load(&cfg.scenarios).unwrap_or_else(|e| panic!("{e}"));
    let devices: u64 = templates.iter().map(|t| t.count).sum();
    assert_eq!(devices, 1_000_000, "the documented 1M layout");
    assert_eq!(cfg.metrics_addr.unwrap().port(), container["ports"][0]["containerPort"].as_u64().unwrap() as u16);
}

#[test]
fn the_dockerfile_is_multi_stage_non_root_and_copies_what_exists() {
    let text = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let froms = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(froms >= 2, "a build stage and a runtime stage");
    let last_user = text.lines().rev().find_map(|l| l.strip_prefix("USER ")).expect("a USER line");
    assert_ne!(last_user.trim(), "0");
    assert_ne!(last_user.trim(), "root");
    for line in text.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(repo(src).exists(), "COPY {src}: no such file in the repository");
        }
    }
    // In the image the config sits in /etc/fleetsim beside the scenarios.
    let text = std::fs::read_to_string(repo("deploy/docker/config.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(repo("scenarios"), dir.path().join("scenarios")).unwrap();
    fleetsim::config::DaemonConfig::parse(&dir.path().join("config.toml"), text).unwrap_or_else(|e| panic!("{e}"));
    let hub: fleetsim::hub::config::HubConfig =
        toml::from_str(&std::fs::read_to_string(repo("deploy/docker/hub.toml")).unwrap()).unwrap();
    hub.validate().unwrap();
}

#[test]
fn the_systemd_unit_raises_the_file_limit_and_runs_a_valid_config() {
    let text = std::fs::read_to_string(repo("deploy/systemd/fleetsim.service")).unwrap();
    let value = |key: &str| {
        text.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("no {key}="))
    };
    assert!(value("LimitNOFILE").parse::<u64>().unwrap() >= 100_000);
    assert!(value("ExecReload").contains("-HUP"), "systemctl reload sends SIGHUP");
    let exec: Vec<&str> = value("ExecStart").split_whitespace().collect();
    assert_eq!(&exec[1..4], ["run", "--config", "/etc/fleetsim/config.toml"]);
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(repo("scenarios"), dir.path().join("scenarios")).unwrap();
    let cfg_text = std::fs::read_to_string(repo("deploy/systemd/config.toml")).unwrap();
    let cfg = fleetsim::config::DaemonConfig::parse(&dir.path().join("config.toml"), cfg_text).unwrap();
    let fleetsim::config::HubMode::Embedded { data_dir, .. } = cfg.hub else { panic!("embedded") };
    assert!(
        data_dir.starts_with(format!("/var/lib/{}", value("StateDirectory"))),
        "state lives where the unit may write"
    );
}

/// Every `fleetsim_*` name the fleet and the emulator register.
fn exported_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in ["src/metrics.rs", "src/hub/metrics.rs"] {
        let text = std::fs::read_to_string(repo(file)).unwrap();
        for piece in text.split('"').skip(1).step_by(2) {
            if piece.starts_with("fleetsim_") && piece.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                names.insert(piece.to_owned());
            }
        }
    }
    names
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let exported = exported_metrics();
    assert!(exported.contains("fleetsim_devices") && exported.contains("fleetsim_hub_connections"));
    // The rendered registries agree with the source scan for what they show.
    let rendered =
        fleetsim::metrics::FleetMetrics::default().render() + &fleetsim::hub::metrics::HubMetrics::default().render();
    for line in rendered.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = line.split_whitespace().next().unwrap();
        assert!(exported.contains(name), "{name} is rendered but not found by the scan");
    }
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("deploy/grafana/fleetsim.json")).unwrap()).unwrap();
    let mut queried = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(base) = word.strip_prefix("fleetsim_").map(|_| word) {
                    let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| base.strip_suffix(s)).unwrap_or(base);
                    assert!(
                        exported.contains(base),
                        "panel {:?} queries {word}, which fleetsim does not export",
                        panel["title"]
                    );
                    queried += 1;
                }
            }
        }
    }
    assert!(queried >= 20, "the dashboard covers the metrics ({queried} references)");
}

/// The CI Job: an Indexed Job whose completion index is the shard, whose success needs every
/// shard to pass, and which runs the shared ConfigMap in CI mode.
#[test]
fn the_ci_job_shards_by_completion_index_and_fails_with_any_shard() {
    let text = std::fs::read_to_string(repo("deploy/kubernetes-ci/job.yaml")).unwrap();
    let job: Value = serde_yaml::from_str(&text).unwrap();
    let k: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo("deploy/kubernetes-ci/kustomization.yaml")).unwrap())
            .unwrap();
    let resources: Vec<&str> = k["resources"].as_sequence().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert_eq!(
        resources,
        ["../kubernetes", "job.yaml"],
        "the base is a directory: kustomize loads no file outside the root"
    );
    let patch = k["patches"][0]["patch"].as_str().unwrap();
    assert!(
        patch.contains("$patch: delete") && patch.contains("kind: StatefulSet"),
        "no long-running fleet beside the Job"
    );

    let spec = &job["spec"];
    assert_eq!((job["kind"].as_str(), spec["completionMode"].as_str()), (Some("Job"), Some("Indexed")));
    let n = spec["completions"].as_u64().unwrap();
    assert_eq!(spec["parallelism"].as_u64(), Some(n), "every shard runs at once");
    assert_eq!(spec["backoffLimit"].as_u64(), Some(0), "a failed shard fails the Job instead of being retried");
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let shard = args[args.iter().position(|a| *a == "--shard").unwrap() + 1];
    assert_eq!(shard, format!("$(JOB_COMPLETION_INDEX)/{n}"));
    assert!(args.contains(&"--duration"), "CI mode: the exit status is the shard's verdict");
    let env = container["env"].as_sequence().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "JOB_COMPLETION_INDEX"
            && e["valueFrom"]["fieldRef"]["fieldPath"]
                == "metadata.annotations['batch.kubernetes.io/job-completion-index']"),
        "declared, so $(JOB_COMPLETION_INDEX) expands in args"
    );
    for i in 0..n {
        let arg = shard.replace("$(JOB_COMPLETION_INDEX)", &i.to_string());
        assert_eq!(arg.parse::<Shard>().unwrap(), Shard { index: i, count: n });
    }
    // It mounts the ConfigMap the StatefulSet uses, and its Secret.
    let cm = manifest("configmap.yaml");
    assert_eq!(pod["volumes"][0]["configMap"]["name"], cm["metadata"]["name"]);
    assert_eq!(container["envFrom"][0]["secretRef"]["name"], manifest("secret.yaml")["metadata"]["name"]);
}
