//! SIP over UDP and TCP: receiving, framing (Content-Length on streams, pipelined requests,
//! CRLF keepalives) and sending answers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::handler::{Early, Outgoing, Refuse, SipService};
use super::message::{header_end, parse_digits};
use super::pktinfo;
use super::reconnect::Reconnect;
use super::transactions::Resend;
use crate::config::Transport;
use crate::throttle::Throttle;

/// INVITEs of one TCP connection being routed at once (other requests are answered as they
/// are read). Past it the connection is not read until answers are written, so a peer that
/// sends without reading is held back by TCP instead of growing the controller's memory;
/// while Redis is known to be out of reach, further INVITEs are answered 503 at once.
const TCP_PENDING: usize = 64;

/// Longest a TCP message may take to arrive once begun (RFC 3261 Timer B and F: its sender
/// has given up on it by then), unless `sip.tcp_idle_timeout` is shorter.
const MESSAGE_DEADLINE: Duration = Duration::from_secs(32);
/// How long a new TCP connection may stay without a request (line-end keepalives do not
/// count): an edge opens one to send a request at once, and silent connections would
/// otherwise hold their slots for `sip.tcp_idle_timeout` each.
const FIRST_REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// Limits on the TCP listener.
#[derive(Clone, Copy, Debug)]
pub struct TcpLimits {
    /// Largest message in bytes.
    pub max_message: usize,
    /// Connections open at once; further ones are closed as they are accepted.
    pub max_connections: usize,
    /// Connections open at once from one address; further ones from it are closed.
    pub max_per_source: usize,
    /// A connection with no traffic for this long is closed.
    pub idle: Duration,
}

/// Receives datagrams forever. INVITEs, which may wait on Redis, are answered in their own
/// task, at most `pending` at once (`sip.max_pending_invites`); so are CANCELs, which may
/// wait for their INVITE's task, at most [`SipService::cancel_permit`]'s 1,024 at once;
/// everything else (ACKs, OPTIONS, errors) is answered inline, which saves a task and a
/// thread wake-up per packet.
pub async fn serve_udp(
    socket: Arc<UdpSocket>,
    service: Arc<SipService>,
    max_message: usize,
    pending: Arc<Semaphore>,
) {
    let mut buf = vec![0u8; max_message.max(1024) + 1];
    loop {
        let (len, source, local) = match pktinfo::recv(&socket, &mut buf).await {
            Ok(v) => v,
            Err(e) => {
                // ICMP port-unreachable from an earlier send surfaces here on Linux; it says
                // nothing about this socket, so keep receiving.
                tracing::debug!(error = %e, "udp receive error");
                continue;
            }
        };
        if len > max_message {
            // Answered 513 from its header block when that fits (RFC 3261 §21.5.14), as
            // over TCP, rather than left to be retransmitted for 32 s.
            let head = header_end(&buf[..len]);
            let head_fits = head.is_some();
            let answer = match head {
                Some(head) => {
                    service
                        .handle_unframeable(&buf[..head], source, TOO_LARGE, Transport::Udp)
                        .await
                }
                None => None,
            };
            match (head_fits, answer) {
                (_, Some(out)) => send(&socket, &out.bytes, out.to, local).await,
                // One whose header block was read and got no answer (an ACK, a response)
                // was counted under its own reason.
                (true, None) => {}
                (false, None) => service.note_dropped("too_large"),
            }
            continue;
        }
        // Line ends before the start line are skipped, as RFC 3261 §7.5 asks of streams;
        // line ends alone are a keepalive (RFC 5626): nothing to answer over UDP.
        let leading = buf[..len]
            .iter()
            .take_while(|b| **b == b'\r' || **b == b'\n')
            .count();
        if leading == len {
            continue;
        }
        let packet = &buf[leading..len];
        if packet.starts_with(b"INVITE ") {
            // While Redis is slow every INVITE waits out the routing deadline; a flood then
            // would pile up tasks and Redis commands without bound. Past the limit a new
            // INVITE is dropped: its sender retransmits it.
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                // Retransmissions are still answered from the transaction table (100 Trying,
                // or the answer again): dropping them would keep their senders retrying.
                if let Some(out) = service.handle_known(packet, source).await {
                    send(&socket, &out.bytes, out.to, local).await;
                }
                continue;
            };
            let packet = packet.to_vec();
            let (socket, service) = (socket.clone(), service.clone());
            // Boxed so the task holds a pointer, not the whole routing state machine.
            tokio::spawn(Box::pin(async move {
                let early = UdpEarly {
                    socket: &socket,
                    local,
                };
                let answered = service
                    .handle_early(&packet, source, Transport::Udp, &early)
                    .await;
                drop(packet);
                if let Some(out) = answered {
                    send(&socket, &out.bytes, out.to, local).await;
                    // Held until the answer is out: a stopping process waits for every
                    // permit, so that no INVITE it read (sent 100 Trying, perhaps) is left
                    // without its final answer.
                    drop(permit);
                    if let Some(resend) = out.resend {
                        resend_until_acked(&socket, &service, &out.bytes, out.to, local, resend)
                            .await;
                    }
                }
            }));
        } else if let Some(permit) = packet
            .starts_with(b"CANCEL ")
            .then(|| service.cancel_permit())
            .flatten()
        {
            // An INVITE read just before (its CANCEL right behind it in the socket, or read
            // by another receiver) is routed on a task of its own that may not have begun its
            // transaction yet: the CANCEL waits for it on a task of its own.
            let packet = packet.to_vec();
            let (socket, service) = (socket.clone(), service.clone());
            tokio::spawn(async move {
                let answered = service.handle_cancel(&packet, source, Transport::Udp).await;
                drop(permit);
                if let Some(out) = answered {
                    send(&socket, &out.bytes, out.to, local).await;
                }
            });
        } else {
            if packet.starts_with(b"CANCEL ") {
                // No slot left to wait in: at least let an INVITE read just before it, on
                // this thread, begin its transaction first.
                tokio::task::yield_now().await;
            }
            if let Some(out) = service.handle(packet, source, Transport::Udp).await {
                send(&socket, &out.bytes, out.to, local).await;
            }
        }
    }
}

