//! Reading TOML the way a user needs to be told about mistakes: every problem in a file at once,
//! each with its file, line, column and field path. serde stops at the first error, so documents
//! are parsed into an owned tree that keeps spans, and schemas are checked by walking it.

use std::ops::{Range, RangeInclusive};
use std::time::Duration;

use toml::de::{DeTable, DeValue};

use crate::problems::Problem;

/// Why an I/O operation failed, in words: `ErrorKind`'s own text ("entity not found") says
/// nothing to someone looking at a config file.
pub fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => e.to_string(),
    }
}

/// Where a dotted field path (`behaviour.max_subscriptions`, `enrollments[1].group_id`) is in a
/// TOML text: the 1-based line and column of its value, or of the nearest enclosing table found.
pub fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    let (root, _) = DeTable::parse_recoverable(text);
    let mut best = None;
    let mut table: &DeTable<'_> = root.get_ref();
    let mut segments = path.split('.').peekable();
    while let Some(seg) = segments.next() {
        let (key, index) = match seg.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        let (_, value) = table.iter().find(|(k, _)| k.get_ref() == key)?;
        let mut value = value;
        best = Some(line_col(text, value.span().start));
        if let (Some(i), DeValue::Array(items)) = (index, value.get_ref()) {
            value = items.get(i)?;
            best = Some(line_col(text, value.span().start));
        }
        match value.get_ref() {
            DeValue::Table(t) if segments.peek().is_some() => table = t,
            _ => break,
        }
    }
    best
}

/// Edit distance, for "did you mean" suggestions.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != b[j])).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The known name closest to `unknown`, when it is close enough to be a typo.
pub fn suggest<'a>(unknown: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let lower = unknown.to_ascii_lowercase();
    known
        .into_iter()
        .map(|k| (distance(&lower, &k.to_ascii_lowercase()), k))
        .filter(|(d, k)| *d <= (k.chars().count() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// A value with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub span: Range<usize>,
    pub value: Val,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Vec<Entry>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_span: Range<usize>,
    pub node: Node,
}

impl Val {
    pub fn kind(&self) -> &'static str {
        match self {
            Val::Str(_) => "a string",
            Val::Int(_) => "an integer",
            Val::Float(_) => "a float",
            Val::Bool(_) => "a boolean",
            Val::Datetime(_) => "a date-time",
            Val::Array(_) => "an array",
            Val::Table(_) => "a table",
        }
    }
}

/// One file being read: its text (for positions) and the problems found so far.
pub struct Doc {
    pub file: String,
    text: String,
    pub problems: Vec<Problem>,
    /// How many of the first `problems` are syntax errors.
    syntax: usize,
    /// Which `problems` are about the document's shape (unknown or missing keys and tables).
    shape: Vec<usize>,
}

fn convert(v: &toml::Spanned<DeValue<'_>>, doc: &mut Doc) -> Node {
    let span = v.span();
    let value = match v.get_ref() {
        DeValue::String(s) => Val::Str(s.to_string()),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Val::Int(n),
            Err(_) => {
                doc.error(span.clone(), "", "integer out of range");
                Val::Int(0)
            }
        },
        DeValue::Float(f) => Val::Float(f.as_str().replace('_', "").parse().unwrap_or(f64::NAN)),
        DeValue::Boolean(b) => Val::Bool(*b),
        DeValue::Datetime(d) => Val::Datetime(d.to_string()),
        DeValue::Array(a) => Val::Array(a.iter().map(|x| convert(x, doc)).collect()),
        DeValue::Table(t) => Val::Table(convert_table(t, doc)),
    };
    Node { span, value }
}

fn convert_table(t: &DeTable<'_>, doc: &mut Doc) -> Vec<Entry> {
    t.iter().map(|(k, v)| Entry { key: k.get_ref().to_string(), key_span: k.span(), node: convert(v, doc) }).collect()
}

