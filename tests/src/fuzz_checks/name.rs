//! Conference-name validation against the rules as the docs state them.

use confroute_shared::name::{validate, ConferenceName, NameError, MAX_NAME_LEN};

/// The documented alphabet, written out independently of the validator's own table.
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~+-";

/// Validates the input (as UTF-8, else its lossy form) and checks the verdict against the
/// documented rules, the typed name, its Display, FromStr and serde forms.
pub fn conference_name(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check(&text);
    // Names usually arrive inside something else: the SIP user part and JSON strings.
    if let Some(first_line) = text.split(['\r', '\n']).next() {
        check(first_line);
    }
}

fn check(s: &str) {
    let bytes = s.as_bytes();
    let first_bad = bytes.iter().position(|b| !ALPHABET.contains(b));
    match validate(s) {
        Ok(()) => {
            assert!(s != "." && s != "..", "accepted a URL dot-segment");
            assert!(
                (1..=MAX_NAME_LEN).contains(&bytes.len()),
                "accepted a name of {} bytes",
                bytes.len()
            );
            assert_eq!(
                first_bad, None,
                "accepted a name with a byte outside the alphabet"
            );
            let name = ConferenceName::parse(s).expect("parse agrees with validate");
            assert_eq!(name.as_str(), s);
            assert_eq!(name.to_string(), s);
            assert_eq!(s.parse::<ConferenceName>().as_ref(), Ok(&name));
            let json = serde_json::to_string(&name).expect("a name serialises");
            let back: ConferenceName = serde_json::from_str(&json).expect("a name round-trips");
            assert_eq!(back, name);
        }
        Err(e) => {
            let expected = if bytes.is_empty() {
                NameError::Empty
            } else if s == "." || s == ".." {
                NameError::DotSegment(if s == "." { "." } else { ".." })
            } else if bytes.len() > MAX_NAME_LEN {
                NameError::TooLong { len: bytes.len() }
            } else {
                let offset = first_bad.expect("a rejected name of valid length has a bad byte");
                match &e {
                    NameError::BadCharacter { what, offset: got } => {
                        assert_eq!(*got, offset, "offset names the first bad byte");
                        assert!(!what.is_empty());
                    }
                    other => panic!("expected a bad character at {offset}, got {other:?}"),
                }
                e.clone()
            };
            assert_eq!(e, expected);
            assert!(matches!(
                e.code(),
                "empty" | "too_long" | "bad_character" | "dot_segment"
            ));
            assert!(!e.to_string().is_empty());
            assert!(ConferenceName::parse(s).is_err());
            let json = serde_json::Value::String(s.to_string());
            assert!(serde_json::from_value::<ConferenceName>(json).is_err());
        }
    }
}
