//! JSON-RPC 2.0 over WebSocket (`GET /v1/rpc`) for live-conference control, in the manner of
//! the OpenSIPS Call API: each command gets its answer by id, then asynchronous
//! notifications (dial-out status, conference events of subscribed conferences).
//! Methods, notifications and error codes are documented in `docs/call-control.md`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use confroute_shared::bus::{ErrorCode, Notifications, Reply, EVENTS_LOST};
use confroute_shared::name::ConferenceName;
use confroute_shared::types::NodeId;

use crate::control::{self, params, Control, ControlError};
use crate::fanout::{Delivery, Feed, Following};

/// Standard JSON-RPC codes.
pub mod codes {
    /// Invalid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a valid request object.
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Parameters missing or wrong.
    pub const INVALID_PARAMS: i64 = -32602;
    /// Failure inside the controller or node.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The conference has no home.
    pub const CONFERENCE_NOT_FOUND: i64 = -32001;
    /// No such participant.
    pub const PARTICIPANT_NOT_FOUND: i64 = -32002;
    /// The owning node is gone or not listening, or the command could not be sent: nothing
    /// was done.
    pub const NODE_UNAVAILABLE: i64 = -32003;
    /// The dial-out target is not an E.164 number or SIP URI.
    pub const INVALID_NUMBER: i64 = -32004;
    /// The conference is full.
    pub const CONFERENCE_FULL: i64 = -32005;
    /// Not allowed.
    pub const FORBIDDEN: i64 = -32006;
    /// The operation timed out on the node.
    pub const TIMEOUT: i64 = -32007;
    /// Too many commands on this connection; slow down.
    pub const RATE_LIMITED: i64 = -32008;
    /// The connection holds the most subscriptions allowed.
    pub const TOO_MANY_SUBSCRIPTIONS: i64 = -32009;
    /// The message is larger than allowed.
    pub const MESSAGE_TOO_LARGE: i64 = -32010;
    /// Routing is impossible now (Redis unavailable, no node with room).
    pub const UNAVAILABLE: i64 = -32011;
    /// The command went to the owning node and no answer came in time: it may have been
    /// carried out (a retried dial-out may ring twice).
    pub const NO_ANSWER: i64 = -32012;
}

/// Limits of one connection.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest message accepted (bytes); larger ones get `MESSAGE_TOO_LARGE`.
    pub max_message_size: usize,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Commands per second allowed on average.
    pub rate_per_sec: u32,
    /// Commands allowed in a burst.
    pub burst: u32,
    /// Requests in one batch.
    pub max_batch: usize,
    /// Commands in progress at once.
    pub max_in_flight: usize,
    /// How often the server pings; a connection silent for two and a half of these (no
    /// pong, no message) is closed, so a client whose host vanished does not hold its
    /// session and subscriptions for ever.
    pub ping_interval: Duration,
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// Code (see [`codes`]).
    pub code: i64,
    /// Message.
    pub message: String,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }
}

impl From<ControlError> for RpcError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::InvalidParams(m) => RpcError::new(codes::INVALID_PARAMS, m),
            // JSON-RPC has one code for both: the message says which.
            ControlError::Unavailable(m) | ControlError::NoCapacity(m) => {
                RpcError::new(codes::UNAVAILABLE, m)
            }
            ControlError::Node(b) => {
                let code = match b.code {
                    ErrorCode::ConferenceNotFound => codes::CONFERENCE_NOT_FOUND,
                    ErrorCode::ParticipantNotFound => codes::PARTICIPANT_NOT_FOUND,
                    ErrorCode::NodeUnavailable => codes::NODE_UNAVAILABLE,
                    ErrorCode::InvalidNumber => codes::INVALID_NUMBER,
                    ErrorCode::ConferenceFull => codes::CONFERENCE_FULL,
                    ErrorCode::Forbidden => codes::FORBIDDEN,
                    ErrorCode::Timeout => codes::TIMEOUT,
                    ErrorCode::InvalidParams => codes::INVALID_PARAMS,
                    ErrorCode::Unavailable => codes::UNAVAILABLE,
                    ErrorCode::NoAnswer => codes::NO_ANSWER,
                    ErrorCode::Internal => codes::INTERNAL_ERROR,
                };
                RpcError::new(code, b.message)
            }
        }
    }
}

/// A request id exactly as the client wrote it: a string, a number or `null`.
///
/// JSON-RPC 2.0 §5 wants the same value back. Read into a JSON value, an integer beyond 64
/// bits or a fraction would come back as a float, another value for the client; kept as
/// written, it is echoed verbatim.
#[derive(Debug, Clone)]
pub struct Id(Box<RawValue>);

impl Id {
    /// `null`, the id of an answer to a request whose own id could not be read.
    pub fn null() -> Id {
        Id(RawValue::NULL.to_owned())
    }

    /// The id as the client wrote it.
    pub fn raw(&self) -> &str {
        self.0.get()
    }

    /// The id read as a JSON value.
    pub fn value(&self) -> Value {
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl PartialEq for Id {
    fn eq(&self, other: &Id) -> bool {
        self.raw() == other.raw()
    }
}

/// One answer as written to the client.
#[derive(Serialize)]
struct Answer<'a> {
    jsonrpc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<AnswerError>,
    id: &'a RawValue,
}

#[derive(Serialize)]
struct AnswerError {
    code: i64,
    message: String,
}

fn response(id: &Id, result: Result<Value, RpcError>) -> String {
    let (result, error) = match result {
        Ok(r) => (Some(r), None),
        Err(e) => (
            None,
            Some(AnswerError {
                code: e.code,
                message: e.message,
            }),
        ),
    };
    let answer = Answer {
        jsonrpc: "2.0",
        result,
        error,
        id: &id.0,
    };
    serde_json::to_string(&answer).unwrap_or_else(|e| {
        json!({"jsonrpc": "2.0", "error": {"code": codes::INTERNAL_ERROR, "message": format!("cannot write the answer: {e}")}, "id": Value::Null}).to_string()
    })
}

fn notification(method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "method": method, "params": params}).to_string()
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Method name.
    pub method: String,
    /// Named parameters (always an object; `{}` when absent).
    pub params: Value,
    /// `None` for a notification (no answer).
    pub id: Option<Id>,
    /// Why a well-formed request's members could not be read (valid JSON beyond what this
    /// server holds, such as a number past a double's range): its method refuses it.
    pub unreadable: Option<String>,
}

/// One member of a frame: a request, or the error answer (with its id) for an invalid one.
pub type Item = Result<Request, (Id, RpcError)>;

/// What one text frame holds once decoded, before anything runs.
#[derive(Debug)]
pub enum Decoded {
    /// The whole frame is refused with one error answer (id `null`).
    Refused(RpcError),
    /// A single request.
    Single(Item),
    /// A batch, in order.
    Batch(Vec<Item>),
    /// A batch over `rpc.max_batch`, nothing in it carried out: an error answer for each
    /// request in it, and how many notifications it held (each one's error is counted, not
    /// answered).
    RefusedBatch {
        /// The error answers, in order.
        answers: Vec<Item>,
        /// The notifications refused with it.
        notifications: usize,
    },
}

/// The answer to a method this endpoint does not have.
fn method_not_found(method: &str) -> RpcError {
    RpcError::new(
        codes::METHOD_NOT_FOUND,
        format!(
            "method `{}` does not exist",
            method.chars().take(64).collect::<String>()
        ),
    )
}

/// Every method of the endpoint (docs/call-control.md).
const METHODS: &[&str] = &[
    "conference.list",
    "conference.get",
    "conference.end",
    "conference.play",
    "participant.list",
    "participant.mute",
    "participant.unmute",
    "participant.hold",
    "participant.unhold",
    "participant.kick",
    "participant.dtmf",
    "participant.play",
    "participant.move",
    "participant.update",
    "dialout",
    "subscribe",
    "unsubscribe",
];

