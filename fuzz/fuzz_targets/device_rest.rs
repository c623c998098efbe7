#![no_main]
//! See `fleetsim::fuzzing::device_rest`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetsim::fuzzing::device_rest(data));
