//! The binary's contract for bad input: every problem of every file reported with its position,
//! exit status 64, and nothing started.

use std::process::Command;

fn fleetsim(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetsim"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_config_and_scenarios_check_clean() {
    let (code, out, err) = fleetsim(&["check", "--config", "config.example.toml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "ok: 4 templates, 12 devices, 6 modules");
    for (config, want) in [
        ("soak/soak.toml", "ok: 5 templates, 52 devices, 6 modules"),
        ("soak/soak-10k.toml", "ok: 1 templates, 10000 devices, 0 modules"),
    ] {
        let (code, out, err) = fleetsim(&["check", "--config", config]);
        assert_eq!((code, out.trim()), (0, want), "{config}: {err}");
    }
}

#[test]
fn broken_scenarios_report_every_error_with_positions_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.toml");
    let b = dir.path().join("b.toml");
    std::fs::write(&a, "[[devices]]\ncount = 0\nid = \"x-{n}\"\ntransport = \"udp\"\n[devices.telemetry]\ninterval = \"fast\"\nfields = { t = 1 }\n").unwrap();
    std::fs::write(
        &b,
        "[[devices]]\nid = \"y-{m}\"\n[[devices.writable]]\nname = \"w\"\nmin = 5\nmax = 1\nbroken = [\n",
    )
    .unwrap();
    let (code, _, err) = fleetsim(&["check", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    for (file, line, field) in [
        ("a.toml", 2, "devices[0].count"),
        ("a.toml", 4, "devices[0].transport"),
        ("a.toml", 6, "devices[0].telemetry.interval"),
        ("b.toml", 2, "devices[0].id"),
        ("b.toml", 5, "devices[0].writable[0].min"),
    ] {
        let prefix = format!("{}:{line}:", dir.path().join(file).display());
        assert!(
            lines.iter().any(|l| l.starts_with(&prefix) && l.contains(&format!(": {field}: "))),
            "no {file}:{line} {field} in:\n{err}"
        );
    }
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("{}:7:", b.display()))),
        "the syntax error is located too:\n{err}"
    );
}

#[test]
fn a_bad_daemon_config_stops_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "scenarios = [\"missing/*.toml\"]\n[hub]\nmode = \"cloud\"\n[metrics]\naddr = \"not-an-address\"\n",
    )
    .unwrap();
    let (code, out, err) = fleetsim(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 64, "{out}{err}");
    assert_eq!(err.lines().count(), 3, "one line per problem:\n{err}");
    assert!(err.contains("bad.toml:3:8: hub.mode: expected one of \"embedded\", \"external\", \"azure\""), "{err}");
    assert!(!dir.path().join(".fleetsim").exists(), "nothing was started");
    let (code, _, err) = fleetsim(&["run", "--config", "config.example.toml", "--shard", "4/4"]);
    assert_eq!(code, 64, "{err}");
}
