//! The Lua scripts of the data model, each in its own `.lua` file next to this one.
//!
//! A script is sent as `EVALSHA`, and on `NOSCRIPT` (after `SCRIPT FLUSH`, a restart, or a
//! failover to a server that never saw it) as `EVAL`, which runs it on the server its keys
//! live on and leaves it cached there. `redis::Script`'s own fallback sends `SCRIPT LOAD`,
//! which a Cluster client sends to every node of the Cluster: after a failover, one node
//! down or restarting anywhere then failed every script until all nodes answered.

use redis::{Cmd, ErrorKind, FromRedisValue, RedisResult, ServerErrorKind, ToRedisArgs};

/// One script: its text and the SHA1 `EVALSHA` names it by.
pub(crate) struct Script {
    code: &'static str,
    hash: String,
}

impl Script {
    fn new(code: &'static str) -> Self {
        Script {
            code,
            hash: redis::Script::new(code).get_hash().to_string(),
        }
    }

    /// An invocation with `key` as its first key.
    pub(crate) fn key<T: ToRedisArgs>(&self, key: T) -> Invocation<'_> {
        let mut inv = Invocation {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        };
        inv.key(key);
        inv
    }
}

/// A script's keys and arguments, to run.
pub(crate) struct Invocation<'a> {
    script: &'a Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Invocation<'_> {
    /// Adds a key (`KEYS[i]`).
    pub(crate) fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    /// Adds an argument (`ARGV[i]`).
    pub(crate) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// Runs the script: `EVALSHA`, then `EVAL` when the server does not have it.
    pub(crate) async fn invoke_async<T: FromRedisValue>(
        &self,
        con: &mut impl redis::aio::ConnectionLike,
    ) -> RedisResult<T> {
        match self
            .command("EVALSHA", &self.script.hash)
            .query_async(con)
            .await
        {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.command("EVAL", self.script.code)
                    .query_async(con)
                    .await
            }
            other => other,
        }
    }

    fn command(&self, verb: &str, script: &str) -> Cmd {
        let mut cmd = redis::cmd(verb);
        cmd.arg(script).arg(self.keys.len());
        for k in &self.keys {
            cmd.arg(k.as_slice());
        }
        for a in &self.args {
            cmd.arg(a.as_slice());
        }
        cmd
    }
}

/// All scripts, hashed once at start-up.
pub(crate) struct Scripts {
    pub(crate) claim: Script,
    pub(crate) confirm: Script,
    pub(crate) renew: Script,
    pub(crate) release: Script,
    pub(crate) participants: Script,
    pub(crate) callback_seq: Script,
    pub(crate) register: Script,
    pub(crate) settle: Script,
    pub(crate) heartbeat: Script,
    pub(crate) set_state: Script,
    pub(crate) deregister: Script,
    pub(crate) hold: Script,
    pub(crate) keep: Script,
    pub(crate) time: Script,
    pub(crate) list_nodes: Script,
    pub(crate) list_conferences: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            claim: Script::new(include_str!("lua/claim.lua")),
            confirm: Script::new(include_str!("lua/confirm.lua")),
            renew: Script::new(include_str!("lua/renew.lua")),
            release: Script::new(include_str!("lua/release.lua")),
            participants: Script::new(include_str!("lua/participants.lua")),
            callback_seq: Script::new(include_str!("lua/callback_seq.lua")),
            register: Script::new(include_str!("lua/register.lua")),
            settle: Script::new(include_str!("lua/settle.lua")),
            heartbeat: Script::new(include_str!("lua/heartbeat.lua")),
            set_state: Script::new(include_str!("lua/set_state.lua")),
            deregister: Script::new(include_str!("lua/deregister.lua")),
            hold: Script::new(include_str!("lua/hold.lua")),
            keep: Script::new(include_str!("lua/keep.lua")),
            time: Script::new(include_str!("lua/time.lua")),
            list_nodes: Script::new(include_str!("lua/list_nodes.lua")),
            list_conferences: Script::new(include_str!("lua/list_conferences.lua")),
        }
    }
}
