//! Chaos, short run (see docs/chaos.md): the Redis primary killed under load behind Sentinel
//! (claims wait for the replica). Controllers answer 503 with Retry-After during the
//! failover, no conference gets a second home, routing is back within 10 s of the promotion,
//! and no process was restarted.

use confroute_tests::chaos::{self, Common, Length};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_failover_gives_503s_never_a_second_home_and_recovers_in_place() {
    let mut common = Common::new(Length::Short);
    common.logs = std::env::var_os("CHAOS_LOG_DIR").map(Into::into);
    let report = chaos::run("sentinel-failover", common)
        .await
        .expect("the scenario runs");
    println!("{report}");
    assert!(report.fault_503 > 0, "{report}");
    assert_eq!(report.fault_503_without_retry_after, 0, "{report}");
    assert_eq!(report.unavailable_without_retry_after, 0, "{report}");
    assert_eq!(report.other_route_answers(), 0, "{report}");
    assert_eq!(report.double_homes + report.split_by_rehome, 0, "{report}");
    assert_eq!(report.restarted, 0, "{report}");
    let missed = chaos::missed_goals("sentinel-failover", &report);
    assert!(missed.is_empty(), "goals missed: {missed:#?}\n{report}");
}
