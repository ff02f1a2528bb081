//! A `confroute-node` process on a free loopback port.

use std::process::Command;
use std::time::Duration;

use super::{free_port, wait_for, workspace_bin, HarnessError, HarnessResult, Proc, TempDir};

/// A running node agent; killed when dropped.
pub struct NodeProc {
    proc: Proc,
    /// Node id.
    pub id: String,
    /// HTTP port on 127.0.0.1.
    pub http_port: u16,
    env: Vec<(String, String)>,
    dir: TempDir,
    starts: u32,
}

impl NodeProc {
    /// Starts node `id` with `env` (`CONFROUTE_*` settings: at least Redis and ARI) on a free
    /// HTTP port, with test-friendly timings, and waits until it says it started.
    pub fn start(id: &str, env: &[(String, String)]) -> HarnessResult<Self> {
        let http_port = free_port();
        let mut all: Vec<(String, String)> = vec![
            ("CONFROUTE_NODE__ID".into(), id.to_string()),
            (
                "CONFROUTE_HTTP__LISTEN".into(),
                format!("127.0.0.1:{http_port}"),
            ),
            (
                "CONFROUTE_NODE__SIP_URI".into(),
                format!("sip:{id}.test:5060"),
            ),
            ("CONFROUTE_NODE__HEARTBEAT_INTERVAL".into(), "200ms".into()),
            ("CONFROUTE_ARI__RECONNECT_MIN".into(), "50ms".into()),
            ("CONFROUTE_ARI__RECONNECT_MAX".into(), "500ms".into()),
            ("CONFROUTE_ARI__PING_INTERVAL".into(), "1s".into()),
        ];
        all.extend(env.iter().cloned());
        let dir = TempDir::new("node")?;
        let mut me = NodeProc {
            proc: Self::spawn(id, &all, &dir, 1)?,
            id: id.to_string(),
            http_port,
            env: all,
            dir,
            starts: 1,
        };
        me.wait_started()?;
        Ok(me)
    }

    fn spawn(id: &str, env: &[(String, String)], dir: &TempDir, n: u32) -> HarnessResult<Proc> {
        let mut cmd = Command::new(workspace_bin("confroute-node")?);
        cmd.env_remove("RUST_LOG")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        Proc::spawn(
            &format!("confroute-node {id}"),
            cmd,
            &dir.path().join(format!("node-{id}-{n}.log")),
        )
    }

    /// Waits until the current process says it started (after [`NodeProc::relaunch`]).
    pub fn wait_started(&mut self) -> HarnessResult<()> {
        let started = wait_for("node start-up", Duration::from_secs(20), || {
            let out = self.proc.output();
            if out.contains("confroute-node started") {
                Some(Ok(()))
            } else if !self.proc.is_running() {
                Some(Err(out))
            } else {
                None
            }
        })?;
        started.map_err(|out| HarnessError(format!("node exited during start-up:\n{out}")))
    }

    /// Starts the agent again (after a kill or an exit) on the same port and settings.
    pub fn restart(&mut self) -> HarnessResult<()> {
        self.relaunch()?;
        self.wait_started()
    }

    /// [`NodeProc::restart`] without waiting for the start: a test acts during it.
    pub fn relaunch(&mut self) -> HarnessResult<()> {
        self.proc.kill();
        self.starts += 1;
        self.proc = Self::spawn(&self.id, &self.env, &self.dir, self.starts)?;
        Ok(())
    }

    /// `http://127.0.0.1:<port>`.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Everything the current process logged so far.
    pub fn output(&self) -> String {
        self.proc.output()
    }

    /// What every process of this agent logged, each start under a header of its own: the
    /// lives before a kill or a restart too.
    pub fn all_output(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            let log = self.dir.path().join(format!("node-{}-{n}.log", self.id));
            let text = std::fs::read_to_string(&log)
                .unwrap_or_else(|e| format!("(cannot read {}: {e})\n", log.display()));
            out.push_str(&format!("==== start {n} of {} ====\n{text}", self.starts));
        }
        out
    }

    /// Waits until the current process logged `text`.
    pub fn wait_log(&mut self, text: &str, within: Duration) -> HarnessResult<()> {
        let proc = &mut self.proc;
        wait_for(&format!("node log line {text:?}"), within, || {
            proc.output().contains(text).then_some(())
        })
        .map_err(|e| HarnessError(format!("{e}\nnode output:\n{}", proc.output())))
    }

    /// The process, for signals and exit checks.
    pub fn process(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The process, to signal or pause it.
    pub fn process_ref(&self) -> &Proc {
        &self.proc
    }
}
