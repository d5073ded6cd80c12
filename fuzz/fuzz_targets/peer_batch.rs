//! `peer_batch`: see `sluice::fuzzing::check_peer_batch` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_peer_batch(data));
