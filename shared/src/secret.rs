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

/// Why `token` cannot be an `http.api_token`, if it cannot: under 16 characters, or one
/// no request could send: a control character or a letter outside ASCII anywhere (a header
/// value cannot carry it as it is), or a space at either end (HTTP drops it from the
/// header). A line end at the end (a Secret made with `echo`) is the common case: every
/// request would be refused with 401. The error names the position, never the character.
pub fn api_token_problem(token: &str) -> Option<String> {
    if token.chars().count() < 16 {
        return Some("must be at least 16 characters (or unset to leave the API open)".into());
    }
    if let Some((at, _)) = token
        .chars()
        .enumerate()
        .find(|(_, c)| !(' '..='~').contains(c))
    {
        return Some(format!(
            "character {} is a control character or outside ASCII, which no Authorization header can carry (a trailing line end often comes from `echo` into a Secret)",
            at + 1
        ));
    }
    if token.starts_with(' ') || token.ends_with(' ') {
        return Some("starts or ends with a space, which HTTP drops from the header".into());
    }
    None
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
    use super::{api_token_problem, Secret};

    #[test]
    fn api_tokens_must_fit_a_bearer_header() {
        for ok in [
            "abcdefghijklmnop",
            "A-Z.a_z~0+9/xyzw==",
            "0001234567890123",
            "S3cr3t!Token#2024$$",
            "with a space inside",
        ] {
            assert_eq!(api_token_problem(ok), None, "{ok}");
        }
        for bad in [
            "short",
            "abcdefghijklmnop\n",
            "abcdefghijklmnop ",
            " abcdefghijklmnop",
            "abcdéfghijklmnop",
            "abcdefgh\tijklmnop",
        ] {
            assert!(api_token_problem(bad).is_some(), "{bad:?}");
        }
    }

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
