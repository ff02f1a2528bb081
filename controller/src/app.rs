//! Starting and stopping a controller: binds the sockets, starts the tasks, and stops them
//! in order.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use confroute_shared::bus::Bus;
use confroute_shared::store::Store;

use crate::config::{ControllerConfig, Transport};
use crate::control::Control;
use crate::http::{self, ApiShared, ApiState};
use crate::metrics::Metrics;
use crate::router::Router;
use crate::sip::handler::SipService;
use crate::sip::server;

/// The controller could not start; the message names the setting involved.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

/// A running controller.
pub struct Controller {
    /// Bound SIP address (UDP and/or TCP).
    pub sip_addr: SocketAddr,
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    http_stop: Option<tokio::sync::oneshot::Sender<()>>,
    http_task: Option<JoinHandle<()>>,
    rpc_stop: tokio::sync::watch::Sender<bool>,
    rpc_connections: Arc<tokio::sync::Semaphore>,
    rpc_max_connections: usize,
    /// How long HTTP requests in flight may take at a stop: the longest a request runs.
    http_grace: Duration,
    /// REST commands that run to their end, whose clients may have gone.
    running: Arc<tokio::sync::Semaphore>,
    max_running: usize,
    /// What a stop waits for on the SIP side.
    sip: SipInFlight,
}

/// The SIP work a stop lets finish: every INVITE read gets its final answer (one sent
/// `100 Trying` is no longer retransmitted by its edge, which would otherwise wait out its
/// own INVITE timer), and TCP connections close once their answers are written.
struct SipInFlight {
    service: Arc<SipService>,
    /// INVITEs being routed (`sip.max_pending_invites` permits).
    pending: Arc<tokio::sync::Semaphore>,
    max_pending: usize,
    /// TCP connections open (`sip.tcp_max_connections` permits).
    tcp_open: Arc<tokio::sync::Semaphore>,
    max_tcp: usize,
    /// Longest a routing decision takes, and a moment to write its answer.
    grace: Duration,
}

/// Binds every socket and starts serving.
pub async fn start(cfg: &ControllerConfig) -> Result<Controller, StartError> {
    let metrics = Metrics::new().map_err(|e| StartError(format!("metrics: {e}")))?;
    let store =
        Store::new(&cfg.redis, metrics.store.clone()).map_err(|e| StartError(e.to_string()))?;
    store.spawn_settings_check();
    let zone = Some(cfg.routing.zone.clone()).filter(|z| !z.is_empty());
    let router = Arc::new(Router::new(
        store,
        zone,
        cfg.routing.candidates,
        cfg.routing.deadline,
        metrics.clone(),
    ));
    if let Err(e) = router.refresh().await {
        tracing::warn!(error = %e, "redis not reachable at start-up; answering 503 until it is");
    }
    let mut tasks = vec![router.spawn_refresher(cfg.routing.node_refresh)];

    let service = Arc::new(SipService::new(&cfg.sip, router.clone(), metrics.clone()));
    let mut sip_addr = cfg.sip.listen;
    let udp_on = cfg.sip.transports.contains(&Transport::Udp);
    let tcp_on = cfg.sip.transports.contains(&Transport::Tcp);
    // UDP and TCP share one port. Asked for any port (0), TCP takes the port UDP got, which
    // another socket may hold for TCP: then both are bound again elsewhere.
    let attempts = if cfg.sip.listen.port() == 0 && udp_on && tcp_on {
        20
    } else {
        1
    };
    let mut bound = None;
    for attempt in 1..=attempts {
        let udp = if udp_on {
            let socket =
                server::bind_udp(cfg.sip.listen, cfg.sip.udp_buffer_size).map_err(|e| {
                    StartError(format!(
                        "sip.listen: cannot bind UDP {}: {e}",
                        cfg.sip.listen
                    ))
                })?;
            sip_addr = socket.local_addr().unwrap_or(sip_addr);
            Some(socket)
        } else {
            None
        };
        let tcp = if tcp_on {
            let addr = SocketAddr::new(cfg.sip.listen.ip(), sip_addr.port());
            match TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempt < attempts => {
                    continue
                }
                Err(e) => {
                    return Err(StartError(format!(
                        "sip.listen: cannot bind TCP {addr}: {e}"
                    )))
                }
            }
        } else {
            None
        };
        bound = Some((udp, tcp));
        break;
    }
    let (udp, tcp) = bound.unwrap_or((None, None));
    // INVITEs being routed at once, over UDP and TCP together.
    let pending = Arc::new(tokio::sync::Semaphore::new(cfg.sip.max_pending_invites));
    let tcp_open = Arc::new(tokio::sync::Semaphore::new(cfg.sip.tcp_max_connections));
    if let Some(socket) = udp {
        let socket = Arc::new(socket);
        // Several receivers on one socket let a burst use every core.
        let receivers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        for _ in 0..receivers {
            tasks.push(tokio::spawn(server::serve_udp(
                socket.clone(),
                service.clone(),
                cfg.sip.max_message_size,
                pending.clone(),
            )));
        }
    }
    if let Some(listener) = tcp {
        sip_addr = listener.local_addr().unwrap_or(sip_addr);
        tasks.push(tokio::spawn(server::serve_tcp(
            listener,
            service.clone(),
            server::TcpLimits {
                max_message: cfg.sip.max_message_size,
                max_connections: cfg.sip.tcp_max_connections,
                max_per_source: cfg.sip.tcp_max_connections_per_source,
                idle: cfg.sip.tcp_idle_timeout,
            },
            pending.clone(),
            tcp_open.clone(),
        )));
    }
    let sweeper = service.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            sweeper.sweep();
        }
    }));

    let bus = Bus::controller(router.store().clone());
    let control = Control::new(
        router.clone(),
        bus,
        cfg.rpc.command_timeout,
        metrics.rpc_events_lost.clone(),
    );
    // Set once the SIP sockets are bound, below: /readyz says so from this flag.
    let sip_bound = Arc::new(AtomicBool::new(false));
    let (rpc_stop, rpc_stop_rx) = tokio::sync::watch::channel(false);
    let rpc_connections = Arc::new(tokio::sync::Semaphore::new(cfg.rpc.max_connections));
    let running = Arc::new(tokio::sync::Semaphore::new(cfg.http.max_running_commands));
    let state = ApiState::new(ApiShared {
        router,
        metrics,
        token: cfg.http.api_token.clone(),
        sip_bound: sip_bound.clone(),
        retry_after: cfg.sip.retry_after,
        control,
        rpc_limits: cfg.rpc.limits(),
        max_body: cfg.http.max_body_size,
        rpc_connections: rpc_connections.clone(),
        rpc_stop: rpc_stop_rx,
        running: running.clone(),
    });
    let listener = TcpListener::bind(cfg.http.listen)
        .await
        .map_err(|e| StartError(format!("http.listen: cannot bind {}: {e}", cfg.http.listen)))?;
    let http_addr = listener.local_addr().unwrap_or(cfg.http.listen);
    let app = http::app(state, cfg.http.max_body_size);
    let header_timeout = cfg.http.header_timeout;
    let max_connections = cfg.http.max_connections;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let http_task = tokio::spawn(async move {
        confroute_shared::http_serve::serve(
            listener,
            app,
            header_timeout,
            max_connections,
            async {
                let _ = stop_rx.await;
            },
        )
        .await;
    });
    sip_bound.store(true, Ordering::Relaxed);
    Ok(Controller {
        sip_addr,
        http_addr,
        tasks,
        http_stop: Some(stop_tx),
        http_task: Some(http_task),
        rpc_stop,
        rpc_connections,
        rpc_max_connections: cfg.rpc.max_connections,
        // A call-control request homes its conference (up to routing.deadline) and then
        // waits for its node (rpc.command_timeout): cut short, a dial-out's client would
        // see its connection drop, and a refused dial-out's home would not be given back.
        http_grace: cfg.rpc.command_timeout + cfg.routing.deadline + Duration::from_secs(1),
        running,
        max_running: cfg.http.max_running_commands,
        sip: SipInFlight {
            service,
            pending,
            max_pending: cfg.sip.max_pending_invites,
            tcp_open,
            max_tcp: cfg.sip.tcp_max_connections,
            grace: cfg.routing.deadline + Duration::from_secs(1),
        },
    })
}

