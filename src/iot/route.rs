//! IoT Edge routes: `FROM <source> [WHERE <condition>] INTO <sink>` (optionally preceded by
//! `SELECT *`), as the `$edgeHub` module twin's `routes` declare them, and which message sources a
//! route takes.
//!
//! Rules from Microsoft's "Deploy modules and establish routes in IoT Edge" and Edge hub's route
//! parser (Azure/iotedge `Routing.Core/grammar/Route.g4`, `RouteFactory.cs`, `EndpointFactory.cs`):
//!
//! - A source is a path of `/`-separated names or `*`: `/*`, `/messages/*`,
//!   `/messages/modules/{m}/*`, `/messages/modules/{m}/outputs/{o}`, `/twinChangeNotifications`.
//!   A trailing `*` and `/` are dropped and the rest matches as a case-insensitive prefix of the
//!   message's source path, whole segments only.
//! - Sinks: `$upstream` (IoT Hub) and `BrokeredEndpoint("/modules/{m}/inputs/{i}")` (another
//!   module's input). Function and endpoint names are case-insensitive.
//! - The condition is [`crate::iot::route_condition`]; errors in it are reported at their column in
//!   the whole route.

use super::property_bag::PropertyBag;
use super::route_condition::{Condition, ConditionError, MessageView, keywords};

/// A route that failed to parse: `position` is the 1-based character column in the route text.
pub type RouteError = ConditionError;

/// Where a message came from, as routes see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageSource<'a> {
    /// Telemetry from a device (a leaf device behind the Edge hub).
    Device,
    /// Telemetry from a module, sent on an output or (no output) as plain telemetry.
    Module { module: &'a str, output: Option<&'a str> },
    /// A module or device twin change notification.
    TwinChange,
}

impl MessageSource<'_> {
    /// The source path Edge hub gives the message, with a trailing `/`.
    pub fn path(&self) -> String {
        match self {
            MessageSource::Device => "/messages/".to_string(),
            MessageSource::Module { module, output: Some(o) } => format!("/messages/modules/{module}/outputs/{o}/"),
            MessageSource::Module { module, output: None } => format!("/messages/modules/{module}/"),
            MessageSource::TwinChange => "/twinChangeNotifications/".to_string(),
        }
    }
}

/// Where a route delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// `$upstream`: IoT Hub (the built-in endpoint and its routes).
    Upstream,
    /// `BrokeredEndpoint("/modules/{module}/inputs/{input}")`.
    ModuleInput { module: String, input: String },
}

/// One parsed route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The source path prefix, lower-cased, ending in `/`.
    prefix: String,
    condition: Condition,
    pub sink: Sink,
}

