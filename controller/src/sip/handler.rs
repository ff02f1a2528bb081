//! What the redirect server answers to each request: the SIP side of a routing decision.
//!
//! INVITE → conference name (configured header, else the Request-URI user part) → routing
//! decision → `302 Moved Temporarily` with the node's Contact and the `X-Conference` /
//! `X-Conference-Node` headers. Bad input gets a precise status and a `Warning` saying why,
//! and never reaches Redis (invariant 6).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use confroute_shared::name::{ConferenceName, NameError};

use super::message::{
    self, parse_digits, parse_sip_uri, percent_decode, ParseError, Request, UriError,
};
use super::response::{self, Response, ALLOW};
use super::transactions::{Answer, Begin, Cancel, Resend, Transactions};
use crate::config::{SipConfig, Transport};
use crate::metrics::Metrics;
use crate::router::{RouteError, Router};

/// Longest transaction key kept as it is.
const MAX_KEY: usize = 160;

/// A response and where to send it.
pub struct Outgoing {
    /// Serialised response.
    pub bytes: Vec<u8>,
    /// Destination over UDP; over TCP, where a new connection goes should the request's
    /// close before the answer is written (RFC 3261 §18.2.2).
    pub to: SocketAddr,
    /// Set for a final answer over UDP whose sender was sent `100 Trying`: resend it until
    /// the ACK comes (RFC 3261 §17.2.1, Timer G), as `serve_udp` does.
    pub resend: Option<Resend>,
}

/// Where a provisional answer goes while its INVITE is still being routed: the transport
/// the request came over.
pub trait Early: Sync {
    /// Sends `out` now; false when it was left out (see the TCP one).
    fn send(&self, out: Outgoing) -> futures_util::future::BoxFuture<'_, bool>;
}

/// How long an INVITE may wait on routing before it gets `100 Trying` (RFC 3261 §17.2.1:
/// a server that will not answer within 200 ms must say it is trying).
pub const TRYING_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

/// How one request is to be handled, beside the request itself.
/// Why a new INVITE read from a stream is answered 503 without being routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refuse {
    /// Redis is known to be out of reach, and as many INVITEs of the connection as may
    /// wait on it already do.
    RedisDown,
    /// `sip.max_pending_invites` INVITEs are being routed already.
    Overloaded,
}

#[derive(Clone, Copy)]
struct How<'a> {
    transport: Transport,
    /// Answer only what the transaction table knows (INVITEs past `max_pending_invites`).
    known_only: bool,
    /// Answer a new INVITE 503 at once, without routing, and why.
    refuse_new: Option<Refuse>,
    /// A framing fault to answer with 400 (513 for the size) instead of handling the request.
    fault: Option<&'static str>,
    early: Option<&'a dyn Early>,
    /// How long a CANCEL matching no INVITE waits for one to begin ([`CANCEL_GRACE`]).
    cancel_grace: Duration,
}

impl How<'_> {
    /// A request over `transport` handled in full, with no provisional answers.
    fn plain(transport: Transport) -> Self {
        How {
            transport,
            known_only: false,
            refuse_new: None,
            fault: None,
            early: None,
            cancel_grace: Duration::ZERO,
        }
    }
}

/// How long a CANCEL that matches no INVITE waits for one to begin before it is answered
/// 481 ([`SipService::handle_cancel`]). The INVITE right in front of it is normally begun
/// within microseconds; the bound only matters for a CANCEL that matches nothing. Under
/// half of T1, so its sender has the answer before it retransmits.
pub const CANCEL_GRACE: Duration = Duration::from_millis(200);

/// An [`Early`] for a request read as Latin-1: what it sends goes back to Latin-1 bytes.
struct Latin1<'a> {
    inner: &'a dyn Early,
}

impl Early for Latin1<'_> {
    fn send(&self, mut out: Outgoing) -> futures_util::future::BoxFuture<'_, bool> {
        out.bytes = message::utf8_as_latin1(&out.bytes);
        self.inner.send(out)
    }
}

/// The SIP request handler shared by the UDP and TCP listeners.
pub struct SipService {
    router: Arc<Router>,
    transactions: Transactions,
    conference_header: String,
    header_conference: String,
    header_node: String,
    trusted: Vec<IpNet>,
    retry_after: String,
    metrics: Metrics,
    /// Keys of the To-tags derived for answers that are not remembered.
    tag_keys: std::collections::hash_map::RandomState,
    /// Routing failures (Redis out of reach fails every call) are logged one line a period.
    failures: crate::throttle::Throttle,
    /// CANCELs that may wait for their INVITE at once ([`SipService::cancel_permit`]).
    cancel_waits: Arc<tokio::sync::Semaphore>,
    /// Set when the process stops: TCP connections read no more requests.
    stopping: tokio::sync::watch::Sender<bool>,
}

