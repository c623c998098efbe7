//! The scenario file format, checked field by field. `load` reads every file, reports every
//! problem in every file at once (file:line:column: field: message), and only returns templates
//! when there is none. See `scenarios/*.toml` for the format in use.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::model::*;
use super::models::{Source, Tuning};
use super::value::{ALL_VARS, Compiler, Template, ValueSpec};
use crate::problems::{Problem, Problems};
use crate::tomlread::{Doc, Table};

/// Placeholders by place.
const ID_VARS: &[&str] = &["n"];
const TELEMETRY_VARS: &[&str] = &["id", "n", "module", "now", "seq"];
const REPORT_VARS: &[&str] = &["id", "n", "module", "now", "payload"];

/// Most devices one template may describe (a fleet is sharded across processes above this).
const MAX_COUNT: u64 = 10_000_000;
/// The largest `first` device number: a trillion, far from where `first + count` could overflow.
const MAX_FIRST: u64 = 1_000_000_000_000;
/// The longest delay, downtime or completion a command or writable property may ask for.
const DAY: Duration = Duration::from_secs(86_400);

/// Ids that are valid both as DPS registration ids and as IoT Hub device ids.
fn valid_identity_id(id: &str) -> bool {
    crate::iot::dps::valid_registration_id(id)
}

/// Reads scenario files; all templates, or every problem found.
pub fn load(files: &[PathBuf]) -> Result<Vec<DeviceTemplate>, Problems> {
    let mut problems = Vec::new();
    let mut templates = Vec::new();
    for f in files {
        match crate::fsio::read_text_capped(f, crate::fsio::MAX_INPUT_FILE) {
            Ok(text) => {
                let (t, mut d) = load_text(f, text);
                templates.extend(t);
                problems.append(&mut d);
            }
            Err(e) => problems.push(Problem {
                file: f.display().to_string(),
                line: 1,
                column: 1,
                field: String::new(),
                message: format!("cannot read: {}", crate::tomlread::io_reason(&e)),
            }),
        }
    }
    check_unique_ids(&templates, &mut problems);
    if problems.is_empty() { Ok(templates) } else { Err(Problems(problems)) }
}

/// One file's templates and problems.
pub fn load_text(path: &Path, text: String) -> (Vec<DeviceTemplate>, Vec<Problem>) {
    let (mut doc, root) = Doc::parse(path.display().to_string(), text);
    let mut out = Vec::new();
    if let Some(mut top) = doc.table(&root, "") {
        let devices = top.tables(&mut doc, "devices");
        if devices.is_empty() && !top.has("devices") {
            doc.shape_error(0..0, "devices", "a scenario needs at least one [[devices]] table");
        }
        for (i, t) in devices.into_iter().enumerate() {
            if let Some(tpl) = device(&mut doc, t, path, i) {
                out.push(tpl);
            }
        }
        top.finish(&mut doc);
    }
    let ok = doc.ok();
    (if ok { out } else { Vec::new() }, doc.into_problems())
}

