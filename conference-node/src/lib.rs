//! confroute conference-node agent: hosts conferences on one Asterisk through ARI.
//!
//! Follow one call: the events WebSocket ([`ari::ws`]) decodes a `StasisStart`
//! ([`ari::events`]) and hands it to [`node::Node::dispatch`]; [`join::prepare`] works out the
//! conference name and the caller's [`options`]; the conference's actor in [`conference`]
//! checks ownership in Redis (fencing), creates the bridge, answers and adds the channel
//! through [`ari::client`]. [`heartbeat`] keeps the node and its claims alive,
//! [`reconcile`] repairs drift after reconnects and restarts, [`lifecycle`] drains.
//!
//! Call control: [`control`] hears the commands controllers send on the bus and hands each
//! to its conference's actor; [`dialout`] calls out into conferences; [`outbox`] publishes
//! answers, dial-out notifications and conference events in order.

#![warn(missing_docs)]

pub mod app;
pub mod ari;
pub mod conference;
pub mod config;
pub mod control;
pub mod dialout;
pub mod heartbeat;
pub mod http;
pub mod join;
pub mod lifecycle;
pub mod metrics;
pub mod node;
pub mod options;
pub mod outbox;
pub mod reconcile;
pub mod webhook;
