//! The IoT Hub query language, as far as twin selection needs it: `SELECT * FROM devices` or
//! `devices.modules`, with an optional WHERE over twin paths (`deviceId`, `tags.site`,
//! `properties.reported.fw`...). Comparisons (`= != <> < <= > >=`) against string, number, boolean
//! and null literals; `AND`, `OR`, `NOT`, parentheses; `IS_DEFINED(path)`, `STARTSWITH(path, 's')`,
//! `ENDSWITH(path, 's')`. Keywords are case-insensitive, paths are not. A missing path compares
//! false, as on the hub. Projections, GROUP BY and the jobs collections are not emulated.

use serde_json::Value;

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
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
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
        let mut left = self.and()?;
        while self.keyword("OR") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.unary()?;
        while self.keyword("AND") {
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.keyword("NOT") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if matches!(self.peek(), Some(Tok::Sym("("))) {
            self.pos += 1;
            let e = self.or()?;
            self.expect_sym(")")?;
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
        let mut p = Parser { toks: lex(text)?, pos: 0 };
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
        Expr::And(a, b) => eval(a, twin) && eval(b, twin),
        Expr::Or(a, b) => eval(a, twin) || eval(b, twin),
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
        ] {
            let err = Query::parse(q).unwrap_err();
            assert!(err.contains(want), "{q}: {err}");
        }
    }
}