fn device(doc: &mut Doc, mut t: Table<'_>, path: &Path, index: usize) -> Option<DeviceTemplate> {
    let before = doc.problems.len();
    let at = doc.position(&t.span);
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = t.str(doc, "name").unwrap_or_else(|| if index == 0 { stem.clone() } else { format!("{stem}-{index}") });
    let count = t.u64(doc, "count").unwrap_or(1);
    if count == 0 || count > MAX_COUNT {
        doc.error(t.span_of("count"), &t.field("count"), format!("must be between 1 and {MAX_COUNT}"));
    }
    // Ids are `first + i`: bounded so that no sum can overflow.
    let first = t.u64_in(doc, "first", 0..=MAX_FIRST).unwrap_or(1);
    let id = match t.req_str(doc, "id").map(|s| (Template::parse(&s, ID_VARS), s)) {
        Some((Ok(tpl), s)) => {
            if count > 1 && tpl.is_constant() {
                doc.error(
                    t.span_of("id"),
                    &t.field("id"),
                    format!("\"{s}\" has no {{n}}, so {count} devices would share one id"),
                );
            }
            let sample = tpl.render(&super::value::Ctx { n: first, ..Default::default() });
            if !valid_identity_id(&sample) {
                doc.error(
                    t.span_of("id"),
                    &t.field("id"),
                    format!("\"{sample}\" is not a valid device id (letters, digits and -._: up to 128)"),
                );
            }
            Some(tpl)
        }
        Some((Err(e), _)) => {
            doc.error(t.span_of("id"), &t.field("id"), e);
            None
        }
        None => None,
    };
    let mut model_id = t.str(doc, "model_id");
    let transport = match t.choice(doc, "transport", &["mqtt", "websockets", "https"]) {
        Some("websockets") => Transport::WebSockets,
        Some("https") => Transport::Https {
            poll_interval: t.duration_in(doc, "poll_interval", Duration::from_secs(1), DAY).unwrap_or(DEFAULT_C2D_POLL),
        },
        _ => Transport::Mqtt,
    };
    if !matches!(transport, Transport::Https { .. }) && t.get("poll_interval").is_some() {
        doc.error(
            t.span_of("poll_interval"),
            &t.field("poll_interval"),
            "poll_interval only applies to transport = \"https\"",
        );
    }
    let dps_transport = match t.choice(doc, "dps_transport", &["https", "mqtt"]) {
        Some("mqtt") => DpsTransport::Mqtt,
        _ => DpsTransport::Https,
    };
    let individual = t.choice(doc, "enrollment", &["group", "individual"]) == Some("individual");
    let provisioning = match t.choice(doc, "provisioning", &["dps", "connection_string"]) {
        Some("connection_string") => {
            if t.has("enrollment") || t.has("dps_transport") {
                doc.error(
                    t.span.clone(),
                    &t.field("provisioning"),
                    "enrollment and dps_transport only apply to provisioning = \"dps\"",
                );
            }
            Provisioning::ConnectionString
        }
        _ => Provisioning::Dps { individual, transport: dps_transport },
    };
    let keys_file = t.str(doc, "keys_file").map(|k| path.parent().unwrap_or(Path::new(".")).join(k));
    let source = model_source(doc, &mut t, path);
    let model_dir = source.as_ref().map(|s| match s {
        Source::Dtmi { dir, .. } | Source::File { dir, .. } => dir.clone(),
    });
    let own = match &source {
        Some(source) => behaviour_from_model(doc, &mut t, source, &mut model_id),
        None => behaviour(doc, &mut t),
    };
    let https = matches!(transport, Transport::Https { .. });
    if https {
        if t.has("model_id") {
            doc.error(
                t.span_of("model_id"),
                &t.field("model_id"),
                "Plug and Play needs MQTT (the model id is announced when the device connects): \
                 transport = \"https\" cannot carry one",
            );
        }
        if let Some(b) = &own {
            https_limits(doc, &t, b);
        }
    }
    let is_edge = t.has("edge");
    if let Some(b) = &own
        && !b.inputs.is_empty()
    {
        doc.error(t.span_of("inputs"), &t.field("inputs"), "inputs belong to modules ([[devices.modules.inputs]])");
    }
    if is_edge && provisioning != Provisioning::ConnectionString {
        doc.error(
            t.span_of("edge"),
            &t.field("edge"),
            "an Edge device's deployment is applied through the registry: use provisioning = \"connection_string\"",
        );
    }
    let mut modules = Vec::new();
    let mut module_ids = HashSet::new();
    for mut m in t.tables(doc, "modules") {
        let mid = m.req_str(doc, "id").unwrap_or_default();
        if !mid.is_empty() && !valid_identity_id(&mid) {
            doc.error(m.span.clone(), &m.field("id"), format!("\"{mid}\" is not a valid module id"));
        }
        if !module_ids.insert(mid.clone()) {
            doc.error(m.span.clone(), &m.field("id"), format!("module \"{mid}\" appears twice"));
        }
        if !is_edge {
            for key in ["desired", "image", "inputs"] {
                if m.has(key) {
                    doc.error(
                        m.span_of(key),
                        &m.field(key),
                        "only applies to an Edge device (add [devices.edge] with its routes)",
                    );
                }
            }
        }
        let (desired, image) = super::edge::module_deployment(doc, &mut m, &mid);
        if let Some(b) = behaviour(doc, &mut m) {
            if https {
                https_limits(doc, &m, &b);
            }
            modules.push(ModuleTemplate { id: mid, behaviour: b, desired, image });
        }
        m.finish(doc);
    }
    let edge = super::edge::edge(doc, &mut t, &module_ids, &modules);
    t.finish(doc);
    if doc.problems.len() != before {
        return None;
    }
    Some(DeviceTemplate {
        file: path.to_owned(),
        at,
        name,
        count,
        first,
        id: id?,
        model_id,
        transport,
        provisioning,
        keys_file,
        model_dir,
        behaviour: own?,
        modules,
        edge,
    })
}

