//! Devices from DTDL models: every fixture model (tests/models/, written for these tests: v2 and
//! v3 interfaces, `extends`, components, every schema, and an IoT Central template export) becomes
//! a template whose telemetry, reported properties, command responses and acknowledgements fit the
//! model. The fit is checked by this file's own reading of the DTDL JSON, not by the product's
//! `Schema::check`, so the two must agree. Then a fleet runs from a model against the emulator, and
//! broken models give every problem with its file, position and JSON pointer.

use fleetsim_testkit as common;

use std::path::PathBuf;
use std::sync::Arc;

use fleetsim::device::behaviour::{Agent, Out};
use serde_json::{Map, Value, json};
use tokio::time::{Duration, Instant};

fn models_dir() -> PathBuf {
    common::repo("tests/models")
}

/// A scenario with one template of `lines`, written into a temporary directory.
fn scenario(lines: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.toml");
    let text = format!(
        "[[devices]]\nname = \"m\"\ncount = 2\nid = \"m-{{n}}\"\nprovisioning = \"connection_string\"\nmodel_dir = {:?}\n{lines}\n",
        models_dir().display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn template(lines: &str) -> fleetsim::scenario::model::DeviceTemplate {
    let (_dir, path) = scenario(lines);
    let mut t = fleetsim::scenario::schema::load(&[path]).unwrap_or_else(|e| panic!("{e}"));
    t.remove(0)
}

// ---- An independent reading of DTDL, for checking values ----

/// Every interface of every fixture file, by DTMI (nested and array forms included).
fn interfaces() -> Map<String, Value> {
    fn collect(v: &Value, out: &mut Map<String, Value>) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| collect(i, out)),
            Value::Object(o) if o.get("@type") == Some(&json!("Interface")) => {
                out.insert(o["@id"].as_str().unwrap().to_owned(), v.clone());
            }
            _ => {}
        }
    }
    let mut out = Map::new();
    let mut stack = vec![models_dir()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.ends_with("bad") {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "json") {
                collect(&serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap(), &mut out);
            }
        }
    }
    out
}

/// Named schemas of every interface.
fn named(all: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for i in all.values() {
        for s in i["schemas"].as_array().into_iter().flatten() {
            out.insert(s["@id"].as_str().unwrap().to_owned(), s.clone());
        }
    }
    out
}

/// An interface's contents with `extends` folded in.
fn contents(all: &Map<String, Value>, id: &str) -> Vec<Value> {
    let i = &all[id];
    let mut out = Vec::new();
    for e in i["extends"].as_str().into_iter() {
        out.extend(contents(all, e));
    }
    out.extend(i["contents"].as_array().cloned().unwrap_or_default());
    out
}

fn class(c: &Value) -> &str {
    match &c["@type"] {
        Value::String(s) => s,
        Value::Array(a) => a[0].as_str().unwrap(),
        _ => "",
    }
}

fn numbers(v: &Value, depth: usize) -> bool {
    match v {
        Value::Array(a) if depth == 1 => a.len() >= 2 && a.iter().all(Value::is_number),
        Value::Array(a) => !a.is_empty() && a.iter().all(|x| numbers(x, depth - 1)),
        _ => false,
    }
}