impl Route {
    /// Parses one route.
    ///
    /// # Errors
    /// A missing `FROM` or `INTO`, a malformed source path, a sink other than `$upstream` or a
    /// `BrokeredEndpoint` with a `/modules/{m}/inputs/{i}` address, or any error of the condition,
    /// each with its column in `text`.
    pub fn parse(text: &str) -> Result<Route, RouteError> {
        let err = |position: usize, message: String| Err(RouteError { position, message });
        let words = keywords(text)?;
        let col = |byte: usize| text[..byte].chars().count() + 1;
        let first_col = col(text.len() - text.trim_start().len());
        let mut at = 0;
        if words.first().is_some_and(|k| k.word == "SELECT") {
            let star = text[words[0].bytes.end..words.get(1).map_or(text.len(), |k| k.bytes.start)].trim();
            if star != "*" {
                return err(col(words[0].bytes.end), "SELECT must be followed by `*` and FROM".into());
            }
            at = 1;
        }
        let Some(from) = words.get(at).filter(|k| k.word == "FROM") else {
            return err(first_col, "a route starts with FROM (or SELECT * FROM)".into());
        };
        if at == 0 && from.position != first_col {
            return err(first_col, "a route starts with FROM (or SELECT * FROM)".into());
        }
        let where_ = words.get(at + 1).filter(|k| k.word == "WHERE");
        let into_at = at + 1 + usize::from(where_.is_some());
        let into = match words.get(into_at) {
            Some(k) if k.word == "INTO" => k,
            Some(k) => return err(k.position, format!("unexpected {}", k.word)),
            None => return err(text.chars().count() + 1, "a route ends with INTO and a sink".into()),
        };
        if let Some(k) = words.get(into_at + 1) {
            return err(k.position, format!("unexpected {}", k.word));
        }
        let source_end = where_.map_or(into.bytes.start, |w| w.bytes.start);
        let prefix = parse_source(&text[from.bytes.end..source_end], col(from.bytes.end))?;
        let condition = match where_ {
            None => Condition::compile("")?,
            Some(w) => {
                let cond = &text[w.bytes.end..into.bytes.start];
                if cond.trim().is_empty() {
                    return err(w.position, "WHERE must be followed by a condition".into());
                }
                let shift = col(w.bytes.end) - 1;
                Condition::compile(cond).map_err(|e| RouteError { position: e.position + shift, message: e.message })?
            }
        };
        let sink = parse_sink(&text[into.bytes.end..], col(into.bytes.end))?;
        Ok(Route { prefix, condition, sink })
    }

    /// Whether this route takes a message from `source` that `message` describes.
    pub fn takes(&self, source: MessageSource<'_>, message: &dyn MessageView) -> bool {
        let path = source.path().to_lowercase();
        path.starts_with(&self.prefix) && self.condition.matches(message)
    }
}

/// A module's message as routes read it: its MQTT property bag (application properties, and the
/// `$.` system keys under their routing names) and body, from `device_id`/`module_id`. Both Edge
/// hubs (the emulator's and the fleet's own) read messages through this one view.
pub struct ModuleMessage<'a> {
    pub properties: &'a PropertyBag,
    pub device_id: &'a str,
    pub module_id: &'a str,
    pub body: &'a [u8],
}

impl MessageView for ModuleMessage<'_> {
    fn property(&self, name: &str) -> Option<&str> {
        if name.starts_with("$.") { None } else { self.properties.get(name) }
    }

    /// The routing names of the system properties a module's message carries (Edge hub's
    /// `SystemProperties`, the MQTT property bag's `$.` keys).
    fn system_property(&self, name: &str) -> Option<&str> {
        let key = match name {
            "connectionDeviceId" => return Some(self.device_id),
            "connectionModuleId" => return Some(self.module_id),
            "connectionAuthMethod" => return Some(r#"{"scope":"module","type":"sas","issuer":"iothub"}"#),
            "contentType" => "$.ct",
            "contentEncoding" => "$.ce",
            "messageId" => "$.mid",
            "correlationId" => "$.cid",
            "userId" => "$.uid",
            "to" => "$.to",
            "outputName" => "$.on",
            "componentName" => "$.sub",
            "creationTimeUtc" => "$.ctime",
            _ => return None,
        };
        self.properties.get(key)
    }

    fn body(&self) -> &[u8] {
        self.body
    }
}

/// The property bag a module input receives (IoT Edge's delivery on
/// `devices/{d}/modules/{m}/inputs/{i}/{bag}`): the message's own properties without its output
/// name, and the sender as `$.cdid` / `$.cmid`.
pub fn input_properties(properties: &PropertyBag, device_id: &str, module_id: &str) -> PropertyBag {
    let mut bag = PropertyBag::default();
    for (k, v) in properties.iter() {
        if !matches!(k, "$.on" | "$.cdid" | "$.cmid") {
            bag.push(k, v.unwrap_or_default());
        }
    }
    bag.push("$.cdid", device_id);
    bag.push("$.cmid", module_id);
    bag
}

/// Where one message goes by a device's routes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// To IoT Hub (`$upstream`).
    pub upstream: bool,
    /// To these `(module, input)` pairs of the same device, each once.
    pub inputs: Vec<(String, String)>,
}

