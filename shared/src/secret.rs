//! A string that never shows itself in logs or debug output.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A password or token; `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when `given` is this secret. The time taken depends on `given`'s length only:
    /// neither the secret's bytes nor its length can be learnt by timing guesses (a plain
    /// constant-time slice comparison returns at once when the lengths differ).
    pub fn matches(&self, given: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let secret = self.0.as_bytes();
        let mut same = subtle::Choice::from(1u8);
        for (i, g) in given.iter().enumerate() {
            let s = secret.get(i).copied().unwrap_or(!*g);
            same &= g.ct_eq(&s);
        }
        let lengths = (given.len() as u64).ct_eq(&(secret.len() as u64));
        (same & lengths).into()
    }

    /// True when `authorization` (an `Authorization` header's value) is `Bearer` and this
    /// secret; the scheme in any case (RFC 9110 §11.1), the token compared as [`Self::matches`].
    pub fn matches_bearer(&self, authorization: Option<&str>) -> bool {
        let given = authorization
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, t)| t.trim_start());
        self.matches(given.as_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::config::string_like(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn matches_only_the_same_bytes() {
        let s = Secret::new("s3cret-token");
        assert!(s.matches(b"s3cret-token"));
        for other in [
            &b""[..],
            b"s3cret-toke",
            b"s3cret-tokem",
            b"s3cret-token!",
            b"S3cret-token",
            b"s3cret-token\0",
        ] {
            assert!(!s.matches(other), "{other:?}");
        }
        assert!(Secret::new("").matches(b""));
        assert!(!Secret::new("").matches(b"x"));
    }

    #[test]
    fn bearer_scheme_in_any_case() {
        let s = Secret::new("tok");
        for ok in ["Bearer tok", "bearer tok", "BEARER tok", "Bearer  tok"] {
            assert!(s.matches_bearer(Some(ok)), "{ok}");
        }
        for bad in [
            "Basic tok",
            "Bearertok",
            "tok",
            "Bearer tok2",
            "Bearer ",
            "",
        ] {
            assert!(!s.matches_bearer(Some(bad)), "{bad}");
        }
        assert!(!s.matches_bearer(None));
    }
}
