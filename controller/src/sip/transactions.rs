//! The INVITE server transactions of RFC 3261 §17.2.1, reduced to what a redirect server
//! needs: a retransmitted INVITE gets the same answer without a second Redis call, and the
//! ACK for that answer is absorbed.
//!
//! Only the answer's parts are kept (status, headers, To-tag), not the bytes: the response is
//! rebuilt from the retransmitted request, which carries the same headers. An entry lives
//! 32 s (Timer H, 64·T1) until its ACK arrives, then 5 s (Timer I, T4) for ACK retransmits.
//!
//! A transaction that was sent `100 Trying` also says so when it completes: its sender has
//! stopped retransmitting (RFC 3261 §17.1.1.2), so over UDP the final answer must be resent
//! until the ACK comes (Timer G), or one lost datagram leaves the call waiting on the edge's
//! own timer for minutes.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::response::Response;

/// Timer H: how long an unacknowledged INVITE transaction is remembered.
pub const TIMER_H: Duration = Duration::from_secs(32);
/// Timer I: how long after the ACK retransmissions are still absorbed.
pub const TIMER_I: Duration = Duration::from_secs(5);

const SHARDS: usize = 32;

/// A final answer, enough to rebuild the response for a retransmission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The response (status and added headers).
    pub response: Response,
    /// The To-tag the first response carried.
    pub to_tag: String,
}

/// What a CANCEL found ([`Transactions::cancel`]).
#[derive(Debug, Clone)]
pub enum Cancel {
    /// The INVITE was answered already: the CANCEL changes nothing.
    Answered(Arc<Answer>),
    /// The INVITE is still being routed: it will be answered 487 (RFC 3261 §9.2).
    Pending,
    /// No such INVITE here.
    Unknown,
}

/// What [`Transactions::begin`] found.
#[derive(Debug, Clone)]
pub enum Begin {
    /// A new transaction: route it, then call [`Transactions::complete`]. The notice, when
    /// the table remembers it, fires when a CANCEL for it comes meanwhile.
    New(Option<Arc<Notify>>),
    /// The first copy is still being routed: drop this retransmission.
    Pending,
    /// Already answered: send the same answer again.
    Answered(Arc<Answer>),
}

/// A recorded final answer ([`Transactions::complete`]).
#[derive(Debug)]
pub struct Completed {
    /// The answer to send.
    pub answer: Arc<Answer>,
    /// Set when the answer must be resent over UDP until its ACK.
    pub resend: Option<Resend>,
}

/// How to resend an answer until its ACK (RFC 3261 §17.2.1, Timers G and H).
#[derive(Debug, Clone)]
pub struct Resend {
    /// Fires when the ACK arrives.
    pub acked: Arc<Notify>,
    /// When the transaction is forgotten (Timer H): no resending past it.
    pub until: Instant,
}

enum State {
    /// Being routed; `cancelled` once a CANCEL for it came, which `cancel` also notifies.
    Pending {
        cancelled: bool,
        cancel: Arc<Notify>,
    },
    Answered(Arc<Answer>),
}

struct Entry {
    state: State,
    expires: Instant,
    /// A provisional answer went out: the sender no longer retransmits.
    provisional: bool,
    /// Notified by the ACK; set when the answer of a `provisional` transaction is recorded.
    acked: Option<Arc<Notify>>,
}

/// Transaction table, sharded to keep lock hold times short under load.
pub struct Transactions {
    shards: Vec<Mutex<HashMap<String, Entry>>>,
    hasher: std::collections::hash_map::RandomState,
    max_entries_per_shard: usize,
    /// Per shard, notified when a transaction begins there while a CANCEL waits for its
    /// INVITE ([`Transactions::cancel_within`]): an INVITE wakes only the CANCELs of its own
    /// shard. `waiting` counts them all, so an INVITE notifies nobody when none waits.
    begun: Vec<Notify>,
    waiting: AtomicUsize,
}

impl Transactions {
    /// A table holding at most about `max_entries` transactions; beyond that new INVITEs are
    /// still answered but not remembered (a retransmission is then routed again, which
    /// gives the same owner).
    pub fn new(max_entries: usize) -> Self {
        Transactions {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            max_entries_per_shard: (max_entries / SHARDS).max(1),
            begun: (0..SHARDS).map(|_| Notify::new()).collect(),
            waiting: AtomicUsize::new(0),
        }
    }

    fn shard_index(&self, key: &str) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Entry>> {
        &self.shards[self.shard_index(key)]
    }