/// Decodes one text frame under `limits`: size, JSON, batch shape, then each request.
pub fn decode(text: &str, limits: &Limits) -> Decoded {
    if text.len() > limits.max_message_size {
        return Decoded::Refused(RpcError::new(
            codes::MESSAGE_TOO_LARGE,
            format!(
                "message of {} bytes exceeds {}",
                text.len(),
                limits.max_message_size
            ),
        ));
    }
    let parsed: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        // Valid JSON this reader cannot hold is a request refused, not a parse error.
        Err(e) if serde_json::from_str::<&RawValue>(text).is_ok() => {
            return unreadable(text, limits, &e)
        }
        Err(e) => return Decoded::Refused(RpcError::new(codes::PARSE_ERROR, e.to_string())),
    };
    // The ids as written, beside the values read: a second pass over a frame already known
    // to be JSON, of an accepted size.
    let raw_ids = |batch: bool| -> std::vec::IntoIter<Option<Box<RawValue>>> {
        let ids: Vec<Option<Box<RawValue>>> = if batch {
            serde_json::from_str::<Vec<&RawValue>>(text)
                .map(|items| items.iter().map(|i| raw_id(i.get())).collect())
                .unwrap_or_default()
        } else {
            vec![raw_id(text)]
        };
        ids.into_iter()
    };
    match parsed {
        Value::Array(items) => {
            if items.is_empty() {
                return Decoded::Refused(RpcError::new(codes::INVALID_REQUEST, "empty batch"));
            }
            let over = match over_limit(items.len(), limits) {
                Err(refused) => return refused,
                Ok(over) => over,
            };
            let mut ids = raw_ids(true);
            let items = items
                .into_iter()
                .map(|v| request(v, ids.next().flatten()))
                .collect();
            match over {
                Some(e) => refuse_all(items, &e),
                None => Decoded::Batch(items),
            }
        }
        single => Decoded::Single(request(single, raw_ids(false).next().flatten())),
    }
}

/// The error of a batch over `rpc.max_batch` (`Ok(None)` within it). One far over it (more
/// than `BATCH_ANSWERS_CAP` × the limit) gets a single answer, as an empty batch does: an
/// error per member would make a small frame of tiny members a large answer.
fn over_limit(members: usize, limits: &Limits) -> Result<Option<RpcError>, Decoded> {
    if members <= limits.max_batch {
        return Ok(None);
    }
    let e = RpcError::new(
        codes::INVALID_REQUEST,
        format!(
            "batch of {members} exceeds {}: nothing in it was carried out",
            limits.max_batch
        ),
    );
    if members > limits.max_batch.saturating_mul(BATCH_ANSWERS_CAP) {
        return Err(Decoded::Refused(e));
    }
    Ok(Some(e))
}

/// How many times `rpc.max_batch` an oversized batch may have and still be answered member
/// by member.
const BATCH_ANSWERS_CAP: usize = 4;

/// A batch refused whole is still a batch (JSON-RPC 2.0 §6): each request gets its own
/// error with its own id; notifications get no answer, as ever (§4.1).
fn refuse_all(items: Vec<Item>, e: &RpcError) -> Decoded {
    let mut notifications = 0;
    let answers = items
        .into_iter()
        .filter_map(|item| match item {
            Ok(Request { id: Some(id), .. }) => Some(Err((id, e.clone()))),
            Ok(Request { id: None, .. }) => {
                notifications += 1;
                None
            }
            Err(invalid) => Some(Err(invalid)),
        })
        .collect();
    Decoded::RefusedBatch {
        answers,
        notifications,
    }
}

/// A frame that is JSON but holds what `Value` cannot (a number beyond a double's range,
/// nesting deeper than the reader's limit, a lone surrogate escape): each request in it is
/// refused with its id as written, where one can be read.
fn unreadable(text: &str, limits: &Limits, why: &serde_json::Error) -> Decoded {
    let refused = RpcError::new(
        codes::INVALID_REQUEST,
        format!("valid JSON this server cannot read: {why}"),
    );
    let one = |raw: &str| -> Item {
        match serde_json::from_str::<Value>(raw) {
            Ok(v) => request(v, raw_id(raw)),
            Err(_) => unreadable_request(raw, &refused),
        }
    };
    match serde_json::from_str::<Vec<&RawValue>>(text) {
        Ok(items) => {
            let over = match over_limit(items.len(), limits) {
                Err(refused) => return refused,
                Ok(over) => over,
            };
            let items: Vec<Item> = items.iter().map(|raw| one(raw.get())).collect();
            match over {
                Some(e) => refuse_all(items, &e),
                None => Decoded::Batch(items),
            }
        }
        Err(_) => Decoded::Single(one(text)),
    }
}

/// The `id` member of a request object as written; `None` for anything else.
fn raw_id(item: &str) -> Option<Box<RawValue>> {
    // Of members named twice the last counts, as for the value read. Names are read as
    // bytes: one holding a lone surrogate escape (which no `String` holds) must not hide
    // the request's id.
    let mut members: HashMap<MemberName, Box<RawValue>> = serde_json::from_str(item).ok()?;
    members.remove(&MemberName(b"id".to_vec()))
}

/// A member name as its bytes (escapes decoded; a lone surrogate as WTF-8).
#[derive(PartialEq, Eq, Hash)]
struct MemberName(Vec<u8>);

impl<'de> serde::Deserialize<'de> for MemberName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = MemberName;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<MemberName, E> {
                Ok(MemberName(v.to_vec()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MemberName, E> {
                Ok(MemberName(v.as_bytes().to_vec()))
            }
        }
        d.deserialize_bytes(Name)
    }
}

/// Checks the request object shape (JSON-RPC 2.0 §4); `raw` is its id as written.
fn request(v: Value, raw: Option<Box<RawValue>>) -> Result<Request, (Id, RpcError)> {
    let read = v.get("id");
    let usable = matches!(
        read,
        Some(Value::String(_) | Value::Number(_) | Value::Null)
    );
    let id = read.map(|read| match raw {
        Some(raw) if usable => Id(raw),
        // Not reached for a frame read from text (both readers see the same member); a
        // value built otherwise is written afresh.
        _ => serde_json::value::to_raw_value(read).map_or_else(|_| Id::null(), Id),
    });
    let id_for_error = match &id {
        Some(i) if usable => i.clone(),
        _ => Id::null(),
    };
    let invalid = |m: &str| {
        (
            id_for_error.clone(),
            RpcError::new(codes::INVALID_REQUEST, m),
        )
    };
    let Value::Object(obj) = v else {
        return Err(invalid("a request must be an object"));
    };
    if obj.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return Err(invalid("\"jsonrpc\" must be \"2.0\""));
    }
    let Some(Value::String(method)) = obj.get("method") else {
        return Err(invalid("\"method\" must be a string"));
    };
    if id.is_some() && !usable {
        return Err(invalid("\"id\" must be a string, a number or null"));
    }
    let params = match obj.get("params") {
        None => Value::Object(Default::default()),
        // Positional params make a valid request (§4.2); the method refuses them with
        // INVALID_PARAMS, so an unknown method still gets METHOD_NOT_FOUND and a
        // notification gets no answer (§4.1).
        Some(p @ (Value::Object(_) | Value::Array(_))) => p.clone(),
        Some(_) => return Err(invalid("\"params\" must be an object or an array")),
    };
    if let Some(extra) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "jsonrpc" | "method" | "params" | "id"))
    {
        return Err(invalid(&format!("unexpected member \"{extra}\"")));
    }
    Ok(Request {
        method: method.clone(),
        params,
        id,
        unreadable: None,
    })
}

