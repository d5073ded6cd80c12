//! `reapi_resource`: see `sluice::fuzzing::check_reapi_resource` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_reapi_resource(data));
