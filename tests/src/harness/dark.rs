//! A loopback port that plays a host gone dark: connections to it neither complete nor are
//! refused, as when a dead machine's address drops every packet (a VM that vanished, a pod on
//! a node that went NotReady). Clients wait out their own connect timeouts on it, which a
//! stopped local process (refused at once) never makes them do.
//!
//! It is a listening socket with the smallest accept queue, never accepted from, whose
//! queue is filled at start: Linux drops the SYNs of further connections while it is full.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::{HarnessError, HarnessResult};

/// A dark port on 127.0.0.1; it closes when dropped.
pub struct DarkPort {
    addr: SocketAddr,
    _listener: OwnedFd,
    _queued: Vec<TcpStream>,
}

impl DarkPort {
    /// Opens one, and checks that a connection to it hangs.
    pub fn start() -> HarnessResult<DarkPort> {
        let err = |what: &str| {
            HarnessError(format!(
                "dark port: {what}: {}",
                std::io::Error::last_os_error()
            ))
        };
        // SAFETY: plain socket calls on a descriptor this function owns from creation.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd < 0 {
            return Err(err("socket"));
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let listener = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `sin` is a valid sockaddr_in of `len` bytes.
        if unsafe { libc::bind(listener.as_raw_fd(), std::ptr::addr_of!(sin).cast(), len) } != 0 {
            return Err(err("bind"));
        }
        // SAFETY: a bound socket this function owns.
        if unsafe { libc::listen(listener.as_raw_fd(), 0) } != 0 {
            return Err(err("listen"));
        }
        let mut bound: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut bound_len = len;
        // SAFETY: `bound` has room for a sockaddr_in, `bound_len` says so.
        if unsafe {
            libc::getsockname(
                listener.as_raw_fd(),
                std::ptr::addr_of_mut!(bound).cast(),
                &mut bound_len,
            )
        } != 0
        {
            return Err(err("getsockname"));
        }
        let addr = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, u16::from_be(bound.sin_port)));
        // Fill the accept queue, then look for the first connection that hangs.
        let mut queued = Vec::new();
        for _ in 0..8 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => queued.push(s),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Ok(DarkPort {
                        addr,
                        _listener: listener,
                        _queued: queued,
                    })
                }
                Err(e) => return Err(HarnessError(format!("dark port: connect: {e}"))),
            }
        }
        Err(HarnessError(format!(
            "dark port: {addr} still takes connections after {} (this kernel does not drop SYNs past a full accept queue)",
            queued.len()
        )))
    }

    /// `host:port` of the port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}
