//! A listener that can take its port down and kill every open connection, so a simulated
//! restart looks like a process dying: refused connections while down, resets for open ones.
//! It keeps http.conf's `sessionlimit` as Asterisk's HTTP server does (`httpd_helper_thread`
//! in main/http.c): a connection beyond the limit is closed at once, unanswered.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::engine::Ctl;

pub(crate) struct SimListener {
    addr: SocketAddr,
    listener: Option<TcpListener>,
    ctl: watch::Receiver<Ctl>,
    sessions: Arc<AtomicUsize>,
    session_limit: usize,
    peak: Arc<AtomicUsize>,
}

impl SimListener {
    pub fn new(
        listener: TcpListener,
        addr: SocketAddr,
        ctl: watch::Receiver<Ctl>,
        session_limit: usize,
        peak: Arc<AtomicUsize>,
    ) -> SimListener {
        SimListener {
            addr,
            listener: Some(listener),
            ctl,
            sessions: Arc::default(),
            session_limit,
            peak,
        }
    }
}

/// One open HTTP session, counted until its connection is dropped.
struct Session(Arc<AtomicUsize>);

impl Drop for Session {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl axum::serve::Listener for SimListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let ctl = *self.ctl.borrow_and_update();
            if !ctl.up {
                self.listener = None;
                if self.ctl.changed().await.is_err() {
                    // The simulator is gone; park this accept loop until the task is aborted.
                    std::future::pending::<()>().await;
                }
                continue;
            }
            if self.listener.is_none() {
                match TcpListener::bind(self.addr).await {
                    Ok(l) => self.listener = Some(l),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
            }
            let Some(listener) = self.listener.as_ref() else {
                continue;
            };
            tokio::select! {
                res = listener.accept() => match res {
                    Ok((stream, peer)) => {
                        let open = self.sessions.fetch_add(1, Ordering::SeqCst);
                        self.peak.fetch_max(open + 1, Ordering::SeqCst);
                        if open >= self.session_limit {
                            self.sessions.fetch_sub(1, Ordering::SeqCst);
                            tracing::warn!(limit = self.session_limit, "HTTP session count exceeded; closing the connection");
                            drop(stream);
                            continue;
                        }
                        let session = Session(self.sessions.clone());
                        let _ = stream.set_nodelay(true);
                        return (
                            KillableStream::new(stream, self.ctl.clone(), ctl.generation, session),
                            peer,
                        );
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                },
                changed = self.ctl.changed() => {
                    if changed.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

type KillFuture = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// A TCP stream that fails with a reset once the server generation changes.
pub(crate) struct KillableStream {
    inner: TcpStream,
    kill: KillFuture,
    killed: bool,
    _session: Session,
}

impl KillableStream {
    fn new(
        inner: TcpStream,
        mut ctl: watch::Receiver<Ctl>,
        generation: u64,
        session: Session,
    ) -> KillableStream {
        let kill = Box::pin(async move {
            let _ = ctl.wait_for(|c| c.generation != generation).await;
        });
        KillableStream {
            inner,
            kill,
            killed: false,
            _session: session,
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.killed && self.kill.as_mut().poll(cx).is_ready() {
            self.killed = true;
        }
        if self.killed {
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "simulated Asterisk restarted",
            ))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
