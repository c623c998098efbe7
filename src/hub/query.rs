//! The IoT Hub query language, as far as twin selection needs it: `SELECT * FROM devices` or
//! `devices.modules`, with an optional WHERE over twin paths (`deviceId`, `tags.site`,
//! `properties.reported.fw`...). Comparisons (`= != <> < <= > >=`) against string, number, boolean
//! and null literals; `AND`, `OR`, `NOT`, parentheses; `IS_DEFINED(path)`, `STARTSWITH(path, 's')`,
//! `ENDSWITH(path, 's')`. Keywords are case-insensitive, paths are not. A missing path compares
//! false, as on the hub. Projections, GROUP BY and the jobs collections are not emulated.
//!
//! Input is untrusted (any caller with RegistryRead or ServiceConnect), so nothing here recurses
//! without a bound: `AND`/`OR` chains are flat lists, and parentheses plus `NOT` may nest at most
//! [`MAX_DEPTH`] levels; deeper queries are refused with a message, never a stack overflow.

use serde_json::Value;

/// How deeply parentheses and `NOT` may nest. Real queries stay in single digits; the bound keeps
/// parsing, evaluation and dropping of the tree well inside any thread's stack.
pub const MAX_DEPTH: usize = 64;

/// Largest query text, in bytes, as IoT Hub's own query limit (8 KB of SQL) with room to spare.
pub const MAX_QUERY_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub modules: bool,
    pub filter: Option<Expr>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Cmp(Vec<String>, Op, Value),
    Defined(Vec<String>),
    StartsWith(Vec<String>, String),
    EndsWith(Vec<String>, String),
    Not(Box<Expr>),
    /// Every operand holds; a chain `a AND b AND c` is one flat list.
    And(Vec<Expr>),
    /// Any operand holds.
    Or(Vec<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Num(f64),
    Sym(&'static str),
}

fn lex(text: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '\'' || c == '"' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("a string literal is not closed".into()),
                    // A doubled quote inside a literal stands for one quote.
                    Some(&q) if q == c && chars.get(i + 1) == Some(&c) => {
                        s.push(c);
                        i += 2;
                    }
                    Some(&q) if q == c => {
                        i += 1;
                        break;
                    }
                    Some(&x) => {
                        s.push(x);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(s));
        } else if c.is_ascii_digit() || (c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            let start = i;
            i += 1;
            while chars.get(i).is_some_and(|d| d.is_ascii_digit() || *d == '.' || *d == 'e' || *d == 'E') {
                i += 1;
            }
            let s: String = chars[start..i].iter().collect();
            out.push(Tok::Num(s.parse().map_err(|_| format!("`{s}` is not a number"))?));
        } else if c.is_alphanumeric() || c == '_' || c == '$' {
            let start = i;
            while chars.get(i).is_some_and(|d| d.is_alphanumeric() || matches!(d, '_' | '$' | '.' | '-' | '*')) {
                i += 1;
            }
            out.push(Tok::Word(chars[start..i].iter().collect()));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let sym = ["<=", ">=", "<>", "!="].into_iter().find(|s| *s == two);
            match sym {
                Some(s) => {
                    out.push(Tok::Sym(s));
                    i += 2;
                }
                None => {
                    let s = ["=", "<", ">", "(", ")", ",", "*"]
                        .into_iter()
                        .find(|s| s.starts_with(c))
                        .ok_or_else(|| format!("unexpected `{c}`"))?;
                    out.push(Tok::Sym(s));
                    i += 1;
                }
            }
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    /// Open parentheses and `NOT`s around the current position.
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn keyword(&mut self, kw: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_sym(&mut self, s: &str) -> Result<(), String> {
        match self.next() {
            Some(Tok::Sym(x)) if x == s => Ok(()),
            other => Err(format!("expected `{s}`, found {}", describe(other.as_ref()))),
        }
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut terms = vec![self.and()?];
        while self.keyword("OR") {
            terms.push(self.and()?);
        }
        Ok(if terms.len() == 1 { terms.remove(0) } else { Expr::Or(terms) })
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut terms = vec![self.unary()?];
        while self.keyword("AND") {
            terms.push(self.unary()?);
        }
        Ok(if terms.len() == 1 { terms.remove(0) } else { Expr::And(terms) })
    }

    /// Enters one level of nesting, refusing past [`MAX_DEPTH`].
    fn nest(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("the WHERE clause nests parentheses and NOT deeper than {MAX_DEPTH} levels"));
        }
        Ok(())
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.keyword("NOT") {
            self.nest()?;
            let e = Expr::Not(Box::new(self.unary()?));
            self.depth -= 1;
            return Ok(e);
        }
        if matches!(self.peek(), Some(Tok::Sym("("))) {
            self.pos += 1;
            self.nest()?;
            let e = self.or()?;
            self.expect_sym(")")?;
            self.depth -= 1;
            return Ok(e);
        }
        self.predicate()
    }

    fn path(&mut self) -> Result<Vec<String>, String> {
        match self.next() {
            Some(Tok::Word(w)) => {
                // `devices.tags.x` and `tags.x` name the same thing.
                let w = w.strip_prefix("devices.modules.").or_else(|| w.strip_prefix("devices.")).unwrap_or(&w);
                Ok(w.split('.').map(str::to_owned).collect())
            }
            other => Err(format!("expected a property path, found {}", describe(other.as_ref()))),
        }
    }

    fn string_arg(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(s),
            other => Err(format!("expected a string, found {}", describe(other.as_ref()))),
        }
    }

    fn predicate(&mut self) -> Result<Expr, String> {
        for (name, kind) in [("IS_DEFINED", 0), ("STARTSWITH", 1), ("ENDSWITH", 2)] {
            if self.keyword(name) {
                self.expect_sym("(")?;
                let path = self.path()?;
                let e = match kind {
                    0 => Expr::Defined(path),
                    _ => {
                        self.expect_sym(",")?;
                        let s = self.string_arg()?;
                        if kind == 1 { Expr::StartsWith(path, s) } else { Expr::EndsWith(path, s) }
                    }
                };
                self.expect_sym(")")?;
                return Ok(e);
            }
        }
        let path = self.path()?;
        let op = match self.next() {
            Some(Tok::Sym("=")) => Op::Eq,
            Some(Tok::Sym("!=" | "<>")) => Op::Ne,
            Some(Tok::Sym("<")) => Op::Lt,
            Some(Tok::Sym("<=")) => Op::Le,
            Some(Tok::Sym(">")) => Op::Gt,
            Some(Tok::Sym(">=")) => Op::Ge,
            other => return Err(format!("expected a comparison, found {}", describe(other.as_ref()))),
        };
        let value = match self.next() {
            Some(Tok::Str(s)) => Value::String(s),
            Some(Tok::Num(n)) => serde_json::Number::from_f64(n).map(Value::Number).unwrap_or(Value::Null),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("true") => Value::Bool(true),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("false") => Value::Bool(false),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("null") => Value::Null,
            other => return Err(format!("expected a literal, found {}", describe(other.as_ref()))),
        };
        Ok(Expr::Cmp(path, op, value))
    }
}

