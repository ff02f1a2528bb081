//! Domain types shared by the controller, the node agent and the store.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest accepted node id in bytes.
pub const MAX_NODE_ID_LEN: usize = 64;

/// A conference node's id: 1–64 bytes of `A–Z a–z 0–9 . _ -`, other than `.` and `..`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct NodeId(String);

/// Why a string is not a valid node id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("node id `{0}` is invalid; expected 1-64 bytes of A-Z a-z 0-9 . _ - (not `.` or `..`)")]
pub struct NodeIdError(pub String);

impl NodeId {
    /// Validates `s` as a node id.
    pub fn parse(s: &str) -> Result<Self, NodeIdError> {
        // `.` and `..` would be URL dot-segments in /v1/nodes/{id}, never addressable.
        let ok = !s.is_empty()
            && s != "."
            && s != ".."
            && s.len() <= MAX_NODE_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(NodeId(s.to_string()))
        } else {
            Err(NodeIdError(s.chars().take(80).collect()))
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeId {
    type Err = NodeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeId::parse(s)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = crate::config::string_like(d)?;
        NodeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A node's lifecycle state (invariant 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Takes new conferences.
    Serving,
    /// Takes joiners of its existing conferences only.
    Draining,
    /// About to exit; takes nothing new.
    ShuttingDown,
}

impl NodeState {
    /// The wire form stored in Redis.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Serving => "serving",
            NodeState::Draining => "draining",
            NodeState::ShuttingDown => "shutting_down",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "serving" => Ok(NodeState::Serving),
            "draining" => Ok(NodeState::Draining),
            "shutting_down" => Ok(NodeState::ShuttingDown),
            other => Err(format!(
                "unknown node state `{other}`; expected serving, draining or shutting_down"
            )),
        }
    }
}

/// What a node announces about itself when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Unique id.
    pub id: NodeId,
    /// Where the edge sends calls, e.g. `sip:10.0.0.5:5060;transport=udp`.
    pub sip_uri: String,
    /// The agent's HTTP control address, e.g. `http://10.0.0.5:9090`.
    pub control: String,
    /// Zone or site label used for placement preference; empty for none.
    pub zone: String,
    /// Most conferences this node may host at once.
    pub capacity: u32,
    /// Participants (as the last heartbeat reported) at or above which the node takes no new
    /// conference; its own keep admitting callers. 0 for no such limit.
    #[serde(default)]
    pub participant_capacity: u32,
    /// Current state.
    pub state: NodeState,
}

/// Load a node reports with every heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Conferences with a live bridge on this node.
    pub conferences: u32,
    /// Participants in those conferences.
    pub participants: u32,
    /// CPU use of the host, 0–100 per cent.
    pub cpu: f32,
    /// The agent's ARI events WebSocket is up. While it is down the agent cannot admit
    /// anyone, so the node gets no new conference (invariant 4); its own stay where they are.
    #[serde(default = "ari_up")]
    pub ari: bool,
}

fn ari_up() -> bool {
    true
}

impl Default for NodeLoad {
    fn default() -> Self {
        NodeLoad {
            conferences: 0,
            participants: 0,
            cpu: 0.0,
            ari: true,
        }
    }
}

/// A node as read back from Redis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Registration data.
    #[serde(flatten)]
    pub info: NodeInfo,
    /// Last reported load.
    pub load: NodeLoad,
    /// Conferences currently claimed for this node in Redis (authoritative for capacity).
    pub claimed: u32,
    /// Conferences ever placed on this node since it registered (only grows).
    pub placements: u64,
    /// Milliseconds left on the node's lease.
    pub lease_ms: u64,
    /// Redis time (ms since the epoch) of the last heartbeat.
    pub updated_ms: u64,
    /// The node is in its own shutdown drain (not an admin's drain).
    #[serde(default)]
    pub stopping: bool,
    /// Redis time (ms since the epoch) the node's current drain began; `None` when serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_since_ms: Option<u64>,
    /// The lease each renewal grants (three heartbeats of an agent); `None` from a
    /// registration that did not record it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_period_ms: Option<u64>,
}

/// The owner of a conference at a given epoch: the fencing token of invariant 2.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    /// Owning node.
    pub node: NodeId,
    /// Rises by one on every change of owner.
    pub epoch: u64,
}

/// A conference as read back from Redis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConferenceRecord {
    /// Current owner and epoch.
    pub owner: Owner,
    /// Participants last reported by the owner.
    pub participants: u32,
    /// Redis time (ms since the epoch) the conference was first claimed.
    pub created_ms: u64,
    /// Placed by a claim that waits for replicas (`redis.wait_replicas`) and not acknowledged
    /// by them yet: a failover could still lose it, so routing confirms it (claims again,
    /// which waits again) before sending anyone there. Read by `lookup` only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unconfirmed: bool,
    /// Version of the participant count (`count_v`, the writing agent's counter), read by
    /// the conference listing for a release that must not undo a later count; 0 elsewhere.
    #[serde(skip)]
    pub count_version: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids() {
        assert!(NodeId::parse("node-1.zone_a").is_ok());
        for bad in ["", "a b", "a:b", "{x}", ".", "..", &"n".repeat(65)] {
            assert!(NodeId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn node_state_round_trip() {
        for s in [
            NodeState::Serving,
            NodeState::Draining,
            NodeState::ShuttingDown,
        ] {
            assert_eq!(s.as_str().parse::<NodeState>(), Ok(s));
        }
        assert!("paused".parse::<NodeState>().is_err());
    }
}
