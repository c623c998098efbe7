//! Replays every input kept in `fuzz/corpus/` (the seeds, what fuzzing found interesting, and the
//! inputs of crashes since fixed) through the fuzz targets' entry points, so a regression fails
//! the ordinary test run without a fuzzer installed.

fn replay(target: &str, run: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!("{target}: {} fails", path.display());
        }
        n += 1;
    }
    assert!(n > 0, "{target}: the corpus is empty");
}

#[test]
fn topics_corpus() {
    replay("topics", fleetsim::fuzzing::topics);
}

#[test]
fn credentials_corpus() {
    replay("credentials", fleetsim::fuzzing::credentials);
}

#[test]
fn scenario_corpus() {
    replay("scenario", fleetsim::fuzzing::scenario);
}

#[test]
fn mqtt_session_corpus() {
    replay("mqtt_session", fleetsim::fuzzing::mqtt_session);
    assert!(fleetsim::fuzzing::mqtt_telemetry_received() > 0, "the hub seed got through CONNECT to telemetry");
}

#[test]
fn rest_corpus() {
    replay("rest", fleetsim::fuzzing::rest);
}

#[test]
fn device_rest_corpus() {
    replay("device_rest", fleetsim::fuzzing::device_rest);
}
