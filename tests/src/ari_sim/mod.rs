//! ARI simulator: a stand-in for Asterisk's REST Interface for tests that cannot run Asterisk.
//!
//! Each [`AriSim`] is one simulated Asterisk on its own port. It serves `/ari` with the paths,
//! parameters, status codes, error bodies and events of Asterisk's own Swagger files (read from
//! `$ARI_API_DOCS`, default `../shared/ari-api-docs` from the repo root) and of its source where
//! the Swagger is silent; it serves `/ari/api-docs/...` so client libraries that build themselves
//! from the docs (npm `ari-client`) work unchanged; and it lets tests play the network: callers
//! dialling in, far ends answering or refusing, restarts, stalls and dropped WebSockets.
//!
//! ```no_run
//! # async fn demo() -> Result<(), confroute_tests::ari_sim::SimError> {
//! use confroute_tests::ari_sim::{AriSim, DialIn, EndpointMatch, Outcome, SimConfig};
//! let sim = AriSim::start(SimConfig { username: "u".into(), password: "p".into(), ..Default::default() }).await?;
//! let url = sim.base_url(); // http://127.0.0.1:PORT, ARI under /ari
//! // ... an ARI client connects its events WebSocket with app=confroute ...
//! let ch = sim.dial_in(DialIn {
//!     app: "confroute".into(),
//!     args: vec!["sales-42".into()],
//!     caller_number: "+15550001".into(),
//!     extension: "sales-42".into(),
//!     sip_headers: [("X-Conference".into(), "sales-42".into())].into(),
//!     ..Default::default()
//! }).await?;
//! sim.send_dtmf_from_caller(&ch, "1#").await?;
//! sim.set_originate_behavior(EndpointMatch::prefix("PJSIP/5551"), Outcome::Busy);
//! sim.hangup_far_end(&ch, 16).await?;
//! # Ok(()) }
//! ```
//!
//! Without a scenario, a channel originated to any endpoint rings for [`SimConfig::ring_time`]
//! and answers, then runs `Stasis(app,appArgs)` when the originate named an `app`.
//!
//! The `ari-sim` binary serves one simulator per `--listen` address, with a scenario control
//! API under `/_sim/` (see below). The benchmark
//! `cargo run --release -p confroute-tests --bin ari-sim-bench -- --servers 3 --joins 30000`
//! measures channel joins per second (see `README.md` in this folder).
//!
//! # Scenario control over HTTP
//! Every server also answers, without authentication, under `/_sim/`:
//! `POST /_sim/dial-in` (a [`DialIn`] as JSON; answers `{"channel_id": ...}`),
//! `POST /_sim/channels/{id}/hangup` (`{"cause": 16}`), `POST /_sim/channels/{id}/dtmf`
//! (`{"digits": "1#"}`), `POST /_sim/channels/{id}/hold`, `.../unhold`, `.../answer`,
//! `POST /_sim/originate-behavior` (`{"match": {"prefix": "PJSIP/5551"}, "outcome": "busy"}`;
//! outcomes `busy`, `no_answer`, `congested`, `rejected`, `manual`, `{"answer_after": MS}`),
//! `DELETE /_sim/originate-behavior`, `POST /_sim/restart` (`{"downtime_ms": 500}`),
//! `POST /_sim/stall` (`{"ms": 3000}`), `POST /_sim/drop-websockets`, `GET /_sim/snapshot`,
//! `GET`/`DELETE /_sim/requests` and `GET`/`DELETE /_sim/events`.

#![warn(missing_docs)]

pub mod client;
mod control;
mod engine;
mod http;
mod listener;
mod ops;
mod routes;
mod scenario;
pub mod spec;
mod time;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use engine::{Core, WsCmd};

pub use engine::{
    AppSnapshot, BridgeSnapshot, ChannelSnapshot, PlaybackSnapshot, RecordingSnapshot,
    RequestRecord, SimSnapshot,
};
pub use routes::{route_table, RouteInfo};
pub use scenario::{cause_text, DialIn, EndpointMatch, Outcome};
pub use time::ari_timestamp;