/// Whether `v` fits DTDL schema `s`.
fn fits(s: &Value, v: &Value, named: &Map<String, Value>) -> bool {
    let int_in = |lo: i128, hi: i128| {
        v.as_i64().map(i128::from).or(v.as_u64().map(i128::from)).is_some_and(|n| n >= lo && n <= hi)
    };
    let str_is = |f: &dyn Fn(&str) -> bool| v.as_str().is_some_and(f);
    match s {
        Value::String(name) => match name.as_str() {
            "double" | "float" | "decimal" => v.is_number(),
            "integer" => int_in(i32::MIN.into(), i32::MAX.into()),
            "long" => int_in(i64::MIN.into(), i64::MAX.into()),
            "short" => int_in(i16::MIN.into(), i16::MAX.into()),
            "byte" => int_in(i8::MIN.into(), i8::MAX.into()),
            "unsignedShort" => int_in(0, u16::MAX.into()),
            "unsignedInteger" => int_in(0, u32::MAX.into()),
            "unsignedLong" => int_in(0, u64::MAX.into()),
            "boolean" => v.is_boolean(),
            "string" => v.is_string(),
            "bytes" => str_is(&|s| base64_ok(s)),
            "uuid" => str_is(&|s| s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4),
            "date" => str_is(&|s| s.len() == 10 && &s[4..5] == "-"),
            "dateTime" => str_is(&|s| s.contains('T') && s.len() >= 19),
            "time" => str_is(&|s| s.len() >= 8 && &s[2..3] == ":"),
            "duration" => str_is(&|s| s.starts_with('P') && s.len() > 1),
            "dtmi:iotcentral:schema:geopoint;1" => v["lat"].is_number() && v["lon"].is_number(),
            "dtmi:iotcentral:schema:vector;1" => ["x", "y", "z"].iter().all(|k| v[k].is_number()),
            "point" => v["type"] == "Point" && numbers(&v["coordinates"], 1),
            "lineString" => v["type"] == "LineString" && numbers(&v["coordinates"], 2),
            "polygon" => v["type"] == "Polygon" && numbers(&v["coordinates"], 3),
            other => named.get(other).is_some_and(|d| fits(d, v, named)),
        },
        Value::Object(o) => match o["@type"].as_str().unwrap() {
            "Enum" => o["enumValues"].as_array().unwrap().iter().any(|e| e["enumValue"] == *v),
            "Object" => {
                let fields = o["fields"].as_array().unwrap();
                v.as_object().is_some_and(|m| {
                    m.iter().all(|(k, x)| fields.iter().any(|f| f["name"] == **k && fits(&f["schema"], x, named)))
                })
            }
            "Array" => v.as_array().is_some_and(|a| a.iter().all(|x| fits(&o["elementSchema"], x, named))),
            "Map" => v.as_object().is_some_and(|m| m.values().all(|x| fits(&o["mapValue"]["schema"], x, named))),
            other => panic!("schema type {other}"),
        },
        _ => false,
    }
}

fn base64_ok(s: &str) -> bool {
    s.len().is_multiple_of(4) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
}

/// (component or None, content) for every content of the model, components expanded.
fn model_contents(all: &Map<String, Value>, root: &str) -> Vec<(Option<String>, Value)> {
    let mut out = Vec::new();
    for c in contents(all, root) {
        if class(&c) == "Component" {
            for inner in contents(all, c["schema"].as_str().unwrap()) {
                out.push((Some(c["name"].as_str().unwrap().to_owned()), inner));
            }
        } else {
            out.push((None, c));
        }
    }
    out
}

