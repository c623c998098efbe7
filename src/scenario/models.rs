//! Devices from models: a DTDL model (loaded by `modelrepo`) compiled into scenario TOML: the
//! same text `fleetsim model import` writes for people to edit, and what a template naming
//! `model = "dtmi:..."` runs directly. One path, so the two cannot disagree.
//!
//! What the model implies: every telemetry content is a field of its component's telemetry
//! stream, with a generator chosen from its schema, semantic type and unit; read-only properties
//! are reported at every connection; writable properties are acknowledged the Plug and Play way
//! and checked against their schema; commands check their request against its schema and answer
//! with a value shaped by the response schema. Components follow the Plug and Play conventions
//! (`$.sub`, `__t: "c"`, `component*command`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::iot::dtdl::{self, Content, ContentKind, Geo, Primitive, Schema};
pub use crate::modelrepo::{Model, Source, load};
use crate::problems::Problem;
use crate::tomlread::{Doc, Node, Table, Val};

/// How the compiled behaviour is tuned (a template's `model_interval` and `[model_values]`).
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    /// Every telemetry stream's interval (default 10 s).
    pub interval: Option<Duration>,
    /// Values given instead of the generated ones, by `name` or `component.name`, as TOML text.
    pub values: BTreeMap<String, String>,
}

/// The behaviour as scenario TOML: tables named `{prefix}telemetry`, `{prefix}reported`,
/// `{prefix}writable`, `{prefix}commands`, with a comment on every generated choice; and which of
/// `tuning.values`' keys named a telemetry or read-only property (and so were used).
pub fn behaviour_toml(
    model: &Model,
    prefix: &str,
    tuning: &Tuning,
) -> Result<(String, BTreeSet<String>), Vec<Problem>> {
    let parts = model.parts()?;
    let mut notes = Vec::new();
    let interval = tuning.interval.unwrap_or(Duration::from_secs(10));
    let mut out = String::new();
    let mut reported_root = Vec::new();
    let mut reported_components: Vec<(String, Vec<String>)> = Vec::new();
    let mut writable = String::new();
    let mut commands = String::new();
    let mut used = BTreeSet::new();
    for (component, contents) in &parts {
        let key = |name: &str| match component {
            Some(c) => format!("{c}.{name}"),
            None => name.to_owned(),
        };
        let mut fields = Vec::new();
        let mut comments = Vec::new();
        for c in contents {
            let tuned = match &c.kind {
                ContentKind::Telemetry { .. } | ContentKind::Property { writable: false, .. } => {
                    let k = key(&c.name);
                    tuning.values.get(&k).inspect(|_| {
                        used.insert(k.clone());
                    })
                }
                _ => None,
            };
            match &c.kind {
                ContentKind::Telemetry { schema } => {
                    let (value, why) = match tuned {
                        Some(t) => (t.clone(), "given in model_values".to_owned()),
                        None => generator(schema, c, true),
                    };
                    fields.push(format!("{} = {value}", toml_key(&c.name)));
                    comments.push(format!("# {}: {why}", key(&c.name)));
                }
                ContentKind::Property { schema, writable: false } => {
                    let (value, why) = match tuned {
                        Some(t) => (t.clone(), "given in model_values".to_owned()),
                        None => generator(schema, c, false),
                    };
                    let line = format!("{} = {value} # {why}", toml_key(&c.name));
                    match component {
                        Some(comp) => match reported_components.iter_mut().find(|(n, _)| n == comp) {
                            Some((_, lines)) => lines.push(line),
                            None => reported_components.push((comp.clone(), vec![line])),
                        },
                        None => reported_root.push(line),
                    }
                }
                ContentKind::Property { schema, writable: true } => {
                    let _ = writeln!(
                        writable,
                        "\n# Writable property {}: acknowledged {{value, ac, av, ad}}; a value outside its schema is acknowledged 400.",
                        key(&c.name)
                    );
                    let _ = writeln!(writable, "[[{prefix}writable]]\nname = {}", toml_str(&c.name));
                    if let Some(comp) = component {
                        let _ = writeln!(writable, "component = {}", toml_str(comp));
                    }
                    let _ = writeln!(writable, "schema = {}", json_to_toml(&schema.to_dtdl()));
                }
                ContentKind::Command { request, response } => {
                    let _ = writeln!(
                        commands,
                        "\n# Command {}{}.",
                        key(&c.name),
                        match request {
                            Some(_) => ": a request outside its schema is answered 400",
                            None => "",
                        }
                    );
                    let _ = writeln!(commands, "[[{prefix}commands]]\nname = {}", toml_str(&c.name));
                    if let Some(comp) = component {
                        let _ = writeln!(commands, "component = {}", toml_str(comp));
                    }
                    if let Some((_, s)) = request {
                        let _ = writeln!(commands, "request_schema = {}", json_to_toml(&s.to_dtdl()));
                    }
                    if let Some((name, s)) = response {
                        let (value, why) = generator(s, c, false);
                        let _ = writeln!(commands, "response = {value} # {name}: {why}");
                    }
                }
                ContentKind::Relationship => {
                    notes.push(format!(
                        "\n# Relationship {}: not part of what a device sends; not simulated.",
                        key(&c.name)
                    ));
                }
                ContentKind::Component { .. } => {}
            }
        }
        if !fields.is_empty() {
            let _ = writeln!(out, "\n{}", comments.join("\n"));
            let _ = writeln!(out, "[[{prefix}telemetry]]");
            if let Some(comp) = component {
                let _ = writeln!(out, "component = {}", toml_str(comp));
            }
            let _ = writeln!(out, "interval = {}\njitter = 0.1", toml_str(&crate::tomlread::show_duration(interval)));
            let _ = writeln!(out, "fields = {{ {} }}", fields.join(", "));
        }
    }
    if !reported_root.is_empty() || !reported_components.is_empty() {
        let _ = writeln!(out, "\n# Read-only properties, reported at every connection.\n[{prefix}reported]");
        for l in &reported_root {
            let _ = writeln!(out, "{l}");
        }
        for (comp, lines) in &reported_components {
            let _ = writeln!(
                out,
                "[{prefix}reported.{}]\n__t = \"c\" # the Plug and Play component marker",
                toml_key(comp)
            );
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
        }
    }
    out.push_str(&writable);
    out.push_str(&commands);
    for n in notes {
        let _ = writeln!(out, "{n}");
    }
    Ok((out, used))
}

