//! The routing condition language (the `WHERE` part of an IoT Edge route and of an IoT Hub message
//! route): lexing, parsing, the operand-type check done when a route is saved, and evaluation
//! against one message.
//!
//! The rules follow IoT Edge hub's route compiler (Azure/iotedge, `Routing.Core/grammar/*.g4` and
//! `query/ConditionVisitor.cs`) and the IoT Hub docs ("IoT Hub message routing query syntax"):
//!
//! - Tokens are taken by longest match, ties going to the earlier rule, as ANTLR does. Identifiers
//!   may hold `-`, `.`, `+`, `!` and quotes, so `a-1` and even `5-1` are application property
//!   names; write spaces around operators.
//! - A bare name is an application property (a string); `$name` is a system property (a string:
//!   `$contentType`, `$connectionDeviceId`, `$connectionModuleId`, `$messageId`...), unless the
//!   message has an application property spelled `$name`, which wins. `$body.path` reads the JSON
//!   body (content type `application/json`, encoding UTF-8/16/32), `{$body.path}` always does.
//! - Operators, tightest first: unary `-` and `NOT`; `* / %`; `+ - ||`; `< <= > >=`; `= != <>`;
//!   `AND`; `OR`; `??`. Keywords are case-insensitive; `true`, `false`, `null`, `undefined` are not.
//! - Operands are type-checked when the route is compiled: `'a' = 1` or `-'x'` is refused with the
//!   position, as Edge refuses the deployment. Only body values are typed at run time.
//! - Evaluation is three-valued: a missing property, a non-JSON body or a type mismatch at run
//!   time yields `undefined`, and the route matches only when the condition is exactly `true`.
//!
//! Input is untrusted (a deployment any service caller may apply), so nothing recurses without a
//! bound: operator chains of one level are flat lists, and parentheses, unary operators and
//! function calls nest at most [`MAX_DEPTH`] levels.

use std::borrow::Cow;
use std::cmp::Ordering;

/// How deeply parentheses, unary operators and function calls may nest.
pub const MAX_DEPTH: usize = 64;

/// Largest condition text accepted, in bytes. IoT Hub caps a route query at 1,024 characters;
/// Edge has no documented cap, so the emulator allows more but not without bound.
pub const MAX_CONDITION_BYTES: usize = 16 * 1024;

/// A condition that failed to compile: `position` is the 1-based character column in the text
/// given to [`Condition::compile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionError {
    pub position: usize,
    pub message: String,
}

impl std::fmt::Display for ConditionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at position {}: {}", self.position, self.message)
    }
}

/// What a condition reads from a message. Property lookups are exact (IoT Edge keeps a message's
/// properties in an ordinal dictionary).
pub trait MessageView {
    /// An application property.
    fn property(&self, name: &str) -> Option<&str>;
    /// A system property by its routing name without `$`: `contentType`, `contentEncoding`,
    /// `messageId`, `correlationId`, `userId`, `to`, `connectionDeviceId`, `connectionModuleId`,
    /// `connectionAuthMethod`, `connectionDeviceGenerationId`, `enqueuedTime`, `outputName`...
    fn system_property(&self, name: &str) -> Option<&str>;
    /// The message body as sent.
    fn body(&self) -> &[u8];
}

/// A message held as plain slices (for tests, fuzzing, and callers that have the parts at hand).
#[derive(Debug, Clone, Copy)]
pub struct Parts<'a> {
    pub properties: &'a [(&'a str, &'a str)],
    pub system: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// The system properties of a JSON body in UTF-8, the body conditions can read.
pub const JSON_UTF8: [(&str, &str); 2] = [("contentType", "application/json"), ("contentEncoding", "utf-8")];

impl MessageView for Parts<'_> {
    fn property(&self, name: &str) -> Option<&str> {
        self.properties.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }
    fn system_property(&self, name: &str) -> Option<&str> {
        self.system.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }
    fn body(&self) -> &[u8] {
        self.body
    }
}

/// A compiled condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    root: Expr,
}

impl Condition {
    /// Compiles `text`. An empty text is the condition `true`, as a route without `WHERE`.
    ///
    /// # Errors
    /// Syntax errors, unknown functions, wrong argument counts and operand type mismatches, each
    /// with the 1-based column of the offending token.
    pub fn compile(text: &str) -> Result<Condition, ConditionError> {
        if text.len() > MAX_CONDITION_BYTES {
            return Err(ConditionError {
                position: 1,
                message: format!("the condition is longer than {MAX_CONDITION_BYTES} bytes"),
            });
        }
        let tokens = lex(text)?;
        let mut parser = Parser { tokens, at: 0, depth: 0, end: text.chars().count() + 1 };
        if parser.peek().is_none() {
            return Ok(Condition { root: Expr::Lit(Val::Bool(true)) });
        }
        let (root, _) = parser.expr(Level::Coalesce)?;
        if let Some(tok) = parser.peek() {
            let message = match tok.kind {
                Kind::Punct(")") => "unmatched closing ')'".to_string(),
                _ => format!("unexpected `{}`", tok.text),
            };
            return Err(ConditionError { position: tok.pos, message });
        }
        Ok(Condition { root })
    }

    /// Whether the message satisfies the condition: only an exact `true` counts.
    pub fn matches(&self, message: &dyn MessageView) -> bool {
        let mut body = BodyCache::Unparsed;
        matches!(eval(&self.root, message, &mut body), Val::Bool(true))
    }
}

