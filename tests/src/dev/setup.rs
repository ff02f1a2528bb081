//! What the run command needs from the system before it starts: a `redis-server`, installed
//! from Debian's packages as the test command does (as root), or the exact line to install it.

use std::process::Command;

use crate::harness::require_tool;

/// The Debian package that holds `redis-server`.
const PACKAGE: &str = "redis-server";

/// What to do about a missing `redis-server`.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// It is installed.
    Ready,
    /// Install it with apt-get (root on Debian or Ubuntu).
    Install,
    /// Tell the user this command, and stop.
    Tell(String),
}

/// Decides from what this machine has: `found` the program, `root` the user, `apt` apt-get.
pub fn plan(found: bool, root: bool, apt: bool) -> Plan {
    match (found, root && apt) {
        (true, _) => Plan::Ready,
        (false, true) => Plan::Install,
        (false, false) if apt => Plan::Tell(format!(
            "sudo apt-get update && sudo apt-get install -y --no-install-recommends {PACKAGE}"
        )),
        (false, false) => Plan::Tell(format!(
            "install Redis 6.2 or later so that `redis-server` is on PATH (Debian and Ubuntu: apt-get install -y {PACKAGE})"
        )),
    }
}

/// Makes sure `redis-server` can be started; `Err` says what the user must do.
pub fn ensure_redis() -> Result<(), String> {
    let found = require_tool("redis-server", PACKAGE).is_ok();
    let apt = require_tool("apt-get", "apt").is_ok();
    match plan(found, is_root(), apt) {
        Plan::Ready => Ok(()),
        Plan::Tell(line) => Err(format!(
            "`redis-server` is not installed; run this, then this command again:\n  {line}"
        )),
        Plan::Install => {
            println!("confroute-dev: installing {PACKAGE} (apt-get, as root)...");
            let quiet = |args: &[&str]| {
                Command::new("apt-get")
                    .args(args)
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .status()
                    .map_err(|e| format!("apt-get: {e}"))
                    .and_then(|s| {
                        s.success()
                            .then_some(())
                            .ok_or_else(|| format!("apt-get {} failed: {s}", args.join(" ")))
                    })
            };
            quiet(&["update", "-qq"])?;
            quiet(&["install", "-y", "-qq", "--no-install-recommends", PACKAGE])?;
            require_tool("redis-server", PACKAGE)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
}

/// True when this process runs as root (`Uid:` of `/proc/self/status`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().map(|u| u == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root on Debian installs; anyone else is told the exact line; nothing is done when the
    /// program is there.
    #[test]
    fn a_missing_redis_is_installed_as_root_or_its_install_line_given() {
        assert_eq!(plan(true, false, false), Plan::Ready);
        assert_eq!(plan(true, true, true), Plan::Ready);
        assert_eq!(plan(false, true, true), Plan::Install);
        assert_eq!(
            plan(false, false, true),
            Plan::Tell(
                "sudo apt-get update && sudo apt-get install -y --no-install-recommends redis-server"
                    .into()
            )
        );
        assert!(matches!(plan(false, true, false), Plan::Tell(t) if t.contains("redis-server")));
    }
}
