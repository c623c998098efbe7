//! Values in scenarios: constants, string templates and generators, nested into objects and
//! arrays. A TOML table with a `kind` key is a generator; any other table is a JSON object; every
//! string is a template (`{id}`, `{n}`, `{now}`, `{payload}` ...; `{{` for a literal brace).
//! Stateful generators (random walk, counter) keep their state per device in a `GenState`.

use std::f64::consts::PI;
use std::time::{Duration, SystemTime};

use rand::Rng;
use serde_json::{Map, Number, Value, json};

use crate::iot::time::iso8601;
use crate::tomlread::{Doc, Node, Table, Val};

/// What a template may refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    /// The device id (also for a module: its device's).
    Id,
    /// The device's ordinal in its template, from 1; `{n:04}` pads.
    N(usize),
    Module,
    Now,
    /// A command's request payload (strings unquoted, other JSON as text).
    Payload,
    /// A writable property's value.
    Value,
    /// A desired `$version`.
    Version,
    /// The telemetry message sequence number of this identity.
    Seq,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(String),
    Var(Var),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Template(Vec<Part>);

/// Which placeholders a place allows (ids allow only `{n}`, responses allow `{payload}` ...).
pub const ALL_VARS: &[&str] = &["id", "n", "module", "now", "payload", "value", "version", "seq"];

impl Template {
    pub fn parse(s: &str, allowed: &[&str]) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(ch) => name.push(ch),
                            None => return Err(format!("unclosed `{{` in \"{s}\" (write `{{{{` for a literal brace)")),
                        }
                    }
                    let (base, fmt) = name.split_once(':').map_or((name.as_str(), None), |(b, f)| (b, Some(f)));
                    if !allowed.contains(&base) {
                        return Err(format!(
                            "unknown placeholder `{{{name}}}`; this place allows {}",
                            allowed.iter().map(|a| format!("{{{a}}}")).collect::<Vec<_>>().join(", ")
                        ));
                    }
                    let var = match (base, fmt) {
                        ("n", None) => Var::N(0),
                        ("n", Some(f)) => Var::N(
                            f.strip_prefix('0')
                                .and_then(|w| w.parse().ok())
                                .ok_or_else(|| format!("`{{n:{f}}}`: the width is written like {{n:04}}"))?,
                        ),
                        (_, Some(_)) => return Err(format!("`{{{name}}}`: only {{n}} takes a width")),
                        ("id", None) => Var::Id,
                        ("module", None) => Var::Module,
                        ("now", None) => Var::Now,
                        ("payload", None) => Var::Payload,
                        ("value", None) => Var::Value,
                        ("version", None) => Var::Version,
                        ("seq", None) => Var::Seq,
                        _ => unreachable!("checked against allowed"),
                    };
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Var(var));
                }
                '}' => return Err(format!("stray `}}` in \"{s}\" (write `}}}}` for a literal brace)")),
                other => lit.push(other),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template(parts))
    }

    /// The value of a template that is exactly one placeholder, with its own JSON type: a
    /// `"{payload}"` of `42` is `42`, not `"42"`; `{n}`, `{seq}` and `{version}` are integers.
    /// `None` for anything else (text around it, a padded `{n:04}`), which renders as a string.
    pub fn value(&self, ctx: &Ctx<'_>) -> Option<Value> {
        let [Part::Var(v)] = self.0.as_slice() else { return None };
        match v {
            Var::Payload => ctx.payload.cloned(),
            Var::Value => ctx.value.cloned(),
            Var::N(0) => Some(json!(ctx.n)),
            Var::Seq => Some(json!(ctx.seq)),
            Var::Version => Some(json!(ctx.version.unwrap_or(0))),
            _ => None,
        }
    }

    pub fn is_constant(&self) -> bool {
        self.0.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    pub fn render(&self, ctx: &Ctx<'_>) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Var(v) => ctx.write(*v, &mut out),
            }
        }
        out
    }
}

/// What templates are rendered against.
#[derive(Debug, Clone, Default)]
pub struct Ctx<'a> {
    pub device_id: &'a str,
    pub n: u64,
    pub module_id: Option<&'a str>,
    pub payload: Option<&'a Value>,
    pub value: Option<&'a Value>,
    pub version: Option<u64>,
    pub seq: u64,
}

