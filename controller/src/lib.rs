//! confroute controller: decides which conference node hosts each conference and answers
//! SIP INVITEs with a redirect to it; serves the HTTP routing and admin API.
//!
//! Follow one call: [`sip::server`] receives the packet, [`sip::handler`] parses it and asks
//! [`router::Router::route`] for a decision (Redis lookup, else an atomic claim with
//! candidates from `shared::placement`), then answers `302` with the node's Contact.

pub mod app;
pub mod config;
pub mod control;
pub mod fanout;
pub mod http;
pub mod metrics;
pub mod router;
pub mod rpc;
pub mod sip;
pub mod throttle;
