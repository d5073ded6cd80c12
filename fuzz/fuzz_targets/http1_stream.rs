//! `http1_stream`: see `sluice::fuzzing::check_http1_stream` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_http1_stream(data));
