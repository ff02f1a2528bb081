//! The HTTP server loop of both binaries: `axum::serve` with a header-read timer, a
//! deadline on request bodies, a deadline on answers the client does not read, and a cap on
//! connections. Without them, a client that opens a connection and sends half a request (or
//! nothing, on an idle keep-alive connection, or a body a byte a minute), or asks for answers
//! and never reads them, holds its task and file descriptor for good; enough of them exhaust
//! the process's descriptors, which the SIP listener and the Redis connections share.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use std::time::Instant;

use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower_service::Service;

/// `http.header_timeout` by default. The timer also closes idle keep-alive connections, so
/// it outlasts what load balancers and client pools keep an idle connection for (60 s for
/// an AWS ALB, 90 s for Go's and reqwest's pools): closing first would race their next
/// request on it and fail that request.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(120);

/// `http.max_connections` by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Accepted values of `http.max_connections`.
pub const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<usize> = 1..=1_000_000;

/// Accepted values of `http.header_timeout`.
pub const HEADER_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);

/// Warns when the API answers anyone who reaches it: no `http.api_token`, and `listen` not
/// a loopback address. The API dials out, ends conferences and drains nodes.
pub fn warn_if_open(listen: std::net::SocketAddr, token_set: bool) {
    if !token_set && !listen.ip().is_loopback() {
        tracing::warn!(%listen, "http.api_token is not set and http.listen is reachable from other hosts: anyone who reaches it can dial out, end conferences and drain nodes; set http.api_token");
    }
}

/// Serves `app` on `listener` until `stop` completes, then lets the requests in progress
/// finish (an upgraded WebSocket lives on in its own task, as under `axum::serve`). A
/// connection that has not sent a whole request head within `header_timeout` of starting
/// one, or of its previous answer, is closed; so is one whose client has read nothing of an
/// answer for `header_timeout`. With `max_connections` open (upgraded ones no longer count),
/// a new connection asks the least recently active one not in a request to close (at once
/// between requests; one reading a request head gets a second) and takes its place; with
/// none such, or 64 new ones waiting already, it is closed. New connections, the probes'
/// among them, so get through however many idle ones a client holds open.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    max_connections: usize,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let capacity = Arc::new(Capacity::new(max_connections));
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    // Each connection holds a sender; when the last is dropped, every connection is done.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut stop = std::pin::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let admission = capacity.admit();
        if matches!(admission, Admission::Refused) {
            // Closed at once: the descriptors stay free.
            continue;
        }
        let _ = stream.set_nodelay(true);
        let service = app.clone();
        // Set once the connection is upgraded: the WebSocket's own deadlines watch it then.
        let upgraded = Arc::new(AtomicBool::new(false));
        let io = Unread::new(stream, header_timeout, upgraded.clone());
        let mut drain = drain_rx.clone();
        let done = done_tx.clone();
        let capacity = capacity.clone();
        tokio::spawn(async move {
            let Some((slot, registered)) = capacity.slot(admission).await else {
                return;
            };
            let conn_state = registered.conn.clone();
            let service = hyper::service::service_fn(move |r: Request<Incoming>| {
                let until = tokio::time::Instant::now() + header_timeout;
                let body = r.map(|inner| {
                    axum::body::Body::new(Deadline {
                        inner,
                        until,
                        sleep: None,
                    })
                });
                conn_state.begin();
                // A Router is always ready: no poll_ready needed before `call`.
                let answer = service.clone().call(body);
                let upgraded = upgraded.clone();
                let conn_state = conn_state.clone();
                async move {
                    let mut answer = answer.await;
                    conn_state.end();
                    if let Ok(r) = &mut answer {
                        // The router names a path's methods on any answer to a wrong one,
                        // a refusal for want of the token too: without the token, which
                        // routes exist is not told.
                        if r.status() == axum::http::StatusCode::UNAUTHORIZED {
                            r.headers_mut().remove(axum::http::header::ALLOW);
                        }
                        if r.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS {
                            upgraded.store(true, Ordering::SeqCst);
                        }
                    }
                    answer
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "http connection ended");
                    }
                }
                _ = async { drain.wait_for(|d| *d).await.is_ok() } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
                _ = registered.conn.close.notified() => {
                    // Asked to make room: closed at once when between requests; one in the
                    // middle of a request head or answer gets a moment, then goes anyway.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(EVICTION_GRACE, conn).await;
                }
            }
            drop(registered);
            drop(done);
            drop(slot);
        });
    }
    drop(listener);
    let _ = drain_tx.send(true);
    drop(done_tx);
    let _ = done_rx.recv().await;
}

/// How long a connection asked to close for a new one may take to finish what it is in.
const EVICTION_GRACE: Duration = Duration::from_secs(1);

/// How long a new connection waits for the place of the one asked to close.
const EVICTION_WAIT: Duration = Duration::from_secs(2);

/// New connections waiting at once for a place (the rest are closed as they come).
const MAX_WAITING: usize = 64;

/// The connections a server holds, within `http.max_connections`.
struct Capacity {
    slots: Arc<tokio::sync::Semaphore>,
    /// New connections waiting for the place of one asked to close.
    waiting: Arc<tokio::sync::Semaphore>,
    open: Mutex<Open>,
    refused: AtomicU64,
    max: usize,
}

/// What a new connection gets: a place (recorded at once, so the next connection can ask it
/// to close), the promise of one, or nothing.
enum Admission {
    Now(tokio::sync::OwnedSemaphorePermit, Registered),
    /// A connection was asked to close for this one, which holds a waiter's place.
    After(tokio::sync::OwnedSemaphorePermit),
    Refused,
}

