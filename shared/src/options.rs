//! Conference option values as in TwiML `<Conference>`: their types, the channel
//! variables that carry them, and the rules a value must meet. The node agent resolves a
//! call's options with them; the controller checks a dial-out's options with the same rules
//! before it homes a conference, so a refused one changes nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

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
            // The booleans `parse_bool` (and `record`) take: `off` must not beep.
            "true" | "yes" | "1" | "on" => Ok(Beep::True),
            "false" | "no" | "0" | "off" => Ok(Beep::False),
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
        let s = crate::config::string_like(d)?;
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
        // Any case, and the booleans every other option takes, as the Twilio libraries
        // write them (`True`, `record-from-start`).
        match s.trim().to_ascii_lowercase().as_str() {
            "do-not-record" | "false" | "no" | "0" | "off" => Ok(Record::DoNotRecord),
            "record-from-start" | "true" | "yes" | "1" | "on" => Ok(Record::RecordFromStart),
            _ => Err(format!(
                "`{s}` is not a record setting; expected do-not-record or record-from-start"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Record {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = crate::config::string_like(d)?;
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
            w if UNSENT_TWILIO_EVENTS.contains(&w) => Err(format!(
                "`{w}` is a Twilio event confroute sends no callback for; expected start, end, join, leave, mute or hold"
            )),
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

/// Twilio `statusCallbackEvent` words for callbacks confroute does not send.
pub const UNSENT_TWILIO_EVENTS: [&str; 3] = ["modify", "speaker", "announcement"];

/// Parses a TwiML event list: space or comma separated. Twilio's words for callbacks
/// confroute does not send are skipped, so a list written for Twilio keeps the events that
/// are sent; any other unknown word makes the list bad.
pub fn parse_events(s: &str) -> Result<Vec<CallbackEvent>, String> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty() && !UNSENT_TWILIO_EVENTS.contains(p))
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

/// A TwiML boolean (`true`/`false`, also yes/no, 1/0, on/off).
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" => Ok(false),
        _ => Err(format!("`{s}` is not a boolean; expected true or false")),
    }
}

/// Whether a status callback may not be sent to `ip`: a cloud metadata service (any
/// link-local address, AWS's IPv6 `fd00:ec2::254`, Alibaba's `100.100.100.200`) or the
/// unspecified address (the host itself).
pub fn callback_address_refused(ip: std::net::IpAddr) -> bool {
    let v4_refused = |v4: std::net::Ipv4Addr| {
        v4.is_link_local() || v4.is_unspecified() || v4 == ALIBABA_METADATA
    };
    match ip {
        std::net::IpAddr::V4(ip) => v4_refused(ip),
        std::net::IpAddr::V6(ip) => {
            let seg = ip.segments();
            // NAT64's well-known prefix (RFC 6052) reaches the IPv4 address in its last 32 bits.
            let nat64 = (seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0]).then(|| {
                std::net::Ipv4Addr::new(
                    (seg[6] >> 8) as u8,
                    seg[6] as u8,
                    (seg[7] >> 8) as u8,
                    seg[7] as u8,
                )
            });
            ip.is_unspecified()
                || (seg[0] & 0xffc0) == 0xfe80
                || ip == AWS_METADATA_V6
                || ip.to_ipv4_mapped().or(nat64).is_some_and(v4_refused)
        }
    }
}

/// Alibaba Cloud's metadata service, outside the link-local range.
const ALIBABA_METADATA: std::net::Ipv4Addr = std::net::Ipv4Addr::new(100, 100, 100, 200);
/// AWS's IPv6 metadata service (Nitro instances), a unique-local address.
const AWS_METADATA_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// A status callback URL as given (trimmed; empty for none), or why it is refused.
pub fn callback_ok(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(String::new());
    }
    match url::Url::parse(t) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
            // Link-local addresses are cloud metadata services, and unspecified ones reach
            // the host itself: no status callback belongs there.
            // A name is checked where it is resolved, at each delivery (the agent's
            // webhook resolver), with the same rule.
            let host = u.host_str().unwrap_or("");
            let literal = host.trim_start_matches('[').trim_end_matches(']');
            let refused = literal
                .parse::<std::net::IpAddr>()
                .is_ok_and(callback_address_refused);
            if refused {
                Err(format!("`{host}` is a link-local or unspecified address"))
            } else {
                Ok(t.to_string())
            }
        }
        // The value itself stays out: it may carry a password or a token, and these
        // messages are logged.
        _ => Err(match t.split_once("://") {
            Some((scheme, _))
                if !scheme.is_empty()
                    && scheme.len() <= 16
                    && scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
                    && !scheme.eq_ignore_ascii_case("http")
                    && !scheme.eq_ignore_ascii_case("https") =>
            {
                format!("not an http(s) URL (scheme `{scheme}`)")
            }
            _ => "not an http(s) URL with a host".to_string(),
        }),
    }
}

/// A music on hold class name as given (trimmed), or why it is refused.
pub fn moh_class_ok(s: &str) -> Result<String, String> {
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

/// A `maxParticipants` value, or why it is refused.
pub fn parse_max_participants(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        _ => Err(format!("`{s}` is not a participant limit (1-10000)")),
    }
}