    /// Looks up `key`, registering it as pending when new.
    pub fn begin(&self, key: String) -> Begin {
        let index = self.shard_index(&key);
        let Ok(mut map) = self.shards[index].lock() else {
            return Begin::New(None);
        };
        let now = Instant::now();
        match map.get_mut(&key) {
            Some(e) if e.expires > now => match &e.state {
                // The caller answers this retransmission `100 Trying`.
                State::Pending { .. } => {
                    e.provisional = true;
                    Begin::Pending
                }
                State::Answered(a) => Begin::Answered(a.clone()),
            },
            _ => {
                if map.len() >= self.max_entries_per_shard {
                    return Begin::New(None);
                }
                let cancel = Arc::new(Notify::new());
                map.insert(
                    key,
                    Entry {
                        state: State::Pending {
                            cancelled: false,
                            cancel: cancel.clone(),
                        },
                        expires: now + TIMER_H,
                        provisional: false,
                        acked: None,
                    },
                );
                drop(map);
                // SeqCst pairs with `cancel_within`'s count: either this load sees the
                // waiter, or the waiter's look at the table (after its count) sees the entry.
                if self.waiting.load(Ordering::SeqCst) > 0 {
                    self.begun[index].notify_waiters();
                }
                Begin::New(Some(cancel))
            }
        }
    }

    /// What is known of `key`, registering nothing: `None` when it is not in the table.
    pub fn peek(&self, key: &str) -> Option<Begin> {
        let map = self.shard(key).lock().ok()?;
        match map.get(key) {
            Some(e) if e.expires > Instant::now() => Some(match &e.state {
                State::Pending { .. } => Begin::Pending,
                State::Answered(a) => Begin::Answered(a.clone()),
            }),
            _ => None,
        }
    }

    /// A CANCEL for `key`: marks a pending INVITE cancelled.
    pub fn cancel(&self, key: &str) -> Cancel {
        let Ok(mut map) = self.shard(key).lock() else {
            return Cancel::Unknown;
        };
        match live(&mut map, key) {
            Some(Entry {
                state: State::Answered(a),
                ..
            }) => Cancel::Answered(a.clone()),
            Some(Entry {
                state: State::Pending { cancelled, cancel },
                ..
            }) => {
                *cancelled = true;
                // A permit is kept if the INVITE's task is not waiting at this moment.
                cancel.notify_one();
                Cancel::Pending
            }
            None => Cancel::Unknown,
        }
    }

    /// [`Transactions::cancel`], waiting up to `grace` for the INVITE of `key` to begin when
    /// it is not known yet. The INVITE read just before its CANCEL is routed on a task of its
    /// own, which may not have begun its transaction when the CANCEL is looked at (on
    /// another thread, or later on this one): without the wait the CANCEL would get 481 and
    /// the INVITE be redirected after its caller gave up.
    pub async fn cancel_within(&self, key: &str, grace: Duration) -> Cancel {
        let found = self.cancel(key);
        if !matches!(found, Cancel::Unknown) || grace.is_zero() {
            return found;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _counted = Uncount(&self.waiting);
        let deadline = tokio::time::Instant::now() + grace;
        let begun_here = &self.begun[self.shard_index(key)];
        loop {
            let begun = begun_here.notified();
            tokio::pin!(begun);
            // Registered before the look, so a transaction begun right after it still wakes us.
            begun.as_mut().enable();
            let found = self.cancel(key);
            if !matches!(found, Cancel::Unknown) {
                return found;
            }
            if tokio::time::timeout_at(deadline, begun).await.is_err() {
                return self.cancel(key);
            }
        }
    }

    /// Notes that `key` was sent a provisional answer.
    pub fn provisional(&self, key: &str) {
        if let Ok(mut map) = self.shard(key).lock() {
            if let Some(e) = live(&mut map, key) {
                e.provisional = true;
            }
        }
    }

    /// Records the final answer of `key` and returns it: `487 Request Terminated` instead
    /// when a CANCEL came while it was routed. With it comes, for a transaction that was
    /// sent a provisional answer, the notice its ACK fires and how long the answer may still
    /// be resent ([`Completed`]).
    pub fn complete(&self, key: &str, answer: Answer) -> Completed {
        let lone = |answer| Completed {
            answer: Arc::new(answer),
            resend: None,
        };
        let Ok(mut map) = self.shard(key).lock() else {
            return lone(answer);
        };
        let Some(e) = live(&mut map, key) else {
            return lone(answer);
        };
        let answer = match e.state {
            State::Pending {
                cancelled: true, ..
            } => Answer {
                response: Response::new(487, "Request Terminated")
                    .warning("cancelled while it was being routed"),
                to_tag: answer.to_tag,
            },
            _ => answer,
        };
        let answer = Arc::new(answer);
        e.state = State::Answered(answer.clone());
        // Timer H runs from the final answer (RFC 3261 §17.2.1), not from the INVITE: a
        // routing that took most of `routing.deadline` still leaves the answer its whole
        // time to be resent and to absorb retransmissions and a late CANCEL.
        e.expires = Instant::now() + TIMER_H;
        let resend = e.provisional.then(|| {
            let acked = Arc::new(Notify::new());
            e.acked = Some(acked.clone());
            Resend {
                acked,
                until: e.expires,
            }
        });
        Completed { answer, resend }
    }

    /// Forgets a pending transaction whose routing failed before any answer.
    pub fn abandon(&self, key: &str) {
        if let Ok(mut map) = self.shard(key).lock() {
            map.remove(key);
        }
    }

    /// Notes the ACK for `key`; true when it matched a transaction of ours.
    pub fn ack(&self, key: &str) -> bool {
        let Ok(mut map) = self.shard(key).lock() else {
            return false;
        };
        match live(&mut map, key) {
            // An ACK before any final answer acknowledges nothing: the INVITE being routed
            // keeps its entry, or its answer would be neither kept nor resent.
            Some(Entry {
                state: State::Pending { .. },
                ..
            }) => true,
            Some(e) => {
                e.expires = e.expires.min(Instant::now() + TIMER_I);
                if let Some(acked) = &e.acked {
                    // A permit is kept if the resending task is not waiting at this moment.
                    acked.notify_one();
                }
                true
            }
            None => false,
        }
    }

    /// Drops expired entries; returns how many remain.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut left = 0;
        for shard in &self.shards {
            if let Ok(mut map) = shard.lock() {
                map.retain(|_, e| e.expires > now);
                left += map.len();
            }
        }
        left
    }
}

