//! Fuzz target: the SIP packet: TCP framing, parser, URIs, responses and the whole handler.
//! The checks are `confroute_tests::fuzz_checks::sip_message`, shared with the test suite.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| confroute_tests::fuzz_checks::sip_message(data));
