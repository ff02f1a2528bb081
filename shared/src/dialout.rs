//! Dial-out targets and caller ids: the rules the controller checks before sending a
//! dial-out and the node checks again before dialling (it trusts nobody's checks).

/// Longest accepted target.
pub const MAX_TARGET: usize = 256;

/// Longest accepted caller id, in characters.
pub const MAX_CALLER_ID: usize = 128;

/// Checks a caller id (`from`, `dialout.caller_id`): at most [`MAX_CALLER_ID`] characters,
/// none of them a control character (they would end up in a SIP header).
pub fn caller_id(s: &str) -> Result<(), String> {
    if s.chars().count() > MAX_CALLER_ID || s.chars().any(char::is_control) {
        Err(format!(
            "must be at most {MAX_CALLER_ID} characters, none of them control characters"
        ))
    } else {
        Ok(())
    }
}

/// Where a dial-out goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// An E.164-style number: optional `+`, 3-15 digits, no leading zero.
    Number(&'a str),
    /// A `sip:` or `sips:` URI with a user and a host.
    Sip(&'a str),
}

/// Reads a dial-out target; `None` for anything that is neither an E.164-style number nor
/// a SIP URI.
pub fn target(t: &str) -> Option<Target<'_>> {
    if t.len() > MAX_TARGET || t.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return None;
    }
    let digits = t.strip_prefix('+').unwrap_or(t);
    if (3..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
    {
        return Some(Target::Number(t));
    }
    // URI schemes are case-insensitive (RFC 3261 §19.1.4).
    let (scheme, rest) = t.split_once(':')?;
    if !scheme.eq_ignore_ascii_case("sip") && !scheme.eq_ignore_ascii_case("sips") {
        return None;
    }
    let (user, host) = rest.split_once('@')?;
    let ok = !user.is_empty()
        && !host.is_empty()
        && !t.contains(['<', '>', '"', '\'', ','])
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b';' | b'=')
        });
    ok.then_some(Target::Sip(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_ids_count_characters_and_refuse_control_characters() {
        assert!(caller_id("").is_ok());
        assert!(caller_id(&"é".repeat(128)).is_ok());
        assert!(caller_id(&"é".repeat(129)).is_err());
        assert!(caller_id("Alice \u{85}").is_err());
        assert!(caller_id("Alice\r\nVia: x").is_err());
        assert!(caller_id("\"Alice\" <+15550001>").is_ok());
    }

    #[test]
    fn targets() {
        assert_eq!(target("+15555550101"), Some(Target::Number("+15555550101")));
        assert_eq!(target("4930123456"), Some(Target::Number("4930123456")));
        assert_eq!(
            target("sip:alice@example.com"),
            Some(Target::Sip("sip:alice@example.com"))
        );
        assert!(target("sips:bob@10.0.0.1:5061;transport=tls").is_some());
        assert_eq!(
            target("SIP:alice@example.com"),
            Some(Target::Sip("SIP:alice@example.com"))
        );
        assert!(target("Sips:bob@example.com").is_some());
        let long = format!("sip:{}@h", "a".repeat(300));
        for bad in [
            &long,
            "",
            "+0123",
            "+1",
            "12345678901234567",
            "alice",
            "sip:",
            "sip:@host",
            "sip:a@",
            "sip:a@b c",
            "sip:a@b\r\nX: y",
            "tel:+1555",
            "sip:a@<b>",
        ] {
            assert_eq!(target(bad), None, "{bad:?}");
        }
    }
}