/// Takes a waiting CANCEL off the count however its wait ends (the task may be dropped).
struct Uncount<'a>(&'a AtomicUsize);

impl Drop for Uncount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The entry of `key` unless it is past its expiry: the sweep drops those only once a second,
/// and until then every method must see the same table as [`Transactions::begin`] (an expired
/// transaction is unknown, never brought back).
fn live<'a>(map: &'a mut HashMap<String, Entry>, key: &str) -> Option<&'a mut Entry> {
    map.get_mut(key).filter(|e| e.expires > Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes `key`'s entry expire now, as Timer H or I would.
    fn expire(t: &Transactions, key: &str) {
        let mut map = t.shard(key).lock().expect("lock");
        map.get_mut(key).expect("entry").expires = Instant::now();
    }

    #[tokio::test]
    async fn a_cancel_waits_for_its_invite_to_begin_and_no_longer_than_its_grace() {
        let t = Arc::new(Transactions::new(1000));
        let waiting = tokio::spawn({
            let t = t.clone();
            async move { t.cancel_within("late", Duration::from_secs(30)).await }
        });
        // The INVITE begins only once the CANCEL is counted as waiting for it.
        while t.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(t.begin("other".into()), Begin::New(_)));
        assert!(matches!(t.begin("late".into()), Begin::New(_)));
        let found = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the CANCEL is woken by its INVITE, long before its grace")
            .expect("task");
        assert!(matches!(found, Cancel::Pending));
        let done = t.complete(
            "late",
            Answer {
                response: Response::new(302, "Moved Temporarily"),
                to_tag: "t".into(),
            },
        );
        assert_eq!(done.answer.response.code, 487, "the INVITE was cancelled");

        let started = Instant::now();
        let found = t.cancel_within("never", Duration::from_millis(50)).await;
        assert!(matches!(found, Cancel::Unknown));
        assert!(started.elapsed() >= Duration::from_millis(50), "it waited");
        assert_eq!(
            t.waiting.load(Ordering::SeqCst),
            0,
            "no waiter left counted"
        );
    }

    #[test]
    fn an_expired_transaction_is_unknown_to_every_method_before_the_sweep() {
        let t = Transactions::new(1000);
        let answer = || Answer {
            response: Response::new(302, "Moved Temporarily"),
            to_tag: "t".into(),
        };
        assert!(matches!(t.begin("answered".into()), Begin::New(_)));
        t.provisional("answered");
        let _ = t.complete("answered", answer());
        expire(&t, "answered");
        assert!(matches!(t.cancel("answered"), Cancel::Unknown));
        assert!(!t.ack("answered"), "an ACK matches nothing");
        assert!(matches!(t.begin("pending".into()), Begin::New(_)));
        expire(&t, "pending");
        assert!(matches!(t.cancel("pending"), Cancel::Unknown));
        t.provisional("pending");
        let done = t.complete("pending", answer());
        assert!(
            done.resend.is_none(),
            "an expired entry is not brought back to be resent"
        );
    }

    #[test]
    fn retransmission_gets_the_same_answer() {
        let t = Transactions::new(1000);
        assert!(matches!(t.begin("b1".into()), Begin::New(_)));
        assert!(matches!(t.begin("b1".into()), Begin::Pending));
        let done = t.complete(
            "b1",
            Answer {
                response: Response::new(302, "Moved Temporarily").header("Contact", "<sip:x@y>"),
                to_tag: "t".into(),
            },
        );
        // The second copy was answered 100 Trying: its sender stopped retransmitting.
        assert!(done.resend.is_some(), "a transaction sent 100 is resent");
        let a = done.answer;
        assert_eq!(a.response.code, 302);
        match t.begin("b1".into()) {
            Begin::Answered(got) => assert_eq!(got, a),
            other => panic!("unexpected {other:?}"),
        }
        assert!(t.ack("b1"));
        assert!(!t.ack("unknown"));
        assert_eq!(t.sweep(), 1, "kept for ACK retransmissions");
    }

    #[test]
    fn a_cancel_while_routing_turns_the_answer_into_487() {
        let t = Transactions::new(1000);
        assert!(matches!(t.cancel("b"), Cancel::Unknown));
        assert!(matches!(t.begin("b".into()), Begin::New(_)));
        assert!(matches!(t.cancel("b"), Cancel::Pending));
        let got = t
            .complete(
                "b",
                Answer {
                    response: Response::new(302, "Moved Temporarily"),
                    to_tag: "t".into(),
                },
            )
            .answer;
        assert_eq!((got.response.code, got.to_tag.as_str()), (487, "t"));
        assert!(matches!(t.cancel("b"), Cancel::Answered(a) if a.response.code == 487));
    }

    #[tokio::test]
    async fn only_an_answer_after_a_provisional_one_waits_for_its_ack() {
        let t = Transactions::new(1000);
        let answer = || Answer {
            response: Response::new(302, "Moved Temporarily"),
            to_tag: "t".into(),
        };
        assert!(matches!(t.begin("quick".into()), Begin::New(_)));
        assert!(
            t.complete("quick", answer()).resend.is_none(),
            "a sender that got no 100 retransmits by itself"
        );
        assert!(matches!(t.begin("slow".into()), Begin::New(_)));
        t.provisional("slow");
        let resend = t.complete("slow", answer()).resend.expect("resend");
        assert!(resend.until > Instant::now());
        // The ACK may come before anyone waits for it: the notice is kept.
        assert!(t.ack("slow"));
        tokio::time::timeout(Duration::from_secs(5), resend.acked.notified())
            .await
            .expect("the ACK is noticed");
    }

    fn expires(t: &Transactions, key: &str) -> Option<Instant> {
        t.shard(key).lock().ok()?.get(key).map(|e| e.expires)
    }

    #[test]
    fn timer_h_runs_from_the_final_answer() {
        let t = Transactions::new(1000);
        assert!(matches!(t.begin("long".into()), Begin::New(_)));
        // As if routing took 31 of its 32 s.
        if let Some(e) = t.shard("long").lock().expect("lock").get_mut("long") {
            e.expires = Instant::now() + Duration::from_secs(1);
        }
        t.provisional("long");
        let done = t.complete(
            "long",
            Answer {
                response: Response::new(302, "Moved Temporarily"),
                to_tag: "t".into(),
            },
        );
        let least = Instant::now() + TIMER_H - Duration::from_secs(1);
        assert!(expires(&t, "long").is_some_and(|at| at > least));
        assert!(done.resend.is_some_and(|r| r.until > least));
    }

    #[test]
    fn an_ack_before_the_answer_leaves_the_transaction_alone() {
        let t = Transactions::new(1000);
        assert!(matches!(t.begin("early".into()), Begin::New(_)));
        let before = expires(&t, "early");
        assert!(t.ack("early"), "absorbed");
        assert_eq!(expires(&t, "early"), before);
        t.provisional("early");
        let done = t.complete(
            "early",
            Answer {
                response: Response::new(302, "Moved Temporarily"),
                to_tag: "t".into(),
            },
        );
        assert!(done.resend.is_some(), "the answer is kept and resent");
        assert!(matches!(t.begin("early".into()), Begin::Answered(_)));
    }

    #[test]
    fn abandoned_transactions_start_over() {
        let t = Transactions::new(1000);
        assert!(matches!(t.begin("b".into()), Begin::New(_)));
        t.abandon("b");
        assert!(matches!(t.begin("b".into()), Begin::New(_)));
    }

    #[test]
    fn bounded_table_still_answers() {
        let t = Transactions::new(SHARDS);
        for i in 0..1000 {
            assert!(matches!(t.begin(format!("k{i}")), Begin::New(_)));
        }
        assert!(t.sweep() <= SHARDS);
    }
}