/// RFC 3261 Timer G's first interval (T1) and its cap (T2).
const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);

/// Resends a final answer at T1, 2·T1, … up to T2 apart until its ACK arrives or the
/// transaction is forgotten (Timer H). Only for an INVITE that was sent `100 Trying`: its
/// sender no longer retransmits, so a lost answer would otherwise never be asked for again.
/// No permit is held meanwhile: an ACK is expected within a round trip, and a caller that
/// never sends one costs a sleeping task for at most 32 s.
async fn resend_until_acked(
    socket: &UdpSocket,
    service: &SipService,
    bytes: &[u8],
    to: SocketAddr,
    local: Option<IpAddr>,
    resend: Resend,
) {
    let until = tokio::time::Instant::from_std(resend.until);
    let mut interval = T1;
    let mut next = tokio::time::Instant::now() + interval;
    while next < until {
        tokio::select! {
            () = resend.acked.notified() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        service.note_resent();
        send(socket, bytes, to, local).await;
        interval = (interval * 2).min(T2);
        next += interval;
    }
}

/// Provisional answers over UDP, from the address the request came to.
struct UdpEarly<'a> {
    socket: &'a UdpSocket,
    local: Option<IpAddr>,
}

impl Early for UdpEarly<'_> {
    fn send(&self, out: Outgoing) -> futures_util::future::BoxFuture<'_, bool> {
        Box::pin(async move {
            send(self.socket, &out.bytes, out.to, self.local).await;
            true
        })
    }
}

/// Bytes of answers one TCP connection may have waiting for its writer. Past it the
/// connection is not read until its peer reads: answers copy every Via of their request, so
/// a count of answers alone would let a peer that never reads pin megabytes per connection.
const ANSWER_BYTES: usize = 128 * 1024;

/// What an answer adds to the header block of its request (a To-tag, a Contact, the
/// conference headers), for [`Answers::reserve`].
const RESERVE_SLACK: u32 = 512;

/// An answer waiting for a TCP connection's writer.
struct Queued {
    bytes: Vec<u8>,
    /// Its share of [`ANSWER_BYTES`], given back once it is written.
    room: OwnedSemaphorePermit,
    /// Where a new connection goes should the peer close this one first (RFC 3261
    /// §18.2.2), for the answers its sender still waits for (INVITE, CANCEL).
    reconnect: Option<SocketAddr>,
}

/// Answers of one TCP connection on their way to its writer, bounded in bytes
/// ([`ANSWER_BYTES`]) as well as in number.
#[derive(Clone)]
struct Answers {
    tx: mpsc::Sender<Queued>,
    room: Arc<Semaphore>,
}

impl Answers {
    fn new() -> (Answers, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(256);
        let room = Arc::new(Semaphore::new(ANSWER_BYTES));
        (Answers { tx, room }, rx)
    }

