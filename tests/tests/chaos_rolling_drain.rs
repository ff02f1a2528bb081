//! Chaos, short run (see docs/chaos.md): every node drained in turn (SIGTERM, short
//! `node.drain_deadline`) and started again, under continuous calls. No participant of a
//! conference on another node is dropped, none on the draining node is ended before its
//! deadline, each agent exits cleanly within the deadline and 10 s, and nothing is left.

use confroute_tests::chaos::{self, Common, Length};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_drain_drops_nobody_elsewhere_and_leaves_nothing() {
    let mut common = Common::new(Length::Short);
    common.logs = std::env::var_os("CHAOS_LOG_DIR").map(Into::into);
    let report = chaos::run("rolling-drain", common)
        .await
        .expect("the scenario runs");
    println!("{report}");
    assert_eq!(report.dropped, 0, "{report}");
    assert_eq!(
        report.value("clean_exits"),
        report.value("nodes"),
        "{report}"
    );
    assert_eq!(report.value("ended_before_deadline"), 0.0, "{report}");
    let missed = chaos::missed_goals("rolling-drain", &report);
    assert!(missed.is_empty(), "goals missed: {missed:#?}\n{report}");
}
