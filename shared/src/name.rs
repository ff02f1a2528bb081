//! Conference names: the one validation every entry point (SIP, HTTP, JSON-RPC, ARI args) uses.
//!
//! A name ends up in SIP URIs, Redis keys, ARI bridge ids and URL paths, so only characters
//! that are safe unescaped in all of them are allowed: `A–Z a–z 0–9 . _ ~ + -`, 1 to 128 bytes.
//! E.164 numbers such as `+15555550101` are valid names. `.` and `..` are not: HTTP clients
//! resolve them as path dot-segments, so such a conference could never be addressed by URL.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Longest accepted name in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// A validated conference name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ConferenceName(String);

/// Why a string is not a valid conference name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("conference name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("conference name is {len} bytes long; at most {MAX_NAME_LEN} are allowed")]
    TooLong {
        /// Length in bytes of the rejected name.
        len: usize,
    },
    /// The name holds a byte outside the allowed set.
    #[error("conference name has {what} at byte {offset}; only A-Z a-z 0-9 . _ ~ + - are allowed")]
    BadCharacter {
        /// Human description of the offending byte (e.g. "a space", "CR", "'@'").
        what: String,
        /// Byte offset of the first offending byte.
        offset: usize,
    },
    /// The name is `.` or `..`, which URL paths treat as "this" or "parent" segment.
    #[error("conference name `{0}` is a URL dot-segment; `.` and `..` cannot be used")]
    DotSegment(&'static str),
}

impl NameError {
    /// A short stable code for metrics and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            NameError::Empty => "empty",
            NameError::TooLong { .. } => "too_long",
            NameError::BadCharacter { .. } => "bad_character",
            NameError::DotSegment(_) => "dot_segment",
        }
    }
}

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'+' | b'-')
}

fn describe(bytes: &[u8], offset: usize) -> String {
    let b = bytes[offset];
    match b {
        b' ' => "a space".to_string(),
        b'\r' => "CR".to_string(),
        b'\n' => "LF".to_string(),
        b'\t' => "a tab".to_string(),
        0 => "a NUL byte".to_string(),
        0x01..=0x1f | 0x7f => format!("control byte 0x{b:02X}"),
        // The character, not its first UTF-8 byte: a Latin-1 byte read as a character
        // (SIP from an older PBX) is then reported as the byte it was sent as.
        0x80..=0xff => std::str::from_utf8(&bytes[offset..])
            .ok()
            .and_then(|rest| rest.chars().next())
            .map_or_else(
                || format!("non-ASCII byte 0x{b:02X}"),
                |c| format!("non-ASCII character U+{:04X}", u32::from(c)),
            ),
        _ => format!("'{}'", b as char),
    }
}

impl ConferenceName {
    /// Validates `s` as a conference name.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        validate(s)?;
        Ok(ConferenceName(s.to_string()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Longest page cursor (`after`) accepted: far past any name, short of a request limit.
pub const MAX_CURSOR_LEN: usize = 1024;

/// Checks a page cursor (`after`): the previous page's `next`, which is the last name the
/// index held on that page. That name need not meet the naming rules (one written by hand,
/// another tool or an older version is left out of the page, not out of the index), so any
/// 1 to [`MAX_CURSOR_LEN`] bytes is a position: refusing one would leave every page after
/// it out of reach.
pub fn validate_cursor(s: &str) -> Result<(), String> {
    match s.len() {
        0 => Err("after is empty: pass the previous page's next, or leave it out".into()),
        n if n > MAX_CURSOR_LEN => Err(format!(
            "after is {n} bytes; a page's next is at most {MAX_CURSOR_LEN}"
        )),
        _ => Ok(()),
    }
}

/// Checks `s` against the conference-name rules without allocating.
pub fn validate(s: &str) -> Result<(), NameError> {
    let bytes = s.as_bytes();
    if bytes.is_empty() {
        return Err(NameError::Empty);
    }
    if bytes.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: bytes.len() });
    }
    if let Some(offset) = bytes.iter().position(|&b| !allowed(b)) {
        return Err(NameError::BadCharacter {
            what: describe(bytes, offset),
            offset,
        });
    }
    match s {
        "." => Err(NameError::DotSegment(".")),
        ".." => Err(NameError::DotSegment("..")),
        _ => Ok(()),
    }
}

impl fmt::Display for ConferenceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ConferenceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ConferenceName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ConferenceName::parse(s)
    }
}

impl<'de> Deserialize<'de> for ConferenceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ConferenceName::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        for ok in [
            "sales-42",
            "+15555550101",
            "a",
            "A.b_c~d+e-f",
            "0123456789",
            "...",
            ".a",
            "a..",
            &"x".repeat(MAX_NAME_LEN),
        ] {
            assert!(ConferenceName::parse(ok).is_ok(), "{ok:?} should be valid");
        }
    }

    #[test]
    fn rejects_each_invalid_class_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("has space", "a space"),
            ("brace{", "'{'"),
            ("brace}", "'}'"),
            ("colon:x", "':'"),
            ("user@host", "'@'"),
            ("cr\rx", "CR"),
            ("lf\nx", "LF"),
            ("nul\0x", "NUL"),
            ("pct%00", "'%'"),
            ("slash/x", "'/'"),
            ("caf\u{e9}", "non-ASCII character U+00E9"),
            (".", "`.` is a URL dot-segment"),
            ("..", "`..` is a URL dot-segment"),
        ];
        for (input, expect) in cases {
            let err = ConferenceName::parse(input).expect_err(input);
            assert!(
                err.to_string().contains(expect),
                "{input:?}: error {err} should mention {expect}"
            );
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert_eq!(
            ConferenceName::parse(&long),
            Err(NameError::TooLong {
                len: MAX_NAME_LEN + 1
            })
        );
    }

    #[test]
    fn offset_points_at_the_first_bad_byte() {
        match ConferenceName::parse("abc def") {
            Err(NameError::BadCharacter { offset, .. }) => assert_eq!(offset, 3),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn deserialize_validates() {
        let ok: ConferenceName = serde_json::from_str("\"room-1\"").expect("valid");
        assert_eq!(ok.as_str(), "room-1");
        assert!(serde_json::from_str::<ConferenceName>("\"bad name\"").is_err());
    }
}
