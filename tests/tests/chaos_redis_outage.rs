//! Chaos, short run (see docs/chaos.md): Redis unreachable for every controller and agent
//! for a few seconds under load (sockets open, no answers). Liveness stays green, readiness
//! turns red, routing answers 503 with Retry-After, agents keep their participants and
//! refuse new joins, and everything recovers by itself with no process restarted.

use confroute_tests::chaos::{self, Common, Length};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_everyone_alive_refuses_with_503_and_recovers_in_place() {
    let mut common = Common::new(Length::Short);
    common.logs = std::env::var_os("CHAOS_LOG_DIR").map(Into::into);
    let report = chaos::run("redis-outage", common)
        .await
        .expect("the scenario runs");
    println!("{report}");
    assert_eq!(report.value("healthz_failures"), 0.0, "{report}");
    assert_eq!(
        report.value("readyz_red"),
        report.value("processes"),
        "{report}"
    );
    assert!(report.fault_503 > 0, "{report}");
    assert_eq!(report.fault_503_without_retry_after, 0, "{report}");
    assert_eq!(report.unavailable_without_retry_after, 0, "{report}");
    assert_eq!(report.other_route_answers(), 0, "{report}");
    assert_eq!(report.dropped, 0, "{report}");
    assert_eq!(report.restarted, 0, "{report}");
    let missed = chaos::missed_goals("redis-outage", &report);
    assert!(missed.is_empty(), "goals missed: {missed:#?}\n{report}");
}
