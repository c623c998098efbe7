//! The IoT Edge parts of the scenario format: what a module does with its inputs
//! (`[[devices.modules.inputs]]`), an Edge device's deployment (`[devices.edge]`: routes,
//! store-and-forward time to live, who routes; each module's `desired` and `image`), and the
//! `modulesContent` that deployment becomes when the fleet applies it.
//!
//! The deployment's shape is Microsoft's "Learn how to deploy modules and establish routes in IoT
//! Edge" (the `$edgeAgent` and `$edgeHub` module twins, schema version 1.1) and the REST call
//! "Configuration - Apply On Edge Device".

use std::collections::HashSet;

use serde_json::{Map, Value, json};

use super::model::{DeviceTemplate, EdgeRoute, EdgeRouting, EdgeSpec, InputSpec, ModuleTemplate, SendIf, Threshold};
use super::value::Compiler;
use crate::iot::route::{Route, Sink};
use crate::tomlread::{Doc, Table, Val};

/// Placeholders of an input's properties and body: `{payload}` is the incoming JSON body.
const INPUT_VARS: &[&str] = &["id", "n", "module", "now", "payload", "seq"];

/// The store-and-forward time to live when the template names none: the value of Microsoft's
/// deployment templates (two hours).
pub const DEFAULT_TTL_SECS: u64 = 7200;

/// `send_if = { field = "a.b", above = X, below = Y }`: X and Y are numbers or names of writable
/// properties of the identity (`declared`); at least one of them is given.
pub(super) fn send_if(doc: &mut Doc, mut g: Table<'_>, declared: &HashSet<&str>) -> Option<SendIf> {
    let before = doc.problems.len();
    let field = g.req_str(doc, "field");
    let threshold = |doc: &mut Doc, g: &mut Table<'_>, key: &str| -> Option<Threshold> {
        let node = g.get(key)?;
        match &node.value {
            Val::Int(i) => Some(Threshold::Value(*i as f64)),
            Val::Float(f) if f.is_finite() => Some(Threshold::Value(*f)),
            Val::Str(p) if declared.contains(p.as_str()) => Some(Threshold::Property(p.clone())),
            Val::Str(p) => {
                doc.error(
                    node.span.clone(),
                    &g.field(key),
                    format!("\"{p}\" is not a writable property of this identity"),
                );
                None
            }
            other => {
                doc.error(
                    node.span.clone(),
                    &g.field(key),
                    format!("expected a number or a writable property's name, found {}", other.kind()),
                );
                None
            }
        }
    };
    let above = threshold(doc, &mut g, "above");
    let below = threshold(doc, &mut g, "below");
    if !g.has("above") && !g.has("below") {
        doc.error(g.span.clone(), &g.field("above"), "give above, below or both");
    }
    if let Some(f) = &field
        && (f.is_empty() || f.split('.').any(str::is_empty))
    {
        doc.error(
            g.span_of("field"),
            &g.field("field"),
            format!("\"{f}\" is not a dotted path like machine.temperature"),
        );
    }
    g.finish(doc);
    (doc.problems.len() == before).then(|| SendIf {
        field: field.unwrap_or_default().split('.').map(str::to_owned).collect(),
        above,
        below,
    })
}

/// `[[inputs]]` of a module: `name`, and optionally `output`, `send_if`, `keep_properties`
/// (default true), `properties` and `body` (value templates with `{payload}`).
pub(super) fn inputs(doc: &mut Doc, c: &mut Compiler, t: &mut Table<'_>, declared: &HashSet<&str>) -> Vec<InputSpec> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for mut i in t.tables(doc, "inputs") {
        let name = i.req_str(doc, "name").unwrap_or_default();
        if !name.is_empty() && !valid_endpoint_name(&name) {
            doc.error(
                i.span_of("name"),
                &i.field("name"),
                format!("\"{name}\" is not an input name (no `/`, `#`, `+`, `?` or spaces)"),
            );
        }
        if !names.insert(name.clone()) {
            doc.error(i.span_of("name"), &i.field("name"), format!("input \"{name}\" appears twice"));
        }
        let output = i.str(doc, "output");
        if let Some(o) = &output
            && !valid_endpoint_name(o)
        {
            doc.error(i.span_of("output"), &i.field("output"), format!("\"{o}\" is not an output name"));
        }
        let send_if = i.table(doc, "send_if").and_then(|g| send_if(doc, g, declared));
        let keep_properties = i.bool(doc, "keep_properties").unwrap_or(true);
        let properties = c.map(doc, &mut i, "properties", INPUT_VARS);
        let body = i.get("body").and_then(|n| c.value(doc, n, &format!("{}.body", i.path), INPUT_VARS));
        if output.is_none() {
            for key in ["properties", "body", "keep_properties"] {
                if i.has(key) {
                    doc.error(
                        i.span_of(key),
                        &i.field(key),
                        "only applies with output (a consumed message is not sent)",
                    );
                }
            }
        }
        i.finish(doc);
        out.push(InputSpec { name, output, send_if, keep_properties, properties, body });
    }
    out
}

