//! The INVITE server transactions of RFC 3261 §17.2.1, reduced to what a redirect server
//! needs: a retransmitted INVITE gets the same answer without a second Redis call, and the
//! ACK for that answer is absorbed.
//!
//! Only the answer's parts are kept (status, headers, To-tag), not the bytes: the response is
//! rebuilt from the retransmitted request, which carries the same headers. An entry lives
//! 32 s (Timer H, 64·T1) until its ACK arrives, then 5 s (Timer I, T4) for ACK retransmits.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// What [`Transactions::begin`] found.
#[derive(Debug, Clone)]
pub enum Begin {
    /// A new transaction: route it, then call [`Transactions::complete`].
    New,
    /// The first copy is still being routed: drop this retransmission.
    Pending,
    /// Already answered: send the same answer again.
    Answered(Arc<Answer>),
}

enum State {
    Pending,
    Answered(Arc<Answer>),
}

struct Entry {
    state: State,
    expires: Instant,
}

/// Transaction table, sharded to keep lock hold times short under load.
pub struct Transactions {
    shards: Vec<Mutex<HashMap<String, Entry>>>,
    hasher: std::collections::hash_map::RandomState,
    max_entries_per_shard: usize,
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
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Entry>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Looks up `key`, registering it as pending when new.
    pub fn begin(&self, key: String) -> Begin {
        let Ok(mut map) = self.shard(&key).lock() else {
            return Begin::New;
        };
        let now = Instant::now();
        match map.get(&key) {
            Some(e) if e.expires > now => match &e.state {
                State::Pending => Begin::Pending,
                State::Answered(a) => Begin::Answered(a.clone()),
            },
            _ => {
                if map.len() < self.max_entries_per_shard {
                    map.insert(
                        key,
                        Entry {
                            state: State::Pending,
                            expires: now + TIMER_H,
                        },
                    );
                }
                Begin::New
            }
        }
    }

    /// The answer already given for `key`, without registering anything.
    pub fn answered(&self, key: &str) -> Option<Arc<Answer>> {
        let map = self.shard(key).lock().ok()?;
        match map.get(key) {
            Some(Entry {
                state: State::Answered(a),
                ..
            }) => Some(a.clone()),
            _ => None,
        }
    }

    /// Records the final answer of `key`.
    pub fn complete(&self, key: &str, answer: Arc<Answer>) {
        if let Ok(mut map) = self.shard(key).lock() {
            if let Some(e) = map.get_mut(key) {
                e.state = State::Answered(answer);
            }
        }
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
        match map.get_mut(key) {
            Some(e) => {
                e.expires = e.expires.min(Instant::now() + TIMER_I);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retransmission_gets_the_same_answer() {
        let t = Transactions::new(1000);
        assert!(matches!(t.begin("b1".into()), Begin::New));
        assert!(matches!(t.begin("b1".into()), Begin::Pending));
        let a = Arc::new(Answer {
            response: Response::new(302, "Moved Temporarily").header("Contact", "<sip:x@y>"),
            to_tag: "t".into(),
        });
        t.complete("b1", a.clone());
        match t.begin("b1".into()) {
            Begin::Answered(got) => assert_eq!(got, a),
            other => panic!("unexpected {other:?}"),
        }
        assert!(t.ack("b1"));
        assert!(!t.ack("unknown"));
        assert_eq!(t.sweep(), 1, "kept for ACK retransmissions");
    }

    #[test]
    fn abandoned_transactions_start_over() {
        let t = Transactions::new(1000);
        assert!(matches!(t.begin("b".into()), Begin::New));
        t.abandon("b");
        assert!(matches!(t.begin("b".into()), Begin::New));
    }

    #[test]
    fn bounded_table_still_answers() {
        let t = Transactions::new(SHARDS);
        for i in 0..1000 {
            assert!(matches!(t.begin(format!("k{i}")), Begin::New));
        }
        assert!(t.sweep() <= SHARDS);
    }
}
