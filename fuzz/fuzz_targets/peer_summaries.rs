//! `peer_summaries`: see `sluice::fuzzing::check_peer_summaries` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::check_peer_summaries(data));