// ---------------------------------------------------------------------------------------------
// Lexing

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Str(String),
    Num(f64),
    True,
    False,
    Null,
    Undefined,
    And,
    Or,
    Not,
    Punct(&'static str),
    SysProp,
    Id,
    /// `SELECT`, `FROM`, `WHERE` or `INTO`: the route statement's words, stray in a condition.
    Keyword(&'static str),
    /// A path with brackets the grammar has no place for, or a character no rule takes.
    Stray,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    text: String,
    /// 1-based character column.
    pos: usize,
}

/// Characters an identifier may not hold (GrammarLexer.g4 `ID_CHARS`).
fn id_char(c: char) -> bool {
    !c.is_whitespace() && !"()<>@,;:\\\"/[]?={}".contains(c)
}

/// Characters a `$` path may not hold (`QUERY_PATH_CHARS`: as identifiers, but brackets allowed).
fn path_char(c: char) -> bool {
    !c.is_whitespace() && !"()<>@,;:\\\"/?={}".contains(c)
}

fn run(chars: &[char], from: usize, ok: impl Fn(char) -> bool) -> usize {
    chars[from..].iter().take_while(|c| ok(**c)).count()
}

fn digits(chars: &[char], from: usize) -> usize {
    run(chars, from, |c| c.is_ascii_digit())
}

/// Length of a quoted string starting at `at` (closing quote included) and whether it closed.
fn string_len(chars: &[char], at: usize) -> (usize, bool) {
    let quote = chars[at];
    let mut i = at + 1;
    while i < chars.len() {
        match chars[i] {
            c if c == quote => return (i + 1 - at, true),
            '\\' => match chars.get(i + 1) {
                Some('"' | '\'' | '\\') => i += 2,
                Some('u' | 'U') if chars.len() > i + 5 && chars[i + 2..i + 6].iter().all(|c| c.is_ascii_hexdigit()) => {
                    i += 6
                }
                // A backslash that escapes nothing ends what a string rule can take.
                _ => return (i - at, false),
            },
            _ => i += 1,
        }
    }
    (i - at, false)
}

fn unescape(inner: &[char]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < inner.len() {
        if inner[i] == '\\' && i + 1 < inner.len() {
            if matches!(inner[i + 1], 'u' | 'U') && i + 5 < inner.len() {
                let hex: String = inner[i + 2..i + 6].iter().collect();
                if let Some(c) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    out.push(c);
                    i += 6;
                    continue;
                }
            }
            out.push(inner[i + 1]);
            i += 2;
        } else {
            out.push(inner[i]);
            i += 1;
        }
    }
    out
}

/// Length of a real literal (`-`? digits* `.` digits+ exp? | `-`? digits* exp) at `at`, or 0.
fn real_len(chars: &[char], at: usize) -> usize {
    let sign = usize::from(chars.get(at) == Some(&'-'));
    let whole = digits(chars, at + sign);
    let mut i = at + sign + whole;
    let exp = |i: usize| -> usize {
        if !matches!(chars.get(i), Some('e' | 'E')) {
            return 0;
        }
        let s = usize::from(matches!(chars.get(i + 1), Some('+' | '-')));
        let d = digits(chars, i + 1 + s);
        if d == 0 { 0 } else { 1 + s + d }
    };
    if chars.get(i) == Some(&'.') {
        let frac = digits(chars, i + 1);
        if frac > 0 {
            i += 1 + frac;
            return i + exp(i) - at;
        }
    }
    let e = exp(i);
    if e > 0 {
        return i + e - at;
    }
    0
}

fn keyword_len(chars: &[char], at: usize, word: &str, case_insensitive: bool) -> usize {
    let n = word.chars().count();
    if chars.len() < at + n {
        return 0;
    }
    let same = chars[at..at + n]
        .iter()
        .zip(word.chars())
        .all(|(a, b)| if case_insensitive { a.eq_ignore_ascii_case(&b) } else { *a == b });
    if same { n } else { 0 }
}

/// A route keyword found by the condition lexer, so that a keyword inside a string or a longer
/// name is not taken for one: the word (upper case), its 1-based column and its byte range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Keyword {
    pub word: &'static str,
    pub position: usize,
    pub bytes: std::ops::Range<usize>,
}

/// The route keywords in `text`, in order (`iot::route` splits a statement on them).
pub(crate) fn keywords(text: &str) -> Result<Vec<Keyword>, ConditionError> {
    let starts: Vec<usize> = text.char_indices().map(|(b, _)| b).chain([text.len()]).collect();
    Ok(lex(text)?
        .into_iter()
        .filter_map(|t| match t.kind {
            Kind::Keyword(word) => {
                let from = starts[t.pos - 1];
                Some(Keyword { word, position: t.pos, bytes: from..from + t.text.len() })
            }
            _ => None,
        })
        .collect())
}

fn lex(text: &str) -> Result<Vec<Token>, ConditionError> {
    const OPERATORS: [&str; 19] =
        ["!=", "<>", "<=", ">=", "||", "??", "(", ")", ",", "+", "-", "*", "/", "%", "=", ">", "<", "{", "}"];
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '/' && chars.get(i + 1) == Some(&'*') {
            // A comment runs to `*/`; an unclosed one is left to the `/` token, as ANTLR does.
            if let Some(end) = (i + 2..chars.len().saturating_sub(1)).find(|&j| chars[j] == '*' && chars[j + 1] == '/')
            {
                i = end + 2;
                continue;
            }
        }
        // Each candidate offers (length, kind): the longest wins, and on a tie the earlier rule,
        // so candidates are offered in the grammar's rule order. A character nothing takes is a
        // stray token of its own (the grammar's last rule, UNKNOWN_CHAR).
        let mut best: Option<(usize, Kind)> = None;
        let offer = |len: usize, kind: Kind, best: &mut Option<(usize, Kind)>| {
            if len > 0 && best.as_ref().is_none_or(|(l, _)| len > *l) {
                *best = Some((len, kind));
            }
        };
        for word in ["SELECT", "FROM", "WHERE", "INTO"] {
            offer(keyword_len(&chars, i, word, true), Kind::Keyword(word), &mut best);
        }
        if c == '"' || c == '\'' {
            let (len, closed) = string_len(&chars, i);
            if closed {
                offer(len, Kind::Str(unescape(&chars[i + 1..i + len - 1])), &mut best);
            } else {
                // An unclosed string runs to the end, so no later rule can take more.
                return Err(ConditionError { position: i + 1, message: "unterminated string".into() });
            }
        }
        let sign = usize::from(c == '-');
        let int = digits(&chars, i + sign);
        if int > 0 {
            let s: String = chars[i..i + sign + int].iter().collect();
            offer(sign + int, Kind::Num(s.parse().unwrap_or(f64::NAN)), &mut best);
        }
        if c == '0' && matches!(chars.get(i + 1), Some('x' | 'X')) {
            let hex = run(&chars, i + 2, |c| c.is_ascii_hexdigit());
            if hex > 0 {
                let s: String = chars[i + 2..i + 2 + hex].iter().collect();
                // Edge reads hex into a 64-bit integer; longer literals do not parse there either.
                let value = i64::from_str_radix(&s, 16).map(|v| v as f64).unwrap_or(f64::NAN);
                offer(2 + hex, Kind::Num(value), &mut best);
            }
        }
        let real = real_len(&chars, i);
        if real > 0 {
            let s: String = chars[i..i + real].iter().collect();
            offer(real, Kind::Num(s.parse().unwrap_or(f64::NAN)), &mut best);
        }
        for (word, kind) in
            [("true", Kind::True), ("false", Kind::False), ("null", Kind::Null), ("undefined", Kind::Undefined)]
        {
            offer(keyword_len(&chars, i, word, false), kind, &mut best);
        }
        for (word, kind) in [("AND", Kind::And), ("OR", Kind::Or), ("NOT", Kind::Not)] {
            offer(keyword_len(&chars, i, word, true), kind, &mut best);
        }
        if let Some(op) = OPERATORS.iter().find(|op| keyword_len(&chars, i, op, false) > 0) {
            offer(op.chars().count(), Kind::Punct(op), &mut best);
        }
        if c == '$' {
            let len = run(&chars, i + 1, path_char);
            if len > 0 {
                offer(1 + len, Kind::SysProp, &mut best);
            }
        }
        offer(run(&chars, i, id_char), Kind::Id, &mut best);
        // QUERY_PATH: a name with brackets, which no parser rule takes.
        offer(run(&chars, i, path_char), Kind::Stray, &mut best);
        let (len, kind) = best.unwrap_or((1, Kind::Stray));
        let text: String = chars[i..i + len].iter().collect();
        out.push(Token { kind, text, pos: i + 1 });
        i += len;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Values and types

/// A value at run time. Body objects and arrays read as `Undefined`, as in Edge.
#[derive(Debug, Clone, PartialEq)]
enum Val<'m> {
    Undefined,
    Null,
    Bool(bool),
    Num(f64),
    Str(Cow<'m, str>),
}

impl Val<'_> {
    /// The order Edge uses when a body value meets a value of another type.
    fn type_rank(&self) -> u8 {
        match self {
            Val::Bool(_) => 1,
            Val::Num(_) => 2,
            Val::Str(_) => 3,
            Val::Null => 4,
            Val::Undefined => 0,
        }
    }
}

