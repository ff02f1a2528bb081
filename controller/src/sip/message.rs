//! SIP request parsing (RFC 3261 §7): start line, headers with compact forms and folding,
//! Via values, and the body by Content-Length.
//!
//! The parser borrows from the packet and allocates only to unfold continuation lines. It
//! accepts what RFC 3261 says a server must accept and reports what is wrong precisely, so
//! the caller can answer 400 with a reason whenever enough headers exist to answer at all.

use std::borrow::Cow;

/// Largest message accepted, in bytes (UDP datagram or TCP message).
pub const DEFAULT_MAX_MESSAGE: usize = 16 * 1024;

/// A parsed SIP request.
#[derive(Debug)]
pub struct Request<'a> {
    /// Method token, e.g. `INVITE` (case-sensitive, RFC 3261 §7.1).
    pub method: &'a str,
    /// Request-URI as written (its scheme is checked by the handler, which answers 400).
    pub uri: &'a str,
    /// Protocol version as written: `SIP/` and two numbers (the handler answers 505 to any
    /// but 2.0).
    pub version: &'a str,
    /// Headers in order, names in full form.
    pub headers: Vec<Header<'a>>,
    /// Message body (by Content-Length when present).
    pub body: &'a [u8],
    /// The first header line that could not be read (skipped); the request gets a 400
    /// naming it, which needs the other headers.
    pub defect: Option<&'static str>,
}

/// One header line (continuations joined).
#[derive(Debug, Clone)]
pub struct Header<'a> {
    /// Full header name as written, or the full form of a compact name.
    pub name: Cow<'a, str>,
    /// Value with surrounding whitespace trimmed and folded lines joined by one space.
    pub value: Cow<'a, str>,
}

/// Why a packet is not a usable request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a SIP request at all; nothing can be answered.
    #[error("not a SIP request: {0}")]
    Garbage(&'static str),
    /// A SIP response (a redirect server has no client transactions); dropped.
    #[error("a SIP response, not a request")]
    Response,
    /// The header block is not UTF-8 (read again as Latin-1 by [`latin1_as_utf8`]).
    #[error("header block is not UTF-8")]
    NotUtf8,
}

/// Full forms of the compact header names of RFC 3261 §7.3.3 and its extensions.
fn expand_compact(name: &str) -> Option<&'static str> {
    if name.len() != 1 {
        return None;
    }
    Some(match name.as_bytes()[0].to_ascii_lowercase() {
        b'v' => "Via",
        b'f' => "From",
        b't' => "To",
        b'i' => "Call-ID",
        b'm' => "Contact",
        b'l' => "Content-Length",
        b'c' => "Content-Type",
        b'e' => "Content-Encoding",
        b'k' => "Supported",
        b's' => "Subject",
        b'o' => "Event",
        b'r' => "Refer-To",
        b'b' => "Referred-By",
        b'u' => "Allow-Events",
        b'x' => "Session-Expires",
        b'a' => "Accept-Contact",
        b'j' => "Reject-Contact",
        b'd' => "Request-Disposition",
        b'y' => "Identity",
        _ => return None,
    })
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
                )
        })
}

/// True when a CR or LF in `head` is not part of a CRLF pair. One pass over the bytes: this
/// runs for every message.
fn has_bare_cr_or_lf(head: &[u8]) -> bool {
    let mut i = 0;
    while let Some(p) = head[i..].iter().position(|&b| b == b'\r' || b == b'\n') {
        let at = i + p;
        // A CRLF is skipped whole, so an LF met here has no CR before it.
        if head[at] == b'\n' || head.get(at + 1) != Some(&b'\n') {
            return true;
        }
        i = at + 2;
    }
    false
}