/// Where a module's message goes by `routes`: as Edge hub does, each sink once however many
/// routes take the message there, and nowhere when none does.
pub fn plan<'r>(routes: impl IntoIterator<Item = &'r Route>, message: &ModuleMessage<'_>) -> Plan {
    let source = MessageSource::Module { module: message.module_id, output: message.properties.get("$.on") };
    let mut plan = Plan::default();
    for route in routes {
        if !route.takes(source, message) {
            continue;
        }
        match &route.sink {
            Sink::Upstream => plan.upstream = true,
            Sink::ModuleInput { module, input } => {
                let pair = (module.clone(), input.clone());
                if !plan.inputs.contains(&pair) {
                    plan.inputs.push(pair);
                }
            }
        }
    }
    plan
}

/// Checks a source path and returns the prefix it matches (lower case, ending in `/`).
fn parse_source(raw: &str, column: usize) -> Result<String, RouteError> {
    let lead = raw.len() - raw.trim_start().len();
    let path = raw.trim();
    let at = column + raw[..lead].chars().count();
    let bad = |message: String| Err(RouteError { position: at, message });
    if !path.starts_with('/') {
        return bad(format!("the source `{path}` must be a path such as /messages/*"));
    }
    for item in path[1..].split('/') {
        let ok = item == "*"
            || (!item.is_empty() && item.chars().all(|c| !c.is_whitespace() && !"()<>@,;:\\\"[]?={}*".contains(c)));
        if !ok {
            return bad(format!("the source `{path}` has a malformed segment `{item}`"));
        }
    }
    let trimmed = path.trim_end_matches('*');
    let trimmed = if trimmed.len() > 1 { trimmed.trim_end_matches('/') } else { trimmed };
    let mut prefix = trimmed.to_lowercase();
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    Ok(prefix)
}

