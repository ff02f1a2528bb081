//! A `confroute-controller` process on free loopback ports.

use std::process::Command;
use std::time::Duration;

use super::{
    free_port, free_udp_tcp_port, wait_for, workspace_bin, HarnessError, HarnessResult, Proc,
    TempDir,
};

/// A running controller; killed when dropped.
pub struct ControllerProc {
    proc: Proc,
    /// The address SIP listens on.
    sip_ip: std::net::IpAddr,
    /// SIP port (UDP and TCP), on 127.0.0.1 unless started otherwise.
    pub sip_port: u16,
    /// HTTP port on 127.0.0.1.
    pub http_port: u16,
    _dir: TempDir,
}

impl ControllerProc {
    /// Starts a controller with `env` (`CONFROUTE_*` settings) added to its own ports, and
    /// waits until it says it started.
    pub fn start(env: &[(String, String)]) -> HarnessResult<Self> {
        Self::start_sip_on(std::net::Ipv4Addr::LOCALHOST.into(), env)
    }

    /// [`ControllerProc::start`] with SIP on `ip` (`0.0.0.0`: every address, a multi-homed
    /// host's; [`ControllerProc::sip_addr`] is then on 127.0.0.1).
    pub fn start_sip_on(ip: std::net::IpAddr, env: &[(String, String)]) -> HarnessResult<Self> {
        let sip_port = free_udp_tcp_port();
        let http_port = free_port();
        let dir = TempDir::new("controller")?;
        let mut cmd = Command::new(workspace_bin("confroute-controller")?);
        let sip_ip = ip;
        cmd.env(
            "CONFROUTE_SIP__LISTEN",
            std::net::SocketAddr::new(ip, sip_port).to_string(),
        )
        .env("CONFROUTE_HTTP__LISTEN", format!("127.0.0.1:{http_port}"))
        .env("CONFROUTE_ROUTING__NODE_REFRESH", "100ms")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let proc = Proc::spawn(
            "confroute-controller",
            cmd,
            &dir.path().join("controller.log"),
        )?;
        let mut me = ControllerProc {
            proc,
            sip_ip,
            sip_port,
            http_port,
            _dir: dir,
        };
        let started = wait_for("controller start-up", Duration::from_secs(20), || {
            let out = me.proc.output();
            if out.contains("confroute-controller started") {
                Some(Ok(()))
            } else if !me.proc.is_running() {
                Some(Err(out))
            } else {
                None
            }
        })?;
        started
            .map_err(|out| HarnessError(format!("controller exited during start-up:\n{out}")))?;
        Ok(me)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// SIP address.
    pub fn sip_addr(&self) -> std::net::SocketAddr {
        if self.sip_ip.is_unspecified() {
            std::net::SocketAddr::from(([127, 0, 0, 1], self.sip_port))
        } else {
            std::net::SocketAddr::new(self.sip_ip, self.sip_port)
        }
    }

    /// Everything the controller logged so far.
    pub fn output(&self) -> String {
        self.proc.output()
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// The process, for signals and exit checks.
    pub fn process(&mut self) -> &mut Proc {
        &mut self.proc
    }
}
