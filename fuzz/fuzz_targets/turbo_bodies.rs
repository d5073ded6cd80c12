//! `turbo_bodies`: see `sluice::fuzzing::check_turbo_bodies` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_turbo_bodies(data));
