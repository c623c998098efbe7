#![no_main]
//! See `fleetsim::fuzzing::scenario`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetsim::fuzzing::scenario(data));
