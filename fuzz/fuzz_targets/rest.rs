#![no_main]
//! See `fleetsim::fuzzing::rest`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetsim::fuzzing::rest(data));
