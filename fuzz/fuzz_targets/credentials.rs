#![no_main]
//! See `fleetsim::fuzzing::credentials`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetsim::fuzzing::credentials(data));
