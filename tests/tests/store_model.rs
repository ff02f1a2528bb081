//! The Redis data model against a real Redis: re-homing on lease expiry, draining, fencing
//! by epoch, capacity, heartbeats, listings, script reloading and outage recovery. The same
//! operations are run on a Redis Cluster and behind Sentinel.

use std::time::{Duration, Instant};

use confroute_shared::config::RedisConfig;
use confroute_shared::name::ConferenceName;
use confroute_shared::store::{
    ClaimKind, Heartbeat, Hosted, HostedStatus, Registration, SequenceKind, StateChange, Store,
    StoreError,
};
use confroute_shared::types::{NodeInfo, NodeLoad, NodeState, Owner};
use confroute_tests::fixtures::{self, id, node};
use confroute_tests::harness::{
    redis_query, wait_for_async, DarkPort, RedisCluster, RedisServer, SentinelGroup,
};

const LONG: Duration = Duration::from_secs(60);

fn name(s: &str) -> ConferenceName {
    ConferenceName::parse(s).expect("valid name")
}

fn owner(node: &str, epoch: u64) -> Owner {
    Owner {
        node: id(node),
        epoch,
    }
}

/// A Redis of its own and a store on it, with nodes `ids` registered (capacity 10).
async fn with_nodes(ids: &[&str]) -> (RedisServer, Store) {
    let redis = RedisServer::start().expect("redis");
    let store = fixtures::store(&fixtures::single(&redis.url()));
    for n in ids {
        store.register(&node(n, 10), LONG).await.expect("register");
    }
    (redis, store)
}

/// Drains node a so that `room`, empty, moves to node b.
async fn rehome_from_a_to_b(store: &Store, room: &ConferenceName) {
    store
        .set_state(&id("a"), NodeState::Draining)
        .await
        .expect("drain");
    let moved = store.claim(room, &[id("b")]).await.expect("claim");
    assert_eq!(moved.kind, ClaimKind::Rehomed);
}

async fn gone(store: &Store, node: &str) {
    let target = id(node);
    wait_for_async(
        &format!("lease of {node} to expire"),
        Duration::from_secs(10),
        || async {
            let nodes = store.list_nodes().await.ok()?;
            (!nodes.iter().any(|n| n.info.id == target)).then_some(())
        },
    )
    .await
    .expect("node lease expires");
}