impl Capacity {
    fn new(max: usize) -> Self {
        Capacity {
            slots: Arc::new(tokio::sync::Semaphore::new(
                max.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            )),
            waiting: Arc::new(tokio::sync::Semaphore::new(MAX_WAITING)),
            open: Mutex::new(Open::default()),
            refused: AtomicU64::new(0),
            max,
        }
    }

    /// A place for a new connection, or the least recently active idle connection asked to
    /// close for it (one per waiter), or a refusal.
    fn admit(self: &Arc<Self>) -> Admission {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Admission::Now(slot, self.register());
        }
        let Ok(waiter) = self.waiting.clone().try_acquire_owned() else {
            self.refuse();
            return Admission::Refused;
        };
        let evicted = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_least_recently_active_idle();
        match evicted {
            Some(conn) => {
                conn.close.notify_one();
                Admission::After(waiter)
            }
            None => {
                self.refuse();
                Admission::Refused
            }
        }
    }

    /// The place the admission stands for, once there is one, and its record.
    async fn slot(
        self: &Arc<Self>,
        admission: Admission,
    ) -> Option<(tokio::sync::OwnedSemaphorePermit, Registered)> {
        match admission {
            Admission::Now(slot, registered) => Some((slot, registered)),
            Admission::After(waiter) => {
                let got =
                    tokio::time::timeout(EVICTION_WAIT, self.slots.clone().acquire_owned()).await;
                drop(waiter);
                match got {
                    Ok(Ok(slot)) => Some((slot, self.register())),
                    _ => {
                        self.refuse();
                        None
                    }
                }
            }
            Admission::Refused => None,
        }
    }

    fn refuse(&self) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(
                max_connections = self.max,
                refused = n,
                "http.max_connections reached, no idle connection to close: closing new HTTP connections"
            );
        }
    }

    /// Records a connection now open; it leaves the record when the returned value drops.
    fn register(self: &Arc<Self>) -> Registered {
        let conn = Arc::new(ConnState {
            close: tokio::sync::Notify::new(),
            in_request: AtomicUsize::new(0),
            active: Mutex::new(Instant::now()),
        });
        let id = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(conn.clone());
        Registered {
            capacity: self.clone(),
            id,
            conn,
        }
    }
}

/// One open connection, as the capacity sees it.
struct ConnState {
    /// Asks it to close to make room.
    close: tokio::sync::Notify,
    in_request: AtomicUsize,
    /// When a request last began or ended on it (or it opened).
    active: Mutex<Instant>,
}

impl ConnState {
    fn begin(&self) {
        self.in_request.fetch_add(1, Ordering::SeqCst);
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn end(&self) {
        self.in_request.fetch_sub(1, Ordering::SeqCst);
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
}

/// A connection's entry in the capacity's record, removed when dropped (a panicking handler
/// included).
struct Registered {
    capacity: Arc<Capacity>,
    id: u64,
    conn: Arc<ConnState>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.capacity
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .remove(&self.id);
    }
}

/// The connections open now.
#[derive(Default)]
struct Open {
    next: u64,
    by_id: std::collections::HashMap<u64, Arc<ConnState>>,
}

impl Open {
    fn add(&mut self, conn: Arc<ConnState>) -> u64 {
        self.next += 1;
        self.by_id.insert(self.next, conn);
        self.next
    }

    /// Takes out the connection not in a request whose last request is the longest ago:
    /// clients that reuse their connections keep them, one held open and idle goes first.
    fn take_least_recently_active_idle(&mut self) -> Option<Arc<ConnState>> {
        let id = self
            .by_id
            .iter()
            .filter(|(_, c)| c.in_request.load(Ordering::SeqCst) == 0)
            .min_by_key(|(_, c)| *c.active.lock().unwrap_or_else(|p| p.into_inner()))
            .map(|(id, _)| *id)?;
        self.by_id.remove(&id)
    }
}

/// A request body that must arrive by `until` (`http.header_timeout` after its head): one
/// trickled in slower holds its handler and connection no longer. The timer is only set
/// once the body is not all there already, as a small request's usually is.
struct Deadline {
    inner: Incoming,
    until: tokio::time::Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for Deadline {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let until = this.until;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(
                        "the request body did not arrive within http.header_timeout".into(),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's stream on which a write that makes no progress (the client reads nothing,
/// its window is full) fails after `limit`, so the connection is closed rather than held.
/// Not once `upgraded`: a JSON-RPC WebSocket closes a client that reads nothing itself,
/// with its close code (`rpc.ping_interval`, and its bound on unread answers).
struct Unread<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    upgraded: Arc<AtomicBool>,
}

impl<S> Unread<S> {
    fn new(inner: S, limit: Duration, upgraded: Arc<AtomicBool>) -> Self {
        Unread {
            inner,
            limit,
            stalled: None,
            upgraded,
        }
    }

    /// The outcome of a write or flush: progress clears the stall timer; no progress starts
    /// it, and past `limit` turns into an error.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() || self.upgraded.load(Ordering::Relaxed) {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing of the answer within http.header_timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Unread<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Unread<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, polled)
    }
}

/// An accept that failed: nothing to do for a connection the peer already gave up; otherwise
/// (out of file descriptors, say) wait a moment for some to be closed, rather than spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "http accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Whether a request body says nothing: empty, or an empty JSON object however spaced. Routes
/// that take no body accept these (HTTP clients send `{}` by habit) and refuse the rest.
pub fn says_nothing(body: &[u8]) -> bool {
    body.trim_ascii().is_empty()
        || serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body)
            .is_ok_and(|m| m.is_empty())
}
