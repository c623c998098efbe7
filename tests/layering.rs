//! The layers of ARCHITECTURE.md, kept true. The test reads the two tables of its "Layers" section
//! (which top-level modules each module may import; which paths a module never imports), checks
//! that the first has no cycle and names every module of `src/`, then scans every `.rs` file under
//! `src/` for the paths it names (`use crate::…`, `crate::x::…` in code, `super::…` resolved to
//! its module, `pub use` re-exports, `fleetsim::…` in `main.rs`) and fails naming file:line and
//! the rule for each import against them. Comments and string literals are not code: the scanner
//! blanks them first, keeping line numbers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One module's row of the layers table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layer {
    name: String,
    may_import: BTreeSet<String>,
}

/// A "never imports" rule: a module path (or one of its descendants) must not name `to` (or a
/// descendant).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Never {
    from: Vec<String>,
    to: Vec<String>,
}

/// A path the code names, resolved to segments from the crate root.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Import {
    line: usize,
    path: Vec<String>,
    /// Named inside an inline module (`mod tests { … }`), not by the file's own code.
    inline: bool,
}

/// The backticked names in a table cell: "`a`, `b::c`" -> ["a", "b::c"]; "—" -> [].
fn ticked(cell: &str) -> Vec<String> {
    cell.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

/// The rows of the markdown table under the first line starting with `header` in `section`.
fn table_rows<'a>(section: &'a str, header: &str) -> Vec<Vec<&'a str>> {
    let mut lines = section.lines().skip_while(|l| !l.starts_with(header));
    if lines.next().is_none() {
        return Vec::new();
    }
    lines
        .skip(1) // the |---| line
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.trim().trim_matches('|').split('|').map(str::trim).collect())
        .collect()
}

