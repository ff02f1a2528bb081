//! Private Redis deployments for tests: a single server, a 3-primary Cluster, and a
//! primary + replica watched by 3 Sentinels.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::{free_port, require_tool, wait_for, HarnessError, HarnessResult, Proc, TempDir};

const START_TIMEOUT: Duration = Duration::from_secs(15);

fn query(port: u16, cmd: &mut redis::Cmd) -> Option<redis::Value> {
    query_as(port, None, cmd)
}

fn query_as(port: u16, password: Option<&str>, cmd: &mut redis::Cmd) -> Option<redis::Value> {
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    let client = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}")).ok()?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_millis(300))
        .ok()?;
    conn.set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    cmd.query::<redis::Value>(&mut conn).ok()
}

/// Runs one command against the server on `port` (harness use: setup and inspection).
pub fn redis_query<T: redis::FromRedisValue>(port: u16, cmd: &mut redis::Cmd) -> Option<T> {
    redis::from_redis_value(query(port, cmd)?).ok()
}

/// Waits until the primary on `primary` has a replica that acknowledges writes (what a
/// `WAIT` for one replica needs). `online` in
/// `INFO replication` comes earlier: after a diskless sync the primary streams writes to
/// the replica only once its first `REPLCONF ACK` arrives (up to a second later), and a
/// `WAIT` before that times out.
pub fn wait_replica_acks(primary: u16) -> HarnessResult<()> {
    wait_for("a replica acknowledging writes", START_TIMEOUT, || {
        let client = redis::Client::open(format!("redis://127.0.0.1:{primary}")).ok()?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_millis(300))
            .ok()?;
        let acked: (String, i64) = redis::pipe()
            .cmd("SET")
            .arg("harness:replica-probe")
            .arg(1)
            .cmd("WAIT")
            .arg(1)
            .arg(100)
            .query(&mut conn)
            .ok()?;
        (acked.1 >= 1).then_some(())
    })
}

