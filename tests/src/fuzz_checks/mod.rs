//! The checks behind the fuzz targets (`fuzz/`), callable without libFuzzer so the test
//! suite runs the committed seeds and crash inputs through exactly the same code.
//!
//! Each check takes raw fuzz input, feeds it to one decoder of the product and asserts
//! properties of the result; a panic (the product's own or a failed assertion) is a finding.
//! Checks never touch the network: the SIP handler routes through a store that cannot
//! connect (a Unix socket path that does not exist), so every routing decision is "Redis
//! unavailable".

mod ari;
mod config;
mod name;
mod rpc;
mod sip;

pub use ari::ari_event;
pub use config::config_toml;
pub use name::conference_name;
pub use rpc::jsonrpc_request;
pub use sip::sip_message;

/// True for an absolute http(s) URL with a host, as a webhook client would read it.
fn http_url(s: &str) -> bool {
    reqwest::Url::parse(s)
        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
}

/// A fuzz target's name (also its seed directory under `fuzz/seeds/`) and check.
pub type Target = (&'static str, fn(&[u8]));

/// Every fuzz target, by the name of its binary in `fuzz/fuzz_targets/`.
pub const TARGETS: &[Target] = &[
    ("sip_message", sip_message),
    ("conference_name", conference_name),
    ("config_toml", config_toml),
    ("jsonrpc_request", jsonrpc_request),
    ("ari_event", ari_event),
];