/// CANCELs that may wait for their INVITE at once: a flood of CANCELs matching nothing
/// would otherwise hold a task each for [`CANCEL_GRACE`]. Past it a CANCEL is answered at once.
const MAX_CANCEL_WAITS: usize = 1024;

/// A bounded method label for metrics.
fn method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 14] = [
        "INVITE",
        "ACK",
        "CANCEL",
        "OPTIONS",
        "BYE",
        "REGISTER",
        "SUBSCRIBE",
        "NOTIFY",
        "INFO",
        "MESSAGE",
        "UPDATE",
        "PRACK",
        "REFER",
        "PUBLISH",
    ];
    KNOWN
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

/// The `code` label for a status this server sends (a bounded set, no allocation per call).
fn code_label(code: u16) -> &'static str {
    match code {
        100 => "100",
        200 => "200",
        302 => "302",
        400 => "400",
        403 => "403",
        404 => "404",
        405 => "405",
        416 => "416",
        420 => "420",
        481 => "481",
        483 => "483",
        484 => "484",
        487 => "487",
        500 => "500",
        503 => "503",
        505 => "505",
        513 => "513",
        _ => "other",
    }
}

/// What the request names as its conference, or the answer explaining why it names none.
enum Target {
    Name(ConferenceName),
    Reject(Response),
}

