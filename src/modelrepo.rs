//! A model repository on disk: a DTDL model and everything it references (`extends`, component
//! interfaces), read from a directory laid out as Microsoft's device models repository
//! (`dtmi/com/example/thermostat-1.json`) or from one file (an interface, an expanded model, or an
//! IoT Central device template export). The fleet compiles models into devices
//! (`scenario::models`); the emulator checks what devices send against them (`hub::model_check`).
//! Problems name the file, the line and column, and the JSON pointer of the element.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::iot::dtdl::{self, Content, ContentKind, Interface};
use crate::problems::Problem;
use crate::tomlread::line_col;

/// `extends` chains are at most this deep (DTDL v2 and v3).
const MAX_EXTENDS: usize = 10;
/// Largest model file read.
const MAX_MODEL_FILE: u64 = 4 * 1024 * 1024;

/// Where a template's model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A DTMI, found in `dir` by the repository convention.
    Dtmi { id: String, dir: PathBuf },
    /// A file (one interface, or an array: an expanded model or an IoT Central export); what it
    /// refers to and does not hold is looked for in `dir`.
    File { path: PathBuf, dir: PathBuf },
}

/// One component's contents (`component` is `None` for the root interface's own).
pub type Part = (Option<String>, Vec<Content>);

/// A model and everything it references.
#[derive(Debug)]
pub struct Model {
    pub root: String,
    interfaces: BTreeMap<String, (Interface, PathBuf)>,
}

/// A problem in a model file, located by its JSON pointer (the file's start when the text is not
/// at hand or the pointer leads nowhere).
fn problem(path: &Path, text: Option<&str>, pointer: &str, message: impl Into<String>) -> Problem {
    let (line, column) = match text {
        Some(t) => json_pointer_offset(t, pointer).map_or((1, 1), |o| line_col(t, o)),
        None => (1, 1),
    };
    Problem { file: path.display().to_string(), line, column, field: pointer.to_owned(), message: message.into() }
}

/// Loads a model and everything it references; every problem of every file at once.
pub fn load(source: &Source) -> Result<Model, Vec<Problem>> {
    let mut interfaces: BTreeMap<String, (Interface, PathBuf)> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut read_files = HashSet::new();
    let (root, dir) = match source {
        Source::Dtmi { id, dir } => (Some(id.clone()), dir.clone()),
        Source::File { path, dir } => {
            let first = read_model_file(path, &mut interfaces, &mut problems);
            read_files.insert(path.clone());
            (first, dir.clone())
        }
    };
    let Some(root) = root else {
        return Err(problems);
    };
    // Breadth first over references; each missing DTMI is read from the directory once.
    let mut wanted = vec![(root.clone(), None::<(PathBuf, String)>)];
    let mut seen = HashSet::new();
    // Interfaces in files named otherwise (an IoT Central export dropped into the directory),
    // indexed the first time the repository path does not have one.
    let mut index: Option<BTreeMap<String, PathBuf>> = None;
    while let Some((id, from)) = wanted.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        if !interfaces.contains_key(&id) {
            let Some(rel) = dtdl::repository_path(&id) else {
                problems.push(referenced(&from, format!("\"{id}\" is not a valid DTMI")));
                continue;
            };
            let path = dir.join(&rel);
            // Missing at its repository path is not yet a problem: another file may hold it.
            if path.exists() && read_files.insert(path.clone()) {
                read_model_file(&path, &mut interfaces, &mut problems);
            }
            if !interfaces.contains_key(&id)
                && let Some(other) = index.get_or_insert_with(|| index_dir(&dir)).get(&id)
                && read_files.insert(other.clone())
            {
                read_model_file(other, &mut interfaces, &mut problems);
            }
            if !interfaces.contains_key(&id) {
                problems.push(referenced(
                    &from,
                    format!(
                        "{id} is referenced but not found (looked for {} and in the other files there)",
                        path.display()
                    ),
                ));
                continue;
            }
        }
        let (iface, file) = &interfaces[&id];
        for e in &iface.extends {
            wanted.push((e.clone(), Some((file.clone(), format!("{}/extends", iface.pointer)))));
        }
        for c in &iface.contents {
            if let ContentKind::Component { interface } = &c.kind {
                wanted.push((interface.clone(), Some((file.clone(), format!("{}/schema", c.pointer)))));
            }
        }
    }
    if problems.is_empty() { Ok(Model { root, interfaces }) } else { Err(problems) }
}