    /// What `bytes` takes of the room (an answer larger than all of it takes all of it).
    fn cost(bytes: &[u8]) -> u32 {
        u32::try_from(bytes.len().clamp(1, ANSWER_BYTES)).unwrap_or(u32::MAX)
    }

    /// Queues `bytes` once there is room; an error once the writer has given up.
    async fn send(&self, bytes: Vec<u8>) -> Result<(), ()> {
        let permit = tokio::select! {
            p = self.room.clone().acquire_many_owned(Self::cost(&bytes)) => p.map_err(|_| ())?,
            () = self.tx.closed() => return Err(()),
        };
        let queued = Queued {
            bytes,
            room: permit,
            reconnect: None,
        };
        self.tx.send(queued).await.map_err(|_| ())
    }

    /// Takes room for the answer to `request`, to be sent on another task: about its
    /// header block, which the answer copies. Waits for room; an error once the writer has
    /// given up.
    async fn reserve(&self, request: &[u8]) -> Result<OwnedSemaphorePermit, ()> {
        let head = header_end(request).unwrap_or(request.len());
        let most = u32::try_from(ANSWER_BYTES).unwrap_or(u32::MAX);
        let cost = Self::cost(&request[..head.min(request.len())])
            .saturating_add(RESERVE_SLACK)
            .min(most);
        tokio::select! {
            p = self.room.clone().acquire_many_owned(cost) => p.map_err(|_| ()),
            () = self.tx.closed() => Err(()),
        }
    }

    /// Queues `out` in room taken with [`Answers::reserve`]; should the peer close the
    /// connection first, it goes on a new one to `out.to`.
    async fn send_reserved(&self, out: Outgoing, room: OwnedSemaphorePermit) -> Result<(), ()> {
        let queued = Queued {
            bytes: out.bytes,
            room,
            reconnect: Some(out.to),
        };
        self.tx.send(queued).await.map_err(|_| ())
    }

    /// Queues `bytes` if there is room now.
    fn try_send(&self, bytes: Vec<u8>) -> bool {
        match self.room.clone().try_acquire_many_owned(Self::cost(&bytes)) {
            Ok(room) => self
                .tx
                .try_send(Queued {
                    bytes,
                    room,
                    reconnect: None,
                })
                .is_ok(),
            Err(_) => false,
        }
    }

    /// Resolves once the writer has given up on the peer.
    async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Provisional answers over TCP, through the connection's writer.
struct TcpEarly {
    tx: Answers,
}

impl Early for TcpEarly {
    fn send(&self, out: Outgoing) -> futures_util::future::BoxFuture<'_, bool> {
        // A provisional answer only: to a peer that reads so slowly that its answers back
        // up, it is left out rather than waited for with the INVITE's permits held.
        Box::pin(std::future::ready(self.tx.try_send(out.bytes)))
    }
}

/// Sends an answer from `local`, the address its request came to (when known).
async fn send(socket: &UdpSocket, bytes: &[u8], to: SocketAddr, local: Option<IpAddr>) {
    if let Err(e) = pktinfo::send(socket, bytes, to, local).await {
        tracing::debug!(error = %e, %to, "udp send failed");
    }
}

/// Binds the SIP UDP socket with `buffer` bytes of kernel receive and send buffer (0 keeps
/// the system default). Bursts of INVITEs overflow the default buffer long before the CPU is
/// busy, and a dropped INVITE costs the caller a 500 ms retransmission.
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if buffer > 0 {
        // The FORCE variants pass the rmem_max/wmem_max caps when the process may (root or
        // CAP_NET_ADMIN); otherwise the kernel grants what the caps allow.
        if force_buffer(&socket, libc::SO_RCVBUFFORCE, buffer).is_err() {
            let _ = socket.set_recv_buffer_size(buffer);
        }
        if force_buffer(&socket, libc::SO_SNDBUFFORCE, buffer).is_err() {
            let _ = socket.set_send_buffer_size(buffer);
        }
        // Linux reports twice the size it granted; a cap it applied in silence (no
        // CAP_NET_ADMIN, rmem_max lower than asked) shows here, and bursts would be dropped.
        let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
        if granted < buffer {
            tracing::warn!(
                asked = buffer,
                granted,
                "the SIP UDP receive buffer is smaller than sip.udp_buffer_size; raise net.core.rmem_max (sysctl) or give the process CAP_NET_ADMIN, or bursts of INVITEs are dropped"
            );
        } else {
            tracing::info!(bytes = granted, "SIP UDP receive buffer");
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    // On a wildcard address, answers name the address each request came to as their source.
    if let Err(e) = pktinfo::enable(&socket) {
        tracing::warn!(error = %e, %addr, "cannot learn the destination address of datagrams; answers leave from the address the kernel's routes pick");
    }
    Ok(socket)
}

fn force_buffer(socket: &socket2::Socket, option: libc::c_int, size: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on a descriptor we own, with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Connections open per source address; an entry goes when its last connection ends.
type PerSource = Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>;

/// One connection's place in [`PerSource`], given back when dropped.
struct SourceSlot {
    table: PerSource,
    ip: IpAddr,
}

impl SourceSlot {
    /// Takes a place for `ip` unless it holds `max` already.
    fn take(table: &PerSource, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            table: table.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.ip);
            }
        }
    }
}

