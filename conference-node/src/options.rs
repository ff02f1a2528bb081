//! How one call's options are resolved: the `[conference]` defaults, then the profile named
//! by `CONFROUTE_PROFILE`, then single overrides from channel variables. A bad value is
//! logged and the profile's value kept. The values and their rules are shared with the
//! controller ([`confroute_shared::options`]).

use std::collections::BTreeMap;

pub use confroute_shared::options::*;

use crate::config::{ConferenceDefaults, Profile};

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
            // The name calls without a profile are reported under (`participant.list`).
            None if name.trim() == "default" => {}
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
    apply(VAR_MAX_PARTICIPANTS, &mut |s| {
        parse_max_participants(s).map(|n| o.max_participants = n)
    });
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

        let (o, w) = resolve(&d, &profiles(), &vars(&[(VAR_PROFILE, "default")]));
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(o.profile, "default");
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
}
