//! What the simulated network does: callers dialling in and the far ends of originated calls.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An incoming call that runs `Stasis(app,args...)` from the dialplan, as a SIP caller would.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DialIn {
    /// Stasis application the dialplan hands the call to.
    pub app: String,
    /// Arguments after the application name in `Stasis(app,arg1,arg2)`.
    pub args: Vec<String>,
    /// Caller id number (From user part).
    pub caller_number: String,
    /// Caller id name (From display name).
    pub caller_name: String,
    /// Dialled extension (Request-URI user part).
    pub extension: String,
    /// Dialplan context the call arrived in.
    pub context: String,
    /// Dialplan priority of the `Stasis()` step.
    pub priority: i64,
    /// Channel technology, `PJSIP` unless told.
    pub tech: String,
    /// Endpoint (peer) the call came from; part of the channel name.
    pub endpoint: String,
    /// Channel variables set by the dialplan before `Stasis()` (e.g. `CONFROUTE_CONFERENCE`).
    pub variables: BTreeMap<String, String>,
    /// SIP headers of the INVITE, readable with `PJSIP_HEADER(read,Name)` or `SIP_HEADER(Name)`.
    pub sip_headers: BTreeMap<String, String>,
    /// Channel unique id to use instead of a generated one.
    pub channel_id: Option<String>,
    /// The dialplan answered before `Stasis()` (channel enters Stasis in state Up, not Ring).
    pub answered: bool,
    /// Channel language.
    pub language: String,
}

impl Default for DialIn {
    fn default() -> Self {
        DialIn {
            app: String::new(),
            args: Vec::new(),
            caller_number: String::new(),
            caller_name: String::new(),
            extension: "s".into(),
            context: "default".into(),
            priority: 1,
            tech: "PJSIP".into(),
            endpoint: "trunk".into(),
            variables: BTreeMap::new(),
            sip_headers: BTreeMap::new(),
            channel_id: None,
            answered: false,
            language: "en".into(),
        }
    }
}

/// How the far end of an originated (or dialled) channel reacts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Rings, then answers after this long (zero: answers without ringing).
    AnswerAfter(#[serde(with = "millis")] Duration),
    /// Answers 486 Busy Here: hangup cause 17.
    Busy,
    /// Rings until the originate timeout: hangup cause 19.
    NoAnswer,
    /// Network congestion (503): hangup cause 34.
    Congested,
    /// Declines the call (603): hangup cause 21.
    Rejected,
    /// Rings until the test calls `answer_far_end` / `hangup_far_end`, or the timeout.
    Manual,
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Which originated endpoints (`TECH/resource`) an [`Outcome`] applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointMatch {
    /// Every endpoint.
    Any,
    /// Exactly this endpoint, e.g. `PJSIP/bob`.
    Exact(String),
    /// Endpoints starting with this text, e.g. `PJSIP/5551`.
    Prefix(String),
}

impl EndpointMatch {
    /// Matches endpoints that start with `p`.
    pub fn prefix(p: impl Into<String>) -> Self {
        EndpointMatch::Prefix(p.into())
    }

    /// Matches exactly the endpoint `e`.
    pub fn exact(e: impl Into<String>) -> Self {
        EndpointMatch::Exact(e.into())
    }

    /// Whether `endpoint` (`TECH/resource`) is matched.
    pub fn matches(&self, endpoint: &str) -> bool {
        match self {
            EndpointMatch::Any => true,
            EndpointMatch::Exact(e) => e == endpoint,
            EndpointMatch::Prefix(p) => endpoint.starts_with(p.as_str()),
        }
    }
}

/// Asterisk's text for a Q.850 hangup cause (`ast_cause2str`).
pub fn cause_text(cause: i64) -> &'static str {
    match cause {
        1 => "Unallocated (unassigned) number",
        2 => "No route to specified transmit network",
        3 => "No route to destination",
        5 => "Misdialed trunk prefix",
        6 => "Channel unacceptable",
        7 => "Call awarded and being delivered in an established channel",
        8 => "Pre-empted",
        14 => "Number ported elsewhere",
        16 => "Normal Clearing",
        17 => "User busy",
        18 => "No user responding",
        19 => "User alerting, no answer",
        20 => "Subscriber absent",
        21 => "Call Rejected",
        22 => "Number changed",
        23 => "Redirected to new destination",
        26 => "Answered elsewhere",
        27 => "Destination out of order",
        28 => "Invalid number format",
        29 => "Facility rejected",
        30 => "Response to STATus ENQuiry",
        31 => "Normal, unspecified",
        34 => "Circuit/channel congestion",
        38 => "Network out of order",
        41 => "Temporary failure",
        42 => "Switching equipment congestion",
        43 => "Access information discarded",
        44 => "Requested channel not available",
        50 => "Facility not subscribed",
        52 => "Outgoing call barred",
        54 => "Incoming call barred",
        57 => "Bearer capability not authorized",
        58 => "Bearer capability not available",
        65 => "Bearer capability not implemented",
        66 => "Channel not implemented",
        69 => "Facility not implemented",
        81 => "Invalid call reference value",
        88 => "Incompatible destination",
        95 => "Invalid message unspecified",
        96 => "Mandatory information element is missing",
        97 => "Message type nonexist.",
        98 => "Wrong message",
        99 => "Info. element nonexist or not implemented",
        100 => "Invalid information element contents",
        101 => "Message not compatible with call state",
        102 => "Recover on timer expiry",
        103 => "Mandatory IE length error",
        111 => "Protocol error, unspecified",
        127 => "Interworking, unspecified",
        _ => "Unknown",
    }
}

/// Hangup cause for an ARI `reason` (`convert_reason_to_hangup_code` in resource_channels.c).
pub fn reason_cause(reason: &str) -> Option<i64> {
    Some(match reason {
        "normal" => 16,
        "busy" => 17,
        "congestion" => 34,
        "no_answer" => 19,
        "timeout" => 18,
        "rejected" => 21,
        "unallocated" => 1,
        "normal_unspecified" => 31,
        "number_incomplete" => 28,
        "codec_mismatch" => 58,
        "interworking" => 127,
        "failure" => 38,
        "answered_elsewhere" => 26,
        _ => return None,
    })
}
