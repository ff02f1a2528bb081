//! Fuzz target: the config loader: TOML file plus CONFROUTE_* variables, controller and node.
//! The checks are `confroute_tests::fuzz_checks::config_toml`, shared with the test suite.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| confroute_tests::fuzz_checks::config_toml(data));
