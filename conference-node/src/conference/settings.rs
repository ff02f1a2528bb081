//! What a conference keeps for its whole life (room size, recording, status callbacks and
//! their ConferenceSid), fixed by the caller that started it. The agent records them beside
//! the conference's claim in Redis, so that after a restart it adopts the conference with
//! them rather than with the configuration's defaults. A conference with exactly the
//! defaults and no callbacks records only that it started, once it has, and the recording
//! under way, which a restarted agent cannot ask Asterisk about.
//!
//! They are written as the channel variables that would have set them, so reading them back
//! goes through the same resolution (and the same checks) as a caller's options.

use std::collections::BTreeMap;

use crate::config::{ConferenceDefaults, Profile};
use crate::options::{self, Options, Record};

/// The key of the ConferenceSid beside the option variables.
const SID: &str = "sid";
/// The key of the conference's recording under way: its name, or empty when none is. A
/// restarted agent cannot ask Asterisk (ARI lists no live recordings), so it reads it here.
/// Absent in settings an agent before it wrote: then the agent cannot tell.
const RECORDING: &str = "recording";
/// The key that says the conference has started: a restarted agent finding nobody in the
/// mix (its callers on hold) would otherwise take it for one still waiting for a starter.
const STARTED: &str = "started";
/// The key that says whether the application was told of the conference (its first join
/// sent): `0` until then, as the first caller's count writes the settings before it is in.
/// Absent in settings an agent before it wrote, which wrote them only after the join.
const ANNOUNCED: &str = "announced";

/// The settings of a conference started with `opts`, with the ConferenceSid of its status
/// callbacks, as the text kept in Redis; `None` when they are `defaults` without callbacks.
pub fn encode(opts: &Options, defaults: &Options, sid: &str) -> Option<String> {
    // No callbacks where the defaults have one is a choice to keep too: a restarted agent
    // would otherwise adopt the conference with the default's.
    if opts.max_participants == defaults.max_participants
        && opts.record == defaults.record
        && opts.status_callback.is_empty()
        && defaults.status_callback.is_empty()
    {
        return None;
    }
    let mut vars: BTreeMap<&str, String> = BTreeMap::new();
    vars.insert(
        options::VAR_MAX_PARTICIPANTS,
        opts.max_participants.to_string(),
    );
    let record = match opts.record {
        Record::DoNotRecord => "do-not-record",
        Record::RecordFromStart => "record-from-start",
    };
    vars.insert(options::VAR_RECORD, record.to_string());
    vars.insert(options::VAR_STATUS_CALLBACK, opts.status_callback.clone());
    let events: Vec<String> = opts
        .status_callback_event
        .iter()
        .map(|e| e.to_string())
        .collect();
    vars.insert(options::VAR_STATUS_CALLBACK_EVENT, events.join(" "));
    if !opts.status_callback.is_empty() {
        vars.insert(SID, sid.to_string());
    }
    serde_json::to_string(&vars).ok()
}

/// The options and ConferenceSid that `text` records, on top of the configuration's
/// defaults; `None` (with the reason) when the text is not settings this agent wrote.
pub fn decode(
    defaults: &ConferenceDefaults,
    profiles: &BTreeMap<String, Profile>,
    text: &str,
) -> Result<(Options, Option<String>), String> {
    let mut vars: BTreeMap<String, String> =
        serde_json::from_str(text).map_err(|e| format!("not a settings object: {e}"))?;
    let sid = vars.remove(SID);
    vars.remove(RECORDING);
    vars.remove(STARTED);
    vars.remove(ANNOUNCED);
    let (opts, warnings) = options::resolve(defaults, profiles, &vars);
    match warnings.first() {
        Some(w) => Err(format!("{}: {}", w.variable, w.message)),
        None => Ok((opts, sid)),
    }
}

/// `text` (settings [`encode`] wrote) with `key` set to `value`.
fn with_field(text: &str, key: &str, value: &str) -> String {
    let Ok(mut vars) = serde_json::from_str::<BTreeMap<String, String>>(text) else {
        return text.to_string();
    };
    vars.insert(key.to_string(), value.to_string());
    serde_json::to_string(&vars).unwrap_or_else(|_| text.to_string())
}

/// `text` (settings [`encode`] wrote) saying that `recording` is under way (`None`: none).
pub fn with_recording(text: &str, recording: Option<&str>) -> String {
    with_field(text, RECORDING, recording.unwrap_or(""))
}

/// `text` (settings [`encode`] wrote) saying that the conference has started.
pub fn with_started(text: &str) -> String {
    with_field(text, STARTED, "1")
}

/// `text` (settings [`encode`] wrote) saying whether the application was told of the
/// conference.
pub fn with_announced(text: &str, announced: bool) -> String {
    with_field(text, ANNOUNCED, if announced { "1" } else { "0" })
}