#[tokio::test]
async fn rehome_after_owner_lease_expires_raises_epoch_by_one() {
    let redis = RedisServer::start().expect("redis");
    let store = fixtures::store(&fixtures::single(&redis.url()));
    // A lease ten heartbeats long: a test process starved of CPU for a moment under a
    // loaded machine still renews it in time.
    let short = Duration::from_secs(1);
    store
        .register(&node("a", 10), short)
        .await
        .expect("register a");
    store
        .register(&node("b", 10), LONG)
        .await
        .expect("register b");

    let c = store.claim(&name("room"), &[id("a")]).await.expect("claim");
    assert_eq!(c.kind, ClaimKind::Claimed);
    assert_eq!(c.owner, Some(owner("a", 1)));
    assert_eq!(c.sip_uri, "sip:a.test:5060");

    // While a heartbeats, claims proposing b never move the conference, for several leases.
    let until = Instant::now() + short * 2;
    while Instant::now() < until {
        store
            .heartbeat(&id("a"), &NodeLoad::default(), short, &[])
            .await
            .expect("heartbeat a");
        let again = store.claim(&name("room"), &[id("b")]).await.expect("claim");
        assert_eq!(again.kind, ClaimKind::Existing);
        assert_eq!(again.owner, Some(owner("a", 1)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    gone(&store, "a").await;
    let moved = store
        .claim(&name("room"), &[id("a"), id("b")])
        .await
        .expect("claim");
    assert_eq!(moved.kind, ClaimKind::Rehomed);
    assert_eq!(moved.owner, Some(owner("b", 2)), "epoch is previous + 1");
    assert_eq!(moved.skipped, 1, "the dead node was passed over");
    assert_eq!(
        store
            .lookup(&name("room"))
            .await
            .expect("lookup")
            .map(|r| r.owner),
        Some(owner("b", 2))
    );
    // The dead owner's stale release cannot touch the new claim.
    assert!(!store
        .release(&name("room"), &owner("a", 1))
        .await
        .expect("release"));
    assert_eq!(
        store
            .lookup(&name("room"))
            .await
            .expect("lookup")
            .map(|r| r.owner),
        Some(owner("b", 2))
    );
}

/// The node listing and the claim agree on the millisecond a node's lease ends: a node the
/// listing no longer shows is dead to the claim too. Redis keeps a key through the
/// millisecond it expires at, so the listing must keep the node through it as well.
#[tokio::test]
async fn a_node_the_listing_calls_gone_is_gone_to_the_claim() {
    let (redis, store) = with_nodes(&[]).await;
    // Room for a conference from every round.
    store
        .register(&node("b", 100), LONG)
        .await
        .expect("register b");
    let prefix = store.prefix().to_string();
    let b = [id("b")];
    // A pair that straddles the millisecond (the listing before it, the claim after) says
    // nothing; another round is tried.
    for round in 0..20 {
        store
            .register(&node("a", 10), LONG)
            .await
            .expect("register a");
        let room = name(&format!("edge-{round}"));
        let first = store.claim(&room, &[id("a")]).await.expect("claim");
        assert_eq!(first.owner, Some(owner("a", 1)));
        // Node a's record and its index entry end on the same millisecond, as a heartbeat
        // leaves them when Redis's clock does not tick during the script.
        let (secs, micros): (String, String) =
            redis_query(redis.port(), &mut redis::cmd("TIME")).expect("time");
        let now_ms = secs.parse::<u64>().expect("secs") * 1000
            + micros.parse::<u64>().expect("micros") / 1000;
        let end = now_ms + 200;
        let _: i64 = redis_query(
            redis.port(),
            redis::cmd("PEXPIREAT")
                .arg(format!("{prefix}node:a"))
                .arg(end),
        )
        .expect("pexpireat");
        let _: i64 = redis_query(
            redis.port(),
            redis::cmd("ZADD")
                .arg(format!("{prefix}nodes"))
                .arg(end)
                .arg("a"),
        )
        .expect("zadd");
        // Each listing and the claim after it go out together and nearly always run in the
        // same millisecond, one pair after another until the listing drops a: some pair runs
        // in the millisecond the lease ends. The store's one multiplexed connection sends
        // them in the order `join!` first polls them: the listing, then the claim.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (nodes, claim) = tokio::join!(store.list_nodes(), store.claim(&room, &b));
            let listed = nodes.expect("list").iter().any(|n| n.info.id == id("a"));
            let claim = claim.expect("claim");
            if !listed {
                assert_eq!(
                    claim.kind,
                    ClaimKind::Rehomed,
                    "the listing dropped node a; the claim right after it still kept a's conference"
                );
                assert_eq!(claim.owner, Some(owner("b", 2)));
                return;
            }
            if claim.kind == ClaimKind::Rehomed {
                break;
            }
            assert_eq!(claim.kind, ClaimKind::Existing, "a is still listed");
            assert!(Instant::now() < deadline, "node a never left the listing");
        }
    }
    panic!("every round's pair straddled the end of the lease");
}

/// Invariant 4: a serving node whose heartbeat says its ARI is down is passed over for new
/// conferences, keeps the ones it has (empty or not), and is a candidate again once it is back.
#[tokio::test]
async fn claim_skips_a_node_whose_ari_is_down_but_keeps_its_conferences() {
    let (_redis, store) = with_nodes(&["a", "b"]).await;
    let old = store.claim(&name("old"), &[id("a")]).await.expect("claim");
    assert_eq!(old.owner, Some(owner("a", 1)));
    let deaf = NodeLoad {
        ari: false,
        ..NodeLoad::default()
    };
    let hosted = [Hosted {
        name: name("old"),
        epoch: 1,
        participants: 0,
        count_version: 1,
    }];
    store
        .heartbeat(&id("a"), &deaf, LONG, &hosted)
        .await
        .expect("heartbeat");
    let nodes = store.list_nodes().await.expect("list");
    let a = nodes.iter().find(|n| n.info.id == id("a")).expect("a");
    assert!(!a.load.ari, "the record says ARI is down");

    let fresh = store
        .claim(&name("fresh"), &[id("a"), id("b")])
        .await
        .expect("claim");
    assert_eq!(fresh.kind, ClaimKind::Claimed);
    assert_eq!(fresh.owner, Some(owner("b", 1)), "no new conference on a");
    assert_eq!(fresh.skipped, 1);
    let none = store.claim(&name("none"), &[id("a")]).await.expect("claim");
    assert_eq!(none.kind, ClaimKind::NoCapacity);

    let kept = store.claim(&name("old"), &[id("b")]).await.expect("claim");
    assert_eq!(
        kept.kind,
        ClaimKind::Existing,
        "its conference keeps its home"
    );
    assert_eq!(kept.owner, Some(owner("a", 1)));

    store
        .heartbeat(&id("a"), &NodeLoad::default(), LONG, &hosted)
        .await
        .expect("heartbeat");
    let back = store.claim(&name("back"), &[id("a")]).await.expect("claim");
    assert_eq!(
        back.owner,
        Some(owner("a", 1)),
        "a takes new conferences again"
    );
}

/// Invariant 4 with `node.participant_capacity`: a node whose last heartbeat counted its
/// participant limit gets no new conference, keeps its own, and is a candidate again once
/// callers leave; a node without such a limit is placed on whatever its count.
#[tokio::test]
async fn claim_skips_a_node_at_its_participant_capacity_but_keeps_its_conferences() {
    let redis = RedisServer::start().expect("redis");
    let store = fixtures::store(&fixtures::single(&redis.url()));
    let limited = NodeInfo {
        participant_capacity: 30,
        ..node("a", 10)
    };
    store.register(&limited, LONG).await.expect("register a");
    store
        .register(&node("b", 10), LONG)
        .await
        .expect("register b");
    let listed = store.get_node(&id("a")).await.expect("get").expect("a");
    assert_eq!(
        listed.info.participant_capacity, 30,
        "the record keeps the limit"
    );

    let big = store.claim(&name("big"), &[id("a")]).await.expect("claim");
    assert_eq!(big.owner, Some(owner("a", 1)));
    let hosted = |participants| {
        [Hosted {
            name: name("big"),
            epoch: 1,
            participants,
            count_version: 1,
        }]
    };
    let beat = |node: &'static str, participants: u32, h: [Hosted; 1]| {
        let store = store.clone();
        async move {
            let load = NodeLoad {
                conferences: 1,
                participants,
                ..NodeLoad::default()
            };
            store
                .heartbeat(&id(node), &load, LONG, &h)
                .await
                .expect("heartbeat");
        }
    };
    beat("a", 29, hosted(29)).await;
    let under = store
        .claim(&name("under"), &[id("a")])
        .await
        .expect("claim");
    assert_eq!(under.owner, Some(owner("a", 1)), "29 of 30: room");

    beat("a", 30, hosted(30)).await;
    let fresh = store
        .claim(&name("fresh"), &[id("a"), id("b")])
        .await
        .expect("claim");
    assert_eq!(
        fresh.owner,
        Some(owner("b", 1)),
        "30 of 30: no new conference"
    );
    assert_eq!(fresh.skipped, 1);
    let none = store.claim(&name("none"), &[id("a")]).await.expect("claim");
    assert_eq!(none.kind, ClaimKind::NoCapacity);
    let kept = store.claim(&name("big"), &[id("b")]).await.expect("claim");
    assert_eq!(
        kept.kind,
        ClaimKind::Existing,
        "its conference keeps its home"
    );
    assert_eq!(kept.owner, Some(owner("a", 1)));

    // No limit: b takes a conference whatever its participants.
    store
        .heartbeat(
            &id("b"),
            &NodeLoad {
                participants: 100_000,
                ..NodeLoad::default()
            },
            LONG,
            &[],
        )
        .await
        .expect("heartbeat b");
    let unlimited = store
        .claim(&name("unlimited"), &[id("b")])
        .await
        .expect("claim");
    assert_eq!(unlimited.owner, Some(owner("b", 1)));

    beat("a", 12, hosted(12)).await;
    let back = store.claim(&name("back"), &[id("a")]).await.expect("claim");
    assert_eq!(back.owner, Some(owner("a", 1)), "callers left: room again");
}

/// Invariant 4 from registration: an agent that registers with its ARI down is no candidate
/// before any heartbeat, and a registration that says nothing of ARI does not inherit the
/// last life's state.
#[tokio::test]
async fn an_agent_registered_with_ari_down_is_no_candidate() {
    let redis = RedisServer::start().expect("redis");
    let store = fixtures::store(&fixtures::single(&redis.url()));
    store
        .register_agent(&node("a", 10), LONG, false)
        .await
        .expect("register");
    let none = store.claim(&name("room"), &[id("a")]).await.expect("claim");
    assert_eq!(none.kind, ClaimKind::NoCapacity);
    assert_eq!(none.skipped, 1);
    let nodes = store.list_nodes().await.expect("list");
    assert!(!nodes[0].load.ari, "the record says ARI is down");

    store
        .register(&node("a", 10), LONG)
        .await
        .expect("register");
    let placed = store.claim(&name("room"), &[id("a")]).await.expect("claim");
    assert_eq!(placed.owner, Some(owner("a", 1)));

    store
        .register_agent(&node("a", 10), LONG, true)
        .await
        .expect("register");
    let more = store.claim(&name("more"), &[id("a")]).await.expect("claim");
    assert_eq!(more.owner, Some(owner("a", 1)));
}

/// Invariant 4's deadline across agent restarts: the record keeps when the node's drain
/// began (Redis time) from the first change to draining until it serves again; a repeated
/// write or a registration of the live record keeps it; a draining registration of a
/// record that expired takes the start its agent remembers.
#[tokio::test]
async fn a_drain_keeps_when_it_began_until_the_node_serves_again() {
    let redis = RedisServer::start().expect("redis");
    let store = fixtures::store(&fixtures::single(&redis.url()));
    let since = |store: &Store| {
        let store = store.clone();
        async move {
            store
                .get_node(&id("a"))
                .await
                .expect("get")
                .expect("live")
                .drain_since_ms
        }
    };
    store
        .register_agent(&node("a", 10), LONG, true)
        .await
        .expect("register");
    assert_eq!(
        since(&store).await,
        None,
        "a serving node has no drain start"
    );
    let rec = store.get_node(&id("a")).await.expect("get").expect("live");
    assert_eq!(
        rec.lease_period_ms,
        Some(LONG.as_millis() as u64),
        "the record says how long each renewal's lease is"
    );

    store
        .set_state(&id("a"), NodeState::Draining)
        .await
        .expect("admin drain");
    let first = since(&store).await.expect("the drain's start is recorded");
    let now = redis_time(&redis);
    assert!(
        first <= now && now - first < 5_000,
        "Redis time: {first} vs {now}"
    );

    // The agent adopts the drain and writes it again; then it restarts while the record
    // lives and registers draining, remembering a later start: the record's own stands.
    store
        .set_own_state(&id("a"), NodeState::Draining, false)
        .await
        .expect("own write");
    let mut draining = node("a", 10);
    draining.state = NodeState::Draining;
    store
        .register_draining_agent(&draining, LONG, true, first + 1_000)
        .await
        .expect("register draining");
    assert_eq!(since(&store).await, Some(first));

    store
        .set_state(&id("a"), NodeState::Serving)
        .await
        .expect("undrain");
    assert_eq!(since(&store).await, None, "serving again clears it");

    // A record that expired: the registration brings the start its agent remembers.
    store
        .set_state(&id("a"), NodeState::Draining)
        .await
        .expect("drain");
    store.deregister(&id("a")).await.expect("deregister");
    store
        .register_draining_agent(&draining, LONG, true, first)
        .await
        .expect("register draining");
    assert_eq!(since(&store).await, Some(first));

    // Its shutdown, and a registration during it, keep it too.
    store
        .set_own_state(&id("a"), NodeState::ShuttingDown, true)
        .await
        .expect("shutting down");
    let mut stopping = node("a", 10);
    stopping.state = NodeState::ShuttingDown;
    store
        .register_agent(&stopping, LONG, true)
        .await
        .expect("register shutting down");
    assert_eq!(since(&store).await, Some(first));

    // A serving registration starts without one.
    store
        .register_agent(&node("a", 10), LONG, true)
        .await
        .expect("register serving");
    assert_eq!(since(&store).await, None);
}

/// A registration that read the record's state before an admin changed it (the agent's id
/// check, then its registration) keeps the admin's drain or undrain, with its drain start;
/// one that read the current state, or over the agent's own stopping record, writes its own.
#[tokio::test]
async fn a_registration_keeps_a_state_an_admin_set_after_the_agent_read_it() {
    let redis = RedisServer::start().expect("redis");
    let store = fixtures::store(&fixtures::single(&redis.url()));
    let a = id("a");
    let read = |store: &Store| {
        let store = store.clone();
        async move {
            let rec = store.get_node(&id("a")).await.expect("get").expect("live");
            (rec.info.state, rec.drain_since_ms)
        }
    };
    let seen = |state| Registration {
        ari: Some(true),
        drain_since_ms: None,
        seen: Some(state),
        stopping: false,
    };
    store
        .register_agent(&node("a", 10), LONG, true)
        .await
        .expect("register");

    // Read serving, then an admin drains: the serving registration keeps the drain.
    store
        .set_state(&a, NodeState::Draining)
        .await
        .expect("admin drain");
    let (_, since) = read(&store).await;
    assert!(since.is_some());
    let before = store
        .register_with(&node("a", 10), LONG, &seen(NodeState::Serving))
        .await
        .expect("register");
    assert_eq!(before, Some(NodeState::Draining));
    assert_eq!(read(&store).await, (NodeState::Draining, since));

    // Read draining (resuming the drain), then an admin undrains: serving it stays.
    store
        .set_state(&a, NodeState::Serving)
        .await
        .expect("admin undrain");
    let mut draining = node("a", 10);
    draining.state = NodeState::Draining;
    let resuming = Registration {
        drain_since_ms: since,
        ..seen(NodeState::Draining)
    };
    store
        .register_with(&draining, LONG, &resuming)
        .await
        .expect("register");
    assert_eq!(read(&store).await, (NodeState::Serving, None));

    // Read what is there: the agent's own state is written.
    let resumed = Registration {
        seen: Some(NodeState::Serving),
        ..resuming
    };
    store
        .register_with(&draining, LONG, &resumed)
        .await
        .expect("register");
    assert_eq!(read(&store).await, (NodeState::Draining, since));

    // Without a state read (a registration after a lost record), the agent's own is written.
    store
        .register_agent(&node("a", 10), LONG, true)
        .await
        .expect("register");
    assert_eq!(read(&store).await, (NodeState::Serving, None));

    // The agent's own shutdown drain is no admin's change: a new life serves.
    store
        .set_own_state(&a, NodeState::Draining, true)
        .await
        .expect("own shutdown drain");
    store
        .register_with(&node("a", 10), LONG, &seen(NodeState::Serving))
        .await
        .expect("register");
    assert_eq!(read(&store).await, (NodeState::Serving, None));
}

/// A node in its shutdown drain whose record expired (Redis slow past its lease) registers
/// it again marked stopping in the same step: an admin's undrain in between cannot make a
/// stopping node serving and place new conferences on it (invariant 4). A registration of a
/// new life clears an old mark.
#[tokio::test]
async fn a_stopping_agent_registering_again_keeps_its_record_stopping() {
    let (_redis, store) = with_nodes(&[]).await;
    let mut draining = node("a", 10);
    draining.state = NodeState::Draining;
    let stopping = Registration {
        ari: Some(true),
        stopping: true,
        ..Registration::default()
    };
    store
        .register_with(&draining, LONG, &stopping)
        .await
        .expect("register");
    let refused = store
        .set_state(&id("a"), NodeState::Serving)
        .await
        .expect("refused");
    assert_eq!(refused, StateChange::Stopping(NodeState::Draining));
    let room = name("after-the-stop");
    let claim = store.claim(&room, &[id("a")]).await.expect("claim");
    assert_eq!(claim.kind, ClaimKind::NoCapacity, "{claim:?}");
    // An agent that read its record serving, then began its stop before it could register,
    // registers draining and stopping even though an admin made the record serving since:
    // a stopping node takes no new conference.
    store
        .register_with(&node("a", 10), LONG, &Registration::default())
        .await
        .expect("register unmarked");
    let read_then = Registration {
        seen: Some(NodeState::Draining),
        ..stopping
    };
    store
        .set_state(&id("a"), NodeState::Serving)
        .await
        .expect("admin undrain");
    store
        .register_with(&draining, LONG, &read_then)
        .await
        .expect("register");
    let rec = store.get_node(&id("a")).await.expect("read").expect("live");
    assert_eq!(rec.info.state, NodeState::Draining);
    let claim = store.claim(&room, &[id("a")]).await.expect("claim");
    assert_eq!(claim.kind, ClaimKind::NoCapacity, "{claim:?}");
    // A new life of the agent starts unmarked: an admin may change its state again.
    store
        .register_with(&draining, LONG, &Registration::default())
        .await
        .expect("register");
    let changed = store
        .set_state(&id("a"), NodeState::Serving)
        .await
        .expect("undrain");
    assert_eq!(changed, StateChange::Changed(NodeState::Draining));
}

/// The state a heartbeat reads back from its node's record under the number its last
/// write gave it.
async fn heartbeat_state(store: &Store) -> (NodeState, Option<u64>) {
    let load = NodeLoad::default();
    match store
        .heartbeat(&id("a"), &load, LONG, &[])
        .await
        .expect("heartbeat")
    {
        Heartbeat::Renewed {
            state, state_seq, ..
        } => (state, state_seq),
        other => panic!("unexpected {other:?}"),
    }
}

/// Every state write numbers the state with Redis's clock (one past the last when that is
/// not behind it), so an agent can tell a failover that took its record back from an admin's
/// change, and a write after a failover is numbered above what the lost ones had; a state
/// written without a number (a controller from before) reads as unnumbered; a write that
/// names the number it read is not made over one written since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_writes_are_numbered_and_heartbeats_read_the_number() {
    let (redis, store) = with_nodes(&["a"]).await;
    let numbered = |want: NodeState| {
        let store = &store;
        async move {
            let (state, seq) = heartbeat_state(store).await;
            assert_eq!(state, want);
            seq.expect("numbered")
        }
    };
    let first = numbered(NodeState::Serving).await;
    assert!(
        first >= redis_time(&redis) - 60_000,
        "Redis's clock: {first}"
    );
    store
        .set_state(&id("a"), NodeState::Draining)
        .await
        .expect("drain");
    let drained = numbered(NodeState::Draining).await;
    assert!(drained > first);
    store
        .set_own_state(&id("a"), NodeState::Serving, false)
        .await
        .expect("own write");
    let own = numbered(NodeState::Serving).await;
    assert!(own > drained);
    // A registration over the live record goes on numbering.
    store
        .register(&node("a", 10), LONG)
        .await
        .expect("register");
    let registered = numbered(NodeState::Serving).await;
    assert!(registered > own);
    // A number ahead of the clock (a primary whose clock ran fast) is still passed.
    let ahead = redis_time(&redis) + 3_600_000;
    let _: Option<i64> = redis_query(
        redis.port(),
        redis::cmd("HSET")
            .arg("{confroute}:node:a")
            .arg("state_seq")
            .arg(ahead),
    );
    store
        .set_state(&id("a"), NodeState::Draining)
        .await
        .expect("drain");
    assert_eq!(numbered(NodeState::Draining).await, ahead + 1);
    // A write back over a number that is no longer the record's is not made.
    let change = store
        .restore_own_state(&id("a"), NodeState::Serving, false, registered)
        .await
        .expect("conditional");
    assert_eq!(change, StateChange::Superseded(NodeState::Draining));
    assert_eq!(numbered(NodeState::Draining).await, ahead + 1);
    let change = store
        .restore_own_state(&id("a"), NodeState::Serving, false, ahead + 1)
        .await
        .expect("conditional");
    assert_eq!(change, StateChange::Changed(NodeState::Draining));
    assert_eq!(numbered(NodeState::Serving).await, ahead + 2);
    // A refused admin change (the node is stopping) writes nothing, so numbers nothing.
    store
        .set_own_state(&id("a"), NodeState::Draining, true)
        .await
        .expect("stopping");
    let refused = store
        .set_state(&id("a"), NodeState::Serving)
        .await
        .expect("refused");
    assert_eq!(refused, StateChange::Stopping(NodeState::Draining));
    assert_eq!(numbered(NodeState::Draining).await, ahead + 3);
    let _: Option<i64> = redis_query(
        redis.port(),
        redis::cmd("HSET")
            .arg("{confroute}:node:a")
            .arg("state")
            .arg("serving"),
    );
    assert_eq!(heartbeat_state(&store).await, (NodeState::Serving, None));
}

