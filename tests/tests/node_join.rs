//! A caller's way into a conference on one node: the conference name from the app
//! argument, a channel variable or the SIP header; the bridge created once; the channel
//! answered and added; bad names refused with a clear cause and nothing touched.

mod node_common;

use confroute_shared::name::ConferenceName;
use confroute_tests::ari_sim::DialIn;
use confroute_tests::fixtures::{self, metric, scrape};
use node_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_of_one_conference_share_one_bridge_and_the_claim_counts_them() {
    let s = Single::start(&[]).await;
    let a = dial(&s.sim, "sales-42", &[]).await;
    let bridge = wait_bridged(&s.sim, &a).await;
    assert_main(&bridge, 1, "sales-42");
    let b = dial(&s.sim, "sales-42", &[]).await;
    assert_eq!(wait_bridged(&s.sim, &b).await, bridge);
    let snap = s.sim.snapshot();
    let br = snap.bridge(&bridge).expect("bridge");
    assert_eq!(br.types, "mixing,dtmf_events");
    assert_eq!(br.channels, vec![a.clone(), b.clone()]);
    for ch in [&a, &b] {
        assert_eq!(snap.channel(ch).expect("channel").state, "Up");
    }
    assert_eq!(ops(&s.sim, "createWithId"), 1, "bridge created once");

    let store = fixtures::store(&s.cfg);
    let name = ConferenceName::parse("sales-42").expect("name");
    confroute_tests::harness::wait_for_async("participants counted", WAIT, || async {
        let rec = store.lookup(&name).await.ok().flatten()?;
        (rec.participants == 2 && rec.owner.node.as_str() == "node-a").then_some(())
    })
    .await
    .expect("count in Redis");

    let local = get_json(&format!("{}/v1/conferences", s.node.http_url())).await;
    assert_eq!(local["items"][0]["conference"], "sales-42");
    assert_eq!(
        local["items"][0]["participants"].as_array().map(Vec::len),
        Some(2)
    );

    // Both leave: the conference ends, the bridge goes, the claim is released.
    s.sim.hangup_far_end(&a, 16).await.expect("hangup a");
    s.sim.hangup_far_end(&b, 16).await.expect("hangup b");
    until(&s.sim, "bridge destroyed", |snap| snap.bridges.is_empty()).await;
    confroute_tests::harness::wait_for_async("claim released", WAIT, || async {
        store
            .lookup(&name)
            .await
            .ok()
            .flatten()
            .is_none()
            .then_some(())
    })
    .await
    .expect("released");
    let m = scrape(&s.node.http_url()).await;
    assert_eq!(
        metric(&m, r#"confroute_node_joins_total{outcome="joined"}"#),
        2.0
    );
    assert_eq!(
        metric(&m, "confroute_node_join_duration_seconds_count"),
        2.0
    );
    assert_eq!(metric(&m, "confroute_node_conferences"), 0.0);
}

/// A claim a controller placed lives only `redis.claim_lease` (here 1 s) unless a call
/// reaches it: the first caller's count gives it the whole conference lease at once, not the
/// next heartbeat (here every 5 s), so its conference cannot lose its home in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_caller_gives_the_claim_the_whole_conference_lease() {
    let s = Single::start(&[("CONFROUTE_NODE__HEARTBEAT_INTERVAL", "5s")]).await;
    let controller = fixtures::store(&confroute_shared::config::RedisConfig {
        claim_lease: std::time::Duration::from_secs(1),
        ..s.cfg.clone()
    });
    let name = ConferenceName::parse("lease-1").expect("name");
    let placed = controller
        .claim(&name, &[fixtures::id("node-a")])
        .await
        .expect("claim");
    assert_eq!(
        placed.owner.map(|o| o.node.as_str().to_string()),
        Some("node-a".into())
    );
    let a = dial(&s.sim, "lease-1", &[]).await;
    wait_bridged(&s.sim, &a).await;
    let left: i64 = confroute_tests::harness::redis_query(
        s.redis.port(),
        redis::cmd("PTTL").arg(format!("{}conf:lease-1", s.cfg.prefix)),
    )
    .expect("PTTL");
    assert!(
        left > 5_000,
        "the claim of a conference in use has {left} ms left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_from_variable_or_sip_header_when_no_argument() {
    let s = Single::start(&[]).await;
    let by_var = dial(&s.sim, "", &[("CONFROUTE_CONFERENCE", "room-var")]).await;
    assert_main(&wait_bridged(&s.sim, &by_var).await, 1, "room-var");
    let by_header = s
        .sim
        .dial_in(DialIn {
            app: "confroute".into(),
            sip_headers: [("X-Conference".to_string(), "room-hdr".to_string())].into(),
            ..DialIn::default()
        })
        .await
        .expect("dial in");
    assert_main(&wait_bridged(&s.sim, &by_header).await, 1, "room-hdr");
    // An E.164 name survives the trip through the bridge id in a URL path.
    let e164 = dial(&s.sim, "+15555550101", &[]).await;
    assert_main(&wait_bridged(&s.sim, &e164).await, 1, "+15555550101");
    // A dialplan's stray spaces around a name are no reason to refuse it.
    let spaced = dial(&s.sim, " room-var ", &[]).await;
    assert_main(&wait_bridged(&s.sim, &spaced).await, 1, "room-var");
    let spaced_var = dial(&s.sim, "", &[("CONFROUTE_CONFERENCE", "room-var ")]).await;
    assert_main(&wait_bridged(&s.sim, &spaced_var).await, 1, "room-var");
    // Only spaces names nothing: the header is asked next.
    let blank = s
        .sim
        .dial_in(DialIn {
            app: "confroute".into(),
            args: vec!["  ".into()],
            sip_headers: [("X-Conference".to_string(), "room-hdr".to_string())].into(),
            ..DialIn::default()
        })
        .await
        .expect("dial in");
    assert_main(&wait_bridged(&s.sim, &blank).await, 1, "room-hdr");
}

/// An older Asterisk takes only `normal`, `busy` and `congestion` as a hangup's reason and
/// refuses the rest with 400: a caller refused with another cause (a bad name: 28, no name:
/// 1) is hung up all the same, with the nearest reason it knows, not left in Stasis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_callers_are_hung_up_on_an_asterisk_with_the_old_hangup_reasons() {
    let s = Single::start_on(
        sim_tuned(CHANNELVARS, |c| c.classic_hangup_reasons = true).await,
        &[],
    )
    .await;
    for conf in ["bad name", ""] {
        let caller = dial(&s.sim, conf, &[]).await;
        assert_eq!(
            wait_hangup(&s.sim, &caller).await,
            16,
            "{conf:?}: hung up `normal`\n{}",
            s.node.output()
        );
    }
    // A full conference's busy is a reason every version knows.
    let a = dial(&s.sim, "pair", &[("CONFROUTE_MAX_PARTICIPANTS", "1")]).await;
    wait_bridged(&s.sim, &a).await;
    let b = dial(&s.sim, "pair", &[]).await;
    assert_eq!(wait_hangup(&s.sim, &b).await, 17, "busy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_missing_names_are_hung_up_with_a_cause_and_touch_nothing() {
    let s = Single::start(&[]).await;
    let bad = dial(&s.sim, "bad name", &[]).await;
    assert_eq!(
        wait_hangup(&s.sim, &bad).await,
        28,
        "invalid number format (SIP 484)"
    );
    let none = dial(&s.sim, "", &[]).await;
    assert_eq!(wait_hangup(&s.sim, &none).await, 1, "unallocated (SIP 404)");
    // Asterisk answers the read of the missing header 500: expected, no warning.
    let log = s.node.output();
    assert!(!log.contains("unexpected ARI answer"), "{log}");
    assert!(s.sim.snapshot().bridges.is_empty());
    assert_eq!(ops(&s.sim, "createWithId"), 0);
    let store = fixtures::store(&s.cfg);
    let page = store.list_conferences(None, 100).await.expect("list");
    assert!(page.items.is_empty(), "no claim made: {page:?}");
    let m = scrape(&s.node.http_url()).await;
    assert_eq!(
        metric(&m, r#"confroute_node_joins_total{outcome="invalid_name"}"#),
        1.0
    );
    assert_eq!(
        metric(&m, r#"confroute_node_joins_total{outcome="no_name"}"#),
        1.0
    );
}

/// A caller hanging up while its answer waits in its channel's queue gets the answer
/// refused with 500 (`Failed to answer channel`): that is a caller who left, counted as
/// abandoned, not an ARI failure, and there is nobody left to hang up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_gone_while_being_answered_is_abandoned_not_an_error() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    s.sim.hold_operation("answer");
    let ch = dial(&s.sim, "shy", &[]).await;
    confroute_tests::harness::wait_for_async("the answer to be asked", WAIT, || async {
        (s.sim.held_requests("answer") == 1).then_some(())
    })
    .await
    .expect("answer asked");
    s.sim.hangup_during_answer(&ch);
    s.sim.release_operation("answer");
    wait_hangup(&s.sim, &ch).await;
    let url = s.node.http_url();
    let m = confroute_tests::harness::wait_for_async("the join counted", WAIT, || async {
        let m = scrape(&url).await;
        (metric(&m, r#"confroute_node_joins_total{outcome="abandoned"}"#) == 1.0).then_some(m)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert_eq!(
        metric(&m, r#"confroute_node_joins_total{outcome="ari_error"}"#),
        0.0
    );
    assert_eq!(ops(&s.sim, "hangup"), 0, "nobody left to hang up");
}

/// A caller who hangs up while being answered into a conference that has someone in it
/// gives its seat back at once: the node's view counts no one ringing, and Redis's count
/// comes back to the one participant (it stayed one too high for as long as nothing else
/// changed in the conference).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_join_into_a_busy_conference_gives_its_seat_back() {
    let s = Single::start(&[("CONFROUTE_CONFERENCE__BEEP", "false")]).await;
    let a = dial(&s.sim, "seats", &[]).await;
    wait_bridged(&s.sim, &a).await;
    s.sim.hold_operation("answer");
    let b = dial(&s.sim, "seats", &[]).await;
    confroute_tests::harness::wait_for_async("b's answer to be asked", WAIT, || async {
        (s.sim.held_requests("answer") == 1).then_some(())
    })
    .await
    .expect("answer asked");
    s.sim.hangup_during_answer(&b);
    s.sim.release_operation("answer");
    wait_hangup(&s.sim, &b).await;
    let url = format!("{}/v1/conferences", s.node.http_url());
    let store = fixtures::store(&s.cfg);
    let name: ConferenceName = "seats".parse().expect("name");
    confroute_tests::harness::wait_for_async("one participant, nobody ringing", WAIT, || async {
        let v = get_json(&url).await;
        let view = v["items"].as_array()?.first()?.clone();
        let counted = store.lookup(&name).await.ok()??.participants;
        (view["ringing"] == 0 && view["participants"].as_array()?.len() == 1 && counted == 1)
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.node.output()));
    assert!(s.sim.snapshot().channel(&a).is_some(), "a stays");
}

/// Proxy variables in the agent's environment (set cluster-wide for egress) do not carry its
/// ARI requests: Asterisk is reached directly, as the events WebSocket always is, and a join
/// works with a proxy that answers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ari_requests_ignore_proxy_variables_in_the_environment() {
    let dark = confroute_tests::harness::DarkPort::start().expect("dark port");
    let proxy = format!("http://{}", dark.addr());
    let s = Single::start(&[
        ("CONFROUTE_CONFERENCE__BEEP", "false"),
        ("HTTP_PROXY", proxy.as_str()),
        ("http_proxy", proxy.as_str()),
        ("ALL_PROXY", proxy.as_str()),
        ("NO_PROXY", ""),
    ])
    .await;
    let a = dial(&s.sim, "direct", &[]).await;
    assert_main(&wait_bridged(&s.sim, &a).await, 1, "direct");
}
