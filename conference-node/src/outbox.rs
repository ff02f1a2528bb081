//! The node's one ordered publisher on the command bus: command answers, dial-out status
//! notifications and conference events are queued by whoever produces them (conference
//! actors, the command intake, the dial-out tracker) and published by one task, in two
//! lanes each in the order it was queued: command traffic (answers and notifications)
//! first, then events, up to 64 messages in one round trip (a pipeline on one connection,
//! which keeps their order). So a command's answer always precedes its notifications and is not
//! held behind a burst of events (a large conference ending) past its sender's deadline,
//! each conference's events go out in `seq` order, and no actor ever waits for Redis: when
//! Redis is slow the queues fill and, past their bound, messages are dropped and counted
//! (`confroute_node_bus_dropped_total`) rather than stalling calls. A conference whose
//! events were dropped, or that Redis did not take, gets a notice ([`EVENTS_LOST`]) once
//! Redis takes messages again, before its later events, so its subscribers are told to
//! re-read it rather than miss an `end` without a trace.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use confroute_shared::bus::{Bus, BusError, Event, Reply, EVENTS_LOST};

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
    /// Events queued before the last one lost: the notice goes out once the publisher has
    /// taken that many, after the conference's events that came before the loss.
    due_after: u64,
}

/// Conferences with events lost since their last notice went out.
type MissedEvents = Arc<Mutex<BTreeMap<String, Missed>>>;

/// Notes that `ev` never reached Redis, with `due_after` events queued before it.
fn note_missed(missed: &MissedEvents, ev: &Event, due_after: u64) {
    let mut m = lock(missed);
    let entry = m.entry(ev.conference.clone()).or_insert(Missed {
        node: ev.node.clone(),
        epoch: ev.epoch,
        count: 0,
        due_after,
    });
    entry.epoch = entry.epoch.max(ev.epoch);
    entry.count += 1;
    entry.due_after = entry.due_after.max(due_after);
}

