//! The ARI event decoder of the node agent, and what the agent does with a `StasisStart`
//! before it talks to Asterisk: the conference name and the caller's options.

use std::collections::BTreeMap;

use serde_json::Value;

use confroute_node::ari::events::{decode, Event};
use confroute_node::config::{NodeConfig, Profile};
use confroute_node::options::{self, OPTION_VARIABLES, VAR_PROFILE};
use confroute_shared::name::ConferenceName;

use super::http_url;

/// Decodes the input as one events-WebSocket text frame.
pub fn ari_event(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let value = serde_json::from_str::<Value>(&text).ok();
    let type_name = value
        .as_ref()
        .and_then(|v| v.get("type"))
        .and_then(Value::as_str);
    match decode(&text) {
        Err(e) => {
            assert_eq!(
                e.kind,
                type_name.unwrap_or("?"),
                "error names the event type"
            );
            assert!(!e.reason.is_empty());
            assert!(!e.to_string().is_empty());
        }
        Ok(event) => {
            if let Some(t) = type_name {
                // Whether an event is one the agent handles depends on its type alone: a
                // bare object of that type is `Other` exactly when this one is.
                let bare = decode(&serde_json::json!({ "type": t }).to_string());
                assert_eq!(
                    matches!(bare, Ok(Event::Other)),
                    event == Event::Other,
                    "type {t:?} decoded as {event:?}, a bare one as {bare:?}"
                );
            }
            if let Event::StasisStart { channel, args } = event {
                stasis_start(&channel, &args);
            }
        }
    }
}

/// The agent's configuration with two profiles, so option resolution has choices.
fn config() -> NodeConfig {
    let mut cfg = NodeConfig::default();
    cfg.profiles.insert(
        "moderator".to_string(),
        Profile {
            muted: Some(false),
            end_conference_on_exit: Some(true),
            max_participants: Some(500),
            ..Profile::default()
        },
    );
    cfg.profiles.insert(
        "listener".to_string(),
        Profile {
            muted: Some(true),
            status_callback: Some("https://app.example.com/events".to_string()),
            ..Profile::default()
        },
    );
    cfg
}

thread_local! {
    static CONFIG: NodeConfig = config();
}

/// The first app argument, else the conference variable, names the conference; only a
/// valid name goes further, and the options resolved stay within their documented bounds.
fn stasis_start(channel: &confroute_node::ari::Channel, args: &[String]) {
    if let Some((app, rest)) = channel.stasis_app() {
        assert!(!app.is_empty() && !app.contains(','));
        assert!(rest.iter().all(|a| !a.contains(',')));
    }
    CONFIG.with(|cfg| {
        let raw = args
            .first()
            .filter(|a| !a.is_empty())
            .cloned()
            .or_else(|| channel.channelvar(&cfg.ari.conference_variable));
        if let Some(raw) = raw {
            if let Ok(name) = ConferenceName::parse(&raw) {
                assert_eq!(name.as_str(), raw);
            }
        }
        // The option variables as the snapshot carries them (set and non-empty).
        let vars: BTreeMap<String, String> = channel
            .channelvars
            .iter()
            .flatten()
            .filter(|(k, _)| OPTION_VARIABLES.contains(&k.as_str()))
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        let (o, warnings) = options::resolve(&cfg.conference, &cfg.profiles, &vars);
        assert!(o.profile == "default" || cfg.profiles.contains_key(&o.profile));
        if o.profile != "default" {
            assert_eq!(
                vars.get(VAR_PROFILE).map(|p| p.trim()),
                Some(o.profile.as_str())
            );
        }
        assert!((1..=10_000).contains(&o.max_participants));
        assert!(!o.wait_music.is_empty());
        assert!(
            o.wait_music
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')),
            "music class {:?}",
            o.wait_music
        );
        assert!(
            o.status_callback.is_empty() || http_url(&o.status_callback),
            "status callback {:?}",
            o.status_callback
        );
        for w in warnings {
            assert!(OPTION_VARIABLES.contains(&w.variable));
            assert!(!w.message.is_empty());
        }
    });
}