fn json_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Ctx<'_> {
    fn write(&self, v: Var, out: &mut String) {
        use std::fmt::Write;
        match v {
            Var::Id => out.push_str(self.device_id),
            Var::N(0) => {
                let _ = write!(out, "{}", self.n);
            }
            Var::N(w) => {
                let _ = write!(out, "{:0w$}", self.n);
            }
            Var::Module => out.push_str(self.module_id.unwrap_or_default()),
            Var::Now => out.push_str(&iso8601(SystemTime::now())),
            Var::Payload => out.push_str(&self.payload.map(json_text).unwrap_or_default()),
            Var::Value => out.push_str(&self.value.map(json_text).unwrap_or_default()),
            Var::Version => {
                let _ = write!(out, "{}", self.version.unwrap_or(0));
            }
            Var::Seq => {
                let _ = write!(out, "{}", self.seq);
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Generator {
    Uniform {
        min: f64,
        max: f64,
    },
    Gaussian {
        mean: f64,
        stddev: f64,
        min: f64,
        max: f64,
    },
    /// Random walk; state slot holds the position.
    Walk {
        start: f64,
        step: f64,
        min: f64,
        max: f64,
        slot: usize,
    },
    Sine {
        min: f64,
        max: f64,
        period: Duration,
        phase: f64,
    },
    /// Counter; state slot holds the next value.
    Counter {
        start: f64,
        step: f64,
        slot: usize,
    },
    Choice {
        values: Vec<ValueSpec>,
    },
    Timestamp,
    Bool {
        p_true: f64,
    },
}

/// How a numeric generator's result is written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rounding {
    Float(Option<u32>),
    Integer,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ValueSpec {
    Const(Value),
    Template(Template),
    Gen(Box<Generator>, Rounding),
    Object(Vec<(String, ValueSpec)>),
    Array(Vec<ValueSpec>),
}

/// Per-device state of stateful generators, indexed by slot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenState(pub Vec<f64>);

/// Compiles values, handing out state slots; one per scenario template.
#[derive(Debug, Default)]
pub struct Compiler {
    pub slots: Vec<f64>,
}

impl Compiler {
    /// A table of named values at `key` (reported properties, message properties), each compiled
    /// with the placeholders `vars` allows; empty when the key is absent.
    pub fn map(&mut self, doc: &mut Doc, t: &mut Table<'_>, key: &str, vars: &[&str]) -> Vec<(String, ValueSpec)> {
        let Some(mut r) = t.table(doc, key) else { return Vec::new() };
        let mut out = Vec::new();
        for e in r.rest() {
            if let Some(v) = self.value(doc, &e.node, &format!("{}.{}", r.path, e.key), vars) {
                out.push((e.key.clone(), v));
            }
        }
        r.finish(doc);
        out
    }

    /// The initial per-device state for everything compiled so far.
    pub fn initial_state(&self) -> GenState {
        GenState(self.slots.clone())
    }

    pub fn value(&mut self, doc: &mut Doc, node: &Node, path: &str, vars: &[&str]) -> Option<ValueSpec> {
        match &node.value {
            Val::Str(s) => match Template::parse(s, vars) {
                Ok(t) if t.is_constant() => {
                    Some(ValueSpec::Const(Value::String(s.replace("{{", "{").replace("}}", "}"))))
                }
                Ok(t) => Some(ValueSpec::Template(t)),
                Err(e) => {
                    doc.error(node.span.clone(), path, e);
                    None
                }
            },
            Val::Int(i) => Some(ValueSpec::Const(json!(i))),
            Val::Float(f) => Some(ValueSpec::Const(Number::from_f64(*f).map(Value::Number).unwrap_or(Value::Null))),
            Val::Bool(b) => Some(ValueSpec::Const(json!(b))),
            Val::Datetime(d) => Some(ValueSpec::Const(json!(d))),
            Val::Array(items) => {
                let out: Vec<_> = items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| self.value(doc, n, &format!("{path}[{i}]"), vars))
                    .collect();
                (out.len() == items.len()).then_some(ValueSpec::Array(out))
            }
            Val::Table(entries) if entries.iter().any(|e| e.key == "kind") => self.generator(doc, node, path, vars),
            Val::Table(entries) => {
                let mut out = Vec::new();
                let mut ok = true;
                for e in entries {
                    match self.value(doc, &e.node, &format!("{path}.{}", e.key), vars) {
                        Some(v) => out.push((e.key.clone(), v)),
                        None => ok = false,
                    }
                }
                ok.then_some(ValueSpec::Object(out))
            }
        }
    }

    fn generator(&mut self, doc: &mut Doc, node: &Node, path: &str, vars: &[&str]) -> Option<ValueSpec> {
        // Generator numbers stay where f64 arithmetic is exact for integers (2^53 ~ 9e15) and
        // `max - min` is finite: a range like -1e308..1e308 made `random_range` panic (issue 10).
        const GENERATOR_NUMBERS: std::ops::RangeInclusive<f64> = -1e15..=1e15;
        const KINDS: &[&str] = &["uniform", "gaussian", "walk", "sine", "counter", "choice", "timestamp", "bool"];
        let mut t = doc.table(node, path)?;
        let kind = t.choice(doc, "kind", KINDS)?;
        let errors_before = doc.problems.len();
        // A counter written with integers counts in integers: 2, not 2.0.
        let mut whole = false;
        let num = |t: &mut crate::tomlread::Table<'_>, doc: &mut Doc, key: &str, default: Option<f64>| match (
            t.f64_in(doc, key, GENERATOR_NUMBERS),
            default,
        ) {
            (Some(v), _) => v,
            (None, Some(d)) if !t.has(key) => d,
            (None, _) => {
                if !t.has(key) {
                    t.missing(doc, key);
                }
                0.0
            }
        };
        let generator = match kind {
            "uniform" => Generator::Uniform { min: num(&mut t, doc, "min", None), max: num(&mut t, doc, "max", None) },
            "gaussian" => {
                let mean = num(&mut t, doc, "mean", None);
                let stddev = num(&mut t, doc, "stddev", None);
                if stddev < 0.0 {
                    doc.error(t.span_of("stddev"), &t.field("stddev"), "must not be negative");
                }
                Generator::Gaussian {
                    mean,
                    stddev,
                    min: num(&mut t, doc, "min", Some(f64::MIN)),
                    max: num(&mut t, doc, "max", Some(f64::MAX)),
                }
            }
            "walk" => {
                let start = num(&mut t, doc, "start", None);
                let step = num(&mut t, doc, "step", Some(1.0));
                let (min, max) = (num(&mut t, doc, "min", Some(f64::MIN)), num(&mut t, doc, "max", Some(f64::MAX)));
                self.slots.push(start);
                Generator::Walk { start, step, min, max, slot: self.slots.len() - 1 }
            }
            "sine" => {
                let (min, max) = (num(&mut t, doc, "min", None), num(&mut t, doc, "max", None));
                let period = t
                    .duration_in(doc, "period", Duration::from_millis(1), crate::tomlread::MAX_DURATION)
                    .unwrap_or(Duration::from_secs(60));
                Generator::Sine { min, max, period, phase: num(&mut t, doc, "phase", Some(0.0)) }
            }
            "counter" => {
                whole =
                    [t.get("start"), t.get("step")].iter().all(|n| n.is_none_or(|n| matches!(n.value, Val::Int(_))));
                let start = num(&mut t, doc, "start", Some(0.0));
                self.slots.push(start);
                Generator::Counter { start, step: num(&mut t, doc, "step", Some(1.0)), slot: self.slots.len() - 1 }
            }
            "choice" => {
                let path_values = t.field("values");
                let values = match t.get("values") {
                    Some(Node { value: Val::Array(items), .. }) if !items.is_empty() => items
                        .iter()
                        .enumerate()
                        .filter_map(|(i, n)| self.value(doc, n, &format!("{path_values}[{i}]"), vars))
                        .collect(),
                    Some(n) => {
                        doc.error(n.span.clone(), &path_values, "expected a non-empty array");
                        Vec::new()
                    }
                    None => {
                        t.missing(doc, "values");
                        Vec::new()
                    }
                };
                Generator::Choice { values }
            }
            "timestamp" => Generator::Timestamp,
            "bool" => {
                let p = num(&mut t, doc, "p_true", Some(0.5));
                if !(0.0..=1.0).contains(&p) {
                    doc.error(t.span.clone(), &t.field("p_true"), "must be between 0 and 1");
                }
                Generator::Bool { p_true: p }
            }
            _ => unreachable!("choice() checked the kind"),
        };
        // `clamp` and `random_range` panic when min > max, so every generator with both is checked.
        if let Generator::Uniform { min, max }
        | Generator::Sine { min, max, .. }
        | Generator::Walk { min, max, .. }
        | Generator::Gaussian { min, max, .. } = generator
            && doc.problems.len() == errors_before
            && min > max
        {
            doc.error(t.span.clone(), path, format!("min ({min}) is above max ({max})"));
        }
        let integer = t.bool(doc, "integer");
        // An f64 carries about 15 significant decimal digits; more decimals are a mistake.
        // `decimals = 0` asks for whole numbers, which JSON writes as integers (2855, not 2855.0).
        let rounding = match (integer, t.u64_in(doc, "decimals", 0..=15)) {
            (Some(true), _) | (None, Some(0)) => Rounding::Integer,
            (_, Some(d)) => Rounding::Float(Some(d as u32)),
            (None, None) if whole => Rounding::Integer,
            _ => Rounding::Float(None),
        };
        t.finish(doc);
        (doc.problems.len() == errors_before).then(|| ValueSpec::Gen(Box::new(generator), rounding))
    }
}

fn round(x: f64, r: Rounding) -> Value {
    match r {
        Rounding::Integer => json!(x.round() as i64),
        Rounding::Float(Some(d)) => {
            let m = 10f64.powi(d as i32);
            Number::from_f64((x * m).round() / m).map(Value::Number).unwrap_or(Value::Null)
        }
        Rounding::Float(None) => Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null),
    }
}