/// The "Layers" section of ARCHITECTURE.md: up to the next `## ` heading.
fn layers_section(doc: &str) -> &str {
    let start = doc.find("\n## Layers").expect("ARCHITECTURE.md has a \"## Layers\" section");
    let rest = &doc[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    &rest[..end]
}

fn parse_layers(section: &str) -> Vec<Layer> {
    table_rows(section, "| module | may import |")
        .into_iter()
        .map(|cells| {
            let name = ticked(cells[0]);
            assert_eq!(name.len(), 1, "a layers row names one module: {cells:?}");
            Layer { name: name[0].clone(), may_import: ticked(cells[1]).into_iter().collect() }
        })
        .collect()
}

fn parse_nevers(section: &str) -> Vec<Never> {
    let split = |p: &str| p.split("::").map(str::to_owned).collect::<Vec<_>>();
    let mut out = Vec::new();
    for cells in table_rows(section, "| module | never imports |") {
        for from in ticked(cells[0]) {
            for to in ticked(cells[1]) {
                out.push(Never { from: split(&from), to: split(&to) });
            }
        }
    }
    out
}

/// A cycle in the table, as the modules along it, if there is one.
fn find_cycle(layers: &[Layer]) -> Option<Vec<String>> {
    let edges: BTreeMap<&str, &BTreeSet<String>> = layers.iter().map(|l| (l.name.as_str(), &l.may_import)).collect();
    // 0 unvisited, 1 on the path, 2 done.
    fn visit<'a>(
        n: &'a str,
        edges: &BTreeMap<&'a str, &'a BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match state.get(n).copied().unwrap_or(0) {
            1 => {
                let at = path.iter().position(|p| *p == n).unwrap_or(0);
                let mut cycle: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            2 => return None,
            _ => {}
        }
        state.insert(n, 1);
        path.push(n);
        for m in edges.get(n).into_iter().flat_map(|s| s.iter()) {
            if let Some(c) = visit(m.as_str(), edges, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n, 2);
        None
    }
    let mut state = BTreeMap::new();
    for l in layers {
        if let Some(c) = visit(&l.name, &edges, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

/// The code of a Rust source with comments, string and char literals replaced by spaces (line
/// breaks kept, so line numbers still hold).
fn blank_non_code(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == b'/' && next == Some(b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && next == Some(b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if (c == b'r' || (c == b'b' && next == Some(b'r')))
            && !prev_is_ident(b, i)
            && raw_string_start(b, if c == b'b' { i + 1 } else { i }).is_some()
        {
            let start = if c == b'b' { i + 1 } else { i };
            let hashes = raw_string_start(b, start).unwrap_or(0);
            let body = start + 1 + hashes + 1;
            let mut closing = vec![b'"'];
            closing.extend(std::iter::repeat_n(b'#', hashes));
            let end = b[body..]
                .windows(closing.len())
                .position(|w| w == closing.as_slice())
                .map_or(b.len(), |p| body + p + closing.len());
            for &x in &b[i..end] {
                blank(&mut out, x);
            }
            i = end;
        } else if c == b'"' {
            blank(&mut out, c);
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                }
                blank(&mut out, b[i]);
                i += 1;
            }
            if i < b.len() {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{1F600}', '"') or a lifetime ('a, 'static).
            let len = char_literal_len(b, i);
            if len > 0 {
                for &x in &b[i..i + len] {
                    blank(&mut out, x);
                }
                i += len;
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).expect("only ASCII bytes were replaced")
}

fn prev_is_ident(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// At `r`: the number of `#`s of a raw string `r#…"`, if one starts here.
fn raw_string_start(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while b.get(j) == Some(&b'#') {
        j += 1;
    }
    (b.get(j) == Some(&b'"')).then_some(j - i - 1)
}

/// At `'`: the length of the char literal starting here, 0 for a lifetime.
fn char_literal_len(b: &[u8], i: usize) -> usize {
    if b.get(i + 1) == Some(&b'\\') {
        let close = b[i + 2..].iter().take(12).position(|&x| x == b'\'');
        return close.map_or(0, |p| p + 3);
    }
    // One UTF-8 character, then the closing quote.
    let Some(&first) = b.get(i + 1) else { return 0 };
    let width = match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    };
    if b.get(i + 1 + width) == Some(&b'\'') { width + 2 } else { 0 }
}

/// A token of blanked code: an identifier, `::`, or one other character.
fn tokens(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut line = 1;
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((line, chars[start..i].iter().collect()));
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push((line, "::".to_owned()));
            i += 2;
        } else {
            out.push((line, c.to_string()));
            i += 1;
        }
    }
    out
}

/// The file's module path from the crate root: `src/hub/mqtt/connection.rs` -> hub::mqtt::connection,
/// `src/config/mod.rs` -> config, `src/main.rs` -> main, `src/lib.rs` -> [].
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    parts
}

/// Every crate path `code` names, resolved from `module` (the file's module path). `root` is what
/// names the crate: `crate` in the library, `fleetsim` in `main.rs`.
fn scan(code: &str, module: &[String], root: &str) -> Vec<Import> {
    let toks = tokens(&blank_non_code(code));
    let mut out = Vec::new();
    // Inline modules (`mod tests { … }`) the scanner is inside, with the brace depth each opened at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let (line, t) = (&toks[i].0, toks[i].1.as_str());
        match t {
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            "mod" if toks.get(i + 2).is_some_and(|n| n.1 == "{") => {
                inline.push((toks[i + 1].1.clone(), depth));
            }
            _ => {}
        }
        let starts_path = matches!(t, "super" | "self" | "crate") || t == root;
        // A path starts here only if it is not the tail of another (`x::super` cannot be written,
        // but `foo::crate_name` could be an identifier ending).
        let after_sep = i > 0 && toks[i - 1].1 == "::";
        let dollar = i > 0 && toks[i - 1].1 == "$";
        if starts_path && !after_sep && !dollar && toks.get(i + 1).is_some_and(|n| n.1 == "::") {
            let mut here: Vec<String> = module.to_vec();
            here.extend(inline.iter().map(|(m, _)| m.clone()));
            let (trees, next) = use_tree(&toks, i);
            for segs in trees {
                if let Some(path) = resolve(&segs, &here, root) {
                    out.push(Import { line: *line, path, inline: !inline.is_empty() });
                }
            }
            i = next;
            continue;
        }
        i += 1;
    }
    out
}

/// The paths of a use tree (or a plain path) starting at token `i`: `a::{b, c::{self, d}}` ->
/// [a::b, a::c, a::c::d]. Returns them and the index after the tree.
fn use_tree(toks: &[(usize, String)], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let mut prefix = Vec::new();
    loop {
        let Some((_, t)) = toks.get(i) else { return (vec![prefix], i) };
        if t == "{" {
            let mut out = Vec::new();
            i += 1;
            while i < toks.len() && toks[i].1 != "}" {
                if toks[i].1 == "," {
                    i += 1;
                    continue;
                }
                let (subs, next) = use_tree(toks, i);
                for s in subs {
                    // `a::{self, b}`: `self` is `a` itself.
                    let keep_self = prefix.is_empty();
                    let mut p = prefix.clone();
                    p.extend(s.into_iter().filter(|x| x != "self" || keep_self));
                    out.push(p);
                }
                i = next;
            }
            return (out, i + 1);
        }
        if t == "*" {
            return (vec![prefix], i + 1);
        }
        if !(t.chars().next().is_some_and(|c| c.is_alphanumeric() || c == '_')) {
            return (vec![prefix], i);
        }
        prefix.push(t.clone());
        i += 1;
        if toks.get(i).is_some_and(|n| n.1 == "::") {
            i += 1;
        } else {
            return (vec![prefix], i);
        }
    }
}

/// A path's segments from the crate root, or None if it leaves the crate (`super` above the root)
/// or does not start at the crate.
fn resolve(segs: &[String], here: &[String], root: &str) -> Option<Vec<String>> {
    let mut base: Vec<String> = match segs.first().map(String::as_str) {
        Some("crate") => Vec::new(),
        Some(r) if r == root => Vec::new(),
        Some("self" | "super") => here.to_vec(),
        _ => return None,
    };
    let mut rest = segs.iter().skip(usize::from(segs.first().is_some_and(|s| s == "crate" || s == root)));
    let mut segs_iter = rest.by_ref().peekable();
    while let Some(s) = segs_iter.peek() {
        match s.as_str() {
            "self" => {}
            "super" => {
                base.pop()?;
            }
            _ => break,
        }
        segs_iter.next();
    }
    base.extend(segs_iter.cloned());
    Some(base)
}

/// Why `import` (from the file of module `from`) breaks the rules, if it does.
fn violation(from: &[String], import: &[String], layers: &BTreeMap<String, Layer>, nevers: &[Never]) -> Option<String> {
    let (Some(src_top), Some(dst_top)) = (from.first(), import.first()) else { return None };
    for n in nevers {
        if from.starts_with(&n.from) && import.starts_with(&n.to) {
            return Some(format!("`{}` never imports `{}`", n.from.join("::"), n.to.join("::")));
        }
    }
    if src_top == dst_top {
        return None;
    }
    let Some(row) = layers.get(src_top) else {
        return Some(format!("`{src_top}` has no row in the layers table"));
    };
    if !layers.contains_key(dst_top) {
        // An item of the crate root or an outside name: not a module of ours.
        return None;
    }
    (!row.may_import.contains(dst_top))
        .then(|| format!("`{src_top}` may import only {:?}, not `{dst_top}`", row.may_import))
}

/// Every set of rows that import each other round in a circle (the strongly connected sets of
/// more than one row), each sorted, in name order.
fn cycle_sets(rows: &[Layer]) -> Vec<Vec<String>> {
    // Two rows are in one set when each reaches the other.
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(n) = todo.pop() {
            for m in rows.iter().filter(|r| r.name == n).flat_map(|r| r.may_import.iter()) {
                if seen.insert(m.clone()) {
                    todo.push(m.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&str, BTreeSet<String>> = rows.iter().map(|r| (r.name.as_str(), reach(&r.name))).collect();
    let mut sets: Vec<Vec<String>> = Vec::new();
    for r in rows {
        if sets.iter().any(|s| s.contains(&r.name)) {
            continue;
        }
        let set: Vec<String> = rows
            .iter()
            .filter(|o| {
                o.name == r.name
                    || (reaches[r.name.as_str()].contains(&o.name) && reaches[o.name.as_str()].contains(&r.name))
            })
            .map(|o| o.name.clone())
            .collect();
        if set.len() > 1 {
            sets.push(set);
        }
    }
    sets
}

/// The file an import lands in: the longest prefix of its path that is a file's module.
fn file_of<'a>(path: &[String], files: &'a BTreeSet<Vec<String>>) -> Option<&'a Vec<String>> {
    (1..=path.len()).rev().find_map(|n| files.get(&path[..n]))
}

/// The file-to-file graph of the imports the files' own code makes (test modules left out), as
/// rows for `find_cycle`. A file and the files under its directory (`mod.rs` and its children)
/// are one unit: a parent naming its child, or a child its parent, is how modules are declared
/// and re-exported, not a cycle.
fn file_graph(imports: &[(Vec<String>, Import)], files: &BTreeSet<Vec<String>>) -> Vec<Layer> {
    let mut rows: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, imp) in imports {
        let Some(to) = file_of(&imp.path, files) else { continue };
        if imp.inline || to.starts_with(from) || from.starts_with(to) {
            continue;
        }
        rows.entry(from.join("::")).or_default().insert(to.join("::"));
    }
    rows.into_iter().map(|(name, may_import)| Layer { name, may_import }).collect()
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("src/ is readable") {
        let p = e.expect("a directory entry").path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_import_in_src_keeps_the_layers_of_architecture_md() {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let section = layers_section(&doc);
    let layers = parse_layers(section);
    let nevers = parse_nevers(section);
    assert!(layers.len() > 10, "the layers table was not found or is nearly empty: {layers:?}");
    assert!(!nevers.is_empty(), "the \"never imports\" table was not found");
    if let Some(c) = find_cycle(&layers) {
        panic!("ARCHITECTURE.md's layers table has a cycle: {}", c.join(" -> "));
    }
    let by_name: BTreeMap<String, Layer> = layers.iter().map(|l| (l.name.clone(), l.clone())).collect();
    for l in &layers {
        for m in &l.may_import {
            assert!(by_name.contains_key(m), "`{}` may import `{m}`, which has no row of its own", l.name);
        }
    }

    let src = root().join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    files.sort();
    let mut modules = BTreeSet::new();
    let mut problems = Vec::new();
    let file_modules: BTreeSet<Vec<String>> =
        files.iter().map(|f| module_of(f.strip_prefix(&src).expect("under src/"))).collect();
    let mut all_imports = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src/");
        let module = module_of(rel);
        if let Some(top) = module.first() {
            modules.insert(top.clone());
        }
        let text = std::fs::read_to_string(f).expect("a source file");
        let crate_name = if module == ["main"] { "fleetsim" } else { "crate" };
        for imp in scan(&text, &module, crate_name) {
            if let Some(why) = violation(&module, &imp.path, &by_name, &nevers) {
                problems.push(format!("src/{}:{}: {} ({})", rel.display(), imp.line, why, imp.path.join("::")));
            }
            all_imports.push((module.clone(), imp));
        }
    }
    for m in &modules {
        if !by_name.contains_key(m) {
            problems.push(format!("src/: module `{m}` has no row in ARCHITECTURE.md's layers table"));
        }
    }
    for name in by_name.keys() {
        if !modules.contains(name) {
            problems.push(format!("ARCHITECTURE.md's layers table names `{name}`, which is not a module of src/"));
        }
    }
    // Within a module too, files import one way: a cycle between files (a connection loop and
    // the sessions it drives naming each other) means a contract that wants a file of its own.
    for set in cycle_sets(&file_graph(&all_imports, &file_modules)) {
        problems.push(format!("src/: these files import each other in a cycle: {}", set.join(", ")));
    }
    assert!(problems.is_empty(), "{} problems with ARCHITECTURE.md's layers:\n{}", problems.len(), problems.join("\n"));
}

// The scanner, on small inputs: a test that could not fail would keep nothing true.

fn m(path: &str) -> Vec<String> {
    path.split("::").map(str::to_owned).collect()
}

fn paths(code: &str, module: &str) -> Vec<String> {
    scan(code, &m(module), "crate").into_iter().map(|i| format!("{}:{}", i.line, i.path.join("::"))).collect()
}

#[test]
fn the_scanner_finds_use_lines_paths_in_code_and_re_exports() {
    let code = "use crate::device::spec::Settings;\n\
                pub use crate::iot::sas::Key;\n\
                fn f() { let x = crate::fleet::start(); }\n\
                use crate::{config::{self, HubMode}, tools::*};\n";
    assert_eq!(
        paths(code, "hub::state"),
        ["1:device::spec::Settings", "2:iot::sas::Key", "3:fleet::start", "4:config", "4:config::HubMode", "4:tools"]
    );
}

#[test]
fn the_scanner_resolves_super_and_self_from_the_files_module() {
    assert_eq!(paths("use super::super::mqtt::connection;", "hub::http::websocket"), ["1:hub::mqtt::connection"]);
    assert_eq!(
        paths("use super::{ConfigProblems, check};", "fleet::reload"),
        ["1:fleet::ConfigProblems", "1:fleet::check"]
    );
    assert_eq!(paths("use self::ci::CiConfig;", "config"), ["1:config::ci::CiConfig"]);
    // Inside `mod tests { … }`, `super` is the file's own module.
    assert_eq!(
        paths("#[cfg(test)]\nmod tests {\n    use super::*;\n}\nuse super::x;", "tools::twin"),
        ["3:tools::twin", "5:tools::x"]
    );
}

#[test]
fn comments_strings_and_macro_paths_are_not_imports() {
    let code = "// use crate::hub::state;\n\
                /// see crate::hub::mqtt\n\
                /* crate::fleet:: /* nested */ crate::tools:: */\n\
                let s = \"crate::hub::x\";\n\
                let r = r#\"use crate::hub::y; \"quoted\" \"#;\n\
                let c = '\"'; let l: &'static str = \"\";\n\
                macro_rules! m { () => { $crate::hub::z } }\n\
                pub(crate) fn f() {}\n";
    assert_eq!(paths(code, "device::runtime"), Vec::<String>::new());
    // Line numbers survive the blanking.
    assert_eq!(paths("/* a\n b */\n\"\nx\"\nuse crate::hub::y;", "device"), ["5:hub::y"]);
}

fn layers(rows: &[(&str, &[&str])]) -> BTreeMap<String, Layer> {
    rows.iter()
        .map(|(n, may)| {
            (n.to_string(), Layer { name: n.to_string(), may_import: may.iter().map(|s| s.to_string()).collect() })
        })
        .collect()
}

#[test]
fn a_violating_line_is_caught_and_an_allowed_one_is_not() {
    let l = layers(&[("iot", &[]), ("hub", &["iot"]), ("device", &["iot"]), ("fleet", &["hub", "device", "iot"])]);
    let nevers = vec![Never { from: m("hub::http"), to: m("hub::mqtt") }];
    let check = |code: &str, module: &str| -> Vec<String> {
        scan(code, &m(module), "crate").iter().filter_map(|i| violation(&m(module), &i.path, &l, &nevers)).collect()
    };
    assert_eq!(check("use crate::iot::sas::Key;", "hub::state"), Vec::<String>::new());
    assert_eq!(check("use crate::hub::state::HubState;", "fleet"), Vec::<String>::new());
    let v = check("use crate::device::spec::Settings;", "hub::state");
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("not `device`"), "{v:?}");
    let v = check("use super::super::mqtt::connection;", "hub::http::websocket");
    assert_eq!(v, ["`hub::http` never imports `hub::mqtt`"]);
    assert_eq!(check("use super::state;", "hub::http"), Vec::<String>::new());
    // main.rs names the library `fleetsim`.
    let v: Vec<_> = scan("use fleetsim::hub;", &m("main"), "fleetsim").iter().map(|i| i.path.join("::")).collect();
    assert_eq!(v, ["hub"]);
}

#[test]
fn a_cycle_between_files_is_found_and_parent_child_and_test_imports_are_not_cycles() {
    let files: BTreeSet<Vec<String>> =
        ["hub", "hub::mqtt", "hub::mqtt::connection", "hub::mqtt::session", "hub::state"]
            .iter()
            .map(|s| m(s))
            .collect();
    let imports = |list: &[(&str, &str)]| -> Vec<(Vec<String>, Import)> {
        list.iter()
            .flat_map(|(from, code)| scan(code, &m(from), "crate").into_iter().map(move |i| (m(from), i)))
            .collect()
    };
    // mod.rs and its children name each other; a test names what it tests: no cycle.
    let fine = imports(&[
        ("hub::mqtt", "pub use self::connection::serve;"),
        ("hub::mqtt::connection", "use super::Wire; use crate::hub::state::HubState;"),
        ("hub::mqtt::session", "use crate::hub::state::HubState;"),
        ("hub::state", "#[cfg(test)]\nmod tests { use crate::hub::mqtt::session::Session; }"),
    ]);
    assert_eq!(find_cycle(&file_graph(&fine, &files)), None);
    let cyclic = imports(&[
        ("hub::mqtt::connection", "use super::session::on_packet;"),
        ("hub::mqtt::session", "use crate::hub::mqtt::connection::Wire;"),
    ]);
    let c = find_cycle(&file_graph(&cyclic, &files)).expect("a cycle");
    assert_eq!(c, ["hub::mqtt::connection", "hub::mqtt::session", "hub::mqtt::connection"]);
    assert_eq!(cycle_sets(&file_graph(&cyclic, &files)), [["hub::mqtt::connection", "hub::mqtt::session"]]);
    assert_eq!(cycle_sets(&file_graph(&fine, &files)), Vec::<Vec<String>>::new());
    // Every set is named, not only the first: two separate cycles, and a file outside both.
    let two = layers(&[("a", &["b"]), ("b", &["a", "e"]), ("c", &["d"]), ("d", &["c"]), ("e", &[])]);
    assert_eq!(cycle_sets(&two.into_values().collect::<Vec<_>>()), [["a", "b"], ["c", "d"]]);
}

#[test]
fn the_table_is_read_from_markdown_and_a_cycle_in_it_is_found() {
    let section = "## Layers\n\n| module | may import | for |\n|---|---|---|\n| `iot` | — | the protocol |\n\
                   | `hub` | `iot`, `sys` | the emulator |\n| `sys` | | plumbing |\n\n\
                   | module | never imports | why |\n|---|---|---|\n| `hub::mqtt`, `hub::http` | `device` | sides |\n";
    let l = parse_layers(section);
    assert_eq!(l.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(), ["iot", "hub", "sys"]);
    assert_eq!(l[1].may_import.iter().map(String::as_str).collect::<Vec<_>>(), ["iot", "sys"]);
    assert!(find_cycle(&l).is_none());
    assert_eq!(parse_nevers(section).len(), 2);
    let cyclic = layers(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
    let c = find_cycle(&cyclic.into_values().collect::<Vec<_>>()).expect("a cycle");
    assert_eq!(c, ["a", "b", "c", "a"]);
}
