//! confroute conference-node agent: hosts conferences on one Asterisk through ARI.

pub mod config;