/// How long [`AriSim::restart`] keeps the port closed.
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(200);

/// Settings of one simulated Asterisk.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// ARI user name.
    pub username: String,
    /// ARI password.
    pub password: String,
    /// Folder with the Swagger files; `None`: `$ARI_API_DOCS` or `../shared/ari-api-docs`.
    pub api_docs: Option<PathBuf>,
    /// Entity id (`asterisk_id` of events); `None`: derived from the port.
    pub asterisk_id: Option<String>,
    /// Asterisk `systemname` (prefixes channel unique ids when set).
    pub system_name: String,
    /// Asterisk version reported by `/asterisk/info`.
    pub version: String,
    /// Variables and functions reported in every channel's `channelvars` (ari.conf `channelvars`).
    pub channelvars: Vec<String>,
    /// How long an originated channel rings before the default far end answers.
    pub ring_time: Duration,
    /// How long before a busy, congested or rejecting far end gives its answer.
    pub reject_delay: Duration,
    /// Length of each media item of a playback.
    pub playback_duration: Duration,
    /// `duration_ms` of DTMF digits from callers.
    pub dtmf_duration_ms: u32,
    /// Asterisk before asterisk/asterisk#1094 (2025; every 16–19 release and the 20, 21 and
    /// 22 releases before it): `createWithId` on a bridge that exists is taken for an update:
    /// 500 when it names a type or another name, 200 without a body otherwise; not 409.
    pub bridge_update_on_create: bool,
    /// Keep every delivered event for [`AriSim::event_log`] (turn off for load runs).
    pub record_events: bool,
    /// Keep every request for [`AriSim::request_log`] (turn off for load runs).
    pub record_requests: bool,
    /// http.conf `sessionlimit`: HTTP connections (the events WebSocket's included) open
    /// at once; Asterisk closes any beyond it at once, unanswered.
    pub session_limit: usize,
    /// `POST /channels/{channelId}/progress` exists (Asterisk 20.16, 21.11, 22.6 and later);
    /// false: an older Asterisk, which answers it 404 "Resource not found".
    pub progress_route: bool,
    /// An Asterisk from before hangup's `reason_code` and its longer list of reasons: a
    /// hangup takes only `normal`, `busy` and `congestion` (400 "Invalid reason for hangup
    /// provided" for any other) and ignores `reason_code`, as it ignores any parameter it
    /// does not know.
    pub classic_hangup_reasons: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            username: "asterisk".into(),
            password: "asterisk".into(),
            api_docs: None,
            asterisk_id: None,
            system_name: String::new(),
            version: "23.0.0".into(),
            channelvars: Vec::new(),
            ring_time: Duration::from_millis(100),
            reject_delay: Duration::from_millis(20),
            playback_duration: Duration::from_millis(100),
            dtmf_duration_ms: 100,
            bridge_update_on_create: false,
            record_events: true,
            record_requests: true,
            // http.conf's default.
            session_limit: 100,
            progress_route: true,
            classic_hangup_reasons: false,
        }
    }
}

/// What went wrong starting or driving a simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
    /// No channel with this id.
    #[error("no channel {0}")]
    NoSuchChannel(String),
    /// A channel with this id exists already.
    #[error("channel {0} exists already")]
    DuplicateChannel(String),
    /// The call reached `Stasis()` but its app has no WebSocket; Asterisk hung the call up.
    #[error(
        "Stasis application {0:?} is not registered or has no WebSocket; the call was hung up"
    )]
    AppNotActive(String),
    /// The channel is not ringing out, so its far end cannot answer.
    #[error("channel {0} is not ringing")]
    NotRinging(String),
    /// Not a DTMF digit.
    #[error("invalid DTMF digit {0:?}")]
    BadDigit(char),
    /// The simulated Asterisk is down (crashed or restarting).
    #[error("the simulated Asterisk is down")]
    Down,
}