/// How often an HTTPS device polls for cloud-to-device messages unless told: IoT Hub's guidance
/// is to poll no more often than every 25 minutes ("Understand cloud-to-device messaging",
/// throttling of HTTPS receives).
pub const DEFAULT_C2D_POLL: Duration = Duration::from_secs(25 * 60);

/// Refuses what IoT Hub does not offer over HTTPS: twins (reported and writable properties),
/// direct methods, and the Plug and Play component and Edge output system properties
/// ("Choose a device communication protocol").
fn https_limits(doc: &mut Doc, t: &Table<'_>, b: &Behaviour) {
    let used = [
        ("reported", !b.reported.is_empty(), "reported properties need the device twin"),
        ("writable", !b.writable.is_empty(), "writable properties need the device twin"),
        ("commands", !b.commands.is_empty(), "commands are direct methods"),
        ("telemetry", b.telemetry.iter().any(|s| s.component.is_some()), "telemetry components are Plug and Play"),
        ("telemetry", b.telemetry.iter().any(|s| s.output.is_some()), "telemetry outputs are IoT Edge routing"),
        ("inputs", !b.inputs.is_empty(), "module inputs are IoT Edge routing"),
    ];
    for (key, _, what) in used.into_iter().filter(|(_, u, _)| *u) {
        doc.error(
            t.span_of(key),
            &t.field(key),
            format!("{what}, which IoT Hub does not offer over HTTPS: use transport = \"mqtt\" or \"websockets\""),
        );
    }
}

fn behaviour(doc: &mut Doc, t: &mut Table<'_>) -> Option<Behaviour> {
    behaviour_with(doc, t, &mut Compiler::default())
}