/// Runs the template's behaviour for a while and checks everything it produced against the model.
fn check_against_model(t: &fleetsim::scenario::model::DeviceTemplate, root: &str) {
    let all = interfaces();
    let named = named(&all);
    let model = model_contents(&all, root);
    let find = |component: Option<&str>, name: &str, want: &str| -> Value {
        model
            .iter()
            .find(|(c, x)| c.as_deref() == component && x["name"] == name && class(x) == want)
            .unwrap_or_else(|| panic!("{component:?}.{name} is not a {want} of {root}"))
            .1
            .clone()
    };
    let start = Instant::now();
    let mut agent = Agent::new(Arc::new(t.behaviour.clone()), "m-1".into(), None, 1, start);
    let mut seen_fields = std::collections::BTreeSet::new();
    // Start-up reports: every read-only property, components wrapped with their marker.
    for out in agent.startup() {
        let Out::Report(patch) = out else { continue };
        for (k, v) in patch.as_object().unwrap() {
            if v.get("__t") == Some(&json!("c")) {
                for (p, x) in v.as_object().unwrap().iter().filter(|(p, _)| *p != "__t") {
                    let c = find(Some(k), p, "Property");
                    assert!(fits(&c["schema"], x, &named), "{k}.{p} = {x} does not fit {}", c["schema"]);
                    seen_fields.insert(format!("{k}.{p}"));
                }
            } else {
                let c = find(None, k, "Property");
                assert!(fits(&c["schema"], v, &named), "{k} = {v} does not fit {}", c["schema"]);
                seen_fields.insert(k.clone());
            }
        }
    }
    agent.on_connected(start);
    for step in 1..=40 {
        for out in agent.on_tick(start + Duration::from_secs(step)) {
            let Out::Telemetry { properties, body } = out else { continue };
            let component = properties.get("$.sub").map(str::to_owned);
            let body: Value = serde_json::from_slice(&body).unwrap();
            for (k, v) in body.as_object().unwrap() {
                let c = find(component.as_deref(), k, "Telemetry");
                assert!(fits(&c["schema"], v, &named), "{component:?}.{k} = {v} does not fit {}", c["schema"]);
                seen_fields.insert(match &component {
                    Some(comp) => format!("{comp}.{k}"),
                    None => k.clone(),
                });
            }
        }
    }
    // Every telemetry and read-only property of the model was produced at least once.
    for (comp, c) in &model {
        let is_ro = class(c) == "Property" && c["writable"] != json!(true);
        if class(c) == "Telemetry" || is_ro {
            let key = match comp {
                Some(x) => format!("{x}.{}", c["name"].as_str().unwrap()),
                None => c["name"].as_str().unwrap().to_owned(),
            };
            assert!(seen_fields.contains(&key), "{key} was never produced; saw {seen_fields:?}");
        }
    }
    // Commands answer with their response schema's shape; a request outside its schema gets 400.
    for (comp, c) in model.iter().filter(|(_, c)| class(c) == "Command") {
        let name = c["name"].as_str().unwrap();
        let method = match comp {
            Some(x) => format!("{x}*{name}"),
            None => name.to_owned(),
        };
        let good = match &c["request"]["schema"] {
            Value::Null => json!(null),
            s if s == "integer" => json!(5),
            s if s == "dateTime" => json!("2026-11-29T10:00:00Z"),
            s => panic!("a request schema this test has no sample for: {s}"),
        };
        let outs = agent.on_method(&method, Some("1"), good.to_string().as_bytes(), start);
        let (status, payload) = response(&outs);
        assert_eq!(status, 200, "{method}: {outs:?}");
        if !c["response"].is_null() {
            assert!(
                fits(&c["response"]["schema"], &payload, &named),
                "{method} answered {payload}, not {}",
                c["response"]["schema"]
            );
        }
        if !c["request"].is_null() {
            let outs = agent.on_method(&method, Some("2"), b"{\"not\": \"it\"}", start);
            assert_eq!(response(&outs).0, 400, "{method}: {outs:?}");
        }
    }
}

fn response(outs: &[Out]) -> (u16, Value) {
    outs.iter()
        .find_map(|o| match o {
            Out::MethodResponse { status, payload, .. } => Some((*status, serde_json::from_slice(payload).unwrap())),
            _ => None,
        })
        .expect("an answer")
}

#[test]
fn a_v2_model_with_extends_components_and_every_schema_fits() {
    let t = template("model = \"dtmi:fleetsim:example:ClimateSensor;1\"\nmodel_interval = \"1s\"");
    assert_eq!(t.model_id.as_deref(), Some("dtmi:fleetsim:example:ClimateSensor;1"));
    check_against_model(&t, "dtmi:fleetsim:example:ClimateSensor;1");
    let names: Vec<String> = t.behaviour.writable.iter().map(|w| format!("{:?}.{}", w.component, w.name)).collect();
    assert_eq!(
        names,
        ["None.targetTemperature", "None.mode", "None.schedule", "None.labels", "Some(\"deviceInfo\").locale"]
    );
}

#[test]
fn a_v3_model_fits() {
    let t = template("model = \"dtmi:fleetsim:example:Tracker;1\"\nmodel_interval = \"1s\"");
    check_against_model(&t, "dtmi:fleetsim:example:Tracker;1");
}