/// Checks one option variable's value by the rules the agent applies to it. A profile name
/// is not checked here: only the agent knows its profiles.
pub fn check_variable(var: &str, raw: &str) -> Result<(), String> {
    match var {
        VAR_MUTED | VAR_START_ON_ENTER | VAR_END_ON_EXIT => parse_bool(raw).map(drop),
        VAR_BEEP => raw.parse::<Beep>().map(drop),
        VAR_MAX_PARTICIPANTS => parse_max_participants(raw).map(drop),
        VAR_WAIT_MUSIC => moh_class_ok(raw).map(drop),
        VAR_RECORD => raw.parse::<Record>().map(drop),
        VAR_STATUS_CALLBACK => callback_ok(raw).map(drop),
        VAR_STATUS_CALLBACK_EVENT => parse_events(raw).map(drop),
        _ => Ok(()),
    }
}

/// A dial-out's option names (TwiML) and the channel variables that carry them.
pub const DIALOUT_OPTIONS: &[(&str, &str)] = &[
    ("profile", VAR_PROFILE),
    ("muted", VAR_MUTED),
    ("beep", VAR_BEEP),
    ("startConferenceOnEnter", VAR_START_ON_ENTER),
    ("endConferenceOnExit", VAR_END_ON_EXIT),
    ("maxParticipants", VAR_MAX_PARTICIPANTS),
    ("waitMusic", VAR_WAIT_MUSIC),
    ("record", VAR_RECORD),
    ("statusCallback", VAR_STATUS_CALLBACK),
    ("statusCallbackEvent", VAR_STATUS_CALLBACK_EVENT),
];

/// The TwiML name of the dial-out option a variable carries.
pub fn dialout_option_name(var: &str) -> Option<&'static str> {
    DIALOUT_OPTIONS
        .iter()
        .find(|(_, v)| *v == var)
        .map(|(k, _)| *k)
}

/// A dial-out's `options` map as `CONFROUTE_*` channel variables; an unknown option or a
/// value that is not text is an error naming it. A number is its text, and a whole number
/// written with a fraction (`5.0`) is that integer.
pub fn dialout_variables(given: &Map<String, Value>) -> Result<BTreeMap<String, String>, String> {
    let mut vars = BTreeMap::new();
    for (key, value) in given {
        let Some((_, var)) = DIALOUT_OPTIONS.iter().find(|(k, _)| k == key) else {
            let known: Vec<&str> = DIALOUT_OPTIONS.iter().map(|(k, _)| *k).collect();
            return Err(format!(
                "options.{}: unknown option; expected one of {}",
                key.chars().take(64).collect::<String>(),
                known.join(", ")
            ));
        };
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => match n.as_f64() {
                Some(f) if !n.is_i64() && !n.is_u64() && f.fract() == 0.0 && f.abs() < 1e15 => {
                    format!("{}", f as i64)
                }
                _ => n.to_string(),
            },
            // Only the event list has several values.
            Value::Array(items)
                if *var == VAR_STATUS_CALLBACK_EVENT && items.iter().all(Value::is_string) =>
            {
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            }
            _ if *var == VAR_STATUS_CALLBACK_EVENT => {
                return Err(format!(
                    "options.{key}: expected a string or an array of strings"
                ))
            }
            _ => {
                return Err(format!(
                    "options.{key}: expected a string, a boolean or a number"
                ))
            }
        };
        // An empty value is an unset variable to every agent that reads the callee's
        // channel (a restarted one too), but would be "none" to the one that dials: refused,
        // so the option means one thing.
        if text.trim().is_empty() {
            return Err(format!(
                "options.{key}: empty; leave the option out to use the profile's value"
            ));
        }
        vars.insert(var.to_string(), text);
    }
    Ok(vars)
}

