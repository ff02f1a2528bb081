//! Asterisk's REST Interface: typed REST calls ([`client`]), typed events ([`events`]) and
//! the events WebSocket with reconnects and pings ([`ws`]).

pub mod client;
pub mod events;
pub mod ws;

pub use client::{AriClient, AriError, AriErrorKind, Originate};
pub use events::{Bridge, Channel, Event};
