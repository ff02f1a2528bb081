//! Decoding of script replies into the data model, with errors that say what was wrong.

use redis::Value;

use crate::name::ConferenceName;
use crate::store::{ConferencePage, Heartbeat, HostedStatus, StoreError};
use crate::types::{ConferenceRecord, NodeId, NodeInfo, NodeLoad, NodeRecord, NodeState, Owner};

/// Positional access to a flat reply.
pub(crate) struct Reply<'a> {
    op: &'static str,
    values: &'a [Value],
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Double(d) => Some(d.to_string()),
        _ => None,
    }
}

impl<'a> Reply<'a> {
    pub(crate) fn new(op: &'static str, values: &'a [Value]) -> Self {
        Reply { op, values }
    }

    fn err(&self, message: String) -> StoreError {
        StoreError::Protocol {
            op: self.op,
            message,
        }
    }

    fn at(&self, i: usize) -> Result<&'a Value, StoreError> {
        self.values.get(i).ok_or_else(|| {
            self.err(format!(
                "reply has {} items, wanted item {i}",
                self.values.len()
            ))
        })
    }

    pub(crate) fn is_nil(&self, i: usize) -> Result<bool, StoreError> {
        Ok(matches!(self.at(i)?, Value::Nil | Value::Boolean(false)))
    }

    pub(crate) fn string(&self, i: usize) -> Result<String, StoreError> {
        let v = self.at(i)?;
        text(v).ok_or_else(|| self.err(format!("item {i} is {v:?}, wanted a string")))
    }

    pub(crate) fn string_or_empty(&self, i: usize) -> Result<String, StoreError> {
        if self.is_nil(i)? {
            return Ok(String::new());
        }
        self.string(i)
    }

    pub(crate) fn u64(&self, i: usize) -> Result<u64, StoreError> {
        let s = self.string(i)?;
        s.parse::<u64>()
            .map_err(|_| self.err(format!("item {i} is `{s}`, wanted a non-negative integer")))
    }

    pub(crate) fn u64_or_zero(&self, i: usize) -> Result<u64, StoreError> {
        if self.is_nil(i)? {
            return Ok(0);
        }
        self.u64(i)
    }

    /// A number as the scripts read one (`tonumber(x) or 0`, then used as a count): nil or
    /// not a number reads as 0, so every reader of a record sees the same value. Lua also
    /// reads hexadecimal, exponents, fractions and surrounding spaces; a fraction is cut to
    /// its integer part and a negative number is 0.
    pub(crate) fn u64_lenient(&self, i: usize) -> Result<u64, StoreError> {
        if self.is_nil(i)? {
            return Ok(0);
        }
        Ok(lua_count(&self.string(i)?))
    }

    pub(crate) fn node_id(&self, i: usize) -> Result<NodeId, StoreError> {
        let s = self.string(i)?;
        NodeId::parse(&s).map_err(|e| self.err(e.to_string()))
    }
}

/// What Lua's `tonumber(s) or 0` makes of `s`, as a count (see [`Reply::u64_lenient`]).
fn lua_count(s: &str) -> u64 {
    let t = s.trim_ascii();
    if let Ok(n) = t.parse::<u64>() {
        return n;
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).unwrap_or(0);
    }
    match t.parse::<f64>() {
        // `as` saturates at u64::MAX for a value past it, infinity included.
        Ok(f) if f > 0.0 => f.floor() as u64,
        _ => 0,
    }
}

fn parse_state(op: &'static str, s: &str) -> Result<NodeState, StoreError> {
    s.parse()
        .map_err(|message| StoreError::Protocol { op, message })
}

/// A nil-or-state reply.
pub(crate) fn optional_state(op: &'static str, v: &Value) -> Result<Option<NodeState>, StoreError> {
    match v {
        Value::Nil | Value::Boolean(false) => Ok(None),
        other => match text(other) {
            Some(s) => parse_state(op, &s).map(Some),
            None => Err(StoreError::Protocol {
                op,
                message: format!("wanted a node state, got {other:?}"),
            }),
        },
    }
}

pub(crate) fn state_change(v: &Value) -> Result<super::StateChange, StoreError> {
    use super::StateChange;
    if let Value::Array(items) = v {
        return match items.as_slice() {
            [tag, state] if text(tag).as_deref() == Some("stopping") => {
                match optional_state("set_state", state)? {
                    Some(s) => Ok(StateChange::Stopping(s)),
                    None => Ok(StateChange::NotRegistered),
                }
            }
            [tag, state] if text(tag).as_deref() == Some("superseded") => {
                match optional_state("set_state", state)? {
                    Some(s) => Ok(StateChange::Superseded(s)),
                    None => Ok(StateChange::NotRegistered),
                }
            }
            _ => Err(StoreError::Protocol {
                op: "set_state",
                message: format!("unexpected reply {v:?}"),
            }),
        };
    }
    Ok(match optional_state("set_state", v)? {
        Some(previous) => StateChange::Changed(previous),
        None => StateChange::NotRegistered,
    })
}

