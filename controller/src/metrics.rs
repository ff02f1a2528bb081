//! The controller's Prometheus metrics. Labels take bounded values only: never a
//! conference name, a node id or an address.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use confroute_shared::store::StoreMetrics;

/// Latency buckets for routing decisions, in seconds; up to 10 s, so an outage's worst
/// (a connect timeout plus `redis.timeout`, or a long `routing.deadline`) stays visible.
const ROUTE_BUCKETS: &[f64] = &[
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every series the controller exports.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// SIP requests by method and response code (`none` when nothing was sent).
    pub sip_requests: IntCounterVec,
    /// Packets dropped without an answer, by reason.
    pub sip_dropped: IntCounterVec,
    /// INVITE retransmissions answered from the transaction table.
    pub sip_retransmissions: IntCounter,
    /// Final answers resent over UDP while their ACK was awaited (Timer G).
    pub sip_answer_resends: IntCounter,
    /// Routing decisions by outcome.
    pub routes: IntCounterVec,
    /// Routing decision latency by entry point (`sip`, `http`, `control`).
    pub route_duration: HistogramVec,
    /// Claims that found the conference already homed by someone else in the meantime.
    pub claim_conflicts: IntCounter,
    /// HTTP requests by route template and status.
    pub http_requests: IntCounterVec,
    /// JSON-RPC error answers by error code (bad input, unknown methods, limits, failures).
    pub rpc_errors: IntCounterVec,
    /// JSON-RPC WebSocket connections open.
    pub rpc_connections: IntGauge,
    /// Conference events a following connection did not get, by reason.
    pub rpc_events_lost: IntCounterVec,
    /// Nodes in the controller's view, by state.
    pub nodes: IntGaugeVec,
    /// Nodes in the view whose agent reports its ARI connection down.
    pub nodes_ari_down: IntGauge,
    /// `confroute_nodes_placeable`.
    pub nodes_placeable: IntGauge,
    /// Redis store instrumentation.
    pub store: StoreMetrics,
}

impl Metrics {
    /// Creates and registers every series.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let sip_requests = IntCounterVec::new(
            Opts::new(
                "confroute_sip_requests_total",
                "SIP requests by method and response code.",
            ),
            &["method", "code"],
        )?;
        let sip_dropped = IntCounterVec::new(
            Opts::new(
                "confroute_sip_dropped_total",
                "SIP packets dropped without an answer, by reason.",
            ),
            &["reason"],
        )?;
        let sip_retransmissions = IntCounter::new(
            "confroute_sip_retransmissions_total",
            "INVITE retransmissions answered again without routing.",
        )?;
        let sip_answer_resends = IntCounter::new(
            "confroute_sip_answer_resends_total",
            "Final INVITE answers resent over UDP while their ACK was awaited.",
        )?;
        let routes = IntCounterVec::new(
            Opts::new("confroute_route_total", "Routing decisions by outcome."),
            &["outcome"],
        )?;
        let route_duration = HistogramVec::new(
            HistogramOpts::new(
                "confroute_route_duration_seconds",
                "Time to decide a conference's node, by entry point.",
            )
            .buckets(ROUTE_BUCKETS.to_vec()),
            &["entry"],
        )?;
        let claim_conflicts = IntCounter::new(
            "confroute_claim_conflicts_total",
            "Claims that found the conference homed by another caller first.",
        )?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "confroute_http_requests_total",
                "HTTP requests by route and status.",
            ),
            &["route", "status"],
        )?;
        let rpc_errors = IntCounterVec::new(
            Opts::new(
                "confroute_rpc_errors_total",
                "JSON-RPC requests answered with an error, by JSON-RPC error code.",
            ),
            &["code"],
        )?;
        let rpc_connections = IntGauge::new(
            "confroute_rpc_connections",
            "JSON-RPC WebSocket connections open.",
        )?;
        let rpc_events_lost = IntCounterVec::new(
            Opts::new(
                "confroute_rpc_events_lost_total",
                "Conference events a JSON-RPC connection following their conference did not get, by reason.",
            ),
            &["reason"],
        )?;
        let nodes = IntGaugeVec::new(
            Opts::new(
                "confroute_nodes",
                "Nodes with a live lease in this controller's view, by state.",
            ),
            &["state"],
        )?;
        let nodes_ari_down = IntGauge::new(
            "confroute_nodes_ari_down",
            "Nodes with a live lease in this controller's view whose agent reports its ARI unusable (events WebSocket down, writes refused, or not yet checked): no new conference is placed there.",
        )?;
        registry.register(Box::new(nodes_ari_down.clone()))?;
        let nodes_placeable = IntGauge::new(
            "confroute_nodes_placeable",
            "Nodes with a live lease in this controller's view that take a new conference now: serving, ARI usable, below their capacity.",
        )?;
        registry.register(Box::new(nodes_placeable.clone()))?;
        registry.register(Box::new(sip_requests.clone()))?;
        registry.register(Box::new(sip_dropped.clone()))?;
        registry.register(Box::new(sip_retransmissions.clone()))?;
        registry.register(Box::new(sip_answer_resends.clone()))?;
        registry.register(Box::new(routes.clone()))?;
        registry.register(Box::new(route_duration.clone()))?;
        registry.register(Box::new(claim_conflicts.clone()))?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(rpc_errors.clone()))?;
        registry.register(Box::new(rpc_connections.clone()))?;
        registry.register(Box::new(rpc_events_lost.clone()))?;
        registry.register(Box::new(nodes.clone()))?;
        let store = StoreMetrics::new(&registry)?;
        confroute_shared::runtime_metrics::RuntimeTasks::register(&registry)?;
        // Outcome series exist from the start so dashboards and alerts see zeros, not gaps.
        for o in crate::router::OUTCOMES {
            routes.with_label_values(&[o]).inc_by(0);
        }
        for s in ["serving", "draining", "shutting_down"] {
            nodes.with_label_values(&[s]).set(0);
        }
        for r in [crate::rpc::SLOW_CLIENT, crate::fanout::DISPATCHER_LAG] {
            rpc_events_lost.with_label_values(&[r]).inc_by(0);
        }
        Ok(Metrics {
            registry,
            sip_requests,
            sip_dropped,
            sip_retransmissions,
            sip_answer_resends,
            routes,
            route_duration,
            claim_conflicts,
            http_requests,
            rpc_errors,
            rpc_connections,
            rpc_events_lost,
            nodes,
            nodes_ari_down,
            nodes_placeable,
            store,
        })
    }

    /// The text exposition of every series.
    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# error encoding metrics: {e}\n"))
    }
}