/// A plausible range for a reading: low, high, the walk's step, decimals.
type Range = (f64, f64, f64, u32);

/// Realistic ranges by semantic type and unit, and why.
fn range_for(semantic: &[String], unit: Option<&str>) -> Option<(Range, &'static str)> {
    let unit = unit.unwrap_or_default();
    let r = match unit {
        "degreeCelsius" => (18.0, 28.0, 0.2, 1),
        "degreeFahrenheit" => (64.0, 82.0, 0.4, 1),
        "kelvin" => (291.0, 301.0, 0.2, 1),
        "percent" => (30.0, 70.0, 0.5, 1),
        "kilopascal" => (98.0, 104.0, 0.05, 2),
        "millibar" | "hectopascal" => (980.0, 1040.0, 0.5, 1),
        "pascal" => (98_000.0, 104_000.0, 50.0, 0),
        "bar" => (0.98, 1.04, 0.001, 3),
        "poundPerSquareInch" => (14.2, 15.1, 0.01, 2),
        "volt" => (225.0, 235.0, 0.2, 1),
        "millivolt" => (3200.0, 3400.0, 5.0, 0),
        "ampere" => (0.0, 16.0, 0.1, 2),
        "milliampere" => (0.0, 500.0, 5.0, 0),
        "watt" => (0.0, 2000.0, 10.0, 0),
        "kilowatt" => (0.0, 2.0, 0.01, 2),
        "hertz" => (49.8, 50.2, 0.01, 2),
        "kilometrePerHour" => (0.0, 120.0, 2.0, 1),
        "metrePerSecond" => (0.0, 33.0, 0.5, 1),
        "milePerHour" => (0.0, 75.0, 1.0, 1),
        "metrePerSecondSquared" => (-2.0, 2.0, 0.1, 2),
        "gForce" => (-0.2, 0.2, 0.01, 3),
        "degreeOfArc" | "degree" => (0.0, 360.0, 5.0, 1),
        "radian" => (0.0, std::f64::consts::TAU, 0.05, 2),
        "lux" => (0.0, 1000.0, 20.0, 0),
        "metre" => (0.0, 100.0, 1.0, 1),
        "centimetre" => (0.0, 200.0, 2.0, 1),
        "kilometre" => (0.0, 500.0, 1.0, 1),
        "kilogram" => (0.0, 100.0, 0.5, 1),
        "byte" | "kibibyte" | "mebibyte" | "megabyte" | "kilobyte" => (0.0, 16384.0, 64.0, 0),
        "second" => (0.0, 3600.0, 10.0, 0),
        "decibel" => (30.0, 90.0, 1.0, 1),
        "partsPerMillion" => (400.0, 1200.0, 10.0, 0),
        _ => {
            let s = |t: &str| semantic.iter().any(|x| x == t);
            if s("Temperature") {
                (18.0, 28.0, 0.2, 1)
            } else if s("Humidity") || s("RelativeHumidity") {
                (30.0, 70.0, 0.5, 1)
            } else if s("Pressure") {
                (98.0, 104.0, 0.05, 2)
            } else {
                return None;
            }
        }
    };
    Some((r, "by its semantic type and unit"))
}