/// Redis's clock, in ms since the epoch.
fn redis_time(redis: &RedisServer) -> u64 {
    let (secs, micros): (u64, u64) =
        redis_query(redis.port(), &mut redis::cmd("TIME")).expect("TIME");
    secs * 1000 + micros / 1000
}

#[tokio::test]
async fn draining_node_gets_no_new_conference_but_keeps_its_busy_ones() {
    let redis = RedisServer::start().expect("redis");
    let store = fixtures::store(&fixtures::single(&redis.url()));
    store
        .register(&node("a", 10), LONG)
        .await
        .expect("register a");
    store
        .register(&node("b", 10), LONG)
        .await
        .expect("register b");
    let busy = store.claim(&name("busy"), &[id("a")]).await.expect("claim");
    let empty = store
        .claim(&name("empty"), &[id("a")])
        .await
        .expect("claim");
    assert_eq!(busy.owner, Some(owner("a", 1)));
    assert_eq!(empty.owner, Some(owner("a", 1)));
    assert!(store
        .set_participants(&name("busy"), &owner("a", 1), 3, 1, None)
        .await
        .expect("participants"));

    assert_eq!(
        store
            .set_state(&id("a"), NodeState::Draining)
            .await
            .expect("drain"),
        StateChange::Changed(NodeState::Serving)
    );

    let fresh = store
        .claim(&name("fresh"), &[id("a"), id("b")])
        .await
        .expect("claim");
    assert_eq!(fresh.kind, ClaimKind::Claimed);
    assert_eq!(
        fresh.owner,
        Some(owner("b", 1)),
        "no new conference on a draining node"
    );

    let still = store.claim(&name("busy"), &[id("b")]).await.expect("claim");
    assert_eq!(still.kind, ClaimKind::Existing);
    assert_eq!(
        still.owner,
        Some(owner("a", 1)),
        "joiners still reach the draining node"
    );

    // An empty conference on a node that is not serving moves on the next call.
    let moved = store
        .claim(&name("empty"), &[id("b")])
        .await
        .expect("claim");
    assert_eq!(moved.kind, ClaimKind::Rehomed);
    assert_eq!(moved.owner, Some(owner("b", 2)));

    let none = store
        .claim(&name("nowhere"), &[id("a")])
        .await
        .expect("claim");
    assert_eq!(none.kind, ClaimKind::NoCapacity);
    assert_eq!(none.owner, None);
    assert_eq!(store.lookup(&name("nowhere")).await.expect("lookup"), None);
}

/// The agent writes a count of 1 for the first caller of an empty conference before the ARI
/// work; a heartbeat whose snapshot was taken just before must not put 0 back, or a drain
/// would move the conference under that caller (two homes). A newer heartbeat still writes.
#[tokio::test]
async fn a_heartbeat_with_an_older_count_does_not_undo_a_newer_one() {
    let (_redis, store) = with_nodes(&["a", "b"]).await;
    let room = name("first-in");
    store.claim(&room, &[id("a")]).await.expect("claim");
    assert!(store
        .set_participants(&room, &owner("a", 1), 1, 10, None)
        .await
        .expect("count"));
    let load = NodeLoad {
        conferences: 1,
        participants: 0,
        cpu: 0.0,
        ari: true,
    };
    let beat = |participants, count_version| {
        [Hosted {
            name: room.clone(),
            epoch: 1,
            participants,
            count_version,
        }]
    };
    store
        .heartbeat(&id("a"), &load, LONG, &beat(0, 9))
        .await
        .expect("older heartbeat");
    let rec = store.lookup(&room).await.expect("lookup").expect("claimed");
    assert_eq!(
        rec.participants, 1,
        "an older snapshot leaves the count alone"
    );
    store
        .set_state(&id("a"), NodeState::Draining)
        .await
        .expect("drain");
    let still = store.claim(&room, &[id("b")]).await.expect("claim");
    assert_eq!(still.kind, ClaimKind::Existing);
    assert_eq!(still.owner, Some(owner("a", 1)), "one home");

    store
        .heartbeat(&id("a"), &load, LONG, &beat(0, 11))
        .await
        .expect("newer heartbeat");
    let rec = store.lookup(&room).await.expect("lookup").expect("claimed");
    assert_eq!(rec.participants, 0, "a newer snapshot is written");
    let moved = store.claim(&room, &[id("b")]).await.expect("claim");
    assert_eq!(
        moved.kind,
        ClaimKind::Rehomed,
        "empty on a draining node: moves"
    );
}

/// Records written by hand or by something else, with fields missing or not numbers, are
/// each passed over or read as zero: they do not fail the operation for everything else
/// (one unreadable node record hid every node from placement; a conference whose epoch was
/// not a number could never be claimed, listed or numbered while its lease was renewed).
#[tokio::test]
async fn unreadable_fields_fail_no_operation_for_the_rest() {
    let (redis, store) = with_nodes(&["a", "b"]).await;
    let port = redis.port();
    // A node record with nothing but its id, listed in the node index.
    let _: Option<i64> = redis_query(
        port,
        redis::cmd("HSET")
            .arg("{confroute}:node:broken")
            .arg("id")
            .arg("broken"),
    );
    let _: Option<i64> = redis_query(
        port,
        redis::cmd("ZADD")
            .arg("{confroute}:nodes")
            .arg(i64::MAX / 2)
            .arg("broken"),
    );
    let nodes = store
        .list_nodes()
        .await
        .expect("the readable nodes are listed");
    let mut ids: Vec<String> = nodes.iter().map(|n| n.info.id.to_string()).collect();
    ids.sort();
    assert_eq!(ids, ["a", "b"]);

    // A node whose running count of placements is not a number still takes conferences.
    let _: Option<i64> = redis_query(
        port,
        redis::cmd("HSET")
            .arg("{confroute}:node:a")
            .arg("placements")
            .arg("lots"),
    );
    // A conference of node a whose epoch and callback numbering are not numbers.
    store.claim(&name("odd"), &[id("a")]).await.expect("claim");
    for (field, value) in [("epoch", "seven"), ("callback_seq", "many")] {
        let _: Option<i64> = redis_query(
            port,
            redis::cmd("HSET")
                .arg("{confroute}:conf:odd")
                .arg(field)
                .arg(value),
        );
    }
    let again = store.claim(&name("odd"), &[id("b")]).await.expect("claim");
    assert_eq!(again.kind, ClaimKind::Existing, "its live owner keeps it");
    assert_eq!(again.owner, Some(owner("a", 0)));
    let page = store.list_conferences(None, 10).await.expect("list");
    assert_eq!(page.items.len(), 1, "{:?}", page.items);
    assert_eq!(page.items[0].0, name("odd"));
    assert_eq!(page.items[0].1.owner, owner("a", 0));
    let ceiling = store
        .reserve_sequence(SequenceKind::Callbacks, &name("odd"), &id("a"), 100, 0)
        .await
        .expect("reserve");
    assert_eq!(ceiling, Some(200), "counted as the first block only");
}

#[tokio::test]
async fn release_is_compare_and_delete() {
    let (_redis, store) = with_nodes(&["a"]).await;
    store.claim(&name("x"), &[id("a")]).await.expect("claim");
    for stale in [owner("a", 2), owner("a", 0), owner("b", 1)] {
        assert!(
            !store.release(&name("x"), &stale).await.expect("release"),
            "{stale:?}"
        );
        assert!(store.lookup(&name("x")).await.expect("lookup").is_some());
        assert!(!store.renew(&name("x"), &stale).await.expect("renew"));
        assert!(!store
            .set_participants(&name("x"), &stale, 9, 1, None)
            .await
            .expect("participants"));
    }
    assert!(store
        .renew(&name("x"), &owner("a", 1))
        .await
        .expect("renew"));
    assert!(store
        .release(&name("x"), &owner("a", 1))
        .await
        .expect("release"));
    assert_eq!(store.lookup(&name("x")).await.expect("lookup"), None);
    let page = store.list_conferences(None, 100).await.expect("list");
    assert!(page.items.is_empty());
    let nodes = store.list_nodes().await.expect("nodes");
    assert_eq!(nodes[0].claimed, 0, "release frees the node's capacity");

    // The name's next life, on the same node, starts above the ended epoch: the ended
    // life's release arriving late (retried, or delayed in the network) matches nothing.
    let next = store.claim(&name("x"), &[id("a")]).await.expect("claim");
    assert_eq!(next.owner, Some(owner("a", 2)));
    assert!(!store
        .release(&name("x"), &owner("a", 1))
        .await
        .expect("release"));
    let rec = store.lookup(&name("x")).await.expect("lookup");
    assert_eq!(
        rec.map(|r| r.owner),
        Some(owner("a", 2)),
        "the new life stands"
    );
}

#[tokio::test]
async fn capacity_is_a_hard_limit_even_under_concurrency() {
    let redis = RedisServer::start().expect("redis");
    let store = fixtures::store(&fixtures::single(&redis.url()));
    store
        .register(&node("small", 10), LONG)
        .await
        .expect("register");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .claim(&name(&format!("c{i}")), &[id("small")])
                .await
                .expect("claim")
                .kind
        }));
    }
    let mut claimed = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.expect("task") {
            ClaimKind::Claimed => claimed += 1,
            ClaimKind::NoCapacity => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((claimed, refused), (10, 40));
    let nodes = store.list_nodes().await.expect("nodes");
    assert_eq!(nodes[0].claimed, 10);
}

#[tokio::test]
async fn scripts_are_reloaded_after_script_flush() {
    let (redis, store) = with_nodes(&["a"]).await;
    store.claim(&name("one"), &[id("a")]).await.expect("claim");
    let flushed: Option<String> = redis_query(redis.port(), redis::cmd("SCRIPT").arg("FLUSH"));
    assert_eq!(flushed.as_deref(), Some("OK"));
    let c = store
        .claim(&name("two"), &[id("a")])
        .await
        .expect("claim after flush");
    assert_eq!(c.kind, ClaimKind::Claimed);
    store
        .heartbeat(&id("a"), &NodeLoad::default(), LONG, &[])
        .await
        .expect("heartbeat after flush");
}

/// After a failover a Cluster's new primary has none of the scripts (NOSCRIPT): each is run
/// again on the node its keys live on, not loaded on every node of the Cluster, so a node
/// that does not answer meanwhile (restarting, loading, not yet failed over) does not stop
/// claims and heartbeats.
#[tokio::test]
async fn scripts_are_run_where_their_keys_are_with_a_cluster_node_not_answering() {
    let cluster = RedisCluster::start().expect("cluster");
    let store = fixtures::store(&fixtures::cluster(&cluster.seeds()));
    store
        .register(&node("a", 10), LONG)
        .await
        .expect("register");
    for n in cluster.nodes() {
        let flushed: Option<String> = redis_query(n.port(), redis::cmd("SCRIPT").arg("FLUSH"));
        assert_eq!(flushed.as_deref(), Some("OK"));
    }
    // A node holding none of the data (every key is in the one `{confroute}` slot) stops
    // answering, for longer than the store waits for an answer.
    let quiet = cluster
        .nodes()
        .iter()
        .find(|n| redis_query::<i64>(n.port(), &mut redis::cmd("DBSIZE")) == Some(0))
        .expect("a node without the data");
    let paused: Option<String> = redis_query(
        quiet.port(),
        redis::cmd("CLIENT").arg("PAUSE").arg(60_000).arg("ALL"),
    );
    assert_eq!(paused.as_deref(), Some("OK"));
    let c = store
        .claim(&name("after-flush"), &[id("a")])
        .await
        .expect("claim with a node of the Cluster not answering");
    assert_eq!(c.kind, ClaimKind::Claimed);
    store
        .heartbeat(&id("a"), &NodeLoad::default(), LONG, &[])
        .await
        .expect("heartbeat with a node of the Cluster not answering");
    let _: Option<String> = redis_query(quiet.port(), redis::cmd("CLIENT").arg("UNPAUSE"));
}