/// Where the header block ends: the index just past the blank line, if present.
///
/// Lines end in CRLF, or in a bare LF when the block has no CR at all: RFC 3261 asks for
/// CRLF, but many SIP stacks read LF-only messages too, and a block without any CR
/// splits into the same lines for every reader, so nothing can hide in it.
pub fn header_end(buf: &[u8]) -> Option<usize> {
    // An LF-only block ends before any CR: only the bytes up to the first CR (the end of
    // the start line, in a CRLF message) are looked at for it, so the usual case costs what
    // the CRLF search alone did.
    let first_cr = buf.iter().position(|&b| b == b'\r').unwrap_or(buf.len());
    if let Some(p) = buf[..first_cr].windows(2).position(|w| w == b"\n\n") {
        return Some(p + 2);
    }
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Whether `version` is `SIP/` and two numbers (any case), so a 505 can answer it.
fn is_sip_version(version: &str) -> bool {
    let number = |s: &str| (1..=9).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    version
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case("SIP/"))
        && version[4..]
            .split_once('.')
            .is_some_and(|(major, minor)| number(major) && number(minor))
}

/// Parses one request; the body is everything after the headers (the caller frames TCP
/// messages by Content-Length and checks it against UDP datagrams).
pub fn parse(buf: &[u8]) -> Result<Request<'_>, ParseError> {
    let end = header_end(buf).ok_or(ParseError::Garbage("no blank line ends the headers"))?;
    // [`header_end`] ends an LF-only block (one without any CR) at `\n\n`.
    let lf_only = buf[end - 2] == b'\n';
    let (head, eol) = if lf_only {
        (&buf[..end - 2], "\n")
    } else {
        (&buf[..end - 4], "\r\n")
    };
    let head = std::str::from_utf8(head).map_err(|_| ParseError::NotUtf8)?;
    // A CR or LF that does not end a line would end one for a laxer reader of our answer,
    // which copies the header it sits in: a value could smuggle a header (a second Contact)
    // into the 302. RFC 3261 §7.3.1 allows neither, so such a message is not SIP.
    if !lf_only && has_bare_cr_or_lf(head.as_bytes()) {
        return Err(ParseError::Garbage("a bare CR or LF in the headers"));
    }
    // No SIP header may hold one (RFC 3261 §25.1), and an answer copying it would hand
    // it on to readers that end strings there.
    if head.as_bytes().contains(&0) {
        return Err(ParseError::Garbage("a NUL byte in the headers"));
    }
    let mut lines = head.split(eol);
    let start = lines.next().ok_or(ParseError::Garbage("empty message"))?;
    if start.starts_with("SIP/2.0 ") {
        return Err(ParseError::Response);
    }
    // RFC 3261 §7.1 puts exactly one SP between the three parts. A line that breaks only
    // that (runs of spaces or tabs, a trailing space, whitespace inside the URI: RFC 4475
    // §3.1.2.8–10) is still a request, read by its first and last words, and is answered
    // 400 once its headers are known; otherwise its sender would retransmit for 32 s.
    let blank = |c: char| c == ' ' || c == '\t';
    let mut words = start.split(blank).filter(|w| !w.is_empty());
    let (Some(method), Some(version)) = (words.next(), words.clone().next_back()) else {
        return Err(ParseError::Garbage(
            "start line is not `METHOD URI SIP/2.0`",
        ));
    };
    // Three words at least (the URI may hold blanks), so the first and last differ.
    if words.count() < 2 {
        return Err(ParseError::Garbage(
            "start line is not `METHOD URI SIP/2.0`",
        ));
    }
    let mut defect = None;
    let inner = start.trim_matches(blank);
    let uri = inner[method.len()..inner.len() - version.len()].trim_matches(blank);
    let single = start.len() == method.len() + uri.len() + version.len() + 2
        && start.as_bytes()[method.len()] == b' '
        && start.as_bytes()[method.len() + 1 + uri.len()] == b' ';
    if !single {
        defect = Some(
            "the request line is not `METHOD SP Request-URI SP SIP-Version` with single spaces",
        );
    } else if uri.contains(blank) {
        defect = Some("the Request-URI holds whitespace");
    }
    if !is_token(method) {
        return Err(ParseError::Garbage("method is not a token"));
    }
    // Another SIP version is answered (505, by the handler); anything else in its place
    // means this is not SIP at all.
    if !is_sip_version(version) {
        return Err(ParseError::Garbage("version is not SIP/x.y"));
    }
    if uri.is_empty() {
        return Err(ParseError::Garbage("empty request-URI"));
    }
    let mut headers: Vec<Header<'_>> = Vec::with_capacity(16);
    // The last header line was skipped (no colon, or a name that is not a token): its
    // continuation lines are its own, not the header before it.
    let mut skipping = false;
    for line in lines {
        if line.starts_with(' ') || line.starts_with('\t') {
            if skipping {
                continue;
            }
            // Folded continuation (RFC 3261 §7.3.1): joined to the previous value.
            let Some(last) = headers.last_mut() else {
                return Err(ParseError::Garbage("continuation line before any header"));
            };
            // Appended in place: copying the whole value per line would make a message of
            // many short continuation lines cost quadratic time before it is even checked.
            let piece = line.trim();
            if !piece.is_empty() {
                let value = last.value.to_mut();
                if !value.is_empty() {
                    value.push(' ');
                }
                value.push_str(piece);
            }
            continue;
        }
        skipping = true;
        let Some(colon) = line.find(':') else {
            defect = defect.or(Some("a header line has no colon"));
            continue;
        };
        let raw_name = line[..colon].trim_end();
        if !is_token(raw_name) {
            defect = defect.or(Some("a header name is not a token"));
            continue;
        }
        skipping = false;
        let name = match expand_compact(raw_name) {
            Some(full) => Cow::Borrowed(full),
            None => Cow::Borrowed(raw_name),
        };
        headers.push(Header {
            name,
            value: Cow::Borrowed(line[colon + 1..].trim()),
        });
    }
    let body = &buf[end..];
    Ok(Request {
        method,
        uri,
        version,
        headers,
        body,
        defect,
    })
}

