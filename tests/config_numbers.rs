//! Issue 10, kind 2, as a property: no value of any numeric field in a scenario, the daemon config
//! or the hub config panics `check` (or the generators a scenario compiles to). Every numeric
//! setting in the shipped files (commented ones included, uncommented for the purpose) is replaced,
//! one at a time, with each of a set of hostile values and seeded random ones; loading must return
//! a config or errors, and a scenario that loads must evaluate its values without panicking.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::{Rng, SeedableRng};

const HOSTILE: &[&str] = &[
    "0",
    "-1",
    "-0.0",
    "1e20",
    "-1e20",
    "1e308",
    "-1e308",
    "1.7976931348623157e308",
    "nan",
    "inf",
    "-inf",
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "0.000000001",
    "4294967296",
    "65536",
    "\"5124095576030432h\"",
    "\"1e400s\"",
    "\"-1s\"",
    "\"0ms\"",
    "\"99999999999999999999h\"",
];

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Every `key = number` (or `key = "duration"`) on a line, as (line, byte range of the value).
fn numeric_values(text: &str) -> Vec<(usize, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let mut i = 0;
        while let Some(eq) = line[i..].find('=') {
            let start = i + eq + 1;
            let rest = &line[start..];
            let skip = rest.len() - rest.trim_start().len();
            let v = start + skip;
            let end = if bytes.get(v) == Some(&b'"') {
                line[v + 1..].find('"').map(|e| v + e + 2)
            } else {
                let len = line[v..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || "+-._".contains(c)))
                    .unwrap_or(line.len() - v);
                Some(v + len)
            };
            if let Some(end) = end {
                let value = &line[v..end];
                let numeric = value.trim_matches('"');
                let is_duration = value.starts_with('"')
                    && numeric.chars().next().is_some_and(|c| c.is_ascii_digit())
                    && numeric.len() < 12;
                if numeric.parse::<f64>().is_ok() && !value.starts_with('"') || is_duration {
                    out.push((n, v..end));
                }
            }
            i = start;
        }
    }
    out
}

/// The file with every commented `# key = value` line uncommented, so commented settings count.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.trim_start().strip_prefix("# ") {
            Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => rest.to_owned(),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn variants(text: &str, seed: u64) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (n, range) in numeric_values(text) {
        let mut values: Vec<String> = HOSTILE.iter().map(|s| s.to_string()).collect();
        for _ in 0..8 {
            let x: f64 = rng.random_range(-1e6..1e6) * 10f64.powi(rng.random_range(-12..300));
            values.push(format!("{x:e}"));
            values.push(format!("{}", rng.random::<i64>()));
        }
        for v in values {
            let mut l = lines.clone();
            let line = format!("{}{v}{}", &lines[n][..range.start], &lines[n][range.end..]);
            l[n] = &line;
            out.push(l.join("\n"));
        }
    }
    out
}

fn no_panic(what: &str, f: impl FnOnce() + std::panic::UnwindSafe) {
    if std::panic::catch_unwind(f).is_err() {
        panic!("panicked on:\n{what}");
    }
}

#[test]
fn no_number_in_a_scenario_panics_check_or_its_generators() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo("scenarios")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let text = uncommented(&std::fs::read_to_string(&path).unwrap());
        for (i, v) in variants(&text, 1).into_iter().enumerate() {
            n += 1;
            let p = path.clone();
            no_panic(&v.clone(), move || {
                let (templates, _) = fleetsim::scenario::schema::load_text(&p, v);
                let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
                for t in &templates {
                    let mut state = t.behaviour.initial_state.clone();
                    let ctx = fleetsim::scenario::value::Ctx { n: 1, ..Default::default() };
                    for spec in &t.behaviour.telemetry {
                        for s in [0, 1, 3600] {
                            let _ = spec.fields.eval(&ctx, &mut state, Duration::from_secs(s), &mut rng);
                        }
                    }
                }
            });
        }
    }
    assert!(n > 1000, "only {n} variants: the scenarios' numbers were not found");
}

#[test]
fn no_number_in_the_daemon_config_panics_check() {
    let mut n = 0;
    for file in ["config.example.toml", "soak/soak.toml", "soak/soak-10k.toml"] {
        let path = repo(file);
        let text = uncommented(&std::fs::read_to_string(&path).unwrap());
        for v in variants(&text, 2) {
            n += 1;
            let p = path.clone();
            no_panic(&v.clone(), move || {
                let _ = fleetsim::config::DaemonConfig::parse(&p, v);
            });
        }
    }
    assert!(n > 500, "only {n} variants");
}

#[test]
fn no_number_in_the_hub_config_panics_check() {
    let mut n = 0;
    for file in ["hub.example.toml", "soak/hub-faults.toml"] {
        let text = uncommented(&std::fs::read_to_string(repo(file)).unwrap());
        for v in variants(&text, 3) {
            n += 1;
            no_panic(&v.clone(), move || {
                if let Ok(c) = toml::from_str::<fleetsim::hub::config::HubConfig>(&v) {
                    let _ = c.validate();
                }
            });
        }
    }
    assert!(n > 300, "only {n} variants");
}