impl SipService {
    /// A handler routing through `router`.
    pub fn new(cfg: &SipConfig, router: Arc<Router>, metrics: Metrics) -> Self {
        SipService {
            router,
            transactions: Transactions::new(cfg.max_transactions),
            conference_header: cfg.conference_header.clone(),
            header_conference: cfg.header_conference.clone(),
            header_node: cfg.header_node.clone(),
            trusted: cfg.trusted_cidrs.clone(),
            retry_after: cfg.retry_after.to_string(),
            metrics,
            tag_keys: Default::default(),
            failures: crate::throttle::Throttle::new(std::time::Duration::from_secs(10)),
            cancel_waits: Arc::new(tokio::sync::Semaphore::new(MAX_CANCEL_WAITS)),
            stopping: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Tells every TCP connection to read no more requests: each closes once the INVITEs it
    /// read are answered.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves once [`SipService::stop`] was called.
    pub async fn stopped(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// A slot for a CANCEL to be handled on a task of its own with
    /// [`SipService::handle_cancel`]; `None` when too many wait already (handle it at once
    /// with [`SipService::handle`]).
    pub fn cancel_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.cancel_waits.clone().try_acquire_owned().ok()
    }

    /// Drops transactions past their timers; returns how many remain.
    pub fn sweep(&self) -> usize {
        self.transactions.sweep()
    }

    /// Whether `ip` may send requests (`sip.trusted_cidrs`; IPv4 peers of a dual-stack socket
    /// arrive as IPv4-mapped IPv6 addresses and are matched as IPv4).
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.is_empty() || self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// Counts a final answer resent while its ACK is awaited.
    pub fn note_resent(&self) {
        self.metrics.sip_answer_resends.inc();
    }

    /// Counts a packet dropped without an answer.
    pub fn note_dropped(&self, reason: &'static str) {
        self.metrics.sip_dropped.with_label_values(&[reason]).inc();
    }

    fn drop_packet(&self, reason: &'static str) -> Option<Outgoing> {
        self.note_dropped(reason);
        None
    }

    /// Handles one request received over `transport` from `source`.
    pub async fn handle(
        &self,
        packet: &[u8],
        source: SocketAddr,
        transport: Transport,
    ) -> Option<Outgoing> {
        self.handle_as(packet, source, How::plain(transport)).await
    }

    /// [`SipService::handle`] for a CANCEL that may wait up to [`CANCEL_GRACE`] for its
    /// INVITE, read just before it and routed on another task, to begin its transaction.
    /// For a task of its own: the wait must not hold up the requests read after it.
    pub async fn handle_cancel(
        &self,
        packet: &[u8],
        source: SocketAddr,
        transport: Transport,
    ) -> Option<Outgoing> {
        let how = How {
            cancel_grace: CANCEL_GRACE,
            ..How::plain(transport)
        };
        self.handle_as(packet, source, how).await
    }

    /// [`SipService::handle`] for a request whose transport can carry a provisional answer
    /// ahead of the final one: an INVITE still being routed after [`TRYING_AFTER`] gets
    /// `100 Trying` through `early`, and one cancelled meanwhile is answered `487` at once.
    pub async fn handle_early(
        &self,
        packet: &[u8],
        source: SocketAddr,
        transport: Transport,
        early: &dyn Early,
    ) -> Option<Outgoing> {
        let how = How {
            early: Some(early),
            ..How::plain(transport)
        };
        self.handle_as(packet, source, how).await
    }

    /// Answers the header block of a stream message whose Content-Length cannot frame it
    /// (`why`): 400 naming that fault, as far as the block can be answered at all.
    pub async fn handle_unframeable(
        &self,
        head: &[u8],
        source: SocketAddr,
        why: &'static str,
        transport: Transport,
    ) -> Option<Outgoing> {
        let how = How {
            fault: Some(why),
            ..How::plain(transport)
        };
        self.handle_as(head, source, how).await
    }

    /// Answers a retransmitted INVITE (one being routed, or answered) from the transaction
    /// table and nothing else: a new INVITE is dropped, counted as overloaded. For when no
    /// more INVITEs may wait on Redis; never waits on Redis itself.
    pub async fn handle_known(&self, packet: &[u8], source: SocketAddr) -> Option<Outgoing> {
        let how = How {
            known_only: true,
            ..How::plain(Transport::Udp)
        };
        self.handle_as(packet, source, how).await
    }

    /// Whether the router last found Redis reachable.
    pub fn redis_ok(&self) -> bool {
        self.router.redis_ok()
    }

    /// [`SipService::handle`] for a stream request read while a new INVITE cannot be
    /// routed now (`why`): it is answered 503 at once instead of waiting its turn to wait
    /// out the routing deadline, so the stream behind it (ACKs, CANCELs, OPTIONS) is read on.
    pub async fn handle_refusing(
        &self,
        packet: &[u8],
        source: SocketAddr,
        why: Refuse,
    ) -> Option<Outgoing> {
        let how = How {
            refuse_new: Some(why),
            ..How::plain(Transport::Tcp)
        };
        self.handle_as(packet, source, how).await
    }

    async fn handle_as(&self, packet: &[u8], source: SocketAddr, how: How<'_>) -> Option<Outgoing> {
        match message::parse(packet) {
            Err(ParseError::NotUtf8) => {
                let utf8 = message::latin1_as_utf8(packet)?;
                let parsed = message::parse(&utf8);
                // A provisional answer to such a request goes out as Latin-1 too.
                let latin1 = how.early.map(|inner| Latin1 { inner });
                let how = How {
                    early: latin1.as_ref().map(|e| e as &dyn Early),
                    ..how
                };
                let mut out = self.answer(parsed, &utf8, source, how).await?;
                out.bytes = message::utf8_as_latin1(&out.bytes);
                Some(out)
            }
            parsed => self.answer(parsed, packet, source, how).await,
        }
    }

    async fn answer(
        &self,
        parsed: Result<Request<'_>, ParseError>,
        packet: &[u8],
        source: SocketAddr,
        how: How<'_>,
    ) -> Option<Outgoing> {
        let How {
            transport,
            known_only,
            refuse_new,
            fault,
            early,
            cancel_grace,
        } = how;
        let req = match parsed {
            Ok(r) => r,
            Err(ParseError::Response) => return self.drop_packet("response"),
            Err(ParseError::Garbage(_) | ParseError::NotUtf8) => {
                return self.drop_packet("garbage")
            }
        };
        // Without a Via there is nowhere to send an answer (RFC 3261 §18.2.2).
        let Some(via) = req.top_via() else {
            return self.drop_packet("no_via");
        };
        // Over UDP without `rport` the answer goes to the Via's port: 0 is nowhere (the
        // kernel refuses it), as good as no Via. `rport` answers go to the source; TCP ones
        // on the request's connection, or should it close first, on a new one to the
        // source's address and the Via's port (RFC 3261 §18.2.2).
        if transport == Transport::Udp && !via.rport && via.port == Some(0) {
            return self.drop_packet("no_via");
        }
        let to = match (transport, via.rport) {
            (Transport::Udp, true) => source,
            (Transport::Tcp, _) => {
                // The source's own address, scope id included (a link-local IPv6 peer's
                // connection needs its interface), but an IPv4 peer of a dual-stack
                // socket as itself.
                let mut to = match source.ip() {
                    std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                        SocketAddr::new(source.ip().to_canonical(), 0)
                    }
                    _ => source,
                };
                to.set_port(via.port.unwrap_or(5060));
                to
            }
            // The source's own address, scope id included: a link-local IPv6 peer's answer
            // needs its interface.
            (Transport::Udp, false) => {
                let mut to = source;
                to.set_port(via.port.unwrap_or(5060));
                to
            }
        };
        // On a dual-stack socket an IPv4 peer is `::ffff:a.b.c.d`; its Via gets
        // `received=a.b.c.d` (the answer still goes out through the socket's own family).
        let source = SocketAddr::new(source.ip().to_canonical(), source.port());
        let method = method_label(req.method);
        let key = self.compact_key(transaction_key(&req, &via));

        if req.method == "ACK" {
            // ACKs are never answered; one this server would refuse as a request changes
            // nothing either: an ACK from outside the ACL must not cut a transaction short.
            if !self.trusts(source.ip()) {
                return self.drop_packet("untrusted_ack");
            }
            if !req.version.eq_ignore_ascii_case("SIP/2.0")
                || fault.is_some()
                || malformed(&req, packet, transport).is_some()
            {
                return self.drop_packet("malformed_ack");
            }
            // The ACK for our final answer ends the transaction.
            self.transactions.ack(&key);
            self.metrics
                .sip_requests
                .with_label_values(&["ACK", "none"])
                .inc();
            return None;
        }

        // Answers not remembered get a To-tag derived from their transaction, so a
        // retransmission gets the same tag (RFC 3261 §8.2.6.2) without keeping state.
        let tag = || self.tag_for(&key, req.method);
        let (resp, tag) = if !self.trusts(source.ip()) {
            (
                Response::new(403, "Forbidden").warning("source address is not trusted"),
                tag(),
            )
        } else if !req.version.eq_ignore_ascii_case("SIP/2.0") {
            // Checked before the headers: another version's rules for them may differ.
            (
                Response::new(505, "Version Not Supported")
                    .warning(&format!("{} is not supported; SIP/2.0 is", req.version)),
                tag(),
            )
        } else if fault == Some(super::server::TOO_LARGE) {
            // RFC 3261 §21.5.14: the length, not the syntax, is what cannot be taken.
            (
                Response::new(513, "Message Too Large").warning(super::server::TOO_LARGE),
                tag(),
            )
        } else if let Some(problem) = fault
            .map(str::to_string)
            .or_else(|| malformed(&req, packet, transport))
        {
            (Response::new(400, "Bad Request").warning(&problem), tag())
        } else {
            match req.method {
                "INVITE" if known_only && self.transactions.peek(&key).is_none() => {
                    return self.drop_packet("overloaded");
                }
                "INVITE" if refuse_new.is_some() && self.transactions.peek(&key).is_none() => {
                    let warning = match refuse_new {
                        Some(Refuse::Overloaded) => {
                            self.note_dropped("overloaded");
                            "too many calls being routed at once (sip.max_pending_invites)"
                        }
                        _ => {
                            self.metrics
                                .routes
                                .with_label_values(&["redis_error"])
                                .inc();
                            "routing store unreachable"
                        }
                    };
                    (
                        Response::new(503, "Service Unavailable")
                            .header("Retry-After", self.retry_after.clone())
                            .warning(warning),
                        tag(),
                    )
                }
                "INVITE" => return self.invite(&req, &key, source, to, early, transport).await,
                "OPTIONS" => match unsupported_requirements(&req) {
                    Some(unsupported) => (
                        Response::new(420, "Bad Extension")
                            .header("Unsupported", unsupported)
                            .warning("required extension not supported by the router"),
                        tag(),
                    ),
                    // The answer an INVITE would get (RFC 3261 §11.2): with the routing store
                    // out of reach that is 503, so an edge probing with OPTIONS (Kamailio's
                    // dispatcher, say) sends its calls to another controller meanwhile.
                    None if !self.router.redis_ok() => (
                        Response::new(503, "Service Unavailable")
                            .header("Retry-After", self.retry_after.clone())
                            .warning("routing store unreachable"),
                        tag(),
                    ),
                    None => (
                        Response::new(200, "OK")
                            .header("Allow", ALLOW)
                            .header("Accept", "application/sdp"),
                        tag(),
                    ),
                },
                // The INVITE already has its final answer; the CANCEL changes nothing. Its 200
                // carries the INVITE answer's To-tag; a CANCEL matching no INVITE we answered
                // gets 481 (RFC 3261 §9.2).
                "CANCEL" => match self.transactions.cancel_within(&key, cancel_grace).await {
                    Cancel::Answered(a) => (Response::new(200, "OK"), a.to_tag.clone()),
                    // Still being routed: it will be answered 487 (RFC 3261 §9.2).
                    Cancel::Pending => (Response::new(200, "OK"), self.tag_for(&key, "INVITE")),
                    Cancel::Unknown => (
                        Response::new(481, "Call/Transaction Does Not Exist")
                            .warning("no INVITE with this branch is known here"),
                        tag(),
                    ),
                },
                _ => (
                    Response::new(405, "Method Not Allowed")
                        .header("Allow", ALLOW)
                        .warning("a conference router only redirects INVITEs"),
                    tag(),
                ),
            }
        };
        self.count(method, resp.code);
        Some(Outgoing {
            bytes: response::build(&req, &resp, &tag, source),
            to,
            resend: None,
        })
    }

    /// A transaction key as kept in the table: long keys (a long branch, or a pre-RFC 3261
    /// key made of Call-ID and Via) become a 128-bit keyed digest, so an entry costs the
    /// same few hundred bytes whatever the sender puts in its headers.
    fn compact_key(&self, key: String) -> String {
        use std::hash::BuildHasher;
        if key.len() <= MAX_KEY {
            return key;
        }
        format!(
            "#{:016x}{:016x}",
            self.tag_keys.hash_one((&key, 1u8)),
            self.tag_keys.hash_one((&key, 2u8))
        )
    }

    /// The To-tag for an answer to the request of transaction `key`: the same for every
    /// retransmission, unguessable across processes (the hasher's keys are random).
    fn tag_for(&self, key: &str, method: &str) -> String {
        use std::hash::BuildHasher;
        format!("{:016x}", self.tag_keys.hash_one((key, method)))
    }

    fn count(&self, method: &str, code: u16) {
        self.metrics
            .sip_requests
            .with_label_values(&[method, code_label(code)])
            .inc();
    }

    async fn invite(
        &self,
        req: &Request<'_>,
        key: &str,
        source: SocketAddr,
        to: SocketAddr,
        early: Option<&dyn Early>,
        transport: Transport,
    ) -> Option<Outgoing> {
        let cancel = match self.transactions.begin(key.to_string()) {
            Begin::Answered(answer) => {
                self.metrics.sip_retransmissions.inc();
                return Some(Outgoing {
                    bytes: rebuild(req, &answer, source),
                    to,
                    resend: None,
                });
            }
            // Still being routed (Redis is slow): 100 Trying stops the sender's
            // retransmissions while it waits (RFC 3261 §17.2.1).
            Begin::Pending => {
                self.metrics.sip_retransmissions.inc();
                self.count("INVITE", 100);
                return Some(Outgoing {
                    bytes: response::build(req, &Response::new(100, "Trying"), "", source),
                    to,
                    resend: None,
                });
            }
            Begin::New(cancel) => cancel,
        };
        let to_tag = self.tag_for(key, "INVITE");
        let answer = match early {
            None => self.answer_invite(req, to_tag).await,
            Some(early) => {
                let routed = self.answer_invite(req, to_tag.clone());
                tokio::pin!(routed);
                let cancelled = async {
                    match &cancel {
                        Some(c) => c.notified().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::pin!(cancelled);
                let trying = tokio::time::sleep(TRYING_AFTER);
                tokio::pin!(trying);
                // A 100 stops the sender's retransmissions (RFC 3261 §17.1.1.2): over UDP,
                // only a transaction the table holds may be sent one, since only such a
                // transaction's final answer is resent until its ACK. One the full table
                // could not hold is left to retransmit, each copy routed and answered again.
                let mut tried = cancel.is_none() && transport == Transport::Udp;
                loop {
                    tokio::select! {
                        biased;
                        a = &mut routed => break a,
                        // Answered 487 now (RFC 3261 §9.2): `complete` turns any answer of
                        // a cancelled transaction into that. The routing is dropped; a
                        // claim it made meanwhile is released as unused by its node.
                        () = &mut cancelled => break Answer {
                            response: Response::new(487, "Request Terminated"),
                            to_tag,
                        },
                        () = &mut trying, if !tried => {
                            tried = true;
                            let trying = Response::new(100, "Trying");
                            let sent = early
                                .send(Outgoing {
                                    bytes: response::build(req, &trying, "", source),
                                    to,
                                    resend: None,
                                })
                                .await;
                            if sent {
                                self.transactions.provisional(key);
                                self.count("INVITE", 100);
                            }
                        }
                    }
                }
            }
        };
        let completed = self.transactions.complete(key, answer);
        self.count("INVITE", completed.answer.response.code);
        let bytes = rebuild(req, &completed.answer, source);
        Some(Outgoing {
            bytes,
            to,
            // A stream delivers the answer or fails the connection: nothing to resend.
            resend: completed.resend.filter(|_| transport == Transport::Udp),
        })
    }

    /// `to_tag` is derived from the transaction, so even an answer the table had no room
    /// to remember carries the same tag when a retransmission is answered again.
    async fn answer_invite(&self, req: &Request<'_>, to_tag: String) -> Answer {
        let finish = |response: Response| Answer { response, to_tag };
        if let Some(max) = req.header("Max-Forwards") {
            // 1*DIGIT: `00` is 0 too.
            if parse_digits::<u32>(max.trim()) == Some(0) {
                return finish(
                    Response::new(483, "Too Many Hops").warning("Max-Forwards reached 0"),
                );
            }
        }
        // A To-tag means a request inside a dialog (RFC 3261 §12.2.2), and this server is
        // party to none: a re-INVITE routed here must not be redirected elsewhere mid-call.
        if req.header("To").is_some_and(response::has_to_tag) {
            return finish(
                Response::new(481, "Call/Transaction Does Not Exist").warning(
                    "the router holds no dialogs; route in-dialog requests by Record-Route",
                ),
            );
        }
        if let Some(unsupported) = unsupported_requirements(req) {
            return finish(
                Response::new(420, "Bad Extension")
                    .header("Unsupported", unsupported)
                    .warning("required extension not supported by the router"),
            );
        }
        let name = match self.target(req) {
            Target::Name(n) => n,
            Target::Reject(resp) => return finish(resp),
        };
        let resp = match self.router.route(&name, "sip").await {
            Ok(d) => Response::new(302, "Moved Temporarily")
                .header("Contact", contact(&d.sip_uri, name.as_str()))
                .header(self.header_conference.clone(), name.to_string())
                .header(self.header_node.clone(), d.node_id.to_string()),
            Err(RouteError::NoCapacity) => Response::new(503, "Service Unavailable")
                .header("Retry-After", self.retry_after.clone())
                .warning("no conference node is taking new conferences with room to spare (each is full, draining or without its Asterisk)"),
            Err(RouteError::Unavailable(why)) => {
                if let Some(n) = self.failures.note() {
                    tracing::warn!(conference = %name, error = %why, failed = n, "routing failed; answering 503 (one line per 10 s: `failed` counts the calls since the last)");
                }
                Response::new(503, "Service Unavailable")
                    .header("Retry-After", self.retry_after.clone())
                    .warning("routing store unavailable")
            }
        };
        finish(resp)
    }

    fn target(&self, req: &Request<'_>) -> Target {
        let reject_name = |e: NameError| {
            self.router.record_invalid();
            Target::Reject(Response::new(404, "Not Found").warning(&e.to_string()))
        };
        if !self.conference_header.is_empty() {
            let mut values = req.headers_named(&self.conference_header).map(str::trim);
            if let Some(v) = values.next() {
                // Present but empty (an edge's variable that was not set): as incomplete an
                // address as an empty user part, and not to be read past to the URI, which
                // may name something else.
                if v.is_empty() {
                    self.router.record_invalid();
                    return Target::Reject(
                        Response::new(484, "Address Incomplete")
                            .warning(&format!("the {} header is empty", self.conference_header)),
                    );
                }
                // Two headers naming different conferences leave the call's room a guess
                // (an edge adding its own beside the caller's): refused, not first-wins.
                if values.any(|other| other != v) {
                    self.router.record_invalid();
                    return Target::Reject(Response::new(400, "Bad Request").warning(&format!(
                        "{} headers name different conferences",
                        self.conference_header
                    )));
                }
                return match ConferenceName::parse(v) {
                    Ok(n) => Target::Name(n),
                    Err(e) => reject_name(e),
                };
            }
        }
        let uri = match parse_sip_uri(req.uri) {
            Ok(u) => u,
            Err(UriError::Scheme(s)) => {
                self.router.record_invalid();
                return Target::Reject(
                    Response::new(416, "Unsupported URI Scheme")
                        .warning(&format!("scheme `{s}` is not sip or sips")),
                );
            }
            Err(UriError::Malformed(why)) => {
                self.router.record_invalid();
                return Target::Reject(
                    Response::new(400, "Bad Request")
                        .warning(&format!("Request-URI is malformed: {why}")),
                );
            }
        };
        // A telephone-subscriber user part carries parameters after the number
        // (`+15555550101;npdi;rn=+15555550000`, RFC 3966): the number names the conference.
        // Any other user part is a name as it stands (`sales;x` is refused, not `sales`);
        // parameters with no number before them leave the address incomplete.
        // The number is told as decoded (`%2B1555…` is `+1555…`); the split is on the literal
        // `;`, which an escaped `%3B` is not.
        let user = uri.user.map(|u| match u.split_once(';') {
            Some((number, _))
                if number.is_empty()
                    || percent_decode(number).is_some_and(|n| is_phone_number(&n)) =>
            {
                number
            }
            _ => u,
        });
        let Some(user) = user.filter(|u| !u.is_empty()) else {
            self.router.record_invalid();
            return Target::Reject(
                Response::new(484, "Address Incomplete")
                    .warning("the Request-URI has no user part to name the conference"),
            );
        };
        let Some(decoded) = percent_decode(user) else {
            self.router.record_invalid();
            return Target::Reject(
                Response::new(404, "Not Found").warning("broken %-escape in the user part"),
            );
        };
        match ConferenceName::parse(&decoded) {
            Ok(n) => Target::Name(n),
            Err(e) => reject_name(e),
        }
    }
}

/// `<sip:NAME@host:port;params>` from the node's registered URI (any user part replaced).
pub fn contact(node_uri: &str, name: &str) -> String {
    let (scheme, rest) = match node_uri.split_once(':') {
        Some((s, r)) if s.eq_ignore_ascii_case("sip") || s.eq_ignore_ascii_case("sips") => (s, r),
        _ => ("sip", node_uri),
    };
    let hostpart = match rest.rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    format!("<{scheme}:{name}@{hostpart}>")
}

fn rebuild(req: &Request<'_>, answer: &Answer, source: SocketAddr) -> Vec<u8> {
    response::build(req, &answer.response, &answer.to_tag, source)
}

/// RFC 3261 §17.2.3: branch + sent-by identify a server transaction (ACK matches its INVITE).
/// Pre-RFC 3261 branches, and a bare magic cookie, fall back to Call-ID, CSeq number, the
/// top Via, the Request-URI and the From tag.
///
/// The Call-ID and CSeq number are part of every key, though the RFC's match needs only the
/// branch: a client that reuses a branch for another call (a weak generator, phones behind
/// one NAT address) would otherwise be sent the other call's answer, into another
/// conference. Its ACK, CANCEL and retransmissions carry the same two values.
fn transaction_key(req: &Request<'_>, via: &message::Via<'_>) -> String {
    match via.branch {
        Some(b) if b.len() > "z9hG4bK".len() && b.starts_with("z9hG4bK") => format!(
            "{b}|{}:{}|{}|{}",
            via.host.to_ascii_lowercase(),
            via.port.unwrap_or(5060),
            req.header("Call-ID").unwrap_or(""),
            req.cseq().map(|c| c.0).unwrap_or(0),
        ),
        // The top Via value only: a CANCEL or ACK carries that one alone (RFC 3261 §9.1,
        // §17.1.1.3), while the INVITE's first Via header may hold the whole path. With
        // §17.2.3's Request-URI and From tag, which the ACK and CANCEL repeat: copies of one
        // INVITE a stateless proxy forked to two conferences are two transactions. (Not the
        // To tag: the ACK of a 3xx carries this server's.)
        _ => format!(
            "{}|{}|{}|{}|{}",
            req.header("Call-ID").unwrap_or(""),
            req.cseq().map(|c| c.0).unwrap_or(0),
            req.header("Via")
                .map(message::split_first_value)
                .unwrap_or(""),
            req.uri,
            req.header("From").and_then(response::to_tag).unwrap_or(""),
        ),
    }
}

/// Whether a From or To value holds a URI (`scheme:...`), as a name-addr (`"Name" <uri>`,
/// the display name's quotes and escapes skipped) or an addr-spec before its parameters.
fn holds_uri(value: &str) -> bool {
    let scheme_first = |uri: &str| uri.trim().find(':').is_some_and(|c| c > 0);
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in value.char_indices() {
        if quoted {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => quoted = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            '<' => {
                let inner = &value[i + 1..];
                return inner
                    .find('>')
                    .is_some_and(|end| scheme_first(&inner[..end]));
            }
            _ => {}
        }
    }
    !quoted && value.split(';').next().is_some_and(scheme_first)
}

/// What makes a request unanswerable as asked; `None` when it is well-formed.
fn malformed(req: &Request<'_>, packet: &[u8], transport: Transport) -> Option<String> {
    if let Some(defect) = req.defect {
        return Some(defect.into());
    }
    // RFC 3261 §25.1: every Request-URI is `scheme:...`.
    if !req.uri.contains(':') {
        return Some("Request-URI has no scheme".into());
    }
    for name in ["From", "To", "Call-ID", "CSeq"] {
        match req.count(name) {
            0 => return Some(format!("missing {name} header")),
            1 => {}
            _ => return Some(format!("more than one {name} header")),
        }
    }
    // Echoed into the answer as they came (§8.2.6.2): a From or To without a URI (empty, or
    // a bare word) would make an answer no client matches, and an empty Call-ID tells no
    // call from another (§8.1.1.4).
    if req.header("Call-ID").is_some_and(|v| v.trim().is_empty()) {
        return Some("the Call-ID header is empty".into());
    }
    for name in ["From", "To"] {
        if !req.header(name).is_some_and(holds_uri) {
            return Some(format!("the {name} header holds no URI"));
        }
    }
    // Single-valued too: two lengths are the classic way to make two parsers cut a stream
    // differently, and two hop counts leave the loop check to whichever one is read.
    for name in ["Content-Length", "Max-Forwards"] {
        if req.count(name) > 1 {
            return Some(format!("more than one {name} header"));
        }
    }
    // An answer would add its own tag beside the empty one: two tags, which no dialog
    // matches.
    if req
        .header("To")
        .and_then(response::to_tag)
        .is_some_and(str::is_empty)
    {
        return Some("the To tag parameter has no value".into());
    }
    match req.cseq() {
        // §8.1.1.5: a request's sequence number is below 2³¹.
        None if req.header("CSeq").is_some_and(|v| {
            v.split_whitespace()
                .next()
                .and_then(parse_digits::<u64>)
                .is_some_and(|n| n >= 1 << 31)
        }) =>
        {
            return Some("CSeq number is 2^31 or more (RFC 3261 §8.1.1.5)".into())
        }
        None => return Some("CSeq is not `number METHOD`".into()),
        Some((_, m)) if m != req.method => {
            return Some(format!("CSeq method {m} does not match {}", req.method))
        }
        _ => {}
    }
    match req.content_length() {
        Err(e) => return Some(e.into()),
        Ok(Some(len)) if len > req.body.len() => {
            return Some(format!(
                "Content-Length {len} exceeds the {} body bytes received",
                req.body.len()
            ))
        }
        Ok(_) => {}
    }
    if transport == Transport::Udp && packet.len() > u16::MAX as usize {
        return Some("datagram too large".into());
    }
    if let Some(v) = req.header("Max-Forwards") {
        if parse_digits::<u8>(v.trim()).is_none() {
            return Some("Max-Forwards is not a number 0-255".into());
        }
    }
    None
}

/// Whether `s` is the number of a telephone-subscriber (RFC 3966): an optional `+`, then
/// digits, `*`, `#` and the visual separators `-.()`, with at least one digit.
fn is_phone_number(s: &str) -> bool {
    let digits = s.strip_prefix('+').unwrap_or(s);
    digits.bytes().any(|b| b.is_ascii_digit())
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'*' | b'#' | b'-' | b'.' | b'(' | b')'))
}

/// Option tags in `Require` this server does not support (it supports none).
/// Option tags a redirect server meets by what it is: `100rel` (RFC 3262 §3: a `100` is never
/// sent reliably, and this server sends no other provisional answer) and `timer` (RFC 4028:
/// session timers bind 2xx answers, and this server sends none). Carriers' SBCs require them
/// of every INVITE; a 420 would make them retry without, or fail the call.
fn honoured(tag: &str) -> bool {
    tag.eq_ignore_ascii_case("100rel") || tag.eq_ignore_ascii_case("timer")
}

fn unsupported_requirements(req: &Request<'_>) -> Option<String> {
    let mut tags: Vec<&str> = Vec::new();
    let mut len = 0;
    for tag in req
        .headers_named("Require")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !honoured(t))
    {
        // The list is kept with the transaction for 32 s and resent with each answer: a
        // request repeating or piling up tags must not make either grow past a few. The
        // first tag is always named, cut to the bound: no real option tag is that long.
        if tags.is_empty() {
            let mut end = tag.len().min(UNSUPPORTED_MAX_BYTES);
            while !tag.is_char_boundary(end) {
                end -= 1;
            }
            tags.push(&tag[..end]);
            len = end;
            continue;
        }
        if tags.len() >= UNSUPPORTED_MAX_TAGS || len + 2 + tag.len() > UNSUPPORTED_MAX_BYTES {
            break;
        }
        if !tags.contains(&tag) {
            tags.push(tag);
            len += 2 + tag.len();
        }
    }
    (!tags.is_empty()).then(|| tags.join(", "))
}

