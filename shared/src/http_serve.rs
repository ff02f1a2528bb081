//! The HTTP server loop of both binaries: `axum::serve` with a header-read timer. Without
//! one, a client that opens a connection and sends half a request (or nothing, on an idle
//! keep-alive connection) holds its task and file descriptor for good; enough of them exhaust
//! the process's descriptors, which the SIP listener shares.

use std::future::Future;
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

/// Accepted values of `http.header_timeout`.
pub const HEADER_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);

/// Serves `app` on `listener` until `stop` completes, then lets the requests in progress
/// finish (an upgraded WebSocket lives on in its own task, as under `axum::serve`). A
/// connection that has not sent a whole request head within `header_timeout` of starting
/// one, or of its previous answer, is closed.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    stop: impl Future<Output = ()> + Send + 'static,
) {
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
        let _ = stream.set_nodelay(true);
        let service = app.clone();
        let mut drain = drain_rx.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |r: Request<Incoming>| {
                // A Router is always ready: no poll_ready needed before `call`.
                service.clone().call(r.map(axum::body::Body::new))
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
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
            }
            drop(done);
        });
    }
    drop(listener);
    let _ = drain_tx.send(true);
    drop(done_tx);
    let _ = done_rx.recv().await;
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
