//! Logging setup shared by the binaries: human-readable by default, JSON on request.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// The most the WebSocket client's handshake may log (more specific than any `tungstenite`
/// directive an operator gives).
const HANDSHAKE_CAP: &str = "tungstenite::handshake=debug";

/// Installs the global tracing subscriber; `RUST_LOG` overrides `log.level` when set.
pub fn init(cfg: &LogConfig) {
    let from_env = std::env::var("RUST_LOG").ok().and_then(|v| {
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
    // At trace level the WebSocket client logs each handshake request whole, the ARI
    // credentials (its Basic authorization) included: never that, whatever the filter.
    let filter = match HANDSHAKE_CAP.parse() {
        Ok(cap) => filter.add_directive(cap),
        Err(_) => filter,
    };
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