fn parse_sink(raw: &str, column: usize) -> Result<Sink, RouteError> {
    let lead = raw.len() - raw.trim_start().len();
    let sink = raw.trim();
    let at = column + raw[..lead].chars().count();
    let bad = |message: String| Err(RouteError { position: at, message });
    if sink.eq_ignore_ascii_case("$upstream") {
        return Ok(Sink::Upstream);
    }
    if sink.starts_with('$') {
        return bad(format!("system endpoint `{sink}` is not supported: the one system endpoint is $upstream"));
    }
    let Some(open) = sink.find('(') else {
        return bad(format!(
            "the sink `{sink}` must be $upstream or BrokeredEndpoint(\"/modules/{{m}}/inputs/{{i}}\")"
        ));
    };
    let func = sink[..open].trim();
    if !func.eq_ignore_ascii_case("BrokeredEndpoint") {
        return bad(format!("function endpoint type `{func}` is not supported: use BrokeredEndpoint"));
    }
    let arg = sink[open + 1..].strip_suffix(')').map(str::trim);
    let address = match arg {
        Some(a)
            if a.len() >= 2 && (a.starts_with('"') && a.ends_with('"') || a.starts_with('\'') && a.ends_with('\'')) =>
        {
            &a[1..a.len() - 1]
        }
        _ => return bad("BrokeredEndpoint takes one quoted address".into()),
    };
    let trimmed = address.trim();
    let trimmed = trimmed.strip_prefix('/').unwrap_or(trimmed);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    let items: Vec<&str> = trimmed.split('/').collect();
    match items.as_slice() {
        [_, module, _, input] if !module.is_empty() && !input.is_empty() => {
            Ok(Sink::ModuleInput { module: (*module).to_string(), input: (*input).to_string() })
        }
        _ => bad(format!("the address `{address}` must have the form /modules/{{mid}}/inputs/{{input}}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iot::route_condition::{JSON_UTF8, Parts};

    fn msg(properties: &'static [(&'static str, &'static str)], body: &'static str) -> Parts<'static> {
        Parts { properties, system: &JSON_UTF8, body: body.as_bytes() }
    }

    const TEMP: MessageSource = MessageSource::Module { module: "tempSensor", output: Some("temperatureOutput") };
    const FILTER: MessageSource = MessageSource::Module { module: "filterModule", output: Some("output1") };
    const PLAIN: Parts<'static> =
        Parts { properties: &[], system: &JSON_UTF8, body: br#"{"machine":{"temperature":30}}"# };

    fn route(text: &str) -> Route {
        Route::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn the_filter_tutorial_routes() {
        let to_filter = route(
            r#"FROM /messages/modules/tempSensor/outputs/temperatureOutput INTO BrokeredEndpoint("/modules/filterModule/inputs/input1")"#,
        );
        assert_eq!(to_filter.sink, Sink::ModuleInput { module: "filterModule".into(), input: "input1".into() });
        assert!(to_filter.takes(TEMP, &PLAIN));
        assert!(!to_filter.takes(FILTER, &PLAIN));
        let upstream = route("FROM /messages/modules/filterModule/outputs/output1 INTO $upstream");
        assert_eq!(upstream.sink, Sink::Upstream);
        assert!(upstream.takes(FILTER, &PLAIN));
        assert!(!upstream.takes(TEMP, &PLAIN));
    }

    #[test]
    fn sources_match_whole_segments_and_ignore_case() {
        let all = route("FROM /* INTO $upstream");
        let messages = route("FROM /messages/* INTO $upstream");
        let module = route("FROM /messages/modules/tempSensor/* INTO $upstream");
        let outputs = route("FROM /messages/modules/TEMPSENSOR/outputs/* INTO $upstream");
        let twins = route("FROM /twinChangeNotifications INTO $upstream");
        let short = route("FROM /messages/modules/temp/* INTO $upstream");
        for (r, device, temp, plain_module, twin) in [
            (&all, true, true, true, true),
            (&messages, true, true, true, false),
            (&module, false, true, true, false),
            (&outputs, false, true, false, false),
            (&twins, false, false, false, true),
            (&short, false, false, false, false),
        ] {
            assert_eq!(r.takes(MessageSource::Device, &PLAIN), device, "{r:?}");
            assert_eq!(r.takes(TEMP, &PLAIN), temp, "{r:?}");
            assert_eq!(
                r.takes(MessageSource::Module { module: "tempSensor", output: None }, &PLAIN),
                plain_module,
                "{r:?}"
            );
            assert_eq!(r.takes(MessageSource::TwinChange, &PLAIN), twin, "{r:?}");
        }
    }

    #[test]
    fn conditions_and_keywords() {
        let r = route(
            "SELECT * FROM /messages/* WHERE $body.machine.temperature > 25 AND is_defined($body.machine) = false INTO $UPSTREAM",
        );
        assert!(r.takes(TEMP, &PLAIN));
        let alert = route("from /messages/* where MessageType = 'Alert' into BrokeredEndpoint('/modules/m/inputs/i/')");
        assert!(!alert.takes(TEMP, &PLAIN));
        assert!(alert.takes(TEMP, &msg(&[("MessageType", "Alert")], "{}")));
        // A keyword inside a string or a name is not a keyword.
        let quoted = route("FROM /messages/* WHERE note = 'FROM here INTO there' INTO $upstream");
        assert!(quoted.takes(TEMP, &msg(&[("note", "FROM here INTO there")], "{}")));
        route("FROM /messages/* WHERE INTOLERANT = 'x' INTO $upstream");
    }

    #[test]
    fn bad_routes_are_refused_with_the_position() {
        for (text, pos, needle) in [
            ("", 1, "starts with FROM"),
            ("/messages/* INTO $upstream", 1, "starts with FROM"),
            ("FROM /messages/*", 17, "ends with INTO"),
            ("FROM messages INTO $upstream", 6, "must be a path"),
            ("FROM /messages/a b INTO $upstream", 6, "malformed"),
            ("FROM /messages/* INTO $downstream", 23, "not supported"),
            ("FROM /messages/* INTO Endpoint(\"/modules/a/inputs/b\")", 23, "not supported"),
            ("FROM /messages/* INTO BrokeredEndpoint(\"/modules/a\")", 23, "must have the form"),
            ("FROM /messages/* INTO BrokeredEndpoint(/modules/a/inputs/b)", 23, "quoted"),
            ("FROM /messages/* WHERE INTO $upstream", 18, "followed by a condition"),
            ("FROM /messages/* WHERE a = 1 INTO $upstream", 26, "one type"),
            ("FROM /messages/* WHERE (a = 'x' INTO $upstream", 33, "missing closing"),
            ("FROM /messages/* WHERE a = 'x' WHERE b = 'y' INTO $upstream", 32, "unexpected WHERE"),
            ("SELECT a FROM /messages/* INTO $upstream", 7, "SELECT must be followed"),
            ("FROM /* INTO $upstream INTO $upstream", 24, "unexpected INTO"),
        ] {
            match Route::parse(text) {
                Ok(r) => panic!("`{text}` parsed: {r:?}"),
                Err(e) => {
                    assert_eq!(e.position, pos, "{text}: {e}");
                    assert!(e.message.contains(needle), "{text}: {e}");
                }
            }
        }
    }

    #[test]
    fn no_prefix_or_mutation_of_a_route_panics() {
        let seeds = [
            r#"SELECT * FROM /messages/modules/a/outputs/* WHERE {$body.x[0]['k']} >= -1.5e3 AND NOT is_null(p) OR concat(a, 'b', "c\u0041") = 'x' ?? true INTO BrokeredEndpoint("/modules/m/inputs/i")"#,
            "FROM /* WHERE 'Ünï' || $connectionDeviceId <> substring('abc', 1, 1) /* c */ INTO $upstream",
        ];
        let probe = msg(&[("p", "v")], r#"{"x":[{"k":-2000}]}"#);
        let mut seen = 0;
        for seed in seeds {
            let chars: Vec<char> = seed.chars().collect();
            for cut in 0..=chars.len() {
                let prefix: String = chars[..cut].iter().collect();
                if let Ok(r) = Route::parse(&prefix) {
                    r.takes(TEMP, &probe);
                }
                // Drop, double or replace one character with each of a few troublemakers.
                for bad in ["", "((", "'", "\\", "$", "\u{0}", "é", "}", "[", "*"] {
                    let mut mutated: String = chars[..cut].iter().collect();
                    mutated.push_str(bad);
                    mutated.extend(chars.iter().skip(cut + 1));
                    if let Ok(r) = Route::parse(&mutated) {
                        r.takes(TEMP, &probe);
                    }
                    seen += 1;
                }
            }
        }
        assert!(seen > 1000);
    }

    #[test]
    fn module_messages_read_system_properties_from_the_bag() {
        let bag = PropertyBag::parse("%24.ct=application%2Fjson&%24.ce=utf-8&%24.on=out1&MessageType=Alert").unwrap();
        let m = ModuleMessage { properties: &bag, device_id: "edge1", module_id: "tempSensor", body: br#"{"t":5}"# };
        assert_eq!(m.system_property("outputName"), Some("out1"));
        assert_eq!(m.system_property("connectionModuleId"), Some("tempSensor"));
        assert_eq!(m.property("MessageType"), Some("Alert"));
        assert_eq!(m.property("$.on"), None, "system keys are not application properties");
        let r = Route::parse(
            "FROM /messages/* WHERE $body.t = 5 AND MessageType = 'Alert' AND $outputName = 'out1' INTO $upstream",
        )
        .unwrap();
        assert!(r.takes(MessageSource::Module { module: "tempSensor", output: Some("out1") }, &m));
    }
}
