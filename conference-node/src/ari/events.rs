//! ARI events (Asterisk's `events.json`) as the agent reads them: only the fields it uses,
//! unknown fields ignored, unknown event types kept as [`Event::Other`].

use std::collections::BTreeMap;

use serde::Deserialize;

/// A channel snapshot (the fields the agent reads).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Channel {
    /// Unique id.
    pub id: String,
    /// Channel name, e.g. `PJSIP/trunk-00000001`.
    #[serde(default)]
    pub name: String,
    /// State (`Ring`, `Up`, ...).
    #[serde(default)]
    pub state: String,
    /// Caller id.
    #[serde(default)]
    pub caller: CallerId,
    /// Where it is in the dialplan.
    #[serde(default)]
    pub dialplan: Option<Dialplan>,
    /// Variables listed in ari.conf `channelvars`, when configured.
    #[serde(default)]
    pub channelvars: Option<BTreeMap<String, serde_json::Value>>,
    /// When Asterisk created it, e.g. `2016-12-20T13:45:28.370-0600`.
    #[serde(default)]
    pub creationtime: String,
}

impl Channel {
    /// [`Channel::creationtime`] in ms since the epoch; `None` when absent or malformed.
    pub fn created_ms(&self) -> Option<u64> {
        parse_time(&self.creationtime)
    }
}

/// An ARI timestamp (`YYYY-MM-DDTHH:MM:SS.mmm±HHMM`, as Asterisk writes them) in ms since
/// the epoch.
pub fn parse_time(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 28
        || [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
        ]
        .iter()
        .any(|(i, c)| b[*i] != *c)
    {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let part = s.get(from..to)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec, ms) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 23)?);
    let sign = match b[23] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (tzh, tzm) = (num(24, 26)?, num(26, 28)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - sign * (tzh * 3600 + tzm * 60);
    u64::try_from(secs * 1000 + ms).ok()
}

/// Caller id name and number.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct CallerId {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Number.
    #[serde(default)]
    pub number: String,
}

/// A channel's dialplan location.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Dialplan {
    /// Context.
    #[serde(default)]
    pub context: String,
    /// Extension.
    #[serde(default)]
    pub exten: String,
    /// Application running (`Stasis` inside an app).
    #[serde(default)]
    pub app_name: String,
    /// Its arguments (`confroute,sales-42`).
    #[serde(default)]
    pub app_data: String,
}

impl Channel {
    /// The channel variable `name` as listed in `channelvars`; `None` when absent or empty.
    pub fn channelvar(&self, name: &str) -> Option<String> {
        self.channelvars
            .as_ref()?
            .get(name)?
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }

    /// `(app, args)` when the channel is running `Stasis(app,args...)`.
    pub fn stasis_app(&self) -> Option<(String, Vec<String>)> {
        let d = self.dialplan.as_ref()?;
        if !d.app_name.eq_ignore_ascii_case("Stasis") {
            return None;
        }
        let mut parts = d.app_data.split(',').map(str::to_string);
        let app = parts.next().filter(|a| !a.is_empty())?;
        Some((app, parts.collect()))
    }
}

/// A bridge snapshot.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Bridge {
    /// Unique id.
    pub id: String,
    /// `mixing` or `holding`.
    #[serde(default)]
    pub bridge_type: String,
    /// Name given at creation.
    #[serde(default)]
    pub name: String,
    /// Member channel ids.
    #[serde(default)]
    pub channels: Vec<String>,
}

/// A playback snapshot.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Playback {
    /// Playback id.
    pub id: String,
    /// `queued`, `playing`, `done`, ...
    #[serde(default)]
    pub state: String,
}

/// A live recording snapshot.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct LiveRecording {
    /// Recording name.
    pub name: String,
    /// State.
    #[serde(default)]
    pub state: String,
}

