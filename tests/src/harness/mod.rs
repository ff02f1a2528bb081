//! Test harness: starts real servers (Redis, Redis Cluster, Sentinel, and later our own
//! binaries, sipp and Kamailio) on free loopback ports and stops them when dropped, whether
//! the test passed or failed.
//!
//! Processes are started from one harness thread that lasts as long as the test process:
//! they are also killed by the kernel if the process dies without running destructors
//! (`PR_SET_PDEATHSIG`).

mod controller;
mod dark;
mod kamailio;
mod node;
mod process;
mod proxy;
mod redis;
mod sipp;

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use self::redis::{
    redis_query, wait_replica_acks, RedisCluster, RedisServer, SentinelGroup, TestCa,
};
pub use controller::ControllerProc;
pub use dark::DarkPort;
pub use kamailio::{kamailio_example_config, KamailioOptions, KamailioProc};
pub use node::NodeProc;
pub use process::{run_with_input, Proc};
pub use proxy::TcpProxy;
pub use sipp::{run_sipp, scenario, SippRun, SippTransport};

/// A harness step failed; the message says what and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HarnessError(pub String);

/// Result of a harness step.
pub type HarnessResult<T> = Result<T, HarnessError>;

/// Fails with the install command when a required program is missing.
pub fn require_tool(program: &str, debian_package: &str) -> HarnessResult<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in
        std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
    {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(HarnessError(format!(
        "`{program}` is not installed; install it with: sudo apt-get install -y {debian_package} \
         (the README's test command does this for you)"
    )))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// It is picked below the kernel's ephemeral range where there is room: a port the OS hands
/// out for `bind(0)` is free again as soon as it is released, and any outgoing connection
/// (a client of another test) may take it before the process it is meant for binds it.
/// Each pick is also reserved for a minute across the test processes running at once, so two
/// tests never hand out the same port before either has bound it.
pub fn free_port() -> u16 {
    let low = ephemeral_low().unwrap_or(0);
    if low >= FIXED_FLOOR + 1000 {
        for _ in 0..200 {
            let port = rand::random_range(FIXED_FLOOR..low);
            if reserve_pick(port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"))
}

/// How long a port [`free_port`] handed out stays reserved for the process it was meant
/// for: by then it is bound, or was given up.
const PICK_RESERVED: Duration = Duration::from_secs(60);

/// Reserves `port` for this pick, across processes, by creating a file named after it; false
/// when another process picked it less than [`PICK_RESERVED`] ago.
fn reserve_pick(port: u16) -> bool {
    // One directory per user: a directory another user made (a run as root, say) would refuse
    // this user's files, and every pick would fall back to ports the kernel hands out.
    // SAFETY: getuid(2) cannot fail.
    let uid = unsafe { libc::getuid() };
    reserve_in(
        &std::env::temp_dir().join(format!("confroute-test-ports-{uid}")),
        port,
    )
}

/// [`reserve_pick`] in `dir`. Where no reservation can be made there at all, the pick goes
/// ahead unreserved rather than being refused.
fn reserve_in(dir: &std::path::Path, port: u16) -> bool {
    if std::fs::create_dir_all(dir).is_err() {
        return true;
    }
    let path = dir.join(port.to_string());
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
    };
    match create() {
        Ok(_) => return true,
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return true,
        Err(_) => {}
    }
    let stale = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > PICK_RESERVED));
    stale && std::fs::remove_file(&path).is_ok() && create().is_ok()
}

/// Lowest port [`free_port`] picks itself.
const FIXED_FLOOR: u16 = 10_000;

/// The first port of the kernel's ephemeral range (`ip_local_port_range`).
fn ephemeral_low() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A port free for both TCP and UDP on 127.0.0.1 (for SIP listeners).
pub fn free_udp_tcp_port() -> u16 {
    for _ in 0..100 {
        let port = free_port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP on 127.0.0.1 after 100 tries")
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `within`.
pub fn wait_for<T>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> HarnessResult<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(HarnessError(format!(
                "timed out after {within:?} waiting for {what}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Async twin of [`wait_for`] for checks that await.
pub async fn wait_for_async<T, F, Fut>(
    what: &str,
    within: Duration,
    mut check: F,
) -> HarnessResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(HarnessError(format!(
                "timed out after {within:?} waiting for {what}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A private directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/confroute-<label>-<random>`.
    pub fn new(label: &str) -> HarnessResult<Self> {
        let n: u64 = rand::random();
        let path = std::env::temp_dir().join(format!("confroute-{label}-{n:016x}"));
        std::fs::create_dir_all(&path)
            .map_err(|e| HarnessError(format!("cannot create {}: {e}", path.display())))?;
        Ok(TempDir(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Path of a binary of this workspace, built into the same target directory as the test (or
/// tool) running.
///
/// The README's test command builds every binary before running the tests; the benchmark,
/// chaos and soak tools need `cargo build --release --workspace --bins` first.
pub fn workspace_bin(name: &str) -> HarnessResult<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|e| HarnessError(format!("cannot find the test executable: {e}")))?;
    // target/<profile>/deps/<test>  ->  target/<profile>/<name>
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().map(Path::to_path_buf);
        if dir
            .as_deref()
            .is_some_and(|p| p.file_name().is_some_and(|n| n == "target"))
        {
            break;
        }
    }
    Err(HarnessError(format!(
        "binary `{name}` not found next to {}; build it first with `{}`",
        exe.display(),
        build_command(&exe)
    )))
}

/// The command that builds every binary of the workspace in the profile `exe` was built in:
/// it sits in `<target>/<profile>/` (a tool) or `<target>/<profile>/deps/` (a test).
fn build_command(exe: &Path) -> String {
    let dir = exe.parent();
    let profile_dir = match dir {
        Some(d)
            if d.file_name()
                .is_some_and(|n| n == "deps" || n == "examples") =>
        {
            d.parent()
        }
        d => d,
    };
    // A target directory is named `target` or, when set elsewhere (CARGO_TARGET_DIR), holds
    // the CACHEDIR.TAG cargo writes.
    let in_target = profile_dir.and_then(Path::parent).is_some_and(|t| {
        t.file_name().is_some_and(|n| n == "target") || t.join("CACHEDIR.TAG").is_file()
    });
    match profile_dir
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
    {
        Some("release") => "cargo build --release --workspace --bins".to_string(),
        Some(p) if in_target && p != "debug" => {
            format!("cargo build --profile {p} --workspace --bins")
        }
        _ => "cargo build --workspace --bins".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port picked a moment ago by another process is not handed out again; where no
    /// reservation can be made (the directory cannot exist), picks go ahead rather than
    /// every one being refused.
    #[test]
    fn port_reservations_refuse_a_fresh_pick_and_never_block_all_picks() {
        let dir = crate::harness::TempDir::new("ports").expect("dir");
        let ports = dir.path().join("ports");
        assert!(reserve_in(&ports, 20_001));
        assert!(!reserve_in(&ports, 20_001), "picked a moment ago");
        assert!(reserve_in(&ports, 20_002));
        // A file where the directory should be: nothing can be reserved.
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, b"").expect("file");
        assert!(reserve_in(&blocked, 20_001));
    }

    /// The hint for a missing binary builds in the profile of the executable that looked for
    /// it: a release tool is not told to build debug binaries it would not find.
    #[test]
    fn the_build_hint_names_the_running_executables_profile() {
        let hint = |p: &str| build_command(Path::new(p));
        assert_eq!(
            hint("/w/target/release/chaos"),
            "cargo build --release --workspace --bins"
        );
        assert_eq!(
            hint("/w/target/release/deps/dev_cluster-0123abcd"),
            "cargo build --release --workspace --bins"
        );
        assert_eq!(
            hint("/w/target/debug/deps/dev_cluster-0123abcd"),
            "cargo build --workspace --bins"
        );
        assert_eq!(
            hint("/w/target/debug/soak"),
            "cargo build --workspace --bins"
        );
        assert_eq!(
            hint("/w/target/profiling/bench-sip"),
            "cargo build --profile profiling --workspace --bins"
        );
        assert_eq!(
            hint("/usr/local/bin/soak"),
            "cargo build --workspace --bins"
        );
    }
}