/// Most option tags a 420's `Unsupported` names.
const UNSUPPORTED_MAX_TAGS: usize = 8;
/// Longest `Unsupported` value a 420 carries.
const UNSUPPORTED_MAX_BYTES: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_names_each_required_tag_once_and_stays_small() {
        let request = |require: &str| {
            format!(
                "INVITE sip:a@r SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
                 From: <sip:c@h>;tag=1\r\nTo: <sip:a@r>\r\nCall-ID: x\r\n\
                 CSeq: 1 INVITE\r\n{require}Content-Length: 0\r\n\r\n"
            )
        };
        let of = |require: &str| {
            let text = request(require);
            let req = super::super::message::parse(text.as_bytes()).expect("parses");
            unsupported_requirements(&req)
        };
        assert_eq!(of(""), None);
        assert_eq!(
            of("Require: foo, bar\r\nRequire: foo\r\n").as_deref(),
            Some("foo, bar")
        );
        assert_eq!(of("Require: 100rel, Timer\r\nRequire: 100REL\r\n"), None);
        assert_eq!(
            of("Require: 100rel, foo, timer\r\n").as_deref(),
            Some("foo")
        );
        let many = vec!["a"; 5000].join(",");
        assert_eq!(of(&format!("Require: {many}\r\n")).as_deref(), Some("a"));
        let distinct: Vec<String> = (0..2000).map(|i| format!("tag{i}")).collect();
        let listed = of(&format!("Require: {}\r\n", distinct.join(","))).expect("420");
        assert_eq!(listed.split(", ").count(), UNSUPPORTED_MAX_TAGS, "{listed}");
        let long = "x".repeat(10_000);
        let listed = of(&format!("Require: {long}, y\r\n")).expect("420");
        assert_eq!(
            listed.len(),
            UNSUPPORTED_MAX_BYTES,
            "the first tag is cut to the bound"
        );
    }

    #[test]
    fn phone_numbers_are_told_from_names() {
        for number in [
            "+15555550101",
            "5550101",
            "+1-555-(555)-0101",
            "*21#",
            "1.2",
        ] {
            assert!(is_phone_number(number), "{number}");
        }
        for name in ["sales", "", "+", "-", "room-1a", "+1x", "a1"] {
            assert!(!is_phone_number(name), "{name}");
        }
    }

    #[test]
    fn contact_from_node_uri() {
        assert_eq!(
            contact("sip:10.0.0.5:5060;transport=udp", "sales-42"),
            "<sip:sales-42@10.0.0.5:5060;transport=udp>"
        );
        assert_eq!(
            contact("sips:old@node.example:5061", "+15555550101"),
            "<sips:+15555550101@node.example:5061>"
        );
        assert_eq!(contact("node.example", "r"), "<sip:r@node.example>");
    }

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(method_label("INVITE"), "INVITE");
        assert_eq!(method_label("FOO"), "other");
        assert_eq!(method_label("invite"), "other");
    }
}
