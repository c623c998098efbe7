//! Digital Twins Definition Language (DTDL) v2 and v3 interfaces as data: parsing a model
//! document into interfaces, the schema of each telemetry, property and command, and checking a
//! JSON value against a schema. Both sides use it: the fleet builds devices from models, the
//! emulator checks what devices send against the model they announce.
//!
//! Rules from Microsoft's DTDL v2 and v3 language specifications (github.com/Azure/opendigitaltwins-dtdl,
//! "DTDL.v2.md" and "DTDL.v3.md"): DTMI syntax, element names, primitive and complex schemas,
//! geospatial schemas, `extends` (at most 10 deep), components; and IoT Central's schema
//! extensions (`dtmi:iotcentral:schema:geopoint;1`, `dtmi:iotcentral:schema:vector;1`). Problems
//! are collected, never thrown: each names the JSON pointer of the element and the rule.

use std::collections::BTreeMap;

use serde_json::Value;

/// How deep complex schemas may nest (DTDL v2 limits object/array/map nesting to 5 levels; v3 to 8).
const MAX_SCHEMA_DEPTH: usize = 8;
/// Longest element name: 64 characters in v2, 512 in v3.
const MAX_NAME_V2: usize = 64;
const MAX_NAME_V3: usize = 512;

/// A problem in a model, at a JSON pointer (RFC 6901) into its document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelProblem {
    pub pointer: String,
    pub message: String,
}

/// A DTDL primitive schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Primitive {
    Boolean,
    Date,
    DateTime,
    Double,
    Duration,
    Float,
    Integer,
    Long,
    String,
    Time,
    // DTDL v3 additions.
    Byte,
    Bytes,
    Decimal,
    Short,
    UnsignedByte,
    UnsignedInteger,
    UnsignedLong,
    UnsignedShort,
    Uuid,
}

impl Primitive {
    const ALL: &'static [(&'static str, Primitive, bool)] = &[
        ("boolean", Primitive::Boolean, false),
        ("date", Primitive::Date, false),
        ("dateTime", Primitive::DateTime, false),
        ("double", Primitive::Double, false),
        ("duration", Primitive::Duration, false),
        ("float", Primitive::Float, false),
        ("integer", Primitive::Integer, false),
        ("long", Primitive::Long, false),
        ("string", Primitive::String, false),
        ("time", Primitive::Time, false),
        ("byte", Primitive::Byte, true),
        ("bytes", Primitive::Bytes, true),
        ("decimal", Primitive::Decimal, true),
        ("short", Primitive::Short, true),
        ("unsignedByte", Primitive::UnsignedByte, true),
        ("unsignedInteger", Primitive::UnsignedInteger, true),
        ("unsignedLong", Primitive::UnsignedLong, true),
        ("unsignedShort", Primitive::UnsignedShort, true),
        ("uuid", Primitive::Uuid, true),
    ];

    /// The primitive a schema name denotes, and whether only DTDL v3 has it.
    pub fn from_name(name: &str) -> Option<(Primitive, bool)> {
        Self::ALL.iter().find(|(n, _, _)| *n == name).map(|(_, p, v3)| (*p, *v3))
    }

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, p, _)| *p == self).map_or("?", |(n, _, _)| n)
    }

    /// The inclusive integer range of an integral primitive.
    pub fn integer_range(self) -> Option<(i128, i128)> {
        Some(match self {
            Primitive::Byte => (i8::MIN as i128, i8::MAX as i128),
            Primitive::Short => (i16::MIN as i128, i16::MAX as i128),
            Primitive::Integer => (i32::MIN as i128, i32::MAX as i128),
            Primitive::Long => (i64::MIN as i128, i64::MAX as i128),
            Primitive::UnsignedByte => (0, u8::MAX as i128),
            Primitive::UnsignedShort => (0, u16::MAX as i128),
            Primitive::UnsignedInteger => (0, u32::MAX as i128),
            Primitive::UnsignedLong => (0, u64::MAX as i128),
            _ => return None,
        })
    }
}

/// GeoJSON geometry schemas of DTDL's standard geospatial schemas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Geo {
    Point,
    MultiPoint,
    LineString,
    MultiLineString,
    Polygon,
    MultiPolygon,
}

impl Geo {
    const ALL: &'static [(&'static str, Geo, &'static str)] = &[
        ("point", Geo::Point, "Point"),
        ("multiPoint", Geo::MultiPoint, "MultiPoint"),
        ("lineString", Geo::LineString, "LineString"),
        ("multiLineString", Geo::MultiLineString, "MultiLineString"),
        ("polygon", Geo::Polygon, "Polygon"),
        ("multiPolygon", Geo::MultiPolygon, "MultiPolygon"),
    ];

    pub fn from_name(name: &str) -> Option<Geo> {
        Self::ALL.iter().find(|(n, _, _)| *n == name).map(|(_, g, _)| *g)
    }

    /// The GeoJSON `type` member.
    pub fn geojson_type(self) -> &'static str {
        Self::ALL.iter().find(|(_, g, _)| *g == self).map_or("?", |(_, _, t)| t)
    }

    /// How deep the `coordinates` arrays nest.
    pub fn depth(self) -> usize {
        match self {
            Geo::Point => 1,
            Geo::MultiPoint | Geo::LineString => 2,
            Geo::MultiLineString | Geo::Polygon => 3,
            Geo::MultiPolygon => 4,
        }
    }
}