#[tokio::test]
async fn heartbeat_renews_owned_claims_and_reports_lost_ones() {
    let redis = RedisServer::start().expect("redis");
    let cfg = RedisConfig {
        conference_lease: Duration::from_millis(1500),
        ..fixtures::single(&redis.url())
    };
    let store = fixtures::store(&cfg);
    store
        .register(&node("a", 10), LONG)
        .await
        .expect("register a");
    store
        .register(&node("b", 10), LONG)
        .await
        .expect("register b");
    store.claim(&name("mine"), &[id("a")]).await.expect("claim");
    store
        .claim(&name("theirs"), &[id("b")])
        .await
        .expect("claim");
    store
        .claim(&name("en-route"), &[id("a")])
        .await
        .expect("claim");

    let hosted = vec![
        Hosted {
            name: name("mine"),
            epoch: 1,
            participants: 4,
            count_version: 1,
        },
        Hosted {
            name: name("theirs"),
            epoch: 1,
            participants: 2,
            count_version: 1,
        },
        Hosted {
            name: name("gone"),
            epoch: 1,
            participants: 1,
            count_version: 1,
        },
    ];
    let load = NodeLoad {
        conferences: 1,
        participants: 4,
        cpu: 12.5,
        ari: true,
    };
    // An ordinary heartbeat leaves a missing claim alone: its conference may just have
    // ended and released it.
    match store
        .heartbeat(&id("a"), &load, LONG, &hosted)
        .await
        .expect("heartbeat")
    {
        Heartbeat::Renewed { state, hosted, .. } => {
            assert_eq!(state, NodeState::Serving);
            assert_eq!(
                hosted,
                vec![
                    HostedStatus::Owned,
                    HostedStatus::Lost,
                    HostedStatus::Missing
                ]
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(store.lookup(&name("gone")).await.expect("lookup").is_none());
    // After Redis trouble or a new registration the node asks to claim it again.
    match store
        .heartbeat_reclaiming(&id("a"), &load, LONG, &hosted)
        .await
        .expect("heartbeat")
    {
        Heartbeat::Renewed { hosted, .. } => assert_eq!(
            hosted,
            vec![
                HostedStatus::Owned,
                HostedStatus::Lost,
                HostedStatus::Reclaimed
            ]
        ),
        other => panic!("unexpected {other:?}"),
    }
    let mine = store
        .lookup(&name("mine"))
        .await
        .expect("lookup")
        .expect("exists");
    assert_eq!(mine.participants, 4);
    let a = store
        .get_node(&id("a"))
        .await
        .expect("node")
        .expect("registered");
    assert_eq!(a.load.participants, 4);
    assert!((a.load.cpu - 12.5).abs() < 0.01);
    assert_eq!(a.claimed, 3, "mine, en-route and gone (claimed again)");
    // The expired claim is back for its node at the node's epoch, with its participants.
    let gone = store
        .lookup(&name("gone"))
        .await
        .expect("lookup")
        .expect("claimed again by the heartbeat");
    assert_eq!((gone.owner.node.as_str(), gone.owner.epoch), ("a", 1));
    assert_eq!(gone.participants, 1);

    // Only renewed claims outlive the conference lease; the heartbeat then drops the
    // expired placement from the node's capacity count.
    let only_mine = &hosted[..1];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        store
            .heartbeat(&id("a"), &load, LONG, only_mine)
            .await
            .expect("heartbeat");
        // "gone" was claimed again after "en-route": both must have run out.
        let en_route = store.lookup(&name("en-route")).await.expect("lookup");
        let gone = store.lookup(&name("gone")).await.expect("lookup");
        if en_route.is_none() && gone.is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "unrenewed claims never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store
        .heartbeat(&id("a"), &load, LONG, only_mine)
        .await
        .expect("heartbeat");
    assert!(store.lookup(&name("mine")).await.expect("lookup").is_some());
    let a = store
        .get_node(&id("a"))
        .await
        .expect("node")
        .expect("registered");
    assert_eq!(a.claimed, 1, "expired placement pruned");

    // A node shutting down ends its conferences: it claims nothing again.
    store
        .set_state(&id("a"), NodeState::ShuttingDown)
        .await
        .expect("set state");
    let gone_again = [Hosted {
        name: name("en-route"),
        epoch: 1,
        participants: 1,
        count_version: 1,
    }];
    match store
        .heartbeat_reclaiming(&id("a"), &load, LONG, &gone_again)
        .await
        .expect("heartbeat")
    {
        Heartbeat::Renewed { hosted, .. } => assert_eq!(hosted, vec![HostedStatus::Missing]),
        other => panic!("unexpected {other:?}"),
    }
    assert!(store
        .lookup(&name("en-route"))
        .await
        .expect("lookup")
        .is_none());

    assert_eq!(
        store
            .heartbeat(&id("nobody"), &load, LONG, &[])
            .await
            .expect("heartbeat"),
        Heartbeat::Unregistered
    );
}

/// The placement set has the node's lease, the claims a longer one: when the node record
/// expires (Redis away, process paused) and the node registers again, its heartbeats must
/// count its conferences again, or claims would place more than its capacity on it.
#[tokio::test]
async fn heartbeat_after_the_node_lease_expired_restores_its_capacity_count() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    let short = Duration::from_millis(300);
    store
        .register(&node("small", 2), short)
        .await
        .expect("register");
    for c in ["c1", "c2"] {
        let claim = store.claim(&name(c), &[id("small")]).await.expect("claim");
        assert_eq!(claim.kind, ClaimKind::Claimed, "{c}");
    }
    let full = store
        .claim(&name("c3"), &[id("small")])
        .await
        .expect("claim");
    assert_eq!(full.kind, ClaimKind::NoCapacity);

    let node_key = format!("{}node:small", cfg.prefix);
    let set_key = format!("{node_key}:confs");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Option<i64> = redis_query(
            redis.port(),
            redis::cmd("EXISTS").arg(&node_key).arg(&set_key),
        );
        if left == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node lease never expired: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in ["c1", "c2"] {
        assert!(
            store.lookup(&name(c)).await.expect("lookup").is_some(),
            "{c}: the claim outlives the node lease"
        );
    }

    store
        .register(&node("small", 2), LONG)
        .await
        .expect("register again");
    let hosted: Vec<Hosted> = ["c1", "c2"]
        .iter()
        .map(|c| Hosted {
            name: name(c),
            epoch: 1,
            participants: 1,
            count_version: 1,
        })
        .collect();
    match store
        .heartbeat(&id("small"), &NodeLoad::default(), LONG, &hosted)
        .await
        .expect("heartbeat")
    {
        Heartbeat::Renewed { hosted, .. } => {
            assert_eq!(hosted, vec![HostedStatus::Owned, HostedStatus::Owned])
        }
        other => panic!("unexpected {other:?}"),
    }
    let counted: Option<i64> = redis_query(redis.port(), redis::cmd("SCARD").arg(&set_key));
    assert_eq!(counted, Some(2), "renewed claims are counted again");
    let ttl: Option<i64> = redis_query(redis.port(), redis::cmd("PTTL").arg(&set_key));
    assert!(
        ttl.is_some_and(|t| t > 0 && t <= LONG.as_millis() as i64),
        "the set keeps the node's lease: {ttl:?}"
    );
    for c in ["c3", "c4"] {
        let claim = store.claim(&name(c), &[id("small")]).await.expect("claim");
        assert_eq!(claim.kind, ClaimKind::NoCapacity, "{c} over capacity 2");
    }
}

#[tokio::test]
async fn conferences_list_in_pages() {
    let redis = RedisServer::start().expect("redis");
    let store = fixtures::store(&fixtures::single(&redis.url()));
    store
        .register(&node("a", 100), LONG)
        .await
        .expect("register");
    for i in 0..25 {
        store
            .claim(&name(&format!("conf-{i:02}")), &[id("a")])
            .await
            .expect("claim");
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store
            .list_conferences(after.as_deref(), 10)
            .await
            .expect("page");
        pages += 1;
        seen.extend(page.items.iter().map(|(n, _)| n.to_string()));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("conf-{i:02}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(pages, 3);
    // A full last page says it is the last.
    let last = store
        .list_conferences(Some("conf-14"), 10)
        .await
        .expect("page");
    assert_eq!(last.items.len(), 10);
    assert_eq!(last.next, None, "nothing after conf-24");
    let whole = store.list_conferences(None, 25).await.expect("page");
    assert_eq!((whole.items.len(), whole.next), (25, None));

    // Names whose claims were deleted behind the index's back (as expiry does) are skipped
    // and pruned, and the page is filled past them rather than coming back short or empty.
    for i in 0..12 {
        let _: Option<i64> = redis_query(
            redis.port(),
            redis::cmd("DEL").arg(format!(
                "{}conf:conf-{i:02}",
                fixtures::single(&redis.url()).prefix
            )),
        );
    }
    let page = store.list_conferences(None, 5).await.expect("page");
    let names: Vec<String> = page.items.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(
        names,
        ["conf-12", "conf-13", "conf-14", "conf-15", "conf-16"]
    );
    assert_eq!(page.next.as_deref(), Some("conf-16"));
    let rest = store
        .list_conferences(Some("conf-16"), 100)
        .await
        .expect("page");
    assert_eq!((rest.items.len(), rest.next), (8, None));
    let indexed: Option<i64> = redis_query(
        redis.port(),
        redis::cmd("ZCARD").arg(format!("{}confs", fixtures::single(&redis.url()).prefix)),
    );
    assert_eq!(indexed, Some(13), "the deleted names left the index");
}

#[tokio::test]
async fn store_recovers_by_itself_when_redis_returns() {
    let mut redis = RedisServer::start().expect("redis");
    let cfg = RedisConfig {
        timeout: Duration::from_millis(300),
        ..fixtures::single(&redis.url())
    };
    let store = fixtures::store(&cfg);
    store.ping().await.expect("ping");
    redis.kill();
    let started = Instant::now();
    match store.lookup(&name("x")).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3), "fails fast");
    redis.restart().expect("restart redis");
    wait_for_async("store to reconnect", Duration::from_secs(10), || async {
        store.ping().await.ok()
    })
    .await
    .expect("reconnects without a new store");
}

/// Every store operation, so a deployment kind that rejects one (e.g. a cross-slot key in
/// Cluster) fails here.
async fn exercise_every_operation(store: &Store) {
    store.ping().await.expect("ping");
    assert_eq!(
        store.register(&node("a", 5), LONG).await.expect("register"),
        None
    );
    store.register(&node("b", 5), LONG).await.expect("register");
    let c = store
        .claim(&name("room"), &[id("a"), id("b")])
        .await
        .expect("claim");
    assert_eq!(c.owner, Some(owner("a", 1)));
    assert!(store
        .set_participants(&name("room"), &owner("a", 1), 2, 1, None)
        .await
        .expect("participants"));
    assert!(store
        .renew(&name("room"), &owner("a", 1))
        .await
        .expect("renew"));
    let hb = store
        .heartbeat(
            &id("a"),
            &NodeLoad::default(),
            LONG,
            &[Hosted {
                name: name("room"),
                epoch: 1,
                participants: 2,
                count_version: 1,
            }],
        )
        .await
        .expect("heartbeat");
    assert!(
        matches!(
            &hb,
            Heartbeat::Renewed { state: NodeState::Serving, hosted, .. }
                if hosted == &vec![HostedStatus::Owned]
        ),
        "{hb:?}"
    );
    assert_eq!(store.list_nodes().await.expect("nodes").len(), 2);
    let page = store.list_conferences(None, 10).await.expect("list");
    assert_eq!(page.items.len(), 1);
    assert_eq!(
        store
            .set_state(&id("a"), NodeState::Draining)
            .await
            .expect("state"),
        StateChange::Changed(NodeState::Serving)
    );
    // A node stopping for good: admins can no longer change its state, the node can; a new
    // registration is a new life.
    assert_eq!(
        store
            .set_own_state(&id("a"), NodeState::Draining, true)
            .await
            .expect("own state"),
        StateChange::Changed(NodeState::Draining)
    );
    assert_eq!(
        store
            .set_state(&id("a"), NodeState::Serving)
            .await
            .expect("state"),
        StateChange::Stopping(NodeState::Draining),
        "an undrain of a stopping node is refused"
    );
    assert_eq!(
        store
            .get_node(&id("a"))
            .await
            .expect("node")
            .map(|n| n.info.state),
        Some(NodeState::Draining),
        "and changes nothing"
    );
    assert_eq!(
        store
            .set_own_state(&id("a"), NodeState::ShuttingDown, true)
            .await
            .expect("own state"),
        StateChange::Changed(NodeState::Draining)
    );
    let mut again = fixtures::node("a", 10);
    again.state = NodeState::Serving;
    store
        .register(&again, Duration::from_secs(30))
        .await
        .expect("register again");
    assert_eq!(
        store
            .set_state(&id("a"), NodeState::Draining)
            .await
            .expect("state"),
        StateChange::Changed(NodeState::Serving),
        "a new registration takes admin changes again"
    );
    assert!(store
        .release(&name("room"), &owner("a", 1))
        .await
        .expect("release"));
    assert!(store.deregister(&id("a")).await.expect("deregister"));
    assert_eq!(
        store
            .set_state(&id("a"), NodeState::Serving)
            .await
            .expect("state"),
        StateChange::NotRegistered
    );
    assert_eq!(store.list_nodes().await.expect("nodes").len(), 1);
}

#[tokio::test]
async fn every_operation_on_single_redis() {
    let redis = RedisServer::start().expect("redis");
    exercise_every_operation(&fixtures::store(&fixtures::single(&redis.url()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_on_redis_cluster() {
    let cluster = RedisCluster::start().expect("cluster");
    exercise_every_operation(&fixtures::store(&fixtures::cluster(&cluster.seeds()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_behind_sentinel() {
    let group = SentinelGroup::start().expect("sentinel");
    let cfg = fixtures::sentinel(group.master_name(), &group.sentinel_urls());
    exercise_every_operation(&fixtures::store(&cfg)).await;
}

/// Invariant 5 when a failover took a whole host with it: a first-listed sentinel or
/// cluster seed whose address drops every packet (each connect to it waits out its whole
/// timeout) must not keep the store from Redis. Callers that give up early (a SIP request
/// past `routing.deadline`) must not cancel the connect either: the next caller gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dark_first_sentinel_or_seed_does_not_keep_redis_away() {
    let dark = DarkPort::start().expect("dark port");
    let dark_url = format!("redis://{}", dark.addr());

    let group = SentinelGroup::start().expect("sentinel");
    let mut sentinels = vec![dark_url.clone()];
    sentinels.extend(group.sentinel_urls());
    let store = fixtures::store(&fixtures::sentinel(group.master_name(), &sentinels));
    // Each call waits less than the dark sentinel holds the lookup (redis-rs's 1 s connect
    // timeout), as requests under a routing deadline do.
    let mut answered = None;
    for attempt in 0..8 {
        if let Ok(r) = tokio::time::timeout(
            Duration::from_millis(700),
            store.register(&node("behind-sentinel", 10), LONG),
        )
        .await
        {
            answered = Some((attempt, r));
            break;
        }
    }
    let (attempt, result) = answered.expect("no call got through: each cancelled the connect");
    result.expect("registered through the second sentinel");
    assert!(
        attempt >= 1,
        "the first call cannot outwait the dark sentinel"
    );

    let cluster = RedisCluster::start().expect("cluster");
    let mut seeds = vec![dark_url];
    seeds.extend(cluster.seeds());
    let store = fixtures::store(&fixtures::cluster(&seeds));
    store
        .register(&node("on-cluster", 10), LONG)
        .await
        .expect("registered through the other seeds");
    assert!(store
        .get_node(&id("on-cluster"))
        .await
        .expect("read")
        .is_some());
}

/// A Redis that refuses writes for minutes (memory full under `noeviction`) fails each write
/// as unavailable, but is not reconnected to on every one of them: reads, which it still
/// serves, go on being answered on the same connection.
#[tokio::test]
async fn a_redis_refusing_writes_is_not_reconnected_to_on_every_write() {
    let (redis, store) = with_nodes(&["a"]).await;
    store
        .claim(&name("before-oom"), &[id("a")])
        .await
        .expect("claim");
    let connections = || {
        let info: String =
            redis_query(redis.port(), redis::cmd("INFO").arg("stats")).expect("info");
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("total_connections_received")
    };
    let _: () = redis_query(
        redis.port(),
        redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1"),
    )
    .expect("maxmemory");
    let before = connections();
    for _ in 0..30 {
        let refused = store.register(&node("a", 10), LONG).await;
        assert!(
            matches!(refused, Err(StoreError::Unavailable(ref why)) if why.contains("OOM")),
            "{refused:?}"
        );
        assert!(store
            .lookup(&name("before-oom"))
            .await
            .expect("read while writes are refused")
            .is_some());
    }
    // The INFO connection itself, and at most one reconnect a second.
    let opened = connections() - before;
    assert!(opened <= 3, "{opened} connections for 30 refused writes");
}

/// A store whose claims wait for one replica (`redis.wait_replicas = 1`) on `primary`, with
/// node-a registered, and the registry of its metrics.
async fn waiting_for_replicas(primary: &RedisServer) -> (RedisConfig, Store, prometheus::Registry) {
    let cfg = fixtures::replicated(&primary.url());
    let registry = prometheus::Registry::new();
    let metrics = confroute_shared::store::StoreMetrics::new(&registry).expect("metrics");
    let store = Store::new(&cfg, metrics).expect("store");
    store
        .register(&node("node-a", 100), LONG)
        .await
        .expect("register");
    (cfg, store, registry)
}

/// Sentinel kills the clients of a primary it reconfigures, and Redis or a proxy may close
/// idle connections: the lookup that finds its connection closed under it (sent nowhere) is
/// made again on a new one, not answered as an outage (a 503 for the caller).
#[tokio::test]
async fn a_lookup_on_a_connection_the_server_closed_is_made_again() {
    let (redis, store) = with_nodes(&["a"]).await;
    store.claim(&name("kept"), &[id("a")]).await.expect("claim");
    for round in 0..3 {
        let _: i64 = redis_query(
            redis.port(),
            redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("normal")
                .arg("SKIPME")
                .arg("yes"),
        )
        .expect("client kill");
        let found = store.lookup(&name("kept")).await;
        assert!(matches!(found, Ok(Some(_))), "round {round}: {found:?}");
    }
}

/// A replica still in its first full sync (as the old primary is after a failover, for the
/// sync's delay and length) can acknowledge nothing: claims do not wait for it, and are not
/// refused as unreplicated meanwhile.
#[tokio::test]
async fn claims_do_not_wait_for_a_replica_still_syncing() {
    // The primary holds each new replica's sync back for a minute.
    let primary = RedisServer::start_with(&[
        "--repl-diskless-sync",
        "yes",
        "--repl-diskless-sync-delay",
        "60",
    ])
    .expect("primary");
    let port = primary.port().to_string();
    let _replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]).expect("replica");
    wait_for_async("the replica waiting for its sync", LONG, || async {
        let info: String = redis_query(primary.port(), redis::cmd("INFO").arg("replication"))?;
        info.contains("state=wait_bgsave").then_some(())
    })
    .await
    .expect("a syncing replica");
    let (_, store, _) = waiting_for_replicas(&primary).await;
    let placed = store
        .claim(&name("while-syncing"), &[id("node-a")])
        .await
        .expect("a claim while the only replica syncs");
    assert_eq!(placed.kind, ClaimKind::Claimed);
    assert!(
        store
            .lookup(&name("while-syncing"))
            .await
            .expect("lookup")
            .is_some_and(|r| !r.unconfirmed),
        "routed at once"
    );
}

/// With `redis.wait_replicas = 1` a claim is answered once a replica holds it. A replica
/// that stays connected but does not acknowledge (stopped) makes the claim fail as not
/// replicated, a typed error the router answers with 503, and claims go through again once
/// it acknowledges. Lookups are answered while claims wait.
#[tokio::test]
async fn claims_wait_for_a_replica_and_fail_typed_when_none_acknowledges() {
    let (primary, replica) = RedisServer::with_replica().expect("primary and replica");
    let (cfg, store, registry) = waiting_for_replicas(&primary).await;

    let first = store
        .claim(&name("replicated-1"), &[id("node-a")])
        .await
        .expect("claim with a live replica");
    assert_eq!(first.kind, ClaimKind::Claimed);
    let on_replica: Option<String> = redis_query(
        replica.port(),
        redis::cmd("HGET")
            .arg(format!("{}conf:replicated-1", cfg.prefix))
            .arg("owner"),
    );
    assert_eq!(
        on_replica.as_deref(),
        Some("node-a"),
        "answered before the replica had it"
    );

    let pid = replica.pid().expect("replica pid") as libc::pid_t;
    // SAFETY: signals a child process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let claim = |conference: &str| {
        let store = store.clone();
        let conference = name(conference);
        tokio::spawn(async move { store.claim(&conference, &[id("node-a")]).await })
    };
    let waiting = claim("replicated-2");
    // Redis answers nothing else on a connection while its WAIT blocks.
    let blocked = wait_for_async("a claim blocked in WAIT", LONG, || async {
        let info: String = redis_query(primary.port(), redis::cmd("INFO").arg("clients"))?;
        let blocked: u32 = info
            .lines()
            .find_map(|l| l.strip_prefix("blocked_clients:"))?
            .trim()
            .parse()
            .ok()?;
        (blocked > 0).then_some(())
    })
    .await;
    // More claims meanwhile: each waits on a connection of its own, not behind the first.
    let queued = claim("replicated-4");
    let more: Vec<_> = (5..11).map(|i| claim(&format!("replicated-{i}"))).collect();
    // Routing goes on meanwhile: lookups on the same store, one after another, all answered
    // while the claim still waits.
    let mut lookups = Vec::new();
    let mut claim_still_waiting = false;
    if blocked.is_ok() {
        for _ in 0..20 {
            lookups.push(store.lookup(&name("replicated-1")).await);
        }
        claim_still_waiting = !waiting.is_finished();
    }
    let stalled = waiting.await.expect("claim task");
    let queued = queued.await.expect("claim task");
    let mut more_results = Vec::new();
    for m in more {
        more_results.push(m.await.expect("claim task"));
    }
    let unacknowledged = store.lookup(&name("replicated-2")).await;
    // SAFETY: as above; resumed before any assertion can fail.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    blocked.expect("the claim waits for the stopped replica");
    assert!(
        claim_still_waiting,
        "the lookups were answered only after the claim's WAIT ended"
    );
    for found in lookups {
        let found = found
            .expect("lookup during a claim's WAIT")
            .expect("exists");
        assert_eq!(found.owner, owner("node-a", 1));
        assert!(!found.unconfirmed, "acknowledged claims are confirmed");
    }
    let unacknowledged = unacknowledged
        .expect("lookup")
        .expect("the unacknowledged claim stays on the primary");
    assert!(
        unacknowledged.unconfirmed,
        "marked, so routing confirms it before using it"
    );
    assert_eq!(
        stalled,
        Err(StoreError::NotReplicated { wanted: 1, got: 0 }),
        "a stopped replica cannot acknowledge"
    );
    let exported = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("metrics text");
    let not_replicated = fixtures::metric(
        &exported,
        "confroute_redis_errors_total{kind=\"not_replicated\",op=\"claim\"}",
    );
    assert!(
        not_replicated >= 1.0,
        "counted as a Redis error of kind not_replicated"
    );
    // Not behind the first WAIT: each is told, in its own time, that no replica has it,
    // rather than running out of time (Redis trouble to the router).
    for r in std::iter::once(&queued).chain(&more_results) {
        assert_eq!(
            r,
            &Err(StoreError::NotReplicated { wanted: 1, got: 0 }),
            "{r:?}"
        );
    }

    let again = store
        .claim(&name("replicated-3"), &[id("node-a")])
        .await
        .expect("claim once the replica acknowledges again");
    assert_eq!(again.kind, ClaimKind::Claimed);
    // The unacknowledged claim stayed on the primary; asking again waits for it once more.
    let retried = store
        .claim(&name("replicated-2"), &[id("node-a")])
        .await
        .expect("the unacknowledged claim, asked again");
    assert_eq!(retried.kind, ClaimKind::Existing);
    assert_eq!(retried.owner, Some(owner("node-a", 1)));
    let confirmed = store
        .lookup(&name("replicated-2"))
        .await
        .expect("lookup")
        .expect("exists");
    assert!(!confirmed.unconfirmed, "acknowledged at last: confirmed");
}

/// The settings an agent keeps beside its claim are written only by the owner at its epoch,
/// and a new home does not inherit the last home's (invariant 2).
#[tokio::test]
async fn conference_settings_belong_to_the_current_home() {
    let (_redis, store) = with_nodes(&["a", "b"]).await;
    let room = name("room");
    store.claim(&room, &[id("a")]).await.expect("claim");
    assert_eq!(store.conference_settings(&room).await.expect("read"), None);
    assert!(store
        .set_participants(&room, &owner("a", 1), 1, 1, Some("from-a"))
        .await
        .expect("write"));
    assert!(!store
        .set_participants(&room, &owner("b", 1), 1, 1, Some("from-b"))
        .await
        .expect("write"));
    assert_eq!(
        store.conference_settings(&room).await.expect("read"),
        Some("from-a".to_string())
    );
    assert!(store
        .set_participants(&room, &owner("a", 1), 0, 1, None)
        .await
        .expect("write"));
    assert_eq!(
        store.conference_settings(&room).await.expect("read"),
        Some("from-a".to_string()),
        "a count alone leaves the settings"
    );

    rehome_from_a_to_b(&store, &room).await;
    assert_eq!(
        store.conference_settings(&room).await.expect("read"),
        None,
        "the new home starts without the old home's settings"
    );
}

#[tokio::test]
async fn callback_numbers_are_reserved_by_the_owner_above_what_it_used() {
    let (_redis, store) = with_nodes(&["a", "b"]).await;
    let room = name("room");
    const BLOCK: u64 = 100;
    assert_eq!(
        store
            .reserve_sequence(SequenceKind::Callbacks, &room, &id("a"), BLOCK, 0)
            .await
            .expect("reserve"),
        None,
        "no record, no owner"
    );
    store.claim(&room, &[id("a")]).await.expect("claim");
    let reserve = |node: &'static str, used: u64| {
        let store = store.clone();
        let room = room.clone();
        async move {
            store
                .reserve_sequence(SequenceKind::Callbacks, &room, &id(node), BLOCK, used)
                .await
                .expect("reserve")
        }
    };
    // The first block is the new conference's without asking: the next starts above it.
    assert_eq!(reserve("a", 0).await, Some(2 * BLOCK));
    assert_eq!(reserve("a", 0).await, Some(3 * BLOCK));
    assert_eq!(
        reserve("a", 5 * BLOCK).await,
        Some(6 * BLOCK),
        "above what the owner says it used"
    );
    assert_eq!(reserve("b", 0).await, None, "only the owner reserves");
    assert_eq!(reserve("a", 0).await, Some(7 * BLOCK));

    rehome_from_a_to_b(&store, &room).await;
    assert_eq!(
        reserve("a", 0).await,
        None,
        "the old home no longer reserves"
    );
    assert_eq!(
        reserve("b", 0).await,
        Some(2 * BLOCK),
        "the new home numbers its own callbacks from the start"
    );
}

#[tokio::test]
async fn a_refused_commands_claim_is_given_back_only_while_nobody_is_in_it() {
    let (_redis, store) = with_nodes(&["a"]).await;
    let room = name("room");
    let placed = store.claim(&room, &[id("a")]).await.expect("claim");
    let owner = placed.owner.clone().expect("owner");
    // A caller reached the new home before the command was refused.
    assert!(store
        .set_participants(&room, &owner, 1, 1, None)
        .await
        .expect("count"));
    assert!(!store
        .release_if_empty(&room, &owner)
        .await
        .expect("release"));
    assert!(store.lookup(&room).await.expect("lookup").is_some());
    assert!(store
        .set_participants(&room, &owner, 0, 1, None)
        .await
        .expect("count"));
    assert!(store
        .release_if_empty(&room, &owner)
        .await
        .expect("release"));
    assert!(store.lookup(&room).await.expect("lookup").is_none());
}

#[tokio::test]
async fn a_release_on_a_listed_count_keeps_a_claim_counted_since() {
    let (_redis, store) = with_nodes(&["a"]).await;
    let room = name("room");
    let placed = store.claim(&room, &[id("a")]).await.expect("claim");
    let owner = placed.owner.clone().expect("owner");
    assert!(store
        .set_participants(&room, &owner, 3, 40, None)
        .await
        .expect("count"));
    let listed = store.list_conferences(None, 10).await.expect("list");
    assert_eq!(listed.items.len(), 1);
    let seen = listed.items[0].1.count_version;
    assert_eq!(seen, 40, "the listing reads the count's version");
    // A new actor of the name counts its first caller in after the listing.
    assert!(store
        .set_participants(&room, &owner, 1, 41, None)
        .await
        .expect("count"));
    assert!(!store
        .release_unless_counted_since(&room, &owner, seen)
        .await
        .expect("release"));
    assert_eq!(
        store
            .lookup(&room)
            .await
            .expect("lookup")
            .map(|r| r.participants),
        Some(1),
        "the claim stays with the later count"
    );
    // Nothing written since the version seen: released, whatever the count.
    assert!(store
        .release_unless_counted_since(&room, &owner, 41)
        .await
        .expect("release"));
    assert!(store.lookup(&room).await.expect("lookup").is_none());
}

#[tokio::test]
async fn only_nodes_registered_before_a_loss_keep_the_settling_mark_off() {
    let (redis, store) = with_nodes(&["a"]).await;
    let mark = || {
        redis
            .query(redis::cmd("EXISTS").arg("{confroute}:settling"))
            .and_then(|v| redis::from_redis_value::<i64>(v).ok())
            .expect("exists")
    };
    let lease = Duration::from_secs(30);
    // Whether the store settles for a node whose record was lost within the last hour: only
    // nodes registered before that keep the mark off.
    let settles_after_an_hour = || {
        let store = store.clone();
        async move {
            store
                .settle_after_loss(lease, Duration::from_secs(3600))
                .await
                .expect("settle")
        }
    };
    // Node a registered longer ago than the caller's record can have been lost: it outlived
    // whatever took that record, so Redis did not lose everything.
    assert!(!store
        .settle_after_loss(lease, Duration::ZERO)
        .await
        .expect("settle"));
    assert_eq!(mark(), 0);
    // Registered since: a newcomer (or another node already back) says nothing about the
    // others, and placements wait for them.
    assert!(settles_after_an_hour().await);
    assert_eq!(mark(), 1);
    // A node with a shorter lease does not cut the mark short.
    assert!(store
        .settle_after_loss(Duration::from_secs(3), Duration::from_secs(3600))
        .await
        .expect("settle"));
    let left = redis
        .query(redis::cmd("PTTL").arg("{confroute}:settling"))
        .and_then(|v| redis::from_redis_value::<i64>(v).ok())
        .expect("pttl");
    assert!(left > 20_000, "the mark was cut short to {left} ms");
    // A record that does not say when it registered counts as from before.
    redis
        .query(
            redis::cmd("HDEL")
                .arg("{confroute}:node:a")
                .arg("registered_ms"),
        )
        .expect("hdel");
    redis
        .query(redis::cmd("DEL").arg("{confroute}:settling"))
        .expect("del");
    assert!(!settles_after_an_hour().await);
    assert_eq!(mark(), 0);
    // An agent restarting over its live record (a rolling restart) keeps it from before.
    redis
        .query(
            redis::cmd("HSET")
                .arg("{confroute}:node:a")
                .arg("registered_ms")
                .arg(1),
        )
        .expect("hset");
    store
        .register_agent(&node("a", 10), lease, true)
        .await
        .expect("register again");
    assert!(!settles_after_an_hour().await);
    assert_eq!(mark(), 0);
    // An index entry whose record is gone (deleted, evicted) is no live node from before.
    redis
        .query(redis::cmd("DEL").arg("{confroute}:node:a"))
        .expect("del");
    assert!(settles_after_an_hour().await);
    assert_eq!(mark(), 1);
}

/// A re-home by a store that waits for no replica is confirmed as it is made: the mark of a
/// last home's claim its WAIT never confirmed does not keep the new home from lookups.
#[tokio::test]
async fn a_rehome_without_replicas_to_wait_for_is_not_left_unconfirmed() {
    let (redis, store) = with_nodes(&["b"]).await;
    // Node a's claim, made by a store waiting for replicas that never acknowledged; node a
    // is gone (no record).
    redis
        .query(
            redis::cmd("HSET")
                .arg("{confroute}:conf:room")
                .arg("owner")
                .arg("a")
                .arg("epoch")
                .arg(1)
                .arg("participants")
                .arg(0)
                .arg("unconfirmed")
                .arg(1),
        )
        .expect("hset");
    let room = ConferenceName::parse("room").expect("name");
    assert!(
        store
            .lookup(&room)
            .await
            .expect("lookup")
            .is_some_and(|r| r.unconfirmed),
        "the last home's claim is unconfirmed"
    );
    let moved = store.claim(&room, &[id("b")]).await.expect("claim");
    assert_eq!(moved.kind, ClaimKind::Rehomed);
    let rec = store.lookup(&room).await.expect("lookup").expect("record");
    assert_eq!(rec.owner, owner("b", 2));
    assert!(!rec.unconfirmed, "{rec:?}");
}

#[tokio::test]
async fn a_wait_confirms_only_the_claim_it_covered() {
    let redis = RedisServer::start().expect("redis");
    let key = "{confroute}:conf:room";
    // The record as a re-home by another client left it: node b at epoch 2, not yet confirmed.
    redis
        .query(
            redis::cmd("HSET")
                .arg(key)
                .arg("owner")
                .arg("b")
                .arg("epoch")
                .arg(2)
                .arg("unconfirmed")
                .arg(1),
        )
        .expect("hset");
    let script = include_str!("../../shared/src/store/lua/confirm.lua");
    let confirm = |owner: &str, epoch: u64| {
        redis
            .query(
                redis::cmd("EVAL")
                    .arg(script)
                    .arg(1)
                    .arg(key)
                    .arg(owner)
                    .arg(epoch),
            )
            .and_then(|v| redis::from_redis_value::<i64>(v).ok())
            .expect("eval")
    };
    let marked = || {
        redis
            .query(redis::cmd("HEXISTS").arg(key).arg("unconfirmed"))
            .and_then(|v| redis::from_redis_value::<i64>(v).ok())
            .expect("hexists")
            == 1
    };
    // A WAIT that covered the earlier claim (a, 1) leaves b's mark alone.
    assert_eq!(confirm("a", 1), 0);
    assert!(marked(), "the re-home stays unconfirmed");
    assert_eq!(confirm("b", 1), 0, "same node, other epoch");
    assert!(marked());
    assert_eq!(confirm("b", 2), 1);
    assert!(!marked(), "its own WAIT confirms it");
}

/// On a Cluster, the settings are read from the primary of the store's slot, and the
/// readiness ping asks it alone.
#[tokio::test]
async fn redis_settings_that_break_guarantees_are_named_on_a_cluster_too() {
    let cluster = RedisCluster::start().expect("cluster");
    for n in cluster.nodes() {
        for (k, v) in [("maxmemory", "64mb"), ("maxmemory-policy", "volatile-lru")] {
            let _: () = redis_query(n.port(), redis::cmd("CONFIG").arg("SET").arg(k).arg(v))
                .expect("config set");
        }
    }
    let store = fixtures::store(&fixtures::cluster(&cluster.seeds()));
    // Read from the primary of the store's slot, not from every node as a map.
    let warnings = store.settings_warnings().await.expect("read");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("maxmemory-policy volatile-lru"),
        "{warnings:?}"
    );
    store.ping().await.expect("ping");
}

/// Redis settings that break the store's guarantees are named: an eviction policy that may
/// evict claims and leases (they all carry TTLs), replica waits on a primary that keeps
/// accepting writes cut off from its replicas, and a primary with replicas that claims do
/// not wait for. Settings that keep them say nothing.
#[tokio::test]
async fn redis_settings_that_break_guarantees_are_named() {
    let evicting =
        RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"])
            .expect("redis");
    let warnings = fixtures::store(&fixtures::single(&evicting.url()))
        .settings_warnings()
        .await
        .expect("read");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("maxmemory-policy volatile-lru"),
        "{warnings:?}"
    );

    let keeping =
        RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "noeviction"])
            .expect("redis");
    let plain = fixtures::store(&fixtures::single(&keeping.url()));
    assert_eq!(
        plain.settings_warnings().await.expect("read"),
        Vec::<String>::new()
    );
    let waiting = fixtures::store(&fixtures::replicated(&keeping.url()));
    let warnings = waiting.settings_warnings().await.expect("read");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("min-replicas-to-write"),
        "{warnings:?}"
    );

    let guarded = RedisServer::start_with(&[
        "--min-replicas-to-write",
        "1",
        "--min-replicas-max-lag",
        "10",
    ])
    .expect("redis");
    let warnings = fixtures::store(&fixtures::replicated(&guarded.url()))
        .settings_warnings()
        .await
        .expect("read");
    assert_eq!(warnings, Vec::<String>::new());

    // A primary with a replica, claims not waiting for it: a failover may lose a claim.
    let (primary, _replica) = RedisServer::with_replica().expect("primary and replica");
    let warnings = fixtures::store(&fixtures::single(&primary.url()))
        .settings_warnings()
        .await
        .expect("read");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("redis.wait_replicas is 0"),
        "{warnings:?}"
    );
}