fn describe(t: Option<&Tok>) -> String {
    match t {
        None => "the end of the query".into(),
        Some(Tok::Word(w)) => format!("`{w}`"),
        Some(Tok::Str(s)) => format!("'{s}'"),
        Some(Tok::Num(n)) => format!("{n}"),
        Some(Tok::Sym(s)) => format!("`{s}`"),
    }
}

impl Query {
    pub fn parse(text: &str) -> Result<Query, String> {
        if text.len() > MAX_QUERY_BYTES {
            return Err(format!("the query is longer than {MAX_QUERY_BYTES} bytes"));
        }
        let mut p = Parser { toks: lex(text)?, pos: 0, depth: 0 };
        if !(p.keyword("SELECT") && matches!(p.next(), Some(Tok::Sym("*"))) && p.keyword("FROM")) {
            return Err("the emulator answers SELECT * FROM devices [WHERE ...] (and devices.modules)".into());
        }
        let modules = match p.next() {
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("devices") => false,
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("devices.modules") => true,
            other => return Err(format!("unknown collection {}", describe(other.as_ref()))),
        };
        let filter = if p.keyword("WHERE") { Some(p.or()?) } else { None };
        if let Some(t) = p.peek() {
            return Err(format!("unexpected {} after the query", describe(Some(t))));
        }
        Ok(Query { modules, filter })
    }

    pub fn matches(&self, twin: &Value) -> bool {
        self.filter.as_ref().is_none_or(|f| eval(f, twin))
    }
}

fn lookup<'a>(twin: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(twin, |v, k| v.get(k.as_str()))
}

fn compare(a: &Value, op: Op, b: &Value) -> bool {
    use std::cmp::Ordering;
    let ord = match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64().zip(y.as_f64()).and_then(|(x, y)| x.partial_cmp(&y)),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        _ => None,
    };
    match (ord, op) {
        (None, Op::Ne) => true,
        (None, _) => false,
        (Some(o), Op::Eq) => o == Ordering::Equal,
        (Some(o), Op::Ne) => o != Ordering::Equal,
        (Some(o), Op::Lt) => o == Ordering::Less,
        (Some(o), Op::Le) => o != Ordering::Greater,
        (Some(o), Op::Gt) => o == Ordering::Greater,
        (Some(o), Op::Ge) => o != Ordering::Less,
    }
}

