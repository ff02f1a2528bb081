//! Media URIs for ARI `play` (`sound:conf-onlyperson`), checked the same way by the
//! controller, which refuses a bad one before it reaches a node, and by the node agent, which
//! takes commands from the bus.

/// Longest media value accepted (all its URIs together).
pub const MAX_MEDIA: usize = 256;

/// The URI schemes Asterisk plays (`res/res_stasis_playback.c`), matched case-sensitively
/// there too: any other is no sound at all, and Asterisk says so only in its log.
pub const SCHEMES: [&str; 6] = [
    "sound",
    "recording",
    "number",
    "digits",
    "characters",
    "tone",
];

/// Checks a media value: one URI or several separated by commas (ARI plays them in turn),
/// each `scheme:resource` with a scheme Asterisk plays and a resource, no spaces or control
/// characters. The error says what is wrong.
pub fn check(media: &str) -> Result<(), String> {
    if media.is_empty() || media.len() > MAX_MEDIA {
        return Err(format!(
            "media: expected 1-{MAX_MEDIA} bytes of media URIs like sound:conf-onlyperson"
        ));
    }
    if media.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err("media: a media URI has no spaces or control characters".into());
    }
    for uri in media.split(',') {
        let Some((scheme, resource)) = uri.split_once(':') else {
            return Err(format!(
                "media: `{uri}` is not a media URI like sound:conf-onlyperson"
            ));
        };
        if !SCHEMES.contains(&scheme) {
            return Err(format!(
                "media: scheme `{scheme}` is not one Asterisk plays ({})",
                SCHEMES.join(", ")
            ));
        }
        if resource.is_empty() {
            return Err(format!("media: `{uri}` names nothing to play"));
        }
        // Asterisk reads a `number:` with sscanf("%d") and skips one it cannot read, saying
        // so only in its log: the playback would end at once with nothing heard.
        let digits = resource.strip_prefix(['+', '-']).unwrap_or(resource);
        if scheme == "number" && !digits.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("media: `{uri}` is not a number Asterisk can say"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_asterisk_plays_and_names_what_it_would_not() {
        for ok in [
            "sound:conf-onlyperson",
            "sound:/var/lib/asterisk/custom/welcome",
            "recording:greeting",
            "number:42",
            "number:-7",
            "digits:1234",
            "characters:abc",
            "tone:ring;tonezone=us",
            "sound:a,sound:b",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("", "1-256 bytes"),
            ("sound:", "names nothing"),
            ("SOUND:x", "scheme `SOUND`"),
            ("http://x/a.wav", "scheme `http`"),
            ("hello", "not a media URI"),
            ("sound:a,", "not a media URI"),
            ("sound:a b", "no spaces"),
            ("sound:a\u{1}", "control"),
            ("number:abc", "not a number"),
            ("number:-", "not a number"),
        ] {
            let err = check(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert!(check(&format!("sound:{}", "x".repeat(MAX_MEDIA))).is_err());
    }
}
