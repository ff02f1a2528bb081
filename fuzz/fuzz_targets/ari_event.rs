//! Fuzz target: the ARI event decoder and what the agent does with a StasisStart.
//! The checks are `confroute_tests::fuzz_checks::ari_event`, shared with the test suite.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| confroute_tests::fuzz_checks::ari_event(data));
