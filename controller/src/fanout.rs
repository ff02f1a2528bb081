//! Hands each conference event to the JSON-RPC connections that follow that conference and to
//! no other. One task reads the bus's events and looks their conference up, so a connection
//! costs nothing for the events of conferences it does not follow, and a burst in one
//! conference cannot make a connection that follows another lose events.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use confroute_shared::bus::{Bus, Event};
use tokio::sync::{broadcast, mpsc, Notify};

/// Events queued for one connection; past that, events are counted as lost until the
/// connection has taken what was queued.
const FEED_QUEUE: usize = 4096;

/// The controller's table of which connection follows which conference.
pub struct Fanout {
    table: Mutex<Table>,
    next_id: AtomicU64,
    /// `confroute_rpc_events_lost_total`, by reason.
    lost: prometheus::IntCounterVec,
}

/// `confroute_rpc_events_lost_total` reason of events dropped while the dispatcher fell
/// behind the bus.
pub const DISPATCHER_LAG: &str = "dispatcher_lag";

#[derive(Default)]
struct Table {
    by_conference: HashMap<String, HashMap<u64, Arc<Follower>>>,
    by_follower: HashMap<u64, (Arc<Follower>, HashSet<String>)>,
}

/// One connection's end of the table, shared by the dispatcher and its [`Feed`].
struct Follower {
    tx: mpsc::Sender<Arc<Event>>,
    /// Events dropped since the feed last took the count. While it is not 0 later events
    /// are dropped too, so that the loss is told in its place, after what was queued before.
    missed: AtomicU64,
    wake: Notify,
}

