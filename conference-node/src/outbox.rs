//! The node's one ordered publisher on the command bus: command answers, dial-out status
//! notifications and conference events are queued by whoever produces them (conference
//! actors, the command intake, the dial-out tracker) and published by one task, in two
//! lanes each in the order it was queued: command traffic (answers and notifications)
//! first, then events. So a command's answer always precedes its notifications and is not
//! held behind a burst of events (a large conference ending) past its sender's deadline,
//! each conference's events go out in `seq` order, and no actor ever waits for Redis: when
//! Redis is slow the queues fill and, past their bound, messages are dropped and counted
//! (`confroute_node_bus_dropped_total`) rather than stalling calls. A conference whose
//! events were dropped, or that Redis did not take, gets a notice ([`EVENTS_LOST`]) once
//! Redis takes messages again, before its later events, so its subscribers are told to
//! re-read it rather than miss an `end` without a trace.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use confroute_shared::bus::{Bus, BusError, Command, Event, EVENTS_LOST};

use crate::metrics::Metrics;
use crate::node::lock;

/// How often a notice of lost events is tried again while nothing else goes out.
const NOTICE_RETRY: Duration = Duration::from_secs(1);

/// Events of one conference life that never reached Redis: the notice to publish for them.
#[derive(Debug)]
struct Missed {
    node: String,
    epoch: u64,
    count: u64,
}

/// Conferences with events lost since their last notice went out.
type MissedEvents = Arc<Mutex<BTreeMap<String, Missed>>>;

/// Notes that `ev` never reached Redis.
fn note_missed(missed: &MissedEvents, ev: &Event) {
    let mut m = lock(missed);
    let entry = m.entry(ev.conference.clone()).or_insert(Missed {
        node: ev.node.clone(),
        epoch: ev.epoch,
        count: 0,
    });
    entry.epoch = entry.epoch.max(ev.epoch);
    entry.count += 1;
}

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
    /// Answers and notifications.
    commands: mpsc::Sender<Outgoing>,
    /// Events.
    tx: mpsc::Sender<Outgoing>,
    bus: Bus,
    metrics: Metrics,
    unsent: Arc<Unsent>,
    missed: MissedEvents,
}

/// Messages queued and not yet published, for [`Outbox::flush`].
#[derive(Default)]
struct Unsent {
    count: AtomicUsize,
    drained: Notify,
}

impl Outbox {
    /// Whether the command subscription is up (commands can be heard).
    pub fn subscribed(&self) -> bool {
        self.bus.connected()
    }

    /// Starts the publisher task on `bus`.
    pub fn start(bus: Bus, metrics: Metrics) -> (Outbox, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (commands, commands_rx) = mpsc::channel(QUEUE);
        let unsent = Arc::new(Unsent::default());
        let missed = MissedEvents::default();
        let task = tokio::spawn(publish(
            bus.clone(),
            commands_rx,
            rx,
            unsent.clone(),
            missed.clone(),
            metrics.clone(),
        ));
        (
            Outbox {
                commands,
                tx,
                bus,
                metrics,
                unsent,
                missed,
            },
            task,
        )
    }

    /// Waits until everything queued so far is published, at most `bound`; how many
    /// messages were still unsent then. A stopping node's last events (the `leave` and
    /// `end` of the conferences it ended) are queued just before it exits.
    pub async fn flush(&self, bound: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let drained = self.unsent.drained.notified();
            let left = self.unsent.count.load(Ordering::SeqCst);
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return self.unsent.count.load(Ordering::SeqCst);
            }
        }
    }

    /// The bus the messages go out on.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    fn queue(&self, o: Outgoing) {
        // Counted before it can be published, so the publisher never counts below zero.
        self.unsent.count.fetch_add(1, Ordering::SeqCst);
        let lane = match o {
            Outgoing::Event(_) => &self.tx,
            Outgoing::Reply { .. } | Outgoing::Notify { .. } => &self.commands,
        };
        if let Err(e) = lane.try_send(o) {
            self.unsent.count.fetch_sub(1, Ordering::SeqCst);
            let o = match e {
                mpsc::error::TrySendError::Full(o) | mpsc::error::TrySendError::Closed(o) => o,
            };
            if let Outgoing::Event(ev) = &o {
                note_missed(&self.missed, ev);
            }
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

async fn publish(
    bus: Bus,
    mut commands: mpsc::Receiver<Outgoing>,
    mut events: mpsc::Receiver<Outgoing>,
    unsent: Arc<Unsent>,
    missed: MissedEvents,
    metrics: Metrics,
) {
    // Whether Redis took the last message: notices wait for it, so an outage does not
    // double every message's wait.
    let mut took = true;
    loop {
        if took && !lock(&missed).is_empty() {
            send_notices(&bus, &missed).await;
        }
        let owed = !lock(&missed).is_empty();
        let o = tokio::select! {
            biased;
            Some(o) = commands.recv() => o,
            Some(o) = events.recv() => o,
            _ = tokio::time::sleep(NOTICE_RETRY), if owed => {
                took = true;
                continue;
            }
            else => break,
        };
        took = match o {
            Outgoing::Event(ev) => {
                let sent = bus.publish_event(&ev).await;
                if !sent {
                    note_missed(&missed, &ev);
                    metrics.bus_dropped.with_label_values(&["event"]).inc();
                }
                sent
            }
            other => {
                publish_one(&bus, other).await;
                true
            }
        };
        if unsent.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            unsent.drained.notify_waiters();
        }
    }
}

/// Publishes a notice for each conference with lost events, up to the first Redis does not
/// take (that one and the rest wait for the next try).
async fn send_notices(bus: &Bus, missed: &MissedEvents) {
    let owed: Vec<String> = lock(missed).keys().cloned().collect();
    for conference in owed {
        let Some(m) = lock(missed).remove(&conference) else {
            continue;
        };
        let notice = Event {
            conference: conference.clone(),
            node: m.node.clone(),
            epoch: m.epoch,
            seq: 0,
            event: EVENTS_LOST.to_string(),
            data: serde_json::json!({ "count": m.count }),
        };
        if !bus.publish_event(&notice).await {
            // Back, with whatever was lost meanwhile.
            let mut all = lock(missed);
            let entry = all.entry(conference).or_insert(Missed {
                node: m.node,
                epoch: m.epoch,
                count: 0,
            });
            entry.count += m.count;
            return;
        }
        tracing::info!(conference = %conference, count = m.count, "told subscribers that events of the conference were lost");
    }
}

/// Publishes a command answer or notification (events go through [`publish`]).
async fn publish_one(bus: &Bus, o: Outgoing) {
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
        Outgoing::Event(ev) => {
            bus.publish_event(&ev).await;
        }
    }
}