impl Controller {
    /// Waits until one of the controller's long-running tasks (the node view's refresher,
    /// the SIP receivers, the transaction sweeper, the HTTP server) ends, which none does
    /// but by a panic; what it was. A controller missing one would look alive while routing
    /// from a stale view, or not answering SIP: it should exit, to be restarted.
    pub async fn failed(&mut self) -> String {
        let mut all: Vec<&mut JoinHandle<()>> = self.tasks.iter_mut().collect();
        if let Some(http) = self.http_task.as_mut() {
            all.push(http);
        }
        first_ended(all).await
    }

    /// Stops reading SIP at once (the edge sends its next requests elsewhere), answers the
    /// INVITEs already read, and lets HTTP requests in flight finish.
    pub async fn stop(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.sip.service.stop();
        if let Some(tx) = self.http_stop.take() {
            let _ = tx.send(());
        }
        let sip = &self.sip;
        let sip_done = tokio::time::timeout(sip.grace, async {
            let _ = sip.pending.acquire_many(permits(sip.max_pending)).await;
            let _ = sip.tcp_open.acquire_many(permits(sip.max_tcp)).await;
        });
        // Requests in flight, and the dial-outs and moves whose clients hung up but which run
        // on: cut between a claim and its hand-back, one would leave a claim holding a seat.
        let running = permits(self.max_running);
        let http_task = self.http_task.take();
        let running_done = &self.running;
        let http_done = tokio::time::timeout(self.http_grace, async {
            if let Some(t) = http_task {
                let _ = t.await;
            }
            let _ = running_done.acquire_many(running).await;
        });
        let _ = tokio::join!(sip_done, http_done);
        // Call-control clients are told the controller is going (close 1001) rather than
        // seeing their connections drop as in a crash; answers on their way get a moment first.
        let _ = self.rpc_stop.send(true);
        let all = permits(self.rpc_max_connections);
        let _ = tokio::time::timeout(
            crate::rpc::CLOSE_GRACE + Duration::from_secs(1),
            self.rpc_connections.acquire_many(all),
        )
        .await;
    }
}

/// `n` semaphore permits, as `acquire_many` counts them.
fn permits(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Waits until the first of `tasks` ends; how it ended. With none, waits for ever.
async fn first_ended(tasks: Vec<&mut JoinHandle<()>>) -> String {
    if tasks.is_empty() {
        return std::future::pending().await;
    }
    let (result, _, _) = futures_util::future::select_all(tasks).await;
    match result {
        Ok(()) => "a task ended".to_string(),
        Err(e) if e.is_panic() => format!("a task panicked: {e}"),
        Err(e) => format!("a task was cancelled: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_is_reported() {
        let mut calm = tokio::spawn(std::future::pending::<()>());
        let mut failing = tokio::spawn(async {
            tokio::task::yield_now().await;
            panic!("refresher broke");
        });
        let why = tokio::time::timeout(
            Duration::from_secs(5),
            first_ended(vec![&mut calm, &mut failing]),
        )
        .await
        .expect("noticed");
        assert!(why.contains("panicked"), "{why}");
        calm.abort();
    }
}