/// The schema of a telemetry, property, field, command payload, map value or array element.
#[derive(Debug, Clone, PartialEq)]
pub enum Schema {
    Primitive(Primitive),
    Geo(Geo),
    /// IoT Central's geopoint: `{lat, lon, alt?}`.
    GeoPoint,
    /// IoT Central's vector: `{x, y, z}`.
    Vector,
    /// Values with names; `integer` or `string` valued.
    Enum {
        string_valued: bool,
        values: Vec<(String, Value)>,
    },
    Object {
        fields: Vec<(String, Schema)>,
    },
    Map {
        value: Box<Schema>,
    },
    Array {
        element: Box<Schema>,
    },
}

/// The class of an interface content.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentKind {
    Telemetry { schema: Schema },
    Property { schema: Schema, writable: bool },
    Command { request: Option<(String, Schema)>, response: Option<(String, Schema)> },
    Component { interface: String },
    Relationship,
}

/// One element of an interface's `contents`.
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    pub name: String,
    pub kind: ContentKind,
    /// Semantic types (co-types), e.g. `Temperature`, `Humidity`, `Location`.
    pub semantic: Vec<String>,
    pub unit: Option<String>,
    /// JSON pointer of the element in its document.
    pub pointer: String,
}

/// One interface, as written (its `extends` not yet folded in).
#[derive(Debug, Clone, PartialEq)]
pub struct Interface {
    pub id: String,
    pub display_name: Option<String>,
    pub extends: Vec<String>,
    pub contents: Vec<Content>,
    /// 2 or 3.
    pub version: u8,
    /// JSON pointer of the interface in its document.
    pub pointer: String,
}

/// Whether `s` is a digital twin model identifier: `dtmi:<segment>(:<segment>)*;<version>`,
/// segments of letters, digits and `_` starting with a letter and not ending with `_`, the version
/// 1 to 999,999,999 (v3 also allows a minor version `;1.2`).
pub fn valid_dtmi(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("dtmi:") else { return false };
    let Some((path, version)) = rest.split_once(';') else { return false };
    let segment_ok = |seg: &str| {
        let b = seg.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphabetic()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
            && b[b.len() - 1] != b'_'
    };
    let number_ok =
        |n: &str| !n.is_empty() && n.len() <= 9 && n.bytes().all(|c| c.is_ascii_digit()) && !n.starts_with('0');
    let version_ok = match version.split_once('.') {
        Some((major, minor)) => number_ok(major) && number_ok(minor),
        None => number_ok(version),
    };
    s.len() <= 2048 && path.split(':').all(segment_ok) && version_ok
}

/// Where a model lives in a model repository: `dtmi:com:Example:Thermostat;1` →
/// `dtmi/com/example/thermostat-1.json` (lower case, Microsoft's "Device models repository"
/// convention). `None` for an invalid DTMI.
pub fn repository_path(dtmi: &str) -> Option<String> {
    if !valid_dtmi(dtmi) {
        return None;
    }
    let lower = dtmi.to_ascii_lowercase();
    let (path, version) = lower.split_once(';')?;
    Some(format!("{}-{version}.json", path.replace(':', "/")))
}

fn valid_name(name: &str, version: u8) -> bool {
    let max = if version >= 3 { MAX_NAME_V3 } else { MAX_NAME_V2 };
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_alphabetic()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
        && b[b.len() - 1] != b'_'
}