/// An operand's static type. `Dynamic` is a body value, typed only at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Bool,
    Num,
    Str,
    Null,
    Undefined,
    Dynamic,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Bool => "boolean",
            Ty::Num => "number",
            Ty::Str => "string",
            Ty::Null => "null",
            Ty::Undefined => "undefined",
            Ty::Dynamic => "body value",
        }
    }

    /// Whether a value of type `self` may stand where `want` is expected: the same type, or a
    /// body value against any primitive type.
    fn fits(self, want: Ty) -> bool {
        let primitive = |t: Ty| matches!(t, Ty::Bool | Ty::Num | Ty::Str | Ty::Null);
        self == want || (self == Ty::Dynamic && primitive(want)) || (want == Ty::Dynamic && primitive(self))
    }
}

// ---------------------------------------------------------------------------------------------
// The tree

#[derive(Debug, Clone, Copy, PartialEq)]
enum BinOp {
    Mul,
    Div,
    Mod,
    Add,
    Sub,
    Concat,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
    Coalesce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Coalesce,
    Or,
    And,
    Equality,
    Compare,
    Additive,
    Multiplicative,
}

impl Level {
    fn tighter(self) -> Option<Level> {
        Some(match self {
            Level::Coalesce => Level::Or,
            Level::Or => Level::And,
            Level::And => Level::Equality,
            Level::Equality => Level::Compare,
            Level::Compare => Level::Additive,
            Level::Additive => Level::Multiplicative,
            Level::Multiplicative => return None,
        })
    }

    fn op(self, tok: &Token) -> Option<BinOp> {
        Some(match (self, &tok.kind) {
            (Level::Coalesce, Kind::Punct("??")) => BinOp::Coalesce,
            (Level::Or, Kind::Or) => BinOp::Or,
            (Level::And, Kind::And) => BinOp::And,
            (Level::Equality, Kind::Punct("=")) => BinOp::Eq,
            (Level::Equality, Kind::Punct("!=" | "<>")) => BinOp::Ne,
            (Level::Compare, Kind::Punct("<")) => BinOp::Lt,
            (Level::Compare, Kind::Punct("<=")) => BinOp::Le,
            (Level::Compare, Kind::Punct(">")) => BinOp::Gt,
            (Level::Compare, Kind::Punct(">=")) => BinOp::Ge,
            (Level::Additive, Kind::Punct("+")) => BinOp::Add,
            (Level::Additive, Kind::Punct("-")) => BinOp::Sub,
            (Level::Additive, Kind::Punct("||")) => BinOp::Concat,
            (Level::Multiplicative, Kind::Punct("*")) => BinOp::Mul,
            (Level::Multiplicative, Kind::Punct("/")) => BinOp::Div,
            (Level::Multiplicative, Kind::Punct("%")) => BinOp::Mod,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Builtin {
    Abs,
    Exp,
    Power,
    Square,
    Ceiling,
    Floor,
    Sign,
    Sqrt,
    AsNumber,
    IsBool,
    IsDefined,
    IsNull,
    IsNumber,
    IsString,
    Concat,
    Length,
    Lower,
    Upper,
    Substring,
    IndexOf,
    StartsWith,
    EndsWith,
    Contains,
}

impl Builtin {
    fn by_name(name: &str) -> Option<Builtin> {
        use Builtin::*;
        const ALL: [(&str, Builtin); 23] = [
            ("abs", Abs),
            ("exp", Exp),
            ("power", Power),
            ("square", Square),
            ("ceiling", Ceiling),
            ("floor", Floor),
            ("sign", Sign),
            ("sqrt", Sqrt),
            ("as_number", AsNumber),
            ("is_bool", IsBool),
            ("is_defined", IsDefined),
            ("is_null", IsNull),
            ("is_number", IsNumber),
            ("is_string", IsString),
            ("concat", Concat),
            ("length", Length),
            ("lower", Lower),
            ("upper", Upper),
            ("substring", Substring),
            ("index_of", IndexOf),
            ("starts_with", StartsWith),
            ("ends_with", EndsWith),
            ("contains", Contains),
        ];
        ALL.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, b)| *b)
    }

    /// The argument types each accepted form takes, and the result type. `None` in the list
    /// means any type; `Concat` takes two or more strings.
    fn signature(self, given: &[Ty]) -> Result<Ty, String> {
        use Builtin::*;
        let forms: &[&[Option<Ty>]] = match self {
            Abs | Exp | Square | Ceiling | Floor | Sign | Sqrt => &[&[Some(Ty::Num)]],
            Power => &[&[Some(Ty::Num), Some(Ty::Num)]],
            AsNumber => &[&[Some(Ty::Str)], &[Some(Ty::Num)]],
            IsBool | IsDefined | IsNull | IsNumber | IsString => &[&[None]],
            Length | Lower | Upper => &[&[Some(Ty::Str)]],
            Substring => &[&[Some(Ty::Str), Some(Ty::Num)], &[Some(Ty::Str), Some(Ty::Num), Some(Ty::Num)]],
            IndexOf | StartsWith | EndsWith | Contains => &[&[Some(Ty::Str), Some(Ty::Str)]],
            Concat => {
                if given.len() >= 2 && given.iter().all(|t| t.fits(Ty::Str)) {
                    return Ok(Ty::Str);
                }
                return Err("takes two or more strings".into());
            }
        };
        let fits = |form: &&[Option<Ty>]| {
            form.len() == given.len() && form.iter().zip(given).all(|(want, got)| want.is_none_or(|w| got.fits(w)))
        };
        if !forms.iter().any(fits) {
            let shapes: Vec<String> = forms
                .iter()
                .map(|f| f.iter().map(|t| t.map_or("any", Ty::name)).collect::<Vec<_>>().join(", "))
                .collect();
            return Err(format!("takes ({})", shapes.join(") or (")));
        }
        Ok(match self {
            Abs | Exp | Power | Square | Ceiling | Floor | Sign | Sqrt | AsNumber | Length | IndexOf => Ty::Num,
            IsBool | IsDefined | IsNull | IsNumber | IsString | StartsWith | EndsWith | Contains => Ty::Bool,
            Lower | Upper | Substring | Concat => Ty::Str,
        })
    }
}

/// One step of a `$body` path.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Lit(Val<'static>),
    Property(String),
    /// `$name`: an application property spelled `$name` if there is one, else the system property.
    SysProp {
        spelled: String,
        name: String,
    },
    /// `$body.path`; `app_first` unless it was written `{$body.path}`.
    Body {
        spelled: String,
        path: Vec<Step>,
        app_first: bool,
    },
    Neg(Box<Expr>),
    Not(Box<Expr>),
    /// `first op1 e1 op2 e2 ...`, all of one precedence level, left to right.
    Chain(Box<Expr>, Vec<(BinOp, Expr)>),
    Call(Builtin, Vec<Expr>),
}

// ---------------------------------------------------------------------------------------------
// Parsing and the type check

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    depth: usize,
    /// Column just past the text, for errors at its end.
    end: usize,
}

