//! Building responses as RFC 3261 §8.2.6 requires: Via (all, in order), From, To (with a
//! To-tag added), Call-ID and CSeq copied from the request; `received`/`rport` on the top Via
//! (§18.2.1, RFC 3581).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::SocketAddr;

use super::message::{split_first_value, Request};

/// Product token sent in `Server`.
pub const SERVER: &str = concat!("confroute/", env!("CARGO_PKG_VERSION"));

/// Methods this server answers, for `Allow`.
pub const ALLOW: &str = "INVITE, ACK, CANCEL, OPTIONS";

/// A header name: a literal, or one taken from configuration.
pub type HeaderName = Cow<'static, str>;

/// A response about to be serialised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub code: u16,
    /// Reason phrase.
    pub reason: &'static str,
    /// Extra headers after the copied ones.
    pub extra: Vec<(HeaderName, String)>,
}

impl Response {
    /// A response with no extra headers.
    pub fn new(code: u16, reason: &'static str) -> Self {
        Response {
            code,
            reason,
            extra: Vec::new(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<HeaderName>, value: impl Into<String>) -> Self {
        self.extra.push((name.into(), value.into()));
        self
    }

    /// Adds `Warning: 399 confroute "text"` (RFC 3261 §20.43) saying why.
    pub fn warning(self, text: &str) -> Self {
        self.header("Warning", format!("399 confroute {}", quote(text)))
    }
}

/// A quoted-string with `"` and `\` escaped and control characters replaced.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// True when the To value already carries a `tag` parameter (outside the URI): `tag = token`
/// among the header parameters, read outside quoted strings (`;foo="a;tag=1"` has none).
pub fn has_to_tag(to: &str) -> bool {
    to_tag(to).is_some_and(|t| !t.is_empty())
}

/// The value of a To value's `tag` parameter: empty for a `tag` or `tag=` without one
/// (which RFC 3261's grammar does not allow), `None` without a tag parameter.
pub fn to_tag(to: &str) -> Option<&str> {
    // The header parameters follow the name-addr's `>` (a display name may hold one, so it
    // is found outside quotes), or, in the addr-spec form (or a `<` never closed), start at
    // the first `;`: a tag this server appends to such a value is then found again.
    let params = match name_addr_end(to) {
        Some(end) => &to[end..],
        None => to.find(';').map_or("", |i| &to[i..]),
    };
    header_params(params).find_map(|p| {
        // EQUAL may have spaces around it (RFC 3261 §25.1): `tag = x` is a tag.
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        k.trim().eq_ignore_ascii_case("tag").then(|| v.trim())
    })
}

/// The index just past the `>` closing a name-addr's URI, found outside quoted strings.
fn name_addr_end(v: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    let mut open = false;
    for (i, c) in v.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' if !open => quoted = !quoted,
            '<' if !quoted => open = true,
            '>' if open => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// The `;`-separated parameters of `params` (text that must start with `;`, after
/// whitespace), split outside quoted strings; text before the first `;` is none of them.
fn header_params(params: &str) -> impl Iterator<Item = &str> {
    // Lazily, without a list: this runs for the top Via of every answer.
    let mut rest = params.find(';').map(|i| &params[i + 1..]);
    std::iter::from_fn(move || {
        let text = rest?;
        let (mut quoted, mut escaped) = (false, false);
        for (i, c) in text.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                ';' if !quoted => {
                    rest = Some(&text[i + 1..]);
                    return Some(&text[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(text)
    })
}

/// Appends the top Via with `received` and `rport` filled in for a request from `source`.
///
/// Written straight into the response: this runs for every answer, and building the value
/// apart cost several allocations per call.
fn push_top_via(out: &mut String, value: &str, source: SocketAddr) {
    let top = split_first_value(value);
    // `top` is `value` trimmed up to its first top-level comma.
    let start = value.len() - value.trim_start().len();
    let rest = &value[start + top.len()..];
    // sent-by holds no quotes; the parameters may (a quoted `;` or `received` is a value).
    let (sent_by, params) = top.split_at(top.find(';').unwrap_or(top.len()));
    out.push_str(sent_by.trim_end());
    let mut had_rport = false;
    for part in header_params(params) {
        let p = part.trim();
        let key = p.split('=').next().unwrap_or("").trim();
        if key.eq_ignore_ascii_case("rport") {
            had_rport = true;
            let _ = write!(out, ";rport={}", source.port());
        } else if !key.eq_ignore_ascii_case("received") {
            out.push(';');
            out.push_str(p);
        }
    }
    let host = sent_by
        .split_whitespace()
        .nth(1)
        .map(|hp| {
            super::message::split_host_port(hp)
                .map(|(h, _)| h)
                .unwrap_or(hp)
        })
        .unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    // RFC 3261 §18.2.1: `received` when sent-by is a name or an address other than the
    // packet's source.
    let same_address = host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip == source.ip());
    if had_rport || !same_address {
        let _ = write!(out, ";received={}", source.ip());
    }
    out.push_str(rest);
}

/// Appends `name: value` and the line end.
fn push_header(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push_str(": ");
    out.push_str(value);
    out.push_str("\r\n");
}

/// Serialises `resp` as the answer to `req`, received from `source`.
pub fn build(req: &Request<'_>, resp: &Response, to_tag: &str, source: SocketAddr) -> Vec<u8> {
    let mut out = String::with_capacity(1024);
    let _ = write!(out, "SIP/2.0 {} {}\r\n", resp.code, resp.reason);
    let mut first_via = true;
    for h in &req.headers {
        let name: &str = &h.name;
        if name.eq_ignore_ascii_case("Via") {
            if first_via {
                out.push_str("Via: ");
                push_top_via(&mut out, &h.value, source);
                out.push_str("\r\n");
                first_via = false;
            } else {
                push_header(&mut out, "Via", &h.value);
            }
        }
    }
    if let Some(from) = req.header("From") {
        push_header(&mut out, "From", from);
    }
    if let Some(to) = req.header("To") {
        out.push_str("To: ");
        out.push_str(to);
        // A 100 Trying carries no tag; every other response of ours does (§8.2.6.2).
        // Not beside a tag parameter of the request's either, even an empty one (answered
        // 400): two tags would match no dialog.
        if resp.code > 100 && self::to_tag(to).is_none() && !to_tag.is_empty() {
            out.push_str(";tag=");
            out.push_str(to_tag);
        }
        out.push_str("\r\n");
    }
    if let Some(call_id) = req.header("Call-ID") {
        push_header(&mut out, "Call-ID", call_id);
    }
    if let Some(cseq) = req.header("CSeq") {
        push_header(&mut out, "CSeq", cseq);
    }
    // RFC 3261 §8.2.6.1: a 100 carries the request's Timestamp, for its round-trip time.
    if resp.code == 100 {
        if let Some(ts) = req.header("Timestamp") {
            push_header(&mut out, "Timestamp", ts);
        }
    }
    for (name, value) in &resp.extra {
        push_header(&mut out, name, value);
    }
    push_header(&mut out, "Server", SERVER);
    out.push_str("Content-Length: 0\r\n\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::parse;

    fn src(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn copies_headers_adds_tag_and_fixes_via() {
        let raw = "INVITE sip:room@router SIP/2.0\r\n\
            Via: SIP/2.0/UDP client.example:5070;branch=z9hG4bK1;rport\r\n\
            Via: SIP/2.0/UDP proxy:5060;branch=z9hG4bK0\r\n\
            From: <sip:a@b>;tag=f1\r\nTo: <sip:room@router>\r\n\
            Call-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let req = parse(raw.as_bytes()).expect("parse");
        let resp = Response::new(302, "Moved Temporarily")
            .header("Contact", "<sip:room@10.0.0.5:5060>")
            .warning("say \"why\"");
        let text =
            String::from_utf8(build(&req, &resp, "t1", src("192.0.2.7:40000"))).expect("utf8");
        assert!(text.starts_with("SIP/2.0 302 Moved Temporarily\r\n"));
        assert!(text.contains(
            "Via: SIP/2.0/UDP client.example:5070;branch=z9hG4bK1;rport=40000;received=192.0.2.7\r\nVia: SIP/2.0/UDP proxy:5060;branch=z9hG4bK0\r\n"
        ), "{text}");
        assert!(text.contains("To: <sip:room@router>;tag=t1\r\n"));
        assert!(text.contains("From: <sip:a@b>;tag=f1\r\n"));
        assert!(text.contains("Call-ID: c1\r\nCSeq: 1 INVITE\r\n"));
        assert!(text.contains("Warning: 399 confroute \"say \\\"why\\\"\"\r\n"));
        assert!(text.ends_with("Content-Length: 0\r\n\r\n"));
    }

    /// A quoted Via parameter value may hold `\"`, `,` and `;` (RFC 3261 §25.1
    /// quoted-string): the top Via still ends at the first comma outside quotes, and a
    /// quoted `;received=...` is part of a value, kept as sent.
    #[test]
    fn quoted_via_parameters_are_kept_whole() {
        let raw = "INVITE sip:room@router SIP/2.0\r\n\
            Via: SIP/2.0/UDP client.example;branch=z9hG4bK1;x=\"a\\\"b,c\";y=\"1;received=2\";rport, SIP/2.0/UDP proxy;branch=z9hG4bK0\r\n\
            From: <sip:a@b>;tag=f1\r\nTo: <sip:room@router>\r\n\
            Call-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let req = parse(raw.as_bytes()).expect("parse");
        let text = String::from_utf8(build(
            &req,
            &Response::new(302, "Moved Temporarily"),
            "t1",
            src("192.0.2.7:40000"),
        ))
        .expect("utf8");
        assert!(
            text.contains(
                "Via: SIP/2.0/UDP client.example;branch=z9hG4bK1;x=\"a\\\"b,c\";y=\"1;received=2\";rport=40000;received=192.0.2.7, SIP/2.0/UDP proxy;branch=z9hG4bK0\r\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn no_received_when_sent_by_matches_and_no_rport() {
        let raw = "OPTIONS sip:router SIP/2.0\r\nVia: SIP/2.0/UDP 10.1.1.1:5060;branch=z9hG4bK9\r\n\
            From: <sip:a@b>;tag=x\r\nTo: <sip:router>;tag=already\r\nCall-ID: c\r\nCSeq: 2 OPTIONS\r\n\r\n";
        let req = parse(raw.as_bytes()).expect("parse");
        let text = String::from_utf8(build(
            &req,
            &Response::new(200, "OK"),
            "t2",
            src("10.1.1.1:5060"),
        ))
        .expect("utf8");
        assert!(
            text.contains("Via: SIP/2.0/UDP 10.1.1.1:5060;branch=z9hG4bK9\r\n"),
            "{text}"
        );
        assert!(
            text.contains("To: <sip:router>;tag=already\r\n"),
            "existing tag kept: {text}"
        );
    }

    #[test]
    fn to_tag_detection() {
        assert!(has_to_tag("<sip:a@b>;tag=1"));
        assert!(has_to_tag("sip:a@b;TAG=1"));
        // EQUAL allows spaces around `=` (RFC 3261 §25.1).
        assert!(has_to_tag("<sip:r@h> ;tag = abc"));
        assert!(!has_to_tag("<sip:r@h>;tagx=1"));
        assert!(!has_to_tag("<sip:a@b;tag=inside-uri>"));
        assert!(!has_to_tag("\"x\" <sip:a@b>"));
        // A quoted parameter value is not a parameter list (found by a black-box probe).
        assert!(!has_to_tag("<sip:a@b>;foo=\"a;tag=1\""));
        assert!(has_to_tag("<sip:a@b>;foo=\"a;\\\"tag=1\";tag=2"));
        assert!(!has_to_tag("<sip:a@b>;foo=\"a;\\\"tag=1\""));
        // A display name may hold `>` and `;tag=`.
        assert!(!has_to_tag("\"a>;tag=b\" <sip:a@b>"));
        assert!(has_to_tag("\"a>;tag=b\" <sip:a@b>;tag=c"));
        // Malformed tags are none: the answer adds its own.
        assert!(!has_to_tag("<sip:a@b>tag=x"));
        assert!(!has_to_tag("<sip:a@b>;tag"));
        assert!(!has_to_tag("<sip:a@b>;tag="));
        assert!(has_to_tag("<sip:a@b;tag=x"));
    }
}
