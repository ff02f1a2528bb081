//! Fuzz target: the conference-name validator.
//! The checks are `confroute_tests::fuzz_checks::conference_name`, shared with the test suite.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| confroute_tests::fuzz_checks::conference_name(data));
