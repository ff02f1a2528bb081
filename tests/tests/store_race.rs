//! Invariant 1 (one home) under contention: independent processes race to claim the same
//! conferences, each proposing a different node. Every name must end with exactly one
//! owner, and every contender must have been told that same owner. The race runs on a
//! single Redis, on a Redis Cluster, and on Sentinel with the primary killed mid-race.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use confroute_shared::config::RedisConfig;
use confroute_shared::name::ConferenceName;
use confroute_shared::store::Store;
use confroute_tests::fixtures;
use confroute_tests::harness::{
    redis_query, wait_for, Proc, RedisCluster, RedisServer, SentinelGroup, TempDir,
};

const CONTENDERS: usize = 8;
const NAMES: usize = 1250;

/// What one contender was told for one name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Told {
    owner: String,
    epoch: u64,
    kind: String,
    /// Failed attempts before the answer.
    retries: u32,
}

struct Storm {
    procs: Vec<Proc>,
    _dir: TempDir,
}

/// `cfg` with claims that outlive the storm: nobody joins them, so with the short claim
/// lease the first names claimed would expire before the last contenders ask for them.
fn lasting(cfg: RedisConfig) -> RedisConfig {
    RedisConfig {
        claim_lease: Duration::from_secs(600),
        conference_lease: Duration::from_secs(600),
        ..cfg
    }
}

async fn register_contender_nodes(store: &Store) {
    for i in 0..CONTENDERS {
        store
            .register(
                &fixtures::node(&format!("node-{i}"), 100_000),
                Duration::from_secs(120),
            )
            .await
            .expect("register node");
    }
}

fn start_storm(cfg: &RedisConfig, concurrency: usize) -> Storm {
    let dir = TempDir::new("storm").expect("temp dir");
    let procs = (0..CONTENDERS)
        .map(|i| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_claim-storm"));
            cmd.args(["--names", &NAMES.to_string()])
                .args(["--candidate", &format!("node-{i}")])
                .args(["--concurrency", &concurrency.to_string()])
                .args(["--seed", &i.to_string()])
                .envs(fixtures::redis_env(cfg));
            Proc::spawn(
                &format!("claim-storm {i}"),
                cmd,
                &dir.path().join(format!("storm-{i}.log")),
            )
            .expect("start claim-storm")
        })
        .collect();
    Storm { procs, _dir: dir }
}

fn finish_storm(mut storm: Storm) -> HashMap<String, Vec<Told>> {
    let mut told: HashMap<String, Vec<Told>> = HashMap::new();
    for p in &mut storm.procs {
        let code = p
            .wait_exit(Duration::from_secs(90))
            .expect("contender finishes");
        let out = p.output();
        assert_eq!(code, Some(0), "contender failed:\n{out}");
        for line in out.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 5 && f[0].starts_with("race-") {
                told.entry(f[0].to_string()).or_default().push(Told {
                    owner: f[1].to_string(),
                    epoch: f[2].parse().expect("epoch"),
                    kind: f[3].to_string(),
                    retries: f[4].parse().expect("retries"),
                });
            }
        }
    }
    told
}

/// `exactly_one_claimed`: whether exactly one contender per name must have been told
/// `claimed` (false across a failover, where a winner may lose the reply and retry).
async fn verify(store: &Store, told: &HashMap<String, Vec<Told>>, exactly_one_claimed: bool) {
    verify_won(store, told, exactly_one_claimed, "claimed", 1).await;
}