fn err<T>(position: usize, message: impl Into<String>) -> Result<T, ConditionError> {
    Err(ConditionError { position, message: message.into() })
}

/// Parses a `$body.` path: `.name` steps, `[n]` and `['name']` steps.
fn body_path(text: &str, position: usize) -> Result<Vec<Step>, ConditionError> {
    let chars: Vec<char> = text.chars().collect();
    let mut steps = Vec::new();
    let mut i = 0;
    let bad = |why: &str| err(position, format!("Error in $body query `{text}`: {why}"));
    while i < chars.len() {
        match chars[i] {
            '.' if i > 0 => i += 1,
            '[' => {
                let close = match chars[i..].iter().position(|c| *c == ']') {
                    Some(p) => i + p,
                    None => return bad("a `[` is not closed"),
                };
                let inner: String = chars[i + 1..close].iter().collect();
                let inner = inner.trim();
                if let Ok(n) = inner.parse::<usize>() {
                    steps.push(Step::Index(n));
                } else if inner.len() >= 2 && (inner.starts_with('\'') && inner.ends_with('\'')) {
                    steps.push(Step::Key(inner[1..inner.len() - 1].to_string()));
                } else {
                    return bad("a bracket holds an index or a quoted name");
                }
                i = close + 1;
                continue;
            }
            _ => {}
        }
        let start = i;
        while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
            i += 1;
        }
        if i == start {
            return bad("an empty name");
        }
        steps.push(Step::Key(chars[start..i].iter().collect()));
    }
    if steps.is_empty() {
        return bad("the path is empty");
    }
    Ok(steps)
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn here(&self) -> usize {
        self.peek().map_or(self.end, |t| t.pos)
    }

    fn deeper(&mut self) -> Result<(), ConditionError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return err(self.here(), format!("the condition nests deeper than {MAX_DEPTH} levels"));
        }
        Ok(())
    }

    fn expect(&mut self, punct: &'static str, why: &str) -> Result<(), ConditionError> {
        match self.peek() {
            Some(t) if t.kind == Kind::Punct(punct) => {
                self.at += 1;
                Ok(())
            }
            _ => err(self.here(), why.to_string()),
        }
    }

    fn expr(&mut self, level: Level) -> Result<(Expr, Ty), ConditionError> {
        let (first, mut ty) = match level.tighter() {
            Some(next) => self.expr(next)?,
            None => self.unary()?,
        };
        let mut rest = Vec::new();
        while let Some(tok) = self.peek() {
            let Some(op) = level.op(tok) else { break };
            let tok = tok.clone();
            self.at += 1;
            let (right, rty) = match level.tighter() {
                Some(next) => self.expr(next)?,
                None => self.unary()?,
            };
            ty = check_binary(op, ty, rty, &tok)?;
            rest.push((op, right));
        }
        if rest.is_empty() { Ok((first, ty)) } else { Ok((Expr::Chain(Box::new(first), rest), ty)) }
    }

    fn unary(&mut self) -> Result<(Expr, Ty), ConditionError> {
        let Some(tok) = self.peek().cloned() else {
            return err(self.end, "the condition ends where a value was expected");
        };
        match tok.kind {
            Kind::Punct("-") | Kind::Not => {
                self.at += 1;
                self.deeper()?;
                let (inner, ty) = self.unary()?;
                self.depth -= 1;
                if tok.kind == Kind::Not {
                    if !(ty.fits(Ty::Bool) || ty == Ty::Null) {
                        return err(tok.pos, format!("NOT takes a boolean, not a {}", ty.name()));
                    }
                    Ok((Expr::Not(Box::new(inner)), Ty::Bool))
                } else {
                    if !ty.fits(Ty::Num) {
                        return err(tok.pos, format!("`-` takes a number, not a {}", ty.name()));
                    }
                    Ok((Expr::Neg(Box::new(inner)), Ty::Num))
                }
            }
            _ => self.primary(),
        }
    }

    fn primary(&mut self) -> Result<(Expr, Ty), ConditionError> {
        let Some(tok) = self.next() else {
            return err(self.end, "the condition ends where a value was expected");
        };
        let lit = |v: Val<'static>, t: Ty| Ok((Expr::Lit(v), t));
        match tok.kind {
            Kind::Str(s) => lit(Val::Str(Cow::Owned(s)), Ty::Str),
            Kind::Num(n) if n.is_nan() => lit(Val::Undefined, Ty::Num),
            Kind::Num(n) => lit(Val::Num(n), Ty::Num),
            Kind::True => lit(Val::Bool(true), Ty::Bool),
            Kind::False => lit(Val::Bool(false), Ty::Bool),
            Kind::Null => lit(Val::Null, Ty::Null),
            Kind::Undefined => lit(Val::Undefined, Ty::Undefined),
            Kind::Punct("(") => {
                self.deeper()?;
                let inner = self.expr(Level::Coalesce)?;
                self.expect(")", "missing closing ')'")?;
                self.depth -= 1;
                Ok(inner)
            }
            Kind::Punct("{") => {
                let Some(Token { kind: Kind::SysProp, text, pos }) = self.next() else {
                    return err(tok.pos, "`{` must enclose a system property such as {$body.field}");
                };
                self.expect("}", "missing closing '}'")?;
                match text.get(..6) {
                    Some(p) if p.eq_ignore_ascii_case("$body.") => {
                        let path = body_path(&text[6..], pos)?;
                        Ok((Expr::Body { spelled: text, path, app_first: false }, Ty::Dynamic))
                    }
                    _ => Ok((Expr::SysProp { name: text[1..].to_string(), spelled: text }, Ty::Str)),
                }
            }
            Kind::SysProp => match tok.text.get(..6) {
                Some(p) if p.eq_ignore_ascii_case("$body.") => {
                    let path = body_path(&tok.text[6..], tok.pos)?;
                    Ok((Expr::Body { spelled: tok.text, path, app_first: true }, Ty::Dynamic))
                }
                // A system property name cannot hold brackets: it reads as undefined, as in Edge.
                _ if tok.text.contains(['[', ']']) => lit(Val::Undefined, Ty::Str),
                _ => Ok((Expr::SysProp { name: tok.text[1..].to_string(), spelled: tok.text }, Ty::Str)),
            },
            Kind::Id if self.peek().is_some_and(|t| t.kind == Kind::Punct("(")) => self.call(tok),
            Kind::Id => Ok((Expr::Property(tok.text), Ty::Str)),
            Kind::Punct(")") => err(tok.pos, "unmatched closing ')'"),
            _ => err(tok.pos, format!("unexpected `{}`", tok.text)),
        }
    }

    fn call(&mut self, name: Token) -> Result<(Expr, Ty), ConditionError> {
        let Some(builtin) = Builtin::by_name(&name.text) else {
            return err(name.pos, format!("`{}` is not a function of the routing query language", name.text));
        };
        self.at += 1; // the `(`
        self.deeper()?;
        let mut args = Vec::new();
        let mut types = Vec::new();
        if !self.peek().is_some_and(|t| t.kind == Kind::Punct(")")) {
            loop {
                let (arg, ty) = self.expr(Level::Coalesce)?;
                args.push(arg);
                types.push(ty);
                if self.peek().is_some_and(|t| t.kind == Kind::Punct(",")) {
                    self.at += 1;
                } else {
                    break;
                }
            }
        }
        self.expect(")", "missing closing ')'")?;
        self.depth -= 1;
        let ty = builtin
            .signature(&types)
            .map_err(|why| ConditionError { position: name.pos, message: format!("{} {why}", name.text) })?;
        Ok((Expr::Call(builtin, args), ty))
    }
}

