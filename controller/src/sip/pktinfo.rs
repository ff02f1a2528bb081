//! UDP answers from the address the request was sent to. On a socket bound to a wildcard
//! address (`0.0.0.0`, `[::]`) the kernel would pick an answer's source address by route,
//! which on a host with several addresses or a virtual IP is often not the one the edge
//! sent to; RFC 3261 §18.2.2 and RFC 3581 §4 want the request's own address, and stateful
//! firewalls and NATs in front of the edge drop anything else. The socket asks for each
//! datagram's destination (`IP_PKTINFO` / `IPV6_RECVPKTINFO`) and each answer names it as
//! its source.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Room for the control messages of one datagram; `u64`s give it `cmsghdr`'s alignment.
type Control = [u64; 16];

/// Asks the kernel for each datagram's destination address when `socket` is bound to a
/// wildcard address; `Ok(false)` when it is bound to one address (answers leave from it).
pub fn enable(socket: &UdpSocket) -> io::Result<bool> {
    let local = socket.local_addr()?;
    if !local.ip().is_unspecified() {
        return Ok(false);
    }
    match local {
        SocketAddr::V4(_) => set_flag(socket, libc::IPPROTO_IP, libc::IP_PKTINFO)?,
        SocketAddr::V6(_) => set_flag(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)?,
    }
    Ok(true)
}

fn set_flag(socket: &UdpSocket, level: libc::c_int, option: libc::c_int) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a descriptor the socket owns, with a pointer to a live c_int and
    // its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One datagram into `buf`: its length, its source, and the local address it was sent to
/// (`None` when the socket was not [`enable`]d or the kernel did not say).
pub async fn recv(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    socket
        .async_io(Interest::READABLE, || recv_now(socket, buf))
        .await
}

fn recv_now(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    let mut peer = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut control: Control = [0; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths); the fields set
    // below point at `peer`, `iov` and `control`, which outlive the call.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_name = peer.as_mut_ptr().cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<Control>() as _;
    // SAFETY: recvmsg on a descriptor the socket owns, with a msghdr whose buffers are live
    // and whose lengths are their sizes.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: recvmsg filled `peer` (msg_namelen bytes of it) with the sender's address.
    let source = unsafe { to_socket_addr(peer.as_ptr(), msg.msg_namelen) }
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "datagram without a source"))?;
    // SAFETY: `msg` is the header recvmsg filled; its control buffer is `control`.
    let local = unsafe { destination(&msg) };
    Ok((n as usize, source, local))
}

/// The destination address in the packet-info control message of a received datagram.
///
/// # Safety
/// `msg` must be a header filled by `recvmsg`, its control buffer still live.
unsafe fn destination(msg: &libc::msghdr) -> Option<IpAddr> {
    let mut cmsg = libc::CMSG_FIRSTHDR(msg);
    while !cmsg.is_null() {
        let (level, kind) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
        let data = libc::CMSG_DATA(cmsg);
        if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO {
            let info = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
            // ipi_spec_dst is the local address to answer from (for a broadcast, the
            // interface's own address).
            let ip = Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr));
            return (!ip.is_unspecified()).then_some(IpAddr::V4(ip));
        }
        if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_PKTINFO {
            let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
            let ip = Ipv6Addr::from(info.ipi6_addr.s6_addr);
            // A multicast destination is no address to answer from, and a link-local one
            // would need its interface too: the kernel's choice serves both.
            let usable = !ip.is_multicast() && !ip.is_unspecified() && !ip.is_unicast_link_local();
            return usable.then_some(IpAddr::V6(ip));
        }
        cmsg = libc::CMSG_NXTHDR(msg, cmsg);
    }
    None
}