impl Doc {
    /// Parses a document, recording syntax errors; the tree holds whatever could be read.
    pub fn parse(file: impl Into<String>, text: String) -> (Doc, Node) {
        let mut doc =
            Doc { file: file.into(), text: String::new(), problems: Vec::new(), syntax: 0, shape: Vec::new() };
        let (root, errors) = DeTable::parse_recoverable(&text);
        doc.text = text.clone();
        for e in errors {
            let span = e.span().unwrap_or(0..0);
            doc.error(span, "", e.message().trim().to_owned());
        }
        doc.syntax = doc.problems.len();
        let span = root.span();
        let entries = convert_table(root.get_ref(), &mut doc);
        (doc, Node { span, value: Val::Table(entries) })
    }

    pub fn error(&mut self, span: Range<usize>, field: &str, message: impl Into<String>) {
        let (line, column) = line_col(&self.text, span.start);
        self.problems.push(Problem {
            file: self.file.clone(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// A problem with the document's shape: a key or table missing or unknown.
    pub fn shape_error(&mut self, span: Range<usize>, field: &str, message: impl Into<String>) {
        self.shape.push(self.problems.len());
        self.error(span, field, message);
    }

    /// The problems to show. After a syntax error the tree holds only what could be read, so
    /// what it says about the document's shape (a missing `[[devices]]`, a key that landed in
    /// the wrong table) would mislead: those are left out then; bad values are still shown.
    pub fn into_problems(self) -> Vec<Problem> {
        if self.syntax == 0 {
            return self.problems;
        }
        let shape = self.shape;
        self.problems.into_iter().enumerate().filter(|(i, _)| !shape.contains(i)).map(|(_, d)| d).collect()
    }

    /// The file's text under a span (a value as written, quotes included), when it is in range.
    pub fn source(&self, span: &Range<usize>) -> Option<&str> {
        self.text.get(span.clone())
    }

    /// 1-based line and column of a span's start in this file.
    pub fn position(&self, span: &Range<usize>) -> (usize, usize) {
        line_col(&self.text, span.start)
    }

    /// Opens a table node for reading, or records that it is not one.
    pub fn table<'n>(&mut self, node: &'n Node, path: &str) -> Option<Table<'n>> {
        match &node.value {
            Val::Table(entries) => Some(Table {
                entries,
                path: path.to_owned(),
                span: node.span.clone(),
                used: vec![false; entries.len()],
                asked: Vec::new(),
            }),
            other => {
                self.error(node.span.clone(), path, format!("expected a table, found {}", other.kind()));
                None
            }
        }
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Reading one table: typed getters that record what is wrong and mark what was read, so that
/// `finish` can name every key the schema does not know.
pub struct Table<'n> {
    entries: &'n [Entry],
    pub path: String,
    pub span: Range<usize>,
    used: Vec<bool>,
    /// Every key the schema asked for, present or not: the names "did you mean" picks from.
    asked: Vec<String>,
}

impl<'n> Table<'n> {
    pub fn field(&self, key: &str) -> String {
        if self.path.is_empty() { key.to_owned() } else { format!("{}.{key}", self.path) }
    }

    /// Where a key's value is, or the table itself when the key is absent: for errors about it.
    pub fn span_of(&self, key: &str) -> Range<usize> {
        self.entries.iter().find(|e| e.key == key).map_or(self.span.clone(), |e| e.node.span.clone())
    }

    pub fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|e| e.key == key)
    }

    /// Records a key the schema knows, for suggestions.
    fn ask(&mut self, key: &str) {
        if !self.asked.iter().any(|k| k == key) {
            self.asked.push(key.to_owned());
        }
    }

    pub fn get(&mut self, key: &str) -> Option<&'n Node> {
        self.ask(key);
        let i = self.entries.iter().position(|e| e.key == key)?;
        self.used[i] = true;
        Some(&self.entries[i].node)
    }