/// JSON pointer escaping (RFC 6901).
fn seg(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// Parses a model document: one interface object or an array of them (a model repository's
/// expanded form, or an IoT Central device template export). Interfaces nested inline (as a
/// component's or `extends`' value) come out as interfaces of their own. Returns what parsed,
/// and every problem.
pub fn parse_document(doc: &Value) -> (Vec<Interface>, Vec<ModelProblem>) {
    let mut p = Parser { interfaces: Vec::new(), problems: Vec::new(), named: BTreeMap::new() };
    match doc {
        Value::Array(items) => {
            // Named schemas first, so contents may refer to a schema defined later in the file.
            for (i, item) in items.iter().enumerate() {
                p.collect_named(item, &format!("/{i}"));
            }
            for (i, item) in items.iter().enumerate() {
                p.interface(item, &format!("/{i}"), None);
            }
        }
        other => {
            p.collect_named(other, "");
            p.interface(other, "", None);
        }
    }
    (p.interfaces, p.problems)
}

/// Parses one schema on its own (a scenario's `schema = ...`, written as the DTDL JSON would be),
/// by the DTDL v3 rules; named schemas cannot be referred to.
pub fn parse_schema(v: &Value) -> Result<Schema, Vec<ModelProblem>> {
    let mut p = Parser { interfaces: Vec::new(), problems: Vec::new(), named: BTreeMap::new() };
    match p.schema(v, "", 3, 0) {
        Some(s) if p.problems.is_empty() => Ok(s),
        _ => Err(p.problems),
    }
}

struct Parser {
    interfaces: Vec<Interface>,
    problems: Vec<ModelProblem>,
    /// Complex schemas defined with an `@id` (in an interface's `schemas`), by DTMI.
    named: BTreeMap<String, (Value, String)>,
}

impl Parser {
    fn problem(&mut self, pointer: &str, message: impl Into<String>) {
        self.problems.push(ModelProblem { pointer: pointer.to_owned(), message: message.into() });
    }

    fn collect_named(&mut self, v: &Value, at: &str) {
        if let Some(Value::Array(schemas)) = v.get("schemas") {
            for (i, s) in schemas.iter().enumerate() {
                if let Some(id) = s.get("@id").and_then(Value::as_str) {
                    self.named.insert(id.to_owned(), (s.clone(), format!("{at}/schemas/{i}")));
                }
            }
        }
    }

    /// The DTDL version an element's `@context` declares (2 when the context is only IoT
    /// Central's or absent on a nested interface).
    fn version(&mut self, v: &Value, at: &str, inherited: Option<u8>) -> u8 {
        let contexts: Vec<&str> = match v.get("@context") {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            Some(_) => {
                self.problem(&format!("{at}/@context"), "@context must be a string or an array of strings");
                Vec::new()
            }
            None => {
                if inherited.is_none() {
                    self.problem(at, "a top-level interface needs @context (dtmi:dtdl:context;2 or ;3)");
                }
                return inherited.unwrap_or(2);
            }
        };
        if contexts.iter().any(|c| c.starts_with("dtmi:dtdl:context;3")) {
            3
        } else if contexts.iter().any(|c| c.starts_with("dtmi:dtdl:context;2")) {
            2
        } else {
            self.problem(&format!("{at}/@context"), "@context must include dtmi:dtdl:context;2 or dtmi:dtdl:context;3");
            inherited.unwrap_or(2)
        }
    }

    /// Parses an interface at `at`; returns its DTMI.
    fn interface(&mut self, v: &Value, at: &str, inherited: Option<u8>) -> Option<String> {
        let Value::Object(obj) = v else {
            self.problem(at, "an interface must be a JSON object");
            return None;
        };
        let version = self.version(v, at, inherited);
        if types(v).first().map(String::as_str) != Some("Interface") {
            self.problem(&format!("{at}/@type"), "@type must be \"Interface\"");
            return None;
        }
        let id = match obj.get("@id").and_then(Value::as_str) {
            Some(id) if valid_dtmi(id) => id.to_owned(),
            Some(id) => {
                self.problem(&format!("{at}/@id"), format!("\"{id}\" is not a valid DTMI (dtmi:<path>;<version>)"));
                return None;
            }
            None => {
                self.problem(at, "an interface needs an @id");
                return None;
            }
        };
        let mut extends = Vec::new();
        match obj.get("extends") {
            None => {}
            Some(Value::String(s)) => extends.push(s.clone()),
            Some(Value::Array(items)) => {
                for (i, e) in items.iter().enumerate() {
                    let ep = format!("{at}/extends/{i}");
                    match e {
                        Value::String(s) => extends.push(s.clone()),
                        Value::Object(_) => extends.extend(self.interface(e, &ep, Some(version))),
                        _ => self.problem(&ep, "extends must name an interface (a DTMI) or hold one"),
                    }
                }
            }
            Some(e @ Value::Object(_)) => extends.extend(self.interface(e, &format!("{at}/extends"), Some(version))),
            Some(_) => {
                self.problem(&format!("{at}/extends"), "extends must be a DTMI, an interface or an array of them")
            }
        }
        for e in &extends {
            if !valid_dtmi(e) {
                self.problem(&format!("{at}/extends"), format!("\"{e}\" is not a valid DTMI"));
            }
        }
        let mut contents = Vec::new();
        match obj.get("contents") {
            None => {}
            Some(Value::Array(items)) => {
                let mut names = std::collections::HashSet::new();
                for (i, c) in items.iter().enumerate() {
                    let cp = format!("{at}/contents/{i}");
                    if let Some(name) = c.get("name").and_then(Value::as_str)
                        && !names.insert(name)
                    {
                        self.problem(&cp, format!("\"{name}\" appears twice in the interface"));
                        continue;
                    }
                    contents.extend(self.content(c, &cp, version));
                }
            }
            Some(_) => self.problem(&format!("{at}/contents"), "contents must be an array"),
        }
        let display_name = match obj.get("displayName") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(langs)) => {
                langs.get("en").or_else(|| langs.values().next()).and_then(Value::as_str).map(str::to_owned)
            }
            _ => None,
        };
        self.interfaces.push(Interface {
            id: id.clone(),
            display_name,
            extends,
            contents,
            version,
            pointer: at.to_owned(),
        });
        Some(id)
    }

    fn content(&mut self, v: &Value, at: &str, version: u8) -> Option<Content> {
        if !v.is_object() {
            self.problem(at, "a content must be a JSON object");
            return None;
        }
        let t = types(v);
        let Some(class) = t.first().cloned() else {
            self.problem(at, "a content needs @type (Telemetry, Property, Command, Component or Relationship)");
            return None;
        };
        let semantic: Vec<String> = t[1..].to_vec();
        let name = match v.get("name").and_then(Value::as_str) {
            Some(n) if valid_name(n, version) => n.to_owned(),
            Some(n) => {
                self.problem(
                    &format!("{at}/name"),
                    format!("\"{n}\" is not a valid name (a letter, then letters, digits and _, not ending in _)"),
                );
                return None;
            }
            None => {
                self.problem(at, "a content needs a name");
                return None;
            }
        };
        let unit = v.get("unit").and_then(Value::as_str).map(str::to_owned);
        let kind = match class.as_str() {
            "Telemetry" => ContentKind::Telemetry { schema: self.schema_of(v, at, version)? },
            "Property" => {
                let writable = match v.get("writable") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        self.problem(&format!("{at}/writable"), "writable must be true or false");
                        false
                    }
                };
                ContentKind::Property { schema: self.schema_of(v, at, version)?, writable }
            }
            "Command" => {
                let request = self.payload(v.get("request"), &format!("{at}/request"), version);
                let response = self.payload(v.get("response"), &format!("{at}/response"), version);
                ContentKind::Command { request, response }
            }
            "Component" => match v.get("schema") {
                Some(Value::String(s)) if valid_dtmi(s) => ContentKind::Component { interface: s.clone() },
                Some(i @ Value::Object(_)) => {
                    ContentKind::Component { interface: self.interface(i, &format!("{at}/schema"), Some(version))? }
                }
                _ => {
                    self.problem(&format!("{at}/schema"), "a component's schema must be an interface or its DTMI");
                    return None;
                }
            },
            "Relationship" => ContentKind::Relationship,
            other => {
                self.problem(
                    &format!("{at}/@type"),
                    format!(
                        "\"{other}\" is not a content class (Telemetry, Property, Command, Component, Relationship)"
                    ),
                );
                return None;
            }
        };
        Some(Content { name, kind, semantic, unit, pointer: at.to_owned() })
    }

    fn payload(&mut self, v: Option<&Value>, at: &str, version: u8) -> Option<(String, Schema)> {
        let v = v?;
        let name = v.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
        if !valid_name(&name, version) {
            self.problem(at, "a command payload needs a valid name");
        }
        Some((name, self.schema_of(v, at, version)?))
    }

    fn schema_of(&mut self, v: &Value, at: &str, version: u8) -> Option<Schema> {
        match v.get("schema") {
            Some(s) => self.schema(s, &format!("{at}/schema"), version, 0),
            None => {
                self.problem(at, "schema is required");
                None
            }
        }
    }

    fn schema(&mut self, v: &Value, at: &str, version: u8, depth: usize) -> Option<Schema> {
        if depth > MAX_SCHEMA_DEPTH {
            self.problem(at, format!("complex schemas nest at most {MAX_SCHEMA_DEPTH} levels"));
            return None;
        }
        match v {
            Value::String(name) => {
                if let Some((p, v3_only)) = Primitive::from_name(name) {
                    if v3_only && version < 3 {
                        self.problem(at, format!("\"{name}\" is a DTDL v3 schema; the context is v2"));
                    }
                    return Some(Schema::Primitive(p));
                }
                if let Some(g) = Geo::from_name(name) {
                    return Some(Schema::Geo(g));
                }
                match name.as_str() {
                    "dtmi:iotcentral:schema:geopoint;1" => return Some(Schema::GeoPoint),
                    "dtmi:iotcentral:schema:vector;1" => return Some(Schema::Vector),
                    _ => {}
                }
                if let Some((def, _)) = self.named.get(name).cloned() {
                    return self.schema(&def, at, version, depth + 1);
                }
                self.problem(at, format!("unknown schema \"{name}\" (not a primitive, a geospatial schema or a schema defined in the model)"));
                None
            }
            Value::Object(obj) => {
                let class = types(v).first().cloned().unwrap_or_default();
                match class.as_str() {
                    "Object" => {
                        let mut fields = Vec::new();
                        let Some(Value::Array(items)) = obj.get("fields") else {
                            self.problem(at, "an Object schema needs fields (an array)");
                            return None;
                        };
                        for (i, f) in items.iter().enumerate() {
                            let fp = format!("{at}/fields/{i}");
                            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
                            if !valid_name(name, version) {
                                self.problem(&fp, format!("field name \"{}\" is not valid", seg(name)));
                                continue;
                            }
                            if fields.iter().any(|(n, _)| n == name) {
                                self.problem(&fp, format!("field \"{name}\" appears twice"));
                                continue;
                            }
                            let Some(s) = f.get("schema") else {
                                self.problem(&fp, "schema is required");
                                continue;
                            };
                            if let Some(s) = self.schema(s, &format!("{fp}/schema"), version, depth + 1) {
                                fields.push((name.to_owned(), s));
                            }
                        }
                        Some(Schema::Object { fields })
                    }
                    "Enum" => {
                        let string_valued = match obj.get("valueSchema").and_then(Value::as_str) {
                            Some("string") => true,
                            Some("integer") => false,
                            _ => {
                                self.problem(
                                    &format!("{at}/valueSchema"),
                                    "an Enum's valueSchema must be \"integer\" or \"string\"",
                                );
                                return None;
                            }
                        };
                        let Some(Value::Array(items)) = obj.get("enumValues") else {
                            self.problem(at, "an Enum needs enumValues (an array)");
                            return None;
                        };
                        let mut values = Vec::new();
                        for (i, e) in items.iter().enumerate() {
                            let ep = format!("{at}/enumValues/{i}");
                            let name = e.get("name").and_then(Value::as_str).unwrap_or_default();
                            let value = e.get("enumValue").cloned().unwrap_or(Value::Null);
                            let typed = if string_valued { value.is_string() } else { value.is_i64() };
                            if !valid_name(name, version) {
                                self.problem(&ep, "an enum value needs a valid name");
                            } else if !typed {
                                self.problem(
                                    &format!("{ep}/enumValue"),
                                    format!("must be {}", if string_valued { "a string" } else { "an integer" }),
                                );
                            } else if values.iter().any(|(_, v)| *v == value) {
                                self.problem(&format!("{ep}/enumValue"), format!("{value} appears twice"));
                            } else {
                                values.push((name.to_owned(), value));
                            }
                        }
                        if values.is_empty() {
                            self.problem(at, "an Enum needs at least one value");
                            return None;
                        }
                        Some(Schema::Enum { string_valued, values })
                    }
                    "Map" => {
                        let key = obj.get("mapKey").and_then(|k| k.get("schema")).and_then(Value::as_str);
                        if key != Some("string") {
                            self.problem(&format!("{at}/mapKey"), "a Map's key schema must be \"string\"");
                        }
                        let Some(value) = obj.get("mapValue").and_then(|m| m.get("schema")) else {
                            self.problem(&format!("{at}/mapValue"), "a Map needs mapValue with a schema");
                            return None;
                        };
                        let value = self.schema(value, &format!("{at}/mapValue/schema"), version, depth + 1)?;
                        Some(Schema::Map { value: Box::new(value) })
                    }
                    "Array" => {
                        let Some(element) = obj.get("elementSchema") else {
                            self.problem(at, "an Array needs elementSchema");
                            return None;
                        };
                        let element = self.schema(element, &format!("{at}/elementSchema"), version, depth + 1)?;
                        Some(Schema::Array { element: Box::new(element) })
                    }
                    other => {
                        self.problem(
                            &format!("{at}/@type"),
                            format!(
                                "\"{other}\" is not a complex schema this emulator supports (Object, Enum, Map, Array)"
                            ),
                        );
                        None
                    }
                }
            }
            _ => {
                self.problem(at, "a schema must be a name or an object");
                None
            }
        }
    }
}