/// Whether the settings say the application was told of the conference (yes when they do
/// not say: written by an agent before this one, after the first join).
pub fn announced(text: &str) -> bool {
    serde_json::from_str::<BTreeMap<String, String>>(text)
        .map_or(true, |vars| vars.get(ANNOUNCED).is_none_or(|v| v != "0"))
}

/// Whether the settings say the conference has started.
pub fn started(text: &str) -> bool {
    serde_json::from_str::<BTreeMap<String, String>>(text)
        .is_ok_and(|vars| vars.get(STARTED).is_some_and(|v| v == "1"))
}

/// What the settings say of the recording under way: `None` when they do not say (written
/// by an agent before this one), `Some(None)` when none is, `Some(Some(name))`.
pub fn recording(text: &str) -> Option<Option<String>> {
    let vars: BTreeMap<String, String> = serde_json::from_str(text).ok()?;
    let name = vars.get(RECORDING)?;
    Some((!name.is_empty()).then(|| name.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::CallbackEvent;

    fn defaults() -> ConferenceDefaults {
        ConferenceDefaults::default()
    }

    #[test]
    fn settings_round_trip() {
        let (plain, _) = options::resolve(&defaults(), &BTreeMap::new(), &BTreeMap::new());
        let mut opts = plain.clone();
        opts.max_participants = 7;
        opts.record = Record::RecordFromStart;
        opts.status_callback = "https://app.example/events".into();
        opts.status_callback_event = vec![CallbackEvent::Start, CallbackEvent::Join];
        let text = encode(&opts, &plain, "CF0123").expect("not the defaults");
        let (back, sid) = decode(&defaults(), &BTreeMap::new(), &text).expect("decodes");
        assert_eq!(back.max_participants, 7);
        assert_eq!(back.record, Record::RecordFromStart);
        assert_eq!(back.status_callback, "https://app.example/events");
        assert_eq!(
            back.status_callback_event,
            vec![CallbackEvent::Start, CallbackEvent::Join]
        );
        assert_eq!(sid.as_deref(), Some("CF0123"));
    }

    #[test]
    fn the_recording_under_way_is_kept_beside_the_settings() {
        let (plain, _) = options::resolve(&defaults(), &BTreeMap::new(), &BTreeMap::new());
        let mut opts = plain.clone();
        opts.record = Record::RecordFromStart;
        let text = encode(&opts, &plain, "CF1").expect("not the defaults");
        assert_eq!(recording(&text), None, "not said: unknown");
        let live = with_recording(&text, Some("confroute-r-1-0000abcd"));
        assert_eq!(
            recording(&live),
            Some(Some("confroute-r-1-0000abcd".to_string()))
        );
        let none = with_recording(&live, None);
        assert_eq!(recording(&none), Some(None));
        assert!(!started(&none));
        let begun = with_started(&none);
        assert!(started(&begun));
        assert_eq!(recording(&begun), Some(None), "the other field kept");
        let (back, _) = decode(&defaults(), &BTreeMap::new(), &live).expect("decodes");
        assert_eq!(back.record, Record::RecordFromStart);
    }

    #[test]
    fn the_defaults_without_callbacks_record_nothing() {
        let (plain, _) = options::resolve(&defaults(), &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(encode(&plain, &plain, "CF0"), None);
        let mut small = plain.clone();
        small.max_participants = 2;
        let text = encode(&small, &plain, "CF0").expect("a room of two is recorded");
        let (back, sid) = decode(&defaults(), &BTreeMap::new(), &text).expect("decodes");
        assert_eq!(back.max_participants, 2);
        assert_eq!(sid, None, "no callbacks, no ConferenceSid to keep");
    }

    #[test]
    fn no_callbacks_against_a_default_callback_are_kept() {
        let with_hook = ConferenceDefaults {
            status_callback: "https://app.example/default".into(),
            ..defaults()
        };
        let (plain, _) = options::resolve(&with_hook, &BTreeMap::new(), &BTreeMap::new());
        let mut quiet = plain.clone();
        quiet.status_callback = String::new();
        let text = encode(&quiet, &plain, "CF0").expect("the opt-out is recorded");
        let (back, sid) = decode(&with_hook, &BTreeMap::new(), &text).expect("decodes");
        assert_eq!(back.status_callback, "", "{text}");
        assert_eq!(sid, None);
    }

    #[test]
    fn foreign_settings_are_refused_with_the_reason() {
        let err = decode(&defaults(), &BTreeMap::new(), "[1]").expect_err("not an object");
        assert!(err.contains("not a settings object"), "{err}");
        let err = decode(
            &defaults(),
            &BTreeMap::new(),
            r#"{"CONFROUTE_MAX_PARTICIPANTS":"lots"}"#,
        )
        .expect_err("bad value");
        assert!(err.starts_with("CONFROUTE_MAX_PARTICIPANTS"), "{err}");
    }
}
