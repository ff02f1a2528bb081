//! Conference options as in TwiML `<Conference>`, and how one call's options are resolved:
//! the `[conference]` defaults, then the profile named by `CONFROUTE_PROFILE`, then single
//! overrides from channel variables. A bad value is logged and the profile's value kept.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::config::{ConferenceDefaults, Profile};

/// TwiML `beep`: when the bridge hears a beep for this participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Beep {
    /// On entering and on leaving.
    True,
    /// Never.
    False,
    /// Only on entering.
    OnEnter,
    /// Only on leaving.
    OnExit,
}

impl Beep {
    /// True when the bridge beeps as the participant enters.
    pub fn on_enter(self) -> bool {
        matches!(self, Beep::True | Beep::OnEnter)
    }

    /// True when the bridge beeps as the participant leaves.
    pub fn on_exit(self) -> bool {
        matches!(self, Beep::True | Beep::OnExit)
    }

    /// The setting as `CONFROUTE_BEEP` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Beep::True => "true",
            Beep::False => "false",
            Beep::OnEnter => "onEnter",
            Beep::OnExit => "onExit",
        }
    }
}

impl FromStr for Beep {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Ok(Beep::True),
            "false" | "no" | "0" => Ok(Beep::False),
            "onenter" => Ok(Beep::OnEnter),
            "onexit" => Ok(Beep::OnExit),
            _ => Err(format!(
                "`{s}` is not a beep setting; expected true, false, onEnter or onExit"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Beep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = confroute_shared::config::string_like(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// TwiML `record`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// No recording.
    DoNotRecord,
    /// The bridge is recorded from the moment the conference starts until it ends.
    RecordFromStart,
}

impl FromStr for Record {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "do-not-record" | "false" => Ok(Record::DoNotRecord),
            "record-from-start" | "true" => Ok(Record::RecordFromStart),
            _ => Err(format!(
                "`{s}` is not a record setting; expected do-not-record or record-from-start"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Record {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = confroute_shared::config::string_like(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// TwiML `statusCallbackEvent` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CallbackEvent {
    /// The conference started (`conference-start`).
    Start,
    /// The conference ended (`conference-end`).
    End,
    /// A participant joined (`participant-join`).
    Join,
    /// A participant left (`participant-leave`).
    Leave,
    /// A participant was muted or unmuted.
    Mute,
    /// A participant was held or unheld.
    Hold,
}

impl FromStr for CallbackEvent {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "start" => Ok(CallbackEvent::Start),
            "end" => Ok(CallbackEvent::End),
            "join" => Ok(CallbackEvent::Join),
            "leave" => Ok(CallbackEvent::Leave),
            "mute" => Ok(CallbackEvent::Mute),
            "hold" => Ok(CallbackEvent::Hold),
            _ => Err(format!(
                "`{s}` is not a status callback event; expected start, end, join, leave, mute or hold"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for CallbackEvent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for CallbackEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CallbackEvent::Start => "start",
            CallbackEvent::End => "end",
            CallbackEvent::Join => "join",
            CallbackEvent::Leave => "leave",
            CallbackEvent::Mute => "mute",
            CallbackEvent::Hold => "hold",
        })
    }
}

/// Parses a TwiML event list: space or comma separated.
fn parse_events(s: &str) -> Result<Vec<CallbackEvent>, String> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(str::parse)
        .collect()
}

/// Channel variables that select a profile or override one option.
pub const VAR_PROFILE: &str = "CONFROUTE_PROFILE";
/// Override of `muted`.
pub const VAR_MUTED: &str = "CONFROUTE_MUTED";
/// Override of `beep`.
pub const VAR_BEEP: &str = "CONFROUTE_BEEP";
/// Override of `startConferenceOnEnter`.
pub const VAR_START_ON_ENTER: &str = "CONFROUTE_START_ON_ENTER";
/// Override of `endConferenceOnExit`.
pub const VAR_END_ON_EXIT: &str = "CONFROUTE_END_ON_EXIT";
/// Override of `maxParticipants`.
pub const VAR_MAX_PARTICIPANTS: &str = "CONFROUTE_MAX_PARTICIPANTS";
/// Override of the wait music class.
pub const VAR_WAIT_MUSIC: &str = "CONFROUTE_WAIT_MUSIC";
/// Override of `record`.
pub const VAR_RECORD: &str = "CONFROUTE_RECORD";
/// Override of `statusCallback`.
pub const VAR_STATUS_CALLBACK: &str = "CONFROUTE_STATUS_CALLBACK";
/// Override of `statusCallbackEvent`.
pub const VAR_STATUS_CALLBACK_EVENT: &str = "CONFROUTE_STATUS_CALLBACK_EVENT";

/// Set by the agent, not by callers: `true` while call control holds the participant. Asterisk
/// shows no such hold (the holding bridge also has callers waiting for the start), so a
/// restarted agent reads it back.
pub const VAR_HELD: &str = "CONFROUTE_HELD";

/// Every variable the agent reads for one call's options.
pub const OPTION_VARIABLES: &[&str] = &[
    VAR_PROFILE,
    VAR_MUTED,
    VAR_BEEP,
    VAR_START_ON_ENTER,
    VAR_END_ON_EXIT,
    VAR_MAX_PARTICIPANTS,
    VAR_WAIT_MUSIC,
    VAR_RECORD,
    VAR_STATUS_CALLBACK,
    VAR_STATUS_CALLBACK_EVENT,
];

/// One participant's resolved options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Profile the options came from (`default` for `[conference]`).
    pub profile: String,
    /// Joins muted.
    pub muted: bool,
    /// Beep behaviour.
    pub beep: Beep,
    /// Starts the conference on entering.
    pub start_on_enter: bool,
    /// Ends the conference on leaving.
    pub end_on_exit: bool,
    /// Largest conference size (applies when this participant creates the conference).
    pub max_participants: u32,
    /// Music on hold class while waiting.
    pub wait_music: String,
    /// Recording (applies when this participant creates the conference).
    pub record: Record,
    /// Status callback URL; empty for none.
    pub status_callback: String,
    /// Events sent to the status callback.
    pub status_callback_event: Vec<CallbackEvent>,
}

/// A problem with one override, reported in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionWarning {
    /// Variable that held the bad value.
    pub variable: &'static str,
    /// What was wrong.
    pub message: String,
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" => Ok(false),
        _ => Err(format!("`{s}` is not a boolean; expected true or false")),
    }
}

/// A status callback URL as given (trimmed; empty for none), or why it is refused.
pub(crate) fn callback_ok(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(String::new());
    }
    match reqwest::Url::parse(t) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
            // Link-local addresses are cloud metadata services, and unspecified ones reach
            // the host itself: no status callback belongs there.
            let host = u.host_str().unwrap_or("");
            let literal = host.trim_start_matches('[').trim_end_matches(']');
            let refused = match literal.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(ip)) => ip.is_link_local() || ip.is_unspecified(),
                Ok(std::net::IpAddr::V6(ip)) => {
                    ip.is_unspecified()
                        || (ip.segments()[0] & 0xffc0) == 0xfe80
                        || ip
                            .to_ipv4_mapped()
                            .is_some_and(|v4| v4.is_link_local() || v4.is_unspecified())
                }
                Err(_) => false,
            };
            if refused {
                Err(format!("`{host}` is a link-local or unspecified address"))
            } else {
                Ok(t.to_string())
            }
        }
        _ => Err(format!("`{t}` is not an http(s) URL")),
    }
}