/// An element's `@type`, as a list (a string is a list of one).
fn types(v: &Value) -> Vec<String> {
    match v.get("@type") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

impl Schema {
    /// The schema as DTDL writes it (what `parse_schema` reads back).
    pub fn to_dtdl(&self) -> Value {
        match self {
            Schema::Primitive(p) => Value::String(p.name().to_owned()),
            Schema::Geo(g) => {
                Value::String(Geo::ALL.iter().find(|(_, x, _)| x == g).map_or("point", |(n, _, _)| n).to_owned())
            }
            Schema::GeoPoint => Value::String("dtmi:iotcentral:schema:geopoint;1".to_owned()),
            Schema::Vector => Value::String("dtmi:iotcentral:schema:vector;1".to_owned()),
            Schema::Enum { string_valued, values } => serde_json::json!({
                "@type": "Enum",
                "valueSchema": if *string_valued { "string" } else { "integer" },
                "enumValues": values.iter().map(|(n, v)| serde_json::json!({"name": n, "enumValue": v})).collect::<Vec<_>>(),
            }),
            Schema::Object { fields } => serde_json::json!({
                "@type": "Object",
                "fields": fields.iter().map(|(n, s)| serde_json::json!({"name": n, "schema": s.to_dtdl()})).collect::<Vec<_>>(),
            }),
            Schema::Map { value } => serde_json::json!({
                "@type": "Map",
                "mapKey": {"name": "key", "schema": "string"},
                "mapValue": {"name": "value", "schema": value.to_dtdl()},
            }),
            Schema::Array { element } => serde_json::json!({"@type": "Array", "elementSchema": element.to_dtdl()}),
        }
    }

    /// Whether `v` fits the schema; the error says where and why (`.field[2]: expected double`).
    pub fn check(&self, v: &Value) -> Result<(), String> {
        self.check_at(v, "")
    }

    fn check_at(&self, v: &Value, at: &str) -> Result<(), String> {
        let fail = |what: &str| {
            Err(format!("{}: expected {what}, got {}", if at.is_empty() { "value" } else { at }, short(v)))
        };
        match self {
            Schema::Primitive(p) => {
                let ok = match p {
                    Primitive::Boolean => v.is_boolean(),
                    Primitive::Double | Primitive::Float | Primitive::Decimal => v.is_number(),
                    Primitive::String | Primitive::Bytes => v.is_string(),
                    Primitive::Date => v.as_str().is_some_and(is_date),
                    Primitive::DateTime => v.as_str().is_some_and(is_date_time),
                    Primitive::Time => v.as_str().is_some_and(is_time),
                    Primitive::Duration => v.as_str().is_some_and(is_duration),
                    Primitive::Uuid => v.as_str().is_some_and(|s| uuid::Uuid::parse_str(s).is_ok()),
                    _ => {
                        let (lo, hi) = p.integer_range().unwrap_or((0, 0));
                        let n = v.as_i64().map(i128::from).or_else(|| v.as_u64().map(i128::from));
                        n.is_some_and(|n| (lo..=hi).contains(&n))
                    }
                };
                if ok { Ok(()) } else { fail(p.name()) }
            }
            Schema::Enum { values, .. } => {
                if values.iter().any(|(_, x)| x == v) {
                    Ok(())
                } else {
                    fail("one of the enum's values")
                }
            }
            Schema::GeoPoint => {
                let num = |k: &str| v.get(k).is_some_and(Value::is_number);
                if v.is_object() && num("lat") && num("lon") && v.get("alt").is_none_or(Value::is_number) {
                    Ok(())
                } else {
                    fail("a geopoint {lat, lon, alt?}")
                }
            }
            Schema::Vector => {
                if v.is_object() && ["x", "y", "z"].iter().all(|k| v.get(k).is_some_and(Value::is_number)) {
                    Ok(())
                } else {
                    fail("a vector {x, y, z}")
                }
            }
            Schema::Geo(g) => {
                let ok = v.get("type").and_then(Value::as_str) == Some(g.geojson_type())
                    && v.get("coordinates").is_some_and(|c| coordinates_nest(c, g.depth()));
                if ok { Ok(()) } else { fail(&format!("a GeoJSON {}", g.geojson_type())) }
            }
            Schema::Object { fields } => {
                let Value::Object(m) = v else { return fail("an object") };
                for (k, x) in m {
                    let Some((_, s)) = fields.iter().find(|(n, _)| n == k) else {
                        return Err(format!("{at}.{k}: not a field of the object"));
                    };
                    s.check_at(x, &format!("{at}.{k}"))?;
                }
                Ok(())
            }
            Schema::Map { value } => {
                let Value::Object(m) = v else { return fail("a map (an object)") };
                m.iter().try_for_each(|(k, x)| value.check_at(x, &format!("{at}.{k}")))
            }
            Schema::Array { element } => {
                let Value::Array(items) = v else { return fail("an array") };
                items.iter().enumerate().try_for_each(|(i, x)| element.check_at(x, &format!("{at}[{i}]")))
            }
        }
    }
}

fn coordinates_nest(c: &Value, depth: usize) -> bool {
    match (c, depth) {
        (Value::Array(a), 1) => a.len() >= 2 && a.iter().all(Value::is_number),
        (Value::Array(a), d) => a.iter().all(|x| coordinates_nest(x, d - 1)),
        _ => false,
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 { format!("{}…", &s[..s.floor_char_boundary(60)]) } else { s }
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `YYYY-MM-DD` (RFC 3339 full-date).
fn is_date(s: &str) -> bool {
    let p: Vec<&str> = s.split('-').collect();
    p.len() == 3 && p[0].len() == 4 && p[1].len() == 2 && p[2].len() == 2 && p.iter().all(|x| digits(x))
}

/// `hh:mm:ss[.frac]` with an optional offset (RFC 3339 partial-time, time-offset).
fn is_time(s: &str) -> bool {
    let s = s.strip_suffix('Z').unwrap_or(s);
    let s = match s.rfind(['+', '-']) {
        Some(i) if i >= 8 => &s[..i],
        _ => s,
    };
    let (hms, frac) = s.split_once('.').unwrap_or((s, "0"));
    let p: Vec<&str> = hms.split(':').collect();
    p.len() == 3 && p.iter().all(|x| x.len() == 2 && digits(x)) && digits(frac)
}

/// RFC 3339 date-time.
fn is_date_time(s: &str) -> bool {
    s.split_once(['T', 't']).is_some_and(|(d, t)| is_date(d) && is_time(t))
}

/// ISO 8601 duration: `P[nY][nM][nW][nD][T[nH][nM][n[.n]S]]`, at least one part.
fn is_duration(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('P') else { return false };
    let (date, time) = rest.split_once('T').map_or((rest, None), |(d, t)| (d, Some(t)));
    let parts = |text: &str, units: &str| -> Option<usize> {
        let mut n = 0;
        let mut num = String::new();
        let mut allowed = units;
        for c in text.chars() {
            if c.is_ascii_digit() || c == '.' {
                num.push(c);
            } else {
                let i = allowed.find(c)?;
                if num.is_empty() || num.parse::<f64>().is_err() {
                    return None;
                }
                allowed = &allowed[i + 1..];
                num.clear();
                n += 1;
            }
        }
        num.is_empty().then_some(n)
    };
    match (parts(date, "YMWD"), time.map(|t| parts(t, "HMS"))) {
        (Some(d), None) => d > 0,
        (Some(_), Some(Some(t))) => t > 0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn dtmis_and_their_repository_paths() {
        for ok in ["dtmi:com:example:Thermostat;1", "dtmi:a;999999999", "dtmi:a_b:c1;2", "dtmi:x:y;1.2"] {
            assert!(valid_dtmi(ok), "{ok}");
        }
        for bad in [
            "dtmi:com:example:Thermostat",
            "dtmi:1a;1",
            "dtmi:a_;1",
            "dtmi:a;0",
            "dtmi:a;01",
            "urn:a;1",
            "dtmi:a:;1",
            "dtmi:a;1234567890",
        ] {
            assert!(!valid_dtmi(bad), "{bad}");
        }
        assert_eq!(
            repository_path("dtmi:com:Example:Thermostat;1").as_deref(),
            Some("dtmi/com/example/thermostat-1.json")
        );
        assert_eq!(repository_path("not a dtmi"), None);
    }

    fn thermostat() -> Value {
        json!({
            "@context": "dtmi:dtdl:context;2",
            "@id": "dtmi:test:Thermostat;1",
            "@type": "Interface",
            "displayName": {"en": "Thermostat"},
            "contents": [
                {"@type": ["Telemetry", "Temperature"], "name": "temperature", "schema": "double", "unit": "degreeCelsius"},
                {"@type": ["Property", "Temperature"], "name": "targetTemperature", "schema": "double", "writable": true},
                {"@type": "Property", "name": "mode", "schema": "dtmi:test:Mode;1", "writable": true},
                {"@type": "Command", "name": "getReport",
                 "request": {"name": "since", "schema": "dateTime"},
                 "response": {"name": "report", "schema": {"@type": "Object", "fields": [
                     {"name": "maxTemp", "schema": "double"},
                     {"name": "tags", "schema": {"@type": "Array", "elementSchema": "string"}}]}}},
                {"@type": "Component", "name": "deviceInfo", "schema": "dtmi:test:DeviceInfo;1"},
                {"@type": "Relationship", "name": "partOf"}
            ],
            "schemas": [
                {"@id": "dtmi:test:Mode;1", "@type": "Enum", "valueSchema": "string",
                 "enumValues": [{"name": "heat", "enumValue": "heat"}, {"name": "cool", "enumValue": "cool"}]}
            ]
        })
    }

    #[test]
    fn an_interface_parses_with_its_contents_and_named_schemas() {
        let (ifs, problems) = parse_document(&thermostat());
        assert_eq!(problems, vec![]);
        let t = &ifs[0];
        assert_eq!(
            (t.id.as_str(), t.version, t.display_name.as_deref()),
            ("dtmi:test:Thermostat;1", 2, Some("Thermostat"))
        );
        assert_eq!(t.contents.len(), 6);
        assert_eq!(t.contents[0].semantic, vec!["Temperature".to_owned()]);
        assert_eq!(t.contents[0].unit.as_deref(), Some("degreeCelsius"));
        let ContentKind::Property { schema, writable: true } = &t.contents[2].kind else {
            panic!("{:?}", t.contents[2])
        };
        assert!(schema.check(&json!("heat")).is_ok());
        assert!(schema.check(&json!("warm")).is_err());
        assert_eq!(t.contents[4].kind, ContentKind::Component { interface: "dtmi:test:DeviceInfo;1".into() });
    }

    #[test]
    fn every_problem_is_reported_with_its_pointer() {
        let doc = json!({
            "@context": "dtmi:dtdl:context;2",
            "@id": "dtmi:test:Bad;1",
            "@type": "Interface",
            "contents": [
                {"@type": "Telemetry", "name": "1st", "schema": "double"},
                {"@type": "Telemetry", "name": "t", "schema": "quaternion"},
                {"@type": "Property", "name": "p"},
                {"@type": "Gadget", "name": "g"},
                {"@type": "Telemetry", "name": "u", "schema": "uuid"},
                {"@type": "Telemetry", "name": "e", "schema": {"@type": "Enum", "valueSchema": "integer", "enumValues": [{"name": "a", "enumValue": "x"}]}},
                {"@type": "Telemetry", "name": "t", "schema": "double"}
            ]
        });
        let (_, problems) = parse_document(&doc);
        let got: Vec<String> = problems.iter().map(|p| format!("{}: {}", p.pointer, p.message)).collect();
        let expect = [
            "/contents/0/name: \"1st\" is not a valid name",
            "/contents/1/schema: unknown schema \"quaternion\"",
            "/contents/2: schema is required",
            "/contents/3/@type: \"Gadget\" is not a content class",
            "/contents/4/schema: \"uuid\" is a DTDL v3 schema; the context is v2",
            "/contents/5/schema/enumValues/0/enumValue: must be an integer",
            "/contents/6: \"t\" appears twice in the interface",
        ];
        for e in expect {
            assert!(got.iter().any(|g| g.starts_with(e)), "missing {e:?} in {got:#?}");
        }
    }

    #[test]
    fn values_are_checked_against_schemas() {
        let p = |n: &str| Schema::Primitive(Primitive::from_name(n).unwrap().0);
        assert!(p("integer").check(&json!(5)).is_ok());
        assert!(p("integer").check(&json!(5.5)).is_err());
        assert!(p("integer").check(&json!(3_000_000_000u64)).is_err());
        assert!(p("unsignedByte").check(&json!(-1)).is_err());
        assert!(p("dateTime").check(&json!("2026-11-29T20:00:00Z")).is_ok());
        assert!(p("dateTime").check(&json!("2026-11-29T20:00:00.123+01:00")).is_ok());
        assert!(p("dateTime").check(&json!("yesterday")).is_err());
        assert!(p("date").check(&json!("2026-11-29")).is_ok());
        assert!(p("time").check(&json!("20:00:00")).is_ok());
        assert!(p("duration").check(&json!("PT1H30M")).is_ok());
        assert!(p("duration").check(&json!("P1DT")).is_err());
        assert!(p("duration").check(&json!("1h")).is_err());
        assert!(p("uuid").check(&json!("6b822696-f75a-46f5-8b02-0680db65abf5")).is_ok());
        let obj = Schema::Object {
            fields: vec![("a".into(), p("double")), ("b".into(), Schema::Array { element: Box::new(p("string")) })],
        };
        assert!(obj.check(&json!({"a": 1.5, "b": ["x"]})).is_ok());
        assert_eq!(obj.check(&json!({"a": 1.5, "b": ["x", 2]})), Err(".b[1]: expected string, got 2".to_owned()));
        assert!(obj.check(&json!({"c": 1})).is_err());
        assert!(Schema::GeoPoint.check(&json!({"lat": 47.6, "lon": -122.1})).is_ok());
        assert!(Schema::GeoPoint.check(&json!({"lat": 47.6})).is_err());
        assert!(Schema::Geo(Geo::Point).check(&json!({"type": "Point", "coordinates": [1.0, 2.0]})).is_ok());
        assert!(Schema::Geo(Geo::LineString).check(&json!({"type": "LineString", "coordinates": [1.0, 2.0]})).is_err());
        let map = Schema::Map { value: Box::new(p("integer")) };
        assert!(map.check(&json!({"x": 1, "y": 2})).is_ok());
        assert!(map.check(&json!({"x": "1"})).is_err());
    }

    #[test]
    fn a_schema_written_out_reads_back_the_same() {
        let (ifs, _) = parse_document(&thermostat());
        for c in &ifs[0].contents {
            let schemas: Vec<&Schema> = match &c.kind {
                ContentKind::Telemetry { schema } | ContentKind::Property { schema, .. } => vec![schema],
                ContentKind::Command { request, response } => request.iter().chain(response).map(|(_, s)| s).collect(),
                _ => vec![],
            };
            for s in schemas {
                assert_eq!(parse_schema(&s.to_dtdl()).as_ref(), Ok(s));
            }
        }
        assert!(parse_schema(&json!("quaternion")).is_err());
    }

    #[test]
    fn deep_or_hostile_documents_end_in_problems_not_panics() {
        let mut schema = json!("double");
        for _ in 0..50 {
            schema = json!({"@type": "Array", "elementSchema": schema});
        }
        let doc = json!({"@context": "dtmi:dtdl:context;3", "@id": "dtmi:a;1", "@type": "Interface",
            "contents": [{"@type": "Telemetry", "name": "deep", "schema": schema}]});
        let (_, problems) = parse_document(&doc);
        assert!(problems.iter().any(|p| p.message.contains("nest at most")), "{problems:?}");
        for hostile in
            [json!(null), json!(1), json!([1, "x"]), json!({"@type": 5}), json!({"@context": 7, "@type": "Interface"})]
        {
            let _ = parse_document(&hostile);
        }
    }
}
