//! A TCP proxy in front of a server (Redis) that a test can cut off and restore, to play a
//! network partition between one client process and that server.
//!
//! While black-holed the proxy keeps every socket open and accepts new ones, but moves no
//! byte in either direction: clients see requests that are never answered (timeouts), not
//! refused or reset connections. Bytes already read when the cut starts, and everything the
//! peers send meanwhile (left in the kernel's buffers), are delivered late once the proxy
//! forwards again, as TCP retransmissions would be when a real partition heals.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

use super::{HarnessError, HarnessResult};

/// A running proxy on a free loopback port; every socket it holds closes when it is dropped.
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    forwarding: watch::Sender<bool>,
    /// Microseconds each chunk waits before it is passed on (a slow link).
    delay_us: Arc<AtomicU64>,
    accept: JoinHandle<()>,
    pumps: Arc<Mutex<Vec<AbortHandle>>>,
}

impl TcpProxy {
    /// Starts forwarding from a free port on 127.0.0.1 to `upstream`.
    pub async fn start(upstream: SocketAddr) -> HarnessResult<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| HarnessError(format!("proxy: cannot bind 127.0.0.1:0: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| HarnessError(format!("proxy: no local address: {e}")))?;
        let (forwarding, _) = watch::channel(true);
        let pumps: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let delay_us: Arc<AtomicU64> = Arc::default();
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            forwarding.clone(),
            delay_us.clone(),
            pumps.clone(),
        ));
        Ok(TcpProxy {
            addr,
            upstream,
            forwarding,
            delay_us,
            accept,
            pumps,
        })
    }

    /// Address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server behind the proxy.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// `redis://127.0.0.1:<port>` of the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Stops moving bytes both ways; sockets stay open.
    pub fn black_hole(&self) {
        self.forwarding.send_replace(false);
    }

    /// Forwards again, delivering what was held back.
    pub fn heal(&self) {
        self.forwarding.send_replace(true);
    }

    /// Holds each chunk read, either way, for `delay` before passing it on: a slow link,
    /// on which a client that waits for each answer before its next request gets one per
    /// round trip of twice that. Zero passes them on at once again.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us.store(
            u64::try_from(delay.as_micros()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }

    /// True while bytes are forwarded.
    pub fn is_forwarding(&self) -> bool {
        *self.forwarding.borrow()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        let pumps = std::mem::take(&mut *self.pumps.lock().unwrap_or_else(|p| p.into_inner()));
        for p in pumps {
            p.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    forwarding: watch::Sender<bool>,
    delay_us: Arc<AtomicU64>,
    pumps: Arc<Mutex<Vec<AbortHandle>>>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((c, _)) => c,
            Err(_) => {
                // Out of descriptors or similar: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        // The proxy's own link to the server is never cut: the partition is between the
        // client and the proxy, so the server stays reachable for whoever is not behind it.
        let Ok(server) = TcpStream::connect(upstream).await else {
            drop(client);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (client_rx, client_tx) = client.into_split();
        let (server_rx, server_tx) = server.into_split();
        let up = tokio::spawn(pump(
            client_rx,
            server_tx,
            forwarding.subscribe(),
            delay_us.clone(),
        ));
        let down = tokio::spawn(pump(
            server_rx,
            client_tx,
            forwarding.subscribe(),
            delay_us.clone(),
        ));
        let mut list = pumps.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|h| !h.is_finished());
        list.push(up.abort_handle());
        list.push(down.abort_handle());
    }
}

/// Waits until the proxy forwards; false when the proxy is gone.
async fn open(forwarding: &mut watch::Receiver<bool>) -> bool {
    forwarding.wait_for(|on| *on).await.is_ok()
}

/// Copies one direction, holding still while black-holed.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut forwarding: watch::Receiver<bool>,
    delay_us: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !open(&mut forwarding).await {
            return;
        }
        // Reading stops the moment a cut starts, so nothing more leaves the kernel buffer.
        let n = tokio::select! {
            r = from.read(&mut buf) => r.unwrap_or_default(),
            _ = forwarding.wait_for(|on| !*on) => continue,
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        let delay = delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        // Bytes read just before a cut are held until it heals.
        if !open(&mut forwarding).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
