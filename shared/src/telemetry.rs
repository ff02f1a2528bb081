//! Logging setup shared by the binaries: human-readable by default, JSON on request.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// The most the WebSocket client's handshake may log when the filter lets trace lines through
/// (its modules too: an operator's directive naming one would be more specific).
const HANDSHAKE_CAPS: [&str; 3] = [
    "tungstenite::handshake=debug",
    "tungstenite::handshake::client=debug",
    "tungstenite::handshake::machine=debug",
];

/// At trace level the WebSocket client logs each handshake request whole, the ARI
/// credentials (its Basic authorization) included: a filter that lets any trace line through
/// gets the handshake capped at debug (a directive replaces one for the same target). One
/// that does not is left as it is: a directive turns its level on, it would add debug lines.
fn without_handshake_trace(filter: EnvFilter) -> EnvFilter {
    if filter.max_level_hint() != Some(tracing_subscriber::filter::LevelFilter::TRACE) {
        return filter;
    }
    HANDSHAKE_CAPS
        .iter()
        .filter_map(|cap| cap.parse().ok())
        .fold(filter, |f, cap| f.add_directive(cap))
}

/// Installs the global tracing subscriber; `RUST_LOG` overrides `log.level` when set.
pub fn init(cfg: &LogConfig) {
    // Set but blank (an env file passing `RUST_LOG=${RUST_LOG}` through) is unset: as a
    // filter it turns every line off, the start-up errors too.
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| {
            EnvFilter::try_new(&v)
                .map_err(|e| {
                    // Said before logging starts: the operator asked for a filter and gets another.
                    eprintln!(
                        "RUST_LOG `{v}` is not a log filter ({e}); using log.level `{}`",
                        cfg.level
                    );
                })
                .ok()
        });
    let filter = from_env
        .or_else(|| EnvFilter::try_new(&cfg.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let filter = without_handshake_trace(filter);
    // Colours only for a terminal: escape codes in a log file or a collector's stream are
    // noise to every tool that reads them.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second init (tests that start several components in one process) is harmless.
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_filter_letting_trace_through_gets_the_handshake_capped() {
        for (given, capped) in [
            ("info", false),
            ("debug", false),
            ("confroute_node=debug,warn", false),
            ("trace", true),
            ("info,tungstenite=trace", true),
            ("info,tungstenite::handshake=trace", true),
            ("info,tungstenite::handshake::client=trace", true),
        ] {
            let f = without_handshake_trace(EnvFilter::new(given)).to_string();
            for cap in HANDSHAKE_CAPS {
                assert_eq!(f.contains(cap), capped, "{given}: {f}");
            }
            assert!(!f.contains("handshake::client=trace"), "{given}: {f}");
            if !capped {
                assert_eq!(f, EnvFilter::new(given).to_string(), "{given} unchanged");
            }
        }
    }
}