#[test]
fn a_model_with_three_components_fits() {
    let t = template("model = \"dtmi:fleetsim:example:Plant;1\"\nmodel_interval = \"1s\"");
    assert_eq!(t.behaviour.telemetry.len(), 4, "one stream for the root and one per component");
    assert_eq!(
        t.behaviour.commands.iter().map(|c| c.method_name()).collect::<Vec<_>>(),
        ["pump*reset", "valve*reset", "tank*reset"]
    );
    check_against_model(&t, "dtmi:fleetsim:example:Plant;1");
}

#[test]
fn an_iot_central_template_export_fits() {
    let file = models_dir().join("iotcentral/thermostat-template.json");
    let t = template(&format!("model_file = {:?}\nmodel_interval = \"1s\"", file.display().to_string()));
    assert_eq!(t.model_id.as_deref(), Some("dtmi:fleetsimtest:ThermostatController;1"));
    check_against_model(&t, "dtmi:fleetsimtest:ThermostatController;1");
}

#[tokio::test(start_paused = true)]
async fn writable_properties_are_checked_against_their_schema() {
    let t = template("model = \"dtmi:fleetsim:example:ClimateSensor;1\"");
    let now = Instant::now();
    let mut agent = Agent::new(Arc::new(t.behaviour.clone()), "m-1".into(), None, 1, now);
    agent.on_connected(now);
    agent.on_twin(&json!({"desired": {"$version": 1}, "reported": {"$version": 1}}), now);
    let ack = |agent: &mut Agent, patch: Value, version: u64| -> Value {
        let mut outs = agent.on_desired(&patch, version, now, false);
        outs.extend(agent.on_tick(now));
        outs.into_iter()
            .find_map(|o| match o {
                Out::Report(r) => Some(r),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no acknowledgement for {patch}"))
    };
    assert_eq!(ack(&mut agent, json!({"mode": 2}), 2)["mode"]["ac"], 200);
    let refused = ack(&mut agent, json!({"mode": 7}), 3);
    assert_eq!((refused["mode"]["ac"].clone(), refused["mode"]["value"].clone()), (json!(400), json!(2)), "{refused}");
    let schedule = json!({"start": "06:30:00", "length": "PT2H", "days": ["mon", "tue"]});
    assert_eq!(ack(&mut agent, json!({"schedule": schedule}), 4)["schedule"]["ac"], 200);
    assert_eq!(ack(&mut agent, json!({"schedule": {"start": "soon"}}), 5)["schedule"]["ac"], 400);
    assert_eq!(ack(&mut agent, json!({"labels": {"room": "lab", "floor": "2"}}), 6)["labels"]["ac"], 200);
    assert_eq!(ack(&mut agent, json!({"labels": {"room": 3}}), 7)["labels"]["ac"], 400);
    let component = ack(&mut agent, json!({"deviceInfo": {"__t": "c", "locale": "en-GB"}}), 8);
    assert_eq!(component["deviceInfo"]["locale"]["ac"], 200, "{component}");
}

#[test]
fn inline_settings_tune_and_extend_what_the_model_implies() {
    let t = template(
        "model = \"dtmi:fleetsim:example:ClimateSensor;1\"\nmodel_interval = \"250ms\"\n\
         [devices.model_values]\ntemperature = { kind = \"walk\", start = -40, step = 1, min = -45, max = -35 }\n\
         \"deviceInfo.manufacturer\" = \"Fabrikam\"\n\
         [[devices.commands]]\nname = \"reboot\"\nstatus = 202\n",
    );
    assert!(t.behaviour.telemetry.iter().all(|s| s.interval == Duration::from_millis(250)));
    let now = Instant::now();
    let mut agent = Agent::new(Arc::new(t.behaviour.clone()), "m-1".into(), None, 1, now);
    let reports: Vec<Value> =
        agent.startup().into_iter().filter_map(|o| if let Out::Report(r) = o { Some(r) } else { None }).collect();
    assert_eq!(reports[0]["deviceInfo"]["manufacturer"], "Fabrikam", "{reports:?}");
    agent.on_connected(now);
    let mut temps = Vec::new();
    for o in agent.on_tick(now + Duration::from_secs(1)) {
        if let Out::Telemetry { body, properties } = o
            && properties.get("$.sub").is_none()
        {
            temps.push(serde_json::from_slice::<Value>(&body).unwrap()["temperature"].as_f64().unwrap());
        }
    }
    assert!(!temps.is_empty() && temps.iter().all(|t| (-45.0..=-35.0).contains(t)), "{temps:?}");
    let (status, _) = response(&agent.on_method("reboot", Some("1"), b"5", now));
    assert_eq!(status, 202, "the template's own command replaces the model's");
}

#[test]
fn model_values_must_name_a_telemetry_or_read_only_property() {
    // `kind` and `interval` appear in the generated text as keys of other things; `mode` is
    // writable, `reboot` a command, `temprature` a misspelling: none can be tuned.
    let (_dir, path) = scenario(
        "model = \"dtmi:fleetsim:example:ClimateSensor;1\"\n[devices.model_values]\n\
         temperature = 20\nkind = 1\ninterval = 2\nmode = 1\nreboot = 1\ntemprature = 3\n\"deviceInfo.memory\" = 4\n",
    );
    let err = fleetsim::scenario::schema::load(std::slice::from_ref(&path)).unwrap_err().to_string();
    for key in ["kind", "interval", "mode", "reboot", "temprature"] {
        assert!(
            err.contains(&format!("devices[0].model_values.{key}: not a telemetry or read-only property of the model")),
            "{key} in:\n{err}"
        );
    }
    assert!(!err.contains("model_values.temperature:") && !err.contains("deviceInfo.memory:"), "{err}");
}

#[test]
fn broken_models_give_every_problem_with_file_position_and_pointer() {
    let bad = models_dir().join("bad");
    let (_dir, path) = scenario(&format!("model_file = {:?}", bad.join("broken.json").display().to_string()));
    let err = fleetsim::scenario::schema::load(std::slice::from_ref(&path)).unwrap_err().to_string();
    let broken = bad.join("broken.json").display().to_string();
    let expect = [
        format!("{broken}:7:"),
        "/contents/0/name: \"t-1\" is not a valid name".to_owned(),
        "/contents/1/schema: unknown schema \"velocity\"".to_owned(),
        "/contents/2/schema: an Enum needs at least one value".to_owned(),
        "dtmi:fleetsim:bad:Missing;1 is referenced but not found".to_owned(),
        "dtmi:fleetsim:bad:AlsoMissing;1 is referenced but not found".to_owned(),
    ];
    for e in &expect {
        assert!(err.contains(e.as_str()), "missing {e:?} in:\n{err}");
    }
    let (_dir2, path2) = scenario(&format!("model_file = {:?}", bad.join("notjson.json").display().to_string()));
    let err = fleetsim::scenario::schema::load(&[path2]).unwrap_err().to_string();
    assert!(err.contains("notjson.json:1:") && err.contains("not JSON"), "{err}");
    let (_dir3, path3) = scenario("model = \"dtmi:fleetsim:example:Nowhere;1\"");
    let err = fleetsim::scenario::schema::load(&[path3]).unwrap_err().to_string();
    assert!(err.contains("dtmi:fleetsim:example:Nowhere;1 is referenced but not found (looked for"), "{err}");
    let (_dir4, path4) = scenario("model = \"not-a-dtmi\"");
    let err = fleetsim::scenario::schema::load(&[path4]).unwrap_err().to_string();
    assert!(err.contains("devices[0].model: \"not-a-dtmi\" is not a DTMI"), "{err}");
}

#[test]
fn an_imported_scenario_runs_what_the_model_runs_directly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("imported.toml");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_fleetsim"))
        .args(["model", "import", "dtmi:fleetsim:example:ClimateSensor;1", "--model-dir"])
        .arg(models_dir())
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("# temperature: double, Temperature, degreeCelsius"), "{text}");
    let imported = fleetsim::scenario::schema::load(&[out]).unwrap_or_else(|e| panic!("{e}\n{text}")).remove(0);
    let direct = template("model = \"dtmi:fleetsim:example:ClimateSensor;1\"");
    assert_eq!(imported.behaviour, direct.behaviour);
    assert_eq!(imported.model_id, direct.model_id);
    // A broken model: every problem on standard error, exit 64.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_fleetsim"))
        .args(["model", "import"])
        .arg(models_dir().join("bad/broken.json"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("unknown schema \"velocity\"") && err.contains("is referenced but not found"), "{err}");
}

#[tokio::test]
async fn the_seed_sensor_runs_from_its_model_alone_against_the_emulator() {
    let f = common::FleetUnderTest::start(&[common::repo("scenarios/environmental-sensor-from-model.toml")], "").await;
    assert_eq!(f.fleet().identities(), 5);
    let dev = "env-model-0002";
    let (_, _, reg) =
        f.rest_as("provisioningserviceowner", "GET", &format!("/emulator/registrations/{dev}"), None, &[]).await;
    assert_eq!(reg["requestPayload"]["modelId"], "dtmi:com:example:EnvironmentalSensor;1", "{reg}");
    let (_, blink) = f.invoke(dev, None, "blink", json!(3)).await;
    assert_eq!(blink["status"], 200, "{blink}");
    assert!(blink["payload"]["description"].is_string(), "{blink}");
    let (_, bad) = f.invoke(dev, None, "blink", json!("often")).await;
    assert_eq!(bad["status"], 400, "a request outside the schema: {bad}");
    let v = f.set_desired(dev, None, json!({"brightness": 42.5})).await;
    f.reported_until(dev, None, "brightness", |r| r["ac"] == 200 && r["av"] == v && r["value"] == 42.5).await;
    let v = f.set_desired(dev, None, json!({"brightness": "bright"})).await;
    f.reported_until(dev, None, "brightness", |r| r["ac"] == 400 && r["av"] == v && r["value"] == 42.5).await;
    let twin = f.twin(dev, None).await;
    assert!(twin["properties"]["reported"]["state"].is_boolean(), "{twin}");
    f.wait_for("telemetry", || async { f.events(dev, None).await["received"].as_u64().unwrap_or(0) >= 1 }).await;
    let events = f.events(dev, None).await;
    let m = &events["messages"][0];
    assert_eq!(m["systemProperties"]["dt-dataschema"], "dtmi:com:example:EnvironmentalSensor;1");
    let body: Value = serde_json::from_str(m["body"].as_str().unwrap()).unwrap();
    assert!((18.0..=28.0).contains(&body["temp"].as_f64().unwrap()), "{body}");
    assert!((30.0..=70.0).contains(&body["humid"].as_f64().unwrap()), "{body}");
    // The embedded emulator checks the devices against the same model: everything fits.
    let (status, _, found) = f.rest("GET", &format!("/emulator/devices/{dev}/modelcheck"), None).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["modelId"], "dtmi:com:example:EnvironmentalSensor;1");
    assert!(found["checked"].as_u64().unwrap() >= 3, "{found}");
    assert_eq!(found["mismatches"], 0, "{found}");
}

