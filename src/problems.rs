//! The one shape of a configuration problem, for every validation: the daemon config, scenario
//! files, the emulator's hub TOML, a SIGHUP reload, `fleetsim check`, and the checks `run` makes
//! before anything starts. A problem names where (file, line, column), what (the field path) and
//! why (the message); `Problems` is all of a load's problems at once, printed one per line. Any
//! problem means exit 64 (EX_USAGE), decided by the type, never by matching text.

use std::fmt;
use std::path::Path;

/// One problem, located as far as its source allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file it is in; empty when it came from command-line flags or from values that were
    /// not read from a file (then there is no position to give either).
    pub file: String,
    /// 1-based; 0 when there is no file.
    pub line: usize,
    /// 1-based, in characters; 0 when there is no file.
    pub column: usize,
    /// Dotted path of the offending field, e.g. `devices[0].telemetry.interval`; empty for a
    /// problem with a whole file (unreadable, not TOML).
    pub field: String,
    /// What is wrong, in words. A message may begin with its own field (the emulator's do:
    /// "behaviour.max_subscriptions must be from 1 to 1000"); then the field is not printed twice.
    pub message: String,
}

impl Problem {
    /// A problem at a known position of a file.
    pub fn at(
        file: impl Into<String>,
        (line, column): (usize, usize),
        field: &str,
        message: impl Into<String>,
    ) -> Problem {
        Problem { file: file.into(), line, column, field: field.to_owned(), message: message.into() }
    }

    /// A problem with a field whose file is not known (yet): flags, or values not read from a
    /// file. `validate` locates it in the file when there is one.
    pub fn field(field: &str, message: impl Into<String>) -> Problem {
        Problem::at("", (0, 0), field, message)
    }

    /// A problem with a whole file (it cannot be read, listed ...), placed at its start.
    pub fn file(path: &Path, message: impl Into<String>) -> Problem {
        Problem::at(path.display().to_string(), (1, 1), "", message)
    }

    /// Whether the message already begins with the field's name.
    fn names_its_field(&self) -> bool {
        self.message.strip_prefix(&self.field).is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', ':']))
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.file.is_empty() {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        }
        if self.field.is_empty() || self.names_its_field() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Every problem of a load, printed one per line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

impl From<Problem> for Problems {
    fn from(p: Problem) -> Problems {
        Problems(vec![p])
    }
}

impl Problems {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn push(&mut self, p: Problem) {
        self.0.push(p);
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Problem> {
        self.0.iter()
    }

    /// `Ok(value)` when there is no problem, else every problem.
    pub fn or_ok<T>(self, value: T) -> Result<T, Problems> {
        if self.is_empty() { Ok(value) } else { Err(self) }
    }

    /// Orders problems by file (in the order files were first named), then line and column, so
    /// a reader can walk a file top to bottom; drops exact repeats.
    pub fn sorted(mut self) -> Problems {
        let mut files: Vec<String> = Vec::new();
        for p in &self.0 {
            if !files.contains(&p.file) {
                files.push(p.file.clone());
            }
        }
        let rank = |f: &str| files.iter().position(|x| x == f).unwrap_or(usize::MAX);
        self.0.sort_by_key(|p| (rank(&p.file), p.line, p.column));
        self.0.dedup();
        self
    }
}

impl Extend<Problem> for Problems {
    fn extend<I: IntoIterator<Item = Problem>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

impl IntoIterator for Problems {
    type Item = Problem;
    type IntoIter = std::vec::IntoIter<Problem>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_prints_its_position_field_and_message() {
        let p = Problem::at("a.toml", (3, 7), "ramp.rate", "must be above zero");
        assert_eq!(p.to_string(), "a.toml:3:7: ramp.rate: must be above zero");
        assert_eq!(Problem::field("--shard", "is not i/n").to_string(), "--shard: is not i/n");
        assert_eq!(Problem::file(Path::new("x.toml"), "cannot read").to_string(), "x.toml:1:1: cannot read");
        // A message that begins with its field is not prefixed again; one that only starts with
        // the same letters is.
        let named = Problem::at(
            "h.toml",
            (3, 21),
            "behaviour.max_subscriptions",
            "behaviour.max_subscriptions must be from 1 to 1000",
        );
        assert_eq!(named.to_string(), "h.toml:3:21: behaviour.max_subscriptions must be from 1 to 1000");
        let prefix = Problem::field("host", "hostname is wrong");
        assert_eq!(prefix.to_string(), "host: hostname is wrong");
    }

    #[test]
    fn problems_sort_by_file_as_first_named_then_position() {
        let ps = Problems(vec![
            Problem::at("b", (2, 1), "", "b2"),
            Problem::at("a", (9, 1), "", "a9"),
            Problem::at("b", (1, 5), "", "b1"),
            Problem::at("a", (9, 1), "", "a9"),
        ]);
        assert_eq!(ps.sorted().to_string(), "b:1:5: b1\nb:2:1: b2\na:9:1: a9");
        assert_eq!(Problems::default().or_ok(1), Ok(1));
    }
}
