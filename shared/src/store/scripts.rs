//! The Lua scripts of the data model, each in its own `.lua` file next to this one.
//!
//! `redis::Script` sends `EVALSHA` and falls back to loading the script on `NOSCRIPT`, so the
//! store keeps working after `SCRIPT FLUSH` or a failover to a server that never saw them.

use redis::Script;

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
            time: Script::new(include_str!("lua/time.lua")),
            list_nodes: Script::new(include_str!("lua/list_nodes.lua")),
            list_conferences: Script::new(include_str!("lua/list_conferences.lua")),
        }
    }
}
