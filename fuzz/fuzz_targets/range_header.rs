//! `range_header`: see `sluice::fuzzing::check_range_header` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_range_header(data));