#[tokio::test]
async fn the_emulator_counts_what_does_not_fit_the_announced_model() {
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.toml");
    // Announces the seed sensor's model, then sends and reports what it does not describe.
    std::fs::write(
        &wrong,
        "[[devices]]\nname = \"wrong\"\ncount = 1\nid = \"wrong-{n}\"\nprovisioning = \"connection_string\"\n\
         model_id = \"dtmi:com:example:EnvironmentalSensor;1\"\n\
         [devices.telemetry]\ninterval = \"100ms\"\nfields = { temp = \"hot\", colour = 3 }\n\
         [devices.reported]\nstate = \"on\"\n\
         [[devices.commands]]\nname = \"blink\"\nresponse = { description = 7 }\n",
    )
    .unwrap();
    let f = common::FleetUnderTest::start(&[common::repo("scenarios/environmental-sensor-from-model.toml"), wrong], "")
        .await;
    let check = || async { f.rest("GET", "/emulator/devices/wrong-1/modelcheck", None).await.2 };
    f.wait_for("telemetry and the report checked", || async { check().await["mismatches"].as_u64().unwrap_or(0) >= 3 })
        .await;
    let (_, blink) = f.invoke("wrong-1", None, "blink", json!(1)).await;
    assert_eq!(blink["status"], 200);
    let found = check().await;
    let listed: Vec<String> = found["mismatched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{} {}: {}",
                m["kind"].as_str().unwrap(),
                m["path"].as_str().unwrap(),
                m["reason"].as_str().unwrap()
            )
        })
        .collect();
    for want in [
        "telemetry temp: value: expected double",
        "telemetry colour: not a telemetry of the model",
        "property state: value: expected boolean",
        "command blink: the response: .description: expected string",
    ] {
        assert!(listed.iter().any(|r| r.starts_with(want)), "missing {want} in {listed:#?}");
    }
    let rendered = f.hub_state().metrics.render();
    assert!(rendered.contains("fleetsim_hub_model_mismatches_total{kind=\"command\"} 1"), "{rendered}");
}

