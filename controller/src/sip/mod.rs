//! The SIP redirect server: parsing, answering and the UDP/TCP transports.

pub mod handler;
pub mod message;
pub mod pktinfo;
pub mod reconnect;
pub mod response;
pub mod server;
pub mod transactions;
