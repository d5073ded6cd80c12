//! `chunked`: see `sluice::fuzzing::check_chunked` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_chunked(data));