/// A music on hold class name as given (trimmed), or why it is refused.
pub(crate) fn moh_class_ok(s: &str) -> Result<String, String> {
    let t = s.trim();
    if !t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        Ok(t.to_string())
    } else {
        Err(format!("`{s}` is not a music on hold class name"))
    }
}

/// Resolves one call's options from the defaults, the profiles and the call's variables
/// (`vars` holds only variables that are set and non-empty).
pub fn resolve(
    defaults: &ConferenceDefaults,
    profiles: &BTreeMap<String, Profile>,
    vars: &BTreeMap<String, String>,
) -> (Options, Vec<OptionWarning>) {
    let mut warnings = Vec::new();
    let mut o = Options {
        profile: "default".to_string(),
        muted: defaults.muted,
        beep: defaults.beep,
        start_on_enter: defaults.start_conference_on_enter,
        end_on_exit: defaults.end_conference_on_exit,
        max_participants: defaults.max_participants,
        wait_music: defaults.wait_music.clone(),
        record: defaults.record,
        status_callback: defaults.status_callback.clone(),
        status_callback_event: defaults.status_callback_event.clone(),
    };
    if let Some(name) = vars.get(VAR_PROFILE) {
        match profiles.get(name.trim()) {
            Some(p) => {
                o.profile = name.trim().to_string();
                if let Some(v) = p.muted {
                    o.muted = v;
                }
                if let Some(v) = p.beep {
                    o.beep = v;
                }
                if let Some(v) = p.start_conference_on_enter {
                    o.start_on_enter = v;
                }
                if let Some(v) = p.end_conference_on_exit {
                    o.end_on_exit = v;
                }
                if let Some(v) = p.max_participants {
                    o.max_participants = v;
                }
                if let Some(v) = &p.wait_music {
                    o.wait_music = v.clone();
                }
                if let Some(v) = p.record {
                    o.record = v;
                }
                if let Some(v) = &p.status_callback {
                    o.status_callback = v.clone();
                }
                if let Some(v) = &p.status_callback_event {
                    o.status_callback_event = v.clone();
                }
            }
            None => warnings.push(OptionWarning {
                variable: VAR_PROFILE,
                message: format!("no profile `{name}`; using the defaults"),
            }),
        }
    }
    let mut apply = |var: &'static str, f: &mut dyn FnMut(&str) -> Result<(), String>| {
        if let Some(raw) = vars.get(var) {
            if let Err(message) = f(raw) {
                warnings.push(OptionWarning {
                    variable: var,
                    message: format!("{message}; keeping the profile's value"),
                });
            }
        }
    };
    apply(VAR_MUTED, &mut |s| parse_bool(s).map(|v| o.muted = v));
    apply(VAR_BEEP, &mut |s| s.parse().map(|v| o.beep = v));
    apply(VAR_START_ON_ENTER, &mut |s| {
        parse_bool(s).map(|v| o.start_on_enter = v)
    });
    apply(VAR_END_ON_EXIT, &mut |s| {
        parse_bool(s).map(|v| o.end_on_exit = v)
    });
    apply(
        VAR_MAX_PARTICIPANTS,
        &mut |s| match s.trim().parse::<u32>() {
            Ok(n) if (1..=10_000).contains(&n) => {
                o.max_participants = n;
                Ok(())
            }
            _ => Err(format!("`{s}` is not a participant limit (1-10000)")),
        },
    );
    apply(VAR_WAIT_MUSIC, &mut |s| {
        moh_class_ok(s).map(|v| o.wait_music = v)
    });
    apply(VAR_RECORD, &mut |s| s.parse().map(|v| o.record = v));
    apply(VAR_STATUS_CALLBACK, &mut |s| {
        callback_ok(s).map(|v| o.status_callback = v)
    });
    apply(VAR_STATUS_CALLBACK_EVENT, &mut |s| {
        parse_events(s).map(|v| o.status_callback_event = v)
    });
    (o, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Status callbacks go to http(s) receivers, never to a cloud metadata service or the
    /// unspecified address; loopback stays allowed for a receiver beside the agent.
    #[test]
    fn callback_urls_refuse_link_local_and_unspecified_hosts() {
        for bad in [
            "http://169.254.169.254/latest/meta-data",
            "http://[fe80::1]/x",
            "http://[::ffff:169.254.169.254]/latest",
            "http://0.0.0.0:9090/v1/drain",
            "http://[::]/x",
            "ftp://example.com/x",
        ] {
            assert!(callback_ok(bad).is_err(), "{bad}");
        }
        for good in [
            "https://hooks.example.com/conf?token=1",
            "http://127.0.0.1:8080/events",
            "http://10.0.0.7/events",
            "http://[2001:db8::1]:8080/e",
        ] {
            assert_eq!(callback_ok(good).as_deref(), Ok(good));
        }
    }

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn profiles() -> BTreeMap<String, Profile> {
        let mut p = BTreeMap::new();
        p.insert(
            "moderator".to_string(),
            Profile {
                end_conference_on_exit: Some(true),
                beep: Some(Beep::OnExit),
                ..Profile::default()
            },
        );
        p
    }

    #[test]
    fn defaults_then_profile_then_variables() {
        let d = ConferenceDefaults::default();
        let (o, w) = resolve(&d, &profiles(), &vars(&[]));
        assert!(w.is_empty());
        assert_eq!(o.profile, "default");
        assert_eq!(o.beep, Beep::True);

        let (o, w) = resolve(
            &d,
            &profiles(),
            &vars(&[(VAR_PROFILE, "moderator"), (VAR_MUTED, "yes")]),
        );
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(o.profile, "moderator");
        assert!(o.end_on_exit && o.muted);
        assert_eq!(o.beep, Beep::OnExit);
    }

    #[test]
    fn bad_values_warn_and_keep_the_profile_value() {
        let d = ConferenceDefaults::default();
        let (o, w) = resolve(
            &d,
            &profiles(),
            &vars(&[
                (VAR_PROFILE, "nope"),
                (VAR_MUTED, "perhaps"),
                (VAR_BEEP, "loud"),
                (VAR_MAX_PARTICIPANTS, "-1"),
                (VAR_STATUS_CALLBACK, "ftp://x"),
                (VAR_STATUS_CALLBACK_EVENT, "start speak"),
                (VAR_WAIT_MUSIC, "a b"),
                (VAR_RECORD, "sometimes"),
                (VAR_START_ON_ENTER, "2"),
            ]),
        );
        assert_eq!(w.len(), 9, "{w:?}");
        assert_eq!(o.profile, "default");
        assert!(!o.muted);
        assert_eq!(o.beep, Beep::True);
        assert_eq!(o.max_participants, 250);
        assert_eq!(o.status_callback, "");
        assert_eq!(o.wait_music, "default");
        assert!(o.start_on_enter);
    }

    #[test]
    fn beep_spellings() {
        assert_eq!("onEnter".parse::<Beep>(), Ok(Beep::OnEnter));
        assert_eq!("onexit".parse::<Beep>(), Ok(Beep::OnExit));
        assert_eq!("false".parse::<Beep>(), Ok(Beep::False));
        assert!(Beep::True.on_enter() && Beep::True.on_exit());
        assert!(!Beep::OnExit.on_enter());
        for b in [Beep::True, Beep::False, Beep::OnEnter, Beep::OnExit] {
            assert_eq!(b.as_str().parse::<Beep>(), Ok(b));
        }
        assert_eq!(
            parse_events("start,end join"),
            Ok(vec![
                CallbackEvent::Start,
                CallbackEvent::End,
                CallbackEvent::Join
            ])
        );
    }
}
