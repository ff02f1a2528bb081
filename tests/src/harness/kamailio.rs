//! A real Kamailio (Debian package `kamailio`) on a free loopback port, started in the
//! foreground with its own runtime directory, and stopped with all its worker processes.

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{
    free_udp_tcp_port, require_tool, wait_for, HarnessError, HarnessResult, Proc, TempDir,
};

/// How long Kamailio may take to load its modules and open its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The shipped example configuration, `examples/kamailio/kamailio.cfg`.
pub fn kamailio_example_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("kamailio")
        .join("kamailio.cfg")
}

/// How to start Kamailio.
#[derive(Clone, Debug)]
pub struct KamailioOptions {
    /// Configuration file.
    pub config: PathBuf,
    /// Pre-processor defines (`-A NAME=value`); `LISTEN_ADDR` and `LISTEN_PORT` are added.
    pub defines: Vec<(String, String)>,
    /// Shared memory in MB (`-m`).
    pub shm_mb: u32,
    /// Private memory per process in MB (`-M`).
    pub pkg_mb: u32,
}

impl KamailioOptions {
    /// `config` with small memory sizes, enough for functional tests.
    pub fn new(config: impl Into<PathBuf>) -> Self {
        KamailioOptions {
            config: config.into(),
            defines: Vec::new(),
            shm_mb: 64,
            pkg_mb: 8,
        }
    }

    /// Adds `-A NAME=value` (quote string values yourself: `"\"sip:...\""`).
    pub fn define(mut self, name: &str, value: impl Into<String>) -> Self {
        self.defines.push((name.to_string(), value.into()));
        self
    }
}

/// A running Kamailio; it and its worker processes are killed when dropped.
pub struct KamailioProc {
    proc: Proc,
    /// SIP port (UDP and TCP) on 127.0.0.1.
    pub sip_port: u16,
    _dir: TempDir,
}

impl KamailioProc {
    /// Starts Kamailio listening on a free loopback port and waits until it answers SIP.
    ///
    /// The configuration must take its listen address and port from the `LISTEN_ADDR` and
    /// `LISTEN_PORT` defines (as the shipped example does).
    pub fn start(opts: &KamailioOptions) -> HarnessResult<Self> {
        let kamailio = require_tool("kamailio", "kamailio")?;
        if !opts.config.is_file() {
            return Err(HarnessError(format!(
                "Kamailio configuration {} not found",
                opts.config.display()
            )));
        }
        let sip_port = free_udp_tcp_port();
        let dir = TempDir::new("kamailio")?;
        let runtime = dir.path().join("run");
        std::fs::create_dir_all(&runtime)
            .map_err(|e| HarnessError(format!("cannot create {}: {e}", runtime.display())))?;
        let mut cmd = Command::new(kamailio);
        // -DD keeps the main process in the foreground (it still forks its workers); -E logs
        // to stderr, which the harness captures.
        cmd.arg("-f")
            .arg(&opts.config)
            .args(["-DD", "-E"])
            .args(["-m", &opts.shm_mb.to_string()])
            .args(["-M", &opts.pkg_mb.to_string()])
            .arg("-Y")
            .arg(&runtime)
            .arg("-P")
            .arg(dir.path().join("kamailio.pid"))
            .arg("-w")
            .arg(dir.path())
            .args(["-A", "LISTEN_ADDR=127.0.0.1"])
            .args(["-A", &format!("LISTEN_PORT={sip_port}")]);
        for (name, value) in &opts.defines {
            cmd.args(["-A", &format!("{name}={value}")]);
        }
        // Its own process group, so that stopping it reaches every worker it forked: they
        // hold the listening sockets and would outlive a killed main process.
        cmd.process_group(0);
        // Dying with the test process, its main process stops its workers on SIGTERM
        // (`kill_all_children`), which SIGKILL would leave holding the SIP port.
        let proc = Proc::spawn_with_death_signal(
            "kamailio",
            cmd,
            &dir.path().join("kamailio.log"),
            libc::SIGTERM,
        )?;
        let mut me = KamailioProc {
            proc,
            sip_port,
            _dir: dir,
        };
        me.wait_ready()?;
        Ok(me)
    }

    /// Polls with OPTIONS until any SIP answer comes back (the sockets are open and the
    /// workers run the script), or fails with Kamailio's output when it exits.
    fn wait_ready(&mut self) -> HarnessResult<()> {
        let probe = UdpSocket::bind("127.0.0.1:0")
            .map_err(|e| HarnessError(format!("cannot bind a probe socket: {e}")))?;
        probe
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| HarnessError(format!("probe socket: {e}")))?;
        let local = probe
            .local_addr()
            .map_err(|e| HarnessError(format!("probe socket: {e}")))?;
        let target = self.sip_addr();
        let mut attempt = 0u32;
        let ready = wait_for("Kamailio to answer OPTIONS", START_TIMEOUT, || {
            if !self.proc.is_running() {
                return Some(false);
            }
            attempt += 1;
            let options = format!(
                "OPTIONS sip:{target} SIP/2.0\r\n\
                 Via: SIP/2.0/UDP {local};branch=z9hG4bK-probe-{attempt}\r\n\
                 Max-Forwards: 70\r\nFrom: <sip:probe@{local}>;tag=probe{attempt}\r\n\
                 To: <sip:{target}>\r\nCall-ID: probe-{attempt}@{local}\r\n\
                 CSeq: {attempt} OPTIONS\r\nContent-Length: 0\r\n\r\n"
            );
            probe.send_to(options.as_bytes(), target).ok()?;
            let mut buf = [0u8; 4096];
            let n = probe.recv(&mut buf).ok()?;
            buf[..n].starts_with(b"SIP/2.0 ").then_some(true)
        })
        .map_err(|e| HarnessError(format!("{e}\nKamailio output:\n{}", self.output())))?;
        if !ready {
            return Err(HarnessError(format!(
                "Kamailio exited during start-up:\n{}",
                self.output()
            )));
        }
        Ok(())
    }

    /// SIP address (UDP and TCP).
    pub fn sip_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.sip_port))
    }

    /// Everything Kamailio logged so far.
    pub fn output(&self) -> String {
        self.proc.output()
    }

    /// Process id of the main process.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Process ids of the main process and every worker (its process group).
    pub fn pids(&self) -> Vec<u32> {
        let Some(main) = self.pid() else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return vec![main];
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| process_group(*pid) == Some(main))
            .collect()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        self.proc.log_path()
    }
}

/// The process group of `pid` (field 5 of `/proc/<pid>/stat`).
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it follow its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(2)?.parse().ok()
}

impl Drop for KamailioProc {
    fn drop(&mut self) {
        let Some(pid) = self.proc.pid() else {
            return;
        };
        // SIGTERM lets the main process stop and reap its workers itself; killed all at
        // once, they would be left for init to reap.
        let stopped = self.proc.signal(libc::SIGTERM).is_ok()
            && self.proc.wait_exit(Duration::from_secs(5)).is_ok();
        // SAFETY: kill(2) on the process group we created for this Kamailio; no memory is
        // shared. It catches any worker still alive, and everything when SIGTERM did not
        // work; the main process is then reaped by `Proc`'s own drop.
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
        }
        if !stopped {
            self.proc.kill();
        }
    }
}
