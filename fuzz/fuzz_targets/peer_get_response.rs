//! `peer_get_response`: see `sluice::fuzzing::check_peer_get_response` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_peer_get_response(data));