/// A request object holding a value `Value` cannot hold. When its members make a request
/// (§4) it stays one, with `unreadable` set: its method refuses it like any other request, so
/// a notification gets no answer (§4.1) and an unknown method gets METHOD_NOT_FOUND. Other
/// objects are refused with `refused`, with the id as written where it can be echoed.
fn unreadable_request(raw: &str, refused: &RpcError) -> Item {
    let id = raw_id(raw).filter(|id| !id.get().starts_with(['{', '[', 't', 'f']));
    let invalid = |id: Option<Box<RawValue>>| Err((id.map_or_else(Id::null, Id), refused.clone()));
    let Ok(members) = serde_json::from_str::<HashMap<String, Box<RawValue>>>(raw) else {
        return invalid(id);
    };
    let text = |k: &str| {
        members
            .get(k)
            .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
    };
    let well_formed = text("jsonrpc").as_deref() == Some("2.0")
        && members
            .get("method")
            .is_some_and(|m| m.get().starts_with('"'))
        && members
            .get("params")
            .is_none_or(|p| p.get().starts_with(['{', '[']))
        && members
            .keys()
            .all(|k| matches!(k.as_str(), "jsonrpc" | "method" | "params" | "id"));
    // An id this reader cannot hold is no id to answer under.
    let id_readable = id
        .as_ref()
        .is_none_or(|id| serde_json::from_str::<Value>(id.get()).is_ok());
    if !well_formed || !id_readable || (members.contains_key("id") && id.is_none()) {
        return invalid(id);
    }
    Ok(Request {
        // A method name this reader cannot hold names no method here.
        method: text("method").unwrap_or_default(),
        params: Value::Object(Default::default()),
        id: id.map(Id),
        unreadable: Some(refused.message.clone()),
    })
}

/// Token bucket for the per-connection command rate.
struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Frames of one connection read but not yet answered. Past it the connection is not read
/// until answers are written, so a client that sends without reading is held back by TCP
/// instead of growing the controller's memory with waiting answers.
const MAX_PENDING_FRAMES: usize = 256;

/// Bytes of answers, notifications and events a connection may have queued and not yet
/// written. The frame limits alone do not bound memory: an answer can be large
/// (`conference.list` of 1000, in a batch of 50), and a client that reads slowly, but not
/// slowly enough to be taken for gone, could have hundreds of MB of them held for it. Past
/// this the connection is closed (1008).
const MAX_UNWRITTEN_BYTES: usize = 16 << 20;
/// Unwritten bytes below which a notice of lost events goes out: half of what events may
/// fill ([`Unwritten::reserve_event`]), so a client reading slowly through a backlog is told
/// once, not between every two events it is sent.
const NOTICE_BELOW: usize = MAX_UNWRITTEN_BYTES / 4;

/// What a request got as its frame was read.
struct Ticket {
    /// It had a rate token.
    allowed: bool,
    /// Its place in the lines of the conferences it names.
    turn: Option<Turn>,
}

/// The last command of each conference this connection has running, by arrival number.
#[derive(Default)]
struct Order {
    arrived: u64,
    last: HashMap<String, (u64, oneshot::Receiver<()>)>,
}

/// A command's place in the lines of the conferences it names (`conference`, and a move's
/// `to`): it starts once the commands that arrived before it for those conferences have
/// finished, and lets the next ones start when dropped. Without it, commands sent back to
/// back (mute, then unmute) reached the node in whatever order their tasks got there, and
/// the participant could end up muted.
struct Turn {
    after: Vec<oneshot::Receiver<()>>,
    /// The wait for `after` that ran out of time: still to finish before the next commands
    /// may start (the commands before this one may still be running).
    unfinished: Option<std::pin::Pin<Box<futures_util::future::JoinAll<oneshot::Receiver<()>>>>>,
    /// Dropped with the turn: that is what the next commands wait for.
    _done: Vec<oneshot::Sender<()>>,
    conferences: Vec<String>,
    arrived: u64,
    order: Arc<Mutex<Order>>,
}

impl Turn {
    /// Waits until the commands before this one have finished; `false` when that takes
    /// longer than `limit`.
    async fn wait(&mut self, limit: Duration) -> bool {
        let before = std::mem::take(&mut self.after);
        // Finished or gone, either way it is this one's turn.
        let mut all = Box::pin(futures_util::future::join_all(before));
        if tokio::time::timeout(limit, &mut all).await.is_ok() {
            return true;
        }
        self.unfinished = Some(all);
        false
    }

    /// Leaves the lines without running (the command was refused, or its turn did not
    /// come in time): the next commands still wait for the ones before this.
    fn pass(mut self) {
        let before = std::mem::take(&mut self.after);
        let unfinished = self.unfinished.take();
        if before.is_empty() && unfinished.is_none() {
            return;
        }
        tokio::spawn(async move {
            if let Some(unfinished) = unfinished {
                unfinished.await;
            }
            futures_util::future::join_all(before).await;
            drop(self);
        });
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Ok(mut order) = self.order.lock() {
            for conference in &self.conferences {
                if order
                    .last
                    .get(conference)
                    .is_some_and(|(arrived, _)| *arrived == self.arrived)
                {
                    order.last.remove(conference);
                }
            }
        }
    }
}

/// The bytes of answers, notifications and events a connection has queued and not yet
/// written, within [`MAX_UNWRITTEN_BYTES`].
struct Unwritten {
    /// Shared with the writer, which takes off what it wrote.
    bytes: Arc<AtomicUsize>,
    /// Told when an answer would pass the bound: the connection is then closed.
    overflow: tokio::sync::Notify,
}

impl Unwritten {
    /// Counts an answer's `size` bytes; false, with the connection to be closed, when that
    /// would pass the bound (an answer is owed: it cannot be dropped). One answer larger than
    /// the bound by itself is let through when nothing else waits to be written: its client
    /// has read all it was sent (a batch of big pages under a raised `rpc.max_batch`), and
    /// no more than one such answer is held at a time.
    fn admit(&self, size: usize) -> bool {
        if self.reserve(size, MAX_UNWRITTEN_BYTES)
            || self
                .bytes
                .compare_exchange(0, size, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            return true;
        }
        self.overflow.notify_one();
        false
    }

