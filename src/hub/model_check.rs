//! The emulator's model check, like IoT Central's "unmodelled data" view: with a model directory
//! configured (`models_dir`), what a device sends is checked against the Plug and Play model it
//! announced (the MQTT username's `model-id`): every telemetry field, every reported property (an
//! acknowledgement's `value` for writable ones) and every command response. What does not fit is
//! counted per device, with the latest examples, so a device developer learns of a mismatch before
//! Azure does. Models are read once per DTMI (`modelrepo`) and kept.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;

use crate::iot::dtdl::{ContentKind, Schema};
use crate::modelrepo::{self, Source};

/// How many distinct mismatched paths a device keeps (each with its count and latest reason).
const PATHS: usize = 100;
/// How many devices are tracked at most (beyond it, new devices are not checked): bounded memory.
const MAX_DEVICES: usize = 1_000_000;

/// A model, flattened for checking: by (component, name).
#[derive(Debug, Default)]
struct Checker {
    telemetry: HashMap<(Option<String>, String), Schema>,
    /// The schema and whether the property is writable.
    properties: HashMap<(Option<String>, String), (Schema, bool)>,
    /// Response schemas by method name (`component*command` for components).
    commands: HashMap<String, Option<Schema>>,
    components: HashSet<String>,
}

impl Checker {
    fn from_model(model: &modelrepo::Model) -> Result<Checker, String> {
        let parts = model.parts().map_err(|p| p.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))?;
        let mut c = Checker::default();
        for (component, contents) in parts {
            if let Some(comp) = &component {
                c.components.insert(comp.clone());
            }
            for content in contents {
                let key = (component.clone(), content.name.clone());
                match content.kind {
                    ContentKind::Telemetry { schema } => {
                        c.telemetry.insert(key, schema);
                    }
                    ContentKind::Property { schema, writable } => {
                        c.properties.insert(key, (schema, writable));
                    }
                    ContentKind::Command { response, .. } => {
                        let method = match &component {
                            Some(comp) => format!("{comp}*{}", content.name),
                            None => content.name.clone(),
                        };
                        c.commands.insert(method, response.map(|(_, s)| s));
                    }
                    ContentKind::Component { .. } | ContentKind::Relationship => {}
                }
            }
        }
        Ok(c)
    }
}

/// One thing a device sent that its model does not describe.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Mismatch {
    /// `telemetry`, `property` or `command`.
    pub kind: &'static str,
    /// `component.name` or `name` (and a path into the value).
    pub path: String,
    pub reason: String,
}

/// One mismatched path: how often, and why the latest time.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Mismatched {
    pub kind: &'static str,
    pub path: String,
    pub reason: String,
    pub count: u64,
}

/// What the check found for one device.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Findings {
    pub model_id: String,
    /// Why the model could not be used (not found, broken), if so: nothing is checked then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_problem: Option<String>,
    /// Values checked (a telemetry field, a reported property, a command response each count one).
    pub checked: u64,
    pub mismatches: u64,
    /// Each mismatched path (at most 100, first seen first), like IoT Central's list of
    /// unmodelled data: a field sent every second is one entry with its count.
    pub mismatched: Vec<Mismatched>,
}

/// Checks devices against their models.
pub struct ModelCheck {
    dir: PathBuf,
    models: Mutex<HashMap<String, Arc<Result<Checker, String>>>>,
    devices: Mutex<HashMap<String, Findings>>,
}

impl ModelCheck {
    /// Checks against the models in `dir` (the device models repository layout).
    pub fn new(dir: PathBuf) -> ModelCheck {
        ModelCheck { dir, models: Mutex::default(), devices: Mutex::default() }
    }