/// Whether a notice is due now that the publisher has taken `popped` events.
fn notice_due(missed: &MissedEvents, popped: u64) -> bool {
    lock(missed).values().any(|m| m.due_after <= popped)
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
    /// Events handed to the publisher's queue so far.
    events_queued: AtomicU64,
    /// Events the publisher has taken from its queue so far.
    events_taken: AtomicU64,
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

    /// Waits until everything queued so far is published, and every notice of lost events
    /// too, at most `bound`; how many messages and notices were still unsent then. A
    /// stopping node's last events (the `leave` and `end` of the conferences it ended) are
    /// queued just before it exits.
    pub async fn flush(&self, bound: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + bound;
        let left = || self.unsent.count.load(Ordering::SeqCst) + lock(&self.missed).len();
        loop {
            let drained = self.unsent.drained.notified();
            if left() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return left();
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
        let event = matches!(o, Outgoing::Event(_));
        match lane.try_send(o) {
            Ok(()) if event => {
                self.unsent.events_queued.fetch_add(1, Ordering::SeqCst);
            }
            Ok(()) => {}
            Err(e) => self.dropped(e),
        }
    }

    /// A message the full (or closed) queue did not take: counted, and an event noted for
    /// its conference's notice.
    fn dropped(&self, e: mpsc::error::TrySendError<Outgoing>) {
        self.unsent.count.fetch_sub(1, Ordering::SeqCst);
        let o = match e {
            mpsc::error::TrySendError::Full(o) | mpsc::error::TrySendError::Closed(o) => o,
        };
        if let Outgoing::Event(ev) = &o {
            let before = self.unsent.events_queued.load(Ordering::SeqCst);
            note_missed(&self.missed, ev, before);
        }
        self.metrics
            .bus_dropped
            .with_label_values(&[o.kind()])
            .inc();
        tracing::warn!(kind = o.kind(), "bus publisher behind; dropping a message");
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
    // Whether Redis took the last batch: notices wait for it, so an outage does not
    // double every message's wait.
    let mut took = true;
    loop {
        let taken = unsent.events_taken.load(Ordering::SeqCst);
        if took && notice_due(&missed, taken) {
            // Redis not taking it is found again by the batch that follows.
            send_notices(&bus, &missed, taken).await;
            if unsent.count.load(Ordering::SeqCst) == 0 {
                unsent.drained.notify_waiters();
            }
        }
        let owed = notice_due(&missed, taken);
        let first = tokio::select! {
            biased;
            Some(o) = commands.recv() => o,
            Some(o) = events.recv() => o,
            _ = tokio::time::sleep(NOTICE_RETRY), if owed => {
                took = true;
                continue;
            }
            else => break,
        };
        // Notices still owed (Redis did not take the last batch, or them) ride first in this
        // batch's round trip: nothing queued after a loss goes out before its notice.
        let notices = take_due(&missed, taken);
        let batch = fill_batch(
            first,
            &mut commands,
            &mut events,
            events_before_next_notice(&missed, taken),
        );
        let n = batch.len();
        let events_in = batch
            .iter()
            .filter(|o| matches!(o, Outgoing::Event(_)))
            .count() as u64;
        let taken = unsent.events_taken.fetch_add(events_in, Ordering::SeqCst) + events_in;
        took = publish_batch(&bus, notices, batch, &missed, &metrics, taken).await;
        if unsent.count.fetch_sub(n, Ordering::SeqCst) == n {
            unsent.drained.notify_waiters();
        }
    }
}

/// Messages published in one round trip, at most: one PUBLISH per round trip would cap a
/// node at one message per round trip to Redis (a thousand a second at 1 ms), and a large
/// conference's burst of events would hold every other conference's up that long.
const BATCH: usize = 64;

/// `first` and what else is queued, up to [`BATCH`]: answers and notifications first (a
/// command's sender waits on its deadline), but events keep half of it, so a steady flow of
/// answers does not hold events back. Each lane keeps its order. At most `events_room`
/// events in all, so that a notice falling due within the batch goes out before the events
/// queued after its loss.
fn fill_batch(
    first: Outgoing,
    commands: &mut mpsc::Receiver<Outgoing>,
    events: &mut mpsc::Receiver<Outgoing>,
    events_room: u64,
) -> Vec<Outgoing> {
    let mut events_in = u64::from(matches!(first, Outgoing::Event(_)));
    let mut batch = vec![first];
    while batch.len() < BATCH / 2 {
        match commands.try_recv() {
            Ok(o) => batch.push(o),
            Err(_) => break,
        }
    }
    while batch.len() < BATCH && events_in < events_room {
        match events.try_recv() {
            Ok(o) => {
                batch.push(o);
                events_in += 1;
            }
            Err(_) => break,
        }
    }
    while batch.len() < BATCH {
        match commands.try_recv() {
            Ok(o) => batch.push(o),
            Err(_) => break,
        }
    }
    batch
}

/// Publishes `batch` in one round trip; false when Redis did not take it. Its events are
/// then noted as lost (a notice follows); its answers and notifications are lost with a
/// warning (the controller reports the command unanswered at its deadline).
async fn publish_batch(
    bus: &Bus,
    notices: Vec<(String, Missed)>,
    batch: Vec<Outgoing>,
    missed: &MissedEvents,
    metrics: &Metrics,
    taken: u64,
) -> bool {
    let mut encoded = Vec::with_capacity(notices.len() + batch.len());
    let mut sent_notices = Vec::with_capacity(notices.len());
    for (conference, m) in notices {
        match Bus::encode_event(&notice(&conference, &m)) {
            Ok(e) => {
                encoded.push(e);
                sent_notices.push((conference, m));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a notice of lost events");
                give_back(missed, conference, m);
            }
        }
    }
    let mut kept = Vec::with_capacity(batch.len());
    for o in batch {
        match encode(&o) {
            Ok(m) => {
                encoded.push(m);
                kept.push(o);
            }
            Err(e) => tracing::warn!(kind = o.kind(), error = %e, "dropping a bus message"),
        }
    }
    if encoded.is_empty() {
        return true;
    }
    match bus.publish_batch(&encoded).await {
        Ok(()) => {
            for (conference, m) in &sent_notices {
                tracing::info!(conference = %conference, count = m.count, "told subscribers that events of the conference were lost");
            }
            true
        }
        Err(e) => {
            for (conference, m) in sent_notices {
                give_back(missed, conference, m);
            }
            let mut answers = 0;
            for o in &kept {
                metrics.bus_dropped.with_label_values(&[o.kind()]).inc();
                match o {
                    Outgoing::Event(ev) => note_missed(missed, ev, taken),
                    _ => answers += 1,
                }
            }
            if answers > 0 {
                tracing::warn!(error = %e, answers, "cannot send command answers or notifications");
            } else {
                tracing::debug!(error = %e, events = kept.len(), "cannot publish conference events");
            }
            false
        }
    }
}

/// The channel and payload of one message.
fn encode(o: &Outgoing) -> Result<(String, Vec<u8>), String> {
    match o {
        Outgoing::Reply {
            id,
            reply_to,
            result,
        } => {
            let reply = match result {
                Ok(result) => Reply::Result {
                    id: id.clone(),
                    result: result.clone(),
                },
                Err(error) => Reply::Error {
                    id: id.clone(),
                    error: error.clone(),
                },
            };
            Bus::encode_reply(reply_to, &reply)
        }
        Outgoing::Notify {
            id,
            reply_to,
            params,
            last,
        } => Bus::encode_reply(
            reply_to,
            &Reply::Notify {
                id: id.clone(),
                params: params.clone(),
                last: *last,
            },
        ),
        Outgoing::Event(ev) => Bus::encode_event(ev),
    }
}

/// The notice telling a conference's subscribers that `m`'s events were lost.
fn notice(conference: &str, m: &Missed) -> Event {
    Event {
        conference: conference.to_string(),
        node: m.node.clone(),
        epoch: m.epoch,
        seq: 0,
        event: EVENTS_LOST.to_string(),
        data: serde_json::json!({ "count": m.count }),
    }
}

/// Takes the notices due once `taken` events have been taken from the queue.
fn take_due(missed: &MissedEvents, taken: u64) -> Vec<(String, Missed)> {
    let mut all = lock(missed);
    let due: Vec<String> = all
        .iter()
        .filter(|(_, m)| m.due_after <= taken)
        .map(|(c, _)| c.clone())
        .collect();
    due.into_iter()
        .filter_map(|c| all.remove(&c).map(|m| (c, m)))
        .collect()
}

/// Puts back a notice Redis did not take, with whatever was lost meanwhile.
fn give_back(missed: &MissedEvents, conference: String, m: Missed) {
    let mut all = lock(missed);
    let entry = all.entry(conference).or_insert(Missed {
        node: m.node,
        epoch: m.epoch,
        count: 0,
        due_after: m.due_after,
    });
    entry.epoch = entry.epoch.max(m.epoch);
    entry.count += m.count;
    entry.due_after = entry.due_after.max(m.due_after);
}

/// How many more events may be taken from the queue before a notice not yet due falls due.
fn events_before_next_notice(missed: &MissedEvents, taken: u64) -> u64 {
    lock(missed)
        .values()
        .filter(|m| m.due_after > taken)
        .map(|m| m.due_after - taken)
        .min()
        .unwrap_or(u64::MAX)
}

/// Publishes a notice for each conference whose lost events are due (`taken` events taken
/// from the queue), up to the first Redis does not take (that one and the rest wait for the
/// next try).
async fn send_notices(bus: &Bus, missed: &MissedEvents, taken: u64) {
    let mut due = take_due(missed, taken).into_iter();
    while let Some((conference, m)) = due.next() {
        if !bus.publish_event(&notice(&conference, &m)).await {
            give_back(missed, conference, m);
            for (conference, m) in due {
                give_back(missed, conference, m);
            }
            return;
        }
        tracing::info!(conference = %conference, count = m.count, "told subscribers that events of the conference were lost");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(conference: &str, seq: u64) -> Event {
        Event {
            conference: conference.to_string(),
            node: "node-a".to_string(),
            epoch: 3,
            seq,
            event: "leave".to_string(),
            data: Value::Null,
        }
    }

    /// A notice waits until the events queued before the loss have been taken from the
    /// queue: subscribers re-read the conference after those, not before.
    #[test]
    fn a_notice_is_due_after_the_events_queued_before_the_loss() {
        let missed = MissedEvents::default();
        assert!(!notice_due(&missed, 0));
        note_missed(&missed, &event("a", 100), 60);
        assert!(!notice_due(&missed, 59));
        assert!(notice_due(&missed, 60));
        // A later loss of the same conference moves the notice after its own predecessors
        // and counts both.
        note_missed(&missed, &event("a", 140), 90);
        assert!(!notice_due(&missed, 60));
        assert!(notice_due(&missed, 90));
        let m = lock(&missed);
        let a = m.get("a").expect("noted");
        assert_eq!((a.count, a.due_after, a.epoch), (2, 90, 3));
    }

    /// A batch takes no events past the point where a notice falls due, and a notice taken
    /// for a batch Redis did not take is owed again.
    #[test]
    fn a_batch_stops_where_a_notice_falls_due() {
        let missed = MissedEvents::default();
        assert_eq!(events_before_next_notice(&missed, 0), u64::MAX);
        note_missed(&missed, &event("a", 5), 3);
        assert_eq!(events_before_next_notice(&missed, 1), 2);
        let (_ctx, mut commands) = mpsc::channel(8);
        let (etx, mut events) = mpsc::channel(8);
        for seq in 2..6 {
            etx.try_send(Outgoing::Event(event("b", seq)))
                .expect("room");
        }
        let batch = fill_batch(
            Outgoing::Event(event("b", 1)),
            &mut commands,
            &mut events,
            2,
        );
        assert_eq!(batch.len(), 2);
        assert!(take_due(&missed, 2).is_empty());
        let due = take_due(&missed, 3);
        assert_eq!(due.len(), 1);
        assert!(!notice_due(&missed, 100));
        for (conference, m) in due {
            give_back(&missed, conference, m);
        }
        assert!(notice_due(&missed, 3));
        assert_eq!(lock(&missed).get("a").map(|m| m.count), Some(1));
    }
}
