//! The SIP side of the controller: TCP framing, the request parser and its accessors, URI
//! and escape decoding, response building, and the full handler decision.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use confroute_controller::config::{SipConfig, Transport};
use confroute_controller::metrics::Metrics;
use confroute_controller::router::Router;
use confroute_controller::sip::handler::SipService;
use confroute_controller::sip::message::{
    self, header_end, parse_sip_uri, percent_decode, ParseError, Request, UriError,
    DEFAULT_MAX_MESSAGE,
};
use confroute_controller::sip::response::{self, has_to_tag, Response, ALLOW};
use confroute_controller::sip::server::{next_frame, Frame};
use confroute_shared::config::RedisConfig;
use confroute_shared::name::ConferenceName;
use confroute_shared::store::{Store, StoreMetrics};

/// Where the handler's answers would go; documentation addresses, never contacted.
const SOURCES: [&str; 2] = ["192.0.2.10:5070", "[2001:db8::7]:5080"];

/// Every status the handler may send when Redis cannot be reached.
const HANDLER_CODES: [u16; 13] = [
    200, 400, 403, 404, 405, 416, 420, 481, 483, 484, 503, 505, 513,
];

/// Frames, parses and answers the input as a SIP packet, asserting what must hold.
pub fn sip_message(data: &[u8]) {
    framing(data, DEFAULT_MAX_MESSAGE);
    framing(data, 256);
    match message::parse(data) {
        Ok(req) => {
            request(&req, data);
            for source in SOURCES {
                let source: SocketAddr = source.parse().expect("literal address");
                responses(&req, source);
            }
        }
        Err(ParseError::Response) => {
            assert!(
                data.starts_with(b"SIP/2.0 "),
                "only responses are reported as such"
            );
        }
        Err(ParseError::Garbage(why)) => assert!(!why.is_empty()),
        Err(ParseError::NotUtf8) => {
            // Read again as Latin-1, it parses like any other block (or is garbage).
            let utf8 = message::latin1_as_utf8(data).expect("a header block that is not UTF-8");
            assert!(!matches!(message::parse(&utf8), Err(ParseError::NotUtf8)));
        }
    }
    handler(data);
}

/// `next_frame` as the TCP reader uses it: every frame is well formed, the reader always
/// moves forward, and the framer and the parser agree on where a message ends.
fn framing(data: &[u8], max: usize) {
    let mut rest = data;
    // Each step consumes at least one byte, so this bounds the loop.
    for _ in 0..=data.len() {
        match next_frame(rest, max) {
            Frame::Incomplete => {
                assert!(rest.len() <= max, "incomplete beyond the size limit");
                return;
            }
            Frame::Body(total) => {
                assert!(
                    rest.len() < total && total <= max,
                    "a body awaited past the data or the size limit"
                );
                return;
            }
            Frame::Broken(why) => {
                assert!(!why.is_empty());
                return;
            }
            Frame::Refused { head, why } => {
                assert!(!why.is_empty());
                assert_eq!(
                    header_end(rest),
                    Some(head),
                    "refused at its header block's end"
                );
                return;
            }
            Frame::Ping(n) => {
                assert_eq!(n, 4);
                assert!(rest.starts_with(b"\r\n\r\n"));
                rest = &rest[n..];
            }
            Frame::Skip(n) => {
                assert!(n > 0 && n <= rest.len(), "skip of {n} in {}", rest.len());
                assert!(rest[..n].iter().all(|b| matches!(b, b'\r' | b'\n')));
                rest = &rest[n..];
            }
            Frame::Message(n) => {
                assert!(n > 0 && n <= rest.len() && n <= max, "message of {n}");
                let msg = &rest[..n];
                let end = header_end(msg).expect("a framed message has a header block");
                assert!(end <= n);
                assert!(!matches!(msg[0], b'\r' | b'\n'));
                assert_eq!(
                    next_frame(msg, max),
                    Frame::Message(n),
                    "framing is prefix-stable"
                );
                if let Ok(req) = message::parse(msg) {
                    // The framer cut the body by the Content-Length the handler will see.
                    let body = n - end;
                    match req.content_length() {
                        Ok(len) => assert_eq!(
                            len.unwrap_or(0),
                            body,
                            "framer and parser disagree on Content-Length"
                        ),
                        Err(e) => panic!("framed a message whose Content-Length is bad: {e}"),
                    }
                }
                rest = &rest[n..];
            }
        }
    }
    panic!("the framer made no progress");
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
}