fn query_string(port: u16, cmd: &mut redis::Cmd) -> Option<String> {
    match query(port, cmd)? {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        redis::Value::SimpleString(s) => Some(s),
        redis::Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

fn info_field(port: u16, section: &str, field: &str) -> Option<String> {
    let text = query_string(port, redis::cmd("INFO").arg(section))?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

/// One private `redis-server` on a free loopback port.
pub struct RedisServer {
    // The path `require_tool` found: it may be outside `PATH` (`/usr/sbin`).
    program: std::path::PathBuf,
    port: u16,
    proc: Option<Proc>,
    dir: TempDir,
    extra: Vec<String>,
    starts: u32,
    password: Option<String>,
}

impl RedisServer {
    /// Starts a plain server (no persistence).
    pub fn start() -> HarnessResult<Self> {
        Self::start_with(&[])
    }

    /// Starts a server with extra `--option value` arguments.
    pub fn start_with(extra: &[&str]) -> HarnessResult<Self> {
        let program = require_tool("redis-server", "redis-server redis-tools")?;
        let mut server = RedisServer {
            program,
            port: free_port(),
            proc: None,
            dir: TempDir::new("redis")?,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            starts: 0,
            password: extra
                .iter()
                .position(|a| *a == "--requirepass")
                .and_then(|i| extra.get(i + 1))
                .map(|p| p.to_string()),
        };
        server.launch()?;
        Ok(server)
    }

    /// A primary and one replica that already acknowledges its writes.
    pub fn with_replica() -> HarnessResult<(RedisServer, RedisServer)> {
        let primary = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"])?;
        let port = primary.port().to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port])?;
        wait_replica_acks(primary.port())?;
        Ok((primary, replica))
    }

    fn launch(&mut self) -> HarnessResult<()> {
        self.starts += 1;
        let mut cmd = Command::new(&self.program);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra);
        let log = self.dir.path().join(format!("redis-{}.log", self.starts));
        let proc = Proc::spawn(&format!("redis-server :{}", self.port), cmd, &log)?;
        let pid = proc.pid();
        self.proc = Some(proc);
        let port = self.port;
        let password = self.password.clone();
        // Ours, not another test's server on the same port (a restart reuses its port, whose
        // reservation may have lapsed): the one answering must have our child's pid.
        let ours = format!("process_id:{}", pid.unwrap_or(0));
        wait_for(
            &format!("redis-server (pid {pid:?}) on port {port}"),
            START_TIMEOUT,
            || {
                let info = query_as(port, password.as_deref(), redis::cmd("INFO").arg("server"))?;
                let text = redis::from_redis_value::<String>(info).ok()?;
                text.lines().any(|l| l.trim() == ours).then_some(())
            },
        )
        .map_err(|e| HarnessError(format!("{e}\nredis output:\n{}", self.output())))?;
        Ok(())
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's working directory (its config and logs live here).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Output of the current process.
    pub fn output(&self) -> String {
        self.proc.as_ref().map(Proc::output).unwrap_or_default()
    }

    /// Process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// Sends `signal` to the server (SIGSTOP: a Redis that answers nothing until SIGCONT).
    pub fn signal(&self, signal: i32) -> HarnessResult<()> {
        match &self.proc {
            Some(p) => p.signal(signal),
            None => Err(HarnessError("redis-server is not running".into())),
        }
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the server again on the same port after [`RedisServer::kill`].
    pub fn restart(&mut self) -> HarnessResult<()> {
        self.kill();
        self.launch()
    }

    /// Runs a command against this server (harness use: setup and inspection), with the
    /// `--requirepass` password if it was started with one.
    pub fn query(&self, cmd: &mut redis::Cmd) -> Option<redis::Value> {
        query_as(self.port, self.password.as_deref(), cmd)
    }
}

/// Waits until every one of `nodes` says the cluster is whole.
fn cluster_ok(nodes: &[RedisServer]) -> HarnessResult<()> {
    let ports: Vec<u16> = nodes.iter().map(RedisServer::port).collect();
    wait_for("cluster_state:ok on every node", START_TIMEOUT, || {
        ports
            .iter()
            .all(|&p| {
                query_string(p, redis::cmd("CLUSTER").arg("INFO"))
                    .is_some_and(|t| t.contains("cluster_state:ok"))
            })
            .then_some(())
    })
}

/// A Redis Cluster of three primaries (no replicas), all slots assigned.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers and joins them with `redis-cli --cluster create`.
    pub fn start() -> HarnessResult<Self> {
        Self::start_inner(None).map(|(c, _)| c)
    }

    /// A cluster whose nodes also take TLS connections (certificates from `ca`, client
    /// certificates asked for), with TLS on the cluster bus too, so the slot map given to a
    /// TLS client names TLS ports; returns it with the TLS seed URLs.
    pub fn start_tls(ca: &TestCa) -> HarnessResult<(Self, Vec<String>)> {
        Self::start_inner(Some(ca)).map(|(c, seeds)| (c, seeds.unwrap_or_default()))
    }

    fn start_inner(ca: Option<&TestCa>) -> HarnessResult<(Self, Option<Vec<String>>)> {
        let cli = require_tool("redis-cli", "redis-tools")?;
        let mut nodes = Vec::new();
        let mut tls_seeds = Vec::new();
        for _ in 0..3 {
            // The cluster bus gets its own free port rather than the default port + 10000,
            // which may be taken or out of range.
            let bus = free_port().to_string();
            let mut args: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                &bus,
            ]
            .map(str::to_string)
            .to_vec();
            if let Some(ca) = ca {
                let tls_port = free_port();
                tls_seeds.push(format!("rediss://127.0.0.1:{tls_port}"));
                args.extend([
                    "--tls-port".to_string(),
                    tls_port.to_string(),
                    "--tls-cluster".into(),
                    "yes".into(),
                    "--tls-cert-file".into(),
                    ca.file("server.pem").to_string_lossy().into_owned(),
                    "--tls-key-file".into(),
                    ca.file("server.key").to_string_lossy().into_owned(),
                    "--tls-client-cert-file".into(),
                    ca.file("client.pem").to_string_lossy().into_owned(),
                    "--tls-client-key-file".into(),
                    ca.file("client.key").to_string_lossy().into_owned(),
                    "--tls-ca-cert-file".into(),
                    ca.file("ca.pem").to_string_lossy().into_owned(),
                    "--tls-auth-clients".into(),
                    "yes".into(),
                ]);
            }
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            nodes.push(RedisServer::start_with(&refs)?);
        }
        let mut create = Command::new(&cli);
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port()));
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        // Bounded: a node that never joins (its bus port taken) fails the test, not hangs it.
        let out = super::run_with_input(create, b"", START_TIMEOUT)?;
        if !out.status.success() {
            return Err(HarnessError(format!(
                "redis-cli --cluster create failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        cluster_ok(&nodes)?;
        Ok((RedisCluster { nodes }, ca.map(|_| tls_seeds)))
    }

    /// Kills server `i` and starts it again on its port and directory (its `nodes.conf`
    /// keeps its id and slots, a `dump.rdb` there its data), then waits until every server
    /// says the cluster is whole again.
    pub fn restart_node(&mut self, i: usize) -> HarnessResult<()> {
        let node = self
            .nodes
            .get_mut(i)
            .ok_or_else(|| HarnessError(format!("no cluster server {i}")))?;
        node.restart()?;
        cluster_ok(&self.nodes)
    }

    /// Seed addresses as `redis://127.0.0.1:<port>`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The servers.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }
}

/// A primary, one replica and three Sentinels monitoring them as `master_name`.
pub struct SentinelGroup {
    master_name: String,
    primary: RedisServer,
    replica: RedisServer,
    sentinels: Vec<(u16, Proc)>,
    _dir: TempDir,
}

impl SentinelGroup {
    /// Starts the group and waits until every Sentinel knows the replica and its peers.
    pub fn start() -> HarnessResult<Self> {
        let master_name = "confroute-test".to_string();
        let primary = RedisServer::start()?;
        let replica_of = primary.port().to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &replica_of])?;
        let rport = replica.port();
        wait_for("replica link up", START_TIMEOUT, || {
            info_field(rport, "replication", "master_link_status").filter(|s| s == "up")
        })?;
        let dir = TempDir::new("sentinel")?;
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                     sentinel monitor {master_name} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {master_name} 1000\n\
                     sentinel failover-timeout {master_name} 5000\n\
                     sentinel parallel-syncs {master_name} 1\n",
                    dir = dir.path().display(),
                    primary = primary.port(),
                ),
            )
            .map_err(|e| HarnessError(format!("cannot write {}: {e}", conf.display())))?;
            let mut cmd = Command::new(&primary.program);
            cmd.arg(&conf).arg("--sentinel");
            let log = dir.path().join(format!("sentinel-{i}.log"));
            sentinels.push((port, Proc::spawn(&format!("sentinel :{port}"), cmd, &log)?));
        }
        let ports: Vec<u16> = sentinels.iter().map(|(p, _)| *p).collect();
        let name = master_name.clone();
        wait_for(
            "sentinels to discover the replica and each other",
            START_TIMEOUT,
            || {
                ports
                    .iter()
                    .all(|&p| {
                        let replicas = query(p, redis::cmd("SENTINEL").arg("REPLICAS").arg(&name));
                        let peers = query(p, redis::cmd("SENTINEL").arg("SENTINELS").arg(&name));
                        matches!(replicas, Some(redis::Value::Array(r)) if r.len() == 1)
                            && matches!(peers, Some(redis::Value::Array(s)) if s.len() == 2)
                    })
                    .then_some(())
            },
        )?;
        Ok(SentinelGroup {
            master_name,
            primary,
            replica,
            sentinels,
            _dir: dir,
        })
    }

    /// The monitored primary's name.
    pub fn master_name(&self) -> &str {
        &self.master_name
    }

    /// Sentinel addresses as `redis://127.0.0.1:<port>`.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|(p, _)| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The port the Sentinels currently report as primary.
    pub fn current_primary_port(&self) -> Option<u16> {
        for (p, _) in &self.sentinels {
            let v = query(
                *p,
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.master_name),
            );
            if let Some(redis::Value::Array(items)) = v {
                if let Some(port) = items.get(1).and_then(|v| match v {
                    redis::Value::BulkString(b) => String::from_utf8_lossy(b).parse().ok(),
                    _ => None,
                }) {
                    return Some(port);
                }
            }
        }
        None
    }

    /// Port of the initial primary.
    pub fn primary_port(&self) -> u16 {
        self.primary.port()
    }

    /// Port of the initial replica.
    pub fn replica_port(&self) -> u16 {
        self.replica.port()
    }

    /// Kills the primary (SIGKILL) and waits until the Sentinels promote the replica.
    pub fn kill_primary_and_wait_failover(&mut self, within: Duration) -> HarnessResult<()> {
        let old = self.primary.port();
        self.primary.kill();
        let new = self.replica.port();
        wait_for("sentinels to promote the replica", within, || {
            let promoted = self.current_primary_port() == Some(new)
                && info_field(new, "replication", "role").is_some_and(|r| r == "master");
            promoted.then_some(())
        })
        .map_err(|e| HarnessError(format!("{e} (old primary {old}, replica {new})")))
    }
}

