//! Placement under stale views: four independent placers (each its own Redis connection and
//! its own view, refreshed only every 500 of its placements) place 10,000 conferences on 20
//! nodes of unequal capacity through the real claim script. No node may exceed its capacity,
//! and utilisation must stay balanced (max/mean ≤ 1.15).

use std::collections::HashMap;
use std::time::Duration;

use confroute_shared::name::ConferenceName;
use confroute_shared::placement::Placer;
use confroute_shared::store::ClaimKind;
use confroute_tests::fixtures;
use confroute_tests::harness::RedisServer;

const NODES: u32 = 20;
const PLACERS: usize = 4;
const PLACEMENTS: usize = 10_000;
const REFRESH_EVERY: usize = 500;

fn capacity(i: u32) -> u32 {
    // 400 .. 1540: the largest node is almost four times the smallest.
    400 + 60 * i
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_placers_respect_capacity_and_stay_balanced() {
    let redis = RedisServer::start().expect("redis");
    // The placements are counted from the claims afterwards: nobody joins them, so they get
    // a claim lease longer than the run.
    let cfg = confroute_shared::config::RedisConfig {
        claim_lease: Duration::from_secs(600),
        conference_lease: Duration::from_secs(600),
        ..fixtures::single(&redis.url())
    };
    let admin = fixtures::store(&cfg);
    for i in 0..NODES {
        admin
            .register(
                &fixtures::node(&format!("n{i:02}"), capacity(i)),
                Duration::from_secs(300),
            )
            .await
            .expect("register");
    }

    let mut tasks = Vec::new();
    for p in 0..PLACERS {
        let store = fixtures::store(&cfg);
        tasks.push(tokio::spawn(async move {
            let mut placer = Placer::new(None, Some(p as u64 + 1));
            let mut placed = 0;
            for k in 0..PLACEMENTS / PLACERS {
                if k % REFRESH_EVERY == 0 {
                    placer.refresh(&store.list_nodes().await.expect("list nodes"));
                }
                let candidates = placer.candidates(4).expect("room left");
                let name = ConferenceName::parse(&format!("p{p}-{k}")).expect("name");
                let claim = store.claim(&name, &candidates).await.expect("claim");
                assert_eq!(claim.kind, ClaimKind::Claimed, "{name}: {claim:?}");
                for skipped in &candidates[..claim.skipped] {
                    placer.unavailable(skipped);
                }
                let owner = claim.owner.expect("owner").node;
                placer.placed(&owner);
                placed += 1;
            }
            placed
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("placer");
    }
    assert_eq!(total, PLACEMENTS);

    // Count owners from the conference records themselves, not from the node counters.
    let mut per_node: HashMap<String, u32> = HashMap::new();
    let mut after = None;
    loop {
        let page = admin
            .list_conferences(after.as_deref(), 1000)
            .await
            .expect("list");
        for (_, rec) in &page.items {
            *per_node.entry(rec.owner.node.to_string()).or_default() += 1;
        }
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(per_node.values().sum::<u32>() as usize, PLACEMENTS);

    let nodes = admin.list_nodes().await.expect("nodes");
    let mut utilisation = Vec::new();
    for n in &nodes {
        let hosted = per_node.get(n.info.id.as_str()).copied().unwrap_or(0);
        assert!(
            hosted <= n.info.capacity,
            "{} hosts {hosted} > capacity {}",
            n.info.id,
            n.info.capacity
        );
        assert_eq!(
            hosted, n.claimed,
            "{}: capacity counter matches records",
            n.info.id
        );
        utilisation.push(f64::from(hosted) / f64::from(n.info.capacity));
    }
    let mean = utilisation.iter().sum::<f64>() / utilisation.len() as f64;
    let max = utilisation.iter().cloned().fold(0.0, f64::max);
    let ratio = max / mean;
    println!("utilisation mean {mean:.3} max {max:.3} max/mean {ratio:.3}");
    assert!(
        ratio <= 1.15,
        "max/mean utilisation {ratio:.3} > 1.15 ({utilisation:?})"
    );
}

/// A controller whose view is stale (every candidate of its preferred zone drained since it
/// read the nodes) still places a new conference where there is room, in the other zone,
/// rather than answering 503 until its next refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_view_does_not_refuse_a_conference_another_node_has_room_for() {
    use confroute_shared::types::NodeState;
    use confroute_tests::harness::ControllerProc;
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    let lease = Duration::from_secs(60);
    for (id, zone) in [
        ("eu1", "eu"),
        ("eu2", "eu"),
        ("eu3", "eu"),
        ("eu4", "eu"),
        ("us1", "us"),
    ] {
        let mut info = fixtures::node(id, 10);
        info.zone = zone.into();
        store.register(&info, lease).await.expect("register");
    }
    let mut env = fixtures::redis_env(&cfg);
    env.push(("CONFROUTE_ROUTING__ZONE".into(), "eu".into()));
    // The view is read at start and not again during the test.
    env.push(("CONFROUTE_ROUTING__NODE_REFRESH".into(), "10m".into()));
    let controller = ControllerProc::start(&env).expect("controller");
    fixtures::wait_ready(&controller.http_url())
        .await
        .expect("controller ready");
    for id in ["eu1", "eu2", "eu3", "eu4"] {
        store
            .set_state(&fixtures::id(id), NodeState::Draining)
            .await
            .expect("drain");
    }
    let answer: serde_json::Value = fixtures::http()
        .post(format!("{}/v1/route", controller.http_url()))
        .json(&serde_json::json!({"conference": "placed-anyway"}))
        .send()
        .await
        .expect("route")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["node_id"], "us1", "{answer}");
}