/// A Redis that refuses writes (a primary cut off from its replicas under
/// `min-replicas-to-write`, one out of memory) is unavailable, as if unreachable: the
/// connection is opened again (asking Sentinel for the primary anew) and the controller
/// treats it as Redis trouble, so no lease that runs out meanwhile re-homes a live conference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_refusing_writes_is_unavailable() {
    let cut_off = RedisServer::start_with(&["--min-replicas-to-write", "1"]).expect("redis");
    let store = fixtures::store(&fixtures::single(&cut_off.url()));
    match store
        .register(&fixtures::node("a", 10), Duration::from_secs(3))
        .await
    {
        Err(StoreError::Unavailable(why)) => assert!(why.contains("NOREPLICAS"), "{why}"),
        other => panic!("expected unavailable (NOREPLICAS), got {other:?}"),
    }
    let full = RedisServer::start_with(&["--maxmemory", "1", "--maxmemory-policy", "noeviction"])
        .expect("redis");
    let store = fixtures::store(&fixtures::single(&full.url()));
    match store
        .register(&fixtures::node("a", 10), Duration::from_secs(3))
        .await
    {
        Err(StoreError::Unavailable(why)) => assert!(why.contains("OOM"), "{why}"),
        other => panic!("expected unavailable (OOM), got {other:?}"),
    }
}