/// A TOML value (a generator, a template or a constant) that fits `schema`, and why it was chosen.
/// `dynamic`: a telemetry value that changes per message; else a value reported or answered.
fn generator(schema: &Schema, c: &Content, dynamic: bool) -> (String, String) {
    let described = |why: &str| format!("{} ({why})", describe(schema, c));
    let numeric = matches!(schema, Schema::Primitive(p) if p.integer_range().is_some() || matches!(p, Primitive::Double | Primitive::Float | Primitive::Decimal));
    let accumulates = c.semantic.iter().any(|s| s == "TimeSpan" || s == "Energy")
        || matches!(c.unit.as_deref(), Some("kilowattHour" | "wattHour"));
    if dynamic && numeric && accumulates {
        // Uptime and energy meters only go up.
        let integral = matches!(schema, Schema::Primitive(p) if p.integer_range().is_some());
        let step = if integral { "10" } else { "0.5" };
        return (format!("{{ kind = \"counter\", start = 0, step = {step} }}"), described("a counter: it only grows"));
    }
    match schema {
        Schema::Primitive(p) => match p {
            Primitive::Double | Primitive::Float | Primitive::Decimal => {
                let ((lo, hi, step, decimals), why) = range_for(&c.semantic, c.unit.as_deref()).unwrap_or(((0.0, 100.0, 1.0, 1), "a default range"));
                let start = ((lo + hi) / 2.0 * 10f64.powi(decimals as i32)).round() / 10f64.powi(decimals as i32);
                let text = if dynamic {
                    format!("{{ kind = \"walk\", start = {start:?}, step = {step:?}, min = {lo:?}, max = {hi:?}, decimals = {decimals} }}")
                } else {
                    format!("{{ kind = \"uniform\", min = {lo:?}, max = {hi:?}, decimals = {decimals} }}")
                };
                (text, described(why))
            }
            Primitive::Boolean => ("{ kind = \"bool\", p_true = 0.5 }".to_owned(), described("true or false, evenly")),
            Primitive::String => ("\"{id}\"".to_owned(), described("the device id")),
            Primitive::DateTime => ("{ kind = \"timestamp\" }".to_owned(), described("the time of sending")),
            Primitive::Date => ("\"2026-01-01\"".to_owned(), described("a fixed date")),
            Primitive::Time => ("\"12:00:00\"".to_owned(), described("a fixed time")),
            Primitive::Duration => ("{ kind = \"choice\", values = [\"PT1M\", \"PT5M\", \"PT1H\"] }".to_owned(), described("one of three")),
            Primitive::Uuid => ("\"6f1c3a52-9d0e-4b7a-8c21-000000000001\"".to_owned(), described("a fixed UUID")),
            Primitive::Bytes => ("\"AAECAw==\"".to_owned(), described("four bytes, base64")),
            integral => {
                let (tlo, thi) = integral.integer_range().unwrap_or((0, 100));
                let ((lo, hi, step, _), why) = range_for(&c.semantic, c.unit.as_deref()).unwrap_or(((0.0, 100.0, 1.0, 0), "a default range"));
                let lo = (lo.round() as i128).clamp(tlo, thi);
                let hi = (hi.round() as i128).clamp(lo, thi);
                let step = step.round().max(1.0) as i128;
                let text = if dynamic {
                    format!("{{ kind = \"walk\", start = {}, step = {step}, min = {lo}, max = {hi}, integer = true }}", (lo + hi) / 2)
                } else {
                    format!("{{ kind = \"uniform\", min = {lo}, max = {hi}, integer = true }}")
                };
                (text, described(why))
            }
        },
        Schema::Enum { values, .. } => {
            let list: Vec<String> = values.iter().map(|(_, v)| json_to_toml(v)).collect();
            (format!("{{ kind = \"choice\", values = [{}] }}", list.join(", ")), described("one of its values"))
        }
        Schema::GeoPoint => (
            "{ lat = { kind = \"walk\", start = 47.64, step = 0.0005, min = 47.6, max = 47.7, decimals = 5 }, \
             lon = { kind = \"walk\", start = -122.13, step = 0.0005, min = -122.2, max = -122.1, decimals = 5 }, \
             alt = { kind = \"walk\", start = 60.0, step = 0.5, min = 0.0, max = 200.0, decimals = 1 } }"
                .to_owned(),
            described("a track that wanders"),
        ),
        Schema::Vector => (
            "{ x = { kind = \"gaussian\", mean = 0.0, stddev = 0.3, decimals = 3 }, y = { kind = \"gaussian\", mean = 0.0, stddev = 0.3, decimals = 3 }, z = { kind = \"gaussian\", mean = 1.0, stddev = 0.05, decimals = 3 } }"
                .to_owned(),
            described("noise around rest"),
        ),
        Schema::Geo(g) => {
            let point = "[{ kind = \"walk\", start = -122.13, step = 0.0005, min = -122.2, max = -122.1, decimals = 5 }, { kind = \"walk\", start = 47.64, step = 0.0005, min = 47.6, max = 47.7, decimals = 5 }]";
            let fixed = |depth: usize| -> String {
                let mut s = "[-122.13, 47.64]".to_owned();
                for d in 1..depth {
                    // A polygon's ring closes: four points, the last equal to the first.
                    s = if d == depth - 1 && matches!(g, Geo::Polygon | Geo::MultiPolygon) && d == 1 {
                        format!("[{s}, [-122.12, 47.64], [-122.12, 47.65], {s}]")
                    } else {
                        format!("[{s}, {s}]")
                    };
                }
                s
            };
            let coords = if *g == Geo::Point && dynamic { point.to_owned() } else { fixed(g.depth()) };
            (format!("{{ type = \"{}\", coordinates = {coords} }}", g.geojson_type()), described("GeoJSON"))
        }
        Schema::Object { fields } => {
            let inner: Vec<String> = fields
                .iter()
                .map(|(n, s)| {
                    let sub = Content { name: n.clone(), kind: c.kind.clone(), semantic: Vec::new(), unit: None, pointer: c.pointer.clone() };
                    format!("{} = {}", toml_key(n), generator(s, &sub, dynamic).0)
                })
                .collect();
            (format!("{{ {} }}", inner.join(", ")), described("each field by its schema"))
        }
        Schema::Map { value } => {
            let v = generator(value, c, dynamic).0;
            (format!("{{ key1 = {v}, key2 = {v} }}"), described("two entries"))
        }
        Schema::Array { element } => {
            let v = generator(element, c, dynamic).0;
            (format!("[{v}, {v}, {v}]"), described("three elements"))
        }
    }
}