/// What a parsed request and its accessors must look like.
fn request(req: &Request<'_>, data: &[u8]) {
    assert!(is_token(req.method), "method {:?}", req.method);
    assert!(!req.uri.is_empty() && !req.uri.contains(' '));
    let (name, numbers) = req.version.split_at(4);
    assert!(
        name.eq_ignore_ascii_case("SIP/"),
        "version {:?}",
        req.version
    );
    let (major, minor) = numbers.split_once('.').expect("SIP/x.y");
    for n in [major, minor] {
        assert!(!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    }
    let end = header_end(data).expect("a parsed request has a header block");
    assert_eq!(req.body, &data[end..]);
    for h in &req.headers {
        assert!(is_token(&h.name), "header name {:?}", h.name);
        assert_eq!(h.value.trim(), h.value, "header values are trimmed");
        assert!(
            !h.value.contains(['\r', '\n', '\0']),
            "a header value holds a line end"
        );
    }
    if let Some(via) = req.top_via() {
        assert!(is_token(via.transport));
        assert!(via.branch.is_none_or(|b| !b.is_empty()));
    }
    if let Some((_, method)) = req.cseq() {
        assert!(!method.is_empty() && !method.contains(char::is_whitespace));
    }
    match (req.header("Content-Length"), req.content_length()) {
        (None, Ok(None)) | (Some(_), Ok(Some(_)) | Err(_)) => {}
        (h, r) => panic!("Content-Length {h:?} read as {r:?}"),
    }
    for uri in [Some(req.uri), req.header("To"), req.header("From")]
        .into_iter()
        .flatten()
    {
        sip_uri(uri);
    }
}

/// URI decoding: the scheme, the user part, and its `%XX` escapes (RFC 3261 §25.1).
fn sip_uri(uri: &str) {
    match parse_sip_uri(uri) {
        Ok(u) => {
            assert!(u.scheme.eq_ignore_ascii_case("sip") || u.scheme.eq_ignore_ascii_case("sips"));
            if let Some(user) = u.user {
                // `?` may be in a user (RFC 3261 §25.1 user-unreserved); `:` starts the password.
                assert!(!user.contains(':'), "user part {user:?}");
                escapes(user);
            }
        }
        Err(UriError::Scheme(s)) => assert!(s.chars().count() <= 16),
        Err(UriError::Malformed(why)) => assert!(!why.is_empty()),
    }
}

/// `%` must be followed by exactly two hex digits; decoding never grows the text.
fn escapes(s: &str) {
    let bytes = s.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || (bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    let decoded = percent_decode(s);
    assert_eq!(
        decoded.is_some(),
        well_formed,
        "percent_decode({s:?}) = {decoded:?}"
    );
    if let Some(d) = decoded {
        assert!(d.len() <= s.len());
        if !s.contains('%') {
            assert_eq!(d, s);
        }
        let _ = ConferenceName::parse(&d);
    }
}

/// Answers of every kind the handler builds, from this request, must be well-formed
/// responses that copy what RFC 3261 §8.2.6 says and nothing else.
fn responses(req: &Request<'_>, source: SocketAddr) {
    let answers = [
        Response::new(100, "Trying"),
        Response::new(200, "OK")
            .header("Allow", ALLOW)
            .header("Accept", "application/sdp"),
        Response::new(302, "Moved Temporarily")
            .header("Contact", "<sip:room@10.0.0.5:5060>")
            .header("X-Conference", "room")
            .header("X-Conference-Node", "node-a"),
        // The warning quotes text taken from the request.
        Response::new(400, "Bad Request").warning(req.uri),
        Response::new(503, "Service Unavailable").header("Retry-After", "5"),
    ];
    for resp in answers {
        for tag in ["0123456789abcdef", ""] {
            let bytes = response::build(req, &resp, tag, source);
            built_response(req, &bytes, resp.code, resp.reason);
            let text = std::str::from_utf8(&bytes).expect("responses are UTF-8");
            if let Some(to) = req.header("To") {
                let line = text
                    .split("\r\n")
                    .find(|l| l.starts_with("To: "))
                    .expect("To copied");
                if resp.code > 100 && !tag.is_empty() {
                    assert!(has_to_tag(&line[4..]), "no To-tag in {line:?}");
                } else {
                    assert_eq!(&line[4..], to);
                }
            }
        }
    }
}

/// `bytes` is one response to `req` with status `code`: it parses as a response, has
/// one header block ending the message, and carries the request's Vias (top one fixed).
fn built_response(req: &Request<'_>, bytes: &[u8], code: u16, reason: &str) {
    let text = std::str::from_utf8(bytes).expect("responses are UTF-8");
    assert!(
        text.starts_with(&format!("SIP/2.0 {code} {reason}\r\n")),
        "{text:?}"
    );
    assert_eq!(message::parse(bytes).err(), Some(ParseError::Response));
    assert_eq!(
        header_end(bytes),
        Some(bytes.len()),
        "the response must end at its only blank line: {text:?}"
    );
    // Re-read the header block under a request line: every line must be a header.
    let (_, headers) = text.split_once("\r\n").expect("start line");
    let as_request = format!("OPTIONS sip:check SIP/2.0\r\n{headers}");
    let reread = message::parse(as_request.as_bytes())
        .unwrap_or_else(|e| panic!("response headers do not parse ({e}): {text:?}"));
    assert_eq!(reread.count("Via"), req.count("Via"));
    for name in ["From", "Call-ID", "CSeq"] {
        assert_eq!(reread.header(name), req.header(name), "{name} copied");
    }
    assert_eq!(reread.header("Content-Length"), Some("0"));
    if let Some(via) = req.top_via() {
        let fixed = reread
            .top_via()
            .unwrap_or_else(|| panic!("top Via no longer parses: {text:?}"));
        assert_eq!(
            (fixed.transport, fixed.host, fixed.port, fixed.branch),
            (via.transport, via.host, via.port, via.branch),
            "top Via changed beyond received/rport: {text:?}"
        );
        assert_eq!(fixed.rport, via.rport);
    }
}

/// A handler whose store cannot connect, and one that trusts nobody's address.
struct Harness {
    runtime: tokio::runtime::Runtime,
    open: SipService,
    closed: SipService,
}

impl Harness {
    fn new() -> Harness {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let redis = RedisConfig {
            // A socket path that cannot exist: connecting fails at once, with no traffic.
            url: Some("redis+unix:///nonexistent/confroute-fuzz.sock".to_string()),
            ..RedisConfig::default()
        };
        let service = |sip: SipConfig| {
            let metrics = Metrics::new().expect("metrics");
            let store = Store::new(&redis, StoreMetrics::disabled()).expect("store");
            let router = Router::new(store, None, 4, Duration::from_millis(200), metrics.clone());
            SipService::new(&sip, Arc::new(router), metrics)
        };
        // A small table: the fuzzer sends millions of distinct transactions.
        let base = SipConfig {
            max_transactions: 256,
            ..SipConfig::default()
        };
        let closed = SipConfig {
            trusted_cidrs: vec!["198.51.100.0/24".parse().expect("literal CIDR")],
            ..base.clone()
        };
        Harness {
            open: service(base),
            closed: service(closed),
            runtime,
        }
    }
}

thread_local! {
    static HARNESS: Harness = Harness::new();
}

/// The whole handler over UDP and TCP: who gets an answer, where it goes, and that it is a
/// well-formed response with a status the handler may send. With Redis unreachable an
/// INVITE is never redirected (invariant 5: never a guess).
fn handler(data: &[u8]) {
    let parsed = message::parse(data).ok();
    let answerable = parsed
        .as_ref()
        .and_then(|r| r.top_via().map(|v| (r.method != "ACK", v.port, v.rport)));
    HARNESS.with(|h| {
        for source in SOURCES {
            let source: SocketAddr = source.parse().expect("literal address");
            for transport in [Transport::Udp, Transport::Tcp] {
                for (service, trusted) in [(&h.open, true), (&h.closed, false)] {
                    let out = h.runtime.block_on(service.handle(data, source, transport));
                    let Some((answers, via_port, rport)) = answerable else {
                        assert!(out.is_none(), "answered a packet without a request or Via");
                        continue;
                    };
                    let Some(out) = out else {
                        assert!(!answers, "no answer to a request with a Via");
                        continue;
                    };
                    assert!(answers, "answered an ACK");
                    let expected_to = match (transport, rport) {
                        (Transport::Udp, true) => source,
                        // Where a new connection goes should the request's close first.
                        (Transport::Tcp, _) => {
                            SocketAddr::new(source.ip().to_canonical(), via_port.unwrap_or(5060))
                        }
                        (Transport::Udp, false) => {
                            SocketAddr::new(source.ip(), via_port.unwrap_or(5060))
                        }
                    };
                    assert_eq!(out.to, expected_to);
                    let req = parsed.as_ref().expect("answerable implies parsed");
                    let text = std::str::from_utf8(&out.bytes).expect("UTF-8");
                    let code: u16 = text
                        .get(8..11)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or_else(|| panic!("no status code: {text:?}"));
                    assert!(HANDLER_CODES.contains(&code), "status {code}: {text:?}");
                    if !trusted {
                        assert_eq!(code, 403, "an untrusted source got {code}");
                    }
                    let reason = text.get(12..).and_then(|t| t.split("\r\n").next());
                    let reason = reason.unwrap_or("");
                    built_response(req, &out.bytes, code, reason);
                }
            }
        }
    });
}
