//! A caller that reaches a node which does not own the conference (an edge that skipped
//! the router, or a stale route) is sent to the owner with a SIP 302 through ARI
//! `redirect`, or hung up with cause 34 (SIP 503) when that is configured or impossible.

mod node_common;

use confroute_tests::ari_sim::DialIn;
use confroute_tests::fixtures::{self, metric, scrape};
use confroute_tests::harness::{NodeProc, RedisServer};
use node_common::*;

struct Two {
    _redis: RedisServer,
    a: (TestSim, NodeProc),
    b: (TestSim, NodeProc),
}

async fn two(a_extra: &[(&str, &str)]) -> Two {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let sim_a = sim().await;
    let node_a = NodeProc::start("node-a", &env(&sim_a, &cfg, a_extra)).expect("node a");
    let sim_b = sim().await;
    let node_b = NodeProc::start("node-b", &env(&sim_b, &cfg, &[])).expect("node b");
    wait_app(&sim_a, &node_a).await;
    wait_app(&sim_b, &node_b).await;
    Two {
        _redis: redis,
        a: (sim_a, node_a),
        b: (sim_b, node_b),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_node_caller_is_redirected_to_the_owner() {
    let mut t = two(&[]).await;
    let owner_call = dial(&t.b.0, "elsewhere", &[]).await;
    wait_bridged(&t.b.0, &owner_call).await;
    let stray = dial(&t.a.0, "elsewhere", &[]).await;
    wait_request(&t.a.0, "redirect", &format!("/ari/channels/{stray}")).await;
    let redirect =
        t.a.0
            .request_log()
            .into_iter()
            .find(|r| r.operation.as_deref() == Some("redirect"))
            .expect("a redirect request");
    assert_eq!(redirect.status, 204, "{redirect:?}");
    let ev =
        t.a.0
            .wait_for_event(WAIT, |e| {
                e["type"] == "ChannelDestroyed" && e["channel"]["id"] == stray.as_str()
            })
            .await
            .expect("the redirected call ends on this node");
    assert_eq!(ev["cause"], 16);
    // The simulator keeps where ARI sent the call only until it is gone; the log names it.
    t.a.1
        .wait_log("PJSIP/sip:elsewhere@node-b.test:5060", WAIT)
        .expect("redirect target logged");
    assert!(t.a.0.snapshot().bridges.is_empty(), "node a hosts nothing");
    assert_eq!(
        ops(&t.a.0, "answer"),
        0,
        "a redirected call is never answered"
    );
    let m = scrape(&t.a.1.http_url()).await;
    assert_eq!(
        metric(&m, r#"confroute_node_joins_total{outcome="redirected"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_node_caller_is_hung_up_when_configured_or_already_answered() {
    let t = two(&[("CONFROUTE_NODE__WRONG_NODE", "hangup")]).await;
    let owner_call = dial(&t.b.0, "theirs", &[]).await;
    wait_bridged(&t.b.0, &owner_call).await;
    let stray = dial(&t.a.0, "theirs", &[]).await;
    assert_eq!(wait_hangup(&t.a.0, &stray).await, 34, "congestion: SIP 503");
    assert_eq!(ops(&t.a.0, "redirect"), 0);

    // Node b redirects by default, but an answered call cannot get a 302.
    let owner_a = dial(&t.a.0, "mine-a", &[]).await;
    wait_bridged(&t.a.0, &owner_a).await;
    let answered =
        t.b.0
            .dial_in(DialIn {
                app: "confroute".into(),
                args: vec!["mine-a".into()],
                answered: true,
                ..DialIn::default()
            })
            .await
            .expect("dial");
    assert_eq!(wait_hangup(&t.b.0, &answered).await, 34);
    // Nor can a call of a driver that transfers nothing (Asterisk would say nothing of it).
    let analog =
        t.b.0
            .dial_in(DialIn {
                app: "confroute".into(),
                args: vec!["mine-a".into()],
                tech: "DAHDI".into(),
                ..DialIn::default()
            })
            .await
            .expect("dial");
    assert_eq!(wait_hangup(&t.b.0, &analog).await, 34);
    assert_eq!(ops(&t.b.0, "redirect"), 0);
    let m = scrape(&t.b.1.http_url()).await;
    assert_eq!(
        metric(
            &m,
            r#"confroute_node_joins_total{outcome="wrong_node_hangup"}"#
        ),
        2.0
    );
}
