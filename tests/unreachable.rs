//! A fleet aimed at "Azure" that cannot get there must say why, at the default log level: the
//! start banner names the target (never a key), and the first failure of each kind per template
//! is logged at WARN with its cause chain and what to check. Azure itself is out of reach, so
//! loopback stands in for each way it fails: a closed port, a server whose certificate the fleet
//! does not trust (the real emulator without its CA), and DPS refusing the key (the real emulator
//! with a wrong group key).

use fleetsim_testkit as common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::TestHub;

/// The fleet binary with `config`, its stdout and stderr lines arriving on a channel.
struct Fleet {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Fleet {
    fn start(dir: &std::path::Path, hub_table: &str) -> Fleet {
        std::fs::write(dir.join("s.toml"), "[[devices]]\nname = \"sensors\"\nid = \"s-{n}\"\ncount = 2\n").unwrap();
        let config = format!(
            "scenarios = [\"s.toml\"]\n[metrics]\nenabled = false\n[device]\nbackoff_base = \"200ms\"\nbackoff_cap = \"1s\"\n{hub_table}"
        );
        std::fs::write(dir.join("c.toml"), config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleetsim"))
            .args(["run", "--config", dir.join("c.toml").to_str().unwrap()])
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Fleet { child, lines, seen: Vec::new() }
    }

    /// The first line (so far or within a bound) containing every one of `parts`.
    fn wait_for(&mut self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.seen.iter().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("no line with {parts:?} in:\n{}", self.seen.join("\n")),
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const WRONG_KEY: &str = "d3JvbmctZ3JvdXAta2V5LXdyb25nLWdyb3VwLWtleQ==";

#[test]
fn a_closed_port_is_named_with_its_cause() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start(
        dir.path(),
        &format!(
            "[hub]\nmode = \"azure\"\ndps_host = \"127.0.0.1\"\nhttps_port = {port}\nid_scope = \"0ne00000001\"\ngroup_key = \"{WRONG_KEY}\"\n"
        ),
    );
    let banner = fleet.wait_for(&["target:", "Azure"]);
    assert!(banner.contains(&format!("DPS 127.0.0.1:{port} id scope 0ne00000001")), "{banner}");
    let warn = fleet.wait_for(&["WARN", "tcp_refused"]);
    for want in ["template=\"sensors\"", "Connection refused", &format!("127.0.0.1:{port}"), "check="] {
        assert!(warn.contains(want), "no {want:?} in {warn}");
    }
    // The progress line counts failures by kind while ramping.
    fleet.wait_for(&["ramping", "failures=tcp_refused="]);
    assert!(fleet.seen.iter().all(|l| !l.contains(WRONG_KEY)), "the key leaked:\n{}", fleet.seen.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_and_a_refused_key_are_told_apart() {
    let hub = TestHub::start().await;
    let info = hub.info.clone();
    let (https_port, mqtt_port, scope) = (info.https_port, info.mqtt_port, info.id_scope.clone());
    let table = move |extra: &str| {
        format!(
            "[hub]\nmode = \"azure\"\ndps_host = \"localhost\"\nhttps_port = {https_port}\nmqtt_port = {mqtt_port}\nid_scope = \"{scope}\"\ngroup_key = \"{WRONG_KEY}\"\n{extra}"
        )
    };
    let (untrusted, refused) = tokio::task::spawn_blocking(move || {
        // No ca_file: the public roots, which do not include the emulator's CA.
        let dir = tempfile::tempdir().unwrap();
        let mut fleet = Fleet::start(dir.path(), &table(""));
        let untrusted = fleet.wait_for(&["WARN", "tls_certificate"]);
        drop(fleet);
        // The CA trusted, but a key the group does not have: DPS answers 401, and says so.
        let dir = tempfile::tempdir().unwrap();
        let ca = info.ca_file.display().to_string();
        let mut fleet = Fleet::start(dir.path(), &table(&format!("ca_file = \"{ca}\"\n")));
        let refused = fleet.wait_for(&["WARN", "dps_401"]);
        (untrusted, refused)
    })
    .await
    .unwrap();
    assert!(untrusted.contains("certificate") && untrusted.contains("hub.ca_file"), "{untrusted}");
    assert!(refused.contains("401") && refused.contains("hub.group_key"), "{refused}");
    assert!(
        refused.contains("/registrations/s-1/register") || refused.contains("/registrations/s-2/register"),
        "{refused}"
    );
}
