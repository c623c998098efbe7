//! The README (and docs/azure.md) must stay true: every `fleetsim` command line in their shell
//! blocks parses with the real command line; every TOML config they show passes `check`; and the
//! blocks marked `<!-- readme-test: run -->` (and `python`) run, verbatim, as a newcomer would run
//! them, against `fleetsim run` on config.example.toml with its default ports, in a private
//! network namespace (so the fixed ports are free, as in tests/conformance).

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Fenced blocks of a Markdown file: (language, marker from the comment line before, text).
fn blocks(file: &str) -> Vec<(String, Option<String>, String)> {
    let text = std::fs::read_to_string(repo(file)).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    let mut previous = "";
    while let Some(line) = lines.next() {
        if let Some(lang) = line.strip_prefix("```") {
            let marker =
                previous.strip_prefix("<!-- readme-test: ").and_then(|m| m.strip_suffix(" -->")).map(str::to_owned);
            let mut body = String::new();
            for l in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            out.push((lang.trim().to_owned(), marker, body));
            previous = "";
            continue;
        }
        previous = line;
    }
    out
}

/// Splits a shell line into words (quotes, `#` comments), or `None` for a synopsis line with
/// `[optional]` parts, alternatives or `...`.
fn words(line: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut in_word = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '#') if !in_word => break,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(word);
    }
    let synopsis = out.iter().any(|w| w.starts_with('[') || w.contains("...") || w == "|" || w.contains('$'));
    (!synopsis).then_some(out)
}

#[test]
fn every_documented_command_line_parses() {
    let mut seen = 0;
    for file in ["README.md", "docs/azure.md"] {
        for (lang, _, body) in blocks(file) {
            if lang != "sh" {
                continue;
            }
            for line in body.lines() {
                // `TOKEN=$(fleetsim token ...); ...`: the command inside the substitution.
                let line = match line.split_once("$(fleetsim") {
                    Some((_, rest)) => format!("fleetsim{}", rest.split(')').next().unwrap_or_default()),
                    None => line.trim().to_owned(),
                };
                let line = line.as_str();
                let Some(w) = words(line) else { continue };
                if w.first().map(String::as_str) != Some("fleetsim") {
                    continue;
                }
                seen += 1;
                if let Err(e) = fleetsim::cli::Cli::try_parse_from(&w) {
                    panic!("{file}: `{line}` does not parse:\n{e}");
                }
            }
        }
    }
    assert!(seen >= 20, "only {seen} command lines found: is the extraction broken?");
}

#[test]
fn every_documented_config_checks_clean() {
    // SAFETY: this test binary's only use of these variables.
    unsafe {
        std::env::set_var("FLEETSIM_GROUP_KEY", "c2VjcmV0LWdyb3VwLWtleQ==");
        std::env::set_var(
            "FLEETSIM_SERVICE_CONNECTION_STRING",
            "HostName=h.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5",
        );
        std::env::set_var(
            "FLEETSIM_DPS_CONNECTION_STRING",
            "HostName=d.azure-devices-provisioning.net;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=a2V5",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(repo("scenarios"), dir.path().join("scenarios")).unwrap();
    let mut checked = 0;
    for file in ["README.md", "docs/azure.md"] {
        for (i, (lang, _, body)) in blocks(file).into_iter().enumerate() {
            if lang != "toml" || !body.contains("[hub]") {
                continue;
            }
            let path = dir.path().join(format!("doc-{i}.toml"));
            std::fs::write(&path, &body).unwrap();
            if let Err(e) = fleetsim::validate::fleet(Some(&path), &[]) {
                panic!("{file}: the config block\n{body}\ndoes not check:\n{e}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 2, "only {checked} configs found");
    // The CI fragment of the README, inside a config that has everything else.
    let ci = blocks("README.md").into_iter().find(|(l, _, b)| l == "toml" && b.contains("[ci]")).unwrap().2;
    let path = dir.path().join("ci.toml");
    std::fs::write(&path, format!("scenarios = [\"scenarios/*.toml\"]\n{ci}")).unwrap();
    fleetsim::validate::fleet(Some(&path), &[]).unwrap_or_else(|e| panic!("the [ci] example: {e}"));
}

#[test]
fn the_readme_demo_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo("config.example.toml"), dir.path().join("config.example.toml")).unwrap();
    std::os::unix::fs::symlink(repo("scenarios"), dir.path().join("scenarios")).unwrap();
    let mut steps = Vec::new();
    for (i, (lang, marker, body)) in blocks("README.md").into_iter().enumerate() {
        match (marker.as_deref(), lang.as_str()) {
            (Some("run"), "sh") => {
                let path = dir.path().join(format!("step-{i}.sh"));
                std::fs::write(&path, format!("set -euo pipefail\n{body}")).unwrap();
                steps.push(format!("echo '### {}'; bash {} || exit 10", path.display(), path.display()));
            }
            (Some("python"), "python") => {
                let python = repo(".venv/bin/python");
                assert!(python.exists(), "{} is missing: run scripts/setup-sdks.sh", python.display());
                let path = dir.path().join(format!("step-{i}.py"));
                std::fs::write(&path, body).unwrap();
                steps.push(format!(
                    "echo '### {}'; {} {} || exit 11",
                    path.display(),
                    python.display(),
                    path.display()
                ));
            }
            (Some(other), _) => panic!("unknown readme-test marker {other:?}"),
            _ => {}
        }
    }
    assert!(steps.len() >= 4, "marked blocks: {}", steps.len());
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_fleetsim")).parent().unwrap().to_owned();
    // `fleetsim run` with no flags, as the README says; wait for /readyz, run every step, stop.
    let script = format!(
        r#"set -u
ip link set lo up
export PATH="{bin}:$PATH" NO_COLOR=1
fleetsim run > run.log 2>&1 &
fleet=$!
for i in $(seq 1 300); do
  curl -sf http://127.0.0.1:9100/readyz > /dev/null && break
  sleep 0.1
done
curl -sf http://127.0.0.1:9100/readyz || {{ cat run.log; exit 12; }}
{steps}
kill -TERM $fleet
wait $fleet
"#,
        bin = bin_dir.display(),
        steps = steps.join("\n")
    );
    let out = Command::new("unshare")
        .args(["--net", "--", "bash", "-c", &script])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .env_remove("FLEETSIM_SERVICE_CONNECTION_STRING")
        .output()
        .unwrap();
    let log = std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "status {:?}\nstdout:\n{}\nstderr:\n{}\nfleet log:\n{log}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("stopped: every identity drained"), "{log}");
}