fn describe(schema: &Schema, c: &Content) -> String {
    let mut s = match schema {
        Schema::Primitive(p) => p.name().to_owned(),
        Schema::Geo(g) => g.geojson_type().to_owned(),
        Schema::GeoPoint => "geopoint".to_owned(),
        Schema::Vector => "vector".to_owned(),
        Schema::Enum { .. } => "enum".to_owned(),
        Schema::Object { .. } => "object".to_owned(),
        Schema::Map { .. } => "map".to_owned(),
        Schema::Array { .. } => "array".to_owned(),
    };
    if !c.semantic.is_empty() {
        let _ = write!(s, ", {}", c.semantic.join("/"));
    }
    if let Some(u) = &c.unit {
        let _ = write!(s, ", {u}");
    }
    s
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// A bare key when TOML allows one, else a quoted key.
fn toml_key(k: &str) -> String {
    if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        k.to_owned()
    } else {
        toml_str(k)
    }
}

/// JSON as an inline TOML value (null has no TOML form: an empty string stands in).
pub fn json_to_toml(v: &Value) -> String {
    match v {
        Value::Null => "\"\"".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) => format!("{f:?}"),
            _ => n.to_string(),
        },
        Value::String(s) => toml_str(s),
        Value::Array(a) => format!("[{}]", a.iter().map(json_to_toml).collect::<Vec<_>>().join(", ")),
        Value::Object(m) => {
            let items: Vec<String> = m.iter().map(|(k, v)| format!("{} = {}", toml_key(k), json_to_toml(v))).collect();
            if items.is_empty() { "{}".to_owned() } else { format!("{{ {} }}", items.join(", ")) }
        }
    }
}

/// A TOML node as JSON (datetimes as their text).
pub fn node_json(n: &Node) -> Value {
    match &n.value {
        Val::Str(s) | Val::Datetime(s) => Value::String(s.clone()),
        Val::Int(i) => Value::from(*i),
        Val::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Val::Bool(b) => Value::Bool(*b),
        Val::Array(items) => Value::Array(items.iter().map(node_json).collect()),
        Val::Table(entries) => Value::Object(entries.iter().map(|e| (e.key.clone(), node_json(&e.node))).collect()),
    }
}

/// Reads a DTDL schema written in TOML at `key` (`schema = "double"`, `schema = { "@type" =
/// "Enum", ... }`); problems are located at the key.
pub fn schema_field(doc: &mut Doc, t: &mut Table<'_>, key: &str) -> Option<Schema> {
    let node = t.get(key)?;
    match dtdl::parse_schema(&node_json(node)) {
        Ok(s) => Some(s),
        Err(problems) => {
            for p in problems {
                let field = format!("{}{}", t.field(key), p.pointer.replace('/', "."));
                doc.error(node.span.clone(), &field, p.message);
            }
            None
        }
    }
}
