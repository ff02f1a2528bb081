//! confroute controller: decides which conference node hosts each conference and answers
//! SIP INVITEs with a redirect to it.

pub mod config;
