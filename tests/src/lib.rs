//! confroute's test support: the harness that starts real servers, the ARI simulator,
//! and the load and benchmark tools.

pub mod ari_sim;
pub mod chaos;
pub mod dev;
pub mod fixtures;
pub mod fuzz_checks;
pub mod harness;
pub mod soak;
