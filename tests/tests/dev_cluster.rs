//! The README's run command, `confroute-dev`, for a bounded time with a small topology:
//! it exits 0 with a summary where every conference stayed on one node and no route failed;
//! killing a node re-homes its conferences on the next calls; Ctrl-C stops it cleanly; and
//! no process it started outlives it.

use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Children (and their children) of `pid`, from /proc.
fn descendants(pid: u32) -> HashSet<u32> {
    let mut out = HashSet::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(text) = std::fs::read_to_string(t.path().join("children")) else {
                continue;
            };
            for c in text
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                if out.insert(c) {
                    todo.push(c);
                }
            }
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Kills a process group when the test holding it panics.
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: kill(2) on the process group this test started.
            unsafe { libc::kill(-self.0, libc::SIGKILL) };
        }
    }
}

/// Starts confroute-dev with `args` and `--plain`, its output piped, in a process group of
/// its own: a failing test's runner no longer reaches it, so a panic here stops it and all
/// it started.
fn spawn_plain(args: &[&str]) -> (std::process::Child, Group) {
    let child = Command::new(env!("CARGO_BIN_EXE_confroute-dev"))
        .args(args)
        .arg("--plain")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start confroute-dev");
    let group = Group(child.id() as i32);
    (child, group)
}

/// Runs confroute-dev with `args`; `interrupt_after` sends SIGINT at that time to its whole
/// process group, as a terminal's Ctrl-C does.
fn run(args: &[&str], interrupt_after: Option<Duration>) -> (Option<i32>, String) {
    let (mut child, _group) = spawn_plain(args);
    let pid = child.id();
    let mut seen = HashSet::new();
    let started = Instant::now();
    let mut interrupted = false;
    let status = loop {
        seen.extend(descendants(pid));
        if let Some(after) = interrupt_after {
            if !interrupted && started.elapsed() >= after {
                // SAFETY: kill(2) on our own child's process group.
                unsafe { libc::kill(-(pid as i32), libc::SIGINT) };
                interrupted = true;
            }
        }
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "confroute-dev did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!seen.is_empty(), "it started a Redis child process: {text}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<u32> = seen.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left running: {left:?}\n{text}");
    (status.code(), text)
}

fn summary(text: &str) -> &str {
    text.split("== confroute-dev summary").nth(1).unwrap_or("")
}

#[test]
fn bounded_run_keeps_every_conference_on_one_node() {
    let (code, text) = run(
        &[
            "--nodes",
            "2",
            "--controllers",
            "2",
            "--conferences",
            "6",
            "--rate",
            "8",
            "--hold-min",
            "1",
            "--hold-max",
            "4",
            "--duration",
            "8",
            "--dialouts-per-minute",
            "60",
        ],
        None,
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("-i 127.0.0.1 -trace_logs"),
        "prints a sipp line that logs the 302: {text}"
    );
    let s = summary(&text);
    assert!(s.contains("failed routes 0,"), "{s}");
    // Dial-outs go through the JSON-RPC API to a node, which originates them on its
    // simulated Asterisk; the simulator answers, so each is seen connected.
    let dialouts = s
        .lines()
        .find(|l| l.starts_with("dial-outs: "))
        .unwrap_or_else(|| panic!("a dial-out line: {s}"));
    assert!(dialouts.contains("connected"), "{dialouts}");
    assert!(!dialouts.contains("error"), "{dialouts}");
    assert!(s.contains("failed joins 0"), "{s}");
    assert!(
        s.contains("every conference was on exactly one node at every check (splits 0)"),
        "{s}"
    );
    let placed: u64 = s
        .split("calls placed ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(placed >= 30, "traffic flowed: {s}");
    assert!(text.contains("API token: "), "prints the token: {text}");
    assert!(
        text.contains("/v1/rpc") && text.contains("/metrics"),
        "prints the addresses: {text}"
    );
}

/// Traffic starts once the node has reached its Asterisk: before, a node registered a few
/// milliseconds before its ARI events WebSocket was up stayed unplaceable until its next
/// heartbeat, and the first calls of a one-node cluster got 503s.
#[test]
fn the_first_calls_find_the_node_placeable() {
    let (code, text) = run(
        &[
            "--nodes",
            "1",
            "--controllers",
            "1",
            "--rate",
            "40",
            "--duration",
            "2",
        ],
        None,
    );
    assert_eq!(code, Some(0), "{text}");
    let s = summary(&text);
    assert!(s.contains("failed routes 0,"), "{s}");
    assert!(!text.contains("has not reached its Asterisk"), "{text}");
}

#[test]
fn killing_a_node_rehomes_its_conferences_on_the_next_calls() {
    let (code, text) = run(
        &[
            "--nodes",
            "3",
            "--controllers",
            "2",
            "--conferences",
            "8",
            "--rate",
            "10",
            "--hold-min",
            "4",
            "--hold-max",
            "8",
            "--duration",
            "16",
            "--kill-node-after",
            "4",
        ],
        None,
    );
    assert_eq!(code, Some(0), "{text}");
    let s = summary(&text);
    let line = s
        .lines()
        .find(|l| l.starts_with("killed node-2"))
        .unwrap_or_else(|| panic!("no kill line: {s}"));
    // "killed node-2 at 4.0s hosting N conference(s); re-homed on later calls: M of N"
    let hosted: usize = line
        .split("hosting ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("hosted count");
    let tail = line
        .split("re-homed on later calls: ")
        .nth(1)
        .expect("re-homed count");
    let rehomed: usize = tail
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("number");
    assert!(
        hosted > 0,
        "node-2 hosted conferences when it was killed: {s}"
    );
    assert_eq!(
        rehomed, hosted,
        "every one of them re-homed on a later call: {s}"
    );
    assert!(
        !s.contains("-> node-2 ("),
        "nothing re-homed onto the dead node: {s}"
    );
    assert!(s.contains("(splits 0)"), "{s}");
}

#[test]
fn ctrl_c_stops_everything_in_order_with_a_summary() {
    let (code, text) = run(
        &[
            "--nodes",
            "2",
            "--controllers",
            "1",
            "--conferences",
            "4",
            "--rate",
            "5",
            "--hold-min",
            "30",
            "--hold-max",
            "60",
        ],
        Some(Duration::from_secs(6)),
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("stopping: callers hang up, nodes drain"),
        "{text}"
    );
    let s = summary(&text);
    assert!(s.contains("(splits 0)"), "{s}");
    // Drained before stopping (through the Redis the Ctrl-C must not have stopped first):
    // both nodes end listed, draining and empty.
    let nodes: Vec<&str> = s.lines().filter(|l| l.starts_with("  node-")).collect();
    assert_eq!(nodes.len(), 2, "{text}");
    for l in nodes {
        assert!(l.contains("draining claimed 0/"), "{l}");
    }
}

#[test]
fn bad_options_are_refused_with_a_reason() {
    let out = Command::new(env!("CARGO_BIN_EXE_confroute-dev"))
        .args(["--nodes", "1", "--kill-node-after", "2"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--kill-node-after needs at least 2 nodes")
    );
    let out = Command::new(env!("CARGO_BIN_EXE_confroute-dev"))
        .args(["--sip-uri", "sip:10.0.0.5"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--sip-uri is the SIP address of the real Asterisk given with --ari"));
}

/// A Ctrl-C while the cluster is still starting (here its node waits for an Asterisk that
/// is not there) stops it there: exit status 130, no banner and no summary, Redis killed with
/// it, and the log's path given, rather than heard only once the start is over.
#[test]
fn a_ctrl_c_while_starting_stops_at_once() {
    use std::io::BufRead;
    let nothing_there = confroute_tests::harness::free_port();
    let ari = format!("http://127.0.0.1:{nothing_there}");
    let (mut child, _group) = spawn_plain(&["--nodes", "1", "--controllers", "1", "--ari", &ari]);
    let pid = child.id();
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("read");
    assert!(first.contains("starting Redis"), "{first}");
    // Redis is up (the start goes on to the node), then the Ctrl-C.
    let deadline = Instant::now() + Duration::from_secs(30);
    let redis = loop {
        let d = descendants(pid);
        if !d.is_empty() {
            break d;
        }
        assert!(Instant::now() < deadline, "no Redis started");
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: kill(2) on our own child's process group, as a terminal's Ctrl-C.
    unsafe { libc::kill(-(pid as i32), libc::SIGINT) };
    let status = child.wait().expect("wait");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("stdout");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).expect("stderr");
    }
    let text = format!("{first}{rest}{err}");
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(text.contains("interrupted while starting"), "{text}");
    assert!(text.contains("cluster.log"), "the log is named: {text}");
    assert!(!text.contains("logs:"), "no banner: {text}");
    assert!(!text.contains("== confroute-dev summary"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!redis.iter().any(|p| alive(*p)), "Redis stopped with it");
}

/// A second Ctrl-C during the orderly stop ends it at once: exit status 130, no summary, and
/// Redis killed with it. Redis is paused (SIGSTOP) before the first Ctrl-C, so the drain,
/// which writes to it, cannot finish before the second arrives.
#[test]
fn a_second_ctrl_c_stops_at_once() {
    use std::io::BufRead;
    let (mut child, _group) = spawn_plain(&[
        "--nodes",
        "2",
        "--controllers",
        "1",
        "--conferences",
        "4",
        "--rate",
        "5",
    ]);
    let pid = child.id();
    // Both streams' lines, as they come (a full pipe would block the tool).
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let readers: Vec<_> = [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ]
    .into_iter()
    .map(|r| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        })
    })
    .collect();
    drop(tx);
    let mut text = String::new();
    let wait_line = |want: &str, text: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    text.push_str(&line);
                    text.push('\n');
                    if line.contains(want) {
                        return;
                    }
                }
                Err(_) => panic!("no line with `{want}`:\n{text}"),
            }
        }
    };
    // The banner ends with where the logs go: everything is up.
    wait_line("logs:", &mut text);
    let redis = descendants(pid);
    assert!(!redis.is_empty(), "it started a Redis child process");
    for p in &redis {
        // SAFETY: kill(2) on a child of the tool this test started.
        unsafe { libc::kill(*p as i32, libc::SIGSTOP) };
    }
    // SAFETY: kill(2) on our own child's process group, as a terminal's Ctrl-C.
    unsafe { libc::kill(-(pid as i32), libc::SIGINT) };
    wait_line("press Ctrl-C again to stop at once", &mut text);
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the orderly stop waits for the drain:\n{text}"
    );
    // SAFETY: as above.
    unsafe { libc::kill(-(pid as i32), libc::SIGINT) };
    let second = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            second.elapsed() < Duration::from_secs(10),
            "a second Ctrl-C stops at once:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    for r in readers {
        let _ = r.join();
    }
    text.extend(lines.try_iter().map(|l| l + "\n"));
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(text.contains("stopped at once"), "{text}");
    assert!(!text.contains("== confroute-dev summary"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<u32> = redis.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left running: {left:?}\n{text}");
}
