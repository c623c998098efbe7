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
    assert_eq!(out.trim(), "ok: 5 templates, 17 devices, 6 modules");
    for (config, want) in [
        ("soak/soak.toml", "ok: 6 templates, 57 devices, 6 modules"),
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

/// Issue 10, kind 2: numbers from outside never panic `check` (exit 101); each is refused with the
/// field, the allowed range and its position, exit 64.
#[test]
fn numbers_out_of_range_exit_64_with_the_field_and_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s.toml");
    std::fs::write(
        &s,
        concat!(
            "[[devices]]\nid = \"x-{n}\"\ncount = 2\nfirst = 18446744073709551\n",
            "[[devices.telemetry]]\ninterval = 1e20\njitter = 2\n",
            "fields = { t = { kind = \"gaussian\", mean = 1, stddev = -3, decimals = 99 }, ",
            "u = { kind = \"uniform\", min = -1e308, max = 1e308 }, ",
            "g = { kind = \"gaussian\", mean = 0, stddev = 1, min = 5, max = 1 } }\n",
            "[[devices.telemetry]]\ninterval = \"5124095576030432h\"\nfields = { a = 1 }\n",
            "[[devices.commands]]\nname = \"c\"\nstatus = 70000\ndelay = \"99999999h\"\n",
        ),
    )
    .unwrap();
    let (code, _, err) = fleetsim(&["check", s.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    for want in [
        ":4:9: devices[0].first: must be a whole number from 0 to 1000000000000",
        ":6:12: devices[0].telemetry[0].interval: must be between 1ms and 30d",
        ":7:10: devices[0].telemetry[0].jitter: must be a number from 0 to 1",
        "stddev: must not be negative",
        "decimals: must be a whole number from 0 to 15",
        ".u.min: must be a number from -1000000000000000 to 1000000000000000",
        "min (5) is above max (1)",
        ":10:12: devices[0].telemetry[1].interval: must be between 1ms and 30d",
        "devices[0].commands[0].status: must be a whole number from 100 to 599",
        "devices[0].commands[0].delay: must be between 0ms and 1d",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }

    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        concat!(
            "scenarios = []\n[hub]\nmode = \"azure\"\nid_scope = \"0ne\"\nmqtt_port = 70000\nhttps_port = -1\n",
            "[ramp]\nrate = 1e-300\n[device]\nbackoff_base = \"10s\"\nbackoff_cap = \"1s\"\nkeep_alive = \"2h\"\n",
            "token_ttl = 1e20\nmax_inflight = 70000\n",
        ),
    )
    .unwrap();
    let (code, _, err) = fleetsim(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    for want in [
        ":5:13: hub.mqtt_port: must be a whole number from 1 to 65535",
        ":6:14: hub.https_port: must be a whole number from 1 to 65535",
        ":8:8: ramp.rate: must be a number from 0.001 to 1000000",
        ":11:15: device.backoff_cap: must not be below backoff_base (10s)",
        ":12:14: device.keep_alive: must be between 1s and 1177s",
        ":13:13: device.token_ttl: must be between 60s and 365d",
        ":14:16: device.max_inflight: must be a whole number from 1 to 65535",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    let (code, _, err) = fleetsim(&["run", "--config", "config.example.toml", "--duration", "5124095576030432h"]);
    assert_eq!(code, 64, "{err}");
    let (code, _, err) = fleetsim(&["token", "--ttl", "18446744073709551615"]);
    assert_eq!(code, 2, "clap refuses an out-of-range flag: {err}");
    assert!(err.contains("--ttl"), "{err}");
}

/// Issue 10, kind 3: a file path naming an endless file is read up to a cap, then refused.
#[test]
fn endless_files_are_refused_not_read_forever() {
    let (code, _, err) = fleetsim(&["check", "/dev/zero"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("/dev/zero:1:1: cannot read: is larger than"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "scenarios = [\"/dev/zero\"]\n").unwrap();
    let (code, _, err) = fleetsim(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("is larger than"), "{err}");
    let (code, _, err) = fleetsim(&["hub", "--config", "/dev/zero"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("is larger than"), "{err}");
}

/// Writes `files` (name, text) into a fresh directory.
fn files(list: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in list {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

const ONE_DEVICE: &str = "[[devices]]\nid = \"d-{n}\"\ncount = 2\n";

#[test]
fn check_and_run_refuse_the_same_configs_with_the_same_lines() {
    // Azure without id_scope or group_key: the DPS group template cannot work.
    let dir = files(&[("c.toml", "scenarios = [\"s.toml\"]\n[hub]\nmode = \"azure\"\n"), ("s.toml", ONE_DEVICE)]);
    let cfg = dir.path().join("c.toml");
    let (code, _, check_err) = fleetsim(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 64, "{check_err}");
    let s = dir.path().join("s.toml").display().to_string();
    assert!(
        check_err.contains(&format!(
            "{s}:1:1: provisioning: template \"s\" registers through DPS, which needs hub.id_scope"
        )),
        "{check_err}"
    );
    assert!(check_err.contains("needs hub.group_key"), "{check_err}");
    let (code, _, run_err) = fleetsim(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!((code, run_err.as_str()), (64, check_err.as_str()), "run refuses exactly what check refuses");
}

#[test]
fn check_without_arguments_checks_the_example_config_like_run_reads_it() {
    let (code, out, err) = fleetsim(&["check"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, fleetsim(&["check", "--config", "config.example.toml"]).1);
}

#[test]
fn a_bad_hub_config_exits_64_from_hub_run_and_check_with_positions() {
    let dir = files(&[
        ("h.toml", "hostname = \"a b\"\n[behaviour]\nmax_subscriptions = 0\n"),
        ("c.toml", "scenarios = [\"s.toml\"]\n[hub]\nconfig = \"h.toml\"\n"),
        ("s.toml", ONE_DEVICE),
    ]);
    let h = dir.path().join("h.toml").display().to_string();
    let want = [
        format!("{h}:1:12: hostname `a b` is not a host name"),
        format!("{h}:3:21: behaviour.max_subscriptions must be from 1 to 1000"),
    ];
    let hub_dir = dir.path().join("data");
    let cfg = dir.path().join("c.toml");
    for args in [
        vec!["hub", "--config", &h, "--data-dir", hub_dir.to_str().unwrap()],
        vec!["run", "--config", cfg.to_str().unwrap()],
        vec!["check", "--config", cfg.to_str().unwrap()],
    ] {
        let (code, _, err) = fleetsim(&args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert_eq!(err.lines().collect::<Vec<_>>(), want, "{args:?}");
    }
    assert!(!hub_dir.exists() && !dir.path().join(".fleetsim").exists(), "nothing was started");
    // A syntax error in the hub file is located too.
    std::fs::write(dir.path().join("h.toml"), "[behaviour\n").unwrap();
    let (code, _, err) = fleetsim(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(code == 64 && err.starts_with(&format!("{h}:1:")), "{err}");
}

#[test]
fn every_file_is_checked_even_when_the_config_has_errors_and_problems_come_in_order() {
    let dir = files(&[
        ("c.toml", "scenarios = [\"s.toml\", \"gone/*.toml\"]\n[device]\nbufer = 300\n"),
        (
            "s.toml",
            "[[devices]]\nid = \"d-{n}\"\ncount = 2\n[[devices.writable]]\nname = \"speed\"\ndefault = 50\nmax = 10\n[[devices.writable]]\nname = \"mode\"\ntype = \"string\"\ndefault = 3\n",
        ),
    ]);
    let cfg = dir.path().join("c.toml");
    let (code, _, err) = fleetsim(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    let (c, s) = (cfg.display().to_string(), dir.path().join("s.toml").display().to_string());
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert!(lines[0].starts_with(&format!("{c}:1:13: scenarios: \"gone/*.toml\": cannot list")), "{err}");
    assert!(lines[0].ends_with("no such file or directory"), "no `entity not found`: {err}");
    assert_eq!(lines[1], format!("{c}:3:1: device.bufer: unknown field; did you mean `buffer`?"));
    assert_eq!(lines[2], format!("{s}:6:11: devices[0].writable[0].default: 50 is above max (10)"));
    assert_eq!(lines[3], format!("{s}:11:11: devices[0].writable[1].default: 3 is not of the declared type"));
}

#[test]
fn a_syntax_error_is_not_followed_by_guesses_about_the_shape() {
    let dir = files(&[("s.toml", "[[devices]\nid = \"x-{n}\"\ncount = 0\n")]);
    let s = dir.path().join("s.toml");
    let (code, _, err) = fleetsim(&["check", s.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    assert!(err.starts_with(&format!("{}:1:", s.display())), "{err}");
    assert!(!err.contains("[[devices]] table") && !err.contains("unknown field"), "spurious shape errors:\n{err}");
}

#[test]
fn status_says_clearly_when_no_fleet_answers() {
    // Nothing listens on port 1: refused at once.
    let (code, out, err) = fleetsim(&["status", "--addr", "127.0.0.1:1"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("cannot reach the fleet at http://127.0.0.1:1/api/v1/overview"), "{err}");
    assert!(err.contains("is `fleetsim run` running"), "{err}");
}
