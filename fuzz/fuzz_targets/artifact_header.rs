//! `artifact_header`: see `sluice::fuzzing::check_artifact_header` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_artifact_header(data));
