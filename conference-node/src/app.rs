//! Starting and stopping the agent: clients, registration, and the tasks (events WebSocket,
//! heartbeat, reconciliation, HTTP).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use confroute_shared::bus::Bus;
use confroute_shared::config::RedisConfig;
use confroute_shared::store::Store;
use confroute_shared::types::{NodeId, NodeInfo, NodeRecord, NodeState};

use crate::ari::ws::{self, Timing};
use crate::ari::AriClient;
use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::node::{Node, Sink};
use crate::outbox::Outbox;
use crate::{control, heartbeat, http, reconcile};

/// The agent could not start; the message names the setting involved.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

/// A running agent.
pub struct Agent {
    /// The node's shared state.
    pub node: Arc<Node>,
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    ws_task: Option<JoinHandle<()>>,
    http_stop: Option<tokio::sync::oneshot::Sender<()>>,
    http_task: Option<JoinHandle<()>>,
}

/// What the start-up check of the node id found.
pub enum IdCheck {
    /// No other agent uses the id; the record a previous life left, if any.
    Free(Option<NodeRecord>),
    /// Redis could not be read (why): nothing is known yet.
    Unreadable(String),
}

/// Fails when another live agent renews the record of node `id`; otherwise tells the record
/// a previous life left (if any), or that Redis could not be read.
///
/// Two agents under one id would each take the other's conferences for claims that outlived
/// their callers and release them: a conference with callers in two places. A record left by
/// a crashed previous life is not renewed, so watching it until it expires or is renewed
/// tells the cases apart; an agent that stopped cleanly left no record, and starts at once.
pub async fn id_free(
    store: &Store,
    id: &NodeId,
    heartbeat: Duration,
) -> Result<IdCheck, StartError> {
    let first = match store.get_node(id).await {
        Ok(Some(rec)) => rec,
        Ok(None) => return Ok(IdCheck::Free(None)),
        Err(e) => return Ok(IdCheck::Unreadable(e.to_string())),
    };
    tracing::info!(
        node = %id,
        "this node id has a live record: checking that no other agent renews it"
    );
    // A live agent renews its record within one of its heartbeats (a third of the lease its
    // registration recorded); a dead one's record is not renewed. Two of those heartbeats
    // tell them apart.
    let remaining = Duration::from_millis(first.lease_ms);
    let (left, every) = match first.lease_period_ms {
        Some(lease) => {
            let theirs = Duration::from_millis(lease / 3);
            // Held meanwhile, the record cannot expire first: the whole two are watched.
            (theirs * 2, theirs.min(heartbeat) / 5)
        }
        // A record of an agent that does not say its lease (an older version): its
        // heartbeat is unknown, so the whole remaining lease is watched.
        None => (remaining, heartbeat / 5),
    };
    let until = Instant::now() + left + Duration::from_millis(500);
    let every = every.max(Duration::from_millis(20));
    // The record is held alive meanwhile (its lease extended, not renewed): a crashed last
    // life's record expiring during the watch would let a controller place its conferences
    // on another node while their callers are still here (invariant 1).
    let hold_for = first
        .lease_period_ms
        .map_or(heartbeat * 3, Duration::from_millis);
    let mut last = Some(first);
    while Instant::now() < until {
        if let Ok(false) = store.hold_node(id, hold_for).await {
            // Expired before it could be held: its last life's state (an admin drain) still
            // carries over.
            return Ok(IdCheck::Free(last));
        }
        tokio::time::sleep(every).await;
        match store.get_node(id).await {
            Ok(Some(rec)) if last.as_ref().is_some_and(|l| rec.updated_ms > l.updated_ms) => {
                return Err(StartError(format!(
                    "node.id: node {id} is in use by another live agent (control {}, heartbeat renewed while this one waited); give each agent its own node.id",
                    rec.info.control
                )));
            }
            Ok(Some(rec)) => last = Some(rec),
            // Expired: its last life's state (an admin drain) still carries over.
            Ok(None) => return Ok(IdCheck::Free(last)),
            Err(_) => {}
        }
    }
    Ok(IdCheck::Free(last))
}

/// The state an agent starts in after the record its last life left: an admin drain (and
/// when it began) carries over; the agent's own shutdown drain does not, since a new process
/// is a new life, and one killed in its shutdown drain would otherwise drain for good.
pub fn inherited(last: Option<&NodeRecord>) -> (NodeState, Option<u64>) {
    match last {
        Some(rec) if rec.info.state == NodeState::Draining && !rec.stopping => {
            (NodeState::Draining, rec.drain_since_ms)
        }
        _ => (NodeState::Serving, None),
    }
}

