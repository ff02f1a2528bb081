//! The agent's Prometheus metrics. Labels take bounded values only: never a conference name,
//! a channel id or an address.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use confroute_shared::store::StoreMetrics;

/// Join latency buckets (StasisStart to ChannelEnteredBridge), in seconds.
const JOIN_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// ARI request latency buckets, in seconds; up to 10 s, for a long `ari.request_timeout`.
const ARI_BUCKETS: &[f64] = &[
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every `action` of `confroute_node_reconcile_actions_total` (docs/metrics.md).
pub const RECONCILE_ACTIONS: &[&str] = &[
    "adopted_conference",
    "merged_leftover_bridge",
    "destroyed_empty_bridge",
    "ended_missing_bridge",
    "removed_gone_participant",
    "restored_participant_bridge",
    "rejoined_channel",
    "joined_unheard_callee",
    "redirect_refused",
    "hung_up_again",
    "read_adopted_options",
    "released_stale_claim",
    "forgot_vanished_channel",
];

/// How a caller's attempt to join ended (the `outcome` label of joins).
pub const JOIN_OUTCOMES: &[&str] = &[
    "joined",
    "waiting",
    "redirected",
    "wrong_node_hangup",
    "full",
    "invalid_name",
    "no_name",
    "redis_unavailable",
    "not_serving",
    "ari_error",
    "abandoned",
];

/// Why a participant left (the `reason` label of leaves).
pub const LEAVE_REASONS: &[&str] = &["hangup", "conference_ended", "gone", "kicked", "moved"];

/// Dial-out statuses (the `status` label of dial-outs), as the notifications name them.
pub const DIALOUT_STATUSES: &[&str] = &["accepted", "ringing", "connected", "rejected", "cleared"];

/// Call-control methods a node answers (the `method` label of commands); anything else is
/// counted as `unknown`.
pub const COMMAND_METHODS: &[&str] = &[
    "participant.list",
    "conference.end",
    "conference.play",
    "participant.mute",
    "participant.unmute",
    "participant.hold",
    "participant.unhold",
    "participant.kick",
    "participant.dtmf",
    "participant.play",
    "participant.move",
    "participant.update",
    "dialout",
    "dialout.state",
];

/// How a command ended (the `outcome` label of commands): `ok` or a bus error code.
pub const COMMAND_OUTCOMES: &[&str] = &[
    "ok",
    "conference_not_found",
    "participant_not_found",
    "invalid_number",
    "conference_full",
    "forbidden",
    "timeout",
    "invalid_params",
    "internal",
    "node_unavailable",
    "unavailable",
];

/// Node states, for the state gauge.
pub const STATES: &[&str] = &["serving", "draining", "shutting_down"];

/// Every series the agent exports.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Conferences hosted now.
    pub conferences: IntGauge,
    /// Participants in them (waiting ones included).
    pub participants: IntGauge,
    /// Channels whose ARI events the agent routes, set at each scrape.
    pub tracked_channels: IntGauge,
    /// When the running drain's deadline comes (Unix seconds); 0 when not draining.
    pub drain_deadline: IntGauge,
    /// Join attempts by outcome.
    pub joins: IntCounterVec,
    /// Participants that left, by reason.
    pub leaves: IntCounterVec,
    /// StasisStart to ChannelEnteredBridge.
    pub join_duration: Histogram,
    /// ARI REST calls by operation and status.
    pub ari_requests: HistogramVec,
    /// Events WebSocket (re)connections after the first.
    pub ari_reconnects: IntCounter,
    /// 1 while the events WebSocket is connected.
    pub ari_connected: IntGauge,
    /// 1 while Asterisk refuses the agent's requests (401/403) and none went through since.
    pub ari_writes_refused: IntGauge,
    /// Events received, by kind (`known`, `unknown`, `malformed`).
    pub ari_events: IntCounterVec,
    /// Status callback deliveries by outcome.
    pub webhooks: IntCounterVec,
    /// Status callback attempts that failed and were retried.
    pub webhook_retries: IntCounter,
    /// Conferences whose claim this node found it had lost.
    pub ownership_losses: IntCounter,
    /// 1 for the node's current state.
    pub state: IntGaugeVec,
    /// Heartbeats by outcome.
    pub heartbeats: IntCounterVec,
    /// Reconciliation actions taken, by action.
    pub reconcile_actions: IntCounterVec,
    /// Conferences ended, by reason.
    pub conferences_ended: IntCounterVec,
    /// Dial-out status notifications sent, by status.
    pub dialouts: IntCounterVec,
    /// Call-control commands answered, by method and outcome.
    pub commands: IntCounterVec,
    /// Replies, notifications and events the bus publisher had to drop (queue full).
    pub bus_dropped: IntCounterVec,
    /// `confroute_node_info{node_id, zone}`: 1, to join other series to the node's identity.
    pub info: IntGaugeVec,
    /// Redis store instrumentation.
    pub store: StoreMetrics,
}

