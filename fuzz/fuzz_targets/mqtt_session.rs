#![no_main]
//! See `fleetsim::fuzzing::mqtt_session`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetsim::fuzzing::mqtt_session(data));