/// Names of inputs and outputs travel in topics and routes: no separators or wildcards.
fn valid_endpoint_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.chars().any(|c| matches!(c, '/' | '#' | '+' | '?' | '&' | '=' | '"') || c.is_whitespace())
}

/// `[devices.edge]`: `routes` (name = route text, each parsed, an error at its column),
/// `time_to_live_secs` and `routing` ("hub" or "fleet"; default by target).
/// A route into a module input must name one of `modules` and an input it handles: otherwise
/// nothing would ever receive what it carries.
/// `module_ids` are all the template's modules, `modules` those whose behaviour is valid.
pub(super) fn edge(
    doc: &mut Doc,
    t: &mut Table<'_>,
    module_ids: &HashSet<String>,
    modules: &[ModuleTemplate],
) -> Option<EdgeSpec> {
    let mut e = t.table(doc, "edge")?;
    let mut routes = Vec::new();
    match e.table(doc, "routes") {
        Some(mut r) => {
            for entry in r.rest() {
                let field = format!("{}.{}", r.path, entry.key);
                let Val::Str(text) = &entry.node.value else {
                    doc.error(
                        entry.node.span.clone(),
                        &field,
                        format!("expected a route string, found {}", entry.node.value.kind()),
                    );
                    continue;
                };
                match Route::parse(text) {
                    Ok(route) => {
                        if let Some(why) = unserved_sink(&route.sink, module_ids, modules) {
                            doc.error(entry.node.span.clone(), &field, why);
                        }
                        routes.push(EdgeRoute { name: entry.key.clone(), text: text.clone(), route })
                    }
                    Err(err) => {
                        let span = route_error_span(doc, &entry.node.span, text, err.position);
                        doc.error(span, &field, format!("bad route at position {}: {}", err.position, err.message));
                    }
                }
            }
            r.finish(doc);
        }
        None => e.missing(doc, "routes"),
    }
    // IoT Hub's maximum message retention is 7 days; Edge hub's store-and-forward takes any
    // 32-bit number of seconds, but a week is what the tutorials' devices ever need.
    let time_to_live_secs = e.u64_in(doc, "time_to_live_secs", 1..=u32::MAX as u64).unwrap_or(DEFAULT_TTL_SECS);
    let routing = match e.choice(doc, "routing", &["hub", "fleet"]) {
        Some("hub") => Some(EdgeRouting::Hub),
        Some("fleet") => Some(EdgeRouting::Fleet),
        _ => None,
    };
    e.finish(doc);
    Some(EdgeSpec { routes, time_to_live_secs, routing })
}

fn unserved_sink(sink: &Sink, module_ids: &HashSet<String>, modules: &[ModuleTemplate]) -> Option<String> {
    let Sink::ModuleInput { module, input } = sink else { return None };
    if !module_ids.contains(module) {
        return Some(format!("routes into module \"{module}\", which this device does not have"));
    }
    match modules.iter().find(|m| m.id == *module) {
        // Its behaviour has problems of its own, reported with it.
        None => None,
        Some(m) if !m.behaviour.inputs.iter().any(|i| i.name == *input) => {
            Some(format!("routes into input \"{input}\" of \"{module}\", which has no [[inputs]] entry of that name"))
        }
        Some(_) => None,
    }
}

/// Where in the file a route's error is: its column inside the string when the string is written
/// without escapes (so characters map one to one), else the string itself.
fn route_error_span(doc: &Doc, span: &std::ops::Range<usize>, text: &str, position: usize) -> std::ops::Range<usize> {
    let written = doc.source(span).unwrap_or_default();
    let plain = written.len() == text.len() + 2 && written.get(1..written.len() - 1) == Some(text);
    if !plain {
        return span.clone();
    }
    let byte = text.char_indices().nth(position.saturating_sub(1)).map_or(text.len(), |(b, _)| b);
    let at = span.start + 1 + byte;
    at..at
}

/// A module's part of the deployment: `desired` (its twin's desired properties) and `image` (the
/// container image `$edgeAgent` lists; a placeholder by default, as nothing pulls it).
pub(super) fn module_deployment(doc: &mut Doc, m: &mut Table<'_>, module: &str) -> (Map<String, Value>, String) {
    let desired = match m.get("desired") {
        Some(n) => match super::models::node_json(n) {
            Value::Object(o) => o,
            _ => {
                doc.error(n.span.clone(), &m.field("desired"), "expected a table of desired properties");
                Map::new()
            }
        },
        None => Map::new(),
    };
    let image = m.str(doc, "image").unwrap_or_else(|| format!("fleetsim/simulated-{}:1.0", module.to_lowercase()));
    (desired, image)
}