impl Metrics {
    /// Creates and registers every series.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let conferences = IntGauge::new(
            "confroute_node_conferences",
            "Conferences this node hosts now.",
        )?;
        let participants = IntGauge::new(
            "confroute_node_participants",
            "Participants in this node's conferences, waiting ones included.",
        )?;
        let tracked_channels = IntGauge::new(
            "confroute_node_tracked_channels",
            "Channels whose ARI events the agent routes: participants, callers being admitted, ringing dial-outs, channels whose end is awaited.",
        )?;
        let drain_deadline = IntGauge::new(
            "confroute_node_drain_deadline_timestamp_seconds",
            "When the running drain's deadline comes, in Unix seconds; 0 when the node is not draining.",
        )?;
        let joins = IntCounterVec::new(
            Opts::new(
                "confroute_node_joins_total",
                "Callers that entered the Stasis app, by how their join ended.",
            ),
            &["outcome"],
        )?;
        let leaves = IntCounterVec::new(
            Opts::new(
                "confroute_node_leaves_total",
                "Participants that left a conference, by reason.",
            ),
            &["reason"],
        )?;
        let join_duration = Histogram::with_opts(
            HistogramOpts::new(
                "confroute_node_join_duration_seconds",
                "Time from StasisStart to ChannelEnteredBridge of a joining caller.",
            )
            .buckets(JOIN_BUCKETS.to_vec()),
        )?;
        let ari_requests = HistogramVec::new(
            HistogramOpts::new(
                "confroute_ari_request_duration_seconds",
                "Time of one ARI REST call, by operation and HTTP status (or timeout/transport).",
            )
            .buckets(ARI_BUCKETS.to_vec()),
            &["op", "status"],
        )?;
        let ari_reconnects = IntCounter::new(
            "confroute_ari_reconnects_total",
            "Events WebSocket connections made after the first one.",
        )?;
        let ari_connected = IntGauge::new(
            "confroute_ari_connected",
            "1 while the ARI events WebSocket is connected.",
        )?;
        let ari_writes_refused = IntGauge::new(
            "confroute_ari_writes_refused",
            "1 while Asterisk refuses the agent's ARI requests (401 or 403) and none went through since: the node takes no new conference.",
        )?;
        let ari_events = IntCounterVec::new(
            Opts::new(
                "confroute_ari_events_total",
                "ARI events received, by kind: known, unknown (ignored type) or malformed.",
            ),
            &["kind"],
        )?;
        let webhooks = IntCounterVec::new(
            Opts::new(
                "confroute_webhook_deliveries_total",
                "Status callback events by outcome: delivered, failed (gave up) or dropped (queue full).",
            ),
            &["outcome"],
        )?;
        let webhook_retries = IntCounter::new(
            "confroute_webhook_retries_total",
            "Status callback attempts that failed and were retried.",
        )?;
        let ownership_losses = IntCounter::new(
            "confroute_node_ownership_losses_total",
            "Conferences whose claim this node found owned by another node or epoch.",
        )?;
        let state = IntGaugeVec::new(
            Opts::new("confroute_node_state", "1 for the node's current state."),
            &["state"],
        )?;
        let heartbeats = IntCounterVec::new(
            Opts::new(
                "confroute_node_heartbeats_total",
                "Heartbeats by outcome: renewed, registered or error.",
            ),
            &["outcome"],
        )?;
        let reconcile_actions = IntCounterVec::new(
            Opts::new(
                "confroute_node_reconcile_actions_total",
                "What reconciliation with Asterisk and Redis did, by action.",
            ),
            &["action"],
        )?;
        let conferences_ended = IntCounterVec::new(
            Opts::new(
                "confroute_node_conferences_ended_total",
                "Conferences ended on this node, by reason.",
            ),
            &["reason"],
        )?;
        let dialouts = IntCounterVec::new(
            Opts::new(
                "confroute_node_dialouts_total",
                "Dial-out status notifications, by status: accepted, ringing, connected, rejected, cleared.",
            ),
            &["status"],
        )?;
        let commands = IntCounterVec::new(
            Opts::new(
                "confroute_node_commands_total",
                "Call-control commands answered by this node, by method and outcome (ok or the error code).",
            ),
            &["method", "outcome"],
        )?;
        let bus_dropped = IntCounterVec::new(
            Opts::new(
                "confroute_node_bus_dropped_total",
                "Command replies, dial-out notifications and conference events dropped because the bus publisher fell behind (and events Redis did not take), by kind.",
            ),
            &["kind"],
        )?;
        let info = IntGaugeVec::new(
            Opts::new(
                "confroute_node_info",
                "Always 1; labels name this node agent and its zone.",
            ),
            &["node_id", "zone"],
        )?;
        registry.register(Box::new(conferences.clone()))?;
        registry.register(Box::new(participants.clone()))?;
        registry.register(Box::new(tracked_channels.clone()))?;
        registry.register(Box::new(drain_deadline.clone()))?;
        registry.register(Box::new(joins.clone()))?;
        registry.register(Box::new(leaves.clone()))?;
        registry.register(Box::new(join_duration.clone()))?;
        registry.register(Box::new(ari_requests.clone()))?;
        registry.register(Box::new(ari_reconnects.clone()))?;
        registry.register(Box::new(ari_connected.clone()))?;
        registry.register(Box::new(ari_writes_refused.clone()))?;
        registry.register(Box::new(ari_events.clone()))?;
        registry.register(Box::new(webhooks.clone()))?;
        registry.register(Box::new(webhook_retries.clone()))?;
        registry.register(Box::new(ownership_losses.clone()))?;
        registry.register(Box::new(state.clone()))?;
        registry.register(Box::new(heartbeats.clone()))?;
        registry.register(Box::new(reconcile_actions.clone()))?;
        registry.register(Box::new(conferences_ended.clone()))?;
        registry.register(Box::new(dialouts.clone()))?;
        registry.register(Box::new(commands.clone()))?;
        registry.register(Box::new(bus_dropped.clone()))?;
        registry.register(Box::new(info.clone()))?;
        let store = StoreMetrics::new(&registry)?;
        confroute_shared::runtime_metrics::RuntimeTasks::register(&registry)?;
        // Series exist from the start so dashboards and alerts see zeros, not gaps.
        for o in JOIN_OUTCOMES {
            joins.with_label_values(&[o]).inc_by(0);
        }
        for r in LEAVE_REASONS {
            leaves.with_label_values(&[r]).inc_by(0);
        }
        for s in STATES {
            state.with_label_values(&[s]).set(0);
        }
        for k in ["known", "unknown", "malformed"] {
            ari_events.with_label_values(&[k]).inc_by(0);
        }
        for o in ["delivered", "failed", "dropped"] {
            webhooks.with_label_values(&[o]).inc_by(0);
        }
        for st in DIALOUT_STATUSES {
            dialouts.with_label_values(&[st]).inc_by(0);
        }
        for k in ["reply", "notify", "event"] {
            bus_dropped.with_label_values(&[k]).inc_by(0);
        }
        for a in RECONCILE_ACTIONS {
            reconcile_actions.with_label_values(&[a]).inc_by(0);
        }
        // An agent that never gets a heartbeat through still shows zero successes.
        for o in ["renewed", "registered", "error"] {
            heartbeats.with_label_values(&[o]).inc_by(0);
        }
        Ok(Metrics {
            registry,
            conferences,
            participants,
            tracked_channels,
            drain_deadline,
            joins,
            leaves,
            join_duration,
            ari_requests,
            ari_reconnects,
            ari_connected,
            ari_writes_refused,
            ari_events,
            webhooks,
            webhook_retries,
            ownership_losses,
            state,
            heartbeats,
            reconcile_actions,
            conferences_ended,
            dialouts,
            commands,
            bus_dropped,
            info,
            store,
        })
    }

    /// Counts one join attempt.
    pub fn join(&self, outcome: &'static str) {
        self.joins.with_label_values(&[outcome]).inc();
    }

    /// Sets `confroute_node_info{node_id, zone}` to 1.
    pub fn set_info(&self, node_id: &str, zone: &str) {
        self.info.with_label_values(&[node_id, zone]).set(1);
    }

    /// Counts one answered command; `method` is folded to `unknown` unless it is one of
    /// [`COMMAND_METHODS`], so labels stay bounded.
    pub fn command(&self, method: &str, outcome: &str) {
        let method = COMMAND_METHODS
            .iter()
            .find(|m| **m == method)
            .copied()
            .unwrap_or("unknown");
        let outcome = COMMAND_OUTCOMES
            .iter()
            .find(|o| **o == outcome)
            .copied()
            .unwrap_or("internal");
        self.commands.with_label_values(&[method, outcome]).inc();
    }

    /// Counts one dial-out notification.
    pub fn dialout(&self, status: &'static str) {
        self.dialouts.with_label_values(&[status]).inc();
    }

    /// Sets the state gauge to `current`.
    pub fn set_state(&self, current: &str) {
        for s in STATES {
            self.state
                .with_label_values(&[s])
                .set(i64::from(*s == current));
        }
    }

    /// The text exposition of every series.
    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# error encoding metrics: {e}\n"))
    }
}