/// A behaviour compiled with `c`, whose state slots it shares with whatever else `c` compiled
/// (a model's behaviour and a template's own additions to it).
fn behaviour_with(doc: &mut Doc, t: &mut Table<'_>, c: &mut Compiler) -> Option<Behaviour> {
    let before = doc.problems.len();
    let reported = c.map(doc, t, "reported", REPORT_VARS);

    let mut writable = Vec::new();
    let mut writable_names = HashSet::new();
    for mut w in t.tables(doc, "writable") {
        let name = w.req_str(doc, "name").unwrap_or_default();
        let component = w.str(doc, "component");
        if !writable_names.insert((component.clone(), name.clone())) {
            doc.error(w.span.clone(), &w.field("name"), format!("writable property \"{name}\" appears twice"));
        }
        let ack =
            if w.choice(doc, "ack", &["pnp", "legacy"]) == Some("legacy") { AckStyle::Legacy } else { AckStyle::Pnp };
        let kind = w.choice(doc, "type", JsonType::NAMES).map_or(JsonType::Any, JsonType::from_name);
        let (min, max) = (w.f64(doc, "min"), w.f64(doc, "max"));
        if let (Some(a), Some(b)) = (min, max)
            && a > b
        {
            doc.error(w.span_of("min"), &w.field("min"), format!("min ({a}) is above max ({b})"));
        }
        let default = w.get("default").map(|n| c.value(doc, n, &format!("{}.default", w.path), &[]));
        let default = match default {
            Some(Some(ValueSpec::Const(v))) => Some(v),
            Some(Some(_)) => {
                doc.error(w.span.clone(), &w.field("default"), "must be a plain value, not a generator");
                None
            }
            _ => None,
        };
        // The default is reported as the device's value, so it must be one the device would accept.
        if let Some(d) = &default {
            let at = w.span_of("default");
            if !kind.matches(d) {
                doc.error(at.clone(), &w.field("default"), format!("{d} is not of the declared type"));
            }
            if let Some(x) = d.as_f64() {
                if let Some(b) = max.filter(|b| x > *b) {
                    doc.error(at.clone(), &w.field("default"), format!("{x} is above max ({b})"));
                }
                if let Some(a) = min.filter(|a| x < *a) {
                    doc.error(at, &w.field("default"), format!("{x} is below min ({a})"));
                }
            }
        }
        writable.push(WritableSpec {
            name,
            component,
            ack,
            delay: w.duration_in(doc, "delay", Duration::ZERO, DAY).unwrap_or_default(),
            kind,
            min,
            max,
            default,
            schema: super::models::schema_field(doc, &mut w, "schema"),
        });
        w.finish(doc);
    }
    let declared: HashSet<&str> = writable.iter().filter(|w| w.component.is_none()).map(|w| w.name.as_str()).collect();

    let mut telemetry = Vec::new();
    for mut s in t.tables(doc, "telemetry") {
        let interval =
            s.duration_in(doc, "interval", Duration::from_millis(1), 30 * DAY).unwrap_or(Duration::from_secs(10));
        // A fraction of the interval.
        let jitter = s.f64_in(doc, "jitter", 0.0..=1.0).unwrap_or(0.0);
        let interval_property = s.str(doc, "interval_property");
        if let Some(p) = &interval_property
            && !declared.contains(p.as_str())
        {
            doc.error(
                s.span_of("interval_property"),
                &s.field("interval_property"),
                format!("\"{p}\" is not a writable property of this identity"),
            );
        }
        let fields_path = s.field("fields");
        let fields = match s.get("fields") {
            Some(n) if matches!(n.value, crate::tomlread::Val::Table(_)) => {
                c.value(doc, n, &fields_path, TELEMETRY_VARS)
            }
            Some(n) => {
                doc.error(n.span.clone(), &fields_path, "expected a table of fields");
                None
            }
            None => {
                s.missing(doc, "fields");
                None
            }
        };
        let properties = c.map(doc, &mut s, "properties", TELEMETRY_VARS);
        let send_if = s.table(doc, "send_if").and_then(|g| super::edge::send_if(doc, g, &declared));
        let spec = TelemetrySpec {
            interval,
            jitter,
            interval_property,
            fields: fields.unwrap_or(ValueSpec::Object(Vec::new())),
            properties,
            content_type: s.str(doc, "content_type").unwrap_or_else(|| "application/json".into()),
            content_encoding: s.str(doc, "content_encoding").unwrap_or_else(|| "utf-8".into()),
            component: s.str(doc, "component"),
            output: s.str(doc, "output"),
            send_if,
        };
        s.finish(doc);
        telemetry.push(spec);
    }

    let mut commands = Vec::new();
    let mut command_names = HashSet::new();
    for mut m in t.tables(doc, "commands") {
        let name = m.req_str(doc, "name").unwrap_or_default();
        let component = m.str(doc, "component");
        // An HTTP-like status, as IoT Hub passes it through.
        let status = m.u64_in(doc, "status", 100..=599).unwrap_or(200);
        let response = m.get("response").and_then(|n| c.value(doc, n, &format!("{}.response", m.path), ALL_VARS));
        let report = c.map(doc, &mut m, "report", REPORT_VARS);
        let complete = m.table(doc, "complete").map(|mut k| {
            let after = k.duration_in(doc, "after", Duration::ZERO, DAY).unwrap_or_default();
            let report = c.map(doc, &mut k, "report", REPORT_VARS);
            if report.is_empty() {
                k.missing(doc, "report");
            }
            k.finish(doc);
            Completion { after, report }
        });
        let reboot = m.table(doc, "reboot").map(|mut r| {
            let downtime = r.duration_in(doc, "downtime", Duration::ZERO, DAY).unwrap_or(Duration::from_secs(5));
            let answer_first = r.choice(doc, "answer", &["before", "after"]) != Some("after");
            let report = c.map(doc, &mut r, "report", REPORT_VARS);
            r.finish(doc);
            RebootSpec { downtime, answer_first, report }
        });
        let spec = CommandSpec {
            name,
            component,
            status: status as u16,
            request: m.choice(doc, "request", JsonType::NAMES).map_or(JsonType::Any, JsonType::from_name),
            request_schema: super::models::schema_field(doc, &mut m, "request_schema"),
            response,
            delay: m.duration_in(doc, "delay", Duration::ZERO, DAY).unwrap_or_default(),
            report,
            complete,
            reboot,
        };
        if !command_names.insert(spec.method_name()) {
            doc.error(m.span.clone(), &m.field("name"), format!("command \"{}\" appears twice", spec.method_name()));
        }
        m.finish(doc);
        commands.push(spec);
    }
    let inputs = super::edge::inputs(doc, c, t, &declared);
    let c2d_commands = t.table(doc, "c2d").is_none_or(|mut k| {
        let v = k.bool(doc, "commands").unwrap_or(true);
        k.finish(doc);
        v
    });
    (doc.problems.len() == before).then(|| Behaviour {
        telemetry,
        reported,
        commands,
        writable,
        inputs,
        c2d_commands,
        initial_state: c.initial_state(),
    })
}