/// `hold_node` (an agent starting again under its id, checking it is the only one): the
/// record, its index entry, placement set and the claims it owns are kept for a lease, the
/// record says its ARI is down once it is two heartbeats old (no new conference for an agent
/// not running yet; a record renewed just now may be a live agent's), and
/// `updated_ms` is left as it was, so another agent's renewal still shows.
#[tokio::test]
async fn a_held_node_record_lives_on_says_ari_down_and_keeps_its_claims() {
    let redis = RedisServer::start().expect("redis");
    let cfg = RedisConfig {
        // As short as the node lease: the claims would lapse with it.
        conference_lease: Duration::from_secs(3),
        ..fixtures::single(&redis.url())
    };
    let store = fixtures::store(&cfg);
    let short = Duration::from_millis(1500);
    store
        .register(&node("held", 10), short)
        .await
        .expect("register");
    store
        .claim(&name("kept"), &[id("held")])
        .await
        .expect("claim");
    let before = store
        .get_node(&id("held"))
        .await
        .expect("get")
        .expect("live");
    assert!(before.load.ari, "registered without saying: up");
    // Renewed within two heartbeats: a live agent may be renewing it (a second agent
    // under its id, about to find so), and what it says of its ARI stands.
    assert!(store
        .hold_node(&id("held"), Duration::from_secs(3))
        .await
        .expect("hold"));
    let fresh = store
        .get_node(&id("held"))
        .await
        .expect("get")
        .expect("live");
    assert!(fresh.load.ari, "a record renewed just now keeps its ARI up");
    // Its last renewal two heartbeats (two thirds of its lease) ago, and more: overdue.
    let period = before.lease_period_ms.expect("lease period");
    let renewed = before.updated_ms - period * 2 / 3 - 100;
    let _: Option<i64> = redis_query(
        redis.port(),
        redis::cmd("HSET")
            .arg(format!("{}node:held", cfg.prefix))
            .arg("updated_ms")
            .arg(renewed),
    );
    assert!(store
        .hold_node(&id("held"), Duration::from_secs(3))
        .await
        .expect("hold"));
    let pttl = |key: String| -> i64 {
        redis_query(redis.port(), redis::cmd("PTTL").arg(key)).unwrap_or(-2)
    };
    assert!(
        pttl(format!("{}node:held", cfg.prefix)) > 2000,
        "record held"
    );
    assert!(
        pttl(format!("{}node:held:confs", cfg.prefix)) > 2000,
        "placements held"
    );
    assert!(
        pttl(format!("{}conf:kept", cfg.prefix)) > 2000,
        "claim held"
    );
    let after = store
        .get_node(&id("held"))
        .await
        .expect("get")
        .expect("live");
    assert!(!after.load.ari, "a held record says its ARI is down");
    assert_eq!(after.updated_ms, renewed, "not renewed");
    // A claim placed on it meanwhile would go to an agent that is not running.
    let placed = store
        .claim(&name("fresh"), &[id("held")])
        .await
        .expect("claim");
    assert_eq!(placed.kind, ClaimKind::NoCapacity, "{placed:?}");
    // An expired record is not brought back.
    assert!(!store
        .hold_node(&id("gone"), Duration::from_secs(3))
        .await
        .expect("hold"));
    assert!(store.get_node(&id("gone")).await.expect("get").is_none());
}