/// A private certificate authority for TLS tests, made by `openssl` in a temporary
/// directory: a CA, a server certificate for 127.0.0.1 and localhost, and a client
/// certificate, all signed by it (EC P-256, valid two days).
pub struct TestCa {
    dir: TempDir,
}

impl TestCa {
    /// Makes the CA and both certificates.
    pub fn new() -> HarnessResult<Self> {
        let openssl = require_tool("openssl", "openssl")?;
        let dir = TempDir::new("test-ca")?;
        let d = dir.path();
        let run = |args: &[&str]| -> HarnessResult<()> {
            let out = Command::new(&openssl)
                .args(args)
                .current_dir(d)
                .output()
                .map_err(|e| HarnessError(format!("openssl: {e}")))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(HarnessError(format!(
                    "openssl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                )))
            }
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend_from_slice(&ec);
        ca.extend_from_slice(&[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=confroute test CA",
        ]);
        run(&ca)?;
        for (name, usage, san) in [
            (
                "server",
                "serverAuth",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
            ),
            ("client", "clientAuth", ""),
        ] {
            let ext = format!("basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n{san}");
            std::fs::write(d.join(format!("{name}.ext")), ext)
                .map_err(|e| HarnessError(format!("{name}.ext: {e}")))?;
            let (key, csr, pem, extfile, subj) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
                format!("/CN=confroute test {name}"),
            );
            let mut req = vec!["req"];
            req.extend_from_slice(&ec);
            req.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", &subj]);
            run(&req)?;
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ])?;
        }
        Ok(TestCa { dir })
    }