/// A request whose header block is not UTF-8, with the header block re-read as Latin-1
/// (each byte one character) and the body as it was; `None` when it is UTF-8 already.
///
/// RFC 3261 says UTF-8, but older PBXs send Latin-1 display names; answering those would be
/// impossible otherwise. Read this way, the answer's copied headers go back byte for byte
/// through [`utf8_as_latin1`].
pub fn latin1_as_utf8(packet: &[u8]) -> Option<Vec<u8>> {
    let end = header_end(packet)?;
    if std::str::from_utf8(&packet[..end]).is_ok() {
        return None;
    }
    let head: String = packet[..end].iter().map(|&b| char::from(b)).collect();
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&packet[end..]);
    Some(bytes)
}

/// The answer to a request read by [`latin1_as_utf8`], written back as Latin-1; a character
/// outside Latin-1 (none of ours are) becomes `?`.
pub fn utf8_as_latin1(answer: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(answer)
        .chars()
        .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
        .collect()
}

impl<'a> Request<'a> {
    /// The first header called `name` (case-insensitive, compact forms already expanded).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_ref())
    }

    /// Every header called `name`, in order.
    pub fn headers_named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_ref())
    }

    /// How many headers called `name` there are.
    pub fn count(&self, name: &str) -> usize {
        self.headers_named(name).count()
    }

    /// The topmost Via value (the first of a comma-separated first Via header).
    pub fn top_via(&self) -> Option<Via<'_>> {
        let first = self.header("Via")?;
        Via::parse(split_first_value(first))
    }

    /// Content-Length, if present and a number.
    pub fn content_length(&self) -> Result<Option<usize>, &'static str> {
        match self.header("Content-Length") {
            None => Ok(None),
            Some(v) => parse_digits::<usize>(v.trim())
                .map(Some)
                .ok_or("Content-Length is not a number"),
        }
    }

    /// The CSeq number and method; `None` unless the number is below 2³¹ (RFC 3261 §8.1.1.5).
    pub fn cseq(&self) -> Option<(u32, &str)> {
        let v = self.header("CSeq")?;
        let mut it = v.split_whitespace();
        let num = parse_digits::<u32>(it.next()?).filter(|n| *n < 1 << 31)?;
        let method = it.next()?;
        it.next().is_none().then_some((num, method))
    }
}

