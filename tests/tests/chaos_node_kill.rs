//! Chaos, short run (see docs/chaos.md): a node agent killed with `kill -9` mid-conference
//! under load. Its conferences are routed to a live node within the 3 s node lease (plus one
//! call interval of the conference and 1 s for a loaded machine, the margin the scenario
//! documents), no conference is ever admitted on two nodes, and the agent, started again,
//! leaves no orphan.

use confroute_tests::chaos::{self, Common, Length};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_conferences_are_rehomed_within_the_lease_and_never_double_homed() {
    let mut common = Common::new(Length::Short);
    common.logs = std::env::var_os("CHAOS_LOG_DIR").map(Into::into);
    let report = chaos::run("node-kill", common)
        .await
        .expect("the scenario runs");
    println!("{report}");
    assert_eq!(report.double_homes, 0, "{report}");
    assert_eq!(report.two_owner_claims, 0, "{report}");
    assert_eq!(report.value("rehomed_all"), 1.0, "{report}");
    assert!(
        report.value("rehome_worst_ms") <= report.value("rehome_allowed_ms"),
        "{report}"
    );
    let missed = chaos::missed_goals("node-kill", &report);
    assert!(missed.is_empty(), "goals missed: {missed:#?}\n{report}");
}
