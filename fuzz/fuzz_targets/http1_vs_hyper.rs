//! `http1_vs_hyper`: see `sluice::fuzzing::check_http1_vs_hyper` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_http1_vs_hyper(data));