fn check_binary(op: BinOp, left: Ty, right: Ty, tok: &Token) -> Result<Ty, ConditionError> {
    let mismatch =
        |want: &str| err(tok.pos, format!("`{}` takes {want}, not a {} and a {}", tok.text, left.name(), right.name()));
    match op {
        BinOp::Mul | BinOp::Div | BinOp::Mod | BinOp::Add | BinOp::Sub => {
            if left.fits(Ty::Num) && right.fits(Ty::Num) {
                Ok(Ty::Num)
            } else {
                mismatch("two numbers")
            }
        }
        BinOp::Concat => {
            if left.fits(Ty::Str) && right.fits(Ty::Str) {
                Ok(Ty::Str)
            } else {
                mismatch("two strings")
            }
        }
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne => {
            // Both operands must have the left operand's type (a body value fits any primitive).
            if right.fits(left) { Ok(Ty::Bool) } else { mismatch("operands of one type") }
        }
        BinOp::And | BinOp::Or => {
            let ok = |t: Ty| matches!(t, Ty::Bool | Ty::Null | Ty::Undefined | Ty::Dynamic);
            if ok(left) && ok(right) { Ok(Ty::Bool) } else { mismatch("booleans") }
        }
        BinOp::Coalesce => {
            if left == right || left.fits(right) || left == Ty::Undefined {
                Ok(if left == Ty::Undefined { right } else { left })
            } else {
                mismatch("operands of one type")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation

enum BodyCache {
    Unparsed,
    Json(serde_json::Value),
    NotJson,
}

/// The body as JSON when the message says it is JSON in an encoding Edge reads.
fn body_json<'c>(message: &dyn MessageView, cache: &'c mut BodyCache) -> Option<&'c serde_json::Value> {
    if let BodyCache::Unparsed = cache {
        *cache = parse_body(message).map_or(BodyCache::NotJson, BodyCache::Json);
    }
    match cache {
        BodyCache::Json(v) => Some(v),
        _ => None,
    }
}

fn parse_body(message: &dyn MessageView) -> Option<serde_json::Value> {
    let ct = message.system_property("contentType")?;
    if !ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json") {
        return None;
    }
    let enc = message.system_property("contentEncoding")?;
    let body = message.body();
    let text: String = if enc.eq_ignore_ascii_case("utf-8") {
        std::str::from_utf8(body).ok()?.to_string()
    } else if enc.eq_ignore_ascii_case("utf-16") {
        // .NET's Encoding.Unicode: UTF-16 little endian.
        if !body.len().is_multiple_of(2) {
            return None;
        }
        let units: Vec<u16> = body.chunks_exact(2).map(|p| u16::from_le_bytes([p[0], p[1]])).collect();
        String::from_utf16(&units).ok()?
    } else if enc.eq_ignore_ascii_case("utf-32") {
        if !body.len().is_multiple_of(4) {
            return None;
        }
        body.chunks_exact(4)
            .map(|p| char::from_u32(u32::from_le_bytes([p[0], p[1], p[2], p[3]])))
            .collect::<Option<String>>()?
    } else {
        return None;
    };
    serde_json::from_str(text.trim_start_matches('\u{feff}')).ok()
}

fn json_val(v: &serde_json::Value) -> Val<'static> {
    match v {
        serde_json::Value::Null => Val::Null,
        serde_json::Value::Bool(b) => Val::Bool(*b),
        serde_json::Value::Number(n) => n.as_f64().map_or(Val::Undefined, Val::Num),
        serde_json::Value::String(s) => Val::Str(Cow::Owned(s.clone())),
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => Val::Undefined,
    }
}