/// A record not renewed for two of its lease periods (and a second) is no longer held:
/// agents that keep crashing in their start-up check cannot keep a dead node alive.
#[tokio::test]
async fn a_node_record_long_unrenewed_is_not_held_any_more() {
    let (redis, store) = with_nodes(&["stale"]).await;
    let key = format!("{}node:stale", fixtures::single(&redis.url()).prefix);
    let rec = store
        .get_node(&id("stale"))
        .await
        .expect("get")
        .expect("live");
    let period = rec.lease_period_ms.expect("lease period");
    // Last renewed two periods and two seconds ago (the record itself still lives).
    let _: Option<i64> = redis_query(
        redis.port(),
        redis::cmd("HSET")
            .arg(&key)
            .arg("updated_ms")
            .arg(rec.updated_ms - 2 * period - 2000),
    );
    let _: Option<i64> = redis_query(redis.port(), redis::cmd("PEXPIRE").arg(&key).arg(1000));
    assert!(store.hold_node(&id("stale"), LONG).await.expect("hold"));
    let pttl: i64 = redis_query(redis.port(), redis::cmd("PTTL").arg(&key)).unwrap_or(-2);
    assert!(pttl <= 1000, "extended past its limit: {pttl} ms");
}

/// Redis's clock through the store: on the server holding the prefix's keys, close to ours.
#[tokio::test]
async fn the_store_reads_redis_clock() {
    let (_redis, store) = with_nodes(&[]).await;
    let ours = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let theirs = store.time_ms().await.expect("time");
    assert!(theirs.abs_diff(ours) < 5_000, "{theirs} vs {ours}");
}

/// A node away from Redis past its lease comes back and claims again, at its own epoch, a
/// conference it still hosts that meanwhile lived and ended on another node at a higher
/// epoch. When that reclaimed life ends too, the next life of the name starts above both
/// (the remembered ended epoch never goes down), so no (node, epoch) pair is used twice.
#[tokio::test]
async fn the_next_life_starts_above_every_ended_one() {
    let redis = RedisServer::start().expect("redis");
    let store = fixtures::store(&fixtures::single(&redis.url()));
    let short = Duration::from_millis(400);
    store.register(&node("a", 10), short).await.expect("a");
    store.register(&node("b", 10), LONG).await.expect("b");
    let room = name("twice");
    let first = store.claim(&room, &[id("a")]).await.expect("claim");
    assert_eq!(first.owner, Some(owner("a", 1)));
    gone(&store, "a").await;
    let moved = store.claim(&room, &[id("b")]).await.expect("claim");
    assert_eq!(moved.owner, Some(owner("b", 2)));
    assert!(store.release(&room, &owner("b", 2)).await.expect("release"));

    // a is back and still hosts its callers of the first life.
    store.register(&node("a", 10), LONG).await.expect("a again");
    a_claims_its_first_life_back(&store, &room, 1).await;
    assert!(store.release(&room, &owner("a", 1)).await.expect("release"));

    let next = store.claim(&room, &[id("b")]).await.expect("claim");
    assert_eq!(next.kind, ClaimKind::Claimed);
    assert_eq!(
        next.owner,
        Some(owner("b", 3)),
        "above the b@2 life, not just above a@1"
    );
}