#[tokio::test]
async fn every_fixture_runs_as_a_fleet_and_the_emulator_finds_nothing_unmodelled() {
    let models = models_dir().display().to_string();
    let export = models_dir().join("iotcentral/thermostat-template.json").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fixtures.toml");
    let template = |name: &str, source: &str| {
        format!(
            "[[devices]]\nname = \"{name}\"\ncount = 2\nid = \"{name}-{{n}}\"\nprovisioning = \"connection_string\"\n\
             model_dir = {models:?}\n{source}\nmodel_interval = \"200ms\"\n"
        )
    };
    let text = [
        template("climate", "model = \"dtmi:fleetsim:example:ClimateSensor;1\""),
        template("tracker", "model = \"dtmi:fleetsim:example:Tracker;1\""),
        template("plant", "model = \"dtmi:fleetsim:example:Plant;1\""),
        template("central", &format!("model_file = {export:?}")),
    ]
    .concat();
    std::fs::write(&path, text).unwrap();
    let f = common::FleetUnderTest::start(&[path], "").await;
    assert_eq!(f.fleet().identities(), 8);
    // Commands and writable properties through the service API, so responses and acks are checked too.
    for (dev, method, payload) in [
        ("climate-1", "reboot", json!(5)),
        ("climate-1", "getReport", json!(null)),
        ("climate-1", "deviceInfo*ping", json!(null)),
        ("plant-2", "valve*reset", json!(null)),
        ("central-1", "thermostat1*getMaxMinReport", json!("2026-11-29T10:00:00Z")),
    ] {
        let (_, r) = f.invoke(dev, None, method, payload).await;
        assert_eq!(r["status"], 200, "{dev} {method}: {r}");
    }
    let v = f.set_desired("climate-2", None, json!({"mode": 1, "labels": {"room": "lab"}})).await;
    f.reported_until("climate-2", None, "mode", |r| r["ac"] == 200 && r["av"] == v).await;
    let v = f.set_desired("central-2", None, json!({"thermostat1": {"__t": "c", "targetTemperature": 22.5}})).await;
    f.wait_for("the component acknowledgement", || async {
        let twin = f.twin("central-2", None).await;
        twin["properties"]["reported"]["thermostat1"]["targetTemperature"]["av"] == v
    })
    .await;
    for dev in ["climate-1", "climate-2", "tracker-1", "tracker-2", "plant-1", "plant-2", "central-1", "central-2"] {
        let check = || async { f.rest("GET", &format!("/emulator/devices/{dev}/modelcheck"), None).await.2 };
        f.wait_for(&format!("{dev}: plenty checked"), || async {
            let found = check().await;
            if found.get("modelProblem").is_some() || found["mismatches"] != 0 {
                panic!("{dev}: {found:#}");
            }
            found["checked"].as_u64().unwrap_or(0) >= 30
        })
        .await;
        let found = check().await;
        assert_eq!(found["mismatches"], 0, "{dev}: {found:#}");
        assert!(found.get("modelProblem").is_none(), "{dev}: {found:#}");
    }
    let rendered = f.hub_state().metrics.render();
    assert!(
        !rendered.lines().any(|l| l.starts_with("fleetsim_hub_model_mismatches_total{") && !l.ends_with(" 0")),
        "{rendered}"
    );
}