    /// Counts `size` bytes when that stays within `limit`; false, counting nothing and
    /// closing nothing, otherwise.
    fn reserve(&self, size: usize, limit: usize) -> bool {
        let before = self.bytes.fetch_add(size, Ordering::SeqCst);
        if before + size > limit {
            self.bytes.fetch_sub(size, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Counts an event's `size` bytes when they stay within half the bound; false, counting
    /// nothing, otherwise. Events keep the other half for the client's own answers, which
    /// past the bound close the connection: a backlog of events never makes an answer do so.
    fn reserve_event(&self, size: usize) -> bool {
        self.reserve(size, MAX_UNWRITTEN_BYTES / 2)
    }

    /// Counts `size` bytes whatever the bound (a notice of lost events, small and owed).
    fn add(&self, size: usize) {
        self.bytes.fetch_add(size, Ordering::SeqCst);
    }

    /// Takes off `size` bytes counted for something that was not queued after all.
    fn release(&self, size: usize) {
        self.bytes.fetch_sub(size, Ordering::SeqCst);
    }
}

/// One connection's state shared by its tasks.
struct Session {
    control: Control,
    /// Commands of one conference run in the order they arrived on this connection.
    order: Arc<Mutex<Order>>,
    limits: Limits,
    /// The conferences whose events this connection gets.
    following: Following,
    bucket: Mutex<Bucket>,
    in_flight: Arc<Semaphore>,
    out: mpsc::Sender<String>,
    /// Bytes queued in `out` and not yet written.
    unwritten: Unwritten,
    /// Becomes true when the client is gone; dial-out status streams stop on it.
    closed: tokio::sync::watch::Receiver<bool>,
    /// `confroute_rpc_errors_total`, by code.
    errors: prometheus::IntCounterVec,
    /// `confroute_rpc_events_lost_total`, by reason.
    events_lost: prometheus::IntCounterVec,
}

/// The series a JSON-RPC connection counts into.
#[derive(Clone)]
pub struct Series {
    /// `confroute_rpc_errors_total`, by code.
    pub errors: prometheus::IntCounterVec,
    /// `confroute_rpc_events_lost_total`, by reason.
    pub events_lost: prometheus::IntCounterVec,
}

/// Serves one WebSocket until it closes.
pub async fn serve(
    socket: WebSocket,
    control: Control,
    limits: Limits,
    series: Series,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (mut sink, mut stream) = socket.split();
    let (out, mut out_rx) = mpsc::channel::<String>(1024);
    let unwritten = Arc::new(AtomicUsize::new(0));
    let written = unwritten.clone();
    // Why the server ends the connection, for its close frame; set before the queue closes.
    let (ending, why) = tokio::sync::oneshot::channel::<CloseFrame>();
    let ping_every = limits.ping_interval;
    let silence = ping_every.saturating_mul(5) / 2;
    let writer = tokio::spawn(async move {
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        let mut why = why;
        let mut heard = false;
        // Once the reader has ended the connection with a reason: the frame, and until when
        // answers still on their way are waited for before it goes out.
        let mut closing: Option<(CloseFrame, tokio::time::Instant)> = None;
        loop {
            let grace = closing.as_ref().map(|(_, until)| *until);
            let mut size = 0;
            let msg = tokio::select! {
                text = out_rx.recv() => match text {
                    Some(text) => {
                        size = text.len();
                        Message::Text(text.into())
                    }
                    None => break,
                },
                r = &mut why, if !heard => {
                    heard = true;
                    if let Ok(frame) = r {
                        closing = Some((frame, tokio::time::Instant::now() + CLOSE_GRACE));
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(grace.unwrap_or_else(tokio::time::Instant::now)), if grace.is_some() => break,
                _ = ping.tick(), if closing.is_none() => Message::Ping(Default::default()),
            };
            // A client that stays connected but reads nothing (hung, stopped) would hold
            // this task, its queue and every task answering it for good: one that takes
            // no frame for as long as a silent one is allowed is closed.
            let sent = tokio::time::timeout(silence, sink.send(msg)).await;
            written.fetch_sub(size, Ordering::SeqCst);
            match sent {
                Ok(Ok(())) => {}
                // Ending here drops the queue, which tells the reader and every task
                // answering into it that nobody takes their frames any more. A client that
                // closed first is still owed the close reply the protocol layer queued
                // (RFC 6455 §5.5.1): only a close or flush writes it.
                Ok(Err(_)) => {
                    let _ = tokio::time::timeout(silence, sink.close()).await;
                    return;
                }
                Err(_) => {
                    tracing::info!("JSON-RPC client reads nothing; closing its connection");
                    return;
                }
            }
        }
        // No reason came yet: the queue closed as the reader ended, which decides now.
        if !heard {
            if let Ok(frame) = why.await {
                closing = Some((frame, tokio::time::Instant::now()));
            }
        }
        // The client's own close was answered by the protocol layer already.
        if let Some((frame, _)) = closing {
            let _ = tokio::time::timeout(silence, sink.send(Message::Close(Some(frame)))).await;
        }
        let _ = tokio::time::timeout(silence, sink.close()).await;
    });
    let (close, closed) = tokio::sync::watch::channel(false);
    let pending = Arc::new(Semaphore::new(MAX_PENDING_FRAMES));
    // Joined here, before any frame is read: a `subscribe` answered before the feed existed
    // would miss the events published in between, with no `events.lost`.
    let (following, feed) = control.fanout().join();
    let session = Arc::new(Session {
        bucket: Mutex::new(Bucket {
            tokens: f64::from(limits.burst),
            last: Instant::now(),
            rate: f64::from(limits.rate_per_sec),
            burst: f64::from(limits.burst),
        }),
        in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
        following,
        order: Arc::default(),
        control,
        limits,
        out,
        unwritten: Unwritten {
            bytes: unwritten,
            overflow: tokio::sync::Notify::new(),
        },
        closed,
        errors: series.errors,
        events_lost: series.events_lost,
    });
    let events = tokio::spawn(forward_events(
        session.clone(),
        feed,
        session.control.bus().gaps(),
    ));
    // A pong or any message proves the client is there; silence past `silence` ends it, and
    // so does the writer giving up on a client that reads nothing (its queue is closed).
    let writer_gone = session.out.clone();
    let end = loop {
        let msg = tokio::select! {
            m = tokio::time::timeout(silence, stream.next()) => match m {
                Ok(Some(msg)) => msg,
                Ok(None) => break None,
                Err(_) => break Some(close_frame(
                    close_code::POLICY,
                    format!("nothing heard for {} s (no pong)", silence.as_secs()),
                )),
            },
            _ = writer_gone.closed() => break None,
            _ = session.unwritten.overflow.notified() => break Some(unread()),
            _ = stop.wait_for(|s| *s) => {
                break Some(close_frame(close_code::AWAY, "the controller is shutting down".into()))
            }
        };
        match msg {
            Ok(Message::Text(text)) => {
                let permit = tokio::select! {
                    p = pending.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break None,
                    },
                    _ = writer_gone.closed() => break None,
                    _ = session.unwritten.overflow.notified() => break Some(unread()),
                    // A connection with every frame slot taken still hears the stop.
                    _ = stop.wait_for(|s| *s) => {
                        break Some(close_frame(close_code::AWAY, "the controller is shutting down".into()))
                    }
                };
                session.clone().incoming(text.as_str(), permit).await
            }
            Ok(Message::Binary(_)) => {
                let e = RpcError::new(codes::INVALID_REQUEST, "send JSON-RPC as text frames");
                session.count(&e);
                session.send(response(&Id::null(), Err(e))).await
            }
            Ok(Message::Close(_)) => break None,
            Err(e) => break refusal(&e),
            Ok(_) => {}
        }
    };
    match end {
        Some(frame) => {
            tracing::info!(code = frame.code, reason = %frame.reason, "closing a JSON-RPC connection");
            let _ = ending.send(frame);
        }
        None => drop(ending),
    }
    events.abort();
    // Tasks still answering may hold the session a while; its events stop now.
    session.following.close();
    let _ = close.send(true);
    drop(session);
    drop(writer_gone);
    let _ = writer.await;
}

/// How long answers still being worked out are waited for once the connection is being
/// closed (a stopping controller, a protocol fault), before the close frame goes out.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

fn close_frame(code: u16, reason: String) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

/// The close frame for a frame the WebSocket layer refused (RFC 6455 §7.4.1): 1007 for a
/// text message that is not UTF-8, 1009 past the size cap, 1002 for other protocol faults;
/// `None` when the connection itself failed and no frame can be sent.
///
/// The layer's error comes from a tungstenite version of axum's own, so it is told apart by
/// its text (a test pins each case).
fn refusal(e: &axum::Error) -> Option<CloseFrame> {
    let text = e.to_string();
    // A peer gone without a close frame (or writing after its own) has nobody to read one.
    if text.ends_with("Connection reset without closing handshake")
        || text.ends_with("Remote sent after having closed")
    {
        return None;
    }
    let code = if text.starts_with("UTF-8 encoding error") {
        close_code::INVALID
    } else if text.starts_with("Space limit exceeded") {
        close_code::SIZE
    } else if text.starts_with("WebSocket protocol error") {
        close_code::PROTOCOL
    } else {
        return None;
    };
    // A close reason is at most 123 bytes (RFC 6455 §5.5).
    let mut reason = text;
    while reason.len() > 123 {
        reason.pop();
    }
    Some(close_frame(code, reason))
}

/// The close frame of a connection whose client left too much unread.
fn unread() -> CloseFrame {
    close_frame(
        close_code::POLICY,
        format!(
            "more than {} MiB of answers and events not read",
            MAX_UNWRITTEN_BYTES >> 20
        ),
    )
}

/// Sends subscribed conferences' events as `event` notifications. A client that does not
/// read fast enough loses events rather than stalling anyone, and is told how many by one
/// `events.lost` notification as soon as its queue has room again, before any later event.
/// A node's own notice of events it could not publish that comes meanwhile is kept, with
/// its count and conference, and told right after.
async fn forward_events(session: Arc<Session>, mut feed: Feed, mut gaps: watch::Receiver<u64>) {
    gaps.borrow_and_update();
    let mut owed = Owed::default();
    // Only a connection that follows some conference has anything to re-read.
    let following = |s: &Session| s.following.any();
    loop {
        // A connection that follows nothing now (it unsubscribed) has nothing to re-read:
        // what it lost is of conferences it no longer follows.
        if owed.any() && !following(&session) {
            owed = Owed::default();
        }
        // A notice goes out when the queue has a slot and its bytes are back under
        // [`NOTICE_BELOW`]: past the events' share every event is dropped, and a notice each
        // would stand in for the one `events.lost` promised. The writer says nothing as it drains, so that
        // is looked at again shortly.
        let any_owed = owed.any();
        let bytes_ok = session.unwritten.bytes.load(Ordering::SeqCst) < NOTICE_BELOW;
        tokio::select! {
            // A gap is noticed before events that came after it.
            biased;
            changed = gaps.changed() => {
                if changed.is_err() {
                    return;
                }
                // The bus lost its subscription: whatever was published meanwhile is
                // unknown. A full queue keeps the notice for when it has room.
                if following(&session) && session.try_queue(gap_notice()).is_err() {
                    owed.gap = true;
                }
            }
            got = feed.recv() => match got {
                // Queued before its conference was unfollowed: the client said it no longer
                // wants it, so it is neither sent nor counted lost.
                Delivery::Event(ev) if !session.following.follows(ev.conference.as_str()) => {}
                Delivery::Event(ev) => {
                    if session.unwritten.bytes.load(Ordering::SeqCst) < NOTICE_BELOW {
                        while let Some(notice) = owed.next() {
                            if session.try_queue(notice).is_err() {
                                break;
                            }
                            owed.sent();
                        }
                    }
                    if ev.event == EVENTS_LOST {
                        let count = ev.data.get("count").and_then(Value::as_u64);
                        let notice = unpublished_notice(&ev.conference, &ev.node, count);
                        let told = !owed.any() && session.try_queue(notice).is_ok();
                        if !told && !owed.unpublished(&ev.conference, &ev.node, count) {
                            owed.lost += 1;
                            session.events_lost.with_label_values(&[SLOW_CLIENT]).inc();
                        }
                        continue;
                    }
                    let text = notification(
                        "event",
                        json!({"conference": ev.conference, "node": ev.node,
                               "epoch": ev.epoch, "seq": ev.seq,
                               "event": ev.event, "data": ev.data}),
                    );
                    if owed.any() || session.try_queue(text).is_err() {
                        owed.lost += 1;
                        session.events_lost.with_label_values(&[SLOW_CLIENT]).inc();
                    }
                }
                Delivery::Lost(n) => owed.lost += n,
            },
            _ = tokio::time::sleep(Duration::from_millis(50)), if any_owed && !bytes_ok => {}
            room = session.out.reserve(), if any_owed && bytes_ok => match room {
                // Unsubscribed from everything while the slot was awaited: nothing to tell.
                Ok(_) if !following(&session) => owed = Owed::default(),
                Ok(slot) => {
                    if let Some(notice) = owed.next() {
                        session.unwritten.add(notice.len());
                        slot.send(notice);
                        owed.sent();
                    }
                }
                Err(_) => return,
            },
        }
    }
}

/// Most node notices of unpublished events one connection keeps while it owes other
/// notices; past that (one per followed conference and node is the usual most) a further
/// one is counted as one event this connection lost.
const MAX_HELD_NOTICES: usize = 1024;

/// The `events.lost` notices a connection owes, told in this order: the bus's gap, the
/// events this connection dropped, then the nodes' own notices.
#[derive(Default)]
struct Owed {
    gap: bool,
    lost: u64,
    /// Node notices by (conference, node): their counts summed, `None` once one was unknown.
    unpublished: Vec<((String, String), Option<u64>)>,
}

impl Owed {
    fn any(&self) -> bool {
        self.gap || self.lost > 0 || !self.unpublished.is_empty()
    }

    /// The notice to send first, if any; [`Owed::sent`] once it is queued.
    fn next(&self) -> Option<String> {
        if self.gap {
            Some(gap_notice())
        } else if self.lost > 0 {
            Some(lost_notice(self.lost))
        } else {
            let ((conference, node), count) = self.unpublished.first()?;
            Some(unpublished_notice(conference, node, *count))
        }
    }

    /// Forgets the notice [`Owed::next`] gave.
    fn sent(&mut self) {
        if self.gap {
            self.gap = false;
        } else if self.lost > 0 {
            self.lost = 0;
        } else if !self.unpublished.is_empty() {
            self.unpublished.remove(0);
        }
    }

    /// Keeps a node's notice that `count` events of `conference` were not published; false
    /// when too many are kept already (the caller counts it as a lost event).
    fn unpublished(&mut self, conference: &str, node: &str, count: Option<u64>) -> bool {
        let key = (conference.to_string(), node.to_string());
        if let Some((_, held)) = self.unpublished.iter_mut().find(|(k, _)| *k == key) {
            *held = held.zip(count).map(|(a, b)| a.saturating_add(b));
        } else if self.unpublished.len() < MAX_HELD_NOTICES {
            self.unpublished.push((key, count));
        } else {
            return false;
        }
        true
    }
}

/// How often a dial-out's status stream checks that its node still holds a lease.
const NODE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Checks in a row the node must be found gone (its lease expired, Redis answering) before
/// the stream ends with `unknown`.
const NODE_GONE_CHECKS: u32 = 3;

/// How often a dial-out's node is asked whether it still tracks the call: an agent restarted
/// within its lease forgot it, and its stream would otherwise never end.
const DIALOUT_AUDIT_EVERY: Duration = Duration::from_secs(5);

/// How long a dial-out the node no longer tracks may take to deliver its last status
/// before its stream ends with `unknown` (`bus_reconnected`).
const LAST_STATUS_GRACE: Duration = Duration::from_secs(1);

/// The `status` of a `dialout.status` notification.
fn status_of(params: &Value) -> String {
    params
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// Order of the statuses a call goes through before its last one.
fn status_rank(status: &str) -> u8 {
    match status {
        "accepted" => 1,
        "ringing" => 2,
        "connected" => 3,
        _ => 0,
    }
}

/// `events.lost` reason and `confroute_rpc_events_lost_total` label of events a connection
/// did not read fast enough for.
pub const SLOW_CLIENT: &str = "slow_client";

fn lost_notice(count: u64) -> String {
    notification(
        "events.lost",
        json!({ "count": count, "reason": SLOW_CLIENT }),
    )
}

/// Events of one conference its node could not publish (Redis did not take them, or the
/// node's queue was full), as the node's notice says.
fn unpublished_notice(conference: &str, node: &str, count: Option<u64>) -> String {
    notification(
        "events.lost",
        json!({
            "count": count,
            "reason": "node_unpublished",
            "conference": conference,
            "node": node,
        }),
    )
}

/// Events published while the controller's bus was reconnecting to Redis: how many is
/// unknown.
fn gap_notice() -> String {
    notification(
        "events.lost",
        json!({ "count": null, "reason": "bus_reconnected" }),
    )
}

impl Session {
    /// Asks `node` where dial-out `callid` stands and sends the status the stream has not
    /// told yet. `Some(true)` when the stream ended: with the call's last status (still on its
    /// way from the node), or, when the node no longer tracks the call, `unknown` with
    /// `reason`; `None` when the node did not answer.
    async fn catch_up(
        &self,
        node: &NodeId,
        callid: &Value,
        notes: &mut Notifications,
        last_status: &mut String,
        reason: &str,
    ) -> Option<bool> {
        let Some(id) = callid.as_str() else {
            return Some(false);
        };
        match self.control.dialout_state(node, id).await {
            Ok(Some(now)) => {
                if status_rank(&now) > status_rank(last_status) {
                    let params = json!({"callid": callid, "status": now});
                    *last_status = now;
                    self.send_text(notification("dialout.status", params)).await;
                }
                Some(false)
            }
            // Ended, or forgotten: its last status may still be on its way from the node.
            Ok(None) => match tokio::time::timeout(LAST_STATUS_GRACE, notes.recv()).await {
                Ok(Some(Reply::Notify { params, last, .. })) => {
                    let status = status_of(&params);
                    // Sent already, from an earlier answer of the node.
                    if !last && status_rank(&status) <= status_rank(last_status) {
                        return Some(false);
                    }
                    *last_status = status;
                    self.send_text(notification("dialout.status", params)).await;
                    Some(last)
                }
                _ => {
                    let params = json!({"callid": callid, "status": "unknown", "reason": reason});
                    self.send_text(notification("dialout.status", params)).await;
                    Some(true)
                }
            },
            // The node does not answer: the watchdog tells whether it is gone.
            Err(_) => None,
        }
    }

    /// Counts an error answer (or the error a notification would have had).
    fn count(&self, e: &RpcError) {
        self.errors.with_label_values(&[&e.code.to_string()]).inc();
    }

    async fn send(&self, answer: String) {
        let size = answer.len();
        if self.unwritten.admit(size) && self.out.send(answer).await.is_err() {
            self.unwritten.release(size);
        }
    }

    /// Queues `text` without waiting (events, which a slow reader loses rather than
    /// holding anyone up); `Err` when the queue is full or past its bytes. An event past the
    /// bytes is lost like one past the queue (the caller reports it with `events.lost`): it
    /// does not close the connection, which only answers can.
    fn try_queue(&self, text: String) -> Result<(), ()> {
        let size = text.len();
        if !self.unwritten.reserve_event(size) {
            return Err(());
        }
        self.out.try_send(text).map_err(|_| {
            self.unwritten.release(size);
        })
    }

    /// Answers one text frame; `permit` is held until its answer is queued for writing.
    async fn incoming(self: Arc<Self>, text: &str, permit: tokio::sync::OwnedSemaphorePermit) {
        match decode(text, &self.limits) {
            Decoded::Refused(e) => {
                self.count(&e);
                self.send(response(&Id::null(), Err(e))).await
            }
            Decoded::RefusedBatch {
                answers,
                notifications,
            } => {
                // A notification gets no answer, but its error counts as any other.
                if notifications > 0 {
                    let e = RpcError::new(codes::INVALID_REQUEST, "batch over rpc.max_batch");
                    for _ in 0..notifications {
                        self.count(&e);
                    }
                }
                let mut out = Vec::with_capacity(answers.len());
                for item in answers {
                    if let Err((id, e)) = item {
                        self.count(&e);
                        out.push(response(&id, Err(e)));
                    }
                }
                if !out.is_empty() {
                    self.send(format!("[{}]", out.join(","))).await;
                }
                drop(permit);
            }
            Decoded::Batch(items) => {
                // Tickets are taken here, in the order the requests were written.
                let items: Vec<(Item, Ticket)> = items
                    .into_iter()
                    .map(|i| {
                        let ticket = self.ticket(&i);
                        (i, ticket)
                    })
                    .collect();
                // The batch is answered as one array once every member is done.
                tokio::spawn(async move {
                    let (answered, sent) = watch::channel(false);
                    let answers = futures_util::future::join_all(
                        items
                            .into_iter()
                            .map(|(i, ticket)| self.clone().one(i, ticket, sent.clone())),
                    )
                    .await;
                    let answers: Vec<String> = answers.into_iter().flatten().collect();
                    if !answers.is_empty() {
                        self.send(format!("[{}]", answers.join(","))).await;
                    }
                    let _ = answered.send(true);
                    drop(permit);
                });
            }
            Decoded::Single(item) => {
                let ticket = self.ticket(&item);
                tokio::spawn(async move {
                    let (answered, sent) = watch::channel(false);
                    if let Some(answer) = self.clone().one(item, ticket, sent).await {
                        self.send(answer).await;
                    }
                    let _ = answered.send(true);
                    drop(permit);
                });
            }
        }
    }

    /// A request's rate token and place in line, taken as its frame is read.
    fn ticket(&self, item: &Item) -> Ticket {
        // Answered with its error at once: no token, no place.
        let Some(req) = item
            .as_ref()
            .ok()
            .filter(|r| Self::known(&r.method) && r.unreadable.is_none())
        else {
            return Ticket {
                allowed: true,
                turn: None,
            };
        };
        // Refused by the rate limit, a request takes no place in line either: in line behind
        // a slow command, each refused one would hold a task until that command ended, and a
        // client retrying fast could pile up any number of them.
        if !self.bucket.lock().map(|mut b| b.take()).unwrap_or(false) {
            return Ticket {
                allowed: false,
                turn: None,
            };
        }
        Ticket {
            allowed: true,
            turn: self.turn(req),
        }
    }

    /// The place in line of a request naming a conference.
    fn turn(&self, req: &Request) -> Option<Turn> {
        let params = &req.params;
        // A move names its target too (a dial-out's `to` is a number, not a conference).
        let keys: &[&str] = if req.method == "participant.move" {
            &["conference", "to"]
        } else {
            &["conference"]
        };
        let mut conferences: Vec<String> = keys
            .iter()
            .filter_map(|k| params.get(*k).and_then(Value::as_str))
            .map(str::to_string)
            .collect();
        conferences.dedup();
        if conferences.is_empty() {
            return None;
        }
        let mut order = self.order.lock().ok()?;
        order.arrived += 1;
        let arrived = order.arrived;
        let mut after = Vec::new();
        let mut done = Vec::new();
        for conference in &conferences {
            let (tx, finished) = oneshot::channel();
            done.push(tx);
            if let Some((_, before)) = order.last.insert(conference.clone(), (arrived, finished)) {
                after.push(before);
            }
        }
        Some(Turn {
            after,
            unfinished: None,
            _done: done,
            conferences,
            arrived,
            order: self.order.clone(),
        })
    }

    /// Runs one request once its turn comes; `None` for notifications. `answered` turns
    /// true once its answer is queued for the client (for a batch, the whole array).
    async fn one(
        self: Arc<Self>,
        item: Item,
        ticket: Ticket,
        answered: watch::Receiver<bool>,
    ) -> Option<String> {
        let Ticket { allowed, mut turn } = ticket;
        let req = match item {
            Ok(r) => r,
            Err((id, e)) => {
                self.count(&e);
                return Some(response(&id, Err(e)));
            }
        };
        if !Self::known(&req.method) {
            let e = method_not_found(&req.method);
            self.count(&e);
            return req.id.map(|id| response(&id, Err(e)));
        }
        if let Some(why) = &req.unreadable {
            let e = RpcError::new(codes::INVALID_PARAMS, why.clone());
            self.count(&e);
            return req.id.map(|id| response(&id, Err(e)));
        }
        // One rpc.command_timeout for the whole command, its wait in line included: it
        // waits at most half of it, and what is left goes with it to the node.
        let arrived = tokio::time::Instant::now();
        let limit = self.control.timeout();
        // A command waiting in line is not in progress: the in-flight slot is taken once its
        // turn has come, so a slow conference does not stall the connection's others.
        let waited = match turn.as_mut() {
            Some(t) if allowed => t.wait(limit / 2).await,
            _ => true,
        };
        let result = if !allowed {
            Err(RpcError::new(
                codes::RATE_LIMITED,
                format!("more than {} commands per second", self.limits.rate_per_sec),
            ))
        } else if !waited {
            Err(RpcError::new(
                codes::TIMEOUT,
                format!(
                    "not carried out: the commands sent before it for this conference took longer than half of rpc.command_timeout ({limit:?})"
                ),
            ))
        } else {
            match self.in_flight.clone().try_acquire_owned() {
                Ok(_permit) => {
                    let control = self
                        .control
                        .with_timeout(limit.saturating_sub(arrived.elapsed()));
                    let result = self
                        .dispatch(&control, &req.method, req.params, answered)
                        .await;
                    drop(turn.take());
                    result
                }
                Err(_) => Err(RpcError::new(
                    codes::RATE_LIMITED,
                    format!(
                        "more than {} commands in progress",
                        self.limits.max_in_flight
                    ),
                )),
            }
        };
        if let Some(turn) = turn {
            turn.pass();
        }
        if let Err(e) = &result {
            self.count(e);
        }
        req.id.map(|id| response(&id, result))
    }

    /// Whether `method` is one this endpoint has: an unknown one is answered -32601 before
    /// it takes a rate token or a place in line, so the answer names the real mistake.
    fn known(method: &str) -> bool {
        METHODS.contains(&method)
    }

    async fn dispatch(
        self: &Arc<Self>,
        c: &Control,
        method: &str,
        p: Value,
        mut answered: watch::Receiver<bool>,
    ) -> Result<Value, RpcError> {
        let r = match method {
            "conference.list" => c.list(params(p)?).await,
            "conference.get" => c.get(params(p)?).await,
            "conference.end" => c.end(params(p)?).await,
            "conference.play" => {
                let pp: control::PlayParams = params(p)?;
                if pp.participant.is_some() {
                    return Err(RpcError::new(
                        codes::INVALID_PARAMS,
                        "conference.play takes no participant (use participant.play)",
                    ));
                }
                c.play(pp).await
            }
            "participant.list" => c.participants(params(p)?).await,
            "participant.mute" | "participant.unmute" | "participant.hold"
            | "participant.unhold" | "participant.kick" => c.participant(method, params(p)?).await,
            "participant.dtmf" => c.dtmf(params(p)?).await,
            "participant.play" => {
                let pp: control::PlayParams = params(p)?;
                if pp.participant.is_none() {
                    return Err(RpcError::new(
                        codes::INVALID_PARAMS,
                        "participant is required",
                    ));
                }
                c.play(pp).await
            }
            "participant.move" => c.move_participant(params(p)?).await,
            "participant.update" => c.update(params(p)?).await,
            "dialout" => {
                let d = c.dialout(params(p)?).await?;
                let me = self.clone();
                let mut notes = d.notifications;
                let mut closed = self.closed.clone();
                let callid = d.result.get("callid").cloned().unwrap_or(Value::Null);
                let node = d.node;
                let mut gaps = self.control.bus().gaps();
                gaps.borrow_and_update();
                tokio::spawn(async move {
                    // Ends with the last status, when the client goes, or when the node is
                    // gone: a status stream whose node died never sends its last one.
                    let mut missed = 0u32;
                    let mut last_status = String::new();
                    let gone = async move {
                        let _ = closed.wait_for(|c| *c).await;
                    };
                    tokio::pin!(gone);
                    // The statuses follow the `{callid}` answer, as documented; the node
                    // sends `accepted` right after it, and a batch is answered only once
                    // its slowest member is done. They wait in the bus meanwhile.
                    tokio::select! {
                        _ = answered.wait_for(|a| *a) => {}
                        _ = &mut gone => return,
                    }
                    // Checks a second apart even after a wait elsewhere (a slow client):
                    // three missed ticks must not run back to back.
                    let mut watch = tokio::time::interval(NODE_CHECK_EVERY);
                    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut audit = tokio::time::interval_at(
                        tokio::time::Instant::now() + DIALOUT_AUDIT_EVERY,
                        DIALOUT_AUDIT_EVERY,
                    );
                    audit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    // A catch-up after a bus gap the node did not answer: its reason stands.
                    let mut owed: Option<&'static str> = None;
                    loop {
                        tokio::select! {
                            note = notes.recv() => match note {
                                Some(Reply::Notify { params, last, .. }) => {
                                    let status = status_of(&params);
                                    // Already told, from the node's answer after a bus gap.
                                    if !last && status_rank(&status) > 0 && status_rank(&status) <= status_rank(&last_status) {
                                        continue;
                                    }
                                    last_status = status;
                                    me.send_text(notification("dialout.status", params)).await;
                                    if last {
                                        break;
                                    }
                                }
                                _ => break,
                            },
                            // Statuses published while the bus was reconnecting are lost:
                            // the node says where the call is now.
                            Ok(()) = gaps.changed() => {
                                match me.catch_up(&node, &callid, &mut notes, &mut last_status, "bus_reconnected").await {
                                    Some(true) => break,
                                    Some(false) => {}
                                    // Asked again at the next audit, for the same reason.
                                    None => owed = Some("bus_reconnected"),
                                }
                            }
                            // An agent restarted within its lease (the node never looked gone)
                            // no longer knows the call, and would never send its last status.
                            _ = audit.tick() => {
                                let reason = owed.unwrap_or("node_restarted");
                                match me.catch_up(&node, &callid, &mut notes, &mut last_status, reason).await {
                                    Some(true) => break,
                                    Some(false) => owed = None,
                                    None => {}
                                }
                            }
                            _ = watch.tick() => {
                                missed = if me.control.node_gone(&node) { missed + 1 } else { 0 };
                                if missed >= NODE_GONE_CHECKS {
                                    let params = json!({"callid": callid, "status": "unknown",
                                                        "reason": "node_lost"});
                                    me.send_text(notification("dialout.status", params)).await;
                                    break;
                                }
                            }
                            _ = &mut gone => break,
                        }
                    }
                });
                return Ok(d.result);
            }
            "subscribe" => return self.subscribe(params(p)?),
            "unsubscribe" => return self.unsubscribe(params(p)?),
            // Unknown methods are answered before they get here (`known`).
            other => return Err(method_not_found(other)),
        };
        r.map_err(RpcError::from)
    }

    async fn send_text(&self, text: String) {
        self.send(text).await;
    }

    fn subscribe(&self, p: control::ConferenceRef) -> Result<Value, RpcError> {
        let name = ConferenceName::parse(&p.conference)
            .map_err(|e| RpcError::new(codes::INVALID_PARAMS, format!("conference: {e}")))?;
        self.following
            .follow(name.as_str(), self.limits.max_subscriptions)
            .map_err(|e| RpcError::new(codes::TOO_MANY_SUBSCRIPTIONS, e.to_string()))?;
        Ok(json!({"subscribed": name}))
    }

    fn unsubscribe(&self, p: control::ConferenceRef) -> Result<Value, RpcError> {
        let name = ConferenceName::parse(&p.conference)
            .map_err(|e| RpcError::new(codes::INVALID_PARAMS, format!("conference: {e}")))?;
        let removed = self.following.unfollow(name.as_str());
        Ok(json!({"unsubscribed": name, "was_subscribed": removed}))
    }
}

/// Default per-connection limits.
impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 64 * 1024,
            max_subscriptions: 100,
            rate_per_sec: 50,
            burst: 100,
            max_batch: 50,
            max_in_flight: 64,
            ping_interval: Duration::from_secs(30),
        }
    }
}

/// How long a command may take end to end before the client gets `NO_ANSWER`.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    /// A request object checked as if read from text without an id of its own text.
    fn request(v: Value) -> Result<Request, (Id, RpcError)> {
        super::request(v, None)
    }

    #[test]
    fn request_validation() {
        assert!(request(json!({"jsonrpc": "2.0", "method": "m", "id": 1})).is_ok());
        let Ok(notif) = request(json!({"jsonrpc": "2.0", "method": "m"})) else {
            panic!("a notification is a valid request");
        };
        assert!(notif.id.is_none());
        let positional = request(json!({"jsonrpc": "2.0", "method": "m", "params": [1]}));
        assert!(positional.is_ok(), "positional params are a valid request");
        let cases = [
            (
                json!({"jsonrpc": "1.0", "method": "m", "id": 1}),
                codes::INVALID_REQUEST,
            ),
            (json!({"method": "m", "id": 1}), codes::INVALID_REQUEST),
            (
                json!({"jsonrpc": "2.0", "method": 5, "id": 1}),
                codes::INVALID_REQUEST,
            ),
            (
                json!({"jsonrpc": "2.0", "method": "m", "id": {}}),
                codes::INVALID_REQUEST,
            ),
            (
                json!({"jsonrpc": "2.0", "method": "m", "params": 3, "id": 1}),
                codes::INVALID_REQUEST,
            ),
            (
                json!({"jsonrpc": "2.0", "method": "m", "id": 1, "x": 1}),
                codes::INVALID_REQUEST,
            ),
            (json!(7), codes::INVALID_REQUEST),
        ];
        for (v, code) in cases {
            match request(v.clone()) {
                Err((_, e)) => assert_eq!(e.code, code, "{v}"),
                Ok(_) => panic!("{v} should be rejected"),
            }
        }
    }

    #[test]
    fn every_method_is_documented() {
        let doc = include_str!("../../docs/call-control.md");
        for m in METHODS {
            assert!(
                doc.contains(&format!("`{m}`")),
                "{m} missing from call-control.md"
            );
        }
    }

    #[test]
    fn decode_refuses_frames_and_keeps_ids_exact() {
        let limits = Limits {
            max_message_size: 64,
            max_batch: 2,
            ..Limits::default()
        };
        let refused = |text: &str| match decode(text, &limits) {
            Decoded::Refused(e) => e.code,
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(refused(&"x".repeat(65)), codes::MESSAGE_TOO_LARGE);
        assert_eq!(refused("{"), codes::PARSE_ERROR);
        assert_eq!(refused("[]"), codes::INVALID_REQUEST);
        assert!(matches!(decode("[1,2]", &limits), Decoded::Batch(b) if b.len() == 2));
        // Over the batch limit: each call refused with its own id, no notification answered.
        let limits = Limits {
            max_batch: 2,
            ..Limits::default()
        };
        let call = |id: u32| format!(r#"{{"jsonrpc":"2.0","method":"conference.list","id":{id}}}"#);
        let note = r#"{"jsonrpc":"2.0","method":"conference.list"}"#;
        let over = format!("[{},{note},{}]", call(1), call(2));
        let Decoded::RefusedBatch {
            answers: items,
            notifications: 1,
        } = decode(&over, &limits)
        else {
            panic!("a batch over the limit is still a batch, its notification counted");
        };
        let ids: Vec<(String, i64)> = items
            .iter()
            .map(|i| match i {
                Err((id, e)) => (id.raw().to_string(), e.code),
                Ok(r) => panic!("carried out: {r:?}"),
            })
            .collect();
        assert_eq!(
            ids,
            vec![
                ("1".to_string(), codes::INVALID_REQUEST),
                ("2".to_string(), codes::INVALID_REQUEST)
            ]
        );
        // Far over the limit: one answer, however many members.
        let nine = format!("[{}]", ["0"; 9].join(","));
        assert!(
            matches!(decode(&nine, &limits), Decoded::Refused(e) if e.code == codes::INVALID_REQUEST)
        );
        // JSON with a number no double holds as its id is a request refused, with its id
        // as written.
        for (text, id) in [
            (
                r#"{"jsonrpc":"2.0","method":"conference.list","id":1e400}"#,
                "1e400",
            ),
            (
                r#"{"jsonrpc":"1.0","method":"conference.list","params":{"x":1e999},"id":"a"}"#,
                "\"a\"",
            ),
        ] {
            match decode(text, &limits) {
                Decoded::Single(Err((got, e))) => {
                    assert_eq!((got.raw(), e.code), (id, codes::INVALID_REQUEST), "{text}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        // A well-formed request whose params or method name hold what no reader here can is
        // still a request: its method refuses it, and a notification gets no answer.
        for (text, id, method) in [
            (
                r#"{"jsonrpc":"2.0","method":"conference.list","params":{"x":1e999},"id":"a"}"#,
                Some("\"a\""),
                "conference.list",
            ),
            (
                r#"{"jsonrpc":"2.0","method":"conference.list","params":{"limit":1e999}}"#,
                None,
                "conference.list",
            ),
            (
                r#"{"jsonrpc":"2.0","method":"dialout","params":{"from":"\ud83d"}}"#,
                None,
                "dialout",
            ),
            (
                r#"{"jsonrpc":"2.0","method":"no.such\ud83d","id":4}"#,
                Some("4"),
                "",
            ),
        ] {
            match decode(text, &limits) {
                Decoded::Single(Ok(req)) => {
                    assert_eq!(req.id.as_ref().map(|i| i.raw()), id, "{text}");
                    assert_eq!(req.method, method, "{text}");
                    assert!(req.unreadable.is_some(), "{text}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        let notifications = r#"[{"jsonrpc":"2.0","method":"no.such","params":{"a":1e999}}]"#;
        assert!(
            matches!(decode(notifications, &limits), Decoded::Batch(b) if matches!(&b[..], [Ok(r)] if r.id.is_none())),
            "a batch of one notification stays one"
        );
        // Not a request (an unknown member, an id that is an object): refused, id null.
        for text in [
            r#"{"jsonrpc":"2.0","method":"m","params":{"x":1e999},"extra":1,"id":3}"#,
            r#"{"jsonrpc":"2.0","method":"m","params":{"x":1e999},"id":{"a":1}}"#,
            r#"{"jsonrpc":"2.0","method":"m","params":5,"x":1e999}"#,
        ] {
            match decode(text, &limits) {
                Decoded::Single(Err((got, e))) => {
                    assert_eq!(e.code, codes::INVALID_REQUEST, "{text}");
                    if text.contains("extra") {
                        assert_eq!(got.raw(), "3", "{text}");
                    } else {
                        assert_eq!(got.raw(), "null", "{text}");
                    }
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        let mixed = format!(
            r#"[{},{{"jsonrpc":"2.0","method":"m","id":-1e999}}]"#,
            call(3)
        );
        assert!(
            matches!(decode(&mixed, &limits), Decoded::Batch(b) if b.len() == 2 && b[0].is_ok() && b[1].is_err()),
            "only the unreadable member is refused"
        );

        // The answer carries the id exactly as written, whatever a JSON reader would make
        // of it (found by fuzzing: a 180-digit number), alone or in a batch, and for an
        // invalid request too.
        let long = format!("7777577{}4", "7".repeat(173));
        for id in [
            long.as_str(),
            "12345678901234567890123",
            "18446744073709551616",
            "1e3",
            "-0",
            "1.50",
            "0",
            r#""\u00e9""#,
            r#""a\"b""#,
            "null",
        ] {
            let text = format!(r#"{{"jsonrpc":"2.0","method":"m","id": {id} }}"#);
            let Decoded::Single(Ok(req)) = decode(&text, &Limits::default()) else {
                panic!("{text}: a valid request");
            };
            let answer = response(&req.id.expect("an id"), Ok(json!(true)));
            assert!(answer.contains(&format!(r#""id":{id}"#)), "{answer}");
            let batch = format!(r#"[{text},{{"jsonrpc":"1.0","method":"m","id":{id}}}]"#);
            let Decoded::Batch(items) = decode(&batch, &Limits::default()) else {
                panic!("{batch}: a batch");
            };
            let Some(Err((bad, _))) = items.get(1) else {
                panic!("{batch}: the second is invalid");
            };
            assert_eq!(bad.raw(), id);
        }
        // The last of two ids counts, as for every member.
        let Decoded::Single(Ok(req)) = decode(
            r#"{"jsonrpc":"2.0","method":"m","id":1,"id":2}"#,
            &Limits::default(),
        ) else {
            panic!("valid");
        };
        assert_eq!(req.id.map(|i| i.value()), Some(json!(2)));
    }

    #[tokio::test]
    async fn only_an_answer_past_the_byte_bound_closes_the_connection() {
        let u = Unwritten {
            bytes: Arc::new(AtomicUsize::new(MAX_UNWRITTEN_BYTES - 10)),
            overflow: tokio::sync::Notify::new(),
        };
        let told =
            |u: &Unwritten| futures_util::FutureExt::now_or_never(u.overflow.notified()).is_some();
        // An event that does not fit is lost, and nothing else happens.
        assert!(!u.reserve_event(300));
        assert!(!told(&u), "an event closed the connection");
        assert_eq!(u.bytes.load(Ordering::SeqCst), MAX_UNWRITTEN_BYTES - 10);
        assert!(u.reserve(10, MAX_UNWRITTEN_BYTES), "what fits is queued");
        // An answer that does not fit closes it.
        assert!(!u.admit(1));
        assert!(told(&u), "an answer past the bound closes the connection");
        // Even one past the bound by itself goes out to a client that read everything, but
        // only then.
        u.bytes.store(0, Ordering::SeqCst);
        assert!(u.admit(MAX_UNWRITTEN_BYTES + 1));
        assert!(!told(&u));
        assert!(!u.admit(MAX_UNWRITTEN_BYTES + 1));
        assert!(told(&u), "a second one waiting closes the connection");
        // Events stop at half the bound: an answer behind them still has room.
        u.bytes
            .store(MAX_UNWRITTEN_BYTES / 2 - 10, Ordering::SeqCst);
        assert!(!u.reserve_event(300), "events keep to half the bound");
        assert!(
            u.admit(64 * 1024),
            "an answer fits behind a backlog of events"
        );
        assert!(!told(&u));
    }

    #[test]
    fn bucket_limits_bursts() {
        let mut b = Bucket {
            tokens: 3.0,
            last: Instant::now(),
            rate: 0.0,
            burst: 3.0,
        };
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
    }
}