/// Accepts TCP connections forever. Connections from sources outside `sip.trusted_cidrs`
/// are closed at once (over TCP nobody else may hold a connection open), and past
/// `limits.max_connections` (or `limits.max_per_source` from one address) new ones are
/// closed until others end.
pub async fn serve_tcp(
    listener: TcpListener,
    service: Arc<SipService>,
    limits: TcpLimits,
    routing: Arc<Semaphore>,
    open: Arc<Semaphore>,
) {
    let per_source: PerSource = Arc::default();
    let (from_source, over_all) = (
        Throttle::new(REFUSAL_WARN_EVERY),
        Throttle::new(REFUSAL_WARN_EVERY),
    );
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if !service.trusts(peer.ip()) {
                    service.note_dropped("untrusted_connection");
                    continue;
                }
                let ip = peer.ip().to_canonical();
                let Some(source) = SourceSlot::take(&per_source, ip, limits.max_per_source) else {
                    service.note_dropped("too_many_connections_from_source");
                    if let Some(n) = from_source.note() {
                        tracing::warn!(%peer, refused = n, max = limits.max_per_source, "tcp connections refused: sip.tcp_max_connections_per_source reached");
                    }
                    continue;
                };
                let Ok(slot) = open.clone().try_acquire_owned() else {
                    service.note_dropped("too_many_connections");
                    if let Some(n) = over_all.note() {
                        tracing::warn!(%peer, refused = n, max = limits.max_connections, "tcp connections refused: sip.tcp_max_connections reached");
                    }
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (service, routing) = (service.clone(), routing.clone());
                tokio::spawn(async move {
                    connection(stream, peer, service, limits, routing).await;
                    drop(slot);
                    drop(source);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Least time between two warnings about refused connections.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

/// What the framer found at the start of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A whole message of this many bytes.
    Message(usize),
    /// A double-CRLF keepalive ping of this many bytes (answered with one CRLF).
    Ping(usize),
    /// Stray line ends of this many bytes to skip.
    Skip(usize),
    /// More bytes are needed: no header block ends yet.
    Incomplete,
    /// A header block is here, its body not all yet: the message is this many bytes.
    Body(usize),
    /// The stream cannot be framed; close it.
    Broken(&'static str),
    /// A whole header block whose Content-Length cannot frame a body (not a number, more
    /// than one, past the message limit): answer the block (400), then close.
    Refused {
        /// Bytes of the header block, up to and including its blank line.
        head: usize,
        /// Why.
        why: &'static str,
    },
}

/// The framing fault of a message past `sip.max_message_size` (answered 513).
pub const TOO_LARGE: &str = "message larger than the limit";

/// Frames the next message in a stream buffer (RFC 3261 §18.3).
pub fn next_frame(buf: &[u8], max_message: usize) -> Frame {
    if buf.starts_with(b"\r\n\r\n") {
        return Frame::Ping(4);
    }
    let leading = buf
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    if leading > 0 {
        return if leading == buf.len() && leading < 4 {
            Frame::Incomplete
        } else {
            Frame::Skip(leading)
        };
    }
    let Some(end) = header_end(buf) else {
        return if buf.len() > max_message {
            Frame::Broken("header block larger than the message limit")
        } else {
            Frame::Incomplete
        };
    };
    let body = match content_length(&buf[..end]) {
        Ok(Some(n)) => n,
        // RFC 3261 §18.3: over a stream the length is what frames the body. Taken as 0, a
        // body sent without one would be read as the start of the next message, and that
        // message (a CANCEL, say) lost with it.
        Ok(None) => {
            return Frame::Refused {
                head: end,
                why: "Content-Length is required over TCP (RFC 3261 §18.3)",
            }
        }
        Err(why) => return Frame::Refused { head: end, why },
    };
    // A Content-Length near usize::MAX would wrap the sum (found by fuzzing): in a release
    // build the framer then cut the message inside its own header block.
    let Some(total) = end.checked_add(body) else {
        return Frame::Refused {
            head: end,
            why: TOO_LARGE,
        };
    };
    if total > max_message {
        Frame::Refused {
            head: end,
            why: TOO_LARGE,
        }
    } else if buf.len() < total {
        Frame::Body(total)
    } else {
        Frame::Message(total)
    }
}

/// Content-Length (or `l`) from a raw header block; `None` when absent.
///
/// Folded lines are read as the parser reads them (joined to the header above, never a
/// header of their own), so the framer cuts the body at the length the handler checks.
/// Fuzzing found a folded ` Content-Length: 50` taken as the length here while the parser
/// saw none, which would swallow the next pipelined request as body.
fn content_length(head: &[u8]) -> Result<Option<usize>, &'static str> {
    // Lossy: a Latin-1 display name elsewhere in the block does not change where lines
    // end or what the length says (the handler reads such blocks as Latin-1).
    let text = String::from_utf8_lossy(head);
    let mut found: Option<String> = None;
    // Whether the header being read (with its folded lines) is the Content-Length.
    let mut in_length = false;
    // Lines end as the parser ends them: in a bare LF only in a block without any CR.
    let eol = if text.contains('\r') { "\r\n" } else { "\n" };
    for line in text.split(eol).skip(1) {
        if line.starts_with([' ', '\t']) {
            if let (true, Some(v)) = (in_length, found.as_mut()) {
                let piece = line.trim();
                if !piece.is_empty() {
                    if !v.is_empty() {
                        v.push(' ');
                    }
                    v.push_str(piece);
                }
            }
            continue;
        }
        in_length = false;
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim_end();
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l") {
            // Two lengths: whichever one a parser picks, another may pick the other and cut
            // the stream elsewhere.
            if found.is_some() {
                return Err("more than one Content-Length header");
            }
            found = Some(value.trim().to_string());
            in_length = true;
        }
    }
    match found {
        None => Ok(None),
        Some(v) => parse_digits(&v)
            .map(Some)
            .ok_or("Content-Length is not a number"),
    }
}

/// One TCP connection. Its INVITEs being routed count against its own limit
/// ([`TCP_PENDING`]) and against `routing`, the process-wide `sip.max_pending_invites`
/// shared with UDP, which bounds what many connections together pile up on a slow Redis.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    service: Arc<SipService>,
    limits: TcpLimits,
    routing: Arc<Semaphore>,
) {
    let max = limits.max_message;
    let pending = Arc::new(Semaphore::new(TCP_PENDING));
    // A new connection for answers leaves from the address the edge reached: one from
    // another address of a multi-homed host may be refused or not matched by the edge.
    let local = stream.local_addr().ok().map(|a| a.ip());
    let (mut reader, mut writer) = stream.into_split();
    // Pipelined requests are routed concurrently; one writer keeps answers whole.
    let (tx, mut rx) = Answers::new();
    // A peer that takes longer than this to read one answer has given up on its
    // transactions (Timer B and F); its connection would otherwise hold a slot and its
    // queued answers for as long as it trickles a few bytes now and then.
    let write_deadline = limits.idle.min(MESSAGE_DEADLINE);
    // Set by the reader when the peer closes the connection or it fails: what is still to
    // be answered then goes on a new connection.
    let peer_gone = Arc::new(AtomicBool::new(false));
    let writer_task = {
        let (service, peer_gone) = (service.clone(), peer_gone.clone());
        tokio::spawn(async move {
            let mut reconnect: Option<Reconnect> = None;
            // A write on the connection failed: nothing more is written on it.
            let mut broken = false;
            while let Some(Queued {
                bytes,
                room,
                reconnect: to,
            }) = rx.recv().await
            {
                // Written on the request's connection while it may be open: after the
                // peer's end of stream too, as a peer that only shut down its sending side
                // still reads (RFC 3261 §18.2.2: the existing connection if still open).
                if !broken {
                    let written =
                        tokio::time::timeout(write_deadline, writer.write_all(&bytes)).await;
                    match written {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => broken = true,
                        Err(_) => {
                            tracing::debug!(%peer, "tcp peer reads nothing; closing");
                            break;
                        }
                    }
                }
                drop(room);
                // Past the peer's end of stream, a write succeeds into the kernel even when
                // the peer closed for good (its reset comes after): the answers its
                // transactions wait for (INVITE, CANCEL) also go on a new connection to its
                // Via (a peer that still reads gets one twice, which its transaction layer
                // absorbs as a retransmission). Others (an OPTIONS answer, a keepalive) are
                // only for the connection.
                let gone = broken || peer_gone.load(Ordering::Acquire);
                if !gone {
                    continue;
                }
                let sent = match to {
                    Some(to) => {
                        let fallback =
                            reconnect.get_or_insert_with(|| Reconnect::new(write_deadline, local));
                        fallback.send(to, &bytes).await
                    }
                    // Counted for the answers a transaction waits for only.
                    None => true,
                };
                if !sent {
                    service.note_dropped("answer_undelivered");
                }
            }
            let _ = writer.shutdown().await;
            if let Some(mut fallback) = reconnect {
                fallback.close().await;
            }
        })
    };
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 8192];
    // When the message now in `buf` began: it must be whole by `message_deadline` from
    // then, however steadily its bytes trickle in, or a few peers sending a byte now and
    // then could hold every connection slot.
    let message_deadline = limits.idle.min(MESSAGE_DEADLINE);
    let mut begun: Option<tokio::time::Instant> = None;
    // No header block ends before this offset of `buf`: a message arriving in small pieces
    // is searched once, not again from its start on every read.
    let mut scanned = 0usize;
    // Bytes the message in `buf` needs once its header block is framed: reads short of it
    // (a body trickling in) are not framed again from the start.
    let mut awaiting = 0usize;
    // Set when the connection ends on a refused message whose body may still be arriving.
    let mut linger = false;
    let opened = tokio::time::Instant::now();
    // Whether a request (or response) has come whole on this connection yet.
    let mut used = false;
    'read: loop {
        let wait = match begun {
            Some(t) => {
                (t + message_deadline).saturating_duration_since(tokio::time::Instant::now())
            }
            None if !used => (opened + limits.idle.min(FIRST_REQUEST_DEADLINE))
                .saturating_duration_since(tokio::time::Instant::now()),
            None => limits.idle,
        };
        let read = tokio::select! {
            read = tokio::time::timeout(wait, reader.read(&mut chunk)) => read,
            // The writer gave up on the peer: nothing read now could be answered.
            () = tx.closed() => break,
            // The process stops: what was read is answered, then the connection closes and
            // the edge sends its next requests to another controller.
            () = service.stopped() => break,
        };
        let n = match read {
            Ok(Ok(0)) => {
                peer_gone.store(true, Ordering::Release);
                break;
            }
            Err(_) => {
                if begun.is_some() {
                    service.note_dropped("incomplete");
                    tracing::debug!(%peer, "tcp message not complete in time; closing");
                } else if !used {
                    tracing::debug!(%peer, "tcp connection sent no request in time; closing");
                }
                break;
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "tcp read failed");
                peer_gone.store(true, Ordering::Release);
                break;
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            if buf.len() < awaiting {
                break;
            }
            awaiting = 0;
            if buf.len() <= max
                && !buf.starts_with(b"\r")
                && !buf.starts_with(b"\n")
                && header_end(&buf[scanned.min(buf.len())..]).is_none()
            {
                scanned = buf.len().saturating_sub(3);
                break;
            }
            match next_frame(&buf, max) {
                Frame::Incomplete => break,
                Frame::Body(total) => {
                    awaiting = total;
                    break;
                }
                Frame::Skip(n) => {
                    buf.drain(..n);
                    scanned = 0;
                }
                Frame::Ping(n) => {
                    buf.drain(..n);
                    scanned = 0;
                    if tx.send(b"\r\n".to_vec()).await.is_err() {
                        break 'read;
                    }
                }
                Frame::Broken(why) => {
                    service.note_dropped("unframeable");
                    tracing::debug!(%peer, why, "closing tcp connection");
                    break 'read;
                }
                Frame::Refused { head, why } => {
                    // The header block alone is answered 400 (513 for its size) naming the fault (an ACK or
                    // garbage gets nothing). The stream cannot go on after it.
                    tracing::debug!(%peer, why, "answering an unframeable message, then closing");
                    match service
                        .handle_unframeable(&buf[..head], peer, why, Transport::Tcp)
                        .await
                    {
                        Some(out) => {
                            let _ = tx.send(out.bytes).await;
                            linger = true;
                        }
                        None => service.note_dropped("unframeable"),
                    }
                    break 'read;
                }
                Frame::Message(len) if !buf.starts_with(b"INVITE ") => {
                    // Nothing but an INVITE waits on Redis: the rest (a CANCEL above all,
                    // while INVITEs of this connection wait) is answered here and now, in
                    // order, as over UDP.
                    let message: Vec<u8> = buf.drain(..len).collect();
                    scanned = 0;
                    begun = None;
                    used = true;
                    let cancel = message
                        .starts_with(b"CANCEL ")
                        .then(|| service.cancel_permit())
                        .flatten();
                    if let Some(permit) = cancel {
                        // Its INVITE, just read, is routed on another task that may not have
                        // begun yet: the CANCEL waits for it without holding up the stream.
                        let Ok(room) = tx.reserve(&message).await else {
                            break 'read;
                        };
                        let (service, tx) = (service.clone(), tx.clone());
                        tokio::spawn(async move {
                            let answered =
                                service.handle_cancel(&message, peer, Transport::Tcp).await;
                            if let Some(out) = answered {
                                let _ = tx.send_reserved(out, room).await;
                            }
                            drop(permit);
                        });
                    } else if let Some(out) = service.handle(&message, peer, Transport::Tcp).await {
                        if tx.send(out.bytes).await.is_err() {
                            break 'read;
                        }
                    }
                }
                Frame::Message(len) => {
                    // Room for its answer first, holding no permit: a peer that reads
                    // nothing stops being read here.
                    let Ok(room) = tx.reserve(&buf[..len]).await else {
                        break 'read;
                    };
                    let permits = match pending.clone().try_acquire_owned() {
                        Ok(p) => Ok(p),
                        // Those waiting would only be joined by more waiting out the
                        // routing deadline, one connection's worth per deadline, with the
                        // rest of the stream unread: 503 now, and read on.
                        Err(_) if !service.redis_ok() => Err(Refuse::RedisDown),
                        Err(_) => tokio::select! {
                            permit = pending.clone().acquire_owned() => match permit {
                                Ok(p) => Ok(p),
                                Err(_) => break 'read,
                            },
                            () = tx.closed() => break 'read,
                        },
                    }
                    // Over TCP nothing is retransmitted: an INVITE past the process-wide
                    // limit is answered 503 now rather than dropped as over UDP.
                    .and_then(|permit| {
                        routing
                            .clone()
                            .try_acquire_owned()
                            .map(|routing_permit| (permit, routing_permit))
                            .map_err(|_| Refuse::Overloaded)
                    });
                    let message: Vec<u8> = buf.drain(..len).collect();
                    scanned = 0;
                    begun = None;
                    used = true;
                    let (permit, routing_permit) = match permits {
                        Ok(p) => p,
                        Err(why) => {
                            if let Some(out) = service.handle_refusing(&message, peer, why).await {
                                if tx.send_reserved(out, room).await.is_err() {
                                    break 'read;
                                }
                            }
                            continue;
                        }
                    };
                    let (service, tx) = (service.clone(), tx.clone());
                    tokio::spawn(async move {
                        let early = TcpEarly { tx };
                        let answered = service
                            .handle_early(&message, peer, Transport::Tcp, &early)
                            .await;
                        // Routed: the process-wide permit goes back before the answer
                        // waits on a peer that reads slowly, as over UDP; so does the
                        // request's memory.
                        drop(routing_permit);
                        drop(message);
                        if let Some(out) = answered {
                            let _ = early.tx.send_reserved(out, room).await;
                        }
                        drop(permit);
                    });
                }
            }
        }
        // Line ends alone are keepalives (some peers send a single CRLF), not a message.
        if buf.iter().all(|b| *b == b'\r' || *b == b'\n') {
            begun = None;
        } else if begun.is_none() {
            begun = Some(tokio::time::Instant::now());
        }
    }
    drop(tx);
    let _ = writer_task.await;
    if linger {
        // Closing with input unread sends a reset, and the peer's stack may then drop the
        // 400 it has not read yet: after our FIN, read (and drop) what it still sends, for a
        // bounded time and amount.
        let until = tokio::time::Instant::now() + LINGER;
        let mut left = LINGER_BYTES;
        while left > 0 {
            match tokio::time::timeout_at(until, reader.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    }
}

/// How long a connection closed after a refused message still reads what its peer sends.
const LINGER: Duration = Duration::from_secs(2);
/// And how much of it at most.
const LINGER_BYTES: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_pipelined_messages_by_content_length() {
        let one = b"OPTIONS sip:a SIP/2.0\r\nl: 3\r\n\r\nabc";
        let mut two = one.to_vec();
        two.extend_from_slice(b"OPTIONS sip:b SIP/2.0\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(next_frame(&two, 4096), Frame::Message(one.len()));
        assert_eq!(
            next_frame(&two[one.len()..], 4096),
            Frame::Message(two.len() - one.len())
        );
        assert_eq!(
            next_frame(&one[..one.len() - 1], 4096),
            Frame::Body(one.len())
        );
        assert_eq!(
            next_frame(b"OPTIONS sip:a SIP/2.0\r\n", 4096),
            Frame::Incomplete
        );
    }

    #[test]
    fn folded_lines_are_not_headers_of_their_own() {
        // Found by fuzzing: the framer read `Content-Length: 0` while the parser read the
        // folded value `0 IN;...`; the framer now sees what the parser sees.
        let fuzzed = b"INVITE tel:+15555550101 SIP/2.0\r\nVia:S IPrds: 70\r\n\
            From: <s=ip:alice@example.com>;tag=a1\r\nTo: <tfl:+15555550101|Seq: 701NVITE \
            tel:+15555550101 SIP/2.0\r\nVia:S IPrds: 70\r\nFrom: <s=ip:alice@example.com>;\
            tag=a1\r\nTo: <tfl:+15555550101|Seq: 701 IN;;;;;;;;;;?;outer SIP/2./VITE\r\n\
            Content-Length: 0\r\n IN;;;;;;;;;;?;outer SIP/2./VITE\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            next_frame(fuzzed, 4096),
            Frame::Refused {
                head: fuzzed.len(),
                why: "more than one Content-Length header"
            }
        );
        // A folded line that looks like a Content-Length belongs to the header above it.
        // With none of its own, the message has no length: refused.
        let head = b"OPTIONS sip:a SIP/2.0\r\nSubject: x\r\n Content-Length: 3\r\n\r\nabc";
        assert_eq!(
            next_frame(head, 4096),
            Frame::Refused {
                head: head.len() - 3,
                why: "Content-Length is required over TCP (RFC 3261 §18.3)"
            }
        );
        // A Content-Length value folded onto the next line still counts.
        let folded = b"OPTIONS sip:a SIP/2.0\r\nContent-Length:\r\n 3\r\nTo: b\r\n\r\nabc";
        assert_eq!(next_frame(folded, 4096), Frame::Message(folded.len()));
    }

    #[test]
    fn huge_content_length_is_broken_not_wrapped() {
        let head = b"OPTIONS sip:a SIP/2.0\r\nContent-Length: \r000018446744073709551615\t\r\n\r\n";
        assert!(
            matches!(next_frame(head, 4096), Frame::Refused { head: n, .. } if n == head.len())
        );
        let max = format!("OPTIONS sip:a SIP/2.0\r\nl: {}\r\n\r\n", usize::MAX);
        assert!(matches!(
            next_frame(max.as_bytes(), 4096),
            Frame::Refused { .. }
        ));
    }

    #[test]
    fn keepalives_and_limits() {
        assert_eq!(next_frame(b"\r\n\r\nOPTIONS", 4096), Frame::Ping(4));
        assert_eq!(next_frame(b"\r\nOPTIONS", 4096), Frame::Skip(2));
        assert_eq!(next_frame(b"\r\n", 4096), Frame::Incomplete);
        // An LF-only block is framed by its length as the parser reads it.
        let lf = b"OPTIONS sip:a SIP/2.0\nl: 3\n\nabcOPTIONS";
        assert_eq!(next_frame(lf, 4096), Frame::Message(lf.len() - 7));
        assert!(matches!(next_frame(&[b'A'; 5000], 4096), Frame::Broken(_)));
        let bad = b"OPTIONS sip:a SIP/2.0\r\nl: x\r\n\r\n";
        assert_eq!(
            next_frame(bad, 4096),
            Frame::Refused {
                head: bad.len(),
                why: "Content-Length is not a number"
            }
        );
        let big = b"OPTIONS sip:a SIP/2.0\r\nl: 99999\r\n\r\n";
        assert_eq!(
            next_frame(big, 4096),
            Frame::Refused {
                head: big.len(),
                why: TOO_LARGE
            }
        );
        let two = b"OPTIONS sip:a SIP/2.0\r\nl: 3\r\nTo: b\r\nContent-Length: 0\r\n\r\nabc";
        assert_eq!(
            next_frame(two, 4096),
            Frame::Refused {
                head: two.len() - 3,
                why: "more than one Content-Length header"
            }
        );
    }
}