/// A number written as `1*DIGIT`, as RFC 3261 writes every numeric header value.
///
/// Rust's `parse` also takes a leading `+`, which no SIP grammar allows; a proxy that reads
/// `+3` differently would frame the stream elsewhere.
pub fn parse_digits<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The first element of a comma-separated header value, ignoring commas inside quotes
/// (with their `\"` escapes) or angle brackets.
pub fn split_first_value(v: &str) -> &str {
    let mut quoted = false;
    let mut escaped = false;
    let mut angle = false;
    for (i, c) in v.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => return v[..i].trim(),
            _ => {}
        }
    }
    v.trim()
}

/// A parsed Via value: `SIP/2.0/UDP host[:port];params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via<'a> {
    /// Transport token, upper-cased by comparison only (UDP, TCP, TLS, ...).
    pub transport: &'a str,
    /// Host of sent-by.
    pub host: &'a str,
    /// Port of sent-by, if given.
    pub port: Option<u16>,
    /// The `branch` parameter.
    pub branch: Option<&'a str>,
    /// Whether `rport` is present (RFC 3581).
    pub rport: bool,
}

impl<'a> Via<'a> {
    /// Parses one Via value; `None` when it is malformed.
    pub fn parse(v: &'a str) -> Option<Via<'a>> {
        // sent-protocol allows whitespace around its slashes (SLASH = SWS "/" SWS), and LWS
        // separates it from sent-by.
        let mut pp = v.splitn(3, '/');
        let (name, version, tail) = (pp.next()?, pp.next()?, pp.next()?.trim_start());
        let split = tail.find(|c: char| c.is_ascii_whitespace())?;
        let (transport, rest) = (&tail[..split], tail[split..].trim_start());
        // A transport that is not a token (`SIP/2.0/UDP/x;`, found by fuzzing) would have
        // the rest of the value misread.
        if !name.trim().eq_ignore_ascii_case("SIP")
            || version.trim() != "2.0"
            || !is_token(transport)
        {
            return None;
        }
        let mut params = rest.split(';');
        let sent_by = params.next()?.trim();
        let (host, port) = split_host_port(sent_by)?;
        let mut branch = None;
        let mut rport = false;
        for p in params {
            let p = p.trim();
            let (k, val) = match p.find('=') {
                Some(i) => (p[..i].trim(), Some(p[i + 1..].trim())),
                None => (p, None),
            };
            if k.eq_ignore_ascii_case("branch") {
                branch = val.filter(|b| !b.is_empty());
            } else if k.eq_ignore_ascii_case("rport") {
                rport = true;
            }
        }
        Some(Via {
            transport,
            host,
            port,
            branch,
            rport,
        })
    }
}

/// Splits `host[:port]`, handling `[v6]:port`.
pub fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    // `1*DIGIT`: Rust's parse would take a sign.
    fn port(p: &str) -> Option<u16> {
        parse_digits::<u16>(p)
    }
    if s.is_empty() {
        return None;
    }
    if let Some(rest) = s.strip_prefix('[') {
        let close = rest.find(']')?;
        let host = &s[..close + 2];
        let after = rest[close + 1..].trim_start();
        return match after.strip_prefix(':') {
            Some(p) => Some((host, Some(port(p.trim_start())?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    // COLON = SWS ":" SWS.
    match s.rfind(':') {
        Some(i) => {
            let host = s[..i].trim_end();
            // An IPv6 address must be bracketed (RFC 3261 §25.1 IPv6reference): read
            // without, `2001:db8::10` would be host `2001:db8:` port 10.
            if host.is_empty() || host.contains(':') {
                return None;
            }
            Some((host, Some(port(s[i + 1..].trim_start())?)))
        }
        None => Some((s, None)),
    }
}

/// The parts of a SIP or SIPS URI a router needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipUri<'a> {
    /// `sip` or `sips` (lower-cased comparison).
    pub scheme: &'a str,
    /// User part, still percent-encoded; `None` when absent.
    pub user: Option<&'a str>,
}

/// Why a Request-URI cannot name a conference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UriError {
    /// Scheme other than sip/sips (answer 416).
    Scheme(String),
    /// Not a well-formed URI (answer 400).
    Malformed(&'static str),
}

/// Parses `sip:user@host...` / `sips:...`, possibly inside `<...>`.
pub fn parse_sip_uri(uri: &str) -> Result<SipUri<'_>, UriError> {
    let uri = uri.trim();
    let uri = uri
        .strip_prefix('<')
        .and_then(|u| u.split('>').next())
        .unwrap_or(uri);
    let colon = uri.find(':').ok_or(UriError::Malformed("no scheme"))?;
    let scheme = &uri[..colon];
    if !scheme.eq_ignore_ascii_case("sip") && !scheme.eq_ignore_ascii_case("sips") {
        return Err(UriError::Scheme(scheme.chars().take(16).collect()));
    }
    let rest = &uri[colon + 1..];
    // The user part ends at the last '@'. A user may hold `?` and `/` (user-unreserved,
    // RFC 3261 §25.1) while no header may hold an '@' unescaped, so the headers are cut off
    // after the '@' only.
    // (A header that breaks the grammar with an '@' of its own stays a header: headers start
    // at the first `?` after the first '@'.)
    let before_headers = match rest.find('@') {
        Some(first) => match rest[first..].find('?') {
            Some(q) => &rest[..first + q],
            None => rest,
        },
        None => rest.split('?').next().unwrap_or(""),
    };
    let (user, host) = match before_headers.rfind('@') {
        // userinfo may carry ":password"; the conference is the user.
        Some(at) => (
            Some(before_headers[..at].split(':').next().unwrap_or("")),
            &before_headers[at + 1..],
        ),
        None => (None, before_headers),
    };
    // The host without its port: `sip:room@:5060` names no host either.
    let hostport = host.split(';').next().unwrap_or("");
    let hostname = match hostport.strip_prefix('[') {
        Some(v6) => v6
            .split(']')
            .next()
            .filter(|_| v6.contains(']'))
            .unwrap_or(""),
        None => hostport.split(':').next().unwrap_or(""),
    };
    if hostname.is_empty() {
        return Err(UriError::Malformed("no host"));
    }
    Ok(SipUri { scheme, user })
}

/// Decodes `%XX` escapes (RFC 3261 §19.1.2); `None` for a broken escape.
pub fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            // `from_str_radix` alone would take a sign: `%+B` decoded to 0x0B (found by
            // fuzzing); RFC 3261 §25.1 wants `%` HEXDIG HEXDIG.
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    // Invalid UTF-8 after decoding is kept lossy so the name check can name the bad byte.
    Some(Cow::Owned(String::from_utf8_lossy(&out).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_sent_by_needs_its_brackets() {
        assert_eq!(
            split_host_port("[2001:db8::10]:5070"),
            Some(("[2001:db8::10]", Some(5070)))
        );
        assert_eq!(
            split_host_port("[2001:db8::10]"),
            Some(("[2001:db8::10]", None))
        );
        assert_eq!(
            split_host_port("10.0.0.1:5060"),
            Some(("10.0.0.1", Some(5060)))
        );
        // Read without brackets it would be host `2001:db8:` at port 10.
        assert_eq!(split_host_port("2001:db8::10"), None);
        assert_eq!(split_host_port("10.0.0.1:+5060"), None);
        assert_eq!(split_host_port("[2001:db8::10]:+5070"), None);
        assert_eq!(split_host_port("::1"), None);
    }

    const INVITE: &str = "INVITE sip:sales-42@router.example.com SIP/2.0\r\n\
        Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776asdhds;rport\r\n\
        v: SIP/2.0/TCP proxy.example.com;branch=z9hG4bKabc, SIP/2.0/UDP 10.9.9.9:5070;branch=z9hG4bKdef\r\n\
        Max-Forwards: 70\r\n\
        t: <sip:sales-42@router.example.com>\r\n\
        f: \"Alice\" <sip:alice@example.com>;tag=1928301774\r\n\
        i: a84b4c76e66710@pc33.example.com\r\n\
        CSeq: 314159 INVITE\r\n\
        Subject: a long\r\n subject\r\n\tfolded\r\n\
        l: 4\r\n\
        \r\n\
        v=0\r\n";

    #[test]
    fn bare_cr_and_lf_are_found() {
        assert!(!has_bare_cr_or_lf(b"A: 1\r\nB: 2"));
        assert!(!has_bare_cr_or_lf(b""));
        assert!(has_bare_cr_or_lf(b"A: 1\nB: 2"));
        assert!(has_bare_cr_or_lf(b"A: 1\rB: 2"));
        assert!(has_bare_cr_or_lf(b"A: 1\r\r\nB: 2"));
        assert!(has_bare_cr_or_lf(b"A: 1\r\n\nB: 2"));
        assert!(has_bare_cr_or_lf(b"A: 1\r"));
        assert!(has_bare_cr_or_lf(b"\nA: 1"));
    }

    #[test]
    fn parses_compact_forms_folding_and_multiple_vias() {
        let r = parse(INVITE.as_bytes()).expect("parses");
        assert_eq!(r.method, "INVITE");
        assert_eq!(r.uri, "sip:sales-42@router.example.com");
        assert_eq!(r.header("to"), Some("<sip:sales-42@router.example.com>"));
        assert_eq!(r.header("Call-ID"), Some("a84b4c76e66710@pc33.example.com"));
        assert_eq!(r.header("Subject"), Some("a long subject folded"));
        assert_eq!(r.count("Via"), 2);
        assert_eq!(r.content_length(), Ok(Some(4)));
        assert_eq!(r.cseq(), Some((314159, "INVITE")));
        let via = r.top_via().expect("via");
        assert_eq!(via.transport, "UDP");
        assert_eq!(via.host, "10.0.0.1");
        assert_eq!(via.port, Some(5060));
        assert_eq!(via.branch, Some("z9hG4bK776asdhds"));
        assert!(via.rport);
        let second: Vec<&str> = r.headers_named("Via").collect();
        assert_eq!(
            split_first_value(second[1]),
            "SIP/2.0/TCP proxy.example.com;branch=z9hG4bKabc"
        );
        assert_eq!(r.body, b"v=0\r\n");
    }

    #[test]
    fn reads_lf_only_messages_but_not_mixed_line_ends() {
        let lf = b"OPTIONS sip:a@b SIP/2.0\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\nl: 4\n\nbody";
        assert_eq!(header_end(lf), Some(lf.len() - 4));
        let r = parse(lf).expect("LF-only");
        assert_eq!(r.header("Via"), Some("SIP/2.0/UDP h;branch=z9hG4bK1"));
        assert_eq!(r.header("Content-Length"), Some("4"));
        assert_eq!(r.body, b"body");
        // An LF-only block ends at its first empty line, even if its body has CRLFs.
        let body_crlf = b"OPTIONS sip:a@b SIP/2.0\nl: 4\n\n\r\n\r\n";
        assert_eq!(header_end(body_crlf), Some(body_crlf.len() - 4));
        // Once a CR is seen, only CRLF ends lines: a bare LF inside is refused, not a line.
        let mixed = b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\n\nContact: y\r\n\r\n";
        assert_eq!(header_end(mixed), Some(mixed.len()));
        assert!(matches!(parse(mixed), Err(ParseError::Garbage(_))));
        assert_eq!(header_end(b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\n\n"), None);
    }

    #[test]
    fn rejects_garbage_and_recognises_responses() {
        assert!(matches!(parse(b"hello"), Err(ParseError::Garbage(_))));
        assert!(matches!(
            parse(b"\x00\x01\r\n\r\n"),
            Err(ParseError::Garbage(_))
        ));
        assert!(matches!(
            parse(b"OPTIONS sip:a@b SIP/2.0\r\nCall-ID: \x00x\r\n\r\n"),
            Err(ParseError::Garbage("a NUL byte in the headers"))
        ));
        // Another SIP version is read (for its 505); another protocol is not SIP.
        let r = parse(b"INVITE sip:a@b SIP/3.0\r\n\r\n").expect("another SIP version");
        assert_eq!(r.version, "SIP/3.0");
        for v in [
            "HTTP/1.1",
            "SIP/2",
            "SIP/.0",
            "SIP/2.x",
            "SIP/1234567890.0",
            "SIP/",
        ] {
            let line = format!("INVITE sip:a@b {v}\r\n\r\n");
            assert!(
                matches!(parse(line.as_bytes()), Err(ParseError::Garbage(_))),
                "{v}"
            );
        }
        // A Request-URI without a scheme is read, for the handler's 400.
        assert_eq!(
            parse(b"INVITE alice SIP/2.0\r\n\r\n").expect("read").uri,
            "alice"
        );
        assert!(matches!(
            parse(b"INVITE sip:a@b\r\n\r\n"),
            Err(ParseError::Garbage(_))
        ));
        // Blanks the request line must not hold (RFC 4475 §3.1.2.8-10) leave a request that
        // gets a 400 naming them.
        for (line, uri) in [
            ("INVITE  sip:a@b  SIP/2.0", "sip:a@b"),
            ("INVITE\tsip:a@b\tSIP/2.0", "sip:a@b"),
            ("INVITE sip:a@b SIP/2.0 ", "sip:a@b"),
            (" INVITE sip:a@b SIP/2.0", "sip:a@b"),
            ("INVITE sip:a@b;lr=foo bar SIP/2.0", "sip:a@b;lr=foo bar"),
            ("INV ITE sip:a@b SIP/2.0", "ITE sip:a@b"),
        ] {
            let msg = format!("{line}\r\nVia: SIP/2.0/UDP h\r\n\r\n");
            let r = parse(msg.as_bytes()).expect(line);
            assert_eq!(
                (r.method, r.uri, r.version),
                (
                    line.trim().split([' ', '\t']).next().unwrap_or(""),
                    uri,
                    "SIP/2.0"
                ),
                "{line}"
            );
            assert!(r.defect.is_some(), "{line}");
        }
        assert_eq!(
            parse(b"INVITE sip:a@b SIP/2.0\r\n\r\n")
                .expect("read")
                .defect,
            None
        );
        for line in ["INVITE", "INVITE SIP/2.0", "  ", "INVITE\t \tSIP/2.0"] {
            let msg = format!("{line}\r\nVia: SIP/2.0/UDP h\r\n\r\n");
            assert!(
                matches!(parse(msg.as_bytes()), Err(ParseError::Garbage(_))),
                "{line}"
            );
        }
        // A bad header line is skipped and named, so the request can still get its 400.
        let r = parse(b"INVITE sip:a@b SIP/2.0\r\nNoColon\r\nVia: SIP/2.0/UDP h\r\n\r\n")
            .expect("answerable");
        assert_eq!(r.defect, Some("a header line has no colon"));
        assert!(r.header("Via").is_some());
        let r = parse(b"INVITE sip:a@b SIP/2.0\r\nBad Name: x\r\n\r\n").expect("answerable");
        assert_eq!(r.defect, Some("a header name is not a token"));
        assert!(matches!(
            parse(b"INVITE sip:a@b SIP/2.0\r\n folded-first\r\n\r\n"),
            Err(ParseError::Garbage(_))
        ));
        assert_eq!(
            parse(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\n\r\n").err(),
            Some(ParseError::Response)
        );
    }

    #[test]
    fn via_variants() {
        let v = Via::parse("SIP/2.0/TCP [2001:db8::1]:5080;branch=z9hG4bKx").expect("v6");
        assert_eq!(v.host, "[2001:db8::1]");
        assert_eq!(v.port, Some(5080));
        // SWS around the slashes and the colon, LWS before sent-by (RFC 3261 §25.1).
        let v = Via::parse("SIP / 2.0 / UDP\t host.example : 5070;branch=z9hG4bKy")
            .expect("whitespace where the grammar allows it");
        assert_eq!(
            (v.transport, v.host, v.port),
            ("UDP", "host.example", Some(5070))
        );
        let v = Via::parse("SIP/2.0/TCP [2001:db8::1] : 5080;branch=z9hG4bKx").expect("v6");
        assert_eq!((v.host, v.port), ("[2001:db8::1]", Some(5080)));
        assert!(Via::parse("SIP/2.0/UDP host.example :;branch=z9hG4bKy").is_none());
        assert!(Via::parse("SIP/2.0/UDP :5060;branch=z9hG4bKy").is_none());
        let v = Via::parse("SIP/2.0/UDP host.example ; branch = z9hG4bKz ; rport=5060")
            .expect("spaces in params");
        assert_eq!(v.branch, Some("z9hG4bKz"));
        assert!(v.rport);
        assert!(Via::parse("SIP/2.0/UDP").is_none());
        assert!(Via::parse("garbage").is_none());
    }

    #[test]
    fn via_protocol_has_exactly_three_parts() {
        // Fuzzing found this one accepted as transport `UDSIP`; the response then rewrote
        // it into a Via that no longer parsed.
        assert_eq!(
            Via::parse("SIP/2.0/UDSIP/2.0/UDP; 7.01.20.1:5070;branch="),
            None
        );
        assert_eq!(Via::parse("SIP/2.0/UDP/TCP host;branch=z9hG4bK1"), None);
        let raw = b"INVITE sip:caf%C3%A9@router SIP/2.0\r\n\
            Via: SIP/2.0/UDSIP/2.0/UDP; 7.01.20.1:5070;branch=\r\nMax-Forwards: 70\r\n\
            From: <sip:alice@example.com>;tag=g0\r\nTo: <sip:caf%C3%A9@router>\r\n\
            Call-ID: z9hGDKutf@test\r\nCSeq: @teNVITE\r\nContent-Length: 0\r\n\r\n";
        let req = parse(raw).expect("the request still parses");
        assert!(
            req.top_via().is_none(),
            "no usable Via: the packet is dropped"
        );
    }

    #[test]
    fn sip_uris() {
        let u = parse_sip_uri("sip:sales-42@router.example.com;transport=tcp").expect("uri");
        assert_eq!(u.user, Some("sales-42"));
        let u = parse_sip_uri("sips:%2B15555550101@10.0.0.1:5061").expect("uri");
        assert_eq!(u.user, Some("%2B15555550101"));
        let u = parse_sip_uri("sip:router.example.com").expect("uri");
        assert_eq!(u.user, None);
        let u = parse_sip_uri("sip:@router.example.com").expect("uri");
        assert_eq!(u.user, Some(""));
        let u = parse_sip_uri("<sip:room:secret@h>").expect("uri");
        assert_eq!(u.user, Some("room"));
        assert_eq!(
            parse_sip_uri("tel:+15555550101"),
            Err(UriError::Scheme("tel".into()))
        );
        assert!(matches!(
            parse_sip_uri("sip:user@"),
            Err(UriError::Malformed(_))
        ));
        // `?` and `/` may be in a user (RFC 4475 §3.1.1.5); headers follow the host.
        let u = parse_sip_uri("sip:a/b?c@example.com?Subject=x").expect("uri");
        assert_eq!(u.user, Some("a/b?c"));
        let u = parse_sip_uri("sip:room@h?Subject=hi%40there").expect("uri");
        assert_eq!(u.user, Some("room"));
        let u = parse_sip_uri("sip:h?Subject=x").expect("uri");
        assert_eq!(u.user, None);
        let u = parse_sip_uri("sip:room@host?Replaces=abc@def").expect("uri");
        assert_eq!(u.user, Some("room"));
        // The grammar reads this one as user `h?S=a` at host `b`.
        let u = parse_sip_uri("sip:h?S=a@b").expect("uri");
        assert_eq!(u.user, Some("h?S=a"));
        assert!(matches!(
            parse_sip_uri("sip:room@?x=1"),
            Err(UriError::Malformed(_))
        ));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("%2B1555").as_deref(), Some("+1555"));
        assert_eq!(percent_decode("a%00b").as_deref(), Some("a\0b"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        // Found by fuzzing: a sign is not a hex digit.
        assert_eq!(percent_decode("%+B15555550101"), None);
        assert_eq!(percent_decode("%-1"), None);
    }

    #[test]
    fn header_end_finds_blank_line() {
        assert_eq!(header_end(b"A\r\n\r\nbody"), Some(5));
        assert_eq!(header_end(b"A\r\n"), None);
    }
}