/// A standard normal sample (Box-Muller), so no extra distribution crate is needed.
fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

impl ValueSpec {
    /// Produces a value; `since_start` drives periodic generators.
    pub fn eval(&self, ctx: &Ctx<'_>, state: &mut GenState, since_start: Duration, rng: &mut impl Rng) -> Value {
        match self {
            ValueSpec::Const(v) => v.clone(),
            ValueSpec::Template(t) => t.value(ctx).unwrap_or_else(|| Value::String(t.render(ctx))),
            ValueSpec::Object(fields) => {
                let mut m = Map::new();
                for (k, v) in fields {
                    m.insert(k.clone(), v.eval(ctx, state, since_start, rng));
                }
                Value::Object(m)
            }
            ValueSpec::Array(items) => {
                Value::Array(items.iter().map(|v| v.eval(ctx, state, since_start, rng)).collect())
            }
            ValueSpec::Gen(g, r) => match g.as_ref() {
                Generator::Uniform { min, max } => {
                    round(if min == max { *min } else { rng.random_range(*min..*max) }, *r)
                }
                Generator::Gaussian { mean, stddev, min, max } => {
                    round((mean + stddev * normal(rng)).clamp(*min, *max), *r)
                }
                Generator::Walk { step, min, max, slot, .. } => {
                    let x = (state.0[*slot] + rng.random_range(-1.0..=1.0) * step).clamp(*min, *max);
                    state.0[*slot] = x;
                    round(x, *r)
                }
                Generator::Sine { min, max, period, phase } => {
                    let t = since_start.as_secs_f64() / period.as_secs_f64();
                    round(min + (max - min) * (0.5 + 0.5 * (2.0 * PI * t + phase).sin()), *r)
                }
                Generator::Counter { step, slot, .. } => {
                    let x = state.0[*slot];
                    state.0[*slot] = x + step;
                    round(x, *r)
                }
                Generator::Choice { values } => {
                    values[rng.random_range(0..values.len())].eval(ctx, state, since_start, rng)
                }
                Generator::Timestamp => json!(iso8601(SystemTime::now())),
                Generator::Bool { p_true } => json!(rng.random_bool(*p_true)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(src: &str) -> (Option<ValueSpec>, Vec<String>, GenState) {
        let (mut doc, root) = Doc::parse("v.toml", format!("v = {src}\n"));
        let mut c = Compiler::default();
        let mut t = doc.table(&root, "").unwrap();
        let node = t.get("v").unwrap();
        let spec = c.value(&mut doc, node, "v", ALL_VARS);
        (spec, doc.problems.iter().map(ToString::to_string).collect(), c.initial_state())
    }

    fn eval(spec: &ValueSpec, state: &mut GenState) -> Value {
        let ctx = Ctx { device_id: "dev-7", n: 7, payload: Some(&json!(5)), ..Default::default() };
        spec.eval(&ctx, state, Duration::from_secs(15), &mut rand::rng())
    }

    #[test]
    fn templates_render_and_reject_unknown_placeholders() {
        let t = Template::parse("env-sensor-{n:04}", &["n"]).unwrap();
        assert_eq!(t.render(&Ctx { n: 7, ..Default::default() }), "env-sensor-0007");
        assert_eq!(Template::parse("a {{b}} c", &[]).unwrap().render(&Ctx::default()), "a {b} c");
        assert!(Template::parse("{paylod}", ALL_VARS).unwrap_err().contains("unknown placeholder `{paylod}`"));
        assert!(Template::parse("{payload}", &["n"]).is_err());
        assert!(Template::parse("x{", ALL_VARS).is_err());
        assert!(Template::parse("x}", ALL_VARS).is_err());
    }

    #[test]
    fn objects_nest_generators_and_templates() {
        let (spec, errs, mut st) = compile(
            r#"{ description = "Blinking LED every {payload} seconds", temp = { kind = "uniform", min = 1, max = 75, decimals = 1 }, seq = { kind = "counter", start = 10 }, id = "{id}", nested = { on = true } }"#,
        );
        assert!(errs.is_empty(), "{errs:?}");
        let spec = spec.unwrap();
        let v = eval(&spec, &mut st);
        assert_eq!(v["description"], "Blinking LED every 5 seconds");
        let temp = v["temp"].as_f64().unwrap();
        assert!((1.0..=75.0).contains(&temp) && (temp * 10.0).fract().abs() < 1e-9);
        assert_eq!(
            (v["seq"].clone(), v["id"].as_str(), v["nested"]["on"].as_bool()),
            (json!(10), Some("dev-7"), Some(true))
        );
        assert_eq!(eval(&spec, &mut st)["seq"], json!(11), "counters advance per device");
    }

    #[test]
    fn generators_stay_in_their_bounds() {
        let (spec, _, mut st) = compile(r#"{ kind = "walk", start = 50, step = 5, min = 45, max = 55 }"#);
        let spec = spec.unwrap();
        for _ in 0..200 {
            let x = eval(&spec, &mut st).as_f64().unwrap();
            assert!((45.0..=55.0).contains(&x));
        }
        let (g, _, mut st) =
            compile(r#"{ kind = "gaussian", mean = 20, stddev = 50, min = 0, max = 40, integer = true }"#);
        for _ in 0..200 {
            let x = eval(g.as_ref().unwrap(), &mut st).as_i64().unwrap();
            assert!((0..=40).contains(&x));
        }
        let (s, _, mut st) = compile(r#"{ kind = "sine", min = 0, max = 10, period = "60s" }"#);
        assert_eq!(eval(s.as_ref().unwrap(), &mut st), json!(10.0), "a quarter period in, the sine is at its max");
        let (c, _, mut st) = compile(r#"{ kind = "choice", values = ["a", "b"] }"#);
        assert!(["a", "b"].contains(&eval(c.as_ref().unwrap(), &mut st).as_str().unwrap()));
    }

    /// JSON number types as written on the wire: `2`, not `2.0`, wherever the user asked for
    /// whole numbers; a lone placeholder keeps its value's type.
    #[test]
    fn whole_numbers_are_json_integers_and_lone_placeholders_keep_their_type() {
        let wire = |src: &str| {
            let (spec, errs, mut st) = compile(src);
            assert!(errs.is_empty(), "{errs:?}");
            serde_json::to_string(&eval(spec.as_ref().unwrap(), &mut st)).unwrap()
        };
        assert_eq!(wire(r#"{ kind = "counter", start = 2, step = 3 }"#), "2");
        assert_eq!(wire(r#"{ kind = "counter", start = 2.5 }"#), "2.5");
        assert_eq!(wire(r#"{ kind = "counter", start = 2, step = 0.5 }"#), "2.0");
        assert_eq!(wire(r#"{ kind = "uniform", min = 2855, max = 2855, decimals = 0 }"#), "2855");
        assert_eq!(wire(r#"{ kind = "uniform", min = 2855, max = 2855, decimals = 1 }"#), "2855.0");
        assert_eq!(wire(r#"{ kind = "sine", min = 0, max = 10, period = "60s", integer = true }"#), "10");
        // `payload` is 5 in `eval`'s context; n is 7.
        assert_eq!(
            wire(r#"{ targetSpeed = "{payload}", n = "{n}", padded = "{n:03}", text = "at {payload}" }"#),
            r#"{"targetSpeed":5,"n":7,"padded":"007","text":"at 5"}"#
        );
    }

    #[test]
    fn bad_generators_are_reported_in_full() {
        let (spec, errs, _) = compile(r#"{ kind = "uniform", min = 9, max = 1, extra = 2 }"#);
        assert!(spec.is_none());
        assert!(errs.iter().any(|e| e.contains("min (9) is above max (1)")), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("v.extra: unknown field")), "{errs:?}");
        let (_, errs, _) = compile(r#"{ kind = "zigzag" }"#);
        assert!(errs[0].starts_with("v.toml:1:14: v.kind: expected one of"), "{errs:?}");
        let (_, errs, _) = compile(r#"{ kind = "uniform" }"#);
        assert_eq!(errs.len(), 2, "{errs:?}");
    }
}