    /// All entries not yet read, marking them read (for free-form maps).
    pub fn rest(&mut self) -> Vec<&'n Entry> {
        let mut out = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            if !self.used[i] {
                self.used[i] = true;
                out.push(e);
            }
        }
        out
    }

    /// Reports keys nobody read.
    pub fn finish(self, doc: &mut Doc) {
        for (i, e) in self.entries.iter().enumerate() {
            if !self.used[i] {
                let message = match suggest(&e.key, self.asked.iter().map(String::as_str)) {
                    Some(k) => format!("unknown field; did you mean `{k}`?"),
                    None => "unknown field".to_owned(),
                };
                doc.shape_error(e.key_span.clone(), &self.field(&e.key), message);
            }
        }
    }

    fn wrong(&self, doc: &mut Doc, key: &str, node: &Node, want: &str) {
        doc.error(node.span.clone(), &self.field(key), format!("expected {want}, found {}", node.value.kind()));
    }

    pub fn missing(&self, doc: &mut Doc, key: &str) {
        doc.shape_error(self.span.clone(), &self.field(key), "is required");
    }

    pub fn str(&mut self, doc: &mut Doc, key: &str) -> Option<String> {
        let node = self.get(key)?;
        match &node.value {
            Val::Str(s) => Some(s.clone()),
            _ => {
                self.wrong(doc, key, node, "a string");
                None
            }
        }
    }

    pub fn req_str(&mut self, doc: &mut Doc, key: &str) -> Option<String> {
        self.ask(key);
        if !self.has(key) {
            self.missing(doc, key);
            return None;
        }
        self.str(doc, key)
    }

    pub fn f64(&mut self, doc: &mut Doc, key: &str) -> Option<f64> {
        let node = self.get(key)?;
        match node.value {
            Val::Int(i) => Some(i as f64),
            Val::Float(f) if f.is_finite() => Some(f),
            _ => {
                self.wrong(doc, key, node, "a number");
                None
            }
        }
    }

    pub fn u64(&mut self, doc: &mut Doc, key: &str) -> Option<u64> {
        let node = self.get(key)?;
        match node.value {
            Val::Int(i) if i >= 0 => Some(i as u64),
            _ => {
                self.wrong(doc, key, node, "a non-negative integer");
                None
            }
        }
    }

    pub fn bool(&mut self, doc: &mut Doc, key: &str) -> Option<bool> {
        let node = self.get(key)?;
        match node.value {
            Val::Bool(b) => Some(b),
            _ => {
                self.wrong(doc, key, node, "true or false");
                None
            }
        }
    }

    /// A duration: `"2s"`, `"500ms"`, `"1.5m"`, `"1h"`, or a number of seconds, at most
    /// [`MAX_DURATION`] (so that adding it to a clock reading can never overflow).
    pub fn duration(&mut self, doc: &mut Doc, key: &str) -> Option<Duration> {
        self.duration_in(doc, key, Duration::ZERO, MAX_DURATION)
    }

    /// A duration within `min..=max`; outside, an error naming the field and the allowed range.
    pub fn duration_in(&mut self, doc: &mut Doc, key: &str, min: Duration, max: Duration) -> Option<Duration> {
        let node = self.get(key)?;
        let parsed = match &node.value {
            Val::Int(i) if *i >= 0 => Some(Duration::from_secs(*i as u64)),
            Val::Float(f) if *f >= 0.0 && f.is_finite() => Some(saturating_secs(*f)),
            Val::Str(s) => parse_duration(s),
            _ => None,
        };
        let Some(d) = parsed else {
            doc.error(
                node.span.clone(),
                &self.field(key),
                "expected a duration such as \"2s\", \"500ms\", \"1.5m\" or a number of seconds",
            );
            return None;
        };
        if d < min || d > max {
            doc.error(
                node.span.clone(),
                &self.field(key),
                format!("must be between {} and {}", show_duration(min), show_duration(max)),
            );
            return None;
        }
        Some(d)
    }

    /// A whole number within `range`; outside, an error naming the field and the allowed range.
    pub fn u64_in(&mut self, doc: &mut Doc, key: &str, range: RangeInclusive<u64>) -> Option<u64> {
        let node = self.get(key)?;
        match node.value {
            Val::Int(i) if i >= 0 && range.contains(&(i as u64)) => Some(i as u64),
            Val::Int(_) => {
                doc.error(
                    node.span.clone(),
                    &self.field(key),
                    format!("must be a whole number from {} to {}", range.start(), range.end()),
                );
                None
            }
            _ => {
                self.wrong(doc, key, node, &format!("a whole number from {} to {}", range.start(), range.end()));
                None
            }
        }
    }

    /// A finite number within `range`; outside, an error naming the field and the allowed range.
    pub fn f64_in(&mut self, doc: &mut Doc, key: &str, range: RangeInclusive<f64>) -> Option<f64> {
        let node = self.get(key)?;
        let v = match node.value {
            Val::Int(i) => i as f64,
            Val::Float(f) if f.is_finite() => f,
            _ => {
                self.wrong(doc, key, node, &format!("a number from {} to {}", range.start(), range.end()));
                return None;
            }
        };
        if !range.contains(&v) {
            doc.error(
                node.span.clone(),
                &self.field(key),
                format!("must be a number from {} to {}", range.start(), range.end()),
            );
            return None;
        }
        Some(v)
    }

    /// One of a fixed set of strings.
    pub fn choice(&mut self, doc: &mut Doc, key: &str, allowed: &[&'static str]) -> Option<&'static str> {
        let node = self.get(key)?;
        if let Val::Str(s) = &node.value
            && let Some(a) = allowed.iter().find(|a| **a == s)
        {
            return Some(a);
        }
        doc.error(
            node.span.clone(),
            &self.field(key),
            format!("expected one of {}", allowed.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ")),
        );
        None
    }

    pub fn table(&mut self, doc: &mut Doc, key: &str) -> Option<Table<'n>> {
        let path = self.field(key);
        let node = self.get(key)?;
        doc.table(node, &path)
    }

    /// An array of tables (`[[key]]`), each opened for reading; a single table is accepted too.
    pub fn tables(&mut self, doc: &mut Doc, key: &str) -> Vec<Table<'n>> {
        let path = self.field(key);
        let Some(node) = self.get(key) else { return Vec::new() };
        match &node.value {
            Val::Array(items) => {
                items.iter().enumerate().filter_map(|(i, n)| doc.table(n, &format!("{path}[{i}]"))).collect()
            }
            Val::Table(_) => doc.table(node, &path).into_iter().collect(),
            other => {
                doc.error(node.span.clone(), &path, format!("expected an array of tables, found {}", other.kind()));
                Vec::new()
            }
        }
    }

    pub fn strings(&mut self, doc: &mut Doc, key: &str) -> Option<Vec<String>> {
        let path = self.field(key);
        let node = self.get(key)?;
        let Val::Array(items) = &node.value else {
            doc.error(node.span.clone(), &path, format!("expected an array of strings, found {}", node.value.kind()));
            return None;
        };
        let mut out = Vec::new();
        for (i, n) in items.iter().enumerate() {
            match &n.value {
                Val::Str(s) => out.push(s.clone()),
                other => doc.error(
                    n.span.clone(),
                    &format!("{path}[{i}]"),
                    format!("expected a string, found {}", other.kind()),
                ),
            }
        }
        Some(out)
    }
}