/// One event from the events WebSocket.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "type")]
pub enum Event {
    /// A channel entered the app.
    StasisStart {
        /// The channel.
        channel: Channel,
        /// `Stasis()` arguments after the app name.
        #[serde(default)]
        args: Vec<String>,
    },
    /// A channel left the app (hung up, moved, or continued in the dialplan).
    StasisEnd {
        /// The channel.
        channel: Channel,
    },
    /// A channel entered a bridge.
    ChannelEnteredBridge {
        /// The channel (optional in the Swagger's model).
        #[serde(default)]
        channel: Option<Channel>,
        /// The bridge.
        bridge: Bridge,
    },
    /// A channel left a bridge.
    ChannelLeftBridge {
        /// The channel.
        channel: Channel,
        /// The bridge.
        bridge: Bridge,
    },
    /// The caller put the call on hold.
    ChannelHold {
        /// The channel.
        channel: Channel,
    },
    /// The caller took the call off hold.
    ChannelUnhold {
        /// The channel.
        channel: Channel,
    },
    /// A playback finished.
    PlaybackFinished {
        /// The playback.
        playback: Playback,
    },
    /// A recording finished: stopped, or ended by Asterisk.
    RecordingFinished {
        /// The recording.
        recording: LiveRecording,
    },
    /// A recording failed.
    RecordingFailed {
        /// The recording.
        recording: LiveRecording,
    },
    /// Progress of an outgoing call (originate): `dialstatus` is empty when the dial
    /// starts, then `ANSWER`, `BUSY`, `NOANSWER`, `CONGESTION`, ... (`RINGING` and
    /// `PROGRESS` only where a calling channel is dialled, never for an originate).
    Dial {
        /// The called channel.
        peer: Channel,
        /// Dial status.
        #[serde(default)]
        dialstatus: String,
    },
    /// A channel's state changed. An originated call's ringing shows only here (state
    /// `Ringing`, from a 180): Asterisk's dialler, having no calling channel, publishes no
    /// Dial event for it (`handle_frame_ownerless` in main/dial.c).
    ChannelStateChange {
        /// The channel, with its new state.
        channel: Channel,
    },
    /// Something asked for the channel to hang up; `cause` is Q.850 unless `soft`.
    ChannelHangupRequest {
        /// The channel.
        channel: Channel,
        /// Q.850 cause (a soft-hangup flag when `soft`).
        #[serde(default)]
        cause: Option<i64>,
        /// True when the request came from inside Asterisk (ARI hangup, dialplan).
        #[serde(default)]
        soft: Option<bool>,
    },
    /// The channel is gone, with its Q.850 hangup cause.
    ChannelDestroyed {
        /// The channel.
        channel: Channel,
        /// Q.850 cause.
        #[serde(default)]
        cause: i64,
    },
    /// Talk detection (`TALK_DETECT(set)`) heard the channel start talking.
    ChannelTalkingStarted {
        /// The channel.
        channel: Channel,
    },
    /// Talk detection heard the channel stop talking.
    ChannelTalkingFinished {
        /// The channel.
        channel: Channel,
    },
    /// A bridge was destroyed.
    BridgeDestroyed {
        /// The bridge.
        bridge: Bridge,
    },
    /// Another WebSocket took over this app.
    ApplicationReplaced {
        /// The app.
        #[serde(default)]
        application: String,
    },
    /// Any other event type; ignored.
    #[serde(other)]
    Other,
}

/// Why an event could not be read.
#[derive(Debug, thiserror::Error)]
#[error("malformed ARI event (type {kind}): {reason}")]
pub struct DecodeError {
    /// The event's `type`, or `?` when it has none.
    pub kind: String,
    /// What was wrong.
    pub reason: String,
}