/// Where a template's model comes from: `model = "dtmi:..."` (in `model_dir`, default `models`
/// beside the scenario file) or `model_file = "path.json"`.
fn model_source(doc: &mut Doc, t: &mut Table<'_>, path: &Path) -> Option<Source> {
    let base = path.parent().unwrap_or(Path::new("."));
    let dir = base.join(t.str(doc, "model_dir").unwrap_or_else(|| "models".to_owned()));
    let id = t.str(doc, "model");
    let file = t.str(doc, "model_file");
    match (id, file) {
        (Some(_), Some(_)) => {
            doc.error(t.span_of("model_file"), &t.field("model_file"), "give model or model_file, not both");
            None
        }
        (Some(id), None) if !crate::iot::dtdl::valid_dtmi(&id) => {
            doc.error(t.span_of("model"), &t.field("model"), format!("\"{id}\" is not a DTMI (dtmi:<path>;<version>)"));
            None
        }
        (Some(id), None) => Some(Source::Dtmi { id, dir }),
        (None, Some(f)) => Some(Source::File { path: base.join(f), dir }),
        (None, None) => {
            for key in ["model_dir", "model_interval", "model_values"] {
                if t.get(key).is_some() {
                    doc.error(t.span_of(key), &t.field(key), "only applies with model or model_file");
                }
            }
            None
        }
    }
}

