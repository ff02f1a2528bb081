//! Shared pieces of confroute: configuration, conference names, the Redis data model and its
//! atomic scripts, node placement, and telemetry setup.

pub mod bus;
pub mod config;
pub mod dialout;
pub mod http_serve;
pub mod media;
pub mod name;
pub mod options;
pub mod origin;
pub mod placement;
pub mod runtime_metrics;
pub mod secret;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod types;