/// Checks a dial-out's `options` by the agent's rules (all but a profile's existence); the
/// error names the option as the agent's would.
pub fn check_dialout_options(given: &Map<String, Value>) -> Result<(), String> {
    for (var, raw) in dialout_variables(given)? {
        if let Err(why) = check_variable(&var, &raw) {
            let key = dialout_option_name(&var).unwrap_or("options");
            return Err(format!("options.{key}: {why}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn beep_reads_any_case_and_the_booleans() {
        for on in ["true", "YES", "1", " On "] {
            assert_eq!(on.parse::<Beep>(), Ok(Beep::True), "{on}");
        }
        for off in ["false", "No", "0", "OFF"] {
            assert_eq!(off.parse::<Beep>(), Ok(Beep::False), "{off}");
        }
        assert_eq!("onenter".parse::<Beep>(), Ok(Beep::OnEnter));
        assert_eq!("onExit".parse::<Beep>(), Ok(Beep::OnExit));
        assert!("loud".parse::<Beep>().is_err());
    }

    #[test]
    fn record_reads_any_case_and_the_booleans() {
        for on in [
            "record-from-start",
            "Record-From-Start",
            "true",
            "True",
            "YES",
            "1",
            " on ",
        ] {
            assert_eq!(on.parse::<Record>(), Ok(Record::RecordFromStart), "{on}");
        }
        for off in [
            "do-not-record",
            "DO-NOT-RECORD",
            "false",
            "False",
            "no",
            "0",
        ] {
            assert_eq!(off.parse::<Record>(), Ok(Record::DoNotRecord), "{off}");
        }
        assert!("sometimes".parse::<Record>().is_err());
    }

    /// Status callbacks go to http(s) receivers, never to a cloud metadata service or the
    /// unspecified address; loopback stays allowed for a receiver beside the agent.
    #[test]
    fn a_refused_callback_url_is_not_repeated_in_its_error() {
        for (bad, why) in [
            (
                "htps://app:s3cret@host/cb?token=X",
                "not an http(s) URL (scheme `htps`)",
            ),
            (
                "app:s3cret@host/cb?token=X",
                "not an http(s) URL with a host",
            ),
            (
                "https://:s3cret@/cb?token=X",
                "not an http(s) URL with a host",
            ),
        ] {
            assert_eq!(callback_ok(bad), Err(why.to_string()), "{bad}");
        }
    }

    #[test]
    fn callback_urls_refuse_link_local_and_unspecified_hosts() {
        for bad in [
            "http://169.254.169.254/latest/meta-data",
            "http://[fe80::1]/x",
            "http://[::ffff:169.254.169.254]/latest",
            "http://[64:ff9b::a9fe:a9fe]/latest",
            "http://0.0.0.0:9090/v1/drain",
            "http://[::]/x",
            "http://[fd00:ec2::254]/latest/meta-data",
            "http://100.100.100.200/latest/meta-data",
            "http://[::ffff:100.100.100.200]/latest",
            "ftp://example.com/x",
        ] {
            assert!(callback_ok(bad).is_err(), "{bad}");
        }
        for good in [
            "https://hooks.example.com/conf?token=1",
            "http://127.0.0.1:8080/events",
            "http://10.0.0.7/events",
            "http://[2001:db8::1]:8080/e",
            "http://[64:ff9b::a00:7]/events",
            "http://100.100.100.201/events",
            "http://[fd00:ec2::255]/events",
        ] {
            assert_eq!(callback_ok(good).as_deref(), Ok(good));
        }
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
        // A Twilio application's whole list: the events confroute sends are kept.
        assert_eq!(
            parse_events("start end join leave mute hold modify speaker announcement"),
            Ok(vec![
                CallbackEvent::Start,
                CallbackEvent::End,
                CallbackEvent::Join,
                CallbackEvent::Leave,
                CallbackEvent::Mute,
                CallbackEvent::Hold
            ])
        );
        assert!(parse_events("start jion").is_err_and(|e| e.contains("`jion`")));
        // Alone (a configured list), such a word says why it is refused.
        assert!("speaker"
            .parse::<CallbackEvent>()
            .is_err_and(|e| e.contains("sends no callback for")));
    }

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn dialout_options_are_checked_by_the_agents_rules() {
        assert_eq!(
            check_dialout_options(&map(json!({"muted": true, "maxParticipants": 5.0,
                "statusCallbackEvent": ["start", "end"], "profile": "any"}))),
            Ok(())
        );
        let vars = dialout_variables(&map(json!({"maxParticipants": 5.0}))).expect("vars");
        assert_eq!(vars[VAR_MAX_PARTICIPANTS], "5");
        for (bad, says) in [
            (json!({"bogus": 1}), "options.bogus: unknown option"),
            (json!({"muted": "x"}), "options.muted: `x` is not a boolean"),
            (
                json!({"maxParticipants": 5.5}),
                "options.maxParticipants: `5.5`",
            ),
            (json!({"beep": "loud"}), "options.beep: `loud`"),
            (json!({"record": {}}), "options.record: expected a string"),
            (
                json!({"statusCallback": "http://169.254.169.254/x"}),
                "options.statusCallback:",
            ),
            (
                json!({"statusCallbackEvent": "speak"}),
                "options.statusCallbackEvent:",
            ),
            (json!({"waitMusic": "a b"}), "options.waitMusic:"),
            (
                json!({"muted": ["true"]}),
                "options.muted: expected a string, a boolean or a number",
            ),
            (
                json!({"maxParticipants": ["7"]}),
                "options.maxParticipants: expected a string",
            ),
            (
                json!({"profile": ["moderator"]}),
                "options.profile: expected a string",
            ),
            (json!({"waitMusic": ["x"]}), "options.waitMusic: expected"),
            (
                json!({"statusCallbackEvent": [1]}),
                "options.statusCallbackEvent: expected a string or an array of strings",
            ),
            (
                json!({"statusCallbackEvent": ""}),
                "options.statusCallbackEvent: empty",
            ),
            (
                json!({"statusCallbackEvent": []}),
                "options.statusCallbackEvent: empty",
            ),
            (
                json!({"statusCallback": " "}),
                "options.statusCallback: empty",
            ),
            (json!({"profile": ""}), "options.profile: empty"),
        ] {
            let e = check_dialout_options(&map(bad.clone())).expect_err("refused");
            assert!(e.starts_with(says), "{bad}: {e}");
        }
    }
}