impl Follower {
    fn miss(&self, n: u64) {
        self.missed.fetch_add(n, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// What a connection's [`Feed`] gives next.
#[derive(Debug)]
pub enum Delivery {
    /// An event of a conference the connection follows.
    Event(Arc<Event>),
    /// This many events of followed conferences were dropped here (the connection did not
    /// take them fast enough, or the dispatcher fell behind the bus).
    Lost(u64),
}

/// The conferences one connection follows; dropping it stops every delivery to the connection.
pub struct Following {
    id: u64,
    fanout: Arc<Fanout>,
}

/// The events delivered to one connection, in the order the bus heard them.
pub struct Feed {
    rx: mpsc::Receiver<Arc<Event>>,
    follower: Arc<Follower>,
}

/// `follow` refused: the connection already follows as many conferences as it may.
#[derive(Debug, thiserror::Error)]
#[error("at most {0} subscriptions per connection")]
pub struct TooMany(pub usize);

impl Fanout {
    /// Starts handing out `bus`'s events, counting those a connection did not get in
    /// `lost`; the dispatching task ends with the last handle.
    pub fn start(bus: &Bus, lost: prometheus::IntCounterVec) -> Arc<Fanout> {
        let fanout = Arc::new(Fanout {
            table: Mutex::default(),
            next_id: AtomicU64::new(1),
            lost,
        });
        tokio::spawn(dispatch(bus.events(), Arc::downgrade(&fanout)));
        fanout
    }

    /// A new connection's table entry and feed, following nothing yet.
    pub fn join(self: &Arc<Self>) -> (Following, Feed) {
        let (tx, rx) = mpsc::channel(FEED_QUEUE);
        let follower = Arc::new(Follower {
            tx,
            missed: AtomicU64::new(0),
            wake: Notify::new(),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.table()
            .by_follower
            .insert(id, (follower.clone(), HashSet::new()));
        (
            Following {
                id,
                fanout: self.clone(),
            },
            Feed { rx, follower },
        )
    }

    /// How many connections follow at least one conference, and how many (connection,
    /// conference) pairs there are.
    pub fn counts(&self) -> (usize, usize) {
        let t = self.table();
        let pairs = t.by_conference.values().map(HashMap::len).sum();
        let followers = t
            .by_follower
            .values()
            .filter(|(_, c)| !c.is_empty())
            .count();
        (followers, pairs)
    }

    /// The table; a panic while it was held left it consistent (each change is one insert
    /// or remove), so a poisoned lock is taken over.
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deliver(&self, ev: &Arc<Event>) {
        let t = self.table();
        let Some(followers) = t.by_conference.get(&ev.conference) else {
            return;
        };
        for f in followers.values() {
            let missed = f.missed.load(Ordering::SeqCst) > 0
                || matches!(
                    f.tx.try_send(ev.clone()),
                    Err(mpsc::error::TrySendError::Full(_))
                );
            // A closed feed's entry goes with its `Following`.
            if missed {
                f.miss(1);
                self.lost
                    .with_label_values(&[crate::rpc::SLOW_CLIENT])
                    .inc();
            }
        }
    }

    /// The dispatcher fell `n` events behind the bus: which conferences they were of is
    /// unknown, so every connection that follows any was dealt a loss of `n`.
    fn lagged(&self, n: u64) {
        for (f, conferences) in self.table().by_follower.values() {
            if !conferences.is_empty() {
                f.miss(n);
                self.lost.with_label_values(&[DISPATCHER_LAG]).inc_by(n);
            }
        }
    }
}

async fn dispatch(mut rx: broadcast::Receiver<Arc<Event>>, fanout: Weak<Fanout>) {
    loop {
        let got = rx.recv().await;
        let Some(fanout) = fanout.upgrade() else {
            return;
        };
        match got {
            Ok(ev) => fanout.deliver(&ev),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    lost = n,
                    "the JSON-RPC event dispatcher fell behind the bus; followers are told of the loss"
                );
                fanout.lagged(n);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

impl Following {
    /// Follows `conference`, unless that would make more than `max`; true when it was not
    /// followed yet.
    pub fn follow(&self, conference: &str, max: usize) -> Result<bool, TooMany> {
        let mut t = self.fanout.table();
        let Table {
            by_conference,
            by_follower,
        } = &mut *t;
        let Some((follower, conferences)) = by_follower.get_mut(&self.id) else {
            return Ok(false);
        };
        if conferences.contains(conference) {
            return Ok(false);
        }
        if conferences.len() >= max {
            return Err(TooMany(max));
        }
        conferences.insert(conference.to_string());
        by_conference
            .entry(conference.to_string())
            .or_default()
            .insert(self.id, follower.clone());
        Ok(true)
    }

    /// Stops following `conference`; true when it was followed.
    pub fn unfollow(&self, conference: &str) -> bool {
        let mut t = self.fanout.table();
        let removed = t
            .by_follower
            .get_mut(&self.id)
            .is_some_and(|(_, c)| c.remove(conference));
        if removed {
            forget(&mut t, conference, self.id);
        }
        removed
    }

    /// Whether this connection follows `conference` now.
    pub fn follows(&self, conference: &str) -> bool {
        self.fanout
            .table()
            .by_follower
            .get(&self.id)
            .is_some_and(|(_, c)| c.contains(conference))
    }

    /// Whether this connection follows any conference.
    pub fn any(&self) -> bool {
        self.fanout
            .table()
            .by_follower
            .get(&self.id)
            .is_some_and(|(_, c)| !c.is_empty())
    }

    /// Stops every delivery to this connection for good (it is closing): a `subscribe`
    /// still being answered follows nothing any more.
    pub fn close(&self) {
        let mut t = self.fanout.table();
        let conferences = t
            .by_follower
            .remove(&self.id)
            .map(|(_, c)| c)
            .unwrap_or_default();
        for c in conferences {
            forget(&mut t, &c, self.id);
        }
    }
}

/// Takes connection `id` off `conference`'s list, and the list off the table once empty.
fn forget(t: &mut Table, conference: &str, id: u64) {
    if let Some(list) = t.by_conference.get_mut(conference) {
        list.remove(&id);
        if list.is_empty() {
            t.by_conference.remove(conference);
        }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.close();
    }
}

impl Feed {
    /// The next event, or the count of those lost before it; waits for one. Cancel-safe:
    /// nothing is taken until it returns.
    pub async fn recv(&mut self) -> Delivery {
        loop {
            // Read before the queue: a loss counted after an empty look could follow events
            // queued since, and be told ahead of them. One counted before stops the queue
            // from filling (the dispatcher drops everything while it is untold).
            let lost_before = self.follower.missed.load(Ordering::SeqCst) > 0;
            if let Ok(ev) = self.rx.try_recv() {
                return Delivery::Event(ev);
            }
            // Only once what was queued before the loss is out, so the loss is told in its
            // place.
            if lost_before {
                let missed = self.follower.missed.swap(0, Ordering::SeqCst);
                return Delivery::Lost(missed);
            }
            tokio::select! {
                ev = self.rx.recv() => {
                    if let Some(ev) = ev {
                        return Delivery::Event(ev);
                    }
                    // Unreachable while this feed holds its follower's sender; waits for
                    // nothing rather than spinning.
                    std::future::pending::<()>().await;
                }
                _ = self.follower.wake.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(conference: &str, seq: u64) -> Arc<Event> {
        Arc::new(Event {
            conference: conference.into(),
            node: "node-a".into(),
            epoch: 1,
            seq,
            event: "talking".into(),
            data: json!({}),
        })
    }

    fn table() -> Arc<Fanout> {
        Arc::new(Fanout {
            table: Mutex::default(),
            next_id: AtomicU64::new(1),
            lost: prometheus::IntCounterVec::new(
                prometheus::Opts::new("lost_total", "test"),
                &["reason"],
            )
            .expect("counter"),
        })
    }

    async fn next(feed: &mut Feed) -> Option<Delivery> {
        tokio::time::timeout(std::time::Duration::from_millis(50), feed.recv())
            .await
            .ok()
    }

    #[tokio::test]
    async fn a_connection_gets_only_the_conferences_it_follows() {
        let fanout = table();
        let (following, mut feed) = fanout.join();
        let (other, mut other_feed) = fanout.join();
        assert!(following.follow("a", 10).expect("room"));
        assert!(
            !following.follow("a", 10).expect("room"),
            "already followed"
        );
        assert!(other.follow("b", 10).expect("room"));
        fanout.deliver(&event("b", 1));
        fanout.deliver(&event("a", 2));
        fanout.deliver(&event("c", 3));
        match next(&mut feed).await {
            Some(Delivery::Event(ev)) => assert_eq!((ev.conference.as_str(), ev.seq), ("a", 2)),
            other => panic!("expected a's event, got {other:?}"),
        }
        assert!(next(&mut feed).await.is_none(), "nothing else for a");
        match next(&mut other_feed).await {
            Some(Delivery::Event(ev)) => assert_eq!(ev.seq, 1),
            other => panic!("expected b's event, got {other:?}"),
        }
        assert!(following.unfollow("a"));
        assert!(!following.unfollow("a"));
        fanout.deliver(&event("a", 4));
        assert!(next(&mut feed).await.is_none(), "unfollowed");
        assert_eq!(fanout.counts(), (1, 1));
        drop(other);
        assert_eq!(fanout.counts(), (0, 0));
        assert!(fanout.table().by_conference.is_empty());
    }

    #[tokio::test]
    async fn the_follow_limit_counts_distinct_conferences() {
        let fanout = table();
        let (following, _feed) = fanout.join();
        assert!(following.follow("a", 2).expect("room"));
        assert!(following.follow("b", 2).expect("room"));
        assert!(!following.follow("a", 2).expect("a again needs no room"));
        let err = following.follow("c", 2).expect_err("past the limit");
        assert_eq!(err.to_string(), "at most 2 subscriptions per connection");
        assert!(following.any());
        following.close();
        assert!(!following.any());
        assert!(
            !following.follow("c", 2).expect("no error"),
            "a closed connection follows nothing"
        );
        assert_eq!(fanout.counts(), (0, 0));
        assert!(fanout.table().by_follower.is_empty());
    }

    #[tokio::test]
    async fn a_full_feed_tells_its_loss_after_what_it_queued_then_resumes() {
        let fanout = table();
        let (following, mut feed) = fanout.join();
        following.follow("a", 1).expect("room");
        let total = FEED_QUEUE as u64 + 10;
        for seq in 0..total {
            fanout.deliver(&event("a", seq));
        }
        let mut seqs = Vec::new();
        loop {
            match next(&mut feed).await {
                Some(Delivery::Event(ev)) => seqs.push(ev.seq),
                Some(Delivery::Lost(n)) => {
                    assert_eq!(n, 10);
                    break;
                }
                None => panic!("no loss told after {} events", seqs.len()),
            }
        }
        assert_eq!(seqs, (0..FEED_QUEUE as u64).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn events_after_a_told_loss_flow_again() {
        let fanout = table();
        let (following, mut feed) = fanout.join();
        following.follow("a", 1).expect("room");
        for seq in 0..FEED_QUEUE as u64 + 1 {
            fanout.deliver(&event("a", seq));
        }
        // While the loss is untold, later events are dropped with it.
        fanout.deliver(&event("a", 9999));
        for _ in 0..FEED_QUEUE {
            assert!(matches!(next(&mut feed).await, Some(Delivery::Event(_))));
        }
        assert!(matches!(next(&mut feed).await, Some(Delivery::Lost(2))));
        fanout.deliver(&event("a", 10_000));
        match next(&mut feed).await {
            Some(Delivery::Event(ev)) => assert_eq!(ev.seq, 10_000),
            other => panic!("expected the next event, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_dispatcher_behind_the_bus_tells_only_connections_that_follow() {
        let fanout = table();
        let (following, mut feed) = fanout.join();
        let (_idle, mut idle_feed) = fanout.join();
        following.follow("a", 1).expect("room");
        fanout.lagged(7);
        assert!(matches!(next(&mut feed).await, Some(Delivery::Lost(7))));
        assert!(next(&mut idle_feed).await.is_none());
    }

    #[tokio::test]
    async fn the_dispatcher_hands_out_what_the_bus_hears() {
        let (tx, rx) = broadcast::channel(16);
        let fanout = table();
        tokio::spawn(dispatch(rx, Arc::downgrade(&fanout)));
        let (following, mut feed) = fanout.join();
        following.follow("a", 1).expect("room");
        tx.send(event("b", 1)).expect("send");
        tx.send(event("a", 2)).expect("send");
        match tokio::time::timeout(std::time::Duration::from_secs(5), feed.recv()).await {
            Ok(Delivery::Event(ev)) => assert_eq!(ev.seq, 2),
            other => panic!("expected a's event, got {other:?}"),
        }
    }
}
