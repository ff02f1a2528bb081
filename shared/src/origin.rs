//! Refusing an API left without a token to web pages of other sites.
//!
//! Applications, `confroute-ctl` and edges call the API from programs, which send no `Origin`
//! (or, as some WebSocket libraries do, one naming the server they call). A browser sends
//! `Origin` on every WebSocket handshake and on every cross-site POST, and may send such a
//! POST without asking first (a "simple" request) and open a WebSocket to any address: a
//! page the operator merely visits could otherwise dial out, end conferences or drain nodes
//! through an API left without a token, and read the call-control WebSocket's answers. The
//! API serves no page of its own, so a request whose `Origin` names another host than the
//! one it calls comes from another site's page, and is refused. With a token the check is
//! not needed (a page cannot send the `Authorization` header without the server's consent,
//! which the API never gives), and is not made: a reverse proxy rewriting `Host` would make
//! a program's own `Origin` look foreign. It does not stop a page whose name the attacker
//! points at the server (DNS rebinding): only the token does.

use axum::http::{header, HeaderMap};

/// True when `headers` carry an `Origin` naming another site than the `Host` called: a
/// browser page of another site made the request. No `Origin`: a program, not refused.
pub fn cross_site(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let (Ok(origin), Some(host)) = (
        origin.to_str(),
        headers.get(header::HOST).and_then(|h| h.to_str().ok()),
    ) else {
        return true;
    };
    match origin_authority(origin) {
        Some((authority, default)) => !same_authority(&authority, default, host),
        // `null` (a sandboxed page, a file) or anything else unreadable.
        None => true,
    }
}

/// The `host[:port]` of an `Origin` value (`scheme://host[:port]`), lower-cased, without the
/// scheme's default port; and that port (`:80`, `:443`).
fn origin_authority(origin: &str) -> Option<(String, &'static str)> {
    let (scheme, rest) = origin.trim().split_once("://")?;
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    let rest = rest.to_ascii_lowercase();
    let default = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => return None,
    };
    Some((
        rest.strip_suffix(default).unwrap_or(&rest).to_string(),
        default,
    ))
}

/// Whether `authority` (from `Origin`, whose scheme's default port is `default`) names the
/// server `host` (the `Host` header) does, that default port written out or not: another
/// scheme's default port is another origin.
fn same_authority(authority: &str, default: &str, host: &str) -> bool {
    let host = host.trim().to_ascii_lowercase();
    authority == host || host.strip_suffix(default) == Some(authority)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(origin: Option<&str>, host: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).expect("origin"));
        }
        if let Some(v) = host {
            h.insert(header::HOST, HeaderValue::from_str(v).expect("host"));
        }
        h
    }

    #[test]
    fn programs_and_pages_of_the_server_itself_pass() {
        assert!(!cross_site(&headers(None, Some("10.0.0.5:8080"))));
        assert!(!cross_site(&headers(None, None)));
        // What a WebSocket library sends when it names the server it calls.
        assert!(!cross_site(&headers(
            Some("http://10.0.0.5:8080"),
            Some("10.0.0.5:8080")
        )));
        assert!(!cross_site(&headers(
            Some("HTTP://Controller.Example"),
            Some("controller.example:80")
        )));
        assert!(!cross_site(&headers(
            Some("https://controller.example"),
            Some("controller.example")
        )));
        assert!(!cross_site(&headers(
            Some("http://[::1]:8080"),
            Some("[::1]:8080")
        )));
    }

    #[test]
    fn pages_of_other_sites_are_refused() {
        for (origin, host) in [
            ("https://evil.example", Some("10.0.0.5:8080")),
            ("http://10.0.0.5:8081", Some("10.0.0.5:8080")),
            ("http://10.0.0.5", Some("10.0.0.5:8080")),
            ("null", Some("10.0.0.5:8080")),
            ("file://", Some("10.0.0.5:8080")),
            ("http://a@10.0.0.5:8080", Some("10.0.0.5:8080")),
            ("chrome-extension://abc", Some("10.0.0.5:8080")),
            ("http://10.0.0.5:8080", None),
            // Another scheme's default port is another origin.
            ("https://controller.example", Some("controller.example:80")),
            ("http://controller.example", Some("controller.example:443")),
        ] {
            assert!(
                cross_site(&headers(Some(origin), host)),
                "{origin} {host:?}"
            );
        }
    }
}