fn referenced(from: &Option<(PathBuf, String)>, message: String) -> Problem {
    match from {
        Some((file, pointer)) => {
            let text = std::fs::read_to_string(file).ok();
            problem(file, text.as_deref(), pointer, message)
        }
        None => Problem { file: String::new(), line: 0, column: 0, field: "model".into(), message },
    }
}

/// The top-level interfaces of every JSON file under `dir` (at most 8 levels and 10,000 files),
/// by DTMI. Files that are not JSON are passed over: only a file that is used can be a problem.
fn index_dir(dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(dir.to_owned(), 0)];
    let mut files = 0;
    while let Some((d, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                if depth < 8 {
                    stack.push((path, depth + 1));
                }
                continue;
            }
            files += 1;
            if files > 10_000 {
                return out;
            }
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Ok(text) = crate::fsio::read_text_capped(&path, MAX_MODEL_FILE) else { continue };
            let Ok(json) = serde_json::from_str::<Value>(&text) else { continue };
            let top: Vec<&Value> = match &json {
                Value::Array(items) => items.iter().collect(),
                other => vec![other],
            };
            for i in top {
                if let Some(id) = i.get("@id").and_then(Value::as_str) {
                    out.entry(id.to_owned()).or_insert_with(|| path.clone());
                }
            }
        }
    }
    out
}

/// Reads one model file into `into`; the DTMI of its first (root) interface.
fn read_model_file(
    path: &Path,
    into: &mut BTreeMap<String, (Interface, PathBuf)>,
    problems: &mut Vec<Problem>,
) -> Option<String> {
    let text = match crate::fsio::read_text_capped(path, MAX_MODEL_FILE) {
        Ok(t) => t,
        Err(e) => {
            problems.push(Problem::file(path, format!("cannot read: {}", crate::tomlread::io_reason(&e))));
            return None;
        }
    };
    let json: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            problems.push(Problem {
                file: path.display().to_string(),
                line: e.line(),
                column: e.column(),
                field: String::new(),
                message: format!("not JSON: {e}"),
            });
            return None;
        }
    };
    let (interfaces, found) = dtdl::parse_document(&json);
    problems.extend(found.into_iter().map(|p| problem(path, Some(&text), &p.pointer, p.message)));
    // The root is the first interface written at the top level (nested ones are pushed first).
    let top = match &json {
        Value::Array(items) => items.first().and_then(|i| i.get("@id")).and_then(Value::as_str).map(str::to_owned),
        other => other.get("@id").and_then(Value::as_str).map(str::to_owned),
    };
    for i in interfaces {
        if let Some((_, other)) = into.get(&i.id) {
            if other != path {
                problems.push(problem(
                    path,
                    Some(&text),
                    &i.pointer,
                    format!("{} is also defined in {}", i.id, other.display()),
                ));
            }
            continue;
        }
        into.insert(i.id.clone(), (i, path.to_owned()));
    }
    top
}

impl Model {
    /// An interface's contents with what it extends folded in (bases first); a name defined
    /// twice along the chain, or a chain deeper than DTDL allows, is a problem.
    pub fn contents(&self, id: &str, depth: usize, out: &mut Vec<Content>, problems: &mut Vec<Problem>) {
        let Some((iface, file)) = self.interfaces.get(id) else { return };
        if depth > MAX_EXTENDS {
            problems.push(problem(
                file,
                None,
                &iface.pointer,
                format!("extends is nested deeper than {MAX_EXTENDS} levels (or is a cycle)"),
            ));
            return;
        }
        for e in &iface.extends {
            self.contents(e, depth + 1, out, problems);
        }
        for c in &iface.contents {
            if out.iter().any(|x| x.name == c.name) {
                let text = std::fs::read_to_string(file).ok();
                problems.push(problem(
                    file,
                    text.as_deref(),
                    &c.pointer,
                    format!("\"{}\" is also defined by an interface {id} extends", c.name),
                ));
            } else {
                out.push(c.clone());
            }
        }
    }

