//! Soak, short run (see docs/soak.md): the soak tool's own code on the same cluster (2
//! controllers, 3 node agents, Redis, simulated Asterisks) for 5 s of warm-up and 20 s
//! measured at a modest fixed rate, so that a leak or an error that the 10-minute soak would
//! find shows in CI when it is gross enough to show in 20 s.
//!
//! Asserted: no error outcome of any call; calls actually flowed; no process exited; per
//! judged process (controllers, agents, Redis), open fds other than pooled HTTP keep-alive
//! connections end within 2 of their start, and RSS grows less than 10 %.
//!
//! Why those bounds:
//! - fds: the judged count leaves out established keep-alive connections of HTTP pools (the
//!   agent's ARI REST client, this test's client on the controllers' HTTP port), whose number
//!   follows the peak concurrency of the last 30 s or so, not the number of calls. Everything
//!   else (Redis connections, listeners, files, sockets in CLOSE_WAIT) was constant in every
//!   run; the slack of 2 covers a Redis or ARI reconnect caught mid-way, and is far below what
//!   a per-call or per-conference leak adds over the window's ~400 calls and ~100 conferences.
//! - RSS: over 20 s, growth was at most about 1.5 % in runs on the 2-core CI machine; an
//!   allocator arena created under contention can add about a MiB (4 % of an agent's ~23 MiB)
//!   at any moment, so the bound is 10 %: it still fails for a leak of ~15 KB or more per call
//!   in an agent or a controller. Smaller leaks are the 10-minute soak's to find.
//! - The at-rest fd check of the full soak (wait for pools to idle out, up to a minute or two)
//!   does not fit in a CI test's time and is left to the tool.

use std::time::Duration;

use confroute_tests::soak::{self, SoakConfig};

const RATE: f64 = 20.0;
const SOAK: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_soak_has_no_errors_and_no_fd_or_memory_growth() {
    let mut cfg = SoakConfig::full();
    cfg.rate = Some(RATE);
    cfg.warmup = Duration::from_secs(5);
    cfg.duration = SOAK;
    cfg.sample_every = Duration::from_secs(1);
    cfg.trend_window = 5;
    cfg.rss_limit_pct = 10.0;
    cfg.fd_slack = 2;
    cfg.rest_wait = Duration::ZERO;
    // Printed, not asserted (see below): no need to wait the full 15 s for it.
    cfg.empty_wait = Duration::from_secs(5);
    cfg.mix.hold = (Duration::from_millis(500), Duration::from_secs(2));
    cfg.logs = std::env::var_os("SOAK_LOG_DIR").map(Into::into);
    let report = soak::run(&cfg).await.expect("the soak runs");
    println!("{report}");

    assert_eq!(report.errors(), 0, "error outcomes\n{report}");
    // A loaded machine may place a few calls late; three quarters of the asked-for calls
    // joined shows the load flowed through routing and joins.
    let asked = RATE * SOAK.as_secs_f64();
    assert!(
        report.soak_calls.joined as f64 >= 0.75 * asked,
        "only {} of {asked} calls joined\n{report}",
        report.soak_calls.joined
    );
    let judged: Vec<_> = report.processes.iter().filter(|p| p.judged).collect();
    assert_eq!(
        judged.len(),
        cfg.controllers + cfg.nodes + 1,
        "every controller, agent and Redis is judged\n{report}"
    );
    for p in &judged {
        assert!(!p.exited, "{} exited\n{report}", p.name);
        assert!(
            p.fd_growth() <= cfg.fd_slack as f64,
            "{}: open fds (keep-alive pools aside) {} -> {}\n{report}",
            p.name,
            p.fds_start,
            p.fds_end
        );
        assert!(
            p.rss_growth_pct < cfg.rss_limit_pct,
            "{}: RSS {:+.1}%\n{report}",
            p.name,
            p.rss_growth_pct
        );
    }
    assert!(report.restarted.is_empty(), "restarted\n{report}");
    // Every other goal too, except two: the looser minimum above replaces the 95 % delivery
    // one on a shared CI machine; and what is left behind once the callers hung up is
    // printed, not asserted, because the agent can leave a claim for up to its 60 s lease
    // when a conference ends during a heartbeat (docs/soak.md, "Findings").
    let missed: Vec<_> = report
        .missed()
        .into_iter()
        .filter(|g| {
            !g.name.starts_with("the load was delivered") && !g.name.starts_with("nothing left")
        })
        .collect();
    assert!(missed.is_empty(), "goals missed: {missed:#?}\n{report}");
}
