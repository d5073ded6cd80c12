//! `config`: see `sluice::fuzzing::check_config` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_config(data));
