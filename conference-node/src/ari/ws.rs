//! The events WebSocket: connects with Basic auth, hands each decoded event to a sink,
//! pings to notice a dead link, and reconnects with capped exponential backoff and jitter.
//! A socket whose app another client took over (`ApplicationReplaced`) counts as lost too:
//! Asterisk keeps it open but sends it nothing more.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use super::client::AriClient;
use super::events::{decode, Event};
use crate::metrics::Metrics;

/// Receives what happens on the events WebSocket.
pub trait EventSink: Send + Sync + 'static {
    /// The WebSocket is up (the app is registered); `reconnect` is false the first time. No
    /// event of the connection is handed over before the returned future completes (or the
    /// connect timeout passes), so the sink can first tell others that it is reachable.
    fn connected(&self, reconnect: bool) -> BoxFuture<'static, ()>;
    /// The WebSocket went away.
    fn disconnected(&self);
    /// One event, in the order Asterisk sent it.
    fn event(&self, event: Event);
}

/// Reconnect and liveness settings.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Ping interval; silence for two intervals drops the link.
    pub ping_interval: Duration,
    /// Deadline for the WebSocket handshake.
    pub connect_timeout: Duration,
}

/// Delay before reconnect attempt `attempt` (0-based): exponential, capped, with jitter in
/// `[d/2, d]` so many agents restarting together do not reconnect in lockstep.
pub fn backoff(timing: &Timing, attempt: u32) -> Duration {
    let base = timing
        .reconnect_min
        .saturating_mul(2u32.saturating_pow(attempt.min(16)));
    let capped = base.min(timing.reconnect_max);
    let half = capped / 2;
    let jitter_ms = rand::random_range(0..=half.as_millis().max(1) as u64);
    half + Duration::from_millis(jitter_ms)
}

/// Runs the events WebSocket until `stop` turns true.
pub async fn run(
    client: AriClient,
    app: String,
    timing: Timing,
    metrics: Metrics,
    sink: Arc<dyn EventSink>,
    mut stop: watch::Receiver<bool>,
) {
    let url = client.events_url(&app);
    let mut attempt: u32 = 0;
    let mut replaced: u32 = 0;
    let mut ever_connected = false;
    loop {
        if stopping(&stop) {
            return;
        }
        match connect(&client, &url, timing.connect_timeout).await {
            Ok(ws) => {
                if ever_connected {
                    metrics.ari_reconnects.inc();
                }
                metrics.ari_connected.set(1);
                tracing::info!(app = %app, reconnect = ever_connected, "ARI events connected");
                let ready = sink.connected(ever_connected);
                if tokio::time::timeout(timing.connect_timeout, ready)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "the node could not say it is reachable in time; handling events anyway"
                    );
                }
                ever_connected = true;
                let since = Instant::now();
                let lost = read_loop(ws, &app, &timing, &metrics, sink.as_ref(), &mut stop).await;
                metrics.ari_connected.set(0);
                sink.disconnected();
                if stopping(&stop) {
                    return;
                }
                match lost {
                    Lost::Replaced => {
                        // Asterisk gives the app to its newest subscriber, so reconnecting takes
                        // it back. Should the other client do the same, the two back off further
                        // with each round instead of trading the app as fast as they can.
                        if since.elapsed() > timing.reconnect_max {
                            replaced = 0;
                        }
                        attempt = replaced;
                        replaced = replaced.saturating_add(1);
                        tracing::error!(app = %app, "another ARI client subscribed to the Stasis app and took it over; reconnecting to take it back");
                    }
                    Lost::Other(why) => {
                        replaced = 0;
                        // Only a connection that held starts the backoff over: one closed right
                        // after its handshake (a proxy, an Asterisk refusing the session) would
                        // otherwise be reconnected, and reconciled, ten times a second.
                        if since.elapsed() > timing.reconnect_max {
                            attempt = 0;
                        }
                        tracing::warn!(reason = %why, "ARI events connection lost; reconnecting");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "cannot connect ARI events");
            }
        }
        let delay = backoff(&timing, attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {}
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(client: &AriClient, url: &str, timeout: Duration) -> Result<Ws, String> {
    let mut req = url
        .into_client_request()
        .map_err(|e| format!("bad events URL: {e}"))?;
    let auth = HeaderValue::from_str(&client.basic_auth())
        .map_err(|_| "ARI credentials are not a valid header value".to_string())?;
    req.headers_mut().insert("Authorization", auth);
    match tokio::time::timeout(timeout, tokio_tungstenite::connect_async(req)).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp)))
            if matches!(resp.status().as_u16(), 401 | 403) =>
        {
            Err(format!(
                "Asterisk refused the ARI credentials ({}): check ari.username and ari.password against ari.conf",
                resp.status()
            ))
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no handshake within {timeout:?}")),
    }
}

/// The agent is stopping: told so, or its stop sender is gone (nobody could tell it any more).
fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Why a connection's read loop ended.
enum Lost {
    /// Another client subscribed to the app; Asterisk sends this socket nothing more.
    Replaced,
    /// The link failed or was closed.
    Other(String),
}

async fn read_loop(
    ws: Ws,
    app: &str,
    timing: &Timing,
    metrics: &Metrics,
    sink: &dyn EventSink,
    stop: &mut watch::Receiver<bool>,
) -> Lost {
    let (mut tx, mut rx) = ws.split();
    let mut ping = tokio::time::interval(timing.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    last_heard = Instant::now();
                    match decode(text.as_str()) {
                        Ok(Event::Other) => {
                            metrics.ari_events.with_label_values(&["unknown"]).inc();
                        }
                        Ok(Event::ApplicationReplaced { application })
                            if application.is_empty() || application == app =>
                        {
                            metrics.ari_events.with_label_values(&["known"]).inc();
                            let _ = tx.send(Message::Close(None)).await;
                            return Lost::Replaced;
                        }
                        Ok(ev) => {
                            metrics.ari_events.with_label_values(&["known"]).inc();
                            sink.event(ev);
                        }
                        Err(e) => {
                            metrics.ari_events.with_label_values(&["malformed"]).inc();
                            tracing::warn!(error = %e, "ignoring malformed ARI event");
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return Lost::Other(format!("closed by Asterisk ({frame:?})"));
                }
                Some(Ok(_)) => last_heard = Instant::now(),
                Some(Err(e)) => return Lost::Other(e.to_string()),
                None => return Lost::Other("connection ended".to_string()),
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > timing.ping_interval * 2 {
                    return Lost::Other(format!("no answer to pings for {:?}", last_heard.elapsed()));
                }
                if let Err(e) = tx.send(Message::Ping(Vec::new().into())).await {
                    return Lost::Other(format!("ping failed: {e}"));
                }
            }
            _ = stop.changed() => {
                let _ = tx.send(Message::Close(None)).await;
                return Lost::Other("stopping".to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let t = Timing {
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(2),
            ping_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
        };
        for _ in 0..50 {
            let d0 = backoff(&t, 0);
            assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(101));
            let d3 = backoff(&t, 3);
            assert!(d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(801));
            let d20 = backoff(&t, 20);
            assert!(d20 >= Duration::from_secs(1) && d20 <= Duration::from_millis(2001));
        }
    }
}
