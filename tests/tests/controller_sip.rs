//! The controller's SIP redirect server driven by real sipp, over UDP and TCP, with a real
//! Redis and registered test nodes.

use std::time::Duration;

use confroute_shared::store::Store;
use confroute_tests::fixtures::{self, metric, scrape};
use confroute_tests::harness::{run_sipp, ControllerProc, RedisServer, SippTransport};

const TRANSPORTS: [SippTransport; 2] = [SippTransport::Udp, SippTransport::Tcp];

struct Setup {
    _redis: RedisServer,
    store: Store,
    controller: ControllerProc,
}

/// Redis, two serving nodes, and a controller.
async fn setup() -> Setup {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    for (id, host) in [("node-a", "10.0.0.11"), ("node-b", "10.0.0.12")] {
        let mut info = fixtures::node(id, 100);
        info.sip_uri = format!("sip:{host}:5060;transport=udp");
        store
            .register(&info, Duration::from_secs(300))
            .await
            .expect("register node");
    }
    let controller = ControllerProc::start(&fixtures::redis_env(&cfg)).expect("controller");
    Setup {
        _redis: redis,
        store,
        controller,
    }
}

fn node_host(node: &str) -> &'static str {
    match node {
        "node-a" => "10.0.0.11:5060;transport=udp",
        "node-b" => "10.0.0.12:5060;transport=udp",
        other => panic!("unexpected node {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_gets_302_with_contact_and_conference_headers_then_ack_is_absorbed() {
    let s = setup().await;
    for (i, t) in TRANSPORTS.into_iter().enumerate() {
        let conf = format!("sales-{i}");
        let run = run_sipp("invite.xml", s.controller.sip_addr(), t, &conf, 1).expect("sipp");
        run.assert_ok();
        let node = run.get("node").expect("node header").to_string();
        assert_eq!(run.get("conference"), Some(conf.as_str()), "{t:?}");
        assert_eq!(run.get("contact_user"), Some(conf.as_str()), "{t:?}");
        assert_eq!(run.get("contact_host"), Some(node_host(&node)), "{t:?}");
        assert!(!run.get("totag").unwrap_or("").is_empty(), "To-tag added");
        let rec = s
            .store
            .lookup(&conf.parse().expect("name"))
            .await
            .expect("lookup")
            .expect("claimed");
        assert_eq!(
            rec.owner.node.as_str(),
            node,
            "the 302 names the Redis owner"
        );
    }
    let m = scrape(&s.controller.http_url()).await;
    assert_eq!(
        metric(
            &m,
            r#"confroute_sip_requests_total{code="302",method="INVITE"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            r#"confroute_sip_requests_total{code="none",method="ACK"}"#
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_callers_of_one_conference_reach_the_same_node() {
    let s = setup().await;
    let mut nodes = Vec::new();
    for t in [SippTransport::Udp, SippTransport::Tcp, SippTransport::Udp] {
        let run =
            run_sipp("invite.xml", s.controller.sip_addr(), t, "board-room", 1).expect("sipp");
        run.assert_ok();
        nodes.push(run.get("node").expect("node").to_string());
    }
    assert!(nodes.iter().all(|n| n == &nodes[0]), "{nodes:?}");
    // Many conferences spread over both nodes.
    let mut seen = std::collections::HashSet::new();
    for i in 0..40 {
        let run = run_sipp(
            "invite.xml",
            s.controller.sip_addr(),
            SippTransport::Udp,
            &format!("room-{i}"),
            1,
        )
        .expect("sipp");
        run.assert_ok();
        seen.insert(run.get("node").expect("node").to_string());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "conferences spread over both nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_cancel_and_unknown_methods() {
    let s = setup().await;
    for t in TRANSPORTS {
        let run = run_sipp("options.xml", s.controller.sip_addr(), t, "x", 1).expect("sipp");
        run.assert_ok();
        assert!(run.get("allow").is_some_and(|a| a.contains("INVITE")));

        let run = run_sipp("cancel.xml", s.controller.sip_addr(), t, "cancelled", 1).expect("sipp");
        run.assert_ok();
        assert_eq!(run.get("cancel"), Some("200"), "{t:?}");
        assert_eq!(
            run.get("cancel_tag"),
            run.get("invite_tag"),
            "CANCEL 200 reuses the To-tag"
        );

        let run = run_sipp("unknown_method.xml", s.controller.sip_addr(), t, "x", 1).expect("sipp");
        run.assert_ok();
        assert_eq!(run.get("status"), Some("405"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_get_404_or_484_and_touch_nothing() {
    let s = setup().await;
    for t in TRANSPORTS {
        let run = run_sipp(
            "invite_status.xml",
            s.controller.sip_addr(),
            t,
            "bad{name",
            1,
        )
        .expect("sipp");
        run.assert_ok();
        assert_eq!(run.get("status"), Some("404"), "{t:?}");
        assert!(
            run.get("warning").is_some_and(|w| w.contains("'{'")),
            "{:?}",
            run.results
        );

        let run = run_sipp("invite_no_user.xml", s.controller.sip_addr(), t, "x", 1).expect("sipp");
        run.assert_ok();
        assert!(run.get("warning").is_some_and(|w| w.contains("user part")));
    }
    let page = s.store.list_conferences(None, 10).await.expect("list");
    assert!(
        page.items.is_empty(),
        "bad input created nothing: {:?}",
        page.items
    );
    let m = scrape(&s.controller.http_url()).await;
    assert_eq!(
        metric(&m, r#"confroute_route_total{outcome="invalid"}"#),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_capacity_gets_503_with_retry_after() {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let controller = ControllerProc::start(&fixtures::redis_env(&cfg)).expect("controller");
    for t in TRANSPORTS {
        let run = run_sipp(
            "invite_status.xml",
            controller.sip_addr(),
            t,
            "nobody-home",
            1,
        )
        .expect("sipp");
        run.assert_ok();
        assert_eq!(run.get("status"), Some("503"));
        assert_eq!(run.get("retry_after"), Some("5"));
        assert!(run.get("warning").is_some_and(|w| w.contains("room")));
    }
    let m = scrape(&controller.http_url()).await;
    assert_eq!(
        metric(&m, r#"confroute_route_total{outcome="no_capacity"}"#),
        2.0
    );
}
