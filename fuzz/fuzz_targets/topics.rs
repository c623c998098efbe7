#![no_main]
//! See `fleetsim::fuzzing::topics`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetsim::fuzzing::topics(data));