/// # Safety
/// `addr` must point at a socket address of `len` bytes written by the kernel.
unsafe fn to_socket_addr(
    addr: *const libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    match i32::from((*addr).ss_family) {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            let a = std::ptr::read_unaligned(addr.cast::<libc::sockaddr_in>());
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            let a = std::ptr::read_unaligned(addr.cast::<libc::sockaddr_in6>());
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Sends `bytes` to `to`, from `from` when it is given (the address the request came to).
pub async fn send(
    socket: &UdpSocket,
    bytes: &[u8],
    to: SocketAddr,
    from: Option<IpAddr>,
) -> io::Result<usize> {
    let Some(from) = from else {
        return socket.send_to(bytes, to).await;
    };
    match socket
        .async_io(Interest::WRITABLE, || send_now(socket, bytes, to, from))
        .await
    {
        Ok(n) => Ok(n),
        // An address the kernel will not send from (removed since the request came): an
        // answer from another address beats none.
        Err(e) => {
            tracing::debug!(error = %e, %from, %to, "cannot answer from the request's address");
            socket.send_to(bytes, to).await
        }
    }
}

fn send_now(socket: &UdpSocket, bytes: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<usize> {
    let dest = socket2::SockAddr::from(to);
    let mut control: Control = [0; 16];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: as in recv_now; sendmsg only reads through these pointers.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_name = dest.as_ptr().cast_mut().cast();
    msg.msg_namelen = dest.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe {
        match from {
            IpAddr::V4(_) => libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32),
            IpAddr::V6(_) => libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32),
        }
    };
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer is larger than `space` (checked by the test below), so
    // CMSG_FIRSTHDR points into it, and the header and data written fit in `space`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return socket.try_send_to(bytes, to);
        }
        match (from, to) {
            // A v4 answer from a dual-stack socket: the v6 form of the v4 address.
            (IpAddr::V4(ip), SocketAddr::V6(_)) => {
                write_v6(cmsg, ip.to_ipv6_mapped());
            }
            (IpAddr::V4(ip), SocketAddr::V4(_)) => {
                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                (*cmsg).cmsg_type = libc::IP_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as _;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
            }
            (IpAddr::V6(ip), _) => write_v6(cmsg, ip),
        }
    }
    // SAFETY: sendmsg on a descriptor the socket owns, with a msghdr whose buffers are live.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// # Safety
/// `cmsg` must point at room for a header and an `in6_pktinfo`.
unsafe fn write_v6(cmsg: *mut libc::cmsghdr, ip: Ipv6Addr) {
    (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
    (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
    (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as _;
    let info = libc::in6_pktinfo {
        ipi6_addr: libc::in6_addr {
            s6_addr: ip.octets(),
        },
        ipi6_ifindex: 0,
    };
    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_buffer_holds_either_packet_info() {
        // SAFETY: CMSG_SPACE is arithmetic on its argument.
        let need =
            unsafe {
                libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32)
                    .max(libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32))
            };
        assert!(need as usize <= size_of::<Control>());
    }

    /// An answer to a datagram sent to 127.0.0.2 on a wildcard socket leaves from 127.0.0.2,
    /// where the kernel's route would pick 127.0.0.1.
    #[tokio::test]
    async fn answers_leave_from_the_address_the_request_came_to() {
        let server = UdpSocket::bind("0.0.0.0:0").await.expect("bind");
        assert!(enable(&server).expect("pktinfo"));
        let port = server.local_addr().expect("addr").port();
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client
            .send_to(b"ping", ("127.0.0.2", port))
            .await
            .expect("send");
        let mut buf = [0u8; 16];
        let (n, source, local) = recv(&server, &mut buf).await.expect("recv");
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(source, client.local_addr().expect("addr"));
        assert_eq!(local, Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))));
        send(&server, b"pong", source, local).await.expect("send");
        let (n, from) = client.recv_from(&mut buf).await.expect("answer");
        assert_eq!(&buf[..n], b"pong");
        assert_eq!(from, SocketAddr::from(([127, 0, 0, 2], port)));
    }

    /// An address the host cannot send from (gone since the request came) still gets the
    /// answer out, from the address the kernel picks.
    #[tokio::test]
    async fn an_address_the_host_cannot_send_from_falls_back_to_the_kernels_choice() {
        let server = UdpSocket::bind("0.0.0.0:0").await.expect("bind");
        assert!(enable(&server).expect("pktinfo"));
        let port = server.local_addr().expect("addr").port();
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let to = client.local_addr().expect("addr");
        let gone = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        assert!(
            send_now(&server, b"x", to, gone).is_err(),
            "not ours to send from"
        );
        send(&server, b"pong", to, Some(gone)).await.expect("send");
        let mut buf = [0u8; 16];
        let (n, from) = client.recv_from(&mut buf).await.expect("answer");
        assert_eq!(&buf[..n], b"pong");
        assert_eq!(from, SocketAddr::from(([127, 0, 0, 1], port)));
    }
}
