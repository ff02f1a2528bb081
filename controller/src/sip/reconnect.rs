//! Answers whose TCP connection closed before they were written go out on a new connection
//! to the request's Via (RFC 3261 §18.2.2): the edge would otherwise wait out its own
//! transaction timer (Kamailio's 120 s for an INVITE) for an answer already decided.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Longest a new connection for such answers may take to open: the edge listens where its
/// Via says, so a slow connect means a peer that is gone.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a new connection stays open after its last answer, reading (and dropping) what
/// the peer sends: closing with input unread would reset it, and the peer's stack may then
/// drop an answer it has not read yet.
const LINGER: Duration = Duration::from_secs(2);

/// Most bytes read and dropped while lingering.
const LINGER_BYTES: usize = 64 * 1024;

/// One closed connection's answers still to send: at most one new connection open at a
/// time, to the address its latest answer names.
pub struct Reconnect {
    open: Option<(SocketAddr, TcpStream)>,
    /// An address that could not be reached: the answers after it to the same place are
    /// not tried again (each would wait out the connect timeout).
    failed: Option<SocketAddr>,
    write_deadline: Duration,
    /// The address the closed connection came to: new ones leave from it.
    local: Option<IpAddr>,
}

impl Reconnect {
    /// Nothing open yet; each answer's write must end within `write_deadline`; new
    /// connections leave from `local` when it is of the destination's family.
    pub fn new(write_deadline: Duration, local: Option<IpAddr>) -> Self {
        Reconnect {
            open: None,
            failed: None,
            write_deadline,
            local: local.map(|ip| ip.to_canonical()),
        }
    }

    /// A connection to `to`, from the local address when one fits.
    async fn connect(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = match to {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = self.local.filter(|ip| ip.is_ipv4() == to.is_ipv4()) {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.connect(to).await
    }

    /// Writes `bytes` on a connection to `to`, opened if need be; false when it could not.
    pub async fn send(&mut self, to: SocketAddr, bytes: &[u8]) -> bool {
        if self.failed == Some(to) || to.port() == 0 {
            return false;
        }
        if self.open.as_ref().is_some_and(|(at, _)| *at != to) {
            self.close().await;
        }
        if self.open.is_none() {
            match tokio::time::timeout(CONNECT_TIMEOUT, self.connect(to)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    tracing::debug!(%to, "tcp peer closed its connection; answering on a new one");
                    self.open = Some((to, stream));
                }
                Ok(Err(e)) => {
                    tracing::debug!(%to, error = %e, "no new connection for an answer");
                    self.failed = Some(to);
                    return false;
                }
                Err(_) => {
                    tracing::debug!(%to, "no new connection for an answer in time");
                    self.failed = Some(to);
                    return false;
                }
            }
        }
        let Some((_, stream)) = self.open.as_mut() else {
            return false;
        };
        match tokio::time::timeout(self.write_deadline, stream.write_all(bytes)).await {
            Ok(Ok(())) => true,
            _ => {
                self.open = None;
                self.failed = Some(to);
                false
            }
        }
    }

    /// Closes the connection now open, once its peer has had the time to read it.
    pub async fn close(&mut self) {
        let Some((_, mut stream)) = self.open.take() else {
            return;
        };
        let _ = stream.shutdown().await;
        let until = tokio::time::Instant::now() + LINGER;
        let mut left = LINGER_BYTES;
        let mut chunk = [0u8; 4096];
        while left > 0 {
            match tokio::time::timeout_at(until, stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    }
}