impl DeviceTemplate {
    /// The `modulesContent` of this Edge device's deployment (`None` for other devices): the
    /// `$edgeAgent` module list (schema 1.1, each module `docker`, `running`, restart `always`),
    /// the `$edgeHub` routes and `storeAndForwardConfiguration`, and each module's desired
    /// properties.
    pub fn modules_content(&self) -> Option<Value> {
        let edge = self.edge.as_ref()?;
        let mut modules = Map::new();
        for m in &self.modules {
            modules.insert(
                m.id.clone(),
                json!({
                    "version": "1.0",
                    "type": "docker",
                    "status": "running",
                    "restartPolicy": "always",
                    "settings": {"image": m.image, "createOptions": "{}"},
                }),
            );
        }
        let routes: Map<String, Value> =
            edge.routes.iter().map(|r| (r.name.clone(), Value::String(r.text.clone()))).collect();
        let mut content = Map::new();
        content.insert(
            "$edgeAgent".into(),
            json!({"properties.desired": {
                "schemaVersion": "1.1",
                "runtime": {"type": "docker", "settings": {"minDockerVersion": "v1.25", "loggingOptions": "", "registryCredentials": {}}},
                "systemModules": {
                    "edgeAgent": {"type": "docker", "settings": {"image": "mcr.microsoft.com/azureiotedge-agent:1.5", "createOptions": "{}"}},
                    "edgeHub": {"type": "docker", "status": "running", "restartPolicy": "always",
                        "settings": {"image": "mcr.microsoft.com/azureiotedge-hub:1.5", "createOptions": "{}"}},
                },
                "modules": modules,
            }}),
        );
        content.insert(
            "$edgeHub".into(),
            json!({"properties.desired": {
                "schemaVersion": "1.1",
                "routes": routes,
                "storeAndForwardConfiguration": {"timeToLiveSecs": edge.time_to_live_secs},
            }}),
        );
        for m in self.modules.iter().filter(|m| !m.desired.is_empty()) {
            content.insert(m.id.clone(), json!({"properties.desired": m.desired}));
        }
        Some(json!({ "modulesContent": content }))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::scenario::schema::load_text;

    fn load(text: &str) -> (Vec<DeviceTemplate>, Vec<String>) {
        let (t, d) = load_text(Path::new("e.toml"), text.to_owned());
        (t, d.iter().map(ToString::to_string).collect())
    }

    const TUTORIAL: &str = r#"
[[devices]]
id = "edge-{n}"
provisioning = "connection_string"
[devices.edge]
routing = "fleet"
[devices.edge.routes]
toFilter = 'FROM /messages/modules/s/outputs/o INTO BrokeredEndpoint("/modules/f/inputs/in1")'
up = "FROM /messages/modules/f/outputs/out1 INTO $upstream"
[[devices.modules]]
id = "s"
[[devices.modules]]
id = "f"
desired = { Threshold = 25, nested = { a = [1, 2] } }
image = "example.azurecr.io/filter:2"
[[devices.modules.writable]]
name = "Threshold"
[[devices.modules.inputs]]
name = "in1"
output = "out1"
send_if = { field = "machine.temperature", above = "Threshold", below = 100 }
keep_properties = false
properties = { MessageType = "Alert", seen = "{payload}" }
[[devices.modules.inputs]]
name = "sink"
"#;

    #[test]
    fn the_tutorials_deployment_becomes_its_modules_content() {
        let (t, errs) = load(TUTORIAL);
        assert!(errs.is_empty(), "{errs:#?}");
        let d = &t[0];
        let e = d.edge.as_ref().unwrap();
        assert_eq!((e.routing, e.time_to_live_secs, e.routes.len()), (Some(EdgeRouting::Fleet), DEFAULT_TTL_SECS, 2));
        let f = &d.modules[1];
        let input = &f.behaviour.inputs[0];
        assert_eq!(input.output.as_deref(), Some("out1"));
        assert!(!input.keep_properties);
        let cond = input.send_if.as_ref().unwrap();
        assert_eq!(cond.field, ["machine", "temperature"]);
        assert_eq!(
            (&cond.above, &cond.below),
            (&Some(Threshold::Property("Threshold".into())), &Some(Threshold::Value(100.0)))
        );
        assert_eq!(f.behaviour.inputs[1].output, None);
        let c = d.modules_content().unwrap();
        let mc = &c["modulesContent"];
        let hub = &mc["$edgeHub"]["properties.desired"];
        assert_eq!(hub["schemaVersion"], "1.1");
        assert_eq!(hub["routes"]["up"], "FROM /messages/modules/f/outputs/out1 INTO $upstream");
        assert_eq!(hub["storeAndForwardConfiguration"]["timeToLiveSecs"], 7200);
        let agent = &mc["$edgeAgent"]["properties.desired"];
        assert_eq!(agent["schemaVersion"], "1.1");
        assert_eq!(agent["modules"]["f"]["settings"]["image"], "example.azurecr.io/filter:2");
        assert_eq!(agent["modules"]["s"]["settings"]["image"], "fleetsim/simulated-s:1.0");
        assert_eq!(agent["modules"]["s"]["status"], "running");
        assert!(agent["systemModules"]["edgeHub"].is_object() && agent["runtime"]["type"] == "docker");
        assert_eq!(mc["f"]["properties.desired"], serde_json::json!({"Threshold": 25, "nested": {"a": [1, 2]}}));
        assert!(mc.get("s").is_none(), "a module without desired properties has no entry");

        let (t, errs) = load(&TUTORIAL.replace("inputs/in1", "inputs/other"));
        assert!(t.is_empty());
        assert_eq!(
            errs,
            [
                "e.toml:8:12: devices[0].edge.routes.toFilter: routes into input \"other\" of \"f\", which has no [[inputs]] entry of that name"
            ]
        );
    }

    #[test]
    fn a_bad_route_is_reported_at_its_column() {
        let text = TUTORIAL.replace("INTO $upstream\"", "INTO $downstream\"");
        let (t, errs) = load(&text);
        assert!(t.is_empty());
        // Line 9 of the file; the route string starts at column 7 (after `up = "`).
        let want = "e.toml:9:";
        assert!(
            errs.iter().any(|e| e.starts_with(want) && e.contains("devices[0].edge.routes.up: bad route at position")),
            "{errs:#?}"
        );
        let col: usize = errs[0].split(':').nth(2).unwrap().parse().unwrap();
        let pos: usize = errs[0].split("position ").nth(1).unwrap().split(':').next().unwrap().parse().unwrap();
        assert_eq!(col, 7 + pos - 1, "{errs:#?}");
        assert_eq!(errs.len(), 1, "{errs:#?}");
    }

    #[test]
    fn every_mistake_of_an_edge_template_names_its_field() {
        let (t, errs) = load(
            r#"
[[devices]]
id = "e-{n}"
[devices.edge]
routing = "sideways"
time_to_live_secs = 0
[devices.edge.routes]
a = 'FROM /* INTO BrokeredEndpoint("/modules/nobody/inputs/x")'
b = 'FROM /* INTO BrokeredEndpoint("/modules/m/inputs/other")'
c = 3
[[devices.inputs]]
name = "x"
[[devices.modules]]
id = "m"
[[devices.modules.inputs]]
name = "in/1"
output = "o"
keep_properties = true
send_if = { field = "a..b", above = "Undeclared", below = true }
body = { v = "{paylod}" }
[[devices.modules.inputs]]
name = "in/1"
keep_properties = false
[[devices]]
id = "plain-{n}"
[[devices.modules]]
id = "m"
desired = { a = 1 }
[[devices.modules.inputs]]
name = "i"
"#,
        );
        assert!(t.is_empty());
        let expect = [
            "devices[0].edge: an Edge device's deployment is applied through the registry",
            "devices[0].inputs: inputs belong to modules",
            "e.toml:5:11: devices[0].edge.routing: expected one of \"hub\", \"fleet\"",
            "devices[0].edge.time_to_live_secs:",
            "e.toml:8:5: devices[0].edge.routes.a: routes into module \"nobody\"",
            "devices[0].edge.routes.c: expected a route string",
            "devices[0].modules[0].inputs[0].name: \"in/1\" is not an input name",
            "devices[0].modules[0].inputs[0].send_if.field: \"a..b\" is not a dotted path",
            "devices[0].modules[0].inputs[0].send_if.above: \"Undeclared\" is not a writable property",
            "devices[0].modules[0].inputs[0].send_if.below: expected a number or a writable property's name",
            "devices[0].modules[0].inputs[0].body.v: unknown placeholder `{paylod}`",
            "devices[0].modules[0].inputs[1].keep_properties: only applies with output",
            "devices[0].modules[0].inputs[1].name: input \"in/1\" appears twice",
            "devices[0].modules[0].inputs[1].name: \"in/1\" is not an input name",
            "devices[1].modules[0].desired: only applies to an Edge device",
            "devices[1].modules[0].inputs: only applies to an Edge device",
        ];
        for e in expect {
            assert!(errs.iter().any(|x| x.contains(e)), "missing {e:?} in {errs:#?}");
        }
        assert_eq!(errs.len(), expect.len(), "{errs:#?}");
    }
}