    fn checker(&self, model_id: &str) -> Arc<Result<Checker, String>> {
        if let Some(c) = self.models.lock().unwrap_or_else(|e| e.into_inner()).get(model_id) {
            return c.clone();
        }
        // Read outside the lock: a slow disk must not stall every device's telemetry.
        let loaded = match modelrepo::load(&Source::Dtmi { id: model_id.to_owned(), dir: self.dir.clone() }) {
            Ok(model) => Checker::from_model(&model),
            Err(problems) => Err(problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")),
        };
        let loaded = Arc::new(loaded);
        self.models.lock().unwrap_or_else(|e| e.into_inner()).entry(model_id.to_owned()).or_insert(loaded).clone()
    }

    /// Records what checking one message found for `device` (`device` or `device/module`).
    fn record(&self, device: &str, model_id: &str, checked: u64, found: Vec<Mismatch>, problem: Option<&str>) {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if !devices.contains_key(device) && devices.len() >= MAX_DEVICES {
            return;
        }
        let f = devices.entry(device.to_owned()).or_default();
        if f.model_id != model_id {
            *f = Findings { model_id: model_id.to_owned(), ..Findings::default() };
        }
        f.model_problem = problem.map(str::to_owned);
        f.checked += checked;
        f.mismatches += found.len() as u64;
        for m in found {
            if let Some(x) = f.mismatched.iter_mut().find(|x| x.kind == m.kind && x.path == m.path) {
                x.count += 1;
                x.reason = m.reason;
            } else if f.mismatched.len() < PATHS {
                f.mismatched.push(Mismatched { kind: m.kind, path: m.path, reason: m.reason, count: 1 });
            }
        }
    }

    /// Runs `check` against the device's model; the count of mismatches found (0 when the model
    /// cannot be used, which is recorded instead).
    fn with_model(&self, device: &str, model_id: &str, check: impl FnOnce(&Checker) -> (u64, Vec<Mismatch>)) -> usize {
        let checker = self.checker(model_id);
        match checker.as_ref() {
            Ok(c) => {
                let (checked, found) = check(c);
                let n = found.len();
                self.record(device, model_id, checked, found, None);
                n
            }
            Err(why) => {
                self.record(device, model_id, 0, Vec::new(), Some(why));
                0
            }
        }
    }

    /// A telemetry message from a device that announced `model_id`; `component` is its `$.sub`.
    pub fn telemetry(&self, device: &str, model_id: &str, component: Option<&str>, body: &[u8]) -> usize {
        self.with_model(device, model_id, |c| {
            let comp = component.map(str::to_owned);
            let mut found = Vec::new();
            let label = |name: &str| match component {
                Some(x) => format!("{x}.{name}"),
                None => name.to_owned(),
            };
            if let Some(x) = &comp
                && !c.components.contains(x)
            {
                found.push(Mismatch {
                    kind: "telemetry",
                    path: x.clone(),
                    reason: "not a component of the model".into(),
                });
                return (1, found);
            }
            let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
                found.push(Mismatch {
                    kind: "telemetry",
                    path: label(""),
                    reason: "the body is not a JSON object".into(),
                });
                return (1, found);
            };
            for (name, v) in &fields {
                match c.telemetry.get(&(comp.clone(), name.clone())) {
                    Some(schema) => {
                        if let Err(why) = schema.check(v) {
                            found.push(Mismatch { kind: "telemetry", path: label(name), reason: why });
                        }
                    }
                    None => found.push(Mismatch {
                        kind: "telemetry",
                        path: label(name),
                        reason: "not a telemetry of the model".into(),
                    }),
                }
            }
            (fields.len() as u64, found)
        })
    }

    /// A reported-properties patch.
    pub fn reported(&self, device: &str, model_id: &str, patch: &Value) -> usize {
        self.with_model(device, model_id, |c| {
            let mut found = Vec::new();
            let mut checked = 0;
            let Some(top) = patch.as_object() else { return (0, found) };
            for (k, v) in top {
                if c.components.contains(k) && v.get("__t") == Some(&Value::from("c")) {
                    for (p, x) in v.as_object().into_iter().flatten().filter(|(p, _)| *p != "__t") {
                        checked += 1;
                        check_property(c, Some(k), p, x, &mut found);
                    }
                } else {
                    checked += 1;
                    check_property(c, None, k, v, &mut found);
                }
            }
            (checked, found)
        })
    }

    /// A direct method's answer.
    pub fn command_response(&self, device: &str, model_id: &str, method: &str, status: u16, payload: &Value) -> usize {
        self.with_model(device, model_id, |c| {
            let mut found = Vec::new();
            match c.commands.get(method) {
                None => found.push(Mismatch {
                    kind: "command",
                    path: method.to_owned(),
                    reason: "not a command of the model".into(),
                }),
                Some(Some(schema)) if (200..300).contains(&status) => {
                    if let Err(why) = schema.check(payload) {
                        found.push(Mismatch {
                            kind: "command",
                            path: method.to_owned(),
                            reason: format!("the response: {why}"),
                        });
                    }
                }
                Some(_) => {}
            }
            (1, found)
        })
    }

    /// What was found for a device, if it announced a model and sent anything.
    pub fn findings(&self, device: &str) -> Option<Findings> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).get(device).cloned()
    }
}

