//! Fuzz target: the JSON-RPC call-control frame decoder.
//! The checks are `confroute_tests::fuzz_checks::jsonrpc_request`, shared with the test suite.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| confroute_tests::fuzz_checks::jsonrpc_request(data));