pub(crate) fn heartbeat(values: &[Value], hosted: usize) -> Result<Heartbeat, StoreError> {
    let r = Reply::new("heartbeat", values);
    if r.is_nil(0)? {
        return Ok(Heartbeat::Unregistered);
    }
    let state = parse_state("heartbeat", &r.string(0)?)?;
    let seq = r.string_or_empty(1)?;
    let state_seq = if seq.is_empty() {
        None
    } else {
        Some(r.u64(1)?)
    };
    if values.len() != hosted + 2 {
        return Err(r.err(format!(
            "{} statuses for {hosted} hosted conferences",
            values.len().saturating_sub(2)
        )));
    }
    let mut statuses = Vec::with_capacity(hosted);
    for i in 2..values.len() {
        statuses.push(match r.string(i)?.as_str() {
            "ok" => HostedStatus::Owned,
            "lost" => HostedStatus::Lost,
            "reclaimed" => HostedStatus::Reclaimed,
            "missing" => HostedStatus::Missing,
            other => return Err(r.err(format!("unknown hosted status `{other}`"))),
        });
    }
    Ok(Heartbeat::Renewed {
        state,
        state_seq,
        hosted: statuses,
    })
}

pub(crate) fn node_record(fields: &[Value]) -> Result<NodeRecord, StoreError> {
    let r = Reply::new("list_nodes", fields);
    let mut get = std::collections::HashMap::new();
    for i in (0..fields.len()).step_by(2) {
        get.insert(r.string(i)?, r.string(i + 1)?);
    }
    let field = |k: &str| {
        get.get(k)
            .cloned()
            .ok_or_else(|| r.err(format!("node record lacks `{k}`")))
    };
    let num = |k: &str| -> Result<u64, StoreError> {
        let v = field(k)?;
        // PTTL answers -1/-2 for keys without/with no TTL; treat both as no time left.
        if v.starts_with('-') {
            return Ok(0);
        }
        v.parse::<u64>()
            .map_err(|_| r.err(format!("node field `{k}` is `{v}`, wanted an integer")))
    };
    let id = NodeId::parse(&field("id")?).map_err(|e| r.err(e.to_string()))?;
    Ok(NodeRecord {
        info: NodeInfo {
            id,
            sip_uri: field("sip_uri")?,
            control: field("control")?,
            zone: field("zone")?,
            capacity: num("capacity")? as u32,
            // Absent from the record of an agent that knows no such limit.
            participant_capacity: get
                .get("participant_capacity")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            state: parse_state("list_nodes", &field("state")?)?,
        },
        load: NodeLoad {
            conferences: num("conferences")? as u32,
            participants: num("participants")? as u32,
            cpu: field("cpu")?.parse::<f32>().unwrap_or(0.0),
            // Absent until the first heartbeat after registering, or from an older agent.
            ari: get.get("ari").is_none_or(|v| v != "0"),
        },
        claimed: num("claimed")? as u32,
        placements: get
            .get("placements")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        lease_ms: num("lease_ms")?,
        updated_ms: num("updated_ms")?,
        stopping: get.get("stopping").is_some_and(|v| v == "1"),
        drain_since_ms: get.get("drain_since_ms").and_then(|v| v.parse().ok()),
        lease_period_ms: get.get("lease_period_ms").and_then(|v| v.parse().ok()),
    })
}

pub(crate) fn conference_page(values: &[Value]) -> Result<ConferencePage, StoreError> {
    let r = Reply::new("list_conferences", values);
    let next = r.string_or_empty(0)?;
    let mut items = Vec::new();
    let mut i = 1;
    while i + 6 <= values.len() {
        // A record this reader cannot take for a conference (a name or an owner no node can
        // have, written by something else) is left out of the page rather than failing it:
        // the pages after it must still be reachable. Its next call re-homes it.
        let readable = r
            .string(i)
            .ok()
            .and_then(|n| ConferenceName::parse(&n).ok())
            .zip(r.node_id(i + 1).ok());
        let Some((name, node)) = readable else {
            i += 6;
            continue;
        };
        items.push((
            name,
            ConferenceRecord {
                owner: Owner {
                    node,
                    epoch: r.u64_lenient(i + 2)?,
                },
                participants: u32::try_from(r.u64_lenient(i + 3)?).unwrap_or(u32::MAX),
                created_ms: r.u64_lenient(i + 4)?,
                unconfirmed: false,
                count_version: r.u64_lenient(i + 5)?,
            },
        ));
        i += 6;
    }
    Ok(ConferencePage {
        items,
        next: (!next.is_empty()).then_some(next),
    })
}

#[cfg(test)]
mod tests {
    use super::lua_count;

    #[test]
    fn counts_read_as_lua_reads_numbers() {
        for (text, n) in [
            ("7", 7),
            (" 7 ", 7),
            ("0x10", 16),
            ("1e3", 1000),
            ("12.9", 12),
            ("-1", 0),
            ("not-a-number", 0),
            ("", 0),
            ("nan", 0),
            ("inf", u64::MAX),
            ("1e400", u64::MAX),
            ("\u{a0}7", 0),
        ] {
            assert_eq!(lua_count(text), n, "{text:?}");
        }
    }
}