    /// A file of the CA's directory: `ca.pem`, `server.pem`, `server.key`, `client.pem`,
    /// `client.key`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl RedisServer {
    /// Starts a server that also takes TLS connections, on the port returned, with a
    /// certificate from `ca`; `client_certs`: whether it asks clients for a certificate
    /// signed by `ca` (`tls-auth-clients`). The plain port stays for the harness.
    pub fn start_tls(ca: &TestCa, client_certs: bool) -> HarnessResult<(Self, u16)> {
        let port = free_port();
        Self::start_tls_on(ca, client_certs, port).map(|s| (s, port))
    }

    /// [`RedisServer::start_tls`] with TLS on `tls_port` (a server started again there).
    pub fn start_tls_on(ca: &TestCa, client_certs: bool, tls_port: u16) -> HarnessResult<Self> {
        let tls_port = tls_port.to_string();
        let files = [
            ca.file("server.pem"),
            ca.file("server.key"),
            ca.file("ca.pem"),
        ]
        .map(|p| p.to_string_lossy().into_owned());
        let server = RedisServer::start_with(&[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &files[0],
            "--tls-key-file",
            &files[1],
            "--tls-ca-cert-file",
            &files[2],
            "--tls-auth-clients",
            if client_certs { "yes" } else { "no" },
        ])?;
        Ok(server)
    }
}
