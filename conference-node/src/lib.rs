//! confroute conference-node agent: hosts conferences on one Asterisk through ARI.
//!
//! Follow one call: the events WebSocket ([`ari::ws`]) decodes a `StasisStart`
//! ([`ari::events`]) and hands it to [`node::Node::dispatch`]; [`join::prepare`] works out the
//! conference name and the caller's [`options`]; the conference's actor in [`conference`]
//! checks ownership in Redis (fencing), creates the bridge, answers and adds the channel
//! through [`ari::client`]. [`heartbeat`] keeps the node and its claims alive,
//! [`reconcile`] repairs drift after reconnects and restarts, [`lifecycle`] drains.

#![warn(missing_docs)]

pub mod app;
pub mod ari;
pub mod conference;
pub mod config;
pub mod heartbeat;
pub mod http;
pub mod join;
pub mod lifecycle;
pub mod metrics;
pub mod node;
pub mod options;
pub mod reconcile;
pub mod webhook;
