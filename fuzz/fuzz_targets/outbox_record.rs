//! `outbox_record`: see `sluice::fuzzing::check_outbox_record` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_outbox_record(data));
