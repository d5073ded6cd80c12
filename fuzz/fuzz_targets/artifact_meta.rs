//! `artifact_meta`: see `sluice::fuzzing::check_artifact_meta` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_artifact_meta(data));
