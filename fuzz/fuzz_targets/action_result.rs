//! `action_result`: see `sluice::fuzzing::check_action_result` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_action_result(data));