/// The longest duration any setting accepts: one year. Longer ones are refused with a message,
/// never turned into a clock overflow (issue 10: `interval = 1e20` panicked).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// `"2s"`, `"500ms"`, `"1.5m"`, `"1h"`, `"0"`. Values too large for a `Duration` saturate, so the
/// caller's range check reports them instead of a panic.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| saturating_secs(secs))
}

/// Seconds as a `Duration`, `Duration::MAX` past its range (finite, non-negative input).
fn saturating_secs(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

/// A duration as a user would write it: `500ms`, `90s`, `365d`.
pub fn show_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() != 0 || s == 0 {
        format!("{}ms", d.as_millis())
    } else if s.is_multiple_of(86_400) {
        format!("{}d", s / 86_400)
    } else if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_problem_with_positions() {
        let text = "name = 3\ncount = \"x\"\n[inner]\nok = true\nstray = 1\n".to_owned();
        let (mut doc, root) = Doc::parse("f.toml", text);
        let mut t = doc.table(&root, "").unwrap();
        assert_eq!(t.str(&mut doc, "name"), None);
        assert_eq!(t.u64(&mut doc, "count"), None);
        let mut inner = t.table(&mut doc, "inner").unwrap();
        assert_eq!(inner.bool(&mut doc, "ok"), Some(true));
        inner.finish(&mut doc);
        t.missing(&mut doc, "needed");
        t.finish(&mut doc);
        let shown: Vec<String> = doc.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "f.toml:1:8: name: expected a string, found an integer",
                "f.toml:2:9: count: expected a non-negative integer, found a string",
                "f.toml:5:1: inner.stray: unknown field",
                "f.toml:1:1: needed: is required",
            ]
        );
    }

    #[test]
    fn syntax_errors_are_located_too() {
        let (doc, _) = Doc::parse("bad.toml", "a = 1\nb = \n".to_owned());
        assert_eq!(doc.problems.len(), 1);
        assert_eq!((doc.problems[0].line, doc.problems[0].file.as_str()), (2, "bad.toml"));
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5m"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("2 weeks"), None);
        assert_eq!(parse_duration("-1s"), None);
        // Too large for a Duration: saturates (for the range check to report), never panics.
        assert_eq!(parse_duration("5124095576030432h"), Some(Duration::MAX));
        assert_eq!(parse_duration("1e400"), None);
    }

    fn one(text: &str, read: impl FnOnce(&mut Table<'_>, &mut Doc)) -> Vec<String> {
        let (mut doc, root) = Doc::parse("f.toml", text.to_owned());
        let mut t = doc.table(&root, "").unwrap();
        read(&mut t, &mut doc);
        doc.problems.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn numbers_out_of_range_are_refused_with_the_field_and_the_range() {
        // Issue 10: each of these panicked in Duration::from_secs_f64 or wrapped silently.
        for text in ["interval = 1e20", "interval = \"5124095576030432h\"", "interval = 18446744073709551615.0"] {
            let shown = one(text, |t, d| assert_eq!(t.duration(d, "interval"), None));
            assert_eq!(shown, ["f.toml:1:12: interval: must be between 0ms and 365d"], "{text}");
        }
        let shown = one("a = \"10ms\"", |t, d| {
            assert_eq!(t.duration_in(d, "a", Duration::from_secs(1), Duration::from_secs(60)), None)
        });
        assert_eq!(shown, ["f.toml:1:5: a: must be between 1s and 60s"]);
        let shown = one("port = 70000", |t, d| assert_eq!(t.u64_in(d, "port", 1..=65535), None));
        assert_eq!(shown, ["f.toml:1:8: port: must be a whole number from 1 to 65535"]);
        let shown = one("port = -1", |t, d| assert_eq!(t.u64_in(d, "port", 1..=65535), None));
        assert_eq!(shown, ["f.toml:1:8: port: must be a whole number from 1 to 65535"]);
        let shown = one("x = nan", |t, d| assert_eq!(t.f64_in(d, "x", 0.0..=1.0), None));
        assert_eq!(shown, ["f.toml:1:5: x: expected a number from 0 to 1, found a float"]);
        let shown = one("x = -0.5", |t, d| assert_eq!(t.f64_in(d, "x", 0.0..=1.0), None));
        assert_eq!(shown, ["f.toml:1:5: x: must be a number from 0 to 1"]);
        assert!(
            one("x = 0.5\np = 443\nd = \"1h\"", |t, d| {
                assert_eq!(t.f64_in(d, "x", 0.0..=1.0), Some(0.5));
                assert_eq!(t.u64_in(d, "p", 1..=65535), Some(443));
                assert_eq!(t.duration(d, "d"), Some(Duration::from_secs(3600)));
            })
            .is_empty()
        );
    }

    #[test]
    fn deep_nesting_is_a_located_error_not_a_stack_overflow() {
        // Arrays, inline tables and dotted keys 100,000 deep: the parser's depth limit answers.
        for text in [
            format!("a = {}1{}", "[".repeat(100_000), "]".repeat(100_000)),
            format!("a = {}1{}", "{b = ".repeat(100_000), "}".repeat(100_000)),
            format!("{} = 1", vec!["k"; 100_000].join(".")),
            format!("[{}]", vec!["k"; 100_000].join(".")),
        ] {
            let (doc, _) = Doc::parse("deep.toml", text);
            assert!(!doc.ok(), "a 100,000-deep document must be refused");
            assert!(doc.problems[0].to_string().starts_with("deep.toml:1:"), "{}", doc.problems[0]);
        }
    }
}