fn eval(e: &Expr, twin: &Value) -> bool {
    match e {
        Expr::Cmp(path, op, v) => lookup(twin, path).is_some_and(|x| compare(x, *op, v)),
        Expr::Defined(path) => lookup(twin, path).is_some_and(|v| !v.is_null()),
        Expr::StartsWith(path, s) => lookup(twin, path).and_then(Value::as_str).is_some_and(|x| x.starts_with(s)),
        Expr::EndsWith(path, s) => lookup(twin, path).and_then(Value::as_str).is_some_and(|x| x.ends_with(s)),
        Expr::Not(e) => !eval(e, twin),
        Expr::And(terms) => terms.iter().all(|t| eval(t, twin)),
        Expr::Or(terms) => terms.iter().any(|t| eval(t, twin)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn twin() -> Value {
        json!({
            "deviceId": "env-0001", "status": "enabled", "connectionState": "Connected",
            "tags": {"site": "oslo", "floor": 3},
            "properties": {"reported": {"fw": "1.2", "temp": 21.5}, "desired": {}},
        })
    }

    fn hit(q: &str) -> bool {
        Query::parse(q).unwrap_or_else(|e| panic!("{q}: {e}")).matches(&twin())
    }

    #[test]
    fn selects_by_tags_properties_and_functions() {
        assert!(hit("SELECT * FROM devices"));
        assert!(hit("select * from devices where tags.site = 'oslo'"));
        assert!(hit("SELECT * FROM devices WHERE devices.tags.floor >= 3 AND properties.reported.temp < 22"));
        assert!(!hit("SELECT * FROM devices WHERE tags.site = 'bergen' OR tags.floor > 3"));
        assert!(hit("SELECT * FROM devices WHERE NOT (tags.site = 'bergen') AND connectionState = 'Connected'"));
        assert!(hit("SELECT * FROM devices WHERE STARTSWITH(deviceId, 'env-') AND IS_DEFINED(properties.reported.fw)"));
        assert!(!hit("SELECT * FROM devices WHERE IS_DEFINED(tags.missing)"));
        assert!(
            !hit("SELECT * FROM devices WHERE tags.missing != 'x'"),
            "a missing value compares false, even unequal"
        );
        assert!(!hit("SELECT * FROM devices WHERE tags.missing = 'x'"));
        assert!(hit("SELECT * FROM devices WHERE ENDSWITH(deviceId, '0001') and tags.site <> 'x'"));
        assert!(Query::parse("SELECT * FROM devices.modules").unwrap().modules);
    }

    #[test]
    fn reports_what_it_cannot_read() {
        for (q, want) in [
            ("SELECT deviceId FROM devices", "SELECT * FROM devices"),
            ("SELECT * FROM jobs", "unknown collection"),
            ("SELECT * FROM devices WHERE tags.site = ", "expected a literal"),
            ("SELECT * FROM devices WHERE tags.site = 'x", "not closed"),
            ("SELECT * FROM devices WHERE (tags.a = 1", "expected `)`"),
            ("SELECT * FROM devices WHERE tags.a = 1 tags.b", "unexpected"),
            // Issue 10: 1,500 nested `(` and 5,000 nested `NOT` overflowed the stack.
            (
                &format!("SELECT * FROM devices WHERE {}tags.a = 1{}", "(".repeat(1500), ")".repeat(1500)),
                "deeper than 64",
            ),
            (&format!("SELECT * FROM devices WHERE {}tags.a = 1", "NOT ".repeat(5000)), "deeper than 64"),
            (&format!("SELECT * FROM devices WHERE {}tags.a = 1", "NOT (".repeat(40)), "deeper than 64"),
            (&format!("SELECT * FROM devices WHERE tags.a = '{}'", "x".repeat(MAX_QUERY_BYTES)), "longer than"),
        ] {
            let err = Query::parse(q).unwrap_err();
            assert!(err.contains(want), "{}: {err}", &q[..q.len().min(80)]);
        }
    }

    #[test]
    fn long_chains_and_the_deepest_allowed_nesting_parse_and_evaluate() {
        // A flat chain of 3,000 terms adds no depth: parsing, evaluation and drop stay iterative.
        let chain = vec!["tags.floor = 3"; 3_000].join(" AND ");
        assert!(hit(&format!("SELECT * FROM devices WHERE {chain}")));
        let chain = vec!["tags.floor = 4"; 3_000].join(" OR ");
        assert!(!hit(&format!("SELECT * FROM devices WHERE {chain}")));
        let deep = format!("SELECT * FROM devices WHERE {}tags.floor = 3{}", "(".repeat(64), ")".repeat(64));
        assert!(hit(&deep));
        assert!(hit(&format!("SELECT * FROM devices WHERE {}tags.floor = 3", "NOT NOT ".repeat(32))));
    }
}