/// A template's behaviour from its model, tuned by `model_interval` and `[model_values]`, plus
/// what the template adds itself (a command or writable property of the same name replaces the
/// model's). The model id is the model's unless the template names one.
fn behaviour_from_model(
    doc: &mut Doc,
    t: &mut Table<'_>,
    source: &Source,
    model_id: &mut Option<String>,
) -> Option<Behaviour> {
    let mut tuning = Tuning {
        interval: t.duration_in(doc, "model_interval", Duration::from_millis(1), 30 * DAY),
        ..Tuning::default()
    };
    if let Some(mut values) = t.table(doc, "model_values") {
        for e in values.rest() {
            // Checked where the user wrote it, so a mistake is reported at its own position.
            let field = format!("{}.{}", values.path, e.key);
            if Compiler::default().value(doc, &e.node, &field, TELEMETRY_VARS).is_some() {
                tuning.values.insert(e.key.clone(), super::models::json_to_toml(&super::models::node_json(&e.node)));
            }
        }
        values.finish(doc);
    }
    let model = match super::models::load(source) {
        Ok(m) => m,
        Err(problems) => {
            doc.problems.extend(problems);
            // The template is refused with them; the position of its `model` key ties them to it.
            doc.error(t.span.clone(), &t.field("model"), "the model has problems (listed with their files)");
            return None;
        }
    };
    let (text, used) = match super::models::behaviour_toml(&model, "", &tuning) {
        Ok(generated) => generated,
        Err(problems) => {
            doc.problems.extend(problems);
            doc.error(t.span.clone(), &t.field("model"), "the model has problems (listed with their files)");
            return None;
        }
    };
    for unknown in tuning.values.keys().filter(|k| !used.contains(*k)) {
        doc.error(
            t.span_of("model_values"),
            &format!("{}.model_values.{unknown}", t.path),
            "not a telemetry or read-only property of the model",
        );
    }
    let mut c = Compiler::default();
    let (mut generated, root) = Doc::parse(format!("{} (generated from {})", doc.file, model.id()), text);
    let from_model = generated.table(&root, "").and_then(|mut g| {
        let b = behaviour_with(&mut generated, &mut g, &mut c);
        g.finish(&mut generated);
        b
    });
    doc.problems.extend(generated.into_problems());
    let own = behaviour_with(doc, t, &mut c)?;
    let mut b = from_model?;
    b.telemetry.extend(own.telemetry);
    for (k, v) in own.reported {
        b.reported.retain(|(x, _)| *x != k);
        b.reported.push((k, v));
    }
    for cmd in own.commands {
        b.commands.retain(|x| x.method_name() != cmd.method_name());
        b.commands.push(cmd);
    }
    for w in own.writable {
        b.writable.retain(|x| (&x.name, &x.component) != (&w.name, &w.component));
        b.writable.push(w);
    }
    b.c2d_commands = own.c2d_commands;
    b.inputs = own.inputs;
    b.initial_state = c.initial_state();
    if model_id.is_none() {
        *model_id = Some(model.id().to_owned());
    }
    Some(b)
}