fn utf16_len(s: &str) -> usize {
    s.encode_utf16().count()
}

fn eval<'m>(expr: &'m Expr, m: &'m dyn MessageView, body: &mut BodyCache) -> Val<'m> {
    match expr {
        Expr::Lit(v) => v.clone(),
        Expr::Property(name) => m.property(name).map_or(Val::Undefined, |s| Val::Str(Cow::Borrowed(s))),
        Expr::SysProp { spelled, name } => match m.property(spelled) {
            Some(s) => Val::Str(Cow::Borrowed(s)),
            None => m.system_property(name).map_or(Val::Undefined, |s| Val::Str(Cow::Borrowed(s))),
        },
        Expr::Body { spelled, path, app_first } => {
            if *app_first && let Some(s) = m.property(spelled) {
                return Val::Str(Cow::Borrowed(s));
            }
            let Some(mut at) = body_json(m, body) else { return Val::Undefined };
            for step in path {
                let next = match step {
                    Step::Key(k) => at.get(k),
                    Step::Index(i) => at.get(*i),
                };
                match next {
                    Some(v) => at = v,
                    None => return Val::Undefined,
                }
            }
            json_val(at)
        }
        Expr::Neg(inner) => match eval(inner, m, body) {
            Val::Num(n) => Val::Num(-n),
            _ => Val::Undefined,
        },
        Expr::Not(inner) => match eval(inner, m, body) {
            Val::Bool(b) => Val::Bool(!b),
            _ => Val::Undefined,
        },
        Expr::Chain(first, rest) => {
            let mut acc = eval(first, m, body);
            for (op, right) in rest {
                // Short cuts keep three-valued logic: false AND x is false, true OR x is true.
                match (op, &acc) {
                    (BinOp::And, Val::Bool(false)) | (BinOp::Or, Val::Bool(true)) => continue,
                    (BinOp::Coalesce, v) if *v != Val::Undefined => continue,
                    _ => {}
                }
                let r = eval(right, m, body);
                acc = binary(*op, acc, r);
            }
            acc
        }
        Expr::Call(f, args) => {
            let vals: Vec<Val> = args.iter().map(|a| eval(a, m, body)).collect();
            call(*f, vals)
        }
    }
}

fn binary<'m>(op: BinOp, l: Val<'m>, r: Val<'m>) -> Val<'m> {
    match op {
        BinOp::Mul | BinOp::Div | BinOp::Mod | BinOp::Add | BinOp::Sub => match (l, r) {
            (Val::Num(a), Val::Num(b)) => Val::Num(match op {
                BinOp::Mul => a * b,
                BinOp::Div => a / b,
                BinOp::Mod => a % b,
                BinOp::Add => a + b,
                _ => a - b,
            }),
            _ => Val::Undefined,
        },
        BinOp::Concat => match (l, r) {
            (Val::Str(a), Val::Str(b)) => Val::Str(Cow::Owned(format!("{a}{b}"))),
            _ => Val::Undefined,
        },
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne => {
            let Some(ord) = compare(&l, &r) else { return Val::Undefined };
            Val::Bool(match op {
                BinOp::Lt => ord == Ordering::Less,
                BinOp::Le => ord != Ordering::Greater,
                BinOp::Gt => ord == Ordering::Greater,
                BinOp::Ge => ord != Ordering::Less,
                BinOp::Eq => ord == Ordering::Equal,
                _ => ord != Ordering::Equal,
            })
        }
        BinOp::And => match (l, r) {
            (Val::Bool(false), _) | (_, Val::Bool(false)) => Val::Bool(false),
            (Val::Bool(true), Val::Bool(true)) => Val::Bool(true),
            _ => Val::Undefined,
        },
        BinOp::Or => match (l, r) {
            (Val::Bool(true), _) | (_, Val::Bool(true)) => Val::Bool(true),
            (Val::Bool(false), Val::Bool(false)) => Val::Bool(false),
            _ => Val::Undefined,
        },
        BinOp::Coalesce => match l {
            Val::Undefined => r,
            v => v,
        },
    }
}

/// Edge's comparison: undefined on either side gives no answer; values of different types (only
/// possible with body values) order by type: boolean, number, string, null.
fn compare(l: &Val, r: &Val) -> Option<Ordering> {
    match (l, r) {
        (Val::Undefined, _) | (_, Val::Undefined) => None,
        (Val::Num(a), Val::Num(b)) => a.partial_cmp(b),
        (Val::Str(a), Val::Str(b)) => Some(a.as_ref().cmp(b.as_ref())),
        (Val::Bool(a), Val::Bool(b)) => Some(a.cmp(b)),
        (Val::Null, Val::Null) => Some(Ordering::Equal),
        _ => Some(l.type_rank().cmp(&r.type_rank())),
    }
}

