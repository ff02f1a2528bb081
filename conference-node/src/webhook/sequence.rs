//! Status callbacks' `SequenceNumber`s and call-control events' `seq`. Applications order a
//! conference's events by them, so they keep increasing when an agent restarts and adopts the
//! conference: each agent lifetime numbers from blocks reserved in the conference's record
//! (callback_seq.lua), and reserves the next block while half of the current one is left, so
//! no event waits for Redis.

use std::sync::Arc;

use confroute_shared::name::ConferenceName;
use confroute_shared::store::{SequenceKind, Store};
use confroute_shared::types::NodeId;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

/// How many numbers a conference's home reserves at a time. A new conference numbers from the
/// first block without reserving it (the script counts it as handed out), so this never
/// changes.
pub const BLOCK: u64 = 10_000;

/// First wait before trying an adopted conference's reservation again.
const RESUME_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// Reserves the next block above `used`; its last number, or `None` when none was had.
pub(crate) trait Reserve: Send + Sync {
    /// Reserves the block after `used` (the highest number that may have been used).
    fn reserve(&self, used: u64) -> BoxFuture<'static, Option<u64>>;
}

/// Where a conference's numbers are reserved: its record in Redis, for its owner.
#[derive(Clone)]
pub struct Reservations {
    /// Which numbering.
    pub kind: SequenceKind,
    /// The store holding the conference's record.
    pub store: Store,
    /// The conference.
    pub name: ConferenceName,
    /// This node, its owner.
    pub node: NodeId,
}

impl Reserve for Reservations {
    fn reserve(&self, used: u64) -> BoxFuture<'static, Option<u64>> {
        let r = self.clone();
        Box::pin(async move {
            match r
                .store
                .reserve_sequence(r.kind, &r.name, &r.node, BLOCK, used)
                .await
            {
                Ok(Some(ceiling)) => Some(ceiling),
                Ok(None) => {
                    tracing::info!(conference = %r.name, kind = ?r.kind, "conference no longer owned here; numbers not reserved");
                    None
                }
                Err(e) => {
                    tracing::warn!(conference = %r.name, kind = ?r.kind, error = %e, "cannot reserve numbers for events");
                    None
                }
            }
        })
    }
}

/// One conference's numbering on this agent.
pub(crate) struct Sequence {
    last: u64,
    ceiling: u64,
    reservations: Arc<dyn Reserve>,
    pending: Option<oneshot::Receiver<Option<u64>>>,
    next_ceiling: Option<u64>,
    warned: bool,
    /// Numbering from the clock (no reservation could be had): each event asks for one,
    /// so the record learns the numbers used and a later lifetime resumes above them.
    unrecorded: bool,
    /// When the last reservation was asked for while `unrecorded`: at most one per
    /// `unrecorded_retry` ([`UNRECORDED_RETRY`]).
    last_try: Option<std::time::Instant>,
    unrecorded_retry: std::time::Duration,
}