/// Device ids must be unique across every template of every file.
fn check_unique_ids(templates: &[DeviceTemplate], problems: &mut Vec<Problem>) {
    let mut seen: HashMap<String, (&Path, &str)> = HashMap::new();
    for t in templates {
        for n in t.first..t.first + t.count {
            let id = t.device_id(n);
            if let Some((file, name)) = seen.insert(id.clone(), (&t.file, &t.name)) {
                problems.push(Problem {
                    file: t.file.display().to_string(),
                    line: 1,
                    column: 1,
                    field: format!("devices \"{}\".id", t.name),
                    message: format!("device id \"{id}\" is also produced by \"{name}\" in {}", file.display()),
                });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> (Vec<DeviceTemplate>, Vec<String>) {
        let (t, d) = load_text(Path::new("s.toml"), text.to_owned());
        (t, d.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn a_full_template_compiles() {
        let (t, errs) = load_str(
            r#"
[[devices]]
count = 3
id = "env-sensor-{n:04}"
model_id = "dtmi:com:example:EnvironmentalSensor;1"
dps_transport = "mqtt"
[devices.telemetry]
interval = "2s"
jitter = 0.1
interval_property = "telemetryInterval"
fields = { temp = { kind = "uniform", min = 1, max = 75 }, humid = { kind = "uniform", min = 30, max = 99 } }
[devices.reported]
state = true
[[devices.writable]]
name = "telemetryInterval"
type = "number"
min = 1
[[devices.commands]]
name = "rundiagnostics"
status = 202
complete = { after = "6s", report = { rundiagnostics = { value = "Problems run complete at {now}." } } }
[[devices.modules]]
id = "myFirstModule"
[[devices.modules.telemetry]]
fields = { x = 1 }
"#,
        );
        assert!(errs.is_empty(), "{errs:#?}");
        let d = &t[0];
        assert_eq!((d.device_id(7).as_str(), d.count), ("env-sensor-0007", 3));
        assert_eq!(d.provisioning, Provisioning::Dps { individual: false, transport: DpsTransport::Mqtt });
        assert_eq!(d.behaviour.commands[0].complete.as_ref().unwrap().after, Duration::from_secs(6));
        assert_eq!(d.modules[0].id, "myFirstModule");
        assert_eq!(d.behaviour.telemetry[0].interval, Duration::from_secs(2));
    }

    #[test]
    fn https_devices_poll_and_are_refused_what_iot_hub_lacks_over_https() {
        let (t, errs) =
            load_str("[[devices]]\nid = \"h{n}\"\ntransport = \"https\"\n[devices.telemetry]\nfields = { t = 1 }\n");
        assert!(errs.is_empty(), "{errs:#?}");
        assert_eq!(t[0].transport, Transport::Https { poll_interval: DEFAULT_C2D_POLL });
        let (t, errs) = load_str("[[devices]]\nid = \"h{n}\"\ntransport = \"https\"\npoll_interval = \"30s\"\n");
        assert!(errs.is_empty(), "{errs:#?}");
        assert_eq!(t[0].transport, Transport::Https { poll_interval: Duration::from_secs(30) });
        let (t, errs) = load_str(
            r#"
[[devices]]
id = "h{n}"
transport = "https"
poll_interval = "0s"
model_id = "dtmi:com:example:Thermostat;1"
[devices.reported]
fw = "1"
[[devices.writable]]
name = "interval"
[[devices.commands]]
name = "blink"
[devices.telemetry]
component = "thermostat1"
fields = { t = 1 }
[[devices.modules]]
id = "m"
[[devices.modules.commands]]
name = "reset"
[[devices]]
id = "m{n}"
poll_interval = "1m"
"#,
        );
        assert!(t.is_empty());
        let expect = [
            "s.toml:5:17: devices[0].poll_interval:",
            "s.toml:6:12: devices[0].model_id: Plug and Play needs MQTT",
            "s.toml:7:1: devices[0].reported: reported properties need the device twin, which IoT Hub does not offer over HTTPS",
            "devices[0].writable: writable properties need the device twin",
            "devices[0].commands: commands are direct methods",
            "devices[0].telemetry: telemetry components are Plug and Play",
            "devices[0].modules[0].commands: commands are direct methods",
            "s.toml:22:17: devices[1].poll_interval: poll_interval only applies to transport = \"https\"",
        ];
        for e in expect {
            assert!(errs.iter().any(|x| x.contains(e)), "missing {e:?} in {errs:#?}");
        }
        assert_eq!(errs.len(), expect.len(), "{errs:#?}");
    }

    #[test]
    fn every_error_of_a_file_is_reported_with_its_position() {
        let (t, errs) = load_str(
            r#"
[[devices]]
count = 5
id = "same-id"
transport = "carrier-pigeon"
[devices.telemetry]
interval = "soon"
interval_property = "undeclared"
fields = { t = { kind = "uniform", min = 1 } }
[[devices.commands]]
status = 200
[[devices.commands]]
name = "blink"
response = "every {paylod} seconds"
colour = "red"
"#,
        );
        assert!(t.is_empty());
        let expect = [
            "s.toml:4:6: devices[0].id: \"same-id\" has no {n}, so 5 devices would share one id",
            "s.toml:5:13: devices[0].transport: expected one of \"mqtt\", \"websockets\", \"https\"",
            "s.toml:7:12: devices[0].telemetry.interval: expected a duration",
            "s.toml:8:21: devices[0].telemetry.interval_property: \"undeclared\" is not a writable property",
            "devices[0].telemetry.fields.t.max: is required",
            "s.toml:10:1: devices[0].commands[0].name: is required",
            "s.toml:14:12: devices[0].commands[1].response: unknown placeholder `{paylod}`",
            "s.toml:15:1: devices[0].commands[1].colour: unknown field",
        ];
        for e in expect {
            assert!(errs.iter().any(|x| x.contains(e)), "missing {e:?} in {errs:#?}");
        }
        assert_eq!(errs.len(), expect.len(), "{errs:#?}");
    }

    #[test]
    fn ids_must_be_unique_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        std::fs::write(&a, "[[devices]]\ncount = 3\nid = \"d-{n}\"\n").unwrap();
        std::fs::write(&b, "[[devices]]\ncount = 1\nfirst = 2\nid = \"d-{n}\"\n").unwrap();
        let err = load(&[a, b]).unwrap_err().to_string();
        assert!(err.contains("device id \"d-2\" is also produced by"), "{err}");
    }
}