    /// The root interface's model id (what the device announces).
    pub fn id(&self) -> &str {
        &self.root
    }

    /// The root's contents and each component's, `extends` folded in.
    pub fn parts(&self) -> Result<Vec<Part>, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut root = Vec::new();
        self.contents(&self.root, 0, &mut root, &mut problems);
        let mut parts: Vec<Part> = Vec::new();
        let mut own = Vec::new();
        for c in root {
            match &c.kind {
                ContentKind::Component { interface } => {
                    let mut inner = Vec::new();
                    self.contents(interface, 0, &mut inner, &mut problems);
                    if let Some(nested) = inner.iter().find(|x| matches!(x.kind, ContentKind::Component { .. })) {
                        let file = &self.interfaces[interface].1;
                        problems.push(problem(
                            file,
                            None,
                            &nested.pointer,
                            "a component's interface cannot have components (DTDL)",
                        ));
                    }
                    parts.push((Some(c.name.clone()), inner));
                }
                _ => own.push(c),
            }
        }
        parts.insert(0, (None, own));
        if problems.is_empty() { Ok(parts) } else { Err(problems) }
    }
}

/// The byte offset of the value a JSON pointer names in `text`, found by scanning (serde_json
/// keeps no positions). `None` if the pointer does not lead anywhere.
pub fn json_pointer_offset(text: &str, pointer: &str) -> Option<usize> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    for raw in pointer.split('/').skip(1) {
        let want = raw.replace("~1", "/").replace("~0", "~");
        match b.get(i)? {
            b'{' => {
                i = skip_ws(b, i + 1);
                loop {
                    if b.get(i)? == &b'}' {
                        return None;
                    }
                    let (key, after) = read_string(b, i)?;
                    i = skip_ws(b, after);
                    if b.get(i)? != &b':' {
                        return None;
                    }
                    i = skip_ws(b, i + 1);
                    if key == want {
                        break;
                    }
                    i = skip_ws(b, skip_value(b, i)?);
                    if b.get(i)? == &b',' {
                        i = skip_ws(b, i + 1);
                    }
                }
            }
            b'[' => {
                let index: usize = want.parse().ok()?;
                i = skip_ws(b, i + 1);
                for _ in 0..index {
                    i = skip_ws(b, skip_value(b, i)?);
                    if b.get(i)? != &b',' {
                        return None;
                    }
                    i = skip_ws(b, i + 1);
                }
            }
            _ => return None,
        }
    }
    Some(i)
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// A string starting at `i`: its (unescaped enough to compare keys) text and the index after it.
fn read_string(b: &[u8], i: usize) -> Option<(String, usize)> {
    if b.get(i)? != &b'"' {
        return None;
    }
    let mut j = i + 1;
    let mut out = Vec::new();
    while let Some(&c) = b.get(j) {
        match c {
            b'"' => return Some((String::from_utf8_lossy(&out).into_owned(), j + 1)),
            b'\\' => {
                out.push(*b.get(j + 1)?);
                j += 2;
            }
            _ => {
                out.push(c);
                j += 1;
            }
        }
    }
    None
}

/// The index after the value starting at `i` (a loop, not recursion: deep documents are fine).
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => Some(read_string(b, i)?.1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = read_string(b, j)?.1;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while b.get(j).is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace()) {
                j += 1;
            }
            Some(j)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_pointers_find_their_element() {
        let text = "{\n  \"a\": [1, {\"b\": \"x\"}, [2, 3]],\n  \"c\": {\"d~e/f\": true}\n}";
        let at = |p: &str| json_pointer_offset(text, p).map(|o| &text[o..o + 1]);
        assert_eq!(at("/a/1/b"), Some("\""));
        assert_eq!(at("/a/2/1"), Some("3"));
        assert_eq!(at("/c/d~0e~1f"), Some("t"));
        assert_eq!(at("/a/0"), Some("1"));
        assert_eq!(at("/a/9"), None);
        assert_eq!(at("/zz"), None);
        assert_eq!(line_col(text, json_pointer_offset(text, "/c").unwrap()), (3, 8));
    }
}
