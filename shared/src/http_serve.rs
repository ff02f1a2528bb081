//! The HTTP server loop of both binaries: `axum::serve` with a header-read timer, a
//! deadline on request bodies, a deadline on answers the client does not read, and a cap on
//! connections. Without them, a client that opens a connection and sends half a request (or
//! nothing, on an idle keep-alive connection, or a body a byte a minute), or asks for answers
//! and never reads them, holds its task and file descriptor for good; enough of them exhaust
//! the process's descriptors, which the SIP listener and the Redis connections share.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

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

/// Serves `app` on `listener` until `stop` completes, then lets the requests in progress
/// finish (an upgraded WebSocket lives on in its own task, as under `axum::serve`). A
/// connection that has not sent a whole request head within `header_timeout` of starting
/// one, or of its previous answer, is closed; so is one whose client has read nothing of an
/// answer for `header_timeout`. With `max_connections` open (upgraded ones no longer count),
/// a new connection asks the oldest to close once idle (at once when it is between
/// requests) and takes its place; one that finds no place within a second is closed. New
/// connections, the probes' among them, so get through however many idle ones a client
/// holds open.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    max_connections: usize,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(
        max_connections.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let open = std::sync::Arc::new(std::sync::Mutex::new(Open::default()));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
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
        if slots.available_permits() == 0 {
            if let Some(oldest) = open.lock().unwrap_or_else(|p| p.into_inner()).pop_oldest() {
                oldest.notify_one();
            }
        }
        let _ = stream.set_nodelay(true);
        let service = app.clone();
        // Set once the connection is upgraded: the WebSocket's own deadlines watch it then.
        let upgraded = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let io = Unread::new(stream, header_timeout, upgraded.clone());
        let mut drain = drain_rx.clone();
        let done = done_tx.clone();
        let slots = slots.clone();
        let open = open.clone();
        let refused = refused.clone();
        tokio::spawn(async move {
            let slot = match tokio::time::timeout(EVICTION_WAIT, slots.acquire_owned()).await {
                Ok(Ok(slot)) => slot,
                _ => {
                    let n = refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(
                            max_connections,
                            refused = n,
                            "http.max_connections reached and no connection idle: closing new HTTP connections"
                        );
                    }
                    return;
                }
            };
            let (id, close) = open.lock().unwrap_or_else(|p| p.into_inner()).add();
            let service = hyper::service::service_fn(move |r: Request<Incoming>| {
                let until = tokio::time::Instant::now() + header_timeout;
                let body = r.map(|inner| {
                    axum::body::Body::new(Deadline {
                        inner,
                        until,
                        sleep: None,
                    })
                });
                // A Router is always ready: no poll_ready needed before `call`.
                let answer = service.clone().call(body);
                let upgraded = upgraded.clone();
                async move {
                    let answer = answer.await;
                    if let Ok(r) = &answer {
                        if r.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS {
                            upgraded.store(true, std::sync::atomic::Ordering::SeqCst);
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
                _ = close.notified() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            open.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
            drop(done);
            drop(slot);
        });
    }
    drop(listener);
    let _ = drain_tx.send(true);
    drop(done_tx);
    let _ = done_rx.recv().await;
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

/// How long a new connection waits for the place of the oldest one, asked to close, before
/// it is closed itself (the oldest was in the middle of a request).
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// The connections open now, oldest first, each with what asks it to close once idle.
#[derive(Default)]
struct Open {
    next: u64,
    by_age: std::collections::BTreeMap<u64, std::sync::Arc<tokio::sync::Notify>>,
}

impl Open {
    fn add(&mut self) -> (u64, std::sync::Arc<tokio::sync::Notify>) {
        self.next += 1;
        let close = std::sync::Arc::new(tokio::sync::Notify::new());
        self.by_age.insert(self.next, close.clone());
        (self.next, close)
    }

    fn remove(&mut self, id: u64) {
        self.by_age.remove(&id);
    }

    fn pop_oldest(&mut self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        self.by_age.pop_first().map(|(_, close)| close)
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
    upgraded: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<S> Unread<S> {
    fn new(
        inner: S,
        limit: Duration,
        upgraded: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
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
        if polled.is_ready() || self.upgraded.load(std::sync::atomic::Ordering::Relaxed) {
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
