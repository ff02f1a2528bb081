//! Chaos, short run (see docs/chaos.md): one agent cut off from Redis by a black-holed proxy
//! under load. It admits nobody while cut off (and refuses the callers sent to it), its
//! conferences are re-homed within the node lease (plus the documented margin), no
//! conference is admitted on two nodes, and once the partition heals it ends the long
//! callers left in the conferences it lost (there must be some).

use confroute_tests::chaos::{self, Common, Length};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_node_stops_admitting_loses_its_conferences_and_tears_down_on_heal() {
    let mut common = Common::new(Length::Short);
    common.logs = std::env::var_os("CHAOS_LOG_DIR").map(Into::into);
    let report = chaos::run("partition", common)
        .await
        .expect("the scenario runs");
    println!("{report}");
    assert_eq!(report.value("admitted_cut_off"), 0.0, "{report}");
    assert!(report.value("refused_cut_off") > 0.0, "{report}");
    assert_eq!(report.double_homes, 0, "{report}");
    assert_eq!(report.value("torn_down"), 1.0, "{report}");
    assert!(report.value("stranded_callers") > 0.0, "{report}");
    assert_eq!(
        report.value("torn_down_callers"),
        report.value("stranded_callers"),
        "{report}"
    );
    let missed = chaos::missed_goals("partition", &report);
    assert!(missed.is_empty(), "goals missed: {missed:#?}\n{report}");
}