fn check_property(c: &Checker, component: Option<&str>, name: &str, v: &Value, found: &mut Vec<Mismatch>) {
    let path = match component {
        Some(x) => format!("{x}.{name}"),
        None => name.to_owned(),
    };
    // A null deletes the property: nothing to check.
    if v.is_null() {
        return;
    }
    match c.properties.get(&(component.map(str::to_owned), name.to_owned())) {
        None => found.push(Mismatch { kind: "property", path, reason: "not a property of the model".into() }),
        Some((schema, writable)) => {
            // A writable property is reported as its acknowledgement; the value is what is checked.
            let value = if *writable { v.get("value") } else { Some(v) };
            match value {
                Some(x) => {
                    if let Err(why) = schema.check(x) {
                        found.push(Mismatch { kind: "property", path, reason: why });
                    }
                }
                None if *writable && v.get("ac").is_some() => {}
                None => found.push(Mismatch {
                    kind: "property",
                    path,
                    reason: "a writable property is reported as {value, ac, av}".into(),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check() -> ModelCheck {
        ModelCheck::new(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/models"))
    }

    const MODEL: &str = "dtmi:fleetsim:example:ClimateSensor;1";

    #[test]
    fn telemetry_that_fits_passes_and_what_does_not_is_named() {
        let c = check();
        assert_eq!(c.telemetry("d", MODEL, None, br#"{"temperature": 21.5, "status": "ok", "uptime": 7}"#), 0);
        assert_eq!(c.telemetry("d", MODEL, None, br#"{"temperature": "warm", "colour": "red"}"#), 2);
        assert_eq!(c.telemetry("d", MODEL, Some("deviceInfo"), br#"{"freeMemory": 100}"#), 0);
        assert_eq!(c.telemetry("d", MODEL, Some("nope"), br#"{"x": 1}"#), 1);
        assert_eq!(c.telemetry("d", MODEL, None, b"not json"), 1);
        assert_eq!(c.telemetry("d", MODEL, None, br#"{"colour": "blue"}"#), 1);
        let f = c.findings("d").unwrap();
        assert_eq!((f.checked, f.mismatches), (3 + 2 + 1 + 1 + 1 + 1, 5));
        let paths: Vec<(&str, u64)> = f.mismatched.iter().map(|m| (m.path.as_str(), m.count)).collect();
        assert_eq!(paths, [("temperature", 1), ("colour", 2), ("nope", 1), ("", 1)]);
        assert!(f.mismatched[0].reason.contains("expected double"), "{:?}", f.mismatched[0]);
    }

    #[test]
    fn reported_properties_and_acknowledgements_are_checked() {
        let c = check();
        let good = json!({
            "serialNumber": "SN1",
            "mode": {"value": 2, "ac": 200, "av": 3},
            "deviceInfo": {"__t": "c", "manufacturer": "Fabrikam", "locale": {"value": "en", "ac": 200, "av": 1}}
        });
        assert_eq!(c.reported("d", MODEL, &good), 0);
        let bad = json!({"mode": {"value": 9, "ac": 200, "av": 4}, "firmware": {"version": 3}, "colour": "red"});
        assert_eq!(c.reported("d", MODEL, &bad), 3);
        assert_eq!(c.findings("d").unwrap().checked, 4 + 3);
    }

    #[test]
    fn command_responses_are_checked_against_the_response_schema() {
        let c = check();
        assert_eq!(
            c.command_response("d", MODEL, "reboot", 200, &json!({"accepted": true, "at": "2026-11-29T10:00:00Z"})),
            0
        );
        assert_eq!(c.command_response("d", MODEL, "reboot", 200, &json!({"accepted": "yes"})), 1);
        assert_eq!(
            c.command_response("d", MODEL, "reboot", 400, &json!({"message": "bad"})),
            0,
            "errors have no schema"
        );
        assert_eq!(c.command_response("d", MODEL, "deviceInfo*ping", 200, &json!("pong")), 0);
        assert_eq!(c.command_response("d", MODEL, "selfdestruct", 200, &json!(null)), 1);
    }

    #[test]
    fn a_missing_model_is_recorded_once_and_checks_nothing() {
        let c = check();
        assert_eq!(c.telemetry("d", "dtmi:fleetsim:example:Nowhere;1", None, br#"{"x": 1}"#), 0);
        let f = c.findings("d").unwrap();
        assert!(f.model_problem.as_deref().is_some_and(|p| p.contains("not found")), "{f:?}");
        assert_eq!(f.checked, 0);
    }
}
