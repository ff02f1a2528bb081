//! Running real `sipp` scenarios (Debian package `sip-tester`) from `tests/sipp/`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::{free_udp_tcp_port, require_tool, HarnessError, HarnessResult, Proc, TempDir};

/// Path of a scenario file shipped in `tests/sipp/`.
pub fn scenario(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("sipp")
        .join(name)
}

/// What one sipp run did.
#[derive(Debug)]
pub struct SippRun {
    /// sipp's exit code: 0 when every call succeeded.
    pub code: Option<i32>,
    /// Lines the scenario logged with `<log message="RESULT k=v|k=v"/>`, as maps.
    pub results: Vec<std::collections::HashMap<String, String>>,
    /// sipp's error log.
    pub errors: String,
    /// Every message sent and received.
    pub messages: String,
    /// sipp's own output.
    pub output: String,
}

impl SippRun {
    /// Panics with everything sipp recorded unless every call succeeded.
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "sipp failed\n--- errors\n{}\n--- messages\n{}\n--- output\n{}",
            self.errors,
            self.messages,
            self.output
        );
        self
    }

    /// The value of `key` in the first result line.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.results.first()?.get(key).map(String::as_str)
    }
}

/// Transport for a run.
#[derive(Clone, Copy, Debug)]
pub enum SippTransport {
    /// `-t u1`.
    Udp,
    /// `-t t1`.
    Tcp,
}

/// Runs `scenario_file` once against `target` with `service` as the Request-URI user.
pub fn run_sipp(
    scenario_file: &str,
    target: SocketAddr,
    transport: SippTransport,
    service: &str,
    calls: u32,
) -> HarnessResult<SippRun> {
    let sipp = require_tool("sipp", "sip-tester")?;
    let dir = TempDir::new("sipp")?;
    let log = dir.path().join("actions.log");
    let errors = dir.path().join("errors.log");
    let messages = dir.path().join("messages.log");
    let mut cmd = Command::new(sipp);
    cmd.current_dir(dir.path())
        .arg("-sf")
        .arg(scenario(scenario_file))
        .args(["-i", "127.0.0.1", "-p", &free_udp_tcp_port().to_string()])
        .args([
            "-t",
            match transport {
                SippTransport::Udp => "u1",
                SippTransport::Tcp => "t1",
            },
        ])
        .args(["-s", service, "-m", &calls.to_string(), "-l", "10"])
        .args([
            "-timeout",
            "15s",
            "-timeout_error",
            "-recv_timeout",
            "5000",
            "-nostdin",
        ])
        .args(["-trace_logs", "-log_file"])
        .arg(&log)
        .args(["-trace_err", "-error_file"])
        .arg(&errors)
        .args(["-trace_msg", "-message_file"])
        .arg(&messages)
        .arg(target.to_string());
    let mut p = Proc::spawn("sipp", cmd, &dir.path().join("sipp.out"))?;
    let code = p
        .wait_exit(Duration::from_secs(30))
        .map_err(|e| HarnessError(format!("{e}\n{}", p.output())))?;
    let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let results = read(&log)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("RESULT "))
        .map(|l| {
            l.split('|')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect()
        })
        .collect();
    Ok(SippRun {
        code,
        results,
        errors: read(&errors),
        messages: read(&messages),
        output: p.output(),
    })
}
