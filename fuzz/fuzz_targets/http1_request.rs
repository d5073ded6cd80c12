//! `http1_request`: see `sluice::fuzzing::check_http1_request` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_http1_request(data));
