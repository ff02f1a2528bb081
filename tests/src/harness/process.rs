//! A child process that is killed and reaped when dropped.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{HarnessError, HarnessResult};

/// A command and where to send what its spawn gave.
type SpawnRequest = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from one thread that lives as long as the test process: `PR_SET_PDEATHSIG`
/// fires when the forking thread ends, and a test's thread, or a blocking pool's (idle ones
/// end after seconds), may end while its child is still wanted.
fn spawn_lasting(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<SpawnRequest>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        let started = std::thread::Builder::new()
            .name("harness-spawner".into())
            .spawn(move || {
                for (mut cmd, back) in rx {
                    let _ = back.send(cmd.spawn());
                }
            });
        if let Err(e) = started {
            eprintln!("cannot start the harness's spawner thread: {e}");
        }
        std::sync::Mutex::new(tx)
    });
    let (back, answer) = std::sync::mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, back))
        .map_err(|_| std::io::Error::other("the harness's spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the harness's spawner thread is gone"))?
}

/// A running child; dropping it kills it (SIGKILL) and waits for it.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to `log`; killed (SIGKILL) if the test
    /// process dies without dropping it.
    pub fn spawn(name: &str, cmd: Command, log: &Path) -> HarnessResult<Proc> {
        Self::spawn_with_death_signal(name, cmd, log, libc::SIGKILL)
    }

    /// [`Proc::spawn`], sent `signal` rather than SIGKILL if the test process dies without
    /// dropping it: a server that forks workers (Kamailio) stops them on SIGTERM, while the
    /// kernel's death signal reaches only the process the harness started.
    pub fn spawn_with_death_signal(
        name: &str,
        mut cmd: Command,
        log: &Path,
        signal: libc::c_int,
    ) -> HarnessResult<Proc> {
        let out = File::create(log)
            .map_err(|e| HarnessError(format!("cannot create log {}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| HarnessError(format!("cannot reuse log {}: {e}", log.display())))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // A terminal's Ctrl-C goes to its whole foreground process group: in a group of its
        // own, a helper (Redis under confroute-dev) is stopped by its owner, in order, after
        // the agents have drained through it, not at the same moment as they start to.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let parent = std::process::id();
        // SAFETY: prctl and getppid are async-signal-safe and touch no memory of the parent;
        // the kernel kills the child when the thread that forked it ends, which
        // `spawn_lasting` makes the test process's end, not that of a test's (or a blocking
        // pool's) thread. A parent gone before the prctl took effect is caught by getppid.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    return Err(std::io::Error::other("the test process is gone"));
                }
                Ok(())
            });
        }
        let child =
            spawn_lasting(cmd).map_err(|e| HarnessError(format!("cannot start {name}: {e}")))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The captured output so far (for failure messages).
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Path of the output log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) without waiting.
    pub fn signal(&self, signal: i32) -> HarnessResult<()> {
        let pid = self
            .pid()
            .ok_or_else(|| HarnessError(format!("{} is not running", self.name)))?;
        // SAFETY: kill(2) on a pid we own; no memory is shared.
        let rc = unsafe { libc::kill(pid as i32, signal) };
        if rc != 0 {
            return Err(HarnessError(format!(
                "kill({pid}, {signal}) on {}: {}",
                self.name,
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Stops the process (SIGSTOP) and waits until every thread of it has stopped. The
    /// signal is acted on by one thread once it runs; under load the others may go on
    /// working meanwhile (reading a socket, sending a request), so a test that pauses a
    /// process to hold what it is sent must wait for this.
    pub fn pause(&self) -> HarnessResult<()> {
        self.signal(libc::SIGSTOP)?;
        let pid = self
            .pid()
            .ok_or_else(|| HarnessError(format!("{} is not running", self.name)))?;
        super::wait_for(
            &format!("every thread of {} to stop", self.name),
            std::time::Duration::from_secs(10),
            || all_threads_stopped(pid).then_some(()),
        )
    }

    /// Waits for exit up to `within`; returns the exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, within: std::time::Duration) -> HarnessResult<Option<i32>> {
        let name = self.name.clone();
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| HarnessError(format!("{name} already reaped")))?;
        let status = super::wait_for(&format!("{name} to exit"), within, || {
            child.try_wait().ok().flatten()
        })?;
        self.child = None;
        Ok(status.code())
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True when every thread of `pid` is stopped (or gone), as `/proc/<pid>/task/*/stat` says.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            // Gone since the listing.
            return true;
        };
        // The state follows the command name, which is in parentheses and may hold spaces.
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        matches!(state, Some("T" | "t" | "Z" | "X"))
    })
}

/// Runs `cmd` to its end with `input` on its standard input, its output collected; killed
/// (and an error) if it has not ended within `within`, so a tool that hangs fails the test
/// rather than hanging it, and none is left running.
pub fn run_with_input(
    mut cmd: Command,
    input: &[u8],
    within: std::time::Duration,
) -> HarnessResult<std::process::Output> {
    use std::io::{Read, Write};
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| HarnessError(format!("cannot start {cmd:?}: {e}")))?;
    let mut stdin = child.stdin.take();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        if let Some(s) = stdin.as_mut() {
            let _ = s.write_all(&input);
        }
    });
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = r.read_to_end(&mut out);
            out
        })
    };
    let stdout = child.stdout.take().map(|s| read(Box::new(s)));
    let stderr = child.stderr.take().map(|s| read(Box::new(s)));
    let deadline = std::time::Instant::now() + within;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HarnessError(format!(
                    "{cmd:?} did not end within {within:?}; killed"
                )));
            }
        }
    };
    let _ = writer.join();
    let collect = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    Ok(std::process::Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}