struct Guard {
    task: JoinHandle<()>,
    core: Weak<Core>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(core) = self.core.upgrade() {
            core.lock().crash();
            core.ctl.send_modify(|c| {
                c.up = false;
                c.generation += 1;
            });
        }
    }
}

/// Handle to one simulated Asterisk; cheap to clone. The server stops when the last handle
/// from [`AriSim::start`] is dropped, or on [`AriSim::shutdown`].
#[derive(Clone)]
pub struct AriSim {
    core: Arc<Core>,
    addr: SocketAddr,
    guard: Option<Arc<Guard>>,
    peak_sessions: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for AriSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AriSim").field("addr", &self.addr).finish()
    }
}

impl AriSim {
    /// Starts a simulated Asterisk serving ARI on `cfg.listen`.
    pub async fn start(cfg: SimConfig) -> Result<AriSim, SimError> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| SimError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SimError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let mut cfg = cfg;
        cfg.listen = addr;
        let asterisk_id = cfg.asterisk_id.clone().unwrap_or_else(|| {
            format!(
                "02:00:00:00:{:02x}:{:02x}",
                addr.port() >> 8,
                addr.port() & 0xff
            )
        });
        let docs = cfg.api_docs.clone().unwrap_or_else(spec::docs_dir);
        let core = Core::new(cfg, asterisk_id, docs);
        let detached = AriSim {
            core: Arc::clone(&core),
            addr,
            guard: None,
            peak_sessions: Arc::default(),
        };
        let ari = Router::new()
            .fallback(http::entry)
            .with_state(Arc::clone(&core));
        let app = control::router(detached.clone()).fallback_service(ari);
        let listener = listener::SimListener::new(
            listener,
            addr,
            core.ctl.subscribe(),
            core.cfg.session_limit,
            detached.peak_sessions.clone(),
        );
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "ARI simulator server stopped");
            }
        });
        Ok(AriSim {
            guard: Some(Arc::new(Guard {
                task,
                core: Arc::downgrade(&core),
            })),
            ..detached
        })
    }

    /// Starts `n` independent simulated Asterisks, each on a free port of `cfg.listen`'s address.
    pub async fn start_many(n: usize, cfg: SimConfig) -> Result<Vec<AriSim>, SimError> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = cfg.clone();
            c.listen.set_port(0);
            out.push(AriSim::start(c).await?);
        }
        Ok(out)
    }

    /// Stops the server and closes every connection.
    pub async fn shutdown(self) {
        if let Some(g) = &self.guard {
            g.task.abort();
        }
        self.crash();
    }

    /// Address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://HOST:PORT` (ARI lives under `/ari`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://HOST:PORT/ari`.
    pub fn ari_url(&self) -> String {
        format!("http://{}/ari", self.addr)
    }

    /// Events WebSocket URL for `apps` (comma separated), authenticated with `api_key`.
    pub fn events_url(&self, apps: &str) -> String {
        format!(
            "ws://{}/ari/events?app={}&api_key={}:{}",
            self.addr,
            form_urlencoded::byte_serialize(apps.as_bytes()).collect::<String>(),
            form_urlencoded::byte_serialize(self.core.cfg.username.as_bytes()).collect::<String>(),
            form_urlencoded::byte_serialize(self.core.cfg.password.as_bytes()).collect::<String>(),
        )
    }

    /// ARI user name.
    pub fn username(&self) -> &str {
        &self.core.cfg.username
    }

    /// ARI password.
    pub fn password(&self) -> &str {
        &self.core.cfg.password
    }

    /// Entity id carried as `asterisk_id` by every event.
    pub fn asterisk_id(&self) -> &str {
        &self.core.asterisk_id
    }

    fn done(&self) {
        self.core.events_changed.notify_waiters();
    }

    /// A caller dials in and the dialplan runs `Stasis(app,args...)`; returns the channel id.
    ///
    /// Like Asterisk, the app sees `StasisStart` (everything earlier only reaches apps following
    /// all events). When the app has no WebSocket, Stasis fails, the call is hung up and
    /// [`SimError::AppNotActive`] is returned.
    pub async fn dial_in(&self, d: DialIn) -> Result<String, SimError> {
        let core = &self.core;
        let mut st = core.lock();
        if !st.up {
            return Err(SimError::Down);
        }
        if let Some(id) = d
            .channel_id
            .as_ref()
            .filter(|id| st.channels.contains_key(*id))
        {
            return Err(SimError::DuplicateChannel(id.clone()));
        }
        let state = if d.answered {
            engine::ChanState::Up
        } else {
            engine::ChanState::Ring
        };
        let d2 = d.clone();
        let id = st.new_channel_with(
            core,
            d.channel_id.clone(),
            &d.tech,
            &d.endpoint,
            state,
            &d.language,
            move |ch| {
                ch.caller_name = d2.caller_name;
                ch.caller_number = d2.caller_number;
                ch.context = d2.context;
                ch.exten = d2.extension;
                ch.priority = d2.priority;
                ch.sip_headers = d2.sip_headers;
            },
        );
        for (k, v) in &d.variables {
            st.set_var(core, &id, k, v);
        }
        let mut data = d.app.clone();
        for a in &d.args {
            data.push(',');
            data.push_str(a);
        }
        st.set_app(core, &id, "Stasis", &data);
        let entered = st.enter_stasis(core, &id, &d.app, d.args.clone());
        if !entered {
            st.set_var(core, &id, "STASISSTATUS", "FAILED");
            st.hangup(core, &id, 16, None);
        }
        drop(st);
        self.done();
        if entered {
            Ok(id)
        } else {
            Err(SimError::AppNotActive(d.app))
        }
    }

    /// The far end hangs up with Q.850 `cause`; a ringing outgoing call is refused with it.
    pub async fn hangup_far_end(&self, channel: &str, cause: i64) -> Result<(), SimError> {
        let core = &self.core;
        let mut st = core.lock();
        let dialing = match st.channels.get(channel) {
            None => return Err(SimError::NoSuchChannel(channel.to_string())),
            Some(ch) => ch.dialing.is_some(),
        };
        if dialing {
            st.far_end_reject(core, channel, cause);
        } else {
            st.hangup(core, channel, cause, Some(engine::HangupRequest::Remote));
        }
        drop(st);
        self.done();
        Ok(())
    }

    /// The caller presses `digits`; each reaches the apps as `ChannelDtmfReceived` unless a
    /// native RTP bridge carries it past Asterisk's core.
    pub async fn send_dtmf_from_caller(&self, channel: &str, digits: &str) -> Result<(), SimError> {
        if let Some(bad) = digits
            .chars()
            .find(|c| !c.is_ascii_digit() && !"*#ABCDabcd".contains(*c))
        {
            return Err(SimError::BadDigit(bad));
        }
        let core = &self.core;
        let mut st = core.lock();
        if !st.channels.contains_key(channel) {
            return Err(SimError::NoSuchChannel(channel.to_string()));
        }
        for digit in digits.chars() {
            if st.dtmf_visible(channel) {
                let ev = st
                    .chan_ev(core, "ChannelDtmfReceived", channel)
                    .with("digit", json!(digit.to_ascii_uppercase().to_string()))
                    .with("duration_ms", json!(core.cfg.dtmf_duration_ms));
                st.emit(core, ev);
            }
        }
        drop(st);
        self.done();
        Ok(())
    }

    /// The caller puts the call on hold (`true`) or takes it off hold (`false`).
    pub async fn caller_hold(&self, channel: &str, hold: bool) -> Result<(), SimError> {
        let core = &self.core;
        let mut st = core.lock();
        let Some(ch) = st.channels.get_mut(channel) else {
            return Err(SimError::NoSuchChannel(channel.to_string()));
        };
        ch.held = hold;
        st.emit_chan(
            core,
            if hold { "ChannelHold" } else { "ChannelUnhold" },
            channel,
        );
        drop(st);
        self.done();
        Ok(())
    }

    /// The caller starts (`true`) or stops talking, as talk detection hears it (the
    /// dialplan ran `Set(TALK_DETECT(set)=)` before Stasis): `ChannelTalkingStarted`, or
    /// `ChannelTalkingFinished` with the talk's `duration` in milliseconds.
    pub async fn caller_talks(
        &self,
        channel: &str,
        talking: bool,
        duration_ms: u64,
    ) -> Result<(), SimError> {
        let core = &self.core;
        let mut st = core.lock();
        if !st.channels.contains_key(channel) {
            return Err(SimError::NoSuchChannel(channel.to_string()));
        }
        let ev = if talking {
            st.chan_ev(core, "ChannelTalkingStarted", channel)
        } else {
            st.chan_ev(core, "ChannelTalkingFinished", channel)
                .with("duration", json!(duration_ms))
        };
        st.emit(core, ev);
        drop(st);
        self.done();
        Ok(())
    }

    /// The far end of a ringing outgoing channel answers (for [`Outcome::Manual`]).
    pub async fn answer_far_end(&self, channel: &str) -> Result<(), SimError> {
        let core = &self.core;
        let mut st = core.lock();
        if !st.channels.contains_key(channel) {
            return Err(SimError::NoSuchChannel(channel.to_string()));
        }
        let answered = st.far_end_answer(core, channel);
        drop(st);
        self.done();
        if answered {
            Ok(())
        } else {
            Err(SimError::NotRinging(channel.to_string()))
        }
    }

    /// Originated channels to endpoints matching `m` end with `o`; the latest matching rule wins.
    pub fn set_originate_behavior(&self, m: EndpointMatch, o: Outcome) {
        self.core.lock().behaviors.push((m, o));
    }

    /// Back to the default: ring for [`SimConfig::ring_time`], then answer.
    pub fn clear_originate_behaviors(&self) {
        self.core.lock().behaviors.clear();
    }

    /// Asterisk restarts: WebSockets and connections drop, every channel, bridge and app is
    /// gone, the port refuses connections for [`DEFAULT_DOWNTIME`], then it is back, empty.
    pub async fn restart(&self) {
        self.restart_with_downtime(DEFAULT_DOWNTIME).await;
    }

    /// [`AriSim::restart`] with a chosen downtime.
    pub async fn restart_with_downtime(&self, downtime: Duration) {
        self.crash();
        tokio::time::sleep(downtime).await;
        self.recover();
    }

    /// Asterisk dies and stays down until [`AriSim::recover`].
    pub fn crash(&self) {
        // Connections die first, as with a dead process: a request answered in between would
        // otherwise be answered from the emptied state (a 404 for a channel that was there),
        // which a dead Asterisk never sends.
        self.core.ctl.send_modify(|c| {
            c.up = false;
            c.generation += 1;
        });
        self.core.lock().crash();
        // Test latency set for the channels of this life goes with them.
        self.core
            .slow_hangups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.done();
    }

    /// A crashed Asterisk comes back, empty, on the same port.
    pub fn recover(&self) {
        self.core.lock().boot();
        self.core.ctl.send_modify(|c| c.up = true);
        self.done();
    }

    /// The most HTTP connections (the events WebSocket's included) ever open at once, a
    /// connection closed for going past `session_limit` counted as the one it would have made.
    pub fn peak_sessions(&self) -> usize {
        self.peak_sessions.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Asterisk keeps connections open but answers nothing (requests or events) for `d`.
    pub fn stall(&self, d: Duration) {
        *self
            .core
            .stall_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + d);
    }

    /// Test-only latency: requests for the ARI operation `op` (its Swagger nickname, e.g.
    /// `answer`, or method and path template, e.g. `GET /channels`, where the nickname is
    /// shared; `answer <nickname>` holds the answer after the work is done and its events
    /// are out; `<nickname> <channel id>` holds only the addChannel, removeChannel or answer
    /// naming that channel) wait, unhandled and unanswered, until
    /// [`AriSim::release_operation`]; what they do then is unchanged, in the order they came.
    pub fn hold_operation(&self, op: &str) {
        self.core.held_ops.send_modify(|h| {
            h.insert(op.to_string());
        });
    }

    /// Lets the held requests for `op` through, in the order they came; later ones go on
    /// straight away once those before them have been handled.
    pub fn release_operation(&self, op: &str) {
        self.core.held_ops.send_modify(|h| {
            h.remove(op);
        });
    }

    /// Test-only race: the next `addChannel` naming `channel` passes its checks, then the
    /// far end hangs up before the queued add runs. Asterisk answers such a request 204 all
    /// the same (`ast_ari_bridges_add_channel` reports only a recording channel's failure),
    /// and the channel never enters the bridge.
    pub fn hangup_during_add(&self, channel: &str) {
        self.core
            .hangup_during_add
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(channel.to_string());
    }

    /// Test-only far end: `channel`'s phone or trunk refuses transfers. A `redirect` of it
    /// is answered 204 and carried out, and the call stays where it was, as when chan_pjsip's
    /// REFER is answered with an error (Asterisk reports nothing of it over ARI).
    pub fn refuse_transfers(&self, channel: &str) {
        self.core
            .refused_transfers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(channel.to_string());
    }

    /// Test-only race: the next `answer` naming `channel` finds its channel, then the far
    /// end hangs up before the queued answer command runs. Asterisk answers such a request
    /// 500 `Failed to answer channel` (`ast_ari_channels_answer`: the command queue of a
    /// channel that left completes every command with failure).
    pub fn hangup_during_answer(&self, channel: &str) {
        self.core
            .hangup_during_answer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(channel.to_string());
    }

    /// Test-only loss: requests for `op` (as [`AriSim::hold_operation`] names them) are lost
    /// on the way (a dropped connection, a proxy failing): never carried out, never
    /// answered, until [`AriSim::deliver_operation`]. `eventWebsocket` loses the events
    /// WebSocket's handshakes (REST still answered).
    pub fn lose_operation(&self, op: &str) {
        self.core
            .lost_ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(op.to_string());
    }

    /// A crashed Asterisk comes back, empty, on the same port, and answers its HTTP port
    /// before it is fully booted: every authenticated ARI request (the events WebSocket's
    /// too) gets 503 "Asterisk not booted" until [`AriSim::finish_boot`].
    pub fn recover_booting(&self) {
        self.core
            .booting
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.recover();
    }

    /// Asterisk is fully booted: ARI requests are served again.
    pub fn finish_boot(&self) {
        self.core
            .booting
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.done();
    }

    /// Makes the ARI user `read_only` in ari.conf, or not (a reload): Asterisk then answers
    /// every request but GET and OPTIONS with 403 "Write access denied", before routing it.
    pub fn set_read_only(&self, read_only: bool) {
        self.core
            .read_only
            .store(read_only, std::sync::atomic::Ordering::SeqCst);
    }

    /// Requests for `op` reach Asterisk again (the lost ones stay lost).
    pub fn deliver_operation(&self, op: &str) {
        self.core
            .lost_ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(op);
    }

    /// Test-only latency: `channel` is slow to act on a hangup request. Asterisk's
    /// `ast_ari_channels_hangup` only queues a soft hangup and answers 204; the channel's own
    /// thread then leaves its bridge and Stasis. Until [`AriSim::finish_hangup`], such a
    /// request answers 204 and the channel stays as it is: listed, in Stasis, no events.
    pub fn slow_hangup(&self, channel: &str) {
        self.core
            .slow_hangups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(channel.to_string(), None);
    }

    /// Carries out the hangup asked for a [`AriSim::slow_hangup`] channel, if one was;
    /// returns whether one was.
    pub fn finish_hangup(&self, channel: &str) -> bool {
        let pending = self
            .core
            .slow_hangups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(channel)
            .flatten();
        let Some(cause) = pending else {
            return false;
        };
        let core = &self.core;
        let mut st = core.lock();
        if st.channels.contains_key(channel) {
            st.hangup(core, channel, cause, Some(engine::HangupRequest::Soft));
        }
        drop(st);
        self.done();
        true
    }

    /// How many requests for `op` are held now.
    pub fn held_requests(&self, op: &str) -> usize {
        self.core
            .held_waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(op)
            .copied()
            .unwrap_or(0)
    }

    /// Every events WebSocket goes dead without a word (a half-open connection): nothing
    /// more reaches its client, pongs included, while its apps stay subscribed, so their
    /// events (a StasisStart, say) are lost until the client notices and connects again.
    pub fn freeze_websockets(&self) {
        let st = self.core.lock();
        for s in st.sessions.values() {
            let _ = s.tx.send(WsCmd::Freeze);
        }
    }

    /// Every events WebSocket drops (no close frame); channels and bridges stay, and apps
    /// become inactive until a client connects again.
    pub fn drop_websockets(&self) {
        let mut st = self.core.lock();
        let sids: Vec<u64> = st.sessions.keys().copied().collect();
        for sid in sids {
            if let Some(s) = st.sessions.get(&sid) {
                let _ = s.tx.send(WsCmd::Drop);
            }
            st.close_session(sid);
        }
        drop(st);
        self.done();
    }

    /// Channels, bridges, apps, playbacks and recordings as they are now.
    pub fn snapshot(&self) -> SimSnapshot {
        self.core.lock().snapshot()
    }

    /// Every ARI request so far: method, path, status, operation.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.core
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets the request log.
    pub fn clear_request_log(&self) {
        self.core
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Every event delivered so far, each as its application received it.
    pub fn event_log(&self) -> Vec<Value> {
        self.core.lock().event_log.clone()
    }

    /// Number of events delivered so far (a cursor for [`AriSim::wait_for_event_after`]).
    pub fn event_count(&self) -> usize {
        self.core.lock().event_log.len()
    }

    /// Forgets the event log.
    pub fn clear_event_log(&self) {
        self.core.lock().event_log.clear();
    }

    /// Waits up to `timeout` for a delivered event matching `pred`.
    pub async fn wait_for_event<F: Fn(&Value) -> bool>(
        &self,
        timeout: Duration,
        pred: F,
    ) -> Option<Value> {
        self.wait_for_event_after(0, timeout, pred).await
    }

    /// Waits up to `timeout` for an event matching `pred` among those delivered after the
    /// first `from` (see [`AriSim::event_count`]).
    pub async fn wait_for_event_after<F: Fn(&Value) -> bool>(
        &self,
        from: usize,
        timeout: Duration,
        pred: F,
    ) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.core.events_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.core.lock();
                if let Some(v) = st.event_log.iter().skip(from).find(|e| pred(e)) {
                    return Some(v.clone());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Waits up to `timeout` until `pred` holds for the [`SimSnapshot`].
    pub async fn wait_until<F: Fn(&SimSnapshot) -> bool>(
        &self,
        timeout: Duration,
        pred: F,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.core.events_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pred(&self.snapshot()) {
                return true;
            }
            // Some changes (answers to requests) notify; poll too so none can be missed.
            let tick = tokio::time::Instant::now() + Duration::from_millis(20);
            if tokio::time::timeout_at(deadline.min(tick), notified)
                .await
                .is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return pred(&self.snapshot());
            }
        }
    }

    /// Parameters an operation handler read without declaring them (a conformance guard).
    pub fn param_violations(&self) -> Vec<String> {
        self.core
            .violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