/// A claim no call reaches gives its node's seat back after `redis.claim_lease`, not a whole
/// conference lease; the owner's first count gives a claim the conference lease.
#[tokio::test]
async fn an_unused_claim_frees_its_seat_after_the_claim_lease() {
    let redis = RedisServer::start().expect("redis");
    let cfg = RedisConfig {
        claim_lease: Duration::from_secs(1),
        conference_lease: LONG,
        ..fixtures::single(&redis.url())
    };
    let store = fixtures::store(&cfg);
    store.register(&node("a", 2), LONG).await.expect("register");
    let pttl = |room: &str| {
        redis_query::<i64>(
            redis.port(),
            redis::cmd("PTTL").arg(format!("{}conf:{room}", cfg.prefix)),
        )
        .expect("PTTL")
    };
    for room in ["used", "unused"] {
        let c = store.claim(&name(room), &[id("a")]).await.expect("claim");
        assert_eq!(c.kind, ClaimKind::Claimed, "{room}");
        let left = pttl(room);
        assert!(
            left > 0 && left <= 1000,
            "{room}: a new claim's lease is {left} ms"
        );
    }
    // A caller reached node a: its agent's first count.
    assert!(store
        .set_participants(&name("used"), &owner("a", 1), 1, 1, None)
        .await
        .expect("count"));
    let left = pttl("used");
    assert!(left > 50_000, "a claim in use has {left} ms of lease");
    let full = store
        .claim(&name("third"), &[id("a")])
        .await
        .expect("claim");
    assert_eq!(full.kind, ClaimKind::NoCapacity);

    wait_for_async(
        "the unused claim to expire",
        Duration::from_secs(10),
        || async {
            store
                .lookup(&name("unused"))
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await
    .expect("the unused claim expires");
    // The node's next heartbeat drops it from the node's placements: the seat is free.
    let hosted = [Hosted {
        name: name("used"),
        epoch: 1,
        participants: 1,
        count_version: 2,
    }];
    store
        .heartbeat(&id("a"), &NodeLoad::default(), LONG, &hosted)
        .await
        .expect("heartbeat");
    let third = store
        .claim(&name("third"), &[id("a")])
        .await
        .expect("claim");
    assert_eq!(third.kind, ClaimKind::Claimed);
    let used = store.lookup(&name("used")).await.expect("lookup");
    assert_eq!(used.map(|r| r.owner), Some(owner("a", 1)));
}

/// Node a's reclaiming heartbeat for `room`'s first life (epoch 1), with `participants`:
/// the claim is a's at epoch 1 again.
async fn a_claims_its_first_life_back(store: &Store, room: &ConferenceName, participants: u32) {
    let hosted = [Hosted {
        name: room.clone(),
        epoch: 1,
        participants,
        count_version: 1,
    }];
    store
        .heartbeat_reclaiming(&id("a"), &NodeLoad::default(), LONG, &hosted)
        .await
        .expect("heartbeat");
    assert_eq!(
        store.lookup(room).await.expect("lookup").map(|r| r.owner),
        Some(owner("a", 1))
    );
}

/// A home claimed back by a heartbeat at an epoch below a life that ended meanwhile is
/// re-homed above that ended life too: no (node, epoch) is used twice.
#[tokio::test]
async fn a_rehome_starts_above_an_ended_life_too() {
    let redis = RedisServer::start().expect("redis");
    let store = fixtures::store(&fixtures::single(&redis.url()));
    store.register(&node("a", 10), LONG).await.expect("a");
    store.register(&node("b", 10), LONG).await.expect("b");
    let room = name("again");
    // The b@2 life ended; a, away meanwhile, claims its own first life back at epoch 1.
    store.claim(&room, &[id("a")]).await.expect("claim");
    rehome_from_a_to_b(&store, &room).await;
    assert!(store.release(&room, &owner("b", 2)).await.expect("release"));
    store
        .set_state(&id("a"), NodeState::Serving)
        .await
        .expect("serve");
    a_claims_its_first_life_back(&store, &room, 0).await;
    // a drains with the conference empty: it moves to b, above the ended b@2.
    let moved = {
        store
            .set_state(&id("a"), NodeState::Draining)
            .await
            .expect("drain");
        store.claim(&room, &[id("b")]).await.expect("claim")
    };
    assert_eq!(moved.kind, ClaimKind::Rehomed);
    assert_eq!(
        moved.owner,
        Some(owner("b", 3)),
        "b@2 was used by the ended life"
    );
}

/// Redis brings back an older life of a conference (a restart from a snapshot, or a failover
/// that lost the re-home): the record names its dead first owner at a lower epoch while the
/// conference lives on the node it moved to. That node's heartbeat claims it back, rather
/// than being told it lost it and leaving the next caller to a second home; a record at a
/// higher epoch, or one whose owner lives and serves or counts callers, is still lost.
#[tokio::test]
async fn a_heartbeat_claims_back_a_conference_redis_brought_back_under_a_dead_owner() {
    let (redis, store) = with_nodes(&["a", "b", "c"]).await;
    let room = name("restored");
    // c's life at epoch 1; c dies and the conference moves to a at epoch 2.
    store.claim(&room, &[id("c")]).await.expect("claim");
    assert!(store.deregister(&id("c")).await.expect("deregister"));
    let moved = store.claim(&room, &[id("a")]).await.expect("re-home");
    assert_eq!(moved.owner, Some(owner("a", 2)));
    let set_record = |owner: &str, epoch: u64| {
        redis
            .query(
                redis::cmd("HSET")
                    .arg("{confroute}:conf:restored")
                    .arg("owner")
                    .arg(owner)
                    .arg("epoch")
                    .arg(epoch)
                    .arg("settings")
                    .arg("{\"of\":\"the older life\"}"),
            )
            .expect("hset")
    };
    let hosted = [Hosted {
        name: room.clone(),
        epoch: 2,
        participants: 3,
        count_version: 1,
    }];
    let load = NodeLoad::default();
    let statuses = |hb: Heartbeat| match hb {
        Heartbeat::Renewed { hosted, .. } => hosted,
        other => panic!("unexpected {other:?}"),
    };
    // An ordinary heartbeat of node a, or a reclaiming one.
    let beat = |reclaim: bool| {
        let (store, load, hosted) = (&store, &load, &hosted);
        async move {
            if reclaim {
                store
                    .heartbeat_reclaiming(&id("a"), load, LONG, hosted)
                    .await
            } else {
                store.heartbeat(&id("a"), load, LONG, hosted).await
            }
        }
    };
    // The older life comes back.
    set_record("c", 1);
    // While Redis is settling (it lost the node records), a missing node record does not
    // say the owner is dead: nothing is taken, and nothing is lost for good either (the
    // node asks again; lost, it would give up its callers' conference for a dead owner's).
    redis
        .query(
            redis::cmd("SET")
                .arg("{confroute}:settling")
                .arg(1)
                .arg("PX")
                .arg(60_000),
        )
        .expect("settling");
    for reclaim in [false, true] {
        let hb = beat(reclaim).await;
        assert_eq!(
            statuses(hb.expect("heartbeat")),
            vec![HostedStatus::Missing]
        );
        assert_eq!(
            store.lookup(&room).await.expect("lookup").map(|r| r.owner),
            Some(owner("c", 1))
        );
    }
    redis
        .query(redis::cmd("DEL").arg("{confroute}:settling"))
        .expect("settled");
    // An ordinary heartbeat takes it for missing (and so asks for a reclaiming one) ...
    let hb = store.heartbeat(&id("a"), &load, LONG, &hosted).await;
    assert_eq!(
        statuses(hb.expect("heartbeat")),
        vec![HostedStatus::Missing]
    );
    assert_eq!(
        store.lookup(&room).await.expect("lookup").map(|r| r.owner),
        Some(owner("c", 1)),
        "an ordinary heartbeat writes nothing"
    );
    // ... which claims it back at the node's epoch, without the older life's fields.
    let hb = store
        .heartbeat_reclaiming(&id("a"), &load, LONG, &hosted)
        .await;
    assert_eq!(
        statuses(hb.expect("heartbeat")),
        vec![HostedStatus::Reclaimed]
    );
    let rec = store.lookup(&room).await.expect("lookup").expect("record");
    assert_eq!(rec.owner, owner("a", 2));
    assert_eq!(rec.participants, 3);
    let settings = redis.query(
        redis::cmd("HGET")
            .arg("{confroute}:conf:restored")
            .arg("settings"),
    );
    assert_eq!(
        settings,
        Some(redis::Value::Nil),
        "the older life's settings went with it"
    );
    let next = store.claim(&room, &[id("b")]).await.expect("claim");
    assert_eq!(next.kind, ClaimKind::Existing);
    assert_eq!(next.owner, Some(owner("a", 2)));
    // A dead owner's record at a higher epoch is a later life: lost, and left alone.
    set_record("c", 3);
    for reclaim in [false, true] {
        let hb = beat(reclaim).await;
        assert_eq!(statuses(hb.expect("heartbeat")), vec![HostedStatus::Lost]);
    }
    // So is a live owner's record that counts callers, whatever its epoch: both homes have
    // callers, and the node is told.
    set_record("b", 1);
    let hb = store
        .heartbeat_reclaiming(&id("a"), &load, LONG, &hosted)
        .await;
    assert_eq!(statuses(hb.expect("heartbeat")), vec![HostedStatus::Lost]);
    assert_eq!(
        store.lookup(&room).await.expect("lookup").map(|r| r.owner),
        Some(owner("b", 1))
    );
    // Without callers counted, a serving owner keeps it too, as claim.lua would ...
    redis
        .query(
            redis::cmd("HSET")
                .arg("{confroute}:conf:restored")
                .arg("participants")
                .arg(0),
        )
        .expect("hset");
    let hb = beat(true).await;
    assert_eq!(statuses(hb.expect("heartbeat")), vec![HostedStatus::Lost]);
    // ... but a draining one's older record without callers would go to the next claim: the
    // node claims its conference back.
    store
        .set_state(&id("b"), NodeState::Draining)
        .await
        .expect("drain b");
    redis
        .query(
            redis::cmd("SADD")
                .arg("{confroute}:node:b:confs")
                .arg("restored"),
        )
        .expect("sadd");
    let hb = store.heartbeat(&id("a"), &load, LONG, &hosted).await;
    assert_eq!(
        statuses(hb.expect("heartbeat")),
        vec![HostedStatus::Missing]
    );
    let hb = store
        .heartbeat_reclaiming(&id("a"), &load, LONG, &hosted)
        .await;
    assert_eq!(
        statuses(hb.expect("heartbeat")),
        vec![HostedStatus::Reclaimed]
    );
    assert_eq!(
        store.lookup(&room).await.expect("lookup").map(|r| r.owner),
        Some(owner("a", 2))
    );
    let members = redis.query(
        redis::cmd("SISMEMBER")
            .arg("{confroute}:node:b:confs")
            .arg("restored"),
    );
    assert_eq!(
        members,
        Some(redis::Value::Int(0)),
        "b's placement set forgets it"
    );
}

/// The node listing names the Redis server it came from (its `run_id`, read in the same
/// step), and a claim given that name places or re-homes only on that server: on another (a
/// restart from saved data, a failover), which may have lost the claims of live
/// conferences, it places nothing and says so. An existing live home is still returned.
#[tokio::test]
async fn a_claim_places_only_on_the_server_the_nodes_were_listed_on() {
    let (redis, store) = with_nodes(&["a", "b"]).await;
    let (nodes, server) = store.list_nodes_on_server().await.expect("list");
    assert_eq!(nodes.len(), 2);
    let info = redis
        .query(redis::cmd("INFO").arg("server"))
        .and_then(|v| redis::from_redis_value::<String>(v).ok())
        .expect("INFO");
    let run_id = info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(str::trim)
        .expect("run_id");
    assert_eq!(server.as_deref(), Some(run_id));

    let other = "0".repeat(40);
    // Counted as a refusal of the claim, though Redis answered.
    let registry = prometheus::Registry::new();
    let counted = Store::new(
        &fixtures::single(&redis.url()),
        confroute_shared::store::StoreMetrics::new(&registry).expect("metrics"),
    )
    .expect("store");
    let refused = counted
        .claim_on(&name("elsewhere"), &[id("a")], Some(&other))
        .await;
    assert!(
        matches!(refused, Err(StoreError::ServerChanged)),
        "{refused:?}"
    );
    let errors: f64 = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "confroute_redis_errors_total")
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "kind" && l.value() == "server_changed")
        })
        .map(|m| m.get_counter().get_value())
        .sum();
    assert_eq!(errors, 1.0);
    assert_eq!(
        store.lookup(&name("elsewhere")).await.expect("lookup"),
        None
    );
    // Nor is a conference whose owner is gone re-homed there.
    store.claim(&name("kept"), &[id("a")]).await.expect("claim");
    store
        .set_state(&id("a"), NodeState::Draining)
        .await
        .expect("drain");
    let refused = store
        .claim_on(&name("kept"), &[id("b")], Some(&other))
        .await;
    assert!(
        matches!(refused, Err(StoreError::ServerChanged)),
        "{refused:?}"
    );
    assert_eq!(
        store
            .lookup(&name("kept"))
            .await
            .expect("lookup")
            .map(|r| r.owner),
        Some(owner("a", 1))
    );
    // A live home is routed on whatever server holds it.
    store
        .set_state(&id("a"), NodeState::Serving)
        .await
        .expect("serve");
    let existing = store
        .claim_on(&name("kept"), &[id("b")], Some(&other))
        .await
        .expect("existing");
    assert_eq!(existing.kind, ClaimKind::Existing);
    // On the server named, placement goes on.
    let placed = store
        .claim_on(&name("elsewhere"), &[id("a")], server.as_deref())
        .await
        .expect("claim");
    assert_eq!(placed.kind, ClaimKind::Claimed);
}