/// [`verify`] for a race whose winner is told `won` and gets `epoch`.
async fn verify_won(
    store: &Store,
    told: &HashMap<String, Vec<Told>>,
    exactly_one_claimed: bool,
    won: &str,
    epoch: u64,
) {
    assert_eq!(told.len(), NAMES, "every name got answers");
    for (name, answers) in told {
        assert_eq!(
            answers.len(),
            CONTENDERS,
            "{name}: one answer per contender"
        );
        let first = &answers[0];
        for a in answers {
            assert_eq!(
                (&a.owner, a.epoch),
                (&first.owner, first.epoch),
                "{name}: contenders were told different owners: {answers:?}"
            );
        }
        let claimed = answers.iter().filter(|a| a.kind == won).count();
        if exactly_one_claimed {
            assert_eq!(claimed, 1, "{name}: {answers:?}");
        } else {
            assert!(claimed <= 1, "{name}: {answers:?}");
        }
        let rec = store
            .lookup(&ConferenceName::parse(name).expect("name"))
            .await
            .expect("lookup")
            .unwrap_or_else(|| panic!("{name} has no owner in redis"));
        assert_eq!(rec.owner.node.as_str(), first.owner, "{name}: redis owner");
        assert_eq!(rec.owner.epoch, first.epoch, "{name}: redis epoch");
        assert_eq!(rec.owner.epoch, epoch, "{name}: epoch");
    }
    let winners: std::collections::HashSet<&str> =
        told.values().map(|a| a[0].owner.as_str()).collect();
    assert!(
        winners.len() > 1,
        "the race should be won by different contenders, got {winners:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_on_single_redis_gives_one_owner_per_name() {
    let redis = RedisServer::start().expect("redis");
    let cfg = lasting(fixtures::single(&redis.url()));
    let store = fixtures::store(&cfg);
    register_contender_nodes(&store).await;
    let told = finish_storm(start_storm(&cfg, 32));
    verify(&store, &told, true).await;
}

/// Every contender re-homes the same conferences from one dead owner at once: each name
/// moves exactly once, to one node every contender is told, at the dead owner's epoch + 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehoming_from_a_dead_owner_moves_each_name_once() {
    let redis = RedisServer::start().expect("redis");
    let cfg = lasting(fixtures::single(&redis.url()));
    let store = fixtures::store(&cfg);
    // A lease long enough for every claim below on a loaded machine; the owner's last
    // heartbeat (after them) grants a short one.
    store
        .register(
            &fixtures::node("node-dead", 100_000),
            Duration::from_secs(60),
        )
        .await
        .expect("register the owner to die");
    for i in 0..NAMES {
        let name = ConferenceName::parse(&format!("race-{i}")).expect("name");
        let c = store
            .claim(&name, &[fixtures::id("node-dead")])
            .await
            .expect("claim");
        assert_eq!(
            c.owner.map(|o| (o.node.to_string(), o.epoch)),
            Some(("node-dead".into(), 1))
        );
    }
    register_contender_nodes(&store).await;
    store
        .register(
            &fixtures::node("node-dead", 100_000),
            Duration::from_millis(300),
        )
        .await
        .expect("the owner's last heartbeat");
    // The owner stops heartbeating: its lease runs out.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store
        .list_nodes()
        .await
        .expect("nodes")
        .iter()
        .any(|n| n.info.id.as_str() == "node-dead")
    {
        assert!(Instant::now() < deadline, "the owner's lease never ran out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let told = finish_storm(start_storm(&cfg, 32));
    verify_won(&store, &told, true, "rehomed", 2).await;
    assert!(
        told.values().all(|a| a[0].owner != "node-dead"),
        "a name stayed with the dead owner"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_on_redis_cluster_gives_one_owner_per_name() {
    let cluster = RedisCluster::start().expect("redis cluster");
    let cfg = lasting(fixtures::cluster(&cluster.seeds()));
    let store = fixtures::store(&cfg);
    register_contender_nodes(&store).await;
    let told = finish_storm(start_storm(&cfg, 32));
    verify(&store, &told, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_on_sentinel_survives_a_primary_failover() {
    let mut group = SentinelGroup::start().expect("sentinel group");
    let cfg = lasting(fixtures::sentinel(
        group.master_name(),
        &group.sentinel_urls(),
    ));
    let store = fixtures::store(&cfg);
    register_contender_nodes(&store).await;
    // Claims waiting for replicas have a connection of their own: open it on the old primary.
    let before = ConferenceName::parse("before-failover").expect("name");
    store
        .claim(&before, &[fixtures::id("node-0")])
        .await
        .expect("claim before the failover");

    let storm = start_storm(&cfg, 4);
    // Kill the primary once part of the names are claimed, so the failover lands mid-race.
    let primary = group.primary_port();
    wait_for(
        "a third of the names to be claimed",
        Duration::from_secs(30),
        || {
            redis_query::<i64>(primary, redis::cmd("ZCARD").arg("{confroute}:confs"))
                .filter(|n| *n >= (NAMES / 3) as i64)
        },
    )
    .expect("storm progresses");
    group
        .kill_primary_and_wait_failover(Duration::from_secs(30))
        .expect("failover");
    let promoted = Instant::now();

    // Claims must work again within 10 s of the promotion, on a store whose connections
    // (the shared one and the claims' own) were open to the old primary.
    let probe = ConferenceName::parse("after-failover").expect("name");
    loop {
        match store.claim(&probe, &[fixtures::id("node-0")]).await {
            Ok(c) if c.owner.is_some() => break,
            Ok(c) => panic!("unexpected claim result after failover: {c:?}"),
            Err(e) => {
                assert!(
                    promoted.elapsed() < Duration::from_secs(10),
                    "claims still failing 10 s after promotion: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // And so must lookups, which do not share the claims' connection.
    loop {
        match store.lookup(&before).await {
            Ok(rec) => {
                assert!(rec.is_some(), "a replicated claim survives the failover");
                break;
            }
            Err(e) => {
                assert!(
                    promoted.elapsed() < Duration::from_secs(10),
                    "lookups still failing 10 s after promotion: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    let told = finish_storm(storm);
    let retried = told.values().flatten().filter(|t| t.retries > 0).count();
    assert!(
        retried > 0,
        "the failover should have interrupted some claims"
    );
    verify(&store, &told, false).await;
}