fn call<'m>(f: Builtin, mut args: Vec<Val<'m>>) -> Val<'m> {
    use Builtin::*;
    let num = |v: &Val| match v {
        Val::Num(n) => Some(*n),
        _ => None,
    };
    let num1 = |args: &[Val], g: fn(f64) -> f64| num(&args[0]).map_or(Val::Undefined, |n| Val::Num(g(n)));
    let strs = |args: &[Val]| -> Option<Vec<String>> {
        args.iter()
            .map(|a| match a {
                Val::Str(s) => Some(s.to_string()),
                _ => None,
            })
            .collect()
    };
    match f {
        Abs => num1(&args, f64::abs),
        Exp => num1(&args, f64::exp),
        Square => num1(&args, |n| n * n),
        Ceiling => num1(&args, f64::ceil),
        Floor => num1(&args, f64::floor),
        Sqrt => num1(&args, f64::sqrt),
        Sign => num1(&args, |n| if n == 0.0 { 0.0 } else { n.signum() }),
        Power => match (num(&args[0]), num(&args[1])) {
            (Some(a), Some(b)) => Val::Num(a.powf(b)),
            _ => Val::Undefined,
        },
        AsNumber => match &args[0] {
            Val::Num(n) => Val::Num(*n),
            Val::Str(s) => s.trim().parse::<f64>().map_or(Val::Undefined, Val::Num),
            _ => Val::Undefined,
        },
        IsDefined => Val::Bool(args[0] != Val::Undefined),
        IsBool => Val::Bool(matches!(args[0], Val::Bool(_))),
        IsNull => Val::Bool(args[0] == Val::Null),
        IsNumber => Val::Bool(matches!(args[0], Val::Num(_))),
        IsString => Val::Bool(matches!(args[0], Val::Str(_))),
        Concat => strs(&args).map_or(Val::Undefined, |s| Val::Str(Cow::Owned(s.concat()))),
        Length => match &args[0] {
            Val::Str(s) => Val::Num(utf16_len(s) as f64),
            _ => Val::Undefined,
        },
        Lower | Upper => match args.swap_remove(0) {
            Val::Str(s) if f == Lower => Val::Str(Cow::Owned(s.to_lowercase())),
            Val::Str(s) => Val::Str(Cow::Owned(s.to_uppercase())),
            _ => Val::Undefined,
        },
        Substring => {
            let Val::Str(s) = &args[0] else { return Val::Undefined };
            let units: Vec<u16> = s.encode_utf16().collect();
            let Some(start) = num(&args[1]).filter(|n| n.fract() == 0.0 && *n >= 0.0 && *n <= units.len() as f64)
            else {
                return Val::Undefined;
            };
            let start = start as usize;
            let end = match args.get(2) {
                None => units.len(),
                Some(l) => {
                    match num(l).filter(|n| n.fract() == 0.0 && *n >= 0.0 && start as f64 + *n <= units.len() as f64) {
                        Some(len) => start + len as usize,
                        None => return Val::Undefined,
                    }
                }
            };
            String::from_utf16(&units[start..end]).map_or(Val::Undefined, |s| Val::Str(Cow::Owned(s)))
        }
        IndexOf | StartsWith | EndsWith | Contains => {
            let Some(s) = strs(&args) else { return Val::Undefined };
            let (hay, needle) = (&s[0], &s[1]);
            match f {
                IndexOf => Val::Num(hay.find(needle.as_str()).map_or(-1.0, |b| utf16_len(&hay[..b]) as f64)),
                StartsWith => Val::Bool(hay.starts_with(needle.as_str())),
                EndsWith => Val::Bool(hay.ends_with(needle.as_str())),
                _ => Val::Bool(hay.contains(needle.as_str())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Msg {
        props: HashMap<String, String>,
        sys: HashMap<String, String>,
        body: Vec<u8>,
    }

    impl MessageView for Msg {
        fn property(&self, name: &str) -> Option<&str> {
            self.props.get(name).map(String::as_str)
        }
        fn system_property(&self, name: &str) -> Option<&str> {
            self.sys.get(name).map(String::as_str)
        }
        fn body(&self) -> &[u8] {
            &self.body
        }
    }

    fn json_msg(body: &str, props: &[(&str, &str)]) -> Msg {
        Msg {
            props: props.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            sys: [
                ("contentType", "application/json"),
                ("contentEncoding", "utf-8"),
                ("connectionDeviceId", "edge1"),
                ("connectionModuleId", "tempSensor"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn holds(cond: &str, m: &Msg) -> bool {
        Condition::compile(cond).unwrap_or_else(|e| panic!("{cond}: {e}")).matches(m)
    }

    fn refused(cond: &str) -> ConditionError {
        match Condition::compile(cond) {
            Ok(c) => panic!("`{cond}` compiled to {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn the_filter_tutorial_and_the_docs_examples() {
        let hot = json_msg(
            r#"{"machine":{"temperature":31.5,"pressure":2},"ambient":{"temperature":21}}"#,
            &[("MessageType", "Alert")],
        );
        let cold = json_msg(r#"{"machine":{"temperature":20.1}}"#, &[]);
        assert!(holds("$body.machine.temperature > 25", &hot));
        assert!(!holds("$body.machine.temperature > 25", &cold));
        assert!(holds("MessageType = 'Alert'", &hot));
        assert!(!holds("MessageType = 'Alert'", &cold), "a missing property is undefined, not a match");
        assert!(holds("$connectionModuleId = 'tempSensor' AND $body.machine.pressure >= 2", &hot));
        assert!(holds("$body.machine.temperature - $body.ambient.temperature > 10", &hot));
        assert!(holds("NOT is_defined($body.machine.humidity)", &hot));
        assert!(holds("{$body.machine.temperature} > 30", &hot));
        assert!(holds("", &cold), "no condition routes everything");
        assert!(holds("true", &cold));
        assert!(!holds("false OR undefined", &cold));
    }

    #[test]
    fn three_valued_logic() {
        let m = json_msg(r#"{"a":1}"#, &[]);
        assert!(!holds("$body.missing = 1", &m));
        assert!(!holds("NOT ($body.missing = 1)", &m), "NOT undefined is undefined");
        assert!(holds("$body.missing = 1 OR $body.a = 1", &m));
        assert!(!holds("$body.missing = 1 AND $body.a = 1", &m));
        assert!(holds("($body.missing ?? 7) = 7", &m));
        assert!(holds("($body.a ?? 7) = 1", &m));
        assert!(holds("is_defined($body.a) AND NOT is_defined($body.b)", &m));
    }

    #[test]
    fn body_needs_json_content_type_and_a_known_encoding() {
        let mut m = json_msg(r#"{"t":40}"#, &[]);
        assert!(holds("$body.t > 30", &m));
        m.sys.insert("contentType".into(), "text/plain".into());
        assert!(!holds("$body.t > 30", &m));
        m.sys.insert("contentType".into(), "application/JSON".into());
        m.sys.insert("contentEncoding".into(), "latin1".into());
        assert!(!holds("$body.t > 30", &m));
        m.sys.insert("contentEncoding".into(), "utf-16".into());
        m.body = r#"{"t":40}"#.encode_utf16().flat_map(u16::to_le_bytes).collect();
        assert!(holds("$body.t > 30", &m));
        m.sys.remove("contentEncoding");
        assert!(!holds("$body.t > 30", &m), "Edge needs the encoding to read the body");
    }

    #[test]
    fn body_paths_arrays_objects_and_mixed_types() {
        let m = json_msg(r#"{"r":[{"v":3},{"v":"x"}],"o":{"k":1},"n":null,"s":"10"}"#, &[]);
        assert!(holds("$body.r[0].v = 3", &m));
        assert!(holds("$body.r[1].v = 'x'", &m));
        assert!(holds("$body.o['k'] = 1", &m));
        assert!(!holds("is_defined($body.o)", &m), "objects read as undefined");
        assert!(holds("is_null($body.n)", &m));
        assert!(holds("$body.n = null", &m));
        // Body values of different types order by type: boolean < number < string < null.
        assert!(holds("$body.s > 5", &m));
        assert!(holds("as_number($body.s) = 10", &m));
    }

    #[test]
    fn system_properties_and_application_property_precedence() {
        let m = json_msg("{}", &[("$contentType", "shadow"), ("$body.x", "app")]);
        assert!(holds("$contentType = 'shadow'", &m), "an application property spelled $name wins");
        assert!(holds("$connectionDeviceId = 'edge1'", &m));
        assert!(holds("$body.x = 'app'", &m));
        assert!(!holds("{$body.x} = 'app'", &m), "the escaped form always reads the body");
        assert!(!holds("$nosuch = 'x'", &m));
    }

    #[test]
    fn functions() {
        let m = json_msg(r#"{"name":"Ünïcode sensor","v":-2.5}"#, &[("site", "North-1")]);
        for cond in [
            "abs($body.v) = 2.5",
            "floor($body.v) = -3",
            "ceiling($body.v) = -2",
            "sign($body.v) = -1",
            "power(2, 10) = 1024",
            "sqrt(16) = 4",
            "square(3) = 9",
            "lower(site) = 'north-1'",
            "upper(site) = 'NORTH-1'",
            "length($body.name) = 14",
            "substring(site, 6) = '1'",
            "substring(site, 0, 5) = 'North'",
            "index_of(site, '-') = 5",
            "index_of(site, 'zz') = -1",
            "starts_with(site, 'Nor')",
            "ends_with(site, '-1')",
            "contains($body.name, 'sensor')",
            "concat(site, '/', 'x') = 'North-1/x'",
            "site || '!' = 'North-1!'",
            "is_string(site) AND is_number($body.v) AND NOT is_bool($body.v)",
            "as_number('42') = 42",
            "10 % 4 = 2",
            "0x1F = 31",
            "1.5e1 = 15",
            "-(2) * 3 = -6",
            "ABS(-1) = 1",
        ] {
            assert!(holds(cond, &m), "{cond}");
        }
        assert!(!holds("substring(site, 99) = ''", &m), "out of range is undefined");
    }

    #[test]
    fn precedence_and_lexing_follow_edge() {
        let m = json_msg(r#"{"a":2,"b":3}"#, &[("a-1", "yes")]);
        assert!(holds("$body.a + $body.b * 2 = 8", &m));
        assert!(holds("($body.a + $body.b) * 2 = 10", &m));
        assert!(holds("true OR false AND false", &m), "AND binds tighter than OR");
        assert!(holds("a-1 = 'yes'", &m), "`-` is part of a name");
        assert!(holds("$body.a = 2 and $body.b = 3", &m), "keywords ignore case");
        assert!(holds("/* a comment */ $body.a = 2", &m));
        assert!(holds("'it\\'s' = \"it's\"", &m));
        assert!(holds("'\\u0041' = 'A'", &m));
    }

    #[test]
    fn refused_with_the_position() {
        for (cond, pos, needle) in [
            ("'a' = 1", 5, "one type"),
            ("$body.t > 'x' AND site > 1", 24, "one type"),
            ("- 'x' = 1", 1, "number"),
            ("NOT 'x'", 1, "boolean"),
            ("nosuch(1)", 1, "not a function"),
            ("abs('x') = 1", 1, "abs takes"),
            ("substring('x') = 'x'", 1, "substring takes"),
            ("(a = 'b'", 9, "missing closing"),
            ("a = 'b')", 8, "unmatched"),
            ("a = 'b", 5, "unterminated"),
            ("a = ", 5, "ends where a value"),
            ("a = 'b' 'c'", 9, "unexpected"),
            ("$body. = 1", 1, "$body"),
            ("a[0] = 'x'", 1, "unexpected"),
            ("5 -1 = 4", 3, "unexpected"),
            ("5-1 = 4", 5, "one type"),
            ("a = 'x' AND 1", 9, "booleans"),
            ("a ?? 1", 3, "one type"),
            ("@", 1, "unexpected"),
        ] {
            let e = refused(cond);
            assert_eq!(e.position, pos, "{cond}: {e}");
            assert!(e.message.contains(needle), "{cond}: {e}");
        }
    }

    #[test]
    fn nesting_is_bounded_and_long_chains_are_flat() {
        let deep = format!("{}true{}", "(".repeat(5_000), ")".repeat(5_000));
        let e = refused(&deep);
        assert!(e.message.contains("nests deeper"), "{e}");
        let nots = format!("{}true", "NOT ".repeat(3_000));
        assert!(refused(&nots).message.contains("nests deeper"));
        let calls = format!("{}1{}", "abs(".repeat(3_000), ")".repeat(3_000));
        assert!(refused(&calls).message.contains("nests deeper"));
        let ok = format!("{}true{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(holds(&ok, &json_msg("{}", &[])));
        // 3,000 terms in one chain evaluate without recursion.
        let chain = vec!["1"; 3_000].join(" + ");
        assert!(holds(&format!("{chain} = 3000"), &json_msg("{}", &[])));
        let long = "a".repeat(MAX_CONDITION_BYTES + 1);
        assert!(refused(&long).message.contains("longer than"));
    }
}
