//! Chaos, short run (see docs/chaos.md): every ARI events WebSocket dropped every 2 s under
//! load. Agents reconnect and reconcile: no orphan bridge, no participant lost or dropped.

use confroute_tests::chaos::{self, Common, Length};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_websockets_orphan_no_bridge_and_lose_no_participant() {
    let mut common = Common::new(Length::Short);
    common.logs = std::env::var_os("CHAOS_LOG_DIR").map(Into::into);
    let report = chaos::run("ari-flap", common)
        .await
        .expect("the scenario runs");
    println!("{report}");
    assert_eq!(report.orphan_bridges, 0, "{report}");
    assert_eq!(report.value("unknown_bridges"), 0.0, "{report}");
    assert_eq!(report.lost + report.dropped, 0, "{report}");
    let missed = chaos::missed_goals("ari-flap", &report);
    assert!(missed.is_empty(), "goals missed: {missed:#?}\n{report}");
}