/// How often a conference numbering from the clock asks again for a reservation.
const UNRECORDED_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl Sequence {
    /// A new conference: numbers from 1, in the implied first block.
    pub(crate) fn new(reservations: Arc<dyn Reserve>) -> Sequence {
        Sequence {
            last: 0,
            ceiling: BLOCK,
            reservations,
            pending: None,
            next_ceiling: None,
            warned: false,
            unrecorded: false,
            last_try: None,
            unrecorded_retry: UNRECORDED_RETRY,
        }
    }

    /// An adopted conference: numbers from a block above anything an earlier lifetime may
    /// have used. Tried three times within 0.6 s; false when none could be reserved: it then
    /// numbers from the clock (milliseconds since 1970, far above any count of events a
    /// conference reaches), never from 1 again, which would repeat numbers an application has
    /// seen under the same ConferenceSid and takes for duplicates.
    pub(crate) async fn resume(&mut self) -> bool {
        let mut wait = RESUME_RETRY;
        for attempt in 1..=3 {
            if let Some(ceiling) = self.reservations.reserve(0).await {
                self.last = ceiling.saturating_sub(BLOCK);
                self.ceiling = ceiling;
                return true;
            }
            if attempt < 3 {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2));
        // Above the implied first block whatever the clock says.
        self.last = self.last.max(now_ms).max(BLOCK);
        self.ceiling = self.last.saturating_add(BLOCK);
        self.unrecorded = true;
        false
    }

    /// Records in a record made anew (a claim made again after it expired) a block above the
    /// numbers used so far: without it, an agent restarted next would number from the first
    /// blocks again. False when none could be reserved.
    pub(crate) async fn record_again(&mut self) -> bool {
        match self.reservations.reserve(self.ceiling.max(self.last)).await {
            Some(ceiling) => {
                self.ceiling = self.ceiling.max(ceiling);
                true
            }
            None => false,
        }
    }

    /// The next event's number.
    pub(crate) fn next(&mut self) -> u64 {
        if let Some(rx) = &mut self.pending {
            match rx.try_recv() {
                Ok(got) => {
                    self.pending = None;
                    if got.is_some() {
                        self.unrecorded = false;
                    }
                    self.next_ceiling = got;
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
                Err(oneshot::error::TryRecvError::Closed) => self.pending = None,
            }
        }
        if self.last >= self.ceiling {
            if let Some(c) = self.next_ceiling.take() {
                self.last = self.last.max(c.saturating_sub(BLOCK));
                self.ceiling = c;
            } else if !self.warned {
                // Numbers go on increasing; only a restart before a reservation could repeat some.
                self.warned = true;
                tracing::warn!(last = self.last, "event numbers beyond the reserved block");
            }
        }
        self.last += 1;
        let retry = self.unrecorded
            && self
                .last_try
                .is_none_or(|t| t.elapsed() >= self.unrecorded_retry);
        let low = retry || self.ceiling.saturating_sub(self.last) <= BLOCK / 2;
        if low && self.pending.is_none() && self.next_ceiling.is_none() {
            if self.unrecorded {
                self.last_try = Some(std::time::Instant::now());
            }
            let (tx, rx) = oneshot::channel();
            let reserved = self.reservations.reserve(self.ceiling.max(self.last));
            tokio::spawn(async move {
                let _ = tx.send(reserved.await);
            });
            self.pending = Some(rx);
        }
        self.last
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// callback_seq.lua's arithmetic on one record, answering or not as told.
    struct Record {
        stored: Mutex<Option<u64>>,
        owned: bool,
    }

    impl Reserve for Record {
        fn reserve(&self, used: u64) -> BoxFuture<'static, Option<u64>> {
            let got = self.owned.then(|| {
                let mut stored = self.stored.lock().expect("lock");
                let c = stored.unwrap_or(BLOCK).max(used) + BLOCK;
                *stored = Some(c);
                c
            });
            Box::pin(async move { got })
        }
    }

    fn record(owned: bool) -> Arc<Record> {
        Arc::new(Record {
            stored: Mutex::new(None),
            owned,
        })
    }

    async fn numbers(seq: &mut Sequence, n: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(seq.next());
            // Lets a spawned reservation finish, as the agent's other work would.
            tokio::task::yield_now().await;
        }
        out
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_lifetime_numbers_without_gaps_across_blocks() {
        let rec = record(true);
        let mut seq = Sequence::new(rec.clone());
        let got = numbers(&mut seq, 3 * BLOCK + 7).await;
        assert_eq!(got, (1..=3 * BLOCK + 7).collect::<Vec<_>>());
        let stored = rec.stored.lock().expect("lock").expect("reserved");
        assert!(stored >= 3 * BLOCK + 7, "reserved ahead: {stored}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_restart_numbers_above_everything_the_last_lifetime_could_use() {
        let rec = record(true);
        let mut first = Sequence::new(rec.clone());
        let before = numbers(&mut first, BLOCK / 2 + 3).await;
        let mut second = Sequence::new(rec.clone());
        assert!(second.resume().await);
        let after = numbers(&mut second, 5).await;
        let highest_reserved_before = 2 * BLOCK;
        assert_eq!(after[0], highest_reserved_before + 1);
        assert!(before.last() < after.first());
        // A lifetime that never reserved (a few events) is still below the first block.
        let rec = record(true);
        let mut short = Sequence::new(rec.clone());
        let few = numbers(&mut short, 3).await;
        let mut again = Sequence::new(rec);
        assert!(again.resume().await);
        assert!(numbers(&mut again, 1).await[0] > few[2]);
    }

    /// [`Record`] behind its first `failures` reservations failing (Redis trouble).
    struct FailingFirst {
        inner: Arc<Record>,
        failures: Mutex<u32>,
    }

    impl Reserve for FailingFirst {
        fn reserve(&self, used: u64) -> BoxFuture<'static, Option<u64>> {
            let mut f = self.failures.lock().expect("lock");
            if *f > 0 {
                *f -= 1;
                return Box::pin(async { None });
            }
            self.inner.reserve(used)
        }
    }

    fn failing_first(inner: &Arc<Record>, failures: u32) -> Arc<FailingFirst> {
        Arc::new(FailingFirst {
            inner: inner.clone(),
            failures: Mutex::new(failures),
        })
    }

    /// A reservation that fails a moment (Redis trouble) is tried again before an adopted
    /// conference numbers from the clock.
    #[tokio::test(flavor = "current_thread")]
    async fn a_resume_tries_again_before_numbering_from_one() {
        let rec = record(true);
        let mut first = Sequence::new(rec.clone());
        numbers(&mut first, 3).await;
        let flaky = |failures| failing_first(&rec, failures);
        let mut second = Sequence::new(flaky(2));
        assert!(second.resume().await, "the third try is had");
        assert!(numbers(&mut second, 1).await[0] > BLOCK);
        let mut third = Sequence::new(flaky(3));
        assert!(!third.resume().await, "three failures give up");
    }

    /// An adopted conference whose reservation fails numbers from the clock, above anything
    /// used before, never from 1 again; the record learns those numbers at the first
    /// reservation that succeeds, so the next lifetime resumes above them.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_resume_numbers_from_the_clock_and_records_it() {
        let rec = record(true);
        let mut first = Sequence::new(rec.clone());
        let before = numbers(&mut first, 3).await;
        // Three failures for the resume, one more for the first event's reservation.
        let mut second = Sequence::new(failing_first(&rec, 4));
        assert!(!second.resume().await);
        // Each event may ask again (a second apart in the agent).
        second.unrecorded_retry = std::time::Duration::ZERO;
        let clock = numbers(&mut second, 3).await;
        let since_1970_ms = 1_700_000_000_000;
        assert!(clock[0] > since_1970_ms, "{clock:?}");
        assert!(clock.windows(2).all(|w| w[1] == w[0] + 1), "{clock:?}");
        assert!(before.iter().all(|b| *b < clock[0]));
        let mut third = Sequence::new(rec);
        assert!(third.resume().await);
        let after = numbers(&mut third, 1).await;
        assert!(after[0] > clock[2], "{after:?} after {clock:?}");
    }

    /// A record made anew (its claim expired and was made again) has lost what was reserved:
    /// recorded again, a restart after it still numbers above everything used.
    #[tokio::test(flavor = "current_thread")]
    async fn numbers_recorded_again_in_a_new_record_keep_a_restart_above_them() {
        let rec = record(true);
        let mut first = Sequence::new(rec.clone());
        let before = numbers(&mut first, 2 * BLOCK + 5).await;
        // The record expires and is made again without the field.
        *rec.stored.lock().expect("lock") = None;
        assert!(first.record_again().await);
        let mut second = Sequence::new(rec.clone());
        assert!(second.resume().await);
        let after = numbers(&mut second, 1).await;
        assert!(
            before.last() < after.first(),
            "{:?} then {after:?}",
            before.last()
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn without_reservations_numbers_still_increase() {
        let mut seq = Sequence::new(record(false));
        assert!(!seq.resume().await);
        let got = numbers(&mut seq, BLOCK + 2).await;
        assert!(got.windows(2).all(|w| w[1] == w[0] + 1));
    }
}