/// Binds the HTTP port, registers the node and starts every task.
pub async fn start(cfg: NodeConfig) -> Result<Agent, StartError> {
    // reqwest is built without a default TLS provider; a second install is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = Metrics::new().map_err(|e| StartError(format!("metrics: {e}")))?;
    // The agent claims a conference only for a caller or dial-out already here, whose count
    // may not land at once (Redis trouble): its claims take the conference lease from the
    // start, never a short `redis.claim_lease` that could lapse before its next heartbeat.
    let redis = RedisConfig {
        claim_lease: cfg.redis.conference_lease,
        ..cfg.redis.clone()
    };
    let store = Store::new(&redis, metrics.store.clone()).map_err(|e| StartError(e.to_string()))?;
    store.spawn_settings_check();
    let ari = AriClient::new(
        &cfg.ari_base(),
        &cfg.ari.username,
        cfg.ari.password.clone(),
        cfg.ari.request_timeout,
        cfg.ari.max_connections,
        metrics.clone(),
    )
    .map_err(|e| StartError(format!("ari: {e}")))?;
    // Redirects are not followed: a receiver outside could otherwise send the agent's POSTs
    // on to an address inside that the URL's own checks would have refused.
    let webhook_http = reqwest::Client::builder()
        .timeout(cfg.webhook.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(crate::webhook::CallbackResolver))
        .build()
        .map_err(|e| StartError(format!("webhook client: {e}")))?;
    let listener = TcpListener::bind(cfg.http.listen)
        .await
        .map_err(|e| StartError(format!("http.listen: cannot bind {}: {e}", cfg.http.listen)))?;
    let http_addr = listener.local_addr().unwrap_or(cfg.http.listen);
    let id = cfg.node_id();
    // An admin drain survives an agent restart: keep the state the record still has.
    let check = id_free(&store, &id, cfg.node.heartbeat_interval).await?;
    let (initial, drain_since) = match &check {
        IdCheck::Free(last) => inherited(last.as_ref()),
        IdCheck::Unreadable(e) => {
            tracing::warn!(error = %e, "cannot read this node's record; the node registers once Redis answers and no other agent is seen using this node id");
            (NodeState::Serving, None)
        }
    };
    let info = NodeInfo {
        id,
        sip_uri: cfg.sip_uri(),
        control: cfg.control_url(http_addr),
        zone: cfg.node.zone.clone(),
        capacity: cfg.node.capacity,
        participant_capacity: cfg.node.participant_capacity,
        state: initial,
    };
    let (reconcile_tx, reconcile_rx) = mpsc::unbounded_channel();
    let timing = Timing {
        reconnect_min: cfg.ari.reconnect_min,
        reconnect_max: cfg.ari.reconnect_max,
        ping_interval: cfg.ari.ping_interval,
        connect_timeout: cfg.ari.request_timeout.max(Duration::from_secs(1)),
    };
    let app_name = cfg.ari.app.clone();
    metrics.set_info(info.id.as_str(), &info.zone);
    let (bus, commands) = Bus::node(store.clone(), &info.id);
    let (outbox, outbox_task) = Outbox::start(bus.clone(), metrics.clone());
    let node = Arc::new(Node::new(
        cfg,
        info,
        store,
        ari.clone(),
        metrics.clone(),
        webhook_http,
        initial,
        reconcile_tx,
        outbox,
    ));
    if let Some(since) = drain_since {
        node.drain_since_ms.store(since, Ordering::SeqCst);
    }
    if let IdCheck::Free(Some(last)) = &check {
        *crate::node::lock(&node.seen_state) = Some(last.info.state);
    }
    if initial == NodeState::Draining {
        // Resumed before the registration, which then finds any undrain an admin set since
        // the record was read, keeps it, and the heartbeat adopts it (resumed after, the
        // drain's own write would undo it).
        node.measure_redis_clock().await;
        tracing::info!("the node record says draining (an admin drained it): resuming the drain");
        match drain_since {
            Some(since) => crate::lifecycle::resume_drain(&node, since).await,
            // A record written before drains kept their start: a whole deadline.
            None => crate::lifecycle::drain(&node, false).await,
        };
    }
    if matches!(check, IdCheck::Unreadable(_)) {
        // Registered by the heartbeat once Redis answers, after the same check.
        node.id_unchecked.store(true, Ordering::SeqCst);
    } else if !heartbeat::register(&node).await {
        tracing::warn!("Redis not reachable at start-up; refusing new conferences until it is");
    }
    let mut tasks = vec![
        tokio::spawn(heartbeat::run(node.clone())),
        tokio::spawn(reconcile::run(node.clone(), reconcile_rx)),
        tokio::spawn(control::run(node.clone(), commands)),
        tokio::spawn(announce_bus(bus)),
        outbox_task,
    ];
    let (stop, stop_rx) = watch::channel(false);
    let ws_task = tokio::spawn(ws::run(
        ari,
        app_name,
        timing,
        metrics,
        Arc::new(Sink(node.clone())),
        stop_rx,
    ));
    let app = http::app(node.clone());
    let header_timeout = node.cfg.http.header_timeout;
    let max_connections = node.cfg.http.max_connections;
    let (http_stop, http_rx) = tokio::sync::oneshot::channel::<()>();
    let http_task = tokio::spawn(async move {
        confroute_shared::http_serve::serve(
            listener,
            app,
            header_timeout,
            max_connections,
            async {
                let _ = http_rx.await;
            },
        )
        .await;
    });
    tasks.shrink_to_fit();
    Ok(Agent {
        node,
        http_addr,
        tasks,
        stop,
        ws_task: Some(ws_task),
        http_stop: Some(http_stop),
        http_task: Some(http_task),
    })
}

/// Logs when the command bus subscription is up (and when it comes back), so operators and
/// tests can see when the node starts hearing commands.
async fn announce_bus(bus: Bus) {
    let mut up = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let now = bus.connected();
        if now && !up {
            tracing::info!("command bus subscribed");
        } else if !now && up {
            tracing::warn!("command bus subscription lost; commands fail until it is back");
        }
        up = now;
    }
}

impl Agent {
    /// Stops every task (after a drain; conferences are not touched here).
    pub async fn stop(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.stop.send(true);
        if let Some(t) = self.ws_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        if let Some(tx) = self.http_stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.http_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }
}
