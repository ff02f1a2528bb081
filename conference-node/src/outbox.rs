//! The node's one ordered publisher on the command bus: command answers, dial-out status
//! notifications and conference events are queued by whoever produces them (conference
//! actors, the command intake, the dial-out tracker) and published by one task in the order
//! they were queued. So a command's answer always precedes its notifications, each
//! conference's events go out in `seq` order, and no actor ever waits for Redis: when Redis
//! is slow the queue fills and, past its bound, messages are dropped and counted
//! (`confroute_node_bus_dropped_total`) rather than stalling calls.

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use confroute_shared::bus::{Bus, BusError, Command, Event};

use crate::metrics::Metrics;

/// Messages waiting for the publisher, at most; past it new ones are dropped.
const QUEUE: usize = 65_536;

/// One message for the bus.
#[derive(Debug)]
enum Outgoing {
    Reply {
        id: String,
        reply_to: String,
        result: Result<Value, BusError>,
    },
    Notify {
        id: String,
        reply_to: String,
        params: Value,
        last: bool,
    },
    Event(Event),
}

impl Outgoing {
    fn kind(&self) -> &'static str {
        match self {
            Outgoing::Reply { .. } => "reply",
            Outgoing::Notify { .. } => "notify",
            Outgoing::Event(_) => "event",
        }
    }
}

/// The queue's sending end; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    bus: Bus,
    metrics: Metrics,
}

impl Outbox {
    /// Whether the command subscription is up (commands can be heard).
    pub fn subscribed(&self) -> bool {
        self.bus.connected()
    }

    /// Starts the publisher task on `bus`.
    pub fn start(bus: Bus, metrics: Metrics) -> (Outbox, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(publish(bus.clone(), rx));
        (Outbox { tx, bus, metrics }, task)
    }

    /// The bus the messages go out on.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    fn queue(&self, o: Outgoing) {
        if let Err(e) = self.tx.try_send(o) {
            let o = match e {
                mpsc::error::TrySendError::Full(o) | mpsc::error::TrySendError::Closed(o) => o,
            };
            self.metrics
                .bus_dropped
                .with_label_values(&[o.kind()])
                .inc();
            tracing::warn!(kind = o.kind(), "bus publisher behind; dropping a message");
        }
    }

    /// Queues the answer to command `id` for the controller `reply_to`.
    pub fn reply(&self, id: &str, reply_to: &str, result: Result<Value, BusError>) {
        self.queue(Outgoing::Reply {
            id: id.to_string(),
            reply_to: reply_to.to_string(),
            result,
        });
    }

    /// Queues a progress notification of command `id`; `last` ends its stream.
    pub fn notify(&self, id: &str, reply_to: &str, params: Value, last: bool) {
        self.queue(Outgoing::Notify {
            id: id.to_string(),
            reply_to: reply_to.to_string(),
            params,
            last,
        });
    }

    /// Queues a conference event.
    pub fn event(&self, event: Event) {
        self.queue(Outgoing::Event(event));
    }
}

async fn publish(bus: Bus, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(o) = rx.recv().await {
        match o {
            Outgoing::Reply {
                id,
                reply_to,
                result,
            } => {
                // `respond` reads only the id and the reply channel of the command.
                let cmd = Command {
                    id,
                    reply_to,
                    method: String::new(),
                    params: Value::Null,
                    deadline_ms: 0,
                    timeout_ms: 0,
                    sent_ms: 0,
                    sent_uncertainty_ms: 0,
                };
                bus.respond(&cmd, result).await;
            }
            Outgoing::Notify {
                id,
                reply_to,
                params,
                last,
            } => bus.notify(&reply_to, &id, params, last).await,
            Outgoing::Event(ev) => bus.publish_event(&ev).await,
        }
    }
}