/// Decodes one WebSocket text frame.
pub fn decode(text: &str) -> Result<Event, DecodeError> {
    serde_json::from_str::<Event>(text).map_err(|e| {
        let kind = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
            .unwrap_or_else(|| "?".to_string());
        DecodeError {
            kind,
            reason: e.to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ari_timestamps_are_read_with_their_zone() {
        // 2016-12-20T19:45:28.370Z, written in UTC-6 and in UTC.
        assert_eq!(
            parse_time("2016-12-20T13:45:28.370-0600"),
            Some(1_482_263_128_370)
        );
        assert_eq!(
            parse_time("2016-12-20T19:45:28.370+0000"),
            Some(1_482_263_128_370)
        );
        assert_eq!(parse_time("1970-01-01T00:00:00.000+0000"), Some(0));
        assert_eq!(
            parse_time("2024-02-29T00:00:00.000+0000"),
            Some(1_709_164_800_000)
        );
        for bad in [
            "",
            "x",
            "2016-12-20 13:45:28.370-0600",
            "2016-13-20T13:45:28.370-0600",
            "2016-12-20T13:45:28.370*0600",
            "2016-12-20T13:45:28.37a-0600",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn stasis_start_with_unknown_fields_decodes() {
        let text = r#"{"type":"StasisStart","timestamp":"2024-01-01T00:00:00.000+0000",
            "args":["sales-42"],"application":"confroute","asterisk_id":"x","new_field":{"a":1},
            "channel":{"id":"1.1","name":"PJSIP/trunk-00000001","state":"Ring",
              "caller":{"name":"","number":"+1555"},"connected":{"name":"","number":""},
              "accountcode":"","dialplan":{"context":"default","exten":"s","priority":1,
              "app_name":"Stasis","app_data":"confroute,sales-42"},"creationtime":"x",
              "language":"en","channelvars":{"CONFROUTE_MUTED":"true","EMPTY":""}}}"#;
        let ev = decode(text).expect("decodes");
        match ev {
            Event::StasisStart { channel, args } => {
                assert_eq!(args, vec!["sales-42"]);
                assert_eq!(channel.state, "Ring");
                assert_eq!(
                    channel.channelvar("CONFROUTE_MUTED").as_deref(),
                    Some("true")
                );
                assert_eq!(channel.channelvar("EMPTY"), None);
                assert_eq!(
                    channel.stasis_app(),
                    Some(("confroute".to_string(), vec!["sales-42".to_string()]))
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn call_progress_events_decode() {
        let ev =
            decode(r#"{"type":"Dial","peer":{"id":"p1"},"dialstatus":"RINGING","dialstring":"x"}"#)
                .expect("decodes");
        assert!(
            matches!(ev, Event::Dial { ref peer, ref dialstatus } if peer.id == "p1" && dialstatus == "RINGING")
        );
        let ev = decode(r#"{"type":"ChannelDestroyed","channel":{"id":"p1"},"cause":17,"cause_txt":"User busy"}"#)
            .expect("decodes");
        assert!(matches!(ev, Event::ChannelDestroyed { cause: 17, .. }));
        let ev = decode(
            r#"{"type":"ChannelHangupRequest","channel":{"id":"p1"},"soft":true,"cause":32}"#,
        )
        .expect("decodes");
        assert!(matches!(
            ev,
            Event::ChannelHangupRequest {
                soft: Some(true),
                ..
            }
        ));
        let ev =
            decode(r#"{"type":"ChannelTalkingStarted","channel":{"id":"x"}}"#).expect("decodes");
        assert!(matches!(ev, Event::ChannelTalkingStarted { .. }));
    }

    #[test]
    fn unknown_event_types_are_other() {
        let ev = decode(r#"{"type":"ChannelDtmfReceived","channel":{"id":"x"},"digit":"1"}"#)
            .expect("decodes");
        assert_eq!(ev, Event::Other);
        let ev =
            decode(r#"{"type":"SomethingFromAsterisk30","whatever":[1,2,3]}"#).expect("decodes");
        assert_eq!(ev, Event::Other);
    }

    #[test]
    fn malformed_events_are_errors_naming_the_type() {
        let err =
            decode(r#"{"type":"StasisStart","channel":"not an object"}"#).expect_err("bad channel");
        assert_eq!(err.kind, "StasisStart");
        let err = decode(r#"{"type":"StasisEnd"}"#).expect_err("missing channel");
        assert_eq!(err.kind, "StasisEnd");
        let err = decode("not json at all").expect_err("not json");
        assert_eq!(err.kind, "?");
        let err = decode(r#"{"no_type":true}"#).expect_err("no type");
        assert_eq!(err.kind, "?");
        let err = decode(r#"[1,2]"#).expect_err("array");
        assert_eq!(err.kind, "?");
        let err =
            decode(r#"{"type":"ChannelEnteredBridge","channel":{"id":"a"},"bridge":{"id":7}}"#)
                .expect_err("bad bridge id");
        assert_eq!(err.kind, "ChannelEnteredBridge");
        // The Swagger makes the channel optional: an event without one is still read.
        assert!(matches!(
            decode(r#"{"type":"ChannelEnteredBridge","bridge":{"id":"b"}}"#),
            Ok(Event::ChannelEnteredBridge { channel: None, .. })
        ));
    }
}
